//! Our fingerprints are the Avro specification's: for every current and released schema, the
//! Parsing Canonical Form and the CRC-64-AVRO fingerprint this crate computes equal what two
//! implementations nobody here wrote compute from the same file — Apache Avro's Java
//! `SchemaNormalization` (what Java's `BinaryMessageEncoder` writes) and Python's fastavro.
//! The tools come from `interop/setup.sh` (`make interop-setup`, run by `make test`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use trialflow_schemas::canonical;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `(file relative to the repo, json)` of every schema file: current and released.
fn schema_files() -> Vec<(String, &'static str)> {
    trialflow_schemas::current_schema_files()
        .iter()
        .chain(trialflow_schemas::released_schema_files())
        .map(|(path, text)| (format!("schemas/{path}"), *text))
        .collect()
}

/// Runs a reference tool over every schema file; its lines are `file TAB form TAB fingerprint`.
fn reference(tool: &str, mut command: Command) -> BTreeMap<String, (String, String)> {
    let files: Vec<String> = schema_files().into_iter().map(|(f, _)| f).collect();
    let output = command.args(&files).current_dir(repo()).output().unwrap_or_else(|e| {
        panic!("{tool} did not start ({e}); install the interop tools: interop/setup.sh")
    });
    assert!(output.status.success(), "{tool} failed: {}", String::from_utf8_lossy(&output.stderr));
    let table: BTreeMap<String, (String, String)> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut parts = line.split('\t');
            Some((parts.next()?.to_string(), (parts.next()?.to_string(), parts.next()?.to_string())))
        })
        .collect();
    assert_eq!(table.len(), files.len(), "{tool} answered for every file");
    table
}

fn tool(relative: &str) -> PathBuf {
    let path = repo().join(relative);
    assert!(path.exists(), "{} is missing: install the interop tools with interop/setup.sh", path.display());
    path
}

fn assert_same(tool: &str, table: &BTreeMap<String, (String, String)>) {
    let mut checked = 0;
    for (file, text) in schema_files() {
        let Some((form, fingerprint)) = table.get(&file) else { panic!("{tool} did not answer for {file}") };
        let ours = canonical::parsing_canonical_form(text).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(&ours, form, "{file}: our canonical form differs from {tool}'s");
        let ours = hex::encode(canonical::rabin_fingerprint(&ours).to_le_bytes());
        assert_eq!(&ours, fingerprint, "{file}: our fingerprint differs from {tool}'s");
        checked += 1;
    }
    assert!(checked > 27, "every event schema, current and released, was compared");
}

#[test]
fn fingerprints_equal_the_java_reference_implementation() {
    let libs = tool(".tools/interop/java/libs");
    let mut java = Command::new("java");
    java.arg("-cp").arg(format!("{}/*", libs.display())).arg("interop/java/Fingerprints.java");
    assert_same("Apache Avro (Java)", &reference("Apache Avro (Java)", java));
}

#[test]
fn fingerprints_equal_fastavro() {
    let mut python = Command::new(tool(".tools/interop/venv/bin/python"));
    python.arg("interop/python/fingerprints.py");
    assert_same("fastavro", &reference("fastavro", python));
}
