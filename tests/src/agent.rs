//! A `blockferry agent` child process, killed when its guard drops.
//!
//! Every agent serves an admin socket, as in production: the one [`AgentConfig::admin`] names,
//! else `<log without extension>.admin.sock` beside its log (never the machine-wide default,
//! which tests running in parallel would share).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use crate::bin::blockferry;

/// How to start an agent. Fields left `None` are not passed (the agent's defaults apply).
#[derive(Debug, Clone, Default)]
pub struct AgentConfig {
    pub volumes: Vec<PathBuf>,
    pub unix: Option<PathBuf>,
    /// The admin socket (`--admin`); `None`: beside the log (see the module docs).
    pub admin: Option<PathBuf>,
    pub read_only: bool,
    /// `none` or `writeback`.
    pub cache: Option<&'static str>,
    /// `uring` or `sync`.
    pub engine: Option<&'static str>,
    pub extra: Vec<String>,
    /// Extra environment variables (e.g. `BLOCKFERRY_FAILPOINTS`).
    pub env: Vec<(String, String)>,
}

impl AgentConfig {
    pub fn new(volume: &Path) -> AgentConfig {
        AgentConfig { volumes: vec![volume.to_path_buf()], ..AgentConfig::default() }
    }

    pub fn volume(mut self, dir: &Path) -> Self {
        self.volumes.push(dir.to_path_buf());
        self
    }

    pub fn unix(mut self, path: &Path) -> Self {
        self.unix = Some(path.to_path_buf());
        self
    }

    pub fn admin(mut self, path: &Path) -> Self {
        self.admin = Some(path.to_path_buf());
        self
    }

    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    pub fn cache(mut self, mode: &'static str) -> Self {
        self.cache = Some(mode);
        self
    }

    pub fn engine(mut self, engine: &'static str) -> Self {
        self.engine = Some(engine);
        self
    }

    /// The command line, with `--listen 127.0.0.1:0` (and `--admin` when [`Self::admin`] is
    /// set; [`Self::start`] always sets it).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(blockferry());
        cmd.arg("agent");
        for v in &self.volumes {
            cmd.arg("--volume").arg(v);
        }
        cmd.args(["--listen", "127.0.0.1:0"]);
        if let Some(u) = &self.unix {
            cmd.arg("--unix").arg(u);
        }
        if let Some(a) = &self.admin {
            cmd.arg("--admin").arg(a);
        }
        if self.read_only {
            cmd.arg("--read-only");
        }
        if let Some(c) = self.cache {
            cmd.args(["--cache", c]);
        }
        if let Some(e) = self.engine {
            cmd.args(["--engine", e]);
        }
        cmd.args(&self.extra);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Starts the agent, writing its stderr to `log`, and waits for its "listening on" line.
    pub fn start(&self, log: &Path) -> Agent {
        Agent::start(self, log)
    }
}

/// A running agent. Dropping it kills the process; if the test is panicking, its log is printed.
#[derive(Debug)]
pub struct Agent {
    child: Child,
    pub addr: SocketAddr,
    pub unix: Option<PathBuf>,
    /// The admin socket (`blockferry cbt --admin PATH`).
    pub admin: PathBuf,
    pub log: PathBuf,
    pub listening_line: String,
}

impl Agent {
    fn start(config: &AgentConfig, log: &Path) -> Agent {
        let mut config = config.clone();
        let admin = config.admin.get_or_insert_with(|| log.with_extension("admin.sock")).clone();
        let mut cmd = config.command();
        let log_file = File::create(log).expect("create the agent log");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .env("RUST_BACKTRACE", "1")
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd));
        // Read stdout on a thread (and keep draining it, so the agent never blocks on a full
        // pipe); hand the first "listening" line over a channel so the wait can time out.
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains("listening") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(line);
                    }
                }
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => line,
            Err(_) => {
                let status = child.try_wait().ok().flatten();
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "agent {cmd:?} did not print a `listening on` line within 60 s (exit status: \
                     {status:?})\n--- agent log\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
        };
        let addr = parse_listen_addr(&line)
            .unwrap_or_else(|| panic!("cannot find 127.0.0.1:PORT in the agent's line {line:?}"));
        Agent {
            child,
            addr,
            unix: config.unix.clone(),
            admin,
            log: log.to_path_buf(),
            listening_line: line,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `nbd://127.0.0.1:PORT/NAME`.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.addr, export)
    }

    /// `nbd+unix:///NAME?socket=PATH` (the agent must have been started with a unix socket).
    pub fn unix_uri(&self, export: &str) -> String {
        let sock = self.unix.as_ref().expect("agent started without --unix");
        format!("nbd+unix:///{export}?socket={}", sock.display())
    }

    /// True while the process has not exited.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Panics (with the log) unless the process is still running.
    pub fn assert_alive(&mut self, context: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("the agent exited ({status}) {context}\n--- agent log\n{}", self.log_text());
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The agent's peak resident memory (VmHWM) in bytes, from /proc.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read the agent's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .expect("VmHWM in /proc/PID/status")
    }

    /// Sends SIGTERM (a clean stop) and waits up to `limit` for the exit, panicking (with the
    /// log) if the agent is still running then.
    pub fn terminate(mut self, limit: Duration) -> std::process::ExitStatus {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).expect("a child pid is > 0");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .expect("send SIGTERM to the agent");
        match crate::proc::wait_timeout(&mut self.child, limit) {
            Some(status) => status,
            None => panic!(
                "the agent did not exit within {limit:?} of SIGTERM\n--- agent log\n{}",
                self.log_text()
            ),
        }
    }

    /// Waits up to `limit` for the agent to exit by itself (e.g. at a fault point).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        crate::proc::wait_timeout(&mut self.child, limit)
    }

    /// Kills the agent now and waits for it.
    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            eprintln!("--- agent log ({})\n{}", self.log.display(), self.log_text());
        }
    }
}

/// Finds `127.0.0.1:PORT` in a line like `listening on 127.0.0.1:40123 (2 exports)`.
pub fn parse_listen_addr(line: &str) -> Option<SocketAddr> {
    let start = line.find("127.0.0.1:")?;
    let rest = &line[start + "127.0.0.1:".len()..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    let port: u16 = digits.parse().ok()?;
    if port == 0 {
        return None;
    }
    Some(SocketAddr::from(([127, 0, 0, 1], port)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_listening_line() {
        let a = parse_listen_addr("listening on 127.0.0.1:40123 (exports: a, b)").unwrap();
        assert_eq!(a.port(), 40123);
        assert!(parse_listen_addr("listening on 127.0.0.1:0").is_none());
        assert!(parse_listen_addr("listening on [::1]:5").is_none());
    }
}
