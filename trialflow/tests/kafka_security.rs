//! TLS and SASL are real: a private Apache Kafka node whose client listener is `SASL_SSL` with
//! SCRAM-SHA-512 (a CA and the broker's certificate made here with `openssl`, the user created
//! when the node's storage is formatted), and the real `trialflow` binary configured only through
//! the documented variables, `KAFKA_BOOTSTRAP_SERVERS` and `KAFKA_CONFIG`, as README's
//! "connecting to a secured cluster" says.
//!
//! * `trialflow run` (the relay, every consumer, the ePRO gateway) takes one submission through
//!   the gateway's HTTP route; the epro-validation consumer accepts it and the relay publishes the
//!   decision, read back over `SASL_SSL`.
//! * A wrong password, a plaintext client on the TLS listener and a CA that did not sign the
//!   broker's certificate each stop `trialflow relay`, `consume` and `epro-gateway` at start,
//!   within seconds, with librdkafka's reason; never a silent retry loop.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use chrono::Utc;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use trialflow_consumers::epro::catalogue::Catalogue;
use trialflow_consumers::epro::reference;
use trialflow_outbox::KafkaConfig;
use trialflow_outbox::kafka::TopicReader;
use trialflow_schemas::topics::{self, TopicNames};
use trialflow_schemas::{AnyEvent, Envelope, Event, SubjectEnrolled, SubjectScreened, Timestamp};
use trialflow_testkit::tls::Certificates;
use trialflow_testkit::{ClusterSpec, KafkaCluster, Listener, database_url};
use uuid::Uuid;

const USER: &str = "trialflow-app";
const PASSWORD: &str = "scram-pass-7Qx";
const STUDY: &str = "SEC-IT";
/// How long a command refused by the cluster may take to stop: the check's metadata round trip
/// plus the process's start (well below librdkafka's endless retries).
const REFUSED_WITHIN: Duration = Duration::from_secs(30);
const WAIT: Duration = Duration::from_secs(60);

/// One node whose client listener is SASL_SSL with SCRAM-SHA-512; [`USER`] exists from the
/// start (created when the storage is formatted).
async fn secured_cluster(certs: &Certificates) -> anyhow::Result<KafkaCluster> {
    let listener = Listener {
        name: "SECURE".into(),
        security_protocol: "SASL_SSL".into(),
        properties: vec![
            ("sasl.enabled.mechanisms".into(), "SCRAM-SHA-512".into()),
            (
                "scram-sha-512.sasl.jaas.config".into(),
                "org.apache.kafka.common.security.scram.ScramLoginModule required;".into(),
            ),
            ("ssl.keystore.type".into(), "PEM".into()),
            ("ssl.keystore.location".into(), certs.server_pem.display().to_string()),
        ],
    };
    let spec = ClusterSpec::nodes(1)
        .listener(listener)
        .format_arg("--add-scram")
        .format_arg(format!("SCRAM-SHA-512=[name={USER},password={PASSWORD}]"));
    KafkaCluster::start(spec).await
}

/// `KAFKA_CONFIG` for a SCRAM-SHA-512 user over TLS trusting `ca`.
fn kafka_config(password: &str, ca: &Path) -> String {
    format!(
        "security.protocol=SASL_SSL,sasl.mechanism=SCRAM-SHA-512,sasl.username={USER},sasl.password={password},\
         ssl.ca.location={}",
        ca.display()
    )
}

/// The same settings as a [`KafkaConfig`], for the test's own clients.
fn test_client(servers: &str, ca: &Path) -> anyhow::Result<KafkaConfig> {
    Ok(trialflow_outbox::config::from_args(&[
        "--bootstrap-servers",
        servers,
        "--kafka-config",
        &kafka_config(PASSWORD, ca),
    ])?)
}

/// `trialflow <args>` with only the given Kafka variables (none inherited from the test's
/// environment).
fn trialflow(args: &[&str], servers: &str, kafka_config: Option<&str>) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_trialflow"));
    command
        .args(args)
        .env("DATABASE_URL", database_url())
        .env("KAFKA_BOOTSTRAP_SERVERS", servers)
        .env_remove("KAFKA_CONFIG")
        .env_remove("KAFKA_PRODUCER_CONFIG")
        .env_remove("KAFKA_CONSUMER_CONFIG")
        .env("METRICS_ADDR", "")
        .env("SHUTDOWN_GRACE_SECS", "20")
        .env("RUST_LOG", "info,sqlx=warn,librdkafka=off,rdkafka=off")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(config) = kafka_config {
        command.env("KAFKA_CONFIG", config);
    }
    command
}

fn envelope<E: Event>(subject: &str) -> Envelope {
    let mut envelope = Envelope::new(E::NAME, STUDY, "test", Timestamp::from(Utc::now()));
    envelope.subject_id = Some(subject.to_string());
    envelope.site_id = Some("701".to_string());
    envelope
}

/// Screens and enrolls `subject` on the lifecycle topic, as the enrollment service would: the
/// validator decides a submission only for an enrolled subject.
async fn enroll(kafka: &KafkaConfig, names: &TopicNames, subject: &str) -> anyhow::Result<()> {
    let producer: FutureProducer =
        trialflow_outbox::publisher::producer_config(kafka, "test-enrollment").create()?;
    let screened = SubjectScreened {
        envelope: envelope::<SubjectScreened>(subject),
        screening_number: format!("SCR-{subject}"),
        time_zone: "Europe/Berlin".into(),
        age_years: Some(50),
        sex: None,
    };
    let enrolled = SubjectEnrolled {
        envelope: envelope::<SubjectEnrolled>(subject),
        randomization_number: "R-0001".into(),
        kit_number: "K-0001".into(),
    };
    let topic = names.name(topics::SUBJECT_LIFECYCLE);
    for (payload, event_id) in [
        (trialflow_schemas::encode(&screened)?, screened.envelope.event_id),
        (trialflow_schemas::encode(&enrolled)?, enrolled.envelope.event_id),
    ] {
        let event_id = event_id.to_string();
        let headers = rdkafka::message::OwnedHeaders::new()
            .insert(rdkafka::message::Header { key: "event_id", value: Some(event_id.as_str()) });
        let record = FutureRecord::to(&topic).key(subject).payload(&payload).headers(headers);
        producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// Waits for the line containing `needle` among `lines` (stdout and stderr of a child), up to
/// `within`; fails with what came so far when the child exits first.
async fn line_with(
    lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    seen: &mut Vec<String>,
    needle: &str,
    within: Duration,
) -> anyhow::Result<String> {
    if let Some(line) = seen.iter().find(|l| l.contains(needle)) {
        return Ok(line.clone());
    }
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, lines.recv()).await {
            Ok(Some(line)) => {
                seen.push(line.clone());
                if line.contains(needle) {
                    return Ok(line);
                }
            }
            Ok(None) => anyhow::bail!("trialflow ended before printing `{needle}`:\n{}", seen.join("\n")),
            Err(_) => anyhow::bail!("no `{needle}` within {within:?}:\n{}", seen.join("\n")),
        }
    }
}

/// Every line the child prints, stdout and stderr, as it comes.
fn lines_of(child: &mut tokio::process::Child) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let streams: Vec<Box<dyn tokio::io::AsyncRead + Unpin + Send>> = [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
    ]
    .into_iter()
    .flatten()
    .collect();
    for stream in streams {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stream).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_runs_over_sasl_ssl_with_scram_from_the_documented_variables() -> anyhow::Result<()> {
    trialflow_testkit::init_logs();
    let certs = Certificates::generate()?;
    let cluster = secured_cluster(&certs).await?;
    let servers =
        cluster.listener_bootstrap_servers().ok_or_else(|| anyhow::anyhow!("no SASL_SSL listener"))?;
    let mut run = trialflow(&["run"], &servers, Some(&kafka_config(PASSWORD, &certs.ca)))
        .env("PIPELINE_ISOLATED", "security")
        .env("TOPIC_PARTITIONS", "1")
        .spawn()?;
    let (mut lines, mut seen) = (lines_of(&mut run), Vec::new());
    let banner = line_with(&mut lines, &mut seen, "topic prefix `", WAIT).await?;
    let names = TopicNames::new(banner.split('`').nth(1).unwrap_or_default());
    let running = line_with(&mut lines, &mut seen, "trialflow is running", WAIT).await?;
    let gateway = running
        .split("ePRO gateway on ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .ok_or_else(|| anyhow::anyhow!("no gateway address in {running}"))?
        .to_string();

    let kafka = test_client(&servers, &certs.ca)?;
    let subject = format!("701-{}", &Uuid::new_v4().simple().to_string()[..8]);
    enroll(&kafka, &names, &subject).await?;
    let responses = TopicReader::new(&kafka, &names.name(topics::EPRO_RESPONSES), true)?;

    let catalogue = Catalogue::load(None)?;
    let phq9 = catalogue.questionnaire("PHQ-9", "1.0").map_err(|e| anyhow::anyhow!("PHQ-9 1.0: {e:?}"))?;
    let mut submission = reference::example_submission(phq9, None, Utc::now());
    submission.envelope.event_id = Uuid::now_v7();
    submission.envelope.study_id = STUDY.to_string();
    submission.envelope.site_id = Some("701".to_string());
    submission.envelope.subject_id = Some(subject.clone());
    submission.envelope.recorded_at = Timestamp::from(Utc::now());
    submission.submission_id = Uuid::new_v4();
    let reply = reqwest::Client::new()
        .post(format!("{gateway}/v1/submissions"))
        .bearer_auth("app-token")
        .json(&submission)
        .send()
        .await?;
    let status = reply.status();
    let body = reply.text().await?;
    assert_eq!(status, reqwest::StatusCode::ACCEPTED, "the gateway over SASL_SSL: {body}");

    let id = submission.submission_id;
    let accepted = move |m: &trialflow_outbox::kafka::ReadMessage| {
        matches!(trialflow_schemas::decode_any(&m.payload),
            Ok(AnyEvent::QuestionnaireResponseAccepted(a)) if a.submission_id == id)
    };
    let read = responses.read_until(WAIT, move |read| read.iter().any(accepted)).await?;
    let decision = read.iter().find(|m| accepted(m));
    assert!(
        decision.is_some(),
        "no QuestionnaireResponseAccepted for {id} on {} within {WAIT:?}; read {} message(s); trialflow said:\n{}",
        names.name(topics::EPRO_RESPONSES),
        read.len(),
        seen.join("\n")
    );

    let pid = run.id().ok_or_else(|| anyhow::anyhow!("trialflow run has exited"))?;
    Command::new("kill").args(["-TERM", &pid.to_string()]).status().await?;
    let status = tokio::time::timeout(Duration::from_secs(30), run.wait()).await??;
    assert!(status.success(), "trialflow run stopped with {status}");
    drop(certs.dir);
    Ok(())
}

/// A command the secured node must refuse, and what its output must say.
struct Case<'a> {
    what: &'static str,
    args: &'static [&'static str],
    kafka_config: Option<&'a str>,
    expected: Vec<&'static str>,
}

/// Runs `command` to its end, which must come within [`REFUSED_WITHIN`] and be a failure; returns
/// its output.
async fn refused(what: &str, mut command: Command) -> anyhow::Result<String> {
    let started = Instant::now();
    let mut child = command.spawn()?;
    let mut lines = lines_of(&mut child);
    let status = tokio::time::timeout(REFUSED_WITHIN, child.wait()).await;
    if status.is_err() {
        child.kill().await?;
    }
    let mut output = Vec::new();
    while let Some(line) = lines.recv().await {
        output.push(line);
    }
    let output = output.join("\n");
    let Ok(status) = status else {
        anyhow::bail!("{what}: still running after {REFUSED_WITHIN:?} (a retry loop?):\n{output}");
    };
    let status = status?;
    anyhow::ensure!(!status.success(), "{what} succeeded:\n{output}");
    eprintln!("{what}: {status} after {:?}", started.elapsed());
    Ok(output)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_plaintext_and_a_foreign_ca_stop_each_command_at_start() -> anyhow::Result<()> {
    trialflow_testkit::init_logs();
    let certs = Certificates::generate()?;
    let cluster = secured_cluster(&certs).await?;
    let servers =
        cluster.listener_bootstrap_servers().ok_or_else(|| anyhow::anyhow!("no SASL_SSL listener"))?;
    let wrong_password = kafka_config("not-the-password", &certs.ca);
    let foreign_ca = kafka_config(PASSWORD, &certs.other_ca);

    let refusal = ["refused the connection", "check KAFKA_CONFIG"];
    let cases = [
        Case {
            what: "relay, wrong password",
            args: &["relay"],
            kafka_config: Some(&wrong_password),
            expected: vec![
                "SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512",
            ],
        },
        Case {
            what: "consume epro-validation, wrong password",
            args: &["consume", "epro-validation"],
            kafka_config: Some(&wrong_password),
            expected: vec!["SASL authentication error", "invalid credentials"],
        },
        Case {
            what: "epro-gateway, wrong password",
            args: &["epro-gateway"],
            kafka_config: Some(&wrong_password),
            expected: vec!["SASL authentication error", "invalid credentials"],
        },
        Case {
            what: "relay, plaintext on the TLS listener",
            args: &["relay"],
            kafka_config: None,
            expected: vec!["another security.protocol", "APIVERSION_QUERY"],
        },
        Case {
            what: "relay, a CA that did not sign the broker",
            args: &["relay"],
            kafka_config: Some(&foreign_ca),
            expected: vec!["SSL handshake failed", "certificate verify failed"],
        },
    ];
    // All at once: each is a process of its own against the same node.
    let mut runs = Vec::new();
    for Case { what, args, kafka_config, mut expected } in cases {
        expected.extend(refusal);
        let mut command = trialflow(args, &servers, kafka_config);
        command.env("EPRO_GATEWAY_LISTEN", "127.0.0.1:0").env("EPRO_GATEWAY_TOKENS", "test-app-token");
        runs.push(tokio::spawn(async move {
            let output = refused(what, command).await?;
            for needle in &expected {
                assert!(output.contains(needle), "{what}: no `{needle}` in:\n{output}");
            }
            assert!(!output.contains(PASSWORD), "{what} shows the password:\n{output}");
            anyhow::Ok(())
        }));
    }
    let mut failures = Vec::new();
    for run in runs {
        match run.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(e.to_string()),
            Err(panic) => failures.push(panic.to_string()),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));

    // A setting librdkafka does not know stops the command before it connects, naming the variable.
    let unknown = refused(
        "relay, a setting librdkafka does not know",
        trialflow(&["relay"], &servers, Some("security.protocol=SASL_SSL,no.such.setting=1")),
    )
    .await?;
    assert!(
        unknown.contains("KAFKA_CONFIG (--kafka-config)") && unknown.contains("no.such.setting"),
        "{unknown}"
    );
    drop(cluster);
    drop(certs.dir);
    Ok(())
}
