//! Many volumes under one directory:
//!
//! ```text
//! DIR/volumes/<uuid>/{meta, image.raw, journal/}
//! ```
//! A volume directory without a valid `meta` is an interrupted creation; `Store::volume`
//! completes it.

use std::fs::File;
use std::path::{Path, PathBuf};

use blockferry_protocol::repl::{Generation, Geometry, VolumeId};

use super::{ReplicaStore, StoreError};

/// The target's store directory.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    volumes: Vec<VolumeId>,
}

fn parse_uuid(s: &str) -> Option<VolumeId> {
    let hex: String = s.chars().filter(|&c| c != '-').collect();
    if hex.len() != 32 || s.len() != 36 {
        return None;
    }
    let mut b = [0u8; 16];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    (VolumeId(b).to_string() == s).then_some(VolumeId(b))
}

impl Store {
    /// Opens (creating if missing) the store in `dir` and lists its volumes.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let vdir = dir.join("volumes");
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { what, path, source }
        };
        if !vdir.is_dir() {
            std::fs::create_dir_all(&vdir).map_err(io("creating", &vdir))?;
            File::open(dir).and_then(|f| f.sync_all()).map_err(io("syncing", dir))?;
        }
        let mut volumes = Vec::new();
        for e in std::fs::read_dir(&vdir).map_err(io("listing", &vdir))? {
            let e = e.map_err(io("listing", &vdir))?;
            match e.file_name().to_str().and_then(parse_uuid) {
                Some(v) => volumes.push(v),
                None => tracing::warn!("ignoring {}: not a volume uuid", e.path().display()),
            }
        }
        volumes.sort();
        Ok(Store { dir: dir.to_path_buf(), volumes })
    }

    /// The volumes present.
    pub fn volumes(&self) -> &[VolumeId] {
        &self.volumes
    }

    /// The directory of volume `uuid`.
    pub fn volume_dir(&self, uuid: VolumeId) -> PathBuf {
        self.dir.join("volumes").join(uuid.to_string())
    }

    /// Opens (creating if new) the replica of volume `uuid`.
    pub fn volume(
        &mut self,
        uuid: VolumeId,
        name: &str,
        geometry: Geometry,
        generation: Generation,
    ) -> Result<ReplicaStore, StoreError> {
        let r = ReplicaStore::open_dir(&self.volume_dir(uuid), uuid, name, geometry, generation)?;
        if let Err(i) = self.volumes.binary_search(&uuid) {
            self.volumes.insert(i, uuid);
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_round_trip() {
        let v = VolumeId([0xab; 16]);
        assert_eq!(parse_uuid(&v.to_string()), Some(v));
        assert_eq!(parse_uuid("nope"), None);
    }
}
