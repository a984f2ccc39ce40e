//! `trialflow audit verify|export`: checks the hash chain of every service's audit trail, and
//! exports a study's records (see `trialflow_outbox::audit`).
//!
//! `verify` walks the trails of the registry's services (or one), chain by chain, prints one
//! line per service and one per chain head (seq and hash: keep those lines somewhere else, a
//! later run must extend them) and fails naming the service, the chain, the seq and what is
//! wrong when a chain is broken.
//!
//! `export` writes a study's records of every service, each service's in time order across its
//! chains, as JSON lines (the full view, unblinded
//! changes marked, with the hashes; `--blinded` for the view blinded users get) or as CDISC ODM
//! 1.3.2 `AuditRecords` (who: `UserRef`, where: `LocationRef`, when: `DateTimeStamp`, why:
//! `ReasonForChange`, what and what caused it: `SourceID`). ODM carries changed values in
//! `ItemData` against study metadata this service does not keep, so the values travel in
//! `SourceID` as JSON. The audit test checks the document against the ODM 1.3.2 XSD
//! (`scripts/odm-validator.sh`).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use chrono::{SecondsFormat, Utc};
use clap::{Args, Subcommand, ValueEnum};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use trialflow_outbox::audit::{self, StoredRecord};
use trialflow_outbox::{DatabaseConfig, SchemaName};
use trialflow_pipeline::services::{Schemas, stores};

/// Records read per query while exporting.
const PAGE: i64 = 1_000;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain of each service's audit trail; fails naming the first broken record.
    Verify {
        #[command(flatten)]
        which: Which,
    },
    /// Write a study's audit records of every service (JSON lines, or CDISC ODM 1.3.2 XML).
    Export {
        #[command(flatten)]
        which: Which,
        /// The study whose records to export.
        #[arg(long)]
        study: String,
        /// `jsonl` (one record per line) or `odm` (CDISC ODM 1.3.2 AuditRecords).
        #[arg(long, value_enum, default_value_t = Format::Jsonl)]
        format: Format,
        /// Write here instead of standard output.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// The blinded view: changes that reveal treatment arms left out.
        #[arg(long)]
        blinded: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Jsonl,
    Odm,
}

/// Which trails: every service of the registry, one of them, or given schemas.
#[derive(Debug, Args)]
pub struct Which {
    #[command(flatten)]
    pub database: DatabaseConfig,
    /// Only this service (see `trialflow services`).
    #[arg(long, conflicts_with = "schema")]
    pub service: Option<String>,
    /// These schemas instead of the services' default ones (an isolated pipeline's), by name.
    #[arg(long, value_delimiter = ',')]
    pub schema: Vec<SchemaName>,
}

impl Which {
    /// (name shown, schema) of each trail.
    fn trails(&self) -> anyhow::Result<Vec<(String, SchemaName)>> {
        if !self.schema.is_empty() {
            return Ok(self.schema.iter().map(|s| (s.to_string(), s.clone())).collect());
        }
        let schemas = Schemas::default();
        let all: Vec<(String, SchemaName)> =
            schemas.iter().map(|(service, schema)| (service.name.to_string(), schema.clone())).collect();
        match &self.service {
            None => Ok(all),
            Some(name) => match all.into_iter().find(|(service, _)| service == name) {
                Some(trail) => Ok(vec![trail]),
                None => {
                    let known: Vec<&str> = stores().map(|(s, _)| s.name).collect();
                    bail!("no service `{name}` with an audit trail; one of: {}", known.join(", "))
                }
            },
        }
    }
}

pub async fn run(command: AuditCommand) -> anyhow::Result<()> {
    let which = match &command {
        AuditCommand::Verify { which } | AuditCommand::Export { which, .. } => which,
    };
    let trails = which.trails()?;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(which.database.connect_options()?)
        .await
        .context("connecting to the database (DATABASE_URL)")?;
    let result = match &command {
        AuditCommand::Verify { .. } => verify(&pool, &trails).await,
        AuditCommand::Export { study, format, output, blinded, .. } => {
            let mut out: Box<dyn Write> = match output {
                Some(path) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
                )),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            let n = export(&pool, &trails, study, *format, *blinded, &mut out).await?;
            out.flush()?;
            eprintln!("exported {n} audit record(s) of study `{study}`");
            Ok(())
        }
    };
    pool.close().await;
    result
}

/// Verifies each trail, printing a line per service and one per chain head (to keep outside the
/// database and compare with a later print); fails when one is broken.
async fn verify(pool: &PgPool, trails: &[(String, SchemaName)]) -> anyhow::Result<()> {
    let mut broken = Vec::new();
    for (service, schema) in trails {
        let verdict =
            audit::verify(pool, schema).await.with_context(|| format!("verifying `{service}` ({schema})"))?;
        match &verdict.broken {
            None => {
                println!(
                    "{service} ({schema}): {} record(s) in {} chain(s), intact",
                    verdict.records,
                    verdict.heads.len()
                );
                for head in &verdict.heads {
                    println!("  chain {} head seq {} hash {}", head.chain, head.seq, head.hash_hex());
                }
            }
            Some(b) => {
                println!(
                    "{service} ({schema}): BROKEN in chain {} at seq {} ({}): {}",
                    b.chain,
                    b.what.seq(),
                    b.what.kind(),
                    b.what
                );
                broken.push(service.clone());
            }
        }
    }
    if !broken.is_empty() {
        bail!("the audit trail of {} is broken", broken.join(", "));
    }
    println!("{} audit trail(s) verified", trails.len());
    Ok(())
}

/// Writes the study's records of every trail; returns how many.
pub async fn export(
    pool: &PgPool,
    trails: &[(String, SchemaName)],
    study: &str,
    format: Format,
    blinded: bool,
    out: &mut dyn Write,
) -> anyhow::Result<u64> {
    let mut n = 0;
    if format == Format::Odm {
        odm::start(out, study)?;
    }
    for (service, schema) in trails {
        let mut conn = pool.acquire().await?;
        let mut after = None;
        loop {
            let page = audit::read(&mut conn, schema, Some(study), after.as_ref(), PAGE).await?;
            for record in &page {
                match format {
                    Format::Jsonl => writeln!(out, "{}", record.view(service, blinded))?,
                    Format::Odm => odm::record(out, service, record, blinded)?,
                }
                n += 1;
            }
            match page.last() {
                Some(last) if page.len() as i64 == PAGE => after = Some(last.position()),
                _ => break,
            }
        }
    }
    if format == Format::Odm {
        odm::end(out)?;
    }
    Ok(n)
}

/// CDISC ODM 1.3.2: `ODM/ClinicalData/AuditRecords/AuditRecord`.
mod odm {
    use super::*;

    pub(super) fn start(out: &mut dyn Write, study: &str) -> std::io::Result<()> {
        let now = Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true);
        let study = escape(study);
        writeln!(out, r#"<?xml version="1.0" encoding="UTF-8"?>"#)?;
        writeln!(
            out,
            r#"<ODM xmlns="http://www.cdisc.org/ns/odm/v1.3" ODMVersion="1.3.2" FileType="Snapshot" FileOID="trialflow.audit.{study}.{now}" CreationDateTime="{now}" Originator="trialflow">"#
        )?;
        writeln!(out, r#"  <ClinicalData StudyOID="{study}" MetaDataVersionOID="trialflow.audit.v1">"#)?;
        writeln!(out, "    <AuditRecords>")
    }

    pub(super) fn record(
        out: &mut dyn Write,
        service: &str,
        r: &StoredRecord,
        blinded: bool,
    ) -> std::io::Result<()> {
        let view = r.view(service, blinded);
        let what = serde_json::json!({
            "source": service,
            "chain": r.chain,
            "seq": r.seq,
            "actor_role": r.actor_role,
            "on_behalf_of": r.on_behalf_of,
            "action": r.action,
            "entity": view["entity"],
            "changes": view["changes"],
            "cause": r.cause,
        });
        let location = r.site_id.as_deref().unwrap_or(service);
        writeln!(
            out,
            r#"      <AuditRecord ID="AR.{}.{}.{}" EditPoint="DBAudit" UsedImputationMethod="No">"#,
            escape(service),
            r.chain,
            r.seq
        )?;
        writeln!(out, r#"        <UserRef UserOID="USR.{}"/>"#, escape(&r.actor_user))?;
        writeln!(out, r#"        <LocationRef LocationOID="LOC.{}"/>"#, escape(location))?;
        writeln!(
            out,
            "        <DateTimeStamp>{}</DateTimeStamp>",
            r.recorded_at.to_rfc3339_opts(SecondsFormat::Micros, true)
        )?;
        if let Some(reason) = &r.reason {
            writeln!(out, "        <ReasonForChange>{}</ReasonForChange>", escape(reason))?;
        }
        writeln!(out, "        <SourceID>{}</SourceID>", escape(&what.to_string()))?;
        writeln!(out, "      </AuditRecord>")
    }

    pub(super) fn end(out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(out, "    </AuditRecords>\n  </ClinicalData>\n</ODM>")
    }

    /// Text and attribute values: markup characters as entities, line breaks and tabs as
    /// character references (so attribute values keep them).
    pub(super) fn escape(text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        for c in text.chars() {
            match c {
                '&' => out.push_str("&amp;"),
                '<' => out.push_str("&lt;"),
                '>' => out.push_str("&gt;"),
                '"' => out.push_str("&quot;"),
                '\'' => out.push_str("&apos;"),
                '\n' => out.push_str("&#10;"),
                '\r' => out.push_str("&#13;"),
                '\t' => out.push_str("&#9;"),
                // Not allowed in XML 1.0 at all: the stores refuse them, so only as a guard.
                c if (c as u32) < 0x20 => out.push('\u{FFFD}'),
                c => out.push(c),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    #[test]
    fn xml_text_is_escaped() {
        assert_eq!(odm::escape(r#"a<b & "c" 'd'>"#), "a&lt;b &amp; &quot;c&quot; &apos;d&apos;&gt;");
        assert_eq!(odm::escape("line\nnext\u{1}"), "line&#10;next\u{FFFD}");
    }

    #[test]
    fn the_commands_parse() {
        let cli = Cli::try_parse_from(["trialflow", "audit", "verify", "--service", "enrollment"]);
        let Ok(Cli { command: Command::Audit(AuditCommand::Verify { which }), .. }) = cli else {
            panic!("{cli:?}")
        };
        assert_eq!(which.trails().ok().map(|t| t.len()), Some(1));
        let cli = Cli::try_parse_from(["trialflow", "audit", "export", "--study", "S1", "--format", "odm"]);
        assert!(
            matches!(
                cli,
                Ok(Cli { command: Command::Audit(AuditCommand::Export { format: Format::Odm, .. }), .. })
            ),
            "{cli:?}"
        );
        let all = Which { database: DatabaseConfig::new("postgres://x"), service: None, schema: vec![] };
        let names: Vec<String> = all.trails().unwrap_or_default().into_iter().map(|(s, _)| s).collect();
        assert!(names.contains(&"site-api".to_string()) && names.contains(&"enrollment".to_string()));
        let unknown = Which { service: Some("nope".into()), ..all };
        assert!(unknown.trails().is_err());
        assert!(Cli::try_parse_from(["trialflow", "audit", "export"]).is_err(), "--study is required");
    }
}
