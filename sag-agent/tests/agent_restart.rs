//! Kernel test: counters kept in pinned maps survive a crash and a restart of the
//! `sag-agent` process, and counting goes on from where it stopped. Needs root.

use std::{
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc::{self, Receiver},
    time::{Duration, Instant},
};

use sag_agent::{
    dataplane::PinnedCounters,
    testing::{
        frames::udp,
        netns::unique_name,
        topology::{bind_udp, client_address, udp_echo, TunTopology, LAN_SERVER},
    },
};
use sag_common::counters::ClientCounters;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);
const ECHO_PORT: u16 = 7;

/// A pin directory on bpffs, removed with its pinned maps when dropped.
struct PinDir(PathBuf);

impl PinDir {
    fn new() -> Self {
        Self(Path::new("/sys/fs/bpf").join(unique_name("sag-test-")))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `sag-agent dataplane watch` process in the gateway namespace, killed if still running
/// when dropped.
struct Agent {
    child: Child,
    lines: Receiver<String>,
}

impl Agent {
    fn start(topology: &TunTopology, pin_dir: &Path, clients: &[Ipv4Addr]) -> Self {
        // nsenter switches only the network namespace. `ip netns exec` would also mount a new
        // /sys, hiding the bpffs under /sys/fs/bpf that the pins live on.
        let mut command = Command::new("nsenter");
        command.arg(format!("--net=/run/netns/{}", topology.gateway.name()));
        command.arg(env!("CARGO_BIN_EXE_sag-agent"));
        command.args(["dataplane", "watch", "--tunnel", topology.tun_name(), "--json"]);
        command.args(["--interval", "0.1", "--pin-dir"]).arg(pin_dir);
        for client in clients {
            command.args(["--client", &client.to_string()]);
        }
        let mut child = command.stdout(Stdio::piped()).spawn().expect("sag-agent starts");
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// Returns the client counters of the next printed snapshot.
    fn next_snapshot(&self) -> Vec<(Ipv4Addr, ClientCounters)> {
        let line = self.lines.recv_timeout(WAIT).expect("sag-agent prints a snapshot");
        let value: Value = serde_json::from_str(&line).unwrap();
        value["clients"]
            .as_array()
            .unwrap()
            .iter()
            .map(|client| {
                let field = |name: &str| client[name].as_u64().unwrap();
                (
                    client["address"].as_str().unwrap().parse().unwrap(),
                    ClientCounters {
                        rx_packets: field("rx_packets"),
                        rx_bytes: field("rx_bytes"),
                        tx_packets: field("tx_packets"),
                        tx_bytes: field("tx_bytes"),
                        ..ClientCounters::default()
                    },
                )
            })
            .collect()
    }

    /// Waits until a printed snapshot equals `expected`, and fails with the last one if none
    /// does in time.
    fn wait_for(&self, expected: &[(Ipv4Addr, ClientCounters)]) {
        let deadline = Instant::now() + WAIT;
        let mut last = Vec::new();
        while Instant::now() < deadline {
            last = self.next_snapshot();
            if last == expected {
                return;
            }
        }
        panic!("sag-agent printed {last:?}, expected {expected:?}");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `count` UDP datagrams of `payload` bytes from `client` to the echo server and reads
/// the echoes back from the tunnel.
fn round_trips(topology: &TunTopology, client: Ipv4Addr, count: usize, payload: usize) {
    let socket = bind_udp(&topology.lan, SocketAddrV4::new(LAN_SERVER, ECHO_PORT)).unwrap();
    let echo = udp_echo(socket, count, WAIT);
    for _ in 0..count {
        topology
            .tun
            .send(&udp((client, 3000), (LAN_SERVER, ECHO_PORT), &vec![0; payload]))
            .unwrap();
    }
    assert_eq!(echo.join().unwrap(), count);
    assert_eq!(topology.receive(count, WAIT).unwrap().len(), count);
}

fn counters(packets: u64, packet_bytes: u64) -> ClientCounters {
    ClientCounters {
        rx_packets: packets,
        rx_bytes: packets * packet_bytes,
        tx_packets: packets,
        tx_bytes: packets * packet_bytes,
        ..ClientCounters::default()
    }
}

#[test]
fn counters_survive_agent_crash_and_restart() {
    let topology = TunTopology::new().unwrap();
    let pin_dir = PinDir::new();
    let (a, b) = (client_address(0), client_address(1));

    let mut first = Agent::start(&topology, &pin_dir.0, &[a, b]);
    first.wait_for(&[(a, counters(0, 0)), (b, counters(0, 0))]);
    round_trips(&topology, a, 10, 100);
    round_trips(&topology, b, 4, 1000);
    first.wait_for(&[(a, counters(10, 128)), (b, counters(4, 1028))]);

    // A crash: nothing runs on exit, the links go with the process, the pinned maps stay.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let pinned = PinnedCounters::open(&pin_dir.0).unwrap().clients().unwrap();
    assert_eq!(pinned[&a], counters(10, 128));
    assert_eq!(pinned[&b], counters(4, 1028));

    let second = Agent::start(&topology, &pin_dir.0, &[a, b]);
    assert_eq!(second.next_snapshot(), vec![(a, counters(10, 128)), (b, counters(4, 1028))]);
    round_trips(&topology, a, 5, 100);
    second.wait_for(&[(a, counters(15, 128)), (b, counters(4, 1028))]);
}

#[test]
fn watch_exits_cleanly_on_sigterm() {
    let topology = TunTopology::new().unwrap();
    let pin_dir = PinDir::new();
    let mut agent = Agent::start(&topology, &pin_dir.0, &[client_address(0)]);
    agent.next_snapshot();
    // SAFETY: signalling a child this test started, by its PID.
    assert_eq!(unsafe { libc::kill(agent.child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let status = agent.child.wait().unwrap();
    assert!(status.success(), "sag-agent exited with {status}");
}
