//! A circuit breaker per webhook endpoint (its URL). After `NOTIFIER_BREAKER_FAILURES`
//! consecutive failed attempts (5xx, 408, 429, timeout, connection error) the endpoint's circuit
//! opens: for `NOTIFIER_BREAKER_OPEN_MS` no request is sent to it, and its deliveries are
//! rescheduled as failed attempts ("circuit open") without touching the network. Then one attempt
//! goes through as a probe (half open) while the others keep waiting: an answer that is not a
//! failure closes the circuit, a failure opens it again. An endpoint that answers with a 4xx is
//! up (the delivery fails for good, the circuit does not count it). State in the
//! `trialflow_notifier_circuit_open{endpoint}` gauge (1 open or half open, 0 closed).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The gauge of each endpoint's circuit.
pub(crate) const CIRCUIT_OPEN: &str = "trialflow_notifier_circuit_open";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is on its way.
    HalfOpen,
}

/// The circuits of every endpoint the worker posts to.
#[derive(Debug)]
pub(crate) struct Breakers {
    /// Consecutive failures that open a circuit; 0: circuits never open.
    failures_to_open: u32,
    open_for: Duration,
    circuits: Mutex<HashMap<String, State>>,
}

/// Why an attempt may not go out now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Open: the next probe goes out after this long.
    Open(Duration),
    /// Half open: a probe is on its way.
    Probing,
}

impl Breakers {
    pub(crate) fn new(failures_to_open: u32, open_for: Duration) -> Self {
        Self { failures_to_open, open_for, circuits: Mutex::default() }
    }

    fn with<T>(&self, endpoint: &str, f: impl FnOnce(&mut State) -> T) -> T {
        let mut circuits = self.circuits.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let state = circuits.entry(endpoint.to_string()).or_insert(State::Closed { failures: 0 });
        let before = matches!(state, State::Closed { .. });
        let result = f(state);
        let after = matches!(state, State::Closed { .. });
        if before != after {
            metrics::gauge!(CIRCUIT_OPEN, "endpoint" => label(endpoint)).set(if after { 0.0 } else { 1.0 });
        }
        result
    }

    /// Whether an attempt to `endpoint` may go out at `now`. An open circuit whose time is up lets
    /// this attempt through as the probe.
    pub(crate) fn allow(&self, endpoint: &str, now: Instant) -> Result<(), Refusal> {
        if self.failures_to_open == 0 {
            return Ok(());
        }
        self.with(endpoint, |state| match *state {
            State::Closed { .. } => Ok(()),
            State::Open { until } if now < until => Err(Refusal::Open(until - now)),
            State::Open { .. } => {
                *state = State::HalfOpen;
                Ok(())
            }
            State::HalfOpen => Err(Refusal::Probing),
        })
    }

    /// The endpoint answered (a 2xx, or a 4xx: it is up).
    pub(crate) fn answered(&self, endpoint: &str) {
        if self.failures_to_open > 0 {
            self.with(endpoint, |state| *state = State::Closed { failures: 0 });
        }
    }

    /// An attempt to `endpoint` failed at `now`.
    pub(crate) fn failed(&self, endpoint: &str, now: Instant) {
        if self.failures_to_open == 0 {
            return;
        }
        let (threshold, open) = (self.failures_to_open, State::Open { until: now + self.open_for });
        self.with(endpoint, |state| {
            *state = match *state {
                State::Closed { failures } if failures + 1 >= threshold => open,
                State::Closed { failures } => State::Closed { failures: failures + 1 },
                State::HalfOpen | State::Open { .. } => open,
            }
        });
    }
}

/// The endpoint as a metric label: scheme, host, port and path, never the query (it may carry a
/// token).
fn label(endpoint: &str) -> String {
    match reqwest::Url::parse(endpoint) {
        Ok(url) => format!("{}{}", url.origin().ascii_serialization(), url.path()),
        Err(_) => "invalid".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "https://hooks.example/a?token=secret";
    const B: &str = "https://hooks.example/b";

    #[test]
    fn consecutive_failures_open_the_circuit_and_a_probe_closes_it() {
        let breakers = Breakers::new(3, Duration::from_secs(30));
        let t0 = Instant::now();
        for _ in 0..2 {
            assert_eq!(breakers.allow(A, t0), Ok(()));
            breakers.failed(A, t0);
        }
        breakers.answered(A); // a success in between resets the count
        for _ in 0..3 {
            assert_eq!(breakers.allow(A, t0), Ok(()));
            breakers.failed(A, t0);
        }
        assert_eq!(
            breakers.allow(A, t0 + Duration::from_secs(10)),
            Err(Refusal::Open(Duration::from_secs(20)))
        );
        assert_eq!(breakers.allow(B, t0), Ok(()), "other endpoints are not affected");
        let later = t0 + Duration::from_secs(30);
        assert_eq!(breakers.allow(A, later), Ok(()), "the probe goes out");
        assert_eq!(breakers.allow(A, later), Err(Refusal::Probing), "one probe at a time");
        breakers.answered(A);
        assert_eq!(breakers.allow(A, later), Ok(()), "closed again");
    }

    #[test]
    fn a_failed_probe_opens_the_circuit_again() {
        let breakers = Breakers::new(1, Duration::from_secs(5));
        let t0 = Instant::now();
        breakers.failed(A, t0);
        assert!(matches!(breakers.allow(A, t0), Err(Refusal::Open(_))));
        let probe = t0 + Duration::from_secs(5);
        assert_eq!(breakers.allow(A, probe), Ok(()));
        breakers.failed(A, probe);
        assert_eq!(
            breakers.allow(A, probe + Duration::from_secs(1)),
            Err(Refusal::Open(Duration::from_secs(4)))
        );
    }

    #[test]
    fn zero_failures_to_open_means_never() {
        let breakers = Breakers::new(0, Duration::from_secs(5));
        let t0 = Instant::now();
        for _ in 0..100 {
            breakers.failed(A, t0);
        }
        assert_eq!(breakers.allow(A, t0), Ok(()));
    }

    #[test]
    fn the_metric_label_leaves_the_query_out() {
        assert_eq!(label(A), "https://hooks.example/a");
        assert_eq!(label("not a url"), "invalid");
    }
}
