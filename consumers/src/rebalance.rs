//! What the consumer does when the group rebalances: revoked partitions' workers finish (or roll
//! back) their batch and commit before the revocation completes; assigned partitions get a queue
//! of their own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// Set by the worker before it takes its first message. One not started (not spawned yet, or
    /// waiting for its predecessor to end) holds nothing of the partition, and once cancelled it
    /// takes nothing: a revocation does not wait for it.
    pub(crate) started: Arc<AtomicBool>,
    pub(crate) done: std::sync::mpsc::Receiver<()>,
}

/// A partition assigned to this member, for the run loop to spawn its worker: registered in
/// `workers` by the callback itself, so that a revocation served right after it (in the same
/// poll, before the run loop spawned anything) stops it.
pub(crate) struct Assigned {
    pub(crate) key: Key,
    pub(crate) queue: Arc<PartitionQueue>,
    pub(crate) cancel: CancellationToken,
    pub(crate) started: Arc<AtomicBool>,
    pub(crate) done: std::sync::mpsc::Sender<()>,
}

/// Stops the workers of revoked partitions before the revocation completes, so that they finish
/// (or roll back) their batch and commit its offset while they still own the partition.
pub(crate) struct RebalanceContext {
    pub(crate) workers: Arc<Mutex<HashMap<Key, WorkerHandle>>>,
    /// Set right after the consumer is created; used to split assigned partitions.
    pub(crate) consumer: std::sync::OnceLock<std::sync::Weak<StreamConsumer<RebalanceContext>>>,
    /// Each partition's queue, split off once for the consumer's life. librdkafka keeps one queue
    /// per partition, shared by every handle to it, and a handle that is dropped turns off the
    /// queue's wake-up (rdkafka's `StreamPartitionQueue` drop): an old handle dropped after a new
    /// one was split would leave the new worker waiting forever. Splitting is kept across
    /// assignments (librdkafka does not forward a queue the application split off again).
    /// Owned by the run loop (a queue holds the consumer: the consumer must not hold the queues,
    /// or a consumer whose task is dropped would never close and stay in its group).
    pub(crate) queues: std::sync::Weak<Mutex<HashMap<Key, Arc<PartitionQueue>>>>,
    pub(crate) assigned: mpsc::UnboundedSender<Assigned>,
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
            // Cancelled first, then asked whether it started: one that starts now takes nothing.
            for w in stopping.iter().filter(|w| w.started.load(Ordering::SeqCst)) {
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

    /// Gives every assigned partition its own queue, split off right after its first assignment
    /// and so before anything is fetched for it: partitions are then fetched and drained
    /// independently (a broker that returns one partition's backlog at a time cannot starve the
    /// other workers). Registers each partition's worker and hands it to the run loop.
    fn post_rebalance(&self, _consumer: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Assign(assigned) = rebalance else { return };
        let Some(consumer) = self.consumer.get().and_then(std::sync::Weak::upgrade) else { return };
        let Some(queues) = self.queues.upgrade() else { return };
        let mut queues = queues.lock().unwrap_or_else(|e| e.into_inner());
        let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        for e in assigned.elements() {
            let key = (e.topic().to_string(), e.partition());
            let queue = match queues.get(&key) {
                Some(queue) => queue.clone(),
                None => match consumer.split_partition_queue(e.topic(), e.partition()) {
                    Some(queue) => queues.entry(key.clone()).or_insert(Arc::new(queue)).clone(),
                    None => {
                        warn!(topic = e.topic(), partition = e.partition(), "Cannot split partition queue.");
                        continue;
                    }
                },
            };
            let (cancel, started) = (CancellationToken::new(), Arc::new(AtomicBool::new(false)));
            let (done, done_rx) = std::sync::mpsc::channel();
            let handle = WorkerHandle { cancel: cancel.clone(), started: started.clone(), done: done_rx };
            if let Some(old) = workers.insert(key.clone(), handle) {
                // Assigned again with no revocation between: the old worker stops, and its
                // successor starts once it has ended (the run loop's partition lock).
                old.cancel.cancel();
            }
            let _ = self.assigned.send(Assigned { key, queue, cancel, started, done });
        }
        trialflow_outbox::health::ready(&self.health);
        info!(partitions = assigned.count(), "Partitions assigned.");
    }
}
