//! `blockferry keygen`: make (or show) the node's QUIC identity, a self-signed certificate and
//! key in DIR whose SHA-256 fingerprint the peer pins (agent) or allows (target).

use std::path::PathBuf;

use anyhow::{bail, Result};
use blockferry_link::{Identity, CERT_FILE, KEY_FILE};

#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// Directory for cert.pem and key.pem (created with mode 0700).
    #[arg(long)]
    dir: PathBuf,
    /// Common name of the certificate (default: this host's name). Informational only: peers
    /// trust the fingerprint, not the name.
    #[arg(long, conflicts_with = "show")]
    name: Option<String>,
    /// Replace a key pair that is already in DIR (peers that pinned the old fingerprint will
    /// refuse this node until they are given the new one).
    #[arg(long, conflicts_with = "show")]
    force: bool,
    /// Print the fingerprint of the key pair in DIR instead of making one.
    #[arg(long)]
    show: bool,
    /// Print {"dir", "fingerprint"} as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: KeygenArgs) -> Result<()> {
    let identity = if args.show {
        Identity::load(&args.dir)?
    } else {
        if Identity::exists(&args.dir) && !args.force {
            bail!(
                "{} already holds a key pair ({KEY_FILE}/{CERT_FILE}); `blockferry keygen --dir {} \
                 --show` prints its fingerprint, --force replaces it",
                args.dir.display(),
                args.dir.display()
            );
        }
        let name = args.name.unwrap_or_else(hostname);
        let identity = Identity::generate(&name)?;
        identity.save(&args.dir)?;
        identity
    };
    let fingerprint = identity.fingerprint();
    if args.json {
        let value = serde_json::json!({
            "dir": args.dir.display().to_string(),
            "fingerprint": fingerprint.to_string(),
        });
        println!("{value}");
    } else {
        println!("fingerprint: {fingerprint}");
    }
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "blockferry".to_string())
}
