//! A whole box in network namespaces, for end-to-end tests and the demo.
//!
//! The gateway namespace runs `sag-agent run` from a real configuration file. Behind it is a
//! company network with a server, and remote users reach the gateway over veth links:
//!
//! ```text
//! user i    203.0.113.(4i+2)/30 ── veth ── 203.0.113.(4i+1)/30  gateway
//! company   198.18.0.2/24       ── veth ── 198.18.0.1/24        gateway
//! ```
//!
//! The login API and the WireGuard ports listen on 203.0.113.1, which every user reaches
//! through its own link. Dropping the lab disconnects each user's `connect` tunnel, stops the
//! agent, and deletes the namespaces, the lab directory and the pinned maps.
//!
//! Beside [`Lab`] are the helpers that the end-to-end tests share: pinging the company server,
//! parsing the output of `connect`, and waiting for packets in flight.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use sag_common::counters::ClientCounters;

use super::netns::{run, unique_name, veth_pair, Netns};
use crate::{config::MIN_SESSION_IDLE_S, dataplane::PinnedCounters};

/// Address of the company server.
pub const COMPANY_SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Company network, which clients of the lab's instance may reach.
pub const COMPANY_NETWORK: &str = "198.18.0.0/24";
/// Client address block of the lab's instance.
pub const CLIENT_BLOCK: &str = "10.77.0.0/24";
/// Gateway address that users log in to and send WireGuard traffic to.
pub const GATEWAY_PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// Port of the login API.
pub const LOGIN_PORT: u16 = 8443;
/// Idle time of the lab agent's sessions, in seconds: the shortest the agent accepts, so that a
/// test of the idle timeout waits as little as possible.
pub const SESSION_IDLE_S: u64 = MIN_SESSION_IDLE_S;
/// Interval between the echo requests of [`ping`].
const PING_INTERVAL: Duration = Duration::from_millis(200);
/// Maximum wait for the agent to open its admin socket.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A box in namespaces with a running agent.
pub struct Lab {
    /// Path of the `sag-agent` binary under test.
    pub binary: PathBuf,
    /// Namespace of the gateway, where the agent runs.
    pub gateway: Netns,
    /// Namespace of the company server.
    pub company: Netns,
    /// Namespaces of the remote users, indexed by user number.
    pub users: Vec<Netns>,
    /// Temporary directory that contains the configuration, the state directory, the admin
    /// socket, the agent log, the password files and the users' run directories.
    pub dir: PathBuf,
    /// Directory under /sys/fs/bpf where the agent pins its maps.
    pub pin_dir: PathBuf,
    agent: std::sync::Mutex<Option<Child>>,
    /// A command and its arguments that the agent runs under, such as `setpriv` with a
    /// bounding set of capabilities; empty to run it directly.
    agent_wrapper: Vec<String>,
}

impl Lab {
    /// Builds the namespaces with `users` remote users and starts the agent in the gateway.
    ///
    /// # Errors
    /// Fails if a namespace, link or the agent cannot be set up.
    pub fn start(binary: &Path, users: u8) -> Result<Self> {
        Self::start_wrapped(binary, users, &[])
    }

    /// Like [`Lab::start`], but runs the agent under `wrapper` (a command and its arguments,
    /// such as `setpriv --bounding-set=...`), in the gateway namespace.
    ///
    /// # Errors
    /// Fails if a namespace, a link or the agent cannot be set up.
    pub fn start_wrapped(binary: &Path, users: u8, wrapper: &[&str]) -> Result<Self> {
        // Gateway and company server.
        let gateway = Netns::new("lgw")?;
        let company = Netns::new("lco")?;
        let inside = unique_name("lgc");
        let server_end = unique_name("lcs");
        veth_pair((&gateway, &inside), (&company, &server_end))?;
        gateway.ip(&["addr", "add", "198.18.0.1/24", "dev", &inside])?;
        gateway.ip(&["link", "set", &inside, "up"])?;
        company.ip(&["addr", "add", &format!("{COMPANY_SERVER}/24"), "dev", &server_end])?;
        company.ip(&["link", "set", &server_end, "up"])?;
        company.ip(&["route", "add", "default", "via", "198.18.0.1"])?;

        // Users, each on its own /30 link to the gateway.
        let mut user_namespaces = Vec::new();
        for n in 0..users {
            let user = Netns::new("lus")?;
            let (gateway_end, user_end) = (unique_name("lug"), unique_name("luu"));
            veth_pair((&gateway, &gateway_end), (&user, &user_end))?;
            let base = 4 * u32::from(n);
            let gateway_address = Ipv4Addr::from(u32::from(GATEWAY_PUBLIC) + base);
            let user_address = Ipv4Addr::from(u32::from(GATEWAY_PUBLIC) + base + 1);
            gateway.ip(&["addr", "add", &format!("{gateway_address}/30"), "dev", &gateway_end])?;
            gateway.ip(&["link", "set", &gateway_end, "up"])?;
            user.ip(&["addr", "add", &format!("{user_address}/30"), "dev", &user_end])?;
            user.ip(&["link", "set", &user_end, "up"])?;
            // User 0's link already contains GATEWAY_PUBLIC, and the others need a route to it.
            if n > 0 {
                user.ip(&[
                    "route",
                    "add",
                    &format!("{GATEWAY_PUBLIC}/32"),
                    "via",
                    &gateway_address.to_string(),
                ])?;
            }
            user_namespaces.push(user);
        }

        // Agent configuration, with the shortest idle time the agent accepts.
        let dir = std::env::temp_dir().join(unique_name("sag-lab-"));
        std::fs::create_dir_all(&dir)?;
        let pin_dir = Path::new("/sys/fs/bpf").join(unique_name("sag-lab-"));
        let config = format!(
            "[agent]\nstate_dir = \"{0}/state\"\nsocket = \"{0}/agent.sock\"\npin_dir = \"{1}\"\n\
             login_server = \"{GATEWAY_PUBLIC}:{LOGIN_PORT}\"\n\
             login_listen = \"0.0.0.0:{LOGIN_PORT}\"\nsession_idle_s = {SESSION_IDLE_S}\n",
            dir.display(),
            pin_dir.display()
        );
        std::fs::write(dir.join("agent.toml"), config)?;

        let lab = Self {
            binary: binary.to_owned(),
            gateway,
            company,
            users: user_namespaces,
            dir,
            pin_dir,
            agent: std::sync::Mutex::new(None),
            agent_wrapper: wrapper.iter().map(|part| (*part).to_owned()).collect(),
        };
        lab.start_agent()?;
        Ok(lab)
    }

    /// Starts `sag-agent run` in the gateway namespace and waits for its admin socket.
    ///
    /// # Errors
    /// Fails if the agent exits or does not open its socket within [`START_TIMEOUT`].
    pub fn start_agent(&self) -> Result<()> {
        let log = std::fs::File::create(self.dir.join("agent.log"))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.gateway.name()))
            .args(&self.agent_wrapper)
            .arg(&self.binary)
            .args(["run", "--config"])
            .arg(self.dir.join("agent.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("failed to start sag-agent run")?;
        let mut agent = self.agent.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *agent = Some(child);
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err() {
            if let Some(status) = agent.as_mut().and_then(|child| child.try_wait().ok()?) {
                bail!("the agent exited with {status}: {}", self.agent_log());
            }
            if start.elapsed() > START_TIMEOUT {
                bail!("the agent did not open its socket in time: {}", self.agent_log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Stops the agent with SIGTERM, and kills it if it has not exited within 10 s.
    pub fn stop_agent(&self) {
        let agent = self.agent.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if let Some(mut child) = agent {
            if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                // SAFETY: kill has no memory preconditions. The process is this lab's agent.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Rewrites the agent configuration with `session_idle_s` set to `seconds` instead of
    /// [`SESSION_IDLE_S`], and restarts the agent with it.
    ///
    /// # Errors
    /// Fails if the configuration has no `session_idle_s = SESSION_IDLE_S` line, which is the
    /// case after an earlier call, if it cannot be rewritten, or if the agent does not start.
    pub fn restart_agent_with_session_idle(&self, seconds: u64) -> Result<()> {
        let path = self.dir.join("agent.toml");
        let config = std::fs::read_to_string(&path)?;
        let line = format!("session_idle_s = {SESSION_IDLE_S}\n");
        if !config.contains(&line) {
            bail!("missing {line:?} in {}: {config}", path.display());
        }
        std::fs::write(&path, config.replace(&line, &format!("session_idle_s = {seconds}\n")))?;
        self.stop_agent();
        self.start_agent()
    }

    /// Returns the agent's log output so far.
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Returns the process ID of the running agent.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).as_ref().map(Child::id)
    }

    /// Returns the path of the admin socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    /// Runs an admin command of `sag-agent` against the lab's socket and returns its standard
    /// output.
    ///
    /// # Errors
    /// Fails with the command's standard error if it exits non-zero.
    pub fn admin(&self, args: &[&str]) -> Result<String> {
        let socket = self.socket();
        let mut full: Vec<&str> = args.to_vec();
        full.extend(["--socket", socket.to_str().context("socket path is UTF-8")?]);
        run(self.binary.to_str().context("binary path is UTF-8")?, &full)
    }

    /// Creates an instance whose clients get addresses from [`CLIENT_BLOCK`] and may reach
    /// [`COMPANY_NETWORK`], and returns its ID and the fingerprint of its login certificate.
    ///
    /// # Errors
    /// Fails if an admin command fails or its JSON output has no ID or no fingerprint.
    pub fn create_instance(&self) -> Result<(String, String)> {
        let output = self.admin(&[
            "instance",
            "create",
            "--owner",
            "lab",
            "--area",
            "eu-central-1",
            "--quota",
            "5",
            "--json",
        ])?;
        let created: serde_json::Value = serde_json::from_str(&output)?;
        let id = created[0]["id"].as_str().context("instance ID in the reply")?.to_owned();
        self.admin(&[
            "network",
            "set",
            &id,
            "--cidr-block",
            CLIENT_BLOCK,
            "--allow",
            COMPANY_NETWORK,
            "--dns-active",
            "198.18.0.53",
        ])?;
        let details: serde_json::Value =
            serde_json::from_str(&self.admin(&["instance", "show", &id, "--json"])?)?;
        let fingerprint = details["instance"]["login_fingerprint"]
            .as_str()
            .context("fingerprint in the reply")?
            .to_owned();
        Ok((id, fingerprint))
    }

    /// Returns the kernel counters of the client at `address`, or `None` if the kernel has no
    /// client there. They come from the maps the agent pinned under [`Lab::pin_dir`].
    ///
    /// # Errors
    /// Fails if the pinned maps cannot be opened or read.
    pub fn counters(&self, address: Ipv4Addr) -> Result<Option<ClientCounters>> {
        let clients = PinnedCounters::open(&self.pin_dir)?.clients()?;
        Ok(clients.get(&address).copied())
    }

    /// Returns the path of the password file that [`Lab::create_account`] writes for
    /// `username`.
    pub fn password_file(&self, username: &str) -> PathBuf {
        self.dir.join(format!("{username}.password"))
    }

    /// Creates an account with the password `Pw_USERNAME_2026`, written to a file in the lab
    /// directory, and returns the path of that file.
    ///
    /// # Errors
    /// Fails if the password file cannot be written or the admin command fails.
    pub fn create_account(
        &self,
        instance: &str,
        username: &str,
        bandwidth_kbps: u32,
        static_ip: Option<Ipv4Addr>,
    ) -> Result<PathBuf> {
        let password_file = self.password_file(username);
        std::fs::write(&password_file, format!("Pw_{username}_2026\n"))?;
        let bandwidth = bandwidth_kbps.to_string();
        let email = format!("{username}@example.com");
        let mut args = vec![
            "account",
            "create",
            instance,
            "--username",
            username,
            "--email",
            &email,
            "--bandwidth",
            &bandwidth,
            "--password-file",
        ];
        let path = password_file.to_str().context("UTF-8 path")?.to_owned();
        args.push(&path);
        let address = static_ip.map(|address| address.to_string());
        if let Some(address) = &address {
            args.extend(["--static-ip", address]);
        }
        self.admin(&args)?;
        Ok(password_file)
    }

    /// Runs `sag-agent` with `args` in user `n`'s namespace and returns its output, whatever its
    /// exit status. It enters only the network namespace, through nsenter, so the mounts stay
    /// those of the test.
    ///
    /// # Errors
    /// Fails if the process cannot be started.
    pub fn user_command(&self, n: usize, args: &[&str]) -> Result<Output> {
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.users[n].name()))
            .arg(&self.binary)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("failed to run sag-agent as a user")
    }

    /// Returns the login arguments of `connect` and `client-config` for `username`, with the
    /// password file that [`Lab::create_account`] wrote.
    pub fn login_args(&self, fingerprint: &str, instance: &str, username: &str) -> Vec<String> {
        login_args_with_file(fingerprint, instance, username, &self.password_file(username))
    }

    /// Returns the run directory of user `n`'s `connect`.
    pub fn run_dir(&self, n: usize) -> PathBuf {
        self.dir.join(format!("user{n}"))
    }

    /// Connects user `n` with `sag-agent connect` and returns its standard output, trimmed.
    /// DNS changes go to a resolver file of the user in the lab directory, not to the machine's
    /// /etc/resolv.conf. That file is created with `nameserver 192.0.2.53` if it is missing.
    ///
    /// # Errors
    /// Fails with the command's standard error if it exits non-zero.
    pub fn connect(
        &self,
        n: usize,
        fingerprint: &str,
        instance: &str,
        username: &str,
    ) -> Result<String> {
        let run_dir = self.run_dir(n).display().to_string();
        let resolv = self.dir.join(format!("user{n}.resolv.conf"));
        if !resolv.exists() {
            std::fs::write(&resolv, "nameserver 192.0.2.53\n")?;
        }
        let resolv = resolv.display().to_string();
        let mut args = vec!["connect".to_owned()];
        args.extend(self.login_args(fingerprint, instance, username));
        args.extend(["--run-dir".to_owned(), run_dir, "--resolv-conf".to_owned(), resolv]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = self.user_command(n, &args)?;
        if !output.status.success() {
            bail!("connect failed: {}", String::from_utf8_lossy(&output.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// Runs `sag-agent connect` as user `n` with the password in `password_file`, a new run
    /// directory and no DNS changes, and returns its output, whatever its exit status. It is
    /// meant for logins that a test expects to be rejected.
    ///
    /// NOTE: a login that succeeds leaves its tunnel process running after the lab is dropped,
    /// because [`Lab`]'s drop disconnects only the run directories of [`Lab::connect`].
    ///
    /// # Errors
    /// Fails if the process cannot be started.
    pub fn try_connect(
        &self,
        n: usize,
        fingerprint: &str,
        instance: &str,
        username: &str,
        password_file: &Path,
    ) -> Result<Output> {
        let run_dir = self.dir.join(unique_name("run")).display().to_string();
        let mut args = vec!["connect".to_owned()];
        args.extend(login_args_with_file(fingerprint, instance, username, password_file));
        args.extend(["--run-dir".to_owned(), run_dir, "--no-dns".to_owned()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.user_command(n, &args)
    }

    /// Disconnects user `n` with `sag-agent disconnect` and returns its standard output,
    /// trimmed.
    ///
    /// # Errors
    /// Fails with the command's standard error if it exits non-zero.
    pub fn disconnect(&self, n: usize) -> Result<String> {
        let run_dir = self.run_dir(n).display().to_string();
        let output = self.user_command(n, &["disconnect", "--run-dir", &run_dir])?;
        if !output.status.success() {
            bail!("disconnect failed: {}", String::from_utf8_lossy(&output.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Disconnect any `connect` tunnel that a failed test left running in a user's run
        // directory.
        for n in 0..self.users.len() {
            let _ = self.disconnect(n);
        }
        self.stop_agent();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// Returns the login arguments of `connect` and `client-config` for `username` with the
/// password in `password_file`.
fn login_args_with_file(
    fingerprint: &str,
    instance: &str,
    username: &str,
    password_file: &Path,
) -> Vec<String> {
    vec![
        "--server".to_owned(),
        format!("{GATEWAY_PUBLIC}:{LOGIN_PORT}"),
        "--fingerprint".to_owned(),
        fingerprint.to_owned(),
        "--instance".to_owned(),
        instance.to_owned(),
        "--username".to_owned(),
        username.to_owned(),
        "--password-file".to_owned(),
        password_file.display().to_string(),
    ]
}

/// Parses the client address from the line `Connected to intranet as ADDRESS (...)` that
/// [`Lab::connect`] returns.
///
/// # Errors
/// Fails if the line has another form or ADDRESS is not an IPv4 address.
pub fn connected_address(line: &str) -> Result<Ipv4Addr> {
    let rest = line
        .strip_prefix("Connected to intranet as ")
        .with_context(|| format!("missing \"Connected to intranet as\" in {line:?}"))?;
    let address = rest.split(' ').next().unwrap_or_default();
    address.parse().with_context(|| format!("invalid IPv4 address {address:?} in {line:?}"))
}

/// Pings the company server from `netns` `count` times, every 200 ms, with `size` bytes of ICMP
/// payload, and returns the number of replies.
///
/// # Errors
/// Fails if ping cannot be started or prints no summary. Lost echo requests are no error.
pub fn ping(netns: &Netns, count: u32, size: u32) -> Result<u32> {
    ping_with_interval(netns, count, size, PING_INTERVAL)
}

/// Pings the company server like [`ping`], with `interval` between the echo requests, and
/// returns the number of replies.
///
/// # Errors
/// Fails if ping cannot be started or prints no summary. Lost echo requests are no error.
pub fn ping_with_interval(netns: &Netns, count: u32, size: u32, interval: Duration) -> Result<u32> {
    let summary = ping_summary(netns, count, size, interval)?;
    // The second field of "5 packets transmitted, 5 received, 0% packet loss, time 803ms".
    let received = summary.split(", ").nth(1).and_then(|field| field.split(' ').next());
    received
        .and_then(|replies| replies.parse().ok())
        .with_context(|| format!("no number of replies in ping's summary {summary:?}"))
}

/// Pings the company server from `netns` `count` times, every `interval`, with `size` bytes of
/// ICMP payload, and returns ping's summary line, such as `5 packets transmitted, 5 received,
/// 0% packet loss, time 803ms`. Each reply is awaited for at most 2 s.
///
/// # Errors
/// Fails if ping cannot be started or prints no summary. Lost echo requests are no error.
pub fn ping_summary(netns: &Netns, count: u32, size: u32, interval: Duration) -> Result<String> {
    let interval = interval.as_secs_f64().to_string();
    let output = Command::new("ip")
        .args(["netns", "exec", netns.name(), "ping", "-n", "-q", "-i", &interval, "-W", "2"])
        .args(["-c", &count.to_string(), "-s", &size.to_string(), &COMPANY_SERVER.to_string()])
        .output()
        .context("failed to start ping")?;
    let text = String::from_utf8_lossy(&output.stdout);
    match text.lines().find(|line| line.contains("received")) {
        Some(summary) => Ok(summary.to_owned()),
        None => bail!("ping printed no summary: {text}{}", String::from_utf8_lossy(&output.stderr)),
    }
}

/// Waits 500 ms, so that packets in flight arrive before counters are compared.
pub fn settle() {
    std::thread::sleep(Duration::from_millis(500));
}

/// Packet and byte counters of an interface, from `ip -s -j link`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

/// Reads the 64-bit statistics of `interface` in `netns`.
///
/// # Errors
/// Fails if `ip` fails or its JSON output lacks one of the counters.
pub fn link_stats(netns: &Netns, interface: &str) -> Result<LinkStats> {
    let output = netns.ip(&["-s", "-j", "link", "show", "dev", interface])?;
    let value: serde_json::Value = serde_json::from_str(&output)?;
    let stats = &value[0]["stats64"];
    let field = |direction: &str, name: &str| {
        stats[direction][name].as_u64().with_context(|| format!("{direction}.{name} in {output}"))
    };
    Ok(LinkStats {
        rx_packets: field("rx", "packets")?,
        rx_bytes: field("rx", "bytes")?,
        tx_packets: field("tx", "packets")?,
        tx_bytes: field("tx", "bytes")?,
    })
}
