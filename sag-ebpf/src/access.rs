//! Packet access for the sag-common parser, from XDP and TC programs.

use aya_ebpf::programs::{TcContext, XdpContext};
use sag_common::packet::PacketBytes;

/// Bounds-checked direct access to an XDP packet.
pub struct XdpPacket<'a>(pub &'a XdpContext);

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
pub struct TcPacket<'a>(pub &'a TcContext);

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
