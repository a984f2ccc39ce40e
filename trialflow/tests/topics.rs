//! `trialflow topics plan|apply` against the local broker: on a fresh prefix the plan creates
//! every catalogue topic and its dead-letter topic with the catalogue's retention and clean-up;
//! applying it twice changes nothing the second time; a retention someone changed by hand is
//! planned back and restored while a setting the pipeline does not manage stays; a partition
//! count that differs is reported, never changed. The command refuses hostile arguments with a
//! clear message before it reaches the cluster.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Parser;
use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use trialflow::topics::{TopicsArgs, TopicsCommand};
use trialflow_outbox::topics::{self, Change, Plan, TopicLayout};
use trialflow_schemas::topics as catalogue;
use trialflow_testkit::{init_logs, kafka, unique};

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    command: TopicsCommand,
}

fn args(extra: &[&str]) -> Result<TopicsArgs, clap::Error> {
    let argv = ["trialflow", "plan", "--bootstrap-servers", &kafka().bootstrap_servers];
    let cli = Cli::try_parse_from(argv.iter().copied().chain(extra.iter().copied()))?;
    match cli.command {
        TopicsCommand::Plan(args) | TopicsCommand::Apply(args) => Ok(args),
    }
}

/// Every catalogue topic, its dead-letter topic, and the relay's state topic.
const TOPICS: usize = 2 * catalogue::ALL.len() + 1;

fn layout(prefix: &str) -> TopicLayout {
    args(&["--topic-prefix", prefix, "--partitions", "3", "--state-topic", &format!("{prefix}relay-state")])
        .expect("valid arguments")
        .layout()
        .expect("a layout")
}

fn admin() -> AdminClient<DefaultClientContext> {
    ClientConfig::new().set("bootstrap.servers", kafka().bootstrap_servers).create().expect("an admin client")
}

fn options() -> AdminOptions {
    AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)))
}

/// The topic's own settings as the cluster reports them.
async fn own_settings(topic: &str) -> BTreeMap<String, String> {
    let described =
        admin().describe_configs(&[ResourceSpecifier::Topic(topic)], &options()).await.expect("described");
    let resource = described.into_iter().next().expect("one resource").expect("its settings");
    resource
        .entries
        .into_iter()
        .filter(|e| e.source == rdkafka::admin::ConfigSource::DynamicTopic)
        .filter_map(|e| Some((e.name, e.value?)))
        .collect()
}

fn creates(plan: &Plan) -> Vec<&str> {
    plan.changes
        .iter()
        .filter_map(|c| if let Change::Create(t) = c { Some(t.name.as_str()) } else { None })
        .collect()
}

#[tokio::test]
async fn apply_creates_every_topic_once_and_restores_what_was_changed_by_hand() -> anyhow::Result<()> {
    init_logs();
    let prefix = format!("{}.", unique("topics"));
    let layout = layout(&prefix);
    let kafka = kafka();

    let plan = topics::plan(&kafka, &layout).await?;
    assert_eq!(creates(&plan).len(), TOPICS, "{plan}");
    assert!(plan.up_to_date.is_empty(), "{plan}");
    let study = layout.names.name(catalogue::STUDY_CONFIGURATION);
    let submissions = layout.names.name(catalogue::EPRO_SUBMISSIONS);
    let submission_letters = layout.names.dead_letter(catalogue::EPRO_SUBMISSIONS, &layout.dlq_suffix);
    let shown = plan.to_string();
    assert!(shown.contains(&format!("+ {study}: create, 3 partition(s)")), "{shown}");
    assert!(
        shown.contains(
            "cleanup.policy=compact, min.insync.replicas=1, retention.ms=-1; restricted: grant reads to \
             enrollment, kit-allocation only"
        ),
        "{shown}"
    );
    let assignment_letters = layout.names.dead_letter(catalogue::TREATMENT_ASSIGNMENTS, &layout.dlq_suffix);
    assert!(shown.contains(&format!("+ {assignment_letters}: create, 1 partition(s)")), "{shown}");
    assert!(
        shown.contains("retention.ms=31536000000; restricted: grant reads to unblinded operators only"),
        "{shown}"
    );
    assert!(
        shown.ends_with(&format!(
            "0 up to date, {} to create, 0 to configure, 0 difference(s) left to an operator",
            TOPICS
        )),
        "{shown}"
    );

    let applied = topics::apply(&kafka, &plan).await?;
    assert_eq!(applied.created, TOPICS);
    let again = topics::plan(&kafka, &layout).await?;
    assert!(again.is_empty() && again.changes.is_empty(), "a second plan after apply: {again}");
    assert_eq!(again.up_to_date.len(), TOPICS);
    assert_eq!(topics::apply(&kafka, &again).await?, topics::Applied::default(), "apply is idempotent");

    assert_eq!(own_settings(&study).await.get("cleanup.policy").map(String::as_str), Some("compact"));
    let state = layout.state_topic.clone().expect("the relay's state topic");
    assert_eq!(own_settings(&state).await.get("cleanup.policy").map(String::as_str), Some("compact"));
    assert_eq!(own_settings(&submissions).await.get("retention.ms").map(String::as_str), Some("2592000000"));
    assert_eq!(
        own_settings(&submission_letters).await.get("retention.ms").map(String::as_str),
        Some("31536000000")
    );

    // An operator shortens the retention by hand and sets a setting of their own.
    let alter = AlterConfig::new(ResourceSpecifier::Topic(&submissions))
        .set("retention.ms", "60000")
        .set("cleanup.policy", "delete")
        .set("min.insync.replicas", "1")
        .set("max.message.bytes", "2000000");
    for result in admin().alter_configs(&[alter], &options()).await? {
        result.map_err(|(_, code)| anyhow::anyhow!("altering: {code}"))?;
    }
    let drifted = topics::plan(&kafka, &layout).await?;
    assert_eq!(drifted.changes.len(), 1, "{drifted}");
    let Change::Configure { topic, settings, keep } = &drifted.changes[0] else { panic!("{drifted}") };
    assert_eq!(topic, &submissions);
    assert_eq!(settings, &vec![("retention.ms", Some("60000".to_string()), "2592000000".to_string())]);
    assert_eq!(keep.get("max.message.bytes").map(String::as_str), Some("2000000"));
    assert!(
        drifted.to_string().contains(&format!("~ {submissions}: retention.ms 60000 → 2592000000")),
        "{drifted}"
    );

    assert_eq!(topics::apply(&kafka, &drifted).await?.configured, 1);
    let restored = own_settings(&submissions).await;
    assert_eq!(restored.get("retention.ms").map(String::as_str), Some("2592000000"));
    assert_eq!(
        restored.get("max.message.bytes").map(String::as_str),
        Some("2000000"),
        "an unmanaged setting stays"
    );
    assert_eq!(
        restored.get("min.insync.replicas").map(String::as_str),
        Some("1"),
        "a managed setting that matched stays"
    );
    assert!(topics::plan(&kafka, &layout).await?.changes.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_different_partition_count_is_reported_and_left_alone() -> anyhow::Result<()> {
    init_logs();
    let prefix = format!("{}.", unique("topics"));
    let layout = layout(&prefix);
    let alerts = layout.names.name(catalogue::ALERTS);
    // Someone created one topic beforehand with one partition and the broker's default settings.
    let new = NewTopic::new(&alerts, 1, TopicReplication::Fixed(1));
    for result in admin().create_topics(&[new], &options()).await? {
        result.map_err(|(_, code)| anyhow::anyhow!("creating: {code}"))?;
    }
    let plan = topics::plan(&kafka(), &layout).await?;
    let about_alerts: Vec<&Change> = plan
        .changes
        .iter()
        .filter(|c| match c {
            Change::Create(t) => t.name == alerts,
            Change::Configure { topic, .. } | Change::Unchanged { topic, .. } => topic == &alerts,
        })
        .collect();
    assert_eq!(about_alerts.len(), 2, "{plan}");
    assert!(
        matches!(about_alerts[0], Change::Unchanged { why, .. } if why.starts_with("1 partition(s), wanted 3")),
        "{plan}"
    );
    assert!(matches!(about_alerts[1], Change::Configure { .. }), "{plan}");
    topics::apply(&kafka(), &plan).await?;
    let after = topics::plan(&kafka(), &layout).await?;
    assert_eq!(after.changes.len(), 1, "only the partition count is left: {after}");
    assert!(after.is_empty(), "nothing left that apply would change");
    assert!(after.to_string().contains(&format!("! {alerts}: 1 partition(s), wanted 3")), "{after}");
    Ok(())
}

#[test]
fn hostile_arguments_are_refused_with_a_reason() {
    let refused = |extra: &[&str]| args(extra).map(|_| ()).expect_err("refused").to_string();
    let cases: &[(&[&str], &str)] = &[
        (&["--topic-prefix", "a/b"], "'/' cannot be part of a Kafka topic name"),
        (&["--topic-prefix", "nul\0"], "'\\0' cannot be part of a Kafka topic name"),
        (&["--topic-prefix", "é"], "'é' cannot be part of a Kafka topic name"),
        (&["--topic-prefix", &"x".repeat(101)], "101 characters; at most 100"),
        (&["--dlq-suffix", ".dead letters"], "' ' cannot be part of a Kafka topic name"),
        (&["--partitions", "0"], "0 is not in 1..=10000"),
        (&["--partitions", "-3"], "unexpected argument '-3'"),
        (&["--partitions", "99999999999"], "99999999999 is not in 1..=10000"),
        (&["--partitions", "six"], "invalid digit"),
        (&["--replication-factor", "17"], "17 is not in 1..=16"),
        (&["--min-insync-replicas", "0"], "0 is not in 1..=16"),
        (&["--partitions", "2", "--partitions", "3"], "cannot be used multiple times"),
    ];
    for (extra, expected) in cases {
        let message = refused(extra);
        assert!(message.contains(expected), "{extra:?}: {message}");
    }
    let contradictory = args(&["--replication-factor", "1", "--min-insync-replicas", "2"]).expect("parsed");
    let error = contradictory.layout().expect_err("contradictory").to_string();
    assert!(error.contains("--min-insync-replicas 2 exceeds --replication-factor 1"), "{error}");
    // The default min.insync.replicas follows the replication factor: 2 of 3, 1 of 1.
    assert_eq!(
        args(&["--replication-factor", "3"]).expect("parsed").layout().expect("a layout").min_insync_replicas,
        2
    );
    assert_eq!(args(&[]).expect("parsed").layout().expect("a layout").min_insync_replicas, 1);
}

#[tokio::test]
async fn an_unreachable_cluster_is_a_clear_error() {
    let mut args = args(&["--topic-prefix", "nowhere."]).expect("parsed");
    args.kafka.bootstrap_servers = "127.0.0.1:1".to_string();
    let error = trialflow::topics::run(TopicsCommand::Plan(args)).await.expect_err("unreachable");
    assert!(format!("{error:#}").contains("reading the topics of 127.0.0.1:1"), "{error:#}");
}
