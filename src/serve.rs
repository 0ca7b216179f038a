//! `basyn serve PATH`: the far endpoint. Speaks the protocol on stdin/stdout and touches
//! only the device named on its command line.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::sync::Arc;

use crate::device::{Device, DeviceError, ReceiverSpec, Side};
use crate::hash::HashAlgo;
use crate::ledger::{Ledger, Role, StateOptions};
use crate::protocol::{
    AbortCode, Access, Counter, FEATURES, Frame, FrameReader, FrameWriter, MAX_BLOCK, MAX_DIGESTS, Message,
    ProtocolError, StateSummary, VERSION,
};
use crate::state::Layout;
use crate::tree::DEFAULT_FANOUT;

/// Why a session ended early.
struct Abort {
    code: AbortCode,
    message: String,
}

impl From<ProtocolError> for Abort {
    fn from(e: ProtocolError) -> Abort {
        Abort { code: AbortCode::Protocol, message: format!("remote endpoint: {e}") }
    }
}

impl From<std::io::Error> for Abort {
    fn from(e: std::io::Error) -> Abort {
        Abort::from(ProtocolError::Io(e))
    }
}

fn failed(e: DeviceError) -> Abort {
    Abort { code: AbortCode::Failed, message: e.to_string() }
}

/// Serves `path` over `input`/`output` until the client closes; returns the exit code.
pub fn serve(path: &Path, input: impl Read, output: impl Write) -> i32 {
    let mut r = FrameReader::new(BufReader::with_capacity(1 << 20, input), Arc::new(Counter::default()));
    let mut w = FrameWriter::new(BufWriter::with_capacity(1 << 20, output), Arc::new(Counter::default()));
    match session(path, &mut r, &mut w) {
        Ok(()) => 0,
        Err(abort) => {
            // The client may already be gone; the abort is best effort.
            let _ = w.message(Message::Abort { code: abort.code, message: abort.message.clone() });
            match abort.code {
                AbortCode::Precondition => 1,
                AbortCode::Failed | AbortCode::Protocol => 2,
            }
        }
    }
}

fn session<R: Read, W: Write>(path: &Path, r: &mut FrameReader<R>, w: &mut FrameWriter<W>) -> Result<(), Abort> {
    w.start()?;
    w.message(Message::Hello { version: VERSION, features: FEATURES })?;
    r.start()?;
    match r.recv()? {
        Some(Frame::Control(Message::Hello { version, .. })) if version == VERSION => {}
        Some(Frame::Control(Message::Hello { version, .. })) => {
            return Err(ProtocolError::Version { ours: VERSION, theirs: version }.into());
        }
        None => return Ok(()),
        Some(other) => return Err(ProtocolError::Unexpected(format!("{other:?} before Hello")).into()),
    }
    // The session may open the device several times (a transfer, then a recheck),
    // each Open finishing the previous one.
    let mut open: Option<Opened> = None;
    let mut totals = Totals::default();
    let mut buf = Vec::new();
    loop {
        let Some(frame) = r.recv()? else {
            // The client went away: keep nothing a state file could misread.
            return Ok(());
        };
        match (frame, open.as_mut()) {
            (Frame::Control(Message::Open { access, hash, codec, buffer, chunk, state }), _) => {
                if let Some(o) = open.take() {
                    totals.absorb(o)?;
                }
                let req = OpenRequest { access, hash, codec, buffer, chunk, state };
                let (reply, now) = open_device(path, req)?;
                w.message(reply)?;
                open = now;
            }
            (Frame::Control(Message::HashBlocks { offset, len, block }), Some(o)) => {
                let digests = o.hash_range(offset, len, block, &mut buf)?;
                w.send(&Frame::Digests(digests))?;
                w.flush()?;
            }
            (Frame::Control(Message::TreeNodes { level, indices }), Some(o)) => {
                let digests = o.tree_nodes(level, &indices)?;
                w.send(&Frame::Digests(digests))?;
                w.flush()?;
            }
            (Frame::Control(Message::Read { offset, len }), Some(o)) => {
                check_range(o.limit, offset, u64::from(len), len as usize <= MAX_BLOCK)?;
                buf.resize(len as usize, 0);
                o.device.read_at(offset, &mut buf).map_err(failed)?;
                if let Some(l) = o.ledger.as_mut().filter(|_| o.role == Role::Read) {
                    l.observe(offset, &buf);
                }
                w.send(&Frame::Block(crate::protocol::BlockFrame::encode(offset, &buf, o.codec)))?;
                w.flush()?;
            }
            (Frame::Block(block), Some(o)) if o.role == Role::Receiver => {
                let data = block.decode(o.limit)?;
                o.device.write_at(block.offset, &data).map_err(failed)?;
                if let Some(l) = o.ledger.as_mut() {
                    l.wrote(block.offset, &data);
                }
            }
            (Frame::Control(Message::Flush), o) => {
                if let Some(o) = o {
                    o.checkpoint()?;
                }
                w.message(Message::Flushed)?;
            }
            (Frame::Control(Message::Close), _) => {
                if let Some(o) = open.take() {
                    totals.absorb(o)?;
                }
                let Totals { moved, bytes_read, note } = totals;
                w.message(Message::Closed { bytes_read, moved, note })?;
                return Ok(());
            }
            (other, _) => return Err(ProtocolError::Unexpected(describe(&other)).into()),
        }
    }
}

/// What the session's opens added up to, reported in `Closed`.
#[derive(Default)]
struct Totals {
    moved: bool,
    bytes_read: u64,
    note: String,
}

impl Totals {
    fn absorb(&mut self, o: Opened) -> Result<(), Abort> {
        self.bytes_read += o.device.bytes_read();
        let (moved, note) = o.finish()?;
        self.moved |= moved;
        if !note.is_empty() {
            self.note = note;
        }
        Ok(())
    }
}

/// What an `Open` asks for.
struct OpenRequest {
    access: Access,
    hash: HashAlgo,
    codec: crate::compress::Codec,
    buffer: u64,
    chunk: Option<u64>,
    state: StateOptions,
}

/// The device as the current `Open` left it.
struct Opened {
    device: Device,
    /// Bytes that may be touched: the device size, or the source size for a receiver.
    limit: u64,
    role: Role,
    hash: HashAlgo,
    codec: crate::compress::Codec,
    ledger: Option<Ledger>,
}

impl Opened {
    fn hash_range(&mut self, offset: u64, len: u64, block: u32, buf: &mut Vec<u8>) -> Result<Vec<u8>, Abort> {
        let block = u64::from(block);
        let pieces = if block == 0 { u64::MAX } else { len.div_ceil(block) };
        let fits =
            block > 0 && block as usize <= MAX_BLOCK && pieces * self.hash.digest_len() as u64 <= MAX_DIGESTS as u64;
        check_range(self.limit, offset, len, fits)?;
        match self.ledger.as_mut() {
            Some(l) => l.digest_range(&self.device, offset, len, block, buf).map_err(failed),
            None => Err(ProtocolError::Unexpected("digests of a device opened without a ledger".into()).into()),
        }
    }

    fn tree_nodes(&mut self, level: u32, indices: &[u64]) -> Result<Vec<u8>, Abort> {
        let tree = self.ledger.as_mut().and_then(|l| l.tree());
        let Some(tree) = tree else {
            return Err(ProtocolError::Unexpected("a tree request while the state is not fresh".into()).into());
        };
        let level = level as usize;
        if level >= tree.height() || indices.len() * self.hash.digest_len() > MAX_DIGESTS {
            return Err(ProtocolError::Unexpected(format!("tree request for level {level}")).into());
        }
        let mut out = Vec::with_capacity(indices.len() * self.hash.digest_len());
        for &i in indices {
            if i as usize >= tree.width(level) {
                return Err(ProtocolError::Unexpected(format!("tree node {i} of level {level}")).into());
            }
            out.extend_from_slice(tree.node(level, i as usize).as_bytes());
        }
        Ok(out)
    }

    /// After a Flush: durable writes, known digests, a checkpointed state.
    fn checkpoint(&mut self) -> Result<(), Abort> {
        if self.role == Role::Receiver {
            self.device.sync().map_err(failed)?;
        }
        if let Some(l) = self.ledger.as_mut() {
            l.durable(&self.device).map_err(failed)?;
            l.checkpoint(&self.device, self.role).map_err(state_failed)?;
        }
        Ok(())
    }

    /// Ends this open: saves the state; says whether a device only read was written
    /// meanwhile, and what happened to the state.
    fn finish(mut self) -> Result<(bool, String), Abort> {
        let Some(mut l) = self.ledger.take() else { return Ok((false, String::new())) };
        if self.role == Role::Receiver {
            self.device.sync().map_err(failed)?;
            l.durable(&self.device).map_err(failed)?;
        }
        let unchanged = l.finish(&self.device, self.role).map_err(state_failed)?;
        Ok((!unchanged, l.note().to_string()))
    }
}

fn state_failed(e: crate::state::StateError) -> Abort {
    Abort { code: AbortCode::Failed, message: format!("remote {e}") }
}

/// Refuses parameters no basyn client sends: they would divide by zero, allocate without
/// bound, or write state files outside basyn's own.
fn check_request(req: &OpenRequest) -> Result<(), Abort> {
    let bad = |what: String| Err(ProtocolError::Unexpected(what).into());
    if req.buffer == 0 || req.buffer > MAX_BLOCK as u64 {
        return bad(format!("block size {}", req.buffer));
    }
    if req.chunk.is_some_and(|c| c == 0 || c > req.buffer) {
        return bad(format!("chunk size {:?} for blocks of {}", req.chunk, req.buffer));
    }
    match req.codec {
        crate::compress::Codec::Zstd(l) if !(1..=22).contains(&l) => return bad(format!("zstd level {l}")),
        crate::compress::Codec::Zlib(l) if l > 9 => return bad(format!("zlib level {l}")),
        _ => {}
    }
    if let crate::ledger::StateMode::Path(p) = &req.state.mode {
        // The client chooses this path: never let it replace a file that is not a state.
        let refuse = |why: &str| {
            Err(Abort { code: AbortCode::Precondition, message: format!("remote state file {}: {why}", p.display()) })
        };
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.file_type().is_symlink() => return refuse("is a symbolic link; refusing to replace it"),
            Ok(m) if !m.is_file() => return refuse("is not a regular file"),
            Ok(_) => {
                let mut head = [0u8; 8];
                let magic = std::fs::File::open(p).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head));
                if magic.is_err() || head != crate::state::MAGIC {
                    return refuse("exists and is not a basyn state file; refusing to replace it");
                }
            }
            Err(_) => {}
        }
    }
    Ok(())
}

/// Opens the served device as asked; a refusal is an `Abort` with the precondition code.
fn open_device(path: &Path, req: OpenRequest) -> Result<(Message, Option<Opened>), Abort> {
    check_request(&req)?;
    let refused = |e: DeviceError| Abort { code: AbortCode::Precondition, message: e.to_string() };
    let (device, limit) = match &req.access {
        Access::Probe => {
            let kind = Device::probe(path, Side::Remote).map_err(refused)?;
            let identity =
                crate::device::Identity { boot_id: String::new(), kind, dev: 0, ino: 0, rdev: 0, backing: None };
            let reply = Message::Opened {
                size: 0,
                kind,
                identity,
                created: false,
                resized: false,
                state: StateSummary::default(),
            };
            return Ok((reply, None));
        }
        Access::Read => {
            let d = Device::open_read(path, Side::Remote).map_err(refused)?;
            let size = d.size();
            (d, size)
        }
        Access::Write { source_size, source, source_name, force } => {
            let spec = ReceiverSpec {
                source_size: *source_size,
                source: source.clone(),
                source_name: source_name.clone(),
                force: *force,
            };
            (Device::open_receiver(path, Side::Remote, &spec).map_err(refused)?, *source_size)
        }
    };
    let role = if matches!(req.access, Access::Write { .. }) { Role::Receiver } else { Role::Read };
    let layout = Layout {
        hash: req.hash,
        buffer: req.buffer.max(1),
        chunk: req.chunk,
        fanout: DEFAULT_FANOUT as u32,
        device_size: limit,
    };
    // Even without a state file the ledger applies the leaf digest rule and remembers
    // the digests of this session.
    let bad = |e: crate::state::StateError| Abort { code: AbortCode::Precondition, message: format!("remote {e}") };
    let state = if limit == 0 { StateOptions::off() } else { req.state.clone() };
    let mut ledger = Some(Ledger::open(&device, layout, &state).map_err(bad)?);
    let mut summary = StateSummary::default();
    if let Some(l) = ledger.as_mut() {
        summary.note = l.note().to_string();
        if l.fresh()
            && let Some(t) = l.tree()
        {
            summary.fresh = true;
            summary.root = t.root().map(|d| d.as_bytes().to_vec());
            summary.height = t.height() as u32;
        }
    }
    let reply = Message::Opened {
        size: device.size(),
        kind: device.kind(),
        identity: device.identity().clone(),
        created: device.created(),
        resized: device.resized(),
        state: summary,
    };
    Ok((reply, Some(Opened { device, limit, role, hash: req.hash, codec: req.codec, ledger })))
}

fn describe(frame: &Frame) -> String {
    match frame {
        Frame::Control(m) => format!("message {m:?}"),
        Frame::Block(b) => format!("data block at offset {} for a device opened read-only", b.offset),
        Frame::Digests(_) => "digest list from the client".to_string(),
    }
}

fn check_range(limit: u64, offset: u64, len: u64, ok: bool) -> Result<(), Abort> {
    if !ok || offset.checked_add(len).is_none_or(|end| end > limit) {
        return Err(ProtocolError::OutOfBounds { offset, len, size: limit }.into());
    }
    Ok(())
}
