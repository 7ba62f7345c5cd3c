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

use std::convert::Infallible;
use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use thiserror::Error;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::server::{TargetServer, VolumeStatus};

/// Where the target listens and `blockferry status` connects with `--admin` for a target.
pub const DEFAULT_SOCKET: &str = "/run/blockferry/target.sock";
/// How long a client may take to send a request's headers.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are closed at accept (the socket is for a few operators).
pub const MAX_CONNECTIONS: usize = 64;
/// How long shutdown waits for requests in flight before closing their connections.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the admin socket could not be set up. Messages say what to do.
#[derive(Debug, Error)]
pub enum AdminError {
    #[error("cannot create the admin socket's directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} exists and is not a socket: refusing to replace it; remove it or choose \
         another --admin path"
    )]
    NotASocket { path: PathBuf },
    #[error(
        "admin socket {path} is in use by a running process (another target?): stop it, or \
         give this target another --admin path (or --no-admin)"
    )]
    InUse { path: PathBuf },
    #[error("cannot listen on admin socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

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

/// The socket file this process created, removed on drop unless another process has replaced
/// it since (same device and inode).
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(md) if md.dev() == self.dev && md.ino() == self.ino => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    warn!("cannot remove admin socket {}: {e}", self.path.display());
                }
            }
            _ => {}
        }
    }
}

/// A bound, not yet running admin server of the target.
#[derive(Debug)]
pub struct TargetAdmin {
    listener: UnixListener,
    file: SocketFile,
    server: Arc<TargetServer>,
}

impl TargetAdmin {
    /// Creates `path`'s directory if missing (mode 0755), replaces a stale socket there (never
    /// a live one, never another kind of file) and listens on `path` with mode 0600.
    ///
    /// The socket is bound under a temporary name, chmod-ed, then renamed into place, so it is
    /// never reachable with a wider mode. Must be called inside a tokio runtime.
    pub fn bind(path: &Path, server: Arc<TargetServer>) -> Result<TargetAdmin, AdminError> {
        let bind_err = |source| AdminError::Bind { path: path.to_path_buf(), source };
        let file_name = path.file_name().ok_or_else(|| {
            bind_err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"))
        })?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&dir)
            .map_err(|source| AdminError::CreateDir { path: dir.clone(), source })?;
        match std::fs::symlink_metadata(path) {
            Ok(md) if md.file_type().is_socket() => {
                // Live if something accepts on it; stale (ECONNREFUSED) if its process is gone.
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(AdminError::InUse { path: path.to_path_buf() });
                }
            }
            Ok(_) => return Err(AdminError::NotASocket { path: path.to_path_buf() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(file_name);
        tmp_name.push(format!(".{}", std::process::id()));
        let tmp = dir.join(tmp_name);
        if std::fs::symlink_metadata(&tmp).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(&tmp);
        }
        let std_listener = std::os::unix::net::UnixListener::bind(&tmp).map_err(bind_err)?;
        let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            return Err(bind_err(e));
        }
        let md = std::fs::symlink_metadata(path).map_err(bind_err)?;
        let file = SocketFile { path: path.to_path_buf(), dev: md.dev(), ino: md.ino() };
        std_listener.set_nonblocking(true).map_err(bind_err)?;
        let listener = UnixListener::from_std(std_listener).map_err(bind_err)?;
        Ok(TargetAdmin { listener, file, server })
    }

    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// Serves until `shutdown` resolves, then lets requests in flight finish (up to
    /// [`SHUTDOWN_GRACE`]), closes every connection and removes the socket file.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let TargetAdmin { listener, file, server } = self;
        info!("admin interface on {}", file.path.display());
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut conns = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                r = listener.accept() => match r {
                    Ok((stream, _)) if conns.len() >= MAX_CONNECTIONS => {
                        warn!("admin: {MAX_CONNECTIONS} connections open; closing a new one");
                        drop(stream);
                    }
                    Ok((stream, _)) => {
                        conns.spawn(serve_connection(stream, server.clone(), stop_rx.clone()));
                    }
                    Err(e) => {
                        // E.g. EMFILE: must not spin the loop or stop the server.
                        warn!("admin: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(r) = conns.join_next(), if !conns.is_empty() => {
                    if let Err(e) = r {
                        warn!("admin: a connection task failed: {e}");
                    }
                }
            }
        }
        drop(listener);
        let _ = stop_tx.send(true);
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while conns.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(connections = conns.len(), "admin: closed connections still busy");
            conns.shutdown().await;
        }
        drop(file);
    }
}

async fn serve_connection(
    stream: UnixStream,
    server: Arc<TargetServer>,
    mut stop: watch::Receiver<bool>,
) {
    let service = service_fn(move |req| {
        let server = server.clone();
        async move { Ok::<_, Infallible>(handle(&server, &req)) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(REQUEST_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    // The watch guard must not live across the graceful shutdown's await (it is not Send).
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = stopped => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!("admin connection: {e}");
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
