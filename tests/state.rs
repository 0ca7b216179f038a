//! Integration tests of the `.basyn-state` files (issue 4, DESIGN "State and freshness"):
//! unchanged re-syncs that read nothing, changes behind basyn's back that are always
//! caught, bad state files that are rebuilt, locking, a source written during the run,
//! and a kill -9 followed by a rerun.
//!
//! Reads of real block devices are counted with the kernel's own counter: field 3
//! (sectors read) of `/sys/class/block/loopN/stat`, after `blockdev --flushbufs` so that
//! the loop device's page cache cannot answer a read that basyn makes. (basyn reads
//! through `/dev/loopN`, so every read that is not served from that cache reaches the
//! loop driver and is counted there, whatever the backing file's cache holds; the
//! backing file's cache is dropped too, with `posix_fadvise(DONTNEED)`, so the loop
//! driver really reads its disk.) The state files of loop devices live in
//! the tests' state directory (`util::state_dir`); the guards here delete them.
//!
//! Geometry: small images (8–32 MiB) with `--buffer 4` (4 KiB leaves), so there are
//! thousands of leaves and the trees have three levels.

mod util;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use util::*;

/// Leaf size used by most tests, in KiB.
const LEAF_KB: &str = "4";
const LEAF: u64 = 4096;
/// The variable that replaces the boot id (a simulated reboot).
const BOOT_ID_ENV: &str = "BASYN_TEST_BOOT_ID";

// ---------------------------------------------------------------------------
// Running basyn (with an environment, or in the background)
// ---------------------------------------------------------------------------

/// Runs basyn with extra environment variables (and without `CI` or a boot id override
/// unless given).
fn basyn_env(args: &[String], env: &[(&str, &str)]) -> Run {
    start(args, env).finish()
}

fn run(args: &[String]) -> Run {
    basyn_env(args, &[])
}

impl Dir {
    /// Side words of (source, receiver).
    fn sides(self) -> (&'static str, &'static str) {
        match self {
            Dir::Push => ("local", "remote"),
            Dir::Pull => ("remote", "local"),
        }
    }
}

/// `-l -r -a -m` for an action from `source` to `receiver`, with `--stat --verbose`
/// and `extra` (which must give the geometry).
fn action(dir: Dir, mode: &str, source: &Path, receiver: &Path, extra: &[&str]) -> Vec<String> {
    let mut e = vec!["--stat", "--verbose"];
    e.extend_from_slice(extra);
    util::action(dir, mode, source, receiver, &e)
}

/// A SYNC with 4 KiB leaves.
fn sync(dir: Dir, source: &Path, receiver: &Path, extra: &[&str]) -> Vec<String> {
    let mut e = vec!["--buffer", LEAF_KB];
    e.extend_from_slice(extra);
    action(dir, "sync", source, receiver, &e)
}

/// `--recheck` without an action, with 4 KiB leaves.
fn recheck(local: &Path, remote: &Path) -> Vec<String> {
    sv(&["-l", s(local), "-r", s(remote), "--recheck", "--buffer", LEAF_KB, "--stat", "--verbose"])
}

/// `basyn index DEVICE` with 4 KiB leaves and `extra`.
fn index(device: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = sv(&["index", s(device), "--buffer", LEAF_KB, "--stat", "--verbose"]);
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

/// Asserts the run read nothing at all (`--stat`'s `Read:` line).
#[track_caller]
fn assert_read_nothing(run: &Run) {
    assert!(run.stat().read_nothing(), "the run read device data{run:?}");
}

/// Asserts that some `--verbose` line mentions the state file `name` being rebuilt.
#[track_caller]
fn assert_rebuilt(run: &Run, name: &str) {
    assert!(
        run.stdout.lines().any(|l| l.contains(name) && l.contains("rebuild")),
        "--verbose does not say that {name} is rebuilt{run:?}"
    );
}

// ---------------------------------------------------------------------------
// Data, files, processes
// ---------------------------------------------------------------------------

/// `dd if=/dev/urandom of=PATH bs=4096 seek=BLOCK count=COUNT conv=notrunc`, with
/// `oflag=direct` if `direct` (else the data is left in the page cache).
fn dd(path: &Path, block: u64, count: u64, direct: bool) {
    let mut args = vec![
        "if=/dev/urandom".to_string(),
        format!("of={}", s(path)),
        "bs=4096".into(),
        format!("seek={block}"),
        format!("count={count}"),
        "iflag=fullblock".into(),
        "conv=notrunc".into(),
        "status=none".into(),
    ];
    if direct {
        args.push("oflag=direct".into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    tool("dd", &args).unwrap_or_else(|e| panic!("{e}"));
}

/// Compares two large files or devices piecewise.
#[track_caller]
fn assert_same_stream(a: &Path, b: &Path) {
    if let Some(at) = stream_difference(a, b) {
        panic!("{} and {} differ at offset {at}", a.display(), b.display());
    }
}

/// Flushes the file's dirty pages and drops it from the page cache.
fn drop_file_cache(path: &Path) {
    if let Ok(f) = File::open(path) {
        let _ = f.sync_data();
        // SAFETY: posix_fadvise on an open descriptor has no memory-safety preconditions.
        unsafe {
            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }
}

/// Direct children of `pid` (all its threads).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for t in tasks.flatten() {
        if let Ok(text) = fs::read_to_string(t.path().join("children")) {
            out.extend(text.split_whitespace().filter_map(|x| x.parse::<u32>().ok()));
        }
    }
    out
}

/// `pid` and all its descendants.
fn process_tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let more = children(all[i]);
        all.extend(more);
        i += 1;
    }
    all
}

/// Waits until basyn's process tree has `field` (of `/proc/PID/io`) ≥ `bytes`; false if
/// it ended first.
fn wait_for_io(r: &mut Running, field: &str, bytes: u64) -> bool {
    let mut reached = false;
    wait_until(Duration::from_secs(60), &format!("basyn's {field} to reach {bytes} bytes, or basyn to end"), || {
        if !r.running() {
            return true;
        }
        reached = process_tree(r.pid()).iter().map(|p| io_counter(*p, field)).sum::<u64>() >= bytes;
        reached
    });
    reached
}

/// True once `pid` has exited (gone, or a zombie nobody reaped).
fn exited(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

/// (seconds, nanoseconds) of a file's mtime.
fn mtime(path: &Path) -> (i64, i64) {
    let m = fs::metadata(path).unwrap();
    (m.mtime(), m.mtime_nsec())
}

/// Lists files in `dir` whose name contains `.tmp` (leftovers of a non-atomic save).
fn temp_leftovers(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect()
}

/// Holds an exclusive `flock` on a device, as another basyn would.
fn hold_lock(path: &Path) -> File {
    let f = File::open(path).unwrap();
    f.lock().expect("cannot lock");
    f
}

// ---------------------------------------------------------------------------
// Loop devices
// ---------------------------------------------------------------------------

/// A loop device over an image file; its state in /var/lib/basyn is deleted when it is
/// attached (a stale one from an earlier user of loopN) and when it is dropped.
struct Loop {
    img: PathBuf,
    name: String,
    dev: LoopDev,
}

impl Loop {
    fn new(dir: &Path, file: &str, data: &[u8]) -> Option<Loop> {
        let img = dir.join(file);
        write(&img, data);
        let dev = loop_dev(&img)?;
        let name = dev.path().file_name().unwrap().to_string_lossy().into_owned();
        let l = Loop { img, name, dev };
        l.forget_state();
        assert_eq!(size_of(l.path()), data.len() as u64, "loop device size");
        Some(l)
    }

    fn path(&self) -> &Path {
        self.dev.path()
    }

    /// Its default state file.
    fn state(&self) -> PathBuf {
        state_file_for(&self.name)
    }

    fn forget_state(&self) {
        forget_state(&self.name);
    }

    /// Sectors read so far.
    fn sectors_read(&self) -> u64 {
        sectors_read(&self.name)
    }

    /// No cached data of the device or its backing file can answer a read.
    fn quiesce(&self) {
        flushbufs(self.path());
        drop_file_cache(&self.img);
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        self.forget_state();
    }
}

fn state_file_for(kernel_name: &str) -> PathBuf {
    state_dir().join(format!("dev_{kernel_name}.basyn-state"))
}

/// Deletes the default state of a block device (and any temp file of a save).
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

/// Sectors read so far from block device `kernel_name`: field 3 of the kernel's
/// `/sys/class/block/NAME/stat` (not basyn's `--stat`).
fn sectors_read(kernel_name: &str) -> u64 {
    let text = fs::read_to_string(format!("/sys/class/block/{kernel_name}/stat")).unwrap();
    text.split_whitespace().nth(2).unwrap().parse().unwrap()
}

/// Something whose reads are counted by the kernel.
trait Counted {
    fn quiesce(&self);
    fn sectors_read(&self) -> u64;
}

impl Counted for Loop {
    fn quiesce(&self) {
        Loop::quiesce(self);
    }
    fn sectors_read(&self) -> u64 {
        Loop::sectors_read(self)
    }
}

/// Runs basyn with caches dropped and returns it with the sectors read from each device.
fn measured(devices: &[&dyn Counted], args: &[String], env: &[(&str, &str)]) -> (Run, Vec<u64>) {
    for d in devices {
        d.quiesce();
    }
    let before: Vec<u64> = devices.iter().map(|d| d.sectors_read()).collect();
    let r = basyn_env(args, env);
    let delta = devices.iter().zip(before).map(|(d, b)| d.sectors_read() - b).collect();
    (r, delta)
}

/// Asserts two loop devices hold the same bytes (read past any stale cache).
#[track_caller]
fn assert_loops_same(a: &Loop, b: &Loop) {
    flushbufs(a.path());
    flushbufs(b.path());
    assert_same(a.path(), b.path());
}

/// Two loop devices: a random source and a receiver that differs from it in a few places.
fn loop_pair(dir: &Path, size: usize, seed: u64) -> Option<(Loop, Loop, Vec<u8>)> {
    let data = random_data(seed, size);
    let mut other = data.clone();
    for at in [0, 5 * 4096 + 17, size / 2, size - 1] {
        other[at] ^= 0xff;
    }
    let src = Loop::new(dir, "src.img", &data)?;
    let rcv = Loop::new(dir, "rcv.img", &other)?;
    Some((src, rcv, data))
}

// ===========================================================================
// Loop devices: reads counted by the kernel
// ===========================================================================

#[test]
fn loop_unchanged_resync_reads_nothing_and_a_changed_source_leaves_the_receiver_unread() {
    let size = 16 * MIB;
    let t = tmp();
    let Some((src, rcv, _)) = loop_pair(t.path(), size, 11) else { return };
    let args = sync(Dir::Push, src.path(), rcv.path(), &[]);
    let devs: [&dyn Counted; 2] = [&src, &rcv];
    let sectors = size as u64 / 512;

    // The first sync reads both devices (which proves the counters see basyn's reads)
    // and builds both states.
    let (r, d) = measured(&devs, &args, &[]);
    r.ok();
    assert!(d[0] >= sectors && d[1] >= sectors, "first sync: sectors read {d:?}, expected ≥ {sectors} each{r:?}");
    assert!(src.state().is_file() && rcv.state().is_file(), "no state files in {}{r:?}", state_dir().display());
    assert_loops_same(&src, &rcv);

    // Unchanged: nothing is read from either device.
    let (r, d) = measured(&devs, &args, &[]);
    r.ok();
    assert_eq!(d, [0, 0], "an unchanged re-sync read sectors (source, receiver){r:?}");
    assert_read_nothing(&r);
    let f = r.stat();
    assert_eq!(f.written, 0, "{r:?}");
    assert!(f.nodes >= 1, "no tree node compared{r:?}");

    // A few 4 KiB blocks written to the source: the receiver is not read.
    for block in [3, 1000, 4000] {
        dd(src.path(), block, 1, true);
    }
    let (r, d) = measured(&devs, &args, &[]);
    r.ok();
    let f = r.stat();
    assert_eq!(d[1], 0, "the receiver was read ({} sectors) after a change of the source{r:?}", d[1]);
    assert_eq!(f.remote_read, 0, "{r:?}");
    assert!(d[0] > 0, "the changed source was not read{r:?}");
    assert_eq!((f.differing, f.written), (3, 3 * LEAF), "{r:?}");
    assert_loops_same(&src, &rcv);

    // Unchanged again: the receiver's state followed basyn's own writes.
    let (r, d) = measured(&devs, &args, &[]);
    r.ok();
    assert_eq!(d, [0, 0], "{r:?}");
    assert_read_nothing(&r);

    // A changed source re-indexed: both states fresh, the trees are walked; only the
    // differing leaf is read (to be sent), the receiver not at all.
    dd(src.path(), 2000, 1, true);
    run(&index(src.path(), &[])).ok();
    let (r, d) = measured(&devs, &args, &[]);
    r.ok();
    let f = r.stat();
    assert_eq!(d[1], 0, "tree walk read the receiver{r:?}");
    assert_eq!(f.remote_read, 0, "{r:?}");
    assert!(f.local_read <= LEAF, "tree walk read {} bytes of the source for one leaf{r:?}", f.local_read);
    let leaves = size as u64 / LEAF;
    assert!(f.nodes > 1 && f.nodes < leaves / 4, "tree walk compared {} nodes{r:?}", f.nodes);
    assert_eq!((f.differing, f.written), (1, LEAF), "{r:?}");
    assert_loops_same(&src, &rcv);
}

#[test]
fn loop_writes_behind_basyns_back_are_caught() {
    let size = 16 * MIB;
    let t = tmp();
    let Some((src, rcv, _)) = loop_pair(t.path(), size, 12) else { return };
    let args = sync(Dir::Push, src.path(), rcv.path(), &[]);
    let devs: [&dyn Counted; 2] = [&src, &rcv];
    run(&args).ok();
    assert_loops_same(&src, &rcv);

    type Change<'a> = (&'a str, Box<dyn Fn() + 'a>);
    let changes: Vec<Change> = vec![
        ("dd to the receiver (O_DIRECT)", Box::new(|| dd(rcv.path(), 17, 1, true))),
        ("dd to the receiver (left in the page cache)", Box::new(|| dd(rcv.path(), 2500, 2, false))),
        ("dd to the source (O_DIRECT)", Box::new(|| dd(src.path(), 33, 1, true))),
        ("dd to the source (left in the page cache)", Box::new(|| dd(src.path(), 3100, 1, false))),
        ("a write to the receiver's backing file", Box::new(|| flip(&rcv.img, 7 * LEAF + 100, 10))),
        ("a write to the source's backing file", Box::new(|| flip(&src.img, 3900 * LEAF, 4096))),
    ];
    for (what, change) in changes {
        change();
        let (r, d) = measured(&devs, &args, &[]);
        r.ok();
        assert!(d.iter().any(|n| *n > 0), "{what}: nothing was read, so the change cannot have been seen{r:?}");
        flushbufs(src.path());
        flushbufs(rcv.path());
        let (a, b) = (read(src.path()), read(rcv.path()));
        if let Some(at) = first_difference(&a, &b) {
            panic!("{what}: the devices differ at offset {at} after the sync{r:?}");
        }
        // The rebuilt states are valid: the next run reads nothing.
        let (r, d) = measured(&devs, &args, &[]);
        r.ok();
        assert_eq!(d, [0, 0], "{what}: the states were not valid after the catch-up{r:?}");
    }
}

#[test]
fn loop_simulated_reboot_makes_states_unverifiable_unless_trusted() {
    let size = 16 * MIB;
    let t = tmp();
    let Some((src, rcv, _)) = loop_pair(t.path(), size, 13) else { return };
    let args = sync(Dir::Push, src.path(), rcv.path(), &[]);
    let devs: [&dyn Counted; 2] = [&src, &rcv];
    run(&args).ok();

    // Another boot, no writes: the stamps cannot be verified, both devices are read.
    let (r, d) = measured(&devs, &args, &[(BOOT_ID_ENV, "simulated-boot-1")]);
    r.ok();
    let f = r.stat();
    assert!(d[0] > 0 && d[1] > 0, "after a reboot a state was used without --trust-state: sectors {d:?}{r:?}");
    assert!(f.local_read >= size as u64 && f.remote_read >= size as u64, "{r:?}");
    assert_loops_same(&src, &rcv);

    // Writes, then another boot: read and caught.
    dd(rcv.path(), 100, 1, true);
    dd(src.path(), 3000, 1, true);
    let (r, d) = measured(&devs, &args, &[(BOOT_ID_ENV, "simulated-boot-2")]);
    r.ok();
    assert!(d[0] > 0 && d[1] > 0, "sectors read {d:?}{r:?}");
    assert_loops_same(&src, &rcv);

    // With --trust-state and no writes, the unverifiable states are used.
    let mut trusted = args.clone();
    trusted.push("--trust-state".into());
    let (r, d) = measured(&devs, &trusted, &[(BOOT_ID_ENV, "simulated-boot-3")]);
    r.ok();
    assert_eq!(d, [0, 0], "--trust-state after a reboot still read the devices{r:?}");
    assert_read_nothing(&r);
}

#[test]
fn loop_recheck_answers_from_fresh_states_and_catches_changes() {
    let size = 16 * MIB;
    let t = tmp();
    let Some((src, rcv, _)) = loop_pair(t.path(), size, 14) else { return };
    let devs: [&dyn Counted; 2] = [&src, &rcv];
    let args = sync(Dir::Push, src.path(), rcv.path(), &[]);
    run(&args).ok();

    let check = recheck(src.path(), rcv.path());
    let (r, d) = measured(&devs, &check, &[]);
    r.ok();
    assert_eq!(d, [0, 0], "--recheck with fresh states read the devices{r:?}");
    assert_read_nothing(&r);

    // --recheck after an action re-reads the devices, whatever the states say.
    let mut then_check = args.clone();
    then_check.push("--recheck".into());
    let (r, d) = measured(&devs, &then_check, &[]);
    r.ok();
    let f = r.stat();
    let sectors = size as u64 / 512;
    assert!(d[0] >= sectors && d[1] >= sectors, "--recheck after SYNC did not read the devices: {d:?}{r:?}");
    assert!(f.local_read >= size as u64 && f.remote_read >= size as u64, "{r:?}");

    // A change behind basyn's back to either device: the check reports differences.
    for (what, dev) in [("receiver", &rcv), ("source", &src)] {
        dd(dev.path(), 1234, 1, true);
        let r = run(&check);
        assert_eq!(r.code, 3, "--recheck after a write to the {what} did not find the difference{r:?}");
        run(&args).ok();
        let (r, d) = measured(&devs, &check, &[]);
        r.ok();
        assert_eq!(d, [0, 0], "{r:?}");
    }
}

#[test]
fn loop_lock_held_by_another_basyn_refuses_the_run() {
    let size = 8 * MIB;
    let t = tmp();
    let Some((src, rcv, _)) = loop_pair(t.path(), size, 15) else { return };
    let before = read(rcv.path());
    let args = sync(Dir::Push, src.path(), rcv.path(), &[]);
    for (side, dev) in [("local", &src), ("remote", &rcv)] {
        let lock = hold_lock(dev.path());
        let r = run(&args);
        r.fails(1, &["in use by another basyn", side, dev.dev.s()]);
        drop(lock);
        flushbufs(rcv.path());
        assert_content(rcv.path(), &before, "receiver after a refused run");
    }
    run(&args).ok();
    assert_loops_same(&src, &rcv);
}

#[test]
fn loop_state_of_a_loop_device_reattached_to_another_file_is_not_used() {
    let size = 8 * MIB;
    let t = tmp();
    let first = random_data(16, size);
    let second = random_data(17, size);
    let receiver = t.path().join("r.img");
    write(&receiver, &first);
    let st = t.path().join("loop.state");
    let extra = ["--state", s(&st)];
    {
        let Some(l) = Loop::new(t.path(), "one.img", &first) else { return };
        run(&sync(Dir::Push, l.path(), &receiver, &extra)).ok();
        let r = run(&sync(Dir::Push, l.path(), &receiver, &extra));
        r.ok();
        assert_read_nothing(&r);
    }
    let Some(l) = Loop::new(t.path(), "two.img", &second) else { return };
    let r = run(&sync(Dir::Push, l.path(), &receiver, &extra));
    r.ok();
    assert_content(&receiver, &second, &format!("receiver after syncing from the re-attached loop device{r:?}"));
}

/// A loop device over an image with one MBR partition, the partition added with
/// `partx -a` (its node `/dev/loopNp1`).
struct Partition {
    path: PathBuf,
    name: String,
    disk: Loop,
}

impl Partition {
    /// An image of `size + 1 MiB` with a partition of `size` bytes at 1 MiB.
    fn new(dir: &Path, size: usize) -> Option<Partition> {
        if !require_root() || !require_tool("partx") {
            return None;
        }
        let mut image = vec![0u8; MIB + size];
        let entry = &mut image[446..462];
        entry[4] = 0x83; // Linux
        entry[8..12].copy_from_slice(&2048u32.to_le_bytes());
        entry[12..16].copy_from_slice(&((size / 512) as u32).to_le_bytes());
        image[510] = 0x55;
        image[511] = 0xaa;
        let disk = Loop::new(dir, "disk.img", &image)?;
        prerequisite(tool("partx", &["-a", disk.dev.s()]).map(|_| ()))?;
        let name = format!("{}p1", disk.name);
        let path = PathBuf::from(format!("/dev/{name}"));
        // udev may take a moment; a node that never comes is a missing prerequisite.
        poll(Duration::from_secs(5), || path.exists());
        let p = Partition { path, name, disk };
        if !require(p.path.exists(), "partx -a created no partition device node") {
            return None;
        }
        forget_state(&p.name);
        assert_eq!(size_of(&p.path), size as u64, "partition size");
        Some(p)
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        forget_state(&self.name);
        let _ = tool("partx", &["-d", self.disk.dev.s()]);
    }
}

impl Counted for Partition {
    fn quiesce(&self) {
        flushbufs(&self.path);
        self.disk.quiesce();
    }
    fn sectors_read(&self) -> u64 {
        sectors_read(&self.name)
    }
}

#[test]
fn loop_partition_written_through_its_whole_disk_is_caught() {
    let size = 16 * MIB;
    let t = tmp();
    let Some(part) = Partition::new(t.path(), size) else { return };
    let source = t.path().join("s.img");
    let data = random_image(&source, 18, size);
    let args = sync(Dir::Push, &source, &part.path, &[]);
    run(&args).ok();
    let devs: [&dyn Counted; 1] = [&part];
    let (r, d) = measured(&devs, &args, &[]);
    r.ok();
    assert_eq!(d, [0], "unchanged re-sync read the partition{r:?}");
    assert_read_nothing(&r);

    // Written through the whole disk: the partition's own counters do not move, its
    // disk's do.
    let block_in_disk = (MIB as u64 + 10 * LEAF) / 4096;
    dd(part.disk.path(), block_in_disk, 1, true);
    let (r, _) = measured(&devs, &args, &[]);
    r.ok();
    flushbufs(&part.path);
    assert_content(&part.path, &data, &format!("partition after the sync{r:?}"));
}

/// A write to the receiver by another process while basyn runs must not end up in a
/// state stamped fresh: the next sync (or check) would trust old digests for it.
#[test]
fn loop_receiver_written_during_a_run_is_not_absorbed_into_a_fresh_state() {
    let size = 32 * MIB;
    let t = tmp();
    let data = random_data(19, size);
    let Some(src) = Loop::new(t.path(), "src.img", &data) else { return };
    let Some(rcv) = Loop::new(t.path(), "rcv.img", &data) else { return };
    // A slow hash, so that the source's full read leaves time to write meanwhile.
    let args = sync(Dir::Push, src.path(), rcv.path(), &["--hash", "sha512"]);
    run(&args).ok();
    // The source changes (its state goes stale: it is read in full); the receiver's
    // state stays fresh, so the receiver is not read.
    dd(src.path(), 1, 1, true);
    src.quiesce();
    let mut bg = start(&args, &[]);
    let mid_run = wait_for_io(&mut bg, "rchar", 8 * MIB as u64);
    // A block that is equal on both sides, so basyn has no reason to touch it.
    dd(rcv.path(), 7000, 1, true);
    let still_running = bg.running();
    let r = bg.finish();
    assert!(mid_run && still_running, "basyn finished before the receiver could be written during the run{r:?}");
    assert!(r.code == 0 || r.code == 2, "{r:?}");
    flushbufs(src.path());
    flushbufs(rcv.path());
    let differ = first_difference(&read(src.path()), &read(rcv.path())).is_some();
    let mut check = recheck(src.path(), rcv.path());
    check.extend(sv(&["--hash", "sha512"]));
    let check = run(&check);
    if differ {
        assert_eq!(check.code, 3, "the devices differ but --recheck (from the states) says they do not{check:?}");
    }
    let r = run(&args);
    r.ok();
    flushbufs(rcv.path());
    let got = read(rcv.path());
    flushbufs(src.path());
    if let Some(at) = first_difference(&read(src.path()), &got) {
        panic!("a SYNC after the run still leaves the devices different at offset {at}{r:?}");
    }
}

// ===========================================================================
// Image files
// ===========================================================================

/// A source image, and a receiver equal to it except in a few places.
fn file_pair(dir: &Path, size: usize, seed: u64) -> (PathBuf, PathBuf, Vec<u8>) {
    let a = dir.join("a.img");
    let b = dir.join("b.img");
    let data = random_image(&a, seed, size);
    let mut other = data.clone();
    for at in [1, 3 * 4096, size / 3, size - 2] {
        other[at] ^= 0x3c;
    }
    write(&b, &other);
    (a, b, data)
}

#[test]
fn state_files_sit_next_to_images_and_unchanged_resyncs_read_nothing() {
    let size = 8 * MIB;
    for dir in [Dir::Push, Dir::Pull] {
        for extra in [&[][..], &["--chunk", "1"][..]] {
            let t = tmp();
            let a = t.path().join("a.img");
            let b = t.path().join("b.img");
            let data = random_image(&a, 20, size);
            let what = format!("{dir:?} {extra:?}");
            // The receiver does not exist yet: it is created, and both states are built.
            let args = sync(dir, &a, &b, extra);
            let r = run(&args);
            r.ok();
            assert_content(&b, &data, &what);
            assert!(state_of(&a).is_file() && state_of(&b).is_file(), "{what}: no state next to the images{r:?}");
            assert_eq!(temp_leftovers(t.path()), Vec::<String>::new(), "{what}: temp files left{r:?}");

            let r = run(&args);
            r.ok();
            assert_read_nothing(&r);
            let f = r.stat();
            assert_eq!((f.written, f.nodes), (0, 1), "{what}: an unchanged re-sync compares the roots{r:?}");

            // The source changes: only the source is read.
            poke(&a, 5 * LEAF + 9, b"changed");
            poke(&a, 1500 * LEAF, b"changed too");
            let r = run(&args);
            r.ok();
            let f = r.stat();
            let (source_read, receiver_read) = f.reads(dir);
            assert_eq!(receiver_read, 0, "{what}: the receiver was read after a change of the source{r:?}");
            assert_eq!((f.compared, f.differing), (size as u64 / LEAF, 2), "{what}: {r:?}");
            assert!(source_read >= size as u64, "{what}: {r:?}");
            assert_same(&a, &b);

            let r = run(&args);
            r.ok();
            assert_read_nothing(&r);
        }
    }
}

#[test]
fn piece_digests_past_the_memory_budget_are_spilled_and_loaded_from_the_file_and_stay_exact() {
    // Piece digests beyond a 4 KiB budget leave memory: while learned, for an unnamed
    // spill file beside the state; when loaded, they stay in the state file. 16 MiB with
    // 256 KiB leaves is 1024 pieces of 16 KiB, 32 KiB of digests.
    let size = 16 * MIB;
    let env = [("BASYN_TEST_PIECE_BUDGET", "4096")];
    for dir in [Dir::Push, Dir::Pull] {
        let t = tmp();
        let a = t.path().join("a.img");
        let b = t.path().join("b.img");
        let data = random_image(&a, 21, size);
        let args = action(dir, "sync", &a, &b, &["--buffer", "256"]);
        let r = basyn_env(&args, &env);
        r.ok();
        assert_content(&b, &data, &format!("{dir:?}"));
        assert_eq!(temp_leftovers(t.path()), Vec::<String>::new(), "{dir:?}: temp files left{r:?}");

        let r = basyn_env(&args, &env);
        r.ok();
        assert_read_nothing(&r);
        assert_eq!(r.stat().written, 0, "{dir:?}{r:?}");

        // Two 16 KiB pieces change: the receiver's pieces, read back from its state file,
        // say exactly which, without reading the receiver.
        poke(&a, 3 * 16384 + 100, b"one");
        poke(&a, 700 * 16384 + 5, b"two");
        let r = basyn_env(&args, &env);
        r.ok();
        let f = r.stat();
        assert_eq!(f.reads(dir).1, 0, "{dir:?}: the receiver was read{r:?}");
        assert_eq!((f.differing, f.written), (2, 2 * 16384), "{dir:?}: only the changed pieces are written{r:?}");
        assert_same(&a, &b);

        let r = basyn_env(&args, &env);
        r.ok();
        assert_read_nothing(&r);
        assert_eq!(temp_leftovers(t.path()), Vec::<String>::new(), "{dir:?}{r:?}");
    }
}

/// A state that could not be saved failed every run with exit 2 and "the receiving device
/// may be partly changed", even when nothing differed (a state directory nobody may
/// create files in). The data result now stands: exit 0, one warning line for the side
/// whose state could not be saved, and the next run reads that device again. `basyn
/// index`, whose whole point is the state, still fails.
#[test]
fn a_state_that_cannot_be_saved_is_a_warning_not_a_failed_run() {
    let t = tmp();
    let (locked, open) = (t.path().join("locked"), t.path().join("open"));
    fs::create_dir_all(&locked).unwrap();
    fs::create_dir_all(&open).unwrap();
    let (a, b) = (open.join("a.img"), open.join("b.img"));
    let data = random_image(&a, 23, 4 * MIB);
    random_image(&b, 24, 4 * MIB);
    // chattr +i on the state directory: no file can be created in it.
    let Some(_frozen) = immutable(&locked) else { return };
    let env = [("BASYN_STATE_DIR", s(&locked))];
    // The other side's state goes where it can be saved.
    let elsewhere = |name: &str| open.join(name).display().to_string();
    for (what, other) in [("source", "--remote-state"), ("receiver", "--state")] {
        let other_state = elsewhere(&format!("{what}.basyn-state"));
        let args = sync(Dir::Push, &a, &b, &[other, &other_state]);
        let r = basyn_env(&args, &env);
        r.ok();
        let warnings: Vec<&str> = r.stderr.lines().filter(|l| l.starts_with("basyn: warning: ")).collect();
        assert_eq!(warnings.len(), 1, "{what}: expected one warning{r:?}");
        assert!(warnings[0].contains("the next run reads that device again"), "{what}{r:?}");
        assert!(warnings[0].contains(if what == "source" { "local" } else { "remote" }), "{what}{r:?}");
        assert_content(&b, &data, what);
        // Nothing was kept for that side: the next run reads it again, and still succeeds.
        let r = basyn_env(&args, &env);
        r.ok();
        let (source_read, receiver_read) = r.stat().reads(Dir::Push);
        let read_again = if what == "source" { source_read } else { receiver_read };
        assert!(read_again >= 4 * MIB as u64, "{what}: not read again{r:?}");
        random_image(&b, 25, 4 * MIB);
    }
    basyn_env(&index(&a, &[]), &env).fails(1, &["local state", s(&locked), "operation not permitted"]);
}

#[test]
fn no_state_creates_no_state_file_and_reads_everything() {
    let size = 8 * MIB;
    let t = tmp();
    let (a, b, _) = file_pair(t.path(), size, 21);
    let args = sync(Dir::Push, &a, &b, &["--no-state"]);
    for _ in 0..2 {
        let r = run(&args);
        r.ok();
        let f = r.stat();
        assert!(f.local_read >= size as u64 && f.remote_read >= size as u64, "--no-state did not read both{r:?}");
        assert_same(&a, &b);
    }
    let leftovers: Vec<_> = fs::read_dir(t.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "a.img" && n != "b.img")
        .collect();
    assert!(leftovers.is_empty(), "--no-state left files: {leftovers:?}");
    let r = run(&recheck(&a, &b).into_iter().chain(["--no-state".to_string()]).collect::<Vec<_>>());
    r.ok();
    assert!(state_of(&a).metadata().is_err() && state_of(&b).metadata().is_err(), "{r:?}");
    // --no-state cannot be combined with explicit state files.
    let r = run(&sync(Dir::Push, &a, &b, &["--no-state", "--state", s(&t.path().join("x"))]));
    r.usage_error(&["--no-state"]);
}

#[test]
fn state_and_remote_state_put_the_files_where_asked() {
    let size = 8 * MIB;
    for dir in [Dir::Push, Dir::Pull] {
        let t = tmp();
        let (a, b, _) = file_pair(t.path(), size, 22);
        let elsewhere = t.path().join("states");
        fs::create_dir(&elsewhere).unwrap();
        let (ls, rs) = (elsewhere.join("local.st"), elsewhere.join("remote.st"));
        let args = sync(dir, &a, &b, &["--state", s(&ls), "--remote-state", s(&rs)]);
        run(&args).ok();
        assert!(ls.is_file() && rs.is_file(), "{dir:?}: the state files are not where asked");
        assert!(!state_of(&a).exists() && !state_of(&b).exists(), "{dir:?}: default state files were made too");
        let r = run(&args);
        r.ok();
        assert_read_nothing(&r);
        // --state is the local device's, --remote-state the remote's, whichever the source.
        let local = match dir {
            Dir::Push => &a,
            Dir::Pull => &b,
        };
        let r = run(&index(local, &["--state", s(&ls)]));
        r.ok();
        assert_read_nothing(&r);
        // Without the options, the default places hold nothing yet: everything is read.
        let r = run(&sync(dir, &a, &b, &[]));
        r.ok();
        let f = r.stat();
        assert!(f.local_read >= size as u64 && f.remote_read >= size as u64, "{r:?}");
        assert!(state_of(&a).is_file() && state_of(&b).is_file());
    }
}

#[test]
fn index_builds_a_state_that_sync_uses() {
    let size = 8 * MIB;
    let t = tmp();
    let a = t.path().join("a.img");
    let b = t.path().join("b.img");
    let data = random_image(&a, 23, size);
    write(&b, &data);

    let r = run(&index(&a, &[]));
    r.ok();
    assert!(r.stat().local_read >= size as u64, "the first index did not read the device{r:?}");
    assert!(state_of(&a).is_file(), "basyn index made no state next to the image");
    let r = run(&index(&a, &[]));
    r.ok();
    assert_read_nothing(&r);

    // A fresh state on both sides: a SYNC of equal devices reads nothing.
    run(&index(&b, &[])).ok();
    let args = sync(Dir::Push, &a, &b, &[]);
    let r = run(&args);
    r.ok();
    assert_read_nothing(&r);

    // Both re-indexed after three leaves of the source changed: the tree walk reads
    // only those leaves of the source, nothing of the receiver.
    for leaf in [10, 700, 2047] {
        poke(&a, leaf * LEAF + 100, b"new data");
    }
    run(&index(&a, &[])).ok();
    let r = run(&args);
    r.ok();
    let f = r.stat();
    assert_eq!(f.remote_read, 0, "{r:?}");
    assert!(f.local_read <= 3 * LEAF, "the walk read {} bytes of the source{r:?}", f.local_read);
    assert_eq!((f.differing, f.written), (3, 3 * LEAF), "{r:?}");
    assert!(f.nodes > 1 && f.nodes < 2048 / 4, "{} tree nodes compared{r:?}", f.nodes);
    assert_same(&a, &b);

    // An index with another state path and another hash is independent of the default one.
    let other = t.path().join("sha256.st");
    let r = run(&index(&a, &["--hash", "sha256", "--state", s(&other)]));
    r.ok();
    assert!(other.is_file());
    let r = run(&args);
    r.ok();
    assert_read_nothing(&r);
}

#[test]
fn a_file_written_with_its_mtime_put_back_is_caught() {
    let size = 8 * MIB;
    for (victim, offset) in [("receiver", 77 * LEAF), ("source", 1800 * LEAF + 5)] {
        let t = tmp();
        let (a, b, _) = file_pair(t.path(), size, 24);
        let args = sync(Dir::Push, &a, &b, &[]);
        run(&args).ok();
        assert_read_nothing(run(&args).ok());
        let path = if victim == "receiver" { &b } else { &a };
        let old = mtime(path);
        // On purpose, not a wait: a clock tick passes between the sync and the write, so
        // that the write itself changes the file's times and only the mtime put back
        // below can hide it.
        std::thread::sleep(Duration::from_millis(20));
        flip(path, offset, 100);
        tool("touch", &["-d", &format!("@{}.{:09}", old.0, old.1), s(path)]).unwrap();
        assert_eq!(mtime(path), old, "touch did not put the mtime back");
        let r = run(&args);
        r.ok();
        assert_same(&a, &b);
        assert_read_nothing(run(&args).ok());
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bad {
    Garbage,
    Empty,
    Half,
    OneByteShort,
    OneByteMore,
    FlippedMagic,
    FlippedVersion,
    FlippedHeader,
    FlippedDigest,
    FlippedChecksum,
    OtherBuffer,
    OtherHash,
    OtherChunk,
    /// The other device's (valid) state.
    Foreign,
}

const BAD: [Bad; 14] = [
    Bad::Garbage,
    Bad::Empty,
    Bad::Half,
    Bad::OneByteShort,
    Bad::OneByteMore,
    Bad::FlippedMagic,
    Bad::FlippedVersion,
    Bad::FlippedHeader,
    Bad::FlippedDigest,
    Bad::FlippedChecksum,
    Bad::OtherBuffer,
    Bad::OtherHash,
    Bad::OtherChunk,
    Bad::Foreign,
];

fn flip_byte(path: &Path, at: impl Fn(u64) -> u64) {
    let f = OpenOptions::new().read(true).write(true).open(path).unwrap();
    let len = f.metadata().unwrap().len();
    let i = at(len);
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, i).unwrap();
    byte[0] ^= 0x10;
    f.write_all_at(&byte, i).unwrap();
}

#[test]
fn corrupt_foreign_truncated_and_mismatched_states_are_rebuilt() {
    let size = 8 * MIB;
    let t = tmp();
    let (a, b, _) = file_pair(t.path(), size, 25);
    let args = sync(Dir::Push, &a, &b, &[]);
    run(&args).ok();
    let mut spot = 1u64;
    for victim in ["source", "receiver"] {
        let (dev, other_dev) = if victim == "source" { (&a, &b) } else { (&b, &a) };
        let (st, other_st) = (state_of(dev), state_of(other_dev));
        for bad in BAD {
            let what = format!("{bad:?} state of the {victim}");
            spot = (spot * 7 + 3) % (size as u64 / LEAF);
            match bad {
                Bad::Garbage => write(&st, &random_data(spot, 5000)),
                Bad::Empty => write(&st, b""),
                Bad::Half => {
                    let len = fs::metadata(&st).unwrap().len();
                    OpenOptions::new().write(true).open(&st).unwrap().set_len(len / 2).unwrap();
                }
                Bad::OneByteShort => {
                    let len = fs::metadata(&st).unwrap().len();
                    OpenOptions::new().write(true).open(&st).unwrap().set_len(len - 1).unwrap();
                }
                Bad::OneByteMore => OpenOptions::new().append(true).open(&st).unwrap().write_all(&[0]).unwrap(),
                Bad::FlippedMagic => flip_byte(&st, |_| 0),
                Bad::FlippedVersion => flip_byte(&st, |_| 8),
                Bad::FlippedHeader => flip_byte(&st, |_| 20),
                Bad::FlippedDigest => flip_byte(&st, |len| len - 32 - 100),
                Bad::FlippedChecksum => flip_byte(&st, |len| len - 1),
                Bad::OtherBuffer => {
                    run(&sv(&["index", s(dev), "--buffer", "8"])).ok().silent();
                }
                Bad::OtherHash => {
                    run(&sv(&["index", s(dev), "--buffer", LEAF_KB, "--hash", "sha1"])).ok().silent();
                }
                Bad::OtherChunk => {
                    run(&sv(&["index", s(dev), "--buffer", LEAF_KB, "--chunk", "1"])).ok().silent();
                }
                Bad::Foreign => {
                    // The device changes, and gets the other device's valid state: if
                    // that were believed, the change would never be seen.
                    flip(dev, spot * LEAF, 64);
                    fs::copy(&other_st, &st).unwrap();
                }
            }
            if bad != Bad::Foreign {
                // The other device changes, so that the run has something to do while
                // the victim's stamp is untouched: only its bad state forces a rebuild.
                flip(other_dev, spot * LEAF, 64);
            }
            let r = run(&args);
            assert_eq!(r.code, 0, "{what}: the run failed{r:?}");
            let name = st.file_name().unwrap().to_string_lossy().into_owned();
            assert_rebuilt(&r, &name);
            let f = r.stat();
            let victim_read = if victim == "source" { f.local_read } else { f.remote_read };
            assert!(victim_read >= size as u64, "{what}: the {victim} was not read to rebuild its state{r:?}");
            let (x, y) = (read(&a), read(&b));
            if let Some(at) = first_difference(&x, &y) {
                panic!("{what}: the devices differ at offset {at} after the sync{r:?}");
            }
            let r = run(&args);
            r.ok();
            assert!(r.stat().read_nothing(), "{what}: the rebuilt state is not valid{r:?}");
        }
    }
    assert_eq!(temp_leftovers(t.path()), Vec::<String>::new());
}

#[test]
fn a_held_lock_refuses_the_run_with_exit_1() {
    let size = 8 * MIB;
    let t = tmp();
    let (a, b, _) = file_pair(t.path(), size, 26);
    let before_a = read(&a);
    let before_b = read(&b);
    let cases: [(&str, &Path, Vec<String>); 6] = [
        ("local", a.as_path(), sync(Dir::Push, &a, &b, &[])),
        ("local", a.as_path(), sync(Dir::Pull, &b, &a, &[])),
        ("remote", b.as_path(), sync(Dir::Push, &a, &b, &[])),
        ("remote", b.as_path(), sync(Dir::Pull, &b, &a, &[])),
        ("local", a.as_path(), recheck(&a, &b)),
        ("local", a.as_path(), index(&a, &[])),
    ];
    for (side, locked, args) in cases {
        let lock = hold_lock(locked);
        let r = run(&args);
        r.fails(1, &["in use by another basyn", side, s(locked)]);
        drop(lock);
        assert_content(&a, &before_a, &format!("a.img after {r:?}"));
        assert_content(&b, &before_b, &format!("b.img after {r:?}"));
    }
    // Without the lock the same run goes through.
    run(&sync(Dir::Push, &a, &b, &[])).ok();
    assert_same(&a, &b);
}

/// Exit 1 means nothing was changed: a refusal because the source is locked must not
/// leave a newly created receiver behind.
#[test]
fn a_locked_source_does_not_create_the_receiver() {
    let t = tmp();
    let a = t.path().join("a.img");
    random_image(&a, 27, MIB);
    let missing = t.path().join("new.img");
    let lock = hold_lock(&a);
    let r = run(&sync(Dir::Push, &a, &missing, &[]));
    r.fails(1, &["in use by another basyn"]);
    drop(lock);
    assert!(!missing.exists(), "a refused run (exit 1) created the receiver {}{r:?}", missing.display());
}

#[test]
fn a_source_written_during_the_run_is_reported_and_a_following_sync_converges() {
    let size = 200 * MIB;
    let data = big_data(28, size);
    for dir in [Dir::Push, Dir::Pull] {
        for no_state in [false, true] {
            let t = tmp();
            let source = t.path().join("source.img");
            let receiver = t.path().join("receiver.img");
            write(&source, &data);
            let extra: &[&str] = if no_state { &["--buffer", "1024", "--no-state"] } else { &["--buffer", "1024"] };
            let what = format!("{dir:?}{}", if no_state { " --no-state" } else { "" });
            let mut bg = start(&action(dir, "copy", &source, &receiver, extra), &[]);
            // Both ends are open and data flows: write to a part already copied.
            let mid_run = wait_for_io(&mut bg, "rchar", 32 * MIB as u64);
            dd(&source, 3, 1, false);
            let still_running = bg.running();
            let r = bg.finish();
            assert!(mid_run && still_running, "{what}: the COPY ended before the source could be written{r:?}");
            let (source_side, _) = dir.sides();
            r.fails(2, &["was written to during the run", source_side, s(&source)]);

            let r = run(&action(dir, "sync", &source, &receiver, extra));
            r.ok();
            assert_same_stream(&source, &receiver);
            if !no_state {
                let (source_read, _) = r.stat().reads(dir);
                assert!(source_read >= size as u64, "{what}: the moved source's state was used{r:?}");
            }
        }
    }
}

#[test]
fn kill_9_mid_run_then_a_rerun_converges() {
    let size = 200 * MIB;
    let data = big_data(29, size);
    for dir in [Dir::Push, Dir::Pull] {
        let t = tmp();
        let source = t.path().join("source.img");
        let receiver = t.path().join("receiver.img");
        write(&source, &data);
        File::create(&receiver).unwrap().set_len(size as u64).unwrap();
        let args = action(dir, "sync", &source, &receiver, &["--buffer", "64"]);
        let mut bg = start(&args, &[]);
        // Kill once the receiver is being written.
        let mid_run = wait_for_io(&mut bg, "wchar", 32 * MIB as u64);
        let helpers = process_tree(bg.pid());
        bg.kill();
        // Its endpoint notices and exits (before the output is collected: it may hold
        // the same stderr).
        let deadline = Instant::now() + Duration::from_secs(20);
        for pid in &helpers[1..] {
            let what = format!("{dir:?}: process {pid} to exit after its client was killed");
            wait_until(deadline.saturating_duration_since(Instant::now()), &what, || exited(*pid));
        }
        let killed = bg.finish();
        assert!(mid_run && killed.code == -1, "{dir:?}: basyn was not killed mid-run{killed:?}");
        // No lock is left behind, and the rerun converges.
        let r = run(&args);
        r.ok();
        assert_same_stream(&source, &receiver);
        let r = run(&args);
        r.ok();
        assert_eq!(r.stat().written, 0, "{dir:?}: the rerun did not converge{r:?}");
    }
}

/// With `--buffer` above 4 KiB and no `--chunk`, a SYNC whose receiver is read refines
/// differing blocks into 4 KiB pieces. The receiver's state must still describe the
/// whole device afterwards: an unchanged re-sync reads nothing.
#[test]
fn an_unchanged_resync_after_a_refined_sync_reads_nothing() {
    let size = 16 * MIB;
    for dir in [Dir::Push, Dir::Pull] {
        for extra in [&["--buffer", "64"][..], &[][..]] {
            let t = tmp();
            let (a, b, _) = file_pair(t.path(), size, 30);
            let args = action(dir, "sync", &a, &b, extra);
            let r = run(&args);
            r.ok();
            assert_same(&a, &b);
            let r = run(&args);
            r.ok();
            assert!(
                r.stat().read_nothing(),
                "{dir:?} {extra:?}: the re-sync after a refined sync read device data{r:?}"
            );
        }
    }
}

/// A source state trusted with `--trust-state` after a reboot that no longer describes
/// the source (it was written behind basyn's back) must not make basyn write data the
/// comparison never saw: the receiver checks each block against the source digest that
/// the comparison used, refuses it, and the run fails loudly naming the offset.
#[test]
fn a_wrong_trusted_source_state_is_caught_by_the_end_to_end_check() {
    let size = 16 * MIB;
    let t = tmp();
    let Some((src, rcv, _)) = loop_pair(t.path(), size, 31) else { return };
    run(&sync(Dir::Push, src.path(), rcv.path(), &[])).ok();
    // Both devices change at leaf 3000, differently; then the machine "reboots", so the
    // source's stamp cannot tell, and --trust-state uses its now wrong state. The
    // receiver's state is put elsewhere, so the receiver is read and leaf 3000 differs.
    dd(src.path(), 3000, 1, true);
    dd(rcv.path(), 3000, 1, true);
    flushbufs(rcv.path());
    let receiver_before = read(rcv.path());
    let other_state = t.path().join("receiver-elsewhere.basyn-state");
    let args = sync(Dir::Push, src.path(), rcv.path(), &["--trust-state", "--remote-state", s(&other_state)]);
    let r = basyn_env(&args, &[(BOOT_ID_ENV, "simulated-boot-e2e")]);
    let line = r.fails(2, &["does not match the source's digest", "offset 12288000", "may be partly changed"]);
    assert!(line.contains(s(rcv.path())), "the receiver is not named: {line}");
    flushbufs(rcv.path());
    assert!(read(rcv.path()) == receiver_before, "the receiver was written with data the comparison never saw{r:?}");
    // Without trusting the state, the next sync reads the source and converges.
    run(&sync(Dir::Push, src.path(), rcv.path(), &[])).ok();
    assert_loops_same(&src, &rcv);
}

/// Sectors written so far to the loop device.
fn sectors_written(dev: &Loop) -> u64 {
    let text = fs::read_to_string(format!("/sys/class/block/{}/stat", dev.name)).unwrap();
    text.split_whitespace().nth(6).unwrap().parse().unwrap()
}

/// One 4 KiB write in every 2 MiB block of the source: with the receiver's state fresh
/// and default options, the receiver is (nearly) not read and is written only where it
/// changed, at the 16 KiB granularity of the states or finer.
#[test]
fn scattered_small_changes_leave_a_fresh_receiver_unread_and_written_only_where_they_changed() {
    let size = 256 * MIB;
    let t = tmp();
    let data = random_data(33, size);
    let Some(src) = Loop::new(t.path(), "src.img", &data) else { return };
    let Some(rcv) = Loop::new(t.path(), "rcv.img", &data) else { return };
    let args = action(Dir::Push, "sync", src.path(), rcv.path(), &[]);
    run(&args).ok();
    let blocks = (size / (2 * MIB)) as u64;
    for b in 0..blocks {
        // A 4 KiB page somewhere in the block, not on a piece boundary pattern.
        dd(src.path(), b * 512 + (b * 97 % 512), 1, true);
    }
    src.quiesce();
    rcv.quiesce();
    let (read_before, written_before) = (rcv.sectors_read(), sectors_written(&rcv));
    let r = run(&args);
    r.ok();
    let read = (rcv.sectors_read() - read_before) * 512;
    let written = (sectors_written(&rcv) - written_before) * 512;
    assert!(read <= size as u64 / 100, "the fresh receiver was read: {read} bytes{r:?}");
    let changed = blocks * 4096;
    let granular = blocks * 16384;
    assert!(written <= 2 * granular, "{written} bytes written for {changed} bytes changed{r:?}");
    assert_loops_same(&src, &rcv);
}
