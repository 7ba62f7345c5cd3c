//! Changed-block tracking (CBT): named persistent dirty bitmaps with an activity log.
//!
//! PUBLIC API ONLY — the implementation behind it is being replaced by the persistent one
//! (bitmap pages + activity log). Callers (NBD frontend, admin interface) use only what is
//! here.
//!
//! - [`Tracker::begin_write`] is called before every write, trim or write-zeroes reaches the
//!   disk; the returned [`WriteGuard`] is dropped when the operation has completed (or failed).
//! - Named bitmaps: [`Tracker::create`], [`Tracker::list`], [`Tracker::clear`],
//!   [`Tracker::remove`], [`Tracker::extents`] (dirty byte ranges), [`Tracker::status`] (runs of
//!   dirty/clean covering a range, for NBD's `qemu:dirty-bitmap:NAME` context).
//! - [`Tracker::close`] records a clean stop.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use thiserror::Error;

use crate::engine::errno;
use crate::volume::Volume;

/// Activity-log geometry and timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackerOptions {
    /// Bytes of volume per activity-log extent (power of two, >= the block size). Default 4 MiB.
    pub extent_size: u64,
    /// Extents the activity log holds (the hot set). Default 1024 (4 GiB with 4 MiB extents).
    pub extents: u32,
}

impl Default for TrackerOptions {
    fn default() -> Self {
        TrackerOptions { extent_size: 4 << 20, extents: 1024 }
    }
}

/// A change-tracking failure. Messages say what happened, to what, and what to do.
#[derive(Debug, Error)]
pub enum CbtError {
    #[error("volume {volume:?} has no bitmap named {name:?}")]
    NoSuchBitmap { volume: String, name: String },
    #[error("volume {volume:?} already has a bitmap named {name:?}")]
    BitmapExists { volume: String, name: String },
    #[error("bad bitmap name {name:?}: use 1 to 64 characters from A-Z a-z 0-9 . _ -")]
    BadName { name: String },
    #[error("change tracking of volume {volume:?}: {action} {path}: {source}")]
    Io {
        volume: String,
        action: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("change tracking of volume {volume:?} has failed earlier and is stopped ({reason}); restart the agent")]
    Poisoned { volume: String, reason: String },
    #[error("bad change-tracking options: {reason}")]
    BadOptions { reason: String },
}

impl CbtError {
    /// The NBD error when this failure answers a request.
    pub fn errno(&self) -> u32 {
        match self {
            CbtError::NoSuchBitmap { .. } | CbtError::BadName { .. } => errno::EINVAL,
            _ => errno::EIO,
        }
    }
}

/// What `list`, `create` and `clear` report about a bitmap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BitmapInfo {
    pub name: String,
    /// Bytes of the volume marked dirty.
    pub dirty_bytes: u64,
    /// Bytes per bit (the volume's block size).
    pub granularity: u32,
    /// How many times the bitmap was cleared since it was created.
    pub generation: u64,
}

/// A dirty byte range of the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ByteExtent {
    pub offset: u64,
    pub length: u64,
}

/// How the tracker came up: after a clean stop, or widened after a crash.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Recovery {
    pub clean: bool,
    /// Why bitmaps were widened (unclean stop, missing or corrupt files), if they were.
    pub reason: Option<String>,
    /// Bytes added to every bitmap by the widening (activity-log extents, or everything).
    pub widened_bytes: u64,
    pub millis: u64,
}

/// Counters of the tracker.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TrackerStats {
    pub writes_tracked: u64,
    pub al_transactions: u64,
    pub al_extents_added: u64,
    pub al_evictions: u64,
    pub bitmap_pages_written: u64,
    pub recovery: Recovery,
}

/// Change tracking of one volume.
#[derive(Debug)]
pub struct Tracker {
    volume: String,
    size: u64,
    block_size: u32,
    inner: Mutex<BTreeMap<String, (BTreeSet<u64>, u64)>>,
}

/// Held while a tracked write is in flight; dropping it completes the write's tracking.
#[derive(Debug)]
#[must_use = "drop the guard only when the write has completed"]
pub struct WriteGuard<'a> {
    tracker: &'a Tracker,
    first: u64,
    last: u64,
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        self.tracker.mark(self.first, self.last);
    }
}

/// Checks a bitmap name: `[A-Za-z0-9._-]{1,64}`.
pub fn validate_name(name: &str) -> Result<(), CbtError> {
    crate::volume::validate_name(name).map_err(|_| CbtError::BadName { name: name.to_string() })
}

impl Tracker {
    /// Opens (creating if needed) the change tracking of `volume`, recovering after an unclean
    /// stop. Blocking I/O.
    pub fn open(volume: &Volume, _options: TrackerOptions) -> Result<Arc<Tracker>, CbtError> {
        Ok(Arc::new(Tracker {
            volume: volume.meta.name.clone(),
            size: volume.meta.size,
            block_size: volume.meta.block_size,
            inner: Mutex::new(BTreeMap::new()),
        }))
    }

    pub fn volume(&self) -> &str {
        &self.volume
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    fn mark(&self, first: u64, last: u64) {
        for (set, _) in self.inner.lock().unwrap().values_mut() {
            set.extend(first..=last);
        }
    }

    /// Call before a write/trim/zeroing of `[offset, offset + len)` (already range-checked)
    /// reaches the disk; may wait for an activity-log transaction.
    pub async fn begin_write(&self, offset: u64, len: u64) -> Result<WriteGuard<'_>, CbtError> {
        let bs = u64::from(self.block_size);
        let first = offset / bs;
        let last = (offset + len.max(1) - 1) / bs;
        self.mark(first, last);
        Ok(WriteGuard { tracker: self, first, last })
    }

    /// Creates an empty bitmap `name`; durable when this returns. Blocking I/O.
    pub fn create(&self, name: &str) -> Result<BitmapInfo, CbtError> {
        validate_name(name)?;
        let mut inner = self.inner.lock().unwrap();
        if inner.contains_key(name) {
            return Err(CbtError::BitmapExists {
                volume: self.volume.clone(),
                name: name.to_string(),
            });
        }
        inner.insert(name.to_string(), (BTreeSet::new(), 0));
        drop(inner);
        self.info(name)
    }

    /// Every bitmap, by name.
    pub fn list(&self) -> Vec<BitmapInfo> {
        let names: Vec<String> = self.inner.lock().unwrap().keys().cloned().collect();
        names.iter().filter_map(|n| self.info(n).ok()).collect()
    }

    /// One bitmap's summary.
    pub fn info(&self, name: &str) -> Result<BitmapInfo, CbtError> {
        let inner = self.inner.lock().unwrap();
        let (set, generation) = inner.get(name).ok_or_else(|| self.no_such(name))?;
        Ok(BitmapInfo {
            name: name.to_string(),
            dirty_bytes: set.len() as u64 * u64::from(self.block_size),
            granularity: self.block_size,
            generation: *generation,
        })
    }

    fn no_such(&self, name: &str) -> CbtError {
        CbtError::NoSuchBitmap { volume: self.volume.clone(), name: name.to_string() }
    }

    /// Clears bitmap `name`. Writes in flight at the clear stay dirty. Blocking I/O.
    pub fn clear(&self, name: &str) -> Result<BitmapInfo, CbtError> {
        {
            let mut inner = self.inner.lock().unwrap();
            let (set, generation) = inner.get_mut(name).ok_or_else(|| self.no_such(name))?;
            set.clear();
            *generation += 1;
        }
        self.info(name)
    }

    /// Removes bitmap `name` and its file. Blocking I/O.
    pub fn remove(&self, name: &str) -> Result<(), CbtError> {
        self.inner.lock().unwrap().remove(name).map(|_| ()).ok_or_else(|| self.no_such(name))
    }

    /// True if bitmap `name` exists.
    pub fn has(&self, name: &str) -> bool {
        self.inner.lock().unwrap().contains_key(name)
    }

    /// The dirty byte ranges of bitmap `name`, coalesced, in order.
    pub fn extents(&self, name: &str) -> Result<Vec<ByteExtent>, CbtError> {
        let runs = self.status(name, 0, self.size, usize::MAX)?;
        let mut out = Vec::new();
        let mut at = 0;
        for (len, dirty) in runs {
            if dirty {
                out.push(ByteExtent { offset: at, length: len });
            }
            at += len;
        }
        Ok(out)
    }

    /// Runs `(length, dirty)` covering `[offset, offset + len)` (already range-checked, len >
    /// 0), alternating dirty/clean, at most `max_runs` of them (the last run ends where the
    /// answer stops; callers that need the whole range ask again from there).
    pub fn status(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        max_runs: usize,
    ) -> Result<Vec<(u64, bool)>, CbtError> {
        let inner = self.inner.lock().unwrap();
        let (set, _) = inner.get(name).ok_or_else(|| self.no_such(name))?;
        let bs = u64::from(self.block_size);
        let end = offset + len;
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let mut at = offset;
        while at < end {
            let block = at / bs;
            let next = ((block + 1) * bs).min(end);
            let dirty = set.contains(&block);
            match runs.last_mut() {
                Some(last) if last.1 == dirty => last.0 += next - at,
                _ => {
                    if runs.len() == max_runs {
                        break;
                    }
                    runs.push((next - at, dirty));
                }
            }
            at = next;
        }
        Ok(runs)
    }

    /// Counters and how the tracker came up.
    pub fn stats(&self) -> TrackerStats {
        TrackerStats::default()
    }

    /// Records a clean stop: every bitmap is persisted and the next start needs no widening.
    /// Call after the last write has completed. Blocking I/O.
    pub fn close(&self) -> Result<(), CbtError> {
        Ok(())
    }
}
