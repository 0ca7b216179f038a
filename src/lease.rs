//! A write lease (`F_SETLEASE`, `F_WRLCK`) on a regular-file receiver: the kernel grants
//! it only while no other process has the file open (a running VM, another copy, a
//! mapping), and breaks it when any other process opens the file, for reading or writing.
//! basyn cannot tell its own writes to a file from another writer's in the file's
//! timestamps, so this is how it learns that someone else may have written the receiver
//! during the run.
//!
//! The break is noticed by a thread polling the lease, never by a signal handler: the
//! kernel's notification goes to SIGURG, which is ignored by default. A broken lease is
//! released within 20 ms, so that the other process is not kept waiting for the kernel's
//! break timeout (`/proc/sys/fs/lease-break-time`, 45 s).
//!
//! A loop device's backing file cannot be leased (the loop driver holds it open for
//! writing), so a loop-device receiver is watched differently ([`BackingWatch`]): an
//! inotify watch for `IN_OPEN` on the backing file, taken before looking through `/proc`
//! for processes that already have it open. The loop driver never opens the file again
//! and its own I/O raises no open event, so any event is another process.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::sysfs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

/// `F_SETSIG` (Linux, `<fcntl.h>`): the signal a lease break raises.
const F_SETSIG: libc::c_int = 10;

/// The lease on one open file, watched by a thread of its own.
#[derive(Debug, Default)]
pub struct Lease {
    state: Arc<State>,
    watcher: Option<mpsc::Sender<()>>,
}

#[derive(Debug, Default)]
struct State {
    held: bool,
    broken: AtomicBool,
}

/// How often the watcher looks: the longest another process's open waits on basyn.
const POLL: Duration = Duration::from_millis(20);

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
    /// Takes a write lease on `file`, watched until the lease is dropped.
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
        let state = Arc::new(State { held: taken == Taken::Held, broken: AtomicBool::new(false) });
        // The watcher works on its own descriptor of the same open file (the lease belongs
        // to that): the break is seen and released within POLL whatever basyn is doing.
        let watcher = match (taken == Taken::Held, file.try_clone()) {
            (true, Ok(dup)) => {
                let (stop, stopped) = mpsc::channel();
                let s = state.clone();
                let spawned =
                    std::thread::Builder::new().name("basyn-lease".into()).spawn(move || watch(&dup, &s, &stopped));
                spawned.ok().map(|_| stop)
            }
            _ => None,
        };
        (Lease { state, watcher }, taken)
    }

    /// True if the lease was taken and another process has opened the file since.
    pub fn broken(&self, file: &File) -> bool {
        self.state.held && (self.state.broken.load(Ordering::SeqCst) || !check(file, &self.state))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.watcher = None;
    }
}

/// Looks at the lease until it breaks or `stop` is dropped.
fn watch(file: &File, state: &State, stop: &mpsc::Receiver<()>) {
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(POLL) {
        if !check(file, state) {
            return;
        }
    }
}

/// True if the lease is still whole; a lease found breaking is released at once, and
/// stays broken.
fn check(file: &File, state: &State) -> bool {
    if state.broken.load(Ordering::SeqCst) {
        return false;
    }
    // SAFETY: fcntl on a valid descriptor.
    let now = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLEASE) };
    if now == libc::F_WRLCK {
        return true;
    }
    state.broken.store(true, Ordering::SeqCst);
    // SAFETY: as above; releasing lets the other process's open go on at once.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
    false
}

/// An inotify watch for opens of a loop device's backing file.
#[derive(Debug)]
pub struct BackingWatch {
    fd: OwnedFd,
    opened: AtomicBool,
}

/// Why a backing file is not watched.
#[derive(Debug, PartialEq, Eq)]
pub enum Unwatched {
    /// This process has the file open now.
    Busy(u32),
    /// No watch can be set, or `/proc` cannot be read whole (not root).
    Unsupported,
}

/// `IN_OPEN` and `IN_Q_OVERFLOW` (`<sys/inotify.h>`): a lost event counts as an open.
const IN_OPEN: u32 = 0x20;
const IN_Q_OVERFLOW: u32 = 0x4000;

impl BackingWatch {
    /// Starts watching `backing` (identified by `key`, `st_dev` and `st_ino`).
    pub fn take(backing: &Path, key: (u64, u64)) -> Result<BackingWatch, Unwatched> {
        // SAFETY: a plain syscall; the descriptor is owned at once.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(Unwatched::Unsupported);
        }
        // SAFETY: `raw` is a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let Ok(c_path) = std::ffi::CString::new(backing.as_os_str().as_bytes()) else {
            return Err(Unwatched::Unsupported);
        };
        // SAFETY: a valid descriptor and a NUL-terminated path.
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c_path.as_ptr(), IN_OPEN) } < 0 {
            return Err(Unwatched::Unsupported);
        }
        // The file is the one meant (not replaced under its name), and nobody had it open
        // before the watch began.
        if std::fs::metadata(backing).map(|m| (m.dev(), m.ino())).ok() != Some(key) {
            return Err(Unwatched::Unsupported);
        }
        match sysfs::opener(key) {
            Ok(None) => Ok(BackingWatch { fd, opened: AtomicBool::new(false) }),
            Ok(Some(pid)) => Err(Unwatched::Busy(pid)),
            Err(_) => Err(Unwatched::Unsupported),
        }
    }

    /// True if another process has opened the backing file since the watch began.
    pub fn opened(&self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reading into a buffer of the given length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            let mut at = 0;
            // Each event: wd (4), mask (4), cookie (4), len (4), then len bytes of name.
            while at + 16 <= n as usize {
                let field = |i: usize| u32::from_ne_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
                if field(at + 4) & (IN_OPEN | IN_Q_OVERFLOW) != 0 {
                    self.opened.store(true, Ordering::SeqCst);
                }
                at += 16 + field(at + 12) as usize;
            }
        }
        self.opened.load(Ordering::SeqCst)
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
        assert!(!lease.broken(&f));
        let started = Instant::now();
        let mut cat = std::process::Command::new("cat").arg(&p).stdout(std::process::Stdio::null()).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        // The watcher releases the lease without anyone asking.
        assert!(cat.wait().unwrap().success());
        assert!(Instant::now() < deadline);
        assert!(started.elapsed() < Duration::from_secs(10), "the other process waited for the break timeout");
        assert!(lease.broken(&f), "a broken lease stays broken");
        // A file someone else has open cannot be leased.
        let other = File::open(&p).unwrap();
        let g = std::fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
        assert_eq!(Lease::take(&g).1, Taken::Busy);
        drop(other);
    }
}
