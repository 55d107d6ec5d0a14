//! `sag-agent traffic`: the live traffic of an instance's accounts, from the kernel counters,
//! every interval: rates each way, totals, and dropped packets by reason.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use hyper::Method;
use sag_common::{counters::DropCounters, policy::DropReason};
use serde::{Deserialize, Serialize};

use super::{table, ClientOptions};
use crate::{api::AccountTraffic, api_client::ApiClient, validation};

/// Minimum interval between two prints, in seconds.
const MIN_INTERVAL_S: f64 = 0.2;
/// Maximum interval between two prints, in seconds.
const MAX_INTERVAL_S: f64 = 3_600.0;

/// Arguments of `sag-agent traffic`.
#[derive(Debug, Args)]
pub struct TrafficArgs {
    /// The instance.
    instance: String,
    /// Seconds between two prints, 0.2 to 3,600.
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0, allow_negative_numbers = true)]
    interval: f64,
    /// Stop after this many prints; without it, run until interrupted.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    #[command(flatten)]
    options: ClientOptions,
}

/// One account's rates over an interval, as `--json` prints them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AccountRates {
    pub username: String,
    pub address: Option<std::net::Ipv4Addr>,
    pub rx_bits_per_second: f64,
    pub tx_bits_per_second: f64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Packets dropped in the interval, per direction and reason.
    pub rx_dropped: Vec<(String, u64)>,
    pub tx_dropped: Vec<(String, u64)>,
}

fn dropped_since(now: &DropCounters, then: &DropCounters) -> Vec<(String, u64)> {
    DropReason::ALL
        .iter()
        .filter_map(|reason| {
            let (now, then) = (now.get(*reason)?, then.get(*reason)?);
            Some((reason.name().to_owned(), now.packets.saturating_sub(then.packets)))
        })
        .collect()
}

/// Returns each account's rates between two readings taken `seconds` apart.
pub fn rates(
    before: &[AccountTraffic],
    after: &[AccountTraffic],
    seconds: f64,
) -> Vec<AccountRates> {
    after
        .iter()
        .map(|now| {
            let then = before
                .iter()
                .find(|then| then.username == now.username)
                .map(|then| then.counters)
                .unwrap_or_default();
            let (now_counters, bits) = (now.counters, |now: u64, then: u64| {
                now.saturating_sub(then) as f64 * 8.0 / seconds
            });
            AccountRates {
                username: now.username.clone(),
                address: now.address,
                rx_bits_per_second: bits(now_counters.rx_bytes, then.rx_bytes),
                tx_bits_per_second: bits(now_counters.tx_bytes, then.tx_bytes),
                rx_bytes: now_counters.rx_bytes,
                tx_bytes: now_counters.tx_bytes,
                rx_dropped: dropped_since(&now_counters.rx_dropped, &then.rx_dropped),
                tx_dropped: dropped_since(&now_counters.tx_dropped, &then.tx_dropped),
            }
        })
        .collect()
}

fn kbits(bits_per_second: f64) -> String {
    format!("{:.1}", bits_per_second / 1_000.0)
}

fn drops_text(drops: &[(String, u64)]) -> String {
    let moved: Vec<String> = drops
        .iter()
        .filter(|(_, packets)| *packets > 0)
        .map(|(reason, packets)| format!("{reason} {packets}"))
        .collect();
    if moved.is_empty() {
        "-".to_owned()
    } else {
        moved.join(", ")
    }
}

/// Runs `sag-agent traffic`.
pub fn run(args: TrafficArgs) -> Result<()> {
    validation::instance_id(&args.instance)?;
    if !(MIN_INTERVAL_S..=MAX_INTERVAL_S).contains(&args.interval) {
        bail!(
            "invalid --interval {}: must be {MIN_INTERVAL_S} to {MAX_INTERVAL_S} seconds",
            args.interval
        );
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let client = ApiClient::new(&args.options.socket);
    let path = format!("/instances/{}/traffic", args.instance);
    let read = || -> Result<(Instant, Vec<AccountTraffic>)> {
        let traffic = runtime.block_on(client.call(Method::GET, &path, None::<&()>))?;
        Ok((Instant::now(), traffic))
    };
    let interval = Duration::from_secs_f64(args.interval);
    let mut before = read()?;
    let mut printed = 0;
    while args.count.is_none_or(|count| printed < count) {
        std::thread::sleep(interval.saturating_sub(before.0.elapsed()));
        let after = read()?;
        let seconds = after.0.duration_since(before.0).as_secs_f64();
        let rates = rates(&before.1, &after.1, seconds);
        if args.options.json {
            println!("{}", serde_json::to_string(&rates)?);
        } else {
            let rows: Vec<Vec<String>> = rates
                .iter()
                .map(|rate| {
                    vec![
                        rate.username.clone(),
                        rate.address.map_or("-".to_owned(), |address| address.to_string()),
                        kbits(rate.rx_bits_per_second),
                        kbits(rate.tx_bits_per_second),
                        rate.rx_bytes.to_string(),
                        rate.tx_bytes.to_string(),
                        drops_text(&rate.rx_dropped),
                        drops_text(&rate.tx_dropped),
                    ]
                })
                .collect();
            table::print(
                &[
                    "ACCOUNT",
                    "ADDRESS",
                    "RX KBIT/S",
                    "TX KBIT/S",
                    "RX BYTES",
                    "TX BYTES",
                    "RX DROPS",
                    "TX DROPS",
                ],
                &rows,
            );
            println!();
        }
        before = after;
        printed += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use sag_common::counters::{ClientCounters, PacketCounter};

    use super::*;

    fn traffic(rx_bytes: u64, tx_bytes: u64, limited: u64) -> AccountTraffic {
        let mut counters = ClientCounters { rx_bytes, tx_bytes, ..ClientCounters::default() };
        counters.rx_dropped.rate_limit = PacketCounter { packets: limited, bytes: limited * 100 };
        AccountTraffic { username: "alice01".to_owned(), address: None, counters }
    }

    #[test]
    fn rates_over_an_interval() {
        let rates = rates(&[traffic(1_000, 0, 2)], &[traffic(126_000, 2_500, 7)], 2.0);
        assert_eq!(rates[0].rx_bits_per_second, 500_000.0);
        assert_eq!(rates[0].tx_bits_per_second, 10_000.0);
        assert_eq!(rates[0].rx_dropped[0], ("rate_limit".to_owned(), 5));
        assert_eq!(drops_text(&rates[0].rx_dropped), "rate_limit 5");
        assert_eq!(drops_text(&rates[0].tx_dropped), "-");
    }

    #[test]
    fn rates_of_a_new_account_start_at_zero() {
        let rates = rates(&[], &[traffic(8_000, 0, 0)], 1.0);
        assert_eq!(rates[0].rx_bits_per_second, 64_000.0);
    }
}
