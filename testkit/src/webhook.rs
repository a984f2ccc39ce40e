//! A webhook endpoint of a study team, for the tests and benchmarks that follow alerts to their
//! delivery: `POST /hook` answers 200 and hands each request to the caller.

use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::routing::post;
use tokio_util::sync::CancellationToken;

/// Serves `POST /hook` on a free local port until `stop`; `receive` sees the headers and body of
/// every request as it arrives. Returns the endpoint's URL.
pub async fn receiver<F>(stop: CancellationToken, receive: F) -> anyhow::Result<String>
where
    F: Fn(&HeaderMap, &Bytes) + Clone + Send + Sync + 'static,
{
    let app = axum::Router::new().route(
        "/hook",
        post(move |headers: HeaderMap, body: Bytes| {
            receive(&headers, &body);
            std::future::ready("ok")
        }),
    );
    let addr = crate::serve(stop, app).await?;
    Ok(format!("http://{addr}/hook"))
}
