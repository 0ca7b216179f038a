//! Faults of the devices themselves (issue 11): a source whose reads fail with EIO in a
//! byte range, a receiver whose writes fail with EIO there, a source that answers reads
//! short, locally and over SSH. The failing file is served by a FUSE file system of the
//! tests' own (`fusefail/mod.rs`), which the test switches between runs.
//!
//! Each failure must be: the documented exit code (2, "copy/sync error", `usage.md`), one
//! line on stderr naming the side, the device and the cause; no state left claiming what
//! is not on the device: after the fault is cleared, the same devices synced again (with
//! the states of the failed run) must end byte-identical, which they cannot if a state
//! made basyn skip the range that failed; and that rerun exits 0.
//!
//! FUSE needs root and `/dev/fuse`; the SSH tests also the test sshd (`sshd/mod.rs`). A
//! missing one fails the test when `CI` is set, else the test is skipped
//! (`util::require`).

mod fusefail;
mod sshd;
mod util;

use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};

use fusefail::{Fault, FaultyFile, faulty};
use sshd::{ALIAS, Sshd};
use util::*;

/// The size of every image here.
const SIZE: usize = 4 * MIB;

/// The byte range that fails: inside the ninth of sixteen 256 KiB blocks, not aligned to
/// anything, with blocks on either side that do not fail.
fn bad() -> Range<u64> {
    (2 * MIB + 100 * KIB) as u64..(2 * MIB + 164 * KIB) as u64
}

/// Checkpoints every millisecond (`docs/state-format.md`): the failing run saves the
/// states of what it has confirmed as it goes, so that a state claiming more than that
/// would be left on disk for the rerun to believe.
const CHECKPOINTS: [(&str, &str); 1] = [("BASYN_TEST_CHECKPOINT_MS", "1")];

/// Runs basyn locally with [`CHECKPOINTS`].
fn failing_run(args: &[String]) -> Run {
    start(args, &CHECKPOINTS).finish()
}

/// Runs basyn over the test sshd with [`CHECKPOINTS`].
fn failing_run_over(sshd: &Sshd, args: &[String]) -> Run {
    let mut cmd = sshd.command(&sshd.client_config(), args);
    cmd.envs(CHECKPOINTS);
    spawn(cmd, args).finish()
}

/// The bad range as indices.
fn bad_usize() -> Range<usize> {
    let r = bad();
    r.start as usize..r.end as usize
}

/// The cause of an EIO as basyn words it (strerror, first letter lowered).
const EIO: &str = "input/output error";

/// Where the states of a test's devices are kept: outside the FUSE mount, which holds
/// only its one file.
struct States {
    local: PathBuf,
    remote: PathBuf,
}

impl States {
    fn in_dir(dir: &Path) -> States {
        States { local: dir.join("local.basyn-state"), remote: dir.join("remote.basyn-state") }
    }

    /// `--state L --remote-state R`.
    fn args(&self) -> Vec<String> {
        sv(&["--state", s(&self.local), "--remote-state", s(&self.remote)])
    }
}

/// An action with `--buffer 256` and the given states.
fn run_args(dir: Dir, mode: &str, source: &Path, receiver: &Path, states: &States) -> Vec<String> {
    let mut a = action(dir, mode, source, receiver, &["--buffer", "256"]);
    a.extend(states.args());
    a
}

/// A file of `len` zeros (not sparse: it was written).
fn zeros_image(path: &Path, len: usize) {
    write(path, &vec![0u8; len]);
}

/// A mounted faulty file over `backing` in `t`, or `None` if the test is skipped.
fn mount_in(t: &Path, backing: &Path) -> Option<FaultyFile> {
    faulty(&t.join("mnt"), backing)
}

/// A source on the faulty file system of random data (`seed`), a receiver `dst.img`
/// beside the mount (all zeros when `zeros`, else none: basyn creates it), and states
/// outside the mount. `None` if the test is skipped.
fn faulty_source(t: &Path, seed: u64, zeros: bool) -> Option<(Vec<u8>, FaultyFile, PathBuf, States)> {
    let backing = t.join("backing.img");
    let data = random_image(&backing, seed, SIZE);
    let src = mount_in(t, &backing)?;
    let dst = t.join("dst.img");
    if zeros {
        zeros_image(&dst, SIZE);
    }
    Some((data, src, dst, States::in_dir(t)))
}

/// Asserts that the first run hit the fault and failed as a transfer error (exit 2, one
/// line: `basyn: SIDE DEVICE: ... CAUSE; the receiving device ... may be partly
/// changed`), and returns the line.
#[track_caller]
fn assert_fault_reported<'a>(
    what: &str,
    run: &'a Run,
    file: &FaultyFile,
    side: &str,
    device: &Path,
    cause: &str,
) -> &'a str {
    assert!(file.hits() > 0, "{what}: the fault was never hit{run:?}");
    let line = run.fails(2, &[side, s(device), cause, "may be partly changed"]);
    println!("{what}: {line}");
    assert!(line.starts_with(&format!("basyn: {side} ")), "{what}: the line does not start with the side{run:?}");
    line
}

/// Clears the fault, syncs `source` onto `receiver` again with the same states, and
/// asserts exit 0 and `receiver_data` (what the receiver must hold, read around the
/// fault) equal to `want`.
#[track_caller]
fn assert_rerun_repairs(what: &str, file: &FaultyFile, args: &[String], receiver_data: &Path, want: &[u8]) {
    file.set(Fault::None);
    let again = basyn(args);
    assert_eq!(again.code, 0, "{what}: the rerun after the fault was cleared failed{again:?}");
    assert_content(receiver_data, want, &format!("{what}: the receiver after the rerun"));
}

// ---------------------------------------------------------------------------
// 1. The source's reads fail with EIO
// ---------------------------------------------------------------------------

#[test]
fn a_source_read_failing_with_eio_is_a_transfer_error_and_a_rerun_repairs() {
    for mode in ["SYNC", "COPY"] {
        let t = tmp();
        // SYNC onto zeros, whose bad range differs; COPY onto a receiver basyn creates,
        // known to be zero: a state claiming zeros for the bad range would be believed.
        let Some((data, src, dst, states)) = faulty_source(t.path(), 1, mode == "SYNC") else { return };
        let args = run_args(Dir::Push, mode, &src.path(), &dst, &states);
        src.set(Fault::ReadEio(bad()));
        let run = failing_run(&args);
        let what = format!("PUSH {mode} from a source failing reads");
        assert_fault_reported(&what, &run, &src, "local", &src.path(), EIO);
        let landed = fs::read(&dst).unwrap_or_default();
        assert!(
            landed.get(bad_usize()) != Some(&data[bad_usize()]),
            "{what}: the range that could not be read is on the receiver"
        );
        let sync = run_args(Dir::Push, "SYNC", &src.path(), &dst, &states);
        assert_rerun_repairs(&what, &src, &sync, &dst, &data);
        assert_content(&t.path().join("backing.img"), &data, &format!("{what}: the source"));
    }
}

#[test]
fn a_remote_source_read_failing_with_eio_in_a_local_pull_is_named_remote() {
    let t = tmp();
    let Some((data, src, dst, states)) = faulty_source(t.path(), 2, true) else { return };
    let args = run_args(Dir::Pull, "SYNC", &src.path(), &dst, &states);
    src.set(Fault::ReadEio(bad()));
    let run = failing_run(&args);
    assert_fault_reported("PULL SYNC", &run, &src, "remote", &src.path(), EIO);
    assert_rerun_repairs("PULL SYNC", &src, &args, &dst, &data);
}

// ---------------------------------------------------------------------------
// 2. The receiver's writes fail with EIO
// ---------------------------------------------------------------------------

/// A source and a receiver on the faulty file system that a first SYNC gave the
/// source's data and both devices fresh states.
struct Synced {
    src: PathBuf,
    /// The data both hold.
    old: Vec<u8>,
    dst: FaultyFile,
    /// The receiver's backing file.
    backing: PathBuf,
    states: States,
    /// That first SYNC's arguments.
    sync: Vec<String>,
}

/// [`Synced`] with a source of random data (`seed`); `None` if the test is skipped.
fn synced_faulty_receiver(t: &Path, dir: Dir, seed: u64) -> Option<Synced> {
    let src = t.join("src.img");
    let old = random_image(&src, seed, SIZE);
    let backing = t.join("backing.img");
    zeros_image(&backing, SIZE);
    let dst = mount_in(t, &backing)?;
    let states = States::in_dir(t);
    let sync = run_args(dir, "SYNC", &src, &dst.path(), &states);
    basyn(&sync).ok();
    assert_content(&backing, &old, "the receiver after the first sync");
    Some(Synced { src, old, dst, backing, states, sync })
}

#[test]
fn a_receiver_write_failing_with_eio_is_a_transfer_error_and_a_rerun_repairs() {
    for (dir, mode, side) in
        [(Dir::Push, "SYNC", "remote"), (Dir::Push, "COPY", "remote"), (Dir::Pull, "SYNC", "local")]
    {
        let t = tmp();
        // First the receiver gets other data, and both devices fresh states.
        let Some(Synced { src, old, dst, backing, states, sync }) = synced_faulty_receiver(t.path(), dir, 3) else {
            return;
        };
        let data = random_image(&src, 8, SIZE);
        let args = run_args(dir, mode, &src, &dst.path(), &states);
        dst.set(Fault::WriteEio(bad()));
        let run = failing_run(&args);
        let what = format!("{} {mode} onto a receiver failing writes", dir.word());
        assert_fault_reported(&what, &run, &dst, side, &dst.path(), EIO);
        assert_eq!(
            &read(&backing)[bad_usize()],
            &old[bad_usize()],
            "{what}: the fault let data into the range that failed"
        );
        assert_rerun_repairs(&what, &dst, &sync, &backing, &data);
    }
}

/// A write that fails part way (EIO at a bad sector, after the sectors before it were
/// written) changes its leaf although basyn's receiver index never hears of that write:
/// no state may be left claiming the leaf's old content (a checkpoint stamped before the
/// write, say, taken as fresh). A later SYNC from a source that holds that old content
/// again would skip the leaf and leave the part that landed. The receiver's stamp moves
/// with the partial write, so what the failed run left is stale and the leaf is read.
#[test]
fn a_write_failing_part_way_leaves_no_state_claiming_the_old_data() {
    let leaf = bad().start / (256 * KIB as u64) * (256 * KIB as u64);
    let landed_part = leaf as usize..bad().start as usize;
    for (dir, mode, side) in
        [(Dir::Push, "SYNC", "remote"), (Dir::Push, "COPY", "remote"), (Dir::Pull, "SYNC", "local")]
    {
        let t = tmp();
        let Some(Synced { src, old, dst, backing, states, sync }) = synced_faulty_receiver(t.path(), dir, 9) else {
            return;
        };
        random_image(&src, 10, SIZE);
        dst.set(Fault::WriteEio(bad()));
        let run = failing_run(&run_args(dir, mode, &src, &dst.path(), &states));
        let what = format!("{} {mode} onto a receiver failing writes part way", dir.word());
        assert_fault_reported(&what, &run, &dst, side, &dst.path(), EIO);
        assert_ne!(
            &read(&backing)[landed_part.clone()],
            &old[landed_part.clone()],
            "{what}: nothing of the failed write landed, so this test proves nothing"
        );
        // The source holds the old data again: the receiver's leaf must be rewritten.
        dst.set(Fault::None);
        write(&src, &old);
        let again = basyn(&sync);
        assert_eq!(again.code, 0, "{what}: the rerun failed{again:?}");
        assert_content(&backing, &old, &format!("{what}: the receiver after a SYNC of the old data"));
    }
}

/// A receiver on a file system that refuses direct I/O where its writes are made (EINVAL
/// for a write with `O_DIRECT` set): basyn's large receiver writes bypass the page cache
/// where they can, so the first refusal must turn that off for the rest of the run and
/// write the block through the page cache instead, losing nothing and failing nothing.
#[test]
fn a_receiver_refusing_direct_writes_gets_them_buffered_and_loses_nothing() {
    for dir in [Dir::Push, Dir::Pull] {
        let t = tmp();
        let backing = t.path().join("backing.img");
        zeros_image(&backing, SIZE);
        let Some(dst) = mount_in(t.path(), &backing) else { return };
        let src = t.path().join("src.img");
        let data = random_image(&src, 12, SIZE);
        dst.set(Fault::RefuseDirect);
        let what = format!("{} COPY onto a receiver refusing direct writes", dir.word());
        basyn(&run_args(dir, "COPY", &src, &dst.path(), &States::in_dir(t.path()))).ok();
        assert_eq!(dst.hits(), 1, "{what}: direct writes were never tried, or tried again after a refusal");
        assert_content(&backing, &data, &what);
    }
}

// ---------------------------------------------------------------------------
// 3. The source answers short
// ---------------------------------------------------------------------------

#[test]
fn a_source_answering_reads_short_is_read_to_the_end_of_each_block() {
    // A read(2) may return fewer bytes than asked before the end of the file (a FUSE or
    // network file system, a signal): the rest must be asked for again, never taken as
    // zeros or as the end.
    for mode in ["SYNC", "COPY"] {
        let t = tmp();
        let Some((data, src, dst, states)) = faulty_source(t.path(), 4, mode == "SYNC") else { return };
        src.set(Fault::ShortReads(bad()));
        let run = basyn(&run_args(Dir::Push, mode, &src.path(), &dst, &states));
        assert!(src.hits() > 0, "{mode}: no read was answered short{run:?}");
        run.ok();
        assert_content(&dst, &data, &format!("PUSH {mode} from a source answering short"));
    }
}

#[test]
fn a_source_read_returning_nothing_before_its_end_is_a_transfer_error() {
    // A read(2) returning 0 before the size the file claims: the device ended early.
    // That is an error naming the offset, never zeros for the rest.
    let t = tmp();
    let Some((data, src, dst, states)) = faulty_source(t.path(), 5, false) else { return };
    let args = run_args(Dir::Push, "COPY", &src.path(), &dst, &states);
    src.set(Fault::EmptyReads(bad()));
    let run = failing_run(&args);
    assert_fault_reported("PUSH COPY", &run, &src, "local", &src.path(), "device ended before offset");
    let sync = run_args(Dir::Push, "SYNC", &src.path(), &dst, &states);
    assert_rerun_repairs("PUSH COPY", &src, &sync, &dst, &data);
}

// ---------------------------------------------------------------------------
// 4. Over SSH: the remote device fails
// ---------------------------------------------------------------------------

/// A remote state in the remote sessions' state directory (over SSH a `--remote-state`
/// must be there or beside the device, and nothing but its one file can be beside a
/// faulty file); removed on drop.
struct RemoteState(PathBuf);

impl RemoteState {
    fn new(sshd: &Sshd, tag: &str) -> RemoteState {
        RemoteState(sshd.state_dir().join(format!("faults-{}-{tag}.basyn-state", std::process::id())))
    }
}

impl Drop for RemoteState {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// `-l LOCAL -r REMOTE -h testhost -a DIR -m MODE --buffer 256` with the states.
fn ssh_args(
    local: &Path,
    remote: &Path,
    dir: Dir,
    mode: &str,
    state: &Path,
    remote_state: &RemoteState,
) -> Vec<String> {
    sv(&[
        "-l",
        s(local),
        "-r",
        s(remote),
        "-h",
        ALIAS,
        "-a",
        dir.word(),
        "-m",
        mode,
        "--buffer",
        "256",
        "--state",
        s(state),
        "--remote-state",
        s(&remote_state.0),
    ])
}

#[test]
fn over_ssh_a_remote_receiver_failing_writes_is_a_transfer_error_and_a_rerun_repairs() {
    let Some(sshd) = Sshd::start() else { return };
    let local = sshd.local("src.img");
    let data = random_image(&local, 6, SIZE);
    let backing = sshd.remote("backing.img");
    zeros_image(&backing, SIZE);
    let Some(dst) = faulty(&sshd.remote("mnt"), &backing) else { return };
    let (state, remote_state) = (sshd.local("src.basyn-state"), RemoteState::new(&sshd, "push"));
    for mode in ["COPY", "SYNC"] {
        let args = ssh_args(&local, &dst.path(), Dir::Push, mode, &state, &remote_state);
        dst.set(Fault::WriteEio(bad()));
        let run = failing_run_over(&sshd, &args);
        let what = format!("PUSH {mode} over SSH onto a receiver failing writes");
        assert_fault_reported(&what, &run, &dst, "remote", &dst.path(), EIO);
        let sync = ssh_args(&local, &dst.path(), Dir::Push, "SYNC", &state, &remote_state);
        dst.set(Fault::None);
        let again = sshd.basyn(&sync);
        assert_eq!(again.code, 0, "{what}: the rerun failed{again:?}");
        assert_content(&backing, &data, &format!("{what}: the receiver after the rerun"));
        // The next round starts from a receiver that differs again.
        zeros_image(&backing, SIZE);
    }
}

#[test]
fn over_ssh_a_remote_source_failing_reads_in_a_pull_is_a_transfer_error_and_a_rerun_repairs() {
    let Some(sshd) = Sshd::start() else { return };
    let backing = sshd.remote("backing.img");
    let data = random_image(&backing, 7, SIZE);
    let Some(src) = faulty(&sshd.remote("mnt"), &backing) else { return };
    let local = sshd.local("dst.img");
    let (state, remote_state) = (sshd.local("dst.basyn-state"), RemoteState::new(&sshd, "pull"));
    for mode in ["COPY", "SYNC"] {
        let _ = fs::remove_file(&local);
        let _ = fs::remove_file(&state);
        if mode == "SYNC" {
            zeros_image(&local, SIZE);
        }
        let args = ssh_args(&local, &src.path(), Dir::Pull, mode, &state, &remote_state);
        src.set(Fault::ReadEio(bad()));
        let run = failing_run_over(&sshd, &args);
        let what = format!("PULL {mode} over SSH from a source failing reads");
        assert_fault_reported(&what, &run, &src, "remote", &src.path(), EIO);
        let sync = ssh_args(&local, &src.path(), Dir::Pull, "SYNC", &state, &remote_state);
        src.set(Fault::None);
        let again = sshd.basyn(&sync);
        assert_eq!(again.code, 0, "{what}: the rerun failed{again:?}");
        assert_content(&local, &data, &format!("{what}: the receiver after the rerun"));
    }
}
