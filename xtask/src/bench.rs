//! `cargo xtask bench`: setup, build, then the benchmark example as root.

use std::process::Command;

use anyhow::Result;
use clap::{Args, ValueEnum};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Suite {
    /// Per-packet cost of each program against a parse-only baseline, and forwarding rate
    /// with and without the programs.
    Dataplane,
    /// TCP throughput from a wireguard-go client through a gotatun gateway with the programs
    /// and without them, and through a wireguard-go gateway.
    Tunnel,
}

#[derive(Debug, Args)]
pub struct Options {
    /// Benchmark suite to run.
    #[arg(value_enum, default_value = "dataplane")]
    suite: Suite,
    /// Skip the setup step, for a machine that is known to be ready.
    #[arg(long)]
    no_setup: bool,
}

/// Builds the benchmark in release mode and runs it.
pub fn run(options: &Options) -> Result<()> {
    crate::require_root("bench")?;
    if !options.no_setup {
        crate::setup::run()?;
    }
    crate::run(Command::new("cargo").args([
        "build",
        "--release",
        "-p",
        "sag-agent",
        "--examples",
    ]))?;
    let binary = crate::workspace_root().join("target/release/examples/bench");
    let suite = match options.suite {
        Suite::Dataplane => "dataplane",
        Suite::Tunnel => "tunnel",
    };
    crate::run(Command::new(binary).arg(suite))
}
