//! Readiness of a process's long-running components, for the `GET /readyz` every trialflow
//! process serves beside `/metrics` (see `METRICS_ADDR`).
//!
//! A component — a relay per source, a consumer — registers under a name, says whether it is
//! ready now ([`ready`], [`not_ready`] with the reason) and hands over the database pool it needs
//! ([`watch_database`]). The process is ready when every registered component is and every watched
//! database answers `SELECT 1` within [`DATABASE_TIMEOUT`]: for a relay, its lease session is
//! connected; for a consumer, it has joined its group and been given its partitions (possibly
//! none: more instances than partitions). A process with no registered component (the HTTP
//! services, which serve their own `/readyz`, a one-shot command) is ready.

use std::collections::BTreeMap;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use sqlx::PgPool;

/// How long `/readyz` waits for a database to answer.
pub const DATABASE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
struct Registry {
    /// Each component's state: `None` when ready, else why not.
    components: BTreeMap<String, Option<String>>,
    /// The databases the components need, by component.
    databases: BTreeMap<String, PgPool>,
}

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(Mutex::default);

fn with<T>(f: impl FnOnce(&mut Registry) -> T) -> T {
    f(&mut REGISTRY.lock().unwrap_or_else(|e| e.into_inner()))
}

/// `component` works.
pub fn ready(component: &str) {
    with(|r| r.components.insert(component.to_string(), None));
}

/// `component` does not work now, because of `why`.
pub fn not_ready(component: &str, why: impl Into<String>) {
    with(|r| r.components.insert(component.to_string(), Some(why.into())));
}

/// `component` needs the database of `pool` (checked on each `/readyz`).
pub fn watch_database(component: &str, pool: PgPool) {
    with(|r| r.databases.insert(component.to_string(), pool));
}

/// `component` stopped: it no longer counts.
pub fn forget(component: &str) {
    with(|r| {
        r.components.remove(component);
        r.databases.remove(component);
    });
}

/// The readiness of every registered component: its name and `None` when ready, else why not.
pub async fn check() -> BTreeMap<String, Option<String>> {
    let (mut states, databases) = with(|r| (r.components.clone(), r.databases.clone()));
    for (component, pool) in databases {
        let answer = tokio::time::timeout(DATABASE_TIMEOUT, sqlx::query("SELECT 1").execute(&pool)).await;
        let why = match answer {
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => format!("database: {e}"),
            Err(_) => format!("database: no answer within {} s", DATABASE_TIMEOUT.as_secs()),
        };
        let state = states.entry(component).or_insert(None);
        *state = Some(match state.take() {
            Some(before) => format!("{before}; {why}"),
            None => why,
        });
    }
    states
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_process_is_ready_when_every_component_is() {
        let name = "health-test-component";
        not_ready(name, "joining the group");
        assert_eq!(check().await.get(name), Some(&Some("joining the group".to_string())));
        ready(name);
        assert_eq!(check().await.get(name), Some(&None));
        forget(name);
        assert!(!check().await.contains_key(name));
    }
}
