//! One NBD connection: handshake, then the transmission phase.
//!
//! ```text
//!  socket ─► reader (this task) ──► execute: inline if small, ──┐
//!               ▲                     spawned if large or it waits │ Reply (mpsc)
//!               │ stops reading when the budget is spent            │
//!               └──────── permits released after the write ◄── writer task ─► socket
//! ```
//! Only an unusable stream ends a connection: bad magic, a truncated payload, EOF, a write
//! too long to skip. Every other problem is an error reply and the connection goes on.

use std::io::{self, IoSlice};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use blockferry_protocol::nbd::consts::*;
use blockferry_protocol::nbd::{
    encode_block_status, encode_error_chunk, encode_none, encode_offset_data_header,
    encode_simple_reply, payload_action, validate, BlockDescriptor, Command, HandshakeEvent,
    Negotiated, PayloadAction, Request, RequestHeader, ServerHandshake, TransmissionParams,
};
use bytes::{Buf, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use super::{Export, Exports, Shared, HANDSHAKE_TIMEOUT};
use crate::cbt::{CbtError, Tracker, WriteGuard};
use crate::engine::{Engine, EngineError, IoBuf};
use crate::repl::capture::{Capture, CaptureGuard};
use crate::stats::IoStats;

/// Bytes read from the socket at a time into the request buffer (allocated when the
/// transmission phase starts, not before).
const READ_CHUNK: usize = 128 * 1024;
/// In-flight budget per connection, in units of 4 KiB plus one unit per request: 64 MiB of
/// payloads (two maximal requests) or 16384 small requests.
const BUDGET_UNITS: u32 = 16 * 1024;
/// Payloads up to this size are copied into the writer's batch buffer; larger ones are sent
/// from their own buffer by a vectored write.
const COPY_MAX: usize = 16 * 1024;
/// Replies carrying at least this many payload bytes are written with the worker handed to
/// another thread meanwhile (`block_in_place`).
const OFFLOAD_MIN: usize = 256 * 1024;
/// Most replies written in one batch.
const BATCH_MAX: usize = 256;
/// Most block status descriptors per reply (the spec lets the server describe less than asked).
const MAX_DESCRIPTORS: usize = 4096;

/// Why a connection ended abnormally (logged, never affects other connections).
#[derive(Debug, Error)]
pub(crate) enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("handshake: {0}")]
    Handshake(#[from] blockferry_protocol::nbd::HandshakeError),
    #[error("handshake timed out after {HANDSHAKE_TIMEOUT:?}")]
    HandshakeTimeout,
    #[error("client closed the connection during the handshake")]
    HandshakeEof,
    #[error("client sent data before the TLS handshake after STARTTLS")]
    DataBeforeTls,
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    #[error("{0}")]
    Decode(#[from] blockferry_protocol::nbd::DecodeError),
    #[error("stream ended inside a request ({0} bytes of it were received)")]
    Truncated(usize),
    #[error("WRITE of {0} bytes is too long to skip; closing")]
    WriteTooLong(u32),
}

/// A stream that can be split into independently owned read and write halves.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;
    fn split(self) -> (Self::Read, Self::Write);
}

impl Transport for TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn split(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl Transport for UnixStream {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    fn split(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl<S: Transport> Transport for tokio_rustls::server::TlsStream<S> {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;
    fn split(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
}

/// Serves one accepted connection to its end; errors are logged here.
pub(crate) async fn handle<S: Transport>(
    stream: S,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    peer: String,
) {
    debug!(%peer, "connection accepted");
    match run(stream, shared, stop, &peer).await {
        Ok(()) => debug!(%peer, "connection closed"),
        Err(e) => info!(%peer, "connection closed: {e}"),
    }
}

async fn run<S: Transport>(
    mut stream: S,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    peer: &str,
) -> Result<(), ConnError> {
    let mut rbuf = BytesMut::new();
    let mut hs = ServerHandshake::new(shared.exports.clone(), shared.handshake);
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, negotiate(&mut stream, &mut hs, &mut rbuf))
        .await
        .map_err(|_| ConnError::HandshakeTimeout)??;
    match first {
        HandshakeEvent::Ready(n) => transmission(stream, rbuf, n, &shared, stop, peer).await,
        HandshakeEvent::Abort => Ok(()),
        HandshakeEvent::StartTls => {
            if !rbuf.is_empty() {
                return Err(ConnError::DataBeforeTls);
            }
            let Some(acceptor) = shared.tls.clone() else {
                return Err(ConnError::DataBeforeTls); // unreachable: STARTTLS needs tls_available
            };
            let mut tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                .await
                .map_err(|_| ConnError::HandshakeTimeout)?
                .map_err(ConnError::Tls)?;
            hs.tls_established();
            let next =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, negotiate(&mut tls, &mut hs, &mut rbuf))
                    .await
                    .map_err(|_| ConnError::HandshakeTimeout)??;
            match next {
                HandshakeEvent::Ready(n) => transmission(tls, rbuf, n, &shared, stop, peer).await,
                _ => Ok(()),
            }
        }
    }
}

/// Pumps bytes between the socket and the handshake machine until it reports an event.
async fn negotiate<S, C>(
    s: &mut S,
    hs: &mut ServerHandshake<C>,
    rbuf: &mut BytesMut,
) -> Result<HandshakeEvent, ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    C: blockferry_protocol::nbd::ExportCatalog,
{
    loop {
        let r = hs.handle_input(rbuf);
        let out = hs.take_output();
        if !out.is_empty() {
            s.write_all(&out).await?;
            s.flush().await?;
        }
        match r? {
            Some(ev) => return Ok(ev),
            None => {
                rbuf.reserve(4096);
                if s.read_buf(rbuf).await? == 0 {
                    return Err(ConnError::HandshakeEof);
                }
            }
        }
    }
}

/// What one request produced.
enum Body {
    Ok,
    Data { offset: u64, buf: IoBuf },
    Err { errno: u32, msg: String },
    Extents(Vec<(u32, Vec<BlockDescriptor>)>),
}

struct Reply {
    cookie: u64,
    body: Body,
    /// Released once the reply is written: in-flight memory includes queued replies.
    _permit: Option<OwnedSemaphorePermit>,
}

/// Metadata contexts the data path can answer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ContextKind {
    BaseAllocation,
    /// `qemu:dirty-bitmap:NAME`: change-tracking bitmap NAME of the volume, and the identity
    /// it had when the client attached (0: it did not exist then), so a bitmap removed and
    /// created again under the same name is not mistaken for the one the client selected.
    DirtyBitmap(String, u64),
}

impl ContextKind {
    /// The kind of a context the handshake selected (it offers no other names).
    fn of(name: &str, tracker: Option<&Tracker>) -> Option<ContextKind> {
        match name {
            CONTEXT_BASE_ALLOCATION => Some(ContextKind::BaseAllocation),
            _ => name.strip_prefix(CONTEXT_DIRTY_BITMAP_PREFIX).map(|bitmap| {
                let id = tracker.and_then(|t| t.bitmap_id(bitmap)).unwrap_or(0);
                ContextKind::DirtyBitmap(bitmap.to_string(), id)
            }),
        }
    }
}

/// What every request task of a connection needs.
struct Ctx {
    engine: Arc<Engine>,
    tracker: Option<Arc<Tracker>>,
    /// The volume's epoch buffer when it is replicated asynchronously.
    capture: Option<Arc<Capture>>,
    stats: Arc<IoStats>,
    contexts: Vec<(u32, ContextKind)>,
}

async fn transmission<S: Transport>(
    stream: S,
    mut rbuf: BytesMut,
    n: Negotiated,
    shared: &Shared,
    mut stop: watch::Receiver<bool>,
    peer: &str,
) -> Result<(), ConnError> {
    let exports: &Exports = &shared.exports;
    let Export { engine, stats, tracker, capture, .. } = &exports.exports[n.export];
    info!(%peer, export = %n.name, structured = n.structured_replies, tls = n.tls, "client attached");
    let contexts: Vec<(u32, ContextKind)> = n
        .meta_contexts
        .iter()
        .filter_map(|c| Some((c.id, ContextKind::of(&c.name, tracker.as_deref())?)))
        .collect();
    let params = TransmissionParams {
        size: n.size,
        transmission_flags: n.transmission_flags,
        structured_replies: n.structured_replies,
        // One BLOCK_STATUS chunk per context answered.
        meta_contexts: contexts.len(),
        min_block_size: n.block_size_negotiated.then_some(n.block_sizes.min),
        max_payload: n.block_sizes.max,
    };
    let ctx = Arc::new(Ctx {
        engine: engine.clone(),
        tracker: tracker.clone(),
        capture: capture.clone(),
        stats: stats.clone(),
        contexts,
    });
    let (mut reader, writer) = stream.split();
    let (tx, rx) = mpsc::unbounded_channel();
    let budget = Arc::new(Semaphore::new(BUDGET_UNITS as usize));
    let writer = tokio::spawn(write_replies(writer, rx, n.structured_replies, budget.clone()));
    stats.connections.fetch_add(1, Relaxed);
    let result =
        read_requests(&mut reader, &mut rbuf, &params, &ctx, &tx, &budget, &mut stop).await;
    // Stop reading; in-flight requests hold clones of `tx`: the writer ends after their
    // replies are written.
    drop(tx);
    match writer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(%peer, "writing replies failed: {e}"),
        Err(e) => warn!(%peer, "reply writer failed: {e}"),
    }
    stats.connections.fetch_sub(1, Relaxed);
    result
}

/// After a WRITE payload of at least this size, the next header is read on its own (no
/// read-ahead): a stream of large writes would otherwise pull up to [`READ_CHUNK`] of the next
/// payload into the request buffer and copy it a second time into the payload's `IoBuf`.
const BIG_PAYLOAD: u32 = 64 * 1024;

/// Fills `rbuf` with at least one more byte and at most `max`; `Ok(false)` at EOF, and on
/// server shutdown.
async fn fill<R: AsyncRead + Unpin>(
    reader: &mut R,
    rbuf: &mut BytesMut,
    stop: &mut watch::Receiver<bool>,
    max: usize,
) -> io::Result<bool> {
    rbuf.reserve(READ_CHUNK);
    if *stop.borrow() {
        return Ok(false);
    }
    let mut limited = (&mut *reader).take(max as u64);
    tokio::select! {
        r = limited.read_buf(rbuf) => Ok(r? > 0),
        _ = stop.changed() => Ok(false),
    }
}

async fn read_requests<R: AsyncRead + Unpin>(
    reader: &mut R,
    rbuf: &mut BytesMut,
    params: &TransmissionParams,
    ctx: &Arc<Ctx>,
    tx: &mpsc::UnboundedSender<Reply>,
    budget: &Arc<Semaphore>,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), ConnError> {
    let mut read_ahead = READ_CHUNK;
    loop {
        let hdr = loop {
            if let Some(h) = RequestHeader::decode(rbuf)? {
                break h;
            }
            if !fill(reader, rbuf, stop, read_ahead).await? {
                return if rbuf.is_empty() {
                    Ok(())
                } else {
                    Err(ConnError::Truncated(rbuf.len()))
                };
            }
        };
        let valid = validate(&hdr, params);
        let weight = match hdr.kind {
            CMD_READ | CMD_WRITE if valid.is_ok() => 1 + hdr.length / 4096,
            _ => 1,
        };
        // Backpressure: wait here (not reading) until earlier requests are answered.
        let permit = budget.clone().acquire_many_owned(weight).await.ok();
        let mut payload = None;
        let action = payload_action(&hdr, valid.is_ok());
        read_ahead = match action {
            PayloadAction::Read(len) if len >= BIG_PAYLOAD => REQUEST_HEADER_LEN,
            _ => READ_CHUNK,
        };
        match action {
            PayloadAction::None => {}
            PayloadAction::Read(len) => payload = Some(read_payload(reader, rbuf, len).await?),
            PayloadAction::Discard(len) => discard(reader, rbuf, len).await?,
            PayloadAction::Close => {
                let e = valid.as_ref().err().map(|e| (e.errno(), e.to_string()));
                let (errno, msg) = e.unwrap_or((errno::EINVAL, String::new()));
                ctx.stats.errors.fetch_add(1, Relaxed);
                let _ = tx.send(Reply {
                    cookie: hdr.cookie,
                    body: Body::Err { errno, msg },
                    _permit: permit,
                });
                return Err(ConnError::WriteTooLong(hdr.length));
            }
        }
        let req = match valid {
            Ok(req) => req,
            Err(e) => {
                debug!(cookie = hdr.cookie, "request refused: {e}");
                ctx.stats.errors.fetch_add(1, Relaxed);
                let body = Body::Err { errno: e.errno(), msg: e.to_string() };
                let _ = tx.send(Reply { cookie: hdr.cookie, body, _permit: permit });
                continue;
            }
        };
        if req.command == Command::Disc {
            return Ok(()); // drain in-flight requests, then close
        }
        let small = req.length < BIG_PAYLOAD;
        let (ctx, tx) = (ctx.clone(), tx.clone());
        let run = async move {
            let body = execute(&req, payload, &ctx).await;
            let _ = tx.send(Reply { cookie: req.cookie, body, _permit: permit });
        };
        if !small {
            tokio::spawn(run);
            continue;
        }
        // A small request is first run right here: a page-cache hit (writeback) completes in
        // this one poll, with no task to spawn and no other worker to wake; otherwise its I/O
        // has been submitted and the rest runs as a task. The first poll's waker is a no-op:
        // every future re-registers its waker when polled, and the spawned task polls again.
        let mut run = Box::pin(run);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if std::future::Future::poll(run.as_mut(), &mut cx).is_pending() {
            tokio::spawn(run);
        }
    }
}

/// Reads a WRITE payload into an aligned buffer: what is already buffered is copied, the
/// rest is read straight into the buffer.
async fn read_payload<R: AsyncRead + Unpin>(
    reader: &mut R,
    rbuf: &mut BytesMut,
    len: u32,
) -> Result<IoBuf, ConnError> {
    let len = len as usize;
    let mut buf = IoBuf::for_overwrite(len);
    let have = len.min(rbuf.len());
    buf.as_mut_slice()[..have].copy_from_slice(&rbuf[..have]);
    rbuf.advance(have);
    if have < len {
        reader.read_exact(&mut buf.as_mut_slice()[have..]).await.map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                ConnError::Truncated(have)
            } else {
                ConnError::Io(e)
            }
        })?;
    }
    Ok(buf)
}

/// Skips the payload of a refused WRITE.
async fn discard<R: AsyncRead + Unpin>(
    reader: &mut R,
    rbuf: &mut BytesMut,
    len: u32,
) -> Result<(), ConnError> {
    let mut left = len as usize;
    loop {
        let n = left.min(rbuf.len());
        rbuf.advance(n);
        left -= n;
        if left == 0 {
            return Ok(());
        }
        rbuf.reserve(READ_CHUNK);
        if reader.read_buf(rbuf).await? == 0 {
            return Err(ConnError::Truncated(len as usize - left));
        }
    }
}

fn engine_err(stats: &IoStats, req: &Request, e: EngineError) -> Body {
    stats.errors.fetch_add(1, Relaxed);
    debug!(cookie = req.cookie, "{} failed: {e}", req.command.name());
    Body::Err { errno: e.errno(), msg: e.to_string() }
}

async fn execute(req: &Request, payload: Option<IoBuf>, ctx: &Ctx) -> Body {
    let (engine, stats) = (&*ctx.engine, &*ctx.stats);
    let (offset, len) = (req.offset, req.length);
    let r: Result<Body, EngineError> = async {
        match req.command {
            Command::Read => {
                let buf = engine.read(offset, len as usize).await?;
                stats.read(u64::from(len));
                Ok(Body::Data { offset, buf })
            }
            Command::Write { fua } => {
                if let Some(buf) = payload {
                    // Order: capture begin, tracking begin, disk, capture, tracking end (see
                    // `capture_begin`). A failed write captures nothing.
                    let captured = capture_begin(ctx, offset, u64::from(len)).await;
                    let tracked = track(ctx, offset, u64::from(len)).await?;
                    let buf = engine.write(offset, buf, fua).await?;
                    let wait = captured.and_then(|g| g.data(buf.as_slice()));
                    drop(tracked);
                    sync_ack("write", offset, u64::from(len), wait).await?;
                }
                stats.write(u64::from(len));
                Ok(Body::Ok)
            }
            Command::Flush => {
                engine.flush().await?;
                stats.flushes.fetch_add(1, Relaxed);
                Ok(Body::Ok)
            }
            Command::Trim { fua } => {
                for (at, n) in pieces(ctx, offset, u64::from(len)) {
                    let captured = capture_begin(ctx, at, n).await;
                    let tracked = track(ctx, at, n).await?;
                    engine.trim(at, n).await?;
                    let wait = captured.and_then(|g| g.zero());
                    drop(tracked);
                    sync_ack("trim", at, n, wait).await?;
                }
                if fua {
                    engine.flush().await?;
                }
                stats.trims.fetch_add(1, Relaxed);
                Ok(Body::Ok)
            }
            Command::WriteZeroes { fua, no_hole, fast } => {
                for (at, n) in pieces(ctx, offset, u64::from(len)) {
                    let captured = capture_begin(ctx, at, n).await;
                    let tracked = track(ctx, at, n).await?;
                    engine.write_zeroes(at, n, no_hole, fast).await?;
                    let wait = captured.and_then(|g| g.zero());
                    drop(tracked);
                    sync_ack("write zeroes", at, n, wait).await?;
                }
                if fua {
                    engine.flush().await?;
                }
                stats.zeroes.fetch_add(1, Relaxed);
                Ok(Body::Ok)
            }
            Command::Cache => {
                engine.cache(offset, u64::from(len)).await?;
                Ok(Body::Ok)
            }
            Command::BlockStatus { req_one } => {
                let mut chunks = Vec::with_capacity(ctx.contexts.len());
                for (id, kind) in &ctx.contexts {
                    let descs = match kind {
                        ContextKind::BaseAllocation => {
                            allocation(engine, offset, len, req_one).await?
                        }
                        ContextKind::DirtyBitmap(name, bitmap_id) => {
                            let tracker = ctx.tracker.as_deref();
                            match dirty_bitmap(tracker, name, *bitmap_id, offset, len, req_one) {
                                Ok(descs) => descs,
                                Err((errno, msg)) => {
                                    stats.errors.fetch_add(1, Relaxed);
                                    debug!(cookie = req.cookie, "BLOCK_STATUS failed: {msg}");
                                    return Ok(Body::Err { errno, msg });
                                }
                            }
                        }
                    };
                    chunks.push((*id, descs));
                }
                Ok(Body::Extents(chunks))
            }
            Command::Disc => Ok(Body::Ok),
        }
    }
    .await;
    r.unwrap_or_else(|e| engine_err(stats, req, e))
}

/// `[offset, offset + len)` cut where change tracking needs it: a trim or zeroing may cover up
/// to 4 GiB, more than one tracked request may span ([`Tracker::max_span`]), so it is done in
/// pieces aligned to that span. Without tracking, one piece.
fn pieces(ctx: &Ctx, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
    let span = ctx.tracker.as_ref().map_or(u64::MAX, |t| t.max_span());
    let end = offset + len;
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let next = if span == u64::MAX { end } else { ((at / span + 1) * span).min(end) };
        let piece = (at, next - at);
        at = next;
        Some(piece)
    })
}

/// Marks `[offset, offset + len)` changed before the data reaches the disk (DESIGN.md, primary
/// write path step 3); the guard completes the tracking when the operation is done.
async fn track(ctx: &Ctx, offset: u64, len: u64) -> Result<Option<WriteGuard<'_>>, EngineError> {
    match &ctx.tracker {
        Some(t) if len > 0 => match t.begin_write(offset, len).await {
            Ok(g) => Ok(Some(g)),
            Err(e) => Err(EngineError::Tracking(e)),
        },
        _ => Ok(None),
    }
}

/// Starts capturing a write, trim or zeroing of `[offset, offset + len)` for async
/// replication (DESIGN.md, primary write path step 5): waits while an overlapping write is in
/// flight, so overlapping writes reach the disk and the epoch buffer in the same order. Taken
/// before [`track`], and the guard is used (`data`/`zero`) before the tracking guard is
/// dropped: a bitmap clear racing with the write then either sees the block in the buffer or
/// is undone by the tracking guard's end. Without replication: nothing, not even a wait.
async fn capture_begin(ctx: &Ctx, offset: u64, len: u64) -> Option<CaptureGuard<'_>> {
    match &ctx.capture {
        Some(c) => Some(c.begin(offset, len).await),
        None => None,
    }
}

/// Sync replication: waits until the target has the completed write `op` durably (or the
/// volume's policy answers otherwise) before it is acknowledged. A write the policy fails
/// (`block`, the target stayed away) is an I/O error to the client, though it is on the local
/// disk: it was not acknowledged, and the bitmap sends it when the target is back.
async fn sync_ack(
    op: &'static str,
    offset: u64,
    len: u64,
    wait: Option<crate::repl::capture::SyncWait>,
) -> Result<(), EngineError> {
    use crate::repl::capture::SyncOutcome;
    match wait {
        None => Ok(()),
        Some(w) => match w.outcome().await {
            SyncOutcome::Durable | SyncOutcome::Degraded => Ok(()),
            SyncOutcome::Failed(reason) => Err(EngineError::Io {
                op,
                offset,
                len,
                source: std::io::Error::other(format!("sync replication: {reason}")),
            }),
        },
    }
}

/// `base:allocation` descriptors for `[offset, offset + len)`: holes read as zeros.
async fn allocation(
    engine: &Engine,
    offset: u64,
    len: u32,
    req_one: bool,
) -> Result<Vec<BlockDescriptor>, EngineError> {
    let extents = engine.allocation(offset, u64::from(len)).await?;
    let mut descs: Vec<BlockDescriptor> = Vec::new();
    let mut left = u64::from(len);
    for e in extents {
        let n = e.len.min(left);
        if n == 0 {
            continue;
        }
        left -= n;
        let flags = if e.hole { STATE_HOLE | STATE_ZERO } else { 0 };
        match descs.last_mut() {
            // n <= len <= u32::MAX, and merged lengths never exceed len.
            Some(last) if last.flags == flags => last.length += n as u32,
            _ => {
                if (req_one && !descs.is_empty()) || descs.len() >= MAX_DESCRIPTORS {
                    break;
                }
                descs.push(BlockDescriptor { length: n as u32, flags });
            }
        }
        if left == 0 {
            break;
        }
    }
    if descs.is_empty() {
        // Status 0 ("allocated, contents unknown") is always a correct answer.
        descs.push(BlockDescriptor { length: len, flags: 0 });
    }
    Ok(descs)
}

/// `qemu:dirty-bitmap:NAME` descriptors for `[offset, offset + len)`, with qemu's meaning:
/// flag [`STATE_DIRTY`] on runs that changed since bitmap `name` was created or last cleared, 0
/// on clean runs. At most one descriptor with REQ_ONE, else at most [`MAX_DESCRIPTORS`]; the
/// answer may stop short of `len` (the client asks again from there) but never goes past it.
///
/// The tracker's lock is held for the length of one `status` call, so this runs inline.
/// A bitmap removed after the client selected it is an EINVAL error, never a "clean" answer:
/// a backup tool reading "clean" would skip data that changed.
fn dirty_bitmap(
    tracker: Option<&Tracker>,
    name: &str,
    bitmap_id: u64,
    offset: u64,
    len: u32,
    req_one: bool,
) -> Result<Vec<BlockDescriptor>, (u32, String)> {
    let Some(tracker) = tracker else {
        // Unreachable: bitmaps are offered only for volumes with change tracking.
        let msg = format!("{CONTEXT_DIRTY_BITMAP_PREFIX}{name}: the volume has no change tracking");
        return Err((errno::EINVAL, msg));
    };
    let max_runs = if req_one { 1 } else { MAX_DESCRIPTORS };
    let runs = tracker.status_of(name, Some(bitmap_id), offset, u64::from(len), max_runs);
    let runs = runs.map_err(|e| match e {
        CbtError::NoSuchBitmap { .. } => (
            e.errno(),
            format!(
                "bitmap {name:?} of volume {:?} was removed (or replaced) after this connection \
                 selected {CONTEXT_DIRTY_BITMAP_PREFIX}{name}; reconnect and select an existing bitmap",
                tracker.volume()
            ),
        ),
        e => (e.errno(), e.to_string()),
    })?;
    // The tracker promises alternating runs inside the range; merging equal neighbours and
    // cutting at `len` keeps the reply within the spec whatever it returns.
    let mut descs: Vec<BlockDescriptor> = Vec::new();
    let mut left = u64::from(len);
    for (n, dirty) in runs {
        let n = n.min(left);
        if n == 0 {
            continue;
        }
        left -= n;
        let flags = if dirty { STATE_DIRTY } else { 0 };
        match descs.last_mut() {
            // n <= len <= u32::MAX, and merged lengths never exceed len.
            Some(last) if last.flags == flags => last.length += n as u32,
            _ => {
                if descs.len() >= max_runs {
                    break;
                }
                descs.push(BlockDescriptor { length: n as u32, flags });
            }
        }
        if left == 0 {
            break;
        }
    }
    if descs.is_empty() {
        // The tracker described nothing (it must describe at least one run): "dirty" is the
        // answer that can only cost a backup extra copying, never a missed change.
        descs.push(BlockDescriptor { length: len, flags: STATE_DIRTY });
    }
    Ok(descs)
}

/// Appends the wire form of `reply` to `out`; a large data payload is left in `big` to be
/// written from its own buffer at position `out.len()`.
fn encode(
    cookie: u64,
    body: Body,
    structured: bool,
    out: &mut BytesMut,
    big: &mut Vec<(usize, IoBuf)>,
) {
    match body {
        Body::Ok => encode_simple_reply(out, cookie, 0),
        Body::Err { errno, msg } => {
            if structured {
                encode_error_chunk(out, cookie, errno, &msg, true);
            } else {
                encode_simple_reply(out, cookie, errno);
            }
        }
        Body::Data { offset, buf } => {
            if structured && buf.is_empty() {
                encode_none(out, cookie);
                return;
            }
            if structured {
                encode_offset_data_header(out, cookie, offset, buf.len() as u32, true);
            } else {
                encode_simple_reply(out, cookie, 0);
            }
            if buf.len() <= COPY_MAX {
                out.extend_from_slice(buf.as_slice());
            } else {
                big.push((out.len(), buf));
            }
        }
        Body::Extents(chunks) => {
            let last = chunks.len().saturating_sub(1);
            for (i, (id, descs)) in chunks.iter().enumerate() {
                encode_block_status(out, cookie, *id, descs, i == last);
            }
            if chunks.is_empty() {
                encode_none(out, cookie);
            }
        }
    }
}

/// Writes replies as they come, batching every reply already queued into one write.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    structured: bool,
    budget: Arc<Semaphore>,
) -> io::Result<()> {
    let mut out = BytesMut::new();
    let mut big = Vec::new();
    let mut batch = Vec::new();
    let mut permits = Vec::new();
    let rt = tokio::runtime::Handle::current();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        drain(&mut rx, &mut batch);
        if others_in_flight(&budget, &batch) {
            // Requests answered together (a sync `Durable` covering several writes, a batch
            // of io_uring completions) wake their tasks one by one, and this writer, woken by
            // the first, would run before the others had queued their replies: one send per
            // reply. Yielding once lets the tasks already woken queue theirs first.
            tokio::task::yield_now().await;
            drain(&mut rx, &mut batch);
        }
        for Reply { cookie, body, _permit } in batch.drain(..) {
            encode(cookie, body, structured, &mut out, &mut big);
            permits.push(_permit);
        }
        let big_bytes: usize = big.iter().map(|(_, b)| b.len()).sum();
        if big_bytes >= OFFLOAD_MIN
            && rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
        {
            tokio::task::block_in_place(|| rt.block_on(write_all_vectored(&mut w, &out, &big)))?;
        } else {
            write_all_vectored(&mut w, &out, &big).await?;
        }
        w.flush().await?;
        out.clear();
        big.clear();
        permits.clear(); // releases the budget of these requests
    }
    w.shutdown().await
}

/// Adds what is queued to `batch`, up to [`BATCH_MAX`] replies.
fn drain(rx: &mut mpsc::UnboundedReceiver<Reply>, batch: &mut Vec<Reply>) {
    while batch.len() < BATCH_MAX {
        match rx.try_recv() {
            Ok(r) => batch.push(r),
            Err(_) => break,
        }
    }
}

/// Whether requests other than those of `batch` hold budget: executing, or their replies
/// not queued yet. Not asked for a batch that carries a large read: its send is mostly the
/// copy, and yielding would let the other reads' copies run first and hold it back.
fn others_in_flight(budget: &Semaphore, batch: &[Reply]) -> bool {
    let large =
        |r: &Reply| matches!(&r.body, Body::Data { buf, .. } if buf.len() >= BIG_PAYLOAD as usize);
    if batch.len() >= BATCH_MAX || batch.iter().any(large) {
        return false;
    }
    let held = BUDGET_UNITS as usize - budget.available_permits();
    let mine: usize =
        batch.iter().filter_map(|r| r._permit.as_ref()).map(|p| p.num_permits()).sum();
    held > mine
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    out: &[u8],
    big: &[(usize, IoBuf)],
) -> io::Result<()> {
    if big.is_empty() {
        return w.write_all(out).await;
    }
    let mut slices = Vec::with_capacity(2 * big.len() + 1);
    let mut pos = 0;
    for (at, buf) in big {
        if *at > pos {
            slices.push(IoSlice::new(&out[pos..*at]));
        }
        slices.push(IoSlice::new(buf.as_slice()));
        pos = *at;
    }
    if pos < out.len() {
        slices.push(IoSlice::new(&out[pos..]));
    }
    let mut s = &mut slices[..];
    while !s.is_empty() {
        let n = w.write_vectored(s).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut s, n);
    }
    Ok(())
}

#[cfg(test)]
mod capture_tests {
    //! The replication hook of the write path: what reached the disk is what is captured.
    use super::*;
    use crate::engine::{CacheMode, EngineKind, EngineOptions};
    use crate::repl::capture::Block;
    use crate::volume::Volume;

    const SIZE: u64 = 1 << 20;
    const BS: u64 = 4096;

    fn ctx(dir: &std::path::Path, capture: Option<Arc<Capture>>, read_only: bool) -> Ctx {
        let vdir = dir.join("vol");
        let volume = match Volume::open(&vdir) {
            Ok(v) => v,
            Err(_) => Volume::create(&vdir, SIZE, BS, Some("v")).unwrap(),
        };
        let options =
            EngineOptions { kind: EngineKind::Sync, cache: CacheMode::Writeback, read_only };
        let engine = Engine::open(&volume.image_path(), options).unwrap();
        let tracker = Tracker::open(&volume, crate::cbt::TrackerOptions::default()).unwrap();
        tracker.create("repl").unwrap_or_else(|_| tracker.info("repl").unwrap());
        let stats = Arc::new(IoStats::default());
        Ctx { engine, tracker: Some(tracker), capture, stats, contexts: Vec::new() }
    }

    async fn run(ctx: &Ctx, command: Command, offset: u64, data: &[u8], len: u32) -> bool {
        let req = Request { cookie: 1, offset, length: len, command };
        let payload = (!data.is_empty()).then(|| IoBuf::from_slice(data));
        matches!(execute(&req, payload, ctx).await, Body::Ok)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_trims_and_zeroings_are_captured() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Capture::new(SIZE, BS as u32, 1 << 20);
        c.set_buffering(true);
        let ctx = ctx(tmp.path(), Some(c.clone()), false);
        let tracker = ctx.tracker.clone().unwrap();
        let data: Vec<u8> = (0..3 * BS).map(|i| (i % 253) as u8).collect();
        assert!(run(&ctx, Command::Write { fua: false }, 0, &data, data.len() as u32).await);
        assert!(run(&ctx, Command::Trim { fua: false }, 4 * BS, &[], 2 * BS as u32).await);
        let zeroes = Command::WriteZeroes { fua: true, no_hole: true, fast: false };
        assert!(run(&ctx, zeroes, 8 * BS, &[], BS as u32).await);
        // The buffered blocks keep their bits when the bitmap is cleared behind them.
        let keep = |b| c.newest_holder(b).is_some();
        tracker.clear_blocks("repl", 0, SIZE / BS, keep).unwrap();
        let dirty: Vec<(u64, u64)> = tracker.dirty_runs("repl", 0, u64::MAX).unwrap();
        assert_eq!(dirty, vec![(0, 3), (4, 2), (8, 1)]);

        let e = c.close_epoch().unwrap();
        for b in 0..3 {
            let want = &data[(b * BS) as usize..((b + 1) * BS) as usize];
            match e.get(b) {
                Some(Block::Data { data, crc }) => {
                    assert_eq!(&data[..], want);
                    assert_eq!(crc, crc32c::crc32c(want));
                }
                other => panic!("block {b}: {other:?}"),
            }
        }
        for b in [4, 5, 8] {
            assert_eq!(e.get(b), Some(Block::Zero), "block {b}");
        }
        assert_eq!(e.block_count(), 6);
        // Committed: released, the bits go.
        c.release(&e);
        tracker.clear_blocks("repl", 0, SIZE / BS, |b| c.newest_holder(b).is_some()).unwrap();
        assert_eq!(tracker.dirty_runs("repl", 0, u64::MAX).unwrap(), vec![]);
        tracker.close().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_write_captures_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        drop(ctx(tmp.path(), None, false)); // creates the volume
        let c = Capture::new(SIZE, BS as u32, 1 << 20);
        c.set_buffering(true);
        let ctx = ctx(tmp.path(), Some(c.clone()), true);
        assert!(!run(&ctx, Command::Write { fua: false }, 0, &[1; BS as usize], BS as u32).await);
        assert!(c.close_epoch().is_none());
        // The failed write released its range: the next one does not wait.
        let g = tokio::time::timeout(std::time::Duration::from_secs(5), c.begin(0, BS)).await;
        drop(g.expect("no write in flight"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bind_with_attaches_matching_captures_only() {
        use crate::config::{Config, VolumeConfig};
        use crate::nbd::{ServeError, Server};
        use std::collections::HashMap;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("vol");
        Volume::create(&dir, SIZE, BS, Some("v")).unwrap();
        let config = Config {
            unix: Some(tmp.path().join("nbd.sock")),
            volumes: vec![VolumeConfig::new(&dir)],
            ..Config::default()
        };
        let bind = |name: &str, size: u64| {
            let captures = HashMap::from([(name.to_string(), Capture::new(size, BS as u32, 1))]);
            Server::bind_with(&config, captures)
        };
        let e = bind("v", 2 * SIZE).await.unwrap_err();
        assert!(matches!(&e, ServeError::Replication { name, .. } if name == "v"), "{e}");
        let e = bind("nope", SIZE).await.unwrap_err();
        assert!(matches!(&e, ServeError::Replication { name, .. } if name == "nope"), "{e}");
        let server = bind("v", SIZE).await.unwrap();
        assert!(server.shared.exports.exports[0].capture.is_some());
        drop(server);
        let server = Server::bind(&config).await.unwrap();
        assert!(server.shared.exports.exports[0].capture.is_none());
    }
}
