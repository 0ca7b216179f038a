//! The piece digests of a device's leaves, kept at page scale (the leaf's pieces:
//! `--chunk`, or 16 KiB) and sparse: a leaf of zeros costs one tag, a zero piece one
//! bit, and only pieces holding data keep a digest. Memory and the state file grow with
//! the data, not with the device.
//!
//! Memory stays bounded for any amount of data: past [`HOT_BUDGET`] bytes of digests the
//! table moves them to an unnamed spill file (`O_TMPFILE`) in the state's directory,
//! and the digests of a loaded state too large for memory stay in the state file, read
//! back with `pread` when a leaf is asked for. What stays in memory per leaf is a tag,
//! a file position and a bit per piece.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::hash::Digest;
use crate::tree::Layout;

/// Bytes of piece digests kept in memory before they go to the spill file: those of
/// 16 GiB of data with BLAKE3 and 16 KiB pieces.
pub const HOT_BUDGET: usize = 32 << 20;

/// [`HOT_BUDGET`], or `BASYN_TEST_PIECE_BUDGET` bytes in tests.
pub fn budget() -> usize {
    static BUDGET: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BUDGET.get_or_init(|| {
        std::env::var("BASYN_TEST_PIECE_BUDGET").ok().and_then(|v| v.parse().ok()).unwrap_or(HOT_BUDGET)
    })
}

/// What is known of one leaf's pieces.
const UNKNOWN: u8 = 0;
/// Every piece is zero.
const ZERO: u8 = 1;
/// The digests of its non-zero pieces are in memory.
const HOT: u8 = 2;
/// ... in the loaded state file, at `at`.
const LOADED: u8 = 3;
/// ... in the spill file, at `at`.
const SPILLED: u8 = 4;

/// Where piece digests go past the budget.
#[derive(Debug)]
enum Spill {
    /// Not needed yet; created in this directory when it is.
    Later(Option<PathBuf>),
    /// The spill file and its length.
    Open(File, u64),
    /// It could not be created or written: digests stay in memory.
    Failed,
}

/// The digests of a state's non-zero pieces, in order: in memory, or a range of a file.
pub enum Digests<'a> {
    /// In memory.
    Bytes(&'a [u8]),
    /// `len` bytes of `file` from `offset`, read only when asked for.
    File {
        /// The (verified) state file, kept open: a rename over its path does not change it.
        file: File,
        /// Where the digests start.
        offset: u64,
        /// Their length.
        len: u64,
    },
}

/// The piece digests of every leaf of a layout, as far as they are known.
#[derive(Debug)]
pub struct PieceTable {
    layout: Layout,
    /// Pieces of every leaf but the last.
    per_leaf: u64,
    /// Per leaf: `UNKNOWN`, `ZERO`, `HOT`, `LOADED` or `SPILLED`.
    kind: Vec<u8>,
    /// A bit per piece, leaf after leaf, set for a zero piece (meaningful for leaves with
    /// digests).
    zero: Vec<u64>,
    /// Per leaf, where its digests are in their file (allocated on first use).
    at: Vec<u64>,
    hot: BTreeMap<u64, Box<[u8]>>,
    hot_bytes: usize,
    budget: usize,
    loaded: Option<File>,
    spill: Spill,
}

impl PieceTable {
    /// A table of `layout`'s leaves, none known.
    pub fn new(layout: Layout) -> PieceTable {
        PieceTable {
            layout,
            per_leaf: layout.pieces_of(0),
            kind: vec![UNKNOWN; layout.leaf_count() as usize],
            zero: vec![0; layout.piece_count().div_ceil(64) as usize],
            at: Vec::new(),
            hot: BTreeMap::new(),
            hot_bytes: 0,
            budget: budget(),
            loaded: None,
            spill: Spill::Later(None),
        }
    }

    /// Digests past the budget go to an unnamed file in `dir` (the state's directory).
    pub fn spill_in(&mut self, dir: &Path) {
        if let Spill::Later(_) = self.spill {
            self.spill = Spill::Later(Some(dir.to_path_buf()));
        }
    }

    fn kind(&self, i: u64) -> u8 {
        self.kind.get(i as usize).copied().unwrap_or(UNKNOWN)
    }

    /// True if leaf `i`'s pieces are known.
    pub fn known(&self, i: u64) -> bool {
        self.kind(i) != UNKNOWN
    }

    /// True if leaf `i` is known to be all zeros.
    pub fn is_zero(&self, i: u64) -> bool {
        self.kind(i) == ZERO
    }

    /// True if the pieces `first..first + count` of leaf `i` are all known to be zero.
    pub fn pieces_zero(&self, i: u64, first: u64, count: u64) -> bool {
        match self.kind(i) {
            ZERO => true,
            UNKNOWN => false,
            _ => {
                let n = self.layout.pieces_of(i);
                first + count <= n && ones(&self.zero, i * self.per_leaf + first, count) == count
            }
        }
    }

    /// Leaf `i`'s piece digests, if known (a digest that cannot be read back from its
    /// file is unknown: the leaf is then read from the device).
    pub fn get(&self, i: u64) -> Option<Vec<Digest>> {
        let zeros = crate::tree::zero_leaf_digest(&self.layout, self.layout.leaf_len(i)).1;
        if self.kind(i) == ZERO {
            return Some(zeros);
        }
        let raw = self.raw(i).ok()??;
        let mut next = raw.chunks(self.layout.hash.digest_len());
        let base = i * self.per_leaf;
        (0..zeros.len())
            .map(|k| if self.zero_bit(base + k as u64) { Some(zeros[k]) } else { next.next().map(Digest::from_slice) })
            .collect()
    }

    /// The digests of leaf `i`'s non-zero pieces, wherever they are kept.
    fn raw(&self, i: u64) -> io::Result<Option<Cow<'_, [u8]>>> {
        let file = match self.kind(i) {
            HOT => return Ok(self.hot.get(&i).map(|d| Cow::Borrowed(&d[..]))),
            LOADED => self.loaded.as_ref(),
            SPILLED => match &self.spill {
                Spill::Open(f, _) => Some(f),
                _ => None,
            },
            _ => return Ok(None),
        };
        let Some(file) = file else { return Ok(None) };
        let mut buf = vec![0u8; self.nonzero(i) as usize * self.layout.hash.digest_len()];
        file.read_exact_at(&mut buf, self.at[i as usize])?;
        Ok(Some(Cow::Owned(buf)))
    }

    /// Records leaf `i`'s piece digests (ignored unless there is one per piece).
    pub fn set(&mut self, i: u64, pieces: &[Digest]) {
        if pieces.len() as u64 != self.layout.pieces_of(i) || i >= self.kind.len() as u64 {
            return;
        }
        self.forget(i);
        let zeros = crate::tree::zero_leaf_digest(&self.layout, self.layout.leaf_len(i)).1;
        let base = i * self.per_leaf;
        let mut digests = Vec::new();
        for (k, d) in pieces.iter().enumerate() {
            let zero = *d == zeros[k];
            self.set_zero_bit(base + k as u64, zero);
            if !zero {
                digests.extend_from_slice(d.as_bytes());
            }
        }
        if digests.is_empty() {
            self.kind[i as usize] = ZERO;
            return;
        }
        self.kind[i as usize] = HOT;
        self.hot_bytes += digests.len();
        self.hot.insert(i, digests.into());
        if self.hot_bytes > self.budget {
            self.spill_hot();
        }
    }

    /// Records that leaf `i` is all zeros.
    pub fn set_zero(&mut self, i: u64) {
        if i < self.kind.len() as u64 {
            self.forget(i);
            self.kind[i as usize] = ZERO;
        }
    }

    /// Forgets leaf `i`'s pieces.
    pub fn forget(&mut self, i: u64) {
        if let Some(d) = self.hot.remove(&i) {
            self.hot_bytes -= d.len();
        }
        if let Some(k) = self.kind.get_mut(i as usize) {
            *k = UNKNOWN;
        }
    }

    /// Moves every digest in memory to the spill file, leaf after leaf, in batches; what
    /// cannot be written stays in memory.
    fn spill_hot(&mut self) {
        let Some(mut pos) = self.spill_end() else { return };
        let leaves: Vec<u64> = self.hot.keys().copied().collect();
        let (mut batch, mut members) = (Vec::new(), Vec::new());
        for (n, leaf) in leaves.iter().enumerate() {
            members.push((*leaf, pos + batch.len() as u64));
            batch.extend_from_slice(&self.hot[leaf]);
            if batch.len() < 1 << 20 && n + 1 < leaves.len() {
                continue;
            }
            let Spill::Open(file, len) = &mut self.spill else { return };
            if file.write_all_at(&batch, pos).is_err() {
                self.spill = Spill::Failed;
                return;
            }
            pos += batch.len() as u64;
            *len = pos;
            batch.clear();
            for (leaf, at) in members.drain(..) {
                self.cold(leaf, SPILLED, at);
            }
        }
    }

    /// The spill file's length, creating the file first if needed; `None` if there is none.
    fn spill_end(&mut self) -> Option<u64> {
        if let Spill::Later(dir) = &self.spill {
            let dir = dir.clone().unwrap_or_else(std::env::temp_dir);
            // O_TMPFILE: a file with no name, gone when closed; nothing can be replaced.
            let file = OpenOptions::new().read(true).write(true).mode(0o600).custom_flags(libc::O_TMPFILE).open(&dir);
            self.spill = file.map_or(Spill::Failed, |f| Spill::Open(f, 0));
        }
        match self.spill {
            Spill::Open(_, len) => Some(len),
            _ => None,
        }
    }

    /// Leaf `i`'s digests are now at `at` in the file `kind` names.
    fn cold(&mut self, i: u64, kind: u8, at: u64) {
        if self.at.is_empty() {
            self.at = vec![0; self.kind.len()];
        }
        if let Some(d) = self.hot.remove(&i) {
            self.hot_bytes -= d.len();
        }
        self.kind[i as usize] = kind;
        self.at[i as usize] = at;
    }

    fn zero_bit(&self, k: u64) -> bool {
        self.zero[(k / 64) as usize] & (1 << (k % 64)) != 0
    }

    fn set_zero_bit(&mut self, k: u64, on: bool) {
        let (w, b) = ((k / 64) as usize, k % 64);
        self.zero[w] = if on { self.zero[w] | 1 << b } else { self.zero[w] & !(1 << b) };
    }

    /// The number of leaf `i`'s pieces that hold data.
    fn nonzero(&self, i: u64) -> u64 {
        let count = self.layout.pieces_of(i);
        count - ones(&self.zero, i * self.per_leaf, count)
    }

    /// The number of piece digests leaves `0..valid` store.
    pub fn nonzero_pieces(&self, valid: u64) -> u64 {
        (0..valid.min(self.kind.len() as u64)).filter(|&i| self.kind(i) >= HOT).map(|i| self.nonzero(i)).sum()
    }

    /// The zero map of leaves `0..valid` (one bit per piece, set for a zero piece, least
    /// significant bit first, the pieces of leaf after leaf), as a state file stores it.
    /// Leaves from `valid` on are stored as zeros.
    pub fn zero_map(&self, valid: u64) -> Vec<u8> {
        let total = self.layout.piece_count();
        let mut words = self.zero.clone();
        for i in 0..self.kind.len() as u64 {
            if i >= valid || self.kind(i) < HOT {
                set_ones(&mut words, i * self.per_leaf, self.layout.pieces_of(i));
            }
        }
        if !total.is_multiple_of(64)
            && let Some(last) = words.last_mut()
        {
            *last &= (1u64 << (total % 64)) - 1;
        }
        let mut map: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        map.truncate(total.div_ceil(8) as usize);
        map
    }

    /// Writes the digests of the non-zero pieces of leaves `0..valid`, in order: the
    /// last section of a state file.
    pub fn write_digests(&self, valid: u64, out: &mut dyn Write) -> io::Result<()> {
        for i in 0..valid.min(self.kind.len() as u64) {
            if self.kind(i) >= HOT {
                let raw = self.raw(i)?.ok_or_else(|| io::Error::other("piece digests went missing"))?;
                out.write_all(&raw)?;
            }
        }
        Ok(())
    }

    /// Rebuilds the pieces of leaves `0..valid` from a state's zero map and digests;
    /// `None` if they do not fit `layout`.
    pub fn decode(layout: Layout, valid: u64, map: &[u8], digests: Digests<'_>) -> Option<PieceTable> {
        let total = layout.piece_count();
        let dl = layout.hash.digest_len() as u64;
        if map.len() as u64 != total.div_ceil(8) {
            return None;
        }
        let mut table = PieceTable::new(layout);
        for (w, chunk) in table.zero.iter_mut().zip(map.chunks(8)) {
            let mut bytes = [0u8; 8];
            bytes[..chunk.len()].copy_from_slice(chunk);
            *w = u64::from_le_bytes(bytes);
        }
        let len = match &digests {
            Digests::Bytes(b) => b.len() as u64,
            Digests::File { len, .. } => *len,
        };
        if !len.is_multiple_of(dl) {
            return None;
        }
        let mut next = 0u64;
        for i in 0..layout.leaf_count() {
            let nonzero = table.nonzero(i);
            if i < valid {
                table.decode_leaf(i, nonzero, next * dl, &digests)?;
            }
            next += nonzero;
        }
        if next * dl != len {
            return None;
        }
        if let Digests::File { file, .. } = digests {
            table.loaded = Some(file);
        }
        Some(table)
    }

    /// Leaf `i`, with `nonzero` digests at `from` in `digests`.
    fn decode_leaf(&mut self, i: u64, nonzero: u64, from: u64, digests: &Digests<'_>) -> Option<()> {
        let to = from + nonzero * self.layout.hash.digest_len() as u64;
        if nonzero == 0 {
            self.kind[i as usize] = ZERO;
            return Some(());
        }
        match digests {
            Digests::Bytes(b) => {
                let d: Box<[u8]> = b.get(from as usize..to as usize)?.into();
                self.hot_bytes += d.len();
                self.hot.insert(i, d);
                self.kind[i as usize] = HOT;
            }
            Digests::File { offset, len, .. } => {
                (to <= *len).then_some(())?;
                self.cold(i, LOADED, offset + from);
            }
        }
        Some(())
    }
}

impl PartialEq for PieceTable {
    /// The same layout and the same pieces known for every leaf, wherever they are kept.
    fn eq(&self, other: &PieceTable) -> bool {
        self.layout == other.layout
            && (0..self.kind.len() as u64).all(|i| self.known(i) == other.known(i) && self.get(i) == other.get(i))
    }
}

impl Eq for PieceTable {}

/// Sets bits `at..at+count`.
fn set_ones(words: &mut [u64], at: u64, count: u64) {
    let mut k = at;
    let end = at + count;
    while k < end {
        let (w, b) = ((k / 64) as usize, k % 64);
        let n = (64 - b).min(end - k);
        words[w] |= mask(n) << b;
        k += n;
    }
}

/// The number of set bits `at..at+count`.
fn ones(words: &[u64], at: u64, count: u64) -> u64 {
    let (mut k, mut total) = (at, 0);
    let end = at + count;
    while k < end {
        let (w, b) = ((k / 64) as usize, k % 64);
        let n = (64 - b).min(end - k);
        total += ((words[w] >> b) & mask(n)).count_ones() as u64;
        k += n;
    }
    total
}

/// The lowest `n` bits (n ≤ 64).
fn mask(n: u64) -> u64 {
    if n >= 64 { u64::MAX } else { (1 << n) - 1 }
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

    fn encode(t: &PieceTable, valid: u64) -> (Vec<u8>, Vec<u8>) {
        let mut digests = Vec::new();
        t.write_digests(valid, &mut digests).unwrap();
        assert_eq!(t.nonzero_pieces(valid) * 32, digests.len() as u64);
        (t.zero_map(valid), digests)
    }

    fn sample() -> (Layout, Vec<u8>, PieceTable) {
        let l = layout();
        let mut data = vec![0u8; 10000];
        data[5000] = 1; // leaf 1, piece 0
        data[9999] = 2; // the last piece of the short last leaf
        let mut t = PieceTable::new(l);
        for leaf in 0..3 {
            t.set(leaf, &pieces(&l, leaf, &data));
        }
        (l, data, t)
    }

    #[test]
    fn pieces_round_trip_through_memory_and_the_state_encoding() {
        let (l, data, t) = sample();
        assert!(!PieceTable::new(l).known(0) && PieceTable::new(l).get(0).is_none());
        assert!(t.is_zero(0) && !t.is_zero(1) && !t.is_zero(2));
        for leaf in 0..3 {
            assert_eq!(t.get(leaf), Some(pieces(&l, leaf, &data)), "leaf {leaf}");
        }
        let (map, digests) = encode(&t, 3);
        assert_eq!(digests.len(), 2 * 32, "only the two pieces holding data keep a digest");
        assert_eq!(PieceTable::decode(l, 3, &map, Digests::Bytes(&digests)), Some(t));
        assert!(PieceTable::decode(l, 3, &map[1..], Digests::Bytes(&digests)).is_none());
        assert!(PieceTable::decode(l, 3, &map, Digests::Bytes(&digests[1..])).is_none());
        assert!(PieceTable::decode(l, 3, &map, Digests::Bytes(&digests[32..])).is_none());
    }

    #[test]
    fn leaves_past_the_valid_prefix_are_not_kept() {
        let (l, _, t) = sample();
        let (map, digests) = encode(&t, 2);
        let partial = PieceTable::decode(l, 2, &map, Digests::Bytes(&digests)).unwrap();
        assert!(partial.known(1) && !partial.known(2));
        assert_eq!(partial.get(1), t.get(1));
    }

    #[test]
    fn digests_past_the_budget_go_to_the_spill_file_and_come_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout { hash: HashAlgo::Blake3, buffer: 4096, chunk: Some(1024), fanout: 4, device_size: 1 << 20 };
        let mut t = PieceTable::new(l);
        t.budget = 1000;
        t.spill_in(dir.path());
        let leaf_pieces = |i: u64| -> Vec<Digest> {
            (0..4u64)
                .map(|k| {
                    if k == 2 {
                        HashAlgo::Blake3.zero_digest(1024)
                    } else {
                        HashAlgo::Blake3.digest(&[i as u8, k as u8, 7])
                    }
                })
                .collect()
        };
        for i in 0..l.leaf_count() {
            t.set(i, &leaf_pieces(i));
        }
        assert!(t.hot_bytes <= 1000, "{} bytes still in memory", t.hot_bytes);
        assert!(matches!(t.spill, Spill::Open(_, len) if len > 0), "{:?}", t.spill);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the spill file has no name");
        for i in 0..l.leaf_count() {
            assert_eq!(t.get(i), Some(leaf_pieces(i)), "leaf {i}");
        }
        // A spilled leaf set again, and one forgotten.
        t.set(3, &leaf_pieces(100));
        t.forget(4);
        assert_eq!(t.get(3), Some(leaf_pieces(100)));
        assert!(t.get(4).is_none());
        let (map, digests) = encode(&t, 4);
        let back = PieceTable::decode(l, 4, &map, Digests::Bytes(&digests)).unwrap();
        (0..4).for_each(|i| assert_eq!(back.get(i), t.get(i), "leaf {i}"));
    }

    #[test]
    fn digests_left_in_a_file_are_read_from_it() {
        let (l, _, t) = sample();
        let (map, digests) = encode(&t, 3);
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"prefix").unwrap();
        f.write_all(&digests).unwrap();
        let len = digests.len() as u64;
        let file = f.try_clone().unwrap();
        let back = PieceTable::decode(l, 3, &map, Digests::File { file, offset: 6, len }).unwrap();
        assert_eq!(back, t);
        let file = f.try_clone().unwrap();
        assert!(PieceTable::decode(l, 3, &map, Digests::File { file, offset: 6, len: len - 32 }).is_none());
    }

    #[test]
    fn bit_ranges_are_set_and_counted_across_word_boundaries() {
        for (at, count) in [(0u64, 0u64), (0, 64), (3, 2), (3, 13), (50, 30), (60, 70), (64, 64)] {
            let mut words = vec![0u64; 3];
            set_ones(&mut words, at, count);
            let expected: Vec<u64> = (at..at + count).collect();
            let got: Vec<u64> = (0..192).filter(|&k| words[(k / 64) as usize] & (1 << (k % 64)) != 0).collect();
            assert_eq!(got, expected, "{at}+{count}");
            assert_eq!(ones(&words, 0, 192), count);
            assert_eq!(ones(&words, at, count), count);
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
