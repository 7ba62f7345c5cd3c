//! The CLI's errors: bad input exits non-zero with a message that names the problem, and never
//! panics or leaves a half-made volume behind.

use std::process::Command;
use std::time::Duration;

use blockferry_tests::{blockferry, create_volume, run, tempdir, Output};

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
fn volume_create_rejects_nonsense_sizes() {
    let tmp = tempdir();
    let dir = tmp.path().join("v");
    let d = dir.to_str().unwrap();
    for (size, needles) in [
        ("1X", &["invalid size", "1X", "suffix"][..]),
        ("0", &["size 0"][..]),
        ("=-5", &["invalid size", "-5"][..]),
        ("1.5G", &["invalid size", "1.5G"][..]),
        ("99999999999999999999", &["invalid size", "too large"][..]),
        ("16777216T", &["invalid size", "overflow"][..]),
        ("4097", &["4097", "multiple of the block size"][..]),
    ] {
        // "=-5" is passed as `--size=-5`: with a space, clap takes "-5" for a flag (below).
        let out = if let Some(v) = size.strip_prefix('=') {
            blockferry_cmd(&["volume", "create", "--dir", d, &format!("--size={v}")])
        } else {
            blockferry_cmd(&["volume", "create", "--dir", d, "--size", size])
        };
        assert_fails_with(&out, needles);
        assert!(!dir.join("volume.toml").exists(), "--size {size} left a volume.toml behind");
    }
    let out = blockferry_cmd(&["volume", "create", "--dir", d, "--size", "-5"]);
    assert_fails_with(&out, &["--size"]);
    let out =
        blockferry_cmd(&["volume", "create", "--dir", d, "--size", "1G", "--block-size", "3K"]);
    assert_fails_with(&out, &["block size"]);
    let out = blockferry_cmd(&["volume", "create", "--dir", d, "--size", "1G", "--name", "a b"]);
    assert_fails_with(&out, &["name", "a b"]);
    assert!(!dir.join("volume.toml").exists());
}

#[test]
fn volume_create_refuses_an_existing_volume_and_keeps_it() {
    let tmp = tempdir();
    let dir = tmp.path().join("v");
    create_volume(&dir, "1M", &[]);
    let before = std::fs::read_to_string(dir.join("volume.toml")).unwrap();
    let out = blockferry_cmd(&["volume", "create", "--dir", dir.to_str().unwrap(), "--size", "2M"]);
    assert_fails_with(&out, &["already exists", dir.to_str().unwrap()]);
    let after = std::fs::read_to_string(dir.join("volume.toml")).unwrap();
    assert_eq!(before, after, "a refused create changed the existing volume's metadata");
    assert_eq!(std::fs::metadata(dir.join("image.raw")).unwrap().len(), 1 << 20);
}

#[test]
fn volume_create_in_an_unwritable_place_names_the_path() {
    let out =
        blockferry_cmd(&["volume", "create", "--dir", "/proc/blockferry-e2e-no/v", "--size", "1M"]);
    assert_fails_with(&out, &["/proc/blockferry-e2e-no/v"]);

    // A regular file where the directory should be.
    let tmp = tempdir();
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let out =
        blockferry_cmd(&["volume", "create", "--dir", file.to_str().unwrap(), "--size", "1M"]);
    assert_fails_with(&out, &[file.to_str().unwrap()]);
}

#[test]
fn volume_info_of_a_missing_or_broken_volume() {
    let tmp = tempdir();
    let missing = tmp.path().join("nothing-here");
    let out = blockferry_cmd(&["volume", "info", "--dir", missing.to_str().unwrap()]);
    assert_fails_with(&out, &["no volume", missing.to_str().unwrap()]);

    let dir = tmp.path().join("v");
    create_volume(&dir, "1M", &[]);
    let ok = blockferry_cmd(&["volume", "info", "--dir", dir.to_str().unwrap(), "--json"]);
    assert!(ok.success(), "{ok}");
    let v: serde_json::Value = serde_json::from_str(&ok.stdout).expect("volume info --json");
    assert_eq!(v["size"], 1 << 20);
    assert_eq!(v["name"], "v");

    std::fs::write(dir.join("volume.toml"), "this is = = not toml").unwrap();
    let out = blockferry_cmd(&["volume", "info", "--dir", dir.to_str().unwrap()]);
    assert_fails_with(&out, &["volume.toml", "not a valid"]);

    let dir2 = tmp.path().join("v2");
    create_volume(&dir2, "1M", &[]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir2.join("image.raw"))
        .unwrap()
        .set_len(4096)
        .unwrap();
    let out = blockferry_cmd(&["volume", "info", "--dir", dir2.to_str().unwrap()]);
    assert_fails_with(&out, &["image.raw", "4096"]);
}

/// `blockferry agent` with bad arguments must exit (not serve) with a clear message.
fn agent_fails(args: &[&str], needles: &[&str]) {
    let out = run(Command::new(blockferry()).arg("agent").args(args), LIMIT);
    assert_fails_with(&out, needles);
    assert!(!out.stdout.contains("listening"), "the agent started anyway:\n{out}");
}

#[test]
fn agent_refuses_a_missing_volume_or_a_bad_config() {
    let tmp = tempdir();
    let missing = tmp.path().join("no-volume");
    let m = missing.to_str().unwrap();
    agent_fails(&["--volume", m, "--listen", "127.0.0.1:0"], &[m]);

    let dir = tmp.path().join("v");
    create_volume(&dir, "1M", &[]);
    let d = dir.to_str().unwrap();

    let absent = tmp.path().join("absent.toml");
    let a = absent.to_str().unwrap();
    agent_fails(&["--volume", d, "--listen", "127.0.0.1:0", "--config", a], &[a]);

    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "[agent\nlisten = = 3\n").unwrap();
    let b = bad.to_str().unwrap();
    agent_fails(&["--volume", d, "--listen", "127.0.0.1:0", "--config", b], &[b]);

    agent_fails(&["--volume", d, "--listen", "not-an-address"], &["not-an-address"]);
    agent_fails(
        &["--volume", d, "--listen", "127.0.0.1:0", "--cache", "sometimes"],
        &["sometimes"],
    );
    agent_fails(&["--volume", d, "--listen", "127.0.0.1:0", "--engine", "steam"], &["steam"]);
    // Two volumes with the same export name cannot both be served.
    let other = tmp.path().join("w");
    create_volume(&other, "1M", &["--name", "v"]);
    let o = other.to_str().unwrap();
    agent_fails(&["--volume", d, "--volume", o, "--listen", "127.0.0.1:0"], &["v"]);
}
