//! Sync mode's part of the replication driver (issue 5; docs/decisions.md "Synchronous
//! replication"). A child of `shipper`: these are methods of its `Driver`.
//!
//! ```text
//!  NBD write ─► Capture ─LiveWrite─► live_write: frames ─► live stream task ─► target (Sync batch)
//!     ▲                                  │ SyncAcks.sent                          │
//!     └──── SyncOutcome ◄── SyncAcks ◄───┴──── Durable / Committed ◄── control ◄──┘
//! ```
//!
//! **Going live.** Live sending is switched at an epoch close, atomically with it
//! ([`Capture::close_epoch_live`]): every write of the epoch after the close is sent live and
//! belongs to the sync batch opened for that epoch ([`AgentSession::sync_open`]); the epoch
//! closed there ships as an ordinary epoch before it in the chain. The driver only goes live
//! when the session is ready (connected, clean, no catch-up: [`AgentSession::sync_ready`]).
//! While live, each close ends the epoch's sync batch (`End`) and opens the next epoch's.
//!
//! **Answers.** A write is answered `Durable` when a `Durable` of its batch covers its last
//! frame, or when the target holds every write of its capture epoch ("covered": a commit in
//! clean mode of the epochs through it, a completed catch-up, or a `Durable` of a later sync
//! batch, which promises every batch before it). Writes are answered in capture order.
//!
//! **Breaks.** When the session drops the live batch (the connection broke, the buffer
//! overflowed) or a write waits longer than `ack-timeout` (which closes the connection),
//! `degrade` turns live sending off and answers every waiting write `Degraded` (it is on the
//! local disk and in the bitmap: the catch-up ships it); `block` keeps live sending on and
//! holds every write until the target has its epoch (after the reconnection's catch-up) or
//! `block-timeout` passes (EIO). Either way the volume goes live again by itself once the
//! session is clean.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use blockferry_protocol::repl::agent::Clear;
use blockferry_protocol::repl::frame::{BatchWriter, Frame};
use blockferry_protocol::repl::{BatchHeader, Epoch};
use bytes::{Bytes, BytesMut};
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{Driver, OnDisconnect};
use crate::repl::capture::{LiveContent, LiveWrite, SyncOutcome};
use crate::repl::syncacks::SyncAcks;

/// A frame's uncompressed bytes and their crc32c (`None` for a zero frame).
type Payload = (Bytes, u32);

/// The open live sync batch.
#[derive(Debug)]
pub(super) struct LiveBatch {
    pub id: Epoch,
    /// The capture epoch it carries.
    pub seq: u64,
    writer: BatchWriter,
    /// Encoded frames for the stream task.
    out: mpsc::UnboundedSender<Bytes>,
}

/// The answer to `blockferry volume set-mode`.
#[derive(Debug, Clone, Serialize)]
pub struct ModeChange {
    pub volume: String,
    pub previous: String,
    pub mode: String,
    pub state: String,
}

/// Sync mode's state in the driver.
#[derive(Debug)]
pub(super) struct SyncState {
    /// The volume's mode is sync.
    pub want: bool,
    /// Switched from async by the operator and not live yet: writes are acknowledged
    /// locally meanwhile ("syncing"), whatever the policy.
    pub switching: bool,
    pub live: Option<LiveBatch>,
    pub tx: mpsc::UnboundedSender<LiveWrite>,
    pub rx: mpsc::UnboundedReceiver<LiveWrite>,
    pub acks: SyncAcks,
    /// Why sync replication is not live (degraded, blocked), until it is live again.
    pub broken: Option<String>,
    /// Every write of the capture epochs through this one is at the target.
    pub covered: u64,
    /// A catch-up that ended: `(its id, the last capture epoch it covers)`.
    pub resync_cover: Option<(Epoch, u64)>,
    /// The capture epoch of each sync batch not yet committed.
    pub seqs: BTreeMap<Epoch, u64>,
    image: Option<std::fs::File>,
    /// Writes that failed with EIO (block policy).
    pub failed: u64,
    /// Sync frames sent.
    pub frames: u64,
}

impl SyncState {
    pub fn new(want: bool) -> SyncState {
        let (tx, rx) = mpsc::unbounded_channel();
        SyncState {
            want,
            switching: false,
            live: None,
            tx,
            rx,
            acks: SyncAcks::new(),
            broken: None,
            covered: 0,
            resync_cover: None,
            seqs: BTreeMap::new(),
            image: None,
            failed: 0,
            frames: 0,
        }
    }
}

/// Streams the frames of one live sync batch on its own uni stream, at the highest priority
/// (sync writes go before epochs and catch-ups). Ends when the batch's sender is dropped
/// (after its `End`); dies with the connection.
async fn live_stream(
    conn: quinn::Connection,
    header: BatchHeader,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
) -> Result<(), String> {
    let mut s = conn.open_uni().await.map_err(|e| e.to_string())?;
    let _ = s.set_priority(i32::MAX);
    let mut h = BytesMut::new();
    header.encode(&mut h);
    s.write_all(&h).await.map_err(|e| e.to_string())?;
    let mut chunks = Vec::new();
    while let Some(b) = rx.recv().await {
        // What is queued meanwhile goes in one write.
        chunks.push(b);
        while let Ok(b) = rx.try_recv() {
            chunks.push(b);
            if chunks.len() >= 64 {
                break;
            }
        }
        s.write_all_chunks(&mut chunks).await.map_err(|e| e.to_string())?;
        chunks.clear();
    }
    s.finish().map_err(|e| e.to_string())?;
    Ok(())
}

impl Driver {
    /// Block policy in force: writes that cannot be sent live wait (and are held).
    pub(super) fn sync_holds(&self) -> bool {
        self.sync.want && !self.sync.switching && self.opts.on_disconnect == OnDisconnect::Block
    }

    /// `Action::CloseEpoch`: closes the open epoch, and in sync mode ends the live batch and
    /// opens the next one (or goes live, or stops being live).
    pub(super) fn close_epoch(&mut self, now: Instant) {
        let go_live = self.sync.want
            && self.connection.is_some()
            && (self.sync.live.is_some() || self.session.sync_ready());
        let sink = (go_live || self.sync_holds()).then(|| self.sync.tx.clone());
        let (closed, next) = if self.sync.want || self.parts.capture.is_live() {
            self.parts.capture.close_epoch_live(sink)
        } else {
            (self.parts.capture.close_epoch(), 0)
        };
        // The writes of the closed epoch still queued join their batch before its end; the
        // next epoch's wait for its batch.
        let mut later = Vec::new();
        while let Ok(w) = self.sync.rx.try_recv() {
            if w.epoch >= next && next > 0 {
                later.push(w);
            } else {
                self.live_write(now, w);
            }
        }
        match (self.sync.live.take(), closed) {
            (Some(l), Some(ep)) if l.seq == ep.seq => {
                self.end_live(now, l);
                self.retained.insert(ep.seq, std::sync::Arc::new(ep));
            }
            (Some(l), None) if go_live => {
                // No write since it opened: it carries on into the next close.
                self.sync.live = Some(l);
            }
            (Some(l), closed) => {
                self.end_live(now, l);
                if let Some(ep) = closed {
                    let seq = ep.seq;
                    self.retained.insert(seq, std::sync::Arc::new(ep));
                    self.session.epoch_closed(now, seq);
                }
            }
            (None, Some(ep)) => {
                let seq = ep.seq;
                self.retained.insert(seq, std::sync::Arc::new(ep));
                self.session.epoch_closed(now, seq);
            }
            (None, None) => self.session.epoch_empty(now),
        }
        if go_live && self.sync.live.is_none() {
            match self.session.sync_open(now, next) {
                Some(h) => self.open_live(h, next),
                None => {
                    // Not ready after all (cannot happen while sync_ready held): the next
                    // epoch is not live.
                    let sink = self.sync_holds().then(|| self.sync.tx.clone());
                    self.parts.capture.set_live(sink);
                }
            }
        }
        for w in later {
            self.live_write(now, w);
        }
    }

    fn open_live(&mut self, h: BatchHeader, seq: u64) {
        let Some((conn, _)) = &self.connection else { return };
        let (out, rx) = mpsc::unbounded_channel();
        let conn = conn.clone();
        let volume = self.name().to_string();
        tokio::spawn(async move {
            if let Err(e) = live_stream(conn, h, rx).await {
                debug!(%volume, batch = %h.id, "sync stream ended early: {e}");
            }
        });
        self.sync.seqs.insert(h.id, seq);
        self.sync.live = Some(LiveBatch { id: h.id, seq, writer: BatchWriter::new(), out });
        if self.sync.broken.take().is_some() || self.sync.switching {
            info!(volume = %self.name(), batch = %h.id,
                "sync replication live: the replica is current, every new write waits for the target");
        }
        self.sync.switching = false;
    }

    /// Ends live batch `l`: its `End` after the frames sent.
    fn end_live(&mut self, now: Instant, l: LiveBatch) {
        if let Some(frames) = self.session.sync_end(now, l.id) {
            let end = l.writer.end(l.id);
            debug_assert_eq!(end.frames, frames);
            let mut out = BytesMut::new();
            Frame::End(end).encode(&mut out);
            let _ = l.out.send(out.freeze());
        }
    }

    /// A write captured while live sending was on.
    pub(super) fn live_write(&mut self, now: Instant, w: LiveWrite) {
        let live = self.sync.live.as_ref().is_some_and(|l| l.seq == w.epoch);
        if !live {
            if self.sync_holds() {
                self.sync.acks.hold(w.epoch, now, w.done);
            } else {
                // Not sent live (degraded, syncing, async): on the local disk, in the bitmap and
                // in its epoch; acknowledged as in async mode.
                let _ = w.done.send(SyncOutcome::Degraded);
            }
            return;
        }
        let (compression, max_frame) = self.session.negotiated();
        let bs = u64::from(self.parts.capture.block_size());
        let chunk = (u64::from(max_frame) / bs * bs).max(bs);
        // The frames' contents first (partial blocks read back from the image), so that a
        // failed read numbers no frame.
        let mut parts: Vec<(u64, u64, Option<Payload>)> = Vec::new();
        for p in &w.pieces {
            let mut at = 0;
            while at < p.len {
                let len = (p.len - at).min(chunk);
                let offset = p.offset + at;
                let data = match &p.content {
                    LiveContent::Zero => None,
                    LiveContent::Data(d, crc) if at == 0 && len == p.len => Some((d.clone(), *crc)),
                    LiveContent::Data(d, _) => {
                        let d = d.slice(at as usize..(at + len) as usize);
                        let crc = crc32c::crc32c(&d);
                        Some((d, crc))
                    }
                    LiveContent::Reread => match self.read_image(offset, len) {
                        Ok(d) => {
                            let crc = crc32c::crc32c(&d);
                            Some((Bytes::from(d), crc))
                        }
                        Err(e) => {
                            // The batch can no longer be a prefix of the writes: start over
                            // from the bitmap on a new connection.
                            let reason = format!("cannot read the image for a sync write: {e}");
                            self.sync_disconnect(now, &reason);
                            return self.live_write(now, w);
                        }
                    },
                };
                parts.push((offset, len, data));
                at += len;
            }
        }
        let mut out = BytesMut::new();
        let mut frames = 0;
        for (offset, len, data) in parts {
            let Some(l) = self.sync.live.as_mut() else { return };
            let Some(seq) = self.session.sync_frame(l.id) else {
                // The session no longer has the batch (cannot happen: the driver drops it
                // first when the session does).
                self.sync_disconnect(now, "the session lost its sync batch");
                return self.live_write(now, w);
            };
            let f = match data {
                Some((d, crc)) => l.writer.data(offset, d, crc, compression),
                None => l.writer.zero(offset, len as u32),
            };
            debug_assert_eq!(f.seq, seq);
            let wire = (f.payload.len() + 32) as u64;
            Frame::Data(f).encode(&mut out);
            self.counters.data.fetch_add(len, Relaxed);
            self.counters.wire.fetch_add(wire, Relaxed);
            self.sync.frames += 1;
            frames = seq + 1;
        }
        let Some(l) = self.sync.live.as_ref() else { return };
        let _ = l.out.send(out.freeze());
        let id = l.id;
        self.sync.acks.sent(id, frames, w.epoch, now, w.done);
    }

    fn read_image(&mut self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        let f = match &self.sync.image {
            Some(f) => f,
            None => self.sync.image.insert(std::fs::File::open(self.parts.volume.image_path())?),
        };
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    /// Sync replication broke: the session dropped its sync batches (the connection broke,
    /// the buffer overflowed) or is made to ([`Driver::sync_disconnect`]). The live batch, if
    /// the session still has it, ends where it is; the policy answers the waiting writes.
    pub(super) fn break_live(&mut self, now: Instant, reason: &str) {
        let had = match self.sync.live.take() {
            Some(l) => {
                self.end_live(now, l);
                true
            }
            None => false,
        };
        // The sync batches are gone with the session's (every path here drops them).
        self.sync.seqs.clear();
        if !self.sync.want || self.sync.switching {
            return;
        }
        match self.opts.on_disconnect {
            OnDisconnect::Degrade => {
                self.parts.capture.set_live(None);
                while let Ok(w) = self.sync.rx.try_recv() {
                    let _ = w.done.send(SyncOutcome::Degraded);
                }
                self.sync.acks.disconnected(OnDisconnect::Degrade, now);
            }
            OnDisconnect::Block => {
                self.sync.acks.disconnected(OnDisconnect::Block, now);
                self.parts.capture.set_live(Some(self.sync.tx.clone()));
            }
        }
        if had || self.sync.broken.is_none() {
            let policy = match self.opts.on_disconnect {
                OnDisconnect::Degrade => "degraded: writes go on locally, tracked in the bitmap",
                OnDisconnect::Block => "blocked: writes wait for the target",
            };
            warn!(volume = %self.name(), "sync replication {policy} ({reason})");
            self.sync.broken = Some(reason.to_string());
        }
    }

    /// The capture overflowed its budget: a live batch ends where it is (its frames were
    /// sent; the target commits it) before the session drops its batches and catches up.
    pub(super) fn sync_overflowed(&mut self, now: Instant) {
        if self.sync.live.is_none() {
            return;
        }
        // The writes queued for it join it first (the epoch did not close: they are its).
        while let Ok(w) = self.sync.rx.try_recv() {
            self.live_write(now, w);
        }
        self.break_live(now, "the epoch buffer went over budget");
    }

    /// Treats the target as unreachable: closes the connection (the session drops its
    /// batches and catches up from the bitmap after the reconnection) and breaks sync.
    pub(super) fn sync_disconnect(&mut self, now: Instant, reason: &str) {
        if let Some((c, _)) = self.connection.take() {
            c.close(3u32.into(), reason.as_bytes());
        }
        for (_, r) in self.resyncs.drain() {
            r.task.abort();
        }
        self.session.disconnected(now, reason.to_string());
        self.break_live(now, reason);
    }

    /// The target could not be reached, or the connection broke while not live: a sync
    /// volume that is not catching up after a mode switch is degraded (or blocked) now.
    pub(super) fn sync_unreachable(&mut self, reason: &str) {
        if self.sync.want && !self.sync.switching && self.sync.broken.is_none() {
            if self.sync.live.is_some() {
                return; // break_live says it when the session drops the batch
            }
            self.sync.broken = Some(reason.to_string());
        }
    }

    /// `Action::EndResync`: a catch-up that ends covers every write of the epochs closed so
    /// far.
    pub(super) fn sync_resync_ended(&mut self, id: Epoch, through: Epoch) {
        if through != blockferry_protocol::repl::agent::ABANDONED {
            let seq = self.parts.capture.open_seq().saturating_sub(1);
            self.sync.resync_cover = Some((id, seq));
        }
    }

    /// `Action::Committed`: answers the writes the commit covers.
    pub(super) fn sync_committed(&mut self, through: Epoch, upto_seq: Option<u64>, clear: Clear) {
        self.sync.acks.committed(through);
        if clear != Clear::Nothing {
            // Clean after the commit: every write of the released epochs is at the target;
            // but a sync batch may have ended before its epoch closed (a switch to async): an
            // open epoch is never covered.
            if let Some(u) = upto_seq {
                let closed = self.parts.capture.open_seq().saturating_sub(1);
                self.sync.covered = self.sync.covered.max(u.min(closed));
            }
        }
        if clear == Clear::All {
            if let Some((id, seq)) = self.sync.resync_cover {
                if id <= through {
                    self.sync.covered = self.sync.covered.max(seq);
                    self.sync.resync_cover = None;
                }
            }
        }
        self.sync.acks.covered(self.sync.covered);
        self.sync.seqs.retain(|id, _| *id > through);
    }

    /// `Action::Durable`: the frames of sync batch `id` through `frames`, and every batch
    /// before it, are durable at the target.
    pub(super) fn sync_durable(&mut self, id: Epoch, frames: u32) {
        if let Some(&seq) = self.sync.seqs.get(&id) {
            self.sync.acks.covered(seq.saturating_sub(1));
        }
        self.sync.acks.durable(id, frames);
    }

    /// When [`Driver::sync_tick`] must run next.
    pub(super) fn sync_deadline(&self) -> Option<Instant> {
        // Just after it: `overdue` and `expire` count a write late once it waited longer.
        let at = self.sync.acks.next_deadline(self.opts.ack_timeout, self.opts.block_timeout)?;
        Some(at + Duration::from_millis(1))
    }

    /// The time-outs of waiting writes: `ack-timeout` (a disconnect), `block-timeout` (EIO).
    pub(super) fn sync_tick(&mut self, now: Instant) {
        if self.sync.acks.overdue(now, self.opts.ack_timeout) {
            let reason = format!(
                "a sync write waited more than {:.1} s for the target (ack-timeout)",
                self.opts.ack_timeout.as_secs_f64()
            );
            // The policy answers or holds every waiting write: none is overdue after this.
            self.sync_disconnect(now, &reason);
        }
        let n = self.sync.acks.expire(now, self.opts.block_timeout);
        if n > 0 {
            self.sync.failed += n as u64;
            warn!(volume = %self.name(), writes = n,
                "sync writes failed with EIO: the target did not have them within block-timeout ({:.1} s)",
                self.opts.block_timeout.as_secs_f64());
        }
    }

    /// `blockferry volume set-mode`: async -> sync goes live once caught up ("syncing"
    /// meanwhile); sync -> async at once.
    pub(super) fn set_mode(&mut self, now: Instant, sync: bool) -> ModeChange {
        let name = |s: bool| if s { "sync" } else { "async" };
        let previous = name(self.sync.want).to_string();
        if sync != self.sync.want {
            info!(volume = %self.name(), from = %previous, to = name(sync), "replication mode changed by the operator");
            self.sync.want = sync;
            self.sync.broken = None;
            if sync {
                self.sync.switching = true;
            } else {
                self.sync.switching = false;
                // Async: every write is acknowledged after the local write.
                self.sync.acks.release_all();
            }
            // The switch happens at an epoch close: now.
            self.session.close_now(now);
        }
        {
            let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
            st.mode = name(sync).into();
        }
        ModeChange {
            volume: self.name().to_string(),
            previous,
            mode: name(sync).into(),
            state: self.sync_state().unwrap_or_else(|| self.session.state().name()).into(),
        }
    }

    /// The state shown in sync mode (`None`: the session's, as in async mode).
    pub(super) fn sync_state(&self) -> Option<&'static str> {
        use blockferry_protocol::repl::agent::State;
        if !self.sync.want || self.session.state() == State::Stopped {
            return None;
        }
        if self.sync.live.is_some() {
            return Some("in-sync");
        }
        if self.sync.switching || self.sync.broken.is_none() {
            return Some("syncing");
        }
        Some(match self.opts.on_disconnect {
            OnDisconnect::Degrade => "degraded",
            OnDisconnect::Block => "blocked",
        })
    }
}
