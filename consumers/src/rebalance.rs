//! What the consumer does when the group rebalances: revoked partitions' workers finish (or roll
//! back) their batch and commit before the revocation completes; assigned partitions get a queue
//! of their own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::consumer::{ConsumerContext, Rebalance, StreamConsumer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// A partition: topic and number.
pub(crate) type Key = (String, i32);

/// A partition's worker, as the rebalance callback sees it.
pub(crate) struct WorkerHandle {
    pub(crate) cancel: CancellationToken,
    pub(crate) done: std::sync::mpsc::Receiver<()>,
}

/// Stops the workers of revoked partitions before the revocation completes, so that they finish
/// (or roll back) their batch and commit its offset while they still own the partition.
pub(crate) struct RebalanceContext {
    pub(crate) workers: Arc<Mutex<HashMap<Key, WorkerHandle>>>,
    /// Set right after the consumer is created; used to split assigned partitions.
    pub(crate) consumer: std::sync::OnceLock<std::sync::Weak<StreamConsumer<RebalanceContext>>>,
    pub(crate) assigned: mpsc::UnboundedSender<(Key, PartitionQueue)>,
    pub(crate) revoke_wait: Duration,
    /// The consumer's name in the process's readiness (`GET /readyz`): ready once the group
    /// gave it its partitions.
    pub(crate) health: String,
}

pub(crate) type PartitionQueue = rdkafka::consumer::stream_consumer::StreamPartitionQueue<RebalanceContext>;

impl ClientContext for RebalanceContext {}

impl ConsumerContext for RebalanceContext {
    fn pre_rebalance(&self, _consumer: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else { return };
        let stopping: Vec<WorkerHandle> = {
            let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
            revoked
                .elements()
                .iter()
                .filter_map(|e| workers.remove(&(e.topic().to_string(), e.partition())))
                .collect()
        };
        for w in &stopping {
            w.cancel.cancel();
        }
        let deadline = Instant::now() + self.revoke_wait;
        let wait = || {
            for w in &stopping {
                let left = deadline.saturating_duration_since(Instant::now());
                // Disconnected: the worker is gone already (its task was dropped).
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = w.done.recv_timeout(left) {
                    // The worker goes on until its batch ends (it is cancelled, so it commits
                    // nothing more after that); the partition's next worker waits for it.
                    warn!(
                        revoke_wait_ms = self.revoke_wait.as_millis() as u64,
                        "A revoked partition's batch outlived the revoke wait."
                    );
                }
            }
        };
        // Blocking here is what holds the revocation until the batches are done; it needs a
        // multi-threaded runtime (the workers run on the other threads).
        let flavor = tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor());
        if let Ok(tokio::runtime::RuntimeFlavor::MultiThread) = flavor {
            tokio::task::block_in_place(wait);
        }
        info!(partitions = revoked.count(), "Partitions revoked.");
    }

    /// Gives every assigned partition its own queue, split off right after the assignment and so
    /// before anything is fetched for it: partitions are then fetched and drained independently
    /// (a broker that returns one partition's backlog at a time cannot starve the other workers).
    fn post_rebalance(&self, _consumer: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Assign(assigned) = rebalance else { return };
        let Some(consumer) = self.consumer.get().and_then(std::sync::Weak::upgrade) else { return };
        for e in assigned.elements() {
            match consumer.split_partition_queue(e.topic(), e.partition()) {
                Some(queue) => {
                    let _ = self.assigned.send(((e.topic().to_string(), e.partition()), queue));
                }
                None => warn!(topic = e.topic(), partition = e.partition(), "Cannot split partition queue."),
            }
        }
        trialflow_outbox::health::ready(&self.health);
        info!(partitions = assigned.count(), "Partitions assigned.");
    }
}
