use anyhow::Context;
use clap::{Parser, Subcommand};
use trialflow_outbox::{DatabaseConfig, RelayConfig, SchemaName};

use crate::telemetry::{self, TelemetryConfig};
use crate::{demo, shutdown};

/// trialflow: an event-driven pipeline for clinical-trial operations.
#[derive(Debug, Parser)]
#[command(name = "trialflow", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub telemetry: TelemetryConfig,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or upgrade every service schema (tables and outbox). Idempotent.
    Migrate(MigrateArgs),
    /// Publish outbox rows to Kafka (run one or more instances).
    Relay(RelayConfig),
    /// Run the pipeline on a generated workload and report what was published.
    Demo(demo::DemoArgs),
    /// Inspect and replay dead letters.
    #[command(subcommand)]
    Dlq(crate::dlq::DlqCommand),
}

#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub database: DatabaseConfig,

    /// Set the shard count of every outbox (1..=1024; refused while an outbox has pending rows).
    #[arg(long, env = "OUTBOX_SHARDS")]
    pub outbox_shards: Option<u32>,
}

/// The service schemas this build knows, each with its outbox.
pub fn service_schemas() -> Vec<SchemaName> {
    vec![trialflow_producers::workload::schema()]
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let _telemetry = telemetry::init(&cli.telemetry, "trialflow")?;
    match cli.command {
        Command::Migrate(args) => migrate(&args).await,
        Command::Relay(config) => {
            trialflow_outbox::relay::run(config, shutdown::on_signal()).await.context("relay")
        }
        Command::Demo(args) => demo::run(args, shutdown::on_signal()).await,
        Command::Dlq(command) => crate::dlq::run(command).await,
    }
}

pub async fn migrate(args: &MigrateArgs) -> anyhow::Result<()> {
    let url = &args.database.database_url;
    trialflow_producers::workload::migrate(url, &trialflow_producers::workload::schema())
        .await
        .with_context(|| format!("migrating schema `{}`", trialflow_producers::workload::SCHEMA))?;
    if let Some(shards) = args.outbox_shards {
        for schema in service_schemas() {
            trialflow_outbox::set_shard_count(url, &schema, shards)
                .await
                .with_context(|| format!("setting the shard count of `{schema}`"))?;
        }
    }
    tracing::info!(schemas = ?service_schemas(), "Migrations applied.");
    Ok(())
}
