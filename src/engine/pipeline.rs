//! Sequential reading of a local device on its own thread, so reading (and whatever work
//! is attached to each block) overlaps with the protocol traffic on the main thread.
//! Blocks the caller already knows (from a fresh state) are skipped, not read.

use std::sync::mpsc::{Receiver, sync_channel};
use std::thread::{Scope, ScopedJoinHandle};

use crate::device::{Device, DeviceError};

/// One block: its index, offset, length and the result of the per-block work.
pub struct Item<T> {
    /// Block index.
    pub index: u64,
    /// Device offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: usize,
    /// What the work function made of the block (`None` data for a skipped block).
    pub value: T,
}

/// Geometry of a run: `len` bytes in `block`-sized pieces (the last may be shorter).
#[derive(Clone, Copy, Debug)]
pub struct Blocks {
    /// Bytes covered.
    pub len: u64,
    /// Block size.
    pub block: u64,
}

impl Blocks {
    /// Number of blocks.
    pub fn count(&self) -> u64 {
        self.len.div_ceil(self.block)
    }

    /// Offset and length of block `i`.
    pub fn span(&self, i: u64) -> (u64, usize) {
        let offset = i * self.block;
        (offset, (self.len - offset).min(self.block) as usize)
    }
}

/// Reads `blocks` from `device` on a scoped thread, except those marked in `skip`,
/// applies `work` to each (with `None` for a skipped block) and delivers them in order
/// through a channel holding at most `depth` blocks.
pub fn spawn<'scope, 'env, T, F>(
    scope: &'scope Scope<'scope, 'env>,
    device: &'env Device,
    blocks: Blocks,
    skip: Vec<bool>,
    depth: usize,
    work: F,
) -> (Receiver<Result<Item<T>, DeviceError>>, ScopedJoinHandle<'scope, ()>)
where
    T: Send + 'scope,
    F: Fn(u64, Option<Vec<u8>>) -> T + Send + 'scope,
{
    let (tx, rx) = sync_channel(depth.max(1));
    let handle = scope.spawn(move || {
        for index in 0..blocks.count() {
            let (offset, len) = blocks.span(index);
            let item = if skip.get(index as usize).copied().unwrap_or(false) {
                Ok(Item { index, offset, len, value: work(offset, None) })
            } else {
                let mut buf = vec![0u8; len];
                device.read_at(offset, &mut buf).map(|()| Item { index, offset, len, value: work(offset, Some(buf)) })
            };
            let failed = item.is_err();
            if tx.send(item).is_err() || failed {
                return;
            }
        }
    });
    (rx, handle)
}
