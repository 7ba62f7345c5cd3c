//! TLS for NBD_OPT_STARTTLS: a rustls server configuration (provider `ring`) from PEM files.

use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use super::ServeError;
use crate::config::TlsConfig;

fn tls_err(path: &Path, reason: impl std::fmt::Display) -> ServeError {
    ServeError::Tls { path: path.to_path_buf(), reason: reason.to_string() }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ServeError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_err(path, format!("cannot read certificates: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(path, format!("bad PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(tls_err(path, "no CERTIFICATE block in the file"));
    }
    Ok(certs)
}

/// Builds the acceptor: server certificate chain and key, and, with `client-ca`, mandatory
/// client certificates signed by that CA.
pub fn acceptor(cfg: &TlsConfig) -> Result<TlsAcceptor, ServeError> {
    let certs = load_certs(&cfg.cert)?;
    let key = PrivateKeyDer::from_pem_file(&cfg.key)
        .map_err(|e| tls_err(&cfg.key, format!("cannot read a private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(&cfg.cert, e))?;
    let builder = match &cfg.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in load_certs(ca)? {
                roots.add(cert).map_err(|e| tls_err(ca, format!("bad CA certificate: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| tls_err(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| tls_err(&cfg.key, format!("certificate and key do not fit: {e}")))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
