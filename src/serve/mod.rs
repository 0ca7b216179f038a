//! `basyn serve PATH`: the far endpoint, the mirror image of the client in `endpoint`.
//! Speaks the protocol's types on stdin/stdout and touches only the device named on its
//! command line and that device's state file. `work`: what a session does on worker
//! threads (checking blocks, answering reads) and the digests it answers.

mod thread;
mod work;

pub use thread::start as start_on_a_thread;

use work::{Answers, Checking, Learnt, ReadJob, check_block, digest_range, plain_digests, send_replies};

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};

use crate::block::VerifiedBlock;
use crate::compress::Codec;
use crate::device::{Device, DeviceError, Identity, ReceiverSpec, Side};
use crate::digest_index::{DigestIndex, SaveError};
use crate::hash::HashAlgo;
use crate::leaf_reader;
use crate::ordered::Ordered;
use crate::protocol::{
    AbortCode, Access, Closed, Counter, FEATURES, Frame, FrameReader, FrameWriter, HEARTBEAT, MAX_BLOCK, MAX_DIGESTS,
    Message, OpenRequest, Opened, ProtocolError, StateMode, StateOptions, StateSummary, VERSION,
};
use crate::restrict::Config;
use crate::stamp::Role;
use crate::state::StateError;
use crate::tree::{DEFAULT_FANOUT, Layout};

/// Why a session ended early.
#[derive(Debug)]
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

impl From<DeviceError> for Abort {
    fn from(e: DeviceError) -> Abort {
        Abort { code: AbortCode::Failed, message: e.to_string() }
    }
}

impl From<StateError> for Abort {
    fn from(e: StateError) -> Abort {
        Abort { code: AbortCode::Failed, message: format!("remote {e}") }
    }
}

impl From<SaveError> for Abort {
    fn from(e: SaveError) -> Abort {
        match e {
            SaveError::Device(e) => e.into(),
            SaveError::State(e) => e.into(),
        }
    }
}

/// A request whose parameters no basyn client sends.
fn invalid(what: String, doing: &'static str) -> Abort {
    ProtocolError::Unexpected { what, doing }.into()
}

/// Serves `path` over `input`/`output` until the client closes; returns the exit code.
/// From the handshake on, a second thread says [`Message::KeepAlive`] every
/// [`HEARTBEAT`], so that the client can tell a server busy on a slow disk from one that
/// is stopped or cut off.
pub fn serve(config: &Config, input: impl Read, output: impl Write + Send) -> i32 {
    let r = FrameReader::new(BufReader::with_capacity(1 << 20, input), Arc::new(Counter::default()));
    let w = FrameWriter::new(BufWriter::with_capacity(1 << 20, output), Arc::new(Counter::default()));
    serve_frames(config, r, w)
}

/// [`serve`] over frames, from a stream or handed over whole by a client on another
/// thread of this process ([`crate::endpoint::Endpoint::connect`] for a local run).
pub fn serve_frames<R: Read, W: Write + Send>(config: &Config, mut r: FrameReader<R>, w: FrameWriter<W>) -> i32 {
    let w = Mutex::new(w);
    let result = std::thread::scope(|scope| {
        {
            let mut w = lock(&w);
            let hello = Message::Hello { version: u32::from(VERSION), features: FEATURES };
            w.start().and_then(|()| w.message(hello)).map_err(|e| Abort::from(ProtocolError::from(e)))?;
        }
        let (stop, stopped) = mpsc::channel::<()>();
        scope.spawn(|| keep_alive(&w, stopped));
        let result = session(config, &mut r, &w);
        drop(stop);
        result
    });
    match result {
        Ok(()) => 0,
        Err(abort) => {
            // The client may already be gone; the abort is best effort.
            let _ = lock(&w).message(Message::Abort { code: abort.code, message: abort.message.clone() });
            match abort.code {
                AbortCode::Precondition => 1,
                AbortCode::Failed | AbortCode::Protocol => 2,
            }
        }
    }
}

/// The writer, whoever panicked while holding it (frames are written whole or not at all
/// as far as the reader can tell: it would fail on a torn one).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Says KeepAlive every [`HEARTBEAT`] until `stop` is dropped or the client is gone.
fn keep_alive<W: Write>(w: &Mutex<FrameWriter<W>>, stop: mpsc::Receiver<()>) {
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(HEARTBEAT) {
        if lock(w).message(Message::KeepAlive).is_err() {
            return;
        }
    }
}

/// Blocks of at most this many bytes are checked by the thread that writes them, when no
/// block is ahead of them on the workers: a scattered change's 16 KiB pieces cost less to
/// hash (a few µs) than to hand to a worker and take back.
const INLINE_CHECK: usize = 64 << 10;

fn session<R: Read, W: Write + Send>(
    config: &Config,
    r: &mut FrameReader<R>,
    w: &Mutex<FrameWriter<W>>,
) -> Result<(), Abort> {
    r.start()?;
    match r.recv()? {
        Some(Frame::Control(Message::Hello { version, .. })) if version == u32::from(VERSION) => {}
        Some(Frame::Control(Message::Hello { version, .. })) => {
            return Err(ProtocolError::Version { ours: u32::from(VERSION), theirs: version }.into());
        }
        None => return Ok(()),
        Some(other) => return Err(ProtocolError::unexpected(&other, "waiting for Hello").into()),
    }
    let mut server = Server { config, open: None, totals: Closed::default(), buf: Vec::new() };
    std::thread::scope(|scope| {
        // Blocks for the device are decoded and checked on every core while this thread
        // reads the next frames; it writes them, in order.
        let workers = leaf_reader::workers();
        let mut checking = Ordered::spawn(scope, workers, 2, check_block);
        // Reads of a source are read, hashed and compressed there too, and a thread of
        // their own sends the replies in order as they are ready (this one may be
        // waiting for the next request meanwhile); the leaves they read come back here
        // for the source's index.
        let (mut reads, replies) = Ordered::spawn(scope, workers, 2, |job: ReadJob| job.run()).split();
        let (answered, answers) = mpsc::channel();
        scope.spawn(move || send_replies(replies, w, answered));
        let mut answers = Answers::new(answers);
        loop {
            // The client went away: keep nothing a state file could misread.
            let Some(frame) = r.recv()? else { return server.write_checked(&mut checking, 0) };
            if matches!(frame, Frame::Block(_)) {
                // A block is written after every read before it was done (no basyn
                // client reads a receiver it writes; this keeps one that did right).
                answers.settle(&mut server, reads.given(), 0)?;
            }
            let frame = match (frame, server.receiving()) {
                // A small block is checked here when nothing is ahead of it: handing
                // it to a worker and back costs more than checking it.
                (Frame::Block(block), Some((limit, layout, _)))
                    if block.raw_len as usize <= INLINE_CHECK && checking.outstanding() == 0 =>
                {
                    server.write_verified(check_block((block, limit, layout, false)))?;
                    continue;
                }
                (Frame::Block(block), Some((limit, layout, track))) => {
                    checking.give((block, limit, layout, track));
                    server.write_checked(&mut checking, workers)?;
                    continue;
                }
                (frame, _) => frame,
            };
            if let Frame::Control(Message::Read { offset, len }) = frame
                && let Some(job) = server.read_job(offset, len)?
            {
                // A read sees every block before it written.
                server.write_checked(&mut checking, 0)?;
                reads.give(job);
                answers.settle(&mut server, reads.given(), 2 * workers)?;
                continue;
            }
            // Whatever else comes sees every block before it written, and its reply
            // comes after those of every read before it.
            server.write_checked(&mut checking, 0)?;
            answers.settle(&mut server, reads.given(), 0)?;
            if let Some(reply) = server.handle(frame)? {
                let close = matches!(reply, Frame::Control(Message::Closed(_)));
                let mut w = lock(w);
                w.send_owned(reply)?;
                w.flush()?;
                if close {
                    return Ok(());
                }
            }
        }
    })
}

/// One session's server: the device as the current `Open` left it, and what the
/// session's opens added up to.
struct Server<'a> {
    config: &'a Config,
    open: Option<Served>,
    totals: Closed,
    buf: Vec<u8>,
}

impl Server<'_> {
    /// Answers one frame from the client; `None` for frames without a reply (writes).
    fn handle(&mut self, frame: Frame) -> Result<Option<Frame>, Abort> {
        let reply = match frame {
            Frame::Control(Message::Open(req)) => {
                self.end_open()?;
                let precondition = |message| Abort { code: AbortCode::Precondition, message };
                let path = self.config.device_for(&req).map_err(precondition)?;
                let mode = self.config.state_mode(&req.state.mode, &path).map_err(precondition)?;
                let req = OpenRequest { state: StateOptions { mode, ..req.state }, ..req };
                let (opened, served) = open_device(&path, req)?;
                self.open = served;
                Frame::Control(Message::Opened(opened))
            }
            Frame::Control(Message::Flush) => {
                if let Some(o) = self.open.as_mut() {
                    o.index.checkpoint(&o.device, o.role)?;
                }
                Frame::Control(Message::Flushed)
            }
            Frame::Control(Message::Close) => {
                self.end_open()?;
                Frame::Control(Message::Closed(std::mem::take(&mut self.totals)))
            }
            other => {
                let Some(o) = self.open.as_mut() else {
                    return Err(ProtocolError::unexpected(&other, "no device is open").into());
                };
                return o.handle(other, &mut self.buf);
            }
        };
        Ok(Some(reply))
    }

    /// The bounds and layout blocks are checked against while a receiver is open, and
    /// whether its state records what is written.
    fn receiving(&self) -> Option<(u64, Layout, bool)> {
        self.open.as_ref().filter(|o| o.role == Role::Receiver).map(|o| (o.limit, *o.index.layout(), o.index.enabled()))
    }

    /// A `Read` of the open device, checked, to be done on a worker; `None` when no
    /// device is open (the frame is then refused as usual).
    fn read_job(&mut self, offset: u64, len: u32) -> Result<Option<ReadJob>, Abort> {
        let Some(o) = self.open.as_ref() else { return Ok(None) };
        check_range(o.limit, offset, u64::from(len), len as usize <= MAX_BLOCK)?;
        let learn = (o.role == Role::Read).then(|| *o.index.layout());
        Ok(Some(ReadJob { device: Arc::clone(&o.device), offset, len, codec: o.codec, learn }))
    }

    /// The source's index learns the leaves a read read (those it does not know).
    fn learn(&mut self, leaves: Vec<Learnt>) {
        if let Some(o) = self.open.as_mut() {
            o.index.learn_new(leaves);
        }
    }

    /// Writes checked blocks, oldest first, until at most `keep` are outstanding.
    fn write_checked(&mut self, checking: &mut Checking, keep: usize) -> Result<(), Abort> {
        while checking.outstanding() > keep {
            let Some(checked) = checking.take() else { break };
            let checked = checked.map_err(|()| invalid("a data block".into(), "checking it (a worker failed)"))?;
            self.write_verified(checked)?;
        }
        Ok(())
    }

    /// Writes a block as its check found it: a refused block fails the session.
    fn write_verified(&mut self, checked: Result<VerifiedBlock, crate::block::BlockError>) -> Result<(), Abort> {
        let o = self.open.as_mut().ok_or(invalid("a data block".into(), "no device is open"))?;
        let block = checked.map_err(|e| o.refused_block(e))?;
        o.write(&block)?;
        if let Some(buf) = block.into_bytes() {
            leaf_reader::recycle(buf);
        }
        Ok(())
    }

    /// Finishes the device opened last, if any: its state is saved.
    fn end_open(&mut self) -> Result<(), Abort> {
        let Some(mut o) = self.open.take() else { return Ok(()) };
        self.totals.bytes_read += o.device.bytes_read();
        self.totals.bytes_written += o.written;
        let unchanged = o.index.finish(&o.device, o.role)?;
        self.totals.moved |= !unchanged;
        if let Some(e) = o.index.unsaved() {
            self.totals.warning = format!("remote {e}");
        }
        if !o.index.note().is_empty() {
            self.totals.note = o.index.note().to_string();
        }
        Ok(())
    }
}

/// The device as the current `Open` left it.
struct Served {
    device: Arc<Device>,
    /// Bytes that may be touched: the device size, or the source size for a receiver.
    limit: u64,
    role: Role,
    hash: HashAlgo,
    codec: Codec,
    index: DigestIndex,
    /// Bytes written to the device.
    written: u64,
}

impl Served {
    /// Answers a request about the open device.
    fn handle(&mut self, frame: Frame, buf: &mut Vec<u8>) -> Result<Option<Frame>, Abort> {
        match frame {
            Frame::Control(Message::HashBlocks { offset, len, block }) => {
                Ok(Some(Frame::Digests(self.hash_range(offset, len, block, buf)?)))
            }
            Frame::Control(Message::TreeNodes { level, indices }) => {
                Ok(Some(Frame::Digests(self.tree_nodes(level, &indices)?)))
            }
            Frame::Control(Message::BlockDigests { offset, len }) => {
                Ok(Some(Frame::Digests(self.block_digests(offset, len, buf)?)))
            }
            Frame::Block(b) => Err(invalid(format!("data block at offset {}", b.offset), "serving a device read-only")),
            other => Err(ProtocolError::unexpected(&other, "serving a device").into()),
        }
    }

    /// Writes a checked block and records it in the index.
    fn write(&mut self, block: &VerifiedBlock) -> Result<(), Abort> {
        let issued = self.device.write_at(block)?;
        self.index.wrote(block, issued);
        self.written += issued;
        Ok(())
    }

    /// A block that may not be written: data that does not match the source's digest is
    /// a failed transfer, anything else a broken protocol. Names the device.
    fn refused_block(&self, e: crate::block::BlockError) -> Abort {
        let code = match e {
            crate::block::BlockError::Mismatch { .. } => AbortCode::Failed,
            _ => AbortCode::Protocol,
        };
        Abort { code, message: format!("remote {}: {e}", self.device.path().display()) }
    }

    fn hash_range(&mut self, offset: u64, len: u64, block: u32, buf: &mut Vec<u8>) -> Result<Vec<u8>, Abort> {
        let block = u64::from(block);
        let pieces = if block == 0 { u64::MAX } else { len.div_ceil(block) };
        let fits = block > 0
            && block as usize <= MAX_BLOCK
            && pieces.checked_mul(self.hash.digest_len() as u64).is_some_and(|n| n <= MAX_DIGESTS as u64);
        check_range(self.limit, offset, len, fits)?;
        Ok(digest_range(&mut self.index, &self.device, offset, len, block, buf)?)
    }

    fn block_digests(&mut self, offset: u64, len: u64, buf: &mut Vec<u8>) -> Result<Vec<u8>, Abort> {
        let b = self.index.layout().buffer;
        let fits = offset.is_multiple_of(b)
            && len.div_ceil(b).checked_mul(self.hash.digest_len() as u64).is_some_and(|n| n <= MAX_DIGESTS as u64);
        check_range(self.limit, offset, len, fits)?;
        let learn = self.role == Role::Read && self.index.enabled();
        Ok(plain_digests(&mut self.index, &self.device, (offset, len), buf, learn)?)
    }

    fn tree_nodes(&mut self, level: u32, indices: &[u64]) -> Result<Vec<u8>, Abort> {
        let dl = self.hash.digest_len();
        let Some(tree) = self.index.tree() else {
            return Err(invalid(format!("TreeNodes for level {level}"), "the state is not fresh"));
        };
        let level = level as usize;
        if level >= tree.height() || indices.len().saturating_mul(dl) > MAX_DIGESTS {
            return Err(invalid(format!("TreeNodes for {} nodes of level {level}", indices.len()), "walking the tree"));
        }
        let mut out = Vec::with_capacity(indices.len() * dl);
        for &i in indices {
            if i >= tree.width(level) as u64 {
                return Err(invalid(format!("tree node {i} of level {level}"), "walking the tree"));
            }
            out.extend_from_slice(tree.node(level, i as usize).as_bytes());
        }
        Ok(out)
    }
}

/// The smallest block or chunk an `Open` may ask for, in bytes.
const MIN_PIECE: u64 = 1024;

/// Refuses parameters no basyn client sends: they would divide by zero, allocate without
/// bound, or write state files outside basyn's own.
fn check_request(req: &OpenRequest) -> Result<(), Abort> {
    let doing = "checking the Open request";
    // The client's own command line takes both in whole KiB: a smaller piece would only
    // make the server's digest tables larger (64 MiB blocks of 1-byte chunks: 2 GiB per
    // block). So no Open can make a leaf hold more than 65536 pieces.
    if req.buffer < MIN_PIECE || req.buffer > MAX_BLOCK as u64 {
        return Err(invalid(format!("block size {} (from {MIN_PIECE} to {MAX_BLOCK})", req.buffer), doing));
    }
    if let Some(c) = req.chunk.filter(|&c| c < MIN_PIECE || c > req.buffer) {
        return Err(invalid(format!("chunk size {c} for blocks of {} (at least {MIN_PIECE})", req.buffer), doing));
    }
    match req.codec {
        Codec::Zstd(l) if !(1..=22).contains(&l) => return Err(invalid(format!("zstd level {l}"), doing)),
        Codec::Zlib(l) if l > 9 => return Err(invalid(format!("zlib level {l}"), doing)),
        _ => {}
    }
    if let StateMode::Path(p) = &req.state.mode {
        check_state_path(p)?;
    }
    Ok(())
}

/// The client chooses this path: never let it replace a file that is not a state.
fn check_state_path(p: &Path) -> Result<(), Abort> {
    crate::state::check_path(p).map_err(|e| Abort { code: AbortCode::Precondition, message: format!("remote {e}") })
}

/// The layout of an open of `size` bytes.
fn layout_of(req: &OpenRequest, size: u64) -> Layout {
    Layout { hash: req.hash, buffer: req.buffer, chunk: req.chunk, fanout: DEFAULT_FANOUT as u32, device_size: size }
}

/// What the client learns of the device's state: its note, and its root if fresh.
fn summary_of(index: &mut DigestIndex) -> StateSummary {
    let mut summary =
        StateSummary { note: index.note().to_string(), confirmed: index.valid_prefix(), ..StateSummary::default() };
    if index.fresh()
        && let Some(t) = index.tree()
    {
        summary.fresh = true;
        summary.root = t.root().map(|d| d.as_bytes().to_vec());
        summary.height = t.height() as u32;
    }
    summary
}

/// Opens the served device as asked; a refusal is an `Abort` with the precondition code.
fn open_device(path: &Path, req: OpenRequest) -> Result<(Opened, Option<Served>), Abort> {
    check_request(&req)?;
    let refused = |e: DeviceError| Abort { code: AbortCode::Precondition, message: e.to_string() };
    let (device, limit, role) = match &req.access {
        Access::Probe => {
            let kind = Device::probe(path, Side::Remote).map_err(refused)?;
            let identity = Identity { boot_id: String::new(), kind, dev: 0, ino: 0, rdev: 0, backing: None };
            let opened =
                Opened { size: 0, kind, identity, created: false, resized: false, state: StateSummary::default() };
            return Ok((opened, None));
        }
        Access::Read | Access::Inspect => {
            let d = Device::open_read(path, Side::Remote).map_err(refused)?;
            let size = d.size();
            (d, size, Role::Read)
        }
        Access::Write { source_size, source, source_name, force, known_zero } => {
            DigestIndex::check_size(&layout_of(&req, *source_size), path)
                .map_err(|e| Abort { code: AbortCode::Precondition, message: format!("remote {e}") })?;
            let spec = ReceiverSpec {
                source_size: *source_size,
                source: source.clone(),
                source_name: source_name.clone(),
                force: *force,
                known_zero: *known_zero,
            };
            (Device::open_receiver(path, Side::Remote, &spec).map_err(refused)?, *source_size, Role::Receiver)
        }
    };
    let layout = layout_of(&req, limit);
    // Even without a state file the index applies the leaf rule and remembers the
    // digests of this session.
    let bad = |e: StateError| Abort { code: AbortCode::Precondition, message: format!("remote {e}") };
    let state = if limit == 0 { StateOptions::off() } else { req.state.clone() };
    let opened = match req.access {
        Access::Inspect => DigestIndex::open_read_only(&device, layout, &state),
        _ => DigestIndex::open(&device, layout, &state),
    };
    let mut index = match opened {
        Ok(index) => index,
        Err(e) => {
            // Nothing may be left behind by a refusal: a receiver this open created is
            // removed; one it resized is changed, so the failure is not a refusal.
            if device.created() {
                let _ = std::fs::remove_file(path);
            }
            let mut abort = bad(e);
            if device.resized() {
                abort.code = AbortCode::Failed;
            }
            return Err(abort);
        }
    };
    let summary = summary_of(&mut index);
    let opened = Opened {
        size: device.size(),
        kind: device.kind(),
        identity: device.identity().clone(),
        created: device.created(),
        resized: device.resized(),
        state: summary,
    };
    let device = Arc::new(device);
    Ok((opened, Some(Served { device, limit, role, hash: req.hash, codec: req.codec, index, written: 0 })))
}

/// A link to `serve` running on a thread of this process, for unit tests of the engine.
#[cfg(test)]
pub fn in_process(path: &Path) -> crate::link::Link {
    let config = Config::device(path);
    struct Thread(Option<std::thread::JoinHandle<i32>>);
    impl crate::link::Process for Thread {
        fn kill(&mut self) {}
        fn wait(&mut self) -> Option<String> {
            match self.0.take().map(|t| t.join()) {
                Some(Ok(0)) | None => None,
                Some(Ok(code)) => Some(format!("exited with status {code}")),
                Some(Err(_)) => Some("panicked".to_string()),
            }
        }
        fn wait_for(&mut self, _: std::time::Duration) -> Option<Option<String>> {
            Some(self.wait())
        }
    }
    let (req_r, req_w) = std::io::pipe().expect("pipe");
    let (rep_r, rep_w) = std::io::pipe().expect("pipe");
    let t = std::thread::spawn(move || serve(&config, req_r, rep_w));
    crate::link::Link {
        reader: Box::new(rep_r),
        writer: Box::new(req_w),
        process: Box::new(Thread(Some(t))),
        label: "remote (in-process)".into(),
    }
}

fn check_range(limit: u64, offset: u64, len: u64, ok: bool) -> Result<(), Abort> {
    if !ok || offset.checked_add(len).is_none_or(|end| end > limit) {
        return Err(ProtocolError::Block(crate::block::BlockError::OutOfBounds { offset, len, size: limit }).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{BlockFrame, Check};
    use crate::tree::leaf_digest;

    /// Runs one session against `path` with `frames` after the handshake; returns the
    /// exit code and every frame the server sent after its Hello.
    fn session(path: &Path, frames: &[Frame]) -> (i32, Vec<Frame>) {
        let mut input = Vec::new();
        let mut w = FrameWriter::new(&mut input, Arc::default());
        w.start().unwrap();
        w.send(&Frame::Control(Message::Hello { version: u32::from(VERSION), features: FEATURES })).unwrap();
        for f in frames {
            w.send(f).unwrap();
        }
        let mut output = Vec::new();
        let code = serve(&Config::device(path), &input[..], &mut output);
        let mut r = FrameReader::new(&output[..], Arc::default());
        r.start().unwrap();
        let mut replies = Vec::new();
        while let Ok(Some(f)) = r.recv() {
            if f != Frame::Control(Message::KeepAlive) {
                replies.push(f);
            }
        }
        assert!(matches!(replies.first(), Some(Frame::Control(Message::Hello { .. }))), "{replies:?}");
        replies.remove(0);
        (code, replies)
    }

    fn open(access: Access, buffer: u64) -> Frame {
        Frame::Control(Message::Open(OpenRequest {
            access,
            hash: HashAlgo::Blake3,
            codec: Codec::None,
            buffer,
            chunk: None,
            state: StateOptions::off(),
            device: Vec::new(),
        }))
    }

    fn write_access(size: u64) -> Access {
        Access::Write {
            source_size: size,
            source: None,
            source_name: "local src".into(),
            force: false,
            known_zero: false,
        }
    }

    fn layout(size: u64) -> Layout {
        Layout { hash: HashAlgo::Blake3, buffer: 8192, chunk: None, fanout: DEFAULT_FANOUT as u32, device_size: size }
    }

    fn abort(frames: &[Frame]) -> (AbortCode, String) {
        match frames.last() {
            Some(Frame::Control(Message::Abort { code, message })) => (*code, message.clone()),
            other => panic!("expected an Abort, got {other:?}"),
        }
    }

    #[test]
    fn a_read_session_answers_leaf_digests_and_data_and_counts_what_it_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        let data: Vec<u8> = (0..20000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let frames = [
            open(Access::Read, 8192),
            Frame::Control(Message::HashBlocks { offset: 0, len: 20000, block: 8192 }),
            Frame::Control(Message::Read { offset: 100, len: 50 }),
            Frame::Control(Message::Close),
        ];
        let (code, replies) = session(&p, &frames);
        assert_eq!(code, 0, "{replies:?}");
        let l = layout(20000);
        let expected: Vec<u8> = data.chunks(8192).flat_map(|c| leaf_digest(&l, c).0.as_bytes().to_vec()).collect();
        assert!(matches!(&replies[0], Frame::Control(Message::Opened(o)) if o.size == 20000));
        assert_eq!(replies[1], Frame::Digests(expected));
        match &replies[2] {
            Frame::Block(b) => assert_eq!(b.clone().verify(20000, &l).unwrap().data(), &data[100..150]),
            other => panic!("expected data, got {other:?}"),
        }
        assert!(matches!(&replies[3], Frame::Control(Message::Closed(c)) if c.bytes_read == 20000 + 50));
    }

    /// Reads and writes of one receiver keep their order: a large block went to the
    /// check workers and a read after it was answered before it was written.
    #[test]
    fn a_read_of_a_receiver_sees_the_blocks_before_it_and_not_those_after() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.img");
        let size = 256 << 10;
        std::fs::write(&p, vec![0u8; size]).unwrap();
        let big = |v: u8| Frame::Block(BlockFrame::encode(0, &vec![v; 128 << 10], Codec::None, Check::None));
        let small = |v: u8| Frame::Block(BlockFrame::encode(0, &[v; 4096], Codec::None, Check::None));
        let read = Frame::Control(Message::Read { offset: 0, len: 4096 });
        let frames = [
            open(write_access(size as u64), 8192),
            big(1),
            read.clone(),
            small(2),
            read.clone(),
            big(3),
            read.clone(),
            Frame::Control(Message::Close),
        ];
        let (code, replies) = session(&p, &frames);
        assert_eq!(code, 0, "{replies:?}");
        let l = layout(size as u64);
        let seen: Vec<u8> = replies[1..4]
            .iter()
            .map(|f| match f {
                Frame::Block(b) => b.clone().verify(size as u64, &l).unwrap().data()[0],
                other => panic!("expected data, got {other:?}"),
            })
            .collect();
        assert_eq!(seen, vec![1, 2, 3]);
    }

    #[test]
    fn block_digests_are_the_plain_hashes_of_whole_blocks_and_must_start_on_a_block() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        let data: Vec<u8> = (0..20000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let frames = [
            open(Access::Read, 8192),
            Frame::Control(Message::BlockDigests { offset: 8192, len: 20000 - 8192 }),
            Frame::Control(Message::BlockDigests { offset: 100, len: 8192 }),
        ];
        let (code, replies) = session(&p, &frames);
        // The original's bitmap digest: the hash of the block's bytes, not the leaf rule.
        let expected: Vec<u8> =
            data[8192..].chunks(8192).flat_map(|c| HashAlgo::Blake3.digest(c).as_bytes().to_vec()).collect();
        assert_eq!(replies[1], Frame::Digests(expected));
        assert_ne!(HashAlgo::Blake3.digest(&data[..8192]), leaf_digest(&layout(20000), &data[..8192]).0);
        assert_eq!(code, 2, "a range off a block boundary was answered: {replies:?}");
        assert_eq!(abort(&replies).0, AbortCode::Protocol);
    }

    #[test]
    fn a_block_that_does_not_match_its_source_digest_is_not_written_and_fails_loudly() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.img");
        std::fs::write(&p, vec![0u8; 16384]).unwrap();
        let l = layout(16384);
        let good = vec![5u8; 8192];
        let claimed = leaf_digest(&l, &[6u8; 8192]).0;
        let frames = [
            open(write_access(16384), 8192),
            Frame::Block(BlockFrame::encode(8192, &good, Codec::Zstd(1), Check::Leaves(vec![claimed]))),
            Frame::Control(Message::Flush),
        ];
        let (code, replies) = session(&p, &frames);
        assert_eq!(code, 2);
        let (kind, message) = abort(&replies);
        assert_eq!(kind, AbortCode::Failed);
        assert!(message.starts_with(&format!("remote {}: ", p.display())), "{message}");
        assert!(message.contains("offset 8192") && message.contains("does not match"), "{message}");
        assert_eq!(std::fs::read(&p).unwrap(), vec![0u8; 16384], "mismatching data reached the device");
    }

    /// `Open` with 1-byte chunks of 64 MiB blocks made the server allocate 170 MB for one
    /// block's digests; blocks and chunks below 1 KiB are now refused before anything is
    /// opened.
    #[test]
    fn an_open_asking_for_tiny_chunks_or_blocks_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        std::fs::write(&p, vec![1u8; 1 << 20]).unwrap();
        let with = |buffer: u64, chunk: Option<u64>| match open(Access::Read, buffer) {
            Frame::Control(Message::Open(req)) => Frame::Control(Message::Open(OpenRequest { chunk, ..req })),
            other => other,
        };
        for (buffer, chunk, says) in [(64 << 20, Some(1), "chunk size 1"), (512, None, "block size 512")] {
            let (code, replies) = session(&p, &[with(buffer, chunk)]);
            let (kind, message) = abort(&replies);
            // Parameters no basyn client sends: a protocol violation, as every other one.
            assert_eq!((code, kind), (2, AbortCode::Protocol), "{message}");
            assert!(message.contains(says) && message.contains("Open"), "{message}");
        }
        let frames = [with(64 << 20, Some(1024)), Frame::Control(Message::Close)];
        let (code, replies) = session(&p, &frames);
        assert_eq!(code, 0, "the largest allowed geometry is served: {replies:?}");
    }

    #[test]
    fn a_verified_block_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.img");
        std::fs::write(&p, vec![0u8; 16384]).unwrap();
        let data = vec![9u8; 4096];
        let check = Check::Pieces { unit: 1024, digests: HashAlgo::Blake3.digest_pieces(&data, 1024) };
        let frames = [
            open(write_access(16384), 8192),
            Frame::Block(BlockFrame::encode(4096, &data, Codec::Zlib(6), check)),
            Frame::Control(Message::Close),
        ];
        let (code, replies) = session(&p, &frames);
        assert_eq!(code, 0, "{replies:?}");
        let on_disk = std::fs::read(&p).unwrap();
        assert_eq!(&on_disk[4096..8192], &data[..]);
        assert!(on_disk[..4096].iter().chain(&on_disk[8192..]).all(|&b| b == 0));
    }

    #[test]
    fn parameters_no_client_sends_are_refused_naming_their_values() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        std::fs::write(&p, vec![1u8; 4096]).unwrap();
        let (code, replies) = session(&p, &[open(Access::Read, 0)]);
        assert_eq!(code, 2);
        let (kind, message) = abort(&replies);
        assert_eq!(kind, AbortCode::Protocol);
        assert!(message.contains("block size 0"), "{message}");
        // A digest request whose reply size overflows is refused, not allocated.
        let huge = Frame::Control(Message::HashBlocks { offset: 0, len: u64::MAX, block: 1 });
        let (code, replies) = session(&p, &[open(Access::Read, 4096), huge]);
        assert_eq!(code, 2);
        assert!(abort(&replies).1.contains("outside the device"), "{replies:?}");
    }

    #[test]
    fn a_client_chosen_state_path_never_replaces_a_foreign_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        std::fs::write(&p, vec![1u8; 4096]).unwrap();
        let precious = dir.path().join("passwd");
        std::fs::write(&precious, b"root:x:0:0\n").unwrap();
        let req = Frame::Control(Message::Open(OpenRequest {
            access: Access::Read,
            hash: HashAlgo::Blake3,
            codec: Codec::None,
            buffer: 4096,
            chunk: None,
            state: StateOptions { mode: StateMode::Path(precious.clone()), trust: false },
            device: Vec::new(),
        }));
        let (code, replies) = session(&p, &[req, Frame::Control(Message::Close)]);
        assert_eq!(code, 1);
        let (kind, message) = abort(&replies);
        assert_eq!(kind, AbortCode::Precondition);
        assert!(message.contains("not a basyn state file"), "{message}");
        assert_eq!(std::fs::read(&precious).unwrap(), b"root:x:0:0\n");
    }

    #[test]
    fn requests_that_do_not_fit_the_open_device_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        std::fs::write(&p, vec![1u8; 8192]).unwrap();
        let cases: [(&str, Vec<Frame>); 4] = [
            ("a request before Open", vec![Frame::Control(Message::Read { offset: 0, len: 1 })]),
            (
                "a tree walk without a fresh state",
                vec![open(Access::Read, 4096), Frame::Control(Message::TreeNodes { level: 0, indices: vec![0] })],
            ),
            (
                "data for a device opened read-only",
                vec![
                    open(Access::Read, 4096),
                    Frame::Block(BlockFrame::encode(0, &[2u8; 10], Codec::None, Check::None)),
                ],
            ),
            (
                "a read past the end",
                vec![open(Access::Read, 4096), Frame::Control(Message::Read { offset: 8000, len: 500 })],
            ),
        ];
        for (what, frames) in cases {
            let (code, replies) = session(&p, &frames);
            assert_eq!(code, 2, "{what}: {replies:?}");
            assert_eq!(abort(&replies).0, AbortCode::Protocol, "{what}");
        }
        assert_eq!(std::fs::read(&p).unwrap(), vec![1u8; 8192]);
    }
}
