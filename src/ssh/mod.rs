//! The SSH transport: reaches `basyn serve` on another host through the system `ssh`
//! (the `openssh` crate, one multiplexed master connection, BatchMode), uploading the
//! running executable when the remote host has no compatible basyn.
//!
//! This is the only module that uses tokio: a current-thread runtime lives on one
//! background thread per connection. The engine sees plain pipes: the remote command's
//! stdin/stdout are our own pipe descriptors.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use openssh::{Session, Stdio};
use tokio::sync::oneshot;

use crate::link::{Link, LinkError, Process};

mod master;
use crate::protocol::VERSION;

/// Environment variable naming an ssh config file to use instead of `~/.ssh/config`
/// (`ssh -F`); the test suite points it at its own sshd.
pub const CONFIG_ENV: &str = "BASYN_SSH_CONFIG";

/// What `basyn protocol` prints; the remote binary must print exactly this.
pub fn protocol_line() -> String {
    format!("basyn-protocol {VERSION}")
}

/// Where and how to reach the remote host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Host name or ssh config alias.
    pub host: String,
    /// `-p`, passed only when given.
    pub port: Option<u16>,
    /// `-u`, passed only when given.
    pub user: Option<String>,
    /// `--remote-path`: the remote basyn to run, instead of looking it up.
    pub remote_path: Option<String>,
}

/// Where uploads go on the remote host (expanded by its shell).
const CACHE_DIR: &str = r#"${XDG_CACHE_HOME:-$HOME/.cache}/basyn"#;

/// A failure to set the connection up, prefixed with the host so the user knows which side.
fn refused(target: &Target, what: impl std::fmt::Display) -> LinkError {
    LinkError::Refused(format!("remote host {}: {what}", target.host))
}

/// The refusal for an uploaded basyn that the host will not run (noexec cache, wrong libc...).
fn cannot_run(target: &Target, path: &str, why: &str) -> LinkError {
    refused(
        target,
        format!(
            "the uploaded basyn at {path} cannot run there ({why}); install basyn on the host or point --remote-path at one"
        ),
    )
}

// ---------------------------------------------------------------------------
// connect: the caller's side of the SSH thread
// ---------------------------------------------------------------------------

/// Connects, finds or uploads a compatible basyn, and starts `basyn serve DEVICE` there.
/// In the usual cases (basyn on the remote PATH, or already uploaded) finding and
/// starting it are one remote command. `log` receives `--verbose` lines.
pub fn connect(target: &Target, device: &Path, log: &dyn Fn(String)) -> Result<Link, LinkError> {
    let rt = runtime(target)?;
    let (events, event_rx) = mpsc::channel();
    let (kill, kill_rx) = oneshot::channel();
    let (status_tx, status) = mpsc::channel();
    let keeper = Keeper {
        target: target.clone(),
        device: device.as_os_str().to_os_string(),
        events,
        kill: kill_rx,
        status: status_tx,
    };
    let keeper = keeper.spawn(rt).map_err(|e| refused(target, format!("cannot start a thread: {e}")))?;
    let ends = match wait_until_ready(&event_rx, target, log) {
        Ok(ends) => ends,
        Err(e) => {
            // The thread closes the master session before it ends; wait for that.
            let _ = keeper.join();
            return Err(e);
        }
    };
    let process = SshProcess { kill: Some(kill), status, keeper: Some(keeper), ended: None, relay: None };
    Ok(into_link(ends, process, target, device))
}

/// The current-thread runtime the SSH thread drives the `openssh` futures on.
fn runtime(target: &Target) -> Result<tokio::runtime::Runtime, LinkError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| refused(target, format!("cannot start the SSH runtime: {e}")))
}

/// This executable as a possible upload: the remote cache knows it by version and digest.
struct Executable {
    /// Where it is here.
    path: PathBuf,
    /// Its digests, as the remote host's tools print them.
    sums: Sums,
    /// Its file name in the remote cache.
    name: String,
}

/// A file's digests in lowercase hex, as `sha256sum` and `b2sum` print them.
#[derive(Clone, Debug)]
struct Sums {
    /// SHA-256: the cache entry's name and the check of an upload.
    sha256: String,
    /// BLAKE2b-512: the check of a cached entry before each run where the host has `b2sum`
    /// (coreutils), which hashes about 2.5 times as fast as `sha256sum` there.
    blake2b: String,
}

impl Executable {
    /// The running executable, read once to compute its digests.
    fn running(target: &Target) -> Result<Executable, LinkError> {
        let path = std::env::current_exe().map_err(|e| refused(target, format!("cannot find this executable: {e}")))?;
        let sums = file_sums(&path).map_err(|e| refused(target, format!("cannot read {}: {e}", path.display())))?;
        let name = cache_name(&sums.sha256);
        Ok(Executable { path, sums, name })
    }
}

/// The file name this build takes in a remote host's upload cache, if this executable
/// can be read (`basyn state prune` keeps only that one).
pub fn this_build_upload_name() -> Option<String> {
    let path = std::env::current_exe().ok()?;
    file_sums(&path).ok().map(|sums| cache_name(&sums.sha256))
}

/// The upload's file name: the version for people, a digest prefix so that two builds of
/// one version do not take each other's place.
fn cache_name(digest: &str) -> String {
    format!("basyn-{}-{}", env!("CARGO_PKG_VERSION"), digest.get(..16).unwrap_or(digest))
}

/// The digests of a file, read once in small pieces.
fn file_sums(path: &Path) -> io::Result<Sums> {
    let (sha256, blake2b) = crate::hash::file_digests(&mut File::open(path)?)?;
    Ok(Sums { sha256: sha256.to_string(), blake2b: blake2b.to_string() })
}

/// Progress from the SSH thread to the caller while the connection is set up.
enum Event {
    /// A `--verbose` line.
    Log(String),
    /// The remote basyn runs (our ends of its pipes), or why it does not.
    Ready(Result<Ends, LinkError>),
}

/// Passes the SSH thread's `--verbose` lines to `log` until the remote basyn runs or the
/// thread gives up.
fn wait_until_ready(events: &mpsc::Receiver<Event>, target: &Target, log: &dyn Fn(String)) -> Result<Ends, LinkError> {
    loop {
        match events.recv() {
            Ok(Event::Log(line)) => log(line),
            Ok(Event::Ready(ready)) => return ready,
            Err(_) => return Err(refused(target, "the SSH thread stopped unexpectedly")),
        }
    }
}

/// The engine's view of the remote basyn: our ends of its pipes, the SSH thread as its
/// process, and its stderr relayed to ours.
fn into_link(ends: Ends, mut process: SshProcess, target: &Target, device: &Path) -> Link {
    process.relay = relay_stderr(ends.stderr, target.host.clone());
    Link {
        reader: Box::new(ends.reader),
        writer: Box::new(ends.writer),
        process: Box::new(process),
        label: format!("remote {}:{}", target.host, device.display()),
    }
}

/// Copies the remote command's stderr to ours, each line prefixed with the host.
/// The thread ends at the stream's end, and is waited for once the remote command has
/// ended, so that its last words come before basyn's own.
fn relay_stderr(stderr: BufReader<io::PipeReader>, host: String) -> Option<JoinHandle<()>> {
    let spawned = std::thread::Builder::new().name("basyn-ssh-stderr".into()).spawn(move || {
        for line in stderr.lines() {
            let Ok(line) = line else { break };
            let mut err = io::stderr().lock();
            let _ = writeln!(err, "{host}: {line}");
        }
    });
    spawned.ok()
}

/// The remote `basyn serve`, as seen through the SSH thread.
struct SshProcess {
    /// Tells the SSH thread to stop the remote command; taken by the first `kill`.
    kill: Option<oneshot::Sender<()>>,
    /// How the remote command ended, sent once by the SSH thread.
    status: mpsc::Receiver<Option<String>>,
    /// The SSH thread, joined once the status has arrived.
    keeper: Option<JoinHandle<()>>,
    /// The status once received, so that waiting again gives the same answer.
    ended: Option<Option<String>>,
    /// The thread relaying the remote stderr.
    relay: Option<JoinHandle<()>>,
}

impl SshProcess {
    /// Once the command has ended: its stderr relayed to the end (for at most a second,
    /// should something else hold the stream open).
    fn drain_relay(&mut self) {
        if let Some(t) = self.relay.take() {
            let deadline = std::time::Instant::now() + Duration::from_secs(1);
            while !t.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

impl Process for SshProcess {
    fn kill(&mut self) {
        if let Some(k) = self.kill.take() {
            let _ = k.send(());
        }
    }

    fn wait(&mut self) -> Option<String> {
        if self.ended.is_none() {
            self.ended = Some(self.status.recv().unwrap_or_else(|_| Some("vanished".to_string())));
            if let Some(t) = self.keeper.take() {
                let _ = t.join();
            }
            self.drain_relay();
        }
        self.ended.clone().flatten()
    }

    fn wait_for(&mut self, limit: Duration) -> Option<Option<String>> {
        if self.ended.is_none() {
            match self.status.recv_timeout(limit) {
                Ok(s) => self.ended = Some(s),
                Err(mpsc::RecvTimeoutError::Timeout) => return None,
                Err(mpsc::RecvTimeoutError::Disconnected) => self.ended = Some(Some("vanished".to_string())),
            }
            if let Some(t) = self.keeper.take() {
                let _ = t.join();
            }
            self.drain_relay();
        }
        self.ended.clone()
    }
}

// ---------------------------------------------------------------------------
// The SSH thread
// ---------------------------------------------------------------------------

/// The SSH thread's work, with everything it needs moved onto it.
struct Keeper {
    /// The host to reach.
    target: Target,
    /// The remote device for `basyn serve`.
    device: OsString,
    /// Progress to the caller, until `Event::Ready`.
    events: mpsc::Sender<Event>,
    /// Fires (or is dropped) when the engine is done with the remote command.
    kill: oneshot::Receiver<()>,
    /// How the remote command ended, for `SshProcess`.
    status: mpsc::Sender<Option<String>>,
}

impl Keeper {
    /// Starts the thread; it owns the runtime and the master session for the whole run.
    fn spawn(self, rt: tokio::runtime::Runtime) -> io::Result<JoinHandle<()>> {
        std::thread::Builder::new().name("basyn-ssh".into()).spawn(move || rt.block_on(self.run()))
    }

    /// Opens the master session and starts the remote basyn, then waits for it to end or
    /// be stopped; the session closes either way, which removes its control socket.
    async fn run(self) {
        let Keeper { target, device, events, kill, status } = self;
        let fail = |e: LinkError| {
            let _ = events.send(Event::Ready(Err(e)));
        };
        // This executable is read and hashed while ssh connects: the starting script
        // needs its digests, the connection does not.
        let t = target.clone();
        let exe = tokio::task::spawn_blocking(move || Executable::running(&t));
        let session = match master::open(&target).await {
            Ok(master) => {
                if let Some(order) = master.ciphers {
                    let note = "this CPU has AES instructions and the ssh config leaves Ciphers at OpenSSH's default";
                    let _ = events.send(Event::Log(format!("ssh cipher order: {order} ({note})")));
                }
                master.session
            }
            Err(e) => return fail(e),
        };
        let exe = match exe.await {
            Ok(Ok(exe)) => exe,
            Ok(Err(e)) => {
                let _ = session.close().await;
                return fail(e);
            }
            Err(e) => {
                let _ = session.close().await;
                return fail(refused(&target, format!("cannot hash this executable: {e}")));
            }
        };
        let _ = events.send(Event::Log(format!("connected to {} over ssh", target.host)));
        let log = |line: String| {
            let _ = events.send(Event::Log(line));
        };
        match start(&session, &target, &device, &exe, &log).await {
            Ok((child, ends)) => {
                let _ = events.send(Event::Ready(Ok(ends)));
                let _ = status.send(watch(child, kill).await);
            }
            Err(e) => fail(e),
        }
        let _ = session.close().await;
    }
}

/// Waits for the remote command to end, or for `kill`; says how it ended unless cleanly.
async fn watch(child: openssh::Child<&Session>, kill: oneshot::Receiver<()>) -> Option<String> {
    tokio::select! {
        st = child.wait() => match st {
            Ok(st) => exit_problem(st),
            Err(e) => Some(format!("failed: {}", ssh_error(&e))),
        },
        _ = kill => Some("was stopped by basyn".to_string()),
    }
}

/// What went wrong with a remote command that exited, or `None` if it succeeded; ssh's own
/// failures (a lost connection) exit with 255.
fn exit_problem(st: std::process::ExitStatus) -> Option<String> {
    if st.success() {
        return None;
    }
    Some(match st.code() {
        Some(255) => "lost its ssh connection (ssh exited with status 255)".to_string(),
        Some(c) => format!("exited with status {c}"),
        None => "was killed".to_string(),
    })
}

/// The ssh error with its cause: the crate's top-level text alone is vague, and ssh's
/// own output can be a whole banner, of which the last line says what happened.
fn ssh_error(e: &openssh::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let full = s.to_string();
        let last = full.lines().map(|l| l.trim()).rfind(|l| !l.is_empty()).unwrap_or_default();
        if !last.is_empty() {
            text = format!("{text}: {last}");
        }
        source = s.source();
    }
    text
}

// ---------------------------------------------------------------------------
// Starting `basyn serve` on the remote host
// ---------------------------------------------------------------------------

/// Our ends of the pipes to one remote command.
struct Ends {
    /// Its stdout: the endpoint's replies.
    reader: io::PipeReader,
    /// Its stdin: our requests.
    writer: io::PipeWriter,
    /// Its stderr: the starting script's marker, then the endpoint's messages.
    stderr: BufReader<io::PipeReader>,
}

/// The remote command's ends of the same pipes.
struct ChildEnds {
    /// Its stdin.
    stdin: std::os::fd::OwnedFd,
    /// Its stdout.
    stdout: std::os::fd::OwnedFd,
    /// Its stderr.
    stderr: std::os::fd::OwnedFd,
}

/// Three fresh pipes for a remote command; the two data pipes widened for 2 MiB blocks.
fn pipes() -> io::Result<(Ends, ChildEnds)> {
    let (their_in, writer) = io::pipe()?;
    let (reader, their_out) = io::pipe()?;
    let (stderr, their_err) = io::pipe()?;
    crate::link::widen_pipe(&their_in);
    crate::link::widen_pipe(&reader);
    let ends = Ends { reader, writer, stderr: BufReader::new(stderr) };
    Ok((ends, ChildEnds { stdin: their_in.into(), stdout: their_out.into(), stderr: their_err.into() }))
}

/// A remote command of the master session, with our ends of its pipes.
type Spawned<'s> = (openssh::Child<&'s Session>, Ends);

/// Spawns `program args...` on the remote host with fresh pipes.
async fn spawn_with_pipes<'s>(
    session: &'s Session,
    target: &Target,
    program: &str,
    args: &[OsString],
) -> Result<Spawned<'s>, LinkError> {
    let (ends, theirs) = pipes().map_err(|e| refused(target, format!("cannot make pipes: {e}")))?;
    let mut cmd = session.command(program);
    for a in args {
        cmd.raw_arg(a);
    }
    cmd.stdin(Stdio::from(theirs.stdin)).stdout(Stdio::from(theirs.stdout)).stderr(Stdio::from(theirs.stderr));
    let child = cmd.spawn().await;
    // Our copies of the child's ends must close, or EOF would never arrive.
    drop(cmd);
    let child = child.map_err(|e| refused(target, format!("cannot start {program} there: {}", ssh_error(&e))))?;
    Ok((child, ends))
}

/// Starts `basyn serve DEVICE` on the remote host: the starting script first; if it finds
/// no usable basyn, an upload of this executable and a second command.
async fn start<'s>(
    session: &'s Session,
    t: &Target,
    device: &OsStr,
    exe: &Executable,
    log: &dyn Fn(String),
) -> Result<Spawned<'s>, LinkError> {
    let script = start_script(t, device, &exe.name, &exe.sums);
    let args = [OsString::from("-c"), shell_quote_os(OsStr::new(&script))];
    let (child, mut ends) = spawn_with_pipes(session, t, "sh", &args).await?;
    match read_marker(&mut ends.stderr, &t.host) {
        Marker::Started(how) => {
            if let Some(line) = started_note(&how) {
                log(line);
            }
            Ok((child, ends))
        }
        Marker::Upload { onpath, arch } => {
            let _ = child.wait().await;
            upload_and_serve(session, t, device, exe, &onpath, &arch, log).await
        }
        Marker::BadPath(why) => {
            let _ = child.wait().await;
            Err(bad_path(t, why))
        }
        Marker::Broken { path, why } => {
            let _ = child.wait().await;
            Err(cannot_run(t, &path, if why.is_empty() { "it does not start" } else { &why }))
        }
        Marker::Silent(said) => {
            let _ = child.wait().await;
            // A login shell that refuses (nologin) says why on stdout.
            let mut out = Vec::new();
            let _ = (&mut ends.reader).take(4096).read_to_end(&mut out);
            Err(refused(t, format!("cannot run commands there: {}", silent_why(&out, said))))
        }
    }
}

/// The script that finds a usable basyn and execs `basyn serve DEVICE` in the same remote
/// command, saying on stderr what it did (or, exiting 97, why it could not).
fn start_script(target: &Target, device: &OsStr, name: &str, sums: &Sums) -> String {
    let want = quote(&protocol_line());
    let dev = shell_quote_os(device).to_string_lossy().into_owned();
    if let Some(path) = &target.remote_path {
        let p = quote(path);
        return format!(
            r#"out=$({p} protocol 2>/dev/null); if [ "$out" = {want} ]; then echo "basyn-start remote-path" >&2; exec {p} serve {dev}; fi
if [ -n "$out" ]; then why="it speaks $out"; else why=$({p} protocol 2>&1 | tail -n 1); fi
echo "basyn-badpath $why" >&2; exit 97"#
        );
    }
    format!(
        r#"v=$(basyn protocol 2>/dev/null); if [ "$v" = {want} ]; then echo "basyn-start path" >&2; exec basyn serve {dev}; fi
f="{CACHE_DIR}/{name}"; ok=
if [ -x "$f" ]; then
  if command -v b2sum >/dev/null 2>&1; then h=$(b2sum < "$f" 2>/dev/null); [ "${{h%% *}}" = {b2} ] && ok=1
  else h=$(sha256sum < "$f" 2>/dev/null); [ "${{h%% *}}" = {sha256} ] && ok=1; fi
fi
if [ -n "$ok" ]; then
  out=$("$f" protocol 2>/dev/null); if [ "$out" = {want} ]; then echo "basyn-start cached $f" >&2; exec "$f" serve {dev}; fi
  echo "basyn-broken $f $("$f" protocol 2>&1 | tail -n 1)" >&2; exit 97
fi
echo "basyn-upload $(uname -m) ${{v:-none}}" >&2; exit 97"#,
        b2 = sums.blake2b,
        sha256 = sums.sha256,
    )
}

/// Quotes an OS path for the remote shell (the remote command line goes through it).
fn shell_quote_os(s: &OsStr) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut out = vec![b'\''];
    for &b in s.as_bytes() {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
    OsString::from_vec(out)
}

/// Quotes a string for the remote shell: one word, nothing expanded.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// What the starting script said on stderr before it exec'd basyn, or instead.
#[derive(Debug, PartialEq, Eq)]
enum Marker {
    /// `basyn serve` runs: from the remote PATH, the cache, or `--remote-path`.
    Started(String),
    /// No usable basyn: what the PATH had, and the machine type, for an upload.
    Upload { onpath: String, arch: String },
    /// The cached upload exists but does not run there.
    Broken { path: String, why: String },
    /// `--remote-path` does not name a usable basyn.
    BadPath(String),
    /// The command ended without saying anything: its stderr.
    Silent(String),
}

/// Reads the remote stderr up to the starting script's marker line. Lines before it (a
/// chatty shell profile) reach the user's stderr if basyn starts; otherwise the last of
/// them explains the failure.
fn read_marker(stderr: &mut BufReader<io::PipeReader>, host: &str) -> Marker {
    let mut seen: Vec<String> = Vec::new();
    loop {
        // Bytes, not text: a shell profile printing Latin-1 must not end the search
        // before the marker (and leave the remote command waiting on our open stdin).
        let mut bytes = Vec::new();
        match stderr.read_until(b'\n', &mut bytes) {
            Ok(0) | Err(_) => return Marker::Silent(seen.last().cloned().unwrap_or_default()),
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&bytes);
        let line = line.trim_end();
        let Some(rest) = line.strip_prefix("basyn-") else {
            seen.push(line.to_string());
            continue;
        };
        if rest.starts_with("start") {
            for l in &seen {
                eprintln!("{host}: {l}");
            }
        }
        return marker_in(rest, line);
    }
}

/// The marker in a `basyn-` line of the starting script (`rest` is the line without that
/// prefix); an unknown word is not a marker, so the line itself explains the failure.
fn marker_in(rest: &str, line: &str) -> Marker {
    let (word, arg) = rest.split_once(' ').unwrap_or((rest, ""));
    match word {
        "start" => Marker::Started(arg.to_string()),
        "upload" => {
            let (arch, onpath) = arg.split_once(' ').unwrap_or((arg, "none"));
            Marker::Upload { onpath: onpath.to_string(), arch: arch.to_string() }
        }
        "broken" => {
            let (path, why) = arg.split_once(' ').unwrap_or((arg, ""));
            Marker::Broken { path: path.to_string(), why: why.to_string() }
        }
        "badpath" => Marker::BadPath(arg.to_string()),
        _ => Marker::Silent(line.to_string()),
    }
}

/// The `--verbose` line for where the starting script found basyn, if it is worth one.
fn started_note(how: &str) -> Option<String> {
    match how.split_once(' ') {
        Some(("cached", path)) => Some(format!("reusing the uploaded basyn at {path}")),
        _ if how == "path" => Some("using basyn from the remote PATH".to_string()),
        _ => None,
    }
}

/// The refusal for a `--remote-path` that does not run or speaks another protocol.
fn bad_path(t: &Target, why: String) -> LinkError {
    let path = t.remote_path.as_deref().unwrap_or_default();
    let why = if why.is_empty() { "it does not run".to_string() } else { why };
    refused(
        t,
        format!(
            "--remote-path {path} cannot be used: {why}; point --remote-path at a basyn {}",
            env!("CARGO_PKG_VERSION")
        ),
    )
}

/// Why a remote command ended without a marker: the last line it printed on stdout (where
/// `nologin` explains itself), else the last line of its stderr.
fn silent_why(stdout: &[u8], said: String) -> String {
    let out = String::from_utf8_lossy(stdout);
    match out.lines().map(str::trim).rfind(|l| !l.is_empty()) {
        Some(l) => l.to_string(),
        None if said.is_empty() => "it ended without a word".to_string(),
        None => said,
    }
}

// ---------------------------------------------------------------------------
// The upload
// ---------------------------------------------------------------------------

/// No usable basyn on the host: uploads this executable if it suits the host's machine
/// type, checks that it runs there, and starts `basyn serve DEVICE` with it.
async fn upload_and_serve<'s>(
    session: &'s Session,
    t: &Target,
    device: &OsStr,
    exe: &Executable,
    onpath: &str,
    arch: &str,
    log: &dyn Fn(String),
) -> Result<Spawned<'s>, LinkError> {
    log(format!("no usable basyn on the remote PATH ({})", onpath_why(onpath)));
    let ours = local_machine();
    if arch != ours {
        return Err(refused(
            t,
            format!(
                "basyn is not installed there and this executable is for {ours}, the host is {arch}: install basyn on it or use --remote-path"
            ),
        ));
    }
    let path = upload(session, t, exe).await?;
    log(format!("uploaded basyn to {path}"));
    probe(session, &path).await.map_err(|why| cannot_run(t, &path, &why))?;
    let args = [OsString::from("serve"), shell_quote_os(device)];
    spawn_with_pipes(session, t, &path, &args).await
}

/// Why the basyn on the remote PATH will not do, from what the starting script found there.
fn onpath_why(onpath: &str) -> String {
    if onpath == "none" { "not found".to_string() } else { format!("it speaks {onpath:?}") }
}

/// This machine's type as `uname -m` prints it, to compare with the remote host's.
fn local_machine() -> String {
    // SAFETY: uname fills the struct it is given; a zeroed utsname is a valid argument.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return std::env::consts::ARCH.to_string();
    }
    // SAFETY: uname NUL-terminates the machine field.
    unsafe { std::ffi::CStr::from_ptr(u.machine.as_ptr()) }.to_string_lossy().into_owned()
}

/// Copies `exe` into the remote cache under its name, verifying its SHA-256 there before
/// it takes its final name; returns the remote path.
async fn upload(session: &Session, target: &Target, exe: &Executable) -> Result<String, LinkError> {
    let fail = |what: String| refused(target, what);
    let script = upload_script(&exe.sums.sha256, &exe.name);
    let file = File::open(&exe.path).map_err(|e| fail(format!("cannot read {}: {e}", exe.path.display())))?;
    let (code, out, err) =
        remote_sh(session, &script, Some(file)).await.map_err(|e| fail(format!("upload failed: {e}")))?;
    if code != 0 || out.is_empty() {
        return Err(fail(format!("uploading basyn failed: {}", err.lines().last().unwrap_or("no output"))));
    }
    Ok(out)
}

/// The remote script that stores its stdin as the cache entry `name`: under a temporary
/// name until its digest is checked, so that concurrent or cut uploads never leave a
/// partial file where the starting script would run it.
fn upload_script(digest: &str, name: &str) -> String {
    format!(
        r#"set -e; umask 077; d="{CACHE_DIR}"; mkdir -p "$d"; t="$d/.upload.$$"; trap 'rm -f "$t"' EXIT; cat > "$t"; h=$(sha256sum < "$t" | cut -d' ' -f1); [ "$h" = {digest} ] || {{ echo "uploaded file has sha256 $h, expected {digest}" >&2; exit 3; }}; chmod 700 "$t"; mv -f "$t" "$d/{name}"; trap - EXIT; echo "$d/{name}""#
    )
}

/// Checks that `path` on the remote runs and speaks our protocol version.
async fn probe(session: &Session, path: &str) -> Result<(), String> {
    let (code, out, err) = remote_sh(session, &format!("exec {} protocol", quote(path)), None).await?;
    probe_verdict(code, &out, &err)
}

/// Judges `PATH protocol` from its exit code and trimmed output: `Err` says why it will not do.
fn probe_verdict(code: i32, out: &str, err: &str) -> Result<(), String> {
    if out == protocol_line() {
        return Ok(());
    }
    if code == 0 || out.starts_with("basyn-protocol") {
        return Err(format!("it speaks another protocol version ({out:?}, this basyn needs {:?})", protocol_line()));
    }
    let why = err.lines().last().unwrap_or("").to_string();
    Err(if why.is_empty() { format!("it exited with status {code}") } else { why })
}

/// Runs a shell command on the remote host and returns (exit code, stdout, stderr).
async fn remote_sh(session: &Session, script: &str, stdin: Option<File>) -> Result<(i32, String, String), String> {
    let mut cmd = session.command("sh");
    cmd.arg("-c").arg(script);
    cmd.stdin(match stdin {
        Some(f) => Stdio::from(f),
        None => Stdio::null(),
    });
    let out = cmd.output().await.map_err(|e| ssh_error(&e))?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::fs;
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::ExitStatusExt;
    use std::process::Command;

    /// Strings that careless quoting would split, expand, glob or cut short.
    const ODD: &[&str] = &[
        "/dev/disk/by-id/usb stick  two spaces",
        "/tmp/it's",
        "'",
        "''",
        "/tmp/new\nline",
        "/tmp/$(touch pwned)`touch pwned`$HOME${IFS}",
        "/tmp/*?[a]",
        "-n",
        "/tmp/\"double\" \\back\\slash\\",
        "/tmp/tab\there",
        "",
        "~root",
        "a;b&c|d>e<f",
        "/tmp/ünïcödé",
    ];

    /// A target with only a host name.
    pub(super) fn host(name: &str) -> Target {
        Target { host: name.to_string(), port: None, user: None, remote_path: None }
    }

    /// The message of a setup refusal, after checking that it is one.
    fn message(e: LinkError) -> String {
        match e {
            LinkError::Refused(message) => message,
            other => panic!("not a precondition abort: {other:?}"),
        }
    }

    /// What `/bin/sh -c COMMAND` prints on stdout, run in `cwd`, after checking that it succeeded.
    fn sh(command: &OsStr, cwd: &Path) -> Vec<u8> {
        let out = Command::new("/bin/sh").arg("-c").arg(command).current_dir(cwd).output().expect("run /bin/sh");
        assert!(out.status.success(), "sh -c {command:?}: {out:?}");
        out.stdout
    }

    /// Whether `program` runs here; without it a test is skipped, except in CI where it must be there.
    pub(super) fn have(program: &str) -> bool {
        let there = Command::new(program).arg("-V").output().is_ok();
        assert!(there || std::env::var_os("CI").is_none(), "{program} is missing (CI is set, so this is a failure)");
        there
    }

    // --- quoting ---------------------------------------------------------------------

    /// The remote shell must hand each quoted string over byte for byte, as one word.
    #[test]
    fn quote_round_trips_through_sh() {
        let dir = tempfile::tempdir().expect("tempdir");
        for s in ODD {
            let printed = sh(OsStr::new(&format!("printf %s {}", quote(s))), dir.path());
            assert_eq!(String::from_utf8_lossy(&printed), *s, "quoted as {}", quote(s));
            let words = sh(OsStr::new(&format!("set -- {}; printf %s $#", quote(s))), dir.path());
            assert_eq!(words, b"1", "{s:?} must stay one word");
        }
        assert!(!dir.path().join("pwned").exists(), "a command substitution ran");
    }

    /// Device paths are bytes, not text: the quoting must keep bytes that are not UTF-8.
    #[test]
    fn shell_quote_os_round_trips_any_bytes_through_sh() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut inputs: Vec<OsString> = ODD.iter().map(OsString::from).collect();
        inputs.push(OsString::from_vec(b"/dev/\xff\xfe latin-1 \xe9t\xe9".to_vec()));
        inputs.push(OsString::from_vec(b"\x01\x7f'\x1b[31m".to_vec()));
        for s in &inputs {
            let mut command = OsString::from("printf %s ");
            command.push(shell_quote_os(s));
            assert_eq!(sh(&command, dir.path()), s.as_bytes(), "{s:?}");
        }
        assert!(!dir.path().join("pwned").exists(), "a command substitution ran");
    }

    /// The two quoting functions are the same rule, one for paths and one for text.
    #[test]
    fn quote_and_shell_quote_os_agree_on_text() {
        for s in ODD {
            assert_eq!(shell_quote_os(OsStr::new(s)), OsString::from(quote(s)), "{s:?}");
        }
        assert_eq!(quote("it's"), r"'it'\''s'");
    }

    // --- the starting script, as text ---------------------------------------------------

    /// The usual script compares with our protocol line and knows the cache entry's name and digest.
    #[test]
    fn start_script_checks_the_protocol_line_and_names_the_cache_entry() {
        let sums = Sums { sha256: "d1g3st".into(), blake2b: "b2d1g3st".into() };
        let s = start_script(&host("h"), OsStr::new("/dev/sdb"), "basyn-9.9.9-0123456789abcdef", &sums);
        assert!(s.contains(&format!(r#"if [ "$v" = '{}' ]"#, protocol_line())), "{s}");
        assert!(s.contains("exec basyn serve '/dev/sdb'"), "{s}");
        assert!(s.contains(&format!(r#"f="{CACHE_DIR}/basyn-9.9.9-0123456789abcdef""#)), "{s}");
        assert!(s.contains(r#"h=$(b2sum < "$f" 2>/dev/null); [ "${h%% *}" = b2d1g3st ]"#), "{s}");
        assert!(s.contains(r#"h=$(sha256sum < "$f" 2>/dev/null); [ "${h%% *}" = d1g3st ]"#), "{s}");
        assert!(s.contains(r#"exec "$f" serve '/dev/sdb'"#), "{s}");
        assert_eq!(s.matches("exit 97").count(), 2, "{s}");
    }

    /// With `--remote-path` the script runs that path only: no PATH lookup, no cache, no upload.
    #[test]
    fn start_script_with_remote_path_uses_only_that_path() {
        let t = Target { remote_path: Some("/opt/my basyn's/basyn".to_string()), ..host("h") };
        let s =
            start_script(&t, OsStr::new("/dev/sdb"), "name", &Sums { sha256: "digest".into(), blake2b: "b2".into() });
        let p = quote("/opt/my basyn's/basyn");
        assert!(s.contains(&format!("out=$({p} protocol 2>/dev/null)")), "{s}");
        assert!(s.contains(&format!(r#"if [ "$out" = '{}' ]"#, protocol_line())), "{s}");
        assert!(s.contains(&format!("exec {p} serve '/dev/sdb'")), "{s}");
        for absent in ["v=$(basyn protocol", CACHE_DIR, "basyn-upload", "name", "digest"] {
            assert!(!s.contains(absent), "{absent:?} in {s}");
        }
    }

    // --- the starting script, run by a real shell ------------------------------------------

    /// A scratch stand-in for the remote host: a home, a cache, a work dir, and a PATH with
    /// only the tools the starting script uses plus a `bin` where a test may put a basyn.
    struct FakeHost {
        /// Holds everything; removed at the end of the test.
        dir: tempfile::TempDir,
    }

    /// What the starting script did on the fake host.
    #[derive(Debug)]
    struct Ran {
        /// The marker it wrote on stderr, as `read_marker` reads it.
        marker: Marker,
        /// Its stdout: what the fake basyn's `serve` received (see [`served`]).
        stdout: Vec<u8>,
        /// Its exit code.
        code: Option<i32>,
    }

    /// What the fake basyn prints when `serve` gets the single argument `device`.
    fn served(device: &[u8]) -> Vec<u8> {
        [b"1 [".as_slice(), device, b"]"].concat()
    }

    impl FakeHost {
        /// An empty host: no basyn anywhere, and no `b2sum` (the cache is checked with `sha256sum`).
        fn new() -> FakeHost {
            FakeHost::with_tools(&["sh", "sha256sum", "cut", "uname", "tail"])
        }

        /// An empty host with `b2sum` too, as coreutils has it.
        fn with_b2sum() -> FakeHost {
            FakeHost::with_tools(&["sh", "sha256sum", "b2sum", "cut", "uname", "tail"])
        }

        fn with_tools(tools: &[&str]) -> FakeHost {
            let dir = tempfile::tempdir().expect("tempdir");
            for d in ["bin", "tools", "home", "work", "cache"] {
                fs::create_dir(dir.path().join(d)).expect("mkdir");
            }
            for &tool in tools {
                let real = ["/usr/bin", "/bin"]
                    .iter()
                    .map(|d| Path::new(d).join(tool))
                    .find(|p| p.exists())
                    .unwrap_or_else(|| panic!("{tool} is not installed"));
                std::os::unix::fs::symlink(real, dir.path().join("tools").join(tool)).expect("symlink");
            }
            FakeHost { dir }
        }

        /// A path inside the host.
        fn at(&self, rel: &str) -> PathBuf {
            self.dir.path().join(rel)
        }

        /// Installs a fake basyn at `path` whose `protocol` runs the shell code `protocol` and
        /// whose `serve` prints its argument count and arguments.
        fn install(&self, path: &Path, protocol: &str) {
            let text = format!(
                "#!/bin/sh\nif [ \"$1\" = protocol ]; then {protocol}; exit 0; fi\n\
                 if [ \"$1\" = serve ]; then shift; printf %s \"$#\"; printf ' [%s]' \"$@\"; exit 0; fi\nexit 64\n"
            );
            // Written by a child shell: a write descriptor of this process, inherited by a
            // child that another test forks meanwhile, would make exec fail (ETXTBSY).
            let mut child = Command::new("/bin/sh")
                .arg("-c")
                .arg(r#"mkdir -p "$(dirname "$1")" && cat > "$1" && chmod 755 "$1""#)
                .arg("sh")
                .arg(path)
                .stdin(std::process::Stdio::piped())
                .spawn()
                .expect("spawn sh");
            child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write script");
            assert!(child.wait().expect("wait").success(), "installing {}", path.display());
        }

        /// Runs the starting script as a login shell runs the remote command line
        /// `sh -c SCRIPT`, with `XDG_CACHE_HOME` set when `xdg` is.
        fn run(&self, target: &Target, device: &OsStr, name: &str, sums: &Sums, xdg: bool) -> Ran {
            let mut line = OsString::from("sh -c ");
            line.push(shell_quote_os(OsStr::new(&start_script(target, device, name, sums))));
            let (stderr, their_stderr) = io::pipe().expect("pipe");
            let mut cmd = Command::new("/bin/sh");
            cmd.arg("-c")
                .arg(&line)
                .env_clear()
                .env("PATH", format!("{}:{}", self.at("bin").display(), self.at("tools").display()))
                .env("HOME", self.at("home"))
                .current_dir(self.at("work"))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(their_stderr);
            if xdg {
                cmd.env("XDG_CACHE_HOME", self.at("cache"));
            }
            let child = cmd.spawn().expect("spawn sh");
            // Our copy of the stderr pipe's write end must close, or EOF never arrives.
            drop(cmd);
            let marker = read_marker(&mut BufReader::new(stderr), "testhost");
            let out = child.wait_with_output().expect("wait");
            assert!(!self.at("work/pwned").exists(), "a command substitution ran");
            Ran { marker, stdout: out.stdout, code: out.status.code() }
        }
    }

    /// Digests of no file in particular, for scripts that never reach the cache check.
    fn any_sums() -> Sums {
        Sums { sha256: "d".into(), blake2b: "d".into() }
    }

    /// A fake basyn's `protocol` that answers like this build.
    fn ours() -> String {
        format!("echo {}", quote(&protocol_line()))
    }

    /// A basyn on the remote PATH that speaks our protocol is exec'd with the device verbatim.
    #[test]
    fn start_script_execs_basyn_from_the_path_with_the_device_verbatim() {
        let h = FakeHost::new();
        h.install(&h.at("bin/basyn"), &ours());
        for dev in ODD {
            let ran = h.run(&host("h"), OsStr::new(dev), "basyn-x", &any_sums(), true);
            assert_eq!(ran.marker, Marker::Started("path".into()), "{dev:?}: {ran:?}");
            assert_eq!(ran.stdout, served(dev.as_bytes()), "{dev:?}: {ran:?}");
            assert_eq!(ran.code, Some(0));
        }
    }

    /// No basyn anywhere: the script asks for an upload and names this machine's type.
    #[test]
    fn start_script_without_any_basyn_asks_for_an_upload() {
        let h = FakeHost::new();
        let ran = h.run(&host("h"), OsStr::new("/dev/x"), "basyn-x", &any_sums(), true);
        assert_eq!(ran.marker, Marker::Upload { onpath: "none".into(), arch: local_machine() }, "{ran:?}");
        assert_eq!(ran.code, Some(97));
        assert!(ran.stdout.is_empty(), "{ran:?}");
    }

    /// A basyn on the PATH that speaks another protocol is reported, and an upload asked for.
    #[test]
    fn start_script_with_another_protocol_on_the_path_asks_for_an_upload() {
        let h = FakeHost::new();
        h.install(&h.at("bin/basyn"), "echo 'basyn-protocol 1'");
        let ran = h.run(&host("h"), OsStr::new("/dev/x"), "basyn-x", &any_sums(), true);
        assert_eq!(ran.marker, Marker::Upload { onpath: "basyn-protocol 1".into(), arch: local_machine() });
        assert_eq!(ran.code, Some(97));
    }

    /// A cached upload with the expected digest is reused, in `$XDG_CACHE_HOME` or `~/.cache`.
    #[test]
    fn start_script_reuses_a_cached_upload_whose_digest_matches() {
        for (xdg, b2sum) in [(true, false), (false, false), (true, true)] {
            let h = if b2sum { FakeHost::with_b2sum() } else { FakeHost::new() };
            let cached = if xdg { h.at("cache/basyn/basyn-x") } else { h.at("home/.cache/basyn/basyn-x") };
            h.install(&cached, &ours());
            let sums = file_sums(&cached).expect("digests");
            let dev = "/dev/disk/by-label/my disk";
            let ran = h.run(&host("h"), OsStr::new(dev), "basyn-x", &sums, xdg);
            let started = Marker::Started(format!("cached {}", cached.display()));
            assert_eq!(ran.marker, started, "xdg {xdg}, b2sum {b2sum}: {ran:?}");
            assert_eq!(ran.stdout, served(dev.as_bytes()), "{ran:?}");
        }
    }

    /// A cached file that is not the expected one (tampered, or not executable) is not run:
    /// with `b2sum` its BLAKE2b is what counts, without it its SHA-256.
    #[test]
    fn start_script_ignores_a_cached_file_that_is_not_the_expected_one() {
        for b2sum in [false, true] {
            let h = if b2sum { FakeHost::with_b2sum() } else { FakeHost::new() };
            let cached = h.at("cache/basyn/basyn-x");
            h.install(&cached, &ours());
            let sums = file_sums(&cached).expect("digests");
            let upload = Marker::Upload { onpath: "none".into(), arch: local_machine() };
            // Only the digest that this host checks is wrong.
            let wrong = if b2sum {
                Sums { blake2b: "0".repeat(128), ..sums.clone() }
            } else {
                Sums { sha256: "0".repeat(64), ..sums.clone() }
            };
            let ran = h.run(&host("h"), OsStr::new("/dev/x"), "basyn-x", &wrong, true);
            assert_eq!(ran.marker, upload, "b2sum {b2sum}: a wrong digest must not run: {ran:?}");
            fs::set_permissions(&cached, fs::Permissions::from_mode(0o644)).expect("chmod");
            let ran = h.run(&host("h"), OsStr::new("/dev/x"), "basyn-x", &sums, true);
            assert_eq!(ran.marker, upload, "b2sum {b2sum}: a file without x bit must not run: {ran:?}");
        }
    }

    /// A cached upload that does not start says so with its own last line of error.
    #[test]
    fn start_script_reports_a_cached_upload_that_does_not_run() {
        let h = FakeHost::new();
        let cached = h.at("cache/basyn/basyn-x");
        h.install(&cached, "echo 'first line' >&2; echo 'cannot execute: noexec mount' >&2; exit 126");
        let sums = file_sums(&cached).expect("digests");
        let ran = h.run(&host("h"), OsStr::new("/dev/x"), "basyn-x", &sums, true);
        let why = "cannot execute: noexec mount".to_string();
        assert_eq!(ran.marker, Marker::Broken { path: cached.display().to_string(), why }, "{ran:?}");
        assert_eq!(ran.code, Some(97));
    }

    /// `--remote-path` with an odd path: used when it speaks our protocol, the PATH never consulted.
    #[test]
    fn start_script_execs_a_usable_remote_path() {
        let h = FakeHost::new();
        h.install(&h.at("bin/basyn"), "exit 1");
        let path = h.at("opt/my basyn's dir/basyn");
        h.install(&path, &ours());
        let t = Target { remote_path: Some(path.display().to_string()), ..host("h") };
        let dev = "/tmp/it's a $(touch pwned) device";
        let ran = h.run(&t, OsStr::new(dev), "basyn-x", &any_sums(), true);
        assert_eq!(ran.marker, Marker::Started("remote-path".into()), "{ran:?}");
        assert_eq!(ran.stdout, served(dev.as_bytes()), "{ran:?}");
    }

    /// An unusable `--remote-path` is refused with the reason: another protocol, an error, or nothing.
    #[test]
    fn start_script_reports_an_unusable_remote_path() {
        let h = FakeHost::new();
        let other = h.at("opt/other");
        h.install(&other, "echo 'basyn-protocol 1'");
        let mute = h.at("opt/mute");
        h.install(&mute, "exit 1");
        let missing = h.at("opt/missing basyn");
        let run = |p: &Path| {
            let t = Target { remote_path: Some(p.display().to_string()), ..host("h") };
            h.run(&t, OsStr::new("/dev/x"), "basyn-x", &any_sums(), true)
        };
        let ran = run(&other);
        assert_eq!(ran.marker, Marker::BadPath("it speaks basyn-protocol 1".into()), "{ran:?}");
        assert_eq!(ran.code, Some(97));
        assert_eq!(run(&mute).marker, Marker::BadPath(String::new()));
        match run(&missing).marker {
            Marker::BadPath(why) => assert!(why.contains("missing basyn"), "the shell's error names the path: {why}"),
            other => panic!("{other:?}"),
        }
    }

    // --- reading the marker ---------------------------------------------------------------

    /// `read_marker` over `bytes` as the remote stderr: the marker and what is left to read.
    fn marker_of(bytes: &[u8]) -> (Marker, Vec<u8>) {
        let (r, mut w) = io::pipe().expect("pipe");
        w.write_all(bytes).expect("write");
        drop(w);
        let mut stderr = BufReader::new(r);
        let marker = read_marker(&mut stderr, "testhost");
        let mut rest = Vec::new();
        stderr.read_to_end(&mut rest).expect("read the rest");
        (marker, rest)
    }

    /// Each marker the scripts write is read, after any chatter, and what follows is left for the relay.
    #[test]
    fn read_marker_finds_each_marker() {
        let cases: &[(&[u8], Marker)] = &[
            (b"basyn-start path\n", Marker::Started("path".into())),
            (b"basyn-start remote-path\n", Marker::Started("remote-path".into())),
            (b"basyn-start cached /h/.cache/basyn/b x\r\n", Marker::Started("cached /h/.cache/basyn/b x".into())),
            (b"basyn-upload x86_64 none\n", Marker::Upload { onpath: "none".into(), arch: "x86_64".into() }),
            (
                b"basyn-upload aarch64 basyn-protocol 1\n",
                Marker::Upload { onpath: "basyn-protocol 1".into(), arch: "aarch64".into() },
            ),
            (b"basyn-upload riscv64", Marker::Upload { onpath: "none".into(), arch: "riscv64".into() }),
            (
                b"basyn-broken /c/b sh: 1: /c/b: Permission denied\n",
                Marker::Broken { path: "/c/b".into(), why: "sh: 1: /c/b: Permission denied".into() },
            ),
            (b"basyn-broken /c/b\n", Marker::Broken { path: "/c/b".into(), why: String::new() }),
            (b"basyn-badpath it speaks basyn-protocol 1\n", Marker::BadPath("it speaks basyn-protocol 1".into())),
            (b"basyn-badpath \n", Marker::BadPath(String::new())),
            (b"Welcome!\n\nLast login: never\nbasyn-start path\n", Marker::Started("path".into())),
        ];
        for (bytes, want) in cases {
            assert_eq!(&marker_of(bytes).0, want, "{:?}", String::from_utf8_lossy(bytes));
        }
        let (marker, rest) = marker_of(b"motd\nbasyn-start path\nserve: opened /dev/x\n");
        assert_eq!(marker, Marker::Started("path".into()));
        assert_eq!(rest, b"serve: opened /dev/x\n", "lines after the marker belong to basyn serve");
    }

    /// Without a marker, the last line seen explains the failure.
    #[test]
    fn read_marker_without_a_marker_keeps_the_last_line() {
        assert_eq!(marker_of(b"").0, Marker::Silent(String::new()));
        let (marker, _) = marker_of(b"Welcome\nThis account is currently not available.\n");
        assert_eq!(marker, Marker::Silent("This account is currently not available.".into()));
        assert_eq!(marker_of(b"no newline at the end").0, Marker::Silent("no newline at the end".into()));
    }

    /// Lines that only look like markers are not taken for one, and stop the search.
    #[test]
    fn read_marker_does_not_take_garbage_for_a_marker() {
        let (marker, rest) = marker_of(b"basyn-frobnicate now\nbasyn-start path\n");
        assert_eq!(marker, Marker::Silent("basyn-frobnicate now".into()));
        assert_eq!(rest, b"basyn-start path\n");
        assert_eq!(marker_of(b"say basyn-start path\n").0, Marker::Silent("say basyn-start path".into()));
        assert_eq!(marker_of(b"basyn-\n").0, Marker::Silent("basyn-".into()));
    }

    /// Regression: a shell profile printing a line that is not UTF-8 (Latin-1) ended the
    /// search for the marker, so a basyn that did start was taken for a silent failure.
    #[test]
    fn a_profile_line_that_is_not_utf8_does_not_hide_the_marker() {
        assert_eq!(marker_of(b"readable\n\xe9t\xe9\nbasyn-start path\n").0, Marker::Started("path".into()));
        assert_eq!(marker_of(b"readable\n\xff\xfe\n").0, Marker::Silent("\u{fffd}\u{fffd}".into()));
    }

    /// The `--verbose` line says where basyn came from, and only for the PATH and the cache.
    #[test]
    fn started_note_names_the_source() {
        assert_eq!(started_note("path").as_deref(), Some("using basyn from the remote PATH"));
        assert_eq!(started_note("cached /c/my b").as_deref(), Some("reusing the uploaded basyn at /c/my b"));
        assert_eq!(started_note("remote-path"), None);
        assert_eq!(started_note("cached"), None);
        assert_eq!(started_note("pathological"), None);
    }

    // --- refusals and their texts -----------------------------------------------------------

    /// Every refusal is a precondition failure that names the host first.
    #[test]
    fn refusals_name_the_host_and_the_cause() {
        assert_eq!(message(refused(&host("db1"), "cannot connect: x")), "remote host db1: cannot connect: x");
        assert_eq!(
            message(cannot_run(&host("db1"), "/c/basyn-x", "noexec")),
            "remote host db1: the uploaded basyn at /c/basyn-x cannot run there (noexec); \
             install basyn on the host or point --remote-path at one"
        );
        let t = Target { remote_path: Some("/opt/b".into()), ..host("db1") };
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(
            message(bad_path(&t, String::new())),
            format!(
                "remote host db1: --remote-path /opt/b cannot be used: it does not run; point --remote-path at a basyn {version}"
            )
        );
        assert!(message(bad_path(&t, "it speaks basyn-protocol 1".into())).contains(": it speaks basyn-protocol 1;"));
    }

    /// A command that ended without a marker is explained by stdout first, then stderr.
    #[test]
    fn silent_why_prefers_stdout_then_stderr() {
        assert_eq!(silent_why(b"", String::new()), "it ended without a word");
        assert_eq!(silent_why(b"  \n\n", "Permission denied".into()), "Permission denied");
        assert_eq!(
            silent_why(b"This account is currently not available.\n \n", "x".into()),
            "This account is currently not available."
        );
        assert_eq!(silent_why(b"first\n  second  \n", String::new()), "second");
    }

    /// What the PATH had is quoted, so that an odd version string is visible as such.
    #[test]
    fn onpath_why_says_what_the_path_had() {
        assert_eq!(onpath_why("none"), "not found");
        assert_eq!(onpath_why("basyn-protocol 1"), r#"it speaks "basyn-protocol 1""#);
    }

    /// The probe accepts only our exact protocol line and otherwise says why.
    #[test]
    fn probe_verdict_accepts_only_our_protocol() {
        let ours = protocol_line();
        assert_eq!(probe_verdict(0, &ours, ""), Ok(()));
        let other = format!(r#"it speaks another protocol version ("basyn-protocol 1", this basyn needs {ours:?})"#);
        assert_eq!(probe_verdict(0, "basyn-protocol 1", ""), Err(other.clone()));
        assert_eq!(probe_verdict(2, "basyn-protocol 1", "usage"), Err(other));
        assert_eq!(
            probe_verdict(126, "", "sh: 1\nexec: /c/b: Permission denied"),
            Err("exec: /c/b: Permission denied".into())
        );
        assert_eq!(probe_verdict(127, "", ""), Err("it exited with status 127".into()));
    }

    /// ssh's banner is reduced to its last line, and every cause in the chain is named.
    #[test]
    fn ssh_error_appends_the_last_line_of_each_cause() {
        /// An error with a text and maybe a cause.
        #[derive(Debug)]
        struct Layer(&'static str, Option<Box<Layer>>);
        impl std::fmt::Display for Layer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for Layer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|l| l as _)
            }
        }
        assert_eq!(ssh_error(&openssh::Error::Disconnected), "the connection was terminated");
        let banner = "Warning: this is a banner\n\nssh: connect to host h port 22: Connection refused\n\n";
        assert_eq!(
            ssh_error(&openssh::Error::Connect(io::Error::other(banner))),
            "failed to connect to the remote host: ssh: connect to host h port 22: Connection refused"
        );
        assert_eq!(
            ssh_error(&openssh::Error::Connect(io::Error::other(" \n\n"))),
            "failed to connect to the remote host"
        );
        let chain = Layer("outer\n  middle  ", Some(Box::new(Layer("inner", None))));
        assert_eq!(
            ssh_error(&openssh::Error::Master(io::Error::other(chain))),
            "the master connection failed: middle: inner"
        );
    }

    /// The engine's "the remote endpoint ..." messages come from here.
    #[test]
    fn exit_problem_tells_a_lost_connection_from_an_exit_status_and_a_kill() {
        assert_eq!(exit_problem(std::process::ExitStatus::from_raw(0)), None);
        assert_eq!(exit_problem(std::process::ExitStatus::from_raw(3 << 8)).as_deref(), Some("exited with status 3"));
        assert_eq!(
            exit_problem(std::process::ExitStatus::from_raw(255 << 8)).as_deref(),
            Some("lost its ssh connection (ssh exited with status 255)")
        );
        assert_eq!(exit_problem(std::process::ExitStatus::from_raw(libc::SIGKILL)).as_deref(), Some("was killed"));
    }

    // --- this executable and its upload ----------------------------------------------------

    /// `uname -m` on the remote host is compared with this: it must be the same spelling.
    #[test]
    fn local_machine_is_what_uname_m_prints() {
        let out = Command::new("uname").arg("-m").output().expect("uname -m");
        let uname = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(!uname.is_empty());
        assert_eq!(local_machine(), uname);
    }

    /// Known answers, and the same spelling as `sha256sum` and `b2sum`, which the remote
    /// scripts compare with.
    #[test]
    fn file_sums_give_known_answers_and_match_sha256sum_and_b2sum() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (empty, abc, big) = (dir.path().join("empty"), dir.path().join("abc"), dir.path().join("big"));
        fs::write(&empty, b"").expect("write");
        fs::write(&abc, b"abc").expect("write");
        fs::write(&big, (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect::<Vec<_>>()).expect("write");
        let sum = |p: &Path| file_sums(p).expect("digests").sha256;
        assert_eq!(sum(&empty), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(sum(&abc), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let out = Command::new("sha256sum").arg(&big).output().expect("sha256sum");
        let theirs = String::from_utf8_lossy(&out.stdout);
        assert_eq!(Some(sum(&big).as_str()), theirs.split_whitespace().next());
        let b2 = |p: &Path| file_sums(p).expect("digests").blake2b;
        assert_eq!(
            b2(&abc),
            "ba80a53f981c4d0d6a2797b69f12f6e94c212f14685ac4b74b12bb6fdbffa2d17d87c5392aab792dc252d5de4533cc9518d38aa8dbf1925ab92386edd4009923"
        );
        let out = Command::new("b2sum").arg(&big).output().expect("b2sum");
        assert_eq!(Some(b2(&big).as_str()), String::from_utf8_lossy(&out.stdout).split_whitespace().next());
        let missing = file_sums(&dir.path().join("missing")).map(|_| ());
        assert_eq!(missing.map_err(|e| e.kind()), Err(io::ErrorKind::NotFound));
    }

    /// The cache name carries the version and a digest prefix, and does not panic on a short digest.
    #[test]
    fn cache_name_is_version_and_digest_prefix() {
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(cache_name(&"0123456789abcdef".repeat(4)), format!("basyn-{version}-0123456789abcdef"));
        assert_eq!(cache_name("abc"), format!("basyn-{version}-abc"));
    }

    /// The upload script stores a verified, private copy and leaves nothing behind on a mismatch.
    #[test]
    fn upload_script_stores_a_verified_copy_and_refuses_a_corrupt_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let exe = dir.path().join("basyn");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 13 % 241) as u8).collect();
        fs::write(&exe, &data).expect("write");
        let digest = file_sums(&exe).expect("digests").sha256;
        let cache = dir.path().join("cache/basyn");
        let upload = |digest: &str, name: &str| {
            Command::new("/bin/sh")
                .arg("-c")
                .arg(upload_script(digest, name))
                .env("XDG_CACHE_HOME", dir.path().join("cache"))
                .stdin(File::open(&exe).expect("open"))
                .output()
                .expect("run the upload script")
        };
        let out = upload(&digest, "basyn-good");
        assert!(out.status.success(), "{out:?}");
        let stored = cache.join("basyn-good");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), stored.display().to_string());
        assert_eq!(fs::read(&stored).expect("read"), data);
        let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!((mode(&stored), mode(&cache)), (0o700, 0o700));

        let wrong = "0".repeat(64);
        let out = upload(&wrong, "basyn-bad");
        assert_eq!(out.status.code(), Some(3), "{out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!("uploaded file has sha256 {digest}, expected {wrong}\n")
        );
        let left: Vec<_> = fs::read_dir(&cache).expect("ls").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(left, ["basyn-good"], "no partial or temporary file may stay");
    }

    // --- the caller's side of the SSH thread ----------------------------------------------------

    /// Our ends and the child's ends are the same three pipes, and closing one side gives EOF.
    #[test]
    fn pipes_pair_each_end_with_its_counterpart() {
        let (mut ends, theirs) = pipes().expect("pipes");
        let (mut stdin, mut stdout, mut stderr) =
            (File::from(theirs.stdin), File::from(theirs.stdout), File::from(theirs.stderr));
        ends.writer.write_all(b"request").expect("write");
        drop(ends.writer);
        let mut got = Vec::new();
        stdin.read_to_end(&mut got).expect("read");
        assert_eq!(got, b"request");
        stdout.write_all(b"reply").expect("write");
        stderr.write_all(b"basyn-start path\nlater\n").expect("write");
        drop((stdout, stderr));
        let mut got = Vec::new();
        ends.reader.read_to_end(&mut got).expect("read");
        assert_eq!(got, b"reply");
        assert_eq!(read_marker(&mut ends.stderr, "h"), Marker::Started("path".into()));
    }

    /// Log lines reach `log` in order until the ready event, whose pipes are returned.
    #[test]
    fn wait_until_ready_relays_log_lines_then_returns_the_pipes() {
        let (tx, rx) = mpsc::channel();
        let (ends, _theirs) = pipes().expect("pipes");
        for event in
            [Event::Log("one".into()), Event::Log("two".into()), Event::Ready(Ok(ends)), Event::Log("late".into())]
        {
            tx.send(event).expect("send");
        }
        let lines = RefCell::new(Vec::new());
        let ready = wait_until_ready(&rx, &host("h"), &|l| lines.borrow_mut().push(l));
        assert!(ready.is_ok());
        assert_eq!(lines.into_inner(), ["one", "two"]);
    }

    /// The thread's own failure is passed on; a thread that vanished is reported as such.
    #[test]
    fn wait_until_ready_passes_failures_on() {
        let (tx, rx) = mpsc::channel();
        tx.send(Event::Ready(Err(refused(&host("h"), "cannot connect: refused")))).expect("send");
        let got = wait_until_ready(&rx, &host("h"), &|_| {}).err().map(message);
        assert_eq!(got.as_deref(), Some("remote host h: cannot connect: refused"));
        drop(tx);
        let got = wait_until_ready(&rx, &host("h"), &|_| {}).err().map(message);
        assert_eq!(got.as_deref(), Some("remote host h: the SSH thread stopped unexpectedly"));
    }

    /// An `SshProcess` fed by test channels instead of an SSH thread.
    fn process() -> (SshProcess, mpsc::Sender<Option<String>>, oneshot::Receiver<()>) {
        let (kill, kill_rx) = oneshot::channel();
        let (status_tx, status) = mpsc::channel();
        let keeper = std::thread::spawn(|| {});
        (SshProcess { kill: Some(kill), status, keeper: Some(keeper), ended: None, relay: None }, status_tx, kill_rx)
    }

    /// The status arrives once and is kept, so that waiting again gives the same answer.
    #[test]
    fn ssh_process_wait_keeps_the_status() {
        let (mut p, tx, _kill) = process();
        tx.send(Some("exited with status 3".into())).expect("send");
        drop(tx);
        assert_eq!(p.wait().as_deref(), Some("exited with status 3"));
        assert_eq!(p.wait().as_deref(), Some("exited with status 3"));
        assert_eq!(p.wait_for(Duration::ZERO), Some(Some("exited with status 3".into())));
    }

    /// `wait_for` gives up while the command runs, and answers once it ended.
    #[test]
    fn ssh_process_wait_for_times_out_while_running() {
        let (mut p, tx, _kill) = process();
        assert_eq!(p.wait_for(Duration::from_millis(20)), None);
        tx.send(None).expect("send");
        assert_eq!(p.wait_for(Duration::from_secs(5)), Some(None));
        assert_eq!(p.wait(), None);
    }

    /// A thread that ended without a status is reported as vanished, by both waits.
    #[test]
    fn ssh_process_without_a_status_vanished() {
        let (mut p, tx, _kill) = process();
        drop(tx);
        assert_eq!(p.wait().as_deref(), Some("vanished"));
        let (mut p, tx, _kill) = process();
        drop(tx);
        assert_eq!(p.wait_for(Duration::from_secs(5)), Some(Some("vanished".into())));
    }

    /// `kill` tells the SSH thread once; killing again is harmless.
    #[test]
    fn ssh_process_kill_signals_once() {
        let (mut p, _tx, mut kill) = process();
        assert!(kill.try_recv().is_err(), "nothing sent before kill");
        p.kill();
        p.kill();
        assert_eq!(kill.try_recv(), Ok(()));
    }
}
