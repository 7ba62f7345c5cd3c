//! The agent's admin interface: HTTP/1.1 with JSON bodies on a Unix socket.
//!
//! Change tracking is managed here (named bitmaps, like qemu's); status and metrics will join
//! it. Every route is under `/v1/`; `{vol}` is a volume (export) name and `{name}` a bitmap
//! name, percent-encoded in the path ([`encode_segment`]).
//!
//! | method   | path                                       | answer                          |
//! |----------|--------------------------------------------|---------------------------------|
//! | `GET`    | `/v1/volumes`                              | `[VolumeView]`                  |
//! | `GET`    | `/v1/volumes/{vol}/bitmaps`                | `[BitmapInfo]`                  |
//! | `POST`   | `/v1/volumes/{vol}/bitmaps` `{"name": ..}` | 201 `BitmapInfo`                |
//! | `GET`    | `/v1/volumes/{vol}/bitmaps/{name}`         | `BitmapInfo`                    |
//! | `DELETE` | `/v1/volumes/{vol}/bitmaps/{name}`         | 204                             |
//! | `POST`   | `/v1/volumes/{vol}/bitmaps/{name}/clear`   | `BitmapInfo` (after the clear)  |
//! | `GET`    | `/v1/volumes/{vol}/bitmaps/{name}/extents` | [`ExtentsView`]                 |
//! | `GET`    | `/v1/volumes/{vol}/tracking`               | `TrackerStats`                  |
//! | `GET`    | `/v1/status`                               | replication status              |
//! | `POST`   | `/v1/volumes/{vol}/verify`                 | `VerifyReport`                  |
//! | `POST`   | `/v1/volumes/{vol}/mode` `{"mode": ..}`    | [`ModeChange`] (sync or async)  |
//!
//! Errors are `{"error": "message"}` with a fitting status: 400 (bad name, bad JSON), 404 (no
//! such route, volume or bitmap), 405 (with `Allow`), 409 (bitmap exists, change tracking off),
//! 413 (a body over [`MAX_BODY`]), 500 (change tracking failed).
//!
//! Who may connect is decided by the socket file's mode (0600: the agent's user, normally root).
//! Bad input never takes the agent down: every connection is its own task with a header
//! time-out, bodies are bounded, and a panic in a handler ends only that connection.
//! The socket and its connections are [`blockferry_admin_http`], shared with the target; this
//! module is the agent's routes and handlers.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use blockferry_admin_http::{AdminSocket, Daemon};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::cbt::{BitmapInfo, ByteExtent, CbtError, Tracker};
use crate::nbd::Server;
pub use crate::repl::shipper::ModeChange;

/// Where the agent listens and the CLI connects when no `--admin PATH` is given.
pub const DEFAULT_SOCKET: &str = "/run/blockferry/agent.sock";
/// The largest request body accepted (413 beyond).
pub const MAX_BODY: usize = 64 << 10;
/// The socket's limits and the reasons it cannot be set up, shared with the target
/// ([`blockferry_admin_http`]). [`REQUEST_TIMEOUT`] bounds a request's headers, and then its body.
pub use blockferry_admin_http::{AdminError, MAX_CONNECTIONS, REQUEST_TIMEOUT, SHUTDOWN_GRACE};

/// The agent, as the socket's messages name it.
const DAEMON: Daemon = Daemon { name: "agent", in_use_also: "" };

/// One volume as the admin interface sees it.
#[derive(Debug, Clone)]
pub struct AdminVolume {
    pub name: String,
    pub size: u64,
    /// `None`: change tracking is off for this volume.
    pub tracker: Option<Arc<Tracker>>,
    /// `None`: the volume does not replicate.
    pub replicator: Option<crate::repl::shipper::Replicator>,
}

impl AdminVolume {
    /// Every export of `server` with its tracker.
    pub fn of_server(server: &Server) -> Vec<AdminVolume> {
        let mut trackers = server.trackers();
        server
            .exports()
            .into_iter()
            .map(|e| AdminVolume {
                tracker: trackers.remove(&e.name).flatten(),
                replicator: None,
                name: e.name,
                size: e.size,
            })
            .collect()
    }
}

/// `GET /v1/volumes`: one element per volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeView {
    pub name: String,
    pub size: u64,
    pub change_tracking: bool,
    /// The change-tracking granularity; `null` when change tracking is off.
    pub block_size: Option<u32>,
}

/// `GET /v1/volumes/{vol}/bitmaps/{name}/extents`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExtentsView {
    pub volume: String,
    pub bitmap: String,
    /// Bytes per bit: every extent starts and ends on a multiple of it (or the volume's end).
    pub granularity: u32,
    /// The sum of the extents' lengths.
    pub dirty_bytes: u64,
    /// Dirty byte ranges, coalesced, in order.
    pub extents: Vec<ByteExtent>,
}

/// The body of `POST /v1/volumes/{vol}/bitmaps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBitmap {
    pub name: String,
}

/// The body of `POST /v1/volumes/{vol}/mode`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetMode {
    /// `sync` or `async`.
    pub mode: String,
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// Percent-encodes `s` for one path segment (everything but `A-Z a-z 0-9 - . _ ~`).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes one percent-encoded path segment; `None` if it is malformed or not UTF-8.
fn decode_segment(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A request that could be routed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Volumes,
    ListBitmaps { vol: String },
    CreateBitmap { vol: String },
    Bitmap { vol: String, name: String },
    RemoveBitmap { vol: String, name: String },
    Clear { vol: String, name: String },
    Extents { vol: String, name: String },
    Tracking { vol: String },
    Status,
    Verify { vol: String },
    Mode { vol: String },
}

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ApiError {
    status: StatusCode,
    message: String,
    /// The methods of the resource, for 405.
    allow: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), allow: None }
    }

    fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl From<CbtError> for ApiError {
    fn from(e: CbtError) -> ApiError {
        let status = match e {
            CbtError::NoSuchBitmap { .. } => StatusCode::NOT_FOUND,
            CbtError::BitmapExists { .. } => StatusCode::CONFLICT,
            CbtError::BadName { .. } => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

/// Maps a method and path to a [`Route`] (pure, so it is tested without sockets).
fn route(method: &Method, path: &str) -> Result<Route, ApiError> {
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no such route: {method} {path} (the admin API is under /v1/, e.g. GET \
                 /v1/volumes)"
            ),
        )
    };
    let rest = path.strip_prefix("/v1/").ok_or_else(not_found)?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let mut segs = Vec::new();
    for raw in rest.split('/') {
        let seg = decode_segment(raw).ok_or_else(|| {
            ApiError::new(StatusCode::BAD_REQUEST, format!("bad percent-encoding in {path:?}"))
        })?;
        segs.push(seg);
    }
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let allowed = |allow: &'static str| ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: format!("{method} is not allowed on {path}: use {allow}"),
        allow: Some(allow),
    };
    let s = |v: &&str| v.to_string();
    match (segs.as_slice(), method) {
        (["volumes"], &Method::GET) => Ok(Route::Volumes),
        (["volumes"], _) => Err(allowed("GET")),
        (["volumes", v, "bitmaps"], &Method::GET) => Ok(Route::ListBitmaps { vol: s(v) }),
        (["volumes", v, "bitmaps"], &Method::POST) => Ok(Route::CreateBitmap { vol: s(v) }),
        (["volumes", _, "bitmaps"], _) => Err(allowed("GET, POST")),
        (["volumes", v, "bitmaps", n], &Method::GET) => Ok(Route::Bitmap { vol: s(v), name: s(n) }),
        (["volumes", v, "bitmaps", n], &Method::DELETE) => {
            Ok(Route::RemoveBitmap { vol: s(v), name: s(n) })
        }
        (["volumes", _, "bitmaps", _], _) => Err(allowed("GET, DELETE")),
        (["volumes", v, "bitmaps", n, "clear"], &Method::POST) => {
            Ok(Route::Clear { vol: s(v), name: s(n) })
        }
        (["volumes", _, "bitmaps", _, "clear"], _) => Err(allowed("POST")),
        (["volumes", v, "bitmaps", n, "extents"], &Method::GET) => {
            Ok(Route::Extents { vol: s(v), name: s(n) })
        }
        (["volumes", _, "bitmaps", _, "extents"], _) => Err(allowed("GET")),
        (["volumes", v, "tracking"], &Method::GET) => Ok(Route::Tracking { vol: s(v) }),
        (["volumes", _, "tracking"], _) => Err(allowed("GET")),
        (["status"], &Method::GET) => Ok(Route::Status),
        (["status"], _) => Err(allowed("GET")),
        (["volumes", v, "verify"], &Method::POST) => Ok(Route::Verify { vol: s(v) }),
        (["volumes", _, "verify"], _) => Err(allowed("POST")),
        (["volumes", v, "mode"], &Method::POST) => Ok(Route::Mode { vol: s(v) }),
        (["volumes", _, "mode"], _) => Err(allowed("POST")),
        _ => Err(not_found()),
    }
}

/// What every connection shares: the volumes by name.
#[derive(Debug)]
struct State {
    volumes: BTreeMap<String, AdminVolume>,
}

impl State {
    fn volume(&self, name: &str) -> Result<&AdminVolume, ApiError> {
        self.volumes.get(name).ok_or_else(|| {
            let names: Vec<&str> = self.volumes.keys().map(String::as_str).collect();
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no volume named {name:?} (this agent serves: {})", names.join(", ")),
            )
        })
    }

    fn tracker(&self, name: &str) -> Result<Arc<Tracker>, ApiError> {
        self.volume(name)?.tracker.clone().ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "change tracking is off for volume {name:?}: set change-tracking = true in \
                     its [[volume]] config and restart the agent"
                ),
            )
        })
    }
}

/// Runs blocking (or long) tracker work on the blocking pool; a panic there is a 500.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CbtError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(ApiError::internal(format!("change-tracking operation failed: {e}"))),
    }
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Full<Bytes>> {
    let mut body = match serde_json::to_vec(value) {
        Ok(b) => b,
        Err(e) => return error_response(&ApiError::internal(format!("cannot encode: {e}"))),
    };
    body.push(b'\n');
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error_response(e: &ApiError) -> Response<Full<Bytes>> {
    let mut resp = json(e.status, &ErrorBody { error: e.message.clone() });
    if let Some(allow) = e.allow {
        resp.headers_mut().insert(ALLOW, HeaderValue::from_static(allow));
    }
    resp
}

/// Reads a body of at most [`MAX_BODY`] bytes within [`REQUEST_TIMEOUT`].
async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let too_big = || {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("request body over {MAX_BODY} bytes"))
    };
    let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok());
    if declared.and_then(|v| v.parse::<u64>().ok()).is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_big());
    }
    let collect = Limited::new(req.into_body(), MAX_BODY).collect();
    match tokio::time::timeout(REQUEST_TIMEOUT, collect).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!("request body not received within {REQUEST_TIMEOUT:?}"),
        )),
        Ok(Err(e)) if e.is::<LengthLimitError>() => Err(too_big()),
        Ok(Err(e)) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("cannot read the request body: {e}"),
        )),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = match route(&method, &path) {
        Ok(r) => dispatch(&state, r, req).await,
        Err(e) => Err(e),
    };
    match resp {
        Ok(resp) => {
            debug!(%method, %path, status = resp.status().as_u16(), "admin request");
            resp
        }
        Err(e) => {
            let status = e.status.as_u16();
            if e.status.is_server_error() {
                warn!(%method, %path, status, "admin request failed: {}", e.message);
            } else {
                debug!(%method, %path, status, "admin request refused: {}", e.message);
            }
            error_response(&e)
        }
    }
}

async fn dispatch(
    state: &State,
    route: Route,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    match route {
        Route::Volumes => {
            let views: Vec<VolumeView> = state
                .volumes
                .values()
                .map(|v| VolumeView {
                    name: v.name.clone(),
                    size: v.size,
                    change_tracking: v.tracker.is_some(),
                    block_size: v.tracker.as_ref().map(|t| t.block_size()),
                })
                .collect();
            Ok(json(StatusCode::OK, &views))
        }
        Route::ListBitmaps { vol } => Ok(json(StatusCode::OK, &state.tracker(&vol)?.list())),
        Route::CreateBitmap { vol } => {
            let tracker = state.tracker(&vol)?;
            let body = read_body(req).await?;
            let CreateBitmap { name } = serde_json::from_slice(&body).map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("bad request body ({e}): expected {{\"name\": \"BITMAP\"}}"),
                )
            })?;
            let info: BitmapInfo = blocking(move || tracker.create(&name)).await?;
            Ok(json(StatusCode::CREATED, &info))
        }
        Route::Bitmap { vol, name } => Ok(json(StatusCode::OK, &state.tracker(&vol)?.info(&name)?)),
        Route::RemoveBitmap { vol, name } => {
            let tracker = state.tracker(&vol)?;
            blocking(move || tracker.remove(&name)).await?;
            let mut resp = Response::new(Full::new(Bytes::new()));
            *resp.status_mut() = StatusCode::NO_CONTENT;
            Ok(resp)
        }
        Route::Clear { vol, name } => {
            let tracker = state.tracker(&vol)?;
            let info = blocking(move || tracker.clear(&name)).await?;
            Ok(json(StatusCode::OK, &info))
        }
        Route::Extents { vol, name } => {
            let tracker = state.tracker(&vol)?;
            let granularity = tracker.block_size();
            // A scan of the whole bitmap: off the async workers.
            let extents = blocking(move || tracker.extents(&name).map(|e| (name, e))).await;
            let (bitmap, extents) = extents?;
            let dirty_bytes = extents.iter().map(|e| e.length).sum();
            let view = ExtentsView { volume: vol, bitmap, granularity, dirty_bytes, extents };
            Ok(json(StatusCode::OK, &view))
        }
        Route::Tracking { vol } => Ok(json(StatusCode::OK, &state.tracker(&vol)?.stats())),
        Route::Status => {
            let volumes: Vec<_> = state
                .volumes
                .values()
                .filter_map(|v| v.replicator.as_ref().map(|r| r.status()))
                .collect();
            Ok(json(StatusCode::OK, &serde_json::json!({ "role": "agent", "volumes": volumes })))
        }
        Route::Verify { vol } => {
            let rep = state.volume(&vol)?.replicator.clone().ok_or_else(|| {
                ApiError::new(StatusCode::CONFLICT, format!("volume {vol:?} does not replicate"))
            })?;
            let report = rep.verify().await.map_err(|e| ApiError::new(StatusCode::CONFLICT, e))?;
            Ok(json(StatusCode::OK, &report))
        }
        Route::Mode { vol } => {
            let rep = state.volume(&vol)?.replicator.clone().ok_or_else(|| {
                ApiError::new(StatusCode::CONFLICT, format!("volume {vol:?} does not replicate"))
            })?;
            let body = read_body(req).await?;
            let bad = |what: String| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("{what}: expected {{\"mode\": \"sync\"}} or {{\"mode\": \"async\"}}"),
                )
            };
            let SetMode { mode } = serde_json::from_slice(&body)
                .map_err(|e| bad(format!("bad request body ({e})")))?;
            let mode = match mode.as_str() {
                "sync" => blockferry_protocol::repl::Mode::Sync,
                "async" => blockferry_protocol::repl::Mode::Async,
                m => return Err(bad(format!("unknown mode {m:?}"))),
            };
            let change = rep.set_mode(mode).await.map_err(ApiError::internal)?;
            Ok(json(StatusCode::OK, &change))
        }
    }
}

/// A bound, not yet running admin server.
#[derive(Debug)]
pub struct Admin {
    socket: AdminSocket,
    state: Arc<State>,
}

impl Admin {
    /// Creates `path`'s directory if missing (mode 0755), replaces a stale socket there (never
    /// a live one, never another kind of file) and listens on `path` with mode 0600 (see
    /// [`AdminSocket::bind`]). Must be called inside a tokio runtime.
    pub fn bind(path: &Path, volumes: Vec<AdminVolume>) -> Result<Admin, AdminError> {
        let socket = AdminSocket::bind(path, DAEMON)?;
        let volumes = volumes.into_iter().map(|v| (v.name.clone(), v)).collect();
        Ok(Admin { socket, state: Arc::new(State { volumes }) })
    }

    pub fn path(&self) -> &Path {
        self.socket.path()
    }

    /// Serves until `shutdown` resolves, then lets requests in flight finish (up to
    /// [`SHUTDOWN_GRACE`]), closes every connection and removes the socket file.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Admin { socket, state } = self;
        info!("admin interface on {}", socket.path().display());
        socket.serve(move |req| handle(state.clone(), req), shutdown).await;
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;
    use tokio::sync::oneshot;

    use super::*;
    use crate::cbt::TrackerOptions;
    use crate::volume::Volume;

    #[test]
    fn routes_map_methods_and_paths() {
        let r = |m: Method, p: &str| route(&m, p);
        assert_eq!(r(Method::GET, "/v1/volumes"), Ok(Route::Volumes));
        assert_eq!(r(Method::GET, "/v1/volumes/"), Ok(Route::Volumes));
        assert_eq!(
            r(Method::POST, "/v1/volumes/vm1/bitmaps"),
            Ok(Route::CreateBitmap { vol: "vm1".into() })
        );
        assert_eq!(
            r(Method::GET, "/v1/volumes/vm1/bitmaps/b%20c/extents"),
            Ok(Route::Extents { vol: "vm1".into(), name: "b c".into() })
        );
        assert_eq!(
            r(Method::DELETE, "/v1/volumes/a/bitmaps/b"),
            Ok(Route::RemoveBitmap { vol: "a".into(), name: "b".into() })
        );
        assert_eq!(
            r(Method::POST, "/v1/volumes/a/bitmaps/b/clear"),
            Ok(Route::Clear { vol: "a".into(), name: "b".into() })
        );
        assert_eq!(
            r(Method::GET, "/v1/volumes/a/tracking"),
            Ok(Route::Tracking { vol: "a".into() })
        );
        assert_eq!(r(Method::POST, "/v1/volumes/a/mode"), Ok(Route::Mode { vol: "a".into() }));
        assert_eq!(r(Method::GET, "/v1/volumes/a/mode").unwrap_err().allow, Some("POST"));
        let e = r(Method::PUT, "/v1/volumes/a/bitmaps/b").unwrap_err();
        assert_eq!((e.status, e.allow), (StatusCode::METHOD_NOT_ALLOWED, Some("GET, DELETE")));
        for p in ["/", "/v1", "/v2/volumes", "/v1/volumes/a/b", "/v1/volumes/a/bitmaps/b/c/d"] {
            assert_eq!(r(Method::GET, p).unwrap_err().status, StatusCode::NOT_FOUND, "{p}");
        }
        for p in ["/v1/volumes/%zz/bitmaps", "/v1/volumes/%ff/bitmaps", "/v1/volumes/%+f", "/v1/%4"]
        {
            assert_eq!(r(Method::GET, p).unwrap_err().status, StatusCode::BAD_REQUEST, "{p}");
        }
    }

    #[test]
    fn path_segments_round_trip() {
        for s in ["vm1", "a b", "a/b", "50%", "é", "..", ""] {
            let e = encode_segment(s);
            assert!(!e.contains('/') && !e.contains(' '), "{e}");
            assert_eq!(decode_segment(&e).as_deref(), Some(s));
        }
        assert_eq!(encode_segment("a-b_c.d~"), "a-b_c.d~");
    }

    /// A raw HTTP/1.1 exchange (`Connection: close`): (status, headers, body).
    async fn raw(sock: &Path, request: &[u8]) -> (u16, String, String) {
        let mut s = UnixStream::connect(sock).await.unwrap();
        let _ = s.write_all(request).await;
        // Read up to EOF or a reset (the server may close without reading a refused body).
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = s.read(&mut chunk).await {
            buf.extend_from_slice(&chunk[..n]);
        }
        let text = String::from_utf8(buf).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        (status, head.to_string(), body.to_string())
    }

    async fn call(sock: &Path, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
        let len = body.len();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\
             content-length: {len}\r\n\r\n{body}"
        );
        let (status, head, body) = raw(sock, req.as_bytes()).await;
        if body.is_empty() {
            return (status, serde_json::Value::Null);
        }
        assert!(head.contains("application/json"), "{head}");
        (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body:?}")))
    }

    struct Running {
        sock: PathBuf,
        tracker: Arc<Tracker>,
        stop: oneshot::Sender<()>,
        task: tokio::task::JoinHandle<()>,
        _tmp: tempfile::TempDir,
    }

    async fn start() -> Running {
        let tmp = tempfile::tempdir().unwrap();
        let on = Volume::create(&tmp.path().join("on"), 1 << 20, 4096, Some("on")).unwrap();
        let off = Volume::create(&tmp.path().join("off"), 1 << 20, 4096, Some("off")).unwrap();
        let tracker = Tracker::open(&on, TrackerOptions::default()).unwrap();
        let volumes = vec![
            AdminVolume {
                name: "on".into(),
                size: 1 << 20,
                tracker: Some(tracker.clone()),
                replicator: None,
            },
            AdminVolume {
                name: off.meta.name.clone(),
                size: 1 << 20,
                tracker: None,
                replicator: None,
            },
        ];
        // A directory that does not exist yet: bind creates it.
        let sock = tmp.path().join("run/blockferry/admin.sock");
        let admin = Admin::bind(&sock, volumes).unwrap();
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(admin.run(async {
            let _ = rx.await;
        }));
        Running { sock, tracker, stop, task, _tmp: tmp }
    }

    #[tokio::test]
    async fn manages_bitmaps_over_the_socket() {
        let r = start().await;
        let s = r.sock.as_path();
        let mode = std::fs::metadata(s).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "admin socket mode {mode:o}");

        let (st, v) = call(s, "GET", "/v1/volumes", "").await;
        assert_eq!(st, 200);
        assert_eq!(
            v,
            serde_json::json!([
                {"name": "off", "size": 1 << 20, "change_tracking": false, "block_size": null},
                {"name": "on", "size": 1 << 20, "change_tracking": true, "block_size": 4096},
            ])
        );
        let (st, v) = call(s, "POST", "/v1/volumes/on/bitmaps", r#"{"name":"b1"}"#).await;
        assert_eq!(st, 201, "{v}");
        assert_eq!(v["name"], "b1");
        assert_eq!(v["dirty_bytes"], 0);
        let (st, v) = call(s, "POST", "/v1/volumes/on/bitmaps", r#"{"name":"b1"}"#).await;
        assert_eq!(st, 409, "{v}");
        assert!(v["error"].as_str().unwrap().contains("already has a bitmap"), "{v}");
        let (st, v) = call(s, "POST", "/v1/volumes/on/bitmaps", r#"{"name":"a b"}"#).await;
        assert_eq!(st, 400, "{v}");
        assert!(v["error"].as_str().unwrap().contains("bad bitmap name"), "{v}");
        let (st, v) = call(s, "POST", "/v1/volumes/on/bitmaps", r#"{"nom":"x"}"#).await;
        assert_eq!(st, 400, "{v}");
        assert!(v["error"].as_str().unwrap().contains("expected"), "{v}");
        let (st, _) = call(s, "POST", "/v1/volumes/on/bitmaps", "not json").await;
        assert_eq!(st, 400);

        // Writes of blocks 1..=2 and 16, then the extents.
        drop(r.tracker.begin_write(4096, 8192).await.unwrap());
        drop(r.tracker.begin_write(65536 + 10, 1).await.unwrap());
        let (st, v) = call(s, "GET", "/v1/volumes/on/bitmaps/b1/extents", "").await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(
            v,
            serde_json::json!({
                "volume": "on", "bitmap": "b1", "granularity": 4096, "dirty_bytes": 12288,
                "extents": [{"offset": 4096, "length": 8192}, {"offset": 65536, "length": 4096}],
            })
        );
        let (st, v) = call(s, "GET", "/v1/volumes/on/bitmaps", "").await;
        assert_eq!(st, 200);
        assert_eq!(v[0]["dirty_bytes"], 12288);
        let (st, v) = call(s, "POST", "/v1/volumes/on/bitmaps/b1/clear", "").await;
        assert_eq!((st, &v["generation"], &v["dirty_bytes"]), (200, &1.into(), &0.into()), "{v}");
        let (_, v) = call(s, "GET", "/v1/volumes/on/bitmaps/b1/extents", "").await;
        assert_eq!(v["extents"], serde_json::json!([]));
        let (st, v) = call(s, "GET", "/v1/volumes/on/tracking", "").await;
        assert_eq!(st, 200);
        assert!(v.get("writes_tracked").is_some(), "{v}");

        let (st, v) = call(s, "DELETE", "/v1/volumes/on/bitmaps/b1", "").await;
        assert_eq!((st, v), (204, serde_json::Value::Null));
        let (st, v) = call(s, "DELETE", "/v1/volumes/on/bitmaps/b1", "").await;
        assert_eq!(st, 404);
        assert!(v["error"].as_str().unwrap().contains("no bitmap named \"b1\""), "{v}");

        let (st, v) = call(s, "GET", "/v1/volumes/nope/bitmaps", "").await;
        assert_eq!(st, 404);
        assert!(v["error"].as_str().unwrap().contains("off, on"), "{v}");
        let (st, v) = call(s, "POST", "/v1/volumes/off/bitmaps", r#"{"name":"b"}"#).await;
        assert_eq!(st, 409);
        assert!(v["error"].as_str().unwrap().contains("change tracking is off"), "{v}");
        let (st, _) = call(s, "GET", "/v2/volumes", "").await;
        assert_eq!(st, 404);
        let (st, head, _) =
            raw(s, b"PATCH /v1/volumes HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await;
        assert_eq!(st, 405);
        assert!(head.to_lowercase().contains("allow: get"), "{head}");

        // Hostile input: an oversized body (declared and undeclared), garbage, a silent peer.
        let big = "x".repeat(MAX_BODY + 1);
        let (st, _) = call(s, "POST", "/v1/volumes/on/bitmaps", &big).await;
        assert_eq!(st, 413);
        let chunked = format!(
            "POST /v1/volumes/on/bitmaps HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\
             transfer-encoding: chunked\r\n\r\n{:x}\r\n{big}\r\n0\r\n\r\n",
            big.len()
        );
        assert_eq!(raw(s, chunked.as_bytes()).await.0, 413);
        let (st, _, _) = raw(s, b"\x00\x01garbage\r\n\r\n").await;
        assert!(st == 400 || st == 0, "{st}");
        let _idle = UnixStream::connect(s).await.unwrap();
        let (st, _) = call(s, "GET", "/v1/volumes", "").await;
        assert_eq!(st, 200, "the server stopped answering after hostile input");

        r.stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), r.task).await.unwrap().unwrap();
        assert!(!r.sock.exists(), "the socket file is left after shutdown");
    }

    #[tokio::test]
    async fn bind_replaces_only_a_stale_socket() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("admin.sock");
        // A regular file is never replaced.
        std::fs::write(&path, b"precious").unwrap();
        let e = Admin::bind(&path, vec![]).unwrap_err();
        assert!(matches!(e, AdminError::NotASocket { .. }), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        std::fs::remove_file(&path).unwrap();
        // A live socket is not stolen.
        let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let e = Admin::bind(&path, vec![]).unwrap_err();
        assert!(matches!(e, AdminError::InUse { .. }), "{e}");
        assert!(e.to_string().contains("--admin"), "{e}");
        // Once its listener is gone, the socket is stale and replaced.
        drop(live);
        let admin = Admin::bind(&path, vec![]).unwrap();
        assert_eq!(admin.path(), path);
        let names: Vec<_> =
            std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("admin.sock")], "a temporary name is left");
        drop(admin);
        assert!(!path.exists(), "dropping an unstarted Admin leaves its socket");
    }
}
