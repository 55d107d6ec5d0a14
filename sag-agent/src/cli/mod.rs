//! Command-line interface of `sag-agent`.
//!
//! Exit codes: 0 success, 1 failure (the agent unreachable, an internal error), 2 bad command
//! line, 3 invalid value, 4 not found, 5 conflict or refused.

mod admin;
mod billing;
mod client;
mod daemon;
mod dataplane;
mod monitor;
mod table;
mod traffic;

use std::path::PathBuf;

use clap::{CommandFactory as _, Parser, Subcommand};

use crate::config::DEFAULT_SOCKET;

/// sag: a remote-access gateway whose per-client accounting and limits run in the kernel.
#[derive(Debug, Parser)]
#[command(name = "sag-agent", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options of the commands that talk to a running agent.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientOptions {
    /// Admin socket of the agent.
    #[arg(long, global = true, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent: the store, the admin API and the dataplane.
    Run(daemon::RunArgs),
    /// Create, list, show and delete instances.
    Instance(admin::InstanceCommand),
    /// Show and change an instance's network configuration.
    Network(admin::NetworkCommand),
    /// Create, list and change client accounts.
    Account(admin::AccountCommand),
    /// Bills: monthly reports, packages, payments, statements and owners' notice addresses.
    Billing(billing::BillingCommand),
    /// Show an instance's or account's traffic history: the eight monitoring figures.
    Monitor(monitor::MonitorArgs),
    /// Show the live traffic of an instance's accounts: rates, totals and drops by reason.
    Traffic(traffic::TrafficArgs),
    /// Inspect and drive the kernel programs directly.
    #[command(subcommand)]
    Dataplane(dataplane::DataplaneCommand),
    /// Log in to an instance and bring the WireGuard tunnel up (for Linux clients).
    Connect(client::ConnectArgs),
    /// Take the tunnel of `connect` down and log out.
    Disconnect(client::DisconnectArgs),
    /// Log in and write a WireGuard configuration (and QR code) for the official apps.
    ClientConfig(client::ClientConfigArgs),
    /// The background process of `connect` (internal).
    #[command(hide = true)]
    TunnelProcess,
    /// Print a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// Runs a parsed command line.
///
/// # Errors
/// Returns the command's error, for `main` to print and map to an exit code.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    if !matches!(cli.command, Command::Run(_) | Command::TunnelProcess | Command::Connect(_)) {
        // A command whose output goes to a pipe that closes early (`| head`) ends quietly, as
        // Unix tools do, instead of panicking on the failed write. The long-running processes
        // keep Rust's default, which turns a closed socket into an error, not a signal.
        // SAFETY: restoring the default disposition of SIGPIPE has no preconditions.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match cli.command {
        Command::Run(args) => daemon::run(args),
        Command::Instance(command) => admin::run_instance(command),
        Command::Network(command) => admin::run_network(command),
        Command::Account(command) => admin::run_account(command),
        Command::Billing(command) => billing::run(command),
        Command::Monitor(args) => monitor::run(args),
        Command::Dataplane(command) => dataplane::run(command),
        Command::Traffic(args) => traffic::run(args),
        Command::Connect(args) => client::connect(args),
        Command::Disconnect(args) => client::disconnect(args),
        Command::ClientConfig(args) => client::client_config(args),
        Command::TunnelProcess => client::tunnel_process(),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "sag-agent",
                &mut std::io::stdout(),
            );
            Ok(())
        }
    }
}

/// Returns the exit code for an error returned by [`run`].
pub fn exit_code(error: &anyhow::Error) -> u8 {
    if error.downcast_ref::<crate::validation::ValidationError>().is_some() {
        return 3;
    }
    error
        .downcast_ref::<crate::api_client::ClientError>()
        .map_or(1, crate::api_client::ClientError::exit_code)
}
