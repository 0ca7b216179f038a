//! Integration tests of the current original's bitmap workflow (issue 9; docs/usage.md
//! "The original's bitmap", docs/bitmap-format.md), on image files and loop devices:
//! `-b FILE` compares the source with FILE and never reads the receiver, a missing FILE
//! is created, `--update-bitmap` is a regular SYNC that rewrites FILE, `--reset-bitmap`
//! sends every block unread, a receiver may be omitted to refresh FILE only, FILE is in
//! the original's format (built here byte by byte) or basyn's, is refused with the
//! original's words when built for another run, and never claims a block the receiver
//! does not hold after an interrupted run.
//!
//! Images of 8 MiB with `--buffer 64` (128 blocks). What was read comes from `--stat`'s
//! `Read:` line; `--no-state` keeps `.basyn-state` files from standing in for reading.
//! FILE's digests are checked against coreutils (`sha1sum`, ...) over each block.

mod util;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::Duration;

use util::*;

/// Block size of these tests, in KiB and bytes.
const BUF_KB: &str = "64";
const LEAF: u64 = 64 * 1024;
/// Image size: 128 blocks.
const SIZE: usize = 8 * MIB;
const LEAVES: u64 = (SIZE as u64) / LEAF;

const BOTH: [Dir; 2] = [Dir::Push, Dir::Pull];

/// `-l -r -a DIR -m SYNC -b BITMAP --buffer 64` from `source` to `receiver`, then `extra`.
fn bitmap_sync(dir: Dir, source: &Path, receiver: &Path, bitmap: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = ends(dir, source, receiver);
    a.extend(sv(&["-a", dir.word(), "-m", "sync", "-b", s(bitmap), "--buffer", BUF_KB]));
    a.extend(sv(extra));
    a
}

/// The same without the receiver: PUSH without `-r`, PULL without `-l`.
fn refresh(dir: Dir, source: &Path, bitmap: &Path, extra: &[&str]) -> Vec<String> {
    let side = if dir == Dir::Push { "-l" } else { "-r" };
    let mut a = sv(&[side, s(source), "-a", dir.word(), "-m", "sync", "-b", s(bitmap), "--buffer", BUF_KB]);
    a.extend(sv(extra));
    a
}

/// Asserts the run did not read the receiver (`--stat`'s `Read:` line).
#[track_caller]
fn assert_receiver_not_read(run: &Run, dir: Dir) {
    assert_eq!(run.stat().reads(dir).1, 0, "the {dir:?} run read the receiver{run:?}");
}

/// Asserts FILE is in the original's layout for `hash` and holds the digest of each
/// block of `source` (computed by coreutils).
#[track_caller]
fn assert_original_bitmap(bm: &Path, source: &Path, hash: &str) {
    assert!(original_hash_id(hash).is_some(), "{hash} is not a hash the original knows");
    assert_bitmap_of(bm, source, LEAF, hash);
}

/// Asserts FILE is in basyn's own format (BLAKE3) and holds the digest of each block.
#[track_caller]
fn assert_basyn_bitmap(bm: &Path, source: &Path) {
    assert!(fs::read(bm).unwrap().starts_with(b"BASYNBMP"), "{} is not in basyn's format", bm.display());
    assert_bitmap_of(bm, source, LEAF, "blake3");
}

/// The digests of FILE (after its 25-byte header), block by block.
fn file_digests(bm: &Path, digest_len: usize) -> Vec<Vec<u8>> {
    fs::read(bm).unwrap()[25..].chunks(digest_len).map(|c| c.to_vec()).collect()
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
// 1. -b FILE: a missing FILE is created; the receiver is never read
// ---------------------------------------------------------------------------

#[test]
fn a_missing_bitmap_is_created_and_every_block_is_sent_without_reading_the_receiver() {
    for dir in BOTH {
        for hash in ["sha256", "blake3"] {
            let what = format!("{dir:?} --hash {hash}");
            let t = setup(11);
            random_image(&t.rcv, 12, SIZE);
            let r = basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &["--hash", hash, "--stat", "--no-state"]));
            r.ok();
            assert_same(&t.src, &t.rcv);
            assert_receiver_not_read(&r, dir);
            let f = r.stat();
            assert_eq!((f.compared, f.differing, f.written), (LEAVES, LEAVES, SIZE as u64), "{what}{r:?}");
            // The original's format for a hash it knows, basyn's own for BLAKE3.
            match hash {
                "blake3" => assert_basyn_bitmap(&t.bm, &t.src),
                _ => assert_original_bitmap(&t.bm, &t.src, hash),
            }

            // The new FILE is then trusted: an unchanged source sends nothing.
            let again = basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &["--hash", hash, "--stat", "--no-state"]));
            again.ok();
            assert_receiver_not_read(&again, dir);
            assert_eq!((again.stat().differing, again.stat().written), (0, 0), "{what}{again:?}");
        }
    }
}

#[test]
fn a_sync_with_a_bitmap_sends_only_the_changed_blocks_and_records_them() {
    for dir in BOTH {
        let t = setup(21);
        basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &["--hash", "sha1"])).ok();
        for changed in [&[3u64, 40, 41, 127][..], &[0, 64]] {
            change_leaves(&t.src, changed);
            let r = basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &["--hash", "sha1", "--stat", "--no-state"]));
            r.ok();
            assert_same(&t.src, &t.rcv);
            assert_receiver_not_read(&r, dir);
            let f = r.stat();
            assert_eq!(f.compared, LEAVES, "{dir:?}{r:?}");
            assert_eq!(f.differing, changed.len() as u64, "{dir:?}: only the changed blocks differ{r:?}");
            assert_eq!(f.written, changed.len() as u64 * LEAF, "{dir:?}: differing blocks are sent whole{r:?}");
            assert_original_bitmap(&t.bm, &t.src, "sha1");
        }
    }
}

// ---------------------------------------------------------------------------
// 2. --update-bitmap: a regular SYNC that rewrites FILE
// ---------------------------------------------------------------------------

/// Regression: `--update-bitmap` only refreshed FILE and transferred nothing, so a
/// receiver changed behind the bitmap's back stayed wrong.
#[test]
fn update_bitmap_syncs_a_receiver_changed_behind_the_bitmaps_back() {
    for dir in BOTH {
        for chunk in [&[][..], &["--chunk", "16"]] {
            let what = format!("{dir:?} {chunk:?}");
            let t = setup(31);
            basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &["--hash", "sha1"])).ok();
            // Someone writes the receiver: the bitmap no longer describes it, and a plain
            // bitmap SYNC cannot know.
            change_leaves(&t.rcv, &[7, 90]);
            basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &["--hash", "sha1", "--no-state"])).ok();
            assert!(!same_stream(&t.src, &t.rcv), "{what}: a bitmap SYNC read the receiver");

            let mut extra = vec!["--hash", "sha1", "--update-bitmap", "--stat", "--no-state", "--recheck"];
            extra.extend_from_slice(chunk);
            let r = basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &extra));
            r.ok();
            assert_same(&t.src, &t.rcv);
            let f = r.stat();
            assert!(f.reads(dir).1 >= SIZE as u64, "{what}: the receiver was not read{r:?}");
            assert!(f.differing >= 2, "{what}: the changed blocks were not found{r:?}");
            assert!(f.written > 0 && f.written <= 2 * LEAF, "{what}: more than the differing blocks sent{r:?}");
            assert_original_bitmap(&t.bm, &t.src, "sha1");

            // The rewritten FILE is trusted again.
            change_leaves(&t.src, &[100]);
            let r = basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &["--hash", "sha1", "--stat", "--no-state"]));
            r.ok();
            assert_same(&t.src, &t.rcv);
            assert_receiver_not_read(&r, dir);
            assert_eq!(r.stat().differing, 1, "{what}{r:?}");
        }
    }
}

// ---------------------------------------------------------------------------
// 3. --reset-bitmap: the receiver is not read, every block is sent
// ---------------------------------------------------------------------------

/// Regression: `--reset-bitmap` read the receiver to compare.
#[test]
fn reset_bitmap_sends_every_block_without_reading_the_receiver() {
    for dir in BOTH {
        // FILE valid, garbage, or built for another run: all are started from scratch.
        for spoil in [None, Some(b"garbage".to_vec()), Some(original_bitmap(SIZE as u64 / 2, LEAF, 0, &[]))] {
            let what = format!("{dir:?} {:?}", spoil.as_ref().map(|b| b.len()));
            let t = setup(41);
            basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &["--hash", "sha1"])).ok();
            if let Some(bytes) = &spoil {
                write(&t.bm, bytes);
            }
            change_leaves(&t.rcv, &[5]);
            let r = basyn(&bitmap_sync(
                dir,
                &t.src,
                &t.rcv,
                &t.bm,
                &["--hash", "sha1", "--reset-bitmap", "--stat", "--no-state"],
            ));
            r.ok();
            assert_same(&t.src, &t.rcv);
            assert_receiver_not_read(&r, dir);
            let f = r.stat();
            assert_eq!((f.differing, f.written), (LEAVES, SIZE as u64), "{what}: not every block was sent{r:?}");
            assert_original_bitmap(&t.bm, &t.src, "sha1");
        }
    }
}

// ---------------------------------------------------------------------------
// 4. No receiver: only FILE is refreshed
// ---------------------------------------------------------------------------

#[test]
fn without_a_receiver_only_the_bitmap_is_refreshed_from_the_source() {
    for dir in BOTH {
        let t = setup(51);
        let r = basyn(&refresh(dir, &t.src, &t.bm, &["--hash", "md5", "--stat"]));
        r.ok();
        assert_original_bitmap(&t.bm, &t.src, "md5");
        let f = r.stat();
        assert_eq!((f.compared, f.differing, f.written), (LEAVES, LEAVES, 0), "{dir:?}{r:?}");
        assert_eq!(f.reads(dir).0, SIZE as u64, "{dir:?}: the source was not read{r:?}");
        let names: Vec<_> = fs::read_dir(t.src.parent().unwrap()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(!t.rcv.exists(), "{dir:?}: a receiver was created: {names:?}");

        // Later: the changed blocks are counted, and FILE follows the source.
        change_leaves(&t.src, &[1, 2, 3]);
        for extra in [&[][..], &["--update-bitmap"], &["--reset-bitmap"]] {
            let mut args = vec!["--hash", "md5", "--stat"];
            args.extend_from_slice(extra);
            let r = basyn(&refresh(dir, &t.src, &t.bm, &args));
            r.ok();
            assert_original_bitmap(&t.bm, &t.src, "md5");
            // --reset-bitmap ignores what FILE held: every block counts as changed.
            let expect = if extra.is_empty() {
                3
            } else if extra == ["--reset-bitmap"] {
                LEAVES
            } else {
                0
            };
            assert_eq!(r.stat().differing, expect, "{dir:?} {extra:?}{r:?}");
        }

        // A receiver that holds the source then syncs from the refreshed FILE unread.
        fs::copy(&t.src, &t.rcv).unwrap();
        change_leaves(&t.src, &[9]);
        let r = basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &["--hash", "md5", "--stat", "--no-state"]));
        r.ok();
        assert_same(&t.src, &t.rcv);
        assert_receiver_not_read(&r, dir);
        assert_eq!(r.stat().differing, 1, "{dir:?}{r:?}");
    }
}

// ---------------------------------------------------------------------------
// 5. FILE for another run, empty or garbage: refused with the original's words
// ---------------------------------------------------------------------------

#[test]
fn a_bitmap_for_another_size_buffer_or_hash_is_refused_naming_both_values() {
    let digests = vec![0u8; LEAVES as usize * 20];
    let half = vec![0u8; LEAVES as usize / 2 * 20];
    let cases: Vec<(Vec<u8>, Vec<&str>)> = vec![
        (original_bitmap(SIZE as u64 / 2, LEAF, 0, &half), vec!["device size mismatch", "4194304", "8388608"]),
        (original_bitmap(SIZE as u64, 2 * LEAF, 0, &half), vec!["buffer size mismatch", "131072", "65536"]),
        (
            original_bitmap(SIZE as u64, LEAF, 7, &digests[..LEAVES as usize * 16]),
            vec!["hash function mismatch", "MD5", "SHA1"],
        ),
        (vec![], vec!["is empty"]),
        (random_data(99, 4096), vec!["is not a bitmap file"]),
        (original_bitmap(SIZE as u64, LEAF, 0, &digests[..100]), vec!["truncated or garbage"]),
    ];
    for dir in BOTH {
        for (bytes, words) in &cases {
            for mode in [&[][..], &["--update-bitmap"]] {
                let t = setup(61);
                let receiver = random_image(&t.rcv, 62, SIZE);
                write(&t.bm, bytes);
                let mut extra = vec!["--hash", "sha1"];
                extra.extend_from_slice(mode);
                let r = basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &extra));
                let mut fragments = vec![format!("bitmap {}: ", s(&t.bm)), "--reset-bitmap".to_string()];
                fragments.extend(words.iter().map(|w| w.to_string()));
                let fragments: Vec<&str> = fragments.iter().map(|f| f.as_str()).collect();
                r.fails(1, &fragments);
                assert!(r.stdout.is_empty(), "{dir:?}{r:?}");
                assert_content(&t.rcv, &receiver, &format!("{dir:?} {words:?}: receiver after the refusal"));
                assert_eq!(&fs::read(&t.bm).unwrap(), bytes, "{dir:?} {words:?}: the refused FILE was changed");

                // A missing receiver is not created by the refusal either; a refresh is
                // refused the same way.
                fs::remove_file(&t.rcv).unwrap();
                basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &extra)).fails(1, &fragments);
                assert!(!t.rcv.exists(), "{dir:?} {words:?}: a refused run created the receiver");
                basyn(&refresh(dir, &t.src, &t.bm, &extra)).fails(1, &fragments);
                assert_eq!(&fs::read(&t.bm).unwrap(), bytes, "{dir:?} {words:?}: a refused refresh changed FILE");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// 6. The original's own FILE, both ways
// ---------------------------------------------------------------------------

#[test]
fn the_originals_bitmap_file_is_used_and_written_back_in_its_format() {
    for dir in BOTH {
        for hash in ["sha1", "sha512", "blake2b"] {
            let what = format!("{dir:?} {hash}");
            let t = setup(71);
            fs::copy(&t.src, &t.rcv).unwrap();
            // What the original leaves after syncing this receiver: built here byte by byte.
            let id = original_hash_id(hash).unwrap();
            let theirs = original_bitmap(SIZE as u64, LEAF, id, &block_digests(hash, &t.rcv, LEAF as usize));
            write(&t.bm, &theirs);
            change_leaves(&t.src, &[10, 11, 120]);
            let r = basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &["--hash", hash, "--stat", "--no-state"]));
            r.ok();
            assert_same(&t.src, &t.rcv);
            assert_receiver_not_read(&r, dir);
            assert_eq!((r.stat().differing, r.stat().written), (3, 3 * LEAF), "{what}{r:?}");
            // Written back in the original's layout: the original can use it again.
            assert_original_bitmap(&t.bm, &t.src, hash);
        }
    }
}

#[test]
fn a_bitmap_the_original_has_just_created_sends_every_block() {
    // The original's new FILE: its header and all-zero ("unknown") digests.
    for dir in BOTH {
        let t = setup(72);
        fs::copy(&t.src, &t.rcv).unwrap();
        write(&t.bm, &original_bitmap(SIZE as u64, LEAF, 2, &vec![0u8; LEAVES as usize * 32]));
        let r = basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &["--hash", "sha256", "--stat", "--no-state"]));
        r.ok();
        assert_receiver_not_read(&r, dir);
        assert_eq!(r.stat().differing, LEAVES, "{dir:?}: an unknown block was taken as held{r:?}");
        assert_original_bitmap(&t.bm, &t.src, "sha256");
    }
}

// ---------------------------------------------------------------------------
// 7. An interrupted run leaves no false claim in FILE
// ---------------------------------------------------------------------------

/// Asserts every digest of FILE is unknown (zero) or that of the receiver's block.
#[track_caller]
fn assert_no_false_claim(bm: &Path, receiver: &Path, hash: &str, block: usize, what: &str) -> usize {
    let held = block_digests(hash, receiver, block);
    let dl = held.len() / size_of(receiver).div_ceil(block as u64) as usize;
    let mut known = 0;
    for (i, (claim, real)) in file_digests(bm, dl).iter().zip(held.chunks(dl)).enumerate() {
        if claim.iter().all(|b| *b == 0) {
            continue;
        }
        assert_eq!(&claim[..], real, "{what}: FILE claims block {i}, which the receiver does not hold");
        known += 1;
    }
    known
}

#[test]
fn an_interrupted_bitmap_sync_leaves_no_block_claimed_that_the_receiver_does_not_hold() {
    const LEN: usize = 64 * MIB;
    const BLOCK: usize = 256 * 1024;
    for dir in BOTH {
        for mode in [&[][..], &["--reset-bitmap"], &["--update-bitmap"]] {
            let what = format!("{dir:?} {mode:?}");
            let t = tmp();
            let (src, rcv, bm) = (t.path().join("src.img"), t.path().join("rcv.img"), t.path().join("bm"));
            big_image(&src, 81, LEN);
            fs::copy(&src, &rcv).unwrap();
            let mut args = ends(dir, &src, &rcv);
            args.extend(sv(&["-a", dir.word(), "-m", "sync", "-b", s(&bm), "--buffer", "256", "--hash", "sha1"]));
            args.push("--no-state".into());
            basyn(&args).ok();
            // Every block of the source changes; the run is killed part way.
            big_image(&src, 82, LEN);
            args.extend(sv(mode));
            let mut bg = start(&args, &[]);
            wait_until(Duration::from_secs(60), "basyn to have sent a third of the data, or to end", || {
                !bg.running() || bg.written() >= LEN as u64 / 3
            });
            bg.kill();
            wait_until(Duration::from_secs(60), "the killed run's endpoint to release the receiver", || {
                File::open(&rcv).is_ok_and(|f| f.try_lock().is_ok())
            });
            let killed = bg.finish();
            assert_eq!(killed.code, -1, "{what}: the run ended before it was killed{killed:?}");
            let known = assert_no_false_claim(&bm, &rcv, "sha1", BLOCK, &what);
            eprintln!("{what}: {known} blocks still claimed after the kill");

            // The same command again converges.
            basyn(&args).ok();
            assert!(same_stream(&src, &rcv), "{what}: the rerun did not converge");
            assert_eq!(assert_no_false_claim(&bm, &rcv, "sha1", BLOCK, &what), LEN / BLOCK);
        }
    }
}

// ---------------------------------------------------------------------------
// 8. A new receiver does not inherit FILE
// ---------------------------------------------------------------------------

#[test]
fn a_deleted_or_regrown_receiver_is_not_trusted_to_hold_what_the_bitmap_says() {
    for dir in BOTH {
        let t = setup(91);
        basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &[])).ok();
        // Deleted: basyn creates a zero-filled receiver, which FILE does not describe.
        fs::remove_file(&t.rcv).unwrap();
        let r = basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &["--stat", "--no-state"]));
        r.ok();
        assert_same(&t.src, &t.rcv);
        assert_eq!(r.stat().written, SIZE as u64, "{dir:?}: the new receiver was not filled{r:?}");
        // Shrunk and grown back by --force: its tail is zeros now.
        let f = fs::OpenOptions::new().write(true).open(&t.rcv).unwrap();
        f.set_len(SIZE as u64 / 2).unwrap();
        drop(f);
        basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &["--stat", "--no-state", "--force"])).ok();
        assert_same(&t.src, &t.rcv);
        // FILE is good again afterwards.
        change_leaves(&t.src, &[100]);
        let r = basyn(&bitmap_sync(dir, &t.src, &t.rcv, &t.bm, &["--stat", "--no-state"]));
        r.ok();
        assert_same(&t.src, &t.rcv);
        assert_receiver_not_read(&r, dir);
        assert_eq!(r.stat().differing, 1, "{dir:?}{r:?}");
    }
}

// ---------------------------------------------------------------------------
// 9. Usage errors
// ---------------------------------------------------------------------------

#[test]
fn bitmap_options_in_the_wrong_combination_are_usage_errors() {
    let t = setup(101);
    let (a, b, bm) = (s(&t.src), s(&t.rcv), s(&t.bm));
    let cases: Vec<(Vec<&str>, &[&str])> = vec![
        (vec!["-l", a, "-r", b, "-a", "push", "-m", "sync", "--reset-bitmap"], &["--reset-bitmap", "--bitmap"]),
        (vec!["-l", a, "-r", b, "-a", "push", "-m", "sync", "--update-bitmap"], &["--update-bitmap", "--bitmap"]),
        (vec!["-l", a, "-r", b, "-a", "push", "-m", "copy", "-b", bm], &["--bitmap"]),
        (vec!["-l", b, "-r", a, "-a", "pull", "-m", "copy", "--bitmap", bm], &["--bitmap"]),
        (
            vec!["-l", a, "-r", b, "-a", "push", "-m", "sync", "-b", bm, "--reset-bitmap", "--update-bitmap"],
            &["--reset-bitmap", "--update-bitmap"],
        ),
        // The source is never optional.
        (vec!["-l", a, "-a", "pull", "-m", "sync", "-b", bm], &["--remote"]),
        (vec!["-r", a, "-a", "push", "-m", "sync", "-b", bm], &["--local"]),
        (vec!["-l", a, "-r", b, "-b", bm], &["--bitmap"]),
        // Without a receiver there is nothing to recheck.
        (vec!["-l", a, "-a", "push", "-m", "sync", "-b", bm, "--recheck"], &["--recheck"]),
        // Omitting the receiver is only for refreshing a bitmap.
        (vec!["-l", a, "-a", "push", "-m", "sync"], &["--remote"]),
        (vec!["-r", a, "-a", "pull", "-m", "sync"], &["--local"]),
    ];
    for (args, fragments) in cases {
        let r = basyn(&args);
        r.usage_error(fragments);
        assert!(!t.rcv.exists(), "a usage error created the receiver{r:?}");
        assert!(!t.bm.exists(), "a usage error created the bitmap{r:?}");
    }
}

// ---------------------------------------------------------------------------
// 10. A receiver written by another process during a bitmap SYNC (loop device)
// ---------------------------------------------------------------------------

#[test]
fn a_receiver_written_during_a_bitmap_sync_is_forgotten_by_the_bitmap() {
    // FILE declares what the receiver holds. If another process wrote the receiver
    // during the run (exit 2), any block may differ from FILE: it must forget them all,
    // so that the rerun basyn asks for converges.
    const LEN: usize = 96 * MIB;
    for (dir, with_state) in [(Dir::Push, false), (Dir::Push, true), (Dir::Pull, false), (Dir::Pull, true)] {
        let t = tmp();
        let src = t.path().join("src.img");
        big_image(&src, 111, LEN);
        let backing = t.path().join("rcv.img");
        File::create(&backing).unwrap().set_len(LEN as u64).unwrap();
        let Some(dev) = loop_dev(&backing) else { return };
        let bm = t.path().join("bm");
        let state_file = t.path().join("rcv.basyn-state");
        let state_opt = if dir == Dir::Push { "--remote-state" } else { "--state" };
        let state: Vec<&str> = if with_state { vec![state_opt, s(&state_file)] } else { vec!["--no-state"] };
        let what = format!("{dir:?}, {state:?}");
        let mut args = ends(dir, &src, dev.path());
        args.extend(sv(&["-a", dir.word(), "-m", "sync", "-b", s(&bm), "--hash", "sha1", "--buffer", "1024"]));
        args.extend(sv(&state));
        let mut seen = None;
        for _ in 0..4 {
            let _ = fs::remove_file(&bm);
            let _ = fs::remove_file(&state_file);
            let Some(r) = run_with_a_foreign_write(&args, dev.path(), LEN as u64, Foreign::Direct) else { continue };
            if r.code == 0 {
                assert!(same_stream(&src, dev.path()), "{what}: exit 0 but the devices differ{r:?}");
                continue;
            }
            r.code(2);
            assert!(r.stderr.contains("written to by another process"), "{what}{r:?}");
            seen = Some(r);
            break;
        }
        let Some(first) = seen else {
            require(false, &format!("{what}: the foreign write never fell inside the run in four tries"));
            continue;
        };
        let digests = file_digests(&bm, 20);
        assert!(digests.iter().all(|d| d.iter().all(|b| *b == 0)), "{what}: FILE still claims blocks{first:?}");
        basyn(&args).ok();
        assert!(same_stream(&src, dev.path()), "{what}: the rerun did not converge");
    }
}
