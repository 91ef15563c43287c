//! The catalog: an embedded SQLite database (WAL, synchronous=FULL) of VMs, snapshots, layers,
//! operations and client request ids. It is the daemon's truth: a snapshot exists when its
//! catalog transaction has committed, and files the catalog does not name are orphans, removed
//! at start.
//!
//! Chains of layers are stored with the VM or snapshot that uses them (JSON lists of layer ids,
//! oldest first). A layer row stays while some VM or snapshot names it; [`Catalog::collect`]
//! removes the rest and returns them so that their files can be deleted after the commit.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::{Deserialize, Serialize};

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
    /// What an operation builds on went away meanwhile.
    #[error("{0}")]
    Gone(String),
    /// Failure injected by a test (see `FailPoints`).
    #[error("injected failure: {0}")]
    Injected(&'static str),
}

type Result<T> = std::result::Result<T, CatalogError>;

/// The test guest program a VM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct GuestSpec {
    /// Seed of the program's pseudo-random writes.
    pub seed: u64,
    /// Pages of its working set.
    pub working_set_pages: u64,
    /// Words written per tick.
    pub mutations_per_tick: u64,
    /// Ticks before it finishes.
    pub ticks: u64,
    /// Disk sectors written per tick.
    pub disk_sectors_per_tick: u64,
}

/// A disk of a VM or snapshot: its name, size and chain of layers (oldest first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// Name within the VM.
    pub name: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Layer ids, oldest first.
    pub chain: Vec<String>,
}

/// A VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRecord {
    /// Id (32 hex digits).
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Its program.
    pub guest: GuestSpec,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Last known state ("created", "running", "paused", "finished", "stopped", "failed").
    pub state: String,
    /// The snapshot its memory and disks are based on.
    pub current_snapshot: Option<String>,
    /// The memory layers its memory is based on (the current snapshot's chain).
    pub mem_chain: Vec<String>,
    /// Its disks.
    pub disks: Vec<DiskRecord>,
    /// Creation time.
    pub created_ms: i64,
    /// Why it failed, in state "failed".
    pub failure: Option<String>,
}

/// A snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// Id.
    pub id: String,
    /// Name, unique among the VM's snapshots.
    pub name: String,
    /// The VM it was taken of.
    pub vm_id: String,
    /// Its parent snapshot.
    pub parent_id: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time.
    pub created_ms: i64,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Its program (so that a restore knows what runs).
    pub guest: GuestSpec,
    /// Bytes of the files this snapshot added.
    pub stored_bytes: u64,
    /// How long the VM was paused.
    pub pause_us: u64,
    /// Memory layers, oldest first (the last one is this snapshot's).
    pub mem_chain: Vec<String>,
    /// Disks as of the snapshot (sealed chains).
    pub disks: Vec<DiskRecord>,
}

/// A layer file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRecord {
    /// Id (the id in the layer's header).
    pub id: String,
    /// "mem" or "disk".
    pub kind: String,
    /// File name under the data directory.
    pub file: String,
    /// Bytes on disk.
    pub bytes: u64,
}

/// A stored answer to a client request id.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    /// The RPC.
    pub method: String,
    /// Hash of the request without its request id.
    pub fingerprint: Vec<u8>,
    /// The encoded response.
    pub response: Vec<u8>,
}

/// The catalog database.
pub struct Catalog {
    conn: Mutex<Connection>,
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
";

/// Schema version this build writes and reads.
const SCHEMA_VERSION: &str = "1";

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("plain data serializes")
}

fn unjson<T: for<'a> Deserialize<'a>>(s: &str, what: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| CatalogError::Damaged(format!("{what}: {e}")))
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
            || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
}

/// A VM row: the plain columns, and the JSON ones (guest, labels, memory chain, disks) still as
/// text for [`vm_record`] to parse.
fn vm_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(VmRecord, [String; 4])> {
    Ok((
        VmRecord {
            id: r.get(0)?,
            name: r.get(1)?,
            memory_bytes: r.get::<_, i64>(2)? as u64,
            vcpus: r.get::<_, i64>(3)? as u32,
            guest: GuestSpec::default(),
            labels: BTreeMap::new(),
            state: r.get(6)?,
            current_snapshot: r.get(7)?,
            mem_chain: Vec::new(),
            disks: Vec::new(),
            created_ms: r.get(10)?,
            failure: r.get(11)?,
        },
        [r.get(4)?, r.get(5)?, r.get(8)?, r.get(9)?],
    ))
}

fn vm_record((mut vm, [guest, labels, chain, disks]): (VmRecord, [String; 4])) -> Result<VmRecord> {
    vm.guest = unjson(&guest, "vm guest")?;
    vm.labels = unjson(&labels, "vm labels")?;
    vm.mem_chain = unjson(&chain, "vm memory chain")?;
    vm.disks = unjson(&disks, "vm disks")?;
    Ok(vm)
}

const LAYER_COLUMNS: &str = "id, kind, file, bytes";

fn layer_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<LayerRecord> {
    Ok(LayerRecord {
        id: r.get(0)?,
        kind: r.get(1)?,
        file: r.get(2)?,
        bytes: r.get::<_, i64>(3)? as u64,
    })
}

const VM_COLUMNS: &str = "id, name, memory_bytes, vcpus, guest, labels, state, current_snapshot, mem_chain, disks, created_ms, failure";
const SNAPSHOT_COLUMNS: &str = "id, name, vm_id, parent_id, labels, created_ms, memory_bytes, vcpus, guest, stored_bytes, pause_us, mem_chain, disks";

fn snapshot_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(SnapshotRecord, [String; 4])> {
    Ok((
        SnapshotRecord {
            id: r.get(0)?,
            name: r.get(1)?,
            vm_id: r.get(2)?,
            parent_id: r.get(3)?,
            labels: BTreeMap::new(),
            created_ms: r.get(5)?,
            memory_bytes: r.get::<_, i64>(6)? as u64,
            vcpus: r.get::<_, i64>(7)? as u32,
            guest: GuestSpec::default(),
            stored_bytes: r.get::<_, i64>(9)? as u64,
            pause_us: r.get::<_, i64>(10)? as u64,
            mem_chain: Vec::new(),
            disks: Vec::new(),
        },
        [r.get(4)?, r.get(8)?, r.get(11)?, r.get(12)?],
    ))
}

fn snapshot_record(
    (mut s, [labels, guest, chain, disks]): (SnapshotRecord, [String; 4]),
) -> Result<SnapshotRecord> {
    s.labels = unjson(&labels, "snapshot labels")?;
    s.guest = unjson(&guest, "snapshot guest")?;
    s.mem_chain = unjson(&chain, "snapshot memory chain")?;
    s.disks = unjson(&disks, "snapshot disks")?;
    Ok(s)
}

impl Catalog {
    /// Opens (creating if needed) the catalog at `path`.
    ///
    /// # Errors
    /// SQLite's error, or [`CatalogError::Damaged`] for a catalog of another schema version.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        let version: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .optional()?;
        match version.as_deref() {
            None => {
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema', ?1)",
                    [SCHEMA_VERSION],
                )?;
            }
            Some(SCHEMA_VERSION) => {}
            Some(v) => {
                return Err(CatalogError::Damaged(format!(
                    "{} has schema version {v}; this snapd reads version {SCHEMA_VERSION}",
                    path.display()
                )));
            }
        }
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        let mut c = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut c)
    }

    /// Runs `f` in one transaction, committed if it returns `Ok`.
    ///
    /// # Errors
    /// `f`'s error or the commit's.
    pub fn transaction<T>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
        self.with(|c| {
            let tx = Tx(c.transaction()?);
            let out = f(&tx)?;
            tx.0.commit()?;
            Ok(out)
        })
    }

    /// One VM.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn vm(&self, id: &str) -> Result<Option<VmRecord>> {
        self.transaction(|tx| tx.vm(id))
    }

    /// Every VM, oldest first.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn vms(&self) -> Result<Vec<VmRecord>> {
        self.transaction(|tx| tx.vms())
    }

    /// One snapshot.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>> {
        self.transaction(|tx| tx.snapshot(id))
    }

    /// Every snapshot, oldest first.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        self.transaction(|tx| tx.snapshots())
    }

    /// One layer.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn layer(&self, id: &str) -> Result<Option<LayerRecord>> {
        self.transaction(|tx| tx.layer(id))
    }

    /// Every layer.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn layers(&self) -> Result<Vec<LayerRecord>> {
        self.transaction(|tx| tx.layers())
    }

    /// The stored answer to `request_id`.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn request(&self, request_id: &str) -> Result<Option<RequestRecord>> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT method, fingerprint, response FROM requests WHERE request_id = ?1",
                [request_id],
                |r| {
                    Ok(RequestRecord {
                        method: r.get(0)?,
                        fingerprint: r.get(1)?,
                        response: r.get(2)?,
                    })
                },
            )
            .optional()?)
        })
    }

    /// Stores (or replaces) an operation.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn put_operation(
        &self,
        id: &str,
        vm_id: &str,
        created_ms: i64,
        ended: bool,
        body: &[u8],
    ) -> Result<()> {
        self.transaction(|tx| tx.put_operation(id, vm_id, created_ms, ended, body))
    }

    /// Operations, oldest first: (body, ended).
    ///
    /// # Errors
    /// SQLite's error.
    pub fn operations(&self) -> Result<Vec<(Vec<u8>, bool)>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT body, ended FROM operations ORDER BY created_ms, id")?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? != 0)))?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }
}

/// A catalog transaction.
pub struct Tx<'c>(Transaction<'c>);

impl Tx<'_> {
    /// One VM.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn vm(&self, id: &str) -> Result<Option<VmRecord>> {
        let row = self
            .0
            .query_row(
                &format!("SELECT {VM_COLUMNS} FROM vms WHERE id = ?1"),
                [id],
                vm_from_row,
            )
            .optional()?;
        row.map(vm_record).transpose()
    }

    /// Every VM, oldest first.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn vms(&self) -> Result<Vec<VmRecord>> {
        let mut st = self.0.prepare(&format!(
            "SELECT {VM_COLUMNS} FROM vms ORDER BY created_ms, id"
        ))?;
        let rows = st.query_map([], vm_from_row)?;
        rows.map(|r| vm_record(r?)).collect()
    }

    /// Inserts a VM.
    ///
    /// # Errors
    /// [`CatalogError::NameTaken`] if its name is in use.
    pub fn insert_vm(&self, vm: &VmRecord) -> Result<()> {
        self.0
            .execute(
                &format!("INSERT INTO vms ({VM_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"),
                params![
                    vm.id,
                    vm.name,
                    vm.memory_bytes as i64,
                    i64::from(vm.vcpus),
                    json(&vm.guest),
                    json(&vm.labels),
                    vm.state,
                    vm.current_snapshot,
                    json(&vm.mem_chain),
                    json(&vm.disks),
                    vm.created_ms,
                    vm.failure,
                ],
            )
            .map_err(|e| {
                if is_unique_violation(&e) {
                    CatalogError::NameTaken(format!("a VM named {:?} exists", vm.name))
                } else {
                    e.into()
                }
            })?;
        Ok(())
    }

    /// Replaces a VM's row.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn update_vm(&self, vm: &VmRecord) -> Result<()> {
        self.0.execute(
            "UPDATE vms SET state = ?2, current_snapshot = ?3, mem_chain = ?4, disks = ?5, failure = ?6, labels = ?7 WHERE id = ?1",
            params![
                vm.id,
                vm.state,
                vm.current_snapshot,
                json(&vm.mem_chain),
                json(&vm.disks),
                vm.failure,
                json(&vm.labels),
            ],
        )?;
        Ok(())
    }

    /// Deletes a VM's row.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn delete_vm(&self, id: &str) -> Result<()> {
        self.0.execute("DELETE FROM vms WHERE id = ?1", [id])?;
        Ok(())
    }

    /// One snapshot.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>> {
        let row = self
            .0
            .query_row(
                &format!("SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE id = ?1"),
                [id],
                snapshot_from_row,
            )
            .optional()?;
        row.map(snapshot_record).transpose()
    }

    /// Every snapshot, oldest first.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        let mut st = self.0.prepare(&format!(
            "SELECT {SNAPSHOT_COLUMNS} FROM snapshots ORDER BY created_ms, id"
        ))?;
        let rows = st.query_map([], snapshot_from_row)?;
        rows.map(|r| snapshot_record(r?)).collect()
    }

    /// Inserts a snapshot.
    ///
    /// # Errors
    /// [`CatalogError::NameTaken`] if the VM has a snapshot of that name.
    pub fn insert_snapshot(&self, s: &SnapshotRecord) -> Result<()> {
        self.0
            .execute(
                &format!("INSERT INTO snapshots ({SNAPSHOT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"),
                params![
                    s.id,
                    s.name,
                    s.vm_id,
                    s.parent_id,
                    json(&s.labels),
                    s.created_ms,
                    s.memory_bytes as i64,
                    i64::from(s.vcpus),
                    json(&s.guest),
                    s.stored_bytes as i64,
                    s.pause_us as i64,
                    json(&s.mem_chain),
                    json(&s.disks),
                ],
            )
            .map_err(|e| {
                if is_unique_violation(&e) {
                    CatalogError::NameTaken(format!(
                        "VM {} already has a snapshot named {:?}",
                        s.vm_id, s.name
                    ))
                } else {
                    e.into()
                }
            })?;
        Ok(())
    }

    /// Updates a snapshot's labels, parent, pause time and memory chain.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn update_snapshot(&self, s: &SnapshotRecord) -> Result<()> {
        self.0.execute(
            "UPDATE snapshots SET labels = ?2, parent_id = ?3, pause_us = ?4, mem_chain = ?5 WHERE id = ?1",
            params![
                s.id,
                json(&s.labels),
                s.parent_id,
                s.pause_us as i64,
                json(&s.mem_chain)
            ],
        )?;
        Ok(())
    }

    /// Deletes a snapshot's row.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn delete_snapshot(&self, id: &str) -> Result<()> {
        self.0
            .execute("DELETE FROM snapshots WHERE id = ?1", [id])?;
        Ok(())
    }

    /// One layer.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn layer(&self, id: &str) -> Result<Option<LayerRecord>> {
        Ok(self
            .0
            .query_row(
                &format!("SELECT {LAYER_COLUMNS} FROM layers WHERE id = ?1"),
                [id],
                layer_from_row,
            )
            .optional()?)
    }

    /// Every layer.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn layers(&self) -> Result<Vec<LayerRecord>> {
        let mut st = self
            .0
            .prepare(&format!("SELECT {LAYER_COLUMNS} FROM layers"))?;
        let rows = st.query_map([], layer_from_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Inserts a layer.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn insert_layer(&self, l: &LayerRecord) -> Result<()> {
        self.0.execute(
            "INSERT INTO layers (id, kind, file, bytes) VALUES (?1, ?2, ?3, ?4)",
            params![l.id, l.kind, l.file, l.bytes as i64],
        )?;
        Ok(())
    }

    /// Points a layer at another file (after a merge rewrote it).
    ///
    /// # Errors
    /// SQLite's error.
    pub fn set_layer_file(&self, id: &str, file: &str, bytes: u64) -> Result<()> {
        self.0.execute(
            "UPDATE layers SET file = ?2, bytes = ?3 WHERE id = ?1",
            params![id, file, bytes as i64],
        )?;
        Ok(())
    }

    /// Records a layer's size on disk.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn set_layer_bytes(&self, id: &str, bytes: u64) -> Result<()> {
        self.0.execute(
            "UPDATE layers SET bytes = ?2 WHERE id = ?1",
            params![id, bytes as i64],
        )?;
        Ok(())
    }

    /// Removes the layers no VM or snapshot names any more; returns them (their files go after
    /// the commit).
    ///
    /// # Errors
    /// SQLite's error.
    pub fn collect(&self) -> Result<Vec<LayerRecord>> {
        let mut used = BTreeSet::new();
        for vm in self.vms()? {
            used.extend(vm.mem_chain);
            used.extend(vm.disks.into_iter().flat_map(|d| d.chain));
        }
        for s in self.snapshots()? {
            used.extend(s.mem_chain);
            used.extend(s.disks.into_iter().flat_map(|d| d.chain));
        }
        let unused: Vec<LayerRecord> = self
            .layers()?
            .into_iter()
            .filter(|l| !used.contains(&l.id))
            .collect();
        for l in &unused {
            self.0
                .execute("DELETE FROM layers WHERE id = ?1", [&l.id])?;
        }
        Ok(unused)
    }

    /// Forgets request ids answered before `before_ms` and operations that ended before it;
    /// returns how many rows went.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn prune(&self, before_ms: i64) -> Result<usize> {
        let requests = self
            .0
            .execute("DELETE FROM requests WHERE created_ms < ?1", [before_ms])?;
        let operations = self.0.execute(
            "DELETE FROM operations WHERE ended = 1 AND created_ms < ?1",
            [before_ms],
        )?;
        Ok(requests + operations)
    }

    /// Stores the answer to a request id.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn put_request(&self, request_id: &str, r: &RequestRecord, now_ms: i64) -> Result<()> {
        self.0.execute(
            "INSERT OR REPLACE INTO requests (request_id, method, fingerprint, response, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![request_id, r.method, r.fingerprint, r.response, now_ms],
        )?;
        Ok(())
    }

    /// Stores (or replaces) an operation.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn put_operation(
        &self,
        id: &str,
        vm_id: &str,
        created_ms: i64,
        ended: bool,
        body: &[u8],
    ) -> Result<()> {
        self.0.execute(
            "INSERT OR REPLACE INTO operations (id, vm_id, created_ms, ended, body) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, vm_id, created_ms, i64::from(ended), body],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(id: &str, name: &str, chain: &[&str]) -> VmRecord {
        VmRecord {
            id: id.into(),
            name: name.into(),
            memory_bytes: 1 << 24,
            vcpus: 1,
            guest: GuestSpec::default(),
            labels: BTreeMap::from([("team".into(), "a".into())]),
            state: "running".into(),
            current_snapshot: None,
            mem_chain: chain.iter().map(|s| (*s).to_string()).collect(),
            disks: Vec::new(),
            created_ms: 1,
            failure: None,
        }
    }

    fn layer(id: &str) -> LayerRecord {
        LayerRecord {
            id: id.into(),
            kind: "mem".into(),
            file: format!("layers/{id}.mlayer"),
            bytes: 10,
        }
    }

    #[test]
    fn rows_round_trip_and_unused_layers_are_collected() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(&dir.path().join("c.db")).unwrap();
        cat.transaction(|tx| {
            tx.insert_vm(&vm("v1", "one", &["a", "b"]))?;
            for id in ["a", "b", "c"] {
                tx.insert_layer(&layer(id))?;
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(cat.vm("v1").unwrap().unwrap(), vm("v1", "one", &["a", "b"]));
        let e = cat
            .transaction(|tx| tx.insert_vm(&vm("v2", "one", &[])))
            .unwrap_err();
        assert!(matches!(e, CatalogError::NameTaken(_)), "{e}");
        let freed = cat.transaction(|tx| tx.collect()).unwrap();
        assert_eq!(freed, vec![layer("c")]);
        // Reopening keeps everything.
        drop(cat);
        let cat = Catalog::open(&dir.path().join("c.db")).unwrap();
        assert_eq!(cat.layers().unwrap().len(), 2);
        assert_eq!(cat.vms().unwrap().len(), 1);
    }

    #[test]
    fn old_requests_and_ended_operations_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(&dir.path().join("c.db")).unwrap();
        let r = RequestRecord {
            method: "CreateVm".into(),
            fingerprint: vec![1],
            response: vec![2],
        };
        cat.transaction(|tx| {
            tx.put_request("old", &r, 10)?;
            tx.put_request("new", &r, 1000)?;
            tx.put_operation("done", "vm", 10, true, b"x")?;
            tx.put_operation("running", "vm", 10, false, b"y")
        })
        .unwrap();
        assert_eq!(cat.transaction(|tx| tx.prune(500)).unwrap(), 2);
        assert!(cat.request("old").unwrap().is_none());
        assert!(cat.request("new").unwrap().is_some());
        assert_eq!(
            cat.operations().unwrap().len(),
            1,
            "a running operation stays"
        );
    }

    #[test]
    fn a_failed_transaction_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(&dir.path().join("c.db")).unwrap();
        let r: Result<()> = cat.transaction(|tx| {
            tx.insert_vm(&vm("v1", "one", &[]))?;
            Err(CatalogError::Injected("test"))
        });
        assert!(r.is_err());
        assert!(cat.vms().unwrap().is_empty());
    }
}
