//! Where "now" comes from. Services read the system clock; a replay of a past study drives a
//! virtual clock instead, so what a service stamps (the ePRO gateway's `received_at`) lies on the
//! replayed timeline and the rules that compare instants (late sync, authored in the future) judge
//! the replayed study as they would have judged it live.
//!
//! When the replay is over, the services it drove keep serving live requests (`trialflow demo`):
//! [`Clock::resume_real_time`] makes the virtual clock follow the system clock again, for every
//! clone at once, so a submission authored now is not judged against the replay's last instant.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Utc};

#[derive(Debug, Clone, Default)]
pub enum Clock {
    /// The system clock.
    #[default]
    System,
    /// A clock its driver sets; clones share it.
    Virtual(Arc<VirtualTime>),
}

/// The shared state of a virtual clock: standing at an instant, or following the system clock.
/// One atomic word, so a reader never sees half of a `set` or a `resume_real_time`.
#[derive(Debug)]
pub struct VirtualTime {
    /// Microseconds since the Unix epoch, or [`FOLLOWS_SYSTEM`].
    micros: AtomicI64,
}

/// No `DateTime<Utc>` has this many microseconds (chrono's range ends near ±2^62 µs), so it
/// cannot collide with an instant a driver sets.
const FOLLOWS_SYSTEM: i64 = i64::MIN;

impl Clock {
    /// A virtual clock standing at `at`.
    pub fn virtual_at(at: DateTime<Utc>) -> Self {
        Self::Virtual(Arc::new(VirtualTime { micros: AtomicI64::new(at.timestamp_micros()) }))
    }

    pub fn now(&self) -> DateTime<Utc> {
        match self {
            Self::System => Utc::now(),
            Self::Virtual(time) => match time.micros.load(Ordering::Acquire) {
                FOLLOWS_SYSTEM => Utc::now(),
                micros => DateTime::from_timestamp_micros(micros).unwrap_or_default(),
            },
        }
    }

    /// Moves a virtual clock to `at` (backwards too: a replay may restart a timeline) and makes it
    /// stand there, also after [`Clock::resume_real_time`]. The system clock cannot be set;
    /// returns whether the clock moved.
    pub fn set(&self, at: DateTime<Utc>) -> bool {
        match self {
            Self::System => false,
            Self::Virtual(time) => {
                time.micros.store(at.timestamp_micros(), Ordering::Release);
                true
            }
        }
    }

    /// Makes a virtual clock follow the system clock from now on (until it is [`set`](Clock::set)
    /// again), for every clone. Returns whether anything changed: false for the system clock.
    pub fn resume_real_time(&self) -> bool {
        match self {
            Self::System => false,
            Self::Virtual(time) => time.micros.swap(FOLLOWS_SYSTEM, Ordering::AcqRel) != FOLLOWS_SYSTEM,
        }
    }

    /// Whether `now()` is the system's time: the system clock, or a virtual one that resumed it.
    pub fn is_real_time(&self) -> bool {
        match self {
            Self::System => true,
            Self::Virtual(time) => time.micros.load(Ordering::Acquire) == FOLLOWS_SYSTEM,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start() -> DateTime<Utc> {
        let start = DateTime::parse_from_rfc3339("2013-12-26T10:00:00Z").map(|t| t.to_utc()).ok();
        let Some(start) = start else { panic!("valid instant") };
        start
    }

    #[test]
    fn a_virtual_clock_stands_where_it_was_set_and_clones_share_it() {
        let start = start();
        let clock = Clock::virtual_at(start);
        let shared = clock.clone();
        assert_eq!(clock.now(), start);
        assert!(!clock.is_real_time());
        let later = start + chrono::Duration::days(3);
        assert!(shared.set(later));
        assert_eq!(clock.now(), later);
        assert!(!Clock::System.set(later));
        assert!(Clock::System.now() > later);
    }

    #[test]
    fn a_resumed_virtual_clock_follows_the_system_clock_for_every_clone_until_set_again() {
        let start = start();
        let clock = Clock::virtual_at(start);
        let served_by = clock.clone();

        let before = Utc::now();
        assert!(clock.resume_real_time());
        let now = served_by.now();
        let after = Utc::now();
        assert!(before <= now && now <= after, "{before} <= {now} <= {after}");
        assert!(served_by.is_real_time());
        // It follows the system clock, not a snapshot of it.
        let first = served_by.now();
        while Utc::now() == first {
            std::hint::spin_loop();
        }
        assert!(served_by.now() > first);
        assert!(!clock.resume_real_time(), "already following the system clock");

        // A replay that starts again makes it stand on its timeline again.
        assert!(clock.set(start));
        assert_eq!(served_by.now(), start);
        assert!(!served_by.is_real_time());

        assert!(!Clock::System.resume_real_time());
        assert!(Clock::System.is_real_time());
    }

    #[test]
    fn the_earliest_and_latest_instants_are_not_mistaken_for_following_the_system_clock() {
        for at in [DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC] {
            let clock = Clock::virtual_at(at);
            assert!(!clock.is_real_time());
            assert_eq!(clock.now().timestamp_micros(), at.timestamp_micros());
        }
    }
}
