//! The admin socket both daemons serve (`blockferry_agent::admin`, `blockferry_target::admin`):
//! HTTP/1.1 on a Unix socket. This crate is the socket and connection half; each daemon keeps its
//! routes and handlers and passes them to [`AdminSocket::serve`] as one function of a request.
//!
//! - Who may connect is decided by the socket file's mode: 0600, the daemon's user. The socket
//!   is bound under a temporary name, chmod-ed, then renamed into place, so it is never
//!   reachable with a wider mode.
//! - A stale socket (its process is gone: connecting is refused) is replaced; a live one, or a
//!   file that is not a socket, never is ([`AdminError`]).
//! - Bad input never takes the daemon down: every connection is its own task with a header
//!   time-out ([`REQUEST_TIMEOUT`]), at most [`MAX_CONNECTIONS`] are served at once, and a
//!   panic in a handler ends only that connection.
//! - On shutdown, requests in flight may finish for [`SHUTDOWN_GRACE`], then every connection
//!   is closed and the socket file removed (unless another process has replaced it).
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use thiserror::Error;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, warn};

/// How long a client may take to send a request's headers (a daemon reading a body uses it
/// for the body as well).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are closed at accept (the socket is for a few operators).
pub const MAX_CONNECTIONS: usize = 64;
/// How long shutdown waits for requests in flight before closing their connections.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The daemon serving a socket, as [`AdminError`]'s messages name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Daemon {
    /// `agent` or `target`: "(another agent?)", "give this agent another --admin path".
    pub name: &'static str,
    /// Appended to the advice when the socket is in use, e.g. `" (or --no-admin)"`; may be "".
    pub in_use_also: &'static str,
}

impl std::fmt::Display for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

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
        "admin socket {path} is in use by a running process (another {daemon}?): stop it, or \
         give this {daemon} another --admin path{also}",
        also = .daemon.in_use_also
    )]
    InUse { path: PathBuf, daemon: Daemon },
    #[error("cannot listen on admin socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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

/// A bound, not yet serving admin socket. Dropping it removes the socket file.
#[derive(Debug)]
pub struct AdminSocket {
    listener: UnixListener,
    file: SocketFile,
}

impl AdminSocket {
    /// Creates `path`'s directory if missing (mode 0755), replaces a stale socket there (never
    /// a live one, never another kind of file) and listens on `path` with mode 0600.
    ///
    /// The socket is bound under a temporary name, chmod-ed, then renamed into place, so it is
    /// never reachable with a wider mode. Must be called inside a tokio runtime.
    pub fn bind(path: &Path, daemon: Daemon) -> Result<AdminSocket, AdminError> {
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
                    return Err(AdminError::InUse { path: path.to_path_buf(), daemon });
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
        Ok(AdminSocket { listener, file })
    }

    /// The socket's path, as given to [`AdminSocket::bind`].
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// Serves HTTP/1.1 until `shutdown` resolves, answering every request with `handler`, then
    /// lets requests in flight finish (up to [`SHUTDOWN_GRACE`]), closes every connection and
    /// removes the socket file.
    pub async fn serve<H, F>(self, handler: H, shutdown: impl Future<Output = ()>)
    where
        H: Fn(Request<Incoming>) -> F + Clone + Send + 'static,
        F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
    {
        let AdminSocket { listener, file } = self;
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
                        conns.spawn(serve_connection(stream, handler.clone(), stop_rx.clone()));
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

async fn serve_connection<H, F>(stream: UnixStream, handler: H, mut stop: watch::Receiver<bool>)
where
    H: Fn(Request<Incoming>) -> F + Send + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let service = service_fn(move |req| {
        let answer = handler(req);
        async move { Ok::<_, Infallible>(answer.await) }
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
mod tests;
