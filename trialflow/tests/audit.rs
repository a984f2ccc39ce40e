//! `trialflow audit verify|export` as the binary runs them, against a real PostgreSQL: exit code 0
//! and a line per trail while the chain is intact, non-zero and a line naming the service, the
//! seq and the kind of break once a record is deleted through SQL; the export as JSON lines, and as
//! ODM XML valid against the CDISC ODM 1.3.2 XSD, of the study's records only.

use std::process::Stdio;

use serde_json::Value;
use sqlx::AssertSqlSafe;
use tokio::process::Command;
use trialflow_outbox::audit::{self, AuditRecord};
use trialflow_testkit::{TestService, database_url};

async fn trialflow(args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let output = Command::new(env!("CARGO_BIN_EXE_trialflow"))
        .args(args)
        .env("DATABASE_URL", database_url())
        .env("METRICS_ADDR", "")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .await?;
    let (out, err) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    Ok((output.status.success(), out.into_owned(), err.into_owned()))
}

/// Checks `file` against the CDISC ODM 1.3.2 XSD (`scripts/odm-validator.sh` installs the schema
/// as odmlib ships it, and xmlschema); fails, naming the script, when the tool is missing.
async fn odm_valid(file: &std::path::Path) -> anyhow::Result<()> {
    let tool =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/odm-validator/bin/odm-validate");
    anyhow::ensure!(
        tool.exists(),
        "{} is missing: run scripts/odm-validator.sh (`make odm-validator`)",
        tool.display()
    );
    let output = Command::new(&tool).arg(file).stdin(Stdio::null()).output().await?;
    let report = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(output.status.success(), "the ODM export is not valid ODM 1.3.2:\n{report}");
    Ok(())
}

#[tokio::test]
async fn verify_exits_non_zero_naming_the_broken_record_and_export_writes_json_lines() -> anyhow::Result<()> {
    let svc = TestService::new(None, 1).await?;
    let schema = svc.schema.to_string();
    for (study, n) in [("S1", 1), ("S2", 2), ("S1", 3), ("S1", 4)] {
        let mut tx = svc.pool.begin().await?;
        let record =
            AuditRecord::by_person("alice", "admin", "study.configured", "study", format!("{study}-{n}"))
                .study(study)
                .change("title", Value::Null, "a <title> & \"quotes\"\nover two lines")
                .unblinded_change("arms", Value::Null, serde_json::json!(["PBO", "ACT"]))
                .reason("set-up");
        audit::append(&mut tx, &svc.schema, &[record]).await?;
        tx.commit().await?;
    }

    let (ok, out, err) = trialflow(&["audit", "verify", "--schema", &schema]).await?;
    assert!(ok, "{out}{err}");
    assert!(out.contains(&format!("{schema} ({schema}): 4 record(s) in 8 chain(s), intact")), "{out}");
    assert!(
        out.contains("  chain 0 head seq 4 hash ") && out.contains("  chain 7 head seq 0 hash 0000"),
        "{out}"
    );

    let (ok, out, err) = trialflow(&["audit", "export", "--study", "S1", "--schema", &schema]).await?;
    assert!(ok, "{err}");
    let lines: Vec<Value> = out.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    assert_eq!(lines.iter().map(|l| l["seq"].as_i64().unwrap_or(0)).collect::<Vec<_>>(), [1, 3, 4]);
    assert!(lines.iter().all(|l| l["study_id"] == "S1" && l["hash"].is_string()), "{out}");
    assert!(out.contains("PBO"), "the full view keeps unblinded changes, marked");
    let (ok, blinded, _) =
        trialflow(&["audit", "export", "--study", "S1", "--schema", &schema, "--blinded"]).await?;
    assert!(ok && blinded.lines().count() == 3 && !blinded.contains("PBO"), "{blinded}");
    let file = std::env::temp_dir().join(format!("trialflow-audit-{schema}.xml"));
    let path = file.to_string_lossy().to_string();
    let (ok, _, err) = trialflow(&[
        "audit", "export", "--study", "S1", "--schema", &schema, "--format", "odm", "--output", &path,
    ])
    .await?;
    assert!(ok, "{err}");
    let xml = std::fs::read_to_string(&file)?;
    assert!(xml.contains(r#"ODMVersion="1.3.2""#) && xml.contains(r#"<ClinicalData StudyOID="S1""#), "{xml}");
    assert_eq!(xml.matches("<AuditRecord ").count(), 3, "{xml}");
    assert!(
        xml.contains("<ReasonForChange>set-up</ReasonForChange>") && xml.contains("&lt;title&gt;"),
        "{xml}"
    );
    assert!(!xml.contains("<title>"), "escaped");
    odm_valid(&file).await?;
    let _ = std::fs::remove_file(&file);

    let mut tx = svc.pool.begin().await?;
    sqlx::query("SET LOCAL session_replication_role = replica").execute(&mut *tx).await?;
    sqlx::query(AssertSqlSafe(format!("DELETE FROM {schema}.audit_trail WHERE chain = 0 AND seq = 2")))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    let (ok, out, err) = trialflow(&["audit", "verify", "--schema", &schema]).await?;
    assert!(!ok, "a broken chain verified: {out}");
    assert!(
        out.contains(&format!(
            "{schema} ({schema}): BROKEN in chain 0 at seq 2 (deleted): record 2 was deleted"
        )),
        "{out}"
    );
    assert!(err.contains("broken"), "{err}");

    let (ok, _, err) = trialflow(&["audit", "verify", "--service", "no-such-service"]).await?;
    assert!(!ok && err.contains("no service `no-such-service`"), "{err}");
    Ok(())
}

/// `trialflow dlq replay` as the binary runs it: the dead letter goes back to its topic and the
/// replay is recorded (operator, reason, where it went) in the given schema's trail; without a
/// reason nothing is replayed.
#[tokio::test]
async fn a_dead_letter_replay_is_recorded_with_who_and_why() -> anyhow::Result<()> {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let svc = TestService::new(Some(&trialflow_testkit::kafka()), 1).await?;
    let dlq_topic = format!("{}.dlq", svc.topic);
    trialflow_outbox::kafka::ensure_topics(&trialflow_testkit::kafka(), &[(&dlq_topic, 1)]).await?;
    let producer: FutureProducer =
        trialflow_outbox::publisher::producer_config(&trialflow_testkit::kafka(), "audit-test").create()?;
    let event_id = uuid::Uuid::now_v7().to_string();
    let headers = OwnedHeaders::new()
        .insert(Header { key: "event_id", value: Some(event_id.as_str()) })
        .insert(Header { key: "dlq.original_topic", value: Some(svc.topic.as_str()) })
        .insert(Header { key: "dlq.consumer", value: Some("somebody") })
        .insert(Header { key: "dlq.reason", value: Some("study not configured") });
    let record = FutureRecord::to(&dlq_topic).key("subject-1").payload("payload").headers(headers);
    let delivery = producer.send(record, std::time::Duration::from_secs(30)).await.map_err(|(e, _)| e)?;
    let schema = svc.schema.to_string();
    let (partition, offset) = (delivery.partition.to_string(), delivery.offset.to_string());
    let bootstrap = trialflow_testkit::kafka().bootstrap_servers;
    let replay = |extra: &'static [&'static str]| {
        let mut args =
            vec!["dlq", "replay", "--topic", &dlq_topic, "--partition", &partition, "--offset", &offset];
        args.extend_from_slice(&["--source", &schema, "--bootstrap-servers", &bootstrap]);
        args.extend_from_slice(extra);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        trialflow(&args).await
    };

    let (ok, _, err) = run(replay(&["--by", "alice", "--reason", " "])).await?;
    assert!(!ok && err.contains("--reason"), "{err}");
    let (ok, out, err) = run(replay(&["--by", "alice", "--reason", "study configured now"])).await?;
    assert!(ok, "{out}{err}");
    assert!(out.contains(&format!("audited in `{schema}`")), "{out}");

    let mut conn = svc.pool.acquire().await?;
    let records = audit::read(&mut conn, &svc.schema, None, None, 10).await?;
    let [r] = records.as_slice() else { panic!("{records:?}") };
    assert_eq!(
        (r.action.as_str(), r.actor_user.as_str(), r.actor_role.as_str(), r.reason.as_deref()),
        ("dead_letter.replayed", "alice", "operator", Some("study configured now"))
    );
    assert_eq!(r.entity_id, format!("{dlq_topic}/{partition}/{offset}"));
    assert!(r.changes.contains(&event_id) && r.changes.contains(&svc.topic), "{}", r.changes);
    Ok(())
}
