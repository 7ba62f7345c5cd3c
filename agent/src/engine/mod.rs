//! Disk engines: how a volume's image file is read and written.
//!
//! As in Firecracker's block device, the engines sit behind one enum ([`Engine`]) so the NBD
//! frontend does not care which one runs:
//! - [`EngineKind::Uring`] (default): io_uring on a dedicated thread, batched submissions;
//! - [`EngineKind::Sync`]: plain pread/pwrite on tokio's blocking pool.
//!
//! Cache modes: [`CacheMode::Writeback`] goes through the page cache; [`CacheMode::None`] opens
//! the image with O_DIRECT. O_DIRECT needs aligned offsets, lengths and buffers: requests that
//! are not aligned are served through aligned bounce buffers (read-modify-write for writes,
//! serialised against overlapping writes so no write is lost).
//!
//! Durability: FLUSH is `fdatasync` of the one file descriptor every connection of the volume
//! shares, so it covers every write completed on any connection (this is what makes
//! NBD_FLAG_CAN_MULTI_CONN true). FUA is `RWF_DSYNC` on the write itself.

pub mod buf;
mod sync;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

pub use buf::{IoBuf, IO_ALIGN};

/// Which engine performs the I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineKind {
    #[default]
    Uring,
    Sync,
}

/// Whether the page cache is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheMode {
    /// O_DIRECT: data goes straight to the device; FLUSH still flushes the device cache.
    None,
    /// Page cache; FLUSH is fdatasync.
    #[default]
    Writeback,
}

impl std::str::FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "uring" | "io_uring" | "io-uring" => Ok(EngineKind::Uring),
            "sync" => Ok(EngineKind::Sync),
            _ => Err(format!("unknown engine {s:?}: use uring or sync")),
        }
    }
}

impl std::str::FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" | "direct" => Ok(CacheMode::None),
            "writeback" => Ok(CacheMode::Writeback),
            _ => Err(format!("unknown cache mode {s:?}: use none or writeback")),
        }
    }
}

/// How to open an engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    pub kind: EngineKind,
    pub cache: CacheMode,
    pub read_only: bool,
}

/// A failed engine operation. `errno()` is what the NBD reply carries.
#[derive(Debug, Error)]
pub enum EngineError {
    #[error("cannot open image {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} at offset {offset} length {len} failed: {source}")]
    Io {
        op: &'static str,
        offset: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("short {op} at offset {offset}: {done} of {len} bytes")]
    Short { op: &'static str, offset: u64, len: u64, done: u64 },
    #[error("zeroing offset {offset} length {len} cannot be done fast")]
    NotFast { offset: u64, len: u64 },
    #[error("the io_uring engine is unavailable: {reason}")]
    Unavailable { reason: String },
    #[error("the disk engine has shut down")]
    Shutdown,
}

/// NBD error numbers (the spec's values, which equal Linux's).
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

impl EngineError {
    /// The NBD error for this failure: disk errors are EIO (never zeros or success), a zeroing
    /// that cannot be fast is ENOTSUP, and a full disk is ENOSPC.
    pub fn errno(&self) -> u32 {
        match self {
            EngineError::NotFast { .. } => errno::ENOTSUP,
            EngineError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
                errno::ENOSPC
            }
            EngineError::Shutdown => errno::ESHUTDOWN,
            _ => errno::EIO,
        }
    }
}

/// One run of the allocation map: `len` bytes that are all holes (read as zeros) or all data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub hole: bool,
}

/// A disk engine over one image file, shared (`Arc`) by every connection to the volume.
/// Callers have already checked ranges against [`Engine::size`].
#[derive(Debug)]
pub struct Engine {
    inner: Inner,
    size: u64,
    options: EngineOptions,
}

#[derive(Debug)]
enum Inner {
    Sync(sync::SyncEngine),
}

impl Engine {
    pub fn open(path: &Path, options: EngineOptions) -> Result<Arc<Engine>, EngineError> {
        let (inner, size) = match options.kind {
            // io_uring arrives in engine::uring; until then the sync engine serves.
            EngineKind::Uring | EngineKind::Sync => {
                let e = sync::SyncEngine::open(path, options)?;
                let size = e.size();
                (Inner::Sync(e), size)
            }
        };
        Ok(Arc::new(Engine { inner, size, options }))
    }

    /// Size of the image in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn options(&self) -> EngineOptions {
        self.options
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: usize) -> Result<IoBuf, EngineError> {
        match &self.inner {
            Inner::Sync(e) => e.read(offset, len).await,
        }
    }

    /// Writes all of `buf` at `offset`; with `fua` the data is durable when this returns.
    /// The buffer is handed back so the caller can reuse it.
    pub async fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> Result<IoBuf, EngineError> {
        match &self.inner {
            Inner::Sync(e) => e.write(offset, buf, fua).await,
        }
    }

    /// Makes every completed write (on any connection) durable.
    pub async fn flush(&self) -> Result<(), EngineError> {
        match &self.inner {
            Inner::Sync(e) => e.flush().await,
        }
    }

    /// Discards the range (punches a hole); it reads as zeros afterwards.
    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        match &self.inner {
            Inner::Sync(e) => e.trim(offset, len).await,
        }
    }

    /// Makes the range read as zeros. Without `no_hole` it may punch a hole; with `no_hole`
    /// the blocks stay allocated. With `fast`, fails with [`EngineError::NotFast`] rather than
    /// writing zeros one by one.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fast: bool,
    ) -> Result<(), EngineError> {
        match &self.inner {
            Inner::Sync(e) => e.write_zeroes(offset, len, no_hole, fast).await,
        }
    }

    /// Allocation map from `offset`, covering at least one byte and at most `len` bytes
    /// (SEEK_DATA / SEEK_HOLE).
    pub async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>, EngineError> {
        match &self.inner {
            Inner::Sync(e) => e.allocation(offset, len).await,
        }
    }

    /// Hint to read the range into the cache (NBD_CMD_CACHE).
    pub async fn cache(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        match &self.inner {
            Inner::Sync(e) => e.cache(offset, len).await,
        }
    }
}
