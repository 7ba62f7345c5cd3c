//! `blockferry demo`, the first thing a newcomer runs: it makes a volume, serves it over NBD,
//! says how to attach it, shows live counters, and keeps the data for the next run.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use blockferry_tests::proc::wait_timeout;
use blockferry_tests::{blockferry, require_tool, run_ok, tempdir};

/// Runs the demo for `seconds`, calls `during(uri)` once it serves, and returns its stdout.
fn run_demo(dir: &std::path::Path, seconds: u64, during: impl FnOnce(&str)) -> String {
    let mut child = Command::new(blockferry())
        .args(["demo", "--listen", "127.0.0.1:0", "--seconds", &seconds.to_string(), "--dir"])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start blockferry demo");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap_or_default();
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let uri = loop {
        let line = rx.recv_timeout(Duration::from_secs(30)).expect("the demo says where it serves");
        if let Some(rest) = line.strip_prefix("serving volume demo") {
            let at = rest.find(" at ").expect("serving line names the URI");
            break rest[at + 4..].trim().to_string();
        }
    };
    assert!(uri.starts_with("nbd://127.0.0.1:") && uri.ends_with("/demo"), "uri {uri}");
    during(&uri);
    let status = wait_timeout(&mut child, Duration::from_secs(seconds + 30)).expect("demo stops");
    assert!(status.success(), "demo exited with {status}");
    reader.join().unwrap()
}

#[test]
fn demo_serves_counts_and_keeps_the_volume() {
    require_tool("qemu-io");
    let tmp = tempdir();
    let limit = Duration::from_secs(60);
    let first = run_demo(tmp.path(), 4, |uri| {
        run_ok(
            Command::new("qemu-io").args([
                "-f",
                "raw",
                "-c",
                "write -P 0x5a 0 4M",
                "-c",
                "read -P 0x5a 0 4M",
                uri,
            ]),
            limit,
        );
        std::thread::sleep(Duration::from_millis(1500)); // a counters tick
    });
    assert!(first.contains("created the demo volume"), "{first}");
    for hint in ["nbdinfo nbd://", "qemu-system-x86_64", "nbdfuse", "losetup", "nbd-client"] {
        assert!(first.contains(hint), "attach hint {hint:?} missing:\n{first}");
    }
    assert!(
        first.lines().any(|l| l.starts_with("conns")
            && l.contains("total read")
            && !l.contains("written 0.0 B")),
        "no live counters with the 4 MiB written:\n{first}"
    );
    let meta = std::fs::read_to_string(tmp.path().join("demo/volume.toml")).unwrap();
    assert!(meta.contains("size = 1073741824"), "the demo volume is 1 GiB by default: {meta}");

    // A second run reuses the volume and its data.
    let second = run_demo(tmp.path(), 2, |uri| {
        run_ok(
            Command::new("qemu-io").args(["-f", "raw", "-r", "-c", "read -P 0x5a 0 4M", uri]),
            limit,
        );
    });
    assert!(second.contains("using the existing demo volume"), "{second}");
}
