//! Replication of a volume to its DR target (DESIGN.md, primary write path steps 5 and 6).

pub mod capture;
pub mod limiter;
mod resync;
pub mod shipper;
pub mod syncacks;
mod verify;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Config;
use crate::nbd::Server;
use capture::Capture;
use shipper::{Replicator, VolumeParts, BITMAP};

/// The epoch buffers of the volumes that replicate, by export name: give them to
/// [`Server::bind_with`] so the NBD write path captures into them.
pub fn captures(config: &Config) -> Result<HashMap<String, Arc<Capture>>, String> {
    let mut out = HashMap::new();
    for vc in &config.volumes {
        let Some(r) = &vc.replication else { continue };
        let mut volume = crate::volume::Volume::open(&vc.dir).map_err(|e| e.to_string())?;
        // The generation is recorded before anything is shipped (volumes made before
        // replication existed get one now).
        volume.ensure_generation().map_err(|e| e.to_string())?;
        let opts = r.options().map_err(|e| format!("volume {:?}: {e}", volume.meta.name))?;
        let c = Capture::new(volume.meta.size, volume.meta.block_size, opts.budget);
        c.set_threshold(opts.epoch_bytes);
        if opts.mode == blockferry_protocol::repl::msg::Mode::Sync
            && opts.on_disconnect == shipper::OnDisconnect::Block
        {
            c.hold_from_start();
        }
        out.insert(volume.meta.name.clone(), c);
    }
    Ok(out)
}

/// Starts replicating every volume of `config` that has `[volume.replication]`, on the
/// server bound with [`captures`]. Runs until `shutdown` turns true.
pub fn start(
    config: &Config,
    server: &Server,
    shutdown: watch::Receiver<bool>,
) -> Result<BTreeMap<String, Replicator>, String> {
    let mut out = BTreeMap::new();
    let replicated: Vec<_> = config.volumes.iter().filter(|v| v.replication.is_some()).collect();
    if replicated.is_empty() {
        return Ok(out);
    }
    let key_dir = config.key_dir.as_ref().ok_or("replication needs key-dir")?;
    let identity = blockferry_link::Identity::load(key_dir).map_err(|e| e.to_string())?;
    let trackers = server.trackers();
    let mut endpoints: HashMap<bool, blockferry_link::quinn::Endpoint> = HashMap::new();
    for vc in replicated {
        let Some(r) = &vc.replication else { continue };
        let volume = crate::volume::Volume::open(&vc.dir).map_err(|e| e.to_string())?;
        let name = volume.meta.name.clone();
        let opts = r.options()?;
        let tracker = trackers
            .get(&name)
            .cloned()
            .flatten()
            .ok_or_else(|| format!("volume {name:?}: replication needs change tracking"))?;
        let capture = server
            .capture(&name)
            .ok_or_else(|| format!("volume {name:?}: the server was bound without its capture"))?;
        let mut full_compare = false;
        if !tracker.has(BITMAP) {
            // A new bitmap knows nothing of the writes before it: mark everything, and let
            // the first catch-up compare hashes instead of sending what the target has.
            tracker.create(BITMAP).map_err(|e| e.to_string())?;
            tracker.mark_all(BITMAP).map_err(|e| e.to_string())?;
            full_compare = true;
            info!(volume = %name, "replication bitmap created; the first catch-up compares every block");
        }
        let generation = volume
            .meta
            .generation
            .and_then(blockferry_protocol::repl::Generation::new)
            .ok_or_else(|| format!("volume {name:?} has no generation"))?;
        let v6 = opts.target.is_ipv6();
        let endpoint = match endpoints.get(&v6) {
            Some(e) => e.clone(),
            None => {
                let bind = if v6 { "[::]:0" } else { "0.0.0.0:0" };
                let e = blockferry_link::client_endpoint(bind.parse().map_err(|_| "bad bind")?)
                    .map_err(|e| format!("cannot open a UDP socket for QUIC: {e}"))?;
                endpoints.insert(v6, e.clone());
                e
            }
        };
        let parts = VolumeParts { volume, generation, tracker, capture };
        let rep = shipper::spawn(parts, opts, full_compare, &identity, endpoint, shutdown.clone())
            .map_err(|e| format!("volume {name:?}: {e}"))?;
        out.insert(name, rep);
    }
    if out.is_empty() {
        warn!("no volume replicates");
    }
    Ok(out)
}
