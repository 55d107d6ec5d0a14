//! Parsing of the frames that the kernel programs see, down to the IPv4 header.
//!
//! The parser reads fixed-size chunks through [`PacketBytes`], so the kernel programs can back it
//! with bounds-checked packet access and host tests with a byte slice.

/// Length of an Ethernet header without VLAN tags, in bytes.
pub const ETHERNET_HEADER_LEN: usize = 14;
/// Length of one 802.1Q or 802.1ad tag, in bytes.
pub const VLAN_TAG_LEN: usize = 4;
/// Length of an IPv4 header without options, in bytes.
pub const IPV4_MIN_HEADER_LEN: usize = 20;
/// Smallest valid IPv4 header length field (IHL), in 32-bit words.
pub const IPV4_MIN_IHL: u8 = 5;

/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// EtherType of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// EtherType of an 802.1Q VLAN tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// EtherType of an 802.1ad (QinQ service) VLAN tag.
pub const ETHERTYPE_QINQ: u16 = 0x88a8;

/// Link-layer framing of an interface, chosen when the programs are attached.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// The frame starts at the IP header, as on TUN and WireGuard devices.
    L3 = 0,
    /// The frame starts with an Ethernet header, optionally followed by one VLAN tag.
    Ethernet = 1,
}

/// Byte access to a frame, for the parser.
pub trait PacketBytes {
    /// Returns the length of the whole frame, in bytes.
    fn frame_len(&self) -> usize;

    /// Copies `N` bytes starting at `offset`, or returns `None` if the frame is shorter.
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;
}

impl PacketBytes for [u8] {
    fn frame_len(&self) -> usize {
        self.len()
    }

    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let end = offset.checked_add(N)?;
        let bytes = self.get(offset..end)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Some(out)
    }
}

/// The fields of an IPv4 header that accounting needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Summary {
    /// Source address, as a host-order integer (`u32::from(Ipv4Addr)`).
    pub source: u32,
    /// Destination address, as a host-order integer.
    pub destination: u32,
    /// The header's total length field: the packet's size from the IP header on, in bytes.
    pub total_len: u16,
    /// The IP protocol number of the payload (6 for TCP, 17 for UDP).
    pub protocol: u8,
    /// Length of the IPv4 header with its options, in bytes (IHL times 4).
    pub header_len: u8,
    /// Offset of the transport header from the start of the frame, in bytes.
    pub transport_offset: u16,
}

/// Protocols other than IPv4, which the programs pass untouched and count per interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtherProtocol {
    Ipv6,
    Arp,
    /// Any other EtherType or IP version, and frames with more than one VLAN tag.
    Other,
}

/// Reason a frame could not be parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// Shorter than an Ethernet header, or than its VLAN tag.
    TruncatedLinkHeader,
    /// A frame on a layer-3 device shorter than 20 bytes, the smallest IP header.
    TooShortForIp,
    /// Shorter than the 20-byte IPv4 header, or than the header length that IHL gives.
    TruncatedIpv4Header,
    /// IHL below 5.
    HeaderLengthTooSmall,
    /// The version field is not 4 although the EtherType is IPv4's.
    WrongVersion,
    /// The total length is below the header length or above the bytes present.
    BadTotalLength,
}

/// The result of parsing one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    Ipv4(Ipv4Summary),
    /// Not IPv4. `l3_len` is the frame length after the link-layer header, in bytes.
    Other {
        protocol: OtherProtocol,
        l3_len: u32,
    },
    /// Not parseable. `len` is the whole frame length, in bytes.
    Malformed {
        reason: Malformed,
        len: u32,
    },
}

/// Parses a frame of the given framing down to its IPv4 header.
#[inline(always)]
pub fn parse_frame<P: PacketBytes + ?Sized>(packet: &P, framing: Framing) -> Parsed {
    match framing {
        Framing::L3 => parse_l3(packet),
        Framing::Ethernet => parse_ethernet(packet),
    }
}

#[inline(always)]
fn malformed<P: PacketBytes + ?Sized>(packet: &P, reason: Malformed) -> Parsed {
    Parsed::Malformed { reason, len: packet.frame_len() as u32 }
}

#[inline(always)]
fn parse_l3<P: PacketBytes + ?Sized>(packet: &P) -> Parsed {
    // LLVM turns the bounds check of a 1-byte read into a form the verifier rejects, so the
    // version nibble comes with the whole minimum header. Every IP header has 20 bytes at least.
    let Some(header) = packet.read::<IPV4_MIN_HEADER_LEN>(0) else {
        return malformed(packet, Malformed::TooShortForIp);
    };
    match header[0] >> 4 {
        4 => parse_ipv4(packet, 0),
        6 => Parsed::Other { protocol: OtherProtocol::Ipv6, l3_len: packet.frame_len() as u32 },
        _ => Parsed::Other { protocol: OtherProtocol::Other, l3_len: packet.frame_len() as u32 },
    }
}

#[inline(always)]
fn parse_ethernet<P: PacketBytes + ?Sized>(packet: &P) -> Parsed {
    let Some(header) = packet.read::<ETHERNET_HEADER_LEN>(0) else {
        return malformed(packet, Malformed::TruncatedLinkHeader);
    };
    let mut ethertype = u16::from_be_bytes([header[12], header[13]]);
    let mut l3_offset = ETHERNET_HEADER_LEN;
    if ethertype == ETHERTYPE_VLAN || ethertype == ETHERTYPE_QINQ {
        // The tag is 2 bytes of TCI followed by the inner EtherType.
        let Some(tag) = packet.read::<VLAN_TAG_LEN>(ETHERNET_HEADER_LEN) else {
            return malformed(packet, Malformed::TruncatedLinkHeader);
        };
        ethertype = u16::from_be_bytes([tag[2], tag[3]]);
        l3_offset += VLAN_TAG_LEN;
    }
    let l3_len = packet.frame_len().saturating_sub(l3_offset) as u32;
    match ethertype {
        ETHERTYPE_IPV4 => parse_ipv4(packet, l3_offset),
        ETHERTYPE_IPV6 => Parsed::Other { protocol: OtherProtocol::Ipv6, l3_len },
        ETHERTYPE_ARP => Parsed::Other { protocol: OtherProtocol::Arp, l3_len },
        // A second VLAN tag lands here too: sag supports one tag.
        _ => Parsed::Other { protocol: OtherProtocol::Other, l3_len },
    }
}

/// Parses the IPv4 header at `offset`, checking it as far as accounting relies on it.
#[inline(always)]
fn parse_ipv4<P: PacketBytes + ?Sized>(packet: &P, offset: usize) -> Parsed {
    let Some(header) = packet.read::<IPV4_MIN_HEADER_LEN>(offset) else {
        return malformed(packet, Malformed::TruncatedIpv4Header);
    };
    if header[0] >> 4 != 4 {
        return malformed(packet, Malformed::WrongVersion);
    }
    let ihl = header[0] & 0x0f;
    if ihl < IPV4_MIN_IHL {
        return malformed(packet, Malformed::HeaderLengthTooSmall);
    }
    let header_len = usize::from(ihl) * 4;
    let available = packet.frame_len().saturating_sub(offset);
    if available < header_len {
        return malformed(packet, Malformed::TruncatedIpv4Header);
    }
    let total_len = u16::from_be_bytes([header[2], header[3]]);
    // Ethernet pads short frames, so the frame may be longer than the packet, never shorter.
    if usize::from(total_len) < header_len || usize::from(total_len) > available {
        return malformed(packet, Malformed::BadTotalLength);
    }
    Parsed::Ipv4(Ipv4Summary {
        source: u32::from_be_bytes([header[12], header[13], header[14], header[15]]),
        destination: u32::from_be_bytes([header[16], header[17], header[18], header[19]]),
        total_len,
        protocol: header[9],
        header_len: header_len as u8,
        transport_offset: (offset + header_len) as u16,
    })
}

/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;
/// Length of a TCP header without options, in bytes.
pub const TCP_MIN_HEADER_LEN: usize = 20;
/// Length of a UDP header, in bytes.
pub const UDP_HEADER_LEN: u32 = 8;

/// Returns the length of the transport header that the kernel repeats in every segment of a
/// segmentation-offload packet, in bytes: TCP's data offset, UDP's 8 bytes, and 0 for other
/// protocols or a TCP header that is cut short.
#[inline(always)]
pub fn transport_header_len<P: PacketBytes + ?Sized>(packet: &P, header: &Ipv4Summary) -> u32 {
    match header.protocol {
        IPPROTO_TCP => {
            match packet.read::<TCP_MIN_HEADER_LEN>(usize::from(header.transport_offset)) {
                Some(tcp) => u32::from(tcp[12] >> 4) * 4,
                None => 0,
            }
        }
        IPPROTO_UDP => UDP_HEADER_LEN,
        _ => 0,
    }
}

/// Returns the packets and bytes that an IPv4 packet of `total_len` bytes becomes on the wire.
///
/// The kernel hands TC a TCP or UDP segmentation-offload packet (GSO, or GRO on a forwarded
/// flow) whole, and cuts it into segments of `gso_size` payload bytes only after the TC egress
/// hook. Every segment repeats the `headers_len` bytes of IP and transport headers. A
/// `gso_size` of 0 means an ordinary packet, which is one packet of `total_len` bytes.
///
/// NOTE: IPv4 BIG TCP packets (over 64 KiB, total length field 0) are parsed as malformed and
/// counted per interface. Counting them per client would need the length from the socket
/// buffer instead of the header.
#[inline(always)]
pub const fn wire_size(
    total_len: u16,
    headers_len: u32,
    gso_size: u32,
) -> crate::counters::PacketCounter {
    let total = total_len as u64;
    let headers = headers_len as u64;
    if gso_size == 0 || total <= headers {
        return crate::counters::PacketCounter::one(total);
    }
    let payload = total - headers;
    let segments = payload.div_ceil(gso_size as u64);
    crate::counters::PacketCounter { packets: segments, bytes: total + (segments - 1) * headers }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::PacketCounter;

    const CLIENT: [u8; 4] = [10, 77, 0, 2];
    const SERVER: [u8; 4] = [198, 18, 0, 2];

    /// Builds an IPv4 header with `options_len` bytes of options and `payload_len` bytes after.
    fn ipv4(options_len: usize, payload_len: usize) -> [u8; 128] {
        let mut packet = [0u8; 128];
        let header_len = 20 + options_len;
        packet[0] = 0x40 | (header_len / 4) as u8;
        let total = (header_len + payload_len) as u16;
        packet[2..4].copy_from_slice(&total.to_be_bytes());
        packet[9] = 17;
        packet[12..16].copy_from_slice(&CLIENT);
        packet[16..20].copy_from_slice(&SERVER);
        packet
    }

    /// Builds an Ethernet frame whose EtherType field and VLAN tags carry `ethertypes` in order
    /// (a tag's TCI is VLAN 100), followed by `payload`.
    fn ethernet(ethertypes: &[u16], payload: &[u8]) -> [u8; 200] {
        let mut frame = [0u8; 200];
        let mut offset = 12;
        for (index, ethertype) in ethertypes.iter().enumerate() {
            if index > 0 {
                frame[offset..offset + 2].copy_from_slice(&100u16.to_be_bytes());
                offset += 2;
            }
            frame[offset..offset + 2].copy_from_slice(&ethertype.to_be_bytes());
            offset += 2;
        }
        frame[offset..offset + payload.len()].copy_from_slice(payload);
        frame
    }

    /// Returns the summary of a UDP packet from [`ipv4`] of `total_len` bytes with a
    /// `header_len`-byte IP header that starts `l3_offset` bytes into the frame.
    fn summary_at(total_len: u16, header_len: u8, l3_offset: u16) -> Parsed {
        Parsed::Ipv4(Ipv4Summary {
            source: u32::from_be_bytes(CLIENT),
            destination: u32::from_be_bytes(SERVER),
            total_len,
            protocol: IPPROTO_UDP,
            header_len,
            transport_offset: l3_offset + u16::from(header_len),
        })
    }

    /// Returns the summary of a UDP packet from [`ipv4`] without options on a layer-3 device.
    fn summary(total_len: u16) -> Parsed {
        summary_at(total_len, 20, 0)
    }

    #[test]
    fn l3_ipv4_minimal_header() {
        let packet = ipv4(0, 8);
        assert_eq!(parse_frame(&packet[..28], Framing::L3), summary(28));
    }

    #[test]
    fn l3_ipv4_with_options() {
        let packet = ipv4(8, 8);
        assert_eq!(parse_frame(&packet[..36], Framing::L3), summary_at(36, 28, 0));
    }

    #[test]
    fn l3_ipv4_fragment_counts_its_own_length() {
        let mut packet = ipv4(0, 40);
        // More-fragments flag set, offset 0.
        packet[6] = 0x20;
        assert_eq!(parse_frame(&packet[..60], Framing::L3), summary(60));
        // A later fragment without the flag, at offset 185 * 8 bytes.
        packet[6] = 0x00;
        packet[7] = 185;
        assert_eq!(parse_frame(&packet[..60], Framing::L3), summary(60));
    }

    #[test]
    fn l3_shorter_than_any_ip_header() {
        let packet = ipv4(0, 0);
        for len in [0, 1, 10, 19] {
            assert_eq!(
                parse_frame(&packet[..len], Framing::L3),
                Parsed::Malformed { reason: Malformed::TooShortForIp, len: len as u32 },
                "length {len}"
            );
        }
        assert_eq!(parse_frame(&packet[..20], Framing::L3), summary(20));
    }

    #[test]
    fn l3_truncated_options() {
        let packet = ipv4(8, 0);
        assert_eq!(
            parse_frame(&packet[..24], Framing::L3),
            Parsed::Malformed { reason: Malformed::TruncatedIpv4Header, len: 24 }
        );
    }

    #[test]
    fn l3_ihl_below_five() {
        for ihl in 0..IPV4_MIN_IHL {
            let mut packet = ipv4(0, 8);
            packet[0] = 0x40 | ihl;
            assert_eq!(
                parse_frame(&packet[..28], Framing::L3),
                Parsed::Malformed { reason: Malformed::HeaderLengthTooSmall, len: 28 },
                "IHL {ihl}"
            );
        }
    }

    #[test]
    fn l3_total_length_edges() {
        let packet = ipv4(0, 8);
        // Exactly the bytes present.
        assert_eq!(parse_frame(&packet[..28], Framing::L3), summary(28));
        // One byte more than present.
        assert_eq!(
            parse_frame(&packet[..27], Framing::L3),
            Parsed::Malformed { reason: Malformed::BadTotalLength, len: 27 }
        );
        // Below the header length.
        let mut short = ipv4(0, 0);
        short[2..4].copy_from_slice(&19u16.to_be_bytes());
        assert_eq!(
            parse_frame(&short[..20], Framing::L3),
            Parsed::Malformed { reason: Malformed::BadTotalLength, len: 20 }
        );
        // Equal to the header length: a header with no payload.
        short[2..4].copy_from_slice(&20u16.to_be_bytes());
        assert_eq!(parse_frame(&short[..20], Framing::L3), summary(20));
    }

    #[test]
    fn l3_ipv6_and_unknown_version() {
        let mut packet = [0u8; 48];
        packet[0] = 0x60;
        assert_eq!(
            parse_frame(&packet[..], Framing::L3),
            Parsed::Other { protocol: OtherProtocol::Ipv6, l3_len: 48 }
        );
        packet[0] = 0x50;
        assert_eq!(
            parse_frame(&packet[..], Framing::L3),
            Parsed::Other { protocol: OtherProtocol::Other, l3_len: 48 }
        );
    }

    #[test]
    fn ethernet_ipv4_untagged() {
        let frame = ethernet(&[ETHERTYPE_IPV4], &ipv4(0, 8)[..28]);
        assert_eq!(parse_frame(&frame[..42], Framing::Ethernet), summary_at(28, 20, 14));
    }

    #[test]
    fn ethernet_padding_is_not_counted() {
        // A 28-byte packet in a minimum-size 60-byte frame.
        let frame = ethernet(&[ETHERTYPE_IPV4], &ipv4(0, 8)[..28]);
        assert_eq!(parse_frame(&frame[..60], Framing::Ethernet), summary_at(28, 20, 14));
    }

    #[test]
    fn ethernet_ipv4_one_vlan_tag() {
        let frame = ethernet(&[ETHERTYPE_VLAN, ETHERTYPE_IPV4], &ipv4(0, 8)[..28]);
        assert_eq!(parse_frame(&frame[..46], Framing::Ethernet), summary_at(28, 20, 18));
    }

    #[test]
    fn ethernet_qinq_outer_tag() {
        let mut frame = ethernet(&[ETHERTYPE_VLAN, ETHERTYPE_IPV4], &ipv4(0, 8)[..28]);
        frame[12..14].copy_from_slice(&ETHERTYPE_QINQ.to_be_bytes());
        assert_eq!(parse_frame(&frame[..46], Framing::Ethernet), summary_at(28, 20, 18));
    }

    #[test]
    fn ethernet_two_vlan_tags_are_other() {
        let frame = ethernet(&[ETHERTYPE_VLAN, ETHERTYPE_VLAN, ETHERTYPE_IPV4], &[0u8; 32]);
        assert_eq!(
            parse_frame(&frame[..50], Framing::Ethernet),
            Parsed::Other { protocol: OtherProtocol::Other, l3_len: 32 }
        );
    }

    #[test]
    fn ethernet_truncated_headers() {
        let frame = ethernet(&[ETHERTYPE_VLAN, ETHERTYPE_IPV4], &ipv4(0, 8)[..28]);
        for len in [0, 1, 13, 14, 17] {
            assert_eq!(
                parse_frame(&frame[..len], Framing::Ethernet),
                Parsed::Malformed { reason: Malformed::TruncatedLinkHeader, len: len as u32 },
                "length {len}"
            );
        }
        let untagged = ethernet(&[ETHERTYPE_IPV4], &ipv4(0, 8)[..28]);
        assert_eq!(
            parse_frame(&untagged[..33], Framing::Ethernet),
            Parsed::Malformed { reason: Malformed::TruncatedIpv4Header, len: 33 }
        );
    }

    #[test]
    fn ethernet_wrong_ip_version() {
        let mut packet = ipv4(0, 8);
        packet[0] = 0x65;
        let frame = ethernet(&[ETHERTYPE_IPV4], &packet[..28]);
        assert_eq!(
            parse_frame(&frame[..42], Framing::Ethernet),
            Parsed::Malformed { reason: Malformed::WrongVersion, len: 42 }
        );
    }

    #[test]
    fn ethernet_ipv6_and_arp() {
        let frame = ethernet(&[ETHERTYPE_IPV6], &[0x60; 40]);
        assert_eq!(
            parse_frame(&frame[..54], Framing::Ethernet),
            Parsed::Other { protocol: OtherProtocol::Ipv6, l3_len: 40 }
        );
        let frame = ethernet(&[ETHERTYPE_ARP], &[0; 28]);
        assert_eq!(
            parse_frame(&frame[..42], Framing::Ethernet),
            Parsed::Other { protocol: OtherProtocol::Arp, l3_len: 28 }
        );
        let frame = ethernet(&[ETHERTYPE_VLAN, ETHERTYPE_ARP], &[0; 28]);
        assert_eq!(
            parse_frame(&frame[..46], Framing::Ethernet),
            Parsed::Other { protocol: OtherProtocol::Arp, l3_len: 28 }
        );
    }

    #[test]
    fn wire_size_of_ordinary_packets() {
        assert_eq!(wire_size(1500, 52, 0), PacketCounter::one(1500));
        assert_eq!(wire_size(20, 20, 0), PacketCounter::one(20));
        // A segmentation size on a packet with no payload changes nothing.
        assert_eq!(wire_size(52, 52, 1448), PacketCounter::one(52));
    }

    #[test]
    fn wire_size_of_offload_packets() {
        // Payload of exactly one segment: one packet.
        assert_eq!(wire_size(1500, 52, 1448), PacketCounter::one(1500));
        // One byte more: two packets, the second repeats the 52 bytes of headers.
        assert_eq!(wire_size(1501, 52, 1448), PacketCounter { packets: 2, bytes: 1553 });
        // 45 full TCP segments with timestamps: 45 packets of 1,500 bytes.
        let total = 52 + 45 * 1448;
        assert_eq!(wire_size(total, 52, 1448), PacketCounter { packets: 45, bytes: 45 * 1500 });
        // The largest IPv4 packet, cut into 1,448-byte segments: 45 full and one of 376 bytes.
        assert_eq!(
            wire_size(u16::MAX, 52, 1448),
            PacketCounter { packets: 46, bytes: 45 * 1500 + 52 + (65_483 - 45 * 1448) }
        );
        // UDP segmentation: 8-byte header, 1,000-byte segments.
        assert_eq!(
            wire_size(28 + 3_000, 28, 1_000),
            PacketCounter { packets: 3, bytes: 3 * 1_028 }
        );
    }

    #[test]
    fn transport_header_lengths() {
        let mut packet = ipv4(0, 40);
        packet[9] = IPPROTO_TCP;
        // Data offset 8 words: a 32-byte TCP header (20 bytes and 12 of timestamps).
        packet[20 + 12] = 8 << 4;
        assert_eq!(transport_header_len(&packet[..60], &header_with(&packet, 60)), 32);
        // A TCP header cut short counts as none.
        let mut short = ipv4(0, 10);
        short[9] = IPPROTO_TCP;
        assert_eq!(transport_header_len(&short[..30], &header_with(&short, 30)), 0);
        packet[9] = IPPROTO_UDP;
        assert_eq!(transport_header_len(&packet[..60], &header_with(&packet, 60)), UDP_HEADER_LEN);
        packet[9] = 1;
        assert_eq!(transport_header_len(&packet[..60], &header_with(&packet, 60)), 0);
    }

    /// Parses the first `len` bytes of a layer-3 `packet` that must be IPv4.
    fn header_with(packet: &[u8], len: usize) -> Ipv4Summary {
        match parse_frame(&packet[..len], Framing::L3) {
            Parsed::Ipv4(header) => header,
            other => panic!("not IPv4: {other:?}"),
        }
    }
}
