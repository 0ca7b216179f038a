//! The Merkle tree over a device: its [`Layout`], the leaf rule (a leaf's digest from
//! its pieces' digests), and the tree itself: leaves are the digests of `--buffer`
//! blocks, each internal node the digest of up to `fanout` children, one root. Pure: no I/O.
//!
//! Digests are stored flat (one `Vec<u8>` per level, `digest_len` bytes each) so a tree
//! of a million leaves costs little more than the leaves themselves.

use crate::hash::{Digest, HashAlgo};

/// Default number of children per internal node.
pub const DEFAULT_FANOUT: usize = 64;

/// Piece size when no `--chunk` is given: large enough that hashing pieces costs no
/// more than hashing whole blocks, small enough to refine a differing block cheaply.
pub const DEFAULT_PIECE: u64 = 16 << 10;

/// The parameters a tree was built with; a state is used only if they match the run's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layout {
    /// Digest algorithm.
    pub hash: HashAlgo,
    /// Leaf (block) size in bytes.
    pub buffer: u64,
    /// Chunk size in bytes, if chunk digests are kept under each leaf.
    pub chunk: Option<u64>,
    /// Children per internal node.
    pub fanout: u32,
    /// Bytes covered by the tree.
    pub device_size: u64,
}

impl Layout {
    /// Number of leaves.
    pub fn leaf_count(&self) -> u64 {
        self.device_size.div_ceil(self.buffer)
    }

    /// Length of leaf `i` (the last may be shorter; 0 past the end).
    pub fn leaf_len(&self, leaf: u64) -> u64 {
        self.device_size.saturating_sub(leaf.saturating_mul(self.buffer)).min(self.buffer)
    }

    /// Offset and length of leaf `i`.
    pub fn leaf_span(&self, leaf: u64) -> (u64, u64) {
        (leaf * self.buffer, self.leaf_len(leaf))
    }

    /// Size of the pieces whose digests make up a leaf digest: the chunk with `--chunk`,
    /// else [`DEFAULT_PIECE`] (or the whole leaf, if smaller).
    pub fn piece(&self) -> u64 {
        self.chunk.unwrap_or(DEFAULT_PIECE.min(self.buffer))
    }

    /// Number of pieces of leaf `i`.
    pub fn pieces_of(&self, leaf: u64) -> u64 {
        self.leaf_len(leaf).div_ceil(self.piece())
    }

    /// Total number of pieces of all leaves.
    pub fn piece_count(&self) -> u64 {
        match self.leaf_count() {
            0 => 0,
            n => (n - 1) * self.pieces_of(0) + self.pieces_of(n - 1),
        }
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "hash {}, buffer {} KiB", self.hash, self.buffer / 1024)?;
        if let Some(c) = self.chunk {
            write!(f, ", chunk {} KiB", c / 1024)?;
        }
        write!(f, ", {} bytes", self.device_size)
    }
}

/// The leaf rule: a leaf's digest is the node digest over the digests of its pieces
/// ([`Layout::piece`]), so that the pieces under a leaf prove it, a differing leaf can be
/// refined without hashing it again, and a leaf patched piece by piece gets its new
/// digest from its pieces. Returns the leaf digest and the piece digests.
pub fn leaf_digest(layout: &Layout, data: &[u8]) -> (Digest, Vec<Digest>) {
    let pieces = layout.hash.digest_pieces(data, layout.piece() as usize);
    (pieces_root(layout, &pieces), pieces)
}

/// The leaf rule for a leaf of `len` zero bytes, without any zeros to hash (computed
/// once per hash, piece size and length).
pub fn zero_leaf_digest(layout: &Layout, len: u64) -> (Digest, Vec<Digest>) {
    type Cache = std::sync::Mutex<std::collections::HashMap<(HashAlgo, u64, u64), (Digest, Vec<Digest>)>>;
    static ZEROS: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
    let key = (layout.hash, layout.piece(), len);
    let cache = ZEROS.get_or_init(Default::default);
    // A poisoned cache only means another thread panicked while inserting whole entries.
    if let Some(hit) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return hit.clone();
    }
    let piece = layout.piece();
    let pieces: Vec<Digest> =
        (0..len.div_ceil(piece)).map(|k| layout.hash.zero_digest((len - k * piece).min(piece) as usize)).collect();
    let value = (pieces_root(layout, &pieces), pieces);
    cache.lock().unwrap_or_else(|p| p.into_inner()).insert(key, value.clone());
    value
}

/// The leaf digest over its piece digests.
pub fn pieces_root(layout: &Layout, pieces: &[Digest]) -> Digest {
    let mut bytes = Vec::with_capacity(pieces.len() * layout.hash.digest_len());
    for p in pieces {
        bytes.extend_from_slice(p.as_bytes());
    }
    node_digest(layout.hash, &bytes)
}

/// A Merkle tree of block digests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tree {
    algo: HashAlgo,
    fanout: usize,
    /// `levels[0]` are the leaves; the last level holds the root alone.
    levels: Vec<Vec<u8>>,
}

impl Tree {
    /// Builds the tree over `leaves` (concatenated digests of `algo`).
    /// Panics if `fanout < 2` or `leaves` is not a whole number of digests.
    pub fn from_leaf_bytes(algo: HashAlgo, fanout: usize, leaves: Vec<u8>) -> Tree {
        assert!(fanout >= 2, "fanout must be at least 2");
        assert_eq!(leaves.len() % algo.digest_len(), 0, "leaf bytes are not whole digests");
        let mut levels = vec![leaves];
        while levels.last().is_some_and(|l| l.len() > algo.digest_len()) {
            let below = levels.last().map(|l| l.as_slice()).unwrap_or_default();
            let dl = algo.digest_len();
            let mut up = Vec::with_capacity(below.len().div_ceil(dl * fanout) * dl);
            for group in below.chunks(dl * fanout) {
                up.extend_from_slice(node_digest(algo, group).as_bytes());
            }
            levels.push(up);
        }
        Tree { algo, fanout, levels }
    }

    /// Builds the tree over a list of leaf digests.
    #[cfg(test)]
    pub fn from_leaves(algo: HashAlgo, fanout: usize, leaves: &[Digest]) -> Tree {
        let mut bytes = Vec::with_capacity(leaves.len() * algo.digest_len());
        for d in leaves {
            bytes.extend_from_slice(d.as_bytes());
        }
        Tree::from_leaf_bytes(algo, fanout, bytes)
    }

    /// Number of levels, leaves included (0 for an empty tree).
    pub fn height(&self) -> usize {
        if self.leaf_count() == 0 { 0 } else { self.levels.len() }
    }

    /// Number of nodes on `level`.
    pub fn width(&self, level: usize) -> usize {
        self.levels.get(level).map_or(0, |l| l.len() / self.algo.digest_len())
    }

    /// Number of leaves.
    pub fn leaf_count(&self) -> usize {
        self.width(0)
    }

    /// The root digest, if there are leaves.
    pub fn root(&self) -> Option<Digest> {
        let top = self.levels.len().checked_sub(1)?;
        (self.width(top) == 1).then(|| self.node(top, 0))
    }

    /// Digest of node `index` on `level`. Panics if out of range.
    pub fn node(&self, level: usize, index: usize) -> Digest {
        let dl = self.algo.digest_len();
        Digest::from_slice(&self.levels[level][index * dl..(index + 1) * dl])
    }

    /// Leaf `index`.
    #[cfg(test)]
    pub fn leaf(&self, index: usize) -> Digest {
        self.node(0, index)
    }

    /// Indices on `level - 1` of the children of node `index` on `level`.
    pub fn children(&self, level: usize, index: usize) -> std::ops::Range<usize> {
        let below = self.width(level.saturating_sub(1));
        let start = (index * self.fanout).min(below);
        start..(start + self.fanout).min(below)
    }

    /// The leaves where this tree differs from the other side's tree of the same shape,
    /// with the other side's leaf digests, found top-down: only subtrees whose roots
    /// differ are visited. The other side's nodes are fetched one level at a time through
    /// `fetch(level, indices)`: one call (one round trip) per level, batching every node
    /// of that level that must be compared.
    pub fn walk<E>(
        &self,
        mut fetch: impl FnMut(usize, &[usize]) -> Result<Vec<Digest>, E>,
    ) -> Result<Vec<(usize, Digest)>, E> {
        if self.leaf_count() == 0 {
            return Ok(Vec::new());
        }
        let mut level = self.levels.len() - 1;
        let mut candidates = vec![0usize];
        loop {
            let theirs = fetch(level, &candidates)?;
            let differing: Vec<(usize, Digest)> = candidates
                .iter()
                .zip(theirs)
                .filter(|(i, d)| self.node(level, **i) != *d)
                .map(|(i, d)| (*i, d))
                .collect();
            if level == 0 || differing.is_empty() {
                return Ok(differing);
            }
            candidates = differing.iter().flat_map(|&(i, _)| self.children(level, i)).collect();
            level -= 1;
        }
    }
}

/// Digest of an internal node over its children's concatenated digests, domain-separated
/// from leaf digests (which are digests of device data).
pub fn node_digest(algo: HashAlgo, children: &[u8]) -> Digest {
    let mut input = Vec::with_capacity(children.len() + 11);
    input.extend_from_slice(b"basyn-node\0");
    input.extend_from_slice(children);
    algo.digest(&input)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The leaves where `a` differs from `b` (of the same shape), by a walk over `b`.
    fn diff(a: &Tree, b: &Tree) -> Vec<usize> {
        assert_eq!((a.algo, a.fanout, a.leaf_count()), (b.algo, b.fanout, b.leaf_count()), "trees of different shapes");
        let fetch = |level: usize, indices: &[usize]| Ok::<_, ()>(indices.iter().map(|&i| b.node(level, i)).collect());
        let found = a.walk(fetch).unwrap();
        for &(i, d) in &found {
            assert_eq!(d, b.leaf(i), "the walk returns the other side's leaf digest");
        }
        found.into_iter().map(|(i, _)| i).collect()
    }

    fn leaves(n: usize, seed: u8) -> Vec<Digest> {
        (0..n).map(|i| HashAlgo::Blake3.digest(&[(i % 251) as u8, (i / 251) as u8, seed])).collect()
    }

    #[test]
    fn the_leaf_rule_of_zeros_needs_no_zeros() {
        let l = Layout { hash: HashAlgo::Blake3, buffer: 40000, chunk: None, fanout: 4, device_size: 1 << 20 };
        for len in [40000u64, 16384, 100, 0] {
            assert_eq!(zero_leaf_digest(&l, len), leaf_digest(&l, &vec![0u8; len as usize]), "{len}");
        }
    }

    #[test]
    fn shape_of_a_small_tree() {
        let t = Tree::from_leaves(HashAlgo::Blake3, 4, &leaves(10, 0));
        assert_eq!((t.width(0), t.width(1), t.width(2), t.width(3)), (10, 3, 1, 0));
        assert_eq!(t.height(), 3);
        assert_eq!(t.children(1, 2), 8..10);
        assert!(t.root().is_some());
        assert_eq!(Tree::from_leaves(HashAlgo::Blake3, 4, &[]).root(), None);
        let one = Tree::from_leaves(HashAlgo::Blake3, 4, &leaves(1, 0));
        assert_eq!(one.root(), Some(leaves(1, 0)[0]));
    }

    proptest! {
        #[test]
        fn diff_returns_exactly_the_differing_leaves(
            n in 0usize..700,
            fanout in 2usize..20,
            changes in proptest::collection::vec(any::<proptest::sample::Index>(), 0..30),
        ) {
            let a = leaves(n, 0);
            let mut b = a.clone();
            let mut expected = std::collections::BTreeSet::new();
            if n > 0 {
                for c in &changes {
                    let i = c.index(n);
                    b[i] = HashAlgo::Blake3.digest(&[i as u8, 0xee, (i >> 8) as u8, 9]);
                    expected.insert(i);
                }
            }
            let ta = Tree::from_leaves(HashAlgo::Blake3, fanout, &a);
            let tb = Tree::from_leaves(HashAlgo::Blake3, fanout, &b);
            let got: Vec<usize> = diff(&ta, &tb);
            prop_assert_eq!(got, expected.into_iter().collect::<Vec<_>>());
            prop_assert_eq!(ta.root() == tb.root(), diff(&ta, &tb).is_empty());
        }

        #[test]
        fn the_walk_fetches_one_batch_per_level(n in 1usize..2000, fanout in 2usize..70, k in 0usize..5) {
            let a = leaves(n, 0);
            let mut b = a.clone();
            for j in 0..k.min(n) {
                b[(j * 7919) % n] = HashAlgo::Blake3.digest(b"changed");
            }
            let ta = Tree::from_leaves(HashAlgo::Blake3, fanout, &a);
            let tb = Tree::from_leaves(HashAlgo::Blake3, fanout, &b);
            let mut calls = Vec::new();
            let got = ta.walk(|level, idx| {
                calls.push(level);
                Ok::<_, ()>(idx.iter().map(|&i| tb.node(level, i)).collect())
            }).unwrap();
            prop_assert_eq!(got.into_iter().map(|(i, _)| i).collect::<Vec<_>>(), diff(&ta, &tb));
            // Strictly descending levels, each at most once.
            prop_assert!(calls.windows(2).all(|w| w[0] == w[1] + 1));
            prop_assert!(calls.len() <= ta.height());
        }
    }
}
