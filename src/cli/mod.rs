//! Command-line parsing (stage one, clap) and validation into a [`Plan`] (stage two).
//! Nothing here does I/O; bad input fails before any device is touched.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{ArgAction, CommandFactory, Parser, Subcommand, ValueEnum};

mod generate;
mod plan;
pub use generate::{Artifact, generate};
use plan::{index_plan, options, plan, transport};

use crate::compress::Codec;
use crate::engine::{IndexPlan, Params, Plan, Transport};
use crate::hash::HashAlgo;
use crate::protocol::MAX_BLOCK;
use crate::protocol::StateOptions;
use crate::report::StatRequest;

/// Headings of `basyn --help`, in the order of the original's usage.
const DEVICES: &str = "Devices and host";
const ACTION: &str = "Action and mode";
const COMPARISON: &str = "Comparison";
const OUTPUT: &str = "Output";
const STATES: &str = "States";
const SAFETY: &str = "Safety";

/// Raw arguments as clap parses them.
#[derive(Debug, Parser)]
#[command(
    name = "basyn",
    version,
    about = "Copy and synchronize block devices and disk images, locally or over SSH",
    disable_help_flag = true,
    args_conflicts_with_subcommands = true,
    after_help = "Exit codes: 0 done, data identical; 1 usage or precondition error, nothing changed;\n\
                  2 copy/sync error, the receiving device may be partly changed; 3 check found differences."
)]
struct RawArgs {
    /// Print help (`-h` is the host).
    #[arg(long = "help", action = ArgAction::Help)]
    help: Option<bool>,

    /// Local device or image file (e.g. /dev/sda1).
    #[arg(short = 'l', long = "local", value_name = "DEVICE", help_heading = DEVICES)]
    local: Option<PathBuf>,

    /// Remote device or image file (e.g. /dev/vg_backups/copy-sda1).
    #[arg(short = 'r', long = "remote", value_name = "DEVICE", help_heading = DEVICES)]
    remote: Option<PathBuf>,

    #[command(flatten)]
    ssh: SshArgs,

    /// PUSH: local is the source; PULL: remote is the source. Without it nothing is transferred.
    #[arg(short = 'a', long = "action", value_enum, ignore_case = true, help_heading = ACTION)]
    action: Option<ActionArg>,

    /// SYNC: send only differing blocks; COPY: send everything (mandatory with --action).
    #[arg(short = 'm', long = "mode", value_enum, ignore_case = true, help_heading = ACTION)]
    mode: Option<ModeArg>,

    /// Compare both devices after the action (or, without an action, only compare).
    #[arg(long, help_heading = ACTION)]
    recheck: bool,

    /// With an action: compare and report what it would send (blocks, bytes; ranges with
    /// --verbose), writing nothing to the receiver or to any state. Exit 0 if the
    /// devices are identical, 3 if not.
    #[arg(short = 'n', long = "dry-run", conflicts_with = "recheck", help_heading = ACTION)]
    dry_run: bool,

    /// Cap the data rate of the link at RATE bytes per second in each direction; K, M
    /// or G multiply by 1024, 1024² or 1024³ (e.g. 50M).
    #[arg(long, value_name = "RATE", value_parser = parse_rate, help_heading = DEVICES)]
    bwlimit: Option<u64>,

    #[command(flatten)]
    tree: TreeArgs,

    /// Compression level (0 disables compression; default: zstd 1)
    #[arg(long, value_name = "N", help_heading = COMPARISON)]
    zlevel: Option<u32>,

    /// In a COPY, move the zstd level with the transfer's rate, from --zlevel (or 1)
    #[arg(long, help_heading = COMPARISON)]
    adapt: bool,

    /// Compression codec (default: zstd over SSH, none locally).
    #[arg(long, value_enum, ignore_case = true, value_name = "CODEC", help_heading = COMPARISON)]
    compress: Option<CompressArg>,

    /// In a PUSH SYNC: the older snapshot of the source that the receiver was last synced
    /// from (an LVM-thin snapshot kept until tonight's sync is done). Only what changed
    /// since it is read from the source, when basyn can show the receiver holds it.
    #[arg(long, value_name = "DEVICE", help_heading = COMPARISON)]
    since: Option<PathBuf>,

    /// With --since: what changed, as thin_delta's XML or a list of byte ranges
    /// ("OFFSET LENGTH" lines), instead of asking the thin pool.
    #[arg(long = "changed-ranges", value_name = "FILE", requires = "since", help_heading = COMPARISON)]
    changed_ranges: Option<PathBuf>,

    /// Declare the receiver all zero (a new thin LV): nothing is read from it for the
    /// comparison and no zeros are written to it, so it stays thin.
    #[arg(long = "destination-is-zero", help_heading = COMPARISON)]
    destination_is_zero: bool,

    #[command(flatten)]
    stat: StatArgs,

    /// Log what basyn is doing to stdout.
    #[arg(long, help_heading = OUTPUT)]
    verbose: bool,

    /// Show a progress bar on stderr.
    #[arg(long, help_heading = OUTPUT)]
    progress: bool,

    /// Print per-block detail to stderr.
    #[arg(long, help_heading = OUTPUT)]
    debug: bool,

    #[command(flatten)]
    state: StateArgs,

    #[command(flatten)]
    bitmap: BitmapArgs,

    /// Override the size, same-device and in-use refusals.
    #[arg(long, help_heading = SAFETY)]
    force: bool,

    #[command(subcommand)]
    command: Option<SubArgs>,
}

/// `--stat[=text|json]` and `--stat-file`: shared by runs and `basyn index`.
#[derive(Debug, clap::Args)]
struct StatArgs {
    /// Print statistics when done: as text (the default), or as one JSON object.
    #[arg(
        long = "stat",
        value_enum,
        ignore_case = true,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "text",
        value_name = "FORMAT",
        help_heading = OUTPUT
    )]
    stat: Option<StatFormatArg>,

    /// Write the statistics as one JSON object to PATH (also when the run fails).
    #[arg(long = "stat-file", value_name = "PATH", help_heading = OUTPUT)]
    stat_file: Option<PathBuf>,
}

impl StatArgs {
    fn request(&self) -> StatRequest {
        let format = self.stat;
        StatRequest {
            text: matches!(format, Some(StatFormatArg::Text)),
            json_stdout: matches!(format, Some(StatFormatArg::Json)) && self.stat_file.is_none(),
            file: self.stat_file.clone(),
        }
    }
}

/// Where the remote device is: the SSH options, shared by runs and `basyn index`.
#[derive(Debug, clap::Args)]
struct SshArgs {
    /// Remote SSH host; without it the remote device is on this machine and no SSH is used.
    #[arg(short = 'h', long = "host", value_name = "HOST", help_heading = DEVICES)]
    host: Option<String>,

    /// Remote SSH port (default: as the ssh config says, else 22).
    #[arg(short = 'p', long = "port", value_name = "PORT", help_heading = DEVICES)]
    port: Option<u16>,

    /// Remote SSH user (default: as the ssh config says, else the current user).
    #[arg(short = 'u', long = "user", value_name = "USER", help_heading = DEVICES)]
    user: Option<String>,

    /// Path of basyn on the remote host (default: `basyn` on its PATH, else upload this one).
    #[arg(long = "remote-path", value_name = "PATH", help_heading = DEVICES)]
    remote_path: Option<String>,

    /// Fail (exit 2) when nothing has come from the far basyn for SECONDS (at least 5):
    /// it is stopped or the link is down (a live one says so every second, however slow
    /// its disk). 0 waits forever.
    #[arg(long, default_value_t = 120, value_name = "SECONDS", help_heading = DEVICES)]
    timeout: u64,
}

/// How blocks are digested: shared by runs and `basyn index` (a state is used only by
/// runs with the same values).
#[derive(Debug, clap::Args)]
struct TreeArgs {
    /// Hash function for block comparison.
    #[arg(
        long,
        value_parser = hash_parser(),
        ignore_case = true,
        default_value = "BLAKE3",
        value_name = "HASH",
        help_heading = COMPARISON
    )]
    hash: HashAlgo,

    /// Block size for comparison and transfer: KiB, or with a unit K, M or G (2M).
    #[arg(long, value_parser = kib, default_value = "2048", value_name = "KB", help_heading = COMPARISON)]
    buffer: u64,

    /// Chunk size: KiB, or with a unit K, M or G (64K). A differing buffer is compared in
    /// chunks and only differing chunks are sent; the states keep the chunk digests.
    #[arg(long, value_parser = kib, value_name = "KB", help_heading = COMPARISON)]
    chunk: Option<u64>,
}

/// The shortest `--timeout`: several heartbeats of a live endpoint.
const MIN_TIMEOUT: u64 = 5;

impl SshArgs {
    /// The transport, and `--timeout` (`None` for 0).
    fn transport(self) -> Result<(Transport, Option<std::time::Duration>), String> {
        if (1..MIN_TIMEOUT).contains(&self.timeout) {
            return Err(format!("--timeout must be 0 (never) or at least {MIN_TIMEOUT} seconds, not {}", self.timeout));
        }
        let timeout = (self.timeout > 0).then(|| std::time::Duration::from_secs(self.timeout));
        Ok((transport(self.host, self.port, self.user, self.remote_path)?, timeout))
    }
}

impl TreeArgs {
    /// Hash, buffer and chunk, validated, in bytes.
    /// `adapt`: the codec's level was not chosen, and may follow the link.
    fn params(&self, codec: Codec, adapt: bool) -> Result<Params, String> {
        let (buffer, chunk) = geometry(self.buffer, self.chunk)?;
        // zstd without a chosen level follows the link (see `compress::Adaptive`).
        let adapt = adapt && matches!(codec, Codec::Zstd(_));
        Ok(Params { hash: self.hash, buffer, chunk, refine: chunk, codec, adapt })
    }
}

/// The original tool's bitmap options.
#[derive(Debug, clap::Args)]
struct BitmapArgs {
    /// The receiver's block digests kept in FILE on this host: SYNC compares the source
    /// with it instead of reading the receiver. Created if missing. Without a receiver
    /// (-r for PUSH, -l for PULL) only FILE is refreshed from the source.
    #[arg(short = 'b', long = "bitmap", value_name = "FILE", help_heading = STATES)]
    bitmap: Option<PathBuf>,

    /// Start FILE from scratch: the receiver is not read, every block is sent.
    #[arg(long = "reset-bitmap", conflicts_with = "update_bitmap", help_heading = STATES)]
    reset_bitmap: bool,

    /// A regular SYNC (both devices read, differing blocks sent) that rewrites FILE.
    #[arg(long = "update-bitmap", help_heading = STATES)]
    update_bitmap: bool,
}

/// State-file options of a run.
#[derive(Debug, clap::Args)]
struct StateArgs {
    /// State file of the local device (default: in the state directory, /var/lib/basyn
    /// for root, named after the device's path).
    #[arg(long = "state", value_name = "PATH", help_heading = STATES)]
    state: Option<PathBuf>,

    /// State file of the remote device, on the remote host.
    #[arg(long = "remote-state", value_name = "PATH", help_heading = STATES)]
    remote_state: Option<PathBuf>,

    /// Use no state files: always read both devices.
    #[arg(long = "no-state", conflicts_with_all = ["state", "remote_state"], help_heading = STATES)]
    no_state: bool,

    /// Use a state whose freshness cannot be verified (e.g. after a reboot).
    #[arg(long = "trust-state", help_heading = STATES)]
    trust_state: bool,
}

impl StateArgs {
    fn local(&self) -> StateOptions {
        options(self.no_state, self.state.clone(), self.trust_state)
    }
    fn remote(&self) -> StateOptions {
        options(self.no_state, self.remote_state.clone(), self.trust_state)
    }
}

#[derive(Debug, Subcommand)]
enum SubArgs {
    /// Build or refresh the state file of a device (e.g. from cron on an idle host).
    Index(IndexArgs),
    /// Serve one device over stdin/stdout: run by basyn itself, locally or over SSH, or
    /// as the forced command of a backup key (`command="basyn serve --restrict DEV"`).
    #[command(disable_help_flag = true)]
    Serve {
        /// Print help.
        #[arg(long = "help", action = ArgAction::Help)]
        help: Option<bool>,
        /// The only device this endpoint may touch (without it, the client names one of
        /// the --restrict devices).
        path: Option<PathBuf>,
        /// Serve only this device, whichever the client asks for (repeatable).
        #[arg(long, value_name = "DEVICE")]
        restrict: Vec<PathBuf>,
        /// Where states go by default, and (over SSH) where a client-chosen state may be
        /// besides next to its device.
        #[arg(long = "state-dir", value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// List the states basyn keeps on this host and the executables uploaded to it, or
    /// prune those whose device is gone and uploads of other builds.
    #[command(disable_help_flag = true)]
    State {
        /// Print help.
        #[arg(long = "help", action = ArgAction::Help)]
        help: Option<bool>,
        /// list or prune.
        #[arg(value_enum, ignore_case = true)]
        what: StateAction,
        /// The state directory to look in (default: $BASYN_STATE_DIR, /var/lib/basyn for
        /// root, else $XDG_STATE_HOME/basyn).
        #[arg(long = "state-dir", value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Print the protocol version this build speaks (used before uploading over SSH).
    #[command(hide = true)]
    Protocol,
    /// Print the man page or a shell's completions (`scripts/install.sh` installs them).
    #[command(hide = true)]
    Generate {
        /// man, bash, zsh or fish.
        #[arg(value_enum, ignore_case = true)]
        what: Artifact,
    },
}

/// The command-line definition, for the man page and completions.
fn definition() -> clap::Command {
    RawArgs::command()
}

/// `basyn index [-h HOST ...] DEVICE`.
#[derive(Debug, clap::Args)]
#[command(disable_help_flag = true)]
struct IndexArgs {
    /// Print help.
    #[arg(long = "help", action = ArgAction::Help)]
    help: Option<bool>,

    /// The device or image file to index.
    device: PathBuf,

    #[command(flatten)]
    ssh: SshArgs,

    #[command(flatten)]
    tree: TreeArgs,

    /// State file (default location otherwise).
    #[arg(long = "state", value_name = "PATH", help_heading = STATES)]
    state: Option<PathBuf>,

    /// Use a state whose freshness cannot be verified.
    #[arg(long = "trust-state", help_heading = STATES)]
    trust_state: bool,

    /// Show progress on stderr.
    #[arg(long, help_heading = OUTPUT)]
    progress: bool,

    /// Log to stdout.
    #[arg(long, help_heading = OUTPUT)]
    verbose: bool,

    #[command(flatten)]
    stat: StatArgs,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
#[value(rename_all = "UPPER")]
enum ActionArg {
    Push,
    Pull,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
#[value(rename_all = "UPPER")]
enum ModeArg {
    Sync,
    Copy,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum StatFormatArg {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CompressArg {
    Zstd,
    Zlib,
    None,
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    /// A copy, sync or check, and where its statistics go.
    Run(Box<Plan>, StatRequest),
    /// `basyn serve [PATH]`.
    Serve(crate::restrict::Config),
    /// `basyn index DEVICE`, and where its statistics go.
    Index(Box<IndexPlan>, StatRequest),
    /// `basyn protocol`.
    Protocol,
    /// `basyn state list|prune [--state-dir DIR]`.
    State(StateAction, Option<PathBuf>),
    /// `basyn generate man|bash|zsh|fish`.
    Generate(Artifact),
}

/// What `basyn state` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StateAction {
    /// Each state with its device, its size and whether it is fresh now; the uploads.
    List,
    /// Remove states whose device is gone, and uploads of other builds.
    Prune,
}

/// Why parsing stopped.
#[derive(Debug)]
pub enum Stop {
    /// `--help` or `--version`: print this on stdout, exit 0.
    Info(String),
    /// A usage error: one line, exit 1.
    Usage(String),
}

/// Parses and validates the command line.
pub fn parse<I, T>(args: I) -> Result<Command, Stop>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let raw = RawArgs::try_parse_from(args).map_err(|e| match e.kind() {
        clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => Stop::Info(e.to_string()),
        _ => Stop::Usage(usage_message(&e)),
    })?;
    match raw.command {
        Some(SubArgs::Serve { path, restrict, state_dir, .. }) => {
            if path.is_none() && restrict.is_empty() {
                return Err(Stop::Usage("basyn serve needs a DEVICE or --restrict DEVICE".into()));
            }
            return Ok(Command::Serve(crate::restrict::Config::from_environment(path, restrict, state_dir)));
        }
        Some(SubArgs::Protocol) => return Ok(Command::Protocol),
        Some(SubArgs::State { what, state_dir, .. }) => return Ok(Command::State(what, state_dir)),
        Some(SubArgs::Generate { what }) => return Ok(Command::Generate(what)),
        Some(SubArgs::Index(args)) => {
            let stat = args.stat.request();
            return index_plan(args, &stat).map(|p| Command::Index(Box::new(p), stat)).map_err(Stop::Usage);
        }
        None => {}
    }
    let stat = raw.stat.request();
    plan(raw, &stat).map(|p| Command::Run(Box::new(p), stat)).map_err(Stop::Usage)
}

/// clap's error as one line, with its hints kept: the option a mistyped one resembles,
/// and the values a value may take.
fn usage_message(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    let mut msg = first_line(&e.to_string());
    for kind in [ContextKind::SuggestedArg, ContextKind::SuggestedValue] {
        if let Some(ContextValue::String(s)) = e.get(kind) {
            msg.push_str(&format!(" (did you mean '{s}'?)"));
        }
    }
    if let (clap::error::ErrorKind::MissingRequiredArgument, Some(ContextValue::Strings(missing))) =
        (e.kind(), e.get(ContextKind::InvalidArg))
    {
        msg = format!("{} {}", msg.trim_end_matches(':'), missing.join(", "));
    }
    if let Some(ContextValue::Strings(values)) = e.get(ContextKind::ValidValue) {
        msg.push_str(&format!("; possible values: {}", values.join(", ")));
    }
    msg
}

/// clap's message without its "error: " prefix and usage block.
fn first_line(text: &str) -> String {
    let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("invalid arguments");
    line.trim_start_matches("error: ").trim().to_string()
}

/// `--buffer` and `--chunk`: a number of KiB (the original's unit), or a size with a
/// unit K, M or G (`64K`, `2M`, `1G`; `KB`, `KiB`, `MiB` ... and any case alike), as KiB.
fn kib(text: &str) -> Result<u64, String> {
    let bad = || format!("'{text}' is not a size: give KiB (2048) or a number with a unit K, M or G (64K, 2M)");
    let digits = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "k" | "kb" | "kib" => 0,
        "m" | "mb" | "mib" => 10,
        "g" | "gb" | "gib" => 20,
        _ => return Err(bad()),
    };
    number.checked_mul(1 << shift).ok_or_else(|| format!("'{text}' is too large"))
}

/// `--buffer` and `--chunk` in KiB to bytes, validated.
fn geometry(buffer_kb: u64, chunk_kb: Option<u64>) -> Result<(usize, Option<usize>), String> {
    let max_kb = (MAX_BLOCK / 1024) as u64;
    if buffer_kb == 0 || buffer_kb > max_kb {
        return Err(format!("--buffer must be between 1 and {max_kb} KB ({}M), not {buffer_kb} KB", max_kb / 1024));
    }
    let chunk = match chunk_kb {
        None => None,
        Some(0) => return Err("--chunk must be at least 1 KB".into()),
        Some(c) if c > buffer_kb => {
            return Err(format!("--chunk ({c} KB) must not be larger than --buffer ({buffer_kb} KB)"));
        }
        Some(c) => Some(c as usize * 1024),
    };
    Ok((buffer_kb as usize * 1024, chunk))
}

/// `--bwlimit RATE`: bytes per second, with an optional K, M or G (powers of 1024).
fn parse_rate(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a rate: bytes per second, with an optional K, M or G (e.g. 50M)"))?;
    match n.checked_mul(1 << shift) {
        Some(0) => Err("a rate of 0 would send nothing; leave --bwlimit out for no limit".into()),
        Some(rate) => Ok(rate),
        None => Err(format!("{text:?} is too large a rate")),
    }
}

/// `--hash`: the names [`HashAlgo`] gives its algorithms, in any case.
fn hash_parser() -> impl clap::builder::TypedValueParser<Value = HashAlgo> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(HashAlgo::ALL.map(HashAlgo::name))
        .map(|name: String| HashAlgo::from_name(&name).unwrap_or(HashAlgo::Blake3))
}

#[cfg(test)]
mod tests {
    use super::plan::codec;
    use super::*;
    use crate::engine::{Direction, Mode};
    use crate::ssh::Target;

    fn run_plan(args: &[&str]) -> Plan {
        let mut all = vec!["basyn"];
        all.extend_from_slice(args);
        match parse(all) {
            Ok(Command::Run(p, _)) => *p,
            other => panic!("expected a plan, got {other:?}"),
        }
    }

    fn usage(args: &[&str]) -> String {
        let mut all = vec!["basyn"];
        all.extend_from_slice(args);
        match parse(all) {
            Err(Stop::Usage(m)) => m,
            other => panic!("expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn short_and_long_options_mean_the_same() {
        let a = run_plan(&["-l", "a", "-r", "b", "-a", "push", "-m", "SYNC"]);
        let b = run_plan(&["--local=a", "--remote=b", "--action=PUSH", "--mode=sync"]);
        assert_eq!(a.action, Some((Direction::Push, Mode::Sync)));
        assert_eq!(a.action, b.action);
        assert_eq!(a.local, b.local);
    }

    #[test]
    fn defaults_follow_the_design() {
        let p = run_plan(&["-l", "a", "-r", "b"]);
        assert_eq!(p.params.hash, HashAlgo::Blake3);
        assert_eq!(p.params.buffer, 2048 * 1024);
        assert_eq!(p.params.chunk, None);
        assert_eq!(p.params.codec, Codec::None);
        assert_eq!(p.action, None);
    }

    #[test]
    fn values_are_case_insensitive() {
        let p = run_plan(&["-l", "a", "-r", "b", "--hash=sha1", "-a", "Pull", "-m", "cOpY"]);
        assert_eq!(p.params.hash, HashAlgo::Sha1);
        assert_eq!(p.action, Some((Direction::Pull, Mode::Copy)));
        assert_eq!(run_plan(&["-l", "a", "-r", "b", "--hash=BLAKE2S"]).params.hash, HashAlgo::Blake2s);
    }

    #[test]
    fn usage_errors_are_one_line() {
        assert_eq!(usage(&["-l", "a", "-r", "b", "-a", "push"]), "--action needs --mode (SYNC or COPY)");
        assert_eq!(usage(&["-r", "b"]), "missing --local DEVICE (-l)");
        assert!(usage(&["-l", "a", "-r", "b", "--hash", "crc32"]).contains("crc32"));
        assert!(usage(&["-l", "a", "-r", "b", "--chunk", "4096"]).contains("--chunk"));
        assert!(usage(&["-l", "a", "-r", "b", "--buffer", "0"]).contains("--buffer"));
        assert!(usage(&["-l", "a", "-r", "b", "--bogus"]).contains("--bogus"));
        assert!(!usage(&["-l", "a", "-r", "b", "--bogus"]).contains('\n'));
    }

    #[test]
    fn sizes_are_kib_or_have_a_unit() {
        assert_eq!(kib("2048"), Ok(2048));
        assert_eq!(kib("64K"), Ok(64));
        assert_eq!(kib("64kib"), Ok(64));
        assert_eq!(kib("2M"), Ok(2048));
        assert_eq!(kib("2MiB"), Ok(2048));
        assert_eq!(kib("1g"), Ok(1 << 20));
        for bad in ["", "K", "2X", "2 M", "-1", "1.5M", "2MB ", "2Mi"] {
            assert!(kib(bad).is_err(), "{bad:?} accepted");
        }
        assert!(kib("18446744073709551615G").is_err());
        assert_eq!(run_plan(&["-l", "a", "-r", "b", "--buffer", "8M", "--chunk", "64K"]).params.chunk, Some(64 << 10));
    }

    #[test]
    fn hints_are_kept_on_one_line() {
        let m = usage(&["-l", "a", "-r", "b", "--verbos"]);
        assert!(m.contains("did you mean '--verbose'?") && !m.contains('\n'), "{m}");
        let m = usage(&["-l", "a", "-r", "b", "-a", "push", "-m", "SINC"]);
        assert!(m.ends_with("possible values: SYNC, COPY"), "{m}");
    }

    #[test]
    fn stat_formats_and_file() {
        let stat = |args: &[&str]| {
            let mut all = vec!["basyn", "-l", "a", "-r", "b"];
            all.extend_from_slice(args);
            match parse(all) {
                Ok(Command::Run(p, s)) => (p.output.stat, s),
                other => panic!("expected a plan, got {other:?}"),
            }
        };
        let text = StatRequest { text: true, ..StatRequest::default() };
        assert_eq!(stat(&["--stat"]), (true, text.clone()));
        assert_eq!(stat(&["--stat=TEXT"]), (true, text));
        assert_eq!(stat(&["--stat=json"]).1, StatRequest { json_stdout: true, ..StatRequest::default() });
        let file = Some(PathBuf::from("/s.json"));
        assert_eq!(
            stat(&["--stat=json", "--stat-file", "/s.json"]).1,
            StatRequest { file: file.clone(), ..StatRequest::default() }
        );
        assert_eq!(stat(&["--stat", "--stat-file", "/s.json"]).1, StatRequest { text: true, json_stdout: false, file });
        assert_eq!(stat(&[]), (false, StatRequest::default()));
        assert!(usage(&["-l", "a", "-r", "b", "--stat=xml"]).contains("possible values: text, json"));
    }

    #[test]
    fn compression_choices() {
        assert_eq!(codec(None, None, true), Ok(Codec::Zstd(1)));
        assert_eq!(codec(None, Some(0), true), Ok(Codec::None));
        assert_eq!(codec(None, None, false), Ok(Codec::None));
        assert_eq!(codec(None, Some(5), false), Ok(Codec::Zstd(5)));
        assert_eq!(codec(Some(CompressArg::Zlib), Some(9), false), Ok(Codec::Zlib(9)));
        assert!(codec(Some(CompressArg::Zlib), Some(12), false).is_err());
    }

    #[test]
    fn dash_h_is_the_host_and_help_is_long_only() {
        let p = run_plan(&["-l", "a", "-r", "b", "-h", "example.org"]);
        assert_eq!(
            p.transport,
            Transport::Ssh(Target { host: "example.org".into(), port: None, user: None, remote_path: None })
        );
        assert_eq!((p.params.codec, p.params.adapt), (Codec::Zstd(1), false), "zstd level 1");
        let p = run_plan(&["-l", "a", "-r", "b", "-h", "x", "-p", "2222", "-u", "bob", "--remote-path", "/opt/basyn"]);
        assert_eq!(
            p.transport,
            Transport::Ssh(Target {
                host: "x".into(),
                port: Some(2222),
                user: Some("bob".into()),
                remote_path: Some("/opt/basyn".into())
            })
        );
        assert_eq!(usage(&["-l", "a", "-r", "b", "-p", "22"]), "--port needs --host");
        assert!(matches!(parse(["basyn", "--help"]), Err(Stop::Info(_))));
    }

    #[test]
    fn serve_takes_a_path() {
        let x = Some(std::path::PathBuf::from("/dev/x"));
        assert!(matches!(parse(["basyn", "serve", "/dev/x"]), Ok(Command::Serve(c)) if c.device == x));
        let r = parse(["basyn", "serve", "--restrict", "/dev/x", "--restrict", "/dev/y", "--state-dir", "/s"]);
        assert!(
            matches!(&r, Ok(Command::Serve(c)) if c.device.is_none() && c.restrict.len() == 2
                && c.state_dir.as_deref() == Some(std::path::Path::new("/s"))),
            "{r:?}"
        );
        assert!(matches!(parse(["basyn", "serve"]), Err(Stop::Usage(m)) if m.contains("--restrict")));
    }
}
