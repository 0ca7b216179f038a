//! A local run's endpoint on a thread of the client's process: the same `serve`
//! session, with frames handed over whole through two bounded queues instead of encoded
//! into pipes to a child process (no process start, no copy of the data through the
//! kernel). `docs/design.md`, "The local endpoint", says why.

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::link::{LinkError, Process};
use crate::protocol::{Counter, Frame, FrameReader, FrameWriter};
use crate::queue::{self, Cutter};
use crate::restrict::Config;

/// Bytes of frames each direction holds before its writer waits: about what a widened
/// pipe and the buffers on both of its ends hold.
const QUEUED: usize = 1 << 20;

/// The client's ends of a session served on a thread: requests go into the first, replies
/// come from the second; the third stops the thread.
pub type Ends = (queue::Sender<Frame>, queue::Receiver<Frame>, Box<dyn Process>);

/// Starts serving `path` on a thread of this process.
pub fn start(path: &Path) -> Result<Ends, LinkError> {
    let (requests, their_requests, cut_requests) = queue::bounded(QUEUED);
    let (their_replies, replies, cut_replies) = queue::bounded(QUEUED);
    let config = Config::device(path);
    let handle = std::thread::Builder::new()
        .name("basyn-serve".into())
        .spawn(move || {
            let r = FrameReader::<std::io::Empty>::queued(their_requests, Arc::new(Counter::default()));
            let w = FrameWriter::<std::io::Sink>::queued(their_replies, Arc::new(Counter::default()));
            super::serve_frames(&config, r, w)
        })
        .map_err(|source| LinkError::Start { what: "cannot start the local endpoint's thread", source })?;
    let thread = ServeThread { handle: Some(handle), cut: (cut_requests, cut_replies), killed: false };
    Ok((requests, replies, Box::new(thread)))
}

/// The serving thread, as the client's [`Process`] of its endpoint.
struct ServeThread {
    handle: Option<JoinHandle<i32>>,
    cut: (Cutter<Frame>, Cutter<Frame>),
    killed: bool,
}

/// How long a cut-off endpoint's thread is waited for: one stuck in a read of its device
/// (a hung disk, a stalled FUSE file system) is left behind rather than waited for,
/// and ends with the process.
const AFTER_KILL: Duration = Duration::from_secs(5);

impl Process for ServeThread {
    /// Cuts both queues: the client's waits end at once, and the session ends at its
    /// next frame (a thread cannot be killed: one stuck in a read of its device stays so
    /// until the read returns, or the process exits).
    fn kill(&mut self) {
        self.cut.0.cut();
        self.cut.1.cut();
        self.killed = true;
    }

    fn wait(&mut self) -> Option<String> {
        if !self.killed {
            return self.join();
        }
        self.wait_for(AFTER_KILL).unwrap_or_else(|| {
            self.handle = None;
            Some("did not stop when cut off (left to end with this process)".to_string())
        })
    }

    fn wait_for(&mut self, limit: Duration) -> Option<Option<String>> {
        let deadline = Instant::now() + limit;
        while self.handle.as_ref().is_some_and(|h| !h.is_finished()) {
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Some(self.join())
    }
}

impl ServeThread {
    /// How the thread ended (it has, or is about to).
    fn join(&mut self) -> Option<String> {
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(0)) | None => None,
            Some(Ok(code)) => Some(format!("exited with status {code}")),
            Some(Err(_)) => Some("failed (its thread panicked)".to_string()),
        }
    }
}
