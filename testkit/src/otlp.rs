//! An OpenTelemetry collector's OTLP/HTTP traces endpoint, in the process: what the tests and the
//! traced benchmark export their spans to.

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message as _;
use tokio_util::sync::CancellationToken;

/// Serves `POST /v1/traces` (OTLP/HTTP, protobuf) on a free local port until `stop`; `receive`
/// gets every export request that decodes (others are answered 400). Returns the endpoint's URL.
pub async fn receiver<F>(stop: CancellationToken, receive: F) -> anyhow::Result<String>
where
    F: Fn(ExportTraceServiceRequest) + Clone + Send + Sync + 'static,
{
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let answer = match ExportTraceServiceRequest::decode(body) {
                Ok(request) => {
                    receive(request);
                    (StatusCode::OK, ExportTraceServiceResponse::default().encode_to_vec())
                }
                Err(_) => (StatusCode::BAD_REQUEST, Vec::new()),
            };
            std::future::ready(answer)
        }),
    );
    let addr = crate::serve(stop, app).await?;
    Ok(format!("http://{addr}/v1/traces"))
}
