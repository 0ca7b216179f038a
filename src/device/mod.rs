//! Devices: open, size, read and write regular files and block devices, their identity,
//! and the safety checks made before anything is written.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::block::VerifiedBlock;
use crate::direct::Direct;
use crate::lease::{BackingWatch, Lease, Taken, Unwatched};
use crate::occupancy;
use crate::sparse::{self, Extents, KnownZero};
use crate::sysfs;

mod identity;
mod kernel;
mod problem;

pub use identity::{Identity, Kind, Side};
use kernel::{advise_random, advise_range, advise_sequential, block_read_only, block_size, logical_block_size};
pub use problem::{DeviceError, Problem, describe_io};

/// What the receiver must accept, learned from the source.
#[derive(Clone, Debug)]
pub struct ReceiverSpec {
    /// Size of the source: the number of bytes that will be synchronized.
    pub source_size: u64,
    /// The source's identity, to refuse syncing a device onto itself.
    pub source: Option<Identity>,
    /// Source path for messages.
    pub source_name: String,
    /// `--force`: resize files, accept larger block devices, skip the in-use and same-device refusals.
    pub force: bool,
    /// `--destination-is-zero`: the user declares the receiver all zero.
    pub known_zero: bool,
}

/// An open device.
#[derive(Debug)]
pub struct Device {
    file: File,
    path: PathBuf,
    side: Side,
    kind: Kind,
    size: u64,
    identity: Identity,
    created: bool,
    resized: bool,
    bytes_read: std::sync::atomic::AtomicU64,
    /// What of a receiver is known to hold zeros (written data excepted).
    known_zero: KnownZero,
    /// What is known of a regular file's holes and data.
    extents: Extents,
    /// A regular-file receiver's write lease: broken when another process opens it.
    lease: Lease,
    /// A loop-device receiver's watch on its backing file, for the same.
    backing_watch: Option<BackingWatch>,
    /// A receiver's large writes, past the page cache.
    direct: Direct,
}

impl Device {
    /// Checks that `path` exists and is a file or block device, without opening it.
    pub fn probe(path: &Path, side: Side) -> Result<Kind, DeviceError> {
        let err = |problem| DeviceError { side, path: path.display().to_string(), problem };
        let meta = fs::metadata(path).map_err(|e| err(stat_problem(e)))?;
        kind_of(&meta).map_err(err)
    }

    /// Opens a source (or a device to be compared) read-only.
    pub fn open_read(path: &Path, side: Side) -> Result<Device, DeviceError> {
        let err = |problem| DeviceError { side, path: path.display().to_string(), problem };
        let meta = fs::metadata(path).map_err(|e| err(stat_problem(e)))?;
        let kind = kind_of(&meta).map_err(err)?;
        let file = File::open(path).map_err(|e| err(Problem::Io("open for reading", e)))?;
        advise_sequential(&file);
        Device::finish_open(file, path, side, kind, false)
    }

    /// Opens (or creates) a receiving device after the safety checks in DESIGN.
    pub fn open_receiver(path: &Path, side: Side, spec: &ReceiverSpec) -> Result<Device, DeviceError> {
        let err = |problem| DeviceError { side, path: path.display().to_string(), problem };
        let meta = match fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Device::create(path, side, spec),
            Err(e) => return Err(err(stat_problem(e))),
        };
        let kind = kind_of(&meta).map_err(err)?;
        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        if kind == Kind::Block && !spec.force {
            // O_EXCL on a block device fails with EBUSY while it is mounted or held,
            // and keeps others from claiming it exclusively while we write.
            opts.custom_flags(libc::O_EXCL);
        }
        let file = opts.open(path).map_err(|e| {
            if e.raw_os_error() == Some(libc::EBUSY) {
                err(Problem::InUse("the kernel reports it busy (mounted or held)".to_string()))
            } else {
                err(Problem::Io("open for writing", e))
            }
        })?;
        advise_random(&file);
        let mut dev = Device::finish_open(file, path, side, kind, false)?;
        dev.enable_direct_writes();
        if spec.known_zero {
            dev.known_zero = KnownZero::from(0);
        }
        // The kernel lets O_RDWR open a read-only block device and fails only the writes.
        if kind == Kind::Block
            && block_read_only(&dev.file).map_err(|e| err(Problem::Io("query the read-only flag", e)))?
        {
            return Err(err(Problem::ReadOnly));
        }
        if let Some(src) = &spec.source
            && !spec.force
            && dev.identity.same_storage(src)
        {
            return Err(err(Problem::SameDevice(spec.source_name.clone())));
        }
        if !spec.force
            && let Some(why) = dev.in_use()
        {
            return Err(err(Problem::InUse(why)));
        }
        // Nothing may be changed (resized) before basyn owns the device.
        lock(&dev.file).map_err(err)?;
        match kind {
            Kind::File => dev.lease_receiver(spec.force).map_err(err)?,
            Kind::Block => dev.watch_backing(spec.force).map_err(err)?,
        }
        dev.fit_size(spec)?;
        Ok(dev)
    }

    /// The size rules, as the original has them: a larger receiver gets the source's
    /// length and keeps its tail; a smaller one is refused. `--force` resizes a regular
    /// file to the source's size.
    fn fit_size(&mut self, spec: &ReceiverSpec) -> Result<(), DeviceError> {
        let err = |problem| DeviceError { side: self.side, path: self.path.display().to_string(), problem };
        if self.size == spec.source_size {
            return Ok(());
        }
        match (spec.force, self.kind) {
            (true, Kind::File) => {
                self.file.set_len(spec.source_size).map_err(|e| err(Problem::Io("resize", e)))?;
                // What a file grows by reads as zeros.
                self.known_zero = KnownZero::from(self.size.min(spec.source_size));
                self.size = spec.source_size;
                self.resized = true;
            }
            _ if self.size < spec.source_size => {
                let (size, source, receiver, file) = (self.size, spec.source_size, self.side, self.kind == Kind::File);
                return Err(err(Problem::TooSmall { size, source, receiver, file }));
            }
            _ => {}
        }
        Ok(())
    }

    fn create(path: &Path, side: Side, spec: &ReceiverSpec) -> Result<Device, DeviceError> {
        let err = |problem| DeviceError { side, path: path.display().to_string(), problem };
        if let Some(fs) = occupancy::pseudo_file_system(path) {
            return Err(err(Problem::NoSuchDevice(fs)));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| err(Problem::Io("create", e)))?;
        if let Err(problem) = lock(&file) {
            let _ = fs::remove_file(path);
            return Err(err(problem));
        }
        if let Err(e) = file.set_len(spec.source_size) {
            let _ = fs::remove_file(path);
            return Err(err(Problem::Io("size the new file (it was removed: nothing was kept)", e)));
        }
        let mut dev = Device::finish_open(file, path, side, Kind::File, false)?;
        dev.enable_direct_writes();
        if let Err(problem) = dev.lease_receiver(spec.force) {
            let _ = fs::remove_file(path);
            return Err(err(problem));
        }
        // A new file is one hole: it reads as zeros and stays sparse.
        dev.created = true;
        dev.known_zero = KnownZero::from(0);
        Ok(dev)
    }

    /// Large writes go past the page cache ([`crate::direct`]), aligned to the device's
    /// logical blocks.
    fn enable_direct_writes(&mut self) {
        let logical = if self.kind == Kind::Block { logical_block_size(&self.file).unwrap_or(0) } else { 0 };
        self.direct = Direct::new(logical);
    }

    /// Takes the write lease of a regular-file receiver, so that another process opening
    /// it during the run is noticed. One that has it open already makes the receiver in
    /// use (with `--force`, the run goes on unwatched, as it does where leases are not
    /// supported).
    fn lease_receiver(&mut self, force: bool) -> Result<(), Problem> {
        let (lease, taken) = Lease::take(&self.file);
        if taken == Taken::Busy && !force {
            return Err(Problem::InUse("another process has it open".to_string()));
        }
        self.lease = lease;
        Ok(())
    }

    /// Watches the backing file of a loop-device receiver for other openers: writes to
    /// it bypass the loop device, and its timestamps move with basyn's own writes too.
    /// One that has it open already makes the receiver in use, unless `--force`.
    fn watch_backing(&mut self, force: bool) -> Result<(), Problem> {
        let Some(key) = self.identity.backing else { return Ok(()) };
        let Some(path) = sysfs::block_name(self.identity.rdev).and_then(|n| sysfs::loop_backing_file(&n)) else {
            return Ok(());
        };
        match BackingWatch::take(&path, key) {
            Ok(watch) => self.backing_watch = Some(watch),
            Err(Unwatched::Busy(pid)) if !force => {
                let name = sysfs::process_name(pid);
                return Err(Problem::InUse(format!(
                    "process {pid} ({name}) has its backing file {} open",
                    path.display()
                )));
            }
            Err(_) => {}
        }
        Ok(())
    }

    /// True if another process opened this receiver since it was opened (a regular file,
    /// or a loop device's backing file), so may have written it: basyn's own writes and
    /// another writer's look the same in a file's timestamps.
    pub fn opened_by_others(&self) -> bool {
        self.lease.broken(&self.file) || self.backing_watch.as_ref().is_some_and(BackingWatch::opened)
    }

    fn finish_open(file: File, path: &Path, side: Side, kind: Kind, created: bool) -> Result<Device, DeviceError> {
        let err = |problem| DeviceError { side, path: path.display().to_string(), problem };
        let meta = file.metadata().map_err(|e| err(Problem::Io("stat", e)))?;
        let size = match kind {
            Kind::File => meta.len(),
            Kind::Block => block_size(&file).map_err(|e| err(Problem::Io("read the block device size", e)))?,
        };
        let identity = Identity {
            boot_id: sysfs::boot_id(),
            kind,
            dev: meta.dev(),
            ino: meta.ino(),
            rdev: meta.rdev(),
            backing: if kind == Kind::Block { loop_backing(meta.rdev()) } else { None },
        };
        Ok(Device {
            file,
            path: path.to_path_buf(),
            side,
            kind,
            size,
            identity,
            created,
            resized: false,
            bytes_read: Default::default(),
            known_zero: KnownZero::none(),
            extents: Extents::default(),
            lease: Lease::default(),
            backing_watch: None,
            direct: Direct::off(),
        })
    }

    /// Size in bytes (for a block device, from the `BLKGETSIZE64` ioctl).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// File or block device.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Identity for same-device checks.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// True if this open created the file.
    pub fn created(&self) -> bool {
        self.created
    }

    /// True if this open resized the file (`--force`).
    pub fn resized(&self) -> bool {
        self.resized
    }

    /// The path as given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Wraps an I/O failure with this device's side and path.
    pub fn error(&self, doing: &'static str, e: io::Error) -> DeviceError {
        DeviceError { side: self.side, path: self.path.display().to_string(), problem: Problem::Io(doing, e) }
    }

    /// Bytes read from the device so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Where the part of the device known to hold zeros starts (`u64::MAX`: nowhere).
    pub fn known_zero_from(&self) -> u64 {
        self.known_zero.start()
    }

    /// True if `[offset, offset+len)` is known to hold zeros without reading it.
    pub fn known_zero(&self, offset: u64, len: u64) -> bool {
        self.known_zero.covers(offset, offset.saturating_add(len))
    }

    /// Why the device must not be written, if it is mounted, held by another device, or
    /// (for an image file) backs a loop device.
    fn in_use(&self) -> Option<String> {
        match self.kind {
            Kind::Block => occupancy::block_in_use(self.identity.rdev),
            Kind::File => occupancy::file_in_use(self.identity.dev, self.identity.ino),
        }
    }

    /// True if `[offset, offset+len)` is known to read as zeros without reading it: a
    /// hole of a regular file.
    pub fn is_hole(&self, offset: u64, len: u64) -> bool {
        self.kind == Kind::File && sparse::is_hole(&self.file, &self.extents, offset, len)
    }

    /// A pass over the device has read `[offset, offset+len)` and needs it no more: on a
    /// device larger than a quarter of the machine's memory its pages are dropped from
    /// the page cache (`POSIX_FADV_DONTNEED`), so that a pass over terabytes does not
    /// evict everything else the machine caches. Smaller devices stay cached: a run
    /// after this one finds them there.
    pub fn done_with(&self, offset: u64, len: u64) {
        static MEMORY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let memory = *MEMORY.get_or_init(sysfs::memory_bytes);
        if memory > 0 && self.size > memory / 4 {
            advise_range(&self.file, offset, len, libc::POSIX_FADV_DONTNEED);
        }
    }

    /// Most of the device will not be read, only scattered leaves of it (the rest is known
    /// from a state): no read-ahead, which would read a window past each of them.
    pub fn expect_scattered_reads(&self) {
        advise_random(&self.file);
    }

    /// Reads exactly `buf.len()` bytes at `offset`. The holes of a regular file are not
    /// read (they read as zeros) and not counted in [`Device::bytes_read`].
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let io = self.direct.io();
        let read = match self.kind {
            Kind::File => sparse::read_skipping_holes(&self.file, &self.extents, offset, buf),
            Kind::Block => self.file.read_exact_at(buf, offset).map(|()| buf.len() as u64),
        };
        let read = read.map_err(|e| {
            let e = if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("device ended before offset {}", offset + buf.len() as u64),
                )
            } else {
                e
            };
            self.error("read", e)
        })?;
        drop(io);
        self.bytes_read.fetch_add(read, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Writes a verified block: only data that arrived and matched its checks can be
    /// written. Zeros are not written where the device is known to hold zeros already (a
    /// new or grown file, a device declared zero), so a sparse receiver stays sparse;
    /// elsewhere a run of zeros becomes a hole in a file and `BLKZEROOUT` on a block
    /// device. On a block device the write-back of these pages starts at once: another
    /// process's later write to them then goes out on its own and shows in the kernel's
    /// counters, instead of hiding in basyn's own write-back. Returns the bytes written.
    pub fn write_at(&self, block: &VerifiedBlock) -> Result<u64, DeviceError> {
        let (offset, len) = (block.offset(), block.len() as u64);
        self.extents.forget();
        let on_zeros = self.known_zero(offset, len);
        let Some(data) = block.bytes() else {
            if on_zeros {
                return Ok(0);
            }
            let _io = self.direct.io();
            sparse::zero_range(&self.file, self.kind == Kind::Block, offset, len).map_err(|e| self.error("zero", e))?;
            self.extents.forget();
            return Ok(len);
        };
        let runs = if on_zeros { sparse::nonzero_runs(data) } else { vec![(0, data.len())] };
        let mut written = 0;
        for (start, end) in runs {
            let at = offset + start as u64;
            self.direct.write_all_at(&self.file, &data[start..end], at).map_err(|e| self.error("write", e))?;
            self.known_zero.wrote(at, offset + end as u64);
            self.start_write_back(at, (end - start) as u64)?;
            written += (end - start) as u64;
        }
        self.extents.forget();
        Ok(written)
    }

    fn start_write_back(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        if self.kind != Kind::Block {
            return Ok(());
        }
        use std::os::fd::AsRawFd;
        // SAFETY: sync_file_range on a valid descriptor; it only starts write-back.
        let rc = unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if rc != 0 {
            return Err(self.error("start write-back", io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Takes the advisory lock that tells other basyn processes this device is in use.
    pub fn try_lock(&self) -> Result<(), fs::TryLockError> {
        self.file.try_lock()
    }

    /// Writes out the device's dirty page cache, including other processes' writes to
    /// a block device, so that they reach the kernel's counters.
    pub fn flush_cache(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Makes written data durable (`fdatasync`).
    pub fn sync(&self) -> Result<(), DeviceError> {
        self.file.sync_data().map_err(|e| self.error("flush (fdatasync)", e))
    }
}

/// Takes the advisory lock a writing basyn holds for the whole run.
fn lock(file: &File) -> Result<(), Problem> {
    match file.try_lock() {
        Ok(()) => Ok(()),
        Err(fs::TryLockError::WouldBlock) => Err(Problem::Locked),
        Err(fs::TryLockError::Error(e)) => Err(Problem::Io("lock", e)),
    }
}

fn stat_problem(e: io::Error) -> Problem {
    if e.kind() == io::ErrorKind::NotFound { Problem::Missing } else { Problem::Io("access", e) }
}

fn kind_of(meta: &fs::Metadata) -> Result<Kind, Problem> {
    let ft = meta.file_type();
    if ft.is_file() {
        Ok(Kind::File)
    } else if ft.is_block_device() {
        Ok(Kind::Block)
    } else if ft.is_dir() {
        Err(Problem::WrongKind("a directory"))
    } else if ft.is_char_device() {
        Err(Problem::WrongKind("a character device"))
    } else {
        Err(Problem::WrongKind("a special file"))
    }
}

fn loop_backing(rdev: u64) -> Option<(u64, u64)> {
    let backing = sysfs::loop_backing_file(&sysfs::block_name(rdev)?)?;
    let meta = fs::metadata(backing).ok()?;
    Some((meta.dev(), meta.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(size: u64, force: bool) -> ReceiverSpec {
        ReceiverSpec { source_size: size, source: None, source_name: "src".into(), force, known_zero: false }
    }

    #[test]
    fn a_missing_receiver_file_is_created_at_the_source_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("new.img");
        let dev = Device::open_receiver(&p, Side::Remote, &spec(12345, false)).unwrap();
        assert!(dev.created());
        assert_eq!(fs::metadata(&p).unwrap().len(), 12345);
    }

    #[test]
    fn a_smaller_receiver_is_refused_in_the_originals_words_and_a_larger_one_keeps_its_tail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dst.img");
        fs::write(&p, vec![0u8; 100]).unwrap();
        for (side, words) in [
            (Side::Remote, "Cannot PUSH because remote device size (100) is smaller than local device size (200)"),
            (Side::Local, "Cannot PULL because local device size (100) is smaller than remote device size (200)"),
        ] {
            let e = Device::open_receiver(&p, side, &spec(200, false)).unwrap_err();
            assert_eq!(e.to_string(), format!("{side} {}: {words} (--force grows a regular file)", p.display()));
            assert_eq!(fs::metadata(&p).unwrap().len(), 100);
        }
        // Larger: accepted as it is; --force resizes a file to the source's size.
        let dev = Device::open_receiver(&p, Side::Remote, &spec(60, false)).unwrap();
        assert_eq!((dev.size(), dev.resized()), (100, false));
        drop(dev);
        Device::open_receiver(&p, Side::Remote, &spec(200, true)).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().len(), 200);
        Device::open_receiver(&p, Side::Remote, &spec(150, true)).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().len(), 150);
    }

    #[test]
    fn the_same_file_is_recognised_through_its_identity() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.img");
        fs::write(&p, vec![1u8; 10]).unwrap();
        let src = Device::open_read(&p, Side::Local).unwrap();
        let mut s = spec(10, false);
        s.source = Some(src.identity().clone());
        let e = Device::open_receiver(&p, Side::Remote, &s).unwrap_err();
        assert!(matches!(e.problem, Problem::SameDevice(_)), "{e}");
    }

    #[test]
    fn io_errors_read_like_strerror() {
        let e = io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(describe_io(&e), "no space left on device");
    }
}
