//! Per-study KRI thresholds: a folder (`RISK_CONFIG_DIR`) of `*.json` files, one per study (or
//! `"*"` for every study without its own), each giving for some KRIs their amber and red limits
//! and minimum denominator; a KRI not named keeps its defaults (±2, ±3, [`Kri::min_denominator`]).
//!
//! ```json
//! {"study_id": "CDISCPILOT01", "thresholds": {"AE_RATE": {"amber": 2.5, "red": 3.5, "min_denominator": 60}}}
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::kri::{self, Kri, Thresholds};

/// Largest configuration file read (bytes): a folder of thresholds, not a data set.
const MAX_FILE_BYTES: u64 = 1024 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StudyThresholds {
    study_id: String,
    thresholds: BTreeMap<String, Thresholds>,
}

/// The thresholds of every study.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RiskConfig {
    /// Study id (or `*`) → KRI id → thresholds.
    studies: BTreeMap<String, BTreeMap<String, Thresholds>>,
}

impl RiskConfig {
    /// The defaults, plus the studies of `dir`'s `*.json` files when given. Refuses unreadable
    /// files, unknown fields and KRIs, thresholds that cannot flag, a study configured twice.
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
        let set: StudyThresholds = serde_json::from_str(text).map_err(|e| format!("{file}: {e}"))?;
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
        if self.studies.insert(set.study_id.clone(), set.thresholds).is_some() {
            return Err(format!("{file}: study \"{study}\" is configured twice"));
        }
        Ok(())
    }

    /// The thresholds of `kri` in `study_id`: its own, the `*` set's, or the defaults.
    pub fn thresholds(&self, study_id: &str, kri: &Kri) -> Thresholds {
        let of = |study: &str| self.studies.get(study).and_then(|t| t.get(kri.id)).copied();
        of(study_id).or_else(|| of("*")).unwrap_or_else(|| Thresholds::default_for(kri))
    }
}

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
