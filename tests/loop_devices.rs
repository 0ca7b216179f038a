//! Integration tests on real block devices: loop devices over image files in temp
//! directories (`losetup`, root). Device contents are read back from `/dev/loopN`.
//! A missing prerequisite fails under CI and is skipped otherwise (see `util::require`).

mod util;

use std::path::{Path, PathBuf};

use util::*;

const DIRS: [Dir; 2] = [Dir::Push, Dir::Pull];
const MODES: [&str; 2] = ["copy", "sync"];

impl Dir {
    /// Side words of (receiver, source).
    fn sides(self) -> (&'static str, &'static str) {
        match self {
            Dir::Push => ("remote", "local"),
            Dir::Pull => ("local", "remote"),
        }
    }
}

fn recheck(dir: Dir, source: &Path, receiver: &Path) -> Vec<String> {
    let mut a = ends(dir, source, receiver);
    a.push("--recheck".into());
    a
}

/// A copy with a few scattered spots changed.
fn mutated(data: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    let n = v.len();
    for at in [0, 4095, n / 3, n / 2 + 1, n - 1] {
        v[at] ^= 0x5a;
    }
    v
}

/// An image file with `data` and a loop device over it. `None`: prerequisite missing
/// (the test returns; under CI `require` has already failed it).
fn loop_image(dir: &Path, name: &str, data: &[u8]) -> Option<(PathBuf, LoopDev)> {
    let img = dir.join(name);
    write(&img, data);
    let dev = loop_dev(&img)?;
    assert_eq!(size_of(dev.path()), data.len() as u64, "loop device size");
    Some((img, dev))
}

/// An ext4 file system of `len` bytes on a loop device over `dir/fs.img`, mounted at
/// `dir/mnt`. Dropping the pair unmounts before the loop device goes.
fn ext4_on_loop(dir: &Path, len: usize) -> Option<(Mount, LoopDev)> {
    let (_img, dev) = loop_image(dir, "fs.img", &vec![0u8; len])?;
    let mount = mount_ext4(dev.path(), &dir.join("mnt"))?;
    Some((mount, dev))
}

/// Asserts that no 4 KiB block of `device` equals the block of `source` at the same
/// offset: with random source data, proof that nothing of the source was written.
#[track_caller]
fn assert_nothing_written_from(device: &Path, source: &[u8]) {
    let got = read(device);
    for (i, (a, b)) in got.chunks(4096).zip(source.chunks(4096)).enumerate() {
        assert!(a != b, "{}: block {i} holds the source's data", device.display());
    }
}

// ===========================================================================
// Actions
// ===========================================================================

#[test]
fn loop_device_and_file_all_actions() {
    let size = 8 * MIB;
    let source = random_data(1, size);
    let other = random_data(2, size);
    let near = mutated(&source);
    for dir in DIRS {
        for mode in MODES {
            let receiver = if mode == "sync" { &near } else { &other };
            for loop_is_source in [true, false] {
                let t = tmp();
                let file = t.path().join("file.img");
                let (data_on_loop, data_on_file) =
                    if loop_is_source { (&source, receiver) } else { (receiver, &source) };
                let Some((_img, dev)) = loop_image(t.path(), "loop.img", data_on_loop) else { return };
                write(&file, data_on_file);
                let (src, rcv) =
                    if loop_is_source { (dev.path(), file.as_path()) } else { (file.as_path(), dev.path()) };
                let run = basyn(&action(dir, mode, src, rcv, &[]));
                run.ok().silent();
                assert_content(rcv, &source, &format!("receiver after {run:?}"));
                assert_content(src, &source, "source");
                basyn(&recheck(dir, src, rcv)).ok();
            }
        }
    }
}

#[test]
fn two_loop_devices_all_actions() {
    let size = 8 * MIB;
    let source = random_data(3, size);
    let other = random_data(4, size);
    let near = mutated(&source);
    for dir in DIRS {
        for mode in MODES {
            for extra in [&[][..], &["--chunk", "4"][..]] {
                let receiver = if mode == "sync" { &near } else { &other };
                let t = tmp();
                let Some((_a, src)) = loop_image(t.path(), "src.img", &source) else { return };
                let Some((_b, rcv)) = loop_image(t.path(), "rcv.img", receiver) else { return };
                let mut all = extra.to_vec();
                all.push("--stat");
                let run = basyn(&action(dir, mode, src.path(), rcv.path(), &all));
                run.ok();
                assert_eq!(run.stat().device_size, size as u64, "size from the ioctl{run:?}");
                flushbufs(rcv.path());
                assert_content(rcv.path(), &source, &format!("receiver after {run:?}"));
                assert_content(src.path(), &source, "source");
                basyn(&recheck(dir, src.path(), rcv.path())).ok();
            }
        }
    }
}

#[test]
fn a_loop_device_size_comes_from_the_device() {
    // A block device's st_size is 0: a created receiver must get the ioctl size.
    let size = 6 * MIB + 512 * 3;
    let source = random_data(5, size);
    for dir in DIRS {
        for mode in MODES {
            let t = tmp();
            let Some((_img, dev)) = loop_image(t.path(), "src.img", &source) else { return };
            let new = t.path().join("new.img");
            let run = basyn(&action(dir, mode, dev.path(), &new, &["--stat"]));
            run.ok();
            assert_eq!(run.stat().device_size, size as u64, "{run:?}");
            assert_eq!(size_of(&new), size as u64);
            assert_content(&new, &source, "created receiver");
        }
    }
}

#[test]
fn a_read_only_loop_device_works_as_source() {
    let size = 4 * MIB;
    let source = random_data(6, size);
    for dir in DIRS {
        for mode in MODES {
            let t = tmp();
            let img = t.path().join("ro.img");
            write(&img, &source);
            let Some(dev) = loop_dev_ro(&img) else { return };
            let rcv = t.path().join("rcv.img");
            write(&rcv, &mutated(&source));
            basyn(&action(dir, mode, dev.path(), &rcv, &["--recheck"])).ok().silent();
            assert_content(&rcv, &source, "receiver");
        }
    }
}

#[test]
fn force_syncs_the_source_length_onto_a_larger_loop_device_without_truncating_it() {
    let small = 16 * MIB;
    let large = 32 * MIB;
    let source = random_data(7, small);
    let old = random_data(8, large);
    for dir in DIRS {
        for mode in MODES {
            let t = tmp();
            let src = t.path().join("src.img");
            write(&src, &source);
            let Some((img, dev)) = loop_image(t.path(), "big.img", &old) else { return };
            let run = basyn(&action(dir, mode, &src, dev.path(), &["--force", "--recheck", "--stat"]));
            run.ok();
            assert_eq!(run.stat().device_size, small as u64, "{run:?}");
            assert_eq!(size_of(dev.path()), large as u64, "the device was resized");
            assert_eq!(size_of(&img), large as u64, "the backing file was truncated");
            let got = read(dev.path());
            assert_eq!(got.len(), large);
            assert!(first_difference(&got[..small], &source).is_none(), "first 16 MiB differ from the source");
            assert!(first_difference(&got[small..], &old[small..]).is_none(), "the tail beyond the source changed");
            // Without an action the sizes differ: exit 3.
            basyn(&recheck(dir, &src, dev.path())).code(3);
        }
    }
}

// ===========================================================================
// Refusals
// ===========================================================================

/// Regression (issue 9): a larger block device was refused without `--force`; the
/// original accepts it, syncs the source's length and leaves the tail.
#[test]
fn a_larger_loop_device_gets_the_sources_length_without_force_and_keeps_its_tail() {
    let source = random_data(9, 4 * MIB);
    let old = random_data(10, 8 * MIB);
    for dir in DIRS {
        for mode in MODES {
            let t = tmp();
            let src = t.path().join("src.img");
            write(&src, &source);
            let Some((_img, dev)) = loop_image(t.path(), "big.img", &old) else { return };
            let (rside, _) = dir.sides();
            let run = basyn(&action(dir, mode, &src, dev.path(), &["--recheck", "--verbose"]));
            run.ok();
            let line = format!("basyn: {rside} {} ({} bytes) is larger than", dev.s(), 8 * MIB);
            assert!(run.stderr.contains(&line), "no line on stderr says so{run:?}");
            assert!(run.stdout.contains(&format!("{} bytes past the source's end", 4 * MIB)), "{run:?}");
            let got = read(dev.path());
            assert!(first_difference(&got[..4 * MIB], &source).is_none(), "{dir:?} {mode}: the synced length differs");
            assert!(first_difference(&got[4 * MIB..], &old[4 * MIB..]).is_none(), "{dir:?} {mode}: the tail changed");
        }
    }
}

#[test]
fn a_smaller_loop_device_is_refused_even_with_force() {
    let source = random_data(11, 8 * MIB);
    let old = random_data(12, 4 * MIB);
    for dir in DIRS {
        for mode in MODES {
            for extra in [&[][..], &["--force"][..]] {
                let t = tmp();
                let src = t.path().join("src.img");
                write(&src, &source);
                let Some((_img, dev)) = loop_image(t.path(), "small.img", &old) else { return };
                let (rside, sside) = dir.sides();
                let verb = if dir == Dir::Push { "PUSH" } else { "PULL" };
                let words = format!(
                    "{rside} {}: Cannot {verb} because {rside} device size ({}) is smaller than {sside} device size ({})",
                    dev.s(),
                    4 * MIB,
                    8 * MIB
                );
                let r = basyn(&action(dir, mode, &src, dev.path(), extra));
                assert_eq!(r.fails(1, &[]), format!("basyn: {words}"), "{r:?}");
                assert_eq!(size_of(dev.path()), 4 * MIB as u64);
                assert_content(dev.path(), &old, "receiver after a refusal");
            }
        }
    }
}

#[test]
fn a_mounted_loop_device_is_refused_as_receiver() {
    let size = 16 * MIB;
    let source = random_data(13, size);
    let t = tmp();
    let src = t.path().join("src.img");
    write(&src, &source);
    let Some((_mount, dev)) = ext4_on_loop(t.path(), size) else { return };
    for dir in DIRS {
        for mode in MODES {
            let (rside, _) = dir.sides();
            let run = basyn(&action(dir, mode, &src, dev.path(), &[]));
            let line = run.fails(1, &[&format!("{rside} {}:", dev.s()), "in use"]);
            assert!(line.contains("mounted"), "the message does not say it is mounted{run:?}");
            assert_nothing_written_from(dev.path(), &source);
        }
    }
    // Reading a mounted device is fine: it can be a source, and a check works.
    let copy = t.path().join("copy.img");
    basyn(&action(Dir::Push, "copy", dev.path(), &copy, &[])).ok();
    assert_eq!(size_of(&copy), size as u64);
    basyn(&["-l", dev.s(), "-r", s(&src)]).ok();
}

#[test]
fn a_file_backing_a_loop_device_is_refused_as_receiver() {
    let size = 4 * MIB;
    let source = random_data(14, size);
    let old = random_data(15, size);
    for dir in DIRS {
        for mode in MODES {
            let t = tmp();
            let src = t.path().join("src.img");
            write(&src, &source);
            let Some((img, dev)) = loop_image(t.path(), "backing.img", &old) else { return };
            let (rside, _) = dir.sides();
            let run = basyn(&action(dir, mode, &src, &img, &[]));
            run.fails(1, &[&format!("{rside} {}:", s(&img)), "in use", dev.s()]);
            assert_content(&img, &old, "backing file after a refusal");
            assert_content(dev.path(), &old, "loop device after a refusal");
        }
    }
}

#[test]
fn a_loop_device_and_its_backing_file_are_the_same_device() {
    let data = random_data(16, 4 * MIB);
    for dir in DIRS {
        for mode in MODES {
            let t = tmp();
            let Some((img, dev)) = loop_image(t.path(), "one.img", &data) else { return };
            let (rside, _) = dir.sides();
            for (src, rcv) in [(dev.path(), img.as_path()), (img.as_path(), dev.path())] {
                let run = basyn(&action(dir, mode, src, rcv, &[]));
                run.fails(1, &[&format!("{rside} {}:", s(rcv)), "same device"]);
                assert_content(&img, &data, "backing file");
            }
        }
    }
}

#[test]
fn two_loop_devices_over_one_file_are_the_same_device() {
    let data = random_data(17, 4 * MIB);
    for dir in DIRS {
        for mode in MODES {
            let t = tmp();
            let Some((img, a)) = loop_image(t.path(), "one.img", &data) else { return };
            let Some(b) = loop_dev(&img) else { return };
            let (rside, _) = dir.sides();
            let run = basyn(&action(dir, mode, a.path(), b.path(), &[]));
            run.fails(1, &[&format!("{rside} {}:", b.s()), "same device"]);
        }
    }
}

#[test]
fn a_read_only_loop_device_is_refused_as_receiver() {
    let size = 4 * MIB;
    let source = random_data(18, size);
    let old = random_data(19, size);
    for dir in DIRS {
        for mode in MODES {
            let t = tmp();
            let src = t.path().join("src.img");
            write(&src, &source);
            let img = t.path().join("ro.img");
            write(&img, &old);
            let Some(dev) = loop_dev_ro(&img) else { return };
            let (rside, _) = dir.sides();
            let run = basyn(&action(dir, mode, &src, dev.path(), &[]));
            let line = run.fails(1, &[&format!("{rside} {}:", dev.s())]);
            assert!(line.contains("read-only") || line.contains("not permitted"), "cause not named{run:?}");
            assert!(!line.contains("partly changed"), "a refusal must not claim partial changes{run:?}");
            assert_content(dev.path(), &old, "read-only receiver");
        }
    }
}

#[test]
fn a_full_file_system_fails_with_exit_2_naming_the_receiver() {
    // A 16 MiB ext4 file system cannot hold a 32 MiB image: the write fails part way.
    let t = tmp();
    let src = t.path().join("src.img");
    let source = random_image(&src, 21, 32 * MIB);
    let Some((mount, _dev)) = ext4_on_loop(t.path(), 16 * MIB) else { return };
    for dir in DIRS {
        for mode in MODES {
            let rcv = mount.dir.join("rcv.img");
            let (rside, _) = dir.sides();
            let run = basyn(&action(dir, mode, &src, &rcv, &[]));
            run.fails(2, &[&format!("{rside} {}:", s(&rcv)), "no space left", "partly changed"]);
            assert!(run.stdout.is_empty(), "{run:?}");
            assert_content(&src, &source, "source");
            std::fs::remove_file(&rcv).unwrap();
        }
    }
}

/// A receiver's large writes bypass the page cache (`direct.rs`): a backup must not fill
/// the backup host's cache with data nobody reads back. The receiver is a new file on an
/// ext4 file system on a loop device (a temp directory may be tmpfs, which is all page
/// cache); a COPY of 32 MiB into it must leave at most a few pages of it cached (written
/// the buffered way it was all of it), and the data on the device.
#[test]
fn a_copy_into_a_file_leaves_its_data_out_of_the_page_cache() {
    let t = tmp();
    let src = t.path().join("src.img");
    let source = random_image(&src, 31, 32 * MIB);
    let Some((mount, _dev)) = ext4_on_loop(t.path(), 64 * MIB) else { return };
    for dir in DIRS {
        let rcv = mount.dir.join("rcv.img");
        basyn(&action(dir, "copy", &src, &rcv, &[])).ok();
        let cached = resident_bytes(&rcv);
        assert!(
            cached <= 16 * 4096,
            "{dir:?} COPY into a new file: {cached} bytes of it are in the page cache afterwards"
        );
        assert_content(&rcv, &source, &format!("{dir:?} COPY into a new file"));
        std::fs::remove_file(&rcv).unwrap();
    }
}

// ===========================================================================
// Checks without an action
// ===========================================================================

#[test]
fn checks_on_loop_devices() {
    let size = 8 * MIB;
    let data = random_data(20, size);
    let mut changed = data.clone();
    changed[5 * MIB + 3] ^= 1;
    let t = tmp();
    let Some((_a, same)) = loop_image(t.path(), "a.img", &data) else { return };
    let Some((_b, twin)) = loop_image(t.path(), "b.img", &data) else { return };
    let Some((_c, diff)) = loop_image(t.path(), "c.img", &changed) else { return };
    let Some((_d, small)) = loop_image(t.path(), "d.img", &data[..4 * MIB]) else { return };
    let file = t.path().join("file.img");
    write(&file, &data);

    // Existence only.
    basyn(&["-l", same.s(), "-r", twin.s()]).ok().silent();
    basyn(&["-l", same.s(), "-r", s(&file)]).ok().silent();
    basyn(&["-l", same.s(), "-r", "/dev/no-such-loop"]).fails(1, &["remote /dev/no-such-loop: no such file or device"]);

    // Identical: 0, on devices and device vs file, with and without chunks.
    basyn(&["-l", same.s(), "-r", twin.s(), "--recheck"]).ok().silent();
    basyn(&["-l", s(&file), "-r", same.s(), "--recheck", "--chunk", "4"]).ok();
    // Different content: 3, nothing changed.
    basyn(&["-l", same.s(), "-r", diff.s(), "--recheck"]).fails(3, &[same.s(), diff.s()]);
    basyn(&["-l", diff.s(), "-r", s(&file), "--recheck", "--buffer", "64"]).code(3);
    assert_content(diff.path(), &changed, "checked device");
    assert_content(same.path(), &data, "checked device");
    // Different sizes: 3, both sizes named.
    basyn(&["-l", same.s(), "-r", small.s(), "--recheck"]).fails(3, &[&size.to_string(), &(4 * MIB).to_string()]);
    assert_content(small.path(), &data[..4 * MIB], "checked device");
}
