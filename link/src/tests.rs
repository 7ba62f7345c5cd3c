//! Loopback tests of the mutual-TLS QUIC link: real sockets on 127.0.0.1, real handshakes.

use std::net::SocketAddr;
use std::str::FromStr;

use super::*;

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A target on loopback that allows `allowed`; accepts connections and echoes every bidi stream.
/// Returns its address and a channel carrying, for each accepted connection, the outcome of
/// the handshake (the agent's fingerprint, or the error text).
fn spawn_target(
    target: &Identity,
    allowed: AllowList,
) -> (SocketAddr, quinn::Endpoint, tokio::sync::mpsc::UnboundedReceiver<Result<Fingerprint, String>>)
{
    let cfg = server_config(target, allowed).unwrap();
    let endpoint = server_endpoint(cfg, localhost()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let ep = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let conn = match incoming.await {
                    Ok(conn) => conn,
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = tx.send(peer_fingerprint(&conn).ok_or_else(|| "no peer identity".into()));
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        let data = recv.read_to_end(1 << 20).await.unwrap();
                        send.write_all(&data).await.unwrap();
                        send.finish().unwrap();
                        let _ = send.stopped().await;
                    });
                }
            });
        }
    });
    (addr, endpoint, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_the_right_certificates_echoes() {
    let target = Identity::generate("target").unwrap();
    let agent = Identity::generate("agent").unwrap();
    let (addr, _server, mut accepted) =
        spawn_target(&target, [agent.fingerprint()].into_iter().collect());

    let client = client_endpoint(localhost()).unwrap();
    let cfg = client_config(&agent, target.fingerprint()).unwrap();
    let conn = client.connect_with(cfg, addr, SERVER_NAME).unwrap().await.unwrap();
    assert_eq!(peer_fingerprint(&conn), Some(target.fingerprint()));
    assert_eq!(
        conn.handshake_data()
            .unwrap()
            .downcast::<quinn::crypto::rustls::HandshakeData>()
            .unwrap()
            .protocol
            .as_deref(),
        Some(ALPN)
    );

    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
    send.write_all(&payload).await.unwrap();
    send.finish().unwrap();
    let echoed = recv.read_to_end(1 << 20).await.unwrap();
    assert_eq!(echoed, payload);

    let seen = accepted.recv().await.unwrap();
    assert_eq!(seen, Ok(agent.fingerprint()));
    conn.close(0u32.into(), b"done");
    client.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_pin_fails_naming_both_fingerprints() {
    let target = Identity::generate("target").unwrap();
    let agent = Identity::generate("agent").unwrap();
    let impostor = Identity::generate("someone else").unwrap();
    let (addr, _server, mut accepted) =
        spawn_target(&target, [agent.fingerprint()].into_iter().collect());

    let client = client_endpoint(localhost()).unwrap();
    let cfg = client_config(&agent, impostor.fingerprint()).unwrap();
    let err = client.connect_with(cfg, addr, SERVER_NAME).unwrap().await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("does not match"), "{text}");
    assert!(text.contains(&target.fingerprint().to_string()), "{text}");
    assert!(text.contains(&impostor.fingerprint().to_string()), "{text}");
    // The agent aborts with a bad_certificate-class alert; the target sees a closed handshake.
    let seen = accepted.recv().await.unwrap();
    assert!(seen.is_err(), "{seen:?}");
}

/// What really happens when the target does not allow the agent (observed on loopback): in
/// TLS 1.3 the client's handshake completes before the server has checked the client
/// certificate, so on the agent side `connect` succeeds, and the refusal arrives one round trip
/// later as a CONNECTION_CLOSE with TLS alert 46 (certificate_unknown) whose reason carries the
/// target's message: the first read fails with "connection lost / aborted by peer: the
/// cryptographic handshake failed: error 46: invalid peer certificate: Other(OtherError(agent
/// certificate sha256:… is not in the target's allow list))". The test also accepts a failing
/// `connect`, which a slow agent could see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_not_in_the_allow_list_is_refused() {
    let target = Identity::generate("target").unwrap();
    let agent = Identity::generate("agent").unwrap();
    let other = Identity::generate("other agent").unwrap();
    let (addr, _server, mut accepted) =
        spawn_target(&target, [other.fingerprint()].into_iter().collect());

    let client = client_endpoint(localhost()).unwrap();
    let cfg = client_config(&agent, target.fingerprint()).unwrap();
    let text = match client.connect_with(cfg, addr, SERVER_NAME).unwrap().await {
        Err(e) => format!("connect: {e}"),
        Ok(conn) => {
            let e = match conn.open_bi().await {
                Ok((mut send, mut recv)) => {
                    let _ = send.write_all(b"hello").await;
                    let _ = send.finish();
                    recv.read_to_end(1024).await.unwrap_err().to_string()
                }
                Err(e) => e.to_string(),
            };
            format!(
                "after connect: {e} / {}",
                conn.close_reason().map(|r| r.to_string()).unwrap_or_default()
            )
        }
    };
    eprintln!("agent side: {text}");
    assert!(text.contains("allow list"), "{text}");
    assert!(text.contains(&agent.fingerprint().to_string()), "{text}");

    let seen = accepted.recv().await.unwrap().unwrap_err();
    eprintln!("target side: {seen}");
    assert!(seen.contains("is not in the target's allow list"), "{seen}");
}

#[test]
fn fingerprint_display_and_parse_round_trip() {
    let fp = Fingerprint::of_der(b"some certificate");
    let text = fp.to_string();
    assert!(text.starts_with("sha256:"));
    assert_eq!(text.len(), 7 + 64);
    assert_eq!(text, text.to_lowercase());
    assert_eq!(Fingerprint::from_str(&text).unwrap(), fp);

    let bare = &text[7..];
    assert_eq!(bare.parse::<Fingerprint>().unwrap(), fp);
    assert_eq!(bare.to_uppercase().parse::<Fingerprint>().unwrap(), fp);
    let colons: Vec<String> = fp.0.iter().map(|b| format!("{b:02X}")).collect();
    assert_eq!(colons.join(":").parse::<Fingerprint>().unwrap(), fp);
    assert_eq!(format!("SHA256:{}", colons.join(":")).parse::<Fingerprint>().unwrap(), fp);
    assert_eq!(format!("  {text}\n").parse::<Fingerprint>().unwrap(), fp);

    // Serde: the same string.
    let json = serde_json::to_string(&fp).unwrap();
    assert_eq!(json, format!("\"{text}\""));
    assert_eq!(serde_json::from_str::<Fingerprint>(&json).unwrap(), fp);
    assert!(serde_json::from_str::<Fingerprint>("\"sha256:00\"").is_err());

    // sha256 of the empty string, a known vector.
    assert_eq!(
        Fingerprint::of_der(b"").to_string(),
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
}

#[test]
fn fingerprint_bad_input() {
    use ParseFingerprintError::*;
    let short = "sha256:abcd";
    assert!(matches!(short.parse::<Fingerprint>(), Err(Length { digits: 4, .. })));
    let long = format!("sha256:{}", "a".repeat(66));
    assert!(matches!(long.parse::<Fingerprint>(), Err(Length { digits: 66, .. })));
    let bad = format!("sha256:{}g", "a".repeat(63));
    let err = bad.parse::<Fingerprint>().unwrap_err();
    assert_eq!(err, Character { input: bad.clone(), found: 'g', offset: 70 });
    assert!(err.to_string().contains("expected a hex digit"), "{err}");
    let md5 = format!("md5:{}", "a".repeat(32));
    assert!(matches!(md5.parse::<Fingerprint>(), Err(Algorithm { .. })));
    assert!(matches!("".parse::<Fingerprint>(), Err(Length { digits: 0, .. })));
}

#[test]
fn identity_save_and_load() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("keys");

    let err = Identity::load(&dir).unwrap_err().to_string();
    assert!(err.contains("blockferry keygen --dir"), "{err}");
    assert!(err.contains("key.pem"), "{err}");

    let id = Identity::generate("node-1").unwrap();
    id.save(&dir).unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
    let back = Identity::load(&dir).unwrap();
    assert_eq!(back.fingerprint(), id.fingerprint());
    assert_eq!(back.cert_der(), id.cert_der());
    assert_eq!(back.key_der().secret_der(), id.key_der().secret_der());
    // The reloaded identity is usable by rustls (key matches certificate).
    server_config(&back, AllowList::new()).unwrap();
    client_config(&back, id.fingerprint()).unwrap();

    std::fs::write(dir.join(CERT_FILE), "not pem").unwrap();
    let err = Identity::load(&dir).unwrap_err();
    assert!(matches!(err, LinkError::BadPem { .. }), "{err}");
    std::fs::remove_file(dir.join(CERT_FILE)).unwrap();
    let err = Identity::load(&dir).unwrap_err().to_string();
    assert!(err.contains("no cert.pem"), "{err}");
}

/// Path MTU discovery runs up to [`DEFAULT_MAX_UDP_PAYLOAD`]: on loopback (MTU 65536) the link
/// ends up with packets that carry a 4 KiB write whole, not in four.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_discovers_a_large_mtu() {
    let target = Identity::generate("target").unwrap();
    let agent = Identity::generate("agent").unwrap();
    let (addr, _server, _accepted) =
        spawn_target(&target, [agent.fingerprint()].into_iter().collect());
    let client = client_endpoint(localhost()).unwrap();
    let cfg = client_config(&agent, target.fingerprint()).unwrap();
    let conn = client.connect_with(cfg, addr, SERVER_NAME).unwrap().await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let want = DEFAULT_MAX_UDP_PAYLOAD - 20; // discovery stops within 20 bytes of the bound
    while conn.stats().path.current_mtu < want && std::time::Instant::now() < deadline {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&[7u8; 100_000]).await.unwrap();
        send.finish().unwrap();
        recv.read_to_end(1 << 20).await.unwrap();
    }
    let mtu = conn.stats().path.current_mtu;
    assert!(mtu >= want && mtu <= DEFAULT_MAX_UDP_PAYLOAD, "path MTU is {mtu}");
}
