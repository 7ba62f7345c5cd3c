//! The NBD server: a thin tokio driver around the sans-IO codec of
//! `blockferry_protocol::nbd`.
//!
//! - [`Server::bind`] opens every volume of a [`Config`] (one export per volume, named after
//!   it), opens its engine and binds the listeners (TCP and/or Unix socket);
//! - [`Server::run`] accepts connections until the shutdown future resolves, then stops
//!   reading requests, lets in-flight requests finish and be answered (up to
//!   [`DRAIN_TIMEOUT`]), and closes;
//! - [`serve`] is both in one call.
//!
//! Each connection ([`conn`]): the handshake (with STARTTLS when configured), then a reader
//! that decodes requests from a large buffer and reads WRITE payloads straight into an
//! `IoBuf`, one task per request (replies out of order), and a writer task that batches every
//! queued reply into one vectored write. In-flight work per connection is bounded
//! (backpressure: the reader stops reading). All connections of a volume share its engine
//! (one file descriptor), so FLUSH covers writes completed on every connection:
//! `NBD_FLAG_CAN_MULTI_CONN` is advertised.

mod conn;
#[cfg(test)]
mod tests;
pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use blockferry_protocol::nbd::consts::*;
use blockferry_protocol::nbd::{ExportCatalog, ExportDesc, HandshakeConfig};
use thiserror::Error;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::cbt::Tracker;
use crate::config::{Config, ConfigError, TlsPolicy};
use crate::engine::{CacheMode, Engine, EngineError, EngineOptions};
use crate::repl::capture::Capture;
use crate::stats::IoStats;
use crate::volume::Volume;

/// How long a connection may take to finish the handshake (including TLS).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown waits for in-flight requests before closing connections anyway.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the server could not start (or stopped).
#[derive(Debug, Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("volume {name:?} in {dir}: {source}")]
    Engine {
        name: String,
        dir: PathBuf,
        #[source]
        source: EngineError,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("volume {name:?}: {source}")]
    Tracking {
        name: String,
        #[source]
        source: crate::cbt::CbtError,
    },
    #[error("TLS: {path}: {reason}")]
    Tls { path: PathBuf, reason: String },
    #[error("replication of volume {name:?}: {reason}")]
    Replication { name: String, reason: String },
}

/// One served volume.
#[derive(Debug)]
pub struct Export {
    pub volume: Volume,
    pub engine: Arc<Engine>,
    pub stats: Arc<IoStats>,
    /// Changed-block tracking; `None` when the volume's config turns it off.
    pub tracker: Option<Arc<Tracker>>,
    /// The epoch buffer of async replication; `None` when the volume is not replicated
    /// asynchronously (then the write path does no replication work at all).
    pub capture: Option<Arc<Capture>>,
}

/// Every export of a server: the handshake's catalog plus what the data path needs.
#[derive(Debug)]
pub struct Exports {
    descs: Vec<ExportDesc>,
    exports: Vec<Export>,
}

impl ExportCatalog for Exports {
    fn exports(&self) -> &[ExportDesc] {
        &self.descs
    }

    /// `base:allocation`, then one `qemu:dirty-bitmap:NAME` per bitmap the volume has now
    /// (bitmaps are created and removed at run time through the admin interface).
    fn meta_contexts(&self, export: usize) -> Vec<String> {
        let mut contexts = self.descs[export].meta_contexts.clone();
        if let Some(t) = &self.exports[export].tracker {
            contexts.extend(t.names().iter().map(|n| format!("{CONTEXT_DIRTY_BITMAP_PREFIX}{n}")));
        }
        contexts
    }
}

/// What callers (CLI, demo, tests) can see of an export.
#[derive(Debug, Clone)]
pub struct ExportHandle {
    pub name: String,
    pub size: u64,
    pub read_only: bool,
    pub tls_required: bool,
    pub stats: Arc<IoStats>,
}

/// State shared by every connection.
pub(crate) struct Shared {
    pub exports: Arc<Exports>,
    pub handshake: HandshakeConfig,
    pub tls: Option<TlsAcceptor>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("exports", &self.exports)
            .field("handshake", &self.handshake)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// A bound, not yet running NBD server.
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
    tcp: Option<TcpListener>,
    unix: Option<(UnixListener, PathBuf)>,
}

/// Transmission flags of an export: everything the engines implement.
fn transmission_flags(read_only: bool) -> u16 {
    let mut flags = FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE | FLAG_CAN_MULTI_CONN;
    if !read_only {
        flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    flags
}

impl Server {
    /// Validates the config, opens volumes and engines, loads TLS material and binds the
    /// listeners. Use port 0 to let the kernel choose (see [`Server::local_addr`]).
    pub async fn bind(config: &Config) -> Result<Server, ServeError> {
        Server::bind_with(config, HashMap::new()).await
    }

    /// [`Server::bind`], with the epoch buffers of the volumes replicated asynchronously, by
    /// volume name (set up by the replication driver; each must match its volume's size and
    /// block size).
    pub async fn bind_with(
        config: &Config,
        mut captures: HashMap<String, Arc<Capture>>,
    ) -> Result<Server, ServeError> {
        let volumes = config.validate()?;
        let tls = config.tls.as_ref().map(tls::acceptor).transpose()?;
        let mut descs = Vec::with_capacity(volumes.len());
        let mut exports = Vec::with_capacity(volumes.len());
        let mut all_required = true;
        for (vc, volume) in config.volumes.iter().zip(volumes) {
            let options =
                EngineOptions { kind: vc.engine, cache: vc.cache, read_only: vc.read_only };
            let engine = Engine::open(&volume.image_path(), options).map_err(|source| {
                ServeError::Engine { name: volume.meta.name.clone(), dir: vc.dir.clone(), source }
            })?;
            let tls_required = config.volume_tls(vc) == TlsPolicy::Required;
            all_required &= tls_required;
            descs.push(ExportDesc {
                name: volume.meta.name.clone(),
                description: format!("blockferry volume {}", volume.meta.uuid),
                size: engine.size(),
                flags: transmission_flags(vc.read_only),
                read_only: vc.read_only,
                min_block_size: if vc.cache == CacheMode::None { 512 } else { 1 },
                tls_required,
                meta_contexts: vec![CONTEXT_BASE_ALLOCATION.to_string()],
            });
            let tracker = if vc.change_tracking {
                let t = Tracker::open(&volume, vc.tracker_options()).map_err(|source| {
                    ServeError::Tracking { name: volume.meta.name.clone(), source }
                })?;
                Some(t)
            } else {
                None
            };
            let capture = captures.remove(&volume.meta.name);
            if let Some(c) = &capture {
                if c.size() != engine.size() || c.block_size() != volume.meta.block_size {
                    return Err(ServeError::Replication {
                        name: volume.meta.name.clone(),
                        reason: format!(
                            "the epoch buffer is for {} bytes in blocks of {}, the volume has {} bytes in blocks of {}",
                            c.size(),
                            c.block_size(),
                            engine.size(),
                            volume.meta.block_size
                        ),
                    });
                }
            }
            let stats = Arc::new(IoStats::default());
            exports.push(Export { volume, engine, stats, tracker, capture });
        }
        if let Some(name) = captures.into_keys().next() {
            return Err(ServeError::Replication {
                name,
                reason: "an epoch buffer was given for a volume the config does not serve".into(),
            });
        }
        let handshake = HandshakeConfig {
            tls_available: tls.is_some(),
            // FORCEDTLS when no export may be used without TLS.
            tls_required: tls.is_some() && all_required,
        };
        let tcp = match config.listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServeError::Bind { addr: addr.to_string(), source })?,
            ),
            None => None,
        };
        let unix = match &config.unix {
            Some(path) => Some((bind_unix(path)?, path.clone())),
            None => None,
        };
        let exports = Arc::new(Exports { descs, exports });
        Ok(Server { shared: Arc::new(Shared { exports, handshake, tls }), tcp, unix })
    }

    /// The bound TCP address (with the real port when the config said port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The Unix socket path, if any.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix.as_ref().map(|(_, p)| p.as_path())
    }

    /// The exports with their live counters.
    pub fn exports(&self) -> Vec<ExportHandle> {
        let e = &self.shared.exports;
        e.descs
            .iter()
            .zip(&e.exports)
            .map(|(d, x)| ExportHandle {
                name: d.name.clone(),
                size: d.size,
                read_only: d.read_only,
                tls_required: d.tls_required,
                stats: x.stats.clone(),
            })
            .collect()
    }

    /// The live counters of export `name`.
    pub fn stats(&self, name: &str) -> Option<Arc<IoStats>> {
        let e = &self.shared.exports;
        e.descs.iter().position(|d| d.name == name).map(|i| e.exports[i].stats.clone())
    }

    /// The change trackers by volume name (`None`: tracking is off for that volume).
    pub fn trackers(&self) -> std::collections::BTreeMap<String, Option<Arc<Tracker>>> {
        let e = &self.shared.exports;
        e.descs.iter().zip(&e.exports).map(|(d, x)| (d.name.clone(), x.tracker.clone())).collect()
    }

    /// The replication capture of export `name`, if it has one.
    pub fn capture(&self, name: &str) -> Option<Arc<crate::repl::capture::Capture>> {
        let e = &self.shared.exports;
        e.descs
            .iter()
            .zip(&e.exports)
            .find(|(d, _)| d.name == name)
            .and_then(|(_, x)| x.capture.clone())
    }

    /// Serves until `shutdown` resolves, then drains and closes every connection.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut conns = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                r = accept_tcp(&self.tcp) => match r {
                    Ok((stream, peer)) => {
                        if let Err(e) = stream.set_nodelay(true) {
                            warn!(%peer, "cannot set TCP_NODELAY: {e}");
                        }
                        let peer = peer.to_string();
                        conns.spawn(conn::handle(stream, self.shared.clone(), stop_rx.clone(), peer));
                    }
                    Err(e) => accept_failed(e).await,
                },
                r = accept_unix(&self.unix) => match r {
                    Ok(stream) => {
                        let peer = "unix".to_string();
                        conns.spawn(conn::handle(stream, self.shared.clone(), stop_rx.clone(), peer));
                    }
                    Err(e) => accept_failed(e).await,
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        info!(connections = conns.len(), "shutting down: draining in-flight requests");
        let _ = stop_tx.send(true);
        let left = crate::tasks::drain(&mut conns, DRAIN_TIMEOUT).await;
        if left > 0 {
            warn!(connections = left, "drain timed out; closed the remaining connections");
        }
        if let Some((_, path)) = &self.unix {
            let _ = std::fs::remove_file(path);
        }
        // No request is in flight any more: record a clean stop of change tracking.
        for x in &self.shared.exports.exports {
            if let Some(t) = &x.tracker {
                let t = t.clone();
                let name = x.volume.meta.name.clone();
                match tokio::task::spawn_blocking(move || t.close()).await {
                    Ok(Ok(())) => info!(volume = %name, "change tracking stopped cleanly"),
                    Ok(Err(e)) => {
                        warn!(volume = %name, "change tracking did not stop cleanly: {e}")
                    }
                    Err(e) => warn!(volume = %name, "change tracking close panicked: {e}"),
                }
            }
        }
        Ok(())
    }
}

/// Binds a Unix socket, replacing a stale socket file (never any other kind of file).
fn bind_unix(path: &Path) -> Result<UnixListener, ServeError> {
    use std::os::unix::fs::FileTypeExt;
    let bind_err = |source| ServeError::Bind { addr: path.display().to_string(), source };
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if md.file_type().is_socket() {
            std::fs::remove_file(path).map_err(bind_err)?;
        }
    }
    UnixListener::bind(path).map_err(bind_err)
}

async fn accept_tcp(
    l: &Option<TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

async fn accept_unix(
    l: &Option<(UnixListener, PathBuf)>,
) -> std::io::Result<tokio::net::UnixStream> {
    match l {
        Some((l, _)) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

/// An accept error (e.g. EMFILE) must not spin the loop or stop the server.
async fn accept_failed(e: std::io::Error) {
    warn!("accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Binds and serves `config` until `shutdown` resolves. Use [`Server::bind`] and
/// [`Server::run`] to learn the bound address and the stats in between.
pub async fn serve(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    Server::bind(&config).await?.run(shutdown).await
}
