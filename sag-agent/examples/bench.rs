//! Benchmarks of the kernel programs, each a ratio against a baseline measured in the same run.
//! Run through `cargo xtask bench dataplane`, as root.
//!
//! 1. Time per packet from BPF_PROG_TEST_RUN, with 1,000 clients loaded, for each program and
//!    for a baseline that only parses the frame and passes it. Target: at most 2x.
//! 2. Small-packet forwarding rate through a gateway namespace with the programs attached and
//!    without them. Target: at least 0.9x.
//!
//! Traffic stays inside the namespaces this program creates; each sending round stops after a
//! fixed time and packet count.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use sag_agent::{
    dataplane::{ClientSettings, Dataplane, InstanceSettings, Program, RxHook},
    testing::{
        baseline::Baseline,
        frames::{ethernet_ipv4, udp},
        netns::Netns,
        topology::{bind_udp, ethernet_client_address, EthernetTopology, LAN_SERVER},
    },
};
use sag_common::{packet::Framing, policy::RateLimit, policy::MAX_BOX_BANDWIDTH_KBPS};

const INSTANCE: u32 = 1;
/// Clients loaded into the maps for the per-packet benchmark.
const CLIENTS: u32 = 1_000;
/// Runs per BPF_PROG_TEST_RUN call.
const REPEAT: u32 = 1_000_000;
/// Alternating rounds of each measurement; the median counts.
const ROUNDS: usize = 5;
/// Length of one forwarding round.
const FORWARD_TIME: Duration = Duration::from_secs(2);
/// Upper bound on packets sent in one forwarding round.
const FORWARD_MAX_PACKETS: u64 = 5_000_000;
/// UDP payload of the forwarding test: 18 bytes make a 46-byte IP packet, the smallest that
/// fills a minimum Ethernet frame.
const SMALL_PAYLOAD: usize = 18;
/// XDP test runs receive on the loopback device, ifindex 1.
const TEST_RUN_IFINDEX: u32 = 1;

fn main() -> Result<()> {
    match std::env::args().nth(1).as_deref() {
        Some("dataplane") => {
            let per_packet = per_packet()?;
            let forwarding = forwarding()?;
            println!();
            println!(
                "summary: worst program/baseline ratio {per_packet:.2} (target at most 2.00), \
                 worst forwarding with/without {forwarding:.3} (target at least 0.900)"
            );
            Ok(())
        }
        _ => bail!("usage: bench dataplane"),
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Returns the address of client `n` of the benchmark, in 10.77.0.0/16 from 10.77.0.2.
fn bench_client(n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 77, 0, 2)) + n)
}

/// Settings that run every check of the programs, with a limit no benchmark reaches.
fn full_path_settings() -> ClientSettings {
    let limit = RateLimit::with_default_burst(MAX_BOX_BANDWIDTH_KBPS);
    ClientSettings { instance: INSTANCE, blocked: false, rx: limit, tx: limit }
}

/// Returns the benchmark's instance: pools that contain both topologies' clients, and the
/// company network allowed.
fn bench_instance() -> Result<InstanceSettings> {
    Ok(InstanceSettings {
        blocked: false,
        client_to_client: false,
        pools: vec!["10.77.0.0/16".parse()?, "10.78.0.0/24".parse()?],
        allowed: vec!["198.18.0.0/16".parse()?],
    })
}

fn per_packet() -> Result<f64> {
    let mut dataplane = Dataplane::load(None)?;
    dataplane.set_instance(INSTANCE, &bench_instance()?)?;
    dataplane.bind_tunnel(TEST_RUN_IFINDEX, INSTANCE)?;
    for n in 0..CLIENTS {
        dataplane.add_client(bench_client(n), &full_path_settings())?;
    }
    let baseline = Baseline::load()?;
    let client = bench_client(CLIENTS / 2);
    let upstream = udp((client, 4000), (LAN_SERVER, 9), &[0; 72]);
    let downstream = udp((LAN_SERVER, 9), (client, 4000), &[0; 72]);
    let cases = [
        (Program::RxL3, upstream.clone()),
        (Program::RxEthernet, ethernet_ipv4(&upstream)),
        (Program::RxL3Tc, upstream.clone()),
        (Program::RxEthernetTc, ethernet_ipv4(&upstream)),
        (Program::TxL3, downstream.clone()),
        (Program::TxEthernet, ethernet_ipv4(&downstream)),
    ];
    println!(
        "BPF_PROG_TEST_RUN, {CLIENTS} clients, {REPEAT} runs a round, median of {ROUNDS} rounds"
    );
    println!("{:<18} {:>12} {:>12} {:>8}", "PROGRAM", "BASELINE NS", "SAG NS", "RATIO");
    let mut worst: f64 = 0.0;
    for (program, frame) in &cases {
        let (mut base, mut full) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            base.push(baseline.test_run_repeated(*program, frame, REPEAT)?.1 as f64);
            full.push(dataplane.test_run_repeated(*program, frame, REPEAT)?.1 as f64);
        }
        let (base, full) = (median(&mut base), median(&mut full));
        let ratio = full / base;
        worst = worst.max(ratio);
        println!("{:<18} {base:>12.0} {full:>12.0} {ratio:>8.2}", program.name());
    }
    let counted = dataplane.client_counters(client)?;
    let runs = u64::from(REPEAT) * ROUNDS as u64;
    if counted.rx_packets != 4 * runs || counted.tx_packets != 2 * runs {
        bail!("the full path did not pass every run: {counted:?}");
    }
    Ok(worst)
}

/// Sends minimum-size UDP packets from the client namespace for [`FORWARD_TIME`] and returns
/// the rate at which the gateway forwarded them, in packets per second, read from the
/// gateway's outgoing interface.
fn forwarding_round(topology: &EthernetTopology, gateway_out: &str) -> Result<f64> {
    let socket = bind_udp(&topology.clients, SocketAddrV4::new(ethernet_client_address(0), 0))?;
    let destination = SocketAddrV4::new(LAN_SERVER, 9);
    let payload = [0u8; SMALL_PAYLOAD];
    let before = tx_packets(&topology.gateway, gateway_out)?;
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < FORWARD_TIME && sent < FORWARD_MAX_PACKETS {
        // A full transmit queue returns an error; the packet is simply not counted.
        if socket.send_to(&payload, destination).is_ok() {
            sent += 1;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(100));
    let forwarded = tx_packets(&topology.gateway, gateway_out)? - before;
    Ok(forwarded as f64 / seconds)
}

/// Returns the transmitted-packets counter of `interface` in `netns`.
fn tx_packets(netns: &Netns, interface: &str) -> Result<u64> {
    let path = format!("/sys/class/net/{interface}/statistics/tx_packets");
    let text = netns.exec(&["cat", &path])?;
    text.trim().parse().with_context(|| format!("unexpected {path}: {text:?}"))
}

/// Measures the forwarding rate without programs and with them, the rx program at each hook,
/// alternating round by round. Returns the lower of the two ratios.
fn forwarding() -> Result<f64> {
    let topology = EthernetTopology::new(false, 1)?;
    let gateway_out = topology.gateway_lan.clone();
    // No socket listens on the lan side: the datagrams end there, and only the gateway's
    // forwarding is measured.
    let mut dataplane = Dataplane::load(None)?;
    dataplane.set_instance(INSTANCE, &bench_instance()?)?;
    dataplane.bind_tunnel(topology.gateway_ifindex, INSTANCE)?;
    dataplane.add_client(ethernet_client_address(0), &full_path_settings())?;

    println!();
    println!(
        "forwarding of {}-byte IP packets from a client through the gateway's veth, {} s a \
         round, median of {ROUNDS} rounds",
        SMALL_PAYLOAD + 28,
        FORWARD_TIME.as_secs()
    );
    let hooks = [RxHook::Xdp, RxHook::TcIngress];
    let mut without = Vec::new();
    let mut with: Vec<Vec<f64>> = vec![Vec::new(); hooks.len()];
    for _ in 0..ROUNDS {
        without.push(forwarding_round(&topology, &gateway_out)?);
        for (hook, rates) in hooks.iter().zip(with.iter_mut()) {
            let link = &topology.gateway_link;
            topology.gateway.enter(|| dataplane.attach_with(link, Framing::Ethernet, *hook))??;
            rates.push(forwarding_round(&topology, &gateway_out)?);
            dataplane.detach(link)?;
        }
    }
    let without = median(&mut without);
    println!("{:<34} {:>12} {:>8}", "", "PACKETS/S", "RATIO");
    println!("{:<34} {without:>12.0} {:>8.3}", "without programs", 1.0);
    let mut worst = f64::MAX;
    for (hook, mut rates) in hooks.iter().zip(with) {
        let rate = median(&mut rates);
        let ratio = rate / without;
        worst = worst.min(ratio);
        println!("{:<34} {rate:>12.0} {ratio:>8.3}", format!("with programs, rx at {hook:?}"));
    }
    let counted = dataplane.client_counters(ethernet_client_address(0))?;
    if counted.rx_packets == 0 {
        bail!("the programs counted nothing while attached");
    }
    Ok(worst)
}
