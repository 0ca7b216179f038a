//! `basyn index DEVICE`: builds or refreshes the state of one device, reading only the
//! leaves its state does not already prove. Over SSH the remote host does the work.

use super::session::{check_side_files, layout, local_index, name};
use super::{Error, Fault, IndexPlan};
use crate::compress::Codec;
use crate::device::{Device, Side};
use crate::endpoint::{Endpoint, EndpointError, Transport};
use crate::protocol::{AbortCode, Access, OpenRequest};
use crate::report::{Reporter, Stats};
use crate::stamp::Role;

/// Leaf digests asked for per request when the remote host indexes.
const BATCH_BYTES: u64 = 16 << 20;

/// Runs `basyn index`, filling `stats`. An index only reads, so an interruption never
/// changes a device.
pub fn index(plan: &IndexPlan, stats: &mut Stats) -> Result<(), Error> {
    if let (crate::protocol::StateMode::Path(p), Transport::Local) = (&plan.state.mode, &plan.transport) {
        check_side_files(&[p], &[&plan.device])?;
    }
    let mut rep = Reporter::new(plan.output);
    let result = match &plan.transport {
        Transport::Local => index_local(plan, &mut rep, stats),
        Transport::Ssh(_) => index_remote(plan, &mut rep, stats),
    };
    rep.finish();
    stats.elapsed = rep.elapsed();
    result
}

fn index_local(plan: &IndexPlan, rep: &mut Reporter, stats: &mut Stats) -> Result<(), Error> {
    let device = Device::open_read(&plan.device, Side::Local).map_err(|e| Fault::Device(e).refused())?;
    let len = device.size();
    stats.device_size = len;
    let mut index = local_index(&device, &plan.params, len, &plan.state, rep)?;
    rep.start("hashing", len);
    let read = index.fill(&device, |n| rep.advance(n)).map_err(|e| Fault::Device(e).refused());
    rep.finish();
    stats.local_read = device.bytes_read();
    let read = read?;
    let n = index.layout().leaf_count();
    stats.blocks_compared = n;
    let shown = name(Side::Local, &plan.device);
    match index.finish(&device, Role::Read) {
        // Saving the state is what `basyn index` is for.
        Ok(true) => {
            if let Some(e) = index.take_unsaved() {
                return Err(Fault::State(e).refused());
            }
            rep.log(format_args!("indexed {shown}: {n} leaves, {read} read"));
            Ok(())
        }
        Ok(false) => Err(Error::IndexMoved { device: shown }),
        Err(e) => Err(Fault::from(e).refused()),
    }
}

fn index_remote(plan: &IndexPlan, rep: &mut Reporter, stats: &mut Stats) -> Result<(), Error> {
    let p = &plan.params;
    let refused = |e| Fault::Endpoint(e).refused();
    let mut ep = Endpoint::connect(&plan.transport, &plan.device, (plan.timeout, None), &|line| rep.log(line))
        .map_err(refused)?;
    let req = OpenRequest {
        access: Access::Read,
        hash: p.hash,
        codec: Codec::None,
        buffer: p.buffer as u64,
        chunk: p.chunk.map(|c| c as u64),
        state: plan.state.clone(),
        device: crate::protocol::path_bytes(&plan.device),
    };
    let opened = ep.open(req).map_err(refused)?;
    rep.log(format_args!("remote {}", opened.state.note));
    stats.device_size = opened.size;
    let layout = layout(p, opened.size);
    rep.start("hashing", opened.size);
    // Asking for every leaf digest makes the endpoint learn (read) the unknown ones.
    let step = (BATCH_BYTES / layout.buffer).max(1) * layout.buffer;
    let mut at = 0;
    while at < opened.size {
        let n = step.min(opened.size - at);
        ep.ask_digests(at, n, layout.buffer as u32).map_err(refused)?;
        ep.digests(p.hash, n.div_ceil(layout.buffer) as usize).map_err(refused)?;
        rep.advance(n);
        at += n;
    }
    rep.finish();
    (stats.rx, stats.tx) = ep.traffic();
    let closed = ep.close().map_err(refused)?;
    stats.remote_read = closed.bytes_read;
    stats.blocks_compared = layout.leaf_count();
    if closed.moved {
        return Err(Error::IndexMoved { device: name(Side::Remote, &plan.device) });
    }
    if !closed.warning.is_empty() {
        let failed = EndpointError::Abort { code: AbortCode::Failed, message: closed.warning };
        return Err(Fault::Endpoint(failed).refused());
    }
    rep.log(format_args!("remote {}", closed.note));
    Ok(())
}
