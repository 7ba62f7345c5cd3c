//! A `blockferry target` child process, killed when its guard drops, and `blockferry keygen`.
//!
//! Every target serves an admin socket, as in production: the one [`TargetOpts::admin`] names,
//! else `<dir>.admin.sock` beside its replica directory (never the machine-wide default, which
//! tests running in parallel would share). Its stderr goes to `<dir>.log` (appended to across
//! restarts).

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use crate::bin::blockferry;
use crate::proc::run_ok;

/// Makes a key pair in `dir` with `blockferry keygen --dir DIR` and returns its fingerprint
/// (`sha256:` + 64 hex digits).
pub fn keygen(dir: &Path) -> String {
    let mut cmd = Command::new(blockferry());
    cmd.args(["keygen", "--json", "--dir"]).arg(dir);
    let out = run_ok(&mut cmd, Duration::from_secs(30));
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("keygen --json printed no JSON ({e}):\n{out}"));
    let fp = v["fingerprint"].as_str().unwrap_or_else(|| panic!("no fingerprint in {v}"));
    assert!(fp.starts_with("sha256:") && fp.len() == 71, "odd fingerprint {fp:?}");
    fp.to_string()
}

/// How to start a target.
#[derive(Debug, Clone, Default)]
pub struct TargetOpts {
    /// The replica directory (`--dir`).
    pub dir: PathBuf,
    /// The target's key pair (`--key-dir`, see [`keygen`]).
    pub key_dir: PathBuf,
    /// `--allow` arguments: `FINGERPRINT` or `FINGERPRINT:vol1,vol2`.
    pub allow: Vec<String>,
    /// The admin socket; `None`: `<dir>.admin.sock`.
    pub admin: Option<PathBuf>,
    /// The QUIC (UDP) address; `None`: `127.0.0.1:0` (any free port).
    pub listen: Option<SocketAddr>,
    /// More arguments (e.g. `--config FILE`).
    pub extra: Vec<String>,
    /// Extra environment variables (e.g. `RUST_LOG`, `BLOCKFERRY_FAILPOINTS`).
    pub env: Vec<(String, String)>,
}

impl TargetOpts {
    pub fn new(dir: &Path, key_dir: &Path, allow: &str) -> TargetOpts {
        TargetOpts {
            dir: dir.to_path_buf(),
            key_dir: key_dir.to_path_buf(),
            allow: vec![allow.to_string()],
            ..TargetOpts::default()
        }
    }

    /// The command line (with `--admin` and `--listen` as given, their defaults otherwise).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(blockferry());
        cmd.arg("target").arg("--dir").arg(&self.dir).arg("--key-dir").arg(&self.key_dir);
        let listen = self.listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        cmd.arg("--listen").arg(listen.to_string());
        for a in &self.allow {
            cmd.arg("--allow").arg(a);
        }
        cmd.arg("--admin").arg(self.admin_path());
        cmd.args(&self.extra);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    fn admin_path(&self) -> PathBuf {
        self.admin.clone().unwrap_or_else(|| self.dir.with_extension("admin.sock"))
    }
}

/// A running target. Dropping it kills the process; if the test is panicking, its log is
/// printed.
#[derive(Debug)]
pub struct Target {
    child: Child,
    /// The QUIC address agents connect to.
    pub addr: SocketAddr,
    /// The admin socket (`blockferry status --admin PATH`).
    pub admin: PathBuf,
    /// The replica directory.
    pub dir: PathBuf,
    /// The target's fingerprint, which agents pin.
    pub fingerprint: String,
    pub log: PathBuf,
    pub listening_line: String,
    opts: TargetOpts,
}

impl Target {
    /// Starts the target and waits for its `target listening on ADDR (fingerprint FP; ...)`
    /// line.
    pub fn start(opts: TargetOpts) -> Target {
        let log = opts.dir.with_extension("log");
        let (child, line) = spawn(&opts, &log);
        let (addr, fingerprint) = parse_listening_line(&line)
            .unwrap_or_else(|| panic!("cannot parse the target's line {line:?}"));
        Target {
            child,
            addr,
            admin: opts.admin_path(),
            dir: opts.dir.clone(),
            fingerprint,
            log,
            listening_line: line,
            opts,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `blockferry status --admin ADMIN --json`, parsed (panics with the output on failure).
    pub fn status(&self) -> serde_json::Value {
        let mut cmd = Command::new(blockferry());
        cmd.args(["status", "--json", "--admin"]).arg(&self.admin);
        let out = run_ok(&mut cmd, Duration::from_secs(30));
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("status --json printed no JSON ({e}):\n{out}"))
    }

    /// The status row of `volume` (by name), if the target has it.
    pub fn volume_status(&self, volume: &str) -> Option<serde_json::Value> {
        let status = self.status();
        status["volumes"].as_array()?.iter().find(|v| v["volume"] == volume).cloned()
    }

    /// The replica image of `volume` (by name); panics if the target has no such replica.
    pub fn replica_path(&self, volume: &str) -> PathBuf {
        let v = self.volume_status(volume).unwrap_or_else(|| {
            panic!("the target has no replica of {volume:?}: {}", self.status())
        });
        let path = v["replica_path"].as_str().unwrap_or_default();
        assert!(!path.is_empty(), "no replica_path for {volume:?}: {v}");
        PathBuf::from(path)
    }

    /// True while the process has not exited.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the target with SIGKILL (a crash: nothing is flushed or removed) and waits for it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM (a clean stop) and waits up to `limit` for the exit, panicking (with the
    /// log) if the target is still running then.
    pub fn terminate(&mut self, limit: Duration) -> std::process::ExitStatus {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).expect("a child pid is > 0");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .expect("send SIGTERM to the target");
        match crate::proc::wait_timeout(&mut self.child, limit) {
            Some(status) => status,
            None => panic!(
                "the target did not exit within {limit:?} of SIGTERM\n--- target log\n{}",
                self.log_text()
            ),
        }
    }

    /// Starts the target again (killing it first if it still runs) on the same address, admin
    /// socket and directory, so agents reconnect to it.
    pub fn restart(&mut self) {
        self.kill9();
        let mut opts = self.opts.clone();
        opts.listen = Some(self.addr);
        let (child, line) = spawn(&opts, &self.log);
        let (addr, fingerprint) = parse_listening_line(&line)
            .unwrap_or_else(|| panic!("cannot parse the target's line {line:?}"));
        assert_eq!(addr, self.addr, "the restarted target listens elsewhere");
        assert_eq!(fingerprint, self.fingerprint, "the restarted target has another key");
        self.child = child;
        self.listening_line = line;
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.kill9();
        if thread::panicking() {
            eprintln!("--- target log ({})\n{}", self.log.display(), self.log_text());
        }
    }
}

/// Spawns the target (stderr appended to `log`) and waits up to 60 s for its listening line.
fn spawn(opts: &TargetOpts, log: &Path) -> (Child, String) {
    let mut cmd = opts.command();
    let log_file =
        OpenOptions::new().create(true).append(true).open(log).expect("open the target log");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .env("RUST_BACKTRACE", "1")
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    // Keep draining stdout on a thread so the target never blocks on a full pipe; hand the
    // first "listening" line over a channel so the wait can time out.
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.contains("target listening on") {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(line);
                }
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(line) => (child, line),
        Err(_) => {
            let status = child.try_wait().ok().flatten();
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "target {cmd:?} did not print a `target listening on` line within 60 s (exit \
                 status: {status:?})\n--- target log\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
    }
}

/// Parses `target listening on 127.0.0.1:4433 (fingerprint sha256:…; admin on PATH)` into the
/// address and the fingerprint.
pub fn parse_listening_line(line: &str) -> Option<(SocketAddr, String)> {
    let rest = line.split("target listening on ").nth(1)?;
    let addr = rest.split_whitespace().next()?.parse().ok()?;
    let fp = rest.split("fingerprint ").nth(1)?;
    let fp: String = fp.chars().take_while(|c| !matches!(c, ';' | ')' | ' ')).collect();
    Some((addr, fp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_listening_line() {
        let (addr, fp) = parse_listening_line(
            "target listening on 127.0.0.1:4433 (fingerprint sha256:abcd; admin on /x.sock)",
        )
        .unwrap();
        assert_eq!(addr, SocketAddr::from(([127, 0, 0, 1], 4433)));
        assert_eq!(fp, "sha256:abcd");
        let (_, fp) =
            parse_listening_line("target listening on [::1]:5 (fingerprint sha256:ef)").unwrap();
        assert_eq!(fp, "sha256:ef");
        assert!(parse_listening_line("listening on 127.0.0.1:1").is_none());
    }
}
