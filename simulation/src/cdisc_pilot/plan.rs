//! The replay as data: the pilot's SDTM rows mapped to the commands, events and submissions that
//! would have reached trialflow had the study run on it, each at its instant on the study's
//! timeline. Pure: the same rows give the same plan, with the same ids, every time.
//!
//! * DM → the study (arms from the data, ratio 1:1:1), its sites, and for every subject a
//!   screening; screen failures answer the inclusion/exclusion criterion "not met" and stop there;
//!   randomized subjects then consent and are requested for enrollment on their reference start
//!   date (`RFSTDTC`). Randomization, kit allocation and enrollment are the pipeline's own work.
//! * Kit shipments are synthesized per site (the pilot has no inventory): per arm, enough kits for
//!   every randomized subject of the site plus a margin above the low-stock threshold, expiring
//!   on [`KIT_EXPIRY`], far beyond both the replayed timeline and the real clock.
//! * VS → `VitalSignRecorded` (LOINC, UCUM), one per row, the three positions of a visit kept.
//! * AE → `AdverseEventReported`, reported on its collection date (`AEDTC`), onset kept as given
//!   (partial dates stay partial).
//! * DS → a withdrawal through the site API for every randomized subject whose disposition event
//!   (`DSCAT` = `DISPOSITION EVENT`) is not `COMPLETED`: on the disposition date (`DSSTDTC`), with
//!   the standardized term (`DSDECOD`: `ADVERSE EVENT`, `WITHDRAWAL BY SUBJECT`, `DEATH`, ...) as
//!   the reason code and the verbatim term (`DSTERM`) as the reason. Screen failures also have a
//!   disposition event (`SCREEN FAILURE`); they are never randomized and are not withdrawn: DM
//!   already made them screen failures. A subject with several disposition events (none in the
//!   pilot) is withdrawn once, on the earliest.
//! * PHQ-9 responses are **synthetic**: the pilot's questionnaires (ADAS-Cog, NPI-X, ...) are not
//!   ones the validator knows, so every attended visit of weeks 2–26 gets a generated PHQ-9
//!   authored on the visit's date, with a few late syncs, exact duplicates and conflicting resends.
//!   None is generated for a visit after the subject's withdrawal (nor on its day: the diary is
//!   authored in the evening, the withdrawal recorded at noon): a withdrawn subject fills in no
//!   diary, and an invented one would only be there to be rejected.
//!
//! **After a withdrawal** the EDC still sends what it has (the pilot keeps collecting vital signs
//! and adverse events after many early terminations: safety follow-up), and the consumers' own
//! rules decide what becomes of it:
//! * monitoring does not look at withdrawals: a withdrawn subject's later vital signs and adverse
//!   events are judged like any other and raise or join alert episodes (safety signals do not stop
//!   at a withdrawal);
//! * enrollment marks the subject `withdrawn` (still counted as randomized and enrolled: the
//!   randomization number and kit stay with them) and would refuse a later enrollment request;
//!   kit allocation stops waiting for a kit for them (nothing to do for an enrolled subject);
//! * the ePRO validator rejects a response authored at or after the withdrawal with
//!   `SUBJECT_WITHDRAWN`; the plan sends none (above), while one authored before it and synced
//!   late is accepted like any late sync;
//! * the site API refuses any further command for the subject (409 `subject_withdrawn`), so the
//!   withdrawal is the subject's last site command and is never dated before its enrollment
//!   request (none is in the pilot; such a one would be recorded right after the request).
//!
//! Dates in the pilot have day precision. Event payload fields keep the raw value and its
//! precision (`effective`, `onset`, `signed_at`); an envelope needs an instant, and gets the
//! date at a fixed local time of the site (12:00 for site and EDC records), so that the date is
//! the same in UTC and in the site's zone.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Duration, NaiveDate, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
use sha2::{Digest, Sha256};
use trialflow_producers::site_api::kits::{Kit, ReceiveShipment};
use trialflow_producers::site_api::studies::{
    Arm, CreateSite, CreateStudy, Criterion, Eligibility, Factor, KitType, Randomization,
};
use trialflow_producers::site_api::subjects::{
    RequestEnrollment, ScreenSubject, SignConsent, WithdrawSubject,
};
use trialflow_schemas::{
    AdverseEventReported, Answer, Envelope, Event, PartialDateTime, QuestionnaireResponseSubmitted,
    ResponseStatus, Timestamp, VitalSignRecorded,
};
use uuid::Uuid;

use super::data::{Domains, Row};

pub const STUDY_ID: &str = "CDISCPILOT01";
/// `source_system` of the vital signs and adverse events (the upstream EDC).
pub const EDC_SOURCE: &str = "edc";
/// `source_system` of the synthetic ePRO submissions.
pub const APP_SOURCE: &str = "epro-app-synthetic";
/// The single stratification factor (from DM `SEX`).
pub const STRATUM_FACTOR: &str = "sex";
/// The criterion sites answer at screening; screen failures answer "not met".
pub const CRITERION: &str = "IE-ALL";
pub const KIT_TYPE: &str = "TTS-PATCH";
pub const LOW_STOCK_THRESHOLD: i32 = 2;
/// Expiry of every synthesized kit. The kit-allocation consumer judges expiry against the later of
/// the request's day and its own clock — the real one, years after the 2012–2015 timeline — so a
/// kit expiring on the timeline (say 2016) would never be dispensed. A fixed date (not "today +
/// N years") keeps the plan pure: the same shipment body every run, as the replay's idempotency
/// keys require.
pub const KIT_EXPIRY: &str = "2099-12-31";
/// Time zone of every site: the pilot does not say where its (US) sites are.
pub const SITE_TIME_ZONE: Tz = chrono_tz::America::New_York;
pub const PHQ9: &str = "PHQ-9";
pub const PHQ9_VERSION: &str = "1.0";
/// The visits with a (synthetic) PHQ-9, and their occurrence ids in the pilot's ePRO schedule.
pub const PHQ9_VISITS: &[(&str, &str)] = &[
    ("WEEK 2", "PHQ-9/W2"),
    ("WEEK 4", "PHQ-9/W4"),
    ("WEEK 6", "PHQ-9/W6"),
    ("WEEK 8", "PHQ-9/W8"),
    ("WEEK 12", "PHQ-9/W12"),
    ("WEEK 16", "PHQ-9/W16"),
    ("WEEK 20", "PHQ-9/W20"),
    ("WEEK 24", "PHQ-9/W24"),
    ("WEEK 26", "PHQ-9/W26"),
];
/// PHQ-9 items (LOINC) in order, the ninth the self-harm item; then the difficulty item, asked
/// only when an item is above 0.
pub const PHQ9_ITEMS: [&str; 9] =
    ["44250-9", "44255-8", "44259-0", "44254-1", "44251-7", "44258-2", "44252-5", "44253-3", "44260-8"];
pub const PHQ9_DIFFICULTY: &str = "69722-7";

/// The ePRO schedule of the pilot for the validator (`EPRO_CONFIG_DIR`): PHQ-9 at the pilot's
/// visit days (TV `VISITDY`), ±2 days (the protocol's visit windows), 3 grace days.
pub const EPRO_SCHEDULE_JSON: &str = include_str!("../../cdisc-pilot/epro-schedule.json");

/// The namespace of every replay id (UUIDv5 of a natural key).
const NAMESPACE: Uuid = Uuid::from_u128(0x7c1d_3f0a_55b2_4e0d_9a51_c0ff_ee00_2012);

/// A deterministic id for `key` (`CDISCPILOT01/VS/01-701-1015/12`).
pub fn id(key: &str) -> Uuid {
    Uuid::new_v5(&NAMESPACE, key.as_bytes())
}

/// A stable pseudo-random number for `key` (not `std`'s hasher: it may change between releases).
pub fn mix(key: &str) -> u64 {
    let digest = Sha256::digest(key.as_bytes());
    u64::from_be_bytes([
        digest[0], digest[1], digest[2], digest[3], digest[4], digest[5], digest[6], digest[7],
    ])
}

/// How a submission reaches the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Delivery {
    /// Ten minutes after it was authored.
    OnTime,
    /// Three days after it was authored (the phone was offline): a late sync.
    LateSync,
    /// On time, and the same message again the next day (the app did not see the 202).
    Duplicate,
    /// On time, and the next day the same submission id with one answer changed (a new event).
    Conflicting,
}

impl Delivery {
    fn of(submission_key: &str) -> Self {
        match mix(&format!("{submission_key}/delivery")) % 100 {
            0..=3 => Self::LateSync,
            4..=8 => Self::Duplicate,
            9 => Self::Conflicting,
            _ => Self::OnTime,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::OnTime => "on_time",
            Self::LateSync => "late_sync",
            Self::Duplicate => "duplicate",
            Self::Conflicting => "conflicting",
        }
    }
}

/// One thing the replay does.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Screen {
        subject_id: String,
        body: ScreenSubject,
    },
    Consent {
        subject_id: String,
        body: SignConsent,
    },
    RequestEnrollment {
        subject_id: String,
        body: RequestEnrollment,
    },
    /// An early termination (DS): the subject leaves the study.
    Withdraw {
        subject_id: String,
        body: WithdrawSubject,
    },
    Vital(Box<VitalSignRecorded>),
    AdverseEvent(Box<AdverseEventReported>),
    /// A submission to the ePRO gateway; `resend` marks the second message of a duplicate or a
    /// conflicting pair.
    Submit {
        submission: Box<QuestionnaireResponseSubmitted>,
        delivery: Delivery,
        resend: bool,
    },
}

impl Action {
    /// The phase the action belongs to (one progress bar each).
    pub fn phase(&self) -> Phase {
        match self {
            Self::Screen { .. }
            | Self::Consent { .. }
            | Self::RequestEnrollment { .. }
            | Self::Withdraw { .. } => Phase::Subjects,
            Self::Vital(_) => Phase::Vitals,
            Self::AdverseEvent(_) => Phase::AdverseEvents,
            Self::Submit { .. } => Phase::Epro,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    Subjects,
    Vitals,
    AdverseEvents,
    Epro,
}

impl Phase {
    pub const ALL: [Phase; 4] = [Phase::Subjects, Phase::Vitals, Phase::AdverseEvents, Phase::Epro];

    pub fn label(self) -> &'static str {
        match self {
            Self::Subjects => "screening, consent, enrollment, withdrawal (site API)",
            Self::Vitals => "vital signs (EDC → clinical topic)",
            Self::AdverseEvents => "adverse events (EDC → safety topic)",
            Self::Epro => "PHQ-9 submissions, synthetic (ePRO gateway)",
        }
    }
}

/// An action at its instant on the study's timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub at: DateTime<Utc>,
    pub action: Action,
}

/// Source rows the replay leaves out, by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Skipped {
    /// VS rows without a result (`VSSTAT` = NOT DONE).
    pub vitals_not_done: u64,
    /// VS rows with a test or unit without a LOINC/UCUM mapping.
    pub vitals_unmapped: u64,
    /// Rows without a usable date.
    pub undated: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub study: CreateStudy,
    pub sites: Vec<CreateSite>,
    /// Site id and shipment.
    pub shipments: Vec<(String, ReceiveShipment)>,
    /// In timeline order (ties keep source order).
    pub steps: Vec<Step>,
    pub skipped: Skipped,
}

impl Plan {
    pub fn count(&self, phase: Phase) -> u64 {
        self.steps.iter().filter(|s| s.action.phase() == phase).count() as u64
    }
}

/// The subject facts the plan uses (DM).
#[derive(Debug, Clone)]
struct Subject {
    usubjid: String,
    subjid: String,
    site_id: String,
    age: Option<i32>,
    sex: Option<String>,
    screened_on: NaiveDate,
    /// `RFSTDTC`: the day of randomization; absent for screen failures.
    started_on: Option<NaiveDate>,
    consent_raw: String,
    /// The early termination of a randomized subject (DS), if any.
    withdrawal: Option<Withdrawal>,
}

impl Subject {
    fn randomized(&self) -> bool {
        self.started_on.is_some()
    }

    /// When the enrollment request is recorded: `RFSTDTC` at noon, site time.
    fn enrollment_requested_at(&self) -> Option<DateTime<Utc>> {
        self.started_on.map(|day| site_time(day, 12, 0))
    }

    /// When the withdrawal is recorded: the disposition date at noon, site time, and never
    /// before the enrollment request (see the module doc).
    fn withdrawn_at(&self) -> Option<DateTime<Utc>> {
        let w = self.withdrawal.as_ref()?;
        let at = site_time(w.on, 12, 0);
        Some(self.enrollment_requested_at().map_or(at, |requested| at.max(requested)))
    }
}

/// A disposition event other than completion (DS).
#[derive(Debug, Clone, PartialEq)]
struct Withdrawal {
    /// `DSSTDTC`.
    on: NaiveDate,
    /// `DSSEQ`, to pick one of several events on a day.
    seq: i64,
    /// `DSDECOD`, the CDISC controlled term (`ADVERSE EVENT`, `WITHDRAWAL BY SUBJECT`, ...).
    reason_code: String,
    /// `DSTERM`, the verbatim term as collected.
    reason: Option<String>,
}

const SCREEN_FAILURE_ARM: &str = "Scrnfail";
/// DS `DSCAT` of the event that ends a subject's participation (SDTM IG, DS domain).
pub const DISPOSITION_EVENT: &str = "DISPOSITION EVENT";
/// DS `DSDECOD` values that are no early termination of a randomized subject.
pub const NOT_WITHDRAWN: &[&str] = &["COMPLETED", "SCREEN FAILURE"];

fn date(raw: Option<&str>) -> Option<NaiveDate> {
    let raw = raw?;
    NaiveDate::parse_from_str(raw.get(..10)?, "%Y-%m-%d").ok()
}

/// `day` at `hh:mm` site time, in UTC.
pub fn site_time(day: NaiveDate, hh: u32, mm: u32) -> DateTime<Utc> {
    let local = day.and_time(NaiveTime::from_hms_opt(hh, mm, 0).unwrap_or_default());
    SITE_TIME_ZONE
        .from_local_datetime(&local)
        .earliest()
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|| local.and_utc())
}

fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn subjects(dm: &[Row], skipped: &mut Skipped) -> Vec<Subject> {
    let mut out = Vec::new();
    for r in dm {
        let (Some(usubjid), Some(site_id), Some(screened_on)) =
            (r.text("USUBJID"), r.text("SITEID"), date(r.text("DMDTC")))
        else {
            skipped.undated += 1;
            continue;
        };
        // The pilot's own arm is not replayed: trialflow randomizes.
        let screen_failure = r.text("ARMCD").is_none_or(|arm| arm == SCREEN_FAILURE_ARM);
        let started_on = if screen_failure { None } else { date(r.text("RFSTDTC")) };
        out.push(Subject {
            usubjid: usubjid.to_string(),
            subjid: r.text("SUBJID").unwrap_or(usubjid).to_string(),
            site_id: site_id.to_string(),
            age: r.whole("AGE").and_then(|a| i32::try_from(a).ok()),
            sex: r.text("SEX").map(str::to_string),
            screened_on,
            started_on,
            consent_raw: r.text("RFICDTC").unwrap_or_default().to_string(),
            withdrawal: None,
        });
    }
    out
}

/// Gives every randomized subject its early termination from DS, if it has one: the earliest
/// disposition event that is not a completion (or a screen failure). Subjects not randomized are
/// left alone (their disposition is the screen failure DM already told); undated disposition
/// events are counted and left out.
fn withdrawals(ds: &[Row], subjects: &mut [Subject], skipped: &mut Skipped) {
    let randomized: HashMap<String, usize> = subjects
        .iter()
        .enumerate()
        .filter(|(_, s)| s.randomized())
        .map(|(i, s)| (s.usubjid.clone(), i))
        .collect();
    for r in ds {
        let (Some(usubjid), Some(DISPOSITION_EVENT), Some(decod)) =
            (r.text("USUBJID"), r.text("DSCAT"), r.text("DSDECOD"))
        else {
            continue;
        };
        if NOT_WITHDRAWN.contains(&decod) {
            continue;
        }
        let Some(subject) = randomized.get(usubjid).and_then(|i| subjects.get_mut(*i)) else { continue };
        let Some(on) = date(r.text("DSSTDTC")) else {
            skipped.undated += 1;
            continue;
        };
        let seq = r.whole("DSSEQ").unwrap_or(i64::MAX);
        if subject.withdrawal.as_ref().is_some_and(|w| (w.on, w.seq) <= (on, seq)) {
            continue;
        }
        subject.withdrawal = Some(Withdrawal {
            on,
            seq,
            reason_code: decod.to_string(),
            reason: r.text("DSTERM").map(str::to_string),
        });
    }
}

/// Builds the replay of `data`.
pub fn plan(data: &Domains) -> Plan {
    let mut skipped = Skipped::default();
    let mut subjects = subjects(&data.dm, &mut skipped);
    withdrawals(&data.ds, &mut subjects, &mut skipped);
    let study = study(&data.dm, &subjects);
    let site_ids: BTreeSet<&str> = subjects.iter().map(|s| s.site_id.as_str()).collect();
    let sites = site_ids
        .iter()
        .map(|site| CreateSite {
            site_id: (*site).to_string(),
            name: format!("CDISC pilot site {site}"),
            country: Some("USA".to_string()),
            time_zone: SITE_TIME_ZONE.name().to_string(),
            occurred_at: Some(study.occurred_at.clone().unwrap_or_default()),
        })
        .collect();
    let shipments = site_ids.iter().map(|site| shipment(site, &study, &subjects)).collect();

    let mut steps = Vec::new();
    for s in &subjects {
        subject_steps(s, &mut steps);
    }
    let by_id: HashMap<&str, &Subject> = subjects.iter().map(|s| (s.usubjid.as_str(), s)).collect();
    for r in &data.vs {
        if let Some(step) = vital(r, &by_id, &mut skipped) {
            steps.push(step);
        }
    }
    for r in &data.ae {
        if let Some(step) = adverse_event(r, &by_id, &mut skipped) {
            steps.push(step);
        }
    }
    for r in &data.sv {
        epro_steps(r, &by_id, &mut steps);
    }
    // Stable: actions at the same instant keep their order (a subject's consent after screening).
    steps.sort_by_key(|s| s.at);
    Plan { study, sites, shipments, steps, skipped }
}

fn study(dm: &[Row], subjects: &[Subject]) -> CreateStudy {
    let mut arms: BTreeMap<String, String> = BTreeMap::new();
    for r in dm {
        if let (Some(code), Some(name)) = (r.text("ARMCD"), r.text("ARM"))
            && code != SCREEN_FAILURE_ARM
        {
            arms.insert(code.to_string(), name.to_string());
        }
    }
    let first = subjects.iter().map(|s| s.screened_on).min().unwrap_or_default();
    let mut sexes: Vec<String> = subjects.iter().filter_map(|s| s.sex.clone()).collect();
    sexes.sort();
    sexes.dedup();
    CreateStudy {
        study_id: STUDY_ID.to_string(),
        title: "CDISC SDTM/ADaM Pilot Project: xanomeline transdermal therapeutic system in mild to \
                moderate Alzheimer's disease (replay)"
            .to_string(),
        arms: arms.into_iter().map(|(arm_code, name)| Arm { arm_code, name, ratio: 1 }).collect(),
        stratification_factors: vec![Factor { factor: STRATUM_FACTOR.to_string(), values: sexes }],
        eligibility: Eligibility {
            min_age_years: Some(50),
            max_age_years: None,
            criteria: vec![Criterion {
                criterion_id: CRITERION.to_string(),
                description: "Every inclusion criterion met and no exclusion criterion met (pilot IE \
                              domain; screen failures answer not met)"
                    .to_string(),
            }],
        },
        randomization: Randomization {
            seed: 20_120_709,
            block_multiples: vec![1, 2],
            slots_per_stratum: 300,
            warn_slots_left: 10,
        },
        kit_types: vec![KitType {
            kit_type: KIT_TYPE.to_string(),
            do_not_dispense_days: 30,
            do_not_count_days: 7,
            low_stock_threshold: LOW_STOCK_THRESHOLD,
        }],
        enrollment_kit_type: KIT_TYPE.to_string(),
        occurred_at: Some(rfc3339(site_time(first - Duration::days(30), 9, 0))),
    }
}

/// Per arm: the site's randomized subjects + the threshold + 1, so that no arm runs out or low
/// whatever the randomization gives. Kit numbers do not reveal the arm.
fn shipment(site: &str, study: &CreateStudy, subjects: &[Subject]) -> (String, ReceiveShipment) {
    let at_site: Vec<&Subject> = subjects.iter().filter(|s| s.site_id == site).collect();
    let randomized = at_site.iter().filter(|s| s.randomized()).count();
    let per_arm = randomized + LOW_STOCK_THRESHOLD as usize + 1;
    let first = at_site.iter().map(|s| s.screened_on).min().unwrap_or_default();
    let mut kits = Vec::new();
    for i in 0..per_arm * study.arms.len() {
        let arm = &study.arms[i % study.arms.len()];
        kits.push(Kit {
            kit_number: format!("K{site}-{:04}", i + 1),
            sequence_number: i as i64 + 1,
            kit_type: KIT_TYPE.to_string(),
            lot: "PILOT-LOT-01".to_string(),
            expiry_date: KIT_EXPIRY.to_string(),
            arm_code: arm.arm_code.clone(),
        });
    }
    let shipment = ReceiveShipment {
        shipment_id: format!("{STUDY_ID}-SHIP-{site}-1"),
        kits,
        occurred_at: Some(rfc3339(site_time(first - Duration::days(7), 9, 0))),
    };
    (site.to_string(), shipment)
}

fn subject_steps(s: &Subject, steps: &mut Vec<Step>) {
    let screened = site_time(s.screened_on, 12, 0);
    let eligible = s.randomized();
    steps.push(Step {
        at: screened,
        action: Action::Screen {
            subject_id: s.usubjid.clone(),
            body: ScreenSubject {
                site_id: s.site_id.clone(),
                screening_number: s.subjid.clone(),
                subject_id: Some(s.usubjid.clone()),
                age_years: s.age,
                sex: s.sex.clone(),
                time_zone: None,
                criteria: BTreeMap::from([(CRITERION.to_string(), eligible)]),
                occurred_at: Some(rfc3339(screened)),
            },
        },
    });
    let Some(started_on) = s.started_on else { return };
    steps.push(Step {
        at: screened,
        action: Action::Consent {
            subject_id: s.usubjid.clone(),
            body: SignConsent {
                consent_version: "CDISCPILOT01 ICF".to_string(),
                // RFICDTC is empty in the pilot: kept empty (unknown), not invented.
                signed_at: s.consent_raw.clone(),
                occurred_at: Some(rfc3339(screened)),
            },
        },
    });
    let started = site_time(started_on, 12, 0);
    let strata = s.sex.iter().map(|sex| (STRATUM_FACTOR.to_string(), sex.clone())).collect();
    steps.push(Step {
        at: started,
        action: Action::RequestEnrollment {
            subject_id: s.usubjid.clone(),
            body: RequestEnrollment { strata, occurred_at: Some(rfc3339(started)) },
        },
    });
    let (Some(w), Some(withdrawn)) = (&s.withdrawal, s.withdrawn_at()) else { return };
    // Pushed after the request: on the same instant the stable sort keeps it second.
    steps.push(Step {
        at: withdrawn,
        action: Action::Withdraw {
            subject_id: s.usubjid.clone(),
            body: WithdrawSubject {
                reason_code: w.reason_code.clone(),
                reason: w.reason.clone(),
                occurred_at: Some(rfc3339(withdrawn)),
            },
        },
    });
}

/// LOINC code and UCUM unit of a VS test in its standard unit.
pub fn loinc_ucum(test: &str, unit: &str) -> Option<(&'static str, &'static str)> {
    let code = match test {
        "SYSBP" => "8480-6",
        "DIABP" => "8462-4",
        "PULSE" => "8867-4",
        "TEMP" => "8310-5",
        "WEIGHT" => "29463-7",
        "HEIGHT" => "8302-2",
        _ => return None,
    };
    let ucum = match unit {
        "mmHg" => "mm[Hg]",
        "beats/min" => "/min",
        "C" => "Cel",
        "kg" => "kg",
        "cm" => "cm",
        _ => return None,
    };
    Some((code, ucum))
}

fn envelope(
    event_type: &str,
    key: &str,
    s: &Subject,
    source: &str,
    occurred_at: DateTime<Utc>,
    recorded_at: DateTime<Utc>,
) -> Envelope {
    Envelope {
        event_id: id(key),
        site_id: Some(s.site_id.clone()),
        subject_id: Some(s.usubjid.clone()),
        recorded_at: Timestamp::from(recorded_at),
        actor: Some(source.to_string()),
        ..Envelope::new(event_type, STUDY_ID, source, Timestamp::from(occurred_at))
    }
}

fn vital(r: &Row, subjects: &HashMap<&str, &Subject>, skipped: &mut Skipped) -> Option<Step> {
    let subject = subjects.get(r.text("USUBJID")?)?;
    let (Some(value), Some(unit)) = (r.number("VSSTRESN"), r.text("VSSTRESU")) else {
        skipped.vitals_not_done += 1;
        return None;
    };
    let Some((code, ucum)) = r.text("VSTESTCD").and_then(|t| loinc_ucum(t, unit)) else {
        skipped.vitals_unmapped += 1;
        return None;
    };
    let (Some(raw), Some(day)) = (r.text("VSDTC"), date(r.text("VSDTC"))) else {
        skipped.undated += 1;
        return None;
    };
    let seq = r.whole("VSSEQ")?;
    let key = format!("{STUDY_ID}/VS/{}/{seq}", subject.usubjid);
    // After the day's enrollment request (12:00), so a baseline reading follows it.
    let at = site_time(day, 12, 30);
    let event = VitalSignRecorded {
        envelope: envelope(VitalSignRecorded::NAME, &key, subject, EDC_SOURCE, site_time(day, 12, 0), at),
        observation_id: key.clone(),
        loinc_code: code.to_string(),
        value,
        unit: ucum.to_string(),
        position: r.text("VSPOS").map(str::to_string),
        effective: PartialDateTime::parse(raw),
        visit: r.text("VISIT").map(str::to_string),
        visit_day: r.whole("VISITDY").and_then(|d| i32::try_from(d).ok()),
    };
    Some(Step { at, action: Action::Vital(Box::new(event)) })
}

/// SDTM seriousness flags and the criterion each names.
const SERIOUSNESS: &[(&str, &str)] = &[
    ("AESDTH", "DEATH"),
    ("AESLIFE", "LIFE_THREATENING"),
    ("AESHOSP", "HOSPITALIZATION"),
    ("AESDISAB", "DISABILITY"),
    ("AESCONG", "CONGENITAL_ANOMALY"),
    ("AESCAN", "CANCER"),
    ("AESOD", "OVERDOSE"),
];

fn adverse_event(r: &Row, subjects: &HashMap<&str, &Subject>, skipped: &mut Skipped) -> Option<Step> {
    let subject = subjects.get(r.text("USUBJID")?)?;
    let Some(reported_on) = date(r.text("AEDTC")).or_else(|| date(r.text("AESTDTC"))) else {
        skipped.undated += 1;
        return None;
    };
    let seq = r.whole("AESEQ")?;
    let key = format!("{STUDY_ID}/AE/{}/{seq}", subject.usubjid);
    let at = site_time(reported_on, 13, 0);
    let event = AdverseEventReported {
        envelope: envelope(
            AdverseEventReported::NAME,
            &key,
            subject,
            EDC_SOURCE,
            site_time(reported_on, 12, 0),
            at,
        ),
        ae_id: key.clone(),
        term: r.text("AETERM").or(r.text("AEDECOD")).unwrap_or("UNKNOWN").to_string(),
        meddra_code: r.whole("AEPTCD").map(|c| c.to_string()),
        severity: r.text("AESEV").map(str::to_string),
        // The pilot records severity (mild/moderate/severe), not a CTCAE grade: none is invented.
        ctcae_grade: None,
        serious: r.text("AESER") == Some("Y"),
        seriousness_criteria: SERIOUSNESS
            .iter()
            .filter(|(column, _)| r.text(column) == Some("Y"))
            .map(|(_, name)| (*name).to_string())
            .collect(),
        onset: PartialDateTime::parse(r.text("AESTDTC").unwrap_or_default()),
        sponsor_received_at: Timestamp::from(at),
    };
    Some(Step { at, action: Action::AdverseEvent(Box::new(event)) })
}

/// The synthetic PHQ-9 answers of one subject at one visit: a per-subject level (most subjects
/// minimal or mild, a few moderate to severe) and per-item draws; the self-harm item is rarely
/// above 0. The difficulty item is answered exactly when some item is above 0 (skip logic).
pub fn phq9_answers(subject_id: &str, visit: &str) -> Vec<Answer> {
    let level = mix(&format!("{subject_id}/phq9-level")) % 100;
    let (low, high): (u64, u64) = match level {
        0..=59 => (0, 1),
        60..=84 => (0, 2),
        85..=94 => (1, 3),
        _ => (2, 3),
    };
    let mut values: Vec<i32> = PHQ9_ITEMS[..8]
        .iter()
        .map(|item| {
            let draw = mix(&format!("{subject_id}/{visit}/{item}"));
            // Skewed towards `low`: half of the draws take it.
            let v = if draw.is_multiple_of(2) { low } else { low + (draw >> 8) % (high - low + 1) };
            v as i32
        })
        .collect();
    let self_harm_chance = if level >= 85 { 15 } else { 1 };
    let item9 = mix(&format!("{subject_id}/{visit}/44260-8"));
    values.push(if item9 % 100 < self_harm_chance { 1 + (item9 >> 8) as i32 % 2 } else { 0 });
    answers_of(&values, mix(&format!("{subject_id}/{visit}/difficulty")) as i32 % 4)
}

fn answers_of(values: &[i32], difficulty: i32) -> Vec<Answer> {
    let answer = |link_id: &str, v: i32| Answer::integer(link_id.to_string(), v);
    let mut answers: Vec<Answer> = PHQ9_ITEMS.iter().zip(values).map(|(item, v)| answer(item, *v)).collect();
    if values.iter().any(|v| *v > 0) {
        answers.push(answer(PHQ9_DIFFICULTY, difficulty.abs() % 4));
    }
    answers
}

/// The same answers with the first item changed (and the difficulty item kept consistent).
fn changed(answers: &[Answer]) -> Vec<Answer> {
    let mut values: Vec<i32> = answers[..9].iter().map(|a| a.value_integer.unwrap_or(0)).collect();
    values[0] = if values[0] == 0 { 1 } else { 0 };
    let difficulty = answers.get(9).and_then(|a| a.value_integer).unwrap_or(1);
    answers_of(&values, difficulty)
}

fn epro_steps(r: &Row, subjects: &HashMap<&str, &Subject>, steps: &mut Vec<Step>) {
    let Some(subject) = r.text("USUBJID").and_then(|id| subjects.get(id)) else { return };
    let Some(visit) = r.text("VISIT") else { return };
    let Some((_, occurrence)) = PHQ9_VISITS.iter().find(|(v, _)| *v == visit) else { return };
    let Some(day) = date(r.text("SVSTDTC")) else { return };
    let key = format!("{STUDY_ID}/PHQ-9/{}/{visit}", subject.usubjid);
    let minutes = mix(&format!("{key}/minute")) % 180;
    let authored = site_time(day, 18, 0) + Duration::minutes(minutes as i64);
    if subject.withdrawn_at().is_some_and(|withdrawn| authored >= withdrawn) {
        return;
    }
    let delivery = Delivery::of(&key);
    let sent =
        authored + if delivery == Delivery::LateSync { Duration::days(3) } else { Duration::minutes(10) };
    let submission = QuestionnaireResponseSubmitted {
        envelope: envelope(
            QuestionnaireResponseSubmitted::NAME,
            &format!("{key}/event"),
            subject,
            APP_SOURCE,
            authored,
            sent,
        ),
        submission_id: id(&key),
        questionnaire: PHQ9.to_string(),
        questionnaire_version: PHQ9_VERSION.to_string(),
        scheduled_occurrence: Some((*occurrence).to_string()),
        status: ResponseStatus::Completed,
        authored_at: Timestamp::from(authored),
        device_time_zone: SITE_TIME_ZONE.name().to_string(),
        items: phq9_answers(&subject.usubjid, visit),
    };
    let next_day = sent + Duration::days(1);
    let resend = match delivery {
        Delivery::Duplicate => Some(submission.clone()),
        Delivery::Conflicting => {
            let mut other = submission.clone();
            other.envelope.event_id = id(&format!("{key}/event/conflicting"));
            other.envelope.recorded_at = Timestamp::from(next_day);
            other.items = changed(&submission.items);
            Some(other)
        }
        Delivery::OnTime | Delivery::LateSync => None,
    };
    steps.push(Step {
        at: sent,
        action: Action::Submit { submission: Box::new(submission), delivery, resend: false },
    });
    if let Some(again) = resend {
        steps.push(Step {
            at: next_day,
            action: Action::Submit { submission: Box::new(again), delivery, resend: true },
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::data::Value;
    use super::*;

    fn text(v: &str) -> Value {
        Value::Text(v.to_string())
    }

    fn dm(usubjid: &str, site: &str, arm: &str, dmdtc: &str, rfstdtc: Option<&str>) -> Row {
        let mut pairs = vec![
            ("USUBJID", text(usubjid)),
            ("SUBJID", text(&usubjid[7..])),
            ("SITEID", text(site)),
            ("AGE", Value::Number(71.0)),
            ("SEX", text("F")),
            ("ARMCD", text(arm)),
            ("ARM", text(if arm == "Pbo" { "Placebo" } else { "Screen Failure" })),
            ("DMDTC", text(dmdtc)),
        ];
        if let Some(d) = rfstdtc {
            pairs.push(("RFSTDTC", text(d)));
        }
        Row::from_pairs(pairs)
    }

    fn sample() -> Domains {
        Domains {
            dm: vec![
                dm("01-701-1015", "701", "Pbo", "2013-12-26", Some("2014-01-02")),
                dm("01-701-1057", "701", "Scrnfail", "2013-12-20", None),
            ],
            vs: vec![
                Row::from_pairs([
                    ("USUBJID", text("01-701-1015")),
                    ("VSSEQ", Value::Number(1.0)),
                    ("VSTESTCD", text("SYSBP")),
                    ("VSPOS", text("SUPINE")),
                    ("VSSTRESN", Value::Number(164.0)),
                    ("VSSTRESU", text("mmHg")),
                    ("VISIT", text("BASELINE")),
                    ("VISITDY", Value::Number(1.0)),
                    ("VSDTC", text("2014-01-02")),
                ]),
                Row::from_pairs([
                    ("USUBJID", text("01-701-1015")),
                    ("VSSEQ", Value::Number(2.0)),
                    ("VSTESTCD", text("PULSE")),
                    ("VSSTAT", text("NOT DONE")),
                    ("VSDTC", text("2014-01-02")),
                ]),
            ],
            ae: vec![Row::from_pairs([
                ("USUBJID", text("01-701-1015")),
                ("AESEQ", Value::Number(3.0)),
                ("AETERM", text("DIZZINESS")),
                ("AESEV", text("SEVERE")),
                ("AESER", text("Y")),
                ("AESHOSP", text("Y")),
                ("AESTDTC", text("2012-02")),
                ("AEDTC", text("2014-02-08")),
            ])],
            sv: vec![Row::from_pairs([
                ("USUBJID", text("01-701-1015")),
                ("VISIT", text("WEEK 2")),
                ("SVSTDTC", text("2014-01-16")),
            ])],
            ds: vec![
                ds("01-701-1015", DISPOSITION_EVENT, "COMPLETED", "PROTOCOL COMPLETED", "2014-07-02"),
                ds("01-701-1057", DISPOSITION_EVENT, "SCREEN FAILURE", "SCREEN FAILURE", "2013-12-20"),
            ],
        }
    }

    fn ds(usubjid: &str, category: &str, decod: &str, term: &str, on: &str) -> Row {
        Row::from_pairs([
            ("USUBJID", text(usubjid)),
            ("DSSEQ", Value::Number(1.0)),
            ("DSCAT", text(category)),
            ("DSDECOD", text(decod)),
            ("DSTERM", text(term)),
            ("DSSTDTC", text(on)),
        ])
    }

    /// [`sample`] and a subject who withdraws on 2014-01-30 (the day of their week 4 visit), with
    /// visits and a vital sign before and after.
    fn with_early_termination() -> Domains {
        const ID: &str = "01-701-1023";
        let mut data = sample();
        data.dm.push(dm(ID, "701", "Pbo", "2013-12-28", Some("2014-01-05")));
        data.ds.push(ds(ID, "OTHER EVENT", "FINAL LAB VISIT", "FINAL LAB VISIT", "2014-02-13"));
        data.ds.push(ds(
            ID,
            DISPOSITION_EVENT,
            "WITHDRAWAL BY SUBJECT",
            "PATIENT WITHDREW CONSENT",
            "2014-01-30",
        ));
        for (visit, day) in [("WEEK 2", "2014-01-19"), ("WEEK 4", "2014-01-30"), ("WEEK 6", "2014-02-13")] {
            data.sv.push(Row::from_pairs([
                ("USUBJID", text(ID)),
                ("VISIT", text(visit)),
                ("SVSTDTC", text(day)),
            ]));
        }
        data.vs.push(Row::from_pairs([
            ("USUBJID", text(ID)),
            ("VSSEQ", Value::Number(9.0)),
            ("VSTESTCD", text("SYSBP")),
            ("VSSTRESN", Value::Number(171.0)),
            ("VSSTRESU", text("mmHg")),
            ("VISIT", text("WEEK 6")),
            ("VSDTC", text("2014-02-13")),
        ]));
        data
    }

    fn subject_of(action: &Action) -> Option<&str> {
        match action {
            Action::Screen { subject_id, .. }
            | Action::Consent { subject_id, .. }
            | Action::RequestEnrollment { subject_id, .. }
            | Action::Withdraw { subject_id, .. } => Some(subject_id),
            Action::Vital(v) => v.envelope.subject_id.as_deref(),
            Action::AdverseEvent(a) => a.envelope.subject_id.as_deref(),
            Action::Submit { submission, .. } => submission.envelope.subject_id.as_deref(),
        }
    }

    #[test]
    fn an_early_termination_withdraws_the_subject_once_after_enrollment_and_ends_its_diary() {
        let plan = plan(&with_early_termination());
        let of = |id: &str| -> Vec<&Step> {
            plan.steps.iter().filter(|s| subject_of(&s.action) == Some(id)).collect()
        };
        let withdrawn = of("01-701-1023");
        let site_steps: Vec<&Step> =
            withdrawn.iter().copied().filter(|s| s.action.phase() == Phase::Subjects).collect();
        assert!(matches!(
            site_steps.iter().map(|s| &s.action).collect::<Vec<_>>()[..],
            [
                Action::Screen { .. },
                Action::Consent { .. },
                Action::RequestEnrollment { .. },
                Action::Withdraw { .. }
            ]
        ));
        let (request, withdrawal) = (site_steps[2], site_steps[3]);
        assert!(withdrawal.at > request.at);
        let Action::Withdraw { body, .. } = &withdrawal.action else { panic!("a withdrawal") };
        assert_eq!(body.reason_code, "WITHDRAWAL BY SUBJECT");
        assert_eq!(body.reason.as_deref(), Some("PATIENT WITHDREW CONSENT"));
        assert_eq!(body.occurred_at.as_deref(), Some("2014-01-30T17:00:00Z"), "noon in New York, EST");

        // The diary ends with the withdrawal: week 2 only (week 4's is authored that evening).
        let occurrences: Vec<&str> = withdrawn
            .iter()
            .filter_map(|s| match &s.action {
                Action::Submit { submission, resend: false, .. } => {
                    submission.scheduled_occurrence.as_deref()
                }
                _ => None,
            })
            .collect();
        assert_eq!(occurrences, ["PHQ-9/W2"]);
        // The EDC still sends what it has.
        assert!(withdrawn.iter().any(|s| matches!(&s.action, Action::Vital(v) if v.value == 171.0)));

        // A completed subject and a screen failure are not withdrawn.
        let withdrawals: Vec<Option<&str>> = plan
            .steps
            .iter()
            .filter(|s| matches!(s.action, Action::Withdraw { .. }))
            .map(|s| subject_of(&s.action))
            .collect();
        assert_eq!(withdrawals, [Some("01-701-1023")]);
    }

    #[test]
    fn a_disposition_dated_before_the_start_is_recorded_right_after_the_enrollment_request() {
        let mut data = sample();
        data.ds =
            vec![ds("01-701-1015", DISPOSITION_EVENT, "PROTOCOL DEVIATION", "ENTRY CRITERIA", "2013-12-30")];
        let plan = plan(&data);
        let at = |f: fn(&Action) -> bool| plan.steps.iter().position(|s| f(&s.action));
        let (Some(request), Some(withdrawal)) = (
            at(|a| matches!(a, Action::RequestEnrollment { .. })),
            at(|a| matches!(a, Action::Withdraw { .. })),
        ) else {
            panic!("a request and a withdrawal")
        };
        assert_eq!(withdrawal, request + 1);
        assert_eq!(plan.steps[withdrawal].at, plan.steps[request].at);
    }

    #[test]
    fn screen_failures_are_screened_not_eligible_and_go_no_further() {
        let plan = plan(&sample());
        let of = |id: &str| -> Vec<&Action> {
            plan.steps
                .iter()
                .map(|s| &s.action)
                .filter(|a| match a {
                    Action::Screen { subject_id, .. }
                    | Action::Consent { subject_id, .. }
                    | Action::RequestEnrollment { subject_id, .. }
                    | Action::Withdraw { subject_id, .. } => subject_id == id,
                    _ => false,
                })
                .collect()
        };
        let failed = of("01-701-1057");
        assert_eq!(failed.len(), 1);
        let Action::Screen { body, .. } = failed[0] else { panic!("a screening") };
        assert_eq!(body.criteria.get(CRITERION), Some(&false));
        let randomized = of("01-701-1015");
        assert!(matches!(
            randomized[..],
            [Action::Screen { .. }, Action::Consent { .. }, Action::RequestEnrollment { .. }]
        ));
        let Action::Consent { body, .. } = randomized[1] else { panic!("consent") };
        assert_eq!(body.signed_at, "", "the pilot has no consent date: none is invented");
        let Action::RequestEnrollment { body, .. } = randomized[2] else { panic!("request") };
        assert_eq!(body.strata.get(STRATUM_FACTOR).map(String::as_str), Some("F"));
        assert_eq!(body.occurred_at.as_deref(), Some("2014-01-02T17:00:00Z"), "noon in New York, EST");
    }

    #[test]
    fn vitals_get_loinc_and_ucum_and_rows_without_results_are_counted_not_sent() {
        let plan = plan(&sample());
        let vitals: Vec<&VitalSignRecorded> = plan
            .steps
            .iter()
            .filter_map(|s| if let Action::Vital(v) = &s.action { Some(v.as_ref()) } else { None })
            .collect();
        assert_eq!(vitals.len(), 1);
        let v = vitals[0];
        assert_eq!((v.loinc_code.as_str(), v.unit.as_str(), v.value), ("8480-6", "mm[Hg]", 164.0));
        assert_eq!(v.position.as_deref(), Some("SUPINE"));
        assert_eq!(v.effective.raw, "2014-01-02");
        assert_eq!(v.effective.precision, trialflow_schemas::DateTimePrecision::Day);
        assert_eq!(v.envelope.event_id, id("CDISCPILOT01/VS/01-701-1015/1"));
        assert_eq!(plan.skipped.vitals_not_done, 1);
    }

    #[test]
    fn partial_onsets_stay_partial_and_seriousness_is_named() {
        let plan = plan(&sample());
        let ae = plan
            .steps
            .iter()
            .find_map(|s| if let Action::AdverseEvent(a) = &s.action { Some(a) } else { None });
        let Some(ae) = ae else { panic!("one adverse event") };
        assert_eq!(ae.onset.raw, "2012-02");
        assert_eq!(ae.onset.precision, trialflow_schemas::DateTimePrecision::Month);
        assert!(ae.serious);
        assert_eq!(ae.seriousness_criteria, vec!["HOSPITALIZATION".to_string()]);
        assert_eq!(ae.ctcae_grade, None);
    }

    #[test]
    fn kits_are_dispensable_on_the_timeline_and_by_the_real_clock() {
        let plan = plan(&sample());
        let dnd = plan.study.kit_types.iter().map(|k| i64::from(k.do_not_dispense_days)).max().unwrap_or(0);
        // By the later of the two clocks the consumer judges on, with years to spare.
        let last_day = plan.steps.iter().map(|s| s.at).max().unwrap_or_default().max(Utc::now()).date_naive()
            + Duration::days(dnd + 5 * 365);
        assert!(!plan.shipments.is_empty());
        for (_, shipment) in &plan.shipments {
            for kit in &shipment.kits {
                let expiry = NaiveDate::parse_from_str(&kit.expiry_date, "%Y-%m-%d").unwrap_or_default();
                assert!(expiry > last_day, "{} expires on {expiry}", kit.kit_number);
            }
        }
    }

    #[test]
    fn the_plan_is_deterministic_and_in_timeline_order() {
        let (a, b) = (plan(&sample()), plan(&sample()));
        assert_eq!(a, b);
        assert!(a.steps.windows(2).all(|w| w[0].at <= w[1].at));
        // Kits: (1 randomized + threshold + 1) per arm, one arm here.
        assert_eq!(a.shipments[0].1.kits.len(), 1 + LOW_STOCK_THRESHOLD as usize + 1);
    }

    #[test]
    fn synthetic_phq9_answers_follow_the_skip_logic() {
        for i in 0..500 {
            let answers = phq9_answers(&format!("S-{i}"), "WEEK 4");
            let any = answers[..9].iter().any(|a| a.value_integer.unwrap_or(0) > 0);
            assert_eq!(answers.len(), if any { 10 } else { 9 });
            assert!(answers.iter().all(|a| (0..=3).contains(&a.value_integer.unwrap_or(-1))));
            let other = changed(&answers);
            assert_ne!(other, answers);
            let any = other[..9].iter().any(|a| a.value_integer.unwrap_or(0) > 0);
            assert_eq!(other.len(), if any { 10 } else { 9 });
        }
    }

    #[test]
    fn deliveries_are_mostly_on_time_with_some_of_each_other_kind() {
        let mut counts: BTreeMap<Delivery, u32> = BTreeMap::new();
        for i in 0..2000 {
            *counts.entry(Delivery::of(&format!("K/{i}"))).or_default() += 1;
        }
        assert!(counts[&Delivery::OnTime] > 1700);
        assert!(counts[&Delivery::LateSync] > 40 && counts[&Delivery::Duplicate] > 60);
        assert!(counts[&Delivery::Conflicting] > 5);
    }
}
