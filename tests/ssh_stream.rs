//! Regression test of the SSH transport's stream end, through the library's
//! `ssh::connect` against the private sshd (see `sshd/mod.rs`). One test in this binary:
//! it points basyn at the sshd's client config through the process environment.

mod sshd;
mod util;

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use basyn::ssh::{CONFIG_ENV, Target};
use sshd::*;
use util::*;

/// What the fake endpoint prints: far more than our pipe holds (64 KiB), less than ssh's
/// channel window (2 MiB), so that the command can exit while most of it is still with
/// the ssh master.
const LEN: usize = 1 << 20;

/// The openssh crate's `native-mux` (speaking ssh's mux protocol itself instead of an
/// `ssh -S` process per command) saves about 10 ms a command, but with it the master lost
/// the end of a command's output when the command exited while we were still writing to
/// it: 1 run in 3 or 4 here, and a PULL from a source failing reads said "broken pipe"
/// instead of the endpoint's read error, under load. basyn keeps the process mux; this
/// pins that the whole output arrives.
#[test]
fn the_end_of_a_remote_commands_output_is_not_lost_when_it_exits_while_we_write() {
    let Some(sshd) = Sshd::start() else { return };
    let (fake, done) = (sshd.remote("fake-basyn"), sshd.remote("fake-done"));
    let protocol = basyn(&["protocol"]);
    protocol.ok();
    write_script(
        &fake,
        &format!(
            "#!/bin/sh\nif [ \"$1\" = protocol ]; then echo '{}'; exit 0; fi\n\
             head -c {LEN} /dev/zero | tr '\\0' x\ntouch '{}'\n",
            protocol.stdout.trim(),
            done.display()
        ),
    );
    // SAFETY: the only test of this binary, before any thread of its own is started.
    unsafe { std::env::set_var(CONFIG_ENV, sshd.client_config()) };
    let target =
        Target { host: ALIAS.to_string(), port: None, user: None, remote_path: Some(fake.display().to_string()) };
    let mut link = match basyn::ssh::connect(&target, Path::new("/dev/null"), &|_| {}) {
        Ok(link) => link,
        Err(e) => panic!("cannot connect: {e}"),
    };
    // We keep writing, as an engine sending requests does, until the far end is gone.
    let mut writer = link.writer;
    let writing = std::thread::spawn(move || {
        let chunk = vec![0u8; 64 << 10];
        while std::io::Write::write_all(&mut writer, &chunk).is_ok() {}
    });
    // The command has printed everything and exited, most of it unread by us.
    wait_until(Duration::from_secs(20), "the fake endpoint to finish", || done.exists());
    // Time for the master to act on the exit (and for a master that drops the rest to
    // exit): with the output kept, the master stays and this waits the whole second.
    let _ = poll(Duration::from_secs(1), || sshd.ssh_clients().is_empty());
    let mut got = Vec::new();
    link.reader.read_to_end(&mut got).expect("read the stream");
    assert_eq!(got.len(), LEN, "the end of the command's output was lost");
    assert!(got.iter().all(|&b| b == b'x'), "the stream is not what the command printed");
    writing.join().expect("the writer");
    assert_eq!(link.process.wait(), None, "the command did not end cleanly");
    wait_until(Duration::from_secs(10), "the ssh master to exit", || sshd.ssh_clients().is_empty());
}
