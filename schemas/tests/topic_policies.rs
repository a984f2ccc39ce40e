//! The topics' retention and clean-up in code (`topics::POLICIES`, what `trialflow topics apply`
//! and the pipeline's topic creation set) are the ones the topic table of schemas/README.md
//! documents, one per catalogue topic.

use trialflow_schemas::topics::{self, Retention};

/// (topic, retention cell) of every row of the README's topic table.
fn documented() -> Vec<(String, String)> {
    let readme = include_str!("../README.md");
    readme
        .lines()
        .filter(|l| l.starts_with("| `") && l.split('|').count() == 9)
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (cells[1].trim_matches('`').to_string(), cells[6].to_string())
        })
        .filter(|(topic, _)| topics::ALL.contains(&topic.as_str()))
        .collect()
}

/// The retention cell: `forever (compacted)`, or `<n> d` with an optional remark.
fn parse(cell: &str) -> (Retention, bool) {
    if cell.starts_with("forever") {
        return (Retention::Forever, cell.contains("compacted"));
    }
    let days = cell.split(" d").next().and_then(|n| n.trim().parse().ok());
    let days = days.unwrap_or_else(|| panic!("retention cell `{cell}`: expected `<n> d` or `forever`"));
    (Retention::Days(days), cell.contains("compacted"))
}

#[test]
fn every_topic_has_the_documented_retention_and_clean_up() {
    let rows = documented();
    assert_eq!(rows.len(), topics::ALL.len(), "one README row per catalogue topic");
    let in_code: Vec<&str> = topics::POLICIES.iter().map(|p| p.topic).collect();
    assert_eq!(in_code, topics::ALL, "one policy per catalogue topic, in the catalogue's order");
    for (topic, cell) in rows {
        let policy = topics::policy(&topic).unwrap_or_else(|| panic!("no policy for {topic}"));
        assert_eq!((policy.retention, policy.compacted), parse(&cell), "{topic}: README says `{cell}`");
    }
}

#[test]
fn dead_letters_stay_at_least_a_year_and_are_never_compacted() {
    for policy in topics::POLICIES {
        let letters = topics::dead_letter_policy(policy);
        assert!(!letters.compacted, "{}", policy.topic);
        let kept = letters.retention.retention_ms();
        assert!(kept == -1 || kept >= Retention::Days(365).retention_ms(), "{}: {kept}", policy.topic);
    }
    assert_eq!(Retention::Days(30).retention_ms(), 2_592_000_000);
}
