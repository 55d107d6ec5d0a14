//! `sag-agent run`: the agent process.

use std::{os::unix::fs::PermissionsExt as _, path::PathBuf, sync::Arc};

use anyhow::{Context as _, Result};
use clap::Args;
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

use crate::{
    admin::Admin, api, clock::SystemClock, config::Config, kernel::KernelSync, notify::Mailer,
    store::Store,
};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The configuration file (TOML); see deploy/agent.toml.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(args: RunArgs) -> Result<()> {
    let config = Config::load(&args.config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> Result<()> {
    // Everything the agent writes (store, outbox, socket) is for root alone.
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0o077) };
    let state_dir = &config.agent.state_dir;
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("failed to create the state directory {}", state_dir.display()))?;
    // The store has password hashes: only root may read it.
    std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o700))?;
    let socket = config.agent.socket.clone();
    // A second agent on the same socket would take the admin API from the first.
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        anyhow::bail!(
            "another agent is already running on {}; stop it first, or give this one another \
             agent.socket",
            socket.display()
        );
    }
    let store = Store::open_sqlite(&config.store_path()).await?;
    let admin = Admin::new(store.clone(), Arc::new(SystemClock), config.agent.max_bandwidth_kbps);
    let mailer = Mailer::new(&config.mail()).context("invalid [mail] configuration")?;
    let kernel = KernelSync::load(&config.agent.pin_dir).context("failed to load the dataplane")?;
    kernel
        .apply_all(&admin)
        .await
        .context("failed to bring the kernel maps in step with the store")?;
    // The socket comes last, so that a start that fails leaves no dead socket behind.
    let listener = api::bind(&socket)
        .with_context(|| format!("failed to listen on the admin socket {}", socket.display()))?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        info!("stopping");
    };
    info!(store = %config.store_path().display(), "agent started");
    let state = api::AppState {
        admin,
        kernel: Arc::new(kernel),
        mailer: Arc::new(mailer),
        login_server: config.agent.login_server.clone(),
    };
    api::serve(listener, state, socket.clone(), shutdown).await?;
    store.close().await;
    let _ = std::fs::remove_file(&socket);
    info!("agent stopped");
    Ok(())
}
