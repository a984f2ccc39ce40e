//! The test cluster launcher against itself: three real Apache Kafka nodes, one SIGKILLed and
//! restarted while `acks=all` writes go on, nothing lost; and a clean end when it is dropped.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use trialflow_outbox::kafka::TopicReader;
use trialflow_testkit::{ClusterSpec, KafkaCluster, wait_until};

const WAIT: Duration = Duration::from_secs(30);

async fn produce(producer: &FutureProducer, topic: &str, value: &str) -> anyhow::Result<()> {
    producer
        .send(FutureRecord::to(topic).key(value).payload(value), Duration::from_secs(20))
        .await
        .map_err(|(e, _)| anyhow::anyhow!("producing {value}: {e}"))?;
    Ok(())
}

/// Replicas of partition 0 of `topic` in sync, from the metadata of the live nodes.
fn in_sync_replicas(admin: &AdminClient<DefaultClientContext>, topic: &str) -> anyhow::Result<usize> {
    let metadata = admin.inner().fetch_metadata(Some(topic), Duration::from_secs(5))?;
    Ok(metadata.topics().first().and_then(|t| t.partitions().first()).map_or(0, |p| p.isr().len()))
}

#[tokio::test]
async fn three_nodes_keep_acknowledged_writes_across_a_sigkilled_node() -> anyhow::Result<()> {
    trialflow_testkit::init_logs();
    let started = std::time::Instant::now();
    let mut cluster = KafkaCluster::start(ClusterSpec::nodes(3)).await?;
    eprintln!("three nodes serving after {:?}", started.elapsed());
    assert_eq!(cluster.node_ids(), [1, 2, 3]);
    let kafka = cluster.kafka_config();
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &kafka.bootstrap_servers).create()?;
    let topic = trialflow_testkit::unique("cluster").replace('_', "-");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in
        admin.create_topics(&[NewTopic::new(&topic, 1, TopicReplication::Fixed(3))], &options).await?
    {
        result.map_err(|(topic, code)| anyhow::anyhow!("creating {topic}: {code}"))?;
    }
    // A metadata request that times out on a busy machine is "not yet", not a failure.
    wait_until("all three replicas in sync", WAIT, || async {
        Ok(in_sync_replicas(&admin, &topic).unwrap_or(0) == 3)
    })
    .await?;
    let producer: FutureProducer =
        trialflow_outbox::publisher::producer_config(&kafka, "cluster-test").create()?;
    produce(&producer, &topic, "before").await?;

    cluster.kill(2)?;
    assert!(!cluster.is_running(2), "a killed node is gone");
    assert!(cluster.kill(2).is_err(), "a node that is not running cannot be killed");
    // min.insync.replicas is 2: two nodes of three still take acks=all writes.
    produce(&producer, &topic, "during").await?;

    let restarted = std::time::Instant::now();
    cluster.restart(2).await?;
    eprintln!("node 2 serving again after {:?}", restarted.elapsed());
    assert!(cluster.is_running(2));
    assert!(cluster.log(2)?.matches("Kafka Server started").count() == 2, "started twice");
    wait_until("the restarted node back in sync", WAIT, || async {
        Ok(in_sync_replicas(&admin, &topic).unwrap_or(0) == 3)
    })
    .await?;
    produce(&producer, &topic, "after").await?;

    let read = TopicReader::new(&kafka, &topic, true)?.read_until(WAIT, |m| m.len() >= 3).await?;
    let values: Vec<&str> = read.iter().map(|m| m.key.as_str()).collect();
    assert_eq!(values, ["before", "during", "after"]);
    Ok(())
}

#[tokio::test]
async fn a_dropped_cluster_leaves_no_process_and_no_files() -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let cluster = KafkaCluster::start(ClusterSpec::nodes(1)).await?;
    eprintln!("one node serving after {:?}", started.elapsed());
    let servers = cluster.bootstrap_servers();
    let port: u16 = servers.rsplit(':').next().and_then(|p| p.parse().ok()).expect("host:port");
    let log = cluster.log(1)?;
    assert!(log.contains("Kafka Server started"), "{log}");
    let dir = cluster.dir().to_path_buf();
    assert!(dir.join("node-1/log/meta.properties").exists(), "formatted under {}", dir.display());
    drop(cluster);
    assert!(!dir.exists(), "{} is removed", dir.display());
    let refused = std::net::TcpStream::connect(("127.0.0.1", port)).is_err();
    assert!(refused, "nothing listens on {port} once the cluster is dropped");
    Ok(())
}
