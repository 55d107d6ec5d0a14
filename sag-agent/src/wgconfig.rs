//! WireGuard keys, and the standard client configuration (file and QR code) that the official
//! WireGuard apps on Windows, macOS, Linux, Android and iOS import.

use std::{fmt::Write as _, net::Ipv4Addr, path::Path};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use ipnet::Ipv4Net;
use x25519_dalek::{PublicKey, StaticSecret};

/// Keepalive interval that keeps NAT mappings open between client and gateway, in seconds.
pub const DEFAULT_PERSISTENT_KEEPALIVE_S: u16 = 25;
/// MTU of the tunnel on both ends, in bytes: 1,500 less the WireGuard and UDP/IP overhead.
pub const TUNNEL_MTU: u16 = 1_420;

/// Errors of keys and client configurations.
#[derive(Debug, thiserror::Error)]
pub enum WgConfigError {
    #[error("invalid {field} {value:?}: must be 32 bytes in base64 (44 characters)")]
    Key { field: &'static str, value: String },
    #[error("invalid endpoint {0:?}: must be HOST:PORT with a port from 1 to 65535")]
    Endpoint(String),
    #[error("failed to write the QR code to {path}: {message}")]
    Qr { path: String, message: String },
}

/// An X25519 key pair.
pub struct KeyPair {
    secret: StaticSecret,
}

impl KeyPair {
    /// Generates a key pair from the OS random number generator. The private key is clamped
    /// as X25519 uses it (RFC 7748), which is how `wg genkey` writes keys, so that tools show
    /// the same key as this file.
    pub fn generate() -> Self {
        let mut bytes: [u8; 32] = rand::Rng::r#gen(&mut rand::rngs::OsRng);
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        Self { secret: StaticSecret::from(bytes) }
    }

    /// Returns the private key in base64, as WireGuard writes it.
    pub fn private_base64(&self) -> String {
        STANDARD.encode(self.secret.to_bytes())
    }

    /// Returns the public key in base64.
    pub fn public_base64(&self) -> String {
        STANDARD.encode(PublicKey::from(&self.secret).as_bytes())
    }
}

/// Checks that `value` is a WireGuard key: 32 bytes in base64.
///
/// # Errors
/// Names `field` and the value.
pub fn check_key(field: &'static str, value: &str) -> Result<(), WgConfigError> {
    match STANDARD.decode(value) {
        Ok(bytes) if bytes.len() == 32 => Ok(()),
        _ => Err(WgConfigError::Key { field, value: value.to_owned() }),
    }
}

/// The settings of one client's tunnel to the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// The client's private key, in base64.
    pub private_key: String,
    /// The address the gateway assigned to the client.
    pub address: Ipv4Addr,
    /// The instance's DNS servers, active first.
    pub dns: Vec<Ipv4Addr>,
    /// The gateway's public key, in base64.
    pub server_public_key: String,
    /// The gateway's WireGuard endpoint, `HOST:PORT`.
    pub endpoint: String,
    /// The networks reached through the tunnel.
    pub allowed_ips: Vec<Ipv4Net>,
    /// Keepalive interval in seconds, or `None` for none.
    pub persistent_keepalive_s: Option<u16>,
}

impl ClientConfig {
    /// Checks the keys and the endpoint.
    ///
    /// # Errors
    /// Names the field that is wrong.
    pub fn check(&self) -> Result<(), WgConfigError> {
        check_key("private_key", &self.private_key)?;
        check_key("server_public_key", &self.server_public_key)?;
        let port = self.endpoint.rsplit_once(':').and_then(|(host, port)| {
            (!host.is_empty()).then_some(())?;
            port.parse::<u16>().ok().filter(|port| *port != 0)
        });
        if port.is_none() {
            return Err(WgConfigError::Endpoint(self.endpoint.clone()));
        }
        Ok(())
    }

    /// Renders the configuration in the format of `wg-quick` and the WireGuard apps.
    pub fn render(&self) -> String {
        let mut text = String::from("[Interface]\n");
        let _ = writeln!(text, "PrivateKey = {}", self.private_key);
        let _ = writeln!(text, "Address = {}/32", self.address);
        if !self.dns.is_empty() {
            let servers: Vec<String> = self.dns.iter().map(ToString::to_string).collect();
            let _ = writeln!(text, "DNS = {}", servers.join(", "));
        }
        let _ = writeln!(text, "MTU = {TUNNEL_MTU}");
        text.push_str("\n[Peer]\n");
        let _ = writeln!(text, "PublicKey = {}", self.server_public_key);
        let allowed: Vec<String> = self.allowed_ips.iter().map(ToString::to_string).collect();
        let _ = writeln!(text, "AllowedIPs = {}", allowed.join(", "));
        let _ = writeln!(text, "Endpoint = {}", self.endpoint);
        if let Some(seconds) = self.persistent_keepalive_s {
            let _ = writeln!(text, "PersistentKeepalive = {seconds}");
        }
        text
    }

    /// Writes the configuration as a QR code in a PNG file, for the phone apps to scan.
    ///
    /// # Errors
    /// Fails if the code cannot be made or the file written.
    pub fn write_qr_png(&self, path: &Path) -> Result<(), WgConfigError> {
        let failed =
            |message: String| WgConfigError::Qr { path: path.display().to_string(), message };
        let code = qrcode::QrCode::new(self.render().as_bytes())
            .map_err(|error| failed(error.to_string()))?;
        let image = code.render::<image::Luma<u8>>().min_dimensions(400, 400).build();
        image.save(path).map_err(|error| failed(error.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ClientConfig {
        ClientConfig {
            private_key: "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=".to_owned(),
            address: Ipv4Addr::new(10, 77, 0, 2),
            dns: vec![Ipv4Addr::new(100, 100, 2, 136), Ipv4Addr::new(100, 100, 2, 138)],
            server_public_key: "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=".to_owned(),
            endpoint: "vpn.example.com:51820".to_owned(),
            allowed_ips: vec!["10.77.0.0/24".parse().unwrap(), "172.16.0.0/12".parse().unwrap()],
            persistent_keepalive_s: Some(DEFAULT_PERSISTENT_KEEPALIVE_S),
        }
    }

    #[test]
    fn render_exact_text() {
        assert_eq!(
            config().render(),
            "[Interface]\n\
             PrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n\
             Address = 10.77.0.2/32\n\
             DNS = 100.100.2.136, 100.100.2.138\n\
             MTU = 1420\n\
             \n\
             [Peer]\n\
             PublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\n\
             AllowedIPs = 10.77.0.0/24, 172.16.0.0/12\n\
             Endpoint = vpn.example.com:51820\n\
             PersistentKeepalive = 25\n"
        );
    }

    #[test]
    fn render_without_dns_or_keepalive() {
        let bare = ClientConfig { dns: Vec::new(), persistent_keepalive_s: None, ..config() };
        let text = bare.render();
        assert!(!text.contains("DNS"));
        assert!(!text.contains("PersistentKeepalive"));
    }

    #[test]
    fn generated_private_key_is_clamped() {
        for _ in 0..100 {
            let private = STANDARD.decode(KeyPair::generate().private_base64()).unwrap();
            assert_eq!(private[0] & 7, 0);
            assert_eq!(private[31] & 128, 0);
            assert_eq!(private[31] & 64, 64);
        }
    }

    #[test]
    fn generated_keys_are_valid_and_distinct() {
        let first = KeyPair::generate();
        let second = KeyPair::generate();
        assert!(check_key("private_key", &first.private_base64()).is_ok());
        assert!(check_key("public_key", &first.public_base64()).is_ok());
        assert_eq!(first.public_base64().len(), 44);
        assert_ne!(first.private_base64(), second.private_base64());
        assert_ne!(first.private_base64(), first.public_base64());
    }

    #[test]
    fn check_rejects_bad_keys_and_endpoints() {
        assert!(config().check().is_ok());
        let short = ClientConfig { private_key: "abc".to_owned(), ..config() };
        assert_eq!(
            short.check().unwrap_err().to_string(),
            "invalid private_key \"abc\": must be 32 bytes in base64 (44 characters)"
        );
        for endpoint in ["vpn.example.com", "vpn.example.com:0", ":51820", "host:70000"] {
            let bad = ClientConfig { endpoint: endpoint.to_owned(), ..config() };
            assert!(bad.check().is_err(), "{endpoint}");
        }
    }

    #[test]
    fn qr_png_is_written() {
        let path = std::env::temp_dir().join(format!("sag-qr-{}.png", std::process::id()));
        config().write_qr_png(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        let decoded = image::load_from_memory(&bytes).unwrap();
        assert!(decoded.width() >= 400);
    }
}
