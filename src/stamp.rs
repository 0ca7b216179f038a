//! Freshness stamps: what must be unchanged for a saved state to still describe a device.
//!
//! - A regular file: device and inode, size, mtime and ctime to the nanosecond. ctime
//!   cannot be set by users, so a write whose mtime was put back is still seen.
//! - A block device: the boot id (the kernel's counters restart at boot), the device
//!   number and size, and the kernel's write and discard counters
//!   (`/sys/class/block/NAME/stat`) of the device and, for a partition, of its disk. A
//!   loop device also carries its backing file's stamp, since writes to that file bypass
//!   the loop device's counters.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::device::{Device, Kind};
use crate::sysfs;

/// A regular file's stamp.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, seconds and nanoseconds.
    pub mtime: (i64, i64),
    /// Status change time, seconds and nanoseconds.
    pub ctime: (i64, i64),
}

/// The kernel's write-side counters of one block device. Only sector counts are kept:
/// "writes completed" also counts empty cache flushes, which basyn's own fsync causes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteCounters {
    /// Kernel name (`sda1`).
    pub name: String,
    /// Sectors written.
    pub sectors: u64,
    /// Sectors discarded (0 on kernels without discard statistics).
    pub discard_sectors: u64,
}

/// What must not change for a state to stay fresh.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stamp {
    /// A regular file.
    File(FileStamp),
    /// A block device.
    Block {
        /// Boot id when the stamp was taken.
        boot_id: String,
        /// Device number.
        rdev: u64,
        /// Size in bytes.
        size: u64,
        /// Counters of the device, then of its whole disk for a partition.
        counters: Vec<WriteCounters>,
        /// The backing file of a loop device.
        backing: Option<FileStamp>,
        /// The kernel's sequence number of this disk instance (`diskseq`, Linux 5.15+):
        /// a snapshot re-created under the same device number gets another one.
        diskseq: Option<u64>,
        /// Why freshness cannot be proven for this kind of device, if it cannot.
        unverifiable: Option<String>,
    },
    /// Not verifiable: trusted because the user declares it. No longer written (bitmaps
    /// have their own format, `bitmap_file`); kept so that bitmaps written as states by
    /// earlier builds still decode (and are refused as no bitmap).
    Declared,
}

/// Whether a saved state may be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Freshness {
    /// Provably describes the device now.
    Fresh,
    /// The device changed since the state was saved.
    Stale(String),
    /// Nothing proves it either way (e.g. after a reboot); usable only with `--trust-state`.
    Unverifiable(String),
}

fn file_stamp(meta: &fs::Metadata) -> FileStamp {
    FileStamp {
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.len(),
        mtime: (meta.mtime(), meta.mtime_nsec()),
        ctime: (meta.ctime(), meta.ctime_nsec()),
    }
}

/// Timestamps move in coarse clock ticks: a write in the same tick as the stamp would
/// leave mtime and ctime unchanged. A stamp is therefore taken only once the file's last
/// change is comfortably older than now, so that any later write shows.
const TICK: std::time::Duration = std::time::Duration::from_millis(25);

/// The coarsest timestamp granularity basyn allows for: whole seconds (ext4 with 128-byte
/// inodes, ext3, XFS before v5) or two (FAT's mtime).
const COARSE: std::time::Duration = std::time::Duration::from_secs(2);

/// How old the last change must be before a stamp can show any later one. A ctime with no
/// nanoseconds says the file system keeps whole seconds (on a fine-grained one that has a
/// chance of one in 10⁹, and only costs a wait): a write later in that second would not
/// move it, so the stamp waits until the clock is past the change by the coarsest
/// granularity there is.
fn settle_time(ctime_nsec: i64) -> std::time::Duration {
    if ctime_nsec == 0 { COARSE + TICK } else { TICK }
}

fn settled_metadata(path: &Path) -> io::Result<fs::Metadata> {
    loop {
        let meta = fs::metadata(path)?;
        let changed = std::time::UNIX_EPOCH
            + std::time::Duration::new(meta.ctime().max(0) as u64, meta.ctime_nsec().clamp(0, 999_999_999) as u32);
        let settle = settle_time(meta.ctime_nsec());
        match std::time::SystemTime::now().duration_since(changed) {
            Ok(age) if age >= settle => return Ok(meta),
            // A ctime in the future (clock changes) cannot settle: take it as it is.
            Err(_) => return Ok(meta),
            Ok(age) => std::thread::sleep(settle - age + std::time::Duration::from_millis(1)),
        }
    }
}

/// Makes a regular file's dirty pages durable before it is stamped. Writing them back
/// write-protects them, so a process that keeps a shared writable mapping and writes the
/// same page again later takes a page fault, which moves mtime and ctime; without this, a
/// page still dirty and writable from before could be written again unseen. A file that
/// cannot be synced because nothing there can be dirty (read-only file system, a file
/// system without fsync) is stamped as it is.
fn flush_mappings(device: &Device) -> io::Result<()> {
    match device.flush_cache() {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EROFS | libc::EINVAL | libc::EOPNOTSUPP)) => Ok(()),
        other => other,
    }
}

/// Stamps `device` now. For a block device its dirty page cache is flushed first, so
/// that writes still in memory show up in the counters.
pub fn take(device: &Device) -> io::Result<Stamp> {
    match device.kind() {
        Kind::File => {
            flush_mappings(device)?;
            Ok(Stamp::File(file_stamp(&settled_metadata(device.path())?)))
        }
        Kind::Block => {
            device.flush_cache()?;
            let rdev = device.identity().rdev;
            let name = sysfs::block_name(rdev)
                .ok_or_else(|| io::Error::other("the kernel does not list this block device in /sys"))?;
            let disk = sysfs::parent_disk(&name);
            let mut counters = vec![read_counters(&name)?];
            if let Some(disk) = &disk {
                counters.push(read_counters(disk)?);
            }
            let backing =
                sysfs::loop_backing_file(&name).and_then(|p| settled_metadata(&p).ok()).map(|m| file_stamp(&m));
            // A partition has no sequence number of its own: its disk's tells.
            let diskseq = sysfs::diskseq(&name).or_else(|| disk.as_deref().and_then(sysfs::diskseq));
            let unverifiable = remote_kind(&name);
            Ok(Stamp::Block {
                boot_id: sysfs::boot_id(),
                rdev,
                size: device.size(),
                counters,
                backing,
                diskseq,
                unverifiable,
            })
        }
    }
}

/// Devices whose content can change without this kernel's counters moving: network and
/// replicated block devices, and kinds basyn does not know. Local disks, partitions,
/// loop, md and device-mapper devices are counted here.
fn remote_kind(name: &str) -> Option<String> {
    const LOCAL: [&str; 9] = ["sd", "nvme", "vd", "xvd", "hd", "mmcblk", "loop", "md", "dm-"];
    if LOCAL.iter().any(|p| name.starts_with(p)) {
        None
    } else {
        Some(format!(
            "{name} may be written elsewhere than through this kernel (network, replicated or unknown kind of device)"
        ))
    }
}

/// The stamp with only the device's own counters: what "written during this run" is
/// judged on. The whole disk's counters (for a partition) also move when a sibling
/// partition is written; they matter only for freshness across runs.
pub fn own_counters(stamp: &Stamp) -> Stamp {
    let mut s = stamp.clone();
    if let Stamp::Block { counters, .. } = &mut s {
        counters.truncate(1);
    }
    s
}

fn read_counters(name: &str) -> io::Result<WriteCounters> {
    let w = sysfs::written(name)?;
    Ok(WriteCounters { name: name.to_string(), sectors: w.sectors, discard_sectors: w.discard_sectors })
}

/// The role a device plays in a run, which decides what counts as someone else's write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Only read: any change of its stamp is someone else's.
    Read,
    /// Written by basyn: re-stamped after fdatasync.
    Receiver,
}

/// True if someone other than basyn wrote the device between the stamps `start` and
/// `now`: for a device only read, any change of its own stamp; for a receiving block
/// device, counters that moved by more than `own_sectors` (what basyn's own writes can
/// add) or discards, which basyn never issues. A regular-file receiver's own writes
/// cannot be told apart from another writer's, so it is never judged written by others.
pub fn written_by_others(start: &Stamp, now: &Stamp, role: Role, own_sectors: u64) -> bool {
    match role {
        Role::Read => own_counters(start) != own_counters(now),
        Role::Receiver => match (start, now) {
            (Stamp::Block { counters: a, boot_id: ba, .. }, Stamp::Block { counters: b, boot_id: bb, .. }) => {
                if ba != bb || a.len() != b.len() || a.is_empty() {
                    return true;
                }
                // Only the device's own counters: a sibling partition's writes move the disk's.
                let delta = b[0].sectors.saturating_sub(a[0].sectors);
                delta > own_sectors || a[0].discard_sectors != b[0].discard_sectors
            }
            _ => false,
        },
    }
}

/// Compares a saved stamp with the device's stamp now.
pub fn compare(saved: &Stamp, now: &Stamp) -> Freshness {
    match (saved, now) {
        (Stamp::File(a), Stamp::File(b)) => {
            if (a.dev, a.ino) != (b.dev, b.ino) {
                Freshness::Stale("was replaced (another inode)".into())
            } else if a.size != b.size {
                Freshness::Stale(format!("changed size from {} to {}", a.size, b.size))
            } else if a != b {
                Freshness::Stale("was modified since (mtime/ctime changed)".into())
            } else {
                Freshness::Fresh
            }
        }
        (
            Stamp::Block { boot_id: ba, rdev: ra, size: sa, counters: ca, backing: ka, diskseq: da, unverifiable: ua },
            Stamp::Block { boot_id: bb, rdev: rb, size: sb, counters: cb, backing: kb, diskseq: db, .. },
        ) => {
            if let Some(why) = ua {
                Freshness::Unverifiable(why.clone())
            } else if ba.is_empty() || ba != bb {
                Freshness::Unverifiable(
                    "the machine rebooted since the state was saved, so its write counters cannot tell".into(),
                )
            } else if ra != rb || da != db {
                Freshness::Stale("is another device now (device number or disk sequence number changed)".into())
            } else if da.is_none() && ka.is_none() {
                // (A loop device is identified by its backing file's stamp even then.)
                Freshness::Unverifiable(
                    "this kernel gives no disk sequence numbers, so a re-created device cannot be told from the old one"
                        .into(),
                )
            } else if sa != sb {
                Freshness::Stale(format!("changed size from {sa} to {sb}"))
            } else if ca != cb {
                Freshness::Stale("was written since (kernel write counters moved)".into())
            } else if ka != kb {
                Freshness::Stale("had its loop backing file modified since".into())
            } else {
                Freshness::Fresh
            }
        }
        _ => Freshness::Stale("is a different kind of device now".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Side;

    #[test]
    fn a_file_write_with_its_mtime_put_back_is_still_seen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        fs::write(&p, vec![0u8; 8192]).unwrap();
        let dev = Device::open_read(&p, Side::Local).unwrap();
        let before = take(&dev).unwrap();
        assert_eq!(compare(&before, &take(&dev).unwrap()), Freshness::Fresh);
        let mtime = fs::metadata(&p).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        {
            use std::os::unix::fs::FileExt;
            let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
            f.write_all_at(b"x", 100).unwrap();
            f.set_modified(mtime).unwrap();
        }
        assert_eq!(fs::metadata(&p).unwrap().modified().unwrap(), mtime);
        assert!(matches!(compare(&before, &take(&dev).unwrap()), Freshness::Stale(_)));
    }

    #[test]
    fn another_boot_is_unverifiable() {
        let block = |boot: &str, seq: u64| Stamp::Block {
            boot_id: boot.into(),
            rdev: 1,
            size: 2,
            counters: vec![],
            backing: None,
            diskseq: Some(seq),
            unverifiable: None,
        };
        let (a, b, recreated) = (block("a", 7), block("b", 7), block("a", 8));
        assert!(matches!(compare(&a, &recreated), Freshness::Stale(_)));
        assert!(matches!(compare(&a, &b), Freshness::Unverifiable(_)));
        assert_eq!(compare(&a, &a.clone()), Freshness::Fresh);
    }
}
