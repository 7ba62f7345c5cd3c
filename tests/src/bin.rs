//! Finding the `blockferry` binary under test.
//!
//! Cargo builds the binaries of a package only for that package's own integration tests, never
//! for a dependent crate, and `CARGO_BIN_EXE_*` exists only there. So the first test of a process
//! that needs the binary runs
//!
//! ```text
//! $CARGO build -p blockferry-tools --bin blockferry --features failpoints [--release]
//! ```
//!
//! (with change tracking's fault points compiled in: they do nothing unless
//! `BLOCKFERRY_FAILPOINTS` is set, and the crash tests set it)
//!
//! in the workspace (a no-op taking well under a second when it is up to date, and never a stale
//! binary when it is not), with the profile the tests themselves were built with, and then uses
//! `<target-dir>/<debug|release>/blockferry`. The target dir is `$CARGO_TARGET_DIR` or the
//! workspace's `build/` (see `.cargo/config.toml`). Cargo's own lock serialises this against other
//! builds. Set `BLOCKFERRY_BIN=/path/to/blockferry` to test a prebuilt binary and skip the build.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// The `blockferry` binary, built on first use (see the module docs). Panics if it cannot be built.
pub fn blockferry() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(locate_or_build)
}

fn locate_or_build() -> PathBuf {
    if let Some(bin) = std::env::var_os("BLOCKFERRY_BIN") {
        let bin = PathBuf::from(bin);
        assert!(bin.is_file(), "BLOCKFERRY_BIN={} is not a file", bin.display());
        return bin;
    }
    let root = workspace_root();
    let release = !cfg!(debug_assertions);
    let profile = if release { "release" } else { "debug" };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&root).args([
        "build",
        "--quiet",
        "-p",
        "blockferry-tools",
        "--bin",
        "blockferry",
        "--features",
        "failpoints",
    ]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run {:?} to build the blockferry binary: {e}", cargo.to_string_lossy())
    });
    assert!(
        status.success(),
        "`cargo build -p blockferry-tools --bin blockferry --features failpoints` ({profile}) failed with {status}; \
         the end-to-end tests need the binary"
    );
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|d| if d.is_absolute() { d } else { root.join(d) })
        .unwrap_or_else(|| root.join("build"));
    let bin = target_dir.join(profile).join("blockferry");
    assert!(bin.is_file(), "cargo built blockferry-tools but {} does not exist", bin.display());
    bin
}
