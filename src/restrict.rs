//! What a `basyn serve` may touch, decided from its own command line and never from the
//! client: the device it was started for (or, with `--restrict`, one of those listed),
//! and that device's state file, in its state directory or beside the device. Over SSH
//! a client-chosen state path is confined to those two places, with no symbolic link on
//! the way; on one machine, where the user starts the endpoint, it is taken as given
//! (it still never replaces a file that is not a state: `state::check_path`).

use std::path::{Component, Path, PathBuf};

use crate::protocol::{OpenRequest, StateMode, bytes_path};

/// `basyn serve [--restrict DEVICE]... [--state-dir DIR] [DEVICE]`, and where it runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The device named on the command line.
    pub device: Option<PathBuf>,
    /// `--restrict`: the only devices a client may ask for.
    pub restrict: Vec<PathBuf>,
    /// `--state-dir`: where default states go, and where a client-chosen one may.
    pub state_dir: Option<PathBuf>,
    /// Started by sshd (`SSH_CONNECTION` set): client-chosen state paths are confined.
    pub over_ssh: bool,
}

impl Config {
    /// Serves `device`, as `basyn serve DEVICE` started by the client on this machine.
    pub fn device(device: &Path) -> Config {
        Config { device: Some(device.to_path_buf()), ..Config::default() }
    }

    /// The configuration of this process: the command line's values, and whether sshd
    /// started it.
    pub fn from_environment(device: Option<PathBuf>, restrict: Vec<PathBuf>, state_dir: Option<PathBuf>) -> Config {
        Config { device, restrict, state_dir, over_ssh: std::env::var_os("SSH_CONNECTION").is_some() }
    }

    /// The device an `Open` may use, or why not.
    pub fn device_for(&self, req: &OpenRequest) -> Result<PathBuf, String> {
        let asked = bytes_path(&req.device);
        let device = match (&self.device, asked) {
            (Some(mine), None) => mine.clone(),
            (Some(mine), Some(asked)) if same(mine, &asked) => mine.clone(),
            (Some(mine), Some(asked)) => {
                return Err(format!(
                    "remote {}: this basyn serve was started for {} only",
                    asked.display(),
                    mine.display()
                ));
            }
            (None, Some(asked)) => asked,
            (None, None) => return Err("remote: no device named (basyn serve DEVICE, or --restrict)".into()),
        };
        if self.device.is_none() && self.restrict.is_empty() {
            return Err(format!("remote {}: basyn serve names no device and no --restrict", device.display()));
        }
        if !self.restrict.is_empty() && !self.restrict.iter().any(|r| same(r, &device)) {
            let allowed: Vec<String> = self.restrict.iter().map(|r| r.display().to_string()).collect();
            return Err(format!(
                "remote {}: not a device this basyn serve may serve (--restrict {})",
                device.display(),
                allowed.join(", ")
            ));
        }
        Ok(device)
    }

    /// The state options an `Open` for `device` may use: `Default` goes to `--state-dir`
    /// if given; over SSH a chosen path must be in the state directory or beside the
    /// device, with no `..` and no symbolic link on the way.
    pub fn state_mode(&self, mode: &StateMode, device: &Path) -> Result<StateMode, String> {
        let dir = self.state_dir.clone().unwrap_or_else(crate::state::state_dir);
        let chosen = match mode {
            StateMode::Off => return Ok(StateMode::Off),
            StateMode::Default if self.state_dir.is_some() => return Ok(StateMode::DefaultIn(dir)),
            StateMode::Default => return Ok(StateMode::Default),
            StateMode::DefaultIn(d) => crate::state::default_path_in(Some(d), device),
            StateMode::Path(p) => p.clone(),
        };
        if !self.over_ssh {
            return Ok(mode.clone());
        }
        let refuse = |why: &str| Err(format!("remote state {}: {why}", chosen.display()));
        if !chosen.is_absolute() || chosen.components().any(|c| matches!(c, Component::ParentDir)) {
            return refuse("a state path over SSH must be absolute, without ..");
        }
        let beside = device.parent().is_some_and(|d| chosen.parent() == Some(d));
        if !chosen.starts_with(&dir) && !beside {
            return refuse(&format!(
                "over SSH a state may only be in {} or beside the device (basyn serve --state-dir sets the former)",
                dir.display()
            ));
        }
        if let Some(link) = chosen.ancestors().find(|a| a.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink()))
        {
            return refuse(&format!("{} is a symbolic link", link.display()));
        }
        Ok(mode.clone())
    }
}

/// The same device: the same path, or paths that resolve to the same file.
fn same(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::Codec;
    use crate::hash::HashAlgo;
    use crate::protocol::{Access, StateOptions, path_bytes};

    fn open_for(device: &str) -> OpenRequest {
        OpenRequest {
            access: Access::Read,
            hash: HashAlgo::Blake3,
            codec: Codec::None,
            buffer: 4096,
            chunk: None,
            state: StateOptions::off(),
            device: path_bytes(Path::new(device)),
        }
    }

    #[test]
    fn a_server_serves_its_own_device_or_a_listed_one_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
        std::fs::write(&a, b"a").unwrap();
        std::fs::write(&b, b"b").unwrap();
        let link = dir.path().join("alias.img");
        std::os::unix::fs::symlink(&a, &link).unwrap();
        let one = Config::device(&a);
        assert_eq!(one.device_for(&open_for(a.to_str().unwrap())), Ok(a.clone()));
        assert_eq!(one.device_for(&open_for("")), Ok(a.clone()));
        assert_eq!(one.device_for(&open_for(link.to_str().unwrap())), Ok(a.clone()), "a path to the same file");
        let e = one.device_for(&open_for(b.to_str().unwrap())).unwrap_err();
        assert!(e.contains("started for") && e.contains("a.img"), "{e}");
        let listed = Config { restrict: vec![a.clone()], ..Config::default() };
        assert_eq!(listed.device_for(&open_for(a.to_str().unwrap())), Ok(a.clone()));
        let e = listed.device_for(&open_for(b.to_str().unwrap())).unwrap_err();
        assert!(e.contains("--restrict") && e.contains("b.img"), "{e}");
        assert!(listed.device_for(&open_for("")).is_err());
        assert!(Config::default().device_for(&open_for(a.to_str().unwrap())).is_err(), "no device and no list");
    }

    #[test]
    fn over_ssh_a_chosen_state_stays_in_the_state_dir_or_beside_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let (states, images) = (dir.path().join("states"), dir.path().join("images"));
        std::fs::create_dir_all(&states).unwrap();
        std::fs::create_dir_all(&images).unwrap();
        std::os::unix::fs::symlink("/etc", states.join("etc")).unwrap();
        let device = images.join("d.img");
        let ssh = Config { state_dir: Some(states.clone()), over_ssh: true, ..Config::device(&device) };
        let path = |p: PathBuf| StateMode::Path(p);
        assert!(ssh.state_mode(&path(states.join("x.basyn-state")), &device).is_ok());
        assert!(ssh.state_mode(&path(images.join("d.img.basyn-state")), &device).is_ok());
        for bad in [
            PathBuf::from("/etc/passwd"),
            PathBuf::from("rel.basyn-state"),
            states.join("../images/../x"),
            states.join("etc/x.basyn-state"),
        ] {
            let e = ssh.state_mode(&path(bad.clone()), &device).unwrap_err();
            assert!(e.starts_with("remote state "), "{bad:?}: {e}");
        }
        assert_eq!(ssh.state_mode(&StateMode::Default, &device), Ok(StateMode::DefaultIn(states.clone())));
        let local = Config { over_ssh: false, ..ssh.clone() };
        assert!(local.state_mode(&path(PathBuf::from("/elsewhere/x")), &device).is_ok(), "taken as given locally");
    }
}
