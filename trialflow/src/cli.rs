use anyhow::Context;
use clap::{Parser, Subcommand};
use trialflow_consumers::ConsumerConfig;
use trialflow_consumers::monitoring::{
    self,
    api::{AlertApi, AlertApiArgs},
};
use trialflow_consumers::notifier::{self, NotifierArgs, NotifierConfig};
use trialflow_outbox::{DatabaseConfig, RelayConfig, SchemaName};
use trialflow_pipeline::services::{self, Schemas, Settings};
use trialflow_pipeline::{Pipeline, PipelineConfig, shutdown};
use trialflow_producers::epro_gateway::{self, EproGatewayArgs};
use trialflow_producers::site_api::{self, SiteApiArgs};
use trialflow_schemas::topics::TopicNames;

use crate::demo;
use crate::telemetry::{self, TelemetryConfig};

/// trialflow: an event-driven pipeline for clinical-trial operations.
#[derive(Debug, Parser)]
#[command(name = "trialflow", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub telemetry: TelemetryConfig,

    #[command(flatten)]
    pub shutdown: shutdown::ShutdownConfig,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or upgrade every service schema (tables and outbox). Idempotent.
    Migrate(MigrateArgs),
    /// Publish outbox rows to Kafka (run one or more instances).
    Relay(RelayConfig),
    /// Run every component in this process (site API, relay, consumers) until interrupted.
    Run(RunArgs),
    /// Serve the site API (studies, sites, kit shipments, screening, consent, enrollment requests).
    SiteApi(SiteApiArgs),
    /// Serve the ePRO ingestion gateway (HTTP → ingestion topic, 202 once the broker acknowledged).
    EproGateway(EproGatewayArgs),
    /// Serve the researchers' alert API and inbox page (part of the monitoring service).
    AlertApi(AlertApiArgs),
    /// Run one domain consumer (migrates its schema first).
    Consume(ConsumeArgs),
    /// Print the services: schema, consumer group, topics read and written, how each is served.
    Services(crate::services::ServicesArgs),
    /// Start the local stack if needed, run every component and replay the CDISC pilot study
    /// through them; print the summary (also `.data/demo-summary.json`).
    Demo(demo::DemoArgs),
    /// Replay a public trial data set through every component (in this process) and report.
    Replay(demo::ReplayCommand),
    /// The pipeline's topics as code: `plan` shows what differs on the cluster, `apply` makes it so.
    #[command(subcommand)]
    Topics(crate::topics::TopicsCommand),
    /// Inspect and replay dead letters.
    #[command(subcommand)]
    Dlq(crate::dlq::DlqCommand),
    /// Operate on the outboxes: rows the broker refused for good (`outbox quarantine ...`).
    #[command(subcommand)]
    Outbox(crate::quarantine::OutboxCommand),
    /// The services' audit trails: check their hash chains, export a study's records.
    #[command(subcommand)]
    Audit(crate::audit::AuditCommand),
    /// Generate synthetic load against a running pipeline (site API, ePRO gateway, clinical topic).
    Load(trialflow_simulation::load::LoadArgs),
    /// Check a component's configuration without starting it (`config check consume notifier`).
    #[command(subcommand)]
    Config(crate::config_check::ConfigCommand),
}

#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub database: DatabaseConfig,

    /// Set the shard count of every outbox (1..=1024; refused while an outbox has pending rows).
    #[arg(long, env = "OUTBOX_SHARDS")]
    pub outbox_shards: Option<u32>,
}

#[derive(Debug, clap::Args)]
pub struct ConsumeArgs {
    /// Which consumer (see `trialflow services`).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(services::consumers().map(|(s, _)| s.name)))]
    pub consumer: String,

    #[command(flatten)]
    pub config: ConsumerConfig,

    /// Prefix of every topic name, e.g. `staging.` (several environments on one cluster).
    #[arg(long, env = "TOPIC_PREFIX", default_value = "")]
    pub topic_prefix: String,

    /// monitoring: a folder of per-study rule sets (`*.json`) added to, or replacing, the default.
    #[arg(long, env = "MONITORING_RULES_DIR")]
    pub monitoring_rules_dir: Option<std::path::PathBuf>,

    /// risk: a folder of per-study KRI thresholds (`*.json`); KRIs not named keep ±2/±3 and
    /// their minimum denominator.
    #[arg(long, env = "RISK_CONFIG_DIR")]
    pub risk_config_dir: Option<std::path::PathBuf>,

    /// epro-validation: a folder of questionnaire definitions and schedules (`*.json`) added to,
    /// or replacing, the built-in ones.
    #[arg(long, env = "EPRO_CONFIG_DIR")]
    pub epro_config_dir: Option<std::path::PathBuf>,

    /// notifier: who is notified of what.
    #[command(flatten)]
    pub notifier: NotifierArgs,
}

/// The service schemas this build knows, each with its outbox: the relay's default sources.
pub fn service_schemas() -> Vec<SchemaName> {
    Schemas::default().sources()
}

/// `config` publishing every service's outbox when no source is configured.
pub fn relay_with_default_sources(mut config: RelayConfig) -> RelayConfig {
    if config.sources.is_empty() {
        config.sources = service_schemas();
    }
    config
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub database: DatabaseConfig,

    #[command(flatten)]
    pub kafka: trialflow_outbox::KafkaConfig,

    /// Do not create missing topics (a cluster whose topics its operators provision).
    #[arg(long, env = "NO_CREATE_TOPICS")]
    pub no_create_topics: bool,

    /// Partitions of each topic created.
    #[arg(long, env = "TOPIC_PARTITIONS", default_value_t = 6)]
    pub partitions: i32,

    /// A folder of questionnaire definitions and schedules (`*.json`) beyond the built-in ones.
    #[arg(long, env = "EPRO_CONFIG_DIR")]
    pub epro_config_dir: Option<std::path::PathBuf>,

    /// A folder of per-study monitoring rule sets (`*.json`) beyond the default one.
    #[arg(long, env = "MONITORING_RULES_DIR")]
    pub monitoring_rules_dir: Option<std::path::PathBuf>,

    /// A folder of per-study KRI thresholds (`*.json`) for the risk service.
    #[arg(long, env = "RISK_CONFIG_DIR")]
    pub risk_config_dir: Option<std::path::PathBuf>,

    /// Run on private schemas and topics named after NAME (lower-case letters, digits, `_`) plus a
    /// random suffix, and on free ports (printed at start): a pipeline that shares the database and
    /// broker without touching anyone's data (tests, a trial next to a running demo).
    #[arg(long, env = "PIPELINE_ISOLATED", value_name = "NAME")]
    pub isolated: Option<String>,

    #[command(flatten)]
    pub notifier: NotifierArgs,

    /// The HTTP services' rate limits (off unless set) and request timeout, for all three.
    #[command(flatten)]
    pub limits: trialflow_http::limits::LimitsArgs,
}

/// Every component in one process.
pub async fn run_all(args: RunArgs, shutdown: tokio_util::sync::CancellationToken) -> anyhow::Result<()> {
    let (url, kafka) = (&args.database.database_url, &args.kafka);
    let mut config = match &args.isolated {
        Some(name) => PipelineConfig::isolated(name, url, kafka)?,
        None => PipelineConfig::local(url, kafka),
    }
    .with_database(&args.database)
    .with_limits(&args.limits.local_limits());
    config.create_topics = !args.no_create_topics;
    config.partitions = args.partitions;
    config.settings = Settings {
        epro_config_dir: args.epro_config_dir,
        monitoring_rules_dir: args.monitoring_rules_dir,
        risk_config_dir: args.risk_config_dir,
        notifier: args.notifier.into_config().context("notifier configuration")?,
    };
    if args.isolated.is_some() {
        println!(
            "isolated pipeline: topic prefix `{}`, schemas {}",
            config.topics.prefix(),
            config.schemas.sources().iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    let pipeline = Pipeline::start(config, &shutdown).await?;
    println!(
        "trialflow is running; site API on http://{}, ePRO gateway on http://{}, researcher inbox on \
         http://{}/inbox?token=researcher-token (Ctrl-C to stop)",
        pipeline.site_api_addr(),
        pipeline.epro_gateway_addr(),
        pipeline.alert_api_addr()
    );
    pipeline.wait().await
}

/// Serves the alert API configured by `args` (`ALERT_API_*`, `DATABASE_URL`, `TOPIC_PREFIX`).
pub async fn serve_alert_api(
    args: AlertApiArgs,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let config = args.into_config()?;
    monitoring::migrate(&config.database_url, &config.schema)
        .await
        .context("migrating the monitoring schema")?;
    monitoring::api::describe_metrics();
    let api = AlertApi::bind(config).await.context("starting the alert API")?;
    tracing::info!(addr = %api.local_addr(), "Alert API listening.");
    api.run(shutdown).await.context("alert API")
}

/// Serves the ePRO ingestion gateway configured by `args` (`EPRO_GATEWAY_*`, `KAFKA_*`,
/// `TOPIC_PREFIX`).
pub async fn serve_epro_gateway(
    args: EproGatewayArgs,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let config = args.into_config()?;
    epro_gateway::describe_metrics();
    let gateway = epro_gateway::EproGateway::bind(config).await.context("starting the ePRO gateway")?;
    tracing::info!(addr = %gateway.local_addr(), "ePRO gateway listening.");
    gateway.run(shutdown).await.context("ePRO gateway")
}

/// Serves the site API configured by `args` (`SITE_API_*`, `DATABASE_URL`, `TOPIC_PREFIX`; see the
/// README) until `shutdown`.
pub async fn serve_site_api(
    args: SiteApiArgs,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let config = args.into_config()?;
    site_api::migrate(&config.database_url, &config.schema).await.context("migrating the site-api schema")?;
    site_api::describe_metrics();
    // `GET /v1/audit` reads every service's trail, and the code break the enrollment service's
    // randomization records, in the services' default schemas.
    let links = Schemas::default().site_api_links();
    let api = site_api::SiteApi::bind_linked(config, links).await.context("starting the site API")?;
    tracing::info!(addr = %api.local_addr(), "Site API listening.");
    api.run(shutdown).await.context("site API")
}

pub async fn consume(args: ConsumeArgs, shutdown: tokio_util::sync::CancellationToken) -> anyhow::Result<()> {
    let (service, consumer) = consumer_named(&args.consumer)?;
    // Before the migration: a cluster that refuses our settings (SASL, TLS) is reported first.
    trialflow_outbox::kafka::check_connection(
        &args.config.kafka,
        trialflow_outbox::kafka::ClientKind::Consumer,
    )
    .await?;
    service.migrate(&args.config.database.database_url, &Schemas::default()[service.name]).await?;
    let start = consumer_start(service, consumer, args, shutdown)?;
    trialflow_consumers::runtime::starting(&start.spec.name);
    (consumer.start)(start).with_context(|| format!("configuring {}", service.name))?.await
}

/// The service whose consumer is `name` (a `trialflow consume` choice).
pub(crate) fn consumer_named(
    name: &str,
) -> anyhow::Result<(&'static services::Service, &'static services::Consumer)> {
    services::consumers().find(|(s, _)| s.name == name).with_context(|| format!("no consumer {name:?}"))
}

/// What `trialflow consume` hands `service` to start its consumer: the default schema, the topics
/// of the prefix, the settings of `args`; it runs until `stop`.
pub(crate) fn consumer_start(
    service: &services::Service,
    consumer: &services::Consumer,
    args: ConsumeArgs,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<services::Start> {
    let topics = TopicNames::new(args.topic_prefix);
    let notifier = match service.name {
        notifier::NAME => args.notifier.into_config().context("notifier configuration")?,
        _ => NotifierConfig::default(),
    };
    Ok(services::Start {
        spec: (consumer.spec)(Schemas::default()[service.name].clone(), &topics),
        config: args.config,
        topics,
        settings: Settings {
            epro_config_dir: args.epro_config_dir,
            monitoring_rules_dir: args.monitoring_rules_dir,
            risk_config_dir: args.risk_config_dir,
            notifier,
        },
        stop,
    })
}

/// Runs the command until it ends or `shutdown` (the process's, see [`shutdown::install`]).
pub async fn run(mut cli: Cli, shutdown: tokio_util::sync::CancellationToken) -> anyhow::Result<()> {
    // The load generator is a client of a running pipeline: it serves no metrics (and so never
    // competes for the pipeline's metrics port).
    if matches!(cli.command, Command::Load(_)) {
        cli.telemetry.metrics_addr.clear();
    }
    // The demo and the replay draw progress bars and a summary: only warnings and errors log.
    let quiet = matches!(cli.command, Command::Demo(_) | Command::Replay(_));
    let filter = if quiet { "warn,sqlx=error" } else { telemetry::DEFAULT_LOG_FILTER };
    let _telemetry = telemetry::init(&cli.telemetry, "trialflow", filter)?;
    check_shutdown_graces(&cli);
    match cli.command {
        Command::Migrate(args) => migrate(&args).await,
        Command::Relay(config) => {
            trialflow_outbox::relay::run(relay_with_default_sources(config), shutdown).await.context("relay")
        }
        Command::Run(args) => run_all(args, shutdown).await,
        Command::SiteApi(args) => serve_site_api(args, shutdown).await,
        Command::AlertApi(args) => serve_alert_api(args, shutdown).await,
        Command::EproGateway(args) => serve_epro_gateway(args, shutdown).await,
        Command::Consume(args) => consume(args, shutdown).await,
        Command::Services(args) => crate::services::print(&args),
        Command::Demo(args) => demo::run(args, shutdown).await,
        Command::Replay(command) => demo::replay(command, shutdown).await,
        Command::Topics(command) => crate::topics::run(command).await,
        Command::Dlq(command) => crate::dlq::run(command).await,
        Command::Outbox(command) => crate::quarantine::run(command).await,
        Command::Audit(command) => crate::audit::run(command).await,
        Command::Load(args) => trialflow_simulation::load::run(args, shutdown).await,
        Command::Config(command) => crate::config_check::run(command),
    }
}

/// Warns when a component's own shutdown grace leaves it no room within SHUTDOWN_GRACE_SECS.
fn check_shutdown_graces(cli: &Cli) {
    let ms = std::time::Duration::from_millis;
    let (relay, consumer) = match &cli.command {
        Command::Relay(config) => (Some(config.shutdown_grace_ms), None),
        Command::Consume(args) => (None, Some(args.config.shutdown_grace_ms)),
        // The in-process pipeline runs its components with their local defaults.
        Command::Run(_) | Command::Demo(_) | Command::Replay(_) => (
            Some(RelayConfig::local(Vec::new()).shutdown_grace_ms),
            Some(ConsumerConfig::local().shutdown_grace_ms),
        ),
        _ => (None, None),
    };
    if let Some(grace) = relay {
        cli.shutdown.check_component_grace("OUTBOX_SHUTDOWN_GRACE_MS", ms(grace));
    }
    if let Some(grace) = consumer {
        cli.shutdown.check_component_grace("CONSUMER_SHUTDOWN_GRACE_MS", ms(grace));
    }
}

pub async fn migrate(args: &MigrateArgs) -> anyhow::Result<()> {
    let url = &args.database.database_url;
    let schemas = Schemas::default();
    for (service, schema) in schemas.iter() {
        service.migrate(url, schema).await?;
    }
    if let Some(shards) = args.outbox_shards {
        for schema in schemas.sources() {
            trialflow_outbox::set_shard_count(url, &schema, shards)
                .await
                .with_context(|| format!("setting the shard count of `{schema}`"))?;
        }
    }
    tracing::info!(schemas = ?schemas.sources(), "Migrations applied.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent_and_the_replay_commands_parse() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["trialflow", "replay", "cdisc-pilot", "--sites", "701,703"]);
        let Ok(Cli { command: Command::Replay(replay), .. }) = cli else { panic!("{cli:?}") };
        assert_eq!(replay.args.sites, ["701", "703"]);
        assert_eq!(replay.args.days_per_second, None, "the command's own default applies");
        let cli = Cli::try_parse_from(["trialflow", "demo", "--then", "exit", "--days-per-second", "5"]);
        let Ok(Cli { command: Command::Demo(demo), .. }) = cli else { panic!("{cli:?}") };
        assert_eq!((demo.then, demo.replay.days_per_second), (demo::Then::Exit, Some(5.0)));
        assert!(Cli::try_parse_from(["trialflow", "replay", "some-other-trial"]).is_err());
    }

    #[test]
    fn the_http_limits_are_one_set_of_settings_wherever_the_services_run() {
        let limits = |args: &[&str]| match Cli::try_parse_from(args) {
            Ok(Cli { command: Command::Run(run), .. }) => Some(run.limits),
            Ok(Cli { command: Command::Demo(demo), .. }) => Some(demo.replay.limits),
            Ok(Cli { command: Command::Replay(replay), .. }) => Some(replay.args.limits),
            Ok(Cli { command: Command::SiteApi(args), .. }) => Some(args.limits),
            Ok(Cli { command: Command::EproGateway(args), .. }) => Some(args.limits),
            Ok(Cli { command: Command::AlertApi(args), .. }) => Some(args.limits),
            other => panic!("{args:?}: {other:?}"),
        };
        for command in [
            &["run"][..],
            &["demo"],
            &["replay", "cdisc-pilot"],
            &["site-api"],
            &["epro-gateway"],
            &["alert-api"],
        ] {
            let mut args = vec!["trialflow"];
            args.extend_from_slice(command);
            args.extend_from_slice(&["--rate-limit-per-principal", "7", "--request-timeout-ms", "900"]);
            let parsed = limits(&args).map(|l| (l.rate_limit_per_principal, l.request_timeout_ms));
            assert_eq!(parsed, Some((Some(7), Some(900))), "{args:?}");
        }
    }
}
