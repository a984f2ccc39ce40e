//! Types shared by the events: the envelope, instants, partial dates, code lists.

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A UTC instant, as Avro `timestamp-micros` (microseconds since the Unix epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn now() -> Self {
        Self::from(Utc::now())
    }

    pub fn to_datetime(self) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp_micros(self.0)
    }
}

impl From<DateTime<Utc>> for Timestamp {
    fn from(t: DateTime<Utc>) -> Self {
        Self(t.timestamp_micros())
    }
}

/// A calendar date, as Avro `date` (days since 1970-01-01).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(transparent)]
pub struct Date(pub i32);

impl Date {
    pub fn to_naive(self) -> Option<NaiveDate> {
        NaiveDate::from_ymd_opt(1970, 1, 1)?.checked_add_signed(chrono::Duration::days(i64::from(self.0)))
    }
}

impl From<NaiveDate> for Date {
    fn from(d: NaiveDate) -> Self {
        let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
        Self((d - epoch).num_days() as i32)
    }
}

/// Shared by every event: who, what, when and where from (`org.trialflow.common.Envelope`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Envelope {
    #[cfg_attr(test, proptest(strategy = "crate::testing::uuid()"))]
    #[serde(with = "crate::types::uuid_string")]
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: i32,
    pub study_id: String,
    pub site_id: Option<String>,
    pub subject_id: Option<String>,
    pub occurred_at: Timestamp,
    pub recorded_at: Timestamp,
    pub source_system: String,
    pub actor: Option<String>,
    #[cfg_attr(test, proptest(strategy = "crate::testing::opt_uuid()"))]
    #[serde(with = "crate::types::opt_uuid_string")]
    pub correlation_id: Option<Uuid>,
    #[cfg_attr(test, proptest(strategy = "crate::testing::opt_uuid()"))]
    #[serde(with = "crate::types::opt_uuid_string")]
    pub causation_id: Option<Uuid>,
}

impl Envelope {
    /// The envelope of a new event: a fresh (time-ordered) id, recorded now, schema version 1.
    pub fn new(event_type: &str, study_id: &str, source_system: &str, occurred_at: Timestamp) -> Self {
        Self {
            event_id: Uuid::now_v7(),
            event_type: event_type.to_string(),
            schema_version: 1,
            study_id: study_id.to_string(),
            site_id: None,
            subject_id: None,
            occurred_at,
            recorded_at: Timestamp::now(),
            source_system: source_system.to_string(),
            actor: None,
            correlation_id: None,
            causation_id: None,
        }
    }

    /// The envelope of an event that `cause` caused: same study, site and subject, same flow
    /// (correlation: the cause's, or the cause itself when it starts the flow), causation = the
    /// cause, and the cause's effective time (so a replay on a virtual clock stays on it).
    pub fn caused_by(cause: &Envelope, event_type: &str, source_system: &str) -> Self {
        Self {
            site_id: cause.site_id.clone(),
            subject_id: cause.subject_id.clone(),
            actor: Some(source_system.to_string()),
            correlation_id: Some(cause.correlation_id.unwrap_or(cause.event_id)),
            causation_id: Some(cause.event_id),
            ..Self::new(event_type, &cause.study_id, source_system, cause.occurred_at)
        }
    }
}

/// Finest unit a partial date-time carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DateTimePrecision {
    Year,
    Month,
    Day,
    Hour,
    Minute,
    Second,
    Unknown,
}

/// A date-time as the source gave it, possibly partial (`2012`, `2012-02`, `2012-02-14T10:30`).
/// The raw text and its precision are kept; `earliest` is the first instant it can denote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct PartialDateTime {
    pub raw: String,
    pub precision: DateTimePrecision,
    pub earliest: Option<Timestamp>,
}

impl PartialDateTime {
    /// Parses an ISO 8601 date or date-time that may stop at any unit (CDISC `--DTC` values).
    /// Values without a zone are taken as UTC; unparseable text keeps precision `UNKNOWN`.
    pub fn parse(raw: &str) -> Self {
        let (precision, earliest) = parse_partial(raw.trim()).unwrap_or((DateTimePrecision::Unknown, None));
        Self { raw: raw.to_string(), precision, earliest }
    }
}

fn parse_partial(s: &str) -> Option<(DateTimePrecision, Option<Timestamp>)> {
    use DateTimePrecision as P;
    let (date, time) = s.split_once('T').map_or((s, None), |(d, t)| (d, Some(t)));
    let parts: Vec<&str> = date.split('-').collect();
    let num = |i: usize| parts.get(i).and_then(|p| p.parse::<u32>().ok());
    let year = parts.first().filter(|y| y.len() == 4)?.parse::<i32>().ok()?;
    let (month, day, precision) = match parts.len() {
        1 => (1, 1, P::Year),
        2 => (num(1)?, 1, P::Month),
        3 => (num(1)?, num(2)?, P::Day),
        _ => return None,
    };
    let day_start = NaiveDate::from_ymd_opt(year, month, day)?.and_hms_opt(0, 0, 0)?;
    let Some(time) = time else {
        return Some((precision, Some(Timestamp::from(day_start.and_utc()))));
    };
    if precision != P::Day {
        return None;
    }
    let time = time.trim_end_matches('Z');
    let t: Vec<&str> = time.split(':').collect();
    let tnum = |i: usize| t.get(i).and_then(|p| p.split('.').next()).and_then(|p| p.parse::<u32>().ok());
    let (h, m, sec, precision) = match t.len() {
        1 => (tnum(0)?, 0, 0, P::Hour),
        2 => (tnum(0)?, tnum(1)?, 0, P::Minute),
        3 => (tnum(0)?, tnum(1)?, tnum(2)?, P::Second),
        _ => return None,
    };
    let at = day_start.date().and_hms_opt(h, m, sec)?;
    Some((precision, Some(Timestamp::from(at.and_utc()))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_dates_keep_raw_text_and_precision() {
        let cases = [
            ("1977", DateTimePrecision::Year, Some("1977-01-01T00:00:00+00:00")),
            ("2012-02", DateTimePrecision::Month, Some("2012-02-01T00:00:00+00:00")),
            ("2014-01-02", DateTimePrecision::Day, Some("2014-01-02T00:00:00+00:00")),
            ("2014-01-02T10", DateTimePrecision::Hour, Some("2014-01-02T10:00:00+00:00")),
            ("2014-01-02T10:30", DateTimePrecision::Minute, Some("2014-01-02T10:30:00+00:00")),
            ("2014-01-02T10:30:15", DateTimePrecision::Second, Some("2014-01-02T10:30:15+00:00")),
            ("", DateTimePrecision::Unknown, None),
            ("2012-13", DateTimePrecision::Unknown, None),
            ("yesterday", DateTimePrecision::Unknown, None),
        ];
        for (raw, precision, earliest) in cases {
            let p = PartialDateTime::parse(raw);
            assert_eq!(p.raw, raw);
            assert_eq!(p.precision, precision, "{raw}");
            assert_eq!(
                p.earliest.and_then(Timestamp::to_datetime).map(|t| t.to_rfc3339()).as_deref(),
                earliest
            );
        }
    }

    #[test]
    fn dates_count_days_from_the_epoch() {
        let d = NaiveDate::from_ymd_opt(2027, 3, 31).unwrap_or_default();
        assert_eq!(Date::from(d).to_naive(), Some(d));
        assert_eq!(Date(0).to_naive(), NaiveDate::from_ymd_opt(1970, 1, 1));
    }
}

/// Uuids as Avro `string` with logical type `uuid` (hyphenated text), whatever the serializer's
/// human-readable setting (apache-avro's serializer would otherwise write 16 bytes).
pub(crate) mod uuid_string {
    use serde::{Deserialize, Deserializer, Serializer};
    use uuid::Uuid;

    pub(crate) fn serialize<S: Serializer>(id: &Uuid, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(id.hyphenated().encode_lower(&mut Uuid::encode_buffer()))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Uuid, D::Error> {
        let text = String::deserialize(d)?;
        Uuid::parse_str(&text).map_err(serde::de::Error::custom)
    }
}

/// `Option<Uuid>` as an Avro `["null", uuid]` union.
pub(crate) mod opt_uuid_string {
    use serde::{Deserialize, Deserializer, Serializer};
    use uuid::Uuid;

    pub(crate) fn serialize<S: Serializer>(id: &Option<Uuid>, s: S) -> Result<S::Ok, S::Error> {
        match id {
            Some(id) => s.serialize_some(id.hyphenated().encode_lower(&mut Uuid::encode_buffer())),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Uuid>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| Uuid::parse_str(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}
