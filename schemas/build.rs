//! Embeds every `.avsc` under `avro/` (the current schemas) and `released/` (every released
//! version, kept for schema evolution) into the crate, so the codec knows them all.

use std::fs;
use std::path::{Path, PathBuf};

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect(&path, out);
        } else if path.extension().is_some_and(|e| e == "avsc") {
            out.push(path);
        }
    }
}

fn list(root: &Path, dir: &str) -> String {
    let mut files = Vec::new();
    collect(&root.join(dir), &mut files);
    files.sort();
    let mut code = String::from("&[\n");
    for f in files {
        let rel = f.strip_prefix(root).unwrap_or(&f).display().to_string();
        code.push_str(&format!("    ({rel:?}, include_str!({:?})),\n", f.display().to_string()));
    }
    code.push(']');
    code
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    println!("cargo:rerun-if-changed=avro");
    println!("cargo:rerun-if-changed=released");
    let code = format!(
        "/// `(path, json)` of every current schema.\npub(crate) static CURRENT: &[(&str, &str)] = {};\n\
         /// `(path, json)` of every released schema version.\npub(crate) static RELEASED: &[(&str, &str)] = {};\n",
        list(&root, "avro"),
        list(&root, "released")
    );
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_default()).join("schema_files.rs");
    fs::write(out, code).unwrap_or_else(|e| panic!("writing schema_files.rs: {e}"));
}
