//! SYNC and RECHECK: both sides digest their blocks in parallel (or take the digests
//! from a fresh state without reading), the client compares, and for SYNC only differing
//! blocks, or with `--chunk` only differing chunks, cross the wire. Requests are
//! windowed: digest batches, chunk digests, reads and checkpoints are all in flight at
//! once and answered in order. With both states fresh, the trees are walked instead,
//! one round trip per level, and nothing that is equal is ever read.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::pipeline::{self, Blocks};
use super::{Direction, Fault, Params};
use crate::device::Device;
use crate::endpoint::Endpoint;
use crate::hash::Digest;
use crate::ledger::{Ledger, Role, leaf_digest};
use crate::protocol::{BlockFrame, Frame, MAX_BLOCK, Message, ProtocolError, split_digests};
use crate::report::Reporter;

/// What to do with differing blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// Only count them (recheck).
    Check,
    /// Transfer them in this direction.
    Sync(Direction),
}

/// What a comparison found and did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Comparison {
    /// Blocks compared.
    pub blocks: u64,
    /// Blocks that differed.
    pub differing: u64,
    /// Bytes of device data written to the receiver.
    pub written: u64,
    /// Tree nodes compared in a tree walk.
    pub nodes: u64,
}

/// A request whose reply has not been consumed yet.
pub(super) enum Pending {
    /// Digests of `count` blocks starting at block `first`.
    Digests { first: u64, count: u64 },
    /// Digests of the `unit`-sized pieces of a differing range (a leaf, or a piece of it),
    /// with ours to compare and, for PUSH, the range's data when it is at hand.
    Chunks { offset: u64, len: usize, unit: usize, ours: Vec<Digest>, data: Option<Vec<u8>> },
    /// Data the local receiver (PULL) must write.
    Data { offset: u64, len: usize },
    /// A checkpoint on the endpoint.
    Flushed,
}

impl Pending {
    /// Memory this entry holds or will receive, for the in-flight budget.
    pub(super) fn cost(&self) -> u64 {
        match self {
            Pending::Digests { .. } | Pending::Flushed => 4096,
            Pending::Chunks { data, .. } => 4096 + data.as_ref().map_or(0, |d| d.len() as u64),
            Pending::Data { len, .. } => *len as u64,
        }
    }
}

/// Digest batches (HashBlocks requests) kept in flight.
pub(super) const WINDOW: usize = 4;
/// Bytes of device data covered by one digest batch.
const BATCH_BYTES: u64 = 16 << 20;
/// Memory that pending replies and kept data may hold.
const BUDGET: u64 = 64 << 20;
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

/// What the local reader thread delivers for one block.
pub(super) struct Local {
    /// Digest and chunk digests, if the block was read (else the ledger knows them).
    pub(super) read: Option<(Digest, Vec<Digest>)>,
    /// The data, when it may be needed and was read.
    pub(super) data: Option<Vec<u8>>,
}

/// One comparison in progress.
pub(super) struct Run<'a> {
    pub(super) local: &'a Device,
    pub(super) ledger: &'a mut Ledger,
    pub(super) ep: &'a mut Endpoint,
    pub(super) params: &'a Params,
    pub(super) purpose: Purpose,
    pub(super) rep: &'a Reporter,
    pub(super) pending: VecDeque<Pending>,
    pub(super) follow: VecDeque<(Message, Pending)>,
    pub(super) inflight: u64,
    pub(super) batches_out: usize,
    pub(super) out: Comparison,
    pub(super) last_checkpoint: Instant,
}

/// Compares `local` with the endpoint's device over `len` bytes, reading only what
/// neither the ledger nor the endpoint's state already knows.
pub fn run(
    local: &Device,
    ledger: &mut Ledger,
    ep: &mut Endpoint,
    len: u64,
    params: &Params,
    purpose: Purpose,
    rep: &Reporter,
) -> Result<Comparison, Fault> {
    let blocks = Blocks { len, block: params.buffer as u64 };
    let layout = *ledger.layout();
    // Data is kept to send it (PUSH) or to digest its pieces when refining; it lives only
    // as long as the block is in the reader's channel.
    let keep_data =
        matches!(purpose, Purpose::Sync(_)) && (params.refine.is_some() || purpose == Purpose::Sync(Direction::Push));
    let skip: Vec<bool> = (0..blocks.count()).map(|i| ledger.leaf(i).is_some()).collect();
    std::thread::scope(|scope| {
        let (local_rx, _reader) = pipeline::spawn(scope, local, blocks, skip, 8, move |_, data| match data {
            None => Local { read: None, data: None },
            Some(data) => {
                let (d, chunks) = leaf_digest(&layout, &data);
                Local { read: Some((d, chunks)), data: keep_data.then_some(data) }
            }
        });
        let mut run = Run::new(local, ledger, ep, params, purpose, rep);
        let mut next_batch = 0u64;
        while let Some((first, remote)) = run.next_digest_batch(blocks, &mut next_batch)? {
            for (k, theirs) in remote.into_iter().enumerate() {
                let item = local_rx.recv().map_err(|_| Fault::Internal("local reader stopped"))??;
                debug_assert_eq!(item.index, first + k as u64);
                let Local { read, data } = item.value;
                let ours = match read {
                    Some((d, chunks)) => {
                        run.ledger.learn(item.index, &d, &chunks);
                        d
                    }
                    None => run.ledger.leaf(item.index).ok_or(Fault::Internal("skipped leaf unknown"))?,
                };
                run.out.blocks += 1;
                rep.advance(item.len as u64);
                if ours == theirs {
                    if rep.debugging() {
                        rep.debug(format_args!("block {} @ {}: same", item.index, item.offset));
                    }
                    continue;
                }
                rep.debug(format_args!(
                    "block {} @ {} ({} bytes): differs (local {ours}, remote {theirs})",
                    item.index, item.offset, item.len
                ));
                run.differs(item.index, item.offset, item.len, data)?;
            }
            run.maybe_checkpoint()?;
        }
        Ok(run.out)
    })
}

/// Both states are fresh: walk the trees from the root, one batched round trip per
/// level, then transfer only the differing leaves. Nothing equal is read.
pub fn walk(
    local: &Device,
    ledger: &mut Ledger,
    ep: &mut Endpoint,
    len: u64,
    params: &Params,
    purpose: Purpose,
    rep: &Reporter,
) -> Result<Comparison, Fault> {
    let tree = ledger.tree().ok_or(Fault::Internal("walk without a fresh tree"))?.clone();
    let mut nodes = 0u64;
    let differing = tree.walk(|level, indices| {
        nodes += indices.len() as u64;
        ep.tree_nodes(params.hash, level, indices)
    })?;
    rep.debug(format_args!("tree walk: {nodes} nodes compared, {} leaves differ", differing.len()));
    let blocks = Blocks { len, block: params.buffer as u64 };
    let mut run = Run::new(local, ledger, ep, params, purpose, rep);
    run.out.nodes = nodes;
    run.out.blocks = blocks.count();
    rep.advance(len);
    for leaf in differing {
        let (offset, n) = blocks.span(leaf as u64);
        rep.debug(format_args!("block {leaf} @ {offset} ({n} bytes): differs (tree walk)"));
        run.differs(leaf as u64, offset, n, None)?;
        run.drain(WINDOW)?;
    }
    run.drain(0)?;
    Ok(run.out)
}

impl<'a> Run<'a> {
    pub(super) fn new(
        local: &'a Device,
        ledger: &'a mut Ledger,
        ep: &'a mut Endpoint,
        params: &'a Params,
        purpose: Purpose,
        rep: &'a Reporter,
    ) -> Run<'a> {
        Run {
            local,
            ledger,
            ep,
            params,
            purpose,
            rep,
            pending: VecDeque::new(),
            follow: VecDeque::new(),
            inflight: 0,
            batches_out: 0,
            out: Comparison::default(),
            last_checkpoint: Instant::now(),
        }
    }

    pub(super) fn ask(&mut self, msg: Message, p: Pending) -> Result<(), Fault> {
        self.ep.request(msg)?;
        self.inflight += p.cost();
        self.pending.push_back(p);
        Ok(())
    }

    /// Keeps up to [`WINDOW`] batches of leaf digests requested from the endpoint, once
    /// no follow-up request is waiting; `next` is the next batch to ask for.
    pub(super) fn ask_digest_batches(&mut self, blocks: Blocks, next: &mut u64) -> Result<(), Fault> {
        let batch = (BATCH_BYTES / blocks.block).max(1);
        let batches = blocks.count().div_ceil(batch);
        while self.follow.is_empty() && *next < batches && self.batches_out < WINDOW {
            let first = *next * batch;
            let count = batch.min(blocks.count() - first);
            let (offset, _) = blocks.span(first);
            let range = ((first + count) * blocks.block).min(blocks.len) - offset;
            let msg = Message::HashBlocks { offset, len: range, block: blocks.block as u32 };
            self.ask(msg, Pending::Digests { first, count })?;
            self.batches_out += 1;
            *next += 1;
        }
        Ok(())
    }

    /// Drives requests and replies until the next batch of leaf digests arrives, handling
    /// the replies to follow-up requests on the way; `None` once everything is answered.
    pub(super) fn next_digest_batch(
        &mut self,
        blocks: Blocks,
        next: &mut u64,
    ) -> Result<Option<(u64, Vec<Digest>)>, Fault> {
        loop {
            self.send_follow_ups()?;
            self.ask_digest_batches(blocks, next)?;
            let Some(p) = self.pending.pop_front() else { return Ok(None) };
            let reply = self.ep.recv()?;
            self.inflight -= p.cost();
            match p {
                Pending::Digests { first, count } => {
                    self.batches_out -= 1;
                    let Frame::Digests(bytes) = reply else { return Err(unexpected(&reply)) };
                    return Ok(Some((first, split_digests(self.params.hash, &bytes, count as usize)?)));
                }
                other => {
                    self.handle(other, reply)?;
                    self.maybe_checkpoint()?;
                }
            }
        }
    }

    /// Sends queued follow-up requests as far as the in-flight budget allows.
    pub(super) fn send_follow_ups(&mut self) -> Result<(), Fault> {
        while let Some((_, p)) = self.follow.front() {
            if self.inflight + p.cost() > BUDGET && !self.pending.is_empty() {
                break;
            }
            let Some((msg, p)) = self.follow.pop_front() else { break };
            self.ask(msg, p)?;
        }
        Ok(())
    }

    /// Processes replies until at most `keep` requests are outstanding.
    pub(super) fn drain(&mut self, keep: usize) -> Result<(), Fault> {
        loop {
            self.send_follow_ups()?;
            if self.pending.len() + self.follow.len() <= keep {
                return Ok(());
            }
            let Some(p) = self.pending.pop_front() else { return Ok(()) };
            let reply = self.ep.recv()?;
            self.inflight -= p.cost();
            self.handle(p, reply)?;
            self.maybe_checkpoint()?;
        }
    }

    /// Leaf `leaf` differs: count it, and for SYNC queue what transfers it: the whole
    /// leaf, or with refinement the digests of its pieces first (then of the sub-pieces
    /// of differing pieces, down to the refinement size).
    pub(super) fn differs(&mut self, leaf: u64, offset: u64, len: usize, data: Option<Vec<u8>>) -> Result<(), Fault> {
        self.out.differing += 1;
        let Purpose::Sync(dir) = self.purpose else { return Ok(()) };
        let Some(target) = self.params.refine else {
            return self.transfer(offset, len, data.as_deref());
        };
        let piece = (self.ledger.layout().piece() as usize).max(target);
        let ours = match (self.ledger.pieces(leaf), &data) {
            (Some(p), _) if piece as u64 == self.ledger.layout().piece() => p,
            (_, Some(d)) => self.params.hash.digest_pieces(d, piece),
            (_, None) => {
                let mut buf = vec![0u8; len];
                self.local.read_at(offset, &mut buf)?;
                self.params.hash.digest_pieces(&buf, piece)
            }
        };
        let data = data.filter(|_| dir == Direction::Push);
        let msg = Message::HashBlocks { offset, len: len as u64, block: piece as u32 };
        self.follow.push_back((msg, Pending::Chunks { offset, len, unit: piece, ours, data }));
        Ok(())
    }

    /// Sends (PUSH) or asks for (PULL) `[offset, offset+len)`, taking PUSH data from
    /// `data` (which starts at `offset`) when given.
    fn transfer(&mut self, offset: u64, len: usize, data: Option<&[u8]>) -> Result<(), Fault> {
        match self.purpose {
            Purpose::Sync(Direction::Push) => {
                let owned;
                let bytes = match data {
                    Some(d) => &d[..len],
                    None => {
                        let mut buf = vec![0u8; len];
                        self.local.read_at(offset, &mut buf)?;
                        owned = buf;
                        &owned[..]
                    }
                };
                self.ep.send(&Frame::Block(BlockFrame::encode(offset, bytes, self.params.codec)))?;
                self.out.written += len as u64;
            }
            Purpose::Sync(Direction::Pull) => {
                let msg = Message::Read { offset, len: len as u32 };
                self.follow.push_back((msg, Pending::Data { offset, len }));
            }
            Purpose::Check => {}
        }
        Ok(())
    }

    pub(super) fn handle(&mut self, p: Pending, reply: Frame) -> Result<(), Fault> {
        match p {
            Pending::Digests { .. } => Err(Fault::Internal("digest batch outside the main loop")),
            Pending::Flushed => match reply {
                Frame::Control(Message::Flushed) => Ok(()),
                other => Err(unexpected(&other)),
            },
            Pending::Chunks { offset, len, unit, ours, data } => {
                let Frame::Digests(bytes) = reply else { return Err(unexpected(&reply)) };
                let target = self.params.refine.ok_or(Fault::Internal("refinement size missing"))?;
                let theirs = split_digests(self.params.hash, &bytes, ours.len())?;
                let differing: Vec<usize> = (0..ours.len()).filter(|&j| ours[j] != theirs[j]).collect();
                self.rep.debug(format_args!(
                    "range @ {offset}: {} of {} pieces of {unit} bytes differ",
                    differing.len(),
                    ours.len()
                ));
                // Mostly different (new or unrelated data): going a level down would only
                // read more; send the differing pieces as they are.
                if unit <= target || differing.len() * 2 > ours.len() {
                    for (start, end) in runs(&differing, unit, len) {
                        let slice = data.as_deref().map(|d| &d[start..end]);
                        self.transfer(offset + start as u64, end - start, slice)?;
                    }
                    return Ok(());
                }
                // One level down: the differing pieces, in sub-pieces of the target size.
                for j in differing {
                    let (start, end) = (j * unit, ((j + 1) * unit).min(len));
                    let piece_data = match &data {
                        Some(d) => d[start..end].to_vec(),
                        None => {
                            let mut buf = vec![0u8; end - start];
                            self.local.read_at(offset + start as u64, &mut buf)?;
                            buf
                        }
                    };
                    let sub = self.params.hash.digest_pieces(&piece_data, target);
                    let at = offset + start as u64;
                    let msg = Message::HashBlocks { offset: at, len: (end - start) as u64, block: target as u32 };
                    let keep = (self.purpose == Purpose::Sync(Direction::Push)).then_some(piece_data);
                    self.follow.push_back((
                        msg,
                        Pending::Chunks { offset: at, len: end - start, unit: target, ours: sub, data: keep },
                    ));
                }
                Ok(())
            }
            Pending::Data { offset, len } => {
                let Frame::Block(block) = reply else { return Err(unexpected(&reply)) };
                if block.offset != offset || block.raw_len as usize != len {
                    return Err(Fault::Protocol(ProtocolError::Unexpected(format!(
                        "data for offset {} ({} bytes) where offset {offset} ({len} bytes) was asked for",
                        block.offset, block.raw_len
                    ))));
                }
                let data = block.decode(offset + len as u64)?;
                self.local.write_at(offset, &data)?;
                self.ledger.wrote(offset, &data);
                self.out.written += len as u64;
                Ok(())
            }
        }
    }

    /// Every [`CHECKPOINT_EVERY`], makes progress durable on both sides and saves
    /// checkpoints, so that an interrupted run resumes from there.
    pub(super) fn maybe_checkpoint(&mut self) -> Result<(), Fault> {
        if self.last_checkpoint.elapsed() < checkpoint_every() {
            return Ok(());
        }
        self.last_checkpoint = Instant::now();
        let role = if self.purpose == Purpose::Sync(Direction::Pull) { Role::Receiver } else { Role::Read };
        if role == Role::Receiver {
            self.local.sync()?;
            self.ledger.durable(self.local)?;
        }
        self.ledger.checkpoint(self.local, role).map_err(|e| Fault::State(e.to_string()))?;
        self.follow.push_back((Message::Flush, Pending::Flushed));
        Ok(())
    }
}

/// Byte ranges covering runs of consecutive differing chunks, each at most [`MAX_BLOCK`].
fn runs(differing: &[usize], chunk: usize, len: usize) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for &j in differing {
        let start = j * chunk;
        let end = (start + chunk).min(len);
        match out.last_mut() {
            Some(last) if last.1 == start && end - last.0 <= MAX_BLOCK => last.1 = end,
            _ => out.push((start, end)),
        }
    }
    out
}

pub(super) fn unexpected(frame: &Frame) -> Fault {
    let what = match frame {
        Frame::Control(m) => format!("message {m:?}"),
        Frame::Block(b) => format!("data block at offset {}", b.offset),
        Frame::Digests(d) => format!("digest list of {} bytes", d.len()),
    };
    Fault::Protocol(ProtocolError::Unexpected(what))
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

#[cfg(test)]
mod property_tests {
    use super::*;
    use crate::compress::Codec;
    use crate::device::{ReceiverSpec, Side};
    use crate::endpoint::{Endpoint, OpenRequest, in_process};
    use crate::hash::HashAlgo;
    use crate::ledger::StateOptions;
    use crate::protocol::Access;
    use crate::report::{Output, Reporter};
    use proptest::prelude::*;

    /// Syncs `src` onto `dst` in `dir` with the given geometry and returns what was done.
    fn sync(
        src: &[u8],
        dst: &[u8],
        buffer: usize,
        chunk: Option<usize>,
        refine: Option<usize>,
        dir: Direction,
    ) -> (Comparison, Vec<u8>) {
        let tmp = tempfile::tempdir().unwrap();
        let (lp, rp) = (tmp.path().join("local"), tmp.path().join("remote"));
        let (local_bytes, remote_bytes) = match dir {
            Direction::Push => (src, dst),
            Direction::Pull => (dst, src),
        };
        std::fs::write(&lp, local_bytes).unwrap();
        std::fs::write(&rp, remote_bytes).unwrap();
        let params = Params { hash: HashAlgo::Blake3, buffer, chunk, refine, codec: Codec::Zstd(1) };
        let mut ep = Endpoint::connect(in_process(&rp)).unwrap();
        let spec =
            ReceiverSpec { source_size: src.len() as u64, source: None, source_name: "src".into(), force: false };
        let request = |access| OpenRequest {
            access,
            hash: params.hash,
            codec: params.codec,
            buffer: buffer as u64,
            chunk: chunk.map(|c| c as u64),
            state: StateOptions::off(),
        };
        let local = match dir {
            Direction::Push => {
                let access = Access::Write {
                    source_size: src.len() as u64,
                    source: None,
                    source_name: "src".into(),
                    force: false,
                };
                ep.open(request(access)).unwrap();
                Device::open_read(&lp, Side::Local).unwrap()
            }
            Direction::Pull => {
                ep.open(request(Access::Read)).unwrap();
                Device::open_receiver(&lp, Side::Local, &spec).unwrap()
            }
        };
        let layout = crate::state::Layout {
            hash: params.hash,
            buffer: buffer as u64,
            chunk: chunk.map(|c| c as u64),
            fanout: 4,
            device_size: src.len() as u64,
        };
        let mut ledger = Ledger::open(&local, layout, &StateOptions::off()).unwrap();
        let rep = Reporter::new(Output::default());
        let c = run(&local, &mut ledger, &mut ep, src.len() as u64, &params, Purpose::Sync(dir), &rep).unwrap();
        ep.flush_device().unwrap();
        ep.close().unwrap();
        let receiver = match dir {
            Direction::Push => rp,
            Direction::Pull => lp,
        };
        (c, std::fs::read(receiver).unwrap())
    }

    /// Bytes SYNC must write: whole differing blocks, or differing chunks within them.
    /// Bytes SYNC must write: whole differing blocks; with refinement the differing
    /// pieces, and within pieces larger than the target (unless most pieces of the block
    /// differ) only the differing sub-pieces.
    fn expected_written(
        src: &[u8],
        dst: &[u8],
        buffer: usize,
        chunk: Option<usize>,
        refine: Option<usize>,
    ) -> (u64, u64) {
        let differing = |a: &[u8], b: &[u8], unit: usize| -> Vec<(usize, usize)> {
            (0..a.len().div_ceil(unit))
                .map(|j| (j * unit, ((j + 1) * unit).min(a.len())))
                .filter(|&(s, e)| a[s..e] != b[s..e])
                .collect()
        };
        let mut blocks = 0;
        let mut bytes = 0u64;
        for (a, b) in src.chunks(buffer).zip(dst.chunks(buffer)) {
            if a == b {
                continue;
            }
            blocks += 1;
            let Some(target) = refine else {
                bytes += a.len() as u64;
                continue;
            };
            let piece = chunk.unwrap_or(16384.min(buffer)).max(target);
            let pieces = differing(a, b, piece);
            if piece <= target || pieces.len() * 2 > a.len().div_ceil(piece) {
                bytes += pieces.iter().map(|(s, e)| (e - s) as u64).sum::<u64>();
            } else {
                for (s, e) in pieces {
                    bytes += differing(&a[s..e], &b[s..e], target).iter().map(|(x, y)| (y - x) as u64).sum::<u64>();
                }
            }
        }
        (blocks, bytes)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn sync_writes_exactly_the_differing_blocks_or_chunks(
            len in 1usize..300_000,
            buffer_kb in 1usize..80,
            chunk_kb in proptest::option::of(1usize..6),
            edits in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 0..12),
            pull in any::<bool>(),
            default_refine in any::<bool>(),
        ) {
            let buffer = buffer_kb * 1024;
            let chunk = chunk_kb.map(|c| c.min(buffer_kb) * 1024);
            // Without --chunk: whole blocks, or the default two-level refinement to 4 KiB.
            let refine = chunk.or((default_refine && buffer > 4096).then_some(4096));
            let src: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let mut dst = src.clone();
            for (at, v) in &edits {
                let i = at.index(len);
                dst[i] = dst[i].wrapping_add(v | 1);
            }
            let dir = if pull { Direction::Pull } else { Direction::Push };
            let (c, receiver) = sync(&src, &dst, buffer, chunk, refine, dir);
            prop_assert!(receiver == src, "receiver differs from source after sync");
            let (blocks, bytes) = expected_written(&src, &dst, buffer, chunk, refine);
            prop_assert_eq!(c.blocks, len.div_ceil(buffer) as u64);
            prop_assert_eq!(c.differing, blocks);
            prop_assert_eq!(c.written, bytes);
        }
    }
}
