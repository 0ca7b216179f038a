//! The `basyn` binary: parse, call, map errors to exit codes.

use std::fs::File;
use std::os::fd::AsFd;
use std::process::ExitCode;

use basyn::cli::{self, Command, Stop};
use basyn::engine::{Direction, Mode, Transport};
use basyn::report::{Interrupts, StatRequest, Stats};
use basyn::stat_json::{self, RunFacts};
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
        Ok(Command::Index(plan, stat)) => {
            let facts = RunFacts { command: "index", ..RunFacts::default() };
            let over_ssh = plan.transport != Transport::Local;
            report(&stat, facts, over_ssh, |stats, _| engine::index(&plan, stats))
        }
        Ok(Command::Generate(what)) => {
            let written = cli::generate(what).and_then(|text| std::io::Write::write_all(&mut std::io::stdout(), &text));
            match written {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("basyn generate: {e}");
                    1
                }
            }
        }
        Ok(Command::State(what, dir)) => state_command(what, dir.as_deref()),
        Ok(Command::Protocol) => {
            println!("{}", basyn::ssh::protocol_line());
            0
        }
        Ok(Command::Run(plan, stat)) => {
            let over_ssh = plan.transport != Transport::Local;
            report(&stat, run_facts(&plan), over_ssh, |stats, interrupts| engine::run(&plan, stats, interrupts))
        }
    };
    ExitCode::from(code as u8)
}

/// What `--stat=json` says a run was.
fn run_facts(plan: &engine::Plan) -> RunFacts {
    let (action, mode) = match plan.action {
        None => (None, None),
        Some((dir, mode)) => (
            Some(match dir {
                Direction::Push => "PUSH",
                Direction::Pull => "PULL",
            }),
            Some(match mode {
                Mode::Sync => "SYNC",
                Mode::Copy => "COPY",
            }),
        ),
    };
    RunFacts { command: "run", action, mode, recheck: plan.recheck }
}

/// Runs a job with SIGINT/SIGTERM handled, prints `--stat` and writes `--stat-file`
/// (also after a failure, with its exit code), maps the outcome to an exit code.
fn report(
    stat: &StatRequest,
    facts: RunFacts,
    over_ssh: bool,
    job: impl FnOnce(&mut Stats, &Interrupts) -> Result<(), engine::Error>,
) -> i32 {
    let interrupts = Interrupts::install();
    let mut stats = Stats::default();
    let result = job(&mut stats, &interrupts);
    stats.over_ssh = over_ssh;
    let (code, error) = match &result {
        Ok(()) => (0, None),
        Err(e) => (e.exit_code(), Some(e.to_string())),
    };
    // A dry run's report is on stdout already.
    if let (Some(e), Err(err)) = (&error, &result)
        && !err.reported()
    {
        eprintln!("basyn: {e}");
    }
    // A run that failed before anything happened (no connection, a refusal) has no
    // figures: an all-zero block would only mislead. The JSON says what happened.
    if stat.text && !(error.is_some() && stats.is_empty()) {
        print!("{}", stats.render());
    }
    if stat.json_stdout || stat.file.is_some() {
        let json = stat_json::render(&stats, &facts, code, error.as_deref());
        if stat.json_stdout {
            print!("{json}");
        }
        // A file that cannot be written is a warning, as for a state that cannot be
        // saved: the exit code says what happened to the data.
        if let Some(path) = &stat.file
            && let Err(e) = std::fs::write(path, &json)
        {
            eprintln!("basyn: warning: cannot write --stat-file {}: {e}", path.display());
        }
    }
    code
}

/// `basyn state list|prune`: what basyn keeps on this host.
fn state_command(what: cli::StateAction, dir: Option<&std::path::Path>) -> i32 {
    use basyn::states;
    let current = basyn::ssh::this_build_upload_name();
    let done = match what {
        cli::StateAction::List => states::render_list(dir, current.as_deref()).map(|text| print!("{text}")),
        cli::StateAction::Prune => states::prune(dir, current.as_deref()).map(|pruned| {
            for (path, what) in &pruned.removed {
                println!("removed {} ({what})", path.display());
            }
            for (path, why) in &pruned.failed {
                eprintln!("basyn: cannot remove {}: {why}", path.display());
            }
            if pruned.removed.is_empty() && pruned.failed.is_empty() {
                println!("nothing to prune");
            }
        }),
    };
    match done {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("basyn: state: {e}");
            1
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
