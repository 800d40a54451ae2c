//! Unit tests of Docker discovery: label building from bollard's structs, event filtering,
//! configuration, backoff, and the run loop against a fake daemon on a unix socket that
//! speaks just enough of the Docker API (`/version`, `/containers/json`, a chunked `/events`).
//! The real daemon is exercised by tests/tests/docker_discovery.rs.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use bollard::models::ContainerSummaryHostConfig;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::broadcast,
};

use super::*;

const ID_A: &str = "4f66ad9a0b2e5c8e3a9f3c2f1d0e9b8a7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f";
const ID_B: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";

fn summary(id: &str, name: &str, labels: &[(&str, &str)]) -> ContainerSummary {
    ContainerSummary {
        id: Some(id.to_owned()),
        names: Some(vec![format!("/{name}")]),
        labels: Some(
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        ),
        host_config: Some(ContainerSummaryHostConfig {
            network_mode: Some("bridge".to_owned()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn builds_labels_without_the_leading_slash() {
    let c = summary(
        ID_A,
        "web",
        &[
            ("app.kubernetes.io/name", "x"),
            ("com.example.team", "infra"),
        ],
    );
    assert_eq!(
        container_labels(&c).unwrap(),
        labels(&[
            ("__meta_docker_container_id", ID_A),
            ("__meta_docker_container_name", "web"),
            ("__meta_docker_container_network_mode", "bridge"),
            ("__meta_docker_container_label_app_kubernetes_io_name", "x"),
            ("__meta_docker_container_label_com_example_team", "infra"),
        ])
    );
}

#[test]
fn first_name_is_used_and_missing_parts_are_tolerated() {
    // Legacy links add names like "/other/alias"; Docker lists the container's own first.
    let c = ContainerSummary {
        id: Some(ID_B.to_owned()),
        names: Some(vec!["/db".to_owned(), "/web/db".to_owned()]),
        ..Default::default()
    };
    assert_eq!(
        container_labels(&c).unwrap(),
        labels(&[
            ("__meta_docker_container_id", ID_B),
            ("__meta_docker_container_name", "db"),
            ("__meta_docker_container_network_mode", ""),
        ])
    );
    // A name without a slash (not what Docker sends) is kept as is.
    let c = ContainerSummary {
        id: Some(ID_B.to_owned()),
        names: Some(vec!["plain".to_owned()]),
        ..Default::default()
    };
    assert_eq!(container_labels(&c).unwrap()[LABEL_CONTAINER_NAME], "plain");
}

#[test]
fn containers_without_id_or_name_are_skipped() {
    let mut no_id = summary(ID_A, "a", &[]);
    no_id.id = None;
    let mut empty_id = summary(ID_A, "a", &[]);
    empty_id.id = Some(String::new());
    let mut no_names = summary(ID_A, "a", &[]);
    no_names.names = None;
    let mut empty_names = summary(ID_A, "a", &[]);
    empty_names.names = Some(vec![]);
    for c in [&no_id, &empty_id, &no_names, &empty_names] {
        assert_eq!(container_labels(c), None, "{c:?}");
    }
    let (set, skipped) = targets(&[
        summary(ID_A, "a", &[]),
        no_id,
        summary(ID_B, "b", &[]),
        empty_names,
    ]);
    assert_eq!(skipped, 2);
    // Sorted by container id.
    let ids: Vec<&str> = set.iter().map(|l| l[LABEL_CONTAINER_ID].as_str()).collect();
    assert_eq!(ids, [ID_B, ID_A]);
}

#[test]
fn only_lifecycle_events_trigger_a_list() {
    let ev = |action: Option<&str>| EventMessage {
        action: action.map(str::to_owned),
        ..Default::default()
    };
    for a in RELEVANT_ACTIONS {
        assert!(is_relevant(&ev(Some(a))), "{a}");
    }
    for a in [
        "exec_start: sh -c true",
        "health_status: healthy",
        "attach",
        "create",
        "top",
    ] {
        assert!(!is_relevant(&ev(Some(a))), "{a}");
    }
    assert!(!is_relevant(&ev(None)));
}

#[test]
fn config_defaults_durations_and_unknown_fields() {
    let c: DockerConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(c, DockerConfig::default());
    assert_eq!(c.host, "unix:///var/run/docker.sock");
    assert_eq!(c.refresh_interval, Duration::from_secs(60));
    let c: DockerConfig =
        serde_json::from_str(r#"{"host": "tcp://127.0.0.1:2375", "refresh_interval": "1m30s"}"#)
            .unwrap();
    assert_eq!(c.host, "tcp://127.0.0.1:2375");
    assert_eq!(c.refresh_interval, Duration::from_secs(90));
    for bad in [
        r#"{"hots": "unix:///x"}"#,
        r#"{"refresh_interval": "soon"}"#,
        r#"{"refresh_interval": "0s"}"#,
    ] {
        assert!(serde_json::from_str::<DockerConfig>(bad).is_err(), "{bad}");
    }
}

#[test]
fn hosts_are_validated() {
    for ok in [
        "unix:///var/run/docker.sock",
        "tcp://127.0.0.1:2375",
        "http://localhost:2375",
    ] {
        let c = DockerConfig {
            host: ok.into(),
            ..Default::default()
        };
        assert!(c.validate().is_ok(), "{ok}");
    }
    for bad in [
        "/var/run/docker.sock",
        "unix://",
        "https://x:2376",
        "ssh://x",
        "",
    ] {
        let c = DockerConfig {
            host: bad.into(),
            ..Default::default()
        };
        assert!(
            matches!(c.validate(), Err(DockerDiscoveryError::InvalidHost(_))),
            "{bad}"
        );
    }
}

#[test]
fn error_causes_ignore_details() {
    let a = DockerDiscoveryError::Connect {
        host: "unix:///a".into(),
        source: bollard::errors::Error::SocketNotFoundError("/a".into()),
    };
    let b = DockerDiscoveryError::Connect {
        host: "unix:///b".into(),
        source: bollard::errors::Error::SocketNotFoundError("/b".into()),
    };
    assert_eq!(a.cause(), b.cause());
    assert_eq!(a.cause(), "connect/SocketNotFoundError");
    assert_ne!(a.cause(), DockerDiscoveryError::EventsEnded.cause());
}

// ---------------------------------------------------------------------------------------------
// A fake daemon.

#[derive(Default)]
struct FakeState {
    /// Body of `/containers/json`.
    list: String,
    lists: usize,
    versions: usize,
    events_opened: usize,
}

struct FakeDaemon {
    _dir: tempfile::TempDir,
    path: PathBuf,
    state: Arc<Mutex<FakeState>>,
    /// `Some(json)` sends an event line to every open events stream; `None` ends them.
    events: broadcast::Sender<Option<String>>,
    server: tokio::task::JoinHandle<()>,
}

impl FakeDaemon {
    fn start(list: String) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docker.sock");
        let state = Arc::new(Mutex::new(FakeState {
            list,
            ..Default::default()
        }));
        let (events, _) = broadcast::channel(16);
        let server = Self::serve(&path, Arc::clone(&state), events.clone());
        Self {
            _dir: dir,
            path,
            state,
            events,
            server,
        }
    }

    fn serve(
        path: &std::path::Path,
        state: Arc<Mutex<FakeState>>,
        events: broadcast::Sender<Option<String>>,
    ) -> tokio::task::JoinHandle<()> {
        let listener = UnixListener::bind(path).unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(handle(stream, Arc::clone(&state), events.subscribe()));
            }
        })
    }

    fn host(&self) -> String {
        format!("unix://{}", self.path.display())
    }

    fn set_list(&self, list: String) {
        self.state.lock().unwrap().list = list;
    }

    fn counts(&self) -> (usize, usize, usize) {
        let s = self.state.lock().unwrap();
        (s.versions, s.lists, s.events_opened)
    }

    fn event(&self, action: &str, id: &str) {
        let line = serde_json::json!({
            "Type": "container", "Action": action, "Actor": {"ID": id, "Attributes": {}},
            "scope": "local", "time": 1, "timeNano": 1
        });
        let _ = self.events.send(Some(line.to_string()));
    }

    fn end_event_streams(&self) {
        let _ = self.events.send(None);
    }

    /// Stops listening and removes the socket, like a stopped daemon.
    fn stop(&self) {
        self.server.abort();
        self.end_event_streams();
        let _ = std::fs::remove_file(&self.path);
    }

    fn restart(&mut self) {
        self.server = Self::serve(&self.path, Arc::clone(&self.state), self.events.clone());
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn handle(
    stream: UnixStream,
    state: Arc<Mutex<FakeState>>,
    mut events: broadcast::Receiver<Option<String>>,
) {
    let mut stream = BufReader::new(stream);
    let mut request_line = String::new();
    if stream.read_line(&mut request_line).await.unwrap_or(0) == 0 {
        return;
    }
    loop {
        let mut header = String::new();
        if stream.read_line(&mut header).await.unwrap_or(0) == 0 || header == "\r\n" {
            break;
        }
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default().to_owned();
    let body = if path.ends_with("/version") {
        state.lock().unwrap().versions += 1;
        r#"{"ApiVersion":"1.45","Version":"fake","MinAPIVersion":"1.24"}"#.to_owned()
    } else if path.ends_with("/containers/json") {
        let mut s = state.lock().unwrap();
        s.lists += 1;
        s.list.clone()
    } else if path.ends_with("/events") {
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                    Transfer-Encoding: chunked\r\n\r\n";
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let _ = stream.flush().await;
        state.lock().unwrap().events_opened += 1;
        loop {
            match events.recv().await {
                Ok(Some(line)) => {
                    let chunk = format!("{:x}\r\n{line}\n\r\n", line.len() + 1);
                    if stream.write_all(chunk.as_bytes()).await.is_err() {
                        return;
                    }
                    let _ = stream.flush().await;
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Ok(None) | Err(broadcast::error::RecvError::Closed) => break,
            }
        }
        let _ = stream.write_all(b"0\r\n\r\n").await;
        let _ = stream.shutdown().await;
        return;
    } else {
        let _ = stream
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await;
        return;
    };
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// (id, name, labels) of a listed container.
type Listed<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);

fn list_json(containers: &[Listed]) -> String {
    let items: Vec<serde_json::Value> = containers
        .iter()
        .map(|(id, name, labels)| {
            let labels: HashMap<&str, &str> = labels.iter().copied().collect();
            serde_json::json!({
                "Id": id, "Names": [format!("/{name}")], "Image": "x", "Labels": labels,
                "State": "running", "Status": "Up", "HostConfig": {"NetworkMode": "none"},
                "NetworkSettings": {"Networks": {}}
            })
        })
        .collect();
    serde_json::Value::Array(items).to_string()
}

fn names(set: &[Labels]) -> Vec<String> {
    set.iter()
        .map(|l| l[LABEL_CONTAINER_NAME].clone())
        .collect()
}

const WAIT: Duration = Duration::from_secs(10);

async fn wait_set(rx: &mut watch::Receiver<Vec<Labels>>, want: &[&str]) {
    let ok = tokio::time::timeout(WAIT, rx.wait_for(|set| names(set) == want))
        .await
        .is_ok();
    assert!(
        ok,
        "never published {want:?}; last: {:?}",
        names(&rx.borrow())
    );
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn discovery(host: String, refresh: Duration) -> DockerDiscovery {
    DockerDiscovery::new(DockerConfig {
        host,
        refresh_interval: refresh,
    })
    .with_backoff(Duration::from_millis(20), Duration::from_millis(100))
}

#[tokio::test]
async fn absent_socket_is_retried_and_counted_and_run_stops_with_its_receivers() {
    let d = discovery(
        "unix:///nonexistent/docker.sock".into(),
        Duration::from_secs(60),
    );
    let errors = d.errors();
    let (tx, rx) = watch::channel(Vec::new());
    let run = tokio::spawn(d.run(tx));
    wait_until("3 errors", || errors.load(Ordering::Relaxed) >= 3).await;
    assert!(rx.borrow().is_empty());
    drop(rx);
    tokio::time::timeout(WAIT, run)
        .await
        .expect("run returns")
        .unwrap();
}

#[tokio::test]
async fn events_drive_lists_and_malformed_answers_keep_the_last_good_set() {
    let fake = FakeDaemon::start(list_json(&[(
        ID_A,
        "a",
        &[("app.kubernetes.io/name", "x")],
    )]));
    let d = discovery(fake.host(), Duration::from_secs(3600));
    let errors = d.errors();
    let (tx, mut rx) = watch::channel(Vec::new());
    let _run = tokio::spawn(d.run(tx));
    wait_set(&mut rx, &["a"]).await;
    assert_eq!(
        rx.borrow()[0]["__meta_docker_container_label_app_kubernetes_io_name"],
        "x"
    );
    wait_until("events stream", || fake.counts().2 == 1).await;

    // An irrelevant event does not list; a start does.
    let lists = fake.counts().1;
    fake.set_list(list_json(&[(ID_A, "a", &[]), (ID_B, "b", &[])]));
    fake.event("exec_start: sh", ID_B);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fake.counts().1, lists);
    fake.event("start", ID_B);
    wait_set(&mut rx, &["b", "a"]).await;
    assert_eq!(errors.load(Ordering::Relaxed), 0);

    // Garbage: the session fails, is counted and retried; the last good set stays.
    fake.set_list("{not json".to_owned());
    fake.event("die", ID_B);
    wait_until("errors", || errors.load(Ordering::Relaxed) >= 2).await;
    assert_eq!(names(&rx.borrow()), ["b", "a"]);
    // A container without a name is skipped (and counted); the rest is published.
    fake.set_list(
        r#"[{"Id":"ccc","Names":[],"HostConfig":{"NetworkMode":"host"}},
            {"Id":"ddd","Names":["/d"],"HostConfig":{"NetworkMode":"host"}}]"#
            .to_owned(),
    );
    wait_set(&mut rx, &["d"]).await;
    assert_eq!(rx.borrow()[0][LABEL_CONTAINER_NETWORK_MODE], "host");
}

#[tokio::test]
async fn a_restarted_daemon_is_reconnected_and_listed_again() {
    let mut fake = FakeDaemon::start(list_json(&[(ID_A, "a", &[]), (ID_B, "b", &[])]));
    let d = discovery(fake.host(), Duration::from_secs(3600));
    let errors = d.errors();
    let (tx, mut rx) = watch::channel(Vec::new());
    let _run = tokio::spawn(d.run(tx));
    wait_set(&mut rx, &["b", "a"]).await;
    wait_until("events stream", || fake.counts().2 == 1).await;

    fake.stop();
    wait_until("errors while down", || errors.load(Ordering::Relaxed) >= 3).await;
    assert_eq!(
        names(&rx.borrow()),
        ["b", "a"],
        "last good set kept while down"
    );
    fake.set_list(list_json(&[(ID_A, "a", &[])]));
    fake.restart();
    wait_set(&mut rx, &["a"]).await;
    wait_until("new events stream", || fake.counts().2 == 2).await;

    // An events stream that just ends (daemon going away) also means reconnect and relist.
    let (versions, lists, _) = fake.counts();
    fake.set_list(list_json(&[(ID_A, "a", &[]), (ID_B, "b2", &[])]));
    fake.end_event_streams();
    wait_set(&mut rx, &["b2", "a"]).await;
    let (v, l, _) = fake.counts();
    assert!(v > versions && l > lists);
}

#[tokio::test]
async fn the_refresh_interval_lists_without_events() {
    let fake = FakeDaemon::start(list_json(&[(ID_A, "a", &[])]));
    let d = discovery(fake.host(), Duration::from_millis(200));
    let (tx, mut rx) = watch::channel(Vec::new());
    let _run = tokio::spawn(d.run(tx));
    wait_set(&mut rx, &["a"]).await;
    fake.set_list(list_json(&[]));
    wait_set(&mut rx, &[]).await;
}
