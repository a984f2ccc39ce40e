//! Certificates made with `openssl` for the TLS tests: a CA, a server key and certificate signed
//! by it for 127.0.0.1 and localhost, and a second CA that signed nothing (a client trusting it
//! must refuse the server). Everything lives in a temp dir removed on drop.

use std::path::{Path, PathBuf};
use std::process::Stdio;

/// A temp dir removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The certificates of one test.
#[derive(Debug)]
pub struct Certificates {
    /// The CA clients trust (PEM).
    pub ca: PathBuf,
    /// The server's unencrypted PKCS#8 key (PEM).
    pub server_key: PathBuf,
    /// The server's certificate, signed by [`Certificates::ca`], naming 127.0.0.1 and localhost.
    pub server_crt: PathBuf,
    /// The key, then the certificate, in one PEM file (Kafka's PEM key store).
    pub server_pem: PathBuf,
    /// A CA that signed nothing.
    pub other_ca: PathBuf,
    pub dir: TempDir,
}

pub(crate) fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let output = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| anyhow::anyhow!("running openssl (scripts/build-deps.sh installs it): {e}"))?;
    anyhow::ensure!(
        output.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

impl Certificates {
    /// Makes a CA, a server certificate signed by it (valid two days) and another CA.
    pub fn generate() -> anyhow::Result<Self> {
        let dir = TempDir::new("trialflow-tls")?;
        let d = dir.path();
        for ca in ["ca", "other-ca"] {
            let subject = format!("/CN=trialflow test {ca}");
            let (key, pem) = (format!("{ca}.key"), format!("{ca}.pem"));
            let args = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", &subject];
            openssl(d, &[&args[..], &["-keyout", &key, "-out", &pem]].concat())?;
        }
        let args = ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost"];
        openssl(d, &[&args[..], &["-keyout", "server.key", "-out", "server.csr"]].concat())?;
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )?;
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "server.ext",
                "-out",
                "server.crt",
            ],
        )?;
        let pem =
            std::fs::read_to_string(d.join("server.key"))? + &std::fs::read_to_string(d.join("server.crt"))?;
        std::fs::write(d.join("server.pem"), pem)?;
        Ok(Self {
            ca: d.join("ca.pem"),
            server_key: d.join("server.key"),
            server_crt: d.join("server.crt"),
            server_pem: d.join("server.pem"),
            other_ca: d.join("other-ca.pem"),
            dir,
        })
    }
}
