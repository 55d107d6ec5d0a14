//! The agent's configuration file (TOML); `deploy/agent.toml` is the commented example.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{dataplane::DEFAULT_PIN_DIR, notify::MailConfig};

/// Default path of the admin API socket.
pub const DEFAULT_SOCKET: &str = "/run/sag/agent.sock";
/// Default state directory: the store and the mail outbox.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/sag";

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub agent: AgentConfig,
    /// Email settings; without them, emails go to `state_dir/outbox` as .eml files.
    pub mail: Option<MailConfig>,
}

/// Settings of the agent process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Directory of the store (`sag.db`) and the mail outbox.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Unix socket of the admin API; only root may connect.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// bpffs directory of the pinned maps.
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// Highest bandwidth an account may have, in kbit/s: 2,000 unless raised, at most
    /// 10,000,000 (10 Gbit/s).
    #[serde(default = "default_max_bandwidth")]
    pub max_bandwidth_kbps: u32,
    /// Address that clients log in to (`HOST:PORT`), written into credentials emails. Its
    /// host is also the WireGuard endpoint given to clients.
    #[serde(default = "default_login_server")]
    pub login_server: String,
    /// Address the login API listens on.
    #[serde(default = "default_login_listen")]
    pub login_listen: SocketAddr,
    /// Certificate and key (PEM) of the login API. Without them the agent makes a self-signed
    /// pair in the state directory on first start.
    pub login_cert: Option<PathBuf>,
    pub login_key: Option<PathBuf>,
    /// Address of the Prometheus endpoint, `GET /metrics`.
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: SocketAddr,
    /// First UDP port of the instances' WireGuard devices.
    #[serde(default = "default_first_wireguard_port")]
    pub first_wireguard_port: u16,
    /// Seconds without anything received from the client after which a login session ends and
    /// its dynamic address is released.
    #[serde(default = "default_session_idle_s")]
    pub session_idle_s: u64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            state_dir: default_state_dir(),
            socket: default_socket(),
            pin_dir: default_pin_dir(),
            max_bandwidth_kbps: default_max_bandwidth(),
            login_server: default_login_server(),
            login_listen: default_login_listen(),
            metrics_listen: default_metrics_listen(),
            login_cert: None,
            login_key: None,
            first_wireguard_port: default_first_wireguard_port(),
            session_idle_s: default_session_idle_s(),
        }
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}

fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}

fn default_pin_dir() -> PathBuf {
    PathBuf::from(DEFAULT_PIN_DIR)
}

/// Port of the login API when the configuration names none.
pub const DEFAULT_LOGIN_PORT: u16 = 8443;

fn default_login_server() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    format!("{host}:{DEFAULT_LOGIN_PORT}")
}

fn default_login_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], DEFAULT_LOGIN_PORT))
}

/// Default port of the Prometheus endpoint.
pub const DEFAULT_METRICS_PORT: u16 = 9108;

fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], DEFAULT_METRICS_PORT))
}

fn default_first_wireguard_port() -> u16 {
    crate::gateway::DEFAULT_FIRST_WIREGUARD_PORT
}

fn default_session_idle_s() -> u64 {
    crate::gateway::DEFAULT_SESSION_IDLE_S
}

/// Shortest idle time of a session, in seconds. A connected client that sends only keepalives
/// (which carry no bytes the gateway can count) shakes hands again once its keys expire, 180 s
/// after the last handshake, at its next 25-second keepalive; the agent looks every 10 s.
pub const MIN_SESSION_IDLE_S: u64 = 240;
/// Longest idle time of a session, in seconds: one day.
pub const MAX_SESSION_IDLE_S: u64 = 86_400;

fn default_max_bandwidth() -> u32 {
    sag_common::policy::MAX_ACCOUNT_BANDWIDTH_KBPS
}

/// Errors of reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read the configuration file {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid configuration file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid agent.max_bandwidth_kbps {0}: must be 1 to 10000000 kbit/s")]
    Bandwidth(u32),
    #[error("invalid agent.session_idle_s {0}: must be {MIN_SESSION_IDLE_S} to {MAX_SESSION_IDLE_S} seconds")]
    SessionIdle(u64),
    #[error("invalid agent.first_wireguard_port 0: must be 1 to 65535")]
    WireguardPort,
    #[error("agent.login_cert and agent.login_key go together: give both or neither")]
    LoginCertPair,
    #[error("invalid agent.login_server {0:?}: must be HOST:PORT")]
    LoginServer(String),
}

impl Config {
    /// Reads and checks the configuration file at `path`.
    ///
    /// # Errors
    /// Fails if the file cannot be read, is not valid TOML, has an unknown key, or a value
    /// breaks its rule. The message names the key.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(path, &text)
    }

    /// Parses configuration text; `path` is used in messages.
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            message: error.message().to_owned()
                + &error
                    .span()
                    .map(|span| {
                        let line = text[..span.start].matches('\n').count() + 1;
                        format!(" (line {line})")
                    })
                    .unwrap_or_default(),
        })?;
        let bandwidth = config.agent.max_bandwidth_kbps;
        if !(1..=sag_common::policy::MAX_BOX_BANDWIDTH_KBPS).contains(&bandwidth) {
            return Err(ConfigError::Bandwidth(bandwidth));
        }
        let agent = &config.agent;
        if !(MIN_SESSION_IDLE_S..=MAX_SESSION_IDLE_S).contains(&agent.session_idle_s) {
            return Err(ConfigError::SessionIdle(agent.session_idle_s));
        }
        if agent.first_wireguard_port == 0 {
            return Err(ConfigError::WireguardPort);
        }
        if agent.login_cert.is_some() != agent.login_key.is_some() {
            return Err(ConfigError::LoginCertPair);
        }
        if config.login_host().is_none() {
            return Err(ConfigError::LoginServer(agent.login_server.clone()));
        }
        Ok(config)
    }

    /// Returns the email settings: the configured ones, or an outbox in the state directory.
    pub fn mail(&self) -> MailConfig {
        self.mail.clone().unwrap_or_else(|| MailConfig {
            from: "sag-agent@localhost".to_owned(),
            smtp: None,
            outbox_dir: self.agent.state_dir.join("outbox"),
        })
    }

    /// Returns the host part of `login_server`, without brackets around an IPv6 address.
    pub fn login_host(&self) -> Option<&str> {
        let (host, port) = self.agent.login_server.rsplit_once(':')?;
        port.parse::<u16>().ok().filter(|port| *port != 0)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        (!host.is_empty()).then_some(host)
    }

    /// Returns the path of the store file.
    pub fn store_path(&self) -> PathBuf {
        self.agent.state_dir.join("sag.db")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let config = Config::parse(Path::new("agent.toml"), "").unwrap();
        assert_eq!(config.agent.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(config.agent.max_bandwidth_kbps, 2_000);
        assert_eq!(config.store_path(), PathBuf::from("/var/lib/sag/sag.db"));
    }

    #[test]
    fn unknown_key_is_named() {
        let error =
            Config::parse(Path::new("agent.toml"), "[agent]\nsocket = \"/x\"\nsokcet = 1\n")
                .unwrap_err()
                .to_string();
        assert!(error.contains("unknown field `sokcet`"), "{error}");
        assert!(error.contains("line 3"), "{error}");
    }

    #[test]
    fn session_idle_edges() {
        for (value, valid) in [(239, false), (240, true), (86_400, true), (86_401, false)] {
            let text = format!("[agent]\nsession_idle_s = {value}\n");
            assert_eq!(Config::parse(Path::new("a.toml"), &text).is_ok(), valid, "{value}");
        }
    }

    #[test]
    fn login_settings_are_checked() {
        let parse =
            |text: &str| Config::parse(Path::new("a.toml"), text).map_err(|e| e.to_string());
        assert_eq!(
            parse("[agent]\nlogin_cert = \"/c.pem\"\n").unwrap_err(),
            "agent.login_cert and agent.login_key go together: give both or neither"
        );
        assert_eq!(
            parse("[agent]\nlogin_server = \"gw.example.net\"\n").unwrap_err(),
            "invalid agent.login_server \"gw.example.net\": must be HOST:PORT"
        );
        assert_eq!(
            parse("[agent]\nfirst_wireguard_port = 0\n").unwrap_err(),
            "invalid agent.first_wireguard_port 0: must be 1 to 65535"
        );
        let config = parse("[agent]\nlogin_server = \"[2001:db8::1]:8443\"\n").unwrap();
        assert_eq!(config.login_host(), Some("2001:db8::1"));
        let config = parse("[agent]\nlogin_server = \"gw.example.net:443\"\n").unwrap();
        assert_eq!(config.login_host(), Some("gw.example.net"));
        assert_eq!(config.agent.login_listen, "0.0.0.0:8443".parse().unwrap());
    }

    #[test]
    fn bandwidth_ceiling_edges() {
        for (value, valid) in [(0, false), (1, true), (10_000_000, true), (10_000_001, false)] {
            let text = format!("[agent]\nmax_bandwidth_kbps = {value}\n");
            assert_eq!(Config::parse(Path::new("a.toml"), &text).is_ok(), valid, "{value}");
        }
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    #[test]
    fn shipped_example_parses_to_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml");
        let config = Config::load(&path).unwrap();
        let defaults = AgentConfig::default();
        assert_eq!(config.agent.state_dir, defaults.state_dir);
        assert_eq!(config.agent.socket, defaults.socket);
        assert_eq!(config.agent.pin_dir, defaults.pin_dir);
        assert_eq!(config.agent.max_bandwidth_kbps, defaults.max_bandwidth_kbps);
        assert_eq!(config.agent.login_listen, defaults.login_listen);
        assert_eq!(config.agent.metrics_listen, defaults.metrics_listen);
        assert_eq!(config.agent.first_wireguard_port, defaults.first_wireguard_port);
        assert_eq!(config.agent.session_idle_s, defaults.session_idle_s);
    }
}
