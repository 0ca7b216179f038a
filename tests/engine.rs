//! The engine as a whole, on real files: a pass over a device larger than a quarter of
//! memory leaves no page cache behind while a small one stays cached, and `--adapt`
//! moves the zstd level (and says so) while without it the level is kept.

mod util;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use util::*;

/// Bytes of `path` in the page cache (`fincore`).
fn cached(path: &Path) -> u64 {
    let out = tool("fincore", &["--bytes", "--noheadings", "--output", "RES", s(path)])
        .unwrap_or_else(|e| panic!("fincore: {e}"));
    out.trim().parse().unwrap_or_else(|e| panic!("fincore said {out:?}: {e}"))
}

/// Drops `path` from the page cache (after making it durable).
fn uncache(path: &Path) {
    let f = OpenOptions::new().read(true).write(true).open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: an advisory call on a valid descriptor.
    unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// `MemTotal` in bytes.
fn memory() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kb = text.lines().find_map(|l| l.strip_prefix("MemTotal:")).unwrap().trim().trim_end_matches("kB").trim();
    kb.parse::<u64>().unwrap() * 1024
}

#[test]
fn a_pass_over_a_device_larger_than_a_quarter_of_memory_leaves_its_pages_out_of_the_cache() {
    if !require_tool("fincore") {
        return;
    }
    let dir = tmp();
    // Large: a sparse file of a third of memory with 64 MiB of data at its start (only
    // the data is read; holes are not). Small: 64 MiB of the same data.
    let (large, small) = (dir.path().join("large.img"), dir.path().join("small.img"));
    let data = random_data(7, 64 << 20);
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&large).unwrap();
    f.set_len(memory() / 3).unwrap();
    f.write_all_at(&data, 0).unwrap();
    drop(f);
    write(&small, &data);
    for p in [&large, &small] {
        uncache(p);
        assert!(cached(p) < 8 << 20, "{} is still cached before the run", p.display());
        let state = dir.path().join(format!("{}.state", p.file_name().unwrap().to_string_lossy()));
        basyn(&["index", s(p), "--state", s(&state), "--stat"]).ok();
    }
    let (large_cached, small_cached) = (cached(&large), cached(&small));
    assert!(large_cached < 8 << 20, "{large_cached} bytes of the large device's 64 MiB of data stayed cached");
    assert!(small_cached > 56 << 20, "only {small_cached} bytes of the small device stayed cached");
}

#[test]
fn an_adapting_zstd_level_says_where_it_ended_and_without_adapt_the_level_is_kept() {
    let dir = tmp();
    let (src, dst) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    let mut data = compressible_data(48 << 20);
    data.extend(random_data(3, 16 << 20));
    write(&src, &data);
    let adapting = basyn(&[
        "-l",
        s(&src),
        "-r",
        s(&dst),
        "-a",
        "PUSH",
        "-m",
        "COPY",
        "--compress",
        "zstd",
        "--adapt",
        "--verbose",
    ]);
    adapting.ok();
    assert_eq!(read(&dst), data);
    let line = adapting.stdout.lines().find(|l| l.contains("compression: zstd level")).unwrap_or_else(|| {
        panic!("no line says where the adapting level ended{adapting:?}");
    });
    assert!(line.contains("(kept)") || line.contains("adapted between"), "{line}");
    std::fs::remove_file(&dst).unwrap();
    let fixed = basyn(&["-l", s(&src), "-r", s(&dst), "-a", "PUSH", "-m", "COPY", "--zlevel", "3", "--verbose"]);
    fixed.ok();
    assert_eq!(read(&dst), data);
    assert!(fixed.stdout.contains("compression zstd level 3"), "{fixed:?}");
    assert!(!fixed.stdout.contains("compression: zstd level"), "a chosen level adapted{fixed:?}");
}
