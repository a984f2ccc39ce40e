//! `GET /v1/alerts/stream`: every change of an alert (an `alert_history` row) as a server-sent
//! event, live.
//!
//! Each event has `id:` = the history id, `event:` = its kind (`raised`, `updated`, `escalated`,
//! `acknowledged`, `resolved`) and `data:` = the alert as the list shows it, as it is when sent.
//! A client reconnecting with `Last-Event-ID` (browsers' `EventSource` does so by itself) gets
//! the rows after that id, then live ones. A client without one gets a snapshot instead of the
//! whole history: the latest row of each alert that is not resolved (at most 1,000, oldest
//! first). After either, an event `ready` (data `{"last_event_id": N}`) marks the end of the
//! catch-up; comments keep idle connections open.
//!
//! **One listener, many streams.** The process holds one `LISTEN trialflow_alerts` connection;
//! [`forward`] reads the row each notification of this schema names (once, for every client)
//! and fans it out on a broadcast channel. A stream subscribes before it reads its catch-up, so
//! nothing falls between the two. Ids are taken at insert but notified at commit, so they can
//! arrive out of order; a stream therefore remembers the ids it sent rather than a high-water
//! mark. When the listener lost its connection (notifications in between are gone) or a client
//! fell behind the broadcast, the stream re-reads from the database, starting at the oldest of the
//! last ids it sent. Delivery is at least once: a change committed just before a client connected
//! may follow its catch-up once more (same id). Each event carries the alert's whole state, so a
//! repeat changes nothing for a client that shows it.
//!
//! **Token in the query.** Browsers cannot set headers on an `EventSource`, so this endpoint (and
//! only this one) also takes the token as `?access_token=`. The trade-off: a URL is more exposed
//! than a header: proxies and access logs may record it, and it sits in the browser's memory of
//! the page. This API logs route templates only, never queries; deployments should keep proxies
//! from logging query strings, serve over TLS, and use short-lived tokens where they can.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::http::header::{AUTHORIZATION, HeaderName, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use sqlx::postgres::PgListener;
use sqlx::{AssertSqlSafe, PgPool};
use tokio::sync::{broadcast, mpsc};
use tracing::Instrument;
use trialflow_http::ApiError;
use trialflow_http::auth::Ids;
use trialflow_outbox::SchemaName;
use utoipa::openapi::Required;
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{ObjectBuilder, Type};

use super::AlertState;
use super::alerts::{Alert, select_alerts};

/// The channel the `alert_history` trigger notifies.
pub(super) const CHANNEL: &str = "trialflow_alerts";
/// Changes a slow stream may fall behind the listener before it re-reads from the database.
pub(super) const BROADCAST_CAPACITY: usize = 1024;
/// Events waiting for one client's connection: a slow client holds back only itself.
const CLIENT_BUFFER: usize = 64;
/// Alerts a snapshot sends at most.
const SNAPSHOT_MAX: i64 = 1_000;
/// Rows one catch-up read fetches.
const CATCH_UP_PAGE: i64 = 500;
/// Ids a stream remembers having sent (to skip duplicates, and where a re-read starts).
const REMEMBERED: usize = 256;
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// How long a browser waits before reconnecting (the `retry:` field).
const RETRY: Duration = Duration::from_secs(2);
/// Pause before reconnecting the listener after a failure.
const RELISTEN_DELAY: Duration = Duration::from_secs(1);

/// One change of an alert, read once and shared by every stream.
#[derive(Debug)]
pub(super) struct Change {
    id: i64,
    kind: String,
    /// Whose it is: a stream sends only its caller's studies' changes.
    study_id: String,
    /// The alert's JSON.
    data: String,
}

/// What the listener tells the streams.
#[derive(Debug, Clone)]
pub(super) enum Signal {
    Change(Arc<Change>),
    /// Notifications may have been lost: read what changed from the database.
    Resync,
}

/// A history row with its alert, as the stream reads them.
#[derive(Debug, sqlx::FromRow)]
struct HistoryRow {
    id: i64,
    kind: String,
    #[sqlx(flatten)]
    alert: Alert,
}

impl HistoryRow {
    fn into_change(self) -> Result<Change, ApiError> {
        let data = serde_json::to_string(&self.alert).map_err(|e| {
            tracing::error!(error = %e, "Alert does not serialize.");
            ApiError::internal()
        })?;
        Ok(Change { id: self.id, kind: self.kind, study_id: self.alert.study_id, data })
    }
}

/// `SELECT h.id, h.kind, <alert> FROM history h JOIN alert a`, for the reads below to complete.
fn select_history(s: &SchemaName) -> String {
    select_alerts(s).replacen("SELECT ", "SELECT h.id, h.kind, ", 1)
        + &format!(" JOIN {s}.alert_history h ON h.alert_id = a.alert_id")
}

/// The connection that listens on [`CHANNEL`] (its own, outside the request pool).
pub(super) async fn listen(database_url: &str) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect(database_url).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

/// The history id a notification payload `<schema>:<id>` names, when it is of `schema`.
fn notified_id(payload: &str, schema: &SchemaName) -> Option<i64> {
    let (of, id) = payload.rsplit_once(':')?;
    (of == schema.as_str()).then(|| id.parse().ok()).flatten()
}

/// Turns notifications into [`Signal`]s until the API stops. Reconnects after failures and then
/// tells the streams to re-read, since notifications sent meanwhile are lost.
pub(super) async fn forward(mut listener: PgListener, database_url: String, api: AlertState) {
    loop {
        let received = tokio::select! {
            _ = api.stop.cancelled() => return,
            received = listener.try_recv() => received,
        };
        match received {
            Ok(Some(notification)) => {
                let Some(id) = notified_id(notification.payload(), &api.schema) else { continue };
                let signal = match read_change(&api.pool, &api.schema, id).await {
                    Ok(Some(change)) => Signal::Change(Arc::new(change)),
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(history_id = id, error = ?e, "Cannot read an alert change; streams re-read.");
                        Signal::Resync
                    }
                };
                // No receiver (no stream open) is not an error.
                let _ = api.changes.send(signal);
            }
            Ok(None) => {
                // sqlx has reconnected and listens again; what was notified in between is lost.
                tracing::warn!("Alert listener lost its connection and reconnected; streams re-read.");
                let _ = api.changes.send(Signal::Resync);
            }
            Err(e) => {
                tracing::warn!(error = %e, "Alert listener failed; reconnecting.");
                listener = loop {
                    tokio::select! {
                        _ = api.stop.cancelled() => return,
                        _ = tokio::time::sleep(RELISTEN_DELAY) => {}
                    }
                    match listen(&database_url).await {
                        Ok(listener) => break listener,
                        Err(e) => tracing::warn!(error = %e, "Alert listener cannot reconnect yet."),
                    }
                };
                let _ = api.changes.send(Signal::Resync);
            }
        }
    }
}

async fn read_change(pool: &PgPool, s: &SchemaName, id: i64) -> Result<Option<Change>, ApiError> {
    let sql = format!("{} WHERE h.id = $1", select_history(s));
    let row: Option<HistoryRow> = sqlx::query_as(AssertSqlSafe(sql)).bind(id).fetch_optional(pool).await?;
    row.map(HistoryRow::into_change).transpose()
}

/// The `Last-Event-ID` header in the OpenAPI document.
pub(super) struct LastEventId;

impl utoipa::IntoParams for LastEventId {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        let id = ObjectBuilder::new().schema_type(Type::String).pattern(Some("^[0-9]+$"));
        vec![
            ParameterBuilder::new()
                .name("Last-Event-ID")
                .parameter_in(ParameterIn::Header)
                .required(Required::False)
                .description(Some(
                    "The id of the last event received: resume after it (browsers' `EventSource` \
                     sends it when reconnecting). Blank counts as absent.",
                ))
                .schema(Some(id))
                .build(),
        ]
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct StreamQuery {
    /// The bearer token, for clients that cannot send headers (`EventSource`).
    access_token: Option<String>,
}

/// Every change of an alert, live (server-sent events)
///
/// Each event: `id:` the change's id (increasing), `event:` its kind (`raised`, `updated`,
/// `escalated`, `acknowledged`, `resolved`), `data:` the alert as the list shows it. Without
/// `Last-Event-ID`, a snapshot first (the latest change of each alert not resolved, at most
/// 1,000, oldest first); with it, the changes after that id. Then an event `ready` (data
/// `{"last_event_id": N}`) and live changes; comments keep the connection open. Delivery is at
/// least once: a change may come twice, with the same id.
#[utoipa::path(
    get,
    path = "/v1/alerts/stream",
    tag = "alerts",
    params(LastEventId),
    responses(
        (status = 200, description = "The stream (`text/event-stream`); it ends only when the \
            client or the service goes away.", content_type = "text/event-stream", body = String),
        (status = 401, response = super::openapi::Unauthenticated),
        (status = 403, response = super::openapi::Forbidden),
        (status = 422, description = "`validation_failed`: `Last-Event-ID` is not an event id of \
            this stream; or `invalid_characters` / `too_long` in a query value.", body = super::openapi::ErrorBody),
        (status = 500, response = super::openapi::Internal),
        (status = 503, response = super::openapi::Unavailable),
    ),
    security(("bearer" = []), ("access_token" = []))
)]
pub(super) async fn stream(
    State(api): State<AlertState>,
    headers: HeaderMap,
    query: Result<Query<StreamQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::validation("query", e.body_text()))?;
    let from_query = query.access_token.map(|token| format!("Bearer {token}"));
    let authorization = match headers.get(AUTHORIZATION) {
        Some(value) => value.to_str().ok(),
        None => from_query.as_deref(),
    };
    let principal = api.authorize(authorization).await?;
    let last_event_id = match headers.get("last-event-id").map(HeaderValue::to_str) {
        None => None,
        Some(Ok(text)) if text.trim().is_empty() => None,
        Some(Ok(text)) => Some(text.trim().parse::<i64>().ok().filter(|id| *id >= 0).ok_or_else(|| {
            ApiError::validation("Last-Event-ID", format!("`{text}` is not an event id of this stream"))
        })?),
        Some(Err(_)) => return Err(ApiError::validation("Last-Event-ID", "is not text")),
    };

    // Subscribed before the catch-up is read: a change committed meanwhile is in one or the other.
    let changes = api.changes.subscribe();
    let (sender, mut receiver) = mpsc::channel(CLIENT_BUFFER);
    let span = tracing::info_span!("alert_stream", user = %principal.user);
    let studies = principal.scope.studies.clone();
    tokio::spawn(Feed::new(api, sender, last_event_id, studies).run(changes).instrument(span));
    let events = futures::stream::poll_fn(move |cx| receiver.poll_recv(cx)).map(Ok::<_, Infallible>);
    let mut response = Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response();
    // Proxies that buffer responses (nginx) would hold the events back.
    response
        .headers_mut()
        .insert(HeaderName::from_static("x-accel-buffering"), HeaderValue::from_static("no"));
    Ok(response)
}

/// The client is gone, the API stops, or its catch-up failed: the stream ends (a browser
/// reconnects with its `Last-Event-ID`).
#[derive(Debug)]
struct Ended;

/// The sending side of one stream.
#[derive(Debug)]
struct Feed {
    api: AlertState,
    sender: mpsc::Sender<Event>,
    /// The client's `Last-Event-ID`: it has everything up to there.
    client_floor: i64,
    resume: Option<i64>,
    /// Where a re-read starts when nothing is remembered.
    cursor: i64,
    /// The last ids sent, to skip duplicates and to re-read from the oldest of them.
    sent: BTreeSet<i64>,
    first: bool,
    /// The caller's studies: changes of other studies are not sent.
    studies: Ids,
}

impl Feed {
    fn new(api: AlertState, sender: mpsc::Sender<Event>, last_event_id: Option<i64>, studies: Ids) -> Self {
        let floor = last_event_id.unwrap_or(0);
        Self {
            api,
            sender,
            client_floor: floor,
            resume: last_event_id,
            cursor: floor,
            sent: BTreeSet::new(),
            first: true,
            studies,
        }
    }

    async fn run(mut self, mut changes: broadcast::Receiver<Signal>) {
        let start = match self.resume {
            Some(_) => self.catch_up().await,
            None => self.snapshot().await,
        };
        let last = self.sent.last().copied().unwrap_or(self.cursor).max(self.cursor);
        let ready = Event::default()
            .event("ready")
            .id(last.to_string())
            .data(format!("{{\"last_event_id\":{last}}}"));
        let ready = self.first_with_retry(ready);
        if start.is_err() || self.deliver(ready).await.is_err() {
            return;
        }
        loop {
            let signal = tokio::select! {
                _ = self.api.stop.cancelled() => return,
                _ = self.sender.closed() => return,
                signal = changes.recv() => signal,
            };
            let outcome = match signal {
                Ok(Signal::Change(change)) => {
                    if change.id <= self.client_floor || self.sent.contains(&change.id) {
                        continue;
                    }
                    self.send(&change).await
                }
                Ok(Signal::Resync) => self.catch_up().await,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "Alert stream fell behind; re-reading.");
                    self.catch_up().await
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if outcome.is_err() {
                return;
            }
        }
    }

    /// The latest row of each alert that is not resolved, oldest first; then only what follows
    /// the history's last id at the start.
    async fn snapshot(&mut self) -> Result<(), Ended> {
        let s = &self.api.schema;
        let read = async {
            // Read first: a row committed after it is either in the snapshot or re-read later.
            let watermark: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT coalesce(max(id), 0) FROM {s}.alert_history"
            )))
            .fetch_one(&self.api.pool)
            .await?;
            let sql = select_alerts(s).replacen("SELECT ", "SELECT h.id, h.kind, ", 1)
                + &format!(
                    " CROSS JOIN LATERAL (SELECT id, kind FROM {s}.alert_history
                                         WHERE alert_id = a.alert_id ORDER BY id DESC LIMIT 1) h
                      WHERE a.status <> 'resolved' AND ($2::text[] IS NULL OR a.study_id = ANY($2))
                      ORDER BY h.id DESC LIMIT $1"
                );
            let rows: Vec<HistoryRow> = sqlx::query_as(AssertSqlSafe(sql))
                .bind(SNAPSHOT_MAX)
                .bind(self.studies.listed())
                .fetch_all(&self.api.pool)
                .await?;
            Ok::<_, sqlx::Error>((watermark, rows))
        };
        let (watermark, rows) = read.await.map_err(|e| self.failed(e.into()))?;
        self.cursor = watermark;
        for row in rows.into_iter().rev() {
            let change = row.into_change().map_err(|e| self.failed(e))?;
            let event = self.event(&change);
            self.deliver(event).await?;
        }
        Ok(())
    }

    /// Everything after the oldest id remembered (or the cursor) that was not sent yet.
    async fn catch_up(&mut self) -> Result<(), Ended> {
        let mut after = self.sent.first().map_or(self.cursor, |oldest| oldest - 1).max(self.client_floor);
        let sql = format!("{} WHERE h.id > $1 ORDER BY h.id LIMIT $2", select_history(&self.api.schema));
        loop {
            let rows: Vec<HistoryRow> = sqlx::query_as(AssertSqlSafe(sql.as_str()))
                .bind(after)
                .bind(CATCH_UP_PAGE)
                .fetch_all(&self.api.pool)
                .await
                .map_err(|e| self.failed(e.into()))?;
            let full = rows.len() as i64 == CATCH_UP_PAGE;
            for row in rows {
                after = row.id;
                if !self.sent.contains(&row.id) {
                    let change = row.into_change().map_err(|e| self.failed(e))?;
                    self.send(&change).await?;
                }
            }
            self.cursor = self.cursor.max(after);
            if !full {
                return Ok(());
            }
        }
    }

    fn failed(&self, e: ApiError) -> Ended {
        tracing::warn!(code = e.code, "Alert stream cannot read its catch-up; ending it.");
        Ended
    }

    fn event(&mut self, change: &Change) -> Event {
        let event =
            Event::default().id(change.id.to_string()).event(change.kind.as_str()).data(change.data.as_str());
        self.first_with_retry(event)
    }

    /// The first event of the stream also tells the browser how soon to reconnect.
    fn first_with_retry(&mut self, event: Event) -> Event {
        if std::mem::take(&mut self.first) { event.retry(RETRY) } else { event }
    }

    async fn send(&mut self, change: &Change) -> Result<(), Ended> {
        if !self.studies.contains(&change.study_id) {
            return Ok(());
        }
        let event = self.event(change);
        self.deliver(event).await?;
        self.sent.insert(change.id);
        while self.sent.len() > REMEMBERED {
            if let Some(oldest) = self.sent.pop_first() {
                self.cursor = self.cursor.max(oldest);
            }
        }
        Ok(())
    }

    /// Waits for room in the client's buffer: a slow client slows only its own stream.
    async fn deliver(&self, event: Event) -> Result<(), Ended> {
        tokio::select! {
            _ = self.api.stop.cancelled() => Err(Ended),
            sent = self.sender.send(event) => sent.map_err(|_| Ended),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(name: &str) -> SchemaName {
        SchemaName::new(name).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    #[test]
    fn only_this_schemas_notifications_count() {
        let monitoring = schema("monitoring");
        assert_eq!(notified_id("monitoring:42", &monitoring), Some(42));
        assert_eq!(notified_id("other:42", &monitoring), None);
        assert_eq!(notified_id("monitoring_2:42", &monitoring), None);
        assert_eq!(notified_id("monitoring:x", &monitoring), None);
        assert_eq!(notified_id("monitoring", &monitoring), None);
    }

    #[test]
    fn history_reads_select_the_row_and_its_alert() {
        let sql = select_history(&schema("mon"));
        assert!(sql.starts_with("SELECT h.id, h.kind, a.alert_id"), "{sql}");
        assert!(sql.ends_with("JOIN mon.alert_history h ON h.alert_id = a.alert_id"), "{sql}");
    }
}
