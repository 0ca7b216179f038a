//! What basyn keeps on a host besides the devices: the states in its state directory and
//! the executables uploaded into its cache. `basyn state list` shows them (each state
//! with its device, its size and whether it is fresh now); `basyn state prune` removes
//! states whose device is gone and uploads other than this build's.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::device::{Device, Side};
use crate::stamp::{self, Freshness};
use crate::state::{StateFile, state_dir};

/// One state file of the state directory.
#[derive(Debug)]
pub struct Entry {
    /// The file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// The device it was made for, as the state names it.
    pub device: String,
    /// What it says of that device now.
    pub status: Status,
}

/// What a state says of its device now.
#[derive(Debug, PartialEq, Eq)]
pub enum Status {
    /// It provably describes the device as it is.
    Fresh,
    /// The device changed since: the next run reads it again.
    Stale(String),
    /// Nothing proves it either way (after a reboot, say): used only with `--trust-state`.
    Unverifiable(String),
    /// The device is not there any more: `prune` removes the state.
    Gone,
    /// The file is not a state basyn can read: rebuilt by the next run of its device.
    Unreadable(String),
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Status::Fresh => f.write_str("fresh"),
            Status::Stale(why) => write!(f, "stale: the device {why}"),
            Status::Unverifiable(why) => write!(f, "unverifiable: {why}"),
            Status::Gone => f.write_str("device gone"),
            Status::Unreadable(why) => write!(f, "unreadable: {why}"),
        }
    }
}

/// An executable uploaded into this host's cache by a basyn on another host.
#[derive(Debug)]
pub struct Upload {
    /// The file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// It is this build (same version and digest): the one a client like this one uses.
    pub current: bool,
}

/// The state files in `dir` (the state directory unless given), in name order.
pub fn list(dir: Option<&Path>) -> io::Result<Vec<Entry>> {
    let dir = dir.map_or_else(state_dir, Path::to_path_buf);
    let mut paths: Vec<PathBuf> = match fs::read_dir(&dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().ends_with(".basyn-state")))
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    paths.sort();
    Ok(paths.into_iter().map(entry).collect())
}

fn entry(path: PathBuf) -> Entry {
    let bytes = fs::symlink_metadata(&path).map(|m| m.len()).unwrap_or(0);
    let unreadable =
        |why: String| Entry { path: path.clone(), bytes, device: String::new(), status: Status::Unreadable(why) };
    let file = match StateFile::at(&path, false) {
        Ok(f) => f,
        Err(e) => return unreadable(e.to_string()),
    };
    let state = match file.load() {
        Ok(Some(s)) => s,
        Ok(None) => return unreadable("it vanished".into()),
        Err(e) => return unreadable(e.to_string()),
    };
    let device = state.device_path.clone();
    if !Path::new(&device).is_absolute() {
        // Made by an earlier version from a relative path: which device it means depends
        // on where that run was started, so it is never taken as gone.
        let status = Status::Unreadable(format!("its device {device:?} is named by a relative path"));
        return Entry { path, bytes, device, status };
    }
    let status = match Device::open_read(Path::new(&device), Side::Local) {
        Err(_) if !Path::new(&device).exists() => Status::Gone,
        Err(e) => Status::Unreadable(e.to_string()),
        Ok(dev) => match stamp::take(&dev) {
            Err(e) => Status::Unreadable(format!("cannot stamp {device}: {e}")),
            Ok(now) => match stamp::compare(&state.stamp, &now) {
                Freshness::Fresh => Status::Fresh,
                Freshness::Stale(why) => Status::Stale(why),
                Freshness::Unverifiable(why) => Status::Unverifiable(why),
            },
        },
    };
    Entry { path, bytes, device, status }
}

/// The uploads in this user's cache (`$XDG_CACHE_HOME/basyn`, else `~/.cache/basyn`).
/// `current` is this build's file name there, if it could be made.
pub fn uploads(current: Option<&str>) -> io::Result<Vec<Upload>> {
    let dir = cache_dir();
    let mut found: Vec<Upload> = match fs::read_dir(&dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("basyn-"))
            .map(|e| {
                let bytes = e.metadata().map(|m| m.len()).unwrap_or(0);
                let current = current.is_some_and(|c| e.file_name().to_string_lossy() == c);
                Upload { path: e.path(), bytes, current }
            })
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    found.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(found)
}

/// Where uploads land on this host, as the starting script on it finds them.
fn cache_dir() -> PathBuf {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache"),
    };
    base.join("basyn")
}

/// What `prune` removed, and what it could not.
#[derive(Debug, Default)]
pub struct Pruned {
    /// Files removed, with what they were.
    pub removed: Vec<(PathBuf, String)>,
    /// Files that could not be removed, with why.
    pub failed: Vec<(PathBuf, String)>,
}

/// Removes the states whose device is gone and the uploads that are not this build.
pub fn prune(dir: Option<&Path>, current: Option<&str>) -> io::Result<Pruned> {
    let mut out = Pruned::default();
    let mut remove = |path: PathBuf, what: String| match fs::remove_file(&path) {
        Ok(()) => out.removed.push((path, what)),
        Err(e) => out.failed.push((path, e.to_string())),
    };
    for e in list(dir)? {
        if e.status == Status::Gone {
            remove(e.path, format!("state of {}, which is gone", e.device));
        }
    }
    // Without this build's name nothing tells which upload is current: keep them all.
    if current.is_some() {
        for u in uploads(current)?.into_iter().filter(|u| !u.current) {
            remove(u.path, "an upload of another build".into());
        }
    }
    Ok(out)
}

/// `basyn state list`: a table of the states, then of the uploads.
pub fn render_list(dir: Option<&Path>, current: Option<&str>) -> io::Result<String> {
    use std::fmt::Write;
    let human = |b: u64| crate::report::human(b as f64);
    let shown = dir.map_or_else(state_dir, Path::to_path_buf);
    let mut out = String::new();
    let entries = list(dir)?;
    let _ = writeln!(out, "states in {}: {}", shown.display(), entries.len());
    for e in &entries {
        let device = if e.device.is_empty() { "?" } else { &e.device };
        let _ = writeln!(out, "  {}  {}  {}  {}", e.path.display(), human(e.bytes), device, e.status);
    }
    let ups = uploads(current)?;
    let _ = writeln!(out, "uploads in {}: {}", cache_dir().display(), ups.len());
    for u in &ups {
        let what = if u.current { "this build" } else { "another build (prune removes it)" };
        let _ = writeln!(out, "  {}  {}  {what}", u.path.display(), human(u.bytes));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_directory_that_does_not_exist_lists_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert!(list(Some(&dir.path().join("none"))).unwrap().is_empty());
    }

    #[test]
    fn a_file_that_is_not_a_state_is_listed_unreadable_and_never_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let bogus = dir.path().join("x.basyn-state");
        fs::write(&bogus, b"not a state").unwrap();
        fs::write(dir.path().join("other.txt"), b"ignored").unwrap();
        let listed = list(Some(dir.path())).unwrap();
        assert_eq!(listed.len(), 1);
        assert!(matches!(listed[0].status, Status::Unreadable(_)), "{listed:?}");
        let pruned = prune(Some(dir.path()), None).unwrap();
        assert!(pruned.removed.is_empty() && bogus.exists());
    }
}
