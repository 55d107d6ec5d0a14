//! Every field rule of instances, networks and accounts at and around its edges, through the
//! admin operations on a real SQLite store: a bad value gets an error that names the field,
//! and leaves the store exactly as it was.

use std::{net::Ipv4Addr, path::PathBuf, sync::Arc};

use chrono::{TimeZone as _, Utc};
use sag_agent::{
    admin::{
        AccountChange, Admin, AdminError, NetworkChange, NetworkChoice, NewAccount, NewInstance,
    },
    clock::ManualClock,
    roaming,
    store::Store,
    testing::netns::unique_name,
};
use sqlx::Row as _;

/// A store file in a directory of its own, removed when dropped.
struct TempStore {
    directory: PathBuf,
}

impl TempStore {
    fn new() -> Self {
        let directory = std::env::temp_dir().join(unique_name("sag-admin-test-"));
        std::fs::create_dir_all(&directory).unwrap();
        Self { directory }
    }
}

impl Drop for TempStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}

/// Returns every row of every table of the store, as text, in a stable order.
async fn dump(store: &Store) -> Vec<String> {
    let tables: Vec<String> =
        sqlx::query("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .fetch_all(store.pool())
            .await
            .unwrap()
            .iter()
            .map(|row| row.get::<String, _>("name"))
            // sqlx's own record of the migrations, which no change touches.
            .filter(|name| !name.starts_with("_sqlx"))
            .collect();
    assert!(tables.len() >= 20, "tables of the store: {tables:?}");
    let mut rows = Vec::new();
    for table in &tables {
        let query = format!("SELECT * FROM {table}");
        let mut table_rows = Vec::new();
        for row in sqlx::query(&query).fetch_all(store.pool()).await.unwrap() {
            let values: Vec<String> = (0..row.columns().len())
                .map(|index| {
                    row.try_get::<Option<i64>, _>(index)
                        .map(|value| format!("{value:?}"))
                        .or_else(|_| {
                            row.try_get::<Option<String>, _>(index)
                                .map(|value| format!("{value:?}"))
                        })
                        .or_else(|_| {
                            row.try_get::<Option<Vec<u8>>, _>(index)
                                .map(|value| format!("{value:?}"))
                        })
                        .unwrap_or_else(|error| format!("<{error}>"))
                })
                .collect();
            table_rows.push(format!("{table}: {}", values.join(" | ")));
        }
        table_rows.sort();
        rows.extend(table_rows);
    }
    rows
}

struct Fixture {
    _files: TempStore,
    admin: Admin,
    /// An instance with quota 5, blocks 10.1.0.0/24 and 10.2.0.0/30, and two accounts:
    /// `existing1` with static address 10.1.0.9 and `mover001` without one.
    instance: String,
    /// Another instance, with block 192.168.5.0/24.
    other: String,
}

async fn fixture() -> Fixture {
    let files = TempStore::new();
    let store = Store::open_sqlite(&files.directory.join("sag.db")).await.unwrap();
    let clock = Arc::new(ManualClock::new(Utc.with_ymd_and_hms(2026, 12, 4, 12, 0, 0).unwrap()));
    let admin = Admin::new(store, clock, 2_000);
    let new = |area: &str| NewInstance {
        owner: "acme".to_owned(),
        area: area.to_owned(),
        account_quota: 5,
        months: 1,
    };
    let instance = admin.create_instance(&new("cn-hangzhou")).await.unwrap().id;
    let other = admin.create_instance(&new("eu-central-1")).await.unwrap().id;
    let network = NetworkChange {
        ccn: Some(NetworkChoice::Create("office-net".to_owned())),
        cidr_blocks: Some(vec!["10.1.0.0/24".parse().unwrap(), "10.2.0.0/30".parse().unwrap()]),
        allowed_destinations: Some(vec!["172.16.0.0/12".parse().unwrap()]),
        ..NetworkChange::default()
    };
    admin.set_network(&instance, &network).await.unwrap();
    let other_network = NetworkChange {
        cidr_blocks: Some(vec!["192.168.5.0/24".parse().unwrap()]),
        ..NetworkChange::default()
    };
    admin.set_network(&other, &other_network).await.unwrap();
    let existing = NewAccount {
        username: Some("existing1".to_owned()),
        email: "existing@example.com".to_owned(),
        static_ip: Some(Ipv4Addr::new(10, 1, 0, 9)),
        ..NewAccount::default()
    };
    admin.create_account(&instance, &existing).await.unwrap();
    admin.create_account(&instance, &account("mover001")).await.unwrap();
    // mover001 is connected with the dynamic address 10.1.0.30.
    sqlx::query(
        "INSERT INTO sessions (instance_id, username, public_key, address, token_hash, \
         persistent, started_at) VALUES ($1, 'mover001', 'key', '10.1.0.30', 'hash', 0, 0)",
    )
    .bind(&instance)
    .execute(admin.store().pool())
    .await
    .unwrap();
    Fixture { _files: files, admin, instance, other }
}

fn account(username: &str) -> NewAccount {
    NewAccount {
        username: Some(username.to_owned()),
        email: "user@example.com".to_owned(),
        ..NewAccount::default()
    }
}

/// Returns a string of `length` characters: `first`, then `fill`.
fn text(first: char, fill: char, length: usize) -> String {
    std::iter::once(first).chain(std::iter::repeat(fill)).take(length).collect()
}

/// One rejected change: what it is, and the start of the error it must get.
struct Rejected {
    name: &'static str,
    change: Change,
    error_starts: String,
}

enum Change {
    Account(NewAccount),
    Network(NetworkChange),
    Bandwidth(u32),
    StaticIp(Ipv4Addr),
    /// Several account changes at once, applied to `mover001`.
    Account2(AccountChange),
    Instance(NewInstance),
}

fn nets(blocks: &[&str]) -> Vec<ipnet::Ipv4Net> {
    blocks.iter().map(|block| block.parse().unwrap()).collect()
}

fn rejected_cases() -> Vec<Rejected> {
    let case = |name, change, error_starts: &str| Rejected {
        name,
        change,
        error_starts: error_starts.to_owned(),
    };
    let with_password =
        |password: String| NewAccount { password: Some(password), ..account("passuser1") };
    let with_email = |email: String| NewAccount { email, ..account("mailuser1") };
    let ccn = |name: String| NetworkChange {
        ccn: Some(NetworkChoice::Create(name)),
        ..NetworkChange::default()
    };
    let cen = |name: String| NetworkChange {
        cen: Some(NetworkChoice::Create(name)),
        ..NetworkChange::default()
    };
    let blocks =
        |list: &[&str]| NetworkChange { cidr_blocks: Some(nets(list)), ..NetworkChange::default() };
    let with_static =
        |address: Ipv4Addr| NewAccount { static_ip: Some(address), ..account("staticuser") };
    let with_bandwidth =
        |kbps: u32| NewAccount { bandwidth_kbps: Some(kbps), ..account("banduser1") };
    vec![
        case(
            "username 6 characters",
            Change::Account(account(&text('u', 'x', 6))),
            "invalid username",
        ),
        case(
            "username 34 characters",
            Change::Account(account(&text('u', 'x', 34))),
            "invalid username",
        ),
        case("username starts with _", Change::Account(account("_username")), "invalid username"),
        case("username with a space", Change::Account(account("user name1")), "invalid username"),
        case("username with +", Change::Account(account("user+name1")), "invalid username"),
        case(
            "password 7 characters",
            Change::Account(with_password(text('P', 'x', 7))),
            "invalid password",
        ),
        case(
            "password 33 characters",
            Change::Account(with_password(text('P', 'x', 33))),
            "invalid password",
        ),
        case(
            "password starts with -",
            Change::Account(with_password("-password1".into())),
            "invalid password",
        ),
        case(
            "password with !",
            Change::Account(with_password("password!1".into())),
            "invalid password",
        ),
        case("email 1 character", Change::Account(with_email("@".into())), "invalid email"),
        case(
            "email 65 characters",
            Change::Account(with_email(text('a', 'b', 64) + "@")),
            "invalid email",
        ),
        case(
            "email without @",
            Change::Account(with_email("user.example.com".into())),
            "invalid email",
        ),
        case(
            "email with +",
            Change::Account(with_email("user+x@example.com".into())),
            "invalid email",
        ),
        case(
            "email-only, too short for a username",
            Change::Account(NewAccount { email: "a@b.cn".into(), ..NewAccount::default() }),
            "invalid email",
        ),
        case("CCN name 1 character", Change::Network(ccn("n".into())), "invalid ccn_name"),
        case(
            "CCN name 101 characters",
            Change::Network(ccn(text('n', 'x', 101))),
            "invalid ccn_name",
        ),
        case(
            "CCN name starts with a digit",
            Change::Network(ccn("1office".into())),
            "invalid ccn_name",
        ),
        case("CCN name with a dot", Change::Network(ccn("office.net".into())), "invalid ccn_name"),
        case(
            "CCN name taken",
            Change::Network(ccn("office-net".into())),
            "ccn_name \"office-net\" is already used",
        ),
        case("CEN name 1 character", Change::Network(cen("e".into())), "invalid cen_name"),
        case(
            "CEN name 101 characters",
            Change::Network(cen(text('e', 'x', 101))),
            "invalid cen_name",
        ),
        case(
            "CEN name starts with _",
            Change::Network(cen("_enterprise".into())),
            "invalid cen_name",
        ),
        case(
            "unknown CCN ID",
            Change::Network(NetworkChange {
                ccn: Some(NetworkChoice::Existing("ccn-nonexistent00".into())),
                ..NetworkChange::default()
            }),
            "ccn ccn-nonexistent00 not found",
        ),
        case("bandwidth 0", Change::Account(with_bandwidth(0)), "invalid bandwidth"),
        case("bandwidth 2,001", Change::Account(with_bandwidth(2_001)), "invalid bandwidth"),
        case("bandwidth change to 0", Change::Bandwidth(0), "invalid bandwidth"),
        case("bandwidth change to 2,001", Change::Bandwidth(2_001), "invalid bandwidth"),
        case(
            "6 CIDR blocks",
            Change::Network(blocks(&[
                "10.1.0.0/24",
                "10.2.0.0/30",
                "10.3.0.0/24",
                "10.4.0.0/24",
                "10.5.0.0/24",
                "10.6.0.0/24",
            ])),
            "invalid cidr_blocks",
        ),
        case("no CIDR block", Change::Network(blocks(&[])), "invalid cidr_blocks"),
        case(
            "DNS server 0.0.0.0",
            Change::Network(NetworkChange {
                dns_active: Some(Some(Ipv4Addr::UNSPECIFIED)),
                ..NetworkChange::default()
            }),
            "invalid dns_active 0.0.0.0",
        ),
        case("CEN name with a space", Change::Network(cen("my cen".into())), "invalid cen_name"),
        case(
            "good static IP with a bad bandwidth",
            Change::Account2(AccountChange {
                static_ip: Some(Some(Ipv4Addr::new(10, 1, 0, 50))),
                bandwidth_kbps: Some(0),
                enabled: Some(false),
            }),
            "invalid bandwidth",
        ),
        case(
            "allowed destination inside the client blocks",
            Change::Network(NetworkChange {
                allowed_destinations: Some(nets(&["10.1.0.0/25"])),
                ..NetworkChange::default()
            }),
            "invalid allowed_destinations",
        ),
        case(
            "allowed destination listed twice",
            Change::Network(NetworkChange {
                allowed_destinations: Some(nets(&["172.16.0.0/12", "172.16.0.0/12"])),
                ..NetworkChange::default()
            }),
            "invalid allowed_destinations",
        ),
        case(
            "blocks overlap each other",
            Change::Network(blocks(&["10.1.0.0/16", "10.1.5.0/24"])),
            "invalid cidr_blocks",
        ),
        case(
            "block overlaps another instance",
            Change::Network(blocks(&["10.1.0.0/24", "192.168.5.128/25"])),
            "invalid cidr_blocks \"10.1.0.0/24,192.168.5.128/25\": 192.168.5.128/25 overlaps \
             192.168.5.0/24 of instance",
        ),
        case(
            "block leaves a static address out",
            Change::Network(blocks(&["10.2.0.0/30"])),
            "invalid cidr_blocks",
        ),
        case(
            "static IP outside the blocks",
            Change::Account(with_static(Ipv4Addr::new(10, 9, 0, 1))),
            "invalid static_ip",
        ),
        case(
            "static IP is the network address",
            Change::Account(with_static(Ipv4Addr::new(10, 1, 0, 0))),
            "invalid static_ip",
        ),
        case(
            "static IP is the broadcast address",
            Change::Account(with_static(Ipv4Addr::new(10, 1, 0, 255))),
            "invalid static_ip",
        ),
        case(
            "static IP of another account",
            Change::Account(with_static(Ipv4Addr::new(10, 1, 0, 9))),
            "invalid static_ip",
        ),
        case(
            "static IP held by a session",
            Change::Account(with_static(Ipv4Addr::new(10, 1, 0, 30))),
            "invalid static_ip 10.1.0.30: is in use by a session of account mover001; \
             disconnect it or pick another address",
        ),
        case(
            "static IP change to a taken one",
            Change::StaticIp(Ipv4Addr::new(10, 1, 0, 9)),
            "invalid static_ip",
        ),
        case(
            "duplicate username",
            Change::Account(account("existing1")),
            "invalid username \"existing1\": already used",
        ),
        case(
            "quota below 5",
            Change::Instance(NewInstance {
                owner: "acme".into(),
                area: "cn-hangzhou".into(),
                account_quota: 4,
                months: 1,
            }),
            "invalid account_quota",
        ),
        case(
            "quota above 1,000",
            Change::Instance(NewInstance {
                owner: "acme".into(),
                area: "cn-hangzhou".into(),
                account_quota: 1_001,
                months: 1,
            }),
            "invalid account_quota",
        ),
    ]
}

async fn apply(fixture: &Fixture, change: &Change) -> Result<(), AdminError> {
    let admin = &fixture.admin;
    let instance = &fixture.instance;
    match change {
        Change::Account(new) => admin.create_account(instance, new).await.map(drop),
        Change::Network(network) => admin.set_network(instance, network).await.map(drop),
        Change::Bandwidth(kbps) => {
            admin.set_bandwidth(instance, "existing1", *kbps).await.map(drop)
        }
        Change::StaticIp(address) => {
            admin.set_static_ip(instance, "mover001", Some(*address)).await.map(drop)
        }
        Change::Account2(change) => {
            admin.change_account(instance, "mover001", change).await.map(drop)
        }
        Change::Instance(new) => admin.create_instance(new).await.map(drop),
    }
}

#[tokio::test]
async fn rejected_changes_leave_store_unchanged() {
    let fixture = fixture().await;
    let mut failures = Vec::new();
    for case in rejected_cases() {
        let before = dump(fixture.admin.store()).await;
        match apply(&fixture, &case.change).await {
            Ok(()) => failures.push(format!("{}: accepted", case.name)),
            Err(error) => {
                let message = error.to_string();
                if !message.starts_with(&case.error_starts) {
                    failures.push(format!(
                        "{}: error {message:?}, expected {:?}…",
                        case.name, case.error_starts
                    ));
                }
            }
        }
        let after = dump(fixture.admin.store()).await;
        if before != after {
            failures.push(format!("{}: store changed", case.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn accepted_edges() {
    let fixture = fixture().await;
    let admin = &fixture.admin;
    let instance = &fixture.instance;
    // Username 7 and 33 characters, password 8 and 32, bandwidth 1 and 2,000.
    let seven = NewAccount {
        password: Some(text('P', 'x', 8)),
        bandwidth_kbps: Some(1),
        ..account(&text('u', 'x', 7))
    };
    let created = admin.create_account(instance, &seven).await.unwrap();
    assert_eq!(created.password, text('P', 'x', 8));
    assert_eq!(created.account.bandwidth_kbps, 1);
    let thirty_three = NewAccount {
        password: Some(text('P', 'x', 32)),
        bandwidth_kbps: Some(2_000),
        email: "a@".to_owned(),
        ..account(&text('v', 'x', 33))
    };
    admin.create_account(instance, &thirty_three).await.unwrap();
    // Email 64 characters; username from the email.
    let email_only =
        NewAccount { email: text('m', 'x', 50) + "@example.com12", ..NewAccount::default() };
    let created = admin.create_account(instance, &email_only).await.unwrap_err();
    assert!(
        created.to_string().starts_with("invalid email"),
        "64 characters cannot be a username: {created}"
    );
    let email_only =
        NewAccount { email: "alice.smith@example.com".to_owned(), ..NewAccount::default() };
    let created = admin.create_account(instance, &email_only).await.unwrap();
    assert_eq!(created.account.username, "alice.smith@example.com");
    assert_eq!(created.password.len(), 16);
    // CCN and CEN names of 2 and 100 characters, and Chinese.
    let network = NetworkChange {
        ccn: Some(NetworkChoice::Create("cn".to_owned())),
        cen: Some(NetworkChoice::Create(text('企', '业', 100))),
        ..NetworkChange::default()
    };
    let network = admin.set_network(instance, &network).await.unwrap();
    assert_eq!(network.ccn.unwrap().name, "cn");
    assert_eq!(network.cen.unwrap().name.chars().count(), 100);
    // Five CIDR blocks.
    let five = NetworkChange {
        cidr_blocks: Some(nets(&[
            "10.1.0.0/24",
            "10.2.0.0/30",
            "10.3.0.0/24",
            "10.4.0.0/24",
            "10.5.0.0/24",
        ])),
        ..NetworkChange::default()
    };
    assert_eq!(admin.set_network(instance, &five).await.unwrap().cidr_blocks.len(), 5);
    assert_eq!(admin.list_accounts(&fixture.other).await.unwrap().len(), 0);
}

#[tokio::test]
async fn quota_full_is_rejected() {
    let fixture = fixture().await;
    let admin = &fixture.admin;
    // The fixture has two accounts; three more fill the quota of 5.
    for n in 3..=5 {
        admin.create_account(&fixture.instance, &account(&format!("member{n:02}"))).await.unwrap();
    }
    let before = dump(admin.store()).await;
    let error = admin.create_account(&fixture.instance, &account("member06")).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "account quota full: instance {} has 5 of 5 accounts; upgrade the instance or delete \
             an account",
            fixture.instance
        )
    );
    assert_eq!(dump(admin.store()).await, before);
}

#[tokio::test]
async fn trial_once_per_owner() {
    let fixture = fixture().await;
    let admin = &fixture.admin;
    let trial = admin.claim_trial("beta-corp", "cn-shanghai").await.unwrap();
    assert!(trial.trial);
    assert_eq!(trial.account_quota, 1);
    assert_eq!(trial.expires_at, Utc.with_ymd_and_hms(2027, 12, 4, 12, 0, 0).unwrap());
    let before = dump(admin.store()).await;
    let error = admin.claim_trial("beta-corp", "eu-central-1").await.unwrap_err();
    assert!(
        error.to_string().starts_with("owner \"beta-corp\" already claimed a free trial"),
        "{error}"
    );
    assert_eq!(dump(admin.store()).await, before);
}

#[tokio::test]
async fn delete_refused_with_usage_this_month() {
    let fixture = fixture().await;
    let admin = &fixture.admin;
    sqlx::query("INSERT INTO usage (instance_id, username, month, rx_bytes, tx_bytes) VALUES ($1, $2, $3, $4, $5)")
        .bind(&fixture.instance)
        .bind("existing1")
        .bind("2026-12")
        .bind(1_000i64)
        .bind(24i64)
        .execute(admin.store().pool())
        .await
        .unwrap();
    let error = admin.delete_account(&fixture.instance, "existing1").await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "account existing1 used 1024 bytes in 2026-12, the current billing cycle; disable it \
         now (account disable) and delete it next month"
    );
    assert!(admin.account(&fixture.instance, "existing1").await.is_ok());
    let disabled = admin.set_enabled(&fixture.instance, "existing1", false).await.unwrap();
    assert!(!disabled.enabled);
}

#[tokio::test]
async fn unknown_ids_are_not_found() {
    let fixture = fixture().await;
    let admin = &fixture.admin;
    let error = admin.instance("sag-0000000000000000").await.unwrap_err();
    assert_eq!(error.to_string(), "instance sag-0000000000000000 not found");
    let error = admin.set_enabled(&fixture.instance, "nobody12", true).await.unwrap_err();
    assert_eq!(error.to_string(), format!("account {}/nobody12 not found", fixture.instance));
}

#[tokio::test]
async fn password_is_stored_as_argon2id() {
    let fixture = fixture().await;
    let admin = &fixture.admin;
    let created = admin
        .create_account(
            &fixture.instance,
            &NewAccount { password: Some("Known-pass1".into()), ..account("hashed01") },
        )
        .await
        .unwrap();
    let row = sqlx::query("SELECT password_hash FROM accounts WHERE username = $1")
        .bind("hashed01")
        .fetch_one(admin.store().pool())
        .await
        .unwrap();
    let hash: String = row.try_get("password_hash").unwrap();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(!hash.contains(&created.password));
    assert!(sag_agent::credentials::verify_password("Known-pass1", &hash).unwrap());
    let reset = admin.reset_password(&fixture.instance, "hashed01", None).await.unwrap();
    let row = sqlx::query("SELECT password_hash FROM accounts WHERE username = $1")
        .bind("hashed01")
        .fetch_one(admin.store().pool())
        .await
        .unwrap();
    let hash: String = row.try_get("password_hash").unwrap();
    assert!(sag_agent::credentials::verify_password(&reset, &hash).unwrap());
    assert!(!sag_agent::credentials::verify_password("Known-pass1", &hash).unwrap());
}

#[tokio::test]
async fn trial_keeps_its_limits_on_a_faster_box() {
    let files = TempStore::new();
    let store = Store::open_sqlite(&files.directory.join("sag.db")).await.unwrap();
    let clock = Arc::new(ManualClock::new(Utc.with_ymd_and_hms(2026, 12, 4, 12, 0, 0).unwrap()));
    // This box lets accounts have up to 100 Mbit/s.
    let admin = Admin::new(store, clock, 100_000);
    let trial = admin.claim_trial("gamma-ltd", "eu-central-1").await.unwrap();
    let blocks =
        NetworkChange { cidr_blocks: Some(nets(&["10.30.0.0/24"])), ..NetworkChange::default() };
    admin.set_network(&trial.id, &blocks).await.unwrap();
    let fast = NewAccount { bandwidth_kbps: Some(2_001), ..account("trialuser") };
    let error = admin.create_account(&trial.id, &fast).await.unwrap_err();
    assert_eq!(error.to_string(), "invalid bandwidth 2001 kbit/s: must be 1 to 2000 kbit/s");
    let created = admin.create_account(&trial.id, &account("trialuser")).await.unwrap();
    assert_eq!(created.account.bandwidth_kbps, 2_000);
    let error = admin.set_bandwidth(&trial.id, "trialuser", 50_000).await.unwrap_err();
    assert!(error.to_string().starts_with("invalid bandwidth 50000 kbit/s"), "{error}");
    // One account only.
    let error = admin.create_account(&trial.id, &account("second01")).await.unwrap_err();
    assert!(error.to_string().starts_with("account quota full"), "{error}");
}

#[tokio::test]
async fn more_accepted_edges() {
    let fixture = fixture().await;
    let admin = &fixture.admin;
    // Email of 64 characters, with a username.
    let email = text('m', 'x', 52) + "@example.com";
    assert_eq!(email.chars().count(), 64);
    let long_email = NewAccount { email, ..account("longmail1") };
    admin.create_account(&fixture.other, &long_email).await.unwrap();
    // CCN name of 100 characters, CEN name of 2.
    let network = NetworkChange {
        ccn: Some(NetworkChoice::Create(text('c', '_', 100))),
        cen: Some(NetworkChoice::Create("ce".to_owned())),
        ..NetworkChange::default()
    };
    let network = admin.set_network(&fixture.other, &network).await.unwrap();
    assert_eq!(network.ccn.unwrap().name.chars().count(), 100);
    assert_eq!(network.cen.unwrap().name, "ce");
    // Bandwidth changed to 1 and to 2,000.
    assert_eq!(
        admin.set_bandwidth(&fixture.instance, "existing1", 1).await.unwrap().bandwidth_kbps,
        1
    );
    let changed = admin.set_bandwidth(&fixture.instance, "existing1", 2_000).await.unwrap();
    assert_eq!(changed.bandwidth_kbps, 2_000);
    // Several changes at once all apply.
    let change = AccountChange {
        enabled: Some(false),
        bandwidth_kbps: Some(300),
        static_ip: Some(Some(Ipv4Addr::new(10, 2, 0, 2))),
    };
    let moved = admin.change_account(&fixture.instance, "mover001", &change).await.unwrap();
    assert!(!moved.enabled);
    assert_eq!(moved.bandwidth_kbps, 300);
    assert_eq!(moved.static_ip, Some(Ipv4Addr::new(10, 2, 0, 2)));
}

#[tokio::test]
async fn deleting_source_instance_keeps_replicas() {
    let fixture = fixture().await;
    let admin = &fixture.admin;
    roaming::roam(admin, &fixture.instance, "mover001", &fixture.other).await.unwrap();
    let replica = roaming::info(admin, &fixture.other, "mover001").await.unwrap();
    assert_eq!(replica.replica_of.as_deref(), Some(fixture.instance.as_str()));
    let refused = admin.reset_password(&fixture.other, "mover001", None).await;
    assert!(refused.is_err(), "a replica's password is reset at its source");

    admin.delete_instance(&fixture.instance).await.unwrap();
    let kept = admin.account(&fixture.other, "mover001").await.unwrap();
    assert_eq!(kept.username, "mover001");
    let replica = roaming::info(admin, &fixture.other, "mover001").await.unwrap();
    assert_eq!(replica.replica_of, None);
    assert!(admin.reset_password(&fixture.other, "mover001", None).await.is_ok());
}
