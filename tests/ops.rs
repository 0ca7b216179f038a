//! What operators run before and around a sync: `--dry-run` (compares, reports what the
//! action would send, writes nothing: not the receiver, not a state), locally, onto a
//! loop device (its sectors-written counter must not move) and over the test sshd.

mod sshd;
mod util;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::SystemTime;

use sshd::*;
use util::*;

/// Every file in `dir` with its length, modification time and content digest: what a
/// run that writes nothing must leave exactly as it was.
fn snapshot(dir: &Path) -> BTreeMap<String, (u64, SystemTime, u64)> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            let data = fs::read(e.path()).unwrap();
            let sum =
                data.iter().enumerate().fold(0u64, |h, (i, &b)| h.wrapping_mul(31).wrapping_add(b as u64 ^ i as u64));
            (e.file_name().to_string_lossy().into_owned(), (meta.len(), meta.modified().unwrap(), sum))
        })
        .collect()
}

/// Two 64 MiB images that differ in blocks 2 and 5 (of 2 MiB), and the byte ranges
/// those blocks cover.
fn pair(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    random_image(&a, 7, 64 * MIB);
    fs::copy(&a, &b).unwrap();
    poke(&b, 5_000_000, b"changed");
    poke(&b, 11 * MIB as u64, b"changed too");
    (a, b)
}

#[test]
fn dry_run_reports_what_a_sync_would_send_and_writes_nothing() {
    let t = tmp();
    let (a, b) = pair(t.path());
    let before = snapshot(t.path());
    let args = sv(&["-l", s(&a), "-r", s(&b), "-a", "push", "-m", "sync", "--dry-run", "--verbose"]);
    let run = basyn(&args);
    run.code(3);
    assert!(run.stderr.is_empty(), "a dry run's result is a report, not an error{run:?}");
    let out = &run.stdout;
    assert!(out.contains("2 of 32 blocks differ"), "{run:?}");
    assert!(out.contains("at most 4194304 bytes"), "{run:?}");
    // The ranges, with --verbose: blocks 2 and 5.
    assert!(out.contains("differs at 4194304..6291456 (2097152 bytes)"), "{run:?}");
    assert!(out.contains("differs at 10485760..12582912 (2097152 bytes)"), "{run:?}");
    assert!(out.contains("nothing was written"), "{run:?}");
    assert_eq!(snapshot(t.path()), before, "a dry run changed a file (the receiver, or made a state)");
    // -n is the short form; PULL compares the same two devices the other way.
    let pull = sv(&["-l", s(&b), "-r", s(&a), "-a", "pull", "-m", "sync", "-n"]);
    let run = basyn(&pull);
    run.code(3);
    assert!(run.stdout.contains("PULL SYNC from remote") && run.stdout.contains("2 of 32 blocks differ"), "{run:?}");
    assert_eq!(snapshot(t.path()), before);
    // After the sync, the dry run finds nothing to send.
    basyn(&sv(&["-l", s(&a), "-r", s(&b), "-a", "push", "-m", "sync"])).ok();
    let run = basyn(&args);
    run.ok();
    assert!(run.stdout.contains("the devices are identical: it would send nothing"), "{run:?}");
}

/// States are used when fresh (a dry run after a sync reads nothing) but never saved,
/// checkpointed or removed, even when the source changed since they were saved.
#[test]
fn dry_run_uses_fresh_states_and_never_saves_them() {
    let t = tmp();
    let (a, b) = pair(t.path());
    basyn(&sv(&["-l", s(&a), "-r", s(&b), "-a", "push", "-m", "sync"])).ok();
    assert!(state_of(&a).exists() && state_of(&b).exists());
    let args = sv(&["-l", s(&a), "-r", s(&b), "-a", "push", "-m", "sync", "-n", "--stat"]);
    let run = basyn(&args);
    run.ok();
    assert!(run.stat().read_nothing(), "both states are fresh: nothing need be read{run:?}");
    poke(&a, 40 * MIB as u64, b"new on the source");
    let before = snapshot(t.path());
    let run = basyn(&args);
    run.code(3);
    assert!(run.stdout.contains("1 of 32 blocks differ"), "{run:?}");
    assert_eq!(snapshot(t.path()), before, "a dry run saved a state");
}

#[test]
fn dry_run_needs_an_action_and_takes_no_recheck_or_bitmap() {
    let t = tmp();
    let (a, b) = pair(t.path());
    basyn(&sv(&["-l", s(&a), "-r", s(&b), "-n"])).usage_error(&["--dry-run needs --action"]);
    basyn(&sv(&["-l", s(&a), "-r", s(&b), "-a", "push", "-m", "sync", "-n", "--recheck"]))
        .usage_error(&["--dry-run", "--recheck"]);
    let bitmap = t.path().join("bitmap");
    basyn(&sv(&["-l", s(&a), "-r", s(&b), "-a", "push", "-m", "sync", "-n", "-b", s(&bitmap)]))
        .usage_error(&["--dry-run does not take -b/--bitmap"]);
    assert!(!bitmap.exists());
    // A receiver smaller than the source is refused as the run would refuse it.
    let small = t.path().join("small.img");
    random_image(&small, 8, MIB);
    basyn(&sv(&["-l", s(&a), "-r", s(&small), "-a", "push", "-m", "sync", "-n"])).fails(1, &[s(&small)]);
    assert_eq!(size_of(&small), MIB as u64);
}

/// Onto a loop device: the kernel's own counter says that nothing was written.
#[test]
fn dry_run_onto_a_block_device_writes_no_sector() {
    let t = tmp();
    let (a, b) = pair(t.path());
    let Some(dev) = loop_dev(&b) else { return };
    let name = dev.path().file_name().unwrap().to_string_lossy().into_owned();
    let written = || -> u64 {
        let text = fs::read_to_string(format!("/sys/class/block/{name}/stat")).unwrap();
        text.split_whitespace().nth(6).unwrap().parse().unwrap()
    };
    let state = state_of(dev.path());
    let _ = fs::remove_file(&state);
    flushbufs(dev.path());
    let sectors = written();
    let run = basyn(&sv(&["-l", s(&a), "-r", dev.s(), "-a", "push", "-m", "sync", "-n"]));
    run.code(3);
    assert!(run.stdout.contains("2 of 32 blocks differ"), "{run:?}");
    flushbufs(dev.path());
    assert_eq!(written(), sectors, "a dry run wrote to the receiver");
    assert!(!state.exists(), "a dry run saved the receiver's state");
}

/// Over ssh the remote end is opened for inspection only: its device and its state stay
/// as they were, and the report is the same.
#[test]
fn dry_run_over_ssh_writes_nothing_on_the_remote_host() {
    let Some(sshd) = Sshd::start() else { return };
    let (local, remote) = (sshd.local("a.img"), sshd.remote("a.img"));
    random_image(&local, 9, 64 * MIB);
    fs::copy(&local, &remote).unwrap();
    poke(&remote, 30 * MIB as u64, b"remote change");
    let remote_dir = remote.parent().unwrap().to_path_buf();
    let before = snapshot(&remote_dir);
    let args = |action: &str| {
        sv(&["-l", s(&local), "-r", s(&remote), "-h", ALIAS, "-a", action, "-m", "sync", "-n", "--verbose"])
    };
    let run = sshd.basyn(&args("push"));
    run.code(3);
    assert!(run.stdout.contains("1 of 32 blocks differ"), "{run:?}");
    assert!(run.stdout.contains("differs at 31457280..33554432"), "{run:?}");
    assert_eq!(snapshot(&remote_dir), before, "the dry run changed something on the remote host");
    let local_before = fs::read(&local).unwrap();
    sshd.basyn(&args("pull")).code(3);
    assert_eq!(fs::read(&local).unwrap(), local_before, "a PULL dry run changed the local receiver");
    assert_eq!(snapshot(&remote_dir), before);
}

/// `--bwlimit RATE` caps the link at RATE bytes per second: a copy neither runs faster
/// than the rate nor much slower, pushing (the client's writes are paced) and pulling
/// (its reads are, and the endpoint waits on the full pipe).
#[test]
fn bwlimit_holds_the_link_to_its_rate_in_both_directions() {
    let t = tmp();
    let a = t.path().join("a.img");
    random_image(&a, 11, 24 * MIB);
    let rate = 8.0 * MIB as f64;
    // PUSH into a new b.img; PULL from a.img into a new c.img.
    for (action, local, remote, made) in [("push", "a.img", "b.img", "b.img"), ("pull", "c.img", "a.img", "c.img")] {
        let (l, r) = (t.path().join(local), t.path().join(remote));
        let run = basyn(&sv(&[
            "-l",
            s(&l),
            "-r",
            s(&r),
            "-a",
            action,
            "-m",
            "copy",
            "--no-state",
            "--bwlimit",
            "8M",
            "--stat",
        ]));
        run.ok();
        let stat = run.stat();
        let data = (if action == "push" { stat.tx } else { stat.rx }) as f64;
        assert!(data >= 24.0 * MIB as f64, "{action}: {data} bytes carried{run:?}");
        let least = data / rate;
        assert!(
            stat.time >= least * 0.9,
            "{action}: {:.2} s for {data} bytes at 8 MiB/s ({least:.2} s){run:?}",
            stat.time
        );
        // Starting, hashing and a busy machine add time on top; the cap is the bound above.
        assert!(stat.time <= least * 1.1 + 3.0, "{action}: {:.2} s, far slower than 8 MiB/s{run:?}", stat.time);
        assert_same(&a, &t.path().join(made));
    }
}

#[test]
fn bwlimit_takes_bytes_per_second_with_a_unit() {
    let t = tmp();
    let (a, b) = pair(t.path());
    for bad in ["0", "fast", "10X", "1.5M"] {
        let run = basyn(&sv(&["-l", s(&a), "-r", s(&b), "-a", "push", "-m", "sync", "--bwlimit", bad]));
        run.usage_error(&["--bwlimit"]);
    }
    basyn(&sv(&["-l", s(&a), "-r", s(&b), "-a", "push", "-m", "sync", "--bwlimit", "1G"])).ok();
    assert_same(&a, &b);
}

/// Default states live in the state directory, named after the device's path, never
/// beside an image (where they were backed up with it, and shown as volumes by
/// directory storage pools).
#[test]
fn default_states_live_in_the_state_directory_not_beside_images() {
    let t = tmp();
    let (a, b) = pair(t.path());
    basyn(&sv(&["-l", s(&a), "-r", s(&b), "-a", "push", "-m", "sync"])).ok();
    let names: Vec<String> = snapshot(t.path()).into_keys().collect();
    assert_eq!(names, ["a.img", "b.img"], "basyn left files beside the images");
    assert!(state_of(&a).is_file() && state_of(&b).is_file(), "no states in {}", state_dir().display());
    let run = basyn(&sv(&["-l", s(&a), "-r", s(&b), "-a", "push", "-m", "sync", "--stat"]));
    assert!(run.stat().read_nothing(), "the states in the state directory were not used{run:?}");
}

/// A state an earlier version left beside an image is moved into the state directory
/// on first use and used from there: the run reads nothing.
#[test]
fn a_state_left_beside_an_image_by_an_earlier_version_is_moved_and_used() {
    let t = tmp();
    let (a, b) = pair(t.path());
    let (old_a, old_b) = (t.path().join("a.img.basyn-state"), t.path().join("b.img.basyn-state"));
    let old = sv(&["-l", s(&a), "-r", s(&b), "-a", "push", "-m", "sync", "--state", s(&old_a)]);
    let mut old = old;
    old.extend(sv(&["--remote-state", s(&old_b)]));
    basyn(&old).ok();
    assert!(old_a.is_file() && old_b.is_file());
    let _ = fs::remove_file(state_of(&a));
    let _ = fs::remove_file(state_of(&b));
    let run = basyn(&sv(&["-l", s(&a), "-r", s(&b), "-a", "push", "-m", "sync", "--stat", "--verbose"]));
    assert!(run.stdout.contains(&format!("moved from {}", old_a.display())), "{run:?}");
    assert!(run.stdout.contains(&format!("moved from {}", old_b.display())), "{run:?}");
    assert!(run.stat().read_nothing(), "the moved states were not used{run:?}");
    assert!(!old_a.exists() && !old_b.exists(), "the old states were left beside the images");
    assert!(state_of(&a).is_file() && state_of(&b).is_file());
}

/// An unchanged SYNC with both states fresh rewrote and fsynced both state files on
/// every run (each save is a new file renamed over the old). A state that already holds
/// what the run knows is now left as it is: same file, same inode.
#[test]
fn an_unchanged_sync_with_fresh_states_does_not_rewrite_them() {
    use std::os::unix::fs::MetadataExt;
    let t = tmp();
    let (a, b) = pair(t.path());
    let args = sv(&["-l", s(&a), "-r", s(&b), "-a", "push", "-m", "sync", "--stat"]);
    basyn(&args).ok();
    let inodes = || [state_of(&a), state_of(&b)].map(|p| fs::metadata(&p).unwrap().ino());
    let before = inodes();
    let run = basyn(&args);
    run.ok();
    assert!(run.stat().read_nothing(), "{run:?}");
    assert_eq!(inodes(), before, "an unchanged run rewrote a state");
    // A change is saved as before.
    poke(&a, 3 * MIB as u64, b"changed");
    basyn(&args).ok();
    let after = inodes();
    assert!(after[0] != before[0] && after[1] != before[1], "a changed run did not save both states");
}

/// `-l X -r X --recheck` on one machine said "in use by another basyn" (the far end
/// found the device locked by this end). It now says the two are one device, by any
/// name, for a dry run too.
#[test]
fn a_check_of_a_device_against_itself_says_they_are_the_same_device() {
    let t = tmp();
    let (a, _) = pair(t.path());
    let alias = t.path().join("alias.img");
    std::os::unix::fs::symlink(&a, &alias).unwrap();
    for other in [&a, &alias] {
        let run = basyn(&sv(&["-l", s(&a), "-r", s(other), "--recheck"]));
        run.fails(1, &["are the same device", "nothing to compare", s(other)]);
        assert!(!run.stderr.contains("another basyn"), "{run:?}");
        basyn(&sv(&["-l", s(&a), "-r", s(other), "-a", "push", "-m", "sync", "-n"])).fails(1, &["same device"]);
    }
}

/// Ctrl-C said only "interrupted; the receiving device may be partly changed". It now
/// names the device and says what to do next.
#[test]
fn an_interrupted_run_names_the_receiver_and_says_what_to_do_next() {
    let t = tmp();
    let a = t.path().join("a.img");
    random_image(&a, 12, 256 * MIB);
    let next = "rerun the same command: it resumes from the last checkpoint";
    for mode in ["sync", "copy"] {
        let b = t.path().join(format!("{mode}.img"));
        let mut run = start(&sv(&["-l", s(&a), "-r", s(&b), "-a", "push", "-m", mode, "--bwlimit", "16M"]), &[]);
        wait_until(std::time::Duration::from_secs(60), "the receiver to be created", || b.exists() || !run.running());
        assert!(run.running(), "the run ended before it could be interrupted{:?}", run.finish());
        // SAFETY: kill(2) on the child's pid.
        unsafe { libc::kill(run.pid() as i32, libc::SIGINT) };
        let r = run.finish();
        r.fails(2, &["interrupted", &format!("the receiving device remote {} may be partly changed", s(&b)), next]);
    }
}

/// States tell what a device holds: the state directory basyn makes is its owner's only
/// (0700), and every state file is 0600, whatever the umask.
#[test]
fn states_and_the_state_directory_basyn_makes_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let t = tmp();
    let (a, b) = pair(t.path());
    let dir = t.path().join("states/nested");
    let run = start(&sv(&["-l", s(&a), "-r", s(&b), "-a", "push", "-m", "sync"]), &[("BASYN_STATE_DIR", s(&dir))]);
    run.finish().ok();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(dir.parent().unwrap()), 0o700);
    let states: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(states.len(), 2, "{states:?}");
    for state in states {
        assert_eq!(mode(&state), 0o600, "{}", state.display());
    }
}

/// `basyn state list` shows each state with its device and whether it is fresh now, and
/// the uploaded executables; `basyn state prune` removes the states whose device is
/// gone and uploads of other builds, nothing else.
#[test]
fn state_list_and_prune_show_and_clean_what_basyn_keeps_on_a_host() {
    let t = tmp();
    let (a, b) = pair(t.path());
    let dir = t.path().join("states");
    let cache = t.path().join("cache");
    let env = [("BASYN_STATE_DIR", s(&dir)), ("XDG_CACHE_HOME", s(&cache))];
    let run = |args: &[&str]| start(&sv(args), &env).finish();
    run(&["-l", s(&a), "-r", s(&b), "-a", "push", "-m", "sync"]).ok();
    // This build's upload name is its version and a digest prefix of the executable.
    let exe = fs::read(env!("CARGO_BIN_EXE_basyn")).unwrap();
    let sum = tool("sha256sum", &[env!("CARGO_BIN_EXE_basyn")]).unwrap();
    assert!(!exe.is_empty());
    let current = format!("basyn-{}-{}", env!("CARGO_PKG_VERSION"), &sum[..16]);
    fs::create_dir_all(cache.join("basyn")).unwrap();
    fs::write(cache.join("basyn").join(&current), b"this build").unwrap();
    fs::write(cache.join("basyn/basyn-0.0.1-0123456789abcdef"), b"an old build").unwrap();
    let list = run(&["state", "list"]);
    list.ok();
    assert!(list.stdout.contains(&format!("states in {}: 2", dir.display())), "{list:?}");
    for image in [&a, &b] {
        let line = list.stdout.lines().find(|l| l.contains(&format!(" {} ", s(image)))).unwrap_or_default();
        assert!(line.ends_with("fresh"), "{}: {line:?}{list:?}", s(image));
    }
    assert!(list.stdout.contains(&format!("{current}  ")) && list.stdout.contains("this build"), "{list:?}");
    assert!(list.stdout.contains("basyn-0.0.1-0123456789abcdef") && list.stdout.contains("prune removes it"));
    // A change makes a state stale; a device that is gone, its state prunable.
    poke(&a, 0, b"changed");
    fs::remove_file(&b).unwrap();
    let list = run(&["state", "list", "--state-dir", s(&dir)]);
    assert!(list.stdout.lines().any(|l| l.contains(s(&a)) && l.contains("stale")), "{list:?}");
    assert!(list.stdout.lines().any(|l| l.contains(s(&b)) && l.ends_with("device gone")), "{list:?}");
    let pruned = run(&["state", "prune"]);
    pruned.ok();
    assert!(pruned.stdout.contains("which is gone") && pruned.stdout.contains("another build"), "{pruned:?}");
    assert!(!state_of_in(&dir, &b).exists() && state_of_in(&dir, &a).exists(), "{pruned:?}");
    assert!(cache.join("basyn").join(&current).exists() && !cache.join("basyn/basyn-0.0.1-0123456789abcdef").exists());
    run(&["state", "prune"]).ok().stdout.contains("nothing to prune").then_some(()).expect("a second prune found more");
    // A state made by a run given relative paths names its device absolutely, so a
    // listing from anywhere else finds it (and a prune keeps it).
    let c = t.path().join("c.img");
    fs::copy(&a, &c).unwrap();
    let args = sv(&["-l", "a.img", "-r", "c.img", "-a", "push", "-m", "sync"]);
    let mut cmd = command(&args);
    cmd.current_dir(t.path()).envs(env);
    spawn(cmd, &args).finish().ok();
    let list = run(&["state", "list"]);
    assert!(list.stdout.lines().any(|l| l.contains(&format!(" {} ", s(&c))) && l.ends_with("fresh")), "{list:?}");
    run(&["state", "prune"]).ok();
    assert!(state_of_in(&dir, &c).exists());
}

/// `state_of` in another state directory.
fn state_of_in(dir: &Path, device: &Path) -> std::path::PathBuf {
    dir.join(state_of(device).file_name().unwrap())
}

/// `--progress` names the phase (comparing, sending, flushing, verifying) and counts the
/// changes found; bytes a state vouches for make no rate (it said "55 TiB/s" of a run
/// that read nothing). Without a terminal it writes lines, the last one at the end.
#[test]
fn progress_names_the_phase_counts_changes_and_shows_no_rate_for_what_was_not_read() {
    let t = tmp();
    let (a, b) = pair(t.path());
    let sync = sv(&["-l", s(&a), "-r", s(&b), "-a", "push", "-m", "sync", "--progress"]);
    let run = basyn(&sync);
    run.ok();
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert!(lines.iter().any(|l| l.starts_with("comparing ")), "{run:?}");
    let last = lines.last().copied().unwrap_or_default();
    assert!(last.starts_with("flushing  100.0% 64.0M/64.0M ") && last.ends_with(" 2 differ"), "{run:?}");
    // Both states fresh: nothing is read, so there is no rate and no ETA.
    let run = basyn(&sync);
    run.ok();
    for line in run.stderr.lines() {
        assert!(!line.contains("/s "), "a rate for a run that read nothing: {line:?}{run:?}");
        assert!(line.contains(" - ETA -"), "{line:?}{run:?}");
    }
    let copy = basyn(&sv(&["-l", s(&a), "-r", s(&t.path().join("c.img")), "-a", "push", "-m", "copy", "--progress"]));
    copy.ok();
    assert!(copy.stderr.lines().any(|l| l.starts_with("sending ")), "{copy:?}");
    let check = basyn(&sv(&["-l", s(&a), "-r", s(&b), "-a", "push", "-m", "sync", "--recheck", "--progress"]));
    check.ok();
    assert!(check.stderr.lines().any(|l| l.starts_with("verifying ")), "{check:?}");
}

/// An interrupted COPY started again from zero. It now resumes: the leaves the source's
/// checkpoint confirms are compared with the receiver (the source is not read for them)
/// and only the rest is copied, in both directions.
#[test]
fn an_interrupted_copy_resumes_from_its_last_checkpoint() {
    let t = tmp();
    let size = 128 * MIB;
    let src = t.path().join("src.img");
    big_image(&src, 77, size);
    for dir in [Dir::Push, Dir::Pull] {
        let dst = t.path().join(format!("dst-{}.img", dir.word()));
        let state = state_of(&src);
        let _ = fs::remove_file(&state);
        let args = action(dir, "copy", &src, &dst, &["--bwlimit", "24M"]);
        let mut bg = start(&args, &[("BASYN_TEST_CHECKPOINT_MS", "50")]);
        wait_until(std::time::Duration::from_secs(60), "a checkpoint of the source past a quarter", || {
            !bg.running() || (state.exists() && size_of(&dst) > 0 && bg.written() > size as u64 / 3)
        });
        assert!(bg.running(), "the COPY ended before it could be interrupted{:?}", bg.finish());
        // SAFETY: kill(2) on the child's pid.
        unsafe { libc::kill(bg.pid() as i32, libc::SIGINT) };
        bg.finish().fails(2, &["interrupted", "it resumes from the last checkpoint"]);
        assert!(state.exists(), "{dir:?}: no checkpoint of the source was saved");

        let mut again = args.clone();
        again.extend(sv(&["--stat", "--verbose"]));
        let r = basyn(&again);
        r.ok();
        assert_same(&src, &dst);
        let out = format!("{}{}", r.stdout, r.stderr);
        assert!(out.contains("resuming an interrupted COPY"), "{dir:?}: the rerun did not resume{r:?}");
        let stat = r.stat();
        let (source_read, _) = stat.reads(dir);
        assert!(source_read < size as u64 * 3 / 4, "{dir:?}: the rerun read {source_read} bytes of the source{r:?}");
        assert!(stat.written < size as u64 * 3 / 4, "{dir:?}: the rerun wrote {} bytes again{r:?}", stat.written);

        // A rerun of the COPY that completed copies everything, as a COPY does.
        let r = basyn(&again);
        r.ok();
        let out = format!("{}{}", r.stdout, r.stderr);
        assert!(!out.contains("resuming"), "{dir:?}: a complete COPY was taken for an interrupted one{r:?}");
        assert_eq!(r.stat().reads(dir).0, size as u64, "{dir:?}: a COPY did not read its whole source{r:?}");
    }
}
