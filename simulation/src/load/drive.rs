//! The run: the three phases against a running pipeline, each input sent on its slot of a fixed
//! timetable with at most `concurrency` in flight, every answer counted (see the module doc of
//! [`super`] for pacing and reruns).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use trialflow_producers::site_api::idempotency;

use super::config::LoadConfig;
use super::plan::{EPRO_EVERY, Plan};
use super::report::{Input, LoadReport, PhaseReport, Quantiles};
use crate::edc::EdcPublisher;

/// A request that takes longer has failed; a load generator must not hang on one.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// Subjects screened and consented, when their enrollment requests are a pass of their own.
    consented: std::collections::BTreeSet<u64>,
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

/// Which of a subject's enrollment steps a pass sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Steps {
    /// Screening, consent and the enrollment request.
    All,
    ScreeningAndConsent,
    EnrollmentRequest,
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
            plan: Plan::new(&config),
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
        let study = plan.study_request();
        let key = plan.key("study", &plan.study);
        self.post(Input::Study, &self.site_api, &tokens.admin, Some(&key), &study).await.map_err(refused)?;
        let sites_url = format!("{}/{}/sites", self.site_api, plan.study);
        for site in 0..plan.sites {
            let site_id = plan.site_id(site);
            let body = plan.site(site);
            let key = plan.key("site", &site_id);
            self.post(Input::Site, &sites_url, &tokens.admin, Some(&key), &body).await.map_err(refused)?;
        }
        for site in 0..plan.sites {
            let url = format!("{sites_url}/{}/shipments", plan.site_id(site));
            for shipment in plan.shipments(site) {
                let key = plan.key("shipment", &shipment.shipment_id);
                self.post(Input::Shipment, &url, &tokens.pharmacist, Some(&key), &shipment)
                    .await
                    .map_err(refused)?;
            }
        }
        *self.setup_elapsed.lock().unwrap_or_else(|e| e.into_inner()) = started.elapsed();
        Ok(())
    }

    // ---- phase 2 -------------------------------------------------------------------------------

    async fn enroll(self: Arc<Self>, shutdown: &CancellationToken) -> PhaseReport {
        self.enter(Phase::Enrollment);
        let started = Instant::now();
        let accepted_before = self.enrollment_accepted();
        match self.config.enrollment_rate {
            None => self.clone().each_subject(self.config.rate, Steps::All, shutdown).await,
            Some(rate) => {
                self.clone().each_subject(self.config.rate, Steps::ScreeningAndConsent, shutdown).await;
                self.clone().each_subject(rate, Steps::EnrollmentRequest, shutdown).await;
            }
        }
        PhaseReport {
            accepted: self.enrollment_accepted() - accepted_before,
            elapsed: started.elapsed(),
            target_rate: self.config.rate,
        }
    }

    /// Sends `steps` of every subject, `rate` requests per second.
    async fn each_subject(self: Arc<Self>, rate: u32, steps: Steps, shutdown: &CancellationToken) {
        let timetable = Arc::new(Timetable::new(rate));
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
                load.enroll_subject(subject, steps, &timetable, &shutdown).await;
                drop(permit);
            });
            while let Some(done) = tasks.try_join_next() {
                self.reap(done);
            }
        }
        while let Some(done) = tasks.join_next().await {
            self.reap(done);
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

    /// Screening, consent and the enrollment request of one subject (those of `steps`), one slot
    /// each, in order: a step refused leaves the later ones unsent. A subject whose screening or
    /// consent was refused gets no enrollment request in a phase of its own either.
    async fn enroll_subject(
        &self,
        subject: u64,
        steps: Steps,
        timetable: &Timetable,
        shutdown: &CancellationToken,
    ) {
        let (plan, token) = (&self.plan, &self.config.tokens.site);
        let subject_id = plan.subject_id(subject);
        let subjects_url = format!("{}/{}/subjects", self.site_api, plan.study);
        let subject_url = format!("{subjects_url}/{subject_id}");
        let next_slot = async || {
            tokio::select! {
                _ = timetable.slot() => true,
                () = shutdown.cancelled() => false,
            }
        };

        if steps != Steps::EnrollmentRequest {
            if !next_slot().await {
                return;
            }
            let screening = plan.screening(subject);
            let key = plan.key("screening", &subject_id);
            if self.post(Input::Screening, &subjects_url, token, Some(&key), &screening).await.is_err() {
                return;
            }

            if !next_slot().await {
                return;
            }
            let consent = plan.consent();
            let (url, key) = (format!("{subject_url}/consent"), plan.key("consent", &subject_id));
            if self.post(Input::Consent, &url, token, Some(&key), &consent).await.is_err() {
                return;
            }
            if steps == Steps::ScreeningAndConsent {
                self.stats().consented.insert(subject);
                return;
            }
        } else if !self.stats().consented.contains(&subject) {
            return;
        }

        if !next_slot().await {
            return;
        }
        let request = plan.enrollment_request(subject);
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

    /// Publishes vital sign `i` to the clinical topic as an EDC would; true when acknowledged.
    async fn send_vital(&self, i: u64, slot: Instant) -> bool {
        *self.stats().sent.entry(Input::VitalSign).or_default() += 1;
        let event = self.plan.vital(i);
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

    /// Submits PHQ-9 `i` through the ePRO gateway as a patient app would; true on 202.
    async fn submit_phq9(&self, i: u64, slot: Instant) -> bool {
        let submission = self.plan.phq9(i);
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
