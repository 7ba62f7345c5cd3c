//! Crash-safe change tracking with real processes: random writes through NBD under load,
//! SIGKILL of the agent at a random moment, restart; every block whose write was acknowledged
//! since the last clear must be dirty (0 misses), and the extra dirty bytes must fit in the
//! activity log (issue 3's kill -9 acceptance test).
//!
//! `BLOCKFERRY_KILL_ROUNDS` (default 50) and `BLOCKFERRY_KILL_SEED` (default: from the clock,
//! printed) replay a run.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use blockferry_tests::nbd::{connect, Request, CMD_WRITE};
use blockferry_tests::{blockferry, create_volume, run_ok, tempdir, AgentConfig, Prng};

const BS: u64 = 4096;
const VOLUME_SIZE: u64 = 1 << 30;
/// Activity log of the test volume: 32 extents of 4 MiB = 128 MiB hot set over a 1 GiB volume,
/// so random writes evict all the time.
const AL_EXTENTS: u64 = 32;
const AL_EXTENT: u64 = 4 << 20;
const WRITERS: u64 = 4;
const DEPTH: usize = 8;

fn cbt(admin: &std::path::Path, args: &[&str]) -> String {
    let mut cmd = std::process::Command::new(blockferry());
    cmd.arg("cbt").arg("--admin").arg(admin).args(args);
    run_ok(&mut cmd, Duration::from_secs(30)).stdout
}

fn dirty_blocks(admin: &std::path::Path) -> BTreeSet<u64> {
    let out = cbt(admin, &["extents", "vol", "b", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("cbt extents --json is JSON");
    let mut set = BTreeSet::new();
    for e in v["extents"].as_array().expect("an extents array") {
        let (off, len) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        assert!(off % BS == 0 && len % BS == 0, "extent {off}+{len} not block aligned");
        set.extend(off / BS..(off + len) / BS);
    }
    set
}

/// Writes random blocks on one connection with `DEPTH` requests in flight until the connection
/// breaks or `stop` is set; records every acknowledged block in `acked`.
fn writer(addr: std::net::SocketAddr, seed: u64, stop: &AtomicBool, acked: &Mutex<BTreeSet<u64>>) {
    let Ok(mut c) = connect(addr, "vol", false) else { return };
    let mut rng = Prng::new(seed);
    let mut buf = vec![0u8; 64 << 10];
    let mut pending: HashMap<u64, (u64, u64)> = HashMap::new();
    loop {
        while pending.len() < DEPTH && !stop.load(Ordering::Relaxed) {
            let blocks = 1 + rng.next_u64() % 16;
            let off = (rng.next_u64() % (VOLUME_SIZE / BS - blocks)) * BS;
            let len = blocks * BS;
            rng.fill(&mut buf[..len as usize]);
            let req = Request::new(CMD_WRITE, off, len as u32);
            match c.send(req, &buf[..len as usize]) {
                Ok(cookie) => {
                    pending.insert(cookie, (off, len));
                }
                Err(_) => return,
            }
        }
        if pending.is_empty() {
            return;
        }
        let Ok(r) = c.recv() else { return };
        let (off, len) = pending.remove(&r.cookie).expect("a reply to a request we sent");
        assert_eq!(r.error, 0, "write {off}+{len} failed: {}", r.describe_error());
        acked.lock().unwrap().extend(off / BS..(off + len) / BS);
    }
}

/// `micros=N` of the agent's "change tracking recovered" line, if any.
fn recovery_micros(log: &str) -> Option<u64> {
    let line = log.lines().rev().find(|l| l.contains("change tracking recovered"))?;
    let at = line.find("micros=")? + "micros=".len();
    line[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// A 1 GiB volume named "vol" with a small activity log, and how to start its agent.
fn setup(tmp: &std::path::Path) -> AgentConfig {
    let vol = tmp.join("vol");
    create_volume(&vol, "1G", &["--name", "vol"]);
    let config = tmp.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[[volume]]\ndir = {:?}\nal-extents = {AL_EXTENTS}\nal-extent-size = \"4M\"\n",
            vol.display().to_string()
        ),
    )
    .unwrap();
    AgentConfig {
        admin: Some(tmp.join("admin.sock")),
        extra: vec!["--config".into(), config.display().to_string()],
        ..AgentConfig::default()
    }
}

/// Runs `WRITERS` writers against `addr` until `until` returns (then stops them); returns the
/// acknowledged blocks.
fn load(addr: std::net::SocketAddr, seed: u64, until: impl FnOnce()) -> BTreeSet<u64> {
    let acked = Mutex::new(BTreeSet::new());
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for w in 0..WRITERS {
            let (acked, stop) = (&acked, &stop);
            s.spawn(move || writer(addr, seed ^ (w + 1), stop, acked));
        }
        until();
        stop.store(true, Ordering::Relaxed);
    });
    acked.into_inner().unwrap()
}

/// Crashes exactly between two steps of change tracking's storage (the agent exits at a named
/// fault point, see `cbt::store::failpoint`), under load; after a restart no acknowledged
/// write is clean.
#[test]
fn crash_at_each_fault_point_misses_no_acknowledged_write() {
    let points = [
        ("cbt.al.write", 2),
        ("cbt.al.sync", 2),
        ("cbt.al.write", 9),
        ("cbt.al.sync", 20),
        ("cbt.page.write", 1),
        ("cbt.page.sync", 1),
        ("cbt.page.write", 40),
        ("cbt.page.sync", 3),
    ];
    let tmp = tempdir();
    let base = setup(tmp.path());
    let admin = base.admin.clone().unwrap();
    let log = tmp.path().join("agent.log");
    {
        let agent = base.start(&log);
        cbt(&admin, &["create", "vol", "b"]);
        agent.terminate(Duration::from_secs(20));
    }
    for (i, (point, nth)) in points.into_iter().enumerate() {
        let mut config = base.clone();
        config.env.push(("BLOCKFERRY_FAILPOINTS".into(), format!("{point}=exit@{nth}")));
        let mut agent = config.start(&log);
        let addr = agent.addr;
        let mut status = None;
        let acked = load(addr, 77 + i as u64, || {
            status = agent.wait_exit(Duration::from_secs(60));
        });
        let status = status
            .unwrap_or_else(|| panic!("{point}@{nth}: the agent never reached the fault point"));
        assert_eq!(
            status.code(),
            Some(86),
            "{point}@{nth}: the agent should exit at the fault point"
        );
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(log_text.contains(&format!("failpoint {point}: exit")), "{log_text}");
        drop(agent);
        let _agent = base.start(&log);
        let dirty = dirty_blocks(&admin);
        let missed = acked.difference(&dirty).count();
        let extra = dirty.difference(&acked).count() as u64 * BS;
        eprintln!(
            "{point}@{nth}: {} acked blocks, {missed} missed, {extra} extra dirty bytes",
            acked.len()
        );
        assert_eq!(missed, 0, "{point}@{nth}: acknowledged blocks are clean after the crash");
        assert!(extra <= AL_EXTENTS * AL_EXTENT, "{point}@{nth}: {extra} extra dirty bytes");
        cbt(&admin, &["clear", "vol", "b"]);
    }
}

#[test]
fn kill_9_under_load_misses_no_acknowledged_write() {
    let rounds: u64 =
        std::env::var("BLOCKFERRY_KILL_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let seed: u64 = std::env::var("BLOCKFERRY_KILL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
            now.as_nanos() as u64
        });
    eprintln!("kill -9 test: {rounds} rounds, BLOCKFERRY_KILL_SEED={seed}");
    let tmp = tempdir();
    let agent_config = setup(tmp.path());
    let admin = agent_config.admin.clone().unwrap();
    let log = tmp.path().join("agent.log");
    let mut agent = agent_config.start(&log);
    cbt(&admin, &["create", "vol", "b"]);

    let al_bytes = AL_EXTENTS * AL_EXTENT;
    let mut misses_total = 0usize;
    let mut extra_total = 0u64;
    let mut extra_max = 0u64;
    let mut acked_total = 0u64;
    let mut recovery = Vec::new();
    let mut restart = Vec::new();
    let mut rng = Prng::new(seed);
    for round in 0..rounds {
        let round_seed = rng.next_u64();
        let run_for = Duration::from_millis(100 + round_seed % 900);
        let pid = rustix::process::Pid::from_raw(agent.pid() as i32).unwrap();
        let acked = load(agent.addr, round_seed, || {
            std::thread::sleep(run_for);
            // SIGKILL while the writers have requests in flight.
            rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
        });
        let t0 = Instant::now();
        agent = agent_config.start(&log);
        restart.push(t0.elapsed());
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        recovery.push(recovery_micros(&log_text).unwrap_or_else(|| {
            panic!("round {round}: no `change tracking recovered` line after a kill\n{log_text}")
        }));
        let dirty = dirty_blocks(&admin);
        let missed: Vec<u64> = acked.difference(&dirty).copied().collect();
        let extra = dirty.difference(&acked).count() as u64 * BS;
        eprintln!(
            "round {round} (seed {round_seed}): ran {run_for:?}, {} acked blocks, {} dirty, {} missed, {} extra bytes",
            acked.len(),
            dirty.len(),
            missed.len(),
            extra
        );
        assert!(
            missed.is_empty(),
            "round {round} (BLOCKFERRY_KILL_SEED={seed}): {} acknowledged blocks are not dirty after the crash, e.g. {:?}",
            missed.len(),
            &missed[..missed.len().min(10)]
        );
        assert!(
            extra <= al_bytes,
            "round {round}: {extra} extra dirty bytes, more than the activity log ({al_bytes})"
        );
        misses_total += missed.len();
        extra_total += extra;
        extra_max = extra_max.max(extra);
        acked_total += acked.len() as u64;
        // The next round counts from a clear.
        cbt(&admin, &["clear", "vol", "b"]);
        assert!(dirty_blocks(&admin).is_empty(), "round {round}: dirty right after a clear");
    }
    let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    let restart_ms: Vec<u64> = restart.iter().map(|d| d.as_millis() as u64).collect();
    eprintln!(
        "kill -9 summary: {rounds} rounds, {acked_total} acknowledged blocks, {misses_total} misses, \
         extra dirty bytes mean {:.0} max {extra_max} (activity log {al_bytes}), recovery mean {:.0} us \
         max {} us, restart-to-listening mean {:.0} ms",
        extra_total as f64 / rounds.max(1) as f64,
        mean(&recovery),
        recovery.iter().max().unwrap_or(&0),
        mean(&restart_ms),
    );
    assert_eq!(misses_total, 0);
}
