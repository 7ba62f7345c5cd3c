//! Running external tools with a time limit, so a hang fails a test instead of blocking CI.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Which apt package provides each tool the tests use (the list `.ci/run` must install).
pub const TOOL_PACKAGES: &[(&str, &str)] = &[
    ("nbdinfo", "libnbd-bin"),
    ("nbdcopy", "libnbd-bin"),
    ("nbdfuse", "libnbd-bin"),
    ("fusermount3", "fuse3"),
    ("qemu-io", "qemu-utils"),
    ("qemu-img", "qemu-utils"),
    ("mkfs.ext4", "e2fsprogs"),
    ("fsck.ext4", "e2fsprogs"),
    ("losetup", "util-linux"),
    ("fsfreeze", "util-linux"),
    ("mount", "mount"),
    ("umount", "mount"),
    ("sha256sum", "coreutils"),
];

/// Fails the test (never skips it) when `tool` is not on PATH.
pub fn require_tool(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    if !found {
        let package = TOOL_PACKAGES
            .iter()
            .find(|(t, _)| *t == tool)
            .map(|(_, p)| *p)
            .unwrap_or("(unknown package)");
        panic!(
            "required tool `{tool}` is not installed: .ci/run must install the apt package \
             {package} (these tests never skip)"
        );
    }
}

/// The result of [`run`].
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub command: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// stdout and stderr together, for messages.
    pub fn both(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` exited with {}\n--- stdout\n{}\n--- stderr\n{}",
            self.command, self.status, self.stdout, self.stderr
        )
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion with captured output, killing it and panicking after `limit`.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let command = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{command}`: {e}"));
    let out = drain(child.stdout.take().expect("piped"));
    let err = drain(child.stderr.take().expect("piped"));
    let Some(status) = wait_timeout(&mut child, limit) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "`{command}` did not finish within {limit:?} (killed)\n--- stderr\n{}",
            err.join().unwrap_or_default()
        )
    };
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        command,
    }
}

/// Like [`run`], and panics with the command's output unless it exits 0.
pub fn run_ok(cmd: &mut Command, limit: Duration) -> Output {
    let out = run(cmd, limit);
    assert!(out.success(), "{out}");
    out
}

/// Convenience: runs `program args...` with [`run_ok`].
pub fn sh_ok(program: &str, args: &[&str], limit: Duration) -> Output {
    run_ok(Command::new(program).args(args), limit)
}

fn drain(mut r: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Waits for `child` up to `limit`; `None` if it is still running.
pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() >= deadline => return None,
            Ok(None) => thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("waiting for a child process: {e}"),
        }
    }
}

/// sha256 of a file as hex, with `sha256sum`.
pub fn sha256_file(path: &Path) -> String {
    require_tool("sha256sum");
    let out = run_ok(Command::new("sha256sum").arg(path), Duration::from_secs(120));
    out.stdout.split_whitespace().next().expect("sha256sum prints a hash").to_string()
}
