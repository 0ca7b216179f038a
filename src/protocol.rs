//! The wire protocol between basyn and `basyn serve`: a preamble, then length-prefixed
//! frames over any byte stream. This module owns every message type that crosses the
//! wire; the client (`endpoint`) and the server (`serve`) both speak in them. See
//! `docs/protocol.md`.
//!
//! ```text
//! stream   := MAGIC version:u16be frame*   (each direction starts with it)
//! frame    := kind:u8 len:u32le payload[len]
//! kind 1   Control  payload = postcard(Message), len <= MAX_CONTROL
//! kind 2   Block    payload = offset:u64le raw_len:u32le codec:u8
//!                             check:u8 unit:u32le count:u32le digest_len:u8
//!                             digest[count] data[..]
//! kind 3   Digests  payload = digest*  (concatenated, each of the session's digest length)
//! ```
//!
//! Every length is checked against its maximum before anything is allocated; a block
//! from the wire is untrusted until [`BlockFrame::verify`] has bounds-checked,
//! decompressed and checked it against the source digests it carries.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

pub use crate::block::{BlockFrame, Check, MAX_BLOCK};
use crate::compress::{Codec, PayloadCodec};
use crate::device::{Identity, Kind};
use crate::hash::{Digest, HashAlgo, MAX_DIGEST_LEN};

/// First bytes each side writes, before the protocol version.
pub const MAGIC: [u8; 6] = *b"BASYN\0";
/// Protocol version, written right after [`MAGIC`] and checked before anything else.
pub const VERSION: u16 = 6;
/// Feature bit: the peer can decode zstd block payloads.
pub const FEATURE_ZSTD: u64 = 1;
/// Feature bit: the peer can decode zlib block payloads.
pub const FEATURE_ZLIB: u64 = 2;
/// Features this build supports.
pub const FEATURES: u64 = FEATURE_ZSTD | FEATURE_ZLIB;

/// Largest control message.
pub const MAX_CONTROL: usize = 64 << 10;
/// Largest digest list: enough for every chunk of a maximal block at 1 KiB chunks.
pub const MAX_DIGESTS: usize = (MAX_BLOCK / 1024) * MAX_DIGEST_LEN;
const BLOCK_HEADER: usize = 23;
const FRAME_HEADER: usize = 5;
const PREAMBLE: usize = MAGIC.len() + 2;

const KIND_CONTROL: u8 = 1;
const KIND_BLOCK: u8 = 2;
const KIND_DIGESTS: u8 = 3;

const CHECK_NONE: u8 = 0;
const CHECK_LEAVES: u8 = 1;
const CHECK_PIECES: u8 = 2;

/// Which state file a side uses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StateMode {
    /// The default location for the device.
    Default,
    /// An explicit file (`--state`, `--remote-state`).
    Path(PathBuf),
    /// No state at all (`--no-state`).
    Off,
    /// The default name, in this directory instead of the default one (what a server
    /// started with `--state-dir` makes of `Default`).
    DefaultIn(PathBuf),
}

/// The state options of one side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateOptions {
    /// Which file.
    pub mode: StateMode,
    /// `--trust-state`: use a state whose freshness cannot be verified.
    pub trust: bool,
}

impl StateOptions {
    /// No state.
    pub fn off() -> StateOptions {
        StateOptions { mode: StateMode::Off, trust: false }
    }
}

/// What the client wants to do with the served device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Access {
    /// Only check that it exists.
    Probe,
    /// Read it (source or recheck).
    Read,
    /// Write it (receiver), after the safety checks.
    Write {
        /// Bytes that will be synchronized.
        source_size: u64,
        /// The source's identity, for the same-device refusal.
        source: Option<Identity>,
        /// The source's name for messages.
        source_name: String,
        /// `--force`.
        force: bool,
        /// `--destination-is-zero`: the user declares the device all zero.
        known_zero: bool,
    },
    /// Read it for a dry run: its state is used if fresh, but never saved or removed.
    Inspect,
}

/// What to open on the server, and how.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpenRequest {
    /// Probe, read or write.
    pub access: Access,
    /// Digest algorithm for [`Message::HashBlocks`].
    pub hash: HashAlgo,
    /// Codec for blocks the server sends.
    pub codec: Codec,
    /// Leaf (`--buffer`) size.
    pub buffer: u64,
    /// Chunk size, if chunk digests are kept under leaves.
    pub chunk: Option<u64>,
    /// Which state file to use for the device.
    pub state: StateOptions,
    /// The device the client means, as the bytes of its path: a server started for one
    /// device refuses another, and one started with `--restrict` serves it only if listed.
    pub device: Vec<u8>,
}

/// A path as [`OpenRequest::device`] carries it: its bytes, whatever they are.
pub fn path_bytes(path: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    path.as_os_str().as_bytes().to_vec()
}

/// The path [`path_bytes`] made; `None` for no bytes.
pub fn bytes_path(bytes: &[u8]) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    (!bytes.is_empty()).then(|| PathBuf::from(std::ffi::OsStr::from_bytes(bytes)))
}

/// The server's state as the client needs it to decide between a tree walk, a
/// one-sided comparison and a full read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateSummary {
    /// Every leaf is known from a fresh state.
    pub fresh: bool,
    /// The tree's root when fresh.
    pub root: Option<Vec<u8>>,
    /// Tree height when fresh.
    pub height: u32,
    /// Leaves known from the first on without reading: all of them when fresh, the
    /// confirmed prefix of a checkpoint (an interrupted run) otherwise.
    pub confirmed: u64,
    /// What happened to the state file, for `--verbose`.
    pub note: String,
}

/// What the server reported when it opened its device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Opened {
    /// Its size in bytes.
    pub size: u64,
    /// File or block device.
    pub kind: Kind,
    /// Its identity.
    pub identity: Identity,
    /// True if the server created it.
    pub created: bool,
    /// True if the server resized it (`--force`).
    pub resized: bool,
    /// What the server's state says about the device.
    pub state: StateSummary,
}

/// What the server reported when the session closed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Closed {
    /// Bytes the server read from its device.
    pub bytes_read: u64,
    /// Bytes the server wrote to its device (zeros onto known zeros are not written).
    pub bytes_written: u64,
    /// Someone other than basyn wrote the device during the session.
    pub moved: bool,
    /// What happened to the state file, for `--verbose`.
    pub note: String,
    /// Why the state could not be saved, if so (empty otherwise): a warning for the user.
    pub warning: String,
}

/// Why a session was aborted; decides the exit code on the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AbortCode {
    /// The device could not be used; nothing was written (exit 1).
    Precondition,
    /// A failure during the transfer (exit 2).
    Failed,
    /// The peer sent something that breaks the protocol (exit 2).
    Protocol,
}

/// Control messages, both directions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// First frame from each side.
    Hello {
        /// [`VERSION`].
        version: u32,
        /// Feature bits.
        features: u64,
    },
    /// Client: open the served device (again, if a device is open: that one is finished
    /// first, its state saved).
    Open(OpenRequest),
    /// Server: the device is open.
    Opened(Opened),
    /// Client: digest every `block`-sized piece of `[offset, offset+len)`; answered by
    /// one Digests frame.
    HashBlocks {
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Piece size.
        block: u32,
    },
    /// Client: send `[offset, offset+len)`; answered by one Block frame.
    Read {
        /// Start.
        offset: u64,
        /// Length, at most [`MAX_BLOCK`].
        len: u32,
    },
    /// Client: the digests of these tree nodes of one level; answered by one Digests
    /// frame. Only valid when the server's state is fresh.
    TreeNodes {
        /// Level (0 = leaves).
        level: u32,
        /// Node indices on that level.
        indices: Vec<u64>,
    },
    /// Client: make every write so far durable and checkpoint the state; answered by `Flushed`.
    Flush,
    /// Server: all writes are durable.
    Flushed,
    /// Client: the session is over; answered by `Closed`, then the server exits.
    Close,
    /// Server: the device's state is saved; what the session cost.
    Closed(Closed),
    /// Either side: the session ends with this error.
    Abort {
        /// Which kind of failure.
        code: AbortCode,
        /// One line for the user, naming device and side.
        message: String,
    },
    /// Client: the plain digest (the hash of the bytes, not the leaf rule) of every
    /// whole `buffer`-sized block of `[offset, offset+len)`, as the original's bitmap
    /// holds them; answered by one Digests frame.
    BlockDigests {
        /// Start of the range, on a block boundary.
        offset: u64,
        /// Length of the range.
        len: u64,
    },
    /// Server: still alive, sent every [`HEARTBEAT`] whatever it is doing; no reply, and
    /// the client drops it. So silence from a server means it is stopped or cut off,
    /// never that its disk is slow.
    KeepAlive,
}

/// How often a server says [`Message::KeepAlive`].
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(1);

impl Message {
    /// The message's name, for errors: never its contents, which may be long.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Open(_) => "Open",
            Message::Opened(_) => "Opened",
            Message::HashBlocks { .. } => "HashBlocks",
            Message::Read { .. } => "Read",
            Message::TreeNodes { .. } => "TreeNodes",
            Message::Flush => "Flush",
            Message::Flushed => "Flushed",
            Message::Close => "Close",
            Message::Closed(_) => "Closed",
            Message::Abort { .. } => "Abort",
            Message::BlockDigests { .. } => "BlockDigests",
            Message::KeepAlive => "KeepAlive",
        }
    }
}

/// One frame.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    /// A control message.
    Control(Message),
    /// Device data.
    Block(BlockFrame),
    /// Concatenated digests.
    Digests(Vec<u8>),
}

impl Frame {
    /// Describes the frame for an error message without ever printing a payload.
    pub fn describe(&self) -> String {
        match self {
            Frame::Control(m) => format!("message {}", m.name()),
            Frame::Block(b) => format!("data block at offset {} ({} bytes)", b.offset, b.raw_len),
            Frame::Digests(d) => format!("digest list of {} bytes", d.len()),
        }
    }

    /// The frame's kind and the bytes of its body on a stream, checked against that
    /// kind's limit as a reader of the stream checks it: a frame handed over whole
    /// meets the same limits as one that crosses the wire.
    fn body_len(&self) -> io::Result<usize> {
        let (kind, len) = match self {
            Frame::Control(m) => {
                (KIND_CONTROL, postcard::to_stdvec(m).map_err(|e| io::Error::other(e.to_string()))?.len())
            }
            Frame::Block(b) => {
                let digests = match &b.check {
                    Check::None => &[][..],
                    Check::Leaves(d) | Check::Pieces { digests: d, .. } => &d[..],
                };
                let digest_bytes: usize = digests.iter().map(|d| d.as_bytes().len()).sum();
                (KIND_BLOCK, BLOCK_HEADER + digest_bytes + b.payload.len())
            }
            Frame::Digests(d) => (KIND_DIGESTS, d.len()),
        };
        let max = max_body(kind).unwrap_or(0);
        if len > max {
            return Err(io::Error::other(ProtocolError::TooLong { kind, len, max }));
        }
        Ok(len)
    }
}

/// The largest body a frame of `kind` may have; `None` for an unknown kind.
fn max_body(kind: u8) -> Option<usize> {
    match kind {
        KIND_CONTROL => Some(MAX_CONTROL),
        KIND_BLOCK => Some(MAX_BLOCK + BLOCK_HEADER + MAX_DIGESTS),
        KIND_DIGESTS => Some(MAX_DIGESTS),
        _ => None,
    }
}

/// A broken stream or a frame that breaks the protocol.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The peer closed the stream.
    #[error("the connection closed unexpectedly")]
    Closed,
    /// Reading or writing the stream failed.
    #[error("{}", crate::device::describe_io(.0))]
    Io(#[from] io::Error),
    /// The stream does not start with basyn's magic.
    #[error("the peer does not speak the basyn protocol (got {0:02x?})")]
    BadMagic(Vec<u8>),
    /// Unknown frame kind.
    #[error("unknown frame kind {0}")]
    BadKind(u8),
    /// A frame longer than its kind allows.
    #[error("frame of kind {kind} is {len} bytes, more than the limit {max}")]
    TooLong {
        /// Frame kind.
        kind: u8,
        /// Declared length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// A control message that does not decode.
    #[error("undecodable control message: {0}")]
    BadMessage(String),
    /// A block frame with a short header, an unknown codec or a malformed check.
    #[error("malformed block frame: {0}")]
    BadBlockHeader(&'static str),
    /// A block that may not be written.
    #[error(transparent)]
    Block(#[from] crate::block::BlockError),
    /// A frame that is valid but not expected now.
    #[error("unexpected {what} while {doing}")]
    Unexpected {
        /// The frame, described by [`Frame::describe`].
        what: String,
        /// What was expected.
        doing: &'static str,
    },
    /// A digest list of another length than asked for.
    #[error("digest list of {len} bytes, expected {count} {algo} digests")]
    DigestCount {
        /// Bytes received.
        len: usize,
        /// Digests asked for.
        count: usize,
        /// The session's algorithm.
        algo: HashAlgo,
    },
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: this basyn speaks {ours}, the peer speaks {theirs}")]
    Version {
        /// Ours.
        ours: u32,
        /// Theirs.
        theirs: u32,
    },
}

impl ProtocolError {
    /// `frame` arrived while something else was expected.
    pub fn unexpected(frame: &Frame, doing: &'static str) -> ProtocolError {
        ProtocolError::Unexpected { what: frame.describe(), doing }
    }
}

/// Byte counters shared between a stream's owner and the statistics.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Bytes so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    fn add(&self, n: usize) {
        self.0.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Frames that a local endpoint's thread and the client hand each other whole.
pub type FrameQueue = (crate::queue::Sender<Frame>, crate::queue::Receiver<Frame>);

/// Writes frames to a byte stream, counting bytes; or, between two threads of this
/// process, hands them over whole (counting the bytes they would take on a stream).
pub struct FrameWriter<W: Write> {
    out: Out<W>,
    count: Arc<Counter>,
}

enum Out<W> {
    Stream(W),
    Queue(crate::queue::Sender<Frame>),
}

impl<W: Write> FrameWriter<W> {
    /// Wraps `inner`; call [`FrameWriter::start`] first.
    pub fn new(inner: W, count: Arc<Counter>) -> Self {
        FrameWriter { out: Out::Stream(inner), count }
    }

    /// Hands frames to `queue`, to a reader on another thread of this process.
    pub fn queued(queue: crate::queue::Sender<Frame>, count: Arc<Counter>) -> Self {
        FrameWriter { out: Out::Queue(queue), count }
    }

    /// Writes the preamble: magic and version (a queue needs none: both ends are this
    /// build).
    pub fn start(&mut self) -> io::Result<()> {
        self.count.add(PREAMBLE);
        match &mut self.out {
            Out::Stream(w) => {
                w.write_all(&MAGIC)?;
                w.write_all(&VERSION.to_be_bytes())?;
                w.flush()
            }
            Out::Queue(_) => Ok(()),
        }
    }

    /// Writes one frame (buffered; see [`FrameWriter::flush`]).
    pub fn send(&mut self, frame: &Frame) -> io::Result<()> {
        match &mut self.out {
            Out::Stream(_) => self.encode(frame),
            Out::Queue(_) => self.hand_over(frame.clone()),
        }
    }

    /// Like [`FrameWriter::send`], but a queue takes the frame as it is, data and all.
    pub fn send_owned(&mut self, frame: Frame) -> io::Result<()> {
        match &mut self.out {
            Out::Stream(_) => self.encode(&frame),
            Out::Queue(_) => self.hand_over(frame),
        }
    }

    fn hand_over(&mut self, frame: Frame) -> io::Result<()> {
        let Out::Queue(q) = &mut self.out else { return self.encode(&frame) };
        let len = FRAME_HEADER + frame.body_len()?;
        q.send(frame, len).map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        self.count.add(len);
        Ok(())
    }

    fn encode(&mut self, frame: &Frame) -> io::Result<()> {
        match frame {
            Frame::Control(m) => {
                let body = postcard::to_stdvec(m).map_err(|e| io::Error::other(e.to_string()))?;
                self.raw(KIND_CONTROL, &[&body])
            }
            Frame::Block(b) => {
                let (check, unit, digests) = match &b.check {
                    Check::None => (CHECK_NONE, 0, &[][..]),
                    Check::Leaves(d) => (CHECK_LEAVES, 0, &d[..]),
                    Check::Pieces { unit, digests } => (CHECK_PIECES, *unit, &digests[..]),
                };
                let digest_len = digests.first().map_or(0, |d| d.as_bytes().len());
                let mut head = Vec::with_capacity(BLOCK_HEADER + digests.len() * digest_len);
                head.extend_from_slice(&b.offset.to_le_bytes());
                head.extend_from_slice(&b.raw_len.to_le_bytes());
                head.push(b.codec as u8);
                head.push(check);
                head.extend_from_slice(&unit.to_le_bytes());
                head.extend_from_slice(&(digests.len() as u32).to_le_bytes());
                head.push(digest_len as u8);
                for d in digests {
                    head.extend_from_slice(d.as_bytes());
                }
                self.raw(KIND_BLOCK, &[&head, &b.payload])
            }
            Frame::Digests(d) => self.raw(KIND_DIGESTS, &[d]),
        }
    }

    /// Sends a control message and flushes.
    pub fn message(&mut self, m: Message) -> io::Result<()> {
        self.send_owned(Frame::Control(m))?;
        self.flush()
    }

    fn raw(&mut self, kind: u8, parts: &[&[u8]]) -> io::Result<()> {
        let Out::Stream(w) = &mut self.out else { return Err(io::Error::other("raw bytes into a frame queue")) };
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let len32 = u32::try_from(len).map_err(|_| io::Error::other("frame too long"))?;
        let mut head = [0u8; FRAME_HEADER];
        head[0] = kind;
        head[1..].copy_from_slice(&len32.to_le_bytes());
        w.write_all(&head)?;
        for p in parts {
            w.write_all(p)?;
        }
        self.count.add(FRAME_HEADER + len);
        Ok(())
    }

    /// Flushes buffered frames to the stream.
    pub fn flush(&mut self) -> io::Result<()> {
        match &mut self.out {
            Out::Stream(w) => w.flush(),
            Out::Queue(_) => Ok(()),
        }
    }
}

/// Reads frames from a byte stream, checking every limit before allocating.
pub struct FrameReader<R: Read> {
    inner: In<R>,
    count: Arc<Counter>,
}

enum In<R> {
    Stream(R),
    Queue(crate::queue::Receiver<Frame>),
}

impl<R: Read> FrameReader<R> {
    /// Wraps `inner`; call [`FrameReader::start`] first.
    pub fn new(inner: R, count: Arc<Counter>) -> Self {
        FrameReader { inner: In::Stream(inner), count }
    }

    /// Takes frames whole from `queue`, from a writer on another thread of this process.
    pub fn queued(queue: crate::queue::Receiver<Frame>, count: Arc<Counter>) -> Self {
        FrameReader { inner: In::Queue(queue), count }
    }

    /// Reads and checks the preamble: the magic, then the version, so that another
    /// version of basyn is named as such.
    pub fn start(&mut self) -> Result<(), ProtocolError> {
        let inner = match &mut self.inner {
            In::Stream(r) => r,
            In::Queue(_) => {
                self.count.add(PREAMBLE);
                return Ok(());
            }
        };
        let mut got = Vec::with_capacity(PREAMBLE);
        inner.take(PREAMBLE as u64).read_to_end(&mut got)?;
        self.count.add(got.len());
        if got.is_empty() {
            return Err(ProtocolError::Closed);
        }
        if got.len() < PREAMBLE || got[..MAGIC.len()] != MAGIC {
            return Err(ProtocolError::BadMagic(got));
        }
        let theirs = u16::from_be_bytes([got[MAGIC.len()], got[MAGIC.len() + 1]]);
        if theirs != VERSION {
            return Err(ProtocolError::Version { ours: u32::from(VERSION), theirs: u32::from(theirs) });
        }
        Ok(())
    }

    /// Reads the next frame; `Ok(None)` on a clean end of stream between frames.
    pub fn recv(&mut self) -> Result<Option<Frame>, ProtocolError> {
        let inner = match &mut self.inner {
            In::Stream(r) => r,
            In::Queue(q) => {
                // Its writer measured it against the limits, and weighed it in bytes.
                let Some((frame, len)) = q.recv_weighed() else { return Ok(None) };
                self.count.add(len);
                return Ok(Some(frame));
            }
        };
        let mut head = [0u8; FRAME_HEADER];
        match read_full(inner, &mut head)? {
            0 => return Ok(None),
            FRAME_HEADER => {}
            _ => return Err(ProtocolError::Closed),
        }
        let kind = head[0];
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let max = max_body(kind).ok_or(ProtocolError::BadKind(kind))?;
        if len > max {
            return Err(ProtocolError::TooLong { kind, len, max });
        }
        if kind == KIND_BLOCK && len >= BLOCK_HEADER {
            // The header and digests first, then the payload straight into a buffer of
            // its own: a block's data is not copied out of the frame again.
            let mut meta = vec![0u8; BLOCK_HEADER];
            if read_full(inner, &mut meta)? != BLOCK_HEADER {
                return Err(ProtocolError::Closed);
            }
            let digests = block_digests_len(&meta)?.min(len - BLOCK_HEADER);
            meta.resize(BLOCK_HEADER + digests, 0);
            let mut payload = vec![0u8; len - meta.len()];
            if read_full(inner, &mut meta[BLOCK_HEADER..])? != digests
                || read_full(inner, &mut payload)? != payload.len()
            {
                return Err(ProtocolError::Closed);
            }
            self.count.add(FRAME_HEADER + len);
            return decode_block(&meta, payload).map(|b| Some(Frame::Block(b)));
        }
        let mut body = vec![0u8; len];
        if read_full(inner, &mut body)? != len {
            return Err(ProtocolError::Closed);
        }
        self.count.add(FRAME_HEADER + len);
        decode_body(kind, body).map(Some)
    }
}

/// Decodes a frame body of a known kind (exposed for fuzz-style tests).
pub fn decode_body(kind: u8, body: Vec<u8>) -> Result<Frame, ProtocolError> {
    match kind {
        KIND_CONTROL => {
            let (m, rest) =
                postcard::take_from_bytes::<Message>(&body).map_err(|e| ProtocolError::BadMessage(e.to_string()))?;
            if !rest.is_empty() {
                return Err(ProtocolError::BadMessage(format!("{} trailing bytes", rest.len())));
            }
            Ok(Frame::Control(m))
        }
        KIND_BLOCK => {
            if body.len() < BLOCK_HEADER {
                return Err(ProtocolError::BadBlockHeader("shorter than its header"));
            }
            let split = (BLOCK_HEADER + block_digests_len(&body[..BLOCK_HEADER])?).min(body.len());
            decode_block(&body[..split], body[split..].to_vec()).map(Frame::Block)
        }
        KIND_DIGESTS => Ok(Frame::Digests(body)),
        other => Err(ProtocolError::BadKind(other)),
    }
}

/// The bytes of digests a block header announces, checked against what a block may
/// carry (the count is untrusted and each digest is allocated).
fn block_digests_len(header: &[u8]) -> Result<usize, ProtocolError> {
    let bad = ProtocolError::BadBlockHeader;
    let count = header[18..22].try_into().map(u32::from_le_bytes).map_err(|_| bad("header"))? as usize;
    let digest_len = header[22] as usize;
    if count > 0 && !HashAlgo::ALL.iter().any(|a| a.digest_len() == digest_len) {
        return Err(bad("digest length"));
    }
    count.checked_mul(digest_len).filter(|&n| n <= MAX_DIGESTS).ok_or(bad("more digests than a block may carry"))
}

/// A block from its header and digests (`body`) and its payload.
fn decode_block(body: &[u8], payload: Vec<u8>) -> Result<BlockFrame, ProtocolError> {
    let bad = ProtocolError::BadBlockHeader;
    if body.len() < BLOCK_HEADER {
        return Err(bad("shorter than its header"));
    }
    let u64_at = |at: usize| body[at..at + 8].try_into().map(u64::from_le_bytes).map_err(|_| bad("header"));
    let u32_at = |at: usize| body[at..at + 4].try_into().map(u32::from_le_bytes).map_err(|_| bad("header"));
    let offset = u64_at(0)?;
    let raw_len = u32_at(8)?;
    let codec = PayloadCodec::from_byte(body[12]).ok_or(bad("unknown codec"))?;
    let (kind, unit, count, digest_len) = (body[13], u32_at(14)?, u32_at(18)? as usize, body[22] as usize);
    // Only the lengths of real digests, and no more of them than a digest list holds:
    // the count is untrusted and each digest is allocated.
    if count > 0 && !HashAlgo::ALL.iter().any(|a| a.digest_len() == digest_len) {
        return Err(bad("digest length"));
    }
    let digests_end = count
        .checked_mul(digest_len)
        .filter(|&n| n <= MAX_DIGESTS)
        .map(|n| n + BLOCK_HEADER)
        .filter(|&end| end <= body.len())
        .ok_or(bad("more digests than a block may carry"))?;
    let digests: Vec<Digest> =
        body[BLOCK_HEADER..digests_end].chunks(digest_len.max(1)).map(Digest::from_slice).collect();
    let check = match kind {
        CHECK_NONE if count == 0 => Check::None,
        CHECK_LEAVES => Check::Leaves(digests),
        CHECK_PIECES if unit > 0 => Check::Pieces { unit, digests },
        _ => return Err(bad("unknown check")),
    };
    if digests_end != body.len() {
        return Err(bad("more digests than a block may carry"));
    }
    Ok(BlockFrame { offset, raw_len, codec, check, payload })
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Splits a Digests frame into `count` digests of `algo`, or fails if it has another length.
pub fn split_digests(algo: HashAlgo, bytes: &[u8], count: usize) -> Result<Vec<Digest>, ProtocolError> {
    let dl = algo.digest_len();
    if bytes.len() != count * dl {
        return Err(ProtocolError::DigestCount { len: bytes.len(), count, algo });
    }
    Ok(bytes.chunks(dl).map(Digest::from_slice).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn preamble() -> Vec<u8> {
        let mut p = MAGIC.to_vec();
        p.extend_from_slice(&VERSION.to_be_bytes());
        p
    }

    fn layout() -> crate::tree::Layout {
        crate::tree::Layout { hash: HashAlgo::Sha1, buffer: 4096, chunk: None, fanout: 4, device_size: 1 << 20 }
    }

    fn round_trip(frames: &[Frame]) -> Vec<Frame> {
        let mut buf = Vec::new();
        let mut w = FrameWriter::new(&mut buf, Arc::default());
        w.start().unwrap();
        for f in frames {
            w.send(f).unwrap();
        }
        let mut r = FrameReader::new(&buf[..], Arc::default());
        r.start().unwrap();
        let mut out = Vec::new();
        while let Some(f) = r.recv().unwrap() {
            out.push(f);
        }
        out
    }

    #[test]
    fn frames_round_trip() {
        let frames = vec![
            Frame::Control(Message::Hello { version: u32::from(VERSION), features: FEATURES }),
            Frame::Control(Message::HashBlocks { offset: 1 << 40, len: 77, block: 4096 }),
            Frame::Control(Message::Abort { code: AbortCode::Failed, message: "remote /x: boom".into() }),
            Frame::Block(BlockFrame::encode(4096, &[5u8; 10000], Codec::Zstd(3), Check::None)),
            Frame::Block(BlockFrame::encode(
                0,
                &[6u8; 300],
                Codec::None,
                Check::Pieces { unit: 100, digests: HashAlgo::Sha1.digest_pieces(&[6u8; 300], 100) },
            )),
            Frame::Block(BlockFrame::encode(
                8192,
                &[7u8; 30],
                Codec::Zlib(6),
                Check::Leaves(vec![HashAlgo::Md5.digest(b"leaf")]),
            )),
            Frame::Digests(vec![1, 2, 3, 4]),
        ];
        assert_eq!(round_trip(&frames), frames);
    }

    #[test]
    fn frames_handed_over_whole_arrive_as_sent_and_count_as_on_a_stream() {
        let frames = golden_session();
        let mut bytes = Vec::new();
        let streamed = Arc::new(Counter::default());
        let mut w = FrameWriter::new(&mut bytes, streamed.clone());
        w.start().unwrap();
        for f in &frames {
            w.send(f).unwrap();
        }
        let (tx, rx, _) = crate::queue::bounded(1 << 20);
        let (sent, received) = (Arc::new(Counter::default()), Arc::new(Counter::default()));
        let mut w = FrameWriter::<std::io::Sink>::queued(tx, sent.clone());
        let mut r = FrameReader::<std::io::Empty>::queued(rx, received.clone());
        w.start().unwrap();
        r.start().unwrap();
        let mut got = Vec::new();
        for f in frames.clone() {
            w.send_owned(f).unwrap();
            got.push(r.recv().unwrap().unwrap());
        }
        drop(w);
        assert!(r.recv().unwrap().is_none(), "the writer's end is the stream's end");
        assert_eq!(got, frames);
        assert_eq!(sent.get(), bytes.len() as u64);
        assert_eq!(received.get(), bytes.len() as u64);
    }

    #[test]
    fn a_handed_over_frame_meets_the_stream_limits() {
        let (tx, _rx, _) = crate::queue::bounded(1 << 20);
        let mut w = FrameWriter::<std::io::Sink>::queued(tx, Arc::default());
        let too_long = Frame::Control(Message::Abort { code: AbortCode::Failed, message: "x".repeat(MAX_CONTROL) });
        let e = w.send_owned(too_long).unwrap_err();
        assert!(e.to_string().contains("more than the limit"), "{e}");
        assert!(w.send_owned(Frame::Digests(vec![0; MAX_DIGESTS + 1])).is_err());
    }

    /// A version-5 session whose encoding must never change (`fixtures/protocol/`).
    fn golden_session() -> Vec<Frame> {
        let identity = Identity {
            boot_id: "8d1c9a52-1f5e-4c33-9b1a-2f4e6d7c8b9a".into(),
            kind: Kind::Block,
            dev: 5,
            ino: 1234,
            rdev: (7 << 8) | 3,
            backing: Some((2049, 77)),
        };
        vec![
            Frame::Control(Message::Hello { version: 5, features: FEATURE_ZSTD | FEATURE_ZLIB }),
            Frame::Control(Message::Open(OpenRequest {
                access: Access::Write {
                    source_size: 1 << 30,
                    source: Some(identity.clone()),
                    source_name: "local /dev/vg0/root".into(),
                    force: false,
                    known_zero: true,
                },
                hash: HashAlgo::Blake3,
                codec: Codec::Zstd(3),
                buffer: 2 << 20,
                chunk: Some(64 << 10),
                state: StateOptions { mode: StateMode::Path("/var/lib/basyn/x.basyn-state".into()), trust: true },
                device: b"/dev/vg0/backup".to_vec(),
            })),
            Frame::Control(Message::Opened(Opened {
                size: 1 << 30,
                kind: Kind::File,
                identity,
                created: true,
                resized: false,
                state: StateSummary {
                    fresh: true,
                    root: Some(vec![7; 32]),
                    height: 3,
                    confirmed: 512,
                    note: "fresh".into(),
                },
            })),
            Frame::Control(Message::TreeNodes { level: 1, indices: vec![0, 5, 63] }),
            Frame::Control(Message::HashBlocks { offset: 2 << 20, len: 16 << 20, block: 2 << 20 }),
            Frame::Digests((0u8..64).collect()),
            Frame::Control(Message::BlockDigests { offset: 4 << 20, len: 6 << 20 }),
            Frame::Digests((64u8..160).collect()),
            Frame::Control(Message::Read { offset: 4096, len: 8 }),
            Frame::Block(BlockFrame {
                offset: 4096,
                raw_len: 8,
                codec: PayloadCodec::Raw,
                check: Check::None,
                payload: b"basyn!\n\0".to_vec(),
            }),
            Frame::Block(BlockFrame {
                offset: 2 << 20,
                raw_len: 8,
                codec: PayloadCodec::Raw,
                check: Check::Pieces {
                    unit: 4,
                    digests: vec![Digest::from_slice(&[1; 32]), Digest::from_slice(&[2; 32])],
                },
                payload: b"pieces!\n".to_vec(),
            }),
            Frame::Block(BlockFrame {
                offset: 4 << 20,
                raw_len: 1 << 20,
                codec: PayloadCodec::Zero,
                check: Check::Leaves(vec![Digest::from_slice(&[3; 32])]),
                payload: Vec::new(),
            }),
            Frame::Control(Message::Flush),
            Frame::Control(Message::Flushed),
            Frame::Control(Message::Abort {
                code: AbortCode::Precondition,
                message: "remote /x: no such file or device".into(),
            }),
            Frame::Control(Message::Open(OpenRequest {
                access: Access::Inspect,
                hash: HashAlgo::Sha256,
                codec: Codec::None,
                buffer: 1 << 20,
                chunk: None,
                state: StateOptions { mode: StateMode::Default, trust: false },
                device: b"/dev/sdb".to_vec(),
            })),
            Frame::Control(Message::Close),
            Frame::Control(Message::Closed(Closed {
                bytes_read: 1 << 20,
                bytes_written: 1 << 19,
                moved: false,
                note: "saved".into(),
                warning: String::new(),
            })),
        ]
    }

    #[test]
    fn the_version_6_encoding_matches_the_golden_fixture() {
        let mut bytes = Vec::new();
        let mut w = FrameWriter::new(&mut bytes, Arc::default());
        w.start().unwrap();
        for f in golden_session() {
            w.send(&f).unwrap();
        }
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/protocol/session-v6.bin");
        if std::env::var_os("BASYN_BLESS").is_some() {
            std::fs::write(path, &bytes).unwrap();
        }
        let golden = std::fs::read(path).expect("fixtures/protocol/session-v6.bin (BASYN_BLESS=1 writes it)");
        assert_eq!(bytes, golden, "the wire encoding changed; bump VERSION instead");
        let mut r = FrameReader::new(&golden[..], Arc::default());
        r.start().unwrap();
        let mut decoded = Vec::new();
        while let Some(f) = r.recv().unwrap() {
            decoded.push(f);
        }
        assert_eq!(decoded, golden_session());
    }

    #[test]
    fn oversized_frames_are_refused_before_allocation() {
        let mut bytes = preamble();
        bytes.push(KIND_BLOCK);
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        let mut r = FrameReader::new(&bytes[..], Arc::default());
        r.start().unwrap();
        assert!(matches!(r.recv(), Err(ProtocolError::TooLong { .. })));
    }

    #[test]
    fn a_foreign_stream_is_named_as_such() {
        let mut r = FrameReader::new(&b"SSH-2.0-OpenSSH\r\n"[..], Arc::default());
        assert!(matches!(r.start(), Err(ProtocolError::BadMagic(_))));
    }

    #[test]
    fn another_version_is_named_before_anything_else() {
        let mut r = FrameReader::new(&b"BASYN\0\x00\x03\x01\x00\x00\x00\x00"[..], Arc::default());
        let e = r.start().unwrap_err();
        assert!(matches!(e, ProtocolError::Version { ours: 6, theirs: 3 }), "{e}");
        assert_eq!(e.to_string(), "protocol version mismatch: this basyn speaks 6, the peer speaks 3");
    }

    #[test]
    fn frames_are_described_without_their_payload() {
        let big = Frame::Block(BlockFrame::encode(7, &vec![1u8; 1 << 20], Codec::None, Check::None));
        assert_eq!(big.describe(), "data block at offset 7 (1048576 bytes)");
        let nodes = Frame::Control(Message::TreeNodes { level: 0, indices: (0..5000).collect() });
        assert_eq!(nodes.describe(), "message TreeNodes");
    }

    #[test]
    fn a_block_with_millions_of_tiny_digests_is_refused_before_allocating_them() {
        let mut body = BlockFrame::encode(0, &[1u8; 10], Codec::None, Check::None);
        body.check = Check::Leaves(vec![Digest::from_slice(&[9; 32])]);
        let mut bytes = Vec::new();
        FrameWriter::new(&mut bytes, Arc::default()).send(&Frame::Block(body)).unwrap();
        // One-byte digests: a length no algorithm has.
        bytes[5 + 22] = 1;
        bytes[5 + 18..5 + 22].copy_from_slice(&32u32.to_le_bytes());
        let mut r = FrameReader::new(&bytes[..], Arc::default());
        assert!(matches!(r.recv(), Err(ProtocolError::BadBlockHeader("digest length"))));
    }

    #[test]
    fn a_block_claiming_more_digests_than_it_holds_is_refused() {
        let mut body = BlockFrame::encode(0, &[1u8; 10], Codec::None, Check::None);
        body.check = Check::Leaves(vec![Digest::from_slice(&[9; 32])]);
        let mut bytes = Vec::new();
        FrameWriter::new(&mut bytes, Arc::default()).send(&Frame::Block(body)).unwrap();
        // Claim a million digests in the count field (after the 5-byte frame header).
        bytes[5 + 18..5 + 22].copy_from_slice(&1_000_000u32.to_le_bytes());
        let mut r = FrameReader::new(&bytes[..], Arc::default());
        assert!(matches!(r.recv(), Err(ProtocolError::BadBlockHeader(_))));
    }

    proptest! {
        #[test]
        fn the_decoder_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut input = preamble();
            input.extend_from_slice(&bytes);
            let mut r = FrameReader::new(&input[..], Arc::default());
            r.start().unwrap();
            for _ in 0..64 {
                match r.recv() {
                    Ok(Some(Frame::Block(b))) => { let _ = b.verify(1 << 30, &layout()); }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }

        #[test]
        fn control_bodies_never_panic(kind in 0u8..5, body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_body(kind, body);
        }

        #[test]
        fn mutated_valid_frames_never_panic(pos in 0usize..64, val in any::<u8>()) {
            let mut buf = Vec::new();
            let mut w = FrameWriter::new(&mut buf, Arc::default());
            w.send(&Frame::Control(Message::Open(OpenRequest {
                access: Access::Write {
                    source_size: 9,
                    source: None,
                    source_name: "a".into(),
                    force: false,
                    known_zero: false,
                },
                hash: HashAlgo::Sha1,
                codec: Codec::Zlib(9),
                buffer: 4096,
                chunk: None,
                state: StateOptions { mode: StateMode::Default, trust: false },
                device: b"/dev/vg0/backup".to_vec(),
            })))
            .unwrap();
            let check = Check::Pieces { unit: 16, digests: HashAlgo::Sha1.digest_pieces(&[1u8; 40], 16) };
            w.send(&Frame::Block(BlockFrame::encode(0, &[1u8; 40], Codec::Zstd(1), check))).unwrap();
            let p = pos % buf.len();
            buf[p] = val;
            let mut r = FrameReader::new(&buf[..], Arc::default());
            while let Ok(Some(f)) = r.recv() {
                if let Frame::Block(b) = f { let _ = b.verify(1 << 20, &layout()); }
            }
        }
    }
}
