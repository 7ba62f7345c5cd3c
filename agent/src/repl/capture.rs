//! The epoch buffer of one volume for async replication (DESIGN.md, primary write path steps
//! 5 and 6): every completed write, trim and write-zeroes of the volume is recorded, block by
//! block, in the *open epoch*; the shipper closes epochs ([`Capture::close_epoch`]) and ships
//! what they hold.
//!
//! ```text
//!  NBD request ─► begin (overlap wait) ─► cbt begin_write ─► engine ─► guard.data/zero ─► cbt end
//!                                                                          │
//!          open epoch: BTreeMap<block, Data|Reread> + zero runs ◄──────────┘
//!                  │ close_epoch (atomic swap under the lock)
//!                  ▼
//!          ClosedEpoch seq 1, 2, 3 ... ─► shipper ─► release (budget back)
//! ```
//!
//! - **Order.** [`Capture::begin`] waits while an in-flight write overlaps the range, so
//!   overlapping writes reach the disk and the buffer in the same order (non-overlapping ones
//!   never wait). A write recorded before [`Capture::close_epoch`] is in the closed epoch; a
//!   write begun after it is in a later one (close and record take the same lock).
//! - **Coalescing.** A block written twice in one epoch is stored once (the newer data replaces
//!   the older; the budget counts it once). Trims and zeroings are kept as runs of blocks, not
//!   block by block, so zeroing a whole volume costs one entry.
//! - **Integrity.** Every data block carries its crc32c from the moment it is captured
//!   (invariant 5).
//! - **Partial blocks.** An unaligned write or zeroing covers partial blocks. If the open epoch
//!   already holds the whole block (data or zeros), the new bytes are applied to it. Otherwise
//!   the block is recorded as [`Block::Reread`]: the shipper reads it from the local image when
//!   it ships the epoch. The block it reads may then already carry a later epoch's write to the
//!   same block; that later epoch holds the block too, so the replica is exact again when it
//!   is applied. Unaligned writes are rare (clients use the 4 KiB block); this is the price of
//!   doing no I/O here.
//! - **Budget.** The open epoch plus every closed epoch not yet released may hold at most
//!   `budget` bytes (payload plus [`ENTRY_COST`] per entry). A capture that would exceed it
//!   drops the open epoch's content, turns buffering off and raises the overflow flag
//!   ([`Capture::take_overflow`], [`Capture::wait_event`]): the volume is *behind*, the bitmap
//!   alone says what to send. Nothing is lost: every captured write is also in the change
//!   tracking bitmap, whose bits are cleared only for committed epochs.
//! - **Buffering off.** Guards capture nothing (but still order overlapping writes, so that a
//!   write in flight when buffering is turned on is recorded in order).
//!
//! The capture of one volume is shared by every NBD connection of it (`Arc<Capture>`).

use std::collections::{btree_map, BTreeMap, VecDeque};
use std::iter::Peekable;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Instant;

use blockferry_protocol::repl::crc::{self, Combiner};
use bytes::{Bytes, BytesMut};
use serde::Serialize;

use crate::cbt::bitmap::Bitmap;
use tokio::sync::{mpsc, oneshot, Notify};

/// Budget charged per stored entry (a data or reread block, a zero run) on top of its payload:
/// the share of a B-tree node and the `Bytes` header, rounded up.
pub const ENTRY_COST: u64 = 64;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What an epoch holds for one block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Block {
    /// The block's bytes (`block_size`, shorter only for a short last block of the volume) and
    /// their crc32c, computed at capture.
    Data { data: Bytes, crc: u32 },
    /// The block reads as zeros.
    Zero,
    /// Partially written while the epoch did not hold the rest of it: read the block from the
    /// local image when shipping.
    Reread,
}

/// A stored data or reread block (zeros are kept as runs).
#[derive(Clone, Debug)]
enum Slot {
    Data(Bytes, u32),
    Reread,
}

impl Slot {
    fn cost(&self) -> u64 {
        match self {
            Slot::Data(d, _) => ENTRY_COST + d.len() as u64,
            Slot::Reread => ENTRY_COST,
        }
    }
}

/// The content of one epoch.
#[derive(Debug, Default)]
struct EpochData {
    /// Data and reread blocks by block index.
    blocks: BTreeMap<u64, Slot>,
    /// Zero runs `start -> end` (blocks `[start, end)`): disjoint from each other and from
    /// `blocks`, never adjacent (neighbours are merged).
    zeros: BTreeMap<u64, u64>,
    /// Budget held: payloads plus [`ENTRY_COST`] per entry.
    bytes: u64,
    /// When the first write was recorded.
    oldest: Option<Instant>,
}

impl EpochData {
    fn is_empty(&self) -> bool {
        self.blocks.is_empty() && self.zeros.is_empty()
    }

    /// The zero run holding block `b`.
    fn zero_run(&self, b: u64) -> Option<(u64, u64)> {
        let (&s, &e) = self.zeros.range(..=b).next_back()?;
        (b < e).then_some((s, e))
    }

    fn holds(&self, b: u64) -> bool {
        self.blocks.contains_key(&b) || self.zero_run(b).is_some()
    }

    fn get(&self, b: u64) -> Option<Block> {
        match self.blocks.get(&b) {
            Some(Slot::Data(d, crc)) => Some(Block::Data { data: d.clone(), crc: *crc }),
            Some(Slot::Reread) => Some(Block::Reread),
            None => self.zero_run(b).map(|_| Block::Zero),
        }
    }

    /// Takes blocks `[a, e)` out of the zero runs (splitting runs at the edges).
    fn unzero(&mut self, a: u64, e: u64) {
        if self.zeros.is_empty() {
            return;
        }
        let mut hit = Vec::new();
        if let Some((&s, &end)) = self.zeros.range(..a).next_back() {
            if end > a {
                hit.push((s, end));
            }
        }
        hit.extend(self.zeros.range(a..e).map(|(&s, &end)| (s, end)));
        for (s, end) in hit {
            self.zeros.remove(&s);
            self.bytes -= ENTRY_COST;
            if s < a {
                self.zeros.insert(s, a);
                self.bytes += ENTRY_COST;
            }
            if end > e {
                self.zeros.insert(e, end);
                self.bytes += ENTRY_COST;
            }
        }
    }

    /// Stores `slot` for block `b`; returns the payload bytes it replaced (coalesced).
    fn put(&mut self, b: u64, slot: Slot) -> u64 {
        self.unzero(b, b + 1);
        self.bytes += slot.cost();
        match self.blocks.insert(b, slot) {
            Some(old) => {
                self.bytes -= old.cost();
                match old {
                    Slot::Data(d, _) => d.len() as u64,
                    Slot::Reread => 0,
                }
            }
            None => 0,
        }
    }

    /// Makes blocks `[a, e)` one zero run (merged with its neighbours); returns the payload
    /// bytes it replaced.
    fn zero(&mut self, a: u64, e: u64) -> u64 {
        let mut replaced = 0;
        let keys: Vec<u64> = self.blocks.range(a..e).map(|(&k, _)| k).collect();
        for k in keys {
            if let Some(old) = self.blocks.remove(&k) {
                self.bytes -= old.cost();
                if let Slot::Data(d, _) = old {
                    replaced += d.len() as u64;
                }
            }
        }
        self.unzero(a, e);
        let (mut start, mut end) = (a, e);
        if let Some((&s, &pe)) = self.zeros.range(..a).next_back() {
            if pe == a {
                self.zeros.remove(&s);
                self.bytes -= ENTRY_COST;
                start = s;
            }
        }
        if let Some(ne) = self.zeros.remove(&e) {
            self.bytes -= ENTRY_COST;
            end = ne;
        }
        self.zeros.insert(start, end);
        self.bytes += ENTRY_COST;
        replaced
    }

    fn block_count(&self) -> u64 {
        self.blocks.len() as u64 + self.zeros.iter().map(|(s, e)| e - s).sum::<u64>()
    }
}

/// Counters of a capture.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CaptureStats {
    pub buffering: bool,
    /// Budget held by the open epoch.
    pub open_bytes: u64,
    /// Budget held by the open epoch and every closed epoch not yet released.
    pub held_bytes: u64,
    pub budget: u64,
    pub epochs_closed: u64,
    /// Payload bytes of the writes recorded (zeroings not counted).
    pub bytes_captured: u64,
    /// Payload bytes replaced by a newer write to the same block in the same epoch.
    pub coalesced_bytes: u64,
    /// Blocks recorded as "read from the image when shipping" (partial writes).
    pub reread_blocks: u64,
    /// Times the budget was exceeded and buffering turned off.
    pub overflows: u64,
}

#[derive(Debug)]
struct Inner {
    /// Sync mode: every completed write is also sent here at once (see [`LiveWrite`]).
    live: Option<mpsc::UnboundedSender<LiveWrite>>,
    /// Live writes were sent while the open epoch was open (it closes even if it is empty).
    live_in_open: bool,
    buffering: bool,
    open: EpochData,
    /// Close sequence number the open epoch will get.
    next_seq: u64,
    /// Closed epochs not yet released, oldest first: `(seq, bytes, content)`.
    closed: VecDeque<(u64, u64, Arc<EpochData>)>,
    closed_bytes: u64,
    threshold: u64,
    stats: CaptureStats,
}

/// Writes in flight, for the overlap wait.
#[derive(Debug, Default)]
struct InFlight {
    next_id: u64,
    /// `(id, start, end)` byte ranges.
    ranges: Vec<(u64, u64, u64)>,
    /// Tasks waiting for a range to be released.
    waiting: usize,
}

/// The epoch buffer of one volume. See the module documentation.
#[derive(Debug)]
pub struct Capture {
    me: Weak<Capture>,
    size: u64,
    block_size: u32,
    shift: u32,
    budget: u64,
    /// Mirror of `Inner::buffering` for the lock-free check of guards.
    buffering: AtomicBool,
    /// Mirror of `Inner::live.is_some()`.
    live_on: AtomicBool,
    overflow: AtomicBool,
    inner: Mutex<Inner>,
    /// Blocks written while buffering was off, or whose captured data was dropped (overflow,
    /// buffering turned off): the catch-up's next pass, and bits a bitmap clear must keep.
    /// Writers set bits under the read lock; [`Capture::take_unbuffered`] swaps the set
    /// under the write lock, so no bit set concurrently is lost.
    unbuffered: std::sync::RwLock<Arc<Bitmap>>,
    in_flight: Mutex<InFlight>,
    released: Notify,
    event: Notify,
    /// The live queue set up by [`Capture::hold_from_start`], until the driver takes it.
    start_queue: Mutex<Option<LiveQueue>>,
}

/// Both ends of a live queue: what the capture sends live writes into, and the driver reads.
pub type LiveQueue = (mpsc::UnboundedSender<LiveWrite>, mpsc::UnboundedReceiver<LiveWrite>);

impl Capture {
    /// The capture of a volume of `size` bytes tracked in blocks of `block_size` (a power of
    /// two: the volume's block size) that may hold `budget` bytes. Buffering starts off; the
    /// epoch-size event fires at a quarter of the budget ([`Capture::set_threshold`]).
    ///
    /// Panics if `block_size` is not a power of two (volume metadata guarantees it).
    pub fn new(size: u64, block_size: u32, budget: u64) -> Arc<Capture> {
        assert!(block_size.is_power_of_two(), "block size {block_size} is not a power of two");
        Arc::new_cyclic(|me| Capture {
            me: me.clone(),
            size,
            block_size,
            shift: block_size.trailing_zeros(),
            budget,
            buffering: AtomicBool::new(false),
            overflow: AtomicBool::new(false),
            live_on: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                live: None,
                live_in_open: false,
                buffering: false,
                open: EpochData::default(),
                next_seq: 1,
                closed: VecDeque::new(),
                closed_bytes: 0,
                threshold: budget / 4,
                stats: CaptureStats { budget, ..CaptureStats::default() },
            }),
            unbuffered: std::sync::RwLock::new(Arc::new(Bitmap::new(
                size.div_ceil(u64::from(block_size)),
            ))),
            in_flight: Mutex::new(InFlight::default()),
            released: Notify::new(),
            event: Notify::new(),
            start_queue: Mutex::new(None),
        })
    }

    /// Sync mode with the `block` policy: from now on every write goes into a live queue
    /// (and waits for its answer) until the replication driver takes the queue
    /// ([`Capture::take_start_queue`]) and answers them. Called before the NBD server
    /// binds, so that not even a write that comes before the driver starts is acknowledged
    /// before the DR site has it.
    pub fn hold_from_start(&self) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.set_live(Some(tx.clone()));
        *lock(&self.start_queue) = Some((tx, rx));
    }

    /// The live queue of [`Capture::hold_from_start`], if it was set up (once).
    pub fn take_start_queue(&self) -> Option<LiveQueue> {
        lock(&self.start_queue).take()
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Call before the local write of `[offset, offset + len)` is submitted. Waits while an
    /// in-flight write overlaps the range, so overlapping writes reach the disk and the buffer
    /// in the same order. Non-overlapping writes never wait.
    pub async fn begin(&self, offset: u64, len: u64) -> CaptureGuard<'_> {
        let end = offset.saturating_add(len);
        loop {
            let notified = {
                let mut f = lock(&self.in_flight);
                let busy = len > 0 && f.ranges.iter().any(|&(_, s, e)| s < end && offset < e);
                if !busy {
                    let id = f.next_id;
                    f.next_id += 1;
                    if len > 0 {
                        f.ranges.push((id, offset, end));
                    }
                    return CaptureGuard { capture: self, id, offset, len };
                }
                f.waiting += 1;
                // Created under the lock: the release that ends the overlap comes after it,
                // and `notify_waiters` wakes every `Notified` created before the call.
                self.released.notified()
            };
            notified.await;
            lock(&self.in_flight).waiting -= 1;
        }
    }

    fn end_in_flight(&self, id: u64, len: u64) {
        if len == 0 {
            return;
        }
        let mut f = lock(&self.in_flight);
        if let Some(i) = f.ranges.iter().position(|r| r.0 == id) {
            f.ranges.swap_remove(i);
        }
        let wake = f.waiting > 0;
        drop(f);
        if wake {
            self.released.notify_waiters();
        }
    }

    pub fn buffering(&self) -> bool {
        self.buffering.load(Ordering::Acquire)
    }

    /// Turns buffering on (when a catch-up starts: writes from then on are captured) or off
    /// (behind). Turning it off drops the open epoch's content (close it first to keep it);
    /// its writes are in the change-tracking bitmap.
    pub fn set_buffering(&self, on: bool) {
        let mut inner = lock(&self.inner);
        inner.buffering = on;
        self.buffering.store(on, Ordering::Release);
        if !on {
            let dropped = std::mem::take(&mut inner.open);
            self.mark_dropped(&dropped);
        }
        inner.stats.buffering = on;
    }

    /// The open epoch's size (budget bytes) at which [`Capture::wait_event`] resolves.
    pub fn set_threshold(&self, bytes: u64) {
        lock(&self.inner).threshold = bytes;
    }

    /// Atomically ends the open epoch and starts a new one. Returns its content, `None` if it
    /// is empty (no sequence number is used then). Writes recorded before this call are in
    /// the returned epoch, writes begun after it in a later one.
    pub fn close_epoch(&self) -> Option<ClosedEpoch> {
        let mut inner = lock(&self.inner);
        self.close_locked(&mut inner)
    }

    /// [`Capture::close_epoch`] and [`Capture::set_live`] at once (under one lock): every write
    /// recorded before the call is in the returned epoch and sent live or not as before; every
    /// write recorded after it is in the next epoch and sent live if `live` is `Some`. Also
    /// returns the sequence number the open epoch will get (its writes' [`LiveWrite::epoch`]).
    pub fn close_epoch_live(
        &self,
        live: Option<mpsc::UnboundedSender<LiveWrite>>,
    ) -> (Option<ClosedEpoch>, u64) {
        let mut inner = lock(&self.inner);
        let closed = self.close_locked(&mut inner);
        self.live_on.store(live.is_some(), Ordering::Release);
        inner.live = live;
        (closed, inner.next_seq)
    }

    /// The sequence number the open epoch will get when it closes.
    pub fn open_seq(&self) -> u64 {
        lock(&self.inner).next_seq
    }

    fn close_locked(&self, inner: &mut Inner) -> Option<ClosedEpoch> {
        if inner.open.is_empty() && !inner.live_in_open {
            return None;
        }
        inner.live_in_open = false;
        let data = Arc::new(std::mem::take(&mut inner.open));
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner.closed.push_back((seq, data.bytes, data.clone()));
        inner.closed_bytes += data.bytes;
        inner.stats.epochs_closed += 1;
        Some(ClosedEpoch {
            seq,
            bytes: data.bytes,
            oldest_write: data.oldest.unwrap_or_else(Instant::now),
            capture: self.me.clone(),
            block_size: self.block_size,
            size: self.size,
            data,
        })
    }

    /// Bytes held by the open epoch plus every closed epoch not yet released.
    pub fn held(&self) -> u64 {
        let inner = lock(&self.inner);
        inner.open.bytes + inner.closed_bytes
    }

    /// Gives back the budget of a closed epoch that was committed (or dropped). Releasing
    /// twice is harmless; dropping a [`ClosedEpoch`] releases it too.
    pub fn release(&self, epoch: &ClosedEpoch) {
        self.release_seq(epoch.seq);
    }

    fn release_seq(&self, seq: u64) {
        let mut inner = lock(&self.inner);
        if let Some(i) = inner.closed.iter().position(|c| c.0 == seq) {
            if let Some((_, bytes, _)) = inner.closed.remove(i) {
                inner.closed_bytes -= bytes;
            }
        }
    }

    /// Resolves when the open epoch's size reached the threshold ([`Capture::set_threshold`])
    /// or an overflow turned buffering off, also if that happened while nobody was waiting
    /// (one stored notification). May resolve when there is nothing to do any more: check
    /// [`Capture::take_overflow`] and the sizes after it.
    pub async fn wait_event(&self) {
        self.event.notified().await
    }

    /// True once after an overflow turned buffering off (take and reset).
    pub fn take_overflow(&self) -> bool {
        self.overflow.swap(false, Ordering::AcqRel)
    }

    /// The close sequence number of the newest epoch (the open one, numbered as it will be
    /// when closed, or a closed one not yet released) that holds block `block`, if any. For
    /// bitmap clearing: after epoch S committed, a block whose newest holder is later than S
    /// keeps its bit.
    pub fn newest_holder(&self, block: u64) -> Option<u64> {
        let inner = lock(&self.inner);
        if inner.open.holds(block) {
            return Some(inner.next_seq);
        }
        inner.closed.iter().rev().find(|c| c.2.holds(block)).map(|c| c.0)
    }

    /// Marks bytes `[offset, offset + len)` written while not buffered.
    fn mark_unbuffered(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return;
        }
        let set = self.unbuffered.read().unwrap_or_else(|e| e.into_inner());
        set.set_range(offset >> self.shift, ((end - 1) >> self.shift) + 1);
    }

    /// Marks every block of an epoch whose content is dropped.
    fn mark_dropped(&self, e: &EpochData) {
        let set = self.unbuffered.read().unwrap_or_else(|e| e.into_inner());
        for &b in e.blocks.keys() {
            set.set_range(b, b + 1);
        }
        for (&s, &end) in &e.zeros {
            set.set_range(s, end);
        }
    }

    /// Takes the set of blocks written unbuffered (see the field) as runs `(first, count)`,
    /// leaving it empty.
    pub fn take_unbuffered(&self) -> Vec<(u64, u64)> {
        let blocks = self.size.div_ceil(u64::from(self.block_size));
        let old = {
            let mut w = self.unbuffered.write().unwrap_or_else(|e| e.into_inner());
            std::mem::replace(&mut *w, Arc::new(Bitmap::new(blocks)))
        };
        let mut out = Vec::new();
        let mut at = 0;
        while at < blocks {
            let runs = old.runs(at, blocks, 4096);
            if runs.is_empty() {
                break;
            }
            for (n, dirty) in runs {
                if dirty {
                    out.push((at, n));
                }
                at += n;
            }
        }
        out
    }

    /// True if block `b` was written unbuffered since the last [`Capture::take_unbuffered`].
    pub fn is_unbuffered(&self, b: u64) -> bool {
        self.unbuffered.read().unwrap_or_else(|e| e.into_inner()).get(b)
    }

    /// When the open epoch's first write was captured.
    pub fn open_oldest(&self) -> Option<Instant> {
        lock(&self.inner).open.oldest
    }

    pub fn stats(&self) -> CaptureStats {
        let inner = lock(&self.inner);
        let mut s = inner.stats.clone();
        s.open_bytes = inner.open.bytes;
        s.held_bytes = inner.open.bytes + inner.closed_bytes;
        s
    }

    /// Bytes of block `b` (short only for a short last block).
    fn block_len(&self, b: u64) -> u64 {
        let start = b << self.shift;
        u64::from(self.block_size).min(self.size.saturating_sub(start))
    }

    /// Records completed data `data` at `offset`.
    fn record(&self, offset: u64, data: &[u8]) -> Option<SyncWait> {
        if data.is_empty() {
            return None;
        }
        let end = (offset + data.len() as u64).min(self.size);
        if offset >= end {
            return None;
        }
        let data = &data[..(end - offset) as usize];
        // The live pieces are made before the lock (the lock decides whether they are sent).
        let pieces =
            self.live_on.load(Ordering::Acquire).then(|| self.live_pieces(offset, end, Some(data)));
        if !self.buffering() {
            // In no epoch: the lock only if live sending looked on (a write that saw it off
            // is ordered before the switch).
            let wait = match pieces {
                Some(p) => self.send_live(&mut lock(&self.inner), Some(p), offset, end, Some(data)),
                None => None,
            };
            self.mark_unbuffered(offset, data.len() as u64);
            return wait;
        }
        let (first, last) = (offset >> self.shift, (end - 1) >> self.shift);
        // Whole blocks are copied and checksummed before the lock is taken.
        let mut whole: Vec<(u64, Slot)> = Vec::with_capacity((last - first + 1) as usize);
        let mut partial: Vec<(u64, usize, &[u8])> = Vec::new();
        for b in first..=last {
            let start = b << self.shift;
            let from = start.max(offset);
            let to = (start + self.block_len(b)).min(end);
            let piece = &data[(from - offset) as usize..(to - offset) as usize];
            if from == start && to - start == self.block_len(b) {
                whole.push((b, Slot::Data(Bytes::copy_from_slice(piece), crc32c::crc32c(piece))));
            } else {
                partial.push((b, (from - start) as usize, piece));
            }
        }
        let mut inner = lock(&self.inner);
        // Sent live and buffered under one lock: a write is in the epoch it is sent live with
        // (a close or a switch of live sending in between would part them).
        let wait = self.send_live(&mut inner, pieces, offset, end, Some(data));
        if !inner.buffering {
            drop(inner);
            self.mark_unbuffered(offset, end - offset);
            return wait;
        }
        let before = inner.open.bytes;
        let mut coalesced = 0;
        for (b, slot) in whole {
            coalesced += inner.open.put(b, slot);
        }
        for (b, from, piece) in partial {
            coalesced += self.patch(&mut inner, b, from, from + piece.len(), Some(piece));
        }
        inner.stats.bytes_captured += data.len() as u64;
        inner.stats.coalesced_bytes += coalesced;
        self.after_record(inner, before);
        wait
    }

    /// Records a completed trim or zeroing of `[offset, offset + len)`.
    fn record_zero(&self, offset: u64, len: u64) -> Option<SyncWait> {
        if len == 0 {
            return None;
        }
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return None;
        }
        let pieces =
            self.live_on.load(Ordering::Acquire).then(|| self.live_pieces(offset, end, None));
        if !self.buffering() {
            let wait = match pieces {
                Some(p) => self.send_live(&mut lock(&self.inner), Some(p), offset, end, None),
                None => None,
            };
            self.mark_unbuffered(offset, len);
            return wait;
        }
        let bs = u64::from(self.block_size);
        // Whole blocks [zf, ze); the last block of the volume is whole when `end` is the end.
        let zf = offset.div_ceil(bs);
        let ze = if end == self.size { end.div_ceil(bs) } else { end / bs };
        let (first, last) = (offset >> self.shift, (end - 1) >> self.shift);
        let mut inner = lock(&self.inner);
        let wait = self.send_live(&mut inner, pieces, offset, end, None);
        if !inner.buffering {
            drop(inner);
            self.mark_unbuffered(offset, end - offset);
            return wait;
        }
        let before = inner.open.bytes;
        let mut coalesced = 0;
        if zf < ze {
            coalesced += inner.open.zero(zf, ze);
        }
        let edges = if first == last { &[first][..] } else { &[first, last][..] };
        for &b in edges {
            if (zf..ze).contains(&b) {
                continue;
            }
            let start = b << self.shift;
            let from = (start.max(offset) - start) as usize;
            let to = ((start + self.block_len(b)).min(end) - start) as usize;
            coalesced += self.patch(&mut inner, b, from, to, None);
        }
        inner.stats.coalesced_bytes += coalesced;
        self.after_record(inner, before);
        wait
    }

    /// Sync mode: starts (`Some`) or stops (`None`) sending every completed write to `tx` as a
    /// [`LiveWrite`], in capture order, tagged with the open epoch. Writes completed after the
    /// call are sent; the receiver answers each write's [`SyncWait`].
    pub fn set_live(&self, tx: Option<mpsc::UnboundedSender<LiveWrite>>) {
        let mut inner = lock(&self.inner);
        self.live_on.store(tx.is_some(), Ordering::Release);
        inner.live = tx;
    }

    /// True while writes are sent live.
    pub fn is_live(&self) -> bool {
        self.live_on.load(Ordering::Acquire)
    }

    /// Sends the completed write or zeroing (`data: None`) of `[offset, end)` live if live
    /// sending is on, under the lock that orders it with epoch closes (the caller buffers it
    /// under the same lock). `pieces`: made before the lock, if it looked on then.
    fn send_live(
        &self,
        inner: &mut Inner,
        pieces: Option<Vec<LivePiece>>,
        offset: u64,
        end: u64,
        data: Option<&[u8]>,
    ) -> Option<SyncWait> {
        let epoch = inner.next_seq;
        let tx = inner.live.as_ref()?;
        let pieces = pieces.unwrap_or_else(|| self.live_pieces(offset, end, data));
        let (done, wait) = oneshot::channel();
        if tx.send(LiveWrite { epoch, pieces, done }).is_err() {
            return None;
        }
        inner.live_in_open = true;
        Some(SyncWait(wait))
    }

    /// The pieces of a live write or zeroing (`data: None`) of `[offset, end)`. Whole blocks
    /// travel as they are; a partial head or tail block is sent as "read it from the image"
    /// (the shipper reads the block after this write completed, so it holds this write).
    fn live_pieces(&self, offset: u64, end: u64, data: Option<&[u8]>) -> Vec<LivePiece> {
        let bs = u64::from(self.block_size);
        // Whole blocks [wf, we) by byte offsets; the last block of the volume is whole when
        // `end` is the end.
        let wf = offset.div_ceil(bs) * bs;
        let we = if end == self.size { end } else { end / bs * bs };
        let mut pieces = Vec::with_capacity(3);
        if wf < we {
            pieces.push(LivePiece {
                offset: wf,
                len: we - wf,
                content: match data {
                    Some(d) => {
                        let bytes = &d[(wf - offset) as usize..(we - offset) as usize];
                        LiveContent::Data(Bytes::copy_from_slice(bytes), crc32c::crc32c(bytes))
                    }
                    None => LiveContent::Zero,
                },
            });
        }
        let (first, last) = (offset >> self.shift, (end - 1) >> self.shift);
        for b in [first, last] {
            let start = b << self.shift;
            let whole = start >= wf && start < we;
            if !whole
                && !pieces.iter().any(|p| p.offset == start && p.content == LiveContent::Reread)
            {
                pieces.push(LivePiece {
                    offset: start,
                    len: self.block_len(b),
                    content: LiveContent::Reread,
                });
            }
        }
        pieces.sort_by_key(|p| p.offset);
        pieces
    }

    /// Applies a partial write (`Some(bytes)`) or zeroing (`None`) of bytes `[from, to)` of
    /// block `b`: onto the block if the open epoch holds all of it, else the block becomes
    /// [`Block::Reread`]. Returns the payload bytes replaced.
    fn patch(
        &self,
        inner: &mut Inner,
        b: u64,
        from: usize,
        to: usize,
        piece: Option<&[u8]>,
    ) -> u64 {
        let len = self.block_len(b) as usize;
        let base = match inner.open.blocks.get(&b) {
            Some(Slot::Data(d, _)) => Some(d.to_vec()),
            Some(Slot::Reread) => None,
            None if inner.open.zero_run(b).is_some() => {
                if piece.is_none() {
                    return 0; // zeros onto zeros
                }
                Some(vec![0; len])
            }
            None => None,
        };
        let slot = match base {
            Some(mut v) => {
                match piece {
                    Some(p) => v[from..to].copy_from_slice(p),
                    None => v[from..to].fill(0),
                }
                let crc = crc32c::crc32c(&v);
                Slot::Data(Bytes::from(v), crc)
            }
            None => {
                inner.stats.reread_blocks += 1;
                Slot::Reread
            }
        };
        inner.open.put(b, slot)
    }

    /// Budget check and the size event, after a record that started at `before` bytes.
    fn after_record(&self, mut inner: MutexGuard<'_, Inner>, before: u64) {
        if inner.open.oldest.is_none() && !inner.open.is_empty() {
            inner.open.oldest = Some(Instant::now());
        }
        let after = inner.open.bytes;
        if after + inner.closed_bytes > self.budget {
            let dropped = std::mem::take(&mut inner.open);
            self.mark_dropped(&dropped);
            inner.buffering = false;
            inner.stats.buffering = false;
            inner.stats.overflows += 1;
            self.buffering.store(false, Ordering::Release);
            self.overflow.store(true, Ordering::Release);
            drop(inner);
            self.event.notify_one();
            return;
        }
        let threshold = inner.threshold;
        drop(inner);
        if before < threshold && after >= threshold {
            self.event.notify_one();
        }
    }
}

/// A completed write sent live to the target (sync mode): its pieces in offset order, the
/// open epoch it belongs to, and where to answer.
#[derive(Debug)]
pub struct LiveWrite {
    /// Close sequence number of the epoch the write is in.
    pub epoch: u64,
    pub pieces: Vec<LivePiece>,
    /// Answered when the target has the write durably, or the policy decided otherwise.
    pub done: oneshot::Sender<SyncOutcome>,
}

/// A block-aligned part of a live write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LivePiece {
    pub offset: u64,
    pub len: u64,
    pub content: LiveContent,
}

/// What a live piece carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveContent {
    /// Whole blocks and their crc32c, computed at capture.
    Data(Bytes, u32),
    /// Whole blocks that read as zeros.
    Zero,
    /// A block written in part: read it from the local image.
    Reread,
}

/// How a sync write ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncOutcome {
    /// Durable at the target.
    Durable,
    /// Not at the target, acknowledged anyway: the volume degraded (policy `degrade`) and the
    /// bitmap holds the write.
    Degraded,
    /// Fails the write (policy `block`, the target stayed away): the reason.
    Failed(String),
}

/// What a sync write waits for before its acknowledgement.
#[derive(Debug)]
pub struct SyncWait(oneshot::Receiver<SyncOutcome>);

impl SyncWait {
    /// Waits for the outcome. A shipper that went away without answering counts as
    /// degraded (the write is on the local disk and in the bitmap).
    pub async fn outcome(self) -> SyncOutcome {
        self.0.await.unwrap_or(SyncOutcome::Degraded)
    }
}

/// Held from [`Capture::begin`] until the local write completed; overlapping writes wait
/// for it.
#[derive(Debug)]
#[must_use = "call data() or zero() when the local write completed"]
pub struct CaptureGuard<'a> {
    capture: &'a Capture,
    id: u64,
    offset: u64,
    len: u64,
}

impl CaptureGuard<'_> {
    /// The local write completed: records its bytes (copied) in the open epoch.
    /// `data.len()` is the length given to `begin`.
    /// In sync mode: returns what to wait for before acknowledging the write.
    pub fn data(self, data: &[u8]) -> Option<SyncWait> {
        debug_assert_eq!(data.len() as u64, self.len);
        self.capture.record(self.offset, data)
    }

    /// A trim or write-zeroes completed: the range reads as zeros at the source. In sync
    /// mode: returns what to wait for before acknowledging it.
    pub fn zero(self) -> Option<SyncWait> {
        self.capture.record_zero(self.offset, self.len)
    }
}

impl Drop for CaptureGuard<'_> {
    /// Dropped without `data` or `zero` (the local write failed): nothing is captured; the
    /// overlap wait of others ends all the same.
    fn drop(&mut self) {
        self.capture.end_in_flight(self.id, self.len);
    }
}

/// A closed epoch: its content, read-only, and the budget it holds until released.
#[derive(Debug)]
pub struct ClosedEpoch {
    /// 1, 2, 3... in close order.
    pub seq: u64,
    /// Budget held.
    pub bytes: u64,
    /// When its first write was captured (for RPO).
    pub oldest_write: Instant,
    capture: Weak<Capture>,
    block_size: u32,
    size: u64,
    data: Arc<EpochData>,
}

impl Drop for ClosedEpoch {
    fn drop(&mut self) {
        if let Some(c) = self.capture.upgrade() {
            c.release_seq(self.seq);
        }
    }
}

/// A run of adjacent blocks of the same kind, at most one frame long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    /// Byte offset in the volume.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    pub content: RunContent,
    /// crc32c of the data (0 for zeros and rereads).
    pub crc: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunContent {
    Data(Bytes),
    Zero,
    /// Read `[offset, offset + len)` from the local image when shipping.
    Reread,
}

impl ClosedEpoch {
    /// The block ranges `[first, end)` it holds, in order (for bitmap clearing).
    pub fn block_ranges(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self.data.blocks.keys().map(|&b| (b, b + 1)).collect();
        v.extend(self.data.zeros.iter().map(|(&s, &e)| (s, e)));
        v.sort_unstable();
        v
    }

    /// What the epoch holds for block `b`.
    pub fn get(&self, b: u64) -> Option<Block> {
        self.data.get(b)
    }

    /// Number of blocks it holds.
    pub fn block_count(&self) -> u64 {
        self.data.block_count()
    }

    /// Every block it holds, in block order (zero runs block by block).
    pub fn blocks(&self) -> impl Iterator<Item = (u64, Block)> + '_ {
        let shift = self.block_size.trailing_zeros();
        self.runs_of_blocks(1).map(move |r| {
            let block = match r.content {
                RunContent::Data(data) => Block::Data { data, crc: r.crc },
                RunContent::Zero => Block::Zero,
                RunContent::Reread => Block::Reread,
            };
            (r.offset >> shift, block)
        })
    }

    /// Its content in block order as runs of adjacent blocks of the same kind, each at most
    /// `max_frame` bytes (rounded down to whole blocks, at least one block). Merged data runs
    /// carry the crc32c of the merged bytes (combined from the blocks' crcs).
    pub fn runs(&self, max_frame: u32) -> Runs<'_> {
        let bs = u64::from(self.block_size);
        self.runs_of_blocks((u64::from(max_frame) / bs).max(1))
    }

    fn runs_of_blocks(&self, max_blocks: u64) -> Runs<'_> {
        Runs {
            shift: self.block_size.trailing_zeros(),
            bs: u64::from(self.block_size),
            size: self.size,
            max_blocks,
            blocks: self.data.blocks.iter().peekable(),
            zeros: self.data.zeros.iter(),
            zero: None,
            combiner: Combiner::new(u64::from(self.block_size)),
        }
    }
}

/// The iterator of [`ClosedEpoch::runs`].
#[derive(Debug)]
pub struct Runs<'a> {
    shift: u32,
    bs: u64,
    size: u64,
    max_blocks: u64,
    blocks: Peekable<btree_map::Iter<'a, u64, Slot>>,
    zeros: btree_map::Iter<'a, u64, u64>,
    /// The rest of the zero run being cut into frames.
    zero: Option<(u64, u64)>,
    /// Combines a block's crc onto the run's (built once: one product per merged block).
    combiner: Combiner,
}

impl Runs<'_> {
    /// Byte range of blocks `[first, end)`.
    fn bytes(&self, first: u64, end: u64) -> (u64, u64) {
        let start = first << self.shift;
        let stop = (end << self.shift).min(self.size.max(start));
        (start, stop - start)
    }
}

impl Iterator for Runs<'_> {
    type Item = Run;

    fn next(&mut self) -> Option<Run> {
        if self.zero.is_none() {
            self.zero = self.zeros.next().map(|(&s, &e)| (s, e));
        }
        let next_block = self.blocks.peek().map(|(&k, _)| k);
        if let Some((s, e)) = self.zero {
            if next_block.is_none_or(|k| s < k) {
                let stop = e.min(s + self.max_blocks);
                self.zero = (stop < e).then_some((stop, e));
                let (offset, len) = self.bytes(s, stop);
                return Some(Run { offset, len, content: RunContent::Zero, crc: 0 });
            }
        }
        let (&first, slot) = self.blocks.next()?;
        let mut end = first + 1;
        match slot {
            Slot::Reread => {
                while end - first < self.max_blocks
                    && matches!(self.blocks.peek(), Some((&k, Slot::Reread)) if k == end)
                {
                    self.blocks.next();
                    end += 1;
                }
                let (offset, len) = self.bytes(first, end);
                Some(Run { offset, len, content: RunContent::Reread, crc: 0 })
            }
            Slot::Data(d, crc) => {
                let (mut data, mut crc) = (d.clone(), *crc);
                let mut merged: Option<BytesMut> = None;
                while end - first < self.max_blocks {
                    let Some((&k, Slot::Data(next, next_crc))) = self.blocks.peek() else {
                        break;
                    };
                    if k != end {
                        break;
                    }
                    let m = merged.get_or_insert_with(|| {
                        let mut m = BytesMut::with_capacity((self.max_blocks * self.bs) as usize);
                        m.extend_from_slice(&data);
                        m
                    });
                    m.extend_from_slice(next);
                    crc = if next.len() as u64 == self.combiner.len() {
                        self.combiner.combine(crc, *next_crc)
                    } else {
                        crc::combine(crc, *next_crc, next.len() as u64)
                    };
                    self.blocks.next();
                    end += 1;
                }
                if let Some(m) = merged {
                    data = m.freeze();
                }
                let (offset, _) = self.bytes(first, end);
                Some(Run { offset, len: data.len() as u64, content: RunContent::Data(data), crc })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    const BS: u64 = 4096;

    /// Polls `f` once: `Some` if it completed without waiting.
    fn poll_once<F: Future>(f: std::pin::Pin<&mut F>) -> Option<F::Output> {
        match f.poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        }
    }

    /// `begin`, which must not wait.
    fn begin(c: &Capture, offset: u64, len: u64) -> CaptureGuard<'_> {
        poll_once(pin!(c.begin(offset, len))).expect("begin waited")
    }

    fn write(c: &Capture, offset: u64, data: &[u8]) {
        begin(c, offset, data.len() as u64).data(data);
    }

    fn zero(c: &Capture, offset: u64, len: u64) {
        begin(c, offset, len).zero();
    }

    fn on(size: u64, budget: u64) -> Arc<Capture> {
        let c = Capture::new(size, BS as u32, budget);
        c.set_buffering(true);
        c
    }

    fn data_of(e: &ClosedEpoch, b: u64) -> Vec<u8> {
        match e.get(b) {
            Some(Block::Data { data, crc }) => {
                assert_eq!(crc, crc32c::crc32c(&data), "block {b}: crc computed at capture");
                data.to_vec()
            }
            other => panic!("block {b}: {other:?}"),
        }
    }

    #[test]
    fn coalesces_overwrites_within_an_epoch() {
        let c = on(1 << 20, 1 << 20);
        write(&c, 0, &[1; BS as usize]);
        write(&c, 0, &[2; BS as usize]);
        write(&c, BS, &[3; 2 * BS as usize]);
        let s = c.stats();
        assert_eq!(s.open_bytes, 3 * (BS + ENTRY_COST), "block 0 counted once");
        assert_eq!(s.coalesced_bytes, BS);
        assert_eq!(s.bytes_captured, 4 * BS);
        let e = c.close_epoch().unwrap();
        assert_eq!((e.seq, e.block_count()), (1, 3));
        assert_eq!(data_of(&e, 0), vec![2; BS as usize], "the newer data");
        assert_eq!(data_of(&e, 2), vec![3; BS as usize]);
        // Zeroing over data replaces it; writing into a zero run splits it.
        write(&c, 0, &[4; 4 * BS as usize]);
        zero(&c, BS, 100 * BS);
        assert_eq!(c.stats().open_bytes, BS + ENTRY_COST + ENTRY_COST);
        write(&c, 50 * BS, &[5; BS as usize]);
        assert_eq!(c.stats().open_bytes, 2 * (BS + ENTRY_COST) + 2 * ENTRY_COST);
        zero(&c, 50 * BS, BS);
        assert_eq!(c.stats().open_bytes, BS + 2 * ENTRY_COST, "runs merged again");
        let e2 = c.close_epoch().unwrap();
        assert_eq!(e2.seq, 2);
        assert_eq!(e2.get(1), Some(Block::Zero));
        assert_eq!(e2.get(100), Some(Block::Zero));
        assert_eq!(e2.get(101), None);
        assert_eq!(e2.block_count(), 101);
    }

    #[tokio::test]
    async fn overflow_drops_the_open_epoch_and_turns_buffering_off() {
        let c = on(1 << 20, 3 * (BS + ENTRY_COST));
        write(&c, 0, &[1; 2 * BS as usize]);
        let e1 = c.close_epoch().unwrap();
        assert_eq!(c.held(), 2 * (BS + ENTRY_COST));
        assert!(!c.take_overflow());
        write(&c, 8 * BS, &[1; BS as usize]); // fits: 3 blocks held
        assert!(c.buffering());
        write(&c, 9 * BS, &[1; BS as usize]); // 4 > budget
        assert!(!c.buffering());
        assert!(c.take_overflow());
        assert!(!c.take_overflow(), "take-and-reset");
        tokio::time::timeout(std::time::Duration::from_secs(5), c.wait_event())
            .await
            .expect("the overflow is an event");
        assert_eq!(c.held(), e1.bytes, "open epoch dropped, closed one still held");
        assert!(c.close_epoch().is_none());
        // While off, nothing is captured.
        write(&c, 20 * BS, &[1; BS as usize]);
        assert_eq!(c.stats().open_bytes, 0);
        assert_eq!(c.stats().overflows, 1);
        c.release(&e1);
        c.release(&e1);
        assert_eq!(c.held(), 0, "released once, however often asked");
        c.set_buffering(true);
        write(&c, 20 * BS, &[1; BS as usize]);
        let e2 = c.close_epoch().unwrap();
        assert_eq!(e2.seq, 2);
        drop(e2);
        assert_eq!(c.held(), 0, "dropping a closed epoch releases it");
    }

    #[tokio::test]
    async fn size_threshold_is_an_event() {
        let c = on(1 << 20, 1 << 20);
        c.set_threshold(2 * BS);
        write(&c, 0, &[1; BS as usize]);
        let quick = tokio::time::timeout(std::time::Duration::from_millis(20), c.wait_event());
        assert!(quick.await.is_err(), "below the threshold");
        write(&c, BS, &[1; BS as usize]);
        tokio::time::timeout(std::time::Duration::from_secs(5), c.wait_event()).await.unwrap();
    }

    #[test]
    fn close_orders_writes_into_epochs() {
        let c = on(1 << 20, 1 << 20);
        write(&c, 0, &[1; BS as usize]);
        let in_flight = begin(&c, BS, BS);
        let e1 = c.close_epoch().unwrap();
        in_flight.data(&[2; BS as usize]); // completed after the close: next epoch
        write(&c, 2 * BS, &[3; BS as usize]); // begun after the close
        let e2 = c.close_epoch().unwrap();
        assert!(c.close_epoch().is_none(), "empty epochs are not numbered");
        write(&c, 3 * BS, &[4; BS as usize]);
        let e3 = c.close_epoch().unwrap();
        assert_eq!((e1.seq, e2.seq, e3.seq), (1, 2, 3));
        assert_eq!(e1.blocks().map(|(b, _)| b).collect::<Vec<_>>(), vec![0]);
        assert_eq!(e2.blocks().map(|(b, _)| b).collect::<Vec<_>>(), vec![1, 2]);
        assert!(e1.oldest_write <= e2.oldest_write);
        assert_eq!(c.stats().epochs_closed, 3);
    }

    #[test]
    fn overlapping_writes_are_captured_in_disk_order() {
        let c = on(1 << 20, 1 << 20);
        let first = begin(&c, 0, 2 * BS);
        let mut second = pin!(c.begin(BS, 2 * BS));
        assert!(poll_once(second.as_mut()).is_none(), "overlaps the first: waits");
        let other = begin(&c, 4 * BS, BS); // no overlap: never waits
        other.data(&[9; BS as usize]);
        first.data(&[1; 2 * BS as usize]);
        let second = poll_once(second.as_mut()).expect("the first is done");
        second.data(&[2; 2 * BS as usize]);
        let e = c.close_epoch().unwrap();
        assert_eq!(data_of(&e, 0), vec![1; BS as usize]);
        assert_eq!(data_of(&e, 1), vec![2; BS as usize], "the one that completed last");
        assert_eq!(data_of(&e, 2), vec![2; BS as usize]);
        // A failed write (guard dropped) captures nothing but still lets the next one go.
        let failed = begin(&c, 0, BS);
        let mut next = pin!(c.begin(0, BS));
        assert!(poll_once(next.as_mut()).is_none());
        drop(failed);
        poll_once(next.as_mut()).expect("released").data(&[7; BS as usize]);
        let e = c.close_epoch().unwrap();
        assert_eq!(e.block_count(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn overlapping_writes_across_tasks() {
        let c = on(1 << 20, 1 << 20);
        let mut tasks = Vec::new();
        for i in 0..64u8 {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                let g = c.begin(0, 2 * BS).await;
                tokio::task::yield_now().await;
                g.data(&[i; 2 * BS as usize]);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let e = c.close_epoch().unwrap();
        // Serialised: both blocks hold the data of one and the same write.
        assert_eq!(data_of(&e, 0), data_of(&e, 1));
    }

    #[test]
    fn runs_merge_adjacent_blocks_with_correct_crcs() {
        let c = on(1 << 20, 1 << 20);
        let pattern: Vec<u8> = (0..3 * BS).map(|i| (i * 7 % 251) as u8).collect();
        write(&c, 0, &pattern);
        zero(&c, 3 * BS, 7 * BS); // blocks 3..10
        write(&c, 10 * BS + 100, &[1; 10]); // partial, not held: reread
        write(&c, 11 * BS + 5, &[1; 10]);
        write(&c, 12 * BS, &[6; 2 * BS as usize]);
        let e = c.close_epoch().unwrap();
        let runs: Vec<Run> = e.runs(2 * BS as u32).collect();
        let shape: Vec<(u64, u64, &str)> = runs
            .iter()
            .map(|r| {
                let kind = match r.content {
                    RunContent::Data(_) => "data",
                    RunContent::Zero => "zero",
                    RunContent::Reread => "reread",
                };
                (r.offset / BS, r.len / BS, kind)
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                (0, 2, "data"),
                (2, 1, "data"),
                (3, 2, "zero"),
                (5, 2, "zero"),
                (7, 2, "zero"),
                (9, 1, "zero"),
                (10, 2, "reread"),
                (12, 2, "data"),
            ]
        );
        for r in &runs {
            if let RunContent::Data(d) = &r.content {
                assert_eq!(d.len() as u64, r.len);
                assert_eq!(r.crc, crc32c::crc32c(d), "run at {}", r.offset);
                let at = r.offset as usize;
                if at < pattern.len() {
                    assert_eq!(&d[..], &pattern[at..at + d.len()]);
                }
            }
        }
        // One big frame: every kind merged as far as it goes.
        assert_eq!(e.runs(1 << 20).count(), 4);
        // A frame smaller than a block still carries one block.
        assert_eq!(e.runs(1).count(), 14);
        assert_eq!(e.blocks().count(), 14);
    }

    #[test]
    fn partial_blocks_patch_what_the_epoch_holds_or_are_reread() {
        let c = on(1 << 20, 1 << 20);
        write(&c, 0, &[1; BS as usize]);
        write(&c, 100, &[2; 50]); // block 0 held: patched
        zero(&c, 200, 10); // patched too
        write(&c, BS + 10, &[3; BS as usize]); // blocks 1 and 2 partial, not held: reread
        zero(&c, 3 * BS, 10 * BS); // blocks 3..13
        write(&c, 5 * BS + 1, &[4; 2]); // inside the zero run: patched onto zeros
        zero(&c, 7 * BS + 1, 2); // zeros onto zeros: nothing changes
        let e = c.close_epoch().unwrap();
        let mut want = vec![1u8; BS as usize];
        want[100..150].fill(2);
        want[200..210].fill(0);
        assert_eq!(data_of(&e, 0), want);
        assert_eq!(e.get(1), Some(Block::Reread));
        assert_eq!(e.get(2), Some(Block::Reread));
        let mut five = vec![0u8; BS as usize];
        five[1..3].fill(4);
        assert_eq!(data_of(&e, 5), five);
        assert_eq!(e.get(7), Some(Block::Zero));
        assert_eq!(c.stats().reread_blocks, 2);
    }

    #[test]
    fn newest_holder_names_the_latest_epoch_with_the_block() {
        let c = on(1 << 20, 1 << 20);
        write(&c, 0, &[1; 2 * BS as usize]);
        let e1 = c.close_epoch().unwrap();
        write(&c, BS, &[1; BS as usize]);
        zero(&c, 10 * BS, 5 * BS);
        assert_eq!(c.newest_holder(0), Some(1));
        assert_eq!(c.newest_holder(1), Some(2), "the open epoch, as it will be numbered");
        assert_eq!(c.newest_holder(12), Some(2));
        assert_eq!(c.newest_holder(15), None);
        let e2 = c.close_epoch().unwrap();
        assert_eq!(c.newest_holder(1), Some(2));
        c.release(&e1);
        assert_eq!(c.newest_holder(0), None, "released epochs hold nothing");
        c.release(&e2);
        assert_eq!(c.newest_holder(1), None);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, u64, u8),
        Zero(u64, u64),
        Close,
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]
        /// Against a model: a source image the same ops are applied to, and a replica that
        /// receives every closed epoch's runs in order (rereads read the source at shipping
        /// time). After the last epoch the replica equals the source.
        #[test]
        fn shipped_epochs_rebuild_the_source(
            ops in proptest::collection::vec(prop_oneof![
                4 => (0..SIZE, 1..3 * BS, any::<u8>()).prop_map(|(o, n, v)| Op::Write(o, n, v)),
                4 => (0..SIZE / BS, 1..4u64, any::<u8>())
                    .prop_map(|(b, n, v)| Op::Write(b * BS, n * BS, v)),
                2 => (0..SIZE, 1..5 * BS).prop_map(|(o, n)| Op::Zero(o, n)),
                1 => Just(Op::Close),
            ], 1..40),
            max_frame in 1..4 * BS as u32,
        ) {
            let c = on(SIZE, u64::MAX);
            let mut source = vec![0u8; SIZE as usize];
            let mut replica = vec![0u8; SIZE as usize];
            let ship = |e: ClosedEpoch, source: &[u8], replica: &mut [u8]| {
                for r in e.runs(max_frame) {
                    let (a, b) = (r.offset as usize, (r.offset + r.len) as usize);
                    assert!(r.len <= u64::from(max_frame).max(BS) && b <= SIZE as usize);
                    match r.content {
                        RunContent::Data(d) => {
                            assert_eq!(r.crc, crc32c::crc32c(&d));
                            replica[a..b].copy_from_slice(&d);
                        }
                        RunContent::Zero => replica[a..b].fill(0),
                        RunContent::Reread => replica[a..b].copy_from_slice(&source[a..b]),
                    }
                }
            };
            for op in ops {
                match op {
                    Op::Write(o, n, v) => {
                        let n = n.min(SIZE - o);
                        source[o as usize..(o + n) as usize].fill(v);
                        write(&c, o, &vec![v; n as usize]);
                    }
                    Op::Zero(o, n) => {
                        let n = n.min(SIZE - o);
                        source[o as usize..(o + n) as usize].fill(0);
                        zero(&c, o, n);
                    }
                    Op::Close => {
                        if let Some(e) = c.close_epoch() {
                            ship(e, &source, &mut replica);
                        }
                    }
                }
            }
            if let Some(e) = c.close_epoch() {
                ship(e, &source, &mut replica);
            }
            prop_assert!(source == replica, "replica differs from the source");
            prop_assert_eq!(c.held(), 0);
        }
    }

    /// A volume with a short last block.
    const SIZE: u64 = 24 * BS - 1000;

    /// The cost of capturing a 4 KiB write (begin, copy + crc32c, record, end). Run with
    /// `cargo test -p blockferry-agent --release capture_cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn capture_cost_per_4k_write() {
        let n = 200_000u64;
        let c = on(64 << 30, u64::MAX);
        let data = vec![0x5au8; BS as usize];
        for (label, stride) in [("sequential", 1u64), ("random", 7919)] {
            let started = Instant::now();
            for i in 0..n {
                let b = (i * stride) % (16 << 20);
                write(&c, b * BS, &data);
                if i % 16384 == 16383 {
                    drop(c.close_epoch());
                }
            }
            let per = started.elapsed() / n as u32;
            drop(c.close_epoch());
            println!("capture of a 4 KiB write ({label}): {per:?} each");
            assert!(per < std::time::Duration::from_micros(2), "{per:?}");
        }
    }

    /// Block policy: writes before the driver runs wait in the start queue, which the
    /// driver takes once.
    #[tokio::test]
    async fn writes_are_held_from_the_start() {
        let c = Capture::new(64 * BS, BS as u32, 1 << 20);
        c.hold_from_start();
        assert!(c.is_live());
        let d = vec![3u8; BS as usize];
        let w = begin(&c, 0, BS).data(&d).expect("a write before the driver waits");
        let (_tx, mut rx) = c.take_start_queue().expect("the start queue");
        assert!(c.take_start_queue().is_none());
        let lw = rx.try_recv().expect("the write is queued for the driver");
        assert_eq!(lw.epoch, 1);
        lw.done.send(SyncOutcome::Failed("no target".into())).unwrap();
        assert!(matches!(w.outcome().await, SyncOutcome::Failed(_)));
    }

    #[tokio::test]
    async fn live_writes_carry_their_epoch_and_are_answered() {
        let c = on(64 * BS, 1 << 20);
        let (tx, mut rx) = mpsc::unbounded_channel();
        c.set_live(Some(tx));
        assert!(c.is_live());
        let d = vec![7u8; 2 * BS as usize];
        let w = begin(&c, BS, 2 * BS).data(&d).expect("a live write waits");
        let lw = rx.try_recv().unwrap();
        assert_eq!(lw.epoch, 1);
        assert_eq!(
            lw.pieces,
            vec![LivePiece {
                offset: BS,
                len: 2 * BS,
                content: LiveContent::Data(Bytes::from(d.clone()), crc32c::crc32c(&d)),
            }]
        );
        lw.done.send(SyncOutcome::Durable).unwrap();
        assert_eq!(w.outcome().await, SyncOutcome::Durable);
        // Buffered too (the epoch's blocks are what commits clear from the bitmap).
        let e = c.close_epoch().unwrap();
        assert_eq!(e.seq, 1);
        assert_eq!(e.block_count(), 2);
        // Zeroing, next epoch.
        let w = begin(&c, 0, 4 * BS).zero().unwrap();
        let lw = rx.try_recv().unwrap();
        assert_eq!((lw.epoch, lw.pieces.len()), (2, 1));
        assert_eq!(lw.pieces[0].content, LiveContent::Zero);
        drop(lw);
        // A shipper that drops the answer: degraded (the write is in the bitmap).
        assert_eq!(w.outcome().await, SyncOutcome::Degraded);
    }

    #[test]
    fn partial_blocks_of_a_live_write_are_reread() {
        let c = on(64 * BS, 1 << 20);
        let (tx, mut rx) = mpsc::unbounded_channel();
        c.set_live(Some(tx));
        let _w = begin(&c, BS + 512, 2 * BS).data(&vec![1u8; 2 * BS as usize]);
        let lw = rx.try_recv().unwrap();
        let kinds: Vec<(u64, u64, bool)> =
            lw.pieces.iter().map(|p| (p.offset, p.len, p.content == LiveContent::Reread)).collect();
        assert_eq!(kinds, vec![(BS, BS, true), (2 * BS, BS, false), (3 * BS, BS, true)]);
        // Inside one block: one reread piece.
        let _w = begin(&c, 512, 1024).data(&[2u8; 1024]);
        let lw = rx.try_recv().unwrap();
        assert_eq!(lw.pieces, vec![LivePiece { offset: 0, len: BS, content: LiveContent::Reread }]);
    }

    #[test]
    fn live_writes_go_on_without_buffering_and_their_epoch_closes() {
        let c = Capture::new(64 * BS, BS as u32, 1 << 20);
        let (tx, mut rx) = mpsc::unbounded_channel();
        c.set_live(Some(tx));
        let _w = begin(&c, 0, BS).data(&[3u8; BS as usize]).expect("sent live");
        assert_eq!(rx.try_recv().unwrap().epoch, 1);
        // Nothing buffered, but the epoch the live write went into closes.
        let e = c.close_epoch().expect("an epoch with live writes closes");
        assert_eq!((e.seq, e.block_count()), (1, 0));
        assert!(c.close_epoch().is_none());
        c.set_live(None);
        assert!(begin(&c, 0, BS).data(&[3u8; BS as usize]).is_none());
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn live_sending_switches_with_the_epoch_close() {
        let c = on(64 * BS, 1 << 20);
        let (tx, mut rx) = mpsc::unbounded_channel();
        // Before: buffered, not live.
        assert!(begin(&c, 0, BS).data(&[1u8; BS as usize]).is_none());
        let (e, next) = c.close_epoch_live(Some(tx));
        assert_eq!((e.map(|e| e.seq), next, c.open_seq()), (Some(1), 2, 2));
        // After: live and buffered in the same epoch, the one the write is tagged with.
        let _w = begin(&c, BS, BS).data(&[2u8; BS as usize]).expect("live");
        assert_eq!(rx.try_recv().unwrap().epoch, 2);
        // Switching off at the next close: the epoch with the live write closes; the write
        // after it is neither live nor in it.
        let (e, next) = c.close_epoch_live(None);
        let e = e.expect("an epoch with a live write");
        assert_eq!((e.seq, e.block_count(), next), (2, 1, 3));
        assert!(begin(&c, 2 * BS, BS).data(&[3u8; BS as usize]).is_none());
        assert!(rx.try_recv().is_err());
        assert_eq!(c.close_epoch().map(|e| (e.seq, e.block_count())), Some((3, 1)));
        // An empty epoch does not close (no number used); live sending still switches.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (e, next) = c.close_epoch_live(Some(tx));
        assert!(e.is_none());
        assert_eq!(next, 4);
        let _w = begin(&c, 0, BS).zero().expect("live");
        assert_eq!(rx.try_recv().unwrap().epoch, 4);
    }
}
