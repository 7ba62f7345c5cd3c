//! Server tests over real sockets with a minimal in-test NBD client.

use std::sync::Arc;

use blockferry_protocol::nbd::consts::*;
use blockferry_protocol::nbd::{decode_reply_header, ReplyHeader, RequestHeader};
use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::oneshot;

use super::*;
use crate::config::{Config, TlsConfig, VolumeConfig};
use crate::engine::EngineKind;

struct Running {
    addr: SocketAddr,
    unix: PathBuf,
    stats: Arc<IoStats>,
    tracker: Option<Arc<Tracker>>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
    _tmp: tempfile::TempDir,
}

async fn start(
    read_only: bool,
    tls: Option<(TlsConfig, TlsPolicy)>,
    tmp: tempfile::TempDir,
) -> Running {
    let dir = tmp.path().join("vol");
    if !dir.exists() {
        Volume::create(&dir, 8 << 20, 4096, Some("v")).unwrap();
    }
    let unix = tmp.path().join("nbd.sock");
    let mut vc = VolumeConfig::new(&dir);
    vc.read_only = read_only;
    vc.engine = EngineKind::Sync;
    let mut config = Config {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        unix: Some(unix.clone()),
        tls: None,
        admin: None,
        key_dir: None,
        workers: None,
        volumes: vec![vc],
    };
    if let Some((t, mode)) = tls {
        config.tls = Some(TlsConfig { mode, ..t });
    }
    let server = Server::bind(&config).await.unwrap();
    let addr = server.local_addr().unwrap();
    let stats = server.stats("v").unwrap();
    let tracker = server.trackers().remove("v").flatten();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    Running { addr, unix, stats, tracker, stop: Some(tx), task, _tmp: tmp }
}

fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.put_u64(IHAVEOPT);
    v.put_u32(option);
    v.put_u32(data.len() as u32);
    v.put_slice(data);
    v
}

/// Reads option replies up to and including the final one (ACK or an error).
async fn option_replies<S: AsyncRead + Unpin>(s: &mut S) -> Vec<(u32, Vec<u8>)> {
    let mut replies = Vec::new();
    loop {
        let mut hdr = [0u8; 20];
        s.read_exact(&mut hdr).await.unwrap();
        let mut h = &hdr[..];
        assert_eq!(h.get_u64(), REPLY_MAGIC);
        h.get_u32();
        let kind = h.get_u32();
        let mut data = vec![0; h.get_u32() as usize];
        s.read_exact(&mut data).await.unwrap();
        let fin = kind != REP_INFO && kind != REP_SERVER && kind != REP_META_CONTEXT;
        replies.push((kind, data));
        if fin {
            return replies;
        }
    }
}

/// Greeting + flags + STRUCTURED_REPLY + SET_META_CONTEXT(base:allocation) + GO("v").
async fn attach<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, structured: bool) {
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).await.unwrap();
    assert_eq!(&greet[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).await.unwrap();
    go(s, structured).await;
}

async fn go<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, structured: bool) {
    if structured {
        s.write_all(&opt(OPT_STRUCTURED_REPLY, &[])).await.unwrap();
        assert_eq!(option_replies(s).await[0].0, REP_ACK);
        let mut q = Vec::new();
        q.put_u32(1);
        q.put_slice(b"v");
        q.put_u32(1);
        q.put_u32(15);
        q.put_slice(b"base:allocation");
        s.write_all(&opt(OPT_SET_META_CONTEXT, &q)).await.unwrap();
        let r = option_replies(s).await;
        assert_eq!(r.len(), 2);
    }
    go_v(s).await;
}

fn req(kind: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut v = Vec::new();
    RequestHeader { flags, kind, cookie, offset, length }.encode(&mut v);
    v
}

/// Reads one reply (simple, or one structured chunk) and its payload.
async fn reply<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
    read_len: Option<usize>,
) -> (ReplyHeader, Vec<u8>) {
    loop {
        if let Some(h) = decode_reply_header(buf).unwrap() {
            let n = match h {
                ReplyHeader::Simple { error: 0, .. } => read_len.unwrap_or(0),
                ReplyHeader::Simple { .. } => 0,
                ReplyHeader::Chunk { length, .. } => length as usize,
            };
            while buf.len() < n {
                assert!(s.read_buf(buf).await.unwrap() > 0, "EOF in payload");
            }
            return (h, buf.split_to(n).to_vec());
        }
        assert!(s.read_buf(buf).await.unwrap() > 0, "EOF");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_replies_pipelined_and_errors() {
    let r = start(false, None, tempfile::tempdir().unwrap()).await;
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    attach(&mut s, false).await;
    // 32 pipelined writes, then reads: replies may come in any order.
    let mut out = Vec::new();
    for i in 0..32u64 {
        out.extend(req(CMD_WRITE, if i % 2 == 0 { CMD_FLAG_FUA } else { 0 }, i, i * 4096, 4096));
        out.extend(vec![i as u8; 4096]);
    }
    s.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..32 {
        let (h, _) = reply(&mut s, &mut buf, None).await;
        let ReplyHeader::Simple { error: 0, cookie } = h else { panic!("{h:?}") };
        assert!(seen.insert(cookie));
    }
    for i in 0..32u64 {
        s.write_all(&req(CMD_READ, 0, 100 + i, i * 4096, 4096)).await.unwrap();
        let (h, data) = reply(&mut s, &mut buf, Some(4096)).await;
        assert_eq!(h, ReplyHeader::Simple { error: 0, cookie: 100 + i });
        assert!(data.iter().all(|b| *b == i as u8));
    }
    // Errors: the connection goes on after each.
    let cases: Vec<(Vec<u8>, u32)> = vec![
        (req(CMD_READ, 0, 1, 8 << 20, 1), errno::EINVAL),
        (req(99, 0, 2, 0, 0), errno::EINVAL),
        (req(CMD_READ, 1 << 7, 3, 0, 1), errno::EINVAL),
        ([req(CMD_WRITE, 0, 4, (8 << 20) - 1, 2), vec![0, 0]].concat(), errno::ENOSPC),
        (
            [req(CMD_WRITE, 0, 5, 0, MAX_PAYLOAD + 1), vec![7; MAX_PAYLOAD as usize + 1]].concat(),
            errno::EINVAL,
        ),
        (req(CMD_BLOCK_STATUS, 0, 6, 0, 4096), errno::EINVAL),
        (req(CMD_FLUSH, 0, 7, 0, 0), 0),
        (req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 8, 0, 8192), 0),
        (req(CMD_TRIM, CMD_FLAG_FUA, 9, 8192, 8192), 0),
        (req(CMD_CACHE, 0, 10, 0, 65536), 0),
    ];
    for (bytes, want) in cases {
        s.write_all(&bytes).await.unwrap();
        let (h, _) = reply(&mut s, &mut buf, None).await;
        let ReplyHeader::Simple { error, .. } = h else { panic!() };
        assert_eq!(error, want, "{h:?}");
    }
    s.write_all(&req(CMD_READ, 0, 11, 0, 4096)).await.unwrap();
    let (_, data) = reply(&mut s, &mut buf, Some(4096)).await;
    assert!(data.iter().all(|b| *b == 0));
    // DISC: the server closes after draining.
    s.write_all(&req(CMD_DISC, 0, 12, 0, 0)).await.unwrap();
    assert_eq!(s.read_buf(&mut buf).await.unwrap(), 0);
    let snap = r.stats.snapshot();
    assert_eq!((snap.writes, snap.flushes, snap.trims, snap.zeroes), (32, 1, 1, 1));
    assert_eq!(snap.errors, 6);
    assert_eq!(snap.bytes_written, 32 * 4096);
    // Garbage closes that connection only.
    let mut bad = TcpStream::connect(r.addr).await.unwrap();
    attach(&mut bad, false).await;
    bad.write_all(&[0xff; 28]).await.unwrap();
    assert_eq!(bad.read_buf(&mut BytesMut::with_capacity(64)).await.unwrap(), 0);
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_replies_and_block_status_over_unix() {
    let r = start(false, None, tempfile::tempdir().unwrap()).await;
    let mut s = UnixStream::connect(&r.unix).await.unwrap();
    attach(&mut s, true).await;
    let mut buf = BytesMut::new();
    let data = vec![0x5au8; 65536];
    s.write_all(&[req(CMD_WRITE, 0, 1, 1 << 20, 65536), data.clone()].concat()).await.unwrap();
    let (h, _) = reply(&mut s, &mut buf, None).await;
    assert_eq!(h, ReplyHeader::Simple { error: 0, cookie: 1 });
    s.write_all(&req(CMD_READ, 0, 2, 1 << 20, 65536)).await.unwrap();
    let (h, payload) = reply(&mut s, &mut buf, None).await;
    assert_eq!(
        h,
        ReplyHeader::Chunk {
            flags: REPLY_FLAG_DONE,
            kind: REPLY_TYPE_OFFSET_DATA,
            cookie: 2,
            length: 65544
        }
    );
    assert_eq!(&payload[..8], &(1u64 << 20).to_be_bytes());
    assert_eq!(&payload[8..], &data[..]);
    // Error as an ERROR chunk.
    s.write_all(&req(CMD_READ, 0, 3, 8 << 20, 1)).await.unwrap();
    let (h, payload) = reply(&mut s, &mut buf, None).await;
    let ReplyHeader::Chunk { kind: REPLY_TYPE_ERROR, .. } = h else { panic!("{h:?}") };
    assert_eq!(&payload[..4], &errno::EINVAL.to_be_bytes());
    // Block status: hole, data, hole.
    s.write_all(&req(CMD_BLOCK_STATUS, 0, 4, 0, 4 << 20)).await.unwrap();
    let (h, payload) = reply(&mut s, &mut buf, None).await;
    let ReplyHeader::Chunk { kind: REPLY_TYPE_BLOCK_STATUS, flags: REPLY_FLAG_DONE, .. } = h else {
        panic!("{h:?}")
    };
    let mut p = &payload[..];
    assert_eq!(p.get_u32(), 1, "context id");
    let mut descs = Vec::new();
    while p.has_remaining() {
        descs.push((p.get_u32(), p.get_u32()));
    }
    assert_eq!(descs[0], (1 << 20, STATE_HOLE | STATE_ZERO));
    assert_eq!(descs[1].1, 0);
    assert!(descs.iter().map(|d| u64::from(d.0)).sum::<u64>() <= 4 << 20);
    s.write_all(&req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 5, 0, 4 << 20)).await.unwrap();
    let (_, payload) = reply(&mut s, &mut buf, None).await;
    assert_eq!(payload.len(), 4 + 8);
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_export_refuses_writes() {
    let r = start(true, None, tempfile::tempdir().unwrap()).await;
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    attach(&mut s, false).await;
    let mut buf = BytesMut::new();
    s.write_all(&[req(CMD_WRITE, 0, 1, 0, 512), vec![1; 512]].concat()).await.unwrap();
    let (h, _) = reply(&mut s, &mut buf, None).await;
    assert_eq!(h, ReplyHeader::Simple { error: errno::EPERM, cookie: 1 });
    s.write_all(&req(CMD_READ, 0, 2, 0, 512)).await.unwrap();
    let (h, _) = reply(&mut s, &mut buf, Some(512)).await;
    assert_eq!(h, ReplyHeader::Simple { error: 0, cookie: 2 });
    stop(r).await;
}

async fn stop(mut r: Running) {
    let _ = r.stop.take().unwrap().send(());
    r.task.await.unwrap().unwrap();
}

fn certs(dir: &Path) -> (TlsConfig, rustls::RootCertStore) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let cfg = TlsConfig {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        client_ca: None,
        mode: TlsPolicy::Required,
    };
    (cfg, roots)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_required() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, roots) = certs(tmp.path());
    let r = start(false, Some((cfg, TlsPolicy::Required)), tmp).await;
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).await.unwrap();
    s.write_all(&1u32.to_be_bytes()).await.unwrap();
    // Before TLS: refused.
    s.write_all(&opt(OPT_LIST, &[])).await.unwrap();
    assert_eq!(option_replies(&mut s).await[0].0, REP_ERR_TLS_REQD);
    s.write_all(&opt(OPT_STARTTLS, &[])).await.unwrap();
    assert_eq!(option_replies(&mut s).await[0].0, REP_ACK);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, s).await.unwrap();
    go(&mut tls, true).await;
    let mut buf = BytesMut::new();
    tls.write_all(&[req(CMD_WRITE, 0, 1, 0, 4096), vec![9; 4096]].concat()).await.unwrap();
    let (h, _) = reply(&mut tls, &mut buf, None).await;
    assert_eq!(h, ReplyHeader::Simple { error: 0, cookie: 1 });
    tls.write_all(&req(CMD_READ, 0, 2, 0, 4096)).await.unwrap();
    let (_, payload) = reply(&mut tls, &mut buf, None).await;
    assert!(payload[8..].iter().all(|b| *b == 9));
    // A plain client that skips TLS and sends EXPORT_NAME is disconnected.
    let mut plain = TcpStream::connect(r.addr).await.unwrap();
    plain.read_exact(&mut greet).await.unwrap();
    plain.write_all(&1u32.to_be_bytes()).await.unwrap();
    plain.write_all(&opt(OPT_EXPORT_NAME, b"v")).await.unwrap();
    assert_eq!(plain.read_buf(&mut BytesMut::with_capacity(64)).await.unwrap(), 0);
    stop(r).await;
}

// ---- qemu:dirty-bitmap:NAME metadata contexts ----------------------------------------------

/// A temp dir holding volume "v" of `size` bytes (4 KiB blocks), for [`start`].
fn volume_of(size: u64) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    Volume::create(&tmp.path().join("vol"), size, 4096, Some("v")).unwrap();
    tmp
}

/// LIST or SET_META_CONTEXT on export "v": the (id, name) of each context replied.
async fn meta_context<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    queries: &[&str],
) -> Vec<(u32, String)> {
    let mut q = Vec::new();
    q.put_u32(1);
    q.put_slice(b"v");
    q.put_u32(queries.len() as u32);
    for query in queries {
        q.put_u32(query.len() as u32);
        q.put_slice(query.as_bytes());
    }
    s.write_all(&opt(option, &q)).await.unwrap();
    let mut replies = option_replies(s).await;
    let (last, _) = replies.pop().unwrap();
    assert_eq!(last, REP_ACK);
    replies
        .into_iter()
        .map(|(kind, data)| {
            assert_eq!(kind, REP_META_CONTEXT);
            let id = u32::from_be_bytes(data[..4].try_into().unwrap());
            (id, String::from_utf8(data[4..].to_vec()).unwrap())
        })
        .collect()
}

fn contexts(list: &[(u32, &str)]) -> Vec<(u32, String)> {
    list.iter().map(|(id, name)| (*id, name.to_string())).collect()
}

/// Greeting, flags and STRUCTURED_REPLY: ready for LIST/SET and GO.
async fn structured<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).await.unwrap();
    s.write_all(&3u32.to_be_bytes()).await.unwrap();
    s.write_all(&opt(OPT_STRUCTURED_REPLY, &[])).await.unwrap();
    assert_eq!(option_replies(s).await[0].0, REP_ACK);
}

async fn go_v<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    let mut g = Vec::new();
    g.put_u32(1);
    g.put_slice(b"v");
    g.put_u16(0);
    s.write_all(&opt(OPT_GO, &g)).await.unwrap();
    let r = option_replies(s).await;
    assert_eq!(r.last().unwrap().0, REP_ACK, "{r:?}");
}

/// Per context id, the (length, flags) descriptors of one BLOCK_STATUS; or the error chunk's
/// (errno, message).
type Status = Result<Vec<(u32, Vec<(u32, u32)>)>, (u32, String)>;

async fn block_status<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
    flags: u16,
    offset: u64,
    length: u32,
) -> Status {
    s.write_all(&req(CMD_BLOCK_STATUS, flags, 77, offset, length)).await.unwrap();
    let mut chunks = Vec::new();
    loop {
        let (h, payload) = reply(s, buf, None).await;
        let ReplyHeader::Chunk { flags, kind, cookie: 77, .. } = h else { panic!("{h:?}") };
        let mut p = &payload[..];
        match kind {
            REPLY_TYPE_BLOCK_STATUS => {
                let id = p.get_u32();
                let mut descs = Vec::new();
                while p.has_remaining() {
                    descs.push((p.get_u32(), p.get_u32()));
                }
                chunks.push((id, descs));
            }
            REPLY_TYPE_ERROR => {
                assert_ne!(flags & REPLY_FLAG_DONE, 0);
                let errno = p.get_u32();
                let len = p.get_u16() as usize;
                return Err((errno, String::from_utf8(p[..len].to_vec()).unwrap()));
            }
            _ => panic!("unexpected chunk {h:?}"),
        }
        if flags & REPLY_FLAG_DONE != 0 {
            return Ok(chunks);
        }
    }
}

/// The descriptors of context `id` in a successful status.
fn of(status: &Status, id: u32) -> Vec<(u32, u32)> {
    let chunks = status.as_ref().unwrap_or_else(|e| panic!("BLOCK_STATUS failed: {e:?}"));
    let mut found = chunks.iter().filter(|(i, _)| *i == id);
    let (_, descs) = found.next().unwrap_or_else(|| panic!("no chunk for context {id}"));
    assert!(found.next().is_none(), "one chunk per context");
    descs.clone()
}

/// Sends one request (with its payload) and expects a successful simple reply.
async fn ok<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, buf: &mut BytesMut, bytes: Vec<u8>) {
    s.write_all(&bytes).await.unwrap();
    let (h, _) = reply(s, buf, None).await;
    let ReplyHeader::Simple { error: 0, .. } = h else { panic!("{h:?}") };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_bitmap_contexts_listed_selected_and_answered() {
    const M: u64 = 1 << 20;
    let r = start(false, None, tempfile::tempdir().unwrap()).await;
    let tracker = r.tracker.clone().expect("change tracking is on by default");
    tracker.create("b1").unwrap();
    let mut s = TcpStream::connect(r.addr).await.unwrap();
    structured(&mut s).await;
    let all = contexts(&[(0, "base:allocation"), (0, "qemu:dirty-bitmap:b1")]);
    assert_eq!(meta_context(&mut s, OPT_LIST_META_CONTEXT, &[]).await, all);
    assert_eq!(meta_context(&mut s, OPT_LIST_META_CONTEXT, &["qemu:"]).await, all[1..]);
    // A bitmap created during the handshake is listed at once.
    tracker.create("b2").unwrap();
    let listed = meta_context(&mut s, OPT_LIST_META_CONTEXT, &["qemu:dirty-bitmap:"]).await;
    assert_eq!(listed, contexts(&[(0, "qemu:dirty-bitmap:b1"), (0, "qemu:dirty-bitmap:b2")]));
    assert_eq!(meta_context(&mut s, OPT_SET_META_CONTEXT, &["qemu:"]).await, vec![]);
    let q = ["qemu:dirty-bitmap:b1", "qemu:dirty-bitmap:nope", "base:allocation"];
    let selected = meta_context(&mut s, OPT_SET_META_CONTEXT, &q).await;
    assert_eq!(selected, contexts(&[(1, "base:allocation"), (2, "qemu:dirty-bitmap:b1")]));
    go_v(&mut s).await;

    let mut buf = BytesMut::new();
    let st = block_status(&mut s, &mut buf, 0, 0, 8 << 20).await;
    assert_eq!(of(&st, 2), vec![(8 << 20, 0)], "nothing written yet: all clean");
    ok(&mut s, &mut buf, [req(CMD_WRITE, 0, 1, 0, 4096), vec![1; 4096]].concat()).await;
    ok(&mut s, &mut buf, [req(CMD_WRITE, 0, 2, M, 8192), vec![2; 8192]].concat()).await;
    // One unaligned byte dirties its whole 4 KiB block.
    ok(&mut s, &mut buf, [req(CMD_WRITE, 0, 3, 3 * M + 100, 1), vec![3]].concat()).await;
    ok(&mut s, &mut buf, req(CMD_WRITE_ZEROES, 0, 4, 5 * M, 65536)).await;
    ok(&mut s, &mut buf, req(CMD_TRIM, 0, 5, 7 * M, 4096)).await;
    let st = block_status(&mut s, &mut buf, 0, 0, 8 << 20).await;
    let d = STATE_DIRTY;
    let want = vec![
        (4096, d),
        (M as u32 - 4096, 0),
        (8192, d),
        (2 * M as u32 - 8192, 0),
        (4096, d),
        (2 * M as u32 - 4096, 0),
        (65536, d),
        (2 * M as u32 - 65536, 0),
        (4096, d),
        (M as u32 - 4096, 0),
    ];
    assert_eq!(of(&st, 2), want);
    assert!(!of(&st, 1).is_empty(), "base:allocation is answered alongside");
    // REQ_ONE: one descriptor per context, within the request.
    let st = block_status(&mut s, &mut buf, CMD_FLAG_REQ_ONE, 4096, (8 << 20) - 4096).await;
    assert_eq!(of(&st, 2), vec![(M as u32 - 4096, 0)]);
    assert_eq!(of(&st, 1).len(), 1);
    // Ranges inside a block, and across a dirty/clean edge.
    let st = block_status(&mut s, &mut buf, 0, M + 4096, 100).await;
    assert_eq!(of(&st, 2), vec![(100, d)]);
    let st = block_status(&mut s, &mut buf, 0, M + 8192 - 10, 20).await;
    assert_eq!(of(&st, 2), vec![(10, d), (10, 0)]);
    // Bitmap b2 (not selected) saw the same writes; clearing b1 leaves b2 alone.
    assert_eq!(tracker.info("b2").unwrap().dirty_bytes, 3 * 4096 + 8192 + 65536);
    tracker.clear("b1").unwrap();
    let st = block_status(&mut s, &mut buf, 0, 0, 8 << 20).await;
    assert_eq!(of(&st, 2), vec![(8 << 20, 0)]);
    ok(&mut s, &mut buf, [req(CMD_WRITE, 0, 6, 6 * M, 512), vec![6; 512]].concat()).await;
    let st = block_status(&mut s, &mut buf, 0, 6 * M - 4096, 3 * 4096).await;
    assert_eq!(of(&st, 2), vec![(4096, 0), (4096, d), (4096, 0)]);
    // Removed while selected: an error, never "clean"; the connection goes on.
    tracker.remove("b1").unwrap();
    let st = block_status(&mut s, &mut buf, 0, 0, 4096).await;
    let (errno, msg) = st.unwrap_err();
    assert_eq!(errno, errno::EINVAL);
    assert!(msg.contains("\"b1\"") && msg.contains("removed"), "{msg}");
    // Created again under the same name: another bitmap, still an error on this connection.
    tracker.create("b1").unwrap();
    let (errno, _) = block_status(&mut s, &mut buf, 0, 0, 4096).await.unwrap_err();
    assert_eq!(errno, errno::EINVAL);
    tracker.remove("b1").unwrap();
    s.write_all(&req(CMD_READ, 0, 8, 6 * M, 512)).await.unwrap();
    let (_, payload) = reply(&mut s, &mut buf, None).await;
    assert!(payload[8..].iter().all(|b| *b == 6));
    // A new connection no longer sees b1.
    let mut s2 = TcpStream::connect(r.addr).await.unwrap();
    structured(&mut s2).await;
    let listed = meta_context(&mut s2, OPT_LIST_META_CONTEXT, &["qemu:"]).await;
    assert_eq!(listed, contexts(&[(0, "qemu:dirty-bitmap:b2")]));
    let q = ["qemu:dirty-bitmap:b1"];
    assert_eq!(meta_context(&mut s2, OPT_SET_META_CONTEXT, &q).await, vec![]);
    // A client idle in the handshake holds up shutdown until the drain timeout.
    drop((s, s2));
    stop(r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_bitmap_status_is_capped_at_max_descriptors() {
    const SIZE: u64 = 64 << 20;
    let r = start(false, None, volume_of(SIZE)).await;
    let tracker = r.tracker.clone().unwrap();
    tracker.create("b").unwrap();
    // Every other 4 KiB block dirty: 16384 runs, four times the cap.
    for block in (0..SIZE / 4096).step_by(2) {
        drop(tracker.begin_write(block * 4096, 4096).await.unwrap());
    }
    let mut s = UnixStream::connect(&r.unix).await.unwrap();
    structured(&mut s).await;
    let selected = meta_context(&mut s, OPT_SET_META_CONTEXT, &["qemu:dirty-bitmap:b"]).await;
    assert_eq!(selected, contexts(&[(1, "qemu:dirty-bitmap:b")]));
    go_v(&mut s).await;
    let mut buf = BytesMut::new();
    let st = block_status(&mut s, &mut buf, 0, 0, SIZE as u32).await;
    let descs = of(&st, 1);
    assert_eq!(descs.len(), 4096, "the answer stops at the cap; the client asks again");
    for (i, d) in descs.iter().enumerate() {
        assert_eq!(*d, (4096, if i % 2 == 0 { STATE_DIRTY } else { 0 }));
    }
    // Asking again from where the answer stopped goes on from there.
    let st = block_status(&mut s, &mut buf, 0, 16 << 20, 4 * 4096).await;
    assert_eq!(of(&st, 1), vec![(4096, STATE_DIRTY), (4096, 0), (4096, STATE_DIRTY), (4096, 0)]);
    let st = block_status(&mut s, &mut buf, CMD_FLAG_REQ_ONE, 4096, SIZE as u32 - 4096).await;
    assert_eq!(of(&st, 1), vec![(4096, 0)]);
    stop(r).await;
}

// ---- real clients: qemu-io writes, nbdinfo and qemu-img read the bitmaps -------------------

/// Runs an installed client off the runtime's threads (they serve the connection), with a time
/// limit. `.ci/run` installs qemu-utils and libnbd-bin: a missing tool fails the test.
/// `Ok(stdout)` on success, `Err(stderr)` when the tool exits with an error.
async fn run_tool(args: Vec<String>) -> Result<String, String> {
    let shown = args.join(" ");
    tokio::task::spawn_blocking(move || {
        let mut child = std::process::Command::new(&args[0])
            .args(&args[1..])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {} ({e}): .ci/run installs it", args[0]));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("{shown}: still running after 60 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            assert!(out.status.code().is_some(), "{shown} died by a signal: {stderr}");
            Err(stderr)
        }
    })
    .await
    .unwrap()
}

async fn run_ok(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let shown = args.join(" ");
    run_tool(args).await.unwrap_or_else(|e| panic!("{shown} failed: {e}"))
}

/// Alternating (offset, length, dirty) runs covering `size` bytes with `dirty` extents dirty.
fn runs(size: u64, dirty: &[(u64, u64)]) -> Vec<(u64, u64, bool)> {
    let mut marks: Vec<(u64, u64)> = dirty.to_vec();
    marks.sort();
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    let mut push = |offset: u64, len: u64, d: bool| match out.last_mut() {
        Some(last) if last.2 == d => last.1 += len,
        _ if len > 0 => out.push((offset, len, d)),
        _ => {}
    };
    let mut at = 0;
    for (offset, len) in marks {
        push(at, offset - at, false);
        push(offset, len, true);
        at = offset + len;
    }
    push(at, size - at, false);
    out
}

/// `nbdinfo --map=qemu:dirty-bitmap:NAME`: "offset length type description" lines as
/// (offset, length, dirty), checking that type and description agree.
async fn nbdinfo_map(uri: &str, bitmap: &str) -> Vec<(u64, u64, bool)> {
    let out = run_ok(&["nbdinfo", &format!("--map=qemu:dirty-bitmap:{bitmap}"), uri]).await;
    eprintln!("nbdinfo --map=qemu:dirty-bitmap:{bitmap} {uri}\n{out}");
    out.lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(f.len(), 4, "{line:?}");
            let dirty = match (f[2], f[3]) {
                ("1", "dirty") => true,
                ("0", "clean") => false,
                _ => panic!("unexpected type in {line:?}"),
            };
            (f[0].parse().unwrap(), f[1].parse().unwrap(), dirty)
        })
        .collect()
}

/// `qemu-img map --output=json` through qemu's NBD client with `x-dirty-bitmap`: qemu reads
/// the bitmap's flags as if they were base:allocation's, so a dirty extent (bit 0, which is
/// NBD_STATE_HOLE there) comes out as `"data": false` and a clean one as `"data": true`
/// (qemu's iotest 223). As (offset, length, dirty).
async fn qemu_img_map(port: u16, bitmap: &str) -> Vec<(u64, u64, bool)> {
    let opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=v,\
         x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}"
    );
    let out = run_ok(&["qemu-img", "map", "--output=json", "--image-opts", &opts]).await;
    eprintln!("qemu-img map --output=json --image-opts {opts}\n{out}");
    let map: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    map.iter()
        .map(|e| {
            assert_eq!(e["zero"], false, "{e}");
            let data = e["data"].as_bool().unwrap();
            // qemu 10 also prints "present", false exactly where "data" is.
            assert_eq!(e["present"], data, "{e}");
            (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap(), !data)
        })
        .collect()
}

/// The metadata contexts `nbdinfo --json` lists for the export (libnbd LISTs with no query).
async fn nbdinfo_contexts(uri: &str) -> Vec<String> {
    let out = run_ok(&["nbdinfo", "--json", uri]).await;
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    let contexts = info["exports"][0]["contexts"].as_array().unwrap_or_else(|| panic!("{out}"));
    contexts.iter().map(|c| c.as_str().unwrap().to_string()).collect()
}

async fn qemu_io_writes(uri: &str, writes: &[&str]) {
    let mut args = vec!["qemu-io", "-f", "raw"];
    for w in writes {
        args.extend(["-c", w]);
    }
    args.push(uri);
    run_ok(&args).await;
}

/// The acceptance test of issue 3 item 4: incremental-backup tools read blockferry's bitmaps
/// as they read qemu-nbd's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_bitmaps_with_real_clients() {
    const M: u64 = 1 << 20;
    const SIZE: u64 = 16 * M;
    let r = start(false, None, volume_of(SIZE)).await;
    let tracker = r.tracker.clone().unwrap();
    let port = r.addr.port();
    let uri = format!("nbd://127.0.0.1:{port}/v");
    assert_eq!(nbdinfo_contexts(&uri).await, ["base:allocation"]);
    tracker.create("b1").unwrap();
    assert_eq!(nbdinfo_contexts(&uri).await, ["base:allocation", "qemu:dirty-bitmap:b1"]);

    qemu_io_writes(&uri, &["write -P 1 0 64k", "write -P 2 1M 4k", "write -P 3 10M 1M"]).await;
    let first = [(0, 64 << 10), (M, 4096), (10 * M, M)];
    assert_eq!(nbdinfo_map(&uri, "b1").await, runs(SIZE, &first));
    assert_eq!(qemu_img_map(port, "b1").await, runs(SIZE, &first));

    // A bitmap created now sees only the writes after it; b1 sees both rounds (the second
    // extends its 10M..11M extent).
    tracker.create("b2").unwrap();
    let contexts = ["base:allocation", "qemu:dirty-bitmap:b1", "qemu:dirty-bitmap:b2"];
    assert_eq!(nbdinfo_contexts(&uri).await, contexts);
    qemu_io_writes(&uri, &["write -P 4 2M 8k", "write -P 5 11M 4k"]).await;
    let second = [(2 * M, 8192), (11 * M, 4096)];
    let both = [(0, 64 << 10), (M, 4096), (2 * M, 8192), (10 * M, M + 4096)];
    assert_eq!(nbdinfo_map(&uri, "b1").await, runs(SIZE, &both));
    assert_eq!(qemu_img_map(port, "b1").await, runs(SIZE, &both));
    assert_eq!(nbdinfo_map(&uri, "b2").await, runs(SIZE, &second));
    assert_eq!(qemu_img_map(port, "b2").await, runs(SIZE, &second));

    // Cleared: nothing dirty in b1, b2 unchanged.
    tracker.clear("b1").unwrap();
    assert_eq!(nbdinfo_map(&uri, "b1").await, [(0, SIZE, false)]);
    assert_eq!(qemu_img_map(port, "b1").await, [(0, SIZE, false)]);
    assert_eq!(nbdinfo_map(&uri, "b2").await, runs(SIZE, &second));

    // A bitmap that does not exist is not a context: nbdinfo refuses to map it.
    let args = ["nbdinfo", "--map=qemu:dirty-bitmap:nope", &uri].map(String::from).to_vec();
    let err = run_tool(args).await.expect_err("mapping a missing bitmap fails");
    eprintln!("nbdinfo --map=qemu:dirty-bitmap:nope: {err}");
    let opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=v,\
         x-dirty-bitmap=qemu:dirty-bitmap:nope"
    );
    let args = ["qemu-img", "map", "--output=json", "--image-opts", &opts];
    let err = run_tool(args.map(String::from).to_vec()).await.expect_err("qemu-img refuses it");
    eprintln!("qemu-img map ... x-dirty-bitmap=qemu:dirty-bitmap:nope: {err}");
    tracker.remove("b2").unwrap();
    assert_eq!(nbdinfo_contexts(&uri).await, ["base:allocation", "qemu:dirty-bitmap:b1"]);
    stop(r).await;
}
