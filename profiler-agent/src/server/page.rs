//! The flame graph page: `/`, the services of the latest intervals with a filter, and
//! `/flamegraph?service=NAME`, one service's SVG rendered by inferno (with its own search).
//! SVGs are rendered on the blocking pool, [`MAX_RENDERS`] at a time, and at most once per
//! service per interval: the profile the pipeline publishes carries the cached graph.

use std::{fmt::Write as _, sync::Arc};

use axum::{
    extract::{Query, State},
    http::{StatusCode, header},
    response::{Html, IntoResponse, Response},
};
use bytes::Bytes;
use tokio::sync::Semaphore;

use super::{ServerState, unix_now};
use crate::{interval::latest::ServiceProfile, profile::folded_frame};

/// Flame graphs rendered at once (each on a blocking thread, with its own memory).
pub const MAX_RENDERS: usize = 2;
static RENDERS: Semaphore = Semaphore::const_new(MAX_RENDERS);
/// Graphs rendered, for the tests to see the cache work.
#[cfg(test)]
pub(super) static RENDERED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// HTML-escapes text placed in element content or a quoted attribute.
pub(super) fn escape(s: &str) -> String {
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
pub(super) fn encode_query(s: &str) -> String {
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

pub(super) async fn index(State(state): State<ServerState>) -> Html<String> {
    let services = state.latest.summaries();
    let mut items = String::new();
    for s in &services {
        let _ = write!(
            items,
            "<li data-name=\"{n}\"><a href=\"#\" data-src=\"/flamegraph?service={q}\">{n}</a> \
             <small>{samples} samples, {age}s ago</small></li>",
            n = escape(&s.name),
            q = encode_query(&s.name),
            samples = s.samples,
            age = unix_now().saturating_sub(s.collected_at),
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
pub(super) struct GraphQuery {
    service: String,
}

pub(super) async fn flamegraph(
    State(state): State<ServerState>,
    Query(q): Query<GraphQuery>,
) -> Response {
    let Some(profile) = state.latest.get(&q.service) else {
        return (StatusCode::NOT_FOUND, "no such service\n").into_response();
    };
    let svg = profile
        .svg
        .get_or_init(|| render_off_runtime(q.service.clone(), profile.clone()))
        .await;
    match svg {
        Ok(svg) => ([(header::CONTENT_TYPE, "image/svg+xml")], svg.clone()).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.clone()).into_response(),
    }
}

/// Renders a profile's graph on the blocking pool, so the runtime's workers keep serving.
async fn render_off_runtime(
    service: String,
    profile: Arc<ServiceProfile>,
) -> Result<Bytes, String> {
    let _permit = RENDERS.acquire().await.map_err(|e| e.to_string())?;
    #[cfg(test)]
    RENDERED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    tokio::task::spawn_blocking(move || render_svg(&service, &profile.folded))
        .await
        .map_err(|e| format!("rendering failed: {e}\n"))?
        .map(Bytes::from)
        .map_err(|e| format!("rendering failed: {e}\n"))
}

/// A flame graph of folded stacks, titled with the (escaped) service name.
pub fn render_svg(service: &str, folded: &[(String, u64)]) -> std::io::Result<Vec<u8>> {
    let lines: Vec<String> = folded
        .iter()
        .filter(|(stack, count)| !stack.is_empty() && *count > 0)
        .map(|(stack, count)| format!("{stack} {count}"))
        .collect();
    let mut options = inferno::flamegraph::Options::default();
    // inferno escapes the title for XML; what XML cannot hold at all is escaped here.
    options.title = folded_frame(service).into_owned();
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
