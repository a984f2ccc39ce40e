//! Blinding (ICH E6(R3)) across what the pipeline runs: every consumer that subscribes to a
//! restricted topic is one of that topic's named readers (`topics::RESTRICTED_READERS`), and no
//! consumer subscribes to a restricted topic's dead letters (nor to any dead-letter topic: they
//! are read by operators through `trialflow dlq`). No IO: the subscriptions are the consumers'
//! specs.

use trialflow_pipeline::{PipelineConfig, consumer_groups};
use trialflow_schemas::topics;
use trialflow_testkit::{database_url, kafka};

#[test]
fn only_named_readers_subscribe_to_restricted_topics_and_nobody_to_their_dead_letters() -> anyhow::Result<()>
{
    let config = PipelineConfig::isolated("blinding", &database_url(), &kafka())?;
    let (names, dlq_suffix) = (&config.topics, config.consumer.dlq_suffix.as_str());
    let restricted = names.restricted(dlq_suffix);
    let groups = consumer_groups(&config);
    assert!(groups.len() >= 5, "every consumer of the pipeline: {groups:?}");
    let mut read_restricted = 0;
    for group in &groups {
        let consumer = group.group_id.strip_prefix(names.prefix()).unwrap_or(&group.group_id);
        for deployed in &group.topics {
            let topic = deployed.strip_prefix(names.prefix()).unwrap_or(deployed);
            assert_eq!(
                topics::dead_lettered(topic, dlq_suffix),
                topic,
                "{consumer} subscribes to dead-letter topic {deployed}"
            );
            assert_eq!(
                names.is_restricted(deployed, dlq_suffix),
                restricted.contains(deployed),
                "{deployed}"
            );
            if let Some(readers) = topics::restricted_readers(topic, dlq_suffix) {
                assert!(
                    readers.contains(&consumer),
                    "{consumer} reads restricted {deployed} (readers {readers:?})"
                );
                read_restricted += 1;
            }
        }
    }
    assert!(read_restricted > 0, "the check saw the restricted subscriptions");
    // Every named reader exists: a renamed consumer cannot keep an ACL entry nobody checks.
    for (topic, readers) in topics::RESTRICTED_READERS {
        for reader in *readers {
            let name = format!("{}{reader}", names.prefix());
            let group = groups.iter().find(|g| g.group_id == name);
            assert!(
                group.is_some_and(|g| g.topics.contains(&names.name(topic))),
                "{reader} is a reader of {topic} but does not subscribe to it"
            );
        }
    }
    Ok(())
}
