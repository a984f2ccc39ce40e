//! The Helm chart (`helm/trialflow`) against the binary, so the two cannot drift apart:
//!
//! * every container of every Deployment and Job the chart renders, with each values file of
//!   `helm/trialflow/ci/`, passes `trialflow config check <its args>` run with exactly the
//!   environment the manifest gives it (`env_clear()`; secret references replaced by plausible
//!   placeholders, `$(VAR)` references expanded as Kubernetes does, mounted folders replaced by
//!   empty ones): every variable the chart sets is one that component reads, every value parses;
//! * every component serves its probes where the chart looks: `METRICS_ADDR` is the `metrics`
//!   container port, liveness `GET /healthz`, readiness `GET /readyz`;
//! * every metric the PrometheusRule and the Grafana dashboard query is a name the code defines.
//!
//! Needs the pinned helm and the YAML reader of `make helm-check` (`.tools/`); without them the
//! test fails and says so. Connects to nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// What a Secret would hold for the variables the chart takes from one.
const SECRET_PLACEHOLDERS: &[(&str, &str)] = &[
    ("DATABASE_URL", "postgres://trialflow:placeholder@postgres.example:5432/trialflow"),
    ("SITE_API_TOKENS", "site-placeholder=admin:ops,site-staff-placeholder=site_staff:sam"),
    ("ALERT_API_TOKENS", "alert-placeholder=researcher:rita"),
    ("EPRO_GATEWAY_TOKENS", "app-placeholder"),
    (
        "NOTIFIER_SUBSCRIPTIONS",
        r#"[{"recipient_id":"oncall","study_id":"*","min_severity":"HIGH","channel":"webhook","url":"https://hooks.example/trialflow","secret":"placeholder-secret"}]"#,
    ),
    ("SASL_USERNAME", "trialflow"),
    ("SASL_PASSWORD", "placeholder-password"),
];

fn tool(relative: &str) -> PathBuf {
    let path = Path::new(ROOT).join(relative);
    assert!(
        path.exists(),
        "{} is missing: run `make helm-check` (it installs the pinned tools)",
        path.display()
    );
    path
}

/// The values files the chart is checked with.
fn values_files() -> Vec<PathBuf> {
    let dir = Path::new(ROOT).join("helm/trialflow/ci");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "expected the minimal, production, TLS/SASL and external-secrets values files");
    files
}

/// `helm template` of the chart with `values`, as JSON documents (PyYAML of the pinned venv reads
/// the YAML: no YAML crate in the workspace).
fn render(values: &Path) -> Vec<Value> {
    let helm = tool(".tools/helm/helm");
    let rendered = Command::new(helm)
        .args(["template", "trialflow", &format!("{ROOT}/helm/trialflow"), "--namespace", "trialflow", "-f"])
        .arg(values)
        .output()
        .expect("running helm");
    assert!(
        rendered.status.success(),
        "helm template with {}: {}",
        values.display(),
        String::from_utf8_lossy(&rendered.stderr)
    );
    let python = tool(".tools/helm-check/bin/python");
    let script =
        "import json, sys, yaml\njson.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)";
    let mut child = Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("running the YAML reader");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), &rendered.stdout)
        .expect("writing YAML");
    let output = child.wait_with_output().expect("reading JSON");
    assert!(output.status.success(), "the rendered chart is not YAML");
    serde_json::from_slice(&output.stdout).expect("JSON from the YAML reader")
}

/// One container of a rendered workload.
#[derive(Debug)]
struct Container {
    /// `values file / Kind name / container`, for messages.
    at: String,
    kind: String,
    args: Vec<String>,
    /// In order: `value`, or the variable a `secretKeyRef` stands for (`None`).
    env: Vec<(String, Option<String>)>,
    mounts: Vec<String>,
    metrics_port: Option<u64>,
    probes: (Option<String>, Option<String>),
}

fn containers(values: &Path, docs: &[Value]) -> Vec<Container> {
    let mut found = Vec::new();
    for doc in docs {
        let kind = doc["kind"].as_str().unwrap_or_default();
        if !matches!(kind, "Deployment" | "Job") {
            continue;
        }
        let pod = &doc["spec"]["template"]["spec"];
        let containers = pod["containers"].as_array().into_iter().flatten();
        let init = pod["initContainers"].as_array().into_iter().flatten();
        for c in containers.chain(init) {
            let strings = |v: &Value| -> Vec<String> {
                v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_string)).collect()
            };
            let env = c["env"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    let name = e["name"].as_str().expect("an env name").to_string();
                    let value = match (&e["value"], &e["valueFrom"]) {
                        (Value::String(v), _) => Some(v.clone()),
                        (Value::Null, from) if from.get("secretKeyRef").is_some() => None,
                        other => panic!("{name}: an env entry this test cannot stand in for: {other:?}"),
                    };
                    (name, value)
                })
                .collect();
            let port = c["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == "metrics")
                .and_then(|p| p["containerPort"].as_u64());
            let probe = |name: &str| {
                let get = &c[name]["httpGet"];
                (get["port"] == "metrics").then(|| get["path"].as_str().unwrap_or_default().to_string())
            };
            found.push(Container {
                at: format!(
                    "{} / {kind} {} / {}",
                    values.file_name().expect("a file name").to_string_lossy(),
                    doc["metadata"]["name"].as_str().unwrap_or_default(),
                    c["name"].as_str().unwrap_or_default()
                ),
                kind: kind.to_string(),
                args: strings(&c["args"]),
                env,
                mounts: c["volumeMounts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|m| m["mountPath"].as_str().map(str::to_string))
                    .collect(),
                metrics_port: port,
                probes: (probe("livenessProbe"), probe("readinessProbe")),
            });
        }
    }
    found
}

/// `$(VAR)` references to earlier variables expanded as the kubelet does (`$$` is a literal `$`;
/// an unknown reference stays as written).
fn expand(value: &str, defined: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = tail.strip_prefix("$(").and_then(|t| t.split_once(')'))
            && let Some(v) = defined.get(name)
        {
            out.push_str(v);
            rest = after;
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The container's environment as the process would see it; mounted folders point at `mounts`.
fn environment(container: &Container, mounts: &Path) -> Vec<(String, String)> {
    let mut defined = BTreeMap::new();
    let mut env = Vec::new();
    for (name, value) in &container.env {
        let value = match value {
            Some(v) => expand(v, &defined),
            None => SECRET_PLACEHOLDERS
                .iter()
                .find(|(var, _)| var == name)
                .map(|(_, v)| v.to_string())
                .unwrap_or_else(|| {
                    panic!(
                        "{}: `{name}` comes from a Secret: add a placeholder to SECRET_PLACEHOLDERS",
                        container.at
                    )
                }),
        };
        let value = container.mounts.iter().fold(value, |v, mount| {
            v.replace(mount.as_str(), &mounts.join(mount.trim_start_matches('/')).to_string_lossy())
        });
        defined.insert(name.clone(), value.clone());
        env.push((name.clone(), value));
    }
    env
}

#[test]
fn every_container_the_chart_renders_passes_config_check_with_exactly_its_environment() {
    let binary = env!("CARGO_BIN_EXE_trialflow");
    let scratch = std::env::temp_dir().join(format!("trialflow-helm-chart-{}", std::process::id()));
    let mut checked = BTreeSet::new();
    let mut failures = Vec::new();
    for values in values_files() {
        let docs = render(&values);
        let containers = containers(&values, &docs);
        assert!(!containers.is_empty(), "{}: nothing rendered", values.display());
        for container in containers {
            let mounts = scratch.join(checked.len().to_string());
            for mount in &container.mounts {
                std::fs::create_dir_all(mounts.join(mount.trim_start_matches('/'))).expect("a mount folder");
            }
            let env = environment(&container, &mounts);
            let output = Command::new(binary)
                .args(["config", "check"])
                .args(&container.args)
                .env_clear()
                .envs(env.iter().map(|(k, v)| (k, v)))
                .output()
                .expect("running trialflow config check");
            if !output.status.success() {
                failures.push(format!(
                    "{}: `trialflow config check {}` failed:\n    {}",
                    container.at,
                    container.args.join(" "),
                    String::from_utf8_lossy(&output.stderr).trim()
                ));
            }
            if container.kind == "Deployment" {
                let addr = env.iter().find(|(k, _)| k == "METRICS_ADDR").map(|(_, v)| v.as_str());
                let port = container.metrics_port.map(|p| format!("0.0.0.0:{p}"));
                if addr != port.as_deref()
                    || container.probes != (Some("/healthz".into()), Some("/readyz".into()))
                {
                    failures.push(format!(
                        "{}: METRICS_ADDR {addr:?} must be the `metrics` port ({port:?}), probed at /healthz and \
                         /readyz (found {:?})",
                        container.at, container.probes
                    ));
                }
            }
            checked.insert(container.args.join(" "));
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    assert!(failures.is_empty(), "the chart and the binary disagree:\n  {}", failures.join("\n  "));
    // Every component of the registry: a new consumer without its Deployment fails here.
    let consumers = trialflow_pipeline::services::consumers().map(|(s, _)| format!("consume {}", s.name));
    let fixed =
        ["site-api", "epro-gateway", "alert-api", "relay", "migrate", "topics apply"].map(String::from);
    for expected in fixed.into_iter().chain(consumers) {
        assert!(checked.contains(&expected), "no values file renders `trialflow {expected}`: {checked:?}");
    }
}

/// Every `"trialflow_..."` string literal of the workspace's Rust sources.
fn metric_names_in_code() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut dirs = vec![PathBuf::from(ROOT)];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("reading the workspace").flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir()
                && !name.starts_with('.')
                && !name.starts_with("target")
                && name != "node_modules"
            {
                dirs.push(path);
            } else if name.ends_with(".rs") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                for piece in text.split("\"trialflow_").skip(1) {
                    if let Some((metric, _)) = piece.split_once('"') {
                        names.insert(format!("trialflow_{metric}"));
                    }
                }
            }
        }
    }
    names
}

/// The `trialflow_...` metric names a PromQL text uses (a summary's `_sum` / `_count` are its
/// own name).
fn metric_names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices("trialflow_") {
        if at > 0 && text.as_bytes()[at - 1].is_ascii_alphanumeric() {
            continue;
        }
        let name: String = text[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        let name = name.strip_suffix("_sum").or_else(|| name.strip_suffix("_count")).unwrap_or(&name);
        names.insert(name.to_string());
    }
    names
}

#[test]
fn the_alerts_and_the_dashboard_query_metrics_the_code_defines() {
    let production = Path::new(ROOT).join("helm/trialflow/ci/production.yaml");
    let docs = render(&production);
    let mut queries = String::new();
    let mut kinds = BTreeSet::new();
    for doc in &docs {
        match doc["kind"].as_str() {
            Some("PrometheusRule") => {
                kinds.insert("PrometheusRule");
                for group in doc["spec"]["groups"].as_array().into_iter().flatten() {
                    for rule in group["rules"].as_array().into_iter().flatten() {
                        queries.push_str(rule["expr"].as_str().unwrap_or_default());
                        queries.push('\n');
                    }
                }
            }
            Some("ConfigMap") if doc["data"].get("trialflow.json").is_some() => {
                kinds.insert("dashboard");
                let dashboard: Value =
                    serde_json::from_str(doc["data"]["trialflow.json"].as_str().unwrap_or_default())
                        .expect("the dashboard is JSON");
                for panel in dashboard["panels"].as_array().into_iter().flatten() {
                    for target in panel["targets"].as_array().into_iter().flatten() {
                        queries.push_str(target["expr"].as_str().unwrap_or_default());
                        queries.push('\n');
                    }
                }
            }
            _ => {}
        }
    }
    assert_eq!(kinds.len(), 2, "production.yaml must render the PrometheusRule and the dashboard: {kinds:?}");
    let used = metric_names_in(&queries);
    assert!(used.len() >= 10, "{used:?}");
    let defined = metric_names_in_code();
    let unknown: Vec<_> = used.difference(&defined).collect();
    assert!(unknown.is_empty(), "queried but defined nowhere in the code (renamed?): {unknown:?}");
}

#[test]
fn kubelet_style_expansion() {
    let defined = BTreeMap::from([("A".to_string(), "x,y".to_string())]);
    assert_eq!(expand("k=$(A),j=$(B),$$(A),$", &defined), "k=x,y,j=$(B),$(A),$");
}
