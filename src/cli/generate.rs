//! `basyn generate man|bash|zsh|fish`: the man page and the shell completions, made from
//! the same definition clap parses with, so that they cannot drift from it.
//! `scripts/install.sh` installs them.

use clap_complete::Shell;

/// What `basyn generate` makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Artifact {
    /// The man page, basyn(1), in roff.
    Man,
    /// A bash completion script.
    Bash,
    /// A zsh completion script (`_basyn`).
    Zsh,
    /// A fish completion script.
    Fish,
}

/// The text of `what`.
pub fn generate(what: Artifact) -> std::io::Result<Vec<u8>> {
    let mut cmd = super::definition();
    let mut out = Vec::new();
    let shell = match what {
        Artifact::Man => return man(cmd),
        Artifact::Bash => Shell::Bash,
        Artifact::Zsh => Shell::Zsh,
        Artifact::Fish => Shell::Fish,
    };
    clap_complete::generate(shell, &mut cmd, "basyn", &mut out);
    Ok(out)
}

/// basyn(1), one page: the main command with its grouped options, then a section for
/// each subcommand (its synopsis and options as subsections), then the exit status.
fn man(cmd: clap::Command) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let page = clap_mangen::Man::new(cmd.clone());
    page.render_title(&mut out)?;
    page.render_name_section(&mut out)?;
    page.render_synopsis_section(&mut out)?;
    page.render_description_section(&mut out)?;
    page.render_options_section(&mut out)?;
    // Not clap_mangen's list of subcommands, which points to a page for each.
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        let name = format!("basyn {}", sub.get_name());
        let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
        let sub_page = clap_mangen::Man::new(sub.clone().bin_name(name.clone()));
        let mut part = Vec::new();
        sub_page.render_synopsis_section(&mut part)?;
        sub_page.render_options_section(&mut part)?;
        out.extend_from_slice(format!(".SH \"{}\"\n{}\n", name.to_uppercase(), roff_text(&about)).as_bytes());
        // clap_mangen renders a page's sections; under this one they are subsections.
        for line in String::from_utf8_lossy(&part).lines() {
            let line = line.strip_prefix(".SH ").map_or_else(|| line.to_string(), |rest| format!(".SS {rest}"));
            out.extend_from_slice(line.as_bytes());
            out.push(b'\n');
        }
    }
    let mut extra = Vec::new();
    page.render_extra_section(&mut extra)?;
    let extra = String::from_utf8_lossy(&extra).replacen(".SH EXTRA", ".SH \"EXIT STATUS\"", 1);
    out.extend_from_slice(extra.as_bytes());
    page.render_version_section(&mut out)?;
    Ok(out)
}

/// `text` as a roff paragraph: no line may start with a control character, and a
/// backslash is an escape.
fn roff_text(text: &str) -> String {
    let text = text.replace('\\', "\\e").replace('-', "\\-");
    if text.starts_with(['.', '\'']) { format!("\\&{text}") } else { text }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every long option of basyn and of its visible subcommands.
    fn long_options() -> Vec<String> {
        let cmd = super::super::definition();
        let mut all: Vec<String> = Vec::new();
        for c in std::iter::once(&cmd).chain(cmd.get_subcommands().filter(|s| !s.is_hide_set())) {
            all.extend(c.get_arguments().filter(|a| !a.is_hide_set()).filter_map(|a| a.get_long()).map(String::from));
        }
        all.sort();
        all.dedup();
        all
    }

    #[test]
    fn the_man_page_and_every_completion_know_every_long_option() {
        let options = long_options();
        for needle in ["local", "stat-file", "remote-state", "restrict"] {
            assert!(options.iter().any(|o| o == needle), "{needle}: {options:?}");
        }
        for what in [Artifact::Man, Artifact::Bash, Artifact::Zsh, Artifact::Fish] {
            let text = String::from_utf8(generate(what).expect("generated")).expect("UTF-8");
            for o in &options {
                let spelled = match what {
                    Artifact::Man => format!("\\-\\-{}", o.replace('-', "\\-")),
                    Artifact::Fish => format!("-l {o}"),
                    Artifact::Bash | Artifact::Zsh => format!("--{o}"),
                };
                assert!(text.contains(&spelled), "{what:?} lacks {spelled:?}");
            }
        }
    }
}
