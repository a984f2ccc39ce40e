//! The generator's settings: `trialflow load`'s flags ([`LoadArgs`]) or a [`LoadConfig`] built in
//! code (the tests, the `load` benchmark), and the study ids that carry their timeline start.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use trialflow_outbox::KafkaConfig;
use trialflow_schemas::topics::TopicNames;

/// Prefix of generated study ids; the 8 hex digits after it are the study's timeline start.
pub const GENERATED_STUDY_PREFIX: &str = "LOAD-";

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

    /// Enrollment requests per second, sent after every subject is screened and consented (at
    /// `--rate`), to load the enrollment saga on its own (0: each subject's request follows its
    /// consent, all at `--rate`).
    #[arg(long, default_value_t = 0)]
    pub enrollment_rate: u32,

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
    /// Enrollment requests per second in a phase of their own after screening and consent;
    /// `None`: each follows its subject's consent at `rate`.
    pub enrollment_rate: Option<u32>,
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
            enrollment_rate: None,
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

    pub(super) fn check(&self) -> anyhow::Result<()> {
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
            enrollment_rate: (self.enrollment_rate > 0).then_some(self.enrollment_rate),
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
    fn hostile_flags_are_refused_with_a_reason() {
        use clap::Parser;
        let refused = |extra: &[&str]| {
            let args = [&["load"], extra].concat();
            Command::try_parse_from(args).map(|_| ()).expect_err("refused").to_string()
        };
        let cases: &[(&[&str], &str)] = &[
            (&["--enrollment-rate", "fast"], "invalid digit"),
            (&["--enrollment-rate", "-5"], "unexpected argument '-5'"),
            (&["--enrollment-rate", "99999999999"], "99999999999 is not in 0..=4294967295"),
            (&["--enrollment-rate", "1\0"], "invalid digit"),
            (&["--enrollment-rate", "1", "--enrollment-rate", "2"], "cannot be used multiple times"),
            (&["--rate", ""], "cannot parse integer from empty string"),
        ];
        for (extra, expected) in cases {
            let message = refused(extra);
            assert!(message.contains(expected), "{extra:?}: {message}");
        }
        let zero = Command::try_parse_from(["load", "--rate", "0"]).map(|c| c.load.into_config().0);
        let error = zero.map(|config| config.check()).expect("parsed").expect_err("a rate of 0");
        assert!(error.to_string().contains("--rate must be at least 1"), "{error}");
        let (config, _) =
            Command::try_parse_from(["load", "--enrollment-rate", "0"]).expect("parsed").load.into_config();
        assert_eq!(config.enrollment_rate, None, "0: requests follow their consents");
        let (config, _) =
            Command::try_parse_from(["load", "--enrollment-rate", "400"]).expect("parsed").load.into_config();
        assert_eq!(config.enrollment_rate, Some(400));
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
}
