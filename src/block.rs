//! Device data on the wire. A [`BlockFrame`] is what arrived: untrusted until
//! [`BlockFrame::verify`] has checked its range against the device, decompressed it to
//! exactly its declared length and, when the sender named the source digests the
//! comparison used, checked the data against them. Only the resulting
//! [`VerifiedBlock`] can be written to a device.

use std::borrow::Cow;

use crate::compress::{self, Codec, PayloadCodec};
use crate::hash::Digest;
use crate::tree::{Layout, leaf_digest, zero_leaf_digest};

/// Largest block (`--buffer`) the protocol carries: 64 MiB.
pub const MAX_BLOCK: usize = 64 << 20;

/// What the data of a block must hash to: the source's digests that the comparison
/// used, so that the transfer is verified end to end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// Nothing to check against (COPY streams everything, no digests were compared).
    None,
    /// Each whole leaf the block covers has this leaf digest (the leaf rule). The block
    /// starts on a leaf boundary.
    Leaves(Vec<Digest>),
    /// Each `unit`-sized piece of the block, from its start, has this plain digest.
    Pieces {
        /// Piece size in bytes.
        unit: u32,
        /// One digest per piece.
        digests: Vec<Digest>,
    },
}

impl Check {
    /// Number of digests carried.
    pub fn len(&self) -> usize {
        match self {
            Check::None => 0,
            Check::Leaves(d) | Check::Pieces { digests: d, .. } => d.len(),
        }
    }

    /// True if nothing is checked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A block of device data (or a piece of one) as it crosses the wire, possibly
/// compressed; not to be trusted until verified.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockFrame {
    /// Device offset of the data.
    pub offset: u64,
    /// Length of the data once decoded.
    pub raw_len: u32,
    /// How `payload` is encoded.
    pub codec: PayloadCodec,
    /// The source digests the data must match.
    pub check: Check,
    /// Encoded bytes.
    pub payload: Vec<u8>,
}

/// Why a block may not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlockError {
    /// The block lies (partly) outside the device, or is larger than any block.
    #[error("block at offset {offset} of {len} bytes lies outside the device of {size} bytes")]
    OutOfBounds {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Bytes that may be written.
        size: u64,
    },
    /// The payload does not decode to exactly the declared length.
    #[error("block at offset {offset}: {reason}")]
    Undecodable {
        /// Offset.
        offset: u64,
        /// Why, from the codec.
        reason: String,
    },
    /// The check does not fit the block (wrong number of digests, misaligned leaves).
    #[error("block at offset {offset} of {len} bytes carries {digests} digests that do not fit it")]
    BadCheck {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Digests carried.
        digests: usize,
    },
    /// The data does not hash to the source digest the comparison used.
    #[error(
        "the data received for offset {offset} ({len} bytes) does not match the source's digest that the comparison used; nothing of it was written"
    )]
    Mismatch {
        /// Offset of the first piece that does not match.
        offset: u64,
        /// Its length.
        len: u64,
    },
}

impl BlockFrame {
    /// Encodes `data` found at `offset` with `codec`, to be checked against `check`.
    pub fn encode(offset: u64, data: &[u8], codec: Codec, check: Check) -> BlockFrame {
        let (pc, payload) = codec.encode(data);
        BlockFrame { offset, raw_len: data.len() as u32, codec: pc, check, payload }
    }

    /// `data` at `offset` as it is, uncompressed (the caller knows it is not all zero).
    pub fn raw(offset: u64, data: Vec<u8>, check: Check) -> BlockFrame {
        BlockFrame { offset, raw_len: data.len() as u32, codec: PayloadCodec::Raw, check, payload: data }
    }

    /// A run of `len` zeros at `offset`, to be checked against `check`: a token, no data.
    pub fn zeros(offset: u64, len: u32, check: Check) -> BlockFrame {
        BlockFrame { offset, raw_len: len, codec: PayloadCodec::Zero, check, payload: Vec::new() }
    }

    /// Checks the frame against a device of which `limit` bytes may be written, decodes
    /// it and checks its data against the source digests it carries under `layout`'s
    /// rules. This is the only way from wire bytes to data that may be written.
    pub fn verify(self, limit: u64, layout: &Layout) -> Result<VerifiedBlock, BlockError> {
        let (offset, len) = (self.offset, u64::from(self.raw_len));
        if offset.checked_add(len).is_none_or(|e| e > limit) || self.raw_len as usize > MAX_BLOCK {
            return Err(BlockError::OutOfBounds { offset, len, size: limit });
        }
        let data = match self.codec {
            PayloadCodec::Zero if self.payload.is_empty() => Data::Zero(self.raw_len as usize),
            _ => Data::Bytes(
                compress::decode(self.codec, self.payload, self.raw_len as usize)
                    .map_err(|e| BlockError::Undecodable { offset, reason: e.to_string() })?,
            ),
        };
        let bad_check = || BlockError::BadCheck { offset, len, digests: self.check.len() };
        let mut block = VerifiedBlock { offset, data, pieces: Vec::new() };
        match &self.check {
            Check::None => {}
            Check::Leaves(digests) => {
                if !offset.is_multiple_of(layout.buffer) {
                    return Err(bad_check());
                }
                let leaf = |piece: &[u8]| leaf_digest(layout, piece).0;
                let zero = |n: usize| zero_leaf_digest(layout, n as u64).0;
                block.check_each(layout.buffer as usize, digests, leaf, zero).ok_or_else(bad_check)??;
            }
            Check::Pieces { unit, digests } => {
                let unit = (*unit as usize).max(1);
                let piece = |piece: &[u8]| layout.hash.digest(piece);
                let zero = |n: usize| layout.hash.zero_digest(n);
                block.check_each(unit, digests, piece, zero).ok_or_else(bad_check)??;
                // The data hashes to these: whoever records the write need not hash it
                // again (a range off the layout's piece grid is simply never asked for).
                if unit as u64 == layout.piece() {
                    let end = block.end();
                    block.pieces = (0u64..)
                        .zip(digests)
                        .map(|(k, d)| (offset + k * unit as u64, (offset + (k + 1) * unit as u64).min(end), *d))
                        .collect();
                }
            }
        }
        Ok(block)
    }
}

/// A verified block's data: bytes, or a run of zeros that is never materialised unless
/// asked for.
#[derive(Debug)]
enum Data {
    Bytes(Vec<u8>),
    Zero(usize),
}

/// Device data that arrived, was bounds-checked, decoded and matched its source
/// digests: the only kind of data a device accepts for writing.
#[derive(Debug)]
pub struct VerifiedBlock {
    offset: u64,
    data: Data,
    /// Digests of pieces it covers whole, worked out ahead ([`VerifiedBlock::digest_pieces`]):
    /// (start, end, digest), in order.
    pieces: Vec<(u64, u64, Digest)>,
}

impl VerifiedBlock {
    /// Device offset.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        match &self.data {
            Data::Bytes(b) => b.len(),
            Data::Zero(n) => *n,
        }
    }

    /// True if the block has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Offset just past the data.
    pub fn end(&self) -> u64 {
        self.offset + self.len() as u64
    }

    /// The bytes, unless the block is a run of zeros (`None`).
    pub fn bytes(&self) -> Option<&[u8]> {
        match &self.data {
            Data::Bytes(b) => Some(b),
            Data::Zero(_) => None,
        }
    }

    /// The bytes as a vector, unless the block is a run of zeros: once written, what
    /// the buffer is worth again.
    pub fn into_bytes(self) -> Option<Vec<u8>> {
        match self.data {
            Data::Bytes(b) => Some(b),
            Data::Zero(_) => None,
        }
    }

    /// The data, zeros materialised.
    pub fn data(&self) -> Cow<'_, [u8]> {
        match &self.data {
            Data::Bytes(b) => Cow::Borrowed(b),
            Data::Zero(n) => Cow::Owned(vec![0u8; *n]),
        }
    }

    /// Works out the digests of the pieces of `layout`'s leaves that the block covers
    /// whole, so that whoever records the write does not hash the data again: a worker
    /// does this, not the thread that writes the device in order. A run of zeros takes
    /// the digest of zeros without hashing.
    pub fn digest_pieces(&mut self, layout: &Layout) {
        let (b, p) = (layout.buffer, layout.piece());
        if self.is_empty() || b == 0 || p == 0 || matches!(self.data, Data::Zero(_)) {
            return;
        }
        let (start, end) = (self.offset, self.end());
        let mut pieces = Vec::new();
        for leaf in start / b..=(end - 1) / b {
            let (leaf_start, leaf_len) = layout.leaf_span(leaf);
            let leaf_end = leaf_start + leaf_len;
            let first = start.max(leaf_start).saturating_sub(leaf_start).div_ceil(p);
            let mut ps = leaf_start + first * p;
            while ps < leaf_end {
                let pe = (ps + p).min(leaf_end);
                if pe > end {
                    break;
                }
                pieces.push((ps, pe, self.piece_digest(layout, ps, pe)));
                ps = pe;
            }
        }
        self.pieces = pieces;
    }

    /// The digest (`layout`'s piece digest) of the block's bytes `[start, end)`, device
    /// offsets inside the block: worked out ahead if it was, else now.
    pub fn piece_digest(&self, layout: &Layout, start: u64, end: u64) -> Digest {
        if let Ok(i) = self.pieces.binary_search_by_key(&start, |&(s, _, _)| s)
            && self.pieces[i].1 == end
        {
            return self.pieces[i].2;
        }
        match &self.data {
            Data::Bytes(b) => layout.hash.digest(&b[(start - self.offset) as usize..(end - self.offset) as usize]),
            Data::Zero(_) => layout.hash.zero_digest((end - start) as usize),
        }
    }

    /// Checks each `unit`-sized piece against its digest, with `digest` for bytes and
    /// `zero` for a run of zeros of a length; `None` if the counts do not fit.
    fn check_each(
        &self,
        unit: usize,
        digests: &[Digest],
        digest: impl Fn(&[u8]) -> Digest,
        zero: impl Fn(usize) -> Digest,
    ) -> Option<Result<(), BlockError>> {
        let len = self.len();
        if len.div_ceil(unit) != digests.len() {
            return None;
        }
        for (k, expected) in digests.iter().enumerate() {
            let (start, end) = (k * unit, ((k + 1) * unit).min(len));
            let got = match &self.data {
                Data::Bytes(b) => digest(&b[start..end]),
                Data::Zero(_) => zero(end - start),
            };
            if got != *expected {
                let offset = self.offset + start as u64;
                return Some(Err(BlockError::Mismatch { offset, len: (end - start) as u64 }));
            }
        }
        Some(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::HashAlgo;

    fn layout(size: u64) -> Layout {
        Layout { hash: HashAlgo::Blake3, buffer: 8192, chunk: None, fanout: 4, device_size: size }
    }

    #[test]
    fn the_pieces_a_block_covers_whole_are_digested_ahead_and_the_rest_on_demand() {
        let l = Layout { chunk: Some(1024), ..layout(20000) };
        let data: Vec<u8> = (0..10000u32).map(|i| (i * 7 % 253) as u8).collect();
        let mut block = BlockFrame::encode(1500, &data, Codec::None, Check::None).verify(20000, &l).unwrap();
        block.digest_pieces(&l);
        let starts: Vec<u64> = block.pieces.iter().map(|&(s, _, _)| s).collect();
        // Pieces lie on 1 KiB boundaries within each 8 KiB leaf; [1500, 11500) covers
        // 2048..11264 whole.
        assert_eq!(starts, (2..11).map(|k| k * 1024).collect::<Vec<u64>>());
        for &(s, e, d) in &block.pieces {
            assert_eq!(e - s, 1024);
            assert_eq!(d, l.hash.digest(&data[(s - 1500) as usize..(e - 1500) as usize]));
        }
        // Digests a check proved are kept as they are.
        let unit = 1024;
        let digests = l.hash.digest_pieces(&data[548..548 + 4096], unit);
        let checked = BlockFrame::encode(
            2048,
            &data[548..548 + 4096],
            Codec::None,
            Check::Pieces { unit: unit as u32, digests: digests.clone() },
        )
        .verify(20000, &l)
        .unwrap();
        let kept: Vec<(u64, u64, Digest)> =
            (0..4).map(|k| (2048 + k * 1024, 3072 + k * 1024, digests[k as usize])).collect();
        assert_eq!(checked.pieces, kept);
        // A range not worked out ahead is hashed when asked for.
        assert_eq!(block.piece_digest(&l, 1500, 2048), l.hash.digest(&data[..548]));
        let mut zeros = BlockFrame::zeros(8192, 8192, Check::None).verify(20000, &l).unwrap();
        zeros.digest_pieces(&l);
        assert!(zeros.pieces.is_empty(), "zeros are never hashed");
        assert_eq!(zeros.piece_digest(&l, 8192, 9216), l.hash.zero_digest(1024));
    }

    #[test]
    fn blocks_outside_the_device_are_refused() {
        let l = layout(1 << 20);
        let b = BlockFrame::encode(u64::MAX - 2, &[0u8; 8], Codec::None, Check::None);
        assert!(matches!(b.verify(u64::MAX, &l), Err(BlockError::OutOfBounds { .. })));
        let b = BlockFrame::encode(100, &[0u8; 8], Codec::None, Check::None);
        assert!(b.clone().verify(107, &l).is_err());
        assert_eq!(&*b.verify(108, &l).unwrap().data(), &[0u8; 8]);
    }

    #[test]
    fn data_that_does_not_match_the_source_digest_is_refused_naming_the_offset() {
        let l = layout(1 << 20);
        let data = vec![7u8; 10000];
        let mut digests = l.hash.digest_pieces(&data, 4096);
        let ok =
            BlockFrame::encode(4096, &data, Codec::Zstd(1), Check::Pieces { unit: 4096, digests: digests.clone() });
        assert_eq!(ok.verify(1 << 20, &l).unwrap().end(), 4096 + 10000);
        digests[2] = l.hash.digest(b"something else");
        let bad = BlockFrame::encode(4096, &data, Codec::Zstd(1), Check::Pieces { unit: 4096, digests });
        let e = bad.verify(1 << 20, &l).unwrap_err();
        assert!(matches!(e, BlockError::Mismatch { offset: 12288, len: 1808 }), "{e}");
        assert!(e.to_string().contains("offset 12288"), "{e}");
    }

    #[test]
    fn zeros_cross_as_a_token_and_are_checked_without_being_made() {
        let l = layout(1 << 20);
        let zeros = vec![0u8; 20000];
        let leaves: Vec<Digest> = zeros.chunks(8192).map(|d| leaf_digest(&l, d).0).collect();
        let b = BlockFrame::encode(8192, &zeros, Codec::Zstd(3), Check::Leaves(leaves));
        assert_eq!((b.codec, b.payload.len()), (PayloadCodec::Zero, 0));
        let v = b.verify(1 << 20, &l).unwrap();
        assert!(v.bytes().is_none());
        assert_eq!((v.len(), v.end()), (20000, 28192));
        // A zero token where the source had data is a mismatch, not zeros written.
        let mut data = zeros.clone();
        data[19999] = 1;
        let pieces = l.hash.digest_pieces(&data, 4096);
        let lie = BlockFrame {
            check: Check::Pieces { unit: 4096, digests: pieces },
            ..BlockFrame::encode(0, &zeros, Codec::None, Check::None)
        };
        assert!(matches!(lie.verify(1 << 20, &l), Err(BlockError::Mismatch { offset: 16384, len: 3616 })));
    }

    #[test]
    fn whole_leaves_are_checked_by_the_leaf_rule() {
        let l = layout(20000);
        let data: Vec<u8> = (0..20000u32).map(|i| (i % 251) as u8).collect();
        let leaves: Vec<Digest> = data.chunks(8192).map(|d| leaf_digest(&l, d).0).collect();
        let b = BlockFrame::encode(0, &data, Codec::None, Check::Leaves(leaves.clone()));
        assert!(b.verify(20000, &l).is_ok());
        let misaligned = BlockFrame::encode(4096, &data[..8192], Codec::None, Check::Leaves(leaves[..1].to_vec()));
        assert!(matches!(misaligned.verify(20000, &l), Err(BlockError::BadCheck { .. })));
        let short = BlockFrame::encode(0, &data, Codec::None, Check::Leaves(leaves[..2].to_vec()));
        assert!(matches!(short.verify(20000, &l), Err(BlockError::BadCheck { .. })));
        let mut wrong = leaves;
        wrong.swap(0, 1);
        let b = BlockFrame::encode(0, &data, Codec::None, Check::Leaves(wrong));
        assert!(matches!(b.verify(20000, &l), Err(BlockError::Mismatch { offset: 0, len: 8192 })));
    }
}
