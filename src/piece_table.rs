//! The piece digests of a device's leaves, kept at page scale (the leaf's pieces:
//! `--chunk`, or 16 KiB) and sparse: a leaf of zeros costs one tag, a zero piece one
//! bit, and only pieces holding data keep a digest. Memory and the state file grow with
//! the data, not with the device.

use crate::hash::Digest;
use crate::tree::Layout;

/// What is known of one leaf's pieces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
enum Leaf {
    /// Not known.
    #[default]
    Unknown,
    /// Every piece is zero.
    Zero,
    /// Bit k of `zero` set: piece k is zero; the digests of the other pieces in order.
    Pieces { zero: Box<[u64]>, digests: Box<[u8]> },
}

/// The piece digests of every leaf of a layout, as far as they are known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PieceTable {
    layout: Layout,
    leaves: Vec<Leaf>,
}

impl PieceTable {
    /// A table of `layout`'s leaves, none known.
    pub fn new(layout: Layout) -> PieceTable {
        PieceTable { layout, leaves: vec![Leaf::Unknown; layout.leaf_count() as usize] }
    }

    /// True if leaf `i`'s pieces are known.
    pub fn known(&self, i: u64) -> bool {
        !matches!(self.leaves.get(i as usize), None | Some(Leaf::Unknown))
    }

    /// Leaf `i`'s piece digests, if known.
    pub fn get(&self, i: u64) -> Option<Vec<Digest>> {
        let count = self.layout.pieces_of(i) as usize;
        let zeros = crate::tree::zero_leaf_digest(&self.layout, self.layout.leaf_len(i)).1;
        let zero = |k: usize| zeros[k];
        match self.leaves.get(i as usize)? {
            Leaf::Unknown => None,
            Leaf::Zero => Some(zeros),
            Leaf::Pieces { zero: bits, digests } => {
                let dl = self.layout.hash.digest_len();
                let mut next = digests.chunks(dl);
                (0..count)
                    .map(|k| if bit(bits, k) { Some(zero(k)) } else { next.next().map(Digest::from_slice) })
                    .collect()
            }
        }
    }

    /// Records leaf `i`'s piece digests (ignored unless there is one per piece).
    pub fn set(&mut self, i: u64, pieces: &[Digest]) {
        if pieces.len() as u64 != self.layout.pieces_of(i) || i >= self.leaves.len() as u64 {
            return;
        }
        let zeros = crate::tree::zero_leaf_digest(&self.layout, self.layout.leaf_len(i)).1;
        let zero: Vec<bool> = pieces.iter().zip(&zeros).map(|(d, z)| d == z).collect();
        self.leaves[i as usize] = if zero.iter().all(|z| *z) {
            Leaf::Zero
        } else {
            let mut bits = vec![0u64; pieces.len().div_ceil(64)];
            let mut digests = Vec::new();
            for (k, d) in pieces.iter().enumerate() {
                if zero[k] {
                    bits[k / 64] |= 1 << (k % 64);
                } else {
                    digests.extend_from_slice(d.as_bytes());
                }
            }
            Leaf::Pieces { zero: bits.into(), digests: digests.into() }
        };
    }

    /// Records that leaf `i` is all zeros.
    pub fn set_zero(&mut self, i: u64) {
        if let Some(l) = self.leaves.get_mut(i as usize) {
            *l = Leaf::Zero;
        }
    }

    /// True if leaf `i` is known to be all zeros.
    pub fn is_zero(&self, i: u64) -> bool {
        matches!(self.leaves.get(i as usize), Some(Leaf::Zero))
    }

    /// Forgets leaf `i`'s pieces.
    pub fn forget(&mut self, i: u64) {
        if let Some(l) = self.leaves.get_mut(i as usize) {
            *l = Leaf::Unknown;
        }
    }

    /// The zero map of leaves `0..valid` (one bit per piece, set for a zero piece, least
    /// significant bit first, the pieces of leaf after leaf) and the digests of their
    /// other pieces: what a state file stores. Leaves from `valid` on are stored as zeros.
    pub fn encode(&self, valid: u64) -> (Vec<u8>, Vec<u8>) {
        let total = self.layout.piece_count() as usize;
        let mut map = vec![0u8; total.div_ceil(8)];
        let mut digests = Vec::new();
        let mut at = 0usize;
        for (i, leaf) in self.leaves.iter().enumerate() {
            let count = self.layout.pieces_of(i as u64) as usize;
            match leaf {
                Leaf::Pieces { zero, digests: d } if (i as u64) < valid => {
                    (0..count).filter(|&k| bit(zero, k)).for_each(|k| map[(at + k) / 8] |= 1 << ((at + k) % 8));
                    digests.extend_from_slice(d);
                }
                _ => set_bits(&mut map, at, count),
            }
            at += count;
        }
        (map, digests)
    }

    /// Rebuilds the pieces of leaves `0..valid` from [`PieceTable::encode`]'s output;
    /// `None` if the map and the digests do not fit `layout`.
    pub fn decode(layout: Layout, valid: u64, map: &[u8], digests: &[u8]) -> Option<PieceTable> {
        let total = layout.piece_count() as usize;
        let dl = layout.hash.digest_len();
        let zero_bit = |k: usize| map[k / 8] & (1 << (k % 8)) != 0;
        if map.len() != total.div_ceil(8) || !digests.len().is_multiple_of(dl) {
            return None;
        }
        let mut table = PieceTable::new(layout);
        let (mut at, mut next) = (0usize, 0usize);
        for i in 0..layout.leaf_count() {
            let count = layout.pieces_of(i) as usize;
            let nonzero = count - ones(map, at, count);
            if i < valid {
                table.leaves[i as usize] = if nonzero == 0 {
                    Leaf::Zero
                } else {
                    let mut bits = vec![0u64; count.div_ceil(64)];
                    (0..count).filter(|&k| zero_bit(at + k)).for_each(|k| bits[k / 64] |= 1 << (k % 64));
                    let d = digests.get(next * dl..(next + nonzero) * dl)?;
                    Leaf::Pieces { zero: bits.into(), digests: d.into() }
                };
            }
            next += nonzero;
            at += count;
        }
        (next * dl == digests.len()).then_some(table)
    }
}

/// Sets bits `at..at+count` of a byte map, whole bytes at a time where it can.
fn set_bits(map: &mut [u8], at: usize, count: usize) {
    let (mut k, end) = (at, at + count);
    while k < end && !k.is_multiple_of(8) {
        map[k / 8] |= 1 << (k % 8);
        k += 1;
    }
    let whole = (end - k) / 8;
    map[k / 8..k / 8 + whole].fill(0xff);
    k += whole * 8;
    while k < end {
        map[k / 8] |= 1 << (k % 8);
        k += 1;
    }
}

/// The number of set bits `at..at+count` of a byte map.
fn ones(map: &[u8], at: usize, count: usize) -> usize {
    let (mut k, end, mut n) = (at, at + count, 0);
    while k < end && !k.is_multiple_of(8) {
        n += usize::from(map[k / 8] & (1 << (k % 8)) != 0);
        k += 1;
    }
    let whole = (end - k) / 8;
    n += map[k / 8..k / 8 + whole].iter().map(|b| b.count_ones() as usize).sum::<usize>();
    k += whole * 8;
    while k < end {
        n += usize::from(map[k / 8] & (1 << (k % 8)) != 0);
        k += 1;
    }
    n
}

fn bit(bits: &[u64], k: usize) -> bool {
    bits[k / 64] & (1 << (k % 64)) != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::HashAlgo;

    fn layout() -> Layout {
        Layout { hash: HashAlgo::Blake3, buffer: 4096, chunk: Some(1024), fanout: 4, device_size: 10000 }
    }

    fn pieces(l: &Layout, leaf: u64, data: &[u8]) -> Vec<Digest> {
        let (start, len) = l.leaf_span(leaf);
        l.hash.digest_pieces(&data[start as usize..(start + len) as usize], 1024)
    }

    #[test]
    fn pieces_round_trip_through_memory_and_the_state_encoding() {
        let l = layout();
        let mut data = vec![0u8; 10000];
        data[5000] = 1; // leaf 1, piece 0
        data[9999] = 2; // the last piece of the short last leaf
        let mut t = PieceTable::new(l);
        assert!(!t.known(0) && t.get(0).is_none());
        for leaf in 0..3 {
            t.set(leaf, &pieces(&l, leaf, &data));
        }
        assert!(t.is_zero(0) && !t.is_zero(1) && !t.is_zero(2));
        for leaf in 0..3 {
            assert_eq!(t.get(leaf), Some(pieces(&l, leaf, &data)), "leaf {leaf}");
        }
        let (map, digests) = t.encode(3);
        assert_eq!(digests.len(), 2 * 32, "only the two pieces holding data keep a digest");
        assert_eq!(PieceTable::decode(l, 3, &map, &digests), Some(t.clone()));
        // Leaves past the valid prefix are not kept.
        let (map, digests) = t.encode(2);
        let partial = PieceTable::decode(l, 2, &map, &digests).unwrap();
        assert!(partial.known(1) && !partial.known(2));
        assert!(PieceTable::decode(l, 3, &map[1..], &digests).is_none());
        assert!(PieceTable::decode(l, 3, &map, &digests[1..]).is_none());
    }

    #[test]
    fn bit_ranges_are_set_and_counted_across_byte_boundaries() {
        for (at, count) in [(0usize, 0usize), (0, 8), (3, 2), (3, 13), (5, 30), (16, 16)] {
            let mut map = vec![0u8; 8];
            set_bits(&mut map, at, count);
            let expected: Vec<usize> = (at..at + count).collect();
            let got: Vec<usize> = (0..64).filter(|&k| map[k / 8] & (1 << (k % 8)) != 0).collect();
            assert_eq!(got, expected, "{at}+{count}");
            assert_eq!(ones(&map, 0, 64), count);
            assert_eq!(ones(&map, at, count), count);
        }
    }

    #[test]
    fn a_wrong_count_of_pieces_is_ignored_and_forgetting_works() {
        let l = layout();
        let mut t = PieceTable::new(l);
        t.set(0, &[HashAlgo::Blake3.digest(b"x")]);
        assert!(!t.known(0));
        t.set_zero(0);
        assert!(t.known(0) && t.is_zero(0));
        t.forget(0);
        assert!(!t.known(0));
    }
}
