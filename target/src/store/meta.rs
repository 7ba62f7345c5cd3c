//! The metadata record of a replica (`meta`).
//!
//! ```text
//! meta (all integers little-endian), replaced whole by Storage::create_atomic
//! (temp -> fsync -> rename -> fsync(dir)):
//!   0  magic "BFTMETA1"
//!   8  u32 format version (1)
//!  12  u32 body length N
//!  16  u32 crc32c of the body
//!  20  [N] body: postcard of `MetaBody` (version, uuid, name, geometry, generation, history,
//!          state, committed, applied, session)
//! ```
//! A torn or partial `meta` cannot happen (the rename is atomic); a checksum mismatch means the
//! file was damaged, and is reported as `Corrupt`, never guessed around.

use blockferry_protocol::repl::{Epoch, Generation, Geometry, ReplicaState, VolumeId};
use serde::{Deserialize, Serialize};

pub const META_FILE: &str = "meta";
const MAGIC: &[u8; 8] = b"BFTMETA1";
pub const FORMAT_VERSION: u32 = 1;

/// What the replica's metadata says (and, in memory, the store's live view of it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub version: u32,
    pub volume: VolumeId,
    pub name: String,
    pub geometry: Geometry,
    pub generation: Generation,
    /// Earlier generations, newest first.
    pub history: Vec<Generation>,
    pub state: ReplicaState,
    /// The newest committed boundary. On disk it may lag the journal (the journal's commit
    /// records are the authority; recovery takes the newer).
    pub committed: Epoch,
    /// Every batch through `applied` is in the image, durably.
    pub applied: Epoch,
    /// The agent-session number stamped on journal records; records of older sessions that
    /// were never committed are dead.
    pub session: u64,
}

impl Meta {
    pub fn encode(&self) -> Vec<u8> {
        let body = postcard::to_allocvec(self).unwrap_or_default();
        let mut out = Vec::with_capacity(20 + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Decodes a meta file; `Err` says what is wrong with it.
    pub fn decode(b: &[u8]) -> Result<Meta, String> {
        if b.len() < 20 || &b[0..8] != MAGIC {
            return Err("not a blockferry replica metadata file (bad magic or too short)".into());
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(format!("format version {version}, this build reads {FORMAT_VERSION}"));
        }
        let len = u32_at(12) as usize;
        let body = b.get(20..20 + len).ok_or("truncated body")?;
        let crc = crc32c::crc32c(body);
        if crc != u32_at(16) {
            return Err(format!(
                "checksum mismatch (stored {:#010x}, computed {crc:#010x})",
                u32_at(16)
            ));
        }
        let m: Meta = postcard::from_bytes(body).map_err(|e| format!("malformed body: {e}"))?;
        if Geometry::new(m.geometry.size(), m.geometry.block_size()).is_none() {
            return Err("invalid geometry".into());
        }
        if m.applied > m.committed {
            return Err(format!("applied {} is past committed {}", m.applied, m.committed));
        }
        Ok(m)
    }
}
