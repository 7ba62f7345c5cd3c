//! On-disk formats of change tracking. All integers little-endian; every record carries a
//! crc32c over the whole record with its crc field zeroed.
//!
//! ## Activity log (`activity.log`)
//! ```text
//! 0      header, 4 KiB, written once (create_atomic):
//!          0 magic "BFCBTAL1" | 8 version u32 | 12 slots u32 (ring length R)
//!          16 capacity u32 (extents per table) | 20 record_size u32 | 24 extent_size u64
//!          32 crc32c u32 (over the 4 KiB)
//! 4096   R transaction records of record_size bytes (a multiple of 4 KiB); record i holds the
//!        transactions with seq % R == i:
//!          0 magic "BFCBTTX1" | 8 flags u32 (1 = CLEAN) | 12 used u32
//!          16 seq u64 | 24 crc32c u32 | 28 reserved | 32.. used x u64 extent index
//! ```
//! A transaction carries the whole table of hot extents (8 bytes per extent, 8 KiB for the
//! default 1024), so recovery needs only the newest valid record, and a torn record costs only
//! itself: the previous one is still in the ring.
//!
//! ## Bitmap (`bitmap-NAME.cbt`)
//! ```text
//! 0      header, 4 KiB, written once (create_atomic):
//!          0 magic "BFCBTBM1" | 8 version u32 | 12 granularity u32 | 16 bits u64
//!          24 volume uuid [16] | 40 name_len u16 | 42 name [64] | 108 created u64 (unix s)
//!          4092 crc32c u32
//! 4096   per page p two 4 KiB slots, at 4096 + p * 8192 + slot * 4096:
//!          0 magic "BFCBTPG1" | 8 page u32 | 12 crc32c u32 | 16 seq u64 | 24 reserved
//!          32.. 508 x u64 words (bit i of the page = block p * 32512 + i)
//! ```
//! A page is written to the slot that does not hold its newest valid copy, so a torn write
//! leaves the previous copy readable. Which copy is newer is told by `seq` (per file, rising).

use super::bitmap::PAGE_WORDS;

pub const BLOCK: usize = 4096;
pub const AL_MAGIC: &[u8; 8] = b"BFCBTAL1";
pub const TX_MAGIC: &[u8; 8] = b"BFCBTTX1";
pub const BM_MAGIC: &[u8; 8] = b"BFCBTBM1";
pub const PG_MAGIC: &[u8; 8] = b"BFCBTPG1";
pub const VERSION: u32 = 1;
pub const TX_CLEAN: u32 = 1;
const TX_HEADER: usize = 32;
const PG_HEADER: usize = 32;

fn crc_with_zeroed(buf: &[u8], crc_at: usize) -> u32 {
    let c = crc32c::crc32c(&buf[..crc_at]);
    let c = crc32c::crc32c_append(c, &[0; 4]);
    crc32c::crc32c_append(c, &buf[crc_at + 4..])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Geometry of an activity log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlGeometry {
    pub slots: u32,
    pub capacity: u32,
    pub extent_size: u64,
}

impl AlGeometry {
    pub fn record_size(&self) -> usize {
        (TX_HEADER + 8 * self.capacity as usize).div_ceil(BLOCK) * BLOCK
    }

    pub fn record_offset(&self, seq: u64) -> u64 {
        BLOCK as u64 + (seq % u64::from(self.slots)) * self.record_size() as u64
    }

    pub fn encode_header(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK];
        b[0..8].copy_from_slice(AL_MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.slots.to_le_bytes());
        b[16..20].copy_from_slice(&self.capacity.to_le_bytes());
        b[20..24].copy_from_slice(&(self.record_size() as u32).to_le_bytes());
        b[24..32].copy_from_slice(&self.extent_size.to_le_bytes());
        let crc = crc_with_zeroed(&b, 32);
        b[32..36].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses a header; `None` if it is not a valid one.
    pub fn decode_header(b: &[u8]) -> Option<AlGeometry> {
        if b.len() < BLOCK || &b[0..8] != AL_MAGIC || u32_at(b, 8) != VERSION {
            return None;
        }
        if crc_with_zeroed(&b[..BLOCK], 32) != u32_at(b, 32) {
            return None;
        }
        let g = AlGeometry {
            slots: u32_at(b, 12),
            capacity: u32_at(b, 16),
            extent_size: u64_at(b, 24),
        };
        let sane = g.slots >= 2
            && g.capacity >= 1
            && g.extent_size.is_power_of_two()
            && u32_at(b, 20) as usize == g.record_size();
        sane.then_some(g)
    }
}

/// One activity-log transaction: the whole table of hot extents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    pub seq: u64,
    pub clean: bool,
    pub extents: Vec<u64>,
}

impl Transaction {
    pub fn encode(&self, g: &AlGeometry) -> Vec<u8> {
        assert!(self.extents.len() <= g.capacity as usize, "table larger than the log");
        let mut b = vec![0u8; g.record_size()];
        b[0..8].copy_from_slice(TX_MAGIC);
        let flags = if self.clean { TX_CLEAN } else { 0 };
        b[8..12].copy_from_slice(&flags.to_le_bytes());
        b[12..16].copy_from_slice(&(self.extents.len() as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        for (i, e) in self.extents.iter().enumerate() {
            let at = TX_HEADER + 8 * i;
            b[at..at + 8].copy_from_slice(&e.to_le_bytes());
        }
        let crc = crc_with_zeroed(&b, 24);
        b[24..28].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses a record; `None` if it is not a valid transaction of this geometry.
    pub fn decode(b: &[u8], g: &AlGeometry) -> Option<Transaction> {
        if b.len() != g.record_size() || &b[0..8] != TX_MAGIC {
            return None;
        }
        if crc_with_zeroed(b, 24) != u32_at(b, 24) {
            return None;
        }
        let used = u32_at(b, 12) as usize;
        if used > g.capacity as usize {
            return None;
        }
        let extents = (0..used).map(|i| u64_at(b, TX_HEADER + 8 * i)).collect();
        Some(Transaction { seq: u64_at(b, 16), clean: u32_at(b, 8) & TX_CLEAN != 0, extents })
    }
}

/// The header of a bitmap file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapHeader {
    pub granularity: u32,
    pub bits: u64,
    pub volume: [u8; 16],
    pub name: String,
    pub created: u64,
}

impl BitmapHeader {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK];
        b[0..8].copy_from_slice(BM_MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.granularity.to_le_bytes());
        b[16..24].copy_from_slice(&self.bits.to_le_bytes());
        b[24..40].copy_from_slice(&self.volume);
        let name = self.name.as_bytes();
        assert!(name.len() <= 64, "bitmap names are at most 64 bytes");
        b[40..42].copy_from_slice(&(name.len() as u16).to_le_bytes());
        b[42..42 + name.len()].copy_from_slice(name);
        b[108..116].copy_from_slice(&self.created.to_le_bytes());
        let crc = crc_with_zeroed(&b, BLOCK - 4);
        b[BLOCK - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<BitmapHeader> {
        if b.len() < BLOCK || &b[0..8] != BM_MAGIC || u32_at(b, 8) != VERSION {
            return None;
        }
        if crc_with_zeroed(&b[..BLOCK], BLOCK - 4) != u32_at(b, BLOCK - 4) {
            return None;
        }
        let len = usize::from(u16::from_le_bytes([b[40], b[41]]));
        if len > 64 {
            return None;
        }
        Some(BitmapHeader {
            granularity: u32_at(b, 12),
            bits: u64_at(b, 16),
            volume: b[24..40].try_into().expect("16 bytes"),
            name: String::from_utf8(b[42..42 + len].to_vec()).ok()?,
            created: u64_at(b, 108),
        })
    }
}

/// Byte offset of slot `slot` (0 or 1) of page `page`.
pub fn page_offset(page: usize, slot: u8) -> u64 {
    BLOCK as u64 + page as u64 * 2 * BLOCK as u64 + u64::from(slot) * BLOCK as u64
}

/// File size of a bitmap with `pages` pages.
pub fn bitmap_file_len(pages: usize) -> u64 {
    page_offset(pages, 0)
}

/// Encodes page `page` at `seq` into `out` (4 KiB).
pub fn encode_page(page: usize, seq: u64, words: &[u64; PAGE_WORDS], out: &mut [u8]) {
    assert_eq!(out.len(), BLOCK);
    out[0..8].copy_from_slice(PG_MAGIC);
    out[8..12].copy_from_slice(&(page as u32).to_le_bytes());
    out[12..16].fill(0);
    out[16..24].copy_from_slice(&seq.to_le_bytes());
    out[24..32].fill(0);
    for (i, w) in words.iter().enumerate() {
        let at = PG_HEADER + 8 * i;
        out[at..at + 8].copy_from_slice(&w.to_le_bytes());
    }
    let crc = crc_with_zeroed(out, 12);
    out[12..16].copy_from_slice(&crc.to_le_bytes());
}

/// Decodes a page slot: `(seq, words)` if it is a valid copy of page `page`.
pub fn decode_page(page: usize, b: &[u8]) -> Option<(u64, [u64; PAGE_WORDS])> {
    if b.len() != BLOCK || &b[0..8] != PG_MAGIC || u32_at(b, 8) as usize != page {
        return None;
    }
    if crc_with_zeroed(b, 12) != u32_at(b, 12) {
        return None;
    }
    let mut words = [0u64; PAGE_WORDS];
    for (i, w) in words.iter_mut().enumerate() {
        *w = u64_at(b, PG_HEADER + 8 * i);
    }
    Some((u64_at(b, 16), words))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_reject_damage() {
        let g = AlGeometry { slots: 8, capacity: 1024, extent_size: 4 << 20 };
        assert_eq!(g.record_size(), 12288);
        assert_eq!(AlGeometry::decode_header(&g.encode_header()), Some(g));
        let tx = Transaction { seq: 42, clean: false, extents: vec![7, 1 << 40, 3] };
        let mut b = tx.encode(&g);
        assert_eq!(Transaction::decode(&b, &g), Some(tx));
        b[40] ^= 1;
        assert_eq!(Transaction::decode(&b, &g), None);

        let h = BitmapHeader {
            granularity: 4096,
            bits: 1 << 20,
            volume: [9; 16],
            name: "backup-1".into(),
            created: 5,
        };
        assert_eq!(BitmapHeader::decode(&h.encode()), Some(h));

        let mut words = [0u64; PAGE_WORDS];
        words[3] = 0xdead_beef;
        words[PAGE_WORDS - 1] = u64::MAX;
        let mut out = vec![0u8; BLOCK];
        encode_page(17, 99, &words, &mut out);
        assert_eq!(decode_page(17, &out), Some((99, words)));
        assert_eq!(decode_page(16, &out), None, "a page copy is bound to its index");
        out[4000] ^= 0x80;
        assert_eq!(decode_page(17, &out), None);
        assert_eq!(decode_page(0, &[0u8; BLOCK]), None, "zeros are not a page");
    }
}
