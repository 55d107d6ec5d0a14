//! `sag-agent dataplane`: attach the programs by hand and watch their counters.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _, Result};
use clap::{Args, Subcommand, ValueEnum};
use sag_common::{
    counters::{ClientCounters, Direction, DropCounters},
    packet::Framing,
    policy::{DropReason, RateLimit, MAX_BOX_BANDWIDTH_KBPS},
};
use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};

use crate::dataplane::{
    detect_framing, ClientSettings, Dataplane, InterfaceCounter, PinnedCounters, DEFAULT_PIN_DIR,
};

#[derive(Debug, Subcommand)]
pub enum DataplaneCommand {
    /// Attach the programs to a tunnel interface, count the given clients and print their
    /// counters until interrupted. The programs are detached on exit; the pinned counters stay.
    Watch(WatchArgs),
    /// Print the counters kept in the pinned maps, without loading or attaching anything.
    Show(ShowArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FramingArg {
    /// Packets start at the IP header (TUN, WireGuard).
    L3,
    /// Packets start with an Ethernet header, with or without one VLAN tag.
    Ethernet,
}

impl From<FramingArg> for Framing {
    fn from(framing: FramingArg) -> Self {
        match framing {
            FramingArg::L3 => Framing::L3,
            FramingArg::Ethernet => Framing::Ethernet,
        }
    }
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Interface that faces the clients.
    #[arg(long, value_name = "IFACE")]
    tunnel: String,
    /// Link-layer framing of packets on the interface; by default it follows the interface's
    /// link type (TUN and WireGuard: l3, Ethernet and veth: ethernet).
    #[arg(long, value_enum)]
    framing: Option<FramingArg>,
    /// Client address to count; repeat for more clients.
    #[arg(long = "client", value_name = "IPV4", required = true)]
    clients: Vec<Ipv4Addr>,
    /// bpffs directory for the pinned maps; counters kept there survive a restart.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Limit each client to this rate in each direction, 1 to 10,000,000 kbit/s, with a bucket
    /// of 500 ms at that rate. Without it, clients are counted but not limited.
    #[arg(
        long,
        value_name = "KBIT/S",
        allow_negative_numbers = true,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_BOX_BANDWIDTH_KBPS))
    )]
    rate_kbps: Option<u32>,
    /// Seconds between two prints, from 0.05 to 3600.
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0, allow_negative_numbers = true)]
    interval: f64,
    /// Stop after this many prints (the first comes at once); without it, run until interrupted.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    /// Print one JSON object per line instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// bpffs directory of the pinned maps.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

pub fn run(command: DataplaneCommand) -> Result<()> {
    match command {
        DataplaneCommand::Watch(args) => watch(args),
        DataplaneCommand::Show(args) => show(args),
    }
}

fn show(args: ShowArgs) -> Result<()> {
    let pinned = PinnedCounters::open(&args.pin_dir)
        .with_context(|| format!("no sag counters are pinned under {}", args.pin_dir.display()))?;
    let snapshot =
        Snapshot { clients: pinned.clients()?, interfaces: pinned.interface_counters()? };
    print_snapshot(&snapshot, None, args.json);
    Ok(())
}

fn watch(args: WatchArgs) -> Result<()> {
    if !(0.05..=3600.0).contains(&args.interval) {
        bail!("invalid --interval {}: must be between 0.05 and 3600 seconds", args.interval);
    }
    // Checked before loading, so that a typo creates no pins.
    let c_name = std::ffi::CString::new(args.tunnel.as_str())
        .with_context(|| format!("invalid --tunnel {:?}: contains a NUL byte", args.tunnel))?;
    // SAFETY: a valid NUL-terminated string.
    if args.tunnel.is_empty() || unsafe { libc::if_nametoindex(c_name.as_ptr()) } == 0 {
        bail!("invalid --tunnel {:?}: no such interface in this network namespace", args.tunnel);
    }
    for client in &args.clients {
        if client.is_unspecified()
            || client.is_broadcast()
            || client.is_multicast()
            || client.is_loopback()
        {
            bail!(
                "invalid --client {client}: must be a unicast address, not unspecified, \
                 broadcast, multicast or loopback"
            );
        }
    }
    let framing = match args.framing {
        Some(framing) => framing.into(),
        None => detect_framing(&args.tunnel)?,
    };
    let mut dataplane = Dataplane::load(Some(&args.pin_dir))?;
    let earlier: Vec<String> = dataplane
        .clients()?
        .into_keys()
        .filter(|address| !args.clients.contains(address))
        .map(|address| address.to_string())
        .collect();
    if !earlier.is_empty() {
        eprintln!(
            "note: {} also holds clients of earlier runs, which keep their limits: {}",
            args.pin_dir.display(),
            earlier.join(", ")
        );
    }
    // The agent's clients belong to an instance; writing them here would overwrite their
    // records and cut them off.
    for client in &args.clients {
        if let Ok(existing) = dataplane.client_settings(*client) {
            if existing.instance != 0 {
                bail!(
                    "invalid --client {client}: it is a client of instance number {} of the agent \
                     that uses {}, and watching it would overwrite its record; give watch \
                     another --pin-dir",
                    existing.instance,
                    args.pin_dir.display()
                );
            }
        }
    }
    dataplane.attach(&args.tunnel, framing)?;
    let limit = args.rate_kbps.map_or(RateLimit::UNLIMITED, RateLimit::with_default_burst);
    let settings = ClientSettings { rx: limit, tx: limit, ..ClientSettings::default() };
    for client in &args.clients {
        dataplane.add_client(*client, &settings)?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let result = runtime.block_on(watch_loop(&dataplane, &args));
    dataplane.detach(&args.tunnel)?;
    result
}

async fn watch_loop(dataplane: &Dataplane, args: &WatchArgs) -> Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(args.interval));
    let mut previous: Option<(Instant, BTreeMap<Ipv4Addr, ClientCounters>)> = None;
    let mut printed = 0u64;
    loop {
        tokio::select! {
            _ = interrupt.recv() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
            _ = ticker.tick() => {}
        }
        let now = Instant::now();
        let snapshot =
            Snapshot { clients: dataplane.clients()?, interfaces: dataplane.interface_counters()? };
        let rates = previous.as_ref().map(|(then, before)| {
            rates(before, &snapshot.clients, now.duration_since(*then).as_secs_f64())
        });
        print_snapshot(&snapshot, rates.as_ref(), args.json);
        previous = Some((now, snapshot.clients));
        printed += 1;
        if args.count.is_some_and(|count| printed >= count) {
            return Ok(());
        }
    }
}

struct Snapshot {
    clients: BTreeMap<Ipv4Addr, ClientCounters>,
    interfaces: Vec<InterfaceCounter>,
}

/// Receive and transmit rates of a client, in bit/s.
#[derive(Clone, Copy, Default)]
struct Rates {
    rx: f64,
    tx: f64,
}

fn rates(
    before: &BTreeMap<Ipv4Addr, ClientCounters>,
    after: &BTreeMap<Ipv4Addr, ClientCounters>,
    seconds: f64,
) -> BTreeMap<Ipv4Addr, Rates> {
    after
        .iter()
        .map(|(address, now)| {
            let then = before.get(address).copied().unwrap_or_default();
            let bits = |now: u64, then: u64| now.saturating_sub(then) as f64 * 8.0 / seconds;
            (
                *address,
                Rates {
                    rx: bits(now.rx_bytes, then.rx_bytes),
                    tx: bits(now.tx_bytes, then.tx_bytes),
                },
            )
        })
        .collect()
}

fn dropped_packets(drops: &DropCounters) -> u64 {
    DropReason::ALL
        .iter()
        .filter_map(|reason| drops.get(*reason))
        .map(|counter| counter.packets)
        .sum()
}

fn drops_json(drops: &DropCounters) -> serde_json::Value {
    let reasons: serde_json::Map<String, serde_json::Value> = DropReason::ALL
        .iter()
        .filter_map(|reason| {
            let counter = drops.get(*reason)?;
            let value = json!({ "packets": counter.packets, "bytes": counter.bytes });
            Some((reason.name().to_owned(), value))
        })
        .collect();
    serde_json::Value::Object(reasons)
}

fn direction_name(direction: Direction) -> &'static str {
    match direction {
        Direction::Rx => "rx",
        Direction::Tx => "tx",
    }
}

fn interface_name(ifindex: u32) -> String {
    let mut buffer = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer has the size if_indextoname requires.
    let name = unsafe { libc::if_indextoname(ifindex, buffer.as_mut_ptr()) };
    if name.is_null() {
        return format!("#{ifindex}");
    }
    // SAFETY: if_indextoname wrote a NUL-terminated string into the buffer.
    unsafe { std::ffi::CStr::from_ptr(buffer.as_ptr()) }.to_string_lossy().into_owned()
}

fn print_snapshot(snapshot: &Snapshot, rates: Option<&BTreeMap<Ipv4Addr, Rates>>, json: bool) {
    let rate = |address: &Ipv4Addr| rates.and_then(|r| r.get(address)).copied();
    if json {
        let time = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let clients: Vec<_> = snapshot
            .clients
            .iter()
            .map(|(address, c)| {
                let r = rate(address);
                json!({
                    "address": address.to_string(),
                    "rx_packets": c.rx_packets,
                    "rx_bytes": c.rx_bytes,
                    "tx_packets": c.tx_packets,
                    "tx_bytes": c.tx_bytes,
                    "rx_bits_per_second": r.map(|r| r.rx.round() as u64),
                    "tx_bits_per_second": r.map(|r| r.tx.round() as u64),
                    "rx_dropped": drops_json(&c.rx_dropped),
                    "tx_dropped": drops_json(&c.tx_dropped),
                })
            })
            .collect();
        let interfaces: Vec<_> = snapshot
            .interfaces
            .iter()
            .map(|i| {
                json!({
                    "ifindex": i.ifindex,
                    "direction": direction_name(i.direction),
                    "kind": i.kind.name(),
                    "packets": i.counter.packets,
                    "bytes": i.counter.bytes,
                })
            })
            .collect();
        println!("{}", json!({ "time": time, "clients": clients, "interfaces": interfaces }));
        return;
    }
    println!(
        "{:<15} {:>12} {:>14} {:>12} {:>10} {:>12} {:>14} {:>12} {:>10}",
        "CLIENT",
        "RX PACKETS",
        "RX BYTES",
        "RX BIT/S",
        "RX DROPS",
        "TX PACKETS",
        "TX BYTES",
        "TX BIT/S",
        "TX DROPS"
    );
    for (address, c) in &snapshot.clients {
        let (rx, tx) = match rate(address) {
            Some(r) => (format!("{:.0}", r.rx), format!("{:.0}", r.tx)),
            None => ("-".to_owned(), "-".to_owned()),
        };
        println!(
            "{:<15} {:>12} {:>14} {:>12} {:>10} {:>12} {:>14} {:>12} {:>10}",
            address.to_string(),
            c.rx_packets,
            c.rx_bytes,
            rx,
            dropped_packets(&c.rx_dropped),
            c.tx_packets,
            c.tx_bytes,
            tx,
            dropped_packets(&c.tx_dropped)
        );
    }
    if !snapshot.interfaces.is_empty() {
        println!(
            "{:<15} {:<4} {:<13} {:>12} {:>14}",
            "INTERFACE", "DIR", "KIND", "PACKETS", "BYTES"
        );
        for i in &snapshot.interfaces {
            println!(
                "{:<15} {:<4} {:<13} {:>12} {:>14}",
                interface_name(i.ifindex),
                direction_name(i.direction),
                i.kind.name(),
                i.counter.packets,
                i.counter.bytes
            );
        }
    }
    println!();
}
