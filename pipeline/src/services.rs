//! The registry of services: every service of the pipeline once, with its schema and
//! migrations, the topics it reads (as a consumer group) and writes, and how it starts.
//!
//! Everything that must know "all services" derives from [`SERVICES`]: `trialflow migrate`, the
//! relay's default outbox sources, `trialflow consume`'s choices, the in-process [`Pipeline`],
//! its isolated variant for tests, the consumer groups the simulation waits on, and
//! `trialflow services`, which prints this map for operators. Adding a service is one entry here
//! and its module.
//!
//! [`Pipeline`]: crate::Pipeline

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use trialflow_consumers::enrollment::{self, Enrollment};
use trialflow_consumers::epro::{self, EproValidation, catalogue::Catalogue};
use trialflow_consumers::kit_allocation::{self, KitAllocation};
use trialflow_consumers::monitoring::{self, rules::RuleBook};
use trialflow_consumers::notifier::{self, NotifierConfig};
use trialflow_consumers::risk;
use trialflow_consumers::{ConsumerConfig, ConsumerSpec, runtime};
use trialflow_outbox::SchemaName;
use trialflow_producers::{epro_gateway, site_api};
use trialflow_schemas::topics::{self, TopicNames};

/// A future a service runs as.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
/// A migration's future: not `Send`, as sqlx's migrator's future cannot be proven to be (a
/// limit of the compiler with higher-ranked lifetimes); migrations are awaited, not spawned.
pub type MigrateFuture = Pin<Box<dyn Future<Output = trialflow_outbox::Result<()>>>>;

/// One service of the pipeline.
#[derive(Debug)]
pub struct Service {
    /// Its name: the consumer's name (inbox key, default consumer group, metric label) for a
    /// consumer, and the `trialflow consume` choice.
    pub name: &'static str,
    /// What it does, in one line.
    pub about: &'static str,
    /// Its database schema, if it keeps state.
    pub store: Option<Store>,
    /// Its consumer, if it reads topics.
    pub consumer: Option<Consumer>,
    /// The `trialflow` subcommand serving its HTTP front door, if it has one.
    pub http: Option<&'static str>,
    /// The catalogue topics it writes (through its outbox, or straight to the broker for a
    /// service without a schema).
    pub writes: &'static [&'static str],
}

/// A service's database schema.
#[derive(Debug)]
pub struct Store {
    /// Its default name.
    pub schema: fn() -> SchemaName,
    /// A short tag, for the private schemas of an isolated pipeline (`<name>_<tag>_<run>`).
    pub tag: &'static str,
    /// Creates or upgrades it (tables, outbox, and inbox for a consumer). Idempotent.
    pub migrate: fn(String, SchemaName) -> MigrateFuture,
}

/// A service's consumer.
#[derive(Debug)]
pub struct Consumer {
    /// What it consumes, on schema `schema` and deployed topic names `topics`.
    pub spec: fn(SchemaName, &TopicNames) -> ConsumerSpec,
    /// Prepares it (loads what it is configured with, so a bad configuration fails before anything
    /// starts) and returns the consumer to run until `stop`.
    pub start: fn(Start) -> anyhow::Result<BoxFuture<'static, anyhow::Result<()>>>,
}

/// What a consumer starts with.
#[derive(Debug, Clone)]
pub struct Start {
    pub spec: ConsumerSpec,
    pub config: ConsumerConfig,
    pub topics: TopicNames,
    pub settings: Settings,
    pub stop: CancellationToken,
}

/// The settings particular to one service or another, for every service.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// epro-validation: questionnaire definitions and schedules beyond the built-in ones.
    pub epro_config_dir: Option<PathBuf>,
    /// monitoring: per-study rule sets beyond the default one.
    pub monitoring_rules_dir: Option<PathBuf>,
    /// risk: per-study KRI thresholds beyond the defaults.
    pub risk_config_dir: Option<PathBuf>,
    /// notifier: who is notified (empty: alerts are recorded, nobody is paged).
    pub notifier: NotifierConfig,
}

/// Every service, in the order they are migrated and started.
pub static SERVICES: &[Service] = &[
    Service {
        name: site_api::NAME,
        about: "sites and sponsors: studies, kit shipments, screening, consent, enrollment requests, withdrawals, answers to data queries",
        store: Some(Store {
            schema: site_api::schema,
            tag: "sa",
            migrate: |url, schema| Box::pin(async move { site_api::migrate(&url, &schema).await }),
        }),
        consumer: None,
        http: Some("site-api"),
        writes: &[
            topics::STUDY_CONFIGURATION,
            topics::SUBJECT_LIFECYCLE,
            topics::KIT_INVENTORY,
            topics::QUERIES,
        ],
    },
    Service {
        name: epro_gateway::NAME,
        about: "patient apps' questionnaire submissions onto the ingestion topic",
        store: None,
        consumer: None,
        http: Some("epro-gateway"),
        writes: &[topics::EPRO_SUBMISSIONS],
    },
    Service {
        name: enrollment::NAME,
        about: "eligibility, randomization and the enrollment saga",
        store: Some(Store {
            schema: enrollment::schema,
            tag: "enr",
            migrate: |url, schema| Box::pin(async move { enrollment::migrate(&url, &schema).await }),
        }),
        consumer: Some(Consumer {
            spec: enrollment::spec,
            start: |s| {
                let handler = Enrollment::new(s.spec.schema.clone(), s.topics);
                Ok(Box::pin(async move { Ok(runtime::run(s.spec, s.config, handler, s.stop).await?) }))
            },
        }),
        http: None,
        writes: &[topics::SUBJECT_LIFECYCLE, topics::RANDOMIZATION_LISTS, topics::TREATMENT_ASSIGNMENTS],
    },
    Service {
        name: kit_allocation::NAME,
        about: "blinded kit dispensing from site stock",
        store: Some(Store {
            schema: kit_allocation::schema,
            tag: "kit",
            migrate: |url, schema| Box::pin(async move { kit_allocation::migrate(&url, &schema).await }),
        }),
        consumer: Some(Consumer {
            spec: kit_allocation::spec,
            start: |s| {
                let handler = KitAllocation::new(s.spec.schema.clone(), s.topics);
                Ok(Box::pin(async move { Ok(runtime::run(s.spec, s.config, handler, s.stop).await?) }))
            },
        }),
        http: None,
        writes: &[topics::KIT_ALLOCATIONS, topics::KIT_INVENTORY],
    },
    Service {
        name: epro::NAME,
        about: "validation and scoring of ePRO submissions against questionnaires and schedules",
        store: Some(Store {
            schema: epro::schema,
            tag: "epro",
            migrate: |url, schema| Box::pin(async move { epro::migrate(&url, &schema).await }),
        }),
        consumer: Some(Consumer {
            spec: epro::spec,
            start: |s| {
                let catalogue = Catalogue::load(s.settings.epro_config_dir.as_deref())
                    .context("questionnaire catalogue")?;
                tracing::info!(questionnaires = ?catalogue.versions(), "Questionnaires loaded.");
                let handler = EproValidation::new(s.spec.schema.clone(), s.topics, catalogue);
                Ok(Box::pin(async move { Ok(runtime::run(s.spec, s.config, handler, s.stop).await?) }))
            },
        }),
        http: None,
        writes: &[topics::EPRO_RESPONSES],
    },
    Service {
        name: monitoring::NAME,
        about: "per-study rules → alert episodes with escalation; the researchers' alert API (alerts, closing data queries)",
        store: Some(Store {
            schema: monitoring::schema,
            tag: "mon",
            migrate: |url, schema| Box::pin(async move { monitoring::migrate(&url, &schema).await }),
        }),
        consumer: Some(Consumer {
            spec: monitoring::spec,
            start: |s| {
                let rules =
                    RuleBook::load(s.settings.monitoring_rules_dir.as_deref()).map_err(anyhow::Error::msg)?;
                Ok(Box::pin(
                    async move { Ok(monitoring::run(s.spec, s.config, rules, s.topics, s.stop).await?) },
                ))
            },
        }),
        http: Some("alert-api"),
        writes: &[topics::ALERTS, topics::QUERIES],
    },
    Service {
        name: risk::NAME,
        about: "key risk indicators per study and site, scored as {gsm} does; edit checks and their queries; quality tolerance limits",
        store: Some(Store {
            schema: risk::schema,
            tag: "risk",
            migrate: |url, schema| Box::pin(async move { risk::migrate(&url, &schema).await }),
        }),
        consumer: Some(Consumer {
            spec: risk::spec,
            start: |s| {
                let schedules = Catalogue::load(s.settings.epro_config_dir.as_deref())
                    .context("questionnaire catalogue (ePRO compliance)")?;
                let thresholds = risk::RiskConfig::load(s.settings.risk_config_dir.as_deref())
                    .map_err(anyhow::Error::msg)?
                    .with_schedules(schedules);
                Ok(Box::pin(
                    async move { Ok(risk::run(s.spec, s.config, s.topics, thresholds, s.stop).await?) },
                ))
            },
        }),
        http: None,
        writes: &[topics::KRI_FLAGS, topics::QUERIES],
    },
    Service {
        name: notifier::NAME,
        about: "notifies subscribers of alerts (webhooks, with retries)",
        store: Some(Store {
            schema: notifier::schema,
            tag: "ntf",
            migrate: |url, schema| Box::pin(async move { notifier::migrate(&url, &schema).await }),
        }),
        consumer: Some(Consumer {
            spec: notifier::spec,
            start: |s| {
                let notifier = s.settings.notifier;
                Ok(Box::pin(
                    async move { Ok(notifier::run(s.spec, s.config, notifier, s.topics, s.stop).await?) },
                ))
            },
        }),
        http: None,
        writes: &[topics::NOTIFICATIONS],
    },
];

/// The service called `name`.
pub fn service(name: &str) -> Option<&'static Service> {
    SERVICES.iter().find(|s| s.name == name)
}

/// The services with a consumer.
pub fn consumers() -> impl Iterator<Item = (&'static Service, &'static Consumer)> {
    SERVICES.iter().filter_map(|s| Some((s, s.consumer.as_ref()?)))
}

/// The services with a schema.
pub fn stores() -> impl Iterator<Item = (&'static Service, &'static Store)> {
    SERVICES.iter().filter_map(|s| Some((s, s.store.as_ref()?)))
}

impl Service {
    /// Migrates its schema `schema` (nothing for a service without one).
    pub async fn migrate(&self, database_url: &str, schema: &SchemaName) -> anyhow::Result<()> {
        if let Some(store) = &self.store {
            (store.migrate)(database_url.to_string(), schema.clone())
                .await
                .with_context(|| format!("migrating the {} schema `{schema}`", self.name))?;
        }
        Ok(())
    }
}

/// The schema of each service that has one: the defaults, or private ones for an isolated
/// pipeline. Indexed by service name: `schemas[enrollment::NAME]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schemas {
    by_service: Vec<(&'static str, SchemaName)>,
}

impl Default for Schemas {
    fn default() -> Self {
        Self { by_service: stores().map(|(s, store)| (s.name, (store.schema)())).collect() }
    }
}

impl Schemas {
    /// Private schemas `<name>_<tag>_<run>` (see [`Store::tag`]).
    pub fn isolated(name: &str, run: &str) -> anyhow::Result<Self> {
        let by_service = stores()
            .map(|(s, store)| Ok((s.name, SchemaName::new(format!("{name}_{}_{run}", store.tag))?)))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { by_service })
    }

    /// The schema of service `name`, if it has one.
    pub fn get(&self, name: &str) -> Option<&SchemaName> {
        self.by_service.iter().find(|(service, _)| *service == name).map(|(_, schema)| schema)
    }

    /// Every schema with its service, in the registry's order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static Service, &SchemaName)> {
        self.by_service.iter().filter_map(|(name, schema)| Some((service(name)?, schema)))
    }

    /// Every schema (each has an outbox): the relay's sources.
    pub fn sources(&self) -> Vec<SchemaName> {
        self.by_service.iter().map(|(_, schema)| schema.clone()).collect()
    }

    /// Every schema with its service's name (each has an audit trail): what the site API's
    /// `GET /v1/audit` reads.
    pub fn audit_sources(&self) -> Vec<site_api::audit::AuditSource> {
        self.by_service
            .iter()
            .map(|(service, schema)| site_api::audit::AuditSource {
                service: service.to_string(),
                schema: schema.clone(),
            })
            .collect()
    }
}

impl Schemas {
    /// What the site API reads of the other services: their audit trails (`GET /v1/audit`), the
    /// enrollment service's randomization records (the code break) and the risk service's data
    /// queries (`/v1/queries`).
    pub fn site_api_links(&self) -> site_api::Links {
        let enrollment = self[enrollment::NAME].clone();
        site_api::Links {
            audit_sources: self.audit_sources(),
            treatments: Some(std::sync::Arc::new(EnrollmentTreatments(enrollment))),
            queries: Some(self[risk::NAME].clone()),
        }
    }
}

/// The enrollment service's randomization records (in its schema), as the site API's code break
/// reads them.
#[derive(Debug)]
pub struct EnrollmentTreatments(pub SchemaName);

impl site_api::code_break::TreatmentRecords for EnrollmentTreatments {
    fn treatment<'c>(
        &'c self,
        conn: &'c mut sqlx::PgConnection,
        study_id: &'c str,
        subject_id: &'c str,
    ) -> futures::future::BoxFuture<'c, sqlx::Result<Option<site_api::code_break::Treatment>>> {
        Box::pin(async move {
            let found = enrollment::read::treatment(conn, &self.0, study_id, subject_id).await?;
            Ok(found.map(|t| site_api::code_break::Treatment {
                arm_code: t.arm_code,
                randomization_number: t.randomization_number,
                kit_number: t.kit_number,
            }))
        })
    }
}

impl std::ops::Index<&str> for Schemas {
    type Output = SchemaName;

    /// The schema of service `name`; panics when no service of that name has one (a programming
    /// error: the names are the services' `NAME` constants).
    fn index(&self, name: &str) -> &SchemaName {
        self.get(name).unwrap_or_else(|| panic!("no service `{name}` with a schema"))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn names_tags_and_default_schemas_are_unique() {
        let names: BTreeSet<_> = SERVICES.iter().map(|s| s.name).collect();
        assert_eq!(names.len(), SERVICES.len(), "two services share a name");
        let tags: BTreeSet<_> = stores().map(|(_, store)| store.tag).collect();
        let schemas: BTreeSet<_> = stores().map(|(_, store)| (store.schema)()).collect();
        assert_eq!(tags.len(), schemas.len(), "two services share a tag");
        assert_eq!(schemas.len(), stores().count(), "two services share a schema");
    }

    #[test]
    fn a_consumer_is_named_after_its_service_and_has_a_schema() {
        let topics = TopicNames::new("p.");
        for (service, consumer) in consumers() {
            let store = service.store.as_ref().expect("a consumer keeps its inbox in its schema");
            let spec = (consumer.spec)((store.schema)(), &topics);
            assert_eq!(spec.name, service.name, "the consumer's name is its service's");
            assert!(!spec.topics.is_empty(), "{} reads nothing", service.name);
            assert!(spec.topics.iter().all(|t| t.starts_with("p.")), "{}: {:?}", service.name, spec.topics);
        }
    }

    #[test]
    fn every_catalogue_topic_is_written_by_a_service_or_an_upstream_system_and_read_by_one() {
        // Written by upstream systems over Kafka (an EDC), not by a service of ours.
        const UPSTREAM: &[&str] = &[topics::CLINICAL_OBSERVATIONS, topics::ADVERSE_EVENTS];
        let topics = TopicNames::default();
        let read: BTreeSet<String> = consumers()
            .flat_map(|(s, c)| (c.spec)(Schemas::default()[s.name].clone(), &topics).topics)
            .collect();
        let written: BTreeSet<&str> = SERVICES.iter().flat_map(|s| s.writes.iter().copied()).collect();
        for topic in topics::ALL {
            assert!(
                written.contains(topic) != UPSTREAM.contains(topic),
                "`{topic}` must be written by a service or be an upstream topic, not both or neither"
            );
            // Read by operators, dashboards and metrics, no consumer of ours.
            if ![topics::NOTIFICATIONS, topics::RANDOMIZATION_LISTS].contains(topic) {
                assert!(read.contains(*topic), "nothing reads `{topic}`");
            }
        }
    }

    /// The topic table of `schemas/README.md` names, among its producers and consumers, exactly
    /// the services that write and read each topic here (other names there are systems and readers
    /// outside the registry: patient apps, EDC publishers, the alert API, metrics).
    #[test]
    fn the_topic_table_agrees_with_the_registry() -> anyhow::Result<()> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/README.md");
        let readme = std::fs::read_to_string(path)?;
        let topics = TopicNames::default();
        let services = |cell: &str| -> BTreeSet<String> {
            cell.split(',')
                .map(|name| name.split(" (").next().unwrap_or_default().trim().trim_matches('`').to_string())
                .filter(|name| service(name).is_some())
                .collect()
        };
        let mut rows = 0;
        for line in readme.lines().filter(|l| l.starts_with("| `") && l.split('|').count() == 9) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let topic = cells[1].trim_matches('`');
            if !topics::ALL.contains(&topic) {
                continue;
            }
            rows += 1;
            let writers: BTreeSet<String> =
                SERVICES.iter().filter(|s| s.writes.contains(&topic)).map(|s| s.name.to_string()).collect();
            let readers: BTreeSet<String> = consumers()
                .filter(|(s, c)| {
                    (c.spec)(Schemas::default()[s.name].clone(), &topics).topics.iter().any(|t| t == topic)
                })
                .map(|(s, _)| s.name.to_string())
                .collect();
            assert_eq!(services(cells[4]), writers, "producers of `{topic}` in schemas/README.md");
            assert_eq!(services(cells[5]), readers, "consumers of `{topic}` in schemas/README.md");
        }
        assert_eq!(rows, topics::ALL.len(), "one row per catalogue topic");
        Ok(())
    }

    #[test]
    fn isolated_schemas_are_private_and_indexed_by_service() -> anyhow::Result<()> {
        let schemas = Schemas::isolated("t", "0123456789ab")?;
        assert_eq!(schemas[enrollment::NAME].as_str(), "t_enr_0123456789ab");
        assert_eq!(schemas.sources().len(), stores().count());
        assert!(schemas.get(epro_gateway::NAME).is_none(), "the gateway keeps no state");
        assert_eq!(Schemas::default()[monitoring::NAME], monitoring::schema());
        Ok(())
    }
}
