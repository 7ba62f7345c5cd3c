//! Changed-block tracking (CBT): named persistent dirty bitmaps with an activity log, after
//! DRBD's bitmap + activity log (DESIGN.md, primary write path step 3, invariant 2).
//!
//! - Every write, trim and write-zeroes calls [`Tracker::begin_write`] before it reaches the
//!   disk and drops the returned [`WriteGuard`] when it has completed.
//! - The volume is cut into activity-log *extents* (default 4 MiB). A write to an extent that is
//!   in the on-disk activity log (the hot set, default 1024 extents) costs two atomic operations
//!   and the bit setting. A write to a cold extent first waits for an activity-log transaction
//!   that adds it (the committer thread batches every waiting write into one transaction and
//!   one fdatasync), evicting the least recently used extents, whose bitmap bits are written to
//!   disk first if they changed since the last write-back.
//! - Bitmap pages are written back lazily by the committer (every [`WRITE_BACK_INTERVAL`] once
//!   the log is full, and before an eviction needs them), only dirty pages, never on the write
//!   path.
//! - After an unclean stop, dirty = persisted bitmap ∪ every extent of the newest activity-log
//!   transaction; a clean stop ([`Tracker::close`]) records that no widening is needed. A missing
//!   or corrupt log or bitmap header makes the bitmap all dirty; a page whose two copies are both
//!   corrupt makes that page all dirty; each with a logged reason, never silently clean.
//! - Named bitmaps, like qemu's: [`Tracker::create`], [`Tracker::list`], [`Tracker::clear`],
//!   [`Tracker::remove`], [`Tracker::extents`] and [`Tracker::status`] (NBD's
//!   `qemu:dirty-bitmap:NAME`). A clear that races with writes keeps the bits of writes in
//!   flight: a write sets its bits when it begins (for crash safety) and again when it ends.
//!
//! Files (in the volume's `cbt/` directory, formats in `format.rs`): `activity.log`, and one
//! `bitmap-NAME.cbt` per named bitmap.

pub(crate) mod bitmap;
mod format;
pub mod store;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, Weak};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::{info, warn};

use bitmap::{Bitmap, PAGE_BITS, PAGE_WORDS};
use format::{AlGeometry, BitmapHeader, Transaction, BLOCK};
use store::{DirStorage, Storage};

use serde::Serialize;
use thiserror::Error;

use crate::engine::errno;
use crate::volume::Volume;

/// Activity-log geometry and timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackerOptions {
    /// Bytes of volume per activity-log extent (power of two, >= the block size). Default 4 MiB.
    pub extent_size: u64,
    /// Extents the activity log holds (the hot set). Default 1024 (4 GiB with 4 MiB extents).
    pub extents: u32,
}

impl TrackerOptions {
    /// Checks the geometry against the volume: extents are powers of two of at least one
    /// block, and the log holds at least 16 extents and 128 MiB, so the largest NBD write
    /// (32 MiB) spans at most a quarter of it.
    pub fn validate(&self, block_size: u32) -> Result<(), CbtError> {
        let bad = |reason: String| Err(CbtError::BadOptions { reason });
        if !self.extent_size.is_power_of_two() || self.extent_size < u64::from(block_size) {
            return bad(format!(
                "al-extent-size {} must be a power of two of at least the block size {block_size}",
                self.extent_size
            ));
        }
        if self.extents < 16 || self.extents > 1 << 20 {
            return bad(format!("al-extents {} must be from 16 to 1048576", self.extents));
        }
        if self.extent_size.saturating_mul(u64::from(self.extents)) < 128 << 20 {
            return bad(format!(
                "the activity log covers only {} bytes (al-extents x al-extent-size); make it at least 128 MiB",
                self.extent_size * u64::from(self.extents)
            ));
        }
        Ok(())
    }
}

impl Default for TrackerOptions {
    fn default() -> Self {
        TrackerOptions { extent_size: 4 << 20, extents: 1024 }
    }
}

/// A change-tracking failure. Messages say what happened, to what, and what to do.
#[derive(Debug, Error)]
pub enum CbtError {
    #[error("volume {volume:?} has no bitmap named {name:?}")]
    NoSuchBitmap { volume: String, name: String },
    #[error("volume {volume:?} already has a bitmap named {name:?}")]
    BitmapExists { volume: String, name: String },
    #[error("bad bitmap name {name:?}: use 1 to 64 characters from A-Z a-z 0-9 . _ -")]
    BadName { name: String },
    #[error("change tracking of volume {volume:?}: {action} {path}: {source}")]
    Io {
        volume: String,
        action: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("change tracking of volume {volume:?} has failed earlier and is stopped ({reason}); restart the agent")]
    Poisoned { volume: String, reason: String },
    #[error("bad change-tracking options: {reason}")]
    BadOptions { reason: String },
    #[error("a tracked request of {len} bytes spans more than the activity log can hold at once; split it into pieces of at most {max} bytes")]
    RangeTooLarge { len: u64, max: u64 },
    #[error("change tracking of volume {volume:?} is shut down")]
    Closed { volume: String },
}

impl CbtError {
    /// The NBD error when this failure answers a request.
    pub fn errno(&self) -> u32 {
        match self {
            CbtError::NoSuchBitmap { .. } | CbtError::BadName { .. } => errno::EINVAL,
            CbtError::RangeTooLarge { .. } => errno::EINVAL,
            CbtError::Closed { .. } => errno::ESHUTDOWN,
            _ => errno::EIO,
        }
    }
}

/// What `list`, `create` and `clear` report about a bitmap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BitmapInfo {
    pub name: String,
    /// Bytes of the volume marked dirty.
    pub dirty_bytes: u64,
    /// Bytes per bit (the volume's block size).
    pub granularity: u32,
    /// How many times the bitmap was cleared since it was created.
    pub generation: u64,
}

/// A dirty byte range of the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ByteExtent {
    pub offset: u64,
    pub length: u64,
}

/// How the tracker came up: after a clean stop, or widened after a crash.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Recovery {
    pub clean: bool,
    /// Why bitmaps were widened (unclean stop, missing or corrupt files), if they were.
    pub reason: Option<String>,
    /// Bytes added to every bitmap by the widening (activity-log extents, or everything).
    pub widened_bytes: u64,
    /// How long opening took: reading the log and bitmaps, widening, writing back.
    pub micros: u64,
}

/// Counters of the tracker.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TrackerStats {
    pub writes_tracked: u64,
    pub al_transactions: u64,
    pub al_extents_added: u64,
    pub al_evictions: u64,
    pub bitmap_pages_written: u64,
    pub recovery: Recovery,
}

/// How often the committer writes dirty bitmap pages back when nothing else asks for it.
pub const WRITE_BACK_INTERVAL: Duration = Duration::from_secs(2);
/// Transactions in the activity-log ring.
const AL_SLOTS: u32 = 8;
/// The activity log's file name.
pub(crate) const AL_FILE: &str = "activity.log";
const BITMAP_PREFIX: &str = "bitmap-";
const BITMAP_SUFFIX: &str = ".cbt";

// Per-extent state word (one `AtomicU32` per activity-log extent of the volume).
/// The extent is in the durable activity-log table: writes to it may proceed at once.
const IN_LOG: u32 = 1 << 31;
/// Referenced since the clock hand last passed (second chance).
const REF: u32 = 1 << 30;
/// A write to it ended since the last bitmap write-back started: evicting it needs a
/// write-back first.
const DIRTY: u32 = 1 << 29;
/// Chosen for eviction by the transaction being written.
const EVICTING: u32 = 1 << 28;
/// Writes in flight.
const REFS: u32 = EVICTING - 1;

fn bitmap_file(name: &str) -> String {
    format!("{BITMAP_PREFIX}{name}{BITMAP_SUFFIX}")
}

fn next_bitmap_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One named bitmap: its bits and where each page's newest copy is on disk.
#[derive(Debug)]
struct Named {
    /// Unique in this process: a bitmap removed and created again under the same name is
    /// another bitmap (an NBD connection that selected the old one must not read the new one).
    id: u64,
    name: String,
    file: String,
    bits: Bitmap,
    slots: Mutex<PageSlots>,
    generation: AtomicU64,
}

#[derive(Debug)]
struct PageSlots {
    /// Slot (0 or 1) holding each page's newest valid copy.
    current: Vec<u8>,
    /// Last sequence number written to this file.
    seq: u64,
}

/// The activity log as the committer keeps it.
#[derive(Debug)]
struct Al {
    geometry: AlGeometry,
    /// Sequence number of the newest durable transaction.
    seq: u64,
    /// The durable table: one extent (or none) per slot.
    table: Vec<Option<u64>>,
    /// Clock hand over `table`.
    hand: usize,
}

/// A write waiting for its extents to enter the activity log.
#[derive(Debug)]
struct Admit {
    extents: Vec<u64>,
    done: Option<oneshot::Sender<Result<(), CbtError>>>,
}

#[derive(Debug, Default)]
struct Queue {
    waiting: VecDeque<Admit>,
    closed: bool,
}

#[derive(Debug, Default)]
struct Counters {
    writes_tracked: AtomicU64,
    al_transactions: AtomicU64,
    al_extents_added: AtomicU64,
    al_evictions: AtomicU64,
    bitmap_pages_written: AtomicU64,
}

/// Change tracking of one volume.
#[derive(Debug)]
pub struct Tracker {
    volume: String,
    uuid: [u8; 16],
    size: u64,
    block_size: u32,
    blocks: u64,
    extent_shift: u32,
    capacity: u32,
    storage: Arc<dyn Storage>,
    states: Box<[AtomicU32]>,
    bitmaps: RwLock<BTreeMap<String, Arc<Named>>>,
    /// Serialises page write-back, transactions, create, clear and remove (in that lock order:
    /// `io`, then `al`, then `bitmaps`).
    io: Mutex<()>,
    al: Mutex<Al>,
    queue: Mutex<Queue>,
    wake: Condvar,
    poison: Mutex<Option<String>>,
    poisoned: AtomicBool,
    closed: AtomicBool,
    committer: Mutex<Option<std::thread::JoinHandle<()>>>,
    counters: Counters,
    recovery: Recovery,
}

/// Held while a tracked write is in flight; dropping it completes the write's tracking.
#[derive(Debug)]
#[must_use = "drop the guard only when the write has completed"]
pub struct WriteGuard<'a> {
    tracker: &'a Tracker,
    first: u64,
    end: u64,
    extents: (u64, u64),
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        self.tracker.end_write(self.first, self.end, self.extents);
    }
}

/// Waits for an admission; if dropped before the answer was taken (the request was
/// cancelled), gives back the references the committer took for it.
struct Pending<'a> {
    tracker: &'a Tracker,
    extents: (u64, u64),
    rx: Option<oneshot::Receiver<Result<(), CbtError>>>,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if let Ok(Ok(())) = rx.try_recv() {
                self.tracker.unref(self.extents.0, self.extents.1);
            }
        }
    }
}

/// Checks a bitmap name: `[A-Za-z0-9._-]{1,64}`.
pub fn validate_name(name: &str) -> Result<(), CbtError> {
    crate::volume::validate_name(name).map_err(|_| CbtError::BadName { name: name.to_string() })
}

/// What recovery found on disk.
struct Loaded {
    al: Option<(AlGeometry, Option<Transaction>)>,
    bitmaps: BTreeMap<String, Arc<Named>>,
    reasons: Vec<String>,
    widen_all: bool,
}

impl Tracker {
    /// Opens (creating if needed) the change tracking of `volume` in its `cbt/` directory,
    /// recovering after an unclean stop, and starts the committer thread. Blocking I/O.
    pub fn open(volume: &Volume, options: TrackerOptions) -> Result<Arc<Tracker>, CbtError> {
        options.validate(volume.meta.block_size)?;
        let dir = volume.dir.join("cbt");
        let storage = DirStorage::open(&dir).map_err(|source| CbtError::Io {
            volume: volume.meta.name.clone(),
            action: "cannot create directory",
            path: dir.clone(),
            source,
        })?;
        let t = Tracker::open_with(volume, options, Arc::new(storage))?;
        let weak = Arc::downgrade(&t);
        let handle = std::thread::Builder::new()
            .name(format!("cbt-{}", volume.meta.name))
            .spawn(move || committer(weak))
            .map_err(|source| CbtError::Io {
                volume: volume.meta.name.clone(),
                action: "cannot start the committer thread for",
                path: dir,
                source,
            })?;
        *lock(&t.committer) = Some(handle);
        Ok(t)
    }

    /// Opens over any storage, without a committer thread (tests drive it inline).
    fn open_with(
        volume: &Volume,
        options: TrackerOptions,
        storage: Arc<dyn Storage>,
    ) -> Result<Arc<Tracker>, CbtError> {
        let started = Instant::now();
        let meta = &volume.meta;
        let block_size = meta.block_size;
        let blocks = meta.size.div_ceil(u64::from(block_size));
        let extents = meta.size.div_ceil(options.extent_size);
        let geometry = AlGeometry {
            slots: AL_SLOTS,
            capacity: options.extents,
            extent_size: options.extent_size,
        };
        let mut t = Tracker {
            volume: meta.name.clone(),
            uuid: *meta.uuid.as_bytes(),
            size: meta.size,
            block_size,
            blocks,
            extent_shift: options.extent_size.trailing_zeros(),
            capacity: options.extents,
            storage,
            states: (0..extents).map(|_| AtomicU32::new(0)).collect(),
            bitmaps: RwLock::new(BTreeMap::new()),
            io: Mutex::new(()),
            al: Mutex::new(Al {
                geometry,
                seq: 0,
                table: vec![None; options.extents as usize],
                hand: 0,
            }),
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            poison: Mutex::new(None),
            poisoned: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            committer: Mutex::new(None),
            counters: Counters::default(),
            recovery: Recovery::default(),
        };
        let loaded = t.load()?;
        t.recovery = t.recover(loaded, geometry)?;
        t.recovery.micros = started.elapsed().as_micros() as u64;
        let r = &t.recovery;
        match &r.reason {
            Some(reason) => {
                warn!(volume = %t.volume, widened_bytes = r.widened_bytes, micros = r.micros, "change tracking recovered: {reason}")
            }
            None => {
                info!(volume = %t.volume, micros = r.micros, "change tracking opened after a clean stop")
            }
        }
        Ok(Arc::new(t))
    }

    fn io_err(&self, action: &'static str, file: &str, source: std::io::Error) -> CbtError {
        CbtError::Io {
            volume: self.volume.clone(),
            action,
            path: self.storage.describe(file),
            source,
        }
    }

    /// Reads the activity log and every bitmap file.
    fn load(&self) -> Result<Loaded, CbtError> {
        let files = self.storage.list().map_err(|e| self.io_err("cannot list", "", e))?;
        let mut reasons = Vec::new();
        let mut widen_all = false;
        // The activity log: its header, then the newest valid transaction of the ring.
        let mut al = None;
        if files.iter().any(|f| f == AL_FILE) {
            let mut head = vec![0u8; BLOCK];
            self.read_full(AL_FILE, 0, &mut head)?;
            match AlGeometry::decode_header(&head) {
                None => {
                    reasons.push("the activity log's header is corrupt".into());
                    widen_all = true;
                }
                Some(g) => {
                    let mut newest: Option<Transaction> = None;
                    let mut rec = vec![0u8; g.record_size()];
                    for i in 0..u64::from(g.slots) {
                        self.read_full(AL_FILE, g.record_offset(i), &mut rec)?;
                        if let Some(tx) = Transaction::decode(&rec, &g) {
                            if newest.as_ref().is_none_or(|n| tx.seq > n.seq) {
                                newest = Some(tx);
                            }
                        }
                    }
                    if newest.is_none() {
                        reasons.push("the activity log has no valid transaction".into());
                        widen_all = true;
                    }
                    al = Some((g, newest));
                }
            }
        }
        let mut bitmaps = BTreeMap::new();
        for f in &files {
            let Some(name) =
                f.strip_prefix(BITMAP_PREFIX).and_then(|n| n.strip_suffix(BITMAP_SUFFIX))
            else {
                continue;
            };
            if validate_name(name).is_err() {
                continue;
            }
            let named = self.load_bitmap(name, f, &mut reasons)?;
            bitmaps.insert(name.to_string(), Arc::new(named));
        }
        if al.is_none() && !bitmaps.is_empty() {
            reasons.push("the activity log is missing".into());
            widen_all = true;
        }
        Ok(Loaded { al, bitmaps, reasons, widen_all })
    }

    fn read_full(&self, file: &str, off: u64, buf: &mut [u8]) -> Result<(), CbtError> {
        buf.fill(0);
        self.storage.read_at(file, off, buf).map_err(|e| self.io_err("cannot read", file, e))?;
        Ok(())
    }

    fn load_bitmap(
        &self,
        name: &str,
        file: &str,
        reasons: &mut Vec<String>,
    ) -> Result<Named, CbtError> {
        let bits = Bitmap::new(self.blocks);
        let pages = bits.pages();
        let mut slots = PageSlots { current: vec![0; pages], seq: 0 };
        let mut head = vec![0u8; BLOCK];
        self.read_full(file, 0, &mut head)?;
        let header_ok = match BitmapHeader::decode(&head) {
            Some(h) => {
                h.granularity == self.block_size
                    && h.bits == self.blocks
                    && h.volume == self.uuid
                    && h.name == name
            }
            None => false,
        };
        if !header_ok {
            reasons
                .push(format!("bitmap {name:?}: header corrupt or of another volume: all dirty"));
            bits.set_range(0, self.blocks);
        } else {
            let mut buf = vec![0u8; 2 * BLOCK];
            let mut bad = Vec::new();
            for p in 0..pages {
                self.read_full(file, format::page_offset(p, 0), &mut buf)?;
                let a = format::decode_page(p, &buf[..BLOCK]);
                let b = format::decode_page(p, &buf[BLOCK..]);
                let newest = match (a, b) {
                    (Some(a), Some(b)) if b.0 > a.0 => Some((1, b)),
                    (Some(a), _) => Some((0, a)),
                    (None, Some(b)) => Some((1, b)),
                    (None, None) => None,
                };
                match newest {
                    Some((slot, (seq, words))) => {
                        slots.current[p] = slot;
                        slots.seq = slots.seq.max(seq);
                        bits.load(p, &words);
                    }
                    None => {
                        bad.push(p);
                        let first = p as u64 * PAGE_BITS;
                        bits.set_range(first, first + PAGE_BITS);
                    }
                }
            }
            if !bad.is_empty() {
                reasons.push(format!(
                    "bitmap {name:?}: no valid copy of page(s) {bad:?}: those pages all dirty"
                ));
            }
        }
        Ok(Named {
            id: next_bitmap_id(),
            name: name.to_string(),
            file: file.to_string(),
            bits,
            slots: Mutex::new(slots),
            generation: AtomicU64::new(0),
        })
    }

    /// Widens what must be widened, persists it, and starts a fresh activity log.
    fn recover(&self, loaded: Loaded, geometry: AlGeometry) -> Result<Recovery, CbtError> {
        let Loaded { al, bitmaps, mut reasons, widen_all } = loaded;
        let mut widened = BTreeSet::new();
        let bs = u64::from(self.block_size);
        let mut clean = false;
        let mut seq = 0;
        if widen_all {
            widened.insert((0, self.blocks));
        } else if let Some((g, Some(tx))) = &al {
            seq = tx.seq;
            if tx.clean {
                clean = true;
            } else {
                for &e in &tx.extents {
                    let first = (e * g.extent_size / bs).min(self.blocks);
                    let end = ((e + 1) * g.extent_size).div_ceil(bs).min(self.blocks);
                    if first < end {
                        widened.insert((first, end));
                    }
                }
                reasons.insert(
                    0,
                    format!(
                        "unclean stop: {} activity-log extent(s) marked dirty",
                        tx.extents.len()
                    ),
                );
            }
        }
        let mut widened_blocks = 0;
        for (first, end) in &widened {
            widened_blocks += end - first;
            for b in bitmaps.values() {
                b.bits.set_range(*first, *end);
            }
        }
        if bitmaps.is_empty() {
            reasons.clear();
            widened_blocks = 0;
        }
        *self.bitmaps.write().unwrap_or_else(|e| e.into_inner()) = bitmaps;
        // Crash ordering of recovery:
        // 1. the widened bitmaps are written back and synced (so they no longer need the log);
        // 2. only then a transaction with an empty table replaces the old one (same geometry),
        //    or a new log replaces the old file (other geometry, or none, or corrupt).
        let _io = lock(&self.io);
        let mut al_state = lock(&self.al);
        self.write_back(&al_state, &[])?;
        let reuse = matches!(&al, Some((g, Some(_))) if *g == geometry);
        if reuse {
            al_state.seq = seq;
            self.write_transaction(&mut al_state, Vec::new(), false)?;
        } else {
            let tx = Transaction { seq: 1, clean: false, extents: Vec::new() };
            let mut data = geometry.encode_header();
            data.resize(format::BLOCK + geometry.record_size() * AL_SLOTS as usize, 0);
            let off = geometry.record_offset(1) as usize;
            data[off..off + geometry.record_size()].copy_from_slice(&tx.encode(&geometry));
            self.storage
                .create_atomic(AL_FILE, &data)
                .map_err(|e| self.poison_with(self.io_err("cannot create", AL_FILE, e)))?;
            al_state.seq = 1;
            self.counters.al_transactions.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Recovery {
            clean: clean || reasons.is_empty(),
            reason: (!reasons.is_empty()).then(|| reasons.join("; ")),
            widened_bytes: (widened_blocks * bs).min(self.size),
            micros: 0,
        })
    }

    pub fn volume(&self) -> &str {
        &self.volume
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The largest range one tracked request may cover; callers split trims and zeroings into
    /// pieces of at most this size, aligned to it.
    pub fn max_span(&self) -> u64 {
        u64::from(self.capacity / 4) << self.extent_shift
    }

    fn check(&self) -> Result<(), CbtError> {
        if self.poisoned.load(Ordering::Acquire) {
            let reason = lock(&self.poison).clone().unwrap_or_default();
            return Err(CbtError::Poisoned { volume: self.volume.clone(), reason });
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(CbtError::Closed { volume: self.volume.clone() });
        }
        Ok(())
    }

    /// Poisons the tracker (a failed write or fsync is never retried and carried on, as in
    /// sled): every later tracked write fails until the agent restarts and recovers.
    fn poison_with(&self, e: CbtError) -> CbtError {
        let mut p = lock(&self.poison);
        if p.is_none() {
            warn!(volume = %self.volume, "change tracking stops: {e}");
            *p = Some(e.to_string());
        }
        self.poisoned.store(true, Ordering::Release);
        e
    }

    /// Blocks `[first, end)` and extents `(e0, e1)` of the byte range.
    fn span(&self, offset: u64, len: u64) -> (u64, u64, (u64, u64)) {
        let bs = u64::from(self.block_size);
        let end = (offset + len.max(1)).min(self.size.max(1));
        let offset = offset.min(end - 1);
        (
            (offset / bs),
            end.div_ceil(bs),
            (offset >> self.extent_shift, (end - 1) >> self.extent_shift),
        )
    }

    /// Takes a reference on every extent of `e0..=e1` if all are in the log.
    fn try_ref(&self, e0: u64, e1: u64) -> bool {
        for e in e0..=e1 {
            let st = &self.states[e as usize];
            let ok = st
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                    (s & IN_LOG != 0).then_some((s + 1) | REF)
                })
                .is_ok();
            if !ok {
                if e > e0 {
                    self.unref_plain(e0, e - 1);
                }
                return false;
            }
        }
        true
    }

    /// Drops references without marking the extents dirty (nothing was written).
    fn unref_plain(&self, e0: u64, e1: u64) {
        for e in e0..=e1 {
            self.states[e as usize].fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Drops references of a cancelled admission: the write never happened, but its bits may
    /// be set, so the extents count as dirty.
    fn unref(&self, e0: u64, e1: u64) {
        for e in e0..=e1 {
            let _ =
                self.states[e as usize]
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| Some((s | DIRTY) - 1));
        }
    }

    fn mark(&self, first: u64, end: u64) {
        for b in self.bitmaps.read().unwrap_or_else(|e| e.into_inner()).values() {
            b.bits.set_range(first, end);
        }
    }

    /// Call before a write/trim/zeroing of `[offset, offset + len)` (already range-checked,
    /// at most [`Tracker::max_span`]) reaches the disk; may wait for an activity-log
    /// transaction.
    pub async fn begin_write(&self, offset: u64, len: u64) -> Result<WriteGuard<'_>, CbtError> {
        self.check()?;
        let (first, end, (e0, e1)) = self.span(offset, len);
        if e1 - e0 + 1 > u64::from(self.capacity / 2) {
            return Err(CbtError::RangeTooLarge { len, max: self.max_span() });
        }
        if !self.try_ref(e0, e1) {
            let (tx, rx) = oneshot::channel();
            {
                let mut q = lock(&self.queue);
                if q.closed {
                    return Err(CbtError::Closed { volume: self.volume.clone() });
                }
                q.waiting.push_back(Admit { extents: (e0..=e1).collect(), done: Some(tx) });
            }
            self.wake.notify_one();
            let mut pending = Pending { tracker: self, extents: (e0, e1), rx: Some(rx) };
            let rx = pending.rx.as_mut().expect("set above");
            let answer = rx.await;
            pending.rx = None;
            match answer {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(CbtError::Closed { volume: self.volume.clone() }),
            }
        }
        // Step 3 of the write path: the bits are set before the data can reach the disk.
        self.mark(first, end);
        self.counters.writes_tracked.fetch_add(1, Ordering::Relaxed);
        Ok(WriteGuard { tracker: self, first, end, extents: (e0, e1) })
    }

    /// [`Tracker::begin_write`] for tests without a committer thread: admits inline.
    #[cfg(test)]
    fn begin_write_inline(&self, offset: u64, len: u64) -> Result<WriteGuard<'_>, CbtError> {
        self.check()?;
        let (first, end, (e0, e1)) = self.span(offset, len);
        if !self.try_ref(e0, e1) {
            let mut batch = vec![Admit { extents: (e0..=e1).collect(), done: None }];
            let results = self.commit(&mut batch);
            assert!(batch.is_empty(), "inline admission found no victim");
            results.into_iter().next().expect("one result").1?;
        }
        self.mark(first, end);
        Ok(WriteGuard { tracker: self, first, end, extents: (e0, e1) })
    }

    fn end_write(&self, first: u64, end: u64, (e0, e1): (u64, u64)) {
        // The bits again, for a clear that ran while the write was in flight; then DIRTY
        // before the reference goes, so the extent is never evicted with these bits unwritten.
        self.mark(first, end);
        self.unref(e0, e1);
    }

    /// Admits what it can of `batch` (taking what it admits out of it) with one transaction.
    /// Returns each admitted request with its result; the caller answers them.
    fn commit(&self, batch: &mut Vec<Admit>) -> Vec<(Admit, Result<(), CbtError>)> {
        let _io = lock(&self.io);
        let mut al = lock(&self.al);
        let mut table = al.table.clone();
        let mut hand = al.hand;
        let mut victims: Vec<u64> = Vec::new();
        let mut added: BTreeSet<u64> = BTreeSet::new();
        let mut protected: BTreeSet<u64> = BTreeSet::new();
        let mut admitted = Vec::new();
        let mut rest = Vec::new();
        for req in batch.drain(..) {
            if !rest.is_empty() {
                rest.push(req);
                continue;
            }
            let need: Vec<u64> = req
                .extents
                .iter()
                .copied()
                .filter(|e| {
                    self.states[*e as usize].load(Ordering::Acquire) & IN_LOG == 0
                        && !added.contains(e)
                })
                .collect();
            protected.extend(req.extents.iter().copied());
            let mut slots = Vec::new();
            let mut mine = Vec::new();
            // Free slots first, then the clock: skip referenced (second chance), in-use and
            // protected extents; an evicted extent leaves IN_LOG at once so no new write
            // references it, and goes back if this request cannot be admitted whole.
            let n = table.len();
            let mut scanned = 0;
            while slots.len() < need.len() && scanned < 3 * n {
                let i = hand;
                hand = (hand + 1) % n;
                scanned += 1;
                if slots.contains(&i) {
                    continue;
                }
                match table[i] {
                    None => slots.push(i),
                    Some(e) if protected.contains(&e) || added.contains(&e) => {}
                    Some(e) => {
                        let st = &self.states[e as usize];
                        let s = st.load(Ordering::Acquire);
                        if s & REF != 0 {
                            st.fetch_and(!REF, Ordering::AcqRel);
                        } else if s & REFS == 0
                            && s & IN_LOG != 0
                            && st
                                .compare_exchange(
                                    s,
                                    (s & DIRTY) | EVICTING,
                                    Ordering::AcqRel,
                                    Ordering::Acquire,
                                )
                                .is_ok()
                        {
                            slots.push(i);
                            mine.push(e);
                        }
                    }
                }
            }
            if slots.len() < need.len() {
                for e in mine {
                    let st = &self.states[e as usize];
                    let _ = st.fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                        Some((s & DIRTY) | IN_LOG)
                    });
                }
                rest.push(req);
                continue;
            }
            for (slot, e) in slots.into_iter().zip(need) {
                table[slot] = Some(e);
                added.insert(e);
            }
            victims.extend(mine);
            admitted.push(req);
        }
        *batch = rest;
        if admitted.is_empty() {
            return Vec::new();
        }
        let result = if added.is_empty() {
            Ok(()) // everything was admitted meanwhile: no transaction needed
        } else {
            self.write_admission(&mut al, table, hand, &victims, &added)
        };
        admitted
            .into_iter()
            .map(|req| {
                if result.is_ok() {
                    for &e in &req.extents {
                        self.states[e as usize].fetch_add(1, Ordering::AcqRel);
                    }
                }
                let r = result.as_ref().map(|_| ()).map_err(|e| CbtError::Poisoned {
                    volume: self.volume.clone(),
                    reason: e.to_string(),
                });
                (req, r)
            })
            .collect()
    }

    /// Crash ordering of an admission (DRBD's activity-log update):
    /// 1. if an evicted extent was written since the last write-back, every bitmap's dirty
    ///    pages are written and synced, so the evicted extents' bits are on disk;
    /// 2. the new table (evicted extents out, new ones in) is written as the next transaction
    ///    of the ring and synced;
    /// 3. only then are the new extents usable (IN_LOG), and the writes waiting for them go on.
    ///
    /// A crash before 2 completes leaves the previous transaction the newest valid one: the
    /// evicted extents are still widened at recovery, the new ones had no write yet.
    fn write_admission(
        &self,
        al: &mut Al,
        table: Vec<Option<u64>>,
        hand: usize,
        victims: &[u64],
        added: &BTreeSet<u64>,
    ) -> Result<(), CbtError> {
        self.check()?;
        if victims.iter().any(|&e| self.states[e as usize].load(Ordering::Acquire) & DIRTY != 0) {
            self.write_back(al, victims)?;
        }
        let extents: Vec<u64> = table.iter().flatten().copied().collect();
        self.write_transaction(al, extents, false)?;
        al.table = table;
        al.hand = hand;
        for &e in victims {
            self.states[e as usize].store(0, Ordering::Release);
        }
        for &e in added {
            self.states[e as usize].fetch_or(IN_LOG, Ordering::AcqRel);
        }
        self.counters.al_evictions.fetch_add(victims.len() as u64, Ordering::Relaxed);
        self.counters.al_extents_added.fetch_add(added.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Writes the next transaction and syncs it. Caller holds `io` and `al`.
    fn write_transaction(
        &self,
        al: &mut Al,
        extents: Vec<u64>,
        clean: bool,
    ) -> Result<(), CbtError> {
        let tx = Transaction { seq: al.seq + 1, clean, extents };
        let data = tx.encode(&al.geometry);
        let off = al.geometry.record_offset(tx.seq);
        self.storage
            .write_at(AL_FILE, off, &data)
            .map_err(|e| self.poison_with(self.io_err("cannot write", AL_FILE, e)))?;
        self.storage
            .sync(AL_FILE)
            .map_err(|e| self.poison_with(self.io_err("cannot sync", AL_FILE, e)))?;
        al.seq = tx.seq;
        self.counters.al_transactions.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Writes every dirty page of every bitmap and syncs. Caller holds `io` and `al`.
    ///
    /// Crash ordering: 1. DIRTY is cleared on every extent of the log (and `extra`, the
    /// extents being evicted) *before* any page is read, so a write ending later sets it again
    /// and its extent stays in the log; 2. each dirty page is copied and written to the slot
    /// not holding its newest copy (a torn write leaves the older copy valid); 3. the file is
    /// synced; 4. only then does the new slot count as the page's newest copy.
    fn write_back(&self, al: &Al, extra: &[u64]) -> Result<(), CbtError> {
        for &e in al.table.iter().flatten().chain(extra) {
            self.states[e as usize].fetch_and(!DIRTY, Ordering::AcqRel);
        }
        let bitmaps: Vec<Arc<Named>> =
            self.bitmaps.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        let mut words = [0u64; PAGE_WORDS];
        let mut buf = vec![0u8; BLOCK];
        for b in bitmaps {
            let mut slots = lock(&b.slots);
            let mut written = Vec::new();
            let mut result = Ok(());
            for p in 0..b.bits.pages() {
                if !b.bits.take_dirty(p) {
                    continue;
                }
                b.bits.snapshot(p, &mut words);
                let slot = 1 - slots.current[p];
                slots.seq += 1;
                format::encode_page(p, slots.seq, &words, &mut buf);
                written.push((p, slot));
                if let Err(e) = self.storage.write_at(&b.file, format::page_offset(p, slot), &buf) {
                    result = Err(self.io_err("cannot write", &b.file, e));
                    break;
                }
            }
            if result.is_ok() && !written.is_empty() {
                result =
                    self.storage.sync(&b.file).map_err(|e| self.io_err("cannot sync", &b.file, e));
            }
            if let Err(e) = result {
                for (p, _) in written {
                    b.bits.mark_dirty(p);
                }
                return Err(self.poison_with(e));
            }
            for &(p, slot) in &written {
                slots.current[p] = slot;
            }
            self.counters.bitmap_pages_written.fetch_add(written.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The committer's periodic write-back, done only when the log has no free slot: then the
    /// next admission must evict, and finds its victims already written back. While the log
    /// has free slots nothing is evicted, and a write-back would only add fsyncs that compete
    /// with the volume's own I/O (recovery widens by the log's extents either way).
    fn periodic_write_back(&self) -> Result<(), CbtError> {
        let _io = lock(&self.io);
        let al = lock(&self.al);
        self.check()?;
        if al.table.iter().any(Option::is_none) {
            return Ok(());
        }
        self.write_back(&al, &[])
    }

    /// Writes every dirty page back now.
    #[cfg(test)]
    fn write_back_now(&self) -> Result<(), CbtError> {
        let _io = lock(&self.io);
        let al = lock(&self.al);
        self.check()?;
        self.write_back(&al, &[])
    }

    fn named(&self, name: &str) -> Result<Arc<Named>, CbtError> {
        self.bitmaps
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| self.no_such(name))
    }

    fn no_such(&self, name: &str) -> CbtError {
        CbtError::NoSuchBitmap { volume: self.volume.clone(), name: name.to_string() }
    }

    fn describe(&self, b: &Named) -> BitmapInfo {
        BitmapInfo {
            name: b.name.clone(),
            dirty_bytes: (b.bits.count_ones() * u64::from(self.block_size)).min(self.size),
            granularity: self.block_size,
            generation: b.generation.load(Ordering::Relaxed),
        }
    }

    /// Creates an empty bitmap `name`; durable when this returns. Blocking I/O.
    pub fn create(&self, name: &str) -> Result<BitmapInfo, CbtError> {
        validate_name(name)?;
        self.check()?;
        let _io = lock(&self.io);
        if self.bitmaps.read().unwrap_or_else(|e| e.into_inner()).contains_key(name) {
            return Err(CbtError::BitmapExists {
                volume: self.volume.clone(),
                name: name.to_string(),
            });
        }
        let bits = Bitmap::new(self.blocks);
        let pages = bits.pages();
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let header = BitmapHeader {
            granularity: self.block_size,
            bits: self.blocks,
            volume: self.uuid,
            name: name.to_string(),
            created,
        };
        // Every page's slot 0 holds a valid all-clear copy: a page with no valid copy is
        // damage, never "not written yet".
        let mut data = header.encode();
        data.resize(format::bitmap_file_len(pages) as usize, 0);
        let zeros = [0u64; PAGE_WORDS];
        for p in 0..pages {
            let off = format::page_offset(p, 0) as usize;
            format::encode_page(p, 1, &zeros, &mut data[off..off + BLOCK]);
        }
        let file = bitmap_file(name);
        self.storage
            .create_atomic(&file, &data)
            .map_err(|e| self.io_err("cannot create", &file, e))?;
        let named = Arc::new(Named {
            id: next_bitmap_id(),
            name: name.to_string(),
            file,
            bits,
            slots: Mutex::new(PageSlots { current: vec![0; pages], seq: 1 }),
            generation: AtomicU64::new(0),
        });
        let info = self.describe(&named);
        self.bitmaps.write().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), named);
        info!(volume = %self.volume, bitmap = name, "bitmap created");
        Ok(info)
    }

    /// Every bitmap, by name.
    pub fn list(&self) -> Vec<BitmapInfo> {
        let bitmaps = self.bitmaps.read().unwrap_or_else(|e| e.into_inner());
        bitmaps.values().map(|b| self.describe(b)).collect()
    }

    /// The identity of bitmap `name` now (unique in this process, never 0), to tell it from a
    /// bitmap created later under the same name (see [`Tracker::status_of`]).
    pub fn bitmap_id(&self, name: &str) -> Option<u64> {
        self.named(name).ok().map(|b| b.id)
    }

    /// The bitmaps' names (cheaper than [`Tracker::list`], which counts dirty bits).
    pub fn names(&self) -> Vec<String> {
        self.bitmaps.read().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect()
    }

    /// One bitmap's summary.
    pub fn info(&self, name: &str) -> Result<BitmapInfo, CbtError> {
        Ok(self.describe(&*self.named(name)?))
    }

    /// Clears bitmap `name` and writes the clear to disk. Writes in flight at the clear stay
    /// dirty (they set their bits again when they end). Blocking I/O.
    pub fn clear(&self, name: &str) -> Result<BitmapInfo, CbtError> {
        self.check()?;
        let b = self.named(name)?;
        let _io = lock(&self.io);
        let al = lock(&self.al);
        b.bits.clear_all();
        b.generation.fetch_add(1, Ordering::Relaxed);
        self.write_back(&al, &[])?;
        info!(volume = %self.volume, bitmap = name, "bitmap cleared");
        Ok(self.describe(&b))
    }

    /// Marks every block of bitmap `name` dirty and writes it to disk (a bitmap that must
    /// cover changes made before it existed). Blocking I/O.
    pub fn mark_all(&self, name: &str) -> Result<BitmapInfo, CbtError> {
        self.check()?;
        let b = self.named(name)?;
        let _io = lock(&self.io);
        let al = lock(&self.al);
        b.bits.set_range(0, self.blocks);
        self.write_back(&al, &[])?;
        info!(volume = %self.volume, bitmap = name, "bitmap marked all dirty");
        Ok(self.describe(&b))
    }

    /// Clears blocks `[first_block, end_block)` of bitmap `name` except those for which
    /// `keep(block)` is true (replication: the blocks of a committed epoch or resync range,
    /// keeping those a later epoch holds again). Returns the number of bits cleared. No I/O:
    /// the pages touched are written back lazily, and a clear not yet written back only makes
    /// the set after a crash larger. Writes in flight keep their bits (they set them again
    /// when they end, as with [`Tracker::clear`]). `keep` is asked about a bit again after it
    /// was cleared, so a writer that records its block where `keep` looks before its tracking
    /// ends (the capture does) never loses its bit.
    pub fn clear_blocks(
        &self,
        name: &str,
        first_block: u64,
        end_block: u64,
        keep: impl Fn(u64) -> bool,
    ) -> Result<u64, CbtError> {
        self.check()?;
        let b = self.named(name)?;
        Ok(b.bits.clear_range(first_block, end_block.min(self.blocks), keep))
    }

    /// The dirty runs `(first block, count)` of bitmap `name` among blocks
    /// `[from_block, from_block + max_blocks)`, in order (a catch-up reads them page by page).
    pub fn dirty_runs(
        &self,
        name: &str,
        from_block: u64,
        max_blocks: u64,
    ) -> Result<Vec<(u64, u64)>, CbtError> {
        let b = self.named(name)?;
        let end = from_block.saturating_add(max_blocks).min(self.blocks);
        let mut out = Vec::new();
        if from_block >= end {
            return Ok(out);
        }
        let mut at = from_block;
        for (n, dirty) in b.bits.runs(from_block, end, usize::MAX) {
            if dirty {
                out.push((at, n));
            }
            at += n;
        }
        Ok(out)
    }

    /// Removes bitmap `name` and its file. Blocking I/O.
    pub fn remove(&self, name: &str) -> Result<(), CbtError> {
        self.check()?;
        let _io = lock(&self.io);
        let b = self.named(name)?;
        self.bitmaps.write().unwrap_or_else(|e| e.into_inner()).remove(name);
        self.storage.remove(&b.file).map_err(|e| self.io_err("cannot remove", &b.file, e))?;
        info!(volume = %self.volume, bitmap = name, "bitmap removed");
        Ok(())
    }

    /// True if bitmap `name` exists.
    pub fn has(&self, name: &str) -> bool {
        self.bitmaps.read().unwrap_or_else(|e| e.into_inner()).contains_key(name)
    }

    /// The dirty byte ranges of bitmap `name`, coalesced, in order.
    pub fn extents(&self, name: &str) -> Result<Vec<ByteExtent>, CbtError> {
        let runs = self.status(name, 0, self.size, usize::MAX)?;
        let mut out = Vec::new();
        let mut at = 0;
        for (len, dirty) in runs {
            if dirty {
                out.push(ByteExtent { offset: at, length: len });
            }
            at += len;
        }
        Ok(out)
    }

    /// Runs `(length, dirty)` covering `[offset, offset + len)` (already range-checked, len >
    /// 0), alternating dirty/clean, at most `max_runs` of them (the last run ends where the
    /// answer stops; callers that need the whole range ask again from there).
    pub fn status(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        max_runs: usize,
    ) -> Result<Vec<(u64, bool)>, CbtError> {
        self.status_of(name, None, offset, len, max_runs)
    }

    /// [`Tracker::status`] of the bitmap whose [`Tracker::bitmap_id`] was `id`: if `name` has
    /// been removed (and perhaps created again) since, `NoSuchBitmap`.
    pub fn status_of(
        &self,
        name: &str,
        id: Option<u64>,
        offset: u64,
        len: u64,
        max_runs: usize,
    ) -> Result<Vec<(u64, bool)>, CbtError> {
        let b = self.named(name)?;
        if id.is_some_and(|id| id != b.id) {
            return Err(self.no_such(name));
        }
        let bs = u64::from(self.block_size);
        let end = (offset + len).min(self.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let runs = b.bits.runs(offset / bs, end.div_ceil(bs), max_runs);
        // Block runs to byte runs, trimmed to [offset, end).
        let mut at = (offset / bs) * bs;
        let mut out = Vec::with_capacity(runs.len());
        for (n, dirty) in runs {
            let start = at.max(offset);
            at += n * bs;
            let stop = at.min(end);
            if stop > start {
                out.push((stop - start, dirty));
            }
        }
        Ok(out)
    }

    /// Counters and how the tracker came up.
    pub fn stats(&self) -> TrackerStats {
        let c = &self.counters;
        TrackerStats {
            writes_tracked: c.writes_tracked.load(Ordering::Relaxed),
            al_transactions: c.al_transactions.load(Ordering::Relaxed),
            al_extents_added: c.al_extents_added.load(Ordering::Relaxed),
            al_evictions: c.al_evictions.load(Ordering::Relaxed),
            bitmap_pages_written: c.bitmap_pages_written.load(Ordering::Relaxed),
            recovery: self.recovery.clone(),
        }
    }

    /// Memory held by the bitmaps and the extent states, in bytes.
    pub fn memory_bytes(&self) -> u64 {
        let bitmaps = self.bitmaps.read().unwrap_or_else(|e| e.into_inner());
        let per_page_slot = std::mem::size_of::<std::sync::OnceLock<Box<[AtomicU64]>>>() as u64 + 2;
        let leaves: u64 = bitmaps
            .values()
            .map(|b| {
                b.bits.pages() as u64 * per_page_slot
                    + b.bits.allocated_pages() as u64 * (PAGE_WORDS as u64 * 8)
            })
            .sum();
        leaves + self.states.len() as u64 * 4
    }

    /// Records a clean stop: every bitmap is written back and the newest transaction says
    /// "clean", so the next start needs no widening. Call after the last write has completed;
    /// later writes fail. Blocking I/O.
    pub fn close(&self) -> Result<(), CbtError> {
        lock(&self.queue).closed = true;
        self.wake.notify_all();
        if let Some(h) = lock(&self.committer).take() {
            let _ = h.join();
        }
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        if self.poisoned.load(Ordering::Acquire) {
            return self.check();
        }
        let _io = lock(&self.io);
        let mut al = lock(&self.al);
        if al
            .table
            .iter()
            .flatten()
            .any(|&e| self.states[e as usize].load(Ordering::Acquire) & REFS != 0)
        {
            warn!(volume = %self.volume, "closing change tracking with writes in flight: not a clean stop");
            return Ok(());
        }
        // Crash ordering: 1. the bitmaps are written back and synced; 2. the CLEAN transaction.
        self.write_back(&al, &[])?;
        self.write_transaction(&mut al, Vec::new(), true)?;
        Ok(())
    }
}

/// The committer thread: admits waiting writes in batches, writes bitmap pages back every
/// [`WRITE_BACK_INTERVAL`], stops at close or when the tracker is gone.
fn committer(weak: Weak<Tracker>) {
    let mut last_write_back = Instant::now();
    loop {
        let Some(t) = weak.upgrade() else { return };
        let mut batch: Vec<Admit> = {
            let mut q = lock(&t.queue);
            if q.waiting.is_empty() && !q.closed {
                let wait = WRITE_BACK_INTERVAL.saturating_sub(last_write_back.elapsed());
                q = t
                    .wake
                    .wait_timeout(q, wait.max(Duration::from_millis(1)))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            if q.closed {
                for a in q.waiting.drain(..) {
                    if let Some(tx) = a.done {
                        let _ = tx.send(Err(CbtError::Closed { volume: t.volume.clone() }));
                    }
                }
                return;
            }
            q.waiting.drain(..).collect()
        };
        if !batch.is_empty() {
            for (req, result) in t.commit(&mut batch) {
                let ok = result.is_ok();
                if let Some(tx) = req.done {
                    if tx.send(result).is_err() && ok {
                        // The waiting write was cancelled: give back its references.
                        let (e0, e1) = (req.extents[0], req.extents[req.extents.len() - 1]);
                        t.unref(e0, e1);
                    }
                }
            }
            if !batch.is_empty() {
                // Every slot is held by writes in flight: let them finish, then try again.
                let mut q = lock(&t.queue);
                for a in batch.into_iter().rev() {
                    q.waiting.push_front(a);
                }
                drop(q);
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let due = last_write_back.elapsed() >= WRITE_BACK_INTERVAL;
        if due {
            last_write_back = Instant::now();
            if let Err(e) = t.periodic_write_back() {
                if !matches!(e, CbtError::Closed { .. } | CbtError::Poisoned { .. }) {
                    warn!(volume = %t.volume, "bitmap write-back failed: {e}");
                }
            }
        }
    }
}
