//! The SSH transport: reaches `basyn serve` on another host through the system `ssh`
//! (the `openssh` crate, one multiplexed master connection, BatchMode), uploading the
//! running executable when the remote host has no compatible basyn.
//!
//! This is the only module that uses tokio: a current-thread runtime lives on one
//! background thread per connection. The engine sees plain pipes: the remote command's
//! stdin/stdout are our own pipe descriptors.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use openssh::{ControlPersist, KnownHosts, Session, SessionBuilder, Stdio};

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

fn refused(target: &Target, what: impl std::fmt::Display) -> EndpointError {
    EndpointError::Abort { code: AbortCode::Precondition, message: format!("remote host {}: {what}", target.host) }
}

/// Progress from the SSH thread to the caller while the connection is set up.
enum Event {
    Log(String),
    Ready(Result<(), EndpointError>),
}

/// Connects, finds or uploads a compatible basyn, and starts `basyn serve DEVICE` there.
/// `log` receives `--verbose` lines.
pub fn connect(target: &Target, device: &Path, log: &dyn Fn(String)) -> Result<Link, EndpointError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| refused(target, format!("cannot start the SSH runtime: {e}")))?;
    let pipe = |what| io::pipe().map_err(|e| refused(target, format!("cannot make a {what} pipe: {e}")));
    let (their_in, our_writer) = pipe("stdin")?;
    let (our_reader, their_out) = pipe("stdout")?;
    let (our_stderr, their_err) = pipe("stderr")?;
    for p in [&their_in as &dyn std::os::fd::AsRawFd, &our_reader] {
        crate::endpoint::widen_pipe(&p.as_raw_fd());
    }
    let (events, event_rx) = mpsc::channel();
    let (kill, kill_rx) = tokio::sync::oneshot::channel::<()>();
    let (status_tx, status) = mpsc::channel();
    let keeper_target = target.clone();
    let device_name = device.to_path_buf();
    let device = device.as_os_str().to_os_string();
    let keeper = std::thread::Builder::new()
        .name("basyn-ssh".into())
        .spawn(move || {
            rt.block_on(async move {
                let t = &keeper_target;
                let session = match open_session(t).await {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = events.send(Event::Ready(Err(e)));
                        return;
                    }
                };
                let _ = events.send(Event::Log(format!("connected to {} over ssh", t.host)));
                let logger = |line: String| {
                    let _ = events.send(Event::Log(line));
                };
                let remote = match find_remote(&session, t, &logger).await {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = events.send(Event::Ready(Err(e)));
                        let _ = session.close().await;
                        return;
                    }
                };
                let mut cmd = session.command(remote.clone());
                cmd.arg("serve").raw_arg(shell_quote_os(&device));
                cmd.stdin(Stdio::from(std::os::fd::OwnedFd::from(their_in)))
                    .stdout(Stdio::from(std::os::fd::OwnedFd::from(their_out)))
                    .stderr(Stdio::from(std::os::fd::OwnedFd::from(their_err)));
                let child = cmd.spawn().await;
                // Our copies of the child's ends must close, or EOF would never arrive.
                drop(cmd);
                let child = match child {
                    Ok(c) => c,
                    Err(e) => {
                        let msg = format!("cannot start {remote} serve: {}", ssh_error(&e));
                        let _ = events.send(Event::Ready(Err(refused(t, msg))));
                        let _ = session.close().await;
                        return;
                    }
                };
                let _ = events.send(Event::Ready(Ok(())));
                let outcome = tokio::select! {
                    st = child.wait() => match st {
                        Ok(st) if st.success() => None,
                        Ok(st) => Some(match st.code() {
                            Some(255) => "lost its ssh connection (ssh exited with status 255)".to_string(),
                            Some(c) => format!("exited with status {c}"),
                            None => "was killed".to_string(),
                        }),
                        Err(e) => Some(format!("failed: {}", ssh_error(&e))),
                    },
                    _ = kill_rx => Some("was stopped by basyn".to_string()),
                };
                let _ = status_tx.send(outcome);
                let _ = session.close().await;
            })
        })
        .map_err(|e| refused(target, format!("cannot start a thread: {e}")))?;
    loop {
        match event_rx.recv() {
            Ok(Event::Log(line)) => log(line),
            Ok(Event::Ready(Ok(()))) => break,
            Ok(Event::Ready(Err(e))) => {
                let _ = keeper.join();
                return Err(e);
            }
            Err(_) => {
                let _ = keeper.join();
                return Err(refused(target, "the SSH thread stopped unexpectedly"));
            }
        }
    }
    relay_stderr(our_stderr, target.host.clone());
    let process = SshProcess { kill: Some(kill), status, keeper: Some(keeper), ended: None };
    Ok(Link {
        reader: Box::new(our_reader),
        writer: Box::new(our_writer),
        process: Box::new(process),
        label: format!("remote {}:{}", target.host, device_name.display()),
    })
}

/// Quotes an OS path for the remote shell (the remote command line goes through it).
fn shell_quote_os(s: &std::ffi::OsStr) -> OsString {
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

/// Copies the remote command's stderr to ours, each line prefixed with the host.
fn relay_stderr(stderr: io::PipeReader, host: String) {
    let _ = std::thread::Builder::new().name("basyn-ssh-stderr".into()).spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let mut err = io::stderr().lock();
            let _ = writeln!(err, "{host}: {line}");
        }
    });
}

/// The remote `basyn serve`, as seen through the SSH thread.
struct SshProcess {
    kill: Option<tokio::sync::oneshot::Sender<()>>,
    status: mpsc::Receiver<Option<String>>,
    keeper: Option<std::thread::JoinHandle<()>>,
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

/// `StrictHostKeyChecking` as the user's ssh config resolves it for this host (`ssh -G`),
/// because the crate always passes the option explicitly.
fn known_hosts_policy(target: &Target) -> KnownHosts {
    let mut cmd = std::process::Command::new("ssh");
    if let Some(cfg) = std::env::var_os(CONFIG_ENV) {
        cmd.arg("-F").arg(cfg);
    }
    if let Some(p) = target.port {
        cmd.arg("-p").arg(p.to_string());
    }
    if let Some(u) = &target.user {
        cmd.arg("-l").arg(u);
    }
    cmd.arg("-G").arg(&target.host).stdin(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    let value = cmd.output().ok().and_then(|out| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("stricthostkeychecking ").map(|v| v.trim().to_ascii_lowercase()))
    });
    match value.as_deref() {
        Some("accept-new") => KnownHosts::Add,
        Some("no" | "false" | "off") => KnownHosts::Accept,
        // "yes", "ask" (which BatchMode turns into a refusal) and anything unknown: strict.
        _ => KnownHosts::Strict,
    }
}

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

/// Where the master connection's socket goes: the temp dir, unless its path is so long
/// that the socket path would pass the 108-byte limit of Unix sockets.
fn control_dir() -> std::path::PathBuf {
    let tmp = std::env::temp_dir();
    if tmp.as_os_str().len() <= 48 {
        return tmp;
    }
    match std::env::var_os("XDG_RUNTIME_DIR").map(std::path::PathBuf::from) {
        Some(run) if run.as_os_str().len() <= 48 && run.is_dir() => run,
        _ => std::path::PathBuf::from("/tmp"),
    }
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

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Checks that `path` on the remote runs and speaks our protocol version.
async fn probe(session: &Session, path: &str) -> Result<(), String> {
    let (code, out, err) = remote_sh(session, &format!("exec {} protocol", quote(path)), None).await?;
    if out == protocol_line() {
        return Ok(());
    }
    if code == 0 || out.starts_with("basyn-protocol") {
        return Err(format!("it speaks another protocol version ({out:?}, this basyn needs {:?})", protocol_line()));
    }
    let why = err.lines().last().unwrap_or("").to_string();
    Err(if why.is_empty() { format!("it exited with status {code}") } else { why })
}

/// The remote basyn to run: `--remote-path`, else `basyn` on the remote PATH if it speaks
/// our protocol, else this executable uploaded into the remote user's cache. The usual
/// cases cost one remote command: a script that checks the PATH and the cache at once.
async fn find_remote(session: &Session, target: &Target, log: &dyn Fn(String)) -> Result<String, EndpointError> {
    let fail = |what: String| refused(target, what);
    if let Some(path) = &target.remote_path {
        probe(session, path).await.map_err(|why| {
            fail(format!(
                "--remote-path {path} cannot be used: {why}; point --remote-path at a basyn {}",
                env!("CARGO_PKG_VERSION")
            ))
        })?;
        return Ok(path.clone());
    }
    let exe = std::env::current_exe().map_err(|e| fail(format!("cannot find this executable: {e}")))?;
    let digest = file_sha256(&exe).map_err(|e| fail(format!("cannot read {}: {e}", exe.display())))?;
    let name = format!("basyn-{}-{}", env!("CARGO_PKG_VERSION"), &digest[..16]);
    let want = quote(&protocol_line());
    let script = format!(
        r#"v=$(basyn protocol 2>/dev/null); if [ "$v" = {want} ]; then echo "path"; exit 0; fi
echo "onpath ${{v:-none}}"
f="{CACHE_DIR}/{name}"
if [ -x "$f" ] && [ "$(sha256sum < "$f" 2>/dev/null | cut -d' ' -f1)" = {digest} ]; then
  out=$("$f" protocol 2>&1); if [ "$out" = {want} ]; then echo "cached $f"; else echo "broken $f"; printf '%s\n' "$out" | tail -n 1; fi
  exit 0
fi
echo "arch $(uname -m)""#
    );
    let (_, out, _) =
        remote_sh(session, &script, None).await.map_err(|e| fail(format!("cannot look for basyn: {e}")))?;
    let mut lines = out.lines();
    let mut line = lines.next().unwrap_or("");
    if line == "path" {
        log("using basyn from the remote PATH".to_string());
        return Ok("basyn".to_string());
    }
    if let Some(v) = line.strip_prefix("onpath ") {
        let why = if v == "none" { "not found".to_string() } else { format!("it speaks {v:?}") };
        log(format!("no usable basyn on the remote PATH ({why})"));
        line = lines.next().unwrap_or("");
    }
    if let Some(path) = line.strip_prefix("cached ") {
        log(format!("reusing the uploaded basyn at {path}"));
        return Ok(path.to_string());
    }
    if let Some(path) = line.strip_prefix("broken ") {
        return Err(cannot_run(target, path, lines.next().unwrap_or("it does not start")));
    }
    let Some(arch) = line.strip_prefix("arch ") else {
        return Err(fail(format!("unexpected answer while looking for basyn: {out:?}")));
    };
    let ours = local_machine();
    if arch != ours {
        return Err(fail(format!(
            "basyn is not installed there and this executable is for {ours}, the host is {arch}: install basyn on it or use --remote-path"
        )));
    }
    let path = upload(session, target, &exe, &digest, &name).await?;
    log(format!("uploaded basyn to {path}"));
    probe(session, &path).await.map_err(|why| cannot_run(target, &path, &why))?;
    Ok(path)
}

/// Where uploads go on the remote host (expanded by its shell).
const CACHE_DIR: &str = r#"${XDG_CACHE_HOME:-$HOME/.cache}/basyn"#;

fn cannot_run(target: &Target, path: &str, why: &str) -> EndpointError {
    refused(
        target,
        format!(
            "the uploaded basyn at {path} cannot run there ({why}); install basyn on the host or point --remote-path at one"
        ),
    )
}

fn local_machine() -> String {
    // SAFETY: uname fills the struct it is given; a zeroed utsname is a valid argument.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return std::env::consts::ARCH.to_string();
    }
    // SAFETY: uname NUL-terminates the machine field.
    unsafe { std::ffi::CStr::from_ptr(u.machine.as_ptr()) }.to_string_lossy().into_owned()
}

/// Copies `exe` into the remote cache under `name`, verifying its SHA-256 there before
/// it takes its final name; returns the remote path.
async fn upload(
    session: &Session,
    target: &Target,
    exe: &Path,
    digest: &str,
    name: &str,
) -> Result<String, EndpointError> {
    let fail = |what: String| refused(target, what);
    let script = format!(
        r#"set -e; umask 077; d="{CACHE_DIR}"; mkdir -p "$d"; t="$d/.upload.$$"; trap 'rm -f "$t"' EXIT; cat > "$t"; h=$(sha256sum < "$t" | cut -d' ' -f1); [ "$h" = {digest} ] || {{ echo "uploaded file has sha256 $h, expected {digest}" >&2; exit 3; }}; chmod 700 "$t"; mv -f "$t" "$d/{name}"; trap - EXIT; echo "$d/{name}""#
    );
    let file = File::open(exe).map_err(|e| fail(format!("cannot read {}: {e}", exe.display())))?;
    let (code, out, err) =
        remote_sh(session, &script, Some(file)).await.map_err(|e| fail(format!("upload failed: {e}")))?;
    if code != 0 || out.is_empty() {
        return Err(fail(format!("uploading basyn failed: {}", err.lines().last().unwrap_or("no output"))));
    }
    Ok(out)
}

fn file_sha256(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut data = Vec::new();
    f.read_to_end(&mut data)?;
    Ok(crate::hash::HashAlgo::Sha256.digest(&data).to_string())
}
