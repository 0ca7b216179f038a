//! A byte-stream pair to a `basyn serve` and the process behind it, whatever carries
//! it: a child process on this machine over pipes, or a command over SSH (`ssh`).

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::device::describe_io;

/// Why no `basyn serve` could be reached; nothing was changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The transport refused, naming the host and the cause.
    #[error("{0}")]
    Refused(String),
    /// A local step of starting the endpoint failed.
    #[error("{what}: {}", describe_io(source))]
    Start {
        /// What could not be done.
        what: &'static str,
        /// The cause.
        source: std::io::Error,
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
        let deadline = Instant::now() + limit;
        loop {
            match self.try_wait() {
                Ok(Some(st)) if st.success() => return Some(None),
                Ok(Some(st)) => return Some(Some(describe_status(st))),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                Ok(None) => return None,
                Err(e) => return Some(Some(format!("could not be waited for: {e}"))),
            }
        }
    }
}

/// "exited with status 3", "was killed by signal 9".
pub fn describe_status(st: std::process::ExitStatus) -> String {
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
    pub fn local_child(path: &Path) -> Result<Link, LinkError> {
        let exe = std::env::current_exe()
            .map_err(|source| LinkError::Start { what: "cannot find the basyn executable", source })?;
        let mut child = Command::new(exe)
            .arg("serve")
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| LinkError::Start { what: "cannot start the local endpoint (basyn serve)", source })?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let source = std::io::Error::other("its pipes are missing");
            return Err(LinkError::Start { what: "cannot start the local endpoint (basyn serve)", source });
        };
        widen_pipe(&stdin);
        widen_pipe(&stdout);
        let label = format!("remote {}", path.display());
        Ok(Link { reader: Box::new(stdout), writer: Box::new(stdin), process: Box::new(child), label })
    }
}

impl Link {
    /// Caps the data rate of each direction at `rate` bytes per second (`--bwlimit`).
    pub fn throttled(self, rate: u64) -> Link {
        Link {
            reader: Box::new(Throttle::new(self.reader, rate)),
            writer: Box::new(Throttle::new(self.writer, rate)),
            ..self
        }
    }
}

/// A token bucket over one direction of a link: at most `rate` bytes per second on
/// average, in bursts of at most a tenth of a second's worth (between 1 and 64 KiB),
/// which is also the most moved in one call: no call sleeps much longer than 0.1 s, so
/// the `--timeout` watch keeps seeing bytes arrive. Credit saved while the link is idle
/// is capped at one burst, so an idle phase (hashing) is not followed by a run at full
/// speed.
struct Throttle<T> {
    inner: T,
    rate: f64,
    burst: usize,
    tokens: f64,
    last: Instant,
}

/// The largest burst.
const BURST: usize = 64 * 1024;

impl<T> Throttle<T> {
    fn new(inner: T, rate: u64) -> Throttle<T> {
        let burst = (rate / 10).clamp(1024, BURST as u64) as usize;
        Throttle { inner, rate: rate.max(1) as f64, burst, tokens: burst as f64, last: Instant::now() }
    }

    /// Waits until `n` bytes may pass, and takes their tokens.
    fn pace(&mut self, n: usize) {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst as f64);
        self.last = now;
        self.tokens -= n as f64;
        if self.tokens < 0.0 {
            std::thread::sleep(Duration::from_secs_f64(-self.tokens / self.rate));
            self.last = Instant::now();
            self.tokens = 0.0;
        }
    }
}

impl<T: Write> Write for Throttle<T> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.burst);
        self.pace(n);
        let written = self.inner.write(&buf[..n])?;
        // Tokens of what was not taken are given back.
        self.tokens += (n - written) as f64;
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<T: Read> Read for Throttle<T> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.burst);
        let read = self.inner.read(&mut buf[..n])?;
        self.pace(read);
        Ok(read)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttled_stream_keeps_to_its_rate_after_a_first_burst() {
        let rate = 1 << 20;
        let mut t = Throttle::new(Vec::new(), rate);
        let started = Instant::now();
        let chunk = vec![7u8; 100_000];
        while t.inner.len() < (rate as usize) / 2 + BURST {
            t.write_all(&chunk).unwrap();
        }
        // Half a second's worth beyond the first burst may not go faster than the rate.
        assert!(started.elapsed() >= Duration::from_millis(450), "{:?}", started.elapsed());
        // Idle time is credited up to one burst only.
        std::thread::sleep(Duration::from_millis(300));
        let again = Instant::now();
        let mut data = vec![7u8; (rate as usize) / 4 + BURST];
        t.write_all(&data).unwrap();
        assert!(again.elapsed() >= Duration::from_millis(220), "{:?}", again.elapsed());
        let mut r = Throttle::new(&data[..], rate);
        let mut out = Vec::new();
        let started = Instant::now();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out.len(), data.len());
        assert!(started.elapsed() >= Duration::from_millis(220), "{:?}", started.elapsed());
        data.clear();
    }

    #[test]
    fn exit_statuses_read_as_sentences() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(describe_status(std::process::ExitStatus::from_raw(3 << 8)), "exited with status 3");
        assert_eq!(describe_status(std::process::ExitStatus::from_raw(9)), "was killed by signal 9");
    }

    #[test]
    fn a_child_that_fails_is_described_and_one_that_hangs_is_not_waited_for_forever() {
        let mut failing = Command::new("sh").args(["-c", "exit 4"]).spawn().unwrap();
        assert_eq!(Process::wait(&mut failing).as_deref(), Some("exited with status 4"));
        let mut hanging = Command::new("sleep").arg("30").spawn().unwrap();
        assert_eq!(hanging.wait_for(Duration::from_millis(50)), None);
        Process::kill(&mut hanging);
        assert_eq!(Process::wait(&mut hanging).as_deref(), Some("was killed by signal 9"));
    }
}
