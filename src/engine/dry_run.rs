//! `--dry-run`: compares the source with the receiver as the action would, and reports
//! what it would send (blocks and bytes; the ranges with `--verbose`), writing nothing:
//! not the receiver, not a state (states are used when fresh, never saved). Exit 0 if
//! the devices are identical, 3 if the action would change the receiver.

use super::compare::{self, Purpose};
use super::session::{Session, absorb, both_fresh, layout, name, roots_equal};
use super::since::{self, Since};
use super::window::{Comparison, Ctx};
use super::{Direction, Error, Fault, Mode};
use crate::compress::Codec;
use crate::device::{Device, DeviceError, Problem, Side};
use crate::digest_index::DigestIndex;
use crate::protocol::Access;
use crate::report::human;

impl Session<'_> {
    /// Compares for a run of `dir` and `mode` and reports what it would send.
    pub(super) fn dry_run(&mut self, dir: Direction, mode: Mode) -> Result<(), Error> {
        let plan = self.plan;
        let local = Device::open_read(&plan.local, Side::Local).map_err(|e| Fault::from(e).refused())?;
        self.refuse_same_device(&local)?;
        let layout_now = layout(&plan.params, local.size());
        let since = since::prepare(plan.since.as_ref(), &local, layout_now, plan.state.trust, self.rep)?;
        let req = self.open_request(Access::Inspect, Codec::None, plan.remote_state.clone());
        let opened = self.endpoint()?.open(req).map_err(|e| Fault::from(e).refused())?;
        let (source_size, receiver_size) = match dir {
            Direction::Push => (local.size(), opened.size),
            Direction::Pull => (opened.size, local.size()),
        };
        if receiver_size < source_size {
            // The run itself would refuse it, in the same words.
            let (side, path) = match dir {
                Direction::Push => (Side::Remote, &plan.remote),
                Direction::Pull => (Side::Local, &plan.local),
            };
            let file = match dir {
                Direction::Push => opened.kind == crate::device::Kind::File,
                Direction::Pull => local.kind() == crate::device::Kind::File,
            };
            let problem = Problem::TooSmall { size: receiver_size, source: source_size, receiver: side, file };
            let e = DeviceError { side, path: path.display().to_string(), problem };
            return Err(Fault::from(e).refused());
        }
        let len = source_size;
        self.stats.device_size = len;
        if !opened.state.note.is_empty() {
            self.rep.log(format_args!("remote {}", opened.state.note));
        }
        let c = match len {
            0 => Comparison::default(),
            _ => self.dry_compare(&local, len, &opened.state, since)?,
        };
        self.stats.local_read += local.bytes_read();
        absorb(self.stats, &c);
        self.report_dry_run(dir, mode, len, &c);
        match c.differing {
            0 => Ok(()),
            differing => Err(Error::WouldChange { differing }),
        }
    }

    fn dry_compare(
        &mut self,
        local: &Device,
        len: u64,
        remote: &crate::protocol::StateSummary,
        since: Option<Since>,
    ) -> Result<Comparison, Error> {
        let plan = self.plan;
        let mut index = DigestIndex::open_read_only(local, layout(&plan.params, len), &plan.state)
            .map_err(|e| Fault::State(e).refused())?;
        self.rep.log(format_args!("local {}", index.note()));
        if let Some(since) = since {
            since.apply(&mut index, local, remote, self.rep)?;
        }
        self.rep.start("comparing", len);
        let fresh = both_fresh(&mut index, remote);
        let (ep, rep) = self.endpoint_and_reporter()?;
        let ctx = Ctx { local, index: &mut index, ep, params: &plan.params, rep };
        let result = if fresh && roots_equal(ctx.index, remote) {
            ctx.rep.log("dry run: both states are fresh and equal: reading nothing");
            ctx.rep.skip(len);
            Ok(Comparison { blocks: ctx.index.layout().leaf_count(), nodes: 1, ..Comparison::default() })
        } else if fresh {
            compare::walk(ctx, Purpose::Check)
        } else {
            compare::run(ctx, Purpose::Check)
        };
        self.rep.finish();
        result.map_err(Fault::refused)
    }

    /// The dry run's report on stdout, and with `--verbose` each range that differs.
    fn report_dry_run(&self, dir: Direction, mode: Mode, len: u64, c: &Comparison) {
        let plan = self.plan;
        let (from, to) = match dir {
            Direction::Push => (name(Side::Local, &plan.local), name(Side::Remote, &plan.remote)),
            Direction::Pull => (name(Side::Remote, &plan.remote), name(Side::Local, &plan.local)),
        };
        let what = format!("{dir:?} {mode:?}").to_uppercase();
        for (offset, range) in &c.ranges {
            self.rep.log(format_args!("dry run: differs at {offset}..{} ({range} bytes)", offset + range));
        }
        let bytes = c.differing_bytes();
        let outcome = match (mode, c.differing) {
            (Mode::Sync, 0) => "the devices are identical: it would send nothing".to_string(),
            (Mode::Sync, n) => format!(
                "{n} of {} blocks differ: it would send at most {bytes} bytes ({}), less where pieces match",
                c.blocks,
                human(bytes as f64)
            ),
            (Mode::Copy, n) => format!(
                "it would send every block, {len} bytes ({}; zero runs as tokens); {n} of {} blocks differ ({bytes} bytes)",
                human(len as f64),
                c.blocks
            ),
        };
        self.rep.say(format_args!("dry run: {what} from {from} to {to}: {outcome}; nothing was written"));
    }
}
