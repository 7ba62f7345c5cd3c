//! Online verify (DRBD's `verify`): compares every block of the source with the target's
//! replica by blake3 hashes, while both keep running, and lists the blocks that differ.
//!
//! A block the change-tracking bitmap holds is not replicated yet and may differ: it is
//! counted as pending, not reported. A block that differs and is *not* in the bitmap is a real
//! divergence (the bitmap lost a change, or the replica was modified): `blockferry verify`
//! lists it and exits 1. The replica is compared as applied, which is the committed boundary
//! except for a commit being applied at that moment: a run right after a burst of writes may
//! list blocks that a second run no longer lists.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Instant;

use blockferry_protocol::repl::msg::{AgentMsg, TargetMsg, MAX_HASHES};
use serde::Serialize;
use tokio::sync::mpsc;

use super::shipper::{VolumeParts, BITMAP};
use crate::cbt::ByteExtent;

/// The answer of `POST /v1/volumes/{vol}/verify`.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub volume: String,
    pub blocks: u64,
    pub block_size: u32,
    pub compared_bytes: u64,
    /// Ranges that differ and are not waiting to be replicated.
    pub differing: Vec<ByteExtent>,
    /// Blocks that differ but are in the bitmap (not replicated yet).
    pub pending: u64,
    pub seconds: f64,
}

/// Hash request ids of verify runs (resyncs count from 1).
const ID_BASE: u64 = 1 << 62;

pub(super) async fn run(
    parts: VolumeParts,
    control: mpsc::UnboundedSender<AgentMsg>,
    mut hashes: mpsc::UnboundedReceiver<TargetMsg>,
    run_no: u64,
) -> Result<VerifyReport, String> {
    let t0 = Instant::now();
    let meta = &parts.volume.meta;
    let bs = u64::from(meta.block_size);
    let blocks = meta.size / bs;
    let file = Arc::new(std::fs::File::open(parts.volume.image_path()).map_err(|e| e.to_string())?);
    let dirty = parts.tracker.dirty_runs(BITMAP, 0, u64::MAX).map_err(|e| e.to_string())?;
    let is_dirty = |b: u64| {
        let i = dirty.partition_point(|r| r.0 + r.1 <= b);
        dirty.get(i).is_some_and(|r| r.0 <= b)
    };
    let mut differing: Vec<ByteExtent> = Vec::new();
    let mut pending = 0u64;
    let mut at = 0u64;
    let mut n = 0u64;
    while at < blocks {
        let count = (blocks - at).min(u64::from(MAX_HASHES));
        n += 1;
        let id = ID_BASE + (run_no << 32) + n;
        control
            .send(AgentMsg::HashRequest {
                id,
                offset: at * bs,
                granularity: bs as u32,
                count: count as u32,
            })
            .map_err(|_| "the replication session ended".to_string())?;
        let theirs = loop {
            match hashes.recv().await {
                Some(TargetMsg::Hashes { id: got, hashes, .. }) if got == id => break hashes,
                Some(_) => continue,
                None => return Err("the connection to the target was lost during verify".into()),
            }
        };
        let f = file.clone();
        let ours = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; (count * bs) as usize];
            f.read_exact_at(&mut buf, at * bs)?;
            Ok::<_, std::io::Error>(
                buf.chunks_exact(bs as usize)
                    .map(|c| *blake3::hash(c).as_bytes())
                    .collect::<Vec<_>>(),
            )
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot read the image: {e}"))?;
        for (i, h) in ours.iter().enumerate() {
            let b = at + i as u64;
            if theirs.get(i) == Some(h) {
                continue;
            }
            if is_dirty(b) {
                pending += 1;
                continue;
            }
            match differing.last_mut() {
                Some(e) if e.offset + e.length == b * bs => e.length += bs,
                _ => differing.push(ByteExtent { offset: b * bs, length: bs }),
            }
        }
        at += count;
    }
    Ok(VerifyReport {
        volume: meta.name.clone(),
        blocks,
        block_size: meta.block_size,
        compared_bytes: blocks * bs,
        differing,
        pending,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
