//! Counter keys and values in the kernel maps, and the rule that picks which counter a packet
//! goes to.

use crate::{
    packet::{OtherProtocol, Parsed},
    policy::DropReason,
};

/// Direction of traffic, seen from the gateway.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From a client into the networks behind the box, counted where it enters from the tunnel.
    Rx = 0,
    /// From anywhere to a client, counted where it leaves toward the tunnel.
    Tx = 1,
}

/// Packets and bytes a client sent and received, and those dropped. One value per CPU in the
/// kernel map; the agent adds them up with [`ClientCounters::merge`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct ClientCounters {
    /// Packets from the client that passed.
    pub rx_packets: u64,
    /// IPv4 total length of those packets, in bytes.
    pub rx_bytes: u64,
    /// Packets to the client that passed.
    pub tx_packets: u64,
    /// IPv4 total length of those packets, in bytes.
    pub tx_bytes: u64,
    /// Packets from the client that were dropped, by reason.
    pub rx_dropped: DropCounters,
    /// Packets to the client that were dropped, by reason.
    pub tx_dropped: DropCounters,
}

/// Dropped packets of one client and direction, by reason. A client's packets are never
/// spoofed: a spoofed packet has no client and is counted per interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct DropCounters {
    pub rate_limit: PacketCounter,
    pub blocked: PacketCounter,
    pub not_allowed: PacketCounter,
}

impl DropCounters {
    /// Returns the counter of `reason`, or `None` for [`DropReason::Spoofed`].
    #[inline(always)]
    pub fn get(&self, reason: DropReason) -> Option<&PacketCounter> {
        match reason {
            DropReason::RateLimit => Some(&self.rate_limit),
            DropReason::Blocked => Some(&self.blocked),
            DropReason::NotAllowed => Some(&self.not_allowed),
            DropReason::Spoofed => None,
        }
    }

    /// Returns the counter of `reason` to add to, or `None` for [`DropReason::Spoofed`].
    #[inline(always)]
    pub fn get_mut(&mut self, reason: DropReason) -> Option<&mut PacketCounter> {
        match reason {
            DropReason::RateLimit => Some(&mut self.rate_limit),
            DropReason::Blocked => Some(&mut self.blocked),
            DropReason::NotAllowed => Some(&mut self.not_allowed),
            DropReason::Spoofed => None,
        }
    }

    /// Adds another CPU's share to this one.
    pub fn merge(&mut self, other: &Self) {
        self.rate_limit.merge(&other.rate_limit);
        self.blocked.merge(&other.blocked);
        self.not_allowed.merge(&other.not_allowed);
    }
}

impl ClientCounters {
    /// Adds `size` (packets and bytes) passed in `direction`.
    #[inline(always)]
    pub fn record(&mut self, direction: Direction, size: PacketCounter) {
        match direction {
            Direction::Rx => {
                self.rx_packets += size.packets;
                self.rx_bytes += size.bytes;
            }
            Direction::Tx => {
                self.tx_packets += size.packets;
                self.tx_bytes += size.bytes;
            }
        }
    }

    /// Adds `size` (packets and bytes) dropped in `direction` for `reason`.
    #[inline(always)]
    pub fn record_drop(&mut self, direction: Direction, reason: DropReason, size: PacketCounter) {
        let dropped = match direction {
            Direction::Rx => &mut self.rx_dropped,
            Direction::Tx => &mut self.tx_dropped,
        };
        if let Some(counter) = dropped.get_mut(reason) {
            counter.merge(&size);
        }
    }

    /// Adds another set of counters, such as another CPU's share, to this one.
    pub fn merge(&mut self, other: &Self) {
        self.rx_packets += other.rx_packets;
        self.rx_bytes += other.rx_bytes;
        self.tx_packets += other.tx_packets;
        self.tx_bytes += other.tx_bytes;
        self.rx_dropped.merge(&other.rx_dropped);
        self.tx_dropped.merge(&other.tx_dropped);
    }
}

/// Kinds of traffic counted per interface rather than per client.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InterfaceKind {
    /// IPv4 whose client-side address (source on rx, destination on tx) is not a client.
    UnknownIpv4 = 0,
    Ipv6 = 1,
    Arp = 2,
    /// Any other protocol, or a frame with more than one VLAN tag.
    Other = 3,
    /// Frames the parser rejected; see [`crate::packet::Malformed`].
    Malformed = 4,
    /// IPv4 from a tunnel whose source is not a client of the tunnel's instance: dropped.
    Spoofed = 5,
}

impl InterfaceKind {
    /// Number of kinds.
    pub const COUNT: usize = 6;
    /// All kinds, in key order.
    pub const ALL: [Self; Self::COUNT] =
        [Self::UnknownIpv4, Self::Ipv6, Self::Arp, Self::Other, Self::Malformed, Self::Spoofed];

    /// Returns the kind's name as it appears in the agent's output and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Self::UnknownIpv4 => "unknown_ipv4",
            Self::Ipv6 => "ipv6",
            Self::Arp => "arp",
            Self::Other => "other",
            Self::Malformed => "malformed",
            Self::Spoofed => "spoofed",
        }
    }

    /// Returns the kind stored under `value` in an [`InterfaceKey`], if any.
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::UnknownIpv4),
            1 => Some(Self::Ipv6),
            2 => Some(Self::Arp),
            3 => Some(Self::Other),
            4 => Some(Self::Malformed),
            5 => Some(Self::Spoofed),
            _ => None,
        }
    }
}

/// Key of the per-interface counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InterfaceKey {
    pub ifindex: u32,
    /// A [`Direction`] as `u8`.
    pub direction: u8,
    /// An [`InterfaceKind`] as `u8`.
    pub kind: u8,
    /// Always zero, so that keys compare equal byte for byte.
    pub padding: [u8; 2],
}

impl InterfaceKey {
    #[inline(always)]
    pub const fn new(ifindex: u32, direction: Direction, kind: InterfaceKind) -> Self {
        Self { ifindex, direction: direction as u8, kind: kind as u8, padding: [0; 2] }
    }
}

/// A packet and byte count. One value per CPU in the kernel map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct PacketCounter {
    pub packets: u64,
    pub bytes: u64,
}

impl PacketCounter {
    /// Builds the count of one packet of `bytes` bytes.
    #[inline(always)]
    pub const fn one(bytes: u64) -> Self {
        Self { packets: 1, bytes }
    }

    /// Adds another count, such as another CPU's share or one packet's size, to this one.
    #[inline(always)]
    pub fn merge(&mut self, other: &Self) {
        self.packets += other.packets;
        self.bytes += other.bytes;
    }
}

/// The counter a parsed packet is added to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The client with this address, if the address belongs to a client; otherwise the
    /// interface's [`InterfaceKind::UnknownIpv4`] counter.
    Client { address: u32, bytes: u32 },
    /// The interface's counter of this kind.
    Interface { kind: InterfaceKind, bytes: u32 },
}

/// Picks the counter for a packet seen in `direction`: IPv4 goes to the client on the tunnel
/// side of the packet (the source on rx, the destination on tx), everything else to the
/// interface.
#[inline(always)]
pub fn target(parsed: &Parsed, direction: Direction) -> Target {
    match *parsed {
        Parsed::Ipv4(header) => {
            let address = match direction {
                Direction::Rx => header.source,
                Direction::Tx => header.destination,
            };
            Target::Client { address, bytes: u32::from(header.total_len) }
        }
        Parsed::Other { protocol, l3_len } => {
            let kind = match protocol {
                OtherProtocol::Ipv6 => InterfaceKind::Ipv6,
                OtherProtocol::Arp => InterfaceKind::Arp,
                OtherProtocol::Other => InterfaceKind::Other,
            };
            Target::Interface { kind, bytes: l3_len }
        }
        Parsed::Malformed { len, .. } => {
            Target::Interface { kind: InterfaceKind::Malformed, bytes: len }
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is `repr(C)`, made only of integers, with no implicit padding.
    unsafe impl aya::Pod for super::ClientCounters {}
    unsafe impl aya::Pod for super::InterfaceKey {}
    unsafe impl aya::Pod for super::PacketCounter {}
    unsafe impl aya::Pod for super::DropCounters {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{Ipv4Summary, Malformed};

    const HEADER: Ipv4Summary = Ipv4Summary {
        source: 0x0a4d_0002,
        destination: 0xc612_0002,
        total_len: 1500,
        protocol: 17,
        header_len: 20,
        transport_offset: 20,
    };

    #[test]
    fn rx_goes_to_source_client() {
        assert_eq!(
            target(&Parsed::Ipv4(HEADER), Direction::Rx),
            Target::Client { address: 0x0a4d_0002, bytes: 1500 }
        );
    }

    #[test]
    fn tx_goes_to_destination_client() {
        assert_eq!(
            target(&Parsed::Ipv4(HEADER), Direction::Tx),
            Target::Client { address: 0xc612_0002, bytes: 1500 }
        );
    }

    #[test]
    fn non_ipv4_goes_to_interface() {
        let cases = [
            (OtherProtocol::Ipv6, InterfaceKind::Ipv6),
            (OtherProtocol::Arp, InterfaceKind::Arp),
            (OtherProtocol::Other, InterfaceKind::Other),
        ];
        for (protocol, kind) in cases {
            let parsed = Parsed::Other { protocol, l3_len: 40 };
            assert_eq!(target(&parsed, Direction::Rx), Target::Interface { kind, bytes: 40 });
        }
    }

    #[test]
    fn malformed_goes_to_interface() {
        let parsed = Parsed::Malformed { reason: Malformed::TooShortForIp, len: 0 };
        assert_eq!(
            target(&parsed, Direction::Tx),
            Target::Interface { kind: InterfaceKind::Malformed, bytes: 0 }
        );
    }

    #[test]
    fn record_and_merge_client_counters() {
        let mut cpu0 = ClientCounters::default();
        cpu0.record(Direction::Rx, PacketCounter::one(100));
        cpu0.record(Direction::Rx, PacketCounter::one(28));
        cpu0.record(Direction::Tx, PacketCounter::one(1500));
        let mut cpu1 = ClientCounters::default();
        cpu1.record(Direction::Tx, PacketCounter::one(20));
        let mut total = ClientCounters::default();
        total.merge(&cpu0);
        total.merge(&cpu1);
        assert_eq!(total.rx_packets, 2);
        assert_eq!(total.rx_bytes, 128);
        assert_eq!(total.tx_packets, 2);
        assert_eq!(total.tx_bytes, 1520);
        assert_eq!(total.rx_dropped, DropCounters::default());
    }

    #[test]
    fn record_drop_by_reason() {
        let mut counters = ClientCounters::default();
        counters.record_drop(Direction::Rx, DropReason::RateLimit, PacketCounter::one(100));
        counters.record_drop(Direction::Rx, DropReason::RateLimit, PacketCounter::one(50));
        counters.record_drop(Direction::Rx, DropReason::NotAllowed, PacketCounter::one(28));
        counters.record_drop(Direction::Tx, DropReason::Blocked, PacketCounter::one(1500));
        counters.record_drop(Direction::Tx, DropReason::Spoofed, PacketCounter::one(1500));
        assert_eq!(counters.rx_dropped.rate_limit, PacketCounter { packets: 2, bytes: 150 });
        assert_eq!(counters.rx_dropped.not_allowed, PacketCounter { packets: 1, bytes: 28 });
        assert_eq!(counters.rx_dropped.blocked, PacketCounter::default());
        assert_eq!(counters.tx_dropped.blocked, PacketCounter { packets: 1, bytes: 1500 });
        assert_eq!(counters.tx_dropped.get(DropReason::Spoofed), None);
        assert_eq!(counters.rx_packets + counters.tx_packets, 0);
    }

    #[test]
    fn interface_kind_round_trip() {
        for kind in InterfaceKind::ALL {
            assert_eq!(InterfaceKind::from_u8(kind as u8), Some(kind));
        }
        assert_eq!(InterfaceKind::from_u8(InterfaceKind::COUNT as u8), None);
    }
}
