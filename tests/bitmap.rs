//! Integration tests of the original's bitmap (`-b/--bitmap FILE`, `--reset-bitmap`,
//! `--update-bitmap`; DESIGN "Compatibility with the current original", docs/usage.md
//! "The original's bitmap"): the receiver's block digests kept in a file on this host and
//! trusted as declared, so that SYNC never reads the receiver.
//!
//! Image files of 8 MiB with `--buffer 64` (128 blocks), so a few changed blocks are a
//! few 64 KiB leaves. Reads of the receiver are taken from `--stat`'s line
//! `Read:        local N bytes, remote N bytes`; `--no-state` makes sure that no
//! `.basyn-state` file can stand in for reading. The last test needs root and a loop
//! device (a receiver whose foreign writes the kernel counts).

mod util;

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use util::*;

/// Leaf size of these tests, in KiB and bytes.
const BUF_KB: &str = "64";
const LEAF: u64 = 64 * 1024;
/// Image size: 128 leaves.
const SIZE: usize = 8 * MIB;
const LEAVES: u64 = (SIZE as u64) / LEAF;

const BOTH: [Dir; 2] = [Dir::Push, Dir::Pull];

/// `-l -r -a DIR -m SYNC -b BITMAP --buffer 64` from `source` to `receiver`, then `extra`.
fn bitmap_sync(dir: Dir, source: &Path, receiver: &Path, bitmap: &Path, extra: &[&str]) -> Vec<String> {
    let (l, r) = match dir {
        Dir::Push => (source, receiver),
        Dir::Pull => (receiver, source),
    };
    let mut a = sv(&["-l", s(l), "-r", s(r), "-a", dir.word(), "-m", "sync", "-b", s(bitmap), "--buffer", BUF_KB]);
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

/// Asserts the run did not read the receiver (`--stat`'s `Read:` line).
#[track_caller]
fn assert_receiver_not_read(run: &Run, dir: Dir) {
    assert_eq!(run.stat().reads(dir).1, 0, "the {dir:?} run read the receiver{run:?}");
}

/// Asserts `path` is a basyn state file (what a bitmap is stored as).
#[track_caller]
fn assert_state_file(path: &Path) {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("no bitmap {}: {e}", path.display()));
    assert!(bytes.starts_with(b"BASYNSTA"), "{} is not a basyn state file", path.display());
}

/// Changes a few bytes in each of `leaves` of `path`.
fn change_leaves(path: &Path, leaves: &[u64]) {
    for &leaf in leaves {
        flip(path, leaf * LEAF + 1000, 300);
    }
}

/// A directory with a random source image `a.img`, and the paths of a receiver `b.img`
/// and a bitmap `bm` (neither created).
struct Setup {
    _dir: tempfile::TempDir,
    src: PathBuf,
    rcv: PathBuf,
    bm: PathBuf,
}

fn setup(seed: u64) -> Setup {
    let dir = tmp();
    let src = dir.path().join("a.img");
    random_image(&src, seed, SIZE);
    let rcv = dir.path().join("b.img");
    let bm = dir.path().join("bm");
    Setup { _dir: dir, src, rcv, bm }
}

// ---------------------------------------------------------------------------
// 1. A missing bitmap is created
// ---------------------------------------------------------------------------

#[test]
fn a_first_sync_creates_the_missing_bitmap() {
    for dir in BOTH {
        // Receiver missing (created at the source size) or present with other content.
        for receiver_exists in [false, true] {
            let t = setup(11);
            if receiver_exists {
                random_image(&t.rcv, 12, SIZE);
            }
            let r = basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &["--stat"]));
            r.ok();
            assert_same(&t.src, &t.rcv);
            assert_state_file(&t.bm);
            let f = r.stat();
            assert_eq!(
                (f.compared, f.differing),
                (LEAVES, LEAVES),
                "{dir:?}, receiver existed: {receiver_exists}{r:?}"
            );

            // The new bitmap is then trusted: an unchanged source sends nothing and the
            // receiver is not read.
            let again = basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &["--stat", "--no-state"]));
            again.ok();
            assert_receiver_not_read(&again, dir);
            let f = again.stat();
            assert_eq!((f.differing, f.written), (0, 0), "{dir:?}: an unchanged source sent data{again:?}");
            assert_same(&t.src, &t.rcv);
        }
    }
}

// ---------------------------------------------------------------------------
// 2. With a bitmap SYNC never reads the receiver
// ---------------------------------------------------------------------------

#[test]
fn a_sync_with_a_bitmap_reads_nothing_from_the_receiver() {
    for dir in BOTH {
        let t = setup(21);
        basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &[])).ok();
        assert_same(&t.src, &t.rcv);

        let changed = [3u64, 40, 41, 127];
        change_leaves(&t.src, &changed);
        let r = basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &["--stat", "--no-state"]));
        r.ok();
        assert_same(&t.src, &t.rcv);
        assert_receiver_not_read(&r, dir);
        let f = r.stat();
        assert_eq!(f.compared, LEAVES, "{dir:?}{r:?}");
        assert_eq!(f.differing, changed.len() as u64, "{dir:?}: only the changed blocks differ{r:?}");
        assert_eq!(f.written, changed.len() as u64 * LEAF, "{dir:?}: differing blocks are sent whole{r:?}");
        assert!(r.stdout.contains(&format!("Blocks:      {LEAVES} compared, {} differing", changed.len())), "{r:?}");

        // And once more, after more changes: the bitmap was updated by the last run.
        let changed = [0u64, 64];
        change_leaves(&t.src, &changed);
        let r = basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &["--stat", "--no-state"]));
        r.ok();
        assert_same(&t.src, &t.rcv);
        assert_receiver_not_read(&r, dir);
        assert_eq!(r.stat().differing, changed.len() as u64, "{dir:?}{r:?}");
    }
}

// ---------------------------------------------------------------------------
// 3. A corrupt or mismatched bitmap is an error; --reset-bitmap rebuilds it
// ---------------------------------------------------------------------------

/// Ways to spoil a good bitmap (built with --buffer 64, BLAKE3, 8 MiB).
#[derive(Clone, Copy, Debug)]
enum Spoil {
    Garbage,
    Truncated,
    FlippedByte,
    OtherBuffer,
    OtherHash,
    OtherSize,
}

fn spoil(how: Spoil, dir: &Path, bm: &Path) {
    match how {
        Spoil::Garbage => write(bm, &random_data(99, 4096)),
        Spoil::Truncated => {
            let bytes = fs::read(bm).unwrap();
            write(bm, &bytes[..bytes.len() / 2]);
        }
        Spoil::FlippedByte => {
            let len = fs::metadata(bm).unwrap().len();
            flip(bm, len * 2 / 3, 1);
        }
        // A valid bitmap, but of another geometry or device size.
        Spoil::OtherBuffer | Spoil::OtherHash | Spoil::OtherSize => {
            let (x, y) = (dir.join("x.img"), dir.join("y.img"));
            let (size, buffer, hash) = match how {
                Spoil::OtherBuffer => (SIZE, "128", "blake3"),
                Spoil::OtherHash => (SIZE, BUF_KB, "sha256"),
                _ => (SIZE / 2, BUF_KB, "blake3"),
            };
            random_image(&x, 7, size);
            fs::remove_file(bm).unwrap();
            let a =
                ["-l", s(&x), "-r", s(&y), "-a", "push", "-m", "sync", "-b", s(bm), "--buffer", buffer, "--hash", hash];
            basyn(&a).ok();
            assert_state_file(bm);
        }
    }
}

#[test]
fn a_corrupt_or_mismatched_bitmap_is_refused_and_reset_bitmap_rebuilds_it() {
    let cases = [
        (Spoil::Garbage, Dir::Push),
        (Spoil::Garbage, Dir::Pull),
        (Spoil::Truncated, Dir::Push),
        (Spoil::FlippedByte, Dir::Push),
        (Spoil::FlippedByte, Dir::Pull),
        (Spoil::OtherBuffer, Dir::Push),
        (Spoil::OtherHash, Dir::Pull),
        (Spoil::OtherSize, Dir::Push),
        (Spoil::OtherSize, Dir::Pull),
    ];
    for (how, dir) in cases {
        let t = setup(31);
        let folder = t.src.parent().unwrap().to_path_buf();
        basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &[])).ok();
        spoil(how, &folder, &t.bm);
        // The receiver now differs from the source everywhere a transfer would change it.
        let receiver = random_image(&t.rcv, 32, SIZE);
        let spoilt = fs::read(&t.bm).unwrap();

        let r = basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &[]));
        let line = r.fails(1, &["bitmap", "--reset-bitmap"]).to_string();
        assert!(line.contains(s(&t.bm)), "{how:?}/{dir:?}: the message does not name the bitmap{r:?}");
        assert!(r.stdout.is_empty(), "{how:?}/{dir:?}{r:?}");
        assert_content(&t.rcv, &receiver, &format!("{how:?}/{dir:?}: receiver after the refusal"));
        assert_eq!(fs::read(&t.bm).unwrap(), spoilt, "{how:?}/{dir:?}: the refused bitmap was changed");

        // A missing receiver is not created by a refused run either.
        fs::remove_file(&t.rcv).unwrap();
        let r = basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &[]));
        r.fails(1, &["bitmap", "--reset-bitmap"]);
        assert!(!t.rcv.exists(), "{how:?}/{dir:?}: a refused run created the receiver{r:?}");
        write(&t.rcv, &receiver);

        // --reset-bitmap reads the receiver, syncs, and rewrites the bitmap.
        let r = basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &["--reset-bitmap", "--stat", "--no-state"]));
        r.ok();
        assert_same(&t.src, &t.rcv);
        assert_state_file(&t.bm);
        assert_ne!(fs::read(&t.bm).unwrap(), spoilt, "{how:?}/{dir:?}: the bitmap was not rewritten");
        assert!(r.stat().reads(dir).1 > 0, "{how:?}/{dir:?}: --reset-bitmap did not read the receiver{r:?}");

        // The rebuilt bitmap is good: a change is synced without reading the receiver.
        change_leaves(&t.src, &[77]);
        let r = basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &["--stat", "--no-state"]));
        r.ok();
        assert_same(&t.src, &t.rcv);
        assert_receiver_not_read(&r, dir);
        assert_eq!(r.stat().differing, 1, "{how:?}/{dir:?}{r:?}");
    }
}

// ---------------------------------------------------------------------------
// 4. --update-bitmap (or PUSH without -r) refreshes the bitmap and transfers nothing
// ---------------------------------------------------------------------------

/// The ways to ask for a refresh only.
fn refresh_args(dir: Dir, t: &Setup, omit_remote: bool) -> Vec<String> {
    if omit_remote {
        assert_eq!(dir, Dir::Push);
        sv(&["-l", s(&t.src), "-a", "push", "-m", "sync", "-b", s(&t.bm), "--buffer", BUF_KB, "--stat"])
    } else {
        bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &["--update-bitmap", "--stat"])
    }
}

#[test]
fn update_bitmap_refreshes_it_from_the_source_and_transfers_nothing() {
    for (dir, omit_remote) in [(Dir::Push, false), (Dir::Push, true), (Dir::Pull, false)] {
        let what = format!("{dir:?}, -r omitted: {omit_remote}");

        // Nothing is transferred: a receiver with other content stays as it is.
        let t = setup(41);
        let receiver = random_image(&t.rcv, 42, SIZE);
        let r = basyn(&refresh_args(dir, &t, omit_remote));
        r.ok();
        assert_content(&t.rcv, &receiver, &format!("{what}: receiver after --update-bitmap"));
        assert_state_file(&t.bm);
        assert_receiver_not_read(&r, dir);
        assert_eq!(r.stat().written, 0, "{what}: --update-bitmap wrote data{r:?}");

        // A PUSH refresh does not even create a missing receiver.
        if dir == Dir::Push {
            fs::remove_file(&t.rcv).unwrap();
            fs::remove_file(&t.bm).unwrap();
            basyn(&refresh_args(dir, &t, omit_remote)).ok();
            assert!(!t.rcv.exists(), "{what}: --update-bitmap created the receiver");
            assert_state_file(&t.bm);
        }

        // The refreshed bitmap is trusted: the receiver is a copy of the source made
        // behind basyn's back; after a change only that change is sent, unread.
        let t = setup(43);
        fs::copy(&t.src, &t.rcv).unwrap();
        let r = basyn(&refresh_args(dir, &t, omit_remote));
        r.ok();
        assert_same(&t.src, &t.rcv);
        let changed = [5u64, 90];
        change_leaves(&t.src, &changed);
        let r = basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &["--stat", "--no-state"]));
        r.ok();
        assert_same(&t.src, &t.rcv);
        assert_receiver_not_read(&r, dir);
        let f = r.stat();
        assert_eq!((f.differing, f.written), (2, 2 * LEAF), "{what}: the bitmap was not trusted{r:?}");

        // A refresh over an existing bitmap replaces it (source changed since).
        change_leaves(&t.src, &[17]);
        let before = fs::read(&t.bm).unwrap();
        basyn(&refresh_args(dir, &t, omit_remote)).ok();
        assert_ne!(fs::read(&t.bm).unwrap(), before, "{what}: the bitmap was not refreshed");
        // It now declares the changed leaf as on the receiver: nothing differs.
        let r = basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &["--stat", "--no-state"]));
        r.ok();
        assert_receiver_not_read(&r, dir);
        assert_eq!(r.stat().differing, 0, "{what}: the refreshed bitmap was not used{r:?}");
    }
}

// ---------------------------------------------------------------------------
// 5. A re-created receiver does not inherit the bitmap
// ---------------------------------------------------------------------------

#[test]
fn a_deleted_receiver_is_not_trusted_to_hold_what_the_bitmap_says() {
    for dir in BOTH {
        let t = setup(51);
        basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &[])).ok();
        assert_same(&t.src, &t.rcv);

        // Deleted: basyn creates a zero-filled receiver, which the bitmap does not describe.
        fs::remove_file(&t.rcv).unwrap();
        let r = basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &["--stat", "--no-state"]));
        r.ok();
        assert_same(&t.src, &t.rcv);
        assert_eq!(r.stat().written, SIZE as u64, "{dir:?}: the new receiver was not filled{r:?}");

        // Shrunk and grown back by --force: its tail is zeros now, not what the bitmap says.
        let f = fs::OpenOptions::new().write(true).open(&t.rcv).unwrap();
        f.set_len(SIZE as u64 / 2).unwrap();
        drop(f);
        let r = basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &["--stat", "--no-state", "--force"]));
        r.ok();
        assert_same(&t.src, &t.rcv);

        // And the bitmap is good again afterwards.
        change_leaves(&t.src, &[100]);
        let r = basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &["--stat", "--no-state"]));
        r.ok();
        assert_same(&t.src, &t.rcv);
        assert_receiver_not_read(&r, dir);
        assert_eq!(r.stat().differing, 1, "{dir:?}{r:?}");
    }
}

// ---------------------------------------------------------------------------
// 6. Usage errors
// ---------------------------------------------------------------------------

#[test]
fn bitmap_options_in_the_wrong_combination_are_usage_errors() {
    let t = setup(61);
    let (a, b, bm) = (s(&t.src), s(&t.rcv), s(&t.bm));
    let cases: Vec<(Vec<&str>, &[&str])> = vec![
        (vec!["-l", a, "-r", b, "-a", "push", "-m", "sync", "--reset-bitmap"], &["--reset-bitmap", "--bitmap"]),
        (vec!["-l", a, "-r", b, "-a", "push", "-m", "sync", "--update-bitmap"], &["--update-bitmap", "--bitmap"]),
        (vec!["-l", a, "-r", b, "-a", "push", "-m", "copy", "-b", bm], &["--bitmap"]),
        (vec!["-l", b, "-r", a, "-a", "pull", "-m", "copy", "--bitmap", bm], &["--bitmap"]),
        (vec!["-l", a, "-r", b, "-a", "push", "-m", "sync", "-b", bm, "--chunk", "64"], &["--bitmap", "--chunk"]),
        (
            vec!["-l", a, "-r", b, "-a", "push", "-m", "sync", "-b", bm, "--reset-bitmap", "--update-bitmap"],
            &["--reset-bitmap", "--update-bitmap"],
        ),
        (vec!["-l", a, "-a", "pull", "-m", "sync", "-b", bm], &["--remote"]),
        (vec!["-l", a, "-a", "pull", "-m", "sync", "-b", bm, "--update-bitmap"], &["--remote"]),
        (vec!["-l", a, "-r", b, "-b", bm], &["--bitmap"]),
        // Omitting -r is only for refreshing a bitmap.
        (vec!["-l", a, "-a", "push", "-m", "sync"], &["--remote"]),
    ];
    for (args, fragments) in cases {
        let r = basyn(&args);
        r.usage_error(fragments);
        assert!(!t.rcv.exists(), "a usage error created the receiver{r:?}");
        assert!(!t.bm.exists(), "a usage error created the bitmap{r:?}");
    }
}

// ---------------------------------------------------------------------------
// 7. A receiver written by another process during a bitmap SYNC (loop device)
// ---------------------------------------------------------------------------

/// Runs a bitmap SYNC (receiver: the loop device) and writes 4 KiB into the start of the
/// receiver (O_DIRECT) while basyn is past it and still running
/// ([`run_with_a_foreign_write`]). `None` if basyn had no more data to write when the
/// write was done (too late to interfere).
fn sync_with_a_foreign_write(dir: Dir, src: &Path, dev: &Path, bm: &Path, len: u64, state: &[&str]) -> Option<Run> {
    let mut args = bitmap_sync(dir, src, dev, bm, &["--stat"]);
    args.extend(sv(state));
    run_with_a_foreign_write(&args, dev, len, Foreign::Direct)
}

#[test]
fn a_receiver_written_during_a_bitmap_sync_is_not_declared_in_the_bitmap() {
    // A bitmap is saved at the end of a SYNC, declaring that the receiver holds the
    // source's blocks. If basyn saw another process write the receiver during that run
    // (exit 2, "run the sync again"), the bitmap must not declare the overwritten blocks:
    // the rerun basyn asks for must converge, not trust the bitmap and report success
    // with the foreign data still on the receiver.
    const LEN: usize = 96 * MIB;
    let mut failures = Vec::new();
    for (dir, with_state) in [(Dir::Push, false), (Dir::Push, true), (Dir::Pull, false), (Dir::Pull, true)] {
        let t = tmp();
        let src = t.path().join("src.img");
        big_image(&src, 71, LEN);
        let backing = t.path().join("rcv.img");
        File::create(&backing).unwrap().set_len(LEN as u64).unwrap();
        let Some(dev) = loop_dev(&backing) else { return };
        let bm = t.path().join("bm");
        // The receiver's state (if any) in the temp dir, not under /var/lib/basyn.
        let state_file = t.path().join("rcv.basyn-state");
        let state_opt = if dir == Dir::Push { "--remote-state" } else { "--state" };
        let state: Vec<&str> = if with_state { vec![state_opt, s(&state_file)] } else { vec!["--no-state"] };
        let what = format!("{dir:?}, {}", if with_state { "receiver state" } else { "--no-state" });

        // Until the foreign block stays on the receiver (basyn had passed it).
        let mut first = None;
        for _ in 0..4 {
            let _ = fs::remove_file(&bm);
            let _ = fs::remove_file(&state_file);
            let Some(r) = sync_with_a_foreign_write(dir, &src, dev.path(), &bm, LEN as u64, &state) else { continue };
            if r.code == 0 {
                // Only possible if the write landed before basyn's first stamp and was
                // then synced over.
                assert!(same_stream(&src, dev.path()), "{what}: exit 0 but the devices differ{r:?}");
                continue;
            }
            r.code(2);
            assert!(r.stderr.contains("written to by another process"), "{what}{r:?}");
            if !same_stream(&src, dev.path()) {
                first = Some(r);
                break;
            }
        }
        let Some(first) = first else {
            eprintln!("skipped: {what}: the foreign write never stayed on the receiver in four runs");
            continue;
        };

        // The same command again, as the message says.
        let mut args = bitmap_sync(dir, &src, dev.path(), &bm, &["--stat"]);
        args.extend(sv(&state));
        let again = basyn(&args);
        match again.code {
            0 if same_stream(&src, dev.path()) => {}
            0 => failures.push(format!(
                "{what}: the rerun trusted the bitmap saved by the run that saw the foreign write: exit 0, \
                 but the receiver still holds the foreign block{again:?}\nfirst run:{first:?}"
            )),
            // Refusing the bitmap and asking for --reset-bitmap is safe too.
            1 => {
                again.fails(1, &["bitmap", "--reset-bitmap"]);
                args.push("--reset-bitmap".into());
                basyn(&args).ok();
                assert!(same_stream(&src, dev.path()), "{what}: --reset-bitmap did not converge");
            }
            _ => panic!("{what}: unexpected exit code of the rerun{again:?}"),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
