//! Zeros and holes, on real files and loop devices: holes of a source are not read,
//! zeros cross the wire as tokens, a receiver basyn creates stays sparse, zeros written
//! over data become holes (files) or zeroed ranges (block devices), a device declared
//! zero is neither read nor written zeros, and a block whose only non-zero byte is its
//! last one is never taken for zeros.

mod util;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use util::*;

/// Bytes a file has allocated on disk.
fn allocated(path: &Path) -> u64 {
    fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).blocks() * 512
}

/// A sparse file of `size` bytes with `data` written at each offset.
fn sparse_file(path: &Path, size: u64, data: &[(u64, Vec<u8>)]) {
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).unwrap();
    f.set_len(size).unwrap();
    for (at, bytes) in data {
        f.write_all_at(bytes, *at).unwrap();
    }
    f.sync_all().unwrap();
}

/// Field `i` (0-based) of a loop device's `/sys/class/block/NAME/stat`: 2 is sectors
/// read, 6 sectors written.
fn loop_stat(dev: &LoopDev, i: usize) -> u64 {
    let name = dev.path().file_name().unwrap().to_string_lossy().into_owned();
    let text = fs::read_to_string(format!("/sys/class/block/{name}/stat")).unwrap();
    text.split_whitespace().nth(i).unwrap().parse().unwrap()
}

fn run(dir: Dir, mode: &str, source: &Path, receiver: &Path, extra: &[&str]) -> Run {
    let mut e = vec!["--stat"];
    e.extend_from_slice(extra);
    basyn(&action(dir, mode, source, receiver, &e))
}

#[test]
fn a_half_sparse_image_is_copied_and_synced_into_new_sparse_files_without_reading_its_holes() {
    let t = tmp();
    let src = t.path().join("src.img");
    let size = 1u64 << 30;
    // 1 MiB of data in every other MiB: half of the image is holes.
    let chunks: Vec<(u64, Vec<u8>)> = (0..512u64).map(|k| (k * 2 * MIB as u64, random_data(k + 1, MIB))).collect();
    sparse_file(&src, size, &chunks);
    let data = 512 * MIB as u64;
    let src_alloc = allocated(&src);
    assert!(src_alloc < size * 6 / 10, "the source is not sparse ({src_alloc} bytes allocated)");
    for dir in [Dir::Push, Dir::Pull] {
        for mode in ["copy", "sync"] {
            let what = format!("{dir:?} {mode}");
            let new = t.path().join(format!("new-{}-{mode}.img", dir.word()));
            let r = run(dir, mode, &src, &new, &["--no-state"]);
            r.ok();
            let f = r.stat();
            assert!(same_stream(&src, &new), "{what}: the new file differs from the source{r:?}");
            let new_alloc = allocated(&new);
            assert!(
                new_alloc.abs_diff(src_alloc) <= src_alloc / 20,
                "{what}: {new_alloc} bytes allocated for a source of {src_alloc}{r:?}"
            );
            let (source_read, receiver_read) = f.reads(dir);
            // A PULL SYNC reads a remote source twice: to digest it, then to send what
            // differs. Either way its holes are never read.
            let passes = if dir == Dir::Pull && mode == "sync" { 2 } else { 1 };
            let limit = passes * (data + data / 50);
            assert!(source_read <= limit, "{what}: {source_read} bytes of the source read{r:?}");
            assert_eq!(receiver_read, 0, "{what}: the new (zero) receiver was read{r:?}");
            // --stat says what reached the receiver: its holes were not written.
            assert_eq!(f.written, data, "{what}: --stat counts {} bytes written{r:?}", f.written);
            fs::remove_file(&new).unwrap();
        }
    }
}

#[test]
fn a_block_whose_only_non_zero_byte_is_its_last_is_not_zero() {
    let t = tmp();
    let size = 8 * MIB;
    let mut data = vec![0u8; size];
    // The last byte of a whole leaf, of a page in the middle of a piece, and of the device.
    for at in [2 * MIB - 1, 3 * MIB + 8191, size - 1] {
        data[at] = 1;
    }
    let src = t.path().join("src.img");
    write(&src, &data);
    for mode in ["copy", "sync"] {
        for receiver in ["new", "zeros", "ones"] {
            let what = format!("{mode} onto {receiver}");
            let dst = t.path().join(format!("dst-{mode}-{receiver}.img"));
            match receiver {
                "zeros" => sparse_file(&dst, size as u64, &[]),
                "ones" => write(&dst, &vec![0xffu8; size]),
                _ => {}
            }
            run(Dir::Push, mode, &src, &dst, &["--no-state"]).ok();
            assert_content(&dst, &data, &what);
        }
        // The same onto a loop device, and back from it.
        let img = t.path().join(format!("loop-{mode}.img"));
        write(&img, &vec![0xffu8; size]);
        let Some(dev) = loop_dev(&img) else { return };
        run(Dir::Push, mode, &src, dev.path(), &["--no-state"]).ok();
        flushbufs(dev.path());
        assert_content(dev.path(), &data, &format!("{mode} onto a loop device"));
        let back = t.path().join(format!("back-{mode}.img"));
        run(Dir::Pull, mode, dev.path(), &back, &["--no-state"]).ok();
        assert_content(&back, &data, &format!("{mode} from a loop device"));
    }
}

#[test]
fn zeros_over_data_become_a_hole_in_a_file_and_zeros_on_a_loop_device_and_cross_as_tokens() {
    let t = tmp();
    let size = 16 * MIB;
    let mut data = random_data(7, size);
    data[4 * MIB..12 * MIB].fill(0);
    let src = t.path().join("src.img");
    write(&src, &data);
    let dst = t.path().join("dst.img");
    write(&dst, &random_data(8, size));
    let r = run(Dir::Push, "sync", &src, &dst, &["--no-state", "--compress", "none"]);
    r.ok();
    assert_content(&dst, &data, "file receiver");
    let alloc = allocated(&dst);
    assert!(alloc <= (size - 8 * MIB + MIB) as u64, "the zero range was not punched: {alloc} bytes allocated{r:?}");
    // The 8 MiB of zeros crossed as tokens: what was sent is about the 8 MiB of data.
    let tx = r.stat().tx;
    assert!(tx < (8 * MIB + MIB) as u64, "{tx} bytes sent for 8 MiB of data and 8 MiB of zeros{r:?}");

    let img = t.path().join("loop.img");
    write(&img, &random_data(9, size));
    let Some(dev) = loop_dev(&img) else { return };
    let r = run(Dir::Push, "sync", &src, dev.path(), &["--no-state"]);
    r.ok();
    flushbufs(dev.path());
    assert_content(dev.path(), &data, "loop device receiver");
}

#[test]
fn destination_is_zero_reads_nothing_from_a_thin_receiver_and_writes_no_zeros() {
    let t = tmp();
    let size = 64 * MIB as u64;
    let chunks: Vec<(u64, Vec<u8>)> = (0..4u64).map(|k| (k * 16 * MIB as u64, random_data(20 + k, 4 * MIB))).collect();
    let src = t.path().join("src.img");
    sparse_file(&src, size, &chunks);
    let expected = read(&src);
    for mode in ["copy", "sync"] {
        let img = t.path().join(format!("thin-{mode}.img"));
        sparse_file(&img, size, &[]);
        let Some(dev) = loop_dev(&img) else { return };
        flushbufs(dev.path());
        let (read_before, written_before) = (loop_stat(&dev, 2), loop_stat(&dev, 6));
        let r = run(Dir::Push, mode, &src, dev.path(), &["--no-state", "--destination-is-zero"]);
        r.ok();
        let (read, written) = (loop_stat(&dev, 2) - read_before, (loop_stat(&dev, 6) - written_before) * 512);
        assert_eq!(read, 0, "{mode}: {read} sectors read from a receiver declared zero{r:?}");
        assert!(written <= 16 * MIB as u64 + MIB as u64, "{mode}: {written} bytes written for 16 MiB of data{r:?}");
        flushbufs(dev.path());
        assert_content(dev.path(), &expected, mode);
        drop(dev);
        let alloc = allocated(&img);
        assert!(alloc <= 17 * MIB as u64, "{mode}: the thin receiver's file grew to {alloc} bytes{r:?}");
    }
}

/// Runs basyn under `/usr/bin/time -f %M` and returns it with its peak RSS in KiB.
fn with_peak_rss(args: &[String]) -> Option<(Run, u64)> {
    with_peak_rss_env(args, &[])
}

/// [`with_peak_rss`] with extra environment variables.
fn with_peak_rss_env(args: &[String], env: &[(&str, &str)]) -> Option<(Run, u64)> {
    if !require_tool("/usr/bin/time") {
        return None;
    }
    let t = tmp();
    let out = t.path().join("rss");
    let mut all = vec!["-f".to_string(), "%M".into(), "-o".into(), s(&out).into(), env!("CARGO_BIN_EXE_basyn").into()];
    all.extend_from_slice(args);
    let mut cmd = std::process::Command::new("/usr/bin/time");
    cmd.args(&all).env_remove("CI").env("BASYN_STATE_DIR", state_dir());
    cmd.envs(env.iter().copied()).stdin(std::process::Stdio::null());
    let r = spawn(cmd, args).finish();
    let text = fs::read_to_string(&out).unwrap_or_default();
    let kib = text.lines().last().and_then(|l| l.trim().parse().ok()).unwrap_or(u64::MAX);
    Some((r, kib))
}

/// A 1 TiB sparse image pair holding 1 GiB of scattered data: `basyn index`, a SYNC, a
/// changed re-SYNC and an unchanged re-SYNC each finish within 256 MiB of peak RSS, and
/// the pair ends identical.
#[test]
fn a_1_tib_sparse_pair_syncs_in_bounded_memory() {
    let t = tmp();
    let (src, dst) = (t.path().join("src.img"), t.path().join("dst.img"));
    let size = 1u64 << 40;
    // 1 GiB of data in 1024 runs of 1 MiB at scattered offsets (64 MiB of random bytes
    // reused), and a few single pages.
    let pool = random_data(61, 64 * MIB);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut chunks: Vec<(u64, Vec<u8>)> = Vec::new();
    for k in 0..1024usize {
        let at = next() % (size / MIB as u64 - 1) * MIB as u64;
        let from = (k % 64) * MIB;
        chunks.push((at, pool[from..from + MIB].to_vec()));
    }
    sparse_file(&src, size, &chunks);
    sparse_file(&dst, size, &[]);
    let limit_kib = 256 * 1024;
    let sync = sv(&["-l", s(&src), "-r", s(&dst), "-a", "push", "-m", "sync", "--stat"]);
    let Some((r, kib)) = with_peak_rss(&sv(&["index", s(&src), "--stat"])) else { return };
    r.ok();
    assert!(kib < limit_kib, "index: {kib} KiB peak RSS{r:?}");
    let Some((r, kib)) = with_peak_rss(&sync) else { return };
    r.ok();
    assert!(kib < limit_kib, "first SYNC: {kib} KiB peak RSS{r:?}");
    // Changed: 64 pages somewhere in the data, and one run in a hole.
    for (k, (at, _)) in chunks.iter().take(64).enumerate() {
        poke(&src, at + (k as u64 * 4096 % MIB as u64), &random_data(k as u64, 4096));
    }
    poke(&src, size / 3, &random_data(99, MIB));
    let Some((r, kib)) = with_peak_rss(&sync) else { return };
    r.ok();
    assert!(kib < limit_kib, "changed SYNC: {kib} KiB peak RSS{r:?}");
    let Some((r, kib)) = with_peak_rss(&sync) else { return };
    r.ok();
    assert!(kib < limit_kib, "unchanged SYNC: {kib} KiB peak RSS{r:?}");
    assert!(r.stat().read_nothing(), "an unchanged re-SYNC with fresh states read{r:?}");
    // The pair is identical: compared by reading both (holes are not read).
    basyn(&sv(&["-l", s(&src), "-r", s(&dst), "--recheck", "--no-state"])).ok();
    for (at, bytes) in chunks.iter().take(8) {
        let mut got = vec![0u8; bytes.len()];
        fs::File::open(&dst).unwrap().read_exact_at(&mut got, *at).unwrap();
        let mut want = vec![0u8; bytes.len()];
        fs::File::open(&src).unwrap().read_exact_at(&mut want, *at).unwrap();
        assert!(got == want, "the receiver differs at {at}");
    }
}

/// A state larger than the memory budget is not held whole in memory: piece digests past
/// it wait in an unnamed spill file while they are learned, and stay in the state file
/// when it is loaded. A dense 1 GiB image with 1 KiB pieces has 32 MiB of piece digests;
/// with the budget lowered to 1 MiB (as 32 MiB is for a dense TiB of 16 KiB pieces),
/// `basyn index` of each side, a changed SYNC (the source re-read, the receiver's state
/// loaded) and an unchanged one (both loaded) each peak below the size of the state file
/// itself (held whole, they take 40 to 72 MiB), and the pair ends identical.
#[test]
fn a_state_larger_than_the_memory_budget_is_streamed_not_held() {
    let t = tmp();
    let (src, dst) = (t.path().join("src.img"), t.path().join("dst.img"));
    // Made and compared by the system's tools: this test is about basyn's memory.
    let sh = |script: &str| {
        let ok = std::process::Command::new("sh").arg("-c").arg(script).status().is_ok_and(|s| s.success());
        assert!(ok, "{script} failed");
    };
    sh(&format!("head -c 1G /dev/urandom > {0} && cp {0} {1}", s(&src), s(&dst)));
    let env = [("BASYN_TEST_PIECE_BUDGET", "1048576")];
    let chunk = sv(&["--chunk", "1", "--stat"]);
    let with = |mut args: Vec<String>| {
        args.extend(chunk.iter().cloned());
        args
    };
    let sync = with(sv(&["-l", s(&src), "-r", s(&dst), "-a", "push", "-m", "sync"]));
    let mut state_kib = 0;
    for device in [&src, &dst] {
        let Some((r, kib)) = with_peak_rss_env(&with(sv(&["index", s(device)])), &env) else { return };
        r.ok();
        let state = state_of(device);
        state_kib = fs::metadata(&state).map(|m| m.len() / 1024).unwrap_or(0);
        assert!(state_kib > 32 * 1024, "the state is {state_kib} KiB, expected over 32 MiB{r:?}");
        assert!(kib < state_kib, "index: {kib} KiB peak RSS for a state of {state_kib} KiB{r:?}");
    }
    poke(&src, 300 * MIB as u64 + 5, b"changed");
    for what in ["changed SYNC", "unchanged SYNC"] {
        let Some((r, kib)) = with_peak_rss_env(&sync, &env) else { return };
        r.ok();
        assert!(kib < state_kib, "{what}: {kib} KiB peak RSS for a state of {state_kib} KiB{r:?}");
        let f = r.stat();
        let expected = if what == "changed SYNC" { 1024 } else { 0 };
        assert_eq!(f.written, expected, "{what}: only the changed 1 KiB piece is written{r:?}");
        assert_eq!(f.remote_read, 0, "{what}: the receiver was read{r:?}");
    }
    sh(&format!("cmp {} {}", s(&src), s(&dst)));
}
