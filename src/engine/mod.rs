//! The engine: turns a validated [`Plan`] into COPY, SYNC and RECHECK runs between the
//! local device and the far endpoint.

mod compare;
mod copy;
mod pipeline;

use std::path::PathBuf;

use crate::compress::Codec;
use crate::device::{Device, DeviceError, ReceiverSpec, Side};
use crate::endpoint::{Endpoint, EndpointError, Link};
use crate::hash::HashAlgo;
use crate::protocol::{AbortCode, Access, ProtocolError};
use crate::report::{Output, Reporter, Stats, human};

pub use compare::Purpose;

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

/// Where the far endpoint runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// `basyn serve` as a child process on this machine.
    Local,
    /// `basyn serve` on another host, over SSH.
    Ssh(crate::ssh::Target),
}

/// Parameters shared by every phase of a run.
#[derive(Clone, Debug)]
pub struct Params {
    /// Digest algorithm.
    pub hash: HashAlgo,
    /// Block (`--buffer`) size in bytes.
    pub buffer: usize,
    /// Chunk size in bytes, if differing blocks are refined.
    pub chunk: Option<usize>,
    /// Wire codec for data.
    pub codec: Codec,
}

/// Everything a run needs, validated.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The `--local` device.
    pub local: PathBuf,
    /// The `--remote` device.
    pub remote: PathBuf,
    /// How the remote device is reached.
    pub transport: Transport,
    /// The action, if any.
    pub action: Option<(Direction, Mode)>,
    /// `--recheck`.
    pub recheck: bool,
    /// Hash, buffer, chunk, codec.
    pub params: Params,
    /// `--force`.
    pub force: bool,
    /// What to print.
    pub output: Output,
}

/// Why a run did not end with identical devices.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A precondition failed; nothing was changed (exit 1).
    #[error("{0}")]
    Refused(String),
    /// The transfer failed part way (exit 2).
    #[error("{message}; the receiving device {receiver} may be partly changed")]
    Transfer {
        /// What failed.
        message: String,
        /// The receiving device, with its side.
        receiver: String,
    },
    /// The recheck after an action found differences (exit 2).
    #[error("recheck failed: {0}")]
    RecheckFailed(String),
    /// A check without action found the devices differ (exit 3).
    #[error("{0}")]
    Differ(String),
}

impl Error {
    /// The documented exit code.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Refused(_) => 1,
            Error::Transfer { .. } | Error::RecheckFailed(_) => 2,
            Error::Differ(_) => 3,
        }
    }
}

/// A failure inside a phase, before it is classified by when it happened.
#[derive(Debug, thiserror::Error)]
pub enum Fault {
    /// The far endpoint failed or refused.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The local device failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The endpoint sent something invalid.
    #[error("remote endpoint: {0}")]
    Protocol(#[from] ProtocolError),
    /// A bug in basyn.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl Fault {
    /// Classifies a fault during setup: nothing has been written yet.
    fn refused(self) -> Error {
        match self {
            Fault::Endpoint(EndpointError::Abort { code: AbortCode::Precondition, message }) => Error::Refused(message),
            other => Error::Refused(other.to_string()),
        }
    }

    /// Classifies a fault while the receiver is being written.
    fn transfer(self, receiver: &str) -> Error {
        Error::Transfer { message: self.to_string(), receiver: receiver.to_string() }
    }
}

fn connect(plan: &Plan, rep: &Reporter) -> Result<Endpoint, Fault> {
    let link = match &plan.transport {
        Transport::Local => Link::local_child(&plan.remote)?,
        Transport::Ssh(target) => crate::ssh::connect(target, &plan.remote, &|line| rep.log(line))?,
    };
    Ok(Endpoint::connect(link)?)
}

fn name(side: Side, path: &std::path::Path) -> String {
    format!("{side} {}", path.display())
}

/// Runs the plan, filling `stats` as it goes. `Err` carries the message and exit code;
/// `Ok` means success (exit 0).
pub fn run(plan: &Plan, stats: &mut Stats) -> Result<(), Error> {
    let mut rep = Reporter::new(plan.output);
    let result = run_phases(plan, &mut rep, stats);
    rep.finish();
    stats.elapsed = rep.elapsed();
    result
}

fn run_phases(plan: &Plan, rep: &mut Reporter, stats: &mut Stats) -> Result<(), Error> {
    // One endpoint (one SSH connection) serves every phase of the run; it is connected
    // lazily so that local refusals come first and cost no connection.
    let mut ep: Option<Endpoint> = None;
    let result = phases(plan, rep, &mut ep, stats);
    let Some(e) = ep else { return result.map(|_| ()) };
    stats.rx = e.rx.get();
    stats.tx = e.tx.get();
    match result {
        // A clean end of session: the endpoint must exit cleanly too.
        Ok(action) => match (e.close(), action) {
            (Ok(()), _) => Ok(()),
            (Err(err), None) => Err(Fault::from(err).refused()),
            (Err(err), Some(dir)) => Err(Fault::from(err).transfer(&receiver_name(plan, dir))),
        },
        Err(err) => {
            e.abandon();
            Err(err)
        }
    }
}

/// Runs the phases the plan asks for; returns the direction of the action, if any.
fn phases(
    plan: &Plan,
    rep: &mut Reporter,
    ep: &mut Option<Endpoint>,
    stats: &mut Stats,
) -> Result<Option<Direction>, Error> {
    match plan.action {
        None if !plan.recheck => {
            Device::probe(&plan.local, Side::Local).map_err(|e| Error::Refused(e.to_string()))?;
            let e = endpoint(plan, rep, ep)?;
            e.open(Access::Probe, plan.params.hash, Codec::None).map_err(|e| Fault::from(e).refused())?;
            rep.log(format_args!(
                "both devices exist: {} and {}",
                name(Side::Local, &plan.local),
                name(Side::Remote, &plan.remote)
            ));
            Ok(None)
        }
        None => recheck(plan, rep, ep, None, stats).map(|()| None),
        Some((dir, mode)) => {
            let len = transfer(plan, rep, ep, dir, mode, stats)?;
            if plan.recheck {
                recheck(plan, rep, ep, Some(len), stats)?;
            }
            Ok(Some(dir))
        }
    }
}

fn receiver_name(plan: &Plan, dir: Direction) -> String {
    match dir {
        Direction::Push => name(Side::Remote, &plan.remote),
        Direction::Pull => name(Side::Local, &plan.local),
    }
}

/// The run's endpoint, connected on first use. A failure to connect changes nothing.
fn endpoint<'a>(plan: &Plan, rep: &Reporter, ep: &'a mut Option<Endpoint>) -> Result<&'a mut Endpoint, Error> {
    if ep.is_none() {
        *ep = Some(connect(plan, rep).map_err(Fault::refused)?);
    }
    ep.as_mut().ok_or(Error::Refused("internal error: no endpoint".into()))
}

fn transfer(
    plan: &Plan,
    rep: &mut Reporter,
    ep: &mut Option<Endpoint>,
    dir: Direction,
    mode: Mode,
    stats: &mut Stats,
) -> Result<u64, Error> {
    let p = &plan.params;
    let (source, receiver) = match dir {
        Direction::Push => (name(Side::Local, &plan.local), name(Side::Remote, &plan.remote)),
        Direction::Pull => (name(Side::Remote, &plan.remote), name(Side::Local, &plan.local)),
    };
    rep.log(format_args!(
        "{dir:?} {mode:?}: {source} -> {receiver}; hash {}, buffer {} KiB{}, compression {}",
        p.hash,
        p.buffer / 1024,
        p.chunk.map(|c| format!(", chunk {} KiB", c / 1024)).unwrap_or_default(),
        p.codec.describe()
    ));
    let empty = |side, path: &std::path::Path| {
        Error::Refused(
            DeviceError { side, path: path.display().to_string(), problem: crate::device::Problem::Empty }.to_string(),
        )
    };
    // Open both ends; every refusal happens here, before anything is written.
    let (local, ep, len) = match dir {
        Direction::Push => {
            let local = Device::open_read(&plan.local, Side::Local).map_err(|e| Error::Refused(e.to_string()))?;
            if local.size() == 0 {
                return Err(empty(Side::Local, &plan.local));
            }
            let ep = endpoint(plan, rep, ep)?;
            let access = Access::Write {
                source_size: local.size(),
                source: Some(local.identity().clone()),
                source_name: source.clone(),
                force: plan.force,
            };
            let opened = ep.open(access, p.hash, p.codec).map_err(|e| Fault::from(e).refused())?;
            if opened.created {
                rep.log(format_args!("created {receiver} ({} bytes)", local.size()));
            }
            let len = local.size();
            (local, ep, len)
        }
        Direction::Pull => {
            let ep = endpoint(plan, rep, ep)?;
            let opened = ep.open(Access::Read, p.hash, p.codec).map_err(|e| Fault::from(e).refused())?;
            if opened.size == 0 {
                return Err(empty(Side::Remote, &plan.remote));
            }
            let spec = ReceiverSpec {
                source_size: opened.size,
                source: Some(opened.identity.clone()),
                source_name: source.clone(),
                force: plan.force,
            };
            let local =
                Device::open_receiver(&plan.local, Side::Local, &spec).map_err(|e| Error::Refused(e.to_string()))?;
            if local.created() {
                rep.log(format_args!("created {receiver} ({} bytes)", opened.size));
            }
            (local, ep, opened.size)
        }
    };
    stats.device_size = len;
    rep.log(format_args!("device size {len} bytes ({})", human(len as f64)));
    rep.start(&format!("{mode:?}").to_uppercase(), len);
    let result = (|| -> Result<(), Fault> {
        match mode {
            Mode::Copy => stats.bytes_written += copy::run(&local, ep, len, p, dir, rep)?,
            Mode::Sync => {
                let c = compare::run(&local, ep, len, p, Purpose::Sync(dir), rep)?;
                stats.blocks_compared += c.blocks;
                stats.blocks_differing += c.differing;
                stats.bytes_written += c.written;
                rep.log(format_args!("{} of {} blocks differed; {} bytes written", c.differing, c.blocks, c.written));
            }
        }
        match dir {
            Direction::Push => ep.flush_device()?,
            Direction::Pull => local.sync()?,
        }
        Ok(())
    })();
    rep.finish();
    result.map_err(|f| f.transfer(&receiver))?;
    rep.log(format_args!("{mode:?} done: {receiver} is durable (fdatasync)"));
    Ok(len)
}

/// Re-reads both devices and compares them. `synced` is the length an action just
/// synchronized (a larger block-device receiver is compared over that length only).
fn recheck(
    plan: &Plan,
    rep: &mut Reporter,
    ep: &mut Option<Endpoint>,
    synced: Option<u64>,
    stats: &mut Stats,
) -> Result<(), Error> {
    let p = &plan.params;
    let after_action = synced.is_some();
    let fail = |msg: String| if after_action { Error::RecheckFailed(msg) } else { Error::Differ(msg) };
    let local = Device::open_read(&plan.local, Side::Local).map_err(|e| Error::Refused(e.to_string()))?;
    let ep = endpoint(plan, rep, ep)?;
    let opened = ep.open(Access::Read, p.hash, Codec::None).map_err(|e| Fault::from(e).refused())?;
    let len = match synced {
        Some(len) => len,
        None if local.size() != opened.size => {
            return Err(fail(format!(
                "the devices differ in size: {} is {} bytes, {} is {} bytes",
                name(Side::Local, &plan.local),
                local.size(),
                name(Side::Remote, &plan.remote),
                opened.size
            )));
        }
        None => local.size(),
    };
    if stats.device_size == 0 {
        stats.device_size = len;
    }
    rep.log(format_args!("recheck: comparing {len} bytes"));
    rep.start("RECHECK", len);
    let result = compare::run(&local, ep, len, p, Purpose::Check, rep);
    rep.finish();
    let c = match result {
        Ok(c) => c,
        Err(f) if after_action => return Err(Error::RecheckFailed(f.to_string())),
        Err(f) => return Err(Error::Refused(f.to_string())),
    };
    stats.blocks_compared += c.blocks;
    stats.blocks_differing += c.differing;
    if c.differing > 0 {
        return Err(fail(format!(
            "{} and {} differ in {} of {} blocks of {} bytes",
            name(Side::Local, &plan.local),
            name(Side::Remote, &plan.remote),
            c.differing,
            c.blocks,
            p.buffer
        )));
    }
    rep.log(format_args!("recheck: devices are identical ({} blocks)", c.blocks));
    Ok(())
}
