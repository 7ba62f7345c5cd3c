//! Store tests of sync batches (issue 5): the durable prefix, seal at the end of a session and
//! in recovery (torn tail cut), power cuts at every storage step of a sync workload with the
//! durable frames checked after each, and what is never sealed.

use std::sync::Arc;

use blockferry_protocol::repl::{BatchHeader, BatchKind, End, Epoch};

use super::sim::{Fate, SimRng, SimStorage};
use super::*;

const BS: u64 = 4096;
const BLOCKS: u64 = 32;
const VOL: VolumeId = VolumeId([9; 16]);

fn open_sim(st: &Arc<SimStorage>) -> Result<ReplicaStore, StoreError> {
    let storage: Arc<dyn Storage> = st.clone();
    let g = Geometry::new(BS * BLOCKS, BS as u32).expect("geometry");
    let gen = Generation::new(42).expect("generation");
    ReplicaStore::open_with(
        storage,
        VOL,
        "vol",
        g,
        gen,
        Options { segment_size: 16 << 10, ..Options::default() },
    )
}

fn image(s: &ReplicaStore) -> Vec<u8> {
    let mut v = vec![0u8; (BS * BLOCKS) as usize];
    s.read(0, &mut v).expect("read image");
    v
}

fn begin(s: &mut ReplicaStore, kind: BatchKind, id: u64, base: u64) -> Result<(), StoreError> {
    s.begin_batch(BatchHeader { kind, id: Epoch(id), base: Epoch(base) })
}

/// Frame `n` of a workload: block `n % BLOCKS` filled with `n + 1` (0 never appears).
fn frame(s: &mut ReplicaStore, id: u64, n: u64) -> Result<(), StoreError> {
    s.data(
        Epoch(id),
        (n % BLOCKS) * BS,
        BS as u32,
        Some(Bytes::from(vec![(n + 1) as u8; BS as usize])),
    )
}

fn put_frame(img: &mut [u8], n: u64) {
    let at = ((n % BLOCKS) * BS) as usize;
    img[at..at + BS as usize].fill((n + 1) as u8);
}

fn end(s: &mut ReplicaStore, id: u64, frames: u32) -> Result<(), StoreError> {
    s.end_batch(Epoch(id), End { through: Epoch(id), frames, batch_crc: 0 })
}

#[test]
fn durable_prefix_then_seal_commits_it() {
    let st = Arc::new(SimStorage::new());
    let mut s = open_sim(&st).expect("open");
    begin(&mut s, BatchKind::Epoch, 1, 0).expect("begin");
    frame(&mut s, 1, 0).expect("data");
    end(&mut s, 1, 1).expect("end");
    assert_eq!(s.commit().expect("commit"), Some(Epoch(1)));

    begin(&mut s, BatchKind::Sync, 2, 1).expect("begin sync");
    assert!(!s.sync_pending());
    for n in 1..4 {
        frame(&mut s, 2, n).expect("data");
    }
    assert!(s.sync_pending());
    assert_eq!(s.sync_durable().expect("durable"), vec![(Epoch(2), 3)]);
    assert!(!s.sync_pending());
    assert_eq!(s.sync_durable().expect("durable"), vec![], "nothing new");
    assert_eq!(s.commit().expect("commit"), None, "an open sync batch is not committed");
    frame(&mut s, 2, 4).expect("data");
    frame(&mut s, 2, 5).expect("data");
    // The agent vanishes: the session ends with the batch open.
    assert_eq!(s.seal().expect("seal"), vec![(Epoch(2), 5)]);
    assert_eq!(s.meta().committed, Epoch(2));
    s.apply().expect("apply");
    let mut want = vec![0u8; (BS * BLOCKS) as usize];
    (0..6).for_each(|n| put_frame(&mut want, n));
    assert!(image(&s) == want);
    drop(s);
    let s = open_sim(&st).expect("reopen");
    assert_eq!(s.meta().committed, Epoch(2));
    assert!(image(&s) == want);
    assert!(s.recovery_sealed().is_empty());
}

#[test]
fn durable_only_after_every_batch_before_is_complete() {
    let st = Arc::new(SimStorage::new());
    let mut s = open_sim(&st).expect("open");
    // Epoch 1 still streaming while sync 2 (after it) gets frames.
    begin(&mut s, BatchKind::Epoch, 1, 0).expect("begin");
    frame(&mut s, 1, 0).expect("data");
    begin(&mut s, BatchKind::Sync, 2, 1).expect("begin sync");
    frame(&mut s, 2, 1).expect("data");
    assert_eq!(s.sync_durable().expect("durable"), vec![], "epoch 1 is not complete");
    end(&mut s, 1, 1).expect("end");
    assert!(s.sync_pending(), "the end of epoch 1 may let sync 2 be reported");
    assert_eq!(s.sync_durable().expect("durable"), vec![(Epoch(2), 1)]);

    // A resync whose `through` lies beyond the sync batch: no boundary at it, no Durable.
    let st = Arc::new(SimStorage::new());
    let mut s = open_sim(&st).expect("open");
    begin(&mut s, BatchKind::Epoch, 1, 0).expect("begin");
    end(&mut s, 1, 0).expect("end");
    s.commit().expect("commit");
    begin(&mut s, BatchKind::Resync, 2, 1).expect("resync");
    s.end_batch(Epoch(2), End { through: Epoch(4), frames: 0, batch_crc: 0 }).expect("end");
    begin(&mut s, BatchKind::Sync, 3, 2).expect("sync");
    frame(&mut s, 3, 0).expect("data");
    assert_eq!(s.sync_durable().expect("durable"), vec![]);
    // Two open sync batches in a row: only the first is reported.
    let st = Arc::new(SimStorage::new());
    let mut s = open_sim(&st).expect("open");
    begin(&mut s, BatchKind::Sync, 1, 0).expect("sync 1");
    frame(&mut s, 1, 0).expect("data");
    begin(&mut s, BatchKind::Sync, 2, 1).expect("sync 2");
    frame(&mut s, 2, 1).expect("data");
    assert_eq!(s.sync_durable().expect("durable"), vec![(Epoch(1), 1)]);
    end(&mut s, 1, 1).expect("end 1");
    assert_eq!(s.sync_durable().expect("durable"), vec![(Epoch(2), 1)]);
    // Both sealed in chain order (2 was open): committed through 2.
    assert_eq!(s.seal().expect("seal"), vec![(Epoch(2), 1)]);
    assert_eq!(s.meta().committed, Epoch(2));
}

#[test]
fn only_sync_batches_are_sealed() {
    let st = Arc::new(SimStorage::new());
    let mut s = open_sim(&st).expect("open");
    begin(&mut s, BatchKind::Epoch, 1, 0).expect("begin");
    frame(&mut s, 1, 0).expect("data");
    begin(&mut s, BatchKind::Sync, 2, 1).expect("sync after an open epoch");
    frame(&mut s, 2, 1).expect("data");
    assert_eq!(s.seal().expect("seal"), vec![], "an open epoch batch stops the seal");
    assert_eq!(s.meta().committed, Epoch::ZERO);
    s.reset_session().expect("reset");
    assert_eq!(s.status().pending_batches, 0, "dropped with the session");
    s.sync_durable().expect("durable");
    drop(s);
    let s = open_sim(&st).expect("reopen");
    assert_eq!(s.meta().committed, Epoch::ZERO);
}

#[test]
fn abort_and_errors_cut_a_sync_batch_but_never_drop_it() {
    let st = Arc::new(SimStorage::new());
    let mut s = open_sim(&st).expect("open");
    begin(&mut s, BatchKind::Sync, 1, 0).expect("begin");
    frame(&mut s, 1, 0).expect("data");
    frame(&mut s, 1, 1).expect("data");
    assert_eq!(s.sync_durable().expect("durable"), vec![(Epoch(1), 2)]);
    s.abort_batch(Epoch(1));
    assert_eq!(s.status().pending_batches, 1, "kept");
    assert!(frame(&mut s, 1, 2).is_err(), "no frames after a cut");
    assert!(end(&mut s, 1, 2).is_err(), "no end after a cut");
    // No room for the seal's end record: an error, the batch stays open, nothing lost.
    st.set_quota(Some(st.used()));
    assert!(s.seal().expect_err("no room for the seal").is_no_space());
    assert_eq!(s.meta().committed, Epoch::ZERO);
    st.set_quota(None);
    // A new session seals first.
    s.reset_session().expect("reset");
    assert_eq!(s.meta().committed, Epoch(1));
    s.apply().expect("apply");
    let mut want = vec![0u8; (BS * BLOCKS) as usize];
    put_frame(&mut want, 0);
    put_frame(&mut want, 1);
    assert!(image(&s) == want);

    begin(&mut s, BatchKind::Sync, 2, 1).expect("begin");
    frame(&mut s, 2, 5).expect("data");
    st.set_quota(Some(st.used() + 100));
    assert!(frame(&mut s, 2, 6).expect_err("full").is_no_space());
    st.set_quota(None);
    assert!(frame(&mut s, 2, 7).is_err(), "cut after the error");
    assert_eq!(s.seal().expect("seal"), vec![(Epoch(2), 1)]);
    assert_eq!(s.meta().committed, Epoch(2));
    s.apply().expect("apply");
    put_frame(&mut want, 5);
    assert!(image(&s) == want);
}

/// Recovery seals an unended sync batch whose records are in the journal, after its last
/// complete record: a torn last record is cut. Every frame reported durable survives.
#[test]
fn recovery_seals_an_unended_sync_batch_and_cuts_a_torn_tail() {
    for tear in 0..64u64 {
        let st = Arc::new(SimStorage::new());
        let mut s = open_sim(&st).expect("open");
        begin(&mut s, BatchKind::Epoch, 1, 0).expect("begin");
        frame(&mut s, 1, 0).expect("data");
        end(&mut s, 1, 1).expect("end");
        s.commit().expect("commit");
        begin(&mut s, BatchKind::Sync, 3, 1).expect("sync");
        for n in 1..=3 {
            frame(&mut s, 3, n).expect("data");
        }
        assert_eq!(s.sync_durable().expect("durable"), vec![(Epoch(3), 3)]);
        // Two more frames, not synced: the first kept, the second torn (or dropped).
        frame(&mut s, 3, 4).expect("data");
        frame(&mut s, 3, 5).expect("data");
        drop(s);
        let mut i = 0;
        let crashed = Arc::new(st.crash(|f, _| {
            if !f.starts_with("journal/") {
                return Fate::Kept;
            }
            i += 1;
            match i {
                1 => Fate::Kept,
                _ if tear == 0 => Fate::Dropped,
                _ => Fate::Torn(tear.wrapping_mul(0x9e37_79b9_7f4a_7c15) & !1),
            }
        }));
        let s = open_sim(&crashed).expect("recover");
        let sealed = s.recovery_sealed().to_vec();
        assert_eq!(s.meta().committed, Epoch(3), "tear {tear}: sealed and committed");
        assert_eq!(sealed.len(), 1);
        let frames = sealed[0].1;
        assert!((4..=5).contains(&frames), "tear {tear}: {frames} frames");
        let mut want = vec![0u8; (BS * BLOCKS) as usize];
        (0..=u64::from(frames)).for_each(|n| put_frame(&mut want, n));
        assert!(image(&s) == want, "tear {tear}: image is the sealed prefix");
        // It goes on, and a second recovery changes nothing.
        drop(s);
        let mut s = open_sim(&crashed).expect("reopen");
        assert_eq!(s.meta().committed, Epoch(3));
        assert!(s.recovery_sealed().is_empty());
        assert!(image(&s) == want);
        s.reset_session().expect("reset");
        begin(&mut s, BatchKind::Epoch, 4, 3).expect("next batch");
        end(&mut s, 4, 0).expect("end");
        assert_eq!(s.commit().expect("commit"), Some(Epoch(4)));
    }
}

/// One sync workload: epochs and sync batches in a chain, random seals and session resets,
/// group commits at random. Returns what was reported durable, and the image model per
/// (batch, frames) boundary (`bounds`).
struct Workload {
    rng: SimRng,
    committed: Epoch,
    head: u64,
    open: Option<(u64, u32)>,
    img: Vec<u8>,
    n: u64,
    /// Image at each boundary: (id, frames of it) -> image.
    bounds: std::collections::HashMap<(u64, u32), Vec<u8>>,
    /// Frames per sync id known durable (the highest report).
    durable: std::collections::BTreeMap<u64, u32>,
    /// Batches ended (all frames count).
    ended: std::collections::BTreeMap<u64, u32>,
}

impl Workload {
    fn new(seed: u64) -> Workload {
        let img = vec![0u8; (BS * BLOCKS) as usize];
        let mut bounds = std::collections::HashMap::new();
        bounds.insert((0, 0), img.clone());
        Workload {
            rng: SimRng(seed),
            committed: Epoch::ZERO,
            head: 0,
            open: None,
            img,
            n: 0,
            bounds,
            durable: Default::default(),
            ended: Default::default(),
        }
    }

    fn step(&mut self, s: &mut ReplicaStore) -> Result<(), StoreError> {
        match self.rng.below(12) {
            0..=5 => {
                let (id, frames) = match self.open {
                    Some(o) => o,
                    None => {
                        let id = self.head + 1;
                        // Sealed without a frame, it is the boundary before it.
                        self.bounds.insert((id, 0), self.img.clone());
                        begin(s, BatchKind::Sync, id, self.head)?;
                        self.head = id;
                        self.open = Some((id, 0));
                        (id, 0)
                    }
                };
                self.n += 1;
                frame(s, id, self.n)?;
                put_frame(&mut self.img, self.n);
                self.open = Some((id, frames + 1));
                self.bounds.insert((id, frames + 1), self.img.clone());
            }
            6..=7 => {
                if let Some((id, frames)) = self.open.take() {
                    self.ended.insert(id, frames);
                    end(s, id, frames)?;
                }
            }
            8..=9 => {
                for (id, f) in s.sync_durable()? {
                    let d = self.durable.entry(id.0).or_default();
                    *d = (*d).max(f);
                }
                if let Some(c) = s.commit()? {
                    self.committed = c;
                }
            }
            10 => s.apply()?,
            _ => {
                if let Some((id, frames)) = self.open {
                    // If the seal commits it (also if the power goes off after its commit
                    // record), it is after every frame appended.
                    self.ended.insert(id, frames);
                }
                s.reset_session()?;
                self.committed = s.meta().committed;
                self.head = self.committed.0;
                self.open = None;
                // What was not committed is gone: the model's image is the committed one.
                let (id, f) = self.boundary_of(self.committed.0);
                self.img = self.bounds[&(id, f)].clone();
            }
        }
        Ok(())
    }

    /// The (id, frames) key of the boundary at committed `id` when every frame of it is in.
    fn boundary_of(&self, id: u64) -> (u64, u32) {
        if id == 0 {
            return (0, 0);
        }
        (id, self.ended.get(&id).copied().unwrap_or(0))
    }
}

/// Power cuts at every storage step of a sync workload: after recovery, every frame reported
/// durable is in the replica (its batch committed with at least those frames), and the image
/// is exactly the boundary after the recovered prefix.
#[test]
fn power_cut_keeps_every_durable_frame() {
    let (mut checked, mut sealed_n, mut durable_n) = (0, 0, 0);
    for seed in 0..4u64 {
        let steps = 150;
        let total = {
            let st = Arc::new(SimStorage::new());
            let mut w = Workload::new(seed);
            let mut s = open_sim(&st).expect("open");
            for _ in 0..steps {
                w.step(&mut s).expect("step");
            }
            st.steps()
        };
        for cut in (0..total).step_by(2) {
            let st = Arc::new(SimStorage::new());
            st.die_after(cut);
            let mut w = Workload::new(seed);
            if let Ok(mut s) = open_sim(&st) {
                for _ in 0..steps {
                    if w.step(&mut s).is_err() {
                        break;
                    }
                }
            }
            let after = Arc::new(st.crash_seeded(seed * 7919 + cut as u64));
            let s = match open_sim(&after) {
                Ok(s) => s,
                Err(_) if !after.files().contains(&"meta".to_string()) => continue,
                Err(e) => panic!("seed {seed} cut {cut}: reopen failed: {e}"),
            };
            let c = s.meta().committed.0;
            let sealed: std::collections::HashMap<u64, u32> =
                s.recovery_sealed().iter().map(|&(e, f)| (e.0, f)).collect();
            sealed_n += usize::from(!sealed.is_empty());
            durable_n += w.durable.len();
            for (&id, &f) in &w.durable {
                assert!(
                    c >= id,
                    "seed {seed} cut {cut}: durable frames of {id} lost (committed {c})"
                );
                if let Some(&got) = sealed.get(&id) {
                    assert!(got >= f, "seed {seed} cut {cut}: {id} sealed at {got} < durable {f}");
                }
            }
            let key = match sealed.get(&c) {
                Some(&f) => (c, f),
                None => w.boundary_of(c),
            };
            let want = w.bounds.get(&key).unwrap_or_else(|| {
                panic!("seed {seed} cut {cut}: recovered {key:?}, no such boundary")
            });
            assert!(image(&s) == *want, "seed {seed} cut {cut}: image differs at {key:?}");
            checked += 1;
        }
    }
    println!("sync power cuts: {checked} crash points checked, {sealed_n} recoveries sealed a batch, {durable_n} durable reports checked");
    assert!(checked > 300 && sealed_n > 50 && durable_n > 300, "{checked} {sealed_n} {durable_n}");
}
