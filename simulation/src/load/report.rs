//! What a run sent and how the pipeline answered: counts by input, failures by kind, the phases'
//! achieved rates, acknowledgement latencies, and where the steady inputs landed.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use anyhow::bail;
use chrono::{DateTime, SecondsFormat, Utc};

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
    pub(super) fn target(self) -> &'static str {
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
    pub(super) fn of(mut sample: Vec<Duration>) -> Option<Self> {
        sample.sort_unstable();
        let at = |q: f64| crate::stats::nearest_rank(&sample, q);
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
