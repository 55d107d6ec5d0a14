//! `sag-agent monitor` against a running agent: the history it prints must equal the kernel
//! counters over the same minutes. A user pings through a real tunnel across a minute boundary,
//! and the test compares the recorded minutes with the pinned counters read before and after.
//!
//! The lab test needs root, ping and nsenter, and about three minutes of wall time, because the
//! agent stores a minute only once it has ended.

use std::{
    net::Ipv4Addr,
    path::Path,
    process::{Command, Output},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use sag_agent::testing::lab::{connected_address, ping_summary, Lab};
use sag_common::counters::ClientCounters;
use serde_json::Value;

/// Size of the image `--png` draws, in pixels: two columns and four rows of charts.
const PNG_SIZE: (u32, u32) = (1000, 900);
/// Time after a minute boundary by which the agent has stored the minute that ended. It
/// usually records within a second, so this leaves room for a busy machine.
const RECORD_DEADLINE: Duration = Duration::from_secs(30);

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_sag-agent"))
}

/// Runs `sag-agent monitor` with `args` against the lab's socket.
fn monitor(lab: &Lab, args: &[&str]) -> Output {
    Command::new(binary())
        .arg("monitor")
        .args(args)
        .arg("--socket")
        .arg(lab.socket())
        .output()
        .expect("sag-agent starts")
}

/// Runs `sag-agent monitor` with `args` and returns its standard output, failing the test with
/// its standard error if it exits non-zero.
fn monitor_ok(lab: &Lab, args: &[&str]) -> String {
    let output = monitor(lab, args);
    assert!(
        output.status.success(),
        "monitor {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Traffic of one account as the monitor's raw counts: bytes, packets and dropped packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Traffic {
    rx_bytes: u64,
    tx_bytes: u64,
    rx_packets: u64,
    tx_packets: u64,
    rx_dropped_packets: u64,
    tx_dropped_packets: u64,
}

impl Traffic {
    /// Returns the counts of the kernel counters. Dropped packets are those of every reason,
    /// as the agent records them.
    fn of_kernel(counters: &ClientCounters) -> Self {
        let dropped = |d: &sag_common::counters::DropCounters| {
            d.rate_limit.packets + d.blocked.packets + d.not_allowed.packets
        };
        Self {
            rx_bytes: counters.rx_bytes,
            tx_bytes: counters.tx_bytes,
            rx_packets: counters.rx_packets,
            tx_packets: counters.tx_packets,
            rx_dropped_packets: dropped(&counters.rx_dropped),
            tx_dropped_packets: dropped(&counters.tx_dropped),
        }
    }

    /// Returns the counts of a figures object of `monitor --json`.
    fn of_json(figures: &Value) -> Self {
        let field =
            |name: &str| figures[name].as_u64().unwrap_or_else(|| panic!("{name} in {figures}"));
        Self {
            rx_bytes: field("rx_bytes"),
            tx_bytes: field("tx_bytes"),
            rx_packets: field("rx_packets"),
            tx_packets: field("tx_packets"),
            rx_dropped_packets: field("rx_dropped_packets"),
            tx_dropped_packets: field("tx_dropped_packets"),
        }
    }

    fn since(&self, before: &Self) -> Self {
        Self {
            rx_bytes: self.rx_bytes - before.rx_bytes,
            tx_bytes: self.tx_bytes - before.tx_bytes,
            rx_packets: self.rx_packets - before.rx_packets,
            tx_packets: self.tx_packets - before.tx_packets,
            rx_dropped_packets: self.rx_dropped_packets - before.rx_dropped_packets,
            tx_dropped_packets: self.tx_dropped_packets - before.tx_dropped_packets,
        }
    }
}

/// Returns the kernel counters of the client at `address`.
fn kernel_traffic(lab: &Lab, address: Ipv4Addr) -> Traffic {
    let counters = lab.counters(address).unwrap();
    let counters = counters.unwrap_or_else(|| panic!("{address} in the kernel"));
    Traffic::of_kernel(&counters)
}

fn unix_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap()
}

/// Sleeps until `offset` past the next minute boundary of the wall clock and returns that
/// boundary, in Unix seconds.
fn sleep_past_next_minute(offset: Duration) -> i64 {
    let now = unix_now();
    let boundary = (now.as_secs() / 60 + 1) * 60;
    std::thread::sleep(Duration::from_secs(boundary) + offset - now);
    i64::try_from(boundary).unwrap()
}

/// Sleeps until the Unix time `seconds`, if it is still ahead.
fn sleep_until(seconds: i64) {
    let target = Duration::from_secs(u64::try_from(seconds).unwrap());
    if let Some(wait) = target.checked_sub(unix_now()) {
        std::thread::sleep(wait);
    }
}

/// Formats `time` in UTC as `YYYY-MM-DD HH:MM`, the second format `--from` and `--to` accept.
fn plain_time(seconds: i64) -> String {
    chrono::DateTime::from_timestamp(seconds, 0).unwrap().format("%Y-%m-%d %H:%M").to_string()
}

fn rfc3339(seconds: i64) -> String {
    chrono::DateTime::from_timestamp(seconds, 0).unwrap().to_rfc3339()
}

/// Formats `value` with commas between thousands, as the table prints whole bytes.
fn grouped(value: u64) -> String {
    let digits = value.to_string();
    let mut text = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            text.push(',');
        }
        text.push(digit);
    }
    text
}

/// An account's rx and tx bytes in the store, summed over its rows in `usage` (by month) and in
/// `usage_days` (by day).
struct StoredUsage {
    monthly: (u64, u64),
    daily: (u64, u64),
}

/// Reads an account's usage from the lab agent's store, through a read-only connection beside
/// the running agent.
fn stored_usage(lab: &Lab, instance: &str, username: &str) -> StoredUsage {
    use sqlx::{Connection as _, Row as _};
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(lab.dir.join("state").join("sag.db"))
        .read_only(true);
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    runtime.block_on(async {
        let mut connection = sqlx::SqliteConnection::connect_with(&options).await.unwrap();
        let mut sums = Vec::new();
        for table in ["usage", "usage_days"] {
            let row = sqlx::query(&format!(
                "SELECT COALESCE(SUM(rx_bytes), 0) AS rx, COALESCE(SUM(tx_bytes), 0) AS tx \
                 FROM {table} WHERE instance_id = $1 AND username = $2"
            ))
            .bind(instance)
            .bind(username)
            .fetch_one(&mut connection)
            .await
            .unwrap();
            let (rx, tx): (i64, i64) = (row.get("rx"), row.get("tx"));
            sums.push((u64::try_from(rx).unwrap(), u64::try_from(tx).unwrap()));
        }
        StoredUsage { monthly: sums[0], daily: sums[1] }
    })
}

#[test]
fn monitor_matches_kernel_counters() {
    let lab = Lab::start(binary(), 1).expect("lab starts (as root)");
    // This test keeps one session for about 3 minutes, part of them without traffic, so its
    // agent runs with the default idle time of 300 s instead of the lab's 240 s.
    lab.restart_agent_with_session_idle(300).unwrap();
    let (instance, fingerprint) = lab.create_instance().unwrap();
    let username = "mona-user1";
    // 512 kbit/s, so that a burst of pings overflows the bucket and some are dropped.
    lab.create_account(&instance, username, 512, None).unwrap();
    let address =
        connected_address(&lab.connect(0, &fingerprint, &instance, username).unwrap()).unwrap();

    // B0 is the next minute boundary. No traffic flows between the agent's reading at B0,
    // which closes minute B0 - 1, and the pings, so the counters read here equal that reading.
    let start = sleep_past_next_minute(Duration::from_secs(2));
    let before = kernel_traffic(&lab, address);

    // Pings from B0 + 50 s for 12 s cross the boundary B1, then a burst is partly dropped.
    sleep_until(start + 50);
    let steady = ping_summary(&lab.users[0], 60, 100, Duration::from_millis(200)).unwrap();
    assert!(steady.contains("60 packets transmitted, 60 received"), "{steady}");
    let burst = ping_summary(&lab.users[0], 100, 1_000, Duration::from_millis(2)).unwrap();
    eprintln!("burst of 100 pings at 512 kbit/s: {burst}");
    std::thread::sleep(Duration::from_secs(1));
    let after = kernel_traffic(&lab, address);
    let kernel = after.since(&before);
    eprintln!("kernel counters over the test: {kernel:?}");
    assert!(kernel.rx_bytes >= 60 * 128, "60 echo requests of 128 B went through: {kernel:?}");
    assert!(kernel.rx_dropped_packets > 0, "the burst exceeded the limit: {kernel:?}");

    // Minutes B0 and B1, stored once B2 has passed.
    let end = start + 120;
    assert!(unix_now().as_secs() < u64::try_from(end).unwrap(), "the traffic ended before B2");
    let (from, to) = (rfc3339(start), plain_time(end));
    let account_args = [instance.as_str(), "--account", username, "--from", &from, "--to", &to];
    let json_args: Vec<&str> = account_args.iter().copied().chain(["--json"]).collect();
    sleep_until(end + 2);
    let deadline = unix_now() + RECORD_DEADLINE;
    let report: Value = loop {
        let report: Value = serde_json::from_str(&monitor_ok(&lab, &json_args)).unwrap();
        if Traffic::of_json(&report["total"]) == kernel || unix_now() > deadline {
            break report;
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    let recorded = Traffic::of_json(&report["total"]);
    eprintln!("monitor over {from} to {to}: {recorded:?}");
    assert_eq!(recorded.rx_bytes, kernel.rx_bytes, "rxBytes");
    assert_eq!(recorded.tx_bytes, kernel.tx_bytes, "txBytes");
    assert_eq!(recorded.rx_packets, kernel.rx_packets, "rx packets");
    assert_eq!(recorded.tx_packets, kernel.tx_packets, "tx packets");
    assert_eq!(recorded.rx_dropped_packets, kernel.rx_dropped_packets, "rx dropped packets");
    assert_eq!(recorded.tx_dropped_packets, kernel.tx_dropped_packets, "tx dropped packets");

    // The derived figures of the two minutes.
    let total = &report["total"];
    assert_eq!(report["from"], start);
    assert_eq!(report["to"], end);
    assert_eq!(report["username"], username);
    assert_eq!(total["minutes"], 2);
    let rx_bytes = kernel.rx_bytes as f64;
    assert_eq!(total["rx_bits_per_second"].as_f64(), Some(rx_bytes * 8.0 / 120.0));
    assert_eq!(total["tx_bits_per_second"].as_f64(), Some(kernel.tx_bytes as f64 * 8.0 / 120.0));
    assert_eq!(total["rx_bytes_per_hour"].as_f64(), Some(rx_bytes * 3600.0 / 120.0));
    assert_eq!(
        total["rx_dropped_packets_per_minute"].as_f64(),
        Some(kernel.rx_dropped_packets as f64 / 2.0)
    );

    // One row per minute, each with part of the pings, adding up to the total.
    assert_eq!(report["bucket_minutes"], 1);
    let buckets = report["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), 2);
    assert_eq!(buckets[0]["start"], start);
    assert_eq!(buckets[1]["start"], start + 60);
    let first = Traffic::of_json(&buckets[0]);
    let second = Traffic::of_json(&buckets[1]);
    assert!(first.rx_packets > 0, "pings before B1: {first:?}");
    assert!(second.rx_packets > 0, "pings after B1: {second:?}");
    assert_eq!(first.rx_bytes + second.rx_bytes, kernel.rx_bytes);
    assert_eq!(first.tx_bytes + second.tx_bytes, kernel.tx_bytes);

    // The instance has only this account, so its figures are the account's.
    let instance_args = [instance.as_str(), "--from", &from, "--to", &to, "--json"];
    let whole: Value = serde_json::from_str(&monitor_ok(&lab, &instance_args)).unwrap();
    assert_eq!(whole["username"], Value::Null);
    assert_eq!(whole["total"], report["total"], "instance and its only account");
    assert_eq!(whole["buckets"], report["buckets"]);

    // The default range: the last hour in twelve rows of 5 minutes. It covers the whole
    // session, whose counters started at zero when the address was assigned.
    let last_hour: Value =
        serde_json::from_str(&monitor_ok(&lab, &[instance.as_str(), "--json"])).unwrap();
    assert_eq!(last_hour["to"].as_i64().unwrap() - last_hour["from"].as_i64().unwrap(), 3600);
    assert_eq!(last_hour["bucket_minutes"], 5);
    assert_eq!(last_hour["buckets"].as_array().unwrap().len(), 12);
    assert_eq!(Traffic::of_json(&last_hour["total"]), after, "all of the session's traffic");

    // Billing reads the same readings: the account's monthly and daily usage rows hold the
    // whole session's bytes, written in the transaction of each minute.
    let usage = stored_usage(&lab, &instance, username);
    assert_eq!(usage.monthly, (after.rx_bytes, after.tx_bytes), "usage by month");
    assert_eq!(usage.daily, (after.rx_bytes, after.tx_bytes), "usage by day");

    // The table, in bytes: the eight figures and the total of rxBytes.
    let table_args: Vec<&str> = account_args.iter().copied().chain(["--unit", "b"]).collect();
    let table = monitor_ok(&lab, &table_args);
    eprintln!("{table}");
    for name in [
        "rxBytes",
        "txBytes",
        "rxBit/s",
        "txBit/s",
        "rxDropPackets",
        "txDropPackets",
        "rxBytesHour",
        "txBytesHour",
    ] {
        assert!(table.contains(name), "{name} in the table:\n{table}");
    }
    let total_row: Vec<&str> = table
        .lines()
        .find(|line| line.starts_with("total"))
        .unwrap_or_else(|| panic!("a total row:\n{table}"))
        .split_whitespace()
        .collect();
    assert_eq!(total_row[1], grouped(kernel.rx_bytes), "rxBytes total in B");
    assert_eq!(total_row[2], grouped(kernel.tx_bytes), "txBytes total in B");

    // The PNG: a valid image of the expected size with bars in both directions' colours.
    let png = lab.dir.join("monitor.png");
    let png_path = png.to_str().unwrap();
    let png_args: Vec<&str> = account_args.iter().copied().chain(["--png", png_path]).collect();
    let output = monitor_ok(&lab, &png_args);
    assert!(output.contains(&format!("charts written to {png_path}")), "{output}");
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    let image = image::load_from_memory(&bytes).expect("the PNG decodes").to_rgb8();
    assert_eq!(image.dimensions(), PNG_SIZE);
    let blue = image.pixels().filter(|pixel| pixel.0 == [31, 119, 180]).count();
    let orange = image.pixels().filter(|pixel| pixel.0 == [230, 120, 20]).count();
    assert!(blue > 0, "rx charts have bars");
    assert!(orange > 0, "tx charts have bars");

    // An account the instance does not have.
    let output = monitor(&lab, &[instance.as_str(), "--account", "nobody-here"]);
    assert_eq!(output.status.code(), Some(4), "{}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn monitor_rejects_invalid_ranges() {
    // Checked before any request, so no agent is needed: an unreachable socket would fail
    // with exit code 1 instead.
    let socket = std::env::temp_dir().join("sag-monitor-test-no-agent.sock");
    let run = |args: &[&str]| {
        let output = Command::new(binary())
            .arg("monitor")
            .args(args)
            .arg("--socket")
            .arg(&socket)
            .output()
            .unwrap();
        (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
    };
    let instance = "sag-0000000000000001";

    let (code, stderr) = run(&[instance, "--from", "2026-05-01 10:00", "--to", "2026-05-01 09:00"]);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains("invalid --to \"2026-05-01 09:00\""), "{stderr}");
    assert!(stderr.contains("at least one whole minute after --from"), "{stderr}");

    let (code, stderr) = run(&[instance, "--from", "2026-04-01 10:00", "--to", "2026-05-01 10:00"]);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains("invalid --from \"2026-04-01 10:00\""), "{stderr}");
    assert!(stderr.contains("at most 15 days"), "{stderr}");

    let (code, stderr) = run(&[instance, "--from", "last tuesday"]);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains("must be RFC 3339"), "{stderr}");

    let (code, stderr) = run(&["sag-BAD", "--range", "1h"]);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains("instance_id"), "{stderr}");

    let (code, stderr) = run(&[instance, "--range", "2h"]);
    assert_eq!(code, Some(2), "clap rejects an unknown range: {stderr}");

    let (code, stderr) = run(&[instance, "--range", "1h", "--from", "2026-05-01 10:00"]);
    assert_eq!(code, Some(2), "--range and --from conflict: {stderr}");

    let (code, stderr) = run(&[instance, "--range", "1h"]);
    assert_eq!(code, Some(1), "a valid request reaches for the agent: {stderr}");
    assert!(stderr.contains("cannot reach the agent"), "{stderr}");
}

/// The recorder keeps [`HISTORY_DAYS`] of minutes: at each recording it deletes the minutes
/// that start more than that before the minute it stores, and keeps the rest.
#[test]
fn history_keeps_sixteen_days() {
    use sag_agent::{
        admin::{Admin, NewInstance},
        clock::ManualClock,
        history::{Recorder, HISTORY_DAYS},
        kernel::KernelSync,
        store::Store,
        testing::netns::unique_name,
    };
    use sqlx::Row as _;

    /// Directories removed when dropped: the store's and the pinned maps'.
    struct Dirs([std::path::PathBuf; 2]);
    impl Drop for Dirs {
        fn drop(&mut self) {
            for dir in &self.0 {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    assert_eq!(HISTORY_DAYS, 16);
    let dirs = Dirs([
        std::env::temp_dir().join(unique_name("sag-history-test-")),
        Path::new("/sys/fs/bpf").join(unique_name("sag-history-test-")),
    ]);
    std::fs::create_dir_all(&dirs.0[0]).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let store = Store::open_sqlite(&dirs.0[0].join("sag.db")).await.unwrap();
        let now = chrono::DateTime::parse_from_rfc3339("2026-06-20T12:00:30Z").unwrap().to_utc();
        let clock = std::sync::Arc::new(ManualClock::new(now));
        let admin = Admin::new(store.clone(), clock.clone(), 2_000);
        let new = NewInstance {
            owner: "retention".to_owned(),
            area: "eu-central-1".to_owned(),
            account_quota: 5,
            months: 1,
        };
        let instance = admin.create_instance(&new).await.unwrap().id;
        // The recording at 12:00:30 stores the minute 11:59, so the cutoff is 16 days before
        // 11:59: that minute is kept, the one before it deleted.
        let stored = now.timestamp() - 30 - 60;
        let cutoff = stored - 16 * 24 * 60 * 60;
        for minute in [cutoff - 60, cutoff, cutoff + 60, stored - 60] {
            sqlx::query(
                "INSERT INTO traffic_minutes (instance_id, username, minute, rx_bytes, tx_bytes, \
                 rx_packets, tx_packets, rx_dropped_packets, tx_dropped_packets) \
                 VALUES ($1, 'ret-user1', $2, 1, 1, 1, 1, 0, 0)",
            )
            .bind(&instance)
            .bind(minute)
            .execute(store.pool())
            .await
            .unwrap();
        }
        let kernel = std::sync::Arc::new(KernelSync::load(&dirs.0[1]).unwrap());
        let mut recorder = Recorder::new(admin, kernel, clock);
        assert_eq!(recorder.record().await.unwrap(), 0, "the first recording is the baseline");
        recorder.record().await.unwrap();
        let minutes: Vec<i64> = sqlx::query("SELECT minute FROM traffic_minutes ORDER BY minute")
            .fetch_all(store.pool())
            .await
            .unwrap()
            .iter()
            .map(|row| row.get("minute"))
            .collect();
        assert_eq!(minutes, [cutoff, cutoff + 60, stored - 60]);
    });
}
