//! The client's handle on the far endpoint: a `basyn serve` reached over some transport,
//! spoken to with the protocol. Replies are read by a thread into an unbounded queue so
//! that the engine may keep many requests in flight without ever deadlocking on pipes.

use std::io::{BufWriter, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::compress::Codec;
use crate::device::{Identity, Kind};
use crate::hash::HashAlgo;
use crate::ledger::StateOptions;
use crate::protocol::{
    AbortCode, Access, Counter, FEATURE_ZLIB, FEATURE_ZSTD, FEATURES, Frame, FrameReader, FrameWriter, Message,
    ProtocolError, StateSummary, VERSION,
};

/// A failure talking to the far endpoint.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The endpoint refused or failed and said why (its message names device and side).
    #[error("{message}")]
    Abort {
        /// Kind of failure.
        code: AbortCode,
        /// The endpoint's one-line message.
        message: String,
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

/// The process at the other end of a transport, so that it can be reaped or killed.
pub trait Process: Send {
    /// Kills it (idempotent).
    fn kill(&mut self);
    /// Waits for it to exit and describes an abnormal exit ("killed by signal 9").
    fn wait(&mut self) -> Option<String>;
    /// Like `wait`, but gives up after `limit`: `None` if it is still running.
    fn wait_for(&mut self, limit: Duration) -> Option<Option<String>>;
}

impl Process for Child {
    fn kill(&mut self) {
        let _ = Child::kill(self);
    }
    fn wait(&mut self) -> Option<String> {
        match Child::wait(self) {
            Ok(st) if st.success() => None,
            Ok(st) => Some(describe_status(st)),
            Err(e) => Some(format!("could not be waited for: {e}")),
        }
    }
    fn wait_for(&mut self, limit: Duration) -> Option<Option<String>> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            match self.try_wait() {
                Ok(Some(st)) if st.success() => return Some(None),
                Ok(Some(st)) => return Some(Some(describe_status(st))),
                Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                Ok(None) => return None,
                Err(e) => return Some(Some(format!("could not be waited for: {e}"))),
            }
        }
    }
}

fn describe_status(st: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => "ended abnormally".to_string(),
    }
}

/// A byte stream pair to a `basyn serve` and the process behind it.
pub struct Link {
    /// Replies from the endpoint.
    pub reader: Box<dyn Read + Send>,
    /// Requests to the endpoint.
    pub writer: Box<dyn Write + Send>,
    /// The process to reap or kill.
    pub process: Box<dyn Process>,
    /// The far device as messages name it: `remote PATH` or `remote HOST:PATH`.
    pub label: String,
}

impl Link {
    /// Starts `basyn serve PATH` on this machine as a child over pipes: the same protocol
    /// SSH carries, so local runs exercise it too.
    pub fn local_child(path: &Path) -> Result<Link, EndpointError> {
        let exe = std::env::current_exe().map_err(|e| broken("cannot find the basyn executable", e.into()))?;
        let mut child = Command::new(exe)
            .arg("serve")
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| broken("cannot start the local endpoint (basyn serve)", e.into()))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            return Err(broken("cannot start the local endpoint", ProtocolError::Closed));
        };
        widen_pipe(&stdin);
        widen_pipe(&stdout);
        let label = format!("remote {}", path.display());
        Ok(Link { reader: Box::new(stdout), writer: Box::new(stdin), process: Box::new(child), label })
    }
}

/// Grows a pipe's kernel buffer (64 KiB by default) so that a 2 MiB block crosses in a
/// few system calls instead of dozens of wake-ups. Best effort: the limit may be lower.
pub fn widen_pipe(pipe: &impl std::os::fd::AsRawFd) {
    // SAFETY: F_SETPIPE_SZ on a valid pipe descriptor; failure leaves it unchanged.
    unsafe {
        libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20);
    }
}

fn broken(context: &str, source: ProtocolError) -> EndpointError {
    EndpointError::Broken { context: context.to_string(), source }
}

/// What the endpoint reported when it opened its device.
#[derive(Clone, Debug)]
pub struct Opened {
    /// Device size in bytes.
    pub size: u64,
    /// File or block device.
    pub kind: Kind,
    /// Identity for same-device checks.
    pub identity: Identity,
    /// True if the endpoint created the file.
    pub created: bool,
    /// True if the endpoint resized the file (`--force`).
    pub resized: bool,
    /// The endpoint's state.
    pub state: StateSummary,
}

/// What to open on the endpoint, and how.
#[derive(Clone, Debug)]
pub struct OpenRequest {
    /// Probe, read or write.
    pub access: Access,
    /// Digest algorithm.
    pub hash: HashAlgo,
    /// Codec for data the endpoint sends.
    pub codec: Codec,
    /// Leaf size.
    pub buffer: u64,
    /// Chunk size.
    pub chunk: Option<u64>,
    /// State file options for the endpoint's device.
    pub state: StateOptions,
}

/// What the endpoint reported when the session closed.
#[derive(Clone, Debug, Default)]
pub struct Closed {
    /// Bytes it read from its device.
    pub bytes_read: u64,
    /// Someone other than basyn wrote its device during the session.
    pub moved: bool,
    /// What happened to its state file.
    pub note: String,
}

/// A connected, handshaken endpoint.
pub struct Endpoint {
    writer: Option<FrameWriter<BufWriter<Box<dyn Write + Send>>>>,
    replies: Receiver<Result<Frame, ProtocolError>>,
    reader: Option<JoinHandle<()>>,
    process: Box<dyn Process>,
    features: u64,
    label: String,
    /// Bytes sent to the endpoint.
    pub tx: Arc<Counter>,
    /// Bytes received from the endpoint.
    pub rx: Arc<Counter>,
    finished: bool,
}

impl Endpoint {
    /// Handshakes over `link`: magic, version, features.
    pub fn connect(link: Link) -> Result<Endpoint, EndpointError> {
        let tx = Arc::new(Counter::default());
        let rx = Arc::new(Counter::default());
        let Link { reader, writer, process, label } = link;
        let mut frames = FrameReader::new(std::io::BufReader::with_capacity(1 << 20, reader), rx.clone());
        let (send, replies) = mpsc::channel();
        let reader = std::thread::Builder::new()
            .name("basyn-replies".into())
            .spawn(move || {
                let end = match frames.start() {
                    Err(e) => e,
                    Ok(()) => loop {
                        match frames.recv() {
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
            })
            .map_err(|e| broken("cannot start a thread", e.into()))?;
        let mut ep = Endpoint {
            writer: Some(FrameWriter::new(BufWriter::with_capacity(1 << 20, writer), tx.clone())),
            replies,
            reader: Some(reader),
            process,
            features: 0,
            label,
            tx,
            rx,
            finished: false,
        };
        let hello = Message::Hello { version: VERSION, features: FEATURES };
        let sent = ep.writer_mut().and_then(|w| w.start().and_then(|()| w.message(hello)).map_err(ProtocolError::from));
        if let Err(e) = sent {
            return Err(ep.fail("handshake", e));
        }
        match ep.recv_message("handshake")? {
            Message::Hello { version, .. } if version != VERSION => {
                Err(ep.fail("handshake", ProtocolError::Version { ours: VERSION, theirs: version }))
            }
            Message::Hello { features, .. } => {
                ep.features = features;
                Ok(ep)
            }
            other => Err(ep.fail("handshake", ProtocolError::Unexpected(format!("{other:?}")))),
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
        let OpenRequest { access, hash, codec, buffer, chunk, state } = req;
        if !self.supports(codec) {
            return Err(self.fail(
                "opening the device",
                ProtocolError::Unexpected(format!("codec {} is not supported by the endpoint", codec.describe())),
            ));
        }
        self.send(&Frame::Control(Message::Open { access, hash, codec, buffer, chunk, state }))?;
        match self.recv_message("opening the device")? {
            Message::Opened { size, kind, identity, created, resized, state } => {
                Ok(Opened { size, kind, identity, created, resized, state })
            }
            other => Err(self.fail("opening the device", ProtocolError::Unexpected(format!("{other:?}")))),
        }
    }

    fn writer_mut(&mut self) -> Result<&mut FrameWriter<BufWriter<Box<dyn Write + Send>>>, ProtocolError> {
        self.writer.as_mut().ok_or(ProtocolError::Closed)
    }

    /// Queues a frame (flushed before the next wait for a reply).
    pub fn send(&mut self, frame: &Frame) -> Result<(), EndpointError> {
        let sent = self.writer_mut().and_then(|w| w.send(frame).map_err(ProtocolError::from));
        sent.map_err(|e| self.fail("sending", e))
    }

    /// Waits for the next reply; an `Abort` from the endpoint becomes an error.
    pub fn recv(&mut self) -> Result<Frame, EndpointError> {
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

    fn recv_message(&mut self, doing: &str) -> Result<Message, EndpointError> {
        match self.recv()? {
            Frame::Control(m) => Ok(m),
            other => Err(self.fail(doing, ProtocolError::Unexpected(format!("{other:?}")))),
        }
    }

    /// Makes every write durable on the endpoint (fdatasync there).
    pub fn flush_device(&mut self) -> Result<(), EndpointError> {
        self.send(&Frame::Control(Message::Flush))?;
        match self.recv_message("flushing the device")? {
            Message::Flushed => Ok(()),
            other => Err(self.fail("flushing the device", ProtocolError::Unexpected(format!("{other:?}")))),
        }
    }

    /// The digests of tree nodes on one level of the endpoint's (fresh) tree, asked in
    /// batches that each fit a control frame, all in flight at once.
    pub fn tree_nodes(
        &mut self,
        hash: HashAlgo,
        level: usize,
        indices: &[usize],
    ) -> Result<Vec<crate::hash::Digest>, EndpointError> {
        // A varint index takes at most 10 bytes; stay well inside MAX_CONTROL.
        const BATCH: usize = crate::protocol::MAX_CONTROL / 16;
        for batch in indices.chunks(BATCH) {
            let msg = Message::TreeNodes { level: level as u32, indices: batch.iter().map(|&i| i as u64).collect() };
            self.send(&Frame::Control(msg))?;
        }
        let mut out = Vec::with_capacity(indices.len());
        for batch in indices.chunks(BATCH) {
            match self.recv()? {
                Frame::Digests(bytes) => out.extend(
                    crate::protocol::split_digests(hash, &bytes, batch.len())
                        .map_err(|e| self.fail("walking the tree", e))?,
                ),
                other => return Err(self.fail("walking the tree", ProtocolError::Unexpected(format!("{other:?}")))),
            }
        }
        Ok(out)
    }

    /// Sends a control message without waiting (its reply is read with [`Endpoint::recv`]).
    pub fn request(&mut self, m: Message) -> Result<(), EndpointError> {
        self.send(&Frame::Control(m))
    }

    /// Ends the session cleanly (the endpoint saves its state) and reaps the endpoint.
    pub fn close(mut self) -> Result<Closed, EndpointError> {
        self.send(&Frame::Control(Message::Close))?;
        let closed = match self.recv_message("closing the session")? {
            Message::Closed { bytes_read, moved, note } => Closed { bytes_read, moved, note },
            other => return Err(self.fail("closing the session", ProtocolError::Unexpected(format!("{other:?}")))),
        };
        self.writer = None;
        self.finished = true;
        if let Some(status) = self.process.wait() {
            return Err(broken(&format!("the endpoint {status} after the session"), ProtocolError::Closed));
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
        // Closing our side usually ends it; give it a moment to report its own status.
        if let Some(status) = self.process.wait_for(Duration::from_secs(1)) {
            return status;
        }
        self.process.kill();
        self.process.wait()
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if !self.finished {
            self.writer = None;
            self.process.kill();
            let _ = self.process.wait();
        }
    }
}

/// An endpoint served by a thread of this process, for unit tests of the engine.
#[cfg(test)]
pub fn in_process(path: &Path) -> Link {
    struct Thread(Option<std::thread::JoinHandle<i32>>);
    impl Process for Thread {
        fn kill(&mut self) {}
        fn wait(&mut self) -> Option<String> {
            match self.0.take().map(|t| t.join()) {
                Some(Ok(0)) | None => None,
                Some(Ok(code)) => Some(format!("exited with status {code}")),
                Some(Err(_)) => Some("panicked".to_string()),
            }
        }
        fn wait_for(&mut self, _: Duration) -> Option<Option<String>> {
            Some(self.wait())
        }
    }
    let (req_r, req_w) = std::io::pipe().expect("pipe");
    let (rep_r, rep_w) = std::io::pipe().expect("pipe");
    let path = path.to_path_buf();
    let t = std::thread::spawn(move || crate::serve::serve(&path, req_r, rep_w));
    Link {
        reader: Box::new(rep_r),
        writer: Box::new(req_w),
        process: Box::new(Thread(Some(t))),
        label: "remote (in-process)".into(),
    }
}
