//! The daemon's state and its operations, in plain blocking code: the gRPC layer
//! ([`crate::service`]) checks requests, hands them here, and maps results to the API.
//!
//! Files under the data directory:
//!
//! ```text
//! catalog.db                  the catalog (see crate::catalog)
//! layers/<snapshot>.mlayer    a snapshot's memory layer (full, or a diff over its parent's)
//! states/<snapshot>.state     its vCPU and device state
//! states/<snapshot>.wset      its recorded working set (after a first prefetch restore)
//! ```
//!
//! A snapshot is written while its VM is paused (state, dirty pages, layer file, state file,
//! fsync) and then published by one catalog transaction; only then are its dirty pages marked
//! clean. A failure before the commit removes what was written and resumes the VM as it was.
//! After a restart, files the catalog does not name are removed.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use snap_api::v1 as pb;
use snap_core::Id;
use snap_disk::Disk;
use snap_mem::layer::{Layer, LayerChain, LayerOptions};
use snap_vmm::{
    MemoryRestore, RunState, TestGuest, Vm, VmConfig, VmExit, VmOptions, VmState, snapshot,
};
use tokio::sync::broadcast;
use tonic::Code;

use crate::catalog::{
    Catalog, CatalogError, DiskRecord, GuestSpec, LayerRecord, RequestRecord, SnapshotRecord,
    VmRecord,
};
use crate::disks::{Opened, geometry, new_top};
use crate::error::{ApiError, ApiResult};
use crate::failpoints::FailPoints;

/// Sectors of its first disk the test guest uses at most.
const GUEST_DISK_SECTORS: u64 = 2048;

/// How long answers to request ids (and ended operations) are kept: a retry within this time
/// gets the first answer. Older ones are forgotten when the daemon starts.
const REQUEST_RETENTION_MS: i64 = 24 * 3600 * 1000;

/// Events kept for replay to watchers that ask for older ones.
const RECENT_EVENTS: usize = 4096;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

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
}

/// A VM the daemon knows, and its running instance if it has one.
pub struct Slot {
    id: String,
    /// Held by the one mutating operation the VM may have at a time.
    busy: AtomicBool,
    vm: Mutex<Option<Arc<Vm>>>,
    /// The instance's disks (the same objects its virtio-blk devices use).
    disks: Mutex<Vec<Arc<Disk>>>,
    /// Whether the instance's guest has been let run (a created VM is paused but not "paused").
    started: AtomicBool,
    /// The state last reported, to notice changes.
    reported: Mutex<String>,
}

impl Slot {
    fn new(id: &str, state: &str) -> Self {
        Self {
            id: id.to_string(),
            busy: AtomicBool::new(false),
            vm: Mutex::new(None),
            disks: Mutex::new(Vec::new()),
            started: AtomicBool::new(false),
            reported: Mutex::new(state.to_string()),
        }
    }

    fn instance(&self) -> Option<Arc<Vm>> {
        lock(&self.vm).clone()
    }

    fn set_instance(&self, vm: Option<Arc<Vm>>, disks: Vec<Arc<Disk>>, started: bool) {
        *lock(&self.vm) = vm;
        *lock(&self.disks) = disks;
        self.started.store(started, Ordering::Relaxed);
    }

    fn disks(&self) -> Vec<Arc<Disk>> {
        lock(&self.disks).clone()
    }

    /// The state now ("created", "running", "paused", "finished", "stopped", "failed") and, when
    /// failed, why.
    fn state(&self) -> (String, Option<String>) {
        let Some(vm) = self.instance() else {
            return ("stopped".into(), None);
        };
        match vm.run_state() {
            RunState::Running => ("running".into(), None),
            RunState::Paused if self.started.load(Ordering::Relaxed) => ("paused".into(), None),
            RunState::Paused => ("created".into(), None),
            RunState::Stopped(VmExit::Finished(0)) => ("finished".into(), None),
            RunState::Stopped(exit) => (
                "failed".into(),
                Some(format!("the guest stopped: {exit:?}")),
            ),
            RunState::Failed(why) => ("failed".into(), Some(why)),
        }
    }
}

/// The one mutating operation of a VM; released on drop.
pub struct Busy(Arc<Slot>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::Release);
    }
}

/// A long operation, as it runs.
pub struct OpCell {
    op: Mutex<pb::Operation>,
    cancel: AtomicBool,
}

impl OpCell {
    fn snapshot(&self) -> pb::Operation {
        lock(&self.op).clone()
    }
}

/// What a running operation reports through.
pub struct OpHandle<'a> {
    daemon: &'a Daemon,
    cell: Arc<OpCell>,
}

impl OpHandle<'_> {
    /// Sets the phase and byte counts, and tells watchers.
    pub fn progress(&self, phase: &str, done: u64, total: u64) {
        let op = {
            let mut op = lock(&self.cell.op);
            op.progress = Some(pb::Progress {
                phase: phase.into(),
                bytes_done: done,
                bytes_total: total,
            });
            op.clone()
        };
        self.daemon.emit_operation(&op);
    }

    /// Fails with CANCELLED if the client cancelled.
    pub fn check_cancel(&self) -> ApiResult<()> {
        if self.cell.cancel.load(Ordering::Acquire) {
            return Err(ApiError::new(Code::Cancelled, "cancelled by the client"));
        }
        Ok(())
    }

    /// The point of no return: after a last cancellation check the operation can no longer be
    /// cancelled.
    pub fn no_return(&self) -> ApiResult<()> {
        let mut op = lock(&self.cell.op);
        self.check_cancel()?;
        op.cancellable = false;
        Ok(())
    }

    fn set_pause(&self, pause_us: u64) {
        lock(&self.cell.op).pause_us = pause_us;
    }
}

/// A client request id being answered: stored with the answer so that a retry gets it again.
#[derive(Debug, Clone)]
pub struct RequestCtx {
    /// The client's id.
    pub request_id: String,
    /// The RPC.
    pub method: &'static str,
    /// The request without its id, encoded.
    pub fingerprint: Vec<u8>,
}

impl RequestCtx {
    /// The record of `response` for this request.
    pub fn record(&self, response: &impl prost::Message) -> RequestRecord {
        RequestRecord {
            method: self.method.into(),
            fingerprint: self.fingerprint.clone(),
            response: response.encode_to_vec(),
        }
    }
}

/// The daemon.
pub struct Daemon {
    data: PathBuf,
    catalog: Catalog,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    ops: Mutex<HashMap<String, Arc<OpCell>>>,
    events: broadcast::Sender<pb::Event>,
    recent: Mutex<VecDeque<pb::Event>>,
    seq: AtomicU64,
    failpoints: FailPoints,
    layer_options: LayerOptions,
    copy_before_resume: u64,
    pool: Arc<crate::pool::Pool>,
    stopping: AtomicBool,
}

/// A disk sealed by a snapshot in progress: its index in the VM, the disk, and its new top.
type Sealed = (usize, Arc<Disk>, LayerRecord);

/// What a clone makes.
#[derive(Debug, Clone)]
pub struct CloneSpec {
    /// How many VMs.
    pub count: u32,
    /// Their names are `<prefix>-<i>`.
    pub prefix: String,
    /// Labels of each.
    pub labels: BTreeMap<String, String>,
    /// How their memory is restored.
    pub mode: pb::MemoryRestoreMode,
    /// Leave them paused.
    pub leave_paused: bool,
}

/// What a VM is created with.
#[derive(Debug, Clone)]
pub struct NewVmSpec {
    /// Name.
    pub name: String,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// The guest program.
    pub guest: GuestSpec,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Let the guest run at once.
    pub start: bool,
    /// Its disks.
    pub disks: Vec<NewDisk>,
}

/// A disk a new VM gets.
#[derive(Debug, Clone)]
pub struct NewDisk {
    /// Name within the VM.
    pub name: String,
    /// Size in bytes (0 with an image: the image's size).
    pub size_bytes: u64,
    /// A raw image imported as the disk's base.
    pub image: Option<PathBuf>,
}

fn test_guest(g: &GuestSpec) -> TestGuest {
    TestGuest {
        seed: g.seed,
        working_set_pages: g.working_set_pages,
        mutations_per_tick: g.mutations_per_tick,
        ticks: g.ticks,
        disk_blocks_per_tick: g.disk_sectors_per_tick,
        ..TestGuest::default()
    }
}

/// A new VM booting the test guest `g` on `disks` (paused).
fn boot(config: VmConfig, g: &GuestSpec, disks: &[Arc<Disk>]) -> Result<Vm, snap_vmm::VmError> {
    let mut guest = test_guest(g);
    if let Some(d) = disks.first() {
        guest.disk_sectors = (d.size() / 512).min(GUEST_DISK_SECTORS);
    }
    let options = VmOptions {
        disks: crate::disks::backends(disks),
        ..VmOptions::default()
    };
    guest.create_vm(config, &options)
}

fn mode_of(m: pb::MemoryRestoreMode) -> MemoryRestore {
    match m {
        pb::MemoryRestoreMode::Lazy => MemoryRestore::Lazy,
        pb::MemoryRestoreMode::Prefetch => MemoryRestore::Prefetch,
        pb::MemoryRestoreMode::Unspecified | pb::MemoryRestoreMode::Eager => MemoryRestore::Eager,
    }
}

fn vm_state_enum(s: &str) -> pb::VmState {
    match s {
        "created" => pb::VmState::Created,
        "running" => pb::VmState::Running,
        "paused" => pb::VmState::Paused,
        "finished" => pb::VmState::Finished,
        "stopped" => pb::VmState::Stopped,
        "failed" => pb::VmState::Failed,
        _ => pb::VmState::Unspecified,
    }
}

/// A snapshot whose files cannot be used: FAILED_PRECONDITION saying which and why.
fn unusable(s: &SnapshotRecord, e: &dyn std::fmt::Display) -> ApiError {
    ApiError::precondition(format!("snapshot {} cannot be restored: {e}", s.id))
}

/// Lets a restored VM's guest run, unless it had stopped on its own when the snapshot was taken
/// (a restore of it is stopped the same way).
fn run_on(vm: &Vm) -> ApiResult<()> {
    if vm.run_state() == RunState::Paused {
        vm.resume()?;
    }
    Ok(())
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

fn remove_file(path: &Path) -> u64 {
    let len = file_len(path);
    match std::fs::remove_file(path) {
        Ok(()) => len,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove");
            0
        }
    }
}

impl Daemon {
    /// Opens the data directory: the catalog, then recovery. VMs that were running when the
    /// daemon last stopped are reported stopped, operations that had not ended are failed, and
    /// files the catalog does not name (half-written snapshots) are removed.
    ///
    /// # Errors
    /// The directory or catalog cannot be opened.
    pub fn open(config: Config) -> Result<Arc<Self>, String> {
        let data = config.data_dir;
        for sub in ["layers", "states"] {
            std::fs::create_dir_all(data.join(sub))
                .map_err(|e| format!("creating {}: {e}", data.join(sub).display()))?;
        }
        let catalog = Catalog::open(&data.join("catalog.db")).map_err(|e| e.to_string())?;
        let (events, _) = broadcast::channel(1024);
        let daemon = Arc::new(Self {
            data,
            catalog,
            slots: Mutex::new(HashMap::new()),
            ops: Mutex::new(HashMap::new()),
            events,
            recent: Mutex::new(VecDeque::new()),
            seq: AtomicU64::new(0),
            failpoints: config.failpoints,
            layer_options: config.layer_options,
            copy_before_resume: config.copy_before_resume,
            pool: crate::pool::Pool::new(config.warm_pool),
            stopping: AtomicBool::new(false),
        });
        daemon.recover().map_err(|e| e.to_string())?;
        Ok(daemon)
    }

    fn recover(&self) -> ApiResult<()> {
        // Retries come within minutes; a day of answers is kept.
        let pruned = self
            .catalog
            .transaction(|tx| tx.prune(now_ms() - REQUEST_RETENTION_MS))?;
        if pruned > 0 {
            tracing::info!(rows = pruned, "forgot old request ids and ended operations");
        }
        let mut vms = self.catalog.vms()?;
        // A disk top sealed by a snapshot that was never published (the daemon died between
        // the seal and the catalog commit) stays in the VM's chain, under a fresh top.
        let mut new_layers = Vec::new();
        for vm in &mut vms {
            for d in &mut vm.disks {
                let Some(top) = d.chain.last() else { continue };
                let path = self.layer_paths(std::slice::from_ref(top))?.remove(0);
                let sealed = snap_disk::layer_info(&path)
                    .map_err(|e| crate::disks::disk_error("recovering a disk", &e))?
                    .sealed();
                if sealed {
                    let layer = new_top(&self.data, Some(&path), geometry(d.size_bytes))?;
                    d.chain.push(layer.id.clone());
                    new_layers.push(layer);
                }
            }
        }
        self.catalog.transaction(|tx| {
            for l in &new_layers {
                tx.insert_layer(l)?;
            }
            for mut vm in vms.iter().cloned() {
                vm.state = "stopped".into();
                tx.update_vm(&vm)?;
            }
            Ok(())
        })?;
        let mut slots = lock(&self.slots);
        for vm in &vms {
            slots.insert(vm.id.clone(), Arc::new(Slot::new(&vm.id, "stopped")));
        }
        drop(slots);
        for (body, ended) in self.catalog.operations()? {
            let Ok(mut op) = <pb::Operation as prost::Message>::decode(body.as_slice()) else {
                continue;
            };
            if !ended {
                op.set_state(pb::OperationState::Failed);
                op.error = Some(pb::OperationError {
                    code: Code::Aborted as i32,
                    message: "the daemon stopped while the operation ran; nothing of it was \
                              published"
                        .into(),
                });
                op.ended_unix_ms = now_ms();
                op.cancellable = false;
                self.catalog.put_operation(
                    &op.id,
                    &op.vm_id,
                    op.created_unix_ms,
                    true,
                    &prost::Message::encode_to_vec(&op),
                )?;
            }
            lock(&self.ops).insert(
                op.id.clone(),
                Arc::new(OpCell {
                    op: Mutex::new(op),
                    cancel: AtomicBool::new(false),
                }),
            );
        }
        let removed = self.remove_orphans()?;
        if removed > 0 {
            tracing::info!(files = removed, "removed files no snapshot names");
        }
        Ok(())
    }

    /// Removes files under `layers/` and `states/` that the catalog does not name.
    fn remove_orphans(&self) -> ApiResult<usize> {
        let layers: BTreeSet<String> = self.catalog.layers()?.into_iter().map(|l| l.file).collect();
        let snapshots: BTreeSet<String> = self
            .catalog
            .snapshots()?
            .into_iter()
            .map(|s| s.id)
            .collect();
        let mut removed = 0;
        for sub in ["layers", "states"] {
            let dir = self.data.join(sub);
            let entries = std::fs::read_dir(&dir)
                .map_err(|e| ApiError::internal(format!("reading {}: {e}", dir.display())))?;
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let keep = match sub {
                    "layers" => layers.contains(&format!("layers/{name}")),
                    _ => name.split_once('.').is_some_and(|(stem, ext)| {
                        snapshots.contains(stem) && matches!(ext, "state" | "wset")
                    }),
                };
                if !keep {
                    remove_file(&entry.path());
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// The catalog.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Stops accepting work: running VMs are stopped and recorded so.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        let slots: Vec<Arc<Slot>> = lock(&self.slots).values().cloned().collect();
        for slot in slots {
            slot.set_instance(None, Vec::new(), false);
            let _ = self.catalog.transaction(|tx| {
                if let Some(mut vm) = tx.vm(&slot.id)? {
                    vm.state = "stopped".into();
                    tx.update_vm(&vm)?;
                }
                Ok(())
            });
        }
    }

    /// Whether the daemon is shutting down.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    // ---------------------------------------------------------------------------------------
    // Events

    fn emit(&self, kind: pb::event::Kind) {
        let mut recent = lock(&self.recent);
        let event = pb::Event {
            sequence: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            unix_ms: now_ms(),
            kind: Some(kind),
        };
        if recent.len() >= RECENT_EVENTS {
            recent.pop_front();
        }
        recent.push_back(event.clone());
        let _ = self.events.send(event);
    }

    fn emit_operation(&self, op: &pb::Operation) {
        self.emit(pb::event::Kind::Operation(op.clone()));
    }

    fn emit_vm(&self, id: &str) {
        if let Ok(vm) = self.get_vm(id) {
            self.emit(pb::event::Kind::Vm(vm));
        }
    }

    /// A receiver of new events, and the held events after `after` (oldest first).
    pub fn subscribe(&self, after: u64) -> (broadcast::Receiver<pb::Event>, Vec<pb::Event>) {
        let recent = lock(&self.recent);
        let rx = self.events.subscribe();
        let old = if after == 0 {
            Vec::new()
        } else {
            recent
                .iter()
                .filter(|e| e.sequence > after)
                .cloned()
                .collect()
        };
        (rx, old)
    }

    /// Forgets operations that ended more than a day ago (the catalog forgets them at the next
    /// start; see [`REQUEST_RETENTION_MS`]).
    pub fn forget_old_operations(&self) {
        let before = now_ms() - REQUEST_RETENTION_MS;
        lock(&self.ops).retain(|_, c| {
            let op = lock(&c.op);
            op.ended_unix_ms == 0 || op.ended_unix_ms >= before
        });
    }

    /// Reports VMs whose state changed on their own (a guest finished or failed).
    pub fn watch_states(&self) {
        let slots: Vec<Arc<Slot>> = lock(&self.slots).values().cloned().collect();
        for slot in slots {
            let (state, failure) = slot.state();
            let changed = {
                let mut r = lock(&slot.reported);
                let changed = *r != state;
                if changed {
                    r.clone_from(&state);
                }
                changed
            };
            if changed {
                let _ = self.catalog.transaction(|tx| {
                    if let Some(mut vm) = tx.vm(&slot.id)? {
                        vm.state.clone_from(&state);
                        vm.failure.clone_from(&failure);
                        tx.update_vm(&vm)?;
                    }
                    Ok(())
                });
                self.emit_vm(&slot.id);
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // Requests

    /// The stored answer to a request id, if it was answered. A request id used for another
    /// request is refused.
    ///
    /// # Errors
    /// ALREADY_EXISTS for a reused request id.
    pub fn answered(&self, ctx: &RequestCtx) -> ApiResult<Option<Vec<u8>>> {
        match self.catalog.request(&ctx.request_id)? {
            None => Ok(None),
            Some(r) if r.method == ctx.method && r.fingerprint == ctx.fingerprint => {
                Ok(Some(r.response))
            }
            Some(r) => Err(ApiError::new(
                Code::AlreadyExists,
                format!(
                    "request id {:?} was already used for a different {} request: use a new request id for a new action",
                    ctx.request_id, r.method
                ),
            )),
        }
    }

    /// Stores the answer to a request id.
    ///
    /// # Errors
    /// The catalog's error.
    pub fn remember(&self, ctx: &RequestCtx, response: &impl prost::Message) -> ApiResult<()> {
        let r = ctx.record(response);
        self.catalog
            .transaction(|tx| tx.put_request(&ctx.request_id, &r, now_ms()))?;
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // VMs

    fn slot(&self, id: &str) -> ApiResult<Arc<Slot>> {
        lock(&self.slots)
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::not_found("VM", id))
    }

    /// Takes a VM's operation lock.
    ///
    /// # Errors
    /// NOT_FOUND, or ABORTED if another operation holds it.
    pub fn acquire(&self, vm_id: &str) -> ApiResult<Busy> {
        let slot = self.slot(vm_id)?;
        if slot
            .busy
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(ApiError::busy(vm_id));
        }
        Ok(Busy(slot))
    }

    fn vm_record(&self, id: &str) -> ApiResult<VmRecord> {
        self.catalog
            .vm(id)?
            .ok_or_else(|| ApiError::not_found("VM", id))
    }

    fn to_pb_vm(&self, rec: &VmRecord) -> pb::Vm {
        let (state, failure) = match self.slot(&rec.id) {
            Ok(slot) if slot.instance().is_some() => slot.state(),
            _ => (rec.state.clone(), rec.failure.clone()),
        };
        pb::Vm {
            id: rec.id.clone(),
            name: rec.name.clone(),
            state: vm_state_enum(&state) as i32,
            memory_bytes: rec.memory_bytes,
            vcpus: rec.vcpus,
            disks: rec
                .disks
                .iter()
                .map(|d| pb::Disk {
                    name: d.name.clone(),
                    size_bytes: d.size_bytes,
                    layer_ids: d.chain.clone(),
                })
                .collect(),
            guest: Some(pb::GuestProgram {
                seed: rec.guest.seed,
                working_set_pages: rec.guest.working_set_pages,
                mutations_per_tick: rec.guest.mutations_per_tick,
                ticks: rec.guest.ticks,
                disk_sectors_per_tick: rec.guest.disk_sectors_per_tick,
            }),
            labels: rec.labels.clone().into_iter().collect(),
            current_snapshot_id: rec.current_snapshot.clone().unwrap_or_default(),
            failure: failure.unwrap_or_default(),
            created_unix_ms: rec.created_ms,
        }
    }

    /// One VM.
    ///
    /// # Errors
    /// NOT_FOUND.
    pub fn get_vm(&self, id: &str) -> ApiResult<pb::Vm> {
        Ok(self.to_pb_vm(&self.vm_record(id)?))
    }

    /// Every VM, oldest first.
    ///
    /// # Errors
    /// The catalog's error.
    pub fn list_vms(&self) -> ApiResult<Vec<pb::Vm>> {
        Ok(self
            .catalog
            .vms()?
            .iter()
            .map(|r| self.to_pb_vm(r))
            .collect())
    }

    /// Creates a VM (and starts it if asked).
    ///
    /// # Errors
    /// INVALID_ARGUMENT for a shape or program that cannot run, ALREADY_EXISTS for a taken
    /// name, RESOURCE_EXHAUSTED for memory the host does not have.
    pub fn create_vm(&self, spec: NewVmSpec, ctx: &RequestCtx) -> ApiResult<pb::Vm> {
        if self.catalog.vms()?.iter().any(|v| v.name == spec.name) {
            return Err(ApiError::new(
                Code::AlreadyExists,
                format!("a VM named {:?} exists", spec.name),
            ));
        }
        let config = VmConfig {
            memory_bytes: spec.memory_bytes,
            vcpus: spec.vcpus,
        };
        snap_vmm::vm::validate_config(&config)?;
        test_guest(&spec.guest).validate(&config)?;
        let opened = self.create_disks(&spec.disks)?;
        let vm = match boot(config, &spec.guest, &opened.disks) {
            Ok(vm) => vm,
            Err(e) => {
                opened.discard(&self.data);
                return Err(e.into());
            }
        };
        let rec = VmRecord {
            id: Id::random().to_string(),
            name: spec.name,
            memory_bytes: spec.memory_bytes,
            vcpus: spec.vcpus,
            guest: spec.guest,
            labels: spec.labels,
            state: if spec.start { "running" } else { "created" }.into(),
            current_snapshot: None,
            mem_chain: Vec::new(),
            disks: opened.records.clone(),
            created_ms: now_ms(),
            failure: None,
        };
        let slot = Arc::new(Slot::new(&rec.id, &rec.state));
        let response = self.to_pb_vm(&rec);
        let record = ctx.record(&response);
        let published = self.catalog.transaction(|tx| {
            for l in &opened.new_layers {
                tx.insert_layer(l)?;
            }
            tx.insert_vm(&rec)?;
            tx.put_request(&ctx.request_id, &record, now_ms())
        });
        if let Err(e) = published {
            drop(vm);
            opened.discard(&self.data);
            return Err(e.into());
        }
        let vm = Arc::new(vm);
        if spec.start {
            vm.resume()?;
        }
        slot.set_instance(Some(vm), opened.disks, spec.start);
        lock(&self.slots).insert(rec.id.clone(), slot);
        self.emit_vm(&rec.id);
        self.get_vm(&rec.id)
    }

    /// Lets a VM's guest run: a created VM starts, a paused one resumes, a stopped one restarts
    /// from its current snapshot (or from the beginning if it has none).
    ///
    /// # Errors
    /// NOT_FOUND, ABORTED, FAILED_PRECONDITION.
    pub fn start_vm(&self, id: &str) -> ApiResult<pb::Vm> {
        let busy = self.acquire(id)?;
        let slot = &busy.0;
        match slot.instance() {
            Some(vm) if !matches!(vm.run_state(), RunState::Stopped(_) | RunState::Failed(_)) => {
                vm.resume()?;
                slot.started.store(true, Ordering::Relaxed);
            }
            _ => {
                let rec = self.vm_record(id)?;
                let (vm, disks) = match &rec.current_snapshot {
                    Some(s) => {
                        let snap = self.snapshot_record(s)?;
                        let (vm, opened) = self.restore_instance(&snap, MemoryRestore::Eager)?;
                        let old = self.adopt_disks(id, &opened)?;
                        self.remove_layer_files(old);
                        (vm, opened.disks)
                    }
                    None => {
                        // From the beginning, on its disks as they are.
                        let disks = rec
                            .disks
                            .iter()
                            .map(|d| crate::disks::open(&self.layer_paths(&d.chain)?))
                            .collect::<ApiResult<Vec<_>>>()?;
                        let config = VmConfig {
                            memory_bytes: rec.memory_bytes,
                            vcpus: rec.vcpus,
                        };
                        (boot(config, &rec.guest, &disks)?, disks)
                    }
                };
                run_on(&vm)?;
                slot.set_instance(Some(Arc::new(vm)), disks, true);
            }
        }
        self.watch_states();
        self.get_vm(id)
    }

    /// Pauses a running VM.
    ///
    /// # Errors
    /// NOT_FOUND, ABORTED, FAILED_PRECONDITION for a VM that is not running.
    pub fn pause_vm(&self, id: &str) -> ApiResult<pb::Vm> {
        let busy = self.acquire(id)?;
        let vm = busy
            .0
            .instance()
            .ok_or_else(|| ApiError::precondition(format!("VM {id} is stopped")))?;
        vm.pause();
        self.watch_states();
        self.get_vm(id)
    }

    /// Resumes a paused VM.
    ///
    /// # Errors
    /// NOT_FOUND, ABORTED, FAILED_PRECONDITION for a VM that cannot run.
    pub fn resume_vm(&self, id: &str) -> ApiResult<pb::Vm> {
        let busy = self.acquire(id)?;
        let vm = busy.0.instance().ok_or_else(|| {
            ApiError::precondition(format!("VM {id} is stopped: StartVm starts it again"))
        })?;
        vm.resume()?;
        busy.0.started.store(true, Ordering::Relaxed);
        self.watch_states();
        self.get_vm(id)
    }

    /// Stops a VM's guest; its record and snapshots stay.
    ///
    /// # Errors
    /// NOT_FOUND, ABORTED.
    pub fn stop_vm(&self, id: &str) -> ApiResult<pb::Vm> {
        let busy = self.acquire(id)?;
        busy.0.set_instance(None, Vec::new(), false);
        self.watch_states();
        self.get_vm(id)
    }

    /// The guest's console output from `offset`.
    ///
    /// # Errors
    /// NOT_FOUND.
    pub fn console(&self, id: &str, offset: u64) -> ApiResult<(Vec<u8>, u64)> {
        let slot = self.slot(id)?;
        let bytes = slot
            .instance()
            .map(|vm| vm.serial_output().bytes())
            .unwrap_or_default();
        let start = (offset as usize).min(bytes.len());
        Ok((bytes[start..].to_vec(), bytes.len() as u64))
    }

    // ---------------------------------------------------------------------------------------
    // Snapshots

    fn snapshot_record(&self, id: &str) -> ApiResult<SnapshotRecord> {
        self.catalog
            .snapshot(id)?
            .ok_or_else(|| ApiError::not_found("snapshot", id))
    }

    /// The API form of a snapshot record.
    pub fn to_pb_snapshot(s: &SnapshotRecord) -> pb::Snapshot {
        pb::Snapshot {
            id: s.id.clone(),
            name: s.name.clone(),
            vm_id: s.vm_id.clone(),
            parent_id: s.parent_id.clone().unwrap_or_default(),
            labels: s.labels.clone().into_iter().collect(),
            created_unix_ms: s.created_ms,
            memory_bytes: s.memory_bytes,
            vcpus: s.vcpus,
            stored_bytes: s.stored_bytes,
            pause_us: s.pause_us,
        }
    }

    /// One snapshot.
    ///
    /// # Errors
    /// NOT_FOUND.
    pub fn get_snapshot(&self, id: &str) -> ApiResult<pb::Snapshot> {
        Ok(Self::to_pb_snapshot(&self.snapshot_record(id)?))
    }

    /// Every snapshot, oldest first.
    ///
    /// # Errors
    /// The catalog's error.
    pub fn snapshots(&self) -> ApiResult<Vec<SnapshotRecord>> {
        Ok(self.catalog.snapshots()?)
    }

    /// Sets and removes labels of a snapshot.
    ///
    /// # Errors
    /// NOT_FOUND.
    pub fn update_labels(
        &self,
        id: &str,
        set: BTreeMap<String, String>,
        remove: &[String],
    ) -> ApiResult<pb::Snapshot> {
        let s = self.catalog.transaction(|tx| {
            let Some(mut s) = tx.snapshot(id)? else {
                return Ok(None);
            };
            s.labels.extend(set);
            for k in remove {
                s.labels.remove(k);
            }
            tx.update_snapshot(&s)?;
            Ok(Some(s))
        })?;
        s.map(|s| Self::to_pb_snapshot(&s))
            .ok_or_else(|| ApiError::not_found("snapshot", id))
    }

    fn layer_paths(&self, chain: &[String]) -> ApiResult<Vec<PathBuf>> {
        chain
            .iter()
            .map(|id| {
                let l = self.catalog.layer(id)?.ok_or_else(|| {
                    ApiError::internal(format!(
                        "the catalog has no layer {id} (a damaged catalog?)"
                    ))
                })?;
                Ok(self.data.join(l.file))
            })
            .collect()
    }

    /// Opens a snapshot's state and memory chain, checking both (and, with `every_frame`,
    /// reading every frame of every layer: what a revert needs before it touches the VM).
    fn open_snapshot(
        &self,
        s: &SnapshotRecord,
        every_frame: bool,
    ) -> ApiResult<(VmState, LayerChain)> {
        let unusable = |e: &dyn std::fmt::Display| unusable(s, e);
        let state = VmState::read_file(&self.data.join(format!("states/{}.state", s.id)))
            .map_err(|e| unusable(&e))?;
        let chain = LayerChain::open(&self.layer_paths(&s.mem_chain)?).map_err(|e| unusable(&e))?;
        if every_frame {
            for layer in chain.layers() {
                layer.verify().map_err(|e| unusable(&e))?;
            }
        }
        Ok((state, chain))
    }

    /// Records `opened` as VM `vm_id`'s disks (its layers into the catalog); returns the layers
    /// nobody names any more (the VM's previous tops), whose files can go.
    fn adopt_disks(&self, vm_id: &str, opened: &Opened) -> ApiResult<Vec<LayerRecord>> {
        Ok(self.catalog.transaction(|tx| {
            for l in &opened.new_layers {
                tx.insert_layer(l)?;
            }
            if let Some(mut rec) = tx.vm(vm_id)? {
                rec.disks.clone_from(&opened.records);
                tx.update_vm(&rec)?;
            }
            tx.collect()
        })?)
    }

    fn remove_layer_files(&self, layers: Vec<LayerRecord>) -> u64 {
        layers
            .into_iter()
            .map(|l| remove_file(&self.data.join(l.file)))
            .sum()
    }

    /// Creates the disks of a new VM: an empty base, or a raw image imported as a sealed base,
    /// each with an empty top.
    fn create_disks(&self, specs: &[NewDisk]) -> ApiResult<Opened> {
        self.open_disks(|opened| {
            for spec in specs {
                let (size, base) = match &spec.image {
                    Some(image) => {
                        let base = self.import_image(image, opened)?;
                        let size = base.geometry.disk_bytes;
                        if spec.size_bytes != 0 && spec.size_bytes != size {
                            return Err(ApiError::invalid(
                                "disks.size_bytes",
                                format!(
                                    "disk {:?}: {} bytes asked, the image holds {size} (use 0 for the image's size)",
                                    spec.name, spec.size_bytes
                                ),
                            ));
                        }
                        (size, vec![(base.path, base.id.to_string())])
                    }
                    None => (spec.size_bytes, Vec::new()),
                };
                let (paths, chain) = base.into_iter().unzip();
                self.add_disk(opened, &spec.name, size, paths, chain)?;
            }
            Ok(())
        })
    }

    /// Imports the raw image at `image` as a sealed base layer (recorded in `opened`).
    fn import_image(&self, image: &Path, opened: &mut Opened) -> ApiResult<snap_disk::LayerInfo> {
        let file = crate::disks::layer_file(&Id::random());
        let path = self.data.join(&file);
        let info = snap_disk::import_raw(image, &path, snap_disk::DEFAULT_BLOCK_SIZE)
            .map_err(|e| ApiError::invalid("disks.image_path", e))?;
        opened.new_layers.push(LayerRecord {
            id: info.id.to_string(),
            kind: "disk".into(),
            bytes: file_len(&path),
            file,
        });
        Ok(info)
    }

    /// Opens each of `records`' sealed chains with a fresh top of its own.
    fn disks_over(&self, records: &[DiskRecord]) -> ApiResult<Opened> {
        self.open_disks(|opened| {
            for r in records {
                let paths = self.layer_paths(&r.chain)?;
                self.add_disk(opened, &r.name, r.size_bytes, paths, r.chain.clone())?;
            }
            Ok(())
        })
    }

    /// Runs `open` on a fresh [`Opened`]; on error the layers it created go again.
    fn open_disks(&self, open: impl FnOnce(&mut Opened) -> ApiResult<()>) -> ApiResult<Opened> {
        let mut opened = Opened::default();
        match open(&mut opened) {
            Ok(()) => Ok(opened),
            Err(e) => {
                opened.discard(&self.data);
                Err(e)
            }
        }
    }

    /// Adds to `opened` a disk named `name` of `size` bytes: the sealed layers `paths` (ids
    /// `chain`, oldest first; none for an empty disk) under a fresh, empty top.
    fn add_disk(
        &self,
        opened: &mut Opened,
        name: &str,
        size: u64,
        mut paths: Vec<PathBuf>,
        mut chain: Vec<String>,
    ) -> ApiResult<()> {
        let top = new_top(
            &self.data,
            paths.last().map(PathBuf::as_path),
            geometry(size),
        )?;
        paths.push(self.data.join(&top.file));
        chain.push(top.id.clone());
        opened.new_layers.push(top);
        opened.disks.push(crate::disks::open(&paths)?);
        opened.records.push(DiskRecord {
            name: name.to_string(),
            size_bytes: size,
            chain,
        });
        Ok(())
    }

    /// A new, paused VM instance restored from `s`, with fresh disk tops over its disks (not in
    /// the catalog yet: the caller records or discards them).
    fn restore_instance(&self, s: &SnapshotRecord, mode: MemoryRestore) -> ApiResult<(Vm, Opened)> {
        let opened = self.disks_over(&s.disks)?;
        match self.restore_instance_with(s, mode, &opened) {
            Ok(vm) => Ok((vm, opened)),
            Err(e) => {
                opened.discard(&self.data);
                Err(e)
            }
        }
    }

    fn restore_instance_with(
        &self,
        s: &SnapshotRecord,
        mode: MemoryRestore,
        opened: &Opened,
    ) -> ApiResult<Vm> {
        // Frames are checked as they are read: an eager restore that meets a damaged one fails
        // before the new VM exists, a lazy one stops the VM (so no pass over every frame here).
        let (state, chain) = self.open_snapshot(s, false)?;
        let mut prepared = self.pool.take(state.config)?;
        prepared.set_disks(opened.backends())?;
        let wset = self.data.join(format!("states/{}.wset", s.id));
        snapshot::restore_from(&state, chain, &wset, prepared, mode).map_err(|e| match e {
            snap_vmm::VmError::Layer(e) => unusable(s, &e),
            e => e.into(),
        })
    }

    fn start_op(
        self: &Arc<Self>,
        kind: pb::OperationKind,
        vm_id: &str,
        snapshot_id: &str,
        ctx: &RequestCtx,
        busy: Vec<Busy>,
        work: impl FnOnce(&Daemon, &OpHandle<'_>) -> ApiResult<pb::OperationResult> + Send + 'static,
    ) -> ApiResult<pb::Operation> {
        let mut op = pb::Operation {
            id: Id::random().to_string(),
            kind: kind as i32,
            vm_id: vm_id.into(),
            snapshot_id: snapshot_id.into(),
            created_unix_ms: now_ms(),
            cancellable: true,
            ..Default::default()
        };
        op.set_state(pb::OperationState::Running);
        let record = ctx.record(&op);
        let body = prost::Message::encode_to_vec(&op);
        self.catalog.transaction(|tx| {
            tx.put_operation(&op.id, vm_id, op.created_unix_ms, false, &body)?;
            tx.put_request(&ctx.request_id, &record, now_ms())
        })?;
        let cell = Arc::new(OpCell {
            op: Mutex::new(op.clone()),
            cancel: AtomicBool::new(false),
        });
        lock(&self.ops).insert(op.id.clone(), Arc::clone(&cell));
        self.emit_operation(&op);
        let daemon = Arc::clone(self);
        std::thread::Builder::new()
            .name(format!("op-{}", &op.id[..8]))
            .spawn(move || {
                let handle = OpHandle {
                    daemon: &daemon,
                    cell: Arc::clone(&cell),
                };
                let result = work(&daemon, &handle);
                drop(busy);
                let op = {
                    let mut op = lock(&cell.op);
                    op.ended_unix_ms = now_ms();
                    op.cancellable = false;
                    match result {
                        Ok(r) => {
                            op.set_state(pb::OperationState::Succeeded);
                            op.result = Some(r);
                        }
                        Err(e) => {
                            op.set_state(if e.code == Code::Cancelled {
                                pb::OperationState::Cancelled
                            } else {
                                pb::OperationState::Failed
                            });
                            op.error = Some(pb::OperationError {
                                code: e.code as i32,
                                message: e.message,
                            });
                        }
                    }
                    op.clone()
                };
                let body = prost::Message::encode_to_vec(&op);
                if let Err(e) =
                    daemon
                        .catalog
                        .put_operation(&op.id, &op.vm_id, op.created_unix_ms, true, &body)
                {
                    tracing::error!(error = %e, op = %op.id, "cannot record the operation's end");
                }
                daemon.emit_operation(&op);
                daemon.watch_states();
            })
            .map_err(|e| ApiError::internal(format!("starting the operation: {e}")))?;
        Ok(op)
    }

    /// An operation.
    ///
    /// # Errors
    /// NOT_FOUND.
    pub fn operation(&self, id: &str) -> ApiResult<pb::Operation> {
        lock(&self.ops)
            .get(id)
            .map(|c| c.snapshot())
            .ok_or_else(|| ApiError::not_found("operation", id))
    }

    /// Every operation, oldest first.
    pub fn operations(&self) -> Vec<pb::Operation> {
        let mut ops: Vec<pb::Operation> = lock(&self.ops).values().map(|c| c.snapshot()).collect();
        ops.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
        ops
    }

    /// Asks a running operation to stop before its point of no return.
    ///
    /// # Errors
    /// NOT_FOUND, or FAILED_PRECONDITION once it cannot be cancelled.
    pub fn cancel(&self, id: &str) -> ApiResult<pb::Operation> {
        let cell = lock(&self.ops)
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::not_found("operation", id))?;
        let op = lock(&cell.op);
        if !op.cancellable {
            return Err(ApiError::precondition(format!(
                "operation {id} can no longer be cancelled (it has ended or passed its point of no return)"
            )));
        }
        cell.cancel.store(true, Ordering::Release);
        Ok(op.clone())
    }

    /// Starts a snapshot of a VM.
    ///
    /// # Errors
    /// NOT_FOUND, ABORTED if the VM is busy, ALREADY_EXISTS for a taken name,
    /// FAILED_PRECONDITION for a stopped VM.
    pub fn create_snapshot(
        self: &Arc<Self>,
        vm_id: &str,
        name: String,
        labels: BTreeMap<String, String>,
        leave_paused: bool,
        ctx: &RequestCtx,
    ) -> ApiResult<pb::Operation> {
        let busy = self.acquire(vm_id)?;
        let vm = busy.0.instance().ok_or_else(|| {
            ApiError::precondition(format!(
                "VM {vm_id} is stopped: start it (or restore a snapshot into it) first"
            ))
        })?;
        if self
            .catalog
            .snapshots()?
            .iter()
            .any(|s| s.vm_id == vm_id && s.name == name)
        {
            return Err(ApiError::new(
                Code::AlreadyExists,
                format!("VM {vm_id} already has a snapshot named {name:?}"),
            ));
        }
        let vm_id = vm_id.to_string();
        let op_vm = vm_id.clone();
        self.start_op(
            pb::OperationKind::CreateSnapshot,
            &op_vm,
            "",
            ctx,
            vec![busy],
            move |d, op| {
                let disks = d.slot(&vm_id)?.disks();
                d.snapshot_work(op, &vm, &disks, &vm_id, name, labels, leave_paused)
            },
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn snapshot_work(
        &self,
        op: &OpHandle<'_>,
        vm: &Vm,
        disks: &[Arc<Disk>],
        vm_id: &str,
        name: String,
        labels: BTreeMap<String, String>,
        leave_paused: bool,
    ) -> ApiResult<pb::OperationResult> {
        let rec = self.vm_record(vm_id)?;
        let parent = match rec.mem_chain.last() {
            None => None,
            Some(id) => {
                let path = self.layer_paths(std::slice::from_ref(id))?.remove(0);
                let layer = Layer::open(&path).map_err(|e| {
                    ApiError::internal(format!("the VM's base layer cannot be read: {e}"))
                })?;
                Some(*layer.info())
            }
        };
        op.check_cancel()?;
        op.progress("pausing", 0, 0);
        let was_running = vm.run_state() == RunState::Running;
        let paused_at = Instant::now();
        vm.pause();
        let snap_id = Id::random().to_string();
        let files = [
            self.data.join(format!("layers/{snap_id}.mlayer")),
            self.data.join(format!("states/{snap_id}.state")),
        ];
        let mut sealed = Vec::new();
        // Resumed early (after copying the pages out) by `snapshot_paused`, when it may.
        let mut resumed = None;
        let written = self.snapshot_paused(
            op,
            vm,
            (disks, &mut sealed),
            vm_id,
            &snap_id,
            parent.as_ref(),
            &files,
            (name, labels),
            (was_running && !leave_paused, paused_at, &mut resumed),
        );
        if written.is_err() {
            for f in &files {
                remove_file(f);
            }
            self.unseal(vm_id, sealed);
        }
        if was_running && resumed.is_none() && (written.is_err() || !leave_paused) {
            vm.resume()?;
        }
        let pause_us = resumed.unwrap_or_else(|| paused_at.elapsed()).as_micros() as u64;
        op.set_pause(pause_us);
        let mut snap = written?;
        snap.pause_us = pause_us;
        self.catalog.transaction(|tx| tx.update_snapshot(&snap))?;
        self.emit(pb::event::Kind::SnapshotCreated(Self::to_pb_snapshot(
            &snap,
        )));
        Ok(pb::OperationResult {
            snapshot: Some(Self::to_pb_snapshot(&snap)),
            ..Default::default()
        })
    }

    /// After a failed snapshot: each sealed disk writes into its old top again and the new top
    /// goes; where the VM already wrote into the new top (it resumed early), the sealed layer
    /// stays in the VM's chain under it instead. Nothing written is lost either way.
    fn unseal(&self, vm_id: &str, sealed: Vec<Sealed>) {
        let mut kept = Vec::new();
        for (i, d, top) in sealed {
            match d.undo_seal() {
                Ok(path) => {
                    remove_file(&path);
                }
                Err(_) => kept.push((i, top)),
            }
        }
        if kept.is_empty() {
            return;
        }
        let adopted = self.catalog.transaction(|tx| {
            let Some(mut rec) = tx.vm(vm_id)? else {
                return Ok(());
            };
            for (i, top) in &kept {
                tx.insert_layer(top)?;
                if let Some(d) = rec.disks.get_mut(*i) {
                    d.chain.push(top.id.clone());
                }
            }
            tx.update_vm(&rec)
        });
        if let Err(e) = adopted {
            tracing::error!(error = %e, vm = vm_id, "cannot record the disks' new tops");
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn snapshot_paused(
        &self,
        op: &OpHandle<'_>,
        vm: &Vm,
        (disks, sealed): (&[Arc<Disk>], &mut Vec<Sealed>),
        vm_id: &str,
        snap_id: &str,
        parent: Option<&snap_mem::layer::LayerInfo>,
        [mem_file, state_file]: &[PathBuf; 2],
        (name, labels): (String, BTreeMap<String, String>),
        (may_resume, paused_at, resumed): (bool, Instant, &mut Option<Duration>),
    ) -> ApiResult<SnapshotRecord> {
        let captured = snapshot::capture(vm, parent)?;
        // The disks' half: each top is sealed as it is now (capture flushed it) and the VM
        // writes into a fresh top from here on.
        op.progress("sealing disks", 0, 0);
        let mut new_tops = Vec::new();
        let mut sealed_bytes = 0;
        for (i, d) in disks.iter().enumerate() {
            let file = crate::disks::layer_file(&Id::random());
            let path = self.data.join(&file);
            let info = d
                .seal(&path)
                .map_err(|e| crate::disks::disk_error("sealing a disk", &e))?;
            sealed_bytes += file_len(&info.path);
            let top = LayerRecord {
                id: d
                    .layers()
                    .last()
                    .map(|l| l.id.to_string())
                    .unwrap_or_default(),
                kind: "disk".into(),
                bytes: file_len(&path),
                file,
            };
            sealed.push((i, Arc::clone(d), top.clone()));
            new_tops.push(top);
            self.failpoints.pass("snapshot.seal-disk")?;
        }
        // With few enough pages, copy them out and let the VM run on while the layer is
        // written and synced: the pause then costs a memory copy, not a write and an fsync.
        let bytes = captured.pages() * 4096;
        let copy = if may_resume && bytes <= self.copy_before_resume {
            let copy = captured.copy_pages(vm)?;
            vm.resume()?;
            *resumed = Some(paused_at.elapsed());
            Some(copy)
        } else {
            None
        };
        op.progress("writing memory", 0, captured.pages() * 4096);
        self.failpoints.pass("snapshot.write-memory")?;
        let info = match &copy {
            Some(copy) => captured.write_memory_from(copy, mem_file, &self.layer_options)?,
            None => captured.write_memory(vm, mem_file, &self.layer_options)?,
        };
        drop(copy);
        captured
            .state
            .write_file(state_file)
            .map_err(|e| ApiError::internal(format!("writing the VM state: {e}")))?;
        op.progress(
            "publishing",
            captured.pages() * 4096,
            captured.pages() * 4096,
        );
        self.failpoints.pass("snapshot.write-state")?;
        op.no_return()?;
        self.failpoints.pass("snapshot.before-publish")?;
        let layer = LayerRecord {
            id: info.id.to_string(),
            kind: "mem".into(),
            file: format!("layers/{snap_id}.mlayer"),
            bytes: file_len(mem_file),
        };
        let snap = self.catalog.transaction(|tx| {
            let mut rec = tx
                .vm(vm_id)?
                .ok_or_else(|| CatalogError::Damaged("the VM disappeared".into()))?;
            let mut mem_chain = rec.mem_chain.clone();
            mem_chain.push(layer.id.clone());
            let snap = SnapshotRecord {
                id: snap_id.to_string(),
                name,
                vm_id: rec.id.clone(),
                parent_id: rec.current_snapshot.clone(),
                labels,
                created_ms: now_ms(),
                memory_bytes: rec.memory_bytes,
                vcpus: rec.vcpus,
                guest: rec.guest,
                stored_bytes: layer.bytes + file_len(state_file) + sealed_bytes,
                pause_us: 0,
                mem_chain: mem_chain.clone(),
                disks: rec.disks.clone(),
            };
            tx.insert_layer(&layer)?;
            tx.insert_snapshot(&snap)?;
            for (d, top) in rec.disks.iter_mut().zip(&new_tops) {
                if let Some(sealed) = d.chain.last() {
                    if let Some(l) = tx.layer(sealed)? {
                        tx.set_layer_bytes(&l.id, file_len(&self.data.join(&l.file)))?;
                    }
                }
                tx.insert_layer(top)?;
                d.chain.push(top.id.clone());
            }
            rec.current_snapshot = Some(snap.id.clone());
            rec.mem_chain = mem_chain;
            tx.update_vm(&rec)?;
            if self.failpoints.pass("snapshot.publish").is_err() {
                return Err(CatalogError::Injected("snapshot.publish"));
            }
            Ok(snap)
        })?;
        captured.commit(vm, &info);
        Ok(snap)
    }

    /// Starts a restore: a revert of `vm_id` (`Some`) or a restore into a new VM named `name`.
    ///
    /// # Errors
    /// NOT_FOUND, ABORTED, ALREADY_EXISTS for a taken name, FAILED_PRECONDITION for a VM of
    /// another shape.
    #[allow(clippy::too_many_arguments)]
    pub fn restore_snapshot(
        self: &Arc<Self>,
        snapshot_id: &str,
        target: Option<&str>,
        new_vm: Option<(String, BTreeMap<String, String>)>,
        mode: pb::MemoryRestoreMode,
        leave_paused: bool,
        ctx: &RequestCtx,
    ) -> ApiResult<pb::Operation> {
        let snap = self.snapshot_record(snapshot_id)?;
        if let Some(vm_id) = target {
            let busy = self.acquire(vm_id)?;
            let rec = self.vm_record(vm_id)?;
            if (rec.memory_bytes, rec.vcpus) != (snap.memory_bytes, snap.vcpus) {
                return Err(ApiError::precondition(format!(
                    "snapshot {} is of a VM with {} bytes and {} vCPUs; VM {vm_id} has {} bytes and {} vCPUs: restore it into a new VM instead",
                    snap.id, snap.memory_bytes, snap.vcpus, rec.memory_bytes, rec.vcpus
                )));
            }
            let vm_id = vm_id.to_string();
            return self.start_op(
                pb::OperationKind::RestoreSnapshot,
                &vm_id.clone(),
                snapshot_id,
                ctx,
                vec![busy],
                move |d, op| d.revert_work(op, &vm_id, &snap, leave_paused),
            );
        }
        let (name, labels) = new_vm.expect("a restore has a target");
        self.check_new_names(std::slice::from_ref(&name))?;
        let snapshot_id = snapshot_id.to_string();
        self.start_op(
            pb::OperationKind::RestoreSnapshot,
            "",
            &snapshot_id,
            ctx,
            Vec::new(),
            move |d, op| {
                let vm = d.restore_new(op, &snap, name, labels, mode_of(mode), leave_paused)?;
                Ok(pb::OperationResult {
                    vms: vec![vm],
                    ..Default::default()
                })
            },
        )
    }

    fn check_new_names(&self, names: &[String]) -> ApiResult<()> {
        let vms = self.catalog.vms()?;
        for n in names {
            if vms.iter().any(|v| &v.name == n) {
                return Err(ApiError::new(
                    Code::AlreadyExists,
                    format!("a VM named {n:?} exists"),
                ));
            }
        }
        Ok(())
    }

    fn revert_work(
        &self,
        op: &OpHandle<'_>,
        vm_id: &str,
        snap: &SnapshotRecord,
        leave_paused: bool,
    ) -> ApiResult<pb::OperationResult> {
        let slot = self.slot(vm_id)?;
        op.progress("checking the snapshot", 0, 0);
        let (state, chain) = self.open_snapshot(snap, true)?;
        op.no_return()?;
        op.progress("reverting", 0, snap.memory_bytes);
        let (vm, opened) = match slot.instance() {
            Some(vm) if !matches!(vm.run_state(), RunState::Failed(_)) => {
                let opened = self.disks_over(&snap.disks)?;
                let was_running = vm.run_state() == RunState::Running;
                let paused_at = Instant::now();
                vm.pause();
                if let Err(e) = vm.restore_in_place_with_disks(&state, &chain, &opened.backends()) {
                    // The VM is as it was (a failed revert changes nothing).
                    opened.discard(&self.data);
                    if was_running {
                        vm.resume()?;
                    }
                    return Err(e.into());
                }
                op.set_pause(paused_at.elapsed().as_micros() as u64);
                (vm, opened)
            }
            _ => {
                let (vm, opened) = self.restore_instance(snap, MemoryRestore::Eager)?;
                (Arc::new(vm), opened)
            }
        };
        let old = self.catalog.transaction(|tx| {
            still_there(tx, snap)?;
            for l in &opened.new_layers {
                tx.insert_layer(l)?;
            }
            let mut rec = tx
                .vm(vm_id)?
                .ok_or_else(|| CatalogError::Damaged("the VM disappeared".into()))?;
            rec.current_snapshot = Some(snap.id.clone());
            rec.mem_chain.clone_from(&snap.mem_chain);
            rec.disks.clone_from(&opened.records);
            rec.guest = snap.guest;
            tx.update_vm(&rec)?;
            tx.collect()
        })?;
        if !leave_paused {
            run_on(&vm)?;
        }
        slot.set_instance(Some(vm), opened.disks, true);
        self.remove_layer_files(old);
        op.progress("done", snap.memory_bytes, snap.memory_bytes);
        Ok(pb::OperationResult {
            vms: vec![self.get_vm(vm_id)?],
            ..Default::default()
        })
    }

    fn restore_new(
        &self,
        op: &OpHandle<'_>,
        snap: &SnapshotRecord,
        name: String,
        labels: BTreeMap<String, String>,
        mode: MemoryRestore,
        leave_paused: bool,
    ) -> ApiResult<pb::Vm> {
        op.check_cancel()?;
        op.progress("restoring", 0, snap.memory_bytes);
        let (vm, opened) = self.restore_instance(snap, mode)?;
        let rec = VmRecord {
            id: Id::random().to_string(),
            name,
            memory_bytes: snap.memory_bytes,
            vcpus: snap.vcpus,
            guest: snap.guest,
            labels,
            state: if leave_paused { "paused" } else { "running" }.into(),
            current_snapshot: Some(snap.id.clone()),
            mem_chain: snap.mem_chain.clone(),
            disks: opened.records.clone(),
            created_ms: now_ms(),
            failure: None,
        };
        let published = self.catalog.transaction(|tx| {
            still_there(tx, snap)?;
            for l in &opened.new_layers {
                tx.insert_layer(l)?;
            }
            tx.insert_vm(&rec)
        });
        if let Err(e) = published {
            drop(vm);
            opened.discard(&self.data);
            return Err(e.into());
        }
        let vm = Arc::new(vm);
        let slot = Arc::new(Slot::new(&rec.id, &rec.state));
        if !leave_paused {
            run_on(&vm)?;
        }
        slot.set_instance(Some(vm), opened.disks, true);
        lock(&self.slots).insert(rec.id.clone(), slot);
        self.emit_vm(&rec.id);
        self.get_vm(&rec.id)
    }

    /// Starts a clone: `count` new VMs named `<prefix>-<i>` from one snapshot, all or none.
    ///
    /// # Errors
    /// NOT_FOUND, ALREADY_EXISTS for a taken name.
    pub fn clone_snapshot(
        self: &Arc<Self>,
        snapshot_id: &str,
        spec: CloneSpec,
        ctx: &RequestCtx,
    ) -> ApiResult<pb::Operation> {
        let CloneSpec {
            count,
            prefix,
            labels,
            mode,
            leave_paused,
        } = spec;
        let snap = self.snapshot_record(snapshot_id)?;
        let names: Vec<String> = (0..count).map(|i| format!("{prefix}-{i}")).collect();
        let count = u64::from(count);
        self.check_new_names(&names)?;
        self.start_op(
            pb::OperationKind::CloneSnapshot,
            "",
            snapshot_id,
            ctx,
            Vec::new(),
            move |d, op| {
                let mut vms = Vec::new();
                for (i, name) in names.into_iter().enumerate() {
                    op.progress(&format!("clone {i}"), i as u64, count);
                    match d.restore_new(
                        op,
                        &snap,
                        name,
                        labels.clone(),
                        mode_of(mode),
                        leave_paused,
                    ) {
                        Ok(vm) => vms.push(vm),
                        Err(e) => {
                            // All or none: the clones made so far go again.
                            for vm in &vms {
                                let _ = d.remove_vm(&vm.id, false);
                            }
                            return Err(e);
                        }
                    }
                }
                Ok(pb::OperationResult {
                    vms,
                    ..Default::default()
                })
            },
        )
    }

    /// Starts the deletion of a snapshot (and its descendants if asked).
    ///
    /// # Errors
    /// NOT_FOUND.
    pub fn delete_snapshot(
        self: &Arc<Self>,
        snapshot_id: &str,
        with_descendants: bool,
        ctx: &RequestCtx,
    ) -> ApiResult<pb::Operation> {
        let snap = self.snapshot_record(snapshot_id)?;
        let id = snap.id.clone();
        self.start_op(
            pb::OperationKind::DeleteSnapshot,
            &snap.vm_id,
            snapshot_id,
            ctx,
            Vec::new(),
            move |d, op| {
                op.no_return()?;
                let (deleted, freed) = d.delete_snapshots(&[id], with_descendants)?;
                Ok(pb::OperationResult {
                    deleted_snapshot_ids: deleted,
                    freed_bytes: freed,
                    ..Default::default()
                })
            },
        )
    }

    /// Deletes snapshots `roots` (with their descendants if asked) in one catalog transaction:
    /// their children are re-parented to the nearest surviving ancestor, VMs based on them keep
    /// their memory chain, and layers nobody names any more are freed. Returns the deleted ids
    /// and the bytes freed on disk.
    fn delete_snapshots(
        &self,
        roots: &[String],
        with_descendants: bool,
    ) -> ApiResult<(Vec<String>, u64)> {
        let (deleted, freed_layers) = self.catalog.transaction(|tx| {
            let all = tx.snapshots()?;
            let mut doomed: BTreeSet<String> = roots.iter().cloned().collect();
            if with_descendants {
                loop {
                    let before = doomed.len();
                    for s in &all {
                        if s.parent_id.as_ref().is_some_and(|p| doomed.contains(p)) {
                            doomed.insert(s.id.clone());
                        }
                    }
                    if doomed.len() == before {
                        break;
                    }
                }
            }
            let parent_of: HashMap<String, Option<String>> = all
                .iter()
                .map(|s| (s.id.clone(), s.parent_id.clone()))
                .collect();
            let survivor = |start: Option<&str>| -> Option<String> {
                let mut id = start.map(str::to_string);
                while let Some(i) = id {
                    if !doomed.contains(&i) {
                        return Some(i);
                    }
                    id = parent_of.get(&i).cloned().flatten();
                }
                None
            };
            for s in &all {
                if !doomed.contains(&s.id)
                    && s.parent_id.as_ref().is_some_and(|p| doomed.contains(p))
                {
                    let mut s = s.clone();
                    s.parent_id = survivor(s.parent_id.as_deref());
                    tx.update_snapshot(&s)?;
                }
            }
            for mut vm in tx.vms()? {
                if vm
                    .current_snapshot
                    .as_ref()
                    .is_some_and(|c| doomed.contains(c))
                {
                    vm.current_snapshot = survivor(vm.current_snapshot.as_deref());
                    tx.update_vm(&vm)?;
                }
            }
            for id in &doomed {
                tx.delete_snapshot(id)?;
            }
            let own_layers: Vec<String> = all
                .iter()
                .filter(|s| doomed.contains(&s.id))
                .filter_map(|s| s.mem_chain.last().cloned())
                .collect();
            Ok((
                doomed.into_iter().collect::<Vec<_>>(),
                (tx.collect()?, own_layers),
            ))
        })?;
        let (freed_layers, own_layers) = freed_layers;
        let mut freed = 0;
        for layer in own_layers {
            freed += self.merge_into_only_child(&layer)?;
        }
        for id in &deleted {
            freed += remove_file(&self.data.join(format!("states/{id}.state")));
            freed += remove_file(&self.data.join(format!("states/{id}.wset")));
            self.emit(pb::event::Kind::SnapshotDeleted(id.clone()));
        }
        for l in freed_layers {
            freed += remove_file(&self.data.join(&l.file));
        }
        Ok((deleted, freed))
    }

    /// After a delete: memory layer `id`, if some layer still builds on it, is merged into that
    /// layer when it is the only one that does and it is the end of every chain naming it (a
    /// leaf). The merged file replaces the child's (same layer id), so the pages the child
    /// overrides are freed; returns the bytes freed. Nothing happens otherwise: a layer that
    /// VMs or several children use directly stays whole.
    ///
    /// Crash safe: the merged layer goes to a new file; one catalog transaction re-points the
    /// child's row at it and drops `id` from every chain; the old files go after the commit
    /// (or, after a crash, as orphans at the next start).
    fn merge_into_only_child(&self, id: &str) -> ApiResult<u64> {
        let Some((layer, child)) = self.catalog.transaction(|tx| merge_plan(tx, id))? else {
            return Ok(0);
        };
        let out_file = format!("layers/{}.mlayer", Id::random());
        let out = self.data.join(&out_file);
        let open = |l: &LayerRecord| {
            Layer::open(self.data.join(&l.file))
                .map_err(|e| ApiError::internal(format!("merging layers: {e}")))
        };
        snap_mem::layer::merge_into_child(&open(&layer)?, &open(&child)?, &out, None)
            .map_err(|e| ApiError::internal(format!("merging layers: {e}")))?;
        let bytes = file_len(&out);
        let committed = self.catalog.transaction(|tx| {
            if merge_plan(tx, id)? != Some((layer.clone(), child.clone())) {
                return Ok(None);
            }
            for mut s in tx.snapshots()? {
                if s.mem_chain.contains(&layer.id) {
                    s.mem_chain.retain(|l| l != &layer.id);
                    tx.update_snapshot(&s)?;
                }
            }
            for mut vm in tx.vms()? {
                if vm.mem_chain.contains(&layer.id) {
                    vm.mem_chain.retain(|l| l != &layer.id);
                    tx.update_vm(&vm)?;
                }
            }
            tx.set_layer_file(&child.id, &out_file, bytes)?;
            Ok(Some(tx.collect()?))
        })?;
        let Some(unused) = committed else {
            // The tree changed meanwhile (a new snapshot builds on the child): no merge.
            remove_file(&out);
            return Ok(0);
        };
        let released = remove_file(&self.data.join(&child.file)) + self.remove_layer_files(unused);
        Ok(released.saturating_sub(bytes))
    }

    /// Starts the deletion of a VM that is not running (and of its snapshots if asked).
    ///
    /// # Errors
    /// NOT_FOUND, ABORTED, FAILED_PRECONDITION for a running VM.
    pub fn delete_vm(
        self: &Arc<Self>,
        vm_id: &str,
        with_snapshots: bool,
        ctx: &RequestCtx,
    ) -> ApiResult<pb::Operation> {
        let busy = self.acquire(vm_id)?;
        if busy.0.state().0 == "running" {
            return Err(ApiError::precondition(format!(
                "VM {vm_id} is running: stop it first"
            )));
        }
        let id = vm_id.to_string();
        self.start_op(
            pb::OperationKind::DeleteVm,
            vm_id,
            "",
            ctx,
            vec![busy],
            move |d, op| {
                op.no_return()?;
                let (deleted, freed) = d.remove_vm(&id, with_snapshots)?;
                Ok(pb::OperationResult {
                    deleted_snapshot_ids: deleted,
                    freed_bytes: freed,
                    ..Default::default()
                })
            },
        )
    }

    fn remove_vm(&self, id: &str, with_snapshots: bool) -> ApiResult<(Vec<String>, u64)> {
        let slot = self.slot(id)?;
        slot.set_instance(None, Vec::new(), false);
        let (mut deleted, mut freed) = (Vec::new(), 0);
        if with_snapshots {
            let mine: Vec<String> = self
                .catalog
                .snapshots()?
                .into_iter()
                .filter(|s| s.vm_id == id)
                .map(|s| s.id)
                .collect();
            (deleted, freed) = self.delete_snapshots(&mine, false)?;
        }
        let layers = self.catalog.transaction(|tx| {
            tx.delete_vm(id)?;
            tx.collect()
        })?;
        for l in layers {
            freed += remove_file(&self.data.join(&l.file));
        }
        lock(&self.slots).remove(id);
        self.emit(pb::event::Kind::Vm(pb::Vm {
            id: id.into(),
            state: pb::VmState::Unspecified as i32,
            ..Default::default()
        }));
        Ok((deleted, freed))
    }

    /// Bytes of all files under the data directory's layer and state directories.
    pub fn stored_bytes(&self) -> u64 {
        ["layers", "states"]
            .iter()
            .filter_map(|d| std::fs::read_dir(self.data.join(d)).ok())
            .flat_map(|r| r.flatten())
            .map(|e| e.metadata().map_or(0, |m| m.len()))
            .sum()
    }

    /// Waits (blocking) until `id` has ended or `timeout` passed.
    pub fn wait_blocking(&self, id: &str, timeout: Duration) -> ApiResult<pb::Operation> {
        let deadline = Instant::now() + timeout;
        loop {
            let op = self.operation(id)?;
            if op.ended_unix_ms != 0 || Instant::now() >= deadline {
                return Ok(op);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// The merge [`Daemon::merge_into_only_child`] would do for memory layer `id`: the layer and its
/// only child, if the child follows it in every chain that names it and ends every chain that
/// names the child.
fn merge_plan(
    tx: &crate::catalog::Tx<'_>,
    id: &str,
) -> Result<Option<(LayerRecord, LayerRecord)>, CatalogError> {
    let chains: Vec<Vec<String>> = tx
        .snapshots()?
        .into_iter()
        .map(|s| s.mem_chain)
        .chain(tx.vms()?.into_iter().map(|v| v.mem_chain))
        .collect();
    let mut child: Option<&String> = None;
    for chain in &chains {
        if let Some(pos) = chain.iter().position(|l| l == id) {
            let Some(next) = chain.get(pos + 1) else {
                // Something is based on the layer itself.
                return Ok(None);
            };
            if child.is_some_and(|c| c != next) {
                return Ok(None);
            }
            child = Some(next);
        }
    }
    let Some(child) = child else {
        return Ok(None);
    };
    let leaf = chains.iter().all(|chain| {
        chain
            .iter()
            .position(|l| l == child)
            .is_none_or(|p| p + 1 == chain.len())
    });
    if !leaf {
        return Ok(None);
    }
    match (tx.layer(id)?, tx.layer(child)?) {
        (Some(l), Some(c)) if l.kind == "mem" && c.kind == "mem" => Ok(Some((l, c))),
        _ => Ok(None),
    }
}

/// Checks, inside the transaction that records a restore, that the layers the restored VM builds
/// on are still in the catalog (a delete of the snapshot may have run meanwhile).
fn still_there(tx: &crate::catalog::Tx<'_>, snap: &SnapshotRecord) -> Result<(), CatalogError> {
    let chains = snap
        .mem_chain
        .iter()
        .chain(snap.disks.iter().flat_map(|d| &d.chain));
    for id in chains {
        if tx.layer(id)?.is_none() {
            return Err(CatalogError::Gone(format!(
                "snapshot {} was deleted while it was being restored",
                snap.id
            )));
        }
    }
    Ok(())
}
