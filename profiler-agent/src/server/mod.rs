//! The agent's HTTP server: `/metrics` (Prometheus, every registered metric), `/ready` (BPF
//! attached and the first discovery round done), `/healthz` (the pipeline thread is turning),
//! and `/`, a page listing the services profiled with each one's latest flame graph
//! ([`page`]). With the capture API enabled, also `/v1/profile` (`capture.rs`).
//! At most [`MAX_CONNECTIONS`] connections are served at once ([`limit`]), each closed when its
//! client takes over [`HEADER_READ_TIMEOUT`] to send a request or [`WRITE_STALL_TIMEOUT`] to
//! read any of an answer ([`serve`](mod@serve), [`stall`]); a loopback
//! server without a bearer token checks `Host` against DNS rebinding ([`host`]).

pub mod host;
pub mod limit;
pub mod page;
pub mod serve;
pub mod stall;

use std::{
    fmt::Write as _,
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, sync::watch};

mod capture;
use crate::{interval::latest::LatestProfiles, metrics::AgentMetrics};
pub use capture::CaptureApi;
use host::HostCheck;
pub use limit::MAX_CONNECTIONS;
pub use page::render_svg;
pub use serve::{HEADER_READ_TIMEOUT, Limits, WRITE_STALL_TIMEOUT};

/// What the handlers read.
#[derive(Clone)]
pub struct ServerState {
    pub registry: Arc<Registry>,
    pub metrics: Arc<AgentMetrics>,
    pub bpf_attached: Arc<AtomicBool>,
    pub discovery_ready: watch::Receiver<bool>,
    /// Unix seconds of the pipeline's last loop turn; 0 before it starts.
    pub heartbeat: Arc<AtomicU64>,
    pub latest: LatestProfiles,
    pub collect_interval: Duration,
    /// Set when `[capture] enabled`.
    pub capture: Option<CaptureApi>,
    /// `server.listen_address`: decides the `Host` check, and names the server in it.
    pub listen_address: SocketAddr,
}

pub fn router(state: ServerState) -> Router {
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/ready", get(ready))
        .route("/healthz", get(healthz))
        .route("/", get(page::index))
        .route("/flamegraph", get(page::flamegraph))
        .route("/v1/profile", get(capture::profile));
    let has_token = state
        .capture
        .as_ref()
        .is_some_and(|api| api.token.is_some());
    let check = HostCheck::for_server(state.listen_address, has_token);
    let router = router.with_state(state);
    match check {
        Some(check) => router.layer(axum::middleware::from_fn_with_state(check, host::check)),
        None => router,
    }
}

/// Serves the router on `listener`, [`MAX_CONNECTIONS`] connections at a time, each given
/// [`HEADER_READ_TIMEOUT`] to send a request's headers and [`WRITE_STALL_TIMEOUT`] to read
/// some of an answer ([`serve`](mod@serve)), until `shutdown` completes; then waits for the
/// open requests to finish.
pub async fn serve(
    listener: TcpListener,
    state: ServerState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = Limits {
        max_connections: MAX_CONNECTIONS,
        header_read_timeout: HEADER_READ_TIMEOUT,
        write_stall_timeout: WRITE_STALL_TIMEOUT,
    };
    serve::serve_router(listener, router(state), shutdown, limits).await;
    Ok(())
}

/// OpenMetrics when the scraper asks for it (Prometheus does), else the classic text format
/// that every other reader (promtool, curl, older agents) understands.
async fn metrics(State(state): State<ServerState>, headers: HeaderMap) -> Response {
    state.metrics.update_process();
    let mut body = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    if openmetrics {
        let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
        ([(header::CONTENT_TYPE, content_type)], body).into_response()
    } else {
        let content_type = "text/plain; version=0.0.4; charset=utf-8";
        (
            [(header::CONTENT_TYPE, content_type)],
            openmetrics_to_text(&body),
        )
            .into_response()
    }
}

/// Rewrites OpenMetrics into the Prometheus text format 0.0.4: a counter family is named
/// with its `_total` suffix, and `# UNIT` and `# EOF` lines go.
fn openmetrics_to_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line.starts_with("# HELP ") {
            if let Some(h) = help.replace(line) {
                out.push_str(h);
                out.push('\n');
            }
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some(name) = rest.strip_suffix(" counter")
        {
            if let Some(h) = help.take() {
                let text = h.strip_prefix("# HELP ").and_then(|r| r.strip_prefix(name));
                let _ = writeln!(out, "# HELP {name}_total{}", text.unwrap_or(""));
            }
            let _ = writeln!(out, "# TYPE {name}_total counter");
            continue;
        }
        if let Some(h) = help.take() {
            out.push_str(h);
            out.push('\n');
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

async fn ready(State(state): State<ServerState>) -> (StatusCode, &'static str) {
    if !state.bpf_attached.load(Ordering::SeqCst) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: BPF program not attached\n",
        )
    } else if !*state.discovery_ready.borrow() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: first discovery round not done\n",
        )
    } else {
        (StatusCode::OK, "ready\n")
    }
}

async fn healthz(State(state): State<ServerState>) -> (StatusCode, &'static str) {
    let beat = state.heartbeat.load(Ordering::Relaxed);
    let now = unix_now();
    // Before the pipeline starts there is nothing to be stuck; after, it turns every 100 ms.
    if beat == 0 || now.saturating_sub(beat) < 30 {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "pipeline thread stalled\n")
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests;
