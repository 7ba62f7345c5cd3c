//! Disk engines: how a volume's image file is read and written.
//!
//! As in Firecracker's block device, the engines sit behind one enum ([`Engine`]) so the NBD
//! frontend does not care which one runs:
//! - [`EngineKind::Uring`] (default): io_uring shared by the async callers, completions reaped by
//!   a tokio task woken through an eventfd;
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
#[cfg(test)]
mod tests;
mod uring;

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
    /// Change tracking could not record the write, so it was not done.
    #[error(transparent)]
    Tracking(#[from] crate::cbt::CbtError),
}

/// NBD error numbers (the spec's values, which equal Linux's): the protocol crate's.
pub use blockferry_protocol::nbd::consts::errno;

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
            EngineError::Tracking(e) => e.errno(),
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
    /// With O_DIRECT (`CacheMode::None`): serialises read-modify-write against the writes it
    /// could undo. Chosen over a range lock for simplicity: aligned writes and fallocates take
    /// it shared (they run concurrently with each other, as before); an unaligned write or
    /// zeroing of a partial block takes it exclusively for its whole read-modify-write, so it
    /// can neither lose a concurrent write to the blocks it rewrites nor interleave with
    /// another unaligned write (the result is always one order or the other). The cost is that
    /// unaligned writes run one at a time and briefly stall aligned ones; clients that honour
    /// the advertised 4 KiB preferred block size never pay it. tokio's lock is fair, so a
    /// waiting RMW is not starved by a stream of aligned writes. Reads take no lock.
    /// Writeback mode never touches it: the kernel handles unaligned I/O there.
    rmw: tokio::sync::RwLock<()>,
    /// Writeback mode only: a page-cache descriptor of the image for the inline fast path
    /// (see [`Engine::read`] and [`Engine::write`]), and whether that path is on.
    cached: Option<std::fs::File>,
    fast_path: std::sync::atomic::AtomicBool,
    /// Writeback fast path: large writes (at least [`WRITEBACK_CHUNK`]) are copied into the
    /// page cache one at a time. The kernel serialises buffered writes to a file on its inode
    /// lock, and a second worker thread writing 1 MiB at the same time spun on that lock
    /// (`rwsem_spin_on_owner`, 11% of the agent's CPU on 1 MiB sequential writes); waiting
    /// here instead frees the thread to read the next request from the socket.
    big_writes: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
enum Inner {
    Sync(sync::SyncEngine),
    Uring(uring::UringEngine),
}

/// Alignment of offsets and lengths under O_DIRECT: at least the logical block size of every
/// device we expect (512 or 4096), and what `IoBuf` addresses are aligned to.
const DIRECT_ALIGN: u64 = IO_ALIGN as u64;
const _: () = assert!(DIRECT_ALIGN.is_power_of_two());

/// The writeback fast path copies a large write into the page cache in parts of at most
/// this many bytes. The kernel sizes a new page-cache folio by the write that creates it, so
/// one 1 MiB `pwrite` leaves a 1 MiB folio, and ext4 (large folios since Linux 6.16) walks
/// every buffer of a folio on each write into it: after a 1 MiB sequential pass over a volume,
/// each later 4 KiB random write cost the agent about 40 µs, 37% of it in
/// `ext4_block_write_begin`. Parts of 64 KiB keep folios at 16 blocks: 4 KiB random writes
/// after such a pass went from about 33,000 to 82,000 IOPS (the agent's CPU per write from
/// 40-44 to 12-13 µs), and 1 MiB sequential writes stayed within run-to-run noise (16 KiB parts
/// made random writes faster still but sequential ones 17% slower). See docs/decisions.md.
const WRITEBACK_CHUNK: usize = 64 << 10;

fn round_down(x: u64) -> u64 {
    x / DIRECT_ALIGN * DIRECT_ALIGN
}

fn round_up(x: u64) -> u64 {
    x.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN
}

fn is_aligned(offset: u64, len: u64) -> bool {
    (offset | len) & (DIRECT_ALIGN - 1) == 0
}

/// Checks, where the kernel can say (statx STATX_DIOALIGN, Linux 6.1+), that O_DIRECT works
/// on `path` with [`DIRECT_ALIGN`].
fn check_direct_alignment(path: &Path) -> Result<(), EngineError> {
    use rustix::fs::{statx, AtFlags, StatxFlags, CWD};
    let Ok(st) = statx(CWD, path, AtFlags::empty(), StatxFlags::DIOALIGN) else {
        return Ok(()); // old kernel: the open (or the first I/O) will tell
    };
    if st.stx_mask & StatxFlags::DIOALIGN.bits() == 0 {
        return Ok(());
    }
    let bad = |msg: String| EngineError::Open {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, msg),
    };
    if st.stx_dio_offset_align == 0 {
        return Err(bad("the filesystem does not support O_DIRECT (cache mode none); \
             use cache mode writeback or move the image"
            .into()));
    }
    if u64::from(st.stx_dio_offset_align) > DIRECT_ALIGN
        || u64::from(st.stx_dio_mem_align) > DIRECT_ALIGN
    {
        return Err(bad(format!(
            "O_DIRECT needs {}-byte offsets and {}-byte buffers, more than the {DIRECT_ALIGN} \
             supported; use cache mode writeback",
            st.stx_dio_offset_align, st.stx_dio_mem_align
        )));
    }
    Ok(())
}

impl Engine {
    /// Opens the image. With [`EngineKind::Uring`], fails with [`EngineError::Unavailable`]
    /// when the kernel cannot provide io_uring (there is no silent fallback to sync). With
    /// [`CacheMode::None`], the image size must be a multiple of 4096.
    pub fn open(path: &Path, options: EngineOptions) -> Result<Arc<Engine>, EngineError> {
        let direct = options.cache == CacheMode::None;
        if direct {
            check_direct_alignment(path)?;
        }
        // The image is opened once; the writeback fast path gets a duplicate descriptor of the
        // same open file (page cache, no O_DIRECT).
        let file = sync::open_image(path, options)?;
        let open_err = |source| EngineError::Open { path: path.to_path_buf(), source };
        let size = file.metadata().map_err(open_err)?.len();
        let cached = if direct { None } else { Some(file.try_clone().map_err(open_err)?) };
        let inner = match options.kind {
            EngineKind::Uring => Inner::Uring(uring::UringEngine::new(file, size)?),
            EngineKind::Sync => Inner::Sync(sync::SyncEngine::new(file, size)),
        };
        if direct && size & (DIRECT_ALIGN - 1) != 0 {
            return Err(EngineError::Open {
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "image size {size} is not a multiple of {DIRECT_ALIGN}, which cache \
                         mode none (O_DIRECT) needs; use cache mode writeback"
                    ),
                ),
            });
        }
        Ok(Arc::new(Engine {
            inner,
            size,
            options,
            rmw: tokio::sync::RwLock::new(()),
            cached,
            fast_path: std::sync::atomic::AtomicBool::new(true),
            big_writes: tokio::sync::Mutex::new(()),
        }))
    }

    /// Size of the image in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn options(&self) -> EngineOptions {
        self.options
    }

    fn direct(&self) -> bool {
        self.options.cache == CacheMode::None
    }

    /// Turns the writeback fast path on or off (on by default). Tests turn it off to drive
    /// every request through the engine itself.
    pub fn set_fast_path(&self, on: bool) {
        self.fast_path.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The page-cache descriptor when the writeback fast path may be used.
    fn fast_file(&self) -> Option<&std::fs::File> {
        self.cached.as_ref().filter(|_| self.fast_path.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Reads `len` bytes at `offset`.
    ///
    /// Writeback fast path: the read is first tried inline on the caller's thread with
    /// `preadv2(RWF_NOWAIT)`, which copies from the page cache and never waits for the disk.
    /// A page-cache hit then costs one syscall and no thread hand-off (through io_uring a
    /// buffered read is handed to a kernel worker thread); a miss (`EAGAIN` or a
    /// short read) goes to the engine as usual.
    pub async fn read(&self, offset: u64, len: usize) -> Result<IoBuf, EngineError> {
        if let Some(file) = self.fast_file() {
            let mut buf = IoBuf::for_overwrite(len);
            let mut slice = [std::io::IoSliceMut::new(buf.as_mut_slice())];
            if let Ok(n) =
                rustix::io::preadv2(file, &mut slice, offset, rustix::io::ReadWriteFlags::NOWAIT)
            {
                if n == len {
                    return Ok(buf);
                }
            }
        }
        if !self.direct() || is_aligned(offset, len as u64) {
            return self.raw_read(offset, len).await;
        }
        // Bounce: read the rounded-out range, copy the asked part out.
        let start = round_down(offset);
        let end = round_up(offset + len as u64);
        let bounce = self.raw_read(start, (end - start) as usize).await?;
        let skip = (offset - start) as usize;
        Ok(IoBuf::from_slice(&bounce.as_slice()[skip..skip + len]))
    }

    /// Writes all of `buf` at `offset`; with `fua` the data is durable when this returns.
    /// The buffer is handed back so the caller can reuse it.
    ///
    /// Writeback fast path: a write without FUA is copied into the page cache inline on the
    /// caller's thread (what nbdkit's worker threads do). Linux cannot do buffered writes with
    /// RWF_NOWAIT on ext4 (EOPNOTSUPP), so io_uring hands every buffered write to a kernel
    /// worker thread: two context switches per 4 KiB write, measured as the largest cost on
    /// this path. The inline copy may block under dirty-page throttling, which is the page
    /// cache's own backpressure. It goes in parts of [`WRITEBACK_CHUNK`], and writes of at
    /// least that size one at a time (`big_writes`). FUA writes wait for the disk and go to
    /// the engine.
    pub async fn write(&self, offset: u64, buf: IoBuf, fua: bool) -> Result<IoBuf, EngineError> {
        if let Some(file) = self.fast_file().filter(|_| !fua) {
            let _one_at_a_time = if buf.len() >= WRITEBACK_CHUNK {
                Some(self.big_writes.lock().await)
            } else {
                None
            };
            for (i, part) in buf.as_slice().chunks(WRITEBACK_CHUNK).enumerate() {
                let at = offset + (i * WRITEBACK_CHUNK) as u64;
                sync::pwrite_full(file, part, at, false)?;
            }
            return Ok(buf);
        }
        if !self.direct() || buf.is_empty() {
            return self.raw_write(offset, buf, fua).await;
        }
        if is_aligned(offset, buf.len() as u64) {
            let _shared = self.rmw.read().await;
            return self.raw_write(offset, buf, fua).await;
        }
        let _exclusive = self.rmw.write().await;
        self.rmw_locked(offset, buf.as_slice(), fua).await?;
        Ok(buf)
    }

    /// Read-modify-write of the blocks around `[offset, offset + data.len())` under O_DIRECT.
    /// The caller holds `rmw` exclusively. One write of the whole rounded range, so concurrent
    /// readers see each block either before or after.
    async fn rmw_locked(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), EngineError> {
        let end_byte = offset + data.len() as u64;
        let start = round_down(offset);
        let end = round_up(end_byte);
        let mut bounce = IoBuf::for_overwrite((end - start) as usize);
        let head_partial = offset != start;
        let tail_partial = end_byte != end;
        let one_block = end - start == DIRECT_ALIGN;
        let block = DIRECT_ALIGN as usize;
        if head_partial || (one_block && tail_partial) {
            let head = self.raw_read(start, block).await?;
            bounce.as_mut_slice()[..block].copy_from_slice(head.as_slice());
        }
        if tail_partial && !one_block {
            let tail = self.raw_read(end - DIRECT_ALIGN, block).await?;
            let n = bounce.len();
            bounce.as_mut_slice()[n - block..].copy_from_slice(tail.as_slice());
        }
        let skip = (offset - start) as usize;
        bounce.as_mut_slice()[skip..skip + data.len()].copy_from_slice(data);
        self.raw_write(start, bounce, fua).await?;
        Ok(())
    }

    /// Makes every completed write (on any connection) durable.
    pub async fn flush(&self) -> Result<(), EngineError> {
        match &self.inner {
            Inner::Sync(e) => e.flush().await,
            Inner::Uring(e) => e.flush().await,
        }
    }

    /// Discards the range (punches a hole); it reads as zeros afterwards.
    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        self.zero(offset, len, false, false).await
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
        self.zero(offset, len, no_hole, fast).await
    }

    /// Trim and write-zeroes. Under O_DIRECT the aligned middle is fallocated (first, so that
    /// a `NotFast` failure changes nothing) and partial edge blocks get zeros by RMW.
    async fn zero(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fast: bool,
    ) -> Result<(), EngineError> {
        if len == 0 {
            return Ok(());
        }
        if !self.direct() {
            return self.raw_zero(offset, len, no_hole, fast).await;
        }
        let end = offset + len;
        let (mid_start, mid_end) = (round_up(offset), round_down(end));
        if mid_start < mid_end {
            let _shared = self.rmw.read().await;
            self.raw_zero(mid_start, mid_end - mid_start, no_hole, fast).await?;
        }
        let mut edges = Vec::with_capacity(2);
        if mid_start >= mid_end {
            edges.push((offset, end)); // within one or two blocks, no whole block inside
        } else {
            if offset < mid_start {
                edges.push((offset, mid_start));
            }
            if mid_end < end {
                edges.push((mid_end, end));
            }
        }
        for (a, b) in edges {
            // Each edge is a partial block (less than DIRECT_ALIGN bytes).
            let zeros = vec![0u8; (b - a) as usize];
            let _exclusive = self.rmw.write().await;
            self.rmw_locked(a, &zeros, false).await?;
        }
        Ok(())
    }

    /// Allocation map from `offset`, covering at least one byte and at most `len` bytes
    /// (SEEK_DATA / SEEK_HOLE).
    pub async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>, EngineError> {
        match &self.inner {
            Inner::Sync(e) => e.allocation(offset, len).await,
            Inner::Uring(e) => e.allocation(offset, len).await,
        }
    }

    /// Hint to read the range into the cache (NBD_CMD_CACHE).
    pub async fn cache(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        match &self.inner {
            Inner::Sync(e) => e.cache(offset, len).await,
            Inner::Uring(e) => e.cache(offset, len).await,
        }
    }

    async fn raw_read(&self, offset: u64, len: usize) -> Result<IoBuf, EngineError> {
        match &self.inner {
            Inner::Sync(e) => e.read(offset, len).await,
            Inner::Uring(e) => e.read(offset, len).await,
        }
    }

    async fn raw_write(&self, offset: u64, buf: IoBuf, fua: bool) -> Result<IoBuf, EngineError> {
        match &self.inner {
            Inner::Sync(e) => e.write(offset, buf, fua).await,
            Inner::Uring(e) => e.write(offset, buf, fua).await,
        }
    }

    async fn raw_zero(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fast: bool,
    ) -> Result<(), EngineError> {
        match &self.inner {
            Inner::Sync(e) => e.write_zeroes(offset, len, no_hole, fast).await,
            Inner::Uring(e) => e.write_zeroes(offset, len, no_hole, fast).await,
        }
    }
}
