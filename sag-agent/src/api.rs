//! The admin API: HTTP/1.1 with JSON bodies on a Unix socket that only root can open.
//!
//! Errors come back as `{"kind": ..., "error": ...}` with status 400 (invalid), 404 (not
//! found), 409 (conflict or refused) or 500. A request body that is not valid JSON of the
//! expected shape gets kind `invalid` with the status axum gives it (400, 415 or 422).

use std::{
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use axum::{
    extract::{rejection::JsonRejection, FromRequest, Path as UrlPath, Request, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::UnixListener;
use tracing::{error, info, warn};

use crate::{
    admin::{
        AccountChange, Admin, AdminError, CreatedAccount, NetworkChange, NetworkChoice, NewAccount,
        NewInstance,
    },
    gateway::{Gateway, LoginError, TunnelError, TunnelInfo},
    kernel::{KernelError, KernelSync},
    notify::{credentials_email, CredentialsReason, Delivery, Mailer},
};

/// State shared by the API handlers.
#[derive(Clone)]
pub struct AppState {
    pub admin: Admin,
    /// The kernel maps that follow the store.
    pub kernel: std::sync::Arc<KernelSync>,
    pub mailer: std::sync::Arc<Mailer>,
    /// Login address written into credentials emails.
    pub login_server: String,
    /// The instances' WireGuard tunnels and sessions.
    pub gateway: std::sync::Arc<Gateway>,
    /// SHA-256 fingerprint of the login API's certificate, which clients pin.
    pub login_fingerprint: String,
    /// Packages, payments, statements and reports.
    pub billing: crate::billing::Billing,
    /// Subscription orders and the lifecycle engine.
    pub lifecycle: std::sync::Arc<crate::lifecycle::Lifecycle>,
}

/// An instance with what its clients need to connect, as `GET /instances/{id}` returns it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceDetail {
    #[serde(flatten)]
    pub instance: crate::admin::Instance,
    /// Address of the login API, and the fingerprint of its certificate.
    pub login_server: String,
    pub login_fingerprint: String,
    /// The instance's tunnel, once it has CIDR blocks.
    pub tunnel: Option<TunnelInfo>,
}

/// Outcome of a credentials email.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EmailReport {
    pub to: String,
    /// `smtp`, `outbox` or `failed`.
    pub delivery: String,
    /// The .eml file, for the outbox.
    pub path: Option<String>,
    /// Reason sending failed.
    pub error: Option<String>,
}

/// Reply of an account creation: the account, its password (shown once) and the email.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccountCreatedReply {
    #[serde(flatten)]
    pub created: CreatedAccount,
    pub email: EmailReport,
}

impl AppState {
    /// Sends the credentials email. A failure is reported, not returned: the change it
    /// reports is already committed.
    async fn send_credentials(
        &self,
        to: &str,
        reason: CredentialsReason,
        instance_id: &str,
        username: &str,
        password: &str,
    ) -> EmailReport {
        let email = credentials_email(
            to,
            reason,
            instance_id,
            username,
            password,
            &self.login_server,
            &self.login_fingerprint,
        );
        match self.mailer.send(&email).await {
            Ok(Delivery::Smtp) => EmailReport {
                to: to.to_owned(),
                delivery: "smtp".to_owned(),
                path: None,
                error: None,
            },
            Ok(Delivery::Outbox(path)) => EmailReport {
                to: to.to_owned(),
                delivery: "outbox".to_owned(),
                path: Some(path.display().to_string()),
                error: None,
            },
            Err(error) => {
                error!(instance = instance_id, username, error = %error, "credentials email failed");
                EmailReport {
                    to: to.to_owned(),
                    delivery: "failed".to_owned(),
                    path: None,
                    error: Some(error.to_string()),
                }
            }
        }
    }
}

/// An error reply of the API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorReply {
    /// `invalid`, `not_found`, `conflict`, `refused` or `internal`.
    pub kind: String,
    /// The message for the admin.
    pub error: String,
}

struct ApiError(AdminError);

/// A JSON request body. Unlike [`Json`], a body it cannot read is rejected with an
/// [`ErrorReply`], as every other error is.
struct JsonBody<T>(T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => {
                let error = format!("invalid request body: {}", rejection.body_text());
                warn!(kind = "invalid", error, "admin request rejected");
                let reply = ErrorReply { kind: "invalid".to_owned(), error };
                Err((rejection.status(), Json(reply)).into_response())
            }
        }
    }
}

impl From<AdminError> for ApiError {
    fn from(error: AdminError) -> Self {
        Self(error)
    }
}

impl From<KernelError> for ApiError {
    /// Reports a change that is in the store but could not be applied to the kernel. The
    /// agent applies the store again when it restarts.
    fn from(error: KernelError) -> Self {
        Self(AdminError::Internal(format!(
            "the change is saved but was not applied to the kernel: {:#}; restart the agent \
             to apply the stored state",
            anyhow::Error::from(error)
        )))
    }
}

impl From<TunnelError> for ApiError {
    /// Reports a change that is in the store but whose tunnel could not follow.
    fn from(error: TunnelError) -> Self {
        Self(AdminError::Internal(format!(
            "the change is saved but the tunnel did not follow: {:#}; restart the agent to \
             apply the stored state",
            anyhow::Error::from(error)
        )))
    }
}

impl From<LoginError> for ApiError {
    fn from(error: LoginError) -> Self {
        Self(AdminError::Internal(format!("ending the session failed: {error}")))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind) = match &self.0 {
            AdminError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid"),
            AdminError::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
            AdminError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            AdminError::Refused(_) => (StatusCode::CONFLICT, "refused"),
            AdminError::Store(_) | AdminError::Credential(_) | AdminError::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        let message = if status == StatusCode::INTERNAL_SERVER_ERROR {
            error!(error = ?self.0, "admin request failed");
            format!("{:#}", anyhow::Error::from(self.0))
        } else {
            warn!(kind, error = %self.0, "admin request rejected");
            self.0.to_string()
        };
        (status, Json(ErrorReply { kind: kind.to_owned(), error: message })).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// Body of `POST /instances`.
#[derive(Debug, Serialize, Deserialize)]
pub struct CreateInstanceBody {
    pub owner: String,
    pub area: String,
    pub account_quota: u32,
    pub months: u32,
}

/// Body of `POST /instances/trial`.
#[derive(Debug, Serialize, Deserialize)]
pub struct TrialBody {
    pub owner: String,
    pub area: String,
}

/// Body of `PATCH /instances/{id}/network`; absent fields stay as they are.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct NetworkBody {
    pub ccn_id: Option<String>,
    pub ccn_name: Option<String>,
    pub cen_id: Option<String>,
    pub cen_name: Option<String>,
    /// An address, or the empty string to remove the server.
    pub dns_active: Option<String>,
    pub dns_standby: Option<String>,
    pub cidr_blocks: Option<Vec<Ipv4Net>>,
    pub allowed_destinations: Option<Vec<Ipv4Net>>,
    pub client_to_client: Option<bool>,
}

/// Body of `POST /instances/{id}/accounts`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CreateAccountBody {
    pub username: Option<String>,
    pub email: String,
    pub password: Option<String>,
    pub static_ip: Option<Ipv4Addr>,
    pub bandwidth_kbps: Option<u32>,
}

/// Body of `PATCH /instances/{id}/accounts/{username}`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct UpdateAccountBody {
    pub enabled: Option<bool>,
    pub bandwidth_kbps: Option<u32>,
    /// An address, or the empty string to clear it.
    pub static_ip: Option<String>,
}

/// Body of `POST /instances/{id}/accounts/{username}/password`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PasswordBody {
    /// The new password; without it one is generated.
    pub password: Option<String>,
}

/// Reply of a password reset: the new password, shown once, and the email.
#[derive(Debug, Serialize, Deserialize)]
pub struct PasswordReply {
    pub password: String,
    pub email: EmailReport,
}

fn choice(
    id: Option<String>,
    name: Option<String>,
    field: &'static str,
) -> Result<Option<NetworkChoice>, AdminError> {
    match (id, name) {
        (Some(_), Some(_)) => Err(AdminError::Invalid(crate::validation::ValidationError {
            field,
            rule: "give an existing ID or a new name, not both".to_owned(),
            value: "both".to_owned(),
        })),
        (Some(id), None) => Ok(Some(NetworkChoice::Existing(id))),
        (None, Some(name)) => Ok(Some(NetworkChoice::Create(name))),
        (None, None) => Ok(None),
    }
}

fn optional_address(
    field: &'static str,
    text: Option<String>,
) -> Result<Option<Option<Ipv4Addr>>, AdminError> {
    match text {
        None => Ok(None),
        Some(text) if text.is_empty() => Ok(Some(None)),
        Some(text) => text.parse().map(|address| Some(Some(address))).map_err(|_| {
            AdminError::Invalid(crate::validation::ValidationError {
                field,
                rule: "must be an IPv4 address".to_owned(),
                value: format!("{text:?}"),
            })
        }),
    }
}

/// Builds the API's routes over `state`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/instances", get(list_instances).post(create_instance))
        .route("/instances/trial", post(claim_trial))
        .route("/instances/{id}", get(show_instance).delete(delete_instance))
        .route("/instances/{id}/network", get(show_network).patch(set_network))
        .route("/instances/{id}/accounts", get(list_accounts).post(create_account))
        .route(
            "/instances/{id}/accounts/{username}",
            get(show_account).patch(update_account).delete(delete_account),
        )
        .route("/instances/{id}/accounts/{username}/password", post(reset_password))
        .route("/instances/{id}/accounts/{username}/roam", post(roam_account))
        .route("/instances/{id}/monitor", get(monitor))
        .route("/instances/{id}/traffic", get(traffic))
        .route("/instances/{id}/renew", post(renew_instance))
        .route("/instances/{id}/upgrade", post(upgrade_instance))
        .route("/instances/{id}/auto-renew", axum::routing::put(set_auto_renew))
        .route("/instances/{id}/expiry", axum::routing::put(set_expiry))
        .route("/lifecycle/run", post(run_lifecycle))
        .route("/billing/report", get(billing_report))
        .route("/billing/packages", get(list_packages).post(buy_package))
        .route("/billing/statements", get(list_statements))
        .route("/billing/payments", post(record_payment))
        .route("/billing/contacts", get(show_contact).put(set_contact))
        .fallback(unknown_route)
        .method_not_allowed_fallback(unknown_route)
        .with_state(state)
}

/// Replies with a JSON error to requests that no route takes, such as an ID with a `/` in it.
async fn unknown_route(uri: axum::http::Uri) -> Response {
    let reply = ErrorReply {
        kind: "not_found".to_owned(),
        error: format!("no such API resource: {}", uri.path()),
    };
    (StatusCode::NOT_FOUND, Json(reply)).into_response()
}

async fn list_instances(State(state): State<AppState>) -> ApiResult<Vec<crate::admin::Instance>> {
    let admin = &state.admin;
    Ok(Json(admin.list_instances().await?))
}

async fn create_instance(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<CreateInstanceBody>,
) -> ApiResult<crate::admin::Instance> {
    let admin = &state.admin;
    let new = NewInstance {
        owner: body.owner,
        area: body.area,
        account_quota: body.account_quota,
        months: body.months,
    };
    Ok(Json(admin.create_instance(&new).await?))
}

async fn claim_trial(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<TrialBody>,
) -> ApiResult<crate::admin::Instance> {
    let admin = &state.admin;
    Ok(Json(admin.claim_trial(&body.owner, &body.area).await?))
}

async fn show_instance(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<InstanceDetail> {
    let instance = state.admin.instance(&id).await?;
    Ok(Json(InstanceDetail {
        tunnel: state.gateway.tunnel_info(&instance.id).await,
        instance,
        login_server: state.login_server.clone(),
        login_fingerprint: state.login_fingerprint.clone(),
    }))
}

async fn delete_instance(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<serde_json::Value> {
    let admin = &state.admin;
    let instance = admin.instance(&id).await?;
    admin.delete_instance(&id).await?;
    state.gateway.remove_instance(&instance).await?;
    state.kernel.remove_instance(&instance)?;
    Ok(Json(json!({ "deleted": id })))
}

async fn show_network(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<crate::admin::Network> {
    let admin = &state.admin;
    Ok(Json(admin.network(&id).await?))
}

async fn set_network(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
    JsonBody(body): JsonBody<NetworkBody>,
) -> ApiResult<crate::admin::Network> {
    let admin = &state.admin;
    let change = NetworkChange {
        ccn: choice(body.ccn_id, body.ccn_name, "ccn")?,
        cen: choice(body.cen_id, body.cen_name, "cen")?,
        dns_active: optional_address("dns_active", body.dns_active)?,
        dns_standby: optional_address("dns_standby", body.dns_standby)?,
        cidr_blocks: body.cidr_blocks,
        allowed_destinations: body.allowed_destinations,
        client_to_client: body.client_to_client,
    };
    let network = admin.set_network(&id, &change).await?;
    let instance = admin.instance(&id).await?;
    // The kernel first: the tunnel binds to the instance there. Then the tunnel, which ends
    // sessions whose address left the blocks.
    state.kernel.apply_instance(&instance, &network)?;
    state.gateway.sync_instance(&instance, &network).await?;
    Ok(Json(network))
}

async fn list_accounts(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Vec<crate::admin::Account>> {
    let admin = &state.admin;
    Ok(Json(admin.list_accounts(&id).await?))
}

async fn create_account(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
    JsonBody(body): JsonBody<CreateAccountBody>,
) -> ApiResult<AccountCreatedReply> {
    let new = NewAccount {
        username: body.username,
        email: body.email,
        password: body.password,
        static_ip: body.static_ip,
        bandwidth_kbps: body.bandwidth_kbps,
    };
    let created = state.admin.create_account(&id, &new).await?;
    let account = &created.account;
    state.kernel.apply_account(&state.admin.instance(&id).await?, account, None, None)?;
    let email = state
        .send_credentials(
            &account.email,
            CredentialsReason::Created,
            &id,
            &account.username,
            &created.password,
        )
        .await;
    Ok(Json(AccountCreatedReply { created, email }))
}

/// An account with its roaming facts, as `GET /instances/{id}/accounts/{username}` returns it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccountDetail {
    #[serde(flatten)]
    pub account: crate::admin::Account,
    pub roaming: crate::roaming::RoamingInfo,
}

async fn show_account(
    State(state): State<AppState>,
    UrlPath((id, username)): UrlPath<(String, String)>,
) -> ApiResult<AccountDetail> {
    let admin = &state.admin;
    let account = admin.account(&id, &username).await?;
    let roaming = crate::roaming::info(admin, &id, &username).await?;
    Ok(Json(AccountDetail { account, roaming }))
}

/// Body of `POST /instances/{id}/accounts/{username}/roam`.
#[derive(Debug, Serialize, Deserialize)]
pub struct RoamBody {
    /// The destination instance.
    pub to: String,
}

async fn roam_account(
    State(state): State<AppState>,
    UrlPath((id, username)): UrlPath<(String, String)>,
    JsonBody(body): JsonBody<RoamBody>,
) -> ApiResult<crate::admin::Account> {
    let replica = crate::roaming::roam(&state.admin, &id, &username, &body.to).await?;
    Ok(Json(replica))
}

/// Brings the kernel and the tunnels in step with an account after a change: a disabled
/// account loses its session, and its addresses get its new settings.
async fn follow_account(
    state: &AppState,
    account: &crate::admin::Account,
    previous_static: Option<Ipv4Addr>,
) -> Result<(), ApiError> {
    let (id, username) = (&account.instance_id, &account.username);
    if !account.enabled {
        // Disabling cuts the client off: its session ends and its peer goes.
        state.gateway.end_session(id, username, "account disabled").await?;
    }
    let session = state.gateway.session_address(id, username).await;
    let instance = state.admin.instance(id).await?;
    state.kernel.apply_account(&instance, account, previous_static, session)?;
    Ok(())
}

async fn update_account(
    State(state): State<AppState>,
    UrlPath((id, username)): UrlPath<(String, String)>,
    JsonBody(body): JsonBody<UpdateAccountBody>,
) -> ApiResult<crate::admin::Account> {
    let admin = &state.admin;
    let previous = admin.account(&id, &username).await?.static_ip;
    let change = AccountChange {
        enabled: body.enabled,
        bandwidth_kbps: body.bandwidth_kbps,
        static_ip: optional_address("static_ip", body.static_ip)?,
    };
    let account = admin.change_account(&id, &username, &change).await?;
    follow_account(&state, &account, previous).await?;
    if change.enabled.is_some() {
        // The replicas followed the source's state in the store.
        for replica in crate::roaming::info(admin, &id, &username).await?.replicas {
            let replica = admin.account(&replica, &username).await?;
            follow_account(&state, &replica, None).await?;
        }
    }
    Ok(Json(account))
}

async fn delete_account(
    State(state): State<AppState>,
    UrlPath((id, username)): UrlPath<(String, String)>,
) -> ApiResult<serde_json::Value> {
    let admin = &state.admin;
    let account = admin.account(&id, &username).await?;
    let replicas = crate::roaming::info(admin, &id, &username).await?.replicas;
    admin.delete_account(&id, &username).await?;
    state.gateway.end_session(&id, &username, "account deleted").await?;
    state.kernel.remove_account(&account)?;
    for replica in &replicas {
        state.gateway.end_session(replica, &username, "source account deleted").await?;
    }
    Ok(Json(json!({ "deleted": username, "replicas_deleted": replicas })))
}

async fn reset_password(
    State(state): State<AppState>,
    UrlPath((id, username)): UrlPath<(String, String)>,
    JsonBody(body): JsonBody<PasswordBody>,
) -> ApiResult<PasswordReply> {
    let password = state.admin.reset_password(&id, &username, body.password.as_deref()).await?;
    let account = state.admin.account(&id, &username).await?;
    let email = state
        .send_credentials(&account.email, CredentialsReason::Reset, &id, &username, &password)
        .await;
    Ok(Json(PasswordReply { password, email }))
}

/// Query of `GET /instances/{id}/monitor`: an account (or the whole instance) and a range of
/// Unix seconds.
#[derive(Debug, Serialize, Deserialize)]
pub struct MonitorQuery {
    pub account: Option<String>,
    pub from: i64,
    pub to: i64,
}

async fn monitor(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
    axum::extract::Query(query): axum::extract::Query<MonitorQuery>,
) -> ApiResult<crate::history::MonitorReply> {
    let reply =
        crate::history::monitor(&state.admin, &id, query.account.as_deref(), query.from, query.to)
            .await?;
    Ok(Json(reply))
}

/// An account's traffic since the agent started, from the kernel counters, as
/// `GET /instances/{id}/traffic` returns it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AccountTraffic {
    pub username: String,
    /// The address of its session, or its static address.
    pub address: Option<Ipv4Addr>,
    pub counters: sag_common::counters::ClientCounters,
}

async fn traffic(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Vec<AccountTraffic>> {
    let accounts = state.admin.list_accounts(&id).await?;
    let usage = state.kernel.account_usage()?;
    let mut traffic = Vec::with_capacity(accounts.len());
    for account in accounts {
        let counters = usage
            .iter()
            .find(|usage| usage.instance_id == id && usage.username == account.username)
            .map(|usage| usage.counters)
            .unwrap_or_default();
        let session = state.gateway.session_address(&id, &account.username).await;
        traffic.push(AccountTraffic {
            username: account.username,
            address: session.or(account.static_ip),
            counters,
        });
    }
    Ok(Json(traffic))
}

/// Binds the admin socket at `path`: its directory is created with mode 0700 and the socket
/// gets mode 0600, so only root can connect. A stale socket file is replaced.
///
/// # Errors
/// Fails if the directory or socket cannot be made.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(directory) = path.parent() {
        std::fs::create_dir_all(directory)?;
        std::fs::set_permissions(directory, std::fs::Permissions::from_mode(0o700))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the API on `listener` until `shutdown` completes.
///
/// # Errors
/// Fails if the server fails.
pub async fn serve(
    listener: UnixListener,
    state: AppState,
    socket: PathBuf,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    info!(socket = %socket.display(), "admin API listening");
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
}

impl AppState {
    /// Runs the lifecycle engine after an order or a payment, so that a renewed instance runs
    /// and a paid owner's instances unlock at once. A failed run leaves the order in place, and
    /// the next scheduled run applies it.
    async fn run_lifecycle_now(&self) {
        if let Err(error) = self.lifecycle.tick(self.lifecycle.now()).await {
            warn!(error = %error, "lifecycle run after an order failed; the next run applies it");
        }
    }
}

async fn renew_instance(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
    JsonBody(body): JsonBody<crate::lifecycle::RenewRequest>,
) -> ApiResult<crate::lifecycle::OrderReply> {
    let order = state.lifecycle.renew(&id, &body).await?;
    state.run_lifecycle_now().await;
    Ok(Json(crate::lifecycle::OrderReply { instance: state.admin.instance(&id).await?, ..order }))
}

async fn upgrade_instance(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
    JsonBody(body): JsonBody<crate::lifecycle::UpgradeRequest>,
) -> ApiResult<crate::lifecycle::OrderReply> {
    Ok(Json(state.lifecycle.upgrade(&id, &body).await?))
}

async fn set_auto_renew(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
    JsonBody(body): JsonBody<crate::lifecycle::AutoRenewRequest>,
) -> ApiResult<crate::lifecycle::OrderReply> {
    let order = state.lifecycle.set_auto_renew(&id, body.enabled).await?;
    state.run_lifecycle_now().await;
    Ok(Json(crate::lifecycle::OrderReply { instance: state.admin.instance(&id).await?, ..order }))
}

async fn set_expiry(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
    JsonBody(body): JsonBody<crate::lifecycle::ExpiryRequest>,
) -> ApiResult<crate::lifecycle::OrderReply> {
    Ok(Json(state.lifecycle.set_expiry(&id, body.expires_at).await?))
}

async fn run_lifecycle(State(state): State<AppState>) -> ApiResult<crate::lifecycle::TickReport> {
    Ok(Json(state.lifecycle.tick(state.lifecycle.now()).await?))
}

/// Query of `GET /billing/report`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReportQuery {
    /// `YYYY-MM`.
    pub month: String,
    pub owner: Option<String>,
}

async fn billing_report(
    State(state): State<AppState>,
    axum::extract::Query(query): axum::extract::Query<ReportQuery>,
) -> ApiResult<crate::billing::MonthReport> {
    Ok(Json(state.billing.report(&query.month, query.owner.as_deref()).await?))
}

/// Query of `GET /billing/packages`, `GET /billing/statements` and `GET /billing/contacts`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct OwnerQuery {
    pub owner: Option<String>,
    /// `YYYY-MM`, for packages.
    pub month: Option<String>,
}

async fn list_packages(
    State(state): State<AppState>,
    axum::extract::Query(query): axum::extract::Query<OwnerQuery>,
) -> ApiResult<Vec<crate::billing::Package>> {
    let packages = state.billing.packages(query.owner.as_deref(), query.month.as_deref()).await?;
    Ok(Json(packages))
}

async fn buy_package(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<crate::billing::BuyPackageRequest>,
) -> ApiResult<crate::billing::Package> {
    Ok(Json(state.billing.buy_package(&body.owner, body.size_gb).await?))
}

async fn list_statements(
    State(state): State<AppState>,
    axum::extract::Query(query): axum::extract::Query<OwnerQuery>,
) -> ApiResult<Vec<crate::billing::Statement>> {
    let now = state.lifecycle.now();
    Ok(Json(state.billing.statements(query.owner.as_deref(), now).await?))
}

async fn record_payment(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<crate::billing::PaymentRequest>,
) -> ApiResult<crate::billing::PaymentReceipt> {
    let receipt = state.billing.pay(&body).await?;
    state.run_lifecycle_now().await;
    Ok(Json(receipt))
}

async fn show_contact(
    State(state): State<AppState>,
    axum::extract::Query(query): axum::extract::Query<OwnerQuery>,
) -> ApiResult<crate::billing::Contact> {
    let owner = query.owner.unwrap_or_default();
    Ok(Json(state.billing.contact(&owner).await?))
}

async fn set_contact(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<crate::billing::ContactRequest>,
) -> ApiResult<crate::billing::Contact> {
    Ok(Json(state.billing.set_contact(&body.owner, &body.email).await?))
}
