//! Gates before randomization and the stratum a request falls in (pure rules, no IO).
//!
//! Gates (sources: `docs/domain-rules.md`): consent signed, eligibility assessed eligible,
//! every stratification factor present with an allowed value (OpenClinica OC-10931). Every failing
//! gate is reported, each with a machine-readable code, so a site fixes everything at once.

use trialflow_schemas::{StratificationFactor, StratumValue};

pub const CONSENT_MISSING: &str = "CONSENT_MISSING";
pub const ELIGIBILITY_NOT_ASSESSED: &str = "ELIGIBILITY_NOT_ASSESSED";
pub const NOT_ELIGIBLE: &str = "NOT_ELIGIBLE";
pub const STRATUM_MISSING: &str = "STRATUM_MISSING";
pub const STRATUM_VALUE_UNKNOWN: &str = "STRATUM_VALUE_UNKNOWN";
pub const STRATUM_FACTOR_UNKNOWN: &str = "STRATUM_FACTOR_UNKNOWN";
pub const SUBJECT_WITHDRAWN: &str = "SUBJECT_WITHDRAWN";
pub const LIST_EXHAUSTED: &str = "LIST_EXHAUSTED";

/// What the saga knows about a subject when enrollment is requested.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubjectFacts {
    pub consent_version: Option<String>,
    /// `None` until eligibility was assessed.
    pub eligible: Option<bool>,
    pub eligibility_detail: Option<String>,
    pub withdrawn: bool,
}

/// One failed gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateFailure {
    pub code: &'static str,
    pub detail: String,
}

impl GateFailure {
    fn new(code: &'static str, detail: impl Into<String>) -> Self {
        Self { code, detail: detail.into() }
    }
}

/// A stratum: the combination of one value per factor, in the study's factor order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stratum {
    /// E.g. `AGEGRP=<65|SITEGR1=701`; `ALL` for a study without factors.
    pub key: String,
    /// Position among all strata of the study (mixed-radix over the factors' values): gives each
    /// stratum its own range of randomization numbers.
    pub ordinal: u32,
}

/// The stratum of `values`, or every factor that is missing, unknown or has a value not allowed.
pub fn stratum(
    factors: &[StratificationFactor],
    values: &[StratumValue],
) -> Result<Stratum, Vec<GateFailure>> {
    let mut failures: Vec<GateFailure> = values
        .iter()
        .filter(|v| !factors.iter().any(|f| f.factor == v.factor))
        .map(|v| {
            GateFailure::new(STRATUM_FACTOR_UNKNOWN, format!("unknown stratification factor {}", v.factor))
        })
        .collect();
    let mut parts = Vec::with_capacity(factors.len());
    let mut ordinal: u32 = 0;
    for factor in factors {
        let given: Vec<&StratumValue> = values.iter().filter(|v| v.factor == factor.factor).collect();
        match given.as_slice() {
            [] => failures.push(GateFailure::new(STRATUM_MISSING, format!("{} not given", factor.factor))),
            [v] => match factor.values.iter().position(|allowed| *allowed == v.value) {
                Some(index) => {
                    ordinal = ordinal * factor.values.len() as u32 + index as u32;
                    parts.push(format!("{}={}", factor.factor, v.value));
                }
                None => failures.push(GateFailure::new(
                    STRATUM_VALUE_UNKNOWN,
                    format!("{}={} is not one of {:?}", factor.factor, v.value, factor.values),
                )),
            },
            _ => failures.push(GateFailure::new(
                STRATUM_VALUE_UNKNOWN,
                format!("{} given {} times", factor.factor, given.len()),
            )),
        }
    }
    if !failures.is_empty() {
        return Err(failures);
    }
    let key = if parts.is_empty() { "ALL".to_string() } else { parts.join("|") };
    Ok(Stratum { key, ordinal })
}

/// Every stratum of a study, in ordinal order.
pub fn all_strata(factors: &[StratificationFactor]) -> Vec<Stratum> {
    let mut combos: Vec<Vec<StratumValue>> = vec![Vec::new()];
    for factor in factors {
        combos = combos
            .into_iter()
            .flat_map(|combo| {
                factor.values.iter().map(move |value| {
                    let mut next = combo.clone();
                    next.push(StratumValue { factor: factor.factor.clone(), value: value.clone() });
                    next
                })
            })
            .collect();
    }
    combos.iter().filter_map(|values| stratum(factors, values).ok()).collect()
}

/// Checks every gate; the stratum when all pass.
pub fn check(
    facts: &SubjectFacts,
    factors: &[StratificationFactor],
    values: &[StratumValue],
) -> Result<Stratum, Vec<GateFailure>> {
    let mut failures = Vec::new();
    if facts.withdrawn {
        failures.push(GateFailure::new(SUBJECT_WITHDRAWN, "the subject has withdrawn"));
    }
    if facts.consent_version.is_none() {
        failures.push(GateFailure::new(CONSENT_MISSING, "no signed consent recorded"));
    }
    match facts.eligible {
        None => failures.push(GateFailure::new(ELIGIBILITY_NOT_ASSESSED, "eligibility not assessed")),
        Some(false) => failures.push(GateFailure::new(
            NOT_ELIGIBLE,
            facts.eligibility_detail.clone().unwrap_or_else(|| "criteria not met".to_string()),
        )),
        Some(true) => {}
    }
    let stratum = stratum(factors, values);
    match stratum {
        Ok(stratum) if failures.is_empty() => Ok(stratum),
        Ok(_) => Err(failures),
        Err(more) => {
            failures.extend(more);
            Err(failures)
        }
    }
}

/// `EnrollmentOnHold.reason_code` (every code, comma-separated) and `reason` of failed gates.
pub fn hold_reason(failures: &[GateFailure]) -> (String, String) {
    let mut codes: Vec<&str> = Vec::new();
    for f in failures {
        if !codes.contains(&f.code) {
            codes.push(f.code);
        }
    }
    let reason = failures.iter().map(|f| format!("{}: {}", f.code, f.detail)).collect::<Vec<_>>().join("; ");
    (codes.join(","), reason)
}

/// The randomization number of a slot: the stratum's range, then the slot's place in its list.
/// Unique in the study by construction (and by a unique constraint).
pub fn randomization_number(stratum_ordinal: u32, sequence: u32) -> String {
    format!("R{:03}-{sequence:04}", stratum_ordinal + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn factors() -> Vec<StratificationFactor> {
        vec![
            StratificationFactor { factor: "AGEGRP".into(), values: vec!["<65".into(), ">=65".into()] },
            StratificationFactor {
                factor: "SITE".into(),
                values: vec!["701".into(), "702".into(), "703".into()],
            },
        ]
    }

    fn v(factor: &str, value: &str) -> StratumValue {
        StratumValue { factor: factor.into(), value: value.into() }
    }

    fn ready() -> SubjectFacts {
        SubjectFacts { consent_version: Some("v2".into()), eligible: Some(true), ..SubjectFacts::default() }
    }

    fn codes(r: Result<Stratum, Vec<GateFailure>>) -> Vec<&'static str> {
        r.err().unwrap_or_default().iter().map(|f| f.code).collect()
    }

    #[test]
    fn a_ready_subject_gets_its_stratum_whatever_the_order_of_values() {
        let s = check(&ready(), &factors(), &[v("SITE", "702"), v("AGEGRP", ">=65")]);
        assert_eq!(s, Ok(Stratum { key: "AGEGRP=>=65|SITE=702".into(), ordinal: 4 }));
    }

    #[test]
    fn every_failed_gate_is_reported() {
        let facts = SubjectFacts { consent_version: None, eligible: None, ..SubjectFacts::default() };
        let r = check(&facts, &factors(), &[v("AGEGRP", "old"), v("BMI", "high")]);
        assert_eq!(
            codes(r),
            vec![
                CONSENT_MISSING,
                ELIGIBILITY_NOT_ASSESSED,
                STRATUM_FACTOR_UNKNOWN,
                STRATUM_VALUE_UNKNOWN,
                STRATUM_MISSING
            ]
        );
    }

    #[test]
    fn each_gate_fails_alone() {
        let f = factors();
        let all = [v("AGEGRP", "<65"), v("SITE", "701")];
        let no_consent = SubjectFacts { consent_version: None, ..ready() };
        assert_eq!(codes(check(&no_consent, &f, &all)), vec![CONSENT_MISSING]);
        let ineligible = SubjectFacts { eligible: Some(false), ..ready() };
        assert_eq!(codes(check(&ineligible, &f, &all)), vec![NOT_ELIGIBLE]);
        let unassessed = SubjectFacts { eligible: None, ..ready() };
        assert_eq!(codes(check(&unassessed, &f, &all)), vec![ELIGIBILITY_NOT_ASSESSED]);
        let withdrawn = SubjectFacts { withdrawn: true, ..ready() };
        assert_eq!(codes(check(&withdrawn, &f, &all)), vec![SUBJECT_WITHDRAWN]);
        assert_eq!(codes(check(&ready(), &f, &all[..1])), vec![STRATUM_MISSING]);
        let twice = [v("AGEGRP", "<65"), v("AGEGRP", ">=65"), v("SITE", "701")];
        assert_eq!(codes(check(&ready(), &f, &twice)), vec![STRATUM_VALUE_UNKNOWN]);
    }

    #[test]
    fn strata_are_enumerated_with_distinct_ordinals() {
        let strata = all_strata(&factors());
        assert_eq!(strata.len(), 6);
        assert_eq!(strata.iter().map(|s| s.ordinal).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(strata[0].key, "AGEGRP=<65|SITE=701");
        assert_eq!(all_strata(&[]), vec![Stratum { key: "ALL".into(), ordinal: 0 }]);
    }

    #[test]
    fn hold_reasons_list_each_code_once() {
        let failures = vec![
            GateFailure::new(STRATUM_MISSING, "AGEGRP not given"),
            GateFailure::new(STRATUM_MISSING, "SITE not given"),
            GateFailure::new(CONSENT_MISSING, "no signed consent recorded"),
        ];
        let (code, reason) = hold_reason(&failures);
        assert_eq!(code, "STRATUM_MISSING,CONSENT_MISSING");
        assert!(reason.contains("AGEGRP not given") && reason.contains("SITE not given"));
    }

    #[test]
    fn randomization_numbers_differ_across_strata_and_slots() {
        assert_eq!(randomization_number(0, 7), "R001-0007");
        assert_ne!(randomization_number(1, 7), randomization_number(0, 7));
    }
}
