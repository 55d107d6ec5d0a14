//! sag's kernel programs: per-client packet and byte accounting on the tunnel interface.
//!
//! `sag_rx_*` run at XDP on packets arriving from clients and count them by source address;
//! `sag_tx_*` run as TC egress classifiers on packets leaving toward clients, which XDP cannot
//! see, and count them by destination address. The `_l3` and `_ethernet` variants differ only
//! in where the IP header starts. Every program passes every packet.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // The programs are built for the BPF target by sag-agent's build script; on the host this
    // binary exists only so that `cargo build --workspace` and clippy cover the crate.
}
