//! Who is notified of what, and how hard the worker tries.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use clap::builder::{OsStringValueParser, TypedValueParser};
use serde::{Deserialize, Deserializer};
use thiserror::Error;
use trialflow_outbox::config::{self, setting, trimmed};
use trialflow_schemas::{AlertSeverity, NotificationChannel};

/// Subscription wildcard: every study.
pub const ALL_STUDIES: &str = "*";

/// A configuration the notifier cannot start with.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read NOTIFIER_SUBSCRIPTIONS_FILE `{}`: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{origin} is not a JSON array of subscriptions: {source}")]
    Json { origin: String, source: serde_json::Error },
    #[error("subscription #{index} (recipient `{recipient_id}`): {reason}")]
    Invalid { index: usize, recipient_id: String, reason: String },
    /// A setting that does not parse (the message names it).
    #[error("{0}")]
    Setting(String),
}

/// How a recipient is reached. Only webhooks for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    Webhook,
}

impl Channel {
    /// As stored and in the idempotency key.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Webhook => "webhook",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "webhook" => Some(Self::Webhook),
            _ => None,
        }
    }

    /// As named in the notification events.
    pub fn event_channel(self) -> NotificationChannel {
        match self {
            Self::Webhook => NotificationChannel::Webhook,
        }
    }
}

/// A shared secret. Never printed: `Debug` shows `Secret(***)`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// One recipient's wish to hear about alerts of a study (or all) from a severity up.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscription {
    /// Who: a stable id of the person or team (part of the idempotency key).
    pub recipient_id: String,
    /// Which study's alerts; `*` for every study.
    #[serde(default = "all_studies")]
    pub study_id: String,
    /// The lowest severity notified (`INFO`, `WARNING`, `HIGH`, `CRITICAL`; any case).
    #[serde(deserialize_with = "severity")]
    pub min_severity: AlertSeverity,
    /// How: `webhook`.
    pub channel: Channel,
    /// Where the webhook is POSTed (http or https).
    pub url: String,
    /// Key of the `X-Trialflow-Signature` HMAC.
    pub secret: Secret,
}

fn all_studies() -> String {
    ALL_STUDIES.to_string()
}

fn severity<'de, D: Deserializer<'de>>(d: D) -> Result<AlertSeverity, D::Error> {
    let text = String::deserialize(d)?;
    parse_severity(&text).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "unknown severity `{text}`; expected INFO, WARNING, HIGH or CRITICAL"
        ))
    })
}

fn parse_severity(text: &str) -> Option<AlertSeverity> {
    match text.to_ascii_uppercase().as_str() {
        "INFO" => Some(AlertSeverity::Info),
        "WARNING" => Some(AlertSeverity::Warning),
        "HIGH" => Some(AlertSeverity::High),
        "CRITICAL" => Some(AlertSeverity::Critical),
        _ => None,
    }
}

impl Subscription {
    /// Whether an alert of `study_id` at `severity` is for this subscription.
    pub fn matches(&self, study_id: &str, severity: AlertSeverity) -> bool {
        (self.study_id == ALL_STUDIES || self.study_id == study_id) && severity >= self.min_severity
    }
}

/// The subscriptions an alert goes to: one per (recipient, channel) — the first matching one in
/// configuration order — since a recipient gets an alert level once per channel however many of
/// their subscriptions match.
pub fn recipients<'a>(
    subscriptions: &'a [Subscription],
    study_id: &str,
    severity: AlertSeverity,
) -> Vec<&'a Subscription> {
    let mut picked: Vec<&Subscription> = Vec::new();
    for s in subscriptions.iter().filter(|s| s.matches(study_id, severity)) {
        if !picked.iter().any(|p| p.recipient_id == s.recipient_id && p.channel == s.channel) {
            picked.push(s);
        }
    }
    picked
}

/// Parses and checks a JSON array of subscriptions; `origin` names it in errors.
pub fn parse_subscriptions(json: &str, origin: &str) -> Result<Vec<Subscription>, ConfigError> {
    let subscriptions: Vec<Subscription> = serde_json::from_str(json)
        .map_err(|source| ConfigError::Json { origin: origin.to_string(), source })?;
    check(&subscriptions)?;
    Ok(subscriptions)
}

fn check(subscriptions: &[Subscription]) -> Result<(), ConfigError> {
    let mut secrets: HashMap<(&str, Channel, &str), &Secret> = HashMap::new();
    for (index, s) in subscriptions.iter().enumerate() {
        let invalid =
            |reason: String| ConfigError::Invalid { index, recipient_id: s.recipient_id.clone(), reason };
        if s.recipient_id.trim().is_empty() {
            return Err(invalid("recipient_id is empty".into()));
        }
        if s.study_id.trim().is_empty() {
            return Err(invalid("study_id is empty; use `*` for every study".into()));
        }
        if s.secret.expose().is_empty() {
            return Err(invalid("secret is empty; webhooks are always signed".into()));
        }
        match reqwest::Url::parse(&s.url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {}
            Ok(url) => return Err(invalid(format!("url `{url}` is not an http(s) URL with a host"))),
            Err(e) => return Err(invalid(format!("url `{}` does not parse: {e}", s.url))),
        }
        // The worker finds a delivery's secret by (recipient, channel, url): it must be one.
        let earlier = secrets.entry((&s.recipient_id, s.channel, &s.url)).or_insert(&s.secret);
        if **earlier != s.secret {
            return Err(invalid(format!(
                "another subscription of this recipient to `{}` has another secret",
                s.url
            )));
        }
    }
    Ok(())
}

/// The notifier's settings (`trialflow consume notifier`, `run`, `demo` and `replay`).
#[derive(Clone, Args)]
pub struct NotifierArgs {
    /// Who hears about what: a JSON file holding an array of subscriptions (`recipient_id`,
    /// `study_id`, `min_severity`, `channel`, `url`, `secret`). Takes precedence over
    /// NOTIFIER_SUBSCRIPTIONS. Neither: nobody is notified.
    #[arg(long = "notifier-subscriptions-file", env = "NOTIFIER_SUBSCRIPTIONS_FILE", value_name = "PATH", value_parser = OsStringValueParser::new().map(PathBuf::from))]
    pub subscriptions_file: Option<PathBuf>,

    /// The subscriptions as inline JSON, when no file is given. They hold webhook secrets: prefer
    /// the variable (a flag shows in the process list).
    #[arg(
        long = "notifier-subscriptions",
        env = "NOTIFIER_SUBSCRIPTIONS",
        value_name = "JSON",
        hide_env_values = true
    )]
    pub subscriptions: Option<String>,

    /// Longest one POST may take, connection included (milliseconds).
    #[arg(long = "notifier-attempt-timeout-ms", env = "NOTIFIER_ATTEMPT_TIMEOUT_MS", value_name = "MS", default_value_t = 5_000, value_parser = setting(trimmed::<u64>).blank_refused())]
    pub attempt_timeout_ms: u64,

    /// A delivery still failing this long (seconds) after it was created is given up:
    /// `NotificationFailed`.
    #[arg(long = "notifier-give-up-secs", env = "NOTIFIER_GIVE_UP_SECS", value_name = "SECS", default_value_t = 3_600, value_parser = setting(trimmed::<u64>).blank_refused())]
    pub give_up_secs: u64,

    /// Longest pause between attempts of one delivery (milliseconds); from 100 ms, doubling, with
    /// jitter. (Its id differs from the field's name: a consumer's own `max_backoff_ms` sits
    /// beside it in `trialflow consume`.)
    #[arg(id = "notifier_max_backoff_ms", long = "notifier-max-backoff-ms", env = "NOTIFIER_MAX_BACKOFF_MS", value_name = "MS", default_value_t = 60_000, value_parser = setting(trimmed::<u64>).blank_refused())]
    pub max_backoff_ms: u64,

    /// How often (milliseconds) the worker looks for due deliveries when no notification wakes it.
    #[arg(long = "notifier-poll-interval-ms", env = "NOTIFIER_POLL_INTERVAL_MS", value_name = "MS", default_value_t = 1_000, value_parser = setting(trimmed::<u64>).blank_refused())]
    pub poll_interval_ms: u64,

    /// Consecutive failed attempts (5xx, 408, 429, timeout, connection error) to one webhook URL
    /// that open its circuit: nothing is sent to it for NOTIFIER_BREAKER_OPEN_MS, then one probe.
    /// 0: never.
    #[arg(long = "notifier-breaker-failures", env = "NOTIFIER_BREAKER_FAILURES", value_name = "N", default_value_t = 5, value_parser = setting(trimmed::<u32>).blank_refused())]
    pub breaker_failures: u32,

    /// How long (milliseconds) an open circuit sends nothing before its probe.
    #[arg(long = "notifier-breaker-open-ms", env = "NOTIFIER_BREAKER_OPEN_MS", value_name = "MS", default_value_t = 30_000, value_parser = setting(trimmed::<u64>).blank_refused())]
    pub breaker_open_ms: u64,
}

/// `Debug` never shows the inline subscriptions (they hold secrets).
impl fmt::Debug for NotifierArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NotifierArgs")
            .field("subscriptions_file", &self.subscriptions_file)
            .field("subscriptions", &self.subscriptions.as_ref().map(|_| "<redacted>"))
            .field("attempt_timeout_ms", &self.attempt_timeout_ms)
            .field("give_up_secs", &self.give_up_secs)
            .field("max_backoff_ms", &self.max_backoff_ms)
            .field("poll_interval_ms", &self.poll_interval_ms)
            .field("breaker_failures", &self.breaker_failures)
            .field("breaker_open_ms", &self.breaker_open_ms)
            .finish()
    }
}

impl NotifierArgs {
    /// The configuration of these settings: the subscriptions read (from the file if one is
    /// given, else inline) and checked.
    pub fn into_config(self) -> Result<NotifierConfig, ConfigError> {
        let subscriptions = match (&self.subscriptions_file, &self.subscriptions) {
            (Some(path), _) if !path.as_os_str().is_empty() => {
                let json = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.clone(), source })?;
                parse_subscriptions(&json, &path.display().to_string())?
            }
            (_, Some(json)) => parse_subscriptions(json, "NOTIFIER_SUBSCRIPTIONS")?,
            _ => Vec::new(),
        };
        Ok(self.with_subscriptions(subscriptions))
    }

    fn with_subscriptions(self, subscriptions: Vec<Subscription>) -> NotifierConfig {
        NotifierConfig {
            subscriptions,
            max_attempt_timeout_ms: self.attempt_timeout_ms,
            give_up_after_secs: self.give_up_secs,
            max_backoff_ms: self.max_backoff_ms,
            poll_interval_ms: self.poll_interval_ms,
            breaker_failures: self.breaker_failures,
            breaker_open_ms: self.breaker_open_ms,
        }
    }
}

/// What the notifier runs with (see [`NotifierArgs`] for each setting).
#[derive(Debug, Clone)]
pub struct NotifierConfig {
    /// Who hears about what (`NOTIFIER_SUBSCRIPTIONS_FILE` or `NOTIFIER_SUBSCRIPTIONS`); empty:
    /// nothing is sent.
    pub subscriptions: Vec<Subscription>,
    /// Longest one POST may take, connection included, in milliseconds
    /// (`NOTIFIER_ATTEMPT_TIMEOUT_MS`).
    pub max_attempt_timeout_ms: u64,
    /// A delivery still failing this long (seconds) after it was created is given up:
    /// `NotificationFailed` (`NOTIFIER_GIVE_UP_SECS`).
    pub give_up_after_secs: u64,
    /// Longest pause between attempts of one delivery, in milliseconds; from 100 ms, doubling,
    /// with jitter (`NOTIFIER_MAX_BACKOFF_MS`).
    pub max_backoff_ms: u64,
    /// How often (milliseconds) the worker looks for due deliveries when no notification wakes it
    /// (`NOTIFIER_POLL_INTERVAL_MS`).
    pub poll_interval_ms: u64,
    /// Consecutive failed attempts that open a webhook URL's circuit; 0: never
    /// (`NOTIFIER_BREAKER_FAILURES`).
    pub breaker_failures: u32,
    /// How long an open circuit sends nothing before its probe, in milliseconds
    /// (`NOTIFIER_BREAKER_OPEN_MS`).
    pub breaker_open_ms: u64,
}

/// The defaults of [`NotifierArgs`]: no subscriptions.
impl Default for NotifierConfig {
    fn default() -> Self {
        config::defaults::<NotifierArgs>().with_subscriptions(Vec::new())
    }
}

impl NotifierConfig {
    pub(crate) fn attempt_timeout(&self) -> Duration {
        Duration::from_millis(self.max_attempt_timeout_ms.max(100))
    }

    pub(crate) fn max_backoff(&self) -> Duration {
        Duration::from_millis(self.max_backoff_ms.max(100))
    }

    pub(crate) fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms.max(10))
    }

    /// The secret of the subscription a delivery was made for, if it is still configured.
    pub(crate) fn secret(&self, recipient_id: &str, channel: Channel, url: &str) -> Option<&Secret> {
        self.subscriptions
            .iter()
            .find(|s| s.recipient_id == recipient_id && s.channel == channel && s.url == url)
            .map(|s| &s.secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subscriptions() -> Vec<Subscription> {
        let json = r#"[
            {"recipient_id": "safety-desk", "study_id": "*", "min_severity": "HIGH",
             "channel": "webhook", "url": "https://hooks.example.org/safety", "secret": "k1"},
            {"recipient_id": "pi-001", "study_id": "CARDIO-3", "min_severity": "warning",
             "channel": "webhook", "url": "http://127.0.0.1:9000/pi", "secret": "k2"},
            {"recipient_id": "pi-001", "min_severity": "CRITICAL",
             "channel": "webhook", "url": "http://127.0.0.1:9000/pi-all", "secret": "k3"}
        ]"#;
        match parse_subscriptions(json, "test") {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }

    fn ids(subs: &[&Subscription]) -> Vec<(String, String)> {
        subs.iter().map(|s| (s.recipient_id.clone(), s.url.clone())).collect()
    }

    #[test]
    fn matching_follows_study_and_minimum_severity() {
        let subs = subscriptions();
        let warning = recipients(&subs, "CARDIO-3", AlertSeverity::Warning);
        assert_eq!(ids(&warning), [("pi-001".into(), "http://127.0.0.1:9000/pi".into())]);
        let high = recipients(&subs, "CARDIO-3", AlertSeverity::High);
        assert_eq!(high.len(), 2, "the HIGH-only desk and the study's PI");
        assert!(recipients(&subs, "ONCO-1", AlertSeverity::Warning).is_empty());
        assert!(recipients(&subs, "CARDIO-3", AlertSeverity::Info).is_empty());
        let other_study = recipients(&subs, "ONCO-1", AlertSeverity::High);
        assert_eq!(ids(&other_study), [("safety-desk".into(), "https://hooks.example.org/safety".into())]);
    }

    #[test]
    fn a_recipient_matched_twice_on_one_channel_is_notified_once() {
        let subs = subscriptions();
        let critical = recipients(&subs, "CARDIO-3", AlertSeverity::Critical);
        assert_eq!(critical.len(), 2);
        let pi: Vec<_> = critical.iter().filter(|s| s.recipient_id == "pi-001").collect();
        assert_eq!(pi.len(), 1);
        assert_eq!(pi[0].url, "http://127.0.0.1:9000/pi", "first in configuration order");
        let elsewhere = recipients(&subs, "ONCO-1", AlertSeverity::Critical);
        assert!(elsewhere.iter().any(|s| s.url == "http://127.0.0.1:9000/pi-all"));
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let text = format!("{:?}", subscriptions());
        assert!(!text.contains("k1") && !text.contains("k2"), "{text}");
        assert!(text.contains("Secret(***)"));
    }

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        notifier: NotifierArgs,
    }

    /// The configuration of `args` (flags: the process environment is not read for them).
    fn configured(args: &[&str]) -> Result<NotifierConfig, String> {
        let cli =
            <Cli as clap::Parser>::try_parse_from(std::iter::once("notifier").chain(args.iter().copied()));
        cli.map_err(|e| e.to_string())?.notifier.into_config().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_notify_nobody() {
        let config = NotifierConfig::default();
        assert!(config.subscriptions.is_empty());
        assert_eq!(
            (
                config.max_attempt_timeout_ms,
                config.give_up_after_secs,
                config.max_backoff_ms,
                config.poll_interval_ms
            ),
            (5_000, 3_600, 60_000, 1_000)
        );
    }

    #[test]
    fn settings_are_read_and_the_file_wins_over_the_inline_subscriptions() {
        let inline = r#"[{"recipient_id": "r", "min_severity": "HIGH", "channel": "webhook", "url": "http://h/x", "secret": "s"}]"#;
        let args = ["--notifier-subscriptions", inline, "--notifier-give-up-secs", " 60 "];
        let parsed = <Cli as clap::Parser>::try_parse_from(std::iter::once("notifier").chain(args));
        assert!(parsed.is_ok_and(|cli| !format!("{cli:?}").contains(r#""secret": "s""#)), "Debug hides them");
        let config = configured(&args);
        assert_eq!(
            config.as_ref().map(|c| (c.subscriptions.len(), c.give_up_after_secs)).ok(),
            Some((1, 60))
        );
        let missing = configured(&[
            "--notifier-subscriptions-file",
            "/nonexistent/subs.json",
            "--notifier-subscriptions",
            inline,
        ]);
        let missing = missing.err().unwrap_or_default();
        assert!(
            missing.contains("cannot read NOTIFIER_SUBSCRIPTIONS_FILE `/nonexistent/subs.json`"),
            "{missing}"
        );
        let empty_file =
            configured(&["--notifier-subscriptions-file", "", "--notifier-subscriptions", inline]);
        assert_eq!(empty_file.map(|c| c.subscriptions.len()).ok(), Some(1), "an empty path is no file");
    }

    #[test]
    fn hostile_settings_are_refused_naming_the_variable() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["--notifier-attempt-timeout-ms", "soon"],
                "NOTIFIER_ATTEMPT_TIMEOUT_MS (--notifier-attempt-timeout-ms)",
            ),
            (&["--notifier-give-up-secs", ""], "NOTIFIER_GIVE_UP_SECS (--notifier-give-up-secs)"),
            (
                &["--notifier-max-backoff-ms", "18446744073709551616"],
                "NOTIFIER_MAX_BACKOFF_MS (--notifier-max-backoff-ms)",
            ),
            (
                &["--notifier-poll-interval-ms", "1\0"],
                "NOTIFIER_POLL_INTERVAL_MS (--notifier-poll-interval-ms)",
            ),
            (&["--notifier-subscriptions", "{\"k1\": 1}"], "NOTIFIER_SUBSCRIPTIONS is not a JSON array"),
            (&["--notifier-breaker-failures=-1"], "NOTIFIER_BREAKER_FAILURES (--notifier-breaker-failures)"),
            (
                &["--notifier-breaker-failures", "4294967296"],
                "NOTIFIER_BREAKER_FAILURES (--notifier-breaker-failures)",
            ),
            (
                &["--notifier-breaker-open-ms", "30s\u{7}"],
                "NOTIFIER_BREAKER_OPEN_MS (--notifier-breaker-open-ms)",
            ),
        ];
        for (args, name) in cases {
            let refused = configured(args).err().unwrap_or_default();
            assert!(refused.contains(name), "{args:?}: {refused}");
            assert!(!refused.contains('\0'), "control characters escaped: {refused}");
        }
    }

    #[test]
    fn bad_subscriptions_are_refused_with_the_reason() {
        let bad =
            |json: &str| parse_subscriptions(json, "test").err().map(|e| e.to_string()).unwrap_or_default();
        let base = |field: &str| {
            format!(
                r#"[{{"recipient_id": "r", "min_severity": "HIGH", "channel": "webhook",
                   "url": "http://h/x", "secret": "s", {field}}}]"#
            )
        };
        assert!(bad(&base(r#""extra": 1"#)).contains("unknown field"));
        assert!(bad(&base(r#""study_id": """#)).contains("study_id is empty"));
        assert!(bad(r#"[{"recipient_id": "r", "min_severity": "SEVERE", "channel": "webhook", "url": "http://h/x", "secret": "s"}]"#).contains("unknown severity"));
        assert!(bad(r#"[{"recipient_id": "r", "min_severity": "HIGH", "channel": "sms", "url": "http://h/x", "secret": "s"}]"#).contains("unknown variant"));
        assert!(bad(r#"[{"recipient_id": "r", "min_severity": "HIGH", "channel": "webhook", "url": "ftp://h/x", "secret": "s"}]"#).contains("not an http(s) URL"));
        assert!(bad(r#"[{"recipient_id": "r", "min_severity": "HIGH", "channel": "webhook", "url": "http://h/x", "secret": ""}]"#).contains("secret is empty"));
        let conflicting = r#"[
            {"recipient_id": "r", "min_severity": "HIGH", "channel": "webhook", "url": "http://h/x", "secret": "a"},
            {"recipient_id": "r", "study_id": "S", "min_severity": "INFO", "channel": "webhook", "url": "http://h/x", "secret": "b"}
        ]"#;
        assert!(bad(conflicting).contains("another secret"));
    }
}
