//! Why the site API could not start or stopped ([`SiteApiError`]), and the conflicts a concurrent
//! request can cause. What a request gets back is a [`trialflow_http::ApiError`], the body every
//! trialflow HTTP service answers with.

use std::net::SocketAddr;

use trialflow_http::ApiError;

/// The constraint a statement violated, when it failed on a unique or primary key: a concurrent
/// request won the race that the pre-checks of a command cannot see.
pub(crate) fn unique_violation(e: &sqlx::Error) -> Option<&str> {
    match e {
        sqlx::Error::Database(db) if db.is_unique_violation() => db.constraint(),
        _ => None,
    }
}

/// Maps the error of a write that a concurrent request can beat: a violation of `constraint` is
/// answered `conflict()`, as the command's pre-check would have had it seen the other request;
/// any other error as usual.
pub(crate) fn conflict_on(
    constraint: &'static str,
    conflict: impl FnOnce() -> ApiError,
) -> impl FnOnce(sqlx::Error) -> ApiError {
    move |e| if unique_violation(&e) == Some(constraint) { conflict() } else { e.into() }
}

/// Why the site API could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum SiteApiError {
    /// A setting that cannot be used (environment variable or config field).
    #[error("invalid site API configuration: {0}")]
    Config(String),

    /// The listen address is taken or not ours.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },

    /// The database could not be reached when starting.
    #[error("cannot connect to the site API database: {0}")]
    Database(#[from] sqlx::Error),

    /// The outbox could not be opened (e.g. schema not migrated: run `trialflow migrate`).
    #[error(transparent)]
    Outbox(#[from] trialflow_outbox::OutboxError),

    /// The HTTP server failed while running.
    #[error("site API server failed: {0}")]
    Serve(#[source] std::io::Error),
}
