//! SMTP delivery of the credentials email to a real SMTP server: aiosmtpd on 127.0.0.1, which
//! stores every message it accepts as a JSON file. Needs Debian's python3-aiosmtpd.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use sag_agent::notify::{
    credentials_email, CredentialsReason, Delivery, Email, MailConfig, Mailer, NotifyError,
    SmtpConfig, TlsMode,
};
use serde_json::Value;
use tempfile::TempDir;

/// Interpreter for the server script. Debian's python3-aiosmtpd is installed for the system
/// interpreter, which a `python3` earlier in PATH (from pyenv, for example) would not see.
const PYTHON: &str = "/usr/bin/python3";
/// Time limit for the server to report its port, and for each SMTP step of the mailer.
const WAIT: Duration = Duration::from_secs(10);
const FROM: &str = "sag <noreply@example.com>";
const TO: &str = "alice@example.com";
const INSTANCE_ID: &str = "sag-0123456789abcdef";
const USERNAME: &str = "alice01";
const PASSWORD: &str = "Kx7_m2@Qp.v9-LrT";
const SERVER: &str = "gw.example.com:8443";
const FINGERPRINT: &str = "sha256:00112233";
const SMTP_LOGIN: &str = "sag-mailer";
const SMTP_PASSWORD: &str = "Relay.pass-0451";
const REJECTED_RECIPIENT: &str = "nobody@example.com";

/// The SMTP server: binds 127.0.0.1 on a port the kernel picks, prints that port, and writes
/// each accepted message to MAIL_DIR/N.json with its envelope, login, headers and decoded body.
/// With `--cert` and `--key` it requires STARTTLS before anything else (and before a login),
/// or with `--implicit-tls` speaks TLS from the first byte.
const SERVER_SCRIPT: &str = r#"
import argparse
import asyncio
import json
import os
import ssl

from email import message_from_bytes, policy
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


class Sink:
    def __init__(self, mail_dir, rejected):
        self.mail_dir = mail_dir
        self.rejected = rejected
        self.count = 0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.rejected:
            return "550 5.1.1 <%s>: mailbox unavailable" % address
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        message = message_from_bytes(envelope.content, policy=policy.default)
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "login": session.auth_data.login.decode() if session.authenticated else None,
            "headers": {name: str(value) for name, value in message.items()},
            "body": message.get_content().replace("\r\n", "\n"),
        }
        self.count += 1
        path = os.path.join(self.mail_dir, "%d.json" % self.count)
        with open(path + ".tmp", "w") as file:
            json.dump(record, file)
        os.rename(path + ".tmp", path)
        return "250 Message accepted for delivery"


def authenticator(login, password):
    def check(server, session, envelope, mechanism, auth_data):
        valid = isinstance(auth_data, LoginPassword) and auth_data == (login, password)
        # handled=False makes aiosmtpd send the 535 reply itself on failure.
        return AuthResult(success=valid, handled=False, auth_data=auth_data)

    return check


async def serve(args):
    sink = Sink(args.mail_dir, set(args.reject))
    # A fixed host name keeps aiosmtpd from looking up this machine's FQDN.
    options = {"hostname": "sag-test-smtp"}
    context = None
    if args.cert is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)
    if context is not None and not args.implicit_tls:
        options.update(tls_context=context, require_starttls=True)
    if args.login is not None:
        options.update(
            auth_required=True,
            # aiosmtpd counts only STARTTLS as TLS, so an implicit TLS server must not
            # require it for AUTH.
            auth_require_tls=context is not None and not args.implicit_tls,
            authenticator=authenticator(args.login.encode(), args.password.encode()),
        )
    loop = asyncio.get_running_loop()
    server_ssl = context if args.implicit_tls else None
    server = await loop.create_server(
        lambda: SMTP(sink, **options), "127.0.0.1", 0, ssl=server_ssl
    )
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


parser = argparse.ArgumentParser()
parser.add_argument("mail_dir")
parser.add_argument("--reject", action="append", default=[])
parser.add_argument("--login")
parser.add_argument("--password")
parser.add_argument("--cert")
parser.add_argument("--key")
parser.add_argument("--implicit-tls", action="store_true")
asyncio.run(serve(parser.parse_args()))
"#;

/// An aiosmtpd process on 127.0.0.1, killed by its PID when dropped, and its temporary
/// directory with the script, the received messages and the server's stderr.
struct SmtpServer {
    child: Child,
    port: u16,
    temp: TempDir,
}

impl SmtpServer {
    /// Starts the server with extra script arguments and waits for it to report its port.
    fn start(args: &[&str]) -> Self {
        let temp = tempfile::tempdir().unwrap();
        let script = temp.path().join("smtp_server.py");
        fs::write(&script, SERVER_SCRIPT).unwrap();

        let mail_dir = temp.path().join("mail");
        fs::create_dir(&mail_dir).unwrap();
        let stderr = fs::File::create(temp.path().join("stderr.txt")).unwrap();
        let mut child = Command::new(PYTHON)
            .arg(&script)
            .arg(&mail_dir)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|error| panic!("failed to start {PYTHON}: {error}"));

        let stdout = child.stdout.take().unwrap();
        let (sender, receiver) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = sender.send(line);
        });

        // The guard exists before the wait, so a failed start still kills the process.
        let mut server = Self { child, port: 0, temp };
        let line = receiver.recv_timeout(WAIT).unwrap_or_default();
        server.port = line.trim().parse().unwrap_or_else(|_| {
            panic!(
                "SMTP server did not report its port within {WAIT:?} (is python3-aiosmtpd \
                 installed for {PYTHON}?); stdout {line:?}, stderr:\n{}",
                server.stderr()
            )
        });
        server
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn stderr(&self) -> String {
        fs::read_to_string(self.temp.path().join("stderr.txt")).unwrap_or_default()
    }

    /// Returns the messages the server accepted, in order of arrival.
    fn messages(&self) -> Vec<Value> {
        let mail_dir = self.temp.path().join("mail");
        let mut paths: Vec<PathBuf> = fs::read_dir(&mail_dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|extension| extension == "json"))
            .collect();
        paths.sort_by_key(|path| message_number(path));
        paths
            .iter()
            .map(|path| serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap())
            .collect()
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn message_number(path: &Path) -> u32 {
    path.file_stem().unwrap().to_str().unwrap().parse().unwrap()
}

fn mailer(port: u16, login: Option<(&str, PathBuf)>) -> Mailer {
    let (username, password_file) = match login {
        Some((username, path)) => (Some(username.to_owned()), Some(path)),
        None => (None, None),
    };
    let config = MailConfig {
        from: FROM.to_owned(),
        smtp: Some(SmtpConfig {
            host: "127.0.0.1".to_owned(),
            port,
            tls: TlsMode::None,
            ca_file: None,
            username,
            password_file,
            timeout_seconds: WAIT.as_secs(),
        }),
        outbox_dir: PathBuf::from("/nonexistent/outbox"),
    };
    Mailer::new(&config).unwrap()
}

fn created_email(to: &str) -> Email {
    credentials_email(
        to,
        CredentialsReason::Created,
        INSTANCE_ID,
        USERNAME,
        PASSWORD,
        SERVER,
        FINGERPRINT,
    )
}

/// Sends `email` with the runtime's own time limit on top of the mailer's per-step limits.
async fn send(mailer: &Mailer, email: &Email) -> Result<Delivery, NotifyError> {
    let limit = WAIT * 6;
    tokio::time::timeout(limit, mailer.send(email))
        .await
        .unwrap_or_else(|_| panic!("Mailer::send did not finish within {limit:?}"))
}

fn header<'a>(message: &'a Value, name: &str) -> &'a str {
    message["headers"][name].as_str().unwrap_or_else(|| panic!("no {name} header: {message:#}"))
}

fn write_password_file(dir: &Path, contents: &str) -> PathBuf {
    let path = dir.join("smtp-password");
    fs::write(&path, contents).unwrap();
    path
}

#[tokio::test]
async fn credentials_email_arrives() {
    let server = SmtpServer::start(&[]);
    let email = created_email(TO);

    let delivery = send(&mailer(server.port, None), &email).await.unwrap();

    assert_eq!(delivery, Delivery::Smtp);
    let messages = server.messages();
    assert_eq!(messages.len(), 1, "{messages:#?}");
    let message = &messages[0];
    assert_eq!(message["mail_from"], "noreply@example.com");
    assert_eq!(message["rcpt_tos"], serde_json::json!([TO]));
    assert_eq!(message["login"], Value::Null);
    assert_eq!(header(message, "To"), TO);
    assert_eq!(header(message, "From"), FROM);
    assert_eq!(header(message, "Subject"), "Your sag account alice01 on sag-0123456789abcdef");
    let body = message["body"].as_str().unwrap();
    assert_eq!(body, email.body);
    assert!(body.contains("\nInstance ID: sag-0123456789abcdef\n"), "{body}");
    assert!(body.contains("\nUsername:    alice01\n"), "{body}");
    assert!(body.contains("\nPassword:    Kx7_m2@Qp.v9-LrT\n"), "{body}");
}

#[tokio::test]
async fn login_with_password_file() {
    let server = SmtpServer::start(&["--login", SMTP_LOGIN, "--password", SMTP_PASSWORD]);
    let secrets = tempfile::tempdir().unwrap();
    let password_file = write_password_file(secrets.path(), &format!("{SMTP_PASSWORD}\n"));
    let mailer = mailer(server.port, Some((SMTP_LOGIN, password_file)));

    let delivery = send(&mailer, &created_email(TO)).await.unwrap();

    assert_eq!(delivery, Delivery::Smtp);
    let messages = server.messages();
    assert_eq!(messages.len(), 1, "{messages:#?}");
    assert_eq!(messages[0]["login"], SMTP_LOGIN);
    assert_eq!(messages[0]["rcpt_tos"], serde_json::json!([TO]));
}

#[tokio::test]
async fn wrong_password_is_auth_error() {
    let server = SmtpServer::start(&["--login", SMTP_LOGIN, "--password", SMTP_PASSWORD]);
    let secrets = tempfile::tempdir().unwrap();
    let password_file = write_password_file(secrets.path(), "Wrong.pass-0451\n");
    let mailer = mailer(server.port, Some((SMTP_LOGIN, password_file)));

    let error = send(&mailer, &created_email(TO)).await.unwrap_err();

    let NotifyError::Auth { server: address, username, source } = &error else {
        panic!("expected an authentication error, got: {error}");
    };
    assert_eq!(address, &server.address());
    assert_eq!(username, SMTP_LOGIN);
    assert!(source.is_permanent(), "{error}");
    assert!(!error.to_string().contains("Wrong.pass-0451"), "{error}");
    assert!(server.messages().is_empty());
}

#[tokio::test]
async fn rejected_recipient_names_recipient() {
    let server = SmtpServer::start(&["--reject", REJECTED_RECIPIENT]);

    let error =
        send(&mailer(server.port, None), &created_email(REJECTED_RECIPIENT)).await.unwrap_err();

    let NotifyError::RejectedRecipient { server: address, recipient, source } = &error else {
        panic!("expected a rejected recipient, got: {error}");
    };
    assert_eq!(address, &server.address());
    assert_eq!(recipient, REJECTED_RECIPIENT);
    assert!(source.is_permanent(), "{error}");
    let message = error.to_string();
    assert!(
        message.starts_with(&format!(
            "SMTP server {} rejected the recipient nobody@example.com: ",
            server.address()
        )),
        "{message}"
    );
    assert!(message.contains("mailbox unavailable"), "{message}");
    assert!(server.messages().is_empty());
}

#[tokio::test]
async fn starttls_not_offered_is_tls_error() {
    // aiosmtpd without a TLS context does not offer STARTTLS.
    let server = SmtpServer::start(&[]);
    let config = MailConfig {
        from: FROM.to_owned(),
        smtp: Some(SmtpConfig {
            host: "127.0.0.1".to_owned(),
            port: server.port,
            tls: TlsMode::StartTls,
            ca_file: None,
            username: None,
            password_file: None,
            timeout_seconds: WAIT.as_secs(),
        }),
        outbox_dir: PathBuf::from("/nonexistent/outbox"),
    };

    let error = send(&Mailer::new(&config).unwrap(), &created_email(TO)).await.unwrap_err();

    let NotifyError::Tls { server: address, .. } = &error else {
        panic!("expected a TLS error, got: {error}");
    };
    assert_eq!(address, &server.address());
    assert!(server.messages().is_empty());
}

#[tokio::test]
async fn closed_port_is_connect_error() {
    // The kernel picks a free port, and closing the listener leaves nothing on it.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();

    let error = send(&mailer(port, None), &created_email(TO)).await.unwrap_err();

    let NotifyError::Connect { server: address, .. } = &error else {
        panic!("expected a connect error, got: {error}");
    };
    assert_eq!(address, &format!("127.0.0.1:{port}"));
    assert!(
        error
            .to_string()
            .starts_with(&format!("failed to connect to SMTP server 127.0.0.1:{port}")),
        "{error}"
    );
}

#[tokio::test]
async fn implicit_tls_to_plain_server_is_tls_error() {
    // The server speaks plain SMTP, so the client's TLS handshake reads a greeting instead.
    let server = SmtpServer::start(&[]);
    let config = MailConfig {
        from: FROM.to_owned(),
        smtp: Some(SmtpConfig {
            host: "127.0.0.1".to_owned(),
            port: server.port,
            tls: TlsMode::Tls,
            ca_file: None,
            username: None,
            password_file: None,
            timeout_seconds: WAIT.as_secs(),
        }),
        outbox_dir: PathBuf::from("/nonexistent/outbox"),
    };

    let error = send(&Mailer::new(&config).unwrap(), &created_email(TO)).await.unwrap_err();

    let NotifyError::Tls { server: address, .. } = &error else {
        panic!("expected a TLS error, got: {error}");
    };
    assert_eq!(address, &server.address());
    assert!(server.messages().is_empty());
}

/// A test CA and a certificate it signed for 127.0.0.1, as PEM files in a directory.
struct TestPki {
    dir: TempDir,
}

impl TestPki {
    /// Makes a CA named `name` and a server certificate for the IP address 127.0.0.1.
    fn new(name: &str) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, name);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let server_key = KeyPair::generate().unwrap();
        let server_params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        let server = server_params.signed_by(&server_key, &ca, &ca_key).unwrap();
        fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        fs::write(dir.path().join("server.pem"), server.pem()).unwrap();
        fs::write(dir.path().join("server.key"), server_key.serialize_pem()).unwrap();
        Self { dir }
    }

    fn path(&self, file: &str) -> String {
        self.dir.path().join(file).display().to_string()
    }
}

/// Returns a mailer for the relay on 127.0.0.1:`port` with `tls`, that trusts the CA in
/// `ca_file` and logs in as [`SMTP_LOGIN`].
fn tls_mailer(port: u16, tls: TlsMode, ca_file: String, password_file: PathBuf) -> Mailer {
    let config = MailConfig {
        from: FROM.to_owned(),
        smtp: Some(SmtpConfig {
            host: "127.0.0.1".to_owned(),
            port,
            tls,
            ca_file: Some(PathBuf::from(ca_file)),
            username: Some(SMTP_LOGIN.to_owned()),
            password_file: Some(password_file),
            timeout_seconds: WAIT.as_secs(),
        }),
        outbox_dir: PathBuf::from("/nonexistent/outbox"),
    };
    Mailer::new(&config).unwrap()
}

/// Starts a TLS relay with the certificate of `pki` that requires [`SMTP_LOGIN`], and sends
/// the credentials email to it through a mailer that trusts the CA in `ca_file`.
async fn send_over_tls(
    pki: &TestPki,
    ca_file: String,
    tls: TlsMode,
) -> (SmtpServer, Result<Delivery, NotifyError>) {
    let (cert, key) = (pki.path("server.pem"), pki.path("server.key"));
    let mut args =
        vec!["--cert", &cert, "--key", &key, "--login", SMTP_LOGIN, "--password", SMTP_PASSWORD];
    if tls == TlsMode::Tls {
        args.push("--implicit-tls");
    }
    let server = SmtpServer::start(&args);
    let password_file = write_password_file(server.temp.path(), SMTP_PASSWORD);
    let mailer = tls_mailer(server.port, tls, ca_file, password_file);
    let result = send(&mailer, &created_email(TO)).await;
    (server, result)
}

#[tokio::test]
async fn starttls_with_private_ca_delivers() {
    let pki = TestPki::new("sag test CA");
    let (server, result) = send_over_tls(&pki, pki.path("ca.pem"), TlsMode::StartTls).await;
    let delivery = result.unwrap_or_else(|error| panic!("{error}; server: {}", server.stderr()));
    assert_eq!(delivery, Delivery::Smtp);
    let messages = server.messages();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0]["login"], SMTP_LOGIN);
    assert_eq!(messages[0]["rcpt_tos"], serde_json::json!([TO]));
    assert!(messages[0]["body"].as_str().unwrap().contains(PASSWORD));
}

#[tokio::test]
async fn implicit_tls_with_private_ca_delivers() {
    let pki = TestPki::new("sag test CA");
    let (server, result) = send_over_tls(&pki, pki.path("ca.pem"), TlsMode::Tls).await;
    let delivery = result.unwrap_or_else(|error| panic!("{error}; server: {}", server.stderr()));
    assert_eq!(delivery, Delivery::Smtp);
    let messages = server.messages();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0]["login"], SMTP_LOGIN);
}

#[tokio::test]
async fn certificate_of_another_ca_is_tls_error() {
    let pki = TestPki::new("sag test CA");
    let other = TestPki::new("another CA");
    let (server, result) = send_over_tls(&pki, other.path("ca.pem"), TlsMode::StartTls).await;
    let error = result.unwrap_err();
    assert!(matches!(error, NotifyError::Tls { .. }), "{error:?}");
    assert!(
        error
            .to_string()
            .starts_with(&format!("TLS with SMTP server {} failed: ", server.address())),
        "{error}"
    );
    assert!(server.messages().is_empty(), "nothing was delivered");
}
