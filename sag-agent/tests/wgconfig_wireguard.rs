//! A generated client configuration, read by the standard WireGuard tools: `wg-quick strip`
//! and `wg setconf` on a wireguard-go device in a network namespace of its own. Needs root.
//! The endpoint is loopback inside that namespace, so nothing leaves it.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use sag_agent::{
    testing::netns::{unique_name, Netns},
    wgconfig::{ClientConfig, KeyPair, DEFAULT_PERSISTENT_KEEPALIVE_S},
};

/// A wireguard-go device, stopped and its UAPI socket removed when dropped.
struct WireguardGo {
    child: Child,
    socket: PathBuf,
}

impl Drop for WireguardGo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn start_wireguard_go(netns: &Netns, name: &str) -> WireguardGo {
    let child = Command::new("ip")
        .args(["netns", "exec", netns.name(), "wireguard-go", "-f", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("wireguard-go starts");
    // The UAPI socket path is host-wide, hence the unique name.
    let socket = PathBuf::from(format!("/var/run/wireguard/{name}.sock"));
    let device = WireguardGo { child, socket };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !device.socket.exists() {
        assert!(
            Instant::now() < deadline,
            "wireguard-go did not create {}",
            device.socket.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    device
}

#[test]
fn wireguard_tools_accept_client_config() {
    let netns = Netns::new("swg").unwrap();
    let name = unique_name("wgt");
    let _device = start_wireguard_go(&netns, &name);

    let client = KeyPair::generate();
    let server = KeyPair::generate();
    let config = ClientConfig {
        private_key: client.private_base64(),
        address: Ipv4Addr::new(10, 77, 0, 2),
        dns: vec![Ipv4Addr::new(100, 100, 2, 136)],
        server_public_key: server.public_base64(),
        endpoint: "127.0.0.1:51820".to_owned(),
        allowed_ips: vec!["10.77.0.0/24".parse().unwrap(), "172.16.0.0/12".parse().unwrap()],
        persistent_keepalive_s: Some(DEFAULT_PERSISTENT_KEEPALIVE_S),
    };
    config.check().unwrap();

    let directory = std::env::temp_dir().join(unique_name("sag-wg-"));
    std::fs::create_dir_all(&directory).unwrap();
    let file = directory.join(format!("{name}.conf"));
    std::fs::write(&file, config.render()).unwrap();
    let stripped = netns.exec(&["wg-quick", "strip", file.to_str().unwrap()]).unwrap();
    assert!(!stripped.contains("Address"), "{stripped}");
    assert!(!stripped.contains("DNS"), "{stripped}");
    let plain = directory.join("plain.conf");
    std::fs::write(&plain, &stripped).unwrap();
    netns.exec(&["wg", "setconf", &name, plain.to_str().unwrap()]).unwrap();
    let dump = netns.exec(&["wg", "show", &name, "dump"]).unwrap();
    std::fs::remove_dir_all(&directory).unwrap();

    let lines: Vec<Vec<&str>> = dump.lines().map(|line| line.split('\t').collect()).collect();
    assert_eq!(lines.len(), 2, "{dump}");
    assert_eq!(lines[0][0], client.private_base64());
    assert_eq!(lines[0][1], client.public_base64());
    let peer = &lines[1];
    assert_eq!(peer[0], server.public_base64());
    assert_eq!(peer[2], "127.0.0.1:51820");
    assert_eq!(peer[3], "10.77.0.0/24,172.16.0.0/12");
    assert_eq!(peer[7], "25");
}
