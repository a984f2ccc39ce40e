//! The questionnaire definitions and schedules the validator knows: the built-in ones
//! (`consumers/questionnaires/`), plus any found in `EPRO_CONFIG_DIR` (a definition with the same
//! id and version, or a schedule for the same study, replaces the built-in one).

use std::collections::BTreeMap;
use std::path::Path;

use thiserror::Error;

use super::questionnaire::Questionnaire;
use super::schedule::Schedule;

const BUILTIN: &[(&str, &str)] = &[
    ("phq-9.v1.0.json", include_str!("../../questionnaires/phq-9.v1.0.json")),
    ("gad-7.v1.0.json", include_str!("../../questionnaires/gad-7.v1.0.json")),
    ("nrs-pain.v1.0.json", include_str!("../../questionnaires/nrs-pain.v1.0.json")),
    ("schedule.default.json", include_str!("../../questionnaires/schedule.default.json")),
];

#[derive(Debug, Error)]
pub enum CatalogueError {
    #[error("{file}: {reason}")]
    Invalid { file: String, reason: String },
    #[error("reading {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("no default schedule (a schedule with study_id \"*\")")]
    NoDefaultSchedule,
}

/// Questionnaires by (id, version) and schedules by study.
#[derive(Debug, Clone, Default)]
pub struct Catalogue {
    questionnaires: BTreeMap<(String, String), Questionnaire>,
    schedules: BTreeMap<String, Schedule>,
}

/// Why a questionnaire reference does not resolve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unknown {
    Questionnaire,
    Version,
}

impl Catalogue {
    /// The built-in definitions, then those of `dir` if given.
    pub fn load(dir: Option<&Path>) -> Result<Self, CatalogueError> {
        let mut catalogue = Self::default();
        for (file, text) in BUILTIN {
            catalogue.add(file, text)?;
        }
        if let Some(dir) = dir {
            let io = |source| CatalogueError::Io { path: dir.display().to_string(), source };
            let mut files: Vec<_> = std::fs::read_dir(dir)
                .map_err(io)?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "json"))
                .collect();
            files.sort();
            for path in files {
                let text = std::fs::read_to_string(&path)
                    .map_err(|source| CatalogueError::Io { path: path.display().to_string(), source })?;
                catalogue.add(&path.display().to_string(), &text)?;
            }
        }
        if !catalogue.schedules.contains_key("*") {
            return Err(CatalogueError::NoDefaultSchedule);
        }
        Ok(catalogue)
    }

    /// Adds one file: a schedule if it has `occurrences`, else a questionnaire.
    fn add(&mut self, file: &str, text: &str) -> Result<(), CatalogueError> {
        let invalid = |reason: String| CatalogueError::Invalid { file: file.to_string(), reason };
        let json: serde_json::Value = serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if json.get("occurrences").is_some() {
            let schedule: Schedule = serde_json::from_value(json).map_err(|e| invalid(e.to_string()))?;
            schedule.validate().map_err(invalid)?;
            for o in &schedule.occurrences {
                if !self.questionnaires.keys().any(|(id, _)| *id == o.questionnaire) {
                    return Err(invalid(format!(
                        "occurrence {} names unknown questionnaire {}",
                        o.id, o.questionnaire
                    )));
                }
            }
            self.schedules.insert(schedule.study_id.clone(), schedule);
        } else {
            let q: Questionnaire = serde_json::from_value(json).map_err(|e| invalid(e.to_string()))?;
            q.validate().map_err(invalid)?;
            self.questionnaires.insert((q.id.clone(), q.version.clone()), q);
        }
        Ok(())
    }

    pub fn questionnaire(&self, id: &str, version: &str) -> Result<&Questionnaire, Unknown> {
        if let Some(q) = self.questionnaires.get(&(id.to_string(), version.to_string())) {
            return Ok(q);
        }
        if self.questionnaires.keys().any(|(known, _)| known == id) {
            Err(Unknown::Version)
        } else {
            Err(Unknown::Questionnaire)
        }
    }

    /// The study's schedule, or the default one.
    pub fn schedule(&self, study_id: &str) -> &Schedule {
        self.schedules
            .get(study_id)
            .or_else(|| self.schedules.get("*"))
            .unwrap_or_else(|| unreachable!("load() refuses a catalogue without a default schedule"))
    }

    /// Every questionnaire, by id, then version.
    pub fn questionnaires(&self) -> impl Iterator<Item = &Questionnaire> {
        self.questionnaires.values()
    }

    /// Every schedule, by study id (the default, `*`, first).
    pub fn schedules(&self) -> impl Iterator<Item = &Schedule> {
        self.schedules.values()
    }

    /// `(id, version)` of every questionnaire, for logs.
    pub fn versions(&self) -> Vec<String> {
        self.questionnaires.keys().map(|(id, v)| format!("{id} {v}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_catalogue_loads() {
        let c = Catalogue::load(None).unwrap_or_default();
        assert_eq!(c.versions(), vec!["GAD-7 1.0", "NRS-PAIN 1.0", "PHQ-9 1.0"]);
        assert!(c.questionnaire("PHQ-9", "1.0").is_ok());
        assert_eq!(c.questionnaire("PHQ-9", "2.0").err(), Some(Unknown::Version));
        assert_eq!(c.questionnaire("EQ-5D", "1.0").err(), Some(Unknown::Questionnaire));
        assert_eq!(c.schedule("ANY-STUDY").study_id, "*");
    }

    #[test]
    fn a_study_schedule_from_the_config_dir_replaces_the_default_for_that_study() -> Result<(), CatalogueError>
    {
        let dir = std::env::temp_dir().join(format!("trialflow-epro-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).map_err(|source| CatalogueError::Io { path: String::new(), source })?;
        let schedule = r#"{"study_id": "S1", "version": "2", "late_sync_hours": 12, "future_tolerance_minutes": 1,
            "occurrences": [{"id": "GAD-7/D1", "questionnaire": "GAD-7", "study_day": 1,
                             "window_before_days": 0, "window_after_days": 1, "grace_days": 0}]}"#;
        std::fs::write(dir.join("s1.json"), schedule)
            .map_err(|source| CatalogueError::Io { path: String::new(), source })?;
        let c = Catalogue::load(Some(&dir))?;
        assert_eq!(c.schedule("S1").late_sync_hours, 12);
        assert_eq!(c.schedule("S2").study_id, "*");
        std::fs::write(dir.join("s1.json"), schedule.replace("GAD-7\"", "EQ-5D\""))
            .map_err(|source| CatalogueError::Io { path: String::new(), source })?;
        assert!(
            Catalogue::load(Some(&dir)).is_err_and(|e| e.to_string().contains("unknown questionnaire EQ-5D"))
        );
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
