//! What the kernel says about block devices and this boot: everything basyn reads
//! under `/sys/class/block`, `/sys/dev/block` and `/proc`. Nothing here decides
//! anything; `device` (safety checks) and `stamp` (freshness) interpret it.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Environment variable that replaces the boot id, so tests can simulate a reboot.
pub const BOOT_ID_ENV: &str = "BASYN_TEST_BOOT_ID";

/// The running kernel's boot id (or the test override); empty if unknown.
pub fn boot_id() -> String {
    if let Some(id) = std::env::var_os(BOOT_ID_ENV) {
        return id.to_string_lossy().into_owned();
    }
    fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// A process (other than this one) with the file `key` open, found through
/// `/proc/PID/fd`; an error if some process's descriptors could not be looked at.
pub fn opener(key: (u64, u64)) -> io::Result<Option<u32>> {
    let me = std::process::id();
    let procs = fs::read_dir("/proc")?;
    for pid in procs.filter_map(|e| e.ok()).filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()) {
        if pid == me {
            continue;
        }
        let fds = match fs::read_dir(format!("/proc/{pid}/fd")) {
            Ok(fds) => fds,
            // The process ended meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for fd in fds.filter_map(|e| e.ok()) {
            if fs::metadata(fd.path()).is_ok_and(|m| (m.dev(), m.ino()) == key) {
                return Ok(Some(pid));
            }
        }
    }
    Ok(None)
}

/// The command name of process `pid` (`/proc/PID/comm`), or `?`.
pub fn process_name(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm")).map(|s| s.trim().to_string()).unwrap_or_else(|_| "?".into())
}

/// Major and minor number of a device number.
pub fn major_minor(rdev: u64) -> (u32, u32) {
    (libc::major(rdev as libc::dev_t), libc::minor(rdev as libc::dev_t))
}

/// The kernel name of a block device (`sda1`, `loop3`) from its device number.
pub fn block_name(rdev: u64) -> Option<String> {
    let (maj, min) = major_minor(rdev);
    let link = fs::read_link(format!("/sys/dev/block/{maj}:{min}")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

fn class(name: &str) -> PathBuf {
    Path::new("/sys/class/block").join(name)
}

/// The backing file of loop device `name`, if it is one.
pub fn loop_backing_file(name: &str) -> Option<PathBuf> {
    let text = fs::read_to_string(class(name).join("loop/backing_file")).ok()?;
    Some(PathBuf::from(text.trim()))
}

/// Every loop device with its backing file.
pub fn loop_devices() -> Vec<(String, PathBuf)> {
    let Ok(dir) = fs::read_dir("/sys/block") else { return Vec::new() };
    dir.filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("loop"))
        .filter_map(|name| loop_backing_file(&name).map(|b| (name, b)))
        .collect()
}

/// The devices holding `name` (device-mapper targets, md arrays, ...).
pub fn holders(name: &str) -> Vec<String> {
    fs::read_dir(class(name).join("holders"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// Device numbers of the partitions of disk `name`.
pub fn partitions(name: &str) -> Vec<(u32, u32)> {
    let Ok(dir) = fs::read_dir(class(name)) else { return Vec::new() };
    dir.filter_map(|e| e.ok())
        .filter(|e| e.path().join("partition").exists())
        .filter_map(|e| fs::read_to_string(e.path().join("dev")).ok())
        .filter_map(|s| parse_major_minor(s.trim()))
        .collect()
}

fn parse_major_minor(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// For a partition (`/sys/class/block/sda1/partition` exists), the whole disk's name.
pub fn parent_disk(name: &str) -> Option<String> {
    let dir = class(name);
    if !dir.join("partition").exists() {
        return None;
    }
    let real = fs::canonicalize(&dir).ok()?;
    Some(real.parent()?.file_name()?.to_string_lossy().into_owned())
}

/// The kernel's sequence number of disk `name` (Linux 5.15+).
pub fn diskseq(name: &str) -> Option<u64> {
    fs::read_to_string(class(name).join("diskseq")).ok()?.trim().parse().ok()
}

/// Sectors written and discarded, from `/sys/class/block/NAME/stat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    /// Sectors written.
    pub sectors: u64,
    /// Sectors discarded (0 on kernels without discard statistics).
    pub discard_sectors: u64,
}

/// The write-side counters of block device `name`.
pub fn written(name: &str) -> io::Result<Written> {
    let path = class(name).join("stat");
    let text = fs::read_to_string(&path)?;
    parse_stat(&text).ok_or_else(|| io::Error::other(format!("unexpected contents of {}", path.display())))
}

fn parse_stat(text: &str) -> Option<Written> {
    let f: Vec<u64> = text.split_whitespace().filter_map(|v| v.parse().ok()).collect();
    // Field 7 (index 6) is sectors written; field 14 (index 13) sectors discarded.
    Some(Written { sectors: *f.get(6)?, discard_sectors: f.get(13).copied().unwrap_or(0) })
}

/// Mount point of the first mounted file system on one of `numbers`.
pub fn mounted_at(numbers: &[(u32, u32)]) -> Option<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let mut fields = line.split(' ');
        let majmin = fields.nth(2)?;
        let mount_point = fields.nth(1)?;
        parse_major_minor(majmin).filter(|n| numbers.contains(n)).map(|_| mount_point.to_string())
    })
}

/// The file system type (`ext4`, `tmpfs`, `devtmpfs`, `proc`, ...) of the mount whose
/// device number is `dev` (`st_dev` of a file on it).
pub fn fs_type(dev: u64) -> Option<String> {
    let numbers = major_minor(dev);
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let majmin = line.split(' ').nth(2)?;
        let (_, after) = line.split_once(" - ")?;
        (parse_major_minor(majmin)? == numbers).then(|| after.split(' ').next().unwrap_or("").to_string())
    })
}

/// The machine's memory in bytes (`MemTotal` of `/proc/meminfo`), 0 if unknown.
pub fn memory_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stat_file_gives_written_and_discarded_sectors() {
        let old = "  100 0 800 5  42 0 336 7 0 12 12\n";
        assert_eq!(parse_stat(old), Some(Written { sectors: 336, discard_sectors: 0 }));
        let new = "1 2 3 4 5 6 700 8 9 10 11 12 13 64 15 16 17\n";
        assert_eq!(parse_stat(new), Some(Written { sectors: 700, discard_sectors: 64 }));
        assert_eq!(parse_stat("1 2 3"), None);
    }

    #[test]
    fn device_numbers_parse_and_split() {
        assert_eq!(parse_major_minor("7:3"), Some((7, 3)));
        assert_eq!(parse_major_minor("7-3"), None);
        assert_eq!(major_minor(libc::makedev(259, 12) as u64), (259, 12));
    }

    #[test]
    fn dev_is_a_pseudo_file_system_and_proc_is_proc() {
        let dev = |p: &str| std::os::unix::fs::MetadataExt::dev(&fs::metadata(p).unwrap());
        assert_eq!(fs_type(dev("/proc")).as_deref(), Some("proc"));
        let devfs = fs_type(dev("/dev")).unwrap_or_default();
        assert!(devfs == "devtmpfs" || devfs == "tmpfs", "/dev is {devfs}");
    }

    #[test]
    fn the_root_file_system_is_found_mounted() {
        let meta = fs::metadata("/").unwrap();
        let dev = std::os::unix::fs::MetadataExt::dev(&meta);
        assert!(mounted_at(&[major_minor(dev)]).is_some());
    }
}
