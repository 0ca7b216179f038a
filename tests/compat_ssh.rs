//! The current original's contract over SSH (issue 9), against the private sshd of
//! `sshd/mod.rs`: its documented bitmap workflow driven end to end with the command lines
//! of its README's EXAMPLES (PUSH, and the same for PULL), `--reset-bitmap` and
//! `--update-bitmap` in both directions with `--chunk` and every `--hash`, and its size
//! rules and phrases. `--stat` is appended to observe what was read; it changes nothing.
//! FILE's digests are checked against coreutils over each block (`util::block_digests`).

mod sshd;
mod util;

use std::fs;
use std::path::Path;

use sshd::*;
use util::*;

const HASHES: [&str; 9] = ["BLAKE3", "SHA1", "SHA224", "SHA256", "SHA384", "SHA512", "BLAKE2B", "BLAKE2S", "MD5"];

/// Changes a few bytes in each of `blocks` (of `block` bytes) of `path`.
fn change(path: &Path, block: u64, blocks: &[u64]) {
    for &b in blocks {
        flip(path, b * block + 777, 100);
    }
}

/// Runs one command line of the original's README (paths filled in, split at spaces)
/// with `--stat` appended.
fn example(sshd: &Sshd, line: &str) -> Run {
    let mut args: Vec<&str> = line.split_whitespace().collect();
    args.push("--stat");
    sshd.basyn(&args)
}

// ---------------------------------------------------------------------------
// The EXAMPLES of the original's README, end to end
// ---------------------------------------------------------------------------

/// The original's EXAMPLES for `-b`, with its default `--buffer` (2048 KB): 16 MiB
/// images are 8 blocks.
const BLOCK: u64 = 2 << 20;
const EXAMPLE_SIZE: usize = 16 * MIB;

#[test]
fn the_originals_documented_bitmap_workflow_works_with_its_command_lines_for_push() {
    let Some(sshd) = Sshd::start() else { return };
    let (src, dst, new) = (sshd.local("sda1"), sshd.remote("sda1"), sshd.remote("new_device"));
    let bm = sshd.local("sda1.bitmap");
    let (l, r, n, b, h) = (s(&src), s(&dst), s(&new), s(&bm), ALIAS);
    random_image(&src, 1, EXAMPLE_SIZE);

    // First sync - creates bitmap.
    let first = example(&sshd, &format!("-l {l} -r {r} -h {h} -a PUSH -m SYNC -b {b}"));
    first.ok();
    assert_same(&src, &dst);
    assert_bitmap_of(&bm, &src, BLOCK, "blake3");

    // Subsequent syncs - uses existing bitmap (no destination reads).
    change(&src, BLOCK, &[2, 7]);
    let next = example(&sshd, &format!("-l {l} -r {r} -h {h} -a PUSH -m SYNC -b {b}"));
    next.ok();
    assert_same(&src, &dst);
    assert_eq!(next.stat().remote_read, 0, "the destination was read{next:?}");
    assert_eq!((next.stat().differing, next.stat().written), (2, 2 * BLOCK), "{next:?}");

    // Update bitmap only (no destination device writing).
    change(&src, BLOCK, &[4]);
    let before = read(&dst);
    let only = example(&sshd, &format!("-l {l} -m SYNC -b {b} -a PUSH"));
    only.ok();
    assert_content(&dst, &before, "the destination after 'update bitmap only'");
    assert_bitmap_of(&bm, &src, BLOCK, "blake3");
    assert_eq!((only.stat().differing, only.stat().written), (1, 0), "{only:?}");

    // Resync with bitmap update (destination IS read, only changed blocks transferred):
    // the destination no longer matches the bitmap (block 4 was never sent, block 6 is
    // written behind its back).
    change(&dst, BLOCK, &[6]);
    let update = example(&sshd, &format!("-l {l} -r {r} -h {h} -a PUSH -m SYNC -b {b} --update-bitmap"));
    update.ok();
    assert_same(&src, &dst);
    assert!(update.stat().remote_read >= EXAMPLE_SIZE as u64, "the destination was not read{update:?}");
    assert!(update.stat().written <= 2 * BLOCK, "more than the changed blocks were sent{update:?}");
    assert_bitmap_of(&bm, &src, BLOCK, "blake3");

    // Force full resync and bitmap rebuild (destination is NOT read, all blocks transferred).
    let reset = example(&sshd, &format!("-l {l} -r {r} -h {h} -a PUSH -m SYNC -b {b} --reset-bitmap"));
    reset.ok();
    assert_same(&src, &dst);
    assert_eq!((reset.stat().remote_read, reset.stat().written), (0, EXAMPLE_SIZE as u64), "{reset:?}");

    // Use case: switching to a new destination device, force full copy and record baseline.
    let switch = example(&sshd, &format!("-l {l} -r {n} -h {h} -a PUSH -m SYNC -b {b} --reset-bitmap"));
    switch.ok();
    assert_same(&src, &new);
    assert_eq!(switch.stat().remote_read, 0, "{switch:?}");
    assert_bitmap_of(&bm, &src, BLOCK, "blake3");
    change(&src, BLOCK, &[0]);
    let after = example(&sshd, &format!("-l {l} -r {n} -h {h} -a PUSH -m SYNC -b {b}"));
    after.ok();
    assert_same(&src, &new);
    assert_eq!((after.stat().remote_read, after.stat().differing), (0, 1), "{after:?}");
}

#[test]
fn the_originals_documented_bitmap_workflow_works_with_its_command_lines_for_pull() {
    let Some(sshd) = Sshd::start() else { return };
    // The same with the roles swapped: the source is the remote device, the copy local.
    let (src, dst, new) = (sshd.remote("sda1"), sshd.local("sda1"), sshd.local("new_device"));
    let bm = sshd.local("sda1.bitmap");
    let (r, l, n, b, h) = (s(&src), s(&dst), s(&new), s(&bm), ALIAS);
    random_image(&src, 2, EXAMPLE_SIZE);

    let first = example(&sshd, &format!("-l {l} -r {r} -h {h} -a PULL -m SYNC -b {b}"));
    first.ok();
    assert_same(&src, &dst);
    assert_bitmap_of(&bm, &src, BLOCK, "blake3");

    change(&src, BLOCK, &[1, 6]);
    let next = example(&sshd, &format!("-l {l} -r {r} -h {h} -a PULL -m SYNC -b {b}"));
    next.ok();
    assert_same(&src, &dst);
    assert_eq!(next.stat().local_read, 0, "the destination was read{next:?}");
    assert_eq!((next.stat().differing, next.stat().written), (2, 2 * BLOCK), "{next:?}");

    // Update bitmap only: a PULL without -l.
    change(&src, BLOCK, &[3]);
    let before = read(&dst);
    let only = example(&sshd, &format!("-r {r} -h {h} -m SYNC -b {b} -a PULL"));
    only.ok();
    assert_content(&dst, &before, "the destination after 'update bitmap only'");
    assert_bitmap_of(&bm, &src, BLOCK, "blake3");
    assert_eq!((only.stat().local_read, only.stat().differing, only.stat().written), (0, 1, 0), "{only:?}");

    change(&dst, BLOCK, &[5]);
    let update = example(&sshd, &format!("-l {l} -r {r} -h {h} -a PULL -m SYNC -b {b} --update-bitmap"));
    update.ok();
    assert_same(&src, &dst);
    assert!(update.stat().local_read >= EXAMPLE_SIZE as u64, "the destination was not read{update:?}");
    assert_bitmap_of(&bm, &src, BLOCK, "blake3");

    let reset = example(&sshd, &format!("-l {l} -r {r} -h {h} -a PULL -m SYNC -b {b} --reset-bitmap"));
    reset.ok();
    assert_same(&src, &dst);
    assert_eq!((reset.stat().local_read, reset.stat().written), (0, EXAMPLE_SIZE as u64), "{reset:?}");

    let switch = example(&sshd, &format!("-l {n} -r {r} -h {h} -a PULL -m SYNC -b {b} --reset-bitmap"));
    switch.ok();
    assert_same(&src, &new);
    assert_bitmap_of(&bm, &src, BLOCK, "blake3");
}

// ---------------------------------------------------------------------------
// --reset-bitmap and --update-bitmap over SSH, both directions, --chunk, every hash
// ---------------------------------------------------------------------------

#[test]
fn reset_and_update_bitmap_work_over_ssh_in_both_directions_with_chunk_and_every_hash() {
    let Some(sshd) = Sshd::start() else { return };
    const SIZE: usize = MIB + 12345;
    const BUF: u64 = 64 * 1024;
    for hash in HASHES {
        for dir in [Dir::Push, Dir::Pull] {
            let what = format!("{dir:?} {hash}");
            let (src, rcv) = match dir {
                Dir::Push => (sshd.local("src.img"), sshd.remote("rcv.img")),
                Dir::Pull => (sshd.remote("src.img"), sshd.local("rcv.img")),
            };
            let bm = sshd.local("bm");
            let _ = fs::remove_file(&bm);
            random_image(&src, 3, SIZE);
            random_image(&rcv, 4, SIZE);
            let mut args = ends(dir, &src, &rcv);
            let opts = ["-h", ALIAS, "-a", dir.word(), "-m", "sync", "-b", s(&bm), "--buffer", "64", "--hash", hash];
            args.extend(sv(&opts));
            args.extend(sv(&["--chunk", "16", "--no-state", "--stat"]));
            let run = |extra: &str| {
                let mut a = args.clone();
                a.push(extra.into());
                sshd.basyn(&a)
            };

            // --reset-bitmap: the receiver is not read, every block is sent.
            let reset = run("--reset-bitmap");
            reset.ok();
            assert_same(&src, &rcv);
            assert_eq!(reset.stat().reads(dir).1, 0, "{what}: --reset-bitmap read the receiver{reset:?}");
            assert_eq!(reset.stat().written, SIZE as u64, "{what}{reset:?}");
            assert_bitmap_of(&bm, &src, BUF, hash);

            // --update-bitmap: a receiver changed behind the bitmap's back is read and fixed,
            // only in the changed chunks.
            change(&rcv, BUF, &[3]);
            change(&src, BUF, &[9]);
            let update = run("--update-bitmap");
            update.ok();
            assert_same(&src, &rcv);
            assert!(update.stat().reads(dir).1 >= SIZE as u64, "{what}: the receiver was not read{update:?}");
            assert!(update.stat().written <= 4 * 16 * 1024, "{what}: more than the changed chunks{update:?}");
            assert_bitmap_of(&bm, &src, BUF, hash);

            // And FILE is then used: a change is sent, the receiver unread.
            change(&src, BUF, &[15]);
            let plain = run("--verbose");
            plain.ok();
            assert_same(&src, &rcv);
            assert_eq!((plain.stat().reads(dir).1, plain.stat().differing), (0, 1), "{what}{plain:?}");
        }
    }
}

// ---------------------------------------------------------------------------
// Sizes over SSH
// ---------------------------------------------------------------------------

#[test]
fn over_ssh_a_larger_receiver_keeps_its_tail_and_a_smaller_one_is_refused_in_the_originals_words() {
    let Some(sshd) = Sshd::start() else { return };
    for dir in [Dir::Push, Dir::Pull] {
        for mode in ["sync", "copy"] {
            let what = format!("{dir:?} {mode}");
            let (src, rcv) = match dir {
                Dir::Push => (sshd.local("src.img"), sshd.remote("rcv.img")),
                Dir::Pull => (sshd.remote("src.img"), sshd.local("rcv.img")),
            };
            let (rside, sside, verb) = match dir {
                Dir::Push => ("remote", "local", "PUSH"),
                Dir::Pull => ("local", "remote", "PULL"),
            };
            let source = random_image(&src, 5, 2 * MIB);
            let old = random_image(&rcv, 6, 3 * MIB);
            let mut args = action(dir, mode, &src, &rcv, &["--recheck", "--verbose"]);
            args.extend(sv(&["-h", ALIAS]));
            let r = sshd.basyn(&args);
            r.ok();
            let got = read(&rcv);
            assert_eq!(got.len(), 3 * MIB, "{what}: the receiver was resized");
            assert!(first_difference(&got[..2 * MIB], &source).is_none(), "{what}: the synced length differs");
            assert!(first_difference(&got[2 * MIB..], &old[2 * MIB..]).is_none(), "{what}: the tail changed");
            let line = format!("basyn: {rside} {} ({} bytes) is larger than", s(&rcv), 3 * MIB);
            assert!(r.stderr.contains(&line), "{what}: no line says so{r:?}");
            assert!(r.stdout.contains(&format!("{} bytes past the source's end", MIB)), "{what}{r:?}");

            // Smaller: refused, nothing written, the original's words.
            let small = random_image(&rcv, 7, MIB);
            let mut args = action(dir, mode, &src, &rcv, &[]);
            args.extend(sv(&["-h", ALIAS]));
            let words = format!(
                "{rside} {}: Cannot {verb} because {rside} device size ({}) is smaller than {sside} device size ({})",
                s(&rcv),
                MIB,
                2 * MIB
            );
            sshd.basyn(&args).fails(1, &[&words]);
            assert_content(&rcv, &small, &format!("{what}: receiver after the refusal"));

            // An empty source: the original's phrase.
            write(&src, &[]);
            sshd.basyn(&args).fails(1, &[&format!("{sside} {}: There is nothing to sync", s(&src))]);
            assert_content(&rcv, &small, &format!("{what}: receiver after the refusal"));
        }
    }
}
