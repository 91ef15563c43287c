//! Garage, the S3-compatible object store the remote-store tests run against: a real
//! `garage server` on loopback ports in a temporary directory, killed when dropped.
//!
//! [`Garage::single_node`] starts `garage server --single-node --default-bucket`, which lays out
//! one node and makes one bucket and one key from the `GARAGE_DEFAULT_*` variables. Tests that
//! need it call [`garage_available`] first: without a `garage` binary on the PATH they print
//! `SKIP <test>: ...`, unless `SNAP_REQUIRE_GARAGE=1` (which `.ci/run` sets once it has
//! installed Garage) makes that a failure.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// The bucket every Garage of these tests has.
pub const BUCKET: &str = "snapshots";
/// The region Garage signs with.
pub const REGION: &str = "garage";

/// Whether a `garage` binary can be run. Prints `SKIP <test>: <reason>` when not, or panics
/// when `SNAP_REQUIRE_GARAGE=1` demands it.
pub fn garage_available(test: &str) -> bool {
    match garage_binary() {
        Some(_) => true,
        None => {
            assert!(
                std::env::var("SNAP_REQUIRE_GARAGE").as_deref() != Ok("1"),
                "{test}: SNAP_REQUIRE_GARAGE=1 but no garage binary is on the PATH"
            );
            println!("SKIP {test}: no garage binary on the PATH (cargo install garage)");
            false
        }
    }
}

fn garage_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("garage"))
        .find(|p| p.is_file())
}

/// One Garage server (a node of its own), with its bucket and key.
pub struct Garage {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// `http://127.0.0.1:<port>`: the S3 API.
    pub endpoint: String,
    /// The key's id.
    pub access_key: String,
    /// The key's secret.
    pub secret_key: String,
}

impl Garage {
    /// Starts a single-node Garage with bucket [`BUCKET`] and waits until its S3 port answers.
    ///
    /// # Panics
    /// If Garage cannot be started or does not come up within a minute (with its log).
    #[must_use]
    pub fn single_node() -> Self {
        let dir = tempfile::tempdir().expect("a directory for Garage");
        let (rpc, s3, admin) = (free_port(), free_port(), free_port());
        let secret = |n: usize| {
            let mut s = String::new();
            while s.len() < n {
                s.push_str(&snap_core::Id::random().to_string());
            }
            s.truncate(n);
            s
        };
        let config = format!(
            "metadata_dir = \"{meta}\"\n\
             data_dir = \"{data}\"\n\
             db_engine = \"sqlite\"\n\
             replication_factor = 1\n\
             rpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_public_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_secret = \"{rpc_secret}\"\n\
             [s3_api]\n\
             s3_region = \"{REGION}\"\n\
             api_bind_addr = \"127.0.0.1:{s3}\"\n\
             root_domain = \".s3.garage.localhost\"\n\
             [admin]\n\
             api_bind_addr = \"127.0.0.1:{admin}\"\n\
             admin_token = \"{admin_token}\"\n",
            meta = dir.path().join("meta").display(),
            data = dir.path().join("data").display(),
            rpc_secret = secret(64),
            admin_token = secret(32),
        );
        let config_path = dir.path().join("garage.toml");
        std::fs::write(&config_path, config).expect("Garage's configuration");
        let access_key = format!("GK{}", secret(24));
        let secret_key = secret(64);
        let log = std::fs::File::create(dir.path().join("garage.log")).expect("Garage's log");
        let child = Command::new(garage_binary().expect("a garage binary"))
            .arg("-c")
            .arg(&config_path)
            .args(["server", "--single-node", "--default-bucket"])
            .env("GARAGE_DEFAULT_ACCESS_KEY", &access_key)
            .env("GARAGE_DEFAULT_SECRET_KEY", &secret_key)
            .env("GARAGE_DEFAULT_BUCKET", BUCKET)
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("the log"))
            .stderr(log)
            .spawn()
            .expect("starting garage");
        let mut g = Self {
            dir,
            child: Some(child),
            endpoint: format!("http://127.0.0.1:{s3}"),
            access_key,
            secret_key,
        };
        g.wait_listening(s3);
        g
    }

    fn wait_listening(&mut self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("garage exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "garage did not listen on {port}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Garage's log so far.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("garage.log")).unwrap_or_default()
    }

    /// Where its data lives.
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The remote URL of its bucket under `prefix`, as snapd takes it.
    #[must_use]
    pub fn url(&self, prefix: &str) -> String {
        format!("{}/{BUCKET}/{prefix}?region={REGION}", self.endpoint)
    }

    /// Kills the server with SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.kill();
    }
}
