//! TLS to PostgreSQL with only the documented setting, `DATABASE_URL`: a private server whose
//! certificate a CA made here with `openssl` signed, plain TCP refused. `sslmode=verify-full` with
//! that CA (`sslrootcert`) connects encrypted, and `trialflow migrate` works through it; a CA that
//! did not sign the server's certificate, and a client that does not encrypt, are refused with
//! the reason.

use std::process::Stdio;

use sqlx::{Connection, PgConnection};
use tokio::process::Command;
use trialflow_outbox::DatabaseConfig;
use trialflow_testkit::pg_server::PgServer;
use trialflow_testkit::tls::Certificates;

async fn connect(url: &str) -> anyhow::Result<PgConnection> {
    Ok(PgConnection::connect_with(&DatabaseConfig::new(url.to_string()).connect_options()?).await?)
}

async fn migrate(url: &str) -> anyhow::Result<(bool, String)> {
    let output = Command::new(env!("CARGO_BIN_EXE_trialflow"))
        .arg("migrate")
        .env("DATABASE_URL", url)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .await?;
    let text =
        String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    Ok((output.status.success(), text))
}

#[tokio::test]
async fn verify_full_connects_encrypted_and_a_foreign_ca_or_plain_tcp_is_refused() -> anyhow::Result<()> {
    let certs = Certificates::generate()?;
    let server = PgServer::start_tls(&certs)?;
    let ca = certs.ca.display().to_string();
    let url = server.url(&format!("sslmode=verify-full&sslrootcert={ca}"));

    let mut conn = connect(&url).await?;
    let (ssl, version): (bool, String) =
        sqlx::query_as("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&mut conn)
            .await?;
    assert!(ssl, "the session is encrypted");
    assert!(version.starts_with("TLSv1."), "{version}");

    let (ok, output) = migrate(&url).await?;
    assert!(ok, "trialflow migrate over verify-full: {output}");
    let schemas: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.schemata WHERE schema_name = 'enrollment'",
    )
    .fetch_one(&mut conn)
    .await?;
    assert_eq!(schemas, 1, "migrated through TLS");

    let foreign = server.url(&format!("sslmode=verify-full&sslrootcert={}", certs.other_ca.display()));
    let error = connect(&foreign).await.expect_err("a foreign CA is refused").to_string();
    eprintln!("a foreign CA: {error}");
    assert!(error.to_lowercase().contains("certificate"), "{error}");
    let (ok, output) = migrate(&foreign).await?;
    assert!(
        !ok && output.to_lowercase().contains("certificate"),
        "trialflow migrate with a foreign CA: {output}"
    );

    let plain = server.url("sslmode=disable");
    let error = connect(&plain).await.expect_err("plain TCP is refused").to_string();
    eprintln!("plain TCP: {error}");
    assert!(error.contains("no encryption"), "{error}\n{}", server.log());
    Ok(())
}
