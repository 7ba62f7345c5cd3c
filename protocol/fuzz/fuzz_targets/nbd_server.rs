//! Feeds arbitrary bytes, split into chunks, into the NBD server handshake and then into the
//! transmission decoder and validator, as the agent's connection driver does. Must never
//! panic.
#![no_main]

use blockferry_protocol::nbd::consts::*;
use blockferry_protocol::nbd::{
    payload_action, validate, ExportDesc, HandshakeConfig, HandshakeEvent, PayloadAction,
    RequestHeader, ServerHandshake, TransmissionParams,
};
use bytes::{Buf, BytesMut};
use libfuzzer_sys::fuzz_target;

fn exports() -> Vec<ExportDesc> {
    let e = |name: &str, ro: bool, min: u32, tls: bool| ExportDesc {
        name: name.into(),
        description: "fuzz".into(),
        size: 1 << 30,
        flags: FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES
            | FLAG_SEND_FAST_ZERO | FLAG_SEND_CACHE | FLAG_CAN_MULTI_CONN,
        read_only: ro,
        min_block_size: min,
        tls_required: tls,
        meta_contexts: vec![CONTEXT_BASE_ALLOCATION.into()],
    };
    vec![e("a", false, 1, false), e("ro", true, 512, false), e("t", false, 1, true)]
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    // First byte: handshake config; second: chunk size.
    let config = HandshakeConfig { tls_available: data[0] & 1 != 0, tls_required: data[0] & 2 != 0 };
    let chunk = usize::from(data[1]).max(1);
    let mut rest = &data[2..];
    let mut hs = ServerHandshake::new(exports(), config);
    let mut buf = BytesMut::new();
    let negotiated = loop {
        if rest.is_empty() {
            return;
        }
        let n = chunk.min(rest.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        match hs.handle_input(&mut buf) {
            Ok(None) => {}
            Ok(Some(HandshakeEvent::StartTls)) => hs.tls_established(),
            Ok(Some(HandshakeEvent::Ready(n))) => break n,
            Ok(Some(HandshakeEvent::Abort)) | Err(_) => return,
        }
        let _ = hs.take_output();
    };
    assert!(negotiated.export < exports().len());
    let params = TransmissionParams {
        size: negotiated.size,
        transmission_flags: negotiated.transmission_flags,
        structured_replies: negotiated.structured_replies,
        meta_contexts: negotiated.meta_contexts.len(),
        min_block_size: negotiated.block_size_negotiated.then_some(negotiated.block_sizes.min),
        max_payload: negotiated.block_sizes.max,
    };
    buf.extend_from_slice(rest);
    let mut skip: usize = 0;
    loop {
        if skip > 0 {
            let n = skip.min(buf.len());
            buf.advance(n);
            skip -= n;
            if skip > 0 {
                return;
            }
        }
        let hdr = match RequestHeader::decode(&mut buf) {
            Ok(Some(h)) => h,
            Ok(None) | Err(_) => return,
        };
        let v = validate(&hdr, &params);
        if let Ok(r) = &v {
            assert!(r.offset.checked_add(u64::from(r.length)).is_some());
        }
        match payload_action(&hdr, v.is_ok()) {
            PayloadAction::None => {}
            PayloadAction::Read(n) | PayloadAction::Discard(n) => skip = n as usize,
            PayloadAction::Close => return,
        }
    }
});
