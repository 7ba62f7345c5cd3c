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
        volumes: vec![vc],
    };
    if let Some((t, mode)) = tls {
        config.tls = Some(TlsConfig { mode, ..t });
    }
    let server = Server::bind(&config).await.unwrap();
    let addr = server.local_addr().unwrap();
    let stats = server.stats("v").unwrap();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    Running { addr, unix, stats, stop: Some(tx), task, _tmp: tmp }
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
    let mut g = Vec::new();
    g.put_u32(1);
    g.put_slice(b"v");
    g.put_u16(0);
    s.write_all(&opt(OPT_GO, &g)).await.unwrap();
    let r = option_replies(s).await;
    assert_eq!(r.last().unwrap().0, REP_ACK, "{r:?}");
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
