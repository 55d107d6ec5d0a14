//! The `/metrics` endpoint for Prometheus.

use std::sync::Arc;

use crate::{admin::Admin, gateway::Gateway, kernel::KernelSync};

/// Where the metrics come from.
pub struct MetricsSource {
    pub admin: Admin,
    pub kernel: Arc<KernelSync>,
    pub gateway: Arc<Gateway>,
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    source: Arc<MetricsSource>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    // NOTE: placeholder being written now; replaced by the collector.
    let _ = (listener, source);
    shutdown.await;
}
