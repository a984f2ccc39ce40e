use sqlx::{AssertSqlSafe, Connection, PgConnection};

use crate::error::{OutboxError, Result};
use crate::schema::SchemaName;

/// Creates `schema` if needed and applies the outbox migrations inside it. Idempotent.
///
/// The migrations are written with unqualified names and run with `schema` first on the
/// search_path; their bookkeeping table is `<schema>._outbox_migrations`, so a service's own
/// migrations can keep sqlx's default table in the same schema.
pub async fn migrate(database_url: &str, schema: &SchemaName) -> Result<()> {
    // The outbox migrations, embedded at build time, applied once per service schema.
    run_in_schema(database_url, schema, sqlx::migrate!("./migrations"), "_outbox_migrations").await
}

/// Runs `migrator` with `schema` (created if needed) first on the search_path, keeping its
/// bookkeeping in `<schema>.<table>`.
pub async fn run_in_schema(
    database_url: &str,
    schema: &SchemaName,
    mut migrator: sqlx::migrate::Migrator,
    table: &str,
) -> Result<()> {
    let mut conn = PgConnection::connect(database_url).await?;
    sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA IF NOT EXISTS {schema}"))).execute(&mut conn).await?;
    sqlx::query(AssertSqlSafe(format!("SET search_path TO {schema}"))).execute(&mut conn).await?;
    migrator.dangerous_set_table_name(format!("{schema}.{table}"));
    migrator
        .run(&mut conn)
        .await
        .map_err(|source| OutboxError::Migrate { schema: schema.to_string(), source })?;
    conn.close().await?;
    Ok(())
}

/// Reads the shard count of `schema`'s outbox.
pub async fn shard_count(conn: &mut PgConnection, schema: &SchemaName) -> Result<u32> {
    let count: Option<i32> =
        sqlx::query_scalar(AssertSqlSafe(format!("SELECT shard_count FROM {schema}.outbox_settings")))
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| match &e {
                sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01") => {
                    OutboxError::NotMigrated(schema.to_string())
                }
                _ => OutboxError::Database(e),
            })?;
    let count = count.ok_or_else(|| OutboxError::NotMigrated(schema.to_string()))?;
    Ok(count as u32)
}

/// Changes the shard count of `schema`'s outbox. Refused while rows are pending, because rows
/// already hashed with the old count would be published beside rows hashed with the new one.
pub async fn set_shard_count(database_url: &str, schema: &SchemaName, shards: u32) -> Result<()> {
    if !(1..=1024).contains(&shards) {
        return Err(OutboxError::ShardCount {
            schema: schema.to_string(),
            reason: format!("{shards} is outside 1..=1024"),
        });
    }
    let mut conn = PgConnection::connect(database_url).await?;
    let mut tx = conn.begin().await?;
    // Writers insert under a row-share lock; this waits for them and keeps new ones out.
    sqlx::query(AssertSqlSafe(format!("LOCK TABLE {schema}.outbox IN EXCLUSIVE MODE")))
        .execute(&mut *tx)
        .await?;
    let current = shard_count(&mut tx, schema).await?;
    if current == shards {
        return Ok(());
    }
    let pending: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {schema}.outbox")))
        .fetch_one(&mut *tx)
        .await?;
    if pending > 0 {
        return Err(OutboxError::ShardCount {
            schema: schema.to_string(),
            reason: format!(
                "cannot change from {current} to {shards} while {pending} rows are unpublished; let the relay drain the outbox first"
            ),
        });
    }
    sqlx::query(AssertSqlSafe(format!("UPDATE {schema}.outbox_settings SET shard_count = $1")))
        .bind(shards as i32)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Applies a service's own migrations inside its schema (after [`migrate`] created the schema and
/// its outbox), with sqlx's bookkeeping in `<schema>._sqlx_migrations`.
pub async fn migrate_service(
    database_url: &str,
    schema: &SchemaName,
    migrator: sqlx::migrate::Migrator,
) -> Result<()> {
    migrate(database_url, schema).await?;
    run_in_schema(database_url, schema, migrator, "_sqlx_migrations").await
}
