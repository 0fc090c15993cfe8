//! docs/cli.md is checked against the command line itself: every command has a section, every
//! flag and argument of a command is named in its section, and no section names a flag the
//! command does not have. The help text is generated from the same `clap` model, so the page
//! cannot drift from `--help`.

use std::collections::BTreeSet;

use clap::CommandFactory as _;

use super::Cli;

const PAGE: &str = include_str!("../../../../docs/cli.md");

/// The text of the section whose heading is `` `path` ``, up to the next heading.
fn section(path: &str) -> Option<String> {
    let title = format!("`{path}`");
    let mut lines = PAGE.lines();
    loop {
        let line = lines.next()?;
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if hashes > 0 && line[hashes..].trim() == title {
            break;
        }
    }
    // Up to the next heading: a subcommand's section is not its parent's.
    let body: Vec<&str> = lines.take_while(|l| !l.starts_with('#')).collect();
    Some(body.join("\n"))
}

/// The `--long` flags a text names.
fn flags_named(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("`--") {
        let rest = &text[i + 1..];
        let end = rest[2..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .map_or(rest.len(), |e| e + 2);
        out.insert(rest[..end].to_owned());
    }
    out
}

/// What a command's section must name: `--long` and `` `-s` `` for options, the value name of a
/// positional (written `<NAME>` or `[NAME]...`).
fn expected(cmd: &clap::Command) -> Vec<String> {
    let mut out = Vec::new();
    for arg in cmd.get_arguments() {
        if ["help", "version"].contains(&arg.get_id().as_str()) {
            continue;
        }
        if arg.is_positional() {
            let name = arg
                .get_value_names()
                .and_then(|n| n.first())
                .map_or_else(|| arg.get_id().as_str().to_uppercase(), |n| n.to_string());
            out.push(name);
        } else {
            if let Some(long) = arg.get_long() {
                out.push(format!("--{long}"));
            }
            if let Some(short) = arg.get_short() {
                out.push(format!("`-{short}"));
            }
        }
    }
    out
}

fn walk(cmd: &clap::Command, prefix: &str, problems: &mut Vec<String>, globals: &BTreeSet<String>) {
    for sub in cmd.get_subcommands() {
        if sub.get_name() == "help" {
            continue;
        }
        let path = if prefix.is_empty() {
            sub.get_name().to_owned()
        } else {
            format!("{prefix} {}", sub.get_name())
        };
        let Some(text) = section(&path) else {
            problems.push(format!("no section for `{path}`"));
            continue;
        };
        let mut known: BTreeSet<String> = globals.clone();
        for want in expected(sub) {
            let named = if want.starts_with('-') || want.starts_with('`') {
                text.contains(&want)
            } else {
                // A positional: `<NAME>` or `[NAME]...`.
                text.contains(&format!("<{want}>")) || text.contains(&format!("[{want}]"))
            };
            if !named {
                problems.push(format!("`{path}`: {want} is not described"));
            }
            if want.starts_with("--") {
                known.insert(want);
            }
        }
        // The flags a command inherits from its parent (beat's --store on `beat add`).
        for arg in cmd.get_arguments().filter(|a| a.is_global_set()) {
            if let Some(long) = arg.get_long() {
                known.insert(format!("--{long}"));
            }
        }
        for named in flags_named(&text) {
            if !known.contains(&named) {
                problems.push(format!("`{path}` names {named}, which it does not have"));
            }
        }
        let mut globals = globals.clone();
        for arg in sub.get_arguments().filter(|a| a.is_global_set()) {
            if let Some(long) = arg.get_long() {
                globals.insert(format!("--{long}"));
            }
        }
        walk(sub, &path, problems, &globals);
    }
}

#[test]
fn the_page_names_every_command_and_flag() {
    let cli = Cli::command();
    let mut globals = BTreeSet::new();
    let mut problems = Vec::new();
    for arg in cli.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        let flag = format!("`--{long}");
        if !PAGE.contains(&flag) {
            problems.push(format!("the global option --{long} is not described"));
        }
        globals.insert(format!("--{long}"));
    }
    globals.extend(["--help".to_owned(), "--version".to_owned()]);
    walk(&cli, "", &mut problems, &globals);
    assert!(
        problems.is_empty(),
        "docs/cli.md is out of date:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_exit_codes_in_the_page_are_the_ones_used() {
    let source = [
        include_str!("mod.rs"),
        include_str!("control.rs"),
        include_str!("canvas.rs"),
    ]
    .concat();
    for code in ["2", "64", "69"] {
        assert!(
            source.contains(&format!("ExitCode::from({code})")),
            "{code}"
        );
        assert!(
            PAGE.contains(&format!("| {code} |")),
            "exit code {code} undocumented"
        );
    }
}
