//! Feeds arbitrary bytes to the target's replication session, as the target's QUIC driver
//! does: the control stream (hello, hash requests, pings) and several data streams (batch
//! header, frames, end), interleaved and in chunks. Must never panic, and whatever it hands
//! to the store must be checked data: inside a begun batch, block-aligned and in the volume.
//!
//! Input layout: byte 0 picks the chunk size, byte 1 whether the session is already up (a
//! valid hello and Welcome first, so the fuzzer reaches the frame decoders at once), then a
//! sequence of records `[stream selector u8][len u8][len bytes]`: selector 0 is the control
//! stream, 1..=3 data streams, 4..=6 finish that data stream, with a valid batch header
//! prefixed to a data stream's first bytes when bit 7 of the selector is set.
//!
//! Run: `cargo fuzz run repl_decode` in protocol/ (nightly). Where cargo-fuzz is missing, the
//! same build by hand (what cargo-fuzz does): in protocol/fuzz,
//! `RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4
//! -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table
//! -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions
//! -Coverflow-checks" cargo +nightly build --release --target x86_64-unknown-linux-gnu --bin
//! repl_decode`, then run the binary with a corpus directory and `-max_total_time=120`.
#![no_main]

use blockferry_protocol::repl::frame::{BatchHeader, BatchKind, DEFAULT_MAX_FRAME};
use blockferry_protocol::repl::msg::{self, AgentMsg, Hello, Mode, ReplicaState, VERSION};
use blockferry_protocol::repl::target::{Action, ReplicaInfo, TargetConfig, TargetSession};
use blockferry_protocol::repl::{Compression, Epoch, Generation, Geometry, VolumeId};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

const SIZE: u64 = 64 << 20;

fn geometry() -> Geometry {
    Geometry::new(SIZE, 4096).expect("valid geometry")
}

fn hello() -> Hello {
    Hello {
        version: VERSION,
        volume: VolumeId([1; 16]),
        name: "fuzz".into(),
        geometry: geometry(),
        generation: Generation::new(9).expect("non-zero"),
        history: vec![],
        mode: Mode::Async,
        compression: vec![Compression::Lz4, Compression::Zstd(3), Compression::Off],
        max_frame: DEFAULT_MAX_FRAME,
    }
}

/// Answers the session's requests as the driver would, and checks what reaches the store.
fn pump(s: &mut TargetSession, open: &mut [Option<Epoch>; 4]) {
    while let Some(a) = s.poll_action() {
        match a {
            Action::Open(h) => {
                let geometry = Geometry::new(h.geometry.size(), h.geometry.block_size())
                    .expect("the session checks the hello's geometry");
                s.opened(Ok(ReplicaInfo {
                    volume: h.volume,
                    geometry,
                    state: ReplicaState::Consistent,
                    committed: Epoch(3),
                    generation: Generation::new(9),
                }));
            }
            Action::Begin(h) => {
                // Which stream began it is not in the action; track that some batch is open.
                if let Some(slot) = open.iter_mut().find(|o| o.is_none()) {
                    *slot = Some(h.id);
                }
            }
            Action::Data { id, offset, length, data } => {
                assert!(open.contains(&Some(id)), "data of batch {id} that never began");
                assert!(
                    geometry().contains_aligned(offset, u64::from(length)),
                    "{offset}+{length}"
                );
                if let Some(d) = data {
                    assert_eq!(d.len(), length as usize);
                    assert!(length <= DEFAULT_MAX_FRAME);
                }
            }
            Action::End { id, .. } | Action::Abort { id } => {
                if let Some(slot) = open.iter_mut().find(|o| **o == Some(id)) {
                    *slot = None;
                }
            }
            Action::Hash { offset, granularity, count, .. } => {
                assert!(offset < SIZE && granularity >= 4096 && count <= msg::MAX_HASHES);
            }
            Action::Send(_) | Action::Close { .. } => {}
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let chunk = usize::from(data[0]).max(1);
    let mut s = TargetSession::new(TargetConfig::default());
    let mut open = [None; 4];
    if data[1] & 1 != 0 {
        let mut b = BytesMut::new();
        msg::encode(&AgentMsg::Hello(hello()), &mut b);
        s.control_bytes(&b);
        pump(&mut s, &mut open);
    }
    let mut started = [false; 4];
    let mut rest = &data[2..];
    while rest.len() >= 2 {
        let (sel, len) = (rest[0], usize::from(rest[1]));
        rest = &rest[2..];
        let body = &rest[..len.min(rest.len())];
        rest = &rest[body.len()..];
        let stream = usize::from(sel & 0x7f) % 7;
        let mut bytes = BytesMut::new();
        if (1..=3).contains(&stream) && sel & 0x80 != 0 && !started[stream] {
            let kind = [BatchKind::Epoch, BatchKind::Resync, BatchKind::Initial][stream - 1];
            BatchHeader { kind, id: Epoch(4 + stream as u64), base: Epoch(3) }.encode(&mut bytes);
        }
        bytes.extend_from_slice(body);
        match stream {
            0 => {
                for c in bytes.chunks(chunk) {
                    s.control_bytes(c);
                    pump(&mut s, &mut open);
                }
            }
            1..=3 => {
                started[stream] = true;
                for c in bytes.chunks(chunk) {
                    s.stream_bytes(stream as u64, c);
                    pump(&mut s, &mut open);
                }
            }
            _ => {
                s.stream_finished(stream as u64 - 3);
                started[stream - 3] = false;
                pump(&mut s, &mut open);
            }
        }
    }
});
