//! Tests of request decoding, validation and reply encoding.

use bytes::{Buf, BytesMut};
use proptest::prelude::*;

use super::*;

const ALL_FLAGS: u16 = FLAG_HAS_FLAGS
    | FLAG_SEND_FLUSH
    | FLAG_SEND_FUA
    | FLAG_SEND_TRIM
    | FLAG_SEND_WRITE_ZEROES
    | FLAG_SEND_FAST_ZERO
    | FLAG_SEND_CACHE
    | FLAG_CAN_MULTI_CONN;

fn params() -> TransmissionParams {
    TransmissionParams {
        size: 1 << 20,
        transmission_flags: ALL_FLAGS,
        structured_replies: true,
        meta_contexts: 1,
        min_block_size: None,
        max_payload: MAX_PAYLOAD,
    }
}

fn hdr(kind: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
    RequestHeader { flags, kind, cookie: 42, offset, length }
}

#[test]
fn request_golden_bytes() {
    let mut buf = BytesMut::new();
    hdr(CMD_WRITE, CMD_FLAG_FUA, 4096, 512).encode(&mut buf);
    assert_eq!(
        &buf[..],
        &[
            0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 42, 0, 0, 0, 0, 0, 0, 0x10, 0,
            0, 0, 2, 0
        ]
    );
    let mut short = BytesMut::from(&buf[..27]);
    assert_eq!(RequestHeader::decode(&mut short), Ok(None));
    assert_eq!(short.len(), 27);
    let h = RequestHeader::decode(&mut buf).unwrap().unwrap();
    assert_eq!(h.payload_len(), 512);
    assert!(buf.is_empty());
    let mut bad = BytesMut::from(&[0u8; 28][..]);
    assert_eq!(RequestHeader::decode(&mut bad), Err(DecodeError::BadMagic { found: 0 }));
}

#[test]
fn validation_classes() {
    let p = params();
    let e = |h: RequestHeader, p: &TransmissionParams| validate(&h, p).unwrap_err().errno();
    assert_eq!(e(hdr(99, 0, 0, 0), &p), errno::EINVAL);
    assert_eq!(e(hdr(CMD_READ, 1 << 9, 0, 512), &p), errno::EINVAL);
    assert_eq!(e(hdr(CMD_READ, CMD_FLAG_NO_HOLE, 0, 512), &p), errno::EINVAL);
    assert_eq!(e(hdr(CMD_READ, 0, (1 << 20) - 511, 512), &p), errno::EINVAL);
    assert_eq!(e(hdr(CMD_READ, 0, u64::MAX, 512), &p), errno::EINVAL);
    assert_eq!(e(hdr(CMD_WRITE, 0, 1 << 20, 1), &p), errno::ENOSPC);
    assert_eq!(e(hdr(CMD_WRITE, 0, u64::MAX - 1, 4), &p), errno::ENOSPC);
    assert_eq!(e(hdr(CMD_WRITE_ZEROES, 0, 1 << 20, 1), &p), errno::ENOSPC);
    assert_eq!(e(hdr(CMD_TRIM, 0, 1 << 20, 1), &p), errno::EINVAL);
    assert_eq!(e(hdr(CMD_CACHE, 0, 1 << 20, 1), &p), errno::EINVAL);
    assert_eq!(e(hdr(CMD_BLOCK_STATUS, 0, 1 << 20, 1), &p), errno::EINVAL);
    assert_eq!(e(hdr(CMD_BLOCK_STATUS, 0, 0, 0), &p), errno::EINVAL);
    assert_eq!(e(hdr(CMD_READ, 0, 0, MAX_PAYLOAD + 1), &p), errno::EINVAL);
    assert_eq!(
        validate(&hdr(CMD_WRITE, 0, 0, MAX_PAYLOAD + 1), &p),
        Err(RequestError::TooLarge { command: "WRITE", length: MAX_PAYLOAD + 1, max: MAX_PAYLOAD })
    );
    // FAST_ZERO only when advertised.
    let ok = validate(&hdr(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE, 0, 4096), &p);
    assert_eq!(ok.unwrap().command, Command::WriteZeroes { fua: false, no_hole: true, fast: true });
    let mut p2 = p;
    p2.transmission_flags &= !FLAG_SEND_FAST_ZERO;
    assert_eq!(e(hdr(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 4096), &p2), errno::EINVAL);
    // Read-only.
    let mut ro = p;
    ro.transmission_flags |= FLAG_READ_ONLY;
    for kind in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
        assert_eq!(e(hdr(kind, 0, 0, 512), &ro), errno::EPERM);
    }
    assert!(validate(&hdr(CMD_READ, 0, 0, 512), &ro).is_ok());
    // Alignment only when negotiated.
    assert!(validate(&hdr(CMD_READ, 0, 1, 3), &p).is_ok());
    let mut al = p;
    al.min_block_size = Some(512);
    assert_eq!(e(hdr(CMD_READ, 0, 1, 512), &al), errno::EINVAL);
    assert_eq!(e(hdr(CMD_WRITE, 0, 512, 3), &al), errno::EINVAL);
    // BLOCK_STATUS needs a context.
    let mut nm = p;
    nm.meta_contexts = 0;
    assert_eq!(e(hdr(CMD_BLOCK_STATUS, 0, 0, 512), &nm), errno::EINVAL);
    // FUA is accepted on every command once advertised; flush/disc ignore ranges.
    assert!(validate(&hdr(CMD_FLUSH, CMD_FLAG_FUA, 7, 9), &p).is_ok());
    assert_eq!(validate(&hdr(CMD_DISC, 0, 0, 0), &p).unwrap().command, Command::Disc);
    let mut nf = p;
    nf.transmission_flags = FLAG_HAS_FLAGS;
    assert_eq!(e(hdr(CMD_FLUSH, 0, 0, 0), &nf), errno::EINVAL);
    assert_eq!(e(hdr(CMD_WRITE, CMD_FLAG_FUA, 0, 1), &nf), errno::EINVAL);
}

#[test]
fn payload_actions() {
    let w = hdr(CMD_WRITE, 0, 0, 4096);
    assert_eq!(payload_action(&w, true), PayloadAction::Read(4096));
    assert_eq!(payload_action(&w, false), PayloadAction::Discard(4096));
    let huge = hdr(CMD_WRITE, 0, 0, u32::MAX);
    assert_eq!(payload_action(&huge, false), PayloadAction::Close);
    assert_eq!(payload_action(&hdr(CMD_READ, 0, 0, 4096), false), PayloadAction::None);
}

#[test]
fn reply_golden_bytes() {
    let mut out = BytesMut::new();
    encode_simple_reply(&mut out, 7, errno::EIO);
    assert_eq!(&out[..], &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 7]);
    out.clear();
    encode_offset_data_header(&mut out, 7, 4096, 512, true);
    assert_eq!(
        &out[..],
        &[
            0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 2, 8, 0, 0, 0, 0, 0,
            0, 0x10, 0
        ]
    );
    out.clear();
    encode_error_chunk(&mut out, 7, errno::EINVAL, "no", true);
    assert_eq!(&out[4..8], &[0, 1, 0x80, 1]);
    assert_eq!(&out[16..], &[0, 0, 0, 8, 0, 0, 0, 22, 0, 2, b'n', b'o']);
    out.clear();
    let d = [BlockDescriptor { length: 4096, flags: STATE_HOLE | STATE_ZERO }];
    encode_block_status(&mut out, 7, 1, &d, true);
    assert_eq!(&out[4..8], &[0, 1, 0, 5]);
    assert_eq!(&out[16..], &[0, 0, 0, 12, 0, 0, 0, 1, 0, 0, 0x10, 0, 0, 0, 0, 3]);
    out.clear();
    encode_none(&mut out, 7);
    assert_eq!(&out[4..8], &[0, 1, 0, 0]);
}

#[test]
fn error_message_is_cut_at_char_boundary() {
    let msg = "é".repeat(3000);
    let mut out = BytesMut::new();
    encode_error_chunk(&mut out, 1, errno::EIO, &msg, true);
    let mut b = &out[16..];
    let len = b.get_u32() as usize;
    assert_eq!(len, out.len() - 20);
    b.advance(4);
    let mlen = b.get_u16() as usize;
    assert!(mlen <= MAX_STRING_LEN);
    assert!(std::str::from_utf8(&b[..mlen]).is_ok());
}

proptest! {
    #[test]
    fn request_header_round_trips(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) {
        let h = RequestHeader { flags, kind, cookie, offset, length };
        let mut buf = BytesMut::new();
        h.encode(&mut buf);
        prop_assert_eq!(buf.len(), REQUEST_HEADER_LEN);
        prop_assert_eq!(RequestHeader::decode(&mut buf), Ok(Some(h)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn reply_headers_round_trip(cookie: u64, error: u32, offset: u64, len in 1u32..1 << 20, flags: u16, kind: u16) {
        let mut buf = BytesMut::new();
        encode_simple_reply(&mut buf, cookie, error);
        encode_offset_data_header(&mut buf, cookie, offset, len, true);
        encode_chunk_header(&mut buf, flags, kind, cookie, len);
        prop_assert_eq!(decode_reply_header(&mut buf), Ok(Some(ReplyHeader::Simple { error, cookie })));
        prop_assert_eq!(decode_reply_header(&mut buf), Ok(Some(ReplyHeader::Chunk { flags: REPLY_FLAG_DONE, kind: REPLY_TYPE_OFFSET_DATA, cookie, length: len + 8 })));
        prop_assert_eq!(buf.get_u64(), offset);
        prop_assert_eq!(decode_reply_header(&mut buf), Ok(Some(ReplyHeader::Chunk { flags, kind, cookie, length: len })));
    }

    /// A request that validates is inside the export, aligned when asked, and within limits.
    #[test]
    fn validated_requests_are_in_range(kind in 0u16..10, flags: u16, offset: u64, length: u32, size in 0u64..1 << 40, align in prop::sample::select(vec![None, Some(512u32)])) {
        let mut p = params();
        p.size = size;
        p.min_block_size = align;
        let h = hdr(kind, flags, offset, length);
        match validate(&h, &p) {
            Ok(r) => {
                // Found by the fuzzer: FLUSH/DISC carry reserved offset/length, which must not
                // leak into the request as an overflowing range.
                prop_assert!(r.offset.checked_add(u64::from(r.length)).is_some_and(|e| e <= size));
                if !matches!(r.command, Command::Flush | Command::Disc) {
                    prop_assert!(offset.checked_add(u64::from(length)).is_some_and(|e| e <= size));
                    if let Some(a) = align {
                        prop_assert!(offset % u64::from(a) == 0 && length % a == 0);
                    }
                }
                if matches!(r.command, Command::Read | Command::Write { .. }) {
                    prop_assert!(length <= MAX_PAYLOAD);
                }
            }
            Err(e) => prop_assert!(e.errno() != 0),
        }
    }
}

/// Fuzzer regression (protocol/fuzz/regressions/flush-with-overflowing-range): FLUSH and DISC
/// with garbage in their reserved offset/length validate to an empty range, not an
/// overflowing one.
#[test]
fn flush_and_disc_ignore_reserved_range() {
    for kind in [CMD_FLUSH, CMD_DISC] {
        let r = validate(&hdr(kind, 0, u64::MAX, u32::MAX), &params()).unwrap();
        assert_eq!((r.offset, r.length), (0, 0));
    }
}
