//! rustls configuration for both ends: certificate verifiers that trust by fingerprint, and the
//! QUIC transport settings.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};

use crate::{Fingerprint, Identity, LinkError, ALPN};

/// QUIC transport settings shared by both ends.
///
/// The defaults suit bulk replication on a 100 Mbit/s x 40 ms link (bandwidth-delay product
/// 500 KB) with plenty of headroom for loss recovery, and keep loopback (where the product is
/// tiny but the rate is Gbit/s) from being window-limited: a stream may have 16 MiB in flight,
/// a connection 64 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportTuning {
    /// PING interval that keeps an idle connection (and NAT bindings) alive.
    pub keep_alive: Duration,
    /// A connection with no packets from the peer for this long is closed.
    pub idle_timeout: Duration,
    /// Bytes one stream may receive ahead of the application reading them.
    pub stream_receive_window: u32,
    /// Bytes all streams together may receive ahead of the application.
    pub receive_window: u32,
    /// Bytes this end may have sent and not yet acknowledged.
    pub send_window: u64,
    /// Largest UDP payload path MTU discovery searches up to. QUIC starts at 1200 bytes and
    /// probes upwards; probes that a path cannot carry are lost and cost nothing else, so a
    /// bound above Ethernet's is safe on any path and lets loopback and jumbo-frame links use
    /// larger packets: a 4 KiB write then costs about one packet instead of four (each is a
    /// decryption, an acknowledgement entry and a pass through the receive path).
    /// Default [`DEFAULT_MAX_UDP_PAYLOAD`].
    pub max_udp_payload: u16,
}

/// Default bound of path MTU discovery. Not higher because quinn sends up to 10 datagrams in
/// one UDP segmentation-offload (GSO) write and Linux refuses a GSO write over 64 KiB: with a
/// path MTU above about 6,500 bytes every such write failed, quinn counted the packets lost,
/// and its black-hole detection fell back to 1,200 bytes for a minute (seen on loopback).
pub const DEFAULT_MAX_UDP_PAYLOAD: u16 = 6000;

impl Default for TransportTuning {
    fn default() -> Self {
        TransportTuning {
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(10),
            stream_receive_window: 16 << 20,
            receive_window: 64 << 20,
            send_window: 64 << 20,
            max_udp_payload: DEFAULT_MAX_UDP_PAYLOAD,
        }
    }
}

impl TransportTuning {
    /// The quinn transport configuration with these settings.
    pub fn transport_config(&self) -> Result<quinn::TransportConfig, LinkError> {
        if self.keep_alive >= self.idle_timeout {
            return Err(LinkError::Tuning {
                setting: "keep_alive (must be shorter than idle_timeout)",
                value: format!("{:?}", self.keep_alive),
            });
        }
        let idle = quinn::IdleTimeout::try_from(self.idle_timeout).map_err(|_| {
            LinkError::Tuning { setting: "idle_timeout", value: format!("{:?}", self.idle_timeout) }
        })?;
        if self.max_udp_payload < 1200 {
            return Err(LinkError::Tuning {
                setting: "max_udp_payload (QUIC needs at least 1200)",
                value: self.max_udp_payload.to_string(),
            });
        }
        let mut mtud = quinn::MtuDiscoveryConfig::default();
        mtud.upper_bound(self.max_udp_payload.min(crate::MAX_UDP_PAYLOAD));
        let mut t = quinn::TransportConfig::default();
        t.mtu_discovery_config(Some(mtud));
        t.keep_alive_interval(Some(self.keep_alive))
            .max_idle_timeout(Some(idle))
            .stream_receive_window(self.stream_receive_window.into())
            .receive_window(self.receive_window.into())
            .send_window(self.send_window);
        Ok(t)
    }
}

/// The agent fingerprints a target accepts.
///
/// TODO: a CA mode (accept any agent whose certificate chains to a given CA) for fleets where
/// listing every agent is impractical; it would sit beside the fingerprint set and use rustls's
/// `WebPkiClientVerifier`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    fingerprints: BTreeSet<Fingerprint>,
}

impl AllowList {
    pub fn new() -> Self {
        AllowList::default()
    }

    pub fn insert(&mut self, fingerprint: Fingerprint) -> bool {
        self.fingerprints.insert(fingerprint)
    }

    pub fn remove(&mut self, fingerprint: &Fingerprint) -> bool {
        self.fingerprints.remove(fingerprint)
    }

    pub fn contains(&self, fingerprint: &Fingerprint) -> bool {
        self.fingerprints.contains(fingerprint)
    }

    pub fn len(&self) -> usize {
        self.fingerprints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fingerprints.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Fingerprint> {
        self.fingerprints.iter()
    }
}

impl FromIterator<Fingerprint> for AllowList {
    fn from_iter<I: IntoIterator<Item = Fingerprint>>(iter: I) -> Self {
        AllowList { fingerprints: iter.into_iter().collect() }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A verifier's verdict with its message. rustls shows `CertificateError::Other` with `Debug`, so
/// `Debug` prints the message too; the peer gets the matching TLS alert, and quinn carries the
/// text as the reason of the CONNECTION_CLOSE.
struct Rejection(String);

impl std::fmt::Debug for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Rejection {}

fn reject(message: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Rejection(
        message,
    )))))
}

/// Agent side: the target's end-entity certificate must hash to the pinned fingerprint.
#[derive(Debug)]
struct PinnedServerVerifier {
    pinned: Fingerprint,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = Fingerprint::of_der(end_entity);
        if presented == self.pinned {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(reject(format!(
                "target certificate fingerprint {presented} does not match the pinned {}",
                self.pinned
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Unreachable (TLS 1.3 only), but verify properly rather than wave it through.
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Target side: an agent must present a certificate, and its fingerprint must be allowed.
#[derive(Debug)]
struct AllowListClientVerifier {
    allowed: AllowList,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AllowListClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let presented = Fingerprint::of_der(end_entity);
        if self.allowed.contains(&presented) {
            Ok(ClientCertVerified::assertion())
        } else {
            tracing::warn!(
                fingerprint = %presented,
                "rejected an agent: its certificate is not in the allow list"
            );
            Err(reject(format!("agent certificate {presented} is not in the target's allow list")))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The agent's QUIC client configuration: TLS 1.3, ALPN [`ALPN`], client certificate
/// `identity`, and a target trusted iff its certificate's SHA-256 is `pinned`. Transport
/// settings: [`TransportTuning::default`].
pub fn client_config(
    identity: &Identity,
    pinned: Fingerprint,
) -> Result<quinn::ClientConfig, LinkError> {
    client_config_with(identity, pinned, &TransportTuning::default())
}

/// [`client_config`] with explicit transport settings.
pub fn client_config_with(
    identity: &Identity,
    pinned: Fingerprint,
    tuning: &TransportTuning,
) -> Result<quinn::ClientConfig, LinkError> {
    let provider = provider();
    let verifier =
        PinnedServerVerifier { pinned, algorithms: provider.signature_verification_algorithms };
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(vec![identity.cert_der().clone()], identity.key_der().clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(tuning.transport_config()?));
    Ok(cfg)
}

/// The target's QUIC server configuration: TLS 1.3, ALPN [`ALPN`], server certificate
/// `identity`, and a mandatory client certificate whose SHA-256 must be in `allowed`.
/// Transport settings: [`TransportTuning::default`].
pub fn server_config(
    identity: &Identity,
    allowed: AllowList,
) -> Result<quinn::ServerConfig, LinkError> {
    server_config_with(identity, allowed, &TransportTuning::default())
}

/// [`server_config`] with explicit transport settings.
pub fn server_config_with(
    identity: &Identity,
    allowed: AllowList,
    tuning: &TransportTuning,
) -> Result<quinn::ServerConfig, LinkError> {
    let provider = provider();
    let verifier =
        AllowListClientVerifier { allowed, algorithms: provider.signature_verification_algorithms };
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(vec![identity.cert_der().clone()], identity.key_der().clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(tuning.transport_config()?));
    Ok(cfg)
}

/// The fingerprint of the certificate the peer presented on an established connection.
pub fn peer_fingerprint(conn: &quinn::Connection) -> Option<Fingerprint> {
    let certs = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().map(|c| Fingerprint::of_der(c))
}
