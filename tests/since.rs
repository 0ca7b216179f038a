//! `SYNC --since OLDER --changed-ranges FILE`: two image files stand in for last
//! night's and tonight's LVM-thin snapshots, and a real pool metadata file, built with
//! `thin_restore`, maps them. `thin_delta` runs on it for real and its XML goes to basyn
//! as it is. Only the changed leaves may be read from the source (basyn's `--stat`, and
//! the sectors a loop device over tonight's image counts); every broken premise falls
//! back to a plain SYNC and says why; a bad list is refused before anything is written.

mod sshd;
mod util;

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use sshd::{ALIAS, Sshd};
use util::*;

/// Image size: 32 leaves of 2 MiB, 1024 thin blocks of 64 KiB.
const SIZE: usize = 64 * MIB;
/// The pool's block size, in 512-byte sectors (64 KiB, LVM's default chunk).
const BLOCK_SECTORS: u64 = 128;
const BLOCK: usize = 64 * 1024;
/// Thin blocks changed between the snapshots, and the leaves they fall in.
const CHANGED_BLOCKS: [usize; 6] = [5, 300, 301, 302, 303, 1000];
const CHANGED_LEAVES: u64 = 3;
/// Bytes in the changed thin blocks: all that is read of the source to digest them
/// (and the differing 4 KiB parts of them once more, to send them).
const CHANGED_BYTES: u64 = (CHANGED_BLOCKS.len() * BLOCK) as u64;

/// Last night's snapshot, tonight's, the receiver synced from last night's, and the
/// thin_delta XML between the snapshots.
struct Nightly {
    dir: tempfile::TempDir,
    last: PathBuf,
    tonight: PathBuf,
    receiver: PathBuf,
    delta: PathBuf,
}

impl Nightly {
    /// `None` (or a failure in CI) without thin-provisioning-tools.
    fn new() -> Option<Nightly> {
        if !require_tool("thin_restore") || !require_tool("thin_delta") {
            return None;
        }
        let dir = tmp();
        let (last, tonight, receiver) =
            (dir.path().join("last.img"), dir.path().join("tonight.img"), dir.path().join("backup.img"));
        snapshots(&last, &tonight);
        // Last night's run: the receiver and both states (the snapshot's and the
        // receiver's) are fresh afterwards.
        basyn(&action(Dir::Push, "sync", &last, &receiver, &[])).ok();
        let delta = dir.path().join("delta.xml");
        let xml = thin_delta(dir.path(), &CHANGED_BLOCKS);
        fs::write(&delta, xml).unwrap();
        Some(Nightly { dir, last, tonight, receiver, delta })
    }

    /// Tonight's SYNC with `--since` last night's snapshot and the XML, from `source`.
    fn sync_from(&self, source: &Path, extra: &[&str]) -> Run {
        let mut extra_args = vec!["--since", s(&self.last), "--changed-ranges", s(&self.delta), "--stat", "--verbose"];
        extra_args.extend(extra);
        basyn(&action(Dir::Push, "sync", source, &self.receiver, &extra_args))
    }

    fn sync(&self) -> Run {
        self.sync_from(&self.tonight, &[])
    }
}

/// Last night's snapshot (random data) and tonight's: the same but in [`CHANGED_BLOCKS`].
fn snapshots(last: &Path, tonight: &Path) {
    let mut data = random_image(last, 131, SIZE);
    for b in CHANGED_BLOCKS {
        data[b * BLOCK + 17] ^= 0x5a;
    }
    write(tonight, &data);
}

/// Real `thin_delta` output for two thin devices of one pool: device 1 (last night)
/// maps every block of the image, device 2 (tonight) shares them except `changed`,
/// which it remapped to new data blocks (copy-on-write).
fn thin_delta(dir: &Path, changed: &[usize]) -> String {
    let blocks = SIZE / BLOCK;
    let mut xml = format!(
        "<superblock uuid=\"\" time=\"1\" transaction=\"2\" flags=\"0\" version=\"2\" data_block_size=\"{BLOCK_SECTORS}\" nr_data_blocks=\"{}\">\n",
        2 * blocks
    );
    let _ = writeln!(
        xml,
        "  <device dev_id=\"1\" mapped_blocks=\"{blocks}\" transaction=\"0\" creation_time=\"0\" snap_time=\"1\">"
    );
    let _ = writeln!(xml, "    <range_mapping origin_begin=\"0\" data_begin=\"0\" length=\"{blocks}\" time=\"0\"/>");
    xml.push_str("  </device>\n");
    let _ = writeln!(
        xml,
        "  <device dev_id=\"2\" mapped_blocks=\"{blocks}\" transaction=\"1\" creation_time=\"1\" snap_time=\"1\">"
    );
    for b in 0..blocks {
        let data = match changed.iter().position(|&c| c == b) {
            Some(k) => blocks + k,
            None => b,
        };
        let _ = writeln!(
            xml,
            "    <single_mapping origin_block=\"{b}\" data_block=\"{data}\" time=\"{}\"/>",
            usize::from(data != b)
        );
    }
    xml.push_str("  </device>\n</superblock>\n");
    let (input, meta) = (dir.join("pool.xml"), dir.join("pool-metadata.bin"));
    fs::write(&input, xml).unwrap();
    fs::File::create(&meta).unwrap().set_len(8 * MIB as u64).unwrap();
    tool("thin_restore", &["-i", s(&input), "-o", s(&meta)]).unwrap();
    tool("thin_delta", &["--snap1", "1", "--snap2", "2", s(&meta)]).unwrap()
}

fn sectors_read(dev: &Path) -> u64 {
    let name = dev.file_name().unwrap().to_string_lossy().into_owned();
    let text = fs::read_to_string(format!("/sys/class/block/{name}/stat")).unwrap();
    text.split_whitespace().nth(2).unwrap().parse().unwrap()
}

fn said(r: &Run, text: &str) -> bool {
    r.stdout.contains(text) || r.stderr.contains(text)
}

#[test]
fn only_the_changed_ranges_of_the_source_are_read_and_the_devices_end_identical() {
    let Some(n) = Nightly::new() else { return };
    let xml = fs::read_to_string(&n.delta).unwrap();
    assert!(xml.contains("<different begin=\"300\" length=\"4\"/>"), "thin_delta said something else:\n{xml}");
    let r = n.sync();
    r.ok();
    assert_same(&n.tonight, &n.receiver);
    let stat = r.stat();
    let read = stat.local_read;
    // The changed blocks, to digest them, and each one's differing 16 KiB piece again,
    // to send it.
    assert_eq!(read, CHANGED_BYTES + 6 * 16384, "bytes read of the source{r:?}");
    assert_eq!(stat.remote_read, 0, "the receiver's fresh state should answer for it{r:?}");
    assert_eq!(stat.differing, CHANGED_LEAVES, "{r:?}");
    assert!(said(&r, &format!("{CHANGED_LEAVES} of 32 blocks changed")), "{r:?}");
    // Tonight's snapshot now has a state of its own: tomorrow it is the --since.
    let again = basyn(&action(Dir::Push, "sync", &n.tonight, &n.receiver, &["--stat"]));
    again.ok();
    assert!(again.stat().read_nothing(), "tonight's state was not saved fresh{again:?}");
}

#[test]
fn a_loop_device_over_tonights_snapshot_reads_only_the_changed_sectors() {
    let Some(n) = Nightly::new() else { return };
    let Some(dev) = loop_dev_ro(&n.tonight) else { return };
    flushbufs(dev.path());
    let before = sectors_read(dev.path());
    let r = n.sync_from(dev.path(), &[]);
    r.ok();
    let read = (sectors_read(dev.path()) - before) * 512;
    // The differing pieces read again to be sent come from the page cache, or not.
    assert!(
        (CHANGED_BYTES..=CHANGED_BYTES + 6 * 16384).contains(&read),
        "{read} bytes read from {} for {CHANGED_BYTES} bytes changed{r:?}",
        dev.s()
    );
    assert_same(&n.tonight, &n.receiver);
}

/// The premise basyn cannot check is the user's: a write into tonight's snapshot that
/// the pool's metadata does not report is not seen. The same write into the receiver is
/// caught by the receiver's stamp, and the run falls back to a plain SYNC.
#[test]
fn a_change_the_metadata_does_not_report_is_not_seen_but_one_in_the_receiver_is() {
    let Some(n) = Nightly::new() else { return };
    let hidden = 20 * 2 * MIB as u64 + 4096;
    poke(&n.tonight, hidden, b"behind the pool's back");
    n.sync().ok();
    let (tonight, backup, last) = (read(&n.tonight), read(&n.receiver), read(&n.last));
    let at = hidden as usize..hidden as usize + 22;
    assert_eq!(
        backup[at.clone()],
        last[at.clone()],
        "the unreported change was synced: the premise is not what the docs say"
    );
    assert_ne!(backup[at.clone()], tonight[at.clone()]);
    assert_eq!(first_difference(&tonight[..at.start], &backup[..at.start]), None);

    let Some(n) = Nightly::new() else { return };
    poke(&n.receiver, hidden, b"written on the backup host");
    let r = n.sync();
    r.ok();
    assert!(said(&r, "the receiver's state is not fresh"), "{r:?}");
    assert!(said(&r, "running a plain SYNC"), "{r:?}");
    assert_same(&n.tonight, &n.receiver);
    assert_eq!(r.stat().local_read, SIZE as u64, "a plain SYNC reads the whole source{r:?}");
}

#[test]
fn each_broken_premise_falls_back_to_a_plain_sync_and_says_why() {
    // A receiver last synced from another snapshot: its root is not last night's.
    let Some(n) = Nightly::new() else { return };
    let other = n.dir.path().join("other.img");
    random_image(&other, 132, SIZE);
    basyn(&action(Dir::Push, "sync", &other, &n.receiver, &[])).ok();
    let r = n.sync();
    r.ok();
    assert!(said(&r, "the receiver does not hold this snapshot"), "{r:?}");
    assert_same(&n.tonight, &n.receiver);

    // Last night's state is gone.
    let Some(n) = Nightly::new() else { return };
    fs::remove_file(state_of(&n.last)).unwrap();
    let r = n.sync();
    r.ok();
    assert!(said(&r, &format!("--since {}: its state", s(&n.last))), "{r:?}");
    assert!(said(&r, "none yet"), "{r:?}");
    assert_same(&n.tonight, &n.receiver);
    assert!(!state_of(&n.last).exists(), "a --since state was written");

    // Last night's snapshot was written after its state was saved.
    let Some(n) = Nightly::new() else { return };
    poke(&n.last, 7, b"x");
    let r = n.sync();
    r.ok();
    assert!(said(&r, "stale"), "{r:?}");
    assert_same(&n.tonight, &n.receiver);

    // Snapshots of different sizes are not of one volume.
    let Some(n) = Nightly::new() else { return };
    let smaller = n.dir.path().join("smaller.img");
    fs::copy(&n.last, &smaller).unwrap();
    fs::OpenOptions::new().write(true).open(&smaller).unwrap().set_len(SIZE as u64 - MIB as u64).unwrap();
    let args = action(
        Dir::Push,
        "sync",
        &n.tonight,
        &n.receiver,
        &["--since", s(&smaller), "--changed-ranges", s(&n.delta), "--verbose", "--stat"],
    );
    let r = basyn(&args);
    r.ok();
    assert!(said(&r, "differs from the source's"), "{r:?}");
    assert_eq!(r.stat().local_read, SIZE as u64, "{r:?}");
    assert_same(&n.tonight, &n.receiver);
}

/// A malformed, truncated or hostile list is refused with one line naming it, exit 1,
/// and neither the receiver nor any state is written.
#[test]
fn a_bad_changed_ranges_file_is_refused_and_nothing_is_written() {
    let Some(n) = Nightly::new() else { return };
    let xml = fs::read_to_string(&n.delta).unwrap();
    let bad = n.dir.path().join("bad");
    let states: Vec<PathBuf> = [&n.last, &n.tonight, &n.receiver].iter().map(|p| state_of(p)).collect();
    let before: Vec<Option<Vec<u8>>> = states.iter().map(|p| fs::read(p).ok()).collect();
    let receiver = read(&n.receiver);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (xml.as_bytes()[..xml.len() / 2].to_vec(), "cut short"),
        (xml.as_bytes()[..xml.rfind("</diff>").unwrap()].to_vec(), "ends before </superblock>"),
        (format!("<!DOCTYPE x [<!ENTITY a \"a\">]>{xml}").into_bytes(), "DOCTYPE"),
        (xml.replacen("<same", "<evil/><same", 1).into_bytes(), "unexpected element <evil>"),
        (xml.replace("begin=\"1000\"", "begin=\"99999\"").into_bytes(), "past the end of the device"),
        (b"0 65536\n4194304\n".to_vec(), "line 2"),
        (b"\x00\x01\x02".to_vec(), "not OFFSET LENGTH"),
    ];
    for (content, why) in cases {
        fs::write(&bad, &content).unwrap();
        let args =
            action(Dir::Push, "sync", &n.tonight, &n.receiver, &["--since", s(&n.last), "--changed-ranges", s(&bad)]);
        let r = basyn(&args);
        r.fails(1, &[&format!("--changed-ranges {}", s(&bad)), why]);
        assert_content(&n.receiver, &receiver, "the receiver after a refused list");
        let after: Vec<Option<Vec<u8>>> = states.iter().map(|p| fs::read(p).ok()).collect();
        assert!(after == before, "a state was written by a refused run ({why})");
    }
    let missing = n.dir.path().join("missing.xml");
    let args =
        action(Dir::Push, "sync", &n.tonight, &n.receiver, &["--since", s(&n.last), "--changed-ranges", s(&missing)]);
    basyn(&args).fails(1, &["cannot be opened"]);
}

#[test]
fn since_takes_only_a_push_sync_of_another_existing_device() {
    let Some(n) = Nightly::new() else { return };
    let since = ["--since", s(&n.last), "--changed-ranges", s(&n.delta)];
    basyn(&action(Dir::Push, "copy", &n.tonight, &n.receiver, &since)).fails(1, &["--since needs -a PUSH -m SYNC"]);
    basyn(&action(Dir::Pull, "sync", &n.tonight, &n.receiver, &since)).fails(1, &["run -a PUSH"]);
    let mut bitmap = since.to_vec();
    let bm = n.dir.path().join("bm");
    bitmap.extend(["-b", s(&bm)]);
    basyn(&action(Dir::Push, "sync", &n.tonight, &n.receiver, &bitmap)).fails(1, &["--since does not take -b"]);
    basyn(&action(Dir::Push, "sync", &n.tonight, &n.receiver, &["--changed-ranges", s(&n.delta)]))
        .fails(1, &["required arguments were not provided --since"]);
    let gone = n.dir.path().join("gone.img");
    basyn(&action(Dir::Push, "sync", &n.tonight, &n.receiver, &["--since", s(&gone), "--changed-ranges", s(&n.delta)]))
        .fails(1, &[&format!("--since {}", s(&gone)), "no such"]);
    basyn(&action(
        Dir::Push,
        "sync",
        &n.tonight,
        &n.receiver,
        &["--since", s(&n.tonight), "--changed-ranges", s(&n.delta)],
    ))
    .fails(1, &["is the source itself"]);
}

/// `--dry-run --since` reads what the run would read, and says what it would send.
#[test]
fn a_dry_run_since_the_older_snapshot_reads_only_the_changes() {
    let Some(n) = Nightly::new() else { return };
    let r = n.sync_from(&n.tonight, &["-n"]);
    r.code(3);
    assert_eq!(r.stat().local_read, CHANGED_BYTES, "{r:?}");
    assert!(!same_stream(&n.tonight, &n.receiver), "a dry run wrote the receiver");
}

/// Over SSH, the nightly case: only the changed blocks are read from the source, the
/// receiver answers from its state, and only the differing pieces cross the link.
#[test]
fn over_ssh_only_the_changes_are_read_and_only_their_differences_sent() {
    if !require_tool("thin_restore") || !require_tool("thin_delta") {
        return;
    }
    let Some(sshd) = Sshd::start() else { return };
    let (last, tonight, receiver) = (sshd.local("last.img"), sshd.local("tonight.img"), sshd.remote("backup.img"));
    snapshots(&last, &tonight);
    let push = |source: &Path, extra: &[&str]| {
        let mut args = sv(&["-l", s(source), "-r", s(&receiver), "-h", ALIAS, "-a", "push", "-m", "sync"]);
        args.extend(sv(extra));
        sshd.basyn(&args)
    };
    push(&last, &[]).ok();
    let delta = sshd.local("delta.xml");
    fs::write(&delta, thin_delta(last.parent().unwrap(), &CHANGED_BLOCKS)).unwrap();
    let r = push(&tonight, &["--since", s(&last), "--changed-ranges", s(&delta), "--stat", "--verbose"]);
    r.ok();
    assert_same(&tonight, &receiver);
    let stat = r.stat();
    assert!(
        (CHANGED_BYTES..=CHANGED_BYTES + 6 * 16384).contains(&stat.local_read),
        "{} bytes read of the source{r:?}",
        stat.local_read
    );
    // The receiver reads only around the differing pieces, to refine them to 4 KiB.
    assert!(stat.remote_read <= 2 * 6 * 16384, "the receiver was read beyond the differing pieces{r:?}");
    assert!(stat.tx < 256 * 1024, "{} bytes sent for 6 changed bytes{r:?}", stat.tx);
}

/// Without `--changed-ranges`, basyn asks the thin pool: `lvs` first. Image files are
/// not logical volumes, so the premise fails, `--verbose` says so with the command it
/// ran, and the run is a plain SYNC that ends identical.
#[test]
fn without_changed_ranges_image_files_are_not_thin_volumes_and_the_sync_reads_everything() {
    if !require_tool("lvs") {
        return;
    }
    let Some(n) = Nightly::new() else { return };
    let args = action(Dir::Push, "sync", &n.tonight, &n.receiver, &["--since", s(&n.last), "--stat", "--verbose"]);
    let r = basyn(&args);
    r.ok();
    assert!(said(&r, "running lvs --reportformat json"), "{r:?}");
    assert!(said(&r, "running a plain SYNC"), "{r:?}");
    assert!(!said(&r, "reserve_metadata_snap"), "a pool was touched for image files{r:?}");
    assert_eq!(r.stat().local_read, SIZE as u64, "{r:?}");
    assert_same(&n.tonight, &n.receiver);
}
