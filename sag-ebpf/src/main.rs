//! sag's kernel programs: per-client accounting and enforcement on the tunnel interface.
//!
//! `sag_rx_*` run at XDP on packets arriving from clients and count them by source address;
//! `sag_tx_*` run as TC egress classifiers on packets leaving toward clients, which XDP cannot
//! see, and count them by destination address. The `_l3` and `_ethernet` variants differ only
//! in where the IP header starts. Both enforce each client's rate limits and blocking; the rx
//! programs also drop spoofed sources and destinations the client's instance does not allow.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The token bucket needs compare-and-swap, which core's atomic types do not offer on the BPF
// target (its spec has no atomic CAS); the intrinsic compiles to BPF_CMPXCHG (cpu v3).
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod access;
#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // The programs are built for the BPF target by sag-agent's build script; on the host this
    // binary exists only so that `cargo build --workspace` and clippy cover the crate.
}
