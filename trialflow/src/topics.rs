//! `trialflow topics plan|apply`: the pipeline's topics as code (see `trialflow_outbox::topics`).

use anyhow::Context;
use trialflow_outbox::KafkaConfig;
use trialflow_outbox::topics::{self, TopicLayout};
use trialflow_schemas::topics::TopicNames;

#[derive(Debug, clap::Subcommand)]
pub enum TopicsCommand {
    /// Show what `apply` would change: topics to create, settings to set, and differences left to
    /// an operator (partitions, replication factor). Changes nothing.
    Plan(TopicsArgs),
    /// Create the missing topics and set the managed settings (retention, clean-up,
    /// min.insync.replicas) of existing ones, keeping their other settings. Idempotent.
    Apply(TopicsArgs),
}

#[derive(Debug, clap::Args)]
pub struct TopicsArgs {
    #[command(flatten)]
    pub kafka: KafkaConfig,

    /// Prefix of every topic name, e.g. `staging.` (letters, digits, `.`, `_`, `-`).
    #[arg(long, env = "TOPIC_PREFIX", default_value = "", value_parser = topic_prefix)]
    pub topic_prefix: String,

    /// Partitions of each catalogue topic (dead-letter topics have one).
    #[arg(long, env = "TOPIC_PARTITIONS", default_value_t = 6, value_parser = clap::value_parser!(i32).range(1..=10_000))]
    pub partitions: i32,

    /// Copies of each partition: 3 on a production cluster, 1 on a single broker.
    #[arg(long, env = "TOPIC_REPLICATION_FACTOR", default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=16))]
    pub replication_factor: i32,

    /// Copies that must have a write before an `acks=all` producer is answered; default: 2, or
    /// the replication factor when it is smaller. At most the replication factor.
    #[arg(long, env = "TOPIC_MIN_INSYNC_REPLICAS", value_parser = clap::value_parser!(i32).range(1..=16))]
    pub min_insync_replicas: Option<i32>,

    /// Dead-letter topic = topic + this suffix (as the consumers' CONSUMER_DLQ_SUFFIX).
    #[arg(long, env = "CONSUMER_DLQ_SUFFIX", default_value = trialflow_schemas::topics::DLQ_SUFFIX, value_parser = topic_prefix)]
    pub dlq_suffix: String,

    /// The exactly-once relay's state topic (as the relay's OUTBOX_STATE_TOPIC): one partition,
    /// compacted.
    #[arg(long, env = "OUTBOX_STATE_TOPIC", default_value = trialflow_outbox::config::DEFAULT_STATE_TOPIC, value_parser = topic_prefix)]
    pub state_topic: String,
}

/// A topic prefix or suffix: the characters Kafka allows in a topic name, and short enough to
/// leave room for the catalogue's names (Kafka allows 249 characters in all).
fn topic_prefix(value: &str) -> Result<String, String> {
    if let Some(bad) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("{bad:?} cannot be part of a Kafka topic name (letters, digits, `.`, `_`, `-`)"));
    }
    if value.len() > 100 {
        return Err(format!("{} characters; at most 100", value.len()));
    }
    Ok(value.to_string())
}

impl TopicsArgs {
    /// The layout these settings describe; an error when they contradict each other.
    pub fn layout(&self) -> anyhow::Result<TopicLayout> {
        let min_insync_replicas = self.min_insync_replicas.unwrap_or(self.replication_factor.min(2));
        anyhow::ensure!(
            min_insync_replicas <= self.replication_factor,
            "--min-insync-replicas {min_insync_replicas} exceeds --replication-factor {}: no write could ever \
             be acknowledged",
            self.replication_factor
        );
        Ok(TopicLayout {
            names: TopicNames::new(self.topic_prefix.clone()),
            partitions: self.partitions,
            replication_factor: self.replication_factor,
            min_insync_replicas,
            dlq_suffix: self.dlq_suffix.clone(),
            state_topic: Some(self.state_topic.clone()),
        })
    }
}

pub async fn run(command: TopicsCommand) -> anyhow::Result<()> {
    let (args, apply) = match command {
        TopicsCommand::Plan(args) => (args, false),
        TopicsCommand::Apply(args) => (args, true),
    };
    let layout = args.layout()?;
    let kafka = &args.kafka;
    let plan = topics::plan(kafka, &layout)
        .await
        .with_context(|| format!("reading the topics of {}", kafka.bootstrap_servers))?;
    println!("{plan}");
    if apply && !plan.is_empty() {
        let applied = topics::apply(kafka, &plan).await.context("applying the plan")?;
        println!("applied: {} created, {} configured", applied.created, applied.configured);
    }
    Ok(())
}
