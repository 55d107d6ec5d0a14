//! Program entry points, the maps they share, and packet access for the sag-common parser.

use aya_ebpf::{
    bindings::{xdp_action::XDP_PASS, BPF_NOEXIST, TC_ACT_UNSPEC},
    macros::{classifier, map, xdp},
    maps::PerCpuHashMap,
    programs::{TcContext, XdpContext},
};
use sag_common::{
    counters::{
        target, ClientCounters, Direction, InterfaceKey, InterfaceKind, PacketCounter, Target,
    },
    packet::{parse_frame, Framing, PacketBytes},
    MAX_CLIENTS, MAX_INTERFACE_COUNTERS,
};

#[map(name = "SAG_CLIENT_COUNTERS")]
static CLIENT_COUNTERS: PerCpuHashMap<u32, ClientCounters> =
    PerCpuHashMap::with_max_entries(MAX_CLIENTS, 0);

#[map(name = "SAG_INTERFACE_COUNTERS")]
static INTERFACE_COUNTERS: PerCpuHashMap<InterfaceKey, PacketCounter> =
    PerCpuHashMap::with_max_entries(MAX_INTERFACE_COUNTERS, 0);

#[xdp]
pub fn sag_rx_l3(ctx: XdpContext) -> u32 {
    rx(&ctx, Framing::L3)
}

#[xdp]
pub fn sag_rx_ethernet(ctx: XdpContext) -> u32 {
    rx(&ctx, Framing::Ethernet)
}

#[classifier]
pub fn sag_tx_l3(ctx: TcContext) -> i32 {
    tx(&ctx, Framing::L3)
}

#[classifier]
pub fn sag_tx_ethernet(ctx: TcContext) -> i32 {
    tx(&ctx, Framing::Ethernet)
}

#[inline(always)]
fn rx(ctx: &XdpContext, framing: Framing) -> u32 {
    let packet = XdpPacket(ctx);
    let parsed = parse_frame(&packet, framing);
    let ifindex = ctx.ingress_ifindex() as u32;
    account(ifindex, Direction::Rx, target(&parsed, Direction::Rx));
    XDP_PASS
}

#[inline(always)]
fn tx(ctx: &TcContext, framing: Framing) -> i32 {
    let packet = TcPacket(ctx);
    let parsed = parse_frame(&packet, framing);
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    account(ifindex, Direction::Tx, target(&parsed, Direction::Tx));
    // No verdict: the next program on the hook decides, and the packet passes if there is none.
    TC_ACT_UNSPEC
}

#[inline(always)]
fn account(ifindex: u32, direction: Direction, target: Target) {
    let (kind, bytes) = match target {
        Target::Client { address, bytes } => {
            if let Some(counters) = CLIENT_COUNTERS.get_ptr_mut(address) {
                // SAFETY: a per-CPU value is only touched by this CPU, and programs do not nest
                // on one CPU for the same hook.
                unsafe { (*counters).record(direction, u64::from(bytes)) };
                return;
            }
            (InterfaceKind::UnknownIpv4, bytes)
        }
        Target::Interface { kind, bytes } => (kind, bytes),
    };
    count_interface(
        InterfaceKey::new(ifindex, direction, kind),
        u64::from(bytes),
    );
}

#[inline(always)]
fn count_interface(key: InterfaceKey, bytes: u64) {
    if let Some(counter) = INTERFACE_COUNTERS.get_ptr_mut(key) {
        // SAFETY: as in `account`, the value belongs to this CPU.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes;
        }
        return;
    }
    // The first packet of this key. If another CPU inserts it first, the insert fails and this
    // CPU's slot of the new entry is found on the second lookup.
    let first = PacketCounter { packets: 1, bytes };
    if INTERFACE_COUNTERS
        .insert(key, first, u64::from(BPF_NOEXIST))
        .is_ok()
    {
        return;
    }
    if let Some(counter) = INTERFACE_COUNTERS.get_ptr_mut(key) {
        // SAFETY: as above.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes;
        }
    }
}

/// Bounds-checked direct access to an XDP packet.
struct XdpPacket<'a>(&'a XdpContext);

impl PacketBytes for XdpPacket<'_> {
    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.0.data_end() - self.0.data()
    }

    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let start = self.0.data() + offset;
        if start + N > self.0.data_end() {
            return None;
        }
        // SAFETY: the check above keeps the read inside the packet, as the verifier requires.
        Some(unsafe { core::ptr::read_unaligned(start as *const [u8; N]) })
    }
}

/// Access to a socket buffer through `bpf_skb_load_bytes`, which also reaches paged data.
struct TcPacket<'a>(&'a TcContext);

impl PacketBytes for TcPacket<'_> {
    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.0.len() as usize
    }

    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.0.load::<[u8; N]>(offset).ok()
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
