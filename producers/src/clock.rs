//! Where "now" comes from. Services read the system clock; a replay of a past study drives a
//! virtual clock instead, so what a service stamps (the ePRO gateway's `received_at`) lies on the
//! replayed timeline and the rules that compare instants (late sync, authored in the future) judge
//! the replayed study as they would have judged it live.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Utc};

#[derive(Debug, Clone, Default)]
pub enum Clock {
    /// The system clock.
    #[default]
    System,
    /// A clock that stands where its driver set it (microseconds since the Unix epoch).
    Virtual(Arc<AtomicI64>),
}

impl Clock {
    /// A virtual clock standing at `at`.
    pub fn virtual_at(at: DateTime<Utc>) -> Self {
        Self::Virtual(Arc::new(AtomicI64::new(at.timestamp_micros())))
    }

    pub fn now(&self) -> DateTime<Utc> {
        match self {
            Self::System => Utc::now(),
            Self::Virtual(micros) => {
                DateTime::from_timestamp_micros(micros.load(Ordering::Acquire)).unwrap_or_default()
            }
        }
    }

    /// Moves a virtual clock to `at` (backwards too: a replay may restart a timeline). The system
    /// clock cannot be set; returns whether the clock moved.
    pub fn set(&self, at: DateTime<Utc>) -> bool {
        match self {
            Self::System => false,
            Self::Virtual(micros) => {
                micros.store(at.timestamp_micros(), Ordering::Release);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_virtual_clock_stands_where_it_was_set_and_clones_share_it() {
        let start = DateTime::parse_from_rfc3339("2013-12-26T10:00:00Z").map(|t| t.to_utc()).ok();
        let Some(start) = start else { panic!("valid instant") };
        let clock = Clock::virtual_at(start);
        let shared = clock.clone();
        assert_eq!(clock.now(), start);
        let later = start + chrono::Duration::days(3);
        assert!(shared.set(later));
        assert_eq!(clock.now(), later);
        assert!(!Clock::System.set(later));
        assert!(Clock::System.now() > later);
    }
}
