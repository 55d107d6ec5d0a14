//! `sag-agent run`: the agent process.

use std::{os::unix::fs::PermissionsExt as _, path::PathBuf, sync::Arc};

use anyhow::{Context as _, Result};
use clap::Args;
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

use crate::{
    admin::Admin,
    api,
    billing::Billing,
    clock::{Clock, SystemClock},
    config::Config,
    gateway::{Gateway, GatewaySettings},
    history::Recorder,
    kernel::KernelSync,
    lifecycle::{Enforcement, Lifecycle},
    login_api,
    metrics::{self, MetricsSource},
    notify::Mailer,
    store::Store,
    tls,
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
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let admin = Admin::new(store.clone(), clock.clone(), config.agent.max_bandwidth_kbps);
    let mailer = Arc::new(Mailer::new(&config.mail()).context("invalid [mail] configuration")?);
    let kernel = KernelSync::load(&config.agent.pin_dir).context("failed to load the dataplane")?;
    kernel
        .apply_all(&admin)
        .await
        .context("failed to bring the kernel maps in step with the store")?;
    let kernel = Arc::new(kernel);
    let clock_for_history = clock.clone();
    let login_host = config.login_host().unwrap_or("localhost").to_owned();
    let settings = GatewaySettings {
        endpoint_host: login_host.clone(),
        first_port: config.agent.first_wireguard_port,
        session_idle: std::time::Duration::from_secs(config.agent.session_idle_s),
    };
    let gateway = Arc::new(
        Gateway::new(admin.clone(), kernel.clone(), settings, clock.clone())
            .context("failed to open netlink")?,
    );
    gateway.start().await.context("failed to bring up the instances' tunnels")?;
    let names = vec![login_host, "localhost".to_owned(), "127.0.0.1".to_owned()];
    let configured = config.agent.login_cert.as_deref().zip(config.agent.login_key.as_deref());
    let identity = tls::load_or_create(state_dir, &names, configured)
        .context("failed to load the login API's certificate")?;
    let login_listener = tokio::net::TcpListener::bind(config.agent.login_listen)
        .await
        .with_context(|| format!("failed to listen for logins on {}", config.agent.login_listen))?;
    let metrics_listener =
        tokio::net::TcpListener::bind(config.agent.metrics_listen).await.with_context(|| {
            format!("failed to listen for metrics on {}", config.agent.metrics_listen)
        })?;
    // The socket comes last, so that a start that fails leaves no dead socket behind.
    let listener = api::bind(&socket)
        .with_context(|| format!("failed to listen on the admin socket {}", socket.display()))?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        info!("stopping");
        let _ = stop.send(true);
    });
    let until_stopped = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    tokio::spawn(login_api::serve(
        login_listener,
        identity.config,
        gateway.clone(),
        until_stopped(stopped.clone()),
    ));
    let expiry = tokio::spawn(gateway.clone().run_idle_expiry());
    let source =
        MetricsSource { admin: admin.clone(), kernel: kernel.clone(), gateway: gateway.clone() };
    tokio::spawn(metrics::serve(
        metrics_listener,
        Arc::new(source),
        until_stopped(stopped.clone()),
    ));
    let recorder =
        tokio::spawn(Recorder::new(admin.clone(), kernel.clone(), clock_for_history).run());
    let billing = Billing::new(store.clone(), clock.clone());
    let enforcement = Enforcement { kernel: kernel.clone(), gateway: gateway.clone() };
    let lifecycle = Arc::new(
        Lifecycle::new(admin.clone(), billing.clone(), mailer.clone(), clock.clone())
            .with_enforcement(enforcement),
    );
    let lifecycle_runs = tokio::spawn(lifecycle.clone().run());
    info!(
        store = %config.store_path().display(),
        login_fingerprint = identity.fingerprint,
        "agent started"
    );
    let state = api::AppState {
        admin,
        kernel,
        mailer: mailer.clone(),
        login_server: config.agent.login_server.clone(),
        gateway: gateway.clone(),
        login_fingerprint: identity.fingerprint,
        billing,
        lifecycle,
    };
    api::serve(listener, state, socket.clone(), until_stopped(stopped)).await?;
    expiry.abort();
    recorder.abort();
    lifecycle_runs.abort();
    gateway.shutdown().await;
    store.close().await;
    let _ = std::fs::remove_file(&socket);
    info!("agent stopped");
    Ok(())
}
