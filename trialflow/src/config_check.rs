//! `trialflow config check <subcommand args...>`: a component's configuration, checked the way it
//! would start, without starting it.
//!
//! The subcommand is parsed from its arguments and the environment exactly as `trialflow` parses
//! it, then its configuration goes through what the subcommand does with it before it touches the
//! network: `into_config()` of the HTTP services, the notifier's subscriptions, a consumer's rule
//! sets and questionnaires (the consumer is built and dropped unstarted), the topic layout, the
//! database URL and its session limits. Nothing is connected to, no port is bound (`main` runs
//! this before telemetry, signal handlers and the async runtime).
//!
//! Then every environment variable set in the process whose name looks like one of ours (the
//! prefixes of the README's configuration table, [`OUR_PREFIXES`]) but that no argument of that
//! subcommand reads is refused: a typo (`SITE_API_TOKEN`), or a setting given to the wrong
//! component, which would otherwise be ignored in silence. The Helm chart's drift test
//! (`trialflow/tests/helm_chart.rs`) runs this on every container the chart renders.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};

use anyhow::{Context, anyhow, bail};
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches};
use tokio_util::sync::CancellationToken;
use trialflow_outbox::DatabaseConfig;

use crate::cli::{Cli, Command, consumer_named, consumer_start, relay_with_default_sources};
use crate::topics::TopicsCommand;

#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Check a subcommand's configuration (arguments and environment) as it would start, and
    /// refuse variables of ours it does not read; connects to nothing. E.g. `trialflow config
    /// check consume notifier`.
    Check(CheckArgs),
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The subcommand and its arguments, as the component runs them (`relay`, `consume monitoring`).
    #[arg(value_name = "SUBCOMMAND", required = true, num_args = 1.., trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<OsString>,
}

/// Name prefixes of our variables: those of the README's configuration table (a unit test holds
/// every variable the command line reads to them).
pub const OUR_PREFIXES: &[&str] = &[
    "ALERT_API_",
    "CDISC_",
    "CONSUMER_",
    "DATABASE_",
    "DEMO_",
    "EPRO_",
    "HTTP_",
    "KAFKA_",
    "LOAD_",
    "LOG_",
    "METRICS_",
    "MONITORING_",
    "NOTIFIER_",
    "OIDC_",
    "OUTBOX_",
    "PIPELINE_",
    "REPLAY_",
    "RISK_",
    "SHUTDOWN_",
    "SITE_API_",
    "TOPIC_",
    "TRIALFLOW_",
];

/// Our variables without one of the prefixes.
const OUR_NAMES: &[&str] = &["NO_CREATE_TOPICS"];

/// Names with one of our prefixes that are not ours: the proxy variable HTTP clients read.
const NOT_OURS: &[&str] = &["HTTP_PROXY"];

/// Longest piece of user input (a value, a name) repeated in a message.
const MAX_SHOWN: usize = 300;
/// Longest message.
const MAX_MESSAGE: usize = 3000;

/// What a successful check found.
#[derive(Debug)]
pub struct Report {
    /// The subcommand checked, as given (escaped).
    pub command: String,
    /// The variables of ours set in the environment, each read by the subcommand.
    pub read: Vec<String>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "trialflow {}: configuration valid", self.command)?;
        match self.read.as_slice() {
            [] => write!(f, " (no variable of ours set: every setting at its default)"),
            read => write!(f, "; variables read: {}", read.join(", ")),
        }
    }
}

/// Runs `config check`: prints the report, or returns why the configuration is refused.
pub fn run(command: ConfigCommand) -> anyhow::Result<()> {
    let ConfigCommand::Check(args) = command;
    // The components' own messages may quote a value (a path, a URL): escaped and bounded too.
    let report = check(&args.command).map_err(|e| anyhow!(cut(&format!("{e:#}"), MAX_MESSAGE)))?;
    println!("{report}");
    Ok(())
}

/// Checks the subcommand `args` (without the leading `trialflow`) with the process environment.
pub fn check(args: &[OsString]) -> anyhow::Result<Report> {
    let shown = shown_command(args);
    let argv = std::iter::once(OsString::from("trialflow")).chain(args.iter().cloned());
    let matches = Cli::command().try_get_matches_from(argv).map_err(|e| anyhow!(clap_message(&e)))?;
    let path = subcommand_path(&matches);
    if path.first().map(String::as_str) == Some("config") {
        bail!("`config check` checks a component's command (`relay`, `consume notifier`, ...), not `config`");
    }
    let cli = Cli::from_arg_matches(&matches).map_err(|e| anyhow!(clap_message(&e)))?;
    let mut read = variables_read(&path);
    let validated = validate(cli.command, &mut read);

    let mut unused = Vec::new();
    let mut ours_read = Vec::new();
    for (name, _) in std::env::vars_os() {
        if !looks_like_ours(&name) {
            continue;
        }
        match name.to_str() {
            Some(name) if read.contains(name) => ours_read.push(name.to_string()),
            _ => unused.push(shown_text(&name.to_string_lossy())),
        }
    }
    unused.sort();
    let unused = (!unused.is_empty()).then(|| {
        format!(
            "trialflow {shown} reads no variable named {}: a typo, or a setting of another component? Remove \
             it from this component's environment (`trialflow {} --help` lists what it reads)",
            unused.join(", "),
            path.join(" ")
        )
    });
    // Both reported: an unread variable is often why the configuration is refused (a misspelt
    // token list leaves no caller to authenticate).
    match (validated, unused) {
        (Ok(()), None) => {
            ours_read.sort();
            Ok(Report { command: shown, read: ours_read })
        }
        (Ok(()), Some(unused)) => Err(anyhow!(unused)),
        (Err(error), None) => Err(error.context(format!("trialflow {shown}"))),
        (Err(error), Some(unused)) => Err(anyhow!("{unused}; and trialflow {shown}: {error:#}")),
    }
}

/// What the subcommand does with its configuration before it connects to anything. `read` gains
/// the variables a component reads besides its arguments.
fn validate(command: Command, read: &mut BTreeSet<String>) -> anyhow::Result<()> {
    match command {
        Command::Migrate(args) => {
            args.database.connect_options().context("DATABASE_URL")?;
        }
        Command::Relay(config) => {
            let config = relay_with_default_sources(config);
            config.database.connect_options().context("DATABASE_URL")?;
            config.lease_timeout().map_err(|why| anyhow!(why))?;
        }
        Command::SiteApi(args) => {
            // The pool's session limits come from the environment (`DatabaseConfig::from_env`).
            read.extend(variables_of::<DatabaseConfig>());
            let config = args.into_config()?;
            DatabaseConfig::connect_options_for(&config.database_url).context("DATABASE_URL")?;
        }
        Command::AlertApi(args) => {
            read.extend(variables_of::<DatabaseConfig>());
            let config = args.into_config()?;
            DatabaseConfig::connect_options_for(&config.database_url).context("DATABASE_URL")?;
        }
        Command::EproGateway(args) => {
            args.into_config()?;
        }
        Command::Consume(args) => {
            let (service, consumer) = consumer_named(&args.consumer)?;
            args.config.database.connect_options().context("DATABASE_URL")?;
            let start = consumer_start(service, consumer, args, CancellationToken::new())?;
            // Built as `trialflow consume` builds it (rule sets, questionnaires read and checked);
            // the future that would connect is dropped unpolled.
            drop((consumer.start)(start).with_context(|| format!("configuring {}", service.name))?);
        }
        Command::Topics(TopicsCommand::Plan(args) | TopicsCommand::Apply(args)) => {
            args.layout()?;
        }
        // Tools and local commands: parsing their arguments is their whole configuration check.
        _ => {}
    }
    Ok(())
}

/// The subcommands named on the command line, outermost first (`["topics", "apply"]`).
fn subcommand_path(matches: &ArgMatches) -> Vec<String> {
    let mut path = Vec::new();
    let mut current = matches;
    while let Some((name, sub)) = current.subcommand() {
        path.push(name.to_string());
        current = sub;
    }
    path
}

/// Every variable an argument of `trialflow <path...>` reads, global arguments included.
fn variables_read(path: &[String]) -> BTreeSet<String> {
    let mut command = Cli::command();
    command.build();
    let mut read = env_names(&command);
    let mut current = &command;
    for name in path {
        match current.find_subcommand(name) {
            Some(sub) => current = sub,
            None => break,
        }
        read.extend(env_names(current));
    }
    read
}

fn env_names(command: &clap::Command) -> BTreeSet<String> {
    command
        .get_arguments()
        .filter_map(|arg| arg.get_env())
        .map(|var| var.to_string_lossy().into_owned())
        .collect()
}

/// The variables the arguments of `T` read.
fn variables_of<T: Args>() -> BTreeSet<String> {
    env_names(&T::augment_args(clap::Command::new("args")))
}

/// Whether a variable's name looks like one of ours.
pub fn looks_like_ours(name: &OsStr) -> bool {
    let name = name.to_string_lossy();
    !NOT_OURS.contains(&name.as_ref())
        && (OUR_NAMES.contains(&name.as_ref()) || OUR_PREFIXES.iter().any(|p| name.starts_with(p)))
}

/// clap's message, without its usage lines, made safe to print.
fn clap_message(error: &clap::Error) -> String {
    let text = error.to_string();
    let lines: Vec<String> = text
        .lines()
        .take_while(|line| !line.starts_with("Usage:"))
        .filter(|line| !line.trim().is_empty())
        .map(|line| shown_text(line.strip_prefix("error: ").unwrap_or(line)))
        .collect();
    lines.join("; ")
}

/// The subcommand as given, for messages.
fn shown_command(args: &[OsString]) -> String {
    let joined = args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ");
    shown_text(&joined)
}

/// `text` with control characters escaped and, beyond [`MAX_SHOWN`] characters, its middle cut
/// out (the end of a message names the setting after the value it quotes): user input repeated
/// in a message never moves the terminal's cursor nor floods a log.
fn shown_text(text: &str) -> String {
    cut(text, MAX_SHOWN)
}

/// `text` with control characters escaped and at most about `max` characters.
fn cut(text: &str, max: usize) -> String {
    let escaped: Vec<String> = text
        .chars()
        .map(|c| if c.is_control() { c.escape_debug().to_string() } else { c.to_string() })
        .collect();
    if escaped.len() <= max {
        return escaped.concat();
    }
    let (head, tail) = (max / 3, max - max / 3);
    format!(
        "{}… ({} characters in all) …{}",
        escaped[..head].concat(),
        text.chars().count(),
        escaped[escaped.len() - tail..].concat()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variable_of_the_command_line_looks_like_ours() {
        let mut read = BTreeSet::new();
        fn walk(command: &clap::Command, read: &mut BTreeSet<String>) {
            read.extend(env_names(command));
            for sub in command.get_subcommands() {
                walk(sub, read);
            }
        }
        walk(&Cli::command(), &mut read);
        // `USER` is the login name (`trialflow dlq replay`'s operator), set everywhere: never refused.
        let strays: Vec<_> =
            read.iter().filter(|v| *v != "USER" && !looks_like_ours(OsStr::new(v.as_str()))).collect();
        assert!(strays.is_empty(), "add their prefixes to OUR_PREFIXES (and the README's table): {strays:?}");
    }

    #[test]
    fn shown_text_escapes_and_cuts() {
        assert_eq!(shown_text("a\u{1b}[2Jb\n"), "a\\u{1b}[2Jb\\n");
        let long = shown_text(&format!("{} for NAME", "x".repeat(10_000)));
        assert!(long.len() < MAX_SHOWN + 40 && long.contains("… (10009 characters in all) …"), "{long}");
        assert!(long.ends_with("xx for NAME") && long.starts_with("xx"), "{long}");
    }

    #[test]
    fn proxies_and_foreign_variables_are_not_ours() {
        for name in ["HTTP_PROXY", "PATH", "OTEL_SERVICE_NAME", "RUST_LOG", "USER", "SASL_PASSWORD"] {
            assert!(!looks_like_ours(OsStr::new(name)), "{name}");
        }
        for name in ["SITE_API_TOKEN", "KAFKA_CONFIG", "NO_CREATE_TOPICS", "TRIALFLOW_PG_PORT"] {
            assert!(looks_like_ours(OsStr::new(name)), "{name}");
        }
    }
}
