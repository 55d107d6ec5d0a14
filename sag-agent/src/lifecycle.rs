//! The lifecycle of instances. Admins renew, upgrade, renew with a new quota and set
//! auto-renew. The engine sends expiry, release and lock notices by email, stops and releases
//! expired instances, and locks the instances of owners with an overdue statement.
//!
//! The engine ([`Lifecycle::tick`]) decides everything from the store and the time it is
//! given, and records each decision in the store in one transaction before it acts. So it can
//! run at any time, any number of times, and after a restart it takes up where it stopped.
//! Lifecycle times are exact instants counted from the expiry time E. Expiry notices go out at
//! E − 14, 12 and 8 days, and the instance stops at E + 15 days. The release notice goes out
//! at E + 29 days, and the release follows at E + 30 days. The daemon runs the engine every
//! [`TICK_INTERVAL`], so each step happens within that interval of its instant.

use std::{collections::BTreeSet, sync::Arc};

use chrono::{DateTime, Duration, Months, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{Any, Row as _, Transaction};
use tracing::{info, warn};

use crate::{
    admin::{self, Admin, AdminError, Instance, STATE_LOCKED, STATE_RUNNING, STATE_STOPPED},
    billing::{self, account_fee_cents, format_usd, Billing, Charge, ChargeKind, Settlement},
    clock::Clock,
    gateway::Gateway,
    kernel::KernelSync,
    notify::{Email, Mailer},
    store::to_u32,
    validation::{ValidationError, Zone, MAX_ACCOUNT_QUOTA, MIN_ACCOUNT_QUOTA},
};

/// Days before the expiry time on which the owner gets an expiry notice.
pub const EXPIRY_NOTICE_DAYS: [i64; 3] = [14, 12, 8];
/// Days after the expiry time when an instance stops: its clients can no longer connect or
/// pass traffic.
pub const STOP_AFTER_EXPIRY_DAYS: i64 = 15;
/// Days after the stop when the owner gets the release notice.
pub const RELEASE_NOTICE_AFTER_STOP_DAYS: i64 = 14;
/// Days after the stop when an instance is released: its configuration and accounts are
/// deleted for good.
pub const RELEASE_AFTER_STOP_DAYS: i64 = 15;
/// Days before a statement falls overdue on which the owner gets the lock notice.
pub const LOCK_NOTICE_DAYS: i64 = 6;
/// An upgraded or renewed quota is a multiple of this many accounts.
pub const QUOTA_STEP: u32 = 5;
/// Months that auto-renew adds each time an instance reaches its expiry time.
pub const AUTO_RENEW_MONTHS: u32 = 1;
/// How often the daemon runs the engine.
pub const TICK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);
/// Minutes between two attempts to send a notice that failed.
pub const NOTICE_RETRY_MINUTES: i64 = 15;

/// Notice states in the store.
const NOTICE_SENDING: &str = "sending";
const NOTICE_SENT: &str = "sent";
const NOTICE_FAILED: &str = "failed";

/// Returns when an instance that expires at `expires_at` stops.
pub fn stop_at(expires_at: DateTime<Utc>) -> DateTime<Utc> {
    expires_at + Duration::days(STOP_AFTER_EXPIRY_DAYS)
}

/// Returns when an instance that expires at `expires_at` is released.
pub fn release_at(expires_at: DateTime<Utc>) -> DateTime<Utc> {
    stop_at(expires_at) + Duration::days(RELEASE_AFTER_STOP_DAYS)
}

/// Returns the state an instance should be in at `now`: stopped from its stop time on, locked
/// while its owner has an overdue statement, and running otherwise.
pub fn desired_state(instance: &Instance, owner_overdue: bool, now: DateTime<Utc>) -> &'static str {
    if now >= stop_at(instance.expires_at) {
        STATE_STOPPED
    } else if owner_overdue {
        STATE_LOCKED
    } else {
        STATE_RUNNING
    }
}

/// Returns the whole months from `now` to `expires_at`, a started month counting as a whole
/// one: the smallest number of months that, added to `now`, reaches `expires_at`.
pub fn remaining_months(now: DateTime<Utc>, expires_at: DateTime<Utc>) -> u32 {
    let mut months = 0;
    while months < 1_200 {
        match now.checked_add_months(Months::new(months)) {
            Some(time) if time < expires_at => months += 1,
            _ => break,
        }
    }
    months
}

/// Checks a quota of an upgrade or a renewal: a multiple of [`QUOTA_STEP`] within the
/// instance limits.
///
/// # Errors
/// Fails with a message that names the field, the rule and the value.
pub fn quota_step(value: u32) -> Result<(), ValidationError> {
    if !(MIN_ACCOUNT_QUOTA..=MAX_ACCOUNT_QUOTA).contains(&value)
        || !value.is_multiple_of(QUOTA_STEP)
    {
        return Err(ValidationError {
            field: "quota",
            rule: format!(
                "must be a multiple of {QUOTA_STEP} from {MIN_ACCOUNT_QUOTA} to \
                 {MAX_ACCOUNT_QUOTA} accounts"
            ),
            value: value.to_string(),
        });
    }
    Ok(())
}

/// Body of `POST /instances/{id}/renew`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RenewRequest {
    /// Months to add.
    pub months: u32,
    /// The quota of the renewed period, from its start; without it the quota stays.
    pub quota: Option<u32>,
}

/// Body of `POST /instances/{id}/upgrade`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpgradeRequest {
    pub quota: u32,
}

/// Body of `PUT /instances/{id}/auto-renew`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AutoRenewRequest {
    pub enabled: bool,
}

/// Body of `PUT /instances/{id}/expiry`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExpiryRequest {
    pub expires_at: DateTime<Utc>,
}

/// A quota that takes effect when a renewed period starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaChange {
    pub instance_id: String,
    pub account_quota: u32,
    pub effective_at: DateTime<Utc>,
}

/// Reply of a renewal, an upgrade or another change of an instance's subscription.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderReply {
    pub instance: Instance,
    /// Charge of the order, if it costs anything.
    pub charge: Option<Charge>,
    /// A quota waiting for the renewed period.
    pub quota_change: Option<QuotaChange>,
}

/// A change of an instance's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub instance_id: String,
    pub owner: String,
    pub from: String,
    /// `running`, `stopped`, `locked` or `released`.
    pub to: String,
}

/// A notice that the engine tried to send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoticeReport {
    /// `expiry_14d`, `expiry_12d`, `expiry_8d`, `release` or `lock`.
    pub kind: String,
    /// The instance ID, or `MONTH OWNER` for a statement.
    pub subject: String,
    /// The owner's address, if one is set.
    pub to: Option<String>,
    pub email_subject: String,
    pub sent: bool,
    pub error: Option<String>,
}

/// Outcome of one run of the engine.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TickReport {
    pub at: DateTime<Utc>,
    /// Renewals made by auto-renew.
    pub renewals: Vec<Charge>,
    /// Quotas of renewed periods that took effect.
    pub quota_changes: Vec<QuotaChange>,
    pub settlement: Settlement,
    pub transitions: Vec<Transition>,
    pub notices: Vec<NoticeReport>,
    /// Failures of single instances or notices; the run went on with the others.
    pub errors: Vec<String>,
}

impl TickReport {
    /// Returns whether the run changed nothing and sent nothing.
    pub fn is_empty(&self) -> bool {
        self.renewals.is_empty()
            && self.quota_changes.is_empty()
            && self.settlement.days.is_empty()
            && self.settlement.statements.is_empty()
            && self.transitions.is_empty()
            && self.notices.is_empty()
            && self.errors.is_empty()
    }
}

/// The kernel and the tunnels, which follow the states that the engine decides.
#[derive(Clone)]
pub struct Enforcement {
    pub kernel: Arc<KernelSync>,
    pub gateway: Arc<Gateway>,
}

/// A notice to send once.
struct Notice {
    kind: String,
    subject: String,
    due_at: DateTime<Utc>,
    owner: String,
    email_subject: String,
    body: String,
}

/// The lifecycle engine and the subscription orders.
pub struct Lifecycle {
    admin: Admin,
    billing: Billing,
    mailer: Arc<Mailer>,
    clock: Arc<dyn Clock>,
    enforcement: Option<Enforcement>,
    /// Held by each run, so that two runs never decide the same step at once.
    running: tokio::sync::Mutex<()>,
    /// Instances whose state is saved but did not reach the kernel, retried at each run.
    kernel_pending: std::sync::Mutex<BTreeSet<String>>,
}

impl Lifecycle {
    /// Creates the engine over `admin`'s store. Without [`Lifecycle::with_enforcement`] it
    /// changes states in the store only.
    pub fn new(admin: Admin, billing: Billing, mailer: Arc<Mailer>, clock: Arc<dyn Clock>) -> Self {
        Self {
            admin,
            billing,
            mailer,
            clock,
            enforcement: None,
            running: Default::default(),
            kernel_pending: Default::default(),
        }
    }

    /// Makes the kernel and the tunnels follow each state change.
    pub fn with_enforcement(mut self, enforcement: Enforcement) -> Self {
        self.enforcement = Some(enforcement);
        self
    }

    /// Returns the current time of the engine's clock.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// Runs the engine every [`TICK_INTERVAL`] at the clock's time, forever.
    pub async fn run(self: Arc<Self>) {
        loop {
            if let Err(error) = self.tick(self.clock.now()).await {
                warn!(error = %error, "lifecycle run failed; the next run tries again");
            }
            tokio::time::sleep(TICK_INTERVAL).await;
        }
    }

    /// Runs every step that is due at `now`: auto-renewals, quotas of renewed periods, data
    /// settlement and statements, state changes, then notices. A step that is already done
    /// is not done again.
    ///
    /// # Errors
    /// Fails if the store fails. A failure of one instance or notice is in the report, and the
    /// run goes on with the others.
    pub async fn tick(&self, now: DateTime<Utc>) -> Result<TickReport, AdminError> {
        let _running = self.running.lock().await;
        let mut report = TickReport { at: now, ..TickReport::default() };
        self.apply_quota_changes(now, &mut report).await?;
        self.auto_renew(now, &mut report).await?;
        report.settlement = self.billing.settle(now).await?;
        self.change_states(now, &mut report).await?;
        self.send_notices(now, &mut report).await?;
        if !report.is_empty() {
            info!(
                at = %now,
                renewals = report.renewals.len(),
                settled_days = report.settlement.days.len(),
                statements = report.settlement.statements.len(),
                transitions = report.transitions.len(),
                notices = report.notices.len(),
                errors = report.errors.len(),
                "lifecycle run"
            );
        }
        Ok(report)
    }

    /// Renews an instance by `request.months`, from its expiry time. With a quota, that quota
    /// applies from the start of the renewed period: at once if the instance has already
    /// expired, otherwise at its current expiry time. The renewal is charged at the fee of the
    /// quota of the renewed period.
    ///
    /// # Errors
    /// Fails with [`AdminError::Invalid`] for a bad period or quota, with
    /// [`AdminError::Conflict`] for a quota below the accounts in use or while another quota
    /// change waits, and with [`AdminError::Refused`] for a free trial. Nothing is written
    /// then.
    pub async fn renew(&self, id: &str, request: &RenewRequest) -> Result<OrderReply, AdminError> {
        admin::months(request.months)?;
        if let Some(quota) = request.quota {
            quota_step(quota)?;
        }
        let now = self.clock.now();

        let mut transaction = self.admin.store().pool().begin().await?;
        let instance = admin::fetch_instance(&mut *transaction, id).await?;
        reject_trial(&instance, "renewed")?;
        let pending = quota_change(&mut transaction, id).await?;
        if let Some(quota) = request.quota {
            if let Some(pending) = &pending {
                return Err(AdminError::Conflict(format!(
                    "instance {id} already has a quota of {} waiting for {}; renew without \
                     --quota, or wait until that quota takes effect",
                    pending.account_quota,
                    pending.effective_at.to_rfc3339()
                )));
            }
            let in_use = accounts_in_use(&mut transaction, id).await?;
            if quota < in_use {
                let least = in_use.div_ceil(QUOTA_STEP) * QUOTA_STEP;
                return Err(AdminError::Conflict(format!(
                    "quota {quota} is below the {in_use} accounts in use on instance {id}; \
                     choose at least {least} or delete accounts first"
                )));
            }
        }

        let starts_at = instance.expires_at;
        let expires_at = starts_at
            .checked_add_months(Months::new(request.months))
            .ok_or_else(|| AdminError::Internal(format!("expiry of {id} out of range")))?;
        let period_quota = request
            .quota
            .or(pending.as_ref().map(|pending| pending.account_quota))
            .unwrap_or(instance.account_quota);
        sqlx::query("UPDATE instances SET expires_at = $1 WHERE id = $2")
            .bind(expires_at.timestamp())
            .bind(id)
            .execute(&mut *transaction)
            .await?;
        let mut waiting = None;
        if let Some(quota) = request.quota {
            if starts_at <= now {
                set_quota(&mut transaction, id, quota).await?;
            } else {
                let change = QuotaChange {
                    instance_id: id.to_owned(),
                    account_quota: quota,
                    effective_at: starts_at,
                };
                sqlx::query(
                    "INSERT INTO quota_changes (instance_id, account_quota, effective_at, \
                     ordered_at) VALUES ($1, $2, $3, $4)",
                )
                .bind(id)
                .bind(i64::from(quota))
                .bind(starts_at.timestamp())
                .bind(now.timestamp())
                .execute(&mut *transaction)
                .await?;
                waiting = Some(change);
            }
        }

        let zone = Zone::of_area(&instance.area);
        let amount = account_fee_cents(period_quota, zone) * i64::from(request.months);
        let description = format!(
            "renewal: {period_quota} accounts for {} month(s) from {}",
            request.months,
            starts_at.format("%Y-%m-%d")
        );
        let charge =
            Charge::order(&instance, ChargeKind::Renewal, description, request.months, amount, now);
        billing::insert_charge(&mut transaction, &charge).await?;
        transaction.commit().await?;

        info!(
            instance = id,
            months = request.months,
            quota = period_quota,
            expires_at = %expires_at,
            amount = %format_usd(amount),
            "instance renewed"
        );
        let instance = self.admin.instance(id).await?;
        Ok(OrderReply { instance, charge: Some(charge), quota_change: waiting })
    }

    /// Raises an instance's quota now, charging the difference of the monthly fees for each
    /// month left until its expiry time (a started month counts as a whole one).
    ///
    /// # Errors
    /// Fails with [`AdminError::Invalid`] for a quota that is not a multiple of
    /// [`QUOTA_STEP`], out of range or not above the current one, and with
    /// [`AdminError::Refused`] for a free trial or an expired instance.
    pub async fn upgrade(
        &self,
        id: &str,
        request: &UpgradeRequest,
    ) -> Result<OrderReply, AdminError> {
        quota_step(request.quota)?;
        let now = self.clock.now();

        let mut transaction = self.admin.store().pool().begin().await?;
        let instance = admin::fetch_instance(&mut *transaction, id).await?;
        reject_trial(&instance, "upgraded")?;
        if request.quota <= instance.account_quota {
            return Err(ValidationError {
                field: "quota",
                rule: format!(
                    "must be above the current quota of {}; an upgrade only raises it, and a \
                     renewal with a quota (instance modify) lowers it",
                    instance.account_quota
                ),
                value: request.quota.to_string(),
            }
            .into());
        }
        if instance.expires_at <= now {
            return Err(AdminError::Refused(format!(
                "instance {id} expired on {}; renew it before upgrading",
                instance.expires_at.to_rfc3339()
            )));
        }

        let months = remaining_months(now, instance.expires_at);
        let zone = Zone::of_area(&instance.area);
        let monthly = account_fee_cents(request.quota, zone)
            - account_fee_cents(instance.account_quota, zone);
        let amount = monthly * i64::from(months);
        set_quota(&mut transaction, id, request.quota).await?;
        let description = format!(
            "upgrade from {} to {} accounts for {months} remaining month(s)",
            instance.account_quota, request.quota
        );
        let charge =
            Charge::order(&instance, ChargeKind::Upgrade, description, months, amount, now);
        billing::insert_charge(&mut transaction, &charge).await?;
        transaction.commit().await?;

        info!(
            instance = id,
            from = instance.account_quota,
            to = request.quota,
            amount = %format_usd(amount),
            "instance upgraded"
        );
        let instance = self.admin.instance(id).await?;
        let quota_change = self.quota_change(id).await?;
        Ok(OrderReply { instance, charge: Some(charge), quota_change })
    }

    /// Turns auto-renew on or off. With it on, an instance that reaches its expiry time is
    /// renewed for [`AUTO_RENEW_MONTHS`] and charged.
    ///
    /// # Errors
    /// Fails with [`AdminError::Refused`] for a free trial.
    pub async fn set_auto_renew(&self, id: &str, enabled: bool) -> Result<OrderReply, AdminError> {
        let mut transaction = self.admin.store().pool().begin().await?;
        let instance = admin::fetch_instance(&mut *transaction, id).await?;
        reject_trial(&instance, "renewed")?;
        sqlx::query("UPDATE instances SET auto_renew = $1 WHERE id = $2")
            .bind(i64::from(enabled))
            .bind(id)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        info!(instance = id, enabled, "auto-renew set");
        let instance = self.admin.instance(id).await?;
        let quota_change = self.quota_change(id).await?;
        Ok(OrderReply { instance, charge: None, quota_change })
    }

    /// Sets an instance's expiry time without charging anything: a correction for instances
    /// imported with their expiry, and for drills of the lifecycle on a real box.
    ///
    /// # Errors
    /// Fails with [`AdminError::NotFound`] for an unknown instance.
    pub async fn set_expiry(
        &self,
        id: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<OrderReply, AdminError> {
        let updated = sqlx::query("UPDATE instances SET expires_at = $1 WHERE id = $2")
            .bind(expires_at.timestamp())
            .bind(id)
            .execute(self.admin.store().pool())
            .await?
            .rows_affected();
        if updated == 0 {
            return Err(AdminError::NotFound { what: "instance", id: id.to_owned() });
        }
        warn!(instance = id, expires_at = %expires_at, "expiry set by hand, without a charge");
        let instance = self.admin.instance(id).await?;
        let quota_change = self.quota_change(id).await?;
        Ok(OrderReply { instance, charge: None, quota_change })
    }

    /// Returns the quota waiting for an instance's renewed period, if any.
    ///
    /// # Errors
    /// Fails if the store fails.
    pub async fn quota_change(&self, id: &str) -> Result<Option<QuotaChange>, AdminError> {
        let mut transaction = self.admin.store().pool().begin().await?;
        let change = quota_change(&mut transaction, id).await?;
        transaction.commit().await?;
        Ok(change)
    }

    async fn apply_quota_changes(
        &self,
        now: DateTime<Utc>,
        report: &mut TickReport,
    ) -> Result<(), AdminError> {
        let mut transaction = self.admin.store().pool().begin().await?;
        let rows = sqlx::query(
            "SELECT instance_id, account_quota, effective_at FROM quota_changes \
             WHERE effective_at <= $1",
        )
        .bind(now.timestamp())
        .fetch_all(&mut *transaction)
        .await?;
        for row in rows {
            let change = QuotaChange {
                instance_id: row.try_get("instance_id")?,
                account_quota: to_u32(row.try_get("account_quota")?),
                effective_at: parse_time(row.try_get("effective_at")?),
            };
            // NOTE: account creation checks only the current quota, so accounts created after
            // the order may outnumber this quota. They keep working, and no new account fits
            // until enough are deleted.
            set_quota(&mut transaction, &change.instance_id, change.account_quota).await?;
            sqlx::query("DELETE FROM quota_changes WHERE instance_id = $1")
                .bind(&change.instance_id)
                .execute(&mut *transaction)
                .await?;
            info!(
                instance = %change.instance_id,
                quota = change.account_quota,
                "quota of the renewed period took effect"
            );
            report.quota_changes.push(change);
        }
        transaction.commit().await?;
        Ok(())
    }

    async fn auto_renew(
        &self,
        now: DateTime<Utc>,
        report: &mut TickReport,
    ) -> Result<(), AdminError> {
        for listed in self.admin.list_instances().await? {
            if !listed.auto_renew || listed.trial || listed.expires_at > now {
                continue;
            }
            let mut transaction = self.admin.store().pool().begin().await?;
            let instance = admin::fetch_instance(&mut *transaction, &listed.id).await?;
            if !instance.auto_renew || instance.expires_at > now {
                continue;
            }
            // An agent that was down past several expiry times renews once for all of them.
            let mut expires_at = instance.expires_at;
            let mut months = 0;
            while expires_at <= now && months < admin::MAX_SUBSCRIPTION_MONTHS {
                expires_at = expires_at
                    .checked_add_months(Months::new(AUTO_RENEW_MONTHS))
                    .unwrap_or(expires_at);
                months += AUTO_RENEW_MONTHS;
            }
            sqlx::query("UPDATE instances SET expires_at = $1 WHERE id = $2")
                .bind(expires_at.timestamp())
                .bind(&instance.id)
                .execute(&mut *transaction)
                .await?;
            let zone = Zone::of_area(&instance.area);
            let amount = account_fee_cents(instance.account_quota, zone) * i64::from(months);
            let description = format!(
                "auto-renewal: {} accounts for {months} month(s) from {}",
                instance.account_quota,
                instance.expires_at.format("%Y-%m-%d")
            );
            let charge =
                Charge::order(&instance, ChargeKind::Renewal, description, months, amount, now);
            billing::insert_charge(&mut transaction, &charge).await?;
            transaction.commit().await?;
            info!(instance = %instance.id, months, expires_at = %expires_at, "instance auto-renewed");
            report.renewals.push(charge);
        }
        Ok(())
    }

    async fn change_states(
        &self,
        now: DateTime<Utc>,
        report: &mut TickReport,
    ) -> Result<(), AdminError> {
        let overdue = self.billing.overdue_owners(now).await?;
        for instance in self.admin.list_instances().await? {
            let result = if now >= release_at(instance.expires_at) {
                self.release(&instance.id, now, report).await
            } else {
                self.set_state(&instance.id, &overdue, now, report).await
            };
            if let Err(error) = result {
                warn!(instance = %instance.id, error = %error, "lifecycle step failed");
                report.errors.push(format!("instance {}: {error}", instance.id));
            }
        }
        Ok(())
    }

    /// Puts an instance in the state it should be in at `now`, in the store and then in the
    /// kernel, which drops every packet of its clients from the next one on while it is not
    /// running.
    async fn set_state(
        &self,
        id: &str,
        overdue: &BTreeSet<String>,
        now: DateTime<Utc>,
        report: &mut TickReport,
    ) -> Result<(), AdminError> {
        let mut transaction = self.admin.store().pool().begin().await?;
        let instance = admin::fetch_instance(&mut *transaction, id).await?;
        let desired = desired_state(&instance, overdue.contains(&instance.owner), now);
        if instance.state == desired {
            drop(transaction);
            if self.pending_kernel().contains(id) {
                self.apply_kernel_state(&instance).await?;
            }
            return Ok(());
        }
        sqlx::query("UPDATE instances SET state = $1 WHERE id = $2")
            .bind(desired)
            .bind(id)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        info!(instance = id, owner = %instance.owner, from = %instance.state, to = desired, "instance state changed");
        report.transitions.push(Transition {
            instance_id: id.to_owned(),
            owner: instance.owner.clone(),
            from: instance.state.clone(),
            to: desired.to_owned(),
        });
        let changed = Instance { state: desired.to_owned(), ..instance };
        self.apply_kernel_state(&changed).await
    }

    fn pending_kernel(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.kernel_pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Writes an instance's saved state to the kernel. On failure the instance is kept for the
    /// next run to retry, since the store already has the state and would not change again.
    async fn apply_kernel_state(&self, instance: &Instance) -> Result<(), AdminError> {
        let Some(enforcement) = &self.enforcement else {
            return Ok(());
        };
        let applied = match self.admin.network(&instance.id).await {
            Ok(network) => enforcement
                .kernel
                .apply_instance(instance, &network)
                .map_err(|error| format!("{:#}", anyhow::Error::from(error))),
            Err(error) => Err(error.to_string()),
        };
        let mut pending = self.pending_kernel();
        match applied {
            Ok(()) => {
                pending.remove(&instance.id);
                Ok(())
            }
            Err(error) => {
                pending.insert(instance.id.clone());
                Err(AdminError::Internal(format!(
                    "the state {} is saved but the kernel did not apply it, and the next \
                     lifecycle run retries: {error}",
                    instance.state
                )))
            }
        }
    }

    /// Deletes an instance whose release time has come, with its configuration and accounts,
    /// in one transaction, then takes its tunnel down and removes it from the kernel. Its
    /// usage and charges stay for billing.
    async fn release(
        &self,
        id: &str,
        now: DateTime<Utc>,
        report: &mut TickReport,
    ) -> Result<(), AdminError> {
        let mut transaction = self.admin.store().pool().begin().await?;
        let instance = admin::fetch_instance(&mut *transaction, id).await?;
        if now < release_at(instance.expires_at) {
            return Ok(());
        }
        admin::delete_instance_rows(&mut transaction, id).await?;
        sqlx::query("INSERT INTO released_instances (id, owner, released_at) VALUES ($1, $2, $3)")
            .bind(id)
            .bind(&instance.owner)
            .bind(now.timestamp())
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        info!(instance = id, owner = %instance.owner, "instance released: configuration and accounts deleted");
        report.transitions.push(Transition {
            instance_id: id.to_owned(),
            owner: instance.owner.clone(),
            from: instance.state.clone(),
            to: "released".to_owned(),
        });
        if let Some(enforcement) = &self.enforcement {
            enforcement.gateway.remove_instance(&instance).await.map_err(|error| {
                AdminError::Internal(format!(
                    "released, but the tunnel did not come down: {:#}",
                    anyhow::Error::from(error)
                ))
            })?;
            enforcement.kernel.remove_instance(&instance).map_err(|error| {
                AdminError::Internal(format!(
                    "released, but the kernel still has its clients: {:#}",
                    anyhow::Error::from(error)
                ))
            })?;
        }
        Ok(())
    }

    async fn send_notices(
        &self,
        now: DateTime<Utc>,
        report: &mut TickReport,
    ) -> Result<(), AdminError> {
        let instances = self.admin.list_instances().await?;
        let mut notices: Vec<Notice> =
            instances.iter().filter_map(|instance| instance_notice(instance, now)).collect();
        for statement in self.billing.statements(None, now).await? {
            let owned: Vec<&Instance> =
                instances.iter().filter(|instance| instance.owner == statement.owner).collect();
            notices.extend(lock_notice(&statement, &owned, now));
        }
        if notices.is_empty() {
            return Ok(());
        }
        let contacts = self.billing.contacts().await?;
        for notice in notices {
            let recipient = contacts.get(&notice.owner).cloned();
            if let Some(sent) = self.send_once(&notice, recipient, now).await? {
                if let Some(error) = &sent.error {
                    report
                        .errors
                        .push(format!("notice {} of {}: {error}", sent.kind, sent.subject));
                }
                report.notices.push(sent);
            }
        }
        Ok(())
    }

    /// Sends a notice unless the store shows it sent, and returns what happened, or `None` if
    /// there was nothing to do.
    ///
    /// The notice is claimed first: a row in state `sending`, committed before the email goes
    /// out. Then it is marked `sent`, or `failed` to be tried again after
    /// [`NOTICE_RETRY_MINUTES`] while it is still current. A crash between the email and the
    /// mark leaves the row `sending`, and the next run sends it again. So each notice goes out
    /// at least once, and twice only if the agent stops in that window of one store write.
    /// Sending again is the safer side, because a lost lock or release warning costs the owner
    /// more than a second copy.
    async fn send_once(
        &self,
        notice: &Notice,
        recipient: Option<String>,
        now: DateTime<Utc>,
    ) -> Result<Option<NoticeReport>, AdminError> {
        let mut transaction = self.admin.store().pool().begin().await?;
        let row = sqlx::query(
            "SELECT state, last_attempt_at FROM notices \
             WHERE kind = $1 AND subject = $2 AND due_at = $3",
        )
        .bind(&notice.kind)
        .bind(&notice.subject)
        .bind(notice.due_at.timestamp())
        .fetch_optional(&mut *transaction)
        .await?;
        match row {
            None => {
                sqlx::query(
                    "INSERT INTO notices (kind, subject, due_at, owner, recipient, \
                     email_subject, state, attempts, last_attempt_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, 1, $8)",
                )
                .bind(&notice.kind)
                .bind(&notice.subject)
                .bind(notice.due_at.timestamp())
                .bind(&notice.owner)
                .bind(recipient.clone())
                .bind(&notice.email_subject)
                .bind(NOTICE_SENDING)
                .bind(now.timestamp())
                .execute(&mut *transaction)
                .await?;
            }
            Some(row) => {
                let state: String = row.try_get("state")?;
                let last_attempt = parse_time(row.try_get("last_attempt_at")?);
                let retry_at = last_attempt + Duration::minutes(NOTICE_RETRY_MINUTES);
                if state == NOTICE_SENT || (state == NOTICE_FAILED && now < retry_at) {
                    return Ok(None);
                }
                if state == NOTICE_SENDING {
                    warn!(
                        kind = %notice.kind,
                        subject = %notice.subject,
                        "a notice was claimed but not marked sent, probably by a run that \
                         crashed; sending it again"
                    );
                }
                sqlx::query(
                    "UPDATE notices SET state = $1, attempts = attempts + 1, \
                     last_attempt_at = $2, recipient = $3 \
                     WHERE kind = $4 AND subject = $5 AND due_at = $6",
                )
                .bind(NOTICE_SENDING)
                .bind(now.timestamp())
                .bind(recipient.clone())
                .bind(&notice.kind)
                .bind(&notice.subject)
                .bind(notice.due_at.timestamp())
                .execute(&mut *transaction)
                .await?;
            }
        }
        transaction.commit().await?;

        let outcome = match &recipient {
            Some(to) => {
                let email = Email {
                    to: to.clone(),
                    subject: notice.email_subject.clone(),
                    body: notice.body.clone(),
                };
                self.mailer.send(&email).await.map(|_| ()).map_err(|error| error.to_string())
            }
            None => Err(format!(
                "owner {:?} has no contact address; set one with `sag-agent billing contact \
                 --owner {:?} --email ADDRESS`",
                notice.owner, notice.owner
            )),
        };
        let (state, error) = match &outcome {
            Ok(()) => (NOTICE_SENT, None),
            Err(error) => (NOTICE_FAILED, Some(error.clone())),
        };
        sqlx::query(
            "UPDATE notices SET state = $1, sent_at = $2, error = $3 \
             WHERE kind = $4 AND subject = $5 AND due_at = $6",
        )
        .bind(state)
        .bind(outcome.is_ok().then_some(now.timestamp()))
        .bind(error.clone())
        .bind(&notice.kind)
        .bind(&notice.subject)
        .bind(notice.due_at.timestamp())
        .execute(self.admin.store().pool())
        .await?;
        match &error {
            None => {
                info!(kind = %notice.kind, subject = %notice.subject, to = ?recipient, "notice sent")
            }
            Some(error) => warn!(
                kind = %notice.kind,
                subject = %notice.subject,
                error = %error,
                "notice not sent; it is tried again in {NOTICE_RETRY_MINUTES} minutes while it \
                 is current"
            ),
        }
        Ok(Some(NoticeReport {
            kind: notice.kind.clone(),
            subject: notice.subject.clone(),
            to: recipient,
            email_subject: notice.email_subject.clone(),
            sent: outcome.is_ok(),
            error,
        }))
    }
}

fn parse_time(seconds: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(seconds, 0).unwrap_or_default()
}

fn reject_trial(instance: &Instance, action: &str) -> Result<(), AdminError> {
    if instance.trial {
        return Err(AdminError::Refused(format!(
            "instance {} is a free trial, which cannot be {action}; create a paid instance \
             instead",
            instance.id
        )));
    }
    Ok(())
}

async fn set_quota(
    transaction: &mut Transaction<'static, Any>,
    id: &str,
    quota: u32,
) -> Result<(), AdminError> {
    sqlx::query("UPDATE instances SET account_quota = $1 WHERE id = $2")
        .bind(i64::from(quota))
        .bind(id)
        .execute(&mut **transaction)
        .await?;
    Ok(())
}

async fn quota_change(
    transaction: &mut Transaction<'static, Any>,
    id: &str,
) -> Result<Option<QuotaChange>, AdminError> {
    let row =
        sqlx::query("SELECT account_quota, effective_at FROM quota_changes WHERE instance_id = $1")
            .bind(id)
            .fetch_optional(&mut **transaction)
            .await?;
    row.map(|row| {
        Ok(QuotaChange {
            instance_id: id.to_owned(),
            account_quota: to_u32(row.try_get("account_quota")?),
            effective_at: parse_time(row.try_get("effective_at")?),
        })
    })
    .transpose()
}

async fn accounts_in_use(
    transaction: &mut Transaction<'static, Any>,
    id: &str,
) -> Result<u32, AdminError> {
    let count: i64 = sqlx::query("SELECT COUNT(*) AS count FROM accounts WHERE instance_id = $1")
        .bind(id)
        .fetch_one(&mut **transaction)
        .await?
        .try_get("count")?;
    Ok(to_u32(count))
}

fn utc_minutes(time: DateTime<Utc>) -> String {
    time.format("%Y-%m-%d %H:%M UTC").to_string()
}

/// Returns the notice an instance is due at `now`, if any. Before the expiry time it is the
/// latest expiry notice whose time has come, so an agent that was down sends only the most
/// recent one. After the stop it is the release notice, until the release.
fn instance_notice(instance: &Instance, now: DateTime<Utc>) -> Option<Notice> {
    let expires_at = instance.expires_at;
    let expiry = EXPIRY_NOTICE_DAYS
        .iter()
        .map(|days| (*days, expires_at - Duration::days(*days)))
        .filter(|(_, due_at)| *due_at <= now && now < expires_at)
        .max_by_key(|(_, due_at)| *due_at);
    if let Some((days, due_at)) = expiry {
        return Some(expiry_notice(instance, days, due_at));
    }
    let release_notice_at = stop_at(expires_at) + Duration::days(RELEASE_NOTICE_AFTER_STOP_DAYS);
    if release_notice_at <= now && now < release_at(expires_at) {
        return Some(release_notice(instance, release_notice_at));
    }
    None
}

fn expiry_notice(instance: &Instance, days: i64, due_at: DateTime<Utc>) -> Notice {
    let id = &instance.id;
    let expires_at = instance.expires_at;
    let next_step = if instance.auto_renew {
        format!(
            "Auto-renew is on: on that day the instance is renewed for\n\
             {AUTO_RENEW_MONTHS} month(s), and the renewal is billed to {:?}.\n",
            instance.owner
        )
    } else {
        format!(
            "To keep it running, renew it:\n\n   sag-agent instance renew {id} --months N\n\n\
             If it is not renewed, its clients can no longer connect or pass\n\
             traffic from {} on, and its configuration and\n\
             accounts are deleted for good on {}.\n",
            utc_minutes(stop_at(expires_at)),
            utc_minutes(release_at(expires_at))
        )
    };
    Notice {
        kind: format!("expiry_{days}d"),
        subject: id.clone(),
        due_at,
        owner: instance.owner.clone(),
        email_subject: format!("sag instance {id} expires on {}", expires_at.format("%Y-%m-%d")),
        body: format!(
            "Instance {id} of {:?} in {}\nexpires on {}, in {days} days.\n\n{next_step}",
            instance.owner,
            instance.area,
            utc_minutes(expires_at)
        ),
    }
}

fn release_notice(instance: &Instance, due_at: DateTime<Utc>) -> Notice {
    let id = &instance.id;
    let released = release_at(instance.expires_at);
    Notice {
        kind: "release".to_owned(),
        subject: id.clone(),
        due_at,
        owner: instance.owner.clone(),
        email_subject: format!(
            "sag instance {id} will be released on {}",
            released.format("%Y-%m-%d")
        ),
        body: format!(
            "Instance {id} of {:?} in {}\nexpired on {} and has been stopped since {}.\n\n\
             On {} it will be released: its configuration and\n\
             accounts are deleted for good. To keep it, renew it before then:\n\n   \
             sag-agent instance renew {id} --months N\n",
            instance.owner,
            instance.area,
            utc_minutes(instance.expires_at),
            utc_minutes(stop_at(instance.expires_at)),
            utc_minutes(released)
        ),
    }
}

/// Returns the lock notice of an unpaid statement from [`LOCK_NOTICE_DAYS`] before it falls
/// overdue until it does.
fn lock_notice(
    statement: &billing::Statement,
    instances: &[&Instance],
    now: DateTime<Utc>,
) -> Option<Notice> {
    let due_at = statement.overdue_at - Duration::days(LOCK_NOTICE_DAYS);
    if statement.balance_cents <= 0 || now < due_at || now >= statement.overdue_at {
        return None;
    }
    let listed: Vec<String> = instances
        .iter()
        .map(|instance| format!("   {} in {}", instance.id, instance.area))
        .collect();
    let balance = format_usd(statement.balance_cents);
    Some(Notice {
        kind: "lock".to_owned(),
        subject: format!("{} {}", statement.month, statement.owner),
        due_at,
        owner: statement.owner.clone(),
        email_subject: format!(
            "sag statement {} of {}: pay {balance} USD by {} to avoid a lock",
            statement.month, statement.owner, statement.due_date
        ),
        body: format!(
            "The {} statement of {:?} has {balance} USD unpaid of {} USD,\n\
             due on {}.\n\n\
             If it is not paid in full by then, these instances are locked from\n\
             {} until it is paid:\n\n{}\n\nRecord a payment with:\n\n   \
             sag-agent billing pay --owner {:?} --month {} --amount {balance}\n",
            statement.month,
            statement.owner,
            format_usd(statement.amount_cents),
            statement.due_date,
            utc_minutes(statement.overdue_at),
            listed.join("\n"),
            statement.owner,
            statement.month
        ),
    })
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone as _;

    use super::*;

    fn time(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn remaining_months_count_a_started_month() {
        let now = time("2026-03-10T12:00:00Z");
        assert_eq!(remaining_months(now, time("2026-03-10T12:00:00Z")), 0);
        assert_eq!(remaining_months(now, time("2026-03-10T12:00:01Z")), 1);
        assert_eq!(remaining_months(now, time("2026-04-10T12:00:00Z")), 1);
        assert_eq!(remaining_months(now, time("2026-04-10T12:00:01Z")), 2);
        assert_eq!(remaining_months(now, time("2027-03-10T12:00:00Z")), 12);
    }

    #[test]
    fn quota_steps_of_five_within_limits() {
        for (quota, valid) in
            [(0, false), (4, false), (5, true), (6, false), (10, true), (995, true), (1_000, true)]
        {
            assert_eq!(quota_step(quota).is_ok(), valid, "quota {quota}");
        }
        assert_eq!(quota_step(1_005).unwrap_err().field, "quota");
    }

    #[test]
    fn states_follow_the_stop_time() {
        let expires_at = Utc.with_ymd_and_hms(2026, 5, 1, 0, 0, 0).unwrap();
        let instance = Instance {
            id: "sag-0000000000000001".to_owned(),
            owner: "acme".to_owned(),
            area: "cn-hangzhou".to_owned(),
            zone: "MainlandChina".to_owned(),
            account_quota: 5,
            trial: false,
            created_at: expires_at,
            expires_at,
            auto_renew: false,
            state: STATE_RUNNING.to_owned(),
            kernel_number: 1,
        };
        let stop = expires_at + Duration::days(15);
        let second = Duration::seconds(1);
        assert_eq!(desired_state(&instance, false, stop - second), STATE_RUNNING);
        assert_eq!(desired_state(&instance, true, stop - second), STATE_LOCKED);
        assert_eq!(desired_state(&instance, false, stop), STATE_STOPPED);
        assert_eq!(desired_state(&instance, true, stop), STATE_STOPPED);
        assert_eq!(release_at(expires_at), expires_at + Duration::days(30));
    }
}
