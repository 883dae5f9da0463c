//! Prometheus metrics and the health endpoint.
//!
//! The recording functions are no-ops until [`install`] sets the global recorder (the
//! daemon does, when `[daemon] metrics_listen` is set), so one-shot commands pay nothing.
//! Names follow `deptsync_<thing>_<unit>_total`.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::model::PageCounts;

const PASSES: &str = "deptsync_passes_total";
const DEPARTMENTS_WRITTEN: &str = "deptsync_departments_written_total";
const HTTP_REQUESTS: &str = "deptsync_http_requests_total";
const PASS_DURATION: &str = "deptsync_pass_duration_seconds";
const LAST_SUCCESS: &str = "deptsync_last_success_timestamp_seconds";
const LEASES_LOST: &str = "deptsync_leases_lost_total";

/// Pass durations, in seconds: from a quick incremental pass to a first sync of years.
const DURATION_BUCKETS: &[f64] = &[0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0];

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("setting up the metrics recorder: {0}")]
    Recorder(String),
}

/// Installs the process-wide recorder (once) and returns the handle that renders it.
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    static HANDLE: std::sync::Mutex<Option<PrometheusHandle>> = std::sync::Mutex::new(None);
    let mut installed = HANDLE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(handle) = installed.as_ref() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(PASS_DURATION.to_owned()), DURATION_BUCKETS)
        .map_err(|e| MetricsError::Recorder(e.to_string()))?
        .install_recorder()
        .map_err(|e| MetricsError::Recorder(e.to_string()))?;
    metrics::describe_counter!(PASSES, "Passes by source and outcome");
    metrics::describe_counter!(
        LEASES_LOST,
        "Passes stopped because another process took their source's lease over"
    );
    metrics::describe_counter!(
        DEPARTMENTS_WRITTEN,
        "Departments written by source and operation"
    );
    metrics::describe_counter!(
        HTTP_REQUESTS,
        "Requests to vendor APIs by source and HTTP status"
    );
    metrics::describe_histogram!(PASS_DURATION, metrics::Unit::Seconds, "Duration of passes");
    metrics::describe_gauge!(
        LAST_SUCCESS,
        metrics::Unit::Seconds,
        "Unix time of the last successful pass"
    );
    *installed = Some(handle.clone());
    Ok(handle)
}

/// A committed page's writes.
pub fn page_committed(source: &str, counts: &PageCounts) {
    for (operation, n) in [
        ("inserted", counts.inserted),
        ("updated", counts.updated),
        ("deleted", counts.deleted),
        ("rejected", counts.rejected),
    ] {
        if n > 0 {
            metrics::counter!(DEPARTMENTS_WRITTEN, "source" => source.to_owned(), "operation" => operation)
                .increment(n);
        }
    }
}

/// A pass ended with `outcome` (`succeeded`, `failed`, `cancelled`).
pub fn pass_finished(source: &str, outcome: &'static str, duration: Duration) {
    metrics::counter!(PASSES, "source" => source.to_owned(), "outcome" => outcome).increment(1);
    metrics::histogram!(PASS_DURATION, "source" => source.to_owned())
        .record(duration.as_secs_f64());
    if outcome == "succeeded" {
        let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
        metrics::gauge!(LAST_SUCCESS, "source" => source.to_owned()).set(now);
    }
}

/// A pass lost its source's lease to another process.
pub fn lease_lost(source: &str) {
    metrics::counter!(LEASES_LOST, "source" => source.to_owned()).increment(1);
}

/// A request to a vendor answered with `status` (or `error` when none came).
pub fn http_request(source: &str, status: &str) {
    metrics::counter!(HTTP_REQUESTS, "source" => source.to_owned(), "status" => status.to_owned())
        .increment(1);
}

/// Serves `/metrics` and `/healthz` (200 while `healthy` says so, else 503) on `listener`
/// until `cancel`.
pub async fn serve<H, F>(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    healthy: H,
    cancel: CancellationToken,
) -> std::io::Result<()>
where
    H: Fn() -> F + Clone + Send + Sync + 'static,
    F: Future<Output = bool> + Send,
{
    let router = Router::new()
        .route("/metrics", get(move || std::future::ready(handle.render())))
        .route(
            "/healthz",
            get(move || {
                let healthy = healthy.clone();
                async move {
                    if healthy().await {
                        (StatusCode::OK, "ok\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "database unreachable\n")
                    }
                }
            }),
        );
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
}

/// Binds the metrics listener (before the daemon reports ready, so a bad address fails
/// the start).
pub async fn bind(address: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address).await
}
