//! Control messages: versioned structs encoded with postcard, each preceded by its length
//! (u32, big-endian) on the session's bidirectional control stream.
//!
//! Changelog of the protocol version (`VERSION`, also the ALPN's major version):
//! - 1: hello/welcome, committed acks, batch failures, hash ranges for initial sync and verify.
//!   Sync replication (issue 5) added, without changing any existing encoding (new variants
//!   only at the ends of enums): batch kind `Sync` (frame.rs) and `TargetMsg::Durable`. A
//!   target without them closes the session on the first sync batch (unknown batch kind), so
//!   an agent in sync mode fails clearly against an older target.

use bytes::{Buf, BufMut, BytesMut};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use thiserror::Error;

use super::frame::{BatchKind, Compression};
use super::types::{Epoch, Generation, Geometry, VolumeId};

/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// The largest control message accepted (checked before allocating).
pub const MAX_CONTROL: u32 = 1 << 20;
/// The most hashes one `HashRequest` may ask for (32 bytes each: 256 KiB).
pub const MAX_HASHES: u32 = 8192;

#[derive(Debug, Error)]
pub enum MsgError {
    #[error("control message of {len} bytes exceeds the maximum {MAX_CONTROL}")]
    TooLong { len: u32 },
    #[error("malformed control message: {0}")]
    Malformed(#[from] postcard::Error),
}

/// Replication mode of a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    Async,
    Sync,
}

/// The agent's first message on a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u16,
    pub volume: VolumeId,
    pub name: String,
    pub geometry: Geometry,
    /// The volume's current generation and, newest first, the ones before it.
    pub generation: Generation,
    pub history: Vec<Generation>,
    pub mode: Mode,
    /// Compressions the agent can send, preferred first.
    pub compression: Vec<Compression>,
    /// The largest data frame the agent will send.
    pub max_frame: u32,
}

/// What the target holds for the volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaState {
    /// No data: the initial sync may skip every range that is zero at the source.
    Empty,
    /// Data without a committed boundary (a seeded copy, or an interrupted initial sync): the
    /// initial sync compares hashes and sends only the blocks that differ.
    Seeded,
    /// At the committed boundary `Welcome::committed`.
    Consistent,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub version: u16,
    pub state: ReplicaState,
    /// The newest committed epoch boundary (0 when none).
    pub committed: Epoch,
    /// The generation of the replica's lineage, if it has one.
    pub generation: Option<Generation>,
    /// The compression the agent must use (one of the offered).
    pub compression: Compression,
    /// The largest data frame the target accepts.
    pub max_frame: u32,
}

/// Why a session was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseCode {
    Version,
    /// The agent's certificate may not write this volume.
    NotAllowed,
    SizeMismatch,
    BlockSizeMismatch,
    /// The replica belongs to a lineage the agent does not descend from, or a newer one
    /// (it was promoted): split brain, never overwritten silently.
    Generation,
    /// Another session of the same volume is active.
    Busy,
    /// The target cannot serve the volume (its store failed); see the message.
    Unavailable,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub code: RefuseCode,
    pub message: String,
}

/// Why a batch was not committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailCode {
    /// A frame failed its checksum: send the batch again.
    Checksum,
    /// Malformed or out of order: a bug or hostile peer; the batch was dropped.
    Malformed,
    /// The target's disk is full: retry after space is freed (the batch was dropped).
    NoSpace,
    /// An I/O error at the target (the batch was dropped).
    Io,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMsg {
    Hello(Hello),
    /// Asks for blake3 hashes of `count` chunks of `granularity` bytes from `offset`.
    HashRequest {
        id: u64,
        offset: u64,
        granularity: u32,
        count: u32,
    },
    /// Keeps the session alive and measures the round trip.
    Ping {
        nonce: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TargetMsg {
    Welcome(Welcome),
    Refused(Refusal),
    /// Every batch through `through` is durable and committed (the replica's boundary).
    Committed {
        through: Epoch,
    },
    /// Batch `id` was dropped; the agent decides what to send again.
    Failed {
        id: Epoch,
        kind: BatchKind,
        code: FailCode,
        message: String,
    },
    /// The answer to `HashRequest`: one blake3 hash per chunk (a chunk past the end of the
    /// volume is not hashed).
    Hashes {
        id: u64,
        offset: u64,
        granularity: u32,
        hashes: Vec<[u8; 32]>,
    },
    Pong {
        nonce: u64,
    },
    /// The first `frames` frames of sync batch `id` are durable in the target's journal, and
    /// so is every batch before it in the chain (complete): if the agent vanished now, the
    /// target would seal the batch after at least these frames and commit it.
    Durable {
        id: Epoch,
        frames: u32,
    },
}

/// Appends `msg` with its length prefix.
pub fn encode<T: Serialize>(msg: &T, out: &mut BytesMut) {
    let body = postcard::to_allocvec(msg).unwrap_or_default();
    out.put_u32(body.len() as u32);
    out.put_slice(&body);
}

/// Decodes one message from the front of `buf`; `Ok(None)` until it is all there.
pub fn decode<T: DeserializeOwned>(buf: &mut BytesMut) -> Result<Option<T>, MsgError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len > MAX_CONTROL {
        return Err(MsgError::TooLong { len });
    }
    if buf.len() < 4 + len as usize {
        return Ok(None);
    }
    buf.advance(4);
    let body = buf.split_to(len as usize);
    Ok(Some(postcard::from_bytes(&body)?))
}
