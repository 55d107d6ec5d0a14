//! Command-line interface of `sag-agent`.

mod dataplane;

use clap::{Parser, Subcommand};

/// sag: a remote-access gateway whose per-client accounting runs in the kernel.
#[derive(Debug, Parser)]
#[command(name = "sag-agent", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Inspect and drive the kernel programs directly.
    #[command(subcommand)]
    Dataplane(dataplane::DataplaneCommand),
}

/// Runs a parsed command line.
///
/// # Errors
/// Returns the command's error, for `main` to print.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Dataplane(command) => dataplane::run(command),
    }
}
