//! QUIC transport between the blockferry agent (client) and target (server), secured by mutual
//! TLS 1.3 where each side trusts the other by the SHA-256 fingerprint of its certificate.
//!
//! Trust model (no CA, SSH-like): every node has a self-signed [`Identity`] made by
//! `blockferry keygen`. The agent pins the target's [`Fingerprint`]; the target keeps an
//! [`AllowList`] of agent fingerprints. Names and expiry dates in the certificates are ignored:
//! the pin is the whole statement of trust. The TLS 1.3 handshake signatures are still verified,
//! so a peer must hold the private key of the pinned certificate, not just a copy of it.
//!
//! ```text
//! agent                                   target
//! client_config(id, pinned target fp) --> server_config(id, allow list of agent fps)
//!   checks server cert fp == pin            requires a client cert, fp in allow list
//! ```
#![forbid(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

mod fingerprint;
mod identity;
mod tls;

pub use fingerprint::{Fingerprint, ParseFingerprintError};
pub use identity::{Identity, CERT_FILE, KEY_FILE};
pub use tls::{
    client_config, client_config_with, peer_fingerprint, server_config, server_config_with,
    AllowList, TransportTuning, DEFAULT_MAX_UDP_PAYLOAD,
};

/// The quinn these configurations are built for, so users name the same version.
pub use quinn;

/// ALPN of the replication protocol. A peer that offers anything else fails the handshake.
pub const ALPN: &[u8] = b"blockferry/1";

/// The TLS server name the agent sends and the subject alternative name of every generated
/// certificate. It carries no trust (the fingerprint pin does); it only has to be a valid DNS name.
pub const SERVER_NAME: &str = "blockferry";

/// Errors of this crate: setting up identities, TLS and QUIC configuration.
///
/// Handshake failures (wrong pin, agent not allowed) are not here: they happen inside quinn and
/// surface as a `quinn::ConnectionError` whose text carries the messages of the verifiers.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// An identity file is missing.
    #[error("no {file} in {}: run `blockferry keygen --dir {}` to create a key pair", dir.display(), dir.display())]
    MissingIdentity { dir: PathBuf, file: &'static str },
    /// Reading or writing an identity file (or its directory) failed.
    #[error("{what} {}: {source}", path.display())]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    /// An identity file exists but holds no usable PEM section.
    #[error("cannot read {}: {source}; recreate it with `blockferry keygen --dir {} --force`", path.display(), path.parent().map(|p| p.display().to_string()).unwrap_or_default())]
    BadPem { path: PathBuf, source: rustls_pki_types::pem::Error },
    /// Generating a key pair or a certificate failed.
    #[error("cannot generate a key pair and certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration (e.g. the key does not match the certificate).
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// rustls config unusable for QUIC (no TLS 1.3 AES-128-GCM suite).
    #[error("TLS configuration unusable for QUIC: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// A transport tuning value is out of the range QUIC can express.
    #[error("transport setting {setting} = {value} is out of range")]
    Tuning { setting: &'static str, value: String },
}

/// A QUIC endpoint for the agent side, bound to `bind` (use `0.0.0.0:0` or `[::]:0` for any).
/// Connect with `endpoint.connect_with(client_config(..)?, target_addr, SERVER_NAME)`.
pub fn client_endpoint(bind: SocketAddr) -> io::Result<quinn::Endpoint> {
    let socket = udp_socket(bind)?;
    let runtime = Arc::new(quinn::TokioRuntime);
    quinn::Endpoint::new(endpoint_config(), None, socket, runtime)
}

/// A QUIC endpoint for the target side listening on `addr` (port 0: any free port, see
/// `endpoint.local_addr()`).
pub fn server_endpoint(cfg: quinn::ServerConfig, addr: SocketAddr) -> io::Result<quinn::Endpoint> {
    let socket = udp_socket(addr)?;
    let runtime = Arc::new(quinn::TokioRuntime);
    quinn::Endpoint::new(endpoint_config(), Some(cfg), socket, runtime)
}

/// Socket buffer asked for on both ends (the kernel caps it at `net.core.rmem_max` /
/// `wmem_max`). Linux's default, 208 KiB, holds under 2 ms of a Gbit/s stream: a receiver
/// that is not scheduled for that long (a busy host) drops datagrams, and QUIC takes every drop
/// as congestion and as a hint of a path MTU black hole.
pub const SOCKET_BUFFER: usize = 8 << 20;

/// A UDP socket bound to `addr` with [`SOCKET_BUFFER`]-sized buffers (best effort).
fn udp_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&socket, SOCKET_BUFFER);
    let _ = rustix::net::sockopt::set_socket_send_buffer_size(&socket, SOCKET_BUFFER);
    Ok(socket)
}

/// The largest UDP payload an endpoint accepts (advertised to the peer; what is sent is bounded
/// by [`TransportTuning::max_udp_payload`]): the most IPv6 allows.
pub const MAX_UDP_PAYLOAD: u16 = 65527;

/// Endpoint settings: receive datagrams up to [`MAX_UDP_PAYLOAD`] (quinn's default, 1472,
/// would cap every path at Ethernet's MTU whatever discovery finds).
fn endpoint_config() -> quinn::EndpointConfig {
    let mut cfg = quinn::EndpointConfig::default();
    // Cannot fail: 65527 is within QUIC's range (1200..=65527).
    let _ = cfg.max_udp_payload_size(MAX_UDP_PAYLOAD);
    cfg
}

#[cfg(test)]
mod tests;
