//! `trialflow replay cdisc-pilot`: the CDISC pilot study replayed through the whole pipeline on a
//! virtual clock, and what came of it.
//!
//! The replay starts the pipeline in this process (its ePRO gateway stamps `received_at` from the
//! replay's virtual clock, so late syncs are judged on the study's timeline), sets the study up
//! through the site API (study, sites, synthesized kit shipments), then walks the timeline of the
//! [plan](mod@crate::cdisc_pilot::plan): site commands over HTTP, vital signs and adverse
//! events straight to their topics as the upstream EDC, synthetic PHQ-9 submissions through the
//! gateway. It waits until nothing is in flight, reads the outcome from the services' databases
//! and prints a summary (also written as JSON).
//!
//! **The clock.** Only the ePRO gateway reads the virtual clock (the site API takes the replay's
//! `occurred_at` from each command and judges skew on the system clock; kit allocation and every
//! other consumer use the system clock; the validator judges on the gateway's `received_at`). Once
//! the pipeline has settled, the replay puts that clock back on real time
//! ([`Clock::resume_real_time`]) — also when it fails or is interrupted — so a pipeline that keeps
//! serving (`trialflow demo`) takes live submissions authored now instead of refusing them as
//! authored after the replay's last instant. A replay run again sets the clock back on the
//! timeline before its first step.
//!
//! Every id is deterministic: site commands carry an `Idempotency-Key` derived from their natural
//! key, EDC records and submissions a UUIDv5 event id. A second replay changes nothing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use rdkafka::producer::DeliveryFuture;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use trialflow_consumers::{epro, kit_allocation};
use trialflow_http::clock::Clock;
use trialflow_outbox::kafka::{ReadMessage, TopicReader};
use trialflow_outbox::{KafkaConfig, SchemaName};
use trialflow_pipeline::{Pipeline, PipelineConfig};
use trialflow_schemas::topics::{self, TopicNames};
use trialflow_schemas::{AnyEvent, Event, QuestionnaireResponseSubmitted};
use uuid::Uuid;

use crate::cdisc_pilot::plan::{self as pilot, Action, Delivery, Phase, Plan};
use crate::cdisc_pilot::{self, Domains};
use crate::edc::EdcPublisher;
use crate::settle::{self, Backlog};
use crate::summary::{self, StudySummary};

/// The `format` of the summary JSON; a new version when a field changes meaning or goes away.
pub const SUMMARY_FORMAT: &str = "trialflow.demo-summary.v1";
/// The demo tokens the replay uses (the local defaults of the site API, gateway and alert API).
const ADMIN: &str = "admin-token";
const PHARMACIST: &str = "pharmacist-token";
const SITE: &str = "site-token";
const APP: &str = "app-token";
const RESEARCHER: &str = "researcher-token";
/// EDC records in flight to the broker at most.
const MAX_IN_FLIGHT: usize = 20_000;

/// How a replay runs.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Where the pilot data is fetched to and read from.
    pub data_dir: PathBuf,
    /// Replay only these sites (all when empty).
    pub sites: Vec<String>,
    /// Study days per wall-clock second at most (0: as fast as the pipeline takes it).
    pub days_per_second: f64,
    /// How long to wait for the pipeline to finish what the replay sent.
    pub settle_timeout: Duration,
    /// Draw progress bars (on a terminal) or print progress lines (otherwise).
    pub progress: bool,
    /// Where to write the summary JSON (none: not written).
    pub summary_path: Option<PathBuf>,
}

/// The JSON summary (`.data/demo-summary.json`): field names are stable within [`SUMMARY_FORMAT`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DemoSummary {
    pub format: String,
    pub study_id: String,
    pub source: String,
    /// The sites replayed.
    pub sites: Vec<String>,
    pub replay: ReplayStats,
    #[serde(flatten)]
    pub study: StudySummary,
    pub latency_ms: Latency,
    pub inbox_url: String,
    pub elapsed_seconds: f64,
}

/// What the replay sent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplayStats {
    pub timeline_first_day: String,
    pub timeline_last_day: String,
    pub steps: u64,
    /// Site API commands: answered as new, or as replays of an earlier identical command.
    pub site_api_commands: u64,
    pub site_api_created: u64,
    pub site_api_replayed: u64,
    pub vitals_published: u64,
    pub adverse_events_published: u64,
    pub epro_submissions_sent: u64,
    /// Submissions by how they were delivered (`on_time`, `late_sync`, `duplicate`,
    /// `conflicting`; the resend of a pair counts under its kind too).
    pub epro_by_delivery: BTreeMap<String, u64>,
    pub skipped_vitals_not_done: u64,
    pub skipped_vitals_unmapped: u64,
    pub skipped_undated: u64,
    /// Events the pipeline published in reaction during this run, by type (lifecycle, ePRO
    /// decisions, alerts raised or updated). A second replay of the same data observes none.
    pub new_events: BTreeMap<String, u64>,
}

/// End-to-end latency percentiles of this run, in milliseconds: from the replay handing an input
/// over (HTTP request sent, record produced) to the record of its outcome on the output topic.
/// `null` when the run produced no such outcome (e.g. a second replay).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Enrollment request → `SubjectEnrolled`.
    pub enrollment: Option<Percentiles>,
    /// ePRO submission → `QuestionnaireResponseAccepted`/`Rejected`.
    pub epro_decision: Option<Percentiles>,
    /// Triggering reading (vital, adverse event) → `AlertRaised`/`AlertUpdated` naming it.
    pub reading_to_alert: Option<Percentiles>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    fn of(samples: Vec<f64>) -> Option<Self> {
        let samples = crate::stats::sorted_f64(samples);
        let at = |q: f64| crate::stats::nearest_rank(&samples, q);
        Some(Self {
            count: samples.len() as u64,
            p50: at(0.50)?,
            p95: at(0.95)?,
            p99: at(0.99)?,
            max: at(1.0)?,
        })
    }
}

/// Loads the pilot (fetching it if needed), slices it to `sites`, and builds the plan.
pub fn load_plan(data_dir: &Path, sites: &[String]) -> anyhow::Result<Plan> {
    let sdtm = cdisc_pilot::data::ensure(data_dir).context("fetching the CDISC pilot data")?;
    let mut domains = Domains::read(&sdtm).context("reading the CDISC pilot data")?;
    if !sites.is_empty() {
        domains = domains.only_sites(sites);
        if domains.dm.is_empty() {
            bail!("no subject of the pilot is at the sites {sites:?}");
        }
    }
    Ok(cdisc_pilot::plan(&domains))
}

/// Writes the pilot's ePRO schedule where the validator reads its configuration, and returns
/// that folder.
fn epro_config_dir(data_dir: &Path) -> anyhow::Result<PathBuf> {
    let dir = data_dir.join("epro-config");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = dir.join("cdiscpilot01.schedule.json");
    std::fs::write(&file, pilot::EPRO_SCHEDULE_JSON)
        .with_context(|| format!("writing {}", file.display()))?;
    Ok(dir)
}

/// Starts the pipeline for the replay: `config` with a virtual clock for the gateway and the
/// pilot's ePRO schedule.
pub async fn start_pipeline(
    mut config: PipelineConfig,
    data_dir: &Path,
    first_instant: DateTime<Utc>,
    shutdown: &CancellationToken,
) -> anyhow::Result<(Pipeline, Clock, PipelineConfig)> {
    let clock = Clock::virtual_at(first_instant);
    config.epro_gateway.clock = clock.clone();
    config.settings.epro_config_dir = Some(epro_config_dir(data_dir)?);
    let pipeline = Pipeline::start(config.clone(), shutdown).await?;
    Ok((pipeline, clock, config))
}

/// The first instant of the plan (set-up included).
pub fn first_instant(plan: &Plan) -> DateTime<Utc> {
    plan.study
        .occurred_at
        .as_deref()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.to_utc())
        .or_else(|| plan.steps.first().map(|s| s.at))
        .unwrap_or_else(Utc::now)
}

/// Replays `plan` into the running `pipeline` (started by [`start_pipeline`] with `config`),
/// driving `clock` along the timeline, and leaves `clock` on real time (see the module doc).
pub async fn replay(
    plan: &Plan,
    pipeline: &Pipeline,
    config: &PipelineConfig,
    clock: &Clock,
    options: &ReplayOptions,
    shutdown: &CancellationToken,
) -> anyhow::Result<DemoSummary> {
    let started = Instant::now();
    let started_at = Utc::now();
    clock.set(first_instant(plan));
    let real_time_after = RealTimeAfter(clock);
    let topics = &config.topics;
    let kafka = &config.relay.kafka;
    let watcher = Watcher::start(kafka, topics)?;
    let progress = Progress::new(plan, options.progress);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect_with(config.relay.database.connect_options()?)
        .await
        .context("connecting to the database")?;
    let mut driver = Driver {
        pool: pool.clone(),
        epro_schema: config.schemas[epro::NAME].clone(),
        apps_started: HashSet::new(),
        http,
        site_api: format!("http://{}", pipeline.site_api_addr()),
        gateway: format!("http://{}", pipeline.epro_gateway_addr()),
        edc: EdcPublisher::new(kafka, topics.clone())?,
        in_flight: FuturesUnordered::new(),
        stats: ReplayStats::default(),
        sent_at: SentAt::default(),
    };

    progress.say("Setting the study up (study, sites, kit shipments) through the site API.");
    driver.set_up(plan).await?;
    wait_for_kits(&pool, config, plan, shutdown).await?;

    let pace = Pace::new(options.days_per_second, plan.steps.first().map(|s| s.at));
    for step in &plan.steps {
        if shutdown.is_cancelled() {
            bail!("interrupted");
        }
        clock.set(step.at);
        pace.wait_for(step.at).await;
        driver.run(&step.action).await?;
        progress.advance(step.action.phase(), step.at);
    }
    driver.drain().await?;
    progress.finish_phases();

    progress.say("Waiting for the pipeline to finish what the replay sent.");
    let groups = trialflow_pipeline::consumer_groups(config);
    let spinner = progress.spinner("settling");
    let settle = settle::wait_settled(
        &pool,
        &groups,
        &config.schemas.sources(),
        kafka,
        options.settle_timeout,
        |b: &Backlog| {
            spinner.set_message(format!(
                "outbox rows {}, consumer lag {}, parked {}",
                b.outbox_rows, b.consumer_lag, b.parked
            ))
        },
    );
    tokio::select! {
        r = settle => { r.context("waiting for the pipeline to settle")?; }
        () = shutdown.cancelled() => bail!("interrupted"),
    }
    spinner.finish_with_message("nothing left in flight");
    // Everything the replay sent is decided: from here on the gateway serves live traffic.
    drop(real_time_after);

    let outputs = watcher.stop().await?;
    let since_ms = started_at.timestamp_millis();
    let (new_events, latency) = outcomes(&outputs, since_ms, &driver.sent_at);
    let mut stats = driver.stats;
    stats.new_events = new_events;
    stats.steps = plan.steps.len() as u64;
    stats.timeline_first_day = plan.steps.first().map(|s| s.at.date_naive().to_string()).unwrap_or_default();
    stats.timeline_last_day = plan.steps.last().map(|s| s.at.date_naive().to_string()).unwrap_or_default();
    stats.skipped_vitals_not_done = plan.skipped.vitals_not_done;
    stats.skipped_vitals_unmapped = plan.skipped.vitals_unmapped;
    stats.skipped_undated = plan.skipped.undated;

    let study =
        summary::collect(&pool, &config.schemas, pilot::STUDY_ID, kafka, topics, &config.consumer.dlq_suffix)
            .await
            .context("reading the outcome")?;
    let mut sites: Vec<String> = plan.sites.iter().map(|s| s.site_id.clone()).collect();
    sites.sort();
    let summary = DemoSummary {
        format: SUMMARY_FORMAT.to_string(),
        study_id: pilot::STUDY_ID.to_string(),
        source: format!(
            "CDISC SDTM/ADaM Pilot Project (CDISCPILOT01), from PyPI {} ; PHQ-9 responses synthetic",
            cdisc_pilot::data::PACKAGE
        ),
        sites,
        replay: stats,
        study,
        latency_ms: latency,
        inbox_url: format!("http://{}/inbox?token={RESEARCHER}", pipeline.alert_api_addr()),
        elapsed_seconds: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    };
    if let Some(path) = &options.summary_path {
        write_summary(path, &summary)?;
    }
    Ok(summary)
}

/// Puts the replay's clock back on real time when dropped: after the pipeline settled, or when the
/// replay fails or is interrupted, so no way out of a replay leaves the gateway on a frozen clock.
struct RealTimeAfter<'a>(&'a Clock);

impl Drop for RealTimeAfter<'_> {
    fn drop(&mut self) {
        if self.0.resume_real_time() {
            tracing::info!(now = %self.0.now(), "Replay over; the ePRO gateway's clock follows real time again.");
        }
    }
}

fn write_summary(path: &Path, summary: &DemoSummary) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let json = serde_json::to_string_pretty(summary)?;
    std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))
}

/// The human summary.
pub fn render(summary: &DemoSummary) -> String {
    let r = &summary.replay;
    let mut out = String::new();
    out.push_str(&format!("== {} replayed: {}\n", summary.study_id, summary.source));
    out.push_str(&format!(
        "   timeline {} .. {}, {} steps, {} sites, {:.1} s\n",
        r.timeline_first_day,
        r.timeline_last_day,
        r.steps,
        summary.sites.len(),
        summary.elapsed_seconds
    ));
    out.push_str(&format!(
        "   sent: site API {} commands ({} new, {} replays of earlier ones); EDC {} vital signs, {} \
         adverse events; ePRO gateway {} submissions {:?}\n",
        r.site_api_commands,
        r.site_api_created,
        r.site_api_replayed,
        r.vitals_published,
        r.adverse_events_published,
        r.epro_submissions_sent,
        r.epro_by_delivery
    ));
    out.push_str(&format!(
        "   source rows left out: {} vital signs not done, {} unmapped, {} undated\n",
        r.skipped_vitals_not_done, r.skipped_vitals_unmapped, r.skipped_undated
    ));
    let new: u64 = r.new_events.values().sum();
    out.push_str(&format!(
        "   events the pipeline published in reaction this run: {new} {:?}\n",
        r.new_events
    ));
    out.push_str(&summary.study.render());
    out.push_str("== end-to-end latency this run (ms)\n");
    for (name, p) in [
        ("enrollment request → SubjectEnrolled", &summary.latency_ms.enrollment),
        ("ePRO submission → decision", &summary.latency_ms.epro_decision),
        ("reading → alert raised/updated", &summary.latency_ms.reading_to_alert),
    ] {
        match p {
            Some(p) => out.push_str(&format!(
                "   {name:<40} n={:<6} p50 {:>7.1}  p95 {:>7.1}  p99 {:>7.1}  max {:>7.1}\n",
                p.count, p.p50, p.p95, p.p99, p.max
            )),
            None => out.push_str(&format!("   {name:<40} none in this run\n")),
        }
    }
    out.push_str(&format!("== researcher inbox: {}\n", summary.inbox_url));
    // The dashboard is served beside the inbox, with the same token.
    let dashboard = summary.inbox_url.replacen("/inbox?", "/dashboard?", 1);
    out.push_str(&format!("== researcher dashboard: {dashboard}#/study/{}\n", summary.study_id));
    out
}

// ---- the driver ------------------------------------------------------------------------------

/// When the replay handed each input over (wall clock, ms since the epoch).
#[derive(Debug, Default)]
struct SentAt {
    enrollment: HashMap<String, i64>,
    submissions: HashMap<Uuid, i64>,
    readings: HashMap<Uuid, i64>,
}

struct Driver {
    pool: sqlx::PgPool,
    /// The ePRO validator's schema (it is asked whether it knows a subject's enrollment).
    epro_schema: SchemaName,
    /// Subjects whose app has submitted already.
    apps_started: HashSet<String>,
    http: reqwest::Client,
    site_api: String,
    gateway: String,
    edc: EdcPublisher,
    in_flight: FuturesUnordered<DeliveryFuture>,
    stats: ReplayStats,
    sent_at: SentAt,
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

impl Driver {
    async fn set_up(&mut self, plan: &Plan) -> anyhow::Result<()> {
        let study = &plan.study.study_id;
        self.command(ADMIN, "/v1/studies".to_string(), &format!("study/{study}"), &plan.study).await?;
        for site in &plan.sites {
            let path = format!("/v1/studies/{study}/sites");
            self.command(ADMIN, path, &format!("site/{study}/{}", site.site_id), site).await?;
        }
        for (site, shipment) in &plan.shipments {
            let path = format!("/v1/studies/{study}/sites/{site}/shipments");
            self.command(PHARMACIST, path, &format!("shipment/{}", shipment.shipment_id), shipment).await?;
        }
        Ok(())
    }

    async fn run(&mut self, action: &Action) -> anyhow::Result<()> {
        let study = pilot::STUDY_ID;
        match action {
            Action::Screen { subject_id, body } => {
                let path = format!("/v1/studies/{study}/subjects");
                self.command(SITE, path, &format!("screen/{study}/{subject_id}"), body).await
            }
            Action::Consent { subject_id, body } => {
                let path = format!("/v1/studies/{study}/subjects/{subject_id}/consent");
                self.command(SITE, path, &format!("consent/{study}/{subject_id}"), body).await
            }
            Action::RequestEnrollment { subject_id, body } => {
                self.sent_at.enrollment.insert(subject_id.clone(), now_ms());
                let path = format!("/v1/studies/{study}/subjects/{subject_id}/enrollment-requests");
                self.command(SITE, path, &format!("enroll/{study}/{subject_id}"), body).await
            }
            Action::Withdraw { subject_id, body } => {
                // Days or weeks after the enrollment on the timeline, milliseconds after it here:
                // sent before the subject's kit is allocated, it would overtake the enrollment
                // (see `wait_until_enrolled`).
                self.wait_until_enrolled(subject_id).await?;
                let path = format!("/v1/studies/{study}/subjects/{subject_id}/withdrawal");
                self.command(SITE, path, &format!("withdraw/{study}/{subject_id}"), body).await
            }
            Action::Vital(event) => {
                self.publish(event.as_ref()).await?;
                self.stats.vitals_published += 1;
                Ok(())
            }
            Action::AdverseEvent(event) => {
                self.publish(event.as_ref()).await?;
                self.stats.adverse_events_published += 1;
                Ok(())
            }
            Action::Submit { submission, delivery, resend } => {
                self.submit(submission, *delivery, *resend).await
            }
        }
    }

    /// One site API command, with an idempotency key derived from `natural_key`.
    async fn command<B: Serialize>(
        &mut self,
        token: &str,
        path: String,
        natural_key: &str,
        body: &B,
    ) -> anyhow::Result<()> {
        let key = pilot::id(&format!("{}/site-api/{natural_key}", pilot::STUDY_ID));
        let response = self
            .http
            .post(format!("{}{path}", self.site_api))
            .bearer_auth(token)
            .header("Idempotency-Key", key.to_string())
            .json(body)
            .send()
            .await
            .with_context(|| format!("POST {path}"))?;
        let status = response.status();
        let replayed = response.headers().get("Idempotent-Replayed").is_some_and(|v| v == "true");
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            bail!(
                "POST {path} answered {status}: {text}\n(a study `{}` set up differently by an \
                 earlier run? `make clean` starts over)",
                pilot::STUDY_ID
            );
        }
        self.stats.site_api_commands += 1;
        if replayed {
            self.stats.site_api_replayed += 1;
        } else {
            self.stats.site_api_created += 1;
        }
        Ok(())
    }

    async fn publish<E: Event>(&mut self, event: &E) -> anyhow::Result<()> {
        self.sent_at.readings.insert(event.envelope().event_id, now_ms());
        loop {
            if self.in_flight.len() >= MAX_IN_FLIGHT {
                self.settle_one().await?;
            }
            match self.edc.send(event)? {
                Some(delivery) => {
                    self.in_flight.push(delivery);
                    return Ok(());
                }
                // The producer's queue is full: wait for an acknowledgement, then send again.
                None if !self.in_flight.is_empty() => self.settle_one().await?,
                None => bail!("the EDC producer's queue is full with nothing in flight"),
            }
        }
    }

    async fn settle_one(&mut self) -> anyhow::Result<()> {
        match self.in_flight.next().await {
            Some(Ok(Ok(_))) | None => Ok(()),
            Some(Ok(Err((e, _)))) => bail!("the broker refused an EDC record: {e}"),
            Some(Err(_)) => bail!("the EDC producer went away"),
        }
    }

    /// Waits for every EDC record to be acknowledged.
    async fn drain(&mut self) -> anyhow::Result<()> {
        while !self.in_flight.is_empty() {
            self.settle_one().await?;
        }
        Ok(())
    }

    /// Waits until the validator knows that `subject` is enrolled. On the study's timeline two
    /// weeks pass between enrollment and the first questionnaire; compressed, the questionnaire
    /// would overtake the enrollment, be parked, and its duplicate (sent a study day later) could be
    /// decided first and judged by its own, later, arrival. A withdrawal would overtake it too:
    /// recorded before the kit is allocated, it leaves the subject randomized without a kit
    /// (enrollment ignores an allocation for a withdrawn subject). Live, neither can happen; so
    /// the replay keeps the order the timeline implies.
    async fn wait_until_enrolled(&self, subject: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut every = tokio::time::interval(Duration::from_millis(20));
        loop {
            every.tick().await;
            let known = epro::read::knows_enrolled(&self.pool, &self.epro_schema, pilot::STUDY_ID, subject)
                .await
                .context("asking the validator's database about an enrollment")?;
            if known {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the ePRO validator did not learn of {subject}'s enrollment within 120 s");
            }
        }
    }

    async fn submit(
        &mut self,
        submission: &QuestionnaireResponseSubmitted,
        delivery: Delivery,
        resend: bool,
    ) -> anyhow::Result<()> {
        let subject = submission.envelope.subject_id.clone().unwrap_or_default();
        if self.apps_started.insert(subject.clone()) {
            self.wait_until_enrolled(&subject).await?;
        }
        if !resend {
            self.sent_at.submissions.insert(submission.submission_id, now_ms());
        }
        let response = self
            .http
            .post(format!("{}/v1/submissions", self.gateway))
            .bearer_auth(APP)
            .json(submission)
            .send()
            .await
            .context("POST /v1/submissions")?;
        let status = response.status();
        if status != reqwest::StatusCode::ACCEPTED {
            let text = response.text().await.unwrap_or_default();
            bail!("the ePRO gateway answered {status}: {text}");
        }
        self.stats.epro_submissions_sent += 1;
        *self.stats.epro_by_delivery.entry(delivery.name().to_string()).or_default() += 1;
        Ok(())
    }
}

/// Waits until the kit-allocation service knows every shipped kit, so the first enrollment finds
/// its site stocked (a request that reached kit allocation before the kits would wait on hold for
/// the next shipment: correct, but not the pilot's story).
async fn wait_for_kits(
    pool: &sqlx::PgPool,
    config: &PipelineConfig,
    plan: &Plan,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let shipped: i64 = plan.shipments.iter().map(|(_, s)| s.kits.len() as i64).sum();
    let schema = &config.schemas[kit_allocation::NAME];
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut listen = tokio::time::interval(Duration::from_millis(100));
    loop {
        listen.tick().await;
        let known = kit_allocation::read::known(pool, schema, pilot::STUDY_ID)
            .await
            .context("counting the kits kit allocation knows")?;
        if known >= shipped {
            return Ok(());
        }
        if shutdown.is_cancelled() {
            bail!("interrupted");
        }
        if Instant::now() > deadline {
            bail!(
                "kit allocation knows {known} of the {shipped} kits shipped after 120 s: is the pipeline running?"
            );
        }
    }
}

/// Holds the replay to at most `days_per_second` study days per second.
struct Pace {
    days_per_second: f64,
    origin: Option<DateTime<Utc>>,
    started: Instant,
}

impl Pace {
    fn new(days_per_second: f64, origin: Option<DateTime<Utc>>) -> Self {
        Self { days_per_second, origin, started: Instant::now() }
    }

    async fn wait_for(&self, at: DateTime<Utc>) {
        let Some(origin) = self.origin.filter(|_| self.days_per_second > 0.0) else { return };
        let days = (at - origin).num_seconds() as f64 / 86_400.0;
        let due = self.started + Duration::from_secs_f64(days.max(0.0) / self.days_per_second);
        tokio::time::sleep_until(due.into()).await;
    }
}

// ---- progress -------------------------------------------------------------------------------

/// A bar per phase on a terminal; a line every few seconds otherwise.
struct Progress {
    multi: MultiProgress,
    bars: BTreeMap<Phase, ProgressBar>,
    day: ProgressBar,
    terminal: bool,
    enabled: bool,
    last_line: std::sync::Mutex<Instant>,
}

impl Progress {
    fn new(plan: &Plan, enabled: bool) -> Self {
        let terminal = enabled && std::io::IsTerminal::is_terminal(&std::io::stderr());
        let target =
            if terminal { ProgressDrawTarget::stderr_with_hz(8) } else { ProgressDrawTarget::hidden() };
        let multi = MultiProgress::with_draw_target(target);
        let style = ProgressStyle::with_template("  {prefix:<48} [{bar:30}] {pos:>6}/{len:6} {per_sec:>10}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        let day = multi.add(ProgressBar::new_spinner());
        day.set_style(
            ProgressStyle::with_template("  study day {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        let bars = Phase::ALL
            .into_iter()
            .map(|phase| {
                let bar = multi.add(ProgressBar::new(plan.count(phase)));
                bar.set_style(style.clone());
                bar.set_prefix(phase.label());
                (phase, bar)
            })
            .collect();
        Self { multi, bars, day, terminal, enabled, last_line: std::sync::Mutex::new(Instant::now()) }
    }

    fn say(&self, line: &str) {
        if !self.enabled {
            return;
        }
        if self.terminal {
            let _ = self.multi.println(format!("== {line}"));
        } else {
            eprintln!("== {line}");
        }
    }

    fn advance(&self, phase: Phase, at: DateTime<Utc>) {
        if let Some(bar) = self.bars.get(&phase) {
            bar.inc(1);
        }
        if !self.enabled {
            return;
        }
        if self.terminal {
            self.day.set_message(at.date_naive().to_string());
            return;
        }
        let Ok(mut last) = self.last_line.lock() else { return };
        if last.elapsed() >= Duration::from_secs(3) {
            *last = Instant::now();
            let done: Vec<String> = self
                .bars
                .iter()
                .map(|(p, b)| format!("{:?} {}/{}", p, b.position(), b.length().unwrap_or(0)))
                .collect();
            eprintln!("   study day {}: {}", at.date_naive(), done.join(", "));
        }
    }

    fn finish_phases(&self) {
        for bar in self.bars.values() {
            bar.finish();
        }
        self.day.finish_and_clear();
        if self.enabled && !self.terminal {
            for (phase, bar) in &self.bars {
                eprintln!("   {:<48} {} sent", phase.label(), bar.position());
            }
        }
    }

    fn spinner(&self, prefix: &str) -> ProgressBar {
        let bar = self.multi.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template("  {prefix:<48} {spinner} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_prefix(prefix.to_string());
        if self.terminal {
            bar.enable_steady_tick(Duration::from_millis(120));
        }
        bar
    }
}

// ---- outcomes: what the pipeline published in reaction ----------------------------------------

/// Reads the output topics from their current end while the replay runs. Its readers poll on
/// blocking threads until told to stop: dropping the watcher tells them (a replay that fails
/// half-way must not leave them polling, which would keep the process alive after its error).
struct Watcher {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<trialflow_outbox::Result<Vec<ReadMessage>>>>,
}

impl Watcher {
    fn start(kafka: &KafkaConfig, topics: &TopicNames) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for topic in [topics::SUBJECT_LIFECYCLE, topics::EPRO_RESPONSES, topics::ALERTS] {
            let reader = TopicReader::new(kafka, &topics.name(topic), false)?;
            let stop = stop.clone();
            let read =
                reader.read_until(Duration::from_secs(24 * 3600), move |_| stop.load(Ordering::Acquire));
            tasks.push(tokio::spawn(trialflow_pipeline::shutdown::tracked("replay output watcher", read)));
        }
        Ok(Self { stop, tasks })
    }

    async fn stop(mut self) -> anyhow::Result<Vec<ReadMessage>> {
        self.stop.store(true, Ordering::Release);
        let mut out = Vec::new();
        for task in std::mem::take(&mut self.tasks) {
            out.extend(task.await.context("topic watcher")??);
        }
        Ok(out)
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// New events by type and latencies, from the output records produced since `since_ms` (what the
/// watchers read is filtered by time too, so a record from before the replay never counts).
fn outcomes(outputs: &[ReadMessage], since_ms: i64, sent: &SentAt) -> (BTreeMap<String, u64>, Latency) {
    let mut new_events: BTreeMap<String, u64> = BTreeMap::new();
    let (mut enrollment, mut epro, mut alerts) = (Vec::new(), Vec::new(), Vec::new());
    let mut first_decision: HashMap<Uuid, i64> = HashMap::new();
    let mut first_alert: HashMap<Uuid, i64> = HashMap::new();
    for m in outputs {
        let Some(at) = m.timestamp_ms.filter(|t| *t >= since_ms) else { continue };
        let Ok(event) = trialflow_schemas::decode_any(&m.payload) else { continue };
        let latency = |from: Option<&i64>| from.map(|f| (at - f) as f64);
        match &event {
            AnyEvent::AlertEscalated(_) | AnyEvent::AlertAcknowledged(_) | AnyEvent::AlertResolved(_) => {
                // Not the replay's doing: the escalation timer and researchers.
                continue;
            }
            AnyEvent::SubjectEnrolled(e) => {
                let subject = e.envelope.subject_id.clone().unwrap_or_default();
                enrollment.extend(latency(sent.enrollment.get(&subject)));
            }
            AnyEvent::QuestionnaireResponseAccepted(e) => {
                first_decision.entry(e.submission_id).or_insert(at);
            }
            AnyEvent::QuestionnaireResponseRejected(e) => {
                first_decision.entry(e.submission_id).or_insert(at);
            }
            AnyEvent::AlertRaised(e) => {
                for ev in &e.evidence {
                    first_alert.entry(ev.event_id).or_insert(at);
                }
            }
            AnyEvent::AlertUpdated(e) => {
                for ev in &e.evidence {
                    first_alert.entry(ev.event_id).or_insert(at);
                }
            }
            _ => {}
        }
        *new_events.entry(event.name().to_string()).or_default() += 1;
    }
    for (id, at) in first_decision {
        epro.extend(sent.submissions.get(&id).map(|f| (at - f) as f64));
    }
    for (id, at) in first_alert {
        alerts.extend(sent.readings.get(&id).map(|f| (at - f) as f64));
    }
    let latency = Latency {
        enrollment: Percentiles::of(enrollment),
        epro_decision: Percentiles::of(epro),
        reading_to_alert: Percentiles::of(alerts),
    };
    (new_events, latency)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let p = Percentiles::of((1..=100).map(f64::from).collect());
        let Some(p) = p else { panic!("samples") };
        assert_eq!((p.count, p.p50, p.p95, p.p99, p.max), (100, 50.0, 95.0, 99.0, 100.0));
        assert_eq!(Percentiles::of(vec![]), None);
        let Some(one) = Percentiles::of(vec![7.0]) else { panic!("one sample") };
        assert_eq!((one.p50, one.p99), (7.0, 7.0));
    }
}
