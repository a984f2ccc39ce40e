//! `trialflow migrate` on an empty database creates the services' schemas and nothing else: no
//! test fixture (the relay tests' `workload` service lives in the test kit and is migrated into
//! fresh schemas by the tests themselves), and the relay's default sources are exactly the schemas
//! it created. The database is a new one on the local stack's server, dropped afterwards.

use std::collections::BTreeSet;

use anyhow::{Context, bail};
use clap::Parser;
use sqlx::{AssertSqlSafe, PgPool};
use trialflow::cli::{Cli, Command, relay_with_default_sources, service_schemas};
use trialflow_testkit::{database_url, init_logs, unique};

/// `url` naming the database `name` instead of its own.
fn with_database(url: &str, name: &str) -> String {
    let (server, rest) = url.rsplit_once('/').unwrap_or((url, ""));
    let query = rest.split_once('?').map(|(_, q)| format!("?{q}")).unwrap_or_default();
    format!("{server}/{name}{query}")
}

/// The schemas of the database behind `url`, PostgreSQL's own and `public` left out.
async fn schemas(url: &str) -> anyhow::Result<BTreeSet<String>> {
    let pool = PgPool::connect(url).await?;
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace
         WHERE nspname <> 'public' AND nspname <> 'information_schema' AND nspname NOT LIKE 'pg\\_%'",
    )
    .fetch_all(&pool)
    .await?;
    pool.close().await;
    Ok(names.into_iter().collect())
}

/// The relay's sources when neither `--sources` nor `OUTBOX_SOURCES` is given.
fn relay_default_sources() -> anyhow::Result<BTreeSet<String>> {
    let cli = Cli::try_parse_from(["trialflow", "relay"])?;
    let Command::Relay(config) = cli.command else { bail!("`trialflow relay` parsed as another command") };
    Ok(relay_with_default_sources(config).sources.iter().map(|s| s.to_string()).collect())
}

#[tokio::test]
async fn migrate_on_an_empty_database_creates_the_service_schemas_and_no_fixture() -> anyhow::Result<()> {
    init_logs();
    let server = PgPool::connect(&database_url()).await.context("connecting (is `make up` running?)")?;
    let database = unique("migrate");
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {database}"))).execute(&server).await?;
    let url = with_database(&database_url(), &database);
    let checked = async {
        let cli = Cli::try_parse_from(["trialflow", "migrate", "--database-url", url.as_str()])?;
        let Command::Migrate(args) = cli.command else {
            bail!("`trialflow migrate` parsed as another command")
        };
        trialflow::cli::migrate(&args).await?;
        // Twice: migrate is idempotent.
        trialflow::cli::migrate(&args).await?;
        let created = schemas(&url).await?;
        let services: BTreeSet<String> = service_schemas().iter().map(|s| s.to_string()).collect();
        assert!(!services.is_empty());
        assert!(!created.contains("workload"), "migrate created the workload fixture's schema: {created:?}");
        assert_eq!(created, services, "migrate creates exactly the service schemas");
        assert_eq!(relay_default_sources()?, services, "the relay's default sources are the service schemas");
        anyhow::Ok(())
    }
    .await;
    sqlx::query(AssertSqlSafe(format!("DROP DATABASE {database} WITH (FORCE)"))).execute(&server).await?;
    checked
}
