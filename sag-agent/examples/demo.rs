//! Demo of the kernel accounting and rate limiting: three clients exchange traffic through a
//! gateway namespace while `sag-agent dataplane watch` prints their live counters, and the
//! fastest is held at its limit. Run through
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

const ECHO_PORT: u16 = 7;
/// How long the clients send.
const TRAFFIC_TIME: Duration = Duration::from_secs(6);
/// Limit of every client, each way, in kbit/s: below the first client's rate only.
const RATE_KBPS: u32 = 500;

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
    println!(
        "every client is limited to {RATE_KBPS} kbit/s each way, so the first one is held there"
    );
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
        "--rate-kbps",
        &RATE_KBPS.to_string(),
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
        "{:<15} {:>14} {:>14} {:>14} {:>14} {:>14}",
        "CLIENT", "RX BYTES SENT", "RX PASSED", "RX DROPPED", "TX PASSED", "TX DROPPED"
    );
    let mut exact = true;
    for (client, sent_bytes) in &sent {
        let got = counted.get(client).copied().unwrap_or_default();
        let rx_dropped = got.rx_dropped.rate_limit.bytes;
        let tx_dropped = got.tx_dropped.rate_limit.bytes;
        // Every byte sent was passed or dropped, and every byte passed came back as an echo.
        exact &= got.rx_bytes + rx_dropped == *sent_bytes;
        exact &= got.tx_bytes + tx_dropped == got.rx_bytes;
        println!(
            "{:<15} {:>14} {:>14} {:>14} {:>14} {:>14}",
            client.to_string(),
            sent_bytes,
            got.rx_bytes,
            rx_dropped,
            got.tx_bytes,
            tx_dropped
        );
    }
    if !exact {
        bail!("the kernel counters do not add up to the traffic sent");
    }
    println!("\nthe kernel accounted for every byte: sent = passed + dropped, echoed = passed");
    Ok(())
}

/// Sends the flows for [`TRAFFIC_TIME`] and drains the echoes from the tunnel. Returns the IP
/// bytes each client sent.
fn send_flows(topology: &TunTopology, flows: &[Flow]) -> Result<BTreeMap<Ipv4Addr, u64>> {
    let max_packets: usize =
        flows.iter().map(|f| (TRAFFIC_TIME.as_millis() / f.gap.as_millis()) as usize + 1).sum();
    let socket = bind_udp(&topology.lan, SocketAddrV4::new(LAN_SERVER, ECHO_PORT))?;
    let echo = udp_echo(socket, max_packets, TRAFFIC_TIME + Duration::from_secs(2));
    let done = AtomicBool::new(false);
    let mut sent = BTreeMap::<Ipv4Addr, u64>::new();
    let mut datagrams = 0u64;
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
                    *sent.entry(flow.client).or_default() += packet.len() as u64;
                    datagrams += 1;
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
    println!(
        "sent {datagrams} datagrams, the server echoed {echoed}, the tunnel returned {received}\n"
    );
    Ok(sent)
}
