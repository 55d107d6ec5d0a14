//! End-to-end tests through real WireGuard tunnels. `sag-agent run` serves in a gateway
//! namespace with a company server behind it. Users log in with `sag-agent connect`, or with
//! wireguard-go (Debian's package, an independent implementation) from a configuration that
//! `sag-agent client-config` exported.
//!
//! The tests need root, and ping, iperf3, nsenter, wireguard-go, wg and wg-quick.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::{Command, Stdio},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use sag_agent::{
    dataplane::PinnedCounters,
    testing::{
        lab::{connected_address, link_stats, ping, settle, Lab, LinkStats, COMPANY_SERVER},
        netns::{unique_name, Netns},
        traffic::{iperf3_tcp_goodput_kbps, TcpDirection},
        wireguard::WireguardGo,
    },
};
use sag_common::counters::ClientCounters;
use serde_json::Value;

/// Lock that every rate measurement takes, so that no two measurements run at the same time
/// and compete for the CPUs.
static MEASURING: Mutex<()> = Mutex::new(());

fn measuring() -> MutexGuard<'static, ()> {
    MEASURING.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn lab(users: u8) -> Lab {
    Lab::start(Path::new(env!("CARGO_BIN_EXE_sag-agent")), users).expect("lab starts (as root)")
}

/// Runs an iperf3 TCP test between `client` and the company server in `direction` for
/// `seconds`, plus one omitted second, and returns the goodput the receiving end got, in
/// kbit/s. `timeout` stops the client after 60 s.
fn tcp_goodput(lab: &Lab, client: &Netns, direction: TcpDirection, seconds: u32) -> f64 {
    // One port per test process. Callers hold the MEASURING lock, so calls never overlap.
    let port = 5300 + (std::process::id() % 500) as u16;
    let server = SocketAddrV4::new(COMPANY_SERVER, port);
    iperf3_tcp_goodput_kbps(&lab.company, server, client, None, direction, seconds, 60).unwrap()
}

/// Asserts that `goodput` is 85 % to 105 % of the limit `rate`, both in kbit/s.
fn assert_goodput(name: &str, goodput: f64, rate: u32) {
    let ratio = goodput / f64::from(rate);
    eprintln!("{name}: TCP goodput {goodput:.1} kbit/s at {rate} (ratio {ratio:.3})");
    assert!((0.85..=1.05).contains(&ratio), "{name}: goodput {goodput:.1} at {rate} kbit/s");
}

/// Asserts that the gateway's counters of a client account for exactly what the client's
/// tunnel interface sent and received between the snapshots `before` and `after`. Every packet
/// the client sent was passed or dropped with a reason, and every packet passed toward the
/// client arrived.
fn assert_counters_match(before: (ClientCounters, LinkStats), after: (ClientCounters, LinkStats)) {
    let (gateway, client) = (after.0, after.1);
    let (gateway_before, client_before) = (before.0, before.1);
    let dropped = |c: &ClientCounters| {
        let d = &c.rx_dropped;
        (
            d.rate_limit.packets + d.blocked.packets + d.not_allowed.packets,
            d.rate_limit.bytes + d.blocked.bytes + d.not_allowed.bytes,
        )
    };
    let (dropped_packets, dropped_bytes) = dropped(&gateway);
    let (dropped_before_packets, dropped_before_bytes) = dropped(&gateway_before);
    assert_eq!(
        gateway.rx_packets - gateway_before.rx_packets + dropped_packets - dropped_before_packets,
        client.tx_packets - client_before.tx_packets,
        "every packet the client sent is counted once: {gateway:?} vs {client:?}"
    );
    assert_eq!(
        gateway.rx_bytes - gateway_before.rx_bytes + dropped_bytes - dropped_before_bytes,
        client.tx_bytes - client_before.tx_bytes,
        "rx bytes"
    );
    assert_eq!(
        gateway.tx_packets - gateway_before.tx_packets,
        client.rx_packets - client_before.rx_packets,
        "every packet passed toward the client arrived: {gateway:?} vs {client:?}"
    );
    assert_eq!(
        gateway.tx_bytes - gateway_before.tx_bytes,
        client.rx_bytes - client_before.rx_bytes,
        "tx bytes"
    );
}

#[test]
fn wireguard_go_with_exported_config() {
    let lab = lab(1);
    let (instance, fingerprint) = lab.create_instance().unwrap();
    lab.create_account(&instance, "wgo-user1", 512, None).unwrap();
    let out = lab.dir.join("exported.conf");
    let mut args = vec!["client-config".to_owned()];
    args.extend(lab.login_args(&fingerprint, &instance, "wgo-user1"));
    args.extend(["--out".to_owned(), out.display().to_string(), "--qr".to_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = lab.user_command(0, &args).unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.starts_with(&format!("Wrote {}", out.display())), "{stdout}");
    for file in [out.clone(), out.with_extension("png")] {
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} contains the private key", file.display());
    }
    let png = std::fs::read(out.with_extension("png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let config = std::fs::read_to_string(&out).unwrap();
    assert!(config.contains("AllowedIPs = 198.18.0.0/24\n"), "{config}");
    assert!(config.contains("Endpoint = 203.0.113.1:51820\n"), "{config}");
    assert!(config.contains("DNS = 198.18.0.53\n"), "{config}");
    let address: Ipv4Addr = config
        .lines()
        .find_map(|line| line.strip_prefix("Address = "))
        .unwrap()
        .trim_end_matches("/32")
        .parse()
        .unwrap();

    let user = &lab.users[0];
    let wireguard = WireguardGo::start(user, &out).unwrap();
    let snapshot =
        || (lab.counters(address).unwrap().unwrap(), link_stats(user, &wireguard.name).unwrap());
    let before = snapshot();
    assert_eq!(ping(user, 5, 100).unwrap(), 5, "ping through the tunnel");
    settle();
    let after = snapshot();
    let counted = after.0;
    assert_eq!((counted.rx_packets, counted.rx_bytes), (5, 5 * 128), "5 echo requests of 128 B");
    assert_eq!((counted.tx_packets, counted.tx_bytes), (5, 5 * 128), "5 echo replies of 128 B");
    assert_counters_match(before, after);

    let _measuring = measuring();
    let before = snapshot();
    let goodput = tcp_goodput(&lab, user, TcpDirection::Upload, 8);
    settle();
    let after = snapshot();
    assert_goodput("wireguard-go at 512 kbit/s", goodput, 512);
    assert_counters_match(before, after);
    assert!(after.0.rx_dropped.rate_limit.packets > 0, "the limit dropped packets: {:?}", after.0);

    let before = snapshot();
    let goodput = tcp_goodput(&lab, user, TcpDirection::Download, 8);
    settle();
    let after = snapshot();
    assert_goodput("wireguard-go at 512 kbit/s, download", goodput, 512);
    assert_counters_match(before, after);
    let dropped = after.0.tx_dropped.rate_limit.packets - before.0.tx_dropped.rate_limit.packets;
    assert!(dropped > 0, "the limit dropped packets toward the client: {:?}", after.0);
    drop(_measuring);

    // An exported configuration still works after the agent restarts, because the session is
    // stored and the counters are pinned.
    drop(wireguard);
    lab.stop_agent();
    lab.start_agent().unwrap();
    let wireguard = WireguardGo::start(user, &out).unwrap();
    let before = lab.counters(address).unwrap().unwrap();
    assert_eq!(before, after.0, "the counters survive the restart");
    assert_eq!(ping(user, 3, 100).unwrap(), 3, "ping after the restart, without logging in again");
    settle();
    let counted = lab.counters(address).unwrap().unwrap();
    assert_eq!(counted.rx_packets - before.rx_packets, 3);
    assert_eq!(counted.tx_bytes - before.tx_bytes, 3 * 128);
    drop(wireguard);
}

#[test]
fn connect_limits_disable_reconnect() {
    let lab = lab(2);
    let (instance, fingerprint) = lab.create_instance().unwrap();
    lab.create_account(&instance, "alice-dyn", 512, None).unwrap();
    let static_ip = Ipv4Addr::new(10, 77, 0, 200);
    lab.create_account(&instance, "bob-static", 2_000, Some(static_ip)).unwrap();

    let line = lab.connect(0, &fingerprint, &instance, "alice-dyn").unwrap();
    let alice = connected_address(&line).unwrap();
    assert_eq!(
        line,
        format!("Connected to intranet as {alice} (instance {instance}, via 203.0.113.1:51820)")
    );
    let resolv = lab.dir.join("user0.resolv.conf");
    let applied = std::fs::read_to_string(&resolv).unwrap();
    assert!(applied.ends_with("nameserver 198.18.0.53\n"), "{applied}");
    let bob =
        connected_address(&lab.connect(1, &fingerprint, &instance, "bob-static").unwrap()).unwrap();
    assert_eq!(bob, static_ip);
    assert_ne!(alice, bob);

    // Both users at once, each counted under their own address.
    let (alice_replies, bob_replies) = std::thread::scope(|scope| {
        let first = scope.spawn(|| ping(&lab.users[0], 4, 100).unwrap());
        let second = scope.spawn(|| ping(&lab.users[1], 6, 200).unwrap());
        (first.join().unwrap(), second.join().unwrap())
    });
    assert_eq!((alice_replies, bob_replies), (4, 6));
    settle();
    let counted = lab.counters(alice).unwrap().unwrap();
    assert_eq!((counted.rx_packets, counted.rx_bytes, counted.tx_bytes), (4, 4 * 128, 4 * 128));
    let counted = lab.counters(bob).unwrap().unwrap();
    assert_eq!((counted.rx_packets, counted.rx_bytes, counted.tx_bytes), (6, 6 * 228, 6 * 228));

    {
        let _measuring = measuring();
        let user = &lab.users[0];
        let snapshot =
            || (lab.counters(alice).unwrap().unwrap(), link_stats(user, "sag0").unwrap());
        let before = snapshot();
        let goodput = tcp_goodput(&lab, user, TcpDirection::Upload, 8);
        settle();
        assert_goodput("sag connect at 512 kbit/s", goodput, 512);
        assert_counters_match(before, snapshot());
        // A changed bandwidth applies at once to the existing session.
        lab.admin(&["account", "set", &instance, "alice-dyn", "--bandwidth", "1000"]).unwrap();
        let goodput = tcp_goodput(&lab, user, TcpDirection::Upload, 8);
        assert_goodput("sag connect after the change to 1,000 kbit/s", goodput, 1_000);
    }

    // Disabling an account cuts the user off within a second.
    let pinger = Command::new("ip")
        .args(["netns", "exec", lab.users[1].name(), "ping", "-n", "-D", "-i", "0.05"])
        .args(["-c", "80", "-W", "1", &COMPANY_SERVER.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1_500));
    let disabled_at = std::time::SystemTime::now();
    lab.admin(&["account", "disable", &instance, "bob-static"]).unwrap();
    let output = pinger.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let replies: Vec<f64> = text
        .lines()
        .filter(|line| line.contains("bytes from"))
        .map(|line| line[1..line.find(']').unwrap()].parse().unwrap())
        .collect();
    let disabled_at = disabled_at.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let last = replies.last().copied().unwrap();
    assert!(replies.len() > 10, "replies before the disable: {text}");
    assert!(last - disabled_at < 1.0, "a reply came {:.3} s after disabling", last - disabled_at);

    // A disabled account cannot log in again.
    let password_file = lab.password_file("bob-static");
    let output = lab.try_connect(1, &fingerprint, &instance, "bob-static", &password_file).unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("account bob-static of instance {instance} is disabled")),
        "{stderr}"
    );

    // A dynamic account gets another address when it reconnects, but a static one keeps its
    // own.
    assert_eq!(lab.disconnect(0).unwrap(), format!("Disconnected from intranet ({alice} on sag0)"));
    assert_eq!(std::fs::read_to_string(&resolv).unwrap(), "nameserver 192.0.2.53\n");
    assert_eq!(lab.counters(alice).unwrap(), None, "a logged-out dynamic address is no client");
    let again =
        connected_address(&lab.connect(0, &fingerprint, &instance, "alice-dyn").unwrap()).unwrap();
    assert_ne!(again, alice);
    assert_eq!(ping(&lab.users[0], 2, 100).unwrap(), 2);
    lab.admin(&["account", "enable", &instance, "bob-static"]).unwrap();
    lab.disconnect(1).unwrap();
    assert_eq!(
        connected_address(&lab.connect(1, &fingerprint, &instance, "bob-static").unwrap()).unwrap(),
        bob
    );
    assert_eq!(ping(&lab.users[1], 2, 100).unwrap(), 2);
}

/// Runs `connect` as user 0 with `username` and `password`, and returns whether it succeeded
/// and its standard error.
fn try_login(
    lab: &Lab,
    instance: &str,
    fingerprint: &str,
    username: &str,
    password: &str,
) -> (bool, String) {
    let file = lab.dir.join(unique_name("pw"));
    std::fs::write(&file, password).unwrap();
    let output = lab.try_connect(0, fingerprint, instance, username, &file).unwrap();
    (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn rejected_logins_allocate_nothing() {
    let lab = lab(1);
    let (instance, fingerprint) = lab.create_instance().unwrap();
    lab.create_account(&instance, "carol-one", 512, None).unwrap();
    lab.create_account(&instance, "dave-two1", 512, None).unwrap();
    lab.admin(&["account", "disable", &instance, "dave-two1"]).unwrap();
    let good = "Pw_carol-one_2026";

    let (ok, stderr) = try_login(&lab, &instance, &fingerprint, "carol-one", "Wrong_pass1");
    assert!(!ok);
    assert!(
        stderr.contains(&format!("wrong username or password for instance {instance}")),
        "{stderr}"
    );
    let (ok, stderr) = try_login(&lab, &instance, &fingerprint, "nobody-here", good);
    assert!(!ok);
    assert!(stderr.contains("wrong username or password"), "unknown users look the same: {stderr}");
    let (ok, stderr) = try_login(&lab, "sag-0000000000000000", &fingerprint, "carol-one", good);
    assert!(!ok);
    assert!(stderr.contains("instance sag-0000000000000000 not found"), "{stderr}");
    let (ok, stderr) = try_login(&lab, &instance, &fingerprint, "dave-two1", "Pw_dave-two1_2026");
    assert!(!ok);
    assert!(
        stderr.contains(&format!("account dave-two1 of instance {instance} is disabled")),
        "{stderr}"
    );
    let wrong_pin = format!("sha256:{}", "00".repeat(32));
    let (ok, stderr) = try_login(&lab, &instance, &wrong_pin, "carol-one", good);
    assert!(!ok);
    assert!(
        stderr.contains(&format!("expected {wrong_pin}, server presented {fingerprint}")),
        "{stderr}"
    );
    assert!(
        PinnedCounters::open(&lab.pin_dir).unwrap().clients().unwrap().is_empty(),
        "rejected logins put no client in the kernel"
    );
    let details: Value =
        serde_json::from_str(&lab.admin(&["instance", "show", &instance, "--json"]).unwrap())
            .unwrap();
    assert_eq!(details["instance"]["tunnel"]["sessions"], 0);

    // The source address now has 3 failed logins (wrong password, unknown user, unknown
    // instance). After 5, even the right password is throttled.
    for password in ["Wrong_pass2", "Wrong_pass3"] {
        let (ok, stderr) = try_login(&lab, &instance, &fingerprint, "carol-one", password);
        assert!(!ok);
        assert!(stderr.contains("wrong username or password"), "{stderr}");
    }
    let (ok, stderr) = try_login(&lab, &instance, &fingerprint, "carol-one", good);
    assert!(!ok);
    assert!(stderr.contains("too many failed logins; try again in "), "{stderr}");
}

#[test]
fn idle_session_releases_address() {
    let lab = lab(2);
    let (instance, fingerprint) = lab.create_instance().unwrap();
    lab.create_account(&instance, "erin-idle", 512, None).unwrap();
    lab.create_account(&instance, "gina-stays", 512, None).unwrap();
    // A second user stays connected and sends nothing but its keepalives.
    let staying =
        connected_address(&lab.connect(1, &fingerprint, &instance, "gina-stays").unwrap()).unwrap();
    let address =
        connected_address(&lab.connect(0, &fingerprint, &instance, "erin-idle").unwrap()).unwrap();
    assert_eq!(ping(&lab.users[0], 1, 100).unwrap(), 1);
    assert!(lab.counters(address).unwrap().is_some());

    // Simulate a crashed client: SIGKILL the tunnel process, so it cannot log out.
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(lab.run_dir(0).join("sag0.json")).unwrap())
            .unwrap();
    let pid = libc::pid_t::try_from(state["pid"].as_u64().unwrap()).unwrap();
    // SAFETY: kill has no memory preconditions. The process is the tunnel process that this
    // test started through `connect`.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);

    // The lab's idle time is 240 s, and the agent scans for idle sessions every 10 s.
    let start = Instant::now();
    while lab.counters(address).unwrap().is_some() {
        assert!(start.elapsed() < Duration::from_secs(270), "the session did not end when idle");
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(start.elapsed() >= Duration::from_secs(225), "ended after {:?}", start.elapsed());
    assert!(lab.agent_log().contains("reason=\"idle\""), "{}", lab.agent_log());
    let details: Value =
        serde_json::from_str(&lab.admin(&["instance", "show", &instance, "--json"]).unwrap())
            .unwrap();
    assert_eq!(details["instance"]["tunnel"]["sessions"], 1);
    // The other session lived on past the idle time: its keepalives made new handshakes once
    // its keys expired.
    std::thread::sleep(Duration::from_secs(15));
    assert!(lab.counters(staying).unwrap().is_some(), "a live session ended: {}", lab.agent_log());
    assert_eq!(ping(&lab.users[1], 2, 100).unwrap(), 2);
}

#[test]
fn block_change_ends_outside_sessions() {
    let lab = lab(1);
    let (instance, fingerprint) = lab.create_instance().unwrap();
    lab.create_account(&instance, "frank-blk", 512, None).unwrap();
    let line = lab.connect(0, &fingerprint, &instance, "frank-blk").unwrap();
    let old = connected_address(&line).unwrap();
    assert!(lab.counters(old).unwrap().is_some());

    lab.admin(&["network", "set", &instance, "--cidr-block", "10.78.0.0/24"]).unwrap();
    assert_eq!(lab.counters(old).unwrap(), None, "the old address is no client any more");
    let details: Value =
        serde_json::from_str(&lab.admin(&["instance", "show", &instance, "--json"]).unwrap())
            .unwrap();
    assert_eq!(details["instance"]["tunnel"]["sessions"], 0);
    assert!(lab.agent_log().contains("address outside the new blocks"), "{}", lab.agent_log());

    lab.disconnect(0).unwrap();
    let new =
        connected_address(&lab.connect(0, &fingerprint, &instance, "frank-blk").unwrap()).unwrap();
    assert_eq!(new, Ipv4Addr::new(10, 78, 0, 1));
    assert_eq!(ping(&lab.users[0], 2, 100).unwrap(), 2);
}

#[test]
fn new_login_replaces_the_session() {
    let lab = lab(2);
    let (instance, fingerprint) = lab.create_instance().unwrap();
    lab.create_account(&instance, "hana-twice", 512, None).unwrap();
    let line = lab.connect(0, &fingerprint, &instance, "hana-twice").unwrap();
    let first = connected_address(&line).unwrap();
    assert_eq!(ping(&lab.users[0], 2, 100).unwrap(), 2);

    // The same account exports a configuration from another machine: a new login.
    let out = lab.dir.join("hana.conf");
    let mut args = vec!["client-config".to_owned()];
    args.extend(lab.login_args(&fingerprint, &instance, "hana-twice"));
    args.extend(["--out".to_owned(), out.display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = lab.user_command(1, &args).unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let config = std::fs::read_to_string(&out).unwrap();
    let second: Ipv4Addr = config
        .lines()
        .find_map(|line| line.strip_prefix("Address = "))
        .unwrap()
        .trim_end_matches("/32")
        .parse()
        .unwrap();
    assert_ne!(second, first, "a dynamic account gets another address");

    // One session: the first address left the kernel, and its tunnel carries nothing more.
    let details: Value =
        serde_json::from_str(&lab.admin(&["instance", "show", &instance, "--json"]).unwrap())
            .unwrap();
    assert_eq!(details["instance"]["tunnel"]["sessions"], 1);
    assert_eq!(lab.counters(first).unwrap(), None);
    assert!(lab.counters(second).unwrap().is_some());
    assert_eq!(ping(&lab.users[0], 2, 100).unwrap(), 0, "the replaced session is cut off");
    let wireguard = WireguardGo::start(&lab.users[1], &out).unwrap();
    assert_eq!(ping(&lab.users[1], 2, 100).unwrap(), 2);
    drop(wireguard);
}

#[test]
fn watch_refuses_the_agents_clients() {
    let lab = lab(0);
    let (instance, _) = lab.create_instance().unwrap();
    let address = Ipv4Addr::new(10, 77, 0, 50);
    lab.create_account(&instance, "ivan-static", 512, Some(address)).unwrap();
    let before = sag_agent::dataplane::PinnedCounters::open(&lab.pin_dir)
        .unwrap()
        .client_record(address)
        .unwrap()
        .unwrap();
    let output = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.gateway.name()))
        .arg(&lab.binary)
        .args(["dataplane", "watch", "--tunnel", "sagwg1", "--framing", "l3", "--count", "1"])
        .args(["--client", &address.to_string(), "--pin-dir"])
        .arg(&lab.pin_dir)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("invalid --client 10.77.0.50: it is a client of instance number"),
        "{stderr}"
    );
    let after = sag_agent::dataplane::PinnedCounters::open(&lab.pin_dir)
        .unwrap()
        .client_record(address)
        .unwrap()
        .unwrap();
    assert_eq!(after, before, "the agent's record is unchanged");
}
