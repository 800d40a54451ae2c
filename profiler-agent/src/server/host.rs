//! The `Host` check of a loopback server without a bearer token. A web page the user opens
//! can make the browser send requests to `127.0.0.1:4100` under a name of its own (DNS
//! rebinding) and read the answers as same-origin; the browser still sends that name in
//! `Host`. Such a server answers only `localhost`, `127.0.0.1`, `[::1]` (any port) and the
//! IP of its listen address; any other `Host` gets 421. A request without `Host` is not
//! from a browser and is answered.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use axum::{
    extract::{Request, State},
    http::{StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};

/// The names a loopback server answers to.
#[derive(Clone, Copy, Debug)]
pub struct HostCheck {
    listen: IpAddr,
}

impl HostCheck {
    /// The check a server needs: `Some` when it listens on loopback with no token.
    pub fn for_server(listen: SocketAddr, has_token: bool) -> Option<Self> {
        (listen.ip().is_loopback() && !has_token).then_some(Self {
            listen: listen.ip(),
        })
    }

    /// Whether a `Host` header value names this server.
    pub fn allows(&self, host: &str) -> bool {
        let name = strip_port(host);
        if name.eq_ignore_ascii_case("localhost") {
            return true;
        }
        let ip = match name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
            Some(v6) => v6.parse::<Ipv6Addr>().ok().map(IpAddr::V6),
            None => name.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
        };
        ip.is_some_and(|ip| {
            ip == IpAddr::V4(Ipv4Addr::LOCALHOST)
                || ip == IpAddr::V6(Ipv6Addr::LOCALHOST)
                || ip == self.listen
        })
    }
}

/// `name` of `name:port`, `[v6]` of `[v6]:port`; the value itself without a port.
fn strip_port(host: &str) -> &str {
    let Some((name, port)) = host.rsplit_once(':') else {
        return host;
    };
    let bracketed_or_plain = name.starts_with('[') == name.ends_with(']');
    if bracketed_or_plain && !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
        name
    } else {
        host
    }
}

/// Middleware: 421 for a `Host` that does not name this server.
pub async fn check(State(check): State<HostCheck>, request: Request, next: Next) -> Response {
    let host = request.headers().get(header::HOST);
    let allowed = match host.map(|h| h.to_str()) {
        None => true,
        Some(Ok(host)) => check.allows(host),
        Some(Err(_)) => false,
    };
    if allowed {
        next.run(request).await
    } else {
        tracing::debug!(host = ?host, "request refused: Host does not name this server");
        (
            StatusCode::MISDIRECTED_REQUEST,
            "this server answers only to localhost, 127.0.0.1, [::1] or its listen address\n",
        )
            .into_response()
    }
}
