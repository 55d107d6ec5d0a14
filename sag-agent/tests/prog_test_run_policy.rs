//! Runs the programs on crafted packets through BPF_PROG_TEST_RUN to check each enforcement
//! rule: its verdict, the drop counter under its reason, and live updates. Needs root.
//!
//! A test run of an XDP program receives on the loopback device's queue, so its ingress
//! ifindex is 1, and the tunnel binding for these tests is made on ifindex 1.

use std::net::Ipv4Addr;

use sag_agent::{
    dataplane::{ClientSettings, Dataplane, InstanceSettings, Program},
    testing::frames::udp,
};
use sag_common::{
    counters::{ClientCounters, Direction, InterfaceKind, PacketCounter},
    policy::RateLimit,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_SHOT: u32 = 2;
/// TC_ACT_UNSPEC (-1) as the kernel returns it.
const TC_NEXT: u32 = u32::MAX;

const INSTANCE: u32 = 5;
const OTHER_INSTANCE: u32 = 6;
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const PEER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
/// The ingress ifindex of XDP test runs: loopback's.
const TEST_RUN_IFINDEX: u32 = 1;

fn packet(source: Ipv4Addr, destination: Ipv4Addr, payload: usize) -> Vec<u8> {
    udp((source, 4000), (destination, 7), &vec![0x5a; payload])
}

/// Settings of `INSTANCE`: clients in 10.77.0.0/24, allowed to reach `allowed`.
fn instance(allowed: &str, client_to_client: bool) -> InstanceSettings {
    InstanceSettings {
        client_to_client,
        pools: vec!["10.77.0.0/24".parse().unwrap()],
        allowed: vec![allowed.parse().unwrap()],
        ..InstanceSettings::default()
    }
}

/// Loads a dataplane with `CLIENT` and `PEER` in `INSTANCE`, which allows 198.18.0.0/16, and the
/// test tunnel bound to it.
fn enforcing_dataplane() -> Dataplane {
    let mut dataplane = Dataplane::load(None).expect("programs must load (run as root)");
    dataplane.set_instance(INSTANCE, &instance("198.18.0.0/16", false)).unwrap();
    let other = InstanceSettings {
        pools: vec!["10.88.0.0/24".parse().unwrap()],
        allowed: vec!["203.0.113.0/24".parse().unwrap()],
        ..InstanceSettings::default()
    };
    dataplane.set_instance(OTHER_INSTANCE, &other).unwrap();
    dataplane.bind_tunnel(TEST_RUN_IFINDEX, INSTANCE).unwrap();
    let settings = ClientSettings { instance: INSTANCE, ..ClientSettings::default() };
    dataplane.add_client(CLIENT, &settings).unwrap();
    dataplane.add_client(PEER, &settings).unwrap();
    dataplane
}

fn run(dataplane: &Dataplane, program: Program, frame: &[u8]) -> u32 {
    dataplane.test_run(program, frame).unwrap().0
}

fn counters(dataplane: &Dataplane, address: Ipv4Addr) -> ClientCounters {
    dataplane.client_counters(address).unwrap()
}

#[test]
fn allowed_destination_passes() {
    let dataplane = enforcing_dataplane();
    assert_eq!(run(&dataplane, Program::RxL3, &packet(CLIENT, SERVER, 72)), XDP_PASS);
    let counted = counters(&dataplane, CLIENT);
    assert_eq!(counted.rx_packets, 1);
    assert_eq!(counted.rx_bytes, 100);
    assert_eq!(counted.rx_dropped, Default::default());
}

#[test]
fn not_allowed_destination_dropped() {
    let dataplane = enforcing_dataplane();
    // 203.0.113.0/24 is allowed for the other instance only.
    assert_eq!(run(&dataplane, Program::RxL3, &packet(CLIENT, OUTSIDE, 72)), XDP_DROP);
    let counted = counters(&dataplane, CLIENT);
    assert_eq!(counted.rx_dropped.not_allowed, PacketCounter { packets: 1, bytes: 100 });
    assert_eq!(counted.rx_packets, 0);
}

#[test]
fn allowed_block_change_applies_live() {
    let mut dataplane = enforcing_dataplane();
    let inside = Ipv4Addr::new(198, 18, 200, 1);
    assert_eq!(run(&dataplane, Program::RxL3, &packet(CLIENT, inside, 1)), XDP_PASS);
    dataplane.set_instance(INSTANCE, &instance("198.18.0.0/24", false)).unwrap();
    assert_eq!(run(&dataplane, Program::RxL3, &packet(CLIENT, inside, 1)), XDP_DROP);
    assert_eq!(run(&dataplane, Program::RxL3, &packet(CLIENT, SERVER, 1)), XDP_PASS);
    // Counters survive the rewrite of the client's record.
    assert_eq!(counters(&dataplane, CLIENT).rx_packets, 2);
}

#[test]
fn too_many_blocks_rejected() {
    let mut dataplane = enforcing_dataplane();
    let pools = (0..6).map(|n| format!("10.{n}.0.0/16").parse().unwrap()).collect();
    let error = dataplane
        .set_instance(INSTANCE, &InstanceSettings { pools, ..InstanceSettings::default() })
        .unwrap_err();
    assert_eq!(error.to_string(), "invalid pools: 6 blocks given, at most 5 allowed");
    // The instance keeps its settings.
    assert_eq!(run(&dataplane, Program::RxL3, &packet(CLIENT, SERVER, 1)), XDP_PASS);
    assert_eq!(run(&dataplane, Program::RxL3, &packet(CLIENT, OUTSIDE, 1)), XDP_DROP);
}

#[test]
fn client_of_unknown_instance_rejected() {
    let mut dataplane = enforcing_dataplane();
    let settings = ClientSettings { instance: 9, ..ClientSettings::default() };
    let error = dataplane.add_client(Ipv4Addr::new(10, 77, 0, 9), &settings).unwrap_err();
    assert!(error.to_string().starts_with("instance 9 not found"), "{error}");
}

#[test]
fn client_to_client_follows_instance_setting() {
    let mut dataplane = enforcing_dataplane();
    let to_peer = packet(CLIENT, PEER, 10);
    assert_eq!(run(&dataplane, Program::RxL3, &to_peer), XDP_DROP);
    dataplane.set_instance(INSTANCE, &instance("198.18.0.0/16", true)).unwrap();
    assert_eq!(run(&dataplane, Program::RxL3, &to_peer), XDP_PASS);
    let counted = counters(&dataplane, CLIENT);
    assert_eq!(counted.rx_dropped.not_allowed.packets, 1);
    assert_eq!(counted.rx_packets, 1);
}

#[test]
fn spoofed_source_dropped() {
    let dataplane = enforcing_dataplane();
    let stranger = Ipv4Addr::new(10, 77, 0, 99);
    assert_eq!(run(&dataplane, Program::RxL3, &packet(stranger, SERVER, 72)), XDP_DROP);
    let spoofed = dataplane
        .interface_counters()
        .unwrap()
        .into_iter()
        .find(|c| c.kind == InterfaceKind::Spoofed)
        .expect("spoofed counter");
    assert_eq!(spoofed.counter, PacketCounter { packets: 1, bytes: 100 });
    assert_eq!(spoofed.direction, Direction::Rx);
}

#[test]
fn client_of_other_instance_is_spoofed() {
    let mut dataplane = enforcing_dataplane();
    let foreign = Ipv4Addr::new(10, 88, 0, 2);
    let settings = ClientSettings { instance: OTHER_INSTANCE, ..ClientSettings::default() };
    dataplane.add_client(foreign, &settings).unwrap();
    // The other instance's tunnel is elsewhere; its client has no business on this one.
    dataplane.bind_tunnel(TEST_RUN_IFINDEX + 1_000, OTHER_INSTANCE).unwrap();
    assert_eq!(run(&dataplane, Program::RxL3, &packet(foreign, OUTSIDE, 1)), XDP_DROP);
    assert_eq!(counters(&dataplane, foreign), ClientCounters::default());
}

#[test]
fn unbound_tunnel_passes_unknown() {
    let mut dataplane = enforcing_dataplane();
    dataplane.unbind_tunnel(TEST_RUN_IFINDEX).unwrap();
    let stranger = Ipv4Addr::new(10, 77, 0, 99);
    assert_eq!(run(&dataplane, Program::RxL3, &packet(stranger, SERVER, 72)), XDP_PASS);
    let counters = dataplane.interface_counters().unwrap();
    assert_eq!(counters.len(), 1);
    assert_eq!(counters[0].kind, InterfaceKind::UnknownIpv4);
}

#[test]
fn blocked_client_dropped_both_ways() {
    let mut dataplane = enforcing_dataplane();
    let blocked = ClientSettings { instance: INSTANCE, blocked: true, ..ClientSettings::default() };
    dataplane.update_client(CLIENT, &blocked).unwrap();
    assert_eq!(run(&dataplane, Program::RxL3, &packet(CLIENT, SERVER, 72)), XDP_DROP);
    assert_eq!(run(&dataplane, Program::TxL3, &packet(SERVER, CLIENT, 472)), TC_ACT_SHOT);
    let counted = counters(&dataplane, CLIENT);
    assert_eq!(counted.rx_dropped.blocked, PacketCounter { packets: 1, bytes: 100 });
    assert_eq!(counted.tx_dropped.blocked, PacketCounter { packets: 1, bytes: 500 });
    assert_eq!(counted.rx_packets + counted.tx_packets, 0);
    // The other client of the instance is not affected.
    assert_eq!(run(&dataplane, Program::TxL3, &packet(SERVER, PEER, 1)), TC_NEXT);
}

#[test]
fn blocked_instance_drops_its_clients() {
    let mut dataplane = enforcing_dataplane();
    let stopped = InstanceSettings { blocked: true, ..instance("198.18.0.0/16", false) };
    dataplane.set_instance(INSTANCE, &stopped).unwrap();
    assert_eq!(run(&dataplane, Program::RxL3, &packet(PEER, SERVER, 1)), XDP_DROP);
    assert_eq!(run(&dataplane, Program::TxL3, &packet(SERVER, CLIENT, 1)), TC_ACT_SHOT);
    assert_eq!(counters(&dataplane, PEER).rx_dropped.blocked.packets, 1);
    assert_eq!(counters(&dataplane, CLIENT).tx_dropped.blocked.packets, 1);

    // Renewal: unblocked from the next packet on, counters kept.
    dataplane.set_instance(INSTANCE, &instance("198.18.0.0/16", false)).unwrap();
    assert_eq!(run(&dataplane, Program::RxL3, &packet(PEER, SERVER, 1)), XDP_PASS);
    let counted = counters(&dataplane, PEER);
    assert_eq!(counted.rx_packets, 1);
    assert_eq!(counted.rx_dropped.blocked.packets, 1);
}

#[test]
fn rate_limit_passes_burst_exactly() {
    let mut dataplane = enforcing_dataplane();
    // 64 kbit/s refills 1,500 bytes in 187.5 ms; 1,000 runs take far less, so exactly the
    // 3,000-byte burst passes: two 1,500-byte packets.
    let limited = ClientSettings {
        instance: INSTANCE,
        rx: RateLimit::new(64, 3_000),
        tx: RateLimit::new(64, 3_000),
        ..ClientSettings::default()
    };
    dataplane.update_client(CLIENT, &limited).unwrap();
    let full = packet(CLIENT, SERVER, 1_472);
    let (verdict, _) = dataplane.test_run_repeated(Program::RxL3, &full, 1_000).unwrap();
    assert_eq!(verdict, XDP_DROP);
    let counted = counters(&dataplane, CLIENT);
    assert_eq!(counted.rx_packets, 2);
    assert_eq!(counted.rx_bytes, 3_000);
    assert_eq!(counted.rx_dropped.rate_limit, PacketCounter { packets: 998, bytes: 1_497_000 });

    let (verdict, _) =
        dataplane.test_run_repeated(Program::TxL3, &packet(SERVER, CLIENT, 1_472), 10).unwrap();
    assert_eq!(verdict, TC_ACT_SHOT);
    let counted = counters(&dataplane, CLIENT);
    assert_eq!(counted.tx_packets, 2);
    assert_eq!(counted.tx_dropped.rate_limit.packets, 8);
}

#[test]
fn rate_update_keeps_counters() {
    let mut dataplane = enforcing_dataplane();
    let limited = ClientSettings {
        instance: INSTANCE,
        rx: RateLimit::new(64, 3_000),
        ..ClientSettings::default()
    };
    dataplane.update_client(CLIENT, &limited).unwrap();
    let full = packet(CLIENT, SERVER, 1_472);
    dataplane.test_run_repeated(Program::RxL3, &full, 5).unwrap();
    assert_eq!(counters(&dataplane, CLIENT).rx_packets, 2);

    // Unlimited from the next packet on; the counters go on from where they were.
    let unlimited = ClientSettings { instance: INSTANCE, ..ClientSettings::default() };
    dataplane.update_client(CLIENT, &unlimited).unwrap();
    let (verdict, _) = dataplane.test_run_repeated(Program::RxL3, &full, 5).unwrap();
    assert_eq!(verdict, XDP_PASS);
    let counted = counters(&dataplane, CLIENT);
    assert_eq!(counted.rx_packets, 7);
    assert_eq!(counted.rx_dropped.rate_limit.packets, 3);
    assert_eq!(dataplane.client_settings(CLIENT).unwrap(), unlimited);
}

#[test]
fn update_of_unknown_client_fails() {
    let mut dataplane = enforcing_dataplane();
    let error = dataplane
        .update_client(Ipv4Addr::new(10, 77, 0, 50), &ClientSettings::default())
        .unwrap_err();
    assert_eq!(error.to_string(), "client 10.77.0.50 not found in the dataplane");
}

#[test]
fn instance_zero_is_rejected() {
    let mut dataplane = enforcing_dataplane();
    let error = dataplane.set_instance(0, &InstanceSettings::default()).unwrap_err();
    assert!(error.to_string().contains("instance number 0"), "{error}");
    assert!(dataplane.bind_tunnel(3, 0).is_err());
    let error = dataplane.bind_tunnel(3, 77).unwrap_err();
    assert!(error.to_string().starts_with("instance 77 not found"), "{error}");
}

#[test]
fn bad_blocks_rejected() {
    let mut dataplane = enforcing_dataplane();
    let settings = |pools: &[&str], allowed: &[&str]| InstanceSettings {
        pools: pools.iter().map(|block| block.parse().unwrap()).collect(),
        allowed: allowed.iter().map(|block| block.parse().unwrap()).collect(),
        ..InstanceSettings::default()
    };
    let cases = [
        (
            settings(&["10.77.0.5/24"], &[]),
            "invalid pools: 10.77.0.5/24 has host bits set; write 10.77.0.0/24",
        ),
        (
            settings(&["0.0.0.0/0"], &[]),
            "invalid pools: 0.0.0.0/0 would make every address a client",
        ),
        (
            settings(&["10.77.0.0/24", "10.77.0.0/24"], &[]),
            "invalid pools: 10.77.0.0/24 is listed twice",
        ),
        (
            settings(&["10.77.0.0/24", "10.77.0.0/16"], &[]),
            "invalid pools: 10.77.0.0/16 overlaps 10.77.0.0/24",
        ),
        (
            settings(&["10.0.0.0/8"], &["10.1.0.0/16"]),
            "invalid allowed destinations: 10.1.0.0/16 overlaps pool 10.0.0.0/8; the \
             client-to-client setting decides traffic inside pools",
        ),
        (
            settings(&["10.77.0.0/24"], &["198.18.0.0/24", "198.18.0.0/24"]),
            "invalid allowed destinations: 198.18.0.0/24 is listed twice",
        ),
    ];
    for (settings, message) in cases {
        let error = dataplane.set_instance(INSTANCE, &settings).unwrap_err();
        assert_eq!(error.to_string(), message);
    }
    // The instance keeps its settings.
    assert_eq!(run(&dataplane, Program::RxL3, &packet(CLIENT, SERVER, 1)), XDP_PASS);
    assert_eq!(run(&dataplane, Program::RxL3, &packet(CLIENT, OUTSIDE, 1)), XDP_DROP);
}

#[test]
fn client_outside_pools_rejected() {
    let mut dataplane = enforcing_dataplane();
    let settings = ClientSettings { instance: INSTANCE, ..ClientSettings::default() };
    for address in
        [Ipv4Addr::new(192, 0, 2, 50), Ipv4Addr::new(10, 77, 0, 0), Ipv4Addr::new(10, 77, 0, 255)]
    {
        let error = dataplane.add_client(address, &settings).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("invalid client {address}: not a usable host address of instance 5's pools")
        );
    }
}

#[test]
fn rebinding_a_tunnel_moves_it() {
    let mut dataplane = enforcing_dataplane();
    // The test tunnel moves from INSTANCE to OTHER_INSTANCE: INSTANCE's clients become
    // strangers on it, and OTHER_INSTANCE's clients are accepted.
    let foreign = Ipv4Addr::new(10, 88, 0, 2);
    let settings = ClientSettings { instance: OTHER_INSTANCE, ..ClientSettings::default() };
    dataplane.add_client(foreign, &settings).unwrap();
    dataplane.bind_tunnel(TEST_RUN_IFINDEX, OTHER_INSTANCE).unwrap();
    assert_eq!(run(&dataplane, Program::RxL3, &packet(CLIENT, SERVER, 1)), XDP_DROP);
    assert_eq!(run(&dataplane, Program::RxL3, &packet(foreign, OUTSIDE, 1)), XDP_PASS);
}

/// Pins the calling thread to `cpu` and returns the CPU it then runs on.
fn pin_to_cpu(cpu: usize) -> usize {
    // SAFETY: the set is a plain bit mask, zeroed and then filled by the libc macros.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let result = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            result,
            0,
            "sched_setaffinity to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
        usize::try_from(libc::sched_getcpu()).expect("sched_getcpu failed")
    }
}

/// One client's packets arrive on two CPUs at once. Both CPUs update the bucket, one timestamp,
/// by compare-and-swap. Together they pass what a single CPU would: the burst, plus what the
/// rate refills while they run. Every other packet is counted as a `rate_limit` drop.
///
/// The bucket has room for 100,000 full packets and refills about 83 a second, and each CPU offers
/// 2,000,000. Both CPUs take from the bucket for the first milliseconds of the round, until it
/// is empty, so an update lost between them would pass more than the bucket held.
#[test]
fn rate_limit_across_two_cpus() {
    const RUNS_PER_CPU: u32 = 2_000_000;
    const ROUNDS: u8 = 5;
    const PACKET_BYTES: u64 = 1_500;
    const BURST_PACKETS: u64 = 100_000;
    const RATE_KBPS: u32 = 1_000;
    const RATE_BYTES_PER_SECOND: f64 = RATE_KBPS as f64 * 1_000.0 / 8.0;
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert!(cpus >= 2, "this test needs two CPUs, the machine has {cpus}");

    let mut dataplane = enforcing_dataplane();
    let limit = RateLimit::new(RATE_KBPS, BURST_PACKETS * PACKET_BYTES);
    for round in 0..ROUNDS {
        // A new client each round starts with a full bucket.
        let client = Ipv4Addr::new(10, 77, 0, 100 + round);
        let settings =
            ClientSettings { instance: INSTANCE, rx: limit, ..ClientSettings::default() };
        dataplane.add_client(client, &settings).unwrap();
        let frame = packet(client, SERVER, 1_472);
        let barrier = std::sync::Barrier::new(2);
        let started = std::time::Instant::now();
        std::thread::scope(|scope| {
            for cpu in 0..2 {
                let (dataplane, frame, barrier) = (&dataplane, &frame, &barrier);
                scope.spawn(move || {
                    assert_eq!(pin_to_cpu(cpu), cpu);
                    barrier.wait();
                    dataplane.test_run_repeated(Program::RxL3, frame, RUNS_PER_CPU).unwrap();
                });
            }
        });
        let elapsed = started.elapsed().as_secs_f64();
        let counted = counters(&dataplane, client);
        let total = 2 * u64::from(RUNS_PER_CPU);
        assert_eq!(counted.rx_packets + counted.rx_dropped.rate_limit.packets, total);
        assert_eq!(counted.rx_bytes, counted.rx_packets * PACKET_BYTES);
        // The coarse clock may lag the wall clock by a tick, never lead it.
        let refill = (RATE_BYTES_PER_SECOND * elapsed / PACKET_BYTES as f64).floor() as u64;
        let max_passed = BURST_PACKETS + refill + 1;
        eprintln!(
            "round {round}: {} of {total} packets passed in {elapsed:.3} s",
            counted.rx_packets
        );
        assert!(
            (BURST_PACKETS..=max_passed).contains(&counted.rx_packets),
            "round {round}: {} packets passed in {elapsed:.3} s, expected {BURST_PACKETS} to {max_passed}",
            counted.rx_packets
        );
    }
}
