//! Billing: account fees by zone and tier, each account's 5 GB monthly plan, subscription
//! packages, pay-as-you-go data settled daily, monthly statements with a due date, and
//! payments. Money is integer US cents, and a GB is [`BYTES_PER_GB`] bytes.
//!
//! Orders (a new instance, a renewal, an upgrade, a package) are charged when they are placed.
//! Data is charged once a UTC day has ended. An account's monthly usage is the larger of its
//! inbound and outbound bytes, and the first [`PLAN_BYTES_PER_ACCOUNT`] of it are in the plan.
//! The rest is taken from the owner's packages of that month, then billed as pay-as-you-go.
//! Once a month's last day is settled, each owner with charges in it gets a statement, due
//! [`PAYMENT_TERM_DAYS`] days later. Free trials pay nothing: no fee, and data beyond the plan
//! is neither taken from packages nor billed.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use chrono::{DateTime, Datelike as _, Days, Duration, Months, NaiveDate, Utc};
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use sqlx::{Any, Row as _, Transaction};
use tracing::info;

use crate::{
    admin::{self, AdminError, Instance},
    clock::Clock,
    store::Store,
    validation::{self, ValidationError, Zone},
};

/// Bytes in a GB, the unit of the data plan, packages and pay-as-you-go prices. The service
/// does not define its GB as 10^9 or 2^30 bytes, so sag bills decimal gigabytes, the usual
/// unit of cloud data prices.
pub const BYTES_PER_GB: u64 = 1_000_000_000;
/// Data plan of each account per calendar month, not shared with other accounts and not
/// carried over.
pub const PLAN_BYTES_PER_ACCOUNT: u64 = 5 * BYTES_PER_GB;
/// Accounts billed at the first-tier price. Each account beyond them costs the second-tier
/// price.
pub const FIRST_TIER_ACCOUNTS: u32 = 100;
/// Days from a statement's issue to its due date, the last day to pay it.
pub const PAYMENT_TERM_DAYS: u64 = 14;
/// Time after the end of a UTC day before its data is settled, in minutes. The traffic
/// recorder stores each minute just after it ends, so the day's last minute is in by then.
pub const SETTLEMENT_DELAY_MINUTES: i64 = 5;
/// Maximum length of a payment reference, in characters.
pub const MAX_PAYMENT_REFERENCE_LEN: usize = 100;

/// Prices of a zone, in US cents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZonePrices {
    /// Monthly fee of each of the first [`FIRST_TIER_ACCOUNTS`] accounts.
    pub first_tier_cents: i64,
    /// Monthly fee of each account beyond them.
    pub second_tier_cents: i64,
    /// Pay-as-you-go data, per GB.
    pub payg_cents_per_gb: i64,
}

/// Prices in mainland China and in the international zone, which are the same.
pub const MAINLAND_CHINA_AND_INTERNATIONAL_PRICES: ZonePrices =
    ZonePrices { first_tier_cents: 696, second_tier_cents: 542, payg_cents_per_gb: 310 };
/// Prices in Dubai.
pub const DUBAI_PRICES: ZonePrices =
    ZonePrices { first_tier_cents: 1_857, second_tier_cents: 1_548, payg_cents_per_gb: 1_083 };

/// Subscription packages on sale: size in GB and price in US cents, the same in mainland China
/// and the international zone. None are sold in Dubai.
pub const PACKAGE_PRICES: [(u64, i64); 8] = [
    (10, 2_600),
    (50, 12_300),
    (128, 28_800),
    (512, 114_900),
    (1_024, 215_400),
    (5_120, 1_019_300),
    (10_240, 1_938_100),
    (51_200, 9_231_000),
];

/// Returns the prices of `zone`.
pub fn prices(zone: Zone) -> ZonePrices {
    match zone {
        Zone::MainlandChina | Zone::International => MAINLAND_CHINA_AND_INTERNATIONAL_PRICES,
        Zone::Dubai => DUBAI_PRICES,
    }
}

/// Returns the name of a zone as reports and the admin API write it.
pub fn zone_name(zone: Zone) -> String {
    format!("{zone:?}")
}

/// Returns the monthly fee of `accounts` accounts in `zone`, in cents: the first
/// [`FIRST_TIER_ACCOUNTS`] at the first-tier price, the rest at the second-tier price.
pub fn account_fee_cents(accounts: u32, zone: Zone) -> i64 {
    let prices = prices(zone);
    let first = i64::from(accounts.min(FIRST_TIER_ACCOUNTS));
    let rest = i64::from(accounts.saturating_sub(FIRST_TIER_ACCOUNTS));
    first * prices.first_tier_cents + rest * prices.second_tier_cents
}

/// Returns the pay-as-you-go price of `bytes` in `zone`, in cents, rounded to the nearest cent
/// with halves rounded up. Each instance's data of each day is rounded on its own.
pub fn payg_cents(bytes: u64, zone: Zone) -> i64 {
    let price = u128::try_from(prices(zone).payg_cents_per_gb).unwrap_or_default();
    let gb = u128::from(BYTES_PER_GB);
    let cents = (u128::from(bytes) * price + gb / 2) / gb;
    i64::try_from(cents).unwrap_or(i64::MAX)
}

/// Returns the price of a package of `size_gb` GB in cents, or `None` if no such package is
/// sold.
pub fn package_price_cents(size_gb: u64) -> Option<i64> {
    PACKAGE_PRICES.iter().find(|(size, _)| *size == size_gb).map(|(_, price)| *price)
}

/// Writes cents as US dollars with two decimals, such as `1234.50`.
pub fn format_usd(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let magnitude = cents.unsigned_abs();
    format!("{sign}{}.{:02}", magnitude / 100, magnitude % 100)
}

/// Parses US dollars written with up to two decimals (`12`, `12.5`, `12.50`) into cents.
///
/// # Errors
/// Fails for anything else, for zero and for amounts above 10^12 dollars.
pub fn parse_usd(field: &'static str, text: &str) -> Result<i64, ValidationError> {
    let invalid = || ValidationError {
        field,
        rule: "must be a positive amount in US dollars with at most 2 decimals, such as 12.50"
            .to_owned(),
        value: format!("{text:?}"),
    };
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |part: &str| part.bytes().all(|byte| byte.is_ascii_digit());
    if whole.is_empty() || whole.len() > 12 || !digits(whole) {
        return Err(invalid());
    }
    if fraction.len() > 2 || !digits(fraction) || (text.contains('.') && fraction.is_empty()) {
        return Err(invalid());
    }
    let dollars: i64 = whole.parse().map_err(|_| invalid())?;
    let cents: i64 = format!("{fraction:0<2}").parse().map_err(|_| invalid())?;
    let total = dollars * 100 + cents;
    if total == 0 {
        return Err(invalid());
    }
    Ok(total)
}

/// Writes a UTC day as `YYYY-MM-DD`.
pub fn day_text(day: NaiveDate) -> String {
    day.format("%Y-%m-%d").to_string()
}

/// Returns the first instant of a UTC day.
pub fn start_of_day(day: NaiveDate) -> DateTime<Utc> {
    day.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc()
}

/// Parses a month written `YYYY-MM` and returns its first day.
///
/// # Errors
/// Fails with a message naming the field for anything else.
pub fn parse_month(text: &str) -> Result<NaiveDate, ValidationError> {
    let parsed = NaiveDate::parse_from_str(&format!("{text}-01"), "%Y-%m-%d")
        .ok()
        .filter(|_| text.len() == 7);
    parsed.ok_or_else(|| ValidationError {
        field: "month",
        rule: "must be a calendar month written YYYY-MM, such as 2026-03".to_owned(),
        value: format!("{text:?}"),
    })
}

/// Returns the last day of the month that starts on `first`.
pub fn last_day_of_month(first: NaiveDate) -> NaiveDate {
    let next = first.checked_add_months(Months::new(1)).unwrap_or(first);
    next.pred_opt().unwrap_or(first)
}

fn parse_day(text: &str) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()
}

fn time_of(seconds: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(seconds, 0).unwrap_or_default()
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or_default()
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn generate_id(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rngs::OsRng;
    let suffix: String =
        (0..16).map(|_| char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())])).collect();
    format!("{prefix}-{suffix}")
}

/// Traffic of one account on one day of a month.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DayTraffic {
    pub instance_id: String,
    pub username: String,
    /// Day of the month, from 1.
    pub day: u32,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// Billing terms of an instance's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataTerms {
    pub zone: Zone,
    pub trial: bool,
}

/// A package of an owner: the day of the month it counts from, and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackageGrant {
    pub day: u32,
    pub bytes: u64,
}

/// Data of an instance, split by what pays for it, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataSplit {
    /// Within the accounts' monthly plans.
    pub plan_bytes: u64,
    /// Beyond the plans, taken from the owner's packages.
    pub package_bytes: u64,
    /// Beyond the plans and packages, billed as pay-as-you-go.
    pub payg_bytes: u64,
    /// Beyond the plan of a free trial's account: neither taken from packages nor billed.
    pub trial_excess_bytes: u64,
}

impl DataSplit {
    fn add(&mut self, other: &Self) {
        self.plan_bytes += other.plan_bytes;
        self.package_bytes += other.package_bytes;
        self.payg_bytes += other.payg_bytes;
        self.trial_excess_bytes += other.trial_excess_bytes;
    }
}

/// An account's data in a month.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountData {
    pub instance_id: String,
    pub username: String,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// The larger of `rx_bytes` and `tx_bytes`.
    pub usage_bytes: u64,
    /// The part of the usage within the plan.
    pub plan_bytes: u64,
    /// The part beyond the plan.
    pub over_bytes: u64,
}

/// An owner's data in a month, split day by day.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnerSplit {
    /// The split of each instance on each day (instance ID, day of the month), for the days
    /// on which its usage grew.
    pub days: BTreeMap<(String, u32), DataSplit>,
    /// Every account with traffic, by instance and username.
    pub accounts: Vec<AccountData>,
    /// Bytes taken from the owner's packages.
    pub package_bytes_used: u64,
}

#[derive(Default)]
struct Cumulative {
    rx_bytes: u64,
    tx_bytes: u64,
    usage_bytes: u64,
}

/// Splits an owner's traffic of one month, from day 1 to `last_day`, between the plans, the
/// packages and pay-as-you-go.
///
/// Each day, every account's monthly usage so far (the larger of its inbound and outbound
/// bytes) grows by that day's traffic. The growth is in the plan until the usage reaches
/// [`PLAN_BYTES_PER_ACCOUNT`]. Beyond it, a paid instance outside Dubai takes what is left of
/// the packages that count by that day, and anything more is pay-as-you-go. Dubai has no
/// packages, so all of it is pay-as-you-go there, and a trial's is not billed. Packages serve
/// the accounts of a day in order of instance ID and username, because the service does not say
/// which of an owner's instances a shared package serves first. Instances missing from `terms`
/// are billed as international.
pub fn split_owner_month(
    traffic: &[DayTraffic],
    terms: &HashMap<String, DataTerms>,
    packages: &[PackageGrant],
    last_day: u32,
) -> OwnerSplit {
    let international = DataTerms { zone: Zone::International, trial: false };
    let mut accounts: BTreeMap<(String, String), Cumulative> = BTreeMap::new();
    let mut split = OwnerSplit::default();
    let mut package_capacity = 0u64;
    for day in 1..=last_day {
        package_capacity +=
            packages.iter().filter(|grant| grant.day == day).map(|grant| grant.bytes).sum::<u64>();
        for entry in traffic.iter().filter(|entry| entry.day == day) {
            let account =
                accounts.entry((entry.instance_id.clone(), entry.username.clone())).or_default();
            account.rx_bytes += entry.rx_bytes;
            account.tx_bytes += entry.tx_bytes;
        }
        for ((instance_id, _), account) in &mut accounts {
            let usage = account.rx_bytes.max(account.tx_bytes);
            let growth = usage - account.usage_bytes;
            if growth == 0 {
                continue;
            }
            let over_growth = usage.saturating_sub(PLAN_BYTES_PER_ACCOUNT)
                - account.usage_bytes.saturating_sub(PLAN_BYTES_PER_ACCOUNT);
            account.usage_bytes = usage;
            let instance_terms = terms.get(instance_id).copied().unwrap_or(international);
            let mut part = DataSplit { plan_bytes: growth - over_growth, ..DataSplit::default() };
            if instance_terms.trial {
                // NOTE: nothing stops a trial at its 5 GB. Traffic beyond it passes and is
                // only reported here; blocking the account in the kernel would enforce it.
                part.trial_excess_bytes = over_growth;
            } else if instance_terms.zone == Zone::Dubai {
                part.payg_bytes = over_growth;
            } else {
                let from_packages = over_growth.min(package_capacity - split.package_bytes_used);
                split.package_bytes_used += from_packages;
                part.package_bytes = from_packages;
                part.payg_bytes = over_growth - from_packages;
            }
            split.days.entry((instance_id.clone(), day)).or_default().add(&part);
        }
    }
    split.accounts = accounts
        .into_iter()
        .map(|((instance_id, username), account)| AccountData {
            instance_id,
            username,
            rx_bytes: account.rx_bytes,
            tx_bytes: account.tx_bytes,
            usage_bytes: account.usage_bytes,
            plan_bytes: account.usage_bytes.min(PLAN_BYTES_PER_ACCOUNT),
            over_bytes: account.usage_bytes.saturating_sub(PLAN_BYTES_PER_ACCOUNT),
        })
        .collect();
    split
}

/// Adds traffic to an account's row of `day` in `usage_days`, with the owner, area and trial
/// flag of its instance. Traffic of an instance that no longer exists is dropped, as in the
/// monthly `usage`.
///
/// # Errors
/// Fails if the store fails.
pub async fn add_daily_usage<'e, E>(
    executor: E,
    instance_id: &str,
    username: &str,
    day: NaiveDate,
    rx_bytes: u64,
    tx_bytes: u64,
) -> Result<(), sqlx::Error>
where
    E: sqlx::Executor<'e, Database = Any>,
{
    sqlx::query(
        "INSERT INTO usage_days (instance_id, username, day, owner, area, trial, rx_bytes, \
         tx_bytes) SELECT id, $2, $3, owner, area, trial, $4, $5 FROM instances WHERE id = $1 \
         ON CONFLICT (instance_id, username, day) DO UPDATE SET \
         rx_bytes = usage_days.rx_bytes + excluded.rx_bytes, \
         tx_bytes = usage_days.tx_bytes + excluded.tx_bytes",
    )
    .bind(instance_id)
    .bind(username)
    .bind(day_text(day))
    .bind(to_i64(rx_bytes))
    .bind(to_i64(tx_bytes))
    .execute(executor)
    .await?;
    Ok(())
}

/// Kind of a charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChargeKind {
    /// A new paid instance: its account fee for the months bought.
    Subscription,
    /// More months of an instance.
    Renewal,
    /// A higher account quota for the rest of the paid period.
    Upgrade,
    /// A subscription package.
    Package,
    /// Pay-as-you-go data of one instance and day.
    Payg,
}

impl ChargeKind {
    /// Returns the name stored and shown for the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Subscription => "subscription",
            Self::Renewal => "renewal",
            Self::Upgrade => "upgrade",
            Self::Package => "package",
            Self::Payg => "payg",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [Self::Subscription, Self::Renewal, Self::Upgrade, Self::Package, Self::Payg]
            .into_iter()
            .find(|kind| kind.as_str() == text)
    }
}

/// An amount billed to an owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    pub id: String,
    pub owner: String,
    /// The instance, for every kind but packages.
    pub instance_id: Option<String>,
    /// The instance's area.
    pub area: Option<String>,
    pub kind: ChargeKind,
    pub description: String,
    /// Months, GB or bytes, in the unit that `unit` names.
    pub quantity: u64,
    pub unit: String,
    pub amount_cents: i64,
    /// Month and day the charge is billed in, `YYYY-MM` and `YYYY-MM-DD`.
    pub month: String,
    pub day: String,
    pub charged_at: DateTime<Utc>,
}

impl Charge {
    /// Builds a charge of an order on `instance` placed at `now`.
    pub fn order(
        instance: &Instance,
        kind: ChargeKind,
        description: String,
        months: u32,
        amount_cents: i64,
        now: DateTime<Utc>,
    ) -> Self {
        Self {
            id: generate_id("chg"),
            owner: instance.owner.clone(),
            instance_id: Some(instance.id.clone()),
            area: Some(instance.area.clone()),
            kind,
            description,
            quantity: u64::from(months),
            unit: "months".to_owned(),
            amount_cents,
            month: admin::month_of(now),
            day: day_text(now.date_naive()),
            charged_at: time_of(now.timestamp()),
        }
    }
}

/// Inserts a charge inside `transaction`.
///
/// # Errors
/// Fails if the store fails, or for a second pay-as-you-go charge of an instance and day.
pub async fn insert_charge(
    transaction: &mut Transaction<'static, Any>,
    charge: &Charge,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO charges (id, owner, instance_id, area, kind, description, quantity, unit, \
         amount_cents, month, day, charged_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(&charge.id)
    .bind(&charge.owner)
    .bind(charge.instance_id.clone())
    .bind(charge.area.clone())
    .bind(charge.kind.as_str())
    .bind(&charge.description)
    .bind(to_i64(charge.quantity))
    .bind(&charge.unit)
    .bind(charge.amount_cents)
    .bind(&charge.month)
    .bind(&charge.day)
    .bind(charge.charged_at.timestamp())
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

/// Charges the subscription of a new paid instance inside the transaction that creates it:
/// the fee of its quota in its zone, for `months`.
///
/// # Errors
/// Fails if the store fails.
pub async fn charge_subscription(
    transaction: &mut Transaction<'static, Any>,
    instance: &Instance,
    months: u32,
    now: DateTime<Utc>,
) -> Result<Charge, sqlx::Error> {
    let zone = Zone::of_area(&instance.area);
    let amount = account_fee_cents(instance.account_quota, zone) * i64::from(months);
    let description =
        format!("{} accounts for {months} month(s) in {}", instance.account_quota, zone_name(zone));
    let charge =
        Charge::order(instance, ChargeKind::Subscription, description, months, amount, now);
    insert_charge(transaction, &charge).await?;
    Ok(charge)
}

fn charge_from_row(row: &sqlx::any::AnyRow) -> Result<Charge, AdminError> {
    let kind: String = row.try_get("kind")?;
    Ok(Charge {
        id: row.try_get("id")?,
        owner: row.try_get("owner")?,
        instance_id: row.try_get("instance_id")?,
        area: row.try_get("area")?,
        kind: ChargeKind::parse(&kind)
            .ok_or_else(|| AdminError::Internal(format!("unknown charge kind {kind:?}")))?,
        description: row.try_get("description")?,
        quantity: to_u64(row.try_get("quantity")?),
        unit: row.try_get("unit")?,
        amount_cents: row.try_get("amount_cents")?,
        month: row.try_get("month")?,
        day: row.try_get("day")?,
        charged_at: time_of(row.try_get("charged_at")?),
    })
}

const CHARGE_COLUMNS: &str = "id, owner, instance_id, area, kind, description, quantity, unit, \
     amount_cents, month, day, charged_at";

/// A subscription package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    pub id: String,
    pub owner: String,
    pub size_gb: u64,
    pub price_cents: i64,
    /// The calendar month it is valid in, `YYYY-MM`.
    pub month: String,
    /// The day it counts from, `YYYY-MM-DD`: data of that whole day may use it.
    pub day: String,
    pub bought_at: DateTime<Utc>,
}

/// Body of `POST /billing/packages`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuyPackageRequest {
    pub owner: String,
    pub size_gb: u64,
}

/// Payment state of a statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatementState {
    /// Not fully paid, and the due date has not passed.
    Open,
    /// Fully paid.
    Paid,
    /// Not fully paid after the due date: the owner's instances are locked.
    Overdue,
}

/// An owner's statement of a month.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statement {
    pub owner: String,
    pub month: String,
    pub amount_cents: i64,
    pub paid_cents: i64,
    pub balance_cents: i64,
    pub issued_at: DateTime<Utc>,
    /// The last day to pay, `YYYY-MM-DD`.
    pub due_date: String,
    /// When an unpaid balance falls overdue: the start of the day after the due date.
    pub overdue_at: DateTime<Utc>,
    pub state: StatementState,
}

/// Body of `POST /billing/payments`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaymentRequest {
    pub owner: String,
    /// The statement's month, `YYYY-MM`.
    pub month: String,
    pub amount_cents: i64,
    /// A note such as a bank transfer number.
    pub reference: Option<String>,
}

/// A recorded payment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    pub id: String,
    pub owner: String,
    pub month: String,
    pub amount_cents: i64,
    pub paid_at: DateTime<Utc>,
    pub reference: Option<String>,
}

/// A payment and the statement after it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaymentReceipt {
    pub payment: Payment,
    pub statement: Statement,
}

/// The address an owner's notices go to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    pub owner: String,
    pub email: String,
    pub updated_at: DateTime<Utc>,
}

/// Body of `PUT /billing/contacts`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContactRequest {
    pub owner: String,
    pub email: String,
}

/// Charges and statements of one settlement run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settlement {
    /// Days settled, `YYYY-MM-DD`.
    pub days: Vec<String>,
    /// Pay-as-you-go charges made.
    pub charges: Vec<Charge>,
    /// Statements issued.
    pub statements: Vec<Statement>,
}

/// An instance's data and pay-as-you-go charge in a month.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceMonth {
    pub instance_id: String,
    pub area: String,
    pub zone: String,
    pub trial: bool,
    /// Sum of its accounts' monthly usage.
    pub usage_bytes: u64,
    #[serde(flatten)]
    pub split: DataSplit,
    /// Its pay-as-you-go data, priced day by day.
    pub payg_cents: i64,
}

/// An owner's month.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerMonth {
    pub owner: String,
    pub instances: Vec<InstanceMonth>,
    pub accounts: Vec<AccountData>,
    pub packages: Vec<Package>,
    /// Bytes of the month's packages, and how many of them were used.
    pub package_bytes_bought: u64,
    pub package_bytes_used: u64,
    /// Subscriptions, renewals, upgrades and packages ordered in the month.
    pub orders: Vec<Charge>,
    /// Account fees: subscriptions, renewals and upgrades.
    pub fees_cents: i64,
    pub packages_cents: i64,
    pub payg_cents: i64,
    pub total_cents: i64,
    /// The month's statement, once issued.
    pub statement: Option<Statement>,
}

/// The billing report of a month.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonthReport {
    pub month: String,
    /// The last day whose data is settled, `YYYY-MM-DD`. Pay-as-you-go data of later days is
    /// priced the same way but not charged yet.
    pub settled_through: Option<String>,
    pub owners: Vec<OwnerMonth>,
}

/// One line of a report, as the CSV and table outputs list it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportLine {
    pub owner: String,
    /// Empty for lines of the owner, such as packages and the total.
    pub instance_id: String,
    pub zone: String,
    /// `subscription`, `renewal`, `upgrade`, `package`, `data_plan`, `data_package`,
    /// `data_payg`, `data_trial_free` or `total`.
    pub item: String,
    pub quantity: u64,
    pub unit: String,
    pub amount_cents: i64,
}

impl MonthReport {
    /// Returns the report as lines: each order, the data of each instance by what pays for it,
    /// and a total per owner.
    pub fn lines(&self) -> Vec<ReportLine> {
        let mut lines = Vec::new();
        for owner in &self.owners {
            let zone_of =
                |instance_id: &Option<String>, area: &Option<String>| match (instance_id, area) {
                    (Some(_), Some(area)) => zone_name(Zone::of_area(area)),
                    _ => String::new(),
                };
            for order in &owner.orders {
                lines.push(ReportLine {
                    owner: owner.owner.clone(),
                    instance_id: order.instance_id.clone().unwrap_or_default(),
                    zone: zone_of(&order.instance_id, &order.area),
                    item: order.kind.as_str().to_owned(),
                    quantity: order.quantity,
                    unit: order.unit.clone(),
                    amount_cents: order.amount_cents,
                });
            }
            for instance in &owner.instances {
                let mut data = vec![
                    ("data_plan", instance.split.plan_bytes, 0),
                    ("data_package", instance.split.package_bytes, 0),
                    ("data_payg", instance.split.payg_bytes, instance.payg_cents),
                ];
                if instance.trial {
                    data.push(("data_trial_free", instance.split.trial_excess_bytes, 0));
                }
                for (item, bytes, amount_cents) in data {
                    lines.push(ReportLine {
                        owner: owner.owner.clone(),
                        instance_id: instance.instance_id.clone(),
                        zone: instance.zone.clone(),
                        item: item.to_owned(),
                        quantity: bytes,
                        unit: "bytes".to_owned(),
                        amount_cents,
                    });
                }
            }
            lines.push(ReportLine {
                owner: owner.owner.clone(),
                instance_id: String::new(),
                zone: String::new(),
                item: "total".to_owned(),
                quantity: 0,
                unit: String::new(),
                amount_cents: owner.total_cents,
            });
        }
        lines
    }
}

/// A row of `usage_days` with its instance's terms.
struct UsageRow {
    owner: String,
    area: String,
    trial: bool,
    traffic: DayTraffic,
}

/// Billing over the store.
#[derive(Clone)]
pub struct Billing {
    store: Store,
    clock: Arc<dyn Clock>,
}

impl Billing {
    /// Creates billing over `store`, reading time from `clock`.
    pub fn new(store: Store, clock: Arc<dyn Clock>) -> Self {
        Self { store, clock }
    }

    /// Buys a package for `owner`, valid in the current calendar month from today on, and
    /// charges it.
    ///
    /// # Errors
    /// Fails with [`AdminError::Invalid`] for a size not on sale or a bad owner name, and with
    /// [`AdminError::Refused`] if the owner has no paid instance outside Dubai: packages are
    /// not sold in Dubai and trials do not use them.
    pub async fn buy_package(&self, owner: &str, size_gb: u64) -> Result<Package, AdminError> {
        admin::owner(owner)?;
        let price_cents = package_price_cents(size_gb).ok_or_else(|| {
            let sizes: Vec<String> =
                PACKAGE_PRICES.iter().map(|(size, _)| size.to_string()).collect();
            ValidationError {
                field: "size_gb",
                rule: format!("must be one of {} GB", sizes.join(", ")),
                value: size_gb.to_string(),
            }
        })?;
        let now = self.clock.now();

        let mut transaction = self.store.pool().begin().await?;
        let rows = sqlx::query("SELECT area, trial FROM instances WHERE owner = $1")
            .bind(owner)
            .fetch_all(&mut *transaction)
            .await?;
        if rows.is_empty() {
            return Err(AdminError::Refused(format!(
                "owner {owner:?} has no instance; packages serve the data of an owner's \
                 instances, so create one first"
            )));
        }
        let mut eligible = false;
        for row in &rows {
            let area: String = row.try_get("area")?;
            let trial = row.try_get::<i64, _>("trial")? != 0;
            eligible |= !trial && Zone::of_area(&area) != Zone::Dubai;
        }
        if !eligible {
            return Err(AdminError::Refused(format!(
                "owner {owner:?} has no paid instance outside Dubai; packages are not sold in \
                 Dubai (me-east-1) and free trials do not use them"
            )));
        }

        let package = Package {
            id: generate_id("pkg"),
            owner: owner.to_owned(),
            size_gb,
            price_cents,
            month: admin::month_of(now),
            day: day_text(now.date_naive()),
            bought_at: time_of(now.timestamp()),
        };
        sqlx::query(
            "INSERT INTO packages (id, owner, size_gb, price_cents, month, day, bought_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&package.id)
        .bind(owner)
        .bind(to_i64(size_gb))
        .bind(price_cents)
        .bind(&package.month)
        .bind(&package.day)
        .bind(package.bought_at.timestamp())
        .execute(&mut *transaction)
        .await?;

        let charge = Charge {
            id: generate_id("chg"),
            owner: owner.to_owned(),
            instance_id: None,
            area: None,
            kind: ChargeKind::Package,
            description: format!("{size_gb} GB package for {}", package.month),
            quantity: size_gb,
            unit: "GB".to_owned(),
            amount_cents: price_cents,
            month: package.month.clone(),
            day: package.day.clone(),
            charged_at: package.bought_at,
        };
        insert_charge(&mut transaction, &charge).await?;
        transaction.commit().await?;
        info!(owner, size_gb, month = %package.month, "package bought");
        Ok(package)
    }

    /// Returns the packages of `owner` (or of every owner) in `month` (or in every month),
    /// oldest first.
    ///
    /// # Errors
    /// Fails with [`AdminError::Invalid`] for a malformed month.
    pub async fn packages(
        &self,
        owner: Option<&str>,
        month: Option<&str>,
    ) -> Result<Vec<Package>, AdminError> {
        if let Some(month) = month {
            parse_month(month)?;
        }
        let rows = sqlx::query(
            "SELECT id, owner, size_gb, price_cents, month, day, bought_at FROM packages \
             WHERE ($1 IS NULL OR owner = $1) AND ($2 IS NULL OR month = $2) \
             ORDER BY bought_at, id",
        )
        .bind(owner.map(ToOwned::to_owned))
        .bind(month.map(ToOwned::to_owned))
        .fetch_all(self.store.pool())
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Package {
                    id: row.try_get("id")?,
                    owner: row.try_get("owner")?,
                    size_gb: to_u64(row.try_get("size_gb")?),
                    price_cents: row.try_get("price_cents")?,
                    month: row.try_get("month")?,
                    day: row.try_get("day")?,
                    bought_at: time_of(row.try_get("bought_at")?),
                })
            })
            .collect()
    }

    /// Sets the email address that `owner`'s notices go to.
    ///
    /// # Errors
    /// Fails with [`AdminError::Invalid`] for a bad owner name or address.
    pub async fn set_contact(&self, owner: &str, email: &str) -> Result<Contact, AdminError> {
        admin::owner(owner)?;
        validation::email(email)?;
        let now = time_of(self.clock.now().timestamp());
        sqlx::query(
            "INSERT INTO owner_contacts (owner, email, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (owner) DO UPDATE SET email = excluded.email, \
             updated_at = excluded.updated_at",
        )
        .bind(owner)
        .bind(email)
        .bind(now.timestamp())
        .execute(self.store.pool())
        .await?;
        info!(owner, "owner contact set");
        Ok(Contact { owner: owner.to_owned(), email: email.to_owned(), updated_at: now })
    }

    /// Returns the contact of `owner`.
    ///
    /// # Errors
    /// Fails with [`AdminError::NotFound`] if none is set.
    pub async fn contact(&self, owner: &str) -> Result<Contact, AdminError> {
        let row = sqlx::query("SELECT email, updated_at FROM owner_contacts WHERE owner = $1")
            .bind(owner)
            .fetch_optional(self.store.pool())
            .await?
            .ok_or_else(|| AdminError::NotFound { what: "contact of owner", id: owner.into() })?;
        Ok(Contact {
            owner: owner.to_owned(),
            email: row.try_get("email")?,
            updated_at: time_of(row.try_get("updated_at")?),
        })
    }

    /// Returns every owner's notice address, by owner.
    ///
    /// # Errors
    /// Fails if the store fails.
    pub async fn contacts(&self) -> Result<HashMap<String, String>, AdminError> {
        let rows = sqlx::query("SELECT owner, email FROM owner_contacts")
            .fetch_all(self.store.pool())
            .await?;
        rows.iter().map(|row| Ok((row.try_get("owner")?, row.try_get("email")?))).collect()
    }

    /// Returns the statements of `owner` (or of every owner), by month, with their state at
    /// `now`.
    ///
    /// # Errors
    /// Fails if the store fails.
    pub async fn statements(
        &self,
        owner: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Vec<Statement>, AdminError> {
        let rows = sqlx::query(
            "SELECT s.owner, s.month, s.amount_cents, s.issued_at, s.due_date, \
             COALESCE((SELECT SUM(p.amount_cents) FROM payments p \
             WHERE p.owner = s.owner AND p.month = s.month), 0) AS paid_cents \
             FROM statements s WHERE ($1 IS NULL OR s.owner = $1) ORDER BY s.month, s.owner",
        )
        .bind(owner.map(ToOwned::to_owned))
        .fetch_all(self.store.pool())
        .await?;
        rows.iter().map(|row| statement_from_row(row, now)).collect()
    }

    /// Returns the owners that have a statement overdue at `now`.
    ///
    /// # Errors
    /// Fails if the store fails.
    pub async fn overdue_owners(&self, now: DateTime<Utc>) -> Result<BTreeSet<String>, AdminError> {
        let statements = self.statements(None, now).await?;
        Ok(statements
            .into_iter()
            .filter(|statement| statement.state == StatementState::Overdue)
            .map(|statement| statement.owner)
            .collect())
    }

    /// Records a payment toward an issued statement.
    ///
    /// # Errors
    /// Fails with [`AdminError::Invalid`] for an amount that is not positive or a bad month or
    /// reference, with [`AdminError::NotFound`] if the statement is not issued, and with
    /// [`AdminError::Refused`] for more than its balance. Nothing is written then.
    pub async fn pay(&self, request: &PaymentRequest) -> Result<PaymentReceipt, AdminError> {
        admin::owner(&request.owner)?;
        parse_month(&request.month)?;
        if request.amount_cents <= 0 {
            return Err(ValidationError {
                field: "amount",
                rule: "must be a positive amount in US dollars".to_owned(),
                value: format_usd(request.amount_cents),
            }
            .into());
        }
        if let Some(reference) = &request.reference {
            let length = reference.chars().count();
            if length == 0
                || length > MAX_PAYMENT_REFERENCE_LEN
                || reference.chars().any(char::is_control)
            {
                return Err(ValidationError {
                    field: "reference",
                    rule: format!(
                        "must be 1 to {MAX_PAYMENT_REFERENCE_LEN} characters without control \
                         characters"
                    ),
                    value: format!("{reference:?}"),
                }
                .into());
            }
        }
        let now = self.clock.now();

        let mut transaction = self.store.pool().begin().await?;
        let row = sqlx::query(
            "SELECT s.owner, s.month, s.amount_cents, s.issued_at, s.due_date, \
             COALESCE((SELECT SUM(p.amount_cents) FROM payments p \
             WHERE p.owner = s.owner AND p.month = s.month), 0) AS paid_cents \
             FROM statements s WHERE s.owner = $1 AND s.month = $2",
        )
        .bind(&request.owner)
        .bind(&request.month)
        .fetch_optional(&mut *transaction)
        .await?
        .ok_or_else(|| AdminError::NotFound {
            what: "statement",
            id: format!(
                "of owner {:?} for {} (statements are issued once the month has ended)",
                request.owner, request.month
            ),
        })?;
        let statement = statement_from_row(&row, now)?;
        if request.amount_cents > statement.balance_cents {
            return Err(AdminError::Refused(format!(
                "payment of {} USD exceeds the balance of {} USD of the {} statement of {:?}; \
                 pay at most the balance",
                format_usd(request.amount_cents),
                format_usd(statement.balance_cents),
                request.month,
                request.owner
            )));
        }

        let payment = Payment {
            id: generate_id("pay"),
            owner: request.owner.clone(),
            month: request.month.clone(),
            amount_cents: request.amount_cents,
            paid_at: time_of(now.timestamp()),
            reference: request.reference.clone(),
        };
        sqlx::query(
            "INSERT INTO payments (id, owner, month, amount_cents, paid_at, reference) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&payment.id)
        .bind(&payment.owner)
        .bind(&payment.month)
        .bind(payment.amount_cents)
        .bind(payment.paid_at.timestamp())
        .bind(payment.reference.clone())
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;

        info!(
            owner = %payment.owner,
            month = %payment.month,
            amount = %format_usd(payment.amount_cents),
            "payment recorded"
        );
        let paid_cents = statement.paid_cents + payment.amount_cents;
        let statement = Statement {
            paid_cents,
            balance_cents: statement.amount_cents - paid_cents,
            state: statement_state(statement.amount_cents - paid_cents, statement.overdue_at, now),
            ..statement
        };
        Ok(PaymentReceipt { payment, statement })
    }

    /// Returns the last settled day.
    ///
    /// # Errors
    /// Fails if the store fails.
    pub async fn settled_through(&self) -> Result<Option<NaiveDate>, AdminError> {
        let last: Option<String> = sqlx::query("SELECT MAX(day) AS day FROM settled_days")
            .fetch_one(self.store.pool())
            .await?
            .try_get("day")?;
        Ok(last.as_deref().and_then(parse_day))
    }

    /// Settles every day that ended at least [`SETTLEMENT_DELAY_MINUTES`] before `now` and is
    /// not settled yet, each in its own transaction, then issues the statement of each owner
    /// and month whose last day is settled. Running it again changes nothing.
    ///
    /// # Errors
    /// Fails if the store fails; the days settled before the failure stay settled.
    pub async fn settle(&self, now: DateTime<Utc>) -> Result<Settlement, AdminError> {
        let mut settlement = Settlement::default();
        let Some(last_complete) =
            (now - Duration::minutes(SETTLEMENT_DELAY_MINUTES)).date_naive().pred_opt()
        else {
            return Ok(settlement);
        };
        let first = match self.settled_through().await? {
            Some(day) => day.succ_opt(),
            None => self.first_billable_day().await?,
        };
        let mut day = first;
        while let Some(current) = day.filter(|day| *day <= last_complete) {
            if let Some(charges) = self.settle_day(current, now).await? {
                settlement.days.push(day_text(current));
                settlement.charges.extend(charges);
            }
            day = current.succ_opt();
        }
        settlement.statements = self.issue_statements(now).await?;
        Ok(settlement)
    }

    /// Returns the first day with data or a charge, where settlement starts on a new store.
    async fn first_billable_day(&self) -> Result<Option<NaiveDate>, AdminError> {
        let row = sqlx::query(
            "SELECT (SELECT MIN(day) FROM usage_days) AS usage_day, \
             (SELECT MIN(day) FROM charges) AS charge_day",
        )
        .fetch_one(self.store.pool())
        .await?;
        let days: [Option<String>; 2] = [row.try_get("usage_day")?, row.try_get("charge_day")?];
        Ok(days.iter().flatten().filter_map(|day| parse_day(day)).min())
    }

    /// Charges the pay-as-you-go data of `day` in one transaction, and returns the charges, or
    /// `None` if the day was already settled.
    async fn settle_day(
        &self,
        day: NaiveDate,
        now: DateTime<Utc>,
    ) -> Result<Option<Vec<Charge>>, AdminError> {
        let mut transaction = self.store.pool().begin().await?;
        let settled = sqlx::query("SELECT day FROM settled_days WHERE day = $1")
            .bind(day_text(day))
            .fetch_optional(&mut *transaction)
            .await?;
        if settled.is_some() {
            return Ok(None);
        }

        let first = day.with_day(1).unwrap_or(day);
        let usage = usage_rows(&mut transaction, first, day, None).await?;
        let month = admin::month_of(start_of_day(day));
        let packages = package_grants(&mut transaction, &month, day, None).await?;

        let mut charges = Vec::new();
        for (owner, rows) in group_by_owner(usage) {
            let (traffic, terms, areas) = owner_inputs(&rows);
            let grants = packages.get(&owner).map(Vec::as_slice).unwrap_or_default();
            let split = split_owner_month(&traffic, &terms, grants, day.day());
            for ((instance_id, split_day), part) in &split.days {
                if *split_day != day.day() || part.payg_bytes == 0 {
                    continue;
                }
                let area = areas.get(instance_id).cloned().unwrap_or_default();
                let zone = Zone::of_area(&area);
                let charge = Charge {
                    id: generate_id("chg"),
                    owner: owner.clone(),
                    instance_id: Some(instance_id.clone()),
                    area: Some(area),
                    kind: ChargeKind::Payg,
                    description: format!(
                        "pay-as-you-go data on {} at {} USD/GB",
                        day_text(day),
                        format_usd(prices(zone).payg_cents_per_gb)
                    ),
                    quantity: part.payg_bytes,
                    unit: "bytes".to_owned(),
                    amount_cents: payg_cents(part.payg_bytes, zone),
                    month: month.clone(),
                    day: day_text(day),
                    charged_at: time_of(now.timestamp()),
                };
                insert_charge(&mut transaction, &charge).await?;
                charges.push(charge);
            }
        }

        sqlx::query("INSERT INTO settled_days (day, settled_at) VALUES ($1, $2)")
            .bind(day_text(day))
            .bind(now.timestamp())
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        info!(day = %day_text(day), charges = charges.len(), "data settled");
        Ok(Some(charges))
    }

    /// Issues a statement for each owner and month with charges whose last day is settled and
    /// that has none yet. It is due [`PAYMENT_TERM_DAYS`] days after `now`'s day.
    async fn issue_statements(&self, now: DateTime<Utc>) -> Result<Vec<Statement>, AdminError> {
        let Some(settled_through) = self.settled_through().await? else {
            return Ok(Vec::new());
        };
        let mut transaction = self.store.pool().begin().await?;
        let rows = sqlx::query(
            "SELECT c.owner, c.month, SUM(c.amount_cents) AS amount_cents FROM charges c \
             WHERE NOT EXISTS (SELECT 1 FROM statements s \
             WHERE s.owner = c.owner AND s.month = c.month) \
             GROUP BY c.owner, c.month ORDER BY c.month, c.owner",
        )
        .fetch_all(&mut *transaction)
        .await?;
        let due_date = now.date_naive().checked_add_days(Days::new(PAYMENT_TERM_DAYS));
        let due_date = due_date.unwrap_or(now.date_naive());
        let mut issued = Vec::new();
        for row in rows {
            let owner: String = row.try_get("owner")?;
            let month: String = row.try_get("month")?;
            let amount_cents: i64 = row.try_get("amount_cents")?;
            let Ok(first) = parse_month(&month) else { continue };
            if last_day_of_month(first) > settled_through {
                continue;
            }
            sqlx::query(
                "INSERT INTO statements (owner, month, amount_cents, issued_at, due_date) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&owner)
            .bind(&month)
            .bind(amount_cents)
            .bind(now.timestamp())
            .bind(day_text(due_date))
            .execute(&mut *transaction)
            .await?;
            let overdue_at = overdue_at(due_date);
            info!(
                owner = %owner,
                month = %month,
                amount = %format_usd(amount_cents),
                due_date = %day_text(due_date),
                "statement issued"
            );
            issued.push(Statement {
                owner,
                month,
                amount_cents,
                paid_cents: 0,
                balance_cents: amount_cents,
                issued_at: time_of(now.timestamp()),
                due_date: day_text(due_date),
                overdue_at,
                state: statement_state(amount_cents, overdue_at, now),
            });
        }
        transaction.commit().await?;
        Ok(issued)
    }

    /// Builds the report of `month` for `owner` (or for every owner) from the recorded data,
    /// the packages, the orders and the statement. Data of days not yet settled is priced the
    /// same way as settled data.
    ///
    /// # Errors
    /// Fails with [`AdminError::Invalid`] for a malformed month.
    pub async fn report(
        &self,
        month: &str,
        owner: Option<&str>,
    ) -> Result<MonthReport, AdminError> {
        let first = parse_month(month)?;
        let last = last_day_of_month(first);
        let now = self.clock.now();
        let settled_through = self.settled_through().await?;
        let mut transaction = self.store.pool().begin().await?;
        let usage = usage_rows(&mut transaction, first, last, owner).await?;
        let grants = package_grants(&mut transaction, month, last, owner).await?;
        let order_rows = sqlx::query(&format!(
            "SELECT {CHARGE_COLUMNS} FROM charges WHERE month = $1 AND kind <> 'payg' \
             AND ($2 IS NULL OR owner = $2) \
             ORDER BY CASE WHEN instance_id IS NULL THEN 1 ELSE 0 END, instance_id, charged_at, id"
        ))
        .bind(month)
        .bind(owner.map(ToOwned::to_owned))
        .fetch_all(&mut *transaction)
        .await?;
        transaction.commit().await?;
        let orders = order_rows.iter().map(charge_from_row).collect::<Result<Vec<_>, _>>()?;
        let packages = self.packages(owner, Some(month)).await?;
        let statements = self.statements(owner, now).await?;

        let mut by_owner = group_by_owner(usage);
        for name in orders.iter().map(|order| &order.owner) {
            by_owner.entry(name.clone()).or_default();
        }
        let mut owners = Vec::new();
        for (name, rows) in by_owner {
            let (traffic, terms, areas) = owner_inputs(&rows);
            let owner_grants = grants.get(&name).map(Vec::as_slice).unwrap_or_default();
            let split = split_owner_month(&traffic, &terms, owner_grants, last.day());
            let instances = instance_months(&split, &terms, &areas);
            let owner_orders: Vec<Charge> =
                orders.iter().filter(|order| order.owner == name).cloned().collect();
            let sum = |kinds: &[ChargeKind]| -> i64 {
                owner_orders
                    .iter()
                    .filter(|order| kinds.contains(&order.kind))
                    .map(|order| order.amount_cents)
                    .sum()
            };
            let fees_cents =
                sum(&[ChargeKind::Subscription, ChargeKind::Renewal, ChargeKind::Upgrade]);
            let packages_cents = sum(&[ChargeKind::Package]);
            let payg_cents: i64 = instances.iter().map(|instance| instance.payg_cents).sum();
            let owner_packages: Vec<Package> =
                packages.iter().filter(|package| package.owner == name).cloned().collect();
            owners.push(OwnerMonth {
                package_bytes_bought: owner_packages
                    .iter()
                    .map(|package| package.size_gb * BYTES_PER_GB)
                    .sum(),
                package_bytes_used: split.package_bytes_used,
                statement: statements
                    .iter()
                    .find(|statement| statement.owner == name && statement.month == month)
                    .cloned(),
                owner: name,
                instances,
                accounts: split.accounts,
                packages: owner_packages,
                orders: owner_orders,
                fees_cents,
                packages_cents,
                payg_cents,
                total_cents: fees_cents + packages_cents + payg_cents,
            });
        }
        Ok(MonthReport {
            month: month.to_owned(),
            settled_through: settled_through.map(day_text),
            owners,
        })
    }
}

/// Returns the instant an unpaid statement due on `due_date` falls overdue: the start of the
/// next day.
pub fn overdue_at(due_date: NaiveDate) -> DateTime<Utc> {
    start_of_day(due_date.succ_opt().unwrap_or(due_date))
}

fn statement_state(
    balance_cents: i64,
    overdue_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> StatementState {
    if balance_cents <= 0 {
        StatementState::Paid
    } else if now >= overdue_at {
        StatementState::Overdue
    } else {
        StatementState::Open
    }
}

fn statement_from_row(
    row: &sqlx::any::AnyRow,
    now: DateTime<Utc>,
) -> Result<Statement, AdminError> {
    let amount_cents: i64 = row.try_get("amount_cents")?;
    let paid_cents: i64 = row.try_get("paid_cents")?;
    let due_date: String = row.try_get("due_date")?;
    let parsed = parse_day(&due_date)
        .ok_or_else(|| AdminError::Internal(format!("malformed due date {due_date:?}")))?;
    let overdue_at = overdue_at(parsed);
    Ok(Statement {
        owner: row.try_get("owner")?,
        month: row.try_get("month")?,
        amount_cents,
        paid_cents,
        balance_cents: amount_cents - paid_cents,
        issued_at: time_of(row.try_get("issued_at")?),
        due_date,
        overdue_at,
        state: statement_state(amount_cents - paid_cents, overdue_at, now),
    })
}

/// Reads the traffic of accounts from `first` to `last` (of one month), for `owner` or every
/// owner. Traffic that belongs to no account is not billed.
async fn usage_rows(
    transaction: &mut Transaction<'static, Any>,
    first: NaiveDate,
    last: NaiveDate,
    owner: Option<&str>,
) -> Result<Vec<UsageRow>, AdminError> {
    let rows = sqlx::query(
        "SELECT instance_id, username, day, owner, area, trial, rx_bytes, tx_bytes \
         FROM usage_days WHERE day >= $1 AND day <= $2 AND username <> '' \
         AND ($3 IS NULL OR owner = $3) ORDER BY instance_id, username, day",
    )
    .bind(day_text(first))
    .bind(day_text(last))
    .bind(owner.map(ToOwned::to_owned))
    .fetch_all(&mut **transaction)
    .await?;
    let mut usage = Vec::new();
    for row in rows {
        let day: String = row.try_get("day")?;
        let Some(day) = parse_day(&day) else { continue };
        usage.push(UsageRow {
            owner: row.try_get("owner")?,
            area: row.try_get("area")?,
            trial: row.try_get::<i64, _>("trial")? != 0,
            traffic: DayTraffic {
                instance_id: row.try_get("instance_id")?,
                username: row.try_get("username")?,
                day: day.day(),
                rx_bytes: to_u64(row.try_get("rx_bytes")?),
                tx_bytes: to_u64(row.try_get("tx_bytes")?),
            },
        });
    }
    Ok(usage)
}

/// Reads the packages of `month` that count by `last`, by owner.
async fn package_grants(
    transaction: &mut Transaction<'static, Any>,
    month: &str,
    last: NaiveDate,
    owner: Option<&str>,
) -> Result<HashMap<String, Vec<PackageGrant>>, AdminError> {
    let rows = sqlx::query(
        "SELECT owner, day, size_gb FROM packages WHERE month = $1 AND day <= $2 \
         AND ($3 IS NULL OR owner = $3)",
    )
    .bind(month)
    .bind(day_text(last))
    .bind(owner.map(ToOwned::to_owned))
    .fetch_all(&mut **transaction)
    .await?;
    let mut grants: HashMap<String, Vec<PackageGrant>> = HashMap::new();
    for row in rows {
        let day: String = row.try_get("day")?;
        let Some(day) = parse_day(&day) else { continue };
        let bytes = to_u64(row.try_get("size_gb")?) * BYTES_PER_GB;
        grants
            .entry(row.try_get("owner")?)
            .or_default()
            .push(PackageGrant { day: day.day(), bytes });
    }
    Ok(grants)
}

fn group_by_owner(usage: Vec<UsageRow>) -> BTreeMap<String, Vec<UsageRow>> {
    let mut by_owner: BTreeMap<String, Vec<UsageRow>> = BTreeMap::new();
    for row in usage {
        by_owner.entry(row.owner.clone()).or_default().push(row);
    }
    by_owner
}

type OwnerInputs = (Vec<DayTraffic>, HashMap<String, DataTerms>, HashMap<String, String>);

/// Returns an owner's traffic, and the terms and area of each of its instances.
fn owner_inputs(rows: &[UsageRow]) -> OwnerInputs {
    let traffic = rows.iter().map(|row| row.traffic.clone()).collect();
    let mut terms = HashMap::new();
    let mut areas = HashMap::new();
    for row in rows {
        let instance_id = row.traffic.instance_id.clone();
        terms.insert(
            instance_id.clone(),
            DataTerms { zone: Zone::of_area(&row.area), trial: row.trial },
        );
        areas.insert(instance_id, row.area.clone());
    }
    (traffic, terms, areas)
}

/// Sums an owner's split per instance, pricing each day's pay-as-you-go data on its own.
fn instance_months(
    split: &OwnerSplit,
    terms: &HashMap<String, DataTerms>,
    areas: &HashMap<String, String>,
) -> Vec<InstanceMonth> {
    let mut instances: BTreeMap<String, InstanceMonth> = BTreeMap::new();
    for ((instance_id, _), part) in &split.days {
        let instance_terms = terms
            .get(instance_id)
            .copied()
            .unwrap_or(DataTerms { zone: Zone::International, trial: false });
        let entry = instances.entry(instance_id.clone()).or_insert_with(|| InstanceMonth {
            instance_id: instance_id.clone(),
            area: areas.get(instance_id).cloned().unwrap_or_default(),
            zone: zone_name(instance_terms.zone),
            trial: instance_terms.trial,
            usage_bytes: 0,
            split: DataSplit::default(),
            payg_cents: 0,
        });
        entry.split.add(part);
        entry.payg_cents += payg_cents(part.payg_bytes, instance_terms.zone);
    }
    for account in &split.accounts {
        if let Some(entry) = instances.get_mut(&account.instance_id) {
            entry.usage_bytes += account.usage_bytes;
        }
    }
    instances.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usd_parses_whole_and_decimal_amounts() {
        assert_eq!(parse_usd("amount", "12"), Ok(1_200));
        assert_eq!(parse_usd("amount", "12.5"), Ok(1_250));
        assert_eq!(parse_usd("amount", "0.01"), Ok(1));
        assert_eq!(parse_usd("amount", "999999999999.99"), Ok(99_999_999_999_999));
    }

    #[test]
    fn usd_rejects_malformed_amounts() {
        for text in ["", "0", "0.00", "1.234", "-1", "1.", ".5", "1,000", "1e3", "1000000000000"] {
            let error = parse_usd("amount", text).unwrap_err();
            assert_eq!(error.field, "amount", "{text:?}");
        }
    }

    #[test]
    fn usd_formats_with_two_decimals() {
        assert_eq!(format_usd(0), "0.00");
        assert_eq!(format_usd(5), "0.05");
        assert_eq!(format_usd(123_456), "1234.56");
        assert_eq!(format_usd(-250), "-2.50");
    }

    #[test]
    fn payg_rounds_half_a_cent_up() {
        // 3.10 USD per GB: 1 cent is 3,225,806.45 bytes.
        assert_eq!(payg_cents(0, Zone::International), 0);
        assert_eq!(payg_cents(1_612_903, Zone::International), 0, "0.49999993 cents");
        assert_eq!(payg_cents(1_612_904, Zone::International), 1, "0.50000024 cents");
        assert_eq!(payg_cents(BYTES_PER_GB, Zone::MainlandChina), 310);
        assert_eq!(payg_cents(BYTES_PER_GB, Zone::Dubai), 1_083);
    }

    #[test]
    fn months_parse_only_as_yyyy_mm() {
        assert_eq!(parse_month("2026-03"), Ok(NaiveDate::from_ymd_opt(2026, 3, 1).unwrap()));
        for text in ["2026-3", "2026-13", "2026-03-01", "March", ""] {
            assert_eq!(parse_month(text).unwrap_err().field, "month", "{text:?}");
        }
        let february = NaiveDate::from_ymd_opt(2028, 2, 1).unwrap();
        assert_eq!(last_day_of_month(february), NaiveDate::from_ymd_opt(2028, 2, 29).unwrap());
    }

    #[test]
    fn packages_are_the_listed_sizes() {
        assert_eq!(package_price_cents(10), Some(2_600));
        assert_eq!(package_price_cents(51_200), Some(9_231_000));
        assert_eq!(package_price_cents(11), None);
    }
}
