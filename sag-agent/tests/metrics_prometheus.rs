//! The agent's `/metrics` endpoint against real parts: the whole box in namespaces
//! (`testing::lab`), `promtool` on its output and on the shipped rules, and a real Prometheus
//! that scrapes the agent during a traffic test and evaluates deploy/prometheus/rules.yml.
//!
//! The tests need root, and ping, iperf3, nsenter, promtool and prometheus (Debian's
//! `prometheus` package).

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex, MutexGuard,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use hyper::Method;
use sag_agent::{
    admin::{CreatedAccount, Instance},
    api::{CreateAccountBody, CreateInstanceBody, NetworkBody},
    api_client::ApiClient,
    testing::{
        lab::{connected_address, ping, ping_with_interval, settle, Lab, COMPANY_SERVER},
        netns::Netns,
        traffic::Iperf3Server,
    },
};
use sag_common::counters::{ClientCounters, DropCounters};
use serde_json::Value;

/// Port of the agent's metrics endpoint in the lab, the default `agent.metrics_listen`.
const METRICS_PORT: u16 = 9108;
/// Port of the test's Prometheus, on loopback in the gateway namespace.
const PROMETHEUS_PORT: u16 = 9090;
/// Agreement required between Prometheus' figures and the kernel's counters.
const TOLERANCE: f64 = 0.05;

/// Lock that the load and traffic tests take, so that neither measures under the other's load.
static HEAVY: Mutex<()> = Mutex::new(());

fn heavy() -> MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn lab(users: u8) -> Lab {
    Lab::start(Path::new(env!("CARGO_BIN_EXE_sag-agent")), users).expect("lab starts (as root)")
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// An HTTP response: status code, headers in lower case, body.
struct HttpResponse {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

/// Sends `GET path` to 127.0.0.1:`port` in `netns` as HTTP/1.0, so that the reply comes
/// whole, without chunks, and the server closes the connection.
fn try_http_get(netns: &Netns, port: u16, path: &str) -> std::io::Result<HttpResponse> {
    let raw = netns
        .enter(|| {
            let mut stream = TcpStream::connect(("127.0.0.1", port))?;
            stream.set_read_timeout(Some(Duration::from_secs(30)))?;
            write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n")?;
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw)?;
            std::io::Result::Ok(raw)
        })
        .map_err(std::io::Error::other)??;
    let text = String::from_utf8(raw).map_err(std::io::Error::other)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no end of headers in {text}")))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|status| status.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {head}")))?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_lowercase(), value.trim().to_owned()))
        .collect();
    Ok(HttpResponse { status, headers, body: body.to_owned() })
}

fn http_get(netns: &Netns, port: u16, path: &str) -> HttpResponse {
    try_http_get(netns, port, path)
        .unwrap_or_else(|error| panic!("GET {path} on port {port}: {error}"))
}

/// Scrapes the agent in the lab and returns the exposition text.
fn scrape(lab: &Lab) -> String {
    let response = http_get(&lab.gateway, METRICS_PORT, "/metrics");
    assert_eq!(response.status, 200, "{}", response.body);
    response.body
}

/// One sample of the text exposition format.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the samples of an exposition text. Label values must not contain `,`, `"` or `}`,
/// which is true for instance IDs, usernames and the other labels of the agent.
fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (label, value) = pair.split_once('=').unwrap();
                    (label.to_owned(), value.trim_matches('"').to_owned())
                })
                .collect();
            Sample { name: name.to_owned(), labels, value: value.parse().unwrap() }
        })
        .collect()
}

/// Returns the value of the one sample of `name` with exactly `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let expected: BTreeMap<String, String> =
        labels.iter().map(|(label, value)| ((*label).to_owned(), (*value).to_owned())).collect();
    let found: Vec<&Sample> =
        samples.iter().filter(|sample| sample.name == name && sample.labels == expected).collect();
    assert_eq!(found.len(), 1, "{name}{expected:?}: {found:?}");
    found[0].value
}

/// Runs `promtool check metrics` on `text` and returns its exit status and output.
fn promtool_check_metrics(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (Debian package prometheus)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), report)
}

fn counters(lab: &Lab, address: Ipv4Addr) -> ClientCounters {
    let counters = lab.counters(address).unwrap();
    counters.unwrap_or_else(|| panic!("{address} is a client in the kernel"))
}

fn dropped_packets(drops: &DropCounters) -> u64 {
    drops.rate_limit.packets + drops.blocked.packets + drops.not_allowed.packets
}

/// Asserts that the scraped `sag_account_*` series of `account` equal `kernel` exactly.
fn assert_account_matches(
    samples: &[Sample],
    instance: &str,
    account: &str,
    kernel: &ClientCounters,
) {
    let labels =
        |direction| [("instance", instance), ("account", account), ("direction", direction)];
    let bytes = |direction| value(samples, "sag_account_bytes_total", &labels(direction));
    let packets = |direction| value(samples, "sag_account_packets_total", &labels(direction));
    let dropped = |direction, reason| {
        let mut with_reason = labels(direction).to_vec();
        with_reason.push(("reason", reason));
        value(samples, "sag_account_dropped_packets_total", &with_reason)
    };
    assert_eq!(bytes("rx"), kernel.rx_bytes as f64, "rx bytes");
    assert_eq!(packets("rx"), kernel.rx_packets as f64, "rx packets");
    assert_eq!(bytes("tx"), kernel.tx_bytes as f64, "tx bytes");
    assert_eq!(packets("tx"), kernel.tx_packets as f64, "tx packets");
    let rx = &kernel.rx_dropped;
    assert_eq!(dropped("rx", "rate_limit"), rx.rate_limit.packets as f64, "rx rate_limit");
    assert_eq!(dropped("rx", "blocked"), rx.blocked.packets as f64, "rx blocked");
    assert_eq!(dropped("rx", "not_allowed"), rx.not_allowed.packets as f64, "rx not_allowed");
    let tx = &kernel.tx_dropped;
    assert_eq!(dropped("tx", "rate_limit"), tx.rate_limit.packets as f64, "tx rate_limit");
    assert_eq!(dropped("tx", "blocked"), tx.blocked.packets as f64, "tx blocked");
}

fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

#[test]
fn promtool_accepts_rules_and_config() {
    let prometheus = deploy_dir().join("prometheus");
    for args in [
        vec!["check", "rules", "rules.yml"],
        vec!["check", "config", "prometheus.yml"],
        vec!["test", "rules", "rules_test.yml"],
    ] {
        let output =
            Command::new("promtool").args(&args).current_dir(&prometheus).output().unwrap();
        assert!(
            output.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn scrape_matches_kernel_exactly() {
    let lab = lab(1);
    let (instance, fingerprint) = lab.create_instance().unwrap();
    lab.create_account(&instance, "mon-user1", 2_000, None).unwrap();

    // Before any login: the tunnel is up and empty.
    let response = http_get(&lab.gateway, METRICS_PORT, "/metrics");
    assert_eq!(response.status, 200);
    assert_eq!(response.headers["content-type"], "text/plain; version=0.0.4");
    let (ok, report) = promtool_check_metrics(&response.body);
    assert!(ok, "promtool check metrics: {report}\n{}", response.body);
    let samples = parse(&response.body);
    assert_eq!(value(&samples, "sag_store_up", &[]), 1.0);
    assert_eq!(value(&samples, "sag_dataplane_attached_interfaces", &[]), 1.0, "the tunnel");
    assert_eq!(value(&samples, "sag_dataplane_client_entries", &[]), 0.0);
    assert_eq!(value(&samples, "sag_dataplane_client_entries_limit", &[]), 16_384.0);
    assert_eq!(value(&samples, "sag_sessions", &[("instance", &instance)]), 0.0);
    let details: Value =
        serde_json::from_str(&lab.admin(&["instance", "show", &instance, "--json"]).unwrap())
            .unwrap();
    let expires_at: chrono::DateTime<chrono::Utc> =
        details["instance"]["expires_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        value(&samples, "sag_instance_expiry_timestamp_seconds", &[("instance", &instance)]),
        expires_at.timestamp() as f64
    );
    assert!(
        !samples.iter().any(|sample| sample.name.starts_with("sag_account_")),
        "no account series before the account has an address"
    );
    let not_found = http_get(&lab.gateway, METRICS_PORT, "/metric");
    assert_eq!(not_found.status, 404, "{}", not_found.body);

    // 5 echo requests and replies of 128 IP bytes each.
    let before_connect = unix_seconds(SystemTime::now()).floor();
    let address =
        connected_address(&lab.connect(0, &fingerprint, &instance, "mon-user1").unwrap()).unwrap();
    assert_eq!(ping(&lab.users[0], 5, 100).unwrap(), 5);
    settle();
    let kernel = counters(&lab, address);
    let text = scrape(&lab);
    assert_eq!(counters(&lab, address), kernel, "no traffic during the scrape");
    let samples = parse(&text);
    assert_eq!((kernel.rx_packets, kernel.rx_bytes), (5, 5 * 128), "{kernel:?}");
    assert_eq!((kernel.tx_packets, kernel.tx_bytes), (5, 5 * 128), "{kernel:?}");
    assert_account_matches(&samples, &instance, "mon-user1", &kernel);
    let at = |direction| [("instance", instance.as_str()), ("direction", direction)];
    assert_eq!(value(&samples, "sag_instance_bytes_total", &at("rx")), 640.0);
    assert_eq!(value(&samples, "sag_instance_packets_total", &at("tx")), 5.0);
    let spoofed = [("instance", instance.as_str()), ("direction", "rx"), ("reason", "spoofed")];
    assert_eq!(value(&samples, "sag_instance_dropped_packets_total", &spoofed), 0.0);
    assert_eq!(value(&samples, "sag_sessions", &[("instance", &instance)]), 1.0);
    assert_eq!(value(&samples, "sag_dataplane_client_entries", &[]), 1.0);
    let handshake = value(
        &samples,
        "sag_session_last_handshake_timestamp_seconds",
        &[("instance", &instance), ("account", "mon-user1")],
    );
    let now = unix_seconds(SystemTime::now());
    assert!(
        (before_connect..=now).contains(&handshake),
        "handshake at {handshake}, connected after {before_connect}, scraped before {now}"
    );

    // At 8 kbit/s the bucket has room for two 1,500-byte packets, so a burst of 20 echo requests of
    // 1,400 bytes loses most of them to the rate limit.
    lab.admin(&["account", "set", &instance, "mon-user1", "--bandwidth", "8"]).unwrap();
    let replies = ping_with_interval(&lab.users[0], 20, 1_372, Duration::from_millis(10)).unwrap();
    settle();
    let kernel = counters(&lab, address);
    let text = scrape(&lab);
    assert_eq!(counters(&lab, address), kernel, "no traffic during the scrape");
    let (ok, report) = promtool_check_metrics(&text);
    assert!(ok, "promtool check metrics: {report}\n{text}");
    let samples = parse(&text);
    eprintln!("burst at 8 kbit/s: {replies} of 20 replies, kernel {kernel:?}");
    assert!(kernel.rx_dropped.rate_limit.packets > 0, "{kernel:?}");
    assert_eq!(kernel.rx_packets + kernel.rx_dropped.rate_limit.packets, 5 + 20, "{kernel:?}");
    assert_eq!(kernel.rx_bytes, 5 * 128 + (kernel.rx_packets - 5) * 1_400, "{kernel:?}");
    assert_account_matches(&samples, &instance, "mon-user1", &kernel);
    let rate_limit =
        [("instance", instance.as_str()), ("direction", "rx"), ("reason", "rate_limit")];
    assert_eq!(
        value(&samples, "sag_instance_dropped_packets_total", &rate_limit),
        kernel.rx_dropped.rate_limit.packets as f64
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap()
}

#[test]
fn scrape_thousand_accounts_timed() {
    let _heavy = heavy();
    let lab = lab(0);
    let client = ApiClient::new(&lab.socket());
    let started = Instant::now();
    let instance = runtime().block_on(async {
        let body = CreateInstanceBody {
            owner: "acme".to_owned(),
            area: "eu-central-1".to_owned(),
            account_quota: 1_000,
            months: 1,
        };
        let instance: Instance =
            client.call(Method::POST, "/instances", Some(&body)).await.unwrap();
        let network = NetworkBody {
            cidr_blocks: Some(vec!["10.20.0.0/20".parse().unwrap()]),
            ..NetworkBody::default()
        };
        let path = format!("/instances/{}/network", instance.id);
        let _: Value = client.call(Method::PATCH, &path, Some(&network)).await.unwrap();
        // Four requests at a time: the agent hashes the passwords on blocking threads.
        let path = format!("/instances/{}/accounts", instance.id);
        let mut tasks = tokio::task::JoinSet::new();
        for worker in 0..4u32 {
            let (client, path) = (client.clone(), path.clone());
            tasks.spawn(async move {
                for n in (worker..1_000).step_by(4) {
                    let body = CreateAccountBody {
                        username: Some(format!("user{n:05}")),
                        email: format!("user{n}@example.com"),
                        password: Some(format!("Pass-{n:05}")),
                        static_ip: Some(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 20, 0, 1)) + n)),
                        bandwidth_kbps: None,
                    };
                    let _: CreatedAccount =
                        client.call(Method::POST, &path, Some(&body)).await.unwrap();
                }
            });
        }
        while let Some(result) = tasks.join_next().await {
            result.unwrap();
        }
        instance
    });
    eprintln!("created 1,000 accounts in {:.1} s", started.elapsed().as_secs_f64());

    let mut times = Vec::new();
    let mut text = String::new();
    for _ in 0..10 {
        let start = Instant::now();
        text = scrape(&lab);
        times.push(start.elapsed());
    }
    times.sort();
    eprintln!(
        "scrape of 1,000 accounts ({} bytes, {} lines): min {:.1} ms, median {:.1} ms, \
         max {:.1} ms over {} scrapes",
        text.len(),
        text.lines().count(),
        times[0].as_secs_f64() * 1e3,
        times[times.len() / 2].as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3,
        times.len()
    );
    let (ok, report) = promtool_check_metrics(&text);
    assert!(ok, "promtool check metrics: {report}");
    let samples = parse(&text);
    for direction in ["rx", "tx"] {
        let accounts: BTreeSet<&str> = samples
            .iter()
            .filter(|sample| {
                sample.name == "sag_account_bytes_total"
                    && sample.labels["instance"] == instance.id
                    && sample.labels["direction"] == direction
            })
            .map(|sample| sample.labels["account"].as_str())
            .collect();
        assert_eq!(accounts.len(), 1_000, "accounts with {direction} bytes");
    }
    let per_account = samples.iter().filter(|sample| sample.labels.contains_key("account")).count();
    assert_eq!(per_account, 9 * 1_000, "9 counters per account, no handshake without a session");
    assert_eq!(value(&samples, "sag_dataplane_client_entries", &[]), 1_000.0);
    assert_eq!(
        value(
            &samples,
            "sag_instance_bytes_total",
            &[("instance", &instance.id), ("direction", "rx")]
        ),
        0.0
    );
}

/// A Prometheus server in a namespace, killed by PID and its directory removed when dropped.
struct Prometheus<'a> {
    netns: &'a Netns,
    child: Child,
    /// Configuration, log and database. Removed after `drop` has killed the server.
    dir: tempfile::TempDir,
}

impl Drop for Prometheus<'_> {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl<'a> Prometheus<'a> {
    /// Starts Prometheus in `netns` with deploy/prometheus/prometheus.yml, changed to scrape
    /// and evaluate every second and to load the rules by absolute path, and waits until it
    /// has scraped the agent once.
    fn start(netns: &'a Netns) -> Self {
        let dir = tempfile::Builder::new().prefix("sag-prom-").tempdir().unwrap();
        let shipped = deploy_dir().join("prometheus");
        let mut config = std::fs::read_to_string(shipped.join("prometheus.yml")).unwrap();
        let rules = shipped.join("rules.yml").canonicalize().unwrap();
        for (from, to) in [
            ("scrape_interval: 15s", "scrape_interval: 1s".to_owned()),
            ("evaluation_interval: 15s", "evaluation_interval: 1s".to_owned()),
            ("  - rules.yml", format!("  - {}", rules.display())),
            ("- 127.0.0.1:9108", format!("- 127.0.0.1:{METRICS_PORT}")),
        ] {
            assert!(config.contains(from), "{from} in the shipped prometheus.yml");
            config = config.replace(from, &to);
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();

        // `ip netns exec` runs Prometheus in its own process, so the child's PID is the
        // server's.
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", netns.name(), "prometheus"])
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus starts (Debian package prometheus)");
        let prometheus = Self { netns, child, dir };

        let deadline = Instant::now() + Duration::from_secs(30);
        while !try_http_get(netns, PROMETHEUS_PORT, "/-/ready")
            .is_ok_and(|ready| ready.status == 200)
        {
            assert!(Instant::now() < deadline, "Prometheus did not start: {}", prometheus.log());
            std::thread::sleep(Duration::from_millis(200));
        }
        while !prometheus
            .query(r#"up{job="sag"}"#, None)
            .first()
            .is_some_and(|series| series["value"][1] == "1")
        {
            assert!(Instant::now() < deadline, "Prometheus did not scrape: {}", prometheus.log());
            std::thread::sleep(Duration::from_millis(200));
        }
        prometheus
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Runs an instant query, at `time` (Unix seconds) if given, and returns its result.
    fn query(&self, query: &str, time: Option<f64>) -> Vec<Value> {
        let mut path = format!("/api/v1/query?query={}", percent_encode(query));
        if let Some(time) = time {
            path.push_str(&format!("&time={time:.3}"));
        }
        let response = http_get(self.netns, PROMETHEUS_PORT, &path);
        let reply: Value = serde_json::from_str(&response.body)
            .unwrap_or_else(|_| panic!("{query}: {}", response.body));
        assert_eq!(reply["status"], "success", "{query}: {reply}");
        reply["data"]["result"].as_array().unwrap().clone()
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// Kernel counters of one address, read every 200 ms with their time.
struct KernelSamples(Vec<(f64, ClientCounters)>);

impl KernelSamples {
    /// Returns `field` at `time`, interpolated between the readings around it.
    fn at(&self, time: f64, field: fn(&ClientCounters) -> u64) -> f64 {
        let after = self.0.iter().position(|(at, _)| *at >= time).expect("a reading after");
        assert!(after > 0, "a reading before {time}");
        let (t0, c0) = &self.0[after - 1];
        let (t1, c1) = &self.0[after];
        let (v0, v1) = (field(c0) as f64, field(c1) as f64);
        v0 + (v1 - v0) * (time - t0) / (t1 - t0)
    }

    /// Returns how much `field` grew over the `seconds` up to `end`.
    fn delta(&self, end: f64, seconds: f64, field: fn(&ClientCounters) -> u64) -> f64 {
        self.at(end, field) - self.at(end - seconds, field)
    }

    /// Returns how much `field` grew from the first reading to `time`.
    fn since_first(&self, time: f64, field: fn(&ClientCounters) -> u64) -> f64 {
        self.at(time, field) - field(&self.0[0].1) as f64
    }
}

/// Returns a figure from the kernel's readings at a time, Unix seconds.
type KernelFigure = fn(&KernelSamples, f64) -> f64;

/// Asserts that every evaluation of `figure`, as (time, Prometheus value, kernel value), is
/// within [`TOLERANCE`] of the kernel's value, and prints the range of the ratios.
fn assert_agrees(figure: &str, evaluations: &[(f64, f64, f64)]) {
    let ratios: Vec<f64> =
        evaluations.iter().map(|(_, prometheus, kernel)| prometheus / kernel).collect();
    let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let max = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (at, prometheus, kernel) = evaluations[evaluations.len() - 1];
    eprintln!(
        "{figure}: {} evaluations, Prometheus/kernel {min:.4} to {max:.4}; last at {at:.1}: \
         {prometheus:.1} vs {kernel:.1}",
        evaluations.len()
    );
    for ((at, prometheus, kernel), ratio) in evaluations.iter().zip(&ratios) {
        assert!(
            (1.0 - TOLERANCE..=1.0 + TOLERANCE).contains(ratio),
            "{figure} at {at:.1}: Prometheus {prometheus}, kernel {kernel}"
        );
    }
}

#[test]
fn prometheus_rules_agree_with_kernel() {
    let _heavy = heavy();
    let lab = lab(1);
    // This agent runs with the default idle time of 300 s, as a deployed agent does, instead of
    // the lab's 240 s.
    lab.restart_agent_with_session_idle(300).unwrap();
    let (instance, fingerprint) = lab.create_instance().unwrap();
    lab.create_account(&instance, "prom-user1", 512, None).unwrap();
    let address =
        connected_address(&lab.connect(0, &fingerprint, &instance, "prom-user1").unwrap()).unwrap();
    let prometheus = Prometheus::start(&lab.gateway);

    // Read the kernel counters every 200 ms while traffic runs.
    let stop = AtomicBool::new(false);
    let traffic_seconds = 75.0;
    let (readings, traffic) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut readings = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                readings.push((unix_seconds(SystemTime::now()), counters(&lab, address)));
                std::thread::sleep(Duration::from_millis(200));
            }
            readings
        });
        // UDP at 1 Mbit/s each way through a limit of 512 kbit/s: both directions pass at the
        // limit and lose the rest to rate-limit drops.
        let port: u16 = 5201;
        let server = Iperf3Server::start(&lab.company, port, COMPANY_SERVER).unwrap();
        let start = unix_seconds(SystemTime::now());
        let output = lab.users[0]
            .exec(&[
                "timeout",
                "120",
                "iperf3",
                "--client",
                &COMPANY_SERVER.to_string(),
                "--port",
                &port.to_string(),
                "--udp",
                "--bitrate",
                "1M",
                "--length",
                "1000",
                "--bidir",
                "--time",
                &format!("{traffic_seconds}"),
                "--json",
            ])
            .unwrap();
        let end = unix_seconds(SystemTime::now());
        drop(server);
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
        let report: Value = serde_json::from_str(&output).unwrap();
        assert!(report["error"].is_null(), "iperf3: {}", report["error"]);
        (KernelSamples(sampler.join().unwrap()), (start, end))
    });
    let (start, end) = traffic;
    eprintln!("traffic from {start:.1} to {end:.1} ({:.1} s)", end - start);

    // Every evaluation whose last minute lies inside the traffic: from 63 s after its start
    // (iperf3 sets up first) to 2 s before its end.
    let figures: [(&str, KernelFigure); 8] = [
        ("rxBytes:increase1m", |k, t| k.delta(t, 60.0, |c| c.rx_bytes)),
        ("txBytes:increase1m", |k, t| k.delta(t, 60.0, |c| c.tx_bytes)),
        ("rxBitPerSecond:rate1m", |k, t| 8.0 * k.delta(t, 60.0, |c| c.rx_bytes) / 60.0),
        ("txBitPerSecond:rate1m", |k, t| 8.0 * k.delta(t, 60.0, |c| c.tx_bytes) / 60.0),
        ("rxDropPackets:increase1m", |k, t| k.delta(t, 60.0, |c| dropped_packets(&c.rx_dropped))),
        ("txDropPackets:increase1m", |k, t| k.delta(t, 60.0, |c| dropped_packets(&c.tx_dropped))),
        // Prometheus has scraped for less than an hour, and the first reading comes before the
        // traffic, so the last hour contains everything since that reading.
        ("rxBytesHour:increase1h", |k, t| k.since_first(t, |c| c.rx_bytes)),
        ("txBytesHour:increase1h", |k, t| k.since_first(t, |c| c.tx_bytes)),
    ];
    let window = (start + 63.0, end - 2.0);
    for (level, selector) in [
        ("account", format!(r#"{{instance="{instance}",account="prom-user1"}}"#)),
        ("instance", format!(r#"{{instance="{instance}"}}"#)),
    ] {
        for (figure, kernel) in &figures {
            let name = format!("sag_{level}:{figure}");
            let result = prometheus.query(&format!("{name}{selector}[120s]"), Some(end));
            assert_eq!(result.len(), 1, "{name}: {result:?}");
            let evaluations: Vec<(f64, f64, f64)> = result[0]["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|point| {
                    let at = point[0].as_f64().unwrap();
                    (at, point[1].as_str().unwrap().parse::<f64>().unwrap())
                })
                .filter(|(at, _)| (window.0..=window.1).contains(at))
                .map(|(at, value)| (at, value, kernel(&readings, at)))
                .collect();
            assert!(evaluations.len() >= 5, "{name}: evaluations in {window:?}: {result:?}");
            assert_agrees(&name, &evaluations);
        }
    }
    let rate = 8.0 * readings.delta(window.1, 60.0, |c| c.rx_bytes) / 60.0;
    eprintln!("rx rate passed by the kernel over the last minute: {:.1} kbit/s", rate / 1e3);

    // The account is held at its limit, so its alert is pending (it fires after 10 minutes).
    let alerts = prometheus.query(r#"ALERTS{alertname="SagClientHeldAtLimit"}"#, None);
    let pending: BTreeSet<(&str, &str, &str)> = alerts
        .iter()
        .map(|alert| {
            let labels = &alert["metric"];
            (
                labels["account"].as_str().unwrap(),
                labels["direction"].as_str().unwrap(),
                labels["alertstate"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(pending.contains(&("prom-user1", "rx", "pending")), "{alerts:?}");

    // Every query of the dashboard runs, and the eight instance panels have data.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy_dir().join("grafana/sag.json")).unwrap(),
    )
    .unwrap();
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$instance", &instance)
                .replace("$account", "prom-user1")
                .replace("$job", "sag")
                .replace("$topn", "10");
            let result = prometheus.query(&expr, None);
            let title = panel["title"].as_str().unwrap();
            assert!(!result.is_empty(), "panel {title}: {expr} returned nothing");
            queries += 1;
        }
    }
    assert_eq!(queries, 22, "8 instance and 8 account figures, 2 top-N and 4 health panels");
}
