//! `sag-agent monitor`: the traffic history of an instance or one of its accounts, as the eight
//! monitoring figures in a table with terminal charts, as JSON, or as charts in a PNG image.
//!
//! The agent stores one point per account and minute. This command groups the minutes of the
//! range into buckets (table rows or chart points) and derives the figures of each bucket.
//! "rx" is what the gateway receives from clients and "tx" what it sends to them, in IP bytes.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use chrono::{DateTime, NaiveDateTime, Utc};
use clap::{Args, ValueEnum};
use embedded_graphics::{
    mono_font::{
        ascii::{FONT_6X10, FONT_8X13},
        MonoTextStyle,
    },
    pixelcolor::Rgb888,
    prelude::*,
    primitives::{Line, PrimitiveStyle, Rectangle},
    text::{Alignment, Baseline, Text, TextStyleBuilder},
};
use hyper::Method;
use serde::Serialize;

use super::{table, ClientOptions};
use crate::{
    api_client::ApiClient,
    history::{minute_of, MinutePoint, MonitorReply, MAX_MONITOR_MINUTES},
    validation::{self, ValidationError},
};

/// Maximum table rows of a custom range. The preset ranges have twelve.
const MAX_TABLE_ROWS: i64 = 24;
/// Maximum points of one PNG chart, about one per two pixels of its width.
const MAX_CHART_POINTS: i64 = 240;
/// Bucket lengths to choose from, in minutes: the shortest that keeps the row or point count
/// within its maximum is used.
const BUCKET_MINUTES: [i64; 12] = [1, 2, 5, 10, 15, 30, 60, 120, 180, 360, 720, 1440];
/// Width of each terminal chart, in characters, when the buckets are few enough to repeat.
const SPARKLINE_WIDTH: usize = 48;
/// Block characters of the terminal charts, from lowest to highest.
const SPARK_LEVELS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// Arguments of `sag-agent monitor`.
#[derive(Debug, Args)]
pub struct MonitorArgs {
    #[command(flatten)]
    options: ClientOptions,
    /// Instance ID.
    instance: String,
    /// Show one account of the instance instead of all of them together.
    #[arg(long, value_name = "NAME")]
    account: Option<String>,
    /// Range ending at the last whole minute [default: 1h].
    #[arg(long, value_enum, conflicts_with_all = ["from", "to"])]
    range: Option<PresetRange>,
    /// Start of a custom range: RFC 3339 (2026-05-01T08:00:00+02:00) or `YYYY-MM-DD HH:MM` in
    /// UTC, seconds dropped. At most 15 days before --to. The agent keeps 16 days of history.
    #[arg(long, value_name = "TIME")]
    from: Option<String>,
    /// End of a custom range (exclusive), in the format of --from [default: the last whole
    /// minute].
    #[arg(long, value_name = "TIME", requires = "from")]
    to: Option<String>,
    /// Unit of the byte figures in the table and charts, decimal: 1 KB = 1,000 B. --json always
    /// gives bytes.
    #[arg(long, value_enum, ignore_case = true, default_value = "KB")]
    unit: ByteUnit,
    /// Also draw the eight figures as charts into this PNG file.
    #[arg(long, value_name = "FILE")]
    png: Option<PathBuf>,
}

/// A preset range, ending at the last whole minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PresetRange {
    #[value(name = "1h")]
    OneHour,
    #[value(name = "3h")]
    ThreeHours,
    #[value(name = "6h")]
    SixHours,
    #[value(name = "12h")]
    TwelveHours,
}

impl PresetRange {
    fn minutes(self) -> i64 {
        match self {
            Self::OneHour => 60,
            Self::ThreeHours => 3 * 60,
            Self::SixHours => 6 * 60,
            Self::TwelveHours => 12 * 60,
        }
    }

    /// Returns the minutes per table row, so that every preset has twelve rows.
    fn bucket_minutes(self) -> i64 {
        match self {
            Self::OneHour => 5,
            Self::ThreeHours => 15,
            Self::SixHours => 30,
            Self::TwelveHours => 60,
        }
    }
}

/// Unit of byte figures, decimal as in SI: 1 KB = 1,000 B.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ByteUnit {
    #[value(name = "B")]
    Bytes,
    #[value(name = "KB")]
    Kilobytes,
    #[value(name = "MB")]
    Megabytes,
    #[value(name = "GB")]
    Gigabytes,
}

impl ByteUnit {
    fn bytes(self) -> f64 {
        match self {
            Self::Bytes => 1.0,
            Self::Kilobytes => 1e3,
            Self::Megabytes => 1e6,
            Self::Gigabytes => 1e9,
        }
    }

    fn symbol(self) -> &'static str {
        match self {
            Self::Bytes => "B",
            Self::Kilobytes => "KB",
            Self::Megabytes => "MB",
            Self::Gigabytes => "GB",
        }
    }

    /// Returns the decimals shown: whole bytes, and hundredths of the larger units.
    fn decimals(self) -> usize {
        if self == Self::Bytes {
            0
        } else {
            2
        }
    }
}

/// The requested range: whole minutes, `to` exclusive, both Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    from: i64,
    to: i64,
    /// Minutes per table row.
    bucket_minutes: i64,
}

impl Window {
    fn minutes(&self) -> i64 {
        (self.to - self.from) / 60
    }
}

/// Traffic of a span of whole minutes and the eight monitoring figures derived from it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
struct Figures {
    /// Start of the span, Unix seconds.
    start: i64,
    /// Length of the span, in minutes.
    minutes: i64,
    /// rxBytes: bytes received from clients.
    rx_bytes: u64,
    /// txBytes: bytes sent to clients.
    tx_bytes: u64,
    rx_packets: u64,
    tx_packets: u64,
    rx_dropped_packets: u64,
    tx_dropped_packets: u64,
    /// rxBit/s: average inbound rate.
    rx_bits_per_second: f64,
    /// txBit/s: average outbound rate.
    tx_bits_per_second: f64,
    /// rxDropPackets: inbound packets dropped, on average per minute.
    rx_dropped_packets_per_minute: f64,
    /// txDropPackets: outbound packets dropped, on average per minute.
    tx_dropped_packets_per_minute: f64,
    /// rxBytesHour: inbound bytes scaled to one hour.
    rx_bytes_per_hour: f64,
    /// txBytesHour: outbound bytes scaled to one hour.
    tx_bytes_per_hour: f64,
}

/// Sums `points`, minutes that start at `start`, and derives the figures. An empty span has
/// all figures zero.
fn figures(start: i64, points: &[MinutePoint]) -> Figures {
    let mut sum = MinutePoint::default();
    for point in points {
        sum.rx_bytes += point.rx_bytes;
        sum.tx_bytes += point.tx_bytes;
        sum.rx_packets += point.rx_packets;
        sum.tx_packets += point.tx_packets;
        sum.rx_dropped_packets += point.rx_dropped_packets;
        sum.tx_dropped_packets += point.tx_dropped_packets;
    }
    let minutes = points.len() as f64;
    let seconds = minutes * 60.0;
    // An empty span has no rate rather than a division by zero.
    let per = |value: f64, length: f64| if points.is_empty() { 0.0 } else { value / length };
    Figures {
        start,
        minutes: points.len() as i64,
        rx_bytes: sum.rx_bytes,
        tx_bytes: sum.tx_bytes,
        rx_packets: sum.rx_packets,
        tx_packets: sum.tx_packets,
        rx_dropped_packets: sum.rx_dropped_packets,
        tx_dropped_packets: sum.tx_dropped_packets,
        rx_bits_per_second: per(sum.rx_bytes as f64 * 8.0, seconds),
        tx_bits_per_second: per(sum.tx_bytes as f64 * 8.0, seconds),
        rx_dropped_packets_per_minute: per(sum.rx_dropped_packets as f64, minutes),
        tx_dropped_packets_per_minute: per(sum.tx_dropped_packets as f64, minutes),
        rx_bytes_per_hour: per(sum.rx_bytes as f64 * 3600.0, seconds),
        tx_bytes_per_hour: per(sum.tx_bytes as f64 * 3600.0, seconds),
    }
}

/// Splits `points`, one per minute from `from`, into buckets of `bucket_minutes` and returns
/// the figures of each. The last bucket is shorter when the minutes do not divide evenly.
fn buckets(from: i64, points: &[MinutePoint], bucket_minutes: i64) -> Vec<Figures> {
    let size = usize::try_from(bucket_minutes.max(1)).unwrap_or(usize::MAX);
    points
        .chunks(size)
        .enumerate()
        .map(|(index, chunk)| figures(from + index as i64 * bucket_minutes * 60, chunk))
        .collect()
}

/// Returns the shortest bucket of [`BUCKET_MINUTES`] that splits `minutes` into at most
/// `max_buckets` buckets, or an even split beyond the longest.
fn bucket_minutes_for(minutes: i64, max_buckets: i64) -> i64 {
    let max_buckets = max_buckets.max(1);
    BUCKET_MINUTES
        .into_iter()
        .find(|size| (minutes + size - 1) / size <= max_buckets)
        .unwrap_or_else(|| (minutes + max_buckets - 1) / max_buckets)
}

/// Returns the points of every minute of `reply`'s range in order, zero where the reply has
/// none. The agent already fills the gaps, but rates over a bucket are only right if it did.
fn dense_points(reply: &MonitorReply) -> Vec<MinutePoint> {
    let minutes = usize::try_from((reply.to - reply.from) / 60).unwrap_or_default();
    let mut points: Vec<MinutePoint> = (0..minutes)
        .map(|n| MinutePoint { minute: reply.from + n as i64 * 60, ..MinutePoint::default() })
        .collect();
    for point in &reply.points {
        let index = usize::try_from((point.minute - reply.from).div_euclid(60));
        if let Some(slot) = index.ok().and_then(|index| points.get_mut(index)) {
            *slot = *point;
        }
    }
    points
}

/// Parses a time of --from or --to: RFC 3339, or `YYYY-MM-DD HH:MM` in UTC.
fn parse_time(option: &'static str, value: &str) -> Result<DateTime<Utc>, ValidationError> {
    if let Ok(time) = DateTime::parse_from_rfc3339(value) {
        return Ok(time.with_timezone(&Utc));
    }
    NaiveDateTime::parse_from_str(value, "%Y-%m-%d %H:%M").map(|time| time.and_utc()).map_err(
        |_| ValidationError {
            field: option,
            rule: "must be RFC 3339 (2026-05-01T08:00:00Z) or YYYY-MM-DD HH:MM in UTC".to_owned(),
            value: format!("{value:?}"),
        },
    )
}

/// Computes the range and its table rows from the options, `now` being the current time.
///
/// # Errors
/// Fails with a [`ValidationError`] naming the option if a time cannot be parsed, if --to is
/// not at least one whole minute after --from, or if the range is longer than 15 days.
fn window(
    range: Option<PresetRange>,
    from: Option<&str>,
    to: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Window, ValidationError> {
    let last_minute_end = minute_of(now);
    let Some(from_text) = from else {
        let range = range.unwrap_or(PresetRange::OneHour);
        return Ok(Window {
            from: last_minute_end - range.minutes() * 60,
            to: last_minute_end,
            bucket_minutes: range.bucket_minutes(),
        });
    };
    let from = minute_of(parse_time("--from", from_text)?);
    let to_text = to;
    let to = match to_text {
        Some(text) => minute_of(parse_time("--to", text)?),
        None => last_minute_end,
    };
    if to <= from {
        return Err(ValidationError {
            field: "--to",
            rule: format!(
                "must be at least one whole minute after --from {from_text:?} (seconds are \
                 dropped)"
            ),
            value: to_text.map_or_else(
                || format!("(the last whole minute, {})", rfc3339(to)),
                |text| format!("{text:?}"),
            ),
        });
    }
    let minutes = (to - from) / 60;
    if minutes > MAX_MONITOR_MINUTES {
        return Err(ValidationError {
            field: "--from",
            rule: format!(
                "must be at most 15 days ({MAX_MONITOR_MINUTES} minutes) before --to, not {minutes} \
                 minutes"
            ),
            value: format!("{from_text:?}"),
        });
    }
    Ok(Window { from, to, bucket_minutes: bucket_minutes_for(minutes, MAX_TABLE_ROWS) })
}

fn rfc3339(unix: i64) -> String {
    DateTime::from_timestamp(unix, 0).map_or_else(|| unix.to_string(), |time| time.to_rfc3339())
}

/// One of the eight monitoring figures, as the table, the terminal charts and the PNG show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Figure {
    RxBytes,
    TxBytes,
    RxBitRate,
    TxBitRate,
    RxDropRate,
    TxDropRate,
    RxBytesHour,
    TxBytesHour,
}

const FIGURES: [Figure; 8] = [
    Figure::RxBytes,
    Figure::TxBytes,
    Figure::RxBitRate,
    Figure::TxBitRate,
    Figure::RxDropRate,
    Figure::TxDropRate,
    Figure::RxBytesHour,
    Figure::TxBytesHour,
];

impl Figure {
    fn name(self) -> &'static str {
        match self {
            Self::RxBytes => "rxBytes",
            Self::TxBytes => "txBytes",
            Self::RxBitRate => "rxBit/s",
            Self::TxBitRate => "txBit/s",
            Self::RxDropRate => "rxDropPackets",
            Self::TxDropRate => "txDropPackets",
            Self::RxBytesHour => "rxBytesHour",
            Self::TxBytesHour => "txBytesHour",
        }
    }

    fn is_rx(self) -> bool {
        matches!(self, Self::RxBytes | Self::RxBitRate | Self::RxDropRate | Self::RxBytesHour)
    }

    /// Returns the figure of `figures`, byte figures in `unit`.
    fn value(self, figures: &Figures, unit: ByteUnit) -> f64 {
        match self {
            Self::RxBytes => figures.rx_bytes as f64 / unit.bytes(),
            Self::TxBytes => figures.tx_bytes as f64 / unit.bytes(),
            Self::RxBitRate => figures.rx_bits_per_second,
            Self::TxBitRate => figures.tx_bits_per_second,
            Self::RxDropRate => figures.rx_dropped_packets_per_minute,
            Self::TxDropRate => figures.tx_dropped_packets_per_minute,
            Self::RxBytesHour => figures.rx_bytes_per_hour / unit.bytes(),
            Self::TxBytesHour => figures.tx_bytes_per_hour / unit.bytes(),
        }
    }

    /// Returns the unit of the figure, for buckets of `bucket_minutes`.
    fn unit_label(self, unit: ByteUnit, bucket_minutes: i64) -> String {
        match self {
            Self::RxBytes | Self::TxBytes => format!("{} per {bucket_minutes} min", unit.symbol()),
            Self::RxBitRate | Self::TxBitRate => "bit/s".to_owned(),
            Self::RxDropRate | Self::TxDropRate => "packets/min".to_owned(),
            Self::RxBytesHour | Self::TxBytesHour => format!("{}/hour", unit.symbol()),
        }
    }

    fn format(self, value: f64, unit: ByteUnit) -> String {
        let decimals = match self {
            Self::RxBitRate | Self::TxBitRate => 1,
            Self::RxDropRate | Self::TxDropRate => 2,
            _ => unit.decimals(),
        };
        format_number(value, decimals)
    }
}

/// Formats `value` with `decimals` decimals and commas between thousands.
fn format_number(value: f64, decimals: usize) -> String {
    let text = format!("{value:.decimals$}");
    let (sign, unsigned) = text.strip_prefix('-').map_or(("", text.as_str()), |rest| ("-", rest));
    let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let mut grouped = String::new();
    for (index, digit) in whole.chars().enumerate() {
        if index > 0 && (whole.len() - index).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    if fraction.is_empty() {
        format!("{sign}{grouped}")
    } else {
        format!("{sign}{grouped}.{fraction}")
    }
}

/// Draws `values` as block characters, each repeated `repeat` times. Zero is a space and any
/// other value at least the lowest block, so that little traffic still shows.
fn sparkline(values: &[f64], repeat: usize) -> String {
    let max = values.iter().copied().fold(0.0_f64, f64::max);
    let mut line = String::new();
    for value in values {
        let level = if *value <= 0.0 || max <= 0.0 {
            ' '
        } else {
            let index = (value / max * SPARK_LEVELS.len() as f64).ceil() as usize;
            SPARK_LEVELS[index.clamp(1, SPARK_LEVELS.len()) - 1]
        };
        line.extend(std::iter::repeat_n(level, repeat.max(1)));
    }
    line
}

/// The computed figures of a range, as `--json` prints them.
#[derive(Debug, Clone, Serialize)]
struct Report {
    instance_id: String,
    /// The account, or `None` for the whole instance.
    username: Option<String>,
    /// First minute, Unix seconds.
    from: i64,
    /// End of the range (exclusive), Unix seconds.
    to: i64,
    /// Minutes per bucket. The last bucket may be shorter.
    bucket_minutes: i64,
    buckets: Vec<Figures>,
    /// The whole range.
    total: Figures,
}

fn report(reply: &MonitorReply, bucket_minutes: i64) -> Report {
    let points = dense_points(reply);
    Report {
        instance_id: reply.instance_id.clone(),
        username: reply.username.clone(),
        from: reply.from,
        to: reply.to,
        bucket_minutes,
        buckets: buckets(reply.from, &points, bucket_minutes),
        total: figures(reply.from, &points),
    }
}

/// Percent-encodes a query value, leaving only the unreserved characters of RFC 3986, so that
/// usernames that are email addresses (`+`, `@`) reach the agent as given.
fn encode_query_value(value: &str) -> String {
    let mut encoded = String::new();
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// Runs `sag-agent monitor`.
///
/// # Errors
/// Fails with a [`ValidationError`] for an invalid ID, account or range, with the agent's
/// error if the request fails, or if the PNG cannot be written.
pub fn run(args: MonitorArgs) -> Result<()> {
    validation::instance_id(&args.instance)?;
    if let Some(username) = &args.account {
        if validation::username(username).is_err() {
            // Accounts made from an email address have it as their username.
            validation::email(username).map_err(|_| validation::username(username).unwrap_err())?;
        }
    }
    let window = window(args.range, args.from.as_deref(), args.to.as_deref(), Utc::now())?;
    let reply = fetch_history(&args, &window)?;

    if let Some(file) = &args.png {
        let chart_minutes = bucket_minutes_for(window.minutes(), MAX_CHART_POINTS);
        draw_png(&report(&reply, chart_minutes), args.unit)
            .save_with_format(file, image::ImageFormat::Png)
            .with_context(|| format!("failed to write the PNG file {}", file.display()))?;
    }

    let report = report(&reply, window.bucket_minutes);
    if args.options.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    print_report(&report, args.unit);
    if let Some(file) = &args.png {
        println!("\ncharts written to {}", file.display());
    }
    Ok(())
}

/// Requests the minutes of `window` from the agent.
fn fetch_history(args: &MonitorArgs, window: &Window) -> Result<MonitorReply> {
    let mut path =
        format!("/instances/{}/monitor?from={}&to={}", args.instance, window.from, window.to);
    if let Some(username) = &args.account {
        path.push_str(&format!("&account={}", encode_query_value(username)));
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let client = ApiClient::new(&args.options.socket);
    Ok(runtime.block_on(client.call(Method::GET, &path, None::<&()>))?)
}

/// Formats a time in UTC as `HH:MM`, with the date in front when `with_date` is set.
fn time_label(unix: i64, with_date: bool) -> String {
    let format = if with_date { "%m-%d %H:%M" } else { "%H:%M" };
    DateTime::from_timestamp(unix, 0)
        .map_or_else(|| unix.to_string(), |time| time.format(format).to_string())
}

/// Returns whether the range spans more than one UTC day, so that labels need the date.
fn spans_days(report: &Report) -> bool {
    report.from.div_euclid(86_400) != (report.to - 1).div_euclid(86_400)
}

fn range_text(report: &Report) -> String {
    let format = |unix: i64| {
        DateTime::from_timestamp(unix, 0)
            .map_or_else(|| unix.to_string(), |time| time.format("%Y-%m-%d %H:%M").to_string())
    };
    let subject = match &report.username {
        Some(username) => format!("account {username} of instance {}", report.instance_id),
        None => format!("instance {} (all accounts)", report.instance_id),
    };
    format!("{subject}, {} to {} UTC", format(report.from), format(report.to))
}

fn print_report(report: &Report, unit: ByteUnit) {
    println!("{}", range_text(report));
    println!(
        "Rows of {} min. Bytes in {} (1 KB = 1,000 B), rates in bit/s, drops in packets/min, \
         BytesHour in {}/hour.",
        report.bucket_minutes,
        unit.symbol(),
        unit.symbol()
    );
    println!();
    let with_date = spans_days(report);
    let mut header = vec!["TIME"];
    header.extend(FIGURES.iter().map(|figure| figure.name()));
    let row = |label: String, figures: &Figures| {
        let mut cells = vec![label];
        cells.extend(FIGURES.iter().map(|figure| figure.format(figure.value(figures, unit), unit)));
        cells
    };
    let mut rows: Vec<Vec<String>> = report
        .buckets
        .iter()
        .map(|bucket| row(time_label(bucket.start, with_date), bucket))
        .collect();
    rows.push(row("total".to_owned(), &report.total));
    align_numbers_right(&header, &mut rows);
    table::print(&header, &rows);

    println!();
    let repeat = (SPARKLINE_WIDTH / report.buckets.len().max(1)).max(1);
    let name_width = FIGURES.iter().map(|figure| figure.name().len()).max().unwrap_or(0);
    for figure in FIGURES {
        let values: Vec<f64> =
            report.buckets.iter().map(|bucket| figure.value(bucket, unit)).collect();
        let max = values.iter().copied().fold(0.0_f64, f64::max);
        println!(
            "{:<name_width$}  │{}│ max {} {}",
            figure.name(),
            sparkline(&values, repeat),
            figure.format(max, unit),
            figure.unit_label(unit, report.bucket_minutes)
        );
    }
}

/// Pads the cells after the first column on the left, so that their numbers line up on the
/// right under `header`.
fn align_numbers_right(header: &[&str], rows: &mut [Vec<String>]) {
    for (column, name) in header.iter().enumerate().skip(1) {
        let width = rows
            .iter()
            .filter_map(|row| row.get(column))
            .map(|cell| cell.chars().count())
            .chain([name.chars().count()])
            .max()
            .unwrap_or(0);
        for cell in rows.iter_mut().filter_map(|row| row.get_mut(column)) {
            *cell = format!("{cell:>width$}");
        }
    }
}

/// Width of the PNG image, in pixels.
const PNG_WIDTH: u32 = 1000;
/// Height of the PNG image, in pixels: a title band and four rows of charts.
const PNG_HEIGHT: u32 = PNG_TITLE_HEIGHT + 4 * PNG_CELL_HEIGHT;
const PNG_TITLE_HEIGHT: u32 = 40;
const PNG_CELL_WIDTH: u32 = PNG_WIDTH / 2;
const PNG_CELL_HEIGHT: u32 = 215;

const WHITE: Rgb888 = Rgb888::new(255, 255, 255);
const BLACK: Rgb888 = Rgb888::new(0, 0, 0);
const AXIS_GRAY: Rgb888 = Rgb888::new(120, 120, 120);
const GRID_GRAY: Rgb888 = Rgb888::new(225, 225, 225);
const RX_BLUE: Rgb888 = Rgb888::new(31, 119, 180);
const TX_ORANGE: Rgb888 = Rgb888::new(230, 120, 20);

/// An RGB image that embedded-graphics draws on. Pixels outside it are skipped.
struct Canvas(image::RgbImage);

impl OriginDimensions for Canvas {
    fn size(&self) -> Size {
        Size::new(self.0.width(), self.0.height())
    }
}

impl DrawTarget for Canvas {
    type Color = Rgb888;
    type Error = std::convert::Infallible;

    fn draw_iter<I>(&mut self, pixels: I) -> Result<(), Self::Error>
    where
        I: IntoIterator<Item = Pixel<Self::Color>>,
    {
        for Pixel(point, color) in pixels {
            let (Ok(x), Ok(y)) = (u32::try_from(point.x), u32::try_from(point.y)) else {
                continue;
            };
            if x < self.0.width() && y < self.0.height() {
                self.0.put_pixel(x, y, image::Rgb([color.r(), color.g(), color.b()]));
            }
        }
        Ok(())
    }
}

impl Canvas {
    fn text(&mut self, text: &str, at: Point, large: bool, alignment: Alignment) {
        let font = if large { &FONT_8X13 } else { &FONT_6X10 };
        let style = MonoTextStyle::new(font, BLACK);
        let layout = TextStyleBuilder::new().alignment(alignment).baseline(Baseline::Top).build();
        let Ok(_) = Text::with_text_style(text, at, style, layout).draw(self);
    }

    fn line(&mut self, from: Point, to: Point, color: Rgb888) {
        let Ok(()) =
            Line::new(from, to).into_styled(PrimitiveStyle::with_stroke(color, 1)).draw(self);
    }

    fn fill(&mut self, top_left: Point, size: Size, color: Rgb888) {
        let Ok(()) =
            Rectangle::new(top_left, size).into_styled(PrimitiveStyle::with_fill(color)).draw(self);
    }
}

/// Draws the eight figures of `report` as bar charts in a grid of two columns and four rows,
/// rx on the left and tx on the right, each with its title, maximum and time axis.
fn draw_png(report: &Report, unit: ByteUnit) -> image::RgbImage {
    let mut canvas = Canvas(image::RgbImage::new(PNG_WIDTH, PNG_HEIGHT));
    let Ok(()) = canvas.clear(WHITE);
    canvas.text(&range_text(report), Point::new(12, 14), true, Alignment::Left);
    for (index, figure) in FIGURES.into_iter().enumerate() {
        let column = (index % 2) as i32;
        let row = (index / 2) as i32;
        let origin = Point::new(
            column * PNG_CELL_WIDTH as i32,
            PNG_TITLE_HEIGHT as i32 + row * PNG_CELL_HEIGHT as i32,
        );
        draw_chart(&mut canvas, origin, report, figure, unit);
    }
    canvas.0
}

fn draw_chart(canvas: &mut Canvas, origin: Point, report: &Report, figure: Figure, unit: ByteUnit) {
    const MARGIN: i32 = 14;
    const PLOT_TOP: i32 = 36;
    const PLOT_BOTTOM: i32 = PNG_CELL_HEIGHT as i32 - 24;
    let left = origin.x + MARGIN;
    let right = origin.x + PNG_CELL_WIDTH as i32 - MARGIN;
    let (top, bottom) = (origin.y + PLOT_TOP, origin.y + PLOT_BOTTOM);
    let values: Vec<f64> = report.buckets.iter().map(|bucket| figure.value(bucket, unit)).collect();
    let max = values.iter().copied().fold(0.0_f64, f64::max);

    let title = format!("{} ({})", figure.name(), figure.unit_label(unit, report.bucket_minutes));
    canvas.text(&title, Point::new(left, origin.y + 8), true, Alignment::Left);
    canvas.text(
        &format!("max {}", figure.format(max, unit)),
        Point::new(right, origin.y + 10),
        false,
        Alignment::Right,
    );

    for quarter in 1..4 {
        let y = bottom - (bottom - top) * quarter / 4;
        canvas.line(Point::new(left, y), Point::new(right, y), GRID_GRAY);
    }
    let color = if figure.is_rx() { RX_BLUE } else { TX_ORANGE };
    let width = right - left;
    let count = values.len().max(1) as i32;
    for (index, value) in values.iter().enumerate() {
        if *value <= 0.0 || max <= 0.0 {
            continue;
        }
        let index = index as i32;
        let (x0, x1) = (left + width * index / count, left + width * (index + 1) / count);
        let height = (((bottom - top) as f64) * value / max).round().max(1.0) as i32;
        // One pixel between bars while they are wide enough to show it.
        let bar_width = if x1 - x0 > 3 { x1 - x0 - 1 } else { (x1 - x0).max(1) };
        canvas.fill(
            Point::new(x0, bottom - height),
            Size::new(bar_width as u32, height as u32),
            color,
        );
    }
    canvas.line(Point::new(left, top), Point::new(left, bottom), AXIS_GRAY);
    canvas.line(Point::new(left, bottom), Point::new(right, bottom), AXIS_GRAY);

    let with_date = spans_days(report);
    canvas.text(
        &time_label(report.from, with_date),
        Point::new(left, bottom + 4),
        false,
        Alignment::Left,
    );
    // The middle label is a whole minute, placed where that minute starts.
    let middle = (report.from + (report.to - report.from) / 2).div_euclid(60) * 60;
    let span = (report.to - report.from).max(1);
    let middle_x = left + (i64::from(width) * (middle - report.from) / span) as i32;
    canvas.text(
        &time_label(middle, with_date),
        Point::new(middle_x, bottom + 4),
        false,
        Alignment::Center,
    );
    canvas.text(
        &time_label(report.to, with_date),
        Point::new(right, bottom + 4),
        false,
        Alignment::Right,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A whole minute: 2027-01-15 08:00 UTC.
    const FROM: i64 = 1_800_000_000;

    /// Returns `count` minutes from [`FROM`], each with `rx` and `tx` bytes and no drops.
    fn minutes(count: i64, rx: u64, tx: u64) -> Vec<MinutePoint> {
        (0..count)
            .map(|n| MinutePoint {
                minute: FROM + n * 60,
                rx_bytes: rx,
                tx_bytes: tx,
                ..MinutePoint::default()
            })
            .collect()
    }

    fn time(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn bit_rate_averages_over_bucket() {
        let figures = figures(FROM, &minutes(2, 300_000, 150_000));
        assert_eq!(figures.rx_bytes, 600_000);
        assert_eq!(figures.tx_bytes, 300_000);
        assert_eq!(figures.rx_bits_per_second, 40_000.0, "600,000 B * 8 / 120 s");
        assert_eq!(figures.tx_bits_per_second, 20_000.0);
        assert_eq!(figures.minutes, 2);
        assert_eq!(figures.start, FROM);
    }

    #[test]
    fn bytes_hour_scales_to_sixty_minutes() {
        let two_minutes = figures(FROM, &minutes(2, 300_000, 0));
        assert_eq!(two_minutes.rx_bytes_per_hour, 18_000_000.0, "600,000 B * 60 / 2");
        let quarter_hour = figures(FROM, &minutes(15, 100_000, 1));
        assert_eq!(quarter_hour.rx_bytes_per_hour, 6_000_000.0, "1,500,000 B * 60 / 15");
        assert_eq!(quarter_hour.tx_bytes_per_hour, 60.0);
        let hour = figures(FROM, &minutes(60, 10, 20));
        assert_eq!(hour.rx_bytes_per_hour, 600.0, "an hour scales by one");
        assert_eq!(hour.tx_bytes_per_hour, 1_200.0);
    }

    #[test]
    fn drops_average_per_minute() {
        let mut points = minutes(5, 0, 0);
        points[1].rx_dropped_packets = 3;
        points[3].rx_dropped_packets = 7;
        points[4].tx_dropped_packets = 1;
        let figures = figures(FROM, &points);
        assert_eq!(figures.rx_dropped_packets, 10);
        assert_eq!(figures.tx_dropped_packets, 1);
        assert_eq!(figures.rx_dropped_packets_per_minute, 2.0);
        assert_eq!(figures.tx_dropped_packets_per_minute, 0.2);
    }

    #[test]
    fn empty_span_is_all_zero() {
        let figures = figures(FROM, &[]);
        assert_eq!(figures.minutes, 0);
        assert_eq!(figures.rx_bits_per_second, 0.0);
        assert_eq!(figures.rx_dropped_packets_per_minute, 0.0);
        assert_eq!(figures.tx_bytes_per_hour, 0.0);
    }

    #[test]
    fn buckets_split_with_short_last() {
        let mut points = minutes(7, 60, 0);
        points[6].rx_bytes = 600;
        let buckets = buckets(FROM, &points, 5);
        assert_eq!(buckets.len(), 2);
        assert_eq!((buckets[0].start, buckets[0].minutes), (FROM, 5));
        assert_eq!((buckets[1].start, buckets[1].minutes), (FROM + 300, 2));
        assert_eq!(buckets[0].rx_bytes, 300);
        assert_eq!(buckets[1].rx_bytes, 660);
        assert_eq!(buckets[1].rx_bits_per_second, 660.0 * 8.0 / 120.0);
        assert_eq!(buckets[1].rx_bytes_per_hour, 660.0 * 30.0);
    }

    #[test]
    fn presets_have_twelve_rows() {
        let now = time("2026-05-01T12:07:42Z");
        let end = time("2026-05-01T12:07:00Z").timestamp();
        for (range, bucket) in [
            (PresetRange::OneHour, 5),
            (PresetRange::ThreeHours, 15),
            (PresetRange::SixHours, 30),
            (PresetRange::TwelveHours, 60),
        ] {
            let window = window(Some(range), None, None, now).unwrap();
            assert_eq!(window.to, end, "{range:?} ends at the last whole minute");
            assert_eq!(window.minutes(), range.minutes(), "{range:?}");
            assert_eq!(window.bucket_minutes, bucket, "{range:?}");
            assert_eq!(window.minutes() / window.bucket_minutes, 12, "{range:?}");
        }
        assert_eq!(
            window(None, None, None, now).unwrap(),
            window(Some(PresetRange::OneHour), None, None, now).unwrap(),
            "the default is the last hour"
        );
    }

    #[test]
    fn custom_ranges_pick_bucket() {
        for (minutes, rows) in [
            (1, 1),
            (2, 1),
            (24, 1),
            (25, 2),
            (30, 2),
            (60, 5),
            (90, 5),
            (24 * 60, 60),
            (24 * 60 + 1, 120),
            (MAX_MONITOR_MINUTES, 1440),
        ] {
            let bucket = bucket_minutes_for(minutes, MAX_TABLE_ROWS);
            assert_eq!(bucket, rows, "{minutes} minutes");
            assert!((minutes + bucket - 1) / bucket <= MAX_TABLE_ROWS, "{minutes} minutes");
        }
        assert_eq!(bucket_minutes_for(60, MAX_CHART_POINTS), 1);
        assert_eq!(bucket_minutes_for(12 * 60, MAX_CHART_POINTS), 5);
        assert_eq!(bucket_minutes_for(MAX_MONITOR_MINUTES, MAX_CHART_POINTS), 120);
        assert_eq!(bucket_minutes_for(100 * 1440, 24), 6_000, "past the list, an even split");
    }

    #[test]
    fn custom_range_parses_both_formats() {
        let now = time("2026-05-01T12:07:42Z");
        let window =
            window(None, Some("2026-05-01 10:00"), Some("2026-05-01T12:30:59+02:00"), now).unwrap();
        assert_eq!(window.from, time("2026-05-01T10:00:00Z").timestamp());
        assert_eq!(window.to, time("2026-05-01T10:30:00Z").timestamp(), "seconds dropped");
        assert_eq!(window.bucket_minutes, 2);
        let open_ended = super::window(None, Some("2026-05-01 11:07"), None, now).unwrap();
        assert_eq!(open_ended.to, time("2026-05-01T12:07:00Z").timestamp());
        assert_eq!(open_ended.bucket_minutes, 5);
    }

    #[test]
    fn custom_range_rejects_bad_values() {
        let now = time("2026-05-01T12:07:42Z");
        let error = window(None, Some("yesterday"), None, now).unwrap_err();
        assert_eq!(error.field, "--from");
        assert_eq!(error.value, "\"yesterday\"");
        assert!(error.rule.contains("RFC 3339"), "{}", error.rule);

        let error = window(None, Some("2026-05-01 10:00"), Some("2026-05-01 25:00"), now);
        assert_eq!(error.unwrap_err().field, "--to");

        let error =
            window(None, Some("2026-05-01 10:00"), Some("2026-05-01 09:00"), now).unwrap_err();
        assert_eq!(error.field, "--to");
        assert_eq!(error.value, "\"2026-05-01 09:00\"");
        assert!(error.rule.contains("after --from \"2026-05-01 10:00\""), "{}", error.rule);

        let error = window(None, Some("2026-05-01T10:00:10Z"), Some("2026-05-01T10:00:50Z"), now)
            .unwrap_err();
        assert_eq!(error.field, "--to", "less than a whole minute");

        let error = window(None, Some("2026-05-01 12:30"), None, now).unwrap_err();
        assert_eq!(error.field, "--to", "a start after the last whole minute");
        assert!(error.value.contains("the last whole minute"), "{}", error.value);

        let error =
            window(None, Some("2026-04-16 09:59"), Some("2026-05-01 10:00"), now).unwrap_err();
        assert_eq!(error.field, "--from");
        assert!(error.rule.contains("at most 15 days"), "{}", error.rule);
        assert!(error.rule.contains("not 21601 minutes"), "{}", error.rule);
        let fifteen_days = window(None, Some("2026-04-16 10:00"), Some("2026-05-01 10:00"), now);
        assert_eq!(fifteen_days.unwrap().minutes(), MAX_MONITOR_MINUTES);
    }

    #[test]
    fn help_states_history_days() {
        assert_eq!(crate::history::HISTORY_DAYS, 16, "the --from help says 16 days");
        assert_eq!(MAX_MONITOR_MINUTES, 15 * 24 * 60, "the --from help says 15 days");
    }

    #[test]
    fn units_are_decimal() {
        let figures = figures(FROM, &minutes(1, 1_234_567, 0));
        let cases = [
            (ByteUnit::Bytes, 1_234_567.0, "1,234,567"),
            (ByteUnit::Kilobytes, 1_234.567, "1,234.57"),
            (ByteUnit::Megabytes, 1.234_567, "1.23"),
            (ByteUnit::Gigabytes, 0.001_234_567, "0.00"),
        ];
        for (unit, value, text) in cases {
            assert_eq!(Figure::RxBytes.value(&figures, unit), value, "{unit:?}");
            assert_eq!(Figure::RxBytes.format(value, unit), text, "{unit:?}");
        }
        assert_eq!(Figure::RxBytesHour.value(&figures, ByteUnit::Megabytes), 74.074_02);
        let rate = Figure::RxBitRate.value(&figures, ByteUnit::Gigabytes);
        assert_eq!(rate, 1_234_567.0 * 8.0 / 60.0, "rates are in bit/s whatever the unit");
        assert_eq!(Figure::RxBitRate.format(164_608.933, ByteUnit::Gigabytes), "164,608.9");
    }

    #[test]
    fn numbers_group_thousands() {
        assert_eq!(format_number(0.0, 0), "0");
        assert_eq!(format_number(999.0, 0), "999");
        assert_eq!(format_number(1_000.0, 0), "1,000");
        assert_eq!(format_number(1_234_567.891, 2), "1,234,567.89");
        assert_eq!(format_number(0.2, 2), "0.20");
        assert_eq!(format_number(-12_345.0, 1), "-12,345.0");
    }

    #[test]
    fn sparkline_scales_to_max() {
        assert_eq!(sparkline(&[0.0, 1.0, 4.0, 8.0], 1), " ▁▄█");
        assert_eq!(sparkline(&[0.01, 8.0], 2), "▁▁██", "little traffic still shows");
        assert_eq!(sparkline(&[0.0, 0.0], 1), "  ");
    }

    #[test]
    fn sparse_reply_becomes_dense() {
        let reply = MonitorReply {
            instance_id: "sag-0000000000000001".to_owned(),
            username: None,
            from: FROM,
            to: FROM + 4 * 60,
            points: vec![MinutePoint { minute: FROM + 120, rx_bytes: 5, ..MinutePoint::default() }],
        };
        let points = dense_points(&reply);
        assert_eq!(points.len(), 4);
        assert_eq!(
            points.iter().map(|point| point.minute).collect::<Vec<_>>(),
            [FROM, FROM + 60, FROM + 120, FROM + 180]
        );
        assert_eq!(points[2].rx_bytes, 5);
        assert_eq!(points.iter().map(|point| point.rx_bytes).sum::<u64>(), 5);
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(encode_query_value("alice-01"), "alice-01");
        assert_eq!(encode_query_value("a.b+c@example.com"), "a.b%2Bc%40example.com");
        assert_eq!(encode_query_value("x&y=z é"), "x%26y%3Dz%20%C3%A9");
    }

    #[test]
    fn png_draws_eight_charts() {
        let mut points = minutes(60, 1_000, 2_000);
        points[10].rx_dropped_packets = 4;
        points[20].tx_dropped_packets = 2;
        let reply = MonitorReply {
            instance_id: "sag-0000000000000001".to_owned(),
            username: Some("alice-01".to_owned()),
            from: FROM,
            to: FROM + 3600,
            points,
        };
        let image = draw_png(&report(&reply, 1), ByteUnit::Kilobytes);
        assert_eq!(image.dimensions(), (PNG_WIDTH, PNG_HEIGHT));
        // Each chart has bars in its direction's colour somewhere in its cell.
        for (index, figure) in FIGURES.into_iter().enumerate() {
            let (column, row) = (index as u32 % 2, index as u32 / 2);
            let color = if figure.is_rx() { RX_BLUE } else { TX_ORANGE };
            let pixel = image::Rgb([color.r(), color.g(), color.b()]);
            let x_range = column * PNG_CELL_WIDTH..(column + 1) * PNG_CELL_WIDTH;
            let y_range = PNG_TITLE_HEIGHT + row * PNG_CELL_HEIGHT
                ..PNG_TITLE_HEIGHT + (row + 1) * PNG_CELL_HEIGHT;
            let bars = x_range
                .flat_map(|x| y_range.clone().map(move |y| (x, y)))
                .filter(|(x, y)| *image.get_pixel(*x, *y) == pixel)
                .count();
            assert!(bars > 100, "{} has {bars} pixels of bars", figure.name());
        }
    }
}
