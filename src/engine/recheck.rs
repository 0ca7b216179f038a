//! RECHECK: compares both devices. After an action the devices are re-read, whatever
//! the states say: this checks what is on disk. Without an action, fresh states on
//! both sides answer from their roots without reading.

use super::compare::{self, Purpose};
use super::session::{Session, absorb, both_fresh, local_index, name, roots_equal};
use super::window::{Comparison, Ctx};
use super::{Differences, Error, Fault};
use crate::compress::Codec;
use crate::device::{Device, Side};
use crate::protocol::{Access, StateOptions};
use crate::stamp::Role;

impl Session<'_> {
    /// Compares both devices; `synced` is the length an action just synchronized.
    pub(super) fn recheck(&mut self, synced: Option<u64>) -> Result<(), Error> {
        let plan = self.plan;
        let after_action = synced.is_some();
        // After an action something was written: a failure to recheck is not "nothing changed".
        let broken = |f: Fault| if after_action { Error::RecheckFailed(Box::new(f)) } else { f.refused() };
        let differ = |d: Differences| if after_action { Error::RecheckDiffers(d) } else { Error::Differ(d) };
        let local = Device::open_read(&plan.local, Side::Local).map_err(|e| broken(e.into()))?;
        if !after_action {
            self.refuse_same_device(&local)?;
        }
        let (local_state, remote_state) = match after_action {
            true => (StateOptions::off(), StateOptions::off()),
            false => (plan.state.clone(), plan.remote_state.clone()),
        };
        let req = self.open_request(Access::Read, Codec::None, remote_state);
        let opened = self.endpoint()?.open(req).map_err(|e| broken(e.into()))?;
        let len = match synced {
            Some(len) => len,
            None if local.size() != opened.size => {
                return Err(differ(Differences::Size {
                    local: name(Side::Local, &plan.local),
                    local_size: local.size(),
                    remote: name(Side::Remote, &plan.remote),
                    remote_size: opened.size,
                }));
            }
            None => local.size(),
        };
        if self.stats.device_size == 0 {
            self.stats.device_size = len;
        }
        if !opened.state.note.is_empty() {
            self.rep.log(format_args!("remote {}", opened.state.note));
        }
        let mut index = match len {
            0 => None,
            _ => Some(local_index(&local, &plan.params, len, &local_state, self.rep)?),
        };
        self.rep.log(format_args!("recheck: comparing {len} bytes"));
        self.rep.start("verifying", len);
        let fresh = index.as_mut().is_some_and(|i| both_fresh(i, &opened.state));
        let (ep, rep) = self.endpoint_and_reporter()?;
        let result = match index.as_mut() {
            None => Ok(Comparison::default()),
            Some(index) if fresh => {
                rep.log("recheck: both states are fresh: comparing their trees, reading nothing");
                if roots_equal(index, &opened.state) {
                    rep.skip(len);
                    Ok(Comparison { blocks: index.layout().leaf_count(), nodes: 1, ..Comparison::default() })
                } else {
                    compare::walk(Ctx { local: &local, index, ep, params: &plan.params, rep }, Purpose::Check)
                }
            }
            Some(index) => compare::run(Ctx { local: &local, index, ep, params: &plan.params, rep }, Purpose::Check),
        };
        self.rep.finish();
        self.stats.local_read += local.bytes_read();
        let c = result.map_err(broken)?;
        if let Some(index) = index.as_mut() {
            // A check only reads: if the device moved meanwhile, its state is simply not kept.
            if let Ok(false) = index.finish(&local, Role::Read) {
                self.rep.log("local device was written during the check; its state was not saved");
            }
        }
        absorb(self.stats, &c);
        if c.differing > 0 {
            return Err(differ(Differences::Blocks {
                local: name(Side::Local, &plan.local),
                remote: name(Side::Remote, &plan.remote),
                differing: c.differing,
                blocks: c.blocks,
                buffer: plan.params.buffer,
            }));
        }
        self.rep.log(format_args!("recheck: devices are identical ({} blocks)", c.blocks));
        Ok(())
    }
}
