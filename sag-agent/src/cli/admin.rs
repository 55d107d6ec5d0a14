//! `sag-agent instance|network|account`: the admin commands, sent to the running agent.

use std::{net::Ipv4Addr, path::PathBuf};

use anyhow::{bail, Context as _, Result};
use clap::{Args, Subcommand};
use hyper::Method;
use ipnet::Ipv4Net;
use serde::{de::DeserializeOwned, Serialize};

use super::{table, ClientOptions};
use crate::{
    admin::{Account, Instance, Network},
    api::{
        AccountCreatedReply, AccountDetail, CreateAccountBody, CreateInstanceBody, EmailReport,
        InstanceDetail, NetworkBody, PasswordBody, PasswordReply, RoamBody, TrialBody,
        UpdateAccountBody,
    },
    api_client::ApiClient,
    validation,
};

#[derive(Debug, Args)]
pub struct InstanceCommand {
    #[command(flatten)]
    options: ClientOptions,
    #[command(subcommand)]
    action: InstanceAction,
}

#[derive(Debug, Subcommand)]
enum InstanceAction {
    /// Create an instance.
    Create {
        /// Owner of the instance.
        #[arg(long)]
        owner: String,
        /// Area it serves, such as cn-hangzhou or eu-central-1; it sets the pricing zone.
        #[arg(long)]
        area: String,
        /// Client accounts it may have, 5 to 1,000.
        #[arg(long)]
        quota: u32,
        /// Subscription period, in months.
        #[arg(long, default_value_t = 1)]
        months: u32,
    },
    /// Claim the owner's free trial instance: 1 account, 2 Mbit/s, one year; once per owner.
    Trial {
        #[arg(long)]
        owner: String,
        #[arg(long)]
        area: String,
    },
    /// List the instances.
    List,
    /// Show one instance with its network configuration.
    Show { id: String },
    /// Delete an instance with its configuration and accounts.
    Delete { id: String },
    /// Extend the subscription by whole months, charged at the fee of the quota.
    Renew(super::billing::RenewArgs),
    /// Raise the account quota now (a multiple of 5), charged for the months left.
    Upgrade(super::billing::UpgradeArgs),
    /// Renew, with the account quota of the renewed period (up or down, a multiple of 5).
    Modify(super::billing::ModifyArgs),
    /// Turn auto-renew on or off: each expiry then adds a month, charged.
    AutoRenew(super::billing::AutoRenewArgs),
    /// Set the expiry time without a charge: a correction for imported instances and for
    /// lifecycle drills.
    #[command(hide = true)]
    SetExpiry(super::billing::SetExpiryArgs),
    /// Run the lifecycle now: settle data, issue statements, stop, lock, unlock or release
    /// instances, and send the notices that are due. The agent also runs it every minute.
    LifecycleRun,
}

#[derive(Debug, Args)]
pub struct NetworkCommand {
    #[command(flatten)]
    options: ClientOptions,
    #[command(subcommand)]
    action: NetworkAction,
}

#[derive(Debug, Subcommand)]
enum NetworkAction {
    /// Show an instance's network configuration.
    Show { id: String },
    /// Change an instance's network configuration; options not given stay as they are.
    Set(NetworkSetArgs),
}

#[derive(Debug, Args)]
struct NetworkSetArgs {
    id: String,
    /// Associate an existing CCN by ID.
    #[arg(long, conflicts_with = "ccn_name")]
    ccn_id: Option<String>,
    /// Create a CCN with this name and associate it.
    #[arg(long)]
    ccn_name: Option<String>,
    /// Associate an existing CEN by ID.
    #[arg(long, conflicts_with = "cen_name")]
    cen_id: Option<String>,
    /// Create a CEN with this name and associate it.
    #[arg(long)]
    cen_name: Option<String>,
    /// Active DNS server pushed to clients; an empty value removes it.
    #[arg(long)]
    dns_active: Option<String>,
    /// Standby DNS server pushed to clients; an empty value removes it.
    #[arg(long)]
    dns_standby: Option<String>,
    /// Client address blocks, 1 to 5, replacing the current ones; repeat for more.
    #[arg(long = "cidr-block", value_name = "CIDR")]
    cidr_blocks: Vec<Ipv4Net>,
    /// Destinations clients may reach, replacing the current ones; repeat for more.
    #[arg(long = "allow", value_name = "CIDR")]
    allowed: Vec<Ipv4Net>,
    /// Remove every allowed destination.
    #[arg(long, conflicts_with = "allowed")]
    allow_none: bool,
    /// Whether the instance's clients may reach each other.
    #[arg(long)]
    client_to_client: Option<bool>,
}

#[derive(Debug, Args)]
pub struct AccountCommand {
    #[command(flatten)]
    options: ClientOptions,
    #[command(subcommand)]
    action: AccountAction,
}

/// Source of a password: never the command line, which other users can read.
#[derive(Debug, Args)]
struct PasswordSource {
    /// Read the password from the first line of this file.
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
    /// Read the password from this environment variable.
    #[arg(long, value_name = "VAR", conflicts_with = "password_file")]
    password_env: Option<String>,
}

impl PasswordSource {
    fn read(&self) -> Result<Option<String>> {
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("failed to read --password-file {}", path.display()))?;
            return Ok(Some(text.lines().next().unwrap_or_default().to_owned()));
        }
        if let Some(variable) = &self.password_env {
            let Ok(value) = std::env::var(variable) else {
                bail!("--password-env {variable}: the variable is not set");
            };
            return Ok(Some(value));
        }
        Ok(None)
    }
}

#[derive(Debug, Subcommand)]
enum AccountAction {
    /// Create an account. With only --email, the email is the username and a password is
    /// generated. The password is printed once.
    Create {
        instance: String,
        #[arg(long)]
        email: String,
        #[arg(long)]
        username: Option<String>,
        #[command(flatten)]
        password: PasswordSource,
        /// A fixed client address inside the instance's blocks.
        #[arg(long)]
        static_ip: Option<Ipv4Addr>,
        /// Bandwidth each way, in kbit/s (default 2,000).
        #[arg(long, value_name = "KBIT/S")]
        bandwidth: Option<u32>,
    },
    /// List an instance's accounts.
    List { instance: String },
    /// Show one account.
    Show { instance: String, username: String },
    /// Enable an account.
    Enable { instance: String, username: String },
    /// Disable an account: its client is cut off at once.
    Disable { instance: String, username: String },
    /// Delete an account and its replicas; refused while one of them has used data this
    /// month.
    Delete { instance: String, username: String },
    /// Replicate an account to an instance in another area, where it logs in with the same
    /// username and password.
    Roam {
        instance: String,
        username: String,
        /// The destination instance.
        #[arg(long, value_name = "INSTANCE")]
        to: String,
    },
    /// Set a new password, generated unless given; it is printed once.
    ResetPassword {
        instance: String,
        username: String,
        #[command(flatten)]
        password: PasswordSource,
    },
    /// Change an account's bandwidth or static address.
    #[command(group(clap::ArgGroup::new("change").required(true).multiple(true).args(["bandwidth", "static_ip", "no_static_ip"])))]
    Set {
        instance: String,
        username: String,
        /// Bandwidth each way, in kbit/s.
        #[arg(long, value_name = "KBIT/S")]
        bandwidth: Option<u32>,
        /// A fixed client address inside the instance's blocks.
        #[arg(long, conflicts_with = "no_static_ip")]
        static_ip: Option<Ipv4Addr>,
        /// Remove the static address: the client gets one from the pool.
        #[arg(long)]
        no_static_ip: bool,
    },
}

/// Runs one request on a fresh single-threaded runtime.
pub(super) fn call<T: DeserializeOwned>(
    options: &ClientOptions,
    method: Method,
    path: &str,
    body: Option<&impl Serialize>,
) -> Result<T> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let client = ApiClient::new(&options.socket);
    Ok(runtime.block_on(client.call(method, path, body))?)
}

pub(super) const NO_BODY: Option<&()> = None;

pub(super) fn print_json(value: &impl Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn instance_row(instance: &Instance) -> Vec<String> {
    vec![
        instance.id.clone(),
        instance.owner.clone(),
        instance.area.clone(),
        instance.account_quota.to_string(),
        instance.state.clone(),
        instance.expires_at.format("%Y-%m-%d").to_string(),
        if instance.trial { "yes" } else { "no" }.to_owned(),
    ]
}

const INSTANCE_HEADER: [&str; 7] = ["ID", "OWNER", "AREA", "QUOTA", "STATE", "EXPIRES", "TRIAL"];

fn blocks_text(blocks: &[Ipv4Net]) -> String {
    if blocks.is_empty() {
        "-".to_owned()
    } else {
        blocks.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    }
}

fn print_network(network: &Network) {
    let named = |network: &Option<crate::admin::NamedNetwork>| {
        network.as_ref().map_or("-".to_owned(), |n| format!("{} ({})", n.name, n.id))
    };
    let address = |address: Option<Ipv4Addr>| address.map_or("-".to_owned(), |a| a.to_string());
    table::print_fields(&[
        ("CCN", named(&network.ccn)),
        ("CEN", named(&network.cen)),
        ("DNS active", address(network.dns_active)),
        ("DNS standby", address(network.dns_standby)),
        ("CIDR blocks", blocks_text(&network.cidr_blocks)),
        ("allowed destinations", blocks_text(&network.allowed_destinations)),
        (
            "client to client",
            if network.client_to_client { "allowed" } else { "blocked" }.to_owned(),
        ),
    ]);
}

/// Runs an instance command.
pub fn run_instance(command: InstanceCommand) -> Result<()> {
    let options = &command.options;
    match command.action {
        InstanceAction::Create { owner, area, quota, months } => {
            let body = CreateInstanceBody { owner, area, account_quota: quota, months };
            let instance: Instance = call(options, Method::POST, "/instances", Some(&body))?;
            show_instances(options, &[instance])
        }
        InstanceAction::Trial { owner, area } => {
            let instance: Instance =
                call(options, Method::POST, "/instances/trial", Some(&TrialBody { owner, area }))?;
            show_instances(options, &[instance])
        }
        InstanceAction::List => {
            let instances: Vec<Instance> = call(options, Method::GET, "/instances", NO_BODY)?;
            show_instances(options, &instances)
        }
        InstanceAction::Show { id } => {
            let detail: InstanceDetail = call(options, Method::GET, &instance_path(&id)?, NO_BODY)?;
            let network: Network =
                call(options, Method::GET, &format!("{}/network", instance_path(&id)?), NO_BODY)?;
            if options.json {
                return print_json(&serde_json::json!({ "instance": detail, "network": network }));
            }
            let instance = &detail.instance;
            table::print_fields(&[
                ("ID", instance.id.clone()),
                ("owner", instance.owner.clone()),
                ("area", format!("{} ({})", instance.area, instance.zone)),
                ("account quota", instance.account_quota.to_string()),
                ("state", instance.state.clone()),
                ("created", instance.created_at.to_rfc3339()),
                ("expires", instance.expires_at.to_rfc3339()),
                ("trial", instance.trial.to_string()),
                ("login server", detail.login_server.clone()),
                ("login fingerprint", detail.login_fingerprint.clone()),
                (
                    "WireGuard",
                    detail.tunnel.as_ref().map_or_else(
                        || "down: set CIDR blocks to bring it up".to_owned(),
                        |tunnel| {
                            format!(
                                "{} on UDP {}, public key {}, {} session(s)",
                                tunnel.interface,
                                tunnel.listen_port,
                                tunnel.public_key,
                                tunnel.sessions
                            )
                        },
                    ),
                ),
            ]);
            print_network(&network);
            Ok(())
        }
        InstanceAction::Renew(args) => super::billing::renew(options, args),
        InstanceAction::Upgrade(args) => super::billing::upgrade(options, args),
        InstanceAction::Modify(args) => super::billing::modify(options, args),
        InstanceAction::AutoRenew(args) => super::billing::auto_renew(options, args),
        InstanceAction::SetExpiry(args) => super::billing::set_expiry(options, args),
        InstanceAction::LifecycleRun => super::billing::lifecycle_run(options),
        InstanceAction::Delete { id } => {
            let reply: serde_json::Value =
                call(options, Method::DELETE, &instance_path(&id)?, NO_BODY)?;
            if options.json {
                return print_json(&reply);
            }
            println!("deleted instance {id}");
            Ok(())
        }
    }
}

pub(super) fn show_instances(options: &ClientOptions, instances: &[Instance]) -> Result<()> {
    if options.json {
        return print_json(&instances);
    }
    table::print(&INSTANCE_HEADER, &instances.iter().map(instance_row).collect::<Vec<_>>());
    Ok(())
}

/// Runs a network command.
pub fn run_network(command: NetworkCommand) -> Result<()> {
    let options = &command.options;
    let network: Network = match command.action {
        NetworkAction::Show { id } => {
            call(options, Method::GET, &format!("{}/network", instance_path(&id)?), NO_BODY)?
        }
        NetworkAction::Set(args) => {
            let body = NetworkBody {
                ccn_id: args.ccn_id,
                ccn_name: args.ccn_name,
                cen_id: args.cen_id,
                cen_name: args.cen_name,
                dns_active: args.dns_active,
                dns_standby: args.dns_standby,
                cidr_blocks: (!args.cidr_blocks.is_empty()).then_some(args.cidr_blocks),
                allowed_destinations: if args.allow_none {
                    Some(Vec::new())
                } else {
                    (!args.allowed.is_empty()).then_some(args.allowed)
                },
                client_to_client: args.client_to_client,
            };
            call(
                options,
                Method::PATCH,
                &format!("{}/network", instance_path(&args.id)?),
                Some(&body),
            )?
        }
    };
    if options.json {
        return print_json(&network);
    }
    print_network(&network);
    Ok(())
}

const ACCOUNT_HEADER: [&str; 6] =
    ["USERNAME", "EMAIL", "STATE", "BANDWIDTH", "STATIC IP", "CREATED"];

fn account_row(account: &Account) -> Vec<String> {
    vec![
        account.username.clone(),
        account.email.clone(),
        if account.enabled { "enabled" } else { "disabled" }.to_owned(),
        format!("{} kbit/s", account.bandwidth_kbps),
        account.static_ip.map_or("-".to_owned(), |address| address.to_string()),
        account.created_at.format("%Y-%m-%d").to_string(),
    ]
}

fn show_accounts(options: &ClientOptions, accounts: &[Account]) -> Result<()> {
    if options.json {
        return print_json(&accounts);
    }
    table::print(&ACCOUNT_HEADER, &accounts.iter().map(account_row).collect::<Vec<_>>());
    Ok(())
}

/// Returns the API path of an account, after checking that the ID and username are
/// well-formed, so that nothing else can ride along in the URL.
fn account_path(instance: &str, username: &str) -> Result<String> {
    validation::instance_id(instance)?;
    if validation::username(username).is_err() {
        // Accounts made from an email address have it as their username.
        validation::email(username).map_err(|_| validation::username(username).unwrap_err())?;
    }
    Ok(format!("/instances/{instance}/accounts/{username}"))
}

/// Returns the API path of an instance, after checking its ID.
pub(super) fn instance_path(instance: &str) -> Result<String> {
    validation::instance_id(instance)?;
    Ok(format!("/instances/{instance}"))
}

/// Runs an account command.
pub fn run_account(command: AccountCommand) -> Result<()> {
    let options = &command.options;
    match command.action {
        AccountAction::Create { instance, email, username, password, static_ip, bandwidth } => {
            let body = CreateAccountBody {
                username,
                email,
                password: password.read()?,
                static_ip,
                bandwidth_kbps: bandwidth,
            };
            let reply: AccountCreatedReply = call(
                options,
                Method::POST,
                &format!("{}/accounts", instance_path(&instance)?),
                Some(&body),
            )?;
            if options.json {
                return print_json(&reply);
            }
            show_accounts(options, std::slice::from_ref(&reply.created.account))?;
            println!("password: {}  (shown once)", reply.created.password);
            print_email(&reply.email);
            Ok(())
        }
        AccountAction::List { instance } => {
            let accounts: Vec<Account> = call(
                options,
                Method::GET,
                &format!("{}/accounts", instance_path(&instance)?),
                NO_BODY,
            )?;
            show_accounts(options, &accounts)
        }
        AccountAction::Show { instance, username } => {
            let detail: AccountDetail =
                call(options, Method::GET, &account_path(&instance, &username)?, NO_BODY)?;
            if options.json {
                return print_json(&detail);
            }
            show_accounts(options, std::slice::from_ref(&detail.account))?;
            if let Some(source) = &detail.roaming.replica_of {
                println!("replica of the account on instance {source}");
            }
            if !detail.roaming.replicas.is_empty() {
                println!("replicated to: {}", detail.roaming.replicas.join(", "));
            }
            Ok(())
        }
        AccountAction::Roam { instance, username, to } => {
            validation::instance_id(&to)?;
            let body = RoamBody { to: to.clone() };
            let path = format!("{}/roam", account_path(&instance, &username)?);
            let replica: Account = call(options, Method::POST, &path, Some(&body))?;
            if options.json {
                return print_json(&replica);
            }
            println!(
                "replicated account {username} of instance {instance} to instance {to}: it logs \
                 in there with the same password"
            );
            Ok(())
        }
        AccountAction::Enable { instance, username } => {
            set_enabled(options, &instance, &username, true)
        }
        AccountAction::Disable { instance, username } => {
            set_enabled(options, &instance, &username, false)
        }
        AccountAction::Delete { instance, username } => {
            let reply: serde_json::Value =
                call(options, Method::DELETE, &account_path(&instance, &username)?, NO_BODY)?;
            if options.json {
                return print_json(&reply);
            }
            println!("deleted account {username} of instance {instance}");
            Ok(())
        }
        AccountAction::ResetPassword { instance, username, password } => {
            let body = PasswordBody { password: password.read()? };
            let reply: PasswordReply = call(
                options,
                Method::POST,
                &format!("{}/password", account_path(&instance, &username)?),
                Some(&body),
            )?;
            if options.json {
                return print_json(&reply);
            }
            println!("new password of {username}: {}  (shown once)", reply.password);
            print_email(&reply.email);
            Ok(())
        }
        AccountAction::Set { instance, username, bandwidth, static_ip, no_static_ip } => {
            let body = UpdateAccountBody {
                enabled: None,
                bandwidth_kbps: bandwidth,
                static_ip: if no_static_ip {
                    Some(String::new())
                } else {
                    static_ip.map(|a| a.to_string())
                },
            };
            let account: Account =
                call(options, Method::PATCH, &account_path(&instance, &username)?, Some(&body))?;
            show_accounts(options, &[account])
        }
    }
}

fn print_email(email: &EmailReport) {
    match (email.delivery.as_str(), &email.path, &email.error) {
        ("outbox", Some(path), _) => {
            println!(
                "credentials email to {} written to {path} (no SMTP relay configured)",
                email.to
            )
        }
        ("smtp", _, _) => println!("credentials email sent to {}", email.to),
        (_, _, error) => println!(
            "credentials email to {} failed: {}; the change stands, so reset the password to \
             send it again",
            email.to,
            error.as_deref().unwrap_or("unknown error")
        ),
    }
}

fn set_enabled(
    options: &ClientOptions,
    instance: &str,
    username: &str,
    enabled: bool,
) -> Result<()> {
    let body = UpdateAccountBody { enabled: Some(enabled), ..UpdateAccountBody::default() };
    let account: Account =
        call(options, Method::PATCH, &account_path(instance, username)?, Some(&body))?;
    show_accounts(options, &[account])
}
