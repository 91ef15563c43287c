//! The daemon: what it holds, how it starts (recovery) and stops, and its housekeeping. The
//! operations themselves live in a module each ([`crate::create_vm`], [`crate::snapshot`],
//! [`crate::restore`], [`crate::clone`], [`crate::delete`], [`crate::lifecycle`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use snap_api::v1 as pb;
use snap_mem::layer::LayerOptions;

use crate::catalog::{Catalog, SnapshotRecord, VmRecord, VmStatus};
use crate::disks::DiskSet;
use crate::error::{Error, Result};
use crate::failpoints::FailPoints;
use crate::ids::{LayerId, SnapshotId, VmId};
use crate::images::ImagePolicy;
use crate::ops::scheduler::Scheduler;
use crate::ops::{OPERATION_RETENTION_MS, Operations, events::Events};
use crate::pool::Pool;
use crate::store::{Store, StoreOptions};
use crate::vms::{Instance, VmTable};
use crate::{api::convert, now_ms};

/// How the daemon runs.
#[derive(Debug)]
pub struct Config {
    /// Where the catalog and the layer files live.
    pub data_dir: PathBuf,
    /// How memory layers are written.
    pub layer_options: LayerOptions,
    /// Injected failures (tests only).
    pub failpoints: FailPoints,
    /// A snapshot of at most this many bytes of pages copies them out while the VM is paused
    /// and resumes it before writing the layer (0: always write while paused).
    pub copy_before_resume: u64,
    /// Prepared VMs kept per VM shape restored so far, for fast restores.
    pub warm_pool: usize,
    /// The data directory's options (space reserve, unknown files).
    pub store: StoreOptions,
    /// Where disk images may be imported from.
    pub images: ImagePolicy,
    /// How snapshots copy memory.
    pub copy_mode: crate::snapshot::CopyMode,
    /// The remote stores snapshots are pushed to and pulled from.
    pub remotes: crate::remote::Remotes,
}

/// The daemon.
pub struct Daemon {
    pub(crate) store: Arc<Store>,
    pub(crate) catalog: Catalog,
    pub(crate) scheduler: Arc<Scheduler>,
    pub(crate) ops: Operations,
    pub(crate) events: Events,
    pub(crate) vms: VmTable,
    pub(crate) pool: Arc<Pool>,
    pub(crate) failpoints: FailPoints,
    pub(crate) layer_options: LayerOptions,
    pub(crate) copy_before_resume: u64,
    pub(crate) images: ImagePolicy,
    pub(crate) copy_mode: crate::snapshot::CopyMode,
    pub(crate) remotes: crate::remote::Remotes,
    /// Disk layers restored from a remote whose blocks are still arriving.
    pub(crate) filling: Arc<crate::filling::Filling>,
    /// What the daemon has done, for `--metrics`.
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    stopping: AtomicBool,
    /// Held while VM states are reported or recorded at shutdown.
    reporting: std::sync::Mutex<()>,
}

impl Daemon {
    /// Opens the data directory (refusing a catalog that is missing, emptied or rolled back while
    /// files exist: see [`Store::open`]) and recovers: VMs are stopped (StartVm starts one again
    /// from its current snapshot), operations that had not ended are failed, and files the
    /// catalog does not name (what interrupted operations left) are removed.
    ///
    /// # Errors
    /// A message that says what is wrong with the data directory and what to do.
    pub fn open(config: Config) -> std::result::Result<Arc<Self>, String> {
        let (store, catalog) = Store::open(&config.data_dir, config.store)?;
        let metrics = Arc::new(crate::metrics::Metrics::new());
        for name in config.remotes.names() {
            metrics.touch_remote(&name);
        }
        catalog.set_metrics(Arc::clone(&metrics));
        let daemon = Arc::new(Self {
            store,
            catalog,
            scheduler: Arc::new(Scheduler::default()),
            ops: Operations::default(),
            events: Events::default(),
            vms: VmTable::default(),
            pool: Pool::new(config.warm_pool),
            failpoints: config.failpoints,
            layer_options: config.layer_options,
            copy_before_resume: config.copy_before_resume,
            images: config.images,
            copy_mode: config.copy_mode,
            remotes: config.remotes,
            filling: Arc::default(),
            metrics,
            stopping: AtomicBool::new(false),
            reporting: std::sync::Mutex::new(()),
        });
        daemon.recover().map_err(|e| e.to_string())?;
        daemon.start_filler();
        Ok(daemon)
    }

    fn recover(&self) -> Result<()> {
        // Writes here are best effort: on a full filesystem the daemon must still start, so that
        // snapshots can be deleted to free space.
        let best_effort = |what: &str, r: std::result::Result<(), crate::catalog::CatalogError>| {
            if let Err(e) = r {
                tracing::warn!(error = %e, "recovery could not {what}; it is retried at the next start");
            }
        };
        best_effort(
            "forget old request ids",
            self.catalog
                .write(|tx| tx.prune(now_ms() - OPERATION_RETENTION_MS).map(drop)),
        );
        // Before anything reads a layer still filling from a remote.
        self.resume_filling()?;
        let vms = self.catalog.read(|tx| tx.vms())?;
        for vm in &vms {
            self.vms.add(vm.id);
        }
        // VMs that ran (or were paused) are stopped now; created, finished and failed ones stay
        // what they were.
        best_effort(
            "record the VMs as stopped",
            self.catalog.write(|tx| {
                for vm in vms
                    .iter()
                    .filter(|v| matches!(v.state, VmStatus::Running | VmStatus::Paused))
                {
                    tx.set_vm_state(vm.id, VmStatus::Stopped, None)?;
                }
                Ok(())
            }),
        );
        for (body, ended) in self.catalog.read(|tx| tx.operations())? {
            let Ok(mut op) = <pb::Operation as prost::Message>::decode(body.as_slice()) else {
                continue;
            };
            if !ended {
                op.set_state(pb::OperationState::Failed);
                op.error = Some(crate::api::status::operation_error(&Error::conflict(
                    "the daemon stopped while the operation ran; nothing of it was published",
                )));
                op.ended_unix_ms = now_ms();
                op.cancellable = false;
                let body = prost::Message::encode_to_vec(&op);
                let id = op
                    .id
                    .parse()
                    .map_err(|_| Error::internal("a bad operation id"))?;
                best_effort(
                    "record an interrupted operation as failed",
                    self.catalog.write(|tx| {
                        tx.put_operation(id, &op.vm_id, op.created_unix_ms, true, &body)
                    }),
                );
            }
            self.ops.insert(op);
        }
        let swept = self.store.sweep(&self.catalog)?;
        if swept.removed > 0 {
            tracing::info!(
                files = swept.removed,
                bytes = swept.bytes,
                "removed files no catalog row names"
            );
        }
        self.store.refill_reserve();
        Ok(())
    }

    /// Stops accepting work: running and paused VMs are stopped and recorded so (created,
    /// finished and failed ones keep that state).
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        // A state report running now ends first, and none runs after: it would see the VMs
        // without their instances and record them stopped over what is recorded here.
        let _reports = self.reporting.lock().unwrap_or_else(|e| e.into_inner());
        for (id, entry) in self.vms.all() {
            let (state, failure) = entry.status();
            entry.set(None, false);
            let state = match state {
                VmStatus::Running | VmStatus::Paused => VmStatus::Stopped,
                s => s,
            };
            if let Err(e) = self
                .catalog
                .write(|tx| tx.set_vm_state(id, state, failure.as_deref()))
            {
                tracing::warn!(vm = %id, error = %e, "cannot record the VM's state");
            }
        }
    }

    /// Whether the daemon is shutting down.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// The daemon's metrics.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// Sets the gauges the metrics take from the daemon's state (VMs by state, open
    /// operations, data directory space), and tells them what running lazy restores did.
    pub fn refresh_gauges(&self) {
        let m = &self.metrics;
        let mut counts: std::collections::HashMap<&'static str, i64> =
            VmStatus::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        for (_, entry) in self.vms.all() {
            if let Some(i) = entry.instance() {
                i.tell_metrics();
            }
            *counts.entry(entry.status().0.as_str()).or_default() += 1;
        }
        for (state, n) in counts {
            m.vms
                .get_or_create(&crate::metrics::StateLabel { state })
                .set(n);
        }
        m.operations_open.set(self.ops.open() as i64);
        if let Some(c) = self.remotes.cache_stats() {
            m.cache_counters(c.hits, c.misses);
        }
        let (used, free) = (
            self.store.stored_bytes(),
            self.store.free_bytes().unwrap_or(0),
        );
        for (r#use, n) in [("used", used), ("free", free)] {
            m.data_dir_bytes
                .get_or_create(&crate::metrics::UseLabel { r#use })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// The operations.
    pub fn operations(&self) -> &Operations {
        &self.ops
    }

    /// The events.
    pub fn events(&self) -> &Events {
        &self.events
    }

    /// The catalog (reads: tests and diagnostics).
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Periodic work: report VMs whose state changed on their own, forget old operations, and
    /// with `sweep`, remove files nothing names and refill the space reserve.
    pub fn housekeeping(&self, sweep: bool) {
        self.watch_states();
        if sweep {
            self.ops.forget_old();
            self.sweep();
        }
    }

    /// Removes files nothing names any more (see [`Store::sweep`]) and refills the space reserve.
    pub(crate) fn sweep(&self) {
        match self.store.sweep(&self.catalog) {
            Ok(s) if s.removed > 0 => {
                tracing::info!(
                    files = s.removed,
                    bytes = s.bytes,
                    "removed files nothing names"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot sweep the data directory"),
        }
        self.store.refill_reserve();
    }

    /// Reports VMs whose state changed (a guest finished, failed or paused on its own).
    pub fn watch_states(&self) {
        let _reports = self.reporting.lock().unwrap_or_else(|e| e.into_inner());
        if self.stopping() {
            return;
        }
        for (id, entry) in self.vms.all() {
            if let Some((state, failure)) = entry.changed() {
                if let Err(e) = self
                    .catalog
                    .write(|tx| tx.set_vm_state(id, state, failure.as_deref()))
                {
                    tracing::warn!(vm = %id, error = %e, "cannot record the VM's state");
                }
                self.emit_vm(id);
            }
        }
    }

    /// Makes `vm` on `disks` (whose layers the catalog names now) VM `id`'s instance, lets its
    /// guest run if `run` (unless it had stopped on its own in its snapshot), and tells watchers.
    /// A VM `fresh` from CreateVm that does not run yet is "created"; a restored one "paused".
    pub(crate) fn add_instance(
        &self,
        id: VmId,
        vm: snap_vmm::Vm,
        disks: DiskSet,
        run: bool,
        fresh: bool,
    ) {
        let vm = Arc::new(vm);
        let entry = self.vms.add_running(
            id,
            Instance::new(Arc::clone(&vm), disks.publish(), &self.metrics),
            run || !fresh,
        );
        if run {
            if let Err(e) = crate::restore::run_on(&vm) {
                // Recorded already: the VM exists, and its state says why it does not run.
                tracing::warn!(vm = %id, error = %e, "a new VM cannot run");
            }
        }
        entry.changed();
        self.emit_vm(id);
    }

    /// Tells watchers about VM `id` as it is now.
    pub(crate) fn emit_vm(&self, id: VmId) {
        if let Ok(vm) = self.get_vm(id) {
            self.events.emit(pb::event::Kind::Vm(vm));
        }
    }

    /// The catalog row of VM `id`.
    ///
    /// # Errors
    /// NOT_FOUND.
    pub(crate) fn vm_record(&self, id: VmId) -> Result<VmRecord> {
        self.catalog
            .read(|tx| tx.vm(id))?
            .ok_or_else(|| Error::not_found("VM", id))
    }

    /// The catalog row of snapshot `id`.
    ///
    /// # Errors
    /// NOT_FOUND.
    pub(crate) fn snapshot_record(&self, id: SnapshotId) -> Result<SnapshotRecord> {
        self.catalog
            .read(|tx| tx.snapshot(id))?
            .ok_or_else(|| Error::not_found("snapshot", id))
    }

    /// The files of the layers `chain` (oldest first).
    ///
    /// # Errors
    /// INTERNAL for a layer the catalog does not have: an operation only reads layers its
    /// admission holds, so a missing one is damage, not a race.
    pub(crate) fn layer_paths(&self, chain: &[LayerId]) -> Result<Vec<PathBuf>> {
        let layers = self.catalog.read(|tx| {
            chain
                .iter()
                .map(|id| tx.layer(*id).map(|l| (id, l)))
                .collect::<std::result::Result<Vec<_>, _>>()
        })?;
        layers
            .into_iter()
            .map(|(id, l)| {
                l.map(|l| self.store.path(&l.file)).ok_or_else(|| {
                    Error::internal(format!(
                        "the catalog has no layer {id} (a damaged catalog?)"
                    ))
                })
            })
            .collect()
    }

    /// One VM as the API shows it.
    ///
    /// # Errors
    /// NOT_FOUND.
    pub fn get_vm(&self, id: VmId) -> Result<pb::Vm> {
        let rec = self.vm_record(id)?;
        Ok(self.vm_to_pb(&rec))
    }

    /// Every VM, oldest first.
    ///
    /// # Errors
    /// The catalog's error.
    pub fn list_vms(&self) -> Result<Vec<pb::Vm>> {
        let vms = self.catalog.read(|tx| tx.vms())?;
        Ok(vms.iter().map(|r| self.vm_to_pb(r)).collect())
    }

    /// A VM's record with its live state. A VM without an instance is what its record says if
    /// it was created, finished or failed (also across a restart), else stopped.
    pub(crate) fn vm_to_pb(&self, rec: &VmRecord) -> pb::Vm {
        let live = self.vms.find(rec.id).filter(|e| e.vm().is_some());
        let (state, failure) = match (live, rec.state) {
            (Some(e), _) => e.status(),
            (None, s @ (VmStatus::Created | VmStatus::Finished | VmStatus::Failed)) => {
                (s, rec.failure.clone())
            }
            (None, _) => (VmStatus::Stopped, None),
        };
        convert::vm(rec, state, failure)
    }

    /// One snapshot.
    ///
    /// # Errors
    /// NOT_FOUND.
    pub fn get_snapshot(&self, id: SnapshotId) -> Result<pb::Snapshot> {
        Ok(convert::snapshot(&self.snapshot_record(id)?))
    }

    /// Every snapshot, oldest first.
    ///
    /// # Errors
    /// The catalog's error.
    pub fn snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        Ok(self.catalog.read(|tx| tx.snapshots())?)
    }

    /// The guest's console output from `offset`, at most `max` bytes.
    ///
    /// # Errors
    /// NOT_FOUND.
    pub fn console(&self, id: VmId, offset: u64, max: usize) -> Result<(Vec<u8>, u64)> {
        let entry = self.vms.get(id)?;
        let Some(vm) = entry.vm() else {
            return Ok((Vec::new(), 0));
        };
        let (data, len) = vm.serial_output().window(offset, max);
        let next = offset.min(len) + data.len() as u64;
        Ok((data, next))
    }

    /// Sets and removes labels of a snapshot (a catalog change only: no admission needed).
    ///
    /// # Errors
    /// NOT_FOUND.
    pub fn update_labels(
        &self,
        id: SnapshotId,
        set: std::collections::BTreeMap<String, String>,
        remove: &[String],
        ctx: &crate::ops::requests::RequestCtx,
    ) -> Result<pb::Snapshot> {
        let s = self.catalog.write(|tx| {
            let Some(mut s) = tx.snapshot(id)? else {
                return Ok(None);
            };
            s.labels.extend(set);
            for k in remove {
                s.labels.remove(k);
            }
            tx.update_snapshot(&s)?;
            let answer = convert::snapshot(&s);
            ctx.answer(tx, &answer)?;
            Ok(Some(answer))
        })?;
        s.ok_or_else(|| Error::not_found("snapshot", id))
    }

    /// Runs the catalog write `write`; if the filesystem is full, gives the space reserve back
    /// and runs it again. For operations that free space: they must be able to run on a full disk.
    ///
    /// # Errors
    /// The write's error.
    pub(crate) fn with_reserve<T>(
        &self,
        write: impl Fn() -> std::result::Result<T, crate::catalog::CatalogError>,
    ) -> Result<T> {
        match write().map_err(Error::from) {
            Err(e)
                if e.kind == crate::error::ErrorKind::Exhausted && self.store.release_reserve() =>
            {
                tracing::warn!(
                    "the data directory's filesystem is full: released the space reserve to free space"
                );
                Ok(write()?)
            }
            r => r,
        }
    }
}
