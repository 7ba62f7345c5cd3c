//! Replication end to end: an agent and a target replicating one volume ([`Pair`]), a UDP
//! impairment relay between them ([`Proxy`], `blockferry impair`), and a data verifier that
//! stamps every block it writes ([`StampWriter`], after Oxide Crucible's `crutest`).
//!
//! ```text
//!  StampWriter / fio ──NBD──> agent ──QUIC──> [Proxy] ──> target
//!                               │                          │
//!                          source image               replica image
//! ```
//!
//! Every child process is killed when its guard drops; every wait has a time limit and fails
//! with the status of both sides and the logs, never hangs.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use tempfile::TempDir;

use crate::agent::{Agent, AgentConfig};
use crate::bin::blockferry;
use crate::nbd::{self, Request, CMD_WRITE};
use crate::proc::{run, run_ok, wait_timeout, Output};
use crate::target::{keygen, Target, TargetOpts};
use crate::{create_volume, tempdir, Prng};

/// Which certificate the agent pins as the target's.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Pin {
    /// The target's own fingerprint.
    #[default]
    Target,
    /// The fingerprint of another key pair (made for the purpose): the handshake must fail.
    Wrong,
}

/// Which agents the target allows (`--allow`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Allow {
    /// The agent, for every volume.
    #[default]
    Agent,
    /// The agent, for these volumes only (`--allow FP:vol1,vol2`).
    AgentFor(String),
    /// Only another key pair's fingerprint: the agent is not on the list.
    Other,
}

/// How to start a [`Pair`].
#[derive(Debug, Clone)]
pub struct PairOpts {
    /// Volume size, as `blockferry volume create --size` takes it (`256M`, `1G`).
    pub size: String,
    /// `--block-size` (`4K`, `64K`, ...).
    pub block_size: String,
    /// The volume's (and export's) name.
    pub name: String,
    /// `--epoch-interval-ms` of the agent; `None`: its default (1 s).
    pub epoch_interval_ms: Option<u64>,
    /// `--mode` of the agent: `async` (default) or `sync`.
    pub mode: String,
    /// More agent arguments (`--compression off`, `--budget 8M`, `--bandwidth 12M`, ...).
    pub agent_extra: Vec<String>,
    /// Environment of the agent (e.g. `RUST_LOG`, `BLOCKFERRY_FAILPOINTS`).
    pub agent_env: Vec<(String, String)>,
    /// More target arguments.
    pub target_extra: Vec<String>,
    /// Environment of the target.
    pub target_env: Vec<(String, String)>,
    /// Route the agent's QUIC traffic through `blockferry impair`.
    pub via_proxy: Option<ProxyOpts>,
    pub pin: Pin,
    pub allow: Allow,
}

impl Default for PairOpts {
    fn default() -> Self {
        PairOpts {
            size: "64M".into(),
            block_size: "4K".into(),
            name: "vol".into(),
            epoch_interval_ms: None,
            mode: "async".into(),
            agent_extra: Vec::new(),
            agent_env: Vec::new(),
            target_extra: Vec::new(),
            target_env: Vec::new(),
            via_proxy: None,
            pin: Pin::Target,
            allow: Allow::Agent,
        }
    }
}

impl PairOpts {
    pub fn new(size: &str) -> PairOpts {
        PairOpts { size: size.into(), ..PairOpts::default() }
    }
}

/// An agent replicating one volume to a target, in one temporary directory:
///
/// ```text
/// tmp/agent-keys/ tmp/target-keys/ tmp/vol/ (image.raw, volume.toml)
/// tmp/replicas/ (+ replicas.log, replicas.admin.sock) tmp/agent.log tmp/agent.sock
/// ```
#[derive(Debug)]
pub struct Pair {
    pub agent: Agent,
    pub target: Target,
    pub proxy: Option<Proxy>,
    pub volume_dir: PathBuf,
    pub name: String,
    pub agent_admin: PathBuf,
    pub target_admin: PathBuf,
    pub agent_keys: PathBuf,
    pub target_keys: PathBuf,
    pub agent_fp: String,
    pub target_fp: String,
    /// The fingerprint the agent pins (the target's unless [`Pin::Wrong`]).
    pub pinned_fp: String,
    /// The address the agent sends QUIC to (the proxy's, or the target's).
    pub link_addr: SocketAddr,
    pub agent_config: AgentConfig,
    pub agent_log: PathBuf,
    /// Dropped last (fields drop in order), so the children die before their files go.
    pub tmp: TempDir,
}

impl Pair {
    /// Makes the keys, starts the target, creates the volume, starts the proxy (if any) and the
    /// agent with replication on. Returns at once: use [`Pair::wait_state`] or
    /// [`Pair::wait_in_sync_and_idle`] to wait for the link.
    pub fn start(opts: PairOpts) -> Pair {
        let tmp = tempdir();
        let agent_keys = tmp.path().join("agent-keys");
        let target_keys = tmp.path().join("target-keys");
        let agent_fp = keygen(&agent_keys);
        let target_fp = keygen(&target_keys);
        let other_fp = || keygen(&tmp.path().join("other-keys"));
        let allow = match &opts.allow {
            Allow::Agent => agent_fp.clone(),
            Allow::AgentFor(vols) => format!("{agent_fp}:{vols}"),
            Allow::Other => other_fp(),
        };
        let mut topts = TargetOpts::new(&tmp.path().join("replicas"), &target_keys, &allow);
        topts.extra = opts.target_extra.clone();
        topts.env = opts.target_env.clone();
        let target = Target::start(topts);
        assert_eq!(target.fingerprint, target_fp, "the target prints another fingerprint");
        let pinned_fp = match opts.pin {
            Pin::Target => target_fp.clone(),
            Pin::Wrong => {
                let fp = keygen(&tmp.path().join("wrong-pin-keys"));
                assert_ne!(fp, target_fp);
                fp
            }
        };

        let volume_dir = tmp.path().join("vol");
        create_volume(
            &volume_dir,
            &opts.size,
            &["--block-size", &opts.block_size, "--name", &opts.name],
        );

        let proxy = opts.via_proxy.as_ref().map(|p| Proxy::start(target.addr, p, tmp.path()));
        let link_addr = proxy.as_ref().map_or(target.addr, |p| p.addr);

        let agent_admin = tmp.path().join("agent.sock");
        let mut cfg = AgentConfig::new(&volume_dir).admin(&agent_admin);
        cfg.extra = vec![
            "--key-dir".into(),
            agent_keys.display().to_string(),
            "--target".into(),
            link_addr.to_string(),
            "--target-fingerprint".into(),
            pinned_fp.clone(),
            "--mode".into(),
            opts.mode.clone(),
        ];
        if let Some(ms) = opts.epoch_interval_ms {
            cfg.extra.extend(["--epoch-interval-ms".into(), ms.to_string()]);
        }
        cfg.extra.extend(opts.agent_extra.iter().cloned());
        cfg.env = opts.agent_env.clone();
        let agent_log = tmp.path().join("agent.log");
        let agent = cfg.start(&agent_log);

        Pair {
            agent,
            target_admin: target.admin.clone(),
            target,
            proxy,
            volume_dir,
            name: opts.name,
            agent_admin,
            agent_keys,
            target_keys,
            agent_fp,
            target_fp,
            pinned_fp,
            link_addr,
            agent_config: cfg,
            agent_log,
            tmp,
        }
    }

    /// The agent's NBD address (it changes when the agent restarts).
    pub fn nbd_addr(&self) -> SocketAddr {
        self.agent.addr
    }

    /// `nbd://ADDR/NAME`.
    pub fn nbd_uri(&self) -> String {
        self.agent.uri(&self.name)
    }

    /// A new NBD connection to the volume (structured replies off).
    pub fn nbd(&self) -> nbd::Client {
        nbd::connect(self.nbd_addr(), &self.name, false)
            .unwrap_or_else(|e| panic!("NBD connect to {}: {e:#}", self.nbd_uri()))
    }

    /// The source image (`image.raw` of the volume).
    pub fn source_image(&self) -> PathBuf {
        self.volume_dir.join("image.raw")
    }

    /// The whole `status --json` of the agent.
    pub fn agent_status_all(&self) -> Value {
        status_json(&self.agent_admin)
    }

    /// The whole `status --json` of the target.
    pub fn target_status_all(&self) -> Value {
        status_json(&self.target_admin)
    }

    /// The agent's status element of this volume (panics if it has none).
    pub fn agent_status(&self) -> Value {
        let all = self.agent_status_all();
        find_volume(&all, &self.name)
            .unwrap_or_else(|| panic!("the agent's status has no volume {:?}: {all}", self.name))
    }

    /// The target's status element of this volume, `None` while it has no replica of it.
    pub fn target_status(&self) -> Option<Value> {
        find_volume(&self.target_status_all(), &self.name)
    }

    /// The replica's image (the target's `replica_path`); panics if the target has none.
    pub fn replica_image(&self) -> PathBuf {
        self.target.replica_path(&self.name)
    }

    /// Both statuses and the tails of both logs, for failure messages.
    pub fn describe(&self) -> String {
        let tail = |s: String| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        format!(
            "agent status: {}\ntarget status: {}\n--- agent log (tail)\n{}\n--- target log (tail)\n{}",
            try_status_json(&self.agent_admin).map_or_else(|e| format!("<{e:#}>"), |v| v.to_string()),
            try_status_json(&self.target_admin).map_or_else(|e| format!("<{e:#}>"), |v| v.to_string()),
            tail(self.agent.log_text()),
            tail(self.target.log_text()),
        )
    }

    /// The WARN and ERROR lines of both logs (at most `max` of each), for the figures.
    pub fn warnings(&self, max: usize) -> String {
        let pick = |log: String| {
            let lines: Vec<String> = log
                .lines()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
                .map(str::to_string)
                .collect();
            let n = lines.len();
            let mut out: Vec<String> = lines.into_iter().take(max).collect();
            if n > max {
                out.push(format!("... {} more", n - max));
            }
            out.join("\n")
        };
        format!(
            "agent warnings:\n{}\ntarget warnings:\n{}",
            pick(self.agent.log_text()),
            pick(self.target.log_text())
        )
    }

    /// Polls the agent's status every 100 ms until `pred` holds for this volume's element,
    /// returning that element; panics with [`Pair::describe`] after `limit`.
    pub fn wait_agent(&self, what: &str, limit: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.agent_status();
            if pred(&v) {
                return v;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {limit:?} waiting for the agent: {what}\n{}",
                    self.describe()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the agent reports `state` for the volume (one of `connecting`,
    /// `disconnected`, `initial-sync`, `behind`, `in-sync`, `stopped`).
    pub fn wait_state(&self, state: &str, limit: Duration) -> Value {
        self.wait_agent(&format!("state {state:?}"), limit, |v| v["state"] == state)
    }

    /// Waits until everything written is at the target and applied: the agent is `in-sync`
    /// with `lag_bytes == 0` and `lag_epochs == 0`, and the target's `applied_epoch ==
    /// last_committed_epoch ==` the agent's `last_committed_epoch`, on two polls in a row.
    /// Returns the agent's element and how long it took.
    pub fn wait_in_sync_and_idle(&self, limit: Duration) -> (Value, Duration) {
        let start = Instant::now();
        let deadline = start + limit;
        let mut good_polls = 0;
        loop {
            let a = self.agent_status();
            let t = self.target_status();
            let ok = a["state"] == "in-sync"
                && a["lag_bytes"].as_u64() == Some(0)
                && a["lag_epochs"].as_u64().unwrap_or(0) == 0
                && t.as_ref().is_some_and(|t| {
                    t["applied_epoch"] == t["last_committed_epoch"]
                        && t["last_committed_epoch"] == a["last_committed_epoch"]
                });
            good_polls = if ok { good_polls + 1 } else { 0 };
            if good_polls >= 2 {
                return (a, start.elapsed());
            }
            if Instant::now() >= deadline {
                panic!(
                    "the volume did not become in-sync and idle within {limit:?}\n{}",
                    self.describe()
                );
            }
            thread::sleep(Duration::from_millis(150));
        }
    }

    /// `blockferry verify NAME --admin AGENT --json` (exit 0: identical, 1: differs, 2: error).
    pub fn verify_cli(&self) -> Output {
        let mut cmd = Command::new(blockferry());
        cmd.arg("verify").arg(&self.name).arg("--admin").arg(&self.agent_admin).arg("--json");
        run(&mut cmd, Duration::from_secs(300))
    }

    /// Stops the agent (SIGTERM, or SIGKILL when `kill9`) and starts it again with the same
    /// configuration (same volume, admin socket and keys; a new NBD port).
    pub fn restart_agent_with(&mut self, kill9: bool) {
        let sig = if kill9 { rustix::process::Signal::KILL } else { rustix::process::Signal::TERM };
        let pid = rustix::process::Pid::from_raw(self.agent.pid() as i32).expect("pid > 0");
        let _ = rustix::process::kill_process(pid, sig);
        if self.agent.wait_exit(Duration::from_secs(30)).is_none() {
            panic!("the agent did not exit within 30 s of {sig:?}\n{}", self.describe());
        }
        // Keep the earlier logs: the new agent's log file is created afresh.
        let old = std::fs::read_to_string(&self.agent_log).unwrap_or_default();
        let n = (1..).find(|i| !self.agent_log.with_extension(format!("log.{i}")).exists());
        let _ = std::fs::write(self.agent_log.with_extension(format!("log.{}", n.unwrap())), old);
        let agent = self.agent_config.start(&self.agent_log);
        drop(std::mem::replace(&mut self.agent, agent));
    }

    /// [`Pair::restart_agent_with`] a clean stop (SIGTERM).
    pub fn restart_agent(&mut self) {
        self.restart_agent_with(false);
    }

    /// The proxy (panics when the pair runs without one).
    pub fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("the pair was started without via_proxy")
    }
}

fn find_volume(all: &Value, name: &str) -> Option<Value> {
    all["volumes"].as_array()?.iter().find(|v| v["volume"] == name).cloned()
}

/// `blockferry status --json --admin SOCK`, parsed.
pub fn try_status_json(admin: &Path) -> Result<Value> {
    let mut cmd = Command::new(blockferry());
    cmd.args(["status", "--json", "--admin"]).arg(admin);
    let out = run(&mut cmd, Duration::from_secs(30));
    ensure!(out.success(), "{out}");
    serde_json::from_str(&out.stdout).with_context(|| format!("status --json is not JSON: {out}"))
}

/// [`try_status_json`], panicking on failure.
pub fn status_json(admin: &Path) -> Value {
    try_status_json(admin).unwrap_or_else(|e| panic!("status of {}: {e:#}", admin.display()))
}

/// blake3 of a whole file, as hex.
pub fn hash_file(path: &Path) -> String {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().to_hex().to_string()
}

/// The first non-zero byte offset of a file, `None` when it is all zero.
pub fn first_nonzero(path: &Path) -> Option<u64> {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let n = f.read(&mut buf).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if n == 0 {
            return None;
        }
        if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
            return Some(off + i as u64);
        }
        off += n as u64;
    }
}

/// The first 4 KiB block at which two files differ (or their lengths), for failure messages.
pub fn first_difference(a: &Path, b: &Path) -> Option<String> {
    let (la, lb) = (file_len(a), file_len(b));
    let mut fa = File::open(a).ok()?;
    let mut fb = File::open(b).ok()?;
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut off = 0u64;
    let mut diffs = 0u64;
    let mut first = None;
    loop {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        let n = na.min(nb);
        for (i, (ca, cb)) in ba[..n].chunks(4096).zip(bb[..n].chunks(4096)).enumerate() {
            if ca != cb {
                diffs += 1;
                first.get_or_insert(off + i as u64 * 4096);
            }
        }
        off += n as u64;
        if na == 0 || nb == 0 || na != nb {
            break;
        }
    }
    match (first, la == lb) {
        (None, true) => None,
        (first, _) => Some(format!(
            "lengths {la} and {lb}; {diffs} differing 4 KiB blocks in the common part, first at {first:?}"
        )),
    }
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    n
}

// ---------------------------------------------------------------------------------------------
// Proxy

/// How to start `blockferry impair`.
#[derive(Debug, Clone, Default)]
pub struct ProxyOpts {
    pub seed: u64,
    /// `--delay` (one way), e.g. `"20ms"`.
    pub delay: Option<String>,
    pub jitter: Option<String>,
    /// `--loss` probability.
    pub loss: Option<f64>,
    /// `--rate`, e.g. `"100mbit"`.
    pub rate: Option<String>,
    pub extra: Vec<String>,
}

/// A running `blockferry impair` relay, killed when dropped.
#[derive(Debug)]
pub struct Proxy {
    child: Child,
    /// Where clients send (the agent's `--target`).
    pub addr: SocketAddr,
    pub control_sock: PathBuf,
    pub log: PathBuf,
}

impl Proxy {
    /// Starts a relay to `upstream` (files in `dir`) and waits for its `listening on` line.
    pub fn start(upstream: SocketAddr, opts: &ProxyOpts, dir: &Path) -> Proxy {
        let n = (0..).find(|i| !dir.join(format!("impair{i}.ctl")).exists()).unwrap();
        let control_sock = dir.join(format!("impair{n}.ctl"));
        let log = dir.join(format!("impair{n}.log"));
        let mut cmd = Command::new(blockferry());
        cmd.args(["impair", "--listen", "127.0.0.1:0", "--upstream", &upstream.to_string()])
            .args(["--seed", &opts.seed.to_string()])
            .arg("--control")
            .arg(&control_sock);
        if let Some(d) = &opts.delay {
            cmd.args(["--delay", d]);
        }
        if let Some(j) = &opts.jitter {
            cmd.args(["--jitter", j]);
        }
        if let Some(l) = opts.loss {
            cmd.args(["--loss", &l.to_string()]);
        }
        if let Some(r) = &opts.rate {
            cmd.args(["--rate", r]);
        }
        cmd.args(&opts.extra);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&log).expect("create the impair log"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(a) = line.strip_prefix("listening on ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(a.trim().to_string());
                    }
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a.parse().unwrap_or_else(|e| panic!("impair printed {a:?}: {e}")),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{cmd:?} printed no `listening on` line within 30 s\n--- log\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !control_sock.exists() {
            assert!(Instant::now() < deadline, "impair made no control socket");
            thread::sleep(Duration::from_millis(10));
        }
        Proxy { child, addr, control_sock, log }
    }

    /// Sends one control command (`blackhole on|off`, `loss UP DOWN`, `delay MS`,
    /// `rate BITS|off`, `stats`) and returns the reply line; panics on `error: ...`.
    pub fn control(&self, command: &str) -> String {
        let reply = self
            .try_control(command)
            .unwrap_or_else(|e| panic!("impair control {command:?}: {e:#}"));
        assert!(!reply.starts_with("error"), "impair control {command:?}: {reply}");
        reply
    }

    pub fn try_control(&self, command: &str) -> Result<String> {
        let mut s = UnixStream::connect(&self.control_sock).context("connect")?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(format!("{command}\n").as_bytes())?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).context("read the reply")?;
        Ok(line.trim().to_string())
    }

    pub fn blackhole(&self, on: bool) {
        self.control(if on { "blackhole on" } else { "blackhole off" });
    }

    /// The relay's counters (`stats`), as JSON.
    pub fn stats(&self) -> Value {
        let s = self.control("stats");
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("impair stats {s:?}: {e}"))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// fio

/// Runs fio's nbd engine against `uri` with `args` (e.g. `--rw=randwrite --bs=4k`), with a
/// time limit; panics with its output unless it exits 0. Returns its parsed `--output-format
/// json` report.
pub fn fio_nbd(uri: &str, name: &str, args: &[String], limit: Duration) -> Value {
    crate::proc::require_tool("fio");
    let mut cmd = Command::new("fio");
    cmd.arg(format!("--name={name}"))
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .arg("--output-format=json")
        .args(args)
        // fio saves verify state files in its working directory: not the repository.
        .current_dir(std::env::temp_dir());
    let out = run(&mut cmd, limit);
    assert!(out.success(), "fio failed: {out}");
    // fio may print notes before the JSON.
    let json = out.stdout.find('{').map(|i| &out.stdout[i..]).unwrap_or("");
    serde_json::from_str(json).unwrap_or_else(|e| panic!("fio printed no JSON ({e}): {out}"))
}

// ---------------------------------------------------------------------------------------------
// Stamp writer

/// Size of a stamped block (independent of the volume's tracking block size).
pub const STAMP_BLOCK: u64 = 4096;
const STAMP_MAGIC: u64 = u64::from_le_bytes(*b"BFSTAMP1");

/// Where a stamp run writes and how it is recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StampLayout {
    /// A random id of the run; blocks of other runs fail verification.
    pub run_id: u64,
    /// First stamped block (index in 4 KiB blocks from the start of the volume).
    pub first: u64,
    /// Number of stamped blocks.
    pub blocks: u64,
}

impl StampLayout {
    /// The 4 KiB content of block `index` (absolute) at `counter` (>= 1):
    /// `magic, index, counter, run_id` (u64 LE each) then pseudo-random bytes from all three.
    pub fn block(&self, index: u64, counter: u64) -> Vec<u8> {
        let mut b = vec![0u8; STAMP_BLOCK as usize];
        for (i, v) in [STAMP_MAGIC, index, counter, self.run_id].into_iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        Prng::new(self.run_id ^ index.rotate_left(20) ^ counter.rotate_left(44)).fill(&mut b[32..]);
        b
    }

    /// The counter stamped in `data` for block `index` (0 for an all-zero, never written
    /// block), or why the block is not a valid stamp of this run.
    pub fn decode(&self, index: u64, data: &[u8]) -> Result<u64> {
        if data.iter().all(|&b| b == 0) {
            return Ok(0);
        }
        let word = |i: usize| u64::from_le_bytes(data[i * 8..i * 8 + 8].try_into().unwrap());
        ensure!(word(0) == STAMP_MAGIC, "block {index}: no stamp (torn or foreign data)");
        ensure!(word(1) == index, "block {index}: stamped for block {} (misplaced)", word(1));
        ensure!(
            word(3) == self.run_id,
            "block {index}: run {:#x}, expected {:#x}",
            word(3),
            self.run_id
        );
        let counter = word(2);
        ensure!(counter > 0, "block {index}: counter 0 with data");
        ensure!(
            data == &self.block(index, counter)[..],
            "block {index}: counter {counter} with the wrong payload (torn or corrupted)"
        );
        Ok(counter)
    }

    /// Reads the stamped region of `image` (a file laid out as the volume) and returns the
    /// counter of every stamped block, failing on any block that is not a valid stamp.
    pub fn read_counters(&self, image: &Path) -> Result<Vec<u64>> {
        let mut f = File::open(image).with_context(|| format!("open {}", image.display()))?;
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(self.first * STAMP_BLOCK))?;
        let mut out = Vec::with_capacity(self.blocks as usize);
        let mut buf = vec![0u8; 256 * STAMP_BLOCK as usize];
        let mut i = 0u64;
        while i < self.blocks {
            let n = ((self.blocks - i) as usize).min(256);
            let len = n * STAMP_BLOCK as usize;
            let got = read_full(&mut f, &mut buf[..len]);
            // A short (sparse, unextended) file reads as zeroes beyond its end.
            buf[got..len].fill(0);
            for (k, chunk) in buf[..len].chunks(STAMP_BLOCK as usize).enumerate() {
                out.push(self.decode(self.first + i + k as u64, chunk)?);
            }
            i += n as u64;
        }
        Ok(out)
    }

    /// Checks that every block of `image` carries a counter in `lower[i]..=upper[i]`
    /// (vectors indexed from [`StampLayout::first`]), and returns the counters found.
    pub fn verify_between(&self, image: &Path, lower: &[u64], upper: &[u64]) -> Result<Vec<u64>> {
        let found = self.read_counters(image)?;
        let mut bad = Vec::new();
        for (i, &c) in found.iter().enumerate() {
            if c < lower[i] || c > upper[i] {
                bad.push((self.first + i as u64, c, lower[i], upper[i]));
            }
        }
        if !bad.is_empty() {
            let older = bad.iter().filter(|b| b.1 < b.2).count();
            bail!(
                "{}: {} of {} stamped blocks out of range ({older} older than acknowledged, {} \
                 newer than ever written); first (block, found, min, max): {:?}",
                image.display(),
                bad.len(),
                self.blocks,
                bad.len() - older,
                &bad[..bad.len().min(8)]
            );
        }
        Ok(found)
    }

    /// Every block is at least as new as `acked` (no acknowledged write lost) and no newer
    /// than `issued` (nothing invented).
    pub fn verify_at_least(&self, image: &Path, acked: &[u64], issued: &[u64]) -> Result<()> {
        self.verify_between(image, acked, issued).map(drop)
    }

    /// Every block carries exactly the counter of `acked` (after the writer stopped).
    pub fn verify_exact(&self, image: &Path, acked: &[u64]) -> Result<()> {
        self.verify_between(image, acked, acked).map(drop)
    }
}

/// How a [`StampWriter`] writes.
#[derive(Debug, Clone)]
pub struct StampOpts {
    /// Stamped blocks: a range of 4 KiB block indexes of the volume.
    pub region: Range<u64>,
    /// Writes in flight on the connection.
    pub queue_depth: usize,
    /// At most this many writes per second (`None`: as fast as it goes).
    pub max_iops: Option<u32>,
    pub seed: u64,
}

impl StampOpts {
    pub fn new(region: Range<u64>) -> StampOpts {
        StampOpts { region, queue_depth: 8, max_iops: None, seed: 1 }
    }
}

#[derive(Debug)]
struct StampShared {
    acked: Vec<AtomicU64>,
    issued: Vec<AtomicU64>,
    writes: AtomicU64,
    stop: AtomicBool,
    error: Mutex<Option<String>>,
}

/// Writes stamped 4 KiB blocks at random over NBD, on a thread, until stopped; keeps the
/// acknowledged counter of every block. Never two writes of one block in flight at once, so the
/// acknowledged counter is what a later read must show (or newer, while writes go on).
#[derive(Debug)]
pub struct StampWriter {
    pub layout: StampLayout,
    shared: Arc<StampShared>,
    thread: Option<JoinHandle<()>>,
}

/// What a stopped [`StampWriter`] did.
#[derive(Debug, Clone)]
pub struct StampRun {
    pub layout: StampLayout,
    /// Final acknowledged counter per block (== issued, since all writes completed).
    pub acked: Vec<u64>,
    pub writes: u64,
}

impl StampRun {
    pub fn verify_exact(&self, image: &Path) -> Result<()> {
        self.layout.verify_exact(image, &self.acked)
    }

    /// Blocks written at least once.
    pub fn blocks_written(&self) -> u64 {
        self.acked.iter().filter(|&&c| c > 0).count() as u64
    }
}

impl StampWriter {
    /// Connects to `addr`/`export` and starts writing (panics if the connection fails).
    pub fn start(addr: SocketAddr, export: &str, opts: StampOpts) -> StampWriter {
        let blocks = opts.region.end - opts.region.start;
        assert!(blocks > opts.queue_depth as u64, "region too small for the queue depth");
        let run_id = Prng::new(
            opts.seed
                ^ std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64,
        )
        .next_u64();
        let layout = StampLayout { run_id, first: opts.region.start, blocks };
        let client = nbd::connect(addr, export, false)
            .unwrap_or_else(|e| panic!("stamp writer: NBD connect to {addr}/{export}: {e:#}"));
        let shared = Arc::new(StampShared {
            acked: (0..blocks).map(|_| AtomicU64::new(0)).collect(),
            issued: (0..blocks).map(|_| AtomicU64::new(0)).collect(),
            writes: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            error: Mutex::new(None),
        });
        let sh = shared.clone();
        let thread = thread::spawn(move || {
            if let Err(e) = stamp_loop(client, layout, &opts, &sh) {
                *sh.error.lock().unwrap() = Some(format!("{e:#}"));
            }
        });
        StampWriter { layout, shared, thread: Some(thread) }
    }

    /// Acknowledged writes so far.
    pub fn writes(&self) -> u64 {
        self.shared.writes.load(Relaxed)
    }

    /// A snapshot of the acknowledged counters (indexed from `layout.first`).
    pub fn acked(&self) -> Vec<u64> {
        self.shared.acked.iter().map(|a| a.load(Relaxed)).collect()
    }

    /// A snapshot of the highest counters sent (acknowledged or not).
    pub fn issued(&self) -> Vec<u64> {
        self.shared.issued.iter().map(|a| a.load(Relaxed)).collect()
    }

    /// The error that stopped the writer, if any.
    pub fn error(&self) -> Option<String> {
        self.shared.error.lock().unwrap().clone()
    }

    /// Panics if the writer has stopped on an error.
    pub fn assert_healthy(&self, context: &str) {
        if let Some(e) = self.error() {
            panic!("the stamp writer failed {context}: {e}");
        }
    }

    /// Checks `image` while writing goes on: every block at least as new as acknowledged
    /// before the call... (take `acked` before the image is read, `issued` after).
    pub fn verify_at_least(&self, image: &Path, acked: &[u64]) -> Result<()> {
        let found = self.layout.read_counters(image)?;
        let issued = self.issued();
        let bad: Vec<_> = (0..found.len())
            .filter(|&i| found[i] < acked[i] || found[i] > issued[i])
            .map(|i| (self.layout.first + i as u64, found[i], acked[i], issued[i]))
            .collect();
        ensure!(
            bad.is_empty(),
            "{}: {} blocks out of range; first (block, found, acked, issued): {:?}",
            image.display(),
            bad.len(),
            &bad[..bad.len().min(8)]
        );
        Ok(())
    }

    /// Stops writing, waits for the writes in flight, and returns what was written; panics if
    /// the writer failed.
    pub fn stop(mut self) -> StampRun {
        self.shared.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("the stamp writer thread panicked");
        }
        self.assert_healthy("before it was stopped");
        StampRun { layout: self.layout, acked: self.acked(), writes: self.writes() }
    }
}

impl Drop for StampWriter {
    fn drop(&mut self) {
        self.shared.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn stamp_loop(
    mut client: nbd::Client,
    layout: StampLayout,
    opts: &StampOpts,
    sh: &StampShared,
) -> Result<()> {
    let mut rng = Prng::new(opts.seed ^ layout.run_id);
    // cookie -> (block offset in the region, counter)
    let mut inflight: HashMap<u64, (u64, u64)> = HashMap::new();
    let mut busy = vec![false; layout.blocks as usize];
    let start = Instant::now();
    let mut sent = 0u64;
    loop {
        let stopping = sh.stop.load(Relaxed);
        while !stopping && inflight.len() < opts.queue_depth {
            if let Some(iops) = opts.max_iops {
                let due = start + Duration::from_secs_f64(sent as f64 / f64::from(iops));
                if Instant::now() < due {
                    if inflight.is_empty() {
                        thread::sleep(due - Instant::now());
                    }
                    break;
                }
            }
            let mut i = rng.next_u64() % layout.blocks;
            while busy[i as usize] {
                i = (i + 1) % layout.blocks;
            }
            let counter = sh.issued[i as usize].load(Relaxed) + 1;
            let index = layout.first + i;
            let data = layout.block(index, counter);
            sh.issued[i as usize].store(counter, Relaxed);
            let req = Request::new(CMD_WRITE, index * STAMP_BLOCK, STAMP_BLOCK as u32);
            let cookie = client.send(req, &data).context("sending a stamped write")?;
            busy[i as usize] = true;
            inflight.insert(cookie, (i, counter));
            sent += 1;
        }
        if inflight.is_empty() {
            if stopping {
                return Ok(());
            }
            continue;
        }
        let reply = client.recv().context("waiting for a stamped write's reply")?;
        let (i, counter) = inflight
            .remove(&reply.cookie)
            .with_context(|| format!("a reply for unknown cookie {:#x}", reply.cookie))?;
        busy[i as usize] = false;
        ensure!(
            reply.error == 0,
            "write of block {} (counter {counter}) failed: {}",
            layout.first + i,
            reply.describe_error()
        );
        sh.acked[i as usize].store(counter, Relaxed);
        sh.writes.fetch_add(1, Relaxed);
    }
}

/// Blocks whose counter differs between two snapshots of [`StampWriter::acked`].
pub fn changed_blocks(before: &[u64], after: &[u64]) -> u64 {
    before.iter().zip(after).filter(|(a, b)| a != b).count() as u64
}

/// Waits for `child` with a limit (re-exported for tests that spawn their own tools).
pub fn wait_child(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    wait_timeout(child, limit)
}

/// Writes one 4 KiB block through a fresh NBD connection and reads it back: the agent still
/// serves the volume.
pub fn check_nbd_serves(pair: &Pair, offset: u64) {
    let mut c = pair.nbd();
    c.check_serves(offset, 0x5a)
        .unwrap_or_else(|e| panic!("the agent no longer serves NBD: {e:#}\n{}", pair.describe()));
    let _ = c.disconnect();
}

/// A run of `blockferry` with arguments and a limit, panicking unless it exits 0.
pub fn blockferry_ok(args: &[&str], limit: Duration) -> Output {
    run_ok(Command::new(blockferry()).args(args), limit)
}
