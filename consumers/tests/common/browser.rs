//! Headless Chromium for the page tests (the inbox, the dashboard), driven over WebDriver:
//! Debian's chromium and chromedriver (`scripts/chromium.sh`), nothing downloaded at run time.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use fantoccini::{Client, ClientBuilder};
use serde_json::{Value, json};
use trialflow_testkit::wait_until;

/// An executable on PATH (or at `$var`).
pub(crate) fn executable(var: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(var).map(PathBuf::from).filter(|p| p.is_file()) {
        return Some(path);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).flat_map(|dir| names.iter().map(move |n| dir.join(n))).find(|p| p.is_file())
}

/// Chromium and chromedriver, or why a page test cannot run.
pub(crate) fn tools(what: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (Some(chromium), Some(chromedriver)) = (
        executable("CHROMIUM", &["chromium", "chromium-browser"]),
        executable("CHROMEDRIVER", &["chromedriver"]),
    ) else {
        bail!(
            "{what} needs headless Chromium and chromedriver: run scripts/chromium.sh (installs Debian's \
             chromium and chromium-driver)"
        );
    };
    Ok((chromium, chromedriver))
}

/// chromedriver on a free port, stopped when dropped.
pub(crate) struct Driver {
    url: String,
    process: tokio::process::Child,
}

impl Driver {
    pub(crate) async fn start(chromedriver: &Path) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let process = tokio::process::Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", chromedriver.display()))?;
        let url = format!("http://127.0.0.1:{port}");
        let status = format!("{url}/status");
        let http = reqwest::Client::new();
        wait_until("chromedriver is ready", Duration::from_secs(20), || async {
            let Ok(response) = http.get(&status).send().await else { return Ok(false) };
            Ok(response.json::<Value>().await.is_ok_and(|s| s["value"]["ready"] == true))
        })
        .await?;
        Ok(Self { url, process })
    }

    pub(crate) async fn stop(mut self) {
        let _ = self.process.kill().await;
    }
}

pub(crate) async fn headless_chromium(driver: &Driver, chromium: &Path) -> anyhow::Result<Client> {
    let options = json!({
        "binary": chromium.to_string_lossy(),
        "args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
            "--window-size=1280,900",
        ],
    });
    let mut capabilities = serde_json::Map::new();
    capabilities.insert("browserName".into(), json!("chrome"));
    capabilities.insert("goog:chromeOptions".into(), options);
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let mut builder = ClientBuilder::new(connector);
    let session = builder.capabilities(capabilities).connect(&driver.url);
    Ok(tokio::time::timeout(Duration::from_secs(60), session).await.context("Chromium did not start")??)
}
