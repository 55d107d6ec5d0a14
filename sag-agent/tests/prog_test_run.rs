//! Runs each kernel program on crafted frames through BPF_PROG_TEST_RUN and checks its
//! verdict and the exact counter it changed. Needs root.

use std::net::Ipv4Addr;

use sag_agent::{
    dataplane::{ClientSettings, Dataplane, InterfaceCounter, Program},
    testing::frames::{ethernet, ethernet_ipv4, ipv4, udp, PROTOCOL_UDP},
};
use sag_common::{
    counters::{ClientCounters, Direction, InterfaceKind, PacketCounter},
    packet::{ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_VLAN},
};

const XDP_PASS: u32 = 2;
/// TC_ACT_UNSPEC (-1) as the kernel returns it: no verdict, the packet goes on.
const TC_NEXT: u32 = u32::MAX;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const STRANGER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 99);
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

/// The counter a case expects to change by exactly one packet.
#[derive(Debug, Clone, Copy)]
enum Expect {
    Client { direction: Direction, bytes: u64 },
    Interface { direction: Direction, kind: InterfaceKind, bytes: u64 },
}

struct Case {
    name: &'static str,
    program: Program,
    frame: Vec<u8>,
    expect: Expect,
}

fn client_to_server(payload: usize) -> Vec<u8> {
    udp((CLIENT, 4000), (SERVER, 7), &vec![0xab; payload])
}

fn server_to_client(payload: usize) -> Vec<u8> {
    udp((SERVER, 7), (CLIENT, 4000), &vec![0xcd; payload])
}

fn cases() -> Vec<Case> {
    use Direction::{Rx, Tx};
    use InterfaceKind::*;

    let with_options = ipv4(CLIENT, SERVER, PROTOCOL_UDP, &[1, 1, 1, 0, 1, 1, 1, 0], &[0; 12]);
    let mut ihl_four = client_to_server(20);
    ihl_four[0] = 0x44;
    let mut first_fragment = client_to_server(64);
    first_fragment[6] = 0x20; // more fragments, offset 0
    let mut later_fragment = client_to_server(64);
    later_fragment[6] = 0x00;
    later_fragment[7] = 0x09; // offset 72 bytes, last fragment
    let mut ipv6 = vec![0u8; 60];
    ipv6[0] = 0x60;
    let truncated_vlan = {
        let mut frame = ethernet(ETHERTYPE_VLAN, None, &[0x00, 0x64]);
        frame.truncate(16);
        frame
    };

    vec![
        Case {
            name: "rx_l3_udp_from_client",
            program: Program::RxL3,
            frame: client_to_server(100),
            expect: Expect::Client { direction: Rx, bytes: 128 },
        },
        Case {
            name: "rx_l3_from_unknown_address",
            program: Program::RxL3,
            frame: udp((STRANGER, 4000), (SERVER, 7), &[0; 10]),
            expect: Expect::Interface { direction: Rx, kind: UnknownIpv4, bytes: 38 },
        },
        Case {
            name: "rx_l3_ip_options",
            program: Program::RxL3,
            frame: with_options,
            expect: Expect::Client { direction: Rx, bytes: 40 },
        },
        Case {
            name: "rx_l3_first_fragment",
            program: Program::RxL3,
            frame: first_fragment,
            expect: Expect::Client { direction: Rx, bytes: 92 },
        },
        Case {
            name: "rx_l3_later_fragment",
            program: Program::RxL3,
            frame: later_fragment,
            expect: Expect::Client { direction: Rx, bytes: 92 },
        },
        Case {
            name: "rx_l3_ihl_below_five",
            program: Program::RxL3,
            frame: ihl_four,
            expect: Expect::Interface { direction: Rx, kind: Malformed, bytes: 48 },
        },
        Case {
            // The kernel's test run needs at least 14 bytes, so the header is cut at 16.
            name: "rx_l3_truncated_ipv4",
            program: Program::RxL3,
            frame: client_to_server(0)[..16].to_vec(),
            expect: Expect::Interface { direction: Rx, kind: Malformed, bytes: 16 },
        },
        Case {
            name: "rx_l3_total_length_beyond_frame",
            program: Program::RxL3,
            frame: client_to_server(100)[..100].to_vec(),
            expect: Expect::Interface { direction: Rx, kind: Malformed, bytes: 100 },
        },
        Case {
            name: "rx_l3_ipv6",
            program: Program::RxL3,
            frame: ipv6.clone(),
            expect: Expect::Interface { direction: Rx, kind: Ipv6, bytes: 60 },
        },
        Case {
            name: "rx_ethernet_untagged",
            program: Program::RxEthernet,
            frame: ethernet_ipv4(&client_to_server(1)),
            expect: Expect::Client { direction: Rx, bytes: 29 },
        },
        Case {
            name: "rx_ethernet_padded_frame",
            program: Program::RxEthernet,
            frame: {
                let mut frame = ethernet_ipv4(&client_to_server(1));
                frame.resize(60, 0);
                frame
            },
            expect: Expect::Client { direction: Rx, bytes: 29 },
        },
        Case {
            name: "rx_ethernet_one_vlan_tag",
            program: Program::RxEthernet,
            frame: ethernet(ETHERTYPE_IPV4, Some(100), &client_to_server(1472)),
            expect: Expect::Client { direction: Rx, bytes: 1500 },
        },
        Case {
            name: "rx_ethernet_truncated_vlan_tag",
            program: Program::RxEthernet,
            frame: truncated_vlan,
            expect: Expect::Interface { direction: Rx, kind: Malformed, bytes: 16 },
        },
        Case {
            name: "rx_ethernet_truncated_ipv4",
            program: Program::RxEthernet,
            frame: ethernet_ipv4(&client_to_server(0)[..19]),
            expect: Expect::Interface { direction: Rx, kind: Malformed, bytes: 33 },
        },
        Case {
            name: "rx_ethernet_ihl_below_five",
            program: Program::RxEthernet,
            frame: ethernet(ETHERTYPE_IPV4, Some(7), &{
                let mut packet = client_to_server(20);
                packet[0] = 0x43;
                packet
            }),
            expect: Expect::Interface { direction: Rx, kind: Malformed, bytes: 66 },
        },
        Case {
            name: "rx_ethernet_ipv6",
            program: Program::RxEthernet,
            frame: ethernet(ETHERTYPE_IPV6, None, &ipv6),
            expect: Expect::Interface { direction: Rx, kind: Ipv6, bytes: 60 },
        },
        Case {
            name: "rx_ethernet_arp",
            program: Program::RxEthernet,
            frame: ethernet(ETHERTYPE_ARP, None, &[0; 28]),
            expect: Expect::Interface { direction: Rx, kind: Arp, bytes: 28 },
        },
        Case {
            name: "rx_ethernet_arp_in_vlan",
            program: Program::RxEthernet,
            frame: ethernet(ETHERTYPE_ARP, Some(100), &[0; 28]),
            expect: Expect::Interface { direction: Rx, kind: Arp, bytes: 28 },
        },
        Case {
            name: "tx_l3_udp_to_client",
            program: Program::TxL3,
            frame: server_to_client(1472),
            expect: Expect::Client { direction: Tx, bytes: 1500 },
        },
        Case {
            name: "tx_l3_to_unknown_address",
            program: Program::TxL3,
            frame: udp((SERVER, 7), (STRANGER, 4000), &[0; 3]),
            expect: Expect::Interface { direction: Tx, kind: UnknownIpv4, bytes: 31 },
        },
        Case {
            name: "tx_l3_ihl_below_five",
            program: Program::TxL3,
            frame: {
                let mut packet = server_to_client(8);
                packet[0] = 0x40;
                packet
            },
            expect: Expect::Interface { direction: Tx, kind: Malformed, bytes: 36 },
        },
        Case {
            name: "tx_ethernet_untagged",
            program: Program::TxEthernet,
            frame: ethernet_ipv4(&server_to_client(64)),
            expect: Expect::Client { direction: Tx, bytes: 92 },
        },
        Case {
            name: "tx_ethernet_one_vlan_tag",
            program: Program::TxEthernet,
            frame: ethernet(ETHERTYPE_IPV4, Some(4094), &server_to_client(500)),
            expect: Expect::Client { direction: Tx, bytes: 528 },
        },
        Case {
            name: "tx_ethernet_ipv6",
            program: Program::TxEthernet,
            frame: ethernet(ETHERTYPE_IPV6, None, &ipv6),
            expect: Expect::Interface { direction: Tx, kind: Ipv6, bytes: 60 },
        },
        Case {
            name: "tx_ethernet_arp",
            program: Program::TxEthernet,
            frame: ethernet(ETHERTYPE_ARP, None, &[0; 28]),
            expect: Expect::Interface { direction: Tx, kind: Arp, bytes: 28 },
        },
    ]
}

fn expected_verdict(program: Program) -> u32 {
    if program.is_xdp() {
        XDP_PASS
    } else {
        TC_NEXT
    }
}

/// Returns the cases, and each rx case again for the TC ingress twin of its XDP program.
fn cases_on_every_hook() -> Vec<Case> {
    let mut all = Vec::new();
    for case in cases() {
        // The kernel's socket-buffer test run rejects (EINVAL) an Ethernet frame whose IPv4
        // header is cut short, so that case runs on XDP only.
        if case.name == "rx_ethernet_truncated_ipv4" {
            all.push(case);
            continue;
        }
        let twin = match case.program {
            Program::RxL3 => Some(Program::RxL3Tc),
            Program::RxEthernet => Some(Program::RxEthernetTc),
            _ => None,
        };
        if let Some(program) = twin {
            all.push(Case { program, frame: case.frame.clone(), ..case });
        }
        all.push(case);
    }
    all
}

/// Sums the interface counters of one direction and kind over all interfaces.
fn interface_total(
    counters: &[InterfaceCounter],
    direction: Direction,
    kind: InterfaceKind,
) -> PacketCounter {
    let mut total = PacketCounter::default();
    counters
        .iter()
        .filter(|c| c.direction == direction && c.kind == kind)
        .for_each(|c| total.merge(&c.counter));
    total
}

#[test]
fn verifier_accepts_every_program() {
    // Dataplane::load loads every program into the kernel, which runs the verifier on each.
    let dataplane = Dataplane::load(None).expect("programs must load (run as root)");
    assert!(dataplane.attached().is_empty());
}

#[test]
fn crafted_frames_verdicts_and_counters() {
    let mut dataplane = Dataplane::load(None).expect("programs must load (run as root)");
    dataplane.add_client(CLIENT, &ClientSettings::default()).unwrap();
    let mut failures = Vec::new();
    for case in cases_on_every_hook() {
        let clients_before = dataplane.client_counters(CLIENT).unwrap();
        let interfaces_before = dataplane.interface_counters().unwrap();
        let (verdict, _) = dataplane
            .test_run(case.program, &case.frame)
            .unwrap_or_else(|error| panic!("{} on {}: {error:?}", case.name, case.program.name()));
        let clients_after = dataplane.client_counters(CLIENT).unwrap();
        let interfaces_after = dataplane.interface_counters().unwrap();

        if verdict != expected_verdict(case.program) {
            failures.push(format!("{} on {}: verdict {verdict}", case.name, case.program.name()));
        }
        let mut expected_client = clients_before;
        match case.expect {
            Expect::Client { direction, bytes } => {
                expected_client.record(direction, PacketCounter::one(bytes))
            }
            Expect::Interface { direction, kind, bytes } => {
                let before = interface_total(&interfaces_before, direction, kind);
                let after = interface_total(&interfaces_after, direction, kind);
                let expected =
                    PacketCounter { packets: before.packets + 1, bytes: before.bytes + bytes };
                if after != expected {
                    failures.push(format!(
                        "{}: interface {kind:?} {after:?}, expected {expected:?}",
                        case.name
                    ));
                }
            }
        }
        if clients_after != expected_client {
            failures.push(format!(
                "{}: client {clients_after:?}, expected {expected_client:?}",
                case.name
            ));
        }
        // Only the expected counter moves: the total over all interface counters changes by the
        // one packet of an interface case, and by nothing for a client case.
        let packets =
            |counters: &[InterfaceCounter]| counters.iter().map(|c| c.counter.packets).sum::<u64>();
        let moved = packets(&interfaces_after) - packets(&interfaces_before);
        let expected_moved = u64::from(matches!(case.expect, Expect::Interface { .. }));
        if moved != expected_moved {
            failures.push(format!("{}: {moved} interface packets counted", case.name));
        }
    }
    assert!(failures.is_empty(), "failed cases:\n{}", failures.join("\n"));
}

#[test]
fn unknown_client_is_not_created() {
    let dataplane = Dataplane::load(None).expect("programs must load (run as root)");
    dataplane.test_run(Program::RxL3, &client_to_server(10)).unwrap();
    assert!(dataplane.clients().unwrap().is_empty());
}

#[test]
fn removed_client_returns_final_counters() {
    let mut dataplane = Dataplane::load(None).expect("programs must load (run as root)");
    dataplane.add_client(CLIENT, &ClientSettings::default()).unwrap();
    dataplane.test_run(Program::RxL3, &client_to_server(72)).unwrap();
    dataplane.test_run(Program::TxL3, &server_to_client(2)).unwrap();
    let last = dataplane.remove_client(CLIENT).unwrap();
    assert_eq!(
        last,
        ClientCounters {
            rx_packets: 1,
            rx_bytes: 100,
            tx_packets: 1,
            tx_bytes: 30,
            ..ClientCounters::default()
        }
    );
    assert!(dataplane.clients().unwrap().is_empty());
    // Traffic after removal goes to the unknown counter.
    dataplane.test_run(Program::RxL3, &client_to_server(72)).unwrap();
    assert!(dataplane.clients().unwrap().is_empty());
}

#[test]
fn add_client_keeps_existing_counters() {
    let mut dataplane = Dataplane::load(None).expect("programs must load (run as root)");
    dataplane.add_client(CLIENT, &ClientSettings::default()).unwrap();
    dataplane.test_run(Program::RxL3, &client_to_server(72)).unwrap();
    dataplane.add_client(CLIENT, &ClientSettings::default()).unwrap();
    assert_eq!(dataplane.client_counters(CLIENT).unwrap().rx_bytes, 100);
}

#[test]
fn repeated_runs_count_every_packet() {
    let mut dataplane = Dataplane::load(None).expect("programs must load (run as root)");
    dataplane.add_client(CLIENT, &ClientSettings::default()).unwrap();
    let (verdict, _) =
        dataplane.test_run_repeated(Program::RxL3, &client_to_server(100), 1_000).unwrap();
    assert_eq!(verdict, XDP_PASS);
    let counters = dataplane.client_counters(CLIENT).unwrap();
    assert_eq!(counters.rx_packets, 1_000);
    assert_eq!(counters.rx_bytes, 128_000);
}
