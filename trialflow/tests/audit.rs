//! `trialflow audit verify|export` as the binary runs them, against a real PostgreSQL: exit code 0
//! and a line per trail while the chain is intact, non-zero and a line naming the service, the
//! seq and the kind of break once a record is deleted through SQL; the export as JSON lines (and
//! ODM XML) of the study's records only.

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
    assert!(out.contains(&format!("{schema} ({schema}): 4 record(s), chain intact; head seq 4")), "{out}");

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
    let _ = std::fs::remove_file(&file);
    assert!(xml.contains(r#"ODMVersion="1.3.2""#) && xml.contains(r#"<ClinicalData StudyOID="S1""#), "{xml}");
    assert_eq!(xml.matches("<AuditRecord ").count(), 3, "{xml}");
    assert!(
        xml.contains("<ReasonForChange>set-up</ReasonForChange>") && xml.contains("&lt;title&gt;"),
        "{xml}"
    );
    assert!(!xml.contains("<title>"), "escaped");

    let mut tx = svc.pool.begin().await?;
    sqlx::query("SET LOCAL session_replication_role = replica").execute(&mut *tx).await?;
    sqlx::query(AssertSqlSafe(format!("DELETE FROM {schema}.audit_trail WHERE seq = 2")))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    let (ok, out, err) = trialflow(&["audit", "verify", "--schema", &schema]).await?;
    assert!(!ok, "a broken chain verified: {out}");
    assert!(
        out.contains(&format!("{schema} ({schema}): BROKEN at seq 2 (deleted): record 2 was deleted")),
        "{out}"
    );
    assert!(err.contains("broken"), "{err}");

    let (ok, _, err) = trialflow(&["audit", "verify", "--service", "no-such-service"]).await?;
    assert!(!ok && err.contains("no service `no-such-service`"), "{err}");
    Ok(())
}
