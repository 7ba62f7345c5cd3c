//! Store tests: a model of the chain (property test), power cuts at every storage step with
//! the simulated disk, ENOSPC, a corrupted journal record, and the initial sync.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use blockferry_protocol::repl::{
    BatchHeader, BatchKind, End, Epoch, Generation, Geometry, ReplicaState, VolumeId,
};
use proptest::prelude::*;

use super::sim::{SimRng, SimStorage};
use super::*;

const BS: u64 = 4096;
const BLOCKS: u64 = 32;
const VOL: VolumeId = VolumeId([7; 16]);

fn geometry() -> Geometry {
    Geometry::new(BS * BLOCKS, BS as u32).expect("geometry")
}

fn generation() -> Generation {
    Generation::new(42).expect("generation")
}

fn open_sim(st: &Arc<SimStorage>, segment_size: u64) -> Result<ReplicaStore, StoreError> {
    let storage: Arc<dyn Storage> = st.clone();
    ReplicaStore::open_with(
        storage,
        VOL,
        "vol",
        geometry(),
        generation(),
        Options { segment_size, slice_window: BS, max_held: 8 * BS },
    )
}

fn image(s: &ReplicaStore) -> Vec<u8> {
    let mut v = vec![0u8; (BS * BLOCKS) as usize];
    s.read(0, &mut v).expect("read image");
    v
}

type Write = (u64, u32, Option<Vec<u8>>);

#[derive(Clone, Debug)]
struct MBatch {
    kind: BatchKind,
    base: Epoch,
    through: Epoch,
    writes: Vec<Write>,
    direct: bool,
    ended: bool,
}

fn put(img: &mut [u8], (off, len, data): &Write) {
    let r = *off as usize..(*off + u64::from(*len)) as usize;
    match data {
        Some(d) => img[r].copy_from_slice(d),
        None => img[r].fill(0),
    }
}

/// The agent and the expected replica. `img` is the replica image the model expects at the
/// committed boundary (direct writes land in it at once, as they do in the store).
struct Driver {
    rng: SimRng,
    head: Epoch,
    committed: Epoch,
    consistent: bool,
    pending: BTreeMap<Epoch, MBatch>,
    /// Committed, not applied.
    unapplied: Vec<MBatch>,
    img: Vec<u8>,
    /// The expected image at every boundary committed (or about to be).
    boundaries: HashMap<Epoch, Vec<u8>>,
    /// The newest commit the store acknowledged.
    acked: Epoch,
    allow_reset_mid_batch: bool,
    /// An apply started with `apply_start` whose job has not run yet, and the
    /// boundary it applies.
    running: Option<(ApplyJob, Epoch)>,
    /// Split applies finished, and slices that left more to write.
    split_done: usize,
    /// Split applies whose job wrote the batches (all held in memory).
    job_wrote: usize,
    slices: usize,
}

impl Driver {
    fn new(seed: u64) -> Driver {
        let img = vec![0u8; (BS * BLOCKS) as usize];
        let mut boundaries = HashMap::new();
        boundaries.insert(Epoch::ZERO, img.clone());
        Driver {
            rng: SimRng(seed),
            head: Epoch::ZERO,
            committed: Epoch::ZERO,
            consistent: false,
            pending: BTreeMap::new(),
            unapplied: Vec::new(),
            img,
            boundaries,
            acked: Epoch::ZERO,
            allow_reset_mid_batch: true,
            running: None,
            split_done: 0,
            job_wrote: 0,
            slices: 0,
        }
    }

    /// What `commit` should return, and the image at that boundary.
    fn predict(&self) -> Option<(Epoch, Vec<Epoch>)> {
        let (mut cur, mut ids, mut barrier, mut best) = (self.committed, Vec::new(), None, 0);
        while let Some((&id, b)) = self.pending.iter().find(|(_, b)| b.base == cur) {
            if !b.ended {
                break;
            }
            if b.kind != BatchKind::Epoch {
                barrier = Some(b.through);
            }
            cur = id;
            ids.push(id);
            if barrier.is_none_or(|t| t <= cur) {
                best = ids.len();
            }
        }
        ids.truncate(best);
        ids.last().map(|&e| (e, ids.clone()))
    }

    fn gen_writes(&mut self) -> Vec<Write> {
        let n = 1 + self.rng.below(5);
        (0..n)
            .map(|_| {
                let blocks = 1 + self.rng.below(3);
                let start = self.rng.below(BLOCKS - blocks + 1);
                let len = (blocks * BS) as u32;
                let data = (self.rng.below(4) != 0).then(|| {
                    let seed = self.rng.next_u64();
                    (0..len).map(|i| (seed >> (i % 8 * 8)) as u8 ^ (i / 512) as u8).collect()
                });
                (start * BS, len, data)
            })
            .collect()
    }

    /// One random step against `s`. Errors end the run (power cuts).
    fn step(&mut self, s: &mut ReplicaStore) -> Result<(), StoreError> {
        match self.rng.below(20) {
            0..=11 => self.batch(s),
            12..=15 => self.commit(s),
            16 => self.apply(s),
            17 => self.apply_split(s),
            _ => {
                if self.rng.below(3) == 0 {
                    s.reset_session()?;
                    self.pending.clear();
                    self.head = self.committed;
                }
                Ok(())
            }
        }
    }

    fn batch(&mut self, s: &mut ReplicaStore) -> Result<(), StoreError> {
        let kind = match self.rng.below(10) {
            0..=5 => BatchKind::Epoch,
            6..=7 => BatchKind::Resync,
            _ => BatchKind::Initial,
        };
        let id = Epoch(self.head.0 + 1 + self.rng.below(3));
        let base = self.head;
        let through = match kind {
            BatchKind::Epoch => id,
            _ if self.rng.below(5) == 0 => Epoch(u64::MAX),
            _ => Epoch(id.0 + self.rng.below(4)),
        };
        let direct = kind == BatchKind::Initial
            && !self.consistent
            && self.pending.values().all(|b| b.direct && b.ended)
            && (base == self.committed || self.pending.contains_key(&base));
        let writes = self.gen_writes();
        s.begin_batch(BatchHeader { kind, id, base })?;
        let cut = (self.rng.below(10) == 0).then(|| self.rng.below(writes.len() as u64) as usize);
        for (i, w) in writes.iter().enumerate() {
            if cut == Some(i) {
                if self.allow_reset_mid_batch && self.rng.below(2) == 0 {
                    s.reset_session()?;
                    self.pending.clear();
                    self.head = self.committed;
                } else {
                    s.abort_batch(id);
                }
                return Ok(());
            }
            s.data(id, w.0, w.1, w.2.clone().map(Bytes::from))?;
            if direct {
                put(&mut self.img, w);
            }
        }
        let frames = writes.len() as u32;
        s.end_batch(id, End { through, frames, batch_crc: 0 })?;
        self.pending.insert(id, MBatch { kind, base, through, writes, direct, ended: true });
        self.head = id;
        Ok(())
    }

    fn commit(&mut self, s: &mut ReplicaStore) -> Result<(), StoreError> {
        if self.commit_only(s)? && self.rng.below(2) == 0 {
            self.apply(s)?;
        }
        Ok(())
    }

    /// Commits what the model predicts; true if something was committed.
    fn commit_only(&mut self, s: &mut ReplicaStore) -> Result<bool, StoreError> {
        let predicted = self.predict();
        let mut next_img = self.img.clone();
        if let Some((e, ids)) = &predicted {
            for id in ids {
                let b = &self.pending[id];
                if !b.direct {
                    b.writes.iter().for_each(|w| put(&mut next_img, w));
                }
            }
            // Recorded before the call: a power cut inside it may or may not keep it.
            self.boundaries.insert(*e, next_img.clone());
        }
        let got = s.commit()?;
        assert_eq!(got, predicted.as_ref().map(|p| p.0), "commit() disagrees with the model");
        if let Some((e, ids)) = predicted {
            for id in ids {
                let b = self.pending.remove(&id).expect("pending");
                self.unapplied.push(b);
            }
            self.committed = e;
            self.acked = e;
            self.consistent = true;
            self.img = next_img;
            return Ok(true);
        }
        Ok(false)
    }

    /// The server's way: `apply_start` now, the job and `apply_done` at a later step
    /// (batches and commits may come in between).
    fn apply_split(&mut self, s: &mut ReplicaStore) -> Result<(), StoreError> {
        match self.running.take() {
            None => {
                // Slices of one window (one block: the store's options), or all at once.
                let until = if self.rng.below(2) == 0 {
                    std::time::Instant::now()
                } else {
                    std::time::Instant::now() + std::time::Duration::from_secs(60)
                };
                let through = self.committed;
                loop {
                    match s.apply_start(until)? {
                        ApplyStep::More => {
                            self.slices += 1;
                            // Batches and commits may come between slices.
                            if self.rng.below(3) == 0 {
                                self.batch(s)?;
                            }
                            if self.rng.below(4) == 0 {
                                self.commit_only(s)?;
                            }
                        }
                        ApplyStep::Job(job) => {
                            if job.writes() {
                                self.job_wrote += 1;
                            }
                            self.running = Some((job, through));
                            break;
                        }
                        ApplyStep::Idle => {
                            if through == self.committed {
                                self.check_applied(s);
                            }
                            break;
                        }
                    }
                }
            }
            Some((job, through)) => {
                s.apply_done(job.run())?;
                assert_eq!(s.meta().applied, through);
                self.split_done += 1;
                assert!(
                    image(s) == self.boundaries[&through],
                    "image differs from the model at boundary {through} (split apply)"
                );
            }
        }
        Ok(())
    }

    fn apply(&mut self, s: &mut ReplicaStore) -> Result<(), StoreError> {
        // A split apply's job is finished first (the server joins it), then the plain one.
        if let Some((job, _)) = self.running.take() {
            s.apply_done(job.run())?;
        }
        s.apply()?;
        self.check_applied(s);
        Ok(())
    }

    fn check_applied(&mut self, s: &ReplicaStore) {
        self.unapplied.clear();
        assert_eq!(s.meta().applied, self.committed);
        if self.consistent {
            assert!(
                image(s) == self.img,
                "image differs from the model at boundary {}",
                self.committed
            );
        }
    }
}

/// Property test 1: random batches (gaps, resync barriers, abandoned resyncs, initial
/// batches, drops and session resets), commit/apply at random points; after every apply the
/// image equals the model at the committed boundary. Also reopens (recovery) now and then.
fn run_model(seed: u64, storage: Arc<SimStorage>, steps: usize) -> (usize, usize, usize, u64) {
    let mut d = Driver::new(seed);
    let mut s = open_sim(&storage, 8 << 10).expect("open");
    let mut recycled = 0;
    for i in 0..steps {
        d.step(&mut s).unwrap_or_else(|e| panic!("seed {seed} step {i}: {e}"));
        if d.rng.below(40) == 0 {
            recycled += s.recycled;
            drop(s);
            s = open_sim(&storage, 8 << 10).expect("reopen");
            d.pending.clear();
            d.unapplied.clear();
            d.running = None;
            d.head = d.committed;
            assert_eq!(s.meta().committed, d.committed);
            assert_eq!(s.meta().applied, d.committed);
            if d.consistent {
                assert!(image(&s) == d.img, "seed {seed}: image after reopen differs");
            }
        }
    }
    assert!(!s.status().poisoned);
    (d.split_done, d.slices, d.job_wrote, recycled + s.recycled)
}

/// The server's split apply, a block per slice (records not held in memory: at most 8 blocks
/// are) or all in the job (all held), with batches and commits between slices and between
/// its start and its end, and reopens: the model's checks hold, and both ways ran.
#[test]
fn split_apply_in_slices_against_model() {
    let (mut split, mut slices, mut jobs, mut recycled) = (0, 0, 0, 0);
    for seed in 0..16u64 {
        let (a, b, c, r) = run_model(seed, Arc::new(SimStorage::new()), 300);
        split += a;
        slices += b;
        jobs += c;
        recycled += r;
    }
    assert!(
        split > 0 && slices > 0 && jobs > 0,
        "split applies {split}, slices with more to write {slices}, jobs that wrote {jobs}"
    );
    // Segment files were reused (the reopens above then read recycled segments).
    assert!(recycled > 0, "no journal segment was started from a spare file");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]
    #[test]
    fn chain_against_model(seed in any::<u64>()) {
        run_model(seed, Arc::new(SimStorage::new()), 300);
    }
}

#[test]
fn chain_against_model_real_files() {
    let (mut split, mut slices) = (0, 0);
    for seed in 0..4u64 {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut d = Driver::new(seed);
        let mut s =
            ReplicaStore::open_dir(dir.path(), VOL, "vol", geometry(), generation()).expect("open");
        for _ in 0..200 {
            d.step(&mut s).expect("step");
        }
        d.commit(&mut s).expect("commit");
        d.apply(&mut s).expect("apply");
        split += d.split_done;
        slices += d.slices;
        drop(s);
        let s = ReplicaStore::open_dir(dir.path(), VOL, "vol", geometry(), generation())
            .expect("reopen");
        assert_eq!(s.meta().committed, d.committed);
        let meta = ReplicaStore::inspect(dir.path()).expect("inspect");
        assert_eq!(meta.committed, d.committed);
        assert!(s.image_path().is_some_and(|p| p.ends_with(IMAGE_FILE)));
    }
    assert!(split > 0, "no split apply (apply_start, then apply_done later) ran");
    assert_eq!(slices, 0, "one slice window here is 1 MiB, more than these batches");
}

/// Test 2: power cuts. Each workload runs once to count its storage steps, then once per
/// step with the power going off there; the unsynced writes are dropped, kept or torn
/// (seeded), the store is reopened, and: committed >= the last acknowledged commit, and the
/// image equals the model at the recovered boundary exactly.
#[test]
fn power_cut_at_every_step() {
    let mut checked = 0usize;
    let mut recovered_past_ack = 0usize;
    let mut double = 0usize;
    let mut recycled = 0u64;
    for seed in 0..6u64 {
        let steps = 120;
        let total = {
            let st = Arc::new(SimStorage::new());
            let mut d = Driver::new(seed);
            d.allow_reset_mid_batch = false;
            let mut s = open_sim(&st, 16 << 10).expect("open");
            for _ in 0..steps {
                d.step(&mut s).expect("step");
            }
            recycled += s.recycled;
            st.steps()
        };
        for cut in 0..total {
            let st = Arc::new(SimStorage::new());
            st.die_after(cut);
            let mut d = Driver::new(seed);
            d.allow_reset_mid_batch = false;
            if let Ok(mut s) = open_sim(&st, 16 << 10) {
                for _ in 0..steps {
                    if d.step(&mut s).is_err() {
                        break;
                    }
                }
            }
            for fate_seed in 0..2u64 {
                let mut after =
                    Arc::new(st.crash_seeded(seed * 1_000_003 + cut as u64 * 7 + fate_seed));
                if fate_seed == 1 {
                    // A second power cut during recovery itself.
                    after.die_after(cut % 7);
                    let _ = open_sim(&after, 16 << 10);
                    after = Arc::new(after.crash_seeded(cut as u64));
                    double += 1;
                }
                let s = match open_sim(&after, 16 << 10) {
                    Ok(s) => s,
                    // Power went off before the replica existed.
                    Err(_)
                        if d.acked == Epoch::ZERO
                            && !after.files().contains(&"meta".to_string()) =>
                    {
                        continue
                    }
                    Err(e) => panic!("seed {seed} cut {cut}: reopen failed: {e}"),
                };
                let c = s.meta().committed;
                assert!(
                    c >= d.acked,
                    "seed {seed} cut {cut}: committed {c} < acknowledged {}",
                    d.acked
                );
                if c > d.acked {
                    recovered_past_ack += 1;
                }
                if c > Epoch::ZERO {
                    assert_eq!(s.meta().state, ReplicaState::Consistent);
                    let want = d.boundaries.get(&c).unwrap_or_else(|| {
                        panic!("seed {seed} cut {cut}: recovered unknown boundary {c}")
                    });
                    assert!(
                        image(&s) == *want,
                        "seed {seed} cut {cut}: image differs from the model at {c}"
                    );
                }
                // The recovered store goes on.
                let mut s = s;
                let next = c.0 + 1000;
                s.reset_session().expect("reset after recovery");
                write_block(&mut s, next, c.0, 0, 0xee, 1).expect("batch after recovery");
                assert_eq!(s.commit().expect("commit after recovery"), Some(Epoch(next)));
                checked += 1;
            }
        }
    }
    println!("power-cut test: {checked} crash points checked ({double} with a second cut during recovery, {recovered_past_ack} recovered a commit in flight)");
    assert!(checked > 1000);
    assert!(recycled > 0, "no journal segment was started from a spare file");
}

fn write_block(
    s: &mut ReplicaStore,
    id: u64,
    base: u64,
    block: u64,
    byte: u8,
    blocks: u64,
) -> Result<(), StoreError> {
    s.begin_batch(BatchHeader { kind: BatchKind::Epoch, id: Epoch(id), base: Epoch(base) })?;
    for i in 0..blocks {
        s.data(Epoch(id), (block + i) * BS, BS as u32, Some(Bytes::from(vec![byte; BS as usize])))?;
    }
    s.end_batch(Epoch(id), End { through: Epoch(id), frames: blocks as u32, batch_crc: 0 })
}

/// Test 3: ENOSPC while appending data and while appending the commit record.
#[test]
fn no_space_drops_the_batch_and_recovers() {
    let st = Arc::new(SimStorage::new());
    let mut s = open_sim(&st, 1 << 20).expect("open");
    write_block(&mut s, 1, 0, 0, 1, 1).expect("batch 1");
    assert_eq!(s.commit().expect("commit"), Some(Epoch(1)));
    s.apply().expect("apply");
    let before = image(&s);

    st.set_quota(Some(st.used() + 3 * BS));
    let err = write_block(&mut s, 2, 1, 4, 2, 8).expect_err("must run out of space");
    assert!(err.is_no_space(), "{err}");
    assert!(!s.status().poisoned);
    assert_eq!(s.status().pending_batches, 0, "the batch was dropped");
    assert_eq!(s.commit().expect("commit"), None);
    s.apply().expect("apply");
    assert!(image(&s) == before, "nothing half-applied");

    // Space freed: the same batch again.
    st.set_quota(None);
    write_block(&mut s, 2, 1, 4, 2, 8).expect("batch 2 again");
    // The commit record does not fit.
    st.set_quota(Some(st.used() + 8));
    assert!(s.commit().expect_err("commit record must not fit").is_no_space());
    assert!(!s.status().poisoned);
    st.set_quota(None);
    assert_eq!(s.commit().expect("commit"), Some(Epoch(2)));
    s.apply().expect("apply");
    let img = image(&s);
    assert!(img[4 * BS as usize..12 * BS as usize].iter().all(|&b| b == 2));
    drop(s);
    let s = open_sim(&st, 1 << 20).expect("reopen");
    assert_eq!(s.meta().committed, Epoch(2));
    assert!(image(&s) == img);
}

/// Reclaimed segments are kept as spare files and renamed into new segments; a reopen reads
/// a reused segment to its end marker (not on into the file's earlier records); running out
/// of space gives the spares' space back.
#[test]
fn segments_are_recycled() {
    let st = Arc::new(SimStorage::new());
    let mut s = open_sim(&st, 16 << 10).expect("open");
    // Each batch is a 4 KiB block plus records: a segment holds three; 40 batches roll many.
    for id in 1..=40u64 {
        write_block(&mut s, id, id - 1, id % 8, id as u8, 1).expect("batch");
        assert_eq!(s.commit().expect("commit"), Some(Epoch(id)));
        s.apply().expect("apply");
    }
    assert!(s.recycled > 10, "only {} segments were started from spares", s.recycled);
    let spares = || st.files().iter().filter(|f| f.ends_with(".spare")).count();
    assert!((1..=MAX_SPARES).contains(&spares()), "spares: {:?}", st.files());
    let img = image(&s);
    drop(s);
    let mut s = open_sim(&st, 16 << 10).expect("reopen");
    assert_eq!(s.meta().committed, Epoch(40));
    assert!(image(&s) == img);
    assert!(s.status().last_error.is_none(), "{:?}", s.status().last_error);
    // After a power cut between appends too.
    write_block(&mut s, 41, 40, 3, 41, 1).expect("batch 41");
    assert_eq!(s.commit().expect("commit"), Some(Epoch(41)));
    write_block(&mut s, 42, 41, 5, 42, 1).expect("batch 42, not committed");
    let after = Arc::new(st.crash_seeded(42));
    let s2 = open_sim(&after, 16 << 10).expect("reopen after the cut");
    assert_eq!(s2.meta().committed, Epoch(41));
    // Out of space: the spares are removed, and no more are kept.
    assert_eq!(s.commit().expect("commit"), Some(Epoch(42)));
    s.apply().expect("apply");
    assert!(spares() > 0);
    st.set_quota(Some(st.used()));
    let big = write_block(&mut s, 43, 42, 0, 43, 8).expect_err("must run out of space");
    assert!(big.is_no_space(), "{big}");
    assert_eq!(spares(), 0, "{:?}", st.files());
    st.set_quota(None);
    for id in 43..=50u64 {
        write_block(&mut s, id, id - 1, id % 8, id as u8, 1).expect("batch");
        assert_eq!(s.commit().expect("commit"), Some(Epoch(id)));
        s.apply().expect("apply");
    }
    assert_eq!(spares(), 0, "{:?}", st.files());
}

/// Test 3b: ENOSPC on real files is reported as NoSpace (the classification is shared).
#[test]
fn enospc_is_no_space() {
    let e = std::io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error());
    assert!(storage::is_no_space(&e));
    assert!(!storage::is_no_space(&std::io::Error::other("x")));
}

/// Test 4: a bit flip in a journal record in the middle: recovery stops there; the boundary
/// before it is readable, with a clear error.
#[test]
fn corrupted_record_stops_recovery() {
    let st = Arc::new(SimStorage::new());
    let mut s = open_sim(&st, 64 << 20).expect("open");
    for id in 1..=3 {
        write_block(&mut s, id, id - 1, id, id as u8, 1).expect("batch");
        assert_eq!(s.commit().expect("commit"), Some(Epoch(id)));
    }
    let at3 = {
        let mut v = vec![0u8; (BS * BLOCKS) as usize];
        for id in 1..=3u64 {
            v[(id * BS) as usize..((id + 1) * BS) as usize].fill(id as u8);
        }
        v
    };
    let corrupt_at = s.status().journal_bytes + 40;
    for id in 4..=5 {
        write_block(&mut s, id, id - 1, id, id as u8, 1).expect("batch");
        assert_eq!(s.commit().expect("commit"), Some(Epoch(id)));
    }
    drop(s); // nothing applied: redo must come from the journal
    let seg = st.files().into_iter().rfind(|f| f.starts_with("journal/")).expect("segment");
    st.corrupt(&seg, corrupt_at);
    let s = open_sim(&st, 64 << 20).expect("reopen");
    assert_eq!(s.meta().committed, Epoch(3));
    assert!(image(&s) == at3);
    let err = s.status().last_error.expect("an error is reported");
    assert!(err.contains("invalid record"), "{err}");
    println!("recovery reported: {err}");
}

/// Test 5: the initial sync writes straight into the image; a crash before its commit
/// leaves the replica Seeded (data there, no boundary).
#[test]
fn initial_sync_then_crash_is_seeded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let open = || ReplicaStore::open_dir(dir.path(), VOL, "vol", geometry(), generation());
    let mut s = open().expect("open");
    assert_eq!(s.meta().state, ReplicaState::Empty);
    s.begin_batch(BatchHeader { kind: BatchKind::Initial, id: Epoch(1), base: Epoch::ZERO })
        .expect("begin");
    assert_eq!(ReplicaStore::inspect(dir.path()).expect("inspect").state, ReplicaState::Seeded);
    s.data(Epoch(1), 0, BS as u32, Some(Bytes::from(vec![9u8; BS as usize]))).expect("data");
    s.data(Epoch(1), BS, BS as u32, None).expect("zero");
    s.end_batch(Epoch(1), End { through: Epoch(3), frames: 2, batch_crc: 0 }).expect("end");
    assert_eq!(s.status().staged_bytes, 0, "initial data is not journaled");
    assert_eq!(s.commit().expect("commit"), None, "through 3 not reached");
    drop(s);

    let mut s = open().expect("reopen");
    assert_eq!((s.meta().state, s.meta().committed), (ReplicaState::Seeded, Epoch::ZERO));
    let mut b = vec![0u8; BS as usize];
    s.read(0, &mut b).expect("read");
    assert!(b.iter().all(|&x| x == 9), "direct data is in the image");
    // A new session starts the initial sync again and commits it.
    s.reset_session().expect("reset");
    s.begin_batch(BatchHeader { kind: BatchKind::Initial, id: Epoch(1), base: Epoch::ZERO })
        .expect("begin");
    s.data(Epoch(1), 2 * BS, BS as u32, Some(Bytes::from(vec![5u8; BS as usize]))).expect("data");
    s.end_batch(Epoch(1), End { through: Epoch(1), frames: 1, batch_crc: 0 }).expect("end");
    assert_eq!(s.commit().expect("commit"), Some(Epoch(1)));
    s.apply().expect("apply");
    assert_eq!(s.meta().state, ReplicaState::Consistent);
    assert_eq!(s.hashes(0, BS as u32, 100).expect("hashes").len(), BLOCKS as usize);
    assert_eq!(
        s.hashes(2 * BS, BS as u32, 1).expect("hashes")[0],
        *blake3::hash(&[5u8; BS as usize]).as_bytes()
    );
    // Bad input gets a clear error.
    assert!(matches!(s.data(Epoch(9), 1, 4096, None), Err(StoreError::OutOfRange { .. })));
    drop(s);
    let wrong = Geometry::new(2 * BS * BLOCKS, BS as u32).expect("geometry");
    let err =
        ReplicaStore::open_dir(dir.path(), VOL, "vol", wrong, generation()).expect_err("mismatch");
    assert!(err.to_string().contains("geometry"), "{err}");
}

#[test]
fn multi_volume_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(dir.path()).expect("open");
    assert!(store.volumes().is_empty());
    let v = store.volume(VOL, "vol", geometry(), generation()).expect("volume");
    assert_eq!(v.meta().name, "vol");
    drop(v);
    let store = Store::open(dir.path()).expect("reopen");
    assert_eq!(store.volumes(), &[VOL]);
}
