//! Billing rules with exact amounts, through the admin and billing operations on a real SQLite
//! store and a clock that the tests move. The tests cover account fees per zone and tier, and
//! the split between plan, packages and pay-as-you-go across a month boundary, between two
//! instances that share a package and in Dubai. They also cover daily settlement, statements
//! and payments.

use std::{path::PathBuf, sync::Arc};

use chrono::{DateTime, NaiveDate, Utc};
use sag_agent::{
    admin::{Admin, AdminError, NewInstance},
    billing::{
        self, account_fee_cents, Billing, ChargeKind, DataSplit, InstanceMonth, MonthReport,
        OwnerMonth, PaymentRequest, StatementState, BYTES_PER_GB, PLAN_BYTES_PER_ACCOUNT,
    },
    clock::ManualClock,
    store::Store,
    testing::netns::unique_name,
    validation::Zone,
};

const GB: u64 = BYTES_PER_GB;

/// A store in a directory of its own, removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Fixture {
    _dir: TempDir,
    store: Store,
    clock: Arc<ManualClock>,
    admin: Admin,
    billing: Billing,
}

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
}

fn day(text: &str) -> NaiveDate {
    NaiveDate::parse_from_str(text, "%Y-%m-%d").unwrap()
}

async fn fixture(start: &str) -> Fixture {
    let dir = std::env::temp_dir().join(unique_name("sag-billing-test-"));
    std::fs::create_dir_all(&dir).unwrap();
    let store = Store::open_sqlite(&dir.join("sag.db")).await.unwrap();
    let clock = Arc::new(ManualClock::new(at(start)));
    let admin = Admin::new(store.clone(), clock.clone(), 2_000);
    let billing = Billing::new(store.clone(), clock.clone());
    Fixture { _dir: TempDir(dir), store, clock, admin, billing }
}

impl Fixture {
    async fn instance(&self, owner: &str, area: &str, quota: u32, months: u32) -> String {
        let new = NewInstance {
            owner: owner.to_owned(),
            area: area.to_owned(),
            account_quota: quota,
            months,
        };
        self.admin.create_instance(&new).await.unwrap().id
    }

    async fn traffic(&self, instance: &str, username: &str, on: &str, rx: u64, tx: u64) {
        billing::add_daily_usage(self.store.pool(), instance, username, day(on), rx, tx)
            .await
            .unwrap();
    }

    async fn report(&self, month: &str, owner: &str) -> OwnerMonth {
        let report: MonthReport = self.billing.report(month, Some(owner)).await.unwrap();
        assert_eq!(report.owners.len(), 1, "{report:#?}");
        report.owners.into_iter().next().unwrap()
    }

    /// Moves the clock to `time` and settles every day that ended before it.
    async fn settle_at(&self, time: &str) -> billing::Settlement {
        self.clock.set(at(time));
        self.billing.settle(at(time)).await.unwrap()
    }
}

fn instance_line<'a>(owner: &'a OwnerMonth, id: &str) -> &'a InstanceMonth {
    owner.instances.iter().find(|line| line.instance_id == id).unwrap_or_else(|| {
        panic!("no line for {id} in {owner:#?}");
    })
}

fn split(plan_bytes: u64, package_bytes: u64, payg_bytes: u64) -> DataSplit {
    DataSplit { plan_bytes, package_bytes, payg_bytes, trial_excess_bytes: 0 }
}

#[test]
fn account_fee_tiers_per_zone() {
    let cases = [
        (5, Zone::MainlandChina, 3_480),
        (100, Zone::MainlandChina, 69_600),
        (101, Zone::MainlandChina, 70_142),
        (1_000, Zone::MainlandChina, 557_400),
        (5, Zone::International, 3_480),
        (100, Zone::International, 69_600),
        (101, Zone::International, 70_142),
        (1_000, Zone::International, 557_400),
        (5, Zone::Dubai, 9_285),
        (100, Zone::Dubai, 185_700),
        (101, Zone::Dubai, 187_248),
        (1_000, Zone::Dubai, 1_578_900),
    ];
    for (accounts, zone, cents) in cases {
        assert_eq!(account_fee_cents(accounts, zone), cents, "{accounts} accounts in {zone:?}");
    }
}

#[tokio::test]
async fn subscriptions_charge_fee_times_months() {
    let fixture = fixture("2026-03-10T12:00:00Z").await;
    let cases = [
        ("cn-hangzhou", 5, 3_480),
        ("cn-hangzhou", 100, 69_600),
        ("cn-hangzhou", 101, 70_142),
        ("cn-hangzhou", 1_000, 557_400),
        ("eu-central-1", 5, 3_480),
        ("eu-central-1", 100, 69_600),
        ("eu-central-1", 101, 70_142),
        ("eu-central-1", 1_000, 557_400),
        ("me-east-1", 5, 9_285),
        ("me-east-1", 100, 185_700),
        ("me-east-1", 101, 187_248),
        ("me-east-1", 1_000, 1_578_900),
    ];
    for (area, quota, monthly_cents) in cases {
        let owner = format!("owner-{area}-{quota}");
        let id = fixture.instance(&owner, area, quota, 3).await;
        let report = fixture.report("2026-03", &owner).await;
        assert_eq!(report.orders.len(), 1, "{area} {quota}");
        let order = &report.orders[0];
        assert_eq!(order.kind, ChargeKind::Subscription);
        assert_eq!(order.instance_id.as_deref(), Some(id.as_str()));
        assert_eq!(order.quantity, 3, "{area} {quota}: months");
        assert_eq!(order.amount_cents, 3 * monthly_cents, "{area} {quota}");
        assert_eq!(report.fees_cents, 3 * monthly_cents, "{area} {quota}");
        assert_eq!(report.total_cents, 3 * monthly_cents, "{area} {quota}");
    }
}

#[tokio::test]
async fn plan_covers_five_gb_per_account() {
    let fixture = fixture("2026-04-01T08:00:00Z").await;
    let id = fixture.instance("plan", "eu-central-1", 5, 1).await;
    // At the edge, one byte over, and the larger direction counting.
    fixture.traffic(&id, "exactly5", "2026-04-02", PLAN_BYTES_PER_ACCOUNT, 1_000).await;
    fixture.traffic(&id, "onebyte1", "2026-04-02", 10, PLAN_BYTES_PER_ACCOUNT + 1).await;
    fixture.traffic(&id, "heavyrx1", "2026-04-02", 8 * GB, 2 * GB).await;
    // An account's unused plan does not help another.
    fixture.traffic(&id, "lightuse", "2026-04-02", GB, GB / 2).await;

    let report = fixture.report("2026-04", "plan").await;
    let by_user = |name: &str| report.accounts.iter().find(|a| a.username == name).unwrap();
    assert_eq!(by_user("exactly5").usage_bytes, PLAN_BYTES_PER_ACCOUNT);
    assert_eq!(by_user("exactly5").over_bytes, 0);
    assert_eq!(by_user("onebyte1").usage_bytes, PLAN_BYTES_PER_ACCOUNT + 1);
    assert_eq!(by_user("onebyte1").over_bytes, 1);
    assert_eq!(by_user("heavyrx1").usage_bytes, 8 * GB);
    assert_eq!(by_user("heavyrx1").over_bytes, 3 * GB);
    assert_eq!(by_user("lightuse").usage_bytes, GB);
    let line = instance_line(&report, &id);
    assert_eq!(line.usage_bytes, 5 * GB + (5 * GB + 1) + 8 * GB + GB);
    assert_eq!(line.split, split(5 * GB + 5 * GB + 5 * GB + GB, 0, 3 * GB + 1));
    // 3 GB at 3.10 USD, and one byte, which rounds to nothing.
    assert_eq!(line.payg_cents, 930);
    assert_eq!(report.payg_cents, 930);
}

#[tokio::test]
async fn month_boundary_resets_plan_and_packages() {
    let fixture = fixture("2026-01-10T09:00:00Z").await;
    let id = fixture.instance("boundary", "cn-hangzhou", 5, 12).await;
    fixture.clock.set(at("2026-01-15T09:00:00Z"));
    fixture.billing.buy_package("boundary", 10).await.unwrap();
    // January: 7 GB on the 30th, 2 GB of it beyond the plan, from the package.
    fixture.traffic(&id, "alice001", "2026-01-30", 7 * GB, GB).await;
    // February: a new plan, and the January package is gone.
    fixture.traffic(&id, "alice001", "2026-02-01", 3 * GB, GB).await;
    fixture.traffic(&id, "alice001", "2026-02-02", 3 * GB, GB).await;

    let settled = fixture.settle_at("2026-02-03T00:05:00Z").await;
    assert_eq!(settled.days.first().map(String::as_str), Some("2026-01-10"));
    assert_eq!(settled.days.last().map(String::as_str), Some("2026-02-02"));
    assert_eq!(settled.days.len(), 24);
    assert_eq!(settled.charges.len(), 1, "{settled:#?}");
    let charge = &settled.charges[0];
    assert_eq!(charge.kind, ChargeKind::Payg);
    assert_eq!(charge.day, "2026-02-02");
    assert_eq!(charge.quantity, GB);
    assert_eq!(charge.amount_cents, 310);

    let january = fixture.report("2026-01", "boundary").await;
    assert_eq!(instance_line(&january, &id).split, split(5 * GB, 2 * GB, 0));
    assert_eq!(january.package_bytes_bought, 10 * GB);
    assert_eq!(january.package_bytes_used, 2 * GB);
    assert_eq!(january.fees_cents, 12 * 3_480);
    assert_eq!(january.packages_cents, 2_600);
    assert_eq!(january.payg_cents, 0);
    assert_eq!(january.total_cents, 12 * 3_480 + 2_600);
    let february = fixture.report("2026-02", "boundary").await;
    assert_eq!(instance_line(&february, &id).split, split(5 * GB, 0, GB));
    assert_eq!(february.payg_cents, 310);
    assert_eq!(february.total_cents, 310);

    // The January statement was issued with the settlement of its last day.
    assert_eq!(settled.statements.len(), 1);
    let statement = &settled.statements[0];
    assert_eq!(statement.month, "2026-01");
    assert_eq!(statement.amount_cents, january.total_cents);
    assert_eq!(statement.due_date, "2026-02-17");
}

#[tokio::test]
async fn package_shared_by_two_instances() {
    let fixture = fixture("2026-05-01T06:00:00Z").await;
    let china = fixture.instance("shared", "cn-hangzhou", 5, 1).await;
    let europe = fixture.instance("shared", "eu-central-1", 5, 1).await;
    fixture.billing.buy_package("shared", 10).await.unwrap();
    fixture.traffic(&china, "user0001", "2026-05-03", 11 * GB, GB).await;
    fixture.traffic(&europe, "user0002", "2026-05-04", GB, 12 * GB).await;
    // Beyond the plan and the package, a second day of the European account.
    fixture.traffic(&europe, "user0002", "2026-05-05", 0, GB / 2).await;

    let settled = fixture.settle_at("2026-05-06T00:05:00Z").await;
    let payg: Vec<(String, u64, i64)> = settled
        .charges
        .iter()
        .map(|charge| (charge.day.clone(), charge.quantity, charge.amount_cents))
        .collect();
    assert_eq!(
        payg,
        [("2026-05-04".to_owned(), 3 * GB, 930), ("2026-05-05".to_owned(), GB / 2, 155)]
    );
    let report = fixture.report("2026-05", "shared").await;
    assert_eq!(instance_line(&report, &china).split, split(5 * GB, 6 * GB, 0));
    assert_eq!(instance_line(&report, &europe).split, split(5 * GB, 4 * GB, 3 * GB + GB / 2));
    assert_eq!(instance_line(&report, &europe).payg_cents, 1_085);
    assert_eq!(report.package_bytes_used, 10 * GB);
    assert_eq!(report.fees_cents, 2 * 3_480);
    assert_eq!(report.packages_cents, 2_600);
    assert_eq!(report.total_cents, 2 * 3_480 + 2_600 + 1_085);
}

#[tokio::test]
async fn same_day_package_order_by_instance() {
    let fixture = fixture("2026-05-01T06:00:00Z").await;
    let first = fixture.instance("sameday", "cn-shanghai", 5, 1).await;
    let second = fixture.instance("sameday", "ap-southeast-1", 5, 1).await;
    let (first, second) = if first < second { (first, second) } else { (second, first) };
    fixture.billing.buy_package("sameday", 10).await.unwrap();
    fixture.traffic(&first, "user0001", "2026-05-02", 12 * GB, 0).await;
    fixture.traffic(&second, "user0002", "2026-05-02", 9 * GB, 0).await;

    let report = fixture.report("2026-05", "sameday").await;
    // The package serves the lower instance ID first.
    assert_eq!(instance_line(&report, &first).split, split(5 * GB, 7 * GB, 0));
    assert_eq!(instance_line(&report, &second).split, split(5 * GB, 3 * GB, GB));
}

#[tokio::test]
async fn dubai_refuses_packages_and_pays_more() {
    let fixture = fixture("2026-06-01T10:00:00Z").await;
    let dubai = fixture.instance("desert", "me-east-1", 5, 1).await;
    let error = fixture.billing.buy_package("desert", 10).await.unwrap_err();
    let AdminError::Refused(message) = &error else { panic!("expected a refusal: {error}") };
    assert!(message.contains("packages are not sold in Dubai (me-east-1)"), "{message}");
    assert!(fixture.billing.packages(Some("desert"), None).await.unwrap().is_empty());

    // With an instance elsewhere the owner may buy one, but Dubai data never uses it.
    let europe = fixture.instance("desert", "eu-west-1", 5, 1).await;
    fixture.billing.buy_package("desert", 50).await.unwrap();
    fixture.traffic(&dubai, "nomad001", "2026-06-02", 7 * GB, 0).await;
    fixture.traffic(&europe, "nomad002", "2026-06-02", 6 * GB, 0).await;

    let settled = fixture.settle_at("2026-06-03T00:05:00Z").await;
    assert_eq!(settled.charges.len(), 1, "{settled:#?}");
    assert_eq!(settled.charges[0].instance_id.as_deref(), Some(dubai.as_str()));
    assert_eq!(settled.charges[0].amount_cents, 2_166);
    let report = fixture.report("2026-06", "desert").await;
    assert_eq!(instance_line(&report, &dubai).split, split(5 * GB, 0, 2 * GB));
    assert_eq!(instance_line(&report, &dubai).payg_cents, 2_166);
    assert_eq!(instance_line(&report, &europe).split, split(5 * GB, GB, 0));
    assert_eq!(report.package_bytes_used, GB);
    assert_eq!(report.fees_cents, 9_285 + 3_480);
    assert_eq!(report.packages_cents, 12_300);
    assert_eq!(report.total_cents, 9_285 + 3_480 + 12_300 + 2_166);
}

#[tokio::test]
async fn package_rules() {
    let fixture = fixture("2026-06-01T10:00:00Z").await;
    let error = fixture.billing.buy_package("nobody", 10).await.unwrap_err();
    assert!(matches!(error, AdminError::Refused(_)), "{error}");

    fixture.admin.claim_trial("trialist", "eu-central-1").await.unwrap();
    let error = fixture.billing.buy_package("trialist", 10).await.unwrap_err();
    assert!(matches!(error, AdminError::Refused(_)), "a trial needs no package: {error}");
    fixture.instance("buyer", "eu-central-1", 5, 1).await;
    for size in [0, 9, 11, 100, 51_201] {
        let error = fixture.billing.buy_package("buyer", size).await.unwrap_err();
        let AdminError::Invalid(invalid) = &error else { panic!("{size}: {error}") };
        assert_eq!(invalid.field, "size_gb");
        assert_eq!(invalid.value, size.to_string());
    }

    let prices = [
        (10, 2_600),
        (50, 12_300),
        (128, 28_800),
        (512, 114_900),
        (1_024, 215_400),
        (5_120, 1_019_300),
        (10_240, 1_938_100),
        (51_200, 9_231_000),
    ];
    for (size, cents) in prices {
        let package = fixture.billing.buy_package("buyer", size).await.unwrap();
        assert_eq!(package.price_cents, cents, "{size} GB");
        assert_eq!(package.month, "2026-06");
        assert_eq!(package.day, "2026-06-01");
    }
    let report = fixture.report("2026-06", "buyer").await;
    assert_eq!(report.packages_cents, prices.iter().map(|(_, cents)| cents).sum::<i64>());
    assert_eq!(report.package_bytes_bought, prices.iter().map(|(size, _)| size * GB).sum::<u64>());
}

#[tokio::test]
async fn trial_data_is_free() {
    let fixture = fixture("2026-07-01T10:00:00Z").await;
    let trial = fixture.admin.claim_trial("tester", "cn-beijing").await.unwrap();
    fixture.traffic(&trial.id, "trial001", "2026-07-02", 9 * GB, GB).await;
    let settled = fixture.settle_at("2026-07-03T00:05:00Z").await;
    assert!(settled.charges.is_empty(), "{settled:#?}");
    let report = fixture.report("2026-07", "tester").await;
    assert!(report.orders.is_empty(), "a trial has no fee: {report:#?}");
    let line = instance_line(&report, &trial.id);
    assert!(line.trial);
    assert_eq!(
        line.split,
        DataSplit {
            plan_bytes: 5 * GB,
            package_bytes: 0,
            payg_bytes: 0,
            trial_excess_bytes: 4 * GB
        }
    );
    assert_eq!(report.total_cents, 0);
    assert!(settled.statements.is_empty(), "nothing to bill");
}

#[tokio::test]
async fn payg_rounds_each_day() {
    let fixture = fixture("2026-08-01T10:00:00Z").await;
    let id = fixture.instance("rounder", "eu-central-1", 5, 1).await;
    // 1,612,904 bytes are 0.50000024 cents, and 1,612,903 bytes are 0.49999993 cents.
    fixture.traffic(&id, "user0001", "2026-08-02", PLAN_BYTES_PER_ACCOUNT + 1_612_904, 0).await;
    fixture.traffic(&id, "user0001", "2026-08-03", 1_612_903, 0).await;
    let settled = fixture.settle_at("2026-08-04T00:05:00Z").await;
    let amounts: Vec<(String, u64, i64)> = settled
        .charges
        .iter()
        .map(|charge| (charge.day.clone(), charge.quantity, charge.amount_cents))
        .collect();
    assert_eq!(
        amounts,
        [("2026-08-02".to_owned(), 1_612_904, 1), ("2026-08-03".to_owned(), 1_612_903, 0)]
    );
    assert_eq!(fixture.report("2026-08", "rounder").await.payg_cents, 1);
}

#[tokio::test]
async fn settlement_waits_and_runs_once() {
    let fixture = fixture("2026-09-01T10:00:00Z").await;
    let id = fixture.instance("settler", "eu-central-1", 5, 1).await;
    fixture.traffic(&id, "user0001", "2026-09-01", 6 * GB, 0).await;
    // The day's data is settled 5 minutes after the day ends, not before.
    let early = fixture.settle_at("2026-09-02T00:04:59Z").await;
    assert!(early.days.is_empty(), "{early:#?}");
    let settled = fixture.settle_at("2026-09-02T00:05:00Z").await;
    assert_eq!(settled.days, ["2026-09-01"]);
    assert_eq!(settled.charges.len(), 1);
    let again = fixture.settle_at("2026-09-02T00:06:00Z").await;
    assert!(again.days.is_empty(), "{again:#?}");
    assert!(again.charges.is_empty(), "{again:#?}");
    assert_eq!(fixture.billing.settled_through().await.unwrap(), Some(day("2026-09-01")));
}

#[tokio::test]
async fn statements_payments_and_due_dates() {
    let fixture = fixture("2026-10-20T10:00:00Z").await;
    fixture.instance("payer", "eu-central-1", 10, 1).await;
    let month = "2026-10".to_owned();
    let request = |amount_cents| PaymentRequest {
        owner: "payer".to_owned(),
        month: month.clone(),
        amount_cents,
        reference: Some("bank transfer 42".to_owned()),
    };
    let error = fixture.billing.pay(&request(100)).await.unwrap_err();
    assert!(matches!(error, AdminError::NotFound { .. }), "not issued yet: {error}");

    let settled = fixture.settle_at("2026-11-01T00:05:00Z").await;
    assert_eq!(settled.statements.len(), 1);
    let statement = &settled.statements[0];
    assert_eq!(statement.amount_cents, 6_960);
    assert_eq!(statement.due_date, "2026-11-15");
    assert_eq!(statement.overdue_at, at("2026-11-16T00:00:00Z"));
    assert_eq!(statement.state, StatementState::Open);

    for cents in [0, -1] {
        let error = fixture.billing.pay(&request(cents)).await.unwrap_err();
        let AdminError::Invalid(invalid) = &error else { panic!("{cents}: {error}") };
        assert_eq!(invalid.field, "amount");
    }
    let error = fixture.billing.pay(&request(6_961)).await.unwrap_err();
    let AdminError::Refused(message) = &error else { panic!("{error}") };
    assert!(message.contains("exceeds the balance of 69.60 USD"), "{message}");

    let receipt = fixture.billing.pay(&request(2_000)).await.unwrap();
    assert_eq!(receipt.statement.paid_cents, 2_000);
    assert_eq!(receipt.statement.balance_cents, 4_960);
    assert_eq!(receipt.statement.state, StatementState::Open);
    let overdue = at("2026-11-16T00:00:00Z");
    let just_before = overdue - chrono::Duration::seconds(1);
    assert!(fixture.billing.overdue_owners(just_before).await.unwrap().is_empty());
    assert!(fixture.billing.overdue_owners(overdue).await.unwrap().contains("payer"));

    fixture.clock.set(at("2026-11-17T09:00:00Z"));
    let receipt = fixture.billing.pay(&request(4_960)).await.unwrap();
    assert_eq!(receipt.statement.balance_cents, 0);
    assert_eq!(receipt.statement.state, StatementState::Paid);
    assert!(fixture.billing.overdue_owners(at("2026-11-17T09:00:00Z")).await.unwrap().is_empty());
    let statements = fixture.billing.statements(Some("payer"), overdue).await.unwrap();
    assert_eq!(statements.len(), 1);
    assert_eq!(statements[0].paid_cents, 6_960);
}

#[tokio::test]
async fn report_lines_add_up_to_statement() {
    let fixture = fixture("2026-11-05T10:00:00Z").await;
    let id = fixture.instance("lines", "cn-hangzhou", 5, 2).await;
    fixture.clock.set(at("2026-11-05T11:00:00Z"));
    fixture.billing.buy_package("lines", 10).await.unwrap();
    fixture.traffic(&id, "user0001", "2026-11-06", 17 * GB, 0).await;
    let settled = fixture.settle_at("2026-12-01T00:05:00Z").await;
    let report = fixture.billing.report("2026-11", Some("lines")).await.unwrap();
    let lines = report.lines();
    let items: Vec<(&str, u64, i64)> =
        lines.iter().map(|line| (line.item.as_str(), line.quantity, line.amount_cents)).collect();
    assert_eq!(
        items,
        [
            ("subscription", 2, 6_960),
            ("package", 10, 2_600),
            ("data_plan", 5 * GB, 0),
            ("data_package", 10 * GB, 0),
            ("data_payg", 2 * GB, 620),
            ("total", 0, 10_180),
        ]
    );
    assert_eq!(settled.statements.len(), 1);
    assert_eq!(settled.statements[0].amount_cents, 10_180);
    assert_eq!(report.owners[0].statement.as_ref().unwrap().amount_cents, 10_180);
}
