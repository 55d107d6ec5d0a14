//! Kernel tests: the programs attached to a real TUN device in a gateway namespace, counting
//! real traffic to and from a company-network namespace. Needs root.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use sag_agent::{
    dataplane::{ClientSettings, Dataplane, InterfaceCounter, RxHook},
    testing::{
        frames::{icmp_echo, udp},
        topology::{
            bind_udp, client_address, ethernet_client_address, udp_echo, EthernetTopology,
            TunTopology, LAN_SERVER, TUNNEL_GATEWAY,
        },
    },
};
use sag_common::{
    counters::{ClientCounters, Direction, InterfaceKind, PacketCounter},
    packet::Framing,
};

const ECHO_PORT: u16 = 7777;
const WAIT: Duration = Duration::from_secs(5);
/// UDP payload sizes, from 1 byte to the largest that fits a 1,500-byte MTU.
const PAYLOADS: [usize; 8] = [1, 18, 64, 200, 512, 999, 1400, 1472];
/// ICMP echo payload sizes.
const PINGS: [usize; 3] = [0, 56, 1472];

/// Expected counters per client address, built up as traffic is sent.
#[derive(Default)]
struct Ledger(BTreeMap<Ipv4Addr, ClientCounters>);

impl Ledger {
    fn record(&mut self, client: Ipv4Addr, direction: Direction, ip_bytes: usize) {
        self.0.entry(client).or_default().record(direction, PacketCounter::one(ip_bytes as u64));
    }
}

fn load_attached(topology: &TunTopology, hook: RxHook) -> Dataplane {
    let mut dataplane = Dataplane::load(None).expect("programs must load (run as root)");
    topology
        .gateway
        .enter(|| dataplane.attach_with(topology.tun_name(), Framing::L3, hook))
        .unwrap()
        .unwrap();
    dataplane
}

/// Sends every client's UDP datagrams to the echo server and reads the echoes back from the
/// tunnel, recording both directions.
fn udp_round_trips(topology: &TunTopology, clients: &[Ipv4Addr], ledger: &mut Ledger) {
    let echo_socket = bind_udp(&topology.lan, SocketAddrV4::new(LAN_SERVER, ECHO_PORT)).unwrap();
    let total = clients.len() * PAYLOADS.len();
    let echo = udp_echo(echo_socket, total, WAIT);
    for (index, &client) in clients.iter().enumerate() {
        // Each client sends the sizes in its own order, from its own port.
        for turn in 0..PAYLOADS.len() {
            let payload = vec![index as u8; PAYLOADS[(turn + index) % PAYLOADS.len()]];
            let packet = udp((client, 40_000 + index as u16), (LAN_SERVER, ECHO_PORT), &payload);
            topology.tun.send(&packet).unwrap();
            ledger.record(client, Direction::Rx, packet.len());
            ledger.record(client, Direction::Tx, packet.len());
        }
    }
    assert_eq!(echo.join().unwrap(), total, "echo server answered");
    let echoes = topology.receive(total, WAIT).unwrap();
    assert_eq!(echoes.len(), total, "echoes read from the tunnel");
}

/// Pings the server from every client and reads the replies from the tunnel.
fn pings(topology: &TunTopology, clients: &[Ipv4Addr], ledger: &mut Ledger) {
    for (index, &client) in clients.iter().enumerate() {
        for (seq, &size) in PINGS.iter().enumerate() {
            let packet =
                icmp_echo(client, LAN_SERVER, 0x5a00 + index as u16, seq as u16, &vec![7; size]);
            topology.tun.send(&packet).unwrap();
            ledger.record(client, Direction::Rx, packet.len());
            // The reply has the request's size.
            ledger.record(client, Direction::Tx, packet.len());
        }
    }
    let replies = topology.receive(clients.len() * PINGS.len(), WAIT).unwrap();
    assert_eq!(replies.len(), clients.len() * PINGS.len(), "echo replies read from the tunnel");
    assert!(replies.iter().all(|reply| reply[20] == 0), "every reply is an ICMP echo reply");
}

fn interface_counter(
    counters: &[InterfaceCounter],
    ifindex: u32,
    direction: Direction,
    kind: InterfaceKind,
) -> PacketCounter {
    counters
        .iter()
        .find(|c| c.ifindex == ifindex && c.direction == direction && c.kind == kind)
        .map(|c| c.counter)
        .unwrap_or_default()
}

#[test]
fn tun_counts_three_clients_exactly_tc() {
    tun_counts_three_clients_exactly(RxHook::TcIngress);
}

#[test]
fn tun_counts_three_clients_exactly_xdp() {
    tun_counts_three_clients_exactly(RxHook::Xdp);
}

fn tun_counts_three_clients_exactly(hook: RxHook) {
    let topology = TunTopology::new().unwrap();
    let mut dataplane = load_attached(&topology, hook);
    let clients = [client_address(0), client_address(1), client_address(2)];
    for client in clients {
        dataplane.add_client(client, &ClientSettings::default()).unwrap();
    }
    let mut ledger = Ledger::default();

    udp_round_trips(&topology, &clients, &mut ledger);
    pings(&topology, &clients, &mut ledger);

    // From the gateway itself to the second client.
    let local = bind_udp(&topology.gateway, SocketAddrV4::new(TUNNEL_GATEWAY, 0)).unwrap();
    for payload in [1usize, 700, 1472] {
        local.send_to(&vec![1; payload], SocketAddrV4::new(clients[1], 9)).unwrap();
        ledger.record(clients[1], Direction::Tx, 28 + payload);
    }
    assert_eq!(topology.receive(3, WAIT).unwrap().len(), 3, "local datagrams read from the tunnel");

    // From the first client to the third, through the gateway.
    for payload in [5usize, 1200] {
        let packet = udp((clients[0], 5000), (clients[2], 5001), &vec![2; payload]);
        topology.tun.send(&packet).unwrap();
        ledger.record(clients[0], Direction::Rx, packet.len());
        ledger.record(clients[2], Direction::Tx, packet.len());
    }
    assert_eq!(topology.receive(2, WAIT).unwrap().len(), 2, "client-to-client datagrams read");

    let counted = dataplane.clients().unwrap();
    for client in clients {
        assert_eq!(counted[&client], ledger.0[&client], "counters of {client}");
    }
    assert_eq!(counted.len(), 3);
}

#[test]
fn tun_counts_unknown_and_ipv6_per_interface() {
    let topology = TunTopology::new().unwrap();
    let mut dataplane = load_attached(&topology, RxHook::TcIngress);
    let client = client_address(0);
    dataplane.add_client(client, &ClientSettings::default()).unwrap();

    // A source that is not a client: counted as unknown in both directions.
    let stranger = Ipv4Addr::new(10, 77, 0, 99);
    let echo_socket = bind_udp(&topology.lan, SocketAddrV4::new(LAN_SERVER, ECHO_PORT)).unwrap();
    let echo = udp_echo(echo_socket, 1, WAIT);
    let packet = udp((stranger, 1234), (LAN_SERVER, ECHO_PORT), &[0; 100]);
    topology.tun.send(&packet).unwrap();
    assert_eq!(echo.join().unwrap(), 1);
    assert_eq!(topology.receive(1, WAIT).unwrap().len(), 1);

    // IPv6 passes through XDP untouched; the namespace has IPv6 off, so the kernel drops it.
    let mut ipv6 = vec![0u8; 48];
    ipv6[0] = 0x60;
    ipv6[5] = 8; // payload length
    ipv6[6] = 59; // no next header
    ipv6[7] = 64;
    topology.tun.send(&ipv6).unwrap();
    std::thread::sleep(Duration::from_millis(100));

    let counters = dataplane.interface_counters().unwrap();
    let ifindex = topology.tun_ifindex;
    let unknown_rx =
        interface_counter(&counters, ifindex, Direction::Rx, InterfaceKind::UnknownIpv4);
    let unknown_tx =
        interface_counter(&counters, ifindex, Direction::Tx, InterfaceKind::UnknownIpv4);
    let ipv6_rx = interface_counter(&counters, ifindex, Direction::Rx, InterfaceKind::Ipv6);
    assert_eq!(unknown_rx, PacketCounter { packets: 1, bytes: 128 });
    assert_eq!(unknown_tx, PacketCounter { packets: 1, bytes: 128 });
    assert_eq!(ipv6_rx, PacketCounter { packets: 1, bytes: 48 });
    let total: u64 = counters.iter().map(|c| c.counter.packets).sum();
    assert_eq!(total, 3, "no other interface counter moved: {counters:?}");
    assert_eq!(dataplane.client_counters(client).unwrap(), ClientCounters::default());
}

#[test]
fn detach_stops_counting_tc() {
    detach_stops_counting(RxHook::TcIngress);
}

#[test]
fn detach_stops_counting_xdp() {
    detach_stops_counting(RxHook::Xdp);
}

fn detach_stops_counting(hook: RxHook) {
    let topology = TunTopology::new().unwrap();
    let mut dataplane = load_attached(&topology, hook);
    let client = client_address(0);
    dataplane.add_client(client, &ClientSettings::default()).unwrap();
    let packet = udp((client, 1), (LAN_SERVER, 9), &[0; 10]);
    topology.tun.send(&packet).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(dataplane.client_counters(client).unwrap().rx_packets, 1);

    dataplane.detach(topology.tun_name()).unwrap();
    let link = topology.gateway.ip(&["-d", "link", "show", topology.tun_name()]).unwrap();
    assert!(!link.contains("xdp"), "XDP still attached: {link}");
    // No pause: the links are off their hooks when detach returns.
    topology.tun.send(&packet).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(dataplane.client_counters(client).unwrap().rx_packets, 1);
    assert!(dataplane.attached().is_empty());
}

#[test]
fn attach_twice_is_rejected() {
    let topology = TunTopology::new().unwrap();
    let mut dataplane = load_attached(&topology, RxHook::TcIngress);
    let error = topology
        .gateway
        .enter(|| dataplane.attach(topology.tun_name(), Framing::L3))
        .unwrap()
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        format!("interface {:?} is already attached", topology.tun_name())
    );
}

#[test]
fn attach_to_missing_interface_fails() {
    let topology = TunTopology::new().unwrap();
    let mut dataplane = Dataplane::load(None).unwrap();
    let error = topology
        .gateway
        .enter(|| dataplane.attach("sag-no-such0", Framing::L3))
        .unwrap()
        .unwrap_err();
    assert!(error.to_string().starts_with("interface \"sag-no-such0\" not found"), "{error}");
    assert!(dataplane.attached().is_empty());
}

/// Clients behind an Ethernet link send UDP datagrams to the server from their own sockets; the
/// echoes come back to them. Every datagram crosses the gateway's client link once each way.
/// With the VLAN, XDP parses the tag in the frame. At TC egress the kernel still keeps the tag
/// outside the frame data, so the tx program parses an untagged frame there.
fn ethernet_counts_exactly(vlan: bool) {
    let topology = EthernetTopology::new(vlan, 3).unwrap();
    let mut dataplane = Dataplane::load(None).expect("programs must load (run as root)");
    topology
        .gateway
        .enter(|| dataplane.attach(&topology.gateway_link, Framing::Ethernet))
        .unwrap()
        .unwrap();
    let clients: Vec<Ipv4Addr> = (0..3).map(ethernet_client_address).collect();
    for &client in &clients {
        dataplane.add_client(client, &ClientSettings::default()).unwrap();
    }
    let echo_socket = bind_udp(&topology.lan, SocketAddrV4::new(LAN_SERVER, ECHO_PORT)).unwrap();
    let total = clients.len() * PAYLOADS.len();
    let echo = udp_echo(echo_socket, total, WAIT);
    let mut ledger = Ledger::default();
    for (index, &client) in clients.iter().enumerate() {
        let socket = bind_udp(&topology.clients, SocketAddrV4::new(client, 0)).unwrap();
        socket.set_read_timeout(Some(WAIT)).unwrap();
        let mut buffer = [0u8; 2048];
        for turn in 0..PAYLOADS.len() {
            let payload = vec![index as u8; PAYLOADS[(turn + index) % PAYLOADS.len()]];
            socket.send_to(&payload, SocketAddrV4::new(LAN_SERVER, ECHO_PORT)).unwrap();
            let (len, _) = socket.recv_from(&mut buffer).unwrap();
            assert_eq!(len, payload.len());
            ledger.record(client, Direction::Rx, 28 + payload.len());
            ledger.record(client, Direction::Tx, 28 + payload.len());
        }
    }
    assert_eq!(echo.join().unwrap(), total);

    let counted = dataplane.clients().unwrap();
    for client in &clients {
        assert_eq!(counted[client], ledger.0[client], "counters of {client}");
    }
    // The kernels resolve each other's addresses with ARP, which is counted per interface.
    let counters = dataplane.interface_counters().unwrap();
    let arp =
        interface_counter(&counters, topology.gateway_ifindex, Direction::Rx, InterfaceKind::Arp);
    assert!(arp.packets >= 1, "ARP from the clients counted: {counters:?}");
    let unknown = interface_counter(
        &counters,
        topology.gateway_ifindex,
        Direction::Rx,
        InterfaceKind::UnknownIpv4,
    );
    assert_eq!(unknown, PacketCounter::default());
}

#[test]
fn ethernet_untagged_counts_exactly() {
    ethernet_counts_exactly(false);
}

#[test]
fn ethernet_vlan_tagged_counts_exactly() {
    ethernet_counts_exactly(true);
}

#[test]
fn wrong_framing_is_rejected() {
    let topology = TunTopology::new().unwrap();
    let mut dataplane = Dataplane::load(None).unwrap();
    let error = topology
        .gateway
        .enter(|| dataplane.attach(topology.tun_name(), Framing::Ethernet))
        .unwrap()
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "interface {:?} carries L3 frames (link type 65534), not Ethernet: attach it with L3 \
             framing",
            topology.tun_name()
        )
    );
    let ethernet = EthernetTopology::new(false, 1).unwrap();
    let error = ethernet
        .gateway
        .enter(|| dataplane.attach(&ethernet.gateway_link, Framing::L3))
        .unwrap()
        .unwrap_err();
    assert!(error.to_string().contains("carries Ethernet frames (link type 1), not L3"), "{error}");
    assert!(dataplane.attached().is_empty());
}

#[test]
fn second_agent_cannot_attach() {
    let topology = TunTopology::new().unwrap();
    let _first = load_attached(&topology, RxHook::TcIngress);
    let mut second = Dataplane::load(None).unwrap();
    let error = topology
        .gateway
        .enter(|| second.attach(topology.tun_name(), Framing::L3))
        .unwrap()
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "interface {:?} already has sag's programs attached by another process; stop that \
             agent first",
            topology.tun_name()
        )
    );
}

#[test]
fn pin_dir_off_bpffs_is_rejected() {
    let dir = std::env::temp_dir().join(sag_agent::testing::netns::unique_name("sag-pin-"));
    let error = Dataplane::load(Some(&dir)).err().expect("a pin directory on tmpfs is refused");
    assert!(
        error
            .to_string()
            .starts_with(&format!("pin directory {} is not on a bpffs mount", dir.display())),
        "{error}"
    );
    assert!(!dir.exists(), "nothing was created");
}
