//! Live I/O counters of a volume, shared by every connection that serves it.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Counters updated on the data path with relaxed atomics (one cache line per volume is
/// contended only by the connections of that volume).
#[derive(Debug, Default)]
pub struct IoStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub flushes: AtomicU64,
    pub trims: AtomicU64,
    pub zeroes: AtomicU64,
    pub errors: AtomicU64,
    pub connections: AtomicU64,
}

/// A plain copy of [`IoStats`] at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct IoSnapshot {
    pub reads: u64,
    pub writes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub flushes: u64,
    pub trims: u64,
    pub zeroes: u64,
    pub errors: u64,
    pub connections: u64,
}

impl IoStats {
    pub fn read(&self, bytes: u64) {
        self.reads.fetch_add(1, Relaxed);
        self.bytes_read.fetch_add(bytes, Relaxed);
    }

    pub fn write(&self, bytes: u64) {
        self.writes.fetch_add(1, Relaxed);
        self.bytes_written.fetch_add(bytes, Relaxed);
    }

    pub fn snapshot(&self) -> IoSnapshot {
        IoSnapshot {
            reads: self.reads.load(Relaxed),
            writes: self.writes.load(Relaxed),
            bytes_read: self.bytes_read.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
            flushes: self.flushes.load(Relaxed),
            trims: self.trims.load(Relaxed),
            zeroes: self.zeroes.load(Relaxed),
            errors: self.errors.load(Relaxed),
            connections: self.connections.load(Relaxed),
        }
    }
}
