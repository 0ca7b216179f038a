//! COPY: stream every block from source to receiver in order, with reads, compression
//! and sending overlapped (PUSH) or a window of reads in flight (PULL). Each side's
//! state is built on the way: the source digests what it reads, the receiver what it
//! writes.

use std::collections::VecDeque;
use std::time::Instant;

use super::compare::checkpoint_every;
use super::pipeline::{self, Blocks};
use super::{Direction, Fault, Params};
use crate::device::Device;
use crate::endpoint::Endpoint;
use crate::ledger::{Ledger, Role, leaf_digest};
use crate::protocol::{BlockFrame, Frame, Message, ProtocolError};
use crate::report::Reporter;

/// Bytes of reads kept in flight for PULL.
const PULL_WINDOW: u64 = 32 << 20;

/// Copies `len` bytes in `dir`; returns the bytes written.
pub fn run(
    local: &Device,
    ledger: &mut Ledger,
    ep: &mut Endpoint,
    len: u64,
    params: &Params,
    dir: Direction,
    rep: &Reporter,
) -> Result<u64, Fault> {
    let blocks = Blocks { len, block: params.buffer as u64 };
    match dir {
        Direction::Push => push(local, ledger, ep, blocks, params, rep),
        Direction::Pull => pull(local, ledger, ep, blocks, rep),
    }
}

fn push(
    local: &Device,
    ledger: &mut Ledger,
    ep: &mut Endpoint,
    blocks: Blocks,
    params: &Params,
    rep: &Reporter,
) -> Result<u64, Fault> {
    let codec = params.codec;
    let layout = *ledger.layout();
    let track = ledger.enabled();
    std::thread::scope(|scope| {
        let (rx, _reader) = pipeline::spawn(scope, local, blocks, Vec::new(), 8, move |offset, data| {
            let data = data.unwrap_or_default();
            let digests = track.then(|| leaf_digest(&layout, &data));
            (BlockFrame::encode(offset, &data, codec), digests)
        });
        let mut written = 0;
        let mut last = Instant::now();
        for item in rx {
            let item = item?;
            let (frame, digests) = item.value;
            if let Some((d, chunks)) = digests {
                ledger.learn(item.index, &d, &chunks);
            }
            ep.send(&Frame::Block(frame))?;
            rep.advance(item.len as u64);
            written += item.len as u64;
            if last.elapsed() >= checkpoint_every() {
                // The receiver makes what it has durable and checkpoints its state;
                // so does the source's state (and the receiver's memory stays bounded).
                ep.flush_device()?;
                ledger.checkpoint(local, Role::Read).map_err(|e| Fault::State(format!("local {e}")))?;
                last = Instant::now();
            }
        }
        Ok(written)
    })
}

fn pull(local: &Device, ledger: &mut Ledger, ep: &mut Endpoint, blocks: Blocks, rep: &Reporter) -> Result<u64, Fault> {
    let mut pending: VecDeque<(u64, usize)> = VecDeque::new();
    let mut inflight = 0u64;
    let mut next = 0u64;
    let mut written = 0u64;
    let mut last = Instant::now();
    loop {
        while next < blocks.count() && (pending.is_empty() || inflight + blocks.block <= PULL_WINDOW) {
            let (offset, len) = blocks.span(next);
            ep.request(Message::Read { offset, len: len as u32 })?;
            pending.push_back((offset, len));
            inflight += len as u64;
            next += 1;
        }
        let Some((offset, len)) = pending.pop_front() else { break };
        let block = match ep.recv()? {
            Frame::Block(b) if b.offset == offset && b.raw_len as usize == len => b,
            _ => {
                return Err(Fault::Protocol(ProtocolError::Unexpected(format!(
                    "reply where data for offset {offset} was expected"
                ))));
            }
        };
        let data = block.decode(offset + len as u64)?;
        local.write_at(offset, &data)?;
        ledger.wrote(offset, &data);
        if last.elapsed() >= checkpoint_every() {
            local.sync()?;
            ledger.durable(local)?;
            ledger.checkpoint(local, Role::Receiver).map_err(|e| Fault::State(format!("local {e}")))?;
            last = Instant::now();
        }
        inflight -= len as u64;
        written += len as u64;
        rep.advance(len as u64);
    }
    Ok(written)
}
