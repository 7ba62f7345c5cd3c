//! The agent's side of a replication session, as a sans-IO state machine.
//!
//! It decides *what* to ship and when; the driver (agent/src/repl) does the data work: it owns
//! the epoch buffer (captured writes), reads blocks from the image for a catch-up, opens QUIC
//! streams, clears change-tracking bits. Events go in with `now`; actions come out of
//! [`AgentSession::poll_action`]; [`AgentSession::poll_timeout`] says when to call
//! [`AgentSession::handle_timeout`].
//!
//! ## The chain
//! Every shipped batch has an id (an [`Epoch`]) and a `base`: the batch sent just before it on
//! the session (the target's committed boundary for the first). Ids come from one counter and
//! increase; an epoch in which nothing was captured leaves a gap. The target commits a prefix of
//! the chain at once (DESIGN.md invariant 4).
//!
//! ## Modes
//! - **Buffered** (`in-sync`): every write since the committed boundary is in a retained epoch
//!   buffer (`clean` is true). Epochs close on the timer and on request and are sent in order;
//!   a commit releases them. After a reconnect they are sent again from the committed boundary.
//! - **Catch-up** (`behind`, or `initial-sync` for the first copy): some writes are only in the
//!   change-tracking bitmap (after an overflow of the buffer budget, an agent restart, or a
//!   failed session). The driver starts a resync batch that reads the bitmap's blocks from the
//!   image. Phase *draining*: buffering is off, writes only mark blocks to send (the pass's
//!   to-send set); when what is left falls under `final_threshold` buffering turns on (writes
//!   go to epochs again) and phase *final* reads the rest. When the set is empty the open epoch
//!   is closed and the resync's `through` is that epoch: the target applies the resync and the
//!   epochs up to `through` as one unit, so its replica stays at the previous boundary until
//!   then (invariant 3). An overflow during a catch-up abandons the resync (`through` =
//!   `u64::MAX`: never a boundary) and starts another one after it in the chain.
//!
//! ## Sync batches (issue 5, docs/decisions.md "Synchronous replication")
//! In sync mode the open epoch is streamed live: [`AgentSession::sync_open`] gives the open
//! epoch (capture seq) a batch id and base and the driver opens a `Sync` stream with that
//! header; [`AgentSession::sync_frame`] numbers each write's frame as it is sent;
//! [`AgentSession::sync_end`] closes it when the epoch closes (the driver sends `End`). The
//! target's `Durable { id, frames }` comes out as [`Action::Durable`]: those frames, and every
//! batch before `id`, are durable at the target (the writes can be acknowledged). An ended sync
//! batch then waits for its commit like a retained epoch (its blocks are released and cleared
//! by [`Action::Committed`]). A sync batch has nothing to send again: when the connection
//! breaks, the target seals it after whatever frames reached it (possibly committing it), so
//! the session drops it ([`Action::DropEpoch`]) and is no longer clean: the next welcome
//! starts a catch-up from the bitmap, whose bits were cleared only for commits seen here.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::frame::{BatchHeader, BatchKind, Compression};
use super::msg::{
    AgentMsg, FailCode, Hello, RefuseCode, ReplicaState, TargetMsg, Welcome, VERSION,
};
use super::types::Epoch;

/// `through` of an abandoned resync: no boundary until a later resync ends.
pub const ABANDONED: Epoch = Epoch(u64::MAX);

#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The hello sent on every connection.
    pub hello: Hello,
    /// Epochs close this often (DESIGN.md: default 1 s).
    pub epoch_interval: Duration,
    /// Reconnect backoff, doubling from `reconnect_min` to `reconnect_max`.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Backoff after the target reported its disk full or an I/O error.
    pub error_backoff: Duration,
    /// Most batches sent and not yet committed.
    pub window: usize,
    /// A draining catch-up turns buffering back on when this many bytes are left to read.
    pub final_threshold: u64,
    /// The bitmap cannot be trusted to cover what the replica lacks (it was just created, or
    /// lost): the first catch-up compares every block's hash instead of reading the bitmap.
    pub full_compare: bool,
    /// With batches in flight and no commit for this long, the volume is reported `behind`
    /// (the link may be dead long before QUIC's idle timeout says so).
    pub stall_after: Duration,
}

impl AgentConfig {
    pub fn new(hello: Hello) -> AgentConfig {
        AgentConfig {
            hello,
            epoch_interval: Duration::from_secs(1),
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(5),
            error_backoff: Duration::from_secs(2),
            window: 64,
            final_threshold: 64 << 20,
            full_compare: false,
            stall_after: Duration::from_secs(3),
        }
    }
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Open a connection to the target; report `connected` or `disconnected`.
    Connect,
    /// Close the connection (a protocol error or a failed batch); report `disconnected`.
    Disconnect {
        reason: String,
    },
    Send(AgentMsg),
    /// Close the capture's open epoch now and report `epoch_closed` (or `epoch_empty`).
    CloseEpoch,
    /// Ship retained epoch `seq` as batch `id` on `base`.
    SendEpoch {
        seq: u64,
        id: Epoch,
        base: Epoch,
    },
    /// Start a resync or initial batch `id` on `base` and stream its blocks; report
    /// `resync_progress` now and then. The first pass reads: with `compare`, every block,
    /// sending only those whose blake3 differs from the target's (hash requests); else for a
    /// resync the bitmap's dirty blocks, for an initial sync (empty replica) the image's
    /// allocated blocks that are not zero.
    StartResync {
        id: Epoch,
        base: Epoch,
        kind: BatchKind,
        compare: bool,
    },
    /// End resync `id`'s stream with `through` (or [`ABANDONED`]).
    EndResync {
        id: Epoch,
        through: Epoch,
    },
    /// Turn the capture's buffering on or off.
    SetBuffering(bool),
    /// Drop every retained epoch (an overflow): release their budget.
    DropEpochs,
    /// Drop closed epoch `seq` (it is not shipped: a resync covers its writes).
    DropEpoch {
        seq: u64,
    },
    /// The target committed through `through`: release retained epochs with `seq <= upto_seq`.
    /// Bitmap bits are cleared per `clear` (never a block a newer retained or open epoch
    /// holds, and only if the capture has not overflowed since the session saw it).
    Committed {
        through: Epoch,
        upto_seq: Option<u64>,
        clear: Clear,
    },
    /// The session stopped for good (refused); the message says why.
    Stopped {
        code: RefuseCode,
        message: String,
    },
    /// The first `frames` frames of live sync batch `id` are durable at the target, and so is
    /// every batch before it: the writes in them may be acknowledged to the clients. Reported
    /// only for a sync batch of the current connection, with `frames` rising.
    Durable {
        id: Epoch,
        frames: u32,
    },
}

/// Which bitmap bits a commit allows the driver to clear.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clear {
    /// None: some change may be only in the bitmap (behind, a resync is running).
    Nothing,
    /// The blocks of the released epochs (buffered mode).
    Epochs,
    /// Every bit: a catch-up just completed, so every change is committed or in an epoch
    /// still retained.
    All,
}

/// The state shown by `status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Disconnected,
    Connecting,
    InitialSync,
    Behind,
    InSync,
    /// Refused by the target (wrong volume, split brain, ...); needs an operator.
    Stopped,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Disconnected => "disconnected",
            State::Connecting => "connecting",
            State::InitialSync => "initial-sync",
            State::Behind => "behind",
            State::InSync => "in-sync",
            State::Stopped => "stopped",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    /// Waiting until `at` to connect.
    Down {
        at: Instant,
    },
    Connecting,
    /// Connected, hello sent.
    Hello,
    Up,
    Stopped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Draining,
    Final,
    /// Reading done; `through` chosen; waiting for the commit.
    Ended,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Resync {
    id: Epoch,
    kind: BatchKind,
    phase: Phase,
    through: Epoch,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Retained {
    seq: u64,
    id: Epoch,
    sent: bool,
    /// The base it was sent with on this connection.
    base: Epoch,
    /// A live sync batch (nothing retained to send again).
    sync: Option<Live>,
}

/// The progress of a sync batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Live {
    /// Frames numbered so far.
    frames: u32,
    ended: bool,
    /// Frames the target reported durable.
    durable: u32,
}

/// Counters for status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub connects: u64,
    pub disconnects: u64,
    pub epochs_sent: u64,
    pub epochs_resent: u64,
    pub resyncs: u64,
    pub abandoned: u64,
    pub overflows: u64,
    pub commits: u64,
}

/// What status shows of a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub state: State,
    pub committed: Epoch,
    /// Epochs retained (closed, not committed).
    pub retained: usize,
    /// Batches sent, not committed.
    pub in_flight: usize,
    /// Since when some write is known not to be in any retained epoch (behind).
    pub behind_since: Option<Instant>,
    pub last_error: Option<String>,
    pub counters: Counters,
    pub resync: Option<(Epoch, &'static str)>,
}

/// The agent side of one volume's replication.
#[derive(Debug)]
pub struct AgentSession {
    cfg: AgentConfig,
    link: Link,
    backoff: Duration,
    actions: VecDeque<Action>,
    /// The target's committed boundary, as last reported.
    committed: Epoch,
    /// The last id handed out.
    last_id: Epoch,
    /// The id of the last batch sent on this connection (the next batch's base).
    tail: Epoch,
    /// The highest epoch id ever sent (to count resends).
    high: Epoch,
    retained: VecDeque<Retained>,
    /// Resyncs in the chain, not committed (the last one is the current).
    resyncs: Vec<Resync>,
    /// True when every write since `committed` is in `retained` (no bitmap-only changes).
    clean: bool,
    replica: Option<ReplicaState>,
    next_close: Instant,
    behind_since: Option<Instant>,
    /// When the target last showed progress (a commit, a welcome), or when the first batch
    /// was sent after a quiet time.
    progress_at: Instant,
    /// Batches in flight and no progress for `stall_after`.
    stalled: bool,
    last_error: Option<String>,
    counters: Counters,
    compression: Compression,
    max_frame: u32,
}

impl AgentSession {
    /// A session that connects at once. `clean` is false: after a start, the bitmap may hold
    /// changes no epoch has (a crash, or a stop before everything was committed).
    pub fn new(cfg: AgentConfig, now: Instant) -> AgentSession {
        let backoff = cfg.reconnect_min;
        let next_close = now + cfg.epoch_interval;
        AgentSession {
            compression: cfg.hello.compression.first().copied().unwrap_or(Compression::Off),
            max_frame: cfg.hello.max_frame,
            cfg,
            link: Link::Down { at: now },
            backoff,
            actions: VecDeque::new(),
            committed: Epoch::ZERO,
            last_id: Epoch::ZERO,
            tail: Epoch::ZERO,
            high: Epoch::ZERO,
            retained: VecDeque::new(),
            resyncs: Vec::new(),
            clean: false,
            replica: None,
            next_close,
            behind_since: Some(now),
            progress_at: now,
            stalled: false,
            last_error: None,
            counters: Counters::default(),
        }
    }

    /// The compression and frame size negotiated at the last welcome.
    pub fn negotiated(&self) -> (Compression, u32) {
        (self.compression, self.max_frame)
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.link {
            Link::Down { at } => Some(at.min(self.next_close)),
            Link::Stopped => None,
            _ => Some(self.next_close),
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let waiting = self.awaiting() > 0;
        if !waiting {
            self.progress_at = now;
        }
        let stalled = self.link == Link::Up
            && waiting
            && now.duration_since(self.progress_at) >= self.cfg.stall_after;
        if stalled && !self.stalled {
            self.last_error = Some(format!(
                "no commit from the target for {:?} with batches in flight",
                now.duration_since(self.progress_at)
            ));
        }
        self.stalled = stalled;
        if let Link::Down { at } = self.link {
            if now >= at {
                self.link = Link::Connecting;
                self.actions.push_back(Action::Connect);
            }
        }
        if now >= self.next_close {
            self.next_close = now + self.cfg.epoch_interval;
            if self.link != Link::Stopped {
                self.actions.push_back(Action::CloseEpoch);
            }
        }
    }

    /// The driver asks to close an epoch early (size reached, flush barrier, quiesce).
    pub fn close_now(&mut self, now: Instant) {
        self.next_close = now + self.cfg.epoch_interval;
        self.actions.push_back(Action::CloseEpoch);
    }

    pub fn connected(&mut self, _now: Instant) {
        if self.link != Link::Connecting {
            return;
        }
        self.link = Link::Hello;
        self.counters.connects += 1;
        let mut hello = self.cfg.hello.clone();
        hello.version = VERSION;
        self.actions.push_back(Action::Send(AgentMsg::Hello(hello)));
    }

    pub fn disconnected(&mut self, now: Instant, reason: String) {
        if matches!(self.link, Link::Down { .. } | Link::Stopped) {
            return;
        }
        if self.link == Link::Up {
            self.counters.disconnects += 1;
        }
        self.last_error = Some(reason);
        self.link = Link::Down { at: now + self.backoff };
        self.backoff = (self.backoff * 2).min(self.cfg.reconnect_max);
        // Batches not committed are lost with the connection: the target forgets them. A
        // resync cannot be resumed (its blocks were read from the image as they were), so the
        // bitmap (whose bits are still set) drives a new one after the reconnect.
        if !self.resyncs.is_empty() {
            self.abandon_all();
        }
        // Sync batches cannot be sent again, and the target seals each after the frames that
        // reached it (which the session cannot know): they go, and the bitmap, whose bits
        // only commits seen here cleared, drives a catch-up after the reconnect.
        if self.retained.iter().any(|r| r.sync.is_some()) {
            self.clean = false;
            self.behind_since.get_or_insert(now);
            let actions = &mut self.actions;
            self.retained.retain(|r| {
                if r.sync.is_some() {
                    actions.push_back(Action::DropEpoch { seq: r.seq });
                }
                r.sync.is_none()
            });
        }
        for r in &mut self.retained {
            r.sent = false;
        }
    }

    fn abandon_all(&mut self) {
        for r in self.resyncs.drain(..) {
            if r.phase != Phase::Ended {
                self.counters.abandoned += 1;
                self.actions.push_back(Action::EndResync { id: r.id, through: ABANDONED });
            }
        }
        self.clean = false;
        self.actions.push_back(Action::SetBuffering(false));
        self.drop_retained();
    }

    fn drop_retained(&mut self) {
        if !self.retained.is_empty() {
            self.retained.clear();
            self.actions.push_back(Action::DropEpochs);
        }
    }

    pub fn handle_control(&mut self, now: Instant, msg: TargetMsg) {
        match msg {
            TargetMsg::Welcome(w) => self.welcome(now, w),
            TargetMsg::Refused(r)
                if matches!(r.code, RefuseCode::Busy | RefuseCode::Unavailable) =>
            {
                // Another session holds the volume (an old connection of ours not yet timed
                // out at the target, or another agent), or the target's store is failing
                // (full disk, I/O error): try again later.
                let backoff = self.cfg.error_backoff;
                self.disconnect(now, r.message, backoff);
            }
            TargetMsg::Refused(r) => {
                self.link = Link::Stopped;
                self.last_error = Some(r.message.clone());
                self.actions.push_back(Action::Stopped { code: r.code, message: r.message });
            }
            TargetMsg::Committed { through } => self.committed(now, through),
            TargetMsg::Failed { id, kind: BatchKind::Epoch, code: FailCode::Checksum, message }
                if self.link == Link::Up && self.retained.iter().any(|r| r.id == id && r.sent) =>
            {
                // Damaged on the way: the target dropped only this batch; send it again on a
                // new stream, same id and base (the rest of the chain waits for it there).
                if let Some(r) = self.retained.iter().find(|r| r.id == id) {
                    self.counters.epochs_resent += 1;
                    self.last_error =
                        Some(format!("epoch {id} damaged in transit, sent again: {message}"));
                    self.actions.push_back(Action::SendEpoch { seq: r.seq, id, base: r.base });
                }
            }
            TargetMsg::Failed { id, kind, code, message } => {
                let msg = format!("target dropped {kind:?} batch {id}: {code:?}: {message}");
                let backoff = match code {
                    FailCode::NoSpace | FailCode::Io => self.cfg.error_backoff,
                    FailCode::Checksum | FailCode::Malformed => self.cfg.reconnect_min,
                };
                // The chain is broken at `id`: start over from the committed boundary on a
                // new connection (the retained epochs are sent again, a resync is redone).
                self.disconnect(now, msg, backoff);
            }
            TargetMsg::Durable { id, frames } => self.durable(now, id, frames),
            TargetMsg::Hashes { .. } | TargetMsg::Pong { .. } => {}
        }
    }

    fn durable(&mut self, now: Instant, id: Epoch, frames: u32) {
        if self.link != Link::Up {
            return;
        }
        let Some(live) =
            self.retained.iter_mut().find(|r| r.id == id).and_then(|r| r.sync.as_mut())
        else {
            // A batch already committed (its commit came first) or of an older connection.
            return;
        };
        if frames > live.frames {
            let reason = format!(
                "the target reported {frames} frames of sync batch {id} durable, {} were sent",
                live.frames
            );
            return self.disconnect(now, reason, self.cfg.reconnect_min);
        }
        if frames > live.durable {
            live.durable = frames;
            self.progress_at = now;
            self.stalled = false;
            self.actions.push_back(Action::Durable { id, frames });
        }
    }

    /// Opens a live sync batch for the capture's open epoch `seq` and returns its header (the
    /// driver opens a stream and writes it). `None` unless the session is in sync: connected,
    /// clean (no catch-up owed), no resync, every retained epoch sent, no other sync batch
    /// open; the driver then keeps buffering (or tracking) the epoch as in async mode, and
    /// the write waits for the catch-up.
    pub fn sync_open(&mut self, now: Instant, seq: u64) -> Option<BatchHeader> {
        let ready = self.link == Link::Up
            && self.clean
            && self.resyncs.is_empty()
            && self.retained.iter().all(|r| r.sent && r.sync.is_none_or(|l| l.ended));
        if !ready {
            return None;
        }
        if self.in_flight() == 0 {
            self.progress_at = now;
        }
        self.last_id = self.last_id.next();
        let id = self.last_id;
        let base = self.tail;
        self.tail = id;
        self.high = self.high.max(id);
        self.counters.epochs_sent += 1;
        self.retained.push_back(Retained {
            seq,
            id,
            sent: true,
            base,
            sync: Some(Live { frames: 0, ended: false, durable: 0 }),
        });
        Some(BatchHeader { kind: BatchKind::Sync, id, base })
    }

    /// The next frame of live sync batch `id` is sent: returns its sequence number (the write
    /// is durable once a `Durable` reports more frames than that). `None` if the batch is not
    /// open any more (the connection broke: the write is only in the bitmap).
    pub fn sync_frame(&mut self, id: Epoch) -> Option<u32> {
        let live = self.open_live(id)?;
        let seq = live.frames;
        live.frames += 1;
        Some(seq)
    }

    /// The epoch of live sync batch `id` closed: the driver sends its `End` (through = `id`)
    /// with the count returned here; the batch then waits for its commit. `None` if it is not
    /// open (dropped at a disconnect: its stream died with the connection).
    pub fn sync_end(&mut self, _now: Instant, id: Epoch) -> Option<u32> {
        let live = self.open_live(id)?;
        live.ended = true;
        Some(live.frames)
    }

    /// Live sync batch `id` while it is still open (not ended, not dropped).
    fn open_live(&mut self, id: Epoch) -> Option<&mut Live> {
        self.retained
            .iter_mut()
            .find(|r| r.id == id)
            .and_then(|r| r.sync.as_mut())
            .filter(|l| !l.ended)
    }

    /// The open live sync batch, if any.
    pub fn live_sync(&self) -> Option<Epoch> {
        self.retained.iter().find(|r| r.sync.is_some_and(|l| !l.ended)).map(|r| r.id)
    }

    fn disconnect(&mut self, now: Instant, reason: String, backoff: Duration) {
        self.actions.push_back(Action::Disconnect { reason: reason.clone() });
        self.disconnected(now, reason);
        if let Link::Down { .. } = self.link {
            self.link = Link::Down { at: now + backoff };
        }
    }

    fn welcome(&mut self, now: Instant, w: Welcome) {
        if self.link != Link::Hello {
            return self.disconnect(now, "unexpected welcome".into(), self.cfg.reconnect_min);
        }
        self.link = Link::Up;
        self.progress_at = now;
        self.stalled = false;
        self.backoff = self.cfg.reconnect_min;
        self.last_error = None;
        self.compression = w.compression;
        self.max_frame = w.max_frame.min(self.cfg.hello.max_frame);
        self.replica = Some(w.state);
        self.tail = w.committed;
        // Ids must stay above anything the target has seen.
        self.last_id = self.last_id.max(w.committed);
        // Retained epochs the target already committed (its ack was lost) are released.
        let regressed = w.committed < self.committed;
        self.committed = w.committed;
        let upto = self.retained.iter().take_while(|r| r.id <= w.committed).last().map(|r| r.seq);
        if upto.is_some() {
            self.retained.retain(|r| r.id > w.committed);
            let clear = if self.clean { Clear::Epochs } else { Clear::Nothing };
            self.actions.push_back(Action::Committed {
                through: w.committed,
                upto_seq: upto,
                clear,
            });
        }
        if regressed {
            // The target lost commits it had acknowledged (its store was restored or replaced):
            // bits were cleared for them, so only a full comparison is safe.
            self.last_error = Some(format!(
                "the target's committed epoch went back to {}; comparing the whole volume",
                w.committed
            ));
            self.cfg.full_compare = true;
            self.start_resync(now, w.state);
        } else if w.state == ReplicaState::Consistent && self.clean && !self.cfg.full_compare {
            self.pump();
        } else {
            self.start_resync(now, w.state);
        }
    }

    fn start_resync(&mut self, now: Instant, replica: ReplicaState) {
        self.clean = false;
        self.behind_since.get_or_insert(now);
        self.drop_retained();
        self.actions.push_back(Action::SetBuffering(false));
        let kind = if replica == ReplicaState::Consistent {
            BatchKind::Resync
        } else {
            BatchKind::Initial
        };
        self.last_id = self.last_id.next();
        let id = self.last_id;
        let base = self.tail;
        self.tail = id;
        self.resyncs.push(Resync { id, kind, phase: Phase::Draining, through: ABANDONED });
        self.counters.resyncs += 1;
        let compare = match replica {
            ReplicaState::Seeded => true,
            ReplicaState::Consistent => self.cfg.full_compare,
            ReplicaState::Empty => false,
        };
        self.actions.push_back(Action::StartResync { id, base, kind, compare });
    }

    /// The capture closed epoch `seq` (non-empty).
    pub fn epoch_closed(&mut self, now: Instant, seq: u64) {
        if self.resyncs.last().is_some_and(|r| r.phase == Phase::Draining)
            || !self.clean && self.resyncs.is_empty()
        {
            // Captured before the resync's reads began (buffering was still on when the
            // resync started) or while no resync runs: the bitmap has these writes and the
            // (next) resync reads them; shipping this epoch after it would bring older data
            // back. Dropped.
            self.actions.push_back(Action::DropEpoch { seq });
            self.after_close(now);
            return;
        }
        self.last_id = self.last_id.next();
        self.retained.push_back(Retained {
            seq,
            id: self.last_id,
            sent: false,
            base: Epoch::ZERO,
            sync: None,
        });
        self.after_close(now);
        self.pump();
    }

    /// A close found the open epoch empty.
    pub fn epoch_empty(&mut self, now: Instant) {
        self.after_close(now);
    }

    fn after_close(&mut self, _now: Instant) {
        // A resync whose reading is done ends with the epoch closed right after it.
        let last = self.last_id;
        if let Some(r) = self.resyncs.last_mut() {
            if r.phase == Phase::Ended && r.through == ABANDONED {
                r.through = last;
                self.actions.push_back(Action::EndResync { id: r.id, through: last });
            }
        }
    }

    /// The capture overflowed its budget and turned buffering off.
    pub fn overflowed(&mut self, now: Instant) {
        self.counters.overflows += 1;
        self.behind_since.get_or_insert(now);
        self.clean = false;
        for r in &mut self.resyncs {
            if r.phase != Phase::Ended {
                r.phase = Phase::Ended;
                self.counters.abandoned += 1;
                self.actions.push_back(Action::EndResync { id: r.id, through: ABANDONED });
            }
        }
        self.drop_retained();
        if self.link == Link::Up {
            match self.replica {
                Some(ReplicaState::Consistent) => self.start_resync(now, ReplicaState::Consistent),
                _ => {
                    // The first copy writes straight into the replica's image, which is only
                    // right when no journaled batch comes before it in the chain: start the
                    // initial sync again on a new session (the target forgets the old one's
                    // uncommitted batches; what was copied already is compared, not resent).
                    let reason =
                        "epoch buffer overflow during the initial sync: restarting it".to_string();
                    self.disconnect(now, reason, self.cfg.reconnect_min);
                }
            }
        }
    }

    /// Progress of resync `id`: `remaining` bytes left in its to-send set.
    pub fn resync_progress(&mut self, _now: Instant, id: Epoch, remaining: u64) {
        let threshold = self.cfg.final_threshold;
        if let Some(r) = self.resyncs.last_mut() {
            if r.id == id && r.phase == Phase::Draining && remaining <= threshold {
                r.phase = Phase::Final;
                self.actions.push_back(Action::SetBuffering(true));
            }
        }
    }

    /// Resync `id` has read everything (its to-send set is empty and buffering is on).
    pub fn resync_read_done(&mut self, now: Instant, id: Epoch) {
        if let Some(r) = self.resyncs.last_mut() {
            if r.id == id && r.phase == Phase::Final {
                r.phase = Phase::Ended;
                // `through` = the epoch closed next (after_close), or this resync itself if
                // nothing was written since buffering turned on.
                self.close_now(now);
            }
        }
    }

    fn committed(&mut self, now: Instant, through: Epoch) {
        if through <= self.committed {
            return;
        }
        self.progress_at = now;
        self.stalled = false;
        self.committed = through;
        self.counters.commits += 1;
        // The first commit makes the replica consistent (a later overflow catches up from
        // the bitmap; it does not restart the initial sync).
        self.replica = Some(ReplicaState::Consistent);
        let mut upto = None;
        while let Some(r) = self.retained.front() {
            if r.id > through {
                break;
            }
            upto = Some(r.seq);
            self.retained.pop_front();
        }
        let mut ended_resync = false;
        self.resyncs.retain(|r| {
            if r.id <= through {
                ended_resync |= r.through != ABANDONED && r.through <= through;
                false
            } else {
                true
            }
        });
        let clear = if ended_resync && self.resyncs.is_empty() {
            // Every write since the resync's final phase began is in an epoch: buffered mode.
            self.clean = true;
            self.behind_since = None;
            self.cfg.full_compare = false;
            Clear::All
        } else if self.clean {
            Clear::Epochs
        } else {
            Clear::Nothing
        };
        let _ = now;
        self.actions.push_back(Action::Committed { through, upto_seq: upto, clear });
        self.pump();
    }

    /// Sends retained epochs in order while the window allows. During a catch-up, epochs
    /// after the resync are sent too (the target stages them until the resync ends).
    fn pump(&mut self) {
        if self.link != Link::Up {
            return;
        }
        let in_flight = self.in_flight();
        let mut room = self.cfg.window.saturating_sub(in_flight);
        for r in self.retained.iter_mut() {
            if room == 0 {
                break;
            }
            if r.sent {
                continue;
            }
            if r.id <= self.high {
                // Sent before on an earlier connection: sent again now.
                self.counters.epochs_resent += 1;
            }
            self.high = self.high.max(r.id);
            r.sent = true;
            self.counters.epochs_sent += 1;
            let base = self.tail;
            r.base = base;
            self.tail = r.id.max(self.tail);
            room -= 1;
            self.actions.push_back(Action::SendEpoch { seq: r.seq, id: r.id, base });
        }
    }

    fn in_flight(&self) -> usize {
        self.retained.iter().filter(|r| r.sent).count() + self.resyncs.len()
    }

    /// Batches that wait for an answer of the target: [`AgentSession::in_flight`] without
    /// an open sync batch whose frames are all durable (it is quiet, not stalled: the epoch
    /// has had no write since).
    fn awaiting(&self) -> usize {
        let quiet = |r: &Retained| r.sync.is_some_and(|l| !l.ended && l.durable == l.frames);
        self.retained.iter().filter(|r| r.sent && !quiet(r)).count() + self.resyncs.len()
    }

    /// True when [`AgentSession::sync_open`] would open a sync batch once the open epoch
    /// closes: connected, clean (no catch-up owed), no resync, every retained epoch sent and
    /// room in the window for the epoch being closed. The driver asks before it turns the
    /// capture's live sending on at an epoch close, so that every write of the next epoch goes
    /// live.
    pub fn sync_ready(&self) -> bool {
        self.link == Link::Up
            && self.clean
            && self.resyncs.is_empty()
            && self.retained.iter().all(|r| r.sent)
            && self.in_flight() < self.cfg.window
    }

    pub fn state(&self) -> State {
        match self.link {
            Link::Stopped => State::Stopped,
            Link::Down { .. } => State::Disconnected,
            Link::Connecting | Link::Hello => State::Connecting,
            Link::Up => {
                if self.resyncs.iter().any(|r| r.kind == BatchKind::Initial) {
                    State::InitialSync
                } else if self.clean && !self.stalled {
                    State::InSync
                } else {
                    State::Behind
                }
            }
        }
    }

    pub fn status(&self) -> Status {
        Status {
            state: self.state(),
            committed: self.committed,
            retained: self.retained.len(),
            in_flight: self.in_flight(),
            behind_since: self.behind_since,
            last_error: self.last_error.clone(),
            counters: self.counters,
            resync: self.resyncs.last().map(|r| {
                (
                    r.id,
                    match r.phase {
                        Phase::Draining => "draining",
                        Phase::Final => "final",
                        Phase::Ended => "ended",
                    },
                )
            }),
        }
    }
}
