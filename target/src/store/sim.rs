//! An in-memory disk for power-cut tests (`cfg(test)` or the `sim` feature): every change not
//! yet synced is kept in a list, and a power cut ([`SimStorage::crash`]) decides per change
//! whether it was dropped, reached the disk, or reached it only in part (torn at 512-byte
//! sectors). Every mutating call counts as one step; after [`SimStorage::die_after`] steps every
//! call fails (the machine is off), which is how a test cuts power at an exact operation.
//! A space quota makes writes that grow the files beyond it fail with ENOSPC.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::storage::Storage;

/// What happens at a power cut to one change that was not yet synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Dropped,
    Kept,
    /// Only the 512-byte sectors whose bit is set reached the disk (sector i: bit min(i, 63)).
    /// A torn `set_len` or `zero` is kept.
    Torn(u64),
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, Vec<u8>),
    Zero(u64, u64),
    SetLen(u64),
}

#[derive(Debug, Default, Clone)]
struct SimFile {
    durable: Vec<u8>,
    /// What reads see: `durable` with `pending` applied.
    current: Vec<u8>,
    /// Unsynced changes, oldest first.
    pending: Vec<Op>,
}

fn put(v: &mut Vec<u8>, off: u64, d: &[u8]) {
    let end = off as usize + d.len();
    if v.len() < end {
        v.resize(end, 0);
    }
    v[off as usize..end].copy_from_slice(d);
}

fn apply(v: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write(off, d) => put(v, *off, d),
        Op::Zero(off, len) => {
            let end = ((off + len) as usize).min(v.len());
            if (*off as usize) < end {
                v[*off as usize..end].fill(0);
            }
        }
        Op::SetLen(len) => v.resize(*len as usize, 0),
    }
}

/// A small deterministic RNG (splitmix64) so crashes replay from a seed.
#[derive(Debug, Clone)]
pub struct SimRng(pub u64);

impl SimRng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Files in memory.
#[derive(Debug, Default)]
pub struct SimStorage {
    files: Mutex<BTreeMap<String, SimFile>>,
    steps: AtomicUsize,
    dead_after: Mutex<Option<usize>>,
    quota: Mutex<Option<u64>>,
}

impl SimStorage {
    pub fn new() -> SimStorage {
        SimStorage::default()
    }

    /// Mutating steps taken so far.
    pub fn steps(&self) -> usize {
        self.steps.load(Ordering::SeqCst)
    }

    /// Every call after step `n` (counting all steps so far) fails: the power is off.
    pub fn die_after(&self, n: usize) {
        *self.dead_after.lock().unwrap_or_else(|e| e.into_inner()) = Some(n);
    }

    /// Limits the total length of all files to `bytes` (`None`: no limit); a write or
    /// `set_len` that would grow them beyond it fails with ENOSPC and changes nothing.
    pub fn set_quota(&self, bytes: Option<u64>) {
        *self.quota.lock().unwrap_or_else(|e| e.into_inner()) = bytes;
    }

    /// The total length of all files as reads see them.
    pub fn used(&self) -> u64 {
        let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        files.values().map(|f| f.current.len() as u64).sum()
    }

    fn step(&self) -> io::Result<()> {
        let n = self.steps.fetch_add(1, Ordering::SeqCst);
        match *self.dead_after.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(limit) if n >= limit => Err(io::Error::other("power is off")),
            _ => Ok(()),
        }
    }

    fn check_quota(
        &self,
        files: &BTreeMap<String, SimFile>,
        file: &str,
        new_len: u64,
    ) -> io::Result<()> {
        let Some(q) = *self.quota.lock().unwrap_or_else(|e| e.into_inner()) else { return Ok(()) };
        let total: u64 = files.values().map(|f| f.current.len() as u64).sum();
        let old = files.get(file).map_or(0, |f| f.current.len() as u64);
        if new_len > old && total + (new_len - old) > q {
            return Err(io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error()));
        }
        Ok(())
    }

    fn change(&self, file: &str, op: Op) -> io::Result<()> {
        self.step()?;
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        let cur_len =
            files.get(file).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?.current.len()
                as u64;
        let new_len = match &op {
            Op::Write(off, d) => cur_len.max(off + d.len() as u64),
            Op::Zero(..) => cur_len,
            Op::SetLen(l) => *l,
        };
        self.check_quota(&files, file, new_len)?;
        let f = files.get_mut(file).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        apply(&mut f.current, &op);
        f.pending.push(op);
        Ok(())
    }

    /// Unsynced changes at this moment: (file, count).
    pub fn pending(&self) -> Vec<(String, usize)> {
        let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        files
            .iter()
            .filter(|(_, f)| !f.pending.is_empty())
            .map(|(n, f)| (n.clone(), f.pending.len()))
            .collect()
    }

    /// The power cut: every unsynced change meets `fate(file, index)`; returns a new disk
    /// holding what survived (this one stays as it was).
    pub fn crash(&self, mut fate: impl FnMut(&str, usize) -> Fate) -> SimStorage {
        let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = BTreeMap::new();
        for (name, f) in files.iter() {
            let mut durable = f.durable.clone();
            for (i, op) in f.pending.iter().enumerate() {
                match (fate(name, i), op) {
                    (Fate::Dropped, _) => {}
                    (Fate::Kept, op) => apply(&mut durable, op),
                    (Fate::Torn(mask), Op::Write(off, d)) => {
                        for (s, sector) in d.chunks(512).enumerate() {
                            if mask & (1 << s.min(63)) != 0 {
                                put(&mut durable, off + s as u64 * 512, sector);
                            }
                        }
                    }
                    (Fate::Torn(_), op) => apply(&mut durable, op),
                }
            }
            out.insert(
                name.clone(),
                SimFile { current: durable.clone(), durable, pending: Vec::new() },
            );
        }
        SimStorage { files: Mutex::new(out), ..SimStorage::default() }
    }

    /// A power cut whose fates come from a seeded RNG (a third each dropped, kept, torn).
    pub fn crash_seeded(&self, seed: u64) -> SimStorage {
        let mut rng = SimRng(seed);
        self.crash(|_, _| match rng.below(3) {
            0 => Fate::Dropped,
            1 => Fate::Kept,
            _ => Fate::Torn(rng.next_u64()),
        })
    }

    /// Damages `file` (for corruption tests): flips bits of the byte at `off`, durably.
    pub fn corrupt(&self, file: &str, off: u64) {
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = files.get_mut(file) {
            if let Some(b) = f.current.get_mut(off as usize) {
                *b ^= 0x5a;
            }
            f.durable = f.current.clone();
            f.pending.clear();
        }
    }

    /// The names of all files.
    pub fn files(&self) -> Vec<String> {
        self.files.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect()
    }
}

impl Storage for SimStorage {
    fn read_at(&self, file: &str, off: u64, buf: &mut [u8]) -> io::Result<usize> {
        let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        let f = files.get(file).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let v = &f.current;
        let start = (off as usize).min(v.len());
        let n = buf.len().min(v.len() - start);
        buf[..n].copy_from_slice(&v[start..start + n]);
        Ok(n)
    }

    fn write_at(&self, file: &str, off: u64, data: &[u8]) -> io::Result<()> {
        self.change(file, Op::Write(off, data.to_vec()))
    }

    fn write_vectored_at(&self, file: &str, off: u64, parts: &[&[u8]]) -> io::Result<()> {
        // One change, like one pwritev: a power cut keeps, drops or tears it as a whole.
        self.change(file, Op::Write(off, parts.concat()))
    }

    fn zero(&self, file: &str, off: u64, len: u64) -> io::Result<()> {
        self.change(file, Op::Zero(off, len))
    }

    fn set_len(&self, file: &str, len: u64) -> io::Result<()> {
        self.change(file, Op::SetLen(len))
    }

    fn len(&self, file: &str) -> io::Result<Option<u64>> {
        let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        Ok(files.get(file).map(|f| f.current.len() as u64))
    }

    fn sync(&self, file: &str) -> io::Result<()> {
        self.step()?;
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        let f = files.get_mut(file).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        f.durable = f.current.clone();
        f.pending.clear();
        Ok(())
    }

    fn create(&self, file: &str) -> io::Result<()> {
        self.step()?;
        self.files.lock().unwrap_or_else(|e| e.into_inner()).entry(file.to_string()).or_default();
        Ok(())
    }

    fn create_atomic(&self, file: &str, data: &[u8]) -> io::Result<()> {
        self.step()?;
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        self.check_quota(&files, file, data.len() as u64)?;
        let f = SimFile { durable: data.to_vec(), current: data.to_vec(), pending: Vec::new() };
        files.insert(file.to_string(), f);
        Ok(())
    }

    fn remove(&self, file: &str) -> io::Result<()> {
        self.step()?;
        self.files.lock().unwrap_or_else(|e| e.into_inner()).remove(file);
        Ok(())
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.step()?;
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        let f = files.remove(from).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        files.insert(to.to_string(), f);
        Ok(())
    }

    fn list(&self, dir: &str) -> io::Result<Vec<String>> {
        let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        let prefix = if dir.is_empty() { String::new() } else { format!("{dir}/") };
        Ok(files
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix))
            .filter(|rest| !rest.contains('/'))
            .map(str::to_string)
            .collect())
    }

    fn describe(&self, file: &str) -> PathBuf {
        PathBuf::from(format!("sim:{file}"))
    }

    fn local_path(&self, _file: &str) -> Option<PathBuf> {
        None
    }
}
