//! Where a replica keeps its files: a small storage interface with a real directory
//! implementation ([`DirStorage`], with named fault points) and, for tests, an in-memory disk
//! that can lose, keep or tear every write not yet synced ([`super::sim::SimStorage`]).
//!
//! File names are relative to the volume's directory: `meta`, `image.raw` and
//! `journal/SEQ.log`. The contract the crash-ordering comments in `mod.rs` rely on:
//! `write_at`, `zero` and `set_len` are not durable until `sync` of the same file returns;
//! `create`, `create_atomic`, `rename` and `remove` are durable when they return (the
//! directory is synced; `create_atomic` is temp -> fsync -> rename -> fsync(dir)).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The subdirectory holding journal segments.
pub const JOURNAL_DIR: &str = "journal";

/// The files of one replica.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Reads up to `buf.len()` bytes at `off`; returns how many (short at the end of the file).
    /// A missing file is `ErrorKind::NotFound`.
    fn read_at(&self, file: &str, off: u64, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes `data` at `off` (not durable until [`Storage::sync`]). The file must exist.
    fn write_at(&self, file: &str, off: u64, data: &[u8]) -> io::Result<()>;
    /// Writes `parts` one after the other from `off`, as one write (not durable until
    /// [`Storage::sync`]). The file must exist. The default copies them into one buffer.
    fn write_vectored_at(&self, file: &str, off: u64, parts: &[&[u8]]) -> io::Result<()> {
        self.write_at(file, off, &parts.concat())
    }
    /// Makes `[off, off + len)` read as zeros (a punched hole where the file system can),
    /// keeping the size. Not durable until [`Storage::sync`].
    fn zero(&self, file: &str, off: u64, len: u64) -> io::Result<()>;
    /// Truncates or extends `file` (not durable until [`Storage::sync`]).
    fn set_len(&self, file: &str, len: u64) -> io::Result<()>;
    /// The length of `file`, `None` if it does not exist.
    fn len(&self, file: &str) -> io::Result<Option<u64>>;
    /// Makes every earlier change to `file` durable (fdatasync).
    fn sync(&self, file: &str) -> io::Result<()>;
    /// Drops the clean cached pages of `file` (after a sync): the replica image is written
    /// once and rarely read, so the target keeps no page cache for it. Advisory; the default
    /// does nothing.
    fn drop_cache(&self, _file: &str) -> io::Result<()> {
        Ok(())
    }
    /// Creates `file` empty if it does not exist, durably (the directory is synced).
    fn create(&self, file: &str) -> io::Result<()>;
    /// Creates or replaces `file` with `data`, durably and atomically.
    fn create_atomic(&self, file: &str, data: &[u8]) -> io::Result<()>;
    /// Removes `file` durably; a missing file is not an error.
    fn remove(&self, file: &str) -> io::Result<()>;
    /// Renames `from` to `to` (in the same directory; `to` does not exist), durably, with
    /// its contents and their unsynced changes as they are.
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// The names of the files in `dir` ("" for the top level, or [`JOURNAL_DIR`]), sorted.
    fn list(&self, dir: &str) -> io::Result<Vec<String>>;
    /// A path or description of `file` for messages.
    fn describe(&self, file: &str) -> PathBuf;
    /// The real path of `file`, if it is a real file.
    fn local_path(&self, file: &str) -> Option<PathBuf>;
}

/// True if `e` says the device is full (ENOSPC or EDQUOT).
pub fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(c) if c == rustix::io::Errno::NOSPC.raw_os_error()
        || c == rustix::io::Errno::DQUOT.raw_os_error())
}

/// Named fault points ([`blockferry_faults`], compiled in with the `failpoints` feature): the
/// environment variable `BLOCKFERRY_FAILPOINTS="name=action[@n],..."` makes the n-th hit
/// (default the first) of point `name` either `exit` the process at once with status 86 (a
/// crash between two steps) or fail with `error` (an I/O error). Points, each hit just before
/// that operation: `target.journal.append`, `target.journal.sync`, `target.image.write`,
/// `target.image.sync`, `target.meta.write`.
pub use blockferry_faults::failpoint;

fn point(file: &str, kind: &str) -> io::Result<()> {
    // Without the feature nothing is checked, and no point name is built on every write.
    if !cfg!(feature = "failpoints") {
        return Ok(());
    }
    let name = match (file.starts_with(JOURNAL_DIR), kind) {
        (true, "write") => "target.journal.append",
        (true, _) => "target.journal.sync",
        (false, "write") => "target.image.write",
        (false, _) => "target.image.sync",
    };
    failpoint(name)
}

/// The real thing: files in a directory.
#[derive(Debug)]
pub struct DirStorage {
    dir: PathBuf,
    open: Mutex<HashMap<String, Arc<File>>>,
}

impl DirStorage {
    /// Uses `dir` (and `dir/journal`), creating them (and syncing their parents) if missing.
    pub fn open(dir: &Path) -> io::Result<DirStorage> {
        for d in [dir.to_path_buf(), dir.join(JOURNAL_DIR)] {
            if !d.is_dir() {
                std::fs::create_dir_all(&d)?;
                if let Some(parent) = d.parent() {
                    File::open(parent)?.sync_all()?;
                }
            }
        }
        Ok(DirStorage { dir: dir.to_path_buf(), open: Mutex::new(HashMap::new()) })
    }

    fn file(&self, name: &str) -> io::Result<Arc<File>> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = open.get(name) {
            return Ok(f.clone());
        }
        let f = Arc::new(OpenOptions::new().read(true).write(true).open(self.dir.join(name))?);
        open.insert(name.to_string(), f.clone());
        Ok(f)
    }

    fn sync_dir_of(&self, file: &str) -> io::Result<()> {
        let p = self.dir.join(file);
        File::open(p.parent().unwrap_or(&self.dir))?.sync_all()
    }
}

impl Storage for DirStorage {
    fn read_at(&self, file: &str, off: u64, buf: &mut [u8]) -> io::Result<usize> {
        let f = self.file(file)?;
        let mut done = 0;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn write_at(&self, file: &str, off: u64, data: &[u8]) -> io::Result<()> {
        point(file, "write")?;
        self.file(file)?.write_all_at(data, off)
    }

    fn write_vectored_at(&self, file: &str, mut off: u64, parts: &[&[u8]]) -> io::Result<()> {
        point(file, "write")?;
        let f = self.file(file)?;
        // pwritev takes at most IOV_MAX (1024 on Linux) buffers per call.
        const IOV_MAX: usize = 1024;
        let mut parts: Vec<&[u8]> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
        let mut i = 0;
        while i < parts.len() {
            let iov: Vec<io::IoSlice<'_>> = parts[i..(i + IOV_MAX).min(parts.len())]
                .iter()
                .map(|p| io::IoSlice::new(p))
                .collect();
            let mut n = match rustix::io::pwritev(&*f, &iov, off) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e == rustix::io::Errno::INTR => continue,
                Err(e) => return Err(e.into()),
            };
            drop(iov);
            off += n as u64;
            // Skip what was written; a short write resumes inside a part.
            while i < parts.len() && n >= parts[i].len() {
                n -= parts[i].len();
                i += 1;
            }
            if n > 0 {
                parts[i] = &parts[i][n..];
            }
        }
        Ok(())
    }

    fn zero(&self, file: &str, off: u64, len: u64) -> io::Result<()> {
        point(file, "write")?;
        let f = self.file(file)?;
        let flags = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&*f, flags, off, len) {
            Ok(()) => Ok(()),
            Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => {
                // No hole punching here: write the zeros.
                let chunk = vec![0u8; len.min(1 << 20) as usize];
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(chunk.len() as u64) as usize;
                    f.write_all_at(&chunk[..n], off + done)?;
                    done += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn set_len(&self, file: &str, len: u64) -> io::Result<()> {
        point(file, "write")?;
        self.file(file)?.set_len(len)
    }

    fn len(&self, file: &str) -> io::Result<Option<u64>> {
        match std::fs::metadata(self.dir.join(file)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn sync(&self, file: &str) -> io::Result<()> {
        point(file, "sync")?;
        self.file(file)?.sync_data()
    }

    fn drop_cache(&self, file: &str) -> io::Result<()> {
        let f = self.file(file)?;
        rustix::fs::fadvise(&*f, 0, None, rustix::fs::Advice::DontNeed)?;
        Ok(())
    }

    fn create(&self, file: &str) -> io::Result<()> {
        point(file, "write")?;
        OpenOptions::new().write(true).create(true).truncate(false).open(self.dir.join(file))?;
        self.sync_dir_of(file)
    }

    fn create_atomic(&self, file: &str, data: &[u8]) -> io::Result<()> {
        failpoint("target.meta.write")?;
        // 1. write the whole content to a temp file; 2. fsync it; 3. rename over the name;
        // 4. fsync the directory. A crash before 3 leaves only a temp file (removed by
        // `list`); after 4 the new file is there whole.
        let tmp = self.dir.join(format!(".{file}.tmp"));
        {
            let f = File::create(&tmp)?;
            f.write_all_at(data, 0)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.dir.join(file))?;
        self.open.lock().unwrap_or_else(|e| e.into_inner()).remove(file);
        self.sync_dir_of(file)
    }

    fn remove(&self, file: &str) -> io::Result<()> {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).remove(file);
        match std::fs::remove_file(self.dir.join(file)) {
            Ok(()) => self.sync_dir_of(file),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        point(to, "write")?;
        {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            open.remove(from);
            open.remove(to);
        }
        std::fs::rename(self.dir.join(from), self.dir.join(to))?;
        self.sync_dir_of(to)
    }

    fn list(&self, dir: &str) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        let d = if dir.is_empty() { self.dir.clone() } else { self.dir.join(dir) };
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with(".tmp") {
                // A create_atomic that crashed before its rename.
                let _ = std::fs::remove_file(d.join(&name));
                continue;
            }
            if entry.file_type()?.is_file() {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    fn describe(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn local_path(&self, file: &str) -> Option<PathBuf> {
        Some(self.dir.join(file))
    }
}
