//! Roaming: an account replicated to an instance in another area, so that its user logs in
//! there with that instance's ID, the same username and the same password.
//!
//! A replica is an account row of the destination instance that names its source instance
//! (`replica_of`). Credentials stay in step with the source: a password reset on the source
//! sets the same hash on every replica in the same transaction, and a password reset on a
//! replica is refused. Disabling or enabling the source does the same to every replica.
//! Deleting the source deletes its replicas, and is refused if any of them has usage this
//! month. Deleting or releasing the source's instance turns its replicas into ordinary
//! accounts of their instances.
//! A replica keeps its own bandwidth and has no static address (the source's would lie in
//! the source's blocks). It can be disabled on its own, until the source is next disabled or
//! enabled. Usage is counted where it is used: each instance counts its own accounts' traffic.

use serde::{Deserialize, Serialize};
use sqlx::Row as _;
use tracing::info;

use crate::{
    admin::{Account, Admin, AdminError, Instance, Network},
    validation::{self, ValidationError},
};

/// Roaming facts of an account: its source, if it is a replica, and its replicas.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoamingInfo {
    /// The source instance, for a replica.
    pub replica_of: Option<String>,
    /// Instances that hold a replica of this account.
    pub replicas: Vec<String>,
}

/// Checks the roaming rules for replicating an account of `source` to `destination`: a
/// different area, no overlap between the two instances' client blocks, and the username free
/// on the destination.
///
/// # Errors
/// Fails with [`AdminError::Invalid`] or [`AdminError::Conflict`] naming the rule and the
/// values.
pub fn check_roam(
    source: (&Instance, &Network),
    destination: (&Instance, &Network),
    username_taken: bool,
    username: &str,
) -> Result<(), AdminError> {
    let ((from, from_network), (to, to_network)) = (source, destination);
    if from.id == to.id {
        return Err(AdminError::Invalid(ValidationError {
            field: "to",
            rule: "must be another instance than the account's own".to_owned(),
            value: format!("{:?}", to.id),
        }));
    }
    if from.area == to.area {
        return Err(AdminError::Invalid(ValidationError {
            field: "to",
            rule: format!(
                "must be an instance in another area: {} and {} both serve {}",
                from.id, to.id, from.area
            ),
            value: format!("{:?}", to.id),
        }));
    }
    for block in &from_network.cidr_blocks {
        if let Some(other) =
            to_network.cidr_blocks.iter().find(|other| validation::overlaps(block, other))
        {
            return Err(AdminError::Conflict(format!(
                "cannot roam to {}: its client block {other} overlaps block {block} of {}; \
                 the two instances' blocks must not overlap",
                to.id, from.id
            )));
        }
    }
    if username_taken {
        return Err(AdminError::Conflict(format!(
            "cannot roam to {}: username {username:?} is already an account of that instance",
            to.id
        )));
    }
    Ok(())
}

/// Returns the source instance of a replica, or `None` for an account that is no replica.
///
/// # Errors
/// Fails if the store cannot be read.
pub async fn source_of(
    admin: &Admin,
    instance_id: &str,
    username: &str,
) -> Result<Option<String>, AdminError> {
    let row =
        sqlx::query("SELECT replica_of FROM accounts WHERE instance_id = $1 AND username = $2")
            .bind(instance_id)
            .bind(username)
            .fetch_optional(admin.store().pool())
            .await?;
    Ok(match row {
        Some(row) => row.try_get::<Option<String>, _>("replica_of")?,
        None => None,
    })
}

/// Returns an account's roaming facts.
///
/// # Errors
/// Fails if the store cannot be read.
pub async fn info(
    admin: &Admin,
    instance_id: &str,
    username: &str,
) -> Result<RoamingInfo, AdminError> {
    let rows = sqlx::query(
        "SELECT instance_id FROM accounts WHERE replica_of = $1 AND username = $2 \
         ORDER BY instance_id",
    )
    .bind(instance_id)
    .bind(username)
    .fetch_all(admin.store().pool())
    .await?;
    let replicas = rows.iter().map(|row| row.try_get("instance_id")).collect::<Result<_, _>>()?;
    Ok(RoamingInfo { replica_of: source_of(admin, instance_id, username).await?, replicas })
}

/// Replicates account `username` of `instance_id` to instance `to`, and returns the replica.
/// The replica has the source's email, password hash, bandwidth and state, and no static
/// address. The destination's account quota applies.
///
/// # Errors
/// Fails with [`AdminError::NotFound`] for an unknown instance or account, and with
/// [`AdminError::Invalid`] or [`AdminError::Conflict`] when a roaming rule or the quota
/// forbids it. A refused roam writes nothing.
pub async fn roam(
    admin: &Admin,
    instance_id: &str,
    username: &str,
    to: &str,
) -> Result<Account, AdminError> {
    let source = admin.instance(instance_id).await?;
    let account = admin.account(instance_id, username).await?;
    if let Some(origin) = source_of(admin, instance_id, username).await? {
        return Err(AdminError::Refused(format!(
            "account {username} of instance {instance_id} is itself a replica of the account on \
             {origin}; roam that account instead"
        )));
    }
    let destination = admin.instance(to).await?;
    let source_network = admin.network(instance_id).await?;
    let destination_network = admin.network(to).await?;

    let mut transaction = admin.store().pool().begin().await?;
    let taken =
        sqlx::query("SELECT 1 AS one FROM accounts WHERE instance_id = $1 AND username = $2")
            .bind(to)
            .bind(username)
            .fetch_optional(&mut *transaction)
            .await?
            .is_some();
    check_roam((&source, &source_network), (&destination, &destination_network), taken, username)?;
    let count: i64 = sqlx::query("SELECT COUNT(*) AS count FROM accounts WHERE instance_id = $1")
        .bind(to)
        .fetch_one(&mut *transaction)
        .await?
        .try_get("count")?;
    if u32::try_from(count).unwrap_or(u32::MAX) >= destination.account_quota {
        return Err(AdminError::Conflict(format!(
            "cannot roam to {to}: its account quota is full ({count} of {} accounts)",
            destination.account_quota
        )));
    }

    let bandwidth = if destination.trial {
        account.bandwidth_kbps.min(crate::admin::TRIAL_BANDWIDTH_KBPS)
    } else {
        account.bandwidth_kbps
    };
    sqlx::query(
        "INSERT INTO accounts (instance_id, username, email, password_hash, static_ip, \
         bandwidth_kbps, enabled, created_at, replica_of) \
         SELECT $1, username, email, password_hash, NULL, $2, enabled, $3, instance_id \
         FROM accounts WHERE instance_id = $4 AND username = $5",
    )
    .bind(to)
    .bind(i64::from(bandwidth))
    .bind(admin.now().timestamp())
    .bind(instance_id)
    .bind(username)
    .execute(&mut *transaction)
    .await?;
    transaction.commit().await?;
    info!(instance = instance_id, username, to, "account replicated");
    admin.account(to, username).await
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};

    use super::*;

    fn instance(id: &str, area: &str) -> Instance {
        Instance {
            id: id.to_owned(),
            owner: "acme".to_owned(),
            area: area.to_owned(),
            zone: "International".to_owned(),
            account_quota: 5,
            trial: false,
            created_at: DateTime::<Utc>::default(),
            expires_at: DateTime::<Utc>::default(),
            auto_renew: false,
            state: "running".to_owned(),
            kernel_number: 1,
        }
    }

    fn network(blocks: &[&str]) -> Network {
        Network {
            cidr_blocks: blocks.iter().map(|block| block.parse().unwrap()).collect(),
            ..Network::default()
        }
    }

    #[test]
    fn roam_rules_and_messages() {
        let (hangzhou, frankfurt) =
            (instance("sag-a", "cn-hangzhou"), instance("sag-b", "eu-central-1"));
        let (ten, eleven) = (network(&["10.0.0.0/16"]), network(&["10.1.0.0/16"]));
        assert!(check_roam((&hangzhou, &ten), (&frankfurt, &eleven), false, "alice01").is_ok());

        let same_area = instance("sag-c", "cn-hangzhou");
        let error =
            check_roam((&hangzhou, &ten), (&same_area, &eleven), false, "alice01").unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid to \"sag-c\": must be an instance in another area: sag-a and sag-c both \
             serve cn-hangzhou"
        );

        let inside = network(&["10.0.128.0/24"]);
        let error =
            check_roam((&hangzhou, &ten), (&frankfurt, &inside), false, "alice01").unwrap_err();
        assert_eq!(
            error.to_string(),
            "cannot roam to sag-b: its client block 10.0.128.0/24 overlaps block 10.0.0.0/16 of \
             sag-a; the two instances' blocks must not overlap"
        );

        let error =
            check_roam((&hangzhou, &ten), (&frankfurt, &eleven), true, "alice01").unwrap_err();
        assert_eq!(
            error.to_string(),
            "cannot roam to sag-b: username \"alice01\" is already an account of that instance"
        );

        let error = check_roam((&hangzhou, &ten), (&hangzhou, &ten), false, "alice01").unwrap_err();
        assert!(error.to_string().contains("must be another instance"), "{error}");
    }
}
