//! Group `soak` (issue 20, item 5): resident memory of each component under a long steady mixed
//! load. Every component runs as its own `trialflow` process, as a deployment runs them (relay,
//! site API, ePRO gateway, alert API, one process per consumer), against a database of its own
//! and topics under a fresh prefix; `trialflow load` enrolls subjects through the site API, then
//! sends vital signs and PHQ-9 submissions at a steady rate for `--soak-minutes`. Each process's
//! resident set (`VmRSS` of `/proc/<pid>/status`) is sampled every 10 s.
//!
//! Figures per component: the resident set after 1 minute (the baseline: warmed up, caches
//! filled), after 10 minutes and at the end, and the growth from 10 minutes to the end (no growth
//! is the goal: a leak shows as a steady climb).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sqlx::{AssertSqlSafe, PgPool};
use tokio::process::{Child, Command};
use uuid::Uuid;

use crate::{bench, progress};

/// Sampling interval of the resident sets.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Subjects the load enrolls before its steady phase, and its rate (requests, then inputs, /s).
const SUBJECTS: u32 = 1_000;
const RATE: u32 = 300;
/// The consumers, each its own process (`trialflow consume <name>`).
const CONSUMERS: [&str; 6] =
    ["enrollment", "kit-allocation", "epro-validation", "monitoring", "risk", "notifier"];

/// One component's process and its resident set over time (seconds since the load started, kB).
struct Component {
    name: String,
    child: Child,
    samples: Vec<(u64, u64)>,
}

/// A free TCP port on 127.0.0.1 (bound, then released for the child to take).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The `trialflow` binary beside this one (`cargo build --release -p trialflow -p trialflow-bench`
/// builds both; `make bench` does).
fn trialflow_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("trialflow");
    if !bin.exists() {
        bail!("{} is missing: build it with the benchmarks (`make bench` does)", bin.display());
    }
    Ok(bin)
}

/// Resident set size of `pid` in kB, from `/proc/<pid>/status`.
fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The database URL with another database name.
fn with_database(url: &str, database: &str) -> anyhow::Result<String> {
    let (path, query) = url.split_once('?').map_or((url, String::new()), |(p, q)| (p, format!("?{q}")));
    let (base, _) = path.rsplit_once('/').context("DATABASE_URL has no database name")?;
    Ok(format!("{base}/{database}{query}"))
}

pub(crate) async fn group(
    database_url: &str,
    bootstrap_servers: &str,
    pool: &PgPool,
    minutes: u64,
) -> anyhow::Result<()> {
    let bin = trialflow_binary()?;
    let run = Uuid::new_v4().simple().to_string()[..8].to_string();
    let database = format!("bench_soak_{run}");
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {database}"))).execute(pool).await?;
    let url = with_database(database_url, &database)?;
    let logs = Path::new(".data/bench-soak").join(&run);
    std::fs::create_dir_all(&logs)?;
    let prefix = format!("soak-{run}.");
    let (site_api, gateway, alert_api) = (free_port()?, free_port()?, free_port()?);
    let base_env: Vec<(&str, String)> = vec![
        ("DATABASE_URL", url.clone()),
        ("KAFKA_BOOTSTRAP_SERVERS", bootstrap_servers.to_string()),
        ("TOPIC_PREFIX", prefix.clone()),
        ("NO_COLOR", "1".into()),
        ("SITE_API_LISTEN", format!("127.0.0.1:{site_api}")),
        ("SITE_API_DEMO_TOKENS", "true".into()),
        ("EPRO_GATEWAY_LISTEN", format!("127.0.0.1:{gateway}")),
        ("EPRO_GATEWAY_DEMO_TOKENS", "true".into()),
        ("ALERT_API_LISTEN", format!("127.0.0.1:{alert_api}")),
        ("ALERT_API_DEMO_TOKENS", "true".into()),
        ("HTTP_RATE_LIMIT_PER_PRINCIPAL", "0".into()),
        ("HTTP_RATE_LIMIT_PER_ADDRESS", "0".into()),
    ];
    let command = |args: &[&str], log: &str| -> anyhow::Result<Command> {
        let mut command = Command::new(&bin);
        command.args(args).envs(base_env.iter().map(|(k, v)| (*k, v.as_str()))).stdin(Stdio::null());
        let file = std::fs::File::create(logs.join(format!("{log}.log")))?;
        command.stdout(file.try_clone()?).stderr(file).kill_on_drop(true);
        Ok(command)
    };
    // A process without metrics endpoint (one-shot commands and the load).
    let quiet = |args: &[&str], log: &str| -> anyhow::Result<Command> {
        let mut c = command(args, log)?;
        c.env("METRICS_ADDR", "");
        Ok(c)
    };
    for (args, log) in [(&["migrate"][..], "migrate"), (&["topics", "apply"][..], "topics")] {
        let done = quiet(args, log)?.status().await?;
        if !done.success() {
            bail!("`trialflow {}` failed: see {}", args.join(" "), logs.join(format!("{log}.log")).display());
        }
    }

    let mut components = Vec::new();
    let mut specs: Vec<(String, Vec<&str>)> = vec![
        ("relay".into(), vec!["relay"]),
        ("site-api".into(), vec!["site-api"]),
        ("epro-gateway".into(), vec!["epro-gateway"]),
        ("alert-api".into(), vec!["alert-api"]),
    ];
    specs.extend(CONSUMERS.iter().map(|c| (c.to_string(), vec!["consume", c])));
    for (name, args) in &specs {
        let mut c = command(args, name)?;
        c.env("METRICS_ADDR", format!("127.0.0.1:{}", free_port()?));
        let child = c.spawn().with_context(|| format!("starting `trialflow {}`", args.join(" ")))?;
        components.push(Component { name: name.clone(), child, samples: Vec::new() });
    }
    progress(&format!(
        "soak: {} processes up; load: {SUBJECTS} subjects, then {RATE} inputs/s for {minutes} min (logs in {})",
        components.len(),
        logs.display()
    ));
    // The HTTP services listen once they are up; the load's first requests retry nothing, so wait.
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    for port in [site_api, gateway, alert_api] {
        while http.get(format!("http://127.0.0.1:{port}/healthz")).send().await.is_err() {
            if Instant::now() > deadline {
                bail!("the HTTP service on port {port} did not come up within 120 s: see {}", logs.display());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    let duration = (minutes * 60).to_string();
    let (subjects, rate) = (SUBJECTS.to_string(), RATE.to_string());
    let load_args = [
        "load",
        "--subjects",
        &subjects,
        "--rate",
        &rate,
        "--duration",
        &duration,
        "--study",
        &format!("SOAK-{run}"),
        "--site-api",
        &format!("http://127.0.0.1:{site_api}"),
        "--epro-gateway",
        &format!("http://127.0.0.1:{gateway}"),
    ]
    .map(String::from);
    let load_args: Vec<&str> = load_args.iter().map(String::as_str).collect();
    let mut load = quiet(&load_args, "load")?.spawn()?;
    let started = Instant::now();
    let mut reported = 0;
    let outcome = loop {
        for c in &mut components {
            if let Some(exit) = c.child.try_wait()? {
                bail!(
                    "`{}` exited during the soak ({exit}): see {}",
                    c.name,
                    logs.join(format!("{}.log", c.name)).display()
                );
            }
            if let Some(kb) = c.child.id().and_then(rss_kb) {
                c.samples.push((started.elapsed().as_secs(), kb));
            }
        }
        tokio::select! {
            exit = load.wait() => break exit?,
            _ = tokio::time::sleep(SAMPLE_EVERY) => {}
        }
        let minute = started.elapsed().as_secs() / 60;
        if minute > reported {
            reported = minute;
            let total: u64 = components.iter().filter_map(|c| c.samples.last()).map(|(_, kb)| kb).sum();
            progress(&format!("soak: {minute} min, {:.0} MB resident in all", total as f64 / 1024.0));
        }
    };
    for c in &mut components {
        if let Some(kb) = c.child.id().and_then(rss_kb) {
            c.samples.push((started.elapsed().as_secs(), kb));
        }
    }
    for c in &mut components {
        let _ = c.child.start_kill();
        let _ = c.child.wait().await;
    }
    if !outcome.success() {
        bail!("`trialflow load` failed: see {}", logs.join("load.log").display());
    }
    sqlx::query(AssertSqlSafe(format!("DROP DATABASE {database} WITH (FORCE)"))).execute(pool).await?;

    let end = minutes * 60;
    let at = |samples: &[(u64, u64)], secs: u64| -> Option<f64> {
        samples.iter().find(|(t, _)| *t >= secs).map(|(_, kb)| *kb as f64 / 1024.0)
    };
    let mut totals: BTreeMap<&str, f64> = BTreeMap::new();
    for c in &components {
        let (Some(first), Some(ten), Some(last)) = (
            at(&c.samples, 60),
            at(&c.samples, 600.min(end)),
            c.samples.last().map(|(_, kb)| *kb as f64 / 1024.0),
        ) else {
            bail!("{}: too few samples ({})", c.name, c.samples.len());
        };
        let name = c.name.replace('-', "_");
        bench(&format!("soak_rss_{name}_1min"), first, "MB");
        bench(&format!("soak_rss_{name}_10min"), ten, "MB");
        if minutes != 10 {
            // A 10-minute run ends at its 10-minute figure: one line per name.
            bench(&format!("soak_rss_{name}_{minutes}min"), last, "MB");
        }
        bench(&format!("soak_rss_{name}_growth_10min_to_end"), (last / ten - 1.0) * 100.0, "%");
        *totals.entry("1min").or_default() += first;
        *totals.entry("10min").or_default() += ten;
        *totals.entry("end").or_default() += last;
    }
    for (when, mb) in totals {
        progress(&format!("soak: all components at {when}: {mb:.0} MB"));
    }
    Ok(())
}
