//! Helpers shared by the end-to-end tests in `tests/tests/`.
//!
//! - [`bin`]: where the `blockferry` binary is, building it first (see its docs).
//! - [`proc`]: running tools with a time limit, and failing (never skipping) when one is missing.
//! - [`agent`]: a `blockferry agent` child process that is killed when its guard drops.
//! - [`target`]: a `blockferry target` child process (and `blockferry keygen`), likewise.
//! - [`nbd`]: a tiny synchronous NBD client for hostile, byte-exact tests.
//! - [`guards`]: mounts, loop devices and FUSE mounts that clean up after themselves.
#![forbid(unsafe_code)]

pub mod agent;
pub mod bin;
pub mod guards;
pub mod nbd;
pub mod proc;
pub mod repl;
pub mod target;

use std::path::Path;

pub use agent::{Agent, AgentConfig};
pub use bin::blockferry;
pub use proc::{require_tool, run, run_ok, Output};

/// A fresh, uniquely named temporary directory, removed when dropped.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("blockferry-e2e-").tempdir().expect("create a temp dir")
}

/// Creates a volume with `blockferry volume create`, panicking with its output on failure.
pub fn create_volume(dir: &Path, size: &str, extra: &[&str]) {
    let mut cmd = std::process::Command::new(blockferry());
    cmd.args(["volume", "create", "--dir"]).arg(dir).args(["--size", size]).args(extra);
    run_ok(&mut cmd, std::time::Duration::from_secs(30));
}

/// A deterministic, fast pseudo-random byte stream (xorshift64*), for test data.
#[derive(Debug, Clone)]
pub struct Prng(u64);

impl Prng {
    pub fn new(seed: u64) -> Prng {
        Prng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}
