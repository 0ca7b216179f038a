//! The live path of `--since`: when the source and the older snapshot are both thin
//! volumes (LVM thin LVs) of one pool, the pool's metadata says which blocks differ
//! between them, and `thin_delta` prints that as XML. This module finds out whether the
//! premise holds and, if it does, runs `thin_delta` on the live pool; parsing the XML and
//! syncing are elsewhere.
//!
//! What runs, in order (each command line goes to `say` first, for `--verbose`):
//!
//! ```text
//! lvs --reportformat json --units b --nosuffix -o vg_name,...,thin_id SINCE   (and SOURCE)
//! dmsetup table VG-SOURCE                  the source is active, with lvs's thin id
//! dmsetup table VG-POOL-tpool              metadata device and data block size
//! dmsetup message VG-POOL-tpool 0 reserve_metadata_snap
//! dmsetup status VG-POOL-tpool             the held metadata root
//! thin_delta --metadata-snap=ROOT --snap1 SINCE_ID --snap2 SOURCE_ID /dev/mapper/VG-POOL_tmeta
//! dmsetup message VG-POOL-tpool 0 release_metadata_snap
//! ```
//!
//! Names in `dmsetup` are LVM's device-mapper names ([`dm_name`]). The older snapshot need
//! not be active (LVM thin snapshots skip activation by default): its thin id comes from
//! `lvs`, and `thin_delta` reads only the pool's metadata.
//!
//! The metadata snapshot is a pool-wide resource that only one tool can hold, so it is
//! released on every path once reserved: by a guard's `Drop` on an early return
//! or a panic, and explicitly otherwise so that a failed release is reported. basyn's
//! SIGINT/SIGTERM handler calls `_exit`, which would skip both; while the snapshot is
//! held, SIGINT and SIGTERM are blocked in the calling thread (`pthread_sigmask`) and the
//! old mask comes back after the release, when a pending signal is delivered and basyn
//! exits as usual. That is enough only because this runs before basyn starts any other
//! thread: a process-directed signal would otherwise go to a thread that does not block
//! it. Children start with an empty mask (the standard library resets it); `dmsetup`
//! runs in a process group of its own, so a Ctrl-C at the terminal cannot kill the
//! release half-way, while `thin_delta` stays in basyn's, so a long one stops at once.
//!
//! Everything that reads command output is a pure function of [`lvm`] ([`parse_lvs`],
//! [`parse_thin_table`], [`parse_pool_table`], [`parse_pool_status`], [`premise`]), tested
//! on real output in `fixtures/lvm/` (its README says where each file came from); the
//! commands go through a [`Runner`], replaced by a recording fake in the tests.

pub mod lvm;

pub use lvm::DevNo;

use std::path::Path;
use std::process::{Command, Stdio};

use lvm::{
    LVS_FIELDS, Lv, PoolStatus, dm_name, parse_lvs, parse_pool_status, parse_pool_table, parse_thin_table, premise,
    thin_volume,
};

/// What the live pool says: thin_delta's XML and the thin device ids it compared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveDelta {
    /// `thin_delta`'s standard output.
    pub xml: String,
    /// Thin device id of the older snapshot (`--snap1`, the XML's `left`).
    pub since_id: u64,
    /// Thin device id of the source (`--snap2`, the XML's `right`).
    pub source_id: u64,
    /// The pool's data block size in 512-byte sectors: the unit of the XML's ranges.
    pub block_sectors: u64,
}

/// Why the live path cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ThinError {
    /// The premise does not hold (not a thin LV, different pools, different sizes, lvs
    /// says no such LV...): basyn falls back to a full SYNC and says this in --verbose.
    #[error("{0}")]
    Premise(String),
    /// A command failed or printed what we cannot parse (the message names the command
    /// and its stderr's first line).
    #[error("{0}")]
    Failed(String),
}

/// How a command ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ran {
    /// Exit code; `None` if a signal ended it.
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Ran {
    /// Exited with status 0.
    fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Runs the commands of the live path; [`LocalCommands`] for real, a fake in tests.
pub trait Runner {
    /// Runs `argv` to completion; `Err` says why it could not be started.
    fn run(&mut self, argv: &[&str]) -> Result<Ran, String>;
    /// The device number of the block device at `path`, if it is one.
    fn device_number(&mut self, path: &str) -> Option<DevNo>;
}

/// Runs the commands on this machine: `LC_ALL=C`, standard input `/dev/null`, output
/// captured, `dmsetup` in a process group of its own (see the module doc).
#[derive(Debug, Default)]
pub struct LocalCommands;

impl Runner for LocalCommands {
    fn run(&mut self, argv: &[&str]) -> Result<Ran, String> {
        use std::os::unix::process::CommandExt;
        let (program, args) = argv.split_first().ok_or("empty command")?;
        let mut command = Command::new(program);
        command
            .args(args)
            .env("LC_ALL", "C")
            // lvs complains on stderr about each descriptor basyn has open.
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .stdin(Stdio::null());
        if *program == "dmsetup" {
            command.process_group(0);
        }
        let out = command.output().map_err(|e| crate::device::describe_io(&e))?;
        Ok(Ran {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    fn device_number(&mut self, path: &str) -> Option<DevNo> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let meta = std::fs::metadata(path).ok()?;
        meta.file_type().is_block_device().then(|| crate::sysfs::major_minor(meta.rdev()))
    }
}

/// A command line as `say` shows it.
fn command_line(argv: &[&str]) -> String {
    argv.join(" ")
}

/// The first non-empty line of `text`, trimmed.
fn first_line(text: &str) -> &str {
    text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("(nothing on stderr)")
}

/// "`CMD` failed (exit status N): FIRST STDERR LINE".
fn failure(argv: &[&str], ran: &Ran) -> String {
    let how = match ran.code {
        Some(code) => format!("exit status {code}"),
        None => "killed by a signal".to_string(),
    };
    format!("`{}` failed ({how}): {}", command_line(argv), first_line(&ran.stderr))
}

/// Runs `argv` after showing it, and wants it to succeed.
fn run_ok(runner: &mut dyn Runner, say: &mut dyn FnMut(&str), argv: &[&str]) -> Result<Ran, ThinError> {
    say(&command_line(argv));
    let ran = runner.run(argv).map_err(|why| ThinError::Failed(format!("cannot run {}: {why}", argv[0])))?;
    if ran.success() { Ok(ran) } else { Err(ThinError::Failed(failure(argv, &ran))) }
}

/// What `lvs` prints on stderr for a path that is no LV: a file, another block device
/// (taken for a volume group name), a missing LV.
const NOT_AN_LV: [&str; 3] = ["Invalid path for Logical Volume", "not found", "Failed to find logical volume"];

/// The one LV at `path`.
fn find_lv(runner: &mut dyn Runner, say: &mut dyn FnMut(&str), side: &str, path: &Path) -> Result<Lv, ThinError> {
    let Some(path_text) = path.to_str() else {
        return Err(ThinError::Premise(format!("{side} {}: the path is not UTF-8", path.display())));
    };
    let argv = ["lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", LVS_FIELDS, path_text];
    say(&command_line(&argv));
    let ran = runner.run(&argv).map_err(|why| {
        ThinError::Premise(format!("cannot run lvs ({why}), so {side} {path_text} is not an LVM thin volume here"))
    })?;
    if !ran.success() {
        let message = failure(&argv, &ran);
        return if NOT_AN_LV.iter().any(|m| ran.stderr.contains(m)) {
            Err(ThinError::Premise(format!("{side} {path_text} is not a logical volume: {}", first_line(&ran.stderr))))
        } else {
            Err(ThinError::Failed(message))
        };
    }
    let lvs = parse_lvs(&ran.stdout).map_err(|e| ThinError::Failed(format!("`lvs ... {path_text}`: {e}")))?;
    match <[Lv; 1]>::try_from(lvs) {
        Ok([lv]) => Ok(lv),
        Err(lvs) => {
            Err(ThinError::Premise(format!("{side} {path_text}: lvs reports {} logical volumes, not one", lvs.len())))
        }
    }
}

/// The thin id `lvs` gave a thin volume.
fn thin_id(side: &str, lv: &Lv) -> Result<u64, ThinError> {
    lv.thin_id.ok_or_else(|| ThinError::Failed(format!("lvs reports no thin_id for {side} {lv}")))
}

/// What `dmsetup` prints on stderr when asked about a device that does not exist: the
/// table ioctl's ENXIO, or `dmsetup info`'s own words.
const NO_SUCH_DEVICE: [&str; 2] = ["No such device or address", "Device does not exist"];

/// Finds both devices' thin volumes and pool, checks the premise, and runs thin_delta
/// on a reserved metadata snapshot of the live pool, releasing it on every path.
/// `say` gets each command line before it runs (shown in --verbose).
pub fn live_delta(since: &Path, source: &Path, say: &mut dyn FnMut(&str)) -> Result<LiveDelta, ThinError> {
    live_delta_with(&mut LocalCommands, since, source, say)
}

/// [`live_delta`] with the commands run by `runner`.
pub fn live_delta_with(
    runner: &mut dyn Runner,
    since: &Path,
    source: &Path,
    say: &mut dyn FnMut(&str),
) -> Result<LiveDelta, ThinError> {
    let since_lv = find_lv(runner, say, "--since", since)?;
    thin_volume("--since", &since_lv).map_err(ThinError::Premise)?;
    let source_lv = find_lv(runner, say, "the source", source)?;
    premise(&since_lv, &source_lv).map_err(ThinError::Premise)?;
    let since_id = thin_id("--since", &since_lv)?;
    let source_id = thin_id("the source", &source_lv)?;

    // The source is read, so it is active: its kernel table must map lvs's thin id.
    let source_dm = dm_name(&source_lv.vg, &source_lv.name);
    let argv = ["dmsetup", "table", source_dm.as_str()];
    say(&command_line(&argv));
    let ran = runner.run(&argv).map_err(|why| ThinError::Failed(format!("cannot run dmsetup: {why}")))?;
    if !ran.success() {
        return Err(if NO_SUCH_DEVICE.iter().any(|m| ran.stderr.contains(m)) {
            ThinError::Premise(format!("the source {source_lv} is not active"))
        } else {
            ThinError::Failed(failure(&argv, &ran))
        });
    }
    let thin =
        parse_thin_table(&ran.stdout).map_err(|e| ThinError::Failed(format!("`dmsetup table {source_dm}`: {e}")))?;
    if thin.dev_id != source_id {
        return Err(ThinError::Failed(format!(
            "the source {source_lv}: lvs says thin id {source_id}, its device-mapper table {}",
            thin.dev_id
        )));
    }
    if let Some(origin) = &thin.external_origin {
        return Err(ThinError::Premise(format!(
            "the source {source_lv} has an external origin ({origin}): basyn does not diff such volumes"
        )));
    }

    let tpool = format!("{}-tpool", dm_name(&source_lv.vg, &source_lv.pool));
    let tpool_path = format!("/dev/mapper/{tpool}");
    match runner.device_number(&tpool_path) {
        Some(dev) if dev == thin.pool => {}
        found => {
            return Err(ThinError::Failed(format!(
                "the source {source_lv} maps pool device {}, but {tpool_path} is {}",
                show_dev(Some(thin.pool)),
                show_dev(found)
            )));
        }
    }
    let ran = run_ok(runner, say, &["dmsetup", "table", &tpool])?;
    let pool = parse_pool_table(&ran.stdout).map_err(|e| ThinError::Failed(format!("`dmsetup table {tpool}`: {e}")))?;
    let metadata = metadata_path(runner, &source_lv, pool.metadata)?;

    let mut held = Reservation::take(runner, say, &tpool)?;
    let delta = held.delta(since_id, source_id, &metadata);
    let released = held.release();
    let xml = match (delta, released) {
        (Ok(xml), Ok(())) => xml,
        (Err(e), Ok(())) | (Ok(_), Err(e)) => return Err(e),
        (Err(ThinError::Failed(first) | ThinError::Premise(first)), Err(then)) => {
            return Err(ThinError::Failed(format!("{first}; then {then}")));
        }
    };
    Ok(LiveDelta { xml, since_id, source_id, block_sectors: pool.block_sectors })
}

/// `M:m`, or what the path is instead.
fn show_dev(dev: Option<DevNo>) -> String {
    dev.map_or_else(|| "no block device".to_string(), |(major, minor)| format!("{major}:{minor}"))
}

/// A path to the pool's metadata device `dev`: LVM's `/dev/mapper/VG-POOL_tmeta`, or
/// udev's `/dev/block/M:m`, whichever is that device.
fn metadata_path(runner: &mut dyn Runner, lv: &Lv, dev: DevNo) -> Result<String, ThinError> {
    let candidates = [
        format!("/dev/mapper/{}", dm_name(&lv.vg, &format!("{}_tmeta", lv.pool))),
        format!("/dev/block/{}:{}", dev.0, dev.1),
    ];
    let found = candidates.iter().find(|path| runner.device_number(path) == Some(dev));
    found.cloned().ok_or_else(|| {
        ThinError::Failed(format!(
            "no device node for the metadata device {} of pool {}/{} (looked at {})",
            show_dev(Some(dev)),
            lv.vg,
            lv.pool,
            candidates.join(" and ")
        ))
    })
}

/// SIGINT and SIGTERM blocked in this thread; the old mask comes back on drop.
struct SignalsBlocked {
    old: libc::sigset_t,
}

impl SignalsBlocked {
    /// Adds SIGINT and SIGTERM to this thread's mask.
    fn block() -> Result<SignalsBlocked, ThinError> {
        // SAFETY: sigset_t is plain data that sigemptyset initialises; pthread_sigmask
        // only reads `set` and writes `old`, both valid for the call.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            let mut old: libc::sigset_t = std::mem::zeroed();
            match libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old) {
                0 => Ok(SignalsBlocked { old }),
                e => Err(ThinError::Failed(format!(
                    "cannot block SIGINT and SIGTERM: {}",
                    std::io::Error::from_raw_os_error(e)
                ))),
            }
        }
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: restores a mask pthread_sigmask returned; a signal that came meanwhile
        // is delivered now.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut());
        }
    }
}

/// The pool's metadata snapshot, reserved by us: released when dropped, if
/// [`Reservation::release`] did not already. Signals stay blocked until then.
struct Reservation<'a> {
    runner: &'a mut dyn Runner,
    say: &'a mut dyn FnMut(&str),
    tpool: String,
    released: bool,
    // Dropped after `drop` has released the snapshot.
    _signals: SignalsBlocked,
}

impl<'a> Reservation<'a> {
    /// Blocks the signals and reserves the metadata snapshot of pool `tpool`.
    fn take(
        runner: &'a mut dyn Runner,
        say: &'a mut dyn FnMut(&str),
        tpool: &str,
    ) -> Result<Reservation<'a>, ThinError> {
        let signals = SignalsBlocked::block()?;
        let argv = ["dmsetup", "message", tpool, "0", "reserve_metadata_snap"];
        say(&command_line(&argv));
        let ran = runner.run(&argv).map_err(|why| ThinError::Failed(format!("cannot run dmsetup: {why}")))?;
        if !ran.success() {
            // Not ours to release.
            return Err(ThinError::Failed(if ran.stderr.contains("Device or resource busy") {
                format!(
                    "pool {tpool} already has a metadata snapshot reserved, by another tool (a backup, \
                     thin_ls -m, a crashed run): basyn leaves it alone; once nothing uses it, \
                     `dmsetup message {tpool} 0 release_metadata_snap` frees it"
                )
            } else {
                failure(&argv, &ran)
            }));
        }
        Ok(Reservation { runner, say, tpool: tpool.to_string(), released: false, _signals: signals })
    }

    /// [`run_ok`] while the snapshot is held.
    fn run_ok(&mut self, argv: &[&str]) -> Result<Ran, ThinError> {
        run_ok(self.runner, self.say, argv)
    }

    /// thin_delta of thin devices `since` and `source` on the held snapshot of `metadata`.
    fn delta(&mut self, since: u64, source: u64, metadata: &str) -> Result<String, ThinError> {
        let tpool = self.tpool.clone();
        let ran = self.run_ok(&["dmsetup", "status", &tpool])?;
        let root = match parse_pool_status(&ran.stdout) {
            Ok(PoolStatus::Running { held_root: Some(root), .. }) => root,
            Ok(PoolStatus::Running { held_root: None, .. }) => {
                return Err(ThinError::Failed(format!("pool {tpool} shows no held metadata root after reserving one")));
            }
            Ok(PoolStatus::Failed(word)) => return Err(ThinError::Failed(format!("pool {tpool} has failed ({word})"))),
            Err(e) => return Err(ThinError::Failed(format!("`dmsetup status {tpool}`: {e}"))),
        };
        // `-m ROOT` would take ROOT for the device: the block is an optional argument.
        let snap = format!("--metadata-snap={root}");
        let (since, source) = (since.to_string(), source.to_string());
        let argv = ["thin_delta", snap.as_str(), "--snap1", since.as_str(), "--snap2", source.as_str(), metadata];
        let ran = self.run_ok(&argv)?;
        if !ran.stdout.contains("<diff") {
            return Err(ThinError::Failed(format!("`{}` printed no <diff>", command_line(&argv))));
        }
        Ok(ran.stdout)
    }

    /// Releases the snapshot, saying how to do it by hand if that fails.
    fn release(mut self) -> Result<(), ThinError> {
        self.release_once()
    }

    /// Sends `release_metadata_snap`, once: whatever it answers, `drop` does not try again.
    fn release_once(&mut self) -> Result<(), ThinError> {
        self.released = true;
        let tpool = self.tpool.clone();
        let argv = ["dmsetup", "message", tpool.as_str(), "0", "release_metadata_snap"];
        self.run_ok(&argv).map(drop).map_err(|e| {
            ThinError::Failed(format!(
                "releasing the metadata snapshot failed: {e}; run `{}` once nothing uses it",
                command_line(&argv)
            ))
        })
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.released {
            let _ = self.release_once();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    macro_rules! fixture {
        ($name:literal) => {
            include_str!(concat!("../../fixtures/lvm/", $name))
        };
    }

    // ---------------------------------------------------------------------------------
    // live_delta end to end, with a fake runner replaying fixtures
    // ---------------------------------------------------------------------------------

    const SINCE: &str = "/dev/basynthinvg/root-snap1";
    const SOURCE: &str = "/dev/mapper/basynthinvg-root--snap2";
    const TPOOL: &str = "basynthinvg-pool0-tpool";
    const TMETA: &str = "/dev/mapper/basynthinvg-pool0_tmeta";

    fn lvs_line(path: &str) -> String {
        format!("lvs --reportformat json --units b --nosuffix -o {LVS_FIELDS} {path}")
    }
    const SOURCE_TABLE: &str = "dmsetup table basynthinvg-root--snap2";
    const POOL_TABLE: &str = "dmsetup table basynthinvg-pool0-tpool";
    const RESERVE: &str = "dmsetup message basynthinvg-pool0-tpool 0 reserve_metadata_snap";
    const STATUS: &str = "dmsetup status basynthinvg-pool0-tpool";
    const DELTA: &str = "thin_delta --metadata-snap=2000 --snap1 2 --snap2 3 /dev/mapper/basynthinvg-pool0_tmeta";
    const RELEASE: &str = "dmsetup message basynthinvg-pool0-tpool 0 release_metadata_snap";

    fn ok(stdout: &str) -> Ran {
        Ran { code: Some(0), stdout: stdout.into(), stderr: String::new() }
    }

    fn failed(code: i32, stderr: &str) -> Ran {
        Ran { code: Some(code), stdout: String::new(), stderr: stderr.into() }
    }

    /// Is SIGINT blocked in this thread?
    fn sigint_blocked() -> bool {
        // SAFETY: queries this thread's mask into a local set.
        unsafe {
            let mut current: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut current);
            libc::sigismember(&current, libc::SIGINT) == 1
        }
    }

    /// Replays a reply per command line (the last one set wins) and records what ran,
    /// with whether SIGINT was blocked then.
    struct Fake {
        replies: Vec<(String, Ran)>,
        devices: Vec<(String, DevNo)>,
        ran: Vec<(String, bool)>,
        panic_on: Option<String>,
    }

    impl Fake {
        /// Both snapshots found, the source active, the pool sound.
        fn pair() -> Fake {
            let mut fake = Fake { replies: vec![], devices: vec![], ran: vec![], panic_on: None };
            fake.reply(&lvs_line(SINCE), ok(fixture!("lvs-since-root-snap1.json")));
            fake.reply(&lvs_line(SOURCE), ok(fixture!("lvs-source-root-snap2.json")));
            fake.reply(SOURCE_TABLE, ok(fixture!("dmsetup-table-thin-root-snap2.txt")));
            fake.reply(POOL_TABLE, ok(fixture!("dmsetup-table-pool.txt")));
            fake.reply(RESERVE, ok(""));
            fake.reply(STATUS, ok(fixture!("dmsetup-status-pool-held.txt")));
            fake.reply(DELTA, ok(fixture!("thin_delta.xml")));
            fake.reply(RELEASE, ok(""));
            fake.devices.push((format!("/dev/mapper/{TPOOL}"), (253, 5)));
            fake.devices.push((TMETA.into(), (253, 3)));
            fake
        }

        fn reply(&mut self, line: &str, ran: Ran) {
            self.replies.push((line.into(), ran));
        }

        fn lines(&self) -> Vec<&str> {
            self.ran.iter().map(|(line, _)| line.as_str()).collect()
        }

        fn live_delta(&mut self, since: &str, source: &str) -> (Result<LiveDelta, ThinError>, Vec<String>) {
            self.ran.clear();
            let mut said = vec![];
            let result =
                live_delta_with(self, Path::new(since), Path::new(source), &mut |line| said.push(line.to_string()));
            assert_eq!(said, self.lines(), "say gets each command line before it runs");
            assert!(!sigint_blocked(), "the signal mask is restored");
            (result, said)
        }
    }

    impl Runner for Fake {
        fn run(&mut self, argv: &[&str]) -> Result<Ran, String> {
            let line = argv.join(" ");
            self.ran.push((line.clone(), sigint_blocked()));
            if self.panic_on.as_deref() == Some(line.as_str()) {
                panic!("the fake panics on {line}");
            }
            let reply = self.replies.iter().rev().find(|(l, _)| *l == line);
            reply.map(|(_, ran)| ran.clone()).ok_or_else(|| format!("no reply for {line}"))
        }

        fn device_number(&mut self, path: &str) -> Option<DevNo> {
            self.devices.iter().find(|(p, _)| p == path).map(|(_, dev)| *dev)
        }
    }

    #[test]
    fn two_thin_snapshots_give_thin_deltas_xml_from_the_held_metadata_root() {
        let mut fake = Fake::pair();
        let (result, _) = fake.live_delta(SINCE, SOURCE);
        let lvs = (lvs_line(SINCE), lvs_line(SOURCE));
        let all = [&lvs.0, &lvs.1, SOURCE_TABLE, POOL_TABLE, RESERVE, STATUS, DELTA, RELEASE];
        assert_eq!(fake.lines(), all);
        assert_eq!(
            result,
            Ok(LiveDelta { xml: fixture!("thin_delta.xml").into(), since_id: 2, source_id: 3, block_sectors: 512 })
        );
        let blocked: Vec<bool> = fake.ran.iter().map(|(_, blocked)| *blocked).collect();
        assert_eq!(
            blocked,
            [false, false, false, false, true, true, true, true],
            "signals blocked from reserve to release"
        );
    }

    #[test]
    fn the_metadata_snapshot_is_released_when_thin_delta_fails() {
        let mut fake = Fake::pair();
        fake.reply(DELTA, failed(1, fixture!("thin_delta-wrong-root.stderr")));
        let (result, _) = fake.live_delta(SINCE, SOURCE);
        assert_eq!(
            result,
            Err(ThinError::Failed(format!(
                "`{DELTA}` failed (exit status 1): metadata snapshot does not match that in superblock"
            )))
        );
        assert_eq!(fake.lines()[4..], [RESERVE, STATUS, DELTA, RELEASE]);
    }

    #[test]
    fn the_metadata_snapshot_is_released_when_thin_delta_cannot_start_or_finds_no_such_thin() {
        let mut fake = Fake::pair();
        fake.replies.retain(|(line, _)| line != DELTA);
        let (result, _) = fake.live_delta(SINCE, SOURCE);
        assert_eq!(result, Err(ThinError::Failed(format!("cannot run thin_delta: no reply for {DELTA}"))));
        assert_eq!(fake.lines().last(), Some(&RELEASE));

        let mut fake = Fake::pair();
        fake.reply(DELTA, failed(1, fixture!("thin_delta-no-such-thin.stderr")));
        let (result, _) = fake.live_delta(SINCE, SOURCE);
        assert!(
            matches!(result, Err(ThinError::Failed(m)) if m.ends_with("Unable to find mapping tree for snap2 (9)"))
        );
        assert_eq!(fake.lines().last(), Some(&RELEASE));
    }

    #[test]
    fn the_metadata_snapshot_is_released_when_the_pool_shows_no_held_root() {
        let mut fake = Fake::pair();
        fake.reply(STATUS, ok(fixture!("dmsetup-status-pool.txt")));
        let (result, _) = fake.live_delta(SINCE, SOURCE);
        assert_eq!(
            result,
            Err(ThinError::Failed(format!("pool {TPOOL} shows no held metadata root after reserving one")))
        );
        assert_eq!(fake.lines()[4..], [RESERVE, STATUS, RELEASE]);
    }

    #[test]
    fn a_panic_while_the_snapshot_is_held_still_releases_it_and_restores_the_mask() {
        let mut fake = Fake::pair();
        fake.panic_on = Some(DELTA.into());
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            live_delta_with(&mut fake, Path::new(SINCE), Path::new(SOURCE), &mut |_| {})
        }));
        assert!(outcome.is_err());
        assert_eq!(fake.lines()[4..], [RESERVE, STATUS, DELTA, RELEASE]);
        assert!(!sigint_blocked());
    }

    #[test]
    fn a_pool_whose_metadata_snapshot_is_held_elsewhere_is_a_clear_failure() {
        let mut fake = Fake::pair();
        fake.reply(RESERVE, failed(1, fixture!("dmsetup-message-busy.stderr")));
        let (result, _) = fake.live_delta(SINCE, SOURCE);
        let Err(ThinError::Failed(message)) = result else { panic!("a failure, not {result:?}") };
        assert!(
            message
                .starts_with("pool basynthinvg-pool0-tpool already has a metadata snapshot reserved, by another tool")
        );
        assert!(message.ends_with("`dmsetup message basynthinvg-pool0-tpool 0 release_metadata_snap` frees it"));
        assert_eq!(fake.lines().last(), Some(&RESERVE), "someone else's snapshot is not released");
    }

    #[test]
    fn a_failed_release_says_how_to_release_by_hand() {
        let mut fake = Fake::pair();
        let busy =
            "device-mapper: message ioctl on basynthinvg-pool0-tpool  failed: Invalid argument\nCommand failed.\n";
        fake.reply(RELEASE, failed(1, busy));
        let (result, _) = fake.live_delta(SINCE, SOURCE);
        assert_eq!(
            result,
            Err(ThinError::Failed(format!(
                "releasing the metadata snapshot failed: `{RELEASE}` failed (exit status 1): device-mapper: message \
                 ioctl on basynthinvg-pool0-tpool  failed: Invalid argument; run `{RELEASE}` once nothing uses it"
            )))
        );
        assert_eq!(fake.lines().iter().filter(|l| **l == RELEASE).count(), 1, "released once, not again on drop");

        fake.reply(DELTA, failed(1, fixture!("thin_delta-wrong-root.stderr")));
        let (result, _) = fake.live_delta(SINCE, SOURCE);
        let Err(ThinError::Failed(both)) = result else { panic!("a failure, not {result:?}") };
        assert!(both.contains("does not match that in superblock; then releasing the metadata snapshot failed"));
    }

    #[test]
    fn a_plain_image_file_is_a_premise_failure_after_one_lvs() {
        let mut fake = Fake::pair();
        let file = "/tmp/plain.img";
        fake.reply(&lvs_line(file), Ran { code: Some(5), ..failed(5, fixture!("lvs-image-file.stderr")) });
        let (result, _) = fake.live_delta(file, SOURCE);
        assert_eq!(
            result,
            Err(ThinError::Premise(
                "--since /tmp/plain.img is not a logical volume: \"/tmp/plain.img\": Invalid path for Logical Volume."
                    .into()
            ))
        );
        assert_eq!(fake.lines(), [lvs_line(file)]);
    }

    #[test]
    fn a_block_device_or_a_missing_lv_as_the_source_is_a_premise_failure() {
        for (path, stderr, says) in [
            ("/dev/loop1", fixture!("lvs-block-device.stderr"), "Volume group \"loop1\" not found"),
            ("/dev/basynthinvg/nosuch", fixture!("lvs-no-such-lv.stderr"), "Failed to find logical volume"),
        ] {
            let mut fake = Fake::pair();
            fake.reply(&lvs_line(path), failed(5, stderr));
            let (result, _) = fake.live_delta(SINCE, path);
            let Err(ThinError::Premise(message)) = result else { panic!("a premise failure, not {result:?}") };
            assert!(message.starts_with(&format!("the source {path} is not a logical volume: ")));
            assert!(message.contains(says), "{message}");
            assert_eq!(fake.lines(), [lvs_line(SINCE), lvs_line(path)]);
        }
    }

    #[test]
    fn lvs_failing_for_another_reason_is_a_failure_not_a_premise() {
        let mut fake = Fake::pair();
        let locked = "  /run/lock/lvm/V_basynthinvg:aux: open failed: Permission denied\n";
        fake.reply(&lvs_line(SINCE), failed(5, locked));
        let (result, _) = fake.live_delta(SINCE, SOURCE);
        assert_eq!(
            result,
            Err(ThinError::Failed(format!(
                "`{}` failed (exit status 5): /run/lock/lvm/V_basynthinvg:aux: open failed: Permission denied",
                lvs_line(SINCE)
            )))
        );
    }

    #[test]
    fn a_linear_lv_as_since_stops_after_its_own_lvs() {
        let mut fake = Fake::pair();
        let plain = "/dev/basynthinvg/plain";
        fake.reply(&lvs_line(plain), ok(fixture!("lvs-linear.json")));
        let (result, _) = fake.live_delta(plain, SOURCE);
        assert_eq!(
            result,
            Err(ThinError::Premise("--since basynthinvg/plain is a linear LV, not a thin volume".into()))
        );
        assert_eq!(fake.lines(), [lvs_line(plain)]);
    }

    #[test]
    fn a_source_in_another_pool_stops_after_the_two_lvs() {
        let mut fake = Fake::pair();
        let other = "/dev/basynthinvg/other";
        fake.reply(&lvs_line(other), ok(fixture!("lvs-thin-other-pool.json")));
        let (result, _) = fake.live_delta(SINCE, other);
        assert!(matches!(result, Err(ThinError::Premise(m)) if m.contains("different thin pools (pool0 and pool1)")));
        assert_eq!(fake.lines(), [lvs_line(SINCE), lvs_line(other)]);
    }

    #[test]
    fn an_inactive_source_is_a_premise_failure_before_the_pool_is_touched() {
        let mut fake = Fake::pair();
        fake.reply(SOURCE_TABLE, failed(1, fixture!("dmsetup-table-inactive.stderr")));
        let (result, _) = fake.live_delta(SINCE, SOURCE);
        assert_eq!(result, Err(ThinError::Premise("the source basynthinvg/root-snap2 is not active".into())));
        assert_eq!(fake.lines().last(), Some(&SOURCE_TABLE));
    }

    #[test]
    fn a_kernel_table_that_disagrees_with_lvs_is_a_failure() {
        let mut fake = Fake::pair();
        fake.reply(SOURCE_TABLE, ok(fixture!("dmsetup-table-thin.txt")));
        let (result, _) = fake.live_delta(SINCE, SOURCE);
        assert_eq!(
            result,
            Err(ThinError::Failed(
                "the source basynthinvg/root-snap2: lvs says thin id 3, its device-mapper table 1".into()
            ))
        );
        assert_eq!(fake.lines().last(), Some(&SOURCE_TABLE));
    }

    #[test]
    fn a_pool_device_other_than_the_one_the_source_maps_is_a_failure() {
        let mut fake = Fake::pair();
        fake.devices[0].1 = (253, 9);
        let (result, _) = fake.live_delta(SINCE, SOURCE);
        assert_eq!(
            result,
            Err(ThinError::Failed(format!(
                "the source basynthinvg/root-snap2 maps pool device 253:5, but /dev/mapper/{TPOOL} is 253:9"
            )))
        );
        assert_eq!(fake.lines().last(), Some(&SOURCE_TABLE));
    }

    #[test]
    fn the_metadata_device_is_found_under_dev_block_when_mapper_lacks_it() {
        let mut fake = Fake::pair();
        fake.devices[1].0 = "/dev/block/253:3".into();
        fake.reply(&DELTA.replace(TMETA, "/dev/block/253:3"), ok(fixture!("thin_delta.xml")));
        let (result, _) = fake.live_delta(SINCE, SOURCE);
        assert!(result.is_ok(), "{result:?}");

        fake.devices.truncate(1);
        let (result, _) = fake.live_delta(SINCE, SOURCE);
        assert_eq!(
            result,
            Err(ThinError::Failed(format!(
                "no device node for the metadata device 253:3 of pool basynthinvg/pool0 (looked at {TMETA} and \
                 /dev/block/253:3)"
            )))
        );
        assert_eq!(fake.lines().last(), Some(&POOL_TABLE), "nothing reserved");
    }

    #[test]
    fn the_real_runner_reports_exit_codes_output_and_programs_that_do_not_exist() {
        let mut local = LocalCommands;
        let ran = local.run(&["sh", "-c", "echo $LC_ALL; echo oops >&2; exit 3"]).expect("sh runs");
        assert_eq!(ran, Ran { code: Some(3), stdout: "C\n".into(), stderr: "oops\n".into() });
        let missing = local.run(&["basyn-no-such-program"]).expect_err("not found");
        assert_eq!(missing, "no such file or directory");
        assert_eq!(local.device_number("/dev/null"), None, "a character device is not a block device");
    }
}
