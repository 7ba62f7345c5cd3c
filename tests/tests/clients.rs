//! Real NBD clients against `blockferry agent`: nbdinfo, qemu-io, qemu-img, nbdcopy, and a real
//! filesystem through nbdfuse + a loop device (run as root, as CI does).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use blockferry_tests::guards::{Frozen, Fuse, Loop, Mount};
use blockferry_tests::proc::{sh_ok, sha256_file};
use blockferry_tests::{create_volume, require_tool, run, run_ok, tempdir, AgentConfig, Prng};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const LIMIT: Duration = Duration::from_secs(120);

fn nbdinfo_json(uri: &str) -> Value {
    let out = run_ok(Command::new("nbdinfo").arg("--json").arg(uri), LIMIT);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("nbdinfo --json: {e}\n{out}"))
}

fn export_of(info: &Value) -> &Value {
    let exports = info["exports"].as_array().expect("nbdinfo --json has exports");
    assert_eq!(exports.len(), 1, "nbdinfo of one URI shows one export: {info:#}");
    &exports[0]
}

fn flag(export: &Value, key: &str) -> bool {
    export[key].as_bool().unwrap_or_else(|| panic!("nbdinfo shows no {key}: {export:#}"))
}

fn number(export: &Value, key: &str) -> u64 {
    export[key].as_u64().unwrap_or_else(|| panic!("nbdinfo shows no {key}: {export:#}"))
}

/// Reads `len` bytes of a volume's image file directly.
fn image_bytes(volume: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = File::open(volume.join("image.raw")).expect("open image.raw");
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn nbdinfo_shows_exports_size_block_sizes_and_flags() {
    require_tool("nbdinfo");
    let tmp = tempdir();
    let alpha = tmp.path().join("alpha");
    let beta_dir = tmp.path().join("second");
    create_volume(&alpha, "1G", &[]);
    create_volume(&beta_dir, "64M", &["--name", "beta"]);

    for (cache, minimum) in [("none", 512), ("writeback", 1)] {
        let log = tmp.path().join(format!("agent-{cache}.log"));
        let agent = AgentConfig::new(&alpha).volume(&beta_dir).cache(cache).start(&log);
        let info = nbdinfo_json(&agent.uri("alpha"));
        assert_eq!(info["protocol"], "newstyle-fixed", "{info:#}");
        assert_eq!(info["structured"], true, "structured replies: {info:#}");
        let e = export_of(&info);
        assert_eq!(e["export-name"], "alpha");
        assert_eq!(number(e, "export-size"), 1 << 30);
        for (key, want) in [
            ("is_read_only", false),
            ("can_flush", true),
            ("can_fua", true),
            ("can_trim", true),
            ("can_zero", true),
            ("can_multi_conn", true),
        ] {
            assert_eq!(flag(e, key), want, "{key} with --cache {cache}: {e:#}");
        }
        let contexts = e["contexts"].as_array().cloned().unwrap_or_default();
        assert!(
            contexts.iter().any(|c| c == "base:allocation"),
            "base:allocation is not offered (qemu-img map and nbdcopy need it): {e:#}"
        );
        let (min, pref, max) = (
            number(e, "block_size_minimum"),
            number(e, "block_size_preferred"),
            number(e, "block_size_maximum"),
        );
        assert_eq!(min, minimum, "minimum block size with --cache {cache}");
        assert!(pref.is_power_of_two() && pref >= 4096 && pref >= min, "preferred {pref}");
        assert_eq!(max, 32 * MIB, "maximum block size (the maximum payload)");

        let beta = nbdinfo_json(&agent.uri("beta"));
        assert_eq!(number(export_of(&beta), "export-size"), 64 * MIB);

        let list = run_ok(
            Command::new("nbdinfo").args(["--list", "--json"]).arg(format!("nbd://{}", agent.addr)),
            LIMIT,
        );
        let list: Value = serde_json::from_str(&list.stdout).expect("nbdinfo --list --json");
        let mut names: Vec<String> = list["exports"]
            .as_array()
            .expect("exports")
            .iter()
            .map(|e| e["export-name"].as_str().unwrap_or_default().to_string())
            .collect();
        names.sort();
        assert_eq!(names, ["alpha", "beta"], "nbdinfo --list");

        let missing = run(Command::new("nbdinfo").arg(agent.uri("gamma")), LIMIT);
        assert!(!missing.success(), "nbdinfo of an unknown export succeeded:\n{missing}");
    }

    let agent = AgentConfig::new(&beta_dir).read_only().start(&tmp.path().join("ro.log"));
    let e = nbdinfo_json(&agent.uri("beta"));
    assert!(flag(export_of(&e), "is_read_only"), "--read-only export: {e:#}");
}

/// Writes patterns with and without FUA (and unaligned), reads them back on a new connection,
/// and checks the image file itself.
fn qemu_io_patterns(cache: &'static str, engine: &'static str) {
    require_tool("qemu-io");
    let tmp = tempdir();
    let vol = tmp.path().join("qio");
    create_volume(&vol, "64M", &[]);
    let agent =
        AgentConfig::new(&vol).cache(cache).engine(engine).start(&tmp.path().join("agent.log"));
    let uri = agent.uri("qio");

    // qemu-io: `write -f` is FUA ("use Force Unit Access semantics"), `-P` the pattern byte.
    let writes = [
        "write -P 0xaa 0 1M",
        "write -f -P 0xbb 1M 64k",
        "write -P 0xcc 2097663 1025", // unaligned: offset 2M+511, 1025 bytes
        "write -f -P 0xdd 3M 4k",
        "write -f -P 0xee 4194305 7", // unaligned FUA
        "flush",
    ];
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]).arg(&uri);
    for w in writes {
        cmd.args(["-c", w]);
    }
    let out = run_ok(&mut cmd, LIMIT);
    assert_eq!(out.stdout.matches("wrote ").count(), 5, "five writes reported:\n{out}");
    assert!(!out.both().to_lowercase().contains("fail"), "{out}");

    let reads = [
        "read -P 0xaa 0 1M",
        "read -P 0xbb 1M 64k",
        "read -P 0 1114112 983551", // 1M+64k .. 2M+511 stays zero
        "read -P 0xcc 2097663 1025",
        "read -P 0 2098688 1047040", // after the unaligned write, up to 3M
        "read -P 0xdd 3M 4k",
        "read -P 0 4194304 1",
        "read -P 0xee 4194305 7",
        "read -P 0 4194312 4088",
    ];
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", "-r"]).arg(&uri);
    for r in reads {
        cmd.args(["-c", r]);
    }
    let out = run(&mut cmd, LIMIT);
    assert!(
        out.success() && !out.both().contains("Pattern verification failed"),
        "read back with --cache {cache} --engine {engine}:\n{out}"
    );
    assert_eq!(out.stdout.matches("read ").count(), reads.len(), "{out}");

    // The image file holds the same bytes (the agent flushed; both paths see the page cache or
    // the disk consistently).
    assert!(image_bytes(&vol, 0, MIB as usize).iter().all(|&b| b == 0xaa));
    assert!(image_bytes(&vol, MIB, 65536).iter().all(|&b| b == 0xbb));
    assert!(image_bytes(&vol, 2097663, 1025).iter().all(|&b| b == 0xcc));
    let around = image_bytes(&vol, 2097662, 1027);
    assert_eq!((around[0], around[1026]), (0, 0), "unaligned write spilled over");
    assert!(image_bytes(&vol, 4194305, 7).iter().all(|&b| b == 0xee));
    drop(agent);
}

#[test]
fn qemu_io_patterns_cache_none_uring() {
    qemu_io_patterns("none", "uring");
}

#[test]
fn qemu_io_patterns_cache_writeback_uring() {
    qemu_io_patterns("writeback", "uring");
}

#[test]
fn qemu_io_patterns_cache_none_sync() {
    qemu_io_patterns("none", "sync");
}

#[test]
fn qemu_io_patterns_cache_writeback_sync() {
    qemu_io_patterns("writeback", "sync");
}

#[test]
fn nbdcopy_1gib_in_and_out_with_four_connections() {
    require_tool("nbdcopy");
    require_tool("sha256sum");
    let tmp = tempdir();
    let vol = tmp.path().join("big");
    create_volume(&vol, "1G", &[]);
    let input = tmp.path().join("in.img");
    let output = tmp.path().join("out.img");
    {
        let mut f = std::io::BufWriter::new(File::create(&input).unwrap());
        let mut rng = Prng::new(0xB10C);
        let mut buf = vec![0u8; 8 << 20];
        for i in 0..128u64 {
            rng.fill(&mut buf);
            // A few all-zero chunks, so sparse handling is exercised too.
            if i % 16 == 5 {
                buf.fill(0);
            }
            f.write_all(&buf).unwrap();
        }
        f.flush().unwrap();
    }
    let agent = AgentConfig::new(&vol).start(&tmp.path().join("agent.log"));
    let uri = agent.uri("big");

    let t = Instant::now();
    run_ok(
        Command::new("nbdcopy").args(["--connections=4", "--flush"]).arg(&input).arg(&uri),
        Duration::from_secs(600),
    );
    let t_in = t.elapsed();
    let t = Instant::now();
    run_ok(
        Command::new("nbdcopy").args(["--connections=4"]).arg(&uri).arg(&output),
        Duration::from_secs(600),
    );
    let t_out = t.elapsed();
    eprintln!("nbdcopy 1 GiB: in {t_in:?}, out {t_out:?}");

    let want = sha256_file(&input);
    assert_eq!(sha256_file(&output), want, "what nbdcopy read back differs from what it wrote");
    assert_eq!(sha256_file(&vol.join("image.raw")), want, "the image file differs from the input");
    drop(agent);
}

/// One `qemu-img map --output=json` extent covering `offset`.
fn map_at(map: &Value, offset: u64) -> &Value {
    map.as_array()
        .expect("qemu-img map --output=json is a list")
        .iter()
        .find(|e| {
            let s = e["start"].as_u64().unwrap();
            s <= offset && offset < s + e["length"].as_u64().unwrap()
        })
        .unwrap_or_else(|| panic!("no extent covers {offset}: {map:#}"))
}

/// `nbdinfo --map` type (bit 0 hole, bit 1 zero) at `offset`.
fn nbdinfo_type_at(map: &str, offset: u64) -> u64 {
    for line in map.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let (Ok(s), Ok(l), Ok(t)) = (f[0].parse::<u64>(), f[1].parse::<u64>(), f[2].parse::<u64>())
        else {
            continue;
        };
        if s <= offset && offset < s + l {
            return t;
        }
    }
    panic!("nbdinfo --map has no extent at {offset}:\n{map}")
}

#[test]
fn trim_and_write_zeroes_show_as_zero_in_maps_and_compare_identical() {
    require_tool("qemu-io");
    require_tool("qemu-img");
    require_tool("nbdinfo");
    let tmp = tempdir();
    let vol = tmp.path().join("sparse");
    create_volume(&vol, "64M", &[]);
    let sock = tmp.path().join("nbd.sock");
    let agent = AgentConfig::new(&vol).unix(&sock).start(&tmp.path().join("agent.log"));
    let tcp = agent.uri("sparse");
    let unix = agent.unix_uri("sparse");

    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]).arg(&tcp);
    for c in [
        "write -P 0x11 0 16M",
        "discard 4M 2M",     // NBD_CMD_TRIM
        "write -z -u 8M 2M", // NBD_CMD_WRITE_ZEROES, may punch a hole
        "write -z 12M 1M",   // NBD_CMD_WRITE_ZEROES with NO_HOLE
        "flush",
    ] {
        cmd.args(["-c", c]);
    }
    run_ok(&mut cmd, LIMIT);

    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", "-r"]).arg(&unix);
    for c in [
        "read -P 0x11 0 4M",
        "read -P 0 4M 2M",
        "read -P 0x11 6M 2M",
        "read -P 0 8M 2M",
        "read -P 0x11 10M 2M",
        "read -P 0 12M 1M",
        "read -P 0x11 13M 3M",
        "read -P 0 16M 48M",
    ] {
        cmd.args(["-c", c]);
    }
    let out = run(&mut cmd, LIMIT);
    assert!(out.success() && !out.both().contains("verification failed"), "{out}");

    let map = run_ok(
        Command::new("qemu-img").args(["map", "--output=json", "-f", "raw"]).arg(&tcp),
        LIMIT,
    );
    let map: Value = serde_json::from_str(&map.stdout).expect("qemu-img map json");
    for (off, what) in [(0, "written"), (6 * MIB, "written"), (13 * MIB, "written")] {
        let e = map_at(&map, off);
        assert_eq!(
            (e["data"].as_bool(), e["zero"].as_bool()),
            (Some(true), Some(false)),
            "{what} at {off}: {map:#}"
        );
    }
    let trimmed = map_at(&map, 4 * MIB);
    assert_eq!(trimmed["zero"], true, "trimmed range not reported zero: {map:#}");
    assert_eq!(trimmed["data"], false, "trimmed range not reported as a hole: {map:#}");
    assert_eq!(map_at(&map, 8 * MIB)["zero"], true, "write -z -u range not reported zero: {map:#}");
    assert_eq!(map_at(&map, 32 * MIB)["zero"], true, "never-written range: {map:#}");
    assert_eq!(map_at(&map, 32 * MIB)["data"], false, "never-written range: {map:#}");

    let nmap = run_ok(Command::new("nbdinfo").arg("--map").arg(&unix), LIMIT).stdout;
    assert_eq!(nbdinfo_type_at(&nmap, 0) & 3, 0, "written data at 0:\n{nmap}");
    assert_eq!(nbdinfo_type_at(&nmap, 4 * MIB) & 3, 3, "trimmed range: hole,zero:\n{nmap}");
    assert_ne!(nbdinfo_type_at(&nmap, 8 * MIB) & 2, 0, "write -z -u range: zero:\n{nmap}");
    assert_eq!(nbdinfo_type_at(&nmap, 40 * MIB) & 3, 3, "never written: hole,zero:\n{nmap}");

    for uri in [&tcp, &unix] {
        let out = run(
            Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "raw"])
                .arg(uri)
                .arg(vol.join("image.raw")),
            LIMIT,
        );
        assert!(out.success() && out.stdout.contains("Images are identical"), "{out}");
    }
    // And compare notices a difference (so the check above means something).
    let other = tmp.path().join("other.raw");
    std::fs::copy(vol.join("image.raw"), &other).unwrap();
    let mut f = std::fs::OpenOptions::new().write(true).open(&other).unwrap();
    f.seek(SeekFrom::Start(20 * MIB)).unwrap();
    f.write_all(b"x").unwrap();
    drop(f);
    let out = run(
        Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&unix).arg(&other),
        LIMIT,
    );
    assert_eq!(out.status.code(), Some(1), "qemu-img compare should see the difference:\n{out}");
}

fn fsck_clean(target: &Path, what: &str) {
    let out = run(Command::new("fsck.ext4").arg("-fn").arg(target), LIMIT);
    assert!(out.success(), "fsck.ext4 -fn of {what} is not clean:\n{out}");
}

/// A real filesystem on the export: nbdfuse exposes it as a file, a loop device makes that a
/// block device, ext4 goes on top. While frozen, the image file on the agent's side must already
/// be a clean filesystem (this is what an application-consistent recovery point relies on).
#[test]
fn ext4_on_nbdfuse_loop_survives_freeze_umount_fsck_remount() {
    for tool in ["nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "fsck.ext4", "fsfreeze", "mount"]
    {
        require_tool(tool);
    }
    let tmp = tempdir();
    let vol = tmp.path().join("fs");
    create_volume(&vol, "256M", &[]);
    let agent = AgentConfig::new(&vol).start(&tmp.path().join("agent.log"));
    let lim = Duration::from_secs(120);

    let fuse =
        Fuse::mount(&tmp.path().join("fuse"), &agent.uri("fs"), &tmp.path().join("fuse.log"));
    let lo = Loop::attach(&fuse.file);
    sh_ok("mkfs.ext4", &["-q", "-F", lo.device.to_str().unwrap()], lim);
    let mnt = tmp.path().join("mnt");
    let mount = Mount::new(&lo.device, &mnt);

    let mut files = Vec::new();
    for i in 0..24u64 {
        let dir = mnt.join(format!("d{}", i % 4));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("f{i}"));
        let mut data = vec![0u8; (64 << 10) * (1 + i as usize % 5)];
        Prng::new(i).fill(&mut data);
        let mut f = File::create(&path).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        files.push((path.strip_prefix(&mnt).unwrap().to_path_buf(), data));
    }

    let frozen = Frozen::freeze(&mnt);
    let snapshot = tmp.path().join("frozen.img");
    sh_ok(
        "cp",
        &["--sparse=always", vol.join("image.raw").to_str().unwrap(), snapshot.to_str().unwrap()],
        lim,
    );
    fsck_clean(&snapshot, "the image file copied while the filesystem was frozen");
    frozen.thaw();

    mount.unmount();
    fsck_clean(&lo.device, "the loop device after umount");
    fsck_clean(&vol.join("image.raw"), "the agent's image after umount");

    let mount = Mount::new(&lo.device, &mnt);
    for (rel, data) in &files {
        let got = std::fs::read(mnt.join(rel)).unwrap_or_else(|e| panic!("{}: {e}", rel.display()));
        assert!(got == *data, "{} differs after remount", rel.display());
    }
    mount.unmount();
    drop(lo);
    drop(fuse);
    drop(agent);
}
