//! TLS of the login API: the agent's certificate, self-signed on first start unless the admin
//! configures one, and clients that trust the server by the SHA-256 fingerprint of that
//! certificate instead of by a CA.

use std::{
    fmt::{self, Write as _},
    fs,
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{ring, WebPkiSupportedAlgorithms},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, ServerConfig,
    SignatureScheme,
};
use sha2::{Digest as _, Sha256};
use tracing::{info, warn};

/// File name of the login API's certificate (PEM) in the agent's TLS directory.
pub const CERT_FILE: &str = "login-cert.pem";
/// File name of the login API's private key (PEM, PKCS#8) in the agent's TLS directory.
pub const KEY_FILE: &str = "login-key.pem";
/// Mode of the TLS directory when the agent creates it: owner only.
pub const TLS_DIR_MODE: u32 = 0o700;
/// Mode of the private key file: read and write for the owner only.
pub const KEY_FILE_MODE: u32 = 0o600;
/// Mode of the certificate file: public, because clients pin its fingerprint.
pub const CERT_FILE_MODE: u32 = 0o644;
/// Validity of a self-signed certificate: ten years, counted as 3,652 days.
pub const SELF_SIGNED_VALIDITY: Duration = Duration::from_secs(3_652 * 24 * 60 * 60);
/// Prefix of a fingerprint in text, naming its hash function.
pub const FINGERPRINT_PREFIX: &str = "sha256:";
/// Length of a SHA-256 fingerprint, in bytes.
pub const FINGERPRINT_LEN: usize = 32;
/// ALPN protocol of the login API, offered by both server and client.
const ALPN_HTTP_1_1: &[u8] = b"http/1.1";
/// Common name in the subject of a self-signed certificate, as `openssl x509 -text` shows it.
const SELF_SIGNED_COMMON_NAME: &str = "sag-agent login API";

/// Errors of certificates, keys and fingerprints.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "invalid fingerprint {value:?}: {problem}. A fingerprint is 64 hex digits of SHA-256, \
         optionally prefixed with \"sha256:\" and with colons between byte pairs"
    )]
    Fingerprint { value: String, problem: String },
    #[error(
        "invalid subject alternative name {value:?} for the login certificate: must be a DNS \
         name or an IP address"
    )]
    SubjectAltName { value: String },
    #[error("failed to {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: io::Error },
    #[error("invalid {kind} file {path}: {problem}")]
    Pem { kind: &'static str, path: PathBuf, problem: String },
    #[error(
        "found {present} but not {missing}: the certificate and its key must both exist or \
         both be absent. Restore {missing}, or remove {present} so that a new pair is created"
    )]
    IncompletePair { present: PathBuf, missing: PathBuf },
    #[error("failed to generate the self-signed login certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("certificate {cert_path} and key {key_path} cannot be used for TLS: {source}")]
    Unusable { cert_path: PathBuf, key_path: PathBuf, source: rustls::Error },
}

/// Computes the fingerprint of a certificate, the text that clients pin: [`FINGERPRINT_PREFIX`]
/// and 64 lowercase hex digits of SHA-256 over the certificate's DER bytes.
pub fn fingerprint(cert_der: &[u8]) -> String {
    format_fingerprint(&Sha256::digest(cert_der).into())
}

fn format_fingerprint(digest: &[u8; FINGERPRINT_LEN]) -> String {
    let mut text = String::with_capacity(FINGERPRINT_PREFIX.len() + 2 * FINGERPRINT_LEN);
    text.push_str(FINGERPRINT_PREFIX);
    for byte in digest {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

/// Parses a fingerprint given by a user. The [`FINGERPRINT_PREFIX`] is optional and may be in
/// any case, hex digits may be in any case, and colons may separate the byte pairs, as
/// `openssl x509 -fingerprint -sha256` prints them. Whitespace around the text is ignored.
///
/// # Errors
/// Names the field `fingerprint`, the rule and the value. The text is invalid if it is empty,
/// if it contains a character that is not a hex digit, if its colons do not separate byte
/// pairs, or if it has a number of hex digits other than 64.
pub fn parse_fingerprint(text: &str) -> Result<[u8; FINGERPRINT_LEN], TlsError> {
    let invalid = |problem: String| TlsError::Fingerprint { value: text.to_owned(), problem };
    let trimmed = text.trim();
    let hex = match trimmed.get(..FINGERPRINT_PREFIX.len()) {
        Some(head) if head.eq_ignore_ascii_case(FINGERPRINT_PREFIX) => {
            &trimmed[FINGERPRINT_PREFIX.len()..]
        }
        _ => trimmed,
    };
    if trimmed.is_empty() {
        return Err(invalid("it is empty".to_owned()));
    }
    if hex.is_empty() {
        return Err(invalid("it has no hex digits after the prefix".to_owned()));
    }
    if let Some(bad) = hex.chars().find(|c| *c != ':' && !c.is_ascii_hexdigit()) {
        return Err(invalid(format!("{bad:?} is not a hex digit")));
    }
    let digits = if hex.contains(':') {
        let pairs: Vec<&str> = hex.split(':').collect();
        if pairs.iter().any(|pair| pair.len() != 2) {
            return Err(invalid("colons must separate pairs of hex digits".to_owned()));
        }
        pairs.concat()
    } else {
        hex.to_owned()
    };
    if digits.len() != 2 * FINGERPRINT_LEN {
        return Err(invalid(format!("it has {} hex digits", digits.len())));
    }

    let mut bytes = [0; FINGERPRINT_LEN];
    for (byte, pair) in bytes.iter_mut().zip(digits.as_bytes().chunks_exact(2)) {
        // Every character was checked to be an ASCII hex digit above.
        let high = char::from(pair[0]).to_digit(16).unwrap_or_default();
        let low = char::from(pair[1]).to_digit(16).unwrap_or_default();
        *byte = (high * 16 + low) as u8;
    }
    Ok(bytes)
}

/// The server side of the login API's TLS. Its `Debug` output shows the key's algorithm, not
/// the key.
#[derive(Debug)]
pub struct ServerIdentity {
    /// Server configuration with the certificate, the ring provider and ALPN `http/1.1`.
    pub config: Arc<rustls::ServerConfig>,
    /// Fingerprint of the end-entity certificate, in the text form of [`fingerprint`].
    pub fingerprint: String,
}

/// Loads the login API's certificate and key, creating a self-signed pair on first start.
///
/// Without `configured`, the files are [`CERT_FILE`] and [`KEY_FILE`] in `dir`. If both are
/// absent, a new ECDSA P-256 key and a self-signed certificate valid for
/// [`SELF_SIGNED_VALIDITY`] are written there first, with `names` (DNS names or IP addresses,
/// such as `localhost`, `127.0.0.1` or `gw.example.net`) as subject alternative names. The key
/// file gets mode [`KEY_FILE_MODE`] from its creation, the certificate [`CERT_FILE_MODE`], and
/// `dir` with any missing parent is created with mode [`TLS_DIR_MODE`]. An existing pair is
/// reused as it is, so `names` applies only to a new certificate: remove both files to make
/// one with other names.
///
/// With `configured` as `(cert_path, key_path)`, those files are loaded and nothing is
/// created. The certificate file may contain a chain, end-entity certificate first, and the
/// fingerprint is that of the end-entity certificate.
///
/// # Errors
/// - [`TlsError::IncompletePair`], naming both paths, if only one file of the pair in `dir`
///   exists. Nothing is overwritten.
/// - [`TlsError::SubjectAltName`] if a name is neither a DNS name nor an IP address.
/// - [`TlsError::Io`] or [`TlsError::Pem`], naming the path, if a file cannot be read or
///   written or has no valid PEM certificate or key.
/// - [`TlsError::Unusable`] if rustls rejects the pair, for example because the key does not
///   match the certificate.
pub fn load_or_create(
    dir: &Path,
    names: &[String],
    configured: Option<(&Path, &Path)>,
) -> Result<ServerIdentity, TlsError> {
    let Some((cert_path, key_path)) = configured else {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let created = create_if_absent(dir, names, &cert_path, &key_path)?;
        let identity = load(&cert_path, &key_path)?;
        if created {
            info!(
                path = %cert_path.display(),
                fingerprint = %identity.fingerprint,
                "created a self-signed certificate for the login API"
            );
        }
        return Ok(identity);
    };
    load(cert_path, key_path)
}

/// Writes a new self-signed pair unless both files exist, and returns whether it wrote one.
fn create_if_absent(
    dir: &Path,
    names: &[String],
    cert_path: &Path,
    key_path: &Path,
) -> Result<bool, TlsError> {
    let incomplete = |present: &Path, missing: &Path| TlsError::IncompletePair {
        present: present.to_path_buf(),
        missing: missing.to_path_buf(),
    };
    match (exists(cert_path)?, exists(key_path)?) {
        (true, true) => return Ok(false),
        (true, false) => return Err(incomplete(cert_path, key_path)),
        (false, true) => return Err(incomplete(key_path, cert_path)),
        (false, false) => {}
    }

    let (cert_pem, key_pem) = generate_self_signed(names)?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(TLS_DIR_MODE)
        .create(dir)
        .map_err(|source| io_error("create directory", dir, source))?;
    write_new_file(key_path, key_pem.as_bytes(), KEY_FILE_MODE)?;
    if let Err(error) = write_new_file(cert_path, cert_pem.as_bytes(), CERT_FILE_MODE) {
        // Without this, the next start would find a key without a certificate and stop.
        if let Err(remove_error) = fs::remove_file(key_path) {
            warn!(
                path = %key_path.display(),
                error = %remove_error,
                "failed to remove the new private key after its certificate could not be written"
            );
        }
        return Err(error);
    }
    Ok(true)
}

/// Generates an ECDSA P-256 key and a self-signed certificate for `names`, both in PEM.
fn generate_self_signed(names: &[String]) -> Result<(String, String), TlsError> {
    // rcgen takes every name that does not parse as an IP address as a DNS name, so a name
    // such as "a b" would otherwise end up in the certificate.
    if let Some(bad) = names.iter().find(|name| ServerName::try_from(name.as_str()).is_err()) {
        return Err(TlsError::SubjectAltName { value: bad.clone() });
    }
    let mut params = CertificateParams::new(names.to_vec())?;
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, SELF_SIGNED_COMMON_NAME);
    params.distinguished_name = subject;
    let now = SystemTime::now();
    params.not_before = now.into();
    params.not_after = (now + SELF_SIGNED_VALIDITY).into();

    let key_pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.self_signed(&key_pair)?;
    Ok((cert.pem(), key_pair.serialize_pem()))
}

/// Reads a certificate chain and a key and builds the server configuration.
fn load(cert_path: &Path, key_path: &Path) -> Result<ServerIdentity, TlsError> {
    let cert_pem = fs::read(cert_path).map_err(|source| io_error("read", cert_path, source))?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| pem_error("certificate", cert_path, error.to_string()))?;
    let Some(end_entity) = certs.first() else {
        let problem = "no CERTIFICATE section found".to_owned();
        return Err(pem_error("certificate", cert_path, problem));
    };
    let fingerprint = fingerprint(end_entity);

    let key_pem = fs::read(key_path).map_err(|source| io_error("read", key_path, source))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|error| {
        let problem = match error {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "no PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY section found".to_owned()
            }
            other => other.to_string(),
        };
        pem_error("private key", key_path, problem)
    })?;

    let unusable = |source| TlsError::Unusable {
        cert_path: cert_path.to_path_buf(),
        key_path: key_path.to_path_buf(),
        source,
    };
    let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(unusable)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(unusable)?;
    config.alpn_protocols = vec![ALPN_HTTP_1_1.to_vec()];
    Ok(ServerIdentity { config: Arc::new(config), fingerprint })
}

fn exists(path: &Path) -> Result<bool, TlsError> {
    path.try_exists().map_err(|source| io_error("check for", path, source))
}

/// Creates `path`, failing if it exists, and writes `contents` with the file at `mode` from
/// its first byte.
fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| io_error("create", path, source))?;
    // The umask may have narrowed the mode given to open(2). Setting it again before any byte
    // is written makes the mode exact and never wider than `mode`.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|source| io_error("set the mode of", path, source))?;
    file.write_all(contents).map_err(|source| io_error("write", path, source))?;
    file.sync_all().map_err(|source| io_error("write", path, source))
}

fn io_error(action: &'static str, path: &Path, source: io::Error) -> TlsError {
    TlsError::Io { action, path: path.to_path_buf(), source }
}

fn pem_error(kind: &'static str, path: &Path, problem: String) -> TlsError {
    TlsError::Pem { kind, path: path.to_path_buf(), problem }
}

/// Builds the client side: a configuration that accepts exactly the server certificate whose
/// SHA-256 fingerprint is `pin`, for any server name.
///
/// The pin is the trust, so the certificate's CA, names and validity dates are not checked.
/// The handshake signatures are still verified with the ring provider's algorithms, which
/// proves that the server has the private key of the pinned certificate. A certificate with
/// another
/// fingerprint fails the handshake with an error whose text contains
/// `expected sha256:…, server presented sha256:…`.
pub fn pinned_client_config(pin: [u8; FINGERPRINT_LEN]) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(ring::default_provider());
    let verifier =
        PinnedCertVerifier { pin, algorithms: provider.signature_verification_algorithms };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default TLS versions 1.2 and 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP_1_1.to_vec()];
    Arc::new(config)
}

/// Server certificate verifier that trusts one certificate by its SHA-256 fingerprint.
#[derive(Debug)]
struct PinnedCertVerifier {
    pin: [u8; FINGERPRINT_LEN],
    algorithms: WebPkiSupportedAlgorithms,
}

/// Rejection of a server certificate whose fingerprint is not the pinned one.
#[derive(thiserror::Error)]
#[error(
    "certificate fingerprint mismatch: expected {}, server presented {}",
    format_fingerprint(.expected),
    format_fingerprint(.presented)
)]
struct PinMismatch {
    expected: [u8; FINGERPRINT_LEN],
    presented: [u8; FINGERPRINT_LEN],
}

// rustls 0.23 formats `CertificateError::Other` with `{:?}`, so `Debug` writes the message
// that the handshake error must show.
impl fmt::Debug for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl ServerCertVerifier for PinnedCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented: [u8; FINGERPRINT_LEN] = Sha256::digest(end_entity).into();
        if presented == self.pin {
            return Ok(ServerCertVerified::assertion());
        }
        let mismatch = PinMismatch { expected: self.pin, presented };
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
            mismatch,
        )))))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use rustls::{
        client::WebPkiServerVerifier,
        sign::{CertifiedKey, SingleCertAndKey},
        ProtocolVersion, RootCertStore,
    };
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpStream},
        task::JoinHandle,
        time::timeout,
    };
    use tokio_rustls::{client::TlsStream, TlsAcceptor, TlsConnector};

    use super::*;

    /// SHA-256 of the three bytes "abc", from `printf abc | sha256sum`.
    const ABC_SHA256: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    /// Limit of each network step in the handshake tests, so a bug fails instead of hanging.
    const STEP_TIMEOUT: Duration = Duration::from_secs(10);

    fn names() -> Vec<String> {
        vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "gw.example.net".to_owned()]
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn end_entity_der(dir: &Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(dir.join(CERT_FILE)).unwrap()
    }

    #[test]
    fn fingerprint_of_abc() {
        assert_eq!(fingerprint(b"abc"), format!("sha256:{ABC_SHA256}"));
    }

    #[test]
    fn parse_fingerprint_accepts_three_forms() {
        let colon_separated = ABC_SHA256
            .to_uppercase()
            .as_bytes()
            .chunks(2)
            .map(|pair| std::str::from_utf8(pair).unwrap())
            .collect::<Vec<_>>()
            .join(":");
        let prefixed = parse_fingerprint(&format!("sha256:{ABC_SHA256}")).unwrap();
        let bare = parse_fingerprint(ABC_SHA256).unwrap();
        let colons = parse_fingerprint(&colon_separated).unwrap();
        let expected: [u8; 32] = Sha256::digest(b"abc").into();
        assert_eq!(prefixed, expected);
        assert_eq!(bare, expected);
        assert_eq!(colons, expected);
    }

    #[test]
    fn parse_fingerprint_accepts_prefix_in_any_case() {
        let expected: [u8; 32] = Sha256::digest(b"abc").into();
        assert_eq!(parse_fingerprint(&format!("SHA256:{ABC_SHA256}")).unwrap(), expected);
        assert_eq!(parse_fingerprint(&format!(" sha256:{ABC_SHA256}\n")).unwrap(), expected);
    }

    #[test]
    fn parse_fingerprint_round_trips() {
        let text = fingerprint(b"abc");
        assert_eq!(format_fingerprint(&parse_fingerprint(&text).unwrap()), text);
    }

    #[test]
    fn parse_fingerprint_rejects_bad_input() {
        let cases = [
            (&ABC_SHA256[..63], "it has 63 hex digits"),
            ("sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ag", "'g'"),
            ("", "it is empty"),
            ("sha256:", "no hex digits"),
            ("ba:78:16b", "colons must separate pairs"),
        ];
        for (value, problem) in cases {
            let message = parse_fingerprint(value).unwrap_err().to_string();
            assert!(message.contains("fingerprint"), "{message}");
            assert!(message.contains(&format!("{value:?}")), "{message}");
            assert!(message.contains(problem), "{message}");
        }
    }

    #[test]
    fn load_or_create_writes_files_with_modes() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("tls");
        let identity = load_or_create(&dir, &names(), None).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
        assert_eq!(mode(&dir.join(CERT_FILE)), 0o644);
        assert_eq!(identity.fingerprint, fingerprint(&end_entity_der(&dir)));
        assert_eq!(identity.config.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }

    #[test]
    fn load_or_create_reuses_files() {
        let temp = tempfile::tempdir().unwrap();
        let first = load_or_create(temp.path(), &names(), None).unwrap();
        let cert_pem = fs::read(temp.path().join(CERT_FILE)).unwrap();
        let key_pem = fs::read(temp.path().join(KEY_FILE)).unwrap();
        let second = load_or_create(temp.path(), &names(), None).unwrap();
        assert_eq!(second.fingerprint, first.fingerprint);
        assert_eq!(fs::read(temp.path().join(CERT_FILE)).unwrap(), cert_pem);
        assert_eq!(fs::read(temp.path().join(KEY_FILE)).unwrap(), key_pem);
    }

    #[test]
    fn load_or_create_rejects_cert_without_key() {
        let temp = tempfile::tempdir().unwrap();
        load_or_create(temp.path(), &names(), None).unwrap();
        let cert_pem = fs::read(temp.path().join(CERT_FILE)).unwrap();
        fs::remove_file(temp.path().join(KEY_FILE)).unwrap();

        let message = load_or_create(temp.path(), &names(), None).unwrap_err().to_string();
        assert!(message.contains(&temp.path().join(CERT_FILE).display().to_string()), "{message}");
        assert!(message.contains(&temp.path().join(KEY_FILE).display().to_string()), "{message}");
        assert_eq!(fs::read(temp.path().join(CERT_FILE)).unwrap(), cert_pem);
        assert!(!temp.path().join(KEY_FILE).exists());
    }

    #[test]
    fn load_or_create_rejects_key_without_cert() {
        let temp = tempfile::tempdir().unwrap();
        load_or_create(temp.path(), &names(), None).unwrap();
        fs::remove_file(temp.path().join(CERT_FILE)).unwrap();

        let error = load_or_create(temp.path(), &names(), None).unwrap_err();
        assert!(matches!(error, TlsError::IncompletePair { .. }), "{error}");
        assert!(!temp.path().join(CERT_FILE).exists());
    }

    #[test]
    fn load_or_create_uses_configured_files() {
        let made = tempfile::tempdir().unwrap();
        let created = load_or_create(made.path(), &names(), None).unwrap();
        let unused = tempfile::tempdir().unwrap();
        let cert_path = made.path().join(CERT_FILE);
        let key_path = made.path().join(KEY_FILE);

        let configured = load_or_create(unused.path(), &[], Some((&cert_path, &key_path))).unwrap();
        assert_eq!(configured.fingerprint, created.fingerprint);
        assert_eq!(fs::read_dir(unused.path()).unwrap().count(), 0);
    }

    #[test]
    fn load_or_create_names_path_of_invalid_pem() {
        let temp = tempfile::tempdir().unwrap();
        let cert_path = temp.path().join("cert.pem");
        let key_path = temp.path().join("key.pem");
        fs::write(&cert_path, "not a certificate\n").unwrap();
        fs::write(&key_path, "not a key\n").unwrap();

        let error = load_or_create(temp.path(), &[], Some((&cert_path, &key_path))).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, TlsError::Pem { kind: "certificate", .. }), "{message}");
        assert!(message.contains(&cert_path.display().to_string()), "{message}");
    }

    #[test]
    fn load_or_create_names_path_of_missing_file() {
        let temp = tempfile::tempdir().unwrap();
        let cert_path = temp.path().join("absent-cert.pem");
        let key_path = temp.path().join("absent-key.pem");

        let error = load_or_create(temp.path(), &[], Some((&cert_path, &key_path))).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, TlsError::Io { .. }), "{message}");
        assert!(message.contains(&cert_path.display().to_string()), "{message}");
    }

    #[test]
    fn load_or_create_rejects_mismatched_key() {
        let first = tempfile::tempdir().unwrap();
        let second = tempfile::tempdir().unwrap();
        load_or_create(first.path(), &names(), None).unwrap();
        load_or_create(second.path(), &names(), None).unwrap();
        let cert_path = first.path().join(CERT_FILE);
        let key_path = second.path().join(KEY_FILE);

        let error = load_or_create(first.path(), &[], Some((&cert_path, &key_path))).unwrap_err();
        assert!(matches!(error, TlsError::Unusable { .. }), "{error}");
    }

    #[test]
    fn load_or_create_rejects_invalid_name() {
        let temp = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_owned(), "not a name".to_owned()];

        let message = load_or_create(temp.path(), &names, None).unwrap_err().to_string();
        assert!(message.contains("\"not a name\""), "{message}");
        assert!(!temp.path().join(KEY_FILE).exists());
        assert!(!temp.path().join(CERT_FILE).exists());
    }

    /// Checks the names and the ten-year validity of a self-signed certificate with the
    /// standard WebPKI verifier, the certificate being its own trust anchor.
    #[test]
    fn self_signed_cert_has_names_and_validity() {
        let temp = tempfile::tempdir().unwrap();
        load_or_create(temp.path(), &names(), None).unwrap();
        let cert = end_entity_der(temp.path());
        let mut roots = RootCertStore::empty();
        roots.add(cert.clone()).unwrap();
        let provider = Arc::new(ring::default_provider());
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build().unwrap();
        let verify = |name: &'static str, after: Duration| {
            let now = UnixTime::since_unix_epoch(
                SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap() + after,
            );
            let name = ServerName::try_from(name).unwrap();
            verifier.verify_server_cert(&cert, &[], &name, &[], now)
        };
        let year = Duration::from_secs(365 * 24 * 60 * 60);

        assert!(verify("localhost", Duration::ZERO).is_ok());
        assert!(verify("127.0.0.1", Duration::ZERO).is_ok());
        assert!(verify("gw.example.net", Duration::ZERO).is_ok());
        assert!(verify("other.example.net", Duration::ZERO).is_err());
        assert!(verify("localhost", 9 * year).is_ok());
        assert!(verify("localhost", 11 * year).is_err());
    }

    /// Serves one TLS connection that echoes `length` bytes, and returns its address.
    async fn serve_echo(
        config: Arc<ServerConfig>,
        length: usize,
    ) -> (SocketAddr, JoinHandle<io::Result<()>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(config);
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            let mut tls = acceptor.accept(tcp).await?;
            let mut buffer = vec![0; length];
            tls.read_exact(&mut buffer).await?;
            tls.write_all(&buffer).await?;
            tls.shutdown().await
        });
        (address, server)
    }

    async fn connect(address: SocketAddr, pin: [u8; 32]) -> io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(address).await?;
        let connector = TlsConnector::from(pinned_client_config(pin));
        let name = ServerName::try_from("localhost").unwrap();
        connector.connect(name, tcp).await
    }

    #[tokio::test]
    async fn handshake_with_right_pin() {
        let temp = tempfile::tempdir().unwrap();
        let identity = load_or_create(temp.path(), &names(), None).unwrap();
        let pin = parse_fingerprint(&identity.fingerprint).unwrap();
        let (address, server) = serve_echo(identity.config.clone(), 5).await;

        let mut tls = timeout(STEP_TIMEOUT, connect(address, pin)).await.unwrap().unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        tls.write_all(b"hello").await.unwrap();
        let mut echoed = [0; 5];
        timeout(STEP_TIMEOUT, tls.read_exact(&mut echoed)).await.unwrap().unwrap();
        assert_eq!(&echoed, b"hello");
        timeout(STEP_TIMEOUT, server).await.unwrap().unwrap().unwrap();
    }

    #[tokio::test]
    async fn handshake_with_wrong_pin_fails() {
        let temp = tempfile::tempdir().unwrap();
        let identity = load_or_create(temp.path(), &names(), None).unwrap();
        let wrong_pin: [u8; 32] = Sha256::digest(b"abc").into();
        let (address, server) = serve_echo(identity.config.clone(), 5).await;

        let error = timeout(STEP_TIMEOUT, connect(address, wrong_pin)).await.unwrap().unwrap_err();
        let message = error.to_string();
        assert!(message.contains(&format!("expected sha256:{ABC_SHA256}")), "{message}");
        let presented = format!("server presented {}", identity.fingerprint);
        assert!(message.contains(&presented), "{message}");
        assert!(timeout(STEP_TIMEOUT, server).await.unwrap().unwrap().is_err());
    }

    #[tokio::test]
    async fn handshake_over_tls12() {
        let temp = tempfile::tempdir().unwrap();
        let identity = load_or_create(temp.path(), &names(), None).unwrap();
        let pin = parse_fingerprint(&identity.fingerprint).unwrap();
        let cert = end_entity_der(temp.path());
        let key = PrivateKeyDer::from_pem_file(temp.path().join(KEY_FILE)).unwrap();
        let config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
        let (address, server) = serve_echo(Arc::new(config), 2).await;

        let mut tls = timeout(STEP_TIMEOUT, connect(address, pin)).await.unwrap().unwrap();
        assert_eq!(tls.get_ref().1.protocol_version(), Some(ProtocolVersion::TLSv1_2));
        tls.write_all(b"ok").await.unwrap();
        let mut echoed = [0; 2];
        timeout(STEP_TIMEOUT, tls.read_exact(&mut echoed)).await.unwrap().unwrap();
        assert_eq!(&echoed, b"ok");
        timeout(STEP_TIMEOUT, server).await.unwrap().unwrap().unwrap();
    }

    /// A server that shows the pinned certificate without its private key must fail the
    /// handshake signature check.
    #[tokio::test]
    async fn handshake_with_wrong_key_fails() {
        let pinned = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let identity = load_or_create(pinned.path(), &names(), None).unwrap();
        load_or_create(other.path(), &names(), None).unwrap();
        let pin = parse_fingerprint(&identity.fingerprint).unwrap();
        let other_key = PrivateKeyDer::from_pem_file(other.path().join(KEY_FILE)).unwrap();
        // `CertifiedKey::new` skips the key check that `with_single_cert` makes.
        let certified_key = CertifiedKey::new(
            vec![end_entity_der(pinned.path())],
            ring::sign::any_supported_type(&other_key).unwrap(),
        );
        let config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified_key)));
        let (address, server) = serve_echo(Arc::new(config), 2).await;

        let error = timeout(STEP_TIMEOUT, connect(address, pin)).await.unwrap().unwrap_err();
        let message = error.to_string();
        assert!(message.contains("invalid peer certificate: BadSignature"), "{message}");
        assert!(timeout(STEP_TIMEOUT, server).await.unwrap().unwrap().is_err());
    }
}
