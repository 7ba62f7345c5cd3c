//! The store's errors.

use std::io;
use std::path::PathBuf;

use blockferry_protocol::repl::Epoch;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    /// The device is full (ENOSPC/EDQUOT on a write). The batch being written was dropped and
    /// the store stays usable: the agent sends the batch again once space is freed.
    #[error("no space left on the device holding {path} while {what}: the batch was dropped; free space and it will be sent again")]
    NoSpace { what: &'static str, path: PathBuf },
    #[error("I/O error while {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is corrupt: {what}")]
    Corrupt { what: String, path: PathBuf },
    #[error("range {offset}+{length} is outside the volume ({size} bytes) or not aligned to its block size {block_size}")]
    OutOfRange { offset: u64, length: u64, size: u64, block_size: u32 },
    #[error("{what} mismatch: the replica has {stored}, the request has {requested}")]
    Mismatch { what: &'static str, stored: String, requested: String },
    /// A call that breaks the batch rules (unknown batch, duplicate id or base, frame count).
    #[error("batch {id}: {what}")]
    Batch { id: Epoch, what: String },
    #[error("the replica store {path} is poisoned by an earlier failure ({cause}): restart the target so it recovers from its journal")]
    Poisoned { path: PathBuf, cause: String },
}

impl StoreError {
    /// True for [`StoreError::NoSpace`].
    pub fn is_no_space(&self) -> bool {
        matches!(self, StoreError::NoSpace { .. })
    }
}
