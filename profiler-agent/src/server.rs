//! The agent's HTTP server: `/metrics` (Prometheus, every registered metric), `/ready` (BPF
//! attached and the first discovery round done), `/healthz` (the pipeline thread is turning),
//! and `/`, a page listing the services profiled with each one's latest flame graph
//! (`/flamegraph?service=...`, an SVG rendered by inferno with its own search). With the
//! capture API enabled, also `/v1/profile` ([`crate::capture::http`]).

use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    extract::{Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

pub use crate::capture::CaptureApi;
use crate::{daemon::pipeline::LatestProfiles, metrics::AgentMetrics};

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
}

pub fn router(state: ServerState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/ready", get(ready))
        .route("/healthz", get(healthz))
        .route("/", get(index))
        .route("/flamegraph", get(flamegraph))
        .route("/v1/profile", get(crate::capture::http::profile))
        .with_state(state)
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

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// HTML-escapes text placed in element content or a quoted attribute.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a query parameter value.
fn encode_query(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

async fn index(State(state): State<ServerState>) -> Html<String> {
    let services: Vec<(String, u64, u64)> = state
        .latest
        .lock()
        .map(|l| {
            l.iter()
                .map(|(name, p)| (name.clone(), p.samples, p.collected_at))
                .collect()
        })
        .unwrap_or_default();
    let mut items = String::new();
    for (name, samples, at) in &services {
        let _ = write!(
            items,
            "<li data-name=\"{n}\"><a href=\"#\" data-src=\"/flamegraph?service={q}\">{n}</a> \
             <small>{samples} samples, {age}s ago</small></li>",
            n = escape(name),
            q = encode_query(name),
            age = unix_now().saturating_sub(*at),
        );
    }
    let refresh_ms = state.collect_interval.as_millis().max(1000);
    Html(format!(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>profiler</title>
<style>
body {{ font-family: sans-serif; margin: 0; display: flex; height: 100vh; }}
nav {{ width: 18em; overflow: auto; padding: 0.5em; border-right: 1px solid #ccc; }}
nav li.selected a {{ font-weight: bold; }}
main {{ flex: 1; }}
iframe {{ border: 0; width: 100%; height: 100%; }}
</style></head>
<body>
<nav><h3>Services ({count})</h3>
<input id="filter" type="search" placeholder="filter services">
<ul id="services">{items}</ul>
<p><small>Flame graphs of the latest {interval:?} interval; refreshed every interval.
Inside a graph, Ctrl+F or "Search" finds functions.</small></p></nav>
<main><iframe id="graph" title="flame graph"></iframe></main>
<script>
const graph = document.getElementById('graph');
const links = Array.from(document.querySelectorAll('#services a'));
let selected = localStorage.getItem('service');
function show(link) {{
  links.forEach(l => l.parentElement.classList.toggle('selected', l === link));
  selected = link.parentElement.dataset.name;
  localStorage.setItem('service', selected);
  graph.src = link.dataset.src + '&t=' + Date.now();
}}
links.forEach(l => l.addEventListener('click', e => {{ e.preventDefault(); show(l); }}));
const initial = links.find(l => l.parentElement.dataset.name === selected) || links[0];
if (initial) show(initial);
const filter = document.getElementById('filter');
function applyFilter() {{
  sessionStorage.setItem('filter', filter.value);
  const q = filter.value.toLowerCase();
  links.forEach(l => l.parentElement.hidden = !l.parentElement.dataset.name.toLowerCase().includes(q));
}}
// The page reloads every interval: what was typed survives it.
filter.value = sessionStorage.getItem('filter') || '';
applyFilter();
filter.addEventListener('input', applyFilter);
setTimeout(() => location.reload(), {refresh_ms});
</script>
</body></html>
"#,
        count = services.len(),
        interval = state.collect_interval,
    ))
}

#[derive(serde::Deserialize)]
struct GraphQuery {
    service: String,
}

async fn flamegraph(State(state): State<ServerState>, Query(q): Query<GraphQuery>) -> Response {
    let folded = state
        .latest
        .lock()
        .ok()
        .and_then(|l| l.get(&q.service).map(|p| p.folded.clone()));
    let Some(folded) = folded else {
        return (StatusCode::NOT_FOUND, "no such service\n").into_response();
    };
    match render_svg(&q.service, &folded) {
        Ok(svg) => ([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// A flame graph of folded stacks, titled with the (escaped) service name.
pub fn render_svg(service: &str, folded: &[(String, u64)]) -> std::io::Result<Vec<u8>> {
    let lines: Vec<String> = folded
        .iter()
        .filter(|(stack, count)| !stack.is_empty() && *count > 0)
        .map(|(stack, count)| format!("{stack} {count}"))
        .collect();
    let mut options = inferno::flamegraph::Options::default();
    // inferno escapes the title itself.
    options.title = service.to_owned();
    options.count_name = "samples".to_owned();
    let mut svg = Vec::new();
    if lines.is_empty() {
        // inferno refuses empty input; an empty interval still deserves a page.
        svg.extend_from_slice(
            br#"<svg xmlns="http://www.w3.org/2000/svg" width="400" height="40"><text x="10" y="25">no samples</text></svg>"#,
        );
        return Ok(svg);
    }
    inferno::flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), &mut svg)
        .map_err(std::io::Error::other)?;
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_holds_the_functions_and_escapes_the_title() {
        let folded = vec![
            ("main;work;spin".to_owned(), 10),
            ("main;idle".to_owned(), 2),
        ];
        let svg = String::from_utf8(render_svg("<svc>", &folded).unwrap()).unwrap();
        assert!(svg.contains("spin"), "function in the graph");
        assert!(svg.contains("&lt;svc&gt;") && !svg.contains("<svc>"));
    }

    #[test]
    fn openmetrics_counters_become_text_format_counters() {
        let om = "# HELP a_seconds Time.\n# TYPE a_seconds counter\n# UNIT a_seconds seconds\n\
                  a_seconds_total 1\n# HELP g A gauge.\n# TYPE g gauge\ng 2\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(om),
            "# HELP a_seconds_total Time.\n# TYPE a_seconds_total counter\na_seconds_total 1\n\
             # HELP g A gauge.\n# TYPE g gauge\ng 2\n"
        );
    }

    #[tokio::test]
    async fn ready_only_once_bpf_is_attached_and_discovery_answered() {
        let mut registry = Registry::default();
        let metrics = Arc::new(AgentMetrics::register(&mut registry));
        let (discovery_tx, discovery_ready) = watch::channel(false);
        let state = ServerState {
            registry: Arc::new(registry),
            metrics,
            bpf_attached: Arc::new(AtomicBool::new(false)),
            discovery_ready,
            heartbeat: Arc::new(AtomicU64::new(0)),
            latest: Default::default(),
            collect_interval: Duration::from_secs(15),
            capture: None,
        };
        let status = |state: &ServerState| {
            let state = state.clone();
            async move { ready(State(state)).await.0 }
        };
        discovery_tx.send_replace(true);
        assert_eq!(status(&state).await, StatusCode::SERVICE_UNAVAILABLE);
        state.bpf_attached.store(true, Ordering::SeqCst);
        discovery_tx.send_replace(false);
        assert_eq!(status(&state).await, StatusCode::SERVICE_UNAVAILABLE);
        discovery_tx.send_replace(true);
        assert_eq!(status(&state).await, StatusCode::OK);
        // A stalled pipeline fails /healthz.
        assert_eq!(healthz(State(state.clone())).await.0, StatusCode::OK);
        state.heartbeat.store(unix_now() - 120, Ordering::Relaxed);
        assert_eq!(
            healthz(State(state.clone())).await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn escaping_and_query_encoding() {
        assert_eq!(
            escape(r#"<a href="x">'&"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;"
        );
        assert_eq!(encode_query("ebpf/ns/c d"), "ebpf%2Fns%2Fc%20d");
    }
}
