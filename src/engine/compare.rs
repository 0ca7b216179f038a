//! SYNC and RECHECK: both sides digest their blocks in parallel, the client compares,
//! and (for SYNC) only differing blocks, or with `--chunk` only differing chunks, cross
//! the wire. Requests are windowed: digest batches, chunk digests and reads are all in
//! flight at once and answered in order.

use std::collections::VecDeque;

use super::pipeline::{self, Blocks};
use super::{Direction, Fault, Params};
use crate::device::Device;
use crate::endpoint::Endpoint;
use crate::hash::Digest;
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
}

/// A request whose reply has not been consumed yet.
enum Pending {
    /// Digests of `count` blocks starting at block `first`.
    Digests { first: u64, count: u64 },
    /// Chunk digests of one differing block.
    Chunks { offset: u64, len: usize, local: Vec<Digest>, data: Option<Vec<u8>> },
    /// Data the receiver (local, PULL) must write.
    Data { offset: u64, len: usize },
}

impl Pending {
    /// Memory this entry holds or will receive, for the in-flight budget.
    fn cost(&self) -> u64 {
        match self {
            Pending::Digests { .. } => 4096,
            Pending::Chunks { data, .. } => 4096 + data.as_ref().map_or(0, |d| d.len() as u64),
            Pending::Data { len, .. } => *len as u64,
        }
    }
}

/// Digest batches (HashBlocks requests) kept in flight.
const WINDOW: usize = 4;
/// Bytes of device data covered by one digest batch.
const BATCH_BYTES: u64 = 16 << 20;
/// Memory that pending replies and kept data may hold.
const BUDGET: u64 = 64 << 20;

/// Compares `local` with the endpoint's device over `len` bytes.
pub fn run(
    local: &Device,
    ep: &mut Endpoint,
    len: u64,
    params: &Params,
    purpose: Purpose,
    rep: &Reporter,
) -> Result<Comparison, Fault> {
    let blocks = Blocks { len, block: params.buffer as u64 };
    let batch = (BATCH_BYTES / blocks.block).max(1);
    let batches = blocks.count().div_ceil(batch);
    let algo = params.hash;
    let keep_data = purpose != Purpose::Check && (params.chunk.is_some() || purpose == Purpose::Sync(Direction::Push));
    std::thread::scope(|scope| {
        let (local_rx, _reader) = pipeline::spawn(scope, local, blocks, 8, move |_, data| {
            let digest = algo.digest(&data);
            (digest, keep_data.then_some(data))
        });
        let mut out = Comparison::default();
        let mut pending: VecDeque<Pending> = VecDeque::new();
        let mut follow: VecDeque<(Message, Pending)> = VecDeque::new();
        let mut inflight = 0u64;
        let mut batches_out = 0usize;
        let mut next_batch = 0u64;
        loop {
            while let Some((_, p)) = follow.front() {
                if inflight + p.cost() > BUDGET && !pending.is_empty() {
                    break;
                }
                let Some((msg, p)) = follow.pop_front() else { break };
                ep.send(&Frame::Control(msg))?;
                inflight += p.cost();
                pending.push_back(p);
            }
            while follow.is_empty() && next_batch < batches && batches_out < WINDOW {
                let first = next_batch * batch;
                let count = batch.min(blocks.count() - first);
                let (offset, _) = blocks.span(first);
                let end = (first + count) * blocks.block;
                let range = end.min(len) - offset;
                ep.send(&Frame::Control(Message::HashBlocks { offset, len: range, block: blocks.block as u32 }))?;
                let p = Pending::Digests { first, count };
                inflight += p.cost();
                pending.push_back(p);
                batches_out += 1;
                next_batch += 1;
            }
            let Some(p) = pending.pop_front() else { break };
            let reply = ep.recv()?;
            inflight -= p.cost();
            match p {
                Pending::Digests { first, count } => {
                    batches_out -= 1;
                    let Frame::Digests(bytes) = reply else { return Err(unexpected(&reply)) };
                    let remote = split_digests(algo, &bytes, count as usize)?;
                    for (k, theirs) in remote.into_iter().enumerate() {
                        let item = local_rx.recv().map_err(|_| Fault::Internal("local reader stopped"))??;
                        debug_assert_eq!(item.index, first + k as u64);
                        let (ours, data) = item.value;
                        out.blocks += 1;
                        rep.advance(item.len as u64);
                        if ours == theirs {
                            if rep.debugging() {
                                rep.debug(format_args!("block {} @ {}: same", item.index, item.offset));
                            }
                            continue;
                        }
                        out.differing += 1;
                        rep.debug(format_args!(
                            "block {} @ {} ({} bytes): differs (local {ours}, remote {theirs})",
                            item.index, item.offset, item.len
                        ));
                        match (purpose, params.chunk) {
                            (Purpose::Check, _) => {}
                            (Purpose::Sync(dir), Some(chunk)) => {
                                let data = data.ok_or(Fault::Internal("block data not kept"))?;
                                let local_chunks = algo.digest_pieces(&data, chunk);
                                let msg = Message::HashBlocks {
                                    offset: item.offset,
                                    len: item.len as u64,
                                    block: chunk as u32,
                                };
                                let data = (dir == Direction::Push).then_some(data);
                                follow.push_back((
                                    msg,
                                    Pending::Chunks { offset: item.offset, len: item.len, local: local_chunks, data },
                                ));
                            }
                            (Purpose::Sync(Direction::Push), None) => {
                                let data = data.ok_or(Fault::Internal("block data not kept"))?;
                                ep.send(&Frame::Block(BlockFrame::encode(item.offset, &data, params.codec)))?;
                                out.written += data.len() as u64;
                            }
                            (Purpose::Sync(Direction::Pull), None) => {
                                let msg = Message::Read { offset: item.offset, len: item.len as u32 };
                                follow.push_back((msg, Pending::Data { offset: item.offset, len: item.len }));
                            }
                        }
                    }
                }
                Pending::Chunks { offset, len, local: ours, data } => {
                    let Frame::Digests(bytes) = reply else { return Err(unexpected(&reply)) };
                    let chunk = params.chunk.ok_or(Fault::Internal("chunk size missing"))?;
                    let theirs = split_digests(algo, &bytes, ours.len())?;
                    let differing: Vec<usize> = (0..ours.len()).filter(|&j| ours[j] != theirs[j]).collect();
                    rep.debug(format_args!("block @ {offset}: {} of {} chunks differ", differing.len(), ours.len()));
                    match data {
                        Some(data) => {
                            for j in differing {
                                let start = j * chunk;
                                let piece = &data[start..(start + chunk).min(len)];
                                ep.send(&Frame::Block(BlockFrame::encode(offset + start as u64, piece, params.codec)))?;
                                out.written += piece.len() as u64;
                            }
                        }
                        None => {
                            for (start, end) in runs(&differing, chunk, len) {
                                let msg = Message::Read { offset: offset + start as u64, len: (end - start) as u32 };
                                follow.push_back((
                                    msg,
                                    Pending::Data { offset: offset + start as u64, len: end - start },
                                ));
                            }
                        }
                    }
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
                    local.write_at(offset, &data)?;
                    out.written += len as u64;
                }
            }
        }
        Ok(out)
    })
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

fn unexpected(frame: &Frame) -> Fault {
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
    use crate::endpoint::{Endpoint, in_process};
    use crate::hash::HashAlgo;
    use crate::protocol::Access;
    use crate::report::{Output, Reporter};
    use proptest::prelude::*;

    /// Syncs `src` onto `dst` in `dir` with the given geometry and returns what was done.
    fn sync(src: &[u8], dst: &[u8], buffer: usize, chunk: Option<usize>, dir: Direction) -> (Comparison, Vec<u8>) {
        let tmp = tempfile::tempdir().unwrap();
        let (lp, rp) = (tmp.path().join("local"), tmp.path().join("remote"));
        let (local_bytes, remote_bytes) = match dir {
            Direction::Push => (src, dst),
            Direction::Pull => (dst, src),
        };
        std::fs::write(&lp, local_bytes).unwrap();
        std::fs::write(&rp, remote_bytes).unwrap();
        let params = Params { hash: HashAlgo::Blake3, buffer, chunk, codec: Codec::Zstd(1) };
        let mut ep = Endpoint::connect(in_process(&rp)).unwrap();
        let spec =
            ReceiverSpec { source_size: src.len() as u64, source: None, source_name: "src".into(), force: false };
        let local = match dir {
            Direction::Push => {
                let access = Access::Write {
                    source_size: src.len() as u64,
                    source: None,
                    source_name: "src".into(),
                    force: false,
                };
                ep.open(access, params.hash, params.codec).unwrap();
                Device::open_read(&lp, Side::Local).unwrap()
            }
            Direction::Pull => {
                ep.open(Access::Read, params.hash, params.codec).unwrap();
                Device::open_receiver(&lp, Side::Local, &spec).unwrap()
            }
        };
        let rep = Reporter::new(Output::default());
        let c = run(&local, &mut ep, src.len() as u64, &params, Purpose::Sync(dir), &rep).unwrap();
        ep.flush_device().unwrap();
        ep.close().unwrap();
        let receiver = match dir {
            Direction::Push => rp,
            Direction::Pull => lp,
        };
        (c, std::fs::read(receiver).unwrap())
    }

    /// Bytes SYNC must write: whole differing blocks, or differing chunks within them.
    fn expected_written(src: &[u8], dst: &[u8], buffer: usize, chunk: Option<usize>) -> (u64, u64) {
        let mut blocks = 0;
        let mut bytes = 0;
        for (a, b) in src.chunks(buffer).zip(dst.chunks(buffer)) {
            if a == b {
                continue;
            }
            blocks += 1;
            bytes += match chunk {
                None => a.len() as u64,
                Some(c) => a.chunks(c).zip(b.chunks(c)).filter(|(x, y)| x != y).map(|(x, _)| x.len() as u64).sum(),
            };
        }
        (blocks, bytes)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn sync_writes_exactly_the_differing_blocks_or_chunks(
            len in 1usize..200_000,
            buffer_kb in 1usize..24,
            chunk_kb in proptest::option::of(1usize..6),
            edits in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 0..12),
            pull in any::<bool>(),
        ) {
            let buffer = buffer_kb * 1024;
            let chunk = chunk_kb.map(|c| c.min(buffer_kb) * 1024);
            let src: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let mut dst = src.clone();
            for (at, v) in &edits {
                let i = at.index(len);
                dst[i] = dst[i].wrapping_add(v | 1);
            }
            let dir = if pull { Direction::Pull } else { Direction::Push };
            let (c, receiver) = sync(&src, &dst, buffer, chunk, dir);
            prop_assert!(receiver == src, "receiver differs from source after sync");
            let (blocks, bytes) = expected_written(&src, &dst, buffer, chunk);
            prop_assert_eq!(c.blocks, len.div_ceil(buffer) as u64);
            prop_assert_eq!(c.differing, blocks);
            prop_assert_eq!(c.written, bytes);
        }
    }
}
