//! The agent's configuration file (TOML); `deploy/agent.toml` is the commented example.

use std::path::{Path, PathBuf};

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
    /// Address that clients log in to (`HOST:PORT`), written into credentials emails.
    #[serde(default = "default_login_server")]
    pub login_server: String,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            state_dir: default_state_dir(),
            socket: default_socket(),
            pin_dir: default_pin_dir(),
            max_bandwidth_kbps: default_max_bandwidth(),
            login_server: default_login_server(),
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
    }
}
