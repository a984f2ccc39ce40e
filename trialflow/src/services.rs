//! `trialflow services`: the registry of services as operators need it — which schema, consumer
//! group and topics each service uses, and which subcommand runs it.

use std::fmt::Write as _;

use serde::Serialize;
use trialflow_pipeline::services::{SERVICES, Service};
use trialflow_schemas::topics::TopicNames;

#[derive(Debug, clap::Args)]
pub struct ServicesArgs {
    /// Prefix of every topic name, e.g. `staging.` (as the services are deployed).
    #[arg(long, env = "TOPIC_PREFIX", default_value = "")]
    pub topic_prefix: String,

    /// How to print the services.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One block per service.
    Text,
    /// An array of objects, one per service.
    Json,
    /// A Markdown table (the README's "Services" table is this).
    Markdown,
}

/// One service as deployed with its defaults.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Row {
    pub name: &'static str,
    pub about: &'static str,
    /// Its default schema (`None`: it keeps no state).
    pub schema: Option<String>,
    /// Its default consumer group (`CONSUMER_GROUP_ID` overrides it).
    pub consumer_group: Option<String>,
    pub reads: Vec<String>,
    pub writes: Vec<String>,
    /// How it runs on its own.
    pub run_with: Vec<String>,
}

impl Row {
    pub fn of(service: &'static Service, topics: &TopicNames) -> Self {
        let schema = service.store.as_ref().map(|store| (store.schema)());
        let spec = match (&service.consumer, &schema) {
            (Some(consumer), Some(schema)) => Some((consumer.spec)(schema.clone(), topics)),
            _ => None,
        };
        let mut run_with: Vec<String> =
            service.http.iter().map(|command| format!("trialflow {command}")).collect();
        if spec.is_some() {
            run_with.push(format!("trialflow consume {}", service.name));
        }
        Self {
            name: service.name,
            about: service.about,
            schema: schema.map(|s| s.to_string()),
            consumer_group: spec.as_ref().map(|spec| spec.name.clone()),
            reads: spec.map(|spec| spec.topics).unwrap_or_default(),
            writes: topics.names(service.writes),
            run_with,
        }
    }
}

/// Every service, in the registry's order.
pub fn rows(topics: &TopicNames) -> Vec<Row> {
    SERVICES.iter().map(|service| Row::of(service, topics)).collect()
}

/// The rows as a plain-text listing, one block per service.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let list = |items: &[String]| if items.is_empty() { "–".to_string() } else { items.join(", ") };
    for row in rows {
        let _ = writeln!(out, "{} — {}", row.name, row.about);
        let _ = writeln!(out, "  schema:         {}", row.schema.as_deref().unwrap_or("– (no state)"));
        let _ = writeln!(out, "  consumer group: {}", row.consumer_group.as_deref().unwrap_or("–"));
        let _ = writeln!(out, "  reads:          {}", list(&row.reads));
        let _ = writeln!(out, "  writes:         {}", list(&row.writes));
        let _ = writeln!(out, "  run with:       {}", list(&row.run_with));
    }
    out
}

/// The rows as a Markdown table.
pub fn markdown(rows: &[Row]) -> String {
    let code = |items: &[String]| {
        if items.is_empty() {
            "–".to_string()
        } else {
            items.iter().map(|i| format!("`{i}`")).collect::<Vec<_>>().join(", ")
        }
    };
    let mut out = String::from(
        "| service | what it does | schema | consumer group | reads | writes | run with |\n\
         |---------|--------------|--------|----------------|-------|--------|----------|\n",
    );
    for row in rows {
        let schema: Vec<String> = row.schema.iter().cloned().collect();
        let group: Vec<String> = row.consumer_group.iter().cloned().collect();
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} | {} | {} | {} |",
            row.name,
            row.about,
            code(&schema),
            code(&group),
            code(&row.reads),
            code(&row.writes),
            code(&row.run_with)
        );
    }
    out
}

pub fn print(args: &ServicesArgs) -> anyhow::Result<()> {
    let rows = rows(&TopicNames::new(args.topic_prefix.clone()));
    match args.format {
        Format::Text => print!("{}", table(&rows)),
        Format::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Format::Markdown => print!("{}", markdown(&rows)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listing_names_every_service_with_its_map() {
        let rows = rows(&TopicNames::new("staging."));
        let row = |name: &str| rows.iter().find(|r| r.name == name).unwrap_or_else(|| panic!("no {name}"));
        let enrollment = row("enrollment");
        assert_eq!(enrollment.schema.as_deref(), Some("enrollment"));
        assert_eq!(enrollment.consumer_group.as_deref(), Some("enrollment"));
        assert!(enrollment.reads.contains(&"staging.studies.configuration.v1".to_string()));
        assert!(enrollment.writes.contains(&"staging.enrollment.treatment-assignments.v1".to_string()));
        assert_eq!(enrollment.run_with, ["trialflow consume enrollment"]);
        let gateway = row("epro-gateway");
        assert_eq!((gateway.schema.as_deref(), gateway.reads.len()), (None, 0));
        assert_eq!(gateway.run_with, ["trialflow epro-gateway"]);
        let monitoring = row("monitoring");
        assert_eq!(monitoring.run_with, ["trialflow alert-api", "trialflow consume monitoring"]);
        let text = table(&rows);
        assert_eq!(text.lines().filter(|l| !l.starts_with(' ')).count(), SERVICES.len());
    }

    /// The README's "Services" table is `trialflow services --format markdown`: regenerate it
    /// with `TRIALFLOW_WRITE_DOCS=1 cargo test -p trialflow --lib services`.
    #[test]
    fn the_readme_lists_the_registry() -> anyhow::Result<()> {
        const BEGIN: &str = "<!-- services: generated by `trialflow services --format markdown` -->\n";
        const END: &str = "<!-- end of services -->";
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
        let readme = std::fs::read_to_string(&path)?;
        let start =
            readme.find(BEGIN).map(|i| i + BEGIN.len()).ok_or_else(|| anyhow::anyhow!("no {BEGIN}"))?;
        let end = start + readme[start..].find(END).ok_or_else(|| anyhow::anyhow!("no {END}"))?;
        let want = markdown(&rows(&TopicNames::default()));
        if readme[start..end] != want {
            if std::env::var_os("TRIALFLOW_WRITE_DOCS").is_some() {
                std::fs::write(&path, format!("{}{want}{}", &readme[..start], &readme[end..]))?;
            } else {
                anyhow::bail!(
                    "README.md's services table differs from the registry; regenerate it with \
                     TRIALFLOW_WRITE_DOCS=1 cargo test -p trialflow --lib services"
                );
            }
        }
        Ok(())
    }
}
