//! Subject-baseline rules: a reading far from the subject's **own** recent history raises a signal,
//! whatever the population thresholds say (a systolic 150 is no CTCAE grade, but it is news for a
//! subject who has read 118–124 at every visit). Pure, no IO; the parameters are data
//! (`{"kind": "vital_baseline", …}` in a rule set).
//!
//! The statistic is the robust ("modified") z-score of Iglewicz & Hoaglin (1993): against the
//! median `m` of the history and its median absolute deviation `MAD = median |xᵢ − m|`,
//! `z = (x − m) / (1.4826 · MAD)` (1.4826 makes the MAD estimate the standard deviation of normally
//! distributed readings); |z| ≥ 3.5 is their suggested outlier limit. Median and MAD, unlike mean and
//! standard deviation, are not dragged by the one odd reading already in the history.
//!
//! Which readings are the history of `current` (decided here, once):
//! * the subject's readings of the rule's code **and** unit (another unit is another scale);
//! * taken **strictly before** `current` (effective time): a reading never judges against later
//!   ones, nor against readings taken at the same instant;
//! * **not of `current`'s visit**: the three positions of one blood-pressure measurement are one
//!   visit and must not judge each other (the orthostatic drop from supine to standing would look
//!   like a deviation). Readings without a visit are history by time alone;
//! * each event once (a redelivered or repeated row is one reading), `current` never;
//! * the **last** `window` of them, by effective time, ties broken by event id (deterministic
//!   whichever order the rows came in).
//!
//! It fires when `|z| ≥ max_abs_z` **and** `|x − m| ≥ min_abs_change` (in the rule's unit), with at
//! least `min_history` readings. The floor keeps a tiny but statistically "significant" wobble quiet
//! and is what decides for a flat history: when MAD = 0 (e.g. the same weight at every visit) z is
//! undefined (infinite for any change), so the rule fires iff `x ≠ m` and `|x − m| ≥ min_abs_change`.
//! A reading equal to the median never fires.
//!
//! Honest limits: a reading is judged against the history known when it is handled. A late reading
//! taken earlier than readings already judged is judged itself against what precedes it, but the
//! later readings are not judged again with it in their history (an alert, once raised, is not taken
//! back either). The replay of one event finds the same history, hence the same finding, and the
//! episode already holds that evidence: nothing changes.

use serde::Deserialize;

use super::rules::Reading;

/// The consistency constant: `1.4826 · MAD` estimates σ for normally distributed readings.
pub const MAD_TO_SIGMA: f64 = 1.4826;

/// The smallest `min_history` a rule may declare: with two readings the median is their mean and
/// one odd reading moves it; with three, one odd reading moves neither median nor MAD much.
pub const MIN_HISTORY: u32 = 3;

/// A subject-baseline rule's parameters.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Baseline {
    /// LOINC code of the readings judged (and of their history).
    pub code: String,
    pub name: String,
    /// UCUM unit of the readings and of `min_abs_change`; readings in another unit are not judged
    /// (and are logged), nor are they history.
    pub unit: String,
    /// How many of the latest earlier readings make the history.
    pub window: u32,
    /// Fewer earlier readings than this: no judgement (a new subject has no baseline yet).
    pub min_history: u32,
    /// Limit of the robust z-score, |z| ≥ this fires (3.5: Iglewicz & Hoaglin).
    pub max_abs_z: f64,
    /// Smallest clinically meaningful change from the median, in `unit`; also what decides when the
    /// history is flat (MAD = 0).
    pub min_abs_change: f64,
}

impl Baseline {
    /// Why the parameters cannot be used, if they cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.code.trim().is_empty() || self.unit.trim().is_empty() {
            return Err("code and unit must not be blank".into());
        }
        if self.min_history < MIN_HISTORY {
            return Err(format!("min_history must be at least {MIN_HISTORY}, not {}", self.min_history));
        }
        if self.window < self.min_history {
            return Err(format!(
                "window ({}) must be at least min_history ({})",
                self.window, self.min_history
            ));
        }
        if !(self.max_abs_z.is_finite() && self.max_abs_z > 0.0) {
            return Err(format!("max_abs_z must be a number above 0, not {}", self.max_abs_z));
        }
        if !(self.min_abs_change.is_finite() && self.min_abs_change >= 0.0) {
            return Err(format!(
                "min_abs_change must be a number of at least 0, not {}",
                self.min_abs_change
            ));
        }
        Ok(())
    }
}

/// Why a reading is far from its subject's baseline: the numbers and the readings behind them.
#[derive(Debug, Clone, PartialEq)]
pub struct Deviation {
    pub value: f64,
    pub median: f64,
    pub mad: f64,
    /// `None` when MAD = 0 (a flat history): the change from the median decided.
    pub z: Option<f64>,
    /// The history judged against, oldest first.
    pub history: Vec<Reading>,
}

impl Deviation {
    /// `x − m`, in the rule's unit.
    pub fn change(&self) -> f64 {
        self.value - self.median
    }

    /// "robust z 4.2", or why there is none.
    pub fn z_text(&self) -> String {
        self.z.map_or_else(|| "z undefined (MAD 0, flat history)".to_string(), |z| format!("robust z {z:.1}"))
    }
}

/// The median of `values` (not empty), which it sorts.
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 }
}

/// The history of `current` under `rule` (see the module doc), oldest first.
pub fn history(rule: &Baseline, current: &Reading, series: &[Reading]) -> Vec<Reading> {
    let mut seen = std::collections::BTreeSet::from([current.event_id]);
    let mut earlier: Vec<&Reading> = series
        .iter()
        .filter(|r| r.code == rule.code && r.unit == rule.unit)
        .filter(|r| r.effective_at < current.effective_at)
        .filter(|r| current.visit().is_none() || r.visit() != current.visit())
        .filter(|r| seen.insert(r.event_id))
        .collect();
    earlier.sort_by_key(|r| (r.effective_at, r.event_id));
    let skip = earlier.len().saturating_sub(rule.window as usize);
    earlier.into_iter().skip(skip).cloned().collect()
}

/// Whether `current` is far from its subject's baseline; `series` holds the subject's readings
/// (of any code, with or without `current`, any order).
pub fn judge(rule: &Baseline, current: &Reading, series: &[Reading]) -> Option<Deviation> {
    if current.code != rule.code || current.unit != rule.unit {
        return None;
    }
    let history = history(rule, current, series);
    if history.len() < rule.min_history.max(1) as usize {
        return None;
    }
    let mut values: Vec<f64> = history.iter().map(|r| r.value).collect();
    let m = median(&mut values);
    let mut deviations: Vec<f64> = values.iter().map(|v| (v - m).abs()).collect();
    let mad = median(&mut deviations);
    let change = current.value - m;
    let z = (mad > 0.0).then(|| change / (MAD_TO_SIGMA * mad));
    // MAD = 0: any change is infinitely many "MADs" away; only the floor decides.
    let far = z.is_none_or(|z| z.abs() >= rule.max_abs_z);
    (change != 0.0 && far && change.abs() >= rule.min_abs_change).then_some(Deviation {
        value: current.value,
        median: m,
        mad,
        z,
        history,
    })
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};
    use uuid::Uuid;

    use super::*;

    fn rule(window: u32, min_history: u32, max_abs_z: f64, min_abs_change: f64) -> Baseline {
        Baseline {
            code: "8480-6".into(),
            name: "Systolic blood pressure".into(),
            unit: "mm[Hg]".into(),
            window,
            min_history,
            max_abs_z,
            min_abs_change,
        }
    }

    fn day(n: i64) -> DateTime<Utc> {
        DateTime::<Utc>::from_timestamp(1_780_000_000, 0).unwrap_or_default() + chrono::Duration::days(n)
    }

    /// A systolic reading on day `n` at visit "DAY n".
    fn sbp(n: i64, value: f64) -> Reading {
        Reading {
            event_id: Uuid::new_v4(),
            code: "8480-6".into(),
            value,
            unit: "mm[Hg]".into(),
            effective_at: day(n),
            visit: Some(format!("DAY {n}")),
        }
    }

    #[test]
    fn median_mad_and_robust_z_as_computed_by_hand() -> Result<(), &'static str> {
        // History 120, 124, 118, 130, 122: sorted 118 120 122 124 130, median 122; |xᵢ − 122| =
        // 2, 2, 4, 8, 0 → sorted 0 2 2 4 8, MAD 2; σ ≈ 1.4826 · 2 = 2.9652.
        let series: Vec<Reading> =
            [120.0, 124.0, 118.0, 130.0, 122.0].iter().enumerate().map(|(i, v)| sbp(i as i64, *v)).collect();
        let r = rule(5, 3, 3.5, 10.0);
        // 140: change 18, z = 18 / 2.9652 ≈ 6.07 → fires.
        let high = sbp(10, 140.0);
        let d = judge(&r, &high, &series).ok_or("140 against a median of 122 fires")?;
        assert_eq!((d.value, d.median, d.mad), (140.0, 122.0, 2.0));
        let z = d.z.ok_or("MAD 2: z is defined")?;
        assert!((z - 18.0 / 2.9652).abs() < 1e-9, "{z}");
        assert_eq!(d.history.len(), 5);
        assert_eq!(d.z_text(), "robust z 6.1");
        // 131: change 9, z ≈ 3.04 < 3.5 → quiet.
        assert!(judge(&r, &sbp(10, 131.0), &series).is_none());
        // 133: z ≈ 3.71 ≥ 3.5, but the change (11) is above the floor: fires; with a floor of 12 not.
        assert!(judge(&r, &sbp(10, 133.0), &series).is_some());
        assert!(judge(&rule(5, 3, 3.5, 12.0), &sbp(10, 133.0), &series).is_none(), "below the floor");
        // Low as well as high: 104, change −18, z ≈ −6.07.
        let low = judge(&r, &sbp(10, 104.0), &series).ok_or("a drop fires too")?;
        assert!(low.z.is_some_and(|z| z < -3.5) && low.change() == -18.0);
        // An even history: 118 120 124 130 → median (120 + 124) / 2 = 122; deviations 4 2 2 8 →
        // sorted 2 2 4 8, MAD (2 + 4) / 2 = 3.
        let even = judge(&r, &high, &series[..4]).ok_or("fires")?;
        assert_eq!((even.median, even.mad), (122.0, 3.0));
        Ok(())
    }

    #[test]
    fn a_flat_history_is_decided_by_the_floor_alone() {
        let series: Vec<Reading> = (0..4).map(|i| sbp(i, 120.0)).collect();
        let r = rule(5, 3, 3.5, 10.0);
        let d = judge(&r, &sbp(10, 130.0), &series);
        assert_eq!(d.as_ref().map(|d| (d.mad, d.z)), Some((0.0, None)), "MAD 0, z undefined, change 10 ≥ 10");
        assert_eq!(d.map(|d| d.z_text()), Some("z undefined (MAD 0, flat history)".to_string()));
        assert!(judge(&r, &sbp(10, 129.0), &series).is_none(), "change 9 < 10");
        assert!(judge(&r, &sbp(10, 111.0), &series).is_none());
        assert!(judge(&r, &sbp(10, 110.0), &series).is_some(), "−10 is a change of 10");
        // Floor 0: any change fires, but the median itself never does.
        let zero = rule(5, 3, 3.5, 0.0);
        assert!(judge(&zero, &sbp(10, 120.5), &series).is_some());
        assert!(judge(&zero, &sbp(10, 120.0), &series).is_none());
    }

    #[test]
    fn too_little_history_is_no_judgement() {
        let r = rule(5, 3, 3.5, 10.0);
        let series = [sbp(0, 120.0), sbp(1, 121.0)];
        assert!(judge(&r, &sbp(10, 200.0), &series).is_none(), "2 earlier readings, 3 needed");
        let more = [sbp(0, 120.0), sbp(1, 121.0), sbp(2, 119.0)];
        assert!(judge(&r, &sbp(10, 200.0), &more).is_some());
        // Readings after the current one are no history of it, nor are those at the same instant
        // (without a visit to tell them apart).
        let later = [sbp(0, 120.0), sbp(1, 121.0), sbp(20, 119.0)];
        assert!(judge(&r, &sbp(10, 200.0), &later).is_none());
        let mut same_time = sbp(10, 119.0);
        same_time.visit = None;
        let mut current = sbp(10, 200.0);
        current.visit = None;
        assert!(judge(&r, &current, &[sbp(0, 120.0), sbp(1, 121.0), same_time]).is_none());
    }

    #[test]
    fn the_readings_of_the_current_visit_do_not_judge_each_other() -> Result<(), &'static str> {
        let r = rule(5, 3, 3.5, 10.0);
        let mut series: Vec<Reading> = (0..3).map(|i| sbp(i, 120.0 + i as f64)).collect();
        // Week 4: supine 160, then standing 140 two minutes later (same visit, an orthostatic drop).
        let mut supine = sbp(28, 160.0);
        supine.visit = Some("WEEK 4".into());
        let mut standing = sbp(28, 140.0);
        standing.visit = Some("WEEK 4".into());
        standing.effective_at = supine.effective_at + chrono::Duration::minutes(2);
        series.extend([supine.clone(), standing.clone()]);
        let d = judge(&r, &standing, &series).ok_or("fires against days 0–2 only")?;
        assert_eq!(d.history.len(), 3, "not against the supine reading of its own visit");
        assert!(d.history.iter().all(|h| h.visit() != Some("WEEK 4")));
        assert_eq!(d.median, 121.0);
        // A visit-less reading *is* judged against an earlier one of the same day, by time: the
        // supine 160 joins its history (120 121 122 160 → median 121.5).
        let mut loose = standing.clone();
        loose.visit = None;
        let d = judge(&r, &loose, &series).ok_or("fires")?;
        assert_eq!((d.history.len(), d.median), (4, 121.5));
        Ok(())
    }

    #[test]
    fn the_window_takes_the_last_readings_by_time_whatever_their_order() -> Result<(), &'static str> {
        let r = rule(3, 3, 3.5, 10.0);
        // Old history around 160, recent around 120: a reading of 122 is normal *now*.
        let mut series: Vec<Reading> = [160.0, 158.0, 162.0, 120.0, 121.0, 119.0]
            .iter()
            .enumerate()
            .map(|(i, v)| sbp(i as i64, *v))
            .collect();
        series.reverse();
        let current = sbp(10, 122.0);
        assert!(judge(&r, &current, &series).is_none(), "judged against 120 121 119, not the 160s");
        let d = judge(&r, &sbp(10, 160.0), &series).ok_or("160 is far from the last three")?;
        let days: Vec<DateTime<Utc>> = d.history.iter().map(|h| h.effective_at).collect();
        assert_eq!(days, vec![day(3), day(4), day(5)], "the last three, oldest first");
        // A duplicate row (a redelivery) is one reading; `current` in the series is no history.
        let mut doubled = series.clone();
        doubled.push(series[0].clone());
        doubled.push(current.clone());
        let h = history(&r, &current, &doubled);
        assert_eq!(h.len(), 3);
        assert!(h.iter().all(|x| x.event_id != current.event_id));
        // Ties at the window's edge are broken by event id, the same way in any order.
        let a = sbp(1, 118.0);
        let mut b = sbp(1, 130.0);
        b.visit = Some("DAY 1 REPEAT".into());
        let tie = [sbp(0, 121.0), a.clone(), b.clone(), sbp(2, 120.0), sbp(3, 122.0)];
        let reversed: Vec<Reading> = tie.iter().rev().cloned().collect();
        assert_eq!(history(&r, &current, &tie), history(&r, &current, &reversed));
        let kept: Vec<Uuid> = history(&r, &current, &tie).iter().map(|x| x.event_id).collect();
        let (earlier, later) = if a.event_id < b.event_id { (a, b) } else { (b, a) };
        assert_eq!(kept.len(), 3);
        assert!(
            kept.contains(&later.event_id) && !kept.contains(&earlier.event_id),
            "the greater id is later"
        );
        Ok(())
    }

    #[test]
    fn other_codes_and_units_are_neither_judged_nor_history() {
        let r = rule(5, 3, 3.5, 10.0);
        let mut series: Vec<Reading> = (0..3).map(|i| sbp(i, 120.0)).collect();
        let mut kpa = sbp(5, 16.0);
        kpa.unit = "kPa".into();
        let mut dbp = sbp(6, 80.0);
        dbp.code = "8462-4".into();
        series.extend([kpa.clone(), dbp.clone()]);
        assert!(judge(&r, &kpa, &series).is_none() && judge(&r, &dbp, &series).is_none());
        assert_eq!(history(&r, &sbp(10, 150.0), &series).len(), 3);
    }

    #[test]
    fn parameters_are_checked() {
        assert_eq!(rule(5, 3, 3.5, 10.0).check(), Ok(()));
        assert_eq!(rule(5, 5, 0.1, 0.0).check(), Ok(()));
        let refused = |b: Baseline| b.check().err().unwrap_or_default();
        assert_eq!(refused(rule(5, 2, 3.5, 10.0)), "min_history must be at least 3, not 2");
        assert_eq!(refused(rule(3, 4, 3.5, 10.0)), "window (3) must be at least min_history (4)");
        assert_eq!(refused(rule(5, 3, 0.0, 10.0)), "max_abs_z must be a number above 0, not 0");
        assert_eq!(refused(rule(5, 3, -3.5, 10.0)), "max_abs_z must be a number above 0, not -3.5");
        assert_eq!(refused(rule(5, 3, 3.5, -1.0)), "min_abs_change must be a number of at least 0, not -1");
        assert!(refused(rule(5, 3, f64::NAN, 1.0)).starts_with("max_abs_z"));
        let mut blank = rule(5, 3, 3.5, 10.0);
        blank.unit = " ".into();
        assert_eq!(refused(blank), "code and unit must not be blank");
    }
}
