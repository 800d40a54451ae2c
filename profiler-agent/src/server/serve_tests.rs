//! Tests of the read and write deadlines on real loopback connections, with 1-second deadlines
//! and the agent's own connection limit: a slowloris or a client that never reads no longer
//! starves `/healthz`, idle keep-alive connections close, slow answers (longer than both
//! deadlines) and graceful shutdown still work.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use axum::{Router, routing::get as route_get};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

use super::{Limits, serve_router};
use crate::server::{MAX_CONNECTIONS, router, tests::get, tests::state_on};

const DEADLINE: Duration = Duration::from_secs(1);

/// Serves `router` on a free loopback port with the agent's connection limit and 1 s read and
/// write deadlines; the handle ends when the server has shut down.
async fn start(router: Router) -> (SocketAddr, watch::Sender<bool>, JoinHandle<()>) {
    start_limited(router, MAX_CONNECTIONS).await
}

async fn start_limited(
    router: Router,
    max_connections: usize,
) -> (SocketAddr, watch::Sender<bool>, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, mut stopped) = watch::channel(false);
    let shutdown = async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    let limits = Limits {
        max_connections,
        header_read_timeout: DEADLINE,
        write_stall_timeout: DEADLINE,
    };
    let server = tokio::spawn(serve_router(listener, router, shutdown, limits));
    (address, stop, server)
}

fn agent_router() -> Router {
    router(state_on("127.0.0.1:4100"))
}

/// A client that starts a request and then sends one more header byte every 200 ms, until
/// the server closes the connection.
async fn trickle(address: SocketAddr) {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let mut sent = stream.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ").await;
    while sent.is_ok() {
        tokio::time::sleep(Duration::from_millis(200)).await;
        sent = stream.write_all(b"a").await;
    }
}

/// Reads until the peer closes (Ok(bytes read)) or `bound` passes (Err).
async fn read_until_closed(stream: &mut TcpStream, bound: Duration) -> Result<Vec<u8>, ()> {
    let mut answer = Vec::new();
    match tokio::time::timeout(bound, stream.read_to_end(&mut answer)).await {
        Ok(_) => Ok(answer),
        Err(_) => Err(()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_holding_every_place_gives_them_back_to_healthz() {
    let (address, _stop, _server) = start(agent_router()).await;
    // More clients than places: half send nothing, half trickle their headers.
    let attackers = MAX_CONNECTIONS + 12;
    let mut silent = Vec::new();
    let mut trickling = Vec::new();
    let first_connected = Instant::now();
    for i in 0..attackers {
        if i % 2 == 0 {
            silent.push(TcpStream::connect(address).await.unwrap());
        } else {
            trickling.push(tokio::spawn(trickle(address)));
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let asked = Instant::now();
    let mut health = tokio::spawn(get(address, "/healthz", None));
    // Every place is held: none frees before the first attacker's deadline.
    let quiet_until = first_connected + DEADLINE - Duration::from_millis(100);
    assert!(
        tokio::time::timeout_at(quiet_until.into(), &mut health)
            .await
            .is_err(),
        "/healthz answered while the slowloris held every place: the test proves nothing"
    );
    let bound = DEADLINE + Duration::from_secs(5);
    let (status, body) = tokio::time::timeout(bound, health)
        .await
        .expect("/healthz answered once the header deadline closed the slowloris")
        .unwrap();
    assert_eq!((status, body.as_slice()), (200, b"ok\n".as_slice()));
    eprintln!("/healthz answered {:?} after it was asked", asked.elapsed());
    // Every attacker was closed by the server, silent or trickling.
    for stream in &mut silent {
        let answer = read_until_closed(stream, bound).await;
        assert!(answer.is_ok(), "a silent connection stayed open");
    }
    for task in trickling {
        tokio::time::timeout(bound, task)
            .await
            .expect("a trickling connection stayed open")
            .unwrap();
    }
}

#[tokio::test]
async fn keep_alive_serves_several_requests_then_closes_when_idle() {
    let (address, _stop, _server) = start(agent_router()).await;
    let mut stream = TcpStream::connect(address).await.unwrap();
    let request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let mut answers = Vec::new();
    for n in 1..=2 {
        stream.write_all(request).await.unwrap();
        let mut chunk = [0; 1024];
        while answers.windows(7).filter(|w| w == b"\r\n\r\nok\n").count() < n {
            let read = stream.read(&mut chunk).await.unwrap();
            assert_ne!(read, 0, "closed before answer {n}");
            answers.extend_from_slice(&chunk[..read]);
        }
    }
    assert!(answers.starts_with(b"HTTP/1.1 200"));
    // Idle after its answers: closed by the deadline.
    let idle = Instant::now();
    let rest = read_until_closed(&mut stream, DEADLINE + Duration::from_secs(5)).await;
    assert_eq!(rest, Ok(Vec::new()), "the idle connection stayed open");
    assert!(idle.elapsed() >= DEADLINE / 2, "closed before it was idle");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_answers_outlive_the_deadline_and_finish_on_shutdown() {
    let slow = Router::new().route(
        "/slow",
        route_get(|| async {
            tokio::time::sleep(DEADLINE * 3).await;
            "done"
        }),
    );
    let (address, stop, server) = start(slow).await;
    let first = tokio::spawn(get(address, "/slow", None));
    let (status, body) = get(address, "/slow", None).await;
    assert_eq!((status, body.as_slice()), (200, b"done".as_slice()));
    assert_eq!(first.await.unwrap().0, 200);
    // Shut down with one slow request in flight and one idle connection open.
    let in_flight = tokio::spawn(get(address, "/slow", None));
    let mut idle = TcpStream::connect(address).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.send_replace(true);
    let closed = read_until_closed(&mut idle, DEADLINE / 2).await;
    assert_eq!(
        closed,
        Ok(Vec::new()),
        "the idle connection outlived shutdown"
    );
    let (status, body) = in_flight.await.unwrap();
    assert_eq!((status, body.as_slice()), (200, b"done".as_slice()));
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server ends once the request in flight is answered")
        .unwrap();
    assert!(
        TcpStream::connect(address).await.is_err(),
        "still listening"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_gives_its_place_back() {
    let big = Router::new()
        .route("/big", route_get(|| async { vec![b'x'; 64 << 20] }))
        .route("/small", route_get(|| async { "small" }));
    // One place, taken by a client that asks for 64 MiB and reads none of it.
    let (address, _stop, _server) = start_limited(big, 1).await;
    let mut greedy = TcpStream::connect(address).await.unwrap();
    let asked_big = Instant::now();
    greedy
        .write_all(b"GET /big HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut small = tokio::spawn(get(address, "/small", None));
    // The place frees a deadline after the greedy client's answer stalled, not before.
    let quiet_until = asked_big + DEADLINE - Duration::from_millis(100);
    assert!(
        tokio::time::timeout_at(quiet_until.into(), &mut small)
            .await
            .is_err(),
        "answered while the only place was held: the test proves nothing"
    );
    let (status, body) = tokio::time::timeout(DEADLINE + Duration::from_secs(5), small)
        .await
        .expect("answered once the write deadline dropped the client that does not read")
        .unwrap();
    assert_eq!((status, body.as_slice()), (200, b"small".as_slice()));
}
