//! The Merkle tree over a device: leaves are the digests of `--buffer` blocks, each
//! internal node the digest of up to `fanout` children, one root. Pure: no I/O.
//!
//! Digests are stored flat (one `Vec<u8>` per level, `digest_len` bytes each) so a tree
//! of a million leaves costs little more than the leaves themselves.

use crate::hash::{Digest, HashAlgo};

/// Default number of children per internal node.
pub const DEFAULT_FANOUT: usize = 64;

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
    pub fn from_leaves(algo: HashAlgo, fanout: usize, leaves: &[Digest]) -> Tree {
        let mut bytes = Vec::with_capacity(leaves.len() * algo.digest_len());
        for d in leaves {
            bytes.extend_from_slice(d.as_bytes());
        }
        Tree::from_leaf_bytes(algo, fanout, bytes)
    }

    /// Digest algorithm.
    pub fn algo(&self) -> HashAlgo {
        self.algo
    }

    /// Children per internal node.
    pub fn fanout(&self) -> usize {
        self.fanout
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
    pub fn leaf(&self, index: usize) -> Digest {
        self.node(0, index)
    }

    /// All leaf digests, concatenated.
    pub fn leaf_bytes(&self) -> &[u8] {
        self.levels.first().map(|l| l.as_slice()).unwrap_or_default()
    }

    /// Indices on `level - 1` of the children of node `index` on `level`.
    pub fn children(&self, level: usize, index: usize) -> std::ops::Range<usize> {
        let below = self.width(level.saturating_sub(1));
        let start = (index * self.fanout).min(below);
        start..(start + self.fanout).min(below)
    }

    /// Replaces leaf `index` and recomputes its path to the root.
    pub fn set_leaf(&mut self, index: usize, digest: &Digest) {
        let dl = self.algo.digest_len();
        assert_eq!(digest.as_bytes().len(), dl, "digest of another algorithm");
        self.levels[0][index * dl..(index + 1) * dl].copy_from_slice(digest.as_bytes());
        let mut child = index;
        for level in 1..self.levels.len() {
            let parent = child / self.fanout;
            let range = self.children(level, parent);
            let below = &self.levels[level - 1][range.start * dl..range.end * dl];
            let d = node_digest(self.algo, below);
            self.levels[level][parent * dl..(parent + 1) * dl].copy_from_slice(d.as_bytes());
            child = parent;
        }
    }

    /// True if `other` has the same algorithm, fan-out and number of leaves, so that
    /// node indices mean the same on both.
    pub fn same_shape(&self, other: &Tree) -> bool {
        self.algo == other.algo && self.fanout == other.fanout && self.leaf_count() == other.leaf_count()
    }

    /// The leaves where this tree differs from `other` (which must have the same shape),
    /// found top-down: only subtrees whose roots differ are visited.
    pub fn diff(&self, other: &Tree) -> Vec<usize> {
        assert!(self.same_shape(other), "trees of different shapes");
        let fetch = |level: usize, indices: &[usize]| {
            Ok::<_, std::convert::Infallible>(indices.iter().map(|&i| other.node(level, i)).collect())
        };
        match self.walk(fetch) {
            Ok(leaves) => leaves,
            Err(never) => match never {},
        }
    }

    /// The top-down walk behind [`Tree::diff`], with the other side's nodes fetched one
    /// level at a time through `fetch(level, indices)`: one call (one round trip) per
    /// level, batching every node of that level that must be compared.
    pub fn walk<E>(&self, mut fetch: impl FnMut(usize, &[usize]) -> Result<Vec<Digest>, E>) -> Result<Vec<usize>, E> {
        if self.leaf_count() == 0 {
            return Ok(Vec::new());
        }
        let mut level = self.levels.len() - 1;
        let mut candidates = vec![0usize];
        loop {
            let theirs = fetch(level, &candidates)?;
            let differing: Vec<usize> =
                candidates.iter().zip(theirs).filter(|(i, d)| self.node(level, **i) != *d).map(|(i, _)| *i).collect();
            if level == 0 || differing.is_empty() {
                return Ok(differing);
            }
            candidates = differing.iter().flat_map(|&i| self.children(level, i)).collect();
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

    fn leaves(n: usize, seed: u8) -> Vec<Digest> {
        (0..n).map(|i| HashAlgo::Blake3.digest(&[(i % 251) as u8, (i / 251) as u8, seed])).collect()
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
            let got: Vec<usize> = ta.diff(&tb);
            prop_assert_eq!(got, expected.into_iter().collect::<Vec<_>>());
            prop_assert_eq!(ta.root() == tb.root(), ta.diff(&tb).is_empty());
        }

        #[test]
        fn updating_a_leaf_updates_its_path_to_the_root(
            n in 1usize..500,
            fanout in 2usize..10,
            updates in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..10),
        ) {
            let mut ls: Vec<Digest> = leaves(n, 1).iter().map(|d| HashAlgo::Sha256.digest(d.as_bytes())).collect();
            let mut t = Tree::from_leaves(HashAlgo::Sha256, fanout, &ls);
            for (at, v) in updates {
                let i = at.index(n);
                let d = HashAlgo::Sha256.digest(&[v, i as u8]);
                ls[i] = d;
                t.set_leaf(i, &d);
                prop_assert_eq!(&t, &Tree::from_leaves(HashAlgo::Sha256, fanout, &ls));
            }
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
            prop_assert_eq!(got, ta.diff(&tb));
            // Strictly descending levels, each at most once.
            prop_assert!(calls.windows(2).all(|w| w[0] == w[1] + 1));
            prop_assert!(calls.len() <= ta.height());
        }
    }
}
