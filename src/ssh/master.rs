//! The master connection every remote command of a run shares: what the user's ssh config
//! resolves to for the host (`ssh -G`), and `ssh -M` started with it.
//!
//! basyn starts the master itself rather than through the `openssh` crate's builder, for
//! one option the builder cannot pass: the cipher order. OpenSSH's default prefers
//! ChaCha20-Poly1305, which costs about three times the CPU of AES-GCM on a processor
//! with AES instructions, and a transfer over ssh is CPU-bound on both ends. So when the
//! config leaves `Ciphers` at OpenSSH's default and this machine has AES instructions,
//! the same ciphers go in an order that puts AES-GCM first; a `Ciphers` line of the
//! user's (or the distribution's) is left exactly as it is.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use openssh::Session;

use super::{CONFIG_ENV, Target, refused};
use crate::link::LinkError;

/// OpenSSH's default cipher lists as `ssh -G` prints them: up to 9.8, and since 9.9
/// (which moved AES-GCM ahead of AES-CTR).
const DEFAULT_CIPHERS: [&str; 2] = [
    "chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr,aes128-gcm@openssh.com,aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com,aes128-gcm@openssh.com,aes256-gcm@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr",
];

/// The same ciphers with AES-GCM first.
const AES_FIRST: &str =
    "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr";

/// How long ssh may take to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Keep-alive probes of the server, so that a dead link is noticed.
const SERVER_ALIVE: Duration = Duration::from_secs(3);
/// If basyn itself is killed, the master goes away on its own once idle this long.
const PERSIST: Duration = Duration::from_secs(5);

/// What the config resolves to for the host, as far as the master's options go.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Resolved {
    /// `StrictHostKeyChecking` for the master (the crate's builder always passed it).
    pub host_keys: &'static str,
    /// A cipher order to pass, if basyn picks one.
    pub ciphers: Option<&'static str>,
}

/// A started master: its session, and what `--verbose` says about its options.
pub(super) struct Master {
    /// The multiplexed session.
    pub session: Session,
    /// The cipher order basyn chose, if it chose one.
    pub ciphers: Option<&'static str>,
}

/// Resolves the config for the target and starts the master connection.
pub(super) async fn open(target: &Target) -> Result<Master, LinkError> {
    let config = std::env::var_os(CONFIG_ENV);
    let mut g = tokio::process::Command::from(ssh_g(target, config.clone()));
    let resolved = match g.output().await {
        Ok(out) if out.status.success() => resolve(&String::from_utf8_lossy(&out.stdout), aes_instructions()),
        // ssh -G failing (a config error) makes the connection fail too, with its words.
        _ => Resolved { host_keys: "yes", ciphers: None },
    };
    let dir = tempfile::Builder::new()
        .prefix(".ssh-connection")
        .tempdir_in(control_dir())
        .map_err(|e| refused(target, format!("cannot create the ssh control directory: {e}")))?;
    let log = dir.path().join("log");
    let mut cmd = tokio::process::Command::from(master_command(target, config, &resolved, dir.path()));
    let status = cmd.status().await.map_err(|e| refused(target, format!("cannot start ssh: {e}")))?;
    if !status.success() {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let why = text.lines().map(str::trim).rfind(|l| !l.is_empty()).map_or_else(
            || match status.code() {
                Some(c) => format!("ssh exited with status {c}"),
                None => "ssh was killed".to_string(),
            },
            str::to_string,
        );
        return Err(refused(target, format!("cannot connect: {why}")));
    }
    Ok(Master { session: Session::new_process_mux(dir), ciphers: resolved.ciphers })
}

/// `ssh -M`: the master, which forks into the background once connected (`-f`), logs to
/// `dir/log` and listens on `dir/master`, where the crate's session finds it.
fn master_command(target: &Target, config: Option<OsString>, resolved: &Resolved, dir: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new("ssh");
    cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    cmd.arg("-E").arg(dir.join("log")).arg("-S").arg(dir.join("master")).args(["-M", "-f", "-N"]);
    let options = [
        format!("ControlPersist={}s", PERSIST.as_secs()),
        "BatchMode=yes".to_string(),
        format!("StrictHostKeyChecking={}", resolved.host_keys),
        format!("ConnectTimeout={}", CONNECT_TIMEOUT.as_secs()),
        format!("ServerAliveInterval={}", SERVER_ALIVE.as_secs()),
    ];
    for o in options.iter().map(String::as_str).chain(resolved.ciphers.map(|c| format!("Ciphers={c}")).as_deref()) {
        cmd.arg("-o").arg(o);
    }
    if let Some(p) = target.port {
        cmd.arg("-p").arg(p.to_string());
    }
    if let Some(u) = &target.user {
        cmd.arg("-l").arg(u);
    }
    if let Some(cfg) = config {
        cmd.arg("-F").arg(cfg);
    }
    cmd.arg(&target.host);
    cmd
}

/// `ssh -G`: prints the configuration ssh would use for the target, without connecting.
pub(super) fn ssh_g(target: &Target, config: Option<OsString>) -> std::process::Command {
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

/// What `ssh -G` output means for the master, on a machine with or without AES
/// instructions.
fn resolve(ssh_g_output: &str, aes: bool) -> Resolved {
    let value = |key: &str| {
        ssh_g_output.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ').map(|v| v.trim().to_string()))
    };
    let host_keys = match value("stricthostkeychecking").map(|v| v.to_ascii_lowercase()).as_deref() {
        Some("accept-new") => "accept-new",
        Some("no" | "false" | "off") => "no",
        // "yes", "ask" (which BatchMode turns into a refusal) and anything unknown: strict.
        _ => "yes",
    };
    let default_ciphers = value("ciphers").is_some_and(|c| DEFAULT_CIPHERS.contains(&c.as_str()));
    Resolved { host_keys, ciphers: (aes && default_ciphers).then_some(AES_FIRST) }
}

/// True if this processor has the instructions that make AES-GCM cheap (AES and
/// carry-less multiplication).
fn aes_instructions() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes") && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// Where the master connection's socket goes: the temp dir, unless its path is so long
/// that the socket path would pass the 108-byte limit of Unix sockets.
pub(super) fn control_dir() -> PathBuf {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ssh::tests::{have, host};
    use std::fs;
    use std::process::Command;

    // --- host keys ----------------------------------------------------------------------

    /// Each `StrictHostKeyChecking` value maps to the option the master gets; unknown ones are strict.
    #[test]
    fn host_keys_map_each_value() {
        let cases = [
            ("accept-new", "accept-new"),
            ("no", "no"),
            ("false", "no"),
            ("off", "no"),
            ("NO", "no"),
            ("yes", "yes"),
            ("true", "yes"),
            ("ask", "yes"),
            ("maybe", "yes"),
        ];
        for (value, want) in cases {
            let out = format!("user root\nstricthostkeychecking {value}\nport 22\n");
            assert_eq!(resolve(&out, true).host_keys, want, "{value}");
        }
        assert_eq!(resolve("", true).host_keys, "yes");
        assert_eq!(resolve("xstricthostkeychecking no\n", true).host_keys, "yes");
    }

    /// `ssh -G` gets the config file, port and user exactly when given.
    #[test]
    fn ssh_g_passes_config_port_and_user_only_when_given() {
        let args = |cmd: std::process::Command| -> Vec<String> {
            assert_eq!(cmd.get_program(), "ssh");
            cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect()
        };
        assert_eq!(args(ssh_g(&host("h"), None)), ["-G", "h"]);
        let t = Target { port: Some(2222), user: Some("alice".into()), ..host("h") };
        assert_eq!(
            args(ssh_g(&t, Some("/etc/cfg".into()))),
            ["-F", "/etc/cfg", "-p", "2222", "-l", "alice", "-G", "h"]
        );
    }

    /// The real `ssh -G` spells the values its own way (`no` becomes `false`); the mapping must follow.
    #[test]
    fn host_keys_follow_the_real_ssh_config() {
        if !have("ssh") {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("config");
        fs::write(
            &cfg,
            "Host add\n  StrictHostKeyChecking accept-new\nHost off\n  StrictHostKeyChecking no\n\
             Host on\n  StrictHostKeyChecking yes\nHost ask\n  StrictHostKeyChecking ask\n",
        )
        .expect("write config");
        for (alias, want) in [("add", "accept-new"), ("off", "no"), ("on", "yes"), ("ask", "yes"), ("other", "yes")] {
            let out = ssh_g(&host(alias), Some(cfg.clone().into())).output().expect("ssh -G");
            assert!(out.status.success(), "{out:?}");
            assert_eq!(resolve(&String::from_utf8_lossy(&out.stdout), true).host_keys, want, "{alias}");
        }
    }

    // --- the control socket's directory -------------------------------------------------------

    /// A temp dir short enough for a socket path is used; otherwise a short runtime dir, else /tmp.
    #[test]
    fn control_dir_in_keeps_socket_paths_short() {
        let run = tempfile::tempdir().expect("tempdir");
        let long_run = run.path().join("r".repeat(60));
        fs::create_dir(&long_run).expect("mkdir");
        let tmp48 = PathBuf::from(format!("/{}", "t".repeat(47)));
        let tmp49 = PathBuf::from(format!("/{}", "t".repeat(48)));
        let xdg = |p: &Path| Some(p.as_os_str().to_os_string());
        assert_eq!(control_dir_in(tmp48.clone(), None), tmp48);
        assert_eq!(control_dir_in(tmp49.clone(), xdg(run.path())), run.path());
        assert_eq!(control_dir_in(tmp49.clone(), None), Path::new("/tmp"));
        assert_eq!(control_dir_in(tmp49.clone(), xdg(&run.path().join("absent"))), Path::new("/tmp"));
        assert_eq!(control_dir_in(tmp49, xdg(&long_run)), Path::new("/tmp"));
    }

    /// Set for a child run of this test binary, which then only prints `control_dir()`.
    const PRINT_CONTROL_DIR: &str = "BASYN_TEST_PRINT_CONTROL_DIR";

    /// `control_dir` reads `TMPDIR` and `XDG_RUNTIME_DIR`: checked in child processes, since
    /// changing this process's environment would race with the other tests.
    #[test]
    fn control_dir_follows_tmpdir_and_xdg_runtime_dir() {
        if std::env::var_os(PRINT_CONTROL_DIR).is_some() {
            println!("control-dir={}", control_dir().display());
            return;
        }
        let run = tempfile::tempdir().expect("tempdir");
        let long = format!("/{}", "t".repeat(60));
        let child = |tmpdir: &str, runtime_dir: Option<&Path>| -> String {
            let exe = std::env::current_exe().expect("test binary");
            let mut cmd = Command::new(exe);
            cmd.args(["--exact", "ssh::master::tests::control_dir_follows_tmpdir_and_xdg_runtime_dir", "--nocapture"])
                .env(PRINT_CONTROL_DIR, "1")
                .env("TMPDIR", tmpdir)
                .env_remove("XDG_RUNTIME_DIR");
            if let Some(r) = runtime_dir {
                cmd.env("XDG_RUNTIME_DIR", r);
            }
            let out = cmd.output().expect("run the test binary");
            assert!(out.status.success(), "{out:?}");
            let stdout = String::from_utf8_lossy(&out.stdout);
            let found = stdout.lines().find_map(|l| l.strip_prefix("control-dir="));
            found.unwrap_or_else(|| panic!("no control-dir line in {stdout}")).to_string()
        };
        assert_eq!(child("/short/tmp", Some(run.path())), "/short/tmp");
        assert_eq!(child(&long, Some(run.path())), run.path().display().to_string());
        assert_eq!(child(&long, None), "/tmp");
    }

    // --- the cipher order --------------------------------------------------------------

    /// OpenSSH's default lists (either version's) become AES-GCM first, with the same
    /// ciphers, only where the CPU has AES instructions; any other list is left alone.
    #[test]
    fn ciphers_are_reordered_only_from_the_default_and_with_aes_instructions() {
        for default in DEFAULT_CIPHERS {
            let out = format!("user root\nciphers {default}\nport 22\n");
            assert_eq!(resolve(&out, true).ciphers, Some(AES_FIRST), "{default}");
            assert_eq!(resolve(&out, false).ciphers, None, "{default}");
            let mut want: Vec<&str> = default.split(',').collect();
            let mut got: Vec<&str> = AES_FIRST.split(',').collect();
            want.sort_unstable();
            got.sort_unstable();
            assert_eq!(got, want, "the same ciphers, in another order");
        }
        for own in ["chacha20-poly1305@openssh.com", "aes256-gcm@openssh.com,aes128-ctr", ""] {
            assert_eq!(resolve(&format!("ciphers {own}\n"), true).ciphers, None, "{own}");
        }
        assert_eq!(resolve("host h\n", true).ciphers, None, "no ciphers line");
    }

    /// The real `ssh -G` prints its default list as one of the known ones, and a `Ciphers`
    /// line in the config as it is (so basyn leaves it alone).
    #[test]
    fn the_real_ssh_prints_a_known_default_cipher_list() {
        if !have("ssh") {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("config");
        fs::write(&cfg, "Host own\n  Ciphers aes256-ctr,chacha20-poly1305@openssh.com\n").expect("write config");
        let g = |alias: &str| {
            let out = ssh_g(&host(alias), Some(cfg.clone().into())).output().expect("ssh -G");
            assert!(out.status.success(), "{out:?}");
            resolve(&String::from_utf8_lossy(&out.stdout), true)
        };
        assert_eq!(g("other").ciphers, Some(AES_FIRST), "this ssh's default list is not a known one");
        assert_eq!(g("own").ciphers, None);
    }

    /// The master gets every option, the cipher order only when chosen, and the host last.
    #[test]
    fn master_command_passes_the_resolved_options() {
        let args = |cmd: std::process::Command| -> Vec<String> {
            assert_eq!(cmd.get_program(), "ssh");
            cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect()
        };
        let t = Target { port: Some(2222), user: Some("alice".into()), ..host("h") };
        let r = Resolved { host_keys: "accept-new", ciphers: Some(AES_FIRST) };
        let got = args(master_command(&t, Some("/etc/cfg".into()), &r, Path::new("/run/x")));
        let want: Vec<String> = [
            "-E",
            "/run/x/log",
            "-S",
            "/run/x/master",
            "-M",
            "-f",
            "-N",
            "-o",
            "ControlPersist=5s",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=accept-new",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "ServerAliveInterval=3",
            "-o",
            &format!("Ciphers={AES_FIRST}"),
            "-p",
            "2222",
            "-l",
            "alice",
            "-F",
            "/etc/cfg",
            "h",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(got, want);
        let plain =
            args(master_command(&host("h"), None, &Resolved { host_keys: "yes", ciphers: None }, Path::new("/d")));
        assert!(!plain.iter().any(|a| a.starts_with("Ciphers")), "{plain:?}");
        assert_eq!(plain.last().map(String::as_str), Some("h"));
    }
}
