//! What every partition worker and the parking loop of one consumer share.

use std::sync::Arc;

use rdkafka::consumer::StreamConsumer;
use sqlx::PgPool;
use tokio::sync::Notify;
use trialflow_outbox::Outbox;

use crate::config::{ConsumerConfig, ConsumerSpec};
use crate::rebalance::RebalanceContext;
use crate::store::Sql;

/// What every partition worker (and the parking loop) shares.
pub(crate) struct Shared<H> {
    pub(crate) spec: ConsumerSpec,
    pub(crate) config: ConsumerConfig,
    /// The consumer group id (the spans' `messaging.consumer.group.name`).
    pub(crate) group: String,
    pub(crate) handler: H,
    pub(crate) pool: PgPool,
    pub(crate) outbox: Arc<Outbox>,
    pub(crate) sql: Sql,
    pub(crate) consumer: Arc<StreamConsumer<RebalanceContext>>,
    pub(crate) park_wake: Notify,
}
