//! The store's journal writing, error handling and crash recovery.

use std::collections::{BTreeMap, HashMap};
use std::io;

use blockferry_protocol::repl::{BatchHeader, BatchKind, End, Epoch, ReplicaState};

use super::journal::{self, Body, Header};
use super::meta::{Meta, META_FILE};
use super::storage::{is_no_space, Storage, JOURNAL_DIR};
use super::{
    describe_io, Batch, Held, Key, Loc, Rec, ReplicaStore, Segment, StoreError, IMAGE_FILE,
    MAX_SPARES,
};

/// Reads and checks `meta`; `None` if the replica does not exist yet.
pub(super) fn read_meta(st: &dyn Storage) -> Result<Option<Meta>, StoreError> {
    let Some(len) = st.len(META_FILE).map_err(|e| describe_io(st, META_FILE, "reading", e))? else {
        return Ok(None);
    };
    let mut b = vec![0u8; len as usize];
    let n =
        st.read_at(META_FILE, 0, &mut b).map_err(|e| describe_io(st, META_FILE, "reading", e))?;
    b.truncate(n);
    Meta::decode(&b)
        .map(Some)
        .map_err(|what| StoreError::Corrupt { what, path: st.describe(META_FILE) })
}

/// A batch as the journal scan finds it.
struct Found {
    header: BatchHeader,
    direct: bool,
    frames: u32,
    chain: u32,
    recs: Vec<Rec>,
    end: Option<End>,
    /// The end record disagrees with the records found.
    broken: bool,
    /// A sync batch the target sealed (its session's chain ends with it).
    sealed: bool,
    bytes: u64,
}

impl ReplicaStore {
    pub(super) fn check(&self) -> Result<(), StoreError> {
        match &self.poisoned {
            Some(cause) => {
                Err(StoreError::Poisoned { path: self.storage.describe(""), cause: cause.clone() })
            }
            None => Ok(()),
        }
    }

    fn poison(&mut self, cause: String) {
        tracing::error!(volume = %self.meta.volume, "replica store poisoned: {cause}");
        self.status.last_error = Some(cause.clone());
        self.poisoned.get_or_insert(cause);
    }

    /// A failed write: ENOSPC is `NoSpace` (the store goes on), anything else poisons it.
    pub(super) fn fail(&mut self, what: &'static str, file: &str, e: io::Error) -> StoreError {
        let path = self.storage.describe(file);
        if is_no_space(&e) {
            self.status.last_error = Some(format!("no space while {what} {}", path.display()));
            // The spare segment files give their space back, and no more are kept until the
            // store is opened again.
            self.keep_spares = false;
            for seq in std::mem::take(&mut self.spares) {
                let _ = self.storage.remove(&journal::spare_name(seq));
            }
            return StoreError::NoSpace { what, path };
        }
        self.poison(format!("{what} {}: {e}", path.display()));
        StoreError::Io { what, path, source: e }
    }

    /// A failed sync always poisons (sled's rule: the page cache may have dropped the data).
    pub(super) fn fail_sync(&mut self, file: &str, e: io::Error) -> StoreError {
        let path = self.storage.describe(file);
        self.poison(format!("syncing {}: {e}", path.display()));
        StoreError::Io { what: "syncing", path, source: e }
    }

    pub(super) fn corrupt(&mut self, file: &str, what: String) -> StoreError {
        let path = self.storage.describe(file);
        self.poison(format!("{}: {what}", path.display()));
        StoreError::Corrupt { what, path }
    }

    pub(super) fn sync_image(&mut self) -> Result<(), StoreError> {
        if self.image_dirty {
            self.storage.sync(IMAGE_FILE).map_err(|e| self.fail_sync(IMAGE_FILE, e))?;
            self.image_dirty = false;
            // Clean now: drop its pages. Besides the memory, this keeps the next random block
            // writes cheap: the kernel caches a file written in large runs (initial sync,
            // merged frames) in large folios, and every later 4 KiB write into such a folio
            // walks all its buffers (ext4), which costs more than the write itself.
            if let Err(e) = self.storage.drop_cache(IMAGE_FILE) {
                tracing::debug!("dropping the image's cached pages: {e}");
            }
        }
        Ok(())
    }

    pub(super) fn sync_journal(&mut self) -> Result<(), StoreError> {
        let name = journal::segment_name(self.seg);
        self.storage.sync(&name).map_err(|e| self.fail_sync(&name, e))?;
        self.journal_dirty = false;
        Ok(())
    }

    /// Replaces `meta` with the in-memory one (temp -> fsync -> rename -> fsync(dir)).
    pub(super) fn write_meta(&mut self) -> Result<(), StoreError> {
        let b = self.meta.encode();
        self.storage
            .create_atomic(META_FILE, &b)
            .map_err(|e| self.fail("writing", META_FILE, e))?;
        self.meta_dirty = false;
        Ok(())
    }

    /// Appends a record to the active segment (no sync), in a new segment if it does not fit.
    /// On ENOSPC the segment is cut back to the end of its last good record and `NoSpace`
    /// returned.
    pub(super) fn append(
        &mut self,
        session: u64,
        body: &Body,
        keys: &[Key],
    ) -> Result<Loc, StoreError> {
        let mut rec = journal::encode(session, journal::tag(self.seg), body);
        if self.make_room(rec.len() as u64)? {
            rec = journal::encode(session, journal::tag(self.seg), body);
        }
        self.append_parts(&[&rec], keys)
    }

    /// Starts a new segment if `len` more bytes do not fit in the active one (one record
    /// longer than a segment goes into an empty one); returns whether it did. Records are
    /// encoded with the tag of their segment after this.
    pub(super) fn make_room(&mut self, len: u64) -> Result<bool, StoreError> {
        let cur = self.segments.get(&self.seg).map_or(0, |s| s.len);
        if cur > 0 && cur + len > self.opts.segment_size {
            self.roll()?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Writes records given in parts (one vectored write) at the end of the active segment,
    /// followed by the zero header that marks the segment's end (overwritten by the next
    /// append). The caller has made room ([`ReplicaStore::make_room`]).
    pub(super) fn append_parts(
        &mut self,
        parts: &[&[u8]],
        keys: &[Key],
    ) -> Result<Loc, StoreError> {
        let rec_len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let name = journal::segment_name(self.seg);
        let off = self.segments.get(&self.seg).map_or(0, |s| s.len);
        let mut all = Vec::with_capacity(parts.len() + 1);
        all.extend_from_slice(parts);
        all.push(&journal::END[..]);
        let r = self.storage.write_vectored_at(&name, off, &all);
        if let Err(e) = r {
            let err = self.fail("appending to", &name, e);
            if err.is_no_space() {
                // Whatever part of the record reached the file is cut off, so the next record
                // follows the last good one (recovery would stop at the torn bytes).
                if let Err(e) = self.storage.set_len(&name, off) {
                    return Err(self.fail("truncating", &name, e));
                }
            }
            return Err(err);
        }
        self.journal_dirty = true;
        let seg = self.segments.entry(self.seg).or_default();
        seg.len = off + rec_len;
        seg.keys.extend(keys.iter().copied());
        Ok(Loc { seg: self.seg, off, len: rec_len })
    }

    /// Starts a new segment. 1. the active one is synced (so a commit's single sync of the
    /// active segment covers every record before it); 2. the new one is created durably.
    fn roll(&mut self) -> Result<(), StoreError> {
        self.sync_journal()?;
        self.new_segment(self.seg + 1)
    }

    /// Starts segment `seq`: a spare file renamed (its blocks are allocated, so appends and
    /// syncs do not change the file's size or allocation), else a new empty file.
    fn new_segment(&mut self, seq: u64) -> Result<(), StoreError> {
        let name = journal::segment_name(seq);
        let mut made = false;
        while let Some(old) = self.spares.pop() {
            let spare = journal::spare_name(old);
            match self.storage.rename(&spare, &name) {
                Ok(()) => {
                    made = true;
                    self.recycled += 1;
                    break;
                }
                Err(e) => {
                    let path = self.storage.describe(&spare);
                    tracing::warn!(volume = %self.meta.volume, "cannot reuse {}: {e}", path.display());
                    let _ = self.storage.remove(&spare);
                }
            }
        }
        if !made {
            self.storage.create(&name).map_err(|e| self.fail("creating", &name, e))?;
        }
        self.seg = seq;
        self.segments.insert(seq, Segment::default());
        Ok(())
    }

    /// Deletes segments (not the active one) none of whose batches is pending or unapplied.
    pub(super) fn reclaim(&mut self) {
        let live: Vec<Key> = self.pending.values().chain(&self.to_apply).map(Batch::key).collect();
        // An active segment that holds only applied or dead records is retired too: a new
        // empty one takes its place. Otherwise the dead records of dropped batches (say, after
        // a full disk) would stay forever, and a journal that never shrinks can fill the disk
        // for good.
        let active_dead = self
            .segments
            .get(&self.seg)
            .is_some_and(|s| s.len > 0 && !s.keys.iter().any(|k| live.contains(k)));
        if active_dead {
            if let Err(e) = self.roll() {
                tracing::warn!(volume = %self.meta.volume, "cannot start a new journal segment: {e}");
            }
        }
        let dead: Vec<u64> = self
            .segments
            .iter()
            .filter(|(&seq, s)| seq != self.seg && !s.keys.iter().any(|k| live.contains(k)))
            .map(|(&seq, _)| seq)
            .collect();
        for seq in dead {
            let name = journal::segment_name(seq);
            let legacy = self.segments.get(&seq).is_some_and(|s| s.legacy);
            let keep = self.keep_spares && self.spares.len() < MAX_SPARES && !legacy;
            if keep && self.make_spare(seq) {
                self.segments.remove(&seq);
                continue;
            }
            match self.storage.remove(&name) {
                Ok(()) => {
                    self.segments.remove(&seq);
                }
                Err(e) => {
                    // Not fatal: the segment is only kept longer.
                    tracing::warn!(volume = %self.meta.volume, "cannot delete {}: {e}", self.storage.describe(&name).display());
                    break;
                }
            }
        }
    }

    /// Keeps dead segment `seq` as a spare: 1. a zero header at its start, synced, so that
    /// whatever segment it becomes reads as empty until its first append; 2. renamed to
    /// `SEQ.spare`, which recovery does not read. False (and nothing lost) if a step fails:
    /// the caller removes it instead.
    fn make_spare(&mut self, seq: u64) -> bool {
        let (name, spare) = (journal::segment_name(seq), journal::spare_name(seq));
        let r = self
            .storage
            .write_at(&name, 0, &journal::END)
            .and_then(|()| self.storage.sync(&name))
            .and_then(|()| self.storage.rename(&name, &spare));
        match r {
            Ok(()) => {
                self.spares.push(seq);
                true
            }
            Err(e) => {
                tracing::debug!(volume = %self.meta.volume, "cannot keep segment {seq} as a spare: {e}");
                false
            }
        }
    }

    /// Crash recovery (from `open`): see `ReplicaStore::open`.
    pub(super) fn recover(&mut self) -> Result<(), StoreError> {
        let st = self.storage.clone();
        let io = |what: &'static str, file: &str| {
            let st = st.clone();
            let file = file.to_string();
            move |e| describe_io(&*st, &file, what, e)
        };
        match st.len(IMAGE_FILE).map_err(io("reading", IMAGE_FILE))? {
            None => {
                return Err(StoreError::Corrupt {
                    what: "the image file is missing".into(),
                    path: st.describe(IMAGE_FILE),
                })
            }
            Some(l) if l != self.meta.geometry.size() => {
                tracing::warn!(volume = %self.meta.volume, "image is {l} bytes, the volume {}: resizing", self.meta.geometry.size());
                st.set_len(IMAGE_FILE, self.meta.geometry.size())
                    .map_err(io("sizing", IMAGE_FILE))?;
            }
            Some(_) => {}
        }
        // Whatever survived the crash is made durable before it is trusted (a process crash
        // leaves writes in the page cache that a later power cut could still lose).
        st.sync(IMAGE_FILE).map_err(io("syncing", IMAGE_FILE))?;
        let names = st.list(JOURNAL_DIR).map_err(io("listing", JOURNAL_DIR))?;
        let mut segs: Vec<u64> = names.iter().filter_map(|n| journal::parse_segment(n)).collect();
        segs.sort_unstable();
        for seq in names.iter().filter_map(|n| journal::parse_spare(n)) {
            if self.spares.len() < MAX_SPARES {
                self.spares.push(seq);
            } else {
                let name = journal::spare_name(seq);
                st.remove(&name).map_err(io("removing", &name))?;
            }
        }

        let mut found: HashMap<Key, Found> = HashMap::new();
        let mut commits: Vec<(u64, Epoch, Epoch, Vec<Epoch>)> = Vec::new();
        let mut stopped = false;
        for &seq in &segs {
            let name = journal::segment_name(seq);
            if stopped {
                // Everything after the first invalid record is dropped.
                st.remove(&name).map_err(io("removing", &name))?;
                continue;
            }
            st.sync(&name).map_err(io("syncing", &name))?;
            let len = st.len(&name).map_err(io("reading", &name))?.unwrap_or(0);
            let mut seg = Segment::default();
            let mut off = 0u64;
            let mut hdr = [0u8; journal::HEADER];
            let stop = loop {
                let n = st.read_at(&name, off, &mut hdr).map_err(io("reading", &name))?;
                let body_len = match journal::read_header(&hdr[..n], len - off) {
                    Header::Eof => break None,
                    Header::Invalid(why) => break Some(why),
                    Header::Record { body_len } => body_len,
                };
                let mut rec = vec![0u8; journal::HEADER + body_len];
                let n = st.read_at(&name, off, &mut rec).map_err(io("reading", &name))?;
                let d = match journal::decode(&rec[..n]) {
                    Ok(d) => d,
                    Err(why) => break Some(why),
                };
                if d.tag == 0 {
                    seg.legacy = true;
                } else if d.tag != journal::tag(seq) {
                    // A record of the file's earlier use as another segment, where a torn
                    // append left it (the zero header after each append ends a segment
                    // otherwise).
                    break Some(format!(
                        "record tagged {:#x}, not this segment's {:#x}",
                        d.tag,
                        journal::tag(seq)
                    ));
                }
                if d.session > self.meta.session {
                    break Some(format!(
                        "record of session {}, newer than the metadata's {}",
                        d.session, self.meta.session
                    ));
                }
                let loc = Loc { seg: seq, off, len: d.len };
                let s = d.session;
                match d.body {
                    Body::Begin { kind, id, base, direct } => {
                        let header = BatchHeader { kind, id, base };
                        let f = Found {
                            header,
                            direct,
                            frames: 0,
                            chain: 0,
                            recs: Vec::new(),
                            end: None,
                            broken: false,
                            sealed: false,
                            bytes: 0,
                        };
                        found.insert((s, id), f);
                        seg.keys.insert((s, id));
                    }
                    Body::Data { id, offset, length, zero, .. } => {
                        // A data record without its begin belongs to a batch whose older
                        // segments were reclaimed (applied or dead): ignored.
                        if let Some(f) =
                            found.get_mut(&(s, id)).filter(|f| f.end.is_none() && !f.direct)
                        {
                            f.frames += 1;
                            f.chain = journal::chain(f.chain, d.crc);
                            // Apply reads the bytes back from the journal (not kept in memory).
                            let data = if zero { Held::Zero } else { Held::Journal };
                            f.recs.push(Rec { loc, offset, length, data });
                            f.bytes += u64::from(length);
                        }
                        seg.keys.insert((s, id));
                    }
                    Body::End { id, through, frames, chain } => {
                        if let Some(f) = found.get_mut(&(s, id)).filter(|f| f.end.is_none()) {
                            // A direct batch's data went to the image: only its end is journaled.
                            f.broken = !f.direct && (frames != f.frames || chain != f.chain);
                            f.sealed =
                                through == journal::SEALED && f.header.kind == BatchKind::Sync;
                            let through = if f.sealed { id } else { through };
                            f.end = Some(End { through, frames, batch_crc: chain });
                        }
                        seg.keys.insert((s, id));
                    }
                    Body::Commit { base, through, ids } => {
                        seg.keys.extend(ids.iter().map(|&id| (s, id)));
                        commits.push((s, base, through, ids));
                    }
                }
                off += d.len;
            };
            if let Some(why) = stop {
                let msg = format!("{}: invalid record at offset {off} ({why}); recovery stops there and drops the {} bytes after it", st.describe(&name).display(), len - off);
                if len - off >= journal::HEADER as u64 || segs.last() != Some(&seq) {
                    tracing::error!(volume = %self.meta.volume, "{msg}");
                } else {
                    tracing::info!(volume = %self.meta.volume, "{msg}");
                }
                self.status.last_error = Some(msg);
                st.set_len(&name, off).map_err(io("truncating", &name))?;
                st.sync(&name).map_err(io("syncing", &name))?;
                stopped = true;
            }
            seg.len = off;
            self.segments.insert(seq, seg);
        }

        // The committed chain: commit records after `applied`, each starting where the one
        // before ended, and naming only complete batches.
        let mut cur = self.meta.applied;
        // The newest committed batch was sealed in the dead session: nothing of that session
        // follows it.
        let mut chain_sealed = false;
        for (s, base, through, ids) in commits {
            if through <= cur {
                continue;
            }
            let mut at = base;
            let mut batches = Vec::new();
            let ok = base == cur
                && ids.last() == Some(&through)
                && ids.iter().all(|id| match found.remove(&(s, *id)) {
                    Some(f) if f.end.is_some() && !f.broken && f.header.base == at => {
                        at = f.header.id;
                        chain_sealed = f.sealed && s == self.meta.session;
                        batches.push(Batch {
                            header: f.header,
                            session: s,
                            direct: f.direct,
                            frames: f.frames,
                            chain: f.chain,
                            recs: f.recs,
                            end: f.end,
                            bytes: f.bytes,
                            durable: 0,
                            cut: false,
                        });
                        true
                    }
                    _ => false,
                });
            if !ok {
                let msg = format!("journal commit record {base}..={through} does not continue the committed chain at {cur} with complete batches; recovery stops at boundary {cur}");
                tracing::error!(volume = %self.meta.volume, "{msg}");
                self.status.last_error = Some(msg);
                break;
            }
            self.to_apply.extend(batches);
            cur = through;
        }
        if cur < self.meta.committed {
            let msg = format!("the metadata says committed {}, the journal holds commits only through {cur}: journal records were lost", self.meta.committed);
            tracing::error!(volume = %self.meta.volume, "{msg}");
            self.status.last_error = Some(msg);
        }
        self.meta.committed = cur;
        if cur > Epoch::ZERO {
            self.meta.state = ReplicaState::Consistent;
        }
        let next = self.segments.keys().next_back().map_or(1, |s| s + 1);
        self.new_segment(next)?;
        // The dead session's sync batches are sealed (their frames may have been reported
        // durable, which also promised every batch before them): its batches that continue
        // the committed chain, up to the last sync batch among them, become pending again with
        // the records found (the scan cut a torn last record), and `seal` ends the open sync
        // batches and commits what it can, still under the dead session's number (commit
        // records name their batches by session). Without a sync batch the uncommitted tail is
        // dropped, as before. A batch the target sealed ends its session's chain: nothing after
        // it is taken (the seal forgot those batches; they may sit on a prefix cut short).
        // Batches of older sessions were forgotten (sealed first) when the session after them
        // began.
        let live = self.meta.session;
        let mut at = cur;
        let mut walk = Vec::new();
        let mut stop = chain_sealed;
        while let Some(key) = found
            .iter()
            .filter(|_| !stop)
            .find(|(k, f)| {
                k.0 == live
                    && f.header.base == at
                    && !f.broken
                    && (f.end.is_some() || f.header.kind == BatchKind::Sync)
            })
            .map(|(k, _)| *k)
        {
            let Some(f) = found.remove(&key) else { break };
            at = f.header.id;
            stop = f.sealed;
            walk.push((
                f.header.id,
                Batch {
                    header: f.header,
                    session: live,
                    direct: f.direct,
                    frames: f.frames,
                    chain: f.chain,
                    recs: f.recs,
                    end: f.end,
                    bytes: f.bytes,
                    durable: f.frames,
                    cut: true,
                },
            ));
        }
        let last_sync = walk.iter().rposition(|(_, b)| b.header.kind == BatchKind::Sync);
        walk.truncate(last_sync.map_or(0, |i| i + 1));
        self.pending.extend(walk);
        if !self.pending.is_empty() {
            self.recovery_sealed = self.seal()?;
            self.pending.clear();
            if self.meta.committed > cur {
                tracing::info!(volume = %self.meta.volume, from = %cur, through = %self.meta.committed,
                    sealed = ?self.recovery_sealed, "recovery committed the dead session's complete and sealed batches");
            }
        }
        // A new session: records of the dead one never mix with new ones.
        self.meta.session += 1;
        let redo: usize = self.to_apply.iter().map(|b| b.recs.len()).sum();
        if redo > 0 {
            tracing::info!(volume = %self.meta.volume, batches = self.to_apply.len(), records = redo, "redo: applying committed batches");
        }
        // Redo and the durable meta with the new session.
        self.meta_dirty = true;
        self.apply()?;
        let _: &BTreeMap<u64, Segment> = &self.segments;
        Ok(())
    }
}
