//! Asynchronous replication end to end, with real processes: an agent serving a volume over NBD
//! and replicating it over QUIC to a target (issue 4, acceptance "End to end", "Partition" and
//! the certificate / allow-list / size cases of "Bad input").
//!
//! Every test prints its figures (`--nocapture` shows them) and fails with the status of both
//! daemons and their logs; none is skipped. Run with
//! `cargo test --release -p blockferry-tests --test repl_e2e -- --nocapture --test-threads=1`.

use std::collections::BTreeSet;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use blockferry_tests::repl::{
    changed_blocks, check_nbd_serves, fio_nbd, first_difference, first_nonzero, hash_file, Allow,
    Pair, PairOpts, Pin, ProxyOpts, StampOpts, StampWriter, STAMP_BLOCK,
};
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

/// Asserts that the replica's image is byte-identical to the source's (blake3 of both files).
fn assert_identical(pair: &Pair) -> String {
    let (src, rep) = (pair.source_image(), pair.replica_image());
    let (hs, hr) = (hash_file(&src), hash_file(&rep));
    assert!(
        hs == hr,
        "the replica differs from the source: blake3 {hs} vs {hr} ({})\n{}",
        first_difference(&src, &rep).unwrap_or_else(|| "no difference found on re-read".into()),
        pair.describe()
    );
    hs
}

fn assert_verify_cli_ok(pair: &Pair) {
    let out = pair.verify_cli();
    assert!(
        out.success(),
        "`blockferry verify` found differences or failed (exit {}): {out}\n{}",
        out.status,
        pair.describe()
    );
}

/// fio (nbd engine, 4 KiB random writes at queue depth 32, crc32c verify) over the first half of
/// a 1 GiB volume and the stamp writer over the second half, while replicating; then quiesce,
/// converge, and compare the images.
#[test]
fn identical() {
    let size: u64 = 1 << 30;
    let pair = Pair::start(PairOpts::new("1G"));
    let (_, initial) = pair.wait_in_sync_and_idle(Duration::from_secs(120));
    let t0 = Instant::now();
    let stamps = StampWriter::start(
        pair.nbd_addr(),
        &pair.name,
        StampOpts {
            region: size / 2 / STAMP_BLOCK..size / STAMP_BLOCK,
            queue_depth: 8,
            max_iops: None,
            seed: 11,
        },
    );
    let fio_args: Vec<String> = [
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--offset=0",
        "--size=512M",
        "--verify=crc32c",
        "--do_verify=1",
        "--randrepeat=1",
        "--verify_state_save=0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let report = fio_nbd(&pair.nbd_uri(), "repl", &fio_args, Duration::from_secs(600));
    let fio_written = report["jobs"][0]["write"]["io_bytes"].as_u64().unwrap_or(0);
    let fio_secs = t0.elapsed();
    assert!(fio_written >= 512 * MIB, "fio wrote only {fio_written} bytes: {report}");
    let run = stamps.stop();
    let write_secs = t0.elapsed();
    let (a, converge) = pair.wait_in_sync_and_idle(Duration::from_secs(300));
    let stamp_written = run.writes * STAMP_BLOCK;

    // A second fio pass that only reads and checks what the first one wrote.
    let mut verify_args = fio_args.clone();
    verify_args.retain(|a| a != "--do_verify=1");
    verify_args.push("--verify_only".into());
    fio_nbd(&pair.nbd_uri(), "repl", &verify_args, Duration::from_secs(600));

    run.verify_exact(&pair.source_image()).expect("stamped blocks of the source");
    run.verify_exact(&pair.replica_image())
        .unwrap_or_else(|e| panic!("stamped blocks of the replica: {e:#}\n{}", pair.describe()));
    let hash = assert_identical(&pair);
    assert_verify_cli_ok(&pair);

    let data_sent = a["data_bytes_sent"].as_u64().unwrap_or(0);
    let wire_sent = a["wire_bytes_sent"].as_u64().unwrap_or(0);
    println!("identical: 1 GiB volume, async, lz4; initial sync of the empty volume {initial:.2?}");
    println!(
        "  written: fio {} (crc32c verified twice) in {:.1?} + stamps {} ({} writes, {} blocks) in {:.1?}",
        mib(fio_written),
        fio_secs,
        mib(stamp_written),
        run.writes,
        run.blocks_written(),
        write_secs
    );
    println!(
        "  sent: data {} wire {} (ratio to written {:.2}); epochs committed {}",
        mib(data_sent),
        mib(wire_sent),
        wire_sent as f64 / (fio_written + stamp_written) as f64,
        a["last_committed_epoch"]
    );
    println!(
        "  converged (in-sync and idle) {converge:.2?} after the writes stopped; blake3 {hash}"
    );
    println!(
        "  agent counters: epochs_sent {} commits {} overflows {} connects {} disconnects {}",
        a["epochs_sent"], a["commits"], a["overflows"], a["connects"], a["disconnects"]
    );
    println!("{}", pair.warnings(20));
}

/// One poll of the agent's status during the blackhole.
#[derive(Debug)]
struct Sample {
    at: f64,
    state: String,
    lag_bytes: u64,
    rpo: f64,
    writes: u64,
}

/// A 10 s blackhole between agent and target under a steady write load.
#[test]
fn partition() {
    let size: u64 = 256 << 20;
    let pair = Pair::start(PairOpts {
        via_proxy: Some(ProxyOpts { seed: 4, ..ProxyOpts::default() }),
        ..PairOpts::new("256M")
    });
    pair.wait_in_sync_and_idle(Duration::from_secs(60));

    let blocks = size / STAMP_BLOCK;
    let w = StampWriter::start(
        pair.nbd_addr(),
        &pair.name,
        StampOpts { region: 0..blocks, queue_depth: 4, max_iops: Some(1000), seed: 21 },
    );
    thread::sleep(Duration::from_secs(3));
    w.assert_healthy("before the partition");
    let pre = pair.agent_status();
    assert_eq!(pre["state"], "in-sync", "under load before the partition\n{}", pair.describe());

    // Partition.
    let acked_on = w.acked();
    let writes_on = w.writes();
    let sent_on = pair.agent_status()["data_bytes_sent"].as_u64().unwrap();
    pair.proxy().blackhole(true);
    let t_on = Instant::now();
    let mut samples = Vec::new();
    while t_on.elapsed() < Duration::from_secs(10) {
        thread::sleep(Duration::from_millis(500));
        let s = pair.agent_status();
        samples.push(Sample {
            at: t_on.elapsed().as_secs_f64(),
            state: s["state"].as_str().unwrap_or("?").to_string(),
            lag_bytes: s["lag_bytes"].as_u64().unwrap_or(0),
            rpo: s["rpo_seconds"].as_f64().unwrap_or(0.0),
            writes: w.writes() - writes_on,
        });
    }
    // Stop the load at the end of the partition, so "changed" is exactly what was written
    // during it.
    let run = w.stop();
    let writes_during = run.writes - writes_on;
    let changed = changed_blocks(&acked_on, &run.acked) * STAMP_BLOCK;
    let heal_status = pair.agent_status();
    let sent_heal = heal_status["data_bytes_sent"].as_u64().unwrap();
    let blackholed = pair.proxy().stats();
    pair.proxy().blackhole(false);
    let t_off = Instant::now();
    let (a, _) = pair.wait_in_sync_and_idle(Duration::from_secs(180));
    let converge = t_off.elapsed();
    let sent_after = a["data_bytes_sent"].as_u64().unwrap() - sent_heal;
    let sent_since_on = a["data_bytes_sent"].as_u64().unwrap() - sent_on;

    println!("partition: 256 MiB volume through `blockferry impair`, 10 s blackhole, stamps at 1000 writes/s");
    println!("  t(s)  state         lag        rpo(s)  writes");
    for s in &samples {
        println!(
            "  {:4.1}  {:12}  {:>10}  {:6.1}  {}",
            s.at,
            s.state,
            mib(s.lag_bytes),
            s.rpo,
            s.writes
        );
    }
    println!(
        "  during: {writes_during} writes acknowledged, {} distinct blocks = {} changed; proxy: {}",
        changed / STAMP_BLOCK,
        mib(changed),
        blackholed
    );
    println!(
        "  after healing: converged in {converge:.2?}; data sent after healing {} ({:.2}x changed), since the partition began {} ({:.2}x); reconnects {} -> {}",
        mib(sent_after),
        sent_after as f64 / changed as f64,
        mib(sent_since_on),
        sent_since_on as f64 / changed as f64,
        pre["connects"],
        a["connects"]
    );

    assert!(writes_during > 0, "no write was acknowledged during the partition");
    let first = &samples[0];
    let last = samples.last().unwrap();
    assert!(
        last.lag_bytes > first.lag_bytes && last.lag_bytes >= changed / 2,
        "lag_bytes did not grow during the partition ({} -> {}, {} changed): {samples:?}",
        first.lag_bytes,
        last.lag_bytes,
        changed
    );
    assert!(
        last.rpo >= 5.0 && last.rpo > first.rpo,
        "rpo_seconds did not grow during the partition ({} -> {}): {samples:?}",
        first.rpo,
        last.rpo
    );
    assert!(
        sent_after <= changed * 3 / 2 + 4 * MIB,
        "after healing {} were sent for {} changed: more than the changed blocks travelled",
        mib(sent_after),
        mib(changed)
    );
    // Not a full resync either when counted from the start of the partition (epochs sent into
    // the blackhole and sent again after a reconnect count twice here).
    assert!(
        sent_since_on <= changed * 3 + 4 * MIB && sent_since_on < size / 2,
        "{} were sent since the partition began for {} changed",
        mib(sent_since_on),
        mib(changed)
    );
    run.verify_exact(&pair.source_image()).expect("stamped blocks of the source");
    run.verify_exact(&pair.replica_image()).unwrap_or_else(|e| {
        panic!("stamped blocks of the replica after healing: {e:#}\n{}", pair.describe())
    });
    assert_identical(&pair);
    assert_verify_cli_ok(&pair);
    // Last, so that everything above is checked even while this one fails.
    let states: BTreeSet<&str> = samples.iter().map(|s| s.state.as_str()).collect();
    assert!(
        states.contains("disconnected") || states.contains("behind"),
        "the agent never reported disconnected or behind during a 10 s blackhole: states seen \
         {states:?}, while lag_bytes grew to {} and rpo_seconds to {:.1} (a dead link is noticed \
         only at the QUIC idle timeout)",
        mib(last.lag_bytes),
        last.rpo
    );
}

/// Nothing of the volume reached the target: it has no replica of it, or one that received 0
/// bytes and whose image is all zero.
fn assert_target_got_nothing(pair: &Pair) {
    match pair.target_status() {
        None => {}
        Some(t) => {
            assert_eq!(
                t["received_bytes"].as_u64(),
                Some(0),
                "the target received data it should have refused: {t}"
            );
            if let Some(p) = t["replica_path"].as_str().filter(|p| Path::new(p).exists()) {
                assert_eq!(first_nonzero(Path::new(p)), None, "the refused replica has data: {t}");
            }
        }
    }
    // And no image under the target's directory holds data.
    let mut stack = vec![pair.target.dir.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "raw") {
                assert_eq!(first_nonzero(&p), None, "{} has data", p.display());
            }
        }
    }
}

/// Waits until the agent reports a `last_error` and returns its status element.
fn wait_error(pair: &Pair, what: &str) -> Value {
    pair.wait_agent(what, Duration::from_secs(60), |v| v["last_error"].is_string())
}

/// Writes a few blocks so there is something to (not) replicate.
fn write_some(pair: &Pair) {
    let mut c = pair.nbd();
    for i in 0..64u64 {
        c.write(i * 4096 * 17, &[0xa5; 4096], 0).expect("write through NBD");
    }
    c.flush().expect("flush");
}

#[test]
fn wrong_target_fingerprint() {
    let pair = Pair::start(PairOpts { pin: Pin::Wrong, ..PairOpts::new("16M") });
    write_some(&pair);
    let s = wait_error(&pair, "a last_error for the wrong pinned fingerprint");
    let err = s["last_error"].as_str().unwrap();
    println!("wrong pin: state {} last_error {err:?}", s["state"]);
    assert!(
        err.to_lowercase().contains("fingerprint"),
        "the error does not name the fingerprint mismatch: {err:?}\n{}",
        pair.describe()
    );
    assert!(
        err.contains(&pair.pinned_fp) || err.contains(&pair.target_fp),
        "the error names neither the pinned nor the presented fingerprint: {err:?}"
    );
    assert_ne!(s["state"], "in-sync");
    // It keeps failing the same way, and nothing arrives.
    thread::sleep(Duration::from_secs(2));
    let s = pair.agent_status();
    assert_eq!(s["last_committed_epoch"].as_u64(), Some(0), "{s}");
    assert_target_got_nothing(&pair);
    check_nbd_serves(&pair, 8 << 20);
}

#[test]
fn agent_not_on_allow_list() {
    let pair = Pair::start(PairOpts { allow: Allow::Other, ..PairOpts::new("16M") });
    write_some(&pair);
    let s = wait_error(&pair, "a last_error for an agent the target does not allow");
    let err = s["last_error"].as_str().unwrap();
    println!("not allowed: state {} last_error {err:?}", s["state"]);
    assert!(
        err.to_lowercase().contains("allow"),
        "the agent's error does not mention the target's allow list: {err:?}\n{}",
        pair.describe()
    );
    thread::sleep(Duration::from_secs(2));
    assert_eq!(pair.agent_status()["last_committed_epoch"].as_u64(), Some(0));
    assert_target_got_nothing(&pair);
    check_nbd_serves(&pair, 8 << 20);
}

#[test]
fn volume_not_allowed() {
    let pair = Pair::start(PairOpts {
        name: "db1".into(),
        allow: Allow::AgentFor("othervol".into()),
        ..PairOpts::new("16M")
    });
    write_some(&pair);
    let s = wait_error(&pair, "a last_error for a volume the agent may not write");
    let err = s["last_error"].as_str().unwrap_or_default();
    println!("volume not allowed: state {} last_error {err:?}", s["state"]);
    assert!(
        err.contains("db1") && err.contains("allow"),
        "the error does not name the volume db1 and the allow list: {err:?}\n{}",
        pair.describe()
    );
    assert_target_got_nothing(&pair);
    check_nbd_serves(&pair, 8 << 20);
    assert_stops(&pair, "a volume the target does not allow this agent to write");
}

/// A refusal that needs an operator (not allowed, size mismatch) stops the volume's
/// replication: state `stopped`, no retry loop.
fn assert_stops(pair: &Pair, case: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = pair.agent_status();
        if s["state"] == "stopped" {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "{case}: the target refused the session, but the agent's state is {} after {} \
                 connection attempts (it retries as if the link were down) instead of `stopped`; \
                 last_error {}\n{}",
                s["state"],
                s["connects"],
                s["last_error"],
                pair.describe()
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn size_mismatch() {
    let mut pair = Pair::start(PairOpts::new("64M"));
    let w = StampWriter::start(
        pair.nbd_addr(),
        &pair.name,
        StampOpts { region: 0..16384, queue_depth: 4, max_iops: Some(2000), seed: 5 },
    );
    thread::sleep(Duration::from_secs(2));
    let run = w.stop();
    pair.wait_in_sync_and_idle(Duration::from_secs(60));
    // A clean restart first: it must resume, not stop.
    pair.restart_agent();
    pair.wait_in_sync_and_idle(Duration::from_secs(60));
    let replica = pair.replica_image();
    let replica_hash = hash_file(&replica);
    let committed = pair.target_status().unwrap()["last_committed_epoch"].clone();

    // The same volume (same uuid), grown to 128 MiB behind the agent's back.
    let toml_path = pair.volume_dir.join("volume.toml");
    let pid = pair.agent.pid();
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::TERM,
    );
    assert!(pair.agent.wait_exit(Duration::from_secs(30)).is_some(), "agent did not stop");
    let toml = std::fs::read_to_string(&toml_path).unwrap();
    let grown = toml.replace("size = 67108864", "size = 134217728");
    assert_ne!(toml, grown, "volume.toml has no `size = 67108864` line: {toml}");
    std::fs::write(&toml_path, grown).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(pair.source_image())
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    pair.agent = pair.agent_config.start(&pair.agent_log);

    let s = wait_error(&pair, "a last_error for the size mismatch");
    let err = s["last_error"].as_str().unwrap_or_default();
    println!("size mismatch: state {} last_error {err:?}", s["state"]);
    assert!(
        err.contains("134217728") && err.contains("67108864"),
        "the error does not name both sizes (128 MiB source, 64 MiB replica): {err:?}\n{}",
        pair.describe()
    );
    // The replica is untouched.
    thread::sleep(Duration::from_secs(1));
    let t = pair.target_status().unwrap();
    assert_eq!(t["last_committed_epoch"], committed, "the target committed more: {t}");
    assert_eq!(hash_file(&replica), replica_hash, "the replica changed after the refusal");
    run.verify_exact(&replica).expect("stamped blocks of the replica");
    check_nbd_serves(&pair, 100 << 20);
    assert_stops(&pair, "a source volume larger than its replica");
}
