//! Synchronous replication end to end, with real processes (issue 5): an agent serving a sync
//! volume over NBD and a target, with the impairment proxy between them where a test cuts the
//! link.
//!
//! - `loss_of_the_primary`: a stamping writer runs on a sync volume; the agent is killed
//!   (SIGKILL) at a random moment and its image deleted; the target, once it has sealed the
//!   dead session, must hold every acknowledged write (and nothing never written).
//! - `degrade_under_partition`, `degrade_when_acknowledgements_are_lost`: the link is
//!   blackholed, or only what the target sends is lost; writes go on (degraded), status says so
//!   and shows the RPO; after healing the volume is in sync again by itself, having sent only
//!   the blocks written meanwhile.
//! - `block_under_partition`, `block_when_acknowledgements_are_lost`: no write is acknowledged
//!   while the link is cut; writes fail with EIO after the block timeout; the service resumes
//!   after healing.
//! - `set_mode_both_ways_under_load`: async -> sync -> async -> sync while a writer runs, then
//!   the primary is lost: every write acknowledged in sync mode is at the target.
//!
//! Seeds are printed; `BLOCKFERRY_SYNC_SEED` replays one, `BLOCKFERRY_SYNC_ROUNDS` (default 2)
//! sets the primary-loss rounds (the acceptance run used 50). Run with
//! `cargo test --release -p blockferry-tests --test repl_sync -- --nocapture --test-threads=1`.

use std::thread;
use std::time::{Duration, Instant};

use blockferry_tests::nbd::{Request, CMD_WRITE};
use blockferry_tests::repl::{
    blockferry_ok, changed_blocks, try_status_json, Pair, PairOpts, ProxyOpts, StampLayout,
    StampOpts, StampWriter, STAMP_BLOCK,
};
use blockferry_tests::Prng;
use serde_json::Value;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

fn seed() -> u64 {
    env_u64("BLOCKFERRY_SYNC_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
            as u64
    })
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("no number {k} in {v}"))
}

/// A sync pair: short epochs, short time-outs, so that the tests run in seconds.
fn sync_opts(policy: &str, extra: &[&str]) -> PairOpts {
    let mut o = PairOpts::new("64M");
    o.mode = "sync".into();
    o.epoch_interval_ms = Some(200);
    o.agent_extra = ["--on-disconnect", policy, "--ack-timeout-ms", "1000"]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
    o
}

/// The target's status element of the pair's volume, if it answers and has one.
fn target_volume(pair: &Pair) -> Option<Value> {
    let all = try_status_json(&pair.target_admin).ok()?;
    all["volumes"].as_array()?.iter().find(|v| v["volume"] == pair.name.as_str()).cloned()
}

/// Waits until the target no longer has the agent's session and has applied what it
/// committed (after the session ended, the open sync batch is sealed and committed).
fn wait_session_over(pair: &Pair, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    let mut good = 0;
    loop {
        if let Some(t) = target_volume(pair) {
            let quiet = t["connected"] == false && t["applied_epoch"] == t["last_committed_epoch"];
            good = if quiet { good + 1 } else { 0 };
            if good >= 2 {
                return t;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the target did not end the dead agent's session within {limit:?}\n{}",
            pair.describe()
        );
        thread::sleep(Duration::from_millis(200));
    }
}

fn kill9_agent(pair: &mut Pair) {
    let pid = rustix::process::Pid::from_raw(pair.agent.pid() as i32).expect("pid > 0");
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    assert!(pair.agent.wait_exit(Duration::from_secs(30)).is_some(), "the agent survived SIGKILL");
}

// ---------------------------------------------------------------------------------------------
// Loss of the primary site

#[test]
fn loss_of_the_primary() {
    let seed = seed();
    let rounds = env_u64("BLOCKFERRY_SYNC_ROUNDS").unwrap_or(2);
    eprintln!(
        "loss_of_the_primary: seed {seed} (BLOCKFERRY_SYNC_SEED={seed} replays), {rounds} rounds"
    );
    let mut rng = Prng::new(seed);
    println!(
        "round | writes acked | killed after | blocks at the target: newer than acked / equal"
    );
    let mut total_writes = 0;
    for round in 0..rounds {
        let mut pair = Pair::start(sync_opts("degrade", &[]));
        pair.wait_state("in-sync", Duration::from_secs(60));
        let mut so = StampOpts::new(0..2048);
        so.queue_depth = 1 + (rng.next_u64() % 16) as usize;
        so.seed = rng.next_u64();
        let writer = StampWriter::start(pair.nbd_addr(), &pair.name, so);
        let after = Duration::from_millis(300 + rng.next_u64() % 2500);
        thread::sleep(after);
        writer.assert_healthy("before the kill");
        kill9_agent(&mut pair);
        // Every reply the writer got was sent before the agent died.
        thread::sleep(Duration::from_millis(100));
        let acked = writer.acked();
        let issued = writer.issued();
        let layout = writer.layout;
        let writes = writer.writes();
        drop(writer);
        std::fs::remove_file(pair.source_image()).expect("delete the source image");
        // The target notices the dead session (QUIC idle time-out), seals the open sync
        // batch, commits and applies.
        wait_session_over(&pair, Duration::from_secs(60));
        let found =
            layout.verify_between(&pair.replica_image(), &acked, &issued).unwrap_or_else(|e| {
                panic!(
                    "round {round} (seed {seed}): acknowledged writes missing: {e}\n{}",
                    pair.describe()
                )
            });
        let newer = found.iter().zip(&acked).filter(|(f, a)| f > a).count();
        let equal = found.iter().zip(&acked).filter(|(f, a)| f == a && **a > 0).count();
        println!("{round:>5} | {writes:>12} | {:>10.2}s | {newer} / {equal}", after.as_secs_f64());
        assert!(writes > 0, "round {round}: no write was acknowledged\n{}", pair.describe());
        total_writes += writes;
    }
    println!("loss_of_the_primary: {rounds} rounds, {total_writes} acknowledged writes, 0 missing");
}

// ---------------------------------------------------------------------------------------------
// Partition, policy degrade

/// How a test cuts the link (impairment proxy control commands).
#[derive(Debug, Clone, Copy)]
struct Cut {
    name: &'static str,
    on: &'static str,
    off: &'static str,
}

/// Nothing passes either way.
const BLACKHOLE: Cut = Cut { name: "blackhole", on: "blackhole on", off: "blackhole off" };
/// The target receives everything, the agent nothing: its acknowledgements are lost.
const ACKS_LOST: Cut = Cut { name: "acknowledgements lost", on: "loss 0 1", off: "loss 0 0" };

#[test]
fn degrade_under_partition() {
    degrade_case(BLACKHOLE);
}

#[test]
fn degrade_when_acknowledgements_are_lost() {
    degrade_case(ACKS_LOST);
}

fn degrade_case(cut_how: Cut) {
    let mut o = sync_opts("degrade", &[]);
    o.via_proxy = Some(ProxyOpts::default());
    let pair = Pair::start(o);
    pair.wait_state("in-sync", Duration::from_secs(60));
    let mut so = StampOpts::new(0..4096);
    so.queue_depth = 4;
    so.max_iops = Some(300);
    let writer = StampWriter::start(pair.nbd_addr(), &pair.name, so);
    thread::sleep(Duration::from_secs(1));
    let early = writer.acked();
    thread::sleep(Duration::from_secs(1));
    writer.assert_healthy("in sync");
    let at_cut = writer.acked();
    pair.proxy().control(cut_how.on);
    let cut = Instant::now();
    let st = pair.wait_state("degraded", Duration::from_secs(15));
    let to_degraded = cut.elapsed();
    assert!(st["reason"].as_str().is_some_and(|r| !r.is_empty()), "no reason shown: {st}");
    // Writes go on, locally.
    let w0 = writer.writes();
    thread::sleep(Duration::from_secs(2));
    writer.assert_healthy("degraded");
    let during = writer.writes() - w0;
    assert!(during > 100, "only {during} writes in 2 s while degraded\n{}", pair.describe());
    let st = pair.agent_status();
    let rpo = st["rpo_seconds"].as_f64().unwrap_or(0.0);
    assert!(rpo >= 1.0, "degraded for 2 s, but the RPO shows {rpo}: {st}");
    let table = blockferry_ok(
        &["status", "--admin", pair.agent_admin.to_str().unwrap()],
        Duration::from_secs(30),
    );
    assert!(
        table.stdout.contains("sync/degrade") && table.stdout.contains("degraded"),
        "status table: {table}"
    );
    let run = writer.stop();
    let sent_before = u(&pair.agent_status(), "data_bytes_sent");
    pair.proxy().control(cut_how.off);
    let healed = Instant::now();
    pair.wait_state("in-sync", Duration::from_secs(60));
    let to_in_sync = healed.elapsed();
    let (_, idle) = pair.wait_in_sync_and_idle(Duration::from_secs(60));
    let resent = u(&pair.agent_status(), "data_bytes_sent") - sent_before;
    run.verify_exact(&pair.replica_image())
        .unwrap_or_else(|e| panic!("replica after healing: {e}\n{}", pair.describe()));
    // Only what was written since the cut (and in the last epochs before it, which the
    // target had not committed yet) is sent again.
    let changed = changed_blocks(&at_cut, &run.acked) * STAMP_BLOCK;
    let changed_early = changed_blocks(&early, &run.acked) * STAMP_BLOCK;
    println!(
        "degrade, {}: degraded {:.2?} after the cut; {during} writes in 2 s while degraded, RPO {rpo:.1} s; \
         in-sync {:.2?} after healing (idle after {idle:.2?}); catch-up sent {} KiB for {} KiB \
         written during the cut ({} KiB since 1 s before it)",
        cut_how.name,
        to_degraded,
        to_in_sync,
        resent / 1024,
        changed / 1024,
        changed_early / 1024
    );
    println!("{}", pair.warnings(20));
    assert!(
        resent >= changed && resent <= changed_early + (1 << 20),
        "the catch-up sent {resent} bytes; blocks changed during the cut: {changed} bytes, since \
         1 s before it: {changed_early} bytes\n{}",
        pair.describe()
    );
}

// ---------------------------------------------------------------------------------------------
// Partition, policy block

/// One write of the block-policy writer: when it was sent, when answered, and how.
#[derive(Debug, Clone, Copy)]
struct Done {
    sent: Instant,
    answered: Instant,
    ok: bool,
}

#[test]
fn block_under_partition() {
    block_case(BLACKHOLE);
}

#[test]
fn block_when_acknowledgements_are_lost() {
    block_case(ACKS_LOST);
}

fn block_case(cut_how: Cut) {
    let block_timeout = Duration::from_millis(2000);
    let mut o = sync_opts("block", &["--block-timeout-ms", "2000"]);
    o.via_proxy = Some(ProxyOpts::default());
    let pair = Pair::start(o);
    pair.wait_state("in-sync", Duration::from_secs(60));
    // One write at a time, noting each answer.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Done>::new()));
    // Four connections (multi-conn), one write at a time each, on their own blocks.
    let run_id = seed() | 1;
    let writers: Vec<_> = (0..4u64)
        .map(|k| {
            let layout = StampLayout { run_id, first: k * 256, blocks: 256 };
            let (stop, log) = (stop.clone(), log.clone());
            let mut client = pair.nbd();
            thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let i = layout.first + n % layout.blocks;
                    let data = layout.block(i, n / layout.blocks + 1);
                    let sent = Instant::now();
                    let r = client
                        .call(Request::new(CMD_WRITE, i * STAMP_BLOCK, STAMP_BLOCK as u32), &data)
                        .expect("the NBD connection stays up");
                    let done = Done { sent, answered: Instant::now(), ok: r.error == 0 };
                    log.lock().unwrap().push(done);
                    n += 1;
                    thread::sleep(Duration::from_millis(5));
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_secs(1));
    pair.proxy().control(cut_how.on);
    let cut = Instant::now();
    pair.wait_state("blocked", Duration::from_secs(15));
    let to_blocked = cut.elapsed();
    thread::sleep(Duration::from_secs(3));
    let st = pair.agent_status();
    pair.proxy().control(cut_how.off);
    let healed = Instant::now();
    pair.wait_state("in-sync", Duration::from_secs(60));
    let to_in_sync = healed.elapsed();
    thread::sleep(Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.join().expect("a writer thread");
    }
    let log = log.lock().unwrap().clone();
    // Sent after the cut (with a margin for answers on the way) and answered before healing:
    // none may succeed.
    let margin = Duration::from_millis(100);
    let cut_writes: Vec<&Done> =
        log.iter().filter(|d| d.sent > cut + margin && d.answered < healed).collect();
    let acked = cut_writes.iter().filter(|d| d.ok).count();
    let failed: Vec<&&Done> = cut_writes.iter().filter(|d| !d.ok).collect();
    let waited: Vec<Duration> = failed.iter().map(|d| d.answered - d.sent).collect();
    let after: Vec<&Done> = log.iter().filter(|d| d.sent > healed + to_in_sync).collect();
    let after_ok = after.iter().filter(|d| d.ok).count();
    println!(
        "block, {}: blocked {to_blocked:.2?} after the cut; {} writes answered during the cut: {acked} \
         acknowledged, {} failed with EIO after {:.2?}..{:.2?} (block-timeout {block_timeout:?}); \
         in-sync {to_in_sync:.2?} after healing; {after_ok} of {} writes acknowledged since",
        cut_how.name,
        cut_writes.len(),
        failed.len(),
        waited.iter().min().copied().unwrap_or_default(),
        waited.iter().max().copied().unwrap_or_default(),
        after.len()
    );
    assert_eq!(acked, 0, "writes acknowledged while the target was cut off\n{}", pair.describe());
    assert!(!failed.is_empty(), "no write failed during the cut\n{}", pair.describe());
    assert!(
        waited.iter().all(|w| *w >= block_timeout - Duration::from_millis(50)),
        "writes failed before the block timeout: {waited:?}"
    );
    assert!(u(&st, "sync_failed") > 0, "status counts no failed write: {st}");
    assert!(
        after_ok > 0 && after_ok == after.len(),
        "the service did not resume: {after_ok} of {}\n{}",
        after.len(),
        pair.describe()
    );
    pair.wait_in_sync_and_idle(Duration::from_secs(60));
    let (src, rep) = (pair.source_image(), pair.replica_image());
    assert_eq!(
        blockferry_tests::repl::hash_file(&src),
        blockferry_tests::repl::hash_file(&rep),
        "the replica differs from the source after healing\n{}",
        pair.describe()
    );
}

// ---------------------------------------------------------------------------------------------
// Live mode switches

fn set_mode(pair: &Pair, mode: &str) -> Value {
    let out = blockferry_ok(
        &[
            "volume",
            "set-mode",
            &pair.name,
            mode,
            "--admin",
            pair.agent_admin.to_str().unwrap(),
            "--json",
        ],
        Duration::from_secs(30),
    );
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("set-mode printed {out}: {e}"))
}

#[test]
fn set_mode_both_ways_under_load() {
    let seed = seed();
    eprintln!("set_mode_both_ways_under_load: seed {seed}");
    let mut o = PairOpts::new("64M");
    o.epoch_interval_ms = Some(200);
    let mut pair = Pair::start(o);
    pair.wait_state("in-sync", Duration::from_secs(60));
    let mut so = StampOpts::new(0..2048);
    so.queue_depth = 8;
    so.max_iops = Some(1000);
    so.seed = seed;
    let writer = StampWriter::start(pair.nbd_addr(), &pair.name, so);
    let mut figures = Vec::new();
    for round in 0..2 {
        thread::sleep(Duration::from_secs(1));
        let v = set_mode(&pair, "sync");
        assert_eq!(
            (v["previous"].as_str(), v["mode"].as_str()),
            (Some("async"), Some("sync")),
            "{v}"
        );
        let t = Instant::now();
        let st = pair.wait_agent("sync and in-sync", Duration::from_secs(30), |s| {
            s["mode"] == "sync" && s["state"] == "in-sync"
        });
        figures.push(format!(
            "to sync: in-sync after {:.2?} (answered {})",
            t.elapsed(),
            v["state"]
        ));
        let w0 = writer.writes();
        thread::sleep(Duration::from_secs(1));
        writer.assert_healthy("in sync mode");
        figures.push(format!("{} writes in 1 s in sync mode", writer.writes() - w0));
        assert_eq!(st["on_disconnect"], "degrade");
        if round == 1 {
            break;
        }
        let v = set_mode(&pair, "async");
        assert_eq!(v["mode"], "async", "{v}");
        let st = pair.agent_status();
        assert_eq!(st["mode"], "async", "{st}");
        assert_ne!(st["state"], "syncing", "{st}");
        figures.push(format!("to async: state {} at once", v["state"]));
    }
    // The primary is lost in sync mode: every acknowledged write is at the target.
    kill9_agent(&mut pair);
    thread::sleep(Duration::from_millis(100));
    let (acked, issued, layout, writes) =
        (writer.acked(), writer.issued(), writer.layout, writer.writes());
    drop(writer);
    wait_session_over(&pair, Duration::from_secs(60));
    layout
        .verify_between(&pair.replica_image(), &acked, &issued)
        .unwrap_or_else(|e| panic!("acknowledged writes missing: {e}\n{}", pair.describe()));
    println!(
        "set-mode: {}; {writes} writes, 0 missing after the primary was lost",
        figures.join("; ")
    );
    println!("{}", pair.warnings(20));
}
