//! Per-study risk configuration: a folder (`RISK_CONFIG_DIR`) of `*.json` files, one per study (or
//! `"*"` for every study without its own). Each may give:
//! * `thresholds`: for some KRIs their amber and red limits and minimum denominator; a KRI not
//!   named keeps its defaults (±2, ±3, [`Kri::min_denominator`]);
//! * `edit_checks`: the study's edit checks ([`EditCheck`]), replacing the built-in ones;
//! * `qtls`: the study's quality tolerance limits ([`Qtl`]), replacing the built-in ones;
//! * `data_entry_lag_days`: how late an input may be recorded before it counts as lagging.
//!
//! What a study's file does not give comes from the `*` file, then from the built-in defaults
//! (`consumers/risk/default.json`).
//!
//! ```json
//! {"study_id": "CDISCPILOT01", "thresholds": {"AE_RATE": {"amber": 2.5, "red": 3.5, "min_denominator": 60}},
//!  "qtls": [{"id": "QTL_DISCONTINUATION", "name": "Study discontinuation", "kri": "DISCONTINUATION", "expected": 0.4}]}
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::checks::EditCheck;
use super::kri::{self, Kri, Method, Thresholds};
use crate::epro::catalogue::Catalogue;
use crate::epro::schedule::Schedule;

/// Largest configuration file read (bytes): a folder of settings, not a data set.
const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// The built-in configuration (study `*` below every file's).
const BUILTIN: &str = include_str!("../../risk/default.json");

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct StudyConfig {
    study_id: String,
    #[serde(default)]
    doc: Option<String>,
    #[serde(default)]
    thresholds: BTreeMap<String, Thresholds>,
    #[serde(default)]
    edit_checks: Option<Vec<EditCheck>>,
    #[serde(default)]
    qtls: Option<Vec<Qtl>>,
    #[serde(default)]
    data_entry_lag_days: Option<u32>,
}

/// A quality tolerance limit: a study-level limit on a proportion KRI's study value, one-sided,
/// `expected + k·√(expected·(1 − expected) / N)` with `N` the study's denominator.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Qtl {
    pub id: String,
    pub name: String,
    /// The proportion KRI it limits (DISCONTINUATION, SCREEN_FAILURE, ...).
    pub kri: String,
    /// The expected proportion p₀ (from the protocol's assumptions).
    pub expected: f64,
    /// How many standard errors above p₀ the limit is.
    #[serde(default = "three")]
    pub k: f64,
    /// The study denominator below which the limit is not judged.
    #[serde(default = "ten")]
    pub min_denominator: f64,
}

fn three() -> f64 {
    3.0
}

fn ten() -> f64 {
    10.0
}

impl Qtl {
    /// The limit for a study denominator of `n`.
    pub fn limit(&self, n: f64) -> f64 {
        self.expected + self.k * (self.expected * (1.0 - self.expected) / n).sqrt()
    }

    fn check(&self) -> Result<(), String> {
        let Some(kri) = kri::kri(&self.kri) else {
            return Err(format!(
                "QTL {}: unknown KRI \"{}\"",
                self.id.escape_debug(),
                self.kri.escape_debug()
            ));
        };
        if kri.method != Method::Binary {
            return Err(format!("QTL {}: {} is not a proportion", self.id, kri.id));
        }
        let usable = !self.id.is_empty()
            && !self.id.chars().any(char::is_control)
            && self.expected > 0.0
            && self.expected < 1.0
            && self.k.is_finite()
            && self.k > 0.0
            && self.min_denominator.is_finite()
            && self.min_denominator >= 1.0;
        if !usable {
            return Err(format!(
                "QTL \"{}\": needs an id, 0 < expected < 1, k > 0 and a minimum denominator ≥ 1",
                self.id.escape_debug()
            ));
        }
        Ok(())
    }
}

/// The risk configuration of every study.
#[derive(Debug, Clone)]
pub struct RiskConfig {
    /// Study id (or `*`) → its file.
    studies: BTreeMap<String, StudyConfig>,
    builtin: StudyConfig,
    /// The ePRO schedules (the ePRO validation service's catalogue): ePRO compliance.
    schedules: Catalogue,
}

impl Default for RiskConfig {
    /// The built-in configuration alone.
    fn default() -> Self {
        let builtin = parse("built-in risk configuration", BUILTIN)
            .unwrap_or_else(|e| unreachable!("the built-in risk configuration is tested: {e}"));
        let schedules = Catalogue::load(None)
            .unwrap_or_else(|e| unreachable!("the built-in ePRO catalogue is tested: {e}"));
        Self { studies: BTreeMap::new(), builtin, schedules }
    }
}

fn parse(file: &str, text: &str) -> Result<StudyConfig, String> {
    let set: StudyConfig = serde_json::from_str(text).map_err(|e| format!("{file}: {e}"))?;
    let study = set.study_id.escape_debug().to_string();
    if set.study_id.is_empty() || set.study_id.chars().any(char::is_control) {
        return Err(format!("{file}: study_id \"{study}\" is empty or has control characters"));
    }
    for (id, thresholds) in &set.thresholds {
        if kri::kri(id).is_none() {
            let known: Vec<&str> = kri::CATALOGUE.iter().map(|k| k.id).collect();
            return Err(format!(
                "{file}: unknown KRI \"{}\" (known: {})",
                id.escape_debug(),
                known.join(", ")
            ));
        }
        thresholds.check().map_err(|why| format!("{file}: {id}: {why}"))?;
    }
    let mut ids = std::collections::BTreeSet::new();
    for check in set.edit_checks.iter().flatten() {
        check.validate().map_err(|why| format!("{file}: {why}"))?;
        if !ids.insert(check.id.as_str()) {
            return Err(format!("{file}: edit check {} appears twice", check.id));
        }
    }
    let mut ids = std::collections::BTreeSet::new();
    for qtl in set.qtls.iter().flatten() {
        qtl.check().map_err(|why| format!("{file}: {why}"))?;
        if !ids.insert(qtl.id.as_str()) {
            return Err(format!("{file}: QTL {} appears twice", qtl.id));
        }
    }
    if set.data_entry_lag_days == Some(0) {
        return Err(format!("{file}: data_entry_lag_days must be at least 1"));
    }
    Ok(set)
}

impl RiskConfig {
    /// The defaults, plus the studies of `dir`'s `*.json` files when given. Refuses unreadable
    /// files, unknown fields and KRIs, thresholds that cannot flag, edit checks and QTLs that
    /// cannot run, a study configured twice.
    pub fn load(dir: Option<&Path>) -> Result<Self, String> {
        let mut config = Self::default();
        let Some(dir) = dir else { return Ok(config) };
        let shown = dir.display().to_string().escape_debug().to_string();
        let entries = std::fs::read_dir(dir).map_err(|e| format!("RISK_CONFIG_DIR {shown}: {e}"))?;
        let mut files: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        for path in files {
            let name = path.display().to_string().escape_debug().to_string();
            let size = std::fs::metadata(&path).map_err(|e| format!("{name}: {e}"))?.len();
            if size > MAX_FILE_BYTES {
                return Err(format!("{name}: {size} bytes, more than {MAX_FILE_BYTES}"));
            }
            let text = std::fs::read_to_string(&path).map_err(|e| format!("{name}: {e}"))?;
            config.add(&name, &text)?;
        }
        Ok(config)
    }

    fn add(&mut self, file: &str, text: &str) -> Result<(), String> {
        let set = parse(file, text)?;
        let study = set.study_id.escape_debug().to_string();
        if self.studies.insert(set.study_id.clone(), set).is_some() {
            return Err(format!("{file}: study \"{study}\" is configured twice"));
        }
        Ok(())
    }

    /// The first of the study's own file, the `*` file and the built-in one that gives `what`.
    fn first<'a, T>(&'a self, study_id: &str, what: impl Fn(&'a StudyConfig) -> Option<T>) -> Option<T> {
        [self.studies.get(study_id), self.studies.get("*"), Some(&self.builtin)]
            .into_iter()
            .flatten()
            .find_map(what)
    }

    /// The thresholds of `kri` in `study_id`: its own, the `*` set's, or the defaults.
    pub fn thresholds(&self, study_id: &str, kri: &Kri) -> Thresholds {
        self.first(study_id, |c| c.thresholds.get(kri.id).copied())
            .unwrap_or_else(|| Thresholds::default_for(kri))
    }

    /// The edit checks of `study_id`.
    pub fn edit_checks(&self, study_id: &str) -> &[EditCheck] {
        self.first(study_id, |c| c.edit_checks.as_deref()).unwrap_or_default()
    }

    /// The quality tolerance limits of `study_id`.
    pub fn qtls(&self, study_id: &str) -> &[Qtl] {
        self.first(study_id, |c| c.qtls.as_deref()).unwrap_or_default()
    }

    /// The ePRO schedules of `catalogue` (`EPRO_CONFIG_DIR`) instead of the built-in ones.
    pub fn with_schedules(mut self, catalogue: Catalogue) -> Self {
        self.schedules = catalogue;
        self
    }

    /// The ePRO schedule of `study_id`.
    pub fn schedule(&self, study_id: &str) -> &Schedule {
        self.schedules.schedule(study_id)
    }

    /// How many days after it happened an input may be recorded before it counts as lagging.
    pub fn data_entry_lag_days(&self, study_id: &str) -> u32 {
        self.first(study_id, |c| c.data_entry_lag_days).unwrap_or(DEFAULT_DATA_ENTRY_LAG_DAYS)
    }
}

/// Data-entry lag limit when no file gives one ({gsm}'s kri0010 uses 10 days).
pub const DEFAULT_DATA_ENTRY_LAG_DAYS: u32 = 10;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::risk::kri::{AE_RATE, SCREEN_FAILURE};

    fn folder(files: &[(&str, &str)]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("risk-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap_or_default();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap_or_default();
        }
        dir
    }

    #[test]
    fn a_study_s_own_thresholds_win_then_the_default_set_then_the_defaults() {
        let dir = folder(&[
            (
                "a.json",
                r#"{"study_id": "S1", "thresholds": {"AE_RATE": {"amber": 2.5, "red": 3.5, "min_denominator": 60}}}"#,
            ),
            (
                "b.json",
                r#"{"study_id": "*", "thresholds": {"AE_RATE": {"amber": 1.5, "red": 2.5, "min_denominator": 10}}}"#,
            ),
            ("ignored.txt", "not json"),
        ]);
        let config = RiskConfig::load(Some(&dir));
        let _ = std::fs::remove_dir_all(&dir);
        let config = config.unwrap_or_default();
        assert_eq!(
            config.thresholds("S1", &AE_RATE),
            Thresholds { amber: 2.5, red: 3.5, min_denominator: 60.0 }
        );
        assert_eq!(
            config.thresholds("S2", &AE_RATE),
            Thresholds { amber: 1.5, red: 2.5, min_denominator: 10.0 }
        );
        assert_eq!(config.thresholds("S1", &SCREEN_FAILURE), Thresholds::default_for(&SCREEN_FAILURE));
        assert_eq!(RiskConfig::default().thresholds("S1", &AE_RATE), Thresholds::default_for(&AE_RATE));
    }

    #[test]
    fn the_built_in_configuration_checks_and_limits_every_study_until_a_file_replaces_them() {
        let builtin = RiskConfig::default();
        assert!(builtin.edit_checks("ANY").len() >= 8, "{:?}", builtin.edit_checks("ANY"));
        assert!(!builtin.qtls("ANY").is_empty());
        assert_eq!(builtin.data_entry_lag_days("ANY"), DEFAULT_DATA_ENTRY_LAG_DAYS);
        let dir = folder(&[(
            "s1.json",
            r#"{"study_id": "S1", "edit_checks": [{"id": "C", "kind": "before_consent"}], "qtls": [],
                "data_entry_lag_days": 5}"#,
        )]);
        let config = RiskConfig::load(Some(&dir));
        let _ = std::fs::remove_dir_all(&dir);
        let config = config.unwrap_or_default();
        assert_eq!(config.edit_checks("S1").len(), 1);
        assert!(config.qtls("S1").is_empty());
        assert_eq!(config.data_entry_lag_days("S1"), 5);
        assert_eq!(config.edit_checks("S2"), builtin.edit_checks("S2"));
        // p₀ = 0.2, N = 100: 0.2 + 3·√(0.0016) = 0.32.
        let qtl = Qtl {
            id: "Q".to_string(),
            name: "q".to_string(),
            kri: "DISCONTINUATION".to_string(),
            expected: 0.2,
            k: 3.0,
            min_denominator: 10.0,
        };
        assert!((qtl.limit(100.0) - 0.32).abs() < 1e-12);
    }

    #[test]
    fn bad_files_are_refused_with_the_file_and_the_reason() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"study_id": "S", "thresholds": {"NOPE": {"amber": 2, "red": 3, "min_denominator": 1}}}"#,
                "unknown KRI",
            ),
            (
                r#"{"study_id": "S", "thresholds": {"AE_RATE": {"amber": 3, "red": 2, "min_denominator": 1}}}"#,
                "0 < amber < red",
            ),
            (r#"{"study_id": "S", "thresholds": {"AE_RATE": {"amber": 2, "red": 3}}}"#, "min_denominator"),
            (r#"{"study_id": "S", "thresholds": {}, "extra": 1}"#, "unknown field"),
            (r#"{"study_id": "S\u0000", "thresholds": {}}"#, "control characters"),
            (r#"{"study_id": "S", "study_id": "T", "thresholds": {}}"#, "duplicate field"),
            (r#"{"study_id": 7, "thresholds": {}}"#, "invalid type"),
            ("\u{0}\u{ff}garbage", "expected value"),
            (
                r#"{"study_id": "S", "edit_checks": [{"id": "R", "kind": "range", "code": "c", "name": "n", "unit": "u", "min": 9, "max": 1}]}"#,
                "min < max",
            ),
            (
                r#"{"study_id": "S", "edit_checks": [{"id": "C", "kind": "before_consent"}, {"id": "C", "kind": "after_withdrawal"}]}"#,
                "appears twice",
            ),
            (r#"{"study_id": "S", "edit_checks": [{"id": "C", "kind": "teleport"}]}"#, "unknown variant"),
            (
                r#"{"study_id": "S", "qtls": [{"id": "Q", "name": "q", "kri": "AE_RATE", "expected": 0.1}]}"#,
                "not a proportion",
            ),
            (
                r#"{"study_id": "S", "qtls": [{"id": "Q", "name": "q", "kri": "DISCONTINUATION", "expected": 1.5}]}"#,
                "0 < expected < 1",
            ),
            (
                r#"{"study_id": "S", "qtls": [{"id": "Q", "name": "q", "kri": "NOPE", "expected": 0.1}]}"#,
                "unknown KRI",
            ),
            (r#"{"study_id": "S", "data_entry_lag_days": 0}"#, "at least 1"),
            (r#"{"study_id": "S", "data_entry_lag_days": -3}"#, "invalid value"),
        ];
        for (text, why) in cases {
            let dir = folder(&[("x.json", text)]);
            let result = RiskConfig::load(Some(&dir));
            let _ = std::fs::remove_dir_all(&dir);
            let error = result.err().unwrap_or_default();
            assert!(error.contains(why) && error.contains("x.json"), "{text}: {error}");
        }
        let dir = folder(&[
            ("a.json", r#"{"study_id": "S", "thresholds": {}}"#),
            ("b.json", r#"{"study_id": "S", "thresholds": {}}"#),
        ]);
        let result = RiskConfig::load(Some(&dir));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(result.err().unwrap_or_default().contains("configured twice"));
        let missing = RiskConfig::load(Some(Path::new("/nonexistent/risk"))).err().unwrap_or_default();
        assert!(missing.contains("RISK_CONFIG_DIR") && missing.contains("/nonexistent/risk"), "{missing}");
    }
}
