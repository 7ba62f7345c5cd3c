//! Online verify (DRBD's `verify`): compares every block of the source with the target's
//! replica by blake3 hashes, while both keep running, and lists the blocks that differ.
//!
//! A block the change-tracking bitmap holds is not replicated yet and may differ: it is
//! counted as pending, not reported. A block that differs and is *not* in the bitmap is a real
//! divergence (the bitmap lost a change, or the replica was modified): `blockferry verify`
//! lists it and exits 1. The replica is compared as applied, which is the committed boundary
//! except for a commit being applied at that moment: a run right after a burst of writes may
//! list blocks that a second run no longer lists.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
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

/// Hash windows requested ahead of the one being compared: the target hashes the next window
/// while the agent hashes and compares this one.
const AHEAD: usize = 2;

/// Progress of a verify run, for status.
#[derive(Debug, Default)]
pub struct VerifyProgress {
    pub done: AtomicU64,
    pub total: AtomicU64,
}

pub(super) async fn run(
    parts: VolumeParts,
    control: mpsc::UnboundedSender<AgentMsg>,
    mut hashes: mpsc::UnboundedReceiver<TargetMsg>,
    run_no: u64,
    progress: Arc<VerifyProgress>,
) -> Result<VerifyReport, String> {
    let t0 = Instant::now();
    let meta = &parts.volume.meta;
    let bs = u64::from(meta.block_size);
    let blocks = meta.size / bs;
    progress.total.store(blocks * bs, Relaxed);
    let file = Arc::new(std::fs::File::open(parts.volume.image_path()).map_err(|e| e.to_string())?);
    let dirty = parts.tracker.dirty_runs(BITMAP, 0, u64::MAX).map_err(|e| e.to_string())?;
    let is_dirty = |b: u64| {
        let i = dirty.partition_point(|r| r.0 + r.1 <= b);
        dirty.get(i).is_some_and(|r| r.0 <= b)
    };
    let windows: Vec<(u64, u64)> = (0..blocks)
        .step_by(MAX_HASHES as usize)
        .map(|at| (at, (blocks - at).min(u64::from(MAX_HASHES))))
        .collect();
    let id_of = |n: usize| ID_BASE + (run_no << 32) + n as u64 + 1;
    let mut requested = 0;
    // Answers that arrived for a later window than the one compared.
    let mut early: HashMap<u64, Vec<[u8; 32]>> = HashMap::new();
    let mut differing: Vec<ByteExtent> = Vec::new();
    let mut pending = 0u64;
    for (n, &(at, count)) in windows.iter().enumerate() {
        while requested < windows.len() && requested <= n + AHEAD {
            let (offset, count) = windows[requested];
            control
                .send(AgentMsg::HashRequest {
                    id: id_of(requested),
                    offset: offset * bs,
                    granularity: bs as u32,
                    count: count as u32,
                })
                .map_err(|_| "the replication session ended".to_string())?;
            requested += 1;
        }
        let f = file.clone();
        let ours = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; (count * bs) as usize];
            f.read_exact_at(&mut buf, at * bs)?;
            Ok::<_, std::io::Error>(
                buf.chunks_exact(bs as usize)
                    .map(|c| *blake3::hash(c).as_bytes())
                    .collect::<Vec<_>>(),
            )
        });
        let id = id_of(n);
        let theirs = match early.remove(&id) {
            Some(h) => h,
            None => loop {
                match hashes.recv().await {
                    Some(TargetMsg::Hashes { id: got, hashes, .. }) if got == id => break hashes,
                    Some(TargetMsg::Hashes { id: got, hashes, .. })
                        if got > id && got < id_of(requested) =>
                    {
                        early.insert(got, hashes);
                    }
                    Some(_) => continue,
                    None => {
                        return Err("the connection to the target was lost during verify".into())
                    }
                }
            },
        };
        let ours = ours
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
        progress.done.store((at + count) * bs, Relaxed);
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
