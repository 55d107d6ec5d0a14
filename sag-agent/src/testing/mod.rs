//! Support for sag's own tests, benchmarks and demo: packet builders, network namespaces and
//! TUN devices. Not used by the agent itself.

pub mod baseline;
pub mod frames;
pub mod lab;
pub mod netns;
pub mod topology;
pub mod traffic;
pub mod tun;
pub mod vlan;
pub mod wireguard;

/// The test object built from sag-ebpf by this crate's build script: VLAN tagging and the
/// benchmark's baseline programs.
static TEST_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sag-test"));
