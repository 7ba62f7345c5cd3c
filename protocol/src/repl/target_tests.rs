//! The target session against bad input: corrupted, out-of-range and split frames, a wrong
//! hello version, and arbitrary bytes on every stream (DESIGN.md invariants 5 and 7).
//!
//! Every test drives [`TargetSession`] in memory, as the target's QUIC driver does, and looks
//! at the actions it returns: a batch with a bad frame must end in `Abort` and a `Failed`
//! message to the agent, and the bad frame's bytes must never reach the store as `Data`.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::frame::*;
use super::msg::{self, *};
use super::target::{Action, ReplicaInfo, TargetConfig, TargetSession};
use super::types::*;

const SIZE: u64 = 1 << 30;
const BS: u32 = 4096;

fn geometry() -> Geometry {
    Geometry::new(SIZE, BS).unwrap()
}

fn hello(version: u16) -> Hello {
    Hello {
        version,
        volume: VolumeId([0x22; 16]),
        name: "vol".into(),
        geometry: geometry(),
        generation: Generation::new(7).unwrap(),
        history: vec![],
        mode: Mode::Async,
        compression: vec![Compression::Lz4, Compression::Off],
        max_frame: DEFAULT_MAX_FRAME,
    }
}

fn hello_bytes(version: u16) -> BytesMut {
    let mut b = BytesMut::new();
    msg::encode(&AgentMsg::Hello(hello(version)), &mut b);
    b
}

fn drain(s: &mut TargetSession) -> Vec<Action> {
    std::iter::from_fn(|| s.poll_action()).collect()
}

/// A session that has said Welcome to a consistent replica at epoch 3.
fn up_session() -> TargetSession {
    let mut s = TargetSession::new(TargetConfig::default());
    s.control_bytes(&hello_bytes(VERSION));
    let a = drain(&mut s);
    assert!(matches!(a.as_slice(), [Action::Open(h)] if h.version == VERSION), "{a:?}");
    s.opened(Ok(ReplicaInfo {
        volume: VolumeId([0x22; 16]),
        geometry: geometry(),
        state: ReplicaState::Consistent,
        committed: Epoch(3),
        generation: Generation::new(7),
    }));
    let a = drain(&mut s);
    assert!(matches!(a.as_slice(), [Action::Send(TargetMsg::Welcome(_))]), "{a:?}");
    assert!(s.is_up());
    s
}

/// Deterministic non-zero, poorly compressible bytes.
fn noise(len: usize, seed: u64) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8 | 1
        })
        .collect();
    Bytes::from(v)
}

/// An encoded epoch batch `id` on `base` with data blocks at `offsets` (4 KiB each, the given
/// compression; every third block zero), and the frames as sent.
fn batch(id: u64, base: u64, offsets: &[u64], c: Compression) -> (BytesMut, Vec<DataFrame>) {
    let mut out = BytesMut::new();
    BatchHeader { kind: BatchKind::Epoch, id: Epoch(id), base: Epoch(base) }.encode(&mut out);
    let mut w = BatchWriter::new();
    let mut frames = Vec::new();
    for (i, &off) in offsets.iter().enumerate() {
        let f = if i % 3 == 2 {
            w.zero(off, BS)
        } else {
            let data = if c == Compression::Off {
                noise(BS as usize, off)
            } else {
                // Compressible: a repeated pattern with the offset in it.
                Bytes::from(
                    format!("block at {off:>12} ").repeat(BS as usize / 22 + 1)[..BS as usize]
                        .to_owned(),
                )
            };
            let crc = crc32c::crc32c(&data);
            w.data(off, data, crc, c)
        };
        Frame::Data(f.clone()).encode(&mut out);
        frames.push(f);
    }
    Frame::End(w.end(Epoch(id))).encode(&mut out);
    (out, frames)
}

/// Offsets in `out` where data frame `k`'s payload starts, and its length.
fn payload_span(frames: &[DataFrame], k: usize) -> (usize, usize) {
    let mut at = BATCH_HEADER_LEN;
    for f in &frames[..k] {
        at += FRAME_HEADER_LEN + f.payload.len();
    }
    (at + FRAME_HEADER_LEN, frames[k].payload.len())
}

fn data_offsets(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Data { offset, .. } => Some(*offset),
            _ => None,
        })
        .collect()
}

fn failed_codes(actions: &[Action]) -> Vec<FailCode> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(TargetMsg::Failed { code, .. }) => Some(*code),
            _ => None,
        })
        .collect()
}

#[test]
fn a_clean_batch_yields_begin_data_end() {
    let mut s = up_session();
    let offsets = [0, 4096, 8192, 1 << 20, SIZE - 4096];
    let (bytes, frames) = batch(4, 3, &offsets, Compression::Off);
    s.stream_bytes(0, &bytes);
    let a = drain(&mut s);
    assert!(matches!(a.first(), Some(Action::Begin(h)) if h.id == Epoch(4)), "{a:?}");
    assert_eq!(data_offsets(&a), offsets);
    for (f, act) in frames.iter().zip(a.iter().filter(|a| matches!(a, Action::Data { .. }))) {
        let Action::Data { data, length, .. } = act else { unreachable!() };
        assert_eq!(*length, BS);
        match f.encoding {
            Encoding::Zero => assert!(data.is_none()),
            _ => assert_eq!(data.as_ref(), Some(&f.payload)),
        }
    }
    assert!(
        matches!(a.last(), Some(Action::End { id, end }) if *id == Epoch(4) && end.frames == 5)
    );
    assert_eq!(s.rejected_batches, 0);
}

/// One flipped byte anywhere in a data payload (raw, lz4 or zstd): the batch is aborted with
/// a checksum failure, and the corrupted frame never reaches the store. Frames before it may
/// have been handed over as `Data` (the store drops them with the batch on `Abort`), frames
/// after it are not.
#[test]
fn corrupted_payload_aborts_the_batch_and_is_never_applied() {
    let offsets: Vec<u64> = (0..7).map(|i| i * 3 * 4096).collect();
    for c in [Compression::Off, Compression::Lz4, Compression::Zstd(3)] {
        let (clean, frames) = batch(4, 3, &offsets, c);
        for k in 0..frames.len() {
            if frames[k].encoding == Encoding::Zero {
                continue;
            }
            let (start, len) = payload_span(&frames, k);
            for pos in [start, start + len / 2, start + len - 1] {
                for bit in [0x01u8, 0x80] {
                    let mut bytes = clean.clone();
                    bytes[pos] ^= bit;
                    let mut s = up_session();
                    s.stream_bytes(9, &bytes);
                    s.stream_finished(9);
                    let a = drain(&mut s);
                    let ctx = format!("{c:?} frame {k} byte {pos} bit {bit:#x}: {a:?}");
                    assert_eq!(data_offsets(&a), offsets[..k], "{ctx}");
                    assert!(a.contains(&Action::Abort { id: Epoch(4) }), "{ctx}");
                    assert_eq!(failed_codes(&a), [FailCode::Checksum], "{ctx}");
                    assert!(!a.iter().any(|a| matches!(a, Action::End { .. })), "{ctx}");
                    assert!(!a.iter().any(|a| matches!(a, Action::Close { .. })), "{ctx}");
                    let abort = a.iter().position(|x| *x == Action::Abort { id: Epoch(4) });
                    let failed =
                        a.iter().position(|x| matches!(x, Action::Send(TargetMsg::Failed { .. })));
                    assert!(abort < failed, "abort before telling the agent: {ctx}");
                    assert_eq!(s.rejected_batches, 1, "{ctx}");
                    // The session goes on: the agent resends the batch on a new stream.
                    s.stream_bytes(11, &clean);
                    let a = drain(&mut s);
                    assert_eq!(data_offsets(&a), offsets, "resend after {ctx}");
                    assert!(matches!(a.last(), Some(Action::End { .. })), "resend after {ctx}");
                }
            }
        }
    }
}

/// A flipped bit in a frame header or in the end frame: the batch is dropped, no later frame
/// is handed over, and the session stays up.
#[test]
fn corrupted_frame_headers_abort_the_batch() {
    let offsets: Vec<u64> = (0..4).map(|i| i * 4096).collect();
    let (clean, frames) = batch(4, 3, &offsets, Compression::Off);
    let end_at = clean.len() - FRAME_HEADER_LEN;
    for pos in BATCH_HEADER_LEN..clean.len() {
        let (k, in_header) = {
            let mut at = BATCH_HEADER_LEN;
            let mut found = (frames.len(), true);
            for (i, f) in frames.iter().enumerate() {
                let next = at + FRAME_HEADER_LEN + f.payload.len();
                if pos < next {
                    found = (i, pos < at + FRAME_HEADER_LEN);
                    break;
                }
                at = next;
            }
            found
        };
        if !in_header {
            continue; // payloads: see the test above
        }
        let mut bytes = clean.clone();
        bytes[pos] ^= 0x10;
        let mut s = up_session();
        s.stream_bytes(2, &bytes);
        let a = drain(&mut s);
        let ctx = format!("byte {pos} (frame {k}, end at {end_at}): {a:?}");
        assert!(data_offsets(&a).len() <= k, "{ctx}");
        assert!(!a.iter().any(|a| matches!(a, Action::End { .. })), "{ctx}");
        assert!(a.contains(&Action::Abort { id: Epoch(4) }), "{ctx}");
        assert_eq!(failed_codes(&a).len(), 1, "{ctx}");
        assert!(s.is_up(), "{ctx}");
    }
}

/// A well-formed frame outside the volume, or not block-aligned: `Failed(Malformed)`, never
/// `Data`.
#[test]
fn frame_out_of_range_is_malformed() {
    for off in [SIZE, SIZE - 2048, 1 << 40, 100, u64::MAX - 4095 - 4095] {
        let mut s = up_session();
        let (bytes, _) = batch(4, 3, &[off], Compression::Off);
        s.stream_bytes(0, &bytes);
        let a = drain(&mut s);
        assert!(data_offsets(&a).is_empty(), "offset {off}: {a:?}");
        assert_eq!(failed_codes(&a), [FailCode::Malformed], "offset {off}: {a:?}");
        assert!(a.contains(&Action::Abort { id: Epoch(4) }), "offset {off}: {a:?}");
        assert!(!a.iter().any(|a| matches!(a, Action::End { .. })), "offset {off}: {a:?}");
    }
    // A length that is not a multiple of the block size, inside the volume.
    let mut s = up_session();
    let mut out = BytesMut::new();
    BatchHeader { kind: BatchKind::Epoch, id: Epoch(4), base: Epoch(3) }.encode(&mut out);
    let mut w = BatchWriter::new();
    let data = noise(1000, 1);
    Frame::Data(w.data(0, data.clone(), crc32c::crc32c(&data), Compression::Off)).encode(&mut out);
    s.stream_bytes(0, &out);
    let a = drain(&mut s);
    assert!(data_offsets(&a).is_empty(), "{a:?}");
    assert_eq!(failed_codes(&a), [FailCode::Malformed], "{a:?}");
}

/// Frames out of sequence and an end frame whose epoch does not fit are malformed too.
#[test]
fn out_of_sequence_and_bad_end_are_malformed() {
    let (_, frames) = batch(4, 3, &[0, 4096], Compression::Off);
    let mut out = BytesMut::new();
    BatchHeader { kind: BatchKind::Epoch, id: Epoch(4), base: Epoch(3) }.encode(&mut out);
    Frame::Data(frames[1].clone()).encode(&mut out);
    let mut s = up_session();
    s.stream_bytes(0, &out);
    let a = drain(&mut s);
    assert!(data_offsets(&a).is_empty(), "{a:?}");
    assert_eq!(failed_codes(&a), [FailCode::Malformed], "{a:?}");

    let mut out = BytesMut::new();
    BatchHeader { kind: BatchKind::Epoch, id: Epoch(4), base: Epoch(3) }.encode(&mut out);
    Frame::End(BatchWriter::new().end(Epoch(5))).encode(&mut out);
    let mut s = up_session();
    s.stream_bytes(0, &out);
    let a = drain(&mut s);
    assert_eq!(failed_codes(&a), [FailCode::Malformed], "{a:?}");
    assert!(!a.iter().any(|a| matches!(a, Action::End { .. })), "{a:?}");
}

/// Feeds `bytes` to a fresh session's stream 0 in pieces cut at `cuts`, then finishes it.
fn feed_split(bytes: &[u8], cuts: &[usize]) -> Vec<Action> {
    let mut s = up_session();
    let mut at = 0;
    for &c in cuts.iter().chain(std::iter::once(&bytes.len())) {
        s.stream_bytes(0, &bytes[at..c]);
        at = c;
    }
    s.stream_finished(0);
    drain(&mut s)
}

/// The same bytes split at any boundary (one cut anywhere, two cuts on a grid, every byte
/// alone) give the same actions, for a clean and a corrupted batch.
#[test]
fn splitting_the_stream_anywhere_gives_the_same_actions() {
    let offsets = [0, 8192, 12288, 1 << 20];
    for c in [Compression::Off, Compression::Lz4] {
        let (clean, frames) = batch(4, 3, &offsets, c);
        let mut corrupt = clean.clone();
        let (start, len) = payload_span(&frames, 1);
        corrupt[start + len / 3] ^= 0x04;
        for bytes in [&clean, &corrupt] {
            let whole = feed_split(bytes, &[]);
            assert!(whole.iter().any(|a| matches!(a, Action::End { .. } | Action::Abort { .. })));
            for cut in 0..=bytes.len() {
                assert_eq!(feed_split(bytes, &[cut]), whole, "{c:?} cut at {cut}");
            }
            for a in (0..=bytes.len()).step_by(61) {
                for b in (a..=bytes.len()).step_by(97) {
                    assert_eq!(feed_split(bytes, &[a, b]), whole, "{c:?} cuts at {a}, {b}");
                }
            }
            let every: Vec<usize> = (1..bytes.len()).collect();
            assert_eq!(feed_split(bytes, &every), whole, "{c:?} byte by byte");
        }
    }
}

/// The control stream split at every boundary gives the same actions too.
#[test]
fn control_stream_split_anywhere() {
    let mut bytes = hello_bytes(VERSION);
    msg::encode(&AgentMsg::Ping { nonce: 42 }, &mut bytes);
    let run = |cuts: &[usize]| {
        let mut s = TargetSession::new(TargetConfig::default());
        let mut at = 0;
        for &c in cuts.iter().chain(std::iter::once(&bytes.len())) {
            s.control_bytes(&bytes[at..c]);
            at = c;
        }
        drain(&mut s)
    };
    let whole = run(&[]);
    assert!(matches!(
        whole.as_slice(),
        [Action::Open(_), Action::Send(TargetMsg::Pong { nonce: 42 })]
    ));
    for cut in 0..=bytes.len() {
        assert_eq!(run(&[cut]), whole, "cut at {cut}");
    }
}

#[test]
fn hello_with_a_wrong_version_is_refused() {
    for v in [0, VERSION + 1, u16::MAX] {
        let mut s = TargetSession::new(TargetConfig::default());
        s.control_bytes(&hello_bytes(v));
        let a = drain(&mut s);
        let ctx = format!("version {v}: {a:?}");
        assert!(
            matches!(a.as_slice(), [
                Action::Send(TargetMsg::Refused(Refusal { code: RefuseCode::Version, message })),
                Action::Close { .. },
            ] if message.contains(&v.to_string())),
            "{ctx}"
        );
        assert!(!a.iter().any(|a| matches!(a, Action::Open(_))), "{ctx}");
        assert!(!s.is_up(), "{ctx}");
        // Nothing more is accepted on this session.
        s.control_bytes(&hello_bytes(VERSION));
        let (bytes, _) = batch(4, 3, &[0], Compression::Off);
        s.stream_bytes(0, &bytes);
        assert_eq!(drain(&mut s), [], "{ctx}");
    }
}

/// Data before the session is up closes it; nothing reaches the store.
#[test]
fn data_before_welcome_closes() {
    let mut s = TargetSession::new(TargetConfig::default());
    let (bytes, _) = batch(4, 3, &[0], Compression::Off);
    s.stream_bytes(0, &bytes);
    let a = drain(&mut s);
    assert!(matches!(a.as_slice(), [Action::Close { .. }]), "{a:?}");
}

/// Checks the invariants of any action sequence: data only inside a begun batch, never after
/// its end or abort, and always in range.
fn check_actions(actions: &[Action]) {
    let mut open: Option<Epoch> = None;
    for a in actions {
        match a {
            Action::Begin(h) => open = Some(h.id),
            Action::Data { id, offset, length, data } => {
                assert_eq!(open, Some(*id), "data outside its batch: {actions:?}");
                assert!(geometry().contains_aligned(*offset, u64::from(*length)));
                if let Some(d) = data {
                    assert_eq!(d.len(), *length as usize);
                }
            }
            Action::End { id, .. } | Action::Abort { id } if open == Some(*id) => open = None,
            _ => {}
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// cargo-fuzz is not installed here, so this stands in for the `repl_decode` fuzz target
    /// in CI: arbitrary bytes on the control stream and on data streams (alone, or after a
    /// valid header, or mutating a valid batch) never panic, and whatever actions come out
    /// keep the invariants.
    #[test]
    fn arbitrary_bytes_never_panic(
        control in proptest::collection::vec(any::<u8>(), 0..200),
        data in proptest::collection::vec(any::<u8>(), 0..400),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        chunk in 1usize..64,
    ) {
        let mut s = TargetSession::new(TargetConfig::default());
        s.control_bytes(&control);
        let _ = drain(&mut s);
        let mut s = up_session();
        s.control_bytes(&control);
        for c in data.chunks(chunk) {
            s.stream_bytes(1, c);
        }
        s.stream_finished(1);
        check_actions(&drain(&mut s));

        let mut s = up_session();
        let mut bytes = BytesMut::new();
        BatchHeader { kind: BatchKind::Epoch, id: Epoch(4), base: Epoch(3) }.encode(&mut bytes);
        bytes.extend_from_slice(&data);
        for c in bytes.chunks(chunk) {
            s.stream_bytes(2, c);
        }
        check_actions(&drain(&mut s));

        let (mut bytes, _) = batch(4, 3, &[0, 4096, 8192, 1 << 20], Compression::Lz4);
        for (i, x) in &flips {
            let i = i.index(bytes.len());
            bytes[i] ^= x;
        }
        let mut s = up_session();
        for c in bytes.chunks(chunk) {
            s.stream_bytes(3, c);
        }
        s.stream_finished(3);
        let a = drain(&mut s);
        check_actions(&a);
        if flips.iter().all(|(_, x)| *x == 0) {
            let ended = a.iter().any(|a| matches!(a, Action::End { .. }));
            prop_assert!(ended, "an unmodified batch must end: {:?}", a);
        }
    }
}
