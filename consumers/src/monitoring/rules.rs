//! Monitoring rules as per-study configuration (JSON, versioned), and how a rule judges its input
//! (pure, no IO). Sources: `docs/domain-rules.md` (CTCAE v5.0 where it gives numbers,
//! "protocol" where the limit is a protocol choice).
//!
//! A vital-sign rule has conditions on LOINC codes (any may match: systolic ≥ 160 **or** diastolic
//! ≥ 100), each with a comparator, a threshold in a UCUM unit (and an optional inclusive upper
//! bound for ranges such as fever grade 1, 38.0–39.0 °C), and an aggregation:
//! * `single` — each reading on its own;
//! * `visit_mean` — the mean of the readings of one visit (three positions of one blood pressure
//!   measurement), so one visit is one judgement;
//! * `persistence` — matching readings that follow each other (by effective time, no
//!   non-matching reading between them) for longer than the given duration.
//!
//! A `vital_baseline` rule judges a reading against the subject's own history instead of a fixed
//! threshold (robust z-score against the median and MAD of the last readings before it, other
//! visits only; [`super::baseline`]).
//!
//! A rule never fires on less evidence than it declares: a visit mean with a minimum of N readings
//! needs N distinct readings of **one** visit, and a reading without a visit (or with a blank one)
//! is never a visit of its own, so it is judged by `single` rules (and by `persistence`, which
//! needs effective times, not visits) but never by `visit_mean` ones.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use trialflow_schemas::AlertSeverity;
use uuid::Uuid;

pub use super::baseline::Baseline;

const BUILTIN: &str = include_str!("../../rules/default.json");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSet {
    /// `*`: the default for studies without their own.
    pub study_id: String,
    pub version: i32,
    #[serde(default)]
    pub doc: Option<String>,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub rule_id: String,
    pub version: i32,
    pub title: String,
    pub severity: AlertSeverity,
    /// Where the limit comes from: "CTCAE v5.0 grade 3", or "protocol".
    pub source_label: String,
    /// Unacknowledged this long after raising (and after each escalation), an alert escalates.
    pub escalation_seconds: u32,
    pub input: RuleInput,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RuleInput {
    Vital {
        any: Vec<VitalCondition>,
        aggregation: Aggregation,
    },
    AdverseEvent {
        #[serde(default)]
        serious: Option<bool>,
        #[serde(default)]
        min_grade: Option<i32>,
    },
    Epro {
        questionnaire: String,
        #[serde(default)]
        flag: Option<String>,
        #[serde(default)]
        min_total: Option<i32>,
    },
    EnrollmentHold {
        reason_code: String,
    },
    SiteStockLow,
    /// `CodeBroken`: a subject's treatment code was broken (emergency unblinding). The alert says
    /// who broke it and why, never the treatment.
    CodeBreak,
    /// `KriFlagChanged` (risk service): a site's key risk indicator reached amber (`min_level` 1)
    /// or red (2) on either side. A site-level alert: which KRI, the site's value against the
    /// study's, the score.
    KriFlag {
        min_level: u8,
    },
    /// `QtlStatusChanged` (risk service): a study-level quality tolerance limit was breached. A
    /// study-level alert (no site, no subject) that a researcher evaluates and acknowledges with
    /// a reason.
    Qtl,
    /// A vital-sign reading far from the subject's own recent readings of the same code (robust
    /// z-score against their median and MAD, with a floor in the unit): [`super::baseline`].
    VitalBaseline(Baseline),
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Aggregation {
    Single,
    /// Judged once the visit has `min_readings` readings, and again with each further one.
    VisitMean {
        #[serde(default = "one")]
        min_readings: u32,
    },
    /// Matching readings no more than `max_gap_minutes` apart, spanning more than `minutes`.
    Persistence {
        minutes: u32,
        max_gap_minutes: u32,
    },
}

fn one() -> u32 {
    1
}

impl Aggregation {
    /// Whether the aggregation judges readings by their visit, so a reading without one has no
    /// place in it.
    pub fn needs_visit(self) -> bool {
        matches!(self, Self::VisitMean { .. })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Gt,
    Ge,
    Lt,
    Le,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VitalCondition {
    /// LOINC code of the reading.
    pub code: String,
    pub name: String,
    pub op: Op,
    pub value: f64,
    /// Inclusive upper bound, for ranges.
    #[serde(default)]
    pub max: Option<f64>,
    /// UCUM unit the threshold is in; readings in another unit do not match (and are logged).
    pub unit: String,
}

impl VitalCondition {
    pub fn matches_value(&self, value: f64) -> bool {
        let above = match self.op {
            Op::Gt => value > self.value,
            Op::Ge => value >= self.value,
            Op::Lt => value < self.value,
            Op::Le => value <= self.value,
        };
        above && self.max.is_none_or(|max| value <= max)
    }

    pub fn matches(&self, r: &Reading) -> bool {
        r.code == self.code && r.unit == self.unit && self.matches_value(r.value)
    }
}

/// One vital-sign reading, as the rules see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub event_id: Uuid,
    pub code: String,
    pub value: f64,
    pub unit: String,
    pub effective_at: DateTime<Utc>,
    pub visit: Option<String>,
}

impl Reading {
    /// The visit the reading was taken at; a blank name is no visit.
    pub fn visit(&self) -> Option<&str> {
        self.visit.as_deref().map(str::trim).filter(|v| !v.is_empty())
    }
}

/// The readings that make `current` trigger the condition under `aggregation`, or `None`.
/// `series` holds the subject's readings of the condition's code (with `current`), any order.
pub fn judge(
    condition: &VitalCondition,
    aggregation: Aggregation,
    current: &Reading,
    series: &[Reading],
) -> Option<Vec<Reading>> {
    if current.code != condition.code || current.unit != condition.unit {
        return None;
    }
    if aggregation.needs_visit() && current.visit().is_none() {
        // One reading without a visit is not "the mean of a visit" (it once raised a CRITICAL
        // severe hypertension "over 1 readings at -"): single-reading rules judge it.
        return None;
    }
    match aggregation {
        Aggregation::Single => condition.matches(current).then(|| vec![current.clone()]),
        Aggregation::VisitMean { min_readings } => {
            let visit = current.visit();
            let mut seen = std::collections::BTreeSet::new();
            // Each reading counts once (by event id), `current` too even if `series` lacks it.
            let readings: Vec<Reading> = series
                .iter()
                .chain(std::iter::once(current))
                .filter(|r| r.visit() == visit && r.code == condition.code && r.unit == condition.unit)
                .filter(|r| seen.insert(r.event_id))
                .cloned()
                .collect();
            if readings.len() < min_readings.max(1) as usize {
                return None;
            }
            let mean = readings.iter().map(|r| r.value).sum::<f64>() / readings.len() as f64;
            condition.matches_value(mean).then_some(readings)
        }
        Aggregation::Persistence { minutes, max_gap_minutes } => {
            if !condition.matches(current) {
                return None;
            }
            let mut sorted: Vec<&Reading> = series.iter().filter(|r| r.code == condition.code).collect();
            sorted.sort_by_key(|r| (r.effective_at, r.event_id));
            let at = sorted.iter().position(|r| r.event_id == current.event_id)?;
            let gap = chrono::Duration::minutes(i64::from(max_gap_minutes));
            let joined =
                |a: &Reading, b: &Reading| condition.matches(a) && b.effective_at - a.effective_at <= gap;
            let mut first = at;
            while first > 0 && joined(sorted[first - 1], sorted[first]) {
                first -= 1;
            }
            let mut last = at;
            while last + 1 < sorted.len()
                && joined(sorted[last], sorted[last + 1])
                && condition.matches(sorted[last + 1])
            {
                last += 1;
            }
            let span = sorted[last].effective_at - sorted[first].effective_at;
            (span > chrono::Duration::minutes(i64::from(minutes)))
                .then(|| sorted[first..=last].iter().map(|r| (*r).clone()).collect())
        }
    }
}

/// The rule sets the monitoring consumer applies: built-in defaults plus per-study sets from a
/// folder (`MONITORING_RULES_DIR`).
#[derive(Debug, Clone, Default)]
pub struct RuleBook {
    sets: BTreeMap<String, RuleSet>,
}

impl RuleBook {
    pub fn load(dir: Option<&Path>) -> Result<Self, String> {
        let mut book = Self::default();
        book.add("rules/default.json", BUILTIN)?;
        if let Some(dir) = dir {
            let mut files: Vec<_> = std::fs::read_dir(dir)
                .map_err(|e| format!("reading {}: {e}", dir.display()))?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "json"))
                .collect();
            files.sort();
            for path in files {
                let text =
                    std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
                book.add(&path.display().to_string(), &text)?;
            }
        }
        Ok(book)
    }

    fn add(&mut self, file: &str, text: &str) -> Result<(), String> {
        let set: RuleSet = serde_json::from_str(text).map_err(|e| format!("{file}: {e}"))?;
        let mut ids = std::collections::BTreeSet::new();
        for rule in &set.rules {
            if !ids.insert(rule.rule_id.as_str()) {
                return Err(format!("{file}: rule {} appears twice", rule.rule_id));
            }
            if let RuleInput::Vital { any, .. } = &rule.input
                && any.is_empty()
            {
                return Err(format!("{file}: rule {} has no condition", rule.rule_id));
            }
            if let RuleInput::VitalBaseline(baseline) = &rule.input {
                baseline.check().map_err(|e| format!("{file}: rule {}: {e}", rule.rule_id))?;
            }
            if let RuleInput::KriFlag { min_level } = &rule.input
                && !(1..=2).contains(min_level)
            {
                return Err(format!(
                    "{file}: rule {}: min_level must be 1 (amber) or 2 (red), not {min_level}",
                    rule.rule_id
                ));
            }
        }
        self.sets.insert(set.study_id.clone(), set);
        Ok(())
    }

    /// The study's rules (its own set, or the default one).
    pub fn rules(&self, study_id: &str) -> &[Rule] {
        self.sets.get(study_id).or_else(|| self.sets.get("*")).map_or(&[], |s| s.rules.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(minutes: i64) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp(1_780_000_000, 0).unwrap_or_default()
            + chrono::Duration::minutes(minutes)
    }

    fn reading(code: &str, value: f64, unit: &str, minutes: i64, visit: Option<&str>) -> Reading {
        Reading {
            event_id: Uuid::new_v4(),
            code: code.into(),
            value,
            unit: unit.into(),
            effective_at: at(minutes),
            visit: visit.map(str::to_string),
        }
    }

    fn rule(id: &str) -> Rule {
        let book = RuleBook::load(None).unwrap_or_default();
        book.rules("ANY").iter().find(|r| r.rule_id == id).cloned().unwrap_or_else(|| panic!("no rule {id}"))
    }

    fn vital(id: &str) -> (Vec<VitalCondition>, Aggregation) {
        match rule(id).input {
            RuleInput::Vital { any, aggregation } => (any, aggregation),
            _ => panic!("{id} is not a vital rule"),
        }
    }

    #[test]
    fn the_default_rule_set_loads_with_every_required_rule() {
        let book = RuleBook::load(None).unwrap_or_default();
        let ids: Vec<&str> = book.rules("S").iter().map(|r| r.rule_id.as_str()).collect();
        for id in [
            "CTCAE-HTN-G3",
            "PROTOCOL-HTN-SEVERE",
            "CTCAE-FEVER-G1",
            "CTCAE-FEVER-G4",
            "CTCAE-HYPOXIA-G3",
            "PROTOCOL-HR-HIGH",
            "BASELINE-WEIGHT",
            "SAE",
            "AE-GRADE-3",
            "PHQ9-ITEM9",
            "PHQ9-SEVERE",
            "HOLD-NO-KIT",
            "SITE-LOW-STOCK",
            "CODE-BREAK",
            "KRI-AMBER",
            "KRI-RED",
            "QTL-BREACH",
        ] {
            assert!(ids.contains(&id), "{id}");
        }
        assert_eq!(rule("PROTOCOL-HTN-SEVERE").source_label, "protocol", "not labelled as CTCAE");
    }

    #[test]
    fn the_default_weight_baseline_asks_for_5_kg_away_from_the_subjects_own_median() -> Result<(), String> {
        let weight = rule("BASELINE-WEIGHT");
        assert_eq!(weight.severity, AlertSeverity::Warning, "a reason to look, not a grade");
        let RuleInput::VitalBaseline(b) = &weight.input else { return Err("not a baseline rule".into()) };
        let kg = |day: i64, value: f64| {
            reading("29463-7", value, "kg", day * 24 * 60, Some(&format!("DAY {day}")))
        };
        // 70.0 70.4 69.8 70.2 → median 70.1, MAD 0.2 (σ ≈ 0.30): 74.5 is z ≈ 14.8 but only 4.4 kg.
        let history = [kg(0, 70.0), kg(14, 70.4), kg(28, 69.8), kg(42, 70.2)];
        assert!(crate::monitoring::baseline::judge(b, &kg(56, 74.5), &history).is_none(), "under 5 kg");
        let d = crate::monitoring::baseline::judge(b, &kg(56, 64.9), &history).ok_or("5.2 kg lost fires")?;
        assert!((d.median - 70.1).abs() < 1e-9 && (d.mad - 0.2).abs() < 1e-9, "{d:?}");
        Ok(())
    }

    #[test]
    fn hypertension_grade_3_at_its_boundaries() {
        let (any, agg) = vital("CTCAE-HTN-G3");
        let fires = |code: &str, v: f64| {
            let r = reading(code, v, "mm[Hg]", 0, None);
            any.iter().any(|c| judge(c, agg, &r, std::slice::from_ref(&r)).is_some())
        };
        assert!(fires("8480-6", 160.0) && !fires("8480-6", 159.0));
        assert!(fires("8462-4", 100.0) && !fires("8462-4", 99.0));
        let kpa = reading("8480-6", 200.0, "kPa", 0, None);
        assert!(judge(&any[0], agg, &kpa, std::slice::from_ref(&kpa)).is_none(), "other unit: no match");
    }

    #[test]
    fn fever_grades_are_ranges_that_do_not_overlap() {
        let grade = |v: f64| -> Vec<String> {
            ["CTCAE-FEVER-G1", "CTCAE-FEVER-G2", "CTCAE-FEVER-G3"]
                .iter()
                .filter(|id| {
                    let (any, agg) = vital(id);
                    let r = reading("8310-5", v, "Cel", 0, None);
                    judge(&any[0], agg, &r, std::slice::from_ref(&r)).is_some()
                })
                .map(|id| id.to_string())
                .collect()
        };
        assert!(grade(37.9).is_empty());
        assert_eq!(grade(38.0), vec!["CTCAE-FEVER-G1"]);
        assert_eq!(grade(39.0), vec!["CTCAE-FEVER-G1"]);
        assert_eq!(grade(39.1), vec!["CTCAE-FEVER-G2"]);
        assert_eq!(grade(40.0), vec!["CTCAE-FEVER-G2"]);
        assert_eq!(grade(40.1), vec!["CTCAE-FEVER-G3"]);
    }

    #[test]
    fn the_mean_of_a_visit_decides_not_each_position() {
        let (any, agg) = vital("PROTOCOL-HTN-SEVERE");
        let series = [
            reading("8480-6", 185.0, "mm[Hg]", 0, Some("WEEK 2")),
            reading("8480-6", 170.0, "mm[Hg]", 2, Some("WEEK 2")),
            reading("8480-6", 179.0, "mm[Hg]", 4, Some("WEEK 2")),
            reading("8480-6", 200.0, "mm[Hg]", 10_000, Some("WEEK 4")),
        ];
        // 185 alone is above 180 but one reading is not a visit; the visit's mean (178) is not.
        assert!(judge(&any[0], agg, &series[0], &series[..1]).is_none(), "waits for the visit's 3 readings");
        assert!(judge(&any[0], agg, &series[2], &series).is_none());
        assert!(
            judge(&any[0], agg, &series[3], &series).is_none(),
            "a single reading at week 4 is not judged"
        );
        let high = [
            reading("8480-6", 181.0, "mm[Hg]", 0, Some("V1")),
            reading("8480-6", 180.0, "mm[Hg]", 2, Some("V1")),
            reading("8480-6", 179.0, "mm[Hg]", 4, Some("V1")),
        ];
        assert_eq!(judge(&any[0], agg, &high[2], &high).map(|e| e.len()), Some(3), "mean exactly 180");
    }

    #[test]
    fn a_reading_without_a_visit_is_judged_by_single_rules_only() {
        let (severe, mean) = vital("PROTOCOL-HTN-SEVERE");
        let (grade3, single) = vital("CTCAE-HTN-G3");
        // The reproduced case: one systolic 200 without a visit.
        let lone = reading("8480-6", 200.0, "mm[Hg]", 0, None);
        assert!(judge(&severe[0], mean, &lone, std::slice::from_ref(&lone)).is_none(), "no visit mean");
        assert_eq!(judge(&grade3[0], single, &lone, std::slice::from_ref(&lone)).map(|e| e.len()), Some(1));
        // Three of them are no visit either, nor are blank visit names.
        let three: Vec<Reading> = (0..3).map(|i| reading("8480-6", 200.0, "mm[Hg]", i, None)).collect();
        assert!(three.iter().all(|r| judge(&severe[0], mean, r, &three).is_none()));
        let blank: Vec<Reading> = (0..3).map(|i| reading("8480-6", 200.0, "mm[Hg]", i, Some(" "))).collect();
        assert!(blank.iter().all(|r| judge(&severe[0], mean, r, &blank).is_none()), "a blank visit");
        // Visit-less readings do not fill up a visit.
        let mut mixed = three.clone();
        mixed.push(reading("8480-6", 200.0, "mm[Hg]", 5, Some("WEEK 2")));
        assert!(judge(&severe[0], mean, &mixed[3], &mixed).is_none(), "1 reading of WEEK 2, not 4");
        assert!(mean.needs_visit() && !single.needs_visit());
    }

    #[test]
    fn a_visit_mean_fires_only_with_its_minimum_of_distinct_readings_of_one_visit() {
        let (any, agg) = vital("PROTOCOL-HTN-SEVERE");
        assert_eq!(agg, Aggregation::VisitMean { min_readings: 3 });
        let series = [
            reading("8480-6", 200.0, "mm[Hg]", 0, Some("WEEK 2")),
            reading("8480-6", 200.0, "mm[Hg]", 2, Some("WEEK 2")),
            reading("8480-6", 200.0, "mm[Hg]", 10_000, Some("WEEK 4")),
        ];
        for current in &series {
            assert!(judge(&any[0], agg, current, &series).is_none(), "2 + 1 readings are not 3 of one visit");
        }
        // The same reading twice (a redelivery, a repeated row) is one reading.
        let repeated = [series[0].clone(), series[1].clone(), series[1].clone()];
        assert!(judge(&any[0], agg, &series[1], &repeated).is_none(), "a duplicate is not a third reading");
        // A third of WEEK 2: now the visit is judged, on exactly its three readings.
        let third = reading("8480-6", 200.0, "mm[Hg]", 4, Some("WEEK 2"));
        let full = [series[0].clone(), series[1].clone(), series[2].clone(), third.clone()];
        let evidence = judge(&any[0], agg, &third, &full).unwrap_or_default();
        assert_eq!(evidence.len(), 3);
        assert!(evidence.iter().all(|r| r.visit() == Some("WEEK 2")));
        // `current` counts even when the caller's series does not hold it yet.
        assert_eq!(judge(&any[0], agg, &third, &series[..2]).map(|e| e.len()), Some(3));
        // Other units and codes do not count toward the visit.
        let mixed = [series[0].clone(), series[1].clone(), reading("8480-6", 26.7, "kPa", 3, Some("WEEK 2"))];
        assert!(judge(&any[0], agg, &series[1], &mixed).is_none());
    }

    #[test]
    fn persistence_needs_an_unbroken_run_longer_than_the_duration() {
        let (any, agg) = vital("CTCAE-FEVER-G4");
        let day = 24 * 60;
        let run = [
            reading("8310-5", 40.5, "Cel", 0, None),
            reading("8310-5", 40.2, "Cel", day / 3, None),
            reading("8310-5", 40.6, "Cel", 2 * day / 3, None),
            reading("8310-5", 40.3, "Cel", day, None),
            reading("8310-5", 40.4, "Cel", day + 1, None),
        ];
        assert!(judge(&any[0], agg, &run[3], &run[..4]).is_none(), "exactly 24 h is not more than 24 h");
        assert_eq!(judge(&any[0], agg, &run[4], &run).map(|e| e.len()), Some(5));
        // Two high readings days apart are not a persistent fever: the gap breaks the run.
        let apart = [reading("8310-5", 40.5, "Cel", 0, None), reading("8310-5", 40.5, "Cel", 3 * day, None)];
        assert!(judge(&any[0], agg, &apart[1], &apart).is_none());
        // A normal reading in between breaks the run; a late reading fills in by effective time.
        let mut broken = run.to_vec();
        broken.push(reading("8310-5", 37.0, "Cel", day / 4, None));
        assert!(judge(&any[0], agg, &run[4], &broken).is_none());
        let late = reading("8310-5", 37.0, "Cel", day + 60, None);
        let mut with_late = run.to_vec();
        with_late.push(late);
        assert!(
            judge(&any[0], agg, &run[4], &with_late).is_some(),
            "a reading after the run does not break it"
        );
    }

    /// A rule set of one `vital_baseline` rule whose input is `input`.
    fn baseline_set(input: &str) -> String {
        format!(
            r#"{{"study_id": "B", "version": 1, "rules": [{{"rule_id": "SBP-BASELINE", "version": 1,
                "title": "t", "severity": "WARNING", "source_label": "protocol", "escalation_seconds": 60,
                "input": {input}}}]}}"#
        )
    }

    #[test]
    fn a_baseline_rule_loads_with_its_parameters_as_data() -> Result<(), String> {
        let mut book = RuleBook::default();
        book.add(
            "b.json",
            &baseline_set(
                r#"{"kind": "vital_baseline", "code": "8480-6", "name": "Systolic blood pressure",
                    "unit": "mm[Hg]", "window": 5, "min_history": 3, "max_abs_z": 3.5, "min_abs_change": 20}"#,
            ),
        )?;
        let RuleInput::VitalBaseline(b) = &book.rules("B")[0].input else {
            return Err("not a baseline rule".into());
        };
        assert_eq!((b.window, b.min_history, b.max_abs_z, b.min_abs_change), (5, 3, 3.5, 20.0));
        Ok(())
    }

    /// The example the docs give (`docs/examples/monitoring-baseline-rules.json`) loads.
    #[test]
    fn the_documented_baseline_example_loads() -> Result<(), String> {
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/examples/monitoring-baseline-rules.json");
        let text = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
        let mut book = RuleBook::default();
        book.add(file, &text)?;
        let rules = book.rules("EXAMPLE-BASELINE");
        assert_eq!(rules.len(), 2);
        assert!(rules.iter().all(|r| matches!(r.input, RuleInput::VitalBaseline(_))
            && r.severity == AlertSeverity::Warning
            && r.source_label.starts_with("protocol: subject-baseline deviation")));
        Ok(())
    }

    #[test]
    fn hostile_baseline_rules_are_refused_with_what_was_wrong() {
        let refused = |input: &str| RuleBook::default().add("b.json", &baseline_set(input)).err();
        let with = |fields: &str| {
            refused(&format!(
                r#"{{"kind": "vital_baseline", "code": "8480-6", "name": "SBP", "unit": "mm[Hg]", {fields}}}"#
            ))
            .unwrap_or_default()
        };
        let ok = r#""window": 5, "min_history": 3, "max_abs_z": 3.5, "min_abs_change": 20"#;
        assert_eq!(with(ok), "", "the reference rule loads");
        for (fields, says) in [
            (
                r#""window": 2, "min_history": 3, "max_abs_z": 3.5, "min_abs_change": 20"#,
                "b.json: rule SBP-BASELINE: window (2) must be at least min_history (3)",
            ),
            (
                r#""window": 5, "min_history": 1, "max_abs_z": 3.5, "min_abs_change": 20"#,
                "b.json: rule SBP-BASELINE: min_history must be at least 3, not 1",
            ),
            (
                r#""window": 5, "min_history": 3, "max_abs_z": 0, "min_abs_change": 20"#,
                "b.json: rule SBP-BASELINE: max_abs_z must be a number above 0, not 0",
            ),
            (
                r#""window": 5, "min_history": 3, "max_abs_z": 3.5, "min_abs_change": -5"#,
                "b.json: rule SBP-BASELINE: min_abs_change must be a number of at least 0, not -5",
            ),
        ] {
            assert_eq!(with(fields), says, "{fields}");
        }
        // Wrong types, missing and unknown fields, negative counts: the parser says which.
        for (fields, says) in [
            (
                r#""window": -5, "min_history": 3, "max_abs_z": 3.5, "min_abs_change": 20"#,
                "invalid value: integer `-5`",
            ),
            (
                r#""window": "5", "min_history": 3, "max_abs_z": 3.5, "min_abs_change": 20"#,
                "invalid type: string \"5\"",
            ),
            (
                r#""window": 5.5, "min_history": 3, "max_abs_z": 3.5, "min_abs_change": 20"#,
                "invalid type: floating point `5.5`",
            ),
            (
                r#""window": 5, "min_history": 3, "max_abs_z": null, "min_abs_change": 20"#,
                "invalid type: null",
            ),
            (
                r#""window": 5, "min_history": 3, "max_abs_z": 1e999, "min_abs_change": 20"#,
                "number out of range",
            ),
            (r#""window": 5, "min_history": 3, "max_abs_z": 3.5"#, "missing field `min_abs_change`"),
            (
                r#""window": 5, "min_history": 3, "max_abs_z": 3.5, "min_abs_change": 20, "k": 5"#,
                "unknown field `k`",
            ),
        ] {
            let message = with(fields);
            assert!(message.starts_with("b.json: ") && message.contains(says), "{fields}: {message}");
        }
        assert!(
            refused(
                r#"{"kind": "vital_baseline", "code": "8480-6", "name": "SBP", "unit": "", "window": 5,
                        "min_history": 3, "max_abs_z": 3.5, "min_abs_change": 20}"#
            )
            .is_some_and(|m| m.ends_with("code and unit must not be blank"))
        );
        assert!(refused(r#"{"kind": "vital_baselines"}"#).is_some_and(|m| m.contains("unknown variant")));
    }

    #[test]
    fn a_study_set_replaces_the_default_for_that_study() -> Result<(), String> {
        let dir = std::env::temp_dir().join(format!("trialflow-rules-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let set = r#"{"study_id": "S1", "version": 2, "rules": [{"rule_id": "HR", "version": 2, "title": "t",
            "severity": "HIGH", "source_label": "protocol", "escalation_seconds": 60,
            "input": {"kind": "vital", "aggregation": {"kind": "single"},
                      "any": [{"code": "8867-4", "name": "Heart rate", "op": "gt", "value": 100, "unit": "/min"}]}}]}"#;
        std::fs::write(dir.join("s1.json"), set).map_err(|e| e.to_string())?;
        let book = RuleBook::load(Some(&dir))?;
        assert_eq!(book.rules("S1").len(), 1);
        assert!(book.rules("S2").len() > 1);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
