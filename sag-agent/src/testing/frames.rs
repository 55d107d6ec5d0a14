//! Builders for IPv4, UDP and ICMP packets and Ethernet frames, with valid checksums.

use std::net::Ipv4Addr;

use sag_common::packet::{ETHERTYPE_IPV4, ETHERTYPE_VLAN};

/// IP protocol number of ICMP.
pub const PROTOCOL_ICMP: u8 = 1;
/// IP protocol number of UDP.
pub const PROTOCOL_UDP: u8 = 17;
/// Length of a UDP header, in bytes.
pub const UDP_HEADER_LEN: usize = 8;
/// Length of an ICMP echo header, in bytes.
pub const ICMP_ECHO_HEADER_LEN: usize = 8;

/// Returns the Internet checksum (RFC 1071) of `bytes`.
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Builds an IPv4 packet with `options` (a multiple of 4 bytes) and `payload`, TTL 64, no
/// fragmentation, and a valid header checksum.
pub fn ipv4(
    source: Ipv4Addr,
    destination: Ipv4Addr,
    protocol: u8,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    assert!(
        options.len().is_multiple_of(4) && options.len() <= 40,
        "IPv4 options must be 0-40 bytes, in words"
    );
    let header_len = 20 + options.len();
    let total_len =
        u16::try_from(header_len + payload.len()).expect("IPv4 packet over 65,535 bytes");
    let mut packet = Vec::with_capacity(usize::from(total_len));
    packet.push(0x40 | (header_len / 4) as u8);
    packet.push(0);
    packet.extend_from_slice(&total_len.to_be_bytes());
    packet.extend_from_slice(&[0, 1, 0x40, 0]); // identification 1, don't fragment
    packet.push(64);
    packet.push(protocol);
    packet.extend_from_slice(&[0, 0]);
    packet.extend_from_slice(&source.octets());
    packet.extend_from_slice(&destination.octets());
    packet.extend_from_slice(options);
    let checksum = internet_checksum(&packet);
    packet[10..12].copy_from_slice(&checksum.to_be_bytes());
    packet.extend_from_slice(payload);
    packet
}

/// Builds an IPv4 UDP packet with a zero (absent) UDP checksum. Its IP size is
/// 28 + `payload.len()` bytes.
pub fn udp(source: (Ipv4Addr, u16), destination: (Ipv4Addr, u16), payload: &[u8]) -> Vec<u8> {
    let mut datagram = Vec::with_capacity(UDP_HEADER_LEN + payload.len());
    datagram.extend_from_slice(&source.1.to_be_bytes());
    datagram.extend_from_slice(&destination.1.to_be_bytes());
    datagram.extend_from_slice(&((UDP_HEADER_LEN + payload.len()) as u16).to_be_bytes());
    datagram.extend_from_slice(&[0, 0]);
    datagram.extend_from_slice(payload);
    ipv4(source.0, destination.0, PROTOCOL_UDP, &[], &datagram)
}

/// Builds an ICMP echo request. Its IP size is 28 + `payload.len()` bytes.
pub fn icmp_echo(
    source: Ipv4Addr,
    destination: Ipv4Addr,
    id: u16,
    seq: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut message = vec![8, 0, 0, 0];
    message.extend_from_slice(&id.to_be_bytes());
    message.extend_from_slice(&seq.to_be_bytes());
    message.extend_from_slice(payload);
    let checksum = internet_checksum(&message);
    message[2..4].copy_from_slice(&checksum.to_be_bytes());
    ipv4(source, destination, PROTOCOL_ICMP, &[], &message)
}

/// Wraps `payload` in an Ethernet header with the given EtherType and, if `vlan` is given,
/// one 802.1Q tag with that VLAN ID.
pub fn ethernet(ethertype: u16, vlan: Option<u16>, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    if let Some(id) = vlan {
        frame.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
        frame.extend_from_slice(&id.to_be_bytes());
    }
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// Wraps an IPv4 packet in an untagged Ethernet header.
pub fn ethernet_ipv4(packet: &[u8]) -> Vec<u8> {
    ethernet(ETHERTYPE_IPV4, None, packet)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_known_header() {
        // The IPv4 header example from RFC 1071's companion literature, checksum field zero.
        let header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&header), 0xb861);
    }

    #[test]
    fn built_header_checksums_to_zero() {
        let packet = udp((Ipv4Addr::new(10, 0, 0, 1), 1), (Ipv4Addr::new(10, 0, 0, 2), 2), &[7; 5]);
        assert_eq!(packet.len(), 33);
        assert_eq!(internet_checksum(&packet[..20]), 0);
    }

    #[test]
    fn udp_sizes() {
        for payload in [1usize, 1472] {
            let packet = udp((Ipv4Addr::LOCALHOST, 1), (Ipv4Addr::LOCALHOST, 2), &vec![0; payload]);
            assert_eq!(packet.len(), 28 + payload);
            assert_eq!(u16::from_be_bytes([packet[2], packet[3]]) as usize, 28 + payload);
        }
    }

    #[test]
    fn icmp_checksum_is_valid() {
        let packet = icmp_echo(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, 7, 1, &[1, 2, 3]);
        assert_eq!(internet_checksum(&packet[20..]), 0);
    }
}
