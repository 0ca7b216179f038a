//! The transfers of a bitmap SYNC: the source's plain block digests (read locally for a
//! PUSH, asked of the endpoint with `BlockDigests` for a PULL) are compared with what
//! FILE says the receiver holds, and differing blocks are sent whole, the receiver never
//! read. FILE forgets a batch of blocks, durably, before any of them is written. Also
//! the source's digests alone, for a refresh of FILE and for `--update-bitmap`.

use super::compare::Purpose;
use super::window::{Comparison, Ctx, WINDOW, Window};
use super::{Direction, Fault, Params};
use crate::bitmap_file::{BitmapFile, Geometry};
use crate::block::Check;
use crate::device::Device;
use crate::digest_index::DigestIndex;
use crate::endpoint::Endpoint;
use crate::hash::Digest;
use crate::leaf_reader::{self, Buf, Data};
use crate::report::Reporter;
use crate::tree::{leaf_digest, zero_leaf_digest};

/// Bytes of device data covered by one request for the endpoint's block digests.
const DIGEST_BATCH: u64 = 16 << 20;
/// Bytes of differing blocks that FILE forgets at once (PUSH keeps their data meanwhile).
const FORGET_BYTES: u64 = 16 << 20;
/// Blocks that FILE forgets at once at most.
const FORGET_BLOCKS: usize = 256;

/// What a SYNC with a bitmap compares the source's blocks with.
#[derive(Debug)]
pub(super) enum Basis {
    /// FILE's digests: the receiver is not read.
    File(Vec<u8>),
    /// Nothing (`--reset-bitmap`, a new FILE, a new receiver): every block is sent, the
    /// receiver is not read.
    Nothing,
    /// The receiver itself (`--update-bitmap`): a regular SYNC.
    Receiver,
}

impl Basis {
    /// True if FILE says the receiver already holds block `leaf` with digest `d`.
    pub fn holds(&self, leaf: u64, d: &Digest) -> bool {
        let Basis::File(digests) = self else { return false };
        let n = d.as_bytes().len();
        digests.get(leaf as usize * n..(leaf as usize + 1) * n) == Some(d.as_bytes())
    }
}

/// A block to send, once FILE has forgotten it.
struct Differing {
    leaf: u64,
    offset: u64,
    len: usize,
    /// PUSH: the data, when it was read.
    data: Option<Buf>,
    /// The source's digest the receiver checks the data against.
    check: Check,
}

/// Differing blocks waiting to be sent.
#[derive(Default)]
struct Batch {
    blocks: Vec<Differing>,
    bytes: u64,
}

impl Batch {
    /// Adds a block; true when the batch is full.
    fn push(&mut self, d: Differing) -> bool {
        self.bytes += d.len as u64;
        self.blocks.push(d);
        self.bytes >= FORGET_BYTES || self.blocks.len() >= FORGET_BLOCKS
    }

    /// FILE (if the basis is FILE) forgets the blocks, durably; then they are sent.
    fn send(&mut self, w: &mut Window<'_>, file: Option<&mut BitmapFile>) -> Result<(), Fault> {
        if self.blocks.is_empty() {
            return Ok(());
        }
        if let Some(f) = file {
            let leaves: Vec<u64> = self.blocks.iter().map(|d| d.leaf).collect();
            f.forget(&leaves)?;
        }
        for d in self.blocks.drain(..) {
            w.out.differing += 1;
            w.transfer(d.offset, d.len, d.data.as_deref(), d.check)?;
            if w.direction() == Some(Direction::Push) {
                w.drain(WINDOW)?;
            }
        }
        self.bytes = 0;
        Ok(())
    }
}

/// SYNC against FILE's digests, or against nothing (every block sent): the receiver is
/// never read, differing blocks go whole. FILE forgets blocks before they are written.
/// Returns what was done and the source's block digests.
pub(super) fn sync(
    ctx: Ctx<'_>,
    dir: Direction,
    basis: &Basis,
    file: &mut BitmapFile,
) -> Result<(Comparison, Vec<u8>), Fault> {
    let params = Params { refine: None, ..ctx.params.clone() };
    let ctx = Ctx { params: &params, ..ctx };
    // A FILE that started out empty claims nothing: no need to forget anything.
    let file = matches!(basis, Basis::File(_)).then_some(file);
    match dir {
        Direction::Push => push(ctx, basis, file),
        Direction::Pull => pull(ctx, basis, file),
    }
}

/// What the reader makes of one source block: its leaf digest and pieces (for the
/// index and the receiver's check), its plain digest, and its data if it must be sent.
struct Block {
    leaf: (Digest, Vec<Digest>),
    plain: Digest,
    data: Option<Buf>,
}

fn push(ctx: Ctx<'_>, basis: &Basis, mut file: Option<&mut BitmapFile>) -> Result<(Comparison, Vec<u8>), Fault> {
    let layout = ctx.layout();
    let hash = layout.hash;
    let local = ctx.local;
    let mut source = Vec::with_capacity((layout.leaf_count() as usize).saturating_mul(hash.digest_len()));
    // Every block is read: the plain digests are in no state.
    let skip = vec![false; layout.leaf_count() as usize];
    std::thread::scope(|scope| {
        let rx = leaf_reader::spawn(scope, local, layout, 0..layout.leaf_count(), skip, move |offset, data| {
            let leaf = offset / layout.buffer;
            let len = layout.leaf_len(leaf);
            match data {
                Data::Read(d) => {
                    let plain = hash.digest(&d);
                    let keep = !basis.holds(leaf, &plain);
                    Block { leaf: leaf_digest(&layout, &d), plain, data: keep.then_some(d) }
                }
                Data::Zero | Data::Skipped => {
                    Block { leaf: zero_leaf_digest(&layout, len), plain: hash.zero_digest(len as usize), data: None }
                }
            }
        });
        let mut w = Window::new(ctx, Purpose::Sync(Direction::Push));
        let mut batch = Batch::default();
        for leaf in rx {
            let leaf = leaf?;
            let Block { leaf: (d, pieces), plain, data } = leaf.value;
            w.ctx.index.learn(leaf.index, &d, &pieces);
            source.extend_from_slice(plain.as_bytes());
            w.out.blocks += 1;
            w.ctx.rep.advance(leaf.len as u64);
            if basis.holds(leaf.index, &plain) {
                continue;
            }
            w.ctx.rep.debug(format_args!("block {} @ {}: not in the bitmap", leaf.index, leaf.offset));
            let block =
                Differing { leaf: leaf.index, offset: leaf.offset, len: leaf.len, data, check: Check::Leaves(vec![d]) };
            if batch.push(block) {
                batch.send(&mut w, file.as_deref_mut())?;
            }
        }
        batch.send(&mut w, file)?;
        w.drain(0)?;
        Ok((w.out, source))
    })
}

fn pull(ctx: Ctx<'_>, basis: &Basis, mut file: Option<&mut BitmapFile>) -> Result<(Comparison, Vec<u8>), Fault> {
    let layout = ctx.layout();
    let mut source = Vec::with_capacity((layout.leaf_count() as usize).saturating_mul(layout.hash.digest_len()));
    let mut w = Window::new(ctx, Purpose::Sync(Direction::Pull)).with_plain_batches();
    let mut batch = Batch::default();
    while let Some((first, digests)) = w.next_digest_batch()? {
        for (k, d) in digests.into_iter().enumerate() {
            let leaf = first + k as u64;
            let (offset, len) = layout.leaf_span(leaf);
            source.extend_from_slice(d.as_bytes());
            w.out.blocks += 1;
            w.ctx.rep.advance(len);
            if basis.holds(leaf, &d) {
                continue;
            }
            w.ctx.rep.debug(format_args!("block {leaf} @ {offset}: not in the bitmap"));
            let check = Check::Pieces { unit: layout.buffer as u32, digests: vec![d] };
            if batch.push(Differing { leaf, offset, len: len as usize, data: None, check }) {
                batch.send(&mut w, file.as_deref_mut())?;
            }
        }
        w.maybe_checkpoint()?;
    }
    batch.send(&mut w, file)?;
    w.drain(0)?;
    Ok((w.out, source))
}

/// The plain digest of every block of the local device, read in full; with `learn`,
/// its index learns the leaves on the way. `rep` is told the progress.
pub(super) fn local_digests(
    local: &Device,
    index: &mut DigestIndex,
    learn: bool,
    rep: Option<&Reporter>,
) -> Result<Vec<u8>, Fault> {
    let layout = *index.layout();
    let hash = layout.hash;
    let mut out = Vec::with_capacity((layout.leaf_count() as usize).saturating_mul(hash.digest_len()));
    let skip = vec![false; layout.leaf_count() as usize];
    std::thread::scope(|scope| {
        let rx = leaf_reader::spawn(scope, local, layout, 0..layout.leaf_count(), skip, move |offset, data| {
            let len = layout.leaf_len(offset / layout.buffer);
            match data {
                Data::Read(d) => (hash.digest(&d), learn.then(|| leaf_digest(&layout, &d))),
                Data::Zero | Data::Skipped => (hash.zero_digest(len as usize), None),
            }
        });
        for leaf in rx {
            let leaf = leaf?;
            let (plain, digests) = leaf.value;
            if let Some((d, pieces)) = digests {
                index.learn(leaf.index, &d, &pieces);
            }
            out.extend_from_slice(plain.as_bytes());
            if let Some(rep) = rep {
                rep.advance(leaf.len as u64);
            }
        }
        Ok(out)
    })
}

/// The plain digest of every block of the endpoint's device, a few batches in flight.
pub(super) fn remote_digests(ep: &mut Endpoint, g: &Geometry, rep: &Reporter) -> Result<Vec<u8>, Fault> {
    let per = (DIGEST_BATCH / g.buffer).max(1);
    let batches: Vec<(u64, u64, u64)> = (0..g.blocks().div_ceil(per))
        .map(|i| {
            let first = i * per;
            let count = per.min(g.blocks() - first);
            let offset = first * g.buffer;
            (offset, ((first + count) * g.buffer).min(g.device_size) - offset, count)
        })
        .collect();
    let mut out = Vec::with_capacity(g.table_len() as usize);
    let mut asked = 0;
    for (i, &(_, len, count)) in batches.iter().enumerate() {
        while asked < batches.len() && asked < i + WINDOW {
            ep.ask_block_digests(batches[asked].0, batches[asked].1)?;
            asked += 1;
        }
        for d in ep.digests(g.hash, count as usize)? {
            out.extend_from_slice(d.as_bytes());
        }
        rep.advance(len);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_file_basis_holds_blocks_and_only_equal_ones() {
        let d = |b: u8| Digest::from_slice(&[b; 20]);
        let mut digests = vec![1u8; 20];
        digests.extend_from_slice(&[0u8; 20]);
        let basis = Basis::File(digests);
        assert!(basis.holds(0, &d(1)));
        assert!(!basis.holds(0, &d(2)));
        // A zero digest is the original's "unknown": no block has it.
        assert!(!basis.holds(1, &d(1)));
        assert!(!basis.holds(2, &d(1)), "past the end");
        assert!(!Basis::Nothing.holds(0, &d(1)));
        assert!(!Basis::Receiver.holds(0, &d(1)));
    }
}
