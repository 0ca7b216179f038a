//! A write lease (`F_SETLEASE`, `F_WRLCK`) on a regular-file receiver: the kernel grants
//! it only while no other process has the file open (a running VM, another copy, a
//! mapping), and breaks it when any other process opens the file, for reading or writing.
//! basyn cannot tell its own writes to a file from another writer's in the file's
//! timestamps, so this is how it learns that someone else may have written the receiver
//! during the run.
//!
//! The break is noticed by polling the lease, never by a handler: the kernel's
//! notification goes to SIGURG, which is ignored by default. A broken lease is released at
//! once, so that the other process is not kept waiting for the kernel's break timeout
//! (`/proc/sys/fs/lease-break-time`, 45 s).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// `F_SETSIG` (Linux, `<fcntl.h>`): the signal a lease break raises.
const F_SETSIG: libc::c_int = 10;

/// The lease on one open file.
#[derive(Debug, Default)]
pub struct Lease {
    held: bool,
    broken: AtomicBool,
}

/// What became of an attempt to lease a file.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// Granted: another process opening the file will be noticed.
    Held,
    /// Another process has the file open now.
    Busy,
    /// The file system or the user's rights allow no lease (NFS, FUSE, not the owner).
    Unsupported,
}

impl Lease {
    /// Takes a write lease on `file`.
    pub fn take(file: &File) -> (Lease, Taken) {
        let fd = file.as_raw_fd();
        // SAFETY: fcntl on a valid descriptor with integer arguments.
        let rc = unsafe {
            libc::fcntl(fd, F_SETSIG, libc::SIGURG);
            libc::fcntl(fd, libc::F_SETLEASE, libc::F_WRLCK)
        };
        let taken = match rc {
            0 => Taken::Held,
            _ if std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN) => Taken::Busy,
            _ => Taken::Unsupported,
        };
        (Lease { held: taken == Taken::Held, broken: AtomicBool::new(false) }, taken)
    }

    /// True if the lease was taken and has not been broken yet. A lease found breaking
    /// is released here, and stays broken.
    pub fn intact(&self, file: &File) -> bool {
        if !self.held || self.broken.load(Ordering::SeqCst) {
            return false;
        }
        // SAFETY: fcntl on a valid descriptor.
        let now = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLEASE) };
        if now == libc::F_WRLCK {
            return true;
        }
        self.broken.store(true, Ordering::SeqCst);
        // SAFETY: as above; releasing lets the other process's open go on at once.
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
        false
    }

    /// True if the lease was taken and another process has opened the file since.
    pub fn broken(&self, file: &File) -> bool {
        self.held && !self.intact(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_lease_breaks_when_another_process_opens_the_file_and_is_released_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.img");
        std::fs::write(&p, b"data").unwrap();
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
        let (lease, taken) = Lease::take(&f);
        if taken == Taken::Unsupported {
            assert!(std::env::var_os("CI").is_none(), "no lease on this file system");
            return;
        }
        assert_eq!(taken, Taken::Held);
        assert!(lease.intact(&f) && !lease.broken(&f));
        let started = Instant::now();
        let mut cat = std::process::Command::new("cat").arg(&p).stdout(std::process::Stdio::null()).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while lease.intact(&f) {
            assert!(Instant::now() < deadline, "the lease never broke");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(cat.wait().unwrap().success());
        assert!(started.elapsed() < Duration::from_secs(10), "the other process waited for the break timeout");
        assert!(lease.broken(&f), "a broken lease stays broken");
        // A file someone else has open cannot be leased.
        let other = File::open(&p).unwrap();
        let g = std::fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
        assert_eq!(Lease::take(&g).1, Taken::Busy);
        drop(other);
    }
}
