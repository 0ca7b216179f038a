//! One run: connect once (lazily, so that local refusals come first and cost no
//! connection), open both ends with every refusal before any write, COPY or SYNC (by a
//! full comparison or a tree walk), recheck, and close, saving both states.

use std::path::Path;

use super::bitmap::{self, Found, Outcome};
use super::bitmap_sync::Basis;
use super::compare::{self, Purpose};
use super::session::{
    Session, absorb, both_fresh, check_side_files, empty, layout, local_index, name, roots_equal, warn_unsaved,
};
use super::window::{Comparison, Ctx};
use super::{Direction, Error, Fault, Mode, Params, Plan, bitmap_sync, copy, since};
use crate::compress::Codec;
use crate::device::{Device, ReceiverSpec, Side};
use crate::digest_index::DigestIndex;
use crate::endpoint::Transport;
use crate::protocol::{Access, Closed, StateOptions, StateSummary};
use crate::report::{Interrupts, Reporter, Stats, human};
use crate::stamp::Role;

/// Both ends of a transfer, open, every refusal behind them.
struct Ends {
    /// The local device (source for PUSH, receiver for PULL).
    local: Device,
    /// Its digest index.
    index: DigestIndex,
    /// Bytes to synchronize: the source's size.
    len: u64,
    /// What the endpoint's state says.
    remote_state: StateSummary,
    /// What a SYNC with a bitmap compares the source with.
    basis: Option<Basis>,
    /// The receiver was created or resized by this run: it holds nothing of the source.
    renewed: bool,
}

/// Runs every phase the plan asks for over one endpoint (one SSH connection).
pub fn run(plan: &Plan, rep: &mut Reporter, stats: &mut Stats, interrupts: &Interrupts) -> Result<(), Error> {
    let mut devices = vec![plan.local.as_path()];
    if plan.transport == Transport::Local {
        devices.push(&plan.remote);
    }
    let mut files: Vec<&Path> = plan.bitmap.iter().map(|b| b.path.as_path()).collect();
    for (opts, local) in [(&plan.state, true), (&plan.remote_state, plan.transport == Transport::Local)] {
        if let (crate::protocol::StateMode::Path(p), true) = (&opts.mode, local) {
            files.push(p);
        }
    }
    check_side_files(&files, &devices)?;
    let mut session = Session::new(plan, rep, stats, interrupts);
    let mut bitmap = None;
    let result = session.phases(&mut bitmap);
    let result = session.close(result);
    bitmap::after_run(result, bitmap, session.rep)
}

impl Session<'_> {
    fn phases(&mut self, bitmap: &mut Option<Outcome>) -> Result<Option<Direction>, Error> {
        let plan = self.plan;
        match plan.action {
            None if !plan.recheck => self.probe().map(|()| None),
            None => self.recheck(None).map(|()| None),
            Some((dir, mode)) if plan.dry_run => self.dry_run(dir, mode).map(|()| None),
            Some((dir, mode)) => {
                let len = match plan.bitmap.as_ref().filter(|b| b.refresh_only) {
                    Some(b) => self.refresh_bitmap(b, dir, bitmap)?,
                    None => self.transfer(dir, mode, bitmap)?,
                };
                if plan.recheck {
                    self.recheck(Some(len))?;
                }
                Ok(Some(dir))
            }
        }
    }

    /// No action: both devices exist.
    fn probe(&mut self) -> Result<(), Error> {
        Device::probe(&self.plan.local, Side::Local).map_err(|e| Fault::Device(e).refused())?;
        let req = self.open_request(Access::Probe, Codec::None, StateOptions::off());
        self.endpoint()?.open(req).map_err(|e| Fault::from(e).refused())?;
        self.rep.log(format_args!(
            "both devices exist: {} and {}",
            name(Side::Local, &self.plan.local),
            name(Side::Remote, &self.plan.remote)
        ));
        Ok(())
    }

    /// Ends the session: a clean close makes the endpoint save its state and exit; after
    /// a failure it is stopped. Someone writing the endpoint's device meanwhile is an error.
    fn close(&mut self, result: Result<Option<Direction>, Error>) -> Result<(), Error> {
        let Some(ep) = self.ep.take() else { return result.map(|_| ()) };
        (self.stats.rx, self.stats.tx) = ep.traffic();
        (self.stats.data_sent, self.stats.zeros_sent) = ep.data_moved();
        let action = match result {
            Ok(action) => action,
            Err(err) => {
                ep.abandon();
                return Err(err);
            }
        };
        let closed: Closed = match (ep.close(), action) {
            (Ok(c), _) => c,
            (Err(err), None) => return Err(Fault::from(err).refused()),
            (Err(err), Some(dir)) => return Err(Fault::from(err).transfer(&self.receiver_name(dir))),
        };
        self.stats.remote_read = closed.bytes_read;
        if !closed.warning.is_empty() {
            warn_unsaved(self.rep, &closed.warning);
        }
        if action == Some(Direction::Push) {
            // What the receiver itself wrote, not what was sent to it.
            self.stats.bytes_written = closed.bytes_written;
        }
        if !closed.note.is_empty() {
            self.rep.log(format_args!("remote {}", closed.note));
        }
        let plan = self.plan;
        match action {
            Some(Direction::Pull) if closed.moved => Err(Error::SourceMoved {
                device: name(Side::Remote, &plan.remote),
                receiver: self.receiver_name(Direction::Pull),
            }),
            Some(Direction::Push) if closed.moved => {
                Err(Error::ReceiverMoved { device: name(Side::Remote, &plan.remote) })
            }
            _ => Ok(()),
        }
    }

    /// The bitmap, found and checked before the receiver is opened (which may create
    /// it); `None` without a bitmap.
    fn find_bitmap(&self, len: u64, dir: Direction) -> Result<Option<Found>, Error> {
        let Some(b) = &self.plan.bitmap else { return Ok(None) };
        let found = bitmap::find(b, bitmap::geometry(&self.plan.params, len), &self.source_name(dir));
        found.map(Some).map_err(|e| Fault::from(e).refused())
    }

    /// Once the receiver is open and before anything is written: the bitmap's basis and
    /// FILE ready for it (kept in `out` for the end of the run). A receiver just created
    /// or resized does not hold what FILE says: every block is sent.
    fn prepare_bitmap(
        &self,
        found: Option<Found>,
        renewed: bool,
        dir: Direction,
        out: &mut Option<Outcome>,
    ) -> Result<Option<Basis>, Error> {
        let (Some(found), Some(b)) = (found, &self.plan.bitmap) else { return Ok(None) };
        if renewed && found.digests().is_some() {
            let receiver = self.receiver_name(dir);
            self.rep
                .log(format_args!("{receiver} was created or resized: the bitmap is not used, every block is sent"));
        }
        let (basis, file) = found.prepare(b, renewed).map_err(|e| Fault::from(e).refused())?;
        *out = Some(Outcome { file, digests: None });
        Ok(Some(basis))
    }

    /// A receiver larger than the source keeps its tail: said on stderr, as the original
    /// accepts it.
    fn note_larger(&self, dir: Direction, receiver_size: u64, len: u64) {
        if receiver_size <= len {
            return;
        }
        let (source, receiver) = (self.source_name(dir), self.receiver_name(dir));
        self.rep.warn(format_args!(
            "{receiver} ({receiver_size} bytes) is larger than {source} ({len} bytes): only the source's length is synced, the rest is left as it is"
        ));
        self.rep
            .log(format_args!("{receiver}: {} bytes past the source's end are left untouched", receiver_size - len));
    }

    /// PUSH: the local source, its index and the bitmap first (a refusal here must not
    /// leave a created receiver), then the remote receiver.
    fn open_push(&mut self, out: &mut Option<Outcome>) -> Result<Ends, Error> {
        let plan = self.plan;
        let local = Device::open_read(&plan.local, Side::Local).map_err(|e| Fault::Device(e).refused())?;
        let len = local.size();
        if len == 0 {
            return Err(empty(Side::Local, &plan.local));
        }
        let mut index = local_index(&local, &plan.params, len, &plan.state, self.rep)?;
        let since = since::prepare(plan.since.as_ref(), &local, *index.layout(), plan.state.trust, self.rep)?;
        let found = self.find_bitmap(len, Direction::Push)?;
        let access = Access::Write {
            source_size: len,
            source: Some(local.identity().clone()),
            source_name: self.source_name(Direction::Push),
            force: plan.force,
            known_zero: plan.destination_is_zero,
        };
        let req = self.open_request(access, plan.params.codec, plan.remote_state.clone());
        self.connect_hashing(&local, &mut index, since.is_none())?;
        self.interrupts.receiver_may_change(&self.receiver_name(Direction::Push));
        let opened = self.endpoint()?.open(req).map_err(|e| Fault::from(e).refused())?;
        if opened.created {
            self.rep.log(format_args!("created {} ({len} bytes)", self.receiver_name(Direction::Push)));
        }
        self.note_larger(Direction::Push, opened.size, len);
        if let Some(since) = since {
            since.apply(&mut index, &local, &opened.state, self.rep)?;
        }
        let renewed = opened.created || opened.resized;
        let basis = self.prepare_bitmap(found, renewed, Direction::Push, out)?;
        Ok(Ends { local, index, len, remote_state: opened.state, basis, renewed })
    }

    /// Connects the endpoint. For a SYNC over SSH whose local source has unknown leaves
    /// (and no `--since` or bitmap decides what is read), the source is hashed meanwhile
    /// on other threads: setting up the connection takes a good part of a second.
    fn connect_hashing(&mut self, local: &Device, index: &mut DigestIndex, may_read: bool) -> Result<(), Error> {
        let plan = self.plan;
        let worth = matches!(plan.transport, Transport::Ssh(_))
            && plan.action.is_some_and(|(_, m)| m == Mode::Sync)
            && plan.bitmap.is_none()
            && may_read
            && !index.fresh();
        if !worth {
            return self.endpoint().map(|_| ());
        }
        let enough = std::sync::atomic::AtomicBool::new(false);
        let (connected, learnt) = std::thread::scope(|scope| {
            let hasher = scope.spawn(|| compare::hash_ahead(local, index, &enough));
            let connected = self.endpoint().map(|_| ());
            enough.store(true, std::sync::atomic::Ordering::Release);
            (connected, hasher.join())
        });
        let learnt = learnt.map_err(|_| Fault::Internal("hashing while connecting panicked").refused())?;
        self.rep.debug(format_args!("{learnt} blocks hashed while connecting"));
        connected
    }

    /// PULL: the remote source and the bitmap first, then the local receiver.
    fn open_pull(&mut self, out: &mut Option<Outcome>) -> Result<Ends, Error> {
        let plan = self.plan;
        let req = self.open_request(Access::Read, plan.params.codec, plan.remote_state.clone());
        let opened = self.endpoint()?.open(req).map_err(|e| Fault::from(e).refused())?;
        let len = opened.size;
        if len == 0 {
            return Err(empty(Side::Remote, &plan.remote));
        }
        let found = self.find_bitmap(len, Direction::Pull)?;
        let spec = ReceiverSpec {
            source_size: len,
            source: Some(opened.identity.clone()),
            source_name: self.source_name(Direction::Pull),
            force: plan.force,
            known_zero: plan.destination_is_zero,
        };
        DigestIndex::check_size(&layout(&plan.params, len), &plan.local).map_err(|e| Fault::State(e).refused())?;
        self.interrupts.receiver_may_change(&self.receiver_name(Direction::Pull));
        let local = Device::open_receiver(&plan.local, Side::Local, &spec).map_err(|e| Fault::Device(e).refused())?;
        if local.created() {
            self.rep.log(format_args!("created {} ({len} bytes)", self.receiver_name(Direction::Pull)));
        }
        self.note_larger(Direction::Pull, local.size(), len);
        let index = match local_index(&local, &plan.params, len, &plan.state, self.rep) {
            Ok(index) => index,
            // Nothing may be left behind by a refusal: a receiver this run created is
            // removed; one it resized is changed, so the failure is not a refusal.
            Err(Error::Refused(f)) if local.created() => {
                let _ = std::fs::remove_file(&plan.local);
                return Err(Error::Refused(f));
            }
            Err(Error::Refused(f)) if local.resized() => return Err(f.transfer(&self.receiver_name(Direction::Pull))),
            Err(e) => return Err(e),
        };
        let renewed = local.created() || local.resized();
        let basis = self.prepare_bitmap(found, renewed, Direction::Pull, out)?;
        Ok(Ends { local, index, len, remote_state: opened.state, basis, renewed })
    }

    /// The run's parameters with the refinement decided. Every state keeps its leaves'
    /// piece digests (16 KiB, or `--chunk`), so a differing leaf is always narrowed to
    /// its differing pieces, and a receiver whose state is fresh answers for them without
    /// being read. Going below the stored pieces (to 4 KiB) needs the receiver's
    /// differing pieces read: done over SSH, where the link is what costs, and locally
    /// only when the receiver is read anyway.
    fn run_params(&self, dir: Direction, ends: &Ends) -> Params {
        let receiver_fresh = match dir {
            Direction::Push => ends.remote_state.fresh,
            Direction::Pull => ends.index.fresh(),
        };
        let over_link = matches!(self.plan.transport, Transport::Ssh(_));
        let mut params = self.plan.params.clone();
        let piece = ends.index.layout().piece() as usize;
        if params.refine.is_none() && params.buffer > piece {
            let below = (over_link || !receiver_fresh) && piece > super::DEFAULT_REFINE;
            params.refine = Some(if below { super::DEFAULT_REFINE } else { piece });
        }
        params
    }

    /// COPY or SYNC in `dir`; returns the length synchronized.
    fn transfer(&mut self, dir: Direction, mode: Mode, bitmap: &mut Option<Outcome>) -> Result<u64, Error> {
        let (source, receiver) = (self.source_name(dir), self.receiver_name(dir));
        let p = &self.plan.params;
        self.rep.log(format_args!(
            "{dir:?} {mode:?}: {source} -> {receiver}; hash {}, buffer {} KiB{}, compression {}",
            p.hash,
            p.buffer / 1024,
            p.chunk.map(|c| format!(", chunk {} KiB", c / 1024)).unwrap_or_default(),
            p.codec.describe()
        ));
        let mut ends = match dir {
            Direction::Push => self.open_push(bitmap)?,
            Direction::Pull => self.open_pull(bitmap)?,
        };
        if !ends.remote_state.note.is_empty() {
            self.rep.log(format_args!("remote {}", ends.remote_state.note));
        }
        let len = ends.len;
        self.stats.device_size = len;
        self.rep.log(format_args!("device size {len} bytes ({})", human(len as f64)));
        self.rep.start(if mode == Mode::Copy { "sending" } else { "comparing" }, len);
        let params = self.run_params(dir, &ends);
        let result = self.move_data(dir, mode, &mut ends, &params, bitmap);
        self.rep.finish();
        self.stats.local_read += ends.local.bytes_read();
        match result.map_err(|f| f.transfer(&receiver))? {
            true => {}
            false if dir == Direction::Push => return Err(Error::SourceMoved { device: source, receiver }),
            false => return Err(Error::ReceiverMoved { device: receiver }),
        }
        self.rep.log(format_args!("{mode:?} done: {receiver} is durable (fdatasync)"));
        Ok(len)
    }

    /// Moves the data, makes it durable on the receiver and finishes the local state;
    /// `Ok(false)` if someone else wrote the local device meanwhile. With a bitmap, the
    /// source's block digests are left in `bitmap` for the end of the run.
    fn move_data(
        &mut self,
        dir: Direction,
        mode: Mode,
        ends: &mut Ends,
        params: &Params,
        bitmap: &mut Option<Outcome>,
    ) -> Result<bool, Fault> {
        let resume = match mode {
            Mode::Copy => resumed_copy(dir, ends, self.rep),
            Mode::Sync => 0,
        };
        let Ends { local, index, remote_state, basis, .. } = ends;
        let Session { rep, stats, ep, .. } = self;
        let (rep, ep) = (&**rep, ep.as_mut().ok_or(Fault::Internal("no endpoint"))?);
        let role = if dir == Direction::Pull { Role::Receiver } else { Role::Read };
        let mut ctx = Ctx { local, index, ep, params, rep };
        let c = match (mode, basis.as_ref(), bitmap.as_mut()) {
            (Mode::Copy, ..) if resume > 0 => {
                rep.phase("comparing");
                let prefix = compare::run_first(ctx.reborrow(), Purpose::Sync(dir), resume)?;
                rep.log(format_args!(
                    "{} of those {resume} blocks differed; copying from block {resume} on",
                    prefix.differing
                ));
                rep.phase("sending");
                let written = copy::run(ctx, dir, resume)?;
                Comparison { written: prefix.written + written, ..prefix }
            }
            (Mode::Copy, ..) => Comparison { written: copy::run(ctx, dir, 0)?, ..Comparison::default() },
            (Mode::Sync, Some(b @ (Basis::File(_) | Basis::Nothing)), Some(out)) => {
                rep.log(match b {
                    Basis::File(_) => "comparing the source with the bitmap: the receiver is not read",
                    _ => "the bitmap starts from scratch: every block is sent, the receiver is not read",
                });
                let (c, digests) = bitmap_sync::sync(ctx, dir, b, &mut out.file)?;
                out.digests = Some(digests);
                sync_done(rep, c)
            }
            (Mode::Sync, ..) => sync(ctx, dir, remote_state)?,
        };
        absorb(stats, &c);
        stats.blocks_sent += match mode {
            Mode::Copy => index.layout().leaf_count() - resume + c.differing,
            Mode::Sync => c.differing,
        };
        rep.phase("flushing");
        match dir {
            Direction::Push => ep.flush_device()?,
            Direction::Pull => index.settle(local, Role::Receiver)?,
        }
        if let (Some(Basis::Receiver), Some(out)) = (basis.as_ref(), bitmap.as_mut()) {
            // The receiver now holds the source's blocks; the local device (the source of
            // a PUSH, the synced receiver of a PULL) is read for their plain digests.
            rep.log("reading the local device for the bitmap's block digests");
            out.digests = Some(bitmap_sync::local_digests(local, index, false, None)?);
        }
        let loaded = index.note().to_string();
        let unchanged = index.finish(local, role)?;
        if let Some(e) = index.unsaved() {
            warn_unsaved(rep, format_args!("local {e}"));
        } else if index.note() != loaded {
            rep.log(format_args!("local {}", index.note()));
        }
        Ok(unchanged)
    }
}

/// How many leaves, from the first on, a COPY compares instead of copying (0: none): an
/// interrupted COPY left a checkpoint of the source's state, and the receiver was not
/// made anew, so it likely holds those leaves already. Comparing them costs a read of
/// the receiver's part, which the source's state answers without reading the source;
/// a rerun of a COPY that completed (its source state whole) copies everything again.
fn resumed_copy(dir: Direction, ends: &Ends, rep: &Reporter) -> u64 {
    let leaves = ends.index.layout().leaf_count();
    let confirmed = match dir {
        Direction::Push => ends.index.valid_prefix(),
        Direction::Pull => ends.remote_state.confirmed,
    };
    if ends.renewed || confirmed == 0 || confirmed >= leaves {
        return 0;
    }
    rep.log(format_args!(
        "resuming an interrupted COPY: the source's checkpoint confirms its first {confirmed} of {leaves} blocks; comparing them with the receiver"
    ));
    confirmed
}

/// A regular SYNC: by walking both fresh trees, or by comparing digests.
fn sync(ctx: Ctx<'_>, dir: Direction, remote_state: &StateSummary) -> Result<Comparison, Fault> {
    let rep = ctx.rep;
    if both_fresh(ctx.index, remote_state) && roots_equal(ctx.index, remote_state) {
        rep.log("both states are fresh and their roots are equal: nothing to read or send");
        return Ok(Comparison { nodes: 1, ..Comparison::default() });
    }
    if both_fresh(ctx.index, remote_state) {
        rep.log("both states are fresh: walking the trees");
        return Ok(sync_done(rep, compare::walk(ctx, Purpose::Sync(dir))?));
    }
    Ok(sync_done(rep, compare::run(ctx, Purpose::Sync(dir))?))
}

/// Logs what a SYNC comparison did.
fn sync_done(rep: &Reporter, c: Comparison) -> Comparison {
    rep.log(format_args!("{} of {} blocks differed; {} bytes written", c.differing, c.blocks, c.written));
    c
}
