//! The deployment files: the systemd unit passes `systemd-analyze verify`, and its capabilities
//! are enough for the agent to serve a user on real traffic, and no more than it needs.

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

/// Returns the capabilities of the unit's bounding set, as `setpriv` names them (`+bpf`).
fn unit_capabilities() -> Vec<String> {
    let unit = std::fs::read_to_string(deploy("sag-agent.service")).unwrap();
    let line = unit
        .lines()
        .find_map(|line| line.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets CapabilityBoundingSet");
    line.split_whitespace()
        .map(|name| format!("+{}", name.trim_start_matches("CAP_").to_lowercase()))
        .collect()
}

/// Returns the bounding set of process `pid` from /proc, as a bit mask.
fn bounding_set(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status.lines().find_map(|line| line.strip_prefix("CapBnd:")).unwrap().trim();
    u64::from_str_radix(hex, 16).unwrap()
}

#[test]
fn agent_serves_a_user_with_only_the_unit_capabilities() {
    use sag_agent::testing::lab::{connected_address, ping, Lab};

    let capabilities = unit_capabilities();
    assert_eq!(
        capabilities,
        ["+bpf", "+perfmon", "+net_admin", "+net_bind_service", "+sys_resource"]
    );
    let bounding = format!("--bounding-set=-all,{}", capabilities.join(","));
    let lab =
        Lab::start_wrapped(Path::new(env!("CARGO_BIN_EXE_sag-agent")), 1, &["setpriv", &bounding])
            .expect("the agent starts with the unit's capabilities");
    // CAP_NET_ADMIN 12, CAP_NET_BIND_SERVICE 10, CAP_SYS_RESOURCE 24, CAP_PERFMON 38, CAP_BPF 39;
    // a bounding set only shrinks, so those this test itself lacks stay out.
    let unit = (1u64 << 10) | (1 << 12) | (1 << 24) | (1 << 38) | (1 << 39);
    let expected = unit & bounding_set(std::process::id());
    assert_eq!(bounding_set(lab.agent_pid().unwrap()), expected, "the agent runs restricted");

    let (instance, fingerprint) = lab.create_instance().unwrap();
    lab.create_account(&instance, "cap-tester", 2_000, None).unwrap();
    let line = lab.connect(0, &fingerprint, &instance, "cap-tester").unwrap();
    let address = connected_address(&line).unwrap();
    assert_eq!(ping(&lab.users[0], 3, 100).unwrap(), 3);
    sag_agent::testing::lab::settle();
    let counted = lab.counters(address).unwrap().unwrap();
    assert_eq!((counted.rx_packets, counted.rx_bytes), (3, 3 * 128));
}

#[test]
fn agent_fails_without_cap_bpf() {
    use sag_agent::testing::lab::Lab;

    let bounding = format!(
        "--bounding-set=-all,{}",
        unit_capabilities().into_iter().filter(|c| c != "+bpf").collect::<Vec<_>>().join(",")
    );
    let error =
        Lab::start_wrapped(Path::new(env!("CARGO_BIN_EXE_sag-agent")), 0, &["setpriv", &bounding])
            .err()
            .expect("the agent cannot load its programs without CAP_BPF");
    let message = format!("{error:#}");
    assert!(message.contains("failed to load the dataplane"), "{message}");
}
