//! Synchronous replication end to end, with real processes (issue 5): an agent serving a sync
//! volume over NBD and a target, with the impairment proxy between them where a test cuts the
//! link.
//!
//! - `loss_of_the_primary`: a stamping writer runs on a sync volume; the agent is killed
//!   (SIGKILL) at a random moment and its image deleted; the target, once it has sealed the
//!   dead session, must hold every acknowledged write (and nothing never written).
//! - `degrade_under_partition`: the link is blackholed; writes go on (degraded), status says so
//!   and shows the RPO; after healing the volume is in sync again by itself, having sent only
//!   the blocks written meanwhile.
//! - `block_under_partition`: no write is acknowledged while the link is cut; writes fail with
//!   EIO after the block timeout; the service resumes after healing.
//! - `set_mode_both_ways_under_load`: async -> sync -> async -> sync while a writer runs, then
//!   the primary is lost: every write acknowledged in sync mode is at the target.
//!
//! Seeds are printed; `BLOCKFERRY_SYNC_SEED` replays one, `BLOCKFERRY_SYNC_ROUNDS` (default 3)
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
    let rounds = env_u64("BLOCKFERRY_SYNC_ROUNDS").unwrap_or(3);
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
