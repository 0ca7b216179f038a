//! SYNC and RECHECK by comparison: both sides digest their leaves in parallel (or take
//! them from a fresh state without reading), the client compares, and for SYNC only
//! differing leaves, refined to the pieces that differ, cross the wire. With both states
//! fresh, the trees are walked instead, one round trip per level, and nothing that is
//! equal is ever read.

use std::sync::atomic::{AtomicBool, Ordering};

use super::window::{Comparison, Ctx, WINDOW, Window};
use super::{Direction, Fault};
use crate::device::Device;
use crate::digest_index::DigestIndex;
use crate::hash::Digest;
use crate::leaf_reader::{self, Buf, Data, Leaf};
use crate::tree::{Layout, leaf_digest, zero_leaf_digest};

/// What to do with differing blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Only count them (recheck).
    Check,
    /// Transfer them in this direction.
    Sync(Direction),
}

/// What the local reader thread delivers for one leaf.
struct Local {
    /// Digest and piece digests, if the leaf was read (else the index knows them).
    read: Option<(Digest, Vec<Digest>)>,
    /// The data, when it may be needed and was read.
    data: Option<Buf>,
    /// Its bytes were read (not a hole, not known from the index): progress counts them
    /// towards the rate.
    moved: bool,
}

/// Compares the local device with the endpoint's over the run's leaves, reading only
/// what neither the local index nor the endpoint's state already knows.
pub fn run(ctx: Ctx<'_>, purpose: Purpose) -> Result<Comparison, Fault> {
    let leaves = ctx.layout().leaf_count();
    run_first(ctx, purpose, leaves)
}

/// [`run`] over the first `leaves` leaves only (the part of a COPY that an
/// interrupted run had done).
pub fn run_first(ctx: Ctx<'_>, purpose: Purpose, leaves: u64) -> Result<Comparison, Fault> {
    let layout = ctx.layout();
    // Data is kept to send it (PUSH) or to digest its pieces when refining; it lives only
    // as long as the leaf is in the reader's channel.
    let keep_data = matches!(purpose, Purpose::Sync(_))
        && (ctx.params.refine.is_some() || purpose == Purpose::Sync(Direction::Push));
    let skip: Vec<bool> = (0..leaves).map(|i| ctx.index.leaf(i).is_some()).collect();
    let local = ctx.local;
    if skip.iter().filter(|&&s| s).count() * 2 > skip.len() {
        local.expect_scattered_reads();
    }
    std::thread::scope(|scope| {
        let mut local_rx = leaf_reader::spawn(scope, local, layout, 0..leaves, skip, move |offset, data| {
            let read = digests_of(&layout, offset, &data);
            match data {
                Data::Read(data) => Local { read, data: keep_data.then_some(data), moved: true },
                // A hole's data is read again (as the hole it is) only if it must be sent.
                _ => Local { read, data: None, moved: false },
            }
        });
        let mut w = Window::new(ctx, purpose).first_leaves(leaves);
        while let Some((first, remote)) = w.next_digest_batch()? {
            for (k, theirs) in remote.into_iter().enumerate() {
                let leaf = local_rx.next().ok_or(Fault::Internal("local reader stopped"))??;
                debug_assert_eq!(leaf.index, first + k as u64);
                compare_leaf(&mut w, leaf, theirs)?;
                w.make_room()?;
            }
            w.maybe_checkpoint()?;
        }
        Ok(w.out)
    })
}

/// The leaf digest and piece digests of what the reader delivered for the leaf at
/// `offset`: a hole's are those of zeros; `None` for a leaf the index knows.
fn digests_of(layout: &Layout, offset: u64, data: &Data) -> Option<(Digest, Vec<Digest>)> {
    match data {
        Data::Skipped => None,
        Data::Zero => Some(zero_leaf_digest(layout, layout.leaf_len(offset / layout.buffer))),
        Data::Read(bytes) => Some(leaf_digest(layout, bytes)),
    }
}

/// Reads and digests the local device's unknown leaves, in order, into `index` until
/// `enough` is set (the endpoint is connected): the seconds an SSH connection takes to
/// set up are spent hashing, and the comparison then skips what is known. Returns the
/// leaves learnt; a read error only stops it (the comparison meets it again).
pub fn hash_ahead(local: &Device, index: &mut DigestIndex, enough: &AtomicBool) -> u64 {
    let layout = *index.layout();
    let skip: Vec<bool> = (0..layout.leaf_count()).map(|i| index.leaf(i).is_some()).collect();
    let mut learnt = 0;
    std::thread::scope(|scope| {
        let leaves = leaf_reader::spawn(scope, local, layout, 0..layout.leaf_count(), skip, move |offset, data| {
            digests_of(&layout, offset, &data)
        });
        for leaf in leaves {
            if enough.load(Ordering::Acquire) {
                break;
            }
            let Ok(leaf) = leaf else { break };
            if let Some((d, pieces)) = leaf.value {
                index.learn(leaf.index, &d, &pieces);
                learnt += 1;
            }
        }
    });
    learnt
}

/// One leaf of a full comparison: ours (read or known) against theirs.
fn compare_leaf(w: &mut Window<'_>, leaf: Leaf<Local>, theirs: Digest) -> Result<(), Fault> {
    let Local { read, data, moved } = leaf.value;
    let ours = match read {
        Some((d, pieces)) => {
            w.ctx.index.learn(leaf.index, &d, &pieces);
            d
        }
        None => w.ctx.index.leaf(leaf.index).ok_or(Fault::Internal("skipped leaf unknown"))?,
    };
    w.out.blocks += 1;
    match moved {
        true => w.ctx.rep.advance(leaf.len as u64),
        false => w.ctx.rep.skip(leaf.len as u64),
    }
    if ours == theirs {
        if w.ctx.rep.debugging() {
            w.ctx.rep.debug(format_args!("block {} @ {}: same", leaf.index, leaf.offset));
        }
        return Ok(());
    }
    w.ctx.rep.debug(format_args!(
        "block {} @ {} ({} bytes): differs (local {ours}, remote {theirs})",
        leaf.index, leaf.offset, leaf.len
    ));
    let source = if w.purpose == Purpose::Sync(Direction::Pull) { theirs } else { ours };
    w.differs(leaf.index, leaf.offset, leaf.len, data, source)
}

/// Both states are fresh: walk the trees from the root, one batched round trip per
/// level, then transfer only the differing leaves. Nothing equal is read.
pub fn walk(ctx: Ctx<'_>, purpose: Purpose) -> Result<Comparison, Fault> {
    let layout = ctx.layout();
    let tree = ctx.index.tree().ok_or(Fault::Internal("walk without a fresh tree"))?.clone();
    let mut nodes = 0u64;
    let hash = ctx.params.hash;
    let differing = tree.walk(|level, indices| {
        nodes += indices.len() as u64;
        ctx.ep.tree_nodes(hash, level, indices)
    })?;
    ctx.rep.debug(format_args!("tree walk: {nodes} nodes compared, {} leaves differ", differing.len()));
    ctx.rep.skip(layout.device_size);
    let mut w = Window::new(ctx, purpose);
    w.out.nodes = nodes;
    w.out.blocks = layout.leaf_count();
    for (leaf, theirs) in differing {
        let leaf = leaf as u64;
        let (offset, len) = layout.leaf_span(leaf);
        w.ctx.rep.debug(format_args!("block {leaf} @ {offset} ({len} bytes): differs (tree walk)"));
        let source = match purpose {
            Purpose::Sync(Direction::Pull) => theirs,
            _ => w.ctx.index.leaf(leaf).ok_or(Fault::Internal("walked leaf unknown"))?,
        };
        w.differs(leaf, offset, len as usize, None, source)?;
        w.drain(WINDOW)?;
    }
    w.drain(0)?;
    Ok(w.out)
}

#[cfg(test)]
mod property_tests {
    use super::*;
    use crate::compress::Codec;
    use crate::device::{Device, ReceiverSpec, Side};
    use crate::digest_index::DigestIndex;
    use crate::endpoint::Endpoint;
    use crate::engine::Params;
    use crate::hash::HashAlgo;
    use crate::protocol::{Access, OpenRequest, StateOptions};
    use crate::report::{Output, Reporter};
    use proptest::prelude::*;

    /// Syncs `src` onto `dst` in `dir` with the given geometry and returns what was done.
    fn sync(
        src: &[u8],
        dst: &[u8],
        buffer: usize,
        chunk: Option<usize>,
        refine: Option<usize>,
        dir: Direction,
    ) -> (Comparison, Vec<u8>) {
        let tmp = tempfile::tempdir().unwrap();
        let (lp, rp) = (tmp.path().join("local"), tmp.path().join("remote"));
        let (local_bytes, remote_bytes) = match dir {
            Direction::Push => (src, dst),
            Direction::Pull => (dst, src),
        };
        std::fs::write(&lp, local_bytes).unwrap();
        std::fs::write(&rp, remote_bytes).unwrap();
        let params = Params { hash: HashAlgo::Blake3, buffer, chunk, refine, codec: Codec::Zstd(1), adapt: false };
        let mut ep = Endpoint::over(crate::serve::in_process(&rp)).unwrap();
        let spec = ReceiverSpec {
            source_size: src.len() as u64,
            source: None,
            source_name: "src".into(),
            force: false,
            known_zero: false,
        };
        let request = |access| OpenRequest {
            access,
            hash: params.hash,
            codec: params.codec,
            buffer: buffer as u64,
            chunk: chunk.map(|c| c as u64),
            state: StateOptions::off(),
            device: Vec::new(),
        };
        let local = match dir {
            Direction::Push => {
                let access = Access::Write {
                    source_size: src.len() as u64,
                    source: None,
                    source_name: "src".into(),
                    force: false,
                    known_zero: false,
                };
                ep.open(request(access)).unwrap();
                Device::open_read(&lp, Side::Local).unwrap()
            }
            Direction::Pull => {
                ep.open(request(Access::Read)).unwrap();
                Device::open_receiver(&lp, Side::Local, &spec).unwrap()
            }
        };
        let layout = crate::tree::Layout {
            hash: params.hash,
            buffer: buffer as u64,
            chunk: chunk.map(|c| c as u64),
            fanout: 4,
            device_size: src.len() as u64,
        };
        let mut index = DigestIndex::open(&local, layout, &StateOptions::off()).unwrap();
        let rep = Reporter::new(Output::default());
        let ctx = Ctx { local: &local, index: &mut index, ep: &mut ep, params: &params, rep: &rep };
        let c = run(ctx, Purpose::Sync(dir)).unwrap();
        ep.flush_device().unwrap();
        ep.close().unwrap();
        let receiver = match dir {
            Direction::Push => rp,
            Direction::Pull => lp,
        };
        (c, std::fs::read(receiver).unwrap())
    }

    /// Bytes SYNC must write: whole differing blocks; with refinement the differing
    /// pieces, and within pieces larger than the target (unless most pieces of the block
    /// differ) only the differing sub-pieces.
    fn expected_written(
        src: &[u8],
        dst: &[u8],
        buffer: usize,
        chunk: Option<usize>,
        refine: Option<usize>,
    ) -> (u64, u64) {
        let differing = |a: &[u8], b: &[u8], unit: usize| -> Vec<(usize, usize)> {
            (0..a.len().div_ceil(unit))
                .map(|j| (j * unit, ((j + 1) * unit).min(a.len())))
                .filter(|&(s, e)| a[s..e] != b[s..e])
                .collect()
        };
        let mut blocks = 0;
        let mut bytes = 0u64;
        for (a, b) in src.chunks(buffer).zip(dst.chunks(buffer)) {
            if a == b {
                continue;
            }
            blocks += 1;
            let Some(target) = refine else {
                bytes += a.len() as u64;
                continue;
            };
            let piece = chunk.unwrap_or(16384.min(buffer)).max(target);
            let pieces = differing(a, b, piece);
            if piece <= target || pieces.len() * 2 > a.len().div_ceil(piece) {
                bytes += pieces.iter().map(|(s, e)| (e - s) as u64).sum::<u64>();
            } else {
                for (s, e) in pieces {
                    bytes += differing(&a[s..e], &b[s..e], target).iter().map(|(x, y)| (y - x) as u64).sum::<u64>();
                }
            }
        }
        (blocks, bytes)
    }

    /// BLAKE3, `buffer`-byte leaves, no chunks, no refinement, no compression.
    fn uncompressed(buffer: usize) -> Params {
        Params { hash: HashAlgo::Blake3, buffer, chunk: None, refine: None, codec: Codec::None, adapt: false }
    }

    fn layout(size: usize, buffer: usize) -> crate::tree::Layout {
        crate::tree::Layout {
            hash: HashAlgo::Blake3,
            buffer: buffer as u64,
            chunk: None,
            fanout: 4,
            device_size: size as u64,
        }
    }

    #[test]
    fn a_source_digest_that_does_not_match_its_data_is_refused_by_the_receiver_and_nothing_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        let (lp, rp) = (tmp.path().join("local"), tmp.path().join("remote"));
        let src: Vec<u8> = (0..24576u32).map(|i| (i % 249) as u8).collect();
        let mut dst = src.clone();
        dst[8192..16384].fill(0);
        std::fs::write(&lp, &src).unwrap();
        std::fs::write(&rp, &dst).unwrap();
        let params = uncompressed(8192);
        let mut ep = Endpoint::over(crate::serve::in_process(&rp)).unwrap();
        let access = Access::Write {
            source_size: 24576,
            source: None,
            source_name: "src".into(),
            force: false,
            known_zero: false,
        };
        let request = OpenRequest {
            access,
            hash: params.hash,
            codec: params.codec,
            buffer: 8192,
            chunk: None,
            state: StateOptions::off(),
            device: Vec::new(),
        };
        ep.open(request).unwrap();
        let local = Device::open_read(&lp, Side::Local).unwrap();
        let l = layout(24576, 8192);
        let mut index = DigestIndex::open(&local, l, &StateOptions::off()).unwrap();
        // The index claims leaf 1 holds other data than it does, as a stale state trusted
        // by mistake would: the receiver must refuse what is sent, not write it.
        for leaf in 0..3u64 {
            let (d, pieces) = if leaf == 1 {
                leaf_digest(&l, &[7u8; 8192])
            } else {
                leaf_digest(&l, &src[leaf as usize * 8192..][..8192])
            };
            index.learn(leaf, &d, &pieces);
        }
        let rep = Reporter::new(Output::default());
        let ctx = Ctx { local: &local, index: &mut index, ep: &mut ep, params: &params, rep: &rep };
        let outcome = run(ctx, Purpose::Sync(Direction::Push)).and_then(|_| Ok(ep.flush_device()?));
        let e = outcome.expect_err("mismatching data was accepted");
        assert!(
            matches!(&e, Fault::Endpoint(crate::endpoint::EndpointError::Abort { code: crate::protocol::AbortCode::Failed, message }) if message.contains("offset 8192")),
            "{e}"
        );
        ep.abandon();
        assert_eq!(std::fs::read(&rp).unwrap(), dst, "the receiver was written");
    }

    #[test]
    fn pulled_data_that_does_not_match_the_source_digest_is_not_written_locally() {
        let tmp = tempfile::tempdir().unwrap();
        let (lp, rp) = (tmp.path().join("local"), tmp.path().join("remote"));
        std::fs::write(&lp, vec![0u8; 16384]).unwrap();
        std::fs::write(&rp, vec![3u8; 16384]).unwrap();
        let params = uncompressed(8192);
        let mut ep = Endpoint::over(crate::serve::in_process(&rp)).unwrap();
        let local = Device::open_receiver(
            &lp,
            Side::Local,
            &ReceiverSpec {
                source_size: 16384,
                source: None,
                source_name: "src".into(),
                force: false,
                known_zero: false,
            },
        )
        .unwrap();
        let l = layout(16384, 8192);
        let mut index = DigestIndex::open(&local, l, &StateOptions::off()).unwrap();
        let rep = Reporter::new(Output::default());
        let mut ctx = Ctx { local: &local, index: &mut index, ep: &mut ep, params: &params, rep: &rep };
        let claimed = leaf_digest(&l, &[4u8; 8192]).0;
        let frame = crate::block::BlockFrame::encode(
            8192,
            &[3u8; 8192],
            Codec::None,
            crate::block::Check::Leaves(vec![claimed]),
        );
        let e = ctx.write_local(frame).expect_err("mismatching data was written");
        let text = e.to_string();
        assert!(text.starts_with(&format!("local {}: ", lp.display())) && text.contains("offset 8192"), "{text}");
        assert_eq!(std::fs::read(&lp).unwrap(), vec![0u8; 16384]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn sync_writes_exactly_the_differing_blocks_or_chunks(
            len in 1usize..300_000,
            buffer_kb in 1usize..80,
            chunk_kb in proptest::option::of(1usize..6),
            edits in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 0..12),
            pull in any::<bool>(),
            default_refine in any::<bool>(),
        ) {
            let buffer = buffer_kb * 1024;
            let chunk = chunk_kb.map(|c| c.min(buffer_kb) * 1024);
            // Without --chunk: whole blocks, or the default two-level refinement to 4 KiB.
            let refine = chunk.or((default_refine && buffer > 4096).then_some(4096));
            let src: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let mut dst = src.clone();
            for (at, v) in &edits {
                let i = at.index(len);
                dst[i] = dst[i].wrapping_add(v | 1);
            }
            let dir = if pull { Direction::Pull } else { Direction::Push };
            let (c, receiver) = sync(&src, &dst, buffer, chunk, refine, dir);
            prop_assert!(receiver == src, "receiver differs from source after sync");
            let (blocks, bytes) = expected_written(&src, &dst, buffer, chunk, refine);
            prop_assert_eq!(c.blocks, len.div_ceil(buffer) as u64);
            prop_assert_eq!(c.differing, blocks);
            prop_assert_eq!(c.written, bytes);
        }
    }
}
