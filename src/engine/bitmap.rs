//! `-b/--bitmap FILE`, as in the current original tool: the receiver's block digests
//! kept in a file on this host and trusted as the user declares, so that SYNC never
//! reads the receiver. Stored in the `.basyn-state` format with a `Declared` stamp.
//! This module holds the whole workflow: loading and checking the file, SYNC against
//! it, `--update-bitmap` (refresh only), and saving or removing it after the run.

use std::path::{Path, PathBuf};

use super::compare::Purpose;
use super::reader::Data;
use super::session::{Session, absorb, local_index, name, receiver_name};
use super::window::{Comparison, Ctx, WINDOW, Window};
use super::{BitmapPlan, Direction, Error, Fault, Plan};
use crate::compress::Codec;
use crate::device::{Device, Side};
use crate::digest_index::DigestIndex;
use crate::hash::Digest;
use crate::protocol::{Access, StateOptions};
use crate::report::Reporter;
use crate::stamp::{Role, Stamp};
use crate::state::{DecodeError, State, StateError, StateFile};
use crate::tree::{Layout, leaf_digest, zero_leaf_digest};

const HINT: &str = "use --reset-bitmap to rebuild it (the receiver is then read once)";

/// Why a bitmap cannot be used or kept.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BitmapError {
    /// It was built for another device size, block size or hash.
    #[error("bitmap {} was built with {found} but this run uses {wanted}; {HINT}", path.display())]
    Mismatch {
        /// The bitmap file.
        path: PathBuf,
        /// Its layout.
        found: Layout,
        /// The run's layout.
        wanted: Layout,
    },
    /// It does not hold every leaf.
    #[error("bitmap {} is incomplete: {valid} of {leaves} blocks; {HINT}", path.display())]
    Incomplete {
        /// The bitmap file.
        path: PathBuf,
        /// Leaves it holds.
        valid: u64,
        /// Leaves the run has.
        leaves: u64,
    },
    /// Its bytes are not a valid bitmap.
    #[error("bitmap {} is not usable: {source}; {HINT}", path.display())]
    Unusable {
        /// The bitmap file.
        path: PathBuf,
        /// What is wrong.
        source: DecodeError,
    },
    /// It cannot be read.
    #[error(transparent)]
    Read(StateError),
    /// It cannot be saved.
    #[error("cannot save the bitmap: {0}")]
    Save(#[source] StateError),
}

/// The bitmap to save when the run succeeds: the layout and the source's leaf digests.
pub(super) type Out = Option<(Layout, Vec<u8>)>;

/// Loads a bitmap for `layout`: `Ok(None)` if the file does not exist yet. A corrupt or
/// mismatched bitmap is an error: rebuilding it would need the receiver read that the
/// user opted out of.
pub fn load(path: &Path, layout: &Layout) -> Result<Option<Vec<u8>>, BitmapError> {
    crate::state::check_kind(path).map_err(BitmapError::Read)?;
    let file = StateFile::at(path, false).map_err(BitmapError::Read)?;
    match file.load() {
        Ok(None) => Ok(None),
        Ok(Some(s)) if s.layout != *layout => {
            Err(BitmapError::Mismatch { path: path.to_path_buf(), found: s.layout, wanted: *layout })
        }
        Ok(Some(s)) if s.valid_leaves != layout.leaf_count() => Err(BitmapError::Incomplete {
            path: path.to_path_buf(),
            valid: s.valid_leaves,
            leaves: layout.leaf_count(),
        }),
        Ok(Some(s)) => Ok(Some(s.leaves)),
        Err(StateError::Invalid { source, .. }) => Err(BitmapError::Unusable { path: path.to_path_buf(), source }),
        Err(e) => Err(BitmapError::Read(e)),
    }
}

/// Saves `leaves` (the source's digests, which the receiver now holds) as the bitmap.
/// A file there that is not a basyn state is replaced only when `rebuild` says the user
/// asked for it (`--reset-bitmap`); a symbolic link or a non-regular file never is.
pub fn save(path: &Path, layout: &Layout, device: &Path, leaves: Vec<u8>, rebuild: bool) -> Result<(), BitmapError> {
    let check = if rebuild { crate::state::check_kind(path) } else { crate::state::check_path(path) };
    check.map_err(BitmapError::Save)?;
    let file = StateFile::at(path, false).map_err(BitmapError::Save)?;
    file.save(&State {
        layout: *layout,
        device_path: device.display().to_string(),
        stamp: Stamp::Declared,
        valid_leaves: layout.leaf_count(),
        leaves,
        // A bitmap keeps leaf digests only, as the original's does.
        pieces: crate::piece_table::PieceTable::new(*layout),
    })
    .map_err(BitmapError::Save)
}

/// Every leaf digest of the local device, reading the leaves its index does not know.
pub(super) fn complete(index: &mut DigestIndex, local: &Device) -> Result<Vec<u8>, Fault> {
    complete_with_progress(index, local, None)
}

fn complete_with_progress(index: &mut DigestIndex, local: &Device, rep: Option<&Reporter>) -> Result<Vec<u8>, Fault> {
    index.fill(local, |n| {
        if let Some(rep) = rep {
            rep.advance(n);
        }
    })?;
    index.complete_leaves().ok_or(Fault::Internal("bitmap leaves unknown"))
}

/// SYNC against a bitmap: the source's digests (local index or read for PUSH, the
/// endpoint's for PULL) are compared with the receiver's digests from the bitmap, and
/// differing leaves are transferred whole. Without a bitmap (`--update-bitmap` of a
/// PULL) nothing is sent: only the source's digests are gathered. Returns what was done
/// and the source's leaf digests.
pub(super) fn sync(ctx: Ctx<'_>, dir: Direction, bitmap: Option<&[u8]>) -> Result<(Comparison, Vec<u8>), Fault> {
    // The receiver is never read: differing leaves go whole.
    let params = super::Params { refine: None, ..ctx.params.clone() };
    let ctx = Ctx { params: &params, ..ctx };
    let dl = params.hash.digest_len();
    let theirs = |i: u64| bitmap.map(|b| Digest::from_slice(&b[i as usize * dl..(i as usize + 1) * dl]));
    match dir {
        Direction::Push => push(ctx, &theirs),
        Direction::Pull => pull(ctx, bitmap.is_some(), &theirs),
    }
}

fn push(ctx: Ctx<'_>, theirs: &dyn Fn(u64) -> Option<Digest>) -> Result<(Comparison, Vec<u8>), Fault> {
    let layout = ctx.layout();
    let local = ctx.local;
    let mut source = Vec::with_capacity(layout.leaf_count() as usize * layout.hash.digest_len());
    let skip: Vec<bool> = (0..layout.leaf_count()).map(|i| ctx.index.leaf(i).is_some()).collect();
    std::thread::scope(|scope| {
        let rx = super::reader::spawn(scope, local, layout, skip, move |offset, data| match data {
            Data::Skipped => None,
            Data::Zero => Some((zero_leaf_digest(&layout, layout.leaf_len(offset / layout.buffer)), None)),
            Data::Read(d) => Some((leaf_digest(&layout, &d), Some(d))),
        });
        let mut w = Window::new(ctx, Purpose::Sync(Direction::Push));
        for leaf in rx {
            let leaf = leaf?;
            let (ours, data) = match leaf.value {
                Some(((d, pieces), data)) => {
                    w.ctx.index.learn(leaf.index, &d, &pieces);
                    (d, data)
                }
                None => (w.ctx.index.leaf(leaf.index).ok_or(Fault::Internal("skipped leaf unknown"))?, None),
            };
            source.extend_from_slice(ours.as_bytes());
            w.out.blocks += 1;
            w.ctx.rep.advance(leaf.len as u64);
            if theirs(leaf.index) != Some(ours) {
                w.ctx.rep.debug(format_args!("block {} @ {}: differs from the bitmap", leaf.index, leaf.offset));
                w.differs(leaf.index, leaf.offset, leaf.len, data, ours)?;
                w.drain(WINDOW)?;
            }
        }
        w.drain(0)?;
        Ok((w.out, source))
    })
}

fn pull(ctx: Ctx<'_>, transfer: bool, theirs: &dyn Fn(u64) -> Option<Digest>) -> Result<(Comparison, Vec<u8>), Fault> {
    let layout = ctx.layout();
    let mut source = Vec::with_capacity(layout.leaf_count() as usize * layout.hash.digest_len());
    let purpose = if transfer { Purpose::Sync(Direction::Pull) } else { Purpose::Check };
    let mut w = Window::new(ctx, purpose);
    while let Some((first, digests)) = w.next_digest_batch()? {
        for (k, d) in digests.into_iter().enumerate() {
            let leaf = first + k as u64;
            let (offset, len) = layout.leaf_span(leaf);
            source.extend_from_slice(d.as_bytes());
            w.out.blocks += 1;
            w.ctx.rep.advance(len);
            if transfer && theirs(leaf) != Some(d) {
                w.ctx.rep.debug(format_args!("block {leaf} @ {offset}: differs from the bitmap"));
                w.differs(leaf, offset, len as usize, None, d)?;
            }
        }
        w.maybe_checkpoint()?;
    }
    Ok((w.out, source))
}

/// After a run with a bitmap: saved only once the receiver is known to hold the
/// source's data and nobody else wrote it during the run; kept if nothing was changed;
/// removed when the receiver may be partly changed, since it no longer describes it.
pub(super) fn after_run(plan: &Plan, result: Result<(), Error>, out: Out, rep: &Reporter) -> Result<(), Error> {
    let Some(b) = plan.bitmap.as_ref().filter(|b| !b.update_only) else { return result };
    match (&result, out) {
        (Ok(()), Some((layout, leaves))) => {
            save(&b.path, &layout, &plan.local, leaves, b.reset).map_err(|e| {
                let dir = plan.action.map_or(Direction::Push, |(d, _)| d);
                Fault::Bitmap(e).transfer(&receiver_name(plan, dir))
            })?;
            rep.log(format_args!("bitmap {} updated", b.path.display()));
        }
        (Err(Error::Refused(_)), _) => {}
        _ => {
            if std::fs::remove_file(&b.path).is_ok() {
                rep.log(format_args!("bitmap {} removed: it no longer describes the receiver", b.path.display()));
            }
        }
    }
    result
}

impl Session<'_> {
    /// `--update-bitmap`: refreshes the bitmap from the source without transferring
    /// anything (the user declares that the receiver already holds the source's data).
    /// Returns the source's length.
    pub(super) fn refresh_bitmap(&mut self, b: &BitmapPlan, dir: Direction) -> Result<u64, Error> {
        let plan = self.plan;
        let refused = |f: Fault| f.refused();
        let local = Device::open_read(&plan.local, Side::Local).map_err(|e| refused(e.into()))?;
        let len = match dir {
            Direction::Push => local.size(),
            Direction::Pull => {
                let req = self.open_request(Access::Read, Codec::None, plan.remote_state.clone());
                self.endpoint()?.open(req).map_err(|e| refused(e.into()))?.size
            }
        };
        self.stats.device_size = len;
        let state = if dir == Direction::Push { plan.state.clone() } else { StateOptions::off() };
        let mut index = local_index(&local, &plan.params, len, &state, self.rep)?;
        self.rep.start("BITMAP", len);
        let result = match dir {
            Direction::Push => {
                complete_with_progress(&mut index, &local, Some(self.rep)).map(|l| (Comparison::default(), l))
            }
            Direction::Pull => {
                let (ep, rep) = self.endpoint_and_reporter()?;
                sync(Ctx { local: &local, index: &mut index, ep, params: &plan.params, rep }, dir, None)
            }
        };
        self.rep.finish();
        self.stats.local_read += local.bytes_read();
        let (c, leaves) = result.map_err(refused)?;
        absorb(self.stats, &Comparison { blocks: len.div_ceil(plan.params.buffer as u64), ..c });
        save(&b.path, index.layout(), &plan.local, leaves, b.reset).map_err(|e| refused(e.into()))?;
        if dir == Direction::Push && !index.finish(&local, Role::Read).map_err(|e| refused(e.into()))? {
            return Err(Error::SourceMoved {
                device: name(Side::Local, &plan.local),
                receiver: b.path.display().to_string(),
            });
        }
        self.rep.log(format_args!("bitmap {} refreshed from the source; nothing was transferred", b.path.display()));
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::HashAlgo;

    fn layout(size: u64) -> Layout {
        Layout { hash: HashAlgo::Blake3, buffer: 4096, chunk: None, fanout: 64, device_size: size }
    }

    #[test]
    fn a_bitmap_round_trips_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.bitmap");
        assert!(load(&p, &layout(10000)).unwrap().is_none());
        let leaves: Vec<u8> = (0..3u8).flat_map(|i| HashAlgo::Blake3.digest(&[i]).as_bytes().to_vec()).collect();
        save(&p, &layout(10000), Path::new("/dev/src"), leaves.clone(), false).unwrap();
        assert_eq!(load(&p, &layout(10000)).unwrap(), Some(leaves));
    }

    #[test]
    fn a_bitmap_for_another_device_or_of_garbage_is_an_error_naming_what_differs() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.bitmap");
        let leaves = vec![0u8; 3 * 32];
        save(&p, &layout(10000), Path::new("/dev/src"), leaves, false).unwrap();
        let e = load(&p, &layout(20000)).unwrap_err();
        assert!(matches!(e, BitmapError::Mismatch { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("10000 bytes") && text.contains("20000 bytes") && text.contains("--reset-bitmap"),
            "{text}"
        );
        std::fs::write(&p, b"not a bitmap at all, but long enough to have a header and a checksum").unwrap();
        let e = load(&p, &layout(10000)).unwrap_err();
        assert!(matches!(e, BitmapError::Unusable { source: DecodeError::BadMagic, .. }), "{e}");
        std::fs::write(&p, b"").unwrap();
        assert!(matches!(load(&p, &layout(10000)), Err(BitmapError::Unusable { .. })));
    }
}
