//! Regression tests, each named after the bug it pins: tree walks over thousands of
//! differing leaves, foreign-write detection on block-device receivers (false alarms and
//! missed writes), rechecks after `--force` onto a larger device, locking before
//! resizing, `--remote-state` paths that are not states, and loop devices re-created
//! under the same name.
//!
//! Loop devices need root and `losetup` (see `util::require`). The loop-device tests
//! hold one lock between them, so that a test that detaches and re-attaches
//! `/dev/loopN` is not raced by another test's `losetup --find`. States of loop devices
//! live in the tests' state directory (`util::state_dir`) as `dev_loopN.basyn-state`;
//! the guards here delete them.

mod util;

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use util::*;

/// Bytes read from (local, remote), from `--stat`.
#[track_caller]
fn reads(run: &Run) -> (u64, u64) {
    let st = run.stat();
    (st.local_read, st.remote_read)
}

// ---------------------------------------------------------------------------
// Loop devices
// ---------------------------------------------------------------------------

/// Serializes the loop-device tests of this file.
static LOOPS: Mutex<()> = Mutex::new(());

fn loops() -> MutexGuard<'static, ()> {
    LOOPS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Deletes the default state of a block device (and temp files of a save).
fn forget_state(kernel_name: &str) {
    let prefix = format!("dev_{kernel_name}.basyn-state");
    if let Ok(dir) = fs::read_dir(state_dir()) {
        for e in dir.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

fn state_file_for(kernel_name: &str) -> PathBuf {
    state_dir().join(format!("dev_{kernel_name}.basyn-state"))
}

/// A loop device over an image file; its default state is deleted when it is attached
/// (left over from an earlier user of that loopN) and when it is dropped.
struct Loop {
    name: String,
    dev: LoopDev,
}

impl Loop {
    fn attach(img: &Path) -> Option<Loop> {
        let dev = loop_dev(img)?;
        Some(Loop::adopt(dev))
    }

    fn adopt(dev: LoopDev) -> Loop {
        let name = dev.path().file_name().unwrap().to_string_lossy().into_owned();
        forget_state(&name);
        Loop { name, dev }
    }

    fn path(&self) -> &Path {
        self.dev.path()
    }

    fn s(&self) -> &str {
        s(self.path())
    }

    fn state(&self) -> PathBuf {
        state_file_for(&self.name)
    }
}

/// Deletes the default state of block device `name` now and when dropped.
struct StateGuard {
    name: String,
}

impl StateGuard {
    fn new(name: &str) -> StateGuard {
        forget_state(name);
        StateGuard { name: name.to_string() }
    }
}

impl Drop for StateGuard {
    fn drop(&mut self) {
        forget_state(&self.name);
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        forget_state(&self.name);
    }
}

/// A sparse (zero) file of `len` bytes.
fn sparse(path: &Path, len: u64) {
    File::create(path).unwrap().set_len(len).unwrap();
}

/// The first `len` bytes of a file or device.
fn head(path: &Path, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    File::open(path).unwrap().read_exact(&mut v).unwrap();
    v
}

// ---------------------------------------------------------------------------
// 1. Tree walks are batched under the control-frame limit
// ---------------------------------------------------------------------------

/// Two random images of `len` bytes, both indexed with 1 KiB leaves (in parallel).
fn indexed_pair(dir: &Path, len: usize) -> (PathBuf, PathBuf) {
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    random_image(&a, 1, len);
    random_image(&b, 2, len);
    std::thread::scope(|scope| {
        let jobs = [&a, &b].map(|img| scope.spawn(move || basyn(&["index", s(img), "--buffer", "1"])));
        for job in jobs {
            job.join().unwrap().ok();
        }
    });
    (a, b)
}

#[test]
fn tree_walk_with_thousands_of_differing_leaves() {
    // 12288 leaves of 1 KiB, all differing, both states fresh: the SYNC walks the trees.
    let t = tmp();
    let (a, b) = indexed_pair(t.path(), 12 * MIB);
    let r = basyn(&["-l", s(&a), "-r", s(&b), "-a", "push", "-m", "sync", "--buffer", "1", "--stat", "--verbose"]);
    r.ok();
    assert_same(&a, &b);
    assert!(r.stdout.contains("walking the trees"), "both states were not fresh: no tree walk{r:?}");
    assert!(r.stat().nodes > 10_000, "the tree walk compared too few nodes{r:?}");
    assert_eq!(reads(&r).1, 0, "the receiver's fresh state was not used{r:?}");
    assert_eq!(r.stat().differing, 12288, "every leaf differs{r:?}");

    // 12288 leaf indices still fit one 64 KiB control frame (varints of at most two
    // bytes); 28672 do not (indices from 16384 on take three): a check without action
    // walks the same way, reading nothing, and must not hit the frame limit.
    let t = tmp();
    let (a, b) = indexed_pair(t.path(), 28 * MIB);
    let r = basyn(&["-l", s(&a), "-r", s(&b), "--recheck", "--buffer", "1", "--stat"]);
    r.fails(3, &["differ in 28672 of 28672 blocks"]);
    assert_eq!(reads(&r), (0, 0), "the walk read device data{r:?}");
    assert!(r.stat().nodes > 28_672, "the tree walk compared too few nodes{r:?}");
}

// ---------------------------------------------------------------------------
// 2. No false "foreign write" on a block-device receiver without a state
// ---------------------------------------------------------------------------

#[test]
fn pull_copy_without_state_onto_a_block_device_succeeds() {
    let _l = loops();
    let t = tmp();
    let src = t.path().join("src.img");
    random_image(&src, 3, 16 * MIB);
    let backing = t.path().join("dev.img");
    random_image(&backing, 4, 16 * MIB);
    let Some(dev) = Loop::attach(&backing) else { return };

    let r = basyn(&["-l", dev.s(), "-r", s(&src), "-a", "pull", "-m", "copy", "--no-state", "--stat"]);
    r.ok();
    assert!(same_stream(&src, dev.path()), "the loop device differs from the image after the COPY{r:?}");

    // A SYNC without state after a few changes (partial writes of refined blocks) too.
    for at in [5 * 4096u64, 3 * MIB as u64 + 12_345, 16 * MIB as u64 - 100] {
        flip(&src, at, 50);
    }
    let r = basyn(&["-l", dev.s(), "-r", s(&src), "-a", "pull", "-m", "sync", "--no-state", "--stat"]);
    r.ok();
    assert!(same_stream(&src, dev.path()), "the loop device differs from the image after the SYNC{r:?}");

    // And a COPY with the default state.
    flip(&src, 7 * MIB as u64, 4096);
    basyn(&["-l", dev.s(), "-r", s(&src), "-a", "pull", "-m", "copy"]).ok();
    assert!(same_stream(&src, dev.path()));
}

// ---------------------------------------------------------------------------
// 3. --recheck after --force onto a larger block device, odd source size
// ---------------------------------------------------------------------------

#[test]
fn recheck_after_force_onto_a_larger_loop_device_with_an_odd_size() {
    let _l = loops();
    let t = tmp();
    let src = t.path().join("src.img");
    let len = 16 * MIB + 12345;
    random_image(&src, 5, len);
    let backing = t.path().join("dev.img");
    let original = random_image(&backing, 6, 32 * MIB);
    let Some(dev) = Loop::attach(&backing) else { return };

    let variants: [&[&str]; 3] = [&["-m", "sync"], &["-m", "sync", "--no-state"], &["-m", "copy"]];
    for (i, extra) in variants.iter().enumerate() {
        // Change the source (and so the receiver's first part) between the variants.
        if i > 0 {
            flip(&src, (i * 4096) as u64, 4096);
            flip(&src, len as u64 - 100, 100);
        }
        let mut args = sv(&["-l", s(&src), "-r", dev.s(), "-a", "push", "--force", "--recheck", "--stat"]);
        args.extend(sv(extra));
        let r = basyn(&args);
        r.ok();
        let data = fs::read(&src).unwrap();
        let now = head(dev.path(), 32 * MIB);
        assert!(now[..len] == data[..], "{extra:?}: the device does not hold the source{r:?}");
        assert!(now[len..] == original[len..], "{extra:?}: the device beyond the source's length was changed{r:?}");
    }
}

// ---------------------------------------------------------------------------
// 4. The receiver is locked before it is resized
// ---------------------------------------------------------------------------

#[test]
fn a_locked_receiver_is_not_resized() {
    let t = tmp();
    let src = t.path().join("a.img");
    random_image(&src, 7, 8 * MIB);
    let rcv = t.path().join("b.img");
    let cases: [(&str, &str, &[&str]); 4] = [
        ("push", "sync", &[]),
        ("pull", "sync", &[]),
        ("push", "copy", &["--no-state"]),
        ("pull", "copy", &["--no-state"]),
    ];
    for size in [4 * MIB, 12 * MIB] {
        for (dir, mode, extra) in cases {
            let content = random_image(&rcv, 8, size);
            // Another basyn holds the receiver (its flock).
            let holder = File::open(&rcv).unwrap();
            holder.try_lock().expect("cannot lock the receiver");
            let (l, r) = if dir == "push" { (&src, &rcv) } else { (&rcv, &src) };
            let mut args = sv(&["-l", s(l), "-r", s(r), "-a", dir, "-m", mode, "--force"]);
            args.extend(sv(extra));
            let run = basyn(&args);
            run.fails(1, &["in use by another basyn", s(&rcv)]);
            assert_eq!(size_of(&rcv), size as u64, "{dir} {mode}: the locked receiver was resized{run:?}");
            assert_content(&rcv, &content, &format!("{dir} {mode}: the locked receiver"));
            drop(holder);

            // Once the lock is gone the same command resizes and syncs.
            basyn(&args).ok();
            assert_same(&src, &rcv);
        }
    }
}

// ---------------------------------------------------------------------------
// 5. --remote-state never replaces a file that is not a state
// ---------------------------------------------------------------------------

#[test]
fn remote_state_path_that_is_not_a_state_is_not_replaced() {
    let t = tmp();
    let (a, b) = (t.path().join("a.img"), t.path().join("b.img"));
    random_image(&a, 9, 4 * MIB);
    let b_data = random_image(&b, 10, 4 * MIB);
    let precious = t.path().join("precious.txt");
    write(&precious, b"precious\n");

    let push = |state: &Path| {
        basyn(&["-l", s(&a), "-r", s(&b), "-a", "push", "-m", "sync", "--remote-state", s(state), "--buffer", "64"])
    };
    let pull = |state: &Path| {
        basyn(&["-l", s(&b), "-r", s(&a), "-a", "pull", "-m", "sync", "--remote-state", s(state), "--buffer", "64"])
    };
    let check = |state: &Path| basyn(&["-l", s(&a), "-r", s(&b), "--recheck", "--remote-state", s(state)]);

    // An ordinary file: refused, whichever way round, and nothing changed.
    for r in [push(&precious), pull(&precious), check(&precious)] {
        r.fails(1, &["not a basyn state file", s(&precious)]);
        assert_eq!(fs::read(&precious).unwrap(), b"precious\n", "the ordinary file was changed{r:?}");
        assert_content(&b, &b_data, "receiver after a refused --remote-state");
    }

    // A path that does not exist yet: the run works and leaves a state there.
    let fresh = t.path().join("new.basyn-state");
    push(&fresh).ok();
    assert_same(&a, &b);
    let bytes = fs::read(&fresh).expect("no state file at the new --remote-state path");
    assert!(bytes.starts_with(b"BASYNSTA"), "the new --remote-state file is not a state");
    // And an existing state there is used and replaced.
    flip(&a, 1000, 10);
    push(&fresh).ok();
    assert_same(&a, &b);

    // A symbolic link, to a state or to nothing, is refused and not followed.
    let link = t.path().join("link.basyn-state");
    symlink(&fresh, &link).unwrap();
    let before = fs::read(&fresh).unwrap();
    flip(&a, 2000, 10);
    let b_now = fs::read(&b).unwrap();
    let r = push(&link);
    r.fails(1, &["symbolic link", s(&link)]);
    assert_eq!(fs::read(&fresh).unwrap(), before, "the symlink's target was changed{r:?}");
    assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the symlink was replaced{r:?}");
    assert_content(&b, &b_now, "receiver after a refused symlink --remote-state");

    let dangling = t.path().join("dangling.basyn-state");
    let target = t.path().join("nowhere");
    symlink(&target, &dangling).unwrap();
    let r = push(&dangling);
    r.fails(1, &["symbolic link"]);
    assert!(!target.exists(), "a state was written through a dangling symlink{r:?}");

    // A directory is refused too.
    let folder = t.path().join("dir.basyn-state");
    fs::create_dir(&folder).unwrap();
    push(&folder).fails(1, &["not a regular file"]);
}

// ---------------------------------------------------------------------------
// 6. Another process writing the receiver during the run is reported
// ---------------------------------------------------------------------------

/// Checks one run that saw a foreign write: exit 2 with the message, or (the write landed
/// before basyn's first stamp and basyn synced over it) exit 0 with identical devices.
/// Then the same command must converge. Returns what went wrong.
fn reported_and_converges(what: &str, first: &Run, args: &[String], src: &Path, dev: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    match first.code {
        2 if first.stderr.contains("written to by another process") => {}
        0 if stream_difference(src, dev).is_none() => {}
        0 => problems.push(format!(
            "{what}: exit 0 although the receiver differs from the source: the foreign write was not reported{first:?}"
        )),
        _ => problems.push(format!("{what}: unexpected exit code or message{first:?}")),
    }
    let again = basyn(args);
    if again.code != 0 || !same_stream(src, dev) {
        problems.push(format!(
            "{what}: the same command again did not converge (exit {}, receiver {}){again:?}",
            again.code,
            if stream_difference(src, dev).is_none() { "identical" } else { "still differs" }
        ));
    }
    problems
}

#[test]
fn a_receiver_written_during_a_pull_is_reported() {
    let _l = loops();
    let t = tmp();
    let len = 200 * MIB;
    let src = t.path().join("src.img");
    big_image(&src, 11, len);
    let backing = t.path().join("dev.img");
    sparse(&backing, len as u64);
    let Some(dev) = Loop::attach(&backing) else { return };
    // With the receiver's default state: a state saved after the foreign write would
    // make the next run trust it.
    let args = sv(&["-l", dev.s(), "-r", s(&src), "-a", "pull", "-m", "sync", "--buffer", "64", "--stat"]);
    for _ in 0..3 {
        forget_state(&dev.name);
        if let Some(first) = run_with_a_foreign_write(&args, dev.path(), len as u64, Foreign::Direct) {
            assert!(!(first.code == 2 && dev.state().exists()), "the state was saved after the foreign write{first:?}");
            let problems = reported_and_converges("PULL", &first, &args, &src, dev.path());
            assert!(problems.is_empty(), "{}", problems.join("\n\n"));
            return;
        }
    }
    require(false, "basyn finished before the foreign write three times");
}

#[test]
fn a_buffered_write_into_a_page_basyn_just_wrote_is_reported() {
    // Another process writes 4 KiB through the device's page cache (pwrite + fsync, as
    // `dd conv=fsync` does) into a page basyn wrote earlier in the run and that is not
    // yet written back: the kernel writes the page once, so the device's write counters
    // move by no more than basyn's own writes. basyn must still not report the devices
    // identical, nor save a state that says so.
    let _l = loops();
    let len = 96 * MIB;
    let mut failures = Vec::new();
    for dir in ["push", "pull"] {
        let t = tmp();
        let src = t.path().join("src.img");
        big_image(&src, 12, len);
        let backing = t.path().join("dev.img");
        sparse(&backing, len as u64);
        let Some(dev) = Loop::attach(&backing) else { return };
        let (l, r) = if dir == "push" { (s(&src), dev.s()) } else { (dev.s(), s(&src)) };
        let args = sv(&["-l", l, "-r", r, "-a", dir, "-m", "sync", "--buffer", "64", "--stat"]);
        let mut first = None;
        for _ in 0..3 {
            forget_state(&dev.name);
            first = run_with_a_foreign_write(&args, dev.path(), len as u64, Foreign::Buffered);
            if first.is_some() {
                break;
            }
        }
        let Some(first) = first else {
            require(false, "basyn finished before the foreign write three times");
            return;
        };
        failures.extend(reported_and_converges(&dir.to_uppercase(), &first, &args, &src, dev.path()));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

// ---------------------------------------------------------------------------
// 7. A loop device re-created under the same name is another device
// ---------------------------------------------------------------------------

/// `losetup /dev/loopN FILE`, retried while the detached device is still being released.
fn attach_at(dev: &Path, file: &Path) -> Result<LoopDev, String> {
    let mut last = String::new();
    for _ in 0..30 {
        match tool("losetup", &[s(dev), s(file)]) {
            Ok(_) => return Ok(LoopDev { path: dev.to_path_buf() }),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(last)
}

#[test]
fn a_re_created_loop_device_does_not_reuse_its_state() {
    let _l = loops();
    if !require_root() || !require_tool("losetup") {
        return;
    }
    let t = tmp();
    let len = 8 * MIB;
    let src = t.path().join("src.img");
    let data = random_image(&src, 13, len);
    let first_img = t.path().join("first.img");
    random_image(&first_img, 14, len);
    // The second image differs from the source in three blocks only: trusting the old
    // state would leave exactly those wrong.
    let second_img = t.path().join("second.img");
    write(&second_img, &data);
    for at in [0u64, 3 * MIB as u64 + 4096, len as u64 - 4096] {
        flip(&second_img, at, 4096);
    }
    let sync = |dev: &Path| {
        basyn(&["-l", s(&src), "-r", s(dev), "-a", "push", "-m", "sync", "--buffer", "64", "--stat", "--verbose"])
    };

    for _attempt in 0..3 {
        let Some(first) = loop_dev(&first_img) else { return };
        let path = first.path().to_path_buf();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let state = StateGuard::new(&name);
        let state_file = state_file_for(&state.name);
        sync(&path).ok();
        assert!(stream_difference(&src, &path).is_none());
        assert!(state_file.is_file(), "no state {} after the sync", state_file.display());
        // The source's state is fresh too: with the old receiver state both would be.
        let r = sync(&path);
        r.ok();
        assert_eq!(reads(&r), (0, 0), "an unchanged re-sync read data{r:?}");

        // Detach, keeping the state; attach the other image under the same name.
        let state_before = fs::read(&state_file).unwrap();
        drop(first);
        let Ok(_second) = attach_at(&path, &second_img) else {
            // Someone else took the device meanwhile: try again with another one.
            continue;
        };
        assert_eq!(fs::read(&state_file).unwrap(), state_before, "the old state is not in place");

        let r = sync(&path);
        r.ok();
        assert!(reads(&r).1 > 0, "the re-created {} was not read: its old state was trusted{r:?}", path.display());
        assert!(
            stream_difference(&src, &path).is_none(),
            "the re-created {} differs from the source{r:?}",
            path.display()
        );
        return;
    }
    require(false, "could not re-attach a loop device under the same name");
}

#[test]
fn a_re_created_device_with_unchanged_write_counters_does_not_reuse_its_state() {
    // A loop device over another block device: its backing "file" is a device node,
    // whose stamp does not change when the data under it does. Re-created over changed
    // data, never written (so its write counters are 0 again, as in the old stamp), it
    // has the same number, size, counters and backing stamp: only the disk sequence
    // number tells it is another device (an LVM snapshot re-created every night).
    let _l = loops();
    if !require_root() || !require_tool("losetup") || !require_tool("blockdev") {
        return;
    }
    let t = tmp();
    let len = 8 * MIB;
    let base_img = t.path().join("base.img");
    random_image(&base_img, 15, len);
    let dst = t.path().join("dst.img");
    let Some(base) = loop_dev(&base_img) else { return };
    let sync = |dev: &Path| {
        basyn(&["-l", s(dev), "-r", s(&dst), "-a", "push", "-m", "sync", "--buffer", "64", "--stat", "--verbose"])
    };

    for _attempt in 0..3 {
        let Some(top) = prerequisite(LoopDev::attach(base.path(), false)) else { return };
        let path = top.path().to_path_buf();
        let state = StateGuard::new(&path.file_name().unwrap().to_string_lossy());
        let state_file = state_file_for(&state.name);
        sync(&path).ok();
        assert!(stream_difference(&path, &dst).is_none());
        assert!(state_file.is_file(), "no state {} for the source", state_file.display());
        let r = sync(&path);
        r.ok();
        assert_eq!(reads(&r), (0, 0), "an unchanged re-sync read data{r:?}");

        // Re-create the top device over the same base device, whose data changed
        // meanwhile (written through its backing file, not through any device).
        drop(top);
        for at in [4096u64, 5 * MIB as u64] {
            flip(&base_img, at, 4096);
        }
        flushbufs(base.path());
        let Ok(_again) = attach_at(&path, base.path()) else {
            // Someone else took the device meanwhile: try again with another one.
            continue;
        };
        let r = sync(&path);
        r.ok();
        assert!(reads(&r).0 > 0, "the re-created {} was not read: its old state was trusted{r:?}", path.display());
        assert!(
            stream_difference(&base_img, &dst).is_none(),
            "the receiver does not hold the re-created source's data{r:?}"
        );
        return;
    }
    require(false, "could not re-attach a loop device under the same name");
}

/// A run killed after a checkpoint resumes: the source's checkpointed leaves that the
/// receiver already holds are neither read nor sent again, and the rerun converges.
#[test]
fn a_killed_run_resumes_from_its_source_checkpoint() {
    let t = tmp();
    let (src, dst) = (t.path().join("src.img"), t.path().join("dst.img"));
    let size = 256 * MIB;
    big_image(&src, 71, size);
    fs::copy(&src, &dst).unwrap();
    // The receiver differs only near its end, so the first part is confirmed equal.
    flip(&dst, (size - 3 * MIB) as u64, 1);
    let args = sv(&["-l", s(&src), "-r", s(&dst), "-a", "push", "-m", "sync", "--buffer", "256"]);
    let mut bg = start(&args, &[("BASYN_TEST_CHECKPOINT_MS", "1")]);
    let state = state_of(&src);
    wait_until(Duration::from_secs(30), "a checkpoint of the source, or basyn's end", || {
        !bg.running() || state.exists()
    });
    bg.kill();
    assert!(state.exists(), "no checkpoint of the source was saved");
    // The killed run's endpoint notices its input closing only once its current request
    // (an fdatasync of the freshly copied receiver, say) is done; until then it holds the
    // receiver's lock, and a rerun would rightly be refused.
    wait_until(Duration::from_secs(60), "the killed run's endpoint to release the receiver", || {
        fs::File::open(&dst).is_ok_and(|f| f.try_lock().is_ok())
    });

    let mut again = args.clone();
    again.extend(sv(&["--stat", "--verbose"]));
    let r = basyn(&again);
    r.ok();
    assert_same(&src, &dst);
    let local = reads(&r).0;
    assert!(local < size as u64, "the rerun read the whole source again: local {local} bytes{r:?}");
    assert!(r.stdout.contains("fresh checkpoint"), "the rerun did not resume from the source's checkpoint{r:?}");
}

// ---------------------------------------------------------------------------
// A local --state, --remote-state, -b or index --state path replaced whatever was there
// (the source itself, with `--state a.img`); a mistyped `/dev/...` receiver became a file
// in RAM.
// ---------------------------------------------------------------------------

#[test]
fn a_local_state_path_never_replaces_a_device_or_a_foreign_file() {
    let t = tmp();
    let (a, b) = (t.path().join("a.img"), t.path().join("b.img"));
    let data_a = random_image(&a, 81, 2 * MIB);
    let data_b = random_image(&b, 82, 2 * MIB);
    let notes = t.path().join("notes.txt");
    fs::write(&notes, b"precious\n").unwrap();
    let link = t.path().join("link.basyn-state");
    symlink(&notes, &link).unwrap();
    let sync = |extra: &[&str]| {
        let mut args = sv(&["-l", s(&a), "-r", s(&b), "-a", "push", "-m", "sync"]);
        args.extend(sv(extra));
        basyn(&args)
    };
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("--state on the source", vec!["--state", s(&a)]),
        ("--state on the receiver", vec!["--state", s(&b)]),
        ("--state on a foreign file", vec!["--state", s(&notes)]),
        ("--state on a symbolic link", vec!["--state", s(&link)]),
        ("--remote-state on the source", vec!["--remote-state", s(&a)]),
        ("--bitmap on a foreign file", vec!["-b", s(&notes)]),
        ("--bitmap on the receiver", vec!["-b", s(&b)]),
    ];
    for (what, extra) in cases {
        let r = sync(&extra);
        let line = r.fails(1, &[]);
        // A bitmap that is not one is refused as garbage (--reset-bitmap would rebuild it).
        assert!(line.contains("refusing") || line.contains("use --reset-bitmap"), "{what}: {line}");
        assert!(line.contains("state") || line.contains("bitmap"), "{what}: {line}");
        assert_content(&a, &data_a, what);
        assert_content(&b, &data_b, what);
        assert_eq!(fs::read(&notes).unwrap(), b"precious\n", "{what}: the foreign file was replaced");
        assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "{what}: the link was replaced");
    }
    let r = basyn(&sv(&["index", "--state", s(&notes), s(&a)]));
    r.fails(1, &["refusing"]);
    let r = basyn(&sv(&["index", "--state", s(&a), s(&a)]));
    r.fails(1, &["refusing"]);
    assert_content(&a, &data_a, "index");
    assert_eq!(fs::read(&notes).unwrap(), b"precious\n");
}

#[test]
fn a_mistyped_receiver_under_dev_is_not_created() {
    let t = tmp();
    let a = t.path().join("a.img");
    random_image(&a, 83, MIB);
    for name in ["/dev/basyn-test-no-such-device", "/dev/loop999p2"] {
        let dev = Path::new(name);
        let r = basyn(&sv(&["-l", s(&a), "-r", name, "-a", "push", "-m", "copy", "--no-state"]));
        r.fails(1, &["no such device", name]);
        assert!(!dev.exists(), "{name} was created");
        let r = basyn(&sv(&["-l", name, "-r", s(&a), "-a", "pull", "-m", "copy", "--no-state"]));
        r.fails(1, &["no such device"]);
        assert!(!dev.exists(), "{name} was created by a PULL");
    }
}

/// `/dev/shm` (a tmpfs mounted under `/dev`) was taken for `/dev` itself: a COPY into a
/// new image there was refused as "no such device", naming a file system that was not
/// a pseudo one.
#[test]
fn a_new_receiver_on_a_file_system_mounted_under_dev_is_created() {
    use std::os::unix::fs::MetadataExt;
    let shm = Path::new("/dev/shm");
    let separate = fs::metadata(shm).ok().zip(fs::metadata("/dev").ok()).is_some_and(|(a, b)| a.dev() != b.dev());
    if !require(separate, "/dev/shm mounted apart from /dev") {
        return;
    }
    let t = tempfile::tempdir_in(shm).unwrap();
    let a = t.path().join("a.img");
    let data = random_image(&a, 84, MIB);
    let b = t.path().join("new.img");
    basyn(&sv(&["-l", s(&a), "-r", s(&b), "-a", "push", "-m", "copy", "--no-state"])).ok();
    assert_content(&b, &data, "a copy into /dev/shm");
}

/// Under a file size limit (`ulimit -f`), creating a receiver killed the endpoint with
/// SIGXFSZ and left a 0-byte file that every later run refused ("size 0 differs").
#[test]
fn efbig_while_creating_a_receiver_leaves_nothing_behind() {
    let t = tmp();
    let a = t.path().join("a.img");
    random_image(&a, 84, 4 * MIB);
    for dir in ["push", "pull"] {
        let new = t.path().join(format!("new-{dir}.img"));
        let (l, r) = if dir == "push" { (&a, &new) } else { (&new, &a) };
        let args = sv(&["-l", s(l), "-r", s(r), "-a", dir, "-m", "copy", "--no-state"]);
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c").arg("ulimit -f 1000; exec \"$0\" \"$@\"").arg(env!("CARGO_BIN_EXE_basyn")).args(&args);
        cmd.env_remove("CI").stdin(std::process::Stdio::null());
        let run = spawn(cmd, &args).finish();
        run.fails(1, &["file too large", "nothing was kept", s(&new)]);
        assert!(!new.exists(), "{dir}: the receiver that could not be sized was left behind{run:?}");
    }
}

/// A process that keeps a shared writable mapping of the source wrote a page before a run
/// and the same page again after it. The page was still dirty and writable when the
/// source was stamped, so the second write took no page fault and moved neither mtime nor
/// ctime: the next run trusted both states, read nothing and exited 0 with the receiver
/// differing. The source's dirty pages are now written back before it is stamped, which
/// write-protects them.
#[test]
fn an_mmap_writer_rewriting_a_dirty_page_after_the_stamp_is_caught() {
    let t = tmp();
    let (a, b) = (t.path().join("a.img"), t.path().join("b.img"));
    let len = 4 * MIB;
    random_image(&a, 85, len);
    let f = fs::OpenOptions::new().read(true).write(true).open(&a).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: a shared mapping of a file of `len` bytes that stays open for the whole test,
    // written only inside its bounds, unmapped at the end.
    let map = unsafe {
        libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, f.as_raw_fd(), 0)
    };
    assert_ne!(map, libc::MAP_FAILED, "mmap failed");
    let poke_map = |at: usize, v: u8| unsafe { *(map as *mut u8).add(at) = v };
    let args = sv(&["-l", s(&a), "-r", s(&b), "-a", "push", "-m", "sync", "--stat"]);
    poke_map(3 * 4096 + 10, 0x11);
    basyn(&args).ok();
    assert_same(&a, &b);
    // The same page again, through the mapping: no system call at all.
    poke_map(3 * 4096 + 20, 0x22);
    let r = basyn(&args);
    r.ok();
    assert_same(&a, &b);
    assert!(r.stat().local_read > 0, "the rewritten source was not read{r:?}");
    // SAFETY: the mapping made above, no longer used.
    unsafe { libc::munmap(map, len) };
}

/// On a file system with one-second timestamps (ext4 with 128-byte inodes), a write in
/// the same second as a stamp left mtime and ctime as they were: the next run trusted the
/// state, read nothing and exited 0 with the devices differing. A file whose ctime has no
/// nanoseconds is now stamped only once its last change is older than the coarsest
/// granularity, so any later write moves its timestamps. Both sides: a source written
/// right after a run, and a receiver written right after basyn wrote it.
#[test]
fn a_write_in_the_same_second_on_a_coarse_timestamp_file_system_is_caught() {
    let _l = loops();
    let t = tmp();
    let img = t.path().join("fs.img");
    sparse(&img, 64 * MIB as u64);
    let Some(dev) = loop_dev(&img) else { return };
    let Some(m) = mount_ext4_with(dev.path(), &t.path().join("mnt"), &["-I", "128"]) else { return };
    let (a, b) = (m.dir.join("a.img"), m.dir.join("b.img"));
    random_image(&a, 86, 4 * MIB);
    let args = sv(&["-l", s(&a), "-r", s(&b), "-a", "push", "-m", "sync", "--stat"]);
    basyn(&args).ok();
    assert_same(&a, &b);
    use std::os::unix::fs::MetadataExt;
    let nsec = fs::metadata(&a).unwrap().ctime_nsec();
    assert_eq!(nsec, 0, "ext4 -I 128 keeps sub-second timestamps here: the test's premise fails");
    for (what, changed) in [("source", &a), ("receiver", &b)] {
        // Start at the beginning of a second, so that the run and the write after it fall
        // into it (as they would without the settling).
        while std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_millis() > 20 {
            std::thread::sleep(Duration::from_millis(5));
        }
        poke(&a, MIB as u64 + 7, what.as_bytes());
        basyn(&args).ok();
        poke(changed, 2 * MIB as u64 + 9, b"written in the same second");
        basyn(&args).ok();
        assert_same(&a, &b);
    }
}

/// Bytes written by `pid` and its direct children (a local run's endpoint is a thread of
/// it, or a child under --bwlimit).
fn wrote(pid: u32) -> u64 {
    io_counter(pid, "wchar") + child_pids(pid).into_iter().map(|p| io_counter(p, "wchar")).sum::<u64>()
}

/// Direct children of `pid`.
fn child_pids(pid: u32) -> Vec<u32> {
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten();
    tasks
        .filter_map(|t| fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|text| text.split_whitespace().filter_map(|x| x.parse().ok()).collect::<Vec<u32>>())
        .collect()
}

/// A `basyn serve` stopped with SIGSTOP stalled the client for as long as it stayed
/// stopped: the pipe (or ssh link) was alive, so nothing ever failed. Now a live endpoint
/// says KeepAlive every second, and after `--timeout` seconds of silence the client ends the
/// run with exit 2, naming the device and the wait; a rerun converges.
#[test]
fn a_stopped_endpoint_fails_the_run_within_its_timeout() {
    let t = tmp();
    let (a, b) = (t.path().join("a.img"), t.path().join("b.img"));
    random_image(&a, 87, 256 * MIB);
    random_image(&b, 88, 256 * MIB);
    // A local endpoint is a thread of the run, which no signal stops on its own; under
    // --bwlimit it is a child process over pipes, which is what this stops.
    let args =
        sv(&["-l", s(&a), "-r", s(&b), "-a", "push", "-m", "sync", "--no-state", "--timeout", "5", "--bwlimit", "4G"]);
    let mut run = start(&args, &[]);
    let mut serve = None;
    wait_until(Duration::from_secs(60), "the endpoint to read 16 MiB", || {
        serve = child_pids(run.pid()).into_iter().find(|&p| io_counter(p, "rchar") >= 16 * MIB as u64);
        serve.is_some() || !run.running()
    });
    let Some(serve) = serve else { panic!("the run ended before its endpoint could be stopped{:?}", run.finish()) };
    // SAFETY: sending a signal to the endpoint process this test's basyn started.
    unsafe { libc::kill(serve as i32, libc::SIGSTOP) };
    let started = std::time::Instant::now();
    let r = run.finish();
    let waited = started.elapsed();
    r.fails(2, &["nothing heard from the endpoint for 5 s", "--timeout 5", &format!("remote {}", s(&b))]);
    assert!(waited < Duration::from_secs(20), "the run took {waited:?} to give up on a stopped endpoint{r:?}");
    wait_until(Duration::from_secs(10), "the stopped endpoint to be killed", || {
        fs::read_to_string(format!("/proc/{serve}/stat")).map_or(true, |st| st.contains(") Z"))
    });
    let r = basyn(&sv(&["-l", s(&a), "-r", s(&b), "-a", "push", "-m", "sync", "--no-state"]));
    r.ok();
    assert_same(&a, &b);
}

/// Another process writing a regular-file receiver during a run went unseen: basyn's own
/// writes and another writer's look the same in a file's timestamps, so the run ended
/// with exit 0 and a fresh state over data that differed. A regular-file receiver now
/// holds a write lease, which the kernel breaks when anyone else opens the file: the run
/// ends with exit 2, no state is kept for the receiver, and a rerun converges.
#[test]
fn a_regular_file_receiver_written_by_another_process_during_the_run_is_reported() {
    let t = tmp();
    let (a, b) = (t.path().join("a.img"), t.path().join("b.img"));
    random_image(&a, 89, 256 * MIB);
    random_image(&b, 90, 256 * MIB);
    let args = sv(&["-l", s(&a), "-r", s(&b), "-a", "push", "-m", "sync"]);
    let mut run = start(&args, &[]);
    let mut written = false;
    wait_until(Duration::from_secs(60), "the run to write 8 MiB", || {
        written = wrote(run.pid()) >= 8 * MIB as u64;
        written || !run.running()
    });
    assert!(written, "the run ended before the receiver could be written{:?}", run.finish());
    poke(&b, 200 * MIB as u64, b"written by someone else");
    let r = run.finish();
    r.fails(2, &["written to by another process", s(&b)]);
    let state = state_of(&b);
    assert!(!state.exists(), "a state was kept for a receiver written by another process{r:?}");
    basyn(&args).ok();
    assert_same(&a, &b);
}

/// A regular-file receiver another process has open (a running VM's disk, another copy)
/// cannot be watched: it is in use, refused unless --force.
#[test]
fn a_regular_file_receiver_open_in_another_process_is_in_use() {
    let t = tmp();
    let (a, b) = (t.path().join("a.img"), t.path().join("b.img"));
    random_image(&a, 91, MIB);
    random_image(&b, 92, MIB);
    let holder = std::process::Command::new("sleep").arg("60").stdin(File::open(&b).unwrap()).spawn().unwrap();
    let args = sv(&["-l", s(&a), "-r", s(&b), "-a", "push", "-m", "sync"]);
    basyn(&args).fails(1, &["in use", "another process has it open", s(&b)]);
    let mut forced = args.clone();
    forced.push("--force".into());
    basyn(&forced).ok();
    assert_same(&a, &b);
    let mut holder = holder;
    let _ = holder.kill();
    let _ = holder.wait();
}

/// Another process writing the backing file of a loop-device receiver during a run went
/// unseen: the write bypasses the loop device (its counters do not move), and the backing
/// file's timestamps move with basyn's own writes too, so the run ended with exit 0 and a
/// fresh state over data that differed. basyn now watches the backing file for other
/// openers (inotify `IN_OPEN`): the run ends with exit 2, no state is kept, and a rerun
/// converges.
#[test]
fn a_loop_receivers_backing_file_written_by_another_process_during_the_run_is_reported() {
    let _l = loops();
    let t = tmp();
    let (a, backing) = (t.path().join("a.img"), t.path().join("b.img"));
    random_image(&a, 93, 256 * MIB);
    random_image(&backing, 94, 256 * MIB);
    let Some(dev) = Loop::attach(&backing) else { return };
    let args = sv(&["-l", s(&a), "-r", dev.s(), "-a", "push", "-m", "sync"]);
    let mut run = start(&args, &[]);
    let mut written = false;
    wait_until(Duration::from_secs(60), "the run to write 8 MiB", || {
        written = wrote(run.pid()) >= 8 * MIB as u64;
        written || !run.running()
    });
    assert!(written, "the run ended before the receiver could be written{:?}", run.finish());
    poke(&backing, 200 * MIB as u64, b"written by someone else");
    let r = run.finish();
    r.fails(2, &["written to by another process", dev.s()]);
    assert!(!dev.state().exists(), "a state was kept for a receiver written by another process{r:?}");
    basyn(&args).ok();
    assert_same(&a, dev.path());
}

/// A loop-device receiver whose backing file another process has open cannot be
/// watched: it is in use (naming the process), refused unless --force.
#[test]
fn a_loop_receiver_whose_backing_file_is_open_in_another_process_is_in_use() {
    let _l = loops();
    let t = tmp();
    let (a, backing) = (t.path().join("a.img"), t.path().join("b.img"));
    random_image(&a, 95, MIB);
    random_image(&backing, 96, MIB);
    let Some(dev) = Loop::attach(&backing) else { return };
    let mut holder =
        std::process::Command::new("sleep").arg("60").stdin(File::open(&backing).unwrap()).spawn().unwrap();
    let args = sv(&["-l", s(&a), "-r", dev.s(), "-a", "push", "-m", "sync"]);
    let pid = holder.id().to_string();
    basyn(&args).fails(1, &["in use", "(sleep) has its backing file", &pid, dev.s()]);
    let mut forced = args.clone();
    forced.push("--force".into());
    basyn(&forced).ok();
    let _ = holder.kill();
    let _ = holder.wait();
    assert_same(&a, dev.path());
}
