//! Admin operations on instances, their network configuration and client accounts, each
//! change checked against the rules and written in one transaction.

use std::{net::Ipv4Addr, sync::Arc};

use chrono::{DateTime, Datelike as _, Months, Utc};
use ipnet::Ipv4Net;
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use sqlx::{Any, Row as _, Transaction};
use tracing::info;

use crate::{
    clock::Clock,
    credentials::{self, CredentialError},
    store::{to_u32, Store, StoreError},
    validation::{self, ValidationError, Zone, INSTANCE_ID_PREFIX, INSTANCE_ID_SUFFIX_LEN},
};

/// Accounts of a free trial instance.
pub const TRIAL_ACCOUNT_QUOTA: u32 = 1;
/// Bandwidth of a free trial's account, in kbit/s.
pub const TRIAL_BANDWIDTH_KBPS: u32 = 2_000;
/// Validity of a free trial, in months.
pub const TRIAL_MONTHS: u32 = 12;
/// Minimum subscription, in months.
pub const MIN_SUBSCRIPTION_MONTHS: u32 = 1;
/// Maximum subscription bought at once, in months.
pub const MAX_SUBSCRIPTION_MONTHS: u32 = 36;
/// Maximum length of an owner name, in characters.
pub const MAX_OWNER_LEN: usize = 64;

/// Errors of admin operations. Each names what was wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Credential(#[from] CredentialError),
    #[error("{0}")]
    Internal(String),
}

impl From<sqlx::Error> for AdminError {
    fn from(error: sqlx::Error) -> Self {
        Self::Store(StoreError::Query(error))
    }
}

/// Lifecycle state of an instance.
pub const STATE_RUNNING: &str = "running";
/// State of an instance from 15 days after its expiry until it is renewed or released: its
/// clients can neither log in nor pass traffic.
pub const STATE_STOPPED: &str = "stopped";
/// State of an instance whose owner has an overdue statement, until it is paid: its clients
/// can neither log in nor pass traffic.
pub const STATE_LOCKED: &str = "locked";

/// An instance, as the admin API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub id: String,
    pub owner: String,
    pub area: String,
    pub zone: String,
    pub account_quota: u32,
    pub trial: bool,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub auto_renew: bool,
    pub state: String,
    /// Number of the instance in the kernel maps.
    pub kernel_number: u32,
}

/// A CCN or CEN, by ID and name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedNetwork {
    pub id: String,
    pub name: String,
}

/// The network configuration of an instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub ccn: Option<NamedNetwork>,
    pub cen: Option<NamedNetwork>,
    pub dns_active: Option<Ipv4Addr>,
    pub dns_standby: Option<Ipv4Addr>,
    pub cidr_blocks: Vec<Ipv4Net>,
    pub allowed_destinations: Vec<Ipv4Net>,
    pub client_to_client: bool,
}

/// A client account, as the admin API returns it. The password hash never leaves the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub instance_id: String,
    pub username: String,
    pub email: String,
    pub static_ip: Option<Ipv4Addr>,
    pub bandwidth_kbps: u32,
    pub enabled: bool,
    pub created_at: DateTime<Utc>,
}

/// A new account and its password, shown once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedAccount {
    pub account: Account,
    pub password: String,
}

/// A paid instance to create.
#[derive(Debug, Clone)]
pub struct NewInstance {
    pub owner: String,
    pub area: String,
    pub account_quota: u32,
    pub months: u32,
}

/// How to pick a CCN or CEN: an existing one by ID, or a new one by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkChoice {
    Existing(String),
    Create(String),
}

/// A change of network configuration; `None` fields stay as they are.
#[derive(Debug, Clone, Default)]
pub struct NetworkChange {
    pub ccn: Option<NetworkChoice>,
    pub cen: Option<NetworkChoice>,
    /// `Some(None)` removes the server.
    pub dns_active: Option<Option<Ipv4Addr>>,
    pub dns_standby: Option<Option<Ipv4Addr>>,
    pub cidr_blocks: Option<Vec<Ipv4Net>>,
    pub allowed_destinations: Option<Vec<Ipv4Net>>,
    pub client_to_client: Option<bool>,
}

/// A change of an account; `None` fields stay as they are.
#[derive(Debug, Clone, Default)]
pub struct AccountChange {
    pub enabled: Option<bool>,
    pub bandwidth_kbps: Option<u32>,
    /// `Some(None)` removes the static address.
    pub static_ip: Option<Option<Ipv4Addr>>,
}

/// An account to create. Without a username the email address is the username; without a
/// password one is generated.
#[derive(Debug, Clone, Default)]
pub struct NewAccount {
    pub username: Option<String>,
    pub email: String,
    pub password: Option<String>,
    pub static_ip: Option<Ipv4Addr>,
    pub bandwidth_kbps: Option<u32>,
}

/// The admin operations over the store.
#[derive(Clone)]
pub struct Admin {
    store: Store,
    clock: Arc<dyn Clock>,
    /// Highest bandwidth an account may have on this box, in kbit/s.
    bandwidth_ceiling_kbps: u32,
}

fn not_found(what: &'static str, id: &str) -> AdminError {
    AdminError::NotFound { what, id: id.to_owned() }
}

fn parse_time(seconds: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(seconds, 0).unwrap_or_default()
}

fn parse_address(text: Option<String>) -> Option<Ipv4Addr> {
    text.and_then(|text| text.parse().ok())
}

fn generate_instance_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rngs::OsRng;
    let suffix: String = (0..INSTANCE_ID_SUFFIX_LEN)
        .map(|_| char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())]))
        .collect();
    format!("{INSTANCE_ID_PREFIX}{suffix}")
}

fn generate_network_id(prefix: &str) -> String {
    let mut rng = rand::rngs::OsRng;
    let suffix: String = (0..12)
        .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.gen_range(0..36)]))
        .collect();
    format!("{prefix}-{suffix}")
}

/// Returns the calendar month of a time, as `YYYY-MM`.
pub fn month_of(time: DateTime<Utc>) -> String {
    format!("{:04}-{:02}", time.year(), time.month())
}

/// Checks an owner name.
pub(crate) fn owner(value: &str) -> Result<(), ValidationError> {
    let length = value.chars().count();
    if length == 0 || length > MAX_OWNER_LEN || value.chars().any(char::is_control) {
        return Err(ValidationError {
            field: "owner",
            rule: format!("must be 1 to {MAX_OWNER_LEN} characters without control characters"),
            value: format!("{value:?}"),
        });
    }
    Ok(())
}

/// Checks a subscription period in months.
pub(crate) fn months(value: u32) -> Result<(), ValidationError> {
    if !(MIN_SUBSCRIPTION_MONTHS..=MAX_SUBSCRIPTION_MONTHS).contains(&value) {
        return Err(ValidationError {
            field: "months",
            rule: format!("must be {MIN_SUBSCRIPTION_MONTHS} to {MAX_SUBSCRIPTION_MONTHS} months"),
            value: value.to_string(),
        });
    }
    Ok(())
}

impl Admin {
    /// Creates the operations over `store`, reading time from `clock`. Accounts may have up to
    /// `bandwidth_ceiling_kbps`.
    pub fn new(store: Store, clock: Arc<dyn Clock>, bandwidth_ceiling_kbps: u32) -> Self {
        Self { store, clock, bandwidth_ceiling_kbps }
    }

    /// Returns the store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Returns the current time of the admin's clock.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// Creates a paid instance.
    ///
    /// # Errors
    /// Fails with [`AdminError::Invalid`] on a bad owner, area, quota or period.
    pub async fn create_instance(&self, new: &NewInstance) -> Result<Instance, AdminError> {
        owner(&new.owner)?;
        validation::area(&new.area)?;
        validation::account_quota(new.account_quota)?;
        months(new.months)?;
        let mut transaction = self.store.pool().begin().await?;
        let instance = self
            .insert_instance(
                &mut transaction,
                &new.owner,
                &new.area,
                new.account_quota,
                new.months,
                false,
            )
            .await?;
        crate::billing::charge_subscription(
            &mut transaction,
            &instance,
            new.months,
            self.clock.now(),
        )
        .await?;
        transaction.commit().await?;
        info!(instance = %instance.id, owner = %instance.owner, area = %instance.area, "instance created");
        Ok(instance)
    }

    /// Claims the free trial instance of `owner`: 1 account at 2 Mbit/s for a year, once per
    /// owner.
    ///
    /// # Errors
    /// Fails with [`AdminError::Conflict`] if the owner already claimed one.
    pub async fn claim_trial(&self, owner_name: &str, area: &str) -> Result<Instance, AdminError> {
        owner(owner_name)?;
        validation::area(area)?;
        let mut transaction = self.store.pool().begin().await?;
        let claimed = sqlx::query("SELECT instance_id FROM trials WHERE owner = $1")
            .bind(owner_name)
            .fetch_optional(&mut *transaction)
            .await?;
        if let Some(row) = claimed {
            let instance: String = row.try_get("instance_id")?;
            return Err(AdminError::Conflict(format!(
                "owner {owner_name:?} already claimed a free trial (instance {instance}); \
                 each owner gets one"
            )));
        }
        let instance = self
            .insert_instance(
                &mut transaction,
                owner_name,
                area,
                TRIAL_ACCOUNT_QUOTA,
                TRIAL_MONTHS,
                true,
            )
            .await?;
        sqlx::query("INSERT INTO trials (owner, instance_id, claimed_at) VALUES ($1, $2, $3)")
            .bind(owner_name)
            .bind(&instance.id)
            .bind(self.clock.now().timestamp())
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        info!(instance = %instance.id, owner = owner_name, "free trial claimed");
        Ok(instance)
    }

    async fn insert_instance(
        &self,
        transaction: &mut Transaction<'static, Any>,
        owner_name: &str,
        area: &str,
        account_quota: u32,
        months: u32,
        trial: bool,
    ) -> Result<Instance, AdminError> {
        let now = self.clock.now();
        let expires_at = now.checked_add_months(Months::new(months)).unwrap_or(now);
        let next: i64 =
            sqlx::query("SELECT COALESCE(MAX(kernel_number), 0) + 1 AS next FROM instances")
                .fetch_one(&mut **transaction)
                .await?
                .try_get("next")?;
        let instance = Instance {
            id: generate_instance_id(),
            owner: owner_name.to_owned(),
            area: area.to_owned(),
            zone: format!("{:?}", Zone::of_area(area)),
            account_quota,
            trial,
            created_at: parse_time(now.timestamp()),
            expires_at: parse_time(expires_at.timestamp()),
            auto_renew: false,
            state: STATE_RUNNING.to_owned(),
            kernel_number: to_u32(next),
        };
        sqlx::query(
            "INSERT INTO instances (id, kernel_number, owner, area, account_quota, trial, \
             created_at, expires_at, auto_renew, state, client_to_client) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&instance.id)
        .bind(next)
        .bind(owner_name)
        .bind(area)
        .bind(i64::from(account_quota))
        .bind(i64::from(trial))
        .bind(instance.created_at.timestamp())
        .bind(instance.expires_at.timestamp())
        .bind(0i64)
        .bind(STATE_RUNNING)
        .bind(0i64)
        .execute(&mut **transaction)
        .await?;
        Ok(instance)
    }

    /// Returns every instance, oldest first.
    ///
    /// # Errors
    /// Fails if the store fails.
    pub async fn list_instances(&self) -> Result<Vec<Instance>, AdminError> {
        let rows = sqlx::query(INSTANCE_SELECT_ALL).fetch_all(self.store.pool()).await?;
        rows.iter().map(instance_from_row).collect()
    }

    /// Returns one instance.
    ///
    /// # Errors
    /// Fails with [`AdminError::NotFound`] for an unknown ID.
    pub async fn instance(&self, id: &str) -> Result<Instance, AdminError> {
        fetch_instance(self.store.pool(), id).await
    }

    /// Deletes an instance with its network configuration and accounts.
    ///
    /// # Errors
    /// Fails with [`AdminError::NotFound`] for an unknown ID.
    pub async fn delete_instance(&self, id: &str) -> Result<(), AdminError> {
        let mut transaction = self.store.pool().begin().await?;
        delete_instance_rows(&mut transaction, id).await?;
        transaction.commit().await?;
        info!(instance = id, "instance deleted");
        Ok(())
    }

    /// Returns the network configuration of an instance.
    ///
    /// # Errors
    /// Fails with [`AdminError::NotFound`] for an unknown ID.
    pub async fn network(&self, id: &str) -> Result<Network, AdminError> {
        let mut connection = self.store.pool().acquire().await?;
        let row = sqlx::query(
            "SELECT i.dns_active, i.dns_standby, i.client_to_client, \
             c.id AS ccn_id, c.name AS ccn_name, e.id AS cen_id, e.name AS cen_name \
             FROM instances i LEFT JOIN ccns c ON c.id = i.ccn_id \
             LEFT JOIN cens e ON e.id = i.cen_id WHERE i.id = $1",
        )
        .bind(id)
        .fetch_optional(&mut *connection)
        .await?
        .ok_or_else(|| not_found("instance", id))?;
        let named = |id: Option<String>, name: Option<String>| match (id, name) {
            (Some(id), Some(name)) => Some(NamedNetwork { id, name }),
            _ => None,
        };
        Ok(Network {
            ccn: named(row.try_get("ccn_id")?, row.try_get("ccn_name")?),
            cen: named(row.try_get("cen_id")?, row.try_get("cen_name")?),
            dns_active: parse_address(row.try_get("dns_active")?),
            dns_standby: parse_address(row.try_get("dns_standby")?),
            cidr_blocks: blocks(&mut connection, "cidr_blocks", id).await?,
            allowed_destinations: blocks(&mut connection, "allowed_destinations", id).await?,
            client_to_client: row.try_get::<i64, _>("client_to_client")? != 0,
        })
    }

    /// Changes the network configuration of an instance.
    ///
    /// # Errors
    /// Fails with [`AdminError::Invalid`] on a bad name, block list or address, with
    /// [`AdminError::NotFound`] for an unknown instance, CCN or CEN, and with
    /// [`AdminError::Conflict`] when a new CCN or CEN name is taken or new blocks would leave
    /// an account's static address outside them. Nothing is written then.
    pub async fn set_network(
        &self,
        id: &str,
        change: &NetworkChange,
    ) -> Result<Network, AdminError> {
        for (field, choice) in [("ccn_name", &change.ccn), ("cen_name", &change.cen)] {
            if let Some(NetworkChoice::Create(name)) = choice {
                validation::network_name(field, name)?;
            }
        }
        if let Some(allowed) = &change.allowed_destinations {
            allowed_destinations(allowed)?;
        }
        for (field, value) in
            [("dns_active", change.dns_active), ("dns_standby", change.dns_standby)]
        {
            if let Some(Some(address)) = value {
                validation::dns_server(field, address)?;
            }
        }
        let mut transaction = self.store.pool().begin().await?;
        fetch_instance(&mut *transaction, id).await?;
        if let Some(choice) = &change.ccn {
            let ccn = self.resolve_network(&mut transaction, "ccns", "ccn", choice).await?;
            sqlx::query("UPDATE instances SET ccn_id = $1 WHERE id = $2")
                .bind(ccn)
                .bind(id)
                .execute(&mut *transaction)
                .await?;
        }
        if let Some(choice) = &change.cen {
            let cen = self.resolve_network(&mut transaction, "cens", "cen", choice).await?;
            sqlx::query("UPDATE instances SET cen_id = $1 WHERE id = $2")
                .bind(cen)
                .bind(id)
                .execute(&mut *transaction)
                .await?;
        }
        for (column, value) in
            [("dns_active", change.dns_active), ("dns_standby", change.dns_standby)]
        {
            if let Some(address) = value {
                sqlx::query(&format!("UPDATE instances SET {column} = $1 WHERE id = $2"))
                    .bind(address.map(|address| address.to_string()))
                    .bind(id)
                    .execute(&mut *transaction)
                    .await?;
            }
        }
        if let Some(flag) = change.client_to_client {
            sqlx::query("UPDATE instances SET client_to_client = $1 WHERE id = $2")
                .bind(i64::from(flag))
                .bind(id)
                .execute(&mut *transaction)
                .await?;
        }
        if let Some(new_blocks) = &change.cidr_blocks {
            check_client_blocks(&mut transaction, id, new_blocks).await?;
            replace_blocks(&mut transaction, "cidr_blocks", id, new_blocks).await?;
        }
        if let Some(allowed) = &change.allowed_destinations {
            replace_blocks(&mut transaction, "allowed_destinations", id, allowed).await?;
        }
        check_allowed_outside_client_blocks(&mut transaction, id).await?;

        transaction.commit().await?;
        info!(instance = id, "network configuration changed");
        self.network(id).await
    }

    async fn resolve_network(
        &self,
        transaction: &mut Transaction<'static, Any>,
        table: &'static str,
        kind: &'static str,
        choice: &NetworkChoice,
    ) -> Result<String, AdminError> {
        match choice {
            NetworkChoice::Existing(network_id) => {
                let found = sqlx::query(&format!("SELECT id FROM {table} WHERE id = $1"))
                    .bind(network_id)
                    .fetch_optional(&mut **transaction)
                    .await?;
                found.map(|_| network_id.clone()).ok_or_else(|| not_found(kind, network_id))
            }
            NetworkChoice::Create(name) => {
                let taken = sqlx::query(&format!("SELECT id FROM {table} WHERE name = $1"))
                    .bind(name)
                    .fetch_optional(&mut **transaction)
                    .await?;
                if let Some(row) = taken {
                    let existing: String = row.try_get("id")?;
                    return Err(AdminError::Conflict(format!(
                        "{kind}_name {name:?} is already used by {existing}; choose that \
                         {kind} by ID (--{kind}-id) or pick another name"
                    )));
                }
                let network_id = generate_network_id(kind);
                sqlx::query(&format!(
                    "INSERT INTO {table} (id, name, created_at) VALUES ($1, $2, $3)"
                ))
                .bind(&network_id)
                .bind(name)
                .bind(self.clock.now().timestamp())
                .execute(&mut **transaction)
                .await?;
                Ok(network_id)
            }
        }
    }

    /// Creates an account and returns it with its password, which is shown only this once.
    ///
    /// # Errors
    /// Fails with [`AdminError::Invalid`] on a bad field, and with [`AdminError::Conflict`]
    /// when the username is taken or the instance's quota is full. Nothing is written then.
    pub async fn create_account(
        &self,
        instance_id: &str,
        new: &NewAccount,
    ) -> Result<CreatedAccount, AdminError> {
        validation::email(&new.email)?;
        let username = match &new.username {
            Some(username) => {
                validation::username(username)?;
                username.clone()
            }
            None => validation::username_from_email(&new.email)?,
        };
        let password = match &new.password {
            Some(password) => {
                validation::password(password)?;
                password.clone()
            }
            None => credentials::generate_password(),
        };
        let bandwidth = new.bandwidth_kbps.unwrap_or(validation::DEFAULT_BANDWIDTH_KBPS);
        validation::bandwidth_kbps(bandwidth, self.bandwidth_ceiling_kbps)?;
        // Hashing takes tens of milliseconds, so it happens before the transaction.
        let hash = hash_off_runtime(&password).await?;

        let mut transaction = self.store.pool().begin().await?;
        let instance = fetch_instance(&mut *transaction, instance_id).await?;
        if instance.trial {
            validation::bandwidth_kbps(bandwidth, TRIAL_BANDWIDTH_KBPS)?;
        }
        let count: i64 =
            sqlx::query("SELECT COUNT(*) AS count FROM accounts WHERE instance_id = $1")
                .bind(instance_id)
                .fetch_one(&mut *transaction)
                .await?
                .try_get("count")?;
        if to_u32(count) >= instance.account_quota {
            return Err(AdminError::Conflict(format!(
                "account quota full: instance {instance_id} has {count} of {} accounts; \
                 upgrade the instance or delete an account",
                instance.account_quota
            )));
        }
        let existing =
            sqlx::query("SELECT username FROM accounts WHERE instance_id = $1 AND username = $2")
                .bind(instance_id)
                .bind(&username)
                .fetch_optional(&mut *transaction)
                .await?;
        if existing.is_some() {
            return Err(AdminError::Conflict(format!(
                "invalid username {username:?}: already used by an account of instance {instance_id}"
            )));
        }
        if let Some(address) = new.static_ip {
            check_static_ip(&mut transaction, instance_id, address, None).await?;
        }
        let now = self.clock.now().timestamp();
        sqlx::query(
            "INSERT INTO accounts (instance_id, username, email, password_hash, static_ip, \
             bandwidth_kbps, enabled, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(instance_id)
        .bind(&username)
        .bind(&new.email)
        .bind(&hash)
        .bind(new.static_ip.map(|address| address.to_string()))
        .bind(i64::from(bandwidth))
        .bind(1i64)
        .bind(now)
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        info!(instance = instance_id, username = %username, "account created");
        let account = Account {
            instance_id: instance_id.to_owned(),
            username,
            email: new.email.clone(),
            static_ip: new.static_ip,
            bandwidth_kbps: bandwidth,
            enabled: true,
            created_at: parse_time(now),
        };
        Ok(CreatedAccount { account, password })
    }

    /// Returns the accounts of an instance, by username.
    ///
    /// # Errors
    /// Fails with [`AdminError::NotFound`] for an unknown instance.
    pub async fn list_accounts(&self, instance_id: &str) -> Result<Vec<Account>, AdminError> {
        self.instance(instance_id).await?;
        let rows =
            sqlx::query(&format!("{ACCOUNT_SELECT} WHERE instance_id = $1 ORDER BY username"))
                .bind(instance_id)
                .fetch_all(self.store.pool())
                .await?;
        rows.iter().map(account_from_row).collect()
    }

    /// Returns one account.
    ///
    /// # Errors
    /// Fails with [`AdminError::NotFound`] for an unknown instance or username.
    pub async fn account(&self, instance_id: &str, username: &str) -> Result<Account, AdminError> {
        let row =
            sqlx::query(&format!("{ACCOUNT_SELECT} WHERE instance_id = $1 AND username = $2"))
                .bind(instance_id)
                .bind(username)
                .fetch_optional(self.store.pool())
                .await?
                .ok_or_else(|| not_found("account", &format!("{instance_id}/{username}")))?;
        account_from_row(&row)
    }

    /// Returns the account if `password` is its password, and `None` for an unknown username
    /// or a wrong password (the caller tells neither apart, to give nothing away). The hash is
    /// checked on a blocking thread.
    ///
    /// # Errors
    /// Fails if the store cannot be read or the stored hash is damaged.
    pub async fn check_password(
        &self,
        instance_id: &str,
        username: &str,
        password: &str,
    ) -> Result<Option<Account>, AdminError> {
        let row = sqlx::query(
            "SELECT password_hash FROM accounts WHERE instance_id = $1 AND username = $2",
        )
        .bind(instance_id)
        .bind(username)
        .fetch_optional(self.store.pool())
        .await?;
        let Some(row) = row else { return Ok(None) };
        let hash: String = row.try_get("password_hash")?;
        let password = password.to_owned();
        let matches =
            tokio::task::spawn_blocking(move || credentials::verify_password(&password, &hash))
                .await
                .map_err(|error| {
                    AdminError::Internal(format!("password check task failed: {error}"))
                })??;
        if !matches {
            return Ok(None);
        }
        Ok(Some(self.account(instance_id, username).await?))
    }

    /// Returns the address of each session of an instance, by username.
    ///
    /// # Errors
    /// Fails if the store cannot be read.
    pub async fn session_addresses(
        &self,
        instance_id: &str,
    ) -> Result<std::collections::HashMap<String, Ipv4Addr>, AdminError> {
        let rows = sqlx::query("SELECT username, address FROM sessions WHERE instance_id = $1")
            .bind(instance_id)
            .fetch_all(self.store.pool())
            .await?;
        let mut addresses = std::collections::HashMap::new();
        for row in rows {
            let address: String = row.try_get("address")?;
            if let Ok(address) = address.parse() {
                addresses.insert(row.try_get("username")?, address);
            }
        }
        Ok(addresses)
    }

    /// Enables or disables an account.
    ///
    /// # Errors
    /// Fails with [`AdminError::NotFound`] for an unknown account.
    pub async fn set_enabled(
        &self,
        instance_id: &str,
        username: &str,
        enabled: bool,
    ) -> Result<Account, AdminError> {
        let change = AccountChange { enabled: Some(enabled), ..AccountChange::default() };
        self.change_account(instance_id, username, &change).await
    }

    /// Changes an account's bandwidth.
    ///
    /// # Errors
    /// Fails with [`AdminError::Invalid`] outside 1 to the box's ceiling (2,000 for a trial).
    pub async fn set_bandwidth(
        &self,
        instance_id: &str,
        username: &str,
        kbps: u32,
    ) -> Result<Account, AdminError> {
        let change = AccountChange { bandwidth_kbps: Some(kbps), ..AccountChange::default() };
        self.change_account(instance_id, username, &change).await
    }

    /// Sets or clears an account's static address.
    ///
    /// # Errors
    /// Fails with [`AdminError::Invalid`] for an address outside the blocks, a network or
    /// broadcast address, or one another account uses.
    pub async fn set_static_ip(
        &self,
        instance_id: &str,
        username: &str,
        address: Option<Ipv4Addr>,
    ) -> Result<Account, AdminError> {
        let change = AccountChange { static_ip: Some(address), ..AccountChange::default() };
        self.change_account(instance_id, username, &change).await
    }

    /// Applies every part of `change` to an account in one transaction, after checking all of
    /// them: a change with one bad part changes nothing.
    ///
    /// # Errors
    /// Fails with [`AdminError::NotFound`] for an unknown account, and with
    /// [`AdminError::Invalid`] for a bad bandwidth or static address.
    pub async fn change_account(
        &self,
        instance_id: &str,
        username: &str,
        change: &AccountChange,
    ) -> Result<Account, AdminError> {
        if let Some(kbps) = change.bandwidth_kbps {
            validation::bandwidth_kbps(kbps, self.bandwidth_ceiling_kbps)?;
        }
        let mut transaction = self.store.pool().begin().await?;
        let instance = fetch_instance(&mut *transaction, instance_id).await?;
        let exists =
            sqlx::query("SELECT username FROM accounts WHERE instance_id = $1 AND username = $2")
                .bind(instance_id)
                .bind(username)
                .fetch_optional(&mut *transaction)
                .await?;
        if exists.is_none() {
            return Err(not_found("account", &format!("{instance_id}/{username}")));
        }
        if let Some(kbps) = change.bandwidth_kbps {
            // A free trial keeps its 2 Mbit/s, whatever the box allows.
            if instance.trial {
                validation::bandwidth_kbps(kbps, TRIAL_BANDWIDTH_KBPS)?;
            }
        }
        if let Some(Some(address)) = change.static_ip {
            check_static_ip(&mut transaction, instance_id, address, Some(username)).await?;
        }
        let mut updates: Vec<(&str, Option<String>, Option<i64>)> = Vec::new();
        if let Some(enabled) = change.enabled {
            updates.push(("enabled", None, Some(i64::from(enabled))));
        }
        if let Some(kbps) = change.bandwidth_kbps {
            updates.push(("bandwidth_kbps", None, Some(i64::from(kbps))));
        }
        if let Some(address) = change.static_ip {
            updates.push(("static_ip", address.map(|address| address.to_string()), None));
        }
        for (column, text, number) in updates {
            let statement = format!(
                "UPDATE accounts SET {column} = $1 WHERE instance_id = $2 AND username = $3"
            );
            let query = match (text, number) {
                (_, Some(number)) => sqlx::query(&statement).bind(number),
                (text, None) => sqlx::query(&statement).bind(text),
            };
            query.bind(instance_id).bind(username).execute(&mut *transaction).await?;
        }
        if let Some(enabled) = change.enabled {
            // Replicas follow their source, so the user's credentials work in every area or
            // in none.
            sqlx::query("UPDATE accounts SET enabled = $1 WHERE replica_of = $2 AND username = $3")
                .bind(i64::from(enabled))
                .bind(instance_id)
                .bind(username)
                .execute(&mut *transaction)
                .await?;
        }
        transaction.commit().await?;
        info!(
            instance = instance_id,
            username,
            enabled = ?change.enabled,
            bandwidth_kbps = ?change.bandwidth_kbps,
            static_ip = ?change.static_ip,
            "account changed"
        );
        self.account(instance_id, username).await
    }

    /// Sets a new password, the one given or a generated one, and returns it.
    ///
    /// # Errors
    /// Fails with [`AdminError::Invalid`] for a password that breaks the rules.
    pub async fn reset_password(
        &self,
        instance_id: &str,
        username: &str,
        password: Option<&str>,
    ) -> Result<String, AdminError> {
        let password = match password {
            Some(password) => {
                validation::password(password)?;
                password.to_owned()
            }
            None => credentials::generate_password(),
        };
        if let Some(source) = crate::roaming::source_of(self, instance_id, username).await? {
            return Err(AdminError::Refused(format!(
                "account {username} of instance {instance_id} is a replica of the account on \
                 instance {source}; reset the password there, and every replica follows"
            )));
        }
        let hash = hash_off_runtime(&password).await?;
        let mut transaction = self.store.pool().begin().await?;
        let updated = sqlx::query(
            "UPDATE accounts SET password_hash = $1 WHERE instance_id = $2 AND username = $3",
        )
        .bind(&hash)
        .bind(instance_id)
        .bind(username)
        .execute(&mut *transaction)
        .await?
        .rows_affected();
        if updated == 0 {
            return Err(not_found("account", &format!("{instance_id}/{username}")));
        }
        // The same password logs in on every replica.
        sqlx::query(
            "UPDATE accounts SET password_hash = $1 WHERE replica_of = $2 AND username = $3",
        )
        .bind(&hash)
        .bind(instance_id)
        .bind(username)
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        info!(instance = instance_id, username, "account password reset");
        Ok(password)
    }

    /// Deletes an account and its replicas in other areas, unless one of them used data in
    /// the current calendar month.
    ///
    /// # Errors
    /// Fails with [`AdminError::Refused`] while the account or a replica has usage this month.
    pub async fn delete_account(
        &self,
        instance_id: &str,
        username: &str,
    ) -> Result<(), AdminError> {
        let month = month_of(self.clock.now());
        let mut transaction = self.store.pool().begin().await?;
        let mut doomed = vec![instance_id.to_owned()];
        let replicas =
            sqlx::query("SELECT instance_id FROM accounts WHERE replica_of = $1 AND username = $2")
                .bind(instance_id)
                .bind(username)
                .fetch_all(&mut *transaction)
                .await?;
        for row in replicas {
            doomed.push(row.try_get("instance_id")?);
        }
        for instance in &doomed {
            let used = sqlx::query(
                "SELECT rx_bytes, tx_bytes FROM usage WHERE instance_id = $1 AND username = $2 \
                 AND month = $3",
            )
            .bind(instance)
            .bind(username)
            .bind(&month)
            .fetch_optional(&mut *transaction)
            .await?;
            if let Some(row) = used {
                let bytes: i64 =
                    row.try_get::<i64, _>("rx_bytes")? + row.try_get::<i64, _>("tx_bytes")?;
                if bytes > 0 {
                    let whose = if instance == instance_id {
                        format!("account {username}")
                    } else {
                        format!("the replica of account {username} on instance {instance}")
                    };
                    return Err(AdminError::Refused(format!(
                        "{whose} used {bytes} bytes in {month}, the current billing cycle; \
                         disable it now (account disable) and delete it next month"
                    )));
                }
            }
        }
        for instance in &doomed {
            let deleted =
                sqlx::query("DELETE FROM accounts WHERE instance_id = $1 AND username = $2")
                    .bind(instance)
                    .bind(username)
                    .execute(&mut *transaction)
                    .await?
                    .rows_affected();
            if deleted == 0 {
                return Err(not_found("account", &format!("{instance}/{username}")));
            }
        }
        transaction.commit().await?;
        info!(instance = instance_id, username, replicas = doomed.len() - 1, "account deleted");
        Ok(())
    }
}

const INSTANCE_SELECT_ALL: &str = "SELECT id, owner, area, account_quota, trial, created_at, \
     expires_at, auto_renew, state, kernel_number FROM instances ORDER BY created_at, id";
const INSTANCE_SELECT_ONE: &str = "SELECT id, owner, area, account_quota, trial, created_at, \
     expires_at, auto_renew, state, kernel_number FROM instances WHERE id = $1";
const ACCOUNT_SELECT: &str = "SELECT instance_id, username, email, static_ip, bandwidth_kbps, \
     enabled, created_at FROM accounts";

/// Hashes a password on a blocking thread: argon2id takes tens of milliseconds of CPU, which
/// would stall other requests on the async runtime.
async fn hash_off_runtime(password: &str) -> Result<String, AdminError> {
    let password = password.to_owned();
    tokio::task::spawn_blocking(move || credentials::hash_password(&password))
        .await
        .map_err(|error| AdminError::Internal(format!("password hashing task failed: {error}")))?
        .map_err(AdminError::from)
}

/// Deletes an instance with its configuration and accounts inside `transaction`. The rows of
/// tunnels, sessions and traffic minutes follow through their foreign keys. Deletion by an
/// admin and release by the lifecycle both come here.
///
/// # Errors
/// Fails with [`AdminError::NotFound`] for an unknown ID.
pub(crate) async fn delete_instance_rows(
    transaction: &mut Transaction<'static, Any>,
    id: &str,
) -> Result<(), AdminError> {
    // Replicas on other instances stay, as accounts of their own: their instances are still
    // paid for, and without a source their password can be reset where they are.
    sqlx::query("UPDATE accounts SET replica_of = NULL WHERE replica_of = $1")
        .bind(id)
        .execute(&mut **transaction)
        .await?;
    for table in ["accounts", "cidr_blocks", "allowed_destinations", "usage"] {
        sqlx::query(&format!("DELETE FROM {table} WHERE instance_id = $1"))
            .bind(id)
            .execute(&mut **transaction)
            .await?;
    }
    let deleted = sqlx::query("DELETE FROM instances WHERE id = $1")
        .bind(id)
        .execute(&mut **transaction)
        .await?
        .rows_affected();
    if deleted == 0 {
        return Err(not_found("instance", id));
    }
    Ok(())
}

/// Reads one instance through `executor`: the pool, or a transaction that already has the
/// only SQLite connection.
pub(crate) async fn fetch_instance<'e, E>(executor: E, id: &str) -> Result<Instance, AdminError>
where
    E: sqlx::Executor<'e, Database = Any>,
{
    let row = sqlx::query(INSTANCE_SELECT_ONE)
        .bind(id)
        .fetch_optional(executor)
        .await?
        .ok_or_else(|| not_found("instance", id))?;
    instance_from_row(&row)
}

fn instance_from_row(row: &sqlx::any::AnyRow) -> Result<Instance, AdminError> {
    let area: String = row.try_get("area")?;
    Ok(Instance {
        id: row.try_get("id")?,
        owner: row.try_get("owner")?,
        zone: format!("{:?}", Zone::of_area(&area)),
        area,
        account_quota: to_u32(row.try_get("account_quota")?),
        trial: row.try_get::<i64, _>("trial")? != 0,
        created_at: parse_time(row.try_get("created_at")?),
        expires_at: parse_time(row.try_get("expires_at")?),
        auto_renew: row.try_get::<i64, _>("auto_renew")? != 0,
        state: row.try_get("state")?,
        kernel_number: to_u32(row.try_get("kernel_number")?),
    })
}

fn account_from_row(row: &sqlx::any::AnyRow) -> Result<Account, AdminError> {
    Ok(Account {
        instance_id: row.try_get("instance_id")?,
        username: row.try_get("username")?,
        email: row.try_get("email")?,
        static_ip: parse_address(row.try_get("static_ip")?),
        bandwidth_kbps: to_u32(row.try_get("bandwidth_kbps")?),
        enabled: row.try_get::<i64, _>("enabled")? != 0,
        created_at: parse_time(row.try_get("created_at")?),
    })
}

/// Checks the allowed destinations: valid blocks written with their network address, at most
/// as many as the kernel holds.
fn allowed_destinations(blocks: &[Ipv4Net]) -> Result<(), ValidationError> {
    let max = sag_common::policy::MAX_ALLOWED_DESTINATIONS;
    let listed = || blocks.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    if blocks.len() > max {
        return Err(ValidationError {
            field: "allowed_destinations",
            rule: format!("must be at most {max} blocks, not {}", blocks.len()),
            value: format!("{:?}", listed()),
        });
    }
    let repeated =
        blocks.iter().enumerate().find(|(index, block)| blocks[..*index].contains(block));
    if let Some((_, block)) = repeated {
        return Err(ValidationError {
            field: "allowed_destinations",
            rule: format!("{block} is listed twice"),
            value: format!("{:?}", listed()),
        });
    }
    if let Some(block) = blocks.iter().find(|block| block.network() != block.addr()) {
        return Err(ValidationError {
            field: "allowed_destinations",
            rule: format!("{block} has host bits set; write it as {}", block.trunc()),
            value: format!("{:?}", listed()),
        });
    }
    Ok(())
}

async fn blocks(
    connection: &mut sqlx::pool::PoolConnection<Any>,
    table: &'static str,
    instance_id: &str,
) -> Result<Vec<Ipv4Net>, AdminError> {
    let rows =
        sqlx::query(&format!("SELECT block FROM {table} WHERE instance_id = $1 ORDER BY block"))
            .bind(instance_id)
            .fetch_all(&mut **connection)
            .await?;
    Ok(rows.iter().filter_map(|row| row.try_get::<String, _>("block").ok()?.parse().ok()).collect())
}

/// Checks new client blocks of instance `id`: the block rules, no overlap with other
/// instances, and every static address of its accounts still inside them.
async fn check_client_blocks(
    transaction: &mut Transaction<'static, Any>,
    id: &str,
    new_blocks: &[Ipv4Net],
) -> Result<(), AdminError> {
    let others = other_instances_blocks(transaction, id).await?;
    validation::cidr_blocks(new_blocks, &others)?;
    let statics = sqlx::query(
        "SELECT username, static_ip FROM accounts WHERE instance_id = $1 AND static_ip IS NOT NULL",
    )
    .bind(id)
    .fetch_all(&mut **transaction)
    .await?;
    for row in statics {
        let username: String = row.try_get("username")?;
        let Some(address) = parse_address(row.try_get("static_ip")?) else {
            continue;
        };
        if !new_blocks.iter().any(|block| crate::pools::is_usable_host(block, address)) {
            let listed = new_blocks.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
            return Err(AdminError::Invalid(ValidationError {
                field: "cidr_blocks",
                rule: format!(
                    "must contain the static_ip {address} of account {username}; change that \
                     static_ip first"
                ),
                value: format!("{listed:?}"),
            }));
        }
    }
    Ok(())
}

/// Checks that no allowed destination of instance `id` overlaps its client blocks. The kernel
/// lets the client-to-client setting decide inside the client blocks, so an allowed
/// destination there would not mean what it is written to mean.
async fn check_allowed_outside_client_blocks(
    transaction: &mut Transaction<'static, Any>,
    id: &str,
) -> Result<(), AdminError> {
    let client_blocks = table_blocks(transaction, "cidr_blocks", id).await?;
    let allowed = table_blocks(transaction, "allowed_destinations", id).await?;
    for block in &allowed {
        if let Some(pool) = client_blocks.iter().find(|pool| validation::overlaps(pool, block)) {
            return Err(AdminError::Invalid(ValidationError {
                field: "allowed_destinations",
                rule: format!(
                    "{block} overlaps client block {pool}; traffic between clients is governed \
                     by client_to_client instead"
                ),
                value: format!("{block:?}"),
            }));
        }
    }
    Ok(())
}

async fn table_blocks(
    transaction: &mut Transaction<'static, Any>,
    table: &'static str,
    instance_id: &str,
) -> Result<Vec<Ipv4Net>, AdminError> {
    let rows =
        sqlx::query(&format!("SELECT block FROM {table} WHERE instance_id = $1 ORDER BY block"))
            .bind(instance_id)
            .fetch_all(&mut **transaction)
            .await?;
    Ok(rows.iter().filter_map(|row| row.try_get::<String, _>("block").ok()?.parse().ok()).collect())
}

async fn other_instances_blocks(
    transaction: &mut Transaction<'static, Any>,
    instance_id: &str,
) -> Result<Vec<(String, Ipv4Net)>, AdminError> {
    let rows = sqlx::query("SELECT instance_id, block FROM cidr_blocks WHERE instance_id <> $1")
        .bind(instance_id)
        .fetch_all(&mut **transaction)
        .await?;
    let mut others = Vec::new();
    for row in rows {
        let block: String = row.try_get("block")?;
        if let Ok(block) = block.parse() {
            others.push((row.try_get("instance_id")?, block));
        }
    }
    Ok(others)
}

async fn replace_blocks(
    transaction: &mut Transaction<'static, Any>,
    table: &'static str,
    instance_id: &str,
    new_blocks: &[Ipv4Net],
) -> Result<(), AdminError> {
    sqlx::query(&format!("DELETE FROM {table} WHERE instance_id = $1"))
        .bind(instance_id)
        .execute(&mut **transaction)
        .await?;
    for block in new_blocks {
        sqlx::query(&format!("INSERT INTO {table} (instance_id, block) VALUES ($1, $2)"))
            .bind(instance_id)
            .bind(block.to_string())
            .execute(&mut **transaction)
            .await?;
    }
    Ok(())
}

/// Returns the account of `instance_id` whose row in `table` has `address` in `column`.
async fn address_user(
    transaction: &mut Transaction<'static, Any>,
    table: &str,
    column: &str,
    instance_id: &str,
    address: Ipv4Addr,
) -> Result<Option<String>, AdminError> {
    let query = format!("SELECT username FROM {table} WHERE instance_id = $1 AND {column} = $2");
    let row = sqlx::query(&query)
        .bind(instance_id)
        .bind(address.to_string())
        .fetch_optional(&mut **transaction)
        .await?;
    Ok(row.map(|row| row.try_get::<String, _>("username")).transpose()?)
}

/// Checks a static address for an account of `instance_id`. `owner_username` is the account
/// that gets it, so its own current address does not count as taken.
async fn check_static_ip(
    transaction: &mut Transaction<'static, Any>,
    instance_id: &str,
    address: Ipv4Addr,
    owner_username: Option<&str>,
) -> Result<(), AdminError> {
    let rows = sqlx::query("SELECT block FROM cidr_blocks WHERE instance_id = $1 ORDER BY block")
        .bind(instance_id)
        .fetch_all(&mut **transaction)
        .await?;
    let instance_blocks: Vec<Ipv4Net> = rows
        .iter()
        .filter_map(|row| row.try_get::<String, _>("block").ok()?.parse().ok())
        .collect();
    let holder = address_user(transaction, "accounts", "static_ip", instance_id, address).await?;
    let taken = holder.is_some_and(|holder| Some(holder.as_str()) != owner_username);
    validation::static_ip(address, &instance_blocks, |_| taken)?;
    // A dynamic address in another account's session is taken too, because the kernel keys
    // clients by address: two accounts on one address would share counters and limits.
    let session = address_user(transaction, "sessions", "address", instance_id, address).await?;
    if let Some(user) = session.filter(|user| Some(user.as_str()) != owner_username) {
        return Err(ValidationError {
            field: "static_ip",
            rule: format!(
                "is in use by a session of account {user}; disconnect it or pick another address"
            ),
            value: address.to_string(),
        }
        .into());
    }
    Ok(())
}
