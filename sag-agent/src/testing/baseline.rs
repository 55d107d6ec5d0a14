//! Baseline programs for the benchmark: they parse a frame as sag's programs do, then pass it.

use anyhow::{Context as _, Result};
use aya::{
    programs::{SchedClassifier, Xdp},
    Ebpf,
};

use crate::dataplane::{test_run_loaded, Program};

/// The loaded baseline programs, one for each of sag's programs.
pub struct Baseline {
    ebpf: Ebpf,
}

/// Returns the name of the baseline program that matches `program`. The TC programs share
/// one baseline per framing, whether on ingress or egress.
fn baseline_name(program: Program) -> &'static str {
    match program {
        Program::RxL3 => "sag_baseline_xdp_l3",
        Program::RxEthernet => "sag_baseline_xdp_ethernet",
        Program::RxL3Tc | Program::TxL3 => "sag_baseline_tc_l3",
        Program::RxEthernetTc | Program::TxEthernet => "sag_baseline_tc_ethernet",
    }
}

impl Baseline {
    /// Loads the baseline programs: XDP and TC, for each framing.
    pub fn load() -> Result<Self> {
        let mut ebpf = Ebpf::load(super::TEST_OBJECT).context("failed to load the test object")?;
        // One program of each baseline: the TC ones serve rx and tx alike.
        for program in [Program::RxL3, Program::RxEthernet, Program::TxL3, Program::TxEthernet] {
            let name = baseline_name(program);
            let loaded = ebpf.program_mut(name).with_context(|| format!("{name} not found"))?;
            if program.is_xdp() {
                let xdp: &mut Xdp = loaded.try_into()?;
                xdp.load().with_context(|| format!("failed to load {name}"))?;
            } else {
                let classifier: &mut SchedClassifier = loaded.try_into()?;
                classifier.load().with_context(|| format!("failed to load {name}"))?;
            }
        }
        Ok(Self { ebpf })
    }

    /// Runs the baseline of `program` on `frame` `repeat` times and returns the last verdict
    /// and the mean run time per packet in nanoseconds, as the kernel measured it.
    pub fn test_run_repeated(
        &self,
        program: Program,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(u32, u64)> {
        let name = baseline_name(program);
        let loaded = self.ebpf.program(name).with_context(|| format!("{name} not found"))?;
        test_run_loaded(loaded, frame, repeat).with_context(|| format!("test run of {name} failed"))
    }
}
