//! Program entry points, the maps they share, and packet access for the sag-common parser.

use core::intrinsics::{atomic_cxchg, AtomicOrdering};

use aya_ebpf::{
    bindings::{
        xdp_action::{XDP_DROP, XDP_PASS},
        BPF_NOEXIST, TC_ACT_SHOT, TC_ACT_UNSPEC,
    },
    helpers::generated::bpf_ktime_get_coarse_ns,
    macros::{classifier, map, xdp},
    maps::{HashMap, PerCpuArray, PerCpuHashMap},
    programs::{TcContext, XdpContext},
};
use sag_common::{
    counters::{
        target, ClientCounters, Direction, InterfaceKey, InterfaceKind, PacketCounter, Target,
    },
    packet::{parse_frame, transport_header_len, wire_size, Framing, Parsed},
    policy::{
        admit, classify_destination, classify_source, destination_allowed, is_blocked, Client,
        DropReason, RateLimit, Source, Tunnel, ENFORCE_DESTINATIONS,
    },
    MAX_CLIENTS, MAX_INTERFACE_COUNTERS, MAX_TUNNELS,
};

use crate::access::{TcPacket, XdpPacket};

#[map(name = "SAG_CLIENT_COUNTERS")]
static CLIENT_COUNTERS: PerCpuArray<ClientCounters> = PerCpuArray::with_max_entries(MAX_CLIENTS, 0);

#[map(name = "SAG_INTERFACE_COUNTERS")]
static INTERFACE_COUNTERS: PerCpuHashMap<InterfaceKey, PacketCounter> =
    PerCpuHashMap::with_max_entries(MAX_INTERFACE_COUNTERS, 0);

#[map(name = "SAG_CLIENTS")]
static CLIENTS: HashMap<u32, Client> = HashMap::with_max_entries(MAX_CLIENTS, 0);

#[map(name = "SAG_TUNNELS")]
static TUNNELS: HashMap<u32, Tunnel> = HashMap::with_max_entries(MAX_TUNNELS, 0);

/// Compare-and-swap attempts on a shared token bucket before the packet is dropped. Each
/// failure means another CPU took tokens from the same bucket in the meantime.
const BUCKET_ATTEMPTS: u32 = 4;

#[xdp]
pub fn sag_rx_l3(ctx: XdpContext) -> u32 {
    let parsed = parse_frame(&XdpPacket(&ctx), Framing::L3);
    xdp_verdict(enforce_rx(ctx.ingress_ifindex() as u32, &parsed, xdp_size(&parsed)))
}

#[xdp]
pub fn sag_rx_ethernet(ctx: XdpContext) -> u32 {
    let parsed = parse_frame(&XdpPacket(&ctx), Framing::Ethernet);
    xdp_verdict(enforce_rx(ctx.ingress_ifindex() as u32, &parsed, xdp_size(&parsed)))
}

#[classifier]
pub fn sag_rx_l3_tc(ctx: TcContext) -> i32 {
    let packet = TcPacket(&ctx);
    let parsed = parse_frame(&packet, Framing::L3);
    tc_verdict(enforce_rx(skb_ifindex(&ctx), &parsed, tc_size(&packet, &parsed)))
}

#[classifier]
pub fn sag_rx_ethernet_tc(ctx: TcContext) -> i32 {
    let packet = TcPacket(&ctx);
    let parsed = parse_frame(&packet, Framing::Ethernet);
    tc_verdict(enforce_rx(skb_ifindex(&ctx), &parsed, tc_size(&packet, &parsed)))
}

#[classifier]
pub fn sag_tx_l3(ctx: TcContext) -> i32 {
    let packet = TcPacket(&ctx);
    let parsed = parse_frame(&packet, Framing::L3);
    tc_verdict(enforce_tx(skb_ifindex(&ctx), &parsed, tc_size(&packet, &parsed)))
}

#[classifier]
pub fn sag_tx_ethernet(ctx: TcContext) -> i32 {
    let packet = TcPacket(&ctx);
    let parsed = parse_frame(&packet, Framing::Ethernet);
    tc_verdict(enforce_tx(skb_ifindex(&ctx), &parsed, tc_size(&packet, &parsed)))
}

/// Verdict of the programs on a packet.
enum Verdict {
    Pass,
    Drop,
}

#[inline(always)]
fn xdp_verdict(verdict: Verdict) -> u32 {
    match verdict {
        Verdict::Pass => XDP_PASS,
        Verdict::Drop => XDP_DROP,
    }
}

#[inline(always)]
fn tc_verdict(verdict: Verdict) -> i32 {
    match verdict {
        // No verdict: the next program on the hook decides, and the packet passes if none.
        Verdict::Pass => TC_ACT_UNSPEC,
        Verdict::Drop => TC_ACT_SHOT as i32,
    }
}

#[inline(always)]
fn skb_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the context's socket buffer is valid for the program's run.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Returns the wire size of an IPv4 packet at XDP, where no packet carries several segments.
#[inline(always)]
fn xdp_size(parsed: &Parsed) -> PacketCounter {
    match parsed {
        Parsed::Ipv4(header) => PacketCounter::one(u64::from(header.total_len)),
        _ => PacketCounter::one(0),
    }
}

/// Returns the wire size of an IPv4 packet at TC: a segmentation-offload packet counts as the
/// segments it becomes after the hook.
#[inline(always)]
fn tc_size(packet: &TcPacket, parsed: &Parsed) -> PacketCounter {
    let Parsed::Ipv4(header) = parsed else {
        return PacketCounter::one(0);
    };
    // SAFETY: the context's socket buffer is valid for the program's run.
    let gso_size = unsafe { (*packet.0.skb.skb).gso_size };
    if gso_size == 0 {
        return PacketCounter::one(u64::from(header.total_len));
    }
    let headers = u32::from(header.header_len) + transport_header_len(packet, header);
    wire_size(header.total_len, headers, gso_size)
}

/// Checks and counts a packet from the tunnel: its source must be a client of the tunnel's
/// instance, not blocked, its destination allowed, and its `size` within the client's rx
/// bucket.
#[inline(always)]
fn enforce_rx(ifindex: u32, parsed: &Parsed, size: PacketCounter) -> Verdict {
    let header = match parsed {
        Parsed::Ipv4(header) => *header,
        _ => return count_other(ifindex, Direction::Rx, parsed),
    };
    let client = CLIENTS.get_ptr_mut(header.source);
    // SAFETY (here and below): a map value stays valid for the program's run, and the agent
    // replaces a client record whole rather than writing into it.
    let client_tunnel = client.map(|client| unsafe { (*client).tunnel_ifindex });
    let arrival_bound = || TUNNELS.get_ptr(ifindex).is_some();
    let client = match (classify_source(client_tunnel, ifindex, arrival_bound), client) {
        (Source::Client, Some(client)) => client,
        (Source::Spoofed, _) => {
            count_interface(
                InterfaceKey::new(ifindex, Direction::Rx, InterfaceKind::Spoofed),
                size,
            );
            return Verdict::Drop;
        }
        _ => {
            let key = InterfaceKey::new(ifindex, Direction::Rx, InterfaceKind::UnknownIpv4);
            count_interface(key, size);
            return Verdict::Pass;
        }
    };
    let record = unsafe { &*client };
    if is_blocked(record.flags) {
        return drop_client(record.slot, Direction::Rx, DropReason::Blocked, size);
    }
    if record.flags & ENFORCE_DESTINATIONS != 0 {
        let destination = classify_destination(record, header.destination);
        if !destination_allowed(record.flags, destination) {
            return drop_client(record.slot, Direction::Rx, DropReason::NotAllowed, size);
        }
    }
    if !take_tokens(unsafe { &mut (*client).rx_tat_ns }, &record.rx, size.bytes) {
        return drop_client(record.slot, Direction::Rx, DropReason::RateLimit, size);
    }
    count_client(record.slot, Direction::Rx, size);
    Verdict::Pass
}

/// Checks and counts a packet leaving toward the tunnel: a client destination must not be
/// blocked, and the packet's `size` must fit the client's tx bucket.
#[inline(always)]
fn enforce_tx(ifindex: u32, parsed: &Parsed, size: PacketCounter) -> Verdict {
    let header = match parsed {
        Parsed::Ipv4(header) => *header,
        _ => return count_other(ifindex, Direction::Tx, parsed),
    };
    let Some(client) = CLIENTS.get_ptr_mut(header.destination) else {
        count_interface(
            InterfaceKey::new(ifindex, Direction::Tx, InterfaceKind::UnknownIpv4),
            size,
        );
        return Verdict::Pass;
    };
    let record = unsafe { &*client };
    if is_blocked(record.flags) {
        return drop_client(record.slot, Direction::Tx, DropReason::Blocked, size);
    }
    if !take_tokens(unsafe { &mut (*client).tx_tat_ns }, &record.tx, size.bytes) {
        return drop_client(record.slot, Direction::Tx, DropReason::RateLimit, size);
    }
    count_client(record.slot, Direction::Tx, size);
    Verdict::Pass
}

/// Takes `bytes` worth of tokens from a bucket shared by all CPUs, or returns false if they
/// are not there (or the bucket stayed contended for [`BUCKET_ATTEMPTS`] tries).
#[inline(always)]
fn take_tokens(tat_ns: *mut u64, limit: &RateLimit, bytes: u64) -> bool {
    if limit.is_unlimited() {
        return true;
    }
    // The coarse clock ticks with the scheduler (every 1-10 ms) but costs a fraction of the
    // precise one. Buckets contain at least 2 full packets (500 ms at the default), so a tick's
    // delay changes no verdict over time, only which packet inside the tick gets it.
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    for _ in 0..BUCKET_ATTEMPTS {
        // A plain 8-byte load is atomic on BPF, and LLVM has no atomic load instruction for
        // cpu v3. The compare-and-swap below catches any value that changed meanwhile.
        // SAFETY: `tat_ns` points into a map value, which is 8-byte aligned.
        let current = unsafe { core::ptr::read_volatile(tat_ns) };
        let Some(next) = admit(current, now, limit, bytes) else {
            return false;
        };
        // SAFETY: as above.
        let (_, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                tat_ns, current, next,
            )
        };
        if swapped {
            return true;
        }
    }
    false
}

#[inline(always)]
fn count_other(ifindex: u32, direction: Direction, parsed: &Parsed) -> Verdict {
    if let Target::Interface { kind, bytes } = target(parsed, direction) {
        let size = PacketCounter::one(u64::from(bytes));
        count_interface(InterfaceKey::new(ifindex, direction, kind), size);
    }
    Verdict::Pass
}

#[inline(always)]
fn count_client(slot: u32, direction: Direction, size: PacketCounter) {
    if let Some(counters) = CLIENT_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU value is only touched by this CPU. The rx and tx programs write
        // different fields, and a hook does not nest in itself on one CPU.
        unsafe { (*counters).record(direction, size) };
    }
}

#[inline(always)]
fn drop_client(
    slot: u32,
    direction: Direction,
    reason: DropReason,
    size: PacketCounter,
) -> Verdict {
    if let Some(counters) = CLIENT_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: as in `count_client`.
        unsafe { (*counters).record_drop(direction, reason, size) };
    }
    Verdict::Drop
}

#[inline(always)]
fn count_interface(key: InterfaceKey, size: PacketCounter) {
    if let Some(counter) = INTERFACE_COUNTERS.get_ptr_mut(key) {
        // SAFETY: as in `count_client`.
        unsafe { (*counter).merge(&size) };
        return;
    }
    // The first packet of this key. If another CPU inserts it first, the insert fails and this
    // CPU's slot of the new entry is found on the second lookup.
    if INTERFACE_COUNTERS.insert(key, size, u64::from(BPF_NOEXIST)).is_ok() {
        return;
    }
    if let Some(counter) = INTERFACE_COUNTERS.get_ptr_mut(key) {
        // SAFETY: as above.
        unsafe { (*counter).merge(&size) };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
