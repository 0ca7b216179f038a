//! The `basyn` binary: parse, call, map errors to exit codes.

use std::fs::File;
use std::os::fd::AsFd;
use std::process::ExitCode;

use basyn::cli::{self, Command, Stop};
use basyn::report::{Interrupts, Stats};
use basyn::{engine, serve};

fn main() -> ExitCode {
    // A file size limit (`ulimit -f`) must be an error (EFBIG) that basyn reports and
    // cleans up after, not a signal that kills it with a half-made receiver left behind.
    // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let code = match cli::parse(std::env::args_os()) {
        Err(Stop::Info(text)) => {
            print!("{text}");
            0
        }
        Err(Stop::Usage(msg)) => {
            eprintln!("basyn: {msg}; see 'basyn --help'");
            1
        }
        Ok(Command::Serve(config)) => serve_stdio(&config),
        Ok(Command::Index(plan)) => report(plan.output.stat, |stats, _| engine::index(&plan, stats)),
        Ok(Command::Protocol) => {
            println!("{}", basyn::ssh::protocol_line());
            0
        }
        Ok(Command::Run(plan)) => report(plan.output.stat, |stats, interrupts| engine::run(&plan, stats, interrupts)),
    };
    ExitCode::from(code as u8)
}

/// Runs a job with SIGINT/SIGTERM handled, prints `--stat` (also after a failure), maps
/// the outcome to an exit code.
fn report(stat: bool, job: impl FnOnce(&mut Stats, &Interrupts) -> Result<(), engine::Error>) -> i32 {
    let interrupts = Interrupts::install();
    let mut stats = Stats::default();
    let result = job(&mut stats, &interrupts);
    if stat {
        print!("{}", stats.render());
    }
    match result {
        Ok(()) => 0,
        Err(e) => {
            if !e.reported() {
                eprintln!("basyn: {e}");
            }
            e.exit_code()
        }
    }
}

/// Serves over the raw stdin/stdout descriptors: std's stdout is line-buffered, which
/// would split binary frames at every newline byte.
fn serve_stdio(config: &basyn::restrict::Config) -> i32 {
    // Started by sshd as a key's forced command, this replaces the client's starting
    // script, which would have said how basyn started: say it instead, so the client
    // goes on to speak the protocol.
    if std::env::var_os("SSH_ORIGINAL_COMMAND").is_some() {
        eprintln!("basyn-start forced");
    }
    let fds = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .and_then(|i| std::io::stdout().as_fd().try_clone_to_owned().map(|o| (i, o)));
    match fds {
        Ok((input, output)) => {
            // Over SSH these are sshd's pipes, 64 KiB unless widened from this end.
            basyn::link::widen_pipe(&input);
            basyn::link::widen_pipe(&output);
            serve::serve(config, File::from(input), File::from(output))
        }
        Err(e) => {
            eprintln!("basyn serve: cannot use stdin/stdout: {e}");
            2
        }
    }
}
