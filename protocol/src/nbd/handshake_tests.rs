//! In-memory tests of the server handshake with golden bytes.

use bytes::{BufMut, BytesMut};

use super::*;

fn export(name: &str, size: u64) -> ExportDesc {
    ExportDesc {
        name: name.into(),
        description: format!("volume {name}"),
        size,
        flags: FLAG_SEND_FLUSH | FLAG_SEND_FUA,
        read_only: false,
        min_block_size: 1,
        tls_required: false,
        meta_contexts: vec![CONTEXT_BASE_ALLOCATION.into()],
    }
}

fn catalog() -> Vec<ExportDesc> {
    vec![export("a", 1 << 20), export("b", 4096)]
}

fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.put_u64(IHAVEOPT);
    v.put_u32(option);
    v.put_u32(data.len() as u32);
    v.put_slice(data);
    v
}

fn reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.put_u64(REPLY_MAGIC);
    v.put_u32(option);
    v.put_u32(kind);
    v.put_u32(data.len() as u32);
    v.put_slice(data);
    v
}

fn info_req(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    v.put_u32(name.len() as u32);
    v.put_slice(name.as_bytes());
    v.put_u16(infos.len() as u16);
    for i in infos {
        v.put_u16(*i);
    }
    v
}

fn meta_req(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    v.put_u32(name.len() as u32);
    v.put_slice(name.as_bytes());
    v.put_u32(queries.len() as u32);
    for q in queries {
        v.put_u32(q.len() as u32);
        v.put_slice(q.as_bytes());
    }
    v
}

/// A handshake past the greeting and client flags.
fn started(config: HandshakeConfig, flags: u32) -> ServerHandshake<Vec<ExportDesc>> {
    let mut hs = ServerHandshake::new(catalog(), config);
    let greeting = hs.take_output();
    assert_eq!(
        &greeting[..],
        &[
            b'N', b'B', b'D', b'M', b'A', b'G', b'I', b'C', b'I', b'H', b'A', b'V', b'E', b'O',
            b'P', b'T', 0, 3
        ]
    );
    let mut input = BytesMut::from(&flags.to_be_bytes()[..]);
    assert_eq!(hs.handle_input(&mut input), Ok(None));
    hs
}

fn feed<C: ExportCatalog>(
    hs: &mut ServerHandshake<C>,
    bytes: &[u8],
) -> (Result<Option<HandshakeEvent>, HandshakeError>, Vec<u8>) {
    let mut input = BytesMut::from(bytes);
    let r = hs.handle_input(&mut input);
    (r, hs.take_output().to_vec())
}

#[test]
fn export_name_with_and_without_zeroes() {
    let mut hs = started(HandshakeConfig::default(), FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    let (r, out) = feed(&mut hs, &opt(OPT_EXPORT_NAME, b"b"));
    let Ok(Some(HandshakeEvent::Ready(n))) = r else { panic!("{r:?}") };
    assert_eq!(n.export, 1);
    assert!(!n.structured_replies);
    assert_eq!(out, [0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0b1101]);

    let mut hs = started(HandshakeConfig::default(), FLAG_C_FIXED_NEWSTYLE);
    let (r, out) = feed(&mut hs, &opt(OPT_EXPORT_NAME, b"a"));
    assert!(matches!(r, Ok(Some(HandshakeEvent::Ready(_)))));
    assert_eq!(out.len(), 8 + 2 + 124);
    assert_eq!(&out[..10], &[0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0b1101]);
    assert!(out[10..].iter().all(|b| *b == 0));
}

#[test]
fn export_name_unknown_closes() {
    let mut hs = started(HandshakeConfig::default(), 1);
    let (r, out) = feed(&mut hs, &opt(OPT_EXPORT_NAME, b"nope"));
    assert_eq!(r, Err(HandshakeError::UnknownExport { name: "nope".into() }));
    assert!(out.is_empty());
}

#[test]
fn bad_client_flags_and_magic_close() {
    let mut hs = ServerHandshake::new(catalog(), HandshakeConfig::default());
    let (r, _) = feed(&mut hs, &[0, 0, 0, 4]);
    assert_eq!(r, Err(HandshakeError::BadClientFlags { flags: 4 }));
    let mut hs = started(HandshakeConfig::default(), 3);
    let (r, _) = feed(&mut hs, b"GET / HTTP/1.1\r\nHost: x\r\n");
    assert!(matches!(r, Err(HandshakeError::BadMagic { .. })));
}

#[test]
fn go_golden_bytes() {
    let mut hs = started(HandshakeConfig::default(), 3);
    let mut input = opt(OPT_STRUCTURED_REPLY, &[]);
    input.extend(opt(OPT_GO, &info_req("a", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE])));
    input.extend(b"rest");
    let mut buf = BytesMut::from(&input[..]);
    let r = hs.handle_input(&mut buf);
    let Ok(Some(HandshakeEvent::Ready(n))) = r else { panic!("{r:?}") };
    assert_eq!(&buf[..], b"rest", "transmission bytes are left in the buffer");
    assert!(n.structured_replies && n.block_size_negotiated);
    assert_eq!(n.meta_contexts, vec![]);
    let mut want = reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]);
    want.extend(reply(OPT_GO, REP_INFO, &[0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0b1101]));
    want.extend(reply(OPT_GO, REP_INFO, &[0, 1, b'a']));
    want.extend(reply(OPT_GO, REP_INFO, b"\x00\x02volume a"));
    want.extend(reply(OPT_GO, REP_INFO, &[0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0]));
    want.extend(reply(OPT_GO, REP_ACK, &[]));
    assert_eq!(hs.take_output().to_vec(), want);
}

#[test]
fn info_unknown_then_list_then_go_default() {
    let mut hs = ServerHandshake::new(vec![export("only", 512)], HandshakeConfig::default());
    hs.take_output();
    let mut input = vec![0, 0, 0, 1];
    input.extend(opt(OPT_INFO, &info_req("zz", &[])));
    input.extend(opt(OPT_LIST, &[]));
    input.extend(opt(OPT_GO, &info_req("", &[])));
    let (r, out) = feed(&mut hs, &input);
    let Ok(Some(HandshakeEvent::Ready(n))) = r else { panic!("{r:?}") };
    assert_eq!(n.name, "only");
    let mut want = reply(OPT_INFO, REP_ERR_UNKNOWN, b"no export named \"zz\"");
    want.extend(reply(OPT_LIST, REP_SERVER, b"\x00\x00\x00\x04onlyvolume only"));
    want.extend(reply(OPT_LIST, REP_ACK, &[]));
    assert_eq!(&out[..want.len()], &want[..]);
}

#[test]
fn unknown_and_oversized_options_are_skipped() {
    let mut hs = started(HandshakeConfig::default(), 3);
    let mut input = opt(999, &[7; 100]);
    input.extend(opt(OPT_LIST, &[1]));
    let (r, out) = feed(&mut hs, &input);
    assert_eq!(r, Ok(None));
    let mut want = reply(999, REP_ERR_UNSUP, b"unknown option");
    want.extend(reply(OPT_LIST, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data"));
    assert_eq!(out, want);

    // A known option longer than MAX_OPTION_LEN: skipped byte by byte, never buffered.
    let len = MAX_OPTION_LEN + 10;
    let mut hdr = Vec::new();
    hdr.put_u64(IHAVEOPT);
    hdr.put_u32(OPT_SET_META_CONTEXT);
    hdr.put_u32(len);
    let (r, out) = feed(&mut hs, &hdr);
    assert_eq!((r, out.len()), (Ok(None), 0));
    let chunk = vec![0u8; 4096];
    let mut left = len as usize;
    let mut out = Vec::new();
    while left > 0 {
        let n = left.min(chunk.len());
        let mut b = BytesMut::from(&chunk[..n]);
        assert_eq!(hs.handle_input(&mut b), Ok(None));
        assert!(b.is_empty());
        assert!(b.capacity() <= 8192);
        left -= n;
        out.extend(hs.take_output());
    }
    assert_eq!(out, reply(OPT_SET_META_CONTEXT, REP_ERR_TOO_BIG, b"option data too long"));

    // Too long even to skip: close.
    let mut hdr = Vec::new();
    hdr.put_u64(IHAVEOPT);
    hdr.put_u32(OPT_GO);
    hdr.put_u32(u32::MAX);
    let (r, _) = feed(&mut hs, &hdr);
    assert!(matches!(r, Err(HandshakeError::OptionTooLong { .. })));
}

#[test]
fn byte_by_byte_equals_all_at_once() {
    let mut input = vec![0, 0, 0, 3];
    input.extend(opt(OPT_STRUCTURED_REPLY, &[]));
    input.extend(opt(OPT_SET_META_CONTEXT, &meta_req("a", &[CONTEXT_BASE_ALLOCATION])));
    input.extend(opt(OPT_GO, &info_req("a", &[INFO_BLOCK_SIZE])));
    let mut whole = ServerHandshake::new(catalog(), HandshakeConfig::default());
    let (r1, out1) = feed(&mut whole, &input);
    let mut slow = ServerHandshake::new(catalog(), HandshakeConfig::default());
    let mut out2 = Vec::new();
    let mut buf = BytesMut::new();
    let mut r2 = Ok(None);
    for b in &input {
        buf.put_u8(*b);
        r2 = slow.handle_input(&mut buf);
        out2.extend(slow.take_output());
        if !matches!(r2, Ok(None)) {
            break;
        }
    }
    assert_eq!(r1, r2);
    assert_eq!(out1, out2);
    let Ok(Some(HandshakeEvent::Ready(n))) = r1 else { panic!() };
    assert_eq!(n.meta_contexts, vec![MetaContext { id: 1, name: CONTEXT_BASE_ALLOCATION.into() }]);
}

#[test]
fn meta_contexts() {
    let mut hs = started(HandshakeConfig::default(), 3);
    // Before STRUCTURED_REPLY: invalid.
    let (_, out) = feed(&mut hs, &opt(OPT_LIST_META_CONTEXT, &meta_req("a", &[])));
    assert_eq!(&out[12..16], &REP_ERR_INVALID.to_be_bytes());
    assert_eq!(feed(&mut hs, &opt(OPT_STRUCTURED_REPLY, &[])).0, Ok(None));
    let (_, out) = feed(&mut hs, &opt(OPT_LIST_META_CONTEXT, &meta_req("a", &["base:"])));
    let mut want = reply(OPT_LIST_META_CONTEXT, REP_META_CONTEXT, b"\0\0\0\0base:allocation");
    want.extend(reply(OPT_LIST_META_CONTEXT, REP_ACK, &[]));
    assert_eq!(out, want);
    let (_, out) =
        feed(&mut hs, &opt(OPT_SET_META_CONTEXT, &meta_req("a", &["qemu:x", "base:allocation"])));
    let mut want = reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT, b"\0\0\0\x01base:allocation");
    want.extend(reply(OPT_SET_META_CONTEXT, REP_ACK, &[]));
    assert_eq!(out, want);
    // Contexts chosen for "a" do not carry over to "b".
    let (r, _) = feed(&mut hs, &opt(OPT_GO, &info_req("b", &[])));
    let Ok(Some(HandshakeEvent::Ready(n))) = r else { panic!() };
    assert!(n.meta_contexts.is_empty());
    // Truncated query: invalid, not a panic.
    let mut hs = started(HandshakeConfig::default(), 3);
    assert_eq!(feed(&mut hs, &opt(OPT_STRUCTURED_REPLY, &[])).0, Ok(None));
    let mut bad = meta_req("a", &["base:allocation"]);
    bad.truncate(bad.len() - 3);
    let (r, out) = feed(&mut hs, &opt(OPT_SET_META_CONTEXT, &bad));
    assert_eq!(r, Ok(None));
    assert_eq!(&out[12..16], &REP_ERR_INVALID.to_be_bytes());
}

#[test]
fn tls_modes() {
    // No TLS configured: STARTTLS refused by policy.
    let mut hs = started(HandshakeConfig::default(), 1);
    let (r, out) = feed(&mut hs, &opt(OPT_STARTTLS, &[]));
    assert_eq!(r, Ok(None));
    assert_eq!(&out[12..16], &REP_ERR_POLICY.to_be_bytes());

    // FORCEDTLS: options refused until TLS; STARTTLS acked, then state is reset.
    let cfg = HandshakeConfig { tls_available: true, tls_required: true };
    let mut hs = started(cfg, 1);
    let (r, out) = feed(&mut hs, &opt(OPT_LIST, &[]));
    assert_eq!(r, Ok(None));
    assert_eq!(&out[12..16], &REP_ERR_TLS_REQD.to_be_bytes());
    let mut input = BytesMut::from(&opt(OPT_STARTTLS, &[])[..]);
    input.extend_from_slice(b"tls client hello");
    assert_eq!(hs.handle_input(&mut input), Ok(Some(HandshakeEvent::StartTls)));
    assert_eq!(hs.take_output().to_vec(), reply(OPT_STARTTLS, REP_ACK, &[]));
    assert_eq!(&input[..], b"tls client hello", "TLS bytes are not consumed");
    hs.tls_established();
    let (r, out) = feed(&mut hs, &opt(OPT_STARTTLS, &[]));
    assert_eq!(r, Ok(None));
    assert_eq!(&out[12..16], &REP_ERR_INVALID.to_be_bytes());
    let (r, _) = feed(&mut hs, &opt(OPT_EXPORT_NAME, b"a"));
    let Ok(Some(HandshakeEvent::Ready(n))) = r else { panic!() };
    assert!(n.tls);

    // FORCEDTLS and EXPORT_NAME without TLS: close.
    let mut hs = started(cfg, 1);
    let (r, _) = feed(&mut hs, &opt(OPT_EXPORT_NAME, b"a"));
    assert!(matches!(r, Err(HandshakeError::TlsRequired { .. })));

    // SELECTIVETLS: a TLS-only export is refused by GO until TLS.
    let mut exports = catalog();
    exports[0].tls_required = true;
    let mut hs =
        ServerHandshake::new(exports, HandshakeConfig { tls_available: true, tls_required: false });
    hs.take_output();
    let mut input = vec![0, 0, 0, 1];
    input.extend(opt(OPT_GO, &info_req("a", &[])));
    let (r, out) = feed(&mut hs, &input);
    assert_eq!(r, Ok(None));
    assert_eq!(&out[12..16], &REP_ERR_TLS_REQD.to_be_bytes());
    let (r, _) = feed(&mut hs, &opt(OPT_GO, &info_req("b", &[])));
    assert!(matches!(r, Ok(Some(HandshakeEvent::Ready(_)))));
}

#[test]
fn abort_acks_and_finishes() {
    let mut hs = started(HandshakeConfig::default(), 1);
    let (r, out) = feed(&mut hs, &opt(OPT_ABORT, &[]));
    assert_eq!(r, Ok(Some(HandshakeEvent::Abort)));
    assert_eq!(out, reply(OPT_ABORT, REP_ACK, &[]));
    let (r, _) = feed(&mut hs, &opt(OPT_LIST, &[]));
    assert_eq!(r, Err(HandshakeError::Finished));
}

#[test]
fn read_only_export_flags() {
    let mut e = export("ro", 8192);
    e.read_only = true;
    e.min_block_size = 512;
    let mut hs = ServerHandshake::new(vec![e], HandshakeConfig::default());
    hs.take_output();
    let mut input = vec![0, 0, 0, 3];
    input.extend(opt(OPT_GO, &info_req("ro", &[INFO_BLOCK_SIZE])));
    let (r, _) = feed(&mut hs, &input);
    let Ok(Some(HandshakeEvent::Ready(n))) = r else { panic!() };
    assert_eq!(
        n.transmission_flags,
        FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_SEND_FUA
    );
    assert_eq!(n.block_sizes, BlockSizes { min: 512, preferred: 4096, max: MAX_PAYLOAD });
}

/// A catalog whose contexts change at run time, as the agent's does: export 0 ("a") offers
/// one `qemu:dirty-bitmap:NAME` per bitmap, in creation order, after `base:allocation`.
#[derive(Debug)]
struct Dynamic {
    exports: Vec<ExportDesc>,
    bitmaps: std::sync::Mutex<Vec<String>>,
}

impl Dynamic {
    fn new(bitmaps: &[&str]) -> std::sync::Arc<Dynamic> {
        let bitmaps = bitmaps.iter().map(|b| b.to_string()).collect();
        std::sync::Arc::new(Dynamic { exports: catalog(), bitmaps: std::sync::Mutex::new(bitmaps) })
    }

    fn create(&self, name: &str) {
        self.bitmaps.lock().unwrap().push(name.into());
    }

    fn remove(&self, name: &str) {
        self.bitmaps.lock().unwrap().retain(|b| b != name);
    }
}

impl ExportCatalog for Dynamic {
    fn exports(&self) -> &[ExportDesc] {
        &self.exports
    }

    fn meta_contexts(&self, export: usize) -> Vec<String> {
        let mut contexts = self.exports[export].meta_contexts.clone();
        if export == 0 {
            let bitmaps = self.bitmaps.lock().unwrap();
            contexts.extend(bitmaps.iter().map(|b| format!("{CONTEXT_DIRTY_BITMAP_PREFIX}{b}")));
        }
        contexts
    }
}

/// A handshake over `catalog` (held through an `Arc`, as the agent holds it) with structured
/// replies negotiated.
fn structured(catalog: &std::sync::Arc<Dynamic>) -> ServerHandshake<std::sync::Arc<Dynamic>> {
    let mut hs = ServerHandshake::new(catalog.clone(), HandshakeConfig::default());
    hs.take_output();
    let mut input = vec![0, 0, 0, 3];
    input.extend(opt(OPT_STRUCTURED_REPLY, &[]));
    let (r, out) = feed(&mut hs, &input);
    assert_eq!((r, out), (Ok(None), reply(OPT_STRUCTURED_REPLY, REP_ACK, &[])));
    hs
}

/// Sends a LIST or SET and returns the (id, name) of each context reply; the reply must end
/// with an ACK.
fn meta(
    hs: &mut ServerHandshake<std::sync::Arc<Dynamic>>,
    option: u32,
    export: &str,
    queries: &[&str],
) -> Vec<(u32, String)> {
    let (r, out) = feed(hs, &opt(option, &meta_req(export, queries)));
    assert_eq!(r, Ok(None));
    let mut p = &out[..];
    let mut contexts = Vec::new();
    loop {
        assert_eq!(p.get_u64(), REPLY_MAGIC);
        assert_eq!(p.get_u32(), option);
        let kind = p.get_u32();
        let len = p.get_u32() as usize;
        let mut data = &p[..len];
        p.advance(len);
        if kind == REP_ACK {
            assert_eq!(len, 0);
            assert!(p.is_empty(), "nothing after the ACK");
            return contexts;
        }
        assert_eq!(kind, REP_META_CONTEXT, "reply {kind:#x}: {:?}", String::from_utf8_lossy(data));
        let id = data.get_u32();
        contexts.push((id, String::from_utf8(data.to_vec()).unwrap()));
    }
}

fn named(contexts: &[(u32, &str)]) -> Vec<(u32, String)> {
    contexts.iter().map(|(id, n)| (*id, n.to_string())).collect()
}

#[test]
fn list_meta_contexts_follows_the_bitmaps() {
    let cat = Dynamic::new(&["b1", "b2"]);
    let mut hs = structured(&cat);
    let all =
        named(&[(0, "base:allocation"), (0, "qemu:dirty-bitmap:b1"), (0, "qemu:dirty-bitmap:b2")]);
    assert_eq!(meta(&mut hs, OPT_LIST_META_CONTEXT, "a", &[]), all);
    let bitmaps = all[1..].to_vec();
    assert_eq!(meta(&mut hs, OPT_LIST_META_CONTEXT, "a", &["qemu:"]), bitmaps);
    assert_eq!(meta(&mut hs, OPT_LIST_META_CONTEXT, "a", &["qemu:dirty-bitmap:"]), bitmaps);
    assert_eq!(meta(&mut hs, OPT_LIST_META_CONTEXT, "a", &["base:"]), all[..1].to_vec());
    // Several queries: each context once, in the export's order.
    let q = ["qemu:dirty-bitmap:b2", "base:allocation", "qemu:", "base:allocation"];
    assert_eq!(meta(&mut hs, OPT_LIST_META_CONTEXT, "a", &q), all);
    // Exact names; unknown names, partial leaf names and other namespaces list nothing.
    assert_eq!(
        meta(&mut hs, OPT_LIST_META_CONTEXT, "a", &["qemu:dirty-bitmap:b2"]),
        named(&[(0, "qemu:dirty-bitmap:b2")])
    );
    let none = ["qemu:dirty-bitmap:b", "qemu:dirty-bitmap:nope", "qemu:dirty", "x-foo:", "b1"];
    assert_eq!(meta(&mut hs, OPT_LIST_META_CONTEXT, "a", &none), vec![]);
    // Bitmaps created and removed while the connection negotiates are seen at the next LIST.
    cat.create("b3");
    cat.remove("b1");
    assert_eq!(
        meta(&mut hs, OPT_LIST_META_CONTEXT, "a", &["qemu:"]),
        named(&[(0, "qemu:dirty-bitmap:b2"), (0, "qemu:dirty-bitmap:b3")])
    );
    // Export "b" has no bitmaps.
    assert_eq!(meta(&mut hs, OPT_LIST_META_CONTEXT, "b", &["qemu:"]), vec![]);
    assert_eq!(meta(&mut hs, OPT_LIST_META_CONTEXT, "b", &[]), named(&[(0, "base:allocation")]));
}

#[test]
fn set_meta_context_selects_exact_names_with_stable_ids() {
    let cat = Dynamic::new(&["b1", "b2"]);
    let mut hs = structured(&cat);
    // Wildcards and unknown names select nothing.
    let q = ["qemu:", "qemu:dirty-bitmap:", "base:", "qemu:dirty-bitmap:nope", "x-foo:bar"];
    assert_eq!(meta(&mut hs, OPT_SET_META_CONTEXT, "a", &q), vec![]);
    // Exact names: ids in the order names are first selected on this connection.
    let q = ["qemu:dirty-bitmap:b2", "qemu:", "base:allocation"];
    let first = named(&[(1, "base:allocation"), (2, "qemu:dirty-bitmap:b2")]);
    assert_eq!(meta(&mut hs, OPT_SET_META_CONTEXT, "a", &q), first);
    // Golden bytes of a dirty-bitmap selection.
    let (_, out) = feed(&mut hs, &opt(OPT_SET_META_CONTEXT, &meta_req("a", &[q[0]])));
    let mut want = reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT, b"\0\0\0\x02qemu:dirty-bitmap:b2");
    want.extend(reply(OPT_SET_META_CONTEXT, REP_ACK, &[]));
    assert_eq!(out, want);
    // b2 removed, b1 selected for the first time, b3 created: ids stay those of the names.
    cat.remove("b2");
    cat.create("b3");
    let q = ["qemu:dirty-bitmap:b3", "qemu:dirty-bitmap:b2", "qemu:dirty-bitmap:b1"];
    assert_eq!(
        meta(&mut hs, OPT_SET_META_CONTEXT, "a", &q),
        named(&[(3, "qemu:dirty-bitmap:b1"), (4, "qemu:dirty-bitmap:b3")])
    );
    // Re-created under the same name: the same id.
    cat.create("b2");
    let q = ["qemu:dirty-bitmap:b2", "base:allocation"];
    let last = named(&[(1, "base:allocation"), (2, "qemu:dirty-bitmap:b2")]);
    assert_eq!(meta(&mut hs, OPT_SET_META_CONTEXT, "a", &q), last);
    // GO carries the last selection, with the ids the client was told.
    let (r, _) = feed(&mut hs, &opt(OPT_GO, &info_req("a", &[])));
    let Ok(Some(HandshakeEvent::Ready(n))) = r else { panic!("{r:?}") };
    let got: Vec<(u32, String)> = n.meta_contexts.into_iter().map(|c| (c.id, c.name)).collect();
    assert_eq!(got, last);
}

#[test]
fn set_meta_context_replaces_the_selection_even_when_it_fails() {
    let cat = Dynamic::new(&["b1"]);
    for bad in [
        meta_req("zz", &["base:allocation"]), // unknown export
        meta_req("a", &["base:allocation"])[..9].to_vec(), // truncated
    ] {
        let mut hs = structured(&cat);
        assert_eq!(
            meta(&mut hs, OPT_SET_META_CONTEXT, "a", &["qemu:dirty-bitmap:b1"]),
            named(&[(1, "qemu:dirty-bitmap:b1")])
        );
        let (r, out) = feed(&mut hs, &opt(OPT_SET_META_CONTEXT, &bad));
        assert_eq!(r, Ok(None));
        assert!(
            out[12..16] == REP_ERR_UNKNOWN.to_be_bytes()
                || out[12..16] == REP_ERR_INVALID.to_be_bytes()
        );
        let (r, _) = feed(&mut hs, &opt(OPT_GO, &info_req("a", &[])));
        let Ok(Some(HandshakeEvent::Ready(n))) = r else { panic!("{r:?}") };
        assert_eq!(n.meta_contexts, vec![], "the failed SET cleared the selection");
    }
    // A SET with no query selects nothing, and clears what was selected.
    let mut hs = structured(&cat);
    assert_eq!(meta(&mut hs, OPT_SET_META_CONTEXT, "a", &["base:allocation"]).len(), 1);
    assert_eq!(meta(&mut hs, OPT_SET_META_CONTEXT, "a", &[]), vec![]);
    let (r, _) = feed(&mut hs, &opt(OPT_GO, &info_req("a", &[])));
    let Ok(Some(HandshakeEvent::Ready(n))) = r else { panic!("{r:?}") };
    assert_eq!(n.meta_contexts, vec![]);
}
