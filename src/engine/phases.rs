//! The phases of a run: connect once, open both ends with every refusal before any
//! write, transfer (COPY, SYNC by full read or tree walk), recheck, and finish the
//! states; and `basyn index`.

use std::path::Path;

use super::compare::{self, Comparison, Purpose};
use super::{Direction, Error, Fault, IndexPlan, Mode, Plan, Transport, bitmap, copy};
use crate::compress::Codec;
use crate::device::{Device, DeviceError, Problem, ReceiverSpec, Side};
use crate::endpoint::{Closed, Endpoint, Link, OpenRequest};
use crate::ledger::{Ledger, Role, StateOptions};
use crate::protocol::{Access, StateSummary};
use crate::report::{Reporter, Stats, human};
use crate::state::Layout;
use crate::tree::DEFAULT_FANOUT;

fn connect_to(transport: &Transport, device: &Path, rep: &Reporter) -> Result<Endpoint, Fault> {
    let link = match transport {
        Transport::Local => Link::local_child(device)?,
        Transport::Ssh(target) => crate::ssh::connect(target, device, &|line| rep.log(line))?,
    };
    Ok(Endpoint::connect(link)?)
}

fn name(side: Side, path: &Path) -> String {
    format!("{side} {}", path.display())
}

fn refused(e: impl std::fmt::Display) -> Error {
    Error::Refused(e.to_string())
}

/// Runs every phase the plan asks for over one endpoint (one SSH connection), connected
/// lazily so that local refusals come first and cost no connection.
pub fn run(plan: &Plan, rep: &mut Reporter, stats: &mut Stats) -> Result<(), Error> {
    let mut bitmap_out = None;
    let result = session(plan, rep, stats, &mut bitmap_out);
    let Some(b) = plan.bitmap.as_ref().filter(|b| !b.update_only) else { return result };
    match (&result, bitmap_out) {
        // Saved only once the receiver is known to hold the source's data and nobody
        // else wrote it during the run.
        (Ok(()), Some((layout, leaves))) => {
            bitmap::save(&b.path, &layout, &plan.local, leaves).map_err(|e| Error::Transfer {
                message: format!("cannot save the bitmap: {e}"),
                receiver: receiver_name(plan, plan.action.map_or(Direction::Push, |(d, _)| d)),
            })?;
            rep.log(format_args!("bitmap {} updated", b.path.display()));
        }
        // Nothing was changed: the bitmap still describes the receiver.
        (Err(Error::Refused(_)), _) => {}
        // The receiver may be partly changed: the bitmap no longer describes it.
        _ => {
            if std::fs::remove_file(&b.path).is_ok() {
                rep.log(format_args!("bitmap {} removed: it no longer describes the receiver", b.path.display()));
            }
        }
    }
    result
}

/// The bitmap to save when the run succeeds: the layout and the source's leaf digests.
type BitmapOut = Option<(crate::state::Layout, Vec<u8>)>;

fn session(plan: &Plan, rep: &mut Reporter, stats: &mut Stats, bitmap_out: &mut BitmapOut) -> Result<(), Error> {
    let mut ep: Option<Endpoint> = None;
    let result = phases(plan, rep, &mut ep, stats, bitmap_out);
    let Some(e) = ep else { return result.map(|_| ()) };
    stats.rx = e.rx.get();
    stats.tx = e.tx.get();
    match result {
        // A clean end of session: the endpoint saves its state and must exit cleanly.
        Ok(action) => {
            let closed: Closed = match (e.close(), action) {
                (Ok(c), _) => c,
                (Err(err), None) => return Err(Fault::from(err).refused()),
                (Err(err), Some(dir)) => return Err(Fault::from(err).transfer(&receiver_name(plan, dir))),
            };
            stats.remote_read = closed.bytes_read;
            if !closed.note.is_empty() {
                rep.log(format_args!("remote {}", closed.note));
            }
            match action {
                Some(Direction::Pull) if closed.moved => {
                    return Err(Error::SourceMoved {
                        device: name(Side::Remote, &plan.remote),
                        receiver: name(Side::Local, &plan.local),
                    });
                }
                Some(Direction::Push) if closed.moved => {
                    return Err(Error::ReceiverMoved { device: name(Side::Remote, &plan.remote) });
                }
                _ => {}
            }
            Ok(())
        }
        Err(err) => {
            e.abandon();
            Err(err)
        }
    }
}

fn phases(
    plan: &Plan,
    rep: &mut Reporter,
    ep: &mut Option<Endpoint>,
    stats: &mut Stats,
    bitmap_out: &mut BitmapOut,
) -> Result<Option<Direction>, Error> {
    match plan.action {
        None if !plan.recheck => {
            Device::probe(&plan.local, Side::Local).map_err(refused)?;
            let e = endpoint(plan, rep, ep)?;
            let req = open_request(plan, Access::Probe, Codec::None, StateOptions::off());
            e.open(req).map_err(|e| Fault::from(e).refused())?;
            rep.log(format_args!(
                "both devices exist: {} and {}",
                name(Side::Local, &plan.local),
                name(Side::Remote, &plan.remote)
            ));
            Ok(None)
        }
        None => recheck(plan, rep, ep, None, stats).map(|()| None),
        Some((dir, mode)) => {
            let len = transfer(plan, rep, ep, dir, mode, stats, bitmap_out)?;
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
        *ep = Some(connect_to(&plan.transport, &plan.remote, rep).map_err(Fault::refused)?);
    }
    ep.as_mut().ok_or(Error::Refused("internal error: no endpoint".into()))
}

fn open_request(plan: &Plan, access: Access, codec: Codec, state: StateOptions) -> OpenRequest {
    let p = &plan.params;
    OpenRequest { access, hash: p.hash, codec, buffer: p.buffer as u64, chunk: p.chunk.map(|c| c as u64), state }
}

fn layout(params: &super::Params, device_size: u64) -> Layout {
    Layout {
        hash: params.hash,
        buffer: params.buffer as u64,
        chunk: params.chunk.map(|c| c as u64),
        fanout: DEFAULT_FANOUT as u32,
        device_size,
    }
}

/// Opens the local device's ledger (its state) for a run over `len` bytes.
fn local_ledger(
    device: &Device,
    params: &super::Params,
    len: u64,
    opts: &StateOptions,
    rep: &Reporter,
) -> Result<Ledger, Error> {
    let ledger = Ledger::open(device, layout(params, len), opts).map_err(|e| Error::Refused(format!("local {e}")))?;
    rep.log(format_args!("local {}", ledger.note()));
    Ok(ledger)
}

/// Both trees are fresh and built alike: they can be compared without reading.
fn both_fresh(ledger: &mut Ledger, remote: &StateSummary) -> bool {
    remote.fresh
        && ledger.fresh()
        && ledger.tree().is_some_and(|t| t.height() as u32 == remote.height && t.root().is_some())
}

fn roots_equal(ledger: &mut Ledger, remote: &StateSummary) -> bool {
    let ours = ledger.tree().and_then(|t| t.root());
    matches!((ours, &remote.root), (Some(a), Some(b)) if a.as_bytes() == b.as_slice())
}

fn absorb(stats: &mut Stats, c: &Comparison) {
    stats.blocks_compared += c.blocks;
    stats.blocks_differing += c.differing;
    stats.bytes_written += c.written;
    stats.nodes_compared += c.nodes;
}

fn transfer(
    plan: &Plan,
    rep: &mut Reporter,
    ep: &mut Option<Endpoint>,
    dir: Direction,
    mode: Mode,
    stats: &mut Stats,
    bitmap_out: &mut BitmapOut,
) -> Result<u64, Error> {
    let p = &plan.params;
    if let Some(b) = plan.bitmap.as_ref().filter(|b| b.update_only) {
        return refresh_bitmap(plan, b, rep, ep, dir, stats);
    }
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
    let empty =
        |side, path: &Path| refused(DeviceError { side, path: path.display().to_string(), problem: Problem::Empty });
    // The bitmap is checked before the receiver is opened (which may create it).
    let load_bitmap = |len: u64| match &plan.bitmap {
        Some(b) if !b.reset => bitmap::load(&b.path, &layout(p, len)).map_err(Error::Refused),
        _ => Ok(None),
    };

    // Open both ends; every refusal happens here, before anything is written. (Opening
    // the receiver may create or resize it: from then on an interruption may leave it
    // partly changed.)
    let (local, ep, len, remote_state, local_ledger_opened, mut bitmap, renewed) = match dir {
        Direction::Push => {
            let local = Device::open_read(&plan.local, Side::Local).map_err(refused)?;
            if local.size() == 0 {
                return Err(empty(Side::Local, &plan.local));
            }
            // The local lock first: a refusal here must not leave a created receiver.
            let ledger = local_ledger(&local, p, local.size(), &plan.state, rep)?;
            let bitmap = load_bitmap(local.size())?;
            let ep = endpoint(plan, rep, ep)?;
            let access = Access::Write {
                source_size: local.size(),
                source: Some(local.identity().clone()),
                source_name: source.clone(),
                force: plan.force,
            };
            let req = open_request(plan, access, p.codec, plan.remote_state.clone());
            crate::report::mark_writing();
            let opened = ep.open(req).map_err(|e| Fault::from(e).refused())?;
            if opened.created {
                rep.log(format_args!("created {receiver} ({} bytes)", local.size()));
            }
            let len = local.size();
            let renewed = opened.created || opened.resized;
            (local, ep, len, opened.state, Some(ledger), bitmap, renewed)
        }
        Direction::Pull => {
            let ep = endpoint(plan, rep, ep)?;
            let req = open_request(plan, Access::Read, p.codec, plan.remote_state.clone());
            let opened = ep.open(req).map_err(|e| Fault::from(e).refused())?;
            if opened.size == 0 {
                return Err(empty(Side::Remote, &plan.remote));
            }
            let bitmap = load_bitmap(opened.size)?;
            let spec = ReceiverSpec {
                source_size: opened.size,
                source: Some(opened.identity.clone()),
                source_name: source.clone(),
                force: plan.force,
            };
            crate::report::mark_writing();
            let local = Device::open_receiver(&plan.local, Side::Local, &spec).map_err(refused)?;
            if local.created() {
                rep.log(format_args!("created {receiver} ({} bytes)", opened.size));
            }
            let renewed = local.created() || local.resized();
            (local, ep, opened.size, opened.state, None, bitmap, renewed)
        }
    };
    if renewed && bitmap.take().is_some() {
        // A receiver just created or resized does not hold what the bitmap says.
        rep.log(format_args!("{receiver} was created or resized: the bitmap is not used, it is rebuilt"));
    }
    if !remote_state.note.is_empty() {
        rep.log(format_args!("remote {}", remote_state.note));
    }
    let mut ledger = match local_ledger_opened {
        Some(l) => l,
        None => local_ledger(&local, p, len, &plan.state, rep)?,
    };
    stats.device_size = len;
    rep.log(format_args!("device size {len} bytes ({})", human(len as f64)));
    rep.start(&format!("{mode:?}").to_uppercase(), len);
    let role = if dir == Direction::Pull { Role::Receiver } else { Role::Read };
    // Refining a differing block needs the receiver's digests of its pieces. Over SSH the
    // link is what costs, so the receiver's differing blocks are read to refine them.
    // Locally a pipe costs nothing: refine only when the receiver is read anyway, so that a
    // fresh receiver state means the receiver is not read at all. (With --chunk the states
    // hold the chunk digests and nothing extra is read either way.)
    let receiver_fresh = match dir {
        Direction::Push => remote_state.fresh,
        Direction::Pull => ledger.fresh(),
    };
    let over_link = matches!(plan.transport, Transport::Ssh(_));
    let mut run_params = p.clone();
    if run_params.refine.is_none() && (over_link || !receiver_fresh) && run_params.buffer > super::DEFAULT_REFINE {
        run_params.refine = Some(super::DEFAULT_REFINE);
    }
    let p = &run_params;
    let result = (|| -> Result<bool, Fault> {
        let mut source_leaves = None;
        match mode {
            Mode::Copy => stats.bytes_written += copy::run(&local, &mut ledger, ep, len, p, dir, rep)?,
            Mode::Sync if bitmap.is_some() => {
                rep.log("comparing the source with the bitmap: the receiver is not read");
                let (c, leaves) = bitmap::sync(&local, &mut ledger, Some(ep), len, p, dir, bitmap.as_deref(), rep)?;
                source_leaves = Some(leaves);
                absorb(stats, &c);
                rep.log(format_args!("{} of {} blocks differed; {} bytes written", c.differing, c.blocks, c.written));
            }
            Mode::Sync if both_fresh(&mut ledger, &remote_state) && roots_equal(&mut ledger, &remote_state) => {
                rep.log("both states are fresh and their roots are equal: nothing to read or send");
                stats.nodes_compared += 1;
            }
            Mode::Sync => {
                let c = if both_fresh(&mut ledger, &remote_state) {
                    rep.log("both states are fresh: walking the trees");
                    compare::walk(&local, &mut ledger, ep, len, p, Purpose::Sync(dir), rep)?
                } else {
                    compare::run(&local, &mut ledger, ep, len, p, Purpose::Sync(dir), rep)?
                };
                absorb(stats, &c);
                rep.log(format_args!("{} of {} blocks differed; {} bytes written", c.differing, c.blocks, c.written));
            }
        }
        match dir {
            Direction::Push => ep.flush_device()?,
            Direction::Pull => {
                local.sync()?;
                ledger.durable(&local)?;
            }
        }
        if plan.bitmap.is_some() {
            // The receiver now holds the source's blocks. The local ledger knows them all,
            // except leaves of a local receiver patched piece by piece: read those back.
            let leaves = match source_leaves.take() {
                Some(l) => l,
                None => {
                    let mut buf = Vec::new();
                    for leaf in 0..ledger.layout().leaf_count() {
                        if ledger.leaf(leaf).is_none() {
                            ledger.read_leaf(&local, leaf, &mut buf)?;
                        }
                    }
                    ledger.complete_leaves().ok_or(Fault::Internal("bitmap leaves unknown"))?
                }
            };
            *bitmap_out = Some((*ledger.layout(), leaves));
        }
        ledger.finish(&local, role).map_err(|e| Fault::State(format!("local {e}")))
    })();
    rep.finish();
    stats.local_read += local.bytes_read();
    let unchanged = result.map_err(|f| f.transfer(&receiver))?;
    match (unchanged, dir) {
        (true, _) => {}
        (false, Direction::Push) => return Err(Error::SourceMoved { device: source, receiver }),
        (false, Direction::Pull) => return Err(Error::ReceiverMoved { device: receiver }),
    }
    rep.log(format_args!("{mode:?} done: {receiver} is durable (fdatasync)"));
    Ok(len)
}

/// `--update-bitmap`: refreshes the bitmap from the source without transferring
/// anything (the user declares that the receiver already holds the source's data).
fn refresh_bitmap(
    plan: &Plan,
    b: &super::BitmapPlan,
    rep: &mut Reporter,
    ep: &mut Option<Endpoint>,
    dir: Direction,
    stats: &mut Stats,
) -> Result<u64, Error> {
    let p = &plan.params;
    let (local, len, endpoint) = match dir {
        Direction::Push => {
            let local = Device::open_read(&plan.local, Side::Local).map_err(refused)?;
            let len = local.size();
            (local, len, None)
        }
        Direction::Pull => {
            let e = endpoint(plan, rep, ep)?;
            let req = open_request(plan, Access::Read, Codec::None, plan.remote_state.clone());
            let opened = e.open(req).map_err(|e| Fault::from(e).refused())?;
            let local = Device::open_read(&plan.local, Side::Local).map_err(refused)?;
            (local, opened.size, Some(e))
        }
    };
    stats.device_size = len;
    let state = if dir == Direction::Push { plan.state.clone() } else { StateOptions::off() };
    let mut ledger = local_ledger(&local, p, len, &state, rep)?;
    rep.start("BITMAP", len);
    let result = bitmap::sync(&local, &mut ledger, endpoint, len, p, dir, None, rep);
    rep.finish();
    stats.local_read += local.bytes_read();
    let (c, leaves) = result.map_err(|f| Error::Refused(f.to_string()))?;
    stats.blocks_compared += c.blocks;
    bitmap::save(&b.path, ledger.layout(), &plan.local, leaves).map_err(refused)?;
    if dir == Direction::Push && !ledger.finish(&local, Role::Read).map_err(refused)? {
        return Err(Error::SourceMoved {
            device: name(Side::Local, &plan.local),
            receiver: b.path.display().to_string(),
        });
    }
    rep.log(format_args!("bitmap {} refreshed from the source; nothing was transferred", b.path.display()));
    Ok(len)
}

/// Compares both devices. After an action (`synced` is the length it synchronized) the
/// devices are re-read, whatever the states say: this checks what is on disk. Without an
/// action, fresh states on both sides answer from their roots without reading.
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
    // After an action something was written: a failure to recheck is not "nothing changed".
    let broken = |msg: String| if after_action { Error::RecheckFailed(msg) } else { Error::Refused(msg) };
    let local = Device::open_read(&plan.local, Side::Local).map_err(|e| broken(e.to_string()))?;
    let ep = endpoint(plan, rep, ep)?;
    let (local_state, remote_state) = if after_action {
        (StateOptions::off(), StateOptions::off())
    } else {
        (plan.state.clone(), plan.remote_state.clone())
    };
    let opened = ep
        .open(open_request(plan, Access::Read, Codec::None, remote_state))
        .map_err(|e| broken(Fault::from(e).to_string()))?;
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
    if !opened.state.note.is_empty() {
        rep.log(format_args!("remote {}", opened.state.note));
    }
    let mut ledger = if len == 0 { None } else { Some(local_ledger(&local, p, len, &local_state, rep)?) };
    rep.log(format_args!("recheck: comparing {len} bytes"));
    rep.start("RECHECK", len);
    let fresh = ledger.as_mut().is_some_and(|l| both_fresh(l, &opened.state));
    let result = match ledger.as_mut() {
        None => Ok(Comparison::default()),
        Some(l) if fresh => {
            rep.log("recheck: both states are fresh: comparing their trees, reading nothing");
            if roots_equal(l, &opened.state) {
                rep.advance(len);
                Ok(Comparison { blocks: l.layout().leaf_count(), nodes: 1, ..Comparison::default() })
            } else {
                compare::walk(&local, l, ep, len, p, Purpose::Check, rep)
            }
        }
        Some(l) => compare::run(&local, l, ep, len, p, Purpose::Check, rep),
    };
    rep.finish();
    stats.local_read += local.bytes_read();
    let c = match result {
        Ok(c) => c,
        Err(f) if after_action => return Err(Error::RecheckFailed(f.to_string())),
        Err(f) => return Err(Error::Refused(f.to_string())),
    };
    if let Some(l) = ledger.as_mut() {
        // A check only reads: if the device moved meanwhile, its state is simply not kept.
        if let Ok(false) = l.finish(&local, Role::Read) {
            rep.log("local device was written during the check; its state was not saved");
        }
    }
    absorb(stats, &c);
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

/// `basyn index`: builds or refreshes the state of one device, reading only the leaves
/// its state does not already prove. Over SSH the remote host does the work.
pub fn index(plan: &IndexPlan, stats: &mut Stats) -> Result<(), Error> {
    let mut rep = Reporter::new(plan.output);
    let p = &plan.params;
    let result = match &plan.transport {
        Transport::Local => {
            let device = Device::open_read(&plan.device, Side::Local).map_err(refused)?;
            let len = device.size();
            stats.device_size = len;
            let mut ledger = local_ledger(&device, p, len, &plan.state, &rep)?;
            rep.start("INDEX", len);
            let mut buf = Vec::new();
            let n = ledger.layout().leaf_count();
            let mut read = 0u64;
            for leaf in 0..n {
                let leaf_len = (len - leaf * p.buffer as u64).min(p.buffer as u64);
                if ledger.leaf(leaf).is_none() {
                    ledger.read_leaf(&device, leaf, &mut buf).map_err(|e| Error::Refused(e.to_string()))?;
                    read += 1;
                }
                rep.advance(leaf_len);
            }
            rep.finish();
            stats.local_read = device.bytes_read();
            stats.blocks_compared = n;
            match ledger.finish(&device, Role::Read) {
                Ok(true) => {
                    rep.log(format_args!("indexed {}: {n} leaves, {read} read", name(Side::Local, &plan.device)));
                    Ok(())
                }
                Ok(false) => Err(Error::RecheckFailed(format!(
                    "{} was written to while it was indexed; run basyn index again",
                    name(Side::Local, &plan.device)
                ))),
                Err(e) => Err(Error::Refused(format!("local {e}"))),
            }
        }
        Transport::Ssh(_) => index_remote(plan, &mut rep, stats),
    };
    rep.finish();
    stats.elapsed = rep.elapsed();
    result
}

fn index_remote(plan: &IndexPlan, rep: &mut Reporter, stats: &mut Stats) -> Result<(), Error> {
    let p = &plan.params;
    let mut ep = connect_to(&plan.transport, &plan.device, rep).map_err(Fault::refused)?;
    let req = OpenRequest {
        access: Access::Read,
        hash: p.hash,
        codec: Codec::None,
        buffer: p.buffer as u64,
        chunk: p.chunk.map(|c| c as u64),
        state: plan.state.clone(),
    };
    let opened = ep.open(req).map_err(|e| Fault::from(e).refused())?;
    rep.log(format_args!("remote {}", opened.state.note));
    stats.device_size = opened.size;
    rep.start("INDEX", opened.size);
    // Asking for every leaf digest makes the endpoint learn (read) the unknown ones.
    let step = (16u64 << 20) / p.buffer as u64 * p.buffer as u64;
    let mut at = 0;
    while at < opened.size {
        let n = step.max(p.buffer as u64).min(opened.size - at);
        let msg = crate::protocol::Message::HashBlocks { offset: at, len: n, block: p.buffer as u32 };
        ep.request(msg).map_err(|e| Fault::from(e).refused())?;
        ep.recv().map_err(|e| Fault::from(e).refused())?;
        rep.advance(n);
        at += n;
    }
    rep.finish();
    stats.rx = ep.rx.get();
    stats.tx = ep.tx.get();
    let closed = ep.close().map_err(|e| Fault::from(e).refused())?;
    stats.remote_read = closed.bytes_read;
    stats.blocks_compared = opened.size.div_ceil(p.buffer as u64);
    if closed.moved {
        return Err(Error::RecheckFailed(format!(
            "{} was written to while it was indexed; run basyn index again",
            name(Side::Remote, &plan.device)
        )));
    }
    rep.log(format_args!("remote {}", closed.note));
    Ok(())
}
