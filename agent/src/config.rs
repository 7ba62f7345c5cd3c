//! The agent's TOML configuration.
//!
//! ```toml
//! listen = "127.0.0.1:10809"      # TCP listener (optional)
//! unix = "/run/blockferry.sock"   # Unix socket listener (optional; at least one listener)
//!
//! [tls]                           # optional: enables NBD_OPT_STARTTLS
//! cert = "server.pem"
//! key = "server.key"
//! client-ca = "ca.pem"            # optional: require client certificates signed by this CA
//! mode = "optional"               # off | optional | required (default: optional)
//!
//! [[volume]]
//! dir = "/var/lib/blockferry/vm1" # export name = the volume's name
//! read-only = false
//! cache = "writeback"             # none (O_DIRECT) | writeback
//! engine = "uring"                # uring | sync
//! tls = "required"                # overrides [tls] mode for this export
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::engine::{CacheMode, EngineKind};
use crate::volume::{Volume, VolumeError};

/// TLS policy (server-wide or per volume).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsPolicy {
    Off,
    #[default]
    Optional,
    Required,
}

impl std::str::FromStr for TlsPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(TlsPolicy::Off),
            "optional" => Ok(TlsPolicy::Optional),
            "required" => Ok(TlsPolicy::Required),
            _ => Err(format!("unknown TLS mode {s:?}: use off, optional or required")),
        }
    }
}

/// The whole agent configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    pub listen: Option<SocketAddr>,
    pub unix: Option<PathBuf>,
    pub tls: Option<TlsConfig>,
    /// The admin interface (HTTP + JSON on a Unix socket): change tracking, later status.
    pub admin: Option<PathBuf>,
    /// This agent's QUIC identity (`blockferry keygen --dir`), needed by replication.
    pub key_dir: Option<PathBuf>,
    /// Threads of the async runtime (default: [`default_workers`]).
    pub workers: Option<usize>,
    #[serde(default, rename = "volume")]
    pub volumes: Vec<VolumeConfig>,
}

/// `[tls]`: server certificate and key (PEM), optional client CA (PEM) and the mode.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    #[serde(default)]
    pub mode: TlsPolicy,
}

/// One `[[volume]]`: a volume directory served as the export named after the volume.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct VolumeConfig {
    pub dir: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub cache: CacheMode,
    #[serde(default)]
    pub engine: EngineKind,
    pub tls: Option<TlsPolicy>,
    /// Changed-block tracking (named bitmaps + activity log). On by default.
    #[serde(default = "yes")]
    pub change_tracking: bool,
    /// Bytes of volume per activity-log extent (default 4 MiB).
    #[serde(default, with = "opt_size")]
    pub al_extent_size: Option<u64>,
    /// Extents in the activity log: the hot set (default 1024).
    pub al_extents: Option<u32>,
    /// Replication to a DR target (`[volume.replication]`).
    pub replication: Option<ReplicationConfig>,
}

/// `[volume.replication]`: where and how a volume replicates.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ReplicationConfig {
    /// The target's QUIC address.
    pub target: SocketAddr,
    /// The target certificate's SHA-256 (`blockferry keygen --show` on the target).
    pub target_fingerprint: blockferry_link::Fingerprint,
    /// `async` (acknowledged locally, shipped in epochs). `sync` comes with issue 5.
    #[serde(default = "default_mode")]
    pub mode: String,
    /// `lz4` (default), `zstd`, `zstd:LEVEL` or `off`.
    #[serde(default = "default_compression")]
    pub compression: String,
    /// Epoch buffer per volume (default 256M); beyond it the volume goes behind.
    #[serde(default, with = "opt_size")]
    pub budget: Option<u64>,
    /// Epochs close this often (default 1000 ms).
    pub epoch_interval_ms: Option<u64>,
    /// Bandwidth limit in bytes per second (K/M/G suffixes), none by default.
    #[serde(default, with = "opt_size")]
    pub bandwidth: Option<u64>,
    /// Sync mode, when the target is unreachable or too slow: `degrade` (default: write on
    /// locally, resync later) or `block` (hold writes up to `block-timeout-ms`, then EIO).
    pub on_disconnect: Option<String>,
    /// `block`: how long writes wait for the target before they fail (default 30000 ms).
    pub block_timeout_ms: Option<u64>,
    /// Sync mode: a write unanswered by the target this long counts as a disconnect
    /// (default 5000 ms).
    pub ack_timeout_ms: Option<u64>,
}

fn default_mode() -> String {
    "async".into()
}

fn default_compression() -> String {
    "lz4".into()
}

impl ReplicationConfig {
    /// The options of the replication driver, checked.
    pub fn options(&self) -> Result<crate::repl::shipper::ReplicationOptions, String> {
        let mut o =
            crate::repl::shipper::ReplicationOptions::new(self.target, self.target_fingerprint);
        o.mode = match self.mode.as_str() {
            "async" => blockferry_protocol::repl::Mode::Async,
            "sync" => blockferry_protocol::repl::Mode::Sync,
            m => return Err(format!("mode = {m:?}: use \"sync\" or \"async\"")),
        };
        o.compression = blockferry_protocol::repl::Compression::parse(&self.compression)
            .ok_or_else(|| {
                format!(
                    "compression = {:?}: use lz4, zstd, zstd:LEVEL (1-19) or off",
                    self.compression
                )
            })?;
        if let Some(b) = self.budget {
            if b < 1 << 20 {
                return Err(format!("budget = {b}: at least 1M"));
            }
            o.budget = b;
        }
        if let Some(ms) = self.epoch_interval_ms {
            if !(10..=60_000).contains(&ms) {
                return Err(format!("epoch-interval-ms = {ms}: between 10 and 60000"));
            }
            o.epoch_interval = std::time::Duration::from_millis(ms);
        }
        o.bandwidth = self.bandwidth;
        if let Some(p) = &self.on_disconnect {
            o.on_disconnect = crate::repl::shipper::OnDisconnect::parse(p)
                .ok_or_else(|| format!("on-disconnect = {p:?}: use \"degrade\" or \"block\""))?;
        }
        if let Some(ms) = self.block_timeout_ms {
            if !(100..=3_600_000).contains(&ms) {
                return Err(format!("block-timeout-ms = {ms}: between 100 and 3600000"));
            }
            o.block_timeout = std::time::Duration::from_millis(ms);
        }
        if let Some(ms) = self.ack_timeout_ms {
            if !(10..=600_000).contains(&ms) {
                return Err(format!("ack-timeout-ms = {ms}: between 10 and 600000"));
            }
            o.ack_timeout = std::time::Duration::from_millis(ms);
        }
        o.epoch_bytes = (o.budget / 4).max(1 << 20);
        Ok(o)
    }
}

fn yes() -> bool {
    true
}

/// Sizes in the config may be numbers of bytes or strings with K/M/G/T suffixes.
mod opt_size {
    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Num(u64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        match Option::<Raw>::deserialize(d)? {
            None => Ok(None),
            Some(Raw::Num(n)) => Ok(Some(n)),
            Some(Raw::Text(t)) => {
                crate::size::parse_size(&t).map(Some).map_err(serde::de::Error::custom)
            }
        }
    }
}

impl VolumeConfig {
    /// The activity-log options of this volume.
    pub fn tracker_options(&self) -> crate::cbt::TrackerOptions {
        let mut o = crate::cbt::TrackerOptions::default();
        if let Some(s) = self.al_extent_size {
            o.extent_size = s;
        }
        if let Some(n) = self.al_extents {
            o.extents = n;
        }
        o
    }

    pub fn new(dir: impl Into<PathBuf>) -> VolumeConfig {
        VolumeConfig {
            dir: dir.into(),
            read_only: false,
            cache: CacheMode::default(),
            engine: EngineKind::default(),
            tls: None,
            change_tracking: true,
            al_extent_size: None,
            al_extents: None,
            replication: None,
        }
    }
}

/// A configuration that cannot be used. Messages say what to change.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error(
        "nothing to listen on: set `listen` (e.g. \"127.0.0.1:10809\") or `unix` (a socket path)"
    )]
    NoListener,
    #[error("no volumes: add at least one [[volume]] with a `dir`")]
    NoVolumes,
    #[error("volume in {dir}: {source}")]
    Volume {
        dir: PathBuf,
        #[source]
        source: VolumeError,
    },
    #[error("export name {name:?} is used by two volumes ({first} and {second}); rename one with a different volume name")]
    DuplicateExport { name: String, first: PathBuf, second: PathBuf },
    #[error(
        "volume {name:?} has TLS mode {mode:?} but there is no [tls] section with cert and key"
    )]
    TlsWithoutCert { name: String, mode: TlsPolicy },
    #[error("[tls] {what} file {path} does not exist")]
    TlsFileMissing { what: &'static str, path: PathBuf },
    #[error("volume {name:?}: [volume.replication] {reason}")]
    Replication { name: String, reason: String },
    #[error("workers = {0}: between 1 and {MAX_WORKERS}")]
    Workers(usize),
}

/// The most runtime threads `workers` may ask for.
pub const MAX_WORKERS: usize = 64;

/// Runtime threads when the config does not say: half the host's cores, at least one, at most
/// eight. One thread runs the data path's short tasks without waking a second one for each
/// (docs/decisions.md, "One runtime thread on small hosts"); the other cores are the VMs'.
pub fn default_workers() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / 2).clamp(1, 8)
}

/// Checks a `workers` setting.
pub fn check_workers(n: usize) -> Result<usize, ConfigError> {
    match n {
        1..=MAX_WORKERS => Ok(n),
        _ => Err(ConfigError::Workers(n)),
    }
}

impl Config {
    /// Parses TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: origin.to_path_buf(), source: Box::new(e) })
    }

    /// Reads and parses a config file (not yet validated: see [`Config::validate`]).
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Config::from_toml(&text, path)
    }

    /// The TLS mode of a volume: its override, else the server-wide mode, else off.
    pub fn volume_tls(&self, v: &VolumeConfig) -> TlsPolicy {
        v.tls.or(self.tls.as_ref().map(|t| t.mode)).unwrap_or(TlsPolicy::Off)
    }

    /// Checks everything that can be checked before binding: a listener, volumes that open,
    /// unique export names, TLS files. Returns the opened volumes in config order.
    pub fn validate(&self) -> Result<Vec<Volume>, ConfigError> {
        if self.listen.is_none() && self.unix.is_none() {
            return Err(ConfigError::NoListener);
        }
        if self.volumes.is_empty() {
            return Err(ConfigError::NoVolumes);
        }
        if let Some(n) = self.workers {
            check_workers(n)?;
        }
        if let Some(tls) = &self.tls {
            let files = [
                ("cert", Some(&tls.cert)),
                ("key", Some(&tls.key)),
                ("client-ca", tls.client_ca.as_ref()),
            ];
            for (what, path) in files {
                if let Some(path) = path.filter(|p| !p.exists()) {
                    return Err(ConfigError::TlsFileMissing { what, path: path.clone() });
                }
            }
        }
        let mut seen: HashMap<String, PathBuf> = HashMap::new();
        let mut volumes = Vec::with_capacity(self.volumes.len());
        for vc in &self.volumes {
            let volume = Volume::open(&vc.dir)
                .map_err(|source| ConfigError::Volume { dir: vc.dir.clone(), source })?;
            let name = volume.meta.name.clone();
            if let Some(first) = seen.insert(name.clone(), vc.dir.clone()) {
                return Err(ConfigError::DuplicateExport { name, first, second: vc.dir.clone() });
            }
            let mode = self.volume_tls(vc);
            if mode != TlsPolicy::Off && self.tls.is_none() {
                return Err(ConfigError::TlsWithoutCert { name, mode });
            }
            if let Some(r) = &vc.replication {
                let bad = |reason: String| ConfigError::Replication { name: name.clone(), reason };
                r.options().map_err(bad)?;
                if !vc.change_tracking {
                    return Err(bad(
                        "needs change-tracking = true (the bitmap says what the target lacks)"
                            .into(),
                    ));
                }
                if vc.read_only {
                    return Err(bad(
                        "a read-only volume does not change: nothing to replicate".into()
                    ));
                }
                if self.key_dir.is_none() {
                    return Err(bad(
                        "needs key-dir (this agent's key pair: `blockferry keygen --dir DIR`)"
                            .into(),
                    ));
                }
            }
            volumes.push(volume);
        }
        Ok(volumes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_config() {
        let text = r#"
            listen = "127.0.0.1:10809"
            unix = "/tmp/x.sock"
            [tls]
            cert = "c.pem"
            key = "k.pem"
            mode = "required"
            [[volume]]
            dir = "/v/a"
            read-only = true
            cache = "none"
            engine = "sync"
            tls = "off"
            [[volume]]
            dir = "/v/b"
        "#;
        let c = Config::from_toml(text, Path::new("t.toml")).unwrap();
        assert_eq!(c.volumes.len(), 2);
        assert!(c.volumes[0].read_only);
        assert_eq!(c.volumes[0].cache, CacheMode::None);
        assert_eq!(c.volumes[0].engine, EngineKind::Sync);
        assert_eq!(c.volume_tls(&c.volumes[0]), TlsPolicy::Off);
        assert_eq!(c.volume_tls(&c.volumes[1]), TlsPolicy::Required);
        assert_eq!(c.volumes[1].engine, EngineKind::Uring);
    }

    #[test]
    fn rejects_bad_configs_clearly() {
        let err =
            |text: &str| Config::from_toml(text, Path::new("t.toml")).unwrap_err().to_string();
        assert!(err("lisen = \"x\"").contains("unknown field `lisen`"));
        assert!(
            err("[[volume]]\ndir = \"/a\"\ncache = \"fast\"").contains("unknown variant `fast`")
        );
        assert!(err("listen = \"nope\"").contains("listen"));

        let none = Config::default();
        assert!(matches!(none.validate(), Err(ConfigError::NoListener)));
        let tmp = tempfile::tempdir().unwrap();
        let mut c = Config { listen: Some("127.0.0.1:0".parse().unwrap()), ..Config::default() };
        assert!(matches!(c.validate(), Err(ConfigError::NoVolumes)));
        c.volumes.push(VolumeConfig::new(tmp.path().join("missing")));
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("volume create"), "{e}");
        Volume::create(&tmp.path().join("a/v"), 1 << 20, 4096, None).unwrap();
        Volume::create(&tmp.path().join("b/v"), 1 << 20, 4096, None).unwrap();
        c.volumes = vec![
            VolumeConfig::new(tmp.path().join("a/v")),
            VolumeConfig::new(tmp.path().join("b/v")),
        ];
        assert!(matches!(c.validate(), Err(ConfigError::DuplicateExport { .. })));
        c.volumes.pop();
        c.volumes[0].tls = Some(TlsPolicy::Required);
        assert!(matches!(c.validate(), Err(ConfigError::TlsWithoutCert { .. })));
        c.volumes[0].tls = None;
        assert_eq!(c.validate().unwrap().len(), 1);
        c.workers = Some(0);
        assert_eq!(c.validate().unwrap_err().to_string(), "workers = 0: between 1 and 64");
        c.workers = Some(2);
        assert_eq!(c.validate().unwrap().len(), 1);
        let parsed = Config::from_toml("workers = 3", Path::new("t.toml")).unwrap();
        assert_eq!(parsed.workers, Some(3));
        assert!((1..=8).contains(&default_workers()));
    }

    #[test]
    fn replication_policies_parse_and_bad_values_are_named() {
        let repl = |extra: &str| {
            let text = format!(
                "[[volume]]\ndir = \"/a\"\n[volume.replication]\ntarget = \"127.0.0.1:4433\"\n\
                 target-fingerprint = \"sha256:{}\"\n{extra}",
                "ab".repeat(32)
            );
            let c = Config::from_toml(&text, Path::new("t.toml")).unwrap();
            c.volumes[0].replication.clone().unwrap().options()
        };
        let o = repl("").unwrap();
        use crate::repl::shipper::OnDisconnect;
        assert_eq!(o.on_disconnect, OnDisconnect::Degrade);
        assert_eq!(o.block_timeout, std::time::Duration::from_secs(30));
        assert_eq!(o.ack_timeout, std::time::Duration::from_secs(5));
        let o = repl("on-disconnect = \"block\"\nblock-timeout-ms = 2000\nack-timeout-ms = 500")
            .unwrap();
        assert_eq!(o.on_disconnect, OnDisconnect::Block);
        assert_eq!(o.block_timeout, std::time::Duration::from_secs(2));
        assert_eq!(o.ack_timeout, std::time::Duration::from_millis(500));
        let e = repl("on-disconnect = \"panic\"").unwrap_err();
        assert!(e.contains("on-disconnect") && e.contains("degrade"), "{e}");
        assert!(repl("block-timeout-ms = 1").unwrap_err().contains("block-timeout-ms"));
        assert!(repl("ack-timeout-ms = 0").unwrap_err().contains("ack-timeout-ms"));
    }
}
