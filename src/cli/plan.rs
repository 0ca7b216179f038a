//! Stage two of parsing: the raw arguments clap accepted become a validated [`Plan`]
//! (or [`IndexPlan`]): every combination that cannot work is refused here, with one
//! line saying why, before any device is touched.

use std::path::PathBuf;

use super::{ActionArg, BitmapArgs, CompressArg, IndexArgs, ModeArg, RawArgs};
use crate::compress::Codec;
use crate::engine::{BitmapPlan, Direction, IndexPlan, Mode, Plan, SincePlan, Transport};
use crate::protocol::{StateMode, StateOptions};
use crate::report::{Output, StatRequest};
use crate::ssh::Target;

/// The bitmap options of a run whose `-l`/`-r` were given or not (`has_local`,
/// `has_remote`); `None` without `--bitmap`.
pub(super) fn bitmap_plan(
    b: &BitmapArgs,
    (has_local, has_remote): (bool, bool),
    action: Option<(Direction, Mode)>,
    recheck: bool,
) -> Result<Option<BitmapPlan>, String> {
    let Some(path) = b.bitmap.clone() else {
        if b.reset_bitmap || b.update_bitmap {
            return Err("--reset-bitmap and --update-bitmap need --bitmap FILE".into());
        }
        return Ok(None);
    };
    let Some((dir, Mode::Sync)) = action else {
        return Err("--bitmap works with --action and --mode SYNC".into());
    };
    let (has_source, has_receiver) = match dir {
        Direction::Push => (has_local, has_remote),
        Direction::Pull => (has_remote, has_local),
    };
    match (dir, has_source) {
        (Direction::Push, false) => return Err("missing --local DEVICE (-l): the source of a PUSH".into()),
        (Direction::Pull, false) => return Err("missing --remote DEVICE (-r): the source of a PULL".into()),
        _ => {}
    }
    if recheck && !has_receiver {
        return Err("--recheck needs both devices; without a receiver only the bitmap is refreshed".into());
    }
    Ok(Some(BitmapPlan { path, reset: b.reset_bitmap, update: b.update_bitmap, refresh_only: !has_receiver }))
}

/// `--state`/`--remote-state`, `--no-state` and `--trust-state` as the engine takes them.
pub(super) fn options(off: bool, path: Option<PathBuf>, trust: bool) -> StateOptions {
    let mode = match (off, path) {
        (true, _) => StateMode::Off,
        (false, Some(p)) => StateMode::Path(p),
        (false, None) => StateMode::Default,
    };
    StateOptions { mode, trust }
}

/// A run's arguments, validated.
pub(super) fn plan(raw: RawArgs, stat: &StatRequest) -> Result<Plan, String> {
    let (transport, timeout) = raw.ssh.transport()?;
    let action = match (raw.action, raw.mode) {
        (None, None) => None,
        (None, Some(_)) => return Err("--mode needs --action (PUSH or PULL)".into()),
        (Some(_), None) => return Err("--action needs --mode (SYNC or COPY)".into()),
        (Some(a), Some(m)) => Some((
            match a {
                ActionArg::Push => Direction::Push,
                ActionArg::Pull => Direction::Pull,
            },
            match m {
                ModeArg::Sync => Mode::Sync,
                ModeArg::Copy => Mode::Copy,
            },
        )),
    };
    let over_ssh = !matches!(transport, Transport::Local);
    let params = raw.tree.params(codec(raw.compress, raw.zlevel, over_ssh)?, raw.adapt)?;
    let given = (raw.local.is_some(), raw.remote.is_some());
    let bitmap = bitmap_plan(&raw.bitmap, given, action, raw.recheck)?;
    if raw.dry_run && action.is_none() {
        return Err("--dry-run needs --action and --mode: it reports what they would send".into());
    }
    if raw.dry_run && bitmap.is_some() {
        return Err("--dry-run does not take -b/--bitmap".into());
    }
    let since = since_plan(raw.since, raw.changed_ranges, action, bitmap.is_some())?;
    // Only a bitmap refresh goes without its receiver.
    let refresh = bitmap.as_ref().is_some_and(|b| b.refresh_only);
    let local = match raw.local {
        Some(l) => l,
        None if refresh => PathBuf::new(),
        None => return Err("missing --local DEVICE (-l)".into()),
    };
    let remote = match raw.remote {
        Some(r) => r,
        None if refresh => PathBuf::new(),
        None => return Err("missing --remote DEVICE (-r)".into()),
    };
    Ok(Plan {
        local,
        remote,
        transport,
        timeout,
        action,
        recheck: raw.recheck,
        params,
        force: raw.force,
        destination_is_zero: raw.destination_is_zero,
        dry_run: raw.dry_run,
        bwlimit: raw.bwlimit,
        bitmap,
        since,
        state: raw.state.local(),
        remote_state: raw.state.remote(),
        output: Output { stat: stat.wanted(), verbose: raw.verbose, progress: raw.progress, debug: raw.debug },
    })
}

/// `--since OLDER [--changed-ranges FILE]`: only for a PUSH SYNC (the source and its
/// older snapshot on this host), without a bitmap.
pub(super) fn since_plan(
    since: Option<PathBuf>,
    ranges: Option<PathBuf>,
    action: Option<(Direction, Mode)>,
    bitmap: bool,
) -> Result<Option<SincePlan>, String> {
    let Some(device) = since else { return Ok(None) };
    match action {
        Some((Direction::Push, Mode::Sync)) if bitmap => Err("--since does not take -b/--bitmap".into()),
        Some((Direction::Push, Mode::Sync)) => Ok(Some(SincePlan { device, ranges })),
        Some((Direction::Pull, _)) => {
            Err("--since needs the source and its older snapshot on this host: run -a PUSH on the host that has them"
                .into())
        }
        _ => Err("--since needs -a PUSH -m SYNC: it says what changed since the receiver was last synced".into()),
    }
}

/// Where the remote device is: on `--host` over SSH, or on this machine.
pub(super) fn transport(
    host: Option<String>,
    port: Option<u16>,
    user: Option<String>,
    remote_path: Option<String>,
) -> Result<Transport, String> {
    match host {
        None if port.is_some() => Err("--port needs --host".into()),
        None if user.is_some() => Err("--user needs --host".into()),
        None if remote_path.is_some() => Err("--remote-path needs --host".into()),
        None => Ok(Transport::Local),
        Some(host) if host.is_empty() || host.starts_with('-') => Err(format!("invalid --host {host:?}")),
        Some(host) => Ok(Transport::Ssh(Target { host, port, user, remote_path })),
    }
}

/// `basyn index`'s arguments, validated.
pub(super) fn index_plan(a: IndexArgs, stat: &StatRequest) -> Result<IndexPlan, String> {
    let (transport, timeout) = a.ssh.transport()?;
    Ok(IndexPlan {
        device: a.device,
        transport,
        timeout,
        params: a.tree.params(Codec::None, false)?,
        state: options(false, a.state, a.trust_state),
        output: Output { stat: stat.wanted(), verbose: a.verbose, progress: a.progress, debug: false },
    })
}

/// zstd level 1 over SSH by default, nothing locally unless asked; `--zlevel 0`
/// disables.
pub(super) fn codec(compress: Option<CompressArg>, zlevel: Option<u32>, over_ssh: bool) -> Result<Codec, String> {
    let chosen = match compress {
        Some(c) => c,
        None if over_ssh || zlevel.is_some_and(|l| l > 0) => CompressArg::Zstd,
        None => CompressArg::None,
    };
    match (chosen, zlevel) {
        (_, Some(0)) | (CompressArg::None, _) => Ok(Codec::None),
        (CompressArg::Zstd, None) => Ok(Codec::Zstd(crate::compress::ADAPTIVE_START)),
        (CompressArg::Zstd, Some(l)) if l <= 19 => Ok(Codec::Zstd(l as i32)),
        (CompressArg::Zstd, Some(l)) => Err(format!("--zlevel {l}: zstd levels are 0 to 19")),
        (CompressArg::Zlib, None) => Ok(Codec::Zlib(6)),
        (CompressArg::Zlib, Some(l)) if l <= 9 => Ok(Codec::Zlib(l)),
        (CompressArg::Zlib, Some(l)) => Err(format!("--zlevel {l}: zlib levels are 0 to 9")),
    }
}
