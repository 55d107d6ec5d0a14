//! Map types and pure packet logic shared by sag's kernel programs and its agent.
//!
//! Everything here is `no_std` and free of kernel helpers, so that the same parsing and
//! accounting code runs inside the XDP and TC programs and in host unit tests.
#![no_std]

pub mod counters;
pub mod packet;
pub mod policy;

/// Maximum number of client addresses the kernel maps hold on one box.
///
/// An instance has at most 1,000 accounts, so this leaves room for 16 full instances. A
/// client costs about 380 bytes of record plus 112 bytes of counters per CPU.
pub const MAX_CLIENTS: u32 = 16_384;

/// Maximum number of tunnel interfaces bound to instances.
pub const MAX_TUNNELS: u32 = 1_024;

/// Maximum number of per-interface counter entries: 2 directions times
/// [`counters::InterfaceKind::COUNT`] kinds, for up to 85 interfaces.
pub const MAX_INTERFACE_COUNTERS: u32 = 1_024;

/// Names of the maps in the eBPF object, which are also their file names under the pin directory.
pub mod map_names {
    /// Per-CPU array of [`crate::counters::ClientCounters`], indexed by a client's slot.
    pub const CLIENT_COUNTERS: &str = "SAG_CLIENT_COUNTERS";
    /// Per-CPU hash map from [`crate::counters::InterfaceKey`] to
    /// [`crate::counters::PacketCounter`].
    pub const INTERFACE_COUNTERS: &str = "SAG_INTERFACE_COUNTERS";
    /// Hash map from client IPv4 address (host-order `u32`) to [`crate::policy::Client`].
    pub const CLIENTS: &str = "SAG_CLIENTS";
    /// Hash map from tunnel ifindex to [`crate::policy::Tunnel`].
    pub const TUNNELS: &str = "SAG_TUNNELS";
}

/// Names of the programs in the eBPF object.
pub mod program_names {
    /// XDP program counting packets from clients on a layer-3 (TUN) device.
    pub const RX_L3: &str = "sag_rx_l3";
    /// XDP program counting packets from clients on an Ethernet device.
    pub const RX_ETHERNET: &str = "sag_rx_ethernet";
    /// TC ingress classifier doing the work of [`RX_L3`], for devices where XDP runs only in
    /// generic mode.
    pub const RX_L3_TC: &str = "sag_rx_l3_tc";
    /// TC ingress classifier doing the work of [`RX_ETHERNET`].
    pub const RX_ETHERNET_TC: &str = "sag_rx_ethernet_tc";
    /// TC egress classifier counting packets to clients on a layer-3 (TUN) device.
    pub const TX_L3: &str = "sag_tx_l3";
    /// TC egress classifier counting packets to clients on an Ethernet device.
    pub const TX_ETHERNET: &str = "sag_tx_ethernet";
}
