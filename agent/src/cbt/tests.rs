//! Tracker tests: recovery, corruption, concurrency, and the power-cut enumeration.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::store::sim::{Fate, SimStorage};
use super::*;
use crate::volume::{Volume, VolumeMeta};

const BS: u64 = 4096;

fn volume(dir: &std::path::Path, size: u64) -> Volume {
    Volume {
        dir: dir.to_path_buf(),
        meta: VolumeMeta {
            format_version: 1,
            uuid: uuid::Uuid::from_u128(0x1234),
            name: "vol".into(),
            size,
            block_size: BS as u32,
            generation: None,
        },
    }
}

/// 4 MiB volume, 64 KiB extents, 16 of them in the log.
const SMALL: TrackerOptions = TrackerOptions { extent_size: 64 << 10, extents: 16 };
/// The same with only 4 extents in the log: short scenarios evict all the time.
const TINY: TrackerOptions = TrackerOptions { extent_size: 64 << 10, extents: 4 };
const SIZE: u64 = 4 << 20;

fn dirty_blocks(t: &Tracker, name: &str) -> BTreeSet<u64> {
    t.extents(name)
        .unwrap()
        .iter()
        .flat_map(|e| (e.offset / BS)..((e.offset + e.length) / BS))
        .collect()
}

fn blocks(offset: u64, len: u64) -> std::ops::Range<u64> {
    (offset / BS)..(offset + len).div_ceil(BS)
}

#[test]
fn clean_stop_needs_no_widening_and_crash_widens_to_the_log() {
    let storage = Arc::new(SimStorage::new());
    let vol = volume(std::path::Path::new("/nowhere"), SIZE);
    let t = Tracker::open_with(&vol, SMALL, storage.clone()).unwrap();
    assert!(t.stats().recovery.clean);
    t.create("a").unwrap();
    drop(t.begin_write_inline(8192, 4096).unwrap());
    drop(t.begin_write_inline(1 << 20, 100).unwrap());
    t.close().unwrap();
    let s2 = Arc::new(storage.crash(|_, _| Fate::Dropped));
    let t = Tracker::open_with(&vol, SMALL, s2.clone()).unwrap();
    let r = t.stats().recovery;
    assert!(r.clean && r.reason.is_none() && r.widened_bytes == 0, "{r:?}");
    assert_eq!(dirty_blocks(&t, "a"), BTreeSet::from([2, 256]));

    // No close: the next start widens by the hot extents (64 KiB each).
    drop(t.begin_write_inline(3 << 20, 4096).unwrap());
    let t2 = Tracker::open_with(&vol, SMALL, Arc::new(s2.crash(|_, _| Fate::Dropped))).unwrap();
    let r = t2.stats().recovery;
    assert!(!r.clean, "{r:?}");
    assert!(r.reason.as_deref().unwrap().contains("unclean stop"), "{r:?}");
    assert_eq!(r.widened_bytes, 64 << 10, "only the extent written since the clean start");
    let d = dirty_blocks(&t2, "a");
    for b in [2, 256, 768] {
        assert!(d.contains(&b), "block {b} lost: {d:?}");
    }
    assert_eq!(d.len() as u64, 2 + 16, "the two old blocks plus the widened 64 KiB extent");
}

#[test]
fn missing_or_corrupt_files_mean_dirty_never_clean() {
    let storage = Arc::new(SimStorage::new());
    let vol = volume(std::path::Path::new("/nowhere"), SIZE);
    let t = Tracker::open_with(&vol, SMALL, storage.clone()).unwrap();
    t.create("a").unwrap();
    t.close().unwrap();
    drop(t);

    // Corrupt log header: everything dirty.
    let s1 = storage.crash(|_, _| Fate::Kept);
    s1.corrupt(AL_FILE, 3);
    let t = Tracker::open_with(&vol, SMALL, Arc::new(s1)).unwrap();
    assert_eq!(t.info("a").unwrap().dirty_bytes, SIZE);
    assert!(t.stats().recovery.reason.unwrap().contains("header is corrupt"));

    // Missing log: everything dirty.
    let s2 = storage.crash(|_, _| Fate::Kept);
    s2.delete(AL_FILE);
    let t = Tracker::open_with(&vol, SMALL, Arc::new(s2)).unwrap();
    assert_eq!(t.info("a").unwrap().dirty_bytes, SIZE);
    assert!(t.stats().recovery.reason.unwrap().contains("missing"));

    // Both copies of page 0 corrupt: that page dirty (the whole 4 MiB volume is one page).
    let s3 = storage.crash(|_, _| Fate::Kept);
    s3.corrupt(&bitmap_file("a"), format::page_offset(0, 0) + 100);
    s3.corrupt(&bitmap_file("a"), format::page_offset(0, 1) + 100);
    let t = Tracker::open_with(&vol, SMALL, Arc::new(s3)).unwrap();
    assert_eq!(t.info("a").unwrap().dirty_bytes, SIZE);
    assert!(t.stats().recovery.reason.unwrap().contains("no valid copy of page"));

    // One copy corrupt: the other is used, nothing widened.
    let s4 = storage.crash(|_, _| Fate::Kept);
    s4.corrupt(&bitmap_file("a"), format::page_offset(0, 1) + 100);
    let t = Tracker::open_with(&vol, SMALL, Arc::new(s4)).unwrap();
    assert_eq!(t.info("a").unwrap().dirty_bytes, 0);

    // Bitmap header corrupt: that bitmap all dirty.
    let s5 = storage.crash(|_, _| Fate::Kept);
    s5.corrupt(&bitmap_file("a"), 50);
    let t = Tracker::open_with(&vol, SMALL, Arc::new(s5)).unwrap();
    assert_eq!(t.info("a").unwrap().dirty_bytes, SIZE);
}

#[test]
fn a_clear_racing_with_a_write_keeps_the_write() {
    let storage = Arc::new(SimStorage::new());
    let vol = volume(std::path::Path::new("/nowhere"), SIZE);
    let t = Tracker::open_with(&vol, SMALL, storage).unwrap();
    t.create("a").unwrap();
    let g = t.begin_write_inline(0, 8192).unwrap();
    let info = t.clear("a").unwrap();
    assert_eq!(info.generation, 1);
    drop(g); // the write completes after the clear began
    assert_eq!(dirty_blocks(&t, "a"), BTreeSet::from([0, 1]));
    assert!(matches!(t.create("a"), Err(CbtError::BitmapExists { .. })));
    assert!(matches!(t.create("a/b"), Err(CbtError::BadName { .. })));
    assert!(matches!(t.clear("zz"), Err(CbtError::NoSuchBitmap { .. })));
    // A second bitmap sees only later writes.
    t.create("b").unwrap();
    drop(t.begin_write_inline(SIZE - 4096, 4096).unwrap());
    assert_eq!(dirty_blocks(&t, "b"), BTreeSet::from([SIZE / BS - 1]));
    assert_eq!(t.status("a", 4096, 8192, 8).unwrap(), vec![(4096, true), (4096, false)]);
    t.remove("b").unwrap();
    assert!(!t.has("b"));
}

/// A tiny deterministic generator (xorshift64*), so a failing seed replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// A write that completes.
    Write(u64, u64),
    /// A write that begins and is still in flight at the end.
    Begin(u64, u64),
    /// A write begun earlier (the n-th in flight) completes.
    End(usize),
    Clear,
    WriteBack,
}

/// The power-cut volume: two bitmap pages, so a page's bits span all its sectors and a torn
/// page write really mixes two copies.
const PSIZE: u64 = 2 * bitmap::PAGE_BITS * BS;

fn scenario(seed: u64) -> Vec<Op> {
    let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let n = 6 + r.below(20) as usize;
    (0..n)
        .map(|_| {
            let off = r.below(PSIZE / BS) * BS + if r.below(4) == 0 { r.below(BS) } else { 0 };
            let len = (1 + r.below(40) * 1024).min(PSIZE - off);
            match r.below(10) {
                0..=4 => Op::Write(off, len),
                5 | 6 => Op::Begin(off, len),
                7 => Op::End(r.below(4) as usize),
                8 => Op::Clear,
                _ => Op::WriteBack,
            }
        })
        .collect()
}

/// What the test knows after running ops until the power went off.
struct Outcome {
    /// Blocks of writes acknowledged (guard dropped after a successful begin) since the last
    /// clear began: they must be dirty after the crash.
    must: BTreeSet<u64>,
    /// Blocks of every write attempted since the last clear began, and of writes in flight at
    /// it: the only blocks that may be dirty besides the activity log's extents.
    touched: BTreeSet<u64>,
}

/// Runs `ops` over `storage` (with bitmap "a"); the storage may die at any step, after which
/// every operation fails and the run stops.
fn run(t: &Tracker, ops: &[Op]) -> Outcome {
    let mut must = BTreeSet::new();
    let mut touched = BTreeSet::new();
    let mut in_flight: Vec<(WriteGuard<'_>, u64, u64)> = Vec::new();
    for op in ops {
        match *op {
            Op::Write(off, len) | Op::Begin(off, len) => {
                touched.extend(blocks(off, len));
                let Ok(g) = t.begin_write_inline(off, len) else { break };
                // At most one write in flight: with a 4-extent log, more could hold every slot
                // and an inline admission cannot wait for them.
                if matches!(op, Op::Write(..)) || !in_flight.is_empty() {
                    drop(g);
                    must.extend(blocks(off, len));
                } else {
                    in_flight.push((g, off, len));
                }
            }
            Op::End(i) => {
                if i < in_flight.len() {
                    let (g, off, len) = in_flight.remove(i);
                    drop(g);
                    must.extend(blocks(off, len));
                }
            }
            Op::Clear => {
                // Whether or not the clear completes, blocks written before it need not be
                // dirty any more (a failed clear may have cleared part of the bitmap).
                // A failed clear may also have cleared nothing on disk: the old blocks may stay.
                must.clear();
                let before = std::mem::take(&mut touched);
                for (_, off, len) in &in_flight {
                    touched.extend(blocks(*off, *len));
                }
                if t.clear("a").is_err() {
                    touched.extend(before);
                    break;
                }
            }
            Op::WriteBack => {
                if t.write_back_now().is_err() {
                    break;
                }
            }
        }
    }
    // Writes still in flight at the crash were never acknowledged: leak their guards the way
    // a crash does (no end).
    for (g, _, _) in in_flight {
        std::mem::forget(g);
    }
    Outcome { must, touched }
}

/// The power-cut test: for many short scenarios, crash after every storage step, with the
/// unsynced writes dropped, kept, torn, or a seeded mix, then recover and check invariant 2:
/// every acknowledged write since the last clear is dirty, and the extra dirty blocks fit in
/// the activity log.
#[test]
fn power_cut_at_every_step_loses_no_acknowledged_write() {
    let vol = volume(std::path::Path::new("/nowhere"), PSIZE);
    let al_blocks = u64::from(TINY.extents) * TINY.extent_size / BS;
    let mut crashes = 0;
    for seed in 0..150u64 {
        let ops = scenario(seed);
        // A dry run counts the storage steps of the scenario.
        let base = Arc::new(SimStorage::new());
        {
            let t = Tracker::open_with(&vol, TINY, base.clone()).unwrap();
            t.create("a").unwrap();
        }
        let start = base.steps();
        let total = {
            let s = Arc::new(base.crash(|_, _| Fate::Kept));
            let t = Tracker::open_with(&vol, TINY, s.clone()).unwrap();
            let before = s.steps();
            let out = run(&t, &ops);
            let live = dirty_blocks(&t, "a");
            assert!(
                out.must.is_subset(&live),
                "seed {seed}: acknowledged writes missing in memory"
            );
            s.steps() - before
        };
        let _ = start;
        for k in 0..=total {
            for mode in 0..5u64 {
                let disk = Arc::new(base.crash(|_, _| Fate::Kept));
                let t = Tracker::open_with(&vol, TINY, disk.clone()).unwrap();
                disk.die_after(disk.steps() + k);
                let out = run(&t, &ops);
                let mut r = Rng(seed * 1000 + k as u64 * 10 + mode + 1);
                let after = disk.crash(|_, _| match mode {
                    0 => Fate::Dropped,
                    1 => Fate::Kept,
                    2 => Fate::Torn(1),
                    3 => Fate::Torn(!1),
                    _ => match r.below(3) {
                        0 => Fate::Dropped,
                        1 => Fate::Kept,
                        _ => Fate::Torn(r.next()),
                    },
                });
                drop(t);
                let t = Tracker::open_with(&vol, TINY, Arc::new(after)).unwrap();
                let dirty = dirty_blocks(&t, "a");
                let missed: Vec<_> = out.must.difference(&dirty).collect();
                assert!(
                    missed.is_empty(),
                    "seed {seed} crash after step {k} mode {mode}: acknowledged blocks {missed:?} are clean; ops {ops:?}"
                );
                let extra = dirty.difference(&out.touched).count() as u64;
                assert!(
                    extra <= al_blocks,
                    "seed {seed} step {k} mode {mode}: {extra} extra dirty blocks > the log's {al_blocks}"
                );
                crashes += 1;
            }
        }
    }
    assert!(crashes > 1000, "only {crashes} crash points");
    eprintln!("power-cut test: {crashes} crash points checked");
}

/// The committer thread under concurrent writers on a real directory: no lost bit, no
/// deadlock, batching, and a clean stop that reopens without widening.
#[test]
fn concurrent_writers_with_the_committer_thread() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 1u64 << 30;
    let vol = volume(tmp.path(), size);
    let opts = TrackerOptions { extent_size: 8 << 20, extents: 16 };
    let t = Tracker::open(&vol, opts).unwrap();
    t.create("a").unwrap();
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let written = rt.block_on(async {
        let mut tasks = Vec::new();
        for task in 0..32u64 {
            let t = t.clone();
            tasks.push(tokio::spawn(async move {
                let mut r = Rng(task + 7);
                let mut mine = Vec::new();
                for _ in 0..100 {
                    let off = r.below(size / BS) * BS;
                    let len = ((1 + r.below(64)) * BS).min(size - off);
                    let g = t.begin_write(off, len).await.unwrap();
                    tokio::task::yield_now().await;
                    drop(g);
                    mine.push((off, len));
                }
                mine
            }));
        }
        let mut all = BTreeSet::new();
        for task in tasks {
            for (off, len) in task.await.unwrap() {
                all.extend(blocks(off, len));
            }
        }
        all
    });
    let stats = t.stats();
    assert!(stats.al_evictions > 0 && stats.al_transactions > 1, "{stats:?}");
    assert!(
        stats.al_extents_added >= stats.al_transactions - 1,
        "each transaction admits at least one extent: {stats:?}"
    );
    assert_eq!(dirty_blocks(&t, "a"), written);
    t.close().unwrap();
    assert!(matches!(rt.block_on(t.begin_write(0, 4096)), Err(CbtError::Closed { .. })));
    drop(t);
    let t = Tracker::open(&vol, opts).unwrap();
    let r = t.stats().recovery;
    assert!(r.clean && r.widened_bytes == 0, "{r:?}");
    assert_eq!(dirty_blocks(&t, "a"), written);
    // A different geometry next time: the log is replaced, nothing is lost.
    t.close().unwrap();
    drop(t);
    let t = Tracker::open(&vol, TrackerOptions::default()).unwrap();
    assert_eq!(dirty_blocks(&t, "a"), written);
}

#[test]
fn bad_options_are_refused_clearly() {
    let e = TrackerOptions { extent_size: 3 << 20, extents: 1024 }.validate(4096).unwrap_err();
    assert!(e.to_string().contains("power of two"), "{e}");
    let e = TrackerOptions { extent_size: 4 << 20, extents: 8 }.validate(4096).unwrap_err();
    assert!(e.to_string().contains("from 16"), "{e}");
    let e = TrackerOptions { extent_size: 1 << 20, extents: 64 }.validate(4096).unwrap_err();
    assert!(e.to_string().contains("at least 128 MiB"), "{e}");
    TrackerOptions::default().validate(4096).unwrap();
}

/// Changed extents coalesce across bitmap-page boundaries and activity-log extent boundaries,
/// and a range that starts or ends inside a block reports whole blocks.
#[test]
fn extents_coalesce_across_page_and_log_extent_boundaries() {
    let size = 3 * bitmap::PAGE_BITS * BS;
    let vol = volume(std::path::Path::new("/nowhere"), size);
    let t = Tracker::open_with(&vol, SMALL, Arc::new(SimStorage::new())).unwrap();
    t.create("a").unwrap();
    let page = bitmap::PAGE_BITS * BS; // 127 MiB: not a multiple of the 64 KiB log extent
    let ext = SMALL.extent_size;
    // Two writes that meet at a page boundary, two that meet at a log-extent boundary.
    drop(t.begin_write_inline(page - 3 * BS, 3 * BS).unwrap());
    drop(t.begin_write_inline(page, 5 * BS).unwrap());
    drop(t.begin_write_inline(10 * ext - BS, BS).unwrap());
    drop(t.begin_write_inline(10 * ext, 100).unwrap());
    let e = t.extents("a").unwrap();
    assert_eq!(
        e,
        vec![
            ByteExtent { offset: 10 * ext - BS, length: 2 * BS },
            ByteExtent { offset: page - 3 * BS, length: 8 * BS },
        ]
    );
    // Status over a range starting mid-block reports from the range's start.
    assert_eq!(t.status("a", 10 * ext - 100, 300, 8).unwrap(), vec![(300, true)]);
    assert_eq!(
        t.status("a", page - 4 * BS, 10 * BS, 8).unwrap(),
        vec![(BS, false), (8 * BS, true), (BS, false)]
    );
    // The last block of the volume.
    drop(t.begin_write_inline(size - 1, 1).unwrap());
    assert_eq!(t.extents("a").unwrap().last(), Some(&ByteExtent { offset: size - BS, length: BS }));
    assert_eq!(t.names(), vec!["a".to_string()]);
}

#[test]
fn clear_blocks_keeps_what_is_asked_and_writes_in_flight() {
    let storage = Arc::new(SimStorage::new());
    let vol = volume(std::path::Path::new("/nowhere"), SIZE);
    let t = Tracker::open_with(&vol, SMALL, storage.clone()).unwrap();
    t.create("r").unwrap();
    t.create("other").unwrap();
    drop(t.begin_write_inline(0, 10 * BS).unwrap());
    drop(t.begin_write_inline(100 * BS, BS).unwrap());
    let in_flight = t.begin_write_inline(5 * BS, BS).unwrap();
    let cleared = t.clear_blocks("r", 0, 50, |b| b == 3).unwrap();
    assert_eq!(cleared, 9, "blocks 0..10 but 3");
    assert_eq!(dirty_blocks(&t, "r"), BTreeSet::from([3, 100]));
    drop(in_flight); // ends after the clear: its bit comes back
    assert_eq!(dirty_blocks(&t, "r"), BTreeSet::from([3, 5, 100]));
    assert_eq!(dirty_blocks(&t, "other").len(), 11, "other bitmaps untouched");
    assert!(matches!(t.clear_blocks("zz", 0, 1, |_| false), Err(CbtError::NoSuchBitmap { .. })));
    // Past the end is ignored.
    assert_eq!(t.clear_blocks("r", 90, u64::MAX, |_| false).unwrap(), 1);
    assert_eq!(dirty_blocks(&t, "r"), BTreeSet::from([3, 5]));

    // Not written back yet: a crash brings the cleared bits back (a superset, never less).
    let crashed = Tracker::open_with(&vol, SMALL, Arc::new(storage.crash(|_, _| Fate::Dropped)));
    let d = dirty_blocks(&crashed.unwrap(), "r");
    assert!([3, 5].iter().all(|b| d.contains(b)), "{d:?}");
    // Written back (here by a clean stop): the clear persists.
    t.close().unwrap();
    let t2 = Tracker::open_with(&vol, SMALL, Arc::new(storage.crash(|_, _| Fate::Dropped)));
    assert_eq!(dirty_blocks(&t2.unwrap(), "r"), BTreeSet::from([3, 5]));
}

#[test]
fn clear_blocks_asks_again_after_clearing() {
    // A writer records its block where `keep` looks between the first question and the
    // clear (as the replication capture does before its tracking ends): the bit stays.
    let storage = Arc::new(SimStorage::new());
    let vol = volume(std::path::Path::new("/nowhere"), SIZE);
    let t = Tracker::open_with(&vol, SMALL, storage).unwrap();
    t.create("r").unwrap();
    drop(t.begin_write_inline(0, 4 * BS).unwrap());
    let asked = std::sync::Mutex::new(Vec::new());
    let cleared = t
        .clear_blocks("r", 0, 4, |b| {
            let mut a = asked.lock().unwrap();
            a.push(b);
            // Block 2: not held when first asked, held when asked again.
            b == 2 && a.iter().filter(|&&x| x == 2).count() > 1
        })
        .unwrap();
    assert_eq!(cleared, 3);
    assert_eq!(dirty_blocks(&t, "r"), BTreeSet::from([2]));
    assert_eq!(*asked.lock().unwrap(), vec![0, 1, 2, 3, 0, 1, 2, 3]);
}

#[test]
fn dirty_runs_in_blocks() {
    let storage = Arc::new(SimStorage::new());
    let vol = volume(std::path::Path::new("/nowhere"), SIZE);
    let t = Tracker::open_with(&vol, SMALL, storage).unwrap();
    t.create("r").unwrap();
    assert_eq!(t.dirty_runs("r", 0, u64::MAX).unwrap(), vec![]);
    drop(t.begin_write_inline(2 * BS, 3 * BS).unwrap());
    drop(t.begin_write_inline(40_000 * BS / 40, 100).unwrap());
    drop(t.begin_write_inline(SIZE - BS, BS).unwrap());
    let last = SIZE / BS - 1;
    assert_eq!(t.dirty_runs("r", 0, u64::MAX).unwrap(), vec![(2, 3), (1000, 1), (last, 1)]);
    assert_eq!(t.dirty_runs("r", 3, 998).unwrap(), vec![(3, 2), (1000, 1)]);
    assert_eq!(t.dirty_runs("r", 3, 997).unwrap(), vec![(3, 2)]);
    assert_eq!(t.dirty_runs("r", last + 1, 10).unwrap(), vec![]);
    assert!(t.dirty_runs("zz", 0, 1).is_err());
}
