//! `trialflow demo`: migrates, starts the relay in-process, drives it with the synthetic workload
//! and reads the topic back to show what was published (and that nothing was lost or reordered).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;
use trialflow_outbox::RelayConfig;
use trialflow_outbox::kafka::{TopicReader, ensure_topics};
use trialflow_producers::workload::{self, Workload, check_delivery};

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub relay: RelayConfig,

    /// Readings to generate.
    #[arg(long, env = "DEMO_EVENTS", default_value_t = 20_000)]
    pub events: u64,

    /// Subjects the readings are spread over (the Kafka key).
    #[arg(long, env = "DEMO_SUBJECTS", default_value_t = 200)]
    pub subjects: u64,

    /// Concurrent writer transactions.
    #[arg(long, env = "DEMO_WRITERS", default_value_t = 8)]
    pub writers: u64,
}

pub async fn run(args: DemoArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let url = args.relay.database.database_url.clone();
    let kafka = args.relay.kafka.clone();
    println!("== trialflow demo: {} readings over {} subjects", args.events, args.subjects);
    workload::migrate(&url, &workload::schema()).await.context("migrating the workload schema")?;
    ensure_topics(&kafka, &[(workload::TOPIC, 6)]).await.context("creating the workload topic")?;
    let reader = TopicReader::new(&kafka, workload::TOPIC, false)?;

    let relay_stop = shutdown.child_token();
    let mut relay_config = args.relay.clone();
    relay_config.sources = vec![workload::schema()];
    let relay = tokio::spawn(trialflow_outbox::relay::run(relay_config, relay_stop.clone()));

    let pool = PgPoolOptions::new().max_connections(args.writers as u32 + 2).connect(&url).await?;
    let service = Workload::open(pool.clone(), workload::schema(), workload::TOPIC).await?;
    let written = Arc::new(AtomicU64::new(0));
    // Subject ids of this run carry its id: the topic may hold earlier runs' events.
    let run = format!("demo{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let started = Instant::now();
    let generator = {
        let (service, written) = (service.clone(), written.clone());
        let (subjects, events, writers) = (args.subjects, args.events, args.writers);
        let run = run.clone();
        tokio::spawn(async move { service.generate(&run, subjects, events, writers, written).await })
    };

    let expected = args.events;
    let progress = written.clone();
    let read = reader.read_until(Duration::from_secs(300), {
        let mut last_print = Instant::now();
        let mut seen = std::collections::HashSet::new();
        let mut scanned = 0;
        let run = run.clone();
        move |msgs| {
            for m in msgs[scanned..].iter().filter(|m| m.key.starts_with(&run)) {
                seen.insert(m.header("event_id").unwrap_or_default().to_string());
            }
            scanned = msgs.len();
            if last_print.elapsed() >= Duration::from_secs(1) {
                last_print = Instant::now();
                println!(
                    "   written {:>7}/{expected}   published {:>7}",
                    progress.load(Ordering::Relaxed),
                    seen.len()
                );
            }
            seen.len() as u64 >= expected
        }
    });
    let mut messages = tokio::select! {
        m = read => m?,
        _ = shutdown.cancelled() => bail!("interrupted"),
    };
    let elapsed = started.elapsed();
    generator.await.context("generator")?.context("writing the workload")?;
    relay_stop.cancel();
    relay.await.context("relay task")?.context("relay")?;

    messages.retain(|m| m.key.starts_with(&run));
    let report = check_delivery(&messages);
    println!("== published to `{}`", workload::TOPIC);
    for m in messages.iter().take(3) {
        println!(
            "   partition {} offset {} key {} event_id {} traceparent {} payload {}",
            m.partition,
            m.offset,
            m.key,
            m.header("event_id").unwrap_or("-"),
            m.header("traceparent").unwrap_or("-"),
            String::from_utf8_lossy(&m.payload)
        );
    }
    println!("   ...");
    println!("== summary");
    println!("   readings committed      {}", written.load(Ordering::Relaxed));
    println!("   distinct events read    {}", report.distinct);
    println!("   duplicates (allowed)    {}", report.duplicates);
    println!("   per-subject order breaks {}", report.order_violations);
    println!(
        "   elapsed                 {:.2} s ({:.0} events/s end to end)",
        elapsed.as_secs_f64(),
        report.distinct as f64 / elapsed.as_secs_f64()
    );
    if report.distinct != expected || report.order_violations > 0 || report.undecodable > 0 {
        bail!("delivery check failed: {report:?}");
    }
    println!("== ok: every committed reading was published once or more, in per-subject order");
    Ok(())
}
