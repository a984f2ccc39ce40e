//! The catalogue as a client reads it: `docs/questionnaires.md`, rendered from exactly the
//! definitions the validator loads, so what an app developer copies is what the validator
//! accepts. A test (`consumers/tests/questionnaire_catalogue.rs`) fails when the document and the
//! definitions drift apart, and checks that the document's examples are accepted.
//!
//! Nothing here reads the document: the validator depends on the definitions only.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use trialflow_http::input::{MAX_CODE_CHARS, MAX_FREE_TEXT_CHARS, MAX_ID_CHARS, MAX_QUESTIONNAIRE_CHARS};
use trialflow_schemas::{Answer, Envelope, Event, QuestionnaireResponseSubmitted, ResponseStatus, Timestamp};
use uuid::Uuid;

use super::catalogue::Catalogue;
use super::questionnaire::{Behavior, Item, ItemType, Op, Questionnaire};
use super::schedule::{Occurrence, Schedule};
use super::validate::CODES;

/// The questionnaire of the complete example submission (the first one when it is not known).
const EXAMPLE_QUESTIONNAIRE: &str = "PHQ-9";
/// The example's study, site and subject: a subject the CDISC pilot replay (`make demo`) enrolls.
const EXAMPLE_STUDY: &str = "CDISCPILOT01";
const EXAMPLE_SITE: &str = "701";
const EXAMPLE_SUBJECT: &str = "01-701-1015";
const EXAMPLE_ZONE: &str = "America/New_York";

/// A study schedule the validator gets from `EPRO_CONFIG_DIR` in some deployment, and which one.
#[derive(Debug, Clone, Copy)]
pub struct ExtraSchedule<'a> {
    /// Where it comes from (markdown), e.g. "the CDISC pilot replay (`make demo`)".
    pub origin: &'a str,
    pub schedule: &'a Schedule,
}

/// Answers that the validator accepts for `q`: every item that is asked (skip logic evaluated on
/// the answers before it), each with a low value that raises no flag. For PHQ-9: 1 for items 1–8,
/// 0 for item 9 (above 0 it is flagged), and 1 for the difficulty item, which is asked (and so
/// required) because an item is above 0.
pub fn example_answers(q: &Questionnaire) -> Vec<Answer> {
    let mut answers: Vec<Answer> = Vec::new();
    for item in &q.items {
        let asked = {
            let so_far: BTreeMap<&str, &Answer> = answers.iter().map(|a| (a.link_id.as_str(), a)).collect();
            q.enabled(item, &so_far)
        };
        if !asked {
            continue;
        }
        let flags_on = |v: i64| q.flags.iter().any(|f| f.link_id == item.link_id && f.op.holds(v, f.value));
        let mut answer = Answer::empty(item.link_id.clone());
        match item.kind {
            ItemType::Choice => {
                let mut values: Vec<i32> = item.options.iter().map(|o| o.value).collect();
                // 1 first (a value an item scored 0-3 or 0-4 has), then the options in order.
                values.sort_by_key(|v| *v != 1);
                answer.value_integer =
                    values.iter().copied().find(|v| !flags_on(i64::from(*v))).or(values.first().copied());
            }
            ItemType::Integer => {
                let (min, max) = (item.min.unwrap_or(0), item.max.unwrap_or(0));
                let v = [min + (max - min) / 2, min, max].into_iter().find(|v| !flags_on(*v)).unwrap_or(min);
                answer.value_integer = i32::try_from(v).ok();
            }
            // `false` unless `false` raises a flag.
            ItemType::Boolean => answer.value_boolean = Some(flags_on(0)),
            ItemType::String => answer.value_string = Some("(free text)".to_string()),
        }
        answers.push(answer);
    }
    answers
}

/// A complete submission of `q` as a patient app sends it (the gateway's JSON body is its
/// serde form): fixed ids, authored and sent at `authored_at`, for the occurrence given.
pub fn example_submission(
    q: &Questionnaire,
    occurrence: Option<&str>,
    authored_at: DateTime<Utc>,
) -> QuestionnaireResponseSubmitted {
    let at = Timestamp::from(authored_at);
    let envelope = Envelope {
        event_id: Uuid::from_u128(0x0195_0c2e_8a40_7000_8000_0000_0000_0001),
        site_id: Some(EXAMPLE_SITE.to_string()),
        subject_id: Some(EXAMPLE_SUBJECT.to_string()),
        recorded_at: at,
        ..Envelope::new(QuestionnaireResponseSubmitted::NAME, EXAMPLE_STUDY, "epro-app", at)
    };
    QuestionnaireResponseSubmitted {
        envelope,
        submission_id: Uuid::from_u128(0x0195_0c2e_8a40_7000_8000_0000_0000_0002),
        questionnaire: q.id.clone(),
        questionnaire_version: q.version.clone(),
        scheduled_occurrence: occurrence.map(str::to_string),
        status: ResponseStatus::Completed,
        authored_at: at,
        device_time_zone: EXAMPLE_ZONE.to_string(),
        items: example_answers(q),
    }
}

/// The instant the document's example is authored at (a fixed one, so the document is stable).
pub fn example_authored_at() -> DateTime<Utc> {
    DateTime::from_timestamp(1_768_471_200, 0).unwrap_or_default() // 2026-01-15T10:00:00Z
}

/// The occurrence the example answers: the first of the default schedule for `q` that every
/// extra schedule has too (so the example fits the demo's study as well), else the first.
pub fn example_occurrence<'a>(
    catalogue: &'a Catalogue,
    q: &Questionnaire,
    extra: &[ExtraSchedule<'_>],
) -> Option<&'a str> {
    let default = catalogue.schedule("*");
    let mine = || default.occurrences.iter().filter(|o| o.questionnaire == q.id);
    mine()
        .find(|o| extra.iter().all(|e| e.schedule.occurrence(&o.id).is_some_and(|x| x.questionnaire == q.id)))
        .or_else(|| mine().next())
        .map(|o| o.id.as_str())
}

/// `docs/questionnaires.md`: every questionnaire and schedule of `catalogue`, plus `extra`
/// schedules, and how a submission names them.
pub fn markdown(catalogue: &Catalogue, extra: &[ExtraSchedule<'_>]) -> String {
    let mut out = String::new();
    let w = &mut out;
    line(w, "# ePRO questionnaire catalogue");
    line(w, "");
    line(
        w,
        "<!-- Generated from the definitions the ePRO validator loads, by \
         `trialflow_consumers::epro::reference::markdown`. Do not edit: change \
         `consumers/questionnaires/*.json`, then regenerate with \
         `TRIALFLOW_WRITE_DOCS=1 cargo test -p trialflow-consumers --test questionnaire_catalogue`. -->",
    );
    line(w, "");
    line(
        w,
        "What the ePRO validation consumer accepts: the questionnaires and the default schedule built \
         into it (`consumers/questionnaires/`), and the schedule the CDISC pilot replay (`make demo`) \
         installs for its study. A deployment may add definitions and study schedules in \
         `EPRO_CONFIG_DIR` (one with the same id and version, or for the same study, replaces the \
         built-in one); those are not listed here.",
    );
    line(w, "");
    line(
        w,
        "A patient app submits a response as `QuestionnaireResponseSubmitted` \
         (`schemas/avro/epro/QuestionnaireResponseSubmitted.avsc`): its JSON form to the ePRO gateway \
         (`POST /v1/submissions`, `Authorization: Bearer <app token>`), or Avro single-object encoded \
         to the topic `epro.submissions.v1`. The gateway's 202 means \"safely on the log\"; the \
         decision follows on `epro.responses.v1` as `QuestionnaireResponseAccepted` or \
         `QuestionnaireResponseRejected` (every reason, coded).",
    );
    line(w, "");
    questionnaire_index(w, catalogue);
    fields(w);
    example(w, catalogue, extra);
    accepted(w);
    codes(w);
    for q in catalogue.questionnaires() {
        questionnaire(w, q);
    }
    schedules(w, catalogue, extra);
    out
}

fn line(out: &mut String, text: &str) {
    out.push_str(text);
    out.push('\n');
}

/// A table cell: no line break, no unescaped pipe.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace(['\n', '\r'], " ")
}

fn questionnaire_index(w: &mut String, catalogue: &Catalogue) {
    line(w, "| `questionnaire` | `questionnaire_version` | title | LOINC panel | items |");
    line(w, "|---|---|---|---|---|");
    for q in catalogue.questionnaires() {
        let _ = writeln!(
            w,
            "| `{}` | `{}` | {} | {} | {} |",
            q.id,
            q.version,
            cell(&q.title),
            q.code.as_deref().map_or_else(|| "—".to_string(), |c| format!("`{c}`")),
            q.items.len()
        );
    }
    line(w, "");
}

fn fields(w: &mut String) {
    line(w, "## How a submission names what it answers");
    line(w, "");
    line(w, "| field | what to send | what the validator does with it |");
    line(w, "|---|---|---|");
    let rows: [(&str, String, &str); 13] = [
        (
            "`questionnaire`",
            "the questionnaire's **id** as listed here, exactly (`PHQ-9`) — not a canonical URL \
             (`http://loinc.org/44249-1`) and not the LOINC panel code"
                .to_string(),
            "`UNKNOWN_QUESTIONNAIRE` when no questionnaire has this id",
        ),
        (
            "`questionnaire_version`",
            "the definition's **version** as listed here, exactly (`1.0`); versions are compared as \
             text, so `1.0.0` or `1` is another version. Not to be confused with \
             `envelope.schema_version`"
                .to_string(),
            "`UNKNOWN_VERSION` when the id is known but not this version",
        ),
        (
            "`scheduled_occurrence`",
            "an occurrence id of the study's schedule for this questionnaire (`PHQ-9/W4`; see \
             [Schedules](#schedules)), or `null` for a response outside the schedule"
                .to_string(),
            "`UNKNOWN_OCCURRENCE` when the study's schedule has no such occurrence, or it is for \
             another questionnaire; `null` is reported as `UNSCHEDULED`",
        ),
        (
            "`items[].link_id`",
            "the item's `link_id` as listed here — LOINC item codes for the built-in \
             questionnaires (`44250-9`), not positions (`phq9-1`)"
                .to_string(),
            "`UNKNOWN_ITEM`; `DUPLICATE_ITEM` when answered twice",
        ),
        (
            "`items[].value_*`",
            "exactly one of `value_integer`, `value_decimal`, `value_string`, `value_boolean`: the \
             one the item's type takes, within its options or range (the other three `null`)"
                .to_string(),
            "`ANSWER_WRONG_TYPE`, `ANSWER_OUT_OF_RANGE`",
        ),
        (
            "`items` (which)",
            "every required item that is asked, and no item its skip logic says is not asked \
             (column \"asked\")"
                .to_string(),
            "`REQUIRED_ITEM_MISSING`, `ITEM_NOT_ENABLED`",
        ),
        (
            "`status`",
            "`COMPLETED`; `AMENDED` to correct an occurrence that already has a completed response"
                .to_string(),
            "`INVALID_STATUS` for `IN_PROGRESS` and `UNKNOWN`; a second `COMPLETED` for one \
             occurrence is `DUPLICATE_OCCURRENCE`",
        ),
        (
            "`authored_at`",
            "when the patient finished, in microseconds since the Unix epoch (UTC)".to_string(),
            "`AUTHORED_IN_FUTURE` when later than its arrival plus the schedule's \
             `future_tolerance_minutes`; `SUBJECT_WITHDRAWN` when at or after the subject's \
             withdrawal; the window is judged on it, in the subject's time zone; `late_sync` when it \
             arrived more than `late_sync_hours` after it",
        ),
        (
            "`submission_id`",
            "a UUID the app makes once per response and keeps for every resend".to_string(),
            "the idempotency key: a resend with the same content is acknowledged once; with other \
             content it is `CONFLICTING_DUPLICATE` (the first stands)",
        ),
        (
            "`envelope.study_id`",
            "the study".to_string(),
            "picks the schedule: the study's own, else the default (`*`)",
        ),
        (
            "`envelope.subject_id`",
            format!("the subject (at most {MAX_ID_CHARS} characters)"),
            "the subject must be enrolled; a submission for a subject the validator does not know \
             as enrolled yet waits (parked) until it does",
        ),
        (
            "`device_time_zone`",
            "the device's IANA zone when authored (`America/New_York`)".to_string(),
            "stored only: windows are evaluated in the subject's zone from `SubjectScreened`",
        ),
        (
            "`envelope.schema_version`",
            "`1`: the version of the event contract (the `.v1` of the topic), not of the \
             questionnaire"
                .to_string(),
            "not read",
        ),
    ];
    for (field, send, does) in rows {
        let _ = writeln!(w, "| {field} | {} | {} |", cell(&send), cell(does));
    }
    line(w, "");
    let _ = writeln!(
        w,
        "Strings are refused with `INVALID_CHARACTERS` when they hold a control character (a \
         free-text answer may hold tabs and line breaks) and with `TEXT_TOO_LONG` beyond their \
         limit: `questionnaire` {MAX_QUESTIONNAIRE_CHARS} characters; the study, site and subject \
         ids {MAX_ID_CHARS}; `questionnaire_version`, `scheduled_occurrence`, `device_time_zone` \
         and every `link_id` {MAX_CODE_CHARS}; a free-text answer {MAX_FREE_TEXT_CHARS}. The \
         gateway refuses the same with 422 before publishing."
    );
    line(w, "");
    line(
        w,
        "**Two versions, two meanings.** `questionnaire_version` is the version of the \
         questionnaire definition the app rendered (`1.0` below). `envelope.schema_version` is the \
         version of the event contract the message follows (`1` for every event on a `.v1` topic; \
         compatible schema changes keep it, and the Avro fingerprint names the exact writer \
         schema). Neither is derived from the other.",
    );
    line(w, "");
}

fn example(w: &mut String, catalogue: &Catalogue, extra: &[ExtraSchedule<'_>]) {
    let Some(q) = catalogue
        .questionnaires()
        .find(|q| q.id == EXAMPLE_QUESTIONNAIRE)
        .or_else(|| catalogue.questionnaires().next())
    else {
        return;
    };
    let occurrence = example_occurrence(catalogue, q, extra);
    let s = example_submission(q, occurrence, example_authored_at());
    line(w, "## Example submission");
    line(w, "");
    let _ = writeln!(
        w,
        "A `{}` {} response as the gateway takes it (`POST /v1/submissions`), accepted by the \
         validator. `authored_at`, `envelope.occurred_at` and `envelope.recorded_at` are \
         microseconds since the Unix epoch (here {}); a live app sends the instant the patient \
         finished, and new UUIDs for `submission_id` and `envelope.event_id`. \
         `scheduled_occurrence` `{}` is in the default schedule and in the demo study's. Against \
         `make demo`, whose replay has already answered most occurrences of the pilot's subjects, \
         send `\"scheduled_occurrence\": null` (unscheduled) or `\"status\": \"AMENDED\"`: a \
         second `COMPLETED` response to one occurrence is `DUPLICATE_OCCURRENCE`.",
        q.id,
        q.version,
        example_authored_at().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        occurrence.unwrap_or("null"),
    );
    line(w, "");
    line(w, "```json");
    line(w, &serde_json::to_string_pretty(&s).unwrap_or_default());
    line(w, "```");
    line(w, "");
}

fn accepted(w: &mut String) {
    line(w, "## What an accepted response carries");
    line(w, "");
    line(
        w,
        "`QuestionnaireResponseAccepted` repeats `submission_id`, `questionnaire`, `questionnaire_version`, `scheduled_occurrence` and `authored_at`, and adds:",
    );
    line(w, "");
    line(w, "| field | value |");
    line(w, "|---|---|");
    line(
        w,
        "| `total_score` | the sum of the scores of the scored items answered; `null` when the questionnaire has no scoring |",
    );
    line(
        w,
        "| `severity_band` | the label of the band the total falls in, exactly as listed under each questionnaire (lower case, e.g. `moderately severe`); `null` without scoring |",
    );
    line(
        w,
        "| `flagged_items` | what the questionnaire's flags put there (the item's `link_id`) when their condition holds, e.g. `44260-8` for PHQ-9 item 9 above 0 |",
    );
    line(
        w,
        "| `window_status` | `IN_WINDOW`, `EARLY`, `LATE`, `OUT_OF_WINDOW` (still accepted), `UNSCHEDULED` (no `scheduled_occurrence`); see [Schedules](#schedules) |",
    );
    line(
        w,
        "| `late_sync` | `true` when it arrived more than the schedule's `late_sync_hours` after `authored_at` (still accepted) |",
    );
    line(w, "");
}

fn codes(w: &mut String) {
    line(w, "## Rejection codes");
    line(w, "");
    line(
        w,
        "`QuestionnaireResponseRejected.reasons[]` lists every problem found, each with `code`, the item's `link_id` where one item is concerned, and a `detail` for people.",
    );
    line(w, "");
    line(w, "| `code` | meaning |");
    line(w, "|---|---|");
    for (code, meaning) in CODES {
        let _ = writeln!(w, "| `{code}` | {} |", cell(meaning));
    }
    line(w, "");
}

fn op(o: Op) -> &'static str {
    match o {
        Op::Gt => ">",
        Op::Ge => "≥",
        Op::Lt => "<",
        Op::Le => "≤",
        Op::Eq => "=",
        Op::Ne => "≠",
    }
}

/// `` `44250-9` (item 1) `` for an item of `q`.
fn item_ref(q: &Questionnaire, link_id: &str) -> String {
    match q.items.iter().position(|i| i.link_id == link_id) {
        Some(n) => format!("`{link_id}` (item {})", n + 1),
        None => format!("`{link_id}`"),
    }
}

fn answer_cell(item: &Item) -> String {
    match item.kind {
        ItemType::Choice => {
            let options: Vec<String> =
                item.options.iter().map(|o| format!("`{}` {}", o.value, o.display)).collect();
            format!("`value_integer`, one of: {}", options.join("; "))
        }
        ItemType::Integer => format!(
            "`value_integer`, a whole number from `{}` to `{}`",
            item.min.unwrap_or_default(),
            item.max.unwrap_or_default()
        ),
        ItemType::Boolean => "`value_boolean`".to_string(),
        ItemType::String => format!("`value_string`, free text (at most {MAX_FREE_TEXT_CHARS} characters)"),
    }
}

fn score_cell(item: &Item) -> String {
    if !item.scored {
        return "not scored".to_string();
    }
    match item.kind {
        ItemType::Choice if item.options.iter().all(|o| o.score == o.value) => "the value".to_string(),
        ItemType::Choice => {
            let scores: Vec<String> =
                item.options.iter().map(|o| format!("`{}` → {}", o.value, o.score)).collect();
            scores.join(", ")
        }
        ItemType::Integer => "the value".to_string(),
        ItemType::Boolean => "`true` → 1, `false` → 0".to_string(),
        ItemType::String => "0".to_string(),
    }
}

fn asked_cell(q: &Questionnaire, item: &Item) -> String {
    let Some(when) = &item.enable_when else { return "always".to_string() };
    let conditions: Vec<String> = when
        .conditions
        .iter()
        .map(|c| format!("{} {} {}", item_ref(q, &c.link_id), op(c.op), c.value))
        .collect();
    let joined = match when.behavior {
        Behavior::Any if conditions.len() > 1 => format!("any of: {}", conditions.join(", ")),
        Behavior::All if conditions.len() > 1 => format!("all of: {}", conditions.join(", ")),
        _ => conditions.join(""),
    };
    format!("only when {joined}; otherwise leave it out")
}

/// The lowest and highest total `q` can score (an item that may be left out counts from 0).
fn total_range(q: &Questionnaire) -> (i64, i64) {
    let (mut low, mut high) = (0_i64, 0_i64);
    for item in q.items.iter().filter(|i| i.scored) {
        let (min, max) = match item.kind {
            ItemType::Choice => {
                let scores = item.options.iter().map(|o| i64::from(o.score));
                (scores.clone().min().unwrap_or(0), scores.max().unwrap_or(0))
            }
            ItemType::Integer => (item.min.unwrap_or(0), item.max.unwrap_or(0)),
            ItemType::Boolean => (0, 1),
            ItemType::String => (0, 0),
        };
        let optional = !item.required || item.enable_when.is_some();
        low += if optional { min.min(0) } else { min };
        high += if optional { max.max(0) } else { max };
    }
    (low, high)
}

fn questionnaire(w: &mut String, q: &Questionnaire) {
    let _ = writeln!(w, "## Questionnaire `{}` version `{}`", q.id, q.version);
    line(w, "");
    let _ = writeln!(
        w,
        "{}. Send `\"questionnaire\": \"{}\"`, `\"questionnaire_version\": \"{}\"`.",
        q.title, q.id, q.version
    );
    if let Some(code) = &q.code {
        let _ = writeln!(w, "LOINC panel `{code}`.");
    }
    if let Some(source) = &q.source {
        let _ = writeln!(w, "Source: {source}");
    }
    line(w, "");
    line(w, "| # | `link_id` | text | answer | required | asked | score |");
    line(w, "|---|---|---|---|---|---|---|");
    for (n, item) in q.items.iter().enumerate() {
        let required = match (item.required, item.enable_when.is_some()) {
            (true, true) => "yes, when asked",
            (true, false) => "yes",
            (false, _) => "no",
        };
        let _ = writeln!(
            w,
            "| {} | `{}` | {} | {} | {} | {} | {} |",
            n + 1,
            item.link_id,
            cell(&item.text),
            cell(&answer_cell(item)),
            required,
            cell(&asked_cell(q, item)),
            cell(&score_cell(item)),
        );
    }
    line(w, "");
    match &q.scoring {
        None => line(w, "**Scoring**: none (`total_score` and `severity_band` are `null`)."),
        Some(scoring) => {
            let (low, high) = total_range(q);
            let code = scoring.total_code.as_deref().map(|c| format!(" (LOINC `{c}`)")).unwrap_or_default();
            let _ = writeln!(
                w,
                "**Scoring**: `total_score` = the sum of the scored items' scores, {low} to {high}{code}; \
                 `severity_band` by total:"
            );
            line(w, "");
            line(w, "| total | `severity_band` |");
            line(w, "|---|---|");
            for band in &scoring.bands {
                let _ = writeln!(w, "| {} to {} | `{}` |", band.min, band.max, cell(&band.label));
            }
        }
    }
    line(w, "");
    if q.flags.is_empty() {
        line(w, "**Flags**: none.");
    } else {
        line(w, "**Flags** (the response is accepted; `flagged_items` carries them):");
        line(w, "");
        line(w, "| when | `flagged_items` gets | why |");
        line(w, "|---|---|---|");
        for f in &q.flags {
            let _ = writeln!(
                w,
                "| {} {} {} | `{}` | {} |",
                item_ref(q, &f.link_id),
                op(f.op),
                f.value,
                cell(&f.flag),
                cell(&f.reason)
            );
        }
    }
    line(w, "");
    let answers = example_answers(q);
    let outcome = match q.check(&answers) {
        Ok(scored) => {
            let mut parts = Vec::new();
            if let Some(total) = scored.total {
                parts.push(format!("`total_score` {total}"));
            }
            if let Some(band) = &scored.band {
                parts.push(format!("`severity_band` `{band}`"));
            }
            parts.push(if scored.flagged.is_empty() {
                "no flag".to_string()
            } else {
                format!("`flagged_items` {:?}", scored.flagged)
            });
            format!("accepted: {}", parts.join(", "))
        }
        Err(reasons) => {
            let codes: Vec<String> = reasons.into_iter().map(|r| r.code).collect();
            format!("REJECTED: {}", codes.join(", "))
        }
    };
    let _ = writeln!(w, "**Example `items`** ({outcome}):");
    line(w, "");
    line(w, "```json");
    line(w, "[");
    for (n, a) in answers.iter().enumerate() {
        let comma = if n + 1 < answers.len() { "," } else { "" };
        let _ = writeln!(w, "  {}{comma}", serde_json::to_string(a).unwrap_or_default());
    }
    line(w, "]");
    line(w, "```");
    line(w, "");
}

/// `days 13 to 17` (study days; day 1 is the enrollment date, day 0 the day before).
fn days(from: i64, to: i64) -> String {
    if from == to { format!("day {from}") } else { format!("days {from} to {to}") }
}

fn occurrence_row(w: &mut String, o: &Occurrence) {
    let due = i64::from(o.study_day);
    let opens = due - i64::from(o.window_before_days);
    let closes = due + i64::from(o.window_after_days);
    let grace = i64::from(o.grace_days);
    let (early, late) = if grace == 0 {
        ("—".to_string(), "—".to_string())
    } else {
        (days(opens - grace, opens - 1), days(closes + 1, closes + grace))
    };
    let _ = writeln!(
        w,
        "| `{}` | `{}` | {} | {} | {} | {} |",
        o.id,
        o.questionnaire,
        due,
        days(opens, closes),
        early,
        late
    );
}

fn schedule(w: &mut String, s: &Schedule, title: &str) {
    let _ = writeln!(w, "### {title}");
    line(w, "");
    let _ = writeln!(
        w,
        "`envelope.study_id` `{}`, schedule version `{}`. Late sync after {} h; `authored_at` may lead \
         its arrival by {} min.",
        s.study_id, s.version, s.late_sync_hours, s.future_tolerance_minutes
    );
    if let Some(doc) = &s.doc {
        let _ = writeln!(w, "{doc}");
    }
    line(w, "");
    line(
        w,
        "| `scheduled_occurrence` | `questionnaire` | due on study day | `IN_WINDOW` | `EARLY` | `LATE` |",
    );
    line(w, "|---|---|---|---|---|---|");
    for o in &s.occurrences {
        occurrence_row(w, o);
    }
    line(w, "");
}

fn schedules(w: &mut String, catalogue: &Catalogue, extra: &[ExtraSchedule<'_>]) {
    line(w, "## Schedules");
    line(w, "");
    line(
        w,
        "A submission's `scheduled_occurrence` names one occurrence of its study's schedule (the \
         study's own, else the default `*`); it must be for the same questionnaire. Study day 1 is \
         the subject's enrollment date in the subject's time zone, an occurrence on study day d is \
         due on that date + (d − 1), and windows are whole local days. Outside the window by at most \
         the occurrence's grace days a response is `EARLY` or `LATE`, further out `OUT_OF_WINDOW`: \
         the window is reported, never a reason to reject. Day 0 and below are the days before the \
         enrollment date. When a response arrived is the gateway's `received_at` (Kafka header), or \
         `envelope.recorded_at` when an app publishes directly.",
    );
    line(w, "");
    for s in catalogue.schedules() {
        let title = if s.study_id == "*" {
            "Default schedule `*` (built in; for every study without its own)".to_string()
        } else {
            format!("Study `{}` (built in)", s.study_id)
        };
        schedule(w, s, &title);
    }
    for e in extra {
        schedule(w, e.schedule, &format!("Study `{}` ({})", e.schedule.study_id, e.origin));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalogue() -> Catalogue {
        Catalogue::load(None).unwrap_or_default()
    }

    #[test]
    fn the_examples_are_valid_answers_of_each_questionnaire() {
        for q in catalogue().questionnaires() {
            let answers = example_answers(q);
            assert!(q.check(&answers).is_ok(), "{}: {:?}", q.id, q.check(&answers));
            assert!(
                q.check(&answers).is_ok_and(|s| s.flagged.is_empty()),
                "{}: the example raises no flag",
                q.id
            );
        }
    }

    #[test]
    fn the_phq9_example_answers_the_difficulty_item_because_an_item_is_above_zero() {
        let c = catalogue();
        let Ok(q) = c.questionnaire("PHQ-9", "1.0") else { panic!("PHQ-9 1.0 is built in") };
        let answers = example_answers(q);
        let values: Vec<(&str, Option<i32>)> =
            answers.iter().map(|a| (a.link_id.as_str(), a.value_integer)).collect();
        assert_eq!(values.len(), 10);
        assert!(values[..8].iter().all(|(_, v)| *v == Some(1)), "{values:?}");
        assert_eq!(values[8], ("44260-8", Some(0)), "item 9 raises no flag");
        assert_eq!(values[9], ("69722-7", Some(1)));
    }

    #[test]
    fn windows_and_grace_days_read_as_study_days() {
        let mut w = String::new();
        let o = Occurrence {
            id: "PHQ-9/W2".into(),
            questionnaire: "PHQ-9".into(),
            study_day: 15,
            window_before_days: 2,
            window_after_days: 2,
            grace_days: 5,
        };
        occurrence_row(&mut w, &o);
        assert_eq!(w, "| `PHQ-9/W2` | `PHQ-9` | 15 | days 13 to 17 | days 8 to 12 | days 18 to 22 |\n");
    }
}
