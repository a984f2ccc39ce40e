//! Every component in one process, for local runs (`trialflow run`), the demo and end-to-end
//! tests: the site API, the ePRO ingestion gateway, one relay over every service outbox, and the
//! domain consumers. In
//! production each runs as its own process (`trialflow relay`, `trialflow consume ...`,
//! `trialflow site-api`); nothing here is needed for that.
//!
//! * [`Pipeline`]: starts them ([`Pipeline::start`]) and stops them within their grace.
//! * [`shutdown`]: shutdown as an input, bounded: the process's watchdog and the registry of what
//!   is still running, which the pipeline's components (and the `trialflow` binary) register in.
//!
//! A library of its own so that the binary, the simulation crate (the replay starts a pipeline)
//! and the benchmarks share it without depending on the binary crate.

pub mod services;
pub mod shutdown;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::task::{self, JoinSet};
use tokio_util::sync::CancellationToken;
use trialflow_consumers::ConsumerConfig;
use trialflow_consumers::monitoring::{
    self,
    api::{AlertApi, AlertApiConfig},
};
use trialflow_http::limits::Limits;
use trialflow_outbox::{DatabaseConfig, KafkaConfig, RelayConfig};
use trialflow_producers::epro_gateway::{self, EproGateway, EproGatewayConfig};
use trialflow_producers::site_api::{self, SiteApi, SiteApiConfig};
use trialflow_schemas::topics::TopicNames;

pub use self::services::{Schemas, Settings};

/// How the in-process pipeline runs.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub schemas: Schemas,
    pub topics: TopicNames,
    pub relay: RelayConfig,
    pub consumer: ConsumerConfig,
    pub site_api: SiteApiConfig,
    pub epro_gateway: EproGatewayConfig,
    pub alert_api: AlertApiConfig,
    /// The services' own settings (questionnaires, rule sets, who is notified).
    pub settings: Settings,
    /// Create missing topics (with `partitions` each, and their dead-letter topics) at start.
    /// Off against a cluster whose topics are provisioned by its operators.
    pub create_topics: bool,
    pub partitions: i32,
}

impl PipelineConfig {
    /// Local defaults for every component, on `database_url` and `kafka`. The HTTP services are
    /// not rate limited unless `HTTP_RATE_LIMIT_*` is set (one client drives the demo, the replay,
    /// the load tests and the benchmarks); see [`PipelineConfig::with_limits`].
    pub fn local(database_url: &str, kafka: &KafkaConfig) -> Self {
        let schemas = Schemas::default();
        let mut relay = RelayConfig::local(schemas.sources());
        relay.database.database_url = database_url.to_string();
        relay.kafka = kafka.clone();
        let mut consumer = ConsumerConfig::local();
        consumer.database.database_url = database_url.to_string();
        consumer.kafka = kafka.clone();
        let mut site_api = SiteApiConfig::local();
        site_api.database_url = database_url.to_string();
        let topics = site_api.topics.clone();
        let mut alert_api = AlertApiConfig::local();
        alert_api.database_url = database_url.to_string();
        let mut epro_gateway = EproGatewayConfig::local();
        epro_gateway.kafka = kafka.clone();
        Self {
            schemas,
            topics,
            relay,
            consumer,
            site_api,
            epro_gateway,
            alert_api,
            settings: Settings::default(),
            create_topics: true,
            partitions: 6,
        }
    }
}

/// The consumer group id of consumer `name` in a pipeline: group ids follow the topic prefix, so
/// prefixed environments on one cluster stay apart.
fn group_id(topics: &TopicNames, name: &str) -> String {
    format!("{}{name}", topics.prefix())
}

impl PipelineConfig {
    /// The relay and the consumers on `database`: its URL and its session limits. (The HTTP
    /// services hold a URL only; they take the limits from the environment, see
    /// [`DatabaseConfig::connect_options_for`].)
    pub fn with_database(mut self, database: &DatabaseConfig) -> Self {
        self.relay.database = database.clone();
        self.consumer.database = database.clone();
        self
    }

    /// The three HTTP services with `limits` (`trialflow run` / `replay` / `demo` pass
    /// [`LimitsArgs::local_limits`](trialflow_http::limits::LimitsArgs::local_limits) of their
    /// one set of settings).
    pub fn with_limits(mut self, limits: &Limits) -> Self {
        self.site_api.limits = limits.clone();
        self.epro_gateway.limits = limits.clone();
        self.alert_api.limits = limits.clone();
        self
    }
}

/// A consumer group and the topics its members subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerGroup {
    pub group_id: String,
    pub topics: Vec<String>,
}

/// The consumer groups [`Pipeline::start`] runs, each with the topics it subscribes to: what
/// the simulation's settle check (`trialflow_simulation::settle::wait_settled`) must see caught up.
pub fn consumer_groups(config: &PipelineConfig) -> Vec<ConsumerGroup> {
    let topics = &config.topics;
    services::consumers()
        .map(|(service, consumer)| {
            let spec = (consumer.spec)(config.schemas[service.name].clone(), topics);
            ConsumerGroup { group_id: group_id(topics, &spec.name), topics: spec.topics }
        })
        .collect()
}

impl PipelineConfig {
    /// Like [`PipelineConfig::local`], but on private schemas and topics (`<name>_<12 hex>` and the
    /// prefix `<name>-<12 hex>.`) and free ports, with quick retries: a pipeline for one test or
    /// benchmark that shares the database and broker with others.
    pub fn isolated(name: &str, database_url: &str, kafka: &KafkaConfig) -> anyhow::Result<Self> {
        let run = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let mut config = Self::local(database_url, kafka);
        config.schemas = Schemas::isolated(name, &run)?;
        config.relay.sources = config.schemas.sources();
        config.topics = TopicNames::new(format!("{}-{run}.", name.replace('_', "-")));
        config.partitions = 3;
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        config.site_api.listen = any_port;
        config.epro_gateway.listen = any_port;
        config.alert_api.listen = any_port;
        config.relay.poll_interval_ms = 100;
        config.consumer.park_retry_ms = 200;
        config.consumer.max_backoff_ms = 500;
        Ok(config)
    }
}

/// A running pipeline.
#[derive(Debug)]
pub struct Pipeline {
    site_api_addr: SocketAddr,
    epro_gateway_addr: SocketAddr,
    alert_api_addr: SocketAddr,
    stop: CancellationToken,
    components: Components,
}

/// The pipeline's components as tasks, by name.
#[derive(Debug)]
struct Components {
    tasks: JoinSet<anyhow::Result<()>>,
    names: HashMap<task::Id, &'static str>,
    /// How long the components get to stop once the pipeline stops: the longest of their own
    /// shutdown graces plus [`shutdown::COMPONENT_MARGIN`].
    stop_grace: Duration,
}

impl Components {
    /// Starts `component` as `name`, registered as running in the process (see
    /// [`shutdown::running`]).
    fn spawn<F>(&mut self, name: &'static str, component: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let handle = self.tasks.spawn(shutdown::tracked(name, component));
        self.names.insert(handle.id(), name);
    }

    fn still_running(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = self.names.values().copied().collect();
        names.sort_unstable();
        names
    }
}

impl Pipeline {
    /// Migrates every schema, creates the topics if asked, and starts every component.
    pub async fn start(mut config: PipelineConfig, shutdown: &CancellationToken) -> anyhow::Result<Self> {
        // A cluster that refuses our settings (SASL, TLS) stops the start before anything else.
        trialflow_outbox::kafka::check_connection(
            &config.relay.kafka,
            trialflow_outbox::kafka::ClientKind::Producer,
        )
        .await?;
        let url = config.relay.database.database_url.clone();
        for (service, schema) in config.schemas.iter() {
            service.migrate(&url, schema).await?;
        }
        let stop = shutdown.child_token();
        let topics = config.topics.clone();
        let mut consumers = Vec::new();
        for (service, consumer) in services::consumers() {
            let spec = (consumer.spec)(config.schemas[service.name].clone(), &topics);
            let group_id = Some(group_id(&topics, service.name));
            let start = services::Start {
                spec,
                config: ConsumerConfig { group_id, ..config.consumer.clone() },
                topics: topics.clone(),
                settings: config.settings.clone(),
                stop: stop.clone(),
            };
            trialflow_consumers::runtime::starting(&start.spec.name);
            let run = (consumer.start)(start).with_context(|| format!("configuring {}", service.name))?;
            consumers.push((service.name, run));
        }
        if config.create_topics {
            let (kafka, dlq) = (&config.relay.kafka, &config.consumer.dlq_suffix);
            trialflow_outbox::kafka::ensure_catalogue_topics(kafka, &config.topics, config.partitions, dlq)
                .await
                .context("creating topics")?;
        }
        let longest_grace = config.relay.shutdown_grace_ms.max(config.consumer.shutdown_grace_ms);
        let stop_grace = Duration::from_millis(longest_grace) + shutdown::COMPONENT_MARGIN;
        let mut tasks = Components { tasks: JoinSet::new(), names: HashMap::new(), stop_grace };
        config.relay.sources = config.schemas.sources();
        let relay_stop = stop.clone();
        let relay = config.relay.clone();
        tasks.spawn("relay", async move {
            trialflow_outbox::relay::run(relay, relay_stop).await.context("relay")
        });
        for (name, run) in consumers {
            tasks.spawn(name, async move { run.await.with_context(|| format!("{name} consumer")) });
        }

        let s = &config.schemas;
        config.site_api.schema = s[site_api::NAME].clone();
        config.site_api.topics = topics.clone();
        config.epro_gateway.topics = topics.clone();
        config.alert_api.schema = s[monitoring::NAME].clone();
        config.alert_api.risk_schema = s[trialflow_consumers::risk::NAME].clone();
        config.alert_api.topics = topics;
        monitoring::api::describe_metrics();
        let alert_api = AlertApi::bind(config.alert_api).await.context("starting the alert API")?;
        let alert_api_addr = alert_api.local_addr();
        let alert_stop = stop.clone();
        tasks.spawn("alert API", async move { alert_api.run(alert_stop).await.context("alert API") });
        epro_gateway::describe_metrics();
        let gateway = EproGateway::bind(config.epro_gateway).await.context("starting the ePRO gateway")?;
        let epro_gateway_addr = gateway.local_addr();
        let gateway_stop = stop.clone();
        tasks.spawn("ePRO gateway", async move { gateway.run(gateway_stop).await.context("ePRO gateway") });
        site_api::describe_metrics();
        let links = config.schemas.site_api_links();
        let api = SiteApi::bind_linked(config.site_api, links).await.context("starting the site API")?;
        let site_api_addr = api.local_addr();
        let api_stop = stop.clone();
        tasks.spawn("site API", async move { api.run(api_stop).await.context("site API") });
        Ok(Self { site_api_addr, epro_gateway_addr, alert_api_addr, stop, components: tasks })
    }

    pub fn site_api_addr(&self) -> SocketAddr {
        self.site_api_addr
    }

    pub fn epro_gateway_addr(&self) -> SocketAddr {
        self.epro_gateway_addr
    }

    pub fn alert_api_addr(&self) -> SocketAddr {
        self.alert_api_addr
    }

    /// Runs until shutdown or until a component fails (then stops the others). Once stopping,
    /// the components get their stop grace (the longest of their own shutdown graces plus
    /// [`shutdown::COMPONENT_MARGIN`]); those still running after it are named in the error and
    /// aborted.
    pub async fn wait(self) -> anyhow::Result<()> {
        let Self { stop, mut components, .. } = self;
        let mut first_error = None;
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let (at, stop) = (deadline, &stop);
            let stopping = async move {
                match at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => stop.cancelled().await,
                }
            };
            let done = tokio::select! {
                done = components.tasks.join_next_with_id() => done,
                () = stopping => {
                    if deadline.is_some() {
                        break;
                    }
                    deadline = Some(tokio::time::Instant::now() + components.stop_grace);
                    continue;
                }
            };
            let Some(done) = done else { break };
            let result = match done {
                Ok((id, result)) => {
                    components.names.remove(&id);
                    result
                }
                Err(e) => {
                    let name = components.names.remove(&e.id()).unwrap_or("a component");
                    Err(anyhow::anyhow!("{name} panicked: {e}"))
                }
            };
            if let Err(e) = result {
                tracing::error!(error = %format!("{e:#}"), "Component failed; stopping the pipeline.");
                first_error.get_or_insert(e);
            }
            // Whatever ended, the pipeline is incomplete without it.
            stop.cancel();
        }
        let stuck = components.still_running();
        if !stuck.is_empty() {
            let grace = components.stop_grace;
            tracing::error!(still_running = ?stuck, ?grace, "Components did not stop within their grace; aborted.");
            components.tasks.abort_all();
            let error = anyhow::anyhow!("did not stop within {grace:?}: {}", stuck.join(", "));
            return Err(match first_error {
                Some(first) => first.context(error.to_string()),
                None => error,
            });
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Stops every component gracefully, within their stop grace (see [`Pipeline::wait`]).
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.wait().await
    }
}
