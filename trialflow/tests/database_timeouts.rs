//! Every pool of the project connects through `DatabaseConfig::connect_options`: its sessions run
//! with the statement timeout, the idle-in-transaction timeout and the server-side TCP keepalives,
//! and the server enforces them.

use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use trialflow_outbox::DatabaseConfig;
use trialflow_testkit::database_url;

async fn show(pool: &sqlx::PgPool, setting: &str) -> anyhow::Result<String> {
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SHOW {setting}"))).fetch_one(pool).await?)
}

#[tokio::test]
async fn a_pool_from_the_database_config_has_the_session_limits() -> anyhow::Result<()> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(DatabaseConfig::new(database_url()).connect_options()?)
        .await?;
    assert_eq!(show(&pool, "statement_timeout").await?, "30s");
    assert_eq!(show(&pool, "idle_in_transaction_session_timeout").await?, "1min");
    // Over TCP (the local stack and every deployment); a Unix socket reports 0.
    assert_eq!(show(&pool, "tcp_keepalives_idle").await?, "60");
    assert_eq!(show(&pool, "tcp_keepalives_interval").await?, "10");
    assert_eq!(show(&pool, "tcp_keepalives_count").await?, "6");
    Ok(())
}

#[tokio::test]
async fn the_server_cancels_a_long_statement_and_ends_an_idle_transaction() -> anyhow::Result<()> {
    let database = DatabaseConfig {
        statement_timeout_ms: 300,
        idle_in_transaction_timeout_ms: 500,
        ..DatabaseConfig::new(database_url())
    };
    let pool = PgPoolOptions::new().max_connections(2).connect_with(database.connect_options()?).await?;

    let slow = sqlx::query("SELECT pg_sleep(5)").execute(&pool).await;
    let code = slow.as_ref().err().and_then(|e| e.as_database_error()).and_then(|e| e.code());
    assert_eq!(code.as_deref(), Some("57014"), "query_canceled expected: {slow:?}");

    // A client that opens a transaction and then goes quiet loses its session, and with it the
    // transaction (its locks, its xmin).
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT 1").execute(&mut *tx).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = sqlx::query("SELECT 1").execute(&mut *tx).await;
    assert!(after.is_err(), "the idle transaction's session was ended: {after:?}");
    drop(tx);
    // The pool replaces the ended session; the new one has the same limits.
    assert_eq!(show(&pool, "statement_timeout").await?, "300ms");
    Ok(())
}
