//! Helpers shared by the integration tests: running the real `basyn` binary (one spawn
//! helper, one time limit), waiting on conditions (one polling loop), making images,
//! comparing devices byte for byte, parsing `--stat` (one parser), and guards for loop
//! devices, mounts and immutable files that clean up in `Drop`.
//!
//! Prerequisites (losetup, mkfs.ext4, mount, chattr, a free loop device) go through
//! [`require`]: when `CI` is set to a non-empty value a missing prerequisite fails the
//! test, otherwise the test prints `skipped: <why>` on stderr and returns.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const KIB: usize = 1024;
pub const MIB: usize = 1024 * 1024;

// ---------------------------------------------------------------------------
// Prerequisites
// ---------------------------------------------------------------------------

/// True when running under CI (the variable `CI` is set and not empty).
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty())
}

/// Checks a prerequisite. Returns true if it holds. Otherwise fails the test under CI,
/// or prints `skipped: <why>` on stderr and returns false (the caller then returns).
pub fn require(ok: bool, why: &str) -> bool {
    if ok {
        return true;
    }
    if in_ci() {
        panic!("prerequisite missing (CI is set, so this is a failure): {why}");
    }
    eprintln!("skipped: {why}");
    false
}

/// [`require`] for a prerequisite that produces a value: `Ok(v)` gives `Some(v)`,
/// `Err(why)` fails under CI or prints `skipped: why` and gives `None`.
pub fn prerequisite<T>(r: Result<T, String>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(why) => {
            require(false, &why);
            None
        }
    }
}

/// Finds an executable in `PATH` or the sbin directories (tests may run without them in PATH).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/local/bin", "/usr/bin", "/bin"];
    std::env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file()))
}

/// Requires a tool to be installed; see [`require`].
pub fn require_tool(name: &str) -> bool {
    require(which(name).is_some(), &format!("{name} is not installed"))
}

/// Requires root (loop devices, mounts, chattr need it); see [`require`].
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    require(euid == 0, "not running as root")
}

/// Runs a system tool; `Ok(stdout)` on success, `Err` with the command and its stderr.
pub fn tool(name: &str, args: &[&str]) -> Result<String, String> {
    let exe = which(name).ok_or_else(|| format!("{name} is not installed"))?;
    let out =
        Command::new(&exe).args(args).stdin(Stdio::null()).output().map_err(|e| format!("cannot run {name}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{name} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

// ---------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------

/// The longest pause between two checks of [`poll`].
const POLL_PAUSE: Duration = Duration::from_millis(5);

/// Checks `cond` until it holds or `limit` has passed; returns whether it held. This is
/// the tests' one polling loop: it checks at once, then after pauses of 1, 2 and 4 ms and
/// every 5 ms from then on, so that short waits end soon and long ones cost little.
pub fn poll(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(POLL_PAUSE);
    }
}

/// Waits (with [`poll`]) until `cond` holds; fails the test, naming `what` it waited
/// for, if it does not within `limit`.
#[track_caller]
pub fn wait_until(limit: Duration, what: &str, cond: impl FnMut() -> bool) {
    assert!(poll(limit, cond), "gave up after {limit:?} waiting for {what}");
}

/// A counter of `/proc/PID/io` (`rchar`, `wchar`, ...); 0 if unreadable (the process is
/// gone).
pub fn io_counter(pid: u32, field: &str) -> u64 {
    let text = fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Running basyn
// ---------------------------------------------------------------------------

/// How long one run of the binary may take, from its start until it has exited and its
/// output is closed, before it is killed and the test fails.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// The outcome of one run of the binary.
pub struct Run {
    pub args: Vec<String>,
    /// Exit code; -1 if killed by a signal.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl fmt::Debug for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn cut(s: &str) -> &str {
            match s.char_indices().nth(4000) {
                Some((i, _)) => &s[..i],
                None => s,
            }
        }
        write!(
            f,
            "\n  command: basyn {}\n  exit code: {}\n  stdout: {:?}\n  stderr: {:?}\n",
            self.args.join(" "),
            self.code,
            cut(&self.stdout),
            cut(&self.stderr)
        )
    }
}

/// The state directory of every basyn the tests start (`BASYN_STATE_DIR`), so that
/// they never write the machine's own (`/var/lib/basyn`).
pub fn state_dir() -> PathBuf {
    std::env::temp_dir().join("basyn-test-states")
}

/// Where basyn keeps `device`'s default state: in [`state_dir`], named after its
/// canonical path with `/` made `_`.
pub fn state_of(device: &Path) -> PathBuf {
    let canonical = fs::canonicalize(device).unwrap_or_else(|_| device.to_path_buf());
    let flat = canonical.to_string_lossy().trim_start_matches('/').replace('/', "_");
    state_dir().join(format!("{flat}.basyn-state"))
}

/// The basyn binary with `args`, stdin from /dev/null, the tests' [`state_dir`], and
/// without `CI` (the binary must not depend on it).
pub fn command<S: AsRef<OsStr>>(args: &[S]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_basyn"));
    cmd.args(args).env_remove("CI").env("BASYN_STATE_DIR", state_dir()).stdin(Stdio::null());
    cmd
}

/// Runs `basyn ARGS` ([`command`]) with stdout and stderr captured (so stderr is not a
/// terminal), within [`RUN_TIMEOUT`].
pub fn basyn<S: AsRef<OsStr>>(args: &[S]) -> Run {
    spawn(command(args), args).finish()
}

/// Starts basyn with `args` in the background ([`spawn`]), with extra environment
/// variables and without a boot id override unless given.
pub fn start(args: &[String], env: &[(&str, &str)]) -> Running {
    let mut cmd = command(args);
    cmd.env_remove("BASYN_TEST_BOOT_ID").envs(env.iter().copied());
    spawn(cmd, args)
}

/// Starts `cmd` (a basyn command: [`command`], `Sshd::command`) with stdout and stderr
/// piped and drained by threads. `args` are only for showing the command in failures.
/// Every run of the binary goes through here.
pub fn spawn<S: AsRef<OsStr>>(mut cmd: Command, args: &[S]) -> Running {
    let args = args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect();
    let started = Instant::now();
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("cannot start the basyn binary");
    let (stdout, stderr) = (Arc::default(), Arc::default());
    let drains = vec![
        drain(child.stdout.take().expect("stdout is piped"), Arc::clone(&stdout)),
        drain(child.stderr.take().expect("stderr is piped"), Arc::clone(&stderr)),
    ];
    Running { child, stdout, stderr, drains, args, started }
}

/// A thread appending what comes out of `pipe` to `into` until the pipe is closed.
fn drain(mut pipe: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * KIB];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => into.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    })
}

/// What a drain thread has collected so far.
fn collected(buf: &Mutex<Vec<u8>>) -> String {
    String::from_utf8_lossy(&buf.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
}

/// A basyn process started by [`spawn`], its output collected as it comes. Killed and
/// reaped on drop if it still runs, so that a failing test leaves nothing behind.
pub struct Running {
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    drains: Vec<JoinHandle<()>>,
    args: Vec<String>,
    started: Instant,
}

impl Running {
    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("cannot wait for basyn").is_none()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Bytes the process has written with write(2) so far (`wchar` of /proc/PID/io):
    /// for a PULL the data written to the local receiver, for a PUSH the data sent to
    /// the endpoint.
    pub fn written(&self) -> u64 {
        io_counter(self.child.id(), "wchar")
    }

    /// Its stderr so far.
    pub fn stderr_so_far(&self) -> String {
        collected(&self.stderr)
    }

    /// Waits until the process has ended and its output is closed (within
    /// [`RUN_TIMEOUT`] of its start) and returns the run.
    pub fn finish(mut self) -> Run {
        let limit = RUN_TIMEOUT.saturating_sub(self.started.elapsed());
        let mut status = None;
        let done = poll(limit, || {
            if status.is_none() {
                status = self.child.try_wait().expect("cannot wait for basyn");
            }
            status.is_some() && self.drains.iter().all(|d| d.is_finished())
        });
        if !done {
            self.kill();
            panic!(
                "basyn {} did not finish within {RUN_TIMEOUT:?} ({}); stderr so far: {:?}",
                self.args.join(" "),
                if status.is_some() { "it exited, but its output stayed open" } else { "it still ran" },
                self.stderr_so_far()
            );
        }
        let code = status.and_then(|st| st.code()).unwrap_or(-1);
        Run {
            args: std::mem::take(&mut self.args),
            code,
            stdout: collected(&self.stdout),
            stderr: collected(&self.stderr),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

impl Run {
    /// Asserts the exit code.
    #[track_caller]
    pub fn code(&self, code: i32) -> &Self {
        assert_eq!(self.code, code, "unexpected exit code{self:?}");
        self
    }

    /// Asserts exit code 0.
    #[track_caller]
    pub fn ok(&self) -> &Self {
        self.code(0)
    }

    /// Asserts stdout and stderr are both empty.
    #[track_caller]
    pub fn silent(&self) -> &Self {
        assert!(self.stdout.is_empty() && self.stderr.is_empty(), "expected no output{self:?}");
        self
    }

    /// Asserts stderr is exactly one non-empty line (ending in a newline) and returns it.
    #[track_caller]
    pub fn error_line(&self) -> &str {
        let body = self.stderr.strip_suffix('\n').unwrap_or_else(|| panic!("stderr does not end in a newline{self:?}"));
        assert!(!body.is_empty() && !body.contains('\n'), "stderr is not exactly one line{self:?}");
        body
    }

    /// Asserts a refusal/error with this exit code: one line on stderr containing every
    /// fragment (case-sensitive). Returns the line.
    #[track_caller]
    pub fn fails(&self, code: i32, fragments: &[&str]) -> &str {
        self.code(code);
        let line = self.error_line();
        for f in fragments {
            assert!(line.contains(f), "stderr line lacks {f:?}{self:?}");
        }
        line
    }

    /// Asserts a usage error: exit 1, nothing on stdout, one line on stderr that ends
    /// with "see 'basyn --help'" and contains every fragment.
    #[track_caller]
    pub fn usage_error(&self, fragments: &[&str]) -> &str {
        let line = self.fails(1, fragments);
        assert!(line.ends_with("see 'basyn --help'"), "usage error does not point to --help{self:?}");
        assert!(self.stdout.is_empty(), "usage error printed on stdout{self:?}");
        line
    }

    /// Parses the `--stat` block from stdout.
    #[track_caller]
    pub fn stat(&self) -> Stat {
        Stat::parse(&self.stdout).unwrap_or_else(|e| panic!("cannot parse --stat output: {e}{self:?}"))
    }
}

/// Path as `&str` (temp paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("non-UTF-8 path")
}

// ---------------------------------------------------------------------------
// --stat
// ---------------------------------------------------------------------------

/// The figures printed by `--stat`.
#[derive(Debug, Clone, PartialEq)]
pub struct Stat {
    pub device_size: u64,
    pub rx: u64,
    pub tx: u64,
    pub both: u64,
    /// Percent.
    pub ratio: f64,
    /// Seconds.
    pub time: f64,
    /// The text after "Real", e.g. "75.91 MiB/s"; `None` for a local run (no network).
    pub real: Option<String>,
    /// The text after "Effective"; `None` for a run that sent nothing.
    pub effective: Option<String>,
    /// Blocks compared ("Blocks: N compared, ...").
    pub compared: u64,
    /// Blocks found different.
    pub differing: u64,
    /// Bytes of device data written to the receiver.
    pub written: u64,
    /// Bytes read from the local device ("Read: local N bytes, ...").
    pub local_read: u64,
    /// Bytes read from the remote device.
    pub remote_read: u64,
    /// Tree nodes compared ("Tree: N nodes compared").
    pub nodes: u64,
}

fn line_with<'a>(text: &'a str, prefix: &str) -> Result<&'a str, String> {
    text.lines().find(|l| l.starts_with(prefix)).ok_or_else(|| format!("no line starting with {prefix:?}"))
}

/// The unsigned integer right after `key` (spaces skipped) in `line`.
fn int_after(line: &str, key: &str) -> Result<u64, String> {
    let at = line.find(key).ok_or_else(|| format!("{key:?} missing in {line:?}"))?;
    let rest = line[at + key.len()..].trim_start();
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().map_err(|_| format!("no number after {key:?} in {line:?}"))
}

/// The decimal number right after `key` in `line`.
fn float_after(line: &str, key: &str) -> Result<f64, String> {
    let at = line.find(key).ok_or_else(|| format!("{key:?} missing in {line:?}"))?;
    let rest = line[at + key.len()..].trim_start();
    let num: String = rest.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    num.parse().map_err(|_| format!("no number after {key:?} in {line:?}"))
}

impl Stat {
    /// Parses the lines "Device size: N bytes", "Traffic: [...; pipe] Rx N bytes, Tx N bytes, Both N
    /// bytes", "Ratio: X %", "Time: X s", "Bandwidth: [Real ...][, ][Effective ...]", "Blocks:
    /// N compared, N differing, N bytes written", "Read: local N bytes, remote N bytes"
    /// and "Tree: N nodes compared". The tests' one parser of `--stat`.
    pub fn parse(text: &str) -> Result<Stat, String> {
        let size = line_with(text, "Device size:")?;
        let traffic = line_with(text, "Traffic:")?;
        let ratio = line_with(text, "Ratio:")?;
        let time = line_with(text, "Time:")?;
        let bw = line_with(text, "Bandwidth:")?;
        let blocks = line_with(text, "Blocks:")?;
        let read = line_with(text, "Read:")?;
        let tree = line_with(text, "Tree:")?;
        for (line, unit) in [(size, " bytes"), (time, " s"), (blocks, " bytes written"), (tree, " nodes compared")] {
            if !line.contains(unit) {
                return Err(format!("{line:?} lacks {unit:?}"));
            }
        }
        if !ratio.contains(" %") {
            return Err(format!("{ratio:?} has no %"));
        }
        // "Real R/s, Effective E/s", either may be missing (a local run, nothing sent).
        let rate = |key: &str| -> Result<Option<String>, String> {
            let Some(at) = bw.find(key) else { return Ok(None) };
            let rest = &bw[at + key.len()..];
            let end = rest.find("/s").ok_or_else(|| format!("{key:?} is not a rate in {bw:?}"))?;
            Ok(Some(rest[..end + 2].trim().to_string()))
        };
        let (real, effective) = (rate("Real ")?, rate("Effective ")?);
        Ok(Stat {
            device_size: int_after(size, "Device size:")?,
            rx: int_after(traffic, "Rx")?,
            tx: int_after(traffic, "Tx")?,
            both: int_after(traffic, "Both")?,
            ratio: float_after(ratio, "Ratio:")?,
            time: float_after(time, "Time:")?,
            real,
            effective,
            compared: int_after(blocks, "Blocks:")?,
            differing: int_after(blocks, "compared,")?,
            written: int_after(blocks, "differing,")?,
            local_read: int_after(read, "local")?,
            remote_read: int_after(read, "remote")?,
            nodes: int_after(tree, "Tree:")?,
        })
    }

    /// Bytes read from (source, receiver) in `dir`.
    pub fn reads(&self, dir: Dir) -> (u64, u64) {
        match dir {
            Dir::Push => (self.local_read, self.remote_read),
            Dir::Pull => (self.remote_read, self.local_read),
        }
    }

    /// True if nothing was read from either device.
    pub fn read_nothing(&self) -> bool {
        self.local_read == 0 && self.remote_read == 0
    }

    /// Bytes that carried the data for this direction: Tx for PUSH, Rx for PULL.
    pub fn data_direction(&self, push: bool) -> u64 {
        if push { self.tx } else { self.rx }
    }
}

// ---------------------------------------------------------------------------
// Images and device contents
// ---------------------------------------------------------------------------

/// A new temporary directory.
pub fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("basyn-test-").tempdir().expect("cannot create a temp dir")
}

/// Deterministic pseudo-random bytes (splitmix64), incompressible.
pub fn random_data(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x9e37_79b9_7f4a_7c15;
    let mut out = vec![0u8; len];
    for chunk in out.chunks_mut(8) {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let bytes = z.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    out
}

/// Highly compressible bytes (repeated text).
pub fn compressible_data(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(format!("line {:08} of a very compressible disk image\n", i % 1000).as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// Writes a new file with `data`.
pub fn write(path: &Path, data: &[u8]) {
    fs::write(path, data).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// Writes a random image of `len` bytes and returns its content.
pub fn random_image(path: &Path, seed: u64, len: usize) -> Vec<u8> {
    let data = random_data(seed, len);
    write(path, &data);
    data
}

/// Reads a whole file or block device with plain open + read.
pub fn read(path: &Path) -> Vec<u8> {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    v
}

/// Size of a file or block device (seek to the end, which works for both).
pub fn size_of(path: &Path) -> u64 {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    f.seek(SeekFrom::End(0)).unwrap_or_else(|e| panic!("cannot seek {}: {e}", path.display()))
}

/// Bytes of a file or block device that are in the page cache now (`mincore` over a
/// mapping, which reads nothing in).
pub fn resident_bytes(path: &Path) -> u64 {
    use std::os::fd::AsRawFd;
    let f = File::open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let len = size_of(path) as usize;
    if len == 0 {
        return 0;
    }
    // SAFETY: a fresh read-only shared mapping of the whole device, only passed to
    // mincore and unmapped here; nothing reads through it.
    let map = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0) };
    assert!(map != libc::MAP_FAILED, "cannot map {}: {}", path.display(), std::io::Error::last_os_error());
    let page = 4096;
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: `vec` has one byte per page of the mapping, which is live.
    let rc = unsafe { libc::mincore(map, len, vec.as_mut_ptr()) };
    let err = std::io::Error::last_os_error();
    // SAFETY: the mapping made above, of this length.
    unsafe { libc::munmap(map, len) };
    assert_eq!(rc, 0, "mincore of {}: {err}", path.display());
    vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * page as u64
}

/// Overwrites bytes in place (no truncation; works on block devices).
pub fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    f.write_all_at(bytes, offset).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    f.sync_all().ok();
}

/// Flips every byte in `[offset, offset+len)`, so the range surely differs.
pub fn flip(path: &Path, offset: u64, len: usize) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    for b in &mut buf {
        *b = !*b;
    }
    f.write_all_at(&buf, offset).unwrap();
    f.sync_all().ok();
}

/// Where two byte strings first differ (or where the shorter ends).
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        return Some(i);
    }
    (a.len() != b.len()).then(|| a.len().min(b.len()))
}

/// Asserts that `path` holds exactly `expected`.
#[track_caller]
pub fn assert_content(path: &Path, expected: &[u8], what: &str) {
    let got = read(path);
    if let Some(at) = first_difference(&got, expected) {
        panic!(
            "{what}: {} differs from the expected content at offset {at} (size {} vs expected {})",
            path.display(),
            got.len(),
            expected.len()
        );
    }
}

/// Asserts that two files/devices are byte-for-byte identical.
#[track_caller]
pub fn assert_same(a: &Path, b: &Path) {
    let (x, y) = (read(a), read(b));
    if let Some(at) = first_difference(&x, &y) {
        panic!("{} ({} bytes) and {} ({} bytes) differ at offset {at}", a.display(), x.len(), b.display(), y.len());
    }
}

/// Flushes a block device's buffers (`blockdev --flushbufs`); failures are ignored.
pub fn flushbufs(dev: &Path) {
    let _ = tool("blockdev", &["--flushbufs", s(dev)]);
}

// ---------------------------------------------------------------------------
// Guards
// ---------------------------------------------------------------------------

/// A loop device attached to an image file; detached on drop.
pub struct LoopDev {
    pub path: PathBuf,
}

impl LoopDev {
    /// `losetup --find --show [-r] FILE`, retried a few times (parallel tests race for
    /// free devices).
    pub fn attach(file: &Path, read_only: bool) -> Result<LoopDev, String> {
        let mut last = String::new();
        for attempt in 0..5 {
            let mut args = vec!["--find", "--show"];
            if read_only {
                args.push("--read-only");
            }
            args.push(s(file));
            match tool("losetup", &args) {
                Ok(out) => {
                    let dev = out.trim();
                    if dev.starts_with("/dev/") {
                        return Ok(LoopDev { path: PathBuf::from(dev) });
                    }
                    last = format!("losetup printed {dev:?}");
                }
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(50 * (attempt + 1)));
        }
        Err(format!("cannot attach a loop device to {}: {last}", file.display()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn s(&self) -> &str {
        s(&self.path)
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        for _ in 0..20 {
            if tool("losetup", &["-d", s(&self.path)]).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("warning: could not detach {}", self.path.display());
    }
}

/// Attaches a loop device, or handles the missing prerequisite (see [`require`]).
pub fn loop_dev(file: &Path) -> Option<LoopDev> {
    if !require_root() || !require_tool("losetup") {
        return None;
    }
    prerequisite(LoopDev::attach(file, false))
}

/// Attaches a read-only loop device (`losetup -r`), or handles the missing prerequisite.
pub fn loop_dev_ro(file: &Path) -> Option<LoopDev> {
    if !require_root() || !require_tool("losetup") {
        return None;
    }
    prerequisite(LoopDev::attach(file, true))
}

/// An ext4 file system made on a device and mounted on a directory; unmounted on drop.
pub struct Mount {
    pub dir: PathBuf,
}

impl Mount {
    /// `mkfs.ext4 -q` (no lazy init, so the mounted device stays quiet) and `mount`.
    pub fn ext4(dev: &Path, dir: &Path) -> Result<Mount, String> {
        Mount::ext4_with(dev, dir, &[])
    }

    /// [`Mount::ext4`] with extra `mkfs.ext4` options.
    pub fn ext4_with(dev: &Path, dir: &Path, options: &[&str]) -> Result<Mount, String> {
        let mut args = vec!["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"];
        args.extend_from_slice(options);
        args.push(s(dev));
        tool("mkfs.ext4", &args)?;
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        tool("mount", &[s(dev), s(dir)])?;
        Ok(Mount { dir: dir.to_path_buf() })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        for _ in 0..20 {
            if tool("umount", &[s(&self.dir)]).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = tool("umount", &["-l", s(&self.dir)]);
    }
}

/// Makes and mounts an ext4 file system, or handles the missing prerequisite.
pub fn mount_ext4(dev: &Path, dir: &Path) -> Option<Mount> {
    mount_ext4_with(dev, dir, &[])
}

/// [`mount_ext4`] with extra `mkfs.ext4` options.
pub fn mount_ext4_with(dev: &Path, dir: &Path, options: &[&str]) -> Option<Mount> {
    if !require_tool("mkfs.ext4") || !require_tool("mount") || !require_tool("umount") {
        return None;
    }
    prerequisite(Mount::ext4_with(dev, dir, options))
}

/// A file made immutable with `chattr +i`; `chattr -i` on drop.
pub struct Immutable {
    pub path: PathBuf,
}

impl Immutable {
    pub fn set(path: &Path) -> Result<Immutable, String> {
        tool("chattr", &["+i", s(path)])?;
        // Check that it really is immutable (some file systems ignore the flag).
        let writable = OpenOptions::new().write(true).open(path).is_ok();
        let guard = Immutable { path: path.to_path_buf() };
        if writable {
            return Err(format!("chattr +i did not make {} immutable", path.display()));
        }
        Ok(guard)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = tool("chattr", &["-i", s(&self.path)]);
    }
}

/// Makes a file immutable, or handles the missing prerequisite.
pub fn immutable(path: &Path) -> Option<Immutable> {
    if !require_root() || !require_tool("chattr") {
        return None;
    }
    prerequisite(Immutable::set(path))
}

/// Appends to a file (used to build images piecewise).
pub fn append(path: &Path, data: &[u8]) {
    let mut f = OpenOptions::new().append(true).create(true).open(path).unwrap();
    f.write_all(data).unwrap();
}

// ---------------------------------------------------------------------------
// Large files
// ---------------------------------------------------------------------------

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn fill(f: &mut File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).expect("read") {
            0 => break,
            k => n += k,
        }
    }
    n
}

/// The offset of the first difference between two large files or devices, compared
/// piecewise; `None` if they are identical.
pub fn stream_difference(a: &Path, b: &Path) -> Option<usize> {
    let (mut fa, mut fb) = (File::open(a).expect("open"), File::open(b).expect("open"));
    let (mut ba, mut bb) = (vec![0u8; 4 * MIB], vec![0u8; 4 * MIB]);
    let mut at = 0usize;
    loop {
        let (na, nb) = (fill(&mut fa, &mut ba), fill(&mut fb, &mut bb));
        if let Some(i) = ba[..na].iter().zip(&bb[..nb]).position(|(x, y)| x != y) {
            return Some(at + i);
        }
        if na != nb {
            return Some(at + na.min(nb));
        }
        if na == 0 {
            return None;
        }
        at += na;
    }
}

/// True if two large files or devices are identical.
pub fn same_stream(a: &Path, b: &Path) -> bool {
    stream_difference(a, b).is_none()
}

/// Large data quickly: one random MiB repeated, each 4 KiB page numbered so that no two
/// pages are equal.
pub fn big_data(seed: u64, len: usize) -> Vec<u8> {
    let base = random_data(seed, MIB);
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        v.extend_from_slice(&base);
    }
    v.truncate(len);
    for (i, page) in v.chunks_mut(4096).enumerate() {
        let n = page.len().min(8);
        page[..n].copy_from_slice(&(i as u64).to_le_bytes()[..n]);
    }
    v
}

/// A large image quickly (see [`big_data`]).
pub fn big_image(path: &Path, seed: u64, len: usize) {
    write(path, &big_data(seed, len));
}

// ---------------------------------------------------------------------------
// Another process writing a receiver during a run
// ---------------------------------------------------------------------------

/// How another process writes 4 KiB into the receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Foreign {
    /// `dd oflag=direct`: an I/O of its own on the device (a buffered write into a page
    /// basyn itself dirtied merges with basyn's write).
    Direct,
    /// `pwrite` + `fsync` through the device's page cache (like `dd conv=fsync`).
    Buffered,
}

/// Writes 4 KiB of random data at `offset` of `dev`, as another process would.
pub fn foreign_write(dev: &Path, offset: u64, how: Foreign) {
    match how {
        Foreign::Direct => {
            let of = format!("of={}", s(dev));
            let seek = format!("seek={}", offset / 4096);
            tool(
                "dd",
                &["if=/dev/urandom", &of, "bs=4096", &seek, "count=1", "conv=notrunc", "oflag=direct", "status=none"],
            )
            .unwrap_or_else(|e| panic!("{e}"));
        }
        Foreign::Buffered => poke(dev, offset, &random_data(offset ^ 0x5eed, 4096)),
    }
}

/// Runs `args` (a SYNC of `len` bytes onto `dev`) and, once basyn has written half of
/// the data (basyn's writes — PULL: to the device; PUSH: the data into the endpoint's
/// pipe — go roughly in offset order, so the start of the device is behind it), writes
/// 4 KiB at offset 40 KiB of `dev`. `None` if basyn had no data left to write by then
/// (too late to interfere: the receiver's last stamp was already taken).
pub fn run_with_a_foreign_write(args: &[String], dev: &Path, len: u64, how: Foreign) -> Option<Run> {
    let mut running = start(args, &[]);
    wait_until(Duration::from_secs(60), &format!("basyn to write {} of {len} bytes, or to end", len / 2), || {
        !running.running() || running.written() >= len / 2
    });
    foreign_write(dev, 10 * 4096, how);
    let interfered = running.running() && running.written() < len;
    let run = running.finish();
    interfered.then_some(run)
}

// ---------------------------------------------------------------------------
// Directions and argument lists
// ---------------------------------------------------------------------------

/// The direction of an action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Local is the source.
    Push,
    /// Remote is the source.
    Pull,
}

impl Dir {
    /// The `--action` word.
    pub fn word(self) -> &'static str {
        match self {
            Dir::Push => "push",
            Dir::Pull => "pull",
        }
    }
}

/// `-l`/`-r` so that `source` is the source and `receiver` the receiver in `dir`.
pub fn ends(dir: Dir, source: &Path, receiver: &Path) -> Vec<String> {
    let (l, r) = match dir {
        Dir::Push => (source, receiver),
        Dir::Pull => (receiver, source),
    };
    vec!["-l".into(), s(l).into(), "-r".into(), s(r).into()]
}

/// The strings as owned arguments.
pub fn sv(list: &[&str]) -> Vec<String> {
    list.iter().map(|x| x.to_string()).collect()
}

/// Full argument list for an action.
pub fn action(dir: Dir, mode: &str, source: &Path, receiver: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = ends(dir, source, receiver);
    a.extend(["-a".into(), dir.word().into(), "-m".into(), mode.into()]);
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

// ---------------------------------------------------------------------------
// Bitmap files as the original writes them
// ---------------------------------------------------------------------------

/// The original's bitmap magic number.
pub const ORIGINAL_MAGIC: u64 = 239_840_023_593_485_091;

/// The original's id of a `--hash` name (sha1 0 ... md5 7); `None` for BLAKE3.
pub fn original_hash_id(hash: &str) -> Option<u8> {
    let names = ["sha1", "sha224", "sha256", "sha384", "sha512", "blake2b", "blake2s", "md5"];
    names.iter().position(|n| n.eq_ignore_ascii_case(hash)).map(|i| i as u8)
}

/// A bitmap FILE built byte by byte to the original's layout: a 25-byte little-endian
/// header (magic, device size, buffer size, hash id), then the digests.
pub fn original_bitmap(device_size: u64, buffer: u64, hash_id: u8, digests: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(25 + digests.len());
    v.extend_from_slice(&ORIGINAL_MAGIC.to_le_bytes());
    v.extend_from_slice(&device_size.to_le_bytes());
    v.extend_from_slice(&buffer.to_le_bytes());
    v.push(hash_id);
    v.extend_from_slice(digests);
    v
}

/// The coreutils program that computes `hash` (`sha256` → `sha256sum`, `blake2b` →
/// `b2sum`); `None` for the hashes coreutils lacks (BLAKE2s, BLAKE3).
pub fn digest_tool(hash: &str) -> Option<&'static str> {
    match hash.to_ascii_lowercase().as_str() {
        "sha1" => Some("sha1sum"),
        "sha224" => Some("sha224sum"),
        "sha256" => Some("sha256sum"),
        "sha384" => Some("sha384sum"),
        "sha512" => Some("sha512sum"),
        "blake2b" => Some("b2sum"),
        "md5" => Some("md5sum"),
        _ => None,
    }
}

/// The plain digest of each `block`-byte block of `path` (the last may be shorter), as
/// the original's bitmap holds them: computed by the coreutils program for `hash`, over
/// files holding the blocks, independently of basyn. Hashes coreutils lacks (BLAKE2s,
/// BLAKE3) are computed with basyn's own hash module, whose known answers are unit tested.
pub fn block_digests(hash: &str, path: &Path, block: usize) -> Vec<u8> {
    let data = read(path);
    let Some(program) = digest_tool(hash) else {
        let algo = basyn::hash::HashAlgo::from_name(hash).unwrap_or_else(|| panic!("unknown hash {hash}"));
        return data.chunks(block).flat_map(|b| algo.digest(b).as_bytes().to_vec()).collect();
    };
    assert!(require_tool(program), "{program} is needed to check bitmap digests");
    let dir = tmp();
    let names: Vec<String> = data
        .chunks(block)
        .enumerate()
        .map(|(i, b)| {
            let p = dir.path().join(format!("{i:08}"));
            write(&p, b);
            s(&p).to_string()
        })
        .collect();
    let mut out = Vec::new();
    for group in names.chunks(256) {
        let args: Vec<&str> = group.iter().map(|n| n.as_str()).collect();
        let text = tool(program, &args).unwrap_or_else(|e| panic!("{e}"));
        for line in text.lines() {
            let hex = line.split_whitespace().next().unwrap_or_default();
            out.extend((0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex digest")));
        }
    }
    out
}

/// The FILE basyn must leave for `source` with `--buffer` `buffer` bytes and `--hash`
/// `hash`: the original's layout for a hash the original knows, else basyn's own (magic
/// `BASYNBMP`, BLAKE3 id 8, the same layout), each block's digest computed independently.
pub fn expected_bitmap(source: &Path, buffer: u64, hash: &str) -> Vec<u8> {
    let digests = block_digests(hash, source, buffer as usize);
    match original_hash_id(hash) {
        Some(id) => original_bitmap(size_of(source), buffer, id, &digests),
        None => {
            let mut v = b"BASYNBMP".to_vec();
            v.extend_from_slice(&size_of(source).to_le_bytes());
            v.extend_from_slice(&buffer.to_le_bytes());
            v.push(8);
            v.extend_from_slice(&digests);
            v
        }
    }
}

/// Asserts that FILE `bm` holds exactly what [`expected_bitmap`] says for `source`.
#[track_caller]
pub fn assert_bitmap_of(bm: &Path, source: &Path, buffer: u64, hash: &str) {
    let got = fs::read(bm).unwrap_or_else(|e| panic!("no bitmap {}: {e}", bm.display()));
    let want = expected_bitmap(source, buffer, hash);
    if got != want {
        let at = first_difference(&got, &want).unwrap_or(0);
        panic!(
            "bitmap {} ({} bytes) is not the {hash} bitmap of {} ({} bytes): first difference at byte {at}",
            bm.display(),
            got.len(),
            source.display(),
            want.len()
        );
    }
}
