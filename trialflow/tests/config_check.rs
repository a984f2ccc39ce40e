//! `trialflow config check` against hostile and wrong input: each is refused with a message that
//! names the problem, stays short, and never carries a raw control character; and it connects to
//! nothing (the database and broker named here do not exist).

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::process::{Command, Output};

/// `trialflow config check <args>` with exactly `env`.
fn check(args: &[&str], env: &[(&str, OsString)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trialflow"))
        .args(["config", "check"])
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("running trialflow")
}

fn os(text: &str) -> OsString {
    OsString::from(text)
}

/// A refusal: exit status 1 or 2, stderr naming each of `expected`, at most a few KiB, no raw
/// control character but line breaks.
#[track_caller]
fn assert_refused(output: &Output, expected: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "accepted; stdout: {}", String::from_utf8_lossy(&output.stdout));
    for needle in expected {
        assert!(stderr.contains(needle), "the message does not name `{needle}`:\n{stderr}");
    }
    assert!(stderr.len() < 4096, "{} bytes of message", stderr.len());
    assert!(
        !stderr.chars().any(|c| c.is_control() && c != '\n'),
        "a raw control character in the message: {stderr:?}"
    );
}

const DATABASE: (&str, &str) = ("DATABASE_URL", "postgres://trialflow@db.invalid:5432/trialflow");

#[test]
fn a_valid_configuration_passes_and_names_what_it_read() {
    let output = check(
        &["consume", "notifier"],
        &[
            (DATABASE.0, os(DATABASE.1)),
            ("KAFKA_BOOTSTRAP_SERVERS", os("kafka.invalid:9092")),
            ("METRICS_ADDR", os("0.0.0.0:9464")),
            ("RUST_LOG", os("debug")),
            ("OTEL_SERVICE_NAME", os("not ours: ignored")),
        ],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        stdout.contains("consume notifier: configuration valid")
            && stdout.contains("DATABASE_URL, KAFKA_BOOTSTRAP_SERVERS, METRICS_ADDR"),
        "{stdout}"
    );
}

#[test]
fn a_variable_the_component_does_not_read_is_refused_by_name() {
    // A typo, and a setting of another component.
    let output = check(
        &["site-api"],
        &[
            (DATABASE.0, os(DATABASE.1)),
            ("SITE_API_TOKEN", os("t=admin:a")),
            ("SITE_API_DEMO_TOKENS", os("true")),
            ("OUTBOX_BATCH_SIZE", os("10")),
        ],
    );
    assert_refused(&output, &["SITE_API_TOKEN", "OUTBOX_BATCH_SIZE", "reads no variable named"]);
    assert!(!String::from_utf8_lossy(&output.stderr).contains("SITE_API_DEMO_TOKENS"), "it is read");
}

#[test]
fn the_components_own_validation_runs() {
    // Parses, but the service cannot authenticate anyone: what `trialflow site-api` says at start.
    assert_refused(
        &check(&["site-api"], &[(DATABASE.0, os(DATABASE.1))]),
        &["no caller can be authenticated"],
    );
    // min.insync.replicas above the replication factor: `topics apply` refuses before connecting.
    assert_refused(
        &check(
            &["topics", "apply"],
            &[("TOPIC_REPLICATION_FACTOR", os("1")), ("TOPIC_MIN_INSYNC_REPLICAS", os("2"))],
        ),
        &["exceeds --replication-factor"],
    );
    // The notifier's subscriptions are read and checked.
    assert_refused(
        &check(&["consume", "notifier"], &[("NOTIFIER_SUBSCRIPTIONS", os(r#"[{"recipient_id":"x"}]"#))]),
        &["NOTIFIER_SUBSCRIPTIONS"],
    );
    // A thresholds folder that is not there.
    assert_refused(
        &check(&["consume", "risk"], &[("RISK_CONFIG_DIR", os("/nonexistent/risk"))]),
        &["RISK_CONFIG_DIR", "/nonexistent/risk"],
    );
    // A rules folder that is not there.
    assert_refused(
        &check(&["consume", "monitoring"], &[("MONITORING_RULES_DIR", os("/nonexistent/rules"))]),
        &["/nonexistent/rules"],
    );
    assert_refused(
        &check(&["relay"], &[(DATABASE.0, os("postgres://db.invalid:port/x"))]),
        &["DATABASE_URL"],
    );
    // A lease timeout healthy relays could not keep: what `trialflow relay` says at start.
    assert_refused(
        &check(&["relay"], &[("OUTBOX_LEASE_TIMEOUT_MS", os("100")), ("OUTBOX_POLL_INTERVAL_MS", os("50"))]),
        &["OUTBOX_LEASE_TIMEOUT_MS=100", "healthy relays would lose their shards"],
    );
}

#[test]
fn control_characters_are_refused_and_never_echoed_raw() {
    let escape = os("\u{1b}[2J\u{1b}[31m0.0.0.0:80\r\n\u{7f}");
    assert_refused(&check(&["site-api"], &[("SITE_API_LISTEN", escape.clone())]), &["SITE_API_LISTEN"]);
    assert_refused(
        &check(&["relay"], &[("KAFKA_CONFIG", os("acks=all\u{0b}"))]),
        &["KAFKA_CONFIG", "control character"],
    );
    // In a value a component quotes in its own message (a folder that is not there).
    assert_refused(
        &check(&["consume", "monitoring"], &[("MONITORING_RULES_DIR", os("/nowhere/\u{1b}[2Jrules"))]),
        &["/nowhere/\\u{1b}[2Jrules"],
    );
    // In the arguments and in a variable's name.
    assert_refused(&check(&["consume", "enroll\u{1b}[0mment"], &[]), &["enroll"]);
    assert_refused(
        &check(&["relay"], &[("OUTBOX_\u{1b}]0;owned\u{7}", os("1"))]),
        &["reads no variable named"],
    );
    // Not UTF-8.
    let latin1 = OsString::from_vec(b"postgres://caf\xe9@db/x".to_vec());
    assert_refused(&check(&["migrate"], &[("DATABASE_URL", latin1)]), &["UTF-8"]);
}

#[test]
fn a_nul_never_reaches_the_process() {
    // The operating system's interface has no room for a NUL inside a value or argument: the
    // process cannot be started with one (the standard library refuses before exec).
    let spawned = Command::new(env!("CARGO_BIN_EXE_trialflow"))
        .args(["config", "check", "relay"])
        .env_clear()
        .env("KAFKA_CONFIG", "acks=all\0linger.ms=1")
        .output();
    assert!(spawned.is_err(), "a NUL was passed through: {spawned:?}");
}

#[test]
fn huge_values_are_refused_briefly() {
    // Linux takes at most 128 KiB per variable (MAX_ARG_STRLEN): each is as large as it can be.
    let huge = "x".repeat(120_000);
    assert_refused(&check(&["relay"], &[("KAFKA_CONFIG", os(&format!("{huge}=1")))]), &["KAFKA_CONFIG"]);
    assert_refused(&check(&["site-api"], &[("SITE_API_LISTEN", os(&huge))]), &["SITE_API_LISTEN"]);
    assert_refused(&check(&["topics", "plan"], &[("TOPIC_PREFIX", os(&huge))]), &["TOPIC_PREFIX"]);
    assert_refused(
        &check(&["relay"], &[(&format!("OUTBOX_{}", &huge[..100_000]), os("1"))]),
        &["characters in all"],
    );
}

#[test]
fn unknown_missing_and_nested_subcommands_are_refused() {
    assert_refused(&check(&["frobnicate"], &[]), &["unrecognized subcommand", "frobnicate"]);
    assert_refused(&check(&["consume", "billing"], &[]), &["billing", "possible values"]);
    assert_refused(&check(&["config", "check", "relay"], &[]), &["not `config`"]);
    let none = check(&[], &[]);
    assert_refused(&none, &["required"]);
    assert_refused(&check(&["relay", "--batch-size", "0"], &[]), &["--batch-size"]);
}
