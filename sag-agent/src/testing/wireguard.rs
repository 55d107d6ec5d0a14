//! wireguard-go (Debian's userspace WireGuard) as an independent client in a namespace,
//! configured from a wg-quick file the way wg-quick would.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::netns::{run, unique_name, Netns};

/// Time wireguard-go has to open its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// wireguard-go running in a namespace, killed when dropped.
pub struct WireguardGo {
    /// The interface name, unique on the host (the control socket path is host-wide).
    pub name: String,
    process: Child,
}

impl WireguardGo {
    /// Starts wireguard-go in `netns` and applies the wg-quick file `config`: the WireGuard
    /// part through `wg setconf`, then the address, MTU and routes through `ip`.
    ///
    /// # Errors
    /// Fails if wireguard-go does not start or a setting is rejected.
    pub fn start(netns: &Netns, config: &Path) -> Result<Self> {
        let name = unique_name("lwg");
        let process = Command::new("ip")
            .args(["netns", "exec", netns.name(), "wireguard-go", "-f", &name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("failed to start wireguard-go")?;
        let wireguard = Self { name, process };
        let socket = wireguard.socket();
        let start = Instant::now();
        while !Path::new(&socket).exists() {
            if start.elapsed() > START_TIMEOUT {
                bail!("wireguard-go did not open {socket} in time");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let name = &wireguard.name;
        let text = std::fs::read_to_string(config)
            .with_context(|| format!("failed to read {}", config.display()))?;
        // wg-quick takes the interface name from the file name.
        let named = config.with_file_name(format!("{name}.conf"));
        std::fs::copy(config, &named)?;
        let stripped = run("wg-quick", &["strip", named.to_str().context("UTF-8 path")?])?;
        let stripped_path = config.with_file_name(format!("{name}.stripped"));
        std::fs::write(&stripped_path, stripped)?;
        netns.exec(&["wg", "setconf", name, stripped_path.to_str().context("UTF-8 path")?])?;
        let value = |key: &str| -> Result<String> {
            text.lines()
                .find_map(|line| line.strip_prefix(&format!("{key} = ")))
                .map(ToOwned::to_owned)
                .with_context(|| format!("no {key} in {}", config.display()))
        };
        netns.ip(&["addr", "add", &value("Address")?, "dev", name])?;
        netns.ip(&["link", "set", name, "mtu", &value("MTU")?, "up"])?;
        for route in value("AllowedIPs")?.split(", ") {
            netns.ip(&["route", "add", route, "dev", name])?;
        }
        Ok(wireguard)
    }

    /// Returns the process ID of wireguard-go.
    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    fn socket(&self) -> String {
        format!("/var/run/wireguard/{}.sock", self.name)
    }
}

impl Drop for WireguardGo {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        // Killed, it leaves its control socket behind.
        let _ = std::fs::remove_file(self.socket());
    }
}
