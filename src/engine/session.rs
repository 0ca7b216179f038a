//! What every part of a run shares: the session (plan, output, the endpoint once
//! connected) and the small rules used by the transfer, the recheck, the bitmap
//! workflow and `basyn index`.

use std::path::Path;

use super::window::Comparison;
use super::{Direction, Error, Fault, Params, Plan};
use crate::compress::Codec;
use crate::device::{Device, DeviceError, Problem, Side};
use crate::digest_index::DigestIndex;
use crate::endpoint::Endpoint;
use crate::protocol::{Access, OpenRequest, StateOptions, StateSummary};
use crate::report::{Interrupts, Reporter, Stats};
use crate::tree::{DEFAULT_FANOUT, Layout};

/// `side path`, as messages name a device.
pub(super) fn name(side: Side, path: &Path) -> String {
    format!("{side} {}", path.display())
}

/// The receiver of a transfer in `dir`, as messages name it: the bitmap when only it is
/// refreshed (no receiver was given).
pub(super) fn receiver_name(plan: &Plan, dir: Direction) -> String {
    let (side, path) = match dir {
        Direction::Push => (Side::Remote, &plan.remote),
        Direction::Pull => (Side::Local, &plan.local),
    };
    match &plan.bitmap {
        Some(b) if b.refresh_only => format!("bitmap {}", b.path.display()),
        _ => name(side, path),
    }
}

/// The tree layout of a run over `device_size` bytes.
pub(super) fn layout(params: &Params, device_size: u64) -> Layout {
    Layout {
        hash: params.hash,
        buffer: params.buffer as u64,
        chunk: params.chunk.map(|c| c as u64),
        fanout: DEFAULT_FANOUT as u32,
        device_size,
    }
}

/// Opens a local device's digest index (its state) for a run over `len` bytes.
pub(super) fn local_index(
    device: &Device,
    params: &Params,
    len: u64,
    opts: &StateOptions,
    rep: &Reporter,
) -> Result<DigestIndex, Error> {
    let index = DigestIndex::open(device, layout(params, len), opts).map_err(|e| Fault::State(e).refused())?;
    rep.log(format_args!("local {}", index.note()));
    Ok(index)
}

/// Both trees are fresh and built alike: they can be compared without reading.
pub(super) fn both_fresh(index: &mut DigestIndex, remote: &StateSummary) -> bool {
    remote.fresh
        && index.fresh()
        && index.tree().is_some_and(|t| t.height() as u32 == remote.height && t.root().is_some())
}

/// Both fresh trees have the same root.
pub(super) fn roots_equal(index: &mut DigestIndex, remote: &StateSummary) -> bool {
    let ours = index.tree().and_then(|t| t.root());
    matches!((ours, &remote.root), (Some(a), Some(b)) if a.as_bytes() == b.as_slice())
}

/// `path` as the file system resolves it (symbolic links and `..` followed), also
/// when it does not exist yet.
fn resolved(path: &Path) -> std::path::PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    match (std::fs::canonicalize(parent), path.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => path.to_path_buf(),
    }
}

/// Refuses state and bitmap paths that name a device of the run: saving one there would
/// destroy the device. (`state::check_path` refuses any other file that is not a state.)
pub(super) fn check_side_files(files: &[&Path], devices: &[&Path]) -> Result<(), Error> {
    for file in files {
        if devices.iter().any(|d| !d.as_os_str().is_empty() && resolved(d) == resolved(file)) {
            let path = file.display().to_string();
            let why = "is a device of this run; refusing to use it as a state or bitmap file";
            return Err(Fault::State(crate::state::StateError::Refused { path, why }).refused());
        }
    }
    Ok(())
}

/// A run in progress: the plan, where output goes, and the endpoint once connected.
pub(super) struct Session<'a> {
    /// What to do.
    pub plan: &'a Plan,
    /// Where output goes.
    pub rep: &'a mut Reporter,
    /// The figures `--stat` prints.
    pub stats: &'a mut Stats,
    /// The signal handler, told when the receiver may start to change.
    pub interrupts: &'a Interrupts,
    /// The endpoint, once connected.
    pub ep: Option<Endpoint>,
}

impl<'a> Session<'a> {
    /// A session with nothing connected yet.
    pub fn new(plan: &'a Plan, rep: &'a mut Reporter, stats: &'a mut Stats, interrupts: &'a Interrupts) -> Self {
        Session { plan, rep, stats, interrupts, ep: None }
    }

    /// The run's endpoint, connected on first use. A failure to connect changes nothing.
    pub fn endpoint(&mut self) -> Result<&mut Endpoint, Error> {
        if self.ep.is_none() {
            let rep = &*self.rep;
            let ep = Endpoint::connect(
                &self.plan.transport,
                &self.plan.remote,
                (self.plan.timeout, self.plan.bwlimit),
                &|line| rep.log(line),
            )
            .map_err(|e| Fault::from(e).refused())?;
            self.ep = Some(ep);
        }
        self.ep.as_mut().ok_or(Fault::Internal("no endpoint").refused())
    }

    /// The endpoint (connected on first use) and the reporter at once.
    pub fn endpoint_and_reporter(&mut self) -> Result<(&mut Endpoint, &Reporter), Error> {
        self.endpoint()?;
        let Session { ep, rep, .. } = self;
        Ok((ep.as_mut().ok_or(Fault::Internal("no endpoint").refused())?, &**rep))
    }

    /// An Open request with the run's parameters.
    pub fn open_request(&self, access: Access, codec: Codec, state: StateOptions) -> OpenRequest {
        let p = &self.plan.params;
        OpenRequest {
            access,
            hash: p.hash,
            codec,
            buffer: p.buffer as u64,
            chunk: p.chunk.map(|c| c as u64),
            state,
            device: crate::protocol::path_bytes(&self.plan.remote),
        }
    }

    /// On one machine, a check of a device against itself is refused before the far end
    /// would find the device locked by this end (which told the user "in use by another
    /// basyn").
    pub fn refuse_same_device(&self, local: &Device) -> Result<(), Error> {
        if self.plan.transport != crate::endpoint::Transport::Local {
            return Ok(());
        }
        let Ok(remote) = Device::open_read(&self.plan.remote, Side::Remote) else { return Ok(()) };
        if local.identity().same_storage(remote.identity()) {
            let (local, remote) = (name(Side::Local, &self.plan.local), name(Side::Remote, &self.plan.remote));
            return Err(Fault::SameDevice { local, remote }.refused());
        }
        Ok(())
    }

    /// The source and the receiver of a transfer in `dir`, as messages name them.
    pub fn source_name(&self, dir: Direction) -> String {
        match dir {
            Direction::Push => name(Side::Local, &self.plan.local),
            Direction::Pull => name(Side::Remote, &self.plan.remote),
        }
    }

    /// The receiver of a transfer in `dir`, as messages name it.
    pub fn receiver_name(&self, dir: Direction) -> String {
        receiver_name(self.plan, dir)
    }
}

/// The refusal of an empty source.
pub(super) fn empty(side: Side, path: &Path) -> Error {
    Fault::Device(DeviceError { side, path: path.display().to_string(), problem: Problem::Empty }).refused()
}

/// Warns that a side's state could not be saved: the run's result stands, and the next
/// run reads that device again. `what` is the state as messages name it ("local ...").
pub(super) fn warn_unsaved(rep: &Reporter, what: impl std::fmt::Display) {
    rep.warn(format_args!("warning: {what}; this run's result stands, and the next run reads that device again"));
}

/// Adds what a comparison did to the statistics.
pub(super) fn absorb(stats: &mut Stats, c: &Comparison) {
    stats.blocks_compared += c.blocks;
    stats.blocks_differing += c.differing;
    stats.bytes_written += c.written;
    stats.nodes_compared += c.nodes;
}
