//! Topics as code. [`wanted`] derives every topic the pipeline needs from the catalogue
//! ([`trialflow_schemas::topics`]): each catalogue topic behind the deployment's prefix and its
//! dead-letter topic, with partitions, replication factor, `min.insync.replicas`, retention and
//! clean-up, and the exactly-once relay's state topic. [`plan`] compares them with a live cluster; [`apply`] makes the cluster so,
//! idempotently. `trialflow topics plan|apply` runs them; the pipeline's own topic creation
//! ([`crate::kafka::ensure_catalogue_topics`]) creates the same topics.
//!
//! What `apply` changes: it creates missing topics and sets the managed settings
//! ([`MANAGED`]) of existing ones, keeping every other setting a topic has. It never deletes a
//! topic, never removes partitions (Kafka cannot), never adds any (a keyed topic would send some
//! keys to another partition and lose their order while old messages remain) and never moves
//! replicas: those differences are reported for an operator to decide.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ConfigSource, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use trialflow_schemas::topics::{self, TopicNames, TopicPolicy};

use crate::config::KafkaConfig;
use crate::error::{OutboxError, Result};

/// The topic settings `apply` owns.
pub const MANAGED: &[&str] = &["cleanup.policy", "retention.ms", "min.insync.replicas"];

/// How the topics of one deployment are laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicLayout {
    /// The deployment's topic names (its prefix).
    pub names: TopicNames,
    /// Partitions of each catalogue topic (dead-letter topics have one).
    pub partitions: i32,
    /// Copies of each partition (3 on a production cluster; 1 on one broker).
    pub replication_factor: i32,
    /// Copies that must have a write before it is acknowledged to an `acks=all` producer.
    pub min_insync_replicas: i32,
    /// Dead-letter topic = topic + this suffix (the consumers' `CONSUMER_DLQ_SUFFIX`).
    pub dlq_suffix: String,
    /// The exactly-once relay's state topic (`OUTBOX_STATE_TOPIC`), when it is wanted.
    pub state_topic: Option<String>,
}

/// One topic as the pipeline wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedTopic {
    pub name: String,
    pub partitions: i32,
    pub replication_factor: i32,
    /// The [`MANAGED`] settings.
    pub configs: BTreeMap<&'static str, String>,
    /// Who may read it when it carries unblinded data (a restricted topic: its consumers; its
    /// dead-letter topic: unblinded operators only); `None` for a blinded topic. Read ACLs are
    /// the cluster's: `plan` names them, `apply` does not set them.
    pub restricted_to: Option<&'static [&'static str]>,
}

fn wanted_topic(
    name: String,
    partitions: i32,
    policy: &TopicPolicy,
    restricted_to: Option<&'static [&'static str]>,
    layout: &TopicLayout,
) -> WantedTopic {
    let configs = BTreeMap::from([
        ("cleanup.policy", if policy.compacted { "compact" } else { "delete" }.to_string()),
        ("retention.ms", policy.retention.retention_ms().to_string()),
        ("min.insync.replicas", layout.min_insync_replicas.to_string()),
    ]);
    WantedTopic { name, partitions, replication_factor: layout.replication_factor, configs, restricted_to }
}

/// Every topic of `layout`: the catalogue's, then their dead-letter topics.
pub fn wanted(layout: &TopicLayout) -> Vec<WantedTopic> {
    let readers = |topic: &str| {
        topics::RESTRICTED_READERS.iter().find(|(t, _)| *t == topic).map(|(_, readers)| *readers)
    };
    let topics = topics::POLICIES
        .iter()
        .map(|p| wanted_topic(layout.names.name(p.topic), layout.partitions, p, readers(p.topic), layout));
    let letters = topics::POLICIES.iter().map(|p| {
        let name = layout.names.dead_letter(p.topic, &layout.dlq_suffix);
        let operators: &'static [&'static str] = &["unblinded operators"];
        let restricted_to = readers(p.topic).map(|_| operators);
        wanted_topic(name, 1, &topics::dead_letter_policy(p), restricted_to, layout)
    });
    let state = layout.state_topic.iter().map(|name| {
        // Its markers: one per key stays for ever (compaction), the rest goes.
        let policy = TopicPolicy { topic: "", retention: topics::Retention::Forever, compacted: true };
        wanted_topic(name.clone(), 1, &policy, None, layout)
    });
    topics.chain(letters).chain(state).collect()
}

/// What `apply` would do to one topic, or what it leaves to an operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The topic is missing: create it.
    Create(WantedTopic),
    /// Managed settings differ: set them (`(setting, live value, wanted value)`), keeping the
    /// topic's other own settings (`keep`, sent again: AlterConfigs replaces a topic's settings).
    Configure {
        topic: String,
        settings: Vec<(&'static str, Option<String>, String)>,
        keep: BTreeMap<String, String>,
    },
    /// A difference `apply` does not change (partitions, replication factor).
    Unchanged { topic: String, why: String },
}

/// The changes that make a cluster hold the wanted topics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Topics already as wanted.
    pub up_to_date: Vec<String>,
    pub changes: Vec<Change>,
}

impl Plan {
    /// Whether applying it would change anything.
    pub fn is_empty(&self) -> bool {
        self.changes.iter().all(|c| matches!(c, Change::Unchanged { .. }))
    }
}

impl fmt::Display for Plan {
    /// One line per change (`+` create, `~` configure, `!` left to an operator), then a count.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (mut create, mut configure, mut left) = (0, 0, 0);
        for change in &self.changes {
            match change {
                Change::Create(t) => {
                    create += 1;
                    let configs: Vec<String> = t.configs.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    let restricted = match t.restricted_to {
                        Some(readers) => format!("; restricted: grant reads to {} only", readers.join(", ")),
                        None => String::new(),
                    };
                    writeln!(
                        f,
                        "+ {}: create, {} partition(s), replication factor {}, {}{restricted}",
                        t.name,
                        t.partitions,
                        t.replication_factor,
                        configs.join(", ")
                    )?;
                }
                Change::Configure { topic, settings, .. } => {
                    configure += 1;
                    let changes: Vec<String> = settings
                        .iter()
                        .map(|(k, live, wanted)| {
                            format!("{k} {} → {wanted}", live.as_deref().unwrap_or("(unset)"))
                        })
                        .collect();
                    writeln!(f, "~ {topic}: {}", changes.join(", "))?;
                }
                Change::Unchanged { topic, why } => {
                    left += 1;
                    writeln!(f, "! {topic}: {why}")?;
                }
            }
        }
        write!(
            f,
            "{} up to date, {create} to create, {configure} to configure, {left} difference(s) left to an operator",
            self.up_to_date.len()
        )
    }
}

pub(crate) fn admin(kafka: &KafkaConfig) -> Result<AdminClient<DefaultClientContext>> {
    kafka.client("trialflow-admin", |_| {}).create().map_err(OutboxError::KafkaConfig)
}

const TIMEOUT: Duration = Duration::from_secs(30);

fn options() -> AdminOptions {
    AdminOptions::new().request_timeout(Some(TIMEOUT)).operation_timeout(Some(TIMEOUT))
}

/// A topic as the cluster has it.
#[derive(Debug)]
struct LiveTopic {
    partitions: i32,
    replication_factor: i32,
    /// Every setting's value (defaults included).
    values: BTreeMap<String, Option<String>>,
    /// The topic's own settings (not inherited from the broker).
    own: BTreeMap<String, String>,
}

async fn live(
    admin: &AdminClient<DefaultClientContext>,
    names: &[String],
) -> Result<BTreeMap<String, LiveTopic>> {
    let metadata = admin.inner().fetch_metadata(None, TIMEOUT).map_err(OutboxError::KafkaConfig)?;
    let mut found: BTreeMap<String, (i32, i32)> = BTreeMap::new();
    for topic in
        metadata.topics().iter().filter(|t| t.error().is_none() && names.iter().any(|n| n == t.name()))
    {
        let replicas = topic.partitions().iter().map(|p| p.replicas().len()).min().unwrap_or_default();
        let shape = (topic.partitions().len() as i32, replicas as i32);
        found.insert(topic.name().to_string(), shape);
    }
    let specifiers: Vec<ResourceSpecifier<'_>> = found.keys().map(|n| ResourceSpecifier::Topic(n)).collect();
    let described = if specifiers.is_empty() {
        Vec::new()
    } else {
        admin.describe_configs(&specifiers, &options()).await.map_err(OutboxError::KafkaConfig)?
    };
    let mut out = BTreeMap::new();
    for ((name, (partitions, replication_factor)), result) in found.into_iter().zip(described) {
        let resource =
            result.map_err(|code| OutboxError::KafkaConfig(rdkafka::error::KafkaError::AdminOp(code)))?;
        let values = resource.entries.iter().map(|e| (e.name.clone(), e.value.clone())).collect();
        let own = resource
            .entries
            .iter()
            .filter(|e| e.source == ConfigSource::DynamicTopic && !e.is_sensitive)
            .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
            .collect();
        out.insert(name, LiveTopic { partitions, replication_factor, values, own });
    }
    Ok(out)
}

/// Compares the wanted topics of `layout` with the cluster behind `kafka`.
pub async fn plan(kafka: &KafkaConfig, layout: &TopicLayout) -> Result<Plan> {
    let admin = admin(kafka)?;
    let wanted = wanted(layout);
    let names: Vec<String> = wanted.iter().map(|t| t.name.clone()).collect();
    let live = live(&admin, &names).await?;
    let mut plan = Plan::default();
    for topic in wanted {
        let Some(live) = live.get(&topic.name) else {
            plan.changes.push(Change::Create(topic));
            continue;
        };
        let mut differs = false;
        if live.partitions != topic.partitions {
            differs = true;
            plan.changes.push(Change::Unchanged {
                topic: topic.name.clone(),
                why: format!(
                    "{} partition(s), wanted {}: not changed (more partitions move keys to other \
                     partitions and break their order; fewer is impossible)",
                    live.partitions, topic.partitions
                ),
            });
        }
        if live.replication_factor != topic.replication_factor {
            differs = true;
            plan.changes.push(Change::Unchanged {
                topic: topic.name.clone(),
                why: format!(
                    "replication factor {}, wanted {}: not changed (a partition reassignment, \
                     kafka-reassign-partitions)",
                    live.replication_factor, topic.replication_factor
                ),
            });
        }
        let settings: Vec<(&'static str, Option<String>, String)> = topic
            .configs
            .iter()
            .filter(|(k, v)| live.values.get(**k).cloned().flatten().as_deref() != Some(v.as_str()))
            .map(|(k, v)| (*k, live.values.get(*k).cloned().flatten(), v.clone()))
            .collect();
        if !settings.is_empty() {
            differs = true;
            // Every own setting not being changed, managed ones that already match included:
            // AlterConfigs would reset whatever it is not sent.
            let keep = live
                .own
                .iter()
                .filter(|(k, _)| !settings.iter().any(|(s, _, _)| s == k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            plan.changes.push(Change::Configure { topic: topic.name.clone(), settings, keep });
        }
        if !differs {
            plan.up_to_date.push(topic.name);
        }
    }
    Ok(plan)
}

/// What [`apply`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub created: usize,
    pub configured: usize,
}

/// Carries out `plan`'s creations and settings (its [`Change::Unchanged`] lines stay as they
/// are). Idempotent: a topic someone else created meanwhile is fine.
pub async fn apply(kafka: &KafkaConfig, plan: &Plan) -> Result<Applied> {
    let mut applied = Applied::default();
    let create: Vec<WantedTopic> = plan
        .changes
        .iter()
        .filter_map(|c| if let Change::Create(t) = c { Some(t.clone()) } else { None })
        .collect();
    if !create.is_empty() {
        applied.created = crate::kafka::create_missing(kafka, &create).await?;
    }
    let admin = admin(kafka)?;
    let alters: Vec<AlterConfig<'_>> = plan
        .changes
        .iter()
        .filter_map(|c| match c {
            // AlterConfigs replaces a topic's own settings: the ones kept are sent again.
            Change::Configure { topic, settings, keep } => {
                let alter = AlterConfig::new(ResourceSpecifier::Topic(topic));
                let alter = keep.iter().fold(alter, |a, (k, v)| a.set(k, v));
                Some(settings.iter().fold(alter, |a, (k, _, v)| a.set(k, v)))
            }
            _ => None,
        })
        .collect();
    if !alters.is_empty() {
        for result in admin.alter_configs(&alters, &options()).await.map_err(OutboxError::KafkaConfig)? {
            match result {
                Ok(_) => applied.configured += 1,
                Err((specifier, code)) => {
                    return Err(refused("configuring", &format!("{specifier:?}"), code));
                }
            }
        }
        settings_visible(&admin, plan).await?;
    }
    Ok(applied)
}

/// Waits until every setting `plan` configures reads back as set: the controller acknowledges an
/// AlterConfigs before the brokers serve the new value (KRaft applies it from the metadata log), so
/// a `plan` right after `apply` could still see the old one. At most [`TIMEOUT`].
async fn settings_visible(admin: &AdminClient<DefaultClientContext>, plan: &Plan) -> Result<()> {
    type Settings = Vec<(&'static str, Option<String>, String)>;
    let wanted: Vec<(&String, &Settings)> = plan
        .changes
        .iter()
        .filter_map(|c| match c {
            Change::Configure { topic, settings, .. } => Some((topic, settings)),
            _ => None,
        })
        .collect();
    let names: Vec<String> = wanted.iter().map(|(t, _)| (*t).clone()).collect();
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let live = live(admin, &names).await?;
        let pending: Vec<String> = wanted
            .iter()
            .flat_map(|(topic, settings)| {
                let values = live.get(topic.as_str()).map(|t| &t.values);
                settings
                    .iter()
                    .filter(move |(k, _, v)| {
                        values.and_then(|m| m.get(*k)).and_then(Option::as_deref) != Some(v.as_str())
                    })
                    .map(move |(k, _, v)| format!("{topic}: {k}={v}"))
            })
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(OutboxError::TopicsNotReady(format!(
                "configured, but the cluster does not show it after {TIMEOUT:?}: {}",
                pending.join(", ")
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

fn refused(doing: &str, topic: &str, code: RDKafkaErrorCode) -> OutboxError {
    OutboxError::TopicsNotReady(format!("{doing} {topic}: the cluster refused with {code:?} ({code})"))
}
