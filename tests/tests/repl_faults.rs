//! Replication under faults, end to end (issue 4, "kill -9 target mid-apply" and "Bad input"):
//!
//! - `kill9_target_mid_apply`: a sequence-stamping writer runs through NBD while the target is
//!   killed again and again (SIGKILL at a random moment, or its store's fault points at a random
//!   hit); after every recovery the replica holds exactly a prefix of the acknowledged write
//!   sequence (an epoch boundary), and replication resumes without a full resync.
//! - `corrupted_frames_are_detected_and_resent`: the agent flips a payload byte of every ~50th
//!   data frame after its crc32c (fault point `BLOCKFERRY_CORRUPT_FRAME_EVERY`); the target
//!   rejects those batches, they are sent again, and the replica ends byte-identical.
//! - `full_target_disk`: the target's directory is a small loop-mounted ext4; writing more than
//!   fits gets a clear ENOSPC, the agent keeps serving, the replica stays at a boundary, and
//!   after space is freed replication converges without a full resync.
//!
//! Seeds: `BLOCKFERRY_KILL_SEED` replays a kill schedule, `BLOCKFERRY_KILL_ROUNDS` (default 30)
//! sets its length.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use blockferry_tests::guards::{Loop, Mount};
use blockferry_tests::nbd::{self, Request, CMD_WRITE};
use blockferry_tests::repl::{
    check_nbd_serves, first_difference, hash_file, try_status_json, Pair, PairOpts, ProxyOpts,
};
use blockferry_tests::target::{Target, TargetOpts};
use blockferry_tests::{require_tool, run_ok, Prng};

const BLOCK: u64 = 4096;
const MAGIC: u64 = u64::from_le_bytes(*b"BFSEQ001");

// ---------------------------------------------------------------------------------------------
// A writer that stamps each block with its index, a per-block counter and a global sequence
// number, at queue depth 1: a write is acknowledged before the next is sent, so the writes
// in any epoch boundary are exactly those with sequence <= S for some S.

/// Content of block `index` written as the `counter`-th write of that block and the `seq`-th
/// write of the run.
fn seq_block(index: u64, counter: u64, seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    for (i, v) in [MAGIC, index, counter, seq].into_iter().enumerate() {
        b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    Prng::new(seq ^ index.rotate_left(32)).fill(&mut b[32..]);
    b
}

/// `(counter, seq)` of a block read back, `(0, 0)` for zeros; an error for anything torn.
fn decode_block(index: u64, b: &[u8]) -> Result<(u64, u64), String> {
    if b.iter().all(|&x| x == 0) {
        return Ok((0, 0));
    }
    let w = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
    if w(0) != MAGIC || w(1) != index {
        return Err(format!(
            "block {index}: no stamp of this block (magic {:#x}, index {})",
            w(0),
            w(1)
        ));
    }
    let (counter, seq) = (w(2), w(3));
    if b != &seq_block(index, counter, seq)[..] {
        return Err(format!("block {index}: counter {counter} seq {seq} with a torn payload"));
    }
    Ok((counter, seq))
}

#[derive(Debug, Default)]
struct SeqShared {
    /// `history[s - 1]` is the block of write `s` (pushed before the write is sent).
    history: Mutex<Vec<u32>>,
    acked: AtomicU64,
    stop: AtomicBool,
    error: Mutex<Option<String>>,
}

#[derive(Debug)]
struct SeqWriter {
    shared: Arc<SeqShared>,
    first: u64,
    blocks: u64,
    thread: Option<JoinHandle<()>>,
}

impl SeqWriter {
    /// Writes at random in blocks `first..first + blocks`, at most `iops` writes a second.
    fn start(
        addr: SocketAddr,
        export: &str,
        (first, blocks): (u64, u64),
        seed: u64,
        iops: Option<u32>,
    ) -> SeqWriter {
        let mut client = nbd::connect(addr, export, false).expect("seq writer: NBD connect");
        let shared = Arc::new(SeqShared::default());
        let sh = shared.clone();
        let thread = thread::spawn(move || {
            let mut rng = Prng::new(seed);
            let mut counters = vec![0u64; blocks as usize];
            let start = Instant::now();
            let mut sent = 0u32;
            while !sh.stop.load(SeqCst) {
                if let Some(iops) = iops {
                    let due = start + Duration::from_secs_f64(f64::from(sent) / f64::from(iops));
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        thread::sleep(wait);
                    }
                    sent += 1;
                }
                let i = rng.next_u64() % blocks;
                counters[i as usize] += 1;
                let seq = {
                    let mut h = sh.history.lock().unwrap();
                    h.push(i as u32);
                    h.len() as u64
                };
                let index = first + i;
                let data = seq_block(index, counters[i as usize], seq);
                let r = client.call(Request::new(CMD_WRITE, index * BLOCK, BLOCK as u32), &data);
                match r {
                    Ok(reply) if reply.error == 0 => sh.acked.store(seq, SeqCst),
                    Ok(reply) => {
                        *sh.error.lock().unwrap() =
                            Some(format!("write {seq} failed: {}", reply.describe_error()));
                        return;
                    }
                    Err(e) => {
                        *sh.error.lock().unwrap() = Some(format!("write {seq}: {e:#}"));
                        return;
                    }
                }
            }
        });
        SeqWriter { shared, first, blocks, thread: Some(thread) }
    }

    fn acked(&self) -> u64 {
        self.shared.acked.load(SeqCst)
    }

    fn assert_healthy(&self) {
        if let Some(e) = self.shared.error.lock().unwrap().clone() {
            panic!("the sequence writer failed: {e}");
        }
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("writer thread");
        }
        self.assert_healthy();
    }

    /// Reads the stamped region of `image` as `(counter, seq)` per block.
    fn read(&self, image: &Path) -> Result<Vec<(u64, u64)>, String> {
        let mut f = File::open(image).map_err(|e| format!("open {}: {e}", image.display()))?;
        f.seek(SeekFrom::Start(self.first * BLOCK)).map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; (self.blocks * BLOCK) as usize];
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => return Err(e.to_string()),
            }
        }
        buf[n..].fill(0); // a sparse, unextended file reads as zeros beyond its end
        buf.chunks(BLOCK as usize)
            .enumerate()
            .map(|(i, b)| decode_block(self.first + i as u64, b))
            .collect()
    }

    /// Checks that `image` holds exactly the writes with sequence <= S for some S (which it
    /// returns), and no write that was never sent. Err: how it is not.
    fn check_prefix(&self, image: &Path) -> Result<u64, String> {
        let found = self.read(image)?;
        let history = self.shared.history.lock().unwrap().clone();
        let s = found.iter().map(|f| f.1).max().unwrap_or(0);
        if s > history.len() as u64 {
            return Err(format!("write {s} is in the image but only {} were sent", history.len()));
        }
        let mut expect = vec![(0u64, 0u64); self.blocks as usize];
        for (k, &b) in history[..s as usize].iter().enumerate() {
            let e = &mut expect[b as usize];
            *e = (e.0 + 1, k as u64 + 1);
        }
        let bad: Vec<_> = (0..self.blocks as usize)
            .filter(|&i| found[i] != expect[i])
            .map(|i| (self.first + i as u64, found[i], expect[i]))
            .collect();
        if bad.is_empty() {
            Ok(s)
        } else {
            Err(format!(
                "not a prefix of the write sequence: newest write present {s}, {} blocks differ \
                 from \"all writes <= {s}\"; first (block, (counter, seq) found, expected): {:?}",
                bad.len(),
                &bad[..bad.len().min(6)]
            ))
        }
    }
}

impl Drop for SeqWriter {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers over a Pair.

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn u(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

/// `catch-up started` lines of the agent's log as `(kind, compare)`.
fn resyncs(log: &str) -> Vec<(String, bool)> {
    log.lines()
        .filter(|l| l.contains("catch-up started"))
        .map(|l| {
            let kind = l.split("kind=").nth(1).and_then(|r| r.split_whitespace().next());
            (kind.unwrap_or("?").to_string(), l.contains("compare=true"))
        })
        .collect()
}

/// Every resync after the first `skip` (at least 1) is an incremental catch-up: no initial
/// sync and no full comparison again.
fn assert_no_full_resync(pair: &Pair, skip: usize, context: &str) -> Vec<(String, bool)> {
    let r = resyncs(&pair.agent.log_text());
    let full: Vec<_> = r.iter().skip(skip.max(1)).filter(|(k, c)| k == "Initial" || *c).collect();
    assert!(
        full.is_empty(),
        "a full resync after the first ({context}): {r:?}\n{}",
        pair.describe()
    );
    r
}

/// Waits until the target has an open session for the volume that recovered its store:
/// connected, and applied == committed. The restarted target is armed with the next round's
/// fault point; if that point is hit already during recovery (the target exits with 86), the
/// target is started again unarmed: that kill came early, which is fine, but this round needs
/// a live target.
fn wait_target_recovered(pair: &mut Pair, limit: Duration) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        if !pair.target.is_alive() {
            eprintln!("the target exited at its fault point during recovery; starting it unarmed");
            restart_target(pair, Vec::new());
        }
        let all = try_status_json(&pair.target_admin).ok();
        let t = all.as_ref().and_then(|all| {
            all["volumes"].as_array()?.iter().find(|v| v["volume"] == pair.name.as_str()).cloned()
        });
        if let Some(t) = t {
            if t["connected"] == true && t["applied_epoch"] == t["last_committed_epoch"] {
                return t;
            }
        }
        if Instant::now() > deadline {
            panic!("the target did not recover within {limit:?}\n{}", pair.describe());
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// With the link blackholed, waits until the target's applied epoch is its committed one on
/// three polls in a row (nothing in flight can commit any more), and returns it.
fn wait_target_quiet(pair: &mut Pair, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    let mut last = None;
    let mut same = 0;
    loop {
        if !pair.target.is_alive() {
            // The armed fault point was hit by batches still in flight when the link was cut:
            // that kill came early. Recover the target unarmed (it needs the link to open its
            // store), then cut the link again.
            eprintln!("the target exited at its fault point while settling; starting it unarmed");
            pair.proxy().blackhole(false);
            restart_target(pair, Vec::new());
            wait_target_recovered(pair, Duration::from_secs(90));
            pair.proxy().blackhole(true);
            last = None;
            same = 0;
            continue;
        }
        let Some(t) = try_status_json(&pair.target_admin).ok().and_then(|all| {
            all["volumes"].as_array()?.iter().find(|v| v["volume"] == pair.name.as_str()).cloned()
        }) else {
            if Instant::now() > deadline {
                panic!("the target did not answer within {limit:?}\n{}", pair.describe());
            }
            thread::sleep(Duration::from_millis(100));
            continue;
        };
        let now = (u(&t, "applied_epoch"), u(&t, "last_committed_epoch"));
        same = if now.0 == now.1 && Some(now) == last { same + 1 } else { 0 };
        last = Some(now);
        if same >= 2 {
            return now.0;
        }
        if Instant::now() > deadline {
            panic!("the target did not settle within {limit:?}\n{}", pair.describe());
        }
        thread::sleep(Duration::from_millis(150));
    }
}

fn wait_until(what: &str, limit: Duration, pair: &Pair, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}\n{}", pair.describe());
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Starts the pair's target again on the same address and directory, with `env`.
fn restart_target(pair: &mut Pair, env: Vec<(String, String)>) {
    pair.target.kill9();
    let mut opts = TargetOpts::new(&pair.target.dir, &pair.target_keys, &pair.agent_fp);
    opts.listen = Some(pair.target.addr);
    opts.admin = Some(pair.target_admin.clone());
    opts.env = env;
    let old = std::mem::replace(&mut pair.target, Target::start(opts));
    drop(old);
}

// ---------------------------------------------------------------------------------------------
// kill -9 target mid-apply

// The points hit only while batches arrive and apply. `target.image.sync` and
// `target.meta.write` are also hit at every session start (and at recovery), where an armed
// target would die before the round began; those steps are covered by SIGKILL at random moments
// here and by the store's power-cut test (a cut after every storage step).
const FAULT_POINTS: [&str; 3] =
    ["target.journal.append", "target.journal.sync", "target.image.write"];

#[derive(Debug, Clone)]
enum Kill {
    Signal { after_ms: u64 },
    Point { name: &'static str, nth: u64 },
}

fn pick_kill(rng: &mut Prng, round: u64) -> Kill {
    // One round in three dies at a store fault point, exactly between two steps of an apply.
    if round % 3 == 2 {
        let name = FAULT_POINTS[(rng.next_u64() % FAULT_POINTS.len() as u64) as usize];
        Kill::Point { name, nth: 1 + rng.next_u64() % 40 }
    } else {
        Kill::Signal { after_ms: 150 + rng.next_u64() % 1500 }
    }
}

fn kill_env(k: &Kill) -> Vec<(String, String)> {
    match k {
        Kill::Point { name, nth } => {
            vec![("BLOCKFERRY_FAILPOINTS".into(), format!("{name}=exit@{nth}"))]
        }
        Kill::Signal { .. } => vec![],
    }
}

#[test]
fn kill9_target_mid_apply() {
    let rounds = env_u64("BLOCKFERRY_KILL_ROUNDS").unwrap_or(30);
    let seed = env_u64("BLOCKFERRY_KILL_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
            as u64
            % 1_000_000_007
    });
    eprintln!("kill9_target_mid_apply: seed {seed} (BLOCKFERRY_KILL_SEED={seed} replays), {rounds} rounds");
    let mut rng = Prng::new(seed);

    let mut opts = PairOpts::new("64M");
    opts.epoch_interval_ms = Some(200);
    opts.via_proxy = Some(ProxyOpts { seed, ..ProxyOpts::default() });
    let mut pair = Pair::start(opts);
    pair.wait_in_sync_and_idle(Duration::from_secs(120));
    let _ = pair.replica_image_path(); // found while the target runs
    let region = (0u64, 4096u64); // 16 MiB of the 64 MiB volume
    let mut writer = SeqWriter::start(pair.nbd_addr(), &pair.name, region, seed, Some(500));

    let mut next = pick_kill(&mut rng, 0);
    if matches!(next, Kill::Point { .. }) {
        restart_target(&mut pair, kill_env(&next));
    }
    let mut torn_before_recovery = 0;
    let mut failpoint_hits = 0;
    let mut total_resent_over = 0u64;
    eprintln!(
        "round | kill                          | image before restart        | recovered epoch | prefix S | writes | data sent | excess"
    );
    let mut last_recovered = u(&pair.target_status().expect("replica"), "last_committed_epoch");
    for round in 0..rounds {
        let a0 = pair.agent_status();
        let w0 = writer.acked();
        // Kill while epochs commit and apply: first see one more commit than last time.
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let committed = try_status_json(&pair.target_admin).ok().and_then(|all| {
                let v =
                    all["volumes"].as_array()?.iter().find(|v| v["volume"] == *pair.name)?.clone();
                Some(u(&v, "last_committed_epoch"))
            });
            if !pair.target.is_alive() || committed.is_some_and(|c| c > last_recovered) {
                break;
            }
            assert!(Instant::now() < deadline, "no commit within 90 s\n{}", pair.describe());
            thread::sleep(Duration::from_millis(50));
        }
        let kill = next.clone();
        match &kill {
            Kill::Signal { after_ms } => {
                thread::sleep(Duration::from_millis(*after_ms));
                pair.target.kill9();
            }
            Kill::Point { .. } => {
                let deadline = Instant::now() + Duration::from_secs(20);
                while pair.target.is_alive() && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(20));
                }
                pair.target.kill9(); // not reached in time: a plain SIGKILL
            }
        }
        writer.assert_healthy();
        let hit = matches!(kill, Kill::Point { .. })
            && pair.target.log_text().matches("failpoint ").count() > failpoint_hits;
        failpoint_hits = pair.target.log_text().matches("failpoint ").count();
        // The image as the crash left it: possibly mid-apply; recovery must fix that.
        let image = pair.replica_image_path();
        let before = match writer.check_prefix(&image) {
            Ok(s) => format!("at boundary (S={s})"),
            Err(e) => {
                torn_before_recovery += 1;
                format!("torn ({})", e.chars().take(14).collect::<String>())
            }
        };
        next = pick_kill(&mut rng, round + 1);
        restart_target(&mut pair, kill_env(&next));
        let t = wait_target_recovered(&mut pair, Duration::from_secs(90));
        let recovered = u(&t, "last_committed_epoch");
        last_recovered = recovered;
        // Freeze the replica at a boundary: cut the link, let what is committed be applied,
        // read the image, then heal.
        pair.proxy().blackhole(true);
        let applied = wait_target_quiet(&mut pair, Duration::from_secs(30));
        let checked = writer.check_prefix(&image);
        pair.proxy().blackhole(false);
        let s = checked.unwrap_or_else(|e| {
            panic!(
                "round {round} (seed {seed}, {kill:?}): after recovery at epoch {applied}: {e}\n{}",
                pair.describe()
            )
        });
        assert!(
            s <= writer.acked() + 1,
            "round {round}: write {s} present, {} acked",
            writer.acked()
        );
        wait_until("the agent to reconnect", Duration::from_secs(60), &pair, || {
            pair.agent_status()["state"] != "disconnected"
        });
        let a1 = pair.agent_status();
        let written = (writer.acked() - w0) * BLOCK;
        let sent = u(&a1, "data_bytes_sent") - u(&a0, "data_bytes_sent");
        let excess = sent.saturating_sub(written);
        total_resent_over += excess;
        let kill_s = match &kill {
            Kill::Signal { after_ms } => format!("SIGKILL after {after_ms} ms"),
            Kill::Point { name, nth } => {
                format!("{name}@{nth}{}", if hit { "" } else { " (not hit: SIGKILL)" })
            }
        };
        eprintln!(
            "{round:>5} | {kill_s:<29} | {before:<27} | {recovered:>15} | {s:>8} | {:>6} | {:>9} | {excess:>6}",
            (writer.acked() - w0),
            sent
        );
        // Incremental only: at most what was written since the round began plus the backlog
        // at its start (retained epochs are sent again, dirty blocks caught up), never the
        // volume again.
        // Epochs framed towards the dead target before the agent notices (QUIC idle timeout)
        // count as sent and are sent again after the reconnect: allow everything twice.
        let backlog = u(&a0, "buffered_bytes") + u(&a0, "lag_bytes");
        assert!(
            sent <= 2 * (written + backlog) + (16 << 20),
            "round {round}: {sent} bytes sent for {written} bytes written: a full resync?\n{}",
            pair.describe()
        );
        assert_no_full_resync(&pair, 1, &format!("round {round}"));
    }
    writer.stop();
    let (a, took) = pair.wait_in_sync_and_idle(Duration::from_secs(180));
    let src = hash_file(&pair.source_image());
    let dst = hash_file(&pair.replica_image_path());
    assert_eq!(
        src,
        dst,
        "source and replica differ after quiescing: {:?}\n{}",
        first_difference(&pair.source_image(), &pair.replica_image_path()),
        pair.describe()
    );
    let r = assert_no_full_resync(&pair, 1, "at the end");
    eprintln!(
        "kill9_target_mid_apply: seed {seed}: {rounds} rounds, {} writes, {failpoint_hits} fault-point exits, \
         {torn_before_recovery} images mid-apply before recovery (all recovered to a prefix), 0 misses; \
         {} bytes sent beyond the bytes written; {} resyncs ({:?}); in sync {took:?} after the writer stopped \
         (commits {}, connects {}); source == replica ({src})",
        writer.acked(),
        total_resent_over,
        r.len(),
        r.iter().map(|(k, c)| format!("{k}{}", if *c { "+compare" } else { "" })).collect::<Vec<_>>(),
        u(&a, "commits"),
        u(&a, "connects"),
    );
}

trait ReplicaPath {
    fn replica_image_path(&self) -> PathBuf;
}

impl ReplicaPath for Pair {
    /// The replica image, found once through status and then by path (the target may be dead).
    fn replica_image_path(&self) -> PathBuf {
        static CACHE: Mutex<Option<HashMap<PathBuf, PathBuf>>> = Mutex::new(None);
        let mut c = CACHE.lock().unwrap();
        let map = c.get_or_insert_with(HashMap::new);
        map.entry(self.target.dir.clone()).or_insert_with(|| self.replica_image()).clone()
    }
}

// ---------------------------------------------------------------------------------------------
// Corrupted frames

#[test]
fn corrupted_frames_are_detected_and_resent() {
    let mut opts = PairOpts::new("64M");
    opts.epoch_interval_ms = Some(200);
    opts.agent_env = vec![("BLOCKFERRY_CORRUPT_FRAME_EVERY".into(), "50".into())];
    // Compression off: every payload byte is data (with lz4 a flip may also break decoding,
    // which the target reports the same way).
    opts.agent_extra = vec!["--compression".into(), "off".into()];
    let pair = Pair::start(opts);
    pair.wait_in_sync_and_idle(Duration::from_secs(120));
    // A slow writer: each corrupted frame makes the agent reconnect and send its whole backlog
    // again, and a deterministic "every 50th frame" always hits a backlog of 50 frames or more,
    // so the backlog must stay small for a clean pass to be possible (see the report on the
    // all-or-nothing resend).
    let mut writer = SeqWriter::start(pair.nbd_addr(), &pair.name, (0, 8192), 7, Some(40));
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut checks = 0;
    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(700));
        writer.assert_healthy();
        checks += 1;
    }
    writer.stop();
    let (a, took) = pair.wait_in_sync_and_idle(Duration::from_secs(120));
    let t = pair.target_status().expect("replica");
    let flips = pair.agent.log_text().matches("failpoint repl.corrupt_frame").count();
    let rejected = u(&t, "rejected_batches");
    let target_log = pair.target.log_text();
    let mismatch_lines = target_log.lines().filter(|l| l.contains("checksum mismatch")).count();
    assert!(flips > 0, "the fault point never fired\n{}", pair.describe());
    assert!(rejected > 0, "no batch rejected after {flips} corrupted frames\n{}", pair.describe());
    assert!(
        mismatch_lines > 0 || pair.agent.log_text().contains("checksum mismatch"),
        "no log line names the checksum mismatch\n{}",
        pair.describe()
    );
    let src = hash_file(&pair.source_image());
    let image = pair.replica_image();
    let dst = hash_file(&image);
    assert_eq!(
        src,
        dst,
        "{:?}\n{}",
        first_difference(&pair.source_image(), &image),
        pair.describe()
    );
    writer.check_prefix(&image).expect("replica is the whole sequence");
    eprintln!(
        "corrupted frames: {} writes, {flips} frames corrupted by the agent, {rejected} batches \
         rejected by the target ({mismatch_lines} target log lines), {} bytes sent for {} written; \
         in sync {took:?} after the writer stopped; source == replica ({src}) [{checks} checks]",
        writer.acked(),
        u(&a, "data_bytes_sent"),
        writer.acked() * BLOCK,
    );
}

// ---------------------------------------------------------------------------------------------
// Full target disk

#[test]
fn full_target_disk() {
    for tool in ["truncate", "mkfs.ext4", "losetup", "mount", "umount"] {
        require_tool(tool);
    }
    let fs_dir = blockferry_tests::tempdir();
    let backing = fs_dir.path().join("fs.img");
    run_ok(Command::new("truncate").arg("-s").arg("64M").arg(&backing), Duration::from_secs(30));
    run_ok(
        Command::new("mkfs.ext4").args(["-q", "-F", "-m", "0"]).arg(&backing),
        Duration::from_secs(60),
    );
    // Guards in creation order: dropped in reverse (unmount, then detach), also on panic.
    let lo = Loop::attach(&backing);
    let mnt = Mount::new(&lo.device, &fs_dir.path().join("mnt"));
    let ballast = mnt.target.join("ballast");
    {
        let mut f = File::create(&ballast).unwrap();
        let chunk = vec![0xa5u8; 1 << 20];
        for _ in 0..24 {
            std::io::Write::write_all(&mut f, &chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    let df = |p: &Path| {
        run_ok(Command::new("df").args(["-B1", "--output=avail"]).arg(p), Duration::from_secs(10))
            .stdout
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    eprintln!("full disk: 64 MiB ext4 with a 24 MiB ballast: {} bytes free", df(&mnt.target));

    let mut opts = PairOpts::new("256M");
    opts.epoch_interval_ms = Some(200);
    opts.agent_extra = vec!["--compression".into(), "off".into()];
    let mut pair = Pair::start(opts);
    // The target's directory on the small file system.
    restart_target_in(&mut pair, &mnt.target.join("replicas"));
    pair.wait_in_sync_and_idle(Duration::from_secs(120));
    // The initial syncs into the first and into this directory are expected; none after.
    let initial = resyncs(&pair.agent.log_text()).len();

    // 32 MiB of stamped blocks, sequentially at queue depth 1: more than the ~30 MB left, but
    // with the journal (at most a 16 MiB segment beyond what is not applied yet) it fits in the
    // ~55 MB the file system has once the ballast is gone.
    let blocks = 8192u64;
    let mut c = pair.nbd();
    let chunk = 64u64; // blocks per write (256 KiB)
    let t0 = Instant::now();
    let mut i = 0;
    let mut first_err_at = None;
    while i < blocks {
        let mut data = Vec::with_capacity((chunk * BLOCK) as usize);
        for k in i..i + chunk {
            data.extend_from_slice(&seq_block(k, 1, k + 1));
        }
        c.write(i * BLOCK, &data, 0).unwrap_or_else(|e| {
            panic!(
                "the agent failed a write at block {i} while the target is full: {e:#}\n{}",
                pair.describe()
            )
        });
        i += chunk;
        if first_err_at.is_none() {
            let a = pair.agent_status();
            if a["last_error"].as_str().is_some_and(|e| e.to_lowercase().contains("space")) {
                first_err_at = Some(i);
            }
        }
    }
    let wrote = t0.elapsed();
    // The target says so, clearly, on both sides.
    wait_until("ENOSPC reported by the agent", Duration::from_secs(60), &pair, || {
        pair.agent_status()["last_error"]
            .as_str()
            .is_some_and(|e| e.to_lowercase().contains("space"))
    });
    let a = pair.agent_status();
    let t = pair.target_status().expect("replica");
    let agent_err = a["last_error"].as_str().unwrap_or_default().to_string();
    let target_err = t["last_error"].as_str().unwrap_or_default().to_string();
    let log_lines: Vec<String> = pair
        .target
        .log_text()
        .lines()
        .filter(|l| l.to_lowercase().contains("no space"))
        .map(str::to_string)
        .collect();
    assert!(!log_lines.is_empty(), "the target logs no ENOSPC line\n{}", pair.describe());
    // The agent goes on serving, and the replica is at a boundary: blocks 0..K stamped, the
    // rest zero (writes were sequential at queue depth 1).
    check_nbd_serves(&pair, 200 << 20);
    pair.agent.assert_alive("with the target's disk full");
    let image = pair.replica_image();
    let k = replica_prefix(&image, blocks).unwrap_or_else(|e| panic!("{e}\n{}", pair.describe()));
    eprintln!(
        "full disk: wrote {} MiB in {wrote:?} (agent saw ENOSPC after block {first_err_at:?}); agent: \
         state {} last_error {agent_err:?}; target: state {} last_error {target_err:?}, {} \"no space\" \
         log lines, e.g. {:?}; replica at a boundary with {k} of {blocks} blocks; {} bytes free",
        (blocks * BLOCK) >> 20,
        a["state"],
        t["state"],
        log_lines.len(),
        log_lines.first(),
        df(&mnt.target),
    );
    assert!(k < blocks, "everything fitted: the test did not fill the disk");

    std::fs::remove_file(&ballast).unwrap();
    eprintln!("full disk: ballast removed: {} bytes free", df(&mnt.target));
    let (a, took) = pair.wait_in_sync_and_idle(Duration::from_secs(300));
    let src = hash_file(&pair.source_image());
    let dst = hash_file(&image);
    assert_eq!(
        src,
        dst,
        "{:?}\n{}",
        first_difference(&pair.source_image(), &image),
        pair.describe()
    );
    let r = assert_no_full_resync(&pair, initial, "after the disk was full");
    eprintln!(
        "full disk: converged {took:?} after space was freed; {} bytes sent in all for {} written; \
         resyncs {r:?}; last_error now {:?}; {} bytes free; source == replica",
        u(&a, "data_bytes_sent"),
        blocks * BLOCK + 4096,
        a["last_error"],
        df(&mnt.target),
    );
    drop(pair);
    drop(mnt);
    drop(lo);
}

/// Moves the pair's target to `dir` (a fresh replica directory): kills it and starts it there
/// on the same address, so the agent reconnects and syncs into it.
fn restart_target_in(pair: &mut Pair, dir: &Path) {
    pair.target.kill9();
    let mut opts = TargetOpts::new(dir, &pair.target_keys, &pair.agent_fp);
    opts.listen = Some(pair.target.addr);
    opts.admin = Some(pair.target_admin.clone());
    let old = std::mem::replace(&mut pair.target, Target::start(opts));
    drop(old);
}

/// The number K of leading blocks stamped (counter 1) when every later block is zero; Err if
/// the image is not such a prefix.
fn replica_prefix(image: &Path, blocks: u64) -> Result<u64, String> {
    let mut f = File::open(image).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; (blocks * BLOCK) as usize];
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(e.to_string()),
        }
    }
    buf[n..].fill(0);
    let mut k = None;
    for (i, b) in buf.chunks(BLOCK as usize).enumerate() {
        let got = decode_block(i as u64, b)?;
        match (got, k) {
            ((1, _), None) => {}
            ((0, 0), None) => k = Some(i as u64),
            ((0, 0), Some(_)) => {}
            _ => {
                return Err(format!(
                    "replica not at a boundary: block {i} is {got:?} after {k:?} leading blocks"
                ))
            }
        }
    }
    Ok(k.unwrap_or(blocks))
}
