//! `trialflow dlq list|show|replay`: dead letters of a topic, and replaying one after a fix.

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use sqlx::postgres::PgPoolOptions;
use trialflow_consumers::dlq::{self, DeadLetterEntry};
use trialflow_outbox::{AuditRecord, DatabaseConfig, KafkaConfig, SchemaName};
use trialflow_pipeline::services::Schemas;

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List the dead letters of a topic (one line each; `--json` for one JSON object per line).
    List {
        #[command(flatten)]
        target: Target,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter: every header and the payload (as text when it is UTF-8, else hex).
    Show {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        at: Coordinates,
    },
    /// Produce a dead letter again to its original topic (same key, payload, event id).
    /// Consumers deduplicate on the event id: replaying twice applies it once. Recorded in the
    /// audit trail of the consumer that dead-lettered it: who, why, what.
    Replay {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        at: Coordinates,
        #[command(flatten)]
        audit: ReplayAudit,
    },
}

/// Who replays a dead letter and why, recorded in an audit trail.
#[derive(Debug, Args)]
pub struct ReplayAudit {
    #[command(flatten)]
    pub database: DatabaseConfig,
    /// Who replays it (recorded; default: the login name, `USER`).
    #[arg(long, env = "USER", hide_env_values = true)]
    pub by: String,
    /// Why (recorded), e.g. the fix that makes it pass now.
    #[arg(long)]
    pub reason: String,
    /// The schema whose audit trail records the replay; default: the schema of the consumer
    /// named in the letter's `dlq.consumer` header (see `trialflow services`).
    #[arg(long)]
    pub source: Option<SchemaName>,
}

#[derive(Debug, Args)]
pub struct Target {
    #[command(flatten)]
    pub kafka: KafkaConfig,
    /// The dead-letter topic, e.g. `clinical.observations.v1.dlq` (or the original topic: the
    /// suffix is appended when missing).
    #[arg(long)]
    pub topic: String,
    /// The suffix of dead-letter topics, as the consumers were configured.
    #[arg(long, env = "CONSUMER_DLQ_SUFFIX", default_value = trialflow_schemas::topics::DLQ_SUFFIX)]
    pub dlq_suffix: String,
}

impl Target {
    fn dlq_topic(&self) -> String {
        if self.topic.ends_with(&self.dlq_suffix) {
            self.topic.clone()
        } else {
            format!("{}{}", self.topic, self.dlq_suffix)
        }
    }
}

#[derive(Debug, Args)]
pub struct Coordinates {
    /// Partition of the dead letter (as `list` prints it).
    #[arg(long)]
    pub partition: i32,
    /// Offset of the dead letter.
    #[arg(long)]
    pub offset: i64,
}

pub async fn run(command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::List { target, json } => {
            let topic = target.dlq_topic();
            let letters =
                dlq::list(&target.kafka, &topic).await.with_context(|| format!("reading {topic}"))?;
            if !json {
                println!(
                    "{:>4} {:>8}  {:<36}  {:<10} {:<28} reason",
                    "part", "offset", "event_id", "class", "original"
                );
            }
            for m in &letters {
                let e = DeadLetterEntry::from(m);
                if json {
                    println!("{}", serde_json::to_string(&e)?);
                } else {
                    println!(
                        "{:>4} {:>8}  {:<36}  {:<10} {:<28} {}",
                        e.partition,
                        e.offset,
                        e.event_id.as_deref().unwrap_or("-"),
                        e.error_class.as_deref().unwrap_or("-"),
                        format!(
                            "{}/{}/{}",
                            e.original_topic.as_deref().unwrap_or("?"),
                            e.original_partition.as_deref().unwrap_or("?"),
                            e.original_offset.as_deref().unwrap_or("?")
                        ),
                        e.reason.as_deref().unwrap_or("-")
                    );
                }
            }
            if !json {
                eprintln!("{} dead letter(s) on {topic}", letters.len());
            }
            Ok(())
        }
        DlqCommand::Show { target, at } => {
            let topic = target.dlq_topic();
            let Some(m) = dlq::show(&target.kafka, &topic, at.partition, at.offset).await? else {
                bail!("no dead letter at {topic} partition {} offset {}", at.partition, at.offset);
            };
            // Escaped: a dead letter may hold control characters and invalid UTF-8, which must
            // neither reach the terminal raw nor be lost.
            let key = m.raw_key.as_deref().map_or_else(|| "(none)".to_string(), escape);
            println!(
                "topic      {topic}\npartition  {}\noffset     {}\nkey        {key}",
                m.partition, m.offset
            );
            for (k, v) in &m.raw_headers {
                println!("header     {}: {}", escape(k.as_bytes()), escape(v));
            }
            match std::str::from_utf8(&m.payload) {
                Ok(text) => {
                    println!("payload    ({} bytes, UTF-8) {}", m.payload.len(), escape(text.as_bytes()))
                }
                Err(_) => println!("payload    ({} bytes, hex) {}", m.payload.len(), hex(&m.payload)),
            }
            Ok(())
        }
        DlqCommand::Replay { target, at, audit } => replay(&target, &at, &audit).await,
    }
}

/// Replays a dead letter, then writes its audit record (the database is reached first, so a
/// replay the broker refuses leaves no record, and the trail's lock is not held while waiting
/// for the broker). The honest limit, as a dual write: a record that fails after the
/// acknowledgement leaves a replay without it; the command then fails and says so (replaying
/// again is harmless: consumers deduplicate on the event id).
async fn replay(target: &Target, at: &Coordinates, audit: &ReplayAudit) -> anyhow::Result<()> {
    let (by, reason) = (audit.by.trim(), audit.reason.trim());
    if by.is_empty() || reason.is_empty() {
        bail!("replaying a dead letter needs who (--by) and why (--reason), both non-empty");
    }
    let topic = target.dlq_topic();
    let missing = || {
        anyhow::anyhow!(
            "no dead letter with a dlq.original_topic header at {topic} partition {} offset {}",
            at.partition,
            at.offset
        )
    };
    let letter = dlq::show(&target.kafka, &topic, at.partition, at.offset).await?.ok_or_else(missing)?;
    let entry = DeadLetterEntry::from(&letter);
    let original = entry.original_topic.clone().ok_or_else(missing)?;
    let schema = match (&audit.source, &entry.consumer) {
        (Some(schema), _) => schema.clone(),
        (None, Some(consumer)) => Schemas::default().get(consumer).cloned().with_context(|| {
            format!("the letter names consumer `{consumer}`, which has no schema here; pass --source")
        })?,
        (None, None) => bail!("the letter names no consumer (dlq.consumer); pass --source"),
    };
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(audit.database.connect_options()?)
        .await
        .context("connecting to the database (DATABASE_URL)")?;
    let coordinates = format!("{topic}/{}/{}", at.partition, at.offset);
    let record = AuditRecord::by_operator(by, "dead_letter.replayed", "dead_letter", &coordinates)
        .change("replayed_to", serde_json::Value::Null, original.as_str())
        .change("event_id", serde_json::Value::Null, entry.event_id.as_deref())
        .change("event_type", serde_json::Value::Null, entry.event_type.as_deref())
        .change("dead_letter_reason", serde_json::Value::Null, entry.reason.as_deref())
        .reason(reason)
        .cause("command:trialflow dlq replay");
    let Some(r) = dlq::replay(&target.kafka, &topic, at.partition, at.offset).await? else {
        return Err(missing());
    };
    let recorded = async {
        let mut tx = pool.begin().await?;
        trialflow_outbox::audit::append(&mut tx, &schema, &[record]).await?;
        tx.commit().await?;
        anyhow::Ok(())
    };
    recorded.await.with_context(|| {
        format!(
            "replayed {coordinates} to {} partition {} offset {}, but its audit record was not written; \
             record it by replaying again (consumers apply it once)",
            r.topic, r.partition, r.offset
        )
    })?;
    pool.close().await;
    println!(
        "replayed {coordinates} to {} partition {} offset {} (audited in `{schema}`)",
        r.topic, r.partition, r.offset
    );
    Ok(())
}

/// Printable text of any bytes: control characters escaped (`\u{0}`, `\n`), each byte of invalid
/// UTF-8 as `\xNN`.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.utf8_chunks() {
        out.extend(chunk.valid().chars().flat_map(char::escape_debug));
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn dead_letters_print_escaped_and_lossless() {
        assert_eq!(escape(b"plain-key"), "plain-key");
        assert_eq!(escape(b"not-a-uuid\0\xff"), "not-a-uuid\\0\\xff");
        assert_eq!(escape("line\nbreak\u{7}".as_bytes()), "line\\nbreak\\u{7}");
        assert_eq!(escape(b"\xc3\x28 \xed\xa0\x80"), "\\xc3( \\xed\\xa0\\x80");
        assert_eq!(escape("é ✓".as_bytes()), "é ✓");
    }
}
