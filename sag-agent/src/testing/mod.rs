//! Support for sag's own tests, benchmarks and demo: packet builders, network namespaces and
//! TUN devices. Not used by the agent itself.

pub mod frames;
pub mod netns;
pub mod topology;
pub mod traffic;
pub mod tun;
pub mod vlan;
