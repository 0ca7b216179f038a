//! Helpers shared by the integration tests: running the real `basyn` binary, making
//! images, comparing devices byte for byte, parsing `--stat`, and guards for loop
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
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long one run of the binary may take before it is killed and the test fails.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

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
// Running basyn
// ---------------------------------------------------------------------------

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

/// Runs `basyn ARGS` with stdin closed, stdout and stderr captured (so stderr is not a
/// terminal), and a timeout.
pub fn basyn<S: AsRef<OsStr>>(args: &[S]) -> Run {
    let shown: Vec<String> = args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect();
    let mut child = Command::new(env!("CARGO_BIN_EXE_basyn"))
        .args(args)
        .env_remove("CI") // the binary must not depend on it
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start the basyn binary");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + RUN_TIMEOUT;
    let status = loop {
        match child.try_wait().expect("cannot wait for basyn") {
            Some(st) => break st,
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("basyn {} did not finish within {RUN_TIMEOUT:?}", shown.join(" "));
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let stdout = String::from_utf8_lossy(&out_t.join().unwrap()).into_owned();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap()).into_owned();
    Run { args: shown, code: status.code().unwrap_or(-1), stdout, stderr }
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
    /// The text after "Real", e.g. "75.91 MiB/s".
    pub real: String,
    /// The text after "Effective".
    pub effective: String,
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
    /// Parses the lines "Device size: N bytes", "Traffic: Rx N bytes, Tx N bytes, Both N
    /// bytes", "Ratio: X %", "Time: X s", "Bandwidth: Real ..., Effective ...".
    pub fn parse(text: &str) -> Result<Stat, String> {
        let size = line_with(text, "Device size:")?;
        let traffic = line_with(text, "Traffic:")?;
        let ratio = line_with(text, "Ratio:")?;
        let time = line_with(text, "Time:")?;
        let bw = line_with(text, "Bandwidth:")?;
        for (line, unit) in [(size, " bytes"), (time, " s")] {
            if !line.contains(unit) {
                return Err(format!("{line:?} lacks {unit:?}"));
            }
        }
        if !ratio.trim_end().ends_with('%') {
            return Err(format!("{ratio:?} does not end with %"));
        }
        let real_at = bw.find("Real ").ok_or_else(|| format!("no 'Real' in {bw:?}"))?;
        let eff_at = bw.find("Effective ").ok_or_else(|| format!("no 'Effective' in {bw:?}"))?;
        let real = bw[real_at + 5..].split(',').next().unwrap_or("").trim().to_string();
        let effective = bw[eff_at + 10..].trim().to_string();
        if !real.ends_with("/s") || !effective.ends_with("/s") {
            return Err(format!("bandwidth figures are not rates in {bw:?}"));
        }
        Ok(Stat {
            device_size: int_after(size, "Device size:")?,
            rx: int_after(traffic, "Rx")?,
            tx: int_after(traffic, "Tx")?,
            both: int_after(traffic, "Both")?,
            ratio: float_after(ratio, "Ratio:")?,
            time: float_after(time, "Time:")?,
            real,
            effective,
        })
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
        tool("mkfs.ext4", &["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", s(dev)])?;
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
    if !require_tool("mkfs.ext4") || !require_tool("mount") || !require_tool("umount") {
        return None;
    }
    prerequisite(Mount::ext4(dev, dir))
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
// A basyn running in the background, and large-file helpers
// ---------------------------------------------------------------------------

/// A basyn process in the background, its output collected by threads.
pub struct Running {
    child: std::process::Child,
    out: Option<std::thread::JoinHandle<Vec<u8>>>,
    err: Option<std::thread::JoinHandle<Vec<u8>>>,
    args: Vec<String>,
}

/// Starts basyn with `args` and extra environment variables (without `CI` or a boot id
/// override unless given).
pub fn start(args: &[String], env: &[(&str, &str)]) -> Running {
    let mut child = Command::new(env!("CARGO_BIN_EXE_basyn"))
        .args(args)
        .env_remove("CI")
        .env_remove("BASYN_TEST_BOOT_ID")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start the basyn binary");
    let collect = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = collect(Box::new(child.stdout.take().expect("stdout is piped")));
    let err = collect(Box::new(child.stderr.take().expect("stderr is piped")));
    Running { child, out: Some(out), err: Some(err), args: args.to_vec() }
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
        let text = fs::read_to_string(format!("/proc/{}/io", self.child.id())).unwrap_or_default();
        text.lines().find_map(|l| l.strip_prefix("wchar:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    }

    /// Waits (at most two minutes) and returns the run.
    pub fn finish(mut self) -> Run {
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            match self.child.try_wait().expect("cannot wait for basyn") {
                Some(st) => break st,
                None if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!("basyn {} did not finish within two minutes", self.args.join(" "));
                }
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        let take = |h: Option<std::thread::JoinHandle<Vec<u8>>>| {
            String::from_utf8_lossy(&h.expect("collected once").join().expect("collector")).into_owned()
        };
        let (stdout, stderr) = (take(self.out.take()), take(self.err.take()));
        Run { args: self.args.clone(), code: status.code().unwrap_or(-1), stdout, stderr }
    }
}

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

/// The numbers on the `--stat` line starting with `prefix`.
#[track_caller]
pub fn numbers(run: &Run, prefix: &str) -> Vec<u64> {
    let line =
        run.stdout.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix:?} line{run:?}"));
    line.split(|c: char| !c.is_ascii_digit()).filter(|x| !x.is_empty()).map(|x| x.parse().expect("digits")).collect()
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

/// Full argument list for an action.
pub fn action(dir: Dir, mode: &str, source: &Path, receiver: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = ends(dir, source, receiver);
    a.extend(["-a".into(), dir.word().into(), "-m".into(), mode.into()]);
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}
