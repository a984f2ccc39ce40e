//! `trialflow load`: synthetic load against a running pipeline (`trialflow run`), for scale beyond
//! the replayed pilot data and for the benchmarks. It drives the pipeline the way its clients do —
//! site staff through the site API, patient apps through the ePRO gateway, an EDC publishing vital
//! signs straight to the clinical topic — in three phases:
//!
//! 1. **Set-up**: one study (arms `PBO`, `LOW`, `HIGH` at 1:1:1, the factor `AGEGR`, kit type
//!    `BOX`, ages 18 to 85 and one inclusion criterion), `--sites` sites, and kits enough for every
//!    subject of a site to get any arm, so no subject waits for a kit.
//! 2. **Enrollment**: screening, consent and an enrollment request for each of `--subjects`
//!    subjects, `--rate` requests per second overall.
//! 3. **Steady state**: `--rate` inputs per second for `--duration` seconds, round-robin over the
//!    subjects: four vital signs for each PHQ-9 submission. Every value is normal, so no alert fires.
//!
//! **Pacing** follows a fixed timetable: slot `n` of a phase starts `n / rate` seconds after the
//! phase began, and a sender that fell behind takes its late slots at once instead of lowering the
//! rate. At most `--concurrency` requests are in flight, so a pipeline that cannot keep up shows as
//! an achieved rate below the target, and the summary says so. Latencies count from the slot, so
//! time spent queueing for a slot counts too.
//!
//! **Reruns are idempotent.** Ids, idempotency keys and the inputs' clinical times are functions of
//! the study id, the input's index and the study's timeline start (`--epoch`; a generated study id,
//! `LOAD-<8 hex>`, carries it: the unix seconds of its first run). A rerun with the same study and
//! settings gets every site API command answered from the first run (`Idempotent-Replayed`) and
//! resends identical vital signs and submissions, which the consumers take as duplicates: no new
//! subject, reading or response.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, Datelike, SecondsFormat, Utc};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use trialflow_outbox::KafkaConfig;
use trialflow_producers::site_api::idempotency;
use trialflow_producers::site_api::kits::{Kit, ReceiveShipment};
use trialflow_producers::site_api::studies::{
    Arm, CreateSite, CreateStudy, Criterion, Eligibility, Factor, KitType, Randomization,
};
use trialflow_producers::site_api::subjects::{RequestEnrollment, ScreenSubject, SignConsent};
use trialflow_schemas::topics::TopicNames;
use trialflow_schemas::{
    Answer, Envelope, Event, PartialDateTime, QuestionnaireResponseSubmitted, ResponseStatus, Timestamp,
    VitalSignRecorded,
};
use uuid::Uuid;

use crate::edc::EdcPublisher;

/// Prefix of generated study ids; the 8 hex digits after it are the study's timeline start.
pub const GENERATED_STUDY_PREFIX: &str = "LOAD-";
/// One steady-state input in this many is a PHQ-9 submission, the others are vital signs.
pub const EPRO_EVERY: u64 = 5;

const ARMS: [&str; 3] = ["PBO", "LOW", "HIGH"];
const FACTOR: &str = "AGEGR";
const CRITERION: &str = "INC01";
const KIT_TYPE: &str = "BOX";
/// Kits per shipment request (the site API takes up to 5,000; smaller ones keep each event small).
const KITS_PER_SHIPMENT: u64 = 1_000;
const TIME_ZONES: [&str; 4] = ["Europe/Berlin", "America/New_York", "Asia/Tokyo", "Australia/Sydney"];
/// PHQ-9 items 1–9 (LOINC), then the difficulty item, asked only when an item is above 0.
const PHQ9_ITEMS: [&str; 9] =
    ["44250-9", "44255-8", "44259-0", "44254-1", "44251-7", "44258-2", "44252-5", "44253-3", "44260-8"];
const PHQ9_DIFFICULTY: &str = "69722-7";
/// Vital signs sent, each with a range well inside every default monitoring rule's limits:
/// (LOINC, UCUM unit, lowest value, width of the range).
const VITALS: [(&str, &str, f64, f64); 5] = [
    ("8867-4", "/min", 60.0, 30.0),    // heart rate
    ("8310-5", "Cel", 36.4, 0.9),      // body temperature
    ("59408-5", "%", 95.0, 4.0),       // SpO2
    ("8480-6", "mm[Hg]", 110.0, 25.0), // systolic blood pressure
    ("8462-4", "mm[Hg]", 70.0, 15.0),  // diastolic blood pressure
];
/// A request that takes longer has failed; a load generator must not hang on one.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// `trialflow load`.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// Subjects to screen, consent and enroll.
    #[arg(long, default_value_t = 1000)]
    pub subjects: u32,

    /// Inputs per second overall: site API requests while enrolling, then vital signs and PHQ-9
    /// submissions.
    #[arg(long, default_value_t = 500)]
    pub rate: u32,

    /// Seconds of the steady mix of vital signs and submissions after enrollment (0: none).
    #[arg(long, default_value_t = 30)]
    pub duration: u64,

    /// Sites the subjects are spread over.
    #[arg(long, default_value_t = 10)]
    pub sites: u32,

    /// Most requests in flight at once.
    #[arg(long, default_value_t = 128)]
    pub concurrency: usize,

    /// Base URL of the site API.
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    pub site_api: String,

    /// Base URL of the ePRO gateway.
    #[arg(long, default_value = "http://127.0.0.1:8082")]
    pub epro_gateway: String,

    /// The broker vital signs are published to, as an upstream EDC would.
    #[command(flatten)]
    pub kafka: KafkaConfig,

    /// Prefix of every topic name (the pipeline's `TOPIC_PREFIX`).
    #[arg(long, env = "TOPIC_PREFIX", default_value = "")]
    pub topic_prefix: String,

    /// Study id; rerun with the same one (and the same settings) to repeat a run idempotently.
    /// Default: `LOAD-<unix seconds of now, 8 hex digits>`.
    #[arg(long)]
    pub study: Option<String>,

    /// Start of the study's timeline (RFC 3339), from which the inputs' clinical times count.
    /// Default: read from a `LOAD-<8 hex>` study id, else now.
    #[arg(long)]
    pub epoch: Option<DateTime<Utc>>,

    /// Site API token of the admin role (study and sites).
    #[arg(long, env = "LOAD_ADMIN_TOKEN", default_value = "admin-token", hide_env_values = true)]
    pub admin_token: String,

    /// Site API token of the pharmacist role (kit shipments).
    #[arg(long, env = "LOAD_PHARMACIST_TOKEN", default_value = "pharmacist-token", hide_env_values = true)]
    pub pharmacist_token: String,

    /// Site API token of the site-staff role (screening, consent, enrollment).
    #[arg(long, env = "LOAD_SITE_TOKEN", default_value = "site-token", hide_env_values = true)]
    pub site_token: String,

    /// ePRO gateway app token.
    #[arg(long, env = "LOAD_APP_TOKEN", default_value = "app-token", hide_env_values = true)]
    pub app_token: String,
}

/// The bearer tokens the generator presents.
#[derive(Debug, Clone)]
pub struct Tokens {
    pub admin: String,
    pub pharmacist: String,
    pub site: String,
    pub app: String,
}

impl Default for Tokens {
    /// The local demo tokens `trialflow run` accepts.
    fn default() -> Self {
        Self {
            admin: "admin-token".into(),
            pharmacist: "pharmacist-token".into(),
            site: "site-token".into(),
            app: "app-token".into(),
        }
    }
}

/// What to generate and where to send it.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub study: String,
    /// Start of the study's timeline: the steady-state input `i` happened at
    /// `epoch + (3 × subjects + i) / rate`, and consent was signed on its date.
    pub epoch: DateTime<Utc>,
    pub subjects: u32,
    pub sites: u32,
    /// Inputs per second.
    pub rate: u32,
    /// Length of the steady phase.
    pub duration: Duration,
    /// Most requests in flight at once.
    pub concurrency: usize,
    /// Base URLs.
    pub site_api: String,
    pub epro_gateway: String,
    pub kafka: KafkaConfig,
    pub topics: TopicNames,
    pub tokens: Tokens,
    /// A progress line on stderr every second.
    pub progress: bool,
}

impl LoadConfig {
    /// The CLI's defaults (local pipeline, demo tokens) for `study`, whose timeline starts at `epoch`.
    pub fn local(study: &str, epoch: DateTime<Utc>) -> Self {
        Self {
            study: study.to_string(),
            epoch,
            subjects: 1000,
            sites: 10,
            rate: 500,
            duration: Duration::from_secs(30),
            concurrency: 128,
            site_api: "http://127.0.0.1:8081".into(),
            epro_gateway: "http://127.0.0.1:8082".into(),
            kafka: KafkaConfig::default(),
            topics: TopicNames::default(),
            tokens: Tokens::default(),
            progress: true,
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        trialflow_http::input::check_id("study", &self.study)
            .map_err(|e| anyhow::anyhow!("--study: {}", e.message))?;
        for (name, value) in [("subjects", self.subjects), ("sites", self.sites), ("rate", self.rate)] {
            anyhow::ensure!(value >= 1, "--{name} must be at least 1");
        }
        anyhow::ensure!(self.concurrency >= 1, "--concurrency must be at least 1");
        anyhow::ensure!(
            self.sites <= self.subjects,
            "--sites {} is more than --subjects {}: every site needs a subject",
            self.sites,
            self.subjects
        );
        Ok(())
    }
}

impl LoadArgs {
    /// The configuration, and a note when the timeline starts now without a way to name it again.
    pub fn into_config(self) -> (LoadConfig, Option<String>) {
        let now = Utc::now();
        let study = self.study.unwrap_or_else(|| generated_study_id(now));
        let mut note = None;
        let epoch = self.epoch.or_else(|| epoch_of(&study)).unwrap_or_else(|| {
            let epoch = whole_seconds(now);
            let text = epoch.to_rfc3339_opts(SecondsFormat::Secs, true);
            note = Some(format!(
                "study `{study}` does not carry its timeline start; it starts now: rerun with --epoch {text}"
            ));
            epoch
        });
        let config = LoadConfig {
            study,
            epoch,
            subjects: self.subjects,
            sites: self.sites,
            rate: self.rate,
            duration: Duration::from_secs(self.duration),
            concurrency: self.concurrency,
            site_api: self.site_api,
            epro_gateway: self.epro_gateway,
            kafka: self.kafka,
            topics: TopicNames::new(self.topic_prefix),
            tokens: Tokens {
                admin: self.admin_token,
                pharmacist: self.pharmacist_token,
                site: self.site_token,
                app: self.app_token,
            },
            progress: true,
        };
        (config, note)
    }
}

/// `LOAD-<8 hex>`: the unix seconds of `now`, so the id names its timeline start.
pub fn generated_study_id(now: DateTime<Utc>) -> String {
    format!("{GENERATED_STUDY_PREFIX}{:08x}", now.timestamp().clamp(0, i64::from(u32::MAX)))
}

/// The timeline start a generated study id carries.
pub fn epoch_of(study: &str) -> Option<DateTime<Utc>> {
    let hex = study.strip_prefix(GENERATED_STUDY_PREFIX)?;
    if hex.len() != 8 {
        return None;
    }
    let seconds = u32::from_str_radix(hex, 16).ok()?;
    DateTime::from_timestamp(i64::from(seconds), 0)
}

fn whole_seconds(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(t.timestamp(), 0).unwrap_or(t)
}

/// `trialflow load`: generates the load, prints the summary, and fails if anything was refused.
pub async fn run(args: LoadArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (config, note) = args.into_config();
    if let Some(note) = note {
        eprintln!("load: {note}");
    }
    let report = run_load(config, &shutdown).await?;
    println!("{report}");
    report.check()
}

// ---- the report --------------------------------------------------------------------------------

/// What the generator sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Input {
    Study,
    Site,
    Shipment,
    Screening,
    Consent,
    EnrollmentRequest,
    VitalSign,
    Phq9Submission,
}

impl Input {
    fn target(self) -> &'static str {
        match self {
            Self::VitalSign => "kafka",
            Self::Phq9Submission => "epro-gateway",
            _ => "site-api",
        }
    }
}

impl fmt::Display for Input {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Study => "studies",
            Self::Site => "sites",
            Self::Shipment => "shipments",
            Self::Screening => "screenings",
            Self::Consent => "consents",
            Self::EnrollmentRequest => "enrollment requests",
            Self::VitalSign => "vital signs",
            Self::Phq9Submission => "PHQ-9 submissions",
        })
    }
}

/// p50 and p99 of a latency sample (nearest rank).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quantiles {
    pub p50: Duration,
    pub p99: Duration,
}

impl Quantiles {
    fn of(mut sample: Vec<Duration>) -> Option<Self> {
        sample.sort_unstable();
        let at = |q: f64| {
            let rank = ((q * sample.len() as f64).ceil() as usize).clamp(1, sample.len());
            sample.get(rank - 1).copied()
        };
        Some(Self { p50: at(0.50)?, p99: at(0.99)? })
    }
}

/// One paced phase: inputs answered successfully, from the phase's start to its last answer.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PhaseReport {
    pub accepted: u64,
    pub elapsed: Duration,
    /// Inputs per second asked for.
    pub target_rate: u32,
}

impl PhaseReport {
    /// Accepted inputs per second over the phase.
    pub fn rate(&self) -> f64 {
        let seconds = self.elapsed.as_secs_f64();
        if seconds > 0.0 { self.accepted as f64 / seconds } else { 0.0 }
    }
}

/// What a run sent and how the pipeline answered.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub study: String,
    pub epoch: DateTime<Utc>,
    pub subjects: u32,
    pub sites: u32,
    pub kits: u64,
    /// Inputs sent, by kind.
    pub sent: BTreeMap<Input, u64>,
    /// Inputs answered with success (201, 202, a broker acknowledgement), by kind.
    pub accepted: BTreeMap<Input, u64>,
    /// Site API answers replayed from an earlier run (`Idempotent-Replayed: true`).
    pub replayed: u64,
    /// Subjects whose screening, consent and enrollment request were all accepted.
    pub subjects_requested: u64,
    /// Failures by target and HTTP status or error kind (`site-api 503`, `kafka MessageTimedOut`).
    pub errors: BTreeMap<String, u64>,
    /// The first failure in full.
    pub first_error: Option<String>,
    pub setup: Duration,
    pub enrollment: PhaseReport,
    pub steady: PhaseReport,
    /// From the slot to the gateway's 202 (which follows the broker's acknowledgement).
    pub gateway_ack: Option<Quantiles>,
    /// From the slot to the broker's acknowledgement of a vital sign.
    pub vital_ack: Option<Quantiles>,
    /// When each accepted enrollment request was sent, by subject: the start of the end-to-end
    /// enrollment latency.
    pub enrollment_requested: Vec<(String, std::time::Instant)>,
    /// Where the steady inputs landed: the highest acknowledged offset per partition, for vital
    /// signs (clinical topic) and submissions (ingestion topic). A consumer group whose committed
    /// offsets pass these has seen every input of the run.
    pub last_offsets: BTreeMap<Input, BTreeMap<i32, i64>>,
    pub elapsed: Duration,
    /// Stopped early by the shutdown signal.
    pub interrupted: bool,
}

impl LoadReport {
    pub fn sent(&self, input: Input) -> u64 {
        self.sent.get(&input).copied().unwrap_or_default()
    }

    pub fn accepted(&self, input: Input) -> u64 {
        self.accepted.get(&input).copied().unwrap_or_default()
    }

    /// Fails when anything was refused or lost.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.errors.is_empty() {
            return Ok(());
        }
        let failed: u64 = self.errors.values().sum();
        bail!(
            "{failed} inputs of study `{}` failed; the first: {}",
            self.study,
            self.first_error.as_deref().unwrap_or("?")
        )
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let epoch = self.epoch.to_rfc3339_opts(SecondsFormat::Secs, true);
        let interrupted = if self.interrupted { " (interrupted)" } else { "" };
        writeln!(
            f,
            "load summary{interrupted}: study {} (timeline from {epoch}), {} subjects at {} sites, {:.1} s",
            self.study,
            self.subjects,
            self.sites,
            self.elapsed.as_secs_f64()
        )?;
        writeln!(
            f,
            "  set-up      {} sites, {} kits in {} shipments, {:.1} s",
            self.accepted(Input::Site),
            self.kits,
            self.accepted(Input::Shipment),
            self.setup.as_secs_f64()
        )?;
        let e = &self.enrollment;
        writeln!(
            f,
            "  enrollment  {} requests for {} subjects in {:.1} s: {:.0} requests/s (target {})",
            e.accepted,
            self.subjects_requested,
            e.elapsed.as_secs_f64(),
            e.rate(),
            e.target_rate
        )?;
        let s = &self.steady;
        writeln!(
            f,
            "  steady      {} vital signs, {} PHQ-9 submissions in {:.1} s: {:.0} inputs/s (target {})",
            self.accepted(Input::VitalSign),
            self.accepted(Input::Phq9Submission),
            s.elapsed.as_secs_f64(),
            s.rate(),
            s.target_rate
        )?;
        for (what, q) in [("gateway 202", self.gateway_ack), ("vital ack", self.vital_ack)] {
            if let Some(q) = q {
                writeln!(
                    f,
                    "  {what:<11} p50 {:.1} ms, p99 {:.1} ms (from the scheduled send)",
                    millis(q.p50),
                    millis(q.p99)
                )?;
            }
        }
        let sent: Vec<String> = self.sent.iter().map(|(input, n)| format!("{input} {n}")).collect();
        writeln!(f, "  sent        {}", sent.join(", "))?;
        if self.replayed > 0 {
            writeln!(
                f,
                "  replayed    {} site API answers from an earlier run of this study",
                self.replayed
            )?;
        }
        if self.errors.is_empty() {
            write!(f, "  errors      none")
        } else {
            let errors: Vec<String> = self.errors.iter().map(|(kind, n)| format!("{kind}: {n}")).collect();
            writeln!(f, "  errors      {}", errors.join(", "))?;
            write!(f, "  first error {}", self.first_error.as_deref().unwrap_or("?"))
        }
    }
}

// ---- the run -----------------------------------------------------------------------------------

/// Runs the three phases against the pipeline `config` names. Fails when the set-up is refused
/// (nothing else can follow); refusals later are counted in the report ([`LoadReport::check`]).
/// On `shutdown` it stops sending, waits for the answers in flight and reports what it did.
pub async fn run_load(config: LoadConfig, shutdown: &CancellationToken) -> anyhow::Result<LoadReport> {
    config.check()?;
    let started = Instant::now();
    let load = Arc::new(Load::new(config)?);
    let stop_progress = CancellationToken::new();
    let progress =
        load.config.progress.then(|| tokio::spawn(print_progress(load.clone(), stop_progress.clone())));

    let result = async {
        load.set_up().await?;
        let enrollment = load.clone().enroll(shutdown).await;
        let steady = if shutdown.is_cancelled() {
            PhaseReport { target_rate: load.config.rate, ..PhaseReport::default() }
        } else {
            load.clone().steady(shutdown).await
        };
        anyhow::Ok((enrollment, steady))
    }
    .await;
    stop_progress.cancel();
    if let Some(progress) = progress {
        let _ = progress.await;
    }
    let (enrollment, steady) = result?;
    let setup = *load.setup_elapsed.lock().unwrap_or_else(|e| e.into_inner());
    let stats = std::mem::take(&mut *load.stats.lock().unwrap_or_else(|e| e.into_inner()));
    let c = &load.config;
    Ok(LoadReport {
        study: c.study.clone(),
        epoch: c.epoch,
        subjects: c.subjects,
        sites: c.sites,
        kits: load.plan.kits(),
        sent: stats.sent,
        accepted: stats.accepted,
        replayed: stats.replayed,
        subjects_requested: stats.subjects_requested,
        errors: stats.errors,
        first_error: stats.first_error,
        setup,
        enrollment,
        steady,
        gateway_ack: Quantiles::of(stats.gateway_latency),
        vital_ack: Quantiles::of(stats.vital_latency),
        enrollment_requested: stats.enrollment_requested,
        last_offsets: stats.last_offsets,
        elapsed: started.elapsed(),
        interrupted: shutdown.is_cancelled(),
    })
}

/// Counters of one run, shared by the senders.
#[derive(Debug, Default)]
struct Stats {
    sent: BTreeMap<Input, u64>,
    accepted: BTreeMap<Input, u64>,
    replayed: u64,
    subjects_requested: u64,
    errors: BTreeMap<String, u64>,
    first_error: Option<String>,
    gateway_latency: Vec<Duration>,
    vital_latency: Vec<Duration>,
    enrollment_requested: Vec<(String, std::time::Instant)>,
    last_offsets: BTreeMap<Input, BTreeMap<i32, i64>>,
}

impl Stats {
    fn failed(&mut self, kind: String, detail: String) {
        *self.errors.entry(kind).or_default() += 1;
        self.first_error.get_or_insert(detail);
    }

    fn landed(&mut self, input: Input, partition: i32, offset: i64) {
        let last = self.last_offsets.entry(input).or_default().entry(partition).or_insert(offset);
        *last = (*last).max(offset);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    SetUp,
    Enrollment,
    Steady,
}

/// A successful answer.
#[derive(Debug)]
struct Accepted {
    replayed: bool,
    /// Partition and offset, when the answer says where the input was stored (the gateway's 202).
    landed: Option<(i32, i64)>,
}

/// A refused or failed input: the error kind it is counted under, and the whole story.
#[derive(Debug)]
struct Refused {
    kind: String,
    detail: String,
}

/// Slot `n` starts `n / rate` after the timetable's start. Whoever asks for the next slot gets it;
/// a slot already past is taken at once, so a sender that fell behind catches up in a burst rather
/// than lowering the rate.
#[derive(Debug)]
struct Timetable {
    start: Instant,
    rate: u64,
    next: AtomicU64,
}

impl Timetable {
    fn new(rate: u32) -> Self {
        Self { start: Instant::now(), rate: u64::from(rate), next: AtomicU64::new(0) }
    }

    /// Waits for the next slot and returns when it was due.
    async fn slot(&self) -> Instant {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let at = self.start + Duration::from_nanos(n.saturating_mul(1_000_000_000) / self.rate);
        tokio::time::sleep_until(at).await;
        at
    }
}

/// Who is who: every id is a function of the study and an index.
#[derive(Debug)]
struct Plan {
    study: String,
    subjects: u64,
    sites: u64,
    /// Uuid namespace of this study's generated ids.
    namespace: Uuid,
}

impl Plan {
    fn new(study: &str, subjects: u32, sites: u32) -> Self {
        let load = Uuid::new_v5(&Uuid::NAMESPACE_URL, b"https://trialflow.invalid/load");
        Self {
            study: study.to_string(),
            subjects: u64::from(subjects),
            sites: u64::from(sites),
            namespace: Uuid::new_v5(&load, study.as_bytes()),
        }
    }

    fn id(&self, kind: &str, index: u64) -> Uuid {
        Uuid::new_v5(&self.namespace, format!("{kind}/{index}").as_bytes())
    }

    /// An idempotency key naming the command: stable across runs of this study.
    fn key(&self, command: &str, id: &str) -> String {
        format!("load/{}/{command}/{id}", self.study)
    }

    fn site_id(&self, site: u64) -> String {
        format!("S{:03}", site + 1)
    }

    /// Subjects are numbered from 0 and dealt to the sites in turn.
    fn site_of(&self, subject: u64) -> u64 {
        subject % self.sites
    }

    fn subject_id(&self, subject: u64) -> String {
        format!("{}-{:06}", self.site_id(self.site_of(subject)), subject + 1)
    }

    fn subjects_at(&self, site: u64) -> u64 {
        self.subjects / self.sites + u64::from(site < self.subjects % self.sites)
    }

    /// One kit per arm for every subject of the site: whatever arms the lists deal, nobody waits.
    fn kits_at(&self, site: u64) -> u64 {
        self.subjects_at(site) * ARMS.len() as u64
    }

    fn kits(&self) -> u64 {
        (0..self.sites).map(|s| self.kits_at(s)).sum()
    }

    fn age(&self, subject: u64) -> i32 {
        18 + (subject * 37 % 68) as i32
    }

    fn time_zone(&self, site: u64) -> &'static str {
        TIME_ZONES[(site % TIME_ZONES.len() as u64) as usize]
    }
}

/// One run's shared state (no `Debug`: the producer has none).
struct Load {
    config: LoadConfig,
    plan: Plan,
    http: reqwest::Client,
    edc: EdcPublisher,
    site_api: String,
    gateway: String,
    stats: Mutex<Stats>,
    phase: Mutex<(Phase, Instant)>,
    setup_elapsed: Mutex<Duration>,
}

impl Load {
    fn new(config: LoadConfig) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .pool_max_idle_per_host(config.concurrency)
            .build()
            .context("building the HTTP client")?;
        let edc =
            EdcPublisher::new(&config.kafka, config.topics.clone()).context("creating the EDC producer")?;
        Ok(Self {
            plan: Plan::new(&config.study, config.subjects, config.sites),
            site_api: format!("{}/v1/studies", config.site_api.trim_end_matches('/')),
            gateway: format!("{}/v1/submissions", config.epro_gateway.trim_end_matches('/')),
            http,
            edc,
            config,
            stats: Mutex::default(),
            phase: Mutex::new((Phase::SetUp, Instant::now())),
            setup_elapsed: Mutex::default(),
        })
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn enter(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = (phase, Instant::now());
    }

    /// POSTs `body` as `token`; counts the answer.
    async fn post<T: Serialize>(
        &self,
        input: Input,
        url: &str,
        token: &str,
        key: Option<&str>,
        body: &T,
    ) -> Result<Accepted, Refused> {
        *self.stats().sent.entry(input).or_default() += 1;
        let outcome = self.try_post(input, url, token, key, body).await;
        let mut stats = self.stats();
        match &outcome {
            Ok(accepted) => {
                *stats.accepted.entry(input).or_default() += 1;
                stats.replayed += u64::from(accepted.replayed);
                if let Some((partition, offset)) = accepted.landed {
                    stats.landed(input, partition, offset);
                }
            }
            Err(refused) => stats.failed(refused.kind.clone(), refused.detail.clone()),
        }
        outcome
    }

    async fn try_post<T: Serialize>(
        &self,
        input: Input,
        url: &str,
        token: &str,
        key: Option<&str>,
        body: &T,
    ) -> Result<Accepted, Refused> {
        let target = input.target();
        let mut request = self.http.post(url).bearer_auth(token).json(body);
        if let Some(key) = key {
            request = request.header(idempotency::HEADER, key);
        }
        let response = request.send().await.map_err(|e| Refused {
            kind: format!("{target} unreachable"),
            detail: format!("POST {url}: {e} (is the pipeline running, e.g. `trialflow run`?)"),
        })?;
        let status = response.status();
        if status.is_success() {
            let replayed = response.headers().get(idempotency::REPLAYED_HEADER).is_some_and(|v| v == "true");
            let body: serde_json::Value = response.json().await.unwrap_or_default();
            let landed = body["partition"].as_i64().zip(body["offset"].as_i64());
            let landed = landed.and_then(|(p, o)| Some((i32::try_from(p).ok()?, o)));
            return Ok(Accepted { replayed, landed });
        }
        let text = response.text().await.unwrap_or_default();
        let hint = if text.contains("idempotency_key_reused") {
            "; an earlier run of this study used other settings: rerun with the same --subjects, \
             --sites and --epoch, or use another --study"
        } else {
            ""
        };
        Err(Refused {
            kind: format!("{target} {}", status.as_u16()),
            detail: format!("POST {url}: {status} {text}{hint}"),
        })
    }

    // ---- phase 1 -------------------------------------------------------------------------------

    async fn set_up(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        let (plan, tokens) = (&self.plan, &self.config.tokens);
        let refused = |r: Refused| anyhow::anyhow!("setting up study `{}`: {}", plan.study, r.detail);
        let study = self.study_request();
        let key = plan.key("study", &plan.study);
        self.post(Input::Study, &self.site_api, &tokens.admin, Some(&key), &study).await.map_err(refused)?;
        let sites_url = format!("{}/{}/sites", self.site_api, plan.study);
        for site in 0..plan.sites {
            let site_id = plan.site_id(site);
            let body = CreateSite {
                site_id: site_id.clone(),
                name: format!("Load site {site_id}"),
                country: None,
                time_zone: plan.time_zone(site).to_string(),
                occurred_at: None,
            };
            let key = plan.key("site", &site_id);
            self.post(Input::Site, &sites_url, &tokens.admin, Some(&key), &body).await.map_err(refused)?;
        }
        for site in 0..plan.sites {
            let url = format!("{sites_url}/{}/shipments", plan.site_id(site));
            for shipment in self.shipments(site) {
                let key = plan.key("shipment", &shipment.shipment_id);
                self.post(Input::Shipment, &url, &tokens.pharmacist, Some(&key), &shipment)
                    .await
                    .map_err(refused)?;
            }
        }
        *self.setup_elapsed.lock().unwrap_or_else(|e| e.into_inner()) = started.elapsed();
        Ok(())
    }

    fn study_request(&self) -> CreateStudy {
        let plan = &self.plan;
        let seed = plan.id("randomization-seed", 0).as_u64_pair().0 as i64;
        CreateStudy {
            study_id: plan.study.clone(),
            title: format!("Synthetic load {}", plan.study),
            arms: ARMS
                .iter()
                .map(|code| Arm { arm_code: code.to_string(), name: format!("Arm {code}"), ratio: 1 })
                .collect(),
            stratification_factors: vec![Factor {
                factor: FACTOR.into(),
                values: vec!["<65".into(), ">=65".into()],
            }],
            eligibility: Eligibility {
                min_age_years: Some(18),
                max_age_years: Some(85),
                criteria: vec![Criterion {
                    criterion_id: CRITERION.into(),
                    description: "Synthetic inclusion criterion".into(),
                }],
            },
            randomization: Randomization {
                seed,
                block_multiples: vec![1, 2],
                // Room for every subject in either stratum.
                slots_per_stratum: i32::try_from(plan.subjects).unwrap_or(i32::MAX),
                warn_slots_left: 0,
            },
            kit_types: vec![KitType {
                kit_type: KIT_TYPE.into(),
                do_not_dispense_days: 30,
                do_not_count_days: 14,
                // Stock never counts as low: no SiteStockLow alerts from the surplus being used up.
                low_stock_threshold: 0,
            }],
            enrollment_kit_type: KIT_TYPE.into(),
            occurred_at: None,
        }
    }

    /// The site's kits, one per arm for each of its subjects, in shipments of at most
    /// [`KITS_PER_SHIPMENT`]; they expire three years after the timeline starts.
    fn shipments(&self, site: u64) -> Vec<ReceiveShipment> {
        let site_id = self.plan.site_id(site);
        let expiry = format!("{}-12-31", self.config.epoch.year() + 3);
        let kits: Vec<Kit> = (0..self.plan.kits_at(site))
            .map(|n| Kit {
                kit_number: format!("{site_id}-K{:06}", n + 1),
                sequence_number: n as i64 + 1,
                kit_type: KIT_TYPE.into(),
                lot: "LOAD-1".into(),
                expiry_date: expiry.clone(),
                arm_code: ARMS[(n % ARMS.len() as u64) as usize].into(),
            })
            .collect();
        kits.chunks(KITS_PER_SHIPMENT as usize)
            .enumerate()
            .map(|(i, kits)| ReceiveShipment {
                shipment_id: format!("{site_id}-SH{:03}", i + 1),
                kits: kits.to_vec(),
                occurred_at: None,
            })
            .collect()
    }

    // ---- phase 2 -------------------------------------------------------------------------------

    async fn enroll(self: Arc<Self>, shutdown: &CancellationToken) -> PhaseReport {
        self.enter(Phase::Enrollment);
        let started = Instant::now();
        let accepted_before = self.enrollment_accepted();
        let timetable = Arc::new(Timetable::new(self.config.rate));
        let permits = Arc::new(Semaphore::new(self.config.concurrency.min(Semaphore::MAX_PERMITS)));
        let mut tasks = JoinSet::new();
        for subject in 0..self.plan.subjects {
            let permit = tokio::select! {
                permit = permits.clone().acquire_owned() => permit,
                () = shutdown.cancelled() => break,
            };
            let Ok(permit) = permit else { break };
            let (load, timetable, shutdown) = (self.clone(), timetable.clone(), shutdown.clone());
            tasks.spawn(async move {
                load.enroll_subject(subject, &timetable, &shutdown).await;
                drop(permit);
            });
            while let Some(done) = tasks.try_join_next() {
                self.reap(done);
            }
        }
        while let Some(done) = tasks.join_next().await {
            self.reap(done);
        }
        PhaseReport {
            accepted: self.enrollment_accepted() - accepted_before,
            elapsed: started.elapsed(),
            target_rate: self.config.rate,
        }
    }

    fn enrollment_accepted(&self) -> u64 {
        let stats = self.stats();
        [Input::Screening, Input::Consent, Input::EnrollmentRequest]
            .iter()
            .map(|i| stats.accepted.get(i).copied().unwrap_or_default())
            .sum()
    }

    fn reap(&self, done: Result<(), tokio::task::JoinError>) {
        if let Err(e) = done {
            self.stats().failed("load task".into(), format!("a sender task failed: {e}"));
        }
    }

    /// Screening, consent and the enrollment request of one subject, one slot each, in order: a
    /// step refused leaves the later ones unsent.
    async fn enroll_subject(&self, subject: u64, timetable: &Timetable, shutdown: &CancellationToken) {
        let (plan, token) = (&self.plan, &self.config.tokens.site);
        let site = plan.site_of(subject);
        let subject_id = plan.subject_id(subject);
        let age = plan.age(subject);
        let subjects_url = format!("{}/{}/subjects", self.site_api, plan.study);
        let subject_url = format!("{subjects_url}/{subject_id}");
        let next_slot = async || {
            tokio::select! {
                _ = timetable.slot() => true,
                () = shutdown.cancelled() => false,
            }
        };

        if !next_slot().await {
            return;
        }
        let screening = ScreenSubject {
            site_id: plan.site_id(site),
            screening_number: format!("SCR-{:06}", subject + 1),
            subject_id: Some(subject_id.clone()),
            age_years: Some(age),
            sex: Some(if subject.is_multiple_of(2) { "F" } else { "M" }.into()),
            time_zone: None,
            criteria: BTreeMap::from([(CRITERION.to_string(), true)]),
            occurred_at: None,
        };
        let key = plan.key("screening", &subject_id);
        if self.post(Input::Screening, &subjects_url, token, Some(&key), &screening).await.is_err() {
            return;
        }

        if !next_slot().await {
            return;
        }
        let consent = SignConsent {
            consent_version: "v1".into(),
            signed_at: self.config.epoch.format("%Y-%m-%d").to_string(),
            occurred_at: None,
        };
        let (url, key) = (format!("{subject_url}/consent"), plan.key("consent", &subject_id));
        if self.post(Input::Consent, &url, token, Some(&key), &consent).await.is_err() {
            return;
        }

        if !next_slot().await {
            return;
        }
        let stratum = if age < 65 { "<65" } else { ">=65" };
        let request = RequestEnrollment {
            strata: BTreeMap::from([(FACTOR.to_string(), stratum.to_string())]),
            occurred_at: None,
        };
        let (url, key) = (format!("{subject_url}/enrollment-requests"), plan.key("enrollment", &subject_id));
        let sent_at = std::time::Instant::now();
        if self.post(Input::EnrollmentRequest, &url, token, Some(&key), &request).await.is_ok() {
            let mut stats = self.stats();
            stats.subjects_requested += 1;
            stats.enrollment_requested.push((subject_id, sent_at));
        }
    }

    // ---- phase 3 -------------------------------------------------------------------------------

    async fn steady(self: Arc<Self>, shutdown: &CancellationToken) -> PhaseReport {
        self.enter(Phase::Steady);
        let started = Instant::now();
        let total = u64::from(self.config.rate) * self.config.duration.as_secs();
        let timetable = Timetable::new(self.config.rate);
        let permits = Arc::new(Semaphore::new(self.config.concurrency.min(Semaphore::MAX_PERMITS)));
        let mut tasks = JoinSet::new();
        let accepted = Arc::new(AtomicU64::new(0));
        for i in 0..total {
            let slot = tokio::select! {
                slot = timetable.slot() => slot,
                () = shutdown.cancelled() => break,
            };
            let permit = tokio::select! {
                permit = permits.clone().acquire_owned() => permit,
                () = shutdown.cancelled() => break,
            };
            let Ok(permit) = permit else { break };
            let (load, accepted) = (self.clone(), accepted.clone());
            tasks.spawn(async move {
                let ok = if i % EPRO_EVERY == EPRO_EVERY - 1 {
                    load.submit_phq9(i, slot).await
                } else {
                    load.send_vital(i, slot).await
                };
                accepted.fetch_add(u64::from(ok), Ordering::Relaxed);
                drop(permit);
            });
            while let Some(done) = tasks.try_join_next() {
                self.reap(done);
            }
        }
        while let Some(done) = tasks.join_next().await {
            self.reap(done);
        }
        PhaseReport {
            accepted: accepted.load(Ordering::Relaxed),
            elapsed: started.elapsed(),
            target_rate: self.config.rate,
        }
    }

    /// When steady-state input `i` happened on the study's timeline: after the enrollment phase's
    /// slots, at the same rate. A first run sends each input no earlier than that, so nothing is
    /// authored in the future.
    fn clinical_time(&self, i: u64) -> DateTime<Utc> {
        let slot = 3 * self.plan.subjects + i;
        let micros = slot.saturating_mul(1_000_000) / u64::from(self.config.rate);
        self.config.epoch + chrono::Duration::microseconds(i64::try_from(micros).unwrap_or(i64::MAX))
    }

    /// The subject of steady-state input `i`: round-robin.
    fn steady_subject(&self, i: u64) -> (u64, String) {
        let subject = i % self.plan.subjects;
        (self.plan.site_of(subject), self.plan.subject_id(subject))
    }

    fn envelope(&self, event_type: &str, source: &str, i: u64, kind: &str) -> Envelope {
        let (site, subject_id) = self.steady_subject(i);
        let at = Timestamp::from(self.clinical_time(i));
        let mut envelope = Envelope::new(event_type, &self.plan.study, source, at);
        envelope.event_id = self.plan.id(kind, i);
        envelope.recorded_at = at;
        envelope.site_id = Some(self.plan.site_id(site));
        envelope.subject_id = Some(subject_id);
        envelope
    }

    fn vital(&self, i: u64) -> VitalSignRecorded {
        let (code, unit, low, width) = VITALS[(i / EPRO_EVERY % VITALS.len() as u64) as usize];
        // A spread of values inside the range, one decimal.
        let value = ((low + width * (i * 7919 % 101) as f64 / 100.0) * 10.0).round() / 10.0;
        let effective = self.clinical_time(i).format("%Y-%m-%dT%H:%M:%S").to_string();
        VitalSignRecorded {
            envelope: self.envelope(VitalSignRecorded::NAME, "edc", i, "vital"),
            observation_id: self.plan.id("observation", i).to_string(),
            loinc_code: code.into(),
            value,
            unit: unit.into(),
            position: None,
            effective: PartialDateTime::parse(&effective),
            visit: None,
            visit_day: None,
        }
    }

    /// Publishes vital sign `i` to the clinical topic as an EDC would; true when acknowledged.
    async fn send_vital(&self, i: u64, slot: Instant) -> bool {
        *self.stats().sent.entry(Input::VitalSign).or_default() += 1;
        let event = self.vital(i);
        let refused = |kind: String, detail: String| Refused { kind, detail };
        let outcome = match self.edc.send(&event) {
            Ok(Some(delivery)) => match delivery.await {
                Ok(Ok(delivery)) => Ok(delivery),
                Ok(Err((e, _))) => Err(refused(
                    format!(
                        "kafka {}",
                        e.rdkafka_error_code().map_or_else(|| "error".to_string(), |c| format!("{c:?}"))
                    ),
                    format!("producing vital sign {i}: {e}"),
                )),
                Err(_) => {
                    Err(refused("kafka canceled".into(), format!("vital sign {i}: the producer went away")))
                }
            },
            Ok(None) => {
                Err(refused("kafka QueueFull".into(), format!("vital sign {i}: the producer queue is full")))
            }
            Err(e) => Err(refused("producing".into(), format!("vital sign {i}: {e}"))),
        };
        let mut stats = self.stats();
        match outcome {
            Ok(delivery) => {
                *stats.accepted.entry(Input::VitalSign).or_default() += 1;
                stats.vital_latency.push(slot.elapsed());
                stats.landed(Input::VitalSign, delivery.partition, delivery.offset);
                true
            }
            Err(refused) => {
                stats.failed(refused.kind, refused.detail);
                false
            }
        }
    }

    /// A PHQ-9 without a flag or a severe total: items 1–8 between 0 and 2, item 9 (self-harm) 0,
    /// and the difficulty item, which applies since an item is above 0.
    fn phq9(&self, i: u64) -> QuestionnaireResponseSubmitted {
        let answer = |link_id: &str, value: u64| Answer::integer(link_id, value as i32);
        let mut items: Vec<Answer> =
            PHQ9_ITEMS.iter().enumerate().map(|(n, link)| answer(link, (i + n as u64) % 3)).collect();
        if let Some(item9) = items.last_mut() {
            item9.value_integer = Some(0);
        }
        items.push(answer(PHQ9_DIFFICULTY, i % 4));
        let (site, _) = self.steady_subject(i);
        QuestionnaireResponseSubmitted {
            envelope: self.envelope(QuestionnaireResponseSubmitted::NAME, "epro-app", i, "submission-event"),
            submission_id: self.plan.id("submission", i),
            questionnaire: "PHQ-9".into(),
            questionnaire_version: "1.0".into(),
            scheduled_occurrence: None,
            status: ResponseStatus::Completed,
            authored_at: Timestamp::from(self.clinical_time(i)),
            device_time_zone: self.plan.time_zone(site).into(),
            items,
        }
    }

    /// Submits PHQ-9 `i` through the ePRO gateway as a patient app would; true on 202.
    async fn submit_phq9(&self, i: u64, slot: Instant) -> bool {
        let submission = self.phq9(i);
        let token = &self.config.tokens.app;
        let accepted =
            self.post(Input::Phq9Submission, &self.gateway, token, None, &submission).await.is_ok();
        if accepted {
            self.stats().gateway_latency.push(slot.elapsed());
        }
        accepted
    }
}

/// A line on stderr every second: the phase, its progress and the request rate of the last second.
async fn print_progress(load: Arc<Load>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tick.tick().await;
    let (mut last_sent, mut last_at) = (0u64, Instant::now());
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let (phase, since) = *load.phase.lock().unwrap_or_else(|e| e.into_inner());
        let stats = load.stats();
        let sent: u64 = stats.sent.values().sum();
        let failed: u64 = stats.errors.values().sum();
        let count = |input| stats.accepted.get(&input).copied().unwrap_or_default();
        let rate = (sent - last_sent) as f64 / last_at.elapsed().as_secs_f64();
        (last_sent, last_at) = (sent, Instant::now());
        let c = &load.config;
        let line = match phase {
            Phase::SetUp => format!(
                "set-up {}/{} sites, {} shipments",
                count(Input::Site),
                c.sites,
                count(Input::Shipment)
            ),
            Phase::Enrollment => {
                format!("enrollment {}/{} subjects, {rate:.0} req/s", stats.subjects_requested, c.subjects)
            }
            Phase::Steady => format!(
                "steady {:.0}/{} s, {} vital signs, {} PHQ-9 submissions, {rate:.0} inputs/s",
                since.elapsed().as_secs_f64(),
                c.duration.as_secs(),
                count(Input::VitalSign),
                count(Input::Phq9Submission)
            ),
        };
        drop(stats);
        eprintln!("load: {line}, {failed} errors");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_study_ids_carry_their_timeline_start() {
        let now = DateTime::from_timestamp(1_795_000_000, 123).unwrap_or_default();
        let study = generated_study_id(now);
        assert_eq!(study, "LOAD-6afd86c0");
        assert_eq!(epoch_of(&study), Some(whole_seconds(now)));
        assert_eq!(epoch_of("LOAD-6afd86c"), None);
        assert_eq!(epoch_of("TRIAL-6afd86c0"), None);
    }

    #[derive(Debug, clap::Parser)]
    struct Command {
        #[command(flatten)]
        load: LoadArgs,
    }

    #[test]
    fn a_rerun_names_the_study_and_its_timeline() -> anyhow::Result<()> {
        use clap::Parser;
        let args = ["load", "--study", "LOAD-6afd86c0", "--subjects", "30", "--rate", "200"];
        let (config, note) = Command::try_parse_from(args)?.load.into_config();
        assert_eq!((config.study.as_str(), config.subjects, config.rate), ("LOAD-6afd86c0", 30, 200));
        assert_eq!(config.epoch.timestamp(), 1_795_000_000);
        assert_eq!(note, None);
        let args = ["load", "--study", "MINE", "--epoch", "2026-11-22T03:00:00Z"];
        let (config, note) = Command::try_parse_from(args)?.load.into_config();
        assert_eq!(config.epoch.to_rfc3339(), "2026-11-22T03:00:00+00:00");
        assert_eq!(note, None);
        let (_, note) = Command::try_parse_from(["load", "--study", "MINE"])?.load.into_config();
        assert!(note.is_some_and(|n| n.contains("--epoch")));
        Ok(())
    }

    #[test]
    fn every_subject_of_a_site_has_a_kit_of_each_arm() {
        let plan = Plan::new("S", 1003, 10);
        assert_eq!((0..10).map(|s| plan.subjects_at(s)).sum::<u64>(), 1003);
        assert_eq!(plan.subjects_at(0), 101);
        assert_eq!(plan.subjects_at(9), 100);
        assert_eq!(plan.kits(), 3 * 1003);
        assert!((0..1003).all(|s| (18..=85).contains(&plan.age(s))));
        assert_eq!(plan.subject_id(0), "S001-000001");
        assert_eq!(plan.subject_id(11), "S002-000012");
    }

    #[test]
    fn ids_depend_on_the_study_and_the_index_only() {
        let (a, b) = (Plan::new("A", 10, 2), Plan::new("A", 20, 5));
        assert_eq!(a.id("vital", 7), b.id("vital", 7));
        assert_ne!(a.id("vital", 7), a.id("vital", 8));
        assert_ne!(a.id("vital", 7), Plan::new("B", 10, 2).id("vital", 7));
    }
}
