//! What else holds a device, and where a receiver may be created: the checks made
//! before anything is written (mounted, held, backing a loop device; pseudo file
//! systems such as devtmpfs).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::sysfs;

/// Why a block device (device number `rdev`) must not be written: it is held by
/// another device or mounted (itself or one of its partitions).
pub fn block_in_use(rdev: u64) -> Option<String> {
    let name = sysfs::block_name(rdev)?;
    let holders = sysfs::holders(&name);
    if !holders.is_empty() {
        return Some(format!("held by {}", holders.join(", ")));
    }
    let mut numbers = vec![sysfs::major_minor(rdev)];
    numbers.extend(sysfs::partitions(&name));
    sysfs::mounted_at(&numbers).map(|m| format!("mounted at {m}"))
}

/// Why an image file (`st_dev`, `st_ino`) must not be written: it backs a loop device.
pub fn file_in_use(dev: u64, ino: u64) -> Option<String> {
    sysfs::loop_devices().into_iter().find_map(|(name, backing)| {
        let meta = fs::metadata(backing).ok()?;
        ((meta.dev(), meta.ino()) == (dev, ino)).then(|| format!("it backs /dev/{name}"))
    })
}

/// File systems where a missing receiver must not be created as an image: kernel
/// interfaces, and `devtmpfs`, where a mistyped `/dev/...` would become a file in RAM.
const PSEUDO: [&str; 16] = [
    "devtmpfs",
    "proc",
    "sysfs",
    "devpts",
    "cgroup",
    "cgroup2",
    "securityfs",
    "debugfs",
    "tracefs",
    "configfs",
    "fusectl",
    "pstore",
    "bpf",
    "mqueue",
    "efivarfs",
    "hugetlbfs",
];

/// The type of the pseudo file system `path`'s directory is on, if it is on one. `/dev`'s
/// own mount counts as one whatever it is mounted as (a container's `/dev` may be a
/// plain tmpfs); a file system mounted under it, such as `/dev/shm`, does not.
pub fn pseudo_file_system(path: &Path) -> Option<String> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let dir = fs::canonicalize(parent).ok()?;
    let dev = fs::metadata(&dir).ok()?.dev();
    let fs = sysfs::fs_type(dev).unwrap_or_default();
    let on_dev = dir.starts_with("/dev") && fs::metadata("/dev").is_ok_and(|m| m.dev() == dev);
    if PSEUDO.contains(&fs.as_str()) || on_dev {
        let fs = if fs.is_empty() { "a pseudo file system".to_string() } else { fs };
        return Some(if on_dev && !PSEUDO.contains(&fs.as_str()) {
            format!("{fs}, the file system of /dev")
        } else {
            fs
        });
    }
    None
}
