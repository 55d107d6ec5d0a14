//! Demo of the kernel accounting: three clients exchange traffic through a gateway namespace
//! while `sag-agent dataplane watch` prints their live counters. Run through
//! `cargo xtask demo`, as root.
//!
//! All traffic stays inside the namespaces this program creates, and every generator stops
//! after a fixed time and packet count. Everything is removed on exit.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use sag_agent::{
    dataplane::PinnedCounters,
    testing::{
        frames::udp,
        netns::unique_name,
        topology::{bind_udp, client_address, udp_echo, TunTopology, LAN_SERVER},
    },
};
use sag_common::counters::{ClientCounters, Direction};

const ECHO_PORT: u16 = 7;
/// How long the clients send.
const TRAFFIC_TIME: Duration = Duration::from_secs(6);

/// One client's traffic: a datagram of `payload` bytes every `gap`.
struct Flow {
    client: Ipv4Addr,
    payload: usize,
    gap: Duration,
}

fn main() -> Result<()> {
    let agent =
        std::env::args().nth(1).map(PathBuf::from).context("usage: demo PATH-TO-SAG-AGENT")?;
    let topology = TunTopology::new()?;
    let pin_dir = PathBuf::from("/sys/fs/bpf").join(unique_name("sag-demo-"));
    let result = run(&agent, &topology, &pin_dir);
    let _ = std::fs::remove_dir_all(&pin_dir);
    drop(topology);
    println!("removed the demo's namespaces, interfaces and pinned maps");
    result
}

fn run(agent: &PathBuf, topology: &TunTopology, pin_dir: &PathBuf) -> Result<()> {
    let flows = [
        Flow { client: client_address(0), payload: 1_172, gap: Duration::from_millis(10) },
        Flow { client: client_address(1), payload: 472, gap: Duration::from_millis(20) },
        Flow { client: client_address(2), payload: 72, gap: Duration::from_millis(50) },
    ];
    println!("gateway namespace {} with tunnel {}", topology.gateway.name(), topology.tun_name());
    println!(
        "company network namespace {} with a UDP echo server at {LAN_SERVER}:{ECHO_PORT}",
        topology.lan.name()
    );
    for flow in &flows {
        let kbits = (flow.payload + 28) as f64 * 8.0 / flow.gap.as_secs_f64() / 1_000.0;
        println!(
            "client {} sends {}-byte IP packets every {} ms ({kbits:.0} kbit/s each way)",
            flow.client,
            flow.payload + 28,
            flow.gap.as_millis()
        );
    }
    println!();

    let mut watch = Command::new("nsenter");
    watch.arg(format!("--net=/run/netns/{}", topology.gateway.name())).arg(agent);
    watch.args([
        "dataplane",
        "watch",
        "--tunnel",
        topology.tun_name(),
        "--interval",
        "1",
        "--count",
        "8",
    ]);
    watch.arg("--pin-dir").arg(pin_dir);
    for flow in &flows {
        watch.args(["--client", &flow.client.to_string()]);
    }
    let mut watcher = watch.spawn().context("failed to start sag-agent dataplane watch")?;
    std::thread::sleep(Duration::from_millis(500));

    let sent = send_flows(topology, &flows)?;
    let status = watcher.wait()?;
    if !status.success() {
        bail!("sag-agent dataplane watch exited with {status}");
    }

    let counted = PinnedCounters::open(pin_dir)?.clients()?;
    println!(
        "{:<15} {:>16} {:>16} {:>16} {:>16}",
        "CLIENT", "RX BYTES SENT", "RX BYTES COUNTED", "TX BYTES SENT", "TX BYTES COUNTED"
    );
    let mut all_equal = true;
    for (client, expected) in &sent {
        let got = counted.get(client).copied().unwrap_or_default();
        all_equal &= got == *expected;
        println!(
            "{:<15} {:>16} {:>16} {:>16} {:>16}",
            client.to_string(),
            expected.rx_bytes,
            got.rx_bytes,
            expected.tx_bytes,
            got.tx_bytes
        );
    }
    if !all_equal {
        bail!("the kernel counters differ from the traffic sent");
    }
    println!("\nthe kernel counted every packet and byte exactly");
    Ok(())
}

/// Sends the flows for [`TRAFFIC_TIME`] and drains the echoes from the tunnel. Returns what
/// each client sent and received, counted by the sender.
fn send_flows(
    topology: &TunTopology,
    flows: &[Flow],
) -> Result<BTreeMap<Ipv4Addr, ClientCounters>> {
    let max_packets: usize =
        flows.iter().map(|f| (TRAFFIC_TIME.as_millis() / f.gap.as_millis()) as usize + 1).sum();
    let socket = bind_udp(&topology.lan, SocketAddrV4::new(LAN_SERVER, ECHO_PORT))?;
    let echo = udp_echo(socket, max_packets, TRAFFIC_TIME + Duration::from_secs(2));
    let done = AtomicBool::new(false);
    let mut sent = BTreeMap::<Ipv4Addr, ClientCounters>::new();
    let received = std::thread::scope(|scope| -> Result<usize> {
        let reader = scope.spawn(|| {
            let mut received = 0;
            while !done.load(Ordering::Relaxed) || received < max_packets {
                match topology.tun.recv(Duration::from_millis(500)) {
                    Ok(Some(_)) => received += 1,
                    _ if done.load(Ordering::Relaxed) => break,
                    _ => {}
                }
            }
            received
        });
        let start = Instant::now();
        let mut next: Vec<Instant> = flows.iter().map(|_| start).collect();
        while start.elapsed() < TRAFFIC_TIME {
            for (flow, due) in flows.iter().zip(next.iter_mut()) {
                if Instant::now() >= *due {
                    let packet =
                        udp((flow.client, 4000), (LAN_SERVER, ECHO_PORT), &vec![0; flow.payload]);
                    topology.tun.send(&packet)?;
                    let entry = sent.entry(flow.client).or_default();
                    entry.record(Direction::Rx, packet.len() as u64);
                    entry.record(Direction::Tx, packet.len() as u64);
                    *due += flow.gap;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // Let the last echoes arrive before the reader stops.
        std::thread::sleep(Duration::from_millis(500));
        done.store(true, Ordering::Relaxed);
        Ok(reader.join().expect("reader thread"))
    })?;
    let echoed = echo.join().expect("echo thread");
    let total: u64 = sent.values().map(|c| c.rx_packets).sum();
    println!(
        "sent {total} datagrams, the server echoed {echoed}, the tunnel returned {received}\n"
    );
    Ok(sent)
}
