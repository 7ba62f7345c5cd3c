//! The per-volume replica store (DESIGN.md "Target store", invariants 3, 4, 5, 7): a sparse
//! raw image, a redo journal with group commit, and a metadata record. Synchronous and
//! deterministic; the async receiver drives it.
//!
//! Files of a volume (names relative to its directory, see [`storage`]):
//! ```text
//! meta              the metadata record (meta.rs), replaced atomically
//! image.raw         the replica image, sparse, exactly Geometry::size bytes
//! journal/SEQ.log   redo journal segments (journal.rs)
//! ```
//!
//! The life of a batch: `begin_batch` journals a begin record, `data` a data record per frame,
//! `end_batch` an end record, all without a sync. `commit` finds the longest committable prefix
//! of the chain, journals one commit record and makes the journal durable with one fdatasync
//! (group commit). `apply` copies committed batches from the journal into the image, syncs it,
//! records `applied` in the metadata and deletes journal segments nobody needs any more.
//!
//! Sync batches (issue 5) are journaled like epoch batches, but live: [`ReplicaStore::sync_durable`]
//! makes everything appended since the last journal sync durable with one fdatasync (group
//! commit) and says how many frames of the open sync batch are durable, for the agent's
//! acknowledgements. A sync batch is never dropped: an error only stops it (`cut`), and
//! [`ReplicaStore::seal`] (at the end of a session, before a new one, and in recovery) closes
//! the first open sync batch of the chain after its last complete record and commits the
//! chain through it. Any prefix of a sync batch is crash-consistent (its writes were captured
//! in order), so the replica stays at a boundary (invariant 3) and holds every frame ever
//! reported durable.
//!
//! Before the first commit (state Empty or Seeded) there is no boundary to protect, and the
//! initial sync's batches go straight into the image (`direct`): only their begin and end
//! records are journaled, so the chain logic sees them. A batch is direct only if every
//! other pending batch is a finished direct batch: otherwise its writes could land before a
//! journaled batch that precedes it in the chain, and it is journaled like a resync.

pub mod error;
pub mod journal;
pub mod meta;
mod recover;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod storage;
mod volumes;

#[cfg(test)]
mod sync_tests;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use blockferry_protocol::repl::{
    BatchHeader, BatchKind, End, Epoch, Generation, Geometry, ReplicaState, VolumeId,
};

pub use error::StoreError;
use journal::Body;
pub use meta::Meta;
use meta::META_FILE;
use recover::read_meta;
pub use storage::{DirStorage, Storage};
pub use volumes::Store;

/// The image file's name.
pub const IMAGE_FILE: &str = "image.raw";

/// The most journal bytes one read of apply fetches (records that follow each other).
const APPLY_READ_SPAN: u64 = 4 << 20;
/// Apply writes the records of its batches in windows of about this many bytes: within a
/// window, records are written in offset order, records wholly overwritten later in the window
/// are skipped and adjacent ones are written together. Windows follow the chain order.
const APPLY_WINDOW: u64 = 64 << 20;
/// The window of a split apply's slices ([`ReplicaStore::apply_start`]): about a millisecond
/// of 4 KiB writes.
const APPLY_STEP_WINDOW: u64 = 1 << 20;
/// The most payload bytes of unapplied records the store keeps in memory (so apply need not
/// read them back from the journal); records beyond it are read back.
const MAX_HELD: u64 = 256 << 20;
/// The most buffers one vectored image write of apply takes.
const APPLY_IOV: usize = 256;
/// Reclaimed journal segment files kept for reuse, at most.
const MAX_SPARES: usize = 2;

/// Tunables.
#[derive(Clone, Debug)]
pub struct Options {
    /// A new journal segment is started once the active one would grow past this.
    pub segment_size: u64,
    /// The window of a split apply's slices ([`ReplicaStore::apply_start`]).
    pub slice_window: u64,
    /// Payload bytes kept in memory for apply ([`MAX_HELD`]).
    pub max_held: u64,
}

impl Default for Options {
    fn default() -> Options {
        // Small enough that applied records are freed in steps of at most 16 MiB (the
        // active segment is deleted only after it rolls), large enough that rolling (one
        // fsync and one file creation) is rare.
        Options { segment_size: 16 << 20, slice_window: APPLY_STEP_WINDOW, max_held: MAX_HELD }
    }
}

/// A batch is known by the session that sent it and its id.
type Key = (u64, Epoch);

/// Where a data record is in the journal.
#[derive(Clone, Copy, Debug)]
struct Loc {
    seg: u64,
    off: u64,
    len: u64,
}

/// Where apply finds a data record's bytes.
#[derive(Clone, Debug)]
enum Held {
    /// A zero frame: no bytes.
    Zero,
    /// In memory (checked on receipt).
    Mem(Bytes),
    /// Only in the journal, at the record's [`Loc`].
    Journal,
}

/// A data record of a batch.
#[derive(Clone, Debug)]
struct Rec {
    loc: Loc,
    offset: u64,
    length: u32,
    data: Held,
}

#[derive(Debug)]
struct Batch {
    header: BatchHeader,
    session: u64,
    direct: bool,
    frames: u32,
    chain: u32,
    recs: Vec<Rec>,
    end: Option<End>,
    bytes: u64,
    /// Sync batch: frames reported durable by `sync_durable`.
    durable: u32,
    /// Sync batch stopped by an error (or an abort): no more frames; sealed at session end.
    cut: bool,
}

impl Batch {
    /// An open sync batch (not ended): sealed, never dropped.
    fn live_sync(&self) -> bool {
        self.header.kind == BatchKind::Sync && self.end.is_none()
    }

    fn key(&self) -> Key {
        (self.session, self.header.id)
    }

    /// Payload bytes this batch holds in memory.
    fn held(&self) -> u64 {
        self.recs.iter().map(|r| if let Held::Mem(d) = &r.data { d.len() as u64 } else { 0 }).sum()
    }
}

#[derive(Debug, Default)]
struct Segment {
    len: u64,
    /// Written before records were tagged (found by recovery): never recycled, since its
    /// records would read as valid in the segment it became.
    legacy: bool,
    /// The batches with records here (commit records count for the batches they name).
    keys: HashSet<Key>,
}

/// One record of an apply window: `length` bytes at `offset`, `data` (`None`: zeros).
#[derive(Debug)]
struct Put {
    offset: u64,
    length: u32,
    data: Option<Bytes>,
}

impl Put {
    fn end(&self) -> u64 {
        self.offset + u64::from(self.length)
    }
}

/// Counters and state for `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreStatus {
    pub journal_bytes: u64,
    pub segments: usize,
    /// Batches received but not committed.
    pub pending_batches: usize,
    /// Committed batches not yet applied.
    pub unapplied_batches: usize,
    /// Bytes of block data in the journal not yet applied (pending and committed).
    pub staged_bytes: u64,
    pub commits: u64,
    pub applies: u64,
    pub poisoned: bool,
    pub last_error: Option<String>,
}

/// One volume's replica. See the module documentation.
/// A split apply in progress: it covers the first `n` batches of `to_apply`, which reach
/// `through`; `next` is the (batch, record) the store thread writes next, `None` once the
/// [`ApplyJob`] is out (writing, if `job_writes`, and syncing).
#[derive(Clone, Copy, Debug)]
struct Applying {
    n: usize,
    through: Epoch,
    next: Option<(usize, usize)>,
    wrote: bool,
    /// The [`ApplyJob`] writes the batches too (they were all held in memory).
    job_writes: bool,
}

/// What [`ReplicaStore::apply_start`] did.
#[derive(Debug)]
pub enum ApplyStep {
    /// Nothing (left) to do now: applied here, nothing to apply, or the job runs.
    Idle,
    /// Wrote part of the batches: call again.
    More,
    /// Run this (on another thread) and give its result to [`ReplicaStore::apply_done`].
    Job(ApplyJob),
}

/// The part of an [`ReplicaStore::apply_start`] that runs on another thread: the batches'
/// writes when they were all held in memory, then the image's fdatasync and the drop of its
/// clean pages (see `sync_image`). Its result goes to [`ReplicaStore::apply_done`].
#[derive(Debug)]
pub struct ApplyJob {
    storage: Arc<dyn Storage>,
    /// Step 1 too, when every record was held in memory: these writes, in chain order,
    /// before the sync.
    puts: Vec<Put>,
}

/// How an [`ApplyJob`] failed.
#[derive(Debug)]
pub enum JobError {
    /// Writing the batches (a full disk is not fatal: the apply is tried again).
    Write(std::io::Error),
    /// The sync (always fatal: the page cache may have dropped the data).
    Sync(std::io::Error),
}

impl ApplyJob {
    /// True if it writes the batches too (not only the sync).
    pub fn writes(&self) -> bool {
        !self.puts.is_empty()
    }

    pub fn run(self) -> Result<(), JobError> {
        let mut bytes = 0u64;
        let mut from = 0;
        for (i, p) in self.puts.iter().enumerate() {
            bytes += u64::from(p.length);
            if bytes >= APPLY_WINDOW || i + 1 == self.puts.len() {
                write_puts(&*self.storage, &self.puts[from..=i]).map_err(JobError::Write)?;
                (from, bytes) = (i + 1, 0);
            }
        }
        self.storage.sync(IMAGE_FILE).map_err(JobError::Sync)?;
        if let Err(e) = self.storage.drop_cache(IMAGE_FILE) {
            tracing::debug!("dropping the image's cached pages: {e}");
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct ReplicaStore {
    storage: Arc<dyn Storage>,
    opts: Options,
    meta: Meta,
    /// The in-memory `meta` differs from the durable one.
    meta_dirty: bool,
    /// The active journal segment and its length (the end of its last good record).
    seg: u64,
    segments: BTreeMap<u64, Segment>,
    /// Reclaimed segment files kept for reuse (`journal/SEQ.spare`, by their old SEQ): see
    /// [`ReplicaStore::reclaim`].
    spares: Vec<u64>,
    /// Segments started from a spare file, since open.
    recycled: u64,
    /// Whether reclaimed segments are kept as spares (off after running out of space).
    keep_spares: bool,
    /// This session's batches not yet committed, by id.
    pending: BTreeMap<Epoch, Batch>,
    /// Committed batches not yet applied, in chain order (they cover (applied, committed]).
    to_apply: Vec<Batch>,
    /// Payload bytes held in memory by pending and unapplied batches (at most [`MAX_HELD`]).
    held: u64,
    /// Direct writes to the image since its last sync.
    image_dirty: bool,
    /// A split apply ([`ReplicaStore::apply_start`]) of the first batches of `to_apply`.
    applying: Option<Applying>,
    /// Records appended to the journal since its last sync.
    journal_dirty: bool,
    /// Sync frames arrived (or a batch ended, which may let a sync batch after it be
    /// reported) since the last `sync_durable`.
    sync_dirty: bool,
    /// The sync batches recovery sealed when the store was opened (id, frames).
    recovery_sealed: Vec<(Epoch, u32)>,
    poisoned: Option<String>,
    status: StoreStatus,
}

fn describe_io(
    storage: &dyn Storage,
    file: &str,
    what: &'static str,
    source: io::Error,
) -> StoreError {
    StoreError::Io { what, path: storage.describe(file), source }
}

impl ReplicaStore {
    /// Creates the volume's files in `storage` if new (state Empty) or opens and recovers them:
    /// the journal is scanned up to its first invalid record (which is truncated away), every
    /// committed batch after `applied` is applied again (redo is idempotent), and the session
    /// number is bumped so records of the dead session are never taken for live ones.
    /// `generation` is recorded for a new replica; an existing one keeps its own (compare it
    /// in the session and call [`ReplicaStore::set_generation`]). A geometry or uuid mismatch
    /// is an error naming both values.
    pub fn open(
        storage: Arc<dyn Storage>,
        volume: VolumeId,
        name: &str,
        geometry: Geometry,
        generation: Generation,
    ) -> Result<ReplicaStore, StoreError> {
        Self::open_with(storage, volume, name, geometry, generation, Options::default())
    }

    /// [`ReplicaStore::open`] on real files in `dir` (created if missing).
    pub fn open_dir(
        dir: &Path,
        volume: VolumeId,
        name: &str,
        geometry: Geometry,
        generation: Generation,
    ) -> Result<ReplicaStore, StoreError> {
        let storage = DirStorage::open(dir).map_err(|source| StoreError::Io {
            what: "creating",
            path: dir.to_path_buf(),
            source,
        })?;
        Self::open(Arc::new(storage), volume, name, geometry, generation)
    }

    /// [`ReplicaStore::open`] with tunables.
    pub fn open_with(
        storage: Arc<dyn Storage>,
        volume: VolumeId,
        name: &str,
        geometry: Geometry,
        generation: Generation,
        opts: Options,
    ) -> Result<ReplicaStore, StoreError> {
        let st = &*storage;
        let meta = match read_meta(st)? {
            Some(m) => {
                if m.volume != volume {
                    return Err(StoreError::Mismatch {
                        what: "volume uuid",
                        stored: m.volume.to_string(),
                        requested: volume.to_string(),
                    });
                }
                if m.geometry != geometry {
                    let g =
                        |g: Geometry| format!("{} bytes in blocks of {}", g.size(), g.block_size());
                    return Err(StoreError::Mismatch {
                        what: "geometry",
                        stored: g(m.geometry),
                        requested: g(geometry),
                    });
                }
                m
            }
            None => {
                // Creating a replica:
                // 1. create image.raw and size it (sparse); 2. sync it;
                // 3. write meta atomically. meta is what makes the replica exist: a crash
                //    before 3 leaves files that the next open creates again.
                let io = |what, file: &'static str| move |e| describe_io(st, file, what, e);
                st.create(IMAGE_FILE).map_err(io("creating", IMAGE_FILE))?;
                st.set_len(IMAGE_FILE, geometry.size()).map_err(io("sizing", IMAGE_FILE))?;
                st.sync(IMAGE_FILE).map_err(io("syncing", IMAGE_FILE))?;
                let m = Meta {
                    version: meta::FORMAT_VERSION,
                    volume,
                    name: name.to_string(),
                    geometry,
                    generation,
                    history: Vec::new(),
                    state: ReplicaState::Empty,
                    committed: Epoch::ZERO,
                    applied: Epoch::ZERO,
                    session: 0,
                };
                st.create_atomic(META_FILE, &m.encode()).map_err(io("writing", META_FILE))?;
                tracing::info!(volume = %volume, name, size = geometry.size(), "created replica");
                m
            }
        };
        let mut s = ReplicaStore {
            storage: storage.clone(),
            opts,
            meta,
            meta_dirty: true,
            seg: 0,
            segments: BTreeMap::new(),
            spares: Vec::new(),
            recycled: 0,
            keep_spares: true,
            pending: BTreeMap::new(),
            to_apply: Vec::new(),
            held: 0,
            image_dirty: false,
            applying: None,
            journal_dirty: false,
            sync_dirty: false,
            recovery_sealed: Vec::new(),
            poisoned: None,
            status: StoreStatus::default(),
        };
        s.recover()?;
        Ok(s)
    }

    /// Reads the metadata of the replica in `dir` without opening it (for status and verify
    /// tools). `committed` is the durable record's, which may lag the journal's.
    pub fn inspect(dir: &Path) -> Result<Meta, StoreError> {
        let path = dir.join(META_FILE);
        let b = std::fs::read(&path).map_err(|source| StoreError::Io {
            what: "reading",
            path: path.clone(),
            source,
        })?;
        Meta::decode(&b).map_err(|what| StoreError::Corrupt { what, path })
    }

    /// The live metadata: committed, applied, state, generation, geometry, session.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// The image's path, if it is a real file.
    pub fn image_path(&self) -> Option<PathBuf> {
        self.storage.local_path(IMAGE_FILE)
    }

    /// Counters and state.
    pub fn status(&self) -> StoreStatus {
        let mut s = self.status.clone();
        s.journal_bytes = self.segments.values().map(|g| g.len).sum();
        s.segments = self.segments.len();
        s.pending_batches = self.pending.len();
        s.unapplied_batches = self.to_apply.len();
        s.staged_bytes = self
            .pending
            .values()
            .chain(&self.to_apply)
            .filter(|b| !b.direct)
            .map(|b| b.bytes)
            .sum();
        s.poisoned = self.poisoned.is_some();
        s
    }

    /// Records a new generation (the old one goes to the history), durably.
    pub fn set_generation(&mut self, generation: Generation) -> Result<(), StoreError> {
        self.check()?;
        if generation != self.meta.generation {
            let old = self.meta.generation;
            self.meta.history.insert(0, old);
            self.meta.generation = generation;
            if let Err(e) = self.write_meta() {
                self.meta.history.remove(0);
                self.meta.generation = old;
                return Err(e);
            }
        }
        Ok(())
    }

    /// A new agent session: seals the open sync batches (see [`ReplicaStore::seal`]), forgets
    /// every batch not committed (their journal records are dead: they carry the old session
    /// number) and bumps the session, durably.
    pub fn reset_session(&mut self) -> Result<(), StoreError> {
        self.check()?;
        self.seal()?;
        // Direct writes of a forgotten batch must be durable before the new session compares
        // hashes of the image, or a power cut could undo what the hashes promised.
        self.sync_image()?;
        self.pending.clear();
        self.held = self.to_apply.iter().map(Batch::held).sum();
        self.meta.session += 1;
        if let Err(e) = self.write_meta() {
            self.meta.session -= 1;
            return Err(e);
        }
        // The forgotten batches' records are dead: free their space now.
        if self.to_apply.is_empty() {
            self.reclaim();
        }
        Ok(())
    }

    /// Starts batch `h`. Its `base` must be the committed boundary or another batch's id.
    pub fn begin_batch(&mut self, h: BatchHeader) -> Result<(), StoreError> {
        self.check()?;
        let bad = |what: &str| Err(StoreError::Batch { id: h.id, what: what.to_string() });
        if h.id <= h.base {
            return bad("id is not after its base");
        }
        if h.id <= self.meta.committed {
            return bad("already committed");
        }
        if self.pending.contains_key(&h.id) {
            return bad("already begun in this session");
        }
        if self.pending.values().any(|b| b.header.base == h.base) {
            return bad("another batch of this session has the same base");
        }
        // Direct only if everything before it in the chain is direct and finished, so its
        // writes never land before a journaled batch that precedes it in the chain.
        let direct = h.kind == BatchKind::Initial
            && self.meta.state != ReplicaState::Consistent
            && self.to_apply.is_empty()
            && self.applying.is_none()
            && self.pending.values().all(|b| b.direct && b.end.is_some())
            && (h.base == self.meta.committed || self.pending.contains_key(&h.base));
        if direct && self.meta.state == ReplicaState::Empty {
            // Empty -> Seeded is durable before the first byte reaches the image.
            self.meta.state = ReplicaState::Seeded;
            if let Err(e) = self.write_meta() {
                self.meta.state = ReplicaState::Empty;
                return Err(e);
            }
        }
        let session = self.meta.session;
        let begin = Body::Begin { kind: h.kind, id: h.id, base: h.base, direct };
        self.append(session, &begin, &[(session, h.id)])?;
        let b = Batch {
            header: h,
            session,
            direct,
            frames: 0,
            chain: 0,
            recs: Vec::new(),
            end: None,
            bytes: 0,
            durable: 0,
            cut: false,
        };
        self.pending.insert(h.id, b);
        Ok(())
    }

    /// One data frame of batch `id`: `length` bytes at `offset`, `data` its uncompressed bytes
    /// (`None`: zeros). The caller has checked the frame's crc and sequence. On an error
    /// other than a range error the batch is dropped. The store keeps `data` (not a copy)
    /// until the batch is applied, within a memory budget.
    pub fn data(
        &mut self,
        id: Epoch,
        offset: u64,
        length: u32,
        data: Option<Bytes>,
    ) -> Result<(), StoreError> {
        self.data_run(id, vec![(offset, length, data)])
    }

    /// Data frames `(offset, length, data)` of batch `id` that arrived together, in order:
    /// [`ReplicaStore::data`] of each, but their records are journaled with one vectored
    /// write (per segment). A range or length error stores none of them; any other error
    /// drops the batch.
    pub fn data_run(
        &mut self,
        id: Epoch,
        frames: Vec<(u64, u32, Option<Bytes>)>,
    ) -> Result<(), StoreError> {
        self.check()?;
        let g = self.meta.geometry;
        for (offset, length, data) in &frames {
            let (offset, length) = (*offset, *length);
            if !g.contains_aligned(offset, u64::from(length)) {
                return Err(StoreError::OutOfRange {
                    offset,
                    length: u64::from(length),
                    size: g.size(),
                    block_size: g.block_size(),
                });
            }
            if let Some(d) = data.as_ref().filter(|d| d.len() != length as usize) {
                return Err(StoreError::Batch {
                    id,
                    what: format!(
                        "frame at {offset} carries {} bytes, its length says {length}",
                        d.len()
                    ),
                });
            }
        }
        let Some(b) = self.pending.get(&id) else {
            return Err(StoreError::Batch { id, what: "data for a batch that is not open".into() });
        };
        if b.end.is_some() {
            return Err(StoreError::Batch { id, what: "data after the end of the batch".into() });
        }
        if b.cut {
            return Err(StoreError::Batch {
                id,
                what: "data for a sync batch stopped by an earlier error (it is sealed at the \
                       end of the session)"
                    .into(),
            });
        }
        let (direct, session, sync) = (b.direct, b.session, b.header.kind == BatchKind::Sync);
        if direct {
            self.image_dirty = true;
            for (offset, length, data) in &frames {
                let r = match data {
                    Some(d) => self.storage.write_at(IMAGE_FILE, *offset, d),
                    None => self.storage.zero(IMAGE_FILE, *offset, u64::from(*length)),
                };
                if let Err(e) = r {
                    let e = self.fail("writing", IMAGE_FILE, e);
                    self.abort_batch(id);
                    return Err(e);
                }
            }
            let n = frames.len() as u32;
            let bytes: u64 = frames.iter().map(|f| u64::from(f.1)).sum();
            let b = self
                .pending
                .get_mut(&id)
                .ok_or(StoreError::Batch { id, what: "vanished".into() })?;
            b.frames += n;
            b.bytes += bytes;
            return Ok(());
        }
        // Headers and payloads in vectored writes: the payloads are not copied.
        let rec_len =
            |k: usize| (journal::DATA_HEAD + frames[k].2.as_ref().map_or(0, Bytes::len)) as u64;
        let mut i = 0;
        while i < frames.len() {
            // Records i..j: as many as fit in the active segment (at least one).
            let seg_len = self.segments.get(&self.seg).map_or(0, |s| s.len);
            let (mut j, mut group) = (i, 0u64);
            while j < frames.len() {
                let l = rec_len(j);
                if j > i && (seg_len + group + l > self.opts.segment_size || j - i >= 256) {
                    break;
                }
                group += l;
                j += 1;
            }
            // The records carry the tag of the segment they go into: a new one if they do
            // not fit.
            if let Err(e) = self.make_room(group) {
                self.abort_batch(id);
                return Err(e);
            }
            let tag = journal::tag(self.seg);
            let heads: Vec<[u8; journal::DATA_HEAD]> = frames[i..j]
                .iter()
                .map(|(offset, length, data)| {
                    journal::data_head(session, tag, id, *offset, *length, data.as_deref())
                })
                .collect();
            let mut parts: Vec<&[u8]> = Vec::with_capacity(2 * (j - i));
            for (head, (_, _, data)) in heads.iter().zip(&frames[i..j]) {
                parts.push(head);
                if let Some(d) = data {
                    parts.push(d);
                }
            }
            let loc = match self.append_parts(&parts, &[(session, id)]) {
                Ok(loc) => loc,
                Err(e) => {
                    // The groups before this one are in the journal and in the batch: a sync
                    // batch is cut there (its seal ends it after them), any other is dropped.
                    self.abort_batch(id);
                    return Err(e);
                }
            };
            // The records i..j join the batch as soon as they are appended, so that the
            // batch (frames, chain) always matches its records in the journal.
            let mut off = loc.off;
            let mut recs = Vec::with_capacity(j - i);
            for (k, head) in (i..j).zip(&heads) {
                let (offset, length, data) = &frames[k];
                let len = rec_len(k);
                let held = match data {
                    None => Held::Zero,
                    Some(d) if self.held + d.len() as u64 <= self.opts.max_held => {
                        self.held += d.len() as u64;
                        Held::Mem(d.clone())
                    }
                    Some(_) => Held::Journal,
                };
                recs.push((
                    Rec {
                        loc: Loc { seg: loc.seg, off, len },
                        offset: *offset,
                        length: *length,
                        data: held,
                    },
                    journal::record_crc(head),
                ));
                off += len;
            }
            let b = self
                .pending
                .get_mut(&id)
                .ok_or(StoreError::Batch { id, what: "vanished".into() })?;
            for (rec, crc) in recs {
                b.chain = journal::chain(b.chain, crc);
                b.frames += 1;
                b.bytes += u64::from(rec.length);
                b.recs.push(rec);
            }
            if sync {
                self.sync_dirty = true;
            }
            i = j;
        }
        Ok(())
    }

    /// The end of batch `id` (checked by the caller against the frames received). A frame
    /// count that disagrees with the frames stored drops the batch.
    pub fn end_batch(&mut self, id: Epoch, end: End) -> Result<(), StoreError> {
        self.check()?;
        let Some(b) = self.pending.get(&id) else {
            return Err(StoreError::Batch { id, what: "end of a batch that is not open".into() });
        };
        if b.end.is_some() {
            return Err(StoreError::Batch { id, what: "second end frame".into() });
        }
        if b.cut {
            return Err(StoreError::Batch {
                id,
                what: "end of a sync batch stopped by an earlier error".into(),
            });
        }
        if b.frames != end.frames {
            let what =
                format!("end says {} frames, {} were stored; batch dropped", end.frames, b.frames);
            self.abort_batch(id);
            return Err(StoreError::Batch { id, what });
        }
        let (direct, session, chain) = (b.direct, b.session, b.chain);
        if direct {
            // 1. the batch's image writes are durable; 2. then its end record is journaled
            //    (synced by the next commit). A crash between leaves the batch incomplete.
            self.sync_image()?;
        }
        let rec = Body::End { id, through: end.through, frames: end.frames, chain };
        if let Err(e) = self.append(session, &rec, &[(session, id)]) {
            self.abort_batch(id);
            return Err(e);
        }
        if let Some(b) = self.pending.get_mut(&id) {
            b.end = Some(end);
        }
        if self.pending.values().any(|b| b.header.kind == BatchKind::Sync && b.durable < b.frames) {
            self.sync_dirty = true;
        }
        Ok(())
    }

    /// Drops batch `id` (not committed); its records in the journal are dead. Unknown ids
    /// are ignored. An open sync batch is not dropped (frames of it may have been reported
    /// durable): it is cut, takes no more frames, and is sealed at the end of the session.
    pub fn abort_batch(&mut self, id: Epoch) {
        if let Some(b) = self.pending.get_mut(&id).filter(|b| b.live_sync()) {
            if !b.cut {
                b.cut = true;
                tracing::debug!(volume = %self.meta.volume, batch = %id, frames = b.frames,
                    "sync batch stopped; it is sealed at the end of the session");
            }
            return;
        }
        if let Some(b) = self.pending.remove(&id) {
            self.held = self.held.saturating_sub(b.held());
            tracing::debug!(volume = %self.meta.volume, batch = %id, "batch dropped");
        }
    }

    /// True if sync frames arrived (or a batch ended) since the last
    /// [`ReplicaStore::sync_durable`]: the driver should call it as soon as its queue runs dry.
    pub fn sync_pending(&self) -> bool {
        self.sync_dirty
    }

    /// Group commit of sync frames: one fdatasync of the journal makes every record appended
    /// since the last one durable; then reports, as `(id, frames)`, the sync batches whose
    /// durable prefix grew and that a [`ReplicaStore::seal`] would commit with at least those
    /// frames. That is the chain from the committed boundary through complete (ended) batches
    /// up to the first open sync batch, and no further: `Durable { id, frames }` also promises
    /// every batch before `id` (the agent answers their writes with it), and a batch after an
    /// open one would not be complete. A resync in the chain whose `through` lies beyond the
    /// batch would keep the seal from making a boundary, so nothing after it is reported.
    pub fn sync_durable(&mut self) -> Result<Vec<(Epoch, u32)>, StoreError> {
        self.check()?;
        if !self.sync_pending() {
            return Ok(Vec::new());
        }
        self.sync_dirty = false;
        if self.journal_dirty {
            // Crash ordering: 1. the records are in the segment (appended); 2. one fdatasync
            // (earlier segments were synced when the journal rolled past them); 3. only then
            // is any frame reported durable.
            self.sync_journal()?;
        }
        let mut out = Vec::new();
        let mut cur = self.meta.committed;
        let mut barrier: Option<Epoch> = None;
        while let Some(b) = self.pending.values_mut().find(|b| b.header.base == cur) {
            let id = b.header.id;
            if b.end.is_none() && b.header.kind != BatchKind::Sync {
                break;
            }
            if barrier.is_some_and(|t| t > id) && b.end.is_none() {
                break;
            }
            if b.header.kind == BatchKind::Sync && b.frames > b.durable {
                b.durable = b.frames;
                out.push((id, b.frames));
            }
            match b.end {
                None => break,
                Some(end) if !matches!(b.header.kind, BatchKind::Epoch | BatchKind::Sync) => {
                    barrier = Some(end.through)
                }
                Some(_) => {}
            }
            cur = id;
        }
        Ok(out)
    }

    /// Seals the open sync batch (at the end of a session, before a new one, and in
    /// recovery): following the chain from the committed boundary through ended batches, the
    /// first open batch, if it is a sync batch, gets an end record after its last complete
    /// data record; then the chain is committed as far as it can be, through the last sync
    /// batch in it at most (a `Durable` of a sync batch promised it and every batch before
    /// it; what follows is left as it was, and dropped with the session).
    ///
    /// Only the first open batch is sealed, not the (sync) batches after it: their frames were
    /// never reported durable (`sync_durable` stops at the first open batch), and leaving them
    /// out makes the replica an exact prefix of the agent's write stream, not a prefix of one
    /// epoch followed by a prefix of the next (also crash-consistent, since none of the
    /// missing writes was acknowledged, but a state no single cut of the stream shows).
    /// Returns the sealed batch as `(id, frames)` (none or one); `meta().committed` says what
    /// was committed. The session's batches after the sealed one are forgotten.
    pub fn seal(&mut self) -> Result<Vec<(Epoch, u32)>, StoreError> {
        self.check()?;
        let mut sealed = Vec::new();
        let mut last_sync = None;
        let mut cur = self.meta.committed;
        while let Some(b) = self.pending.values().find(|b| b.header.base == cur) {
            let (id, session, frames, chain) = (b.header.id, b.session, b.frames, b.chain);
            if b.header.kind == BatchKind::Sync {
                last_sync = Some(id);
            }
            if b.end.is_none() {
                if b.header.kind != BatchKind::Sync {
                    break;
                }
                // Crash ordering of a seal: 1. the end record follows every data record of
                // the batch (appended before); 2. the commit below syncs it with its commit
                // record. A crash before 2 leaves the batch open in the journal, and recovery
                // seals it again.
                let rec = Body::End { id, through: journal::SEALED, frames, chain };
                self.append(session, &rec, &[(session, id)])?;
                if let Some(b) = self.pending.get_mut(&id) {
                    b.end = Some(End { through: id, frames, batch_crc: chain });
                }
                tracing::info!(volume = %self.meta.volume, batch = %id, frames,
                    "sync batch sealed after its last complete frame");
                sealed.push((id, frames));
                // The batches after it never follow it now (it may have been sealed short):
                // forgotten, so that no later commit puts them on a shortened prefix.
                self.pending.retain(|&b, _| b <= id);
                // Their payloads held in memory are freed with them.
                self.held = self.pending.values().chain(&self.to_apply).map(Batch::held).sum();
                break;
            }
            cur = id;
        }
        if let Some(limit) = last_sync {
            self.commit_upto(Some(limit))?;
        }
        Ok(sealed)
    }

    /// The sync batches recovery sealed when the store was opened, as `(id, frames)`.
    pub fn recovery_sealed(&self) -> &[(Epoch, u32)] {
        &self.recovery_sealed
    }

    /// Group commit: commits through the largest batch E such that the chain from `committed`
    /// to E is made of complete batches and the last resync or initial batch in it has
    /// `through <= E`. One commit record, one fdatasync. `Some(E)` if the boundary moved.
    pub fn commit(&mut self) -> Result<Option<Epoch>, StoreError> {
        self.commit_upto(None)
    }

    /// [`ReplicaStore::commit`], through no batch after `limit`.
    fn commit_upto(&mut self, limit: Option<Epoch>) -> Result<Option<Epoch>, StoreError> {
        self.check()?;
        let base = self.meta.committed;
        let (mut cur, mut ids, mut barrier, mut best) = (base, Vec::new(), None, 0);
        while let Some(b) = self.pending.values().find(|b| b.header.base == cur) {
            if limit.is_some_and(|l| b.header.id > l) {
                break;
            }
            let Some(end) = b.end else { break };
            if !matches!(b.header.kind, BatchKind::Epoch | BatchKind::Sync) {
                barrier = Some(end.through);
            }
            cur = b.header.id;
            ids.push(cur);
            if barrier.is_none_or(|t| t <= cur) {
                best = ids.len();
            }
        }
        if best == 0 {
            return Ok(None);
        }
        ids.truncate(best);
        let through = ids[best - 1];
        let session = self.meta.session;
        let keys: Vec<Key> = ids.iter().map(|&id| (session, id)).collect();
        // Crash ordering of a commit:
        // 1. the commit record is appended after every record of its batches;
        // 2. one fdatasync of the active segment makes it and them durable (earlier segments
        //    were synced when the journal moved past them);
        // 3. only then is the commit reported. A crash before 2 completes may or may not keep
        //    the commit; recovery counts it only if it and all its batches are intact.
        // 0. direct writes (initial sync, also of dropped batches) are durable before the
        //    first boundary is recorded over them.
        self.sync_image()?;
        let rec = Body::Commit { base, through, ids: ids.clone() };
        self.append(session, &rec, &keys)?;
        self.sync_journal()?;
        for id in ids {
            if let Some(b) = self.pending.remove(&id) {
                self.to_apply.push(b);
            }
        }
        self.meta.committed = through;
        self.meta.state = ReplicaState::Consistent;
        self.meta_dirty = true;
        self.status.commits += 1;
        Ok(Some(through))
    }

    /// Writes the committed, unapplied batches into the image in chain order, syncs it,
    /// records `applied` in the metadata and deletes journal segments nobody needs.
    /// Supersedes a split apply ([`ReplicaStore::apply_start`]) that writes in slices here: its
    /// batches are written and synced again. Not while its [`ApplyJob`] runs: take that
    /// first ([`ReplicaStore::apply_done`]).
    pub fn apply(&mut self) -> Result<(), StoreError> {
        self.check()?;
        if self.to_apply.is_empty() && !self.meta_dirty {
            return Ok(());
        }
        // Crash ordering of apply (redo: every step may be repeated after a crash):
        // 1. pwrite/punch each data record of each batch, in chain order;
        // 2. fdatasync the image;
        // 3. write meta with applied = committed (atomic);
        // 4. delete journal segments whose records are all applied or dead.
        // A crash before 3 leaves applied where it was, and recovery writes the same bytes
        // again; the journal still holds them because 4 comes last.
        // An ApplyJob that writes must have finished (its `apply_done` taken): it would
        // write older data after this.
        debug_assert!(
            !self.applying.is_some_and(|a| a.job_writes),
            "apply() while an apply job writes"
        );
        self.applying = None;
        if self.write_unapplied()? {
            self.image_dirty = true;
        }
        self.sync_image()?;
        self.finish_apply(self.to_apply.len(), self.meta.committed)
    }

    /// [`ReplicaStore::apply`] for a caller that must not stall on it (the server's store
    /// thread: meanwhile it journals sync frames and reports them durable). After a second
    /// of random 4 KiB writes, step 1 takes tens of milliseconds and the image's fdatasync as
    /// many again. When every record is held in memory, steps 1 and 2 are handed out at once
    /// ([`ApplyStep::Job`]) to run on another thread; otherwise step 1 is done here a slice at
    /// a time (windows until `until` has passed; [`ApplyStep::More`]: call again) and then
    /// step 2 is handed out. The job's result goes to [`ReplicaStore::apply_done`], which
    /// does steps 3 and 4. The apply covers the batches committed when it began; later ones wait
    /// for the next. Owed syncs of direct writes (their commits rely on `image_dirty`) take
    /// the plain way.
    pub fn apply_start(&mut self, until: std::time::Instant) -> Result<ApplyStep, StoreError> {
        self.check()?;
        let mut a = match self.applying {
            Some(a) => a,
            None if self.to_apply.is_empty() || self.image_dirty => {
                return self.apply().map(|()| ApplyStep::Idle);
            }
            None => {
                let (n, through) = (self.to_apply.len(), self.meta.committed);
                let held = |r: &Rec| matches!(r.data, Held::Mem(_) | Held::Zero);
                if self.to_apply.iter().all(|b| b.recs.iter().all(held)) {
                    // All in memory: the writes go to the other thread with the sync.
                    let puts = self
                        .to_apply
                        .iter()
                        .flat_map(|b| &b.recs)
                        .map(|r| Put {
                            offset: r.offset,
                            length: r.length,
                            data: match &r.data {
                                Held::Mem(d) => Some(d.clone()),
                                _ => None,
                            },
                        })
                        .collect();
                    self.applying =
                        Some(Applying { n, through, next: None, wrote: true, job_writes: true });
                    return Ok(ApplyStep::Job(ApplyJob { storage: self.storage.clone(), puts }));
                }
                Applying { n, through, next: Some((0, 0)), wrote: false, job_writes: false }
            }
        };
        let Some(from) = a.next else {
            return Ok(ApplyStep::Idle);
        };
        let batches = std::mem::take(&mut self.to_apply);
        let r = self.write_batches(&batches[..a.n], from, self.opts.slice_window, Some(until));
        self.to_apply = batches;
        let (next, wrote) = match r {
            Ok(x) => x,
            Err(e) => {
                self.applying = None;
                return Err(e);
            }
        };
        a.wrote |= wrote;
        if next.0 < a.n {
            a.next = Some(next);
            self.applying = Some(a);
            return Ok(ApplyStep::More);
        }
        if !a.wrote {
            self.applying = None;
            return self.finish_apply(a.n, a.through).map(|()| ApplyStep::Idle);
        }
        a.next = None;
        self.applying = Some(a);
        Ok(ApplyStep::Job(ApplyJob { storage: self.storage.clone(), puts: Vec::new() }))
    }

    /// Finishes an [`ReplicaStore::apply_start`] with the result of its [`ApplyJob`]. A
    /// failed sync poisons the store (the kernel reports a lost write once), also when a plain
    /// apply superseded it.
    pub fn apply_done(&mut self, done: Result<(), JobError>) -> Result<(), StoreError> {
        let running = self.applying.take();
        match done {
            Ok(()) => {}
            // Not poisoned (a full disk): the batches stay unapplied, the next apply retries.
            Err(JobError::Write(e)) => return Err(self.fail("applying to", IMAGE_FILE, e)),
            Err(JobError::Sync(e)) => return Err(self.fail_sync(IMAGE_FILE, e)),
        }
        match running {
            Some(a) if a.next.is_none() => {
                self.check()?;
                self.finish_apply(a.n, a.through)
            }
            // Superseded meanwhile.
            _ => Ok(()),
        }
    }

    /// True while a split apply has more to write (`ApplyStep::More` was the last answer).
    pub fn apply_writing(&self) -> bool {
        self.applying.is_some_and(|a| a.next.is_some())
    }

    /// True if committed batches are not all in the image yet (the sync of those a split
    /// apply wrote may still run).
    pub fn image_behind(&self) -> bool {
        match self.applying {
            Some(a) => a.job_writes || a.next.is_some() || self.to_apply.len() > a.n,
            None => !self.to_apply.is_empty(),
        }
    }

    /// Step 1 of apply for every unapplied batch. True if it wrote.
    fn write_unapplied(&mut self) -> Result<bool, StoreError> {
        let batches = std::mem::take(&mut self.to_apply);
        let r = self.write_batches(&batches, (0, 0), APPLY_WINDOW, None);
        self.to_apply = batches;
        r.map(|(_, wrote)| wrote)
    }

    /// Steps 3 and 4 of apply, once the image holds the first `n` unapplied batches durably,
    /// which reach `through`.
    fn finish_apply(&mut self, n: usize, through: Epoch) -> Result<(), StoreError> {
        let applied = self.meta.applied;
        self.meta.applied = through;
        if let Err(e) = self.write_meta() {
            self.meta.applied = applied;
            return Err(e);
        }
        if n > 0 {
            self.status.applies += 1;
        }
        self.to_apply.drain(..n.min(self.to_apply.len()));
        self.held = self.pending.values().chain(&self.to_apply).map(Batch::held).sum();
        self.reclaim();
        Ok(())
    }

    /// Step 1 of apply: the data records of `batches` into the image, from record `from`
    /// (batch, record), in windows of up to `window_size` bytes (see [`APPLY_WINDOW`]); with
    /// `until`, it stops after the first window that ends past it. Returns where it stopped
    /// (`(batches.len(), 0)`: at the end) and whether it wrote. Bytes not held in memory are
    /// read back from the journal and checked.
    fn write_batches(
        &mut self,
        batches: &[Batch],
        from: (usize, usize),
        window_size: u64,
        until: Option<std::time::Instant>,
    ) -> Result<((usize, usize), bool), StoreError> {
        let mut window: Vec<Put> = Vec::new();
        // Records of the window to read from the journal: (index in window, batch, record).
        let mut reads: Vec<(usize, &Batch, Loc)> = Vec::new();
        let mut bytes = 0u64;
        let mut wrote = false;
        for (bi, b) in batches.iter().enumerate().skip(from.0) {
            let first = if bi == from.0 { from.1 } else { 0 };
            for (ri, r) in b.recs.iter().enumerate().skip(first) {
                let data = match &r.data {
                    Held::Zero => None,
                    Held::Mem(d) => Some(d.clone()),
                    Held::Journal => {
                        reads.push((window.len(), b, r.loc));
                        Some(Bytes::new())
                    }
                };
                window.push(Put { offset: r.offset, length: r.length, data });
                bytes += u64::from(r.length);
                if bytes >= window_size {
                    self.read_back(&mut window, &reads)?;
                    self.write_window(&window)?;
                    (wrote, bytes) = (true, 0);
                    window.clear();
                    reads.clear();
                    if until.is_some_and(|t| std::time::Instant::now() >= t) {
                        let next = if ri + 1 < b.recs.len() { (bi, ri + 1) } else { (bi + 1, 0) };
                        if next.0 < batches.len() {
                            return Ok((next, wrote));
                        }
                    }
                }
            }
        }
        if !window.is_empty() {
            self.read_back(&mut window, &reads)?;
            self.write_window(&window)?;
            wrote = true;
        }
        Ok(((batches.len(), 0), wrote))
    }

    /// Fills the bytes of `reads` (records of `window` not held in memory) from the journal,
    /// checking each record. Records that follow each other in a segment are read together
    /// (up to [`APPLY_READ_SPAN`] bytes per read).
    fn read_back(
        &mut self,
        window: &mut [Put],
        reads: &[(usize, &Batch, Loc)],
    ) -> Result<(), StoreError> {
        let mut buf = Vec::new();
        let mut i = 0;
        while i < reads.len() {
            // The span of records i..j, contiguous in one segment.
            let first = reads[i].2;
            let mut j = i + 1;
            let mut end = first.off + first.len;
            while let Some(&(_, _, next)) = reads.get(j) {
                if next.seg != first.seg
                    || next.off != end
                    || end + next.len - first.off > APPLY_READ_SPAN
                {
                    break;
                }
                end += next.len;
                j += 1;
            }
            let file = journal::segment_name(first.seg);
            buf.resize((end - first.off) as usize, 0);
            let n = self
                .storage
                .read_at(&file, first.off, &mut buf)
                .map_err(|e| describe_io(&*self.storage, &file, "reading", e))?;
            for &(at_window, b, loc) in &reads[i..j] {
                let at = (loc.off - first.off) as usize;
                let rec = buf
                    .get(at..at + loc.len as usize)
                    .filter(|_| at + loc.len as usize <= n)
                    .ok_or("record cut short".to_string())
                    .and_then(journal::decode);
                let put = &mut window[at_window];
                match rec {
                    Ok(journal::Decoded {
                        body: Body::Data { id, offset, length, zero: false, bytes },
                        ..
                    }) if id == b.header.id && offset == put.offset && length == put.length => {
                        put.data = Some(Bytes::from(bytes));
                    }
                    Ok(_) => {
                        return Err(self.corrupt(
                            &file,
                            format!(
                                "record at {} is not the data record of batch {} it should be",
                                loc.off, b.header.id
                            ),
                        ))
                    }
                    Err(e) => {
                        return Err(self.corrupt(&file, format!("record at {}: {e}", loc.off)))
                    }
                }
            }
            i = j;
        }
        Ok(())
    }

    /// Writes one window of records (in chain order) into the image: in offset order,
    /// skipping records that a later record of the window covers entirely, adjacent runs of
    /// data in one vectored write and adjacent zero ranges in one punch. Records that overlap
    /// partially keep their chain order among themselves, so the result is the chain order's.
    fn write_window(&mut self, w: &[Put]) -> Result<(), StoreError> {
        write_puts(&*self.storage, w).map_err(|e| self.fail("applying to", IMAGE_FILE, e))
    }

    /// blake3 hashes of `count` chunks of `granularity` bytes of the image from `offset`
    /// (holes read as zeros; a chunk past the end of the volume is not hashed, one that runs
    /// past it is hashed up to the end).
    pub fn hashes(
        &self,
        offset: u64,
        granularity: u32,
        count: u32,
    ) -> Result<Vec<[u8; 32]>, StoreError> {
        let size = self.meta.geometry.size();
        if granularity == 0 || offset >= size {
            let bs = self.meta.geometry.block_size();
            return Err(StoreError::OutOfRange {
                offset,
                length: u64::from(granularity),
                size,
                block_size: bs,
            });
        }
        let mut out = Vec::new();
        let mut buf = vec![0u8; granularity as usize];
        for i in 0..u64::from(count) {
            let off = offset + i * u64::from(granularity);
            if off >= size {
                break;
            }
            let len = (size - off).min(u64::from(granularity)) as usize;
            self.read(off, &mut buf[..len])?;
            out.push(*blake3::hash(&buf[..len]).as_bytes());
        }
        Ok(out)
    }

    /// Reads the image at `offset` (holes read as zeros).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let size = self.meta.geometry.size();
        if offset.checked_add(buf.len() as u64).is_none_or(|e| e > size) {
            let bs = self.meta.geometry.block_size();
            return Err(StoreError::OutOfRange {
                offset,
                length: buf.len() as u64,
                size,
                block_size: bs,
            });
        }
        let n = self
            .storage
            .read_at(IMAGE_FILE, offset, buf)
            .map_err(|e| describe_io(&*self.storage, IMAGE_FILE, "reading", e))?;
        buf[n..].fill(0);
        Ok(())
    }
}

/// Writes a window of apply into the image: in offset order, skipping records wholly
/// overwritten later in the window, adjacent ones together.
fn write_puts(storage: &dyn Storage, w: &[Put]) -> std::io::Result<()> {
    // Chain positions sorted by offset (ties in chain order).
    let mut idx: Vec<usize> = (0..w.len()).collect();
    idx.sort_by_key(|&i| (w[i].offset, i));
    let mut order: Vec<usize> = Vec::with_capacity(w.len());
    let mut k = 0;
    while k < idx.len() {
        // A cluster: records that overlap, directly or through others.
        let mut end = w[idx[k]].end();
        let mut j = k + 1;
        while j < idx.len() && w[idx[j]].offset < end {
            end = end.max(w[idx[j]].end());
            j += 1;
        }
        let cluster = &mut idx[k..j];
        if cluster.len() == 1 {
            order.push(cluster[0]);
        } else {
            cluster.sort_unstable();
            // Quadratic: the cover test only for small clusters (an overwrite or a few);
            // a larger one is written whole, in chain order.
            let small = cluster.len() <= 64;
            for (p, &i) in cluster.iter().enumerate() {
                let covered = small
                    && cluster[p + 1..]
                        .iter()
                        .any(|&l| w[l].offset <= w[i].offset && w[l].end() >= w[i].end());
                if !covered {
                    order.push(i);
                }
            }
        }
        k = j;
    }
    let mut parts: Vec<&[u8]> = Vec::new();
    let mut i = 0;
    while i < order.len() {
        let first = &w[order[i]];
        let mut end = first.end();
        let mut j = i + 1;
        while let Some(next) = order.get(j).map(|&n| &w[n]) {
            let same_kind = next.data.is_some() == first.data.is_some();
            if next.offset != end || !same_kind || j - i >= APPLY_IOV {
                break;
            }
            end = next.end();
            j += 1;
        }
        let r = if first.data.is_some() {
            parts.clear();
            parts.extend(order[i..j].iter().filter_map(|&n| w[n].data.as_deref()));
            if let [one] = parts[..] {
                storage.write_at(IMAGE_FILE, first.offset, one)
            } else {
                storage.write_vectored_at(IMAGE_FILE, first.offset, &parts)
            }
        } else {
            storage.zero(IMAGE_FILE, first.offset, end - first.offset)
        };
        r?;
        i = j;
    }
    Ok(())
}
