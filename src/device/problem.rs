//! Why a device cannot be used, in words that name the side, the path and the cause.

use std::fmt;
use std::io;

use super::Side;

/// Why a device cannot be used.
#[derive(Debug)]
#[non_exhaustive]
pub enum Problem {
    /// The path does not exist.
    Missing,
    /// The receiver does not exist, and its directory is on a pseudo file system (a
    /// mistyped `/dev/...` path), where no image may be created.
    NoSuchDevice(String),
    /// The path exists but is neither a regular file nor a block device.
    WrongKind(&'static str),
    /// Opening or querying failed.
    Io(&'static str, io::Error),
    /// The source has no data.
    Empty,
    /// The receiver (on side `receiver`) is smaller than the source: refused, unless
    /// `--force` may grow it (a regular file).
    TooSmall {
        /// The receiver's size.
        size: u64,
        /// The source's size.
        source: u64,
        /// The receiver's side, which names the action (remote: PUSH, local: PULL).
        receiver: Side,
        /// The receiver is a regular file, which `--force` grows.
        file: bool,
    },
    /// Source and receiver are the same storage.
    SameDevice(String),
    /// The receiver is mounted, held or backs a loop device.
    InUse(String),
    /// The receiver is a read-only block device.
    ReadOnly,
    /// Another basyn holds the device's lock.
    Locked,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Missing => f.write_str("no such file or device"),
            Problem::NoSuchDevice(fs) => write!(
                f,
                "no such device (a missing receiver is created only on a regular file system, and this directory is on {fs})"
            ),
            Problem::WrongKind(what) => write!(f, "is {what}, not a regular file or block device"),
            Problem::Io(doing, e) => write!(f, "cannot {doing}: {}", describe_io(e)),
            Problem::Empty => f.write_str("There is nothing to sync: the source is empty (size 0)"),
            Problem::TooSmall { size, source, receiver, file } => {
                // The original's words, which scripts match.
                let (action, other) = match receiver {
                    Side::Remote => ("PUSH", Side::Local),
                    Side::Local => ("PULL", Side::Remote),
                };
                write!(
                    f,
                    "Cannot {action} because {receiver} device size ({size}) is smaller than {other} device size ({source})"
                )?;
                f.write_str(if *file { " (--force grows a regular file)" } else { "" })
            }
            Problem::SameDevice(other) => write!(f, "is the same device as the source {other} (use --force to allow)"),
            Problem::InUse(why) => write!(f, "is in use: {why} (use --force to write anyway)"),
            Problem::ReadOnly => f.write_str("is a read-only block device"),
            Problem::Locked => f.write_str("is in use by another basyn (its lock is held)"),
        }
    }
}

/// A device that cannot be used, naming its side and path.
#[derive(Debug, thiserror::Error)]
#[error("{side} {path}: {problem}")]
pub struct DeviceError {
    /// Which end.
    pub side: Side,
    /// The path as the user gave it.
    pub path: String,
    /// What is wrong.
    pub problem: Problem,
}

/// `strerror`-style text for an I/O error, without Rust's "(os error N)" suffix.
pub fn describe_io(e: &io::Error) -> String {
    let text = e.to_string();
    let text = match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => text,
    }
}
