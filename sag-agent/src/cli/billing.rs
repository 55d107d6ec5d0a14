//! `sag-agent billing`: reports, packages, payments, statements and owner contacts; and the
//! subscription commands of `sag-agent instance`: renew, upgrade, modify, auto-renew,
//! set-expiry and lifecycle-run.

use anyhow::Result;
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use hyper::Method;

use super::{
    admin::{call, instance_path, print_json, show_instances, NO_BODY},
    table, ClientOptions,
};
use crate::{
    api::{OwnerQuery, ReportQuery},
    billing::{
        format_usd, parse_month, parse_usd, BuyPackageRequest, Contact, ContactRequest,
        MonthReport, Package, PaymentReceipt, PaymentRequest, Statement, BYTES_PER_GB,
    },
    lifecycle::{
        AutoRenewRequest, ExpiryRequest, OrderReply, RenewRequest, TickReport, UpgradeRequest,
    },
};

#[derive(Debug, Args)]
pub struct BillingCommand {
    #[command(flatten)]
    options: ClientOptions,
    #[command(subcommand)]
    action: BillingAction,
}

#[derive(Debug, Subcommand)]
enum BillingAction {
    /// Print the bill of a month: orders, each instance's data split between plan, packages
    /// and pay-as-you-go, and each owner's total.
    Report {
        /// The month, YYYY-MM.
        #[arg(long)]
        month: String,
        /// Only this owner.
        #[arg(long)]
        owner: Option<String>,
        /// Print one CSV line per item instead of a table.
        #[arg(long, conflicts_with = "json")]
        csv: bool,
    },
    /// Buy and list subscription packages.
    #[command(subcommand)]
    Package(PackageAction),
    /// Record a payment toward an owner's statement of a month.
    Pay {
        #[arg(long)]
        owner: String,
        /// The statement's month, YYYY-MM.
        #[arg(long)]
        month: String,
        /// Amount paid, in US dollars with at most 2 decimals.
        #[arg(long, value_name = "USD")]
        amount: String,
        /// A note such as a bank transfer number.
        #[arg(long)]
        reference: Option<String>,
    },
    /// List statements with their due date, balance and state.
    Statements {
        /// Only this owner.
        #[arg(long)]
        owner: Option<String>,
    },
    /// Show the email address that an owner's notices go to, or set it with --email.
    Contact {
        #[arg(long)]
        owner: String,
        #[arg(long)]
        email: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum PackageAction {
    /// Buy a package, valid in the current calendar month and shared by all the owner's
    /// instances outside Dubai.
    Buy {
        /// Size in GB: 10, 50, 128, 512, 1024, 5120, 10240 or 51200.
        #[arg(value_name = "GB")]
        size: u64,
        #[arg(long)]
        owner: String,
    },
    /// List packages.
    List {
        #[arg(long)]
        owner: Option<String>,
        /// Only packages of this month, YYYY-MM.
        #[arg(long)]
        month: Option<String>,
    },
}

/// Arguments of `instance renew`.
#[derive(Debug, Args)]
pub struct RenewArgs {
    id: String,
    /// Months to add to the expiry time.
    #[arg(long)]
    months: u32,
}

/// Arguments of `instance upgrade`.
#[derive(Debug, Args)]
pub struct UpgradeArgs {
    id: String,
    /// The new account quota: above the current one, a multiple of 5, at most 1,000.
    #[arg(long)]
    quota: u32,
}

/// Arguments of `instance modify`.
#[derive(Debug, Args)]
pub struct ModifyArgs {
    id: String,
    /// Months to add to the expiry time.
    #[arg(long)]
    months: u32,
    /// The account quota of the renewed period: a multiple of 5, not below the accounts in
    /// use. It takes effect when that period starts.
    #[arg(long)]
    quota: u32,
}

/// Arguments of `instance auto-renew`.
#[derive(Debug, Args)]
pub struct AutoRenewArgs {
    id: String,
    /// `on` or `off`.
    #[arg(value_parser = ["on", "off"])]
    setting: String,
}

/// Arguments of `instance set-expiry`.
#[derive(Debug, Args)]
pub struct SetExpiryArgs {
    id: String,
    /// The new expiry time, RFC 3339, such as 2026-05-01T00:00:00Z.
    #[arg(long, value_name = "TIME")]
    expires_at: DateTime<Utc>,
}

/// Encodes a query string value: every byte but letters, digits and `-._~` as `%XX`.
fn query_value(text: &str) -> String {
    text.bytes()
        .map(|byte| {
            if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
                char::from(byte).to_string()
            } else {
                format!("%{byte:02X}")
            }
        })
        .collect()
}

fn query_string(pairs: &[(&str, Option<&str>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(key, value)| value.map(|value| format!("{key}={}", query_value(value))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

/// Writes a byte count in GB with 3 decimals.
fn gigabytes(bytes: u64) -> String {
    format!("{}.{:03}", bytes / BYTES_PER_GB, bytes % BYTES_PER_GB / 1_000_000)
}

/// Quotes a CSV field when it needs it (RFC 4180).
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

/// Runs a billing command.
pub fn run(command: BillingCommand) -> Result<()> {
    let options = &command.options;
    match command.action {
        BillingAction::Report { month, owner, csv } => {
            parse_month(&month)?;
            let query = ReportQuery { month, owner };
            let path = format!(
                "/billing/report{}",
                query_string(&[
                    ("month", Some(query.month.as_str())),
                    ("owner", query.owner.as_deref())
                ])
            );
            let report: MonthReport = call(options, Method::GET, &path, NO_BODY)?;
            if options.json {
                return print_json(&report);
            }
            if csv {
                print_csv(&report);
            } else {
                print_report(&report);
            }
            Ok(())
        }
        BillingAction::Package(PackageAction::Buy { size, owner }) => {
            let body = BuyPackageRequest { owner, size_gb: size };
            let package: Package = call(options, Method::POST, "/billing/packages", Some(&body))?;
            show_packages(options, &[package])
        }
        BillingAction::Package(PackageAction::List { owner, month }) => {
            if let Some(month) = &month {
                parse_month(month)?;
            }
            let query = OwnerQuery { owner, month };
            let path = format!(
                "/billing/packages{}",
                query_string(&[
                    ("owner", query.owner.as_deref()),
                    ("month", query.month.as_deref())
                ])
            );
            let packages: Vec<Package> = call(options, Method::GET, &path, NO_BODY)?;
            show_packages(options, &packages)
        }
        BillingAction::Pay { owner, month, amount, reference } => {
            parse_month(&month)?;
            let body = PaymentRequest {
                owner,
                month,
                amount_cents: parse_usd("amount", &amount)?,
                reference,
            };
            let receipt: PaymentReceipt =
                call(options, Method::POST, "/billing/payments", Some(&body))?;
            if options.json {
                return print_json(&receipt);
            }
            println!(
                "recorded payment {} of {} USD",
                receipt.payment.id,
                format_usd(receipt.payment.amount_cents)
            );
            print_statements(&[receipt.statement]);
            Ok(())
        }
        BillingAction::Statements { owner } => {
            let path =
                format!("/billing/statements{}", query_string(&[("owner", owner.as_deref())]));
            let statements: Vec<Statement> = call(options, Method::GET, &path, NO_BODY)?;
            if options.json {
                return print_json(&statements);
            }
            print_statements(&statements);
            Ok(())
        }
        BillingAction::Contact { owner, email } => {
            let contact: Contact = match email {
                Some(email) => {
                    let body = ContactRequest { owner, email };
                    call(options, Method::PUT, "/billing/contacts", Some(&body))?
                }
                None => {
                    let path =
                        format!("/billing/contacts{}", query_string(&[("owner", Some(&owner))]));
                    call(options, Method::GET, &path, NO_BODY)?
                }
            };
            if options.json {
                return print_json(&contact);
            }
            table::print_fields(&[
                ("owner", contact.owner),
                ("email", contact.email),
                ("updated", contact.updated_at.to_rfc3339()),
            ]);
            Ok(())
        }
    }
}

fn show_packages(options: &ClientOptions, packages: &[Package]) -> Result<()> {
    if options.json {
        return print_json(&packages);
    }
    let rows: Vec<Vec<String>> = packages
        .iter()
        .map(|package| {
            vec![
                package.id.clone(),
                package.owner.clone(),
                package.size_gb.to_string(),
                format_usd(package.price_cents),
                package.month.clone(),
                package.day.clone(),
            ]
        })
        .collect();
    table::print(&["ID", "OWNER", "GB", "PRICE USD", "MONTH", "FROM"], &rows);
    Ok(())
}

fn print_statements(statements: &[Statement]) {
    let rows: Vec<Vec<String>> = statements
        .iter()
        .map(|statement| {
            vec![
                statement.owner.clone(),
                statement.month.clone(),
                format_usd(statement.amount_cents),
                format_usd(statement.paid_cents),
                format_usd(statement.balance_cents),
                statement.due_date.clone(),
                format!("{:?}", statement.state).to_lowercase(),
            ]
        })
        .collect();
    table::print(&["OWNER", "MONTH", "AMOUNT USD", "PAID", "BALANCE", "DUE", "STATE"], &rows);
}

fn print_report(report: &MonthReport) {
    println!(
        "billing report {}; data settled through {}",
        report.month,
        report.settled_through.as_deref().unwrap_or("no day yet")
    );
    let rows: Vec<Vec<String>> = report
        .lines()
        .iter()
        .map(|line| {
            let quantity = match line.unit.as_str() {
                "bytes" => format!("{} GB", gigabytes(line.quantity)),
                "" => String::new(),
                unit => format!("{} {unit}", line.quantity),
            };
            vec![
                line.owner.clone(),
                line.instance_id.clone(),
                line.zone.clone(),
                line.item.clone(),
                quantity,
                format_usd(line.amount_cents),
            ]
        })
        .collect();
    table::print(&["OWNER", "INSTANCE", "ZONE", "ITEM", "QUANTITY", "AMOUNT USD"], &rows);
    for owner in &report.owners {
        if let Some(statement) = &owner.statement {
            println!(
                "statement of {}: {} USD, paid {}, due {} ({})",
                owner.owner,
                format_usd(statement.amount_cents),
                format_usd(statement.paid_cents),
                statement.due_date,
                format!("{:?}", statement.state).to_lowercase()
            );
        }
    }
}

fn print_csv(report: &MonthReport) {
    println!("month,owner,instance,zone,item,quantity,unit,amount_usd");
    for line in report.lines() {
        let fields = [
            report.month.clone(),
            line.owner,
            line.instance_id,
            line.zone,
            line.item,
            line.quantity.to_string(),
            line.unit,
            format_usd(line.amount_cents),
        ];
        let fields: Vec<String> = fields.iter().map(|field| csv_field(field)).collect();
        println!("{}", fields.join(","));
    }
}

fn show_order(options: &ClientOptions, order: &OrderReply) -> Result<()> {
    if options.json {
        return print_json(order);
    }
    show_instances(options, std::slice::from_ref(&order.instance))?;
    if let Some(charge) = &order.charge {
        println!("charged {} USD: {}", format_usd(charge.amount_cents), charge.description);
    }
    if let Some(change) = &order.quota_change {
        println!(
            "quota {} from {}, when the renewed period starts",
            change.account_quota,
            change.effective_at.to_rfc3339()
        );
    }
    Ok(())
}

/// Runs `instance renew`.
pub fn renew(options: &ClientOptions, args: RenewArgs) -> Result<()> {
    let body = RenewRequest { months: args.months, quota: None };
    let path = format!("{}/renew", instance_path(&args.id)?);
    let order: OrderReply = call(options, Method::POST, &path, Some(&body))?;
    show_order(options, &order)
}

/// Runs `instance modify`: a renewal with the quota of the renewed period.
pub fn modify(options: &ClientOptions, args: ModifyArgs) -> Result<()> {
    let body = RenewRequest { months: args.months, quota: Some(args.quota) };
    let path = format!("{}/renew", instance_path(&args.id)?);
    let order: OrderReply = call(options, Method::POST, &path, Some(&body))?;
    show_order(options, &order)
}

/// Runs `instance upgrade`.
pub fn upgrade(options: &ClientOptions, args: UpgradeArgs) -> Result<()> {
    let body = UpgradeRequest { quota: args.quota };
    let path = format!("{}/upgrade", instance_path(&args.id)?);
    let order: OrderReply = call(options, Method::POST, &path, Some(&body))?;
    show_order(options, &order)
}

/// Runs `instance auto-renew`.
pub fn auto_renew(options: &ClientOptions, args: AutoRenewArgs) -> Result<()> {
    let body = AutoRenewRequest { enabled: args.setting == "on" };
    let path = format!("{}/auto-renew", instance_path(&args.id)?);
    let order: OrderReply = call(options, Method::PUT, &path, Some(&body))?;
    show_order(options, &order)
}

/// Runs `instance set-expiry`.
pub fn set_expiry(options: &ClientOptions, args: SetExpiryArgs) -> Result<()> {
    let body = ExpiryRequest { expires_at: args.expires_at };
    let path = format!("{}/expiry", instance_path(&args.id)?);
    let order: OrderReply = call(options, Method::PUT, &path, Some(&body))?;
    show_order(options, &order)
}

/// Runs `instance lifecycle-run` and prints what the run did.
pub fn lifecycle_run(options: &ClientOptions) -> Result<()> {
    let report: TickReport = call(options, Method::POST, "/lifecycle/run", NO_BODY)?;
    if options.json {
        return print_json(&report);
    }
    println!("lifecycle run at {}", report.at.to_rfc3339());
    for charge in &report.renewals {
        println!("auto-renewed: {} ({} USD)", charge.description, format_usd(charge.amount_cents));
    }
    for change in &report.quota_changes {
        println!("quota of {} is now {}", change.instance_id, change.account_quota);
    }
    if !report.settlement.days.is_empty() {
        println!("settled {} day(s) of data", report.settlement.days.len());
    }
    for statement in &report.settlement.statements {
        println!(
            "issued the {} statement of {}: {} USD, due {}",
            statement.month,
            statement.owner,
            format_usd(statement.amount_cents),
            statement.due_date
        );
    }
    for transition in &report.transitions {
        println!("{}: {} -> {}", transition.instance_id, transition.from, transition.to);
    }
    for notice in &report.notices {
        let outcome = if notice.sent { "sent".to_owned() } else { "not sent".to_owned() };
        println!(
            "notice {} of {} to {}: {outcome}",
            notice.kind,
            notice.subject,
            notice.to.as_deref().unwrap_or("(no contact)")
        );
    }
    for error in &report.errors {
        println!("error: {error}");
    }
    Ok(())
}
