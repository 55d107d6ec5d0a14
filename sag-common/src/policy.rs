//! Enforcement: client, instance and tunnel records in the kernel maps, the token bucket
//! maths, and the decisions the programs take on a packet.

/// Smallest per-account bandwidth, in kbit/s.
pub const MIN_BANDWIDTH_KBPS: u32 = 1;
/// Largest per-account bandwidth without a box-wide override, in kbit/s.
pub const MAX_ACCOUNT_BANDWIDTH_KBPS: u32 = 2_000;
/// Highest per-account ceiling an admin may configure for the box: 10 Gbit/s, in kbit/s.
pub const MAX_BOX_BANDWIDTH_KBPS: u32 = 10_000_000;
/// MTU that the default burst is sized for, in bytes: the largest IPv4 packet on Ethernet.
pub const BURST_MTU_BYTES: u64 = 1_500;
/// Smallest burst, in bytes: a bucket smaller than one full packet would never pass it.
pub const MIN_BURST_BYTES: u64 = BURST_MTU_BYTES;
/// Time the default burst covers at the configured rate, in milliseconds.
///
/// TCP stalls for a retransmission timeout (200 ms at least on Linux) after the bucket runs
/// dry, and only a bucket that contains more than that stall's refill keeps goodput near the
/// rate. Measured with iperf3 through the test gateway (BBR and CUBIC alike): a 100 ms bucket
/// gave 44-49% of the rate at 512 and 2,000 kbit/s, 200 ms gave 84-94%, 500 ms 97-99%.
pub const DEFAULT_BURST_MS: u64 = 500;
/// Picoseconds per second, the unit of [`RateLimit::picos_per_byte`].
const PICOS_PER_SECOND: u64 = 1_000_000_000_000;

/// Client flag: the account is disabled.
pub const CLIENT_BLOCKED: u32 = 1;
/// Client flag: the client's instance is stopped or locked.
pub const INSTANCE_BLOCKED: u32 = 2;
/// Client flag: the client may reach other clients of its instance.
pub const CLIENT_TO_CLIENT: u32 = 4;
/// Client flag: the client may reach only its instance's allowed destinations (and, with
/// [`CLIENT_TO_CLIENT`], its instance's clients). Without it, any destination.
pub const ENFORCE_DESTINATIONS: u32 = 8;

/// Most private CIDR blocks an instance has for client addresses.
pub const MAX_POOL_BLOCKS: usize = 5;
/// Most allowed destination blocks an instance has.
pub const MAX_ALLOWED_DESTINATIONS: usize = 32;

/// A token bucket, stored as the time it takes to send one byte and the depth as time.
/// All zero means unlimited.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// Time one byte takes at the rate, in picoseconds; 0 means unlimited.
    pub picos_per_byte: u64,
    /// Bucket depth, as the time the burst takes at the rate, in nanoseconds.
    pub burst_ns: u64,
}

impl RateLimit {
    /// No limit.
    pub const UNLIMITED: Self = Self { picos_per_byte: 0, burst_ns: 0 };

    /// Builds a limit of `rate_kbps` kbit/s with a bucket of `burst_bytes` bytes. A rate of 0
    /// means unlimited.
    pub const fn new(rate_kbps: u32, burst_bytes: u64) -> Self {
        if rate_kbps == 0 {
            return Self::UNLIMITED;
        }
        let bytes_per_second = rate_kbps as u64 * 1_000 / 8;
        let picos_per_byte = PICOS_PER_SECOND / bytes_per_second;
        Self { picos_per_byte, burst_ns: burst_bytes * picos_per_byte / 1_000 }
    }

    /// Builds a limit of `rate_kbps` kbit/s with the default burst for that rate.
    pub const fn with_default_burst(rate_kbps: u32) -> Self {
        Self::new(rate_kbps, default_burst_bytes(rate_kbps))
    }

    /// Returns whether this is no limit at all.
    #[inline(always)]
    pub const fn is_unlimited(&self) -> bool {
        self.picos_per_byte == 0
    }

    /// Returns the time `bytes` bytes take at the rate, in nanoseconds.
    #[inline(always)]
    pub const fn cost_ns(&self, bytes: u64) -> u64 {
        bytes * self.picos_per_byte / 1_000
    }
}

/// Returns the default bucket depth for a rate, in bytes: what the rate sends in
/// [`DEFAULT_BURST_MS`], but at least two full packets, so that back-to-back segments pass
/// at the lowest rates.
pub const fn default_burst_bytes(rate_kbps: u32) -> u64 {
    let at_rate = rate_kbps as u64 * 1_000 / 8 * DEFAULT_BURST_MS / 1_000;
    let floor = 2 * BURST_MTU_BYTES;
    if at_rate > floor {
        at_rate
    } else {
        floor
    }
}

/// Decides on one packet of `bytes` bytes arriving at `now_ns`, for a bucket whose
/// theoretical arrival time (the time at which it would be full again) is `tat_ns`.
///
/// This is the generic cell rate algorithm, which is a token bucket kept as one timestamp, so
/// that CPUs can share it with a single compare-and-swap. Returns the new arrival time if the
/// packet fits in the bucket, or `None` if it must be dropped. A dropped packet takes no
/// tokens.
///
/// A packet that costs more than the whole bucket (a segmentation-offload packet of many
/// segments at a low rate) would never fit. It passes when the bucket is full, and its whole
/// cost is taken, so the bucket owes the excess and the packets after it wait until the rate
/// has paid it back. Over time the rate stays exact.
#[inline(always)]
pub fn admit(tat_ns: u64, now_ns: u64, limit: &RateLimit, bytes: u64) -> Option<u64> {
    let start = if tat_ns > now_ns { tat_ns } else { now_ns };
    let cost = limit.cost_ns(bytes);
    let needed = if cost > limit.burst_ns { limit.burst_ns } else { cost };
    if start - now_ns + needed > limit.burst_ns {
        return None;
    }
    Some(start + cost)
}

/// An IPv4 CIDR block as network and mask, host-order integers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Block {
    pub network: u32,
    pub mask: u32,
}

impl Block {
    /// Builds the block of `prefix_len` bits around `address`; host bits are cleared.
    pub const fn new(address: u32, prefix_len: u8) -> Self {
        let mask = if prefix_len == 0 { 0 } else { u32::MAX << (32 - prefix_len as u32) };
        Self { network: address & mask, mask }
    }

    /// Returns whether the block contains `address`.
    #[inline(always)]
    pub const fn contains(&self, address: u32) -> bool {
        address & self.mask == self.network
    }
}

/// Returns whether one of the first `count` blocks contains `address`. The loop is bounded by
/// the array length, as the verifier requires.
#[inline(always)]
pub fn any_contains<const N: usize>(blocks: &[Block; N], count: u32, address: u32) -> bool {
    let mut index = 0;
    while index < N {
        if index as u32 >= count {
            return false;
        }
        if blocks[index].contains(address) {
            return true;
        }
        index += 1;
    }
    false
}

/// A client address's record: the client's own settings and a copy of its instance's, so that
/// the programs find all they need with one lookup. The agent writes it whole; the programs
/// only move the two bucket timestamps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Client {
    /// Index of the client's per-CPU counters.
    pub slot: u32,
    /// Kernel number of the client's instance; 0 for none.
    pub instance: u32,
    /// [`CLIENT_BLOCKED`], [`INSTANCE_BLOCKED`], [`CLIENT_TO_CLIENT`],
    /// [`ENFORCE_DESTINATIONS`].
    pub flags: u32,
    /// Ifindex of the tunnel the instance is bound to; 0 for none.
    pub tunnel_ifindex: u32,
    /// Limit on traffic from the client.
    pub rx: RateLimit,
    /// Limit on traffic to the client.
    pub tx: RateLimit,
    /// Theoretical arrival time of the rx bucket, in `bpf_ktime_get_coarse_ns` nanoseconds.
    pub rx_tat_ns: u64,
    /// Theoretical arrival time of the tx bucket.
    pub tx_tat_ns: u64,
    /// Number of valid entries in `pools`.
    pub pool_count: u32,
    /// Number of valid entries in `allowed`.
    pub allowed_count: u32,
    /// The instance's client address blocks.
    pub pools: [Block; MAX_POOL_BLOCKS],
    /// The instance's allowed destination blocks.
    pub allowed: [Block; MAX_ALLOWED_DESTINATIONS],
}

/// A tunnel interface's record, keyed by ifindex: only consulted for packets whose source is
/// not a client of the tunnel, to tell spoofed from unknown.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tunnel {
    /// Kernel number of the instance whose clients use this tunnel.
    pub instance: u32,
}

/// Reason a packet was dropped.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Over the client's bandwidth.
    RateLimit = 0,
    /// The account is disabled, or the instance stopped or locked.
    Blocked = 1,
    /// The destination is not in the instance's allowed destinations.
    NotAllowed = 2,
    /// From a tunnel, with a source that is not a client of the tunnel's instance.
    Spoofed = 3,
}

impl DropReason {
    /// Number of reasons.
    pub const COUNT: usize = 4;
    /// All reasons.
    pub const ALL: [Self; Self::COUNT] =
        [Self::RateLimit, Self::Blocked, Self::NotAllowed, Self::Spoofed];

    /// Returns the reason's name as it appears in the agent's output and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Self::RateLimit => "rate_limit",
            Self::Blocked => "blocked",
            Self::NotAllowed => "not_allowed",
            Self::Spoofed => "spoofed",
        }
    }
}

/// Kind of source of a packet, seen from the tunnel it arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A client of the tunnel's instance, or a client of no bound tunnel on an unbound one.
    Client,
    /// Not a client, on a tunnel bound to no instance: counted as unknown and passed.
    Unknown,
    /// Not a client of the tunnel's instance: dropped.
    Spoofed,
}

/// Classifies the source of a packet that arrived on tunnel `ifindex`. `client_tunnel` is the
/// tunnel ifindex in the source's client record, if the source is a client (0 when the
/// client's instance has no tunnel). `arrival_bound` returns whether the tunnel is bound to an
/// instance; it costs a lookup, so it is called only when the result depends on it.
#[inline(always)]
pub fn classify_source(
    client_tunnel: Option<u32>,
    ifindex: u32,
    arrival_bound: impl FnOnce() -> bool,
) -> Source {
    match client_tunnel {
        Some(tunnel) if tunnel != 0 && tunnel == ifindex => Source::Client,
        Some(0) => {
            if arrival_bound() {
                Source::Spoofed
            } else {
                Source::Client
            }
        }
        Some(_) => Source::Spoofed,
        None => {
            if arrival_bound() {
                Source::Spoofed
            } else {
                Source::Unknown
            }
        }
    }
}

/// Kind of destination of a client's packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// Inside one of the client's instance's address blocks: another client.
    SameInstance,
    /// Inside one of the instance's allowed destination blocks.
    Allowed,
    /// Anything else.
    Other,
}

/// Classifies the destination of a packet from `client`. The instance's own blocks come first,
/// so that the client-to-client setting decides for them even if an allowed block covers them.
#[inline(always)]
pub fn classify_destination(client: &Client, destination: u32) -> Destination {
    if any_contains(&client.pools, client.pool_count, destination) {
        Destination::SameInstance
    } else if any_contains(&client.allowed, client.allowed_count, destination) {
        Destination::Allowed
    } else {
        Destination::Other
    }
}

/// Returns whether a client with `flags` may send to `destination`.
#[inline(always)]
pub fn destination_allowed(flags: u32, destination: Destination) -> bool {
    if flags & ENFORCE_DESTINATIONS == 0 {
        return true;
    }
    match destination {
        Destination::SameInstance => flags & CLIENT_TO_CLIENT != 0,
        Destination::Allowed => true,
        Destination::Other => false,
    }
}

/// Returns whether a client's packets are dropped as blocked.
#[inline(always)]
pub const fn is_blocked(flags: u32) -> bool {
    flags & (CLIENT_BLOCKED | INSTANCE_BLOCKED) != 0
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is `repr(C)`, made only of integers and byte arrays, with no implicit
    // padding.
    unsafe impl aya::Pod for super::Client {}
    unsafe impl aya::Pod for super::Tunnel {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_of_64_kbps() {
        // 8,000 bytes per second: 125 microseconds a byte.
        let limit = RateLimit::new(64, 3_000);
        assert_eq!(limit.picos_per_byte, 125_000_000);
        assert_eq!(limit.burst_ns, 375_000_000);
        assert_eq!(limit.cost_ns(1_500), 187_500_000);
    }

    #[test]
    fn rate_edges() {
        assert!(RateLimit::new(0, 3_000).is_unlimited());
        // 1 kbit/s: 125 bytes a second, 8 ms a byte.
        assert_eq!(RateLimit::new(MIN_BANDWIDTH_KBPS, 1).picos_per_byte, 8_000_000_000);
        // 2,000 kbit/s: 250,000 bytes a second, 4 microseconds a byte.
        assert_eq!(RateLimit::new(MAX_ACCOUNT_BANDWIDTH_KBPS, 1).picos_per_byte, 4_000_000);
        // 10 Gbit/s: 800 picoseconds a byte; a 1,500-byte packet takes 1.2 microseconds.
        let fastest = RateLimit::new(MAX_BOX_BANDWIDTH_KBPS, 1_500);
        assert_eq!(fastest.picos_per_byte, 800);
        assert_eq!(fastest.cost_ns(1_500), 1_200);
        assert_eq!(fastest.burst_ns, 1_200);
    }

    #[test]
    fn default_burst_edges() {
        // Below 48 kbit/s, 500 ms of traffic is less than two full packets.
        assert_eq!(default_burst_bytes(MIN_BANDWIDTH_KBPS), 3_000);
        assert_eq!(default_burst_bytes(48), 3_000);
        assert_eq!(default_burst_bytes(49), 3_062);
        assert_eq!(default_burst_bytes(MAX_ACCOUNT_BANDWIDTH_KBPS), 125_000);
        assert_eq!(default_burst_bytes(100_000), 6_250_000);
        assert_eq!(default_burst_bytes(MAX_BOX_BANDWIDTH_KBPS), 625_000_000);
    }

    #[test]
    fn admit_oversized_packet_only_from_full_bucket() {
        // 8,000 bytes/s with a 3,000-byte bucket (375 ms), and a packet of 4,500 bytes
        // (562.5 ms): it passes only when the bucket is full, and the bucket then owes 187.5 ms.
        let limit = RateLimit::new(64, 3_000);
        let now = 1_000_000_000;
        let tat = admit(0, now, &limit, 4_500).unwrap();
        assert_eq!(tat, now + 562_500_000);
        assert_eq!(admit(tat, now + 187_500_000, &limit, 1), None, "nothing while in debt");
        // One byte (125 us) fits once the debt and that byte are paid back.
        assert_eq!(admit(tat, now + 187_625_000, &limit, 1), Some(tat + 125_000));
        assert_eq!(admit(tat, now + 187_624_999, &limit, 1), None);
        // From a bucket 1 ns short of full, the oversized packet waits.
        assert_eq!(admit(now + 1, now, &limit, 4_500), None);
        assert_eq!(admit(now, now, &limit, 4_500), Some(now + 562_500_000));
    }

    #[test]
    fn admit_full_bucket_passes_burst_then_drops() {
        // 8,000 bytes/s with a 3,000-byte bucket: two 1,500-byte packets pass at once.
        let limit = RateLimit::new(64, 3_000);
        let now = 1_000_000_000;
        let tat = admit(0, now, &limit, 1_500).unwrap();
        assert_eq!(tat, now + 187_500_000);
        let tat = admit(tat, now, &limit, 1_500).unwrap();
        assert_eq!(tat, now + 375_000_000);
        assert_eq!(admit(tat, now, &limit, 1_500), None);
        assert_eq!(admit(tat, now, &limit, 1), None);
    }

    #[test]
    fn admit_refills_at_rate() {
        let limit = RateLimit::new(64, 3_000);
        let now = 1_000_000_000;
        let full = now + 375_000_000;
        // One byte's worth of time later, exactly one byte fits.
        assert_eq!(admit(full, now + 125_000, &limit, 1), Some(full + 125_000));
        assert_eq!(admit(full, now + 124_999, &limit, 1), None);
        // After the whole burst time, the bucket is full again.
        assert_eq!(admit(full, full, &limit, 3_000), Some(full + 375_000_000));
        // A packet deeper than the bucket passes from a full bucket only.
        assert_eq!(admit(full, full, &limit, 3_001), Some(full + 375_125_000));
        assert_eq!(admit(full, full - 1, &limit, 3_001), None);
    }

    #[test]
    fn admit_sustained_rate_is_exact() {
        // Offer 1,000-byte packets at twice the rate for 10 simulated seconds.
        let limit = RateLimit::new(64, 3_000);
        let gap_ns = 62_500_000;
        let mut tat = 0;
        let mut passed = 0u64;
        for n in 0..160u64 {
            let now = 1_000_000_000 + n * gap_ns;
            if let Some(next) = admit(tat, now, &limit, 1_000) {
                tat = next;
                passed += 1;
            }
        }
        // The full bucket passes 3 packets at 0 s. Then one fits every 125 ms (1,000 bytes at
        // 8,000 bytes/s), at 0.125 s to 9.875 s: 79 more.
        assert_eq!(passed, 82);
    }

    #[test]
    fn source_classification() {
        let bound = || true;
        let unbound = || false;
        assert_eq!(classify_source(Some(7), 7, bound), Source::Client);
        assert_eq!(classify_source(Some(7), 8, bound), Source::Spoofed);
        assert_eq!(classify_source(Some(7), 8, unbound), Source::Spoofed);
        assert_eq!(classify_source(Some(0), 8, unbound), Source::Client);
        assert_eq!(classify_source(Some(0), 8, bound), Source::Spoofed);
        assert_eq!(classify_source(None, 8, unbound), Source::Unknown);
        assert_eq!(classify_source(None, 8, bound), Source::Spoofed);
    }

    #[test]
    fn source_classification_skips_lookup_for_own_tunnel() {
        let lookup = || panic!("the tunnel lookup must not run");
        assert_eq!(classify_source(Some(7), 7, lookup), Source::Client);
    }

    #[test]
    fn block_edges() {
        let block = Block::new(0x0a4d_0005, 24);
        assert_eq!(block, Block { network: 0x0a4d_0000, mask: 0xffff_ff00 });
        assert!(block.contains(0x0a4d_0000));
        assert!(block.contains(0x0a4d_00ff));
        assert!(!block.contains(0x0a4d_0100));
        assert!(!block.contains(0x0a4c_ffff));
        assert!(Block::new(0xc0a8_0101, 0).contains(0x0102_0304));
        let host = Block::new(0xc0a8_0101, 32);
        assert!(host.contains(0xc0a8_0101));
        assert!(!host.contains(0xc0a8_0102));
    }

    #[test]
    fn any_contains_respects_count() {
        let mut blocks = [Block::default(); 3];
        blocks[0] = Block::new(0x0a00_0000, 8);
        blocks[1] = Block::new(0xc612_0000, 16);
        assert!(any_contains(&blocks, 2, 0xc612_0102));
        assert!(!any_contains(&blocks, 1, 0xc612_0102));
        // The zeroed third entry would match everything, but lies beyond the count.
        assert!(!any_contains(&blocks, 2, 0x0102_0304));
        assert!(any_contains(&blocks, 3, 0x0102_0304));
        assert!(!any_contains(&blocks, 0, 0x0a00_0001));
    }

    fn client_with_policy(flags: u32) -> Client {
        let mut client = Client { flags, pool_count: 1, allowed_count: 2, ..Client::default() };
        client.pools[0] = Block::new(0x0a4d_0000, 24);
        client.allowed[0] = Block::new(0xc612_0000, 24);
        // An allowed block that also covers the pool: the client-to-client setting still wins.
        client.allowed[1] = Block::new(0x0a00_0000, 8);
        client
    }

    #[test]
    fn destination_rules() {
        let enforced = client_with_policy(ENFORCE_DESTINATIONS);
        assert_eq!(classify_destination(&enforced, 0x0a4d_0003), Destination::SameInstance);
        assert_eq!(classify_destination(&enforced, 0xc612_0002), Destination::Allowed);
        assert_eq!(classify_destination(&enforced, 0x0a01_0001), Destination::Allowed);
        assert_eq!(classify_destination(&enforced, 0xcb00_7107), Destination::Other);
        assert!(destination_allowed(ENFORCE_DESTINATIONS, Destination::Allowed));
        assert!(!destination_allowed(ENFORCE_DESTINATIONS, Destination::Other));
        assert!(!destination_allowed(ENFORCE_DESTINATIONS, Destination::SameInstance));
        let with_peers = ENFORCE_DESTINATIONS | CLIENT_TO_CLIENT;
        assert!(destination_allowed(with_peers, Destination::SameInstance));
        assert!(!destination_allowed(with_peers, Destination::Other));
        assert!(destination_allowed(0, Destination::Other));
        assert!(destination_allowed(0, Destination::SameInstance));
    }

    #[test]
    fn blocked_by_client_or_instance() {
        assert!(!is_blocked(0));
        assert!(is_blocked(CLIENT_BLOCKED));
        assert!(is_blocked(INSTANCE_BLOCKED));
        assert!(!is_blocked(CLIENT_TO_CLIENT | ENFORCE_DESTINATIONS));
    }
}
