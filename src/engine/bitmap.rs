//! `-b/--bitmap FILE`, as in the current original tool: the receiver's block digests
//! kept in a file on this host and trusted as the user declares, so that SYNC never
//! reads the receiver. Stored in the `.basyn-state` format with a `Declared` stamp.

use std::path::Path;

use super::compare::{Comparison, Purpose, Run, WINDOW};
use super::pipeline::{self, Blocks};
use super::{Direction, Fault, Params};
use crate::device::Device;
use crate::endpoint::Endpoint;
use crate::hash::Digest;
use crate::ledger::{Ledger, leaf_digest};
use crate::report::Reporter;
use crate::stamp::Stamp;
use crate::state::{Layout, State, StateError, StateFile};

/// Loads a bitmap for `layout`: `Ok(None)` if the file does not exist yet. A corrupt or
/// mismatched bitmap is an error: rebuilding it would need the receiver read that the
/// user opted out of.
pub fn load(path: &Path, layout: &Layout) -> Result<Option<Vec<u8>>, String> {
    let file = StateFile::at(path, false).map_err(|e| e.to_string())?;
    let hint = "use --reset-bitmap to rebuild it (the receiver is then read once)";
    match file.load() {
        Ok(None) => Ok(None),
        Ok(Some(s)) if s.layout != *layout => {
            Err(format!("bitmap {} was built with {} but this run uses {layout}; {hint}", path.display(), s.layout))
        }
        Ok(Some(s)) if s.valid_leaves != layout.leaf_count() => {
            Err(format!("bitmap {} is incomplete; {hint}", path.display()))
        }
        Ok(Some(s)) => Ok(Some(s.leaves)),
        Err(StateError::Invalid { reason, .. }) => {
            Err(format!("bitmap {} is not usable: {reason}; {hint}", path.display()))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Saves `leaves` (the source's digests, which the receiver now holds) as the bitmap.
pub fn save(path: &Path, layout: &Layout, device: &Path, leaves: Vec<u8>) -> Result<(), StateError> {
    let file = StateFile::at(path, false)?;
    file.save(&State {
        layout: *layout,
        device_path: device.display().to_string(),
        stamp: Stamp::Declared,
        valid_leaves: layout.leaf_count(),
        leaves,
        chunks: Vec::new(),
    })
}

/// SYNC against a bitmap: the source's digests (local ledger or read for PUSH, the
/// endpoint's for PULL) are compared with the receiver's digests from the bitmap, and
/// differing leaves are transferred whole. Without a bitmap to compare with, or without
/// `transfer`, nothing is sent: only the source's digests are gathered
/// (`--update-bitmap`). Returns what was done and the source's leaf digests.
#[allow(clippy::too_many_arguments)]
pub fn sync(
    local: &Device,
    ledger: &mut Ledger,
    ep: Option<&mut Endpoint>,
    len: u64,
    params: &Params,
    dir: Direction,
    bitmap: Option<&[u8]>,
    rep: &Reporter,
) -> Result<(Comparison, Vec<u8>), Fault> {
    // The receiver is never read: differing blocks go whole.
    let params = &Params { refine: None, ..params.clone() };
    let blocks = Blocks { len, block: params.buffer as u64 };
    let dl = params.hash.digest_len();
    let theirs = |i: u64| bitmap.map(|b| Digest::from_slice(&b[i as usize * dl..(i as usize + 1) * dl]));
    let mut source = Vec::with_capacity(blocks.count() as usize * dl);
    match (dir, ep) {
        // Refresh only, from the local source: its state, or one read of what it lacks.
        (Direction::Push, None) => {
            let mut buf = Vec::new();
            for leaf in 0..blocks.count() {
                let d = match ledger.leaf(leaf) {
                    Some(d) => d,
                    None => ledger.read_leaf(local, leaf, &mut buf)?.0,
                };
                source.extend_from_slice(d.as_bytes());
                rep.advance(blocks.span(leaf).1 as u64);
            }
            Ok((Comparison { blocks: blocks.count(), ..Comparison::default() }, source))
        }
        (Direction::Push, Some(ep)) => {
            let layout = *ledger.layout();
            let skip: Vec<bool> = (0..blocks.count()).map(|i| ledger.leaf(i).is_some()).collect();
            std::thread::scope(|scope| {
                let (rx, _reader) = pipeline::spawn(scope, local, blocks, skip, 8, move |_, data| {
                    data.map(|d| (leaf_digest(&layout, &d).0, d))
                });
                let mut run = Run::new(local, ledger, ep, params, Purpose::Sync(Direction::Push), rep);
                for item in rx {
                    let item = item?;
                    let (ours, data) = match item.value {
                        Some((d, data)) => {
                            run.ledger.learn(item.index, &d, &[]);
                            (d, Some(data))
                        }
                        None => (run.ledger.leaf(item.index).ok_or(Fault::Internal("skipped leaf unknown"))?, None),
                    };
                    source.extend_from_slice(ours.as_bytes());
                    run.out.blocks += 1;
                    rep.advance(item.len as u64);
                    if theirs(item.index) != Some(ours) {
                        rep.debug(format_args!("block {} @ {}: differs from the bitmap", item.index, item.offset));
                        run.differs(item.index, item.offset, item.len, data)?;
                        run.drain(WINDOW)?;
                    }
                }
                run.drain(0)?;
                Ok((run.out, source))
            })
        }
        (Direction::Pull, None) => Err(Fault::Internal("a PULL needs the endpoint")),
        (Direction::Pull, Some(ep)) => {
            let transfer = bitmap.is_some();
            let purpose = if transfer { Purpose::Sync(Direction::Pull) } else { Purpose::Check };
            let mut run = Run::new(local, ledger, ep, params, purpose, rep);
            let mut next = 0u64;
            while let Some((first, digests)) = run.next_digest_batch(blocks, &mut next)? {
                for (k, d) in digests.into_iter().enumerate() {
                    let leaf = first + k as u64;
                    let (offset, n) = blocks.span(leaf);
                    source.extend_from_slice(d.as_bytes());
                    run.out.blocks += 1;
                    rep.advance(n as u64);
                    if transfer && theirs(leaf) != Some(d) {
                        rep.debug(format_args!("block {leaf} @ {offset}: differs from the bitmap"));
                        run.differs(leaf, offset, n, None)?;
                    }
                }
                run.maybe_checkpoint()?;
            }
            Ok((run.out, source))
        }
    }
}
