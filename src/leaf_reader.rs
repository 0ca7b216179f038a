//! Reading a device's leaves in order on worker threads, so that reading, hashing,
//! zero detection and compressing (whatever work is attached to each leaf) use every
//! core and overlap with the protocol traffic of the thread that consumes them. Leaves
//! the caller already knows (from a fresh state) are skipped, not read; holes of a
//! regular file are not read either.
//!
//! Worker `t` of `K` takes leaves `t, t+K, t+2K, …` and delivers them through its own
//! bounded channel; the consumer takes them round-robin, so it sees them in order, and
//! at most [`DEPTH`] leaves (plus one per worker being read) are held at a time. Leaf
//! buffers come back to a small pool when dropped, so that a long run does not fault in
//! fresh pages for every leaf.

use std::ops::{Deref, Range};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::Scope;

use crate::device::{Device, DeviceError};
use crate::tree::Layout;

/// Leaves read ahead of the consumer, over all workers.
pub const DEPTH: usize = 4;
/// Idle buffers the pool keeps at most: about what one pass holds at its peak (workers
/// reading, [`DEPTH`] ahead, one being used), so that idle buffers never add much to what
/// was live.
const MAX_IDLE: usize = 8;
/// Most worker threads one reader uses.
const MAX_WORKERS: usize = 4;

/// The worker threads a reader uses: one per core, at most [`MAX_WORKERS`].
pub fn workers() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, MAX_WORKERS))
}

/// Idle buffers kept for reuse, by every reader of the process: a buffer that carried a
/// leaf's data to the writer of a local run (moved, not copied) comes back here too.
/// Only buffers that can hold the largest leaf read so far are kept, so that the pool
/// does not fill with the odd-sized parts of leaves.
struct Pool {
    idle: Mutex<Vec<Vec<u8>>>,
    largest: AtomicUsize,
    /// Buffers lent out as vectors ([`Buf::into_vec`], [`buffer`]) and not recycled yet.
    lent: AtomicUsize,
}

/// The process's pool.
static POOL: Pool = Pool { idle: Mutex::new(Vec::new()), largest: AtomicUsize::new(0), lent: AtomicUsize::new(0) };

impl Pool {
    fn take(&self, len: usize) -> Vec<u8> {
        self.largest.fetch_max(len, Ordering::Relaxed);
        let mut buf = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop().unwrap_or_default();
        if buf.capacity() < len {
            // Growing would copy what it holds for nothing.
            buf = Vec::new();
        }
        // Every byte is overwritten by the read: only a first use pays for zeroing.
        buf.resize(len, 0);
        buf
    }

    fn give(&self, buf: Vec<u8>) {
        // Consumers hand buffers back in bursts (a window of replies at once): keeping
        // them all costs no more than the peak that was live, and spares faulting in
        // fresh pages for the next burst.
        if buf.capacity() < self.largest.load(Ordering::Relaxed) {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(buf);
        }
    }
}

/// Gives a buffer that held a leaf's data (a block's, once written) back to the pool.
pub fn recycle(buf: Vec<u8>) {
    // Only as many as were lent out: a buffer of other origin (a copy, a payload off the
    // wire) is freed as it would have been. Keeping those too would leave their
    // allocator's memory behind as well as fill the pool (+14 MiB in a local SYNC).
    if buf.capacity() < POOL.largest.load(Ordering::Relaxed) {
        return;
    }
    let lent = POOL.lent.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    if lent.is_ok() {
        POOL.give(buf);
    }
}

/// A buffer of `len` bytes from the pool, for a read that is not a pass (a server's
/// answer to a read request); [`recycle`] gives it back.
pub fn buffer(len: usize) -> Vec<u8> {
    POOL.lent.fetch_add(1, Ordering::AcqRel);
    POOL.take(len)
}

/// A leaf's bytes (or part of them), in a buffer that goes back to the pool when dropped.
pub struct Buf {
    bytes: Vec<u8>,
    pooled: bool,
}

impl Buf {
    /// The bytes as a vector of their own, to be moved on (into a block), not copied;
    /// [`recycle`] gives it back once it is done with.
    pub fn into_vec(mut self) -> Vec<u8> {
        if self.pooled {
            POOL.lent.fetch_add(1, Ordering::AcqRel);
        }
        self.pooled = false;
        std::mem::take(&mut self.bytes)
    }
}

impl Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl From<Vec<u8>> for Buf {
    /// A buffer of its own, not pooled.
    fn from(bytes: Vec<u8>) -> Buf {
        Buf { bytes, pooled: false }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if self.pooled {
            POOL.give(std::mem::take(&mut self.bytes));
        }
    }
}

/// What the reader has of one leaf for the per-leaf work.
pub enum Data {
    /// Not read: the caller knows it already.
    Skipped,
    /// A hole of a regular file: zeros, not read.
    Zero,
    /// The leaf's bytes.
    Read(Buf),
}

/// One leaf: its index, offset, length and the result of the per-leaf work.
pub struct Leaf<T> {
    /// Leaf index.
    pub index: u64,
    /// Device offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: usize,
    /// What the work function made of the leaf.
    pub value: T,
}

/// The leaves, in order, as the workers deliver them. Ends after the last leaf, or
/// after the first read error (which it delivers).
pub struct Leaves<T> {
    workers: Vec<Receiver<Batch<T>>>,
    /// What each worker delivered and the consumer has not taken yet.
    taken: Vec<std::collections::VecDeque<Result<Leaf<T>, DeviceError>>>,
    next: usize,
    failed: bool,
}

/// Leaves a worker hands over at once: a leaf it read ends a batch, leaves it did not
/// read (skipped, holes) go up to [`CHEAP_BATCH`] at a time, so that a sparse terabyte
/// does not cost two thread wake-ups per leaf.
type Batch<T> = Vec<Result<Leaf<T>, DeviceError>>;

/// The most leaves without data in one batch.
const CHEAP_BATCH: usize = 256;

impl<T> Iterator for Leaves<T> {
    type Item = Result<Leaf<T>, DeviceError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.workers.is_empty() {
            return None;
        }
        let lane = self.next % self.workers.len();
        if self.taken[lane].is_empty() {
            self.taken[lane].extend(self.workers[lane].recv().ok()?);
        }
        let item = self.taken[lane].pop_front()?;
        self.next += 1;
        self.failed = item.is_err();
        Some(item)
    }
}

/// Reads the leaves `leaves` of `layout` from `device` on scoped worker threads, except
/// those whose entry in `skip` (indexed from `leaves.start`; missing entries mean
/// "read") is true and holes, applies `work(offset, data)` to each and delivers them in
/// order. A worker stops at its first read error, which it delivers, or when the
/// consumer goes.
pub fn spawn<'scope, 'env, T, F>(
    scope: &'scope Scope<'scope, 'env>,
    device: &'env Device,
    layout: Layout,
    leaves: Range<u64>,
    skip: Vec<bool>,
    work: F,
) -> Leaves<T>
where
    T: Send + 'scope,
    F: Fn(u64, Data) -> T + Send + Sync + 'scope,
{
    let count = leaves.end.saturating_sub(leaves.start);
    let k = (workers() as u64).min(count).max(1) as usize;
    let depth = DEPTH.div_ceil(k);
    let skip = Arc::new(skip);
    let work = Arc::new(work);
    let running = Arc::new(std::sync::atomic::AtomicUsize::new(k));
    let mut rxs = Vec::with_capacity(k);
    for t in 0..k {
        let (tx, rx) = sync_channel(depth);
        rxs.push(rx);
        let (skip, work, running) = (Arc::clone(&skip), Arc::clone(&work), Arc::clone(&running));
        let start = leaves.start + t as u64;
        let end = leaves.end;
        scope.spawn(move || {
            let mut batch = Vec::new();
            for index in (start..end).step_by(k) {
                let (offset, len) = layout.leaf_span(index);
                let len = len as usize;
                let mut read = false;
                let leaf = if skip.get((index - leaves.start) as usize).copied().unwrap_or(false) {
                    Ok(Leaf { index, offset, len, value: work(offset, Data::Skipped) })
                } else if device.is_hole(offset, len as u64) {
                    Ok(Leaf { index, offset, len, value: work(offset, Data::Zero) })
                } else {
                    read = true;
                    let mut bytes = POOL.take(len);
                    let got = device.read_at(offset, &mut bytes);
                    device.done_with(offset, len as u64);
                    got.map(|()| {
                        let buf = Buf { bytes, pooled: true };
                        Leaf { index, offset, len, value: work(offset, Data::Read(buf)) }
                    })
                };
                let failed = leaf.is_err();
                batch.push(leaf);
                if (read || failed || batch.len() >= CHEAP_BATCH) && tx.send(std::mem::take(&mut batch)).is_err()
                    || failed
                {
                    return;
                }
            }
            if !batch.is_empty() && tx.send(batch).is_err() {
                return;
            }
            // Read-ahead may have cached more than the leaves (into holes, past the
            // last one): the last worker to finish drops the pass's whole span.
            if running.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) != 1 {
                return;
            }
            let (first, _) = layout.leaf_span(leaves.start);
            let (last, last_len) = layout.leaf_span(leaves.end.max(1) - 1);
            device.done_with(first, (last + last_len).saturating_sub(first));
        });
    }
    Leaves { taken: rxs.iter().map(|_| Default::default()).collect(), workers: rxs, next: 0, failed: false }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Side;
    use crate::hash::HashAlgo;

    fn layout(size: u64, buffer: u64) -> Layout {
        Layout { hash: HashAlgo::Blake3, buffer, chunk: None, fanout: 4, device_size: size }
    }

    #[test]
    fn leaves_arrive_in_order_with_their_bytes_skipped_ones_unread() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dev");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let dev = Device::open_read(&p, Side::Local).unwrap();
        let l = layout(data.len() as u64, 4096);
        let mut skip = vec![false; 25];
        skip[3] = true;
        let got: Vec<(u64, Option<Vec<u8>>)> = std::thread::scope(|s| {
            let leaves = spawn(s, &dev, l, 0..25, skip, |_, d| match d {
                Data::Read(b) => Some(b.to_vec()),
                _ => None,
            });
            leaves.map(|leaf| leaf.map(|leaf| (leaf.index, leaf.value)).unwrap()).collect()
        });
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), (0..25).collect::<Vec<_>>());
        for (i, bytes) in got {
            let (o, n) = l.leaf_span(i);
            match bytes {
                Some(b) => assert_eq!(b, data[o as usize..(o + n) as usize], "leaf {i}"),
                None => assert_eq!(i, 3, "only the skipped leaf is unread"),
            }
        }
        assert_eq!(dev.bytes_read(), data.len() as u64 - 4096, "the skipped leaf was read");
    }

    #[test]
    fn a_read_error_ends_the_leaves_after_the_ones_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dev");
        std::fs::write(&p, vec![1u8; 40_000]).unwrap();
        let dev = Device::open_read(&p, Side::Local).unwrap();
        // The layout claims more than the file holds: leaf 9 and later cannot be read.
        let l = layout(60_000, 4096);
        let got: Vec<Result<u64, String>> = std::thread::scope(|s| {
            spawn(s, &dev, l, 0..15, Vec::new(), |_, _| ())
                .map(|r| r.map(|l| l.index).map_err(|e| e.to_string()))
                .collect()
        });
        assert_eq!(got.len(), 10, "{got:?}");
        assert!(got[..9].iter().all(Result::is_ok));
        assert!(got[9].as_ref().is_err_and(|e| e.contains("ended before")), "{got:?}");
    }
}
