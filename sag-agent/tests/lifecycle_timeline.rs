//! The lifecycle engine day by day with a clock that the tests move, on a real SQLite store,
//! with notices written as .eml files to an outbox. The timelines check every notice once on
//! its exact day and every state change at its exact time, across a restart of the engine.
//! Further tests cover the rules of renewals, upgrades, renewals with a quota and auto-renew.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
};

use chrono::{DateTime, Duration, Utc};
use sag_agent::{
    admin::{
        Admin, AdminError, NewAccount, NewInstance, STATE_LOCKED, STATE_RUNNING, STATE_STOPPED,
    },
    billing::{Billing, ChargeKind, PaymentRequest},
    clock::ManualClock,
    lifecycle::{Lifecycle, RenewRequest, TickReport, UpgradeRequest},
    notify::{MailConfig, Mailer},
    store::Store,
    testing::netns::unique_name,
};
use sqlx::Row as _;

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
}

/// An email in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sent {
    to: String,
    subject: String,
    body: String,
}

struct Fixture {
    dir: TempDir,
    store: Store,
    clock: Arc<ManualClock>,
    admin: Admin,
    billing: Billing,
    engine: Lifecycle,
    /// Outbox files already read.
    seen: BTreeSet<PathBuf>,
}

fn outbox(dir: &Path) -> PathBuf {
    dir.join("outbox")
}

fn new_engine(dir: &Path, admin: &Admin, billing: &Billing, clock: &Arc<ManualClock>) -> Lifecycle {
    let config = MailConfig {
        from: "sag <noreply@example.com>".to_owned(),
        smtp: None,
        outbox_dir: outbox(dir),
    };
    let mailer = Arc::new(Mailer::new(&config).unwrap());
    Lifecycle::new(admin.clone(), billing.clone(), mailer, clock.clone())
}

async fn fixture(start: &str) -> Fixture {
    let dir = std::env::temp_dir().join(unique_name("sag-lifecycle-test-"));
    std::fs::create_dir_all(&dir).unwrap();
    let store = Store::open_sqlite(&dir.join("sag.db")).await.unwrap();
    let clock = Arc::new(ManualClock::new(at(start)));
    let admin = Admin::new(store.clone(), clock.clone(), 2_000);
    let billing = Billing::new(store.clone(), clock.clone());
    let engine = new_engine(&dir, &admin, &billing, &clock);
    Fixture { dir: TempDir(dir), store, clock, admin, billing, engine, seen: BTreeSet::new() }
}

/// Reads a .eml file: unfolds the headers and undoes quoted-printable soft line breaks.
fn read_eml(path: &Path) -> Sent {
    let text = std::fs::read_to_string(path).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let head = head.replace("\r\n ", " ").replace("\r\n\t", " ");
    let header = |name: &str| {
        head.split("\r\n")
            .find_map(|line| line.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} header in {head}"))
            .to_owned()
    };
    let body = body.replace("=\r\n", "").replace("=3D", "=").replace("\r\n", "\n");
    Sent { to: header("To"), subject: header("Subject"), body }
}

impl Fixture {
    /// Drops the engine and makes a new one over the same store and outbox, as a restarted
    /// agent would.
    fn restart(&mut self) {
        self.engine = new_engine(&self.dir.0, &self.admin, &self.billing, &self.clock);
    }

    /// Moves the clock to `time` and runs the engine there.
    async fn tick(&self, time: DateTime<Utc>) -> TickReport {
        self.clock.set(time);
        let report = self.engine.tick(time).await.unwrap();
        assert!(report.errors.is_empty(), "{time}: {:?}", report.errors);
        report
    }

    /// Returns the emails written to the outbox since the last call, oldest first.
    fn new_emails(&mut self) -> Vec<Sent> {
        let Ok(entries) = std::fs::read_dir(outbox(&self.dir.0)) else { return Vec::new() };
        let mut paths: Vec<PathBuf> = entries
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|extension| extension == "eml"))
            .filter(|path| !self.seen.contains(path))
            .collect();
        paths.sort();
        self.seen.extend(paths.iter().cloned());
        paths.iter().map(|path| read_eml(path)).collect()
    }

    async fn instance(&self, owner: &str, area: &str, quota: u32, months: u32) -> String {
        let new = NewInstance {
            owner: owner.to_owned(),
            area: area.to_owned(),
            account_quota: quota,
            months,
        };
        self.admin.create_instance(&new).await.unwrap().id
    }

    async fn state(&self, id: &str) -> String {
        self.admin.instance(id).await.unwrap().state
    }

    async fn pay(&self, owner: &str, month: &str, amount_cents: i64) {
        let request = PaymentRequest {
            owner: owner.to_owned(),
            month: month.to_owned(),
            amount_cents,
            reference: None,
        };
        self.billing.pay(&request).await.unwrap();
    }

    async fn count(&self, query: &str, id: &str) -> i64 {
        sqlx::query(query).bind(id).fetch_one(self.store.pool()).await.unwrap().get(0)
    }
}

#[tokio::test]
async fn expiry_stop_release_timeline() {
    let mut fixture = fixture("2025-12-20T12:00:00Z").await;
    let id = fixture.instance("acme", "eu-central-1", 5, 2).await;
    let expires_at = at("2026-02-20T12:00:00Z");
    assert_eq!(fixture.admin.instance(&id).await.unwrap().expires_at, expires_at);
    fixture.billing.set_contact("acme", "ops@acme.example").await.unwrap();
    let account = NewAccount { email: "alice@acme.example".to_owned(), ..NewAccount::default() };
    fixture.admin.create_account(&id, &account).await.unwrap();
    let network = sag_agent::admin::NetworkChange {
        cidr_blocks: Some(vec!["10.9.0.0/24".parse().unwrap()]),
        ..Default::default()
    };
    fixture.admin.set_network(&id, &network).await.unwrap();
    // The December statement is paid, so only the expiry drives this timeline.
    let report = fixture.tick(at("2026-01-01T00:10:00Z")).await;
    assert_eq!(report.settlement.statements.len(), 1);
    fixture.pay("acme", "2025-12", 2 * 3_480).await;

    let expiry_subject = format!("sag instance {id} expires on 2026-02-20");
    let release_subject = format!("sag instance {id} will be released on 2026-03-22");
    for day in -20..=31 {
        if day == 0 || day == 22 {
            fixture.restart();
        }
        let noon = expires_at + Duration::days(day);
        for time in [noon - Duration::hours(12), noon] {
            let report = fixture.tick(time).await;
            let emails = fixture.new_emails();
            let expected_subject = match day {
                -14 | -12 | -8 if time == noon => Some(&expiry_subject),
                29 if time == noon => Some(&release_subject),
                _ => None,
            };
            match expected_subject {
                Some(subject) => {
                    assert_eq!(emails.len(), 1, "{time}: {emails:#?}");
                    assert_eq!(emails[0].to, "ops@acme.example", "{time}");
                    assert_eq!(&emails[0].subject, subject, "{time}");
                }
                None => assert!(emails.is_empty(), "{time}: unexpected {emails:#?}"),
            }
            let stopped = day > 15 || (day == 15 && time == noon);
            let released = day > 30 || (day == 30 && time == noon);
            let transitions: Vec<(&str, &str)> = report
                .transitions
                .iter()
                .map(|transition| (transition.from.as_str(), transition.to.as_str()))
                .collect();
            match (day, time == noon) {
                (15, true) => assert_eq!(transitions, [(STATE_RUNNING, STATE_STOPPED)], "{time}"),
                (30, true) => assert_eq!(transitions, [(STATE_STOPPED, "released")], "{time}"),
                _ => assert!(transitions.is_empty(), "{time}: {transitions:?}"),
            }
            if released {
                let error = fixture.admin.instance(&id).await.unwrap_err();
                assert!(matches!(error, AdminError::NotFound { .. }), "{time}: {error}");
            } else if stopped {
                assert_eq!(fixture.state(&id).await, STATE_STOPPED, "{time}");
            } else {
                assert_eq!(fixture.state(&id).await, STATE_RUNNING, "{time}");
            }
        }
    }

    // Released for good: configuration and accounts are gone, the bills stay.
    for table in ["accounts", "cidr_blocks", "allowed_destinations", "quota_changes"] {
        let query = format!("SELECT COUNT(*) FROM {table} WHERE instance_id = $1");
        assert_eq!(fixture.count(&query, &id).await, 0, "{table}");
    }
    let charges = fixture.count("SELECT COUNT(*) FROM charges WHERE instance_id = $1", &id).await;
    assert_eq!(charges, 1);
    let notices = sqlx::query("SELECT kind, state, attempts FROM notices ORDER BY due_at")
        .fetch_all(fixture.store.pool())
        .await
        .unwrap();
    let notices: Vec<(String, String, i64)> =
        notices.iter().map(|row| (row.get(0), row.get(1), row.get(2))).collect();
    let sent = |kind: &str| (kind.to_owned(), "sent".to_owned(), 1);
    assert_eq!(
        notices,
        [sent("expiry_14d"), sent("expiry_12d"), sent("expiry_8d"), sent("release")]
    );
}

#[tokio::test]
async fn overdue_lock_pay_timeline() {
    let mut fixture = fixture("2026-03-10T12:00:00Z").await;
    let europe = fixture.instance("globex", "eu-central-1", 10, 12).await;
    let dubai = fixture.instance("globex", "me-east-1", 5, 12).await;
    let other = fixture.instance("initech", "cn-hangzhou", 5, 12).await;
    fixture.billing.set_contact("globex", "billing@globex.example").await.unwrap();
    fixture.billing.set_contact("initech", "billing@initech.example").await.unwrap();
    let amount_cents = 12 * 6_960 + 12 * 9_285;
    assert_eq!(amount_cents, 194_940);

    let lock_subject =
        "sag statement 2026-03 of globex: pay 1949.40 USD by 2026-04-15 to avoid a lock";
    let start = at("2026-03-25T00:00:00Z");
    for day in 0..32 {
        if day == 18 {
            fixture.restart();
        }
        let midnight = start + Duration::days(day);
        for time in [midnight, midnight + Duration::hours(12)] {
            let date = time.format("%Y-%m-%d").to_string();
            let report = fixture.tick(time).await;
            let emails = fixture.new_emails();
            if date == "2026-04-10" && time == midnight {
                assert_eq!(emails.len(), 1, "{time}: {emails:#?}");
                assert_eq!(emails[0].to, "billing@globex.example");
                assert_eq!(emails[0].subject, lock_subject);
                assert!(emails[0].body.contains(&format!("   {europe} in eu-central-1\n")));
                assert!(emails[0].body.contains(&format!("   {dubai} in me-east-1\n")));
            } else {
                assert!(emails.is_empty(), "{time}: unexpected {emails:#?}");
            }

            // The statement is issued once the month's last day is settled.
            let statements = fixture.billing.statements(Some("globex"), time).await.unwrap();
            if time < at("2026-04-01T00:05:00Z") {
                assert!(statements.is_empty(), "{time}: {statements:#?}");
            } else {
                assert_eq!(statements.len(), 1, "{time}");
                assert_eq!(statements[0].amount_cents, amount_cents);
                assert_eq!(statements[0].due_date, "2026-04-15");
            }
            if date == "2026-04-01" && time != midnight {
                assert_eq!(report.settlement.statements.len(), 2, "{time}");
                fixture.pay("initech", "2026-03", 12 * 3_480).await;
            }

            // Locked from the start of the day after the due date, until paid in full.
            let transitions: Vec<(String, &str, &str)> = report
                .transitions
                .iter()
                .map(|t| (t.instance_id.clone(), t.from.as_str(), t.to.as_str()))
                .collect();
            // The tick at 12:00 on 18 April runs before the payment below.
            let locked = time >= at("2026-04-16T00:00:00Z") && time <= at("2026-04-18T12:00:00Z");
            if time == at("2026-04-16T00:00:00Z") {
                let mut expected = vec![
                    (europe.clone(), STATE_RUNNING, STATE_LOCKED),
                    (dubai.clone(), STATE_RUNNING, STATE_LOCKED),
                ];
                expected.sort();
                let mut transitions = transitions;
                transitions.sort();
                assert_eq!(transitions, expected, "{time}");
            } else {
                assert!(transitions.is_empty(), "{time}: {transitions:?}");
            }
            let expected = if locked { STATE_LOCKED } else { STATE_RUNNING };
            assert_eq!(fixture.state(&europe).await, expected, "{time}");
            assert_eq!(fixture.state(&dubai).await, expected, "{time}");
            assert_eq!(fixture.state(&other).await, STATE_RUNNING, "{time}");

            // A part payment keeps the lock; the rest lifts it at once.
            if time == at("2026-04-17T12:00:00Z") {
                fixture.pay("globex", "2026-03", 100_000).await;
                let report = fixture.tick(time).await;
                assert!(report.transitions.is_empty(), "{:?}", report.transitions);
                assert_eq!(fixture.state(&europe).await, STATE_LOCKED);
            }
            if time == at("2026-04-18T12:00:00Z") {
                fixture.pay("globex", "2026-03", amount_cents - 100_000).await;
                let report = fixture.tick(time).await;
                assert_eq!(report.transitions.len(), 2, "{:?}", report.transitions);
                assert!(report.transitions.iter().all(|t| t.to == STATE_RUNNING));
                assert_eq!(fixture.state(&europe).await, STATE_RUNNING);
                assert_eq!(fixture.state(&dubai).await, STATE_RUNNING);
            }
        }
    }
    let rows = sqlx::query("SELECT kind, subject, state FROM notices")
        .fetch_all(fixture.store.pool())
        .await
        .unwrap();
    let notices: Vec<(String, String, String)> =
        rows.iter().map(|row| (row.get(0), row.get(1), row.get(2))).collect();
    assert_eq!(notices, [("lock".to_owned(), "2026-03 globex".to_owned(), "sent".to_owned())]);
}

#[tokio::test]
async fn stopped_instance_runs_after_renewal() {
    let fixture = fixture("2026-05-01T00:00:00Z").await;
    let id = fixture.instance("renewer", "cn-hangzhou", 5, 1).await;
    fixture.billing.set_contact("renewer", "ops@renewer.example").await.unwrap();
    let now = at("2026-06-16T00:00:00Z");
    let report = fixture.tick(now).await;
    assert_eq!(report.transitions.len(), 1);
    assert_eq!(fixture.state(&id).await, STATE_STOPPED);

    let order = fixture.engine.renew(&id, &RenewRequest { months: 1, quota: None }).await.unwrap();
    assert_eq!(order.instance.expires_at, at("2026-07-01T00:00:00Z"));
    let charge = order.charge.unwrap();
    assert_eq!(charge.kind, ChargeKind::Renewal);
    assert_eq!(charge.amount_cents, 3_480);
    let report = fixture.tick(now).await;
    assert_eq!(report.transitions.len(), 1);
    assert_eq!(report.transitions[0].to, STATE_RUNNING);
    assert_eq!(fixture.state(&id).await, STATE_RUNNING);

    let error =
        fixture.engine.renew(&id, &RenewRequest { months: 37, quota: None }).await.unwrap_err();
    let AdminError::Invalid(invalid) = &error else { panic!("{error}") };
    assert_eq!(invalid.field, "months");
    let trial = fixture.admin.claim_trial("renewer", "cn-hangzhou").await.unwrap();
    let error = fixture
        .engine
        .renew(&trial.id, &RenewRequest { months: 1, quota: None })
        .await
        .unwrap_err();
    assert!(matches!(error, AdminError::Refused(_)), "{error}");
}

#[tokio::test]
async fn renewal_quota_waits_for_its_period() {
    let fixture = fixture("2026-01-10T08:00:00Z").await;
    let id = fixture.instance("modifier", "eu-central-1", 20, 1).await;
    fixture.billing.set_contact("modifier", "ops@modifier.example").await.unwrap();
    let expires_at = at("2026-02-10T08:00:00Z");
    for n in 0..7 {
        let account = NewAccount { email: format!("user{n}@example.com"), ..NewAccount::default() };
        fixture.admin.create_account(&id, &account).await.unwrap();
    }
    let modify = |quota| RenewRequest { months: 2, quota: Some(quota) };

    let error = fixture.engine.renew(&id, &modify(5)).await.unwrap_err();
    let AdminError::Conflict(message) = &error else { panic!("{error}") };
    assert!(message.contains("quota 5 is below the 7 accounts in use"), "{message}");
    assert!(message.contains("choose at least 10"), "{message}");
    for quota in [12, 0, 1_005] {
        let error = fixture.engine.renew(&id, &modify(quota)).await.unwrap_err();
        let AdminError::Invalid(invalid) = &error else { panic!("{quota}: {error}") };
        assert_eq!(invalid.field, "quota");
    }
    assert_eq!(fixture.admin.instance(&id).await.unwrap().expires_at, expires_at);

    let order = fixture.engine.renew(&id, &modify(10)).await.unwrap();
    assert_eq!(order.instance.account_quota, 20, "the current period keeps its quota");
    assert_eq!(order.instance.expires_at, at("2026-04-10T08:00:00Z"));
    let change = order.quota_change.unwrap();
    assert_eq!(change.account_quota, 10);
    assert_eq!(change.effective_at, expires_at);
    assert_eq!(order.charge.unwrap().amount_cents, 2 * 6_960);
    let error = fixture.engine.renew(&id, &modify(15)).await.unwrap_err();
    assert!(matches!(error, AdminError::Conflict(_)), "one change waits already: {error}");
    // A plain renewal now continues the renewed period, at its quota.
    let order = fixture.engine.renew(&id, &RenewRequest { months: 1, quota: None }).await.unwrap();
    assert_eq!(order.charge.unwrap().amount_cents, 6_960);

    fixture.tick(expires_at - Duration::seconds(1)).await;
    assert_eq!(fixture.admin.instance(&id).await.unwrap().account_quota, 20);
    let report = fixture.tick(expires_at).await;
    assert_eq!(report.quota_changes.len(), 1);
    assert_eq!(fixture.admin.instance(&id).await.unwrap().account_quota, 10);
    assert_eq!(fixture.engine.quota_change(&id).await.unwrap(), None);
}

#[tokio::test]
async fn upgrade_raises_quota_only() {
    let fixture = fixture("2026-01-31T12:00:00Z").await;
    let id = fixture.instance("upgrader", "eu-central-1", 5, 3).await;
    assert_eq!(fixture.admin.instance(&id).await.unwrap().expires_at, at("2026-04-30T12:00:00Z"));
    fixture.clock.set(at("2026-02-15T12:00:00Z"));
    for quota in [5, 4, 7, 1_005] {
        let error = fixture.engine.upgrade(&id, &UpgradeRequest { quota }).await.unwrap_err();
        let AdminError::Invalid(invalid) = &error else { panic!("{quota}: {error}") };
        assert_eq!(invalid.field, "quota", "{quota}");
    }
    // 3 months left: 15 February to 30 April, a started month counting whole.
    let order = fixture.engine.upgrade(&id, &UpgradeRequest { quota: 10 }).await.unwrap();
    assert_eq!(order.instance.account_quota, 10);
    let charge = order.charge.unwrap();
    assert_eq!(charge.kind, ChargeKind::Upgrade);
    assert_eq!(charge.quantity, 3);
    assert_eq!(charge.amount_cents, 3 * (6_960 - 3_480));
    let order = fixture.engine.upgrade(&id, &UpgradeRequest { quota: 1_000 }).await.unwrap();
    assert_eq!(order.charge.unwrap().amount_cents, 3 * (557_400 - 6_960));

    fixture.clock.set(at("2026-04-30T12:00:00Z"));
    let error = fixture.engine.upgrade(&id, &UpgradeRequest { quota: 5 }).await.unwrap_err();
    assert!(matches!(error, AdminError::Invalid(_)), "{error}");
    let other = fixture.instance("upgrader", "eu-central-1", 5, 1).await;
    fixture.clock.set(at("2026-06-01T12:00:00Z"));
    let error = fixture.engine.upgrade(&other, &UpgradeRequest { quota: 10 }).await.unwrap_err();
    let AdminError::Refused(message) = &error else { panic!("{error}") };
    assert!(message.contains("renew it before upgrading"), "{message}");
    let trial = fixture.admin.claim_trial("upgrader", "eu-central-1").await.unwrap();
    let error = fixture.engine.upgrade(&trial.id, &UpgradeRequest { quota: 5 }).await.unwrap_err();
    assert!(matches!(error, AdminError::Refused(_)), "{error}");
}

#[tokio::test]
async fn auto_renew_extends_at_expiry() {
    let mut fixture = fixture("2026-03-01T00:00:00Z").await;
    let id = fixture.instance("auto", "me-east-1", 5, 1).await;
    fixture.billing.set_contact("auto", "ops@auto.example").await.unwrap();
    fixture.engine.set_auto_renew(&id, true).await.unwrap();
    let expires_at = at("2026-04-01T00:00:00Z");

    fixture.tick(expires_at - Duration::days(14)).await;
    let emails = fixture.new_emails();
    assert_eq!(emails.len(), 1);
    assert!(emails[0].body.contains("Auto-renew is on"), "{}", emails[0].body);
    let report = fixture.tick(expires_at - Duration::seconds(1)).await;
    assert!(report.renewals.is_empty());
    let report = fixture.tick(expires_at).await;
    assert_eq!(report.renewals.len(), 1);
    assert_eq!(report.renewals[0].amount_cents, 9_285);
    assert_eq!(fixture.admin.instance(&id).await.unwrap().expires_at, at("2026-05-01T00:00:00Z"));
    // Nothing stops while auto-renew is on.
    let report = fixture.tick(expires_at + Duration::days(20)).await;
    assert!(report.transitions.is_empty());
    assert_eq!(fixture.state(&id).await, STATE_RUNNING);

    fixture.engine.set_auto_renew(&id, false).await.unwrap();
    let trial = fixture.admin.claim_trial("auto", "me-east-1").await.unwrap();
    let error = fixture.engine.set_auto_renew(&trial.id, true).await.unwrap_err();
    assert!(matches!(error, AdminError::Refused(_)), "{error}");
}

#[tokio::test]
async fn notice_without_contact_is_retried() {
    let mut fixture = fixture("2026-03-01T00:00:00Z").await;
    let id = fixture.instance("quiet", "eu-central-1", 5, 1).await;
    let due = at("2026-04-01T00:00:00Z") - Duration::days(14);

    let report = fixture.engine.tick(due).await.unwrap();
    assert_eq!(report.notices.len(), 1);
    assert!(!report.notices[0].sent);
    let error = report.notices[0].error.as_deref().unwrap();
    assert!(error.contains("owner \"quiet\" has no contact address"), "{error}");
    assert!(fixture.new_emails().is_empty());
    // Not tried again within 15 minutes, then sent once the owner has an address.
    fixture.billing.set_contact("quiet", "ops@quiet.example").await.unwrap();
    let report = fixture.tick(due + Duration::minutes(14)).await;
    assert!(report.notices.is_empty());
    let report = fixture.tick(due + Duration::minutes(15)).await;
    assert_eq!(report.notices.len(), 1);
    assert!(report.notices[0].sent);
    let emails = fixture.new_emails();
    assert_eq!(emails.len(), 1);
    assert_eq!(emails[0].subject, format!("sag instance {id} expires on 2026-04-01"));
    fixture.tick(due + Duration::hours(3)).await;
    assert!(fixture.new_emails().is_empty());
}

#[tokio::test]
async fn claimed_notice_is_resent_after_crash() {
    let mut fixture = fixture("2026-03-01T00:00:00Z").await;
    let id = fixture.instance("crashy", "eu-central-1", 5, 1).await;
    fixture.billing.set_contact("crashy", "ops@crashy.example").await.unwrap();
    let due = at("2026-04-01T00:00:00Z") - Duration::days(12);
    fixture.tick(due).await;
    assert_eq!(fixture.new_emails().len(), 1);

    // A crash after the email went out and before it was marked leaves the claim behind.
    sqlx::query("UPDATE notices SET state = 'sending', sent_at = NULL WHERE subject = $1")
        .bind(&id)
        .execute(fixture.store.pool())
        .await
        .unwrap();
    fixture.restart();
    fixture.tick(due + Duration::hours(1)).await;
    let emails = fixture.new_emails();
    assert_eq!(emails.len(), 1, "sent again: at least once");
    assert_eq!(emails[0].to, "ops@crashy.example");
    fixture.tick(due + Duration::hours(2)).await;
    assert!(fixture.new_emails().is_empty());
}
