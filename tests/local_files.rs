//! Integration tests on image files: the real `basyn` binary, local transport (the remote
//! side is a `basyn serve` child over pipes), real files in temp directories.

mod util;

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use util::*;

const DIRS: [Dir; 2] = [Dir::Push, Dir::Pull];
const MODES: [&str; 2] = ["copy", "sync"];
const HASHES: [&str; 9] = ["BLAKE3", "SHA1", "SHA224", "SHA256", "SHA384", "SHA512", "BLAKE2B", "BLAKE2S", "MD5"];

/// The side word ("local"/"remote") of the receiver and of the source in `dir`.
fn sides(dir: Dir) -> (&'static str, &'static str) {
    match dir {
        Dir::Push => ("remote", "local"),
        Dir::Pull => ("local", "remote"),
    }
}

/// A copy of `data` with a few scattered spots changed: the first and last byte, a
/// run in the middle and a run across a 4 KiB boundary.
fn mutated(data: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    let n = v.len();
    let mut spot = |at: usize, len: usize| {
        for b in v.iter_mut().skip(at).take(len) {
            *b = !*b;
        }
    };
    spot(0, 1);
    spot(n / 2, 3);
    if n > 8192 {
        spot(4096 - 2, 5);
    }
    spot(n - 1, 1);
    v
}

/// Runs one action from a source holding `source` onto a receiver holding `receiver`
/// (or missing), asserts exit 0, byte-identical devices and an unchanged source, then
/// asserts that `--recheck` with the same options exits 0. Returns the action's run.
#[track_caller]
fn check_action(dir: Dir, mode: &str, source: &[u8], receiver: Option<&[u8]>, extra: &[&str]) -> Run {
    let t = tmp();
    let src = t.path().join("source.img");
    let rcv = t.path().join("receiver.img");
    write(&src, source);
    if let Some(r) = receiver {
        write(&rcv, r);
    }
    let run = basyn(&action(dir, mode, &src, &rcv, extra));
    run.ok();
    assert_content(&rcv, source, &format!("receiver after {run:?}"));
    assert_content(&src, source, "source after the action");
    let mut again = ends(dir, &src, &rcv);
    again.push("--recheck".into());
    again.extend(extra.iter().filter(|x| **x != "--recheck").map(|x| x.to_string()));
    basyn(&again).ok();
    run
}

/// [`check_action`] for every direction and mode, with a receiver that differs: a
/// mutated copy for SYNC, unrelated data for COPY.
#[track_caller]
fn check_all_actions(size: usize, seed: u64, extra: &[&str]) {
    let source = random_data(seed, size);
    let other = random_data(seed ^ 0xffff, size);
    let near = mutated(&source);
    for dir in DIRS {
        for mode in MODES {
            let receiver = if mode == "sync" { &near } else { &other };
            check_action(dir, mode, &source, Some(receiver), extra);
        }
    }
}

// ===========================================================================
// 1. Command line
// ===========================================================================

#[test]
fn help_exits_zero_and_documents_the_options() {
    let run = basyn(&["--help"]);
    run.ok();
    assert!(run.stderr.is_empty(), "--help wrote to stderr{run:?}");
    for needle in ["--local", "--remote", "--host", "--action", "--mode", "--recheck", "--hash", "--buffer", "--chunk"]
    {
        assert!(run.stdout.contains(needle), "--help does not mention {needle}{run:?}");
    }
    assert!(!run.stdout.contains("-h, --help"), "-h must be the host, not help{run:?}");
}

#[test]
fn dash_h_is_the_host_not_help() {
    // `-h` without a value: the host's value is missing; no help is printed.
    basyn(&["-h"]).usage_error(&["--host"]);
    // `-h HOST` satisfies --port/--user, so the first complaint is the missing --local.
    let run = basyn(&["-r", "/nonexistent/remote.img", "-h", "backup.example.invalid", "-p", "2222", "-u", "bob"]);
    let line = run.usage_error(&["--local"]);
    assert!(!line.contains("needs --host"), "-h was not taken as the host{run:?}");
    let run = basyn(&["-h", "backup.example.invalid"]);
    run.usage_error(&["--local"]);
}

#[test]
fn unknown_options_are_usage_errors() {
    basyn(&["-l", "a", "-r", "b", "--bogus"]).usage_error(&["--bogus"]);
    basyn(&["-l", "a", "-r", "b", "--bogus=1"]).usage_error(&["--bogus"]);
    basyn(&["-l", "a", "-r", "b", "-x"]).usage_error(&["-x"]);
    basyn(&["-l", "a", "-r", "b", "stray"]).usage_error(&["stray"]);
}

#[test]
fn bad_option_values_are_usage_errors() {
    basyn(&["-l", "a", "-r", "b", "--hash=CRC32"]).usage_error(&["CRC32"]);
    basyn(&["-l", "a", "-r", "b", "--hash", "sha3"]).usage_error(&["sha3"]);
    basyn(&["-l", "a", "-r", "b", "-a", "SEND", "-m", "SYNC"]).usage_error(&["SEND"]);
    basyn(&["-l", "a", "-r", "b", "-a", "PUSH", "-m", "MIRROR"]).usage_error(&["MIRROR"]);
    basyn(&["-l", "a", "-r", "b", "--compress", "lz4"]).usage_error(&["lz4"]);
    basyn(&["-l", "a", "-r", "b", "--buffer", "abc"]).usage_error(&["abc"]);
    basyn(&["-l", "a", "-r", "b", "--zlevel", "-1"]).usage_error(&["-1"]);
    basyn(&["-l", "a", "-r", "b", "--compress", "zlib", "--zlevel", "10"]).usage_error(&["--zlevel", "10"]);
    basyn(&["-l", "a", "-r", "b", "--zlevel", "20"]).usage_error(&["--zlevel", "20"]);
}

#[test]
fn action_and_mode_need_each_other() {
    for a in ["-a", "--action"] {
        basyn(&["-l", "a", "-r", "b", a, "PUSH"]).usage_error(&["--action", "--mode"]);
    }
    for m in ["-m", "--mode"] {
        basyn(&["-l", "a", "-r", "b", m, "SYNC"]).usage_error(&["--mode", "--action"]);
    }
}

#[test]
fn local_and_remote_are_mandatory() {
    basyn(&["-r", "b"]).usage_error(&["--local"]);
    basyn(&["--remote=b", "-a", "push", "-m", "copy"]).usage_error(&["--local"]);
    basyn(&["-l", "a"]).usage_error(&["--remote"]);
    basyn(&["--local", "a", "--recheck"]).usage_error(&["--remote"]);
    basyn::<&str>(&[]).usage_error(&["--local"]);
}

#[test]
fn buffer_and_chunk_limits() {
    basyn(&["-l", "a", "-r", "b", "--buffer", "0"]).usage_error(&["--buffer", "0"]);
    basyn(&["-l", "a", "-r", "b", "--buffer=65537"]).usage_error(&["--buffer", "65537"]);
    basyn(&["-l", "a", "-r", "b", "--chunk", "0"]).usage_error(&["--chunk"]);
    basyn(&["-l", "a", "-r", "b", "--buffer", "64", "--chunk", "128"]).usage_error(&["--chunk", "128", "64"]);
    // The default buffer is 2048 KB.
    basyn(&["-l", "a", "-r", "b", "--chunk=4096"]).usage_error(&["--chunk", "4096", "2048"]);
}

#[test]
fn port_and_user_need_a_host() {
    basyn(&["-l", "a", "-r", "b", "--port", "2222"]).usage_error(&["--port", "--host"]);
    basyn(&["-l", "a", "-r", "b", "-p", "2222"]).usage_error(&["--port", "--host"]);
    basyn(&["-l", "a", "-r", "b", "--user", "bob"]).usage_error(&["--user", "--host"]);
    basyn(&["-l", "a", "-r", "b", "-u", "bob"]).usage_error(&["--user", "--host"]);
}

#[test]
fn usage_errors_touch_no_device() {
    let t = tmp();
    let src = t.path().join("src.img");
    let rcv = t.path().join("rcv.img");
    let missing = t.path().join("missing.img");
    random_image(&src, 1, 300 * KIB);
    let before = random_image(&rcv, 2, 300 * KIB);
    let bad: [&[&str]; 5] = [
        &["--bogus"],
        &["--hash", "crc"],
        &["--buffer", "64", "--chunk", "128"],
        &["--buffer", "0"],
        &["--port", "22"],
    ];
    for extra in bad {
        for dir in DIRS {
            for mode in MODES {
                basyn(&action(dir, mode, &src, &rcv, extra)).usage_error(&[]);
                assert_content(&rcv, &before, &format!("receiver after a usage error ({extra:?})"));
                basyn(&action(dir, mode, &src, &missing, extra)).usage_error(&[]);
                assert!(!missing.exists(), "a usage error created the receiver ({extra:?})");
            }
        }
    }
}

#[test]
fn short_and_long_forms_are_equivalent() {
    let source = random_data(10, 700 * KIB + 3);
    for dir in DIRS {
        let forms: [&[&str]; 3] = [
            &["-l", "{L}", "-r", "{R}", "-a", "{A}", "-m", "copy"],
            &["--local={L}", "--remote={R}", "--action={A}", "--mode=copy"],
            &["--local", "{L}", "--remote", "{R}", "--action", "{A}", "--mode", "sync"],
        ];
        for form in forms {
            let t = tmp();
            let src = t.path().join("src.img");
            let rcv = t.path().join("rcv.img");
            write(&src, &source);
            random_image(&rcv, 11, source.len());
            let (l, r) = if dir == Dir::Push { (&src, &rcv) } else { (&rcv, &src) };
            let a: Vec<String> =
                form.iter().map(|x| x.replace("{L}", s(l)).replace("{R}", s(r)).replace("{A}", dir.word())).collect();
            basyn(&a).ok().silent();
            assert_content(&rcv, &source, &format!("receiver after basyn {a:?}"));
        }
    }
}

#[test]
fn every_option_in_long_form_together() {
    let source = random_data(20, MIB + 4321);
    for dir in DIRS {
        let extra = [
            "--recheck",
            "--stat",
            "--verbose",
            "--progress",
            "--debug",
            "--hash=SHA256",
            "--buffer=64",
            "--chunk=16",
            "--zlevel=3",
            "--compress=zstd",
            "--force",
        ];
        let run = check_action(dir, "sync", &source, Some(&mutated(&source)), &extra);
        assert_eq!(run.stat().device_size, source.len() as u64, "{run:?}");
        assert!(run.stderr.lines().any(|l| l.starts_with("debug:")), "no debug lines{run:?}");
        assert!(run.stderr.contains("flushing  100.0%"), "no progress line{run:?}");
        assert!(run.stderr.contains("verifying 100.0%"), "no recheck progress line{run:?}");
        // Space-separated values work as well.
        let extra =
            ["--hash", "sha512", "--buffer", "32", "--chunk", "8", "--zlevel", "2", "--compress", "zlib", "--force"];
        check_action(dir, "copy", &source, Some(&random_data(21, source.len())), &extra);
    }
}

#[test]
fn option_values_are_case_insensitive() {
    let source = random_data(30, 200 * KIB + 1);
    let actions = [("push", Dir::Push), ("PUSH", Dir::Push), ("Push", Dir::Push)].into_iter().chain([
        ("pull", Dir::Pull),
        ("PULL", Dir::Pull),
        ("Pull", Dir::Pull),
    ]);
    let modes = ["sync", "SYNC", "Sync", "copy", "COPY", "Copy"];
    for (i, (a, dir)) in actions.enumerate() {
        let m = modes[i % modes.len()];
        let t = tmp();
        let src = t.path().join("src.img");
        let rcv = t.path().join("rcv.img");
        write(&src, &source);
        write(&rcv, &mutated(&source));
        let mut list = ends(dir, &src, &rcv);
        list.extend(sv(&["-a", a, "-m", m]));
        list.extend(sv(&["--hash", ["sha256", "SHA256", "Sha256"][i % 3]]));
        list.extend(sv(&["--compress", ["zlib", "ZLIB", "Zlib"][i % 3]]));
        basyn(&list).ok().silent();
        assert_content(&rcv, &source, &format!("receiver after basyn {list:?}"));
    }
    // Every mode spelling with both actions.
    for m in modes {
        for dir in DIRS {
            let up = dir.word().to_uppercase();
            let t = tmp();
            let src = t.path().join("src.img");
            let rcv = t.path().join("rcv.img");
            write(&src, &source);
            write(&rcv, &mutated(&source));
            let mut list = ends(dir, &src, &rcv);
            list.extend(sv(&["--action", &up, "--mode", m, "--hash", "blake2b"]));
            basyn(&list).ok();
            assert_content(&rcv, &source, &format!("receiver after basyn {list:?}"));
        }
    }
}

// ===========================================================================
// 2. Without an action
// ===========================================================================

#[test]
fn no_action_with_both_devices_exits_0_and_changes_nothing() {
    let t = tmp();
    let a = t.path().join("a.img");
    let b = t.path().join("b.img");
    let da = random_image(&a, 40, 100 * KIB);
    let db = random_image(&b, 41, 50 * KIB);
    basyn(&["-l", s(&a), "-r", s(&b)]).ok().silent();
    assert_content(&a, &da, "local");
    assert_content(&b, &db, "remote");
    let run = basyn(&["--local", s(&a), "--remote", s(&b), "--verbose"]);
    run.ok();
    assert!(run.stdout.contains(s(&a)) && run.stdout.contains(s(&b)), "verbose names both devices{run:?}");
    assert_content(&a, &da, "local");
    assert_content(&b, &db, "remote");
}

#[test]
fn no_action_with_a_missing_device_names_it_and_its_side() {
    let t = tmp();
    let a = t.path().join("a.img");
    let missing = t.path().join("missing.img");
    random_image(&a, 42, 10 * KIB);
    basyn(&["-l", s(&missing), "-r", s(&a)]).fails(1, &[&format!("local {}: no such file or device", s(&missing))]);
    basyn(&["-l", s(&a), "-r", s(&missing)]).fails(1, &[&format!("remote {}: no such file or device", s(&missing))]);
    assert!(!missing.exists(), "a check created the missing device");
    // A directory is not a device.
    basyn(&["-l", s(t.path()), "-r", s(&a)]).fails(1, &[&format!("local {}:", s(t.path())), "directory"]);
    basyn(&["-l", s(&a), "-r", s(t.path())]).fails(1, &[&format!("remote {}:", s(t.path())), "directory"]);
}

#[test]
fn recheck_alone_compares_without_changing_anything() {
    let t = tmp();
    let a = t.path().join("a.img");
    let b = t.path().join("b.img");
    let c = t.path().join("c.img");
    let data = random_image(&a, 50, 3 * MIB + 99);
    write(&b, &data);
    basyn(&["-l", s(&a), "-r", s(&b), "--recheck"]).ok().silent();
    basyn(&["-l", s(&a), "-r", s(&b), "--recheck", "--buffer", "4", "--hash", "md5"]).ok();

    // One byte differs: exit 3, nothing changed on either side.
    let changed = {
        let mut v = data.clone();
        v[2 * MIB + 5] ^= 1;
        v
    };
    write(&b, &changed);
    for extra in [&[][..], &["--chunk", "4"][..], &["--hash", "sha1", "--buffer", "1"][..]] {
        let mut list = sv(&["-l", s(&a), "-r", s(&b), "--recheck"]);
        list.extend(sv(extra));
        basyn(&list).fails(3, &[s(&a), s(&b)]);
        assert_content(&a, &data, "local after a failed recheck");
        assert_content(&b, &changed, "remote after a failed recheck");
    }

    // Differing sizes: exit 3, both sizes named.
    write(&c, &data[..MIB]);
    basyn(&["-l", s(&a), "-r", s(&c), "--recheck"]).fails(3, &[&data.len().to_string(), &MIB.to_string()]);
    basyn(&["-l", s(&c), "-r", s(&a), "--recheck"]).code(3);
    assert_content(&c, &data[..MIB], "remote after a size recheck");

    // A missing device is a precondition error, not a difference.
    let missing = t.path().join("missing.img");
    basyn(&["-l", s(&a), "-r", s(&missing), "--recheck"]).fails(1, &["remote", s(&missing)]);
    basyn(&["-l", s(&missing), "-r", s(&a), "--recheck"]).fails(1, &["local", s(&missing)]);
}

// ===========================================================================
// 3. PUSH and PULL x COPY and SYNC
// ===========================================================================

#[test]
fn actions_with_default_options() {
    let source = random_data(60, 3 * MIB + 777);
    let other = random_data(61, source.len());
    for dir in DIRS {
        for mode in MODES {
            let receiver = if mode == "sync" { mutated(&source) } else { other.clone() };
            check_action(dir, mode, &source, Some(&receiver), &[]).silent();
        }
    }
}

#[test]
fn actions_on_an_odd_size() {
    check_all_actions(5 * MIB + 12345, 62, &[]);
}

#[test]
fn actions_with_chunk_4() {
    check_all_actions(5 * MIB + 12345, 63, &["--chunk", "4"]);
}

#[test]
fn actions_with_chunk_64() {
    check_all_actions(5 * MIB + 12345, 64, &["--chunk=64"]);
}

#[test]
fn actions_with_a_tiny_buffer() {
    check_all_actions(5 * MIB + 12345, 65, &["--buffer", "4"]);
    check_all_actions(300 * KIB + 1, 66, &["--buffer", "4", "--chunk", "1"]);
    check_all_actions(300 * KIB + 1, 67, &["--buffer", "10", "--chunk", "3"]);
}

#[test]
fn actions_with_every_hash() {
    for hash in HASHES {
        check_all_actions(MIB + 12345, 70, &["--hash", hash, "--buffer", "256"]);
        check_all_actions(300 * KIB + 7, 71, &[&format!("--hash={hash}"), "--buffer", "64", "--chunk", "4"]);
    }
}

#[test]
fn sync_detects_a_single_changed_byte_with_every_hash() {
    let source = random_data(72, MIB);
    for hash in HASHES {
        for dir in DIRS {
            let mut near = source.clone();
            near[777_777] ^= 0x80;
            check_action(dir, "sync", &source, Some(&near), &["--hash", hash]);
        }
    }
}

/// Half text, half random: compressible enough that the codec path really compresses.
fn mixed_data(len: usize, seed: u64) -> Vec<u8> {
    let mut v = compressible_data(len);
    let rnd = random_data(seed, len);
    for (i, b) in v.iter_mut().enumerate() {
        if (i / (64 * KIB)) % 2 == 1 {
            *b = rnd[i];
        }
    }
    v
}

#[test]
fn actions_with_compression_variants() {
    let variants: [&[&str]; 7] = [
        &["--zlevel", "0"],
        &["--zlevel", "5"],
        &["--compress", "zlib", "--zlevel", "9"],
        &["--compress", "none"],
        &["--compress", "zstd"],
        &["--compress", "zlib"],
        &["--compress=zstd", "--zlevel=19"],
    ];
    let source = mixed_data(2 * MIB + 555, 80);
    let other = random_data(81, source.len());
    let mut near = source.clone();
    for at in [10, 700_000, 2 * MIB] {
        near[at] ^= 0xff;
    }
    for extra in variants {
        for dir in DIRS {
            for mode in MODES {
                let receiver = if mode == "sync" { &near } else { &other };
                check_action(dir, mode, &source, Some(receiver), extra);
                let mut with_chunk = extra.to_vec();
                with_chunk.extend(["--chunk", "4"]);
                check_action(dir, mode, &source, Some(receiver), &with_chunk);
            }
        }
    }
}

#[test]
fn compression_reduces_traffic_only_when_enabled() {
    let size = 4 * MIB;
    let source = compressible_data(size);
    let other = random_data(82, size);
    for dir in DIRS {
        let push = dir == Dir::Push;
        // (options, compressed?)
        let cases: [(&[&str], bool); 6] = [
            (&[], false), // locally nothing is compressed unless asked
            (&["--zlevel", "0"], false),
            (&["--compress", "none"], false),
            (&["--zlevel", "5"], true),
            (&["--compress", "zlib", "--zlevel", "9"], true),
            (&["--compress", "zstd"], true),
        ];
        for (opts, compressed) in cases {
            let mut extra = opts.to_vec();
            extra.push("--stat");
            let run = check_action(dir, "copy", &source, Some(&other), &extra);
            let st = run.stat();
            let data = st.data_direction(push);
            if compressed {
                assert!(data < size as u64 / 4, "{opts:?}: {data} bytes for {size} compressible bytes{run:?}");
            } else {
                assert!(data >= size as u64, "{opts:?}: only {data} bytes without compression{run:?}");
                assert!(data < size as u64 + 64 * KIB as u64, "{opts:?}: {data} bytes is too much overhead{run:?}");
            }
        }
    }
}

#[test]
fn recheck_after_an_action_exits_0() {
    let source = random_data(90, 2 * MIB + 3);
    for dir in DIRS {
        for mode in MODES {
            let t = tmp();
            let src = t.path().join("src.img");
            let rcv = t.path().join("rcv.img");
            write(&src, &source);
            write(&rcv, &mutated(&source));
            let run = basyn(&action(dir, mode, &src, &rcv, &["--recheck", "--stat"]));
            run.ok();
            assert_content(&rcv, &source, "receiver");
            // The recheck reads the whole device: its traffic adds digests on top of the action.
            assert_eq!(run.stat().device_size, source.len() as u64, "{run:?}");
        }
    }
}

#[test]
fn missing_file_receiver_is_created_with_the_source_size_and_content() {
    let source = random_data(95, 3 * MIB + 17);
    for dir in DIRS {
        for mode in MODES {
            check_action(dir, mode, &source, None, &[]);
            check_action(dir, mode, &source, None, &["--chunk", "4", "--buffer", "64"]);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    /// Any size, buffer, chunk, direction, mode and set of changes ends identical.
    #[test]
    fn any_action_ends_with_identical_devices(
        size in 1usize..400_000,
        buffer_kb in 1u64..=32,
        chunk_kb in proptest::option::of(1u64..=32),
        push in any::<bool>(),
        copy in any::<bool>(),
        spots in proptest::collection::vec((0.0f64..1.0, 1usize..3000), 0..6),
        seed in any::<u64>(),
    ) {
        let source = random_data(seed, size);
        let mut receiver = source.clone();
        for (at, len) in spots {
            let start = ((size as f64 * at) as usize).min(size - 1);
            for b in receiver.iter_mut().skip(start).take(len) {
                *b = b.wrapping_add(1);
            }
        }
        let t = tmp();
        let src = t.path().join("src.img");
        let rcv = t.path().join("rcv.img");
        write(&src, &source);
        write(&rcv, &receiver);
        let dir = if push { Dir::Push } else { Dir::Pull };
        let mode = if copy { "copy" } else { "sync" };
        let buffer = buffer_kb.to_string();
        let mut extra = vec!["--buffer".to_string(), buffer];
        if let Some(c) = chunk_kb {
            extra.extend(["--chunk".to_string(), c.min(buffer_kb).to_string()]);
        }
        let extra: Vec<&str> = extra.iter().map(|x| x.as_str()).collect();
        let run = basyn(&action(dir, mode, &src, &rcv, &extra));
        prop_assert_eq!(run.code, 0, "{:?}", run);
        let got = read(&rcv);
        prop_assert!(first_difference(&got, &source).is_none(), "receiver differs at {:?}{:?}",
            first_difference(&got, &source), run);
    }
}

// ===========================================================================
// 4. SYNC efficiency and --stat
// ===========================================================================

const EFF_SIZE: usize = 32 * MIB;
/// Three 4-byte changes in three different 2 MiB buffers.
const EFF_SPOTS: [usize; 3] = [1000, 9_000_000, 30_000_000];

/// Syncs a 32 MiB image whose source changed in [`EFF_SPOTS`] (or not at all) and
/// returns the parsed `--stat`.
fn sync_after_changes(dir: Dir, change: bool, extra: &[&str]) -> Stat {
    let t = tmp();
    let src = t.path().join("src.img");
    let rcv = t.path().join("rcv.img");
    let old = random_image(&rcv, 100, EFF_SIZE);
    let mut new = old.clone();
    if change {
        for at in EFF_SPOTS {
            new[at..at + 4].copy_from_slice(b"ABCD");
        }
    }
    write(&src, &new);
    let mut all = extra.to_vec();
    all.push("--stat");
    let run = basyn(&action(dir, "sync", &src, &rcv, &all));
    run.ok();
    assert_content(&rcv, &new, "receiver after the sync");
    let st = run.stat();
    assert_eq!(st.device_size, EFF_SIZE as u64, "{run:?}");
    assert_eq!(st.both, st.rx + st.tx, "{run:?}");
    st
}

#[test]
fn sync_without_chunk_sends_only_the_differing_buffers() {
    let buffer = 2 * MIB as u64;
    for dir in DIRS {
        let st = sync_after_changes(dir, true, &[]);
        let data = st.data_direction(dir == Dir::Push);
        assert!(data <= 3 * buffer + 64 * KIB as u64, "{dir:?}: {data} bytes for 3 changed buffers: {st:?}");
        assert!(st.both < EFF_SIZE as u64 / 4, "{dir:?}: {st:?}");
    }
}

#[test]
fn sync_with_chunk_4_sends_only_the_differing_chunks() {
    for dir in DIRS {
        let st = sync_after_changes(dir, true, &["--chunk", "4"]);
        let data = st.data_direction(dir == Dir::Push);
        assert!(data < 100 * KIB as u64, "{dir:?}: {data} bytes for three 4-byte changes: {st:?}");
        assert!(st.both < 200 * KIB as u64, "{dir:?}: {st:?}");
        assert!(st.ratio < 1.0, "{dir:?}: {st:?}");
    }
}

#[test]
fn unchanged_resync_sends_almost_nothing() {
    for dir in DIRS {
        for extra in [&[][..], &["--chunk", "4"][..]] {
            let st = sync_after_changes(dir, false, extra);
            assert!(st.both < 64 * KIB as u64, "{dir:?} {extra:?}: {st:?}");
        }
    }
}

#[test]
fn stat_lines_are_complete_and_consistent() {
    let t = tmp();
    let src = t.path().join("src.img");
    let rcv = t.path().join("rcv.img");
    let size = 8 * MIB + 5;
    random_image(&src, 110, size);
    for dir in DIRS {
        random_image(&rcv, 111, size);
        let run = basyn(&action(dir, "copy", &src, &rcv, &["--stat"]));
        run.ok();
        assert!(run.stderr.is_empty(), "{run:?}");
        let st = run.stat();
        assert_eq!(st.device_size, size as u64, "{run:?}");
        assert_eq!(st.both, st.rx + st.tx, "{run:?}");
        let data = st.data_direction(dir == Dir::Push);
        assert!(data >= size as u64, "COPY without compression moves every byte{run:?}");
        let expected_ratio = st.both as f64 * 100.0 / size as f64;
        assert!((st.ratio - expected_ratio).abs() < 0.01, "ratio {} vs {expected_ratio}{run:?}", st.ratio);
        assert!(st.time > 0.0 && st.time < 60.0, "{run:?}");
        // A local run has no network rate; a COPY sent everything, so it has an effective one.
        assert_eq!(st.real, None, "{run:?}");
        assert!(st.effective.as_deref().is_some_and(|e| e.ends_with("/s")), "{run:?}");
        assert!(run.stdout.contains("Traffic:     no network (local run); pipe Rx"), "{run:?}");
    }
    // A recheck alone also reports the device size; it sent nothing, so it has no
    // effective rate.
    let run = basyn(&["-l", s(&src), "-r", s(&rcv), "--recheck", "--stat"]);
    run.ok();
    assert_eq!(run.stat().device_size, size as u64, "{run:?}");
    assert_eq!(run.stat().effective, None, "{run:?}");
    assert!(run.stdout.contains("Bandwidth:   none: a local run that sent nothing"), "{run:?}");
}

// ===========================================================================
// 5. Output
// ===========================================================================

#[test]
fn without_output_options_a_run_is_silent() {
    let source = random_data(120, MIB);
    for dir in DIRS {
        for mode in MODES {
            check_action(dir, mode, &source, Some(&mutated(&source)), &[]).silent();
        }
    }
}

#[test]
fn verbose_logs_to_stdout() {
    for dir in DIRS {
        for mode in MODES {
            let t = tmp();
            let src = t.path().join("src.img");
            let rcv = t.path().join("rcv.img");
            let source = random_image(&src, 121, MIB);
            random_image(&rcv, 122, MIB);
            let run = basyn(&action(dir, mode, &src, &rcv, &["--verbose"]));
            run.ok();
            assert!(run.stderr.is_empty(), "--verbose wrote to stderr{run:?}");
            assert!(run.stdout.lines().count() >= 2, "too few log lines{run:?}");
            assert!(run.stdout.contains(s(&src)) && run.stdout.contains(s(&rcv)), "log names no devices{run:?}");
            assert_content(&rcv, &source, "receiver");
        }
    }
}

#[test]
fn debug_writes_per_block_lines_to_stderr() {
    // Five 64 KiB blocks, blocks 1 and 3 differ.
    let size = 5 * 64 * KIB;
    for dir in DIRS {
        let t = tmp();
        let src = t.path().join("src.img");
        let rcv = t.path().join("rcv.img");
        let source = random_image(&src, 123, size);
        let mut near = source.clone();
        near[64 * KIB + 10] ^= 1;
        near[3 * 64 * KIB + 10] ^= 1;
        write(&rcv, &near);
        let run = basyn(&action(dir, "sync", &src, &rcv, &["--debug", "--buffer", "64"]));
        run.ok();
        assert!(run.stdout.is_empty(), "--debug wrote to stdout{run:?}");
        assert!(!run.stderr.is_empty(), "no debug output{run:?}");
        for line in run.stderr.lines() {
            assert!(line.starts_with("debug:"), "stderr line {line:?} is not a debug line{run:?}");
        }
        for (i, offset) in [(1, 64 * KIB), (3, 3 * 64 * KIB)] {
            let (block, at) = (format!("block {i} "), offset.to_string());
            let found = run.stderr.lines().any(|l| l.contains(&block) && l.contains(&at) && l.contains("differ"));
            assert!(found, "no 'differs' line for block {i} at {offset}{run:?}");
        }
        let block_lines = run.stderr.lines().filter(|l| l.contains("block ")).count();
        assert!(block_lines >= 5, "expected a line per block{run:?}");
        assert_content(&rcv, &source, "receiver");
        // Without --debug nothing goes to stderr.
        write(&rcv, &near);
        basyn(&action(dir, "sync", &src, &rcv, &["--buffer", "64"])).ok().silent();
    }
}

#[test]
fn progress_writes_lines_to_a_non_terminal_stderr() {
    for dir in DIRS {
        for (mode, label) in [("copy", "sending "), ("sync", "comparing ")] {
            let t = tmp();
            let src = t.path().join("src.img");
            let rcv = t.path().join("rcv.img");
            let source = random_image(&src, 124, 4 * MIB + 1);
            random_image(&rcv, 125, source.len());
            let run = basyn(&action(dir, mode, &src, &rcv, &["--progress", "--recheck"]));
            run.ok();
            assert!(run.stdout.is_empty(), "--progress wrote to stdout{run:?}");
            assert!(run.stderr.lines().any(|l| l.starts_with(label)), "no {label}progress line{run:?}");
            assert!(run.stderr.contains("flushing  100.0%"), "no final flushing progress line{run:?}");
            assert!(run.stderr.contains("verifying 100.0%"), "no final verifying progress line{run:?}");
            assert!(!run.stderr.contains('\r'), "a bar was drawn on a non-terminal{run:?}");
            assert_content(&rcv, &source, "receiver");
            let run = basyn(&["-l", s(&src), "-r", s(&rcv), "--recheck", "--progress"]);
            run.ok();
            assert!(run.stderr.contains("verifying 100.0%"), "{run:?}");
        }
    }
}

// ===========================================================================
// 6. Refusals
// ===========================================================================

/// Two files in a temp dir; the receiver's content is kept for "unchanged" checks.
struct Pair {
    _t: tempfile::TempDir,
    src: PathBuf,
    rcv: PathBuf,
    source: Vec<u8>,
    receiver: Vec<u8>,
}

fn pair(src_len: usize, rcv_len: usize, seed: u64) -> Pair {
    let t = tmp();
    let src = t.path().join("src.img");
    let rcv = t.path().join("rcv.img");
    let source = random_image(&src, seed, src_len);
    let receiver = random_image(&rcv, seed + 1, rcv_len);
    Pair { _t: t, src, rcv, source, receiver }
}

impl Pair {
    #[track_caller]
    fn unchanged(&self) {
        assert_content(&self.rcv, &self.receiver, "receiver after a refusal");
        assert_content(&self.src, &self.source, "source after a refusal");
    }
}

/// A smaller receiver is refused in the original's words, naming the side and device
/// (a larger one is accepted: `tests/sizes.rs`).
#[test]
fn a_smaller_receiver_is_refused_in_the_originals_words() {
    let (src_len, rcv_len) = (3 * MIB, 2 * MIB);
    for dir in DIRS {
        for mode in MODES {
            let p = pair(src_len, rcv_len, 130);
            let (rside, sside) = sides(dir);
            let action_word = if dir == Dir::Push { "PUSH" } else { "PULL" };
            let run = basyn(&action(dir, mode, &p.src, &p.rcv, &[]));
            let words = format!(
                "{rside} {}: Cannot {action_word} because {rside} device size ({rcv_len}) is smaller than {sside} device size ({src_len})",
                s(&p.rcv)
            );
            run.fails(1, &[&words]);
            assert!(run.stdout.is_empty(), "{run:?}");
            p.unchanged();
        }
    }
}

/// Regression (issue 9): a receiver larger than the source was refused without
/// `--force`; the original syncs the source's length and leaves the tail, and says so.
#[test]
fn a_larger_receiver_gets_the_sources_length_without_force_and_keeps_its_tail() {
    let (src_len, rcv_len) = (2 * MIB + 5, 3 * MIB);
    for dir in DIRS {
        for mode in MODES {
            for verbose in [false, true] {
                let p = pair(src_len, rcv_len, 134);
                let (rside, sside) = sides(dir);
                let extra: &[&str] = if verbose { &["--recheck", "--verbose"] } else { &["--recheck"] };
                let run = basyn(&action(dir, mode, &p.src, &p.rcv, extra));
                run.ok();
                let line = format!(
                    "basyn: {rside} {} ({rcv_len} bytes) is larger than {sside} {} ({src_len} bytes): only the source's length is synced, the rest is left as it is\n",
                    s(&p.rcv),
                    s(&p.src)
                );
                assert_eq!(run.stderr, line, "{dir:?} {mode}: not one line saying so{run:?}");
                let left = format!("{} bytes past the source's end are left untouched", rcv_len - src_len);
                assert_eq!(run.stdout.contains(&left), verbose, "{dir:?} {mode}: --verbose says what is left{run:?}");
                let got = read(&p.rcv);
                assert_eq!(got.len(), rcv_len, "{dir:?} {mode}: the receiver was resized");
                assert!(first_difference(&got[..src_len], &p.source).is_none(), "{dir:?} {mode}: synced length");
                assert!(first_difference(&got[src_len..], &p.receiver[src_len..]).is_none(), "{dir:?} {mode}: tail");
                // A check without an action still sees the devices differ in size.
                let mut check = ends(dir, &p.src, &p.rcv);
                check.push("--recheck".into());
                basyn(&check).fails(3, &["differ in size"]);
            }
        }
    }
}

#[test]
fn force_resizes_a_file_receiver_to_the_source() {
    for (src_len, rcv_len) in [(3 * MIB + 5, 2 * MIB), (MIB + 1, 3 * MIB + 1)] {
        for dir in DIRS {
            for mode in MODES {
                let p = pair(src_len, rcv_len, 131);
                basyn(&action(dir, mode, &p.src, &p.rcv, &["--force", "--recheck"])).ok();
                assert_eq!(size_of(&p.rcv), src_len as u64, "{dir:?} {mode}");
                assert_same(&p.src, &p.rcv);
                assert_content(&p.src, &p.source, "source");
            }
        }
    }
}

#[test]
fn an_empty_source_is_refused() {
    for dir in DIRS {
        for mode in MODES {
            let p = pair(0, 100 * KIB, 132);
            let (_, sside) = sides(dir);
            basyn(&action(dir, mode, &p.src, &p.rcv, &[]))
                .fails(1, &[&format!("{sside} {}: There is nothing to sync", s(&p.src))]);
            p.unchanged();
            basyn(&action(dir, mode, &p.src, &p.rcv, &["--force"])).fails(1, &["nothing to sync"]);
            p.unchanged();
            let missing = p.rcv.with_file_name("new.img");
            basyn(&action(dir, mode, &p.src, &missing, &[])).fails(1, &["nothing to sync"]);
            assert!(!missing.exists(), "receiver created for an empty source");
        }
    }
}

#[test]
fn the_same_file_on_both_ends_is_refused() {
    for dir in DIRS {
        for mode in MODES {
            let p = pair(MIB, 10, 133);
            let t = p.src.parent().unwrap();
            let link = t.join("link.img");
            let hard = t.join("hard.img");
            std::os::unix::fs::symlink(&p.src, &link).unwrap();
            std::fs::hard_link(&p.src, &hard).unwrap();
            let dotted = t.join(".").join("src.img");
            let (rside, _) = sides(dir);
            for other in [&p.src, &link, &hard, &dotted] {
                let run = basyn(&action(dir, mode, &p.src, other, &[]));
                run.fails(1, &[&format!("{rside} {}:", s(other)), "same"]);
                assert_content(&p.src, &p.source, "the device after a same-device refusal");
            }
        }
    }
}

#[test]
fn a_missing_source_is_refused_and_nothing_is_created() {
    for dir in DIRS {
        for mode in MODES {
            let p = pair(MIB, MIB, 134);
            let missing = p.src.with_file_name("nope.img");
            let (_, sside) = sides(dir);
            basyn(&action(dir, mode, &missing, &p.rcv, &[]))
                .fails(1, &[&format!("{sside} {}: no such file or device", s(&missing))]);
            p.unchanged();
            let new = p.src.with_file_name("new.img");
            basyn(&action(dir, mode, &missing, &new, &["--force"])).fails(1, &["no such file or device"]);
            assert!(!new.exists(), "receiver created although the source is missing");
            assert!(!missing.exists(), "the missing source was created");
        }
    }
}

#[test]
fn directories_and_character_devices_are_refused() {
    for dir in DIRS {
        for mode in MODES {
            let p = pair(MIB, MIB, 135);
            let d = p.src.parent().unwrap().join("a-directory");
            std::fs::create_dir(&d).unwrap();
            let (rside, sside) = sides(dir);
            basyn(&action(dir, mode, &d, &p.rcv, &[])).fails(1, &[&format!("{sside} {}:", s(&d)), "directory"]);
            p.unchanged();
            basyn(&action(dir, mode, &p.src, &d, &["--force"]))
                .fails(1, &[&format!("{rside} {}:", s(&d)), "directory"]);
            p.unchanged();
            let zero = Path::new("/dev/zero");
            basyn(&action(dir, mode, zero, &p.rcv, &[])).fails(1, &[&format!("{sside} /dev/zero:"), "character"]);
            p.unchanged();
            basyn(&action(dir, mode, &p.src, Path::new("/dev/null"), &[]))
                .fails(1, &[&format!("{rside} /dev/null:"), "character"]);
        }
    }
}

#[test]
fn a_receiver_in_a_missing_directory_is_refused() {
    for dir in DIRS {
        for mode in MODES {
            let p = pair(MIB, MIB, 136);
            let bad = p.src.parent().unwrap().join("no-such-dir").join("rcv.img");
            let (rside, _) = sides(dir);
            basyn(&action(dir, mode, &p.src, &bad, &[])).fails(1, &[&format!("{rside} {}:", s(&bad))]);
            assert!(!bad.parent().unwrap().exists());
        }
    }
}

#[test]
fn an_immutable_receiver_is_refused() {
    for dir in DIRS {
        for mode in MODES {
            let p = pair(MIB, MIB, 137);
            let Some(_guard) = immutable(&p.rcv) else { return };
            let (rside, _) = sides(dir);
            basyn(&action(dir, mode, &p.src, &p.rcv, &[]))
                .fails(1, &[&format!("{rside} {}:", s(&p.rcv)), "not permitted"]);
            p.unchanged();
            basyn(&action(dir, mode, &p.src, &p.rcv, &["--force"])).fails(1, &[&format!("{rside} {}:", s(&p.rcv))]);
            p.unchanged();
        }
    }
}
