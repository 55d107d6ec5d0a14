//! The CLI's side of the admin API: one HTTP/1.1 request per connection to the Unix socket.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt as _, Full};
use hyper::{body::Bytes, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{de::DeserializeOwned, Serialize};
use tokio::net::UnixStream;

use crate::api::ErrorReply;

/// Errors of an API call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent at {socket}; is `sag-agent run` running, and are you root?")]
    Connect { socket: PathBuf, source: std::io::Error },
    #[error("request to the agent failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("the agent sent an unreadable reply (status {status}): {message}")]
    Reply { status: StatusCode, message: String },
    /// The agent rejected the request; `reply.kind` gives the reason.
    #[error("{}", reply.error)]
    Rejected { status: StatusCode, reply: ErrorReply },
}

impl ClientError {
    /// Returns the process exit code for this error: 3 invalid input, 4 not found, 5 conflict
    /// or refused, 1 anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Rejected { reply, .. } => match reply.kind.as_str() {
                "invalid" => 3,
                "not_found" => 4,
                "conflict" | "refused" => 5,
                _ => 1,
            },
            _ => 1,
        }
    }
}

/// A client of the admin socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
}

impl ApiClient {
    /// Creates a client of the socket at `socket`.
    pub fn new(socket: &Path) -> Self {
        Self { socket: socket.to_owned() }
    }

    /// Sends `method path` with an optional JSON body and decodes the JSON reply.
    ///
    /// # Errors
    /// Fails if the socket cannot be reached, or with [`ClientError::Rejected`] carrying the
    /// agent's message.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect { socket: self.socket.clone(), source })?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let payload = match body {
            Some(body) => serde_json::to_vec(body).map_err(|error| ClientError::Reply {
                status: StatusCode::BAD_REQUEST,
                message: error.to_string(),
            })?,
            None => Vec::new(),
        };
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "sag-agent")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(payload)))
            .map_err(|error| ClientError::Reply {
                status: StatusCode::BAD_REQUEST,
                message: error.to_string(),
            })?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|error| ClientError::Reply {
                status,
                message: format!("{error}: {}", String::from_utf8_lossy(&bytes)),
            });
        }
        match serde_json::from_slice::<ErrorReply>(&bytes) {
            Ok(reply) => Err(ClientError::Rejected { status, reply }),
            Err(_) => Err(ClientError::Reply {
                status,
                message: String::from_utf8_lossy(&bytes).into_owned(),
            }),
        }
    }
}
