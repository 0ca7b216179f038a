//! Zeros and holes: reading a regular file without reading its holes, zeroing a range
//! (a hole punched in a file, `BLKZEROOUT` on a block device), and what part of a
//! receiver is known to be zero, so that zeros are never written where there are zeros
//! already and a sparse receiver stays sparse.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use crate::hash::is_zero;

/// Granularity at which zero data is left unwritten on a known-zero receiver: a page.
pub const PAGE: usize = 4096;

/// What `SEEK_DATA`/`SEEK_HOLE` last said about a regular file: one range known to be
/// hole and one known to be data, so that a pass over the file asks once per extent,
/// not twice for every block it reads. Whoever writes the file through basyn calls
/// [`Extents::forget`]; writes by others during a run are caught by the run's stamps.
#[derive(Debug, Default)]
pub struct Extents(Mutex<Known>);

#[derive(Debug, Default, Clone, Copy)]
struct Known {
    hole: (u64, u64),
    data: (u64, u64),
    /// Bumped by every [`Extents::forget`]: what was sought before it is not kept.
    generation: u64,
}

/// What lies at a position of a regular file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Segment {
    /// A hole up to the offset given (the end of the file for the last one).
    Hole(u64),
    /// Data up to the offset given.
    Data(u64),
    /// The file system cannot tell holes (`EINVAL`).
    Unknown,
}

impl Extents {
    /// Nothing is known: after a write, a hole punched or a resize.
    pub fn forget(&self) {
        let mut known = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *known = Known { generation: known.generation + 1, ..Known::default() };
    }

    fn at(&self, file: &File, pos: u64) -> io::Result<Segment> {
        let known = *self.0.lock().unwrap_or_else(|p| p.into_inner());
        let inside = |(s, e): (u64, u64)| s <= pos && pos < e;
        if inside(known.data) {
            return Ok(Segment::Data(known.data.1));
        }
        if inside(known.hole) {
            return Ok(Segment::Hole(known.hole.1));
        }
        let (segment, range) = match seek(file, pos, libc::SEEK_DATA) {
            Ok(d) if d > pos => (Segment::Hole(d), (pos, d)),
            Ok(_) => {
                let h = seek(file, pos, libc::SEEK_HOLE)?;
                (Segment::Data(h), (pos, h))
            }
            // No data from `pos` on: a hole to the end of the file.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                let size = file.metadata()?.len().max(pos);
                (Segment::Hole(size), (pos, size))
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Segment::Unknown),
            Err(e) => return Err(e),
        };
        let mut now = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if now.generation != known.generation {
            return Ok(segment);
        }
        match segment {
            Segment::Data(_) => now.data = range,
            _ => now.hole = range,
        }
        Ok(segment)
    }
}

fn ended(end: u64) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, format!("device ended before offset {end}"))
}

/// Reads `buf.len()` bytes at `offset` of a regular file, reading only its data and
/// filling its holes with zeros. Returns the bytes actually read. Falls back to one
/// plain read where the file system cannot tell holes (`EINVAL` from `SEEK_DATA`).
pub fn read_skipping_holes(file: &File, extents: &Extents, offset: u64, buf: &mut [u8]) -> io::Result<u64> {
    let end = offset + buf.len() as u64;
    let mut pos = offset;
    let mut read = 0;
    while pos < end {
        let at = (pos - offset) as usize;
        match extents.at(file, pos)? {
            Segment::Unknown => {
                file.read_exact_at(&mut buf[at..], pos)?;
                return Ok(read + end - pos);
            }
            // A hole ending at `pos` is the end of the file.
            Segment::Hole(until) if until <= pos => return Err(ended(end)),
            Segment::Hole(until) => {
                let to = until.min(end);
                buf[at..(to - offset) as usize].fill(0);
                pos = to;
            }
            Segment::Data(until) => {
                let to = until.min(end);
                file.read_exact_at(&mut buf[at..(to - offset) as usize], pos)?;
                read += to - pos;
                pos = to;
            }
        }
    }
    Ok(read)
}

/// True if `[offset, offset+len)` of a regular file is all hole, so it reads as zeros
/// without being read. False where the file system cannot tell, or past the end.
pub fn is_hole(file: &File, extents: &Extents, offset: u64, len: u64) -> bool {
    let end = offset.saturating_add(len);
    matches!(extents.at(file, offset), Ok(Segment::Hole(until)) if until >= end)
}

fn seek(file: &File, pos: u64, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: lseek on a valid descriptor; the position it sets is not used (all I/O is
    // positioned).
    let r = unsafe { libc::lseek(file.as_raw_fd(), pos as libc::off_t, whence) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r as u64) }
}

/// `BLKZEROOUT`: `_IO(0x12, 127)`.
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// Makes `[offset, offset+len)` read as zeros: a hole punched in a regular file (its
/// size kept), `BLKZEROOUT` on a block device, zeros written where neither works. A
/// discard is never used: it does not promise zeros.
pub fn zero_range(file: &File, block_device: bool, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let fd = file.as_raw_fd();
    if block_device {
        if offset.is_multiple_of(512) && len.is_multiple_of(512) {
            let range: [u64; 2] = [offset, len];
            // SAFETY: BLKZEROOUT reads two u64 through the pointer, valid for the call.
            if unsafe { libc::ioctl(fd, BLKZEROOUT as _, range.as_ptr()) } == 0 {
                return Ok(());
            }
        }
    } else {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on a valid descriptor with a range inside the file.
        if unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) } == 0 {
            return Ok(());
        }
    }
    let zeros = vec![0u8; (len as usize).min(1 << 20)];
    let mut at = offset;
    while at < offset + len {
        let n = zeros.len().min((offset + len - at) as usize);
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// The byte ranges of `data` (as offsets into it) that hold anything but zeros, in
/// whole pages: what must be written onto zeros.
pub fn nonzero_runs(data: &[u8]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (k, page) in data.chunks(PAGE).enumerate() {
        if is_zero(page) {
            continue;
        }
        let (start, end) = (k * PAGE, k * PAGE + page.len());
        match runs.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => runs.push((start, end)),
        }
    }
    runs
}

/// What part of a receiver is known to hold zeros: everything from `from` on (a file
/// basyn created or grew, or a device the user declared zero), except what basyn has
/// written data to since.
#[derive(Debug)]
pub struct KnownZero {
    from: u64,
    /// Ranges written with data, sorted and merged.
    written: Mutex<Vec<(u64, u64)>>,
}

impl KnownZero {
    /// Nothing is known to be zero.
    pub fn none() -> KnownZero {
        KnownZero::from(u64::MAX)
    }

    /// Everything from `from` on is zero.
    pub fn from(from: u64) -> KnownZero {
        KnownZero { from, written: Mutex::new(Vec::new()) }
    }

    /// Where the known-zero part starts (`u64::MAX`: nowhere).
    pub fn start(&self) -> u64 {
        self.from
    }

    /// True if `[start, end)` is known to hold zeros.
    pub fn covers(&self, start: u64, end: u64) -> bool {
        if start < self.from || start >= end {
            return start >= end;
        }
        let written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        // The first written range that ends after `start` must begin at or after `end`.
        let i = written.partition_point(|&(_, e)| e <= start);
        written.get(i).is_none_or(|&(s, _)| s >= end)
    }

    /// Records that data was written to `[start, end)`.
    pub fn wrote(&self, start: u64, end: u64) {
        if end <= self.from.max(start) || start >= end {
            return;
        }
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        let i = written.partition_point(|&(_, e)| e < start);
        let mut j = i;
        let (mut s, mut e) = (start, end);
        while j < written.len() && written[j].0 <= e {
            s = s.min(written[j].0);
            e = e.max(written[j].1);
            j += 1;
        }
        written.splice(i..j, [(s, e)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_are_not_read_and_read_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sparse.img");
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(&[7u8; 8192], 1 << 20).unwrap();
        f.sync_all().unwrap();
        let mut buf = vec![1u8; 4 << 20];
        let x = Extents::default();
        let read = read_skipping_holes(&f, &x, 0, &mut buf).unwrap();
        let mut expected = vec![0u8; 4 << 20];
        expected[1 << 20..(1 << 20) + 8192].fill(7);
        assert!(buf == expected, "the holes did not read as zeros");
        // File systems allocate in blocks of up to 64 KiB: only about the data is read.
        assert!((8192..=128 << 10).contains(&read), "{read} bytes read for 8 KiB of data");
        assert!(is_hole(&f, &x, 0, 1 << 20) && is_hole(&f, &x, 2 << 20, 2 << 20));
        assert!(!is_hole(&f, &x, 0, (1 << 20) + 1) && !is_hole(&f, &x, 3 << 20, 2 << 20), "data or the end is no hole");
        let mut past = vec![0u8; 100];
        assert!(read_skipping_holes(&f, &x, (4 << 20) - 50, &mut past).is_err(), "a read past the end must fail");
        // What was learnt is forgotten on a write: the hole that became data reads as it.
        f.write_all_at(&[9u8; 4096], 0).unwrap();
        x.forget();
        assert!(!is_hole(&f, &x, 0, 4096));
        let mut head = vec![0u8; 8192];
        read_skipping_holes(&f, &x, 0, &mut head).unwrap();
        assert!(head[..4096].iter().all(|&b| b == 9) && head[4096..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_punched_range_reads_as_zeros_and_keeps_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        std::fs::write(&p, vec![9u8; 1 << 20]).unwrap();
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
        zero_range(&f, false, 4096, 100_000).unwrap();
        let data = std::fs::read(&p).unwrap();
        assert_eq!(data.len(), 1 << 20);
        assert!(data[4096..104_096].iter().all(|&b| b == 0));
        assert!(data[..4096].iter().chain(&data[104_096..]).all(|&b| b == 9));
    }

    #[test]
    fn only_pages_with_data_are_runs() {
        let mut data = vec![0u8; 5 * PAGE + 100];
        data[PAGE + 1] = 1;
        data[2 * PAGE] = 1;
        data[5 * PAGE + 99] = 1;
        assert_eq!(nonzero_runs(&data), vec![(PAGE, 3 * PAGE), (5 * PAGE, 5 * PAGE + 100)]);
        assert!(nonzero_runs(&vec![0u8; 3 * PAGE]).is_empty());
    }

    #[test]
    fn written_ranges_are_no_longer_known_zero() {
        let k = KnownZero::from(1000);
        assert!(k.covers(1000, 5000) && !k.covers(999, 5000));
        k.wrote(2000, 3000);
        k.wrote(2500, 4000);
        k.wrote(100, 200);
        assert!(k.covers(1000, 2000) && k.covers(4000, 9000));
        assert!(!k.covers(1500, 2001) && !k.covers(3999, 4001) && !k.covers(2100, 2200));
        assert!(!KnownZero::none().covers(0, 1));
    }
}
