use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::frame::*;
use super::msg::{self, *};
use super::types::*;

fn hello() -> Hello {
    Hello {
        version: VERSION,
        volume: VolumeId([0x11; 16]),
        name: "vol".into(),
        geometry: Geometry::new(1 << 30, 4096).unwrap(),
        generation: Generation::new(0x0102_0304_0506_0708).unwrap(),
        history: vec![],
        mode: Mode::Async,
        compression: vec![Compression::Lz4, Compression::Off],
        max_frame: DEFAULT_MAX_FRAME,
    }
}

/// The handshake's bytes are pinned: a change here is a protocol change (bump VERSION and add a
/// changelog line in msg.rs).
#[test]
fn hello_golden_bytes() {
    let mut b = BytesMut::new();
    msg::encode(&AgentMsg::Hello(hello()), &mut b);
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    assert_eq!(
        hex,
        "0000002e000111111111111111111111111111111111\
         03766f6c80808080048020888e98a8c0e08081010000020100808040"
    );
    let back: AgentMsg = msg::decode(&mut b).unwrap().unwrap();
    assert_eq!(back, AgentMsg::Hello(hello()));
}

#[test]
fn control_length_is_checked_before_allocating() {
    let mut b = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0][..]);
    assert!(matches!(msg::decode::<AgentMsg>(&mut b), Err(MsgError::TooLong { .. })));
    let mut b = BytesMut::from(&[0, 0, 0, 2, 0xff, 0xff][..]);
    assert!(matches!(msg::decode::<TargetMsg>(&mut b), Err(MsgError::Malformed(_))));
    let mut b = BytesMut::from(&[0, 0, 0, 9, 1][..]);
    assert!(msg::decode::<TargetMsg>(&mut b).unwrap().is_none());
}

#[test]
fn batch_round_trip_all_encodings() {
    let mut random = vec![0u8; 65536];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in random.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let text = Bytes::from(b"blockferry ".repeat(6000));
    let blocks = [
        (0u64, Bytes::from(random), Compression::Off),
        (1 << 20, text.clone(), Compression::Lz4),
        (2 << 20, text.clone(), Compression::Zstd(3)),
        (3 << 20, Bytes::from(vec![0u8; 8192]), Compression::Lz4),
    ];
    let mut w = BatchWriter::new();
    let mut out = BytesMut::new();
    BatchHeader { kind: BatchKind::Epoch, id: Epoch(7), base: Epoch(5) }.encode(&mut out);
    let mut sent = Vec::new();
    for (off, data, c) in &blocks {
        let f = w.data(*off, data.clone(), crc32c::crc32c(data), *c);
        Frame::Data(f.clone()).encode(&mut out);
        sent.push(f);
    }
    Frame::End(w.end(Epoch(7))).encode(&mut out);
    assert_eq!(sent[1].encoding, Encoding::Lz4);
    assert_eq!(sent[2].encoding, Encoding::Zstd);
    assert_eq!(sent[3].encoding, Encoding::Zero);
    assert!(w.wire_bytes < w.data_bytes);

    let h = BatchHeader::decode(&mut out).unwrap().unwrap();
    assert_eq!((h.kind, h.id, h.base), (BatchKind::Epoch, Epoch(7), Epoch(5)));
    let mut r = BatchReader::new();
    for (off, data, _) in &blocks {
        let Some(Frame::Data(f)) = Frame::decode(&mut out, DEFAULT_MAX_FRAME).unwrap() else {
            panic!("expected a data frame")
        };
        r.data(&f).unwrap();
        assert_eq!(f.offset, *off);
        match f.open().unwrap() {
            Some(d) => assert_eq!(&d, data),
            None => assert!(is_zero(data)),
        }
    }
    let Some(Frame::End(e)) = Frame::decode(&mut out, DEFAULT_MAX_FRAME).unwrap() else {
        panic!("expected the end frame")
    };
    r.end(&e).unwrap();
    assert!(out.is_empty());
}

#[test]
fn compression_backs_off_on_incompressible_data_and_comes_back() {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = || {
        let mut v = vec![0u8; 4096];
        for b in &mut v {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        Bytes::from(v)
    };
    let text = Bytes::from(b"blockferry ".repeat(400));
    let mut w = BatchWriter::new();
    let mut tried = 0;
    for i in 0..1000u64 {
        let d = random();
        let before = w.skip_left();
        let f = w.data(i * 4096, d.clone(), crc32c::crc32c(&d), Compression::Lz4);
        assert_eq!(f.encoding, Encoding::Raw);
        tried += usize::from(before == 0);
    }
    // One try, then skips of 2, 4, 8, 16 and 32 frames.
    assert!(tried <= 1000 / 32 + 6, "{tried} tries of 1000 incompressible frames");
    // Compressible data after the skip runs out is compressed again, and stays compressed.
    let mut encodings = Vec::new();
    for i in 0..40u64 {
        let f = w.data(i * 4096, text.clone(), crc32c::crc32c(&text), Compression::Lz4);
        encodings.push(f.encoding);
    }
    assert!(encodings[33..].iter().all(|e| *e == Encoding::Lz4), "{encodings:?}");
}

#[test]
fn corrupted_payload_is_detected() {
    let data = Bytes::from(vec![7u8; 4096]);
    let mut w = BatchWriter::new();
    let f = w.data(4096, data.clone(), crc32c::crc32c(&data), Compression::Off);
    let mut out = BytesMut::new();
    Frame::Data(f).encode(&mut out);
    let last = out.len() - 1;
    out[last] ^= 1;
    let Some(Frame::Data(f)) = Frame::decode(&mut out, DEFAULT_MAX_FRAME).unwrap() else {
        panic!()
    };
    assert!(matches!(f.open(), Err(FrameError::DataChecksum { .. })));
}

#[test]
fn oversized_frame_is_refused_before_allocating() {
    let mut w = BatchWriter::new();
    let data = Bytes::from(vec![1u8; 8192]);
    let f = w.data(0, data.clone(), crc32c::crc32c(&data), Compression::Off);
    let mut out = BytesMut::new();
    Frame::Data(f).encode(&mut out);
    out.truncate(32);
    assert!(matches!(Frame::decode(&mut out, 4096), Err(FrameError::TooLong { .. })));
}

proptest! {
    /// Any bytes: the decoders return a frame, an error or "need more", never panic, and never
    /// reserve more than the maximum frame.
    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut b = BytesMut::from(&bytes[..]);
        let _ = BatchHeader::decode(&mut b);
        let mut b = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = Frame::decode(&mut b, DEFAULT_MAX_FRAME) {}
        prop_assert!(b.capacity() <= bytes.len().max(64) + FRAME_HEADER_LEN + DEFAULT_MAX_FRAME as usize);
        let mut b = BytesMut::from(&bytes[..]);
        let _ = msg::decode::<AgentMsg>(&mut b);
        let mut b = BytesMut::from(&bytes[..]);
        let _ = msg::decode::<TargetMsg>(&mut b);
    }

    #[test]
    fn geometry_checks(size in any::<u64>(), shift in 0u32..24) {
        let bs = 1u32 << shift;
        let g = Geometry::new(size, bs);
        prop_assert_eq!(g.is_some(), size > 0 && (12..=20).contains(&shift) && size % u64::from(bs) == 0);
    }
}
