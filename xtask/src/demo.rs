//! `cargo xtask demo`: setup, build, then the demo example as root.

use std::process::Command;

use anyhow::Result;
use clap::Args;

#[derive(Debug, Args)]
pub struct Options {
    /// Skip the setup step, for a machine that is known to be ready.
    #[arg(long)]
    no_setup: bool,
    /// Leave the namespaces and the agent running, and print how to look around and how to
    /// remove them.
    #[arg(long)]
    keep: bool,
}

/// Builds the agent and the demo, then runs the demo.
pub fn run(options: &Options) -> Result<()> {
    crate::require_root("demo")?;
    if !options.no_setup {
        crate::setup::run()?;
    }
    crate::run(Command::new("cargo").args([
        "build",
        "--release",
        "-p",
        "sag-agent",
        "--bins",
        "--examples",
    ]))?;
    let target = crate::workspace_root().join("target/release");
    let mut demo = Command::new(target.join("examples/demo"));
    demo.arg(target.join("sag-agent"));
    if options.keep {
        demo.arg("--keep");
    }
    crate::run(&mut demo)
}
