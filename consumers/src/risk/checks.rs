//! Edit checks: declarative per-study checks over a subject's clinical data that find "data logic
//! errors" (pure, no IO). A failing check is a [`Finding`]; the evaluator opens a query for it
//! (see [`super::queries`]).
//!
//! | kind | judges | fails when |
//! |------|--------|------------|
//! | `required_date` | each reading and AE report | its date (effective time, onset) is missing or unreadable |
//! | `range` | readings of one LOINC code and unit | the value is outside `[min, max]` (plausible physiological limits) |
//! | `future_date` | each reading and AE report | its date is more than `tolerance_hours` after it was recorded |
//! | `diastolic_not_below_systolic` | a diastolic and a systolic reading of one time point (same effective time, position and visit) | diastolic ≥ systolic |
//! | `before_consent` | each reading and AE report with a day-precise date | dated before the consent date (when the consent date is known to the day) |
//! | `after_withdrawal` | each reading and AE report with a day-precise date | dated after the withdrawal date (a withdrawal for a reason other than death) |
//! | `after_death` | as `after_withdrawal` | dated after the withdrawal date of a subject withdrawn for a reason in `reason_codes` (default `DEATH`) |
//! | `weight_change` | consecutive readings of one code and unit, by effective time, of different days | the change exceeds `max_fraction` of the earlier value |
//!
//! Dates are compared by UTC calendar day; partial dates (a year, a month) are not judged by the
//! date checks. Checks judge the data known when they run: a subject's readings arrive in the
//! order its source sent them (the clinical topic is keyed by subject). A new data point is
//! judged with what the checks compare it with ([`Reach`]), and a consent or a withdrawal has all
//! of the subject's data judged again, so a check waiting for its partner (the consent, the other
//! half of a blood pressure, the next day's weight) fires when the partner arrives.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, NaiveDate, Utc};
use serde::Deserialize;
use uuid::Uuid;

/// One edit check of a study's configuration (unknown fields are refused by [`CheckKind`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EditCheck {
    /// Stable id (query ids derive from it): letters, digits, `_` and `-`.
    pub id: String,
    #[serde(flatten)]
    pub kind: CheckKind,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CheckKind {
    RequiredDate {},
    Range {
        code: String,
        name: String,
        unit: String,
        min: f64,
        max: f64,
    },
    FutureDate {
        tolerance_hours: u32,
    },
    DiastolicNotBelowSystolic {
        systolic: String,
        diastolic: String,
    },
    BeforeConsent {},
    AfterWithdrawal {},
    AfterDeath {
        #[serde(default = "death")]
        reason_codes: Vec<String>,
    },
    WeightChange {
        code: String,
        unit: String,
        max_fraction: f64,
    },
}

fn death() -> Vec<String> {
    vec!["DEATH".to_string()]
}

impl CheckKind {
    /// The kind's name as configured (`range`, `before_consent`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Self::RequiredDate {} => "required_date",
            Self::Range { .. } => "range",
            Self::FutureDate { .. } => "future_date",
            Self::DiastolicNotBelowSystolic { .. } => "diastolic_not_below_systolic",
            Self::BeforeConsent {} => "before_consent",
            Self::AfterWithdrawal {} => "after_withdrawal",
            Self::AfterDeath { .. } => "after_death",
            Self::WeightChange { .. } => "weight_change",
        }
    }
}

impl EditCheck {
    /// Whether the check can run: a usable id, finite limits in order, a positive fraction.
    pub fn validate(&self) -> Result<(), String> {
        let id_ok = !self.id.is_empty()
            && self.id.len() <= 64
            && self.id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !id_ok {
            return Err(format!(
                "edit check id \"{}\": 1 to 64 letters, digits, '_' or '-'",
                self.id.escape_debug()
            ));
        }
        let why = match &self.kind {
            CheckKind::Range { min, max, code, unit, .. } => {
                (!(min.is_finite() && max.is_finite() && min < max) || code.is_empty() || unit.is_empty())
                    .then(|| {
                        format!("a range needs a code, a unit and finite min < max (got {min} .. {max})")
                    })
            }
            CheckKind::WeightChange { max_fraction, code, unit } => (!(max_fraction.is_finite()
                && *max_fraction > 0.0)
                || code.is_empty()
                || unit.is_empty())
            .then(|| {
                format!("a weight change needs a code, a unit and a max_fraction > 0 (got {max_fraction})")
            }),
            CheckKind::DiastolicNotBelowSystolic { systolic, diastolic } => {
                (systolic.is_empty() || diastolic.is_empty() || systolic == diastolic)
                    .then(|| "systolic and diastolic need two different codes".to_string())
            }
            CheckKind::AfterDeath { reason_codes } => {
                reason_codes.is_empty().then(|| "after_death needs at least one reason code".to_string())
            }
            CheckKind::RequiredDate {}
            | CheckKind::FutureDate { .. }
            | CheckKind::BeforeConsent {}
            | CheckKind::AfterWithdrawal {} => None,
        };
        why.map_or(Ok(()), |why| Err(format!("edit check {}: {why}", self.id)))
    }
}

/// A date as the source gave it: its earliest instant, and whether it is precise to the day.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SourceDate {
    pub earliest: Option<DateTime<Utc>>,
    /// Day, minute or second precision (a year or a month alone is not).
    pub to_the_day: bool,
}

impl SourceDate {
    /// The calendar day, when the date is precise to it.
    fn day(&self) -> Option<NaiveDate> {
        self.earliest.filter(|_| self.to_the_day).map(|at| at.date_naive())
    }
}

/// One vital-sign reading.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub event_id: Uuid,
    pub code: String,
    pub name: String,
    pub value: f64,
    pub unit: String,
    pub position: Option<String>,
    pub visit: Option<String>,
    pub effective: SourceDate,
    pub recorded_at: DateTime<Utc>,
}

/// One adverse-event report.
#[derive(Debug, Clone, PartialEq)]
pub struct AeReport {
    pub event_id: Uuid,
    pub ae_id: String,
    pub term: String,
    pub onset: SourceDate,
    pub recorded_at: DateTime<Utc>,
}

/// Everything the checks know of one subject.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SubjectData {
    pub consented_on: Option<NaiveDate>,
    pub withdrawn_on: Option<NaiveDate>,
    pub withdrawal_reason: Option<String>,
    pub readings: Vec<Reading>,
    pub adverse_events: Vec<AeReport>,
}

/// What the checks compare a new reading with, beyond the reading itself and its subject's
/// dates: a check run on a subject's new data points plus these finds what a run on the whole
/// history finds of them (the evaluator's incremental pass, see [`super::queries`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reach {
    /// Codes compared at one time point (`diastolic_not_below_systolic`): a new reading of one of
    /// them needs the readings of all of them at its effective instant.
    pub time_point: BTreeSet<String>,
    /// Series compared day to day (`weight_change`), by code and unit: a new reading of one needs
    /// the readings of the series from the data day before the earliest new one to the data day
    /// after the latest new one (a contiguous stretch of days, so that consecutive days in what is
    /// read are consecutive in the whole series).
    pub days: BTreeSet<(String, String)>,
}

impl Reach {
    pub fn of(checks: &[EditCheck]) -> Self {
        let mut reach = Self::default();
        for check in checks {
            match &check.kind {
                CheckKind::DiastolicNotBelowSystolic { systolic, diastolic } => {
                    reach.time_point.insert(systolic.clone());
                    reach.time_point.insert(diastolic.clone());
                }
                CheckKind::WeightChange { code, unit, .. } => {
                    reach.days.insert((code.clone(), unit.clone()));
                }
                _ => {}
            }
        }
        reach
    }

    /// Whether `reading` is compared with readings of its time point.
    pub fn at_time_point(&self, reading: &Reading) -> bool {
        reading.effective.earliest.is_some() && self.time_point.contains(&reading.code)
    }

    /// The day `reading` has in a day-to-day series, when it is in one.
    pub fn day_in_series(&self, reading: &Reading) -> Option<NaiveDate> {
        let key = (reading.code.clone(), reading.unit.clone());
        reading.effective.day().filter(|_| self.days.contains(&key))
    }
}

/// A check that failed on a data point.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub check_id: String,
    pub check_kind: &'static str,
    /// The event type and, for a reading, its code: `VitalSignRecorded/8480-6`.
    pub item: String,
    /// The events judged, the data point first.
    pub data_event_ids: Vec<Uuid>,
    pub value: Option<String>,
    pub message: String,
}

impl Finding {
    /// The query's id: the same study, check and data always give the same id.
    pub fn query_id(&self, study_id: &str) -> Uuid {
        let ids: Vec<String> = self.data_event_ids.iter().map(Uuid::to_string).collect();
        let name = format!("{study_id}\n{}\n{}", self.check_id, ids.join(","));
        Uuid::new_v5(&QUERY_NAMESPACE, name.as_bytes())
    }
}

/// The UUID v5 namespace of query ids.
const QUERY_NAMESPACE: Uuid = Uuid::from_u128(0x6f2e_61a4_8d0b_4c1e_9a57_3b1d_2c4e_7f90);

/// A data point of either kind, as the date checks see it.
struct Dated {
    event_id: Uuid,
    item: String,
    what: String,
    date: SourceDate,
    recorded_at: DateTime<Utc>,
}

fn dated(subject: &SubjectData) -> Vec<Dated> {
    let readings = subject.readings.iter().map(|r| Dated {
        event_id: r.event_id,
        item: format!("VitalSignRecorded/{}", r.code),
        what: format!("{} {} {}", r.name, number(r.value), r.unit),
        date: r.effective,
        recorded_at: r.recorded_at,
    });
    let aes = subject.adverse_events.iter().map(|a| Dated {
        event_id: a.event_id,
        item: "AdverseEventReported".to_string(),
        what: format!("adverse event {} ({})", a.ae_id, a.term),
        date: a.onset,
        recorded_at: a.recorded_at,
    });
    readings.chain(aes).collect()
}

/// A value as people write it: no trailing `.0`.
fn number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 { format!("{value:.0}") } else { format!("{value}") }
}

/// Every finding of `checks` on one subject's data, in check order then data order.
pub fn run(checks: &[EditCheck], subject: &SubjectData) -> Vec<Finding> {
    let mut findings = Vec::new();
    for check in checks {
        let finding = |item: String, ids: Vec<Uuid>, value: Option<String>, message: String| Finding {
            check_id: check.id.clone(),
            check_kind: check.kind.name(),
            item,
            data_event_ids: ids,
            value,
            message,
        };
        match &check.kind {
            CheckKind::RequiredDate {} => {
                for d in dated(subject).into_iter().filter(|d| d.date.earliest.is_none()) {
                    let message = format!("{}: the date is missing or cannot be read", d.what);
                    findings.push(finding(d.item, vec![d.event_id], None, message));
                }
            }
            CheckKind::Range { code, name, unit, min, max } => {
                for r in subject.readings.iter().filter(|r| &r.code == code && &r.unit == unit) {
                    if r.value < *min || r.value > *max {
                        let value = format!("{} {unit}", number(r.value));
                        let message = format!(
                            "{name} {value} is outside the plausible range {}-{} {unit}",
                            number(*min),
                            number(*max)
                        );
                        findings.push(finding(
                            format!("VitalSignRecorded/{code}"),
                            vec![r.event_id],
                            Some(value),
                            message,
                        ));
                    }
                }
            }
            CheckKind::FutureDate { tolerance_hours } => {
                let tolerance = chrono::Duration::hours(i64::from(*tolerance_hours));
                for d in dated(subject) {
                    let Some(at) = d.date.earliest else { continue };
                    if at > d.recorded_at + tolerance {
                        let message = format!(
                            "{}: dated {} but recorded {}, a date in the future",
                            d.what,
                            at.date_naive(),
                            d.recorded_at.date_naive()
                        );
                        findings.push(finding(d.item, vec![d.event_id], Some(at.to_rfc3339()), message));
                    }
                }
            }
            CheckKind::DiastolicNotBelowSystolic { systolic, diastolic } => {
                // One time point: same effective instant, position and visit.
                let key =
                    |r: &Reading| (r.effective.earliest, r.position.clone(), r.visit.clone(), r.unit.clone());
                let mut systolics: BTreeMap<_, Vec<&Reading>> = BTreeMap::new();
                for r in
                    subject.readings.iter().filter(|r| &r.code == systolic && r.effective.earliest.is_some())
                {
                    systolics.entry(key(r)).or_default().push(r);
                }
                for d in subject.readings.iter().filter(|r| &r.code == diastolic) {
                    for s in systolics.get(&key(d)).into_iter().flatten() {
                        if d.value >= s.value {
                            let value = format!("{}/{} {}", number(s.value), number(d.value), d.unit);
                            let message = format!(
                                "diastolic {} is not below systolic {} {} at the same time point",
                                number(d.value),
                                number(s.value),
                                d.unit
                            );
                            findings.push(finding(
                                format!("VitalSignRecorded/{diastolic}"),
                                vec![d.event_id, s.event_id],
                                Some(value),
                                message,
                            ));
                        }
                    }
                }
            }
            CheckKind::BeforeConsent {} => {
                let Some(consent) = subject.consented_on else { continue };
                for d in dated(subject) {
                    if d.date.day().is_some_and(|day| day < consent) {
                        let message = format!(
                            "{}: dated {} before the consent of {consent}",
                            d.what,
                            d.date.day().unwrap_or(consent)
                        );
                        findings.push(finding(d.item, vec![d.event_id], None, message));
                    }
                }
            }
            CheckKind::AfterWithdrawal {} | CheckKind::AfterDeath { .. } => {
                let Some(withdrawn) = subject.withdrawn_on else { continue };
                let reason = subject.withdrawal_reason.as_deref().unwrap_or_default();
                let among = |codes: &[String]| codes.iter().any(|c| c.eq_ignore_ascii_case(reason));
                // A death is judged by `after_death` alone (when configured), not twice.
                let died = checks.iter().any(
                    |c| matches!(&c.kind, CheckKind::AfterDeath { reason_codes } if among(reason_codes)),
                );
                let applies = match &check.kind {
                    CheckKind::AfterDeath { reason_codes } => among(reason_codes),
                    _ => !died,
                };
                if !applies {
                    continue;
                }
                let after = if died { "the subject's death" } else { "the subject's withdrawal" };
                for d in dated(subject) {
                    if let Some(day) = d.date.day().filter(|day| *day > withdrawn) {
                        let message = format!("{}: dated {day}, after {after} on {withdrawn}", d.what);
                        findings.push(finding(d.item, vec![d.event_id], None, message));
                    }
                }
            }
            CheckKind::WeightChange { code, unit, max_fraction } => {
                let mut series: Vec<&Reading> = subject
                    .readings
                    .iter()
                    .filter(|r| &r.code == code && &r.unit == unit && r.effective.day().is_some())
                    .collect();
                series.sort_by(|a, b| {
                    (a.effective.earliest, a.event_id).cmp(&(b.effective.earliest, b.event_id))
                });
                // The last reading of each day stands for the day.
                let mut days: Vec<&Reading> = Vec::new();
                for r in series {
                    match days.last_mut() {
                        Some(last) if last.effective.day() == r.effective.day() => *last = r,
                        _ => days.push(r),
                    }
                }
                for pair in days.windows(2) {
                    let (before, now) = (pair[0], pair[1]);
                    if before.value <= 0.0 {
                        continue;
                    }
                    let change = (now.value - before.value) / before.value;
                    if change.abs() > *max_fraction {
                        let value = format!("{} → {} {unit}", number(before.value), number(now.value));
                        let message = format!(
                            "{} changed by {:+.1} % between {} and {} (more than {:.1} %)",
                            now.name,
                            change * 100.0,
                            before.effective.day().map_or_else(String::new, |d| d.to_string()),
                            now.effective.day().map_or_else(String::new, |d| d.to_string()),
                            max_fraction * 100.0
                        );
                        findings.push(finding(
                            format!("VitalSignRecorded/{code}"),
                            vec![now.event_id, before.event_id],
                            Some(value),
                            message,
                        ));
                    }
                }
            }
        }
    }
    findings
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn at(y: i32, m: u32, d: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, 9, 0, 0).single().unwrap_or_default()
    }

    fn day(y: i32, m: u32, d: u32) -> SourceDate {
        SourceDate { earliest: Some(at(y, m, d)), to_the_day: true }
    }

    fn reading(n: u128, code: &str, value: f64, unit: &str, when: SourceDate) -> Reading {
        Reading {
            event_id: Uuid::from_u128(n),
            code: code.to_string(),
            name: code.to_string(),
            value,
            unit: unit.to_string(),
            position: None,
            visit: Some("WEEK 2".to_string()),
            effective: when,
            recorded_at: at(2014, 1, 1),
        }
    }

    fn checks(json: &str) -> Vec<EditCheck> {
        let checks: Vec<EditCheck> = serde_json::from_str(json).unwrap_or_default();
        assert!(!checks.is_empty(), "the test's checks parse");
        checks
    }

    fn ids(findings: &[Finding]) -> Vec<(String, Vec<u128>)> {
        findings
            .iter()
            .map(|f| (f.check_id.clone(), f.data_event_ids.iter().map(|u| u.as_u128()).collect()))
            .collect()
    }

    #[test]
    fn a_value_outside_its_range_is_found_with_its_limits() {
        let c = checks(
            r#"[{"id": "SYSBP", "kind": "range", "code": "8480-6", "name": "Systolic", "unit": "mm[Hg]", "min": 60, "max": 250}]"#,
        );
        let subject = SubjectData {
            readings: vec![
                reading(1, "8480-6", 310.0, "mm[Hg]", day(2013, 1, 2)),
                reading(2, "8480-6", 250.0, "mm[Hg]", day(2013, 1, 3)),
                reading(3, "8480-6", 310.0, "kPa", day(2013, 1, 3)),
                reading(4, "8480-6", 59.5, "mm[Hg]", day(2013, 1, 4)),
            ],
            ..SubjectData::default()
        };
        let found = run(&c, &subject);
        assert_eq!(ids(&found), vec![("SYSBP".to_string(), vec![1]), ("SYSBP".to_string(), vec![4])]);
        assert_eq!(found[0].message, "Systolic 310 mm[Hg] is outside the plausible range 60-250 mm[Hg]");
        assert_eq!(found[1].value.as_deref(), Some("59.5 mm[Hg]"));
    }

    #[test]
    fn a_diastolic_at_or_above_its_systolic_is_found_at_the_same_time_point_only() {
        let c = checks(
            r#"[{"id": "BP", "kind": "diastolic_not_below_systolic", "systolic": "S", "diastolic": "D"}]"#,
        );
        let subject = SubjectData {
            readings: vec![
                reading(1, "S", 120.0, "mm[Hg]", day(2013, 1, 2)),
                reading(2, "D", 120.0, "mm[Hg]", day(2013, 1, 2)),
                // Another day: not the same time point.
                reading(3, "D", 130.0, "mm[Hg]", day(2013, 1, 3)),
                reading(4, "S", 140.0, "mm[Hg]", day(2013, 1, 4)),
                reading(5, "D", 80.0, "mm[Hg]", day(2013, 1, 4)),
            ],
            ..SubjectData::default()
        };
        let found = run(&c, &subject);
        assert_eq!(ids(&found), vec![("BP".to_string(), vec![2, 1])]);
        assert_eq!(found[0].value.as_deref(), Some("120/120 mm[Hg]"));
    }

    #[test]
    fn dates_before_consent_after_withdrawal_or_death_and_in_the_future_are_found() {
        let c = checks(
            r#"[{"id": "CONSENT", "kind": "before_consent"}, {"id": "WD", "kind": "after_withdrawal"},
                {"id": "DEATH", "kind": "after_death"}, {"id": "FUTURE", "kind": "future_date", "tolerance_hours": 24},
                {"id": "DATE", "kind": "required_date"}]"#,
        );
        let partial = SourceDate { earliest: Some(at(2012, 1, 1)), to_the_day: false };
        let mut subject = SubjectData {
            consented_on: NaiveDate::from_ymd_opt(2012, 6, 1),
            withdrawn_on: NaiveDate::from_ymd_opt(2013, 6, 1),
            withdrawal_reason: Some("ADVERSE EVENT".to_string()),
            readings: vec![
                reading(1, "S", 120.0, "mm[Hg]", day(2012, 5, 31)),
                reading(2, "S", 120.0, "mm[Hg]", day(2012, 6, 1)),
                reading(3, "S", 120.0, "mm[Hg]", day(2013, 6, 1)),
                reading(4, "S", 120.0, "mm[Hg]", day(2013, 6, 2)),
                // A year alone is not judged by the date checks.
                reading(5, "S", 120.0, "mm[Hg]", partial),
                reading(6, "S", 120.0, "mm[Hg]", day(2014, 1, 3)),
                reading(7, "S", 120.0, "mm[Hg]", SourceDate { earliest: None, to_the_day: false }),
            ],
            ..SubjectData::default()
        };
        let expected = vec![
            ("CONSENT".to_string(), vec![1]),
            ("WD".to_string(), vec![4]),
            ("WD".to_string(), vec![6]),
            ("FUTURE".to_string(), vec![6]),
            ("DATE".to_string(), vec![7]),
        ];
        assert_eq!(ids(&run(&c, &subject)), expected);
        // Withdrawn by death: the same readings are after the death, not after a withdrawal.
        subject.withdrawal_reason = Some("DEATH".to_string());
        let found = run(&c, &subject);
        assert_eq!(ids(&found)[1..3], [("DEATH".to_string(), vec![4]), ("DEATH".to_string(), vec![6])]);
        assert!(found[1].message.contains("after the subject's death on 2013-06-01"), "{}", found[1].message);
    }

    #[test]
    fn a_weight_change_beyond_the_fraction_between_days_is_found() {
        let c = checks(
            r#"[{"id": "WT", "kind": "weight_change", "code": "W", "unit": "kg", "max_fraction": 0.1}]"#,
        );
        let subject = SubjectData {
            readings: vec![
                reading(3, "W", 90.0, "kg", day(2013, 3, 1)),
                reading(1, "W", 80.0, "kg", day(2013, 1, 1)),
                reading(2, "W", 87.0, "kg", day(2013, 2, 1)),
                // Same day as 3: the day's last reading stands for it.
                reading(4, "W", 99.5, "kg", day(2013, 3, 1)),
            ],
            ..SubjectData::default()
        };
        let found = run(&c, &subject);
        // 80 → 87 (+8.75 %), 87 → 99.5 (+14.4 %, the day's last reading).
        assert_eq!(ids(&found), vec![("WT".to_string(), vec![4, 2])]);
        assert_eq!(found[0].value.as_deref(), Some("87 → 99.5 kg"));
    }

    #[test]
    fn query_ids_depend_on_study_check_and_data_only() {
        let f = Finding {
            check_id: "SYSBP".to_string(),
            check_kind: "range",
            item: "VitalSignRecorded/8480-6".to_string(),
            data_event_ids: vec![Uuid::from_u128(1)],
            value: None,
            message: "m".to_string(),
        };
        let mut other_message = f.clone();
        other_message.message = "another wording".to_string();
        assert_eq!(f.query_id("S1"), other_message.query_id("S1"));
        assert_ne!(f.query_id("S1"), f.query_id("S2"));
        let mut other_data = f.clone();
        other_data.data_event_ids = vec![Uuid::from_u128(2)];
        assert_ne!(f.query_id("S1"), other_data.query_id("S1"));
    }

    #[test]
    fn checks_that_cannot_run_are_refused() {
        for json in [
            r#"{"id": "", "kind": "before_consent"}"#,
            r#"{"id": "a b", "kind": "before_consent"}"#,
            r#"{"id": "R", "kind": "range", "code": "c", "name": "n", "unit": "u", "min": 5, "max": 5}"#,
            r#"{"id": "W", "kind": "weight_change", "code": "c", "unit": "u", "max_fraction": 0}"#,
            r#"{"id": "B", "kind": "diastolic_not_below_systolic", "systolic": "x", "diastolic": "x"}"#,
            r#"{"id": "D", "kind": "after_death", "reason_codes": []}"#,
        ] {
            let check: EditCheck = serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"));
            assert!(check.validate().is_err(), "{json}");
        }
        for json in [
            r#"{"id": "X", "kind": "nonsense"}"#,
            r#"{"id": "X", "kind": "range", "code": "c", "name": "n", "unit": "u", "min": "low", "max": 5}"#,
            r#"{"id": "X", "kind": "before_consent", "extra": 1}"#,
        ] {
            assert!(serde_json::from_str::<EditCheck>(json).is_err(), "{json}");
        }
    }
}
