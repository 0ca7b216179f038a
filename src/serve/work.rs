//! What a session does besides its main loop: blocks checked and reads answered on
//! worker threads (their replies sent in order by a thread of their own), and the
//! digests of ranges, answered from the index or read.

use std::io::Write;
use std::sync::{Arc, Mutex, mpsc};

use super::{Abort, Server, invalid, lock};
use crate::block::{BlockError, BlockFrame, VerifiedBlock};
use crate::compress::Codec;
use crate::device::{Device, DeviceError};
use crate::digest_index::{DigestIndex, whole_leaves};
use crate::hash::Digest;
use crate::leaf_reader::{self, Data};
use crate::ordered::{Ordered, Taker};
use crate::protocol::{Check, Frame, FrameWriter};
use crate::tree::{Layout, leaf_digest, zero_leaf_digest};

/// A block to check, for a device of `limit` bytes under `layout`; `track`: the
/// receiver's state records what is written, so the block's piece digests are wanted.
pub(super) type ToCheck = (BlockFrame, u64, Layout, bool);

/// Checks a block (on a worker), and works out the piece digests its write will record.
pub(super) fn check_block((frame, limit, layout, track): ToCheck) -> Result<VerifiedBlock, BlockError> {
    let mut block = frame.verify(limit, &layout)?;
    if track {
        block.digest_pieces(&layout);
    }
    Ok(block)
}

/// Blocks given to be checked, not yet written.
pub(super) type Checking = Ordered<ToCheck, Result<VerifiedBlock, crate::block::BlockError>>;

/// A read of a source device's range, done on a worker: its reply, and the digests of
/// the whole leaves it covers (for the source's state).
pub(super) struct ReadJob {
    pub device: Arc<Device>,
    pub offset: u64,
    pub len: u32,
    pub codec: Codec,
    /// The layout, when the leaves read are to be learnt.
    pub learn: Option<Layout>,
}

/// A leaf read by a `Read`: its index, digest and piece digests.
pub(super) type Learnt = (u64, Digest, Vec<Digest>);

/// A read's reply and the leaves it learnt.
pub(super) type ReadDone = Result<(Frame, Vec<Learnt>), DeviceError>;

/// What the reply thread says of each read it answered, counted.
pub(super) struct Answers {
    rx: mpsc::Receiver<Result<Vec<Learnt>, Abort>>,
    count: usize,
}

impl Answers {
    /// Counts what `rx` says, from none.
    pub fn new(rx: mpsc::Receiver<Result<Vec<Learnt>, Abort>>) -> Answers {
        Answers { rx, count: 0 }
    }

    /// Takes what the reply thread said so far, and waits until at most `keep` of the
    /// `given` reads are unanswered; the source's index learns their leaves.
    pub fn settle(&mut self, server: &mut Server<'_>, given: usize, keep: usize) -> Result<(), Abort> {
        loop {
            let waiting = given - self.count > keep;
            let answer = if waiting { self.rx.recv().ok() } else { self.rx.try_recv().ok() };
            let Some(answer) = answer else {
                return match waiting {
                    true => Err(invalid("a read".into(), "answering it (its thread failed)")),
                    false => Ok(()),
                };
            };
            self.count += 1;
            server.learn(answer?);
        }
    }
}

impl ReadJob {
    pub fn run(self) -> ReadDone {
        let ReadJob { device, offset, len, codec, learn } = self;
        if device.is_hole(offset, u64::from(len)) {
            return Ok((Frame::Block(BlockFrame::zeros(offset, len, Check::None)), Vec::new()));
        }
        let mut buf = leaf_reader::buffer(len as usize);
        if let Err(e) = device.read_at(offset, &mut buf) {
            leaf_reader::recycle(buf);
            return Err(e);
        }
        let leaves = learn.map_or_else(Vec::new, |l| whole_leaves(&l, offset, &buf, |_| true));
        // Uncompressed data (a local run's) moves on in its buffer, which the writer
        // gives back to the pool; anything else is encoded from it.
        let block = match codec {
            Codec::None if !crate::hash::is_zero(&buf) => BlockFrame::raw(offset, buf, Check::None),
            _ => {
                let block = BlockFrame::encode(offset, &buf, codec, Check::None);
                leaf_reader::recycle(buf);
                block
            }
        };
        Ok((Frame::Block(block), leaves))
    }
}

/// The reply thread: sends the replies of `replies` in order as they are ready, and says
/// what each read learnt (or why it failed) through `answered`. After a failure nothing
/// more is sent: the session's abort says why.
pub(super) fn send_replies<W: Write>(
    mut replies: Taker<ReadDone>,
    w: &Mutex<FrameWriter<W>>,
    answered: mpsc::Sender<Result<Vec<Learnt>, Abort>>,
) {
    let mut failed = false;
    while let Some(done) = replies.take() {
        let answer = match done {
            Ok(_) if failed => Ok(Vec::new()),
            Ok((reply, leaves)) => {
                let mut w = lock(w);
                w.send_owned(reply).and_then(|()| w.flush()).map(|()| leaves).map_err(Abort::from)
            }
            Err(e) => Err(Abort::from(e)),
        };
        failed |= answer.is_err();
        if answered.send(answer).is_err() {
            return;
        }
    }
}

/// Digests of every `block`-sized piece of `[offset, offset+len)`, read only where the
/// index does not already know them: leaf-aligned leaf requests and whole-leaf piece
/// requests are answered (and remembered) through the index. Pieces of the leaf size
/// follow the leaf rule, all others are plain digests of their data.
pub(super) fn digest_range(
    index: &mut DigestIndex,
    device: &Device,
    offset: u64,
    len: u64,
    block: u64,
    buf: &mut Vec<u8>,
) -> Result<Vec<u8>, DeviceError> {
    let l = *index.layout();
    let b = l.buffer;
    let end = offset + len;
    let leaf_aligned = offset.is_multiple_of(b) && (end.is_multiple_of(b) || end == l.device_size);
    if block == b && leaf_aligned && end <= l.device_size {
        return leaf_digests(index, device, offset / b..end.div_ceil(b), buf);
    }
    let leaf = offset / b;
    if l.piece() == block && offset.is_multiple_of(b) && len == l.leaf_len(leaf) {
        let pieces = match index.pieces(leaf) {
            Some(p) => p,
            None => index.read_leaf(device, leaf, buf)?.1,
        };
        return Ok(pieces.iter().flat_map(|p| p.as_bytes().iter().copied()).collect());
    }
    range_digests(index, device, offset, len, block, buf)
}

/// The digests of `leaves`, through the index: the leaves not known are read and hashed
/// on every core, and learned.
fn leaf_digests(
    index: &mut DigestIndex,
    device: &Device,
    leaves: std::ops::Range<u64>,
    buf: &mut Vec<u8>,
) -> Result<Vec<u8>, DeviceError> {
    let l = *index.layout();
    let mut out = Vec::with_capacity((leaves.end - leaves.start) as usize * l.hash.digest_len());
    let skip: Vec<bool> = leaves.clone().map(|leaf| index.leaf(leaf).is_some()).collect();
    // Workers only pay when there is data to read: a batch of known leaves and holes
    // (most of a sparse image) is answered here.
    let data = |leaf: u64| {
        let (o, n) = l.leaf_span(leaf);
        !device.is_hole(o, n)
    };
    if leaves.clone().zip(&skip).filter(|&(leaf, known)| !*known && data(leaf)).count() < 2 {
        for leaf in leaves {
            let d = match index.leaf(leaf) {
                Some(d) => d,
                None => index.read_leaf(device, leaf, buf)?.0,
            };
            out.extend_from_slice(d.as_bytes());
        }
        return Ok(out);
    }
    std::thread::scope(|scope| {
        let read = leaf_reader::spawn(scope, device, l, leaves, skip, move |offset, data| match data {
            Data::Skipped => None,
            Data::Zero => Some(zero_leaf_digest(&l, l.leaf_len(offset / l.buffer))),
            Data::Read(bytes) => Some(leaf_digest(&l, &bytes)),
        });
        for leaf in read {
            let leaf = leaf?;
            let d = match leaf.value {
                Some((d, pieces)) => {
                    index.learn(leaf.index, &d, &pieces);
                    d
                }
                None => {
                    let forgotten = || device.error("hash", std::io::Error::other("a known leaf was forgotten"));
                    index.leaf(leaf.index).ok_or_else(forgotten)?
                }
            };
            out.extend_from_slice(d.as_bytes());
        }
        Ok(out)
    })
}

/// Any other range, read and hashed as asked; leaf-sized pieces follow the leaf rule, so
/// that a range cut short (a recheck over the synced length of a larger device) still
/// compares with the other side's leaves. A range known to be zero (pieces the state
/// holds as zero, or a hole) is not read: a change written where the receiver had zeros
/// is refined against them for nothing.
fn range_digests(
    index: &DigestIndex,
    device: &Device,
    offset: u64,
    len: u64,
    block: u64,
    buf: &mut Vec<u8>,
) -> Result<Vec<u8>, DeviceError> {
    let l = *index.layout();
    let b = l.buffer;
    let end = offset + len;
    let mut out = Vec::with_capacity(len.div_ceil(block.max(1)) as usize * l.hash.digest_len());
    if index.known_zero(offset, len) || device.is_hole(offset, len) {
        let mut at = offset;
        while at < end {
            let n = block.min(end - at);
            let d = if block == b { zero_leaf_digest(&l, n).0 } else { l.hash.zero_digest(n as usize) };
            out.extend_from_slice(d.as_bytes());
            at += n;
        }
        return Ok(out);
    }
    let digest = |piece: &[u8]| if block == b { leaf_digest(&l, piece).0 } else { l.hash.digest(piece) };
    let step = block * ((4u64 << 20) / block).max(1);
    let mut at = offset;
    while at < end {
        let n = step.min(end - at) as usize;
        buf.resize(n, 0);
        device.read_at(at, buf)?;
        for piece in buf.chunks(block as usize) {
            out.extend_from_slice(digest(piece).as_bytes());
        }
        at += n as u64;
    }
    Ok(out)
}

/// The plain digest of each whole block of `range` (the hash of its bytes, as the
/// original's bitmap holds them), read from the device; a hole is not read. With
/// `learn`, the index learns the leaves read on the way, so that the source's state is
/// built from the same read.
pub(super) fn plain_digests(
    index: &mut DigestIndex,
    device: &Device,
    (offset, len): (u64, u64),
    buf: &mut Vec<u8>,
    learn: bool,
) -> Result<Vec<u8>, DeviceError> {
    let l = *index.layout();
    let mut out = Vec::with_capacity(len.div_ceil(l.buffer) as usize * l.hash.digest_len());
    let mut at = offset;
    while at < offset + len {
        let n = l.buffer.min(offset + len - at);
        if device.is_hole(at, n) {
            out.extend_from_slice(l.hash.zero_digest(n as usize).as_bytes());
        } else {
            buf.resize(n as usize, 0);
            device.read_at(at, buf)?;
            out.extend_from_slice(l.hash.digest(buf).as_bytes());
            if learn {
                index.observe(at, buf);
            }
        }
        at += n;
    }
    Ok(out)
}
