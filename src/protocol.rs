//! The wire protocol between basyn and `basyn serve`: a preamble, then length-prefixed
//! frames over any byte stream. See `docs/protocol.md`.
//!
//! ```text
//! stream   := MAGIC frame*            (each direction starts with the 8-byte MAGIC)
//! frame    := kind:u8 len:u32le payload[len]
//! kind 1   Control  payload = postcard(Message), len <= MAX_CONTROL
//! kind 2   Block    payload = offset:u64le raw_len:u32le codec:u8 data[..]
//! kind 3   Digests  payload = digest*  (concatenated, each of the session's digest length)
//! ```
//!
//! Every length is checked against its maximum before anything is allocated; a frame
//! from the wire is untrusted until [`BlockFrame::decode`] has bounds-checked and
//! decompressed it.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::compress::{self, Codec, PayloadCodec};
use crate::device::{Identity, Kind};
use crate::hash::HashAlgo;
use crate::ledger::StateOptions;

/// First bytes each side writes: "BASYN", a zero, and the protocol major as a byte pair.
pub const MAGIC: [u8; 8] = *b"BASYN\0\x00\x02";
/// Protocol version carried in [`Message::Hello`]; a mismatch is refused.
pub const VERSION: u32 = 2;
/// Feature bit: the peer can decode zstd block payloads.
pub const FEATURE_ZSTD: u64 = 1;
/// Feature bit: the peer can decode zlib block payloads.
pub const FEATURE_ZLIB: u64 = 2;
/// Features this build supports.
pub const FEATURES: u64 = FEATURE_ZSTD | FEATURE_ZLIB;

/// Largest block (`--buffer`) the protocol carries: 64 MiB.
pub const MAX_BLOCK: usize = 64 << 20;
/// Largest control message.
pub const MAX_CONTROL: usize = 64 << 10;
/// Largest digest list: enough for every chunk of a maximal block at 1 KiB chunks.
pub const MAX_DIGESTS: usize = (MAX_BLOCK / 1024) * crate::hash::MAX_DIGEST_LEN;
const BLOCK_HEADER: usize = 13;
const FRAME_HEADER: usize = 5;

const KIND_CONTROL: u8 = 1;
const KIND_BLOCK: u8 = 2;
const KIND_DIGESTS: u8 = 3;

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
    },
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
    /// What happened to the state file, for `--verbose`.
    pub note: String,
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
    Open {
        /// How.
        access: Access,
        /// Digest algorithm for [`Message::HashBlocks`].
        hash: HashAlgo,
        /// Codec for blocks the server sends.
        codec: Codec,
        /// Leaf (`--buffer`) size.
        buffer: u64,
        /// Chunk size, if chunk digests are kept under leaves.
        chunk: Option<u64>,
        /// Which state file to use for the device.
        state: StateOptions,
    },
    /// Server: the device is open.
    Opened {
        /// Its size in bytes.
        size: u64,
        /// File or block device.
        kind: Kind,
        /// Its identity.
        identity: Identity,
        /// True if the server created it.
        created: bool,
        /// True if the server resized it (`--force`).
        resized: bool,
        /// What the server's state says about the device.
        state: StateSummary,
    },
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
    Closed {
        /// Bytes the server read from its device.
        bytes_read: u64,
        /// Someone other than basyn wrote the device during the session.
        moved: bool,
        /// What happened to the state file, for `--verbose`.
        note: String,
    },
    /// Either side: the session ends with this error.
    Abort {
        /// Which kind of failure.
        code: AbortCode,
        /// One line for the user, naming device and side.
        message: String,
    },
}

/// A bulk data frame: a block (or chunk) of device data, possibly compressed.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockFrame {
    /// Device offset of the data.
    pub offset: u64,
    /// Length of the data once decoded.
    pub raw_len: u32,
    /// How `payload` is encoded.
    pub codec: PayloadCodec,
    /// Encoded bytes.
    pub payload: Vec<u8>,
}

impl BlockFrame {
    /// Encodes `data` found at `offset` with `codec`.
    pub fn encode(offset: u64, data: &[u8], codec: Codec) -> BlockFrame {
        let (pc, payload) = codec.encode(data);
        BlockFrame { offset, raw_len: data.len() as u32, codec: pc, payload }
    }

    /// Checks the frame against a device of `device_size` bytes and decodes its data.
    /// This is the only way from wire bytes to data that may be written.
    pub fn decode(&self, device_size: u64) -> Result<Vec<u8>, ProtocolError> {
        let end = self.offset.checked_add(u64::from(self.raw_len));
        if end.is_none_or(|e| e > device_size) || self.raw_len as usize > MAX_BLOCK {
            return Err(ProtocolError::OutOfBounds {
                offset: self.offset,
                len: u64::from(self.raw_len),
                size: device_size,
            });
        }
        compress::decode(self.codec, &self.payload, self.raw_len as usize)
            .map_err(|e| ProtocolError::BadBlock { offset: self.offset, reason: e.to_string() })
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

/// A broken stream or a frame that breaks the protocol.
#[derive(Debug, thiserror::Error)]
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
    /// A block frame with a short header or unknown codec.
    #[error("malformed block frame")]
    BadBlockHeader,
    /// A block outside the device.
    #[error("block at offset {offset} of {len} bytes lies outside the device of {size} bytes")]
    OutOfBounds {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Device size.
        size: u64,
    },
    /// A block whose payload does not decode.
    #[error("block at offset {offset}: {reason}")]
    BadBlock {
        /// Offset.
        offset: u64,
        /// Why.
        reason: String,
    },
    /// A frame that is valid but not expected now.
    #[error("unexpected {0}")]
    Unexpected(String),
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: this basyn speaks {ours}, the peer speaks {theirs}")]
    Version {
        /// Ours.
        ours: u32,
        /// Theirs.
        theirs: u32,
    },
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

/// Writes frames to a byte stream, counting bytes.
pub struct FrameWriter<W: Write> {
    inner: W,
    count: Arc<Counter>,
}

impl<W: Write> FrameWriter<W> {
    /// Wraps `inner`; call [`FrameWriter::start`] first.
    pub fn new(inner: W, count: Arc<Counter>) -> Self {
        FrameWriter { inner, count }
    }

    /// Writes the magic preamble.
    pub fn start(&mut self) -> io::Result<()> {
        self.inner.write_all(&MAGIC)?;
        self.count.add(MAGIC.len());
        self.inner.flush()
    }

    /// Writes one frame (buffered; see [`FrameWriter::flush`]).
    pub fn send(&mut self, frame: &Frame) -> io::Result<()> {
        match frame {
            Frame::Control(m) => {
                let body = postcard::to_stdvec(m).map_err(|e| io::Error::other(e.to_string()))?;
                self.raw(KIND_CONTROL, &[&body])
            }
            Frame::Block(b) => {
                let mut head = [0u8; BLOCK_HEADER];
                head[..8].copy_from_slice(&b.offset.to_le_bytes());
                head[8..12].copy_from_slice(&b.raw_len.to_le_bytes());
                head[12] = b.codec as u8;
                self.raw(KIND_BLOCK, &[&head, &b.payload])
            }
            Frame::Digests(d) => self.raw(KIND_DIGESTS, &[d]),
        }
    }

    /// Sends a control message and flushes.
    pub fn message(&mut self, m: Message) -> io::Result<()> {
        self.send(&Frame::Control(m))?;
        self.flush()
    }

    fn raw(&mut self, kind: u8, parts: &[&[u8]]) -> io::Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let len32 = u32::try_from(len).map_err(|_| io::Error::other("frame too long"))?;
        let mut head = [0u8; FRAME_HEADER];
        head[0] = kind;
        head[1..].copy_from_slice(&len32.to_le_bytes());
        self.inner.write_all(&head)?;
        for p in parts {
            self.inner.write_all(p)?;
        }
        self.count.add(FRAME_HEADER + len);
        Ok(())
    }

    /// Flushes buffered frames to the stream.
    pub fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reads frames from a byte stream, checking every limit before allocating.
pub struct FrameReader<R: Read> {
    inner: R,
    count: Arc<Counter>,
}

impl<R: Read> FrameReader<R> {
    /// Wraps `inner`; call [`FrameReader::start`] first.
    pub fn new(inner: R, count: Arc<Counter>) -> Self {
        FrameReader { inner, count }
    }

    /// Reads and checks the magic preamble.
    pub fn start(&mut self) -> Result<(), ProtocolError> {
        let mut got = Vec::with_capacity(MAGIC.len());
        (&mut self.inner).take(MAGIC.len() as u64).read_to_end(&mut got)?;
        self.count.add(got.len());
        if got.is_empty() {
            return Err(ProtocolError::Closed);
        }
        if got != MAGIC {
            return Err(ProtocolError::BadMagic(got));
        }
        Ok(())
    }

    /// Reads the next frame; `Ok(None)` on a clean end of stream between frames.
    pub fn recv(&mut self) -> Result<Option<Frame>, ProtocolError> {
        let mut head = [0u8; FRAME_HEADER];
        match read_full(&mut self.inner, &mut head)? {
            0 => return Ok(None),
            FRAME_HEADER => {}
            _ => return Err(ProtocolError::Closed),
        }
        let kind = head[0];
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let max = match kind {
            KIND_CONTROL => MAX_CONTROL,
            KIND_BLOCK => MAX_BLOCK + BLOCK_HEADER,
            KIND_DIGESTS => MAX_DIGESTS,
            other => return Err(ProtocolError::BadKind(other)),
        };
        if len > max {
            return Err(ProtocolError::TooLong { kind, len, max });
        }
        let mut body = vec![0u8; len];
        if read_full(&mut self.inner, &mut body)? != len {
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
                return Err(ProtocolError::BadBlockHeader);
            }
            let offset = u64::from_le_bytes(body[..8].try_into().map_err(|_| ProtocolError::BadBlockHeader)?);
            let raw_len = u32::from_le_bytes(body[8..12].try_into().map_err(|_| ProtocolError::BadBlockHeader)?);
            let codec = PayloadCodec::from_byte(body[12]).ok_or(ProtocolError::BadBlockHeader)?;
            let payload = body[BLOCK_HEADER..].to_vec();
            Ok(Frame::Block(BlockFrame { offset, raw_len, codec, payload }))
        }
        KIND_DIGESTS => Ok(Frame::Digests(body)),
        other => Err(ProtocolError::BadKind(other)),
    }
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
pub fn split_digests(algo: HashAlgo, bytes: &[u8], count: usize) -> Result<Vec<crate::hash::Digest>, ProtocolError> {
    let dl = algo.digest_len();
    if bytes.len() != count * dl {
        return Err(ProtocolError::Unexpected(format!(
            "digest list of {} bytes, expected {count} {algo} digests",
            bytes.len()
        )));
    }
    Ok(bytes.chunks(dl).map(crate::hash::Digest::from_slice).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::StateMode;
    use proptest::prelude::*;

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
            Frame::Control(Message::Hello { version: VERSION, features: FEATURES }),
            Frame::Control(Message::HashBlocks { offset: 1 << 40, len: 77, block: 4096 }),
            Frame::Control(Message::Abort { code: AbortCode::Failed, message: "remote /x: boom".into() }),
            Frame::Block(BlockFrame::encode(4096, &[5u8; 10000], Codec::Zstd(3))),
            Frame::Digests(vec![1, 2, 3, 4]),
        ];
        assert_eq!(round_trip(&frames), frames);
    }

    /// A version-2 session whose encoding must never change (`fixtures/protocol/`).
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
            Frame::Control(Message::Hello { version: 2, features: FEATURE_ZSTD | FEATURE_ZLIB }),
            Frame::Control(Message::Open {
                access: Access::Write {
                    source_size: 1 << 30,
                    source: Some(identity.clone()),
                    source_name: "local /dev/vg0/root".into(),
                    force: false,
                },
                hash: HashAlgo::Blake3,
                codec: Codec::Zstd(3),
                buffer: 2 << 20,
                chunk: Some(64 << 10),
                state: StateOptions { mode: StateMode::Path("/var/lib/basyn/x.basyn-state".into()), trust: true },
            }),
            Frame::Control(Message::Opened {
                size: 1 << 30,
                kind: Kind::File,
                identity,
                created: true,
                resized: false,
                state: StateSummary { fresh: true, root: Some(vec![7; 32]), height: 3, note: "fresh".into() },
            }),
            Frame::Control(Message::TreeNodes { level: 1, indices: vec![0, 5, 63] }),
            Frame::Control(Message::HashBlocks { offset: 2 << 20, len: 16 << 20, block: 2 << 20 }),
            Frame::Digests((0u8..64).collect()),
            Frame::Control(Message::Read { offset: 4096, len: 8 }),
            Frame::Block(BlockFrame {
                offset: 4096,
                raw_len: 8,
                codec: PayloadCodec::Raw,
                payload: b"basyn!\n\0".to_vec(),
            }),
            Frame::Control(Message::Flush),
            Frame::Control(Message::Flushed),
            Frame::Control(Message::Abort {
                code: AbortCode::Precondition,
                message: "remote /x: no such file or device".into(),
            }),
            Frame::Control(Message::Close),
            Frame::Control(Message::Closed { bytes_read: 1 << 20, moved: false, note: "saved".into() }),
        ]
    }

    #[test]
    fn the_version_2_encoding_matches_the_golden_fixture() {
        let mut bytes = Vec::new();
        let mut w = FrameWriter::new(&mut bytes, Arc::default());
        w.start().unwrap();
        for f in golden_session() {
            w.send(&f).unwrap();
        }
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/protocol/session-v2.bin");
        if std::env::var_os("BASYN_BLESS").is_some() {
            std::fs::write(path, &bytes).unwrap();
        }
        let golden = std::fs::read(path).expect("fixtures/protocol/session-v2.bin (BASYN_BLESS=1 writes it)");
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
        let mut bytes = MAGIC.to_vec();
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
    fn blocks_outside_the_device_are_refused() {
        let b = BlockFrame::encode(u64::MAX - 2, &[0u8; 8], Codec::None);
        assert!(matches!(b.decode(u64::MAX), Err(ProtocolError::OutOfBounds { .. })));
        let b = BlockFrame::encode(100, &[0u8; 8], Codec::None);
        assert!(b.decode(107).is_err());
        assert_eq!(b.decode(108).unwrap(), vec![0u8; 8]);
    }

    proptest! {
        #[test]
        fn the_decoder_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut input = MAGIC.to_vec();
            input.extend_from_slice(&bytes);
            let mut r = FrameReader::new(&input[..], Arc::default());
            r.start().unwrap();
            for _ in 0..64 {
                match r.recv() {
                    Ok(Some(Frame::Block(b))) => { let _ = b.decode(1 << 30); }
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
            w.send(&Frame::Control(Message::Open {
                access: Access::Write { source_size: 9, source: None, source_name: "a".into(), force: false },
                hash: HashAlgo::Sha1,
                codec: Codec::Zlib(9),
                buffer: 4096,
                chunk: None,
                state: StateOptions { mode: StateMode::Default, trust: false },
            }))
            .unwrap();
            w.send(&Frame::Block(BlockFrame::encode(0, &[1u8; 40], Codec::Zstd(1)))).unwrap();
            let p = pos % buf.len();
            buf[p] = val;
            let mut r = FrameReader::new(&buf[..], Arc::default());
            while let Ok(Some(f)) = r.recv() {
                if let Frame::Block(b) = f { let _ = b.decode(1 << 20); }
            }
        }
    }
}
