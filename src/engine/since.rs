//! `SYNC --since OLDER`: the source is a newer snapshot of the volume that OLDER is a
//! snapshot of, and what changed between the two is known (from the thin pool's
//! metadata, or `--changed-ranges FILE`). Only the changed leaves are read from the
//! source; the others take their digests from OLDER's state.
//!
//! That is only right when all of this holds, and each part is checked: OLDER's state is
//! fresh (OLDER was not written since it was saved; `--trust-state` accepts a state
//! whose freshness cannot be verified), it was built with the run's layout, OLDER and
//! the source have the same size, and the receiver's state is fresh and has OLDER's
//! root, so the receiver holds exactly what OLDER holds. The one premise basyn cannot
//! check is the user's: that the ranges list every change between OLDER and the source.
//! If any checked part fails, `--verbose` says which and the run is a plain SYNC.

use std::path::Path;

use super::{Error, Fault, SincePlan};
use crate::changes::{self, Changed};
use crate::device::{Device, Side};
use crate::digest_index::DigestIndex;
use crate::protocol::{StateMode, StateOptions, StateSummary};
use crate::report::{Reporter, human};
use crate::thin::{self, ThinError};
use crate::tree::{Layout, pieces_root};

/// The older snapshot, its state and what changed since it, once the local premises
/// hold.
pub(super) struct Since {
    /// OLDER, for messages.
    name: String,
    /// OLDER's fresh state.
    index: DigestIndex,
    /// The leaves that changed.
    changed: Changed,
}

/// The local part, before the receiver is opened: reads the changes (a bad list is an
/// error, exit 1) and checks OLDER and its state. `Ok(None)` without `--since`, and,
/// said in `--verbose`, if a premise fails and the run goes on as a plain SYNC.
pub(super) fn prepare(
    plan: Option<&SincePlan>,
    source: &Device,
    layout: Layout,
    trust: bool,
    rep: &Reporter,
) -> Result<Option<Since>, Error> {
    let Some(plan) = plan else { return Ok(None) };
    let name = format!("--since {}", plan.device.display());
    let refuse = |why: String| Error::Refused(Box::new(Fault::Since(format!("{name}: {why}"))));
    let older = Device::open_read(&plan.device, Side::Local).map_err(|e| refuse(e.problem.to_string()))?;
    if older.identity().same_storage(source.identity()) {
        return Err(refuse("is the source itself: name the older snapshot".into()));
    }
    let from_file = match &plan.ranges {
        Some(path) => Some(read_ranges(path, &layout)?),
        None => None,
    };
    let fallback = |why: String| {
        rep.log(format_args!("{name}: {why}; running a plain SYNC, which reads the whole source"));
        Ok(None)
    };
    if older.size() != source.size() {
        return fallback(format!("its size {} differs from the source's {}", older.size(), source.size()));
    }
    let opts = StateOptions { mode: StateMode::Default, trust };
    let index = match DigestIndex::open_read_only(&older, layout, &opts) {
        Ok(index) => index,
        Err(e) => return fallback(format!("its state cannot be used ({e})")),
    };
    if !index.fresh() {
        // Its note is written for a run that rebuilds the state; this one only reads it.
        let note = index.note().replace(", building it", "").replace("; rebuilding it", "");
        return fallback(format!("its {note}"));
    }
    let changed = match from_file {
        Some(changed) => changed,
        None => match ask_the_pool(&plan.device, source, &layout, rep) {
            Ok(changed) => changed,
            Err(why) => return fallback(why),
        },
    };
    Ok(Some(Since { name, index, changed }))
}

/// What changed between OLDER and the source, from their thin pool's metadata (the
/// commands are shown in `--verbose`). `Err` says why not: a premise that does not hold
/// (not thin volumes of one pool) is only said in `--verbose`; a command that failed
/// is warned about too, since it may need the operator (a metadata snapshot held by
/// another tool).
fn ask_the_pool(older: &Path, source: &Device, layout: &Layout, rep: &Reporter) -> Result<Changed, String> {
    let mut say = |command: &str| rep.log(format_args!("running {command}"));
    let failed = |why: String| {
        rep.warn(format_args!("--since {}: {why}; running a plain SYNC", older.display()));
        why
    };
    let delta = match thin::live_delta(older, source.path(), &mut say) {
        Ok(delta) => delta,
        Err(ThinError::Premise(why)) => return Err(why),
        Err(e @ ThinError::Failed(_)) => return Err(failed(e.to_string())),
    };
    let changed =
        changes::read(delta.xml.as_bytes(), "thin_delta's output", layout).map_err(|e| failed(e.to_string()))?;
    if changed.thin_ids != Some((delta.since_id, delta.source_id)) {
        return Err(failed(format!(
            "thin_delta compared thin devices {:?}, not {} and {}",
            changed.thin_ids, delta.since_id, delta.source_id
        )));
    }
    if changed.block_bytes != Some(delta.block_sectors * 512) {
        return Err(failed(format!(
            "thin_delta's block size {:?} bytes is not the pool's {} sectors",
            changed.block_bytes, delta.block_sectors
        )));
    }
    Ok(changed)
}

/// Reads `--changed-ranges FILE`; an error names the file and where in it.
fn read_ranges(path: &Path, layout: &Layout) -> Result<Changed, Error> {
    let name = format!("--changed-ranges {}", path.display());
    let file = std::fs::File::open(path)
        .map_err(|e| Error::Refused(Box::new(Fault::Since(format!("{name}: cannot be opened: {e}")))))?;
    changes::read(std::io::BufReader::new(file), &name, layout)
        .map_err(|e| Error::Refused(Box::new(Fault::Since(e.to_string()))))
}

impl Since {
    /// The receiver's part, once it is open: if its state is fresh and holds OLDER's
    /// root, the source's leaves take OLDER's digests in `index`: the unchanged ones
    /// whole, the changed ones with the digests of their changed pieces read from
    /// `source` (only those pieces are read). Returns how many leaves were taken; 0, said
    /// in `--verbose`, if the premise fails.
    pub fn apply(
        mut self,
        index: &mut DigestIndex,
        source: &Device,
        receiver: &StateSummary,
        rep: &Reporter,
    ) -> Result<u64, Error> {
        let name = &self.name;
        let fallback = |why: &str| {
            rep.log(format_args!("{name}: {why}; running a plain SYNC, which reads the whole source"));
            Ok(0)
        };
        if !receiver.fresh {
            return fallback(
                "the receiver's state is not fresh, so it cannot show that the receiver holds this snapshot",
            );
        }
        let ours = self.index.tree().and_then(|t| t.root()).map(|r| r.as_bytes().to_vec());
        if ours.is_none() || ours != receiver.root {
            return fallback(
                "the receiver does not hold this snapshot (its state's root differs): it was synced from another one, or changed since",
            );
        }
        let layout = *index.layout();
        let leaves = layout.leaf_count();
        let (mut taken, mut buf) = (0, Vec::new());
        source.expect_scattered_reads();
        for leaf in 0..leaves {
            let (Some(d), Some(mut pieces)) = (self.index.leaf(leaf), self.index.pieces(leaf)) else { continue };
            if index.leaf(leaf).is_some() {
                continue;
            }
            if !self.changed.leaves[leaf as usize] {
                index.learn(leaf, &d, &pieces);
                taken += 1;
                continue;
            }
            let start = layout.leaf_span(leaf).0;
            let piece = layout.piece();
            for (offset, len) in self.changed.runs(&layout, leaf) {
                buf.resize(len as usize, 0);
                source.read_at(offset, &mut buf).map_err(|e| Fault::Device(e).refused())?;
                let first = ((offset - start) / piece) as usize;
                for (k, digest) in layout.hash.digest_pieces(&buf, piece as usize).into_iter().enumerate() {
                    pieces[first + k] = digest;
                }
            }
            index.learn(leaf, &pieces_root(&layout, &pieces), &pieces);
            taken += 1;
        }
        rep.log(format_args!(
            "{name}: {} of {leaves} blocks changed ({} reported); only their changed pieces were read, the rest is taken from its state",
            self.changed.count(),
            human(self.changed.bytes as f64)
        ));
        Ok(taken)
    }
}
