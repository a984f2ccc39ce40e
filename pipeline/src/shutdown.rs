//! Shutdown is an input, and it is bounded.
//!
//! Every long-running task takes a [`CancellationToken`] and stops when it is cancelled: a consumer
//! finishes or rolls back its batches (at most `CONSUMER_SHUTDOWN_GRACE_MS`) and leaves its group,
//! the relay waits for the acknowledgements in flight (at most `OUTBOX_SHUTDOWN_GRACE_MS`), the HTTP
//! services answer the requests in flight. That is the graceful part, and it depends on every
//! component keeping its word.
//!
//! The process does not depend on it: [`install`] returns the process's token, cancelled on the
//! first SIGINT or SIGTERM and, by `main`, when the command has returned (its error path
//! included). From that moment the process has [`ShutdownConfig::grace`] to exit. A watchdog on its
//! own thread, with its own small runtime (so neither a busy async runtime nor a blocking call —
//! an rdkafka close without a broker, a `spawn_blocking` read, the runtime's teardown waiting for
//! it — can hold it up), ends the process past the grace with status [`EXIT_GRACE_EXCEEDED`] and
//! an error line naming what was still [`running`]. A second signal ends it at once
//! ([`EXIT_SECOND_SIGNAL`]).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Exit status when the process had to be ended because something outlived the shutdown grace
/// (the convention of `timeout(1)`).
pub const EXIT_GRACE_EXCEEDED: i32 = 124;
/// Exit status after a second SIGINT/SIGTERM (128 + SIGINT, what shells report for Ctrl-C).
pub const EXIT_SECOND_SIGNAL: i32 = 130;

/// How long the process may take to stop.
#[derive(Debug, Clone, clap::Args)]
pub struct ShutdownConfig {
    /// Seconds the process has to stop once SIGINT/SIGTERM arrived or its command ended (an error
    /// included); past them it exits with status 124, naming what did not stop. It bounds the
    /// components' own graces (CONSUMER_SHUTDOWN_GRACE_MS, OUTBOX_SHUTDOWN_GRACE_MS, 10 s by
    /// default), so keep it above them.
    #[arg(
        long,
        env = "SHUTDOWN_GRACE_SECS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..=3600),
        global = true
    )]
    pub shutdown_grace_secs: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { shutdown_grace_secs: 30 }
    }
}

impl ShutdownConfig {
    pub fn grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    /// Warns when a component's own shutdown grace (`name`, e.g. `CONSUMER_SHUTDOWN_GRACE_MS`)
    /// is not comfortably below the process's: the watchdog would cut that component's graceful
    /// stop short.
    pub fn check_component_grace(&self, name: &str, component: Duration) {
        if component + COMPONENT_MARGIN > self.grace() {
            warn!(
                component_grace_ms = component.as_millis() as u64,
                shutdown_grace_secs = self.shutdown_grace_secs,
                "{name} plus {}s is above SHUTDOWN_GRACE_SECS: a slow graceful stop will be cut short.",
                COMPONENT_MARGIN.as_secs()
            );
        }
    }
}

/// What a component needs beyond its own grace to be gone: its last offset commit, leaving its
/// group, closing its connections. Also how long [`crate::Pipeline`] waits for a
/// component past the longest component grace.
pub const COMPONENT_MARGIN: Duration = Duration::from_secs(5);

/// Installs the signal handlers and the watchdog; returns the process's shutdown token. Call it
/// once, before the runtime starts anything.
pub fn install(config: &ShutdownConfig) -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    let watched = token.clone();
    let grace = config.grace();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("shutdown-watchdog".into())
        .spawn(move || runtime.block_on(watch(watched, grace, ready_tx)))?;
    // The handlers are in place before anything starts: a signal is never lost to the default
    // action half-way through a component's start.
    let _ = ready_rx.recv_timeout(Duration::from_secs(5));
    Ok(token)
}

/// The watchdog: cancels `token` on the first signal, then gives the process `grace`.
async fn watch(token: CancellationToken, grace: Duration, ready: std::sync::mpsc::Sender<()>) {
    let mut signals = Signals::new();
    let _ = ready.send(());
    tokio::select! {
        signal = signals.next() => {
            info!(signal, grace_secs = grace.as_secs(), "Shutdown requested; stopping every component.");
            token.cancel();
        }
        () = token.cancelled() => {}
    }
    tokio::select! {
        () = tokio::time::sleep(grace) => {
            let running = still_running();
            let running = if running.is_empty() {
                "nothing registered (work left on the runtime's blocking threads)".to_string()
            } else {
                running.join(", ")
            };
            error!(
                grace_secs = grace.as_secs(),
                still_running = %running,
                "Did not stop within SHUTDOWN_GRACE_SECS; exiting anyway. Still running: {running}."
            );
            std::process::exit(EXIT_GRACE_EXCEEDED);
        }
        signal = signals.next() => {
            let running = still_running().join(", ");
            warn!(signal, still_running = %running, "Second signal; exiting at once.");
            std::process::exit(EXIT_SECOND_SIGNAL);
        }
    }
}

/// SIGINT and SIGTERM (Ctrl-C elsewhere).
struct Signals {
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    #[cfg(unix)]
    fn new() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        let install = |kind: SignalKind, name: &str| {
            signal(kind)
                .inspect_err(|error| warn!(%error, "Cannot handle {name}; it keeps its default action."))
                .ok()
        };
        Self {
            interrupt: install(SignalKind::interrupt(), "SIGINT"),
            terminate: install(SignalKind::terminate(), "SIGTERM"),
        }
    }

    #[cfg(not(unix))]
    fn new() -> Self {
        Self {}
    }

    /// The name of the next signal; pending forever when none can be received.
    #[cfg(unix)]
    async fn next(&mut self) -> &'static str {
        async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) {
            let received = match signal {
                Some(s) => s.recv().await.is_some(),
                None => false,
            };
            if !received {
                std::future::pending::<()>().await;
            }
        }
        tokio::select! {
            () = recv(&mut self.interrupt) => "SIGINT",
            () = recv(&mut self.terminate) => "SIGTERM",
        }
    }

    #[cfg(not(unix))]
    async fn next(&mut self) -> &'static str {
        match tokio::signal::ctrl_c().await {
            Ok(()) => "Ctrl-C",
            Err(_) => std::future::pending().await,
        }
    }
}

/// Components running in this process, by name (a count per name): what the watchdog names.
static RUNNING: Mutex<BTreeMap<String, usize>> = Mutex::new(BTreeMap::new());

/// Registers `name` as running until the returned guard is dropped.
pub fn running(name: impl Into<String>) -> Running {
    let name = name.into();
    *RUNNING.lock().unwrap_or_else(|e| e.into_inner()).entry(name.clone()).or_default() += 1;
    Running { name }
}

/// Runs `future` registered as `name` (see [`running`]).
pub async fn tracked<F: Future>(name: impl Into<String>, future: F) -> F::Output {
    let _running = running(name);
    future.await
}

/// The components registered as running, sorted (`name ×n` when several share a name).
pub fn still_running() -> Vec<String> {
    let running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
    running.iter().map(|(name, n)| if *n == 1 { name.clone() } else { format!("{name} ×{n}") }).collect()
}

/// A registration of [`running`]; dropping it unregisters.
#[derive(Debug)]
#[must_use = "the component counts as running only while this guard lives"]
pub struct Running {
    name: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = running.get_mut(&self.name) {
            *n -= 1;
            if *n == 0 {
                running.remove(&self.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_components_are_named_until_their_guard_drops() {
        let name = format!("test component {}", uuid::Uuid::new_v4());
        let first = running(name.clone());
        let second = running(name.clone());
        assert!(still_running().contains(&format!("{name} ×2")));
        drop(first);
        assert!(still_running().contains(&name));
        drop(second);
        assert!(!still_running().iter().any(|r| r.starts_with(&name)));
    }
}
