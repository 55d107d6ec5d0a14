//! The login API that clients use: HTTPS with JSON bodies, on a TCP port of the box.
//!
//! `POST /v1/login` takes a [`LoginRequest`] and returns a [`LoginReply`]. `POST /v1/logout`
//! takes a [`LogoutRequest`]. Errors come back as an [`ErrorReply`],
//! `{"kind": ..., "error": ...}`, with one of these statuses:
//!
//! - 400 `invalid`: a field of the request is invalid.
//! - 401 `wrong_credentials`: wrong username or password.
//! - 403 `refused`: the account is disabled or the instance is not running.
//! - 404 `not_found`: unknown instance, or no session for a logout.
//! - 409 `conflict`: the public key is in use by another session.
//! - 429 `throttled`: too many failed logins, with `Retry-After` in seconds.
//! - 500 `internal`: a failure on the gateway, which is logged.
//! - 503 `unavailable`: the instance has no tunnel yet, or no free address.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    extract::State,
    http::{header::RETRY_AFTER, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
    Extension, Json, Router,
};
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Bytes, Method, Request};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{rustls::pki_types::ServerName, TlsAcceptor, TlsConnector};
use tracing::{debug, info, warn};

use crate::{
    api::ErrorReply,
    gateway::{source_of, Gateway, LoginError, LoginReply, LoginRequest, LogoutRequest},
    tls,
};

/// Timeout of each step of setting up a login connection. The server applies it to the TLS
/// handshake and, separately, to reading the request headers. [`call`] applies it to the TCP
/// connect.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Maximum request body the login API reads, in bytes.
const MAX_BODY_BYTES: usize = 16 * 1024;

/// Remote address of the TCP connection that carried a request.
#[derive(Debug, Clone, Copy)]
struct Source(SocketAddr);

/// Login or logout error, converted to an HTTP response.
struct LoginApiError(LoginError);

impl IntoResponse for LoginApiError {
    fn into_response(self) -> Response {
        let (status, kind) = match &self.0 {
            LoginError::Invalid { .. } => (StatusCode::BAD_REQUEST, "invalid"),
            LoginError::WrongCredentials { .. } => (StatusCode::UNAUTHORIZED, "wrong_credentials"),
            LoginError::UnknownInstance(_) | LoginError::NoSession { .. } => {
                (StatusCode::NOT_FOUND, "not_found")
            }
            LoginError::Disabled { .. }
            | LoginError::InstanceNotRunning { .. }
            | LoginError::Released { .. } => (StatusCode::FORBIDDEN, "refused"),
            LoginError::Throttled { .. } => (StatusCode::TOO_MANY_REQUESTS, "throttled"),
            LoginError::KeyInUse(_) => (StatusCode::CONFLICT, "conflict"),
            LoginError::NoTunnel(_) | LoginError::PoolFull(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
            LoginError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };

        if status == StatusCode::INTERNAL_SERVER_ERROR {
            warn!(error = %self.0, "login failed");
        }

        let reply = ErrorReply { kind: kind.to_owned(), error: self.0.to_string() };
        let mut response = (status, Json(reply)).into_response();
        if let LoginError::Throttled { retry_after_s } = self.0 {
            if let Ok(value) = HeaderValue::from_str(&retry_after_s.to_string()) {
                response.headers_mut().insert(RETRY_AFTER, value);
            }
        }
        response
    }
}

/// Builds the login API's routes.
pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v1/login", post(login))
        .route("/v1/logout", post(logout))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(gateway)
}

async fn login(
    State(gateway): State<Arc<Gateway>>,
    Extension(Source(source)): Extension<Source>,
    Json(request): Json<LoginRequest>,
) -> Result<Json<LoginReply>, LoginApiError> {
    gateway.login(&request, source_of(source)).await.map(Json).map_err(LoginApiError)
}

async fn logout(
    State(gateway): State<Arc<Gateway>>,
    Json(request): Json<LogoutRequest>,
) -> Result<Json<serde_json::Value>, LoginApiError> {
    gateway.logout(&request).await.map_err(LoginApiError)?;
    Ok(Json(json!({ "logged_out": request.username })))
}

/// Serves the login API on `listener` with TLS until `shutdown` completes. Connections
/// accepted before then run to their end.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
    gateway: Arc<Gateway>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let acceptor = TlsAcceptor::from(tls);
    let app = router(gateway);
    info!(address = ?listener.local_addr().ok(), "login API listening");

    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(error = %error, "accepting a login connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };

        let acceptor = acceptor.clone();
        let app = app.clone().layer(Extension(Source(peer)));
        tokio::spawn(async move {
            let stream =
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        debug!(%peer, error = %error, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };

            let service = hyper_util::service::TowerToHyperService::new(app);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(HANDSHAKE_TIMEOUT);
            if let Err(error) = builder.serve_connection(TokioIo::new(stream), service).await {
                debug!(%peer, error = %error, "login connection ended with an error");
            }
        });
    }
}

/// Errors of calling the login API from a client.
#[derive(Debug, thiserror::Error)]
pub enum LoginClientError {
    #[error("invalid server {0:?}: must be HOST:PORT")]
    Server(String),
    #[error("cannot reach the login server {server}: {source}")]
    Connect { server: String, source: std::io::Error },
    #[error("TLS with the login server {server} failed: {source}")]
    Tls { server: String, source: std::io::Error },
    #[error("request to the login server failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("the login server sent an unreadable reply (status {status}): {message}")]
    Reply { status: StatusCode, message: String },
    /// The server rejected the request. `reply.kind` is the reason, as listed in the module
    /// documentation.
    #[error("{}", reply.error)]
    Refused { status: StatusCode, reply: ErrorReply },
}

/// Sends `POST path` with a JSON body to the login API at `server` (`HOST:PORT`) and decodes
/// the JSON reply. The only certificate trusted is the one whose SHA-256 fingerprint is `pin`.
///
/// # Errors
/// Fails if the server cannot be reached, presents another certificate, rejects the request,
/// or sends a reply that is not the expected JSON.
///
/// NOTE: only the TCP connect has a timeout. A server that accepts the connection and then
/// stalls keeps this call waiting unless the caller adds a timeout.
pub async fn call<T: DeserializeOwned>(
    server: &str,
    pin: [u8; 32],
    path: &str,
    body: &impl Serialize,
) -> Result<T, LoginClientError> {
    let (host, _) =
        server.rsplit_once(':').ok_or_else(|| LoginClientError::Server(server.to_owned()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_owned())
        .map_err(|_| LoginClientError::Server(server.to_owned()))?;

    let tcp = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(server))
        .await
        .map_err(|_| LoginClientError::Connect {
            server: server.to_owned(),
            source: std::io::ErrorKind::TimedOut.into(),
        })?
        .map_err(|source| LoginClientError::Connect { server: server.to_owned(), source })?;
    let connector = TlsConnector::from(tls::pinned_client_config(pin));
    let stream = connector
        .connect(name, tcp)
        .await
        .map_err(|source| LoginClientError::Tls { server: server.to_owned(), source })?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);

    // NOTE: a failure to encode the body or build the request is reported as `Reply` with
    // status 400, although nothing was sent. The callers in this crate pass plain structs and
    // constant paths, so neither step should fail.
    let payload = serde_json::to_vec(body).map_err(|error| LoginClientError::Reply {
        status: StatusCode::BAD_REQUEST,
        message: error.to_string(),
    })?;
    let request = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("host", host)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(payload)))
        .map_err(|error| LoginClientError::Reply {
            status: StatusCode::BAD_REQUEST,
            message: error.to_string(),
        })?;

    let response = sender.send_request(request).await?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        let reply =
            serde_json::from_slice::<ErrorReply>(&bytes).map_err(|_| LoginClientError::Reply {
                status,
                message: String::from_utf8_lossy(&bytes).into_owned(),
            })?;
        return Err(LoginClientError::Refused { status, reply });
    }
    serde_json::from_slice(&bytes)
        .map_err(|error| LoginClientError::Reply { status, message: error.to_string() })
}
