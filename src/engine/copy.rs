//! COPY: stream every leaf from source to receiver in order, with reads, compression
//! and sending overlapped (PUSH) or a window of reads in flight (PULL). Each side's
//! state is built on the way: the source digests what it reads, the receiver what it
//! writes, and both are checkpointed, so that a rerun of an interrupted COPY resumes:
//! the leaves the source's checkpoint confirms are compared (see `run::move_data`) and
//! the copy goes on from the first leaf after them.

use std::collections::VecDeque;
use std::time::Instant;

use super::window::{Checkpoints, Ctx};
use super::{Direction, Fault};
use crate::block::{BlockFrame, Check};
use crate::compress::{Adaptive, Codec, PayloadCodec};
use crate::hash::is_zero;
use crate::leaf_reader::{self, Buf, Data};
use crate::stamp::Role;
use crate::tree::{leaf_digest, zero_leaf_digest};

/// Bytes of reads kept in flight for PULL; a quarter of it when the endpoint runs on a
/// thread of this process: its replies come back at once, and its buffers are this
/// process's memory.
const PULL_WINDOW: u64 = 32 << 20;

/// Copies the run's leaves from leaf `from` on in `dir`; returns the bytes written.
pub fn run(ctx: Ctx<'_>, dir: Direction, from: u64) -> Result<u64, Fault> {
    match dir {
        Direction::Push => push(ctx, from),
        Direction::Pull => pull(ctx, from),
    }
}

/// Source bytes between two decisions of an adapting compression level.
const ADAPT_EVERY: u64 = 32 << 20;

fn push(ctx: Ctx<'_>, from: u64) -> Result<u64, Fault> {
    let fixed = ctx.params.codec;
    let adaptive = match fixed {
        Codec::Zstd(level) if ctx.params.adapt => Some(Adaptive::new(level)),
        _ => None,
    };
    let adaptive = adaptive.as_ref();
    let layout = ctx.layout();
    let track = ctx.index.enabled();
    let local = ctx.local;
    let work = move |offset: u64, data: Data| match data {
        Data::Read(data) => {
            let digests = track.then(|| leaf_digest(&layout, &data));
            let codec = adaptive.map_or(fixed, Adaptive::codec);
            (frames(offset, data, layout.piece() as usize, codec), digests)
        }
        _ => {
            let len = layout.leaf_len(offset / layout.buffer);
            let digests = track.then(|| zero_leaf_digest(&layout, len));
            (vec![BlockFrame::zeros(offset, len as u32, Check::None)], digests)
        }
    };
    let result = std::thread::scope(|scope| {
        let rx = leaf_reader::spawn(scope, local, layout, from..layout.leaf_count(), Vec::new(), work);
        let mut written = 0;
        let mut checkpoints = Checkpoints::new();
        // Bytes with data to compress sent since the period began (zero leaves cost
        // little and say nothing of the level).
        let mut since_decision = 0;
        let mut period = Instant::now();
        for leaf in rx {
            let leaf = leaf?;
            let (frames, digests) = leaf.value;
            if let Some((d, pieces)) = digests {
                ctx.index.learn(leaf.index, &d, &pieces);
            }
            // Only leaves with data to compress say anything about the level.
            let compressed = frames.iter().any(|f| f.codec != PayloadCodec::Zero);
            for frame in frames {
                ctx.ep.write(frame)?;
            }
            if let Some(a) = adaptive.filter(|_| compressed) {
                since_decision += leaf.len as u64;
                if since_decision >= ADAPT_EVERY {
                    let took = std::mem::replace(&mut period, Instant::now()).elapsed();
                    if let Some(level) = a.decide(std::mem::take(&mut since_decision), took) {
                        ctx.rep.debug(format_args!("compression: zstd level {level} from block {}", leaf.index + 1));
                    }
                }
            }
            ctx.rep.advance(leaf.len as u64);
            written += leaf.len as u64;
            if checkpoints.due() {
                // The receiver makes what it has durable and checkpoints its state;
                // so does the source's state (and the receiver's memory stays bounded).
                ctx.ep.flush_device()?;
                ctx.index.checkpoint(local, Role::Read)?;
            }
        }
        Ok(written)
    });
    if let Some(a) = adaptive {
        ctx.rep.log(format_args!("compression: {}", a.describe()));
    }
    result
}

/// A leaf's data at `offset` as frames: runs of all-zero pieces become zero tokens, the
/// rest data, so that zeros never cross the wire as bytes. A leaf sent whole and
/// uncompressed (a local run's) moves its buffer into the frame instead of copying it.
fn frames(offset: u64, data: Buf, piece: usize, codec: Codec) -> Vec<BlockFrame> {
    let mut runs = Vec::new();
    let mut start = 0;
    while start < data.len() {
        let zero = is_zero(&data[start..(start + piece).min(data.len())]);
        let mut end = (start + piece).min(data.len());
        while end < data.len() && is_zero(&data[end..(end + piece).min(data.len())]) == zero {
            end = (end + piece).min(data.len());
        }
        runs.push((start, end, zero));
        start = end;
    }
    if let ([(_, _, false)], Codec::None) = (&runs[..], codec) {
        return vec![BlockFrame::raw(offset, data.into_vec(), Check::None)];
    }
    runs.into_iter()
        .map(|(start, end, _)| BlockFrame::encode(offset + start as u64, &data[start..end], codec, Check::None))
        .collect()
}

/// A reply a PULL COPY waits for, in the order asked.
enum Awaited {
    /// A leaf's data.
    Data { offset: u64, len: usize },
    /// The source's checkpoint.
    Flushed,
}

fn pull(mut ctx: Ctx<'_>, from: u64) -> Result<u64, Fault> {
    let layout = ctx.layout();
    let mut pending: VecDeque<Awaited> = VecDeque::new();
    let mut inflight = 0u64;
    let mut next = from;
    let mut written = 0u64;
    let mut checkpoints = Checkpoints::new();
    let window = if ctx.ep.in_process() { PULL_WINDOW / 4 } else { PULL_WINDOW };
    loop {
        while next < layout.leaf_count() && (pending.is_empty() || inflight + layout.buffer <= window) {
            let (offset, len) = layout.leaf_span(next);
            ctx.ep.ask_read(offset, len as u32)?;
            pending.push_back(Awaited::Data { offset, len: len as usize });
            inflight += len;
            next += 1;
        }
        let (offset, len) = match pending.pop_front() {
            None => break,
            Some(Awaited::Flushed) => {
                ctx.ep.flushed()?;
                continue;
            }
            Some(Awaited::Data { offset, len }) => (offset, len),
        };
        let frame = ctx.ep.data(offset, len)?;
        written += ctx.write_local(frame)?;
        if checkpoints.due() {
            // The receiver's state, and the source's (which the endpoint saves when asked
            // to flush), so that a rerun knows how far this one came.
            ctx.index.checkpoint(ctx.local, Role::Receiver)?;
            ctx.ep.ask_flush()?;
            pending.push_back(Awaited::Flushed);
        }
        inflight -= len as u64;
        ctx.rep.advance(len as u64);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::PayloadCodec;

    #[test]
    fn zero_pieces_of_a_leaf_are_tokens_and_the_rest_is_data() {
        let mut data = vec![0u8; 10 * 1024];
        data[3 * 1024] = 1;
        data[4 * 1024 + 5] = 2;
        data[10 * 1024 - 1] = 3;
        let f = frames(1 << 20, Buf::from(data), 1024, Codec::None);
        let shape: Vec<(u64, u32, bool)> =
            f.iter().map(|b| (b.offset - (1 << 20), b.raw_len, b.codec == PayloadCodec::Zero)).collect();
        assert_eq!(shape, vec![(0, 3072, true), (3072, 2048, false), (5120, 4096, true), (9216, 1024, false)]);
        assert_eq!(frames(0, Buf::from(vec![0u8; 5000]), 1024, Codec::Zstd(3)).len(), 1);
        assert!(frames(0, Buf::from(Vec::new()), 1024, Codec::None).is_empty());
    }

    #[test]
    fn a_leaf_of_data_sent_uncompressed_moves_its_buffer_into_the_frame() {
        let data = vec![7u8; 8192];
        let at = data.as_ptr();
        let f = frames(4096, Buf::from(data), 1024, Codec::None);
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].offset, f[0].raw_len, f[0].codec), (4096, 8192, PayloadCodec::Raw));
        assert_eq!(f[0].payload.as_ptr(), at, "the data was copied");
        assert_eq!(f[0].payload, vec![7u8; 8192]);
    }
}
