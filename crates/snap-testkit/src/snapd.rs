//! The real snapd binary on a data directory of its own, for the end-to-end tests.

use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use snap_api::v1::snapd_client::SnapdClient;
use tonic::transport::Channel;

use crate::fs::{dir_bytes, files_in};

/// A snapd process on a data directory of its own; killed with SIGKILL when dropped. Its log
/// goes to a file beside the data directory, shown when it fails to start.
pub struct Snapd {
    bin: PathBuf,
    args: Vec<String>,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Snapd {
    /// snapd (the binary `bin`, e.g. `env!("CARGO_BIN_EXE_snapd")`) on a new data directory,
    /// with `args` besides `--data-dir` (and `--frame-kib 64`); not started yet.
    ///
    /// # Panics
    /// If the temporary directory cannot be made.
    pub fn new(bin: &str, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        Self::with_dir(bin, dir.path().join("data"), dir, args)
    }

    /// As [`Snapd::new`], with the data directory at `data` (e.g. on a small filesystem).
    ///
    /// # Panics
    /// If the temporary directory cannot be made.
    pub fn at(bin: &str, data: &Path, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        Self::with_dir(bin, data.to_path_buf(), dir, args)
    }

    fn with_dir(bin: &str, data: PathBuf, dir: tempfile::TempDir, args: &[&str]) -> Self {
        let mut all = vec!["--frame-kib".to_string(), "64".to_string()];
        all.extend(args.iter().map(|a| (*a).to_string()));
        Self {
            bin: bin.into(),
            args: all,
            data,
            log: dir.path().join("snapd.log"),
            child: None,
            _dir: dir,
        }
    }

    /// The data directory.
    pub fn data(&self) -> &Path {
        &self.data
    }

    /// The daemon's socket.
    pub fn socket(&self) -> PathBuf {
        self.data.join("snapd.sock")
    }

    /// Starts the daemon with `SNAPD_FAILPOINTS=failpoints` and waits until it listens.
    ///
    /// # Panics
    /// If it exits or does not come up (with its log).
    pub fn start(&mut self, failpoints: &str) {
        if let Err(log) = self.try_start(failpoints, &[]) {
            panic!("snapd did not come up; its log:\n{log}");
        }
    }

    /// Starts the daemon with `extra` arguments; Err with its log if it exits before it listens
    /// (a refused start).
    ///
    /// # Errors
    /// The daemon's log.
    ///
    /// # Panics
    /// If it cannot be run, or neither listens nor exits within [`crate::TIMEOUT`].
    pub fn try_start(&mut self, failpoints: &str, extra: &[&str]) -> Result<(), String> {
        let log = std::fs::File::create(&self.log).expect("the daemon's log file");

        let mut command = Command::new(&self.bin);
        command
            .arg("--data-dir")
            .arg(&self.data)
            .args(&self.args)
            .args(extra)
            .env("SNAPD_FAILPOINTS", failpoints)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: the closure runs in the child between fork and exec and only calls prctl,
        // which is async-signal-safe: a daemon dies with the test that started it.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().expect("starting snapd");
        let deadline = Instant::now() + crate::TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("polling snapd") {
                return Err(format!("(exited: {status})\n{}", self.log()));
            }
            // Ready once the socket answers from this child: a daemon that is refused never
            // binds, and another daemon's (or a dead one's) socket may be there already.
            if UnixStream::connect(self.socket()).is_ok_and(|s| peer_pid(&s) == Some(child.id())) {
                self.child = Some(child);
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "snapd did not come up:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// What the daemon has logged (since it was last started).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A client of the running daemon.
    ///
    /// # Panics
    /// If it cannot connect.
    pub async fn client(&self) -> SnapdClient<Channel> {
        snap_api::client::connect(self.socket().to_str().expect("a UTF-8 path"))
            .await
            .expect("connecting to snapd")
    }

    /// Kills the daemon with SIGKILL (no cleanup of any kind) and waits for it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the daemon with SIGTERM and waits for it.
    ///
    /// # Panics
    /// If it does not stop within 30 s.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: sending a signal to our own child process, which has not been waited for.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while c.try_wait().expect("polling snapd").is_none() {
                assert!(Instant::now() < deadline, "snapd did not stop on SIGTERM");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Stops the daemon with SIGTERM and starts it again.
    pub fn restart(&mut self, failpoints: &str) {
        self.stop();
        self.start(failpoints);
    }

    /// Files under `layers/`, sorted.
    pub fn layer_files(&self) -> Vec<String> {
        files_in(&self.data.join("layers"))
    }

    /// Files under `states/`, sorted.
    pub fn state_files(&self) -> Vec<String> {
        files_in(&self.data.join("states"))
    }

    /// Bytes of every file under `layers/` and `states/`.
    pub fn stored_bytes(&self) -> u64 {
        dir_bytes(&self.data.join("layers")) + dir_bytes(&self.data.join("states"))
    }

    /// The layer files the catalog names, sorted (read with SQLite directly, beside the daemon:
    /// WAL allows readers).
    ///
    /// # Panics
    /// If the catalog cannot be read.
    pub fn catalog_layer_files(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .query("SELECT file FROM layers")
            .into_iter()
            .map(|f| f.trim_start_matches("layers/").to_string())
            .collect();
        v.sort();
        v
    }

    /// The files under `states/` the catalog's snapshots may have (their state files), sorted.
    ///
    /// # Panics
    /// If the catalog cannot be read.
    pub fn catalog_state_files(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .query("SELECT id FROM snapshots")
            .into_iter()
            .map(|id| format!("{id}.state"))
            .collect();
        v.sort();
        v
    }

    /// Asserts that every file under `layers/` and `states/` is one the catalog names (working
    /// sets of existing snapshots included), and every layer the catalog names has its file.
    /// Files of atomic writes in progress (`.<name>.<pid>.<n>.tmp`) are not counted.
    ///
    /// # Panics
    /// On the first difference, naming it.
    pub fn assert_files_match_catalog(&self, what: &str) {
        let done = |files: Vec<String>| -> Vec<String> {
            files.into_iter().filter(|f| !f.starts_with('.')).collect()
        };
        assert_eq!(
            done(self.layer_files()),
            self.catalog_layer_files(),
            "{what}: layer files differ from the catalog's"
        );
        let states: Vec<String> = done(self.state_files())
            .into_iter()
            .filter(|f| !f.ends_with(".wset"))
            .collect();
        assert_eq!(
            states,
            self.catalog_state_files(),
            "{what}: state files differ from the catalog's snapshots"
        );
        // A recording that ends as its snapshot is deleted removes its file right after writing
        // it (see `snapshot::WorkingSetFile`): such a file may be seen for that instant.
        let stray = || {
            let snapshots = self.query("SELECT id FROM snapshots");
            done(self.state_files())
                .into_iter()
                .filter(|f| f.ends_with(".wset"))
                .filter(|f| !snapshots.iter().any(|s| s == f.trim_end_matches(".wset")))
                .collect::<Vec<_>>()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while !stray().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let left = stray();
        assert!(
            left.is_empty(),
            "{what}: working sets of snapshots that do not exist: {left:?}"
        );
    }

    /// The disk layers whose blocks are still arriving from a remote (the catalog's `filling`
    /// rows), sorted.
    ///
    /// # Panics
    /// If the catalog cannot be read.
    pub fn filling_layers(&self) -> Vec<String> {
        let mut v = self.query("SELECT layer_id FROM filling");
        v.sort();
        v
    }

    /// The file of layer `id` as the catalog names it.
    ///
    /// # Panics
    /// If the catalog does not name the layer.
    pub fn layer_path(&self, id: &str) -> PathBuf {
        let file = self
            .query(&format!("SELECT file FROM layers WHERE id = '{id}'"))
            .pop()
            .unwrap_or_else(|| panic!("the catalog has no layer {id}"));
        self.data.join(file)
    }

    fn query(&self, sql: &str) -> Vec<String> {
        let c = rusqlite::Connection::open_with_flags(
            self.data.join("catalog.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .expect("opening the catalog");
        let mut st = c.prepare(sql).expect("a query of the catalog");
        st.query_map([], |r| r.get::<_, String>(0))
            .expect("reading the catalog")
            .collect::<Result<_, _>>()
            .expect("reading the catalog")
    }
}

/// The process id of the server at the other end of a Unix socket connection.
fn peer_pid(s: &UnixStream) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a ucred on our stack, for a
    // socket `s` owns.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &raw mut len,
        )
    };
    (rc == 0).then_some(cred.pid as u32)
}

impl Drop for Snapd {
    fn drop(&mut self) {
        self.kill9();
    }
}
