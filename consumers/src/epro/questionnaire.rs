//! Questionnaire definitions as data, and the answer rules and scoring they imply (pure, no IO).
//!
//! A definition (JSON, `consumers/questionnaires/*.json`, versioned by `id` + `version`) lists its
//! items (FHIR `Questionnaire.item` in spirit): type, required flag, answer options with scores or a
//! numeric range, and skip logic (`enable_when`: the item is asked only when any/all conditions on
//! earlier answers hold). Scoring sums the scores of scored items and maps the total to a severity
//! band; flag rules mark answers that need follow-up (PHQ-9 item 9, LOINC 44260-8, > 0).

use std::collections::BTreeMap;

use serde::Deserialize;
use trialflow_schemas::{Answer, RejectionReason};

pub const UNKNOWN_ITEM: &str = "UNKNOWN_ITEM";
pub const DUPLICATE_ITEM: &str = "DUPLICATE_ITEM";
pub const REQUIRED_ITEM_MISSING: &str = "REQUIRED_ITEM_MISSING";
pub const ANSWER_OUT_OF_RANGE: &str = "ANSWER_OUT_OF_RANGE";
pub const ANSWER_WRONG_TYPE: &str = "ANSWER_WRONG_TYPE";
pub const ITEM_NOT_ENABLED: &str = "ITEM_NOT_ENABLED";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Questionnaire {
    pub id: String,
    pub version: String,
    pub title: String,
    /// LOINC panel code, where there is one.
    #[serde(default)]
    pub code: Option<String>,
    /// Where the instrument and its scoring come from.
    #[serde(default)]
    pub source: Option<String>,
    pub items: Vec<Item>,
    #[serde(default)]
    pub scoring: Option<Scoring>,
    #[serde(default)]
    pub flags: Vec<FlagRule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemType {
    /// One of `options`, answered with `value_integer` = the option's value.
    Choice,
    /// A whole number in `[min, max]`, answered with `value_integer`.
    Integer,
    /// Answered with `value_boolean`.
    Boolean,
    /// Free text, answered with `value_string`.
    String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Item {
    pub link_id: String,
    pub text: String,
    #[serde(rename = "type")]
    pub kind: ItemType,
    pub required: bool,
    /// Whether its score counts towards the total.
    #[serde(default)]
    pub scored: bool,
    #[serde(default)]
    pub options: Vec<AnswerOption>,
    #[serde(default)]
    pub min: Option<i64>,
    #[serde(default)]
    pub max: Option<i64>,
    #[serde(default)]
    pub enable_when: Option<EnableWhen>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswerOption {
    pub value: i32,
    pub display: String,
    pub score: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Behavior {
    Any,
    All,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnableWhen {
    pub behavior: Behavior,
    pub conditions: Vec<Condition>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Gt,
    Ge,
    Lt,
    Le,
    Eq,
    Ne,
}

impl Op {
    pub(crate) fn holds(self, left: i64, right: i64) -> bool {
        match self {
            Op::Gt => left > right,
            Op::Ge => left >= right,
            Op::Lt => left < right,
            Op::Le => left <= right,
            Op::Eq => left == right,
            Op::Ne => left != right,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    pub link_id: String,
    pub op: Op,
    pub value: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scoring {
    /// LOINC code of the total score, where there is one.
    #[serde(default)]
    pub total_code: Option<String>,
    pub bands: Vec<Band>,
}

/// A severity band: totals in `[min, max]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Band {
    pub min: i32,
    pub max: i32,
    pub label: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlagRule {
    pub link_id: String,
    pub op: Op,
    pub value: i64,
    /// What goes into `flagged_items` (by convention the item's link id).
    pub flag: String,
    pub reason: String,
}

/// What an accepted response scores.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Scored {
    pub total: Option<i32>,
    pub band: Option<String>,
    pub flagged: Vec<String>,
}

fn reason(code: &str, link_id: Option<&str>, detail: String) -> RejectionReason {
    RejectionReason { code: code.to_string(), link_id: link_id.map(str::to_string), detail }
}

/// The numeric value of an answer, for conditions and flags (booleans count as 0/1).
fn numeric(answer: &Answer) -> Option<i64> {
    answer.value_integer.map(i64::from).or(answer.value_boolean.map(i64::from))
}

impl Questionnaire {
    /// Checks that the definition is usable: unique link ids, skip logic and flags that refer to
    /// earlier items, options for choice items, a range for integer items.
    pub fn validate(&self) -> Result<(), String> {
        let mut seen: Vec<&str> = Vec::new();
        for item in &self.items {
            let name = format!("{} {}: item {}", self.id, self.version, item.link_id);
            if seen.contains(&item.link_id.as_str()) {
                return Err(format!("{name} appears twice"));
            }
            match item.kind {
                ItemType::Choice if item.options.is_empty() => return Err(format!("{name} has no options")),
                ItemType::Integer if item.min.is_none() || item.max.is_none() => {
                    return Err(format!("{name} needs min and max"));
                }
                _ => {}
            }
            for c in item.enable_when.iter().flat_map(|e| &e.conditions) {
                if !seen.contains(&c.link_id.as_str()) {
                    return Err(format!(
                        "{name}: enable_when refers to {} which is not an earlier item",
                        c.link_id
                    ));
                }
            }
            seen.push(&item.link_id);
        }
        for f in &self.flags {
            if !seen.contains(&f.link_id.as_str()) {
                return Err(format!("{} {}: flag on unknown item {}", self.id, self.version, f.link_id));
            }
        }
        Ok(())
    }

    /// Whether `item` is asked, given the answers so far (its skip logic).
    pub(crate) fn enabled(&self, item: &Item, answers: &BTreeMap<&str, &Answer>) -> bool {
        let Some(when) = &item.enable_when else { return true };
        let holds = |c: &Condition| {
            answers.get(c.link_id.as_str()).and_then(|a| numeric(a)).is_some_and(|v| c.op.holds(v, c.value))
        };
        match when.behavior {
            Behavior::Any => when.conditions.iter().any(holds),
            Behavior::All => when.conditions.iter().all(holds),
        }
    }

    /// Checks the answers against the definition and scores them; every problem is reported.
    pub fn check(&self, answers: &[Answer]) -> Result<Scored, Vec<RejectionReason>> {
        let mut problems = Vec::new();
        let mut by_link: BTreeMap<&str, &Answer> = BTreeMap::new();
        for a in answers {
            if !self.items.iter().any(|i| i.link_id == a.link_id) {
                problems.push(reason(
                    UNKNOWN_ITEM,
                    Some(&a.link_id),
                    format!("{} has no item {}", self.id, a.link_id),
                ));
            } else if by_link.insert(&a.link_id, a).is_some() {
                problems.push(reason(DUPLICATE_ITEM, Some(&a.link_id), "answered more than once".into()));
            }
        }
        let mut total: i64 = 0;
        for item in &self.items {
            let answer = by_link.get(item.link_id.as_str());
            let enabled = self.enabled(item, &by_link);
            match (answer, enabled) {
                (None, true) if item.required => problems.push(reason(
                    REQUIRED_ITEM_MISSING,
                    Some(&item.link_id),
                    format!("required item \"{}\" not answered", item.text),
                )),
                (None, _) => {}
                (Some(_), false) => problems.push(reason(
                    ITEM_NOT_ENABLED,
                    Some(&item.link_id),
                    "answered although its skip logic says it is not asked".into(),
                )),
                (Some(a), true) => match item_score(item, a) {
                    Ok(score) if item.scored => total += i64::from(score),
                    Ok(_) => {}
                    Err(problem) => problems.push(problem),
                },
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let total = self.scoring.as_ref().map(|_| i32::try_from(total).unwrap_or(i32::MAX));
        let band = self.scoring.as_ref().and_then(|s| {
            s.bands.iter().find(|b| total.is_some_and(|t| b.min <= t && t <= b.max)).map(|b| b.label.clone())
        });
        let flagged = self
            .flags
            .iter()
            .filter(|f| {
                by_link
                    .get(f.link_id.as_str())
                    .and_then(|a| numeric(a))
                    .is_some_and(|v| f.op.holds(v, f.value))
            })
            .map(|f| f.flag.clone())
            .collect();
        Ok(Scored { total, band, flagged })
    }
}

/// The score of one answer, or why it is not a valid answer to the item.
fn item_score(item: &Item, a: &Answer) -> Result<i32, RejectionReason> {
    let set = [
        a.value_integer.is_some(),
        a.value_decimal.is_some(),
        a.value_string.is_some(),
        a.value_boolean.is_some(),
    ]
    .iter()
    .filter(|s| **s)
    .count();
    let wrong = |expected: &str| {
        reason(
            ANSWER_WRONG_TYPE,
            Some(&item.link_id),
            format!("expected exactly one {expected} value, got {set}"),
        )
    };
    match item.kind {
        ItemType::Choice => {
            let Some(v) = a.value_integer.filter(|_| set == 1) else { return Err(wrong("value_integer")) };
            item.options.iter().find(|o| o.value == v).map(|o| o.score).ok_or_else(|| {
                let allowed: Vec<i32> = item.options.iter().map(|o| o.value).collect();
                reason(ANSWER_OUT_OF_RANGE, Some(&item.link_id), format!("{v} is not one of {allowed:?}"))
            })
        }
        ItemType::Integer => {
            let Some(v) = a.value_integer.filter(|_| set == 1) else { return Err(wrong("value_integer")) };
            let (min, max) = (item.min.unwrap_or(i64::MIN), item.max.unwrap_or(i64::MAX));
            if (min..=max).contains(&i64::from(v)) {
                Ok(v)
            } else {
                Err(reason(ANSWER_OUT_OF_RANGE, Some(&item.link_id), format!("{v} is outside {min}..={max}")))
            }
        }
        ItemType::Boolean => match a.value_boolean.filter(|_| set == 1) {
            Some(b) => Ok(i32::from(b)),
            None => Err(wrong("value_boolean")),
        },
        ItemType::String => match a.value_string.as_ref().filter(|_| set == 1) {
            Some(_) => Ok(0),
            None => Err(wrong("value_string")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phq9() -> Questionnaire {
        serde_json::from_str(include_str!("../../questionnaires/phq-9.v1.0.json"))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// PHQ-9 answers: `scores` for items 1–9, and the difficulty item when any is > 0.
    pub(crate) fn phq9_answers(scores: [i32; 9]) -> Vec<Answer> {
        let q = phq9();
        let mut answers: Vec<Answer> =
            q.items[..9].iter().zip(scores).map(|(i, s)| Answer::integer(&i.link_id, s)).collect();
        if scores.iter().any(|s| *s > 0) {
            answers.push(Answer::integer("69722-7", 1));
        }
        answers
    }

    fn codes(r: Result<Scored, Vec<RejectionReason>>) -> Vec<String> {
        r.err().unwrap_or_default().into_iter().map(|r| r.code).collect()
    }

    #[test]
    fn the_shipped_definitions_are_valid() {
        for text in [
            include_str!("../../questionnaires/phq-9.v1.0.json"),
            include_str!("../../questionnaires/gad-7.v1.0.json"),
            include_str!("../../questionnaires/nrs-pain.v1.0.json"),
        ] {
            let q: Questionnaire = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(q.validate(), Ok(()), "{}", q.id);
        }
    }

    #[test]
    fn phq9_totals_and_bands_at_their_boundaries() {
        let q = phq9();
        let band = |scores| q.check(&phq9_answers(scores)).ok().and_then(|s| s.band);
        assert_eq!(band([0; 9]).as_deref(), Some("minimal"));
        assert_eq!(band([1, 1, 1, 1, 0, 0, 0, 0, 0]).as_deref(), Some("minimal"), "4");
        assert_eq!(band([1, 1, 1, 1, 1, 0, 0, 0, 0]).as_deref(), Some("mild"), "5");
        assert_eq!(band([2, 2, 2, 2, 1, 0, 0, 0, 0]).as_deref(), Some("mild"), "9");
        assert_eq!(band([2, 2, 2, 2, 2, 0, 0, 0, 0]).as_deref(), Some("moderate"), "10");
        assert_eq!(band([3, 3, 3, 3, 3, 0, 0, 0, 0]).as_deref(), Some("moderately severe"), "15");
        assert_eq!(band([3, 3, 3, 3, 3, 3, 2, 0, 0]).as_deref(), Some("severe"), "20");
        let max = q.check(&phq9_answers([3; 9])).unwrap_or_default();
        assert_eq!(max.total, Some(27));
    }

    #[test]
    fn item_9_above_zero_is_flagged() {
        let q = phq9();
        let flagged = |scores| q.check(&phq9_answers(scores)).map(|s| s.flagged).unwrap_or_default();
        assert_eq!(flagged([0, 0, 0, 0, 0, 0, 0, 0, 1]), vec!["44260-8".to_string()]);
        assert!(flagged([3, 3, 3, 3, 3, 3, 3, 3, 0]).is_empty());
    }

    #[test]
    fn a_missing_required_item_is_named() {
        let mut answers = phq9_answers([1; 9]);
        answers.remove(2);
        let r = phq9().check(&answers);
        let problems = r.err().unwrap_or_default();
        assert_eq!(problems.len(), 1);
        assert_eq!(
            (problems[0].code.as_str(), problems[0].link_id.as_deref()),
            (REQUIRED_ITEM_MISSING, Some("44259-0"))
        );
    }

    #[test]
    fn skip_logic_decides_whether_an_item_is_asked() {
        let q = phq9();
        // All zero: the difficulty item is not asked; answering it is a client bug.
        assert!(q.check(&phq9_answers([0; 9])).is_ok());
        let mut answers = phq9_answers([0; 9]);
        answers.push(Answer::integer("69722-7", 0));
        assert_eq!(codes(q.check(&answers)), vec![ITEM_NOT_ENABLED]);
        // Any item above zero: it is asked and required.
        let mut answers = phq9_answers([0, 0, 1, 0, 0, 0, 0, 0, 0]);
        answers.pop();
        assert_eq!(codes(q.check(&answers)), vec![REQUIRED_ITEM_MISSING]);
    }

    #[test]
    fn answers_outside_the_options_or_range_or_of_the_wrong_type_are_refused() {
        let q = phq9();
        let mut answers = phq9_answers([1; 9]);
        answers[0].value_integer = Some(4);
        assert_eq!(codes(q.check(&answers)), vec![ANSWER_OUT_OF_RANGE]);
        answers[0].value_integer = Some(3);
        assert!(q.check(&answers).is_ok(), "3 is the highest option");
        answers[0].value_integer = None;
        answers[0].value_string = Some("3".into());
        assert_eq!(codes(q.check(&answers)), vec![ANSWER_WRONG_TYPE]);

        let nrs: Questionnaire =
            serde_json::from_str(include_str!("../../questionnaires/nrs-pain.v1.0.json"))
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            nrs.check(&[Answer::integer("72514-3", 10)]).ok().and_then(|s| s.band).as_deref(),
            Some("severe")
        );
        assert_eq!(nrs.check(&[Answer::integer("72514-3", 0)]).ok().and_then(|s| s.total), Some(0));
        assert_eq!(codes(nrs.check(&[Answer::integer("72514-3", 11)])), vec![ANSWER_OUT_OF_RANGE]);
        assert_eq!(codes(nrs.check(&[Answer::integer("72514-3", -1)])), vec![ANSWER_OUT_OF_RANGE]);
    }

    #[test]
    fn unknown_and_repeated_items_are_refused() {
        let q = phq9();
        let mut answers = phq9_answers([1; 9]);
        answers.push(Answer::integer("12345-6", 1));
        assert_eq!(codes(q.check(&answers)), vec![UNKNOWN_ITEM]);
        let mut answers = phq9_answers([1; 9]);
        answers.push(Answer::integer("44250-9", 1));
        assert_eq!(codes(q.check(&answers)), vec![DUPLICATE_ITEM]);
    }

    #[test]
    fn bad_definitions_are_refused_with_the_reason() {
        let mut q = phq9();
        q.items[9].enable_when = Some(EnableWhen {
            behavior: Behavior::Any,
            conditions: vec![Condition { link_id: "99999-9".into(), op: Op::Gt, value: 0 }],
        });
        assert!(q.validate().is_err_and(|e| e.contains("99999-9")));
        let mut q = phq9();
        q.items[1].link_id = q.items[0].link_id.clone();
        assert!(q.validate().is_err_and(|e| e.contains("twice")));
    }
}
