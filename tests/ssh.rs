//! basyn over SSH, against a private sshd on 127.0.0.1 (see `sshd/mod.rs`): PUSH and
//! PULL, COPY and SYNC with their traffic, the self-upload and its cache (reuse, tampering,
//! concurrent first runs, noexec or unwritable caches), the remote PATH and
//! `--remote-path`, `-p`/`-u` with config aliases, and every failure the SSH issue lists —
//! unreachable host, authentication, host key, an account that cannot run commands,
//! missing, immutable or full remote devices, the remote endpoint killed, the connection
//! cut or hung, the local side killed or interrupted — each fast, with one clear line on
//! stderr and the documented exit code, and no `basyn serve` left behind.

mod sshd;
mod util;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use sshd::*;
use util::*;

/// A failure must be reported within this time (never a hang).
const FAST: Duration = Duration::from_secs(20);

/// Runs `f` (one basyn run) and asserts that it ended within [`FAST`].
#[track_caller]
fn fast(f: impl FnOnce() -> Run) -> Run {
    let started = Instant::now();
    let run = f();
    let took = started.elapsed();
    assert!(took < FAST, "took {took:.2?}, more than {FAST:?}{run:?}");
    run
}

/// `-l LOCAL -r REMOTE -h testhost` followed by `extra`.
fn over_ssh<'a>(local: &'a Path, remote: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["-l", s(local), "-r", s(remote), "-h", ALIAS];
    v.extend_from_slice(extra);
    v
}

/// A few single bytes spread over an image of `len` bytes, in different buffers.
fn scattered(len: usize) -> [u64; 5] {
    let len = len as u64;
    [0, len / 5 + 123, len / 2 + 4097, len * 4 / 5 + 7, len - 1]
}

/// The files in a directory (empty if it does not exist).
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match fs::read_dir(dir) {
        Ok(rd) => rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

/// Removes a file when dropped.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn sha256_hex(path: &Path) -> String {
    let out = tool("sha256sum", &[s(path)]).unwrap_or_else(|e| panic!("{e}"));
    out.split_whitespace().next().expect("sha256sum printed nothing").to_string()
}

// ---------------------------------------------------------------------------
// PUSH and PULL, COPY and SYNC
// ---------------------------------------------------------------------------

#[test]
fn push_copy_then_sync_sends_only_the_changes() {
    let Some(sshd) = Sshd::start() else { return };
    let size = 32 * MIB;
    let (local, remote) = (sshd.local("src.img"), sshd.remote("dst.img"));
    random_image(&local, 1, size);

    // COPY to a remote file that does not exist yet: it is created at the source's size.
    let run = sshd.basyn(&over_ssh(&local, &remote, &["-a", "PUSH", "-m", "COPY", "--recheck", "--stat"]));
    run.ok();
    assert_same(&local, &remote);
    let t = run.stat();
    assert!(t.tx >= size as u64, "a COPY of random data sends at least the image: {t:?}{run:?}");

    // Scattered changes on both sides; SYNC with chunks sends about the changed chunks.
    for at in scattered(size) {
        flip(&local, at, 1);
    }
    flip(&remote, (size / 3) as u64, 1);
    flip(&remote, (size * 2 / 3) as u64 + 5000, 1);
    let run =
        sshd.basyn(&over_ssh(&local, &remote, &["-a", "push", "-m", "sync", "--chunk", "16", "--recheck", "--stat"]));
    run.ok();
    assert_same(&local, &remote);
    let t = run.stat();
    assert!(t.both < (size / 20) as u64, "7 changed bytes in {size} bytes cost {t:?}{run:?}");

    // Nothing changed: only digests travel.
    let run = sshd.basyn(&over_ssh(&local, &remote, &["-a", "PUSH", "-m", "SYNC", "--stat"]));
    run.ok();
    let t = run.stat();
    assert!(t.both < 64 * KIB as u64, "an unchanged SYNC cost {t:?}{run:?}");

    // A check without an action: identical gives 0, a difference gives 3 and changes nothing.
    sshd.basyn(&over_ssh(&local, &remote, &["--recheck"])).ok();
    flip(&remote, 12345, 1);
    let before = read(&remote);
    sshd.basyn(&over_ssh(&local, &remote, &["--recheck"])).fails(3, &["differ"]);
    assert_eq!(read(&remote), before, "a check without an action must not write");

    // Every run closed its ssh master and removed its control socket.
    assert!(poll(Duration::from_secs(3), || sshd.ssh_clients().is_empty()), "ssh processes outlived basyn");
    assert!(entries(&sshd.tmp()).is_empty(), "control sockets left behind: {:?}", entries(&sshd.tmp()));
}

#[test]
fn pull_copy_then_sync_sends_only_the_changes() {
    let Some(sshd) = Sshd::start() else { return };
    let size = 24 * MIB;
    let (local, remote) = (sshd.local("copy.img"), sshd.remote("origin.img"));
    random_image(&remote, 2, size);

    // COPY into a local file that does not exist yet.
    let run =
        sshd.basyn(&over_ssh(&local, &remote, &["-a", "PULL", "-m", "COPY", "--chunk", "16", "--recheck", "--stat"]));
    run.ok();
    assert_same(&remote, &local);
    let t = run.stat();
    assert!(t.rx >= size as u64, "a COPY of random data receives at least the image: {t:?}{run:?}");

    for at in scattered(size) {
        flip(&remote, at, 1);
    }
    flip(&local, 777_777, 1);
    let run =
        sshd.basyn(&over_ssh(&local, &remote, &["-a", "pull", "-m", "sync", "--chunk", "16", "--recheck", "--stat"]));
    run.ok();
    assert_same(&remote, &local);
    let t = run.stat();
    assert!(t.both < (size / 20) as u64, "6 changed bytes in {size} bytes cost {t:?}{run:?}");

    // SYNC without --chunk after one more change still ends identical.
    flip(&remote, (size / 2) as u64, 3);
    sshd.basyn(&over_ssh(&local, &remote, &["-a", "PULL", "-m", "SYNC", "--recheck"])).ok();
    assert_same(&remote, &local);
}

// ---------------------------------------------------------------------------
// The remote binary: upload, cache, remote PATH, --remote-path
// ---------------------------------------------------------------------------

#[test]
fn self_upload_lands_once_in_the_cache_and_is_reused() {
    let Some(sshd) = Sshd::start() else { return };
    let (local, remote) = (sshd.local("a.img"), sshd.remote("b.img"));
    random_image(&local, 3, 3 * MIB);
    let cache = sshd.upload_dir();
    assert!(entries(&cache).is_empty(), "the cache starts empty");

    let run = sshd.basyn(&over_ssh(&local, &remote, &["-a", "PUSH", "-m", "COPY", "--verbose"]));
    run.ok();
    assert_same(&local, &remote);
    assert!(run.stdout.contains("uploaded"), "--verbose should say that basyn was uploaded{run:?}");

    let exe = Path::new(env!("CARGO_BIN_EXE_basyn"));
    let expected = format!("basyn-{}-{}", env!("CARGO_PKG_VERSION"), &sha256_hex(exe)[..16]);
    assert_eq!(entries(&cache), vec![expected.clone()], "exactly the uploaded binary, no temp file left{run:?}");
    let uploaded = cache.join(&expected);
    assert!(is_executable(&uploaded), "{} is not executable", uploaded.display());
    assert!(read(&uploaded) == read(exe), "{} is not byte-identical to {}", uploaded.display(), exe.display());
    let mtime = fs::metadata(&uploaded).unwrap().modified().unwrap();

    random_image(&local, 4, 3 * MIB);
    let run = sshd.basyn(&over_ssh(&local, &remote, &["-a", "PUSH", "-m", "SYNC", "--verbose"]));
    run.ok();
    assert_same(&local, &remote);
    assert!(run.stdout.contains("reusing"), "the second run should reuse the upload{run:?}");
    assert!(!run.stdout.contains("uploaded basyn to"), "the second run uploaded again{run:?}");
    assert_eq!(entries(&cache), vec![expected], "the cache changed on reuse{run:?}");
    assert_eq!(fs::metadata(&uploaded).unwrap().modified().unwrap(), mtime, "the cached binary was rewritten");
}

#[test]
fn tampered_cached_upload_is_replaced() {
    let Some(sshd) = Sshd::start() else { return };
    let (local, remote) = (sshd.local("a.img"), sshd.remote("b.img"));
    random_image(&local, 19, MIB);
    sshd.basyn(&over_ssh(&local, &remote, &["-a", "PUSH", "-m", "COPY"])).ok();
    let names = entries(&sshd.upload_dir());
    assert_eq!(names.len(), 1, "one upload expected: {names:?}");
    let cached = sshd.upload_dir().join(&names[0]);

    // Same name, executable, answers the protocol like basyn does, but is not this binary.
    let exe = env!("CARGO_BIN_EXE_basyn");
    let protocol = basyn(&["protocol"]);
    protocol.ok();
    write_script(&cached, &format!("#!/bin/sh\necho '{}'\n", protocol.stdout.trim()));
    random_image(&local, 20, MIB);
    let run = sshd.basyn(&over_ssh(&local, &remote, &["-a", "PUSH", "-m", "SYNC", "--verbose"]));
    run.ok();
    assert_same(&local, &remote);
    assert!(!run.stdout.contains("reusing"), "a cached file with the wrong hash was reused{run:?}");
    assert_eq!(entries(&sshd.upload_dir()), names, "the upload should replace the tampered file{run:?}");
    assert!(read(&cached) == read(Path::new(exe)), "the cached binary was not replaced");
}

#[test]
fn concurrent_first_runs_share_one_upload() {
    let Some(sshd) = Sshd::start() else { return };
    let pairs: Vec<_> = (0..3).map(|i| (sshd.local(&format!("{i}.img")), sshd.remote(&format!("{i}.img")))).collect();
    for (i, (local, _)) in pairs.iter().enumerate() {
        random_image(local, 30 + i as u64, MIB);
    }
    let runs: Vec<Run> = std::thread::scope(|scope| {
        let handles: Vec<_> = pairs
            .iter()
            .map(|(local, remote)| {
                let sshd = &sshd;
                scope.spawn(move || sshd.basyn(&over_ssh(local, remote, &["-a", "PUSH", "-m", "COPY"])))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (run, (local, remote)) in runs.iter().zip(&pairs) {
        run.ok();
        assert_same(local, remote);
    }
    let names = entries(&sshd.upload_dir());
    assert_eq!(names.len(), 1, "concurrent uploads should leave one binary and no temp files: {names:?}");
    let exe = Path::new(env!("CARGO_BIN_EXE_basyn"));
    assert!(read(&sshd.upload_dir().join(&names[0])) == read(exe), "the cached binary is not this basyn");
}

#[test]
fn upload_to_a_noexec_cache_says_how_to_get_out() {
    let Some(sshd) = Sshd::start() else { return };
    let Some(_tmpfs) = Tmpfs::mount(&sshd.path("cache"), "size=512m,noexec") else { return };
    let (local, remote) = (sshd.local("a.img"), sshd.remote("b.img"));
    random_image(&local, 21, MIB);
    let run = fast(|| sshd.basyn(&over_ssh(&local, &remote, &["-a", "PUSH", "-m", "COPY"])));
    run.fails(1, &[ALIAS, "cannot run", "--remote-path"]);
    assert!(!remote.exists(), "nothing may be created when no basyn can run remotely");
}

#[test]
fn unwritable_upload_cache_is_reported() {
    let Some(sshd) = Sshd::start() else { return };
    // $XDG_CACHE_HOME is a file, so the cache directory cannot be made.
    sshd.write_file("cache", "not a directory\n");
    let (local, remote) = (sshd.local("a.img"), sshd.remote("b.img"));
    random_image(&local, 22, MIB);
    let run = fast(|| sshd.basyn(&over_ssh(&local, &remote, &["-a", "PUSH", "-m", "COPY"])));
    run.fails(1, &[ALIAS, "upload"]);
    assert!(!remote.exists(), "nothing may be created when the upload fails");
}

#[test]
fn self_upload_without_xdg_cache_home_goes_to_home_dot_cache() {
    let Some(sshd) = Sshd::start_with(Options { no_xdg_cache: true, ..Options::default() }) else { return };
    let (local, remote) = (sshd.local("a.img"), sshd.remote("b.img"));
    random_image(&local, 5, MIB);
    sshd.basyn(&over_ssh(&local, &remote, &["-a", "PUSH", "-m", "COPY"])).ok();
    assert_same(&local, &remote);
    let names = entries(&sshd.home().join(".cache/basyn"));
    assert!(names.len() == 1 && names[0].starts_with("basyn-"), "expected one upload in $HOME/.cache/basyn: {names:?}");
    assert!(entries(&sshd.upload_dir()).is_empty());
}

#[test]
fn basyn_on_the_remote_path_is_used_without_upload() {
    let Some(sshd) = Sshd::start_with(Options { bin_on_path: true, ..Options::default() }) else { return };
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_basyn"), sshd.bin_dir().join("basyn")).unwrap();
    let (local, remote) = (sshd.local("a.img"), sshd.remote("b.img"));
    random_image(&local, 6, 2 * MIB);
    let run = sshd.basyn(&over_ssh(&local, &remote, &["-a", "PUSH", "-m", "COPY", "--verbose"]));
    run.ok();
    assert_same(&local, &remote);
    assert!(run.stdout.contains("remote PATH"), "--verbose should say basyn came from the remote PATH{run:?}");
    assert!(!run.stdout.contains("upload"), "nothing should be uploaded{run:?}");
    assert!(entries(&sshd.upload_dir()).is_empty(), "nothing should be uploaded: {:?}", entries(&sshd.upload_dir()));
}

#[test]
fn basyn_on_the_remote_path_with_another_protocol_is_replaced_by_an_upload() {
    let Some(sshd) = Sshd::start_with(Options { bin_on_path: true, ..Options::default() }) else { return };
    write_script(&sshd.bin_dir().join("basyn"), "#!/bin/sh\necho 'basyn-protocol 9999'\nexit 0\n");
    let (local, remote) = (sshd.local("a.img"), sshd.remote("b.img"));
    random_image(&local, 7, MIB);
    let run = sshd.basyn(&over_ssh(&local, &remote, &["-a", "PUSH", "-m", "COPY", "--verbose"]));
    run.ok();
    assert_same(&local, &remote);
    assert!(run.stdout.contains("protocol"), "--verbose should say why the PATH basyn is not used{run:?}");
    assert_eq!(entries(&sshd.upload_dir()).len(), 1, "the running basyn should be uploaded{run:?}");
}

#[test]
fn remote_path_option_is_used_and_checked() {
    let Some(sshd) = Sshd::start() else { return };
    let (local, remote) = (sshd.local("a.img"), sshd.remote("b.img"));
    random_image(&local, 8, 2 * MIB);
    let exe = env!("CARGO_BIN_EXE_basyn");

    let run = sshd.basyn(&over_ssh(&local, &remote, &["-a", "PUSH", "-m", "COPY", "--remote-path", exe, "--verbose"]));
    run.ok();
    assert_same(&local, &remote);
    assert!(entries(&sshd.upload_dir()).is_empty(), "--remote-path must not upload{run:?}");

    let run = fast(|| {
        sshd.basyn(&over_ssh(&local, &remote, &["-a", "PUSH", "-m", "SYNC", "--remote-path", "/nonexistent/basyn"]))
    });
    run.fails(1, &["--remote-path", "/nonexistent/basyn"]);

    let other = sshd.path("old-basyn");
    write_script(&other, "#!/bin/sh\necho 'basyn-protocol 9999'\n");
    let run =
        fast(|| sshd.basyn(&over_ssh(&local, &remote, &["-a", "PUSH", "-m", "SYNC", "--remote-path", s(&other)])));
    run.fails(1, &["--remote-path", s(&other), "protocol"]);
    assert!(entries(&sshd.upload_dir()).is_empty(), "a refused --remote-path must not upload{run:?}");
}

// ---------------------------------------------------------------------------
// Connecting: config aliases, -p and -u
// ---------------------------------------------------------------------------

#[test]
fn port_and_user_options_are_passed_to_ssh() {
    let Some(sshd) = Sshd::start() else { return };
    // Identity and known_hosts for 127.0.0.1, but neither Port nor User.
    let config = sshd.write_file(
        "ssh_config_ip",
        &ssh_config_for("127.0.0.1", None, None, s(&sshd.user_key()), s(&sshd.known_hosts())),
    );
    let (local, remote) = (sshd.local("a.img"), sshd.remote("b.img"));
    random_image(&local, 9, 2 * MIB);
    let port = sshd.port.to_string();
    let args = |extra: &[&'static str]| {
        let mut v = vec!["-l", s(&local), "-r", s(&remote), "-h", "127.0.0.1", "-a", "PUSH", "-m", "COPY"];
        v.extend_from_slice(extra);
        v
    };

    let mut with_port = args(&["-u", "root"]);
    with_port.extend(["-p", port.as_str()]);
    sshd.basyn_with(&config, &with_port).ok();
    assert_same(&local, &remote);

    // -p wins over the config's Port.
    let closed = free_port().to_string();
    let run = fast(|| sshd.basyn(&over_ssh(&local, &remote, &["-p", &closed, "-a", "PUSH", "-m", "SYNC"])));
    run.fails(1, &[ALIAS, "connect"]);

    // Without -p the config says nothing, so ssh tries port 22: not our sshd.
    let run = fast(|| sshd.basyn_with(&config, &args(&["-u", "root"])));
    run.fails(1, &["127.0.0.1"]);

    // -u reaches ssh: a user whose authorized_keys do not hold our key is refused.
    let mut wrong_user = args(&["-u", "nobody"]);
    wrong_user.extend(["-p", port.as_str()]);
    let run = fast(|| sshd.basyn_with(&config, &wrong_user));
    run.fails(1, &["127.0.0.1", "Permission denied"]);
}

/// An account whose shell refuses to run commands (nologin) must be reported as that,
/// not as a foreign architecture made of the shell's complaint.
#[test]
fn remote_account_that_cannot_run_commands_is_reported_as_such() {
    let Some(sshd) = Sshd::start() else { return };
    let nologin = fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("nobody:") && (l.ends_with("/nologin") || l.ends_with("/false")));
    if !nologin {
        eprintln!("skipped: no user nobody with a nologin shell");
        return;
    }
    sshd.authorize("nobody");
    let (local, remote) = (sshd.local("a.img"), sshd.remote("b.img"));
    random_image(&local, 18, MIB);
    let run = fast(|| sshd.basyn(&over_ssh(&local, &remote, &["-u", "nobody", "-a", "PUSH", "-m", "COPY"])));
    let line = run.fails(1, &[ALIAS, "not available"]);
    assert!(!line.contains("the host is This account"), "the nologin message is taken for an architecture{run:?}");
    assert!(!remote.exists(), "nothing may be created");
}

// ---------------------------------------------------------------------------
// Failing well
// ---------------------------------------------------------------------------

#[test]
fn unreachable_host_fails_fast() {
    let Some(sshd) = Sshd::start() else { return };
    let closed = free_port().to_string();
    let config = sshd.write_file(
        "ssh_config_ip",
        &ssh_config_for("127.0.0.1", None, Some("root"), s(&sshd.user_key()), s(&sshd.known_hosts())),
    );
    let (local, remote) = (sshd.local("a.img"), sshd.remote("b.img"));
    random_image(&local, 10, MIB);
    let args = ["-l", s(&local), "-r", s(&remote), "-h", "127.0.0.1", "-p", &closed, "-a", "PUSH", "-m", "COPY"];
    let run = fast(|| sshd.basyn_with(&config, &args));
    run.fails(1, &["127.0.0.1", "connect"]);
    assert!(!remote.exists(), "nothing may be created when the host is unreachable");
}

#[test]
fn authentication_failure_fails_fast() {
    let Some(sshd) = Sshd::start() else { return };
    let stranger = sshd.path("strangerkey");
    keygen(&stranger);
    let config = sshd.write_file(
        "ssh_config_stranger",
        &ssh_config_for(ALIAS, Some(sshd.port), Some("root"), s(&stranger), s(&sshd.known_hosts())),
    );
    let (local, remote) = (sshd.local("a.img"), sshd.remote("b.img"));
    random_image(&local, 11, MIB);
    let run = fast(|| sshd.basyn_with(&config, &over_ssh(&local, &remote, &["-a", "PUSH", "-m", "COPY"])));
    run.fails(1, &[ALIAS, "Permission denied"]);
    assert!(!remote.exists(), "nothing may be created when authentication fails");
}

#[test]
fn host_key_mismatch_fails_fast_without_prompting() {
    let Some(sshd) = Sshd::start() else { return };
    let impostor = sshd.path("impostorkey");
    keygen(&impostor);
    let impostor_pub = fs::read_to_string(sshd.path("impostorkey.pub")).unwrap();
    let known = sshd.write_file("known_hosts_wrong", &format!("[127.0.0.1]:{} {}", sshd.port, impostor_pub.trim()));
    let config = sshd.write_file(
        "ssh_config_wrong_key",
        &ssh_config_for(ALIAS, Some(sshd.port), Some("root"), s(&sshd.user_key()), s(&known)),
    );
    let (local, remote) = (sshd.local("a.img"), sshd.remote("b.img"));
    random_image(&local, 12, MIB);
    let run = fast(|| sshd.basyn_with(&config, &over_ssh(&local, &remote, &["-a", "PUSH", "-m", "COPY"])));
    run.fails(1, &[ALIAS, "Host key"]);
    assert!(!remote.exists(), "nothing may be created when the host key does not match");
}

#[test]
fn missing_remote_device_is_named() {
    let Some(sshd) = Sshd::start() else { return };
    let (local, remote) = (sshd.local("a.img"), sshd.remote("missing.img"));
    let run = fast(|| sshd.basyn(&over_ssh(&local, &remote, &["-a", "PULL", "-m", "COPY"])));
    run.fails(1, &["remote", s(&remote), "no such file"]);
    assert!(!local.exists(), "the local receiver must not be created when the remote source is missing");

    // Without an action basyn only checks that both devices exist.
    random_image(&local, 13, MIB);
    fast(|| sshd.basyn(&over_ssh(&local, &remote, &[]))).fails(1, &["remote", s(&remote), "no such file"]);
    random_image(&remote, 13, MIB);
    sshd.basyn(&over_ssh(&local, &remote, &[])).ok();

    // PUSH into a directory that does not exist on the remote.
    let remote = sshd.remote("no-such-dir/b.img");
    let run = fast(|| sshd.basyn(&over_ssh(&local, &remote, &["-a", "PUSH", "-m", "COPY"])));
    run.fails(1, &["remote", s(&remote)]);
}

#[test]
fn unwritable_remote_receiver_is_refused_and_untouched() {
    let Some(sshd) = Sshd::start() else { return };
    let (local, remote) = (sshd.local("a.img"), sshd.remote("b.img"));
    random_image(&local, 14, 2 * MIB);
    let old = random_image(&remote, 15, 2 * MIB);
    let Some(_immutable) = immutable(&remote) else { return };
    let run = fast(|| sshd.basyn(&over_ssh(&local, &remote, &["-a", "PUSH", "-m", "COPY"])));
    run.fails(1, &["remote", s(&remote), "not permitted"]);
    assert!(read(&remote) == old, "the immutable remote receiver changed");
}

#[test]
fn full_remote_disk_is_a_transfer_error() {
    let Some(sshd) = Sshd::start() else { return };
    let Some(_tmpfs) = Tmpfs::mount(&sshd.remote("small"), "size=1m") else { return };
    let (local, remote) = (sshd.local("a.img"), sshd.remote("small/b.img"));
    random_image(&local, 16, 8 * MIB);
    // A sparse receiver of the right size on a 1 MiB file system: writes run out of space.
    fs::File::create(&remote).unwrap().set_len(8 * MIB as u64).unwrap();
    let run = fast(|| sshd.basyn(&over_ssh(&local, &remote, &["-a", "PUSH", "-m", "COPY"])));
    run.fails(2, &["remote", s(&remote), "no space", "may be partly changed"]);
    assert!(!same_stream(&local, &remote), "the copy that ran out of space claims to be complete{run:?}");
    // Room made: the same devices synced again (with whatever states the failed run left)
    // end identical.
    tool("mount", &["-o", "remount,size=16m", s(&sshd.remote("small"))]).unwrap_or_else(|e| panic!("{e}"));
    sshd.basyn(&over_ssh(&local, &remote, &["-a", "PUSH", "-m", "SYNC"])).ok();
    assert_same(&local, &remote);
}

// ---------------------------------------------------------------------------
// Dying mid-run
// ---------------------------------------------------------------------------

/// Waits until the remote `basyn serve` of `remote` runs; returns its pids.
#[track_caller]
fn wait_for_serve(child: &mut Running, remote: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    let found = poll(Duration::from_secs(30), || {
        pids = serve_pids(remote);
        !pids.is_empty() || !child.running()
    });
    let err = child.stderr_so_far();
    assert!(found && !pids.is_empty(), "the remote basyn serve never appeared; basyn stderr: {err}");
    pids
}

/// Data that must reach the receiver before a test cuts into a transfer.
const LANDED: u64 = 4 * MIB as u64;

/// Waits until [`LANDED`] more bytes have been written to the receiver of a transfer in
/// `dir` ("PUSH": by the remote `basyn serve`, whose pids are `serve`; "PULL": by basyn
/// itself), or until basyn has ended: once this returns with basyn still running, the
/// transfer is under way and the receiver really is partly written.
fn wait_for_data(child: &mut Running, serve: &[i32], dir: &str, tag: &str) {
    let writers: Vec<u32> = match dir {
        "PUSH" => serve.iter().map(|&pid| pid as u32).collect(),
        _ => vec![child.pid()],
    };
    let written = || writers.iter().map(|&pid| io_counter(pid, "wchar")).sum::<u64>();
    let before = written();
    let what = format!("{tag}: {} MiB written to the receiver, or basyn's end", LANDED / MIB as u64);
    wait_until(Duration::from_secs(30), &what, || !child.running() || written() >= before + LANDED);
}

/// Waits up to `limit` for a background basyn to end; returns its exit code, the time
/// since `since`, and its stderr.
fn wait_end(mut child: Running, tag: &str, since: Instant, limit: Duration) -> (i32, Duration, String) {
    let ended = poll(limit, || !child.running());
    let took = since.elapsed();
    if !ended {
        let err = child.stderr_so_far();
        println!("{tag}: basyn still runs {took:.2?} after the failure; stderr: {err:?}");
        panic!("{tag}: basyn still runs {limit:?} after the failure; stderr: {err:?}");
    }
    let run = child.finish();
    println!("{tag}: basyn ended {took:.2?} after the failure; stderr: {:?}", run.stderr);
    (run.code, took, run.stderr)
}

/// Asserts a transfer error: exit 2 and one line on stderr holding every fragment.
#[track_caller]
fn assert_transfer_error(tag: &str, code: i32, err: &str, fragments: &[&str]) {
    assert_eq!(code, 2, "{tag}: exit code; stderr: {err:?}");
    let line = err.strip_suffix('\n').unwrap_or(err);
    assert!(!line.is_empty() && !line.contains('\n'), "{tag}: expected one line on stderr: {err:?}");
    for f in fragments {
        assert!(line.contains(f), "{tag}: stderr lacks {f:?}: {err:?}");
    }
}

#[test]
fn connection_dying_mid_run_is_exit_2_and_a_rerun_repairs() {
    let Some(sshd) = Sshd::start() else { return };
    let size = 300 * MIB;
    let (local, remote) = (sshd.local("big.img"), sshd.remote("big.img"));
    urandom_image(&local, size);
    let partly = "may be partly changed";

    // 1. The remote endpoint is killed during a PUSH.
    let tag = "remote-killed";
    let mut child = sshd.spawn(&over_ssh(&local, &remote, &["-a", "PUSH", "-m", "COPY", "--buffer", "1024"]));
    let pids = wait_for_serve(&mut child, &remote);
    // Let some data land first, so the receiver really is partly written.
    wait_for_data(&mut child, &pids, "PUSH", tag);
    assert!(child.running(), "{tag}: the copy ended before the kill; make the image bigger");
    let failed = Instant::now();
    pids.iter().for_each(|&pid| kill9(pid));
    let (code, took, err) = wait_end(child, tag, failed, Duration::from_secs(10));
    assert_transfer_error(tag, code, &err, &[partly, "remote", s(&remote), "connection"]);
    assert!(took < Duration::from_secs(5), "{tag}: {took:.2?} to notice the dead endpoint");
    sshd.basyn(&over_ssh(&local, &remote, &["-a", "PUSH", "-m", "SYNC"])).ok();
    assert_same(&local, &remote);

    // 2. The ssh connection is cut (its server process killed) during a PULL; the
    // remote changed at its end, which the interrupted copy never reached.
    flip(&remote, (size - 1000) as u64, 10);
    let tag = "connection-cut";
    let mut child = sshd.spawn(&over_ssh(&local, &remote, &["-a", "PULL", "-m", "COPY", "--buffer", "1024"]));
    let pids = wait_for_serve(&mut child, &remote);
    wait_for_data(&mut child, &pids, "PULL", tag);
    assert!(child.running(), "{tag}: the copy ended before the cut; make the image bigger");
    let server = sshd_ancestor(pids[0]).expect("no sshd above the remote basyn serve");
    let failed = Instant::now();
    kill9(server);
    let (code, took, err) = wait_end(child, tag, failed, Duration::from_secs(10));
    assert_transfer_error(tag, code, &err, &[partly, "local", s(&local), "connection"]);
    assert!(took < Duration::from_secs(5), "{tag}: {took:.2?} to notice the cut connection");
    assert!(
        poll(Duration::from_secs(6), || serve_pids(&remote).is_empty()),
        "{tag}: basyn serve outlived the connection"
    );
    sshd.basyn(&over_ssh(&local, &remote, &["-a", "PULL", "-m", "SYNC"])).ok();
    assert_same(&local, &remote);

    // 3. The connection hangs (its server process stopped): keepalives must end the run.
    flip(&local, (size - 1000) as u64, 10);
    let tag = "connection-hung";
    let mut child = sshd.spawn(&over_ssh(&local, &remote, &["-a", "PUSH", "-m", "COPY", "--buffer", "1024"]));
    let pids = wait_for_serve(&mut child, &remote);
    wait_for_data(&mut child, &pids, "PUSH", tag);
    assert!(child.running(), "{tag}: the copy ended before the hang; make the image bigger");
    let server = sshd_ancestor(pids[0]).expect("no sshd above the remote basyn serve");
    let stopped = KillOnDrop(server);
    let failed = Instant::now();
    send_signal(server, libc::SIGSTOP);
    let (code, _, err) = wait_end(child, tag, failed, FAST);
    assert_transfer_error(tag, code, &err, &[partly, "remote", s(&remote), "connection"]);
    // The stopped server cannot pass the end of the session on; once it dies, neither
    // may the endpoint behind it live on.
    drop(stopped);
    assert!(
        poll(Duration::from_secs(6), || serve_pids(&remote).is_empty()),
        "{tag}: basyn serve outlived the connection"
    );
    sshd.basyn(&over_ssh(&local, &remote, &["-a", "PUSH", "-m", "SYNC"])).ok();
    assert_same(&local, &remote);
}

#[test]
fn local_basyn_killed_or_interrupted_mid_run_leaves_no_serve_behind() {
    let Some(sshd) = Sshd::start() else { return };
    let size = 300 * MIB;
    let (local, remote) = (sshd.local("big.img"), sshd.remote("big.img"));
    urandom_image(&local, size);

    let cases = [
        ("PUSH", libc::SIGKILL, "push-kill"),
        ("PULL", libc::SIGKILL, "pull-kill"),
        ("PUSH", libc::SIGINT, "push-int"),
        ("PULL", libc::SIGTERM, "pull-term"),
    ];
    for (dir, signal, tag) in cases {
        let args = over_ssh(&local, &remote, &["-a", dir, "-m", "COPY", "--buffer", "1024"]);
        let mut child = sshd.spawn(&args);
        let pids = wait_for_serve(&mut child, &remote);
        wait_for_data(&mut child, &pids, dir, tag);
        let still_running = child.running();
        assert!(still_running, "{tag}: the {dir} finished before the signal; make the image bigger");
        let signalled = Instant::now();
        send_signal(child.pid() as i32, signal);
        let exited = poll(Duration::from_secs(10), || !child.running());
        assert!(exited, "{tag}: basyn did not end on signal {signal}");
        let gone = poll(Duration::from_secs(6), || serve_pids(&remote).is_empty());
        let err = child.stderr_so_far();
        println!("{tag}: no serve left after {:.2?}; basyn stderr: {err:?}", signalled.elapsed());
        assert!(gone, "{tag}: basyn serve {} outlived basyn: {:?}", remote.display(), serve_pids(&remote));
    }
}

// ---------------------------------------------------------------------------
// Remote stderr
// ---------------------------------------------------------------------------

#[test]
fn remote_stderr_reaches_the_user_prefixed_with_the_host() {
    let Some(sshd) = Sshd::start() else { return };
    let wrapper = sshd.path("chatty-basyn");
    write_script(
        &wrapper,
        &format!("#!/bin/sh\necho hello-from-remote >&2\nexec {} \"$@\"\n", env!("CARGO_BIN_EXE_basyn")),
    );
    let (local, remote) = (sshd.local("a.img"), sshd.remote("b.img"));
    random_image(&local, 17, MIB);
    let run = sshd.basyn(&over_ssh(&local, &remote, &["-a", "PUSH", "-m", "COPY", "--remote-path", s(&wrapper)]));
    run.ok();
    assert_same(&local, &remote);
    assert!(run.stderr.contains(&format!("{ALIAS}: hello-from-remote")), "remote stderr not relayed{run:?}");
}

#[test]
fn remote_endpoint_failing_at_start_shows_its_stderr() {
    let Some(sshd) = Sshd::start() else { return };
    let wrapper = sshd.path("failing-basyn");
    let exe = env!("CARGO_BIN_EXE_basyn");
    write_script(
        &wrapper,
        &format!("#!/bin/sh\nif [ \"$1\" = serve ]; then echo boom-from-remote >&2; exit 7; fi\nexec {exe} \"$@\"\n"),
    );
    let (local, remote) = (sshd.local("a.img"), sshd.remote("b.img"));
    random_image(&local, 23, MIB);
    // Several times: the relayed line must not race with basyn's exit.
    let runs: Vec<Run> = (0..5)
        .map(|_| {
            fast(|| sshd.basyn(&over_ssh(&local, &remote, &["-a", "PUSH", "-m", "COPY", "--remote-path", s(&wrapper)])))
        })
        .collect();
    for run in &runs {
        run.code(1);
        assert!(run.stderr.contains(&format!("{ALIAS}: boom-from-remote")), "remote stderr not relayed{run:?}");
        assert!(!remote.exists(), "nothing may be created when the endpoint does not start");
    }
    // basyn's own line comes last and says where the failure was.
    let run = &runs[0];
    let last = run.stderr.lines().last().unwrap_or("");
    assert!(last.starts_with("basyn: "), "the error line should come last{run:?}");
    assert!(last.contains(ALIAS) || last.contains(s(&remote)), "the error names neither host nor device{run:?}");
}

// ---------------------------------------------------------------------------
// Paths, compression, environment
// ---------------------------------------------------------------------------

#[test]
fn remote_paths_with_shell_characters_are_passed_verbatim() {
    let Some(sshd) = Sshd::start() else { return };
    let name = "it's a $HOME `id` ;x* \\ name.img";
    let (local, remote) = (sshd.local(name), sshd.remote(name));
    random_image(&local, 24, 2 * MIB);
    sshd.basyn(&over_ssh(&local, &remote, &["-a", "PUSH", "-m", "COPY"])).ok();
    assert_same(&local, &remote);
    // The file itself, and nothing under a mangled name (a state file may sit beside it).
    let names = entries(&sshd.path("remote"));
    assert!(names.iter().any(|n| n == name), "the remote file has another name: {names:?}");
    assert!(names.iter().all(|n| n.starts_with(name)), "a file under a mangled name: {names:?}");
    flip(&remote, 4096, 1);
    sshd.basyn(&over_ssh(&local, &remote, &["-a", "PULL", "-m", "SYNC", "--recheck"])).ok();
    assert_same(&local, &remote);
}

#[test]
fn compression_over_ssh_is_zstd_by_default_and_can_be_chosen() {
    let Some(sshd) = Sshd::start() else { return };
    let size = 8 * MIB;
    let local = sshd.local("text.img");
    write(&local, &compressible_data(size));
    let cases: [(&str, &[&str], bool); 3] = [
        ("default", &[], true),
        ("zlib", &["--compress", "zlib", "--zlevel", "9"], true),
        ("none", &["--zlevel", "0"], false),
    ];
    for (what, opts, compressed) in cases {
        let remote = sshd.remote(&format!("{what}.img"));
        let mut args = over_ssh(&local, &remote, &["-a", "PUSH", "-m", "COPY", "--stat"]);
        args.extend_from_slice(opts);
        let run = sshd.basyn(&args);
        run.ok();
        assert_same(&local, &remote);
        let t = run.stat();
        if compressed {
            assert!(t.tx < (size / 10) as u64, "{what}: compressible data sent as {t:?}{run:?}");
        } else {
            assert!(t.tx >= size as u64, "{what}: --zlevel 0 must send raw data, sent {t:?}{run:?}");
        }
    }
}

/// ssh's control socket lives under `TMPDIR`; a long `TMPDIR` (a deep per-job temp dir on
/// a CI runner or build farm) must not make every SSH run fail with "too long for Unix
/// domain socket".
#[test]
fn long_tmpdir_does_not_break_ssh() {
    let Some(sshd) = Sshd::start() else { return };
    let mut long = sshd.tmp();
    while long.as_os_str().len() < 100 {
        long.push("a-rather-long-temporary-directory");
    }
    fs::create_dir_all(&long).unwrap();
    let (local, remote) = (sshd.local("a.img"), sshd.remote("b.img"));
    random_image(&local, 25, MIB);
    let args = over_ssh(&local, &remote, &["-a", "PUSH", "-m", "COPY"]);
    let mut cmd = sshd.command(&sshd.client_config(), &args);
    cmd.env("TMPDIR", &long);
    spawn(cmd, &args).finish().ok();
    assert_same(&local, &remote);
}

// ---------------------------------------------------------------------------
// State files over SSH
// ---------------------------------------------------------------------------

#[test]
fn states_over_ssh_spare_reads_and_basyn_index_runs_on_the_remote_host() {
    let Some(sshd) = Sshd::start() else { return };
    let size = 16 * MIB;
    let (local, remote) = (sshd.local("src.img"), sshd.remote("dst.img"));
    random_image(&local, 41, size);

    // COPY builds both states: the remote one in the remote host's state directory.
    sshd.basyn(&over_ssh(&local, &remote, &["-a", "push", "-m", "copy"])).ok();
    let remote_state = sshd.remote_state_of(&remote);
    assert!(remote_state.exists(), "no remote state after a COPY over ssh");

    // Unchanged: both states fresh, nothing is read on either side.
    let run = sshd.basyn(&over_ssh(&local, &remote, &["-a", "push", "-m", "sync", "--stat"]));
    run.ok();
    assert!(run.stat().read_nothing(), "an unchanged sync read{run:?}");

    // Behind basyn's back the remote image changes; `basyn index -h` makes its state
    // fresh again on the remote host (reading it there), and the next check reads nothing.
    flip(&remote, (size / 2) as u64, 1);
    let idx = sshd.basyn(&["index", "-h", ALIAS, s(&remote), "--stat"]);
    idx.ok();
    assert_eq!(idx.stat().remote_read, size as u64, "index must read the changed remote image once{idx:?}");
    let idx = sshd.basyn(&["index", "-h", ALIAS, s(&remote), "--stat"]);
    idx.ok();
    assert_eq!(idx.stat().remote_read, 0, "a second index of an unchanged image reads nothing{idx:?}");
    let check = sshd.basyn(&over_ssh(&local, &remote, &["--recheck", "--stat"]));
    check.fails(3, &["differ"]);
    assert!(check.stat().read_nothing(), "fresh states answer{check:?}");

    // A SYNC walks the trees and repairs the one differing block.
    let run = sshd.basyn(&over_ssh(&local, &remote, &["-a", "push", "-m", "sync", "--stat"]));
    run.ok();
    assert_same(&local, &remote);
    assert!(run.stat().both < 256 * KIB as u64, "one changed byte cost{run:?}");
}

/// Field `i` (0-based) of a loop device's `/sys/class/block/NAME/stat`: 2 is sectors
/// read, 6 sectors written.
fn loop_stat(dev: &LoopDev, i: usize) -> u64 {
    let name = dev.path().file_name().unwrap().to_string_lossy().into_owned();
    let text = std::fs::read_to_string(format!("/sys/class/block/{name}/stat")).unwrap();
    text.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// Over SSH too, one 4 KiB write in every 2 MiB block leaves a receiver whose state is
/// fresh nearly unread (only its differing 16 KiB pieces, to refine them to 4 KiB) and
/// written only where it changed.
#[test]
fn scattered_small_changes_over_ssh_read_only_the_receivers_differing_pieces() {
    let Some(sshd) = Sshd::start() else { return };
    let size = 256 * MIB;
    let data = random_data(34, size);
    let (local, img) = (sshd.local("src.img"), sshd.remote("rcv.img"));
    write(&local, &data);
    write(&img, &data);
    let Some(dev) = loop_dev(&img) else { return };
    // Over SSH a chosen remote state must be in the state directory (or beside the device).
    let remote_state = sshd.state_dir().join(format!("test-{}-rcv.basyn-state", std::process::id()));
    let _cleanup = RemoveOnDrop(remote_state.clone());
    let args =
        over_ssh(&local, dev.path(), &["-a", "push", "-m", "sync", "--stat", "--remote-state", s(&remote_state)]);
    sshd.basyn(&args).ok();
    let blocks = (size / (2 * MIB)) as u64;
    for b in 0..blocks {
        poke(&local, (b * 2 * MIB as u64) + (b * 97 % 512) * 4096, &random_data(b, 4096));
    }
    flushbufs(dev.path());
    let (read_before, written_before) = (loop_stat(&dev, 2), loop_stat(&dev, 6));
    let r = sshd.basyn(&args);
    r.ok();
    let read = (loop_stat(&dev, 2) - read_before) * 512;
    let written = (loop_stat(&dev, 6) - written_before) * 512;
    assert!(read <= size as u64 / 100, "the fresh receiver was read: {read} bytes{r:?}");
    assert!(written <= 2 * blocks * 16384, "{written} bytes written for {} bytes changed{r:?}", blocks * 4096);
    let wire = r.stat().both;
    assert!(wire < 2 * MIB as u64, "{wire} bytes crossed the link for 512 KiB of change{r:?}");
    flushbufs(dev.path());
    assert_same(&local, dev.path());
}

/// Refining a change written where the receiver held zeros read the receiver's zero
/// 16 KiB pieces (to digest their 4 KiB parts), though its fresh state says they are
/// zero: with one 4 KiB write into the zero half of every 2 MiB block, 2 MiB of a
/// 256 MiB receiver were read for nothing. Now a piece known to be zero is not read.
#[test]
fn refining_a_change_over_zeros_does_not_read_the_receivers_zero_pieces() {
    let Some(sshd) = Sshd::start() else { return };
    let size = 256 * MIB;
    let mut data = random_data(35, size);
    for block in data.chunks_mut(2 * MIB) {
        block[MIB..].fill(0);
    }
    let (local, img) = (sshd.local("src.img"), sshd.remote("rcv.img"));
    write(&local, &data);
    write(&img, &data);
    let Some(dev) = loop_dev(&img) else { return };
    let remote_state = sshd.state_dir().join(format!("test-{}-zrcv.basyn-state", std::process::id()));
    let _cleanup = RemoveOnDrop(remote_state.clone());
    let args =
        over_ssh(&local, dev.path(), &["-a", "push", "-m", "sync", "--stat", "--remote-state", s(&remote_state)]);
    sshd.basyn(&args).ok();
    let blocks = (size / (2 * MIB)) as u64;
    for b in 0..blocks {
        poke(&local, b * 2 * MIB as u64 + MIB as u64 + (b * 97 % 256) * 4096, &random_data(b + 1000, 4096));
    }
    flushbufs(dev.path());
    let read_before = loop_stat(&dev, 2);
    let r = sshd.basyn(&args);
    r.ok();
    let read = (loop_stat(&dev, 2) - read_before) * 512;
    assert!(read < blocks * 16384 / 4, "the receiver's zero pieces were read: {read} bytes{r:?}");
    let wire = r.stat().both;
    assert!(wire < 2 * MIB as u64, "{wire} bytes crossed the link for 512 KiB of change{r:?}");
    flushbufs(dev.path());
    assert_same(&local, dev.path());
    // The receiver's state took the digests of the pieces written over zeros without
    // reading them back: a source hashed anew finds nothing that differs.
    std::fs::remove_file(state_of(&local)).unwrap();
    let again = sshd.basyn(&args);
    again.ok();
    assert_eq!(again.stat().differing, 0, "the receiver's state holds wrong digests{again:?}");
}

/// A backup key limited by a forced command in `authorized_keys`
/// (`command="basyn serve --restrict DEVICE",restrict ...`) hung the client: the forced
/// command replaced basyn's starting script, which never said how basyn started. Now
/// `basyn serve` says it itself, the client works unchanged, the listed device is synced
/// both ways, and any other device is refused without being created.
#[test]
fn a_key_restricted_to_one_device_by_a_forced_command_serves_only_it() {
    let Some(sshd) = Sshd::start() else { return };
    let (local, remote, other) = (sshd.local("src.img"), sshd.remote("backup.img"), sshd.remote("other.img"));
    random_image(&local, 31, 4 * MIB);
    let key = fs::read_to_string(sshd.path("userkey.pub")).unwrap();
    let line = format!(
        "command=\"{} serve --restrict {}\",restrict {}\n",
        env!("CARGO_BIN_EXE_basyn"),
        s(&remote),
        key.trim()
    );
    fs::write(sshd.path("authorized_keys/root"), line).unwrap();
    let run = fast(|| sshd.basyn(&over_ssh(&local, &remote, &["-a", "push", "-m", "sync", "--stat"])));
    run.ok();
    assert_same(&local, &remote);
    let back = sshd.local("back.img");
    fast(|| sshd.basyn(&over_ssh(&back, &remote, &["-a", "pull", "-m", "copy"]))).ok();
    assert_same(&back, &remote);
    let run = fast(|| sshd.basyn(&over_ssh(&local, &other, &["-a", "push", "-m", "sync"])));
    run.fails(1, &["other.img", "--restrict", s(&remote)]);
    assert!(!other.exists(), "a device outside the restriction was created");
    // The key runs nothing else: a --remote-path of the client's is not run either.
    let run =
        fast(|| sshd.basyn(&over_ssh(&local, &remote, &["-a", "push", "-m", "sync", "--remote-path", "/bin/false"])));
    run.ok();
}

/// A client could make the remote `basyn serve` create its state file anywhere (`/etc`),
/// and follow symbolic links in a path it chose. Over SSH a client-chosen state path now
/// has to be in the server's state directory or beside the device, with no link on the
/// way; `basyn serve --state-dir DIR` moves the former.
#[test]
fn a_remote_state_path_outside_the_state_dir_or_the_devices_directory_is_refused() {
    let Some(sshd) = Sshd::start() else { return };
    let (local, remote) = (sshd.local("src.img"), sshd.remote("dst.img"));
    random_image(&local, 32, MIB);
    let elsewhere = sshd.tmp().join("x.basyn-state");
    let args = |state: &Path| -> Vec<String> {
        let v = over_ssh(&local, &remote, &["-a", "push", "-m", "sync", "--remote-state"]);
        let mut v: Vec<String> = v.iter().map(|a| a.to_string()).collect();
        v.push(s(state).to_string());
        v
    };
    let run = fast(|| sshd.basyn(&args(&elsewhere)));
    run.fails(1, &["remote state", s(&elsewhere), "beside the device"]);
    assert!(!elsewhere.exists() && !remote.exists(), "the refused run left files behind");
    // Inside a directory beside the device: refused too. Beside it: fine; as a link
    // beside it (to a file elsewhere): refused.
    std::os::unix::fs::symlink(sshd.tmp(), sshd.remote("dir")).unwrap();
    let below = sshd.remote("dir").join("y.basyn-state");
    fast(|| sshd.basyn(&args(&below))).fails(1, &["remote state", "beside the device"]);
    assert!(!sshd.tmp().join("y.basyn-state").exists());
    let beside = sshd.remote("dst.state");
    fast(|| sshd.basyn(&args(&beside))).ok();
    assert!(beside.is_file(), "no state beside the device");
    let target = sshd.tmp().join("target");
    fs::write(&target, b"not a state").unwrap();
    std::os::unix::fs::symlink(&target, sshd.remote("link.state")).unwrap();
    fast(|| sshd.basyn(&args(&sshd.remote("link.state")))).fails(1, &["remote state", "symbolic link"]);
    assert_eq!(fs::read(&target).unwrap(), b"not a state");
}

/// A remote `basyn serve` stopped with SIGSTOP (its ssh link alive, so ssh's keepalives
/// still pass) stalled the client for as long as it stayed stopped. With `--timeout` the
/// run ends with exit 2 soon after the endpoint falls silent, and a rerun repairs.
#[test]
fn a_stopped_remote_endpoint_ends_the_run_within_its_timeout() {
    let Some(sshd) = Sshd::start() else { return };
    let size = 300 * MIB;
    let (local, remote) = (sshd.local("big.img"), sshd.remote("big.img"));
    urandom_image(&local, size);
    let tag = "serve-stopped";
    let args = over_ssh(&local, &remote, &["-a", "PUSH", "-m", "COPY", "--buffer", "1024", "--timeout", "5"]);
    let mut child = sshd.spawn(&args);
    let pids = wait_for_serve(&mut child, &remote);
    wait_for_data(&mut child, &pids, "PUSH", tag);
    assert!(child.running(), "{tag}: the copy ended before the stop; make the image bigger");
    let stopped: Vec<KillOnDrop> = pids.iter().map(|&p| KillOnDrop(p)).collect();
    let failed = Instant::now();
    pids.iter().for_each(|&p| send_signal(p, libc::SIGSTOP));
    let (code, took, err) = wait_end(child, tag, failed, FAST);
    assert_transfer_error(tag, code, &err, &["remote", s(&remote), "nothing heard", "--timeout 5"]);
    assert!(took >= Duration::from_secs(4), "{tag}: gave up after {took:.2?}, before its timeout");
    drop(stopped);
    sshd.basyn(&over_ssh(&local, &remote, &["-a", "PUSH", "-m", "SYNC"])).ok();
    assert_same(&local, &remote);
}

/// A link that goes down mid-run (the test sshd in a network namespace of the test's own,
/// behind veth; then `ip link set down`: packets go nowhere and nothing is reset) must
/// end the run within its timeout with exit 2; once the link is back, the stale remote
/// session goes away and a rerun converges.
#[test]
fn a_link_that_goes_down_ends_the_run_within_its_timeout_and_a_rerun_after_it_returns_converges() {
    let Some(ns) = Netns::make() else { return };
    let Some(sshd) = Sshd::start_with(Options { netns: ns.for_sshd(), ..Default::default() }) else { return };
    let size = 300 * MIB;
    let (local, remote) = (sshd.local("big.img"), sshd.remote("big.img"));
    urandom_image(&local, size);
    for (tag, action) in [("link-down-push", "PUSH"), ("link-down-pull", "PULL")] {
        if action == "PULL" {
            flip(&remote, (size - 1000) as u64, 10);
        }
        let args = over_ssh(&local, &remote, &["-a", action, "-m", "COPY", "--buffer", "1024", "--timeout", "5"]);
        let mut child = sshd.spawn(&args);
        let pids = wait_for_serve(&mut child, &remote);
        wait_for_data(&mut child, &pids, action, tag);
        assert!(child.running(), "{tag}: the copy ended before the link went down; make the image bigger");
        let failed = Instant::now();
        ns.link(false);
        let (code, took, err) = wait_end(child, tag, failed, FAST);
        let side = if action == "PUSH" { "remote" } else { "local" };
        let device = if action == "PUSH" { s(&remote) } else { s(&local) };
        assert_transfer_error(tag, code, &err, &["may be partly changed", side, device]);
        assert!(took < Duration::from_secs(15), "{tag}: {took:.2?} to notice the dead link (--timeout 5)");
        ns.link(true);
        // The remote session learns of its end when its next packet is answered by a reset.
        assert!(
            poll(Duration::from_secs(60), || serve_pids(&remote).is_empty()),
            "{tag}: the remote basyn serve outlived the link's return"
        );
        sshd.basyn(&over_ssh(&local, &remote, &["-a", action, "-m", "SYNC"])).ok();
        assert_same(&local, &remote);
    }
}

/// True if /proc/cpuinfo lists the instructions basyn looks for before preferring AES-GCM.
fn cpu_has_aes() -> bool {
    let info = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let words: Vec<&str> = info
        .lines()
        .filter(|l| l.starts_with("flags") || l.starts_with("Features"))
        .flat_map(|l| l.split_whitespace())
        .collect();
    words.contains(&"aes") && (words.contains(&"pclmulqdq") || words.contains(&"pmull"))
}

/// The ciphers sshd logged for the connections so far (`kex: client->server cipher: X`).
fn negotiated(sshd: &Sshd) -> Vec<String> {
    let log = sshd.log();
    log.lines()
        .filter_map(|l| l.split("kex: client->server cipher: ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next().map(str::to_string))
        .collect()
}

/// OpenSSH's default prefers ChaCha20-Poly1305, about three times AES-GCM's CPU where
/// the processor has AES instructions: there basyn's connection uses AES-GCM, and says
/// so. A `Ciphers` line in the user's config is obeyed as it is.
#[test]
fn the_connection_prefers_aes_gcm_unless_the_config_names_its_ciphers() {
    let Some(sshd) = Sshd::start_with(Options { debug_log: true, ..Default::default() }) else { return };
    let (local, remote) = (sshd.local("a.img"), sshd.remote("b.img"));
    random_image(&local, 13, MIB);
    let run = sshd.basyn(&over_ssh(&local, &remote, &["-a", "PUSH", "-m", "COPY", "--verbose"]));
    run.ok();
    assert_same(&local, &remote);
    let aes = cpu_has_aes();
    let want = if aes { "aes128-gcm@openssh.com" } else { "chacha20-poly1305@openssh.com" };
    assert!(poll(Duration::from_secs(5), || !negotiated(&sshd).is_empty()), "sshd logged no cipher:\n{}", sshd.log());
    assert_eq!(negotiated(&sshd), [want], "one master connection, with {want}");
    assert_eq!(run.stdout.contains("ssh cipher order: aes128-gcm@openssh.com,"), aes, "{run:?}");

    let own = ssh_config_for(ALIAS, Some(sshd.port), Some("root"), s(&sshd.user_key()), s(&sshd.known_hosts()))
        + "  Ciphers chacha20-poly1305@openssh.com,aes128-gcm@openssh.com\n";
    let config = sshd.write_file("ssh_config_ciphers", &own);
    flip(&local, 4096, 1);
    let run = sshd.basyn_with(&config, &over_ssh(&local, &remote, &["-a", "PUSH", "-m", "SYNC", "--verbose"]));
    run.ok();
    assert_same(&local, &remote);
    assert!(poll(Duration::from_secs(5), || negotiated(&sshd).len() == 2), "sshd log:\n{}", sshd.log());
    assert_eq!(negotiated(&sshd)[1], "chacha20-poly1305@openssh.com", "the config's own order");
    assert!(!run.stdout.contains("ssh cipher order"), "{run:?}");
}
