//! Project jobs: `cargo xtask setup|test|demo|bench`.
//!
//! Each job first runs `xtask/setup.sh`, which installs what a fresh Debian machine lacks and
//! returns in seconds when everything is present. This crate depends on nothing that setup
//! installs, so that it builds on a fresh machine.

mod bench;
mod demo;
mod setup;
mod test;

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "xtask", about = "Build, test and demo jobs for sag")]
struct Cli {
    #[command(subcommand)]
    job: Job,
}

#[derive(Debug, Subcommand)]
enum Job {
    /// Install the Debian packages, nightly rust-src and bpf-linker that the build and tests need.
    Setup,
    /// Run every check and test: formatting, clippy, host unit tests, BPF_PROG_TEST_RUN tests
    /// and kernel tests in network namespaces. Needs root.
    Test(test::Options),
    /// Run the whole product on real traffic in network namespaces: the agent, two users (one
    /// with `sag-agent connect`, one with wireguard-go), live rates, history and metrics.
    /// Needs root.
    Demo(demo::Options),
    /// Measure the kernel programs (`dataplane`) and the tunnel throughput (`tunnel`) as ratios
    /// against baselines of the same run. Needs root.
    Bench(bench::Options),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.job {
        Job::Setup => setup::run(),
        Job::Test(options) => test::run(&options),
        Job::Demo(options) => demo::run(&options),
        Job::Bench(options) => bench::run(&options),
    }
}

/// Returns the workspace root.
fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_owned()
}

/// Fails unless the process runs as root.
fn require_root(job: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("cargo xtask {job} must run as root: it loads eBPF programs and creates network namespaces");
    }
    Ok(())
}

/// Runs a command from the workspace root and fails if it exits non-zero.
fn run(command: &mut Command) -> Result<()> {
    command.current_dir(workspace_root());
    let status = command.status().with_context(|| format!("failed to start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}
