//! The replication driver of one volume: pumps the sans-IO [`AgentSession`] with QUIC, the
//! epoch buffer ([`Capture`]), the image (catch-up reads) and the change-tracking bitmap.
//!
//! ```text
//!   NBD writes ─► Capture (epochs) ──► SendEpoch: one uni stream per epoch ─┐
//!            └──► Tracker bitmap "replication" ─► resync task: reads image ─┤──► target
//!   control stream (hello, committed, failed, hashes) ◄──── reader task ◄───┘
//! ```
//! One task owns the session and executes its actions in order; connection, epoch streams and
//! resync passes run in their own tasks and report back through one channel. Events of an
//! older connection are ignored (each carries the connection number). In sync mode the capture
//! also hands every write to this task at once, which streams it in the epoch's live sync batch
//! and answers it when the target has it (`live.rs`).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockferry_link::{Fingerprint, Identity};
use blockferry_protocol::repl::agent::{Action, AgentConfig, AgentSession, Clear, State};
use blockferry_protocol::repl::frame::{BatchWriter, Frame, DEFAULT_MAX_FRAME};
use blockferry_protocol::repl::msg::{self, AgentMsg, Hello, Mode, TargetMsg, VERSION};
use blockferry_protocol::repl::{
    BatchHeader, BatchKind, Compression, Epoch, Generation, Geometry, VolumeId,
};
use bytes::{Bytes, BytesMut};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use super::capture::{Capture, ClosedEpoch, RunContent};
use super::limiter::Limiter;
use super::verify::VerifyReport;
use crate::cbt::Tracker;
use crate::volume::Volume;
pub use live::ModeChange;

#[path = "live.rs"]
mod live;

/// The change-tracking bitmap that holds what the target does not have yet.
pub const BITMAP: &str = "replication";

/// How a volume replicates (config `[volume.replication]`).
#[derive(Debug, Clone)]
pub struct ReplicationOptions {
    pub target: SocketAddr,
    pub fingerprint: Fingerprint,
    pub mode: Mode,
    pub compression: Compression,
    /// Epoch buffer budget in bytes (default 256 MiB).
    pub budget: u64,
    pub epoch_interval: Duration,
    /// An epoch also closes when it holds this many bytes.
    pub epoch_bytes: u64,
    /// Bytes per second on the wire, if limited.
    pub bandwidth: Option<u64>,
    /// Sync mode: what writes do while the target is unreachable.
    pub on_disconnect: OnDisconnect,
    /// `OnDisconnect::Block`: how long a write waits for the target before it fails.
    pub block_timeout: Duration,
    /// Sync mode: a write the target has not made durable after this long counts as a
    /// disconnect.
    pub ack_timeout: Duration,
}

/// Sync mode's answer to an unreachable or too slow target (config `on-disconnect`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnDisconnect {
    /// Write on locally, tracked in the bitmap; resync and return to sync by itself (DRBD's
    /// behaviour).
    #[default]
    Degrade,
    /// Hold writes up to the block timeout, then fail them with EIO: no write is acknowledged
    /// that the DR site does not have.
    Block,
}

impl OnDisconnect {
    pub fn parse(s: &str) -> Option<OnDisconnect> {
        match s {
            "degrade" => Some(OnDisconnect::Degrade),
            "block" => Some(OnDisconnect::Block),
            _ => None,
        }
    }
}

impl ReplicationOptions {
    pub fn new(target: SocketAddr, fingerprint: Fingerprint) -> ReplicationOptions {
        ReplicationOptions {
            target,
            fingerprint,
            mode: Mode::Async,
            compression: Compression::Lz4,
            budget: 256 << 20,
            epoch_interval: Duration::from_secs(1),
            epoch_bytes: 64 << 20,
            bandwidth: None,
            on_disconnect: OnDisconnect::Degrade,
            block_timeout: Duration::from_secs(30),
            ack_timeout: Duration::from_secs(5),
        }
    }
}

/// What `status` shows of a volume's replication.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplStatus {
    pub volume: String,
    /// `sync` or `async`.
    pub mode: String,
    /// Sync mode's policy when the target is away: `degrade` or `block`.
    pub on_disconnect: String,
    pub target: String,
    /// `connecting`, `disconnected`, `initial-sync`, `behind`, `in-sync`, `stopped`; in sync
    /// mode `in-sync` (every write waits for the target), `syncing` (catching up before
    /// that), `degraded` or `blocked` (the target is away or was too slow, per policy).
    pub state: String,
    /// Why the state is what it is, when it is not in-sync (the last transition's reason).
    pub reason: Option<String>,
    /// Sync writes waiting for the target now.
    pub sync_waiting: u64,
    /// Sync writes failed with EIO (block policy, the target stayed away).
    pub sync_failed: u64,
    /// Bytes of the volume the target does not have yet (dirty blocks of the bitmap).
    pub lag_bytes: u64,
    /// Epochs closed and not committed.
    pub lag_epochs: u64,
    /// Age of the oldest write the target has not committed (0 when none).
    pub rpo_seconds: f64,
    pub last_committed_epoch: u64,
    /// Block bytes shipped / bytes on the wire (payload + frame headers).
    pub data_bytes_sent: u64,
    pub wire_bytes_sent: u64,
    pub compression_ratio: f64,
    /// Wire bytes per second over the last few seconds.
    pub throughput_bps: f64,
    pub buffered_bytes: u64,
    pub resync: Option<ResyncStatus>,
    /// The latest verify run's progress: bytes compared of the volume's.
    pub verify: Option<VerifyStatus>,
    pub last_error: Option<String>,
    pub connects: u64,
    pub disconnects: u64,
    pub overflows: u64,
    pub epochs_sent: u64,
    pub commits: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyStatus {
    pub done_bytes: u64,
    pub total_bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ResyncStatus {
    pub kind: String,
    pub id: u64,
    pub phase: String,
    /// Bytes read and looked at so far / in the current pass's set at its start.
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub sent_bytes: u64,
    pub skipped_bytes: u64,
}

/// A running replication: its status, and a way to ask for an epoch boundary now.
#[derive(Debug, Clone)]
pub struct Replicator {
    status: Arc<Mutex<ReplStatus>>,
    close: mpsc::UnboundedSender<()>,
    mode: mpsc::UnboundedSender<(Mode, oneshot::Sender<ModeChange>)>,
    verify: mpsc::UnboundedSender<oneshot::Sender<Result<VerifyReport, String>>>,
}

impl Replicator {
    pub fn status(&self) -> ReplStatus {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Closes the open epoch now (a flush barrier or a quiesce point).
    pub fn close_epoch(&self) {
        let _ = self.close.send(());
    }

    /// Switches the volume between sync and async replication, live (`blockferry volume
    /// set-mode`): to sync, the volume reports `syncing` until the replica is current, then
    /// every write waits for the target; to async, at once.
    pub async fn set_mode(&self, mode: Mode) -> Result<ModeChange, String> {
        let (tx, rx) = oneshot::channel();
        self.mode.send((mode, tx)).map_err(|_| "replication is not running".to_string())?;
        rx.await.map_err(|_| "replication stopped during the mode change".to_string())
    }

    /// Compares the source with the replica by hashes (see [`super::verify`]).
    pub async fn verify(&self) -> Result<VerifyReport, String> {
        let (tx, rx) = oneshot::channel();
        self.verify.send(tx).map_err(|_| "replication is not running".to_string())?;
        rx.await.map_err(|_| "replication stopped during verify".to_string())?
    }
}

/// Everything the driver needs of the volume.
#[derive(Debug, Clone)]
pub struct VolumeParts {
    pub volume: Volume,
    pub generation: Generation,
    pub tracker: Arc<Tracker>,
    pub capture: Arc<Capture>,
}

#[derive(Debug)]
enum Event {
    Connected { conn: u64, connection: quinn::Connection, control: quinn::SendStream },
    ConnectFailed { conn: u64, reason: String },
    Control { conn: u64, msg: TargetMsg },
    Lost { conn: u64, reason: String },
    Progress { id: Epoch, remaining: u64 },
    ReadDone { id: Epoch },
    ResyncFailed { id: Epoch, reason: String },
}

#[derive(Default, Debug)]
pub(super) struct Counters {
    pub data: AtomicU64,
    pub wire: AtomicU64,
}

/// Shared with the resync task: its progress for status.
#[derive(Default, Debug)]
pub(super) struct ResyncProgress {
    pub done: AtomicU64,
    pub total: AtomicU64,
    pub sent: AtomicU64,
    pub skipped: AtomicU64,
}

struct Running {
    id: Epoch,
    kind: BatchKind,
    end: Option<oneshot::Sender<Epoch>>,
    hashes: mpsc::UnboundedSender<TargetMsg>,
    progress: Arc<ResyncProgress>,
    task: tokio::task::JoinHandle<()>,
}

struct Driver {
    parts: VolumeParts,
    opts: ReplicationOptions,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    session: AgentSession,
    events_tx: mpsc::UnboundedSender<Event>,
    conn_no: u64,
    connection: Option<(quinn::Connection, quinn::SendStream)>,
    retained: BTreeMap<u64, Arc<ClosedEpoch>>,
    resyncs: HashMap<Epoch, Running>,
    counters: Arc<Counters>,
    limiter: Option<Arc<Limiter>>,
    status: Arc<Mutex<ReplStatus>>,
    /// Messages resync tasks send on the control stream (hash requests).
    ctl_tx: mpsc::UnboundedSender<AgentMsg>,
    /// Verify runs waiting for hashes.
    hash_subs: Vec<mpsc::UnboundedSender<TargetMsg>>,
    verifies: u64,
    /// The progress of the latest verify run (kept after it ended: status shows 100%).
    verify_progress: Option<Arc<super::verify::VerifyProgress>>,
    rate: (Instant, u64, f64),
    published: Instant,
    progress_logged: Instant,
    phase: &'static str,
    sync: live::SyncState,
}

/// Starts replicating `parts` to the target; runs until `shutdown` turns true.
pub fn spawn(
    parts: VolumeParts,
    opts: ReplicationOptions,
    full_compare: bool,
    identity: &Identity,
    endpoint: quinn::Endpoint,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Replicator, blockferry_link::LinkError> {
    let client = blockferry_link::client_config(identity, opts.fingerprint)?;
    let meta = &parts.volume.meta;
    let geometry = Geometry::new(meta.size, meta.block_size)
        .expect("volume metadata is validated when the volume is opened");
    let hello = Hello {
        version: VERSION,
        volume: VolumeId(*meta.uuid.as_bytes()),
        name: meta.name.clone(),
        geometry,
        generation: parts.generation,
        history: vec![],
        mode: opts.mode,
        compression: vec![opts.compression],
        max_frame: DEFAULT_MAX_FRAME,
    };
    let mut cfg = AgentConfig::new(hello);
    cfg.epoch_interval = opts.epoch_interval;
    cfg.full_compare = full_compare;
    let status = Arc::new(Mutex::new(ReplStatus {
        volume: meta.name.clone(),
        mode: match opts.mode {
            Mode::Async => "async".into(),
            Mode::Sync => "sync".into(),
        },
        on_disconnect: match opts.on_disconnect {
            OnDisconnect::Degrade => "degrade".into(),
            OnDisconnect::Block => "block".into(),
        },
        target: opts.target.to_string(),
        ..ReplStatus::default()
    }));
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (close_tx, mut close_rx) = mpsc::unbounded_channel();
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel();
    let (verify_tx, mut verify_rx) = mpsc::unbounded_channel();
    let (mode_tx, mut mode_rx) = mpsc::unbounded_channel::<(Mode, oneshot::Sender<ModeChange>)>();
    let now = Instant::now();
    let mut sync = live::SyncState::new(opts.mode == Mode::Sync);
    if let Some((tx, rx)) = parts.capture.take_start_queue() {
        // Writes held since before the NBD server bound (block policy).
        (sync.tx, sync.rx) = (tx, rx);
    }
    let mut d = Driver {
        session: AgentSession::new(cfg, now),
        limiter: opts.bandwidth.map(|b| Arc::new(Limiter::new(b))),
        parts,
        opts,
        endpoint,
        client,
        events_tx,
        conn_no: 0,
        connection: None,
        retained: BTreeMap::new(),
        resyncs: HashMap::new(),
        counters: Arc::new(Counters::default()),
        status: status.clone(),
        ctl_tx,
        hash_subs: Vec::new(),
        verifies: 0,
        verify_progress: None,
        rate: (now, 0, 0.0),
        published: now - Duration::from_secs(1),
        progress_logged: now,
        phase: "",
        sync,
    };
    if d.sync_holds() {
        // Block policy: no write is acknowledged before the target has it, also before the
        // first catch-up after a start.
        d.parts.capture.set_live(Some(d.sync.tx.clone()));
    }
    tokio::spawn(async move {
        info!(volume = %d.parts.volume.meta.name, target = %d.opts.target, "replication started");
        loop {
            while let Some(a) = d.session.poll_action() {
                d.exec(a).await;
            }
            d.publish();
            let deadline =
                d.session.poll_timeout().unwrap_or(Instant::now() + Duration::from_secs(1));
            let capture = d.parts.capture.clone();
            let sync_deadline = d.sync_deadline();
            tokio::select! {
                Some(w) = d.sync.rx.recv() => {
                    // The writes queued meanwhile too (their frames go out together).
                    let now = Instant::now();
                    d.live_write(now, w);
                    for _ in 0..64 {
                        let Ok(w) = d.sync.rx.try_recv() else { break };
                        d.live_write(now, w);
                    }
                }
                Some(ev) = events.recv() => d.event(ev),
                _ = tokio::time::sleep_until(deadline.into()) => d.session.handle_timeout(Instant::now()),
                _ = tokio::time::sleep_until(sync_deadline.unwrap_or(deadline).into()), if sync_deadline.is_some() => {
                    d.sync_tick(Instant::now())
                }
                Some((mode, reply)) = mode_rx.recv() => {
                    let change = d.set_mode(Instant::now(), mode == Mode::Sync);
                    let _ = reply.send(change);
                }
                Some(()) = close_rx.recv() => d.session.close_now(Instant::now()),
                Some(m) = ctl_rx.recv() => d.send(&m).await,
                Some(reply) = verify_rx.recv() => d.start_verify(reply),
                _ = capture.wait_event() => {
                    let now = Instant::now();
                    if capture.take_overflow() {
                        warn!(volume = %d.parts.volume.meta.name, budget = d.opts.budget,
                            "epoch buffer over budget: behind, catching up from the bitmap");
                        d.sync_overflowed(now);
                        d.session.overflowed(now);
                    } else if capture.stats().open_bytes >= d.opts.epoch_bytes {
                        d.session.close_now(now);
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
        if let Some((c, _)) = d.connection.take() {
            c.close(0u32.into(), b"agent shutting down");
        }
        for (_, r) in d.resyncs.drain() {
            r.task.abort();
        }
        info!(volume = %d.parts.volume.meta.name, "replication stopped");
    });
    Ok(Replicator { status, close: close_tx, mode: mode_tx, verify: verify_tx })
}

impl Driver {
    fn name(&self) -> &str {
        &self.parts.volume.meta.name
    }

    fn event(&mut self, ev: Event) {
        let now = Instant::now();
        match ev {
            Event::Connected { conn, connection, control } if conn == self.conn_no => {
                info!(volume = %self.name(), target = %self.opts.target, "connected");
                self.connection = Some((connection, control));
                self.session.connected(now);
            }
            Event::ConnectFailed { conn, reason } if conn == self.conn_no => {
                warn!(volume = %self.name(), target = %self.opts.target, "cannot connect: {reason}");
                self.sync_unreachable(&reason);
                self.session.disconnected(now, reason);
            }
            Event::Lost { conn, reason } if conn == self.conn_no => {
                if self.connection.take().is_some() {
                    warn!(volume = %self.name(), "connection to the target lost: {reason}");
                }
                // Their streams died with the connection.
                for (_, r) in self.resyncs.drain() {
                    r.task.abort();
                }
                self.sync_unreachable(&reason);
                self.session.disconnected(now, reason);
            }
            Event::Control { conn, msg } if conn == self.conn_no => match msg {
                TargetMsg::Hashes { .. } => {
                    for r in self.resyncs.values() {
                        let _ = r.hashes.send(msg.clone());
                    }
                    self.hash_subs.retain(|s| s.send(msg.clone()).is_ok());
                }
                TargetMsg::Refused(ref r) => {
                    warn!(volume = %self.name(), "the target refused the volume: {}", r.message);
                    self.session.handle_control(now, msg);
                }
                TargetMsg::Failed { ref message, .. } => {
                    warn!(volume = %self.name(), "the target dropped a batch: {message}");
                    self.session.handle_control(now, msg);
                }
                msg => self.session.handle_control(now, msg),
            },
            Event::Progress { id, remaining } => self.session.resync_progress(now, id, remaining),
            Event::ReadDone { id } => self.session.resync_read_done(now, id),
            Event::ResyncFailed { id, reason } => {
                if self.resyncs.remove(&id).is_none() {
                    return; // a task of a connection that is gone
                }
                warn!(volume = %self.name(), resync = %id, "resync failed: {reason}");
                for (_, r) in self.resyncs.drain() {
                    r.task.abort();
                }
                if let Some((c, _)) = self.connection.take() {
                    c.close(1u32.into(), b"resync failed");
                }
                self.session.disconnected(now, reason);
            }
            _ => {} // an older connection's event
        }
    }

    async fn exec(&mut self, a: Action) {
        match a {
            Action::Connect => self.connect(),
            Action::Disconnect { reason } => {
                if let Some((c, _)) = self.connection.take() {
                    c.close(1u32.into(), reason.as_bytes());
                }
                for (_, r) in self.resyncs.drain() {
                    r.task.abort();
                }
                self.conn_no += 1;
            }
            Action::Send(m) => self.send(&m).await,
            Action::CloseEpoch => self.close_epoch(Instant::now()),
            Action::SendEpoch { seq, id, base } => self.send_epoch(seq, id, base),
            Action::StartResync { id, base, kind, compare } => {
                self.start_resync(id, base, kind, compare)
            }
            Action::EndResync { id, through } => {
                self.sync_resync_ended(id, through);
                if let Some(r) = self.resyncs.get_mut(&id) {
                    if let Some(tx) = r.end.take() {
                        let _ = tx.send(through);
                    }
                }
                // An abandoned resync still ends its stream (with `through` = ABANDONED) so
                // the chain stays linked at the target; the task stops at its next window.
            }
            Action::SetBuffering(on) => self.parts.capture.set_buffering(on),
            Action::DropEpochs => {
                if self.sync.live.is_some() || !self.sync.seqs.is_empty() {
                    let reason = self.drop_reason();
                    self.break_live(Instant::now(), &reason);
                }
                for (_, ep) in std::mem::take(&mut self.retained) {
                    self.parts.capture.release(&ep);
                }
            }
            Action::DropEpoch { seq } => {
                if self.sync.live.as_ref().is_some_and(|l| l.seq == seq)
                    || self.sync.seqs.values().any(|&s| s == seq)
                {
                    let reason = self.drop_reason();
                    self.break_live(Instant::now(), &reason);
                }
                if let Some(ep) = self.retained.remove(&seq) {
                    self.parts.capture.release(&ep);
                }
            }
            Action::Committed { through, upto_seq, clear } => {
                self.committed(through, upto_seq, clear);
                self.sync_committed(through, upto_seq, clear);
            }
            Action::Stopped { code, message } => {
                warn!(volume = %self.name(), ?code, "replication stopped by the target: {message}");
                self.break_live(Instant::now(), &message);
                if let Some((c, _)) = self.connection.take() {
                    c.close(2u32.into(), b"refused");
                }
            }
            Action::Durable { id, frames } => self.sync_durable(id, frames),
        }
    }

    fn connect(&mut self) {
        self.conn_no += 1;
        let conn = self.conn_no;
        let tx = self.events_tx.clone();
        let connecting = self.endpoint.connect_with(
            self.client.clone(),
            self.opts.target,
            blockferry_link::SERVER_NAME,
        );
        tokio::spawn(async move {
            let r = async {
                let connection =
                    connecting.map_err(|e| e.to_string())?.await.map_err(|e| e.to_string())?;
                let (control, recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
                Ok::<_, String>((connection, control, recv))
            }
            .await;
            match r {
                Ok((connection, control, recv)) => {
                    let _ =
                        tx.send(Event::Connected { conn, connection: connection.clone(), control });
                    let reason = read_control(recv, conn, &tx).await;
                    let reason = connection.close_reason().map_or(reason, |r| r.to_string());
                    let _ = tx.send(Event::Lost { conn, reason });
                }
                Err(reason) => {
                    let _ = tx.send(Event::ConnectFailed { conn, reason });
                }
            }
        });
    }

    async fn send(&mut self, m: &AgentMsg) {
        let mut buf = BytesMut::new();
        msg::encode(m, &mut buf);
        if let Some((_, control)) = &mut self.connection {
            if let Err(e) = control.write_all(&buf).await {
                debug!("control stream write failed: {e}");
            }
        }
    }

    fn send_epoch(&mut self, seq: u64, id: Epoch, base: Epoch) {
        let (Some((conn, _)), Some(ep)) = (&self.connection, self.retained.get(&seq)) else {
            return;
        };
        let (compression, max_frame) = self.session.negotiated();
        let job = EpochJob {
            conn: conn.clone(),
            ep: ep.clone(),
            header: BatchHeader { kind: BatchKind::Epoch, id, base },
            compression,
            max_frame,
            counters: self.counters.clone(),
            limiter: self.limiter.clone(),
            image: self.parts.volume.image_path(),
        };
        let volume = self.name().to_string();
        tokio::spawn(async move {
            if let Err(e) = job.run().await {
                debug!(%volume, epoch = %id, "epoch stream ended early: {e}");
            }
        });
    }

    fn start_resync(&mut self, id: Epoch, base: Epoch, kind: BatchKind, compare: bool) {
        let Some((conn, _)) = &self.connection else { return };
        let (compression, max_frame) = self.session.negotiated();
        let (end_tx, end_rx) = oneshot::channel();
        let (hash_tx, hash_rx) = mpsc::unbounded_channel();
        let progress = Arc::new(ResyncProgress::default());
        let job = super::resync::ResyncJob {
            conn: conn.clone(),
            header: BatchHeader { kind, id, base },
            compare,
            compression,
            max_frame,
            parts: self.parts.clone(),
            counters: self.counters.clone(),
            progress: progress.clone(),
            limiter: self.limiter.clone(),
        };
        let tx = self.events_tx.clone();
        let control = self.ctl_tx.clone();
        let task = tokio::spawn(async move {
            let r = job
                .run(
                    end_rx,
                    hash_rx,
                    control,
                    |remaining| {
                        let _ = tx.send(Event::Progress { id, remaining });
                    },
                    || {
                        let _ = tx.send(Event::ReadDone { id });
                    },
                )
                .await;
            if let Err(reason) = r {
                let _ = tx.send(Event::ResyncFailed { id, reason });
            }
        });
        info!(volume = %self.name(), resync = %id, ?kind, compare, "catch-up started");
        self.resyncs
            .insert(id, Running { id, kind, end: Some(end_tx), hashes: hash_tx, progress, task });
    }

    fn start_verify(&mut self, reply: oneshot::Sender<Result<VerifyReport, String>>) {
        let up = matches!(self.session.state(), State::InSync | State::Behind | State::InitialSync);
        if self.connection.is_none() || !up {
            let _ = reply.send(Err(format!(
                "volume {:?} is {} : verify needs a session with the target",
                self.name(),
                self.session.state().name()
            )));
            return;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        self.hash_subs.push(tx);
        self.verifies += 1;
        let parts = self.parts.clone();
        let control = self.ctl_tx.clone();
        let n = self.verifies;
        let progress = Arc::new(super::verify::VerifyProgress::default());
        self.verify_progress = Some(progress.clone());
        tokio::spawn(async move {
            let _ = reply.send(super::verify::run(parts, control, rx, n, progress).await);
        });
    }

    fn committed(&mut self, through: Epoch, upto_seq: Option<u64>, clear: Clear) {
        let mut released = Vec::new();
        if let Some(upto) = upto_seq {
            let rest = self.retained.split_off(&(upto + 1));
            released = std::mem::replace(&mut self.retained, rest).into_values().collect();
        }
        for ep in &released {
            self.parts.capture.release(ep);
        }
        self.resyncs.retain(|id, r| {
            if *id <= through {
                r.task.abort();
                false
            } else {
                true
            }
        });
        let capture = self.parts.capture.clone();
        let tracker = &self.parts.tracker;
        let keep = |b: u64| capture.newest_holder(b).is_some() || capture.is_unbuffered(b);
        let r = match clear {
            Clear::Nothing => Ok(0),
            Clear::All => tracker.clear_blocks(BITMAP, 0, u64::MAX, keep),
            Clear::Epochs => {
                let mut r = Ok(0);
                for ep in &released {
                    for (first, end) in ep.block_ranges() {
                        if let Err(e) = tracker.clear_blocks(BITMAP, first, end, keep) {
                            r = Err(e);
                        }
                    }
                }
                r
            }
        };
        if let Err(e) = r {
            warn!(volume = %self.name(), "cannot clear replicated blocks from the bitmap: {e}");
        }
        debug!(volume = %self.name(), through = %through, ?clear, "committed");
    }

    /// Why the session dropped its batches (for the log).
    fn drop_reason(&self) -> String {
        self.session.status().last_error.unwrap_or_else(|| "the session dropped its batches".into())
    }

    fn publish(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.published) < Duration::from_millis(250) {
            return;
        }
        self.published = now;
        let s = self.session.status();
        let wire = self.counters.wire.load(Relaxed);
        let data = self.counters.data.load(Relaxed);
        let (t0, w0, rate) = self.rate;
        let dt = now.duration_since(t0).as_secs_f64();
        if dt >= 1.0 {
            let r = (wire - w0) as f64 / dt;
            self.rate = (now, wire, if rate == 0.0 { r } else { 0.5 * rate + 0.5 * r });
        }
        let cap = self.parts.capture.stats();
        let oldest = self
            .retained
            .values()
            .map(|e| e.oldest_write)
            .chain(self.parts.capture.open_oldest())
            .chain(s.behind_since)
            .min();
        let dirty = self.parts.tracker.info(BITMAP).map(|i| i.dirty_bytes).unwrap_or(0);
        let rpo = match oldest {
            Some(t) if dirty > 0 || !self.retained.is_empty() || cap.open_bytes > 0 => {
                now.duration_since(t).as_secs_f64()
            }
            _ => 0.0,
        };
        let resync = self.resyncs.values().max_by_key(|r| r.id).map(|r| ResyncStatus {
            kind: format!("{:?}", r.kind).to_lowercase(),
            id: r.id.0,
            phase: s.resync.map(|(_, p)| p).unwrap_or("").to_string(),
            done_bytes: r.progress.done.load(Relaxed),
            total_bytes: r.progress.total.load(Relaxed),
            sent_bytes: r.progress.sent.load(Relaxed),
            skipped_bytes: r.progress.skipped.load(Relaxed),
        });
        if let Some(r) = &resync {
            // A progress line in the log every 5 s while a sync runs (status has it live).
            if now.duration_since(self.progress_logged) >= Duration::from_secs(5)
                && r.total_bytes > 0
            {
                self.progress_logged = now;
                info!(
                    volume = %self.name(),
                    "{} {:.0}%: {} of {} looked at, {} sent, {} skipped, {}/s on the wire",
                    r.kind,
                    100.0 * r.done_bytes as f64 / r.total_bytes as f64,
                    crate::size::format_size(r.done_bytes),
                    crate::size::format_size(r.total_bytes),
                    crate::size::format_size(r.sent_bytes),
                    crate::size::format_size(r.skipped_bytes),
                    crate::size::format_size(self.rate.2 as u64),
                );
            }
        }
        let state = s.state;
        let shown = self.sync_state().unwrap_or(state.name());
        let reason = match shown {
            "in-sync" => None,
            "degraded" | "blocked" => self.sync.broken.clone().or(s.last_error.clone()),
            "syncing" if self.sync.switching => Some("switched to sync: catching up".into()),
            _ => s.last_error.clone(),
        };
        if shown != self.phase {
            match &reason {
                Some(r) => {
                    info!(volume = %self.name(), state = shown, reason = %r, "replication state")
                }
                None => info!(volume = %self.name(), state = shown, "replication state"),
            }
            self.phase = shown;
        }
        let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
        st.state = shown.into();
        st.reason = reason;
        st.sync_waiting = self.sync.acks.len() as u64;
        st.sync_failed = self.sync.failed;
        st.lag_bytes = dirty;
        st.lag_epochs = (self.retained.len() + usize::from(cap.open_bytes > 0)) as u64;
        st.rpo_seconds = if state == State::Stopped { rpo.max(0.0) } else { rpo };
        st.last_committed_epoch = s.committed.0;
        st.data_bytes_sent = data;
        st.wire_bytes_sent = wire;
        st.compression_ratio = if wire > 0 { data as f64 / wire as f64 } else { 1.0 };
        st.throughput_bps = self.rate.2;
        st.buffered_bytes = cap.held_bytes;
        st.resync = resync;
        st.verify = self.verify_progress.as_ref().map(|p| VerifyStatus {
            done_bytes: p.done.load(Relaxed),
            total_bytes: p.total.load(Relaxed),
        });
        st.last_error = s.last_error;
        st.connects = s.counters.connects;
        st.disconnects = s.counters.disconnects;
        st.overflows = s.counters.overflows;
        st.epochs_sent = s.counters.epochs_sent;
        st.commits = s.counters.commits;
    }
}

/// QUIC priority of a batch's stream: older batches first. quinn shares the link round-robin
/// between streams of equal priority, which under a bottleneck would finish every epoch late
/// (the target commits in order, so the RPO is set by the oldest); this keeps them in order.
pub(super) fn stream_priority(id: Epoch) -> i32 {
    -((id.0 & 0x3fff_ffff) as i32)
}

/// Reads target messages from the control stream until it ends; returns why it ended.
async fn read_control(
    mut recv: quinn::RecvStream,
    conn: u64,
    tx: &mpsc::UnboundedSender<Event>,
) -> String {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        loop {
            match msg::decode::<TargetMsg>(&mut buf) {
                Ok(Some(msg)) => {
                    if tx.send(Event::Control { conn, msg }).is_err() {
                        return "agent stopping".into();
                    }
                }
                Ok(None) => break,
                Err(e) => return format!("bad message from the target: {e}"),
            }
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            Ok(None) => return "the target closed the control stream".into(),
            Err(e) => return e.to_string(),
        }
    }
}

/// An epoch stream hands quinn its frames in chunks of about this many bytes.
const CHUNK_BYTES: usize = 256 * 1024;

/// Ships one retained epoch on its own stream.
struct EpochJob {
    conn: quinn::Connection,
    ep: Arc<ClosedEpoch>,
    header: BatchHeader,
    compression: Compression,
    max_frame: u32,
    counters: Arc<Counters>,
    limiter: Option<Arc<Limiter>>,
    image: std::path::PathBuf,
}

impl EpochJob {
    async fn run(self) -> Result<(), String> {
        let mut s = self.conn.open_uni().await.map_err(|e| e.to_string())?;
        let _ = s.set_priority(stream_priority(self.header.id));
        // Frames are encoded into `out` and handed to quinn in bunches of up to CHUNK_BYTES as
        // one `Bytes`, which quinn keeps as it is (no copy into its send buffer). One chunk
        // per frame instead made quinn slower: it looks a sent range up by walking the
        // stream's unacknowledged chunks from the first.
        let mut out = BytesMut::with_capacity(CHUNK_BYTES + self.max_frame as usize + 64);
        self.header.encode(&mut out);
        let mut w = BatchWriter::new();
        let mut file = None;
        for run in self.ep.runs(self.max_frame) {
            let frame = match run.content {
                RunContent::Data(data) => w.data(run.offset, data, run.crc, self.compression),
                RunContent::Zero => w.zero(run.offset, run.len as u32),
                RunContent::Reread => {
                    // A block written in part: its bytes come from the image (as of now,
                    // which is at least as new as the epoch; later epochs rewrite it).
                    let f = match &file {
                        Some(f) => f,
                        None => file
                            .insert(std::fs::File::open(&self.image).map_err(|e| e.to_string())?),
                    };
                    let mut buf = vec![0u8; run.len as usize];
                    f.read_exact_at(&mut buf, run.offset).map_err(|e| e.to_string())?;
                    let crc = crc32c::crc32c(&buf);
                    w.data(run.offset, Bytes::from(buf), crc, self.compression)
                }
            };
            #[cfg(feature = "failpoints")]
            let frame = corrupt_frame(frame);
            let wire = (frame.payload.len() + 32) as u64;
            if let Some(l) = &self.limiter {
                l.acquire(wire).await;
            }
            Frame::Data(frame).encode(&mut out);
            if out.len() >= CHUNK_BYTES {
                s.write_chunk(out.split().freeze()).await.map_err(|e| e.to_string())?;
                out.reserve(CHUNK_BYTES + self.max_frame as usize + 64);
            }
            self.counters.data.fetch_add(run.len, Relaxed);
            self.counters.wire.fetch_add(wire, Relaxed);
        }
        Frame::End(w.end(self.header.id)).encode(&mut out);
        s.write_chunk(out.freeze()).await.map_err(|e| e.to_string())?;
        s.finish().map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// Fault point (feature `failpoints`): with `BLOCKFERRY_CORRUPT_FRAME_EVERY=N` in the
/// environment, every N-th data frame with a payload that an epoch stream or a resync pass
/// ships has one payload byte flipped after its crc32c was computed, as a bad NIC, cable or
/// memory would. The target must detect it (invariant 5), drop the batch and have it resent;
/// the corrupted bytes must never be applied. Without the variable (or with N = 0) nothing
/// happens.
#[cfg(feature = "failpoints")]
pub(super) fn corrupt_frame(
    mut frame: blockferry_protocol::repl::DataFrame,
) -> blockferry_protocol::repl::DataFrame {
    use std::sync::OnceLock;
    static EVERY: OnceLock<u64> = OnceLock::new();
    static SEEN: AtomicU64 = AtomicU64::new(0);
    let every = *EVERY.get_or_init(|| {
        std::env::var("BLOCKFERRY_CORRUPT_FRAME_EVERY")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    });
    if every == 0 || frame.payload.is_empty() {
        return frame;
    }
    let n = SEEN.fetch_add(1, Relaxed) + 1;
    if n.is_multiple_of(every) {
        let mut bytes = frame.payload.to_vec();
        let at = (n / every) as usize % bytes.len();
        bytes[at] ^= 0x20;
        frame.payload = Bytes::from(bytes);
        warn!(
            offset = frame.offset,
            seq = frame.seq,
            byte = at,
            "failpoint repl.corrupt_frame: flipped a payload byte after its crc was computed"
        );
    }
    frame
}
