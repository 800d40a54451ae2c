//! Serving the router on a listener: each connection the [`LimitedListener`] accepts is served
//! by hyper-util's connection builder, HTTP/1.1 only, with a deadline on reading each request's
//! headers ([`Limits::header_read_timeout`], [`HEADER_READ_TIMEOUT`] in the agent).
//!
//! hyper starts that deadline whenever the connection waits for a request: when it is accepted,
//! and again after each answer on a keep-alive connection. So a client that sends nothing,
//! trickles its headers a byte at a time (slowloris) or keeps an idle keep-alive connection
//! gives its place back within the deadline, and cannot hold the [`MAX_CONNECTIONS`] places
//! that `/healthz` and scrapes need. A request that is slow to answer (a 5-minute capture) is
//! not affected: the deadline stops once its headers are read.
//!
//! Writing an answer has a deadline too ([`stall`](super::stall)): a client that stops reading
//! is dropped after [`WRITE_STALL_TIMEOUT`] without progress.
//!
//! HTTP/2 is not offered: telling it from HTTP/1 means reading the first bytes of a connection
//! with no deadline, and scrapers and probes speak HTTP/1.1 to a plain-text server.
//!
//! [`MAX_CONNECTIONS`]: super::MAX_CONNECTIONS

use std::{future::Future, time::Duration};

use axum::{Router, serve::Listener as _};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use tokio::net::TcpListener;

use super::{limit::LimitedListener, stall::WriteDeadline};

/// How long a client has to send a request's headers, from the moment the connection is
/// accepted or its previous answer was sent: longer than any honest client on a slow link
/// needs, short enough that a slowloris frees its places within seconds.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an answer may wait for the client to read any of it: a client on a slow link
/// still takes a few bytes in that time, one that stopped reading does not.
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// What bounds the clients of one server.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; the others wait in the kernel's accept queue.
    pub max_connections: usize,
    /// The deadline to send a request's headers, also the longest a keep-alive connection
    /// stays idle.
    pub header_read_timeout: Duration,
    /// The longest a write may wait for the client to read.
    pub write_stall_timeout: Duration,
}

/// Serves `router` on `listener` within `limits` until `shutdown` completes; then stops
/// accepting, closes idle connections and waits for the requests in flight to be answered
/// (a connection still sending its headers is closed by their deadline at the latest).
pub async fn serve_router(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: Limits,
) {
    let mut listener = LimitedListener::new(listener, limits.max_connections);
    let builder = builder(limits);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(router.clone());
        let connection = builder
            .serve_connection(
                TokioIo::new(WriteDeadline::new(stream, limits.write_stall_timeout)),
                service,
            )
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // Timeouts, resets and malformed requests: the client's problem, not the agent's.
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::debug!("HTTP server stopped accepting; waiting for requests in flight");
    graceful.shutdown().await;
}

/// An HTTP/1.1-only connection builder whose header read deadline is `limits`'.
fn builder(limits: Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
}

#[cfg(test)]
#[path = "serve_tests.rs"]
mod tests;
