//! Data streams: hand-written frames carrying block payloads (DESIGN.md "Replication protocol").
//!
//! One unidirectional QUIC stream carries one batch (an epoch, a resync pass or the initial
//! sync) of one volume:
//!
//! ```text
//! stream := BatchHeader Frame* End
//!
//! BatchHeader (32 bytes, integers big-endian)
//!   0  u32 magic "BFB1"
//!   4  u8  kind (1 epoch, 2 resync, 3 initial sync, 4 sync: a live epoch)
//!   5  [3] reserved, 0
//!   8  u64 id      the batch's epoch number
//!  16  u64 base    the epoch boundary the batch applies on (0: none)
//!  24  u32 crc32c of bytes 0..24
//!  28  u32 reserved, 0
//!
//! Frame header (32 bytes), followed by `wire_len` payload bytes
//!   0  u8  kind (1 data, 2 end)
//!   1  u8  flags: 1 zero (no payload), 2 lz4, 4 zstd (at most one of these)
//!   2  u16 reserved, 0
//!   4  u32 length    uncompressed bytes (data); 0 (end)
//!   8  u64 offset    byte offset in the volume (data); `through` epoch (end)
//!  16  u32 wire_len  payload bytes that follow
//!  20  u32 crc       crc32c of the uncompressed bytes (data; zeros are not hashed: 0);
//!                    the batch checksum (end)
//!  24  u32 seq       the frame's number in the batch from 0 (data); the frame count (end)
//!  28  u32 crc32c of bytes 0..28
//! ```
//!
//! The batch checksum is crc32c over the header crcs of the data frames, in order (little-endian
//! u32 each): it proves the receiver saw every frame, once, in order. The data crc is computed
//! when the block is captured and checked after decompression, before the block is journaled
//! (invariant 5). Every length is checked against the negotiated maximum before anything is
//! allocated.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

use super::types::Epoch;

pub const BATCH_MAGIC: u32 = 0x4246_4231; // "BFB1"
pub const BATCH_HEADER_LEN: usize = 32;
pub const FRAME_HEADER_LEN: usize = 32;
/// The largest frame payload any version allows; the negotiated maximum is at most this.
pub const MAX_FRAME_LIMIT: u32 = 4 << 20;
/// The default maximum frame length (uncompressed).
pub const DEFAULT_MAX_FRAME: u32 = 1 << 20;

pub const FLAG_ZERO: u8 = 1;
pub const FLAG_LZ4: u8 = 2;
pub const FLAG_ZSTD: u8 = 4;
const KNOWN_FLAGS: u8 = FLAG_ZERO | FLAG_LZ4 | FLAG_ZSTD;

const KIND_DATA: u8 = 1;
const KIND_END: u8 = 2;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad batch header magic {found:#010x} (expected {BATCH_MAGIC:#010x}): not a blockferry data stream")]
    BadMagic { found: u32 },
    #[error("unknown batch kind {kind}")]
    BadBatchKind { kind: u8 },
    #[error("batch header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BatchHeaderChecksum { stored: u32, computed: u32 },
    #[error(
        "frame {seq}: header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
    )]
    HeaderChecksum { seq: u32, stored: u32, computed: u32 },
    #[error("frame header: unknown kind {kind}")]
    BadKind { kind: u8 },
    #[error("frame {seq}: bad flags {flags:#04x}")]
    BadFlags { seq: u32, flags: u8 },
    #[error("frame {seq}: length {length} (payload {wire_len}) exceeds the maximum frame {max}")]
    TooLong { seq: u32, length: u32, wire_len: u32, max: u32 },
    #[error("frame {seq}: malformed: {what}")]
    Malformed { seq: u32, what: &'static str },
    #[error("frame {seq} at offset {offset}: data checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    DataChecksum { seq: u32, offset: u64, stored: u32, computed: u32 },
    #[error("frame {seq} at offset {offset}: cannot decompress: {reason}")]
    Decompress { seq: u32, offset: u64, reason: String },
}

/// What a batch is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum BatchKind {
    /// The writes of one epoch, coalesced, from the agent's memory.
    Epoch,
    /// Blocks read from the agent's image (catch-up after behind or a reconnect): not in write
    /// order, so the target stages them until the chain through `End::through` is complete.
    Resync,
    /// The first copy of a replica that has no committed boundary yet.
    Initial,
    /// A live epoch of a sync volume (issue 5): each write becomes a frame as soon as it is
    /// captured, `End` follows when the epoch closes (`through` = its id, as for an epoch).
    /// The target reports its durable prefix (`TargetMsg::Durable`) and, if the batch never
    /// ends, seals it after its last complete frame: any prefix is crash-consistent.
    Sync,
}

impl BatchKind {
    fn code(self) -> u8 {
        match self {
            BatchKind::Epoch => 1,
            BatchKind::Resync => 2,
            BatchKind::Initial => 3,
            BatchKind::Sync => 4,
        }
    }

    fn from_code(c: u8) -> Option<BatchKind> {
        Some(match c {
            1 => BatchKind::Epoch,
            2 => BatchKind::Resync,
            3 => BatchKind::Initial,
            4 => BatchKind::Sync,
            _ => return None,
        })
    }
}

/// The first 32 bytes of a data stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    pub kind: BatchKind,
    pub id: Epoch,
    pub base: Epoch,
}

impl BatchHeader {
    pub fn encode(&self, out: &mut impl BufMut) {
        let mut b = [0u8; BATCH_HEADER_LEN];
        b[0..4].copy_from_slice(&BATCH_MAGIC.to_be_bytes());
        b[4] = self.kind.code();
        b[8..16].copy_from_slice(&self.id.0.to_be_bytes());
        b[16..24].copy_from_slice(&self.base.0.to_be_bytes());
        let crc = crc32c::crc32c(&b[..24]);
        b[24..28].copy_from_slice(&crc.to_be_bytes());
        out.put_slice(&b);
    }

    /// Decodes a header from the front of `buf`; `Ok(None)` until 32 bytes are there.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<BatchHeader>, FrameError> {
        if buf.len() < BATCH_HEADER_LEN {
            return Ok(None);
        }
        let b = &buf[..BATCH_HEADER_LEN];
        let magic = u32::from_be_bytes(b[0..4].try_into().unwrap_or_default());
        if magic != BATCH_MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        let stored = u32::from_be_bytes(b[24..28].try_into().unwrap_or_default());
        let computed = crc32c::crc32c(&b[..24]);
        if stored != computed {
            return Err(FrameError::BatchHeaderChecksum { stored, computed });
        }
        let kind = BatchKind::from_code(b[4]).ok_or(FrameError::BadBatchKind { kind: b[4] })?;
        let id = Epoch(u64::from_be_bytes(b[8..16].try_into().unwrap_or_default()));
        let base = Epoch(u64::from_be_bytes(b[16..24].try_into().unwrap_or_default()));
        buf.advance(BATCH_HEADER_LEN);
        Ok(Some(BatchHeader { kind, id, base }))
    }
}

/// How a data frame's payload is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// The block range reads as zeros; no payload.
    Zero,
    Raw,
    Lz4,
    Zstd,
}

/// A data frame: `length` bytes at `offset`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataFrame {
    pub seq: u32,
    pub offset: u64,
    pub length: u32,
    pub encoding: Encoding,
    /// crc32c of the uncompressed bytes (0 for zero frames).
    pub crc: u32,
    /// The payload as it travels (compressed or raw; empty for zero frames).
    pub payload: Bytes,
}

/// The end of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct End {
    /// For an epoch batch, its own id. For a resync or initial batch, the epoch through which
    /// the chain must be applied as one unit before the replica is at a boundary again.
    pub through: Epoch,
    /// The number of data frames.
    pub frames: u32,
    /// crc32c over the data frames' header crcs.
    pub batch_crc: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Data(DataFrame),
    End(End),
}

/// Header crc of a data frame as it is encoded, for the batch checksum.
fn header_bytes(
    kind: u8,
    flags: u8,
    length: u32,
    offset: u64,
    wire_len: u32,
    crc: u32,
    seq: u32,
) -> [u8; FRAME_HEADER_LEN] {
    let mut b = [0u8; FRAME_HEADER_LEN];
    b[0] = kind;
    b[1] = flags;
    b[4..8].copy_from_slice(&length.to_be_bytes());
    b[8..16].copy_from_slice(&offset.to_be_bytes());
    b[16..20].copy_from_slice(&wire_len.to_be_bytes());
    b[20..24].copy_from_slice(&crc.to_be_bytes());
    b[24..28].copy_from_slice(&seq.to_be_bytes());
    let hcrc = crc32c::crc32c(&b[..28]);
    b[28..32].copy_from_slice(&hcrc.to_be_bytes());
    b
}

fn flags_of(e: Encoding) -> u8 {
    match e {
        Encoding::Zero => FLAG_ZERO,
        Encoding::Raw => 0,
        Encoding::Lz4 => FLAG_LZ4,
        Encoding::Zstd => FLAG_ZSTD,
    }
}

impl DataFrame {
    /// The encoded header; its last 4 bytes are the header crc that feeds the batch checksum.
    pub fn header(&self) -> [u8; FRAME_HEADER_LEN] {
        header_bytes(
            KIND_DATA,
            flags_of(self.encoding),
            self.length,
            self.offset,
            self.payload.len() as u32,
            self.crc,
            self.seq,
        )
    }

    /// The header crc (what the batch checksum chains).
    pub fn header_crc(&self) -> u32 {
        let h = self.header();
        u32::from_be_bytes([h[28], h[29], h[30], h[31]])
    }

    /// Checks the payload and returns the uncompressed bytes (`None` for a zero frame).
    pub fn open(&self) -> Result<Option<Bytes>, FrameError> {
        let data = match self.encoding {
            Encoding::Zero => return Ok(None),
            Encoding::Raw => self.payload.clone(),
            Encoding::Lz4 => {
                let v = lz4_flex::block::decompress(&self.payload, self.length as usize)
                    .map_err(|e| self.decompress_err(e.to_string()))?;
                Bytes::from(v)
            }
            Encoding::Zstd => {
                let v = zstd::bulk::decompress(&self.payload, self.length as usize)
                    .map_err(|e| self.decompress_err(e.to_string()))?;
                Bytes::from(v)
            }
        };
        if data.len() != self.length as usize {
            return Err(self.decompress_err(format!(
                "{} bytes after decompression, header says {}",
                data.len(),
                self.length
            )));
        }
        let computed = crc32c::crc32c(&data);
        if computed != self.crc {
            return Err(FrameError::DataChecksum {
                seq: self.seq,
                offset: self.offset,
                stored: self.crc,
                computed,
            });
        }
        Ok(Some(data))
    }

    fn decompress_err(&self, reason: String) -> FrameError {
        FrameError::Decompress { seq: self.seq, offset: self.offset, reason }
    }
}

/// Compression of data frames, as negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Compression {
    Off,
    Lz4,
    /// zstd at a level (1..=19).
    Zstd(i32),
}

impl Compression {
    /// Parses `off`, `lz4`, `zstd` or `zstd:LEVEL`.
    pub fn parse(s: &str) -> Option<Compression> {
        match s {
            "off" | "none" => Some(Compression::Off),
            "lz4" => Some(Compression::Lz4),
            "zstd" => Some(Compression::Zstd(3)),
            _ => {
                let level: i32 = s.strip_prefix("zstd:")?.parse().ok()?;
                (1..=19).contains(&level).then_some(Compression::Zstd(level))
            }
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::Off => write!(f, "off"),
            Compression::Lz4 => write!(f, "lz4"),
            Compression::Zstd(l) => write!(f, "zstd:{l}"),
        }
    }
}

/// The most frames sent raw without trying compression after tries that did not pay.
pub const MAX_COMPRESSION_SKIP: u32 = 32;

/// Builds the frames of one batch, keeping the sequence numbers and the batch checksum.
///
/// Compression backs off on data that does not compress: after a frame that compression did
/// not shrink by at least 1/8, the next frames are sent raw without trying (2, 4, ... up to
/// [`MAX_COMPRESSION_SKIP`] frames, doubling while the tries keep failing); one frame that
/// compresses resets it. Encrypted or already compressed guest data (random to lz4) then costs
/// one try in 32 instead of a compression of every block, while compressible data is still
/// compressed frame by frame.
#[derive(Debug, Default)]
pub struct BatchWriter {
    seq: u32,
    batch_crc: u32,
    /// Frames still to send raw without trying to compress.
    skip: u32,
    /// Consecutive tries that did not pay.
    misses: u32,
    /// Bytes of block data framed (uncompressed).
    pub data_bytes: u64,
    /// Bytes of payload framed (as sent).
    pub wire_bytes: u64,
}

impl BatchWriter {
    pub fn new() -> BatchWriter {
        BatchWriter::default()
    }

    /// Frames `data` (its crc32c computed at capture: `crc`) at `offset`, compressed when that
    /// makes it smaller, zero-flagged when it is all zeros. Appends header and payload to
    /// `out`; returns the frame.
    pub fn data(
        &mut self,
        offset: u64,
        data: Bytes,
        crc: u32,
        compression: Compression,
    ) -> DataFrame {
        let length = data.len() as u32;
        let (encoding, payload, crc) = if is_zero(&data) {
            (Encoding::Zero, Bytes::new(), 0)
        } else if compression == Compression::Off || self.skip > 0 {
            self.skip = self.skip.saturating_sub(1);
            (Encoding::Raw, data, crc)
        } else {
            let compressed = match compression {
                Compression::Lz4 => Some((Encoding::Lz4, lz4_flex::block::compress(&data))),
                Compression::Zstd(level) => {
                    zstd::bulk::compress(&data, level).ok().map(|c| (Encoding::Zstd, c))
                }
                Compression::Off => None,
            };
            let len = data.len();
            match compressed {
                Some((encoding, c)) if c.len() <= len - len / 8 => {
                    self.misses = 0;
                    (encoding, Bytes::from(c), crc)
                }
                other => {
                    self.misses = (self.misses + 1).min(MAX_COMPRESSION_SKIP.trailing_zeros());
                    self.skip = 1 << self.misses;
                    match other {
                        Some((encoding, c)) if c.len() < len => (encoding, Bytes::from(c), crc),
                        _ => (Encoding::Raw, data, crc),
                    }
                }
            }
        };
        self.frame(DataFrame { seq: 0, offset, length, encoding, crc, payload })
    }

    /// Frames still to be sent raw before compression is tried again.
    pub fn skip_left(&self) -> u32 {
        self.skip
    }

    /// A zero frame for `length` bytes at `offset`.
    pub fn zero(&mut self, offset: u64, length: u32) -> DataFrame {
        self.frame(DataFrame {
            seq: 0,
            offset,
            length,
            encoding: Encoding::Zero,
            crc: 0,
            payload: Bytes::new(),
        })
    }

    fn frame(&mut self, mut f: DataFrame) -> DataFrame {
        f.seq = self.seq;
        self.seq += 1;
        self.batch_crc = crc32c::crc32c_append(self.batch_crc, &f.header_crc().to_le_bytes());
        self.data_bytes += u64::from(f.length);
        self.wire_bytes += (FRAME_HEADER_LEN + f.payload.len()) as u64;
        f
    }

    /// The end frame.
    pub fn end(&self, through: Epoch) -> End {
        End { through, frames: self.seq, batch_crc: self.batch_crc }
    }
}

/// Checks the frames of one batch in order on the receiving side.
#[derive(Debug, Default)]
pub struct BatchReader {
    seq: u32,
    batch_crc: u32,
}

impl BatchReader {
    pub fn new() -> BatchReader {
        BatchReader::default()
    }

    /// Accounts a data frame (which must be the next in sequence).
    pub fn data(&mut self, f: &DataFrame) -> Result<(), FrameError> {
        if f.seq != self.seq {
            return Err(FrameError::Malformed { seq: f.seq, what: "frame out of sequence" });
        }
        self.seq += 1;
        self.batch_crc = crc32c::crc32c_append(self.batch_crc, &f.header_crc().to_le_bytes());
        Ok(())
    }

    /// Checks the end frame against what was seen.
    pub fn end(&self, e: &End) -> Result<(), FrameError> {
        if e.frames != self.seq || e.batch_crc != self.batch_crc {
            return Err(FrameError::Malformed {
                seq: e.frames,
                what: "end frame does not match the frames received (count or batch checksum)",
            });
        }
        Ok(())
    }
}

/// True if every byte is zero.
pub fn is_zero(data: &[u8]) -> bool {
    let chunks = data.chunks_exact(16);
    let rest = chunks.remainder();
    chunks.into_iter().all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0)
        && rest.iter().all(|&b| b == 0)
}

impl Frame {
    /// Appends the encoded frame (header and payload) to `out`.
    pub fn encode(&self, out: &mut impl BufMut) {
        match self {
            Frame::Data(d) => {
                out.put_slice(&d.header());
                out.put_slice(&d.payload);
            }
            Frame::End(e) => {
                out.put_slice(&header_bytes(KIND_END, 0, 0, e.through.0, 0, e.batch_crc, e.frames));
            }
        }
    }

    /// Decodes one frame from the front of `buf` without copying its payload; `Ok(None)` until
    /// the whole frame is there. `max` is the negotiated maximum frame length.
    pub fn decode(buf: &mut BytesMut, max: u32) -> Result<Option<Frame>, FrameError> {
        if buf.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let h: [u8; FRAME_HEADER_LEN] = buf[..FRAME_HEADER_LEN].try_into().unwrap_or([0; 32]);
        let be32 = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let seq = be32(24);
        let stored = be32(28);
        let computed = crc32c::crc32c(&h[..28]);
        if stored != computed {
            return Err(FrameError::HeaderChecksum { seq, stored, computed });
        }
        let (kind, flags) = (h[0], h[1]);
        let length = be32(4);
        let offset = u64::from_be_bytes(h[8..16].try_into().unwrap_or_default());
        let wire_len = be32(16);
        let crc = be32(20);
        if h[2] != 0 || h[3] != 0 {
            return Err(FrameError::Malformed { seq, what: "reserved bytes are not zero" });
        }
        match kind {
            KIND_END => {
                if flags != 0 || length != 0 || wire_len != 0 {
                    return Err(FrameError::Malformed { seq, what: "end frame with a payload" });
                }
                buf.advance(FRAME_HEADER_LEN);
                Ok(Some(Frame::End(End { through: Epoch(offset), frames: seq, batch_crc: crc })))
            }
            KIND_DATA => {
                if flags & !KNOWN_FLAGS != 0 || (flags & KNOWN_FLAGS).count_ones() > 1 {
                    return Err(FrameError::BadFlags { seq, flags });
                }
                let max = max.min(MAX_FRAME_LIMIT);
                if length > max || wire_len > max {
                    return Err(FrameError::TooLong { seq, length, wire_len, max });
                }
                let encoding = match flags {
                    FLAG_ZERO => Encoding::Zero,
                    FLAG_LZ4 => Encoding::Lz4,
                    FLAG_ZSTD => Encoding::Zstd,
                    _ => Encoding::Raw,
                };
                let bad = match encoding {
                    Encoding::Zero => wire_len != 0 || crc != 0,
                    Encoding::Raw => wire_len != length,
                    Encoding::Lz4 | Encoding::Zstd => wire_len == 0,
                };
                if bad || length == 0 || offset.checked_add(u64::from(length)).is_none() {
                    return Err(FrameError::Malformed {
                        seq,
                        what: "length, payload and flags disagree",
                    });
                }
                let total = FRAME_HEADER_LEN + wire_len as usize;
                if buf.len() < total {
                    buf.reserve(total - buf.len());
                    return Ok(None);
                }
                buf.advance(FRAME_HEADER_LEN);
                let payload = buf.split_to(wire_len as usize).freeze();
                Ok(Some(Frame::Data(DataFrame { seq, offset, length, encoding, crc, payload })))
            }
            _ => Err(FrameError::BadKind { kind }),
        }
    }
}
