//! One catalog transaction and what it reads and writes.

use std::collections::BTreeSet;
use std::str::FromStr;

use rusqlite::{OptionalExtension, Transaction, params};
use serde::{Deserialize, Serialize};

use super::records::{
    FillingRecord, LayerKind, LayerRecord, RequestRecord, SnapshotRecord, VmRecord, VmStatus,
};
use super::{CatalogError, Result};
use crate::ids::{LayerId, OpId, SnapshotId, VmId};

/// A catalog transaction (see [`super::Catalog::read`] and [`super::Catalog::write`]).
pub struct Tx<'c>(Transaction<'c>);

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("plain data serializes")
}

fn unjson<T: for<'a> Deserialize<'a>>(s: &str, what: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| CatalogError::Damaged(format!("{what}: {e}")))
}

fn id<T: FromStr>(s: &str, what: &str) -> Result<T> {
    s.parse()
        .map_err(|_| CatalogError::Damaged(format!("{what}: {s:?} is not an id")))
}

fn opt_id<T: FromStr>(s: Option<String>, what: &str) -> Result<Option<T>> {
    s.map(|s| id(&s, what)).transpose()
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
            || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
}

const VM_COLUMNS: &str = "id, name, memory_bytes, vcpus, guest, labels, state, current_snapshot, mem_chain, disks, created_ms, failure";
const SNAPSHOT_COLUMNS: &str = "id, name, vm_id, parent_id, labels, created_ms, memory_bytes, vcpus, guest, stored_bytes, pause_us, mem_chain, disks";
const LAYER_COLUMNS: &str = "id, kind, file, bytes";

/// A row as SQLite returns it: text and integers, parsed into a record afterwards.
type RawRow = (Vec<String>, Vec<i64>, Vec<Option<String>>);

fn vm_raw(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
    Ok((
        vec![
            r.get(0)?,
            r.get(1)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
            r.get(8)?,
            r.get(9)?,
        ],
        vec![r.get(2)?, r.get(3)?, r.get(10)?],
        vec![r.get(7)?, r.get(11)?],
    ))
}

fn vm_record((t, n, o): RawRow) -> Result<VmRecord> {
    let [id_, name, guest, labels, state, chain, disks] = <[String; 7]>::try_from(t).expect("7");
    let [memory_bytes, vcpus, created_ms] = <[i64; 3]>::try_from(n).expect("3");
    let [current, failure] = <[Option<String>; 2]>::try_from(o).expect("2");
    Ok(VmRecord {
        id: id(&id_, "vm id")?,
        name,
        memory_bytes: memory_bytes as u64,
        vcpus: vcpus as u32,
        guest: unjson(&guest, "vm guest")?,
        labels: unjson(&labels, "vm labels")?,
        state: VmStatus::parse(&state)
            .ok_or_else(|| CatalogError::Damaged(format!("vm state {state:?}")))?,
        current_snapshot: opt_id(current, "vm current snapshot")?,
        mem_chain: unjson(&chain, "vm memory chain")?,
        disks: unjson(&disks, "vm disks")?,
        created_ms,
        failure,
    })
}

fn snapshot_raw(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
    Ok((
        vec![
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(4)?,
            r.get(8)?,
            r.get(11)?,
            r.get(12)?,
        ],
        vec![r.get(5)?, r.get(6)?, r.get(7)?, r.get(9)?, r.get(10)?],
        vec![r.get(3)?],
    ))
}

fn snapshot_record((t, n, o): RawRow) -> Result<SnapshotRecord> {
    let [id_, name, vm_id, labels, guest, chain, disks] = <[String; 7]>::try_from(t).expect("7");
    let [created_ms, memory_bytes, vcpus, stored, pause] = <[i64; 5]>::try_from(n).expect("5");
    let [parent] = <[Option<String>; 1]>::try_from(o).expect("1");
    Ok(SnapshotRecord {
        id: id(&id_, "snapshot id")?,
        name,
        vm_id: id(&vm_id, "snapshot vm id")?,
        parent_id: opt_id(parent, "snapshot parent")?,
        labels: unjson(&labels, "snapshot labels")?,
        created_ms,
        memory_bytes: memory_bytes as u64,
        vcpus: vcpus as u32,
        guest: unjson(&guest, "snapshot guest")?,
        stored_bytes: stored as u64,
        pause_us: pause as u64,
        mem_chain: unjson(&chain, "snapshot memory chain")?,
        disks: unjson(&disks, "snapshot disks")?,
    })
}

fn layer_raw(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String, String, i64)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
}

fn layer_record((id_, kind, file, bytes): (String, String, String, i64)) -> Result<LayerRecord> {
    Ok(LayerRecord {
        id: id(&id_, "layer id")?,
        kind: LayerKind::parse(&kind)
            .ok_or_else(|| CatalogError::Damaged(format!("layer kind {kind:?}")))?,
        file,
        bytes: bytes as u64,
    })
}

impl<'c> Tx<'c> {
    pub(super) fn new(tx: Transaction<'c>) -> Self {
        Self(tx)
    }

    pub(super) fn finish(self) -> Result<()> {
        Ok(self.0.commit()?)
    }

    /// The generation of the last committed write.
    pub(super) fn generation(&self) -> Result<u64> {
        let text: String =
            self.0
                .query_row("SELECT value FROM meta WHERE key = 'generation'", [], |r| {
                    r.get(0)
                })?;
        text.parse()
            .map_err(|_| CatalogError::Damaged(format!("generation {text:?}")))
    }

    pub(super) fn bump_generation(&self) -> Result<u64> {
        let next = self.generation()? + 1;
        self.0.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'generation'",
            [next.to_string()],
        )?;
        Ok(next)
    }

    fn query<T, R>(
        &self,
        sql: &str,
        args: impl rusqlite::Params,
        raw: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<R>,
        parse: impl Fn(R) -> Result<T>,
    ) -> Result<Vec<T>> {
        let mut st = self.0.prepare(sql)?;
        let rows = st.query_map(args, raw)?;
        rows.map(|r| parse(r?)).collect()
    }

    /// One VM.
    ///
    /// # Errors
    /// SQLite's error or a damaged row.
    pub fn vm(&self, id: VmId) -> Result<Option<VmRecord>> {
        let sql = format!("SELECT {VM_COLUMNS} FROM vms WHERE id = ?1");
        Ok(self.query(&sql, [id.to_string()], vm_raw, vm_record)?.pop())
    }

    /// Every VM, oldest first.
    ///
    /// # Errors
    /// SQLite's error or a damaged row.
    pub fn vms(&self) -> Result<Vec<VmRecord>> {
        let sql = format!("SELECT {VM_COLUMNS} FROM vms ORDER BY created_ms, id");
        self.query(&sql, [], vm_raw, vm_record)
    }

    /// The VM named `name`.
    ///
    /// # Errors
    /// SQLite's error or a damaged row.
    pub fn vm_named(&self, name: &str) -> Result<Option<VmRecord>> {
        let sql = format!("SELECT {VM_COLUMNS} FROM vms WHERE name = ?1");
        Ok(self.query(&sql, [name], vm_raw, vm_record)?.pop())
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
                    vm.id.to_string(),
                    vm.name,
                    vm.memory_bytes as i64,
                    i64::from(vm.vcpus),
                    json(&vm.guest),
                    json(&vm.labels),
                    vm.state.as_str(),
                    vm.current_snapshot.map(|s| s.to_string()),
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

    /// Replaces a VM's row (all but its id, name, shape and creation time).
    ///
    /// # Errors
    /// SQLite's error.
    pub fn update_vm(&self, vm: &VmRecord) -> Result<()> {
        self.0.execute(
            "UPDATE vms SET state = ?2, current_snapshot = ?3, mem_chain = ?4, disks = ?5, failure = ?6, labels = ?7, guest = ?8 WHERE id = ?1",
            params![
                vm.id.to_string(),
                vm.state.as_str(),
                vm.current_snapshot.map(|s| s.to_string()),
                json(&vm.mem_chain),
                json(&vm.disks),
                vm.failure,
                json(&vm.labels),
                json(&vm.guest),
            ],
        )?;
        Ok(())
    }

    /// Records a VM's state (and why, when it failed or paused on its own) and nothing else.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn set_vm_state(&self, id: VmId, state: VmStatus, failure: Option<&str>) -> Result<()> {
        self.0.execute(
            "UPDATE vms SET state = ?2, failure = ?3 WHERE id = ?1",
            params![id.to_string(), state.as_str(), failure],
        )?;
        Ok(())
    }

    /// Deletes a VM's row.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn delete_vm(&self, id: VmId) -> Result<()> {
        self.0
            .execute("DELETE FROM vms WHERE id = ?1", [id.to_string()])?;
        Ok(())
    }

    /// One snapshot.
    ///
    /// # Errors
    /// SQLite's error or a damaged row.
    pub fn snapshot(&self, id: SnapshotId) -> Result<Option<SnapshotRecord>> {
        let sql = format!("SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE id = ?1");
        Ok(self
            .query(&sql, [id.to_string()], snapshot_raw, snapshot_record)?
            .pop())
    }

    /// Every snapshot, oldest first.
    ///
    /// # Errors
    /// SQLite's error or a damaged row.
    pub fn snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        let sql = format!("SELECT {SNAPSHOT_COLUMNS} FROM snapshots ORDER BY created_ms, id");
        self.query(&sql, [], snapshot_raw, snapshot_record)
    }

    /// The snapshot of VM `vm` named `name`.
    ///
    /// # Errors
    /// SQLite's error or a damaged row.
    pub fn snapshot_named(&self, vm: VmId, name: &str) -> Result<Option<SnapshotRecord>> {
        let sql =
            format!("SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE vm_id = ?1 AND name = ?2");
        Ok(self
            .query(
                &sql,
                [vm.to_string(), name.into()],
                snapshot_raw,
                snapshot_record,
            )?
            .pop())
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
                    s.id.to_string(),
                    s.name,
                    s.vm_id.to_string(),
                    s.parent_id.map(|p| p.to_string()),
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
                s.id.to_string(),
                json(&s.labels),
                s.parent_id.map(|p| p.to_string()),
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
    pub fn delete_snapshot(&self, id: SnapshotId) -> Result<()> {
        self.0
            .execute("DELETE FROM snapshots WHERE id = ?1", [id.to_string()])?;
        Ok(())
    }

    /// One layer.
    ///
    /// # Errors
    /// SQLite's error or a damaged row.
    pub fn layer(&self, id: LayerId) -> Result<Option<LayerRecord>> {
        let sql = format!("SELECT {LAYER_COLUMNS} FROM layers WHERE id = ?1");
        Ok(self
            .query(&sql, [id.to_string()], layer_raw, layer_record)?
            .pop())
    }

    /// Every layer.
    ///
    /// # Errors
    /// SQLite's error or a damaged row.
    pub fn layers(&self) -> Result<Vec<LayerRecord>> {
        let sql = format!("SELECT {LAYER_COLUMNS} FROM layers");
        self.query(&sql, [], layer_raw, layer_record)
    }

    /// Inserts a layer.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn insert_layer(&self, l: &LayerRecord) -> Result<()> {
        self.0.execute(
            "INSERT INTO layers (id, kind, file, bytes) VALUES (?1, ?2, ?3, ?4)",
            params![l.id.to_string(), l.kind.as_str(), l.file, l.bytes as i64],
        )?;
        Ok(())
    }

    /// Points a layer at another file (after a merge rewrote it).
    ///
    /// # Errors
    /// SQLite's error.
    pub fn set_layer_file(&self, id: LayerId, file: &str, bytes: u64) -> Result<()> {
        self.0.execute(
            "UPDATE layers SET file = ?2, bytes = ?3 WHERE id = ?1",
            params![id.to_string(), file, bytes as i64],
        )?;
        Ok(())
    }

    /// Records a layer's size on disk.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn set_layer_bytes(&self, id: LayerId, bytes: u64) -> Result<()> {
        self.0.execute(
            "UPDATE layers SET bytes = ?2 WHERE id = ?1",
            params![id.to_string(), bytes as i64],
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
            used.extend(vm.layers());
        }
        for s in self.snapshots()? {
            used.extend(s.layers());
        }
        let unused: Vec<LayerRecord> = self
            .layers()?
            .into_iter()
            .filter(|l| !used.contains(&l.id))
            .collect();
        for l in &unused {
            self.0
                .execute("DELETE FROM layers WHERE id = ?1", [l.id.to_string()])?;
            self.0.execute(
                "DELETE FROM filling WHERE layer_id = ?1",
                [l.id.to_string()],
            )?;
        }
        Ok(unused)
    }

    /// Records that layer `f.layer`'s blocks are still arriving from a remote.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn insert_filling(&self, f: &FillingRecord) -> Result<()> {
        self.0.execute(
            "INSERT INTO filling (layer_id, remote, what, blocks) VALUES (?1, ?2, ?3, ?4)",
            params![f.layer.to_string(), f.remote, f.what, f.encode_blocks()],
        )?;
        Ok(())
    }

    /// Every layer whose blocks are still arriving.
    ///
    /// # Errors
    /// SQLite's error or a damaged row.
    pub fn filling(&self) -> Result<Vec<FillingRecord>> {
        let mut st = self
            .0
            .prepare("SELECT layer_id, remote, what, blocks FROM filling")?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Vec<u8>>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (layer, remote, what, blocks) = row?;
            let damaged = || CatalogError::Damaged(format!("filling row of layer {layer}"));
            let layer = layer.parse().map_err(|_| damaged())?;
            let (blocks, chunks) = FillingRecord::decode_blocks(&blocks).ok_or_else(damaged)?;
            out.push(FillingRecord {
                layer,
                remote,
                what,
                blocks,
                chunks,
            });
        }
        Ok(out)
    }

    /// Records that layer `layer` holds every block now.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn delete_filling(&self, layer: LayerId) -> Result<()> {
        self.0.execute(
            "DELETE FROM filling WHERE layer_id = ?1",
            [layer.to_string()],
        )?;
        Ok(())
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

    /// The stored answer to `request_id`.
    ///
    /// # Errors
    /// SQLite's error.
    pub fn request(&self, request_id: &str) -> Result<Option<RequestRecord>> {
        Ok(self
            .0
            .query_row(
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

    /// Stores (or replaces) an operation (`body`: its API form, encoded).
    ///
    /// # Errors
    /// SQLite's error.
    pub fn put_operation(
        &self,
        id: OpId,
        vm_id: &str,
        created_ms: i64,
        ended: bool,
        body: &[u8],
    ) -> Result<()> {
        self.0.execute(
            "INSERT OR REPLACE INTO operations (id, vm_id, created_ms, ended, body) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id.to_string(), vm_id, created_ms, i64::from(ended), body],
        )?;
        Ok(())
    }

    /// Operations, oldest first: (body, ended).
    ///
    /// # Errors
    /// SQLite's error.
    pub fn operations(&self) -> Result<Vec<(Vec<u8>, bool)>> {
        self.query(
            "SELECT body, ended FROM operations ORDER BY created_ms, id",
            [],
            |r| Ok((r.get(0)?, r.get::<_, i64>(1)? != 0)),
            Ok,
        )
    }
}
