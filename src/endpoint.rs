//! The client's handle on the far endpoint: a `basyn serve` reached over the transport
//! the plan names, spoken to in the protocol's types. The engine makes typed,
//! pipelined calls (ask for digests, data or a flush; then take the replies in the
//! order asked) and never sees a frame. Replies are read by a thread into an unbounded
//! queue so that the engine may keep many requests in flight without ever deadlocking
//! on pipes.

use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::compress::{Codec, PayloadCodec};
use crate::hash::{Digest, HashAlgo};
use crate::link::{Link, LinkError, Process};
use crate::protocol::{
    AbortCode, BlockFrame, Closed, Counter, FEATURE_ZLIB, FEATURE_ZSTD, FEATURES, Frame, FrameReader, FrameWriter,
    MAX_CONTROL, Message, OpenRequest, Opened, ProtocolError, VERSION, split_digests,
};
use crate::ssh::Target;

/// Where the far endpoint runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// `basyn serve` on this machine: on a thread of this process (a child process
    /// over pipes under `--bwlimit`).
    Local,
    /// `basyn serve` on another host, over SSH.
    Ssh(Target),
}

/// A failure talking to the far endpoint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// The endpoint refused or failed and said why (its message names device and side).
    #[error("{message}")]
    Abort {
        /// Kind of failure.
        code: AbortCode,
        /// The endpoint's one-line message.
        message: String,
    },
    /// The endpoint could not be reached or started; nothing was changed.
    #[error(transparent)]
    Unreachable(#[from] LinkError),
    /// Nothing came from the endpoint for the `--timeout`: it is stopped, or the link is
    /// down (a live endpoint says KeepAlive every few seconds, however busy).
    #[error(
        "{label}: nothing heard from the endpoint for {secs} s (--timeout {secs}) while {doing}; it is stopped or the link is down"
    )]
    Timeout {
        /// The far device.
        label: String,
        /// The timeout, in seconds.
        secs: u64,
        /// What we were doing.
        doing: String,
    },
    /// The connection broke or carried something invalid.
    #[error("{context}: {source}")]
    Broken {
        /// What we were doing, and the endpoint's exit status when known.
        context: String,
        /// The protocol-level cause.
        source: ProtocolError,
    },
}

impl EndpointError {
    /// True if the endpoint said nothing was changed (a refusal before any write).
    pub fn is_precondition(&self) -> bool {
        matches!(self, EndpointError::Abort { code: AbortCode::Precondition, .. } | EndpointError::Unreachable(_))
    }
}

/// The reply thread: every frame from the endpoint into the queue, in order, ending with
/// the error that ended the stream (a clean end between frames is `Closed` too, since
/// the endpoint never ends a session without `Closed`).
fn read_replies<R: std::io::Read>(mut frames: FrameReader<R>, send: mpsc::Sender<Result<Frame, ProtocolError>>) {
    let end = match frames.start() {
        Err(e) => e,
        Ok(()) => loop {
            match frames.recv() {
                // Only proof of life: the bytes are counted, the frame is not a reply.
                Ok(Some(Frame::Control(Message::KeepAlive))) => {}
                Ok(Some(f)) => {
                    if send.send(Ok(f)).is_err() {
                        return;
                    }
                }
                Ok(None) => break ProtocolError::Closed,
                Err(e) => break e,
            }
        },
    };
    let _ = send.send(Err(end));
}

/// Kills the endpoint once nothing has come from it for `limit`: then whatever waits on
/// it (a reply, or a write into a full pipe) fails, and the failure is reported as a
/// timeout. Any byte counts, KeepAlive included.
fn watch(
    rx: Arc<Counter>,
    limit: Duration,
    process: Arc<Mutex<Box<dyn Process>>>,
    fired: Arc<AtomicBool>,
    stop: Receiver<()>,
) {
    let tick = (limit / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let (mut seen, mut since) = (rx.get(), Instant::now());
    while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(tick) {
        let now = rx.get();
        if now != seen {
            (seen, since) = (now, Instant::now());
        } else if since.elapsed() >= limit {
            fired.store(true, Ordering::SeqCst);
            lock(&process).kill();
            return;
        }
    }
}

/// The process, whoever panicked while holding it.
fn lock(p: &Mutex<Box<dyn Process>>) -> std::sync::MutexGuard<'_, Box<dyn Process>> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// Tree-node indices per TreeNodes request: a varint index takes at most 10 bytes, so a
/// batch stays well inside a control frame.
const TREE_BATCH: usize = MAX_CONTROL / 16;

/// A connected, handshaken endpoint.
pub struct Endpoint {
    writer: Option<FrameWriter<BufWriter<Box<dyn Write + Send>>>>,
    replies: Receiver<Result<Frame, ProtocolError>>,
    reader: Option<JoinHandle<()>>,
    process: Arc<Mutex<Box<dyn Process>>>,
    /// `--timeout`, and whether it fired; dropping `watchdog` stops the watch.
    timeout: Option<Duration>,
    fired: Arc<AtomicBool>,
    watchdog: Option<mpsc::Sender<()>>,
    features: u64,
    label: String,
    tx: Arc<Counter>,
    rx: Arc<Counter>,
    /// Bytes of device data that crossed to the receiver: as data, and as zero tokens.
    moved: (u64, u64),
    finished: bool,
    /// The endpoint runs on a thread of this process.
    in_process: bool,
}

impl Endpoint {
    /// Starts `basyn serve DEVICE` over `transport` and handshakes. `log` receives
    /// `--verbose` lines about the connection. With a `timeout`, a run fails once nothing
    /// has come from the endpoint for that long; with a `bwlimit`, each direction carries
    /// at most that many bytes per second.
    pub fn connect(
        transport: &Transport,
        device: &Path,
        (timeout, bwlimit): (Option<Duration>, Option<u64>),
        log: &dyn Fn(String),
    ) -> Result<Endpoint, EndpointError> {
        let link = match transport {
            // On a thread of this process, frames handed over whole; a rate cap needs a
            // byte stream to pace, which a child's pipes are.
            Transport::Local if bwlimit.is_none() => {
                let (requests, replies, process) = crate::serve::start_on_a_thread(device)?;
                let (tx, rx) = (Arc::new(Counter::default()), Arc::new(Counter::default()));
                let reader = FrameReader::<std::io::Empty>::queued(replies, rx.clone());
                let writer = FrameWriter::queued(requests, tx.clone());
                let label = format!("remote {}", device.display());
                let mut ep = Endpoint::assemble((reader, writer), process, label, timeout, (tx, rx))?;
                ep.in_process = true;
                return Ok(ep);
            }
            Transport::Local => Link::local_child(device)?,
            Transport::Ssh(target) => crate::ssh::connect(target, device, log)?,
        };
        let link = match bwlimit {
            Some(rate) => link.throttled(rate),
            None => link,
        };
        Endpoint::watched(link, timeout)
    }

    /// Handshakes over `link`, with no timeout.
    pub fn over(link: Link) -> Result<Endpoint, EndpointError> {
        Endpoint::watched(link, None)
    }

    /// Handshakes over `link`: preamble (magic and version), then Hello with features.
    fn watched(link: Link, timeout: Option<Duration>) -> Result<Endpoint, EndpointError> {
        let tx = Arc::new(Counter::default());
        let rx = Arc::new(Counter::default());
        let Link { reader, writer, process, label } = link;
        let frames = FrameReader::new(std::io::BufReader::with_capacity(1 << 20, reader), rx.clone());
        let writer = FrameWriter::new(BufWriter::with_capacity(1 << 20, writer), tx.clone());
        Endpoint::assemble((frames, writer), process, label, timeout, (tx, rx))
    }

    /// Handshakes over `frames` (replies, requests); `counters` count their bytes (sent,
    /// received).
    fn assemble<R: std::io::Read + Send + 'static>(
        (frames, writer): (FrameReader<R>, FrameWriter<BufWriter<Box<dyn Write + Send>>>),
        process: Box<dyn Process>,
        label: String,
        timeout: Option<Duration>,
        (tx, rx): (Arc<Counter>, Arc<Counter>),
    ) -> Result<Endpoint, EndpointError> {
        let (send, replies) = mpsc::channel();
        let reader = std::thread::Builder::new()
            .name("basyn-replies".into())
            .spawn(move || read_replies(frames, send))
            .map_err(|source| LinkError::Start { what: "cannot start a thread", source })?;
        let process = Arc::new(Mutex::new(process));
        let fired = Arc::new(AtomicBool::new(false));
        let watchdog = match timeout {
            Some(limit) => {
                let (stop, stopped) = mpsc::channel();
                let (rx, process, fired) = (rx.clone(), process.clone(), fired.clone());
                std::thread::Builder::new()
                    .name("basyn-timeout".into())
                    .spawn(move || watch(rx, limit, process, fired, stopped))
                    .map_err(|source| LinkError::Start { what: "cannot start a thread", source })?;
                Some(stop)
            }
            None => None,
        };
        let mut ep = Endpoint {
            writer: Some(writer),
            replies,
            reader: Some(reader),
            process,
            timeout,
            fired,
            watchdog,
            features: 0,
            label,
            tx,
            rx,
            moved: (0, 0),
            finished: false,
            in_process: false,
        };
        let hello = Message::Hello { version: u32::from(VERSION), features: FEATURES };
        let sent = ep.writer_mut().and_then(|w| w.start().and_then(|()| w.message(hello)).map_err(ProtocolError::from));
        if let Err(e) = sent {
            return Err(ep.fail("handshake", e));
        }
        match ep.recv_message("handshake")? {
            Message::Hello { version, .. } if version != u32::from(VERSION) => {
                Err(ep.fail("handshake", ProtocolError::Version { ours: u32::from(VERSION), theirs: version }))
            }
            Message::Hello { features, .. } => {
                ep.features = features;
                Ok(ep)
            }
            other => Err(ep.unexpected(Frame::Control(other), "the handshake")),
        }
    }

    /// True if the endpoint runs on a thread of this process (a local run): its memory
    /// and the client's are one process's.
    pub fn in_process(&self) -> bool {
        self.in_process
    }

    /// The far device as messages name it.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Bytes received from and sent to the endpoint so far.
    pub fn traffic(&self) -> (u64, u64) {
        (self.rx.get(), self.tx.get())
    }

    /// Bytes of device data sent to the endpoint (PUSH) or received from it (PULL) so
    /// far: (as data, as zero tokens).
    pub fn data_moved(&self) -> (u64, u64) {
        self.moved
    }

    /// Counts a block of device data crossing the link.
    fn count(&mut self, block: &BlockFrame) {
        let len = u64::from(block.raw_len);
        match block.codec {
            PayloadCodec::Zero => self.moved.1 += len,
            _ => self.moved.0 += len,
        }
    }

    /// True if the endpoint can decode payloads of `codec`.
    pub fn supports(&self, codec: Codec) -> bool {
        match codec {
            Codec::None => true,
            Codec::Zstd(_) => self.features & FEATURE_ZSTD != 0,
            Codec::Zlib(_) => self.features & FEATURE_ZLIB != 0,
        }
    }

    /// Opens the endpoint's device.
    pub fn open(&mut self, req: OpenRequest) -> Result<Opened, EndpointError> {
        if !self.supports(req.codec) {
            let what = format!("codec {}", req.codec.describe());
            return Err(self.fail(
                "opening the device",
                ProtocolError::Unexpected { what, doing: "choosing a codec the endpoint does not support" },
            ));
        }
        self.send(&Frame::Control(Message::Open(req)))?;
        match self.recv_message("opening the device")? {
            Message::Opened(opened) => Ok(opened),
            other => Err(self.unexpected(Frame::Control(other), "opening the device")),
        }
    }

    /// Asks for the digests of every `block`-sized piece of `[offset, offset+len)`;
    /// the reply is taken with [`Endpoint::digests`].
    pub fn ask_digests(&mut self, offset: u64, len: u64, block: u32) -> Result<(), EndpointError> {
        self.send(&Frame::Control(Message::HashBlocks { offset, len, block }))
    }

    /// Asks for the plain digest of every whole block of `[offset, offset+len)` (the
    /// original's bitmap digests); the reply is taken with [`Endpoint::digests`].
    pub fn ask_block_digests(&mut self, offset: u64, len: u64) -> Result<(), EndpointError> {
        self.send(&Frame::Control(Message::BlockDigests { offset, len }))
    }

    /// The next reply, which must be `count` digests of `hash`.
    pub fn digests(&mut self, hash: HashAlgo, count: usize) -> Result<Vec<Digest>, EndpointError> {
        match self.recv()? {
            Frame::Digests(bytes) => split_digests(hash, &bytes, count).map_err(|e| self.fail("reading digests", e)),
            other => Err(self.unexpected(other, "waiting for digests")),
        }
    }

    /// Asks for the data of `[offset, offset+len)`; the reply is taken with [`Endpoint::data`].
    pub fn ask_read(&mut self, offset: u64, len: u32) -> Result<(), EndpointError> {
        self.send(&Frame::Control(Message::Read { offset, len }))
    }

    /// The next reply, which must be the data of `[offset, offset+len)`: still
    /// unverified, to be checked against the source digests before it is written.
    pub fn data(&mut self, offset: u64, len: usize) -> Result<BlockFrame, EndpointError> {
        match self.recv()? {
            Frame::Block(b) if b.offset == offset && b.raw_len as usize == len => {
                self.count(&b);
                Ok(b)
            }
            other => {
                let what = format!("{} where offset {offset} ({len} bytes) was asked for", other.describe());
                Err(self.fail("waiting for data", ProtocolError::Unexpected { what, doing: "reading data" }))
            }
        }
    }

    /// Sends data for the endpoint's device to verify and write (no reply).
    pub fn write(&mut self, block: BlockFrame) -> Result<(), EndpointError> {
        self.count(&block);
        self.send_owned(Frame::Block(block))
    }

    /// Asks the endpoint to make every write durable and checkpoint its state; the reply
    /// is taken with [`Endpoint::flushed`].
    pub fn ask_flush(&mut self) -> Result<(), EndpointError> {
        self.send(&Frame::Control(Message::Flush))
    }

    /// The next reply, which must say the endpoint's writes are durable.
    pub fn flushed(&mut self) -> Result<(), EndpointError> {
        match self.recv_message("flushing the device")? {
            Message::Flushed => Ok(()),
            other => Err(self.unexpected(Frame::Control(other), "flushing the device")),
        }
    }

    /// Makes every write durable on the endpoint (fdatasync there) and waits for it.
    pub fn flush_device(&mut self) -> Result<(), EndpointError> {
        self.ask_flush()?;
        self.flushed()
    }

    /// The digests of tree nodes on one level of the endpoint's (fresh) tree, asked in
    /// batches that each fit a control frame, all in flight at once.
    pub fn tree_nodes(
        &mut self,
        hash: HashAlgo,
        level: usize,
        indices: &[usize],
    ) -> Result<Vec<Digest>, EndpointError> {
        for batch in indices.chunks(TREE_BATCH) {
            let msg = Message::TreeNodes { level: level as u32, indices: batch.iter().map(|&i| i as u64).collect() };
            self.send(&Frame::Control(msg))?;
        }
        let mut out = Vec::with_capacity(indices.len());
        for batch in indices.chunks(TREE_BATCH) {
            out.extend(self.digests(hash, batch.len())?);
        }
        Ok(out)
    }

    fn writer_mut(&mut self) -> Result<&mut FrameWriter<BufWriter<Box<dyn Write + Send>>>, ProtocolError> {
        self.writer.as_mut().ok_or(ProtocolError::Closed)
    }

    /// Queues a frame (flushed before the next wait for a reply).
    fn send(&mut self, frame: &Frame) -> Result<(), EndpointError> {
        let sent = self.writer_mut().and_then(|w| w.send(frame).map_err(ProtocolError::from));
        sent.map_err(|e| self.fail("sending", e))
    }

    /// [`Endpoint::send`] of a frame a local endpoint may take as it is.
    fn send_owned(&mut self, frame: Frame) -> Result<(), EndpointError> {
        let sent = self.writer_mut().and_then(|w| w.send_owned(frame).map_err(ProtocolError::from));
        sent.map_err(|e| self.fail("sending", e))
    }

    /// Waits for the next reply; an `Abort` from the endpoint becomes an error.
    fn recv(&mut self) -> Result<Frame, EndpointError> {
        let flushed = self.writer_mut().and_then(|w| w.flush().map_err(ProtocolError::from));
        if let Err(e) = flushed {
            return Err(self.fail("sending", e));
        }
        match self.replies.recv() {
            Ok(Ok(Frame::Control(Message::Abort { code, message }))) => {
                self.reap();
                Err(EndpointError::Abort { code, message })
            }
            Ok(Ok(frame)) => Ok(frame),
            Ok(Err(e)) => Err(self.fail("waiting for a reply", e)),
            Err(_) => Err(self.fail("waiting for a reply", ProtocolError::Closed)),
        }
    }

    fn recv_message(&mut self, doing: &'static str) -> Result<Message, EndpointError> {
        match self.recv()? {
            Frame::Control(m) => Ok(m),
            other => Err(self.unexpected(other, doing)),
        }
    }

    fn unexpected(&mut self, frame: Frame, doing: &'static str) -> EndpointError {
        self.fail(doing, ProtocolError::unexpected(&frame, doing))
    }

    /// Ends the session cleanly (the endpoint saves its state) and reaps the endpoint.
    pub fn close(mut self) -> Result<Closed, EndpointError> {
        self.send(&Frame::Control(Message::Close))?;
        let closed = match self.recv_message("closing the session")? {
            Message::Closed(c) => c,
            other => return Err(self.unexpected(Frame::Control(other), "closing the session")),
        };
        self.writer = None;
        self.finished = true;
        self.watchdog = None;
        if let Some(status) = lock(&self.process).wait() {
            let context = format!("the endpoint {status} after the session");
            return Err(EndpointError::Broken { context, source: ProtocolError::Closed });
        }
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
        Ok(closed)
    }

    /// Ends a session that failed on our side: the endpoint is stopped, not asked.
    pub fn abandon(mut self) {
        self.reap();
    }

    /// Turns a broken connection into an error, preferring the endpoint's own
    /// explanation (an `Abort` it sent before going away) and its exit status.
    fn fail(&mut self, doing: &str, source: ProtocolError) -> EndpointError {
        if let Some(limit) = self.timeout.filter(|_| self.fired.load(Ordering::SeqCst)) {
            self.reap();
            return EndpointError::Timeout {
                label: self.label.clone(),
                secs: limit.as_secs(),
                doing: doing.to_string(),
            };
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.replies.recv_timeout(left) {
                Ok(Ok(Frame::Control(Message::Abort { code, message }))) => {
                    self.reap();
                    return EndpointError::Abort { code, message };
                }
                Ok(Ok(_)) => continue,
                Ok(Err(_)) | Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let status = self.reap();
        let context = match status {
            Some(s) => {
                format!("{}: the remote endpoint or the connection failed while {doing} (the endpoint {s})", self.label)
            }
            None => format!("{}: the remote endpoint or the connection failed while {doing}", self.label),
        };
        EndpointError::Broken { context, source }
    }

    /// Stops the endpoint process (if still running) and returns how it ended.
    fn reap(&mut self) -> Option<String> {
        if self.finished {
            return None;
        }
        self.finished = true;
        self.writer = None;
        self.watchdog = None;
        let mut process = lock(&self.process);
        // Closing our side usually ends it; give it a moment to report its own status.
        if let Some(status) = process.wait_for(Duration::from_secs(1)) {
            return status;
        }
        process.kill();
        process.wait()
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if !self.finished {
            self.writer = None;
            self.watchdog = None;
            let mut process = lock(&self.process);
            process.kill();
            let _ = process.wait();
        }
    }
}
