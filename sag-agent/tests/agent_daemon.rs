//! The agent daemon as a process: its admin API under load and after a crash. Needs root for
//! the socket's permissions.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use hyper::Method;
use sag_agent::{
    admin::{Account, CreatedAccount, Instance},
    api::{CreateAccountBody, CreateInstanceBody, NetworkBody, UpdateAccountBody},
    api_client::ApiClient,
    testing::netns::{unique_name, Netns},
};
use sqlx::Row as _;

/// A state directory, a pin directory, a network namespace and a running `sag-agent run` in
/// it, all removed when dropped. The agent brings up tunnels and a login port, so it never
/// runs in the host's namespace.
struct Daemon {
    directory: PathBuf,
    pin_dir: PathBuf,
    child: Option<Child>,
    netns: Netns,
}

impl Daemon {
    fn start() -> Self {
        let directory = std::env::temp_dir().join(unique_name("sag-daemon-"));
        let pin_dir = Path::new("/sys/fs/bpf").join(unique_name("sag-daemon-"));
        std::fs::create_dir_all(&directory).unwrap();
        let config = format!(
            "[agent]\nstate_dir = \"{0}/state\"\nsocket = \"{0}/run/agent.sock\"\n\
             pin_dir = \"{1}\"\n",
            directory.display(),
            pin_dir.display()
        );
        std::fs::write(directory.join("agent.toml"), config).unwrap();
        let netns = Netns::new("sdm").unwrap();
        let mut daemon = Self { directory, pin_dir, child: None, netns };
        daemon.spawn();
        daemon
    }

    fn socket(&self) -> PathBuf {
        self.directory.join("run/agent.sock")
    }

    /// Returns a command that runs `sag-agent` in the daemon's namespace. nsenter keeps the
    /// mounts, so the agent sees the bpffs.
    fn command(&self) -> Command {
        let mut command = Command::new("nsenter");
        command.arg(format!("--net=/run/netns/{}", self.netns.name()));
        command.arg(env!("CARGO_BIN_EXE_sag-agent"));
        command
    }

    /// Starts the process and waits until its socket accepts connections.
    fn spawn(&mut self) {
        let child = self
            .command()
            .args(["run", "--config"])
            .arg(self.directory.join("agent.toml"))
            .stderr(Stdio::null())
            .spawn()
            .expect("sag-agent starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err() {
            assert!(Instant::now() < deadline, "the agent did not open its socket");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the process with SIGKILL: nothing runs on exit.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    fn store_path(&self) -> PathBuf {
        self.directory.join("state/sag.db")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.directory);
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap()
}

async fn create_instance(client: &ApiClient, quota: u32) -> Instance {
    let body = CreateInstanceBody {
        owner: "acme".to_owned(),
        area: "eu-central-1".to_owned(),
        account_quota: quota,
        months: 1,
    };
    let instance: Instance = client.call(Method::POST, "/instances", Some(&body)).await.unwrap();
    let network = NetworkBody {
        cidr_blocks: Some(vec!["10.20.0.0/20".parse().unwrap()]),
        ..NetworkBody::default()
    };
    let path = format!("/instances/{}/network", instance.id);
    let _: serde_json::Value = client.call(Method::PATCH, &path, Some(&network)).await.unwrap();
    instance
}

/// Returns the static address of account `n`: 10.20.x.y from 10.20.0.1 on.
fn static_address(n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 20, 0, 1)) + n)
}

fn account_body(n: u32) -> CreateAccountBody {
    CreateAccountBody {
        username: Some(format!("user{n:05}")),
        email: format!("user{n}@example.com"),
        password: Some(format!("Pass-{n:05}")),
        static_ip: Some(static_address(n)),
        bandwidth_kbps: Some(1 + n % 2_000),
    }
}

#[test]
fn thousand_accounts_through_api() {
    let daemon = Daemon::start();
    let client = ApiClient::new(&daemon.socket());
    runtime().block_on(async {
        let instance = create_instance(&client, 1_000).await;
        let path = format!("/instances/{}/accounts", instance.id);
        let start = Instant::now();
        // Four requests at a time: the agent hashes passwords on blocking threads.
        let mut tasks = tokio::task::JoinSet::new();
        for worker in 0..4u32 {
            let client = client.clone();
            let path = path.clone();
            tasks.spawn(async move {
                for n in (worker..1_000).step_by(4) {
                    let _: CreatedAccount =
                        client.call(Method::POST, &path, Some(&account_body(n))).await.unwrap();
                }
            });
        }
        while let Some(result) = tasks.join_next().await {
            result.unwrap();
        }
        let elapsed = start.elapsed();
        eprintln!("created 1,000 accounts through the API in {:.1} s", elapsed.as_secs_f64());
        let accounts: Vec<Account> = client.call(Method::GET, &path, None::<&()>).await.unwrap();
        assert_eq!(accounts.len(), 1_000);
        let bob: Account =
            client.call(Method::GET, &format!("{path}/user00777"), None::<&()>).await.unwrap();
        assert_eq!(bob.static_ip, Some(static_address(777)));
        assert_eq!(bob.bandwidth_kbps, 778);
        // The quota is full now.
        let error = client
            .call::<CreatedAccount>(Method::POST, &path, Some(&account_body(1_000)))
            .await
            .unwrap_err();
        assert_eq!(error.exit_code(), 5, "{error}");
    });
}

/// Bandwidth that the stream's update gives an account.
const UPDATED_KBPS: u32 = 777;

/// Returns the update the stream makes to each even-numbered account after creating it:
/// disabled, at [`UPDATED_KBPS`], and without its static address, all in one request.
fn update_body() -> UpdateAccountBody {
    UpdateAccountBody {
        enabled: Some(false),
        bandwidth_kbps: Some(UPDATED_KBPS),
        static_ip: Some(String::new()),
    }
}

#[test]
fn crash_during_account_stream_keeps_committed_changes() {
    let mut daemon = Daemon::start();
    let client = ApiClient::new(&daemon.socket());
    let runtime = runtime();
    let instance = runtime.block_on(create_instance(&client, 1_000));
    let path = format!("/instances/{}/accounts", instance.id);

    // A stream of account creations, each even-numbered one followed by an update that
    // disables it, changes its bandwidth and frees its static address. The agent is killed
    // in the middle of it.
    let confirmed = Arc::new(Mutex::new(Vec::new()));
    let updated = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let stream = {
        let (client, path, confirmed, updated, stop) =
            (client.clone(), path.clone(), confirmed.clone(), updated.clone(), stop.clone());
        std::thread::spawn(move || {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && n < 500 {
                let result = runtime.block_on(client.call::<CreatedAccount>(
                    Method::POST,
                    &path,
                    Some(&account_body(n)),
                ));
                if result.is_ok() {
                    confirmed.lock().unwrap().push(n);
                    if n % 2 == 0 {
                        let account = format!("{path}/user{n:05}");
                        let result = runtime.block_on(client.call::<Account>(
                            Method::PATCH,
                            &account,
                            Some(&update_body()),
                        ));
                        if result.is_ok() {
                            updated.lock().unwrap().push(n);
                        }
                    }
                }
                n += 1;
            }
            n
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while confirmed.lock().unwrap().len() < 40 {
        assert!(Instant::now() < deadline, "the stream made no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    daemon.kill();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let attempted = stream.join().unwrap();
    let confirmed = confirmed.lock().unwrap().clone();
    let updated = updated.lock().unwrap().clone();

    daemon.spawn();
    runtime.block_on(async {
        let accounts: Vec<Account> = client.call(Method::GET, &path, None::<&()>).await.unwrap();
        let stored: Vec<u32> =
            accounts.iter().map(|account| account.username[4..].parse().unwrap()).collect();
        // Every confirmed account is there; at most the one in flight at the kill was
        // committed without a reply.
        for n in &confirmed {
            assert!(stored.contains(n), "confirmed account {n} lost");
        }
        assert!(
            stored.len() <= confirmed.len() + 1,
            "{} stored, {} confirmed",
            stored.len(),
            confirmed.len()
        );
        // Each account is as created or as wholly updated, never in between. A confirmed
        // update is kept. At most the one in flight was committed without a reply.
        let mut updated_stored = 0;
        for account in &accounts {
            let n: u32 = account.username[4..].parse().unwrap();
            assert!(n < attempted);
            let state = (account.enabled, account.bandwidth_kbps, account.static_ip);
            let created = (true, 1 + n % 2_000, Some(static_address(n)));
            let changed = (false, UPDATED_KBPS, None);
            if updated.contains(&n) {
                assert_eq!(state, changed, "confirmed update of account {n}");
            } else {
                assert!(state == created || state == changed, "account {n} is whole: {state:?}");
            }
            if state == changed {
                updated_stored += 1;
            }
        }
        assert!(updated_stored <= updated.len() + 1, "{updated_stored} updated, {updated:?}");
        eprintln!(
            "{} accounts and {} updates confirmed before the kill; {} accounts and {} updates \
             stored after",
            confirmed.len(),
            updated.len(),
            stored.len(),
            updated_stored
        );
    });
    // Each stored account's password hash verifies, and no static address belongs to two.
    check_store(&daemon.store_path(), &runtime);
}

fn check_store(path: &Path, runtime: &tokio::runtime::Runtime) {
    runtime.block_on(async {
        let store = sag_agent::store::Store::open_sqlite(path).await.unwrap();
        let rows = sqlx::query("SELECT username, password_hash, static_ip FROM accounts")
            .fetch_all(store.pool())
            .await
            .unwrap();
        let mut addresses = std::collections::HashSet::new();
        for row in rows {
            let username: String = row.try_get("username").unwrap();
            let hash: String = row.try_get("password_hash").unwrap();
            let n: u32 = username[4..].parse().unwrap();
            let password = format!("Pass-{n:05}");
            assert!(
                sag_agent::credentials::verify_password(&password, &hash).unwrap(),
                "{username}"
            );
            let address: Option<String> = row.try_get("static_ip").unwrap();
            if let Some(address) = address {
                assert!(addresses.insert(address), "static address of {username} used twice");
            }
        }
        store.close().await;
    });
}

#[test]
fn credentials_email_lands_in_outbox() {
    use std::os::unix::fs::PermissionsExt as _;

    use sag_agent::api::{AccountCreatedReply, PasswordBody, PasswordReply};

    let daemon = Daemon::start();
    let client = ApiClient::new(&daemon.socket());
    runtime().block_on(async {
        let instance = create_instance(&client, 5).await;
        let path = format!("/instances/{}/accounts", instance.id);
        let body = CreateAccountBody {
            email: "carol.jones@example.com".to_owned(),
            ..CreateAccountBody::default()
        };
        let reply: AccountCreatedReply =
            client.call(Method::POST, &path, Some(&body)).await.unwrap();
        assert_eq!(reply.email.delivery, "outbox");
        assert_eq!(reply.email.to, "carol.jones@example.com");
        let file = PathBuf::from(reply.email.path.expect("the outbox path"));
        assert!(file.starts_with(daemon.directory.join("state/outbox")), "{}", file.display());
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.contains("To: carol.jones@example.com"), "{text}");
        for needle in
            [instance.id.as_str(), "carol.jones@example.com", reply.created.password.as_str()]
        {
            assert!(text.contains(needle), "{needle} missing from the email");
        }
        // The connect steps carry the login address and the certificate's fingerprint, as
        // `instance show` prints them.
        let detail: sag_agent::api::InstanceDetail = client
            .call(Method::GET, &format!("/instances/{}", instance.id), None::<&()>)
            .await
            .unwrap();
        assert!(detail.login_fingerprint.starts_with("sha256:"), "{}", detail.login_fingerprint);
        // The file has CRLF line ends, and quoted-printable breaks lines over 76 characters
        // with "=" at the end.
        let text = text.replace("\r\n", "\n").replace("=\n", "");
        let fingerprint_line = format!("Fingerprint: {}\n", detail.login_fingerprint);
        assert!(text.contains(&fingerprint_line), "{fingerprint_line:?} missing from {text}");
        let connect_line = format!(
            "   sag-agent connect --server {} --fingerprint {} \\\n",
            detail.login_server, detail.login_fingerprint
        );
        assert!(text.contains(&connect_line), "{connect_line:?} missing from {text}");

        // A reset sends the new password the same way.
        let reset: PasswordReply = client
            .call(
                Method::POST,
                &format!("{path}/carol.jones@example.com/password"),
                Some(&PasswordBody::default()),
            )
            .await
            .unwrap();
        let text = std::fs::read_to_string(reset.email.path.unwrap()).unwrap();
        assert!(text.contains(&reset.password));
        assert_ne!(reset.password, reply.created.password);
    });
}

#[test]
fn kernel_follows_admin_changes() {
    use sag_agent::{api::UpdateAccountBody, dataplane::PinnedCounters};
    use sag_common::policy::{RateLimit, CLIENT_BLOCKED, ENFORCE_DESTINATIONS};

    let mut daemon = Daemon::start();
    let client = ApiClient::new(&daemon.socket());
    let runtime = runtime();
    let address = Ipv4Addr::new(10, 20, 0, 5);
    let instance = runtime.block_on(async {
        let instance = create_instance(&client, 5).await;
        let network = NetworkBody {
            allowed_destinations: Some(vec!["198.18.0.0/24".parse().unwrap()]),
            ..NetworkBody::default()
        };
        let path = format!("/instances/{}/network", instance.id);
        let _: serde_json::Value = client.call(Method::PATCH, &path, Some(&network)).await.unwrap();
        let body = CreateAccountBody {
            username: Some("static01".to_owned()),
            email: "static01@example.com".to_owned(),
            static_ip: Some(address),
            bandwidth_kbps: Some(512),
            ..CreateAccountBody::default()
        };
        let path = format!("/instances/{}/accounts", instance.id);
        let _: CreatedAccount = client.call(Method::POST, &path, Some(&body)).await.unwrap();
        instance
    });
    let pin_dir = daemon.pin_dir.clone();
    let record = |address| PinnedCounters::open(&pin_dir).unwrap().client_record(address).unwrap();

    let created = record(address).expect("the static address is a client in the kernel");
    assert_eq!(created.instance, instance.kernel_number);
    assert_eq!(created.rx, RateLimit::with_default_burst(512));
    assert_eq!(created.tx, RateLimit::with_default_burst(512));
    assert_eq!(created.flags, ENFORCE_DESTINATIONS);
    assert_eq!(created.pool_count, 1);
    assert_eq!(created.allowed_count, 1);

    // Disable, a new bandwidth and a new static address, each applied at once.
    let account_path = format!("/instances/{}/accounts/static01", instance.id);
    let moved = Ipv4Addr::new(10, 20, 0, 6);
    runtime.block_on(async {
        let update = UpdateAccountBody {
            enabled: Some(false),
            bandwidth_kbps: Some(1_000),
            static_ip: Some(moved.to_string()),
        };
        let _: Account = client.call(Method::PATCH, &account_path, Some(&update)).await.unwrap();
    });
    assert!(record(address).is_none(), "the old address left the kernel");
    let changed = record(moved).expect("the new address is a client");
    assert_eq!(changed.flags, ENFORCE_DESTINATIONS | CLIENT_BLOCKED);
    assert_eq!(changed.rx, RateLimit::with_default_burst(1_000));

    // Allowed destinations follow the instance.
    runtime.block_on(async {
        let network = NetworkBody {
            allowed_destinations: Some(vec![
                "198.18.0.0/24".parse().unwrap(),
                "172.16.0.0/12".parse().unwrap(),
            ]),
            ..NetworkBody::default()
        };
        let path = format!("/instances/{}/network", instance.id);
        let _: serde_json::Value = client.call(Method::PATCH, &path, Some(&network)).await.unwrap();
    });
    assert_eq!(record(moved).unwrap().allowed_count, 2);

    // A restarted agent writes the same record from the store.
    daemon.kill();
    daemon.spawn();
    assert_eq!(record(moved).unwrap().rx, RateLimit::with_default_burst(1_000));
    assert_eq!(record(moved).unwrap().allowed_count, 2);

    // Deleting the account removes it from the kernel.
    runtime.block_on(async {
        let _: serde_json::Value =
            client.call(Method::DELETE, &account_path, None::<&()>).await.unwrap();
    });
    assert!(record(moved).is_none());
}

#[test]
fn second_agent_refuses_a_live_socket() {
    let daemon = Daemon::start();
    let output = daemon
        .command()
        .args(["run", "--config"])
        .arg(daemon.directory.join("agent.toml"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("another agent is already running on"), "{stderr}");
    // The first agent still serves requests.
    let client = ApiClient::new(&daemon.socket());
    let instances: Vec<Instance> =
        runtime().block_on(client.call(Method::GET, "/instances", None::<&()>)).unwrap();
    assert!(instances.is_empty());
}

#[test]
fn restart_removes_stale_kernel_clients() {
    use sag_agent::dataplane::PinnedCounters;

    let mut daemon = Daemon::start();
    let client = ApiClient::new(&daemon.socket());
    let runtime = runtime();
    runtime.block_on(async {
        let instance = create_instance(&client, 5).await;
        let path = format!("/instances/{}/accounts", instance.id);
        for n in 0..2 {
            let _: CreatedAccount =
                client.call(Method::POST, &path, Some(&account_body(n))).await.unwrap();
        }
    });
    daemon.kill();
    // As if the agent had crashed between a delete's commit and its kernel update.
    runtime.block_on(async {
        let store = sag_agent::store::Store::open_sqlite(&daemon.store_path()).await.unwrap();
        sqlx::query("DELETE FROM accounts WHERE username = $1")
            .bind("user00001")
            .execute(store.pool())
            .await
            .unwrap();
        store.close().await;
    });
    let pin_dir = daemon.pin_dir.clone();
    let pinned = || PinnedCounters::open(&pin_dir).unwrap();
    assert!(pinned().client_record(static_address(1)).unwrap().is_some());
    daemon.spawn();
    assert!(pinned().client_record(static_address(1)).unwrap().is_none(), "stale client removed");
    assert!(pinned().client_record(static_address(0)).unwrap().is_some(), "stored client kept");
}

#[test]
fn malformed_body_gets_error_reply() {
    let daemon = Daemon::start();
    let client = ApiClient::new(&daemon.socket());
    runtime().block_on(async {
        let body = serde_json::json!({ "owner": 5, "area": "eu-central-1" });
        let error = client
            .call::<serde_json::Value>(Method::POST, "/instances", Some(&body))
            .await
            .unwrap_err();
        let sag_agent::api_client::ClientError::Rejected { status, reply } = &error else {
            panic!("expected an error reply, got {error:?}");
        };
        assert_eq!(*status, 422);
        assert_eq!(reply.kind, "invalid");
        assert!(reply.error.starts_with("invalid request body: "), "{}", reply.error);
        assert!(reply.error.contains("owner"), "the message names the field: {}", reply.error);
        assert_eq!(error.exit_code(), 3);
        let instances: Vec<Instance> =
            client.call(Method::GET, "/instances", None::<&()>).await.unwrap();
        assert!(instances.is_empty(), "nothing was created: {instances:?}");
    });
}
