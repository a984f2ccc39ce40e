//! Why the gateway could not start or stopped. What a request gets back is a
//! [`trialflow_http::ApiError`], the body every trialflow HTTP service answers with.

use std::net::SocketAddr;

/// Why the ePRO gateway could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum EproGatewayError {
    /// A setting that cannot be used (environment variable or config field).
    #[error("invalid ePRO gateway configuration: {0}")]
    Config(String),

    /// The listen address is taken or not ours.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },

    /// librdkafka refused the producer settings (e.g. a `KAFKA_CONFIG` entry it cannot use).
    #[error("cannot create the Kafka producer: {0}")]
    Producer(#[source] rdkafka::error::KafkaError),

    /// The cluster refused the connection (see `trialflow_outbox::kafka::check_connection`).
    #[error("{0}")]
    Kafka(#[source] trialflow_outbox::OutboxError),

    /// The HTTP server failed while running.
    #[error("ePRO gateway server failed: {0}")]
    Serve(#[source] std::io::Error),
}
