//! The target daemon: accepts agents over QUIC (mutual TLS, fingerprints), runs one sans-IO
//! [`TargetSession`] per connection and one store thread per volume.
//!
//! ```text
//!  agent ══QUIC══► connection task: control stream + uni streams ─► TargetSession
//!                        ▲ Committed / Durable / Failed / Hashes   │ Begin/Data/End/Abort/Hash
//!                        └──────────── store thread (per volume) ◄─┘ journal, commit, apply
//! ```
//! The store thread takes commands in order and commits once its queue is empty (group commit:
//! one fdatasync for every batch that ended meanwhile, and for the frames of the open sync
//! batch, which it then reports `Durable`), then applies when idle. When the session ends it
//! seals the open sync batches (their durable frames reach the replica) before the store is
//! parked for the next session.
//! One session per volume at a time: a second agent for the same volume is refused (Busy).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockferry_link::{Fingerprint, Identity};
use blockferry_protocol::repl::msg::{self, FailCode, Refusal, RefuseCode, ReplicaState};
use blockferry_protocol::repl::target::{Action, ReplicaInfo, TargetConfig, TargetSession};
use blockferry_protocol::repl::{BatchHeader, Epoch, Generation, VolumeId};
use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::store::{ApplyJob, ApplyStep, JobError, ReplicaStore, Store, StoreError};

/// An agent allowed to connect, and which volumes (by name) it may write (`None`: any).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Allow {
    pub fingerprint: Fingerprint,
    #[serde(default)]
    pub volumes: Option<Vec<String>>,
}

/// The target's configuration (TOML; the command line's quick form fills the same struct).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TargetDaemonConfig {
    pub listen: SocketAddr,
    pub dir: PathBuf,
    pub key_dir: PathBuf,
    #[serde(default)]
    pub admin: Option<PathBuf>,
    /// Threads of the async runtime (default: half the host's cores, 1 to 8).
    #[serde(default)]
    pub workers: Option<usize>,
    #[serde(default, rename = "allow")]
    pub allow: Vec<Allow>,
}

impl TargetDaemonConfig {
    pub fn from_file(path: &Path) -> Result<TargetDaemonConfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read target config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("target config {}: {e}", path.display()))
    }
}

/// What `status` shows of a replica.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VolumeStatus {
    pub volume: String,
    pub uuid: String,
    pub state: String,
    pub connected: bool,
    pub agent: Option<String>,
    pub last_committed_epoch: u64,
    pub applied_epoch: u64,
    pub replica_path: String,
    pub journal_bytes: u64,
    pub staged_bytes: u64,
    pub received_bytes: u64,
    pub commits: u64,
    pub rejected_batches: u64,
    pub last_error: Option<String>,
}

/// Rounds of commands queued for a store thread before the connection waits (each round is
/// what one read of the streams produced: up to about 1 MiB of frames).
const STORE_QUEUE: usize = 32;

/// The longest sync frames wait for their group commit while commands keep coming (when the
/// queue runs dry they are synced at once).
const SYNC_GROUP_MAX: Duration = Duration::from_millis(2);
/// A slice of a split apply (`apply_step`) writes for about this long; while it has more to
/// write, the store thread takes a slice at least this often, even while commands keep coming.
const APPLY_SLICE: Duration = Duration::from_millis(4);

enum Cmd {
    Begin(BatchHeader),
    Data { id: Epoch, offset: u64, length: u32, data: Option<Bytes> },
    End { id: Epoch, end: blockferry_protocol::repl::End },
    Abort { id: Epoch },
    Hash { id: u64, offset: u64, granularity: u32, count: u32 },
}

/// Answers of a store thread to the connection.
#[derive(Debug)]
enum Reply {
    Committed(Epoch),
    Durable { id: Epoch, frames: u32 },
    Failed { id: Epoch, code: FailCode, message: String },
    Hashes { id: u64, offset: u64, granularity: u32, hashes: Vec<[u8; 32]> },
    Fatal(String),
}

/// One replica, open: its store thread and status.
struct Slot {
    name: String,
    busy: AtomicBool,
    /// The agent and connection of the active session.
    holder: Mutex<Option<(Fingerprint, quinn::Connection)>>,
    status: Mutex<VolumeStatus>,
    received: AtomicU64,
    rejected: AtomicU64,
    /// The store, while no session holds it (a session moves it into its thread and back).
    store: Mutex<Option<ReplicaStore>>,
}

/// The running target.
pub struct TargetServer {
    endpoint: quinn::Endpoint,
    cfg: TargetDaemonConfig,
    store: Mutex<Store>,
    slots: Mutex<HashMap<VolumeId, Arc<Slot>>>,
}

impl std::fmt::Debug for TargetServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetServer").field("listen", &self.cfg.listen).finish()
    }
}

impl TargetServer {
    /// Loads the key, opens the store directory and binds the QUIC endpoint.
    pub fn bind(cfg: TargetDaemonConfig) -> Result<Arc<TargetServer>, String> {
        let identity = Identity::load(&cfg.key_dir).map_err(|e| e.to_string())?;
        let mut allowed = blockferry_link::AllowList::new();
        for a in &cfg.allow {
            allowed.insert(a.fingerprint);
        }
        if allowed.is_empty() {
            return Err("no agent is allowed: give --allow FINGERPRINT (the agent's `blockferry keygen --show`) or [[allow]] in the config".into());
        }
        let server =
            blockferry_link::server_config(&identity, allowed).map_err(|e| e.to_string())?;
        let store = Store::open(&cfg.dir).map_err(|e| e.to_string())?;
        let endpoint = blockferry_link::server_endpoint(server, cfg.listen)
            .map_err(|e| format!("cannot listen on {} (UDP): {e}", cfg.listen))?;
        info!(listen = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            fingerprint = %identity.fingerprint(), "target listening");
        let server = Arc::new(TargetServer {
            endpoint,
            cfg,
            store: Mutex::new(store),
            slots: Mutex::new(HashMap::new()),
        });
        server.load_existing();
        Ok(server)
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Status rows for the replicas present (opened or not).
    pub fn status(&self) -> Vec<VolumeStatus> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<VolumeStatus> = slots
            .values()
            .map(|s| {
                let mut st = s.status.lock().unwrap_or_else(|e| e.into_inner()).clone();
                st.received_bytes = s.received.load(Relaxed);
                st.rejected_batches = s.rejected.load(Relaxed);
                st
            })
            .collect();
        v.sort_by(|a, b| a.volume.cmp(&b.volume));
        v
    }

    /// Rows for replicas on disk that no agent has connected to since the start.
    fn load_existing(&self) {
        let store = self.store.lock().unwrap_or_else(|e| e.into_inner());
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        for &uuid in store.volumes() {
            let dir = store.volume_dir(uuid);
            let Ok(meta) = ReplicaStore::inspect(&dir) else { continue };
            let st = VolumeStatus {
                volume: meta.name.clone(),
                uuid: uuid.to_string(),
                state: state_name(meta.state).into(),
                last_committed_epoch: meta.committed.0,
                applied_epoch: meta.applied.0,
                replica_path: dir.join("image.raw").display().to_string(),
                ..VolumeStatus::default()
            };
            slots.insert(
                uuid,
                Arc::new(Slot {
                    name: meta.name,
                    busy: AtomicBool::new(false),
                    holder: Mutex::new(None),
                    status: Mutex::new(st),
                    received: AtomicU64::new(0),
                    rejected: AtomicU64::new(0),
                    store: Mutex::new(None),
                }),
            );
        }
    }

    /// Accepts connections until `shutdown` turns true.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let me = self.clone();
                    let stop = shutdown.clone();
                    tokio::spawn(async move {
                        let remote = incoming.remote_address();
                        match incoming.await {
                            Ok(conn) => me.connection(conn, stop).await,
                            Err(e) => warn!(%remote, "agent connection refused: {e}"),
                        }
                    });
                }
                _ = shutdown.changed() => break,
            }
        }
        self.endpoint.close(0u32.into(), b"target shutting down");
        self.endpoint.wait_idle().await;
    }

    fn allowed(&self, fp: &Fingerprint, name: &str) -> bool {
        self.cfg.allow.iter().any(|a| {
            a.fingerprint == *fp && a.volumes.as_ref().is_none_or(|v| v.iter().any(|n| n == name))
        })
    }

    async fn connection(self: Arc<Self>, conn: quinn::Connection, mut stop: watch::Receiver<bool>) {
        let remote = conn.remote_address();
        let Some(fp) = blockferry_link::peer_fingerprint(&conn) else {
            warn!(%remote, "connection without a client certificate");
            return;
        };
        info!(%remote, agent = %fp, "agent connected");
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => return debug!(%remote, "no control stream: {e}"),
        };
        let (in_tx, mut inbox) = mpsc::channel::<Input>(256);
        // Control stream reader.
        {
            let tx = in_tx.clone();
            tokio::spawn(async move {
                loop {
                    match recv.read_chunk(64 * 1024, true).await {
                        Ok(Some(c)) => {
                            if tx.send(Input::Control(c.bytes)).await.is_err() {
                                break;
                            }
                        }
                        _ => {
                            let _ = tx.send(Input::Closed("control stream ended".into())).await;
                            break;
                        }
                    }
                }
            });
        }
        // Data streams.
        {
            let tx = in_tx.clone();
            let conn = conn.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                loop {
                    let mut s = match conn.accept_uni().await {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = tx.send(Input::Closed(e.to_string())).await;
                            break;
                        }
                    };
                    n += 1;
                    let id = n;
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        loop {
                            match s.read_chunk(1 << 20, true).await {
                                Ok(Some(c)) => {
                                    if tx.send(Input::Stream(id, c.bytes)).await.is_err() {
                                        return;
                                    }
                                }
                                Ok(None) => {
                                    let _ = tx.send(Input::StreamEnd(id)).await;
                                    return;
                                }
                                Err(_) => {
                                    let _ = tx.send(Input::StreamEnd(id)).await;
                                    return;
                                }
                            }
                        }
                    });
                }
            });
        }
        let mut session = TargetSession::new(TargetConfig::default());
        let mut vol: Option<(Arc<Slot>, std::sync::mpsc::SyncSender<Vec<Cmd>>)> = None;
        // Store commands of one round of actions, handed to the store thread together.
        let mut cmds: Vec<Cmd> = Vec::new();
        let (reply_tx, mut replies) = mpsc::unbounded_channel::<Reply>();
        let mut worker: Option<std::thread::JoinHandle<()>> = None;
        let reason = 'conn: loop {
            // Run the session's actions.
            while let Some(a) = session.poll_action() {
                match a {
                    Action::Send(m) => {
                        if let msg::TargetMsg::Failed { id, kind, code, message } = &m {
                            warn!(%remote, agent = %fp, batch = %id, ?kind, ?code,
                                "batch dropped, the agent sends it again: {message}");
                        }
                        let mut b = BytesMut::new();
                        msg::encode(&m, &mut b);
                        if let Err(e) = send.write_all(&b).await {
                            break 'conn format!("control stream: {e}");
                        }
                    }
                    Action::Close { reason } => {
                        send_cmds(&vol, &mut cmds);
                        warn!(%remote, agent = %fp, "closing the session: {reason}");
                        // Let a refusal sent just before reach the agent (closing the
                        // connection at once would discard it): finish the control stream and
                        // wait briefly for the agent to acknowledge it.
                        let _ = send.finish();
                        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
                        conn.close(1u32.into(), reason.as_bytes());
                        break 'conn reason;
                    }
                    Action::Open(hello) => {
                        send_cmds(&vol, &mut cmds);
                        self.preempt(&fp, &hello).await;
                        let r = self.open_volume(&fp, &hello, reply_tx.clone());
                        match r {
                            Ok((info, slot, tx, handle)) => {
                                *slot.holder.lock().unwrap_or_else(|e| e.into_inner()) =
                                    Some((fp, conn.clone()));
                                vol = Some((slot, tx));
                                worker = Some(handle);
                                session.opened(Ok(info));
                            }
                            Err(refusal) => {
                                warn!(%remote, agent = %fp, volume = %hello.name, "refused: {}", refusal.message);
                                session.opened(Err(refusal));
                            }
                        }
                    }
                    Action::Hash { id, offset, granularity, count } => {
                        cmds.push(Cmd::Hash { id, offset, granularity, count });
                    }
                    Action::Begin(h) => cmds.push(Cmd::Begin(h)),
                    Action::Data { id, offset, length, data } => {
                        if let Some((slot, _)) = &vol {
                            slot.received.fetch_add(u64::from(length), Relaxed);
                        }
                        cmds.push(Cmd::Data { id, offset, length, data });
                    }
                    Action::End { id, end } => cmds.push(Cmd::End { id, end }),
                    Action::Abort { id } => {
                        if let Some((slot, _)) = &vol {
                            slot.rejected.fetch_add(1, Relaxed);
                        }
                        cmds.push(Cmd::Abort { id });
                    }
                }
            }
            send_cmds(&vol, &mut cmds);
            tokio::select! {
                input = inbox.recv() => match input {
                    Some(Input::Control(b)) => session.control_bytes(&b),
                    Some(Input::Stream(id, b)) => session.stream_bytes(id, &b),
                    Some(Input::StreamEnd(id)) => session.stream_finished(id),
                    Some(Input::Closed(r)) => break 'conn r,
                    None => break 'conn "inputs ended".into(),
                },
                Some(r) = replies.recv() => match r {
                    Reply::Committed(e) => session.committed(e),
                    Reply::Durable { id, frames } => session.durable(id, frames),
                    Reply::Failed { id, code, message } => {
                        // Logged when the session sends the Failed message.
                        session.store_failed(id, blockferry_protocol::repl::BatchKind::Epoch, code, message);
                    }
                    Reply::Hashes { id, offset, granularity, hashes } => session.hashes(id, offset, granularity, hashes),
                    Reply::Fatal(m) => {
                        conn.close(3u32.into(), m.as_bytes());
                        break 'conn m;
                    }
                },
                _ = stop.changed() => {
                    conn.close(0u32.into(), b"target shutting down");
                    break 'conn "target shutting down".into();
                }
            }
        };
        info!(%remote, agent = %fp, "session ended: {reason}");
        if let Some((slot, tx)) = vol.take() {
            drop(tx);
            if let Some(h) = worker.take() {
                let _ = tokio::task::spawn_blocking(move || h.join()).await;
            }
            slot.status.lock().unwrap_or_else(|e| e.into_inner()).connected = false;
            {
                let mut h = slot.holder.lock().unwrap_or_else(|e| e.into_inner());
                if h.as_ref().is_some_and(|(_, c)| c.stable_id() == conn.stable_id()) {
                    *h = None;
                }
            }
            slot.busy.store(false, Relaxed);
        }
    }

    /// A new session of the agent that holds a volume replaces the old one (which is usually
    /// a connection the agent already gave up on, not yet timed out here): the old connection
    /// is closed and its store handed over (up to 5 s). Another agent is refused (Busy).
    async fn preempt(&self, fp: &Fingerprint, hello: &blockferry_protocol::repl::Hello) {
        let slot = self.slots.lock().unwrap_or_else(|e| e.into_inner()).get(&hello.volume).cloned();
        let Some(slot) = slot else { return };
        let old = {
            let h = slot.holder.lock().unwrap_or_else(|e| e.into_inner());
            match &*h {
                Some((holder, c)) if holder == fp => Some(c.clone()),
                _ => None,
            }
        };
        let Some(old) = old else { return };
        info!(volume = %hello.name, agent = %fp, "a new session of the same agent replaces the old one");
        old.close(4u32.into(), b"replaced by a new session");
        let until = Instant::now() + Duration::from_secs(5);
        while slot.busy.load(Relaxed) && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Finds or creates the replica for `hello`, checks permission and that no other session
    /// holds it, and starts its store thread.
    #[allow(clippy::type_complexity)]
    fn open_volume(
        &self,
        fp: &Fingerprint,
        hello: &blockferry_protocol::repl::Hello,
        replies: mpsc::UnboundedSender<Reply>,
    ) -> Result<
        (
            ReplicaInfo,
            Arc<Slot>,
            std::sync::mpsc::SyncSender<Vec<Cmd>>,
            std::thread::JoinHandle<()>,
        ),
        Refusal,
    > {
        if !self.allowed(fp, &hello.name) {
            return Err(Refusal {
                code: RefuseCode::NotAllowed,
                message: format!(
                    "agent {fp} may not write volume {:?} on this target (see its allow list)",
                    hello.name
                ),
            });
        }
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots
                .entry(hello.volume)
                .or_insert_with(|| {
                    Arc::new(Slot {
                        name: hello.name.clone(),
                        busy: AtomicBool::new(false),
                        holder: Mutex::new(None),
                        status: Mutex::new(VolumeStatus {
                            volume: hello.name.clone(),
                            uuid: hello.volume.to_string(),
                            ..VolumeStatus::default()
                        }),
                        received: AtomicU64::new(0),
                        rejected: AtomicU64::new(0),
                        store: Mutex::new(None),
                    })
                })
                .clone()
        };
        if slot.busy.swap(true, Relaxed) {
            return Err(Refusal {
                code: RefuseCode::Busy,
                message: format!("volume {:?} already has an active session", slot.name),
            });
        }
        let unavailable = |e: StoreError| {
            slot.busy.store(false, Relaxed);
            Refusal {
                code: RefuseCode::Unavailable,
                message: format!("the replica of {:?} cannot be opened: {e}", hello.name),
            }
        };
        let cached = slot.store.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut store = match cached {
            Some(s) => s,
            None => {
                let mut st = self.store.lock().unwrap_or_else(|e| e.into_inner());
                match st.volume(hello.volume, &hello.name, hello.geometry, hello.generation) {
                    Ok(s) => s,
                    Err(StoreError::Mismatch { what, stored, requested }) => {
                        slot.busy.store(false, Relaxed);
                        let code = if what.contains("block") {
                            RefuseCode::BlockSizeMismatch
                        } else {
                            RefuseCode::SizeMismatch
                        };
                        return Err(Refusal { code, message: format!("volume {:?}: the replica's {what} is {stored}, the source's is {requested}", hello.name) });
                    }
                    Err(e) => return Err(unavailable(e)),
                }
            }
        };
        if let Err(e) = store.reset_session() {
            let e = unavailable(e);
            *slot.store.lock().unwrap_or_else(|e| e.into_inner()) = Some(store);
            return Err(e);
        }
        let m = store.meta().clone();
        // A replica without a committed boundary takes the source's generation.
        if m.state != ReplicaState::Consistent && m.generation != hello.generation {
            if let Err(e) = store.set_generation(hello.generation) {
                let e = unavailable(e);
                *slot.store.lock().unwrap_or_else(|e| e.into_inner()) = Some(store);
                return Err(e);
            }
        }
        let generation: Option<Generation> = Some(store.meta().generation);
        let info = ReplicaInfo {
            volume: m.volume,
            geometry: m.geometry,
            state: m.state,
            committed: m.committed,
            generation,
        };
        {
            let mut st = slot.status.lock().unwrap_or_else(|e| e.into_inner());
            st.connected = true;
            st.agent = Some(fp.to_string());
            st.replica_path =
                store.image_path().map(|p| p.display().to_string()).unwrap_or_default();
            refresh(&mut st, &store);
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Cmd>>(STORE_QUEUE);
        let slot2 = slot.clone();
        let handle = std::thread::Builder::new()
            .name(format!("store-{}", hello.name))
            .spawn(move || store_thread(store, rx, replies, slot2))
            .map_err(|e| Refusal {
                code: RefuseCode::Unavailable,
                message: format!("cannot start the store thread: {e}"),
            })?;
        Ok((info, slot, tx, handle))
    }
}

enum Input {
    Control(Bytes),
    Stream(u64, Bytes),
    StreamEnd(u64),
    Closed(String),
}

/// Hands `cmds` (emptied) to the volume's store thread in one message (one wake-up).
fn send_cmds(
    vol: &Option<(Arc<Slot>, std::sync::mpsc::SyncSender<Vec<Cmd>>)>,
    cmds: &mut Vec<Cmd>,
) {
    if cmds.is_empty() {
        return;
    }
    let cmd = std::mem::take(cmds);
    if let Some((_, tx)) = vol {
        // The store thread drains quickly; a full queue (STORE_QUEUE rounds of commands) waits
        // here, which is the backpressure that slows the agent's streams through QUIC flow
        // control.
        // try_send first: block_in_place hands the worker's other tasks to a new thread, far
        // too dear for every frame.
        match tx.try_send(cmd) {
            Ok(()) | Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {}
            Err(std::sync::mpsc::TrySendError::Full(cmd)) => {
                let _ = tokio::task::block_in_place(|| tx.send(cmd));
            }
        }
    }
}

fn state_name(s: ReplicaState) -> &'static str {
    match s {
        ReplicaState::Empty => "empty",
        ReplicaState::Seeded => "initial-sync",
        ReplicaState::Consistent => "consistent",
    }
}

fn refresh(st: &mut VolumeStatus, store: &ReplicaStore) {
    let m = store.meta();
    let s = store.status();
    st.state = state_name(m.state).into();
    st.last_committed_epoch = m.committed.0;
    st.applied_epoch = m.applied.0;
    st.journal_bytes = s.journal_bytes;
    st.staged_bytes = s.staged_bytes;
    st.commits = s.commits;
    if s.last_error.is_some() {
        st.last_error = s.last_error;
    }
}

fn fail_code(e: &StoreError) -> FailCode {
    match e {
        StoreError::NoSpace { .. } => FailCode::NoSpace,
        StoreError::OutOfRange { .. } | StoreError::Batch { .. } => FailCode::Malformed,
        _ => FailCode::Io,
    }
}

type ApplyThread = std::thread::JoinHandle<Result<(), JobError>>;

/// Applies the committed batches without stalling the session (at sync qd32 a plain apply
/// held every sync write for 60-180 ms once a second): the batches' writes and the image's
/// fdatasync run on a thread of their own (writes of records only in the journal are done
/// here, in slices of about [`APPLY_SLICE`] between the commands); the store finishes the
/// apply when the thread is done.
fn apply_step(store: &mut ReplicaStore, job: &mut Option<ApplyThread>) -> Result<(), StoreError> {
    if let Some(h) = job.take() {
        if !h.is_finished() {
            *job = Some(h);
            return Ok(());
        }
        finish_job(store, h)?;
    }
    if let ApplyStep::Job(j) = store.apply_start(Instant::now() + APPLY_SLICE)? {
        // The job goes over a channel once the thread exists, so that it can run here if
        // no thread can be started.
        let (tx, rx) = std::sync::mpsc::channel::<ApplyJob>();
        let spawned = std::thread::Builder::new().name("image-apply".into()).spawn(move || {
            rx.recv()
                .map_err(|_| JobError::Sync(std::io::Error::other("no job")))
                .and_then(ApplyJob::run)
        });
        match spawned {
            Ok(h) => {
                let _ = tx.send(j);
                *job = Some(h);
            }
            Err(_) => store.apply_done(j.run())?,
        }
    }
    Ok(())
}

/// Waits for the apply thread and finishes its apply.
fn finish_job(store: &mut ReplicaStore, h: ApplyThread) -> Result<(), StoreError> {
    let done = h.join().unwrap_or_else(|_| {
        Err(JobError::Sync(std::io::Error::other("the apply thread panicked")))
    });
    store.apply_done(done)
}

/// Owns a replica store for one session: executes commands in order, commits when the queue
/// runs dry (group commit), applies when idle.
fn store_thread(
    mut store: ReplicaStore,
    rx: std::sync::mpsc::Receiver<Vec<Cmd>>,
    replies: mpsc::UnboundedSender<Reply>,
    slot: Arc<Slot>,
) {
    use std::sync::mpsc::RecvTimeoutError;
    // Since when a batch has ended without a commit (None: nothing to commit).
    let mut ended: Option<Instant> = None;
    // Since when sync frames wait to be made durable (None: none).
    let mut sync_since: Option<Instant> = None;
    let mut failed: Option<Epoch> = None;
    let mut last_refresh = Instant::now();
    let mut queue: std::collections::VecDeque<Cmd> = std::collections::VecDeque::new();
    // The thread of a running apply (`apply_step`).
    let mut job: Option<ApplyThread> = None;
    // When the store thread was last idle (a split apply's slice is taken there).
    let mut last_idle = Instant::now();
    loop {
        // Group commit: when the queue runs dry, or at the latest 50 ms after a batch ended
        // while data keeps streaming in.
        // Sync frames wait at most SYNC_GROUP_MAX for their fdatasync while frames keep coming.
        if sync_since.is_none() && store.sync_pending() {
            sync_since = Some(Instant::now());
        }
        let writing = store.apply_writing();
        let overdue = ended.is_some_and(|t| t.elapsed() >= Duration::from_millis(50))
            || sync_since.is_some_and(|t| t.elapsed() >= SYNC_GROUP_MAX)
            || (writing && last_idle.elapsed() >= APPLY_SLICE);
        let busy = ended.is_some() || sync_since.is_some() || writing;
        let cmd = if overdue {
            None
        } else if let Some(c) = queue.pop_front() {
            Some(c)
        } else {
            // While the apply thread runs, look every 2 ms whether it is done.
            let wait = if busy {
                0
            } else if job.is_some() {
                2
            } else {
                200
            };
            match rx.recv_timeout(Duration::from_millis(wait)) {
                Ok(cs) => {
                    queue.extend(cs);
                    queue.pop_front()
                }
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        };
        let idle = cmd.is_none();
        let r: Result<(), (Option<Epoch>, StoreError)> = match cmd {
            Some(Cmd::Begin(h)) => {
                if failed == Some(h.id) {
                    failed = None;
                }
                store.begin_batch(h).map_err(|e| (Some(h.id), e))
            }
            Some(Cmd::Data { id, offset, length, data }) => {
                if failed == Some(id) {
                    Ok(())
                } else {
                    // The frames of the same batch queued behind it (also those sent
                    // meanwhile) go with it: their records are journaled with one write.
                    while queue.len() < 256 {
                        match rx.try_recv() {
                            Ok(cs) => queue.extend(cs),
                            Err(_) => break,
                        }
                    }
                    let mut frames = vec![(offset, length, data)];
                    while let Some(Cmd::Data { id: next, .. }) = queue.front() {
                        if *next != id {
                            break;
                        }
                        if let Some(Cmd::Data { offset, length, data, .. }) = queue.pop_front() {
                            frames.push((offset, length, data));
                        }
                    }
                    store.data_run(id, frames).map_err(|e| (Some(id), e))
                }
            }
            Some(Cmd::End { id, end }) => {
                if failed == Some(id) {
                    Ok(())
                } else {
                    ended.get_or_insert_with(Instant::now);
                    store.end_batch(id, end).map_err(|e| (Some(id), e))
                }
            }
            Some(Cmd::Abort { id }) => {
                store.abort_batch(id);
                Ok(())
            }
            Some(Cmd::Hash { id, offset, granularity, count }) => {
                // Hashes are of the image: every committed batch goes into it first.
                let ready = if store.image_behind() {
                    job.take()
                        .map_or(Ok(()), |h| finish_job(&mut store, h))
                        .and_then(|()| store.apply())
                } else {
                    Ok(())
                };
                match ready.and_then(|()| store.hashes(offset, granularity, count)) {
                    Ok(hashes) => {
                        let _ = replies.send(Reply::Hashes { id, offset, granularity, hashes });
                        Ok(())
                    }
                    Err(e) => Err((None, e)),
                }
            }
            None => {
                // Idle: commit what ended, make the sync frames durable (one fdatasync for
                // both when the commit already synced the journal) and say so, then apply.
                let committed = if ended.take().is_some() {
                    match store.commit() {
                        Ok(Some(e)) => {
                            let _ = replies.send(Reply::Committed(e));
                            Ok(())
                        }
                        Ok(None) => Ok(()),
                        Err(e) => Err((None, e)),
                    }
                } else {
                    Ok(())
                };
                committed
                    .and_then(|()| {
                        if sync_since.take().is_none() {
                            return Ok(());
                        }
                        for (id, frames) in store.sync_durable().map_err(|e| (None, e))? {
                            let _ = replies.send(Reply::Durable { id, frames });
                        }
                        Ok(())
                    })
                    .and_then(|()| apply_step(&mut store, &mut job).map_err(|e| (None, e)))
            }
        };
        if idle {
            last_idle = Instant::now();
        }
        if let Err((id, e)) = r {
            warn!(volume = %slot.name, "replica store: {e}");
            slot.status.lock().unwrap_or_else(|e| e.into_inner()).last_error = Some(e.to_string());
            match id {
                Some(id) => {
                    store.abort_batch(id);
                    failed = Some(id);
                    let _ = replies.send(Reply::Failed {
                        id,
                        code: fail_code(&e),
                        message: e.to_string(),
                    });
                }
                None if e.is_no_space() => {
                    let _ = replies.send(Reply::Failed {
                        id: Epoch::ZERO,
                        code: FailCode::NoSpace,
                        message: e.to_string(),
                    });
                }
                None => {
                    let _ = replies.send(Reply::Fatal(e.to_string()));
                }
            }
        }
        if last_refresh.elapsed() >= Duration::from_millis(200) {
            last_refresh = Instant::now();
            refresh(&mut slot.status.lock().unwrap_or_else(|e| e.into_inner()), &store);
        }
    }
    if let Some(h) = job.take() {
        if let Err(e) = finish_job(&mut store, h) {
            warn!(volume = %slot.name, "replica store: {e}");
        }
    }
    // Session over: seal the open sync batches (the agent may be gone for good: their
    // durable frames must be in the replica), commit what is complete, apply, and park the
    // store for the next session.
    match store.seal() {
        Ok(sealed) if !sealed.is_empty() => {
            info!(volume = %slot.name, ?sealed, committed = %store.meta().committed,
                "sealed the open sync batches at session end");
        }
        Ok(_) => {}
        Err(e) => {
            warn!(volume = %slot.name, "cannot seal the open sync batches at session end (recovery seals them at the next open): {e}")
        }
    }
    if let Ok(Some(e)) = store.commit() {
        debug!(volume = %slot.name, through = %e, "committed at session end");
    }
    let _ = store.apply();
    refresh(&mut slot.status.lock().unwrap_or_else(|e| e.into_inner()), &store);
    *slot.store.lock().unwrap_or_else(|e| e.into_inner()) = Some(store);
}
