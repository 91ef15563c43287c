//! The catalog: an embedded SQLite database (WAL, synchronous=FULL) of VMs, snapshots, layers,
//! operations and client request ids. It is the daemon's truth about what exists: a snapshot
//! exists when its catalog transaction has committed.
//!
//! Chains of layers are stored with the VM or snapshot that uses them (JSON lists of layer ids,
//! oldest first). A layer row stays while some VM or snapshot names it; [`Tx::collect`] removes
//! the rest and returns them so that their files can be deleted after the commit.
//!
//! Every write transaction increments the catalog's generation (a counter in the `meta` table)
//! and, once committed, records it through a [`CommitMark`] outside the database. A catalog
//! found at an older generation than the mark has lost committed transactions (a removed or
//! damaged `catalog.db-wal`): the data directory refuses to start on it instead of reading
//! the missing snapshots as never having existed (see [`crate::store`]).

mod records;
mod tx;

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension};

pub use records::{
    DiskRecord, FillingRecord, GuestSpec, LayerKind, LayerRecord, RequestRecord, SnapshotRecord,
    VmRecord, VmStatus,
};
pub use tx::Tx;

/// Catalog failures.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// SQLite refused or failed.
    #[error("catalog: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A stored value does not parse.
    #[error("catalog: damaged row: {0}")]
    Damaged(String),
    /// A unique name is taken.
    #[error("{0}")]
    NameTaken(String),
    /// Failure injected by a test (see `FailPoints`).
    #[error("injected failure: {0}")]
    Injected(&'static str),
    /// What an operation checked before its transaction changed meanwhile: retry it.
    #[error("{0}")]
    Changed(String),
}

type Result<T> = std::result::Result<T, CatalogError>;

/// Where the generation of each committed write transaction is recorded, outside the database.
pub trait CommitMark: Send + Sync {
    /// Records that the catalog has committed `generation`.
    fn committed(&self, generation: u64);
}

/// The catalog database.
pub struct Catalog {
    conn: Mutex<Connection>,
    mark: Option<Box<dyn CommitMark>>,
    /// Where transaction times go, once the daemon has set it.
    metrics: std::sync::OnceLock<std::sync::Arc<crate::metrics::Metrics>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vms (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    memory_bytes INTEGER NOT NULL,
    vcpus INTEGER NOT NULL,
    guest TEXT NOT NULL,
    labels TEXT NOT NULL,
    state TEXT NOT NULL,
    current_snapshot TEXT,
    mem_chain TEXT NOT NULL,
    disks TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    failure TEXT
);
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    vm_id TEXT NOT NULL,
    parent_id TEXT,
    labels TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    memory_bytes INTEGER NOT NULL,
    vcpus INTEGER NOT NULL,
    guest TEXT NOT NULL,
    stored_bytes INTEGER NOT NULL,
    pause_us INTEGER NOT NULL,
    mem_chain TEXT NOT NULL,
    disks TEXT NOT NULL,
    UNIQUE (vm_id, name)
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots (parent_id);
CREATE TABLE IF NOT EXISTS layers (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    file TEXT NOT NULL,
    bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY,
    method TEXT NOT NULL,
    fingerprint BLOB NOT NULL,
    response BLOB NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS operations (
    id TEXT PRIMARY KEY,
    vm_id TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    ended INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS filling (
    layer_id TEXT PRIMARY KEY,
    remote TEXT NOT NULL,
    what TEXT NOT NULL,
    blocks BLOB NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('generation', '0');
";

/// Schema version this build writes and reads (1 had no generation counter, 2 no `filling`
/// table; both are upgraded). An older snapd refuses a catalog of this version: it would read
/// layers whose blocks are still arriving as damaged.
const SCHEMA_VERSION: &str = "3";

impl Catalog {
    /// Opens (creating if needed) the catalog at `path`. `mark`, if given, is told the
    /// generation of every write transaction once it has committed.
    ///
    /// # Errors
    /// SQLite's error (for a file that is not a database: "file is not a database"), or
    /// [`CatalogError::Damaged`] for a catalog of a newer schema version.
    pub fn open(path: &Path, mark: Option<Box<dyn CommitMark>>) -> Result<Self> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        let version: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .optional()?;
        match version.as_deref() {
            None | Some("1" | "2") => {
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', ?1)",
                    [SCHEMA_VERSION],
                )?;
            }
            Some(SCHEMA_VERSION) => {}
            Some(v) => {
                return Err(CatalogError::Damaged(format!(
                    "{} has schema version {v}; this snapd reads versions 1 to {SCHEMA_VERSION}",
                    path.display()
                )));
            }
        }
        Ok(Self {
            conn: Mutex::new(conn),
            mark,
            metrics: std::sync::OnceLock::new(),
        })
    }

    /// The generation of the catalog at `path`, read without changing anything (a read-only
    /// connection neither checkpoints nor removes the WAL, so a catalog found wanting is left
    /// exactly as it was): 0 for one that holds nothing, None for one without a generation
    /// (written by an older snapd).
    ///
    /// # Errors
    /// SQLite's error, e.g. "file is not a database".
    pub fn peek_generation(path: &Path) -> Result<Option<u64>> {
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let has_meta: bool = conn.query_row(
            "SELECT count(*) > 0 FROM sqlite_master WHERE name = 'meta'",
            [],
            |r| r.get(0),
        )?;
        if !has_meta {
            // Nothing was ever committed to it.
            return Ok(Some(0));
        }
        let text: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'generation'", [], |r| {
                r.get(0)
            })
            .optional()?;
        text.map(|t| {
            t.parse()
                .map_err(|_| CatalogError::Damaged(format!("generation {t:?}")))
        })
        .transpose()
    }

    /// Times every transaction from now on into `metrics`.
    pub fn set_metrics(&self, metrics: std::sync::Arc<crate::metrics::Metrics>) {
        let _ = self.metrics.set(metrics);
    }

    /// Runs `f` on the connection (a transaction: timed from when the connection is had).
    fn with<T>(&self, write: bool, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        let mut c = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let started = std::time::Instant::now();
        let out = f(&mut c);
        if let Some(m) = self.metrics.get() {
            m.catalog_transaction(write, started.elapsed());
        }
        out
    }

    /// Runs `f` in one read transaction: it sees one consistent state of the catalog.
    ///
    /// # Errors
    /// `f`'s error or SQLite's.
    pub fn read<T>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
        self.with(false, |c| {
            let tx = Tx::new(c.transaction()?);
            let out = f(&tx)?;
            tx.finish()?;
            Ok(out)
        })
    }

    /// Runs `f` in one write transaction, committed (with the next generation) if it returns
    /// `Ok`; nothing of it is kept otherwise.
    ///
    /// # Errors
    /// `f`'s error or the commit's.
    pub fn write<T>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
        let (out, generation) = self.with(true, |c| {
            let tx =
                Tx::new(c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?);
            let out = f(&tx)?;
            let generation = tx.bump_generation()?;
            tx.finish()?;
            Ok((out, generation))
        })?;
        if let Some(mark) = &self.mark {
            mark.committed(generation);
        }
        Ok(out)
    }

    /// The generation of the last committed write transaction (0 for a new catalog).
    ///
    /// # Errors
    /// SQLite's error.
    pub fn generation(&self) -> Result<u64> {
        self.read(|tx| tx.generation())
    }
}

#[cfg(test)]
mod tests;
