//! Integration tests of the command line itself, on the real `basyn` binary: the hints
//! a mistyped option or value gets, the grouped `--help`, sizes with units, the
//! `--stat=json` object, and the man page and completions built from the CLI.

mod util;

use util::*;

// ===========================================================================
// Typos and values
// ===========================================================================

#[test]
fn a_mistyped_option_gets_a_did_you_mean_hint() {
    let t = tmp();
    let (a, b) = (t.path().join("a.img"), t.path().join("b.img"));
    for (typo, meant) in [("--verbos", "--verbose"), ("--progres", "--progress"), ("--rechek", "--recheck")] {
        let run = basyn(&["-l", s(&a), "-r", s(&b), typo]);
        run.usage_error(&[typo, &format!("did you mean '{meant}'?")]);
    }
    // Nothing was created or touched by a refused command line.
    assert!(!a.exists() && !b.exists());
}

#[test]
fn a_bad_mode_or_action_lists_the_valid_values() {
    let run = basyn(&["-l", "a", "-r", "b", "-a", "PUSH", "-m", "SINC"]);
    run.usage_error(&["SINC", "possible values: SYNC, COPY"]);
    let run = basyn(&["-l", "a", "-r", "b", "-a", "PUHS", "-m", "SYNC"]);
    run.usage_error(&["PUHS", "possible values: PUSH, PULL"]);
    let run = basyn(&["-l", "a", "-r", "b", "--hash", "SHA3"]);
    run.usage_error(&["SHA3", "possible values:", "BLAKE3", "SHA256", "MD5"]);
}

#[test]
fn values_stay_case_insensitive() {
    let t = tmp();
    let src = t.path().join("src.img");
    let rcv = t.path().join("rcv.img");
    let data = random_image(&src, 7, 300 * KIB);
    basyn(&["-l", s(&src), "-r", s(&rcv), "-a", "push", "-m", "copy"]).ok().silent();
    assert_content(&rcv, &data, "after -a push -m copy");
    poke(&src, 1000, b"changed");
    basyn(&["-l", s(&src), "-r", s(&rcv), "-a", "Push", "-m", "Sync", "--hash", "sha256"]).ok().silent();
    assert_same(&src, &rcv);
}

// ===========================================================================
// --buffer and --chunk with units
// ===========================================================================

/// Syncs a fresh 3 MiB pair whose source differs in three spots, with `extra`, and
/// returns the `--verbose` line naming the geometry and the `--stat` figures.
fn sync_with(extra: &[&str]) -> (String, Stat) {
    let t = tmp();
    let src = t.path().join("src.img");
    let rcv = t.path().join("rcv.img");
    let old = random_image(&rcv, 3, 3 * MIB);
    let mut new = old.clone();
    for at in [10, MIB + 5000, 3 * MIB - 1] {
        new[at] ^= 0xff;
    }
    write(&src, &new);
    let mut args = vec!["-l", s(&src), "-r", s(&rcv), "-a", "PUSH", "-m", "SYNC", "--stat", "--verbose", "--no-state"];
    args.extend_from_slice(extra);
    let run = basyn(&args);
    run.ok();
    assert_content(&rcv, &new, "receiver after the sync");
    let geometry = run.stdout.lines().find(|l| l.contains(" KiB") && l.contains("hash ")).unwrap_or_default();
    let geometry = geometry[geometry.find("hash ").unwrap_or(0)..].to_string();
    (geometry, run.stat())
}

#[test]
fn buffer_and_chunk_with_a_unit_mean_the_same_as_plain_kib() {
    let plain = sync_with(&["--buffer", "64", "--chunk", "4"]);
    assert!(plain.0.contains("buffer 64 KiB, chunk 4 KiB"), "{plain:?}");
    for forms in [["64K", "4K"], ["64k", "4KiB"], ["64KB", "4kb"]] {
        let unit = sync_with(&["--buffer", forms[0], "--chunk", forms[1]]);
        assert_eq!(unit.0, plain.0, "{forms:?}");
        let (a, b) = (&unit.1, &plain.1);
        assert_eq!((a.compared, a.differing, a.written), (b.compared, b.differing, b.written), "{forms:?}");
    }
    assert_eq!(plain.1.compared, 48, "3 MiB in 64 KiB blocks");
    assert_eq!(plain.1.differing, 3);
    assert_eq!(plain.1.written, 3 * 4 * KIB as u64, "three 4 KiB chunks");
    // A unit of M or G: 2M is the default of 2048.
    let default = sync_with(&[]);
    let two_m = sync_with(&["--buffer", "2M", "--chunk", "1m"]);
    assert!(default.0.contains("buffer 2048 KiB"), "{default:?}");
    assert!(two_m.0.contains("buffer 2048 KiB, chunk 1024 KiB"), "{two_m:?}");
    assert_eq!(two_m.1.compared, default.1.compared);
}

#[test]
fn bad_sizes_are_clear_usage_errors() {
    for bad in ["2X", "M", "-4", "1.5M", "2 M", ""] {
        let run = basyn(&["-l", "a", "-r", "b", &format!("--buffer={bad}")]);
        run.usage_error(&["--buffer", "is not a size", "64K, 2M"]);
    }
    basyn(&["-l", "a", "-r", "b", "--chunk", "4Q"]).usage_error(&["--chunk", "'4Q' is not a size"]);
    basyn(&["-l", "a", "-r", "b", "--buffer", "1G"]).usage_error(&["--buffer must be between 1 and 65536 KB (64M)"]);
    basyn(&["-l", "a", "-r", "b", "--buffer", "128M"]).usage_error(&["not 131072 KB"]);
    basyn(&["-l", "a", "-r", "b", "--chunk", "0K"]).usage_error(&["--chunk must be at least 1 KB"]);
    basyn(&["-l", "a", "-r", "b", "--buffer", "64K", "--chunk", "1M"])
        .usage_error(&["--chunk (1024 KB) must not be larger than --buffer (64 KB)"]);
    basyn(&["-l", "a", "-r", "b", "--buffer", "99999999999999999G"]).usage_error(&["too large"]);
}

// ===========================================================================
// --help
// ===========================================================================

#[test]
fn help_is_grouped_like_the_original_usage() {
    let run = basyn(&["--help"]);
    run.ok();
    let headings = ["Devices and host:", "Action and mode:", "Comparison:", "Output:", "States:", "Safety:"];
    let mut at = 0;
    for h in headings {
        let found = run.stdout[at..].find(h).unwrap_or_else(|| panic!("no heading {h:?} after byte {at}{run:?}"));
        at += found + h.len();
    }
    // Each option sits under its heading: the text between a heading and the next.
    let section = |h: &str| {
        let start = run.stdout.find(h).unwrap_or(0);
        let rest = &run.stdout[start + h.len()..];
        let end = headings.iter().filter_map(|n| rest.find(n)).min().unwrap_or(rest.len());
        rest[..end].to_string()
    };
    for (h, options) in [
        ("Devices and host:", &["--local", "--remote", "--host", "--port", "--user", "--remote-path", "--timeout"][..]),
        ("Action and mode:", &["--action", "--mode", "--recheck"]),
        ("Comparison:", &["--hash", "--buffer", "--chunk", "--zlevel", "--compress", "--adapt"]),
        ("Output:", &["--stat", "--verbose", "--progress", "--debug"]),
        ("States:", &["--state", "--remote-state", "--no-state", "--trust-state", "--bitmap", "--reset-bitmap"]),
        ("Safety:", &["--force"]),
    ] {
        let text = section(h);
        for o in options {
            assert!(text.contains(o), "{o} is not under {h:?}: {text}");
        }
    }
    assert!(run.stdout.contains("[possible values: PUSH, PULL]"), "{run:?}");
}

#[test]
fn index_help_uses_the_same_headings() {
    let run = basyn(&["index", "--help"]);
    run.ok();
    for h in ["Devices and host:", "Comparison:", "Output:", "States:"] {
        assert!(run.stdout.contains(h), "no {h:?}{run:?}");
    }
}

// ===========================================================================
// --stat=json
// ===========================================================================

/// The one JSON object a run printed on stdout.
fn json_of(run: &Run) -> serde_json::Value {
    let line = run.stdout.trim_end();
    assert!(!line.contains('\n'), "more than the JSON object on stdout{run:?}");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("stdout is not JSON: {e}{run:?}"))
}

/// `v[key]` as an unsigned integer.
fn uint(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} is not an unsigned integer in {v}"))
}

#[test]
fn stat_json_of_a_sync_counts_the_blocks_that_were_changed() {
    let t = tmp();
    let src = t.path().join("src.img");
    let rcv = t.path().join("rcv.img");
    let size = 4 * MIB;
    let data = random_image(&src, 21, size);
    basyn(&["-l", s(&src), "-r", s(&rcv), "-a", "PUSH", "-m", "COPY", "--buffer", "64K"]).ok();
    // Five changed 64 KiB blocks, each in one 16 KiB piece.
    let changed = [0usize, 7, 8, 40, 63];
    let mut new = data.clone();
    for b in changed {
        new[b * 64 * KIB + 100] ^= 0x5a;
    }
    write(&src, &new);
    let run = basyn(&["-l", s(&src), "-r", s(&rcv), "-a", "PUSH", "-m", "SYNC", "--buffer", "64K", "--stat=json"]);
    run.ok();
    assert_content(&rcv, &new, "receiver after the sync");
    let v = json_of(&run);
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        (v["command"].as_str(), v["action"].as_str(), v["mode"].as_str()),
        (Some("run"), Some("PUSH"), Some("SYNC"))
    );
    assert_eq!((uint(&v, "exit_code"), v["error"].is_null(), v["recheck"].as_bool()), (0, true, Some(false)));
    assert_eq!(v["link"], "pipe", "a local run has no network");
    assert_eq!(uint(&v, "device_size_bytes"), size as u64);
    assert_eq!(uint(&v, "blocks_compared"), 64);
    assert_eq!(uint(&v, "blocks_differing"), changed.len() as u64);
    assert_eq!(uint(&v, "blocks_sent"), changed.len() as u64);
    let piece = 16 * KIB as u64;
    assert_eq!(uint(&v, "bytes_written"), changed.len() as u64 * piece, "one 16 KiB piece per block: {v}");
    assert_eq!(uint(&v, "remote_written_bytes"), uint(&v, "bytes_written"));
    assert_eq!(uint(&v, "local_written_bytes"), 0);
    assert_eq!(uint(&v, "data_bytes_sent"), uint(&v, "bytes_written"), "random data crosses as data: {v}");
    assert_eq!(uint(&v, "zero_bytes_sent"), 0);
    assert_eq!(uint(&v, "local_read_bytes"), size as u64, "the changed source is read once: {v}");
    assert_eq!(uint(&v, "remote_read_bytes"), 0, "the receiver's state is fresh: {v}");
    assert_eq!(uint(&v, "traffic_bytes"), uint(&v, "rx_bytes") + uint(&v, "tx_bytes"));
    assert!(uint(&v, "tx_bytes") > uint(&v, "data_bytes_sent"), "data and framing went to the endpoint: {v}");
    let secs = v["duration_seconds"].as_f64().expect("duration");
    assert!(secs > 0.0 && secs < 60.0, "{v}");
    assert!(v["real_bandwidth_bytes_per_second"].is_null(), "{v}");
    let eff = v["effective_bandwidth_bytes_per_second"].as_f64().expect("an effective rate");
    assert!((eff - size as f64 / secs).abs() <= eff * 0.01, "{v}");
    let ratio = v["ratio_percent"].as_f64().expect("a ratio");
    assert!((ratio - uint(&v, "traffic_bytes") as f64 * 100.0 / size as f64).abs() < 1e-6, "{v}");
    assert!(uint(&v, "tree_nodes_compared") < 64, "{v}");

    // Again: nothing differs, nothing is sent, there is no effective rate, and the text
    // --stat says so too.
    let run = basyn(&["-l", s(&src), "-r", s(&rcv), "-a", "PUSH", "-m", "SYNC", "--buffer", "64K", "--stat=json"]);
    let v = json_of(run.ok());
    assert_eq!((uint(&v, "blocks_sent"), uint(&v, "bytes_written"), uint(&v, "data_bytes_sent")), (0, 0, 0), "{v}");
    assert!(v["effective_bandwidth_bytes_per_second"].is_null(), "{v}");
    let run = basyn(&["-l", s(&src), "-r", s(&rcv), "-a", "PUSH", "-m", "SYNC", "--buffer", "64K", "--stat"]);
    run.ok();
    assert!(!run.stdout.contains("Effective") && !run.stdout.contains("Real"), "{run:?}");
    assert!(run.stdout.contains("no network (local run); pipe Rx"), "{run:?}");
}

#[test]
fn stat_json_of_a_copy_counts_zeros_apart_from_data() {
    let t = tmp();
    let src = t.path().join("src.img");
    let mut data = random_data(31, 6 * MIB);
    // Two MiB of written zeros (not a hole: they are read and cross as tokens).
    data[2 * MIB..4 * MIB].fill(0);
    write(&src, &data);
    for dir in [Dir::Push, Dir::Pull] {
        let rcv = t.path().join(format!("rcv-{}.img", dir.word()));
        let run = basyn(&action(dir, "copy", &src, &rcv, &["--stat=json", "--no-state"]));
        run.ok();
        assert_content(&rcv, &data, "receiver after the copy");
        let v = json_of(&run);
        assert_eq!(v["mode"], "COPY");
        assert_eq!(uint(&v, "blocks_compared"), 0, "a COPY compares nothing: {v}");
        assert_eq!(uint(&v, "blocks_sent"), 3, "every 2 MiB block: {v}");
        assert_eq!(uint(&v, "zero_bytes_sent"), 2 * MIB as u64, "{dir:?}: {v}");
        assert_eq!(uint(&v, "data_bytes_sent"), 4 * MIB as u64, "{dir:?}: {v}");
        let (written_by_receiver, other) = match dir {
            Dir::Push => ("remote_written_bytes", "local_written_bytes"),
            Dir::Pull => ("local_written_bytes", "remote_written_bytes"),
        };
        assert!(uint(&v, written_by_receiver) >= 4 * MIB as u64, "{dir:?}: {v}");
        assert_eq!(uint(&v, other), 0, "{dir:?}: {v}");
    }
}

#[test]
fn stat_json_has_the_exit_code_of_a_recheck() {
    let t = tmp();
    let a = t.path().join("a.img");
    let b = t.path().join("b.img");
    let data = random_image(&a, 41, 3 * MIB);
    write(&b, &data);
    let run = basyn(&["-l", s(&a), "-r", s(&b), "--recheck", "--stat=json", "--no-state"]);
    let v = json_of(run.ok());
    assert_eq!((uint(&v, "exit_code"), v["action"].is_null(), v["recheck"].as_bool()), (0, true, Some(true)));
    assert_eq!((uint(&v, "blocks_compared"), uint(&v, "blocks_differing")), (2, 0));
    poke(&b, 10, b"different");
    let run = basyn(&["-l", s(&a), "-r", s(&b), "--recheck", "--stat=json", "--no-state"]);
    run.code(3);
    let v = json_of(&run);
    assert_eq!(uint(&v, "exit_code"), 3);
    assert_eq!(uint(&v, "blocks_differing"), 1);
    assert!(v["error"].as_str().is_some_and(|e| e.contains("differ")), "{v}");
    // The local side read everything; the endpoint's own figures come with a clean close,
    // which a failed run (exit 3 included) does not have.
    assert_eq!(uint(&v, "local_read_bytes"), 3 * MIB as u64);
    assert_eq!(uint(&v, "blocks_sent"), 0);
    assert!(run.stderr.contains("differ"), "the error is still said on stderr{run:?}");
}

#[test]
fn stat_file_takes_the_json_and_plain_stat_stays_text() {
    let t = tmp();
    let src = t.path().join("src.img");
    let rcv = t.path().join("rcv.img");
    random_image(&src, 51, MIB);
    let file = t.path().join("stat.json");
    let run =
        basyn(&["-l", s(&src), "-r", s(&rcv), "-a", "PUSH", "-m", "COPY", "--stat=json", "--stat-file", s(&file)]);
    run.ok().silent();
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).expect("stat file")).expect("JSON");
    assert_eq!((uint(&v, "device_size_bytes"), uint(&v, "exit_code")), (MIB as u64, 0));
    // --stat and --stat-file: text on stdout, the object in the file.
    std::fs::remove_file(&file).expect("remove");
    let run = basyn(&["-l", s(&src), "-r", s(&rcv), "-a", "PUSH", "-m", "SYNC", "--stat", "--stat-file", s(&file)]);
    run.ok();
    assert_eq!(run.stat().device_size, MIB as u64);
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).expect("stat file")).expect("JSON");
    assert_eq!(v["mode"], "SYNC");
    // An unwritable --stat-file is a warning: the exit code says what happened to the data.
    let run =
        basyn(&["-l", s(&src), "-r", s(&rcv), "-a", "PUSH", "-m", "SYNC", "--stat-file", "/nonexistent/dir/s.json"]);
    run.ok();
    assert!(run.stderr.contains("cannot write --stat-file /nonexistent/dir/s.json"), "{run:?}");
}

#[test]
fn a_run_that_fails_before_anything_happened_prints_no_zero_stat_block() {
    let t = tmp();
    let missing = t.path().join("missing.img");
    let rcv = t.path().join("rcv.img");
    let args = ["-l", s(&missing), "-r", s(&rcv), "-a", "PUSH", "-m", "SYNC"];
    let run = basyn(&[&args[..], &["--stat"]].concat());
    run.code(1);
    assert!(run.stdout.is_empty(), "an all-zero --stat block{run:?}");
    let run = basyn(&[&args[..], &["--stat=json"]].concat());
    run.code(1);
    let v = json_of(&run);
    assert_eq!(uint(&v, "exit_code"), 1);
    assert!(v["error"].as_str().is_some_and(|e| e.contains("missing.img")), "{v}");
    // Refused by the endpoint once connected (a receiver smaller than the source): the
    // handshake crossed the pipe, but no device was sized, read or written.
    let src = t.path().join("src.img");
    random_image(&src, 71, 2 * MIB);
    random_image(&rcv, 72, MIB);
    let args = ["-l", s(&src), "-r", s(&rcv), "-a", "PUSH", "-m", "SYNC"];
    let run = basyn(&[&args[..], &["--stat"]].concat());
    run.fails(1, &["Cannot PUSH because remote device size (1048576) is smaller"]);
    assert!(run.stdout.is_empty(), "an all-zero --stat block{run:?}");
    let run = basyn(&[&args[..], &["--stat=json"]].concat());
    run.code(1);
    let v = json_of(&run);
    assert_eq!((uint(&v, "exit_code"), uint(&v, "bytes_written")), (1, 0));
    assert!(uint(&v, "traffic_bytes") > 0, "the JSON still counts the handshake: {v}");
}

#[test]
fn a_failed_connection_prints_no_zero_stat_block_and_json_says_why() {
    if !require_tool("ssh") {
        return;
    }
    let t = tmp();
    let src = t.path().join("src.img");
    random_image(&src, 61, MIB);
    // Nothing listens on port 9 of 127.0.0.1: the connection is refused at once.
    let config = t.path().join("ssh_config");
    write(&config, b"Host nowhere\n  HostName 127.0.0.1\n  Port 9\n  ConnectTimeout 5\n");
    let cfg = s(&config).to_string();
    let base = ["-l", s(&src), "-r", "/tmp/x.img", "-h", "nowhere", "-a", "PUSH", "-m", "SYNC"];
    let text = start(&sv(&[&base[..], &["--stat"]].concat()), &[("BASYN_SSH_CONFIG", &cfg)]).finish();
    assert_ne!(text.code, 0, "{text:?}");
    assert!(text.stdout.is_empty(), "an all-zero --stat block after a failed connection{text:?}");
    let json = start(&sv(&[&base[..], &["--stat=json"]].concat()), &[("BASYN_SSH_CONFIG", &cfg)]).finish();
    assert_eq!(json.code, text.code, "{json:?}");
    let v = json_of(&json);
    assert_eq!(v["exit_code"].as_i64(), Some(i64::from(json.code)));
    assert_eq!((v["link"].as_str(), uint(&v, "traffic_bytes")), (Some("ssh"), 0));
    assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
}

// ===========================================================================
// Man page, completions, install, test totals
// ===========================================================================

/// Every long option `basyn --help` and `basyn index --help` show.
fn long_options_in_help() -> Vec<String> {
    let mut all = Vec::new();
    for args in [&["--help"][..], &["index", "--help"]] {
        let run = basyn(args);
        run.ok();
        for word in run.stdout.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == '=') {
            if let Some(name) = word.strip_prefix("--") {
                let name: String = name.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
                if !name.is_empty() {
                    all.push(name);
                }
            }
        }
    }
    all.sort();
    all.dedup();
    all
}

#[test]
fn man_page_and_completions_have_every_long_option() {
    let options = long_options_in_help();
    for o in ["local", "remote", "host", "stat", "stat-file", "buffer", "bitmap", "update-bitmap", "trust-state"] {
        assert!(options.iter().any(|x| x == o), "--{o} not found in --help: {options:?}");
    }
    for what in ["man", "bash", "zsh", "fish"] {
        let run = basyn(&["generate", what]);
        run.ok();
        assert!(run.stderr.is_empty(), "{run:?}");
        for o in &options {
            let spelled = match what {
                "man" => format!("\\-\\-{}", o.replace('-', "\\-")),
                "fish" => format!("-l {o}"),
                _ => format!("--{o}"),
            };
            assert!(run.stdout.contains(&spelled), "{what} lacks --{o} ({spelled:?})");
        }
    }
    let man = basyn(&["generate", "man"]);
    assert!(man.stdout.contains("\n.TH basyn 1 "), "{man:?}");
    assert!(!man.stdout.contains("basyn\\-index(1)"), "no pointer to a page that is not installed{man:?}");
    for section in [
        "DEVICES AND HOST",
        "ACTION AND MODE",
        "COMPARISON",
        "OUTPUT",
        "STATES",
        "SAFETY",
        "BASYN INDEX",
        "EXIT STATUS",
    ] {
        assert!(
            man.stdout.contains(&format!(".SH \"{section}\"")) || man.stdout.contains(&format!(".SH {section}")),
            "{section}"
        );
    }
    basyn(&["generate", "pdf"]).usage_error(&["pdf", "possible values: man, bash, zsh, fish"]);
}

#[test]
fn install_sh_puts_everything_under_the_prefix() {
    let t = tmp();
    let prefix = t.path().join("prefix");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/install.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .arg(&prefix)
        .env("BASYN_BINARY", env!("CARGO_BIN_EXE_basyn"))
        .output()
        .expect("run install.sh");
    assert!(out.status.success(), "install.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    for (path, needle) in [
        ("bin/basyn", &b"\x7fELF"[..]),
        ("share/man/man1/basyn.1", b".TH basyn 1"),
        ("share/bash-completion/completions/basyn", b"--stat-file"),
        ("share/zsh/site-functions/_basyn", b"#compdef basyn"),
        ("share/fish/vendor_completions.d/basyn.fish", b"complete -c basyn"),
    ] {
        let bytes = std::fs::read(prefix.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(bytes.windows(needle.len()).any(|w| w == needle), "{path} lacks {:?}", String::from_utf8_lossy(needle));
    }
    let installed = std::process::Command::new(prefix.join("bin/basyn")).arg("--version").output().expect("run it");
    assert_eq!(String::from_utf8_lossy(&installed.stdout).trim(), format!("basyn {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn test_sh_totals_add_up_every_test_result_line() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/totals.sh");
    let total = |input: &str| {
        let mut child = std::process::Command::new("bash")
            .arg(script)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run totals.sh");
        std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), input.as_bytes()).expect("write");
        let out = child.wait_with_output().expect("wait");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let log = "running 3 tests\n\
               test a ... ok\n\
               test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s\n\
               test result: FAILED. 30 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 9.50s\n\
               test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s\n";
    assert_eq!(total(log), "42 passed, 2 failed\n");
    assert_eq!(total("error: could not compile `basyn`\n"), "0 passed, 0 failed\n");
}

/// `basyn serve --help` failed with "unexpected argument '--help'" (the top level gives
/// `-h` to the host, and the subcommands had no `--help` of their own).
#[test]
fn every_subcommand_takes_help() {
    for sub in ["index", "serve", "state"] {
        let run = basyn(&[sub, "--help"]);
        run.ok();
        assert!(run.stdout.contains(&format!("Usage: basyn {sub}")), "{run:?}");
    }
}
