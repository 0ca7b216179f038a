//! The local reader: sequential reading of a local device on its own thread, so that
//! reading (and whatever work is attached to each leaf) overlaps with the protocol
//! traffic on the main thread. Leaves the caller already knows (from a fresh state) are
//! skipped, not read.

use std::sync::mpsc::{Receiver, sync_channel};
use std::thread::Scope;

use crate::device::{Device, DeviceError};
use crate::tree::Layout;

/// Leaves read ahead of the main thread.
const DEPTH: usize = 8;

/// What the reader has of one leaf for the per-leaf work.
pub enum Data {
    /// Not read: the caller knows it already.
    Skipped,
    /// A hole of a regular file: zeros, not read.
    Zero,
    /// The leaf's bytes.
    Read(Vec<u8>),
}

/// One leaf: its index, offset, length and the result of the per-leaf work.
pub struct Leaf<T> {
    /// Leaf index.
    pub index: u64,
    /// Device offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: usize,
    /// What the work function made of the leaf (given `None` data for a skipped leaf).
    pub value: T,
}

/// Reads the leaves of `layout` from `device` on a scoped thread, except those marked in
/// `skip` and holes, applies `work(offset, data)` to each and
/// delivers them in order through a channel holding at most [`DEPTH`] leaves. The
/// thread stops at the first read error, which it delivers, or when the receiver goes.
pub fn spawn<'scope, 'env, T, F>(
    scope: &'scope Scope<'scope, 'env>,
    device: &'env Device,
    layout: Layout,
    skip: Vec<bool>,
    work: F,
) -> Receiver<Result<Leaf<T>, DeviceError>>
where
    T: Send + 'scope,
    F: Fn(u64, Data) -> T + Send + 'scope,
{
    let (tx, rx) = sync_channel(DEPTH);
    scope.spawn(move || {
        for index in 0..layout.leaf_count() {
            let (offset, len) = layout.leaf_span(index);
            let len = len as usize;
            let leaf = if skip.get(index as usize).copied().unwrap_or(false) {
                Ok(Leaf { index, offset, len, value: work(offset, Data::Skipped) })
            } else if device.is_hole(offset, len as u64) {
                Ok(Leaf { index, offset, len, value: work(offset, Data::Zero) })
            } else {
                let mut buf = vec![0u8; len];
                device.read_at(offset, &mut buf).map(|()| Leaf {
                    index,
                    offset,
                    len,
                    value: work(offset, Data::Read(buf)),
                })
            };
            let failed = leaf.is_err();
            if tx.send(leaf).is_err() || failed {
                return;
            }
        }
    });
    rx
}
