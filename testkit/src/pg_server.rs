//! A private PostgreSQL 15 server for one test, started from the machine's binaries (`PG_BIN`,
//! default `/usr/lib/postgresql/15/bin`, as `make up`) on a free loopback port, with TLS on and
//! plain TCP refused: what a test of `sslmode=verify-full` needs without touching the local
//! stack's server. It runs as the `postgres` user when the test runs as root (PostgreSQL refuses
//! root), its data in a temp dir; it is stopped and removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context;

use crate::tls::{Certificates, TempDir};

/// A running server; stopped on drop.
#[derive(Debug)]
pub struct PgServer {
    port: u16,
    data: PathBuf,
    bin: PathBuf,
    dir: TempDir,
}

fn bin() -> PathBuf {
    PathBuf::from(std::env::var("PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".to_string()))
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// `program args` as the `postgres` user when we are root.
fn as_postgres(program: &Path, args: &[&str]) -> Command {
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program).args(args);
        command
    } else {
        let mut command = Command::new(program);
        command.args(args);
        command
    }
}

fn run(mut command: Command, what: &str) -> anyhow::Result<()> {
    let output = command.stdin(Stdio::null()).output().with_context(|| format!("{what}: cannot run"))?;
    anyhow::ensure!(
        output.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

impl PgServer {
    /// Initialises and starts a server whose TCP connections must use TLS with `certs`' server
    /// certificate (`hostssl ... trust`, `hostnossl ... reject`).
    pub fn start_tls(certs: &Certificates) -> anyhow::Result<Self> {
        let bin = bin();
        anyhow::ensure!(
            bin.join("initdb").exists(),
            "{} has no initdb: PostgreSQL 15's server is needed (`make up` installs it)",
            bin.display()
        );
        let dir = TempDir::new("trialflow-pg")?;
        let data = dir.path().join("data");
        let (crt, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
        std::fs::copy(&certs.server_crt, &crt)?;
        std::fs::copy(&certs.server_key, &key)?;
        if is_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.args(["-R", "postgres:postgres"]).arg(dir.path());
                    c
                },
                "chown",
            )?;
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
        let data_arg = data.display().to_string();
        run(
            as_postgres(
                &bin.join("initdb"),
                &["-D", &data_arg, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            ),
            "initdb",
        )?;
        let port = free_port()?;
        let settings = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nssl = on\n\
             ssl_cert_file = '{}'\nssl_key_file = '{}'\nfsync = off\n",
            dir.path().display(),
            crt.display(),
            key.display()
        );
        append(&data.join("postgresql.conf"), &settings)?;
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
        )?;
        let log = dir.path().join("server.log").display().to_string();
        run(
            as_postgres(&bin.join("pg_ctl"), &["-D", &data_arg, "-l", &log, "-w", "-t", "60", "start"]),
            "pg_ctl start",
        )
        .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;
        Ok(Self { port, data, bin, dir })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL of the `postgres` database with `params` (e.g. `sslmode=verify-full&sslrootcert=...`).
    pub fn url(&self, params: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres?{params}", self.port)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

fn append(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().append(true).open(path)?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.data.display().to_string();
        let mut stop = as_postgres(&self.bin.join("pg_ctl"), &["-D", &data, "-m", "immediate", "-w", "stop"]);
        let _ = stop.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}
