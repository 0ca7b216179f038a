//! Large writes that bypass the page cache (`O_DIRECT`). A receiver's big sequential
//! writes (a first copy, a changed region) cost less when they go straight to the
//! device: the kernel does not copy them into the page cache, account and write back
//! their pages, and evict the machine's own cache for them, and the run's closing
//! `fdatasync` finds little left to do. Small scattered writes (the pieces of a 1%
//! change) stay buffered: there a direct write would wait for the device each time,
//! while the page cache gathers them.
//!
//! The descriptor is the device's own, with `O_DIRECT` set for the length of each
//! direct write (`F_SETFL`) and cleared after it, so that everything else (reads,
//! unaligned heads and tails, zeroing) stays buffered. A second descriptor would be
//! simpler, but a regular-file receiver holds a write lease, which the kernel grants
//! only to the file's one open writer and breaks when anyone, basyn too, opens the file
//! again. Reads through the descriptor hold [`Direct::io`]'s shared side, a direct
//! write its exclusive side, so that no read ever runs with `O_DIRECT` set.
//!
//! The data's memory must be aligned too: when it is not, it goes through an aligned
//! bounce buffer of [`CHUNK`] bytes, one per writing thread. A file system that
//! refuses `O_DIRECT` (`EINVAL`, as FUSE file systems without it and some older kernels'
//! tmpfs do) turns it off for the rest of the run, and the write goes buffered.

use std::alloc::{self, Layout};
use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

/// Writes shorter than this (in their aligned part) stay buffered.
pub const MIN_DIRECT: usize = 256 << 10;
/// Largest direct write call, and the size of a thread's bounce buffer.
pub const CHUNK: usize = 2 << 20;
/// Alignment of offsets, lengths and memory unless the device asks for more: the page
/// size, which every file system and block device that takes `O_DIRECT` accepts.
const ALIGN: usize = 4096;

/// `O_DIRECT` writes to one descriptor.
#[derive(Debug)]
pub struct Direct {
    /// Shared by every buffered use of the descriptor, taken whole by a direct write.
    gate: RwLock<()>,
    /// False once the file system refused `O_DIRECT`, or where it is not wanted.
    usable: AtomicBool,
    align: usize,
}

impl Direct {
    /// Direct writes to a device whose logical blocks are `logical` bytes (0 if unknown).
    pub fn new(logical: u64) -> Direct {
        let align = usize::try_from(logical).unwrap_or(ALIGN).max(ALIGN).next_power_of_two();
        Direct { gate: RwLock::new(()), usable: AtomicBool::new(true), align }
    }

    /// No direct writes: everything goes through the page cache.
    pub fn off() -> Direct {
        let direct = Direct::new(0);
        direct.usable.store(false, Ordering::Relaxed);
        direct
    }

    /// True while direct writes are used.
    pub fn on(&self) -> bool {
        self.usable.load(Ordering::Relaxed)
    }

    /// Held by anything using the descriptor other than [`Direct::write_all_at`]: while
    /// it is held, `O_DIRECT` is not set. Once direct writes are off they never come
    /// back on, so there is nothing to hold (a source's reads take no lock).
    pub fn io(&self) -> Option<RwLockReadGuard<'_, ()>> {
        self.on().then(|| self.gate.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Writes all of `data` at `offset`: its aligned middle directly when it is large
    /// enough, the rest (and all of it when direct writes are off) through the page
    /// cache. Returns the bytes that were written directly.
    pub fn write_all_at(&self, file: &File, data: &[u8], offset: u64) -> io::Result<usize> {
        let Some((head, body)) = self.aligned_part(data.len(), offset) else {
            let _io = self.io();
            file.write_all_at(data, offset)?;
            return Ok(0);
        };
        let direct = self.write_direct(file, &data[head..head + body], offset + head as u64)?;
        // What was not written directly (the head, the tail, and anything a refusal
        // left over), buffered.
        let _io = self.io();
        file.write_all_at(&data[..head], offset)?;
        let rest = head + direct;
        file.write_all_at(&data[rest..], offset + rest as u64)?;
        Ok(direct)
    }

    /// The aligned middle of a write, as (start in the data, length), if it is worth a
    /// direct write.
    fn aligned_part(&self, len: usize, offset: u64) -> Option<(usize, usize)> {
        if !self.on() || len < MIN_DIRECT {
            return None;
        }
        let a = self.align as u64;
        let start = offset.div_ceil(a) * a;
        let end = (offset + len as u64) / a * a;
        let body = usize::try_from(end.checked_sub(start)?).ok()?;
        (body >= MIN_DIRECT).then(|| ((start - offset) as usize, body))
    }

    /// Writes aligned `data` at aligned `offset` with `O_DIRECT`, stopping early only if
    /// the file system refuses it. Returns the bytes written.
    fn write_direct(&self, file: &File, data: &[u8], offset: u64) -> io::Result<usize> {
        let _alone = self.gate.write().unwrap_or_else(|p| p.into_inner());
        let fd = file.as_raw_fd();
        // SAFETY: fcntl on a valid descriptor, reading its status flags.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above, setting them.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_DIRECT) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
            self.refuse();
            return Ok(0);
        }
        let written = write_chunks(file, data, offset, self.align);
        // SAFETY: as above, restoring them.
        let restored = unsafe { libc::fcntl(fd, libc::F_SETFL, flags) };
        // The write's own error first; a flag left set would fail every buffered write.
        let (written, refused) = written?;
        if restored != 0 {
            return Err(io::Error::last_os_error());
        }
        // Only now that the flag is cleared: reads stop taking the lock once it is off.
        if refused {
            self.refuse();
        }
        Ok(written)
    }

    /// The file system refused `O_DIRECT`: buffered from now on.
    fn refuse(&self) {
        self.usable.store(false, Ordering::Relaxed);
    }
}

/// Writes aligned `data` at `offset` on a descriptor with `O_DIRECT` set, in calls of at
/// most [`CHUNK`]. Returns the bytes written, and whether the file system refused a write
/// (`EINVAL`), which ends it early; so does a short write, whose rest is unaligned.
fn write_chunks(file: &File, data: &[u8], offset: u64, align: usize) -> io::Result<(usize, bool)> {
    let mut done = 0;
    while done < data.len() {
        let n = (data.len() - done).min(CHUNK);
        let at = offset + done as u64;
        let wrote = if (data[done..].as_ptr() as usize).is_multiple_of(align) {
            write_once(file, &data[done..done + n], at)
        } else {
            BOUNCE.with_borrow_mut(|bounce| {
                let buf = bounce.get_or_insert_with(Bounce::new).slice(n);
                buf.copy_from_slice(&data[done..done + n]);
                write_once(file, buf, at)
            })
        };
        match wrote {
            Ok(k) if k == n => done += k,
            Ok(k) => return Ok((done + k, false)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok((done, true)),
            Err(e) => return Err(e),
        }
    }
    Ok((done, false))
}

/// One `pwrite`, retried when interrupted.
fn write_once(file: &File, data: &[u8], offset: u64) -> io::Result<usize> {
    loop {
        match file.write_at(data, offset) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "the device took no bytes")),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

thread_local! {
    /// The writing thread's bounce buffer, made on its first unaligned direct write.
    static BOUNCE: RefCell<Option<Bounce>> = const { RefCell::new(None) };
}

/// [`CHUNK`] bytes aligned for any device (64 KiB, past every logical block size).
struct Bounce {
    ptr: std::ptr::NonNull<u8>,
}

impl Bounce {
    const LAYOUT: Layout = match Layout::from_size_align(CHUNK, 64 << 10) {
        Ok(l) => l,
        Err(_) => panic!("the bounce buffer's layout is valid"),
    };

    fn new() -> Bounce {
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc(Self::LAYOUT) };
        let Some(ptr) = std::ptr::NonNull::new(ptr) else { alloc::handle_alloc_error(Self::LAYOUT) };
        Bounce { ptr }
    }

    /// The first `n` bytes, at most [`CHUNK`] (every direct write call is).
    fn slice(&mut self, n: usize) -> &mut [u8] {
        // SAFETY: the allocation holds CHUNK bytes, owned by this value and borrowed
        // mutably through it; u8 has no invalid values, and the caller overwrites them.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), n.min(CHUNK)) }
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::LAYOUT) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_aligned_middle_of_a_large_write_goes_direct() {
        let d = Direct::new(512);
        assert_eq!(d.aligned_part(MIN_DIRECT - 1, 0), None);
        assert_eq!(d.aligned_part(4 << 20, 0), Some((0, 4 << 20)));
        assert_eq!(d.aligned_part((4 << 20) + 100, 4000), Some((96, 4 << 20)));
        // Too little left once aligned.
        assert_eq!(d.aligned_part(MIN_DIRECT + 1000, 100), None);
        assert_eq!(Direct::off().aligned_part(4 << 20, 0), None);
        assert_eq!(Direct::new(8192).align, 8192);
    }

    #[test]
    fn a_direct_write_puts_every_byte_where_it_belongs_aligned_or_not() {
        let dir = std::env::temp_dir().join(format!("basyn-direct-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let data: Vec<u8> = (0..(5 << 20) + 333).map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let d = Direct::new(0);
        // Unaligned memory and offset: head and tail buffered, the middle bounced.
        let at = 12345;
        let direct = d.write_all_at(&file, &data[1..], at).unwrap();
        let mut back = vec![0u8; data.len() - 1];
        file.read_exact_at(&mut back, at).unwrap();
        assert_eq!(back, data[1..]);
        // The temp directory may be on a file system without O_DIRECT (tmpfs of old).
        if d.on() {
            assert!(direct >= MIN_DIRECT && direct.is_multiple_of(ALIGN), "{direct}");
        }
        // The flag is off again: an unaligned buffered write works.
        file.write_all_at(b"x", 7).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
