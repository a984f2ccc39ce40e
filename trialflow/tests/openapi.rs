//! The OpenAPI documents of the three HTTP services — the site API, the ePRO gateway and the
//! researchers' alert API — against the services themselves, on the real local stack (`make up`).
//!
//! For each service, the document it serves at `GET /openapi.json` (without a token):
//!
//! * documents exactly the routes of the service's `ROUTES`, the table its router is built from
//!   (the alert API's router and document both come from its utoipa annotations, and its
//!   `ROUTES` is checked against them);
//! * every documented operation is served as documented: its example request (the examples of
//!   its path and query parameters and of its body, in an order where each finds what the one
//!   before created) gets a documented 2xx, with a documented content type and a body that fits
//!   the documented schema; without a token, a secured operation gets a documented 401 whose
//!   body fits its schema, and an open one still succeeds;
//! * on every documented path, the `Allow` header of a 405 names exactly the documented methods:
//!   nothing is served there undocumented.
//!
//! The alert API's document is generated; its committed copy `consumers/openapi/alert-api.json`
//! must equal it (`UPDATE_OPENAPI=1` rewrites the copy). A second test has every document checked
//! by a foreign validator, openapi-spec-validator (`scripts/openapi-validator.sh` installs it);
//! it fails, naming the script, when the tool is missing.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use reqwest::{Client, Method, StatusCode};
use serde_json::Value;
use sqlx::{AssertSqlSafe, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trialflow_consumers::monitoring::{self, api::AlertApi, api::AlertApiConfig};
use trialflow_consumers::{enrollment, risk};
use trialflow_http::auth::{Role, TokenGrant};
use trialflow_http::input::DEFAULT_MAX_FUTURE_SKEW_SECS;
use trialflow_outbox::SchemaName;
use trialflow_producers::epro_gateway::{self, EproGateway, EproGatewayConfig};
use trialflow_producers::site_api;
use trialflow_schemas::QuestionnaireResponseSubmitted;
use trialflow_schemas::topics::TopicNames;
use trialflow_testkit::idp::TestIdp;
use trialflow_testkit::{database_url, init_logs, kafka, unique};
use uuid::Uuid;

mod common;

/// Methods a route could be served with besides the documented ones.
const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

/// One of the three services, running.
struct Service {
    name: &'static str,
    base: String,
    /// A token every secured operation of the service accepts, but those of `tokens`.
    token: String,
    /// The token of the operations whose path ends with the suffix (the code break's investigator).
    tokens: Vec<(&'static str, String)>,
    routes: &'static [(&'static str, &'static str)],
}

struct Fixture {
    services: Vec<Service>,
    shutdown: CancellationToken,
    servers: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl Service {
    fn token_for(&self, path: &str) -> &str {
        self.tokens.iter().find(|(suffix, _)| path.ends_with(suffix)).map_or(self.token.as_str(), |(_, t)| t)
    }
}

impl Fixture {
    async fn start() -> anyhow::Result<Self> {
        init_logs();
        let url = database_url();
        let topics = TopicNames::new(format!("{}.", unique("openapi").replace('_', "-")));
        let token = |role: Role, user: &str| TokenGrant { token: unique(user), role, user: user.to_string() };
        let (admin, researcher) = (token(Role::Admin, "ada"), token(Role::Researcher, "rita"));
        let grants = vec![admin.clone(), researcher.clone()];
        let shutdown = CancellationToken::new();
        let mut servers: Vec<JoinHandle<anyhow::Result<()>>> = Vec::new();
        let mut services = Vec::new();

        let site_schema = SchemaName::new(unique("sa"))?;
        site_api::migrate(&url, &site_schema).await.context("migrating (is `make up` running?)")?;
        // The code break reads the randomization records, and needs a recent sign-in.
        let enrollment_schema = SchemaName::new(unique("enr"))?;
        enrollment::migrate(&url, &enrollment_schema).await?;
        let pool = PgPool::connect(&url).await?;
        let document: Value = serde_json::from_str(site_api::openapi::DOCUMENT)?;
        let parameter =
            |name: &str| document["components"]["parameters"][name]["example"].as_str().map(str::to_string);
        let (study_id, subject_id) =
            parameter("StudyId").zip(parameter("SubjectId")).context("path examples")?;
        common::randomize(&pool, &enrollment_schema, (&study_id, &subject_id), 1).await?;
        // The data queries the examples answer (open, site API) and close (answered, alert API).
        let risk_schema = SchemaName::new(unique("risk"))?;
        risk::migrate(&url, &risk_schema).await?;
        let answer = &document["paths"]["/v1/queries/{query_id}/answer"]["post"]["parameters"][0]["example"];
        let open_query: Uuid = answer.as_str().context("the answer's query id example")?.parse()?;
        let answered_query: Uuid = monitoring::api::EXAMPLE_QUERY_ID.parse()?;
        let subject = (study_id.as_str(), "701", subject_id.as_str());
        common::seed_query(&pool, &risk_schema, open_query, subject, "open").await?;
        common::seed_query(&pool, &risk_schema, answered_query, subject, "answered").await?;
        let idp = TestIdp::start().await?;
        let investigator = idp.token(&idp.claims("ian", "investigator", &["*"], &["*"]))?;
        let site = common::site_api(
            &url,
            site_schema,
            enrollment_schema,
            risk_schema.clone(),
            grants.clone(),
            &idp,
            &topics,
        )
        .await?;
        services.push(Service {
            name: "site API",
            base: format!("http://{}", site.local_addr()),
            // Admins may do everything the site API offers but break a code.
            token: admin.token.clone(),
            tokens: vec![("/code-break", investigator)],
            routes: site_api::ROUTES,
        });
        let stop = shutdown.clone();
        servers.push(tokio::spawn(async move { Ok(site.run(stop).await?) }));

        let app = unique("app");
        let topic = topics.of::<QuestionnaireResponseSubmitted>();
        trialflow_outbox::kafka::ensure_topics(&kafka(), &[(&topic, 1)]).await?;
        let gateway = EproGateway::bind(EproGatewayConfig {
            listen: "127.0.0.1:0".parse()?,
            kafka: kafka(),
            topics: topics.clone(),
            tokens: vec![app.clone()],
            oidc: None,
            ack_timeout_ms: 10_000,
            clock: Default::default(),
            max_future_skew_secs: DEFAULT_MAX_FUTURE_SKEW_SECS,
            limits: trialflow_http::limits::Limits::unthrottled(),
        })
        .await?;
        services.push(Service {
            name: "ePRO gateway",
            base: format!("http://{}", gateway.local_addr()),
            token: app,
            tokens: Vec::new(),
            routes: epro_gateway::ROUTES,
        });
        let stop = shutdown.clone();
        servers.push(tokio::spawn(async move { Ok(gateway.run(stop).await?) }));

        let alert_schema = SchemaName::new(unique("alerts"))?;
        monitoring::migrate(&url, &alert_schema).await?;
        // The dashboard's and the queries' routes read the same private, migrated risk schema.
        raise_example_alert(&url, &alert_schema).await?;
        let alerts = AlertApi::bind(AlertApiConfig {
            listen: "127.0.0.1:0".parse()?,
            database_url: url.clone(),
            schema: alert_schema,
            risk_schema,
            rules: Default::default(),
            thresholds: Default::default(),
            tokens: grants,
            oidc: None,
            topics,
            limits: trialflow_http::limits::Limits::unthrottled(),
        })
        .await?;
        services.push(Service {
            name: "alert API",
            base: format!("http://{}", alerts.local_addr()),
            token: researcher.token.clone(),
            tokens: Vec::new(),
            routes: monitoring::api::ROUTES,
        });
        let stop = shutdown.clone();
        servers.push(tokio::spawn(async move { Ok(alerts.run(stop).await?) }));

        Ok(Self { services, shutdown, servers })
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        for server in self.servers {
            tokio::time::timeout(Duration::from_secs(15), server)
                .await
                .context("server did not stop")???;
        }
        Ok(())
    }
}

/// The open alert the alert API's examples name, as the monitoring consumer would raise it.
async fn raise_example_alert(url: &str, s: &SchemaName) -> anyhow::Result<()> {
    let pool = PgPool::connect(url).await?;
    let id: Uuid = monitoring::api::EXAMPLE_ALERT_ID.parse()?;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {s}.alert (alert_id, study_id, site_id, subject_id, rule_id, rule_version, severity,
                                source_label, summary, effective_at, escalate_at)
         VALUES ($1, 'CDISCPILOT01', '701', '01-701-1015', 'PROTOCOL-HTN-SEVERE', 1, 'HIGH', 'protocol',
                 'Systolic blood pressure 182 mmHg', now(), now() + interval '1 hour')"
    )))
    .bind(id)
    .execute(&pool)
    .await?;
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {s}.alert_history (alert_id, kind, actor) VALUES ($1, 'raised', 'monitoring')"
    )))
    .bind(id)
    .execute(&pool)
    .await?;
    pool.close().await;
    Ok(())
}

// ---- reading a document ------------------------------------------------------------------------

/// `value`, or what its `$ref` (a pointer into `doc`) names, followed to the end.
fn resolve<'a>(doc: &'a Value, mut value: &'a Value) -> anyhow::Result<&'a Value> {
    for _ in 0..16 {
        let Some(target) = value.get("$ref").and_then(Value::as_str) else { return Ok(value) };
        value = doc
            .pointer(target.strip_prefix('#').context("only local references")?)
            .with_context(|| format!("`{target}` names nothing"))?;
    }
    bail!("reference loop")
}

/// A JSON pointer segment (RFC 6901).
fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// A JSON pointer as a URI fragment: the characters a fragment cannot hold percent-encoded.
fn fragment(pointer: &str) -> String {
    let mut out = String::new();
    for c in pointer.chars() {
        match c {
            '%' | '{' | '}' | ' ' | '"' | '<' | '>' | '\\' | '^' | '`' | '|' => {
                out.push_str(&format!("%{:02X}", c as u32))
            }
            c => out.push(c),
        }
    }
    out
}

/// The pointer of what `pointer` names, through its `$ref`s.
fn resolved_pointer(doc: &Value, mut pointer: String) -> anyhow::Result<String> {
    for _ in 0..16 {
        let value = doc.pointer(&pointer).with_context(|| format!("`{pointer}` names nothing"))?;
        let Some(target) = value.get("$ref").and_then(Value::as_str) else { return Ok(pointer) };
        pointer = target.strip_prefix('#').context("only local references")?.to_string();
    }
    bail!("reference loop")
}

/// One documented operation.
struct Operation {
    method: String,
    path: String,
    /// The JSON pointer of its operation object.
    pointer: String,
}

impl Operation {
    fn name(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// Every operation of `doc`, in an order where each example request finds what the examples
/// before it created: commands (POST) before reads, so reads show what the commands made; then
/// shorter paths first (a study before its sites, a site before its subjects and shipments), then
/// by path (consent before enrollment requests before withdrawal, acknowledge before resolve).
fn operations(doc: &Value) -> anyhow::Result<Vec<Operation>> {
    let mut found = Vec::new();
    for (path, item) in doc["paths"].as_object().context("no paths")? {
        for method in item.as_object().context("a path item is an object")?.keys() {
            if METHODS.contains(&method.to_ascii_uppercase().as_str()) {
                let pointer = format!("/paths/{}/{method}", escape(path));
                found.push(Operation { method: method.to_ascii_uppercase(), path: path.clone(), pointer });
            }
        }
    }
    found.sort_by_key(|o| (o.method != "POST", o.path.matches('/').count(), o.path.clone()));
    Ok(found)
}

/// An example request of an operation, from the document's examples.
struct Example {
    url: reqwest::Url,
    headers: Vec<(String, String)>,
    body: Option<Value>,
    secured: bool,
}

fn example(doc: &Value, base: &str, op: &Operation) -> anyhow::Result<Example> {
    let operation = &doc.pointer(&op.pointer).context("operation")?;
    let mut path = op.path.clone();
    let mut query = Vec::new();
    let mut headers = Vec::new();
    for parameter in operation["parameters"].as_array().into_iter().flatten() {
        let parameter = resolve(doc, parameter)?;
        let name = parameter["name"].as_str().context("a parameter has a name")?;
        let required = parameter["required"] == Value::Bool(true);
        let example = parameter.get("example").or_else(|| parameter["schema"].get("example"));
        let text = |value: &Value| match value {
            Value::String(s) => s.clone(),
            // `form` style without `explode`: comma-separated.
            Value::Array(items) => items
                .iter()
                .map(|i| i.as_str().map_or(i.to_string(), str::to_string))
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        };
        match parameter["in"].as_str() {
            Some("path") => {
                let value = example
                    .with_context(|| format!("{}: path parameter `{name}` has no example", op.name()))?;
                path = path.replace(&format!("{{{name}}}"), &text(value));
            }
            Some("query") => {
                if let Some(value) = example {
                    query.push((name.to_string(), text(value)));
                }
            }
            // A required header is an idempotency key: fresh for every request.
            Some("header") if required => headers.push((name.to_string(), Uuid::new_v4().to_string())),
            _ => {}
        }
    }
    let mut url = reqwest::Url::parse(&format!("{base}{path}"))?;
    if !query.is_empty() {
        url.query_pairs_mut().extend_pairs(&query);
    }
    let body = match operation.get("requestBody") {
        None => None,
        Some(body) => {
            // The media type's example, else its schema's.
            let media = &resolve(doc, body)?["content"]["application/json"];
            let example = match media.get("example") {
                Some(example) => Some(example),
                None => resolve(doc, &media["schema"])?.get("example"),
            };
            Some(example.cloned().with_context(|| format!("{}: the JSON body has no example", op.name()))?)
        }
    };
    let secured = operation["security"]
        .as_array()
        .is_some_and(|s| s.iter().any(|r| r.as_object().is_some_and(|r| !r.is_empty())));
    Ok(Example { url, headers, body, secured })
}

// ---- checking an answer ------------------------------------------------------------------------

/// Checks `response` against what the document says of `status` for the operation at `pointer`:
/// a documented status, a documented content type, a body that fits the documented schema.
async fn check_answer(
    doc: &Value,
    op: &Operation,
    response: reqwest::Response,
) -> anyhow::Result<StatusCode> {
    let status = response.status();
    let what = format!("{} answered {status}", op.name());
    let responses = format!("{}/responses", op.pointer);
    let documented = format!("{responses}/{}", status.as_u16());
    ensure!(doc.pointer(&documented).is_some(), "{what}, which is not documented");
    let documented = resolved_pointer(doc, documented)?;
    let content = doc.pointer(&format!("{documented}/content")).and_then(Value::as_object);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or_default().trim().to_string());
    let Some(content) = content else {
        let body = response.bytes().await?;
        ensure!(body.is_empty(), "{what} with a body, but none is documented");
        return Ok(status);
    };
    let content_type = content_type.with_context(|| format!("{what} without a content type"))?;
    ensure!(
        content.contains_key(&content_type),
        "{what} as {content_type}; documented: {:?}",
        content.keys().collect::<Vec<_>>()
    );
    // A stream never ends: its status and type are all there is to check.
    if content_type == "text/event-stream" {
        return Ok(status);
    }
    let text = response.text().await?;
    if content_type != "application/json" {
        return Ok(status);
    }
    let body: Value = serde_json::from_str(&text).with_context(|| format!("{what}, not JSON: {text}"))?;
    let schema = format!("{documented}/content/{}/schema", escape(&content_type));
    ensure!(doc.pointer(&schema).is_some(), "{what}: no schema for {content_type}");
    // The document as the root, so its `#/components/...` references resolve.
    let mut root = doc.clone();
    root["$schema"] = Value::from("https://json-schema.org/draft/2020-12/schema");
    root["$ref"] = Value::from(format!("#{}", fragment(&schema)));
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .should_validate_formats(true)
        .build(&root)
        .map_err(|e| anyhow::anyhow!("{what}: the schema does not compile: {e}"))?;
    let errors: Vec<String> =
        validator.iter_errors(&body).map(|e| format!("{} at {}", e, e.instance_path())).collect();
    ensure!(errors.is_empty(), "{what} with a body that does not fit {schema}: {errors:?}\n{text}");
    Ok(status)
}

/// The service's document, as served.
async fn served_document(http: &Client, service: &Service) -> anyhow::Result<Value> {
    let response = http.get(format!("{}/openapi.json", service.base)).send().await?;
    ensure!(
        response.status() == StatusCode::OK,
        "{}: GET /openapi.json answered {}",
        service.name,
        response.status()
    );
    let content_type =
        response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    ensure!(
        content_type.starts_with("application/json"),
        "{}: /openapi.json as {content_type}",
        service.name
    );
    Ok(response.json().await?)
}

/// Checks one service against its document; returns how many requests did.
async fn check_service(http: &Client, service: &Service, doc: &Value) -> anyhow::Result<usize> {
    ensure!(doc["openapi"] == "3.1.0", "{}: not an OpenAPI 3.1 document", service.name);
    let ops = operations(doc)?;
    let documented: BTreeSet<(String, String)> =
        ops.iter().map(|o| (o.method.clone(), o.path.clone())).collect();
    let routed: BTreeSet<(String, String)> =
        service.routes.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    ensure!(
        undocumented.is_empty() && unrouted.is_empty(),
        "{}: routes without an operation: {undocumented:?}; operations without a route: {unrouted:?}",
        service.name
    );

    let mut requests = 0;
    for op in &ops {
        let example = example(doc, &service.base, op)?;
        let method = Method::from_bytes(op.method.as_bytes())?;
        let request = |token: Option<&str>| {
            let mut request = http.request(method.clone(), example.url.clone());
            for (name, value) in &example.headers {
                request = request.header(name, value);
            }
            if let Some(body) = &example.body {
                request = request.json(body);
            }
            match token {
                Some(token) => request.bearer_auth(token),
                None => request,
            }
        };
        let name = format!("{}: {}", service.name, op.name());
        if example.secured {
            // Before the real request: a command refused for its token must not count.
            let status = check_answer(doc, op, request(None).send().await?).await.context(name.clone())?;
            ensure!(status == StatusCode::UNAUTHORIZED, "{name} without a token answered {status}");
            requests += 1;
        }
        let token = example.secured.then_some(service.token_for(&op.path));
        let status = check_answer(doc, op, request(token).send().await?).await.context(name.clone())?;
        ensure!(status.is_success(), "{name}: its documented example answered {status}");
        requests += 1;
    }

    // On every documented path, only the documented methods (and HEAD with GET) are served.
    let paths: BTreeSet<&str> = ops.iter().map(|o| o.path.as_str()).collect();
    for path in paths {
        let allowed: BTreeSet<&str> =
            ops.iter().filter(|o| o.path == path).map(|o| o.method.as_str()).collect();
        let Some(other) = METHODS.iter().find(|m| !allowed.contains(*m)) else { continue };
        let op = ops.iter().find(|o| o.path == path).context("a path has an operation")?;
        let url = example(doc, &service.base, op)?.url;
        let response = http
            .request(Method::from_bytes(other.as_bytes())?, url)
            .bearer_auth(&service.token)
            .send()
            .await?;
        let name = format!("{}: {other} {path}", service.name);
        ensure!(response.status() == StatusCode::METHOD_NOT_ALLOWED, "{name} answered {}", response.status());
        let allow = response.headers().get("allow").and_then(|v| v.to_str().ok()).unwrap_or_default();
        let mut served: BTreeSet<&str> = allow.split(',').map(str::trim).filter(|m| !m.is_empty()).collect();
        if allowed.contains("GET") {
            served.remove("HEAD");
        }
        ensure!(served == allowed, "{name}: the router serves {served:?} there; documented: {allowed:?}");
        requests += 1;
    }
    Ok(requests)
}

/// The workspace's root directory.
fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().map(PathBuf::from).unwrap_or_default()
}

/// The alert API's generated document, as committed.
fn alert_api_document() -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(&monitoring::api::openapi_document())? + "\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_is_served_as_documented_and_nothing_else_is_served() -> anyhow::Result<()>
{
    let fixture = Fixture::start().await?;
    let http = Client::new();
    let outcome = async {
        for service in &fixture.services {
            let doc = served_document(&http, service).await?;
            let requests = check_service(&http, service, &doc).await?;
            eprintln!("{}: {} operations, {requests} requests", service.name, operations(&doc)?.len());
        }
        anyhow::Ok(())
    }
    .await;
    fixture.stop().await?;
    outcome
}

#[test]
fn the_committed_alert_api_document_is_the_generated_one() -> anyhow::Result<()> {
    let path = workspace().join("consumers/openapi/alert-api.json");
    let generated = alert_api_document()?;
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated)?;
    }
    let committed = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(
        committed == generated,
        "{} differs from the document the alert API generates: run `UPDATE_OPENAPI=1 cargo test -p trialflow --test openapi` and commit the file",
        path.display()
    );
    Ok(())
}

#[test]
fn every_document_passes_a_foreign_openapi_validator() -> anyhow::Result<()> {
    let tool = workspace().join(".tools/openapi-validator/bin/openapi-spec-validator");
    ensure!(
        tool.is_file(),
        "{} is missing: run scripts/openapi-validator.sh (it installs openapi-spec-validator from PyPI into .tools/)",
        tool.display()
    );
    let dir = std::env::temp_dir().join(unique("openapi"));
    std::fs::create_dir_all(&dir)?;
    let documents = [
        ("site-api.json", site_api::openapi::DOCUMENT.to_string()),
        ("epro-gateway.json", epro_gateway::OPENAPI_DOCUMENT.to_string()),
        ("alert-api.json", alert_api_document()?),
    ];
    let mut outcome = Ok(());
    for (name, document) in documents {
        let file = dir.join(name);
        std::fs::write(&file, document)?;
        let run = std::process::Command::new(&tool)
            .arg(&file)
            .output()
            .with_context(|| format!("running {}", tool.display()))?;
        let said =
            format!("{}{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
        if !run.status.success() {
            outcome = Err(anyhow::anyhow!("openapi-spec-validator refuses {name}:\n{said}"));
            break;
        }
        eprint!("{said}");
    }
    std::fs::remove_dir_all(&dir)?;
    outcome
}
