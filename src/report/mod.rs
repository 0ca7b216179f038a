//! What the user sees: `--verbose` log lines on stdout, `--debug` detail and the
//! `--progress` bar on stderr, and the `--stat` summary.

use std::fmt::Display;
use std::io::Write;
use std::time::{Duration, Instant};

use std::cell::{Cell, RefCell};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

mod progress;
use progress::Progress;

/// Which kinds of output the user asked for.
#[derive(Clone, Copy, Debug, Default)]
pub struct Output {
    /// `--stat`.
    pub stat: bool,
    /// `--verbose`.
    pub verbose: bool,
    /// `--progress`.
    pub progress: bool,
    /// `--debug`.
    pub debug: bool,
}

/// Where `--stat` and `--stat-file` send the statistics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StatRequest {
    /// `--stat` (or `--stat=text`): the text summary on stdout.
    pub text: bool,
    /// `--stat=json` without `--stat-file`: the JSON object on stdout.
    pub json_stdout: bool,
    /// `--stat-file PATH`: the JSON object into PATH.
    pub file: Option<std::path::PathBuf>,
}

impl StatRequest {
    /// True if the statistics go anywhere.
    pub fn wanted(&self) -> bool {
        self.text || self.json_stdout || self.file.is_some()
    }
}

/// Routes log, debug and progress output.
pub struct Reporter {
    output: Output,
    /// The pass under way, with `--progress`.
    progress: RefCell<Option<Progress>>,
    /// The bar on a terminal; without one, a line at most every [`PLAIN_INTERVAL`].
    bar: Option<ProgressBar>,
    /// When the progress was last drawn.
    drawn: Cell<Instant>,
    started: Instant,
}

/// How often a line is written when stderr is not a terminal (logs, cron).
const PLAIN_INTERVAL: Duration = Duration::from_secs(1);
/// How often the bar is redrawn on a terminal.
const BAR_INTERVAL: Duration = Duration::from_millis(100);

impl Reporter {
    /// A reporter whose clock starts now.
    pub fn new(output: Output) -> Reporter {
        let now = Instant::now();
        Reporter { output, progress: RefCell::new(None), bar: None, drawn: Cell::new(now), started: now }
    }

    /// Time since the reporter was made.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// True if `--debug` output is wanted (to skip building its text otherwise).
    pub fn debugging(&self) -> bool {
        self.output.debug
    }

    /// A `--verbose` line on stdout.
    pub fn log(&self, line: impl Display) {
        if self.output.verbose {
            self.say(line);
        }
    }

    /// A line on stdout that is said whatever the options: the result a command was
    /// run for (a dry run's report).
    pub fn say(&self, line: impl Display) {
        self.suspend(|| {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        });
    }

    /// A line on stderr that is said whatever the options: something the user must
    /// know although the run goes on.
    pub fn warn(&self, line: impl Display) {
        self.suspend(|| eprintln!("basyn: {line}"));
    }

    /// A `--debug` line on stderr.
    pub fn debug(&self, line: impl Display) {
        if self.output.debug {
            self.suspend(|| eprintln!("debug: {line}"));
        }
    }

    fn suspend(&self, f: impl FnOnce()) {
        match &self.bar {
            Some(bar) => bar.suspend(f),
            None => f(),
        }
    }

    /// Starts a pass over `total` bytes in `phase` (shown only with `--progress`).
    pub fn start(&mut self, phase: &str, total: u64) {
        self.finish();
        if !self.output.progress {
            return;
        }
        *self.progress.borrow_mut() = Some(Progress::new(phase, total));
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template("[{wide_bar}] {msg}")
                .map(|s| s.progress_chars("=> "))
                .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            self.bar = Some(bar);
        }
        self.drawn.set(Instant::now());
        self.draw(true);
    }

    /// The pass is in `phase` now (hashing, comparing, sending, flushing, verifying).
    pub fn phase(&self, phase: &str) {
        let changed = self.progress.borrow_mut().as_mut().map(|p| p.phase(phase)).is_some();
        if changed {
            self.draw(true);
        }
    }

    /// `bytes` more were read or sent.
    pub fn advance(&self, bytes: u64) {
        let on = self.progress.borrow_mut().as_mut().map(|p| p.moved(bytes)).is_some();
        if on {
            self.draw(false);
        }
    }

    /// `bytes` more are done without being read: a state vouches for them.
    pub fn skip(&self, bytes: u64) {
        let on = self.progress.borrow_mut().as_mut().map(|p| p.skipped(bytes)).is_some();
        if on {
            self.draw(false);
        }
    }

    /// One more differing block was found.
    pub fn found_difference(&self) {
        if let Some(p) = self.progress.borrow_mut().as_mut() {
            p.differs();
        }
    }

    /// Draws the progress if it is time (or `now`).
    fn draw(&self, now: bool) {
        let progress = self.progress.borrow();
        let Some(p) = progress.as_ref() else { return };
        let interval = if self.bar.is_some() { BAR_INTERVAL } else { PLAIN_INTERVAL };
        let at = Instant::now();
        if !now && at.duration_since(self.drawn.get()) < interval {
            return;
        }
        self.drawn.set(at);
        match &self.bar {
            Some(bar) => {
                bar.set_position(p.done());
                bar.set_message(p.line(at));
            }
            None => eprintln!("{}", p.line(at)),
        }
    }

    /// Completes the pass: its last line stays.
    pub fn finish(&mut self) {
        self.draw(true);
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
        *self.progress.borrow_mut() = None;
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.abandon();
        }
    }
}

/// The figures `--stat` prints.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Size of the source device.
    pub device_size: u64,
    /// Bytes received from the far endpoint.
    pub rx: u64,
    /// Bytes sent to the far endpoint.
    pub tx: u64,
    /// Wall time of the whole run.
    pub elapsed: Duration,
    /// Blocks compared (SYNC, recheck).
    pub blocks_compared: u64,
    /// Blocks found different.
    pub blocks_differing: u64,
    /// Blocks whose data (some or all of it) went to the receiver: every block of a
    /// COPY, the differing blocks of a SYNC.
    pub blocks_sent: u64,
    /// Bytes of device data that crossed to the receiver as data.
    pub data_sent: u64,
    /// Bytes of device data that crossed to the receiver as zero tokens.
    pub zeros_sent: u64,
    /// Bytes of device data written to the receiver.
    pub bytes_written: u64,
    /// Bytes read from the local device.
    pub local_read: u64,
    /// Bytes read from the remote device.
    pub remote_read: u64,
    /// Tree nodes compared (tree walks and root comparisons).
    pub nodes_compared: u64,
    /// The far endpoint was reached over SSH: Rx and Tx are network traffic (otherwise
    /// they went through the pipe to a local child).
    pub over_ssh: bool,
}

impl Stats {
    /// True if no device data went to a receiver.
    pub fn sent_nothing(&self) -> bool {
        self.blocks_sent == 0 && self.data_sent == 0 && self.zeros_sent == 0 && self.bytes_written == 0
    }

    /// True if nothing happened to a device: none was sized, read or written (a run
    /// refused, or failed to connect, before that). A handshake may have crossed the link.
    pub fn is_empty(&self) -> bool {
        self.device_size == 0 && self.local_read == 0 && self.remote_read == 0 && self.bytes_written == 0
    }

    /// Traffic against the device size, in percent; `None` for an empty device.
    pub fn ratio(&self) -> Option<f64> {
        (self.device_size > 0).then(|| (self.rx + self.tx) as f64 * 100.0 / self.device_size as f64)
    }

    /// Network traffic per second; `None` without a network (a local run).
    pub fn real_bandwidth(&self) -> Option<f64> {
        self.over_ssh.then(|| (self.rx + self.tx) as f64 / self.secs())
    }

    /// Device size per second; `None` for a run that sent nothing, whose rate would
    /// only say how fast nothing was done.
    pub fn effective_bandwidth(&self) -> Option<f64> {
        (!self.sent_nothing()).then(|| self.device_size as f64 / self.secs())
    }

    fn secs(&self) -> f64 {
        self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The summary in the original tool's terms, one figure per line. A local run's Rx
    /// and Tx went through a pipe and are said so, with no network bandwidth.
    pub fn render(&self) -> String {
        let both = self.rx + self.tx;
        let traffic =
            format!("Rx {} bytes, Tx {} bytes, Both {} bytes ({})", self.rx, self.tx, both, human(both as f64));
        let ratio = self.ratio().unwrap_or(0.0);
        let (traffic, ratio) = match self.over_ssh {
            true => (traffic, format!("{ratio:.2} %")),
            false => (format!("no network (local run); pipe {traffic}"), format!("{ratio:.2} % (pipe bytes)")),
        };
        let rate = |r: Option<f64>| r.map(|r| format!("{}/s", human(r)));
        let bandwidth = match (rate(self.real_bandwidth()), rate(self.effective_bandwidth())) {
            (Some(real), Some(eff)) => format!("Real {real}, Effective {eff}"),
            (Some(real), None) => format!("Real {real}; nothing sent, no effective rate"),
            (None, Some(eff)) => format!("Effective {eff} (no network)"),
            (None, None) => "none: a local run that sent nothing".to_string(),
        };
        format!(
            "Device size: {} bytes ({})\n\
             Traffic:     {traffic}\n\
             Ratio:       {ratio}\n\
             Time:        {:.3} s\n\
             Bandwidth:   {bandwidth}\n\
             Blocks:      {} compared, {} differing, {} bytes written\n\
             Read:        local {} bytes, remote {} bytes\n\
             Tree:        {} nodes compared\n",
            self.device_size,
            human(self.device_size as f64),
            self.elapsed.as_secs_f64(),
            self.blocks_compared,
            self.blocks_differing,
            self.bytes_written,
            self.local_read,
            self.remote_read,
            self.nodes_compared,
        )
    }
}

/// Binary-prefixed size: `1.50 MiB`.
pub fn human(bytes: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{v:.0} B") } else { format!("{v:.2} {}", UNITS[u]) }
}

/// Set once a receiving device may change: an interruption before that changed nothing.
/// A static because the signal handler can read nothing else; only [`Interrupts`] sets it.
static WRITING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// What the handler says once the receiver may change: a message naming the receiver,
/// made before (a handler may not format), leaked so that it lives as long as the
/// process. Null: the generic message.
static CHANGED_MESSAGE: std::sync::atomic::AtomicPtr<u8> = std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());
static CHANGED_LEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// stderr is a terminal: the message starts on a new line, after the echoed `^C`.
static STDERR_TTY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The SIGINT/SIGTERM handler of a run, and what it must say when it fires: the engine
/// tells it, through [`Interrupts::receiver_may_change`], when an interruption starts
/// to mean "the receiving device may be partly changed" (exit 2) instead of "nothing
/// was written" (exit 1). The endpoint notices its input closing and exits by itself;
/// states keep their last checkpoint.
#[derive(Debug)]
pub struct Interrupts(());

impl Interrupts {
    /// Installs the handler for SIGINT and SIGTERM.
    pub fn install() -> Interrupts {
        extern "C" fn handler(_: libc::c_int) {
            const CHANGED: &[u8] = b"basyn: interrupted; the receiving device may be partly changed\n";
            const NOTHING: &[u8] = b"basyn: interrupted before anything was written\n";
            use std::sync::atomic::Ordering::SeqCst;
            let writing = WRITING.load(SeqCst);
            let (mut msg, code) = if writing { (CHANGED, 2) } else { (NOTHING, 1) };
            let named = CHANGED_MESSAGE.load(SeqCst);
            if writing && !named.is_null() {
                // SAFETY: set once from a leaked boxed slice of exactly CHANGED_LEN bytes,
                // stored before the pointer, and never freed.
                msg = unsafe { std::slice::from_raw_parts(named, CHANGED_LEN.load(SeqCst)) };
            }
            // SAFETY: atomic loads, write(2) and _exit(2) are async-signal-safe; msg lives
            // for the whole process.
            unsafe {
                if STDERR_TTY.load(SeqCst) {
                    libc::write(2, b"\n".as_ptr().cast(), 1);
                }
                libc::write(2, msg.as_ptr().cast(), msg.len());
                libc::_exit(code);
            }
        }
        // SAFETY: isatty on a descriptor number; the handler only calls
        // async-signal-safe functions.
        unsafe {
            STDERR_TTY.store(libc::isatty(2) == 1, std::sync::atomic::Ordering::SeqCst);
            libc::signal(libc::SIGINT, handler as *const () as libc::sighandler_t);
            libc::signal(libc::SIGTERM, handler as *const () as libc::sighandler_t);
        }
        Interrupts(())
    }

    /// From now on `receiver` (with its side) may change: it is about to be opened, which
    /// may create or resize it. An interruption then names it, and says what to do.
    pub fn receiver_may_change(&self, receiver: &str) {
        use std::sync::atomic::Ordering::SeqCst;
        let next = "rerun the same command: it resumes from the last checkpoint";
        if CHANGED_MESSAGE.load(SeqCst).is_null() {
            let text = format!("basyn: interrupted; the receiving device {receiver} may be partly changed; {next}\n");
            let leaked: &'static mut [u8] = Box::leak(text.into_bytes().into_boxed_slice());
            CHANGED_LEN.store(leaked.len(), SeqCst);
            CHANGED_MESSAGE.store(leaked.as_mut_ptr(), SeqCst);
        }
        WRITING.store(true, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_show_every_figure_of_the_original() {
        let s = Stats {
            device_size: 1 << 30,
            rx: 1000,
            tx: 24,
            elapsed: Duration::from_secs(2),
            blocks_sent: 1,
            over_ssh: true,
            ..Stats::default()
        };
        let text = s.render();
        for needle in [
            "Device size: 1073741824 bytes",
            "Rx 1000 bytes",
            "Tx 24 bytes",
            "Both 1024 bytes",
            "Ratio:",
            "Time:        2.000 s",
            "Real 512 B/s",
            "Effective 512.00 MiB/s",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from\n{text}");
        }
    }

    #[test]
    fn a_local_run_has_no_network_figures_and_one_that_sent_nothing_no_effective_rate() {
        let s = Stats { device_size: 1 << 20, rx: 300, tx: 200, elapsed: Duration::from_secs(1), ..Stats::default() };
        let text = s.render();
        assert!(text.contains("Traffic:     no network (local run); pipe Rx 300 bytes, Tx 200 bytes"), "{text}");
        assert!(text.contains("Bandwidth:   none: a local run that sent nothing"), "{text}");
        assert!(!text.contains("Real") && !text.contains("Effective"), "{text}");
        let sent = Stats { bytes_written: 4096, blocks_sent: 1, ..s.clone() }.render();
        assert!(sent.contains("Bandwidth:   Effective 1.00 MiB/s (no network)") && !sent.contains("Real"), "{sent}");
        let ssh = Stats { over_ssh: true, ..s }.render();
        assert!(ssh.contains("Bandwidth:   Real 500 B/s; nothing sent, no effective rate"), "{ssh}");
        assert!(ssh.contains("Traffic:     Rx 300 bytes") && !ssh.contains("Effective"), "{ssh}");
    }

    #[test]
    fn stats_of_a_run_that_touched_no_device_are_empty() {
        assert!(Stats { rx: 200, tx: 100, over_ssh: true, ..Stats::default() }.is_empty());
        assert!(!Stats { device_size: 1, ..Stats::default() }.is_empty());
        assert!(!Stats { local_read: 1, ..Stats::default() }.is_empty());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(0.0), "0 B");
        assert_eq!(human(1536.0), "1.50 KiB");
        assert_eq!(human(3.0 * 1024.0 * 1024.0 * 1024.0), "3.00 GiB");
    }
}
