//! The WireGuard side of the box: one gotatun device per instance, and the sessions of the
//! clients that logged in on them.
//!
//! A login checks the credentials and picks the client's address. It adds the client's key as a
//! peer whose only allowed IP is that address, and writes the address with the account's limits
//! into the kernel maps, so that the programs on the device count and police it. Sessions are
//! kept in the store, so that the peers come back after a restart.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use chrono::{DateTime, Utc};
use gotatun::{
    device::{DefaultDeviceTransports, Device, Peer},
    x25519::{PublicKey, StaticSecret},
};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use sqlx::Row as _;
use tracing::{info, warn};

use crate::{
    admin::{Account, Admin, AdminError, Instance, Network, STATE_RUNNING},
    clock::Clock,
    kernel::{KernelError, KernelSync},
    netlink::{self, Netlink, NetlinkError},
    pools,
    wgconfig::{KeyPair, DEFAULT_PERSISTENT_KEEPALIVE_S, TUNNEL_MTU},
};

/// First UDP port of the instances' WireGuard devices; each instance takes the lowest free
/// port from here on.
pub const DEFAULT_FIRST_WIREGUARD_PORT: u16 = 51_820;
/// A login session ends when its peer has sent no data and made no handshake for this long, in
/// seconds. An idle connected client still shakes hands at least every 205 s or so.
pub const DEFAULT_SESSION_IDLE_S: u64 = 300;
/// Failed logins, per account and per source address, after which logins are refused...
pub const MAX_LOGIN_FAILURES: u32 = 5;
/// ...until this many seconds have passed since the first of them.
pub const LOGIN_FAILURE_WINDOW_S: i64 = 300;
/// Throttle entries kept before old ones are dropped, so that a flood of sources cannot
/// exhaust memory.
const MAX_THROTTLE_ENTRIES: usize = 65_536;
/// How often idle sessions are looked for, at most.
const IDLE_SCAN_INTERVAL: Duration = Duration::from_secs(10);

/// The gateway's WireGuard device type.
type WgDevice = Device<DefaultDeviceTransports>;

/// Settings of the tunnels, from the configuration file.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    /// Host name or address that clients reach the box's WireGuard ports at.
    pub endpoint_host: String,
    /// First UDP port for instance devices.
    pub first_port: u16,
    /// Idle time after which a login session ends.
    pub session_idle: Duration,
}

/// Login request of a client.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoginRequest {
    pub instance: String,
    pub username: String,
    pub password: String,
    /// The client's WireGuard public key, base64.
    pub public_key: String,
    /// True for an exported configuration: the session stays until it is replaced or logged
    /// out, instead of ending when idle.
    #[serde(default)]
    pub persistent: bool,
}

/// Reply to a successful login.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginReply {
    /// The client's address in the tunnel.
    pub address: Ipv4Addr,
    /// DNS servers of the instance, active first.
    pub dns: Vec<Ipv4Addr>,
    /// The gateway's WireGuard public key, base64.
    pub gateway_public_key: String,
    /// The gateway's WireGuard endpoint, `HOST:PORT`.
    pub endpoint: String,
    /// Networks to route through the tunnel.
    pub routes: Vec<Ipv4Net>,
    pub mtu: u16,
    pub persistent_keepalive_s: u16,
    /// Token that ends this session through `POST /v1/logout`.
    pub token: String,
}

/// Logout request of a client.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogoutRequest {
    pub instance: String,
    pub username: String,
    pub token: String,
}

/// Reason a login or logout was rejected. The messages are for the end user.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("invalid {field} {value:?}: {rule}")]
    Invalid { field: &'static str, rule: &'static str, value: String },
    #[error("wrong username or password for instance {instance}")]
    WrongCredentials { instance: String },
    #[error("instance {0} not found; check the instance ID in your email")]
    UnknownInstance(String),
    #[error("account {username} of instance {instance} is disabled; ask your admin to enable it")]
    Disabled { instance: String, username: String },
    #[error("instance {instance} is {state}; logins are refused until it runs again")]
    InstanceNotRunning { instance: String, state: String },
    #[error(
        "instance {instance} was released on {day}: its configuration and accounts are deleted"
    )]
    Released { instance: String, day: String },
    #[error("too many failed logins; try again in {retry_after_s} s")]
    Throttled { retry_after_s: i64 },
    #[error("instance {0} has no tunnel yet: its admin must set its private CIDR blocks")]
    NoTunnel(String),
    #[error("public key {0} is already in use by another session; generate a new key pair")]
    KeyInUse(String),
    #[error("no session of {username} on instance {instance} with that token")]
    NoSession { instance: String, username: String },
    #[error(transparent)]
    PoolFull(#[from] pools::PoolFull),
    #[error("login failed on the gateway: {0}")]
    Internal(String),
}

impl From<AdminError> for LoginError {
    fn from(error: AdminError) -> Self {
        Self::Internal(format!("{:#}", anyhow::Error::from(error)))
    }
}

impl From<KernelError> for LoginError {
    fn from(error: KernelError) -> Self {
        Self::Internal(format!("{:#}", anyhow::Error::from(error)))
    }
}

impl From<sqlx::Error> for LoginError {
    fn from(error: sqlx::Error) -> Self {
        Self::Internal(format!("store: {error}"))
    }
}

/// Errors of bringing a tunnel up or down.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("failed to create the WireGuard device {name} on UDP port {port}: {message}")]
    Device { name: String, port: u16, message: String },
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("invalid WireGuard key of instance {0} in the store")]
    StoredKey(String),
}

impl From<sqlx::Error> for TunnelError {
    fn from(error: sqlx::Error) -> Self {
        Self::Admin(AdminError::from(error))
    }
}

/// The WireGuard device of one instance.
struct Tunnel {
    device: WgDevice,
    name: String,
    ifindex: u32,
    port: u16,
    public_key: PublicKey,
    routes: Vec<Ipv4Net>,
    /// The peer key and address of each session, by username.
    peers: HashMap<String, (PublicKey, Ipv4Addr)>,
}

/// Public facts about an instance's tunnel, for `instance show`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelInfo {
    pub interface: String,
    pub listen_port: u16,
    pub public_key: String,
    pub endpoint: String,
    /// Connected sessions.
    pub sessions: usize,
}

/// A session and how long ago its peer last shook hands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionHandshake {
    pub instance_id: String,
    pub username: String,
    pub address: Ipv4Addr,
    /// Time since the last handshake, `None` before the first.
    pub since_handshake: Option<Duration>,
}

/// A session, as stored.
#[derive(Debug, Clone)]
struct Session {
    username: String,
    public_key: String,
    address: Ipv4Addr,
    persistent: bool,
    started_at: DateTime<Utc>,
}

/// Counts failed logins per key (an account or a source address).
#[derive(Default)]
struct Throttle {
    failures: HashMap<String, (u32, DateTime<Utc>)>,
}

impl Throttle {
    /// Returns how many seconds `key` must still wait, if it is throttled.
    fn retry_after(&self, key: &str, now: DateTime<Utc>) -> Option<i64> {
        let (count, first) = self.failures.get(key)?;
        let elapsed = (now - *first).num_seconds();
        (*count >= MAX_LOGIN_FAILURES && elapsed < LOGIN_FAILURE_WINDOW_S)
            .then_some(LOGIN_FAILURE_WINDOW_S - elapsed)
    }

    fn fail(&mut self, key: String, now: DateTime<Utc>) {
        if self.failures.len() >= MAX_THROTTLE_ENTRIES {
            self.failures
                .retain(|_, (_, first)| (now - *first).num_seconds() < LOGIN_FAILURE_WINDOW_S);
        }
        let entry = self.failures.entry(key).or_insert((0, now));
        if (now - entry.1).num_seconds() >= LOGIN_FAILURE_WINDOW_S {
            *entry = (0, now);
        }
        entry.0 += 1;
    }

    fn clear(&mut self, key: &str) {
        self.failures.remove(key);
    }
}

/// The instances' tunnels and their sessions.
pub struct Gateway {
    admin: Admin,
    kernel: Arc<KernelSync>,
    netlink: Netlink,
    settings: GatewaySettings,
    clock: Arc<dyn Clock>,
    tunnels: tokio::sync::Mutex<HashMap<String, Tunnel>>,
    throttle: Mutex<Throttle>,
    /// Bytes received from each session's peer at the last idle scan, and when they last grew,
    /// by public key.
    activity: Mutex<HashMap<String, (usize, DateTime<Utc>)>>,
    /// When this gateway was created. A session restored from the store after a restart is
    /// watched from here, since the peers it had before have not had time to shake hands.
    watching_since: DateTime<Utc>,
}

/// Returns the name of an instance's tunnel device.
pub fn tunnel_name(instance: &Instance) -> String {
    format!("sagwg{}", instance.kernel_number)
}

fn parse_public_key(text: &str) -> Result<PublicKey, LoginError> {
    let invalid = || LoginError::Invalid {
        field: "public_key",
        rule: "must be a WireGuard public key: 32 bytes in base64 (44 characters)",
        value: text.to_owned(),
    };
    let bytes: [u8; 32] =
        STANDARD.decode(text).map_err(|_| invalid())?.try_into().map_err(|_| invalid())?;
    Ok(PublicKey::from(bytes))
}

fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes()).iter().map(|byte| format!("{byte:02x}")).collect()
}

fn new_token() -> String {
    let bytes: [u8; 32] = rand::Rng::r#gen(&mut rand::rngs::OsRng);
    STANDARD.encode(bytes)
}

/// Returns the networks a client of `network` routes through the tunnel: the allowed
/// destinations, and the instance's own blocks when clients may reach each other.
pub fn client_routes(network: &Network) -> Vec<Ipv4Net> {
    let mut routes = network.allowed_destinations.clone();
    if network.client_to_client {
        routes.extend(network.cidr_blocks.iter().copied());
    }
    routes.sort();
    routes.dedup();
    routes
}

/// Returns whether a login session is idle at `now`: its peer sent nothing since
/// `last_active`, its last handshake (`None` before the first) is as old, and the gateway
/// has watched it since `watched_from` for at least `idle`.
fn is_idle(
    now: DateTime<Utc>,
    last_active: DateTime<Utc>,
    handshake: Option<Duration>,
    watched_from: DateTime<Utc>,
    idle: Duration,
) -> bool {
    let since = |time: DateTime<Utc>| (now - time).to_std().unwrap_or(Duration::ZERO);
    let quiet = since(last_active).min(handshake.unwrap_or(Duration::MAX));
    quiet >= idle && since(watched_from) >= idle
}

impl Gateway {
    /// Creates the gateway; no tunnel is up until [`Gateway::start`].
    ///
    /// # Errors
    /// Fails if the netlink socket cannot be opened.
    pub fn new(
        admin: Admin,
        kernel: Arc<KernelSync>,
        settings: GatewaySettings,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, TunnelError> {
        Ok(Self {
            admin,
            kernel,
            netlink: Netlink::connect()?,
            settings,
            watching_since: clock.now(),
            clock,
            tunnels: tokio::sync::Mutex::new(HashMap::new()),
            throttle: Mutex::new(Throttle::default()),
            activity: Mutex::new(HashMap::new()),
        })
    }

    /// Turns on IPv4 forwarding and brings up the tunnel of every instance that has CIDR
    /// blocks, with the peers of its stored sessions.
    ///
    /// # Errors
    /// Fails on the first tunnel that cannot be brought up.
    pub async fn start(&self) -> Result<(), TunnelError> {
        netlink::enable_ipv4_forwarding()?;
        for instance in self.admin.list_instances().await? {
            let network = self.admin.network(&instance.id).await?;
            self.sync_instance(&instance, &network).await?;
        }
        Ok(())
    }

    /// Brings an instance's tunnel in step with its network: up with routes for its blocks
    /// when it has any, down otherwise. Call after the instance's network changed.
    ///
    /// # Errors
    /// Fails if the device, its routes or the programs cannot be set up.
    pub async fn sync_instance(
        &self,
        instance: &Instance,
        network: &Network,
    ) -> Result<(), TunnelError> {
        let mut tunnels = self.tunnels.lock().await;
        if network.cidr_blocks.is_empty() {
            if let Some(tunnel) = tunnels.remove(&instance.id) {
                self.take_down(tunnel).await?;
            }
            return Ok(());
        }
        if !tunnels.contains_key(&instance.id) {
            let tunnel = self.bring_up(instance).await?;
            tunnels.insert(instance.id.clone(), tunnel);
        }
        let tunnel = tunnels.get_mut(&instance.id).expect("inserted above");
        for block in &network.cidr_blocks {
            self.netlink.replace_route(*block, tunnel.ifindex).await?;
        }
        for stale in tunnel.routes.iter().filter(|route| !network.cidr_blocks.contains(route)) {
            self.netlink.delete_route(*stale, tunnel.ifindex).await?;
        }
        tunnel.routes = network.cidr_blocks.clone();

        // A session whose address left the blocks has no route any more: end it, so that the
        // client logs in again and gets an address of the new blocks.
        let outside: Vec<(String, PublicKey, Ipv4Addr)> = tunnel
            .peers
            .iter()
            .filter(|(_, (_, address))| !network.cidr_blocks.iter().any(|b| b.contains(address)))
            .map(|(username, (key, address))| (username.clone(), *key, *address))
            .collect();
        for (username, key, address) in outside {
            sqlx::query("DELETE FROM sessions WHERE instance_id = $1 AND username = $2")
                .bind(&instance.id)
                .bind(&username)
                .execute(self.admin.store().pool())
                .await?;
            tunnel.peers.remove(&username);
            self.drop_peer(tunnel, &key, address, None).await;
            info!(instance = instance.id, username, ip = %address, "session ended: address outside the new blocks");
        }
        Ok(())
    }

    /// Takes an instance's tunnel down and drops it from the gateway, before the instance is
    /// deleted.
    ///
    /// # Errors
    /// Fails if the programs cannot be detached.
    pub async fn remove_instance(&self, instance: &Instance) -> Result<(), TunnelError> {
        if let Some(tunnel) = self.tunnels.lock().await.remove(&instance.id) {
            self.take_down(tunnel).await?;
        }
        Ok(())
    }

    /// Stops every device, for a clean exit. Sessions stay stored.
    pub async fn shutdown(&self) {
        let tunnels: Vec<Tunnel> = self.tunnels.lock().await.drain().map(|(_, t)| t).collect();
        for tunnel in tunnels {
            if let Err(error) = self.take_down(tunnel).await {
                warn!(error = %error, "tunnel did not come down cleanly");
            }
        }
    }

    async fn tunnel_key_and_port(
        &self,
        instance: &Instance,
    ) -> Result<(StaticSecret, u16), TunnelError> {
        let pool = self.admin.store().pool();
        let row =
            sqlx::query("SELECT private_key, listen_port FROM tunnels WHERE instance_id = $1")
                .bind(&instance.id)
                .fetch_optional(pool)
                .await?;
        let (key, port) = match row {
            Some(row) => {
                (row.try_get::<String, _>("private_key")?, row.try_get::<i64, _>("listen_port")?)
            }
            None => {
                let used: Vec<i64> = sqlx::query("SELECT listen_port FROM tunnels")
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(|row| row.try_get("listen_port"))
                    .collect::<Result<_, _>>()?;
                let port = (i64::from(self.settings.first_port)..=i64::from(u16::MAX))
                    .find(|port| !used.contains(port))
                    .ok_or_else(|| TunnelError::Device {
                        name: tunnel_name(instance),
                        port: 0,
                        message: "no free UDP port above agent.first_wireguard_port".to_owned(),
                    })?;
                let key = KeyPair::generate().private_base64();
                sqlx::query("INSERT INTO tunnels (instance_id, private_key, listen_port) VALUES ($1, $2, $3)")
                    .bind(&instance.id)
                    .bind(&key)
                    .bind(port)
                    .execute(pool)
                    .await?;
                (key, port)
            }
        };
        let bytes: [u8; 32] = STANDARD
            .decode(&key)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| TunnelError::StoredKey(instance.id.clone()))?;
        let port = u16::try_from(port).map_err(|_| TunnelError::StoredKey(instance.id.clone()))?;
        Ok((StaticSecret::from(bytes), port))
    }

    async fn bring_up(&self, instance: &Instance) -> Result<Tunnel, TunnelError> {
        let name = tunnel_name(instance);
        let (secret, port) = self.tunnel_key_and_port(instance).await?;
        let public_key = PublicKey::from(&secret);
        let device_name = name.clone();
        let failed =
            move |message: String| TunnelError::Device { name: device_name.clone(), port, message };
        let device = gotatun::device::build()
            .with_default_udp()
            .create_tun(&name)
            .map_err(|error| failed(error.to_string()))?
            .with_private_key(secret)
            .build()
            .await
            .map_err(|error| failed(error.to_string()))?;
        // A device built without peers binds no socket. Setting the port binds it now, so that
        // a port in use fails here rather than at the first login.
        device.set_listen_port(port).await.map_err(|error| failed(error.to_string()))?;
        let ifindex = self.netlink.ifindex(&name).await?;
        netlink::disable_ipv6(&name)?;
        self.netlink.set_up(ifindex, u32::from(TUNNEL_MTU)).await?;
        self.kernel.attach_tunnel(&name, ifindex, instance)?;
        let mut tunnel = Tunnel {
            device,
            name,
            ifindex,
            port,
            public_key,
            routes: Vec::new(),
            peers: HashMap::new(),
        };
        for session in self.sessions(&instance.id).await? {
            let Ok(key) = parse_public_key(&session.public_key) else { continue };
            let peer = Peer::new(key)
                .with_allowed_ip(ipnetwork::IpNetwork::from(IpAddr::V4(session.address)));
            tunnel.device.add_peer(peer).await.map_err(|error| failed(error.to_string()))?;
            tunnel.peers.insert(session.username, (key, session.address));
        }
        info!(
            instance = instance.id,
            interface = tunnel.name,
            port,
            sessions = tunnel.peers.len(),
            "tunnel up"
        );
        Ok(tunnel)
    }

    async fn take_down(&self, tunnel: Tunnel) -> Result<(), TunnelError> {
        self.kernel.detach_tunnel(&tunnel.name, tunnel.ifindex)?;
        tunnel.device.stop().await;
        info!(interface = tunnel.name, "tunnel down");
        Ok(())
    }

    /// Returns the public facts of an instance's tunnel, if it is up.
    pub async fn tunnel_info(&self, instance_id: &str) -> Option<TunnelInfo> {
        let tunnels = self.tunnels.lock().await;
        let tunnel = tunnels.get(instance_id)?;
        Some(TunnelInfo {
            interface: tunnel.name.clone(),
            listen_port: tunnel.port,
            public_key: STANDARD.encode(tunnel.public_key.as_bytes()),
            endpoint: format!("{}:{}", self.settings.endpoint_host, tunnel.port),
            sessions: tunnel.peers.len(),
        })
    }

    async fn sessions(&self, instance_id: &str) -> Result<Vec<Session>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT username, public_key, address, persistent, started_at FROM sessions \
             WHERE instance_id = $1",
        )
        .bind(instance_id)
        .fetch_all(self.admin.store().pool())
        .await?;
        let mut sessions = Vec::with_capacity(rows.len());
        for row in rows {
            let address: String = row.try_get("address")?;
            let Ok(address) = address.parse() else { continue };
            sessions.push(Session {
                username: row.try_get("username")?,
                public_key: row.try_get("public_key")?,
                address,
                persistent: row.try_get::<i64, _>("persistent")? != 0,
                started_at: DateTime::from_timestamp(row.try_get("started_at")?, 0)
                    .unwrap_or_default(),
            });
        }
        Ok(sessions)
    }

    fn throttled(&self, keys: &[String]) -> Result<(), LoginError> {
        let now = self.clock.now();
        let throttle = self.throttle.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match keys.iter().filter_map(|key| throttle.retry_after(key, now)).max() {
            Some(retry_after_s) => Err(LoginError::Throttled { retry_after_s }),
            None => Ok(()),
        }
    }

    fn record_failure(&self, keys: &[String]) {
        let now = self.clock.now();
        let mut throttle = self.throttle.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for key in keys {
            throttle.fail(key.clone(), now);
        }
    }

    /// Logs a client in from `source`: checks its credentials and state, gives it an address
    /// and makes it a peer of the instance's tunnel and a client in the kernel. A previous
    /// session of the account ends. A refused login changes nothing but the failure count.
    ///
    /// # Errors
    /// Fails with the reason for the end user; see [`LoginError`].
    pub async fn login(
        &self,
        request: &LoginRequest,
        source: IpAddr,
    ) -> Result<LoginReply, LoginError> {
        let result = self.try_login(request, source).await;
        match &result {
            // The login API logs internal errors with their cause.
            Ok(_) | Err(LoginError::Internal(_)) => {}
            Err(error) => warn!(
                instance = request.instance,
                username = request.username,
                %source,
                %error,
                "login rejected"
            ),
        }
        result
    }

    async fn try_login(
        &self,
        request: &LoginRequest,
        source: IpAddr,
    ) -> Result<LoginReply, LoginError> {
        let public_key = parse_public_key(&request.public_key)?;
        let keys = [
            format!("account {}/{}", request.instance, request.username),
            format!("source {source}"),
        ];
        self.throttled(&keys)?;
        let instance = match self.admin.instance(&request.instance).await {
            Ok(instance) => instance,
            Err(AdminError::NotFound { .. }) => {
                let released =
                    sqlx::query("SELECT released_at FROM released_instances WHERE id = $1")
                        .bind(&request.instance)
                        .fetch_optional(self.admin.store().pool())
                        .await?;
                if let Some(row) = released {
                    let at: i64 = row.try_get("released_at")?;
                    return Err(LoginError::Released {
                        instance: request.instance.clone(),
                        day: DateTime::from_timestamp(at, 0)
                            .unwrap_or_default()
                            .format("%Y-%m-%d")
                            .to_string(),
                    });
                }
                self.record_failure(&keys[1..]);
                return Err(LoginError::UnknownInstance(request.instance.clone()));
            }
            Err(error) => return Err(error.into()),
        };
        let Some(account) =
            self.admin.check_password(&instance.id, &request.username, &request.password).await?
        else {
            self.record_failure(&keys);
            return Err(LoginError::WrongCredentials { instance: instance.id });
        };
        self.throttle.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clear(&keys[0]);
        if instance.state != STATE_RUNNING {
            return Err(LoginError::InstanceNotRunning {
                instance: instance.id,
                state: instance.state,
            });
        }
        if !account.enabled {
            return Err(LoginError::Disabled { instance: instance.id, username: account.username });
        }
        let network = self.admin.network(&instance.id).await?;
        let mut tunnels = self.tunnels.lock().await;
        let tunnel = tunnels
            .get_mut(&instance.id)
            .ok_or_else(|| LoginError::NoTunnel(instance.id.clone()))?;
        let sessions = self.sessions(&instance.id).await?;
        if sessions.iter().any(|session| {
            session.public_key == request.public_key && session.username != account.username
        }) {
            return Err(LoginError::KeyInUse(request.public_key.clone()));
        }
        let previous =
            sessions.iter().find(|session| session.username == account.username).cloned();
        let address = match account.static_ip {
            Some(address) => address,
            None => self.pick_address(&instance, &network, &account, &sessions).await?,
        };
        let token = new_token();
        let now = self.clock.now().timestamp();
        // The store first: if it fails, nothing else has changed.
        let mut transaction = self.admin.store().pool().begin().await?;
        sqlx::query("DELETE FROM sessions WHERE instance_id = $1 AND username = $2")
            .bind(&instance.id)
            .bind(&account.username)
            .execute(&mut *transaction)
            .await?;
        sqlx::query(
            "INSERT INTO sessions (instance_id, username, public_key, address, token_hash, \
             persistent, started_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&instance.id)
        .bind(&account.username)
        .bind(&request.public_key)
        .bind(address.to_string())
        .bind(token_hash(&token))
        .bind(i64::from(request.persistent))
        .bind(now)
        .execute(&mut *transaction)
        .await?;
        sqlx::query("UPDATE accounts SET last_ip = $1 WHERE instance_id = $2 AND username = $3")
            .bind(address.to_string())
            .bind(&instance.id)
            .bind(&account.username)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        if let Some((key, old_address)) = tunnel.peers.remove(&account.username) {
            self.drop_peer(tunnel, &key, old_address, account.static_ip).await;
        }
        let peer =
            Peer::new(public_key).with_allowed_ip(ipnetwork::IpNetwork::from(IpAddr::V4(address)));
        let applied =
            match self.kernel.apply_account(&instance, &account, None, Some(address)) {
                Ok(()) => tunnel.device.add_or_update_peer(peer).await.map_err(|error| {
                    LoginError::Internal(format!("adding the peer failed: {error}"))
                }),
                Err(error) => Err(error.into()),
            };
        if let Err(error) = applied {
            // Undo the stored session, so that a failed login leaves no address taken.
            warn!(instance = instance.id, username = account.username, error = %error, "login failed after the session was stored");
            let _ = sqlx::query("DELETE FROM sessions WHERE instance_id = $1 AND username = $2")
                .bind(&instance.id)
                .bind(&account.username)
                .execute(self.admin.store().pool())
                .await;
            self.drop_peer(tunnel, &public_key, address, account.static_ip).await;
            return Err(error);
        }
        tunnel.peers.insert(account.username.clone(), (public_key, address));
        info!(
            instance = instance.id,
            username = account.username,
            ip = %address,
            %source,
            replaced = previous.is_some(),
            "client logged in"
        );
        Ok(LoginReply {
            address,
            dns: network.dns_active.into_iter().chain(network.dns_standby).collect(),
            gateway_public_key: STANDARD.encode(tunnel.public_key.as_bytes()),
            endpoint: format!("{}:{}", self.settings.endpoint_host, tunnel.port),
            routes: client_routes(&network),
            mtu: TUNNEL_MTU,
            persistent_keepalive_s: DEFAULT_PERSISTENT_KEEPALIVE_S,
            token,
        })
    }

    /// Picks a dynamic address: not the account's last one while another is free, not a static
    /// address of any account, not the address of another session.
    async fn pick_address(
        &self,
        instance: &Instance,
        network: &Network,
        account: &Account,
        sessions: &[Session],
    ) -> Result<Ipv4Addr, LoginError> {
        let row =
            sqlx::query("SELECT last_ip FROM accounts WHERE instance_id = $1 AND username = $2")
                .bind(&instance.id)
                .bind(&account.username)
                .fetch_one(self.admin.store().pool())
                .await?;
        let last: Option<Ipv4Addr> =
            row.try_get::<Option<String>, _>("last_ip")?.and_then(|text| text.parse().ok());
        let statics: Vec<Ipv4Addr> = self
            .admin
            .list_accounts(&instance.id)
            .await?
            .iter()
            .filter_map(|other| other.static_ip)
            .collect();
        let taken = |address: Ipv4Addr| {
            statics.contains(&address)
                || sessions.iter().any(|s| s.address == address && s.username != account.username)
        };
        Ok(pools::allocate(&network.cidr_blocks, last, taken)?)
    }

    /// Removes a peer, and its address from the kernel unless it is the account's static
    /// address (which stays a client).
    async fn drop_peer(
        &self,
        tunnel: &Tunnel,
        key: &PublicKey,
        address: Ipv4Addr,
        static_ip: Option<Ipv4Addr>,
    ) {
        if let Err(error) = tunnel.device.remove_peer(key).await {
            warn!(error = %error, "removing a peer failed");
        }
        if static_ip != Some(address) {
            if let Err(error) = self.kernel.remove_client(address) {
                warn!(error = %error, ip = %address, "removing a client failed");
            }
        }
    }

    /// Ends a session by its token.
    ///
    /// # Errors
    /// Fails with [`LoginError::NoSession`] if the account has no session with that token.
    pub async fn logout(&self, request: &LogoutRequest) -> Result<(), LoginError> {
        let no_session = || LoginError::NoSession {
            instance: request.instance.clone(),
            username: request.username.clone(),
        };
        let row =
            sqlx::query("SELECT token_hash FROM sessions WHERE instance_id = $1 AND username = $2")
                .bind(&request.instance)
                .bind(&request.username)
                .fetch_optional(self.admin.store().pool())
                .await?
                .ok_or_else(no_session)?;
        let stored: String = row.try_get("token_hash")?;
        if !constant_time_eq(stored.as_bytes(), token_hash(&request.token).as_bytes()) {
            return Err(no_session());
        }
        self.end_session(&request.instance, &request.username, "logout").await
    }

    /// Ends the session of an account, if it has one: its peer goes, its dynamic address is
    /// released. Call when the account is disabled, and after it is deleted.
    ///
    /// # Errors
    /// Fails if the store cannot be updated.
    pub async fn end_session(
        &self,
        instance_id: &str,
        username: &str,
        reason: &str,
    ) -> Result<(), LoginError> {
        let mut tunnels = self.tunnels.lock().await;
        sqlx::query("DELETE FROM sessions WHERE instance_id = $1 AND username = $2")
            .bind(instance_id)
            .bind(username)
            .execute(self.admin.store().pool())
            .await?;
        let Some(tunnel) = tunnels.get_mut(instance_id) else { return Ok(()) };
        let Some((key, address)) = tunnel.peers.remove(username) else { return Ok(()) };
        let static_ip = match self.admin.account(instance_id, username).await {
            Ok(account) => account.static_ip,
            Err(_) => None,
        };
        self.drop_peer(tunnel, &key, address, static_ip).await;
        info!(instance = instance_id, username, ip = %address, reason, "session ended");
        Ok(())
    }

    /// Ends login sessions whose peer has had no handshake for the idle time (counted from
    /// the login when there was none yet). Returns how many ended.
    ///
    /// # Errors
    /// Fails if the store cannot be read.
    pub async fn end_idle_sessions(&self) -> Result<usize, LoginError> {
        let now = self.clock.now();
        let idle = self.settings.session_idle;
        // Each session with its peer's last handshake and bytes received so far.
        let mut observed = Vec::new();
        {
            let tunnels = self.tunnels.lock().await;
            for (instance_id, tunnel) in tunnels.iter() {
                let mut peers: HashMap<String, (Option<Duration>, usize)> = HashMap::new();
                for stats in tunnel.device.peers().await {
                    let key = STANDARD.encode(stats.peer.public_key.as_bytes());
                    peers.insert(key, (stats.stats.last_handshake, stats.stats.rx_bytes));
                }
                for session in self.sessions(instance_id).await? {
                    let peer = peers.get(&session.public_key).copied().unwrap_or((None, 0));
                    observed.push((instance_id.clone(), session, peer));
                }
            }
        }
        let mut idle_sessions = Vec::new();
        {
            let mut activity =
                self.activity.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            for (instance_id, session, (handshake, rx_bytes)) in &observed {
                let watched_from = session.started_at.max(self.watching_since);
                // The last time the peer sent anything: when its byte count last grew.
                let last =
                    activity.entry(session.public_key.clone()).or_insert((*rx_bytes, watched_from));
                if *rx_bytes != last.0 {
                    *last = (*rx_bytes, now);
                }
                if session.persistent {
                    continue;
                }
                if is_idle(now, last.1, *handshake, watched_from, idle) {
                    idle_sessions.push((instance_id.clone(), session.username.clone()));
                }
            }
            activity
                .retain(|key, _| observed.iter().any(|(_, session, _)| session.public_key == *key));
        }
        for (instance_id, username) in &idle_sessions {
            self.end_session(instance_id, username, "idle").await?;
        }
        Ok(idle_sessions.len())
    }

    /// Looks for idle sessions every few seconds, forever.
    pub async fn run_idle_expiry(self: Arc<Self>) {
        let period =
            IDLE_SCAN_INTERVAL.min(self.settings.session_idle / 2).max(Duration::from_secs(1));
        let mut ticker = tokio::time::interval(period);
        loop {
            ticker.tick().await;
            if let Err(error) = self.end_idle_sessions().await {
                warn!(error = %error, "idle session scan failed");
            }
        }
    }

    /// Returns every session with the time since its peer's last handshake (`None` before the
    /// first), sorted by instance and username.
    pub async fn session_handshakes(&self) -> Vec<SessionHandshake> {
        let tunnels = self.tunnels.lock().await;
        let mut sessions = Vec::new();
        for (instance_id, tunnel) in tunnels.iter() {
            let handshakes: HashMap<[u8; 32], Option<Duration>> = tunnel
                .device
                .peers()
                .await
                .into_iter()
                .map(|stats| (*stats.peer.public_key.as_bytes(), stats.stats.last_handshake))
                .collect();
            for (username, (key, address)) in &tunnel.peers {
                sessions.push(SessionHandshake {
                    instance_id: instance_id.clone(),
                    username: username.clone(),
                    address: *address,
                    since_handshake: handshakes.get(key.as_bytes()).copied().flatten(),
                });
            }
        }
        sessions.sort_by(|a, b| (&a.instance_id, &a.username).cmp(&(&b.instance_id, &b.username)));
        sessions
    }

    /// Returns the tunnel interface index of each instance whose tunnel is up.
    pub async fn tunnel_ifindexes(&self) -> Vec<(String, u32)> {
        let tunnels = self.tunnels.lock().await;
        let mut indexes: Vec<(String, u32)> =
            tunnels.iter().map(|(id, tunnel)| (id.clone(), tunnel.ifindex)).collect();
        indexes.sort();
        indexes
    }

    /// Returns the address of an account's session, if it has one.
    pub async fn session_address(&self, instance_id: &str, username: &str) -> Option<Ipv4Addr> {
        let tunnels = self.tunnels.lock().await;
        tunnels.get(instance_id)?.peers.get(username).map(|(_, address)| *address)
    }
}

fn constant_time_eq(left: &[u8], right: &[u8]) -> bool {
    left.len() == right.len()
        && left.iter().zip(right).fold(0u8, |difference, (a, b)| difference | (a ^ b)) == 0
}

/// Returns the source address of a login, for throttling.
pub fn source_of(peer: SocketAddr) -> IpAddr {
    peer.ip().to_canonical()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    #[test]
    fn restored_session_is_watched_from_restart() {
        let idle = Duration::from_secs(300);
        // Logged in at 0 with no handshake since; the agent restarted at 1,000.
        let (started, restarted) = (at(0), at(1_000));
        let watched_from = started.max(restarted);
        assert!(!is_idle(at(1_000), watched_from, None, watched_from, idle));
        assert!(!is_idle(at(1_299), watched_from, None, watched_from, idle));
        assert!(is_idle(at(1_300), watched_from, None, watched_from, idle));
        // A handshake 10 s ago keeps it, even without new bytes.
        let handshake = Some(Duration::from_secs(10));
        assert!(!is_idle(at(1_300), watched_from, handshake, watched_from, idle));
        // Without a restart, a session that has been quiet for the idle time ends.
        assert!(is_idle(at(300), started, None, started, idle));
        assert!(!is_idle(at(299), started, None, started, idle));
        // Bytes received at 200 keep it until 500.
        assert!(!is_idle(at(499), at(200), None, started, idle));
        assert!(is_idle(at(500), at(200), None, started, idle));
    }

    #[test]
    fn throttle_limit_and_window() {
        let mut throttle = Throttle::default();
        for n in 0..MAX_LOGIN_FAILURES - 1 {
            throttle.fail("a".to_owned(), at(i64::from(n)));
        }
        assert_eq!(throttle.retry_after("a", at(10)), None, "one below the limit");
        throttle.fail("a".to_owned(), at(10));
        assert_eq!(throttle.retry_after("a", at(10)), Some(LOGIN_FAILURE_WINDOW_S - 10));
        assert_eq!(throttle.retry_after("a", at(LOGIN_FAILURE_WINDOW_S - 1)), Some(1));
        assert_eq!(throttle.retry_after("a", at(LOGIN_FAILURE_WINDOW_S)), None);
        assert_eq!(throttle.retry_after("b", at(10)), None, "other keys are not throttled");
        // After the window, counting starts again.
        throttle.fail("a".to_owned(), at(LOGIN_FAILURE_WINDOW_S));
        assert_eq!(throttle.failures["a"], (1, at(LOGIN_FAILURE_WINDOW_S)));
        throttle.clear("a");
        assert!(throttle.failures.is_empty());
    }

    #[test]
    fn public_keys_are_checked() {
        let key = KeyPair::generate().public_base64();
        assert!(parse_public_key(&key).is_ok());
        for bad in ["", "abc", &key[..43], &format!("{key}A")] {
            let error = parse_public_key(bad).unwrap_err().to_string();
            assert!(error.contains("public_key") && error.contains(&format!("{bad:?}")), "{error}");
        }
    }

    #[test]
    fn routes_include_the_blocks_only_with_client_to_client() {
        let mut network = Network {
            cidr_blocks: vec!["10.8.0.0/24".parse().unwrap()],
            allowed_destinations: vec!["198.18.0.0/24".parse().unwrap()],
            ..Network::default()
        };
        assert_eq!(client_routes(&network), vec!["198.18.0.0/24".parse::<Ipv4Net>().unwrap()]);
        network.client_to_client = true;
        let routes: Vec<Ipv4Net> =
            vec!["10.8.0.0/24".parse().unwrap(), "198.18.0.0/24".parse().unwrap()];
        assert_eq!(client_routes(&network), routes);
    }

    #[test]
    fn token_hashes_are_sha256_hex() {
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(constant_time_eq(b"same", b"same"));
        assert!(!constant_time_eq(b"same", b"sane"));
        assert!(!constant_time_eq(b"same", b"samey"));
    }
}
