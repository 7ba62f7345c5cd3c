//! Differential tests of the disk engines (as Firecracker's): the same random operations run
//! through every engine (sync, io_uring) in every cache mode (writeback, O_DIRECT) and through
//! an in-memory model; every read and, at the end, every image must equal the model.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use proptest::prelude::*;

use super::*;

/// Image size of the property test: 32 blocks of 4 KiB.
const SIZE: u64 = 128 * 1024;
const A: u64 = DIRECT_ALIGN;

/// A directory whose filesystem supports O_DIRECT (tmpfs does not). `BLOCKFERRY_TEST_DIR`
/// overrides; otherwise /var/tmp, then the build directory. Panics (never skips) if none does.
fn direct_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(d) = std::env::var_os("BLOCKFERRY_TEST_DIR") {
            candidates.push(d.into());
        }
        candidates.push("/var/tmp".into());
        candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/test-tmp"));
        for dir in candidates {
            let _ = std::fs::create_dir_all(&dir);
            if supports_direct(&dir) {
                return dir;
            }
        }
        panic!("no directory supports O_DIRECT: set BLOCKFERRY_TEST_DIR to one on ext4/xfs/btrfs")
    })
}

fn supports_direct(dir: &Path) -> bool {
    let Ok(tmp) = tempfile::NamedTempFile::new_in(dir) else { return false };
    if tmp.as_file().set_len(A).is_err() {
        return false;
    }
    let options =
        EngineOptions { kind: EngineKind::Sync, cache: CacheMode::None, read_only: false };
    let Ok(file) = sync::open_image(tmp.path(), options) else { return false };
    let buf = IoBuf::zeroed(A as usize);
    sync::pwrite_full(&file, buf.as_slice(), 0, false).is_ok()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

const ALL: [(EngineKind, CacheMode); 4] = [
    (EngineKind::Sync, CacheMode::Writeback),
    (EngineKind::Sync, CacheMode::None),
    (EngineKind::Uring, CacheMode::Writeback),
    (EngineKind::Uring, CacheMode::None),
];

fn sparse_image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    path
}

/// The writeback fast path (inline page-cache reads and writes) is kept on for the sync engine
/// and turned off for io_uring, so both the fast path and io_uring's own buffered I/O are
/// compared against the model.
fn open(path: &Path, kind: EngineKind, cache: CacheMode) -> Arc<Engine> {
    let e = Engine::open(path, EngineOptions { kind, cache, read_only: false })
        .unwrap_or_else(|e| panic!("opening {kind:?}/{cache:?}: {e}"));
    e.set_fast_path(kind == EngineKind::Sync);
    e
}

/// Bytes that depend on position and seed, so a misplaced or stale write shows.
fn pattern(offset: u64, len: u64, seed: u8) -> Vec<u8> {
    (offset..offset + len)
        .map(|p| ((((p as u32).wrapping_mul(2_654_435_761) >> 24) as u8) ^ seed) | 1)
        .collect()
}

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: u64, fua: bool, seed: u8 },
    Read { offset: u64, len: u64 },
    Flush,
    Trim { offset: u64, len: u64 },
    Zeroes { offset: u64, len: u64, no_hole: bool, fast: bool },
    Allocation { offset: u64, len: u64 },
}

/// A non-empty range inside the image: whole blocks, anything, or a few bytes.
fn range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        (0..SIZE / A, 1..=4u64).prop_map(|(b, n)| (b * A, (n * A).min(SIZE - b * A))),
        (0..SIZE).prop_flat_map(|o| (Just(o), 1..=(SIZE - o).min(3 * A + 100))),
        (0..SIZE, 1..64u64).prop_map(|(o, l)| (o, l.min(SIZE - o))),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (range(), any::<bool>(), any::<u8>())
            .prop_map(|((offset, len), fua, seed)| Op::Write { offset, len, fua, seed }),
        3 => range().prop_map(|(offset, len)| Op::Read { offset, len }),
        1 => Just(Op::Flush),
        1 => range().prop_map(|(offset, len)| Op::Trim { offset, len }),
        2 => (range(), any::<bool>(), any::<bool>()).prop_map(|((offset, len), no_hole, fast)| {
            Op::Zeroes { offset, len, no_hole, fast }
        }),
        1 => range().prop_map(|(offset, len)| Op::Allocation { offset, len }),
    ]
}

async fn run_ops(engines: &[Arc<Engine>], model: &mut [u8], ops: &[Op]) {
    for (step, op) in ops.iter().enumerate() {
        for e in engines {
            let who = (step, op, e.options());
            match *op {
                Op::Write { offset, len, fua, seed } => {
                    let data = pattern(offset, len, seed);
                    let back = e.write(offset, IoBuf::from_slice(&data), fua).await;
                    assert_eq!(back.unwrap().as_slice(), &data[..], "{who:?}");
                }
                Op::Read { offset, len } => {
                    let got = e.read(offset, len as usize).await.unwrap();
                    let want = &model[offset as usize..(offset + len) as usize];
                    assert!(got.as_slice() == want, "read differs from the model at {who:?}");
                }
                Op::Flush => e.flush().await.unwrap(),
                Op::Trim { offset, len } => e.trim(offset, len).await.unwrap(),
                Op::Zeroes { offset, len, no_hole, fast } => {
                    match e.write_zeroes(offset, len, no_hole, fast).await {
                        Ok(()) => {}
                        // A filesystem without fallocate support: allowed, changes nothing,
                        // but then no engine may have changed anything (checked by reads).
                        Err(EngineError::NotFast { .. }) if fast => continue,
                        Err(err) => panic!("{who:?}: {err}"),
                    }
                }
                Op::Allocation { offset, len } => {
                    let extents = e.allocation(offset, len).await.unwrap();
                    let total: u64 = extents.iter().map(|x| x.len).sum();
                    assert!(total >= 1 && total <= len, "{who:?}: {extents:?}");
                    let mut pos = offset as usize;
                    for x in &extents {
                        let run = &model[pos..pos + x.len as usize];
                        if x.hole {
                            assert!(run.iter().all(|&b| b == 0), "hole with data: {who:?}");
                        }
                        pos += x.len as usize;
                    }
                }
            }
        }
        match *op {
            Op::Write { offset, len, seed, .. } => {
                model[offset as usize..(offset + len) as usize]
                    .copy_from_slice(&pattern(offset, len, seed));
            }
            Op::Trim { offset, len } | Op::Zeroes { offset, len, .. } => {
                model[offset as usize..(offset + len) as usize].fill(0);
            }
            _ => {}
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn engines_match_model(ops in prop::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir_in(direct_dir()).unwrap();
        let paths: Vec<PathBuf> =
            (0..ALL.len()).map(|i| sparse_image(dir.path(), &format!("img{i}"), SIZE)).collect();
        let mut model = vec![0u8; SIZE as usize];
        {
            let engines: Vec<Arc<Engine>> =
                ALL.iter().zip(&paths).map(|(&(k, c), p)| open(p, k, c)).collect();
            runtime().block_on(run_ops(&engines, &mut model, &ops));
        }
        for (p, kc) in paths.iter().zip(ALL) {
            let bytes = std::fs::read(p).unwrap();
            prop_assert!(bytes == model, "image of {:?} differs from the model", kc);
        }
    }
}

/// Zeroing a range whose edges are partial blocks, under O_DIRECT and otherwise.
#[test]
fn unaligned_zeroes_and_trim() {
    let dir = tempfile::tempdir_in(direct_dir()).unwrap();
    let rt = runtime();
    for (i, &(kind, cache)) in ALL.iter().enumerate() {
        let path = sparse_image(dir.path(), &format!("z{i}"), 8 * A);
        let e = open(&path, kind, cache);
        let full = pattern(0, 8 * A, 7);
        rt.block_on(async {
            e.write(0, IoBuf::from_slice(&full), false).await.unwrap();
            e.write_zeroes(100, 3 * A, true, true).await.unwrap();
            e.trim(5 * A - 1, 2).await.unwrap();
            e.trim(6 * A + 10, A).await.unwrap();
        });
        let mut want = full.clone();
        want[100..100 + 3 * A as usize].fill(0);
        want[5 * A as usize - 1..5 * A as usize + 1].fill(0);
        want[6 * A as usize + 10..7 * A as usize + 10].fill(0);
        drop(e);
        assert!(std::fs::read(&path).unwrap() == want, "{kind:?}/{cache:?}");
    }
}

/// A write larger than the writeback fast path's part size ([`super::WRITEBACK_CHUNK`]) lands
/// whole, at an unaligned offset and with an unaligned length, in every engine and cache mode.
#[test]
fn writes_larger_than_a_writeback_part_land_whole() {
    let dir = tempfile::tempdir_in(direct_dir()).unwrap();
    let rt = runtime();
    let (size, offset) = (1u64 << 20, 777u64);
    let len = 3 * super::WRITEBACK_CHUNK as u64 + 123;
    for (i, &(kind, cache)) in ALL.iter().enumerate() {
        let path = sparse_image(dir.path(), &format!("big{i}"), size);
        let e = open(&path, kind, cache);
        let data = pattern(offset, len, 3);
        let back = rt.block_on(async {
            e.write(offset, IoBuf::from_slice(&data), false).await.unwrap();
            e.read(offset, len as usize).await.unwrap()
        });
        assert!(back.as_slice() == data, "{kind:?}/{cache:?}: read back differs");
        drop(e);
        let mut want = vec![0u8; size as usize];
        want[offset as usize..(offset + len) as usize].copy_from_slice(&data);
        assert!(std::fs::read(&path).unwrap() == want, "{kind:?}/{cache:?}: image differs");
    }
}

/// A small xorshift generator: the concurrency test needs no shrinking, just variety.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Concurrent overlapping writes under O_DIRECT (two unaligned, so RMW, and one aligned) land
/// as if in some order: never a mix, never a lost write.
#[test]
fn concurrent_overlapping_unaligned_writes_are_atomic() {
    const IMG: u64 = 8 * A;
    let dir = tempfile::tempdir_in(direct_dir()).unwrap();
    let rt = runtime();
    for kind in [EngineKind::Sync, EngineKind::Uring] {
        let path = sparse_image(dir.path(), &format!("{kind:?}"), IMG);
        let e = open(&path, kind, CacheMode::None);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut model = vec![0u8; IMG as usize];
        for round in 0..150u64 {
            let center = A + rng.below(IMG - 2 * A);
            let mut writes = Vec::new();
            for w in 0..3u64 {
                let (offset, len) = if w == 2 {
                    let b = center / A;
                    (b * A, A * (1 + rng.below(2)).min(IMG / A - b))
                } else {
                    let offset = center - rng.below(center.min(2 * A));
                    let len = (center - offset + 1 + rng.below(2 * A)).min(IMG - offset);
                    (offset, len)
                };
                let seed = (round * 3 + w) as u8;
                writes.push((offset, pattern(offset, len, seed)));
            }
            let observed = rt.block_on(async {
                let tasks: Vec<_> = writes
                    .iter()
                    .map(|(offset, data)| {
                        let (e, offset, buf) = (e.clone(), *offset, IoBuf::from_slice(data));
                        tokio::spawn(async move { e.write(offset, buf, false).await.map(drop) })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap().unwrap();
                }
                e.read(0, IMG as usize).await.unwrap()
            });
            let orders = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]];
            let matches = orders.iter().any(|order| {
                let mut m = model.clone();
                for &i in order {
                    let (offset, data) = &writes[i];
                    m[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
                }
                m == observed.as_slice()
            });
            assert!(matches, "{kind:?} round {round}: result is no order of the writes");
            model.copy_from_slice(observed.as_slice());
        }
    }
}

/// A request dropped before completion leaves the engine usable, and the engine shuts down
/// cleanly with requests abandoned mid-flight.
#[test]
fn uring_survives_dropped_requests_and_shuts_down() {
    let dir = tempfile::tempdir_in(direct_dir()).unwrap();
    let path = sparse_image(dir.path(), "drop", 1 << 20);
    let rt = runtime();
    for cache in [CacheMode::Writeback, CacheMode::None] {
        let e = open(&path, EngineKind::Uring, cache);
        rt.block_on(async {
            for i in 0..64u64 {
                let fut = e.write(i * A, IoBuf::from_slice(&pattern(i * A, A, 3)), false);
                // Poll once (submitting it), then abandon it.
                let _ = tokio::time::timeout(std::time::Duration::ZERO, fut).await;
            }
            e.flush().await.unwrap();
            let got = e.read(0, A as usize).await.unwrap();
            assert_eq!(got.len(), A as usize);
        });
        drop(e);
    }
}

/// 4 KiB random writes, 32 in flight, sync vs io_uring, writeback and O_DIRECT. Run with
/// `cargo test -p blockferry-agent --release --lib bench_4k -- --ignored --nocapture`.
#[test]
#[ignore = "micro-benchmark, run by hand"]
fn bench_4k_random_writes() {
    const IMG: u64 = 256 << 20;
    const DEPTH: u64 = 32;
    let secs: f64 = std::env::var("BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let dir = tempfile::tempdir_in(direct_dir()).unwrap();
    let path = sparse_image(dir.path(), "bench", IMG);
    // Fill it, so the benchmark measures overwrites rather than block allocation.
    std::fs::write(&path, pattern(0, IMG, 1)).unwrap();
    let rt = runtime();
    for &(kind, cache) in &ALL {
        let e = open(&path, kind, cache);
        let ops: u64 = rt.block_on(async {
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs_f64(secs);
            let tasks: Vec<_> = (0..DEPTH)
                .map(|t| {
                    let e = e.clone();
                    tokio::spawn(async move {
                        let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ ((t + 1) * 0x9e37_79b9));
                        let mut buf = IoBuf::from_slice(&pattern(0, A, t as u8));
                        let mut n = 0u64;
                        while tokio::time::Instant::now() < deadline {
                            let offset = rng.below(IMG / A) * A;
                            buf = e.write(offset, buf, false).await.unwrap();
                            n += 1;
                        }
                        n
                    })
                })
                .collect();
            let mut total = 0;
            for t in tasks {
                total += t.await.unwrap();
            }
            e.flush().await.unwrap();
            total
        });
        println!(
            "{kind:?}/{cache:?}: {:.0} IOPS (4k random writes, depth {DEPTH})",
            ops as f64 / secs
        );
    }
}
