//! The deployment files: the systemd unit passes `systemd-analyze verify`, and the example
//! configuration is what the agent reads.

use std::path::Path;

fn deploy(file: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(file)
}

#[test]
fn systemd_unit_verifies() {
    let unit = std::fs::read_to_string(deploy("sag-agent.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/sag-agent run --config /etc/sag/agent.toml\n"));
    // systemd-analyze checks that the program exists: point it at the binary just built.
    let directory = tempfile::tempdir().unwrap();
    let copy = directory.path().join("sag-agent.service");
    let binary = env!("CARGO_BIN_EXE_sag-agent");
    std::fs::write(&copy, unit.replace("/usr/bin/sag-agent", binary)).unwrap();
    let output = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze runs (setup installs systemd)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(stderr.trim(), "", "systemd-analyze reports nothing");
}

#[test]
fn systemd_unit_keeps_only_needed_capabilities() {
    let unit = std::fs::read_to_string(deploy("sag-agent.service")).unwrap();
    let capabilities = "CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_NET_BIND_SERVICE CAP_SYS_RESOURCE";
    assert!(unit.contains(&format!("CapabilityBoundingSet={capabilities}\n")), "{unit}");
    assert!(unit.contains(&format!("AmbientCapabilities={capabilities}\n")), "{unit}");
    assert!(!unit.contains("CAP_SYS_ADMIN"), "no CAP_SYS_ADMIN");
}
