//! VLAN tagging by TC programs, for kernels without 802.1Q support (no `ip link add type vlan`).
//!
//! On an interface, every packet leaving gets tag 100 and every packet arriving loses it. With
//! VLAN transmit offload off (`ethtool -K IFACE txvlan off`), the kernel writes the tag into
//! the frame, so the peer's XDP program parses a real 802.1Q header.

use anyhow::{Context as _, Result};
use aya::{
    programs::{SchedClassifier, TcAttachType},
    Ebpf,
};

/// VLAN ID that the tagging programs use.
pub const TEST_VLAN_ID: u16 = 100;

/// Tagging programs attached to one interface; detached when dropped.
pub struct VlanTagger {
    _ebpf: Ebpf,
}

impl VlanTagger {
    /// Attaches the programs to `interface` in the calling thread's network namespace. At TC
    /// egress they run after any program already attached there.
    pub fn attach(interface: &str) -> Result<Self> {
        let mut ebpf =
            Ebpf::load(super::TEST_OBJECT).context("failed to load the VLAN test object")?;
        for (name, attach_type) in [
            ("sag_test_vlan_push", TcAttachType::Egress),
            ("sag_test_vlan_pop", TcAttachType::Ingress),
        ] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} not found"))?
                .try_into()?;
            program.load().with_context(|| format!("failed to load {name}"))?;
            program
                .attach(interface, attach_type)
                .with_context(|| format!("failed to attach {name} to {interface}"))?;
        }
        Ok(Self { _ebpf: ebpf })
    }
}
