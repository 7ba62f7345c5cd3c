//! The replication protocol (DESIGN.md "Replication protocol"): ids and units, data frames,
//! control messages, and the sans-IO sessions of the agent and the target.

pub mod agent;
pub mod crc;
pub mod frame;
pub mod msg;
pub mod target;
pub mod types;

#[cfg(test)]
mod sync_tests;
#[cfg(test)]
mod target_tests;
#[cfg(test)]
mod tests;

pub use frame::{BatchHeader, BatchKind, Compression, DataFrame, Encoding, End, Frame, FrameError};
pub use msg::{
    AgentMsg, FailCode, Hello, Mode, Refusal, RefuseCode, ReplicaState, TargetMsg, Welcome,
};
pub use types::{BlockIndex, Epoch, Generation, Geometry, VolumeId};

/// The ALPN protocol id: the protocol's name and major version.
pub const ALPN: &[u8] = b"blockferry/1";
