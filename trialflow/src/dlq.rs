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
    /// The dead-letter topic, e.g. `clinical.observations.v1.dlq` (or the original topic: `.dlq`
    /// is appended when missing).
    #[arg(long)]
    pub topic: String,
}

impl Target {
    fn dlq_topic(&self) -> String {
        if self.topic.ends_with(".dlq") { self.topic.clone() } else { format!("{}.dlq", self.topic) }
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
            println!(
                "topic      {topic}\npartition  {}\noffset     {}\nkey        {}",
                m.partition, m.offset, m.key
            );
            for (k, v) in &m.headers {
                println!("header     {k}: {v}");
            }
            match std::str::from_utf8(&m.payload) {
                Ok(text) => println!("payload    ({} bytes, UTF-8) {text}", m.payload.len()),
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

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
