//! The `sag-agent` binary: daemon, admin CLI and client in one.

use std::process::ExitCode;

use clap::Parser as _;

/// Log filter without RUST_LOG: info, except netlink-packet-route's warning about kernel
/// attributes newer than it knows, which every link query on a recent kernel prints.
const DEFAULT_LOG_FILTER: &str = "info,netlink_packet_route=error";

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .init();
    let cli = sag_agent::cli::Cli::parse();
    match sag_agent::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(sag_agent::cli::exit_code(&error))
        }
    }
}
