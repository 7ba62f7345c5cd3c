//! A catch-up or initial-sync batch: reads blocks from the image and streams them.
//!
//! Passes: the first pass's set is the bitmap's dirty blocks (resync), the image's allocated
//! ranges (initial sync of an empty replica) or every block (initial sync against a seeded
//! replica, comparing blake3 hashes first so only differing blocks travel). Each later pass's
//! set is what was written while buffering was off (the capture's unbuffered set). When
//! buffering is on and a pass ends with nothing left, reading is done; the stream ends with the
//! `through` epoch the session picks (see protocol::repl::agent).

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use blockferry_protocol::repl::frame::{BatchWriter, Frame};
use blockferry_protocol::repl::msg::{AgentMsg, TargetMsg, MAX_HASHES};
use blockferry_protocol::repl::{BatchHeader, BatchKind, Compression, Epoch};
use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};

use super::limiter::Limiter;
use super::shipper::{Counters, ResyncProgress, VolumeParts, BITMAP};

pub(super) struct ResyncJob {
    pub conn: quinn::Connection,
    pub header: BatchHeader,
    pub compare: bool,
    pub compression: Compression,
    pub max_frame: u32,
    pub parts: VolumeParts,
    pub counters: Arc<Counters>,
    pub progress: Arc<ResyncProgress>,
    pub limiter: Option<Arc<Limiter>>,
}

/// Block runs `(first, count)`.
type Runs = Vec<(u64, u64)>;

fn total(runs: &Runs) -> u64 {
    runs.iter().map(|r| r.1).sum()
}

impl ResyncJob {
    pub async fn run(
        self,
        mut end: oneshot::Receiver<Epoch>,
        mut hashes: mpsc::UnboundedReceiver<TargetMsg>,
        control: mpsc::UnboundedSender<AgentMsg>,
        progress: impl Fn(u64),
        read_done: impl Fn(),
    ) -> Result<(), String> {
        let err = |e: &dyn std::fmt::Display| e.to_string();
        let mut stream = self.conn.open_uni().await.map_err(|e| err(&e))?;
        let _ = stream.set_priority(super::shipper::stream_priority(self.header.id));
        let mut out = BytesMut::with_capacity(self.max_frame as usize + 64);
        self.header.encode(&mut out);
        stream.write_all(&out).await.map_err(|e| err(&e))?;
        out.clear();
        let file =
            Arc::new(std::fs::File::open(self.parts.volume.image_path()).map_err(|e| err(&e))?);
        let bs = u64::from(self.parts.volume.meta.block_size);
        let blocks = self.parts.volume.meta.size / bs;
        let capture = &self.parts.capture;
        // Writes before this point are in the image: the first pass covers them.
        let _ = capture.take_unbuffered();
        let mut set: Runs = match self.header.kind {
            _ if self.compare => vec![(0, blocks)],
            BatchKind::Resync => {
                self.parts.tracker.dirty_runs(BITMAP, 0, u64::MAX).map_err(|e| err(&e))?
            }
            _ => allocated_runs(&file, bs, blocks),
        };
        let skip_zeros = self.header.kind == BatchKind::Initial && !self.compare;
        let mut w = BatchWriter::new();
        let chunk_blocks = (u64::from(self.max_frame) / bs).max(1);
        let mut hash_id = 0u64;
        let through = 'passes: loop {
            let pass_total = total(&set) * bs;
            self.progress.total.fetch_add(pass_total, Relaxed);
            let mut left = pass_total;
            progress(left);
            for &(first, count) in &set {
                // Compare windows: one hash request per MAX_HASHES blocks.
                let mut at = first;
                let end_block = first + count;
                while at < end_block {
                    if let Ok(t) = end.try_recv() {
                        break 'passes t; // abandoned
                    }
                    let window = (end_block - at).min(if self.compare {
                        u64::from(MAX_HASHES)
                    } else {
                        chunk_blocks * 16
                    });
                    let theirs = if self.compare {
                        hash_id += 1;
                        let _ = control.send(AgentMsg::HashRequest {
                            id: hash_id,
                            offset: at * bs,
                            granularity: bs as u32,
                            count: window as u32,
                        });
                        loop {
                            match hashes.recv().await {
                                Some(TargetMsg::Hashes { id, hashes, .. }) if id == hash_id => {
                                    break Some(hashes)
                                }
                                Some(_) => continue,
                                None => {
                                    return Err("the session ended during a hash comparison".into())
                                }
                            }
                        }
                    } else {
                        None
                    };
                    let mut c = at;
                    while c < at + window {
                        let n = (at + window - c).min(chunk_blocks);
                        let f = file.clone();
                        let data = tokio::task::spawn_blocking(move || {
                            let mut buf = vec![0u8; (n * bs) as usize];
                            f.read_exact_at(&mut buf, c * bs).map(|_| buf)
                        })
                        .await
                        .map_err(|e| err(&e))?
                        .map_err(|e| format!("cannot read the image: {e}"))?;
                        // Runs of blocks to send inside this chunk.
                        let mut sends: Vec<(usize, usize)> = Vec::new();
                        for i in 0..n as usize {
                            let block = &data[i * bs as usize..(i + 1) * bs as usize];
                            let send = if let Some(th) = &theirs {
                                let k = (c - at) as usize + i;
                                th.get(k).is_none_or(|h| *h != *blake3::hash(block).as_bytes())
                            } else if skip_zeros {
                                !blockferry_protocol::repl::frame::is_zero(block)
                            } else {
                                true
                            };
                            if send {
                                match sends.last_mut() {
                                    Some(r) if r.0 + r.1 == i => r.1 += 1,
                                    _ => sends.push((i, 1)),
                                }
                            } else {
                                self.progress.skipped.fetch_add(bs, Relaxed);
                            }
                        }
                        let data = Bytes::from(data);
                        for (i, k) in sends {
                            let bytes = data.slice(i * bs as usize..(i + k) * bs as usize);
                            let crc = crc32c::crc32c(&bytes);
                            let frame = w.data((c + i as u64) * bs, bytes, crc, self.compression);
                            #[cfg(feature = "failpoints")]
                            let frame = super::shipper::corrupt_frame(frame);
                            let wire = (frame.payload.len() + 32) as u64;
                            if let Some(l) = &self.limiter {
                                l.acquire(wire).await;
                            }
                            Frame::Data(frame).encode(&mut out);
                            stream.write_all(&out).await.map_err(|e| err(&e))?;
                            out.clear();
                            self.counters.data.fetch_add(k as u64 * bs, Relaxed);
                            self.counters.wire.fetch_add(wire, Relaxed);
                            self.progress.sent.fetch_add(k as u64 * bs, Relaxed);
                        }
                        self.progress.done.fetch_add(n * bs, Relaxed);
                        left = left.saturating_sub(n * bs);
                        c += n;
                    }
                    progress(left);
                    at += window;
                }
            }
            // Next pass: what was written while buffering was off.
            let buffering = capture.buffering();
            let next = capture.take_unbuffered();
            if next.is_empty() && buffering {
                read_done();
                break match (&mut end).await {
                    Ok(t) => t,
                    Err(_) => return Ok(()), // the driver dropped us: the session ended
                };
            }
            if next.is_empty() {
                // Waiting for buffering to turn on (the session does so on progress).
                progress(0);
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            set = next;
        };
        Frame::End(w.end(through)).encode(&mut out);
        stream.write_all(&out).await.map_err(|e| err(&e))?;
        stream.finish().map_err(|e| err(&e))?;
        Ok(())
    }
}

/// The block runs of `file` that hold data (SEEK_DATA/SEEK_HOLE); everything if the file
/// system cannot tell.
fn allocated_runs(file: &std::fs::File, bs: u64, blocks: u64) -> Runs {
    use rustix::fs::{seek, SeekFrom};
    let size = blocks * bs;
    let mut runs = Vec::new();
    let mut at = 0u64;
    while at < size {
        let data = match seek(file, SeekFrom::Data(at)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break, // no data after `at`
            Err(_) => return vec![(0, blocks)],    // the file system cannot tell: everything
        };
        if data >= size {
            break;
        }
        let hole = seek(file, SeekFrom::Hole(data)).unwrap_or(size).min(size);
        let first = data / bs;
        let end = hole.div_ceil(bs);
        runs.push((first, end - first));
        at = end * bs;
    }
    runs
}
