//! Benchmarks of the kernel programs and of the tunnel, each a ratio against a baseline measured
//! in the same run. Run through `cargo xtask bench dataplane` or `cargo xtask bench tunnel`, as
//! root.
//!
//! `dataplane`:
//! 1. Time per packet from BPF_PROG_TEST_RUN, with 1,000 clients loaded, for each program and
//!    for a baseline that only parses the frame and passes it. Target: at most 2x.
//! 2. Small-packet forwarding rate through a gateway namespace with the programs attached and
//!    without them. Target: at least 0.9x.
//!
//! `tunnel`: TCP throughput from a wireguard-go client through a gotatun gateway with the
//! programs attached and without them, and through a wireguard-go gateway.
//!
//! Traffic stays inside the namespaces this program creates. Each sending round stops after a
//! fixed time, and the forwarding rounds also after a packet count.

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

/// Log filter without RUST_LOG: warnings and errors, such as those of the gotatun device, but not
/// netlink-packet-route's warning about unknown kernel attributes, which recent kernels trigger.
const DEFAULT_LOG_FILTER: &str = "warn,netlink_packet_route=error";

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .init();
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
        Some("tunnel") => tunnel::run(),
        _ => bail!("usage: bench dataplane|tunnel"),
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

/// TCP throughput through a WireGuard gateway in network namespaces, with wireguard-go as the
/// client in every case:
///
/// ```text
/// client (203.0.113.2/30) ── veth ── (203.0.113.1/30) gateway (198.18.0.1/24) ── veth ── company
///   tunnel 10.77.0.2/32                 tunnel routes 10.77.0.0/24            iperf3 on 198.18.0.2
/// ```
///
/// Each measurement builds the namespaces afresh and deletes them afterwards, so that nothing
/// carries over from one gateway to the next.
mod tunnel {
    use std::{
        fs::{self, File},
        net::{IpAddr, Ipv4Addr},
        path::{Path, PathBuf},
        process::{Child, Command, Stdio},
        time::{Duration, Instant},
    };

    use anyhow::{anyhow, bail, Context as _, Result};
    use base64::{engine::general_purpose::STANDARD, Engine as _};
    use gotatun::{
        device::{DefaultDeviceTransports, Device, Peer},
        x25519::{PublicKey, StaticSecret},
    };
    use sag_agent::{
        dataplane::{Dataplane, InstanceSettings},
        netlink::Netlink,
        testing::{
            netns::{unique_name, veth_pair, Netns},
            traffic::Iperf3Server,
        },
        wgconfig::{KeyPair, TUNNEL_MTU},
    };
    use sag_common::{counters::DropCounters, packet::Framing};
    use serde_json::Value;
    use tracing::warn;

    use super::{full_path_settings, median, tx_packets, INSTANCE};

    /// Rounds per gateway, alternating between the gateways. The median counts.
    const ROUNDS: usize = 5;
    /// Length of one iperf3 test, in seconds.
    const TEST_TIME_S: u32 = 4;
    /// Seconds at the start of each test that iperf3 leaves out of its result, while TCP's
    /// window opens.
    const OMITTED_S: u32 = 1;
    /// Seconds after which `timeout` kills an iperf3 client that has not finished.
    const IPERF3_TIMEOUT_S: u32 = 30;
    const IPERF3_PORT: u16 = 5_201;
    /// UDP port of the gateway's WireGuard device.
    const LISTEN_PORT: u16 = 51_820;
    const GATEWAY_OUTSIDE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
    const CLIENT_OUTSIDE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
    /// Prefix length of the link between client and gateway.
    const OUTSIDE_PREFIX_LEN: u8 = 30;
    const GATEWAY_INSIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const COMPANY_SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    const COMPANY_NETWORK: &str = "198.18.0.0/24";
    /// The client's address in the tunnel, from [`CLIENT_POOL`].
    const CLIENT_TUNNEL: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
    const CLIENT_POOL: &str = "10.77.0.0/24";
    /// Time that wireguard-go has to create its UAPI socket, and iperf3 to listen.
    const START_TIMEOUT: Duration = Duration::from_secs(10);
    /// Time that wireguard-go has to exit after SIGTERM before it gets SIGKILL.
    const STOP_TIMEOUT: Duration = Duration::from_secs(2);
    /// Pings through the tunnel, one a second, after which the test fails if none got a reply.
    /// The first ping also starts the client's handshake.
    const PING_ATTEMPTS: u32 = 10;

    /// The WireGuard gateway between client and company network. The discriminants index
    /// [`Gateway::ALL`] and the results.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Gateway {
        /// A gotatun device built as the agent builds it, with no programs attached.
        Gotatun = 0,
        /// The same, with sag's programs on its TUN device and the client in the maps.
        GotatunWithPrograms = 1,
        /// wireguard-go, configured with `wg`.
        WireguardGo = 2,
    }

    impl Gateway {
        const ALL: [Self; 3] = [Self::Gotatun, Self::GotatunWithPrograms, Self::WireguardGo];

        fn label(self) -> &'static str {
            match self {
                Self::Gotatun => "gotatun, no programs",
                Self::GotatunWithPrograms => "gotatun with sag's programs",
                Self::WireguardGo => "wireguard-go",
            }
        }
    }

    /// The result of one iperf3 test.
    #[derive(Clone, Copy, Debug)]
    struct Measurement {
        /// Goodput the server received after the omitted start, in bit/s.
        bits_per_second: f64,
        /// Payload bytes the server received after the omitted start.
        received_bytes: u64,
        /// Packets the client sent to the gateway over its veth link: WireGuard datagrams, and
        /// a few ARP packets.
        client_sent_packets: u64,
        /// UDP datagrams that the client's namespace dropped because a socket's receive buffer
        /// was full (RcvbufErrors in /proc/net/snmp).
        client_udp_drops: u64,
        /// The same in the gateway's namespace.
        gateway_udp_drops: u64,
    }

    /// Measures each gateway in [`ROUNDS`] alternating rounds and prints the medians and the
    /// two ratios.
    pub fn run() -> Result<()> {
        let mut dataplane = Dataplane::load(None)?;
        dataplane.set_instance(
            INSTANCE,
            &InstanceSettings {
                blocked: false,
                client_to_client: false,
                pools: vec![CLIENT_POOL.parse()?],
                allowed: vec![COMPANY_NETWORK.parse()?],
            },
        )?;

        println!(
            "TCP from a wireguard-go client through the gateway to {COMPANY_SERVER}, \
             {TEST_TIME_S} s a round with the first {OMITTED_S} s omitted, median of {ROUNDS} \
             rounds"
        );
        let mut results: Vec<Vec<Measurement>> = vec![Vec::new(); Gateway::ALL.len()];
        for round in 0..ROUNDS {
            // Each round starts with the next gateway, so that none always runs first.
            for offset in 0..Gateway::ALL.len() {
                let index = (round + offset) % Gateway::ALL.len();
                let gateway = Gateway::ALL[index];
                let measurement = measure(gateway, &mut dataplane).with_context(|| {
                    format!("round {} through the {} gateway failed", round + 1, gateway.label())
                })?;
                println!(
                    "round {}: {:<28} {:>8.1} Mbit/s",
                    round + 1,
                    gateway.label(),
                    measurement.bits_per_second / 1e6
                );
                results[index].push(measurement);
            }
        }

        println!();
        println!(
            "{:<28} {:>8} {:>24} {:>17} {:>26}",
            "GATEWAY", "MBIT/S", "ROUNDS (MBIT/S)", "CLIENT UDP DROPS", "GATEWAY UDP DROPS (SHARE)"
        );
        let mut medians = Vec::new();
        for (gateway, measurements) in Gateway::ALL.iter().zip(&results) {
            let mut rates: Vec<f64> =
                measurements.iter().map(|m| m.bits_per_second / 1e6).collect();
            let rounds: Vec<String> = rates.iter().map(|rate| format!("{rate:.0}")).collect();
            let client_drops: u64 = measurements.iter().map(|m| m.client_udp_drops).sum();
            let gateway_drops: u64 = measurements.iter().map(|m| m.gateway_udp_drops).sum();
            let sent: u64 = measurements.iter().map(|m| m.client_sent_packets).sum();
            let share = gateway_drops as f64 / sent.max(1) as f64 * 100.0;
            let rate = median(&mut rates);
            medians.push(rate);
            println!(
                "{:<28} {rate:>8.1} {:>24} {client_drops:>17} {:>26}",
                gateway.label(),
                rounds.join(" "),
                format!("{gateway_drops} ({share:.1}%)"),
            );
        }
        println!(
            "UDP drops: datagrams dropped at a full socket receive buffer, over all rounds; the \
             share is of the packets the client sent"
        );
        let with_programs = medians[Gateway::GotatunWithPrograms as usize];
        let enforcement = with_programs / medians[Gateway::Gotatun as usize];
        let versus_wireguard_go = with_programs / medians[Gateway::WireguardGo as usize];
        println!();
        println!(
            "summary: enforcement on/off {enforcement:.3}, sag gateway (gotatun with programs) / \
             wireguard-go gateway {versus_wireguard_go:.3}"
        );
        Ok(())
    }

    /// Builds the namespaces with a wireguard-go client and `gateway`, and runs one iperf3 test
    /// through them.
    fn measure(gateway: Gateway, dataplane: &mut Dataplane) -> Result<Measurement> {
        let topology = Topology::new()?;
        let files =
            tempfile::tempdir().context("failed to create a directory for the keys and logs")?;
        let client_keys = KeyPair::generate();
        let gateway_keys = KeyPair::generate();
        let client = start_client(&topology, files.path(), &client_keys, &gateway_keys)?;
        let measurement = match gateway {
            Gateway::WireguardGo => {
                let device = start_wireguard_go_gateway(
                    &topology,
                    files.path(),
                    &gateway_keys,
                    &client_keys,
                )?;
                let measured = measure_traffic(&topology);
                device.warn_logged_errors("gateway");
                measured?
            }
            Gateway::Gotatun => {
                measure_through_gotatun(&topology, &gateway_keys, &client_keys, None)?
            }
            Gateway::GotatunWithPrograms => {
                measure_through_gotatun(&topology, &gateway_keys, &client_keys, Some(dataplane))?
            }
        };
        client.warn_logged_errors("client");
        Ok(measurement)
    }

    /// The client, gateway and company namespaces, linked and addressed. Dropping it deletes
    /// the namespaces and everything in them.
    struct Topology {
        client: Netns,
        gateway: Netns,
        company: Netns,
        /// The client's end of its link to the gateway.
        client_link: String,
    }

    impl Topology {
        fn new() -> Result<Self> {
            let client_end = unique_name("tbcv");
            let topology = Self {
                client: Netns::new("tbcl")?,
                gateway: Netns::new("tbgw")?,
                company: Netns::new("tbco")?,
                client_link: client_end.clone(),
            };
            let gateway_outside = unique_name("tbgo");
            veth_pair((&topology.client, &client_end), (&topology.gateway, &gateway_outside))?;
            let (gateway_inside, company_end) = (unique_name("tbgi"), unique_name("tbsv"));
            veth_pair((&topology.gateway, &gateway_inside), (&topology.company, &company_end))?;

            let client_address = format!("{CLIENT_OUTSIDE}/{OUTSIDE_PREFIX_LEN}");
            topology.client.ip(&["addr", "add", &client_address, "dev", &client_end])?;
            topology.client.ip(&["link", "set", &client_end, "up"])?;
            let gateway_address = format!("{GATEWAY_OUTSIDE}/{OUTSIDE_PREFIX_LEN}");
            topology.gateway.ip(&["addr", "add", &gateway_address, "dev", &gateway_outside])?;
            topology.gateway.ip(&["link", "set", &gateway_outside, "up"])?;
            let inside_address = format!("{GATEWAY_INSIDE}/24");
            topology.gateway.ip(&["addr", "add", &inside_address, "dev", &gateway_inside])?;
            topology.gateway.ip(&["link", "set", &gateway_inside, "up"])?;
            let server_address = format!("{COMPANY_SERVER}/24");
            topology.company.ip(&["addr", "add", &server_address, "dev", &company_end])?;
            topology.company.ip(&["link", "set", &company_end, "up"])?;
            let via = GATEWAY_INSIDE.to_string();
            topology.company.ip(&["route", "add", CLIENT_POOL, "via", &via])?;
            Ok(topology)
        }
    }

    /// A wireguard-go process, stopped by its PID when dropped.
    struct WireguardGo {
        child: Child,
        name: String,
        /// wireguard-go's standard error: a banner, then any errors it logs.
        log: PathBuf,
    }

    impl WireguardGo {
        /// Starts `wireguard-go -f NAME` in `netns` and waits for its UAPI socket.
        fn start(netns: &Netns, name: &str, log: PathBuf) -> Result<Self> {
            let log_file = File::create(&log)
                .with_context(|| format!("failed to create {}", log.display()))?;
            let child = Command::new("ip")
                .args(["netns", "exec", netns.name(), "wireguard-go", "-f", name])
                .stdout(Stdio::null())
                .stderr(log_file)
                .spawn()
                .context("failed to start wireguard-go")?;
            let mut device = Self { child, name: name.to_owned(), log };
            let socket = device.socket();
            let deadline = Instant::now() + START_TIMEOUT;
            while !socket.exists() {
                if let Some(status) = device.child.try_wait()? {
                    bail!(
                        "wireguard-go {name} exited with {status} before creating {}: {}",
                        socket.display(),
                        fs::read_to_string(&device.log).unwrap_or_default().trim()
                    );
                }
                if Instant::now() >= deadline {
                    bail!(
                        "wireguard-go {name} did not create {} within {} s",
                        socket.display(),
                        START_TIMEOUT.as_secs()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(device)
        }

        /// Returns the UAPI socket, whose path is host-wide rather than per namespace.
        fn socket(&self) -> PathBuf {
            PathBuf::from(format!("/var/run/wireguard/{}.sock", self.name))
        }

        /// Logs a warning for each error line in wireguard-go's log.
        fn warn_logged_errors(&self, role: &str) {
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            for line in log.lines().filter(|line| line.contains("ERROR")) {
                warn!(role, interface = self.name, "wireguard-go: {line}");
            }
        }
    }

    impl Drop for WireguardGo {
        fn drop(&mut self) {
            if !matches!(self.child.try_wait(), Ok(None)) {
                // It has exited and been reaped, so its PID may belong to another process now.
                let _ = fs::remove_file(self.socket());
                return;
            }
            // SIGTERM lets wireguard-go delete its interface and UAPI socket. `ip netns exec`
            // replaces itself with the program, so the child's PID is wireguard-go's.
            let pid = self.child.id() as libc::pid_t;
            // SAFETY: kill has no memory effects. The child is not reaped yet, so the PID is
            // still the one this process started, even if the child has just exited.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + STOP_TIMEOUT;
            while matches!(self.child.try_wait(), Ok(None)) {
                if Instant::now() >= deadline {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = fs::remove_file(self.socket());
        }
    }

    /// Writes a private key to a file in `directory` for `wg set`, and returns its path.
    fn write_private_key(directory: &Path, file: &str, keys: &KeyPair) -> Result<String> {
        let path = directory.join(file);
        fs::write(&path, keys.private_base64())
            .with_context(|| format!("failed to write {}", path.display()))?;
        path.into_os_string()
            .into_string()
            .map_err(|path| anyhow!("invalid key file path {path:?}: not UTF-8"))
    }

    /// Starts the wireguard-go client: a peer for the gateway at its outside address, and the
    /// company network routed through the tunnel.
    fn start_client(
        topology: &Topology,
        files: &Path,
        client: &KeyPair,
        gateway: &KeyPair,
    ) -> Result<WireguardGo> {
        let name = unique_name("tbcw");
        let device = WireguardGo::start(&topology.client, &name, files.join("client.log"))?;
        let key = write_private_key(files, "client.key", client)?;
        let endpoint = format!("{GATEWAY_OUTSIDE}:{LISTEN_PORT}");
        topology.client.exec(&[
            "wg",
            "set",
            &name,
            "private-key",
            &key,
            "peer",
            &gateway.public_base64(),
            "endpoint",
            &endpoint,
            "allowed-ips",
            COMPANY_NETWORK,
        ])?;
        let address = format!("{CLIENT_TUNNEL}/32");
        topology.client.ip(&["addr", "add", &address, "dev", &name])?;
        let mtu = TUNNEL_MTU.to_string();
        topology.client.ip(&["link", "set", &name, "mtu", &mtu, "up"])?;
        topology.client.ip(&["route", "add", COMPANY_NETWORK, "dev", &name])?;
        Ok(device)
    }

    /// Starts wireguard-go as the gateway, with the client as its only peer.
    fn start_wireguard_go_gateway(
        topology: &Topology,
        files: &Path,
        gateway: &KeyPair,
        client: &KeyPair,
    ) -> Result<WireguardGo> {
        let name = unique_name("tbgw");
        let device = WireguardGo::start(&topology.gateway, &name, files.join("gateway.log"))?;
        let key = write_private_key(files, "gateway.key", gateway)?;
        let allowed = format!("{CLIENT_TUNNEL}/32");
        topology.gateway.exec(&[
            "wg",
            "set",
            &name,
            "listen-port",
            &LISTEN_PORT.to_string(),
            "private-key",
            &key,
            "peer",
            &client.public_base64(),
            "allowed-ips",
            &allowed,
        ])?;
        let mtu = TUNNEL_MTU.to_string();
        topology.gateway.ip(&["link", "set", &name, "mtu", &mtu, "up"])?;
        topology.gateway.ip(&["route", "add", CLIENT_POOL, "dev", &name])?;
        Ok(device)
    }

    fn decode_key(base64: &str) -> Result<[u8; 32]> {
        STANDARD.decode(base64)?.try_into().map_err(|bytes: Vec<u8>| {
            anyhow!("invalid WireGuard key: {} bytes, not 32", bytes.len())
        })
    }

    /// Runs a gotatun gateway, with the programs attached when `dataplane` is given, for one
    /// iperf3 test. The device, its UDP socket and the netlink socket are created on a thread
    /// inside the gateway's namespace, which drives the device's tokio runtime until the test
    /// ends.
    fn measure_through_gotatun(
        topology: &Topology,
        gateway: &KeyPair,
        client: &KeyPair,
        dataplane: Option<&mut Dataplane>,
    ) -> Result<Measurement> {
        let name = unique_name("tbgw");
        let secret = StaticSecret::from(decode_key(&gateway.private_base64())?);
        let client = PublicKey::from(decode_key(&client.public_base64())?);
        topology.gateway.enter(|| {
            // As many worker threads as CPUs, as in the agent's daemon.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("failed to start a tokio runtime")?;
            let (device, ifindex) = runtime.block_on(start_gotatun(&name, secret, client))?;
            let measured = match dataplane {
                Some(dataplane) => measure_with_programs(topology, dataplane, &name, ifindex),
                None => measure_traffic(topology),
            };
            // Inside the runtime, so that the device's drop finds it. NOTE: in about a third of
            // the stops gotatun 0.10.2 logs "Unexpected error on tun interface ... channel
            // closed" and "task handle_outgoing errored" here, because stopping cancels its TUN
            // reader task before handle_outgoing, which reads from it. Both come after the test.
            runtime.block_on(device.stop());
            measured
        })?
    }

    /// Builds the gotatun device as the agent does, with the client as its only peer, brings
    /// its link up and routes the client pool through it. Returns the device and its ifindex.
    async fn start_gotatun(
        name: &str,
        secret: StaticSecret,
        client: PublicKey,
    ) -> Result<(Device<DefaultDeviceTransports>, u32)> {
        let device = gotatun::device::build()
            .with_default_udp()
            .create_tun(name)
            .with_context(|| format!("failed to create the TUN device {name}"))?
            .with_private_key(secret)
            .build()
            .await
            .with_context(|| format!("failed to start the gotatun device {name}"))?;
        device
            .set_listen_port(LISTEN_PORT)
            .await
            .with_context(|| format!("failed to bind UDP port {LISTEN_PORT} for {name}"))?;
        let peer = Peer::new(client).with_allowed_ip(IpAddr::V4(CLIENT_TUNNEL).into());
        device.add_peer(peer).await.with_context(|| format!("failed to add the peer to {name}"))?;
        let netlink = Netlink::connect()?;
        let ifindex = netlink.ifindex(name).await?;
        netlink.set_up(ifindex, u32::from(TUNNEL_MTU)).await?;
        netlink.replace_route(CLIENT_POOL.parse()?, ifindex).await?;
        Ok((device, ifindex))
    }

    /// Attaches the programs to the gotatun device `name` and adds the client with every check
    /// on, runs one iperf3 test, then removes both and checks from the client's counters that
    /// the programs passed the whole test. Runs in the gateway's namespace, where `attach`
    /// looks the device up.
    fn measure_with_programs(
        topology: &Topology,
        dataplane: &mut Dataplane,
        name: &str,
        ifindex: u32,
    ) -> Result<Measurement> {
        dataplane.attach(name, Framing::L3)?;
        dataplane.bind_tunnel(ifindex, INSTANCE)?;
        dataplane.add_client(CLIENT_TUNNEL, &full_path_settings())?;
        let measured = measure_traffic(topology);
        let counters = dataplane.remove_client(CLIENT_TUNNEL)?;
        dataplane.unbind_tunnel(ifindex)?;
        dataplane.detach(name)?;
        let measurement = measured?;
        if counters.rx_packets == 0 || counters.tx_packets == 0 {
            bail!("the programs counted no packets of {CLIENT_TUNNEL}: {counters:?}");
        }
        // The programs count IP bytes, iperf3 the TCP payload after the omitted start, so the
        // programs' count is the larger unless they missed packets.
        if counters.rx_bytes < measurement.received_bytes {
            bail!(
                "the programs counted {} bytes from {CLIENT_TUNNEL}, fewer than the {} that \
                 iperf3 received",
                counters.rx_bytes,
                measurement.received_bytes
            );
        }
        if counters.rx_dropped != DropCounters::default()
            || counters.tx_dropped != DropCounters::default()
        {
            bail!("the programs dropped packets of {CLIENT_TUNNEL}: {counters:?}");
        }
        Ok(measurement)
    }

    /// Waits until a ping through the tunnel to the company server gets a reply.
    fn wait_for_tunnel(client: &Netns) -> Result<()> {
        let (source, destination) = (CLIENT_TUNNEL.to_string(), COMPANY_SERVER.to_string());
        for _ in 0..PING_ATTEMPTS {
            let ping = ["ping", "-c", "1", "-W", "1", "-I", &source, &destination];
            if client.exec(&ping).is_ok() {
                return Ok(());
            }
        }
        bail!(
            "no reply from {COMPANY_SERVER} to {PING_ATTEMPTS} pings from {CLIENT_TUNNEL} through \
             the tunnel, so the WireGuard handshake or a route failed"
        )
    }

    /// Runs one iperf3 TCP test from the client to the company server through the tunnel,
    /// and reads the UDP receive-buffer drops of the client and gateway namespaces after it.
    fn measure_traffic(topology: &Topology) -> Result<Measurement> {
        wait_for_tunnel(&topology.client)?;
        let server = Iperf3Server::start(&topology.company, IPERF3_PORT, COMPANY_SERVER)?;
        let output = Command::new("ip")
            .args(["netns", "exec", topology.client.name()])
            .args(["timeout", &IPERF3_TIMEOUT_S.to_string(), "iperf3", "--client"])
            .args([&COMPANY_SERVER.to_string(), "--port", &IPERF3_PORT.to_string()])
            .args(["--bind", &CLIENT_TUNNEL.to_string(), "--time", &TEST_TIME_S.to_string()])
            .args(["--omit", &OMITTED_S.to_string(), "--json"])
            .output()
            .context("failed to start the iperf3 client")?;
        drop(server);
        let report: Value = serde_json::from_slice(&output.stdout).with_context(|| {
            format!(
                "the iperf3 client exited with {} and printed no JSON report: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )
        })?;
        if let Some(error) = report["error"].as_str() {
            bail!("the iperf3 client failed: {error}");
        }
        if !output.status.success() {
            bail!("the iperf3 client exited with {}", output.status);
        }
        let received = &report["end"]["sum_received"];
        Ok(Measurement {
            bits_per_second: received["bits_per_second"]
                .as_f64()
                .context("iperf3's report has no end.sum_received.bits_per_second")?,
            received_bytes: received["bytes"]
                .as_u64()
                .context("iperf3's report has no end.sum_received.bytes")?,
            client_sent_packets: tx_packets(&topology.client, &topology.client_link)?,
            client_udp_drops: udp_receive_buffer_errors(&topology.client)?,
            gateway_udp_drops: udp_receive_buffer_errors(&topology.gateway)?,
        })
    }

    /// Returns the RcvbufErrors counter of `netns` from /proc/net/snmp: UDP datagrams dropped
    /// because a socket's receive buffer was full.
    fn udp_receive_buffer_errors(netns: &Netns) -> Result<u64> {
        let snmp = netns.exec(&["cat", "/proc/net/snmp"])?;
        // Two lines start with "Udp:": the field names, then the values.
        let mut udp = snmp.lines().filter(|line| line.starts_with("Udp:"));
        let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
            bail!("/proc/net/snmp has no Udp lines: {snmp}");
        };
        let index = names
            .split_whitespace()
            .position(|name| name == "RcvbufErrors")
            .context("/proc/net/snmp has no Udp RcvbufErrors field")?;
        let value = values
            .split_whitespace()
            .nth(index)
            .context("the Udp values line of /proc/net/snmp has no RcvbufErrors value")?;
        value.parse().with_context(|| format!("invalid Udp RcvbufErrors value {value:?}"))
    }
}
