//! Who is who and what each input says, as functions of the study, an index and the timeline
//! (no IO): the study with its arms, factor and kit type, the sites and their kits, each subject's
//! screening, consent and enrollment request, and the steady state's vital signs and PHQ-9
//! submissions. The same settings give the same ids and bodies every run, which is what makes a
//! rerun idempotent.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, Utc};
use trialflow_producers::site_api::kits::{Kit, ReceiveShipment};
use trialflow_producers::site_api::studies::{
    Arm, CreateSite, CreateStudy, Criterion, Eligibility, Factor, KitType, Randomization,
};
use trialflow_producers::site_api::subjects::{RequestEnrollment, ScreenSubject, SignConsent};
use trialflow_schemas::{
    Answer, Envelope, Event, PartialDateTime, QuestionnaireResponseSubmitted, ResponseStatus, Timestamp,
    VitalSignRecorded,
};
use uuid::Uuid;

use super::config::LoadConfig;

/// One steady-state input in this many is a PHQ-9 submission, the others are vital signs.
pub const EPRO_EVERY: u64 = 5;

const ARMS: [&str; 3] = ["PBO", "LOW", "HIGH"];
const FACTOR: &str = "AGEGR";
const CRITERION: &str = "INC01";
const KIT_TYPE: &str = "BOX";
/// Kits per shipment request (the site API takes up to 5,000; smaller ones keep each event small).
const KITS_PER_SHIPMENT: u64 = 1_000;
const TIME_ZONES: [&str; 4] = ["Europe/Berlin", "America/New_York", "Asia/Tokyo", "Australia/Sydney"];
/// PHQ-9 items 1–9 (LOINC), then the difficulty item, asked only when an item is above 0.
const PHQ9_ITEMS: [&str; 9] =
    ["44250-9", "44255-8", "44259-0", "44254-1", "44251-7", "44258-2", "44252-5", "44253-3", "44260-8"];
const PHQ9_DIFFICULTY: &str = "69722-7";
/// Vital signs sent, each with a range well inside every default monitoring rule's limits:
/// (LOINC, UCUM unit, lowest value, width of the range).
const VITALS: [(&str, &str, f64, f64); 5] = [
    ("8867-4", "/min", 60.0, 30.0),    // heart rate
    ("8310-5", "Cel", 36.4, 0.9),      // body temperature
    ("59408-5", "%", 95.0, 4.0),       // SpO2
    ("8480-6", "mm[Hg]", 110.0, 25.0), // systolic blood pressure
    ("8462-4", "mm[Hg]", 70.0, 15.0),  // diastolic blood pressure
];

/// Who is who: every id is a function of the study and an index. And what each input says: a
/// function of the index and the timeline (`epoch`, `rate`).
#[derive(Debug)]
pub(super) struct Plan {
    pub(super) study: String,
    pub(super) subjects: u64,
    pub(super) sites: u64,
    /// Uuid namespace of this study's generated ids.
    namespace: Uuid,
    /// Start of the study's timeline (see [`LoadConfig::epoch`]).
    epoch: DateTime<Utc>,
    /// Inputs per second: steady-state input `i` happened `(3 × subjects + i) / rate` after `epoch`.
    rate: u32,
}

impl Plan {
    pub(super) fn new(config: &LoadConfig) -> Self {
        let load = Uuid::new_v5(&Uuid::NAMESPACE_URL, b"https://trialflow.invalid/load");
        Self {
            study: config.study.clone(),
            subjects: u64::from(config.subjects),
            sites: u64::from(config.sites),
            namespace: Uuid::new_v5(&load, config.study.as_bytes()),
            epoch: config.epoch,
            rate: config.rate,
        }
    }

    pub(super) fn id(&self, kind: &str, index: u64) -> Uuid {
        Uuid::new_v5(&self.namespace, format!("{kind}/{index}").as_bytes())
    }

    /// An idempotency key naming the command: stable across runs of this study.
    pub(super) fn key(&self, command: &str, id: &str) -> String {
        format!("load/{}/{command}/{id}", self.study)
    }

    pub(super) fn site_id(&self, site: u64) -> String {
        format!("S{:03}", site + 1)
    }

    /// Subjects are numbered from 0 and dealt to the sites in turn.
    pub(super) fn site_of(&self, subject: u64) -> u64 {
        subject % self.sites
    }

    pub(super) fn subject_id(&self, subject: u64) -> String {
        format!("{}-{:06}", self.site_id(self.site_of(subject)), subject + 1)
    }

    pub(super) fn subjects_at(&self, site: u64) -> u64 {
        self.subjects / self.sites + u64::from(site < self.subjects % self.sites)
    }

    /// One kit per arm for every subject of the site: whatever arms the lists deal, nobody waits.
    pub(super) fn kits_at(&self, site: u64) -> u64 {
        self.subjects_at(site) * ARMS.len() as u64
    }

    pub(super) fn kits(&self) -> u64 {
        (0..self.sites).map(|s| self.kits_at(s)).sum()
    }

    pub(super) fn age(&self, subject: u64) -> i32 {
        18 + (subject * 37 % 68) as i32
    }

    pub(super) fn time_zone(&self, site: u64) -> &'static str {
        TIME_ZONES[(site % TIME_ZONES.len() as u64) as usize]
    }

    /// Site `site`, in its time zone.
    pub(super) fn site(&self, site: u64) -> CreateSite {
        let site_id = self.site_id(site);
        CreateSite {
            site_id: site_id.clone(),
            name: format!("Load site {site_id}"),
            country: None,
            time_zone: self.time_zone(site).to_string(),
            occurred_at: None,
        }
    }

    /// The screening of `subject`: of age, the inclusion criterion met.
    pub(super) fn screening(&self, subject: u64) -> ScreenSubject {
        ScreenSubject {
            site_id: self.site_id(self.site_of(subject)),
            screening_number: format!("SCR-{:06}", subject + 1),
            subject_id: Some(self.subject_id(subject)),
            age_years: Some(self.age(subject)),
            sex: Some(if subject.is_multiple_of(2) { "F" } else { "M" }.into()),
            time_zone: None,
            criteria: BTreeMap::from([(CRITERION.to_string(), true)]),
            occurred_at: None,
        }
    }

    /// Consent, signed on the day the timeline starts.
    pub(super) fn consent(&self) -> SignConsent {
        SignConsent {
            consent_version: "v1".into(),
            signed_at: self.epoch.format("%Y-%m-%d").to_string(),
            occurred_at: None,
        }
    }

    /// The enrollment request of `subject`, in the stratum of its age.
    pub(super) fn enrollment_request(&self, subject: u64) -> RequestEnrollment {
        let stratum = if self.age(subject) < 65 { "<65" } else { ">=65" };
        RequestEnrollment {
            strata: BTreeMap::from([(FACTOR.to_string(), stratum.to_string())]),
            occurred_at: None,
        }
    }

    pub(super) fn study_request(&self) -> CreateStudy {
        let seed = self.id("randomization-seed", 0).as_u64_pair().0 as i64;
        CreateStudy {
            study_id: self.study.clone(),
            title: format!("Synthetic load {}", self.study),
            arms: ARMS
                .iter()
                .map(|code| Arm { arm_code: code.to_string(), name: format!("Arm {code}"), ratio: 1 })
                .collect(),
            stratification_factors: vec![Factor {
                factor: FACTOR.into(),
                values: vec!["<65".into(), ">=65".into()],
            }],
            eligibility: Eligibility {
                min_age_years: Some(18),
                max_age_years: Some(85),
                criteria: vec![Criterion {
                    criterion_id: CRITERION.into(),
                    description: "Synthetic inclusion criterion".into(),
                }],
            },
            randomization: Randomization {
                seed,
                block_multiples: vec![1, 2],
                // Room for every subject in either stratum.
                slots_per_stratum: i32::try_from(self.subjects).unwrap_or(i32::MAX),
                warn_slots_left: 0,
            },
            kit_types: vec![KitType {
                kit_type: KIT_TYPE.into(),
                do_not_dispense_days: 30,
                do_not_count_days: 14,
                // Stock never counts as low: no SiteStockLow alerts from the surplus being used up.
                low_stock_threshold: 0,
            }],
            enrollment_kit_type: KIT_TYPE.into(),
            occurred_at: None,
        }
    }

    /// The site's kits, one per arm for each of its subjects, in shipments of at most
    /// [`KITS_PER_SHIPMENT`]; they expire three years after the timeline starts.
    pub(super) fn shipments(&self, site: u64) -> Vec<ReceiveShipment> {
        let site_id = self.site_id(site);
        let expiry = format!("{}-12-31", self.epoch.year() + 3);
        let kits: Vec<Kit> = (0..self.kits_at(site))
            .map(|n| Kit {
                kit_number: format!("{site_id}-K{:06}", n + 1),
                sequence_number: n as i64 + 1,
                kit_type: KIT_TYPE.into(),
                lot: "LOAD-1".into(),
                expiry_date: expiry.clone(),
                arm_code: ARMS[(n % ARMS.len() as u64) as usize].into(),
            })
            .collect();
        kits.chunks(KITS_PER_SHIPMENT as usize)
            .enumerate()
            .map(|(i, kits)| ReceiveShipment {
                shipment_id: format!("{site_id}-SH{:03}", i + 1),
                kits: kits.to_vec(),
                occurred_at: None,
            })
            .collect()
    }

    /// When steady-state input `i` happened on the study's timeline: after the enrollment phase's
    /// slots, at the same rate. A first run sends each input no earlier than that, so nothing is
    /// authored in the future.
    pub(super) fn clinical_time(&self, i: u64) -> DateTime<Utc> {
        let slot = 3 * self.subjects + i;
        let micros = slot.saturating_mul(1_000_000) / u64::from(self.rate);
        self.epoch + chrono::Duration::microseconds(i64::try_from(micros).unwrap_or(i64::MAX))
    }

    /// The subject of steady-state input `i`: round-robin.
    pub(super) fn steady_subject(&self, i: u64) -> (u64, String) {
        let subject = i % self.subjects;
        (self.site_of(subject), self.subject_id(subject))
    }

    pub(super) fn envelope(&self, event_type: &str, source: &str, i: u64, kind: &str) -> Envelope {
        let (site, subject_id) = self.steady_subject(i);
        let at = Timestamp::from(self.clinical_time(i));
        let mut envelope = Envelope::new(event_type, &self.study, source, at);
        envelope.event_id = self.id(kind, i);
        envelope.recorded_at = at;
        envelope.site_id = Some(self.site_id(site));
        envelope.subject_id = Some(subject_id);
        envelope
    }

    pub(super) fn vital(&self, i: u64) -> VitalSignRecorded {
        let (code, unit, low, width) = VITALS[(i / EPRO_EVERY % VITALS.len() as u64) as usize];
        // A spread of values inside the range, one decimal.
        let value = ((low + width * (i * 7919 % 101) as f64 / 100.0) * 10.0).round() / 10.0;
        let effective = self.clinical_time(i).format("%Y-%m-%dT%H:%M:%S").to_string();
        VitalSignRecorded {
            envelope: self.envelope(VitalSignRecorded::NAME, "edc", i, "vital"),
            observation_id: self.id("observation", i).to_string(),
            loinc_code: code.into(),
            value,
            unit: unit.into(),
            position: None,
            effective: PartialDateTime::parse(&effective),
            visit: None,
            visit_day: None,
        }
    }

    /// A PHQ-9 without a flag or a severe total: items 1–8 between 0 and 2, item 9 (self-harm) 0,
    /// and the difficulty item, which applies since an item is above 0.
    pub(super) fn phq9(&self, i: u64) -> QuestionnaireResponseSubmitted {
        let answer = |link_id: &str, value: u64| Answer::integer(link_id, value as i32);
        let mut items: Vec<Answer> =
            PHQ9_ITEMS.iter().enumerate().map(|(n, link)| answer(link, (i + n as u64) % 3)).collect();
        if let Some(item9) = items.last_mut() {
            item9.value_integer = Some(0);
        }
        items.push(answer(PHQ9_DIFFICULTY, i % 4));
        let (site, _) = self.steady_subject(i);
        QuestionnaireResponseSubmitted {
            envelope: self.envelope(QuestionnaireResponseSubmitted::NAME, "epro-app", i, "submission-event"),
            submission_id: self.id("submission", i),
            questionnaire: "PHQ-9".into(),
            questionnaire_version: "1.0".into(),
            scheduled_occurrence: None,
            status: ResponseStatus::Completed,
            authored_at: Timestamp::from(self.clinical_time(i)),
            device_time_zone: self.time_zone(site).into(),
            items,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(study: &str, subjects: u32, sites: u32) -> Plan {
        Plan::new(&LoadConfig { subjects, sites, ..LoadConfig::local(study, DateTime::UNIX_EPOCH) })
    }

    #[test]
    fn every_subject_of_a_site_has_a_kit_of_each_arm() {
        let plan = plan("S", 1003, 10);
        assert_eq!((0..10).map(|s| plan.subjects_at(s)).sum::<u64>(), 1003);
        assert_eq!(plan.subjects_at(0), 101);
        assert_eq!(plan.subjects_at(9), 100);
        assert_eq!(plan.kits(), 3 * 1003);
        assert!((0..1003).all(|s| (18..=85).contains(&plan.age(s))));
        assert_eq!(plan.subject_id(0), "S001-000001");
        assert_eq!(plan.subject_id(11), "S002-000012");
    }

    #[test]
    fn a_subject_is_screened_at_its_site_and_requested_in_the_stratum_of_its_age() {
        let plan = plan("S", 20, 3);
        let mut strata = std::collections::BTreeSet::new();
        for subject in 0..20 {
            let screening = plan.screening(subject);
            assert_eq!(screening.site_id, plan.site_id(plan.site_of(subject)));
            assert_eq!(screening.subject_id, Some(plan.subject_id(subject)));
            assert_eq!(screening.criteria.get(CRITERION), Some(&true));
            let Some(age) = screening.age_years else { panic!("an age") };
            let stratum = plan.enrollment_request(subject).strata[FACTOR].clone();
            assert_eq!(stratum, if age < 65 { "<65" } else { ">=65" });
            strata.insert(stratum);
        }
        assert_eq!(strata.len(), 2, "both strata are used");
        assert_eq!(plan.consent().signed_at, "1970-01-01", "consent is signed when the timeline starts");
    }

    #[test]
    fn ids_depend_on_the_study_and_the_index_only() {
        let (a, b) = (plan("A", 10, 2), plan("A", 20, 5));
        assert_eq!(a.id("vital", 7), b.id("vital", 7));
        assert_ne!(a.id("vital", 7), a.id("vital", 8));
        assert_ne!(a.id("vital", 7), plan("B", 10, 2).id("vital", 7));
    }
}
