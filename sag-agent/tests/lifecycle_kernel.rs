//! The lifecycle enforced in the kernel, end to end: `sag-agent run` in a gateway namespace
//! (`testing::lab`), a user connected with `sag-agent connect`, and the instance stopped by
//! the lifecycle engine. Its client's packets are dropped as `blocked`, its logins are refused,
//! and a renewal lets the traffic through again. A second test drives the billing commands
//! through the same running agent.
//!
//! The agent reads the system clock, so the test moves the expiry time instead of the clock.
//! The hidden admin command `instance set-expiry` puts it 15 days and a minute in the past.
//! Then `instance lifecycle-run` runs the engine at once, instead of within its next minute.
//!
//! A third test locks an instance for an overdue statement and unlocks it by payment.
//!
//! The tests need root, and ping and nsenter.

use std::{net::Ipv4Addr, path::Path};

use chrono::{Datelike as _, Utc};
use sag_agent::testing::lab::{connected_address, ping, settle, Lab};
use serde_json::Value;

/// Returns the state of `instance` as `instance show` prints it.
fn instance_state(lab: &Lab, instance: &str) -> String {
    let details: Value =
        serde_json::from_str(&lab.admin(&["instance", "show", instance, "--json"]).unwrap())
            .unwrap();
    details["instance"]["state"].as_str().unwrap().to_owned()
}

/// Pings the company server 5 times from user 0, and asserts that the kernel dropped every
/// echo request of `address` as `blocked` and let nothing through either way.
fn assert_pings_blocked(lab: &Lab, address: Ipv4Addr) {
    let before = lab.counters(address).unwrap().unwrap();
    assert_eq!(ping(&lab.users[0], 5, 100).unwrap(), 0);
    settle();
    let after = lab.counters(address).unwrap().unwrap();
    assert_eq!(after.rx_dropped.blocked.packets - before.rx_dropped.blocked.packets, 5);
    assert_eq!(after.rx_dropped.blocked.bytes - before.rx_dropped.blocked.bytes, 5 * 128);
    assert_eq!(after.rx_packets, before.rx_packets, "nothing passed");
    assert_eq!(after.tx_packets, before.tx_packets, "nothing came back");
}

/// Pings the company server 3 times from user 0, and asserts that all 3 passed and none was
/// dropped as `blocked`.
fn assert_pings_pass(lab: &Lab, address: Ipv4Addr) {
    let before = lab.counters(address).unwrap().unwrap();
    assert_eq!(ping(&lab.users[0], 3, 100).unwrap(), 3);
    settle();
    let after = lab.counters(address).unwrap().unwrap();
    assert_eq!(after.rx_packets - before.rx_packets, 3);
    assert_eq!(after.rx_dropped.blocked.packets, before.rx_dropped.blocked.packets);
}

/// Runs `sag-agent connect` for `username` on user 0, and asserts that the login is rejected
/// because `instance` is in `state`.
fn assert_login_rejected(
    lab: &Lab,
    fingerprint: &str,
    instance: &str,
    username: &str,
    state: &str,
) {
    let password = lab.password_file(username);
    let output = lab.try_connect(0, fingerprint, instance, username, &password).unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("instance {instance} is {state}")), "{stderr}");
}

#[test]
fn stopped_instance_blocked_until_renewed() {
    let lab =
        Lab::start(Path::new(env!("CARGO_BIN_EXE_sag-agent")), 1).expect("lab starts (as root)");
    let (instance, fingerprint) = lab.create_instance().unwrap();
    lab.create_account(&instance, "kim-lifecycle", 2_000, None).unwrap();
    let address =
        connected_address(&lab.connect(0, &fingerprint, &instance, "kim-lifecycle").unwrap())
            .unwrap();
    assert_eq!(ping(&lab.users[0], 3, 100).unwrap(), 3);

    // The expiry 15 days and a minute ago: the engine stops the instance when it runs.
    let expired = (Utc::now() - chrono::Duration::days(15) - chrono::Duration::minutes(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    lab.admin(&["instance", "set-expiry", &instance, "--expires-at", &expired]).unwrap();
    let report: Value =
        serde_json::from_str(&lab.admin(&["instance", "lifecycle-run", "--json"]).unwrap())
            .unwrap();
    let transitions = report["transitions"].as_array().unwrap();
    let stopped = transitions.iter().find(|t| t["instance_id"] == instance.as_str());
    let stopped = stopped.unwrap_or_else(|| panic!("no transition of {instance}: {report:#}"));
    assert_eq!(stopped["from"], "running");
    assert_eq!(stopped["to"], "stopped");
    assert_eq!(instance_state(&lab, &instance), "stopped");

    // Every packet of the client is dropped in the kernel as blocked, from the first one, and
    // a new login is refused, with the state in the message.
    assert_pings_blocked(&lab, address);
    assert_login_rejected(&lab, &fingerprint, &instance, "kim-lifecycle", "stopped");

    // A renewal by a month brings the expiry 15 days ahead, and the traffic back at once.
    let order: Value = serde_json::from_str(
        &lab.admin(&["instance", "renew", &instance, "--months", "1", "--json"]).unwrap(),
    )
    .unwrap();
    assert_eq!(order["instance"]["state"], "running", "{order:#}");
    assert_eq!(order["charge"]["kind"], "renewal");
    assert_eq!(order["charge"]["amount_cents"], 3_480);
    assert_pings_pass(&lab, address);

    // Released 30 days after the expiry: the client is gone from the kernel, and a login is
    // refused with the release, not as an unknown instance.
    let released = (Utc::now() - chrono::Duration::days(30) - chrono::Duration::minutes(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    lab.admin(&["instance", "set-expiry", &instance, "--expires-at", &released]).unwrap();
    lab.admin(&["instance", "lifecycle-run", "--json"]).unwrap();
    assert_eq!(lab.counters(address).unwrap(), None);
    let password = lab.password_file("kim-lifecycle");
    let output = lab.try_connect(0, &fingerprint, &instance, "kim-lifecycle", &password).unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let today = Utc::now().format("%Y-%m-%d");
    assert!(
        stderr.contains(&format!(
            "instance {instance} was released on {today}: its configuration and accounts are \
             deleted"
        )),
        "{stderr}"
    );
}

/// Writes an unpaid statement of `amount_cents` for `owner` and last month, due yesterday,
/// into the lab agent's store beside the running agent, and returns its month. The agent
/// issues statements only once a month is over, so the test writes one that is already late.
fn insert_overdue_statement(lab: &Lab, owner: &str, amount_cents: i64) -> String {
    use sqlx::Connection as _;
    let now = Utc::now();
    let this_month = now.date_naive().with_day(1).unwrap();
    let month = (this_month - chrono::Days::new(1)).format("%Y-%m").to_string();
    let due_date = (now.date_naive() - chrono::Days::new(1)).format("%Y-%m-%d").to_string();
    let issued_at = (now - chrono::Duration::days(15)).timestamp();
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(lab.dir.join("state").join("sag.db"))
        .busy_timeout(std::time::Duration::from_secs(10));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    runtime.block_on(async {
        let mut connection = sqlx::SqliteConnection::connect_with(&options).await.unwrap();
        sqlx::query(
            "INSERT INTO statements (owner, month, amount_cents, issued_at, due_date) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(owner)
        .bind(&month)
        .bind(amount_cents)
        .bind(issued_at)
        .bind(&due_date)
        .execute(&mut connection)
        .await
        .unwrap();
        connection.close().await.unwrap();
    });
    month
}

/// An owner with an overdue statement has its instance locked: the kernel drops its clients'
/// packets as `blocked` and logins are refused, until the payment unlocks it.
#[test]
fn locked_instance_blocked_until_paid() {
    let lab =
        Lab::start(Path::new(env!("CARGO_BIN_EXE_sag-agent")), 1).expect("lab starts (as root)");
    let (instance, fingerprint) = lab.create_instance().unwrap();
    lab.create_account(&instance, "lou-overdue", 2_000, None).unwrap();
    let address =
        connected_address(&lab.connect(0, &fingerprint, &instance, "lou-overdue").unwrap())
            .unwrap();
    assert_eq!(ping(&lab.users[0], 3, 100).unwrap(), 3);

    let month = insert_overdue_statement(&lab, "lab", 3_480);
    let report: Value =
        serde_json::from_str(&lab.admin(&["instance", "lifecycle-run", "--json"]).unwrap())
            .unwrap();
    // The agent's own run each minute may have locked it just before this one.
    let transitions = report["transitions"].as_array().unwrap();
    if let Some(locked) = transitions.iter().find(|t| t["instance_id"] == instance.as_str()) {
        assert_eq!(locked["from"], "running");
        assert_eq!(locked["to"], "locked");
    }
    assert_eq!(instance_state(&lab, &instance), "locked", "{report:#}");
    assert_pings_blocked(&lab, address);
    assert_login_rejected(&lab, &fingerprint, &instance, "lou-overdue", "locked");

    // Paying the statement in full unlocks the instance at once.
    let receipt: Value = serde_json::from_str(
        &lab.admin(&[
            "billing", "pay", "--owner", "lab", "--month", &month, "--amount", "34.80", "--json",
        ])
        .unwrap(),
    )
    .unwrap();
    assert_eq!(receipt["statement"]["balance_cents"], 0, "{receipt:#}");
    assert_eq!(instance_state(&lab, &instance), "running");
    assert_pings_pass(&lab, address);

    // The agent logged the account's creation, its logins and the refusal, but no password.
    let password = std::fs::read_to_string(lab.password_file("lou-overdue")).unwrap();
    let log = lab.agent_log();
    assert!(log.contains("lou-overdue"), "the agent logs the account by name:\n{log}");
    assert!(!log.contains(password.trim()), "the agent log holds the password");
}

/// Runs an admin command that must fail, and returns its error output.
fn admin_error(lab: &Lab, args: &[&str]) -> String {
    let error = lab.admin(args).expect_err("the command should fail");
    format!("{error:#}")
}

#[test]
fn billing_commands_through_the_agent() {
    let lab =
        Lab::start(Path::new(env!("CARGO_BIN_EXE_sag-agent")), 0).expect("lab starts (as root)");
    // An owner name that needs encoding in a query string.
    let owner = "Acme & Co/EU";
    let create = ["instance", "create", "--owner", owner, "--area", "cn-hangzhou"];
    let created: Value = serde_json::from_str(
        &lab.admin(&[&create[..], &["--quota", "10", "--months", "2", "--json"]].concat()).unwrap(),
    )
    .unwrap();
    let id = created[0]["id"].as_str().unwrap().to_owned();
    let month = Utc::now().format("%Y-%m").to_string();

    lab.admin(&["billing", "contact", "--owner", owner, "--email", "billing@acme.example"])
        .unwrap();
    let contact: Value = serde_json::from_str(
        &lab.admin(&["billing", "contact", "--owner", owner, "--json"]).unwrap(),
    )
    .unwrap();
    assert_eq!(contact["email"], "billing@acme.example");
    let package: Value = serde_json::from_str(
        &lab.admin(&["billing", "package", "buy", "50", "--owner", owner, "--json"]).unwrap(),
    )
    .unwrap();
    assert_eq!(package[0]["price_cents"], 12_300);
    let packages: Value = serde_json::from_str(
        &lab.admin(&["billing", "package", "list", "--owner", owner, "--json"]).unwrap(),
    )
    .unwrap();
    assert_eq!(packages.as_array().unwrap().len(), 1);

    let csv = lab.admin(&["billing", "report", "--month", &month, "--owner", owner, "--csv"]);
    let csv = csv.unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines,
        [
            "month,owner,instance,zone,item,quantity,unit,amount_usd",
            &format!("{month},Acme & Co/EU,{id},MainlandChina,subscription,2,months,139.20"),
            &format!("{month},Acme & Co/EU,,,package,50,GB,123.00"),
            &format!("{month},Acme & Co/EU,,,total,0,,262.20"),
        ]
    );
    let report: Value = serde_json::from_str(
        &lab.admin(&["billing", "report", "--month", &month, "--owner", owner, "--json"]).unwrap(),
    )
    .unwrap();
    assert_eq!(report["owners"][0]["total_cents"], 26_220);
    let table = lab.admin(&["billing", "report", "--month", &month]).unwrap();
    assert!(table.contains("subscription"), "{table}");

    // No statement before the month ends, and the order rules through the API.
    let statements: Value = serde_json::from_str(
        &lab.admin(&["billing", "statements", "--owner", owner, "--json"]).unwrap(),
    )
    .unwrap();
    assert_eq!(statements, serde_json::json!([]));
    let pay = ["billing", "pay", "--owner", owner, "--month", &month, "--amount", "262.20"];
    let error = admin_error(&lab, &pay);
    assert!(error.contains("exit status: 4"), "{error}");
    assert!(error.contains("statement of owner \"Acme & Co/EU\""), "{error}");
    let error = admin_error(&lab, &["instance", "upgrade", &id, "--quota", "12"]);
    assert!(error.contains("exit status: 3"), "{error}");
    assert!(error.contains("must be a multiple of 5"), "{error}");
    let order: Value =
        serde_json::from_str(&lab.admin(&["instance", "auto-renew", &id, "on", "--json"]).unwrap())
            .unwrap();
    assert_eq!(order["instance"]["auto_renew"], true);
    let order: Value = serde_json::from_str(
        &lab.admin(&["instance", "modify", &id, "--months", "1", "--quota", "5", "--json"])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(order["quota_change"]["account_quota"], 5);
    assert_eq!(order["charge"]["amount_cents"], 3_480);

    let dubai = ["instance", "create", "--owner", "desert", "--area", "me-east-1", "--quota", "5"];
    lab.admin(&dubai).unwrap();
    let error = admin_error(&lab, &["billing", "package", "buy", "10", "--owner", "desert"]);
    assert!(error.contains("exit status: 5"), "{error}");
    assert!(error.contains("packages are not sold in Dubai"), "{error}");
}
