//! Test support: TC programs that add VLAN tag 100 to every packet leaving an interface and
//! remove it from every packet arriving, so that kernel tests can put tagged frames on a veth
//! link on kernels built without 802.1Q support. Never loaded by the agent.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::TC_ACT_UNSPEC,
        helpers::generated::{bpf_skb_vlan_pop, bpf_skb_vlan_push},
        macros::classifier,
        programs::TcContext,
    };

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

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
