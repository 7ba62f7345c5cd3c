//! The target's side of one replication connection, as a sans-IO state machine.
//!
//! The driver (target/) feeds it the control stream's bytes and each data stream's bytes; it
//! answers with actions: messages to send, and batches to hand to the replica store (begin,
//! data, end, abort). Every frame is checked here (header and data crc32c, sequence, batch
//! checksum, range) before the store sees it; a bad frame drops its batch and tells the agent,
//! which sends it again (invariant 5). Nothing here touches a disk.
//!
//! Sync batches ([`BatchKind::Sync`], issue 5) are live: their frames go to the store as they
//! arrive and the store's group commits come back through [`TargetSession::durable`] as
//! `Durable` messages. A sync batch is never aborted here: its frames may already have been
//! reported durable, so a bad frame or a stream that ends without `End` only stops it (the
//! store seals it after its last good frame when the session ends) and, for a bad frame, tells
//! the agent, which reconnects and catches up from its bitmap.

use std::collections::{HashMap, HashSet, VecDeque};

use bytes::{Bytes, BytesMut};

use super::frame::{BatchHeader, BatchKind, BatchReader, Compression, End, Frame, FrameError};
use super::msg::{
    self, AgentMsg, FailCode, Hello, Refusal, RefuseCode, ReplicaState, TargetMsg, Welcome,
    MAX_HASHES, VERSION,
};
use super::types::{Epoch, Generation, Geometry, VolumeId};

/// What the store says of a replica when a session opens it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaInfo {
    pub volume: VolumeId,
    pub geometry: Geometry,
    pub state: ReplicaState,
    pub committed: Epoch,
    pub generation: Option<Generation>,
}

#[derive(Clone, Debug)]
pub struct TargetConfig {
    /// The largest data frame accepted.
    pub max_frame: u32,
}

impl Default for TargetConfig {
    fn default() -> TargetConfig {
        TargetConfig { max_frame: super::frame::DEFAULT_MAX_FRAME }
    }
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Send(TargetMsg),
    /// Find or create the replica for this hello (the driver checks the peer's permission
    /// first) and answer with [`TargetSession::opened`].
    Open(Hello),
    /// A new batch on a data stream (the store forgets any incomplete batch with that id).
    Begin(BatchHeader),
    /// Checked block data of batch `id` (`None`: zeros).
    Data {
        id: Epoch,
        offset: u64,
        length: u32,
        data: Option<Bytes>,
    },
    /// Batch `id` is complete: the store may commit it (group commit) and then answer
    /// [`TargetSession::committed`].
    End {
        id: Epoch,
        end: End,
    },
    /// Forget batch `id` (a bad frame or a stream that ended early). Never for a sync batch.
    Abort {
        id: Epoch,
    },
    /// Hash `count` chunks of `granularity` bytes from `offset` of the replica and answer
    /// with [`TargetSession::hashes`].
    Hash {
        id: u64,
        offset: u64,
        granularity: u32,
        count: u32,
    },
    /// Close the connection: the peer broke the protocol.
    Close {
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitHello,
    Opening,
    Up,
    Closed,
}

#[derive(Debug)]
struct Stream {
    buf: BytesMut,
    header: Option<BatchHeader>,
    reader: BatchReader,
    /// The batch was dropped; the rest of the stream is ignored.
    dead: bool,
    ended: bool,
}

/// One connection's session, target side.
#[derive(Debug)]
pub struct TargetSession {
    cfg: TargetConfig,
    phase: Phase,
    control: BytesMut,
    streams: HashMap<u64, Stream>,
    actions: VecDeque<Action>,
    hello: Option<Hello>,
    geometry: Option<Geometry>,
    max_frame: u32,
    /// Batches dropped for a bad frame (status, tests).
    pub rejected_batches: u64,
    /// The sync batches begun on this session (never aborted).
    sync_ids: HashSet<Epoch>,
}

impl TargetSession {
    pub fn new(cfg: TargetConfig) -> TargetSession {
        let max_frame = cfg.max_frame;
        TargetSession {
            cfg,
            phase: Phase::AwaitHello,
            control: BytesMut::new(),
            streams: HashMap::new(),
            actions: VecDeque::new(),
            hello: None,
            geometry: None,
            max_frame,
            rejected_batches: 0,
            sync_ids: HashSet::new(),
        }
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The hello of this session, once received.
    pub fn hello(&self) -> Option<&Hello> {
        self.hello.as_ref()
    }

    pub fn is_up(&self) -> bool {
        self.phase == Phase::Up
    }

    fn close(&mut self, reason: String) {
        if self.phase != Phase::Closed {
            self.phase = Phase::Closed;
            self.actions.push_back(Action::Close { reason });
        }
    }

    fn refuse(&mut self, code: RefuseCode, message: String) {
        self.actions.push_back(Action::Send(TargetMsg::Refused(Refusal {
            code,
            message: message.clone(),
        })));
        self.close(format!("refused: {message}"));
    }

    /// Bytes from the control stream.
    pub fn control_bytes(&mut self, data: &[u8]) {
        if self.phase == Phase::Closed {
            return;
        }
        self.control.extend_from_slice(data);
        loop {
            match msg::decode::<AgentMsg>(&mut self.control) {
                Ok(Some(m)) => self.message(m),
                Ok(None) => return,
                Err(e) => return self.close(format!("control stream: {e}")),
            }
            if self.phase == Phase::Closed {
                return;
            }
        }
    }

    fn message(&mut self, m: AgentMsg) {
        match (self.phase, m) {
            (Phase::AwaitHello, AgentMsg::Hello(h)) => {
                if h.version != VERSION {
                    return self.refuse(
                        RefuseCode::Version,
                        format!(
                            "protocol version {} is not supported (this target speaks {VERSION})",
                            h.version
                        ),
                    );
                }
                if Geometry::new(h.geometry.size(), h.geometry.block_size()).is_none() {
                    return self.close("hello with an invalid geometry".into());
                }
                self.phase = Phase::Opening;
                self.hello = Some(h.clone());
                self.actions.push_back(Action::Open(h));
            }
            (Phase::Up, AgentMsg::HashRequest { id, offset, granularity, count }) => {
                let Some(g) = self.geometry else { return };
                let ok = count <= MAX_HASHES
                    && granularity.is_power_of_two()
                    && granularity >= g.block_size()
                    && granularity <= 64 << 20
                    && offset.is_multiple_of(u64::from(granularity))
                    && offset < g.size();
                if !ok {
                    return self.close(format!(
                        "bad hash request: {count} chunks of {granularity} bytes at {offset}"
                    ));
                }
                let count =
                    count.min(((g.size() - offset).div_ceil(u64::from(granularity))) as u32);
                self.actions.push_back(Action::Hash { id, offset, granularity, count });
            }
            (_, AgentMsg::Ping { nonce }) => {
                self.actions.push_back(Action::Send(TargetMsg::Pong { nonce }))
            }
            (phase, m) => self.close(format!("unexpected {m:?} in phase {phase:?}")),
        }
    }

    /// The driver's answer to [`Action::Open`].
    pub fn opened(&mut self, r: Result<ReplicaInfo, Refusal>) {
        if self.phase != Phase::Opening {
            return;
        }
        let Some(h) = self.hello.clone() else { return };
        let info = match r {
            Ok(info) => info,
            Err(refusal) => return self.refuse(refusal.code, refusal.message),
        };
        if info.geometry.size() != h.geometry.size() {
            return self.refuse(
                RefuseCode::SizeMismatch,
                format!(
                    "volume {} is {} bytes at the source but the replica is {} bytes",
                    h.name,
                    h.geometry.size(),
                    info.geometry.size()
                ),
            );
        }
        if info.geometry.block_size() != h.geometry.block_size() {
            return self.refuse(
                RefuseCode::BlockSizeMismatch,
                format!(
                    "volume {} has block size {} at the source but {} at the replica",
                    h.name,
                    h.geometry.block_size(),
                    info.geometry.block_size()
                ),
            );
        }
        let mut state = info.state;
        match info.generation {
            Some(g) if g == h.generation => {}
            None => {}
            // The source moved on from the replica's lineage: compare everything.
            Some(g) if h.history.contains(&g) => state = ReplicaState::Seeded,
            Some(g) => {
                return self.refuse(
                    RefuseCode::Generation,
                    format!(
                        "split brain: the replica of {} is of generation {g}, which the source \
                         (generation {}) does not descend from; nothing was overwritten. \
                         Resolve it by hand (discard one side).",
                        h.name, h.generation
                    ),
                )
            }
        }
        let compression = h.compression.first().copied().unwrap_or(Compression::Off);
        self.max_frame = h.max_frame.min(self.cfg.max_frame);
        self.geometry = Some(info.geometry);
        self.phase = Phase::Up;
        self.actions.push_back(Action::Send(TargetMsg::Welcome(Welcome {
            version: VERSION,
            state,
            committed: if state == ReplicaState::Consistent { info.committed } else { Epoch::ZERO },
            generation: info.generation,
            compression,
            max_frame: self.max_frame,
        })));
    }

    /// Bytes of data stream `stream`.
    pub fn stream_bytes(&mut self, stream: u64, data: &[u8]) {
        if self.phase != Phase::Up {
            if self.phase != Phase::Closed {
                self.close("data stream before the session was up".into());
            }
            return;
        }
        let s = self.streams.entry(stream).or_insert_with(|| Stream {
            buf: BytesMut::new(),
            header: None,
            reader: BatchReader::new(),
            dead: false,
            ended: false,
        });
        if s.dead || s.ended {
            if s.ended && !data.is_empty() && !s.dead {
                s.dead = true;
                return self.close("bytes after a batch's end frame".into());
            }
            return;
        }
        s.buf.extend_from_slice(data);
        self.drain(stream);
    }

    fn drain(&mut self, stream: u64) {
        let max = self.max_frame;
        let geometry = self.geometry;
        loop {
            let Some(s) = self.streams.get_mut(&stream) else { return };
            if s.dead || s.ended {
                return;
            }
            let Some(header) = s.header else {
                match BatchHeader::decode(&mut s.buf) {
                    Ok(Some(h)) => {
                        s.header = Some(h);
                        if h.kind == BatchKind::Sync {
                            self.sync_ids.insert(h.id);
                        }
                        self.actions.push_back(Action::Begin(h));
                        continue;
                    }
                    Ok(None) => return,
                    Err(e) => {
                        s.dead = true;
                        return self.close(format!("data stream {stream}: {e}"));
                    }
                }
            };
            let frame = match Frame::decode(&mut s.buf, max) {
                Ok(Some(f)) => f,
                Ok(None) => return,
                Err(e) => {
                    // A damaged header (line corruption) is sent again; a frame that decodes
                    // to nonsense is a bug or a hostile peer.
                    let code = match e {
                        FrameError::HeaderChecksum { .. } => FailCode::Checksum,
                        _ => FailCode::Malformed,
                    };
                    return self.fail(stream, header, code, e);
                }
            };
            match frame {
                Frame::Data(f) => {
                    if let Err(e) = s.reader.data(&f) {
                        return self.fail(stream, header, FailCode::Malformed, e);
                    }
                    let in_range =
                        geometry.is_some_and(|g| g.contains_aligned(f.offset, u64::from(f.length)));
                    if !in_range {
                        let e = FrameError::Malformed {
                            seq: f.seq,
                            what: "block range outside the volume or not block-aligned",
                        };
                        return self.fail(stream, header, FailCode::Malformed, e);
                    }
                    match f.open() {
                        Ok(data) => self.actions.push_back(Action::Data {
                            id: header.id,
                            offset: f.offset,
                            length: f.length,
                            data,
                        }),
                        Err(e) => return self.fail(stream, header, FailCode::Checksum, e),
                    }
                }
                Frame::End(end) => {
                    if let Err(e) = s.reader.end(&end) {
                        return self.fail(stream, header, FailCode::Checksum, e);
                    }
                    let ok_through = match header.kind {
                        BatchKind::Epoch | BatchKind::Sync => end.through == header.id,
                        BatchKind::Resync | BatchKind::Initial => end.through >= header.id,
                    };
                    if !ok_through || header.base >= header.id {
                        let e = FrameError::Malformed {
                            seq: end.frames,
                            what: "end frame's epoch does not fit the batch",
                        };
                        return self.fail(stream, header, FailCode::Malformed, e);
                    }
                    s.ended = true;
                    self.actions.push_back(Action::End { id: header.id, end });
                    return;
                }
            }
        }
    }

    fn fail(&mut self, stream: u64, header: BatchHeader, code: FailCode, e: FrameError) {
        if let Some(s) = self.streams.get_mut(&stream) {
            s.dead = true;
            s.buf = BytesMut::new();
        }
        self.rejected_batches += 1;
        if header.kind != BatchKind::Sync {
            self.actions.push_back(Action::Abort { id: header.id });
        }
        self.actions.push_back(Action::Send(TargetMsg::Failed {
            id: header.id,
            kind: header.kind,
            code,
            message: e.to_string(),
        }));
    }

    /// Stream `stream` ended (FIN). A batch without its end frame is dropped, except a sync
    /// batch: it stays open in the store, which seals it when the session ends.
    pub fn stream_finished(&mut self, stream: u64) {
        if let Some(s) = self.streams.remove(&stream) {
            if !s.ended && !s.dead {
                if let Some(h) = s.header.filter(|h| h.kind != BatchKind::Sync) {
                    self.actions.push_back(Action::Abort { id: h.id });
                }
            }
        }
    }

    /// The store made the first `frames` frames of sync batch `id` durable (a group commit
    /// after which a seal would keep them, see the store's `sync_durable`): tell the agent,
    /// whose writes in that prefix can now be acknowledged to its clients.
    pub fn durable(&mut self, id: Epoch, frames: u32) {
        if self.phase == Phase::Up {
            self.actions.push_back(Action::Send(TargetMsg::Durable { id, frames }));
        }
    }

    /// The store committed through `through` (durable): tell the agent.
    pub fn committed(&mut self, through: Epoch) {
        if self.phase == Phase::Up {
            self.actions.push_back(Action::Send(TargetMsg::Committed { through }));
        }
    }

    /// The store could not take batch `id`.
    /// A sync batch (known by its id on this session) is not aborted: its stream stops and
    /// the store seals what it holds when the session ends.
    pub fn store_failed(&mut self, id: Epoch, kind: BatchKind, code: FailCode, message: String) {
        let kind = if self.sync_ids.contains(&id) { BatchKind::Sync } else { kind };
        if kind == BatchKind::Sync {
            for s in self.streams.values_mut() {
                if s.header.is_some_and(|h| h.id == id) {
                    s.dead = true;
                    s.buf = BytesMut::new();
                }
            }
        } else {
            self.actions.push_back(Action::Abort { id });
        }
        self.actions.push_back(Action::Send(TargetMsg::Failed { id, kind, code, message }));
    }

    /// The answer to [`Action::Hash`].
    pub fn hashes(&mut self, id: u64, offset: u64, granularity: u32, hashes: Vec<[u8; 32]>) {
        self.actions.push_back(Action::Send(TargetMsg::Hashes { id, offset, granularity, hashes }));
    }
}
