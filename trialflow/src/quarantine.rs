//! `trialflow outbox quarantine list|retry|discard`: outbox rows the broker refused for good
//! (see `trialflow_outbox::quarantine`), and putting them back or discarding them after a fix.

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use sqlx::postgres::PgPoolOptions;
use trialflow_outbox::quarantine::{self, QuarantinedRow, Selection};
use trialflow_outbox::{DatabaseConfig, SchemaName};

#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Rows the broker refused for good (topic not authorized or missing, record too large): the
    /// later rows of their keys wait until each is retried or discarded.
    #[command(subcommand)]
    Quarantine(QuarantineCommand),
}

#[derive(Debug, Subcommand)]
pub enum QuarantineCommand {
    /// List the quarantined rows of an outbox, in commit order (`--json` for JSON lines).
    List {
        #[command(flatten)]
        source: Source,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Put quarantined rows back into the outbox (after fixing the cause: topic created, ACL
    /// granted, limit raised). Each keeps its place in commit order: it is published before the
    /// rows of its key that waited.
    Retry {
        #[command(flatten)]
        source: Source,
        /// The row's seq, as `list` prints it.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        seq: Option<i64>,
        /// Every quarantined row of the outbox.
        #[arg(long)]
        all: bool,
        /// Who puts them back (recorded in the audit trail; default: the login name, `USER`).
        #[arg(long, env = "USER", hide_env_values = true)]
        by: String,
    },
    /// Delete a quarantined row for good; its content, who and why are kept in
    /// `<source>.outbox_quarantine_discarded`. The rows of its key that waited flow on.
    Discard {
        #[command(flatten)]
        source: Source,
        /// The row's seq, as `list` prints it.
        seq: i64,
        /// Who discards it (recorded).
        #[arg(long)]
        by: String,
        /// Why (recorded).
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Args)]
pub struct Source {
    #[command(flatten)]
    pub database: DatabaseConfig,
    /// The service schema whose outbox it is, e.g. `enrollment` (one of the relay's
    /// OUTBOX_SOURCES).
    #[arg(long)]
    pub source: SchemaName,
}

pub async fn run(command: OutboxCommand) -> anyhow::Result<()> {
    let OutboxCommand::Quarantine(command) = command;
    let source = match &command {
        QuarantineCommand::List { source, .. }
        | QuarantineCommand::Retry { source, .. }
        | QuarantineCommand::Discard { source, .. } => source,
    };
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&source.database.database_url)
        .await
        .context("connecting to the database (DATABASE_URL)")?;
    let schema = &source.source;
    match &command {
        QuarantineCommand::List { json, .. } => {
            let rows = quarantine::list(&pool, schema).await?;
            for line in render(&rows, *json, Utc::now()) {
                println!("{line}");
            }
            if !json {
                eprintln!("{} quarantined row(s) in `{schema}`", rows.len());
            }
        }
        QuarantineCommand::Retry { seq, by, .. } => {
            let which = seq.map_or(Selection::All, Selection::One);
            let seqs = quarantine::retry(&pool, schema, which, by).await?;
            let list = seqs.iter().map(i64::to_string).collect::<Vec<_>>().join(", ");
            println!(
                "put {} row(s) of `{schema}` back into the outbox{}; the relay publishes each before \
                 the rows of its key that waited",
                seqs.len(),
                if seqs.is_empty() { String::new() } else { format!(" (seq {list})") }
            );
        }
        QuarantineCommand::Discard { seq, by, reason, .. } => {
            quarantine::discard(&pool, schema, *seq, by, reason).await?;
            println!("discarded row {seq} of `{schema}` (kept in {schema}.outbox_quarantine_discarded)");
        }
    }
    pool.close().await;
    Ok(())
}

/// The lines `list` prints: a header and one line per row, or one JSON object per row.
pub fn render(rows: &[QuarantinedRow], json: bool, now: DateTime<Utc>) -> Vec<String> {
    let mut lines = Vec::with_capacity(rows.len() + 1);
    if json {
        for r in rows {
            lines.push(
                serde_json::json!({
                    "seq": r.seq,
                    "tx_id": r.tx_id,
                    "topic": r.topic,
                    "key": r.printable_key(),
                    "raw": r.raw,
                    "event_id": r.event_id,
                    "event_type": r.event_type,
                    "payload_bytes": r.payload_bytes,
                    "error": r.error,
                    "created_at": r.created_at.to_rfc3339(),
                    "quarantined_at": r.quarantined_at.to_rfc3339(),
                    "age_seconds": (now - r.created_at).num_seconds().max(0),
                })
                .to_string(),
            );
        }
        return lines;
    }
    lines.push(format!(
        "{:>10}  {:<32} {:<24} {:<24} {:>7}  error",
        "seq", "topic", "key", "event_type", "age"
    ));
    for r in rows {
        lines.push(format!(
            "{:>10}  {:<32} {:<24} {:<24} {:>7}  {}",
            r.seq,
            r.topic,
            r.printable_key(),
            r.event_type,
            age(now - r.created_at),
            r.error
        ));
    }
    lines
}

/// A short age: `42s`, `5m07s`, `3h20m`, `2d04h`.
fn age(d: chrono::TimeDelta) -> String {
    let s = d.num_seconds().max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn parse(args: &[&str]) -> Result<QuarantineCommand, String> {
        match Cli::try_parse_from(args) {
            Ok(Cli { command: Command::Outbox(OutboxCommand::Quarantine(c)), .. }) => Ok(c),
            Ok(other) => Err(format!("parsed as another command: {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn the_quarantine_commands_parse_and_refuse_what_is_missing() {
        let list = parse(&["trialflow", "outbox", "quarantine", "list", "--source", "enrollment", "--json"]);
        let Ok(QuarantineCommand::List { source, json: true }) = list else { panic!("{list:?}") };
        assert_eq!(source.source.as_str(), "enrollment");

        let retry =
            parse(&["trialflow", "outbox", "quarantine", "retry", "--source", "epro", "42", "--by", "bob"]);
        assert!(matches!(retry, Ok(QuarantineCommand::Retry { seq: Some(42), all: false, .. })), "{retry:?}");
        let all = parse(&[
            "trialflow",
            "outbox",
            "quarantine",
            "retry",
            "--source",
            "epro",
            "--all",
            "--by",
            "bob",
        ]);
        assert!(matches!(all, Ok(QuarantineCommand::Retry { seq: None, all: true, .. })), "{all:?}");

        let discard = parse(&[
            "trialflow",
            "outbox",
            "quarantine",
            "discard",
            "--source",
            "epro",
            "7",
            "--by",
            "alice",
            "--reason",
            "test event",
        ]);
        let Ok(QuarantineCommand::Discard { seq: 7, by, reason, .. }) = discard else {
            panic!("{discard:?}")
        };
        assert_eq!((by.as_str(), reason.as_str()), ("alice", "test event"));

        for (bad, why) in [
            (&["trialflow", "outbox", "quarantine", "retry", "--source", "epro"][..], "<SEQ>"),
            (
                &["trialflow", "outbox", "quarantine", "retry", "--source", "epro", "1", "--all"],
                "cannot be used",
            ),
            (
                &["trialflow", "outbox", "quarantine", "discard", "--source", "epro", "7", "--by", "alice"],
                "--reason",
            ),
            (
                &["trialflow", "outbox", "quarantine", "discard", "--source", "epro", "7", "--reason", "x"],
                "--by",
            ),
            (&["trialflow", "outbox", "quarantine", "list", "--source", "Bad-Name"], "invalid outbox source"),
            (&["trialflow", "outbox", "quarantine", "list"], "--source"),
        ] {
            let error = parse(bad).expect_err(&format!("{bad:?} was accepted"));
            assert!(error.contains(why), "{bad:?}: {error}");
        }
    }

    /// `trialflow outbox quarantine list|retry|discard` as the binary runs them (parsed from the
    /// command line, then run) on a fresh outbox with one quarantined row.
    #[tokio::test]
    async fn the_commands_list_retry_and_refuse_against_an_outbox() -> anyhow::Result<()> {
        let svc = trialflow_testkit::TestService::new(None, 1).await?;
        svc.workload.record("subject-\u{1b}7", 1, 120.0).await?;
        let seq: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT seq FROM {}.outbox", svc.schema)))
                .fetch_one(&svc.pool)
                .await?;
        let store = trialflow_outbox::store::Store::new(&svc.schema);
        assert_eq!(
            store.quarantine(&svc.pool, &[(seq, "Broker: Topic authorization failed".into())]).await?,
            1
        );
        let url = trialflow_testkit::database_url();
        let (schema, seq_arg) = (svc.schema.to_string(), seq.to_string());
        let args = |tail: &[&str]| {
            let mut args = vec!["trialflow", "outbox", "quarantine"];
            args.extend_from_slice(tail);
            args.extend_from_slice(&["--source", &schema, "--database-url", &url]);
            args.into_iter().map(String::from).collect::<Vec<_>>()
        };
        let command = |tail: &[&str]| match Cli::try_parse_from(args(tail)) {
            Ok(Cli { command: Command::Outbox(c), .. }) => c,
            other => panic!("{other:?}"),
        };

        run(command(&["list"])).await?;
        let rows = trialflow_outbox::quarantine::list(&svc.pool, &svc.schema).await?;
        let lines = render(&rows, false, Utc::now());
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[1].contains(&seq_arg) && lines[1].contains("subject-\\u{1b}7"),
            "key escaped: {lines:?}"
        );
        assert!(lines[1].contains("Topic authorization failed"), "{lines:?}");
        let json: serde_json::Value = serde_json::from_str(&render(&rows, true, Utc::now())[0])?;
        assert_eq!(json["seq"], seq);

        let error = run(command(&["discard", &(seq + 1).to_string(), "--by", "alice", "--reason", "x"]))
            .await
            .expect_err("an unknown seq is refused");
        assert!(error.to_string().contains(&format!("no quarantined row {}", seq + 1)), "{error}");
        run(command(&["retry", &seq_arg, "--by", "alice"])).await?;
        assert_eq!(svc.outbox_len().await?, 1, "the row is back in the outbox");
        assert!(trialflow_outbox::quarantine::list(&svc.pool, &svc.schema).await?.is_empty());
        Ok(())
    }

    #[test]
    fn ages_read_short() {
        let s = chrono::TimeDelta::seconds;
        assert_eq!(age(s(-3)), "0s");
        assert_eq!(age(s(42)), "42s");
        assert_eq!(age(s(307)), "5m07s");
        assert_eq!(age(s(3 * 3600 + 20 * 60)), "3h20m");
        assert_eq!(age(s(2 * 86400 + 4 * 3600 + 5)), "2d04h");
    }
}
