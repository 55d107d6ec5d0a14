//! Traffic history in the store: every minute, the agent turns the kernel counters into one
//! row per account that moved traffic, and adds the bytes to the account's monthly usage.
//! `sag-agent monitor` reads the rows back; billing reads the monthly usage.
//!
//! A restart loses at most one interval. The counters are pinned and keep counting, but the
//! agent keeps the totals it last recorded in memory only, so its first reading after a start
//! is a new baseline.

use std::{collections::HashMap, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row as _;
use tracing::{debug, warn};

use crate::{
    admin::{month_of, Admin, AdminError},
    clock::Clock,
    kernel::{AccountKey, KernelSync},
};

/// How often the agent records the counters: one row per account and minute.
pub const RECORD_INTERVAL: Duration = Duration::from_secs(60);
/// Days of history kept; older rows are deleted.
pub const HISTORY_DAYS: i64 = 16;
/// Maximum range `monitor` returns at once, in minutes: 15 days.
pub const MAX_MONITOR_MINUTES: i64 = 15 * 24 * 60;

/// Traffic in one minute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MinutePoint {
    /// Start of the minute, Unix seconds.
    pub minute: i64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_dropped_packets: u64,
    pub tx_dropped_packets: u64,
}

impl MinutePoint {
    fn is_zero(&self) -> bool {
        *self == Self { minute: self.minute, ..Self::default() }
    }

    fn add(&mut self, other: &Self) {
        self.rx_bytes += other.rx_bytes;
        self.tx_bytes += other.tx_bytes;
        self.rx_packets += other.rx_packets;
        self.tx_packets += other.tx_packets;
        self.rx_dropped_packets += other.rx_dropped_packets;
        self.tx_dropped_packets += other.tx_dropped_packets;
    }
}

/// The traffic of an instance, or of one of its accounts, minute by minute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorReply {
    pub instance_id: String,
    /// The account, or `None` for the whole instance.
    pub username: Option<String>,
    /// First minute, Unix seconds.
    pub from: i64,
    /// End of the range (exclusive), Unix seconds.
    pub to: i64,
    /// Every minute of the range, in order; minutes without traffic are zero.
    pub points: Vec<MinutePoint>,
}

/// Cumulative totals of one account, as last recorded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Totals([u64; 6]);

impl Totals {
    fn of(counters: &sag_common::counters::ClientCounters) -> Self {
        let dropped = |d: &sag_common::counters::DropCounters| {
            d.rate_limit.packets + d.blocked.packets + d.not_allowed.packets
        };
        Self([
            counters.rx_bytes,
            counters.tx_bytes,
            counters.rx_packets,
            counters.tx_packets,
            dropped(&counters.rx_dropped),
            dropped(&counters.tx_dropped),
        ])
    }

    /// Returns what happened since `previous`. A total below its previous value means the
    /// counters started again (an address removed and added back), so all of it is new.
    fn since(&self, previous: &Self, minute: i64) -> MinutePoint {
        let reset = self.0.iter().zip(previous.0).any(|(now, before)| *now < before);
        let delta: Vec<u64> = self
            .0
            .iter()
            .zip(previous.0)
            .map(|(now, before)| if reset { *now } else { now - before })
            .collect();
        MinutePoint {
            minute,
            rx_bytes: delta[0],
            tx_bytes: delta[1],
            rx_packets: delta[2],
            tx_packets: delta[3],
            rx_dropped_packets: delta[4],
            tx_dropped_packets: delta[5],
        }
    }
}

/// Records the counters into the store, once a minute.
pub struct Recorder {
    admin: Admin,
    kernel: Arc<KernelSync>,
    clock: Arc<dyn Clock>,
    /// Totals at the last recording; `None` until the first one, which is the baseline.
    last: Option<HashMap<AccountKey, Totals>>,
}

/// Returns the start of the minute of `time`, in Unix seconds.
pub fn minute_of(time: DateTime<Utc>) -> i64 {
    time.timestamp().div_euclid(60) * 60
}

impl Recorder {
    /// Creates a recorder; its first [`Recorder::record`] only takes the baseline.
    pub fn new(admin: Admin, kernel: Arc<KernelSync>, clock: Arc<dyn Clock>) -> Self {
        Self { admin, kernel, clock, last: None }
    }

    /// Reads the counters and stores what moved since the last call, under the minute that
    /// just ended, in one transaction. Returns the number of rows written.
    ///
    /// # Errors
    /// Fails if the counters or the store cannot be read or written; the next call then
    /// records the traffic of both intervals.
    pub async fn record(&mut self) -> Result<usize, AdminError> {
        let usage = self.kernel.account_usage().map_err(|error| {
            AdminError::Internal(format!("reading the counters failed: {error}"))
        })?;
        let now = self.clock.now();
        // The interval that just ended is stored under the minute it started in.
        let minute = minute_of(now) - 60;
        let current: HashMap<AccountKey, Totals> = usage
            .iter()
            .map(|usage| {
                ((usage.instance_id.clone(), usage.username.clone()), Totals::of(&usage.counters))
            })
            .collect();
        let Some(last) = self.last.as_ref() else {
            self.last = Some(current);
            return Ok(0);
        };
        let rows: Vec<(AccountKey, MinutePoint)> = current
            .iter()
            .map(|(key, totals)| {
                let previous = last.get(key).copied().unwrap_or_default();
                (key.clone(), totals.since(&previous, minute))
            })
            .filter(|(_, point)| !point.is_zero())
            .collect();
        let month = month_of(now - chrono::Duration::seconds(60));
        // Billing settles data per UTC day, so each minute also goes into its day.
        let day = DateTime::from_timestamp(minute, 0).unwrap_or_default().date_naive();
        let mut transaction = self.admin.store().pool().begin().await?;
        for ((instance_id, username), point) in &rows {
            sqlx::query(
                "INSERT INTO traffic_minutes (instance_id, username, minute, rx_bytes, tx_bytes, \
                 rx_packets, tx_packets, rx_dropped_packets, tx_dropped_packets) \
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9 \
                 WHERE EXISTS (SELECT 1 FROM instances WHERE id = $1) \
                 ON CONFLICT (instance_id, username, minute) DO UPDATE SET \
                 rx_bytes = traffic_minutes.rx_bytes + excluded.rx_bytes, \
                 tx_bytes = traffic_minutes.tx_bytes + excluded.tx_bytes, \
                 rx_packets = traffic_minutes.rx_packets + excluded.rx_packets, \
                 tx_packets = traffic_minutes.tx_packets + excluded.tx_packets, \
                 rx_dropped_packets = traffic_minutes.rx_dropped_packets + excluded.rx_dropped_packets, \
                 tx_dropped_packets = traffic_minutes.tx_dropped_packets + excluded.tx_dropped_packets",
            )
            .bind(instance_id)
            .bind(username)
            .bind(point.minute)
            .bind(to_i64(point.rx_bytes))
            .bind(to_i64(point.tx_bytes))
            .bind(to_i64(point.rx_packets))
            .bind(to_i64(point.tx_packets))
            .bind(to_i64(point.rx_dropped_packets))
            .bind(to_i64(point.tx_dropped_packets))
            .execute(&mut *transaction)
            .await?;
            if point.rx_bytes + point.tx_bytes > 0 {
                sqlx::query(
                    "INSERT INTO usage (instance_id, username, month, rx_bytes, tx_bytes) \
                     SELECT $1, $2, $3, $4, $5 \
                     WHERE EXISTS (SELECT 1 FROM instances WHERE id = $1) \
                     ON CONFLICT (instance_id, username, month) DO UPDATE SET \
                     rx_bytes = usage.rx_bytes + excluded.rx_bytes, \
                     tx_bytes = usage.tx_bytes + excluded.tx_bytes",
                )
                .bind(instance_id)
                .bind(username)
                .bind(&month)
                .bind(to_i64(point.rx_bytes))
                .bind(to_i64(point.tx_bytes))
                .execute(&mut *transaction)
                .await?;
                crate::billing::add_daily_usage(
                    &mut *transaction,
                    instance_id,
                    username,
                    day,
                    point.rx_bytes,
                    point.tx_bytes,
                )
                .await?;
            }
        }
        let cutoff = minute - HISTORY_DAYS * 24 * 60 * 60;
        sqlx::query("DELETE FROM traffic_minutes WHERE minute < $1")
            .bind(cutoff)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        self.last = Some(current);
        debug!(rows = rows.len(), minute, "traffic recorded");
        Ok(rows.len())
    }

    /// Records every [`RECORD_INTERVAL`], on the minute, forever.
    pub async fn run(mut self) {
        if let Err(error) = self.record().await {
            warn!(error = %error, "recording the traffic baseline failed");
        }
        loop {
            let now = self.clock.now();
            let next = minute_of(now) + 60;
            let wait = (next - now.timestamp()).max(1) as u64;
            tokio::time::sleep(Duration::from_secs(wait)).await;
            if let Err(error) = self.record().await {
                warn!(error = %error, "recording the traffic failed; the next minute records both");
            }
        }
    }
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or_default()
}

/// Returns the traffic of an instance (all its rows) or of one account, for every minute in
/// `[from, to)`. `from` and `to` are rounded down to whole minutes.
///
/// # Errors
/// Fails with [`AdminError::Invalid`] for an empty or reversed range or one longer than
/// [`MAX_MONITOR_MINUTES`], and with [`AdminError::NotFound`] for an unknown instance or account.
pub async fn monitor(
    admin: &Admin,
    instance_id: &str,
    username: Option<&str>,
    from: i64,
    to: i64,
) -> Result<MonitorReply, AdminError> {
    let (from, to) = (from.div_euclid(60) * 60, to.div_euclid(60) * 60);
    let minutes = (to - from) / 60;
    if minutes <= 0 || minutes > MAX_MONITOR_MINUTES {
        return Err(AdminError::Invalid(crate::validation::ValidationError {
            field: "range",
            rule: format!("must cover 1 to {MAX_MONITOR_MINUTES} whole minutes (15 days)"),
            value: format!("{from}..{to}"),
        }));
    }
    admin.instance(instance_id).await?;
    if let Some(username) = username {
        admin.account(instance_id, username).await?;
    }
    let mut query = String::from(
        "SELECT minute, SUM(rx_bytes) AS rx_bytes, SUM(tx_bytes) AS tx_bytes, \
         SUM(rx_packets) AS rx_packets, SUM(tx_packets) AS tx_packets, \
         SUM(rx_dropped_packets) AS rx_dropped_packets, \
         SUM(tx_dropped_packets) AS tx_dropped_packets \
         FROM traffic_minutes WHERE instance_id = $1 AND minute >= $2 AND minute < $3",
    );
    if username.is_some() {
        query.push_str(" AND username = $4");
    }
    query.push_str(" GROUP BY minute ORDER BY minute");
    let mut statement = sqlx::query(&query).bind(instance_id).bind(from).bind(to);
    if let Some(username) = username {
        statement = statement.bind(username);
    }
    let rows = statement.fetch_all(admin.store().pool()).await?;
    let mut points: Vec<MinutePoint> = (0..minutes)
        .map(|n| MinutePoint { minute: from + n * 60, ..MinutePoint::default() })
        .collect();
    for row in rows {
        let minute: i64 = row.try_get("minute")?;
        let index = usize::try_from((minute - from) / 60).unwrap_or(usize::MAX);
        let Some(point) = points.get_mut(index) else { continue };
        let field = |name: &str| row.try_get::<i64, _>(name).map(to_u64);
        point.add(&MinutePoint {
            minute,
            rx_bytes: field("rx_bytes")?,
            tx_bytes: field("tx_bytes")?,
            rx_packets: field("rx_packets")?,
            tx_packets: field("tx_packets")?,
            rx_dropped_packets: field("rx_dropped_packets")?,
            tx_dropped_packets: field("tx_dropped_packets")?,
        });
    }
    Ok(MonitorReply {
        instance_id: instance_id.to_owned(),
        username: username.map(ToOwned::to_owned),
        from,
        to,
        points,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_follow_totals_and_restart_after_a_reset() {
        let before = Totals([1_000, 2_000, 10, 20, 1, 2]);
        let after = Totals([1_500, 2_100, 14, 21, 1, 5]);
        let point = after.since(&before, 60);
        assert_eq!(
            point,
            MinutePoint {
                minute: 60,
                rx_bytes: 500,
                tx_bytes: 100,
                rx_packets: 4,
                tx_packets: 1,
                rx_dropped_packets: 0,
                tx_dropped_packets: 3,
            }
        );
        let reset = Totals([300, 2_500, 3, 25, 0, 5]);
        assert_eq!(reset.since(&before, 120).rx_bytes, 300, "a total that went back is new");
        assert_eq!(reset.since(&before, 120).tx_bytes, 2_500);
        assert!(before.since(&before, 0).is_zero());
    }

    #[test]
    fn minutes_round_down() {
        let time = DateTime::from_timestamp(1_800_000_059, 0).unwrap();
        assert_eq!(minute_of(time), 1_800_000_000);
        assert_eq!(minute_of(DateTime::from_timestamp(120, 0).unwrap()), 120);
        assert_eq!(minute_of(DateTime::from_timestamp(179, 0).unwrap()), 120);
    }
}
