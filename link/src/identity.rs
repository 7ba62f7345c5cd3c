//! [`Identity`]: a node's self-signed certificate and private key, kept as two PEM files.
//!
//! Layout of an identity directory (mode 0700):
//! ```text
//! DIR/key.pem    PKCS#8 private key, "-----BEGIN PRIVATE KEY-----", mode 0600
//! DIR/cert.pem   self-signed X.509 certificate, "-----BEGIN CERTIFICATE-----", mode 0644
//! ```

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::{Fingerprint, LinkError, SERVER_NAME};

/// File name of the certificate in an identity directory.
pub const CERT_FILE: &str = "cert.pem";
/// File name of the private key in an identity directory.
pub const KEY_FILE: &str = "key.pem";

/// A node's certificate and private key. `Debug` shows the fingerprint, never the key.
pub struct Identity {
    cert_der: CertificateDer<'static>,
    key_der: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("fingerprint", &self.fingerprint()).finish_non_exhaustive()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity { cert_der: self.cert_der.clone(), key_der: self.key_der.clone_key() }
    }
}

impl Identity {
    /// A fresh ECDSA P-256 key pair and a self-signed certificate with the common name
    /// `common_name` and the subject alternative name [`SERVER_NAME`].
    pub fn generate(common_name: &str) -> Result<Identity, LinkError> {
        let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        // Validity is not checked by the peers (the pin is the trust), but keep it plausible
        // for tools that look: from now for 100 years.
        let now = std::time::SystemTime::now();
        params.not_before = now.into();
        params.not_after = (now + std::time::Duration::from_secs(100 * 365 * 24 * 3600)).into();
        let cert = params.self_signed(&key_pair)?;
        Ok(Identity {
            cert_der: cert.der().clone(),
            key_der: PrivatePkcs8KeyDer::from(key_pair.serialize_der()).into(),
        })
    }

    /// An identity from DER bytes (e.g. kept elsewhere than in files).
    pub fn from_der(cert_der: CertificateDer<'static>, key_der: PrivateKeyDer<'static>) -> Self {
        Identity { cert_der, key_der }
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn key_der(&self) -> &PrivateKeyDer<'static> {
        &self.key_der
    }

    /// SHA-256 of the certificate: what the peer pins or allows.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of_der(&self.cert_der)
    }

    /// True if `dir` holds a key or a certificate already.
    pub fn exists(dir: &Path) -> bool {
        dir.join(KEY_FILE).exists() || dir.join(CERT_FILE).exists()
    }

    /// Writes `dir/key.pem` (0600) and `dir/cert.pem`, creating `dir` (0700) if needed and
    /// replacing files that are there.
    ///
    /// Crash ordering: (1) key.pem.tmp written and fsynced, (2) renamed to key.pem,
    /// (3) cert.pem.tmp written and fsynced, (4) renamed to cert.pem, (5) dir fsynced.
    /// The certificate is the commit point: after a crash between (2) and (4) `load` finds a
    /// key without its certificate (or an old one, which fails rustls's key check) and says to
    /// run keygen again.
    pub fn save(&self, dir: &Path) -> Result<(), LinkError> {
        let io_err = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| LinkError::Io { what, path, source }
        };
        if !dir.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err("cannot create the identity directory", dir))?;
        }
        let key_pem = pem_encode("PRIVATE KEY", self.key_der.secret_der());
        write_atomic(dir, KEY_FILE, key_pem.as_bytes(), 0o600)?;
        let cert_pem = pem_encode("CERTIFICATE", &self.cert_der);
        write_atomic(dir, CERT_FILE, cert_pem.as_bytes(), 0o644)?;
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("cannot fsync the identity directory", dir))?;
        Ok(())
    }

    /// Reads `dir/cert.pem` and `dir/key.pem`.
    pub fn load(dir: &Path) -> Result<Identity, LinkError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        for (path, file) in [(&key_path, KEY_FILE), (&cert_path, CERT_FILE)] {
            if !path.exists() {
                return Err(LinkError::MissingIdentity { dir: dir.to_path_buf(), file });
            }
        }
        let cert_der =
            CertificateDer::from_pem_file(&cert_path).map_err(|e| pem_error(e, cert_path))?;
        let key_der =
            PrivateKeyDer::from_pem_file(&key_path).map_err(|e| pem_error(e, key_path))?;
        Ok(Identity { cert_der, key_der })
    }
}

/// PEM errors that are really I/O errors keep their kind (permission denied, ...).
fn pem_error(e: rustls_pki_types::pem::Error, path: PathBuf) -> LinkError {
    match e {
        rustls_pki_types::pem::Error::Io(source) => {
            LinkError::Io { what: "cannot read", path, source }
        }
        source => LinkError::BadPem { path, source },
    }
}

/// temp -> fsync -> rename; the caller fsyncs the directory.
fn write_atomic(dir: &Path, name: &str, data: &[u8], mode: u32) -> Result<(), LinkError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let write = || -> io::Result<()> {
        let _ = fs::remove_file(&tmp);
        let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        // The umask may have cleared bits of `mode`; the key must be 0600 whatever it is.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)
    };
    write().map_err(|source| LinkError::Io { what: "cannot write", path, source })
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_known_vectors() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
