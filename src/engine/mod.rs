//! The engine: turns a validated [`Plan`] into COPY, SYNC and RECHECK runs between the
//! local device and the far endpoint, and `basyn index`.
//!
//! - `run`: one run: connect, open both ends (every refusal before any write), COPY or
//!   SYNC, recheck, close; `session`: what every part of a run shares;
//! - `compare`: SYNC and RECHECK by reading both sides, or by walking fresh trees;
//! - `window`: the request window that keeps digests, reads and writes in flight;
//! - `refine`: a differing block narrowed to the pieces that differ;
//! - `copy`: COPY; `bitmap`: the original's `-b/--bitmap` workflow, `bitmap_sync` its
//!   transfers against the bitmap FILE;
//! - `recheck`, `index`.

mod bitmap;
mod bitmap_sync;
mod compare;
mod copy;
mod dry_run;
mod index;
mod recheck;
mod refine;
mod run;
mod session;
mod since;
mod window;

use std::path::PathBuf;

use crate::block::BlockError;
use crate::compress::Codec;
use crate::device::DeviceError;
use crate::digest_index::SaveError;
use crate::endpoint::EndpointError;
use crate::hash::HashAlgo;
use crate::protocol::StateOptions;
use crate::report::{Interrupts, Output, Reporter, Stats};
use crate::state::StateError;

pub use crate::endpoint::Transport;
pub use bitmap::BitmapError;
pub use compare::Purpose;
pub use index::index;
pub use window::CHECKPOINT_ENV;

/// Which way data flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Local device is the source.
    Push,
    /// Remote device is the source.
    Pull,
}

/// How data is transferred.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Everything, sequentially.
    Copy,
    /// Only differing blocks, found by comparing digests.
    Sync,
}

/// Parameters shared by every phase of a run.
#[derive(Clone, Debug)]
pub struct Params {
    /// Digest algorithm.
    pub hash: HashAlgo,
    /// Block (`--buffer`) size in bytes.
    pub buffer: usize,
    /// Chunk size in bytes (`--chunk`): chunk digests are kept in the states under each
    /// leaf, and differing blocks are refined to chunks.
    pub chunk: Option<usize>,
    /// Size that differing blocks are refined to before sending: `--chunk`, or by
    /// default 4 KiB when the receiver is being read anyway. `None`: whole blocks.
    pub refine: Option<usize>,
    /// Wire codec for data.
    pub codec: Codec,
    /// The zstd level was not chosen: a COPY adapts it to the link as it goes.
    pub adapt: bool,
}

/// What a differing block is refined to by default, when the receiver is read anyway:
/// scattered small changes then cost about their own size, not a whole block each.
pub const DEFAULT_REFINE: usize = 4096;

/// Everything a run needs, validated.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The `--local` device.
    pub local: PathBuf,
    /// The `--remote` device.
    pub remote: PathBuf,
    /// How the remote device is reached.
    pub transport: Transport,
    /// `--timeout`: how long the far endpoint may stay silent (`None`: forever).
    pub timeout: Option<std::time::Duration>,
    /// The action, if any.
    pub action: Option<(Direction, Mode)>,
    /// `--recheck`.
    pub recheck: bool,
    /// Hash, buffer, chunk, codec.
    pub params: Params,
    /// `--force`.
    pub force: bool,
    /// `--destination-is-zero`: the receiver is declared all zero, never read for it
    /// and never written zeros.
    pub destination_is_zero: bool,
    /// `-n/--dry-run`: compare and report what the action would send, writing nothing.
    pub dry_run: bool,
    /// `--bwlimit`: bytes per second each direction of the link may carry.
    pub bwlimit: Option<u64>,
    /// `-b/--bitmap`: the receiver's digests kept in a local file.
    pub bitmap: Option<BitmapPlan>,
    /// `--since OLDER`: read only what changed since an older snapshot of the source.
    pub since: Option<SincePlan>,
    /// State file options for the local device.
    pub state: StateOptions,
    /// State file options for the remote device.
    pub remote_state: StateOptions,
    /// What to print.
    pub output: Output,
}

/// How `-b/--bitmap FILE` is used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapPlan {
    /// The bitmap file.
    pub path: PathBuf,
    /// `--reset-bitmap`: FILE starts from scratch; the receiver is not read, every
    /// block is sent.
    pub reset: bool,
    /// `--update-bitmap`: a regular SYNC (both devices read); FILE is rewritten.
    pub update: bool,
    /// No receiver was given: only FILE is refreshed from the source.
    pub refresh_only: bool,
}

/// How `--since OLDER` finds what changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SincePlan {
    /// OLDER: the older snapshot of the (local) source.
    pub device: PathBuf,
    /// `--changed-ranges FILE`: the changes as `thin_delta`'s XML or a ranges file;
    /// `None`: asked of the thin pool.
    pub ranges: Option<PathBuf>,
}

/// `basyn index DEVICE`: build or refresh a device's state.
#[derive(Clone, Debug)]
pub struct IndexPlan {
    /// The device, local or on the transport's host.
    pub device: PathBuf,
    /// Where it is.
    pub transport: Transport,
    /// `--timeout`, as for runs.
    pub timeout: Option<std::time::Duration>,
    /// Hash, buffer and chunk of the tree.
    pub params: Params,
    /// Which state file.
    pub state: StateOptions,
    /// What to print.
    pub output: Output,
}

/// How two devices were found to differ.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Differences {
    /// They have different sizes.
    #[error("the devices differ in size: {local} is {local_size} bytes, {remote} is {remote_size} bytes")]
    Size {
        /// The local device, with its side.
        local: String,
        /// Its size.
        local_size: u64,
        /// The remote device, with its side.
        remote: String,
        /// Its size.
        remote_size: u64,
    },
    /// Some blocks differ.
    #[error("{local} and {remote} differ in {differing} of {blocks} blocks of {buffer} bytes")]
    Blocks {
        /// The local device, with its side.
        local: String,
        /// The remote device, with its side.
        remote: String,
        /// Blocks that differ.
        differing: u64,
        /// Blocks compared.
        blocks: u64,
        /// Block size.
        buffer: usize,
    },
}

/// Why a run did not end with identical devices.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A precondition failed; nothing was changed (exit 1).
    #[error("{0}")]
    Refused(#[source] Box<Fault>),
    /// The transfer failed part way (exit 2).
    #[error("{source}; the receiving device {receiver} may be partly changed")]
    Transfer {
        /// What failed.
        source: Box<Fault>,
        /// The receiving device, with its side.
        receiver: String,
    },
    /// The recheck after an action could not be done (exit 2).
    #[error("recheck failed: {0}")]
    RecheckFailed(#[source] Box<Fault>),
    /// The recheck after an action found differences (exit 2).
    #[error("recheck failed: {0}")]
    RecheckDiffers(Differences),
    /// A check without action found the devices differ (exit 3).
    #[error("{0}")]
    Differ(Differences),
    /// A dry run found that the action would change the receiver (exit 3); its report
    /// is on stdout already.
    #[error("dry run: {differing} blocks would be sent")]
    WouldChange {
        /// Blocks that differ.
        differing: u64,
    },
    /// The source was written while it was being synchronized (exit 2).
    #[error(
        "{device} was written to during the run: the changes after its blocks were read are not on {receiver}, which may not match it; its state was not saved. Sync from a snapshot or a quiesced device"
    )]
    SourceMoved {
        /// The source, with its side.
        device: String,
        /// The receiver, with its side.
        receiver: String,
    },
    /// Another process wrote the receiver while it was being synchronized (exit 2).
    #[error(
        "{device} was written to by another process during the run: it may not match the source, and its state was not saved. Run the sync again with nothing else writing to it"
    )]
    ReceiverMoved {
        /// The receiver, with its side.
        device: String,
    },
    /// The run succeeded but the bitmap could not record it (exit 2).
    #[error("{0}: the receiver was synced, but the bitmap keeps the blocks of this run unknown")]
    BitmapNotSaved(bitmap::BitmapError),
    /// The device was written while `basyn index` read it (exit 2).
    #[error("{device} was written to while it was indexed; its state was not saved. Run basyn index again")]
    IndexMoved {
        /// The device, with its side.
        device: String,
    },
}

impl Error {
    /// The documented exit code.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Refused(_) => 1,
            Error::Transfer { .. }
            | Error::RecheckFailed(_)
            | Error::RecheckDiffers(_)
            | Error::SourceMoved { .. }
            | Error::ReceiverMoved { .. }
            | Error::BitmapNotSaved(_)
            | Error::IndexMoved { .. } => 2,
            Error::Differ(_) | Error::WouldChange { .. } => 3,
        }
    }

    /// True if what went wrong was said already (a dry run's report), so that no error
    /// line is wanted.
    pub fn reported(&self) -> bool {
        matches!(self, Error::WouldChange { .. })
    }
}

/// A failure inside a run, before it is classified by when it happened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Fault {
    /// The far endpoint failed or refused.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The local device failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// Data from the endpoint may not be written to the local device.
    #[error("{device}: {source}")]
    Verify {
        /// The local receiver, with its side.
        device: String,
        /// Why.
        source: BlockError,
    },
    /// The source no longer holds what the comparison read: nothing of it was sent.
    #[error(
        "{device} changed at offset {offset} ({len} bytes) after it was compared: it no longer matches the digest the comparison used, and nothing of it was sent"
    )]
    SourceChanged {
        /// The source, with its side.
        device: String,
        /// Where.
        offset: u64,
        /// How much.
        len: u64,
    },
    /// The local state file could not be used or saved.
    #[error("local {0}")]
    State(#[from] StateError),
    /// The bitmap could not be used.
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
    /// `--since` or `--changed-ranges` cannot be used as given.
    #[error("{0}")]
    Since(String),
    /// A bug in basyn.
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// On one machine both names are one device: a check has nothing to compare.
    #[error("{local} and {remote} are the same device: there is nothing to compare")]
    SameDevice {
        /// The local device, with its side.
        local: String,
        /// The remote device, with its side.
        remote: String,
    },
}

impl From<crate::bitmap_file::BitmapFileError> for Fault {
    fn from(e: crate::bitmap_file::BitmapFileError) -> Fault {
        Fault::Bitmap(BitmapError::from(e))
    }
}

impl From<SaveError> for Fault {
    fn from(e: SaveError) -> Fault {
        match e {
            SaveError::Device(e) => Fault::Device(e),
            SaveError::State(e) => Fault::State(e),
        }
    }
}

impl Fault {
    /// Classifies a fault during setup: nothing has been written yet.
    fn refused(self) -> Error {
        Error::Refused(Box::new(self))
    }

    /// Classifies a fault while the receiver is being written.
    fn transfer(self, receiver: &str) -> Error {
        Error::Transfer { source: Box::new(self), receiver: receiver.to_string() }
    }
}

/// Runs the plan, filling `stats` as it goes; `interrupts` learns when the receiver
/// may start to change. `Err` carries the message and exit code; `Ok` means success
/// (exit 0).
pub fn run(plan: &Plan, stats: &mut Stats, interrupts: &Interrupts) -> Result<(), Error> {
    let mut rep = Reporter::new(plan.output);
    let result = run::run(plan, &mut rep, stats, interrupts);
    rep.finish();
    stats.elapsed = rep.elapsed();
    result
}
