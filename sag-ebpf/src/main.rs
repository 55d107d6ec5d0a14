//! sag's kernel programs: per-client accounting and enforcement on the tunnel interface.
//!
//! `sag_rx_*` check and count packets arriving from clients, by source address, at XDP or (the
//! `_tc` ones) at TC ingress. `sag_tx_*` run at TC egress, because XDP cannot see packets
//! leaving an interface, and check and count packets to clients by destination address. The
//! `_l3` and `_ethernet` variants differ only in where the IP header starts.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The token bucket needs compare-and-swap. The BPF target spec has no atomic CAS, so core's
// atomic types lack it, but the intrinsic compiles to BPF_CMPXCHG (cpu v3).
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod access;
#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // sag-agent's build script builds the programs for the BPF target. On the host this binary
    // is empty and exists so that `cargo build --workspace` and clippy cover the crate.
}
