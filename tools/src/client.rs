//! A connection-per-request HTTP + JSON client of an admin socket (the agent's or the
//! target's), shared by `blockferry cbt`, `status` and `verify`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// How long the CLI waits for an answer by default.
pub const TIMEOUT: Duration = Duration::from_secs(120);
/// The largest answer read (an extents list of a large, fragmented volume can be long).
const MAX_ANSWER: usize = 1 << 30;

/// A connection-per-request client of an admin socket.
#[derive(Debug)]
pub struct Client {
    pub socket: PathBuf,
    /// Who serves the socket, for messages: `agent`, `target`, or `daemon` when unknown.
    pub daemon: &'static str,
    /// How long one request may take, connection to last byte of the answer.
    pub timeout: Duration,
}

impl Client {
    pub fn new(socket: PathBuf, daemon: &'static str) -> Client {
        Client { socket, daemon, timeout: TIMEOUT }
    }

    /// Sends one request; on a 2xx answer returns its JSON body (`Null` when empty), otherwise
    /// fails with the daemon's message.
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value> {
        let sock = self.socket.display();
        let daemon = self.daemon;
        let stream = tokio::net::UnixStream::connect(&self.socket).await.map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
                format!(
                    "the socket is private (mode 0600) to the {daemon}'s user: run as that user"
                )
            } else if daemon == "daemon" {
                format!(
                    "is `blockferry agent --admin {sock}` or `blockferry target --admin {sock}` \
                     running?"
                )
            } else {
                format!("is `blockferry {daemon} --admin {sock}` running?")
            };
            anyhow!("cannot reach the {daemon}'s admin socket {sock}: {e} ({hint})")
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .with_context(|| format!("HTTP handshake on the admin socket {sock}"))?;
        let driver = tokio::spawn(conn);
        let mut req = Request::builder().method(method.clone()).uri(path).header(HOST, "admin");
        let payload = match body {
            Some(v) => {
                req = req.header(CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(&v)?)
            }
            None => Bytes::new(),
        };
        let req = req.body(Full::new(payload)).context("building the request")?;
        let exchange = async {
            let resp = sender.send_request(req).await?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| anyhow!("{e}"))?
                .to_bytes();
            anyhow::Ok((status, body))
        };
        let limit = self.timeout;
        let (status, body) = tokio::time::timeout(limit, exchange)
            .await
            .map_err(|_| anyhow!("the {daemon} did not answer {method} {path} within {limit:?}"))?
            .with_context(|| format!("{method} {path} on the admin socket {sock}"))?;
        driver.abort();
        let json: Option<Value> = serde_json::from_slice(&body).ok();
        if !status.is_success() {
            match json.as_ref().and_then(|v| v.get("error")).and_then(Value::as_str) {
                Some(message) => bail!("{message}"),
                None => bail!(
                    "the {daemon} answered {status} to {method} {path}: {}",
                    String::from_utf8_lossy(&body).trim()
                ),
            }
        }
        if body.is_empty() || status == StatusCode::NO_CONTENT {
            return Ok(Value::Null);
        }
        json.ok_or_else(|| anyhow!("the {daemon}'s answer to {method} {path} is not JSON"))
    }
}

/// A JSON answer, pretty-printed on stdout.
pub fn print_json(v: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub fn u64_field(v: &Value, key: &str) -> Result<u64> {
    v.get(key).and_then(Value::as_u64).ok_or_else(|| anyhow!("the answer has no number {key}"))
}

pub fn str_field<'a>(v: &'a Value, key: &str) -> Result<&'a str> {
    v.get(key).and_then(Value::as_str).ok_or_else(|| anyhow!("the answer has no string {key}"))
}

/// A small single-threaded runtime for one CLI command.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}
