//! The redo journal's records.
//!
//! The journal is a sequence of segment files `journal/SEQ.log` (SEQ: 16 hex digits, rising;
//! a new segment after `Options::segment_size` bytes), each a sequence of records:
//!
//! ```text
//! record (integers little-endian)
//!   0  u32 magic "BFJR"
//!   4  u8  type: 1 begin, 2 data, 3 end, 4 commit
//!   5  [3] tag: [`tag`] of the segment it was written to (24 bits LE; 0 in journals written
//!            before segments were recycled)
//!   8  u64 session   the agent session that wrote it (Meta::session)
//!  16  u32 body length N
//!  20  u32 crc32c of bytes 0..20 and the body
//!  24  [N] body
//!
//! begin   0 u8 batch kind (1 epoch, 2 resync, 3 initial, 4 sync) | 1 u8 direct (1: data went straight
//!         into the image, not into the journal) | 2 [6] 0 | 8 u64 id | 16 u64 base
//! data    0 u64 batch id | 8 u64 offset | 16 u32 length | 20 u8 zero | 21 [3] 0 |
//!         24 [length] raw uncompressed bytes (none for a zero frame)
//! end     0 u64 batch id | 8 u64 through ([`SEALED`]: a sync batch the target sealed; it ends
//!         its session's chain) | 16 u32 frames | 20 u32 chain: crc32c over the
//!         crcs (u32 LE) of the batch's data records, in order
//! commit  0 u64 base (the boundary before) | 8 u64 through | 16 u32 n | 20 [4] 0 |
//!         24 n x u64 the ids of the committed batches, in chain order
//! ```
//!
//! Every append is followed by a zero header, [`HEADER`] zero bytes that the next append
//! overwrites: recovery reads a zero header as the clean end of the segment. Segment files are
//! recycled (a reclaimed segment is renamed to be a later one, so a group commit's fdatasync
//! overwrites allocated blocks instead of growing the file: on ext4 that spares a synchronous
//! inode write per commit), and the zero header keeps recovery from reading on into the
//! file's earlier records. The tag catches the one case it cannot: a torn append that left a
//! whole earlier record exactly where a new one should begin. Such a record is invalid here.
//!
//! A batch is complete in the journal when its begin, `frames` data records whose chain matches
//! and its end are all there (records of several batches interleave). A sync batch without its
//! end is sealed: an end record after its last complete data record is journaled by the store
//! (`ReplicaStore::seal`, also in recovery), with the frames and chain of the records found. A
//! data frame's integrity (invariant 5): the receiver checks the frame's crc before the store
//! journals it; the record crc then covers the journaled copy. Apply writes the bytes the store
//! still holds in memory (checked on receipt, never read back); where it does not hold them
//! (after recovery, or beyond its memory budget) it reads the record back and checks its crc
//! again.

use blockferry_protocol::repl::frame::MAX_FRAME_LIMIT;
use blockferry_protocol::repl::{BatchKind, Epoch};

use super::storage::JOURNAL_DIR;

const MAGIC: u32 = 0x4246_4a52;
/// `through` of the end record of a sync batch sealed by the target (`ReplicaStore::seal`):
/// no batch of the same session follows it in the chain.
pub const SEALED: Epoch = Epoch(u64::MAX);
pub const HEADER: usize = 24;
const MAX_BODY: usize = 24 + MAX_FRAME_LIMIT as usize;
/// The most batch ids one commit record names.
const MAX_IDS: usize = (MAX_FRAME_LIMIT as usize) / 8;

const T_BEGIN: u8 = 1;
const T_DATA: u8 = 2;
const T_END: u8 = 3;
const T_COMMIT: u8 = 4;

/// A record's body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    Begin { kind: BatchKind, id: Epoch, base: Epoch, direct: bool },
    Data { id: Epoch, offset: u64, length: u32, zero: bool, bytes: Vec<u8> },
    End { id: Epoch, through: Epoch, frames: u32, chain: u32 },
    Commit { base: Epoch, through: Epoch, ids: Vec<Epoch> },
}

/// The tag of the records of segment `seq` (never 0).
pub fn tag(seq: u64) -> u32 {
    (seq % 0xff_ffff) as u32 + 1
}

/// What follows every append: a header of zeros, the clean end of the segment.
pub const END: [u8; HEADER] = [0; HEADER];

/// The name of segment `seq`.
pub fn segment_name(seq: u64) -> String {
    format!("{JOURNAL_DIR}/{seq:016x}.log")
}

/// The name of a reclaimed segment file kept for reuse (`seq`: the segment it was).
pub fn spare_name(seq: u64) -> String {
    format!("{JOURNAL_DIR}/{seq:016x}.spare")
}

/// The sequence number of a spare file name (without the directory).
pub fn parse_spare(name: &str) -> Option<u64> {
    parse_seq(name, ".spare")
}

/// The sequence number of a segment file name (without the directory).
pub fn parse_segment(name: &str) -> Option<u64> {
    parse_seq(name, ".log")
}

/// `SEQ` of `SEQ{suffix}`, SEQ being 16 hex digits.
fn parse_seq(name: &str, suffix: &str) -> Option<u64> {
    let hex = name.strip_suffix(suffix)?;
    (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok()).flatten()
}

fn kind_code(k: BatchKind) -> u8 {
    match k {
        BatchKind::Epoch => 1,
        BatchKind::Resync => 2,
        BatchKind::Initial => 3,
        BatchKind::Sync => 4,
    }
}

/// The length of a data record before its payload: the header and the body's fixed part.
pub const DATA_HEAD: usize = HEADER + 24;

/// The first [`DATA_HEAD`] bytes of a data record, to be written followed by `bytes` (nothing
/// for a zero frame): the record crc is computed over the parts, without copying the payload.
pub fn data_head(
    session: u64,
    tag: u32,
    id: Epoch,
    offset: u64,
    length: u32,
    bytes: Option<&[u8]>,
) -> [u8; DATA_HEAD] {
    let body_len = 24 + bytes.map_or(0, <[u8]>::len) as u32;
    let mut h = [0u8; DATA_HEAD];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4] = T_DATA;
    h[5..8].copy_from_slice(&tag.to_le_bytes()[..3]);
    h[8..16].copy_from_slice(&session.to_le_bytes());
    h[16..20].copy_from_slice(&body_len.to_le_bytes());
    h[24..32].copy_from_slice(&id.0.to_le_bytes());
    h[32..40].copy_from_slice(&offset.to_le_bytes());
    h[40..44].copy_from_slice(&length.to_le_bytes());
    h[44] = u8::from(bytes.is_none());
    let mut crc = crc32c::crc32c_append(crc32c::crc32c(&h[..20]), &h[HEADER..]);
    if let Some(d) = bytes {
        crc = crc32c::crc32c_append(crc, d);
    }
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Encodes a data record (in one buffer: the store writes [`data_head`] and the payload
/// without joining them).
pub fn encode_data(
    session: u64,
    tag: u32,
    id: Epoch,
    offset: u64,
    length: u32,
    bytes: Option<&[u8]>,
) -> Vec<u8> {
    let mut r = data_head(session, tag, id, offset, length, bytes).to_vec();
    if let Some(d) = bytes {
        r.extend_from_slice(d);
    }
    r
}

/// Encodes a record.
pub fn encode(session: u64, tag: u32, body: &Body) -> Vec<u8> {
    let mut b = Vec::new();
    let t = match body {
        Body::Begin { kind, id, base, direct } => {
            b.extend_from_slice(&[kind_code(*kind), u8::from(*direct), 0, 0, 0, 0, 0, 0]);
            b.extend_from_slice(&id.0.to_le_bytes());
            b.extend_from_slice(&base.0.to_le_bytes());
            T_BEGIN
        }
        Body::Data { id, offset, length, zero, bytes } => {
            return encode_data(
                session,
                tag,
                *id,
                *offset,
                *length,
                (!zero).then_some(bytes.as_slice()),
            );
        }
        Body::End { id, through, frames, chain } => {
            b.extend_from_slice(&id.0.to_le_bytes());
            b.extend_from_slice(&through.0.to_le_bytes());
            b.extend_from_slice(&frames.to_le_bytes());
            b.extend_from_slice(&chain.to_le_bytes());
            T_END
        }
        Body::Commit { base, through, ids } => {
            b.extend_from_slice(&base.0.to_le_bytes());
            b.extend_from_slice(&through.0.to_le_bytes());
            b.extend_from_slice(&(ids.len() as u32).to_le_bytes());
            b.extend_from_slice(&[0; 4]);
            for id in ids {
                b.extend_from_slice(&id.0.to_le_bytes());
            }
            T_COMMIT
        }
    };
    frame(session, tag, t, &b)
}

fn frame(session: u64, tag: u32, t: u8, body: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(HEADER + body.len());
    r.extend_from_slice(&MAGIC.to_le_bytes());
    let tag = tag.to_le_bytes();
    r.extend_from_slice(&[t, tag[0], tag[1], tag[2]]);
    r.extend_from_slice(&session.to_le_bytes());
    r.extend_from_slice(&(body.len() as u32).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&r[..20]), body);
    r.extend_from_slice(&crc.to_le_bytes());
    r.extend_from_slice(body);
    r
}

/// The crc of an encoded record (what a batch's chain accumulates).
pub fn record_crc(rec: &[u8]) -> u32 {
    u32::from_le_bytes([rec[20], rec[21], rec[22], rec[23]])
}

/// Adds a data record's crc to a batch chain.
pub fn chain(chain: u32, rec_crc: u32) -> u32 {
    crc32c::crc32c_append(chain, &rec_crc.to_le_bytes())
}

/// A decoded record.
#[derive(Debug)]
pub struct Decoded {
    pub session: u64,
    /// The segment tag it was written with (0: written before tags).
    pub tag: u32,
    pub crc: u32,
    pub body: Body,
    /// Encoded length (header and body).
    pub len: u64,
}

/// What [`read_header`] found at an offset.
#[derive(Debug)]
pub enum Header {
    /// A plausible header: the record is `HEADER + body_len` bytes long.
    Record {
        body_len: usize,
    },
    /// The end of the segment.
    Eof,
    Invalid(String),
}

/// Checks the first `HEADER` bytes of a record (`avail`: the bytes left in the segment).
pub fn read_header(h: &[u8], avail: u64) -> Header {
    if avail == 0 {
        return Header::Eof;
    }
    if h.len() >= HEADER && h[..HEADER] == END {
        return Header::Eof;
    }
    if h.len() < HEADER || avail < HEADER as u64 {
        return Header::Invalid(format!("{avail} trailing bytes, shorter than a record header"));
    }
    let magic = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    if magic != MAGIC {
        return Header::Invalid(format!("bad record magic {magic:#010x}"));
    }
    let body_len = u32::from_le_bytes([h[16], h[17], h[18], h[19]]) as usize;
    if body_len > MAX_BODY || (HEADER + body_len) as u64 > avail {
        return Header::Invalid(format!(
            "record length {body_len} runs past the end of the segment"
        ));
    }
    Header::Record { body_len }
}

/// Decodes a whole record (`r`: header and body), checking its crc and its fields.
pub fn decode(r: &[u8]) -> Result<Decoded, String> {
    let stored = record_crc(r);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&r[..20]), &r[HEADER..]);
    if stored != crc {
        return Err(format!(
            "record checksum mismatch (stored {stored:#010x}, computed {crc:#010x})"
        ));
    }
    let session = u64::from_le_bytes(r[8..16].try_into().unwrap_or_default());
    let b = &r[HEADER..];
    let u64_at =
        |i: usize| b.get(i..i + 8).map(|s| u64::from_le_bytes(s.try_into().unwrap_or_default()));
    let u32_at =
        |i: usize| b.get(i..i + 4).map(|s| u32::from_le_bytes(s.try_into().unwrap_or_default()));
    let short = || "record body too short".to_string();
    let body = match r[4] {
        T_BEGIN => {
            let kind = match b.first() {
                Some(1) => BatchKind::Epoch,
                Some(2) => BatchKind::Resync,
                Some(3) => BatchKind::Initial,
                Some(4) => BatchKind::Sync,
                _ => return Err("begin record with an unknown batch kind".into()),
            };
            let direct = b.get(1).copied().ok_or_else(short)? == 1;
            Body::Begin {
                kind,
                id: Epoch(u64_at(8).ok_or_else(short)?),
                base: Epoch(u64_at(16).ok_or_else(short)?),
                direct,
            }
        }
        T_DATA => {
            let id = Epoch(u64_at(0).ok_or_else(short)?);
            let offset = u64_at(8).ok_or_else(short)?;
            let length = u32_at(16).ok_or_else(short)?;
            let zero = *b.get(20).ok_or_else(short)? == 1;
            let bytes = b.get(24..).ok_or_else(short)?;
            let want = if zero { 0 } else { length as usize };
            if bytes.len() != want || length == 0 {
                return Err("data record whose length and payload disagree".into());
            }
            Body::Data { id, offset, length, zero, bytes: bytes.to_vec() }
        }
        T_END => Body::End {
            id: Epoch(u64_at(0).ok_or_else(short)?),
            through: Epoch(u64_at(8).ok_or_else(short)?),
            frames: u32_at(16).ok_or_else(short)?,
            chain: u32_at(20).ok_or_else(short)?,
        },
        T_COMMIT => {
            let n = u32_at(16).ok_or_else(short)? as usize;
            if n > MAX_IDS || b.len() != 24 + 8 * n {
                return Err("commit record whose id count and length disagree".into());
            }
            Body::Commit {
                base: Epoch(u64_at(0).ok_or_else(short)?),
                through: Epoch(u64_at(8).ok_or_else(short)?),
                ids: (0..n).map(|i| Epoch(u64_at(24 + 8 * i).unwrap_or_default())).collect(),
            }
        }
        t => return Err(format!("unknown record type {t}")),
    };
    let tag = u32::from_le_bytes([r[5], r[6], r[7], 0]);
    Ok(Decoded { session, tag, crc, body, len: r.len() as u64 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let bodies = [
            Body::Begin { kind: BatchKind::Resync, id: Epoch(7), base: Epoch(3), direct: true },
            Body::Data {
                id: Epoch(7),
                offset: 4096,
                length: 4,
                zero: false,
                bytes: vec![1, 2, 3, 4],
            },
            Body::Data { id: Epoch(7), offset: 8192, length: 4096, zero: true, bytes: vec![] },
            Body::End { id: Epoch(7), through: Epoch(u64::MAX), frames: 2, chain: 99 },
            Body::Commit { base: Epoch(3), through: Epoch(7), ids: vec![Epoch(7)] },
        ];
        for b in bodies {
            let r = encode(5, tag(9), &b);
            assert!(
                matches!(read_header(&r, r.len() as u64), Header::Record { body_len } if body_len + HEADER == r.len())
            );
            let d = decode(&r).unwrap();
            assert_eq!((d.session, d.tag, d.body), (5, 10, b));
            let mut bad = r.clone();
            *bad.last_mut().unwrap() ^= 1;
            assert!(decode(&bad).is_err());
        }
        // The data head's crc covers the payload written after it.
        let r = encode_data(5, 1, Epoch(7), 4096, 4, Some(&[1, 2, 3, 4]));
        let d = decode(&r).unwrap();
        assert!(matches!(d.body, Body::Data { bytes, .. } if bytes == [1, 2, 3, 4]));
        assert_eq!(r.len(), DATA_HEAD + 4);
        assert_eq!(parse_segment("00000000000000ff.log"), Some(255));
        assert_eq!(parse_spare("00000000000000ff.spare"), Some(255));
        assert_eq!(parse_spare("00000000000000ff.log"), None);
        assert_eq!(segment_name(255), "journal/00000000000000ff.log");
        // A zero header is the clean end of a segment.
        assert!(matches!(read_header(&END, 4096), Header::Eof));
        assert_eq!(tag(0xff_fffe), 0xff_ffff);
        assert_eq!(tag(0xff_ffff), 1);
    }
}
