//! `trialflow dlq list|show|replay`: dead letters of a topic, and replaying one after a fix.

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use trialflow_consumers::dlq::{self, DeadLetterEntry};
use trialflow_outbox::KafkaConfig;

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
    /// Consumers deduplicate on the event id: replaying twice applies it once.
    Replay {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        at: Coordinates,
    },
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
        DlqCommand::Replay { target, at } => {
            let topic = target.dlq_topic();
            match dlq::replay(&target.kafka, &topic, at.partition, at.offset).await? {
                Some(r) => {
                    println!(
                        "replayed {topic}/{}/{} to {} partition {} offset {}",
                        at.partition, at.offset, r.topic, r.partition, r.offset
                    );
                    Ok(())
                }
                None => bail!(
                    "no dead letter with a dlq.original_topic header at {topic} partition {} offset {}",
                    at.partition,
                    at.offset
                ),
            }
        }
    }
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
