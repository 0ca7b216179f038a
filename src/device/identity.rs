//! Which device is which: the side the user named it on, its kind, and an identity
//! precise enough to tell whether two paths name the same storage.

use std::fmt;

/// Which end of the transfer a device is on, as the user named it (`--local`/`--remote`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The `--local` device.
    Local,
    /// The `--remote` device.
    Remote,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Local => "local",
            Side::Remote => "remote",
        })
    }
}

/// What kind of thing a device path names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    /// A regular file (a disk image).
    File,
    /// A block device.
    Block,
}

/// Who a device is, precisely enough to tell whether two paths name the same storage.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    /// The kernel's boot id: identities from different boots or hosts never match.
    pub boot_id: String,
    /// File or block device.
    pub kind: Kind,
    /// `st_dev` and `st_ino` of the path itself.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Device number of a block device (`st_rdev`), 0 for files.
    pub rdev: u64,
    /// For a loop device, `st_dev`/`st_ino` of its backing file.
    pub backing: Option<(u64, u64)>,
}

impl Identity {
    /// True when both identities certainly name the same storage on the same running host.
    pub fn same_storage(&self, other: &Identity) -> bool {
        if self.boot_id.is_empty() || self.boot_id != other.boot_id {
            return false;
        }
        let key = |i: &Identity| match i.kind {
            Kind::File => (0, i.dev, i.ino),
            Kind::Block => (1, i.rdev, 0),
        };
        let file_key = |i: &Identity| (i.kind == Kind::File).then_some((i.dev, i.ino));
        key(self) == key(other)
            || (self.backing.is_some() && self.backing == file_key(other))
            || (other.backing.is_some() && other.backing == file_key(self))
            // Two loop devices over one file.
            || (self.backing.is_some() && self.backing == other.backing)
    }
}
