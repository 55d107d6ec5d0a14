//! Network namespaces that delete themselves, and unique names for test objects.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, Context as _, Result};

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// Returns a name that no other test in this or another process uses: `prefix` followed by
/// the process ID and a counter in hex. With a prefix of up to 4 characters it fits the
/// 15-character limit of interface names.
pub fn unique_name(prefix: &str) -> String {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{:x}x{id:x}", std::process::id())
}

/// Runs a command and fails with its output if it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("failed to start {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed with {}: {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A network namespace, deleted with everything in it when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace named from `prefix`, with loopback up and IPv4 forwarding on.
    /// The kernel's own chatter is off: IPv6 router and neighbour solicitations, and the ICMP
    /// redirects a gateway sends to a client whose packet it routes back into the tunnel.
    pub fn new(prefix: &str) -> Result<Self> {
        let name = unique_name(prefix);
        run("ip", &["netns", "add", &name])?;
        let netns = Self { name };
        netns.ip(&["link", "set", "lo", "up"])?;
        for setting in [
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.default.send_redirects=0",
        ] {
            netns.exec(&["sysctl", "-qw", setting])?;
        }
        Ok(netns)
    }

    /// Returns the namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME args...`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a program inside the namespace through `ip netns exec`.
    pub fn exec(&self, command: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(command);
        run("ip", &full)
    }

    /// Runs `work` on a new thread that has entered the namespace, and returns its result.
    /// Sockets, TUN devices and interface lookups made there belong to the namespace.
    pub fn enter<T: Send>(&self, work: impl FnOnce() -> T + Send) -> Result<T> {
        let path = format!("/run/netns/{}", self.name);
        let file = File::open(&path).with_context(|| format!("failed to open {path}"))?;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns changes only this thread's namespace, and the fd is valid.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        bail!("setns into {path} failed: {}", std::io::Error::last_os_error());
                    }
                    Ok(work())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("thread in namespace {} panicked", self.name))?
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(error) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("failed to delete network namespace {}: {error:#}", self.name);
        }
    }
}

/// Creates a veth pair with one end in each namespace.
pub fn veth_pair(left: (&Netns, &str), right: (&Netns, &str)) -> Result<()> {
    run(
        "ip",
        &[
            "-n",
            left.0.name(),
            "link",
            "add",
            left.1,
            "type",
            "veth",
            "peer",
            "name",
            right.1,
            "netns",
            right.0.name(),
        ],
    )?;
    Ok(())
}
