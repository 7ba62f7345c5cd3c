//! Human sizes: `1G`, `512M`, `4K`, `4KiB`, `1073741824`. Suffixes are binary (K = 1024).

use thiserror::Error;

/// A size string that could not be understood.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid size {input:?}: {reason} (use a whole number of bytes with an optional K, M, G or T suffix, e.g. 1G or 4K)")]
pub struct SizeError {
    pub input: String,
    pub reason: &'static str,
}

/// Parses `N[K|M|G|T][i][B]` (case-insensitive) into bytes.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let err = |reason| SizeError { input: input.to_string(), reason };
    let s = input.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if digits_end == 0 {
        return Err(err("it does not start with a number"));
    }
    let number: u64 = s[..digits_end].parse().map_err(|_| err("the number is too large"))?;
    let suffix = s[digits_end..].trim().to_ascii_lowercase();
    let shift = match suffix.as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(err("unknown suffix")),
    };
    number.checked_mul(1u64 << shift).ok_or_else(|| err("the size overflows 64 bits"))
}

/// Formats bytes with the largest binary suffix that divides them exactly.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u32); 4] = [("T", 40), ("G", 30), ("M", 20), ("K", 10)];
    for (unit, shift) in UNITS {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(format_size(1 << 30), "1G");
        assert_eq!(format_size(1536), "1536");
    }

    #[test]
    fn rejects_nonsense() {
        for bad in ["", "G", "-1G", "1.5G", "1X", "99999999999999999999", "16777216T"] {
            assert!(parse_size(bad).is_err(), "{bad} should be rejected");
        }
    }
}
