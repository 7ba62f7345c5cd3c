//! Newtypes for the replication protocol's ids and units.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A batch number in a volume's chain of batches (epochs and resyncs share one counter).
///
/// Epoch numbers increase but need not be contiguous: every batch names the boundary it applies
/// on (its `base`), so an epoch in which nothing was shipped leaves a gap. `Epoch::ZERO` is the
/// boundary "nothing replicated yet".
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Epoch(pub u64);

impl Epoch {
    pub const ZERO: Epoch = Epoch(0);

    pub fn next(self) -> Epoch {
        Epoch(self.0 + 1)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A random 64-bit id of a data lineage (DRBD's generation identifier). Never 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Generation(u64);

impl Generation {
    /// `None` for 0, which is reserved for "no generation".
    pub fn new(id: u64) -> Option<Generation> {
        (id != 0).then_some(Generation(id))
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A volume's UUID, as 16 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VolumeId(pub [u8; 16]);

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
            b[14], b[15]
        )
    }
}

/// The index of a tracking block (byte offset / block size).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BlockIndex(pub u64);

/// A volume's geometry, checked: size > 0, block size a power of two in 4 KiB..=1 MiB, size a
/// multiple of the block size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Geometry {
    size: u64,
    block_size: u32,
}

impl Geometry {
    pub const MIN_BLOCK: u32 = 4096;
    pub const MAX_BLOCK: u32 = 1 << 20;

    pub fn new(size: u64, block_size: u32) -> Option<Geometry> {
        let ok = block_size.is_power_of_two()
            && (Self::MIN_BLOCK..=Self::MAX_BLOCK).contains(&block_size)
            && size > 0
            && size.is_multiple_of(u64::from(block_size));
        ok.then_some(Geometry { size, block_size })
    }

    pub fn size(self) -> u64 {
        self.size
    }

    pub fn block_size(self) -> u32 {
        self.block_size
    }

    pub fn blocks(self) -> u64 {
        self.size / u64::from(self.block_size)
    }

    /// True if `[offset, offset + len)` is block-aligned, non-empty and inside the volume.
    pub fn contains_aligned(self, offset: u64, len: u64) -> bool {
        let bs = u64::from(self.block_size);
        len > 0
            && offset.is_multiple_of(bs)
            && len.is_multiple_of(bs)
            && offset.checked_add(len).is_some_and(|end| end <= self.size)
    }
}
