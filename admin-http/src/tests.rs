use std::os::unix::fs::PermissionsExt;

use hyper::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

use super::*;

const AGENT: Daemon = Daemon { name: "agent", in_use_also: "" };
const TARGET: Daemon = Daemon { name: "target", in_use_also: " (or --no-admin)" };

/// A raw `GET path` with `Connection: close`: (status, body); status 0 if the connection was
/// closed without an answer.
async fn get(sock: &Path, path: &str) -> (u16, String) {
    let mut s = UnixStream::connect(sock).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n @ 1..) = s.read(&mut chunk).await {
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, body.to_string())
}

/// Echoes the path with 200; `/panic` panics in the handler.
async fn echo(req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    assert_ne!(path, "/panic", "a handler panics");
    let mut resp = Response::new(Full::new(Bytes::from(path)));
    *resp.status_mut() = StatusCode::OK;
    resp
}

#[tokio::test]
async fn serves_the_handler_on_a_private_socket_until_shutdown() {
    let tmp = tempfile::tempdir().unwrap();
    // A directory that does not exist yet: bind creates it.
    let sock = tmp.path().join("run/blockferry/admin.sock");
    let socket = AdminSocket::bind(&sock, AGENT).unwrap();
    assert_eq!(socket.path(), sock);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "admin socket mode {mode:o}");
    let dir_mode = std::fs::metadata(sock.parent().unwrap()).unwrap().permissions().mode();
    assert_eq!(dir_mode & 0o022, 0, "directory mode {dir_mode:o}");

    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(socket.serve(echo, async {
        let _ = rx.await;
    }));
    assert_eq!(get(&sock, "/v1/status").await, (200, "/v1/status".to_string()));
    // A panic ends that connection only.
    assert_eq!(get(&sock, "/panic").await.0, 0);
    let _idle = UnixStream::connect(&sock).await.unwrap();
    assert_eq!(get(&sock, "/again").await, (200, "/again".to_string()));

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
    assert!(!sock.exists(), "the socket file is left after shutdown");
}

#[tokio::test]
async fn bind_replaces_only_a_stale_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("admin.sock");
    // A regular file is never replaced.
    std::fs::write(&path, b"precious").unwrap();
    let e = AdminSocket::bind(&path, AGENT).unwrap_err();
    assert!(matches!(e, AdminError::NotASocket { .. }), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    std::fs::remove_file(&path).unwrap();
    // A live socket is not stolen.
    let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let e = AdminSocket::bind(&path, TARGET).unwrap_err();
    assert!(matches!(e, AdminError::InUse { .. }), "{e}");
    // Once its listener is gone, the socket is stale and replaced.
    drop(live);
    let socket = AdminSocket::bind(&path, AGENT).unwrap();
    let names: Vec<_> =
        std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("admin.sock")], "a temporary name is left");
    drop(socket);
    assert!(!path.exists(), "dropping an unstarted AdminSocket leaves its socket");
}

#[tokio::test]
async fn a_socket_replaced_by_another_process_is_not_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("admin.sock");
    let socket = AdminSocket::bind(&path, AGENT).unwrap();
    // Another daemon (after deciding this one's socket was stale) put its own in place.
    std::fs::remove_file(&path).unwrap();
    let _other = std::os::unix::net::UnixListener::bind(&path).unwrap();
    drop(socket);
    assert!(path.exists(), "dropping removed another process's socket");
}

#[test]
fn in_use_names_the_daemon() {
    let path = PathBuf::from("/run/blockferry/x.sock");
    let e = AdminError::InUse { path: path.clone(), daemon: AGENT };
    assert_eq!(
        e.to_string(),
        "admin socket /run/blockferry/x.sock is in use by a running process (another agent?): \
         stop it, or give this agent another --admin path"
    );
    let e = AdminError::InUse { path, daemon: TARGET };
    assert_eq!(
        e.to_string(),
        "admin socket /run/blockferry/x.sock is in use by a running process (another target?): \
         stop it, or give this target another --admin path (or --no-admin)"
    );
}
