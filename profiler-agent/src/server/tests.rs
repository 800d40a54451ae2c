//! Server tests: handlers called directly, and a real listener on a loopback port for the
//! connection limit, the `Host` check and concurrent flame graph requests.

use std::{io::Write as _, process::Stdio};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::{
    page::{encode_query, escape},
    *,
};
use crate::{
    interval::latest::ServiceProfile,
    metrics::ServiceLabel,
    profile::{self, pprof},
};

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
        listen_address: "127.0.0.1:4100".parse().unwrap(),
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

/// A state with nothing attached, on a (pretend) listen address.
pub(super) fn state_on(listen: &str) -> ServerState {
    let mut registry = Registry::default();
    let metrics = Arc::new(AgentMetrics::register(&mut registry));
    ServerState {
        registry: Arc::new(registry),
        metrics,
        bpf_attached: Arc::new(AtomicBool::new(true)),
        discovery_ready: watch::channel(true).1,
        heartbeat: Arc::new(AtomicU64::new(0)),
        latest: Default::default(),
        collect_interval: Duration::from_secs(15),
        capture: None,
        listen_address: listen.parse().unwrap(),
    }
}

/// Serves `state` on a free loopback port until the sender is dropped or set.
async fn start(state: ServerState) -> (SocketAddr, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, mut stopped) = watch::channel(false);
    tokio::spawn(serve(listener, state, async move {
        let _ = stopped.wait_for(|s| *s).await;
    }));
    (address, stop)
}

/// One HTTP/1.1 GET on its own connection: (status, body).
pub(super) async fn get(address: SocketAddr, path: &str, host: Option<&str>) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let host = host.map(|h| format!("Host: {h}\r\n")).unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\n{host}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let status = std::str::from_utf8(&answer[9..12])
        .unwrap()
        .parse()
        .unwrap();
    let body = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    (status, answer[body..].to_vec())
}

const HOSTILE: &str = "svc\"quoted\\back\nnew;line";

async fn scrape(state: &ServerState, accept: Option<&str>) -> String {
    let mut headers = HeaderMap::new();
    if let Some(accept) = accept {
        headers.insert(header::ACCEPT, accept.parse().unwrap());
    }
    let response = metrics(State(state.clone()), headers).await;
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    String::from_utf8(body.to_vec()).unwrap()
}

/// The `service_name` values of a metric's samples, unescaped as Prometheus reads them.
fn service_names(exposition: &str, metric: &str) -> Vec<String> {
    let prefix = format!("{metric}{{service_name=\"");
    let mut out = Vec::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix(&prefix) else {
            continue;
        };
        let mut value = String::new();
        let mut chars = rest.chars();
        loop {
            match chars.next().expect("label value ends with a quote") {
                '"' => break,
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c @ ('\\' | '"')) => value.push(c),
                    other => panic!("invalid escape {other:?} in {line}"),
                },
                c => value.push(c),
            }
        }
        assert!(chars.as_str().starts_with("} "), "{line}");
        out.push(value);
    }
    out
}

/// `promtool check metrics`; skipped without promtool, except under CI=true.
fn promtool_check(exposition: &str) {
    let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "promtool not installed (CI=true forbids skipping)"
        );
        eprintln!("SKIPPED promtool check: promtool not installed");
        return;
    };
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(exposition.as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{exposition}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn hostile_service_names_are_escaped_in_both_formats() {
    let state = state_on("127.0.0.1:4100");
    let label = ServiceLabel {
        service_name: HOSTILE.to_owned(),
    };
    state.metrics.pprofs.get_or_create(&label).inc();
    state.metrics.pprof_samples.get_or_create(&label).inc_by(7);
    let text = scrape(&state, None).await;
    promtool_check(&text);
    assert_eq!(
        service_names(&text, "pyroscope_ebpf_pprofs_total"),
        [HOSTILE]
    );
    let openmetrics = scrape(&state, Some("application/openmetrics-text; version=1.0.0")).await;
    assert!(openmetrics.ends_with("# EOF\n"));
    assert_eq!(
        service_names(&openmetrics, "pyroscope_ebpf_pprof_samples_total"),
        [HOSTILE]
    );
}

/// A profile with one function, named `name`, in every sample.
fn one_function_profile(name: &str) -> pprof::Profile {
    pprof::Profile {
        string_table: vec![String::new(), name.to_owned()],
        function: vec![pprof::Function {
            id: 1,
            name: 1,
            ..Default::default()
        }],
        location: vec![pprof::Location {
            id: 1,
            line: vec![pprof::Line {
                function_id: 1,
                line: 0,
            }],
            ..Default::default()
        }],
        sample: vec![pprof::Sample {
            location_id: vec![1],
            value: vec![5],
            label: Vec::new(),
        }],
        ..Default::default()
    }
}

#[test]
fn a_hostile_frame_name_is_one_frame_in_the_svg() {
    let folded = profile::folded(&one_function_profile("a;b\nc"));
    assert_eq!(folded, [("a\\x3bb\\nc".to_owned(), 5)]);
    let svg = String::from_utf8(render_svg("x\ny\u{1}", &folded).unwrap()).unwrap();
    let titles: Vec<&str> = svg
        .split("<title>")
        .skip(1)
        .map(|t| &t[..t.find("</title>").unwrap()])
        .collect();
    // The root `all` and the one frame.
    assert_eq!(titles.len(), 2, "{titles:?}");
    assert!(titles.iter().any(|t| t.starts_with("all ")), "{titles:?}");
    assert!(
        titles
            .iter()
            .any(|t| t.starts_with("a\\x3bb\\nc (5 samples")),
        "{titles:?}"
    );
    // Nothing XML cannot hold, in the title either.
    assert!(!svg.contains('\u{1}') && svg.contains("x\\ny\\u{1}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loopback_server_without_token_answers_only_its_own_names() {
    let (address, _stop) = start(state_on("127.0.0.2:4100")).await;
    for host in [
        "localhost",
        "LocalHost:4100",
        "127.0.0.1",
        "127.0.0.1:80",
        "[::1]",
        "[::1]:4100",
        "127.0.0.2:4100",
    ] {
        assert_eq!(get(address, "/healthz", Some(host)).await.0, 200, "{host}");
    }
    for host in [
        "evil.example:4100",
        "evil.example",
        "localhost.evil.example",
        "127.0.0.3:4100",
        "[::2]:4100",
        "localhost:",
        "0.0.0.0:4100",
    ] {
        let (status, _) = get(address, "/metrics", Some(host)).await;
        assert_eq!(status, 421, "{host}");
    }
    // Not a browser: answered.
    assert_eq!(get(address, "/healthz", None).await.0, 200);

    // With a token, or listening beyond loopback, the check is off.
    assert!(HostCheck::for_server("127.0.0.1:4100".parse().unwrap(), true).is_none());
    assert!(HostCheck::for_server("0.0.0.0:4100".parse().unwrap(), false).is_none());
    assert!(HostCheck::for_server("[::1]:4100".parse().unwrap(), false).is_some());
    let (open, _stop) = start(state_on("0.0.0.0:4100")).await;
    assert_eq!(get(open, "/healthz", Some("10.1.2.3:4100")).await.0, 200);
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_for_one_to_close() {
    use axum::serve::Listener as _;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let mut limited = limit::LimitedListener::new(listener, 2);
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (stream, _) = limited.accept().await;
            accepted_tx.send(stream).unwrap();
        }
    });
    let _clients: Vec<TcpStream> = futures_util::future::join_all(
        (0..3).map(|_| async { TcpStream::connect(address).await.unwrap() }),
    )
    .await;
    let first = accepted.recv().await.unwrap();
    let _second = accepted.recv().await.unwrap();
    let third = tokio::time::timeout(Duration::from_millis(300), accepted.recv()).await;
    assert!(
        third.is_err(),
        "a third connection was taken past the limit"
    );
    drop(first);
    assert!(accepted.recv().await.is_some(), "taken once one closed");
}

/// Folded stacks heavy enough that rendering takes a while: `stacks` stacks of 30 frames.
fn heavy_folded(stacks: usize) -> Vec<(String, u64)> {
    (0..stacks)
        .map(|i| {
            let frames: Vec<String> = (0..30).map(|d| format!("fn_{}_{d}", i % (d + 7))).collect();
            (frames.join(";"), (i % 13 + 1) as u64)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_flame_graphs_render_once_and_never_stall_healthz() {
    let state = state_on("127.0.0.1:4100");
    let folded = heavy_folded(1500);
    let mut sorted = folded.clone();
    sorted.sort();
    state
        .latest
        .publish(vec![("svc".into(), ServiceProfile::new(1, folded, 1))]);
    let latest = state.latest.clone();
    let (address, _stop) = start(state).await;
    let before = page::RENDERED.load(Ordering::SeqCst);
    let graphs: Vec<_> = (0..200)
        .map(|_| tokio::spawn(get(address, "/flamegraph?service=svc", Some("localhost"))))
        .collect();
    // Asked while the 200 are in flight: answered (the bound only stops a hung test).
    let health = tokio::time::timeout(
        Duration::from_secs(60),
        get(address, "/healthz", Some("localhost")),
    )
    .await
    .expect("/healthz answered while 200 flame graphs were asked for");
    assert_eq!(health.0, 200);
    let mut bodies = Vec::new();
    for graph in graphs {
        let (status, body) = graph.await.unwrap();
        assert_eq!(status, 200);
        bodies.push(body);
    }
    assert!(
        bodies
            .iter()
            .all(|b| b == &bodies[0] && b.starts_with(b"<?xml"))
    );
    assert_eq!(
        page::RENDERED.load(Ordering::SeqCst) - before,
        1,
        "rendered once"
    );
    // A new interval's profile replaces the cache: rendered again, once.
    latest.publish(vec![("svc".into(), ServiceProfile::new(2, sorted, 2))]);
    let (status, _) = get(address, "/flamegraph?service=svc", Some("localhost")).await;
    assert_eq!(status, 200);
    let _ = get(address, "/flamegraph?service=svc", Some("localhost")).await;
    assert_eq!(page::RENDERED.load(Ordering::SeqCst) - before, 2);
    assert_eq!(get(address, "/flamegraph?service=none", None).await.0, 404);
}
