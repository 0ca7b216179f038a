//! `-b/--bitmap FILE`, as the current original defines it. FILE holds the plain digest
//! of each `--buffer` block that the receiver holds ([`crate::bitmap_file`]), so that:
//!
//! - `-b FILE`: SYNC compares the source's block digests with FILE and never reads the
//!   receiver; a missing FILE is created, every block unknown (so every block is sent);
//! - `--reset-bitmap`: FILE starts from scratch: the receiver is not read, every block
//!   is sent;
//! - `--update-bitmap`: a regular SYNC (both devices read); FILE is rewritten;
//! - no receiver given: only FILE is refreshed from the source.
//!
//! FILE never claims a block the receiver does not hold: before a block is written,
//! FILE forgets it (durably, a batch at a time), or FILE starts out with every block
//! unknown; the source's digests are recorded only after the run has succeeded.
//! This module holds the workflow; `bitmap_sync` the transfers against FILE.

use std::path::PathBuf;

use super::bitmap_sync::{Basis, local_digests, remote_digests};
use super::session::{Session, absorb, empty, local_index, name};
use super::window::Comparison;
use super::{BitmapPlan, Direction, Error, Fault, Params};
use crate::bitmap_file::{self, BitmapFile, BitmapFileError, Format, Geometry};
use crate::compress::Codec;
use crate::device::{Device, Side};
use crate::protocol::Access;
use crate::report::Reporter;
use crate::stamp::Role;

/// Why FILE cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BitmapError {
    /// Its content is garbage or was built for another run.
    #[error("{0}; use --reset-bitmap to start it from scratch (the receiver is then not read, every block is sent)")]
    Unusable(#[source] BitmapFileError),
    /// It cannot be read, written or replaced.
    #[error(transparent)]
    File(BitmapFileError),
}

impl From<BitmapFileError> for BitmapError {
    fn from(e: BitmapFileError) -> BitmapError {
        if e.is_content() { BitmapError::Unusable(e) } else { BitmapError::File(e) }
    }
}

/// FILE during a run, and the source's digests to record once the run has succeeded.
#[derive(Debug)]
pub(super) struct Outcome {
    /// FILE, open.
    pub file: BitmapFile,
    /// The source's block digests, once known.
    pub digests: Option<Vec<u8>>,
}

/// FILE as found before anything is opened for writing.
pub(super) struct Found {
    path: PathBuf,
    geometry: Geometry,
    /// FILE and its digests, unless it is missing or `--reset-bitmap` ignores it.
    existing: Option<(BitmapFile, Vec<u8>)>,
    /// The format FILE is (re)written in: its own if it has one that can hold the hash.
    format: Format,
}

/// The geometry a FILE must have for a run over `len` bytes.
pub(super) fn geometry(params: &Params, len: u64) -> Geometry {
    Geometry { device_size: len, buffer: params.buffer as u64, hash: params.hash }
}

/// Finds and checks FILE as the original does (unless `--reset-bitmap`), before
/// anything is written; `source` names the source in a device size mismatch.
pub(super) fn find(b: &BitmapPlan, geometry: Geometry, source: &str) -> Result<Found, BitmapError> {
    let existing = match b.reset {
        true => {
            bitmap_file::check_kind(&b.path)?;
            None
        }
        false => bitmap_file::load(&b.path, &geometry, source)?,
    };
    let format = match (&existing, bitmap_file::format_of(&b.path)) {
        (Some((f, _)), _) => f.format(),
        (None, Some(f)) if f.hash_id(geometry.hash).is_some() => f,
        _ => Format::for_hash(geometry.hash),
    };
    Ok(Found { path: b.path.clone(), geometry, existing, format })
}

impl Found {
    /// The digests FILE holds, if it is used.
    pub fn digests(&self) -> Option<&[u8]> {
        self.existing.as_ref().map(|(_, d)| &d[..])
    }

    /// Right before the first write: the basis of the comparison, and FILE ready for
    /// it. FILE is kept when it is the basis (its blocks are forgotten before they are
    /// written), and otherwise started from scratch, every block unknown.
    pub fn prepare(self, b: &BitmapPlan, renewed: bool) -> Result<(Basis, BitmapFile), BitmapError> {
        match self.existing {
            Some((file, digests)) if !b.update && !renewed => Ok((Basis::File(digests), file)),
            _ => {
                let file = BitmapFile::create(&self.path, self.format, self.geometry)?;
                Ok((if b.update { Basis::Receiver } else { Basis::Nothing }, file))
            }
        }
    }

    /// FILE for a refresh: as it is, or created.
    fn into_file(self) -> Result<BitmapFile, BitmapError> {
        match self.existing {
            Some((file, _)) => Ok(file),
            None => Ok(BitmapFile::create(&self.path, self.format, self.geometry)?),
        }
    }
}

/// After a run with a bitmap: the source's digests are recorded once the receiver is
/// known to hold them (durable, nobody else wrote it). If another process wrote the
/// receiver, any block may differ from what FILE says: it forgets every block. After any
/// other failure FILE is left as it is: it claims no block that was being changed.
pub(super) fn after_run(result: Result<(), Error>, out: Option<Outcome>, rep: &Reporter) -> Result<(), Error> {
    let Some(Outcome { mut file, digests }) = out else { return result };
    match (&result, digests) {
        (Ok(()), Some(d)) => {
            file.record(&d).map_err(|e| Error::BitmapNotSaved(BitmapError::File(e)))?;
            rep.log(format_args!("bitmap {} updated from the source", file.path().display()));
        }
        (Err(Error::ReceiverMoved { .. }), _) if file.forget_all().is_ok() => {
            rep.log(format_args!("bitmap {}: every block is unknown now", file.path().display()));
        }
        _ => {}
    }
    result
}

/// Counts the blocks whose digest in `new` differs from `old` (all, without `old`).
fn changed(old: Option<&[u8]>, new: &[u8], digest_len: usize) -> u64 {
    let n = new.len() / digest_len.max(1);
    match old {
        Some(old) if old.len() == new.len() => {
            old.chunks(digest_len).zip(new.chunks(digest_len)).filter(|(a, b)| a != b).count() as u64
        }
        _ => n as u64,
    }
}

impl Session<'_> {
    /// No receiver given: only FILE is refreshed from the source's digests, nothing is
    /// written anywhere else. Returns the source's length; FILE itself is written by
    /// [`after_run`] once nothing went wrong.
    pub(super) fn refresh_bitmap(
        &mut self,
        b: &BitmapPlan,
        dir: Direction,
        out: &mut Option<Outcome>,
    ) -> Result<u64, Error> {
        let (len, found, digests) = match dir {
            Direction::Push => self.refresh_from_local(b)?,
            Direction::Pull => self.refresh_from_remote(b)?,
        };
        let dl = self.plan.params.hash.digest_len();
        let differing = changed(found.digests(), &digests, dl);
        absorb(self.stats, &Comparison { blocks: (digests.len() / dl) as u64, differing, ..Comparison::default() });
        self.rep.log(format_args!(
            "bitmap {}: {differing} blocks changed since it was last written; no device was written",
            b.path.display()
        ));
        let file = found.into_file().map_err(|e| Fault::from(e).refused())?;
        *out = Some(Outcome { file, digests: Some(digests) });
        Ok(len)
    }

    fn refresh_from_local(&mut self, b: &BitmapPlan) -> Result<(u64, Found, Vec<u8>), Error> {
        let plan = self.plan;
        let refused = |f: Fault| f.refused();
        let local = Device::open_read(&plan.local, Side::Local).map_err(|e| refused(e.into()))?;
        let len = local.size();
        if len == 0 {
            return Err(empty(Side::Local, &plan.local));
        }
        let found =
            find(b, geometry(&plan.params, len), &name(Side::Local, &plan.local)).map_err(|e| refused(e.into()))?;
        let mut index = local_index(&local, &plan.params, len, &plan.state, self.rep)?;
        self.stats.device_size = len;
        self.rep.start("comparing", len);
        let learn = index.enabled();
        let digests = local_digests(&local, &mut index, learn, Some(self.rep));
        self.rep.finish();
        self.stats.local_read += local.bytes_read();
        let digests = digests.map_err(refused)?;
        let unchanged = index.finish(&local, Role::Read).map_err(|e| refused(e.into()))?;
        if let Some(e) = index.unsaved() {
            super::session::warn_unsaved(self.rep, format_args!("local {e}"));
        }
        if !unchanged {
            let receiver = format!("bitmap {}", b.path.display());
            return Err(Error::SourceMoved { device: name(Side::Local, &plan.local), receiver });
        }
        Ok((len, found, digests))
    }

    fn refresh_from_remote(&mut self, b: &BitmapPlan) -> Result<(u64, Found, Vec<u8>), Error> {
        let plan = self.plan;
        let refused = |f: Fault| f.refused();
        let req = self.open_request(Access::Read, Codec::None, plan.remote_state.clone());
        let len = self.endpoint()?.open(req).map_err(|e| refused(e.into()))?.size;
        if len == 0 {
            return Err(empty(Side::Remote, &plan.remote));
        }
        let geometry = geometry(&plan.params, len);
        let found = find(b, geometry, &name(Side::Remote, &plan.remote)).map_err(|e| refused(e.into()))?;
        self.stats.device_size = len;
        self.rep.start("comparing", len);
        let (ep, rep) = self.endpoint_and_reporter()?;
        let digests = remote_digests(ep, &geometry, rep);
        self.rep.finish();
        Ok((len, found, digests.map_err(refused)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_blocks_are_counted_against_the_old_digests() {
        assert_eq!(changed(Some(&[1, 1, 2, 2, 3, 3]), &[1, 1, 9, 2, 3, 3], 2), 1);
        assert_eq!(changed(None, &[1, 1, 2, 2], 2), 2);
    }
}
