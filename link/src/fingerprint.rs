//! [`Fingerprint`]: SHA-256 of a certificate's DER, written `sha256:` + 64 lowercase hex digits.

use std::fmt;
use std::str::FromStr;

/// SHA-256 of a certificate's DER encoding: the identity of a blockferry node.
///
/// Written as `sha256:` followed by 64 lowercase hex digits. Parsing also accepts the digits
/// without the prefix, in upper case, and separated by colons (`AB:CD:…`, as `openssl x509
/// -fingerprint -sha256` prints them).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of_der(der: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(digest.as_ref());
        Fingerprint(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// Why a string is not a fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseFingerprintError {
    #[error("fingerprint {input:?} has {digits} hex digits, expected 64 (sha256:<64 hex digits>)")]
    Length { input: String, digits: usize },
    #[error("fingerprint {input:?} has {found:?} at offset {offset}, expected a hex digit (sha256:<64 hex digits>)")]
    Character { input: String, found: char, offset: usize },
    #[error("fingerprint {input:?} uses algorithm {algorithm:?}; only sha256 is supported")]
    Algorithm { input: String, algorithm: String },
}

impl FromStr for Fingerprint {
    type Err = ParseFingerprintError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let s = input.trim();
        let (body, body_start) = match s.split_once(':') {
            // "sha256:..." (case-insensitive); a first field of two hex digits is a colon-separated
            // fingerprint without a prefix, anything else is an unknown algorithm.
            Some((alg, rest)) if alg.eq_ignore_ascii_case("sha256") => (rest, alg.len() + 1),
            Some((alg, _)) if !(alg.len() == 2 && alg.bytes().all(|b| b.is_ascii_hexdigit())) => {
                return Err(ParseFingerprintError::Algorithm {
                    input: input.to_string(),
                    algorithm: alg.to_string(),
                })
            }
            _ => (s, 0),
        };
        let lead = input.len() - input.trim_start().len();
        let mut nibbles = Vec::with_capacity(64);
        for (i, c) in body.char_indices() {
            if c == ':' {
                continue;
            }
            match c.to_digit(16) {
                Some(d) => nibbles.push(d as u8),
                None => {
                    return Err(ParseFingerprintError::Character {
                        input: input.to_string(),
                        found: c,
                        offset: lead + body_start + i,
                    })
                }
            }
        }
        if nibbles.len() != 64 {
            return Err(ParseFingerprintError::Length {
                input: input.to_string(),
                digits: nibbles.len(),
            });
        }
        let mut bytes = [0u8; 32];
        for (byte, pair) in bytes.iter_mut().zip(nibbles.chunks_exact(2)) {
            *byte = (pair[0] << 4) | pair[1];
        }
        Ok(Fingerprint(bytes))
    }
}

impl serde::Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Fingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
