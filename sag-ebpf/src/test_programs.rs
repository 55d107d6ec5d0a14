//! Test and benchmark support, never loaded by the agent:
//! - TC programs that add VLAN tag 100 to every packet leaving an interface and remove it from
//!   every packet arriving, so that kernel tests can put tagged frames on a veth link on
//!   kernels built without 802.1Q support;
//! - baseline programs that parse a frame as sag's programs do and pass it, the yardstick of
//!   `cargo xtask bench dataplane`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod access;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{xdp_action::XDP_PASS, TC_ACT_UNSPEC},
        helpers::generated::{bpf_skb_vlan_pop, bpf_skb_vlan_push},
        macros::{classifier, xdp},
        programs::{TcContext, XdpContext},
    };
    use sag_common::packet::{parse_frame, Framing, Parsed};

    use crate::access::{TcPacket, XdpPacket};

    /// VLAN ID of the tag.
    const VLAN_ID: u16 = 100;
    /// 802.1Q TPID, in network byte order as the helper expects.
    const ETH_P_8021Q_BE: u16 = 0x8100u16.to_be();

    // Both return no verdict, so that later programs on the hook, such as sag's, still run.
    #[classifier]
    pub fn sag_test_vlan_push(ctx: TcContext) -> i32 {
        // SAFETY: the helper takes the context's socket buffer.
        unsafe { bpf_skb_vlan_push(ctx.skb.skb, ETH_P_8021Q_BE, VLAN_ID) };
        TC_ACT_UNSPEC
    }

    #[classifier]
    pub fn sag_test_vlan_pop(ctx: TcContext) -> i32 {
        // SAFETY: as above.
        unsafe { bpf_skb_vlan_pop(ctx.skb.skb) };
        TC_ACT_UNSPEC
    }

    #[xdp]
    pub fn sag_baseline_xdp_l3(ctx: XdpContext) -> u32 {
        baseline_xdp(&ctx, Framing::L3)
    }

    #[xdp]
    pub fn sag_baseline_xdp_ethernet(ctx: XdpContext) -> u32 {
        baseline_xdp(&ctx, Framing::Ethernet)
    }

    #[classifier]
    pub fn sag_baseline_tc_l3(ctx: TcContext) -> i32 {
        baseline_tc(&ctx, Framing::L3)
    }

    #[classifier]
    pub fn sag_baseline_tc_ethernet(ctx: TcContext) -> i32 {
        baseline_tc(&ctx, Framing::Ethernet)
    }

    /// Parses the frame and passes it. The parse result feeds the verdict through an
    /// impossible branch, so that the compiler cannot drop the parsing.
    #[inline(always)]
    fn baseline_xdp(ctx: &XdpContext, framing: Framing) -> u32 {
        match parse_frame(&XdpPacket(ctx), framing) {
            Parsed::Ipv4(header) if header.total_len == 0 => 0,
            _ => XDP_PASS,
        }
    }

    #[inline(always)]
    fn baseline_tc(ctx: &TcContext, framing: Framing) -> i32 {
        match parse_frame(&TcPacket(ctx), framing) {
            Parsed::Ipv4(header) if header.total_len == 0 => 0,
            _ => TC_ACT_UNSPEC,
        }
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
