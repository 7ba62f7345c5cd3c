//! `blockferry target`: the DR-side daemon. Accepts the allowed agents over QUIC (mutual TLS,
//! pinned fingerprints), keeps one replica per volume under `--dir`, and serves its status on an
//! admin socket (`blockferry status --admin PATH`).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use blockferry_link::{Fingerprint, Identity};
use blockferry_target::admin::{TargetAdmin, DEFAULT_SOCKET};
use blockferry_target::server::{Allow, TargetDaemonConfig, TargetServer};

#[derive(Debug, clap::Args)]
pub struct TargetArgs {
    /// A TOML config file (listen, dir, key-dir, admin, [[allow]] fingerprint/volumes); the
    /// options below override it, and --allow adds to its allow list.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// UDP address for the agents' QUIC connections (port 0: any free port).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Directory of the replicas (created if missing).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// This target's key pair (`blockferry keygen --dir KEYS`).
    #[arg(long, value_name = "KEYS")]
    key_dir: Option<PathBuf>,
    /// An agent allowed to connect: its fingerprint (`blockferry keygen --dir AGENT_KEYS
    /// --show`), optionally followed by `:vol1,vol2` to limit the volumes it may write.
    /// Repeatable.
    #[arg(long = "allow", value_name = "FINGERPRINT[:VOL,...]", value_parser = parse_allow)]
    allow: Vec<Allow>,
    /// The admin socket (HTTP + JSON, mode 0600) that `blockferry status --admin PATH` reads;
    /// overrides `admin` in --config. Default: /run/blockferry/target.sock.
    #[arg(long, value_name = "PATH")]
    admin: Option<PathBuf>,
    /// Serve no admin socket.
    #[arg(long, conflicts_with = "admin")]
    no_admin: bool,
    /// Threads of the async runtime (default: half the host's cores, 1 to 8).
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
}

/// `FINGERPRINT[:VOL,...]`. A fingerprint may itself contain colons (`sha256:…`, `AB:CD:…`), so
/// the whole argument is tried as a fingerprint first, then split at its last colon.
fn parse_allow(arg: &str) -> Result<Allow, String> {
    let whole = match arg.parse::<Fingerprint>() {
        Ok(fingerprint) => return Ok(Allow { fingerprint, volumes: None }),
        Err(e) => e,
    };
    let bad = || {
        format!(
            "{whole}; give the agent's fingerprint as printed by `blockferry keygen --dir \
             AGENT_KEYS --show`, optionally followed by :VOLUME[,VOLUME...]"
        )
    };
    let Some((fp, list)) = arg.rsplit_once(':') else { return Err(bad()) };
    let Ok(fingerprint) = fp.parse::<Fingerprint>() else { return Err(bad()) };
    let volumes: Vec<String> = list.split(',').map(|v| v.trim().to_string()).collect();
    if volumes.iter().any(String::is_empty) {
        return Err(format!(
            "empty volume name in {arg:?}: after the fingerprint give :VOLUME[,VOLUME...], or \
             nothing to allow every volume"
        ));
    }
    Ok(Allow { fingerprint, volumes: Some(volumes) })
}

impl TargetArgs {
    /// The daemon's configuration and the admin socket to serve (`None`: --no-admin).
    fn into_config(self) -> Result<(TargetDaemonConfig, Option<PathBuf>)> {
        let mut cfg = match &self.config {
            Some(path) => TargetDaemonConfig::from_file(path).map_err(|e| anyhow!(e))?,
            None => {
                let missing = |flag: &str| {
                    anyhow!("{flag} is required (or give a --config FILE that sets it)")
                };
                TargetDaemonConfig {
                    listen: self.listen.ok_or_else(|| missing("--listen ADDR"))?,
                    dir: self.dir.clone().ok_or_else(|| missing("--dir DIR"))?,
                    key_dir: self.key_dir.clone().ok_or_else(|| missing("--key-dir KEYS"))?,
                    admin: None,
                    workers: None,
                    allow: Vec::new(),
                }
            }
        };
        if let Some(listen) = self.listen {
            cfg.listen = listen;
        }
        if let Some(dir) = self.dir {
            cfg.dir = dir;
        }
        if let Some(key_dir) = self.key_dir {
            cfg.key_dir = key_dir;
        }
        if self.admin.is_some() {
            cfg.admin = self.admin;
        }
        if self.workers.is_some() {
            cfg.workers = self.workers;
        }
        // Absolute, so the replica paths `status` shows are usable from anywhere.
        cfg.dir = std::path::absolute(&cfg.dir)
            .with_context(|| format!("replica directory {}", cfg.dir.display()))?;
        cfg.allow.extend(self.allow);
        if cfg.allow.is_empty() {
            bail!(
                "no agent is allowed to connect: give --allow FINGERPRINT[:VOL,...] with the \
                 agent's fingerprint (`blockferry keygen --dir AGENT_KEYS --show` on the agent), \
                 or [[allow]] entries in --config"
            );
        }
        let admin = match self.no_admin {
            true => None,
            false => Some(cfg.admin.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))),
        };
        Ok((cfg, admin))
    }
}

pub fn run(args: TargetArgs) -> Result<()> {
    let (cfg, admin_path) = args.into_config()?;
    // Checked first for a clear message; the server loads the same files again.
    let key_dir = cfg.key_dir.clone();
    if !key_dir.is_dir() {
        bail!(
            "the target's key directory {} does not exist: run `blockferry keygen --dir {}` to \
             make this target's key pair",
            key_dir.display(),
            key_dir.display()
        );
    }
    let identity = Identity::load(&key_dir)
        .with_context(|| format!("the target's key pair in {}", key_dir.display()))?;
    crate::init_tracing();
    crate::runtime(cfg.workers)?.block_on(async {
        let server = TargetServer::bind(cfg).map_err(|e| anyhow!(e))?;
        let addr = server.local_addr().context("the QUIC endpoint's address")?;
        let admin = match &admin_path {
            Some(path) => Some(TargetAdmin::bind(path, server.clone())?),
            None => None,
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            crate::shutdown_signal().await;
            let _ = stop_tx.send(true);
        });
        let admin_at = match &admin {
            Some(a) => format!("; admin on {}", a.path().display()),
            None => String::new(),
        };
        // One line the tests parse: the address, then the fingerprint agents pin.
        println!("target listening on {addr} (fingerprint {}{admin_at})", identity.fingerprint());
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let mut admin_stop = stop_rx.clone();
        let admin_done = async move {
            if let Some(admin) = admin {
                admin
                    .run(async move {
                        let _ = admin_stop.wait_for(|s| *s).await;
                    })
                    .await;
            }
        };
        tokio::join!(server.run(stop_rx), admin_done);
        tracing::info!("target stopped");
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "sha256:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn parses_allow_arguments() {
        let a = parse_allow(FP).unwrap();
        assert_eq!(a.fingerprint.to_string(), FP);
        assert!(a.volumes.is_none());
        let a = parse_allow(&format!("{FP}:vm1,db")).unwrap();
        assert_eq!(a.volumes, Some(vec!["vm1".to_string(), "db".to_string()]));
        // Colon-separated hex, then a volume named like a hex pair.
        let colons: Vec<String> = (0..32).map(|i| format!("{i:02X}")).collect();
        let a = parse_allow(&format!("{}:ab", colons.join(":"))).unwrap();
        assert_eq!(a.volumes, Some(vec!["ab".to_string()]));
        let e = parse_allow("sha256:1234").unwrap_err();
        assert!(e.contains("expected 64") && e.contains("keygen"), "{e}");
        let e = parse_allow(&format!("{FP}:vm1,")).unwrap_err();
        assert!(e.contains("empty volume name"), "{e}");
        assert!(parse_allow("md5:00").unwrap_err().contains("only sha256"));
    }
}
