//! Account emails: the credentials email, sent over SMTP or written as .eml files to an outbox.

use std::{
    fmt, fs,
    future::Future,
    io::{self, Read as _, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::Duration,
};

use lettre::{
    address::{AddressError, Envelope},
    message::{header::ContentType, Mailbox},
    transport::smtp::{
        authentication::{Credentials, Mechanism},
        client::{AsyncSmtpConnection, Certificate, CertificateStore, TlsParameters},
        commands::{Data, Mail, Rcpt},
        extension::{ClientId, Extension, MailBodyParameter, MailParameter},
        Error as SmtpError,
    },
    Message,
};
use rand::Rng as _;
use serde::Deserialize;
use tracing::{info, warn};

/// Mode of the outbox directory: owner only, because its files contain passwords.
pub const OUTBOX_DIR_MODE: u32 = 0o700;
/// Mode of each outbox file: read and write for the owner only.
pub const OUTBOX_FILE_MODE: u32 = 0o600;
/// File name extension of the messages in the outbox.
pub const OUTBOX_EXTENSION: &str = "eml";
/// SASL mechanisms offered to the relay, in order of preference. lettre implements only these
/// two for a password login.
const AUTH_MECHANISMS: &[Mechanism] = &[Mechanism::Plain, Mechanism::Login];

/// The mail section of the agent's configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailConfig {
    /// Sender of every email, in the `From` header and in SMTP `MAIL FROM`, such as
    /// `sag <noreply@example.com>`.
    pub from: String,
    /// SMTP relay to send through. Without it, emails are written to `outbox_dir`.
    pub smtp: Option<SmtpConfig>,
    /// Directory that receives each email as an .eml file while `smtp` is not set. Required,
    /// with no default. A typical value is `/var/lib/sag/outbox`. It is created with mode 0700
    /// if missing, and set to 0700 if it exists with another mode.
    pub outbox_dir: PathBuf,
}

/// An SMTP relay.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    /// Host name or IP address of the relay, also the name its TLS certificate must match.
    pub host: String,
    /// TCP port: usually 25 or 587 with `none` and `starttls`, 465 with `tls`.
    pub port: u16,
    /// Encryption of the connection. The relay's certificate must chain to a CA certificate
    /// in the system store (`/etc/ssl/certs` on Debian), or in `ca_file` if that is set.
    pub tls: TlsMode,
    /// PEM file with the CA certificates that the relay's certificate must chain to, in place
    /// of the system store, for a relay with a private CA. [`Mailer::new`] reads it once.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Login name for SMTP AUTH, set together with `password_file`.
    pub username: Option<String>,
    /// File that contains the SMTP password, so that the password stays out of the
    /// configuration. One trailing newline is ignored. It is read once, by [`Mailer::new`].
    pub password_file: Option<PathBuf>,
    /// Time limit of each step of a delivery (connect, STARTTLS, login, each command), in
    /// seconds.
    pub timeout_seconds: u64,
}

/// Encryption of the SMTP connection, written `none`, `starttls` or `tls` in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// No encryption, for a relay on this host or on a trusted network: the login and the
    /// password inside the email cross the network in plain text.
    None,
    /// A plain connection upgraded with STARTTLS before the login. The delivery fails if the
    /// relay does not offer STARTTLS, so no email leaves unencrypted.
    StartTls,
    /// TLS from the first byte, also called implicit TLS or SMTPS.
    Tls,
}

/// A plain-text email to one recipient.
#[derive(Clone, PartialEq, Eq)]
pub struct Email {
    /// Recipient address.
    pub to: String,
    /// Subject line.
    pub subject: String,
    /// Body text with `\n` line endings, sent with CRLF line endings.
    pub body: String,
}

// The body can contain a password, so `{:?}` in a log line shows only its length.
impl fmt::Debug for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Email")
            .field("to", &self.to)
            .field("subject", &self.subject)
            .field("body", &format_args!("({} bytes, hidden)", self.body.len()))
            .finish()
    }
}

/// Destination of an email that [`Mailer::send`] delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Accepted by the SMTP relay.
    Smtp,
    /// Written to this .eml file in the outbox.
    Outbox(PathBuf),
}

/// Reason for a credentials email, which sets its subject and first line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialsReason {
    /// A new account.
    Created,
    /// A new password for an existing account.
    Reset,
}

/// A step of an SMTP delivery, as error messages name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpStep {
    /// TCP connection, implicit TLS handshake, greeting and EHLO.
    Connect,
    /// STARTTLS command, TLS handshake and the second EHLO.
    StartTls,
    /// SMTP AUTH.
    Login,
    /// `MAIL FROM` command.
    MailFrom,
    /// `RCPT TO` command.
    RcptTo,
    /// `DATA` command and the message content.
    Data,
}

impl fmt::Display for SmtpStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Connect => "connect",
            Self::StartTls => "STARTTLS",
            Self::Login => "login",
            Self::MailFrom => "MAIL FROM",
            Self::RcptTo => "RCPT TO",
            Self::Data => "DATA",
        })
    }
}

/// Errors of building a [`Mailer`] and of sending an email.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("invalid mail setting {field}: {rule}")]
    InvalidConfig { field: &'static str, rule: String },
    #[error("invalid email address {value:?} in {field}: {source}")]
    InvalidAddress { field: &'static str, value: String, source: AddressError },
    #[error("failed to read the SMTP password file {}: {source}", path.display())]
    PasswordFile { path: PathBuf, source: io::Error },
    #[error("failed to read the SMTP CA file {}: {source}", path.display())]
    CaFile { path: PathBuf, source: io::Error },
    #[error("failed to build the email to {to}: {source}")]
    Build { to: String, source: lettre::error::Error },
    #[error("failed to write the email to the outbox {}: {source}", path.display())]
    Outbox { path: PathBuf, source: io::Error },
    #[error("failed to connect to SMTP server {server}: {source}; check smtp.host and smtp.port")]
    Connect { server: String, source: SmtpError },
    #[error("TLS with SMTP server {server} failed: {source}; check smtp.tls and smtp.port")]
    Tls { server: String, source: SmtpError },
    #[error(
        "SMTP login as {username:?} at {server} failed: {source}; check smtp.username and \
         smtp.password_file"
    )]
    Auth { server: String, username: String, source: SmtpError },
    #[error("SMTP server {server} rejected the sender {sender}: {source}")]
    RejectedSender { server: String, sender: String, source: SmtpError },
    #[error("SMTP server {server} rejected the recipient {recipient}: {source}")]
    RejectedRecipient { server: String, recipient: String, source: SmtpError },
    #[error("SMTP server {server} rejected the message: {source}")]
    RejectedMessage { server: String, source: SmtpError },
    #[error("SMTP server {server} does not support {extension}, which the addresses need")]
    Unsupported { server: String, extension: &'static str },
    #[error("SMTP {step} with {server} failed: {source}")]
    Smtp { server: String, step: SmtpStep, source: SmtpError },
    #[error("SMTP {step} with {server} timed out after {seconds} s")]
    Timeout { server: String, step: SmtpStep, seconds: u64 },
}

/// Sends emails through the configured SMTP relay, or writes them to the outbox without one.
#[derive(Debug)]
pub struct Mailer {
    from: Mailbox,
    transport: Transport,
}

#[derive(Debug)]
enum Transport {
    Smtp(Relay),
    Outbox(PathBuf),
}

impl Mailer {
    /// Builds a mailer from the mail settings and reads the SMTP password file if one is set.
    ///
    /// # Errors
    /// Fails if `from` is not a valid address, an SMTP setting is invalid, or the password file
    /// cannot be read or is empty.
    pub fn new(config: &MailConfig) -> Result<Self, NotifyError> {
        let from = parse_mailbox("from", &config.from)?;
        let transport = match &config.smtp {
            Some(smtp) => Transport::Smtp(Relay::new(smtp)?),
            None => Transport::Outbox(config.outbox_dir.clone()),
        };
        Ok(Self { from, transport })
    }

    /// Sends one email over SMTP, or writes it to a new file in the outbox if no relay is
    /// configured, and logs the recipient and the server or file at info level.
    ///
    /// # Errors
    /// Fails if the recipient is not a valid address, if an SMTP step fails, is rejected or
    /// times out, or if the outbox file cannot be written. The error names the step and the
    /// server or path.
    pub async fn send(&self, email: &Email) -> Result<Delivery, NotifyError> {
        let message = self.build_message(email)?;
        match &self.transport {
            Transport::Smtp(relay) => {
                relay.deliver(&message).await?;
                info!(server = %relay.server(), to = %email.to, "sent email");
                Ok(Delivery::Smtp)
            }
            Transport::Outbox(dir) => {
                let path = write_outbox(dir, message.formatted()).await?;
                info!(path = %path.display(), to = %email.to, "wrote email to the outbox");
                Ok(Delivery::Outbox(path))
            }
        }
    }

    fn build_message(&self, email: &Email) -> Result<Message, NotifyError> {
        let to = parse_mailbox("to", &email.to)?;
        Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(email.subject.as_str())
            .message_id(None)
            .header(ContentType::TEXT_PLAIN)
            .body(email.body.clone())
            .map_err(|source| NotifyError::Build { to: email.to.clone(), source })
    }
}

fn parse_mailbox(field: &'static str, value: &str) -> Result<Mailbox, NotifyError> {
    value.parse().map_err(|source| NotifyError::InvalidAddress {
        field,
        value: value.to_owned(),
        source,
    })
}

fn invalid_config(field: &'static str, rule: impl Into<String>) -> NotifyError {
    NotifyError::InvalidConfig { field, rule: rule.into() }
}

/// An SMTP relay with its password read in.
#[derive(Debug)]
struct Relay {
    host: String,
    port: u16,
    tls: TlsMode,
    /// The CA certificates of `ca_file`, if set.
    ca: Option<Certificate>,
    login: Option<Login>,
    timeout_seconds: u64,
    hello_name: ClientId,
}

struct Login {
    username: String,
    password: String,
}

// Keeps the password out of `{:?}` output.
impl fmt::Debug for Login {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Login").field("username", &self.username).finish_non_exhaustive()
    }
}

impl Relay {
    fn new(config: &SmtpConfig) -> Result<Self, NotifyError> {
        if config.host.trim().is_empty() {
            return Err(invalid_config("smtp.host", "must not be empty"));
        }
        if config.port == 0 {
            return Err(invalid_config("smtp.port", "must be 1 to 65535, not 0"));
        }
        if config.timeout_seconds == 0 {
            return Err(invalid_config("smtp.timeout_seconds", "must be at least 1, not 0"));
        }
        let login = match (&config.username, &config.password_file) {
            (None, None) => None,
            (Some(username), Some(path)) => {
                if username.is_empty() {
                    return Err(invalid_config("smtp.username", "must not be empty"));
                }
                Some(Login { username: username.clone(), password: read_password_file(path)? })
            }
            (Some(_), None) => {
                return Err(invalid_config(
                    "smtp.password_file",
                    "must be set when smtp.username is set",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid_config(
                    "smtp.username",
                    "must be set when smtp.password_file is set",
                ));
            }
        };
        let ca = config.ca_file.as_deref().map(read_ca_file).transpose()?;
        Ok(Self {
            host: config.host.clone(),
            port: config.port,
            tls: config.tls,
            ca,
            login,
            timeout_seconds: config.timeout_seconds,
            hello_name: ClientId::default(),
        })
    }

    /// Returns `host:port`, with an IPv6 address in brackets, for error messages and logs.
    fn server(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Returns the TLS settings: the relay's host name to check, and the system's CA store or
    /// the certificates of `ca_file`.
    fn tls_parameters(&self) -> Result<TlsParameters, SmtpError> {
        let Some(ca) = &self.ca else {
            return TlsParameters::new_rustls(self.host.clone());
        };
        TlsParameters::builder(self.host.clone())
            .certificate_store(CertificateStore::None)
            .add_root_certificate(ca.clone())
            .build_rustls()
    }

    /// Runs one SMTP session that delivers `message`, then ends it with QUIT.
    async fn deliver(&self, message: &Message) -> Result<(), NotifyError> {
        let tls_parameters = match self.tls {
            TlsMode::None => None,
            TlsMode::StartTls | TlsMode::Tls => Some(
                self.tls_parameters()
                    .map_err(|source| NotifyError::Tls { server: self.server(), source })?,
            ),
        };
        let (implicit_tls, starttls) = match self.tls {
            TlsMode::Tls => (tls_parameters, None),
            TlsMode::None | TlsMode::StartTls => (None, tls_parameters),
        };
        let mut connection = self.connect(implicit_tls).await?;
        let result = self.transact(&mut connection, starttls, message).await;
        // The outcome is settled before QUIT, so a failed or late QUIT changes nothing.
        let timeout = Duration::from_secs(self.timeout_seconds);
        match &result {
            Ok(()) => {
                let _ = tokio::time::timeout(timeout, connection.quit()).await;
            }
            // A failed STARTTLS leaves lettre 0.11's connection without a stream, and any
            // command on it then panics, so the connection is only dropped.
            Err(NotifyError::Tls { .. }) => {}
            Err(_) => {
                let _ = tokio::time::timeout(timeout, connection.abort()).await;
            }
        }
        result
    }

    async fn connect(
        &self,
        implicit_tls: Option<TlsParameters>,
    ) -> Result<AsyncSmtpConnection, NotifyError> {
        let connecting = AsyncSmtpConnection::connect_tokio1(
            (self.host.as_str(), self.port),
            Some(Duration::from_secs(self.timeout_seconds)),
            &self.hello_name,
            implicit_tls,
            None,
        );
        self.bounded(SmtpStep::Connect, connecting).await?.map_err(|source| {
            if self.tls == TlsMode::Tls && is_tls_failure(&source) {
                NotifyError::Tls { server: self.server(), source }
            } else {
                NotifyError::Connect { server: self.server(), source }
            }
        })
    }

    /// Upgrades the connection and logs in as configured, then sends the envelope and the
    /// message.
    async fn transact(
        &self,
        connection: &mut AsyncSmtpConnection,
        starttls: Option<TlsParameters>,
        message: &Message,
    ) -> Result<(), NotifyError> {
        if let Some(parameters) = starttls {
            self.bounded(SmtpStep::StartTls, connection.starttls(parameters, &self.hello_name))
                .await?
                .map_err(|source| NotifyError::Tls { server: self.server(), source })?;
        }
        if let Some(login) = &self.login {
            let credentials = Credentials::new(login.username.clone(), login.password.clone());
            self.bounded(SmtpStep::Login, connection.auth(AUTH_MECHANISMS, &credentials))
                .await?
                .map_err(|source| NotifyError::Auth {
                    server: self.server(),
                    username: login.username.clone(),
                    source,
                })?;
        }

        let envelope = message.envelope();
        let content = message.formatted();
        let parameters = self.mail_parameters(connection, envelope, &content)?;
        let sender = envelope.from().cloned();
        self.bounded(SmtpStep::MailFrom, connection.command(Mail::new(sender, parameters)))
            .await?
            .map_err(|source| match envelope.from() {
                Some(sender) if is_reply(&source) => NotifyError::RejectedSender {
                    server: self.server(),
                    sender: sender.to_string(),
                    source,
                },
                _ => self.step_error(SmtpStep::MailFrom, source),
            })?;
        for recipient in envelope.to() {
            self.bounded(
                SmtpStep::RcptTo,
                connection.command(Rcpt::new(recipient.clone(), vec![])),
            )
            .await?
            .map_err(|source| {
                if is_reply(&source) {
                    NotifyError::RejectedRecipient {
                        server: self.server(),
                        recipient: recipient.to_string(),
                        source,
                    }
                } else {
                    self.step_error(SmtpStep::RcptTo, source)
                }
            })?;
        }
        let data_error = |source| {
            if is_reply(&source) {
                NotifyError::RejectedMessage { server: self.server(), source }
            } else {
                self.step_error(SmtpStep::Data, source)
            }
        };
        self.bounded(SmtpStep::Data, connection.command(Data)).await?.map_err(data_error)?;
        // lettre ends the data with CRLF "." CRLF, and that first CRLF ends the last line. Sent
        // as well, the message's own final CRLF would add an empty line to the body.
        let content = content.strip_suffix(b"\r\n").unwrap_or(&content);
        self.bounded(SmtpStep::Data, connection.message(content)).await?.map_err(data_error)?;
        Ok(())
    }

    /// Returns the `MAIL FROM` parameters that non-ASCII addresses or content need, if the
    /// relay supports them.
    fn mail_parameters(
        &self,
        connection: &AsyncSmtpConnection,
        envelope: &Envelope,
        content: &[u8],
    ) -> Result<Vec<MailParameter>, NotifyError> {
        let server_info = connection.server_info();
        let mut parameters = Vec::new();
        let ascii_addresses = envelope
            .from()
            .into_iter()
            .chain(envelope.to())
            .all(|address| AsRef::<str>::as_ref(address).is_ascii());
        if !ascii_addresses {
            if !server_info.supports_feature(Extension::SmtpUtfEight) {
                return Err(NotifyError::Unsupported {
                    server: self.server(),
                    extension: "SMTPUTF8",
                });
            }
            parameters.push(MailParameter::SmtpUtfEight);
        }
        // lettre encodes a text body as 7bit, quoted-printable or base64, so only raw UTF-8
        // addresses in the headers can make the content 8-bit.
        if !content.is_ascii() {
            if !server_info.supports_feature(Extension::EightBitMime) {
                return Err(NotifyError::Unsupported {
                    server: self.server(),
                    extension: "8BITMIME",
                });
            }
            parameters.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        Ok(parameters)
    }

    /// Runs one SMTP step within the configured time limit.
    async fn bounded<T>(
        &self,
        step: SmtpStep,
        future: impl Future<Output = T>,
    ) -> Result<T, NotifyError> {
        tokio::time::timeout(Duration::from_secs(self.timeout_seconds), future).await.map_err(
            |_| NotifyError::Timeout { server: self.server(), step, seconds: self.timeout_seconds },
        )
    }

    fn step_error(&self, step: SmtpStep, source: SmtpError) -> NotifyError {
        NotifyError::Smtp { server: self.server(), step, source }
    }
}

/// Returns whether `error` is the relay's negative reply (4xx or 5xx) rather than a network or
/// client failure.
fn is_reply(error: &SmtpError) -> bool {
    error.is_permanent() || error.is_transient()
}

/// Returns whether a connect error comes from the TLS handshake. lettre 0.11 reports a failed
/// handshake as a connection error that wraps the I/O error of tokio-rustls 0.26, which gives
/// every TLS protocol and certificate error the kind `InvalidData`. A TCP connect does not.
fn is_tls_failure(error: &SmtpError) -> bool {
    let chain = std::iter::successors(Some(error as &dyn std::error::Error), |e| e.source());
    error.is_tls()
        || chain
            .filter_map(|e| e.downcast_ref::<io::Error>())
            .any(|io_error| io_error.kind() == io::ErrorKind::InvalidData)
}

/// Reads the CA certificates of `ca_file`, which must contain at least one PEM certificate.
fn read_ca_file(path: &Path) -> Result<Certificate, NotifyError> {
    let pem =
        fs::read(path).map_err(|source| NotifyError::CaFile { path: path.to_owned(), source })?;
    let text = String::from_utf8_lossy(&pem);
    if !text.contains("-----BEGIN CERTIFICATE-----") {
        return Err(invalid_config(
            "smtp.ca_file",
            format!("{} must contain PEM certificates, but it has none", path.display()),
        ));
    }
    Certificate::from_pem(&pem).map_err(|error| {
        invalid_config(
            "smtp.ca_file",
            format!("{} must contain valid PEM certificates: {error}", path.display()),
        )
    })
}

/// Reads the SMTP password from its file without one trailing newline, and warns if users
/// other than the owner have access to the file.
fn read_password_file(path: &Path) -> Result<String, NotifyError> {
    let read_error = |source| NotifyError::PasswordFile { path: path.to_owned(), source };
    let mut file = fs::File::open(path).map_err(read_error)?;
    let mode = file.metadata().map_err(read_error)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        warn!(
            path = %path.display(),
            mode = %format_args!("{mode:o}"),
            "SMTP password file has permissions for group or others, expected mode 600"
        );
    }
    let mut contents = String::new();
    file.read_to_string(&mut contents).map_err(read_error)?;
    let password = match contents.strip_suffix('\n') {
        Some(line) => line.strip_suffix('\r').unwrap_or(line),
        None => &contents,
    };
    if password.is_empty() {
        return Err(invalid_config(
            "smtp.password_file",
            format!("{} must contain the password, but it is empty", path.display()),
        ));
    }
    Ok(password.to_owned())
}

/// Writes `content` to a new .eml file in `dir` on a blocking thread and returns its path.
async fn write_outbox(dir: &Path, content: Vec<u8>) -> Result<PathBuf, NotifyError> {
    let owned_dir = dir.to_owned();
    match tokio::task::spawn_blocking(move || write_outbox_file(&owned_dir, &content)).await {
        Ok(result) => result,
        Err(join_error) if join_error.is_panic() => {
            std::panic::resume_unwind(join_error.into_panic())
        }
        // The runtime is shutting down and cancelled the task before it ran.
        Err(join_error) => {
            Err(NotifyError::Outbox { path: dir.to_owned(), source: io::Error::other(join_error) })
        }
    }
}

/// Writes `content` to a new file in `dir` under a temporary name, then renames it, so that no
/// partial message ever has an .eml name.
fn write_outbox_file(dir: &Path, content: &[u8]) -> Result<PathBuf, NotifyError> {
    prepare_outbox_dir(dir)?;
    let name = outbox_file_name();
    let path = dir.join(&name);
    let temp_path = dir.join(format!(".{name}.tmp"));
    let written = write_new_file(&temp_path, content)
        .and_then(|()| fs::rename(&temp_path, &path))
        // Syncing the directory makes the rename survive a crash.
        .and_then(|()| fs::File::open(dir)?.sync_all());
    if let Err(source) = written {
        let _ = fs::remove_file(&temp_path);
        return Err(NotifyError::Outbox { path, source });
    }
    Ok(path)
}

/// Creates the outbox directory with mode 0700, or sets an existing one to 0700.
fn prepare_outbox_dir(dir: &Path) -> Result<(), NotifyError> {
    let dir_error = |source| NotifyError::Outbox { path: dir.to_owned(), source };
    fs::DirBuilder::new().recursive(true).mode(OUTBOX_DIR_MODE).create(dir).map_err(dir_error)?;
    let mode = fs::metadata(dir).map_err(dir_error)?.permissions().mode() & 0o7777;
    if mode != OUTBOX_DIR_MODE {
        fs::set_permissions(dir, fs::Permissions::from_mode(OUTBOX_DIR_MODE)).map_err(dir_error)?;
        warn!(
            path = %dir.display(),
            old_mode = %format_args!("{mode:o}"),
            "set the outbox directory to mode 700 because its files contain passwords"
        );
    }
    Ok(())
}

/// Returns a new outbox file name: the UTC time, so that names sort by creation, and 64 random
/// bits, so that two names do not collide.
fn outbox_file_name() -> String {
    let time = chrono::Utc::now().format("%Y%m%dT%H%M%S%.6fZ");
    let random: u64 = rand::thread_rng().gen();
    format!("{time}-{random:016x}.{OUTBOX_EXTENSION}")
}

fn write_new_file(path: &Path, content: &[u8]) -> io::Result<()> {
    let mut file =
        fs::OpenOptions::new().write(true).create_new(true).mode(OUTBOX_FILE_MODE).open(path)?;
    // The umask may have cleared bits of the mode given to open.
    file.set_permissions(fs::Permissions::from_mode(OUTBOX_FILE_MODE))?;
    file.write_all(content)?;
    file.sync_all()
}

/// Builds the email that gives a client the credentials of a new account or a reset password,
/// with the steps to connect: with the sag client, or with an official WireGuard app and the
/// configuration file and QR code that `sag-agent client-config` writes.
///
/// `server` is the login API's public address (`HOST:PORT`), as the client types it, and
/// `fingerprint` the SHA-256 fingerprint of its certificate, which the client pins.
pub fn credentials_email(
    to: &str,
    reason: CredentialsReason,
    instance_id: &str,
    username: &str,
    password: &str,
    server: &str,
    fingerprint: &str,
) -> Email {
    let (subject, first_line) = match reason {
        CredentialsReason::Created => (
            format!("Your sag account {username} on {instance_id}"),
            "Your sag account has been created.",
        ),
        CredentialsReason::Reset => (
            format!("New password for your sag account {username} on {instance_id}"),
            "The password of your sag account has been reset.",
        ),
    };
    let connect_flags = format!(
        "--server {server} --fingerprint {fingerprint} \\\n       \
         --instance {instance_id} --username {username}"
    );
    let body = format!(
        "\
{first_line}

Instance ID: {instance_id}
Server:      {server}
Fingerprint: {fingerprint}
Username:    {username}
Password:    {password}

Keep the password secret. Store it in a password manager, then delete this
email.

To connect with the sag client:
1. Install the sag client, sag-agent.
2. Run this command as root and enter the password when it asks:

   sag-agent connect {connect_flags}

To connect with an official WireGuard app (Windows, macOS, Linux, Android,
iOS) instead:
1. Install WireGuard from https://www.wireguard.com/install/ or your app
   store.
2. On a computer with sag-agent, run this command and enter the password
   when it asks:

   sag-agent client-config {connect_flags} \\
       --out {username}.conf --qr

3. Import {username}.conf into the WireGuard app, or scan the QR code in
   {username}.png with the app on your phone. Both files hold the tunnel's
   private key: keep them secret.
"
    );
    Email { to: to.to_owned(), subject, body }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TO: &str = "alice@example.com";
    const FROM: &str = "sag <noreply@example.com>";
    const INSTANCE_ID: &str = "sag-0123456789abcdef";
    const USERNAME: &str = "alice01";
    const PASSWORD: &str = "Kx7_m2@Qp.v9-LrT";
    const SERVER: &str = "gw.example.com:8443";
    const FINGERPRINT: &str = "sha256:00112233";

    fn created_email() -> Email {
        credentials_email(
            TO,
            CredentialsReason::Created,
            INSTANCE_ID,
            USERNAME,
            PASSWORD,
            SERVER,
            FINGERPRINT,
        )
    }

    fn outbox_mailer(outbox_dir: &Path) -> Mailer {
        let config =
            MailConfig { from: FROM.to_owned(), smtp: None, outbox_dir: outbox_dir.to_owned() };
        Mailer::new(&config).unwrap()
    }

    fn smtp_config() -> SmtpConfig {
        SmtpConfig {
            host: "127.0.0.1".to_owned(),
            port: 2525,
            tls: TlsMode::None,
            ca_file: None,
            username: None,
            password_file: None,
            timeout_seconds: 5,
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn outbox_paths(dir: &Path) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> =
            fs::read_dir(dir).unwrap().map(|entry| entry.unwrap().path()).collect();
        paths.sort();
        paths
    }

    /// Splits a .eml file into its header lines and its decoded body with `\n` line endings.
    fn parse_eml(eml: &str) -> (Vec<&str>, String) {
        let (head, body) = eml.split_once("\r\n\r\n").expect("no blank line after the headers");
        let headers: Vec<&str> = head.split("\r\n").collect();
        let body = if headers.contains(&"Content-Transfer-Encoding: quoted-printable") {
            decode_quoted_printable(body)
        } else {
            assert!(headers.contains(&"Content-Transfer-Encoding: 7bit"), "{headers:?}");
            body.to_owned()
        };
        (headers, body.replace("\r\n", "\n"))
    }

    fn decode_quoted_printable(encoded: &str) -> String {
        let joined = encoded.replace("=\r\n", "");
        let mut bytes = Vec::new();
        let mut rest = joined.as_bytes();
        while let Some((&byte, tail)) = rest.split_first() {
            if byte == b'=' {
                let hex = std::str::from_utf8(&tail[..2]).unwrap();
                bytes.push(u8::from_str_radix(hex, 16).unwrap());
                rest = &tail[2..];
            } else {
                bytes.push(byte);
                rest = tail;
            }
        }
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn created_email_subject_and_first_line() {
        let email = created_email();
        assert_eq!(email.to, TO);
        assert_eq!(email.subject, "Your sag account alice01 on sag-0123456789abcdef");
        assert_eq!(email.body.lines().next(), Some("Your sag account has been created."));
    }

    #[test]
    fn reset_email_subject_and_first_line() {
        let email = credentials_email(
            TO,
            CredentialsReason::Reset,
            INSTANCE_ID,
            USERNAME,
            PASSWORD,
            SERVER,
            FINGERPRINT,
        );
        assert_eq!(
            email.subject,
            "New password for your sag account alice01 on sag-0123456789abcdef"
        );
        assert_eq!(
            email.body.lines().next(),
            Some("The password of your sag account has been reset.")
        );
    }

    #[test]
    fn credentials_email_carries_credentials_and_commands() {
        let lines: Vec<String> = created_email().body.lines().map(str::to_owned).collect();
        let expected = [
            "Instance ID: sag-0123456789abcdef",
            "Server:      gw.example.com:8443",
            "Fingerprint: sha256:00112233",
            "Username:    alice01",
            "Password:    Kx7_m2@Qp.v9-LrT",
            "   sag-agent connect --server gw.example.com:8443 --fingerprint sha256:00112233 \\",
            "   sag-agent client-config --server gw.example.com:8443 --fingerprint \
             sha256:00112233 \\",
            "       --instance sag-0123456789abcdef --username alice01",
            "       --instance sag-0123456789abcdef --username alice01 \\",
            "       --out alice01.conf --qr",
            "3. Import alice01.conf into the WireGuard app, or scan the QR code in",
            "   alice01.png with the app on your phone. Both files hold the tunnel's",
        ];
        for line in expected {
            assert!(lines.iter().any(|l| l == line), "missing line {line:?} in {lines:#?}");
        }
    }

    #[test]
    fn email_debug_hides_body() {
        let debug_output = format!("{:?}", created_email());
        assert!(!debug_output.contains(PASSWORD), "{debug_output}");
        assert!(debug_output.contains("alice@example.com"), "{debug_output}");
    }

    #[tokio::test]
    async fn outbox_file_has_headers_and_body() {
        let temp = tempfile::tempdir().unwrap();
        let outbox = temp.path().join("outbox");
        let email = created_email();

        let delivery = outbox_mailer(&outbox).send(&email).await.unwrap();

        let Delivery::Outbox(path) = delivery else { panic!("expected an outbox delivery") };
        assert_eq!(path.parent(), Some(outbox.as_path()));
        assert_eq!(path.extension().and_then(|e| e.to_str()), Some(OUTBOX_EXTENSION));
        let eml = fs::read_to_string(&path).unwrap();
        let (headers, body) = parse_eml(&eml);
        assert!(headers.contains(&"To: alice@example.com"), "{headers:#?}");
        assert!(headers.contains(&"From: sag <noreply@example.com>"), "{headers:#?}");
        assert!(
            headers.contains(&"Subject: Your sag account alice01 on sag-0123456789abcdef"),
            "{headers:#?}"
        );
        assert!(headers.contains(&"Content-Type: text/plain; charset=utf-8"), "{headers:#?}");
        assert!(headers.iter().any(|h| h.starts_with("Date: ")), "{headers:#?}");
        assert!(headers.iter().any(|h| h.starts_with("Message-ID: <")), "{headers:#?}");
        assert_eq!(body, email.body);
        assert!(body.contains("Instance ID: sag-0123456789abcdef\n"), "{body}");
        assert!(body.contains("Username:    alice01\n"), "{body}");
        assert!(body.contains("Password:    Kx7_m2@Qp.v9-LrT\n"), "{body}");
    }

    #[tokio::test]
    async fn outbox_file_and_directory_modes() {
        let temp = tempfile::tempdir().unwrap();
        let outbox = temp.path().join("outbox");

        let delivery = outbox_mailer(&outbox).send(&created_email()).await.unwrap();

        let Delivery::Outbox(path) = delivery else { panic!("expected an outbox delivery") };
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&outbox), 0o700);
    }

    #[tokio::test]
    async fn outbox_existing_directory_set_to_0700() {
        let temp = tempfile::tempdir().unwrap();
        let outbox = temp.path().join("outbox");
        fs::create_dir(&outbox).unwrap();
        fs::set_permissions(&outbox, fs::Permissions::from_mode(0o755)).unwrap();

        outbox_mailer(&outbox).send(&created_email()).await.unwrap();

        assert_eq!(mode(&outbox), 0o700);
    }

    #[tokio::test]
    async fn outbox_two_messages_two_files() {
        let temp = tempfile::tempdir().unwrap();
        let outbox = temp.path().join("outbox");
        let mailer = outbox_mailer(&outbox);
        let reset = credentials_email(
            "bob@example.com",
            CredentialsReason::Reset,
            INSTANCE_ID,
            "bob0001",
            "Other.pass-42",
            SERVER,
            FINGERPRINT,
        );

        let first = mailer.send(&created_email()).await.unwrap();
        let second = mailer.send(&reset).await.unwrap();

        let (Delivery::Outbox(first), Delivery::Outbox(second)) = (first, second) else {
            panic!("expected outbox deliveries");
        };
        assert_ne!(first, second);
        let mut expected = vec![first.clone(), second.clone()];
        expected.sort();
        // No temporary file is left beside the two messages.
        assert_eq!(outbox_paths(&outbox), expected);
        assert!(fs::read_to_string(&first).unwrap().contains("\r\nTo: alice@example.com\r\n"));
        assert!(fs::read_to_string(&second).unwrap().contains("\r\nTo: bob@example.com\r\n"));
    }

    #[tokio::test]
    async fn invalid_recipient_is_rejected() {
        let temp = tempfile::tempdir().unwrap();
        let outbox = temp.path().join("outbox");
        let mut email = created_email();
        email.to = "not an address".to_owned();

        let error = outbox_mailer(&outbox).send(&email).await.unwrap_err();

        let NotifyError::InvalidAddress { field, value, .. } = &error else {
            panic!("expected an invalid address, got: {error}");
        };
        assert_eq!(*field, "to");
        assert_eq!(value, "not an address");
        assert!(!outbox.exists());
    }

    #[test]
    fn invalid_sender_is_rejected() {
        let config = MailConfig {
            from: "noreply".to_owned(),
            smtp: None,
            outbox_dir: PathBuf::from("/nonexistent"),
        };
        let error = Mailer::new(&config).unwrap_err();
        let NotifyError::InvalidAddress { field, value, .. } = &error else {
            panic!("expected an invalid address, got: {error}");
        };
        assert_eq!(*field, "from");
        assert_eq!(value, "noreply");
    }

    #[test]
    fn config_parses_from_toml() {
        let config: MailConfig = toml::from_str(
            r#"
            from = "sag <noreply@example.com>"
            outbox_dir = "/var/lib/sag/outbox"

            [smtp]
            host = "smtp.example.com"
            port = 587
            tls = "starttls"
            username = "sag"
            password_file = "/etc/sag/smtp-password"
            timeout_seconds = 30
            "#,
        )
        .unwrap();
        let expected = MailConfig {
            from: FROM.to_owned(),
            smtp: Some(SmtpConfig {
                host: "smtp.example.com".to_owned(),
                port: 587,
                tls: TlsMode::StartTls,
                ca_file: None,
                username: Some("sag".to_owned()),
                password_file: Some(PathBuf::from("/etc/sag/smtp-password")),
                timeout_seconds: 30,
            }),
            outbox_dir: PathBuf::from("/var/lib/sag/outbox"),
        };
        assert_eq!(config, expected);
    }

    #[test]
    fn config_tls_modes() {
        for (text, expected) in
            [("none", TlsMode::None), ("starttls", TlsMode::StartTls), ("tls", TlsMode::Tls)]
        {
            let parsed: SmtpConfig = toml::from_str(&format!(
                "host = \"h\"\nport = 25\ntls = \"{text}\"\ntimeout_seconds = 1"
            ))
            .unwrap();
            assert_eq!(parsed.tls, expected, "{text}");
        }
        let unknown = toml::from_str::<SmtpConfig>(
            "host = \"h\"\nport = 25\ntls = \"ssl\"\ntimeout_seconds = 1",
        );
        assert!(unknown.is_err());
    }

    #[test]
    fn config_without_outbox_dir_is_rejected() {
        let error = toml::from_str::<MailConfig>("from = \"a@example.com\"").unwrap_err();
        assert!(error.to_string().contains("outbox_dir"), "{error}");
    }

    #[test]
    fn username_needs_password_file() {
        let smtp = SmtpConfig { username: Some("sag".to_owned()), ..smtp_config() };
        let error = Relay::new(&smtp).unwrap_err();
        assert!(
            matches!(error, NotifyError::InvalidConfig { field: "smtp.password_file", .. }),
            "{error}"
        );
    }

    #[test]
    fn password_file_needs_username() {
        let smtp =
            SmtpConfig { password_file: Some(PathBuf::from("/nonexistent")), ..smtp_config() };
        let error = Relay::new(&smtp).unwrap_err();
        assert!(
            matches!(error, NotifyError::InvalidConfig { field: "smtp.username", .. }),
            "{error}"
        );
    }

    #[test]
    fn zero_timeout_is_rejected() {
        let smtp = SmtpConfig { timeout_seconds: 0, ..smtp_config() };
        let error = Relay::new(&smtp).unwrap_err();
        assert!(
            matches!(error, NotifyError::InvalidConfig { field: "smtp.timeout_seconds", .. }),
            "{error}"
        );
    }

    #[test]
    fn password_file_drops_trailing_newline() {
        let temp = tempfile::tempdir().unwrap();
        for (contents, expected) in [
            ("s3cret\n", "s3cret"),
            ("s3cret\r\n", "s3cret"),
            ("s3cret", "s3cret"),
            ("a b\n\n", "a b\n"),
        ] {
            let path = temp.path().join("password");
            fs::write(&path, contents).unwrap();
            assert_eq!(read_password_file(&path).unwrap(), expected, "{contents:?}");
        }
    }

    #[test]
    fn empty_password_file_is_rejected() {
        let temp = tempfile::tempdir().unwrap();
        let path = temp.path().join("password");
        fs::write(&path, "\n").unwrap();
        let error = read_password_file(&path).unwrap_err();
        assert!(
            matches!(error, NotifyError::InvalidConfig { field: "smtp.password_file", .. }),
            "{error}"
        );
    }

    #[test]
    fn missing_password_file_names_path() {
        let error = read_password_file(Path::new("/nonexistent/smtp-password")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "failed to read the SMTP password file /nonexistent/smtp-password: No such file or \
             directory (os error 2)"
        );
    }

    #[test]
    fn ca_file_must_hold_certificates() {
        let temp = tempfile::tempdir().unwrap();
        let empty = temp.path().join("empty.pem");
        fs::write(&empty, "not a certificate\n").unwrap();
        let smtp = SmtpConfig { ca_file: Some(empty.clone()), ..smtp_config() };
        let error = Relay::new(&smtp).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "invalid mail setting smtp.ca_file: {} must contain PEM certificates, but it has \
                 none",
                empty.display()
            )
        );
        let missing = temp.path().join("missing.pem");
        let smtp = SmtpConfig { ca_file: Some(missing.clone()), ..smtp_config() };
        let error = Relay::new(&smtp).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with(&format!("failed to read the SMTP CA file {}: ", missing.display())),
            "{error}"
        );
    }

    #[test]
    fn relay_debug_hides_password() {
        let temp = tempfile::tempdir().unwrap();
        let path = temp.path().join("password");
        fs::write(&path, "Hunter2-secret\n").unwrap();
        let smtp = SmtpConfig {
            username: Some("sag".to_owned()),
            password_file: Some(path),
            ..smtp_config()
        };
        let debug_output = format!("{:?}", Relay::new(&smtp).unwrap());
        assert!(!debug_output.contains("Hunter2-secret"), "{debug_output}");
        assert!(debug_output.contains("\"sag\""), "{debug_output}");
    }
}
