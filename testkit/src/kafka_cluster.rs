//! A private Apache Kafka cluster for one test: `N` KRaft nodes, each broker and controller (the
//! controller quorum is every node), started as child processes from the jars `make up` installs
//! (`.tools/kafka/libs`), on free loopback ports, with their logs and data in a temp dir.
//!
//! * **Isolated.** Nothing is shared with the local stack's broker: a test may kill, restart or
//!   misconfigure its cluster freely. Internal topics get a replication factor of `min(N, 3)` and
//!   `min.insync.replicas` 2 from three nodes on (1 below), so one node can die without stopping
//!   `acks=all` writes; `default.replication.factor` is the same, auto-creation is off.
//! * **Gone when the test is.** Dropping the [`KafkaCluster`] (also while a test panics) kills
//!   every node and removes the temp dir. Each JVM runs under a small `sh` guard that holds the
//!   read end of a pipe whose write end only this process has: if the test process itself dies
//!   (killed by a harness timeout, aborted), the pipe closes and the guard SIGKILLs its JVM, so no
//!   broker outlives its test.
//! * **Faults are real.** [`KafkaCluster::kill`] is a SIGKILL (no clean shutdown, the log is
//!   recovered on the next start); [`KafkaCluster::restart`] starts the node again on the same
//!   ports and data and waits until it serves.
//! * **Ready means serving.** A node is up once its log says `Kafka Server started` (the broker
//!   caught up with the metadata log and was unfenced: with `N > 1` that needs a quorum) and its
//!   ports accept connections. A node that exits instead fails the start with the tail of its log.
//!
//! A client listener beside the plaintext one (e.g. `SASL_SSL`) comes from [`Listener`]; format
//! arguments such as SCRAM credentials (`--add-scram`) from [`ClusterSpec::format_arg`]. The
//! controller quorum is static (`controller.quorum.voters`), which Kafka 4.4 formats without
//! `--standalone` / `--initial-controllers` for any `N`.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Read as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use base64::Engine as _;
use trialflow_outbox::KafkaConfig;

/// The line a node logs once it serves (`kafka.server.KafkaRaftServer`, logged at INFO by
/// `scripts/kafka/log4j2.yaml`).
const STARTED: &str = "Kafka Server started";
/// How long a node may take to start. Three JVMs starting at once on two cores take ~20 s.
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// Lines of a node's log shown when it failed.
const LOG_TAIL_LINES: usize = 30;

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Nodes, each broker and controller.
    pub nodes: usize,
    /// A client listener beside the plaintext one.
    pub listener: Option<Listener>,
    /// More broker settings, the same on every node (added after the launcher's, so they win).
    pub properties: Vec<(String, String)>,
    /// More arguments of `kafka.tools.StorageTool format` (e.g. `--add-scram`, then its value).
    pub format_args: Vec<String>,
    /// Largest heap of each node's JVM (`-Xmx`).
    pub heap: String,
}

impl ClusterSpec {
    /// `nodes` nodes with the plaintext listener only, 512 MB of heap each.
    pub fn nodes(nodes: usize) -> Self {
        Self { nodes, listener: None, properties: Vec::new(), format_args: Vec::new(), heap: "512m".into() }
    }

    /// Adds a client listener.
    pub fn listener(mut self, listener: Listener) -> Self {
        self.listener = Some(listener);
        self
    }

    /// Adds a broker setting.
    pub fn property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.push((key.into(), value.into()));
        self
    }

    /// Adds an argument of the storage format command.
    pub fn format_arg(mut self, arg: impl Into<String>) -> Self {
        self.format_args.push(arg.into());
        self
    }
}

/// A client listener beside the plaintext one, e.g. `SECURE` with `SASL_SSL`. Inter-broker and
/// controller traffic stay on the plaintext loopback listeners.
#[derive(Debug, Clone)]
pub struct Listener {
    /// The listener's name, upper case (`SECURE`).
    pub name: String,
    /// `PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL`.
    pub security_protocol: String,
    /// Its settings without the `listener.name.<name>.` prefix, which is added
    /// (`sasl.enabled.mechanisms`, `ssl.keystore.location`, `scram-sha-512.sasl.jaas.config`...).
    pub properties: Vec<(String, String)>,
}

/// A running cluster; see the module documentation.
#[derive(Debug)]
pub struct KafkaCluster {
    dir: PathBuf,
    libs: PathBuf,
    log4j: PathBuf,
    spec: ClusterSpec,
    nodes: Vec<Node>,
}

#[derive(Debug)]
struct Node {
    id: usize,
    dir: PathBuf,
    port: u16,
    controller_port: u16,
    listener_port: Option<u16>,
    process: Option<Guarded>,
}

/// A node's JVM under its `sh` guard: closing `stdin` makes the guard SIGKILL the JVM and exit.
#[derive(Debug)]
struct Guarded {
    guard: Child,
    stdin: Option<ChildStdin>,
}

impl Guarded {
    /// SIGKILLs the JVM (through its guard) and waits until it is gone.
    fn kill(mut self) {
        drop(self.stdin.take());
        let _ = self.guard.wait();
    }
}

impl KafkaCluster {
    /// Formats and starts the nodes of `spec`, and waits until every one serves.
    pub async fn start(spec: ClusterSpec) -> anyhow::Result<Self> {
        ensure!(spec.nodes >= 1, "a cluster needs at least one node");
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("testkit has a parent folder")?;
        let libs = root.join(".tools/kafka/libs");
        let has_jars = std::fs::read_dir(&libs)
            .map(|entries| entries.flatten().any(|e| e.path().extension().is_some_and(|x| x == "jar")))
            .unwrap_or(false);
        ensure!(
            has_jars,
            "Apache Kafka's jars are not in {}: run `make up` once (scripts/maven-libs.sh installs them)",
            libs.display()
        );
        let dir = std::env::temp_dir().join(format!("trialflow-kafka-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // From here on, Drop removes `dir` whatever fails.
        let mut cluster = Self {
            dir,
            libs,
            log4j: root.join("scripts/kafka/log4j2.yaml"),
            spec: spec.clone(),
            nodes: Vec::new(),
        };
        let mut ports = free_ports(spec.nodes * if spec.listener.is_some() { 3 } else { 2 })?.into_iter();
        for id in 1..=spec.nodes {
            let node_dir = cluster.dir.join(format!("node-{id}"));
            std::fs::create_dir_all(&node_dir)?;
            let mut next = || ports.next().context("a free port");
            let (port, controller_port) = (next()?, next()?);
            let listener_port = if spec.listener.is_some() { Some(next()?) } else { None };
            cluster.nodes.push(Node {
                id,
                dir: node_dir,
                port,
                controller_port,
                listener_port,
                process: None,
            });
        }
        let voters = cluster
            .nodes
            .iter()
            .map(|n| format!("{}@127.0.0.1:{}", n.id, n.controller_port))
            .collect::<Vec<_>>()
            .join(",");
        for node in &cluster.nodes {
            std::fs::write(node.dir.join("server.properties"), cluster.properties(node, &voters))?;
        }
        cluster.format().await?;
        for index in 0..cluster.nodes.len() {
            cluster.spawn(index)?;
        }
        for index in 0..cluster.nodes.len() {
            cluster.wait_ready(index, 0).await?;
        }
        Ok(cluster)
    }

    /// The plaintext listeners of every node, `host:port,...`.
    pub fn bootstrap_servers(&self) -> String {
        self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect::<Vec<_>>().join(",")
    }

    /// The client listener of every node ([`ClusterSpec::listener`]), `host:port,...`.
    pub fn listener_bootstrap_servers(&self) -> Option<String> {
        let ports: Option<Vec<u16>> = self.nodes.iter().map(|n| n.listener_port).collect();
        ports.map(|p| p.iter().map(|p| format!("127.0.0.1:{p}")).collect::<Vec<_>>().join(","))
    }

    /// A [`KafkaConfig`] of the plaintext listeners, every other field at its default.
    pub fn kafka_config(&self) -> KafkaConfig {
        KafkaConfig { bootstrap_servers: self.bootstrap_servers(), ..KafkaConfig::default() }
    }

    /// The temp dir of every node's settings, data and log (`node-<id>/`), removed on drop.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Node ids (1-based), in order.
    pub fn node_ids(&self) -> Vec<usize> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// Whether node `id` runs (started by this cluster and not exited).
    pub fn is_running(&mut self, id: usize) -> bool {
        let Some(node) = self.nodes.iter_mut().find(|n| n.id == id) else { return false };
        match node.process.as_mut().map(|p| p.guard.try_wait()) {
            Some(Ok(None)) => true,
            Some(_) | None => false,
        }
    }

    /// SIGKILLs node `id` (no clean shutdown) and waits until its process is gone.
    pub fn kill(&mut self, id: usize) -> anyhow::Result<()> {
        let index = self.index(id)?;
        let process = self.nodes[index].process.take();
        ensure!(process.is_some(), "Kafka node {id} is not running");
        if let Some(process) = process {
            process.kill();
        }
        Ok(())
    }

    /// Starts node `id` again on its ports and data (killing it first if it still runs) and
    /// waits until it serves.
    pub async fn restart(&mut self, id: usize) -> anyhow::Result<()> {
        let index = self.index(id)?;
        if let Some(process) = self.nodes[index].process.take() {
            process.kill();
        }
        let offset =
            std::fs::metadata(self.nodes[index].dir.join("broker.log")).map(|m| m.len()).unwrap_or(0);
        self.spawn(index)?;
        self.wait_ready(index, offset).await
    }

    /// The log of node `id` so far.
    pub fn log(&self, id: usize) -> anyhow::Result<String> {
        let index = self.index(id)?;
        Ok(std::fs::read_to_string(self.nodes[index].dir.join("broker.log"))?)
    }

    fn index(&self, id: usize) -> anyhow::Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.id == id)
            .with_context(|| format!("no Kafka node {id} in this cluster (nodes {:?})", self.node_ids()))
    }

    /// `server.properties` of `node`.
    fn properties(&self, node: &Node, voters: &str) -> String {
        let replicas = self.spec.nodes.min(3);
        let min_isr = if replicas >= 3 { 2 } else { 1 };
        let mut listeners =
            format!("PLAINTEXT://127.0.0.1:{},CONTROLLER://127.0.0.1:{}", node.port, node.controller_port);
        let mut advertised = format!("PLAINTEXT://127.0.0.1:{}", node.port);
        let mut protocols = "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT".to_string();
        let mut listener_properties = String::new();
        if let (Some(listener), Some(port)) = (&self.spec.listener, node.listener_port) {
            let name = &listener.name;
            let _ = write!(listeners, ",{name}://127.0.0.1:{port}");
            let _ = write!(advertised, ",{name}://127.0.0.1:{port}");
            let _ = write!(protocols, ",{name}:{}", listener.security_protocol);
            for (key, value) in &listener.properties {
                let _ = writeln!(listener_properties, "listener.name.{}.{key}={value}", name.to_lowercase());
            }
        }
        let mut text = format!(
            "process.roles=broker,controller
node.id={id}
controller.quorum.voters={voters}
listeners={listeners}
advertised.listeners={advertised}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map={protocols}
log.dirs={log}
num.partitions=1
default.replication.factor={replicas}
min.insync.replicas={min_isr}
offsets.topic.replication.factor={replicas}
offsets.topic.num.partitions=10
transaction.state.log.replication.factor={replicas}
transaction.state.log.min.isr={min_isr}
share.coordinator.state.topic.replication.factor={replicas}
share.coordinator.state.topic.min.isr={min_isr}
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
{listener_properties}",
            id = node.id,
            log = node.dir.join("log").display(),
        );
        for (key, value) in &self.spec.properties {
            let _ = writeln!(text, "{key}={value}");
        }
        text
    }

    /// The JVM of a node or of its storage tool. Test nodes favour start-up over peak throughput:
    /// the C1 compiler only and the serial collector take about half the CPU time of the
    /// defaults to start (measured on two busy cores: ~5.5 s instead of 7–10 s to serve), which
    /// matters with three nodes starting at once beside a build.
    fn java(&self) -> Command {
        let mut java = Command::new("java");
        java.arg("-Xms128m")
            .arg(format!("-Xmx{}", self.spec.heap))
            .args(["-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true"])
            .arg(format!("-Dlog4j2.configurationFile={}", self.log4j.display()))
            .arg("-cp")
            .arg(format!("{}/*", self.libs.display()));
        java
    }

    /// Formats every node's storage, the nodes in parallel (one JVM each).
    async fn format(&self) -> anyhow::Result<()> {
        // URL-safe base64 of a random UUID, as Kafka's own ids; like Kafka, never one starting
        // with '-' (1 in 64 would): the tool's argument parser takes `-t -x…` for two options.
        let cluster_id = loop {
            let id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(uuid::Uuid::new_v4().as_bytes());
            if !id.starts_with('-') {
                break id;
            }
        };
        let mut formats = Vec::new();
        for node in &self.nodes {
            let mut command = tokio::process::Command::from(self.java());
            command
                .args(["kafka.tools.StorageTool", "format", "-t", &cluster_id, "-c"])
                .arg(node.dir.join("server.properties"))
                .args(&self.spec.format_args)
                .stdin(Stdio::null())
                .kill_on_drop(true);
            let id = node.id;
            formats.push(tokio::spawn(async move {
                let output = command.output().await.with_context(
                    || "running `java` to format the Kafka log (is Java installed? `make up` installs it)",
                )?;
                ensure!(
                    output.status.success(),
                    "formatting Kafka node {id} failed ({}): {}{}",
                    output.status,
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                );
                anyhow::Ok(())
            }));
        }
        for format in formats {
            format.await??;
        }
        Ok(())
    }

    /// Starts node `index`'s JVM under its guard, its output appended to `broker.log`.
    fn spawn(&mut self, index: usize) -> anyhow::Result<()> {
        let node = &self.nodes[index];
        let log = OpenOptions::new().create(true).append(true).open(node.dir.join("broker.log"))?;
        let java = self.java();
        // The guard: fd 3 is the pipe from this process; when it closes (this process let go of
        // it, or died) the JVM is SIGKILLed. `wait` returns when the JVM exits for any reason.
        let script = r#"exec 3<&0
"$@" 3<&- </dev/null &
jvm=$!
(read -r _ <&3; kill -KILL "$jvm" 2>/dev/null) &
wait "$jvm""#;
        let mut guard = Command::new("sh");
        guard
            .arg("-c")
            .arg(script)
            .arg("kafka-node-guard")
            .arg(java.get_program())
            .args(java.get_args())
            .arg("kafka.Kafka")
            .arg(node.dir.join("server.properties"))
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut guard = guard.spawn().context("starting a Kafka node (`sh` and `java` must be installed)")?;
        let stdin = guard.stdin.take();
        self.nodes[index].process = Some(Guarded { guard, stdin });
        Ok(())
    }

    /// Waits until node `index` logged [`STARTED`] after byte `offset` of its log and its ports
    /// accept connections; fails with its log's tail when it exits or takes too long.
    async fn wait_ready(&mut self, index: usize, offset: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let (id, log_path) = (self.nodes[index].id, self.nodes[index].dir.join("broker.log"));
        let ports: Vec<u16> =
            [Some(self.nodes[index].port), self.nodes[index].listener_port].into_iter().flatten().collect();
        loop {
            let started = read_from(&log_path, offset).contains(STARTED);
            if started && ports.iter().all(|p| port_open(*p)) {
                return Ok(());
            }
            let exited = match self.nodes[index].process.as_mut().map(|p| p.guard.try_wait()) {
                Some(Ok(Some(status))) => Some(status.to_string()),
                Some(Err(e)) => Some(e.to_string()),
                Some(Ok(None)) => None,
                None => Some("not started".to_string()),
            };
            if let Some(status) = exited {
                bail!(
                    "Kafka node {id} exited ({status}) before it served; its log ends:\n{}",
                    tail(&log_path)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "Kafka node {id} did not serve within {START_TIMEOUT:?}; its log ends:\n{}",
                    tail(&log_path)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for KafkaCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(process) = node.process.take() {
                process.kill();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `n` distinct loopback ports free right now (held open together, so none repeats).
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<std::io::Result<Vec<_>>>()?;
    Ok(listeners.iter().map(|l| l.local_addr().map(|a| a.port())).collect::<std::io::Result<_>>()?)
}

fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_millis(200)).is_ok()
}

/// The file from byte `offset` on (empty when it cannot be read).
fn read_from(path: &Path, offset: u64) -> String {
    let mut text = Vec::new();
    if let Ok(mut file) = File::open(path) {
        use std::io::Seek as _;
        if file.seek(std::io::SeekFrom::Start(offset)).is_ok() {
            let _ = file.read_to_end(&mut text);
        }
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// The last lines of a log file.
fn tail(path: &Path) -> String {
    let text = read_from(path, 0);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}
