//! Where change tracking keeps its files: a small storage interface with a real directory
//! implementation ([`DirStorage`], with named fault points) and, for tests, an in-memory disk
//! that can lose, keep or tear every write not yet synced ([`sim::SimStorage`]).
//!
//! The interface is what the crash-ordering comments in `mod.rs` rely on: `write_at` is not
//! durable until `sync` of the same file returns; `create_atomic` and `remove` are durable when
//! they return (temp -> fsync -> rename -> fsync(dir), and unlink -> fsync(dir)).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The files of one volume's change tracking.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Reads up to `buf.len()` bytes at `off`; returns how many (0 at or beyond the end).
    /// `Ok(None)` if the file does not exist.
    fn read_at(&self, file: &str, off: u64, buf: &mut [u8]) -> io::Result<Option<usize>>;
    /// Writes `data` at `off` (not durable until [`Storage::sync`]). The file must exist.
    fn write_at(&self, file: &str, off: u64, data: &[u8]) -> io::Result<()>;
    /// Makes every earlier `write_at` to `file` durable (fdatasync).
    fn sync(&self, file: &str) -> io::Result<()>;
    /// Creates or replaces `file` with `data`, durably and atomically.
    fn create_atomic(&self, file: &str, data: &[u8]) -> io::Result<()>;
    /// Removes `file` durably; a missing file is not an error.
    fn remove(&self, file: &str) -> io::Result<()>;
    /// The names of the files.
    fn list(&self) -> io::Result<Vec<String>>;
    /// A path or description of `file` for messages.
    fn describe(&self, file: &str) -> PathBuf;
}

/// Named fault points ([`blockferry_faults`], compiled in with the `failpoints` feature): the
/// environment variable `BLOCKFERRY_FAILPOINTS="name=action[@n],..."` makes the n-th hit
/// (default the first) of point `name` either `exit` the process at once (a crash between two
/// steps) or fail with `error` (EIO). Points: `cbt.al.write`, `cbt.al.sync`, `cbt.page.write`,
/// `cbt.page.sync`, `cbt.create`, `cbt.remove`, each hit just before that operation.
pub use blockferry_faults::failpoint;

/// The real thing: files in a directory.
#[derive(Debug)]
pub struct DirStorage {
    dir: PathBuf,
    open: Mutex<HashMap<String, Arc<File>>>,
}

impl DirStorage {
    /// Uses `dir`, creating it (and syncing its parent) if missing.
    pub fn open(dir: &Path) -> io::Result<DirStorage> {
        if !dir.is_dir() {
            std::fs::create_dir_all(dir)?;
            if let Some(parent) = dir.parent() {
                File::open(parent)?.sync_all()?;
            }
        }
        Ok(DirStorage { dir: dir.to_path_buf(), open: Mutex::new(HashMap::new()) })
    }

    fn file(&self, name: &str) -> io::Result<Option<Arc<File>>> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = open.get(name) {
            return Ok(Some(f.clone()));
        }
        match OpenOptions::new().read(true).write(true).open(self.dir.join(name)) {
            Ok(f) => {
                let f = Arc::new(f);
                open.insert(name.to_string(), f.clone());
                Ok(Some(f))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
}

fn point(name: &str, kind: &str) -> io::Result<()> {
    // Without the feature nothing is checked, and no point name is built on every write.
    if !cfg!(feature = "failpoints") {
        return Ok(());
    }
    // Activity-log and bitmap files are told apart by name (see mod.rs).
    let what = if name == super::AL_FILE { "al" } else { "page" };
    failpoint(&format!("cbt.{what}.{kind}"))
}

impl Storage for DirStorage {
    fn read_at(&self, file: &str, off: u64, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let Some(f) = self.file(file)? else { return Ok(None) };
        let mut done = 0;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Some(done))
    }

    fn write_at(&self, file: &str, off: u64, data: &[u8]) -> io::Result<()> {
        point(file, "write")?;
        let f = self.file(file)?.ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        f.write_all_at(data, off)
    }

    fn sync(&self, file: &str) -> io::Result<()> {
        point(file, "sync")?;
        let f = self.file(file)?.ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        f.sync_data()
    }

    fn create_atomic(&self, file: &str, data: &[u8]) -> io::Result<()> {
        failpoint("cbt.create")?;
        // 1. write the whole content to a temp file; 2. fsync it; 3. rename over the name;
        // 4. fsync the directory. A crash before 3 leaves only a temp file (removed at open);
        // after 4 the new file is there whole.
        let tmp = self.dir.join(format!(".{file}.tmp"));
        {
            let f = File::create(&tmp)?;
            f.write_all_at(data, 0)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.dir.join(file))?;
        self.open.lock().unwrap_or_else(|e| e.into_inner()).remove(file);
        self.sync_dir()
    }

    fn remove(&self, file: &str) -> io::Result<()> {
        failpoint("cbt.remove")?;
        self.open.lock().unwrap_or_else(|e| e.into_inner()).remove(file);
        match std::fs::remove_file(self.dir.join(file)) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with(".tmp") {
                // A create that crashed before its rename.
                let _ = std::fs::remove_file(self.dir.join(&name));
                continue;
            }
            out.push(name);
        }
        out.sort();
        Ok(out)
    }

    fn describe(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}

/// An in-memory disk for crash tests.
#[cfg(test)]
pub mod sim {
    use super::*;

    /// What happens at a power cut to one write that was not yet synced.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Fate {
        Dropped,
        Kept,
        /// Only the 512-byte sectors whose bit is set reached the disk (sector i: bit
        /// min(i, 63)).
        Torn(u64),
    }

    #[derive(Debug, Default, Clone)]
    struct SimFile {
        durable: Vec<u8>,
        /// Unsynced writes, oldest first.
        pending: Vec<(u64, Vec<u8>)>,
    }

    impl SimFile {
        fn view(&self) -> Vec<u8> {
            let mut v = self.durable.clone();
            for (off, d) in &self.pending {
                put(&mut v, *off, d);
            }
            v
        }
    }

    fn put(v: &mut Vec<u8>, off: u64, d: &[u8]) {
        let end = off as usize + d.len();
        if v.len() < end {
            v.resize(end, 0);
        }
        v[off as usize..end].copy_from_slice(d);
    }

    /// Files in memory; every storage call counts as one step, and once `dead_after` steps
    /// have run every call fails (the machine is off).
    #[derive(Debug, Default)]
    pub struct SimStorage {
        files: Mutex<std::collections::BTreeMap<String, SimFile>>,
        steps: std::sync::atomic::AtomicUsize,
        dead_after: Mutex<Option<usize>>,
    }

    impl SimStorage {
        pub fn new() -> SimStorage {
            SimStorage::default()
        }

        /// Steps taken so far.
        pub fn steps(&self) -> usize {
            self.steps.load(std::sync::atomic::Ordering::SeqCst)
        }

        /// Every call after the first `n` steps (from now on counting all steps) fails.
        pub fn die_after(&self, n: usize) {
            *self.dead_after.lock().unwrap() = Some(n);
        }

        fn step(&self) -> io::Result<()> {
            let n = self.steps.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            match *self.dead_after.lock().unwrap() {
                Some(limit) if n >= limit => Err(io::Error::other("power is off")),
                _ => Ok(()),
            }
        }

        /// Unsynced writes at this moment, in order: (file, index).
        pub fn pending(&self) -> Vec<(String, usize)> {
            let files = self.files.lock().unwrap();
            files
                .iter()
                .flat_map(|(n, f)| (0..f.pending.len()).map(move |i| (n.clone(), i)))
                .collect()
        }

        /// The power cut: every unsynced write meets `fate(file, index)`; returns a new disk
        /// holding what survived (the old one stays as it was).
        pub fn crash(&self, mut fate: impl FnMut(&str, usize) -> Fate) -> SimStorage {
            let files = self.files.lock().unwrap();
            let mut out = std::collections::BTreeMap::new();
            for (name, f) in files.iter() {
                let mut durable = f.durable.clone();
                for (i, (off, d)) in f.pending.iter().enumerate() {
                    match fate(name, i) {
                        Fate::Dropped => {}
                        Fate::Kept => put(&mut durable, *off, d),
                        Fate::Torn(mask) => {
                            for (i, sector) in d.chunks(512).enumerate() {
                                if mask & (1 << i.min(63)) != 0 {
                                    put(&mut durable, *off + i as u64 * 512, sector);
                                }
                            }
                        }
                    }
                }
                out.insert(name.clone(), SimFile { durable, pending: Vec::new() });
            }
            SimStorage { files: Mutex::new(out), ..SimStorage::default() }
        }

        /// Damages `file` (for corruption tests): flips a byte at `off`.
        pub fn corrupt(&self, file: &str, off: u64) {
            let mut files = self.files.lock().unwrap();
            let f = files.get_mut(file).expect("file exists");
            let mut v = f.view();
            v[off as usize] ^= 0x5a;
            *f = SimFile { durable: v, pending: Vec::new() };
        }

        /// Deletes `file` outright (for "missing file" tests).
        pub fn delete(&self, file: &str) {
            self.files.lock().unwrap().remove(file);
        }
    }

    impl Storage for SimStorage {
        fn read_at(&self, file: &str, off: u64, buf: &mut [u8]) -> io::Result<Option<usize>> {
            let files = self.files.lock().unwrap();
            let Some(f) = files.get(file) else { return Ok(None) };
            let v = f.view();
            let start = (off as usize).min(v.len());
            let n = buf.len().min(v.len() - start);
            buf[..n].copy_from_slice(&v[start..start + n]);
            Ok(Some(n))
        }

        fn write_at(&self, file: &str, off: u64, data: &[u8]) -> io::Result<()> {
            self.step()?;
            let mut files = self.files.lock().unwrap();
            let f = files.get_mut(file).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
            f.pending.push((off, data.to_vec()));
            Ok(())
        }

        fn sync(&self, file: &str) -> io::Result<()> {
            self.step()?;
            let mut files = self.files.lock().unwrap();
            let f = files.get_mut(file).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
            f.durable = f.view();
            f.pending.clear();
            Ok(())
        }

        fn create_atomic(&self, file: &str, data: &[u8]) -> io::Result<()> {
            self.step()?;
            let f = SimFile { durable: data.to_vec(), pending: Vec::new() };
            self.files.lock().unwrap().insert(file.to_string(), f);
            Ok(())
        }

        fn remove(&self, file: &str) -> io::Result<()> {
            self.step()?;
            self.files.lock().unwrap().remove(file);
            Ok(())
        }

        fn list(&self) -> io::Result<Vec<String>> {
            Ok(self.files.lock().unwrap().keys().cloned().collect())
        }

        fn describe(&self, file: &str) -> PathBuf {
            PathBuf::from(format!("sim:{file}"))
        }
    }
}
