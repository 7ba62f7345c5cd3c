//! `blockferry cbt` against a running agent through its admin socket: bitmaps record exactly
//! the blocks real NBD clients change, and every misuse fails with a clear message.
//!
//! Whether bitmaps survive restarts and crashes is change tracking's own business
//! (agent/src/cbt); nothing here depends on it.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use blockferry_tests::{
    blockferry, create_volume, require_tool, run, run_ok, tempdir, AgentConfig, Output,
};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

/// `blockferry cbt ARGS... --admin SOCKET`.
fn cbt(admin: &Path, args: &[&str]) -> Output {
    run(Command::new(blockferry()).arg("cbt").args(args).arg("--admin").arg(admin), LIMIT)
}

fn cbt_ok(admin: &Path, args: &[&str]) -> Output {
    let out = cbt(admin, args);
    assert!(out.success(), "{out}");
    out
}

fn cbt_json(admin: &Path, args: &[&str]) -> Value {
    let out = cbt_ok(admin, args);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

/// Asserts a clean failure (an exit code, no panic) whose stderr mentions every needle.
fn assert_fails_with(out: &Output, needles: &[&str]) {
    assert!(!out.success(), "expected a failure:\n{out}");
    assert!(out.status.code().is_some(), "killed by a signal:\n{out}");
    assert!(!out.both().contains("panicked"), "the CLI panicked instead of reporting:\n{out}");
    for n in needles {
        assert!(out.stderr.contains(n), "stderr does not mention {n:?}:\n{out}");
    }
}

/// Runs qemu-io commands against `uri` (one connection, in order).
fn qemu_io(uri: &str, commands: &[&str]) {
    require_tool("qemu-io");
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    run_ok(cmd.arg(uri), LIMIT);
}

fn extents(v: &Value) -> Vec<(u64, u64)> {
    v["extents"]
        .as_array()
        .unwrap_or_else(|| panic!("no extents in {v:#}"))
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

#[test]
fn bitmaps_record_exactly_the_blocks_nbd_clients_change() {
    let tmp = tempdir();
    let vol = tmp.path().join("vm1");
    create_volume(&vol, "64M", &[]);
    let admin = tmp.path().join("admin.sock");
    let mut agent = AgentConfig::new(&vol).admin(&admin).start(&tmp.path().join("agent.log"));
    assert!(agent.listening_line.contains(&format!("admin on {}", admin.display())));
    let uri = agent.uri("vm1");

    let out = cbt_ok(&admin, &["create", "vm1", "nightly"]);
    assert_eq!(out.stdout, "created bitmap nightly on volume vm1 (granularity 4K)\n");
    let list = cbt_json(&admin, &["list", "vm1", "--json"]);
    assert_eq!(
        list,
        json!([{"name": "nightly", "dirty_bytes": 0, "granularity": 4096, "generation": 0}])
    );

    // Aligned writes, an unaligned one (its whole block is dirty), zeroes and a discard are
    // changes; reads are not.
    qemu_io(
        &uri,
        &[
            "write -P 0xab 1M 64k",
            "write -P 0xcd 10M 4k",
            "write -P 0x11 20971521 10",
            "write -z 30M 8k",
            "discard 40M 4k",
            "read 0 8M",
        ],
    );
    let v = cbt_json(&admin, &["extents", "vm1", "nightly", "--json"]);
    let want =
        [(MIB, 65536), (10 * MIB, 4096), (20 * MIB, 4096), (30 * MIB, 8192), (40 * MIB, 4096)];
    assert_eq!(extents(&v), want, "{v:#}");
    assert_eq!(v["volume"], "vm1");
    assert_eq!(v["bitmap"], "nightly");
    assert_eq!(v["granularity"], 4096);
    assert_eq!(v["dirty_bytes"], 86016);

    // The human forms.
    let out = cbt_ok(&admin, &["extents", "vm1", "nightly"]);
    assert_eq!(
        out.stdout,
        "1048576 65536\n10485760 4096\n20971520 4096\n31457280 8192\n41943040 4096\n\
         total: 5 extents, 84K dirty (86016 bytes)\n"
    );
    // A bitmap created now starts empty; the first one keeps its bits.
    cbt_ok(&admin, &["create", "vm1", "after-writes"]);
    let out = cbt_ok(&admin, &["list", "vm1"]);
    let lines: Vec<Vec<&str>> =
        out.stdout.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(
        lines,
        [
            vec!["NAME", "DIRTY", "GENERATION"],
            vec!["after-writes", "0", "0"],
            vec!["nightly", "84K", "0"]
        ],
        "{out}"
    );

    // Clear: empty, generation 1; the next write shows up alone, in both bitmaps.
    let out = cbt_ok(&admin, &["clear", "vm1", "nightly"]);
    assert_eq!(out.stdout, "cleared bitmap nightly on volume vm1 (generation 1)\n");
    let v = cbt_json(&admin, &["extents", "vm1", "nightly", "--json"]);
    assert_eq!((extents(&v), &v["dirty_bytes"]), (vec![], &json!(0)), "{v:#}");
    assert_eq!(
        cbt_ok(&admin, &["extents", "vm1", "nightly"]).stdout,
        "total: 0 extents, 0 dirty (0 bytes)\n"
    );
    qemu_io(&uri, &["write -P 0x22 63M 1M"]);
    for name in ["nightly", "after-writes"] {
        let v = cbt_json(&admin, &["extents", "vm1", name, "--json"]);
        assert_eq!(extents(&v), [(63 * MIB, MIB)], "{name}: {v:#}");
    }
    let list = cbt_json(&admin, &["list", "vm1", "--json"]);
    assert_eq!(list[1]["name"], "nightly");
    assert_eq!(list[1]["generation"], 1);
    assert_eq!(list[1]["dirty_bytes"], MIB);

    // Remove, in either position of --admin.
    let out = cbt_ok(&admin, &["remove", "vm1", "nightly"]);
    assert_eq!(out.stdout, "removed bitmap nightly from volume vm1\n");
    let out = run_ok(
        Command::new(blockferry()).arg("cbt").arg("--admin").arg(&admin).args([
            "remove",
            "vm1",
            "after-writes",
        ]),
        LIMIT,
    );
    assert!(out.stdout.contains("removed bitmap after-writes"), "{out}");
    assert_eq!(cbt_ok(&admin, &["list", "vm1"]).stdout, "volume vm1 has no bitmaps\n");
    assert_eq!(cbt_json(&admin, &["list", "vm1", "--json"]), json!([]));
    agent.assert_alive("after the cbt commands");
}

#[test]
fn cbt_misuse_fails_with_a_clear_message() {
    let tmp = tempdir();
    let vol = tmp.path().join("vm1");
    create_volume(&vol, "16M", &[]);
    let untracked = tmp.path().join("scratch");
    create_volume(&untracked, "16M", &[]);
    // The second volume has change tracking turned off in the config file.
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!("[[volume]]\ndir = {:?}\nchange-tracking = false\n", untracked.to_str().unwrap()),
    )
    .unwrap();
    let admin = tmp.path().join("admin.sock");
    let mut cfg = AgentConfig::new(&vol).admin(&admin);
    cfg.extra = vec!["--config".into(), config.to_str().unwrap().into()];
    let mut agent = cfg.start(&tmp.path().join("agent.log"));

    cbt_ok(&admin, &["create", "vm1", "b1"]);
    assert_fails_with(
        &cbt(&admin, &["create", "vm1", "b1"]),
        &["volume \"vm1\" already has a bitmap named \"b1\""],
    );
    assert_fails_with(&cbt(&admin, &["create", "vm1", "a b"]), &["bad bitmap name \"a b\""]);
    assert_fails_with(&cbt(&admin, &["create", "vm1", "x/y"]), &["bad bitmap name \"x/y\""]);
    let long = "n".repeat(65);
    assert_fails_with(&cbt(&admin, &["create", "vm1", &long]), &["bad bitmap name"]);
    for args in [
        &["clear", "vm1", "nope"][..],
        &["remove", "vm1", "nope"][..],
        &["extents", "vm1", "nope"][..],
        &["extents", "vm1", "nope", "--json"][..],
    ] {
        assert_fails_with(&cbt(&admin, args), &["volume \"vm1\" has no bitmap named \"nope\""]);
    }
    for args in [&["list", "vm9"][..], &["create", "vm9", "b"][..], &["extents", "vm9", "b"][..]] {
        assert_fails_with(
            &cbt(&admin, args),
            &["no volume named \"vm9\"", "this agent serves: scratch, vm1"],
        );
    }
    assert_fails_with(
        &cbt(&admin, &["create", "scratch", "b"]),
        &["change tracking is off for volume \"scratch\"", "change-tracking = true"],
    );
    assert_fails_with(&cbt(&admin, &["list", "scratch"]), &["change tracking is off"]);
    // The failures changed nothing.
    let list = cbt_json(&admin, &["list", "vm1", "--json"]);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    agent.assert_alive("after refused cbt commands");

    // No agent on the socket: a path that does not exist, and a stale socket file.
    let nowhere = tmp.path().join("nowhere.sock");
    let n = nowhere.display().to_string();
    let hint = format!("is `blockferry agent --admin {n}` running?");
    let out = cbt(&nowhere, &["list", "vm1"]);
    assert_fails_with(&out, &["cannot reach the agent's admin socket", &n, &hint]);
    drop(std::os::unix::net::UnixListener::bind(&nowhere).unwrap());
    let out = cbt(&nowhere, &["create", "vm1", "b"]);
    assert_fails_with(&out, &["cannot reach the agent's admin socket", &n, "refused"]);

    // Missing arguments are usage errors.
    let out = run(Command::new(blockferry()).args(["cbt", "create", "vm1"]), LIMIT);
    assert_fails_with(&out, &["NAME"]);
}

#[test]
fn admin_socket_is_private_replaces_only_stale_sockets_and_goes_away_at_exit() {
    let tmp = tempdir();
    let vol = tmp.path().join("vm1");
    create_volume(&vol, "16M", &[]);
    // The socket's directory does not exist yet: the agent creates it.
    let admin = tmp.path().join("run/blockferry/agent.sock");
    let config = AgentConfig::new(&vol).admin(&admin);
    let agent = config.start(&tmp.path().join("agent-1.log"));
    let md = std::fs::symlink_metadata(&admin).unwrap();
    assert!(md.file_type().is_socket());
    assert_eq!(md.permissions().mode() & 0o777, 0o600, "the admin socket is not private");

    // A second agent must not steal a live socket.
    let out = run(&mut config.command(), LIMIT);
    assert!(!out.success() && !out.stdout.contains("listening"), "{out}");
    assert!(out.stderr.contains("is in use"), "{out}");
    assert!(out.stderr.contains(&admin.display().to_string()), "{out}");
    cbt_ok(&admin, &["create", "vm1", "still-mine"]);

    // Killed: the socket file stays behind, stale; the next agent replaces it.
    agent.stop();
    assert!(admin.exists());
    let agent = config.start(&tmp.path().join("agent-2.log"));
    let list = cbt_json(&admin, &["list", "vm1", "--json"]);
    assert!(list.is_array(), "{list}");

    // A clean stop (SIGTERM) removes it.
    let status = agent.terminate(Duration::from_secs(30));
    assert!(status.success(), "the agent exited with {status} on SIGTERM");
    assert!(!admin.exists(), "the admin socket is left after a clean stop");

    // Any other kind of file at the path is never replaced.
    std::fs::write(&admin, b"not a socket").unwrap();
    let out = run(&mut config.command(), LIMIT);
    assert!(!out.success() && !out.stdout.contains("listening"), "{out}");
    assert!(out.stderr.contains("is not a socket"), "{out}");
    assert_eq!(std::fs::read(&admin).unwrap(), b"not a socket");
}
