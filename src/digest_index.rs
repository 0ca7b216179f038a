//! The device's digest index during a run: what one side knows about its device's leaf
//! and piece digests, loaded from a fresh `.basyn-state`, learned by reading, or
//! computed from what it wrote. It answers without reading whatever it already knows,
//! and saves the state (checkpoints and at the end) only with digests that are provably
//! on disk.

use std::collections::{BTreeMap, BTreeSet};

use crate::block::VerifiedBlock;
use crate::device::{Device, DeviceError};
use crate::hash::Digest;
use crate::leaf_reader::{self, Data};
use crate::piece_table::PieceTable;
use crate::protocol::{StateMode, StateOptions};
use crate::stamp::{self, Freshness, Role, Stamp};
use crate::state::{self, State, StateError, StateFile};
use crate::tree::{Layout, Tree, leaf_digest, pieces_root, zero_leaf_digest};

/// Why a checkpoint or the end of a run could not be recorded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SaveError {
    /// Making the writes durable, or reading back what was written, failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The state file could not be saved or removed.
    #[error(transparent)]
    State(#[from] StateError),
}

/// A leaf written this run, not yet durable.
#[derive(Clone, Debug)]
struct Pending {
    /// The leaf's piece digests after the writes, except `dirty` ones; `None` if the
    /// leaf's pieces were not known before a partial write.
    pieces: Option<Vec<Digest>>,
    /// Pieces written only in part: their digests are read back once durable.
    dirty: BTreeSet<usize>,
}

/// Most memory the digest tables of one device may take (leaves, and chunks with
/// `--chunk`): with the default 2 MiB blocks that is 32 TiB of device.
const MAX_TABLE: u64 = 512 << 20;

/// The digests one side knows about its device.
#[derive(Debug)]
pub struct DigestIndex {
    file: Option<StateFile>,
    layout: Layout,
    device_path: String,
    leaves: Vec<u8>,
    known: Vec<bool>,
    /// The leaves' piece digests, sparse: zero pieces cost a bit.
    pieces: PieceTable,
    pending: BTreeMap<u64, Pending>,
    start: Option<Stamp>,
    /// Upper bound of the sectors basyn's own writes can add to a block device's
    /// counters (each write rounded out to whole pages).
    own_sectors: u64,
    fresh: bool,
    note: String,
    tree: Option<Tree>,
    /// Why the state could not be saved, if it could not: a warning for a run, whose data
    /// result stands, and an error for `basyn index`.
    unsaved: Option<StateError>,
    /// A dry run: the state is used, but never saved, checkpointed or removed.
    read_only: bool,
    /// The stamp of the state file on disk when it holds exactly what this index knows
    /// (loaded whole, or just saved, and nothing learnt or written since): saving it
    /// again with the same stamp would write the same bytes, so it is skipped.
    on_disk: Option<Stamp>,
}

/// Which state file `opts` names for `device` (`None`: no state), whether its
/// directory may be made, and what moving an old state from beside an image did.
fn state_path(
    device: &Device,
    opts: &StateOptions,
    read_only: bool,
) -> Option<(std::path::PathBuf, bool, Option<String>)> {
    let (path, create_dir) = match &opts.mode {
        StateMode::Off => return None,
        StateMode::Default => (state::default_path(device.path()), true),
        StateMode::DefaultIn(dir) => (state::default_path_in(Some(dir), device.path()), true),
        StateMode::Path(p) => return Some((p.clone(), false, None)),
    };
    if device.kind() != crate::device::Kind::File {
        return Some((path, create_dir, None));
    }
    let (path, moved) = state::adopt_legacy(device.path(), &path, read_only);
    Some((path, create_dir, moved))
}

impl DigestIndex {
    /// Opens (and locks) the state of `device` for a run with `layout`, and decides
    /// what of it can be trusted. A lock held by another basyn is an error; a missing,
    /// corrupt, foreign, mismatched or stale state is only noted and rebuilt. Leaves the
    /// device is known to hold zeros in (a file basyn just created or grew, a device
    /// declared zero) are known without reading.
    pub fn open(device: &Device, layout: Layout, opts: &StateOptions) -> Result<DigestIndex, StateError> {
        let mut index = DigestIndex::open_state(device, layout, opts, false)?;
        index.learn_known_zeros(device);
        Ok(index)
    }

    /// [`DigestIndex::open`] for a dry run: what the state says is used, but nothing is
    /// ever written to the state file (nor its directory made), nor is it removed.
    pub fn open_read_only(device: &Device, layout: Layout, opts: &StateOptions) -> Result<DigestIndex, StateError> {
        let mut index = DigestIndex::open_state(device, layout, opts, true)?;
        index.learn_known_zeros(device);
        Ok(index)
    }

    /// Refuses a layout whose digest tables would not fit in memory, before anything is
    /// opened for writing.
    pub fn check_size(layout: &Layout, device: &std::path::Path) -> Result<(), StateError> {
        // The piece digests are not counted: they take room only for pieces holding data
        // (0.2% of it with BLAKE3 and 16 KiB pieces).
        let n = layout.leaf_count();
        let dl = layout.hash.digest_len() as u64;
        let table = n.saturating_mul(dl);
        if table > MAX_TABLE {
            return Err(StateError::TooManyLeaves {
                device: device.display().to_string(),
                leaves: n,
                buffer: layout.buffer,
                mib: table >> 20,
            });
        }
        Ok(())
    }

    fn learn_known_zeros(&mut self, device: &Device) {
        let from = device.known_zero_from();
        if from >= self.layout.device_size {
            return;
        }
        for leaf in from.div_ceil(self.layout.buffer)..self.layout.leaf_count() {
            if self.leaf(leaf).is_none() {
                let (d, _) = zero_leaf_digest(&self.layout, self.layout.leaf_len(leaf));
                self.learn(leaf, &d, &[]);
                self.pieces.set_zero(leaf);
            }
        }
        // Every leaf known without reading: as good as a fresh state for this run.
        self.fresh |= self.known.iter().all(|k| *k);
    }

    fn open_state(
        device: &Device,
        layout: Layout,
        opts: &StateOptions,
        read_only: bool,
    ) -> Result<DigestIndex, StateError> {
        DigestIndex::check_size(&layout, device.path())?;
        let n = layout.leaf_count() as usize;
        let dl = layout.hash.digest_len();
        let mut ledger = DigestIndex {
            file: None,
            layout,
            // Absolute, so that `basyn state list` finds the device from anywhere.
            device_path: std::fs::canonicalize(device.path())
                .unwrap_or_else(|_| device.path().to_path_buf())
                .display()
                .to_string(),
            leaves: vec![0; n * dl],
            known: vec![false; n],
            pieces: PieceTable::new(layout),
            pending: BTreeMap::new(),
            start: None,
            own_sectors: 0,
            fresh: false,
            note: "no state (--no-state)".into(),
            tree: None,
            unsaved: None,
            read_only,
            on_disk: None,
        };
        let Some((path, create_dir, moved)) = state_path(device, opts, read_only) else {
            // Stamped even without a state file, so that a source written during the run
            // is still reported; a device that cannot be stamped is not checked.
            ledger.start = stamp::take(device).ok();
            return Ok(ledger);
        };
        // Never replace a file that is not a state: not the device, not anyone's file. At
        // basyn's own default name a corrupt file is a corrupt state, rebuilt; a link or a
        // non-regular file is never replaced.
        match opts.mode {
            StateMode::Path(_) => state::check_path(&path)?,
            _ => state::check_kind(&path)?,
        }
        device.try_lock().map_err(|e| match e {
            std::fs::TryLockError::WouldBlock => StateError::Locked(device.path().display().to_string()),
            std::fs::TryLockError::Error(source) => StateError::Io { path: path.display().to_string(), source },
        })?;
        let file = StateFile::at(&path, create_dir && !read_only)?;
        let shown = path.display().to_string();
        let start = stamp::take(device).map_err(|source| StateError::Io { path: shown.clone(), source })?;
        ledger.start = Some(start.clone());
        let note = match file.load() {
            Ok(None) => format!("state {shown}: none yet, building it"),
            Err(e) => format!("{e}; rebuilding it"),
            Ok(Some(saved)) if saved.layout != layout => {
                format!("state {shown} was built with {}, this run uses {layout}; rebuilding it", saved.layout)
            }
            Ok(Some(saved)) => match stamp::compare(&saved.stamp, &start) {
                Freshness::Fresh => ledger.adopt(saved, &shown, "fresh"),
                Freshness::Unverifiable(why) if opts.trust => ledger.adopt(saved, &shown, &format!("trusted ({why})")),
                Freshness::Unverifiable(why) => {
                    format!("state {shown} cannot be verified ({why}); rebuilding it (--trust-state would use it)")
                }
                Freshness::Stale(why) => format!("state {shown} is stale: the device {why}; rebuilding it"),
            },
        };
        ledger.note = match moved {
            Some(moved) => format!("{moved}; {note}"),
            None => note,
        };
        // Piece digests past the memory budget wait beside the state they will go into.
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        ledger.pieces.spill_in(dir);
        ledger.file = Some(file);
        Ok(ledger)
    }

    fn adopt(&mut self, saved: State, shown: &str, how: &str) -> String {
        let valid = saved.valid_leaves as usize;
        let dl = self.layout.hash.digest_len();
        self.leaves[..valid * dl].copy_from_slice(&saved.leaves[..valid * dl]);
        self.known[..valid].fill(true);
        self.pieces = saved.pieces;
        self.fresh = valid == self.known.len();
        self.on_disk = self.fresh.then_some(saved.stamp);
        if self.fresh {
            format!("state {shown}: {how}, {valid} leaves")
        } else {
            format!("state {shown}: {how} checkpoint, {valid} of {} leaves confirmed", self.known.len())
        }
    }

    /// What happened to the state file, for `--verbose`.
    pub fn note(&self) -> &str {
        &self.note
    }

    /// The run's parameters.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// True if a saved state was loaded that describes the whole device.
    pub fn fresh(&self) -> bool {
        self.fresh
    }

    /// True if a state file is in use.
    pub fn enabled(&self) -> bool {
        self.file.is_some()
    }

    /// Leaf `i`'s digest, if known without reading.
    pub fn leaf(&self, i: u64) -> Option<Digest> {
        let i = i as usize;
        let dl = self.layout.hash.digest_len();
        (*self.known.get(i)?).then(|| Digest::from_slice(&self.leaves[i * dl..(i + 1) * dl]))
    }

    /// Leaf `i`'s piece digests, if known without reading.
    pub fn pieces(&self, i: u64) -> Option<Vec<Digest>> {
        self.leaf(i)?;
        self.pieces.get(i)
    }

    /// True if `[offset, offset + len)`, within one leaf and on its piece boundaries
    /// (the end may be the leaf's), is known to hold only zeros: answered without reading.
    pub fn known_zero(&self, offset: u64, len: u64) -> bool {
        let (b, piece) = (self.layout.buffer, self.layout.piece());
        let leaf = offset / b;
        let (start, leaf_len) = (leaf * b, self.layout.leaf_len(leaf));
        let (from, to) = (offset - start, offset - start + len);
        let aligned = from.is_multiple_of(piece) && (to.is_multiple_of(piece) || to == leaf_len);
        len > 0
            && to <= leaf_len
            && aligned
            && self.leaf(leaf).is_some()
            && self.pieces.pieces_zero(leaf, from / piece, (to - from).div_ceil(piece))
    }

    /// Records leaf `i`'s digest and, when given one per piece, its piece digests, as
    /// just read or made durable.
    pub fn learn(&mut self, i: u64, digest: &Digest, pieces: &[Digest]) {
        let idx = i as usize;
        if idx >= self.known.len() || self.pending.contains_key(&i) {
            return;
        }
        let dl = self.layout.hash.digest_len();
        self.leaves[idx * dl..(idx + 1) * dl].copy_from_slice(digest.as_bytes());
        self.known[idx] = true;
        self.pieces.set(i, pieces);
        self.tree = None;
        self.on_disk = None;
    }

    /// Learns the leaves that `data`, just read at `offset`, covers entirely.
    pub fn observe(&mut self, offset: u64, data: &[u8]) {
        let layout = self.layout;
        let read = whole_leaves(&layout, offset, data, |leaf| self.leaf(leaf).is_none());
        self.learn_new(read);
    }

    /// Learns those of `leaves` (index, digest, piece digests) it does not know yet.
    pub fn learn_new(&mut self, leaves: Vec<(u64, Digest, Vec<Digest>)>) {
        for (leaf, d, pieces) in leaves {
            if self.leaf(leaf).is_none() {
                self.learn(leaf, &d, &pieces);
            }
        }
    }

    /// Records that `block` was written (`issued` bytes of it reached the device: zeros
    /// onto zeros are not written): the touched leaves are unknown until
    /// [`DigestIndex::durable`], then take the digests of what was written.
    pub fn wrote(&mut self, block: &VerifiedBlock, issued: u64) {
        let offset = block.offset();
        let b = self.layout.buffer;
        let end = block.end();
        self.on_disk = None;
        const PAGE: u64 = 4096;
        if issued > 0 {
            self.own_sectors += (end.div_ceil(PAGE) * PAGE - offset / PAGE * PAGE) / 512;
        }
        let first = offset / b;
        let last = end.saturating_sub(1) / b;
        if block.is_empty() || first >= self.known.len() as u64 {
            return;
        }
        let last = last.min(self.known.len() as u64 - 1);
        if self.file.is_none() {
            // Nothing will be saved: only forget what the written leaves held.
            for leaf in first..=last {
                self.known[leaf as usize] = false;
                self.pieces.forget(leaf);
            }
            self.tree = None;
            return;
        }
        for leaf in first..=last {
            let (leaf_start, leaf_len) = self.layout.leaf_span(leaf);
            let leaf_end = leaf_start + leaf_len;
            let (from, to) = (offset.max(leaf_start), end.min(leaf_end));
            let update = if from == leaf_start && to == leaf_end {
                let p = self.layout.piece();
                let pieces = (0..self.layout.pieces_of(leaf))
                    .map(|k| {
                        let ps = leaf_start + k * p;
                        block.piece_digest(&self.layout, ps, (ps + p).min(leaf_end))
                    })
                    .collect();
                Pending { pieces: Some(pieces), dirty: Default::default() }
            } else {
                self.partial_write(leaf, block, from, to)
            };
            self.known[leaf as usize] = false;
            self.pieces.forget(leaf);
            self.pending.insert(leaf, update);
        }
        self.tree = None;
    }

    /// A write inside one leaf: pieces it covers whole get the digests of the written
    /// data, and so do pieces it covers in part where the rest was known to be zero;
    /// other pieces it covers in part are dirty, read back once durable. If the leaf's
    /// pieces were not known, the whole leaf is.
    fn partial_write(&mut self, leaf: u64, block: &VerifiedBlock, from: u64, to: u64) -> Pending {
        let leaf_start = leaf * self.layout.buffer;
        let (at, end) = (from - leaf_start, to - leaf_start);
        let p = self.layout.piece();
        let count = self.layout.pieces_of(leaf) as usize;
        let leaf_len = self.layout.leaf_len(leaf);
        let mut update = match self.pending.remove(&leaf) {
            Some(before) => before,
            None => Pending { pieces: self.pieces(leaf), dirty: Default::default() },
        };
        let Some(pieces) = update.pieces.as_mut().filter(|v| v.len() == count) else {
            return Pending { pieces: None, dirty: Default::default() };
        };
        for k in (at / p)..end.div_ceil(p) {
            let (ps, pe) = (k * p, ((k + 1) * p).min(leaf_len));
            let zero = self.layout.hash.zero_digest((pe - ps) as usize);
            if at <= ps && end >= pe {
                pieces[k as usize] = block.piece_digest(&self.layout, leaf_start + ps, leaf_start + pe);
                update.dirty.remove(&(k as usize));
            } else if pieces[k as usize] == zero && !update.dirty.contains(&(k as usize)) {
                // The rest of the piece is known to be zero: its new content is known
                // (zeros written over it leave it zero).
                if let Some(data) = block.bytes() {
                    let mut whole = vec![0u8; (pe - ps) as usize];
                    let (from, to) = (at.max(ps), end.min(pe));
                    // Leaf offsets as offsets into the block (which may start in an
                    // earlier leaf).
                    let at_block = |x: u64| (leaf_start + x - block.offset()) as usize;
                    whole[(from - ps) as usize..(to - ps) as usize]
                        .copy_from_slice(&data[at_block(from)..at_block(to)]);
                    pieces[k as usize] = self.layout.hash.digest(&whole);
                }
            } else {
                update.dirty.insert(k as usize);
            }
        }
        update
    }

    /// The writes so far are durable (after fdatasync): their digests become known.
    ///
    /// A leaf patched piece by piece without chunk digests to follow is read back (it was
    /// just written, so this mostly hits the page cache): what is recorded is what the
    /// device holds, never what basyn meant to write.
    pub fn durable(&mut self, device: &Device) -> Result<(), DeviceError> {
        let mut buf = Vec::new();
        let p = self.layout.piece();
        for (leaf, update) in std::mem::take(&mut self.pending) {
            match update.pieces {
                Some(mut pieces) => {
                    let leaf_len = self.layout.leaf_len(leaf);
                    for k in update.dirty {
                        let (ps, pe) = (k as u64 * p, ((k as u64 + 1) * p).min(leaf_len));
                        buf.resize((pe - ps) as usize, 0);
                        device.read_at(leaf * self.layout.buffer + ps, &mut buf)?;
                        pieces[k] = self.layout.hash.digest(&buf);
                    }
                    let digest = pieces_root(&self.layout, &pieces);
                    self.learn(leaf, &digest, &pieces);
                }
                // Without a state file nobody needs the digest: leave it unknown.
                None if self.file.is_none() => {}
                None => {
                    self.read_leaf(device, leaf, &mut buf)?;
                }
            }
        }
        Ok(())
    }

    /// All leaf digests, when every leaf is known.
    pub fn complete_leaves(&self) -> Option<Vec<u8>> {
        self.known.iter().all(|k| *k).then(|| self.leaves.clone())
    }

    /// The tree, when every leaf is known.
    pub fn tree(&mut self) -> Option<&Tree> {
        if self.known.iter().any(|k| !k) {
            return None;
        }
        if self.tree.is_none() {
            self.tree = Some(Tree::from_leaf_bytes(self.layout.hash, self.layout.fanout as usize, self.leaves.clone()));
        }
        self.tree.as_ref()
    }

    /// Leaves confirmed from the first on: known, and with a chunk table, their chunk
    /// digests known too (a state never claims chunk digests it does not have). Loaded
    /// from a checkpoint, it is how far the interrupted run had come.
    pub fn valid_prefix(&self) -> u64 {
        (0..self.known.len()).take_while(|&i| self.known[i] && self.pieces.known(i as u64)).count() as u64
    }

    /// Saves the confirmed prefix. The tables are lent to the state being written, not
    /// copied: a checkpoint of a large device costs no memory.
    fn save(&mut self, stamp: Stamp) -> Result<(), StateError> {
        let Some(file) = self.file.as_ref().filter(|_| !self.read_only) else { return Ok(()) };
        if self.on_disk.as_ref() == Some(&stamp) {
            return Ok(());
        }
        let state = State {
            layout: self.layout,
            device_path: self.device_path.clone(),
            stamp,
            valid_leaves: self.valid_prefix(),
            leaves: std::mem::take(&mut self.leaves),
            pieces: std::mem::replace(&mut self.pieces, PieceTable::new(Layout { device_size: 0, ..self.layout })),
        };
        let saved = file.save(&state);
        (self.leaves, self.pieces) = (state.leaves, state.pieces);
        if saved.is_ok() && state.valid_leaves == self.known.len() as u64 {
            self.on_disk = Some(state.stamp);
        }
        saved
    }

    /// A receiver's writes so far are made durable (fdatasync) and their digests known;
    /// nothing to do for a device only read.
    pub fn settle(&mut self, device: &Device, role: Role) -> Result<(), DeviceError> {
        if role == Role::Receiver {
            device.sync()?;
            self.durable(device)?;
        }
        Ok(())
    }

    /// True if someone other than basyn wrote the device since the run began (for a
    /// regular-file receiver: opened it, see [`Device::opened_by_others`]).
    fn written_by_others(&self, device: &Device, now: &Stamp, role: Role) -> bool {
        (role == Role::Receiver && device.opened_by_others())
            || self.start.as_ref().is_some_and(|start| stamp::written_by_others(start, now, role, self.own_sectors))
    }

    /// Settles the writes so far and saves what is confirmed, so that an interrupted
    /// run resumes from here. Nothing is saved if someone else wrote the device.
    pub fn checkpoint(&mut self, device: &Device, role: Role) -> Result<(), SaveError> {
        self.settle(device, role)?;
        if self.file.is_none() || self.start.is_none() {
            return Ok(());
        }
        let now = self.stamp_now(device)?;
        if !self.written_by_others(device, &now, role)
            && let Err(e) = self.save(now)
        {
            self.unsaved = Some(e);
        }
        Ok(())
    }

    /// Ends the run: settles the writes and saves the state stamped now. Returns
    /// `Ok(false)`, and removes the state instead, if someone else wrote the device
    /// during the run (see [`stamp::written_by_others`]).
    pub fn finish(&mut self, device: &Device, role: Role) -> Result<bool, SaveError> {
        self.settle(device, role)?;
        if self.start.is_none() {
            return Ok(true);
        }
        let now = self.stamp_now(device)?;
        if self.written_by_others(device, &now, role) {
            if let Some(file) = self.file.as_ref().filter(|_| !self.read_only) {
                file.remove()?;
                self.note =
                    format!("state {} removed: the device was written by another process", file.path().display());
            }
            return Ok(false);
        }
        // A state that cannot be saved costs the next run a read, nothing more: what is
        // on disk is the old state (or a checkpoint), whose stamp no longer matches a
        // device this run changed. The caller says so.
        let as_it_was = self.on_disk.as_ref() == Some(&now);
        match self.save(now) {
            Ok(()) => self.unsaved = None,
            Err(e) => self.unsaved = Some(e),
        }
        if let (Some(file), None, false) = (&self.file, &self.unsaved, self.read_only) {
            let (n, path) = (self.known.len(), file.path().display());
            self.note = match as_it_was {
                true => format!("state {path} left as it was: it holds all {n} leaves"),
                false => format!("state {path} saved: {} of {n} leaves", self.valid_prefix()),
            };
        }
        Ok(true)
    }

    /// Why the state could not be saved at the last checkpoint or at the end, if so.
    pub fn unsaved(&self) -> Option<&StateError> {
        self.unsaved.as_ref()
    }

    /// [`DigestIndex::unsaved`], taken.
    pub fn take_unsaved(&mut self) -> Option<StateError> {
        self.unsaved.take()
    }

    /// Reads every leaf not known yet; `progress` is told each leaf's length as it is
    /// passed. Returns the number of leaves read.
    pub fn fill(&mut self, device: &Device, mut progress: impl FnMut(u64)) -> Result<u64, DeviceError> {
        let layout = self.layout;
        let skip: Vec<bool> = (0..layout.leaf_count()).map(|leaf| self.leaf(leaf).is_some()).collect();
        std::thread::scope(|scope| {
            // Read and hashed on every core, learnt in order.
            let leaves = leaf_reader::spawn(
                scope,
                device,
                layout,
                0..layout.leaf_count(),
                skip,
                move |offset, data| match data {
                    Data::Skipped => None,
                    Data::Zero => Some(zero_leaf_digest(&layout, layout.leaf_len(offset / layout.buffer))),
                    Data::Read(bytes) => Some(leaf_digest(&layout, &bytes)),
                },
            );
            let mut read = 0;
            for leaf in leaves {
                let leaf = leaf?;
                if let Some((d, pieces)) = leaf.value {
                    self.learn(leaf.index, &d, &pieces);
                    read += 1;
                }
                progress(leaf.len as u64);
            }
            Ok(read)
        })
    }

    fn stamp_now(&self, device: &Device) -> Result<Stamp, StateError> {
        let shown = match &self.file {
            Some(f) => f.path().display().to_string(),
            None => self.device_path.clone(),
        };
        stamp::take(device).map_err(|source| StateError::Io { path: shown, source })
    }

    /// Reads leaf `leaf`, learns and returns its digests.
    pub fn read_leaf(
        &mut self,
        device: &Device,
        leaf: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(Digest, Vec<Digest>), DeviceError> {
        let (offset, len) = self.layout.leaf_span(leaf);
        if device.is_hole(offset, len) {
            let (d, pieces) = zero_leaf_digest(&self.layout, len);
            self.learn(leaf, &d, &pieces);
            return Ok((d, pieces));
        }
        buf.resize(len as usize, 0);
        device.read_at(offset, buf)?;
        let (d, chunks) = leaf_digest(&self.layout, buf);
        self.learn(leaf, &d, &chunks);
        Ok((d, chunks))
    }
}

/// The digests of the leaves that `data`, read at `offset`, covers entirely, for those
/// `wanted` says: what a read teaches a source's index.
pub fn whole_leaves(
    layout: &Layout,
    offset: u64,
    data: &[u8],
    wanted: impl Fn(u64) -> bool,
) -> Vec<(u64, Digest, Vec<Digest>)> {
    let b = layout.buffer;
    if !offset.is_multiple_of(b) {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (k, piece) in data.chunks(b as usize).enumerate() {
        let leaf = offset / b + k as u64;
        if piece.len() as u64 == layout.leaf_len(leaf) && wanted(leaf) {
            let (d, pieces) = leaf_digest(layout, piece);
            out.push((leaf, d, pieces));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{BlockFrame, Check};
    use crate::compress::Codec;
    use crate::device::Side;
    use crate::hash::HashAlgo;

    fn layout(size: u64, chunk: Option<u64>) -> Layout {
        Layout { hash: HashAlgo::Blake3, buffer: 8192, chunk, fanout: 4, device_size: size }
    }

    /// A 30000-byte image of `fill` bytes in a directory of its own, and its index with
    /// every leaf read (8 KiB leaves, `chunk` pieces).
    fn indexed(fill: u8, chunk: Option<u64>) -> (tempfile::TempDir, Device, Layout, DigestIndex) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        std::fs::write(&p, vec![fill; 30000]).unwrap();
        let dev = Device::open_read(&p, Side::Local).unwrap();
        let l = layout(30000, chunk);
        let mut ledger = DigestIndex::open(&dev, l, &StateOptions { mode: StateMode::Default, trust: false }).unwrap();
        let mut buf = Vec::new();
        for leaf in 0..l.leaf_count() {
            ledger.read_leaf(&dev, leaf, &mut buf).unwrap();
        }
        (dir, dev, l, ledger)
    }

    /// A block across a leaf boundary, covering pieces on both sides in part where they
    /// were known zero: the second leaf's piece was composed with an offset taken from
    /// the wrong leaf (an underflow, a panic in a debug build).
    #[test]
    fn a_write_across_a_leaf_boundary_over_known_zeros_is_composed_from_the_block() {
        for chunk in [None, Some(1024)] {
            let (_dir, dev, l, mut ledger) = indexed(0, chunk);
            let data: Vec<u8> = (1..=300u32).map(|i| i as u8).collect();
            let block = BlockFrame::encode(8000, &data, Codec::None, Check::None).verify(30000, &l).unwrap();
            ledger.wrote(&block, block.len() as u64);
            let mut image = vec![0u8; 30000];
            image[8000..8300].copy_from_slice(&data);
            // Not written to the file: the digests must come from the block and the
            // known zeros, not from a read-back.
            ledger.durable(&dev).unwrap();
            for leaf in 0..l.leaf_count() {
                let s = (leaf * 8192) as usize;
                let expect = leaf_digest(&l, &image[s..(s + 8192).min(image.len())]).0;
                assert_eq!(ledger.leaf(leaf), Some(expect), "chunk {chunk:?}, leaf {leaf}");
            }
        }
    }

    #[test]
    fn writes_become_known_only_when_durable_and_match_a_fresh_read() {
        // With the piece digests worked out ahead (as the serving side's workers do) or
        // not, the same digests are recorded.
        for (chunk, ahead) in [(None, false), (Some(1024), false), (None, true), (Some(1024), true)] {
            let (_dir, dev, l, mut ledger) = indexed(3, chunk);
            let p = dev.path().to_path_buf();
            // A whole-leaf write, a chunk write and an unaligned write.
            let writes: [(u64, Vec<u8>); 4] = [
                (8192, vec![9u8; 8192]),
                (16384 + 2048, vec![7u8; 1024]),
                (100, vec![1u8; 10]),
                (24576 - 1500, (0..3000u32).map(|i| (i % 251) as u8).collect()),
            ];
            let mut image = std::fs::read(&p).unwrap();
            for (off, data) in &writes {
                let mut block = BlockFrame::encode(*off, data, Codec::None, Check::None).verify(30000, &l).unwrap();
                if ahead {
                    block.digest_pieces(&l);
                }
                ledger.wrote(&block, block.len() as u64);
                image[*off as usize..*off as usize + data.len()].copy_from_slice(data);
            }
            std::fs::write(&p, &image).unwrap();
            assert_eq!(ledger.leaf(1), None, "not durable yet");
            ledger.durable(&dev).unwrap();
            let expect = |i: u64| {
                let s = (i * 8192) as usize;
                leaf_digest(&l, &image[s..(s + 8192).min(image.len())]).0
            };
            // Whole leaves and chunk writes over known chunks are computed from the data;
            // an unaligned write is read back: either way the ledger matches the device.
            for leaf in 0..l.leaf_count() {
                assert_eq!(ledger.leaf(leaf), Some(expect(leaf)), "leaf {leaf}");
            }
        }
    }
}
