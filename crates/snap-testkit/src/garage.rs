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

/// A random hex string of `n` digits.
fn hex(n: usize) -> String {
    let mut s = String::new();
    while s.len() < n {
        s.push_str(&snap_core::Id::random().to_string());
    }
    s.truncate(n);
    s
}

/// One node's configuration: its directory, ports and secret.
struct NodeConfig {
    path: PathBuf,
    rpc: u16,
    s3: u16,
}

fn write_config(dir: &Path, replication: u32, rpc_secret: &str) -> NodeConfig {
    let (rpc, s3, admin) = (free_port(), free_port(), free_port());
    let config = format!(
        "metadata_dir = \"{meta}\"\n\
         data_dir = \"{data}\"\n\
         db_engine = \"lmdb\"\n\
         replication_factor = {replication}\n\
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
        meta = dir.join("meta").display(),
        data = dir.join("data").display(),
        admin_token = hex(32),
    );
    let path = dir.join("garage.toml");
    std::fs::write(&path, config).expect("Garage's configuration");
    NodeConfig { path, rpc, s3 }
}

fn spawn(dir: &Path, config: &Path, args: &[&str], env: &[(&str, &str)]) -> Child {
    let log = std::fs::File::create(dir.join("garage.log")).expect("Garage's log");
    let mut cmd = Command::new(garage_binary().expect("a garage binary"));
    cmd.arg("-c")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "garage=warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("the log"))
        .stderr(log);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("starting garage")
}

/// Runs a `garage` admin command against the node configured by `config`; returns its output.
fn admin(config: &Path, args: &[&str]) -> String {
    let out = Command::new(garage_binary().expect("a garage binary"))
        .arg("-c")
        .arg(config)
        .args(args)
        .output()
        .expect("running garage");
    assert!(
        out.status.success(),
        "garage {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Garage {
    /// Starts a single-node Garage with bucket [`BUCKET`] and waits until its S3 port answers.
    ///
    /// # Panics
    /// If Garage cannot be started or does not come up within a minute (with its log).
    #[must_use]
    pub fn single_node() -> Self {
        let dir = tempfile::tempdir().expect("a directory for Garage");
        let node = write_config(dir.path(), 1, &hex(64));
        let access_key = format!("GK{}", hex(24));
        let secret_key = hex(64);
        let child = spawn(
            dir.path(),
            &node.path,
            &["server", "--single-node", "--default-bucket"],
            &[
                ("GARAGE_DEFAULT_ACCESS_KEY", &access_key),
                ("GARAGE_DEFAULT_SECRET_KEY", &secret_key),
                ("GARAGE_DEFAULT_BUCKET", BUCKET),
            ],
        );
        let mut g = Self {
            dir,
            child: Some(child),
            endpoint: format!("http://127.0.0.1:{}", node.s3),
            access_key,
            secret_key,
        };
        g.wait_listening(node.s3);
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

    /// A plain S3 client of its bucket (for tests that write into the bucket behind snapd's
    /// back, and for baselines).
    ///
    /// # Panics
    /// If the client cannot be built.
    #[must_use]
    pub fn raw_store(&self) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_virtual_hosted_style_request(false)
            .with_bucket_name(BUCKET)
            .with_region(REGION)
            .with_access_key_id(&self.access_key)
            .with_secret_access_key(&self.secret_key)
            .build()
            .expect("an S3 client")
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

/// A Garage cluster of three nodes with replication factor 3 (each object on every node;
/// reads and writes need two of them), bucket [`BUCKET`] and one key. Clients use node 0's S3
/// endpoint; the fault tests kill the others.
pub struct GarageCluster {
    /// The nodes (node 0 first).
    pub nodes: Vec<Garage>,
}

impl GarageCluster {
    /// Starts three nodes, connects them, lays them out in one zone, makes the bucket and the
    /// key, and waits until node 0's S3 endpoint serves the bucket.
    ///
    /// # Panics
    /// If a node or an admin command fails.
    #[must_use]
    pub fn three_nodes() -> Self {
        let rpc_secret = hex(64);
        let access_key = format!("GK{}", hex(24));
        let secret_key = hex(64);
        let mut nodes = Vec::new();
        let mut configs = Vec::new();
        for _ in 0..3 {
            let dir = tempfile::tempdir().expect("a directory for Garage");
            let node = write_config(dir.path(), 3, &rpc_secret);
            let child = spawn(dir.path(), &node.path, &["server"], &[]);
            let mut g = Garage {
                dir,
                child: Some(child),
                endpoint: format!("http://127.0.0.1:{}", node.s3),
                access_key: access_key.clone(),
                secret_key: secret_key.clone(),
            };
            g.wait_listening(node.rpc);
            nodes.push(g);
            configs.push(node);
        }
        let first = &configs[0].path;
        let ids: Vec<String> = configs
            .iter()
            .map(|c| admin(&c.path, &["node", "id", "-q"]).trim().to_string())
            .collect();
        for id in &ids[1..] {
            admin(first, &["node", "connect", id]);
        }
        for id in &ids {
            let short = id.split('@').next().unwrap_or(id);
            admin(first, &["layout", "assign", "-z", "dc1", "-c", "1G", short]);
        }
        admin(first, &["layout", "apply", "--version", "1"]);
        admin(
            first,
            &[
                "key",
                "import",
                "--yes",
                "-n",
                "tests",
                &access_key,
                &secret_key,
            ],
        );
        admin(first, &["bucket", "create", BUCKET]);
        admin(
            first,
            &[
                "bucket",
                "allow",
                "--read",
                "--write",
                "--owner",
                BUCKET,
                "--key",
                &access_key,
            ],
        );
        let cluster = Self { nodes };
        cluster.wait_serving();
        cluster
    }

    /// Waits until a write to the bucket through node 0 succeeds (the layout has spread). Runs
    /// on a thread of its own, so that async tests may call it.
    fn wait_serving(&self) {
        std::thread::scope(|s| {
            s.spawn(|| self.poll_serving())
                .join()
                .expect("waiting for the Garage cluster");
        });
    }

    fn poll_serving(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let g = &self.nodes[0];
        let store = g.raw_store();
        loop {
            use object_store::ObjectStoreExt;
            let put = runtime.block_on(store.put(
                &object_store::path::Path::from("ready"),
                object_store::PutPayload::from_static(b"ready"),
            ));
            if put.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the Garage cluster never served the bucket: {put:?}\n{}",
                g.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The remote URL of the bucket under `prefix`, through node 0.
    #[must_use]
    pub fn url(&self, prefix: &str) -> String {
        self.nodes[0].url(prefix)
    }
}
