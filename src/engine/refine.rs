//! Refinement: a differing leaf is narrowed to the pieces that differ before anything
//! is sent, first by the leaf's pieces (`--chunk`, or 16 KiB), then, when few of them
//! differ, by sub-pieces of the refinement size. Whatever crosses the wire carries the
//! source's digests of what it covers, which the receiver checks before writing.

use super::window::{Pending, Request, Window};
use super::{Direction, Fault};
use crate::block::{Check, MAX_BLOCK};
use crate::hash::Digest;
use crate::leaf_reader::Buf;
use crate::tree::pieces_root;

impl Window<'_> {
    /// Leaf `leaf` at `offset` (`len` bytes) differs; `source` is the source's digest of
    /// it. Counts it, and for SYNC queues what transfers it: the whole leaf, or with
    /// refinement the digests of its pieces first.
    pub fn differs(
        &mut self,
        leaf: u64,
        offset: u64,
        len: usize,
        data: Option<Buf>,
        source: Digest,
    ) -> Result<(), Fault> {
        self.out.differing += 1;
        self.ctx.rep.found_difference();
        let Some(dir) = self.direction() else {
            self.out.note_range(offset, len as u64);
            return Ok(());
        };
        let layout = self.ctx.layout();
        let piece = layout.piece().max(self.ctx.params.refine.unwrap_or(usize::MAX) as u64);
        // Without refinement, or when the leaf is one piece, the leaf goes whole.
        if self.ctx.params.refine.is_none() || piece >= len as u64 {
            return self.transfer(offset, len, data.as_deref(), Check::Leaves(vec![source]));
        }
        let piece = piece as usize;
        let ours = match (self.ctx.index.pieces(leaf), &data) {
            (Some(p), _) if piece as u64 == layout.piece() => p,
            (_, Some(d)) => self.ctx.params.hash.digest_pieces(d, piece),
            (_, None) => {
                let mut buf = vec![0u8; len];
                self.ctx.local.read_at(offset, &mut buf)?;
                let pieces = self.ctx.params.hash.digest_pieces(&buf, piece);
                // Read again: a PUSH source must still be what the comparison saw.
                if dir == Direction::Push && piece as u64 == layout.piece() && pieces_root(&layout, &pieces) != source {
                    return Err(self.changed(offset, len));
                }
                pieces
            }
        };
        let data = data.filter(|_| dir == Direction::Push);
        let request = Request::Digests { offset, len: len as u64, block: piece as u32 };
        let leaf = (piece as u64 == layout.piece()).then_some(source);
        self.follow_up(request, Pending::Pieces { offset, len, unit: piece, ours, data, leaf });
        Ok(())
    }

    /// The local source no longer holds what the comparison read at `offset`.
    fn changed(&self, offset: u64, len: usize) -> Fault {
        let device = format!("local {}", self.ctx.local.path().display());
        Fault::SourceChanged { device, offset, len: len as u64 }
    }

    /// The endpoint's digests of the `unit`-sized pieces of a differing range arrived:
    /// transfer the differing pieces, or go one level down to the refinement size.
    pub fn refine(
        &mut self,
        offset: u64,
        len: usize,
        unit: usize,
        (ours, theirs): (&[Digest], &[Digest]),
        data: Option<Buf>,
        leaf: Option<Digest>,
    ) -> Result<(), Fault> {
        let target = self.ctx.params.refine.ok_or(Fault::Internal("refinement size missing"))?;
        let layout = self.ctx.layout();
        // A PULL source's pieces must make up the leaf digest the comparison used.
        if self.direction() == Some(Direction::Pull) && leaf.is_some_and(|l| pieces_root(&layout, theirs) != l) {
            let device = self.ctx.ep.label().to_string();
            return Err(Fault::SourceChanged { device, offset, len: len as u64 });
        }
        let differing: Vec<usize> = (0..ours.len()).filter(|&j| ours[j] != theirs[j]).collect();
        self.ctx.rep.debug(format_args!(
            "range @ {offset}: {} of {} pieces of {unit} bytes differ",
            differing.len(),
            ours.len()
        ));
        let source = if self.direction() == Some(Direction::Push) { ours } else { theirs };
        // Mostly different (new or unrelated data): going a level down would only read
        // more; send the differing pieces as they are.
        if unit <= target || differing.len() * 2 > ours.len() {
            for (start, end) in runs(&differing, unit, len) {
                let slice = data.as_deref().map(|d| &d[start..end]);
                let digests = source[start / unit..end.div_ceil(unit)].to_vec();
                let check = Check::Pieces { unit: unit as u32, digests };
                self.transfer(offset + start as u64, end - start, slice, check)?;
            }
            return Ok(());
        }
        for j in differing {
            let (start, end) = (j * unit, ((j + 1) * unit).min(len));
            let piece_data = match &data {
                Some(d) => Buf::from(d[start..end].to_vec()),
                None => {
                    let mut buf = vec![0u8; end - start];
                    self.ctx.local.read_at(offset + start as u64, &mut buf)?;
                    // Read again: a PUSH source must still be what was compared.
                    if self.direction() == Some(Direction::Push) && self.ctx.params.hash.digest(&buf) != ours[j] {
                        return Err(self.changed(offset + start as u64, end - start));
                    }
                    Buf::from(buf)
                }
            };
            let sub = self.ctx.params.hash.digest_pieces(&piece_data, target);
            let at = offset + start as u64;
            let request = Request::Digests { offset: at, len: (end - start) as u64, block: target as u32 };
            let keep = (self.direction() == Some(Direction::Push)).then_some(piece_data);
            let pending =
                Pending::Pieces { offset: at, len: end - start, unit: target, ours: sub, data: keep, leaf: None };
            self.follow_up(request, pending);
        }
        Ok(())
    }
}

/// Byte ranges covering runs of consecutive differing pieces, each at most [`MAX_BLOCK`].
fn runs(differing: &[usize], unit: usize, len: usize) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for &j in differing {
        let start = j * unit;
        let end = (start + unit).min(len);
        match out.last_mut() {
            Some(last) if last.1 == start && end - last.0 <= MAX_BLOCK => last.1 = end,
            _ => out.push((start, end)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::runs;

    #[test]
    fn adjacent_differing_chunks_merge_into_one_read() {
        assert_eq!(runs(&[0, 1, 2, 5, 7, 8], 4, 34), vec![(0, 12), (20, 24), (28, 34)]);
        assert_eq!(runs(&[], 4, 34), vec![]);
    }
}
