//! The plain engine: pread/pwrite/fallocate/fdatasync on tokio's blocking pool.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use rustix::fs::{FallocateFlags, SeekFrom};
use rustix::io::{Errno, ReadWriteFlags};

use super::{CacheMode, EngineError, EngineOptions, Extent, IoBuf};

#[derive(Debug)]
pub(super) struct SyncEngine {
    file: Arc<File>,
    size: u64,
}

fn io(op: &'static str, offset: u64, len: u64) -> impl FnOnce(Errno) -> EngineError {
    move |e| EngineError::Io { op, offset, len, source: e.into() }
}

/// Opens the image with the flags the cache mode asks for.
pub(super) fn open_image(path: &Path, options: EngineOptions) -> Result<File, EngineError> {
    let mut oo = OpenOptions::new();
    oo.read(true).write(!options.read_only);
    if options.cache == CacheMode::None {
        oo.custom_flags(libc::O_DIRECT);
    }
    oo.open(path).map_err(|source| EngineError::Open { path: path.to_path_buf(), source })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> Result<T, EngineError> {
    tokio::task::spawn_blocking(f).await.map_err(|_| EngineError::Shutdown)?
}

/// pread until `buf` is full; a read at or past the end of file yields zeros.
pub(super) fn pread_full(file: &File, buf: &mut [u8], offset: u64) -> Result<(), EngineError> {
    let mut done = 0usize;
    while done < buf.len() {
        let n = match rustix::io::pread(file, &mut buf[done..], offset + done as u64) {
            Ok(n) => n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(io("read", offset, buf.len() as u64)(e)),
        };
        if n == 0 {
            buf[done..].fill(0);
            break;
        }
        done += n;
    }
    Ok(())
}

/// pwrite all of `data`, with RWF_DSYNC when `fua`.
pub(super) fn pwrite_full(
    file: &File,
    data: &[u8],
    offset: u64,
    fua: bool,
) -> Result<(), EngineError> {
    let flags = if fua { ReadWriteFlags::DSYNC } else { ReadWriteFlags::empty() };
    let mut done = 0usize;
    while done < data.len() {
        let slice = [std::io::IoSlice::new(&data[done..])];
        match rustix::io::pwritev2(file, &slice, offset + done as u64, flags) {
            Ok(0) => {
                return Err(EngineError::Short {
                    op: "write",
                    offset,
                    len: data.len() as u64,
                    done: done as u64,
                })
            }
            Ok(n) => done += n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(io("write", offset, data.len() as u64)(e)),
        }
    }
    Ok(())
}

/// The allocation map of `[offset, offset+len)` by SEEK_DATA/SEEK_HOLE.
pub(super) fn allocation_map(
    file: &File,
    offset: u64,
    len: u64,
    size: u64,
) -> Result<Vec<Extent>, EngineError> {
    let end = offset.saturating_add(len).min(size);
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end {
        let data = match rustix::fs::seek(file, SeekFrom::Data(pos)) {
            Ok(d) => d.min(end),
            Err(Errno::NXIO) => end,
            Err(e) => return Err(io("seek_data", pos, end - pos)(e)),
        };
        if data > pos {
            out.push(Extent { len: data - pos, hole: true });
            pos = data;
            continue;
        }
        let hole = match rustix::fs::seek(file, SeekFrom::Hole(pos)) {
            Ok(h) => h.min(end),
            Err(Errno::NXIO) => end,
            Err(e) => return Err(io("seek_hole", pos, end - pos)(e)),
        };
        let hole = hole.max(pos + 1).min(end);
        out.push(Extent { len: hole - pos, hole: false });
        pos = hole;
    }
    Ok(out)
}

/// Zeroes a range: punch a hole, or (no_hole) FALLOC_FL_ZERO_RANGE, falling back to writing
/// zeros unless `fast` was asked for.
pub(super) fn zero_range(
    file: &File,
    offset: u64,
    len: u64,
    no_hole: bool,
    fast: bool,
) -> Result<(), EngineError> {
    let flags = if no_hole {
        FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE
    } else {
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE
    };
    match rustix::fs::fallocate(file, flags, offset, len) {
        Ok(()) => Ok(()),
        Err(Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) if fast => {
            Err(EngineError::NotFast { offset, len })
        }
        Err(Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) => {
            const CHUNK: u64 = 1 << 20;
            let zeros = IoBuf::zeroed(CHUNK as usize);
            let mut pos = offset;
            while pos < offset + len {
                let n = CHUNK.min(offset + len - pos) as usize;
                pwrite_full(file, &zeros.as_slice()[..n], pos, false)?;
                pos += n as u64;
            }
            Ok(())
        }
        Err(e) => Err(io("zero", offset, len)(e)),
    }
}

impl SyncEngine {
    /// The engine over `file` (the opened image, `size` bytes).
    pub(super) fn new(file: File, size: u64) -> Self {
        SyncEngine { file: Arc::new(file), size }
    }

    pub(super) async fn read(&self, offset: u64, len: usize) -> Result<IoBuf, EngineError> {
        let file = self.file.clone();
        blocking(move || {
            let mut buf = IoBuf::for_overwrite(len);
            pread_full(&file, buf.as_mut_slice(), offset)?;
            Ok(buf)
        })
        .await
    }

    pub(super) async fn write(
        &self,
        offset: u64,
        buf: IoBuf,
        fua: bool,
    ) -> Result<IoBuf, EngineError> {
        let file = self.file.clone();
        blocking(move || {
            pwrite_full(&file, buf.as_slice(), offset, fua)?;
            Ok(buf)
        })
        .await
    }

    pub(super) async fn flush(&self) -> Result<(), EngineError> {
        let file = self.file.clone();
        blocking(move || rustix::fs::fdatasync(&*file).map_err(io("flush", 0, 0))).await
    }

    pub(super) async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fast: bool,
    ) -> Result<(), EngineError> {
        let file = self.file.clone();
        blocking(move || zero_range(&file, offset, len, no_hole, fast)).await
    }

    pub(super) async fn allocation(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>, EngineError> {
        let file = self.file.clone();
        let size = self.size;
        blocking(move || allocation_map(&file, offset, len, size)).await
    }

    pub(super) async fn cache(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        let file = self.file.clone();
        blocking(move || {
            rustix::fs::fadvise(
                &*file,
                offset,
                std::num::NonZeroU64::new(len),
                rustix::fs::Advice::WillNeed,
            )
            .map_err(io("cache", offset, len))
        })
        .await
    }
}
