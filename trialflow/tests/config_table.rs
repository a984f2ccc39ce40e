//! The README's configuration table (section `## Configuration`, columns `variable | default |
//! used by | meaning`) against the command line (`Cli::command()`, every subcommand):
//!
//! * every environment variable an argument of the CLI reads is in the table;
//! * every variable of the table is read by an argument, unless it is in [`READ_ELSEWHERE`];
//! * a default the table gives as a value agrees with clap's.
//!
//! The default column: a row naming several variables (`` `A`, `B` ``) gives one default per
//! variable, comma-separated, in the same order, or one default for all of them. A default is
//! * a value in backticks, optionally followed by a remark (`` `0` (never) ``): it must equal
//!   clap's default (multiple values joined by commas) wherever clap has one; where clap has none
//!   the component picks the default in code and the value is not checked;
//! * `–` (none): clap must have no default, or an empty one;
//! * anything else is a default described in words (`all`, `off`, `unset`, `the demo tokens`, ...),
//!   not checked.

use std::collections::{BTreeMap, BTreeSet};

use clap::CommandFactory;
use trialflow::cli::Cli;

/// Variables of the table that are no argument of the CLI, each with what reads it.
const READ_ELSEWHERE: &[(&str, &str)] = &[
    ("RUST_LOG", "the log filter: tracing_subscriber's EnvFilter (trialflow/src/telemetry.rs)"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "trialflow/src/telemetry.rs and the OpenTelemetry exporter"),
    ("TRIALFLOW_PG_PORT", "scripts/stack.sh (`make up`)"),
    ("TRIALFLOW_KAFKA_CONTROLLER_PORT", "scripts/stack.sh (`make up`)"),
    ("TRIALFLOW_KAFKA_HEAP", "scripts/stack.sh (`make up`)"),
    ("TRIALFLOW_KAFKA_PORT", "scripts/stack.sh (`make up`)"),
];

/// Where a variable is read: the subcommand (`trialflow relay`) and clap's default there.
#[derive(Debug)]
struct Use {
    command: String,
    default: Option<String>,
}

/// Every environment variable an argument of `command` or of its subcommands reads.
fn accepted(command: &clap::Command, path: &str, found: &mut BTreeMap<String, Vec<Use>>) {
    for arg in command.get_arguments() {
        let Some(var) = arg.get_env() else { continue };
        let defaults = arg.get_default_values();
        let default = (!defaults.is_empty())
            .then(|| defaults.iter().map(|d| d.to_string_lossy()).collect::<Vec<_>>().join(","));
        found
            .entry(var.to_string_lossy().into_owned())
            .or_default()
            .push(Use { command: path.to_string(), default });
    }
    for sub in command.get_subcommands() {
        accepted(sub, &format!("{path} {}", sub.get_name()), found);
    }
}

/// One row of the table: its variables and the default of each.
#[derive(Debug)]
struct Row {
    line: usize,
    variables: Vec<String>,
    defaults: Vec<String>,
}

/// The table's rows, or why the table cannot be read.
fn table(readme: &str) -> Result<Vec<Row>, String> {
    let start = readme.find("\n## Configuration\n").ok_or("README.md has no `## Configuration` section")?;
    let first_line = readme[..=start].matches('\n').count() + 1;
    let section = &readme[start + 1..];
    let end = section.find("\n## ").unwrap_or(section.len());
    let mut rows = Vec::new();
    let mut header = false;
    for (i, line) in section[..end].lines().enumerate() {
        let Some(cells) = line.trim().strip_prefix('|') else { continue };
        let cells: Vec<&str> = cells.splitn(4, '|').map(str::trim).collect();
        if cells.len() < 4 {
            return Err(format!("README.md line {}: not a row of 4 cells: {line}", first_line + i));
        }
        if cells[..3] == ["variable", "default", "used by"] {
            header = true;
            continue;
        }
        if cells[0].starts_with("---") {
            continue;
        }
        let variables = code_spans(cells[0]);
        if variables.is_empty()
            || variables
                .iter()
                .any(|v| !v.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'))
        {
            return Err(format!(
                "README.md line {}: the variable cell `{}` must name variables in backticks, e.g. `DATABASE_URL`",
                first_line + i,
                cells[0]
            ));
        }
        let defaults = split_outside_backticks(cells[1]);
        let defaults = match (variables.len(), defaults.len()) {
            (1, _) => vec![cells[1].to_string()],
            (n, 1) => vec![defaults[0].clone(); n],
            (n, m) if n == m => defaults,
            (n, m) => {
                return Err(format!(
                    "README.md line {}: row {} names {n} variables but gives {m} defaults (`{}`): give one \
                     default per variable, comma-separated in the same order, or one for all",
                    first_line + i,
                    cells[0],
                    cells[1]
                ));
            }
        };
        rows.push(Row { line: first_line + i, variables, defaults });
    }
    if !header {
        return Err("README.md: the configuration table's header `| variable | default | used by | meaning |` is missing".into());
    }
    Ok(rows)
}

/// The texts between backticks.
fn code_spans(text: &str) -> Vec<String> {
    text.split('`').skip(1).step_by(2).map(str::to_string).collect()
}

/// `text` split at the commas that are not between backticks, each part trimmed.
fn split_outside_backticks(text: &str) -> Vec<String> {
    let (mut parts, mut part, mut in_code) = (Vec::new(), String::new(), false);
    for c in text.chars() {
        match c {
            '`' => {
                in_code = !in_code;
                part.push(c);
            }
            ',' if !in_code => parts.push(std::mem::take(&mut part).trim().to_string()),
            _ => part.push(c),
        }
    }
    parts.push(part.trim().to_string());
    parts
}

/// What is wrong with the table's default `documented` for `var`, given where clap reads it.
fn default_problem(var: &str, documented: &str, uses: &[Use]) -> Option<String> {
    if let Some(value) = documented.strip_prefix('`') {
        let Some((value, remark)) = value.split_once('`') else {
            return Some(format!("default `{documented}` of `{var}`: a backtick is not closed"));
        };
        let remark = remark.trim();
        let remarked = remark.starts_with('(') && remark.ends_with(')');
        if !remark.is_empty() && !remarked {
            return Some(format!(
                "default `{documented}` of `{var}`: after the value only a remark in parentheses may follow"
            ));
        }
        let wrong = clap_defaults(uses, |d| d != value);
        return (!wrong.is_empty()).then(|| {
            format!(
                "the table gives `{var}` the default `{value}` but clap's is {wrong}: fix the default column (or \
                 the `#[arg(default_value...)]`)"
            )
        });
    }
    if documented == "–" || documented == "-" {
        let wrong = clap_defaults(uses, |d| !d.is_empty());
        return (!wrong.is_empty()).then(|| {
            format!("the table says `{var}` has no default (–) but clap's is {wrong}: write it in the default column")
        });
    }
    None
}

/// clap's defaults among `uses` that `pick` selects, each with the commands that have it:
/// `` `30000` (trialflow relay, trialflow run) ``; empty when none is selected.
fn clap_defaults(uses: &[Use], pick: impl Fn(&str) -> bool) -> String {
    let mut by_default: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for u in uses {
        if let Some(default) = u.default.as_deref().filter(|d| pick(d)) {
            by_default.entry(default).or_default().push(&u.command);
        }
    }
    let shown: Vec<String> = by_default
        .iter()
        .map(|(default, commands)| format!("`{default}` ({})", commands.join(", ")))
        .collect();
    shown.join(", ")
}

#[test]
fn the_readme_configuration_table_matches_the_command_line() {
    let readme_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
    let readme =
        std::fs::read_to_string(readme_path).unwrap_or_else(|e| panic!("reading {readme_path}: {e}"));
    let rows = table(&readme).unwrap_or_else(|e| panic!("{e}"));
    let mut found = BTreeMap::new();
    accepted(&Cli::command(), "trialflow", &mut found);
    let elsewhere: BTreeSet<&str> = READ_ELSEWHERE.iter().map(|(var, _)| *var).collect();

    let mut problems = Vec::new();
    let mut documented: BTreeMap<&str, usize> = BTreeMap::new();
    for row in &rows {
        for (var, default) in row.variables.iter().zip(&row.defaults) {
            let at = format!("README.md line {}", row.line);
            if let Some(earlier) = documented.insert(var.as_str(), row.line) {
                problems.push(format!("{at}: `{var}` already has a row (line {earlier}): keep one"));
            }
            match found.get(var.as_str()) {
                Some(uses) => {
                    if elsewhere.contains(var.as_str()) {
                        problems.push(format!(
                            "{at}: `{var}` is an argument of the CLI ({}): remove it from READ_ELSEWHERE in {}",
                            uses[0].command,
                            file!()
                        ));
                    }
                    if let Some(problem) = default_problem(var, default, uses) {
                        problems.push(format!("{at}: {problem}"));
                    }
                }
                None if elsewhere.contains(var.as_str()) => {}
                None => problems.push(format!(
                    "{at}: no subcommand reads `{var}`: remove the row, fix the name, or, if something else \
                     reads it (grep for it), add it to READ_ELSEWHERE in {}",
                    file!()
                )),
            }
        }
    }
    for (var, uses) in &found {
        if !documented.contains_key(var.as_str()) {
            let commands: BTreeSet<&str> = uses.iter().map(|u| u.command.as_str()).collect();
            let default = uses
                .iter()
                .find_map(|u| u.default.as_deref())
                .map_or("–".to_string(), |d| format!("`{d}`"));
            problems.push(format!(
                "`{var}` (read by {}) is not in README.md's configuration table: add a row `| `{var}` | {default} | \
                 <used by> | <meaning> |`",
                commands.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    for var in elsewhere.iter().filter(|var| !documented.contains_key(*var)) {
        problems.push(format!(
            "`{var}` is in READ_ELSEWHERE but not in the table: add its row or drop it from the list"
        ));
    }
    assert!(
        problems.is_empty(),
        "README.md's configuration table is out of date:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn the_table_reader_follows_its_rules() {
    let readme = "intro\n\n## Configuration\n\n| variable | default | used by | meaning |\n|---|---|---|---|\n\
                  | `A`, `B` | `1`, off | x | y |\n| `C` / `D` | – | x | y \\| z |\n| `E` | `a,b` (remark) | x | y |\n\n## Next\n| `F` | 1 | x | y |\n";
    let rows = table(readme).unwrap_or_else(|e| panic!("{e}"));
    let seen: Vec<_> = rows.iter().map(|r| (r.line, r.variables.join(" "), r.defaults.join(" | "))).collect();
    assert_eq!(
        seen,
        [
            (7, "A B".to_string(), "`1` | off".to_string()),
            (8, "C D".to_string(), "– | –".to_string()),
            (9, "E".to_string(), "`a,b` (remark)".to_string())
        ]
    );
    let uses = |default: Option<&str>| {
        vec![Use { command: "trialflow x".into(), default: default.map(str::to_string) }]
    };
    assert_eq!(default_problem("E", "`a,b` (remark)", &uses(Some("a,b"))), None);
    assert_eq!(
        default_problem("E", "`20` (demo), `0` (replay)", &uses(None)),
        None,
        "no clap default: not checked"
    );
    assert!(
        default_problem("E", "`1`", &uses(Some("2")))
            .is_some_and(|p| p.contains("clap's is `2` (trialflow x)"))
    );
    assert!(default_problem("E", "–", &uses(Some("2"))).is_some());
    assert_eq!(default_problem("E", "–", &uses(Some(""))), None);
    assert_eq!(
        default_problem("E", "the demo tokens", &uses(Some("admin-token"))),
        None,
        "words are not checked"
    );
    let mismatched = "## Configuration\n| variable | default | used by | meaning |\n| `A`, `B` | `1`, `2`, `3` | x | y |\n";
    assert!(
        table(&format!("\n{mismatched}"))
            .is_err_and(|e| e.contains("names 2 variables but gives 3 defaults"))
    );
    assert!(default_problem("E", "`1", &uses(Some("1"))).is_some(), "unclosed backtick");
}
