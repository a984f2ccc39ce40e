//! Retry timing shared by everything in trialflow that retries: the relay, the consumer runtime,
//! its parking loop and the notifier.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

/// The n-th delay (1-based) of an exponential backoff from 100 ms, with jitter, capped at `max`
/// (`backon`). Shared by everything in trialflow that retries.
pub fn backoff_delay(attempt: u32, max: Duration) -> Duration {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
        .nth(attempt.saturating_sub(1) as usize)
        .unwrap_or(max)
}

/// Sleeps for `delay`, or less when `shutdown` is cancelled first; false when it was.
pub async fn sleep_or_shutdown(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_under_its_cap() {
        let max = Duration::from_secs(2);
        for attempt in 1..50 {
            let d = backoff_delay(attempt, max);
            // Jitter adds up to one more base delay, never more than twice the cap.
            assert!(d >= Duration::from_millis(100) && d <= 2 * max, "attempt {attempt}: {d:?}");
        }
        assert!(backoff_delay(20, max) >= max, "late attempts reach the cap");
    }
}
