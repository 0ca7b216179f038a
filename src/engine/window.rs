//! The request window: digest batches, piece digests, reads and checkpoints all in
//! flight at once, answered by the endpoint strictly in order and matched here to a
//! FIFO of what was asked. Memory is bounded by a budget on what pending replies and
//! kept data may hold.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{Direction, Fault, Params, Purpose};
use crate::block::{BlockFrame, Check};
use crate::device::Device;
use crate::digest_index::DigestIndex;
use crate::endpoint::Endpoint;
use crate::hash::{Digest, is_zero};
use crate::leaf_reader::Buf;
use crate::report::Reporter;
use crate::stamp::Role;
use crate::tree::{Layout, pieces_root};

/// What one comparison runs on: the local device and its digest index, the endpoint,
/// the run's parameters and where progress goes.
pub(super) struct Ctx<'a> {
    /// The local device.
    pub local: &'a Device,
    /// Its digest index (its state).
    pub index: &'a mut DigestIndex,
    /// The far endpoint, its device open.
    pub ep: &'a mut Endpoint,
    /// Hash, sizes, codec.
    pub params: &'a Params,
    /// Progress and logs.
    pub rep: &'a Reporter,
}

impl Ctx<'_> {
    /// The same context, lent for one phase of a run (the next phase takes it back).
    pub fn reborrow(&mut self) -> Ctx<'_> {
        Ctx { local: self.local, index: &mut *self.index, ep: &mut *self.ep, params: self.params, rep: self.rep }
    }

    /// The leaves of the run (its length is the layout's device size).
    pub fn layout(&self) -> Layout {
        *self.index.layout()
    }

    /// Verifies data from the endpoint against the device and its source digests, and
    /// writes it to the local receiver; returns the bytes written (zeros onto known zeros are
    /// not).
    pub fn write_local(&mut self, frame: BlockFrame) -> Result<u64, Fault> {
        let layout = self.layout();
        let block = frame
            .verify(layout.device_size, &layout)
            .map_err(|source| Fault::Verify { device: format!("local {}", self.local.path().display()), source })?;
        let issued = self.local.write_at(&block)?;
        self.index.wrote(&block, issued);
        if let Some(buf) = block.into_bytes() {
            crate::leaf_reader::recycle(buf);
        }
        Ok(issued)
    }
}

/// What a comparison found and did.
#[derive(Clone, Debug, Default)]
pub struct Comparison {
    /// Blocks compared.
    pub blocks: u64,
    /// Blocks that differed.
    pub differing: u64,
    /// Bytes of device data written to the receiver.
    pub written: u64,
    /// Tree nodes compared in a tree walk.
    pub nodes: u64,
    /// In a check, the differing byte ranges `(offset, len)`, adjacent ones merged.
    pub ranges: Vec<(u64, u64)>,
}

impl Comparison {
    /// Notes that `[offset, offset+len)` differs, merged with the range before it when
    /// they touch (leaves are compared in order).
    pub fn note_range(&mut self, offset: u64, len: u64) {
        match self.ranges.last_mut() {
            Some((o, l)) if *o + *l == offset => *l += len,
            _ => self.ranges.push((offset, len)),
        }
    }

    /// Bytes in the differing ranges.
    pub fn differing_bytes(&self) -> u64 {
        self.ranges.iter().map(|(_, l)| l).sum()
    }
}

/// A request whose reply has not been consumed yet.
pub(super) enum Pending {
    /// Digests of `count` leaves starting at leaf `first`.
    Digests { first: u64, count: u64 },
    /// Digests of the `unit`-sized pieces of a differing range (a leaf, or a piece of it),
    /// with ours to compare, for PUSH the range's data when it is at hand, and for a
    /// whole leaf the source's leaf digest that its pieces must make up.
    Pieces { offset: u64, len: usize, unit: usize, ours: Vec<Digest>, data: Option<Buf>, leaf: Option<Digest> },
    /// Data the local receiver (PULL) must check against the source's digests and write.
    Data { offset: u64, len: usize, check: Check },
    /// A checkpoint on the endpoint.
    Flushed,
}

impl Pending {
    /// Memory this entry holds or will receive, for the in-flight budget.
    fn cost(&self) -> u64 {
        match self {
            Pending::Digests { .. } | Pending::Flushed => 4096,
            Pending::Pieces { data, .. } => 4096 + data.as_ref().map_or(0, |d| d.len() as u64),
            Pending::Data { len, .. } => *len as u64,
        }
    }
}

/// A request not sent yet.
pub(super) enum Request {
    /// Digests of the `block`-sized pieces of a range.
    Digests { offset: u64, len: u64, block: u32 },
    /// Plain digests of the whole blocks of a range (the original's bitmap digests).
    BlockDigests { offset: u64, len: u64 },
    /// Data of a range.
    Read { offset: u64, len: u32 },
    /// Durable writes and a checkpoint.
    Flush,
}

/// Digest batches (HashBlocks requests) kept in flight.
pub(super) const WINDOW: usize = 4;
/// Bytes of device data covered by one digest batch.
const BATCH_BYTES: u64 = 16 << 20;
/// Memory that pending replies and kept data may hold; half of it when the endpoint
/// runs on a thread of this process, whose own reads then count in the same process
/// (its replies come back at once; `docs/design.md` has the A/B).
const BUDGET: u64 = 16 << 20;
/// How often long runs make their progress durable and save checkpoints.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(10);

/// Environment variable that shortens the checkpoint interval (milliseconds), so that
/// tests can interrupt a short run after a checkpoint.
pub const CHECKPOINT_ENV: &str = "BASYN_TEST_CHECKPOINT_MS";

/// How often long runs checkpoint: [`CHECKPOINT_EVERY`], or [`CHECKPOINT_ENV`].
pub(super) fn checkpoint_every() -> Duration {
    static EVERY: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *EVERY.get_or_init(|| {
        std::env::var(CHECKPOINT_ENV).ok().and_then(|v| v.parse().ok()).map_or(CHECKPOINT_EVERY, Duration::from_millis)
    })
}

/// Decides when a long run checkpoints.
pub(super) struct Checkpoints(Instant);

impl Checkpoints {
    /// The clock starts now.
    pub fn new() -> Checkpoints {
        Checkpoints(Instant::now())
    }

    /// True (and the clock restarts) when a checkpoint is due.
    pub fn due(&mut self) -> bool {
        if self.0.elapsed() < checkpoint_every() {
            return false;
        }
        self.0 = Instant::now();
        true
    }
}

/// One comparison in progress: its context, what is in flight, and what it did.
pub(super) struct Window<'a> {
    pub ctx: Ctx<'a>,
    pub purpose: Purpose,
    pub out: Comparison,
    pending: VecDeque<Pending>,
    follow: VecDeque<(Request, Pending)>,
    /// What the queued follow-ups cost.
    queued: u64,
    /// Digest batches read to make room, not yet taken by the main loop.
    ready: VecDeque<(u64, Vec<Digest>)>,
    inflight: u64,
    batches_out: usize,
    next_batch: u64,
    /// Digest batches are of plain block digests, not leaf digests.
    plain: bool,
    /// Leaves compared, from the first on (all of the run's unless told).
    leaves: u64,
    checkpoints: Checkpoints,
}

impl<'a> Window<'a> {
    /// An empty window over `ctx`.
    pub fn new(ctx: Ctx<'a>, purpose: Purpose) -> Window<'a> {
        let leaves = ctx.layout().leaf_count();
        Window {
            ctx,
            purpose,
            out: Comparison::default(),
            pending: VecDeque::new(),
            follow: VecDeque::new(),
            queued: 0,
            ready: VecDeque::new(),
            inflight: 0,
            batches_out: 0,
            next_batch: 0,
            plain: false,
            leaves,
            checkpoints: Checkpoints::new(),
        }
    }

    /// The same window, whose digest batches are the endpoint's plain block digests
    /// (the hash of each whole block, as the original's bitmap holds them).
    pub fn with_plain_batches(mut self) -> Window<'a> {
        self.plain = true;
        self
    }

    /// The same window, comparing only the first `leaves` leaves.
    pub fn first_leaves(mut self, leaves: u64) -> Window<'a> {
        self.leaves = leaves.min(self.leaves);
        self
    }

    /// The direction data flows, for SYNC.
    pub fn direction(&self) -> Option<Direction> {
        match self.purpose {
            Purpose::Sync(d) => Some(d),
            Purpose::Check => None,
        }
    }

    fn ask(&mut self, request: Request, p: Pending) -> Result<(), Fault> {
        let ep = &mut *self.ctx.ep;
        match request {
            Request::Digests { offset, len, block } => ep.ask_digests(offset, len, block)?,
            Request::BlockDigests { offset, len } => ep.ask_block_digests(offset, len)?,
            Request::Read { offset, len } => ep.ask_read(offset, len)?,
            Request::Flush => ep.ask_flush()?,
        }
        self.inflight += p.cost();
        self.pending.push_back(p);
        Ok(())
    }

    /// Queues a request that follows from a reply (piece digests, reads, a flush).
    pub fn follow_up(&mut self, request: Request, p: Pending) {
        self.queued += p.cost();
        self.follow.push_back((request, p));
    }

    /// [`BUDGET`], for this endpoint.
    fn budget(&self) -> u64 {
        if self.ctx.ep.in_process() { BUDGET / 2 } else { BUDGET }
    }

    /// Handles replies until what waits to be sent and what is in flight fit in the
    /// budget again (or nothing is in flight): a comparison that finds many differing
    /// leaves in a row holds no more of their data than [`BUDGET`]. Digest batches
    /// answered on the way are kept for [`Window::next_digest_batch`].
    pub fn make_room(&mut self) -> Result<(), Fault> {
        loop {
            self.send_follow_ups()?;
            if self.inflight + self.queued <= self.budget() || !self.take_reply()? {
                return Ok(());
            }
        }
    }

    /// Takes the oldest reply, if any request is outstanding (false if none is): a
    /// digest batch is kept for [`Window::next_digest_batch`], anything else is acted on.
    fn take_reply(&mut self) -> Result<bool, Fault> {
        let Some(p) = self.pending.pop_front() else { return Ok(false) };
        self.inflight -= p.cost();
        if let Pending::Digests { first, count } = p {
            self.batches_out -= 1;
            let digests = self.ctx.ep.digests(self.ctx.params.hash, count as usize)?;
            self.ready.push_back((first, digests));
            return Ok(true);
        }
        self.handle(p)?;
        self.maybe_checkpoint()?;
        Ok(true)
    }

    /// Keeps up to [`WINDOW`] batches of leaf digests requested from the endpoint, once
    /// no follow-up request is waiting.
    fn ask_digest_batches(&mut self) -> Result<(), Fault> {
        let layout = self.ctx.layout();
        let batch = (BATCH_BYTES / layout.buffer).max(1);
        let batches = self.leaves.div_ceil(batch);
        while self.follow.is_empty() && self.next_batch < batches && self.batches_out < WINDOW {
            let first = self.next_batch * batch;
            let count = batch.min(self.leaves - first);
            let offset = first * layout.buffer;
            let len = ((first + count) * layout.buffer).min(layout.device_size) - offset;
            let request = match self.plain {
                true => Request::BlockDigests { offset, len },
                false => Request::Digests { offset, len, block: layout.buffer as u32 },
            };
            self.ask(request, Pending::Digests { first, count })?;
            self.batches_out += 1;
            self.next_batch += 1;
        }
        Ok(())
    }

    /// Drives requests and replies until the next batch of the endpoint's leaf digests
    /// arrives, handling the replies to follow-up requests on the way; `None` once
    /// everything is answered.
    pub fn next_digest_batch(&mut self) -> Result<Option<(u64, Vec<Digest>)>, Fault> {
        loop {
            if let Some(batch) = self.ready.pop_front() {
                return Ok(Some(batch));
            }
            self.send_follow_ups()?;
            self.ask_digest_batches()?;
            if !self.take_reply()? {
                return Ok(None);
            }
        }
    }

    /// Sends queued follow-up requests as far as the in-flight budget allows.
    fn send_follow_ups(&mut self) -> Result<(), Fault> {
        while let Some((_, p)) = self.follow.front() {
            if self.inflight + p.cost() > self.budget() && !self.pending.is_empty() {
                break;
            }
            let Some((request, p)) = self.follow.pop_front() else { break };
            self.queued -= p.cost();
            self.ask(request, p)?;
        }
        Ok(())
    }

    /// Processes replies until at most `keep` requests are outstanding.
    pub fn drain(&mut self, keep: usize) -> Result<(), Fault> {
        loop {
            self.send_follow_ups()?;
            if self.pending.len() + self.follow.len() <= keep || !self.take_reply()? {
                return Ok(());
            }
        }
    }

    /// Takes the reply to `p` from the endpoint and acts on it.
    fn handle(&mut self, p: Pending) -> Result<(), Fault> {
        match p {
            Pending::Digests { .. } => Err(Fault::Internal("digest batch handled as a follow-up")),
            Pending::Flushed => Ok(self.ctx.ep.flushed()?),
            Pending::Pieces { offset, len, unit, ours, data, leaf } => {
                let theirs = self.ctx.ep.digests(self.ctx.params.hash, ours.len())?;
                self.refine(offset, len, unit, (&ours, &theirs), data, leaf)
            }
            Pending::Data { offset, len, check } => {
                let frame = self.ctx.ep.data(offset, len)?;
                self.out.written += self.ctx.write_local(BlockFrame { check, ..frame })?;
                Ok(())
            }
        }
    }

    /// Sends (PUSH) or asks for (PULL) `[offset, offset+len)`, whose source digests are
    /// `check`, taking PUSH data from `data` (which starts at `offset`) when given.
    pub fn transfer(&mut self, offset: u64, len: usize, data: Option<&[u8]>, check: Check) -> Result<(), Fault> {
        match self.purpose {
            Purpose::Sync(Direction::Push) => {
                let owned;
                let bytes = match data {
                    Some(d) => &d[..len],
                    None => {
                        let mut buf = vec![0u8; len];
                        self.ctx.local.read_at(offset, &mut buf)?;
                        owned = buf;
                        &owned[..]
                    }
                };
                for frame in self.frames(offset, bytes, check)? {
                    self.ctx.ep.write(frame)?;
                }
                self.out.written += len as u64;
            }
            Purpose::Sync(Direction::Pull) => {
                self.follow_up(Request::Read { offset, len: len as u32 }, Pending::Data { offset, len, check });
            }
            Purpose::Check => {}
        }
        Ok(())
    }

    /// The frames that carry `bytes` (found at `offset`, whose source digests are
    /// `check`): runs of all-zero pieces as zero tokens, the rest as data, so that zeros
    /// never cross as bytes. A whole leaf with zero pieces is split into its pieces, whose
    /// digests must make up the leaf digest the comparison used.
    fn frames(&self, offset: u64, bytes: &[u8], check: Check) -> Result<Vec<BlockFrame>, Fault> {
        let codec = self.ctx.params.codec;
        let layout = self.ctx.layout();
        let (unit, digests) = match check {
            Check::Leaves(d) if d.len() == 1 => {
                let piece = layout.piece() as usize;
                if bytes.len() <= piece || !bytes.chunks(piece).any(is_zero) {
                    return Ok(vec![BlockFrame::encode(offset, bytes, codec, Check::Leaves(d))]);
                }
                let pieces = layout.hash.digest_pieces(bytes, piece);
                if pieces_root(&layout, &pieces) != d[0] {
                    let device = format!("local {}", self.ctx.local.path().display());
                    return Err(Fault::SourceChanged { device, offset, len: bytes.len() as u64 });
                }
                (piece, pieces)
            }
            Check::Pieces { unit, digests } => (unit as usize, digests),
            other => return Ok(vec![BlockFrame::encode(offset, bytes, codec, other)]),
        };
        let unit = unit.max(1);
        let zero: Vec<bool> = bytes.chunks(unit).map(is_zero).collect();
        let mut frames = Vec::new();
        let mut start = 0;
        while start < zero.len() {
            let end = (start..zero.len()).find(|&k| zero[k] != zero[start]).unwrap_or(zero.len());
            let (from, to) = (start * unit, (end * unit).min(bytes.len()));
            let check = Check::Pieces { unit: unit as u32, digests: digests[start..end].to_vec() };
            frames.push(BlockFrame::encode(offset + from as u64, &bytes[from..to], codec, check));
            start = end;
        }
        Ok(frames)
    }

    /// Every [`CHECKPOINT_EVERY`], makes progress durable on both sides and saves
    /// checkpoints, so that an interrupted run resumes from there.
    pub fn maybe_checkpoint(&mut self) -> Result<(), Fault> {
        if !self.checkpoints.due() {
            return Ok(());
        }
        let role = if self.purpose == Purpose::Sync(Direction::Pull) { Role::Receiver } else { Role::Read };
        self.ctx.index.checkpoint(self.ctx.local, role)?;
        self.follow_up(Request::Flush, Pending::Flushed);
        Ok(())
    }
}
