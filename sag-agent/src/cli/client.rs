//! The end user's side: `sag-agent connect`, `disconnect` and `client-config`.
//!
//! `connect` logs in over TLS, pinning the certificate fingerprint from the instance's
//! credentials. It then starts a background process that runs a WireGuard device (gotatun),
//! and returns once the tunnel has completed a handshake with the gateway. With `--foreground`,
//! `connect` runs the tunnel itself instead. The tunnel process keeps a state file in the run
//! directory, which `disconnect` reads to stop it. On its way out, the process logs out and
//! restores the DNS configuration it changed.
//!
//! `client-config` logs in with a persistent session and writes a WireGuard configuration
//! file for other clients, such as wg-quick or the official apps.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr},
    os::unix::{fs::OpenOptionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use base64::{engine::general_purpose::STANDARD, Engine as _};
use clap::Args;
use gotatun::{
    device::Peer,
    x25519::{PublicKey, StaticSecret},
};
use serde::{Deserialize, Serialize};

use crate::{
    gateway::{LoginReply, LoginRequest, LogoutRequest},
    login_api,
    netlink::{self, Netlink},
    tls,
    wgconfig::{ClientConfig, KeyPair},
};

/// Default name of the client's tunnel interface.
pub const DEFAULT_CLIENT_INTERFACE: &str = "sag0";
/// Default directory of the client's state files.
pub const DEFAULT_CLIENT_RUN_DIR: &str = "/run/sag-client";
/// Environment variable that may contain the password, for scripts.
pub const PASSWORD_ENV: &str = "SAG_PASSWORD";
/// Maximum wait for the tunnel's first WireGuard handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// Time `disconnect` waits for the tunnel process to end.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout of the logout request that the tunnel process sends before it exits.
const LOGOUT_TIMEOUT: Duration = Duration::from_secs(5);

/// Login server, instance and credentials, shared by `connect` and `client-config`.
#[derive(Debug, Clone, Args)]
pub struct LoginArgs {
    /// Login server as `HOST:PORT`, from the credentials email.
    #[arg(long, value_name = "HOST:PORT")]
    server: String,
    /// SHA-256 fingerprint of the server's certificate (`sag-agent instance show` prints it).
    #[arg(long, env = "SAG_FINGERPRINT", value_name = "sha256:HEX")]
    fingerprint: String,
    /// Instance ID, `sag-...`.
    #[arg(long, value_name = "ID")]
    instance: String,
    /// The username.
    #[arg(long, value_name = "NAME")]
    username: String,
    /// File whose first line is the password. Without it, the password comes from the
    /// SAG_PASSWORD environment variable or, if that is unset, a prompt.
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
}

/// Arguments of `sag-agent connect`.
#[derive(Debug, Args)]
pub struct ConnectArgs {
    #[command(flatten)]
    login: LoginArgs,
    /// Name of the tunnel interface.
    #[arg(long, default_value = DEFAULT_CLIENT_INTERFACE, value_name = "NAME")]
    interface: String,
    /// Directory for the state file that `disconnect` reads, the tunnel log and the DNS backup.
    #[arg(long, default_value = DEFAULT_CLIENT_RUN_DIR, value_name = "DIR")]
    run_dir: PathBuf,
    /// Resolver configuration file to point at the instance's DNS servers while connected.
    #[arg(long, default_value = "/etc/resolv.conf", value_name = "FILE")]
    resolv_conf: PathBuf,
    /// Leave the DNS configuration alone.
    #[arg(long)]
    no_dns: bool,
    /// Stay in the foreground until interrupted, instead of returning once connected.
    #[arg(long)]
    foreground: bool,
}

/// Arguments of `sag-agent disconnect`.
#[derive(Debug, Args)]
pub struct DisconnectArgs {
    /// Name of the tunnel interface.
    #[arg(long, default_value = DEFAULT_CLIENT_INTERFACE, value_name = "NAME")]
    interface: String,
    /// Directory of the state file that `connect` wrote.
    #[arg(long, default_value = DEFAULT_CLIENT_RUN_DIR, value_name = "DIR")]
    run_dir: PathBuf,
}

/// Arguments of `sag-agent client-config`.
#[derive(Debug, Args)]
pub struct ClientConfigArgs {
    #[command(flatten)]
    login: LoginArgs,
    /// WireGuard configuration file to write, with mode 0600 because it contains the private
    /// key.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Also write the configuration as a QR code, to the --out path with the extension .png.
    #[arg(long)]
    qr: bool,
}

/// Login result and settings that `connect` passes to the tunnel process as JSON on its
/// standard input.
#[derive(Serialize, Deserialize)]
struct TunnelOrder {
    private_key: String,
    reply: LoginReply,
    server: String,
    pin: String,
    instance: String,
    username: String,
    interface: String,
    run_dir: PathBuf,
    resolv_conf: Option<PathBuf>,
}

/// Contents of the tunnel process's state file, which `disconnect` reads.
#[derive(Serialize, Deserialize)]
struct TunnelState {
    pid: u32,
    address: Ipv4Addr,
    instance: String,
    username: String,
    server: String,
}

fn state_path(run_dir: &Path, interface: &str) -> PathBuf {
    run_dir.join(format!("{interface}.json"))
}

fn dns_backup_path(run_dir: &Path, interface: &str) -> PathBuf {
    run_dir.join(format!("{interface}.resolv.conf"))
}

/// Reads the password from the password file, else from [`PASSWORD_ENV`], else from a prompt
/// without echo.
fn read_password(login: &LoginArgs) -> Result<String> {
    if let Some(path) = &login.password_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read the password file {}", path.display()))?;
        return Ok(text.lines().next().unwrap_or_default().to_owned());
    }
    if let Ok(password) = std::env::var(PASSWORD_ENV) {
        return Ok(password);
    }
    rpassword::prompt_password(format!("Password of {}: ", login.username))
        .context("failed to read the password from the terminal")
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// Generates a key pair and logs in with its public key. Returns the key pair, the reply and
/// the parsed certificate fingerprint.
fn log_in(login: &LoginArgs, persistent: bool) -> Result<(KeyPair, LoginReply, [u8; 32])> {
    let pin = tls::parse_fingerprint(&login.fingerprint)?;
    let password = read_password(login)?;
    let keys = KeyPair::generate();
    let request = LoginRequest {
        instance: login.instance.clone(),
        username: login.username.clone(),
        password,
        public_key: keys.public_base64(),
        persistent,
    };
    let reply: LoginReply = runtime()?
        .block_on(login_api::call(&login.server, pin, "/v1/login", &request))
        .with_context(|| format!("login to {} failed", login.server))?;
    Ok((keys, reply, pin))
}

/// Runs `sag-agent connect`.
pub fn connect(args: ConnectArgs) -> Result<()> {
    let state = state_path(&args.run_dir, &args.interface);
    if let Ok(text) = std::fs::read_to_string(&state) {
        if let Ok(running) = serde_json::from_str::<TunnelState>(&text) {
            if process_alive(running.pid) {
                bail!(
                    "already connected as {} on {} (process {}); run `sag-agent disconnect \
                     --interface {}` first",
                    running.address,
                    args.interface,
                    running.pid,
                    args.interface
                );
            }
        }
    }

    let (keys, reply, pin) = log_in(&args.login, false)?;
    let order = TunnelOrder {
        private_key: keys.private_base64(),
        reply,
        server: args.login.server.clone(),
        pin: pin.iter().map(|byte| format!("{byte:02x}")).collect(),
        instance: args.login.instance.clone(),
        username: args.login.username.clone(),
        interface: args.interface.clone(),
        run_dir: args.run_dir.clone(),
        resolv_conf: (!args.no_dns).then(|| args.resolv_conf.clone()),
    };
    let address = order.reply.address;
    if args.foreground {
        return run_tunnel(order, &mut std::io::stdout());
    }

    create_run_dir(&args.run_dir)?;
    let log_path = args.run_dir.join(format!("{}.log", args.interface));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .with_context(|| format!("failed to open the tunnel log {}", log_path.display()))?;
    let mut child = Command::new(std::env::current_exe()?)
        .arg("tunnel-process")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("failed to start the tunnel process")?;

    // The tunnel process reports one line: `ready ADDRESS` or `error MESSAGE`.
    let mut stdin = child.stdin.take().expect("piped");
    stdin.write_all(&serde_json::to_vec(&order)?)?;
    drop(stdin);
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    match line.trim_end().split_once(' ') {
        Some(("ready", _)) => {
            println!(
                "Connected to intranet as {address} (instance {}, via {})",
                args.login.instance, order.reply.endpoint
            );
            Ok(())
        }
        Some(("error", message)) => {
            let _ = child.wait();
            bail!("{message}")
        }
        _ => {
            let status = child.wait()?;
            bail!("the tunnel process ended ({status}); see {}", log_path.display())
        }
    }
}

/// Runs the hidden `tunnel-process` command. It reads a [`TunnelOrder`] as JSON on standard
/// input and reports `ready ADDRESS` or `error MESSAGE` on standard output.
pub fn tunnel_process() -> Result<()> {
    let mut text = String::new();
    std::io::stdin().read_to_string(&mut text)?;
    let order: TunnelOrder = serde_json::from_str(&text).context("invalid tunnel order")?;
    let mut stdout = std::io::stdout();
    if let Err(error) = run_tunnel(order, &mut stdout) {
        let message = format!("{error:#}").replace('\n', " ");
        let _ = writeln!(stdout, "error {message}");
        return Err(error);
    }
    Ok(())
}

fn create_run_dir(run_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("failed to create the run directory {}", run_dir.display()))?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(run_dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(())
}

fn decode_key(field: &str, text: &str) -> Result<[u8; 32]> {
    STANDARD
        .decode(text)
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .with_context(|| format!("invalid {field} {text:?}: must be 32 bytes in base64"))
}

/// Brings the tunnel up, reports `ready ADDRESS` on `report`, and runs until SIGTERM or
/// SIGINT. Then it logs out, restores DNS, takes the tunnel down and removes the state file.
fn run_tunnel(order: TunnelOrder, report: &mut impl std::io::Write) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        create_run_dir(&order.run_dir)?;
        let reply = &order.reply;
        let secret = StaticSecret::from(decode_key("private key", &order.private_key)?);
        let gateway = PublicKey::from(decode_key("gateway_public_key", &reply.gateway_public_key)?);
        let endpoint = tokio::net::lookup_host(&reply.endpoint)
            .await
            .with_context(|| format!("failed to resolve the endpoint {}", reply.endpoint))?
            .find(std::net::SocketAddr::is_ipv4)
            .with_context(|| format!("the endpoint {} has no IPv4 address", reply.endpoint))?;

        let mut peer = Peer::new(gateway).with_endpoint(endpoint).with_allowed_ips(
            reply.routes.iter().map(|route| {
                ipnetwork::IpNetwork::new(IpAddr::V4(route.network()), route.prefix_len())
                    .expect("an Ipv4Net has a valid prefix")
            }),
        );
        peer.keepalive = Some(reply.persistent_keepalive_s);
        let device = gotatun::device::build()
            .with_default_udp()
            .create_tun(&order.interface)
            .with_context(|| format!("failed to create the tunnel interface {}", order.interface))?
            .with_private_key(secret)
            .with_peer(peer)
            .build()
            .await
            .context("failed to start the WireGuard device")?;

        let netlink = Netlink::connect()?;
        let ifindex = netlink.ifindex(&order.interface).await?;
        netlink::disable_ipv6(&order.interface)?;
        netlink.set_up(ifindex, u32::from(reply.mtu)).await?;
        netlink.add_address(ifindex, reply.address, 32).await?;
        for route in &reply.routes {
            netlink.replace_route(*route, ifindex).await?;
        }

        device.force_handshake(&gateway).await.context("failed to start the handshake")?;
        let start = Instant::now();
        loop {
            let handshake_completed =
                device.peers().await.iter().any(|peer| peer.stats.last_handshake.is_some());
            if handshake_completed {
                break;
            }
            if start.elapsed() > HANDSHAKE_TIMEOUT {
                bail!(
                    "no WireGuard handshake with {} within {} s: is UDP to that port open?",
                    reply.endpoint,
                    HANDSHAKE_TIMEOUT.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // NOTE: if a step from here to `ready` fails, the process exits without restoring
        // `resolv_conf`. The old contents stay in the backup file in the run directory.
        let dns = match &order.resolv_conf {
            Some(path) if !reply.dns.is_empty() => {
                Some(apply_dns(path, &order.run_dir, &order.interface, &reply.dns)?)
            }
            _ => None,
        };
        let state = TunnelState {
            pid: std::process::id(),
            address: reply.address,
            instance: order.instance.clone(),
            username: order.username.clone(),
            server: order.server.clone(),
        };
        let state_file = state_path(&order.run_dir, &order.interface);
        write_private(&state_file, &serde_json::to_vec_pretty(&state)?)?;
        writeln!(report, "ready {}", reply.address)?;
        report.flush()?;
        tracing::info!(
            address = %reply.address,
            interface = order.interface,
            "connected to intranet"
        );

        let mut interrupt =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("disconnecting");

        let logout = LogoutRequest {
            instance: order.instance.clone(),
            username: order.username.clone(),
            token: reply.token.clone(),
        };
        let pin = tls::parse_fingerprint(&order.pin)?;
        match tokio::time::timeout(
            LOGOUT_TIMEOUT,
            login_api::call::<serde_json::Value>(&order.server, pin, "/v1/logout", &logout),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::warn!(error = %error, "logout failed"),
            Err(_) => tracing::warn!("logout timed out"),
        }

        if let Some(backup) = dns {
            restore_dns(order.resolv_conf.as_deref().expect("DNS was applied"), &backup)?;
        }
        device.stop().await;
        let _ = std::fs::remove_file(&state_file);
        Ok(())
    })
}

/// Replaces `path` with a new file of mode 0600 that contains `bytes`. The old file is removed
/// first, so that its mode is not kept.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("failed to create {}", path.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}

/// Replaces `resolv_conf` with one that lists the instance's DNS `servers`. The old contents
/// go to a backup file in `run_dir`, whose path this returns.
fn apply_dns(
    resolv_conf: &Path,
    run_dir: &Path,
    interface: &str,
    servers: &[Ipv4Addr],
) -> Result<PathBuf> {
    let backup = dns_backup_path(run_dir, interface);
    let old = match std::fs::read(resolv_conf) {
        Ok(old) => old,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(error) => {
            return Err(error).with_context(|| format!("failed to read {}", resolv_conf.display()));
        }
    };
    write_private(&backup, &old)?;
    let mut text =
        format!("# Written by sag-agent connect for {interface}; restored on disconnect.\n");
    for server in servers {
        text.push_str(&format!("nameserver {server}\n"));
    }
    let temporary = resolv_conf.with_extension("sag-new");
    std::fs::write(&temporary, text)
        .with_context(|| format!("failed to write {}", temporary.display()))?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&temporary, resolv_conf)
        .with_context(|| format!("failed to replace {}", resolv_conf.display()))?;
    Ok(backup)
}

fn restore_dns(resolv_conf: &Path, backup: &Path) -> Result<()> {
    let old = std::fs::read(backup)
        .with_context(|| format!("failed to read the DNS backup {}", backup.display()))?;
    let temporary = resolv_conf.with_extension("sag-old");
    std::fs::write(&temporary, old)?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&temporary, resolv_conf)
        .with_context(|| format!("failed to restore {}", resolv_conf.display()))?;
    let _ = std::fs::remove_file(backup);
    Ok(())
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Runs `sag-agent disconnect`.
pub fn disconnect(args: DisconnectArgs) -> Result<()> {
    let path = state_path(&args.run_dir, &args.interface);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            bail!("not connected on {}: no state file {}", args.interface, path.display())
        }
        Err(error) => {
            return Err(error).with_context(|| format!("failed to read {}", path.display()))
        }
    };

    let state: TunnelState = serde_json::from_str(&text)
        .with_context(|| format!("invalid state file {}", path.display()))?;
    let command = std::fs::read(format!("/proc/{}/cmdline", state.pid)).unwrap_or_default();
    if !String::from_utf8_lossy(&command).contains("tunnel-process") {
        let _ = std::fs::remove_file(&path);
        bail!(
            "the tunnel process {} of {} is gone; removed its stale state file",
            state.pid,
            args.interface
        );
    }

    let pid = libc::pid_t::try_from(state.pid).context("process ID out of range")?;
    // SAFETY: kill has no memory preconditions. The PID comes from the state file, and its
    // command line contains `tunnel-process`, so it is a tunnel process of `connect`.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        bail!("failed to stop process {}: {}", state.pid, std::io::Error::last_os_error());
    }

    let start = Instant::now();
    while process_alive(state.pid) {
        if start.elapsed() > STOP_TIMEOUT {
            bail!(
                "the tunnel process {} did not stop within {} s",
                state.pid,
                STOP_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("Disconnected from intranet ({} on {})", state.address, args.interface);
    Ok(())
}

/// Runs `sag-agent client-config`.
pub fn client_config(args: ClientConfigArgs) -> Result<()> {
    // The configuration and the QR code contain the private key, so nothing this command
    // writes may be readable by other users.
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0o077) };
    let (keys, reply, _) = log_in(&args.login, true)?;
    let config = ClientConfig {
        private_key: keys.private_base64(),
        address: reply.address,
        dns: reply.dns.clone(),
        server_public_key: reply.gateway_public_key.clone(),
        endpoint: reply.endpoint.clone(),
        allowed_ips: reply.routes.clone(),
        persistent_keepalive_s: Some(reply.persistent_keepalive_s),
    };
    config.check()?;
    write_private(&args.out, config.render().as_bytes())?;
    println!(
        "Wrote {} for {} (address {}, endpoint {})",
        args.out.display(),
        args.login.username,
        reply.address,
        reply.endpoint
    );
    if args.qr {
        let png = args.out.with_extension("png");
        let _ = std::fs::remove_file(&png);
        config.write_qr_png(&png)?;
        println!("Wrote the QR code {}: scan it with the WireGuard app", png.display());
    }
    Ok(())
}
