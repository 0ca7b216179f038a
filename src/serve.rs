//! `basyn serve PATH`: the far endpoint. Speaks the protocol on stdin/stdout and touches
//! only the device named on its command line.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::sync::Arc;

use crate::device::{Device, DeviceError, ReceiverSpec, Side};
use crate::hash::HashAlgo;
use crate::protocol::{
    AbortCode, Access, Counter, FEATURES, Frame, FrameReader, FrameWriter, MAX_BLOCK, MAX_DIGESTS, Message,
    ProtocolError, VERSION,
};

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
    // each Open replacing the previous one.
    let mut open: Option<Opened> = None;
    let mut buf = Vec::new();
    loop {
        let Some(frame) = r.recv()? else { return Ok(()) };
        match (frame, open.as_ref()) {
            (Frame::Control(Message::Open { access, hash, codec }), _) => {
                // Release the previous open first: an exclusive open must not meet our own.
                drop(open.take());
                let (reply, now) = open_device(path, access, hash, codec)?;
                w.message(reply)?;
                open = now;
            }
            (Frame::Control(Message::HashBlocks { offset, len, block }), Some(o)) => {
                let digests = hash_range(&o.device, o.limit, o.hash, offset, len, block, &mut buf)?;
                w.send(&Frame::Digests(digests))?;
                w.flush()?;
            }
            (Frame::Control(Message::Read { offset, len }), Some(o)) => {
                check_range(o.limit, offset, u64::from(len), len as usize <= MAX_BLOCK)?;
                buf.resize(len as usize, 0);
                o.device.read_at(offset, &mut buf).map_err(failed)?;
                w.send(&Frame::Block(crate::protocol::BlockFrame::encode(offset, &buf, o.codec)))?;
                w.flush()?;
            }
            (Frame::Block(block), Some(o)) if o.writable => {
                let data = block.decode(o.limit)?;
                o.device.write_at(block.offset, &data).map_err(failed)?;
            }
            (Frame::Control(Message::Flush), o) => {
                if let Some(o) = o.filter(|o| o.writable) {
                    o.device.sync().map_err(failed)?;
                }
                w.message(Message::Flushed)?;
            }
            (Frame::Control(Message::Close), _) => return Ok(()),
            (other, _) => return Err(ProtocolError::Unexpected(describe(&other)).into()),
        }
    }
}

/// The device as the current `Open` left it.
struct Opened {
    device: Device,
    /// Bytes that may be touched: the device size, or the source size for a receiver.
    limit: u64,
    writable: bool,
    hash: HashAlgo,
    codec: crate::compress::Codec,
}

/// Opens the served device as asked; a refusal is an `Abort` with the precondition code.
fn open_device(
    path: &Path,
    access: Access,
    hash: HashAlgo,
    codec: crate::compress::Codec,
) -> Result<(Message, Option<Opened>), Abort> {
    let refused = |e: DeviceError| Abort { code: AbortCode::Precondition, message: e.to_string() };
    let (device, limit) = match &access {
        Access::Probe => {
            let kind = Device::probe(path, Side::Remote).map_err(refused)?;
            let identity =
                crate::device::Identity { boot_id: String::new(), kind, dev: 0, ino: 0, rdev: 0, backing: None };
            return Ok((Message::Opened { size: 0, kind, identity, created: false }, None));
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
    let reply = Message::Opened {
        size: device.size(),
        kind: device.kind(),
        identity: device.identity().clone(),
        created: device.created(),
    };
    let writable = matches!(access, Access::Write { .. });
    Ok((reply, Some(Opened { device, limit, writable, hash, codec })))
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

/// Digests of every `block`-sized piece of a range, read in large sequential steps.
fn hash_range(
    device: &Device,
    limit: u64,
    algo: HashAlgo,
    offset: u64,
    len: u64,
    block: u32,
    buf: &mut Vec<u8>,
) -> Result<Vec<u8>, Abort> {
    let block = u64::from(block);
    let pieces = if block == 0 { u64::MAX } else { len.div_ceil(block) };
    let fits = block > 0 && block as usize <= MAX_BLOCK && pieces * algo.digest_len() as u64 <= MAX_DIGESTS as u64;
    check_range(limit, offset, len, fits)?;
    // Read several small pieces per system call, but never more than ~4 MiB at once.
    let step = block * ((4u64 << 20) / block).max(1);
    let mut out = Vec::with_capacity(pieces as usize * algo.digest_len());
    let mut at = offset;
    while at < offset + len {
        let n = step.min(offset + len - at) as usize;
        buf.resize(n, 0);
        device.read_at(at, buf).map_err(failed)?;
        for d in algo.digest_pieces(buf, block as usize) {
            out.extend_from_slice(d.as_bytes());
        }
        at += n as u64;
    }
    Ok(out)
}
