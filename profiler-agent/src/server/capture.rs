//! `GET /v1/profile`: the HTTP face of the on-demand [`Capturer`]. Checks the bearer token (in constant
//! time), the parameters, the process and the concurrency limit before any sampling starts,
//! then answers with the profile in the requested format once the capture ends.
//! Errors are plain text: 400 bad parameter, 401 token, 404 no process, 429 limit reached,
//! 500 sampling failed, 503 stopping.

use std::{collections::HashMap, sync::Arc};

use axum::{
    extract::{Query, State, rejection::QueryRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use subtle::ConstantTimeEq as _;

use super::{ServerState, render_svg};
use crate::{
    capture::{CaptureError, CaptureRequest, Capturer, Format},
    profile::{self, BuiltProfile},
    write::config::Secret,
};

/// The capture API's part of the server state.
#[derive(Clone)]
pub struct CaptureApi {
    pub capturer: Arc<Capturer>,
    /// Required as `Authorization: Bearer <token>` when set.
    pub token: Option<Secret>,
}

pub async fn profile(
    State(state): State<ServerState>,
    headers: HeaderMap,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Response {
    let Some(api) = state.capture else {
        return text(StatusCode::NOT_FOUND, "the capture API is not enabled\n");
    };
    if !authorized(api.token.as_ref(), &headers) {
        let mut response = text(
            StatusCode::UNAUTHORIZED,
            "a valid bearer token is required\n",
        );
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"profiler-agent\""),
        );
        return response;
    }
    let Ok(Query(query)) = query else {
        return text(StatusCode::BAD_REQUEST, "malformed query string\n");
    };
    let request = match CaptureRequest::parse(&query) {
        Ok(r) => r,
        Err(e) => return error_response(&CaptureError::BadRequest(e)),
    };
    let capturer = api.capturer.clone();
    // The answer is encoded (gzip, folded stacks, an SVG) on the blocking pool too, never on
    // a runtime worker that /healthz and the other requests share.
    let outcome = tokio::task::spawn_blocking(move || {
        let pid = capturer.find(&request.selector)?;
        let built = capturer.capture(pid, request.duration, request.sample_rate, "manual")?;
        Ok::<_, CaptureError>(answer(pid, &request, &built))
    })
    .await;
    match outcome {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => error_response(&e),
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "the capture panicked\n"),
    }
}

fn authorized(token: Option<&Secret>, headers: &HeaderMap) -> bool {
    let Some(token) = token else { return true };
    let Some(sent) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    else {
        return false;
    };
    // Length differences return early (subtle only hides the contents), which reveals the
    // token's length at most.
    bool::from(sent.ct_eq(token.expose().as_bytes()))
}

fn answer(pid: u32, request: &CaptureRequest, built: &BuiltProfile) -> Response {
    let title = format!("pid {pid}");
    match request.format {
        Format::Pprof => match built.encode_gzip() {
            Ok(bytes) => (
                [
                    (
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/octet-stream"),
                    ),
                    (
                        header::CONTENT_DISPOSITION,
                        HeaderValue::from_str(&format!(
                            "attachment; filename=\"profile-{pid}.pb.gz\""
                        ))
                        .expect("digits are a valid header value"),
                    ),
                ],
                bytes,
            )
                .into_response(),
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("encoding: {e}\n"),
            ),
        },
        Format::Folded => {
            let mut body = String::new();
            for (stack, count) in profile::folded(&built.profile) {
                body.push_str(&stack);
                body.push(' ');
                body.push_str(&count.to_string());
                body.push('\n');
            }
            text(StatusCode::OK, &body)
        }
        Format::Svg => match render_svg(&title, &profile::folded(&built.profile)) {
            Ok(svg) => ([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response(),
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("rendering: {e}\n"),
            ),
        },
    }
}

fn error_response(error: &CaptureError) -> Response {
    let status = match error {
        CaptureError::BadRequest(_) => StatusCode::BAD_REQUEST,
        CaptureError::NoProcess => StatusCode::NOT_FOUND,
        CaptureError::Busy { .. } => StatusCode::TOO_MANY_REQUESTS,
        CaptureError::Bpf(_) => StatusCode::INTERNAL_SERVER_ERROR,
        CaptureError::Stopping | CaptureError::NoDescriptors { .. } => {
            StatusCode::SERVICE_UNAVAILABLE
        }
    };
    if status.is_server_error() {
        tracing::warn!(%error, "capture failed");
    }
    text(status, &format!("{error}\n"))
}

/// Plain text that no browser will sniff into markup.
fn text(status: StatusCode, body: &str) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body.to_owned(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(a).unwrap());
        }
        h
    }

    #[test]
    fn bearer_token_must_match_exactly() {
        let token = Secret::new("s3cret");
        assert!(authorized(None, &headers(None)));
        assert!(authorized(Some(&token), &headers(Some("Bearer s3cret"))));
        assert!(!authorized(Some(&token), &headers(None)));
        assert!(!authorized(Some(&token), &headers(Some("Bearer s3cre"))));
        assert!(!authorized(Some(&token), &headers(Some("Bearer s3cret2"))));
        assert!(!authorized(Some(&token), &headers(Some("Basic s3cret"))));
        assert!(!authorized(Some(&token), &headers(Some("bearer s3cret"))));
    }
}
