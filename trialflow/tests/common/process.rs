//! A real `trialflow` process for the tests that need one: its output collected line by line,
//! signalled like an orchestrator would.

use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use trialflow_testkit::kafka;

/// A `trialflow` process whose output lines are collected as they come.
pub(crate) struct Trialflow {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Trialflow {
    pub(crate) fn spawn(args: &[&str], env: &[(&str, String)]) -> anyhow::Result<Self> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_trialflow"));
        command
            .args(args)
            .env("KAFKA_BOOTSTRAP_SERVERS", kafka().bootstrap_servers)
            .env("METRICS_ADDR", "")
            .env("TOPIC_PARTITIONS", "2")
            .env("RUST_LOG", "info,sqlx=warn,librdkafka=off,rdkafka=off")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn()?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        if let Some(out) = child.stdout.take() {
            collect(out, lines.clone());
        }
        if let Some(err) = child.stderr.take() {
            collect(err, lines.clone());
        }
        Ok(Self { child, lines })
    }

    pub(crate) fn output(&self) -> String {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).join("\n")
    }

    /// The first output line containing `needle`, waiting for it up to `within`.
    pub(crate) async fn line(&mut self, needle: &str, within: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + within;
        loop {
            let found = self
                .lines
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|l| l.contains(needle))
                .cloned();
            if let Some(line) = found {
                return Ok(line);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                anyhow::bail!("trialflow exited ({status}) before printing `{needle}`:\n{}", self.output());
            }
            if Instant::now() > deadline {
                anyhow::bail!("no `{needle}` within {within:?}:\n{}", self.output());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(crate) async fn terminate(&self) -> anyhow::Result<()> {
        let pid = self.child.id().ok_or_else(|| anyhow::anyhow!("trialflow has already exited"))?;
        let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await?;
        anyhow::ensure!(status.success(), "kill -TERM {pid}: {status}");
        Ok(())
    }

    /// Its exit status, if it comes within `limit` (otherwise it is killed and the test fails).
    pub(crate) async fn exit_within(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => {
                // Let the readers take the last lines.
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok(status?)
            }
            Err(_) => {
                self.child.start_kill()?;
                anyhow::bail!("still running {limit:?} later; killed it. Output:\n{}", self.output())
            }
        }
    }
}

fn collect(stream: impl AsyncRead + Unpin + Send + 'static, lines: Arc<Mutex<Vec<String>>>) {
    tokio::spawn(async move {
        let mut reader = BufReader::new(stream).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    });
}

impl Trialflow {
    /// Waits until the process's `/readyz` on `addr` answers `status` and, when given, names
    /// `component` with `state` (`"ready"`, or a part of its reason); returns the answer.
    pub(crate) async fn wait_readiness(
        &self,
        addr: &str,
        status: u16,
        component: Option<(&str, &str)>,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + READY_WAIT;
        let mut last = Value::Null;
        loop {
            if let Ok((code, body)) = get(addr, "/readyz").await {
                let matched = code == status
                    && component.is_none_or(|(name, state)| {
                        body["components"][name].as_str().is_some_and(|s| s == state || s.contains(state))
                    });
                last = body;
                if matched {
                    return Ok(last);
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "no /readyz {status} ({component:?}) within {READY_WAIT:?}; last answer {last}\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// How long a process may take to be ready, or not ready.
const READY_WAIT: Duration = Duration::from_secs(120);

/// A free local port for the process's `METRICS_ADDR`.
pub(crate) fn free_addr() -> anyhow::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.to_string())
}

/// `GET http://{addr}{path}`: the status and the body (JSON, or the text as a JSON string).
pub(crate) async fn get(addr: &str, path: &str) -> anyhow::Result<(u16, Value)> {
    let response = reqwest::Client::new()
        .get(format!("http://{addr}{path}"))
        .timeout(Duration::from_secs(5))
        .send()
        .await?;
    let status = response.status().as_u16();
    let text = response.text().await?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
}
