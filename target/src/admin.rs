//! The target's admin interface: HTTP/1.1 with JSON bodies on a Unix socket, the same shape as
//! the agent's (`blockferry_agent::admin`), so `blockferry status --admin PATH` reads either.
//!
//! | method | path         | answer                                              |
//! |--------|--------------|-----------------------------------------------------|
//! | `GET`  | `/v1/status` | `{"role": "target", "volumes": [VolumeStatus...]}` |
//!
//! Errors are `{"error": "message"}`: 404 (no such route), 405 (with `Allow`).
//!
//! Who may connect is decided by the socket file's mode (0600: the target's user). Bad input
//! never takes the target down: every connection is its own task with a header time-out, and
//! requests have no body to read (a body sent anyway is discarded by hyper, never buffered here).
//! The socket and its connections are [`blockferry_admin_http`], shared with the agent; this
//! module is the target's routes and handlers.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use blockferry_admin_http::{AdminSocket, Daemon};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use tracing::{debug, info};

use crate::server::{TargetServer, VolumeStatus};

/// Where the target listens and `blockferry status` connects with `--admin` for a target.
pub const DEFAULT_SOCKET: &str = "/run/blockferry/target.sock";
/// The socket's limits and the reasons it cannot be set up, shared with the agent
/// ([`blockferry_admin_http`]).
pub use blockferry_admin_http::{AdminError, MAX_CONNECTIONS, REQUEST_TIMEOUT, SHUTDOWN_GRACE};

/// The target, as the socket's messages name it.
const DAEMON: Daemon = Daemon { name: "target", in_use_also: " (or --no-admin)" };

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusView {
    /// Always `"target"` (the agent answers `"agent"`): tells `blockferry status` the table.
    pub role: &'static str,
    pub volumes: Vec<VolumeStatus>,
}

/// The body of every error answer.
#[derive(Debug, Clone, Serialize)]
struct ErrorBody {
    error: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Status,
}

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ApiError {
    status: StatusCode,
    message: String,
    allow: Option<&'static str>,
}

/// Maps a method and path to a [`Route`] (pure, tested without sockets).
fn route(method: &Method, path: &str) -> Result<Route, ApiError> {
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    match (trimmed, method) {
        ("/v1/status", &Method::GET) => Ok(Route::Status),
        ("/v1/status", _) => Err(ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            message: format!("{method} is not allowed on {path}: use GET"),
            allow: Some("GET"),
        }),
        _ => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "no such route on the target: {method} {path} (the target's admin API is GET \
                 /v1/status)"
            ),
            allow: None,
        }),
    }
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Full<Bytes>> {
    let (status, mut body) = match serde_json::to_vec(value) {
        Ok(b) => (status, b),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{{\"error\":{:?}}}", format!("cannot encode: {e}")).into_bytes(),
        ),
    };
    body.push(b'\n');
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn handle(server: &TargetServer, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method();
    let path = req.uri().path();
    match route(method, path) {
        Ok(Route::Status) => {
            debug!(%method, %path, "admin request");
            json(StatusCode::OK, &StatusView { role: "target", volumes: server.status() })
        }
        Err(e) => {
            debug!(%method, %path, status = e.status.as_u16(), "admin request refused: {}", e.message);
            let mut resp = json(e.status, &ErrorBody { error: e.message });
            if let Some(allow) = e.allow {
                resp.headers_mut().insert(ALLOW, HeaderValue::from_static(allow));
            }
            resp
        }
    }
}

/// A bound, not yet running admin server of the target.
#[derive(Debug)]
pub struct TargetAdmin {
    socket: AdminSocket,
    server: Arc<TargetServer>,
}

impl TargetAdmin {
    /// Creates `path`'s directory if missing (mode 0755), replaces a stale socket there (never
    /// a live one, never another kind of file) and listens on `path` with mode 0600 (see
    /// [`AdminSocket::bind`]). Must be called inside a tokio runtime.
    pub fn bind(path: &Path, server: Arc<TargetServer>) -> Result<TargetAdmin, AdminError> {
        Ok(TargetAdmin { socket: AdminSocket::bind(path, DAEMON)?, server })
    }

    pub fn path(&self) -> &Path {
        self.socket.path()
    }

    /// Serves until `shutdown` resolves, then lets requests in flight finish (up to
    /// [`SHUTDOWN_GRACE`]), closes every connection and removes the socket file.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let TargetAdmin { socket, server } = self;
        info!("admin interface on {}", socket.path().display());
        let handler = move |req: Request<Incoming>| std::future::ready(handle(&server, &req));
        socket.serve(handler, shutdown).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_status_only() {
        assert_eq!(route(&Method::GET, "/v1/status"), Ok(Route::Status));
        assert_eq!(route(&Method::GET, "/v1/status/"), Ok(Route::Status));
        let e = route(&Method::POST, "/v1/status").unwrap_err();
        assert_eq!((e.status, e.allow), (StatusCode::METHOD_NOT_ALLOWED, Some("GET")));
        for p in ["/", "/v1", "/v1/volumes", "/v2/status", "/v1/status/x"] {
            let e = route(&Method::GET, p).unwrap_err();
            assert_eq!(e.status, StatusCode::NOT_FOUND, "{p}");
            assert!(e.message.contains("GET /v1/status"), "{}", e.message);
        }
    }
}
