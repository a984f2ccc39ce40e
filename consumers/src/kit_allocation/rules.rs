//! Dispensing rules (sources: `docs/domain-rules.md`).
//!
//! * Do-Not-Dispense: a kit is dispensable only while `today < expiry − DND days`, so it lasts until
//!   the next dispensing visit (Oracle IRT).
//! * Default choice: the lowest *sequence* number among dispensable kits of the subject's arm, the
//!   closest usable expiry breaking ties (choosing by lowest kit number risks partial unblinding;
//!   Oracle Clinical One). A kit of another arm is never chosen.
//! * Low stock: countable kits (before the Do-Not-Count buffer) of an arm at a site falling below the
//!   threshold signals resupply once per crossing, not on every allocation.
//! * "Today" for these buffers is [`judging_day`]: the later of the day the request took effect
//!   and the server's day, so neither a request stamped in the past (late, redelivered, parked)
//!   nor one stamped in the future dispenses a kit that is expired, or inside its buffer, by the
//!   other clock.

use chrono::{DateTime, NaiveDate, Utc};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KitStatus {
    Available,
    Allocated,
    Quarantined,
    Damaged,
    Lost,
    Expired,
}

/// A kit at a site, as the inventory knows it (the arm is unblinded data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kit {
    pub kit_number: String,
    pub sequence_number: i64,
    pub kit_type: String,
    pub arm_code: String,
    pub expiry: NaiveDate,
    pub status: KitStatus,
}

/// The day the expiry buffers are judged on for a request that took effect at `occurred_at` and is
/// applied when the server's clock reads `now`: the later of the two (UTC days). The request's
/// own time alone would let an old `occurred_at` dispense a kit that has expired since; the
/// server's clock alone would let a request stamped ahead of it (a skewed site clock) take a kit
/// that is no longer usable on the day it claims.
pub fn judging_day(occurred_at: DateTime<Utc>, now: DateTime<Utc>) -> NaiveDate {
    occurred_at.max(now).date_naive()
}

/// Whether `kit` may be dispensed on `today` with a Do-Not-Dispense buffer of `dnd_days`.
pub fn dispensable(kit: &Kit, today: NaiveDate, dnd_days: u32) -> bool {
    kit.status == KitStatus::Available && before_buffer(kit.expiry, today, dnd_days)
}

/// Whether `today` is before the buffer of `buffer_days` that ends on `expiry`.
fn before_buffer(expiry: NaiveDate, today: NaiveDate, buffer_days: u32) -> bool {
    expiry.checked_sub_days(chrono::Days::new(u64::from(buffer_days))).is_some_and(|last| today < last)
}

/// Whether `kit` still counts as stock on `today` with a Do-Not-Count buffer of `dnc_days`.
pub fn countable(kit: &Kit, today: NaiveDate, dnc_days: u32) -> bool {
    dispensable(kit, today, dnc_days)
}

/// The kit to allocate for a subject of `arm_code` needing `kit_type`, if any.
pub fn choose<'a>(
    kits: &'a [Kit],
    arm_code: &str,
    kit_type: &str,
    today: NaiveDate,
    dnd_days: u32,
) -> Option<&'a Kit> {
    kits.iter()
        .filter(|k| k.arm_code == arm_code && k.kit_type == kit_type && dispensable(k, today, dnd_days))
        .min_by_key(|k| (k.sequence_number, k.expiry))
}

/// Countable kits of an arm and kit type.
pub fn countable_stock(
    kits: &[Kit],
    arm_code: &str,
    kit_type: &str,
    today: NaiveDate,
    dnc_days: u32,
) -> usize {
    kits.iter()
        .filter(|k| k.arm_code == arm_code && k.kit_type == kit_type && countable(k, today, dnc_days))
        .count()
}

/// Countable kits of one arm and kit type, from how many available kits expire on each day
/// (what the store counts, [`countable_stock`] over grouped kits).
pub fn countable_by_expiry(kits: &[(NaiveDate, i64)], today: NaiveDate, dnc_days: u32) -> usize {
    kits.iter()
        .filter(|(expiry, _)| before_buffer(*expiry, today, dnc_days))
        .map(|(_, n)| usize::try_from(*n).unwrap_or(0))
        .sum()
}

/// Whether countable stock is under the resupply threshold.
pub fn is_low(countable: usize, threshold: usize) -> bool {
    countable < threshold
}

/// Whether to signal low stock: only on the transition into "low" (once per crossing, not on
/// every allocation while it stays low). Stock back at or above threshold re-arms the signal.
pub fn signal_low_stock(was_low: bool, countable: usize, threshold: usize) -> bool {
    !was_low && is_low(countable, threshold)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap_or_default()
    }

    fn kit(number: &str, sequence: i64, arm: &str, expiry: NaiveDate) -> Kit {
        Kit {
            kit_number: number.into(),
            sequence_number: sequence,
            kit_type: "BOTTLE-30".into(),
            arm_code: arm.into(),
            expiry,
            status: KitStatus::Available,
        }
    }

    #[test]
    fn the_do_not_dispense_boundary_is_exclusive() {
        let k = kit("K1", 1, "PBO", day(2027, 3, 31));
        // expiry − 30 days = 2027-03-01: dispensable only strictly before that day.
        assert!(dispensable(&k, day(2027, 2, 28), 30));
        assert!(!dispensable(&k, day(2027, 3, 1), 30));
        assert!(!dispensable(&k, day(2027, 3, 2), 30));
        assert!(dispensable(&k, day(2027, 3, 30), 0));
        assert!(!dispensable(&k, day(2027, 3, 31), 0), "never on its expiry day");
    }

    #[test]
    fn the_lowest_sequence_of_the_right_arm_is_chosen() {
        let kits = vec![
            kit("K-900", 3, "XAN_HI", day(2028, 1, 1)),
            kit("K-100", 7, "XAN_HI", day(2028, 1, 1)), // lower kit number, higher sequence
            kit("K-500", 1, "PBO", day(2028, 1, 1)),    // lowest sequence, wrong arm
        ];
        let chosen = choose(&kits, "XAN_HI", "BOTTLE-30", day(2027, 1, 1), 30);
        assert_eq!(chosen.map(|k| k.kit_number.as_str()), Some("K-900"));
    }

    #[test]
    fn closest_expiry_breaks_a_sequence_tie() {
        let kits = vec![kit("A", 5, "PBO", day(2028, 6, 1)), kit("B", 5, "PBO", day(2027, 6, 1))];
        assert_eq!(
            choose(&kits, "PBO", "BOTTLE-30", day(2027, 1, 1), 30).map(|k| k.kit_number.as_str()),
            Some("B")
        );
    }

    #[test]
    fn a_kit_of_another_arm_or_type_or_status_is_never_chosen() {
        let mut kits = vec![kit("K1", 1, "PBO", day(2028, 1, 1)), kit("K2", 2, "PBO", day(2028, 1, 1))];
        kits[0].status = KitStatus::Allocated;
        kits[1].kit_type = "BOTTLE-90".into();
        assert_eq!(choose(&kits, "PBO", "BOTTLE-30", day(2027, 1, 1), 30), None);
        assert_eq!(choose(&kits, "XAN_LO", "BOTTLE-90", day(2027, 1, 1), 30), None);
        for status in [KitStatus::Quarantined, KitStatus::Damaged, KitStatus::Lost, KitStatus::Expired] {
            let k = Kit { status, ..kit("K", 1, "PBO", day(2028, 1, 1)) };
            assert!(!dispensable(&k, day(2027, 1, 1), 0), "{status:?}");
        }
    }

    #[test]
    fn expiring_kits_are_skipped_for_a_later_usable_one() {
        let kits = vec![kit("OLD", 1, "PBO", day(2027, 1, 20)), kit("NEW", 2, "PBO", day(2028, 1, 1))];
        assert_eq!(
            choose(&kits, "PBO", "BOTTLE-30", day(2027, 1, 1), 30).map(|k| k.kit_number.as_str()),
            Some("NEW")
        );
    }

    fn noon(d: NaiveDate) -> DateTime<Utc> {
        d.and_hms_opt(12, 0, 0).unwrap_or_default().and_utc()
    }

    #[test]
    fn the_later_of_the_request_and_the_server_clock_is_judged() {
        let (early, late) = (noon(day(2027, 1, 1)), noon(day(2027, 4, 5)));
        assert_eq!(judging_day(early, late), day(2027, 4, 5));
        assert_eq!(judging_day(late, early), day(2027, 4, 5));
        let just_before_midnight = day(2027, 1, 1).and_hms_opt(23, 59, 59).unwrap_or_default().and_utc();
        assert_eq!(judging_day(just_before_midnight, early), day(2027, 1, 1), "a UTC day");
    }

    #[test]
    fn an_old_request_never_dispenses_a_kit_expired_or_inside_do_not_dispense_by_the_server_clock() {
        let kits = vec![kit("K1", 1, "PBO", day(2027, 3, 31))];
        let requested = noon(day(2027, 1, 1)); // dispensable on that day (before 2027-03-01)
        let choose_at = |now| choose(&kits, "PBO", "BOTTLE-30", judging_day(requested, now), 30);
        assert!(choose_at(noon(day(2027, 1, 2))).is_some(), "a day later: still dispensable");
        assert_eq!(choose_at(noon(day(2027, 4, 5))), None, "expired by the server's clock");
        assert_eq!(choose_at(noon(day(2027, 3, 10))), None, "inside do-not-dispense by the server's clock");
    }

    #[test]
    fn a_request_stamped_in_the_future_beyond_expiry_is_not_dispensed() {
        let kits = vec![kit("K1", 1, "PBO", day(2027, 3, 31))];
        let now = noon(day(2027, 1, 1)); // dispensable by the server's clock
        assert!(choose(&kits, "PBO", "BOTTLE-30", judging_day(now, now), 30).is_some());
        let ahead = noon(day(2027, 4, 10));
        assert_eq!(
            choose(&kits, "PBO", "BOTTLE-30", judging_day(ahead, now), 30),
            None,
            "expired on its day"
        );
        let inside = noon(day(2027, 3, 15));
        assert_eq!(choose(&kits, "PBO", "BOTTLE-30", judging_day(inside, now), 30), None, "inside DND");
    }

    #[test]
    fn low_stock_signals_once_per_crossing() {
        assert!(signal_low_stock(false, 2, 3), "fell under the threshold");
        assert!(!signal_low_stock(true, 1, 3), "already low: no new signal");
        assert!(!signal_low_stock(false, 3, 3), "at the threshold is not under it");
        assert!(!signal_low_stock(false, 0, 0), "threshold 0 never signals");
        assert!(!is_low(4, 3), "a shipment that lifts stock to the threshold re-arms the signal");
        let kits = vec![kit("A", 1, "PBO", day(2027, 1, 10)), kit("B", 2, "PBO", day(2028, 1, 1))];
        assert_eq!(
            countable_stock(&kits, "PBO", "BOTTLE-30", day(2027, 1, 1), 15),
            1,
            "A is inside do-not-count"
        );
        let grouped = [(day(2027, 1, 10), 4), (day(2028, 1, 1), 3)];
        assert_eq!(countable_by_expiry(&grouped, day(2027, 1, 1), 15), 3, "the same rule over grouped kits");
        assert_eq!(countable_by_expiry(&grouped, day(2026, 12, 25), 15), 7, "both before their buffer");
    }
}
