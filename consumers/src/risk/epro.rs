//! ePRO compliance: per enrolled subject, which scheduled questionnaire occurrences were due and
//! which of them were missed (pure, no IO). The schedule is the ePRO validation service's
//! ([`crate::epro::schedule`]): study day 1 is the enrollment date in the subject's time zone, an
//! occurrence is due on `enrollment + (study_day − 1)` local days and accepts answers until
//! `window_after_days + grace_days` days after that.
//!
//! An occurrence **counts as due** once its last accepted day has passed by the study's clock
//! (`as_of`: the latest day any event of the study happened, so a replay of old data judges by the
//! data's time, not today's), and only if it fell due before the subject's withdrawal. It is
//! **missed** when no `QuestionnaireResponseAccepted` names it (`scheduled_occurrence`), whatever
//! that response's window status.

use std::collections::BTreeSet;

use chrono::{DateTime, Days, NaiveDate, Utc};
use chrono_tz::Tz;

use crate::epro::schedule::{Schedule, local_date};

/// What the compliance of one enrolled subject depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct EnrolledSubject {
    pub enrolled_at: DateTime<Utc>,
    pub withdrawn_on: Option<NaiveDate>,
    pub time_zone: Tz,
    /// Occurrence ids with an accepted response.
    pub completed: BTreeSet<String>,
}

/// (due, missed) occurrences of `subject` under `schedule` by day `as_of`.
pub fn compliance(schedule: &Schedule, subject: &EnrolledSubject, as_of: NaiveDate) -> (u32, u32) {
    let enrolled = local_date(subject.enrolled_at, subject.time_zone);
    let (mut due, mut missed) = (0, 0);
    for o in &schedule.occurrences {
        let Some(day) = enrolled.checked_add_days(Days::new(u64::from(o.study_day.saturating_sub(1)))) else {
            continue;
        };
        let last = day.checked_add_days(Days::new(u64::from(o.window_after_days) + u64::from(o.grace_days)));
        let passed = last.is_some_and(|last| last < as_of);
        let before_withdrawal = subject.withdrawn_on.is_none_or(|w| day < w);
        if passed && before_withdrawal {
            due += 1;
            missed += u32::from(!subject.completed.contains(&o.id));
        }
    }
    (due, missed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::epro::schedule::Occurrence;

    fn schedule() -> Schedule {
        let o = |id: &str, study_day: u32| Occurrence {
            id: id.to_string(),
            questionnaire: "PHQ-9".to_string(),
            study_day,
            window_before_days: 2,
            window_after_days: 2,
            grace_days: 5,
        };
        Schedule {
            study_id: "*".to_string(),
            version: "1".to_string(),
            doc: None,
            late_sync_hours: 24,
            future_tolerance_minutes: 5,
            occurrences: vec![o("D1", 1), o("W2", 15), o("W4", 29)],
        }
    }

    fn day(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap_or_default()
    }

    #[test]
    fn occurrences_count_once_their_last_day_passed_and_before_a_withdrawal() {
        // Enrolled 2026-03-01 22:00 in New York = 03-02 03:00 UTC: study day 1 is 03-01 local.
        let enrolled_at =
            DateTime::parse_from_rfc3339("2026-03-02T03:00:00Z").map(|t| t.to_utc()).unwrap_or_default();
        let mut s = EnrolledSubject {
            enrolled_at,
            withdrawn_on: None,
            time_zone: chrono_tz::America::New_York,
            completed: ["D1".to_string()].into(),
        };
        // D1's last accepted day: 03-01 + 2 + 5 = 03-08; counted from 03-09 on.
        assert_eq!(compliance(&schedule(), &s, day(2026, 3, 8)), (0, 0));
        assert_eq!(compliance(&schedule(), &s, day(2026, 3, 9)), (1, 0));
        // W2 due 03-15, last day 03-22: missed from 03-23.
        assert_eq!(compliance(&schedule(), &s, day(2026, 3, 23)), (2, 1));
        assert_eq!(compliance(&schedule(), &s, day(2026, 12, 1)), (3, 2));
        // Withdrawn 03-20: W2 (due 03-15) was due before, W4 (03-29) never.
        s.withdrawn_on = Some(day(2026, 3, 20));
        assert_eq!(compliance(&schedule(), &s, day(2026, 12, 1)), (2, 1));
    }
}
