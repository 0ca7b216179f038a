//! The kernel calls a device makes besides reading and writing: block-device queries
//! (`ioctl`) and page-cache advice (`posix_fadvise`).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `BLKGETSIZE64`: `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `BLKSSZGET`: `_IO(0x12, 104)`, an `int`.
const BLKSSZGET: libc::c_ulong = 0x1268;
/// `BLKROGET`: `_IO(0x12, 94)`, an `int`.
const BLKROGET: libc::c_ulong = 0x125e;

/// A block device query that writes one `T` through its argument. Only for the requests
/// above, each paired here with the type the kernel writes.
fn query<T: Default>(file: &File, request: libc::c_ulong) -> io::Result<T> {
    let mut value = T::default();
    // SAFETY: each request used with this function writes exactly one `T` through the
    // pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request as _, &mut value as *mut T) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// A block device's size in bytes.
pub(super) fn block_size(file: &File) -> io::Result<u64> {
    query::<u64>(file, BLKGETSIZE64)
}

/// A block device's logical block size, the alignment its direct I/O needs.
pub(super) fn logical_block_size(file: &File) -> io::Result<u64> {
    query::<libc::c_int>(file, BLKSSZGET).map(|n| u64::try_from(n).unwrap_or(0))
}

/// True if a block device is read-only.
pub(super) fn block_read_only(file: &File) -> io::Result<bool> {
    query::<libc::c_int>(file, BLKROGET).map(|ro| ro != 0)
}

/// A source is read from start to end.
pub(super) fn advise_sequential(file: &File) {
    advise_range(file, 0, 0, libc::POSIX_FADV_SEQUENTIAL);
}

/// A receiver is read, if at all, only where it differs (small pieces, to refine them):
/// no read-ahead, which would read a window around each of them.
pub(super) fn advise_random(file: &File) {
    advise_range(file, 0, 0, libc::POSIX_FADV_RANDOM);
}

/// Advice for `[offset, offset+len)` (`len` 0: to the end).
pub(super) fn advise_range(file: &File, offset: u64, len: u64, how: libc::c_int) {
    // SAFETY: a plain advisory syscall on a valid descriptor; failure is harmless.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), offset as libc::off_t, len as libc::off_t, how);
    }
}
