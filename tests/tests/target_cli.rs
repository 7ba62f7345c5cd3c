//! `blockferry target`, `status` and `verify` from the command line: a target starts with a
//! fresh key pair, answers `status` on its admin socket, survives SIGKILL (its stale socket is
//! replaced on restart), stops cleanly on SIGTERM, and bad flags fail with clear messages.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use blockferry_tests::target::{keygen, Target, TargetOpts};
use blockferry_tests::{blockferry, run, tempdir, Output};

const LIMIT: Duration = Duration::from_secs(30);

fn blockferry_cmd(args: &[&str]) -> Output {
    run(Command::new(blockferry()).args(args), LIMIT)
}

/// Asserts a failure whose stderr mentions every one of `needles` (case-insensitively).
fn assert_fails_with(out: &Output, needles: &[&str]) {
    assert!(!out.success(), "expected a failure:\n{out}");
    assert!(out.status.code().is_some(), "killed by a signal:\n{out}");
    assert!(!out.both().contains("panicked"), "the CLI panicked instead of reporting:\n{out}");
    let text = out.stderr.to_lowercase();
    for n in needles {
        assert!(text.contains(&n.to_lowercase()), "stderr does not mention {n:?}:\n{out}");
    }
}

#[test]
fn target_serves_status_and_restarts() {
    let tmp = tempdir();
    let agent_fp = keygen(&tmp.path().join("agent-keys"));
    let target_fp = keygen(&tmp.path().join("target-keys"));
    assert_ne!(agent_fp, target_fp);

    let opts = TargetOpts::new(
        &tmp.path().join("replicas"),
        &tmp.path().join("target-keys"),
        &format!("{agent_fp}:vm1,db"),
    );
    let mut target = Target::start(opts);
    assert_eq!(target.fingerprint, target_fp, "{}", target.listening_line);
    assert_eq!(target.addr.ip().to_string(), "127.0.0.1");
    assert_ne!(target.addr.port(), 0);
    let mode = std::fs::metadata(&target.admin).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "admin socket mode {mode:o}");

    let status = target.status();
    assert_eq!(status, serde_json::json!({"role": "target", "volumes": []}));
    assert!(target.volume_status("vm1").is_none());
    let admin = target.admin.to_str().unwrap().to_string();
    let out = blockferry_cmd(&["status", "--admin", &admin]);
    assert!(out.success(), "{out}");
    assert!(out.stdout.contains("no replicas"), "{out}");

    // The agent's routes are not the target's: a clear error, not a hang or a crash.
    let out = blockferry_cmd(&["verify", "vm1", "--admin", &admin]);
    assert_eq!(out.status.code(), Some(2), "{out}");
    assert!(out.stderr.contains("no such route"), "{out}");

    // A crash leaves the socket file behind; the restarted target replaces it.
    target.kill9();
    assert!(target.admin.exists(), "SIGKILL cannot remove the socket");
    target.restart();
    assert_eq!(target.status()["role"], "target");

    // A second target on the same admin socket is refused while the first runs.
    let mut second =
        TargetOpts::new(&tmp.path().join("replicas2"), &tmp.path().join("target-keys"), &agent_fp);
    second.admin = Some(target.admin.clone());
    let out = run(&mut second.command(), LIMIT);
    assert_fails_with(&out, &["in use"]);
    assert!(target.is_alive());

    // SIGTERM: a clean exit that removes the socket.
    let status = target.terminate(LIMIT);
    assert!(status.success(), "exit status {status}\n{}", target.log_text());
    assert!(!target.admin.exists(), "the admin socket is left after SIGTERM");
}

#[test]
fn target_rejects_bad_flags() {
    let tmp = tempdir();
    let agent_fp = keygen(&tmp.path().join("agent-keys"));
    keygen(&tmp.path().join("target-keys"));
    let dir = tmp.path().join("replicas");
    let keys = tmp.path().join("target-keys");
    let sock = tmp.path().join("t.sock");
    let (dir, keys, sock) = (dir.to_str().unwrap(), keys.to_str().unwrap(), sock.to_str().unwrap());
    let listen = ["--listen", "127.0.0.1:0"];
    let target = |args: &[&str]| {
        let mut all = vec!["target"];
        all.extend_from_slice(&listen);
        all.extend_from_slice(&["--dir", dir, "--admin", sock]);
        all.extend_from_slice(args);
        blockferry_cmd(&all)
    };

    let missing = tmp.path().join("no-keys");
    let missing = missing.to_str().unwrap();
    let out = target(&["--key-dir", missing, "--allow", &agent_fp]);
    assert_fails_with(&out, &[missing, &format!("run `blockferry keygen --dir {missing}`")]);
    // A directory without a key pair.
    let empty = tmp.path().join("empty-keys");
    std::fs::create_dir(&empty).unwrap();
    let empty = empty.to_str().unwrap();
    let out = target(&["--key-dir", empty, "--allow", &agent_fp]);
    assert_fails_with(&out, &[&format!("blockferry keygen --dir {empty}")]);

    let out = target(&["--key-dir", keys]);
    assert_fails_with(&out, &["no agent is allowed", "--allow"]);

    for bad in ["sha256:1234", "md5:00", "zz", &format!("{agent_fp}:vm1,")] {
        let out = target(&["--key-dir", keys, "--allow", bad]);
        assert_fails_with(&out, &["--allow", bad]);
    }
    let out = target(&["--key-dir", keys, "--allow", "sha256:1234"]);
    assert_fails_with(&out, &["expected 64", "blockferry keygen"]);

    let out = blockferry_cmd(&["target", "--dir", dir, "--key-dir", keys, "--allow", &agent_fp]);
    assert_fails_with(&out, &["--listen", "is required"]);

    // Nothing was started: no socket, no replica directory.
    assert!(!std::path::Path::new(sock).exists());
    assert!(!std::path::Path::new(dir).exists(), "a failed start made {dir}");

    // status and verify without a daemon: a clear error (verify: exit status 2).
    let out = blockferry_cmd(&["status", "--admin", sock]);
    assert_fails_with(&out, &["cannot reach", sock]);
    let out = blockferry_cmd(&["verify", "vm1", "--admin", sock]);
    assert_eq!(out.status.code(), Some(2), "{out}");
    assert_fails_with(&out, &["cannot reach the agent's admin socket", sock]);
}
