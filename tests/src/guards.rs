//! Guards for kernel state a test creates (FUSE mounts, loop devices, mounts, frozen
//! filesystems), undone on drop even when the test fails. Declare them in creation order: Rust
//! drops locals in reverse, which is the right order to tear them down.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::proc::{require_tool, run, run_ok, wait_timeout};

const LIMIT: Duration = Duration::from_secs(60);

/// `nbdfuse MOUNTPOINT/FILE URI`, running in the foreground as our child.
#[derive(Debug)]
pub struct Fuse {
    child: Child,
    pub mountpoint: PathBuf,
    pub file: PathBuf,
}

impl Fuse {
    /// Mounts `uri` as `mountpoint/disk` and waits until the file is there.
    pub fn mount(mountpoint: &Path, uri: &str, log: &Path) -> Fuse {
        require_tool("nbdfuse");
        require_tool("fusermount3");
        std::fs::create_dir_all(mountpoint).expect("create the FUSE mountpoint");
        let pidfile = mountpoint.with_extension("pid");
        let file = mountpoint.join("disk");
        let child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(&file)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("create the nbdfuse log"))
            .spawn()
            .expect("start nbdfuse");
        let mut fuse = Fuse { child, mountpoint: mountpoint.to_path_buf(), file };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(pidfile.exists() && fuse.file.exists()) {
            if let Ok(Some(status)) = fuse.child.try_wait() {
                panic!(
                    "nbdfuse {uri} exited ({status}) before it was ready\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "nbdfuse {uri} not ready within 30 s");
            thread::sleep(Duration::from_millis(50));
        }
        fuse
    }
}

impl Drop for Fuse {
    fn drop(&mut self) {
        let _ = run(Command::new("fusermount3").arg("-u").arg(&self.mountpoint), LIMIT);
        if wait_timeout(&mut self.child, Duration::from_secs(10)).is_none() {
            let _ = run(Command::new("umount").arg("-l").arg(&self.mountpoint), LIMIT);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A loop device over a file (`losetup -f --show FILE`), detached on drop.
#[derive(Debug)]
pub struct Loop {
    pub device: PathBuf,
}

impl Loop {
    pub fn attach(file: &Path) -> Loop {
        require_tool("losetup");
        let out = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(file), LIMIT);
        Loop { device: PathBuf::from(out.stdout.trim()) }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = run(Command::new("losetup").arg("-d").arg(&self.device), LIMIT);
    }
}

/// A mounted filesystem, unmounted on drop (lazily if it is busy).
#[derive(Debug)]
pub struct Mount {
    pub target: PathBuf,
    mounted: bool,
}

impl Mount {
    pub fn new(device: &Path, target: &Path) -> Mount {
        require_tool("mount");
        std::fs::create_dir_all(target).expect("create the mount target");
        run_ok(Command::new("mount").arg(device).arg(target), LIMIT);
        Mount { target: target.to_path_buf(), mounted: true }
    }

    /// Unmounts now, panicking if that fails.
    pub fn unmount(mut self) {
        self.mounted = false;
        run_ok(Command::new("umount").arg(&self.target), LIMIT);
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            let out = run(Command::new("umount").arg(&self.target), LIMIT);
            if !out.success() {
                let _ = run(Command::new("umount").arg("-l").arg(&self.target), LIMIT);
            }
        }
    }
}

/// `fsfreeze -f MOUNTPOINT`, thawed on drop (a frozen filesystem left behind blocks unmount).
#[derive(Debug)]
pub struct Frozen {
    target: PathBuf,
    frozen: bool,
}

impl Frozen {
    pub fn freeze(target: &Path) -> Frozen {
        require_tool("fsfreeze");
        run_ok(Command::new("fsfreeze").arg("-f").arg(target), LIMIT);
        Frozen { target: target.to_path_buf(), frozen: true }
    }

    /// Thaws now, panicking if that fails.
    pub fn thaw(mut self) {
        self.frozen = false;
        run_ok(Command::new("fsfreeze").arg("-u").arg(&self.target), LIMIT);
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if self.frozen {
            let _ = run(Command::new("fsfreeze").arg("-u").arg(&self.target), LIMIT);
        }
    }
}
