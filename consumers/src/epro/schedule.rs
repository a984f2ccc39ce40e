//! When questionnaires are due, and where a response falls relative to its window (pure, no IO).
//!
//! Study day 1 is the subject's enrollment date **in the subject's time zone**; an occurrence on
//! study day `d` is due on local date `enrollment + (d − 1)`. Its window is the whole local days
//! `[due − before, due + after]`; a response authored within `grace_days` outside the window is
//! early or late, further out it is out of window. Dates are compared in the subject's zone, so a
//! daylight-saving change between enrollment and the response moves nothing (a fixed UTC offset
//! taken at enrollment would misplace late-evening responses by an hour).

use chrono::{DateTime, Days, NaiveDate, Utc};
use chrono_tz::Tz;
use serde::Deserialize;
use trialflow_schemas::WindowStatus;

/// A study's ePRO schedule (`study_id` `*`: the default for studies without their own).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    pub study_id: String,
    pub version: String,
    #[serde(default)]
    pub doc: Option<String>,
    /// A response that reaches us this long after it was authored is flagged as a late sync.
    pub late_sync_hours: u32,
    /// Device clocks drift: authored up to this far ahead of its arrival is not "in the future".
    pub future_tolerance_minutes: u32,
    pub occurrences: Vec<Occurrence>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Occurrence {
    /// What apps send as `scheduled_occurrence`, e.g. `PHQ-9/W4`.
    pub id: String,
    pub questionnaire: String,
    /// 1 = the enrollment date.
    pub study_day: u32,
    pub window_before_days: u32,
    pub window_after_days: u32,
    pub grace_days: u32,
}

impl Schedule {
    pub fn occurrence(&self, id: &str) -> Option<&Occurrence> {
        self.occurrences.iter().find(|o| o.id == id)
    }

    pub fn validate(&self) -> Result<(), String> {
        let mut ids = std::collections::BTreeSet::new();
        for o in &self.occurrences {
            if !ids.insert(o.id.as_str()) {
                return Err(format!("schedule of {}: occurrence {} appears twice", self.study_id, o.id));
            }
            if o.study_day == 0 {
                return Err(format!(
                    "schedule of {}: occurrence {}: study days start at 1",
                    self.study_id, o.id
                ));
            }
        }
        Ok(())
    }
}

/// The local calendar date of an instant in `zone`.
pub fn local_date(at: DateTime<Utc>, zone: Tz) -> NaiveDate {
    at.with_timezone(&zone).date_naive()
}

/// Where `authored` falls relative to the occurrence's window, for a subject enrolled at
/// `enrolled` living in `zone`.
pub fn window_status(
    occurrence: &Occurrence,
    enrolled: DateTime<Utc>,
    authored: DateTime<Utc>,
    zone: Tz,
) -> WindowStatus {
    let due = local_date(enrolled, zone) + Days::new(u64::from(occurrence.study_day.saturating_sub(1)));
    let day = local_date(authored, zone);
    let opens = due - Days::new(u64::from(occurrence.window_before_days));
    let closes = due + Days::new(u64::from(occurrence.window_after_days));
    let grace = Days::new(u64::from(occurrence.grace_days));
    if day < opens {
        if day >= opens - grace { WindowStatus::Early } else { WindowStatus::OutOfWindow }
    } else if day > closes {
        if day <= closes + grace { WindowStatus::Late } else { WindowStatus::OutOfWindow }
    } else {
        WindowStatus::InWindow
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rfc3339: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(rfc3339).map(|t| t.to_utc()).unwrap_or_default()
    }

    fn occurrence(study_day: u32) -> Occurrence {
        Occurrence {
            id: "PHQ-9/W1".into(),
            questionnaire: "PHQ-9".into(),
            study_day,
            window_before_days: 2,
            window_after_days: 2,
            grace_days: 3,
        }
    }

    #[test]
    fn window_edges_are_whole_local_days() {
        let ny: Tz = chrono_tz::America::New_York;
        // Enrolled 2026-06-01 10:00 local; day 8 is due 2026-06-08, window 06-06 ..= 06-10.
        let enrolled = at("2026-06-01T14:00:00Z");
        let o = occurrence(8);
        let s = |t| window_status(&o, enrolled, at(t), ny);
        assert_eq!(s("2026-06-06T04:00:00Z"), WindowStatus::InWindow, "00:00 local on the first day");
        assert_eq!(s("2026-06-06T03:59:59Z"), WindowStatus::Early, "23:59:59 local the day before");
        assert_eq!(s("2026-06-11T03:59:59Z"), WindowStatus::InWindow, "23:59:59 local on the last day");
        assert_eq!(s("2026-06-11T04:00:00Z"), WindowStatus::Late);
        assert_eq!(s("2026-06-14T03:59:59Z"), WindowStatus::Late, "last grace day");
        assert_eq!(s("2026-06-14T04:00:00Z"), WindowStatus::OutOfWindow);
        assert_eq!(s("2026-06-03T04:00:00Z"), WindowStatus::Early, "first grace day before");
        assert_eq!(s("2026-06-03T03:59:59Z"), WindowStatus::OutOfWindow);
    }

    #[test]
    fn a_dst_change_between_enrollment_and_response_is_respected() {
        let ny: Tz = chrono_tz::America::New_York;
        // Enrolled in winter (UTC−5); DST starts 2026-03-08; day 8 due 03-08, window closes 03-10.
        let enrolled = at("2026-03-01T15:00:00Z");
        let o = occurrence(8);
        // 04:30Z on 03-11 is 00:30 EDT on 03-11 (late); a fixed UTC−5 offset would say 23:30 on
        // 03-10 (in window).
        assert_eq!(window_status(&o, enrolled, at("2026-03-11T04:30:00Z"), ny), WindowStatus::Late);
        assert_eq!(window_status(&o, enrolled, at("2026-03-11T03:30:00Z"), ny), WindowStatus::InWindow);
        // And back: enrolled in summer (UTC−4), DST ends 2026-11-01; day 8 due 11-03, closes 11-05.
        let enrolled = at("2026-10-27T15:00:00Z");
        // 04:30Z on 11-06 is 23:30 EST on 11-05 (in window); a fixed UTC−4 offset would say 00:30 on 11-06.
        assert_eq!(window_status(&o, enrolled, at("2026-11-06T04:30:00Z"), ny), WindowStatus::InWindow);
        assert_eq!(window_status(&o, enrolled, at("2026-11-06T05:00:00Z"), ny), WindowStatus::Late);
    }

    #[test]
    fn the_enrollment_date_is_taken_in_the_subjects_zone() {
        // 02:00Z on 06-02 is still 06-01 in New York: day 1 is 06-01 there, 06-02 in Berlin.
        let enrolled = at("2026-06-02T02:00:00Z");
        let o = Occurrence { window_before_days: 0, window_after_days: 0, grace_days: 0, ..occurrence(1) };
        let authored = at("2026-06-01T20:00:00Z");
        assert_eq!(
            window_status(&o, enrolled, authored, chrono_tz::America::New_York),
            WindowStatus::InWindow
        );
        assert_eq!(
            window_status(&o, enrolled, authored, chrono_tz::Europe::Berlin),
            WindowStatus::OutOfWindow
        );
    }
}
