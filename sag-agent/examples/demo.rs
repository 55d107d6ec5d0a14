//! The whole product on real traffic: a gateway box, a company network and two remote users in
//! network namespaces. The agent runs from a real configuration file; the demo drives it
//! through its CLI as an admin would, connects one user with `sag-agent connect` and one with
//! wireguard-go from an exported configuration, runs iperf3 and ping through the tunnels, and
//! prints what the box counted. Run through `cargo xtask demo [--keep]`, as root.
//!
//! All traffic stays inside the namespaces this program creates, and every generator stops
//! after a fixed time. Everything is removed on exit, unless `--keep` is given.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _, Result};
use sag_agent::{
    dataplane::PinnedCounters,
    testing::{
        lab::{Lab, COMPANY_SERVER},
        netns::Netns,
        traffic::Iperf3Server,
        wireguard::WireguardGo,
    },
};
use sag_common::counters::InterfaceKind;

/// Bandwidth of the fast user, each way, in kbit/s.
const FAST_KBPS: u32 = 2_000;
/// Bandwidth of the slow user, each way, in kbit/s.
const SLOW_KBPS: u32 = 256;
/// How long iperf3 runs, in seconds.
const TRAFFIC_SECONDS: u32 = 12;
/// A network outside the instance's allowed destinations, which bob's edited configuration
/// routes into the tunnel. The gateway drops what he sends there as `not_allowed`.
const NOT_ALLOWED_NETWORK: &str = "198.19.0.0/24";
/// An address in [`NOT_ALLOWED_NETWORK`].
const NOT_ALLOWED_ADDRESS: &str = "198.19.0.1";
/// Echo requests bob sends to [`NOT_ALLOWED_ADDRESS`].
const NOT_ALLOWED_PINGS: u32 = 4;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let binary =
        args.next().map(PathBuf::from).context("usage: demo PATH-TO-SAG-AGENT [--keep]")?;
    let keep = args.any(|arg| arg == "--keep");
    heading("Building the box in network namespaces");
    let lab = Lab::start(&binary, 2)?;
    println!("gateway namespace   {}  (sag-agent run, WireGuard, programs)", lab.gateway.name());
    println!("company namespace   {}  (server {COMPANY_SERVER})", lab.company.name());
    for (n, user) in lab.users.iter().enumerate() {
        println!("user {n} namespace    {}", user.name());
    }
    println!("\nagent configuration {}:", lab.dir.join("agent.toml").display());
    print!("{}", std::fs::read_to_string(lab.dir.join("agent.toml"))?);
    let result = run(&lab, keep);
    if keep {
        let (wireguard, instance) = match &result {
            Ok((wireguard, instance)) => (Some(wireguard), Some(instance.as_str())),
            Err(_) => (None, None),
        };
        print_keep_help(&lab, wireguard, instance);
        // The lab and bob's wireguard-go stay up; the printed commands remove them.
        let outcome = result.as_ref().map(|_| ()).map_err(|error| anyhow::anyhow!("{error:#}"));
        std::mem::forget(result);
        std::mem::forget(lab);
        return outcome;
    }
    let outcome = result.map(drop);
    drop(lab);
    println!("\nremoved the demo's namespaces, processes, files and pinned maps");
    outcome
}

fn heading(title: &str) {
    println!("\n=== {title}");
}

/// Prints an admin command as typed, runs it, and prints its output.
fn admin(lab: &Lab, args: &[&str]) -> Result<String> {
    println!("$ sag-agent {}", args.join(" "));
    let output = lab.admin(args)?;
    print!("{output}");
    Ok(output)
}

/// Runs the demo on `lab` and returns bob's wireguard-go, which stops when dropped, and the
/// instance ID.
fn run(lab: &Lab, keep: bool) -> Result<(WireguardGo, String)> {
    heading("An admin creates an instance and its network");
    let output = admin(
        lab,
        &["instance", "create", "--owner", "acme", "--area", "eu-central-1", "--quota", "5"],
    )?;
    let instance = output
        .lines()
        .nth(1)
        .and_then(|line| line.split_whitespace().next())
        .context("instance ID in the table")?
        .to_owned();
    admin(
        lab,
        &[
            "network",
            "set",
            &instance,
            "--ccn-name",
            "office-net",
            "--cidr-block",
            "10.77.0.0/24",
            "--allow",
            "198.18.0.0/24",
            "--dns-active",
            "198.18.0.53",
        ],
    )?;
    let shown = admin(lab, &["instance", "show", &instance])?;
    let fingerprint = shown
        .lines()
        .find_map(|line| line.strip_prefix("login fingerprint"))
        .map(|rest| rest.trim().to_owned())
        .context("fingerprint in instance show")?;

    heading("Two accounts: alice at 2,000 kbit/s, bob at 256 kbit/s");
    for (username, kbps) in [("alice.demo", FAST_KBPS), ("bob.demo1", SLOW_KBPS)] {
        let file = lab.dir.join(format!("{username}.password"));
        std::fs::write(&file, format!("Pw_{username}_2026\n"))?;
        admin(
            lab,
            &[
                "account",
                "create",
                &instance,
                "--username",
                username,
                "--email",
                &format!("{username}@example.com"),
                "--bandwidth",
                &kbps.to_string(),
                "--password-file",
                &file.display().to_string(),
            ],
        )?;
    }
    let outbox = lab.dir.join("state/outbox");
    println!("(the credentials emails are in {}, since no SMTP relay is set)", outbox.display());

    heading("alice connects with `sag-agent connect`");
    println!("$ sag-agent connect --server 203.0.113.1:8443 --fingerprint {fingerprint} \\");
    println!("      --instance {instance} --username alice.demo");
    println!("{}", lab.connect(0, &fingerprint, &instance, "alice.demo")?);

    heading("bob imports an exported configuration into wireguard-go");
    let config = lab.dir.join("bob.conf");
    let mut args = vec!["client-config".to_owned()];
    args.extend(lab.login_args(&fingerprint, &instance, "bob.demo1"));
    args.extend(["--out".to_owned(), config.display().to_string(), "--qr".to_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    println!("$ sag-agent client-config ... --username bob.demo1 --out bob.conf --qr");
    let output = lab.user_command(1, &args)?;
    if !output.status.success() {
        bail!("client-config failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    print!("{}", String::from_utf8_lossy(&output.stdout));
    // bob widens his AllowedIPs by hand, to show that the gateway, not the client's
    // configuration, decides what a client may reach.
    let exported = std::fs::read_to_string(&config)?;
    let widened = exported.replace(
        "AllowedIPs = 198.18.0.0/24\n",
        &format!("AllowedIPs = 198.18.0.0/24, {NOT_ALLOWED_NETWORK}\n"),
    );
    if widened == exported {
        bail!("the exported configuration has no line AllowedIPs = 198.18.0.0/24:\n{exported}");
    }
    std::fs::write(&config, widened)?;
    println!("(bob adds {NOT_ALLOWED_NETWORK}, which the instance does not allow, to AllowedIPs)");
    let wireguard = WireguardGo::start(&lab.users[1], &config)?;
    ping(&lab.users[1], 3)?;
    println!("Connected to intranet: bob's wireguard-go reaches {COMPANY_SERVER}");

    heading(&format!("Both send TCP to the company server for {TRAFFIC_SECONDS} s (iperf3)"));
    let servers = [
        Iperf3Server::start(&lab.company, 5301, COMPANY_SERVER)?,
        Iperf3Server::start(&lab.company, 5302, COMPANY_SERVER)?,
    ];
    let clients = [iperf3_client(&lab.users[0], 5301)?, iperf3_client(&lab.users[1], 5302)?];
    std::thread::sleep(Duration::from_secs(2));
    println!(
        "live, as `sag-agent traffic` prints it (bob is held at {SLOW_KBPS} kbit/s on average; \
         a one-second sample can go over it by the 500 ms burst):"
    );
    admin(lab, &["traffic", &instance, "--count", "6"])?;
    for (client, (user, kbps)) in
        clients.into_iter().zip([("alice", FAST_KBPS), ("bob", SLOW_KBPS)])
    {
        let output = client.wait_with_output()?;
        let report: serde_json::Value =
            serde_json::from_slice(&output.stdout).context("iperf3 printed no JSON report")?;
        let goodput = report["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .context("iperf3 printed no received rate")?
            / 1_000.0;
        println!("{user}: iperf3 goodput {goodput:.0} kbit/s, limit {kbps} kbit/s");
        if goodput > f64::from(kbps) * 1.05 {
            bail!("{user}'s goodput of {goodput:.0} kbit/s is over the limit of {kbps} kbit/s");
        }
    }
    drop(servers);

    heading(&format!("bob pings {NOT_ALLOWED_ADDRESS}, outside the allowed destinations"));
    let replies = lab.users[1].exec(&[
        "ping",
        "-n",
        "-q",
        "-c",
        &NOT_ALLOWED_PINGS.to_string(),
        "-i",
        "0.2",
        "-W",
        "1",
        NOT_ALLOWED_ADDRESS,
    ]);
    let replies = replies.is_ok();
    println!(
        "ping: {}",
        if replies { "replies came back" } else { "no reply: the gateway dropped them" }
    );

    heading("Drop counters by reason, from the pinned kernel maps");
    let pinned = PinnedCounters::open(&lab.pin_dir)?;
    println!(
        "{:<12} {:>10} {:>10} {:>12} {:>10}",
        "CLIENT", "DIRECTION", "RATE LIMIT", "NOT ALLOWED", "BLOCKED"
    );
    let mut not_allowed = 0;
    for (address, counters) in pinned.clients()? {
        not_allowed += counters.rx_dropped.not_allowed.packets;
        for (direction, drops) in [("rx", counters.rx_dropped), ("tx", counters.tx_dropped)] {
            println!(
                "{:<12} {:>10} {:>10} {:>12} {:>10}",
                address.to_string(),
                direction,
                drops.rate_limit.packets,
                drops.not_allowed.packets,
                drops.blocked.packets
            );
        }
    }
    let spoofed: u64 = pinned
        .interface_counters()?
        .iter()
        .filter(|counter| counter.kind == InterfaceKind::Spoofed)
        .map(|counter| counter.counter.packets)
        .sum();
    println!("spoofed packets on the tunnels: {spoofed}");
    if not_allowed != u64::from(NOT_ALLOWED_PINGS) {
        bail!("{not_allowed} packets were dropped as not allowed, expected {NOT_ALLOWED_PINGS}");
    }

    heading("History: the agent records every minute");
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let wait = 62 - now % 60;
    println!("waiting {wait} s for the current minute to be recorded...");
    std::thread::sleep(Duration::from_secs(wait));
    admin(lab, &["monitor", &instance, "--range", "1h"])?;
    let png = lab.dir.join("monitor.png");
    admin(
        lab,
        &["monitor", &instance, "--account", "bob.demo1", "--png", &png.display().to_string()],
    )?;

    heading("An excerpt of /metrics, as Prometheus scrapes it");
    let metrics = lab.gateway.exec(&[
        "/usr/bin/python3",
        "-c",
        "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9108/metrics').read().decode())",
    ])?;
    for line in metrics
        .lines()
        .filter(|line| line.starts_with("sag_account_") && line.contains("bob.demo1"))
        .take(12)
    {
        println!("{line}");
    }
    println!("... {} lines in all", metrics.lines().count());

    if !keep {
        heading("alice disconnects");
        println!("{}", lab.disconnect(0)?);
    }
    Ok((wireguard, instance))
}

/// Pings the company server `count` times from `netns`.
fn ping(netns: &Netns, count: u32) -> Result<()> {
    netns.exec(&[
        "ping",
        "-n",
        "-q",
        "-c",
        &count.to_string(),
        "-i",
        "0.2",
        "-W",
        "2",
        &COMPANY_SERVER.to_string(),
    ])?;
    Ok(())
}

fn iperf3_client(netns: &Netns, port: u16) -> Result<Child> {
    Command::new("ip")
        .args(["netns", "exec", netns.name(), "timeout", "60", "iperf3", "--client"])
        .args([&COMPANY_SERVER.to_string(), "--port", &port.to_string()])
        .args(["--time", &TRAFFIC_SECONDS.to_string(), "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .context("failed to start iperf3")
}

fn print_keep_help(lab: &Lab, wireguard: Option<&WireguardGo>, instance: Option<&str>) {
    let dir = &lab.dir;
    let socket = lab.socket();
    let agent =
        |args: &str| format!("{} {args} --socket {}", lab.binary.display(), socket.display());
    heading("Left running (--keep)");
    println!("look around:");
    println!("  {}", agent("instance list"));
    let id = instance.unwrap_or("<ID>");
    println!("  {}", agent(&format!("traffic {id} --count 5")));
    println!("  {}", agent(&format!("monitor {id}")));
    println!("  ip netns exec {} ping -c 3 {COMPANY_SERVER}", lab.users[1].name());
    println!("  tail -f {}", dir.join("agent.log").display());
    println!("clean up:");
    println!(
        "  nsenter --net=/run/netns/{} {} disconnect --run-dir {}   # alice's tunnel",
        lab.users[0].name(),
        lab.binary.display(),
        lab.run_dir(0).display()
    );
    if let Some(pid) = lab.agent_pid() {
        println!("  kill {pid}            # the agent");
    }
    for netns in [&lab.gateway, &lab.company].into_iter().chain(&lab.users) {
        println!("  ip netns del {}", netns.name());
    }
    println!("  rm -rf {} {}", dir.display(), lab.pin_dir.display());
    if let Some(wireguard) = wireguard {
        println!("  kill {}            # bob's wireguard-go", wireguard.pid());
        println!("  rm -f /var/run/wireguard/{}.sock", wireguard.name);
    }
}
