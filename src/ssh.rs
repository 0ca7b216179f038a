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

use openssh::{ControlPersist, KnownHosts, Session, SessionBuilder, Stdio};
use tokio::sync::oneshot;

use crate::endpoint::{EndpointError, Link, Process};
use crate::protocol::{AbortCode, VERSION};

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
fn refused(target: &Target, what: impl std::fmt::Display) -> EndpointError {
    EndpointError::Abort { code: AbortCode::Precondition, message: format!("remote host {}: {what}", target.host) }
}

/// The refusal for an uploaded basyn that the host will not run (noexec cache, wrong libc...).
fn cannot_run(target: &Target, path: &str, why: &str) -> EndpointError {
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
pub fn connect(target: &Target, device: &Path, log: &dyn Fn(String)) -> Result<Link, EndpointError> {
    let rt = runtime(target)?;
    let exe = Executable::running(target)?;
    let (events, event_rx) = mpsc::channel();
    let (kill, kill_rx) = oneshot::channel();
    let (status_tx, status) = mpsc::channel();
    let keeper = Keeper {
        target: target.clone(),
        device: device.as_os_str().to_os_string(),
        exe,
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
    let process = SshProcess { kill: Some(kill), status, keeper: Some(keeper), ended: None };
    Ok(into_link(ends, process, target, device))
}

/// The current-thread runtime the SSH thread drives the `openssh` futures on.
fn runtime(target: &Target) -> Result<tokio::runtime::Runtime, EndpointError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| refused(target, format!("cannot start the SSH runtime: {e}")))
}

/// This executable as a possible upload: the remote cache knows it by version and digest.
struct Executable {
    /// Where it is here.
    path: PathBuf,
    /// Its SHA-256 in lowercase hex, as `sha256sum` prints it on the remote host.
    digest: String,
    /// Its file name in the remote cache.
    name: String,
}

impl Executable {
    /// The running executable, read once to compute its digest.
    fn running(target: &Target) -> Result<Executable, EndpointError> {
        let path = std::env::current_exe().map_err(|e| refused(target, format!("cannot find this executable: {e}")))?;
        let digest = file_sha256(&path).map_err(|e| refused(target, format!("cannot read {}: {e}", path.display())))?;
        let name = cache_name(&digest);
        Ok(Executable { path, digest, name })
    }
}

/// The upload's file name: the version for people, a digest prefix so that two builds of
/// one version do not take each other's place.
fn cache_name(digest: &str) -> String {
    format!("basyn-{}-{}", env!("CARGO_PKG_VERSION"), digest.get(..16).unwrap_or(digest))
}

/// The SHA-256 of a file, in lowercase hex.
fn file_sha256(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut data = Vec::new();
    f.read_to_end(&mut data)?;
    Ok(crate::hash::HashAlgo::Sha256.digest(&data).to_string())
}

/// Progress from the SSH thread to the caller while the connection is set up.
enum Event {
    /// A `--verbose` line.
    Log(String),
    /// The remote basyn runs (our ends of its pipes), or why it does not.
    Ready(Result<Ends, EndpointError>),
}

/// Passes the SSH thread's `--verbose` lines to `log` until the remote basyn runs or the
/// thread gives up.
fn wait_until_ready(
    events: &mpsc::Receiver<Event>,
    target: &Target,
    log: &dyn Fn(String),
) -> Result<Ends, EndpointError> {
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
fn into_link(ends: Ends, process: SshProcess, target: &Target, device: &Path) -> Link {
    relay_stderr(ends.stderr, target.host.clone());
    Link {
        reader: Box::new(ends.reader),
        writer: Box::new(ends.writer),
        process: Box::new(process),
        label: format!("remote {}:{}", target.host, device.display()),
    }
}

/// Copies the remote command's stderr to ours, each line prefixed with the host.
fn relay_stderr(stderr: BufReader<io::PipeReader>, host: String) {
    let _ = std::thread::Builder::new().name("basyn-ssh-stderr".into()).spawn(move || {
        for line in stderr.lines() {
            let Ok(line) = line else { break };
            let mut err = io::stderr().lock();
            let _ = writeln!(err, "{host}: {line}");
        }
    });
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
    /// What to upload if the host has no usable basyn.
    exe: Executable,
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
        let Keeper { target, device, exe, events, kill, status } = self;
        let fail = |e: EndpointError| {
            let _ = events.send(Event::Ready(Err(e)));
        };
        let session = match open_session(&target).await {
            Ok(s) => s,
            Err(e) => return fail(e),
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

/// Opens the multiplexed master connection that every remote command of this run shares.
async fn open_session(target: &Target) -> Result<Session, EndpointError> {
    let mut b = SessionBuilder::default();
    b.known_hosts_check(known_hosts_policy(target))
        .connect_timeout(Duration::from_secs(10))
        .server_alive_interval(Duration::from_secs(3))
        .control_directory(control_dir())
        // If basyn itself is killed, the master goes away on its own once idle.
        .control_persist(ControlPersist::IdleFor(std::num::NonZeroUsize::MIN.saturating_add(4)));
    if let Some(p) = target.port {
        b.port(p);
    }
    if let Some(u) = &target.user {
        b.user(u.clone());
    }
    if let Some(cfg) = std::env::var_os(CONFIG_ENV) {
        b.config_file(cfg);
    }
    b.connect(&target.host).await.map_err(|e| refused(target, format!("cannot connect: {}", ssh_error(&e))))
}

/// `StrictHostKeyChecking` as the user's ssh config resolves it for this host (`ssh -G`),
/// because the crate always passes the option explicitly.
fn known_hosts_policy(target: &Target) -> KnownHosts {
    match ssh_g(target, std::env::var_os(CONFIG_ENV)).output() {
        Ok(out) => policy_in(&String::from_utf8_lossy(&out.stdout)),
        Err(_) => KnownHosts::Strict,
    }
}

/// `ssh -G`: prints the configuration ssh would use for the target, without connecting.
fn ssh_g(target: &Target, config: Option<OsString>) -> std::process::Command {
    let mut cmd = std::process::Command::new("ssh");
    if let Some(cfg) = config {
        cmd.arg("-F").arg(cfg);
    }
    if let Some(p) = target.port {
        cmd.arg("-p").arg(p.to_string());
    }
    if let Some(u) = &target.user {
        cmd.arg("-l").arg(u);
    }
    cmd.arg("-G").arg(&target.host).stdin(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    cmd
}

/// The host key policy that the `stricthostkeychecking` line of `ssh -G` output asks for.
fn policy_in(ssh_g_output: &str) -> KnownHosts {
    let value = ssh_g_output
        .lines()
        .find_map(|l| l.strip_prefix("stricthostkeychecking ").map(|v| v.trim().to_ascii_lowercase()));
    match value.as_deref() {
        Some("accept-new") => KnownHosts::Add,
        Some("no" | "false" | "off") => KnownHosts::Accept,
        // "yes", "ask" (which BatchMode turns into a refusal) and anything unknown: strict.
        _ => KnownHosts::Strict,
    }
}

/// Where the master connection's socket goes: the temp dir, unless its path is so long
/// that the socket path would pass the 108-byte limit of Unix sockets.
fn control_dir() -> PathBuf {
    control_dir_in(std::env::temp_dir(), std::env::var_os("XDG_RUNTIME_DIR"))
}

/// [`control_dir`] for a given temp dir and `XDG_RUNTIME_DIR`.
fn control_dir_in(tmp: PathBuf, runtime_dir: Option<OsString>) -> PathBuf {
    if tmp.as_os_str().len() <= 48 {
        return tmp;
    }
    match runtime_dir.map(PathBuf::from) {
        Some(run) if run.as_os_str().len() <= 48 && run.is_dir() => run,
        _ => PathBuf::from("/tmp"),
    }
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
    crate::endpoint::widen_pipe(&their_in);
    crate::endpoint::widen_pipe(&reader);
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
) -> Result<Spawned<'s>, EndpointError> {
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
) -> Result<Spawned<'s>, EndpointError> {
    let script = start_script(t, device, &exe.name, &exe.digest);
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
fn start_script(target: &Target, device: &OsStr, name: &str, digest: &str) -> String {
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
f="{CACHE_DIR}/{name}"
if [ -x "$f" ] && [ "$(sha256sum < "$f" 2>/dev/null | cut -d' ' -f1)" = {digest} ]; then
  out=$("$f" protocol 2>/dev/null); if [ "$out" = {want} ]; then echo "basyn-start cached $f" >&2; exec "$f" serve {dev}; fi
  echo "basyn-broken $f $("$f" protocol 2>&1 | tail -n 1)" >&2; exit 97
fi
echo "basyn-upload $(uname -m) ${{v:-none}}" >&2; exit 97"#
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
        let mut line = String::new();
        match stderr.read_line(&mut line) {
            Ok(0) | Err(_) => return Marker::Silent(seen.last().cloned().unwrap_or_default()),
            Ok(_) => {}
        }
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
fn bad_path(t: &Target, why: String) -> EndpointError {
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
) -> Result<Spawned<'s>, EndpointError> {
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
async fn upload(session: &Session, target: &Target, exe: &Executable) -> Result<String, EndpointError> {
    let fail = |what: String| refused(target, what);
    let script = upload_script(&exe.digest, &exe.name);
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
