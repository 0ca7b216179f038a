//! A private sshd on 127.0.0.1 for the SSH integration tests, plus what only those tests
//! need on top of `util`: running basyn with an ssh config, finding `basyn serve`
//! processes, and guards that clean up in `Drop`.
//!
//! Each [`Sshd`] lives in its own temp dir: host and user keys, `authorized_keys/root`, an
//! `sshd_config` on a free port, a `known_hosts` and an ssh client config with the alias
//! `testhost`. basyn is pointed at that client config with `BASYN_SSH_CONFIG`. The remote
//! sessions get `HOME` and `XDG_CACHE_HOME` inside the temp dir (so the user's own shell
//! startup files and caches play no part, and uploads land where the test can see them)
//! and a `PATH` without basyn unless the test asks for one.
//!
//! A missing sshd or ssh-keygen fails the test when `CI` is set to a non-empty value;
//! otherwise the test prints `skipped: <why>` on stderr and returns (`util::require`).

#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::util::{Run, Running, poll, prerequisite, require, require_root, s, spawn, tool, which};

/// The sshd binary the tests start.
pub const SSHD: &str = "/usr/sbin/sshd";
/// The ssh config alias every [`Sshd`] answers to.
pub const ALIAS: &str = "testhost";
/// The variable basyn reads to pass `ssh -F FILE`.
pub const CONFIG_ENV: &str = "BASYN_SSH_CONFIG";

/// A port on 127.0.0.1 that was free a moment ago (bound, then released).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("cannot bind 127.0.0.1:0");
    l.local_addr().expect("no local address").port()
}

/// Makes an ed25519 key pair without a passphrase at `path` and `path.pub`.
pub fn keygen(path: &Path) {
    tool("ssh-keygen", &["-q", "-t", "ed25519", "-N", "", "-f", s(path)]).unwrap_or_else(|e| panic!("{e}"));
}

// ---------------------------------------------------------------------------
// The sshd
// ---------------------------------------------------------------------------

/// How a test wants its sshd set up.
#[derive(Default)]
pub struct Options {
    /// Put `bin/` of the temp dir first on the remote sessions' PATH ([`Sshd::bin_dir`]),
    /// where the test may place a `basyn`.
    pub bin_on_path: bool,
    /// Leave `XDG_CACHE_HOME` unset, so uploads go to `$HOME/.cache`.
    pub no_xdg_cache: bool,
    /// Log at `DEBUG1`, which names the ciphers each connection negotiated.
    pub debug_log: bool,
    /// Run sshd inside this network namespace, listening on its address, instead of on
    /// 127.0.0.1.
    pub netns: Option<(String, String)>,
}

/// A running sshd on 127.0.0.1 with its keys and configs in a temp dir; killed on drop.
pub struct Sshd {
    dir: tempfile::TempDir,
    /// The port it listens on.
    pub port: u16,
    child: Child,
}

impl Sshd {
    /// Starts an sshd with default options, or returns `None` if the test is skipped.
    pub fn start() -> Option<Sshd> {
        Sshd::start_with(Options::default())
    }

    /// Starts an sshd, or returns `None` (having printed why) if the test is skipped.
    pub fn start_with(opts: Options) -> Option<Sshd> {
        if !require(Path::new(SSHD).is_file(), &format!("{SSHD} is not installed (openssh-server)"))
            || !require(which("ssh-keygen").is_some(), "ssh-keygen is not installed (openssh-client)")
            || !require(which("ssh").is_some(), "ssh is not installed (openssh-client)")
        {
            return None;
        }
        // sshd refuses to start without its privilege-separation directory.
        let _ = fs::create_dir_all("/run/sshd");
        let dir = tempfile::Builder::new().prefix("basyn-sshd-").tempdir().expect("cannot create a temp dir");
        let d = dir.path();
        keygen(&d.join("hostkey"));
        keygen(&d.join("userkey"));
        // Keys per user (`AuthorizedKeysFile .../%u`): only root may log in unless a test
        // authorizes another user.
        fs::create_dir_all(d.join("authorized_keys")).expect("cannot create authorized_keys/");
        fs::copy(d.join("userkey.pub"), d.join("authorized_keys/root")).expect("cannot write authorized_keys");
        for sub in ["bin", "home", "local", "remote", "states", "tmp"] {
            fs::create_dir_all(d.join(sub)).expect("cannot create a directory");
        }
        let mut last = String::new();
        let addr = opts.netns.as_ref().map_or("127.0.0.1".to_string(), |(_, a)| a.clone());
        // A port found free can be taken before sshd binds it: try a few.
        for _ in 0..5 {
            let port = free_port();
            Sshd::write_configs(d, &addr, port, &opts);
            let log = d.join("sshd.log");
            let _ = fs::remove_file(&log);
            let mut cmd = match &opts.netns {
                Some((ns, _)) => {
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", ns, SSHD]);
                    c
                }
                None => Command::new(SSHD),
            };
            let mut child = cmd
                .arg("-D")
                .arg("-f")
                .arg(d.join("sshd_config"))
                .arg("-E")
                .arg(&log)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {SSHD}: {e}"));
            match wait_listening(&mut child, &log, &addr, port) {
                Ok(()) => return Some(Sshd { dir, port, child }),
                Err(why) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last = why;
                }
            }
        }
        panic!("cannot start a test sshd: {last}");
    }

    fn write_configs(d: &Path, addr: &str, port: u16, opts: &Options) {
        let p = |name: &str| d.join(name).display().to_string();
        let path = if opts.bin_on_path { format!("{}:/usr/bin:/bin", p("bin")) } else { "/usr/bin:/bin".to_string() };
        let mut env = format!("HOME={} PATH={path} BASYN_STATE_DIR={}", p("home"), p("states"));
        if !opts.no_xdg_cache {
            env.push_str(&format!(" XDG_CACHE_HOME={}", p("cache")));
        }
        let sshd_config = format!(
            "Port {port}\n\
             ListenAddress {addr}\n\
             HostKey {hostkey}\n\
             AuthorizedKeysFile {auth}\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\n\
             UsePAM no\n\
             StrictModes no\n\
             PidFile {pid}\n\
             LogLevel {level}\n\
             SetEnv {env}\n",
            level = if opts.debug_log { "DEBUG1" } else { "VERBOSE" },
            hostkey = p("hostkey"),
            auth = p("authorized_keys/%u"),
            pid = p("sshd.pid"),
        );
        fs::write(d.join("sshd_config"), sshd_config).expect("cannot write sshd_config");
        let host_pub = fs::read_to_string(d.join("hostkey.pub")).expect("cannot read the host key");
        fs::write(d.join("known_hosts"), format!("[{addr}]:{port} {}", host_pub.trim())).expect("known_hosts");
        let config = ssh_config_for(ALIAS, Some(port), Some("root"), &p("userkey"), &p("known_hosts"));
        fs::write(d.join("ssh_config"), config.replace("HostName 127.0.0.1", &format!("HostName {addr}")))
            .expect("cannot write ssh_config");
    }

    /// What sshd has logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// The temp dir holding everything of this sshd.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A path in the temp dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A path for a local image (`local/NAME`).
    pub fn local(&self, name: &str) -> PathBuf {
        self.path("local").join(name)
    }

    /// A path for a remote image (`remote/NAME`): the remote host is this machine.
    pub fn remote(&self, name: &str) -> PathBuf {
        self.path("remote").join(name)
    }

    /// The ssh client config with the `testhost` alias.
    pub fn client_config(&self) -> PathBuf {
        self.path("ssh_config")
    }

    /// Lets `user` log in with the user key too.
    pub fn authorize(&self, user: &str) {
        fs::copy(self.path("userkey.pub"), self.path("authorized_keys").join(user)).expect("cannot authorize a user");
    }

    /// The user's private key (in `authorized_keys/root`).
    pub fn user_key(&self) -> PathBuf {
        self.path("userkey")
    }

    /// The known_hosts file matching this sshd's host key.
    pub fn known_hosts(&self) -> PathBuf {
        self.path("known_hosts")
    }

    /// The directory first on the remote PATH with [`Options::bin_on_path`].
    pub fn bin_dir(&self) -> PathBuf {
        self.path("bin")
    }

    /// The remote sessions' `$HOME`.
    pub fn home(&self) -> PathBuf {
        self.path("home")
    }

    /// Where basyn uploads itself: `$XDG_CACHE_HOME/basyn`.
    pub fn upload_dir(&self) -> PathBuf {
        self.path("cache").join("basyn")
    }

    /// The state directory of the remote sessions (`BASYN_STATE_DIR`).
    pub fn state_dir(&self) -> PathBuf {
        self.path("states")
    }

    /// Where the remote side keeps `device`'s default state.
    pub fn remote_state_of(&self, device: &Path) -> PathBuf {
        let local = crate::util::state_of(device);
        self.state_dir().join(local.file_name().expect("a state name"))
    }

    /// Writes another client config into the temp dir and returns its path.
    pub fn write_file(&self, name: &str, body: &str) -> PathBuf {
        let path = self.path(name);
        fs::write(&path, body).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path
    }

    /// A `basyn` command using `config`: stdin from /dev/null (so nothing can prompt),
    /// `TMPDIR` (where ssh control sockets go) in the temp dir, `CI` removed.
    pub fn command<S: AsRef<OsStr>>(&self, config: &Path, args: &[S]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_basyn"));
        cmd.args(args)
            .env(CONFIG_ENV, config)
            .env("TMPDIR", self.tmp())
            .env("BASYN_STATE_DIR", crate::util::state_dir())
            .env_remove("CI") // the binary must not depend on it
            .stdin(Stdio::null());
        cmd
    }

    /// Runs basyn with this sshd's client config.
    pub fn basyn<S: AsRef<OsStr>>(&self, args: &[S]) -> Run {
        self.basyn_with(&self.client_config(), args)
    }

    /// Runs basyn with another client config.
    pub fn basyn_with<S: AsRef<OsStr>>(&self, config: &Path, args: &[S]) -> Run {
        spawn(self.command(config, args), args).finish()
    }

    /// Starts basyn in the background with this sshd's client config.
    pub fn spawn<S: AsRef<OsStr>>(&self, args: &[S]) -> Running {
        spawn(self.command(&self.client_config(), args), args)
    }

    /// basyn's `TMPDIR`.
    pub fn tmp(&self) -> PathBuf {
        self.path("tmp")
    }

    /// ssh client processes using a config in this temp dir (masters and mux clients).
    pub fn ssh_clients(&self) -> Vec<i32> {
        processes_mentioning(self.dir()).into_iter().filter(|&pid| comm(pid) == "ssh").collect()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An ssh client config for one `Host` pattern on 127.0.0.1: only `key`, only
/// `known_hosts`, strict host-key checking; `Port` and `User` only when given.
pub fn ssh_config_for(host: &str, port: Option<u16>, user: Option<&str>, key: &str, known_hosts: &str) -> String {
    let port = port.map(|p| format!("  Port {p}\n")).unwrap_or_default();
    let user = user.map(|u| format!("  User {u}\n")).unwrap_or_default();
    format!(
        "Host {host}\n  HostName 127.0.0.1\n{port}{user}  IdentityFile {key}\n  IdentitiesOnly yes\n  \
         UserKnownHostsFile {known_hosts}\n  StrictHostKeyChecking yes\n"
    )
}

/// Waits until sshd says it listens on `port` and the port accepts connections.
fn wait_listening(child: &mut Child, log: &Path, addr: &str, port: u16) -> Result<(), String> {
    let limit = Duration::from_secs(5);
    let wanted = format!("Server listening on {addr} port {port}");
    let mut outcome = Err(String::new());
    let decided = poll(limit, || {
        let text = fs::read_to_string(log).unwrap_or_default();
        if let Ok(Some(st)) = child.try_wait() {
            outcome = Err(format!("sshd exited ({st}): {}", text.trim()));
            return true;
        }
        // The log line proves that this sshd, not another one, holds the port.
        if text.contains(&wanted) && TcpStream::connect((addr, port)).is_ok() {
            outcome = Ok(());
            return true;
        }
        false
    });
    if !decided {
        let text = fs::read_to_string(log).unwrap_or_default();
        return Err(format!("sshd did not listen on port {port} within {limit:?}: {}", text.trim()));
    }
    outcome
}

// ---------------------------------------------------------------------------
// A network namespace of the test's own
// ---------------------------------------------------------------------------

/// A network namespace made by the test, joined to this one by a veth pair: this end
/// `10.251.A.B+1/30`, the namespace's end `10.251.A.B+2/30` (`addr`). Deleted on drop.
pub struct Netns {
    pub name: String,
    /// This end of the veth pair.
    pub host_if: String,
    /// The namespace's address.
    pub addr: String,
}

impl Netns {
    /// Makes the namespace and its link, or returns `None` if the test is skipped (not
    /// root, no `ip`).
    pub fn make() -> Option<Netns> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        if !require_root() || !require(which("ip").is_some(), "ip is not installed (iproute2)") {
            return None;
        }
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let id = (std::process::id() as usize % 100_000) * 8 + n % 8;
        let slot = id % 16_000;
        let (a, b) = (slot / 64, (slot % 64) * 4);
        let ns = Netns {
            name: format!("basyn-test-{id}"),
            host_if: format!("bsy{id}h"),
            addr: format!("10.251.{a}.{}", b + 2),
        };
        let ns_if = format!("bsy{id}n");
        let host_addr = format!("10.251.{a}.{}/30", b + 1);
        let ns_addr = format!("{}/30", ns.addr);
        let ip = |args: &[&str]| tool("ip", args).unwrap_or_else(|e| panic!("{e}"));
        ip(&["netns", "add", &ns.name]);
        ip(&["link", "add", &ns.host_if, "type", "veth", "peer", "name", &ns_if]);
        ip(&["link", "set", &ns_if, "netns", &ns.name]);
        ip(&["addr", "add", &host_addr, "dev", &ns.host_if]);
        ip(&["link", "set", &ns.host_if, "up"]);
        for args in [
            vec!["addr", "add", ns_addr.as_str(), "dev", ns_if.as_str()],
            vec!["link", "set", ns_if.as_str(), "up"],
            vec!["link", "set", "lo", "up"],
        ] {
            let mut full = vec!["-n", ns.name.as_str()];
            full.extend(args);
            ip(&full);
        }
        Some(ns)
    }

    /// What `Options::netns` wants for an sshd in this namespace.
    pub fn for_sshd(&self) -> Option<(String, String)> {
        Some((self.name.clone(), self.addr.clone()))
    }

    /// `ip link set` this end `up` or `down`: down, packets to the namespace go nowhere,
    /// as over a cut cable; no connection is reset.
    pub fn link(&self, up: bool) {
        tool("ip", &["link", "set", &self.host_if, if up { "up" } else { "down" }]).unwrap_or_else(|e| panic!("{e}"));
        if up {
            // Up again once the namespace answers: nothing listens on port 9 there, so
            // a connection is refused, not lost.
            let addr = self.addr.clone();
            assert!(
                poll(Duration::from_secs(10), || std::net::TcpStream::connect_timeout(
                    &std::net::SocketAddr::new(addr.parse().expect("an address"), 9),
                    Duration::from_millis(200)
                )
                .map_or_else(|e| e.kind() == std::io::ErrorKind::ConnectionRefused, |_| true)),
                "the link to {addr} did not come back"
            );
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and with it this end.
        let _ = tool("ip", &["netns", "delete", &self.name]);
        let _ = tool("ip", &["link", "delete", &self.host_if]);
    }
}

// ---------------------------------------------------------------------------
// Images and scripts
// ---------------------------------------------------------------------------

/// Writes a big random image quickly: `len` bytes from /dev/urandom.
pub fn urandom_image(path: &Path, len: usize) {
    let mut src = File::open("/dev/urandom").expect("cannot open /dev/urandom");
    let mut dst = File::create(path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
    let copied = std::io::copy(&mut (&mut src).take(len as u64), &mut dst).expect("cannot write the image");
    assert_eq!(copied, len as u64);
}

/// True if the file has an execute bit.
pub fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o111 != 0)
}

/// Writes an executable shell script.
pub fn write_script(path: &Path, body: &str) {
    fs::write(path, body).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// Pids of processes whose raw `/proc/PID/cmdline` (NUL-separated arguments) satisfies `f`.
fn processes(f: impl Fn(&[u8]) -> bool) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
            f(&fs::read(e.path().join("cmdline")).ok()?).then_some(pid)
        })
        .collect()
}

/// Pids of processes whose arguments are `... serve PATH` (a basyn endpoint for `path`).
pub fn serve_pids(path: &Path) -> Vec<i32> {
    let wanted = path.as_os_str().as_encoded_bytes();
    processes(|cmdline| {
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        args.windows(2).any(|w| w[0] == b"serve" && w[1] == wanted)
    })
}

/// The parent of a process, from `/proc/PID/stat`.
pub fn parent_of(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (COMM) STATE PPID ...": COMM may hold spaces, so split after its last ')'.
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// The process name (`/proc/PID/comm`).
pub fn comm(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_string()
}

/// The nearest `sshd` ancestor of a process: the server side of its ssh connection.
pub fn sshd_ancestor(pid: i32) -> Option<i32> {
    let mut p = parent_of(pid)?;
    while p > 1 {
        if comm(p) == "sshd" {
            return Some(p);
        }
        p = parent_of(p)?;
    }
    None
}

/// Pids of processes with `text` somewhere in their arguments.
pub fn processes_mentioning(text: &Path) -> Vec<i32> {
    let wanted = text.as_os_str().as_encoded_bytes();
    processes(|cmdline| cmdline.windows(wanted.len()).any(|w| w == wanted))
}

/// Sends SIGKILL to a process.
pub fn kill9(pid: i32) {
    send_signal(pid, libc::SIGKILL);
}

/// Sends a signal to a process.
pub fn send_signal(pid: i32, signal: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// A process (not our child, e.g. a stopped sshd session) sent SIGKILL on drop.
pub struct KillOnDrop(pub i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        kill9(self.0);
    }
}

// ---------------------------------------------------------------------------
// Guards
// ---------------------------------------------------------------------------

/// A small tmpfs mounted on a directory; unmounted on drop.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs with mount options `opts` (e.g. `size=1m,noexec`) on `dir`, or
    /// handles the missing prerequisite (see `util::require`).
    pub fn mount(dir: &Path, opts: &str) -> Option<Tmpfs> {
        if !require_root() {
            return None;
        }
        fs::create_dir_all(dir).expect("cannot create the mount point");
        prerequisite(tool("mount", &["-t", "tmpfs", "-o", opts, "tmpfs", s(dir)]).map(|_| Tmpfs(dir.to_path_buf())))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        for _ in 0..20 {
            if tool("umount", &[s(&self.0)]).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = tool("umount", &["-l", s(&self.0)]);
    }
}
