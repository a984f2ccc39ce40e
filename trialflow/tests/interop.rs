//! Foreign clients against a running pipeline: producers and consumers that another team would
//! write from `schemas/INTEROP.md` alone — Python (fastavro, confluent-kafka) and Java (Apache
//! Avro's `BinaryMessageEncoder`/`Decoder`, the Kafka client) in `interop/` — publish the example
//! input events of `interop/examples/` and read back what the pipeline made of them.
//!
//! Asserted: the three clients (Python, Java and our own codec) encode every example to the same
//! bytes; the documentation shows the very examples the test sends; the pipeline accepts the PHQ-9
//! submissions, stores the vital signs, raises the alerts the default rules call for; the foreign
//! consumers decode every output message (the fingerprints are the specification's) and find
//! those decisions; a foreign producer's record lands on the partition the relay uses for the same
//! key; headers that are missing or wrong are handled as INTEROP.md says.
//!
//! The tools come from `interop/setup.sh` (`make interop-setup`, run by `make test`); without them
//! the tests fail saying so.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, PgPool};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use trialflow_consumers::{enrollment, epro, kit_allocation, monitoring};
use trialflow_outbox::kafka::TopicReader;
use trialflow_pipeline::{Pipeline, PipelineConfig, consumer_groups};
use trialflow_schemas::topics;
use trialflow_simulation::settle::{true_end_offsets, wait_settled};
use trialflow_testkit::{SiteApi, database_url, init_logs, kafka, wait_until};

/// The examples' study and site; each client sends for its own subject.
const STUDY: &str = "CDISCPILOT01";
const SITE: &str = "701";
/// The subject of the example files, sent as they are by the Python producer.
const PYTHON_SUBJECT: &str = "01-701-1015";
/// The Java producer sends the examples for this subject, with new ids.
const JAVA_SUBJECT: &str = "01-701-1016";
/// The hostile cases (missing and wrong headers) are about this subject.
const HOSTILE_SUBJECT: &str = "01-701-1017";
const WAIT: Duration = Duration::from_secs(90);
/// The most a foreign program may take (the Java source launcher compiles first: a few seconds).
const PROGRAM_TIMEOUT: Duration = Duration::from_secs(90);
const EXAMPLES: [&str; 3] = ["VitalSignRecorded", "AdverseEventReported", "QuestionnaireResponseSubmitted"];
/// What the default rules raise for the examples (a systolic 164 mm[Hg]; a serious grade-3 AE;
/// a PHQ-9 with item 9 above 0).
const EXAMPLE_ALERTS: [&str; 4] = ["CTCAE-HTN-G3", "SAE", "AE-GRADE-3", "PHQ9-ITEM9"];
const CONTENT_TYPE: &str = "application/vnd.apache.avro+single-object";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The installed foreign-client toolkit, or an error saying how to install it.
struct Tools {
    python: PathBuf,
    java_classpath: String,
}

impl Tools {
    fn installed() -> anyhow::Result<Self> {
        let root = repo();
        let install = "the interop tools are not installed: run `interop/setup.sh` (`make interop-setup`)";
        let python = root.join(".tools/interop/venv/bin/python");
        ensure!(python.is_file(), "{} is missing; {install}", python.display());
        let libs = root.join(".tools/interop/java/libs");
        let pinned = std::fs::read_to_string(root.join("interop/java/checksums.sha256"))?;
        for jar in pinned.lines().filter_map(|l| l.split_whitespace().nth(1)) {
            ensure!(libs.join(jar).is_file(), "{} is missing; {install}", libs.join(jar).display());
        }
        // The source launcher compiles: a JDK, not only a runtime.
        for jdk in ["java", "javac"] {
            let found = std::process::Command::new(jdk).arg("-version").output();
            ensure!(found.is_ok_and(|o| o.status.success()), "no `{jdk}` on PATH; {install}");
        }
        Ok(Self { python, java_classpath: format!("{}/*", libs.display()) })
    }

    /// Runs an interop Python program with `args`; its JSON lines.
    async fn python(&self, program: &str, args: &[&str]) -> anyhow::Result<Vec<Value>> {
        let mut command = Command::new(&self.python);
        command.arg(format!("interop/python/{program}")).args(args);
        run(program, command).await
    }

    /// Runs an interop Java program (a single-file source) with `args`; its JSON lines.
    async fn java(&self, program: &str, args: &[&str]) -> anyhow::Result<Vec<Value>> {
        let mut command = Command::new("java");
        command.arg("-cp").arg(&self.java_classpath).arg(format!("interop/java/{program}")).args(args);
        run(program, command).await
    }
}

async fn run(what: &str, mut command: Command) -> anyhow::Result<Vec<Value>> {
    command.current_dir(repo()).kill_on_drop(true);
    let output = tokio::time::timeout(PROGRAM_TIMEOUT, command.output())
        .await
        .with_context(|| format!("{what} did not finish within {PROGRAM_TIMEOUT:?}"))?
        .with_context(|| format!("{what} did not start"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(output.status.success(), "{what} failed ({}):\n{stderr}\n{stdout}", output.status);
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("{what} printed `{l}`")))
        .collect()
}

fn example(name: &str) -> anyhow::Result<Value> {
    let path = repo().join(format!("interop/examples/{name}.json"));
    Ok(serde_json::from_str(&std::fs::read_to_string(&path).with_context(|| path.display().to_string())?)?)
}

/// Our codec's bytes for the example `name` (the JSON form is the Rust type's serde form).
fn encoded_by_us(name: &str) -> anyhow::Result<Vec<u8>> {
    use trialflow_schemas::{AdverseEventReported, QuestionnaireResponseSubmitted, VitalSignRecorded};
    let value = example(name)?;
    Ok(match name {
        "VitalSignRecorded" => {
            trialflow_schemas::encode(&serde_json::from_value::<VitalSignRecorded>(value)?)?
        }
        "AdverseEventReported" => {
            trialflow_schemas::encode(&serde_json::from_value::<AdverseEventReported>(value)?)?
        }
        "QuestionnaireResponseSubmitted" => {
            trialflow_schemas::encode(&serde_json::from_value::<QuestionnaireResponseSubmitted>(value)?)?
        }
        other => bail!("no example {other}"),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn python_java_and_our_codec_encode_the_examples_to_the_same_bytes() -> anyhow::Result<()> {
    let tools = Tools::installed()?;
    let python = tools.python("produce.py", &["--print-hex"]).await?;
    let java = tools.java("Produce.java", &["--print-hex"]).await?;
    for name in EXAMPLES {
        let ours = hex(&encoded_by_us(name)?);
        for (client, lines) in [("Python (fastavro)", &python), ("Java (BinaryMessageEncoder)", &java)] {
            let theirs = lines.iter().find(|l| l["event"] == name).and_then(|l| l["hex"].as_str());
            assert_eq!(theirs, Some(ours.as_str()), "{name}: {client} and trialflow's codec differ");
        }
    }
    Ok(())
}

/// The JSON block after each `<!-- example: interop/examples/<Event>.json -->` in INTEROP.md is
/// that file, and every example is shown; the byte walk-through after `<!-- bytes: ... -->`
/// covers the example's encoding exactly.
#[test]
fn interop_md_shows_the_examples_the_tests_send() -> anyhow::Result<()> {
    let doc = std::fs::read_to_string(repo().join("schemas/INTEROP.md"))?;
    let mut shown = BTreeSet::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        let Some(file) = line.trim().strip_prefix("<!-- example: ").and_then(|r| r.strip_suffix(" -->"))
        else {
            continue;
        };
        ensure!(
            lines.next().map(str::trim) == Some("```json"),
            "a ```json block must follow the {file} marker"
        );
        let block: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
        let in_doc: Value =
            serde_json::from_str(&block.join("\n")).with_context(|| format!("{file} in INTEROP.md"))?;
        let on_disk: Value = serde_json::from_str(&std::fs::read_to_string(repo().join(file))?)?;
        assert_eq!(in_doc, on_disk, "INTEROP.md shows another {file} than the file the tests send");
        shown.insert(file.to_string());
    }
    for name in EXAMPLES {
        assert!(shown.contains(&format!("interop/examples/{name}.json")), "INTEROP.md does not show {name}");
    }

    let marker = "<!-- bytes: interop/examples/VitalSignRecorded.json -->";
    let start = doc.find(marker).context("INTEROP.md has no byte walk-through of the vital sign")?;
    let block = doc[start + marker.len()..]
        .split("```")
        .nth(1)
        .context("a ``` block must follow the walk-through marker")?;
    let bytes = encoded_by_us("VitalSignRecorded")?;
    let mut at = 0;
    for line in block.lines().skip(1) {
        let mut tokens = line.split_whitespace().peekable();
        while let Some(token) = tokens.peek() {
            if let Some(n) = token.strip_prefix('<') {
                let n: usize = n.parse().with_context(|| format!("walk-through line `{line}`"))?;
                tokens.next();
                ensure!(
                    tokens.next() == Some("bytes>"),
                    "walk-through line `{line}`: `<{n} bytes>` expected"
                );
                at += n;
            } else if token.len() == 2 && token.chars().all(|c| c.is_ascii_hexdigit()) {
                let byte = u8::from_str_radix(token, 16)?;
                assert_eq!(bytes.get(at), Some(&byte), "walk-through byte {at} (line `{line}`)");
                at += 1;
                tokens.next();
            } else {
                break;
            }
        }
    }
    assert_eq!(at, bytes.len(), "the walk-through covers every byte of the encoded example");
    Ok(())
}

/// One message a foreign producer had acknowledged.
#[derive(Debug, Clone, Deserialize)]
struct Sent {
    event: String,
    topic: String,
    key: String,
    event_id: String,
    submission_id: Option<String>,
    partition: i32,
    offset: i64,
}

fn sent(lines: Vec<Value>) -> anyhow::Result<Vec<Sent>> {
    lines.into_iter().map(|l| Ok(serde_json::from_value(l)?)).collect()
}

fn one<'a>(sent: &'a [Sent], event: &str) -> anyhow::Result<&'a Sent> {
    sent.iter().find(|s| s.event == event).with_context(|| format!("{event} was not acknowledged: {sent:?}"))
}

struct Site {
    api: SiteApi,
}

impl Site {
    async fn post(&self, token: &str, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.api.post(token, path, body).await
    }

    /// The study, and site 701 with a kit per arm for each of `subjects` subjects.
    async fn set_up(&self, subjects: usize) -> anyhow::Result<()> {
        let study = json!({
            "study_id": STUDY, "title": "Interop",
            "arms": [{"arm_code": "PBO", "name": "Placebo", "ratio": 1},
                     {"arm_code": "XAN_HI", "name": "High dose", "ratio": 1}],
            "stratification_factors": [{"factor": "AGEGR", "values": ["<65", ">=65"]}],
            "eligibility": {"min_age_years": 50, "max_age_years": 89,
                            "criteria": [{"criterion_id": "INC01", "description": "Probable Alzheimer's disease"}]},
            "randomization": {"seed": 7, "block_multiples": [1], "slots_per_stratum": 20, "warn_slots_left": 1},
            "kit_types": [{"kit_type": "TTS", "do_not_dispense_days": 14, "do_not_count_days": 7,
                           "low_stock_threshold": 0}],
            "enrollment_kit_type": "TTS"
        });
        self.post("admin-token", "", &study).await?;
        let site = json!({"site_id": SITE, "name": "Site 701", "time_zone": "America/New_York"});
        self.post("admin-token", &format!("/{STUDY}/sites"), &site).await?;
        let kits: Vec<Value> = ["PBO", "XAN_HI"]
            .iter()
            .enumerate()
            .flat_map(|(a, arm)| {
                (0..subjects).map(move |i| {
                    let sequence = a * subjects + i + 1;
                    json!({"kit_number": format!("K{sequence:04}"), "sequence_number": sequence,
                           "kit_type": "TTS", "lot": "L1", "expiry_date": "2099-12-31", "arm_code": arm})
                })
            })
            .collect();
        let shipment = json!({"shipment_id": "SH-1", "kits": kits});
        self.post("pharmacist-token", &format!("/{STUDY}/sites/{SITE}/shipments"), &shipment).await?;
        Ok(())
    }

    /// Screens, consents and requests the enrollment of `subjects`.
    async fn enroll(&self, subjects: &[&str]) -> anyhow::Result<()> {
        let today = Utc::now().date_naive().to_string();
        for (i, subject) in subjects.iter().enumerate() {
            let screening = json!({"site_id": SITE, "screening_number": format!("SCR-{i}"),
                                   "subject_id": subject, "age_years": 60, "sex": "F",
                                   "criteria": {"INC01": true}});
            self.post("site-token", &format!("/{STUDY}/subjects"), &screening).await?;
            let path = format!("/{STUDY}/subjects/{subject}");
            self.post(
                "site-token",
                &format!("{path}/consent"),
                &json!({"consent_version": "v1", "signed_at": today}),
            )
            .await?;
            self.post(
                "site-token",
                &format!("{path}/enrollment-requests"),
                &json!({"strata": {"AGEGR": "<65"}}),
            )
            .await?;
        }
        Ok(())
    }
}

/// What ePRO validation decided on one submission, from its tables.
#[derive(Debug, sqlx::FromRow)]
struct Decision {
    outcome: String,
    total_score: Option<i32>,
    flagged_items: Option<Vec<String>>,
    late_sync: Option<bool>,
    received_at: Option<DateTime<Utc>>,
}

fn instant(at: &str) -> anyhow::Result<DateTime<Utc>> {
    Ok(DateTime::parse_from_rfc3339(at)?.to_utc())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_producers_and_consumers_follow_interop_md() -> anyhow::Result<()> {
    init_logs();
    let tools = Tools::installed()?;
    let config = PipelineConfig::isolated("interop", &database_url(), &kafka())?;
    let (schemas, names) = (config.schemas.clone(), config.topics.clone());
    let groups = consumer_groups(&config);
    let dlq_suffix = config.consumer.dlq_suffix.clone();
    let shutdown = CancellationToken::new();
    let pipeline = Pipeline::start(config, &shutdown).await?;
    let pool = PgPool::connect(&database_url()).await?;

    // A study with an enrolled subject per client: ePRO validation decides only on enrolled ones.
    let site = Site { api: SiteApi::new(pipeline.site_api_addr()) };
    let subjects = [PYTHON_SUBJECT, JAVA_SUBJECT, HOSTILE_SUBJECT];
    site.set_up(subjects.len()).await?;
    // Kit allocation must know the kits before the first enrollment request, or the subject is put
    // on hold first (and a HOLD-NO-KIT alert raised) until the shipment arrives.
    let kits = format!("SELECT count(*) FROM {}.kit", schemas[kit_allocation::NAME]);
    wait_until("the kits known to kit allocation", WAIT, || async {
        let known: i64 = sqlx::query_scalar(AssertSqlSafe(kits.as_str())).fetch_one(&pool).await?;
        Ok(known == 2 * subjects.len() as i64)
    })
    .await?;
    site.enroll(&subjects).await?;
    let enrolled =
        format!("SELECT count(*) FROM {}.subject WHERE status = 'enrolled'", schemas[enrollment::NAME]);
    wait_until("the three subjects enrolled", WAIT, || async {
        Ok(sqlx::query_scalar::<_, i64>(AssertSqlSafe(enrolled.as_str())).fetch_one(&pool).await? == 3)
    })
    .await?;

    // The foreign producers: Python sends the example files as they are, Java for its own subject.
    let bootstrap = kafka().bootstrap_servers;
    let prefix = names.prefix().to_string();
    let common = ["--bootstrap-servers", bootstrap.as_str(), "--topic-prefix", prefix.as_str()];
    let python = sent(tools.python("produce.py", &common).await?)?;
    let java_args = [&common[..], &["--subject", JAVA_SUBJECT, "--new-ids"]].concat();
    let java = sent(tools.java("Produce.java", &java_args).await?)?;
    for (client, sent, subject) in [("Python", &python, PYTHON_SUBJECT), ("Java", &java, JAVA_SUBJECT)] {
        assert_eq!(sent.len(), 3, "{client} sent every example: {sent:?}");
        for s in sent {
            assert_eq!(s.key, subject, "{client} keys by subject id");
            assert!(
                s.topic.starts_with(&prefix),
                "{client} publishes to the deployment's topics: {}",
                s.topic
            );
        }
    }
    for name in EXAMPLES {
        let file = example(name)?;
        assert_eq!(
            one(&python, name)?.event_id,
            file["envelope"]["event_id"],
            "Python sent the file's {name}"
        );
    }

    // Hostile headers (INTEROP.md, "Headers"), each for the third subject, with new ids.
    let hostile = |only: &'static str, extra: &'static [&'static str]| {
        let mut args: Vec<&str> = common.to_vec();
        args.extend(["--subject", HOSTILE_SUBJECT, "--new-ids", "--only", only]);
        args.extend(extra);
        args
    };
    // No event_id header: monitoring deduplicates on it and dead-letters the reading.
    let no_id_vital = sent(
        tools.python("produce.py", &hostile("VitalSignRecorded", &["--omit-header", "event_id"])).await?,
    )?;
    // No content-type, a wrong event_type: neither is read; the payload decides.
    let wrong_type_ae = sent(
        tools
            .python(
                "produce.py",
                &hostile(
                    "AdverseEventReported",
                    &["--omit-header", "content-type", "--header", "event_type=VitalSignRecorded"],
                ),
            )
            .await?,
    )?;
    // ePRO validation takes the event id from the envelope when the header is missing.
    let phq = "QuestionnaireResponseSubmitted";
    let no_id_phq = sent(tools.python("produce.py", &hostile(phq, &["--omit-header", "event_id"])).await?)?;
    // A received_at that is not RFC 3339 is ignored: arrival is the envelope's recorded_at.
    let garbled =
        sent(tools.python("produce.py", &hostile(phq, &["--header", "received_at=yesterday"])).await?)?;
    // A valid received_at three days after authoring: the arrival, so a late sync.
    const LATE: &str = "received_at=2014-01-05T15:00:00.000000Z";
    let late = sent(tools.python("produce.py", &hostile(phq, &["--header", LATE])).await?)?;

    // The decisions, from the services' tables.
    let recorded_at = instant("2014-01-02T15:02:00Z")?; // the PHQ-9 example's envelope.recorded_at
    let expected_phq = [
        (one(&python, phq)?, false, recorded_at),
        (one(&java, phq)?, false, recorded_at),
        (one(&no_id_phq, phq)?, false, recorded_at),
        (one(&garbled, phq)?, false, recorded_at),
        (one(&late, phq)?, true, instant(LATE.trim_start_matches("received_at="))?),
    ];
    let decision = format!(
        "SELECT s.outcome, r.total_score, r.flagged_items, r.late_sync, r.received_at
         FROM {0}.submission s LEFT JOIN {0}.response r USING (submission_id) WHERE s.submission_id = $1::uuid",
        schemas[epro::NAME]
    );
    for (s, late_sync, received_at) in expected_phq {
        let id = s.submission_id.clone().context("a PHQ-9 line without submission_id")?;
        let decided = || async {
            let query = sqlx::query_as::<_, Decision>(AssertSqlSafe(decision.as_str())).bind(&id);
            anyhow::Ok(query.fetch_optional(&pool).await?)
        };
        wait_until(&format!("a decision on submission {id}"), WAIT, || async {
            Ok(decided().await?.is_some())
        })
        .await?;
        let d = decided().await?.context("the decision went away")?;
        assert_eq!(d.outcome, "accepted", "submission {id} ({s:?}): {d:?}");
        assert_eq!(d.total_score, Some(9), "{d:?}");
        assert_eq!(d.flagged_items, Some(vec!["44260-8".to_string()]), "{d:?}");
        assert_eq!((d.late_sync, d.received_at), (Some(late_sync), Some(received_at)), "submission {id}");
    }

    let alerts = format!("SELECT subject_id, rule_id FROM {}.alert", schemas[monitoring::NAME]);
    let mut expected_alerts: BTreeSet<(String, String)> = BTreeSet::new();
    for subject in [PYTHON_SUBJECT, JAVA_SUBJECT] {
        expected_alerts.extend(EXAMPLE_ALERTS.iter().map(|r| (subject.to_string(), r.to_string())));
    }
    // The third subject's reading was dead-lettered: no hypertension alert.
    expected_alerts.extend(EXAMPLE_ALERTS[1..].iter().map(|r| (HOSTILE_SUBJECT.to_string(), r.to_string())));
    let raised = || async {
        let rows =
            sqlx::query_as::<_, (String, String)>(AssertSqlSafe(alerts.as_str())).fetch_all(&pool).await?;
        anyhow::Ok(rows.into_iter().collect::<BTreeSet<(String, String)>>())
    };
    let waited = wait_until("the alerts raised", WAIT, || async {
        Ok(raised().await?.len() >= expected_alerts.len())
    })
    .await;
    let raised = raised().await?;
    waited.with_context(|| format!("raised so far: {raised:?}"))?;
    assert_eq!(raised, expected_alerts);

    let stored = format!("SELECT event_id::text FROM {}.observation", schemas[monitoring::NAME]);
    let stored: BTreeSet<String> =
        sqlx::query_scalar(AssertSqlSafe(stored)).fetch_all(&pool).await?.into_iter().collect();
    let vitals = [one(&python, "VitalSignRecorded")?, one(&java, "VitalSignRecorded")?];
    assert_eq!(stored, vitals.iter().map(|s| s.event_id.clone()).collect(), "the readings monitoring stored");

    let no_id = one(&no_id_vital, "VitalSignRecorded")?.clone();
    let dlq = names.dead_letter(topics::CLINICAL_OBSERVATIONS, &dlq_suffix);
    let letters = TopicReader::new(&kafka(), &dlq, true)?
        .read_until(WAIT, move |read| {
            read.iter().any(|m| {
                m.header("dlq.original_offset") == Some(no_id.offset.to_string().as_str())
                    && m.header("dlq.consumer") == Some("monitoring")
            })
        })
        .await?;
    let no_id = one(&no_id_vital, "VitalSignRecorded")?;
    // Every consumer of the clinical topic (monitoring and risk) dead-letters it on its own.
    let letter = letters
        .iter()
        .find(|m| {
            m.header("dlq.original_offset") == Some(no_id.offset.to_string().as_str())
                && m.header("dlq.original_partition") == Some(no_id.partition.to_string().as_str())
                && m.header("dlq.consumer") == Some("monitoring")
        })
        .context("monitoring did not dead-letter the reading without an event_id header")?;
    let reason = letter.header("dlq.reason").unwrap_or_default();
    assert!(reason.contains("missing event_id header"), "dead-letter reason: {reason}");
    // The adverse event with the wrong headers raised the third subject's SAE and AE-GRADE-3 above.
    one(&wrong_type_ae, "AdverseEventReported")?;

    // The foreign consumers read every output message of the two topics and decode it.
    wait_settled(&pool, &groups, &schemas.sources(), &kafka(), WAIT, |_| {}).await?;
    let outputs = [names.name(topics::EPRO_RESPONSES), names.name(topics::ALERTS)];
    let ends = true_end_offsets(&kafka(), &outputs).await?;
    let total: i64 = ends.values().map(|(first, end)| end - first).sum();
    let expect = total.to_string();
    let topics_arg = outputs.join(",");
    let read_args = [
        "--bootstrap-servers",
        bootstrap.as_str(),
        "--topics",
        topics_arg.as_str(),
        "--expect",
        expect.as_str(),
        "--timeout",
        "60",
    ];
    let python_read = tools.python("consume.py", &read_args).await?;
    let java_read = tools.java("Consume.java", &read_args).await?;

    let vectors: Value = serde_json::from_str(&std::fs::read_to_string(
        repo().join("schemas/test-vectors/single-object.json"),
    )?)?;
    // Where each producer put a subject's submission; the relay keys the decision by the same
    // subject, on a topic with as many partitions.
    let accepted_partitions: BTreeMap<&str, i32> = [
        (PYTHON_SUBJECT, one(&python, phq)?.partition),
        (JAVA_SUBJECT, one(&java, phq)?.partition),
        (HOSTILE_SUBJECT, one(&late, phq)?.partition),
    ]
    .into();
    for (client, read) in [("Python (fastavro)", &python_read), ("Java (BinaryMessageDecoder)", &java_read)] {
        assert_eq!(read.len() as i64, total, "{client} read every output message");
        let mut accepted = BTreeSet::new();
        let mut alerts = BTreeSet::new();
        for m in read {
            assert!(m.get("error").is_none(), "{client} could not decode {m}");
            let event = m["event"].as_str().unwrap_or_default();
            let spec = &vectors["fingerprints"][event]["fingerprint_le_bytes_hex"];
            assert_eq!(
                &m["fingerprint"], spec,
                "{client}: {event} written with the specification's fingerprint"
            );
            let value = &m["value"];
            assert_eq!(m["headers"]["event_id"], value["envelope"]["event_id"], "{client}: event_id header");
            assert_eq!(m["headers"]["event_type"], event, "{client}: event_type header");
            assert_eq!(m["headers"]["content-type"], CONTENT_TYPE, "{client}: content-type header");
            match event {
                "QuestionnaireResponseAccepted" => {
                    assert_eq!(value["total_score"], 9, "{client}: {m}");
                    assert_eq!(value["severity_band"], "mild", "{client}: {m}");
                    assert_eq!(value["window_status"], "UNSCHEDULED", "{client}: {m}");
                    let subject = value["envelope"]["subject_id"].as_str().unwrap_or_default();
                    assert_eq!(m["key"], subject, "{client}: epro.responses.v1 is keyed by subject");
                    if let Some(partition) = accepted_partitions.get(subject) {
                        assert_eq!(
                            m["partition"], *partition,
                            "{client}: the relay put {subject}'s decision on another partition than the \
                             foreign producer put its submission (partitioner)"
                        );
                    }
                    accepted.insert(value["submission_id"].as_str().unwrap_or_default().to_string());
                }
                "QuestionnaireResponseRejected" => panic!("{client}: a submission was rejected: {m}"),
                "AlertRaised" => {
                    let subject = value["envelope"]["subject_id"].as_str().unwrap_or_default().to_string();
                    alerts.insert((subject, value["rule_id"].as_str().unwrap_or_default().to_string()));
                }
                _ => {}
            }
        }
        let submissions: BTreeSet<String> =
            expected_phq.iter().filter_map(|(s, _, _)| s.submission_id.clone()).collect();
        assert_eq!(accepted, submissions, "{client}: the accepted submissions");
        assert_eq!(alerts, expected_alerts, "{client}: the alerts raised");
    }

    shutdown.cancel();
    pipeline.wait().await
}
