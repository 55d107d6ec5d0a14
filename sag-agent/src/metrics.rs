//! The `/metrics` endpoint for Prometheus: the traffic of each account and instance, the
//! sessions' handshakes and the agent's health, read from the kernel maps, the tunnels and the
//! store when Prometheus scrapes. Nothing runs between scrapes.
//!
//! # Metric families
//!
//! Counters, labelled `instance`, `account` (per account only), `direction`, and `reason` for
//! drops:
//! - `sag_account_bytes_total`, `sag_instance_bytes_total`: bytes of the packets that passed.
//! - `sag_account_packets_total`, `sag_instance_packets_total`: packets that passed.
//! - `sag_account_dropped_packets_total`, `sag_instance_dropped_packets_total`: packets that
//!   the kernel dropped.
//!
//! Gauges:
//! - `sag_instance_expiry_timestamp_seconds{instance}`: expiry date of the instance's
//!   subscription, Unix time.
//! - `sag_sessions{instance}`: sessions on the instance's tunnel.
//! - `sag_session_last_handshake_timestamp_seconds{instance, account}`: time of the last
//!   WireGuard handshake of the account's session, Unix time. A session has no sample before
//!   its first handshake.
//! - `sag_dataplane_attached_interfaces`: interfaces the kernel programs are attached to.
//! - `sag_dataplane_client_entries`, `sag_dataplane_client_entries_limit`: client addresses in
//!   the kernel's clients map, and the map's capacity.
//! - `sag_store_up`: 1 if the store returned this scrape's query within 2 s, else 0.
//!
//! # Labels
//!
//! - `instance`: the instance ID (`sag-` and 16 letters and digits).
//! - `account`: the account's username, unique within its instance.
//! - `direction`: `rx` for packets the gateway receives from clients, `tx` for packets it sends
//!   to clients.
//! - `reason`: why packets were dropped. `rate_limit` (over the account's bandwidth) and
//!   `blocked` (account disabled, or instance stopped or locked) in both directions;
//!   `not_allowed` (destination outside the allowed destinations) for `rx` only; `spoofed`
//!   (source not a client of the tunnel's instance) for `rx` and on instances only, because
//!   such a packet belongs to no account.
//!
//! No label carries an address, so the series are bounded by the accounts: 9 counters and one
//! handshake per account, at most 1,000 accounts per instance, and 12 series per instance.
//!
//! Bytes are IPv4 total length (layer 3). An account's counters cover every address it had
//! while this agent process runs. A restarted agent keeps the counters of the current
//! addresses, which are pinned in bpffs, but not those of addresses removed before, so a
//! counter can go down at a restart; Prometheus takes that as a counter reset.
//!
//! An instance's counters are the sum of its accounts' counters plus the spoofed drops of its
//! tunnel. When an account or a tunnel goes away, its counters as the last scrape read them
//! stay in the sum, so an instance's counters never go down while the agent runs. Traffic it
//! had after that scrape is missing from the sum.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    extract::State,
    http::{header::CONTENT_TYPE, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use prometheus::{
    proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType},
    TextEncoder, TEXT_FORMAT,
};
use sag_common::{
    counters::{ClientCounters, Direction, DropCounters, InterfaceKind, PacketCounter},
    policy::DropReason,
};
use tracing::{error, info, warn};

use crate::{
    admin::{Admin, Instance},
    dataplane::InterfaceCounter,
    gateway::{Gateway, SessionHandshake},
    kernel::{AccountUsage, KernelError, KernelSync},
};

/// Maximum wait for the store in a scrape. A store that takes longer counts as down, so that a
/// stuck database cannot stall the scrape past Prometheus' default 10 s timeout.
const STORE_TIMEOUT: Duration = Duration::from_secs(2);

/// Drop reasons that the kernel counts for packets from clients.
const RX_DROP_REASONS: [DropReason; 3] =
    [DropReason::RateLimit, DropReason::Blocked, DropReason::NotAllowed];
/// Drop reasons that the kernel counts for packets to clients. Destinations are checked on rx
/// only.
const TX_DROP_REASONS: [DropReason; 2] = [DropReason::RateLimit, DropReason::Blocked];

/// Sources of the metrics: the store, the kernel maps and the tunnels.
pub struct MetricsSource {
    pub admin: Admin,
    pub kernel: Arc<KernelSync>,
    pub gateway: Arc<Gateway>,
}

/// Errors of a scrape.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("failed to read the kernel counters: {0}")]
    Kernel(#[from] KernelError),
    #[error("the task reading the kernel counters failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("failed to encode the metrics: {0}")]
    Encode(#[from] prometheus::Error),
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes. Other paths get 404.
pub async fn serve(
    listener: tokio::net::TcpListener,
    source: Arc<MetricsSource>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let exporter = Arc::new(Exporter { source, state: tokio::sync::Mutex::default() });
    let app = Router::new()
        .route("/metrics", get(scrape))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found; metrics are at /metrics\n") })
        .with_state(exporter);
    info!(address = ?listener.local_addr().ok(), "metrics endpoint listening");
    if let Err(error) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        error!(%error, "metrics endpoint failed");
    }
}

async fn scrape(State(exporter): State<Arc<Exporter>>) -> Response {
    match exporter.render().await {
        Ok(text) => ([(CONTENT_TYPE, TEXT_FORMAT)], text).into_response(),
        Err(error) => {
            warn!(%error, "metrics scrape failed");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")).into_response()
        }
    }
}

/// The endpoint's sources and what it remembers between scrapes.
struct Exporter {
    source: Arc<MetricsSource>,
    /// Held for a whole scrape, so that the ledgers see readings in the order they were taken.
    state: tokio::sync::Mutex<ExporterState>,
}

impl Exporter {
    /// Reads everything and returns it in the text exposition format.
    async fn render(&self) -> Result<String, MetricsError> {
        let mut state = self.state.lock().await;
        let snapshot = Snapshot::read(&self.source).await?;
        state.note_store(&snapshot);
        let instances = state.instance_traffic(&snapshot);
        Ok(TextEncoder::new().encode_to_string(&families(&snapshot, &instances))?)
    }
}

/// Data that one scrape reads from the kernel, the tunnels and the store.
#[derive(Debug, Clone)]
struct Snapshot {
    accounts: Vec<AccountUsage>,
    interfaces: Vec<InterfaceCounter>,
    /// Instance ID and interface index of each tunnel that is up.
    tunnels: Vec<(String, u32)>,
    sessions: Vec<SessionHandshake>,
    /// Every instance in the store, or `None` if the store failed or timed out.
    instances: Option<Vec<Instance>>,
    /// Why the store query failed, if it did.
    store_error: Option<String>,
    attached_interfaces: usize,
    client_entries: usize,
    client_capacity: usize,
    /// Time of the reading, which turns "seconds since the handshake" into a timestamp.
    now: SystemTime,
}

impl Snapshot {
    async fn read(source: &MetricsSource) -> Result<Self, MetricsError> {
        // Reading the counters costs a system call per client, so it runs off the async workers.
        let kernel = source.kernel.clone();
        let (accounts, interfaces, (client_entries, client_capacity), attached_interfaces) =
            tokio::task::spawn_blocking(move || -> Result<_, KernelError> {
                Ok((
                    kernel.account_usage()?,
                    kernel.interface_counters()?,
                    kernel.client_fill(),
                    kernel.attached_interfaces(),
                ))
            })
            .await??;
        let tunnels = source.gateway.tunnel_ifindexes().await;
        let sessions = source.gateway.session_handshakes().await;
        let (instances, store_error) =
            match tokio::time::timeout(STORE_TIMEOUT, source.admin.list_instances()).await {
                Ok(Ok(instances)) => (Some(instances), None),
                Ok(Err(error)) => (None, Some(format!("failed to list the instances: {error}"))),
                Err(_) => (None, Some(format!("timed out after {STORE_TIMEOUT:?}"))),
            };
        Ok(Self {
            accounts,
            interfaces,
            tunnels,
            sessions,
            instances,
            store_error,
            attached_interfaces,
            client_entries,
            client_capacity,
            now: SystemTime::now(),
        })
    }
}

/// Traffic of an instance: the sum of its accounts' counters, and its tunnel's spoofed drops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct InstanceTraffic {
    counters: ClientCounters,
    spoofed: PacketCounter,
}

/// Counters of one instance's accounts and tunnels as the last scrape read them, and the sum of
/// the last counters of those that have gone since.
#[derive(Debug, Default)]
struct InstanceLedger {
    accounts: HashMap<String, ClientCounters>,
    /// Spoofed drops by tunnel interface index.
    tunnels: HashMap<u32, PacketCounter>,
    departed: InstanceTraffic,
}

impl InstanceLedger {
    /// Records the current counters of the instance's accounts and tunnels, and returns the
    /// instance's totals. An account or tunnel that is gone, or whose counters went down
    /// (deleted and created again), adds its last counters to `departed`.
    fn update(
        &mut self,
        accounts: HashMap<String, ClientCounters>,
        tunnels: HashMap<u32, PacketCounter>,
    ) -> InstanceTraffic {
        for (username, last) in &self.accounts {
            if accounts.get(username).is_none_or(|current| client_went_back(last, current)) {
                self.departed.counters.merge(last);
            }
        }
        for (ifindex, last) in &self.tunnels {
            if tunnels.get(ifindex).is_none_or(|current| packets_went_back(last, current)) {
                self.departed.spoofed.merge(last);
            }
        }
        self.accounts = accounts;
        self.tunnels = tunnels;
        let mut total = self.departed;
        for counters in self.accounts.values() {
            total.counters.merge(counters);
        }
        for spoofed in self.tunnels.values() {
            total.spoofed.merge(spoofed);
        }
        total
    }
}

fn packets_went_back(last: &PacketCounter, current: &PacketCounter) -> bool {
    current.packets < last.packets || current.bytes < last.bytes
}

fn drops_went_back(last: &DropCounters, current: &DropCounters) -> bool {
    packets_went_back(&last.rate_limit, &current.rate_limit)
        || packets_went_back(&last.blocked, &current.blocked)
        || packets_went_back(&last.not_allowed, &current.not_allowed)
}

fn client_went_back(last: &ClientCounters, current: &ClientCounters) -> bool {
    current.rx_packets < last.rx_packets
        || current.rx_bytes < last.rx_bytes
        || current.tx_packets < last.tx_packets
        || current.tx_bytes < last.tx_bytes
        || drops_went_back(&last.rx_dropped, &current.rx_dropped)
        || drops_went_back(&last.tx_dropped, &current.tx_dropped)
}

/// State that the endpoint keeps between scrapes.
#[derive(Debug, Default)]
struct ExporterState {
    /// By instance ID.
    ledgers: HashMap<String, InstanceLedger>,
    /// Whether the store responded in the last scrape, so that a change is logged once.
    store_up: Option<bool>,
}

impl ExporterState {
    /// Logs when the store stops or starts responding, once per change rather than per scrape.
    fn note_store(&mut self, snapshot: &Snapshot) {
        let up = snapshot.instances.is_some();
        let was_down = self.store_up == Some(false);
        match &snapshot.store_error {
            Some(error) if !was_down => {
                warn!(
                    error,
                    "metrics: the store failed; sag_store_up is 0 until it responds again"
                );
            }
            None if was_down => info!("metrics: the store responds again"),
            _ => {}
        }
        self.store_up = Some(up);
    }

    /// Returns the traffic of every instance that is in the store, has accounts with counters
    /// or has a tunnel, and updates the ledgers. While the store is down, instances known from
    /// earlier scrapes are kept.
    fn instance_traffic(&mut self, snapshot: &Snapshot) -> BTreeMap<String, InstanceTraffic> {
        let mut accounts: HashMap<&str, HashMap<String, ClientCounters>> = HashMap::new();
        for usage in &snapshot.accounts {
            accounts
                .entry(&usage.instance_id)
                .or_default()
                .insert(usage.username.clone(), usage.counters);
        }
        let spoofed: HashMap<u32, PacketCounter> = snapshot
            .interfaces
            .iter()
            .filter(|interface| {
                interface.kind == InterfaceKind::Spoofed && interface.direction == Direction::Rx
            })
            .map(|interface| (interface.ifindex, interface.counter))
            .collect();
        let mut tunnels: HashMap<&str, HashMap<u32, PacketCounter>> = HashMap::new();
        for (instance_id, ifindex) in &snapshot.tunnels {
            let counter = spoofed.get(ifindex).copied().unwrap_or_default();
            tunnels.entry(instance_id).or_default().insert(*ifindex, counter);
        }

        let mut ids: BTreeSet<String> =
            accounts.keys().chain(tunnels.keys()).map(|id| (*id).to_owned()).collect();
        match &snapshot.instances {
            Some(instances) => {
                ids.extend(instances.iter().map(|instance| instance.id.clone()));
                self.ledgers.retain(|id, _| ids.contains(id));
            }
            None => ids.extend(self.ledgers.keys().cloned()),
        }
        ids.into_iter()
            .map(|id| {
                let traffic = self.ledgers.entry(id.clone()).or_default().update(
                    accounts.remove(id.as_str()).unwrap_or_default(),
                    tunnels.remove(id.as_str()).unwrap_or_default(),
                );
                (id, traffic)
            })
            .collect()
    }
}

/// A metric family being filled.
struct Family(MetricFamily);

impl Family {
    fn new(name: &str, help: &str, kind: MetricType) -> Self {
        let mut family = MetricFamily::default();
        family.set_name(name.to_owned());
        family.set_help(help.to_owned());
        family.set_field_type(kind);
        Self(family)
    }

    fn counter(name: &str, help: &str) -> Self {
        Self::new(name, help, MetricType::COUNTER)
    }

    fn gauge(name: &str, help: &str) -> Self {
        Self::new(name, help, MetricType::GAUGE)
    }

    /// Adds a sample. Counters come from `u64` and are exact up to 2^53 (9 PB or packets).
    fn add(&mut self, labels: &[(&str, &str)], value: f64) {
        let pairs = labels
            .iter()
            .map(|(name, label_value)| {
                let mut pair = LabelPair::default();
                pair.set_name((*name).to_owned());
                pair.set_value((*label_value).to_owned());
                pair
            })
            .collect();
        let mut metric = Metric::from_label(pairs);
        match self.0.get_field_type() {
            MetricType::COUNTER => {
                let mut counter = Counter::default();
                counter.set_value(value);
                metric.set_counter(counter);
            }
            _ => {
                let mut gauge = Gauge::default();
                gauge.set_value(value);
                metric.set_gauge(gauge);
            }
        }
        self.0.mut_metric().push(metric);
    }
}

/// The passed and dropped traffic of one direction, as exported.
struct DirectionCounters {
    /// Value of the `direction` label.
    direction: &'static str,
    packets: u64,
    bytes: u64,
    /// Dropped packets by value of the `reason` label.
    dropped: Vec<(&'static str, u64)>,
}

/// Splits `counters` by direction, with the drop reasons the kernel counts in each.
fn by_direction(counters: &ClientCounters) -> [DirectionCounters; 2] {
    let dropped = |drops: &DropCounters, reasons: &[DropReason]| {
        reasons
            .iter()
            .map(|reason| (reason.name(), drops.get(*reason).map_or(0, |counter| counter.packets)))
            .collect()
    };
    [
        DirectionCounters {
            direction: "rx",
            packets: counters.rx_packets,
            bytes: counters.rx_bytes,
            dropped: dropped(&counters.rx_dropped, &RX_DROP_REASONS),
        },
        DirectionCounters {
            direction: "tx",
            packets: counters.tx_packets,
            bytes: counters.tx_bytes,
            dropped: dropped(&counters.tx_dropped, &TX_DROP_REASONS),
        },
    ]
}

/// Families of packets and bytes passed and packets dropped, on one level (account or
/// instance).
struct TrafficFamilies {
    bytes: Family,
    packets: Family,
    dropped: Family,
}

impl TrafficFamilies {
    fn new(level: &str) -> Self {
        Self {
            bytes: Family::counter(
                &format!("sag_{level}_bytes_total"),
                &format!("IPv4 bytes (total length) of the {level}'s packets that passed."),
            ),
            packets: Family::counter(
                &format!("sag_{level}_packets_total"),
                &format!("Packets of the {level} that passed."),
            ),
            dropped: Family::counter(
                &format!("sag_{level}_dropped_packets_total"),
                &format!("Packets of the {level} that the kernel dropped, by reason."),
            ),
        }
    }

    /// Adds the samples of `counters` under `labels`, one set per direction.
    fn add(&mut self, labels: &[(&str, &str)], directions: &[DirectionCounters]) {
        for counters in directions {
            let mut with_direction = labels.to_vec();
            with_direction.push(("direction", counters.direction));
            self.bytes.add(&with_direction, counters.bytes as f64);
            self.packets.add(&with_direction, counters.packets as f64);
            for (reason, packets) in &counters.dropped {
                let mut with_reason = with_direction.clone();
                with_reason.push(("reason", reason));
                self.dropped.add(&with_reason, *packets as f64);
            }
        }
    }

    fn into_families(self) -> [Family; 3] {
        [self.bytes, self.packets, self.dropped]
    }
}

/// Builds every metric family of a scrape, leaving out those without samples.
fn families(
    snapshot: &Snapshot,
    instances: &BTreeMap<String, InstanceTraffic>,
) -> Vec<MetricFamily> {
    let mut accounts = TrafficFamilies::new("account");
    for usage in &snapshot.accounts {
        let labels = [("instance", usage.instance_id.as_str()), ("account", &usage.username)];
        accounts.add(&labels, &by_direction(&usage.counters));
    }

    let mut instance_traffic = TrafficFamilies::new("instance");
    for (id, traffic) in instances {
        let mut directions = by_direction(&traffic.counters);
        directions[0].dropped.push((DropReason::Spoofed.name(), traffic.spoofed.packets));
        instance_traffic.add(&[("instance", id)], &directions);
    }

    let mut expiry = Family::gauge(
        "sag_instance_expiry_timestamp_seconds",
        "Expiry date of the instance's subscription, in Unix time.",
    );
    for instance in snapshot.instances.iter().flatten() {
        expiry.add(&[("instance", &instance.id)], instance.expires_at.timestamp() as f64);
    }

    let (sessions, handshakes) = session_families(snapshot);
    let mut health = Vec::new();
    for (name, help, value) in [
        (
            "sag_dataplane_attached_interfaces",
            "Interfaces that the kernel programs are attached to.",
            snapshot.attached_interfaces,
        ),
        (
            "sag_dataplane_client_entries",
            "Client addresses in the kernel's clients map.",
            snapshot.client_entries,
        ),
        (
            "sag_dataplane_client_entries_limit",
            "Capacity of the kernel's clients map.",
            snapshot.client_capacity,
        ),
        (
            "sag_store_up",
            "1 if the store returned this scrape's query within 2 s, else 0.",
            usize::from(snapshot.instances.is_some()),
        ),
    ] {
        let mut family = Family::gauge(name, help);
        family.add(&[], value as f64);
        health.push(family);
    }

    accounts
        .into_families()
        .into_iter()
        .chain(instance_traffic.into_families())
        .chain([expiry, sessions, handshakes])
        .chain(health)
        .map(|family| family.0)
        .filter(|family| !family.get_metric().is_empty())
        .collect()
}

/// Builds `sag_sessions` and `sag_session_last_handshake_timestamp_seconds`. A session whose
/// peer has not completed a handshake yet has no handshake sample.
fn session_families(snapshot: &Snapshot) -> (Family, Family) {
    let mut counts: BTreeMap<&str, usize> =
        snapshot.tunnels.iter().map(|(id, _)| (id.as_str(), 0)).collect();
    let mut handshakes = Family::gauge(
        "sag_session_last_handshake_timestamp_seconds",
        "Time of the last WireGuard handshake of the account's session, in Unix time.",
    );
    let now = snapshot.now.duration_since(UNIX_EPOCH).unwrap_or_default();
    for session in &snapshot.sessions {
        *counts.entry(&session.instance_id).or_default() += 1;
        if let Some(since) = session.since_handshake {
            let labels =
                [("instance", session.instance_id.as_str()), ("account", &session.username)];
            handshakes.add(&labels, now.saturating_sub(since).as_secs_f64());
        }
    }
    let mut sessions =
        Family::gauge("sag_sessions", "Sessions (connected clients) on the instance's tunnel.");
    for (id, count) in counts {
        sessions.add(&[("instance", id)], count as f64);
    }
    (sessions, handshakes)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use chrono::DateTime;

    use super::*;

    fn usage(instance_id: &str, username: &str, rx_bytes: u64) -> AccountUsage {
        let mut counters =
            ClientCounters { rx_packets: rx_bytes / 100, rx_bytes, ..Default::default() };
        counters.rx_dropped.rate_limit = PacketCounter { packets: 3, bytes: 300 };
        counters.tx_dropped.blocked = PacketCounter { packets: 2, bytes: 200 };
        AccountUsage {
            instance_id: instance_id.to_owned(),
            username: username.to_owned(),
            counters,
        }
    }

    fn instance(id: &str, expires_at: i64) -> Instance {
        Instance {
            id: id.to_owned(),
            owner: "acme".to_owned(),
            area: "eu-central-1".to_owned(),
            zone: "international".to_owned(),
            account_quota: 5,
            trial: false,
            created_at: DateTime::from_timestamp(expires_at - 86_400, 0).unwrap(),
            expires_at: DateTime::from_timestamp(expires_at, 0).unwrap(),
            auto_renew: false,
            state: "running".to_owned(),
            kernel_number: 1,
        }
    }

    fn snapshot(accounts: Vec<AccountUsage>, spoofed: u64) -> Snapshot {
        Snapshot {
            accounts,
            interfaces: vec![InterfaceCounter {
                ifindex: 7,
                direction: Direction::Rx,
                kind: InterfaceKind::Spoofed,
                counter: PacketCounter { packets: spoofed, bytes: 60 * spoofed },
            }],
            tunnels: vec![("sag-a".to_owned(), 7)],
            sessions: vec![
                SessionHandshake {
                    instance_id: "sag-a".to_owned(),
                    username: "alice01".to_owned(),
                    address: Ipv4Addr::new(10, 0, 0, 2),
                    since_handshake: Some(Duration::from_secs(10)),
                },
                SessionHandshake {
                    instance_id: "sag-a".to_owned(),
                    username: "bob0001".to_owned(),
                    address: Ipv4Addr::new(10, 0, 0, 3),
                    since_handshake: None,
                },
            ],
            instances: Some(vec![
                instance("sag-a", 1_900_000_000),
                instance("sag-b", 1_800_000_000),
            ]),
            store_error: None,
            attached_interfaces: 1,
            client_entries: 2,
            client_capacity: 16_384,
            now: UNIX_EPOCH + Duration::from_secs(1_000),
        }
    }

    fn render(state: &mut ExporterState, snapshot: &Snapshot) -> String {
        let instances = state.instance_traffic(snapshot);
        TextEncoder::new().encode_to_string(&families(snapshot, &instances)).unwrap()
    }

    #[test]
    fn text_has_every_series_with_exact_values() {
        let snapshot =
            snapshot(vec![usage("sag-a", "alice01", 1_000), usage("sag-a", "bob0001", 500)], 4);
        let text = render(&mut ExporterState::default(), &snapshot);
        for line in [
            "# HELP sag_account_bytes_total IPv4 bytes (total length) of the account's packets that passed.",
            "# TYPE sag_account_bytes_total counter",
            r#"sag_account_bytes_total{instance="sag-a",account="alice01",direction="rx"} 1000"#,
            r#"sag_account_packets_total{instance="sag-a",account="bob0001",direction="rx"} 5"#,
            r#"sag_account_dropped_packets_total{instance="sag-a",account="alice01",direction="rx",reason="rate_limit"} 3"#,
            r#"sag_account_dropped_packets_total{instance="sag-a",account="alice01",direction="tx",reason="blocked"} 2"#,
            r#"sag_instance_bytes_total{instance="sag-a",direction="rx"} 1500"#,
            r#"sag_instance_bytes_total{instance="sag-b",direction="rx"} 0"#,
            r#"sag_instance_dropped_packets_total{instance="sag-a",direction="rx",reason="rate_limit"} 6"#,
            r#"sag_instance_dropped_packets_total{instance="sag-a",direction="rx",reason="spoofed"} 4"#,
            r#"sag_instance_expiry_timestamp_seconds{instance="sag-a"} 1900000000"#,
            r#"sag_sessions{instance="sag-a"} 2"#,
            r#"sag_session_last_handshake_timestamp_seconds{instance="sag-a",account="alice01"} 990"#,
            "sag_dataplane_attached_interfaces 1",
            "sag_dataplane_client_entries 2",
            "sag_dataplane_client_entries_limit 16384",
            "sag_store_up 1",
        ] {
            assert!(text.lines().any(|text_line| text_line == line), "missing {line} in\n{text}");
        }
        assert!(!text.contains(r#"account="bob0001"} "#), "no handshake sample before the first");
        assert!(!text.contains(r#"direction="tx",reason="not_allowed""#), "tx has no such drops");
        assert!(!text.contains(r#"direction="tx",reason="spoofed""#), "tx has no such drops");
        // Every family has HELP and TYPE.
        let families: BTreeSet<&str> = text
            .lines()
            .filter(|line| !line.starts_with('#'))
            .map(|line| line.split(['{', ' ']).next().unwrap())
            .collect();
        assert_eq!(families.len(), 13, "{families:?}");
        for family in families {
            assert!(text.contains(&format!("# HELP {family} ")), "HELP of {family}");
            assert!(text.contains(&format!("# TYPE {family} ")), "TYPE of {family}");
        }
    }

    #[test]
    fn store_down_keeps_instance_series() {
        let mut state = ExporterState::default();
        let up = snapshot(vec![usage("sag-a", "alice01", 1_000)], 0);
        render(&mut state, &up);
        let mut down = snapshot(vec![usage("sag-a", "alice01", 1_200)], 0);
        down.instances = None;
        down.store_error = Some("timed out after 2s".to_owned());
        let text = render(&mut state, &down);
        assert!(text.lines().any(|line| line == "sag_store_up 0"), "{text}");
        assert!(!text.contains("sag_instance_expiry_timestamp_seconds"), "{text}");
        assert!(text.contains(r#"sag_instance_bytes_total{instance="sag-b",direction="rx"} 0"#));
        assert!(text.contains(r#"sag_instance_bytes_total{instance="sag-a",direction="rx"} 1200"#));
    }

    #[test]
    fn instance_keeps_departed_account_traffic() {
        let mut state = ExporterState::default();
        let first =
            snapshot(vec![usage("sag-a", "alice01", 1_000), usage("sag-a", "bob0001", 500)], 4);
        assert_eq!(state.instance_traffic(&first)["sag-a"].counters.rx_bytes, 1_500);
        // bob0001 is deleted; alice01 moves on.
        let second = snapshot(vec![usage("sag-a", "alice01", 1_100)], 4);
        let traffic = state.instance_traffic(&second)["sag-a"];
        assert_eq!(traffic.counters.rx_bytes, 1_600);
        assert_eq!(traffic.counters.rx_dropped.rate_limit.packets, 6);
        assert_eq!(traffic.spoofed.packets, 4);
        // bob0001 comes back with counters from zero.
        let third =
            snapshot(vec![usage("sag-a", "alice01", 1_100), usage("sag-a", "bob0001", 200)], 4);
        assert_eq!(state.instance_traffic(&third)["sag-a"].counters.rx_bytes, 1_800);
        // A new tunnel interface starts its spoofed counter from zero.
        let mut fourth =
            snapshot(vec![usage("sag-a", "alice01", 1_100), usage("sag-a", "bob0001", 200)], 1);
        fourth.tunnels = vec![("sag-a".to_owned(), 8)];
        fourth.interfaces[0].ifindex = 8;
        assert_eq!(state.instance_traffic(&fourth)["sag-a"].spoofed.packets, 5);
    }

    #[test]
    fn deleted_instance_loses_ledger() {
        let mut state = ExporterState::default();
        state.instance_traffic(&snapshot(vec![usage("sag-b", "carol01", 700)], 0));
        let mut gone = snapshot(vec![], 0);
        gone.instances = Some(vec![instance("sag-a", 1_900_000_000)]);
        let traffic = state.instance_traffic(&gone);
        assert_eq!(traffic.keys().collect::<Vec<_>>(), ["sag-a"]);
        assert!(!state.ledgers.contains_key("sag-b"));
    }
}
