//! A FUSE file system of the tests' own that fails on purpose: it serves one file,
//! `disk.img`, backed by a real image file in a temp dir, and fails reads or writes of a
//! byte range (EIO), or answers reads there short, as the test says at run time.
//!
//! Why this way: the `fuser` crate (a dev-dependency, default features off) speaks the
//! FUSE protocol in Rust, needs no libfuse C library to build and mounts directly as root
//! (`fusermount3`, package `fuse3`, when it must go through the helper), and runs the file
//! system as a thread of the test, so a test flips the fault ([`FaultyFile::set`]) between
//! two runs of basyn and counts how often it was hit ([`FaultyFile::hits`]) with no file
//! or process to coordinate. A script (fusepy) would need an interpreter and a control
//! file; a device-mapper `error` target only fails whole sectors of a block device and
//! cannot answer short.
//!
//! Every open gets `FOPEN_DIRECT_IO`: reads and writes bypass the kernel's page cache and
//! reach this code with the caller's offsets and sizes, and a short answer is the return
//! value of the caller's read(2) (without it the kernel pads a short page read with
//! zeros, and caches pages that would hide a fault). Attributes come from the backing
//! file with a time-to-live of zero, so basyn's stamps (size, mtime, ctime) see every
//! change. `SEEK_DATA`/`SEEK_HOLE`, leases and `fallocate` are not offered: the kernel
//! then treats the whole file as data, basyn finds leases unsupported and writes zeros
//! instead of punching holes, so every byte basyn moves passes the fault.
//!
//! Only the one file exists: the tests keep states elsewhere (`--state`,
//! `--remote-state`). The mount is undone on drop, also when the test panics.

#![allow(dead_code)]

use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyWrite, Request, WriteFlags,
};

use crate::util::{prerequisite, require, require_root, wait_until};

/// The name of the one file in the mount.
pub const NAME: &str = "disk.img";
const FILE_INO: INodeNo = INodeNo(2);

/// What the file does wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Nothing: it behaves like its backing file.
    None,
    /// A read touching the range fails with EIO.
    ReadEio(Range<u64>),
    /// A write touching the range fails with EIO after writing its bytes before the
    /// range, as a disk fails at its first bad sector: a failed write may have changed
    /// the device in part.
    WriteEio(Range<u64>),
    /// A read touching the range returns half the bytes asked (at least one), though the
    /// file goes on: a caller must ask again for the rest.
    ShortReads(Range<u64>),
    /// A read touching the range returns the bytes before the range, a read starting in
    /// it none at all, as if the file ended there, though its size says it goes on.
    EmptyReads(Range<u64>),
    /// A write made with `O_DIRECT` set (the kernel passes the file's flags on with each
    /// write) fails with EINVAL, writing nothing, as a file system without direct I/O
    /// refuses it.
    RefuseDirect,
}

/// What the test and the file system share.
struct Control {
    fault: Mutex<Fault>,
    /// Operations the fault changed.
    hits: AtomicU64,
}

impl Control {
    fn fault(&self) -> Fault {
        self.fault.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
    }
}

fn touches(range: &Range<u64>, offset: u64, len: u64) -> bool {
    offset < range.end && range.start < offset + len
}

struct FaultFs {
    backing: File,
    control: Arc<Control>,
    uid: u32,
    gid: u32,
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 { UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32) } else { UNIX_EPOCH }
}

impl FaultFs {
    fn dir_attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo::ROOT,
            size: 0,
            blocks: 0,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// The backing file's attributes as the one file's.
    fn file_attr(&self) -> Result<FileAttr, Errno> {
        let m = self.backing.metadata().map_err(|_| Errno::EIO)?;
        Ok(FileAttr {
            ino: FILE_INO,
            size: m.len(),
            blocks: m.blocks(),
            atime: time(m.atime(), m.atime_nsec()),
            mtime: time(m.mtime(), m.mtime_nsec()),
            ctime: time(m.ctime(), m.ctime_nsec()),
            crtime: UNIX_EPOCH,
            kind: FileType::RegularFile,
            perm: (m.mode() & 0o7777) as u16,
            nlink: 1,
            uid: m.uid(),
            gid: m.gid(),
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn attr(&self, ino: INodeNo) -> Result<FileAttr, Errno> {
        match ino {
            INodeNo::ROOT => Ok(self.dir_attr()),
            FILE_INO => self.file_attr(),
            _ => Err(Errno::ENOENT),
        }
    }
}

impl Filesystem for FaultFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != INodeNo::ROOT || name != NAME {
            return reply.error(Errno::ENOENT);
        }
        match self.file_attr() {
            Ok(attr) => reply.entry(&Duration::ZERO, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Ok(attr) => reply.attr(&Duration::ZERO, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EPERM);
        }
        if let Some(size) = size
            && self.backing.set_len(size).is_err()
        {
            return reply.error(Errno::EIO);
        }
        match self.file_attr() {
            Ok(attr) => reply.attr(&Duration::ZERO, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut want = size as usize;
        match self.control.fault() {
            Fault::ReadEio(r) if touches(&r, offset, want as u64) => {
                self.control.hit();
                return reply.error(Errno::EIO);
            }
            Fault::ShortReads(r) if touches(&r, offset, want as u64) && want > 1 => {
                self.control.hit();
                want /= 2;
            }
            Fault::EmptyReads(r) if touches(&r, offset, want as u64) => {
                self.control.hit();
                // Up to the range, and from there nothing.
                want = r.start.saturating_sub(offset) as usize;
            }
            _ => {}
        }
        let mut buf = vec![0u8; want];
        let mut got = 0;
        while got < want {
            match self.backing.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return reply.error(Errno::EIO),
            }
        }
        reply.data(&buf[..got]);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if self.control.fault() == Fault::RefuseDirect && flags.0 & libc::O_DIRECT != 0 {
            self.control.hit();
            return reply.error(Errno::EINVAL);
        }
        if let Fault::WriteEio(r) = self.control.fault()
            && touches(&r, offset, data.len() as u64)
        {
            self.control.hit();
            let before = r.start.saturating_sub(offset) as usize;
            let _ = self.backing.write_all_at(&data[..before], offset);
            return reply.error(Errno::EIO);
        }
        match self.backing.write_all_at(data, offset) {
            Ok(()) => reply.written(data.len() as u32),
            Err(_) => reply.error(Errno::EIO),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.backing.sync_data() {
            Ok(()) => reply.ok(),
            Err(_) => reply.error(Errno::EIO),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (FILE_INO, FileType::RegularFile, NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// A mounted [`FaultFs`]: its file is `dir/disk.img`, backed by `backing`. Unmounted on
/// drop.
pub struct FaultyFile {
    dir: PathBuf,
    backing: PathBuf,
    control: Arc<Control>,
    session: Option<BackgroundSession>,
}

impl FaultyFile {
    /// Mounts the file system on `dir` (created if missing) with `backing` (an existing
    /// image file, outside `dir`) as its file. `Err` says why it cannot be mounted.
    pub fn mount(dir: &Path, backing: &Path) -> Result<FaultyFile, String> {
        if !Path::new("/dev/fuse").exists() {
            return Err("/dev/fuse is missing (no FUSE in this kernel)".into());
        }
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(backing)
            .map_err(|e| format!("cannot open {}: {e}", backing.display()))?;
        let meta = fs::metadata(dir).map_err(|e| format!("cannot stat {}: {e}", dir.display()))?;
        let control = Arc::new(Control { fault: Mutex::new(Fault::None), hits: AtomicU64::new(0) });
        let fs = FaultFs { backing: file, control: Arc::clone(&control), uid: meta.uid(), gid: meta.gid() };
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("basyn-fusefail".into()), MountOption::NoAtime];
        config.n_threads = Some(2);
        let session = fuser::spawn_mount(fs, dir, &config)
            .map_err(|e| format!("cannot mount the test FUSE file system on {}: {e}", dir.display()))?;
        let mounted =
            FaultyFile { dir: dir.to_path_buf(), backing: backing.to_path_buf(), control, session: Some(session) };
        // The mount is there once its file can be seen through it.
        let path = mounted.path();
        wait_until(Duration::from_secs(10), &format!("{} to appear", path.display()), || path.is_file());
        Ok(mounted)
    }

    /// The file through the mount, as basyn is to see it.
    pub fn path(&self) -> PathBuf {
        self.dir.join(NAME)
    }

    /// The backing file, to check what really landed (not through the fault).
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// Sets the fault from now on.
    pub fn set(&self, fault: Fault) {
        *self.control.fault.lock().unwrap_or_else(|e| e.into_inner()) = fault;
    }

    /// How many operations the fault has changed so far.
    pub fn hits(&self) -> u64 {
        self.control.hits.load(Ordering::Relaxed)
    }
}

impl Drop for FaultyFile {
    fn drop(&mut self) {
        self.set(Fault::None);
        // Unmount it here rather than leave it to the session: a plain unmount first; if
        // something still has the file open (a test that failed half way), a lazy one,
        // which lets the mount go as soon as the last user closes it.
        let dir = CString::new(self.dir.as_os_str().as_bytes()).expect("a path without NUL");
        // SAFETY: umount2 with a valid NUL-terminated path; it only acts on that mount.
        let done = unsafe { libc::umount2(dir.as_ptr(), 0) } == 0
            // SAFETY: as above.
            || unsafe { libc::umount2(dir.as_ptr(), libc::MNT_DETACH) } == 0;
        if !done {
            eprintln!("warning: could not unmount the test FUSE file system on {}", self.dir.display());
        }
        // The session's thread ends when the kernel closes the connection; it is not
        // joined, so a mount a process still uses cannot hang the test.
        drop(self.session.take());
    }
}

/// Mounts a [`FaultyFile`] on `dir` over `backing`, or handles the missing prerequisite
/// (root and FUSE; see `util::require`).
pub fn faulty(dir: &Path, backing: &Path) -> Option<FaultyFile> {
    if !require_root() || !require(Path::new("/dev/fuse").exists(), "/dev/fuse is missing (FUSE)") {
        return None;
    }
    prerequisite(FaultyFile::mount(dir, backing))
}
