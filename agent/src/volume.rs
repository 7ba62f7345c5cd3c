//! A volume on the primary: a directory holding a sparse raw image and a small metadata file.
//!
//! Layout of `DIR`:
//! ```text
//! DIR/volume.toml   metadata (format_version, uuid, name, size, block_size), see `VolumeMeta`
//! DIR/image.raw     the raw image, `size` bytes, sparse
//! ```
//! The metadata file is written temp -> fsync -> rename -> fsync(dir) so that a crash leaves
//! either no volume or a whole one, never a torn metadata file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use uuid::Uuid;

use crate::size::format_size;

/// The on-disk format version of `volume.toml` written by this build.
pub const FORMAT_VERSION: u32 = 1;
pub const META_FILE: &str = "volume.toml";
pub const IMAGE_FILE: &str = "image.raw";
pub const MIN_BLOCK_SIZE: u32 = 4096;
pub const MAX_BLOCK_SIZE: u32 = 1 << 20;
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;

/// Errors of creating or opening a volume. Messages name the path and say what to do.
#[derive(Debug, Error)]
pub enum VolumeError {
    #[error("a volume already exists in {dir} ({META_FILE} is there); choose another --dir or remove it first")]
    Exists { dir: PathBuf },
    #[error("no volume in {dir}: {META_FILE} is missing (create one with `blockferry volume create --dir {dir} --size SIZE`)")]
    Missing { dir: PathBuf },
    #[error("block size {block_size} is not a power of two from 4K to 1M")]
    BadBlockSize { block_size: u64 },
    #[error("volume size {size} is not a positive multiple of the block size {block_size}")]
    BadSize { size: u64, block_size: u32 },
    #[error("volume name {name:?} is not allowed: use 1 to 64 characters from A-Z a-z 0-9 . _ -")]
    BadName { name: String },
    #[error("{path} is not a valid volume metadata file: {reason}")]
    BadMeta { path: PathBuf, reason: String },
    #[error("{path} has format version {found}; this blockferry reads version {FORMAT_VERSION}")]
    UnsupportedFormat { path: PathBuf, found: u32 },
    #[error("image {path} is {actual} bytes but the volume metadata says {expected}; the image was changed outside blockferry")]
    ImageSize { path: PathBuf, expected: u64, actual: u64 },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> VolumeError + 'a {
    move |source| VolumeError::Io { action, path: path.to_path_buf(), source }
}

/// The metadata record of a volume (`volume.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    pub format_version: u32,
    pub uuid: Uuid,
    pub name: String,
    pub size: u64,
    pub block_size: u32,
    /// The data lineage's generation id (DESIGN.md "generation"; random, never 0). Volumes
    /// made before replication existed get one the first time they replicate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
}

/// A random generation id: 63 random bits (TOML integers are signed 64-bit), never 0.
pub fn new_generation() -> u64 {
    let b = *Uuid::new_v4().as_bytes();
    (u64::from_le_bytes(b[..8].try_into().unwrap_or([1; 8])) >> 1).max(1)
}

impl VolumeMeta {
    /// Checks the invariants every volume keeps.
    pub fn validate(&self) -> Result<(), VolumeError> {
        validate_name(&self.name)?;
        validate_block_size(u64::from(self.block_size))?;
        if self.size == 0 || !self.size.is_multiple_of(u64::from(self.block_size)) {
            return Err(VolumeError::BadSize { size: self.size, block_size: self.block_size });
        }
        Ok(())
    }
}

pub fn validate_name(name: &str) -> Result<(), VolumeError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(VolumeError::BadName { name: name.to_string() })
    }
}

pub fn validate_block_size(block_size: u64) -> Result<u32, VolumeError> {
    if block_size.is_power_of_two()
        && (u64::from(MIN_BLOCK_SIZE)..=u64::from(MAX_BLOCK_SIZE)).contains(&block_size)
    {
        Ok(block_size as u32)
    } else {
        Err(VolumeError::BadBlockSize { block_size })
    }
}

/// A volume directory, opened: its metadata and where its image is.
#[derive(Debug, Clone)]
pub struct Volume {
    pub dir: PathBuf,
    pub meta: VolumeMeta,
}

impl Volume {
    pub fn image_path(&self) -> PathBuf {
        self.dir.join(IMAGE_FILE)
    }

    /// Creates a new volume in `dir` (made if missing). The name defaults to the directory's
    /// file name.
    pub fn create(
        dir: &Path,
        size: u64,
        block_size: u64,
        name: Option<&str>,
    ) -> Result<Volume, VolumeError> {
        let block_size = validate_block_size(block_size)?;
        let name = match name {
            Some(n) => n.to_string(),
            None => dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "volume".to_string()),
        };
        let meta = VolumeMeta {
            format_version: FORMAT_VERSION,
            uuid: Uuid::new_v4(),
            name,
            size,
            block_size,
            generation: Some(new_generation()),
        };
        meta.validate()?;
        fs::create_dir_all(dir).map_err(io_err("cannot create volume directory", dir))?;
        let meta_path = dir.join(META_FILE);
        if meta_path.exists() {
            return Err(VolumeError::Exists { dir: dir.to_path_buf() });
        }
        // Crash ordering:
        // 1. the image is created (exclusively) and sized, and fsynced: a sparse file, no data;
        // 2. volume.toml.tmp is written and fsynced;
        // 3. it is renamed to volume.toml and the directory fsynced.
        // A crash before 3 leaves no volume.toml: `open` says "no volume", and `create` can be
        // run again (an orphan image from step 1 is replaced because the volume never existed).
        let image_path = dir.join(IMAGE_FILE);
        let image = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&image_path)
            .map_err(io_err("cannot create image", &image_path))?;
        image.set_len(size).map_err(io_err("cannot size image", &image_path))?;
        image.sync_all().map_err(io_err("cannot fsync image", &image_path))?;
        write_meta(dir, &meta)?;
        Ok(Volume { dir: dir.to_path_buf(), meta })
    }

    /// Opens an existing volume and checks that its image matches the metadata.
    pub fn open(dir: &Path) -> Result<Volume, VolumeError> {
        let meta_path = dir.join(META_FILE);
        let text = match fs::read_to_string(&meta_path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(VolumeError::Missing { dir: dir.to_path_buf() })
            }
            Err(e) => return Err(io_err("cannot read", &meta_path)(e)),
        };
        let meta: VolumeMeta = toml::from_str(&text)
            .map_err(|e| VolumeError::BadMeta { path: meta_path.clone(), reason: e.to_string() })?;
        if meta.format_version != FORMAT_VERSION {
            return Err(VolumeError::UnsupportedFormat {
                path: meta_path,
                found: meta.format_version,
            });
        }
        meta.validate()?;
        let volume = Volume { dir: dir.to_path_buf(), meta };
        let image_path = volume.image_path();
        let actual =
            fs::metadata(&image_path).map_err(io_err("cannot stat image", &image_path))?.len();
        if actual != volume.meta.size {
            return Err(VolumeError::ImageSize {
                path: image_path,
                expected: volume.meta.size,
                actual,
            });
        }
        Ok(volume)
    }

    /// The volume's generation, made and recorded (durably) if it has none yet.
    pub fn ensure_generation(&mut self) -> Result<u64, VolumeError> {
        if let Some(g) = self.meta.generation {
            return Ok(g);
        }
        let mut meta = self.meta.clone();
        meta.generation = Some(new_generation());
        write_meta(&self.dir, &meta)?;
        self.meta = meta;
        Ok(self.meta.generation.unwrap_or(1))
    }

    /// Bytes of the image actually allocated on disk.
    pub fn allocated_bytes(&self) -> Result<u64, VolumeError> {
        use std::os::unix::fs::MetadataExt;
        let path = self.image_path();
        let md = fs::metadata(&path).map_err(io_err("cannot stat image", &path))?;
        Ok(md.blocks() * 512)
    }

    /// A human summary, as `volume info` prints it.
    pub fn describe(&self) -> String {
        format!(
            "name:        {}\nuuid:        {}\nsize:        {} ({} bytes)\nblock size:  {}\nimage:       {}\nformat:      {}\n",
            self.meta.name,
            self.meta.uuid,
            format_size(self.meta.size),
            self.meta.size,
            format_size(u64::from(self.meta.block_size)),
            self.image_path().display(),
            self.meta.format_version,
        )
    }
}

/// Writes `volume.toml` atomically: temp -> fsync -> rename -> fsync(dir).
fn write_meta(dir: &Path, meta: &VolumeMeta) -> Result<(), VolumeError> {
    let tmp = dir.join(format!("{META_FILE}.tmp"));
    let path = dir.join(META_FILE);
    let text = toml::to_string(meta).expect("volume metadata always serialises");
    let mut f = File::create(&tmp).map_err(io_err("cannot write", &tmp))?;
    f.write_all(text.as_bytes()).map_err(io_err("cannot write", &tmp))?;
    f.sync_all().map_err(io_err("cannot fsync", &tmp))?;
    drop(f);
    fs::rename(&tmp, &path).map_err(io_err("cannot rename into place", &path))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("cannot fsync directory", dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_then_open_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("vol1");
        let v = Volume::create(&dir, 1 << 30, 4096, None).unwrap();
        assert_eq!(v.meta.name, "vol1");
        let again = Volume::open(&dir).unwrap();
        assert_eq!(again.meta, v.meta);
        assert_eq!(v.allocated_bytes().unwrap(), 0, "the image is sparse");
        assert!(matches!(
            Volume::create(&dir, 1 << 20, 4096, None),
            Err(VolumeError::Exists { .. })
        ));
    }

    #[test]
    fn rejects_bad_parameters() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("v");
        assert!(matches!(Volume::create(&d, 0, 4096, None), Err(VolumeError::BadSize { .. })));
        assert!(matches!(Volume::create(&d, 4097, 4096, None), Err(VolumeError::BadSize { .. })));
        assert!(matches!(
            Volume::create(&d, 1 << 20, 3000, None),
            Err(VolumeError::BadBlockSize { .. })
        ));
        assert!(matches!(
            Volume::create(&d, 1 << 20, 512, None),
            Err(VolumeError::BadBlockSize { .. })
        ));
        assert!(matches!(
            Volume::create(&d, 1 << 20, 4096, Some("a b")),
            Err(VolumeError::BadName { .. })
        ));
        assert!(matches!(Volume::open(&d), Err(VolumeError::Missing { .. })));
    }
}
