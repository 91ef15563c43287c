//! Remote stores: snapshots pushed to S3-compatible object storage (see `snap_remote`), listed,
//! pulled into the local catalog, deleted, and swept.
//!
//! - **Push** reads the snapshot whole (admitted like a restore: no delete or merge of its
//!   layers meanwhile) and writes its chunks, then its manifest (`snap_remote::transfer::push`).
//!   It changes nothing local.
//! - **Pull** writes the snapshot `S` (admitted as a write of `S`): it fetches the manifest,
//!   shares the layers this host already holds with the same content (a prefix of each chain:
//!   same id, same digest, same parent), pulls the others into claimed files, and records the
//!   layers and the snapshot in one catalog transaction that first checks that every shared
//!   layer is still what it was. The snapshot keeps its id, name, VM id and labels; its parent is
//!   kept if that snapshot is here. A failure or a crash before the transaction leaves nothing.
//! - **Restore straight from the remote** builds new VMs without pulling: memory through a
//!   page source over the manifest, disks (lazy and prefetch modes) as layers whose blocks
//!   arrive as they are read (see [`crate::filling`]), eager mode fetching both first.
//! - **Delete** removes the snapshot's manifests from the remote; **sweep** removes the chunks
//!   no manifest names once they are older than the grace period (`Remote::sweep` says why that
//!   is safe while other hosts push).
//!
//! The remote's calls run on a small runtime of their own, driven from the operation's thread.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use snap_api::v1 as pb;
use snap_core::Id;
use snap_remote::cache::ChunkCache;
use snap_remote::manifest::{Guest, ManifestId, SnapshotInfo};
use snap_remote::source::RemoteMemory;
use snap_remote::store::StoredManifest;
use snap_remote::transfer::{self, DiskSource, PushSource, Transfer, TransferError};
use snap_remote::{Credentials, Manifest, Remote, RemoteError};

use crate::api::convert;
use crate::catalog::{DiskRecord, GuestSpec, LayerKind, LayerRecord, SnapshotRecord};
use crate::daemon::Daemon;
use crate::error::{Error, ErrorKind, Result};
use crate::ids::{LayerId, SnapshotId, VmId};
use crate::ops::requests::RequestCtx;
use crate::ops::scheduler::{Footprint, Resource};
use crate::ops::{OpSpec, Progress};
use crate::restore::reads_snapshot;
use crate::store::Store;

/// Default grace period of a sweep: a day.
pub const DEFAULT_GRACE_MS: i64 = 24 * 3600 * 1000;

/// Chunk transfers running at once per operation.
const IN_FLIGHT: usize = 32;

/// The remotes the daemon was configured with.
pub struct Remotes {
    runtime: Option<tokio::runtime::Runtime>,
    stores: BTreeMap<String, Remote>,
    grace_ms: i64,
    /// The host's chunk cache, for restores straight from a remote.
    cache: Option<Arc<ChunkCache>>,
}

impl std::fmt::Debug for Remotes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remotes")
            .field("stores", &self.stores)
            .field("grace_ms", &self.grace_ms)
            .finish_non_exhaustive()
    }
}

impl Drop for Remotes {
    fn drop(&mut self) {
        // Dropped from async code at shutdown: a blocking drop of the runtime would panic there.
        if let Some(r) = self.runtime.take() {
            r.shutdown_background();
        }
    }
}

impl Default for Remotes {
    fn default() -> Self {
        Self {
            runtime: None,
            stores: BTreeMap::new(),
            grace_ms: DEFAULT_GRACE_MS,
            cache: None,
        }
    }
}

impl Remotes {
    /// The remotes `specs` (`NAME=URL` each), with `credentials` for all of them.
    ///
    /// # Errors
    /// A message naming the spec or URL that is not usable.
    pub fn new(
        specs: &[String],
        credentials: Option<&Credentials>,
        grace_ms: i64,
    ) -> std::result::Result<Self, String> {
        let mut stores = BTreeMap::new();
        for spec in specs {
            let (name, url) = spec
                .split_once('=')
                .ok_or_else(|| format!("--remote {spec:?}: expected NAME=URL"))?;
            crate::api::validate::check_name("remote", name)
                .map_err(|e| format!("--remote {spec:?}: {e}"))?;
            let credentials = credentials.ok_or_else(|| {
                "--remote needs credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment, or --remote-credentials FILE".to_string()
            })?;
            let remote = Remote::new(url, credentials).map_err(|e| e.to_string())?;
            if stores.insert(name.to_string(), remote).is_some() {
                return Err(format!("--remote: {name:?} is named twice"));
            }
        }
        if grace_ms < 1000 {
            return Err(format!(
                "the remote grace period must be at least 1 s, not {grace_ms} ms"
            ));
        }
        if grace_ms < 3_600_000 && !stores.is_empty() {
            tracing::warn!(
                grace_ms,
                "a remote grace period under an hour: a push slower than half of it fails, and clocks must agree closely"
            );
        }
        let runtime = if stores.is_empty() {
            None
        } else {
            Some(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("snapd-remote")
                    .enable_all()
                    .build()
                    .map_err(|e| format!("starting the remote runtime: {e}"))?,
            )
        };
        Ok(Self {
            runtime,
            stores,
            grace_ms,
            cache: None,
        })
    }

    /// Gives the remotes the host's chunk cache in `dir`, of at most `bytes` (only if a remote
    /// is configured).
    ///
    /// # Errors
    /// The cache directory's error.
    pub fn with_cache(
        mut self,
        dir: &std::path::Path,
        bytes: u64,
    ) -> std::result::Result<Self, String> {
        if !self.stores.is_empty() {
            self.cache = Some(Arc::new(ChunkCache::open(dir, bytes)?));
        }
        Ok(self)
    }

    /// Reads credentials from `path`: lines `AWS_ACCESS_KEY_ID=...` and
    /// `AWS_SECRET_ACCESS_KEY=...` (blank lines and `#` comments allowed).
    ///
    /// # Errors
    /// A message naming the file and what is missing.
    pub fn credentials_file(path: &std::path::Path) -> std::result::Result<Credentials, String> {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|e| format!("--remote-credentials {}: {e}", path.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(format!(
                "--remote-credentials {}: its mode {:o} lets other users read the remote's secret key: chmod 600 it",
                path.display(),
                mode & 0o777
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--remote-credentials {}: {e}", path.display()))?;
        let mut values = HashMap::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line.split_once('=').ok_or_else(|| {
                format!(
                    "--remote-credentials {}: a line is not KEY=VALUE",
                    path.display()
                )
            })?;
            values.insert(k.trim().to_string(), v.trim().to_string());
        }
        let get = |k: &str| {
            values
                .get(k)
                .filter(|v| !v.is_empty())
                .cloned()
                .ok_or_else(|| format!("--remote-credentials {}: no {k}", path.display()))
        };
        Ok(Credentials {
            access_key: get("AWS_ACCESS_KEY_ID")?,
            secret_key: get("AWS_SECRET_ACCESS_KEY")?,
        })
    }

    /// The remote named `name`.
    fn get(&self, name: &str) -> Result<(&Remote, &tokio::runtime::Handle)> {
        match (self.stores.get(name), &self.runtime) {
            (Some(r), Some(rt)) => Ok((r, rt.handle())),
            _ if self.stores.is_empty() => Err(Error::precondition(
                "no remote store is configured: start snapd with --remote NAME=URL",
            )),
            _ => Err(Error::invalid(
                "remote",
                format!(
                    "no remote named {name:?} (configured: {})",
                    self.stores.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            )),
        }
    }

    /// Remote `name`, the runtime that drives it and the host's chunk cache, if it is
    /// configured.
    pub(crate) fn store(
        &self,
        name: &str,
    ) -> Option<(Remote, tokio::runtime::Handle, Arc<ChunkCache>)> {
        let (remote, handle) = self.get(name).ok()?;
        Some((remote.clone(), handle.clone(), self.cache.clone()?))
    }

    /// The host's chunk cache's counters, if it has one.
    pub fn cache_stats(&self) -> Option<snap_remote::cache::CacheStats> {
        self.cache.as_ref().map(|c| c.stats())
    }

    /// The names configured.
    pub fn names(&self) -> Vec<String> {
        self.stores.keys().cloned().collect()
    }
}

/// The error a client sees for a remote's failure.
fn remote_error(name: &str, e: TransferError) -> Error {
    match e {
        TransferError::Cancelled => Error::cancelled(),
        TransferError::Local(m) => Error::internal(m),
        TransferError::Expired { .. } => Error::new(ErrorKind::Unavailable, e.to_string()),
        TransferError::Remote(r) => from_remote(name, r),
    }
}

fn from_remote(name: &str, e: RemoteError) -> Error {
    let kind = match &e {
        RemoteError::Url { .. } => ErrorKind::InvalidArgument,
        RemoteError::Refused { .. } | RemoteError::Chunk { .. } | RemoteError::Manifest { .. } => {
            ErrorKind::FailedPrecondition
        }
        RemoteError::Missing { .. } => ErrorKind::NotFound,
        RemoteError::Unavailable { .. } => ErrorKind::Unavailable,
    };
    Error::new(kind, format!("remote {name:?}: {e}"))
}

fn raw(id: Id) -> [u8; 16] {
    id.0
}

/// What the manifest says of a local snapshot.
fn snapshot_info(s: &SnapshotRecord, vm_name: String) -> SnapshotInfo {
    let g = s.guest;
    SnapshotInfo {
        id: raw(s.id.0),
        name: s.name.clone(),
        vm_id: raw(s.vm_id.0),
        vm_name,
        parent_id: s.parent_id.map(|p| raw(p.0)),
        labels: s.labels.clone(),
        created_ms: s.created_ms,
        memory_bytes: s.memory_bytes,
        vcpus: s.vcpus,
        guest: Guest {
            seed: g.seed,
            working_set_pages: g.working_set_pages,
            mutations_per_tick: g.mutations_per_tick,
            ticks: g.ticks,
            disk_sectors_per_tick: g.disk_sectors_per_tick,
        },
        pause_us: s.pause_us,
    }
}

/// The catalog's form of a manifest's guest program.
fn guest_spec(g: Guest) -> GuestSpec {
    GuestSpec {
        seed: g.seed,
        working_set_pages: g.working_set_pages,
        mutations_per_tick: g.mutations_per_tick,
        ticks: g.ticks,
        disk_sectors_per_tick: g.disk_sectors_per_tick,
    }
}

/// The API's view of a manifest.
fn remote_snapshot(remote: &str, stored: &StoredManifest, m: &Manifest) -> pb::RemoteSnapshot {
    let s = &m.snapshot;
    pb::RemoteSnapshot {
        remote: remote.to_string(),
        snapshot_id: Id(s.id).to_string(),
        manifest_id: stored.id.to_string(),
        name: s.name.clone(),
        vm_id: Id(s.vm_id).to_string(),
        vm_name: s.vm_name.clone(),
        parent_id: s.parent_id.map(|p| Id(p).to_string()).unwrap_or_default(),
        labels: s.labels.clone().into_iter().collect(),
        created_unix_ms: s.created_ms,
        memory_bytes: s.memory_bytes,
        vcpus: s.vcpus,
        pushed_unix_ms: stored.modified_ms,
        content_bytes: transfer::pull_bytes(m),
        chunks: m.chunks().len() as u64,
    }
}

/// A progress callback for a transfer: moves the operation's progress and stops when the client
/// cancels (or a failpoint says to fail).
struct Meter<'a> {
    op: &'a Progress<'a>,
    daemon: &'a Daemon,
    point: &'static str,
    done: AtomicU64,
    total: u64,
    injected: AtomicBool,
}

impl<'a> Meter<'a> {
    fn new(op: &'a Progress<'a>, daemon: &'a Daemon, point: &'static str, total: u64) -> Self {
        Self {
            op,
            daemon,
            point,
            done: AtomicU64::new(0),
            total,
            injected: AtomicBool::new(false),
        }
    }

    fn tick(&self, n: u64) -> bool {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        self.op.advance(done, self.total);
        if self.daemon.failpoints.pass(self.point).is_err() {
            self.injected.store(true, Ordering::Relaxed);
            return false;
        }
        !self.op.is_cancelled()
    }

    /// A transfer's error, or the failpoint's.
    fn error(&self, remote: &str, e: TransferError) -> Error {
        if self.injected.load(Ordering::Relaxed) {
            return Error::internal(format!("failpoint {} injected a failure", self.point));
        }
        remote_error(remote, e)
    }
}

/// A restore or clone straight from a remote.
#[derive(Debug, Clone)]
pub struct RemoteRestore {
    /// The remote's name.
    pub remote: String,
    /// The snapshot there.
    pub snapshot: SnapshotId,
    /// RestoreSnapshot or CloneSnapshot.
    pub kind: pb::OperationKind,
    /// The new VMs' names.
    pub names: Vec<String>,
    /// Their labels.
    pub labels: BTreeMap<String, String>,
    /// How their memory is installed.
    pub mode: snap_vmm::MemoryRestore,
    /// Leave them paused.
    pub leave_paused: bool,
    /// Wait for conflicting operations.
    pub wait: bool,
}

/// The window of a manifest's memory (its largest frame), in pages.
fn source_window_pages(m: &Manifest) -> u64 {
    m.memory
        .iter()
        .map(|l| u64::from(l.frame_size / 4096))
        .max()
        .unwrap_or(64)
}

/// What a pull decided for one layer.
struct PulledLayer {
    id: LayerId,
    /// The catalog's file for it (shared layers: as it was when checked).
    file: String,
    /// Shared with a layer already here: its reference as a parent, read when it was checked
    /// (its file is not opened again: the transaction checks it is still the same).
    own: Option<snap_core::ParentRef>,
}

impl PulledLayer {
    fn shared(&self) -> bool {
        self.own.is_some()
    }
}

impl Daemon {
    /// The configured remotes.
    pub fn remotes(&self) -> &Remotes {
        &self.remotes
    }

    /// Starts a push of snapshot `snapshot` to remote `remote`.
    ///
    /// # Errors
    /// INVALID_ARGUMENT for an unknown remote, NOT_FOUND, ABORTED.
    pub fn push_snapshot(
        self: &Arc<Self>,
        snapshot: SnapshotId,
        remote: String,
        wait: bool,
        ctx: &RequestCtx,
    ) -> Result<pb::Operation> {
        self.remotes.get(&remote)?;
        let op = OpSpec {
            kind: pb::OperationKind::PushSnapshot,
            vm: None,
            snapshot: Some(snapshot),
            wait,
            frees_space: false,
        };
        self.launch(op, ctx, reads_snapshot(snapshot), move |d, op, snap| {
            d.push_work(op, &remote, &snap)
        })
    }

    fn push_work(
        &self,
        op: &Progress<'_>,
        name: &str,
        snap: &SnapshotRecord,
    ) -> Result<pb::OperationResult> {
        let (remote, handle) = self.remotes.get(name)?;
        let vm_name = self
            .catalog
            .read(|tx| tx.vm(snap.vm_id))?
            .map(|v| v.name)
            .unwrap_or_default();
        let mut disks = Vec::new();
        for d in &snap.disks {
            disks.push(DiskSource {
                name: d.name.clone(),
                layers: self.layer_paths(&d.chain)?,
            });
        }
        let wset = self.store.path(&Store::working_set_file(snap.id));
        let source = PushSource {
            info: snapshot_info(snap, vm_name),
            memory: self.layer_paths(&snap.mem_chain)?,
            disks,
            state: self.store.path(&Store::state_file(snap.id)),
            working_set: wset.exists().then_some(wset),
        };
        let total = transfer::push_bytes(&source).map_err(|e| remote_error(name, e))?;
        op.phase("pushing", 0, total);
        let meter = Meter::new(op, self, "remote.push-chunk", total);
        let progress = |n| meter.tick(n);
        let t = Transfer {
            handle,
            remote,
            progress: &progress,
            in_flight: IN_FLIGHT,
        };
        let stats =
            transfer::push(&t, &source, self.remotes.grace_ms).map_err(|e| meter.error(name, e))?;
        self.metrics
            .pushed(name, stats.uploaded, stats.deduplicated);
        tracing::info!(
            snapshot = %snap.id, remote = name, manifest = %stats.manifest,
            chunks = stats.chunks, uploaded = stats.uploaded, deduplicated = stats.deduplicated,
            sent_bytes = stats.sent_bytes, "pushed a snapshot"
        );
        Ok(pb::OperationResult {
            remote: Some(pb::RemoteTransfer {
                remote: name.to_string(),
                manifest_id: stats.manifest.to_string(),
                chunks: stats.chunks,
                chunks_uploaded: stats.uploaded,
                chunks_deduplicated: stats.deduplicated,
                content_bytes: stats.content_bytes,
                sent_bytes: stats.sent_bytes + stats.manifest_bytes,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    /// Lists remote `remote`'s snapshots (optionally one snapshot's manifests): the listing,
    /// paged, then each manifest of the page read.
    ///
    /// # Errors
    /// INVALID_ARGUMENT, UNAVAILABLE, FAILED_PRECONDITION for a manifest that fails its checks.
    pub fn list_remote_snapshots(
        &self,
        name: &str,
        only: Option<SnapshotId>,
        page: impl FnOnce(Vec<StoredManifest>) -> Result<(Vec<StoredManifest>, String)>,
    ) -> Result<pb::ListRemoteSnapshotsResponse> {
        let (remote, handle) = self.remotes.get(name)?;
        let listed = handle
            .block_on(async {
                match only {
                    Some(s) => remote.manifests_of(&raw(s.0)).await,
                    None => remote.list_manifests().await,
                }
            })
            .map_err(|e| from_remote(name, e))?;
        let (items, next_page_token) = page(listed)?;
        let mut snapshots = Vec::with_capacity(items.len());
        for stored in &items {
            let m = handle
                .block_on(remote.get_manifest(&stored.snapshot, &stored.id))
                .map_err(|e| from_remote(name, e))?;
            snapshots.push(remote_snapshot(name, stored, &m));
        }
        Ok(pb::ListRemoteSnapshotsResponse {
            snapshots,
            next_page_token,
        })
    }

    /// Starts a pull of snapshot `snapshot` (manifest `manifest`, or any of its manifests)
    /// from remote `remote`.
    ///
    /// # Errors
    /// INVALID_ARGUMENT for an unknown remote, ABORTED.
    pub fn pull_snapshot(
        self: &Arc<Self>,
        snapshot: SnapshotId,
        manifest: Option<ManifestId>,
        remote: String,
        wait: bool,
        ctx: &RequestCtx,
    ) -> Result<pb::Operation> {
        self.remotes.get(&remote)?;
        let op = OpSpec {
            kind: pb::OperationKind::PullSnapshot,
            vm: None,
            snapshot: Some(snapshot),
            wait,
            frees_space: false,
        };
        let plan = move |_: &Daemon| {
            let mut f = Footprint::default();
            f.write(Resource::Snapshot(snapshot));
            Ok((f, ()))
        };
        self.launch(op, ctx, plan, move |d, op, ()| {
            d.pull_work(op, &remote, snapshot, manifest)
        })
    }

    fn pull_work(
        &self,
        op: &Progress<'_>,
        name: &str,
        id: SnapshotId,
        want: Option<ManifestId>,
    ) -> Result<pb::OperationResult> {
        let (remote, handle) = self.remotes.get(name)?;
        if let Some(here) = self.catalog.read(|tx| tx.snapshot(id))? {
            return Ok(pb::OperationResult {
                snapshot: Some(convert::snapshot(&here)),
                remote: Some(pb::RemoteTransfer {
                    remote: name.to_string(),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        op.phase("reading the manifest", 0, 0);
        let (stored, manifest) = self.fetch_manifest(name, id, want)?;
        let info = &manifest.snapshot;
        let vm_id = VmId(Id(info.vm_id));
        if let Some(other) = self
            .catalog
            .read(|tx| tx.snapshot_named(vm_id, &info.name))?
        {
            return Err(Error::exists(format!(
                "VM {vm_id} already has a snapshot named {:?} here ({}): pulling {id} would take its name",
                info.name, other.id
            )));
        }
        let (memory, disks) = self.plan_layers(&manifest, true)?;
        let state_file = Store::state_file(id);
        let wset_file = Store::working_set_file(id);
        let mut files: Vec<String> = memory
            .iter()
            .chain(disks.iter().flatten())
            .filter(|l| !l.shared())
            .map(|l| l.file.clone())
            .collect();
        files.push(state_file.clone());
        if manifest.working_set.is_some() {
            files.push(wset_file.clone());
        }
        let claim = self.store.claim(files.clone());

        // The bytes to fetch: what the shared layers hold is not fetched.
        let mut total = manifest.state.len + manifest.working_set.as_ref().map_or(0, |b| b.len);
        for (l, p) in manifest.memory.iter().zip(&memory) {
            if !p.shared() {
                total += l.frames.iter().map(|f| f.data_pages() * 4096).sum::<u64>();
            }
        }
        total += Self::disk_bytes(&manifest, &disks);
        op.phase("pulling", 0, total);
        let meter = Meter::new(op, self, "remote.pull-chunk", total);
        let progress = |n| meter.tick(n);
        let t = Transfer {
            handle,
            remote,
            progress: &progress,
            in_flight: IN_FLIGHT,
        };
        let failed = |e| {
            meter
                .error(name, e)
                .context(format!("pulling snapshot {id}"))
        };
        let mut parent = None;
        for (l, p) in manifest.memory.iter().zip(&memory) {
            parent = match p.own {
                Some(own) => Some(own),
                None => Some(
                    transfer::pull_memory_layer(
                        &t,
                        l,
                        info.memory_bytes,
                        p.id.0,
                        parent,
                        &self.store.path(&p.file),
                    )
                    .map_err(failed)?
                    .as_parent(),
                ),
            };
        }
        self.fetch_disks(&t, &manifest, &disks, &failed)?;
        self.fetch_state(&t, &manifest, &state_file, &wset_file, &failed)?;
        self.failpoints.pass("remote.pull-before-publish")?;
        op.no_return()?;
        op.phase("publishing", total, total);

        let stored_bytes: u64 = files.iter().map(|f| self.store.file_len(f)).sum();
        let g = info.guest;
        let mut record = SnapshotRecord {
            id,
            name: info.name.clone(),
            vm_id,
            parent_id: None,
            labels: info.labels.clone(),
            created_ms: info.created_ms,
            memory_bytes: info.memory_bytes,
            vcpus: info.vcpus,
            guest: guest_spec(g),
            stored_bytes,
            pause_us: info.pause_us,
            mem_chain: memory.iter().map(|l| l.id).collect(),
            disks: manifest
                .disks
                .iter()
                .zip(&disks)
                .map(|(d, chain)| DiskRecord {
                    name: d.name.clone(),
                    size_bytes: d.size_bytes,
                    chain: chain.iter().map(|l| l.id).collect(),
                })
                .collect(),
        };
        let shared = memory
            .iter()
            .chain(disks.iter().flatten())
            .filter(|l| l.shared())
            .count() as u64;
        let result = |record: &SnapshotRecord| pb::OperationResult {
            snapshot: Some(convert::snapshot(record)),
            remote: Some(pb::RemoteTransfer {
                remote: name.to_string(),
                manifest_id: stored.id.to_string(),
                chunks: manifest.chunks().len() as u64,
                content_bytes: meter.done.load(Ordering::Relaxed),
                stored_bytes,
                layers_shared: shared,
                ..Default::default()
            }),
            ..Default::default()
        };
        let kinds: Vec<(&PulledLayer, LayerKind)> = memory
            .iter()
            .map(|l| (l, LayerKind::Memory))
            .chain(disks.iter().flatten().map(|l| (l, LayerKind::Disk)))
            .collect();
        self.catalog.write(|tx| {
            if tx.snapshot(id)?.is_some() {
                return Err(crate::catalog::CatalogError::Changed(format!(
                    "snapshot {id} appeared here while it was pulled"
                )));
            }
            self.record_layers(tx, &kinds, id)?;
            record.parent_id = info
                .parent_id
                .map(|p| SnapshotId(Id(p)))
                .filter(|p| tx.snapshot(*p).ok().flatten().is_some());
            tx.insert_snapshot(&record)?;
            op.succeeded_in(tx, &result(&record))?;
            Ok(())
        })?;
        claim.publish();
        self.events
            .emit(pb::event::Kind::SnapshotCreated(convert::snapshot(&record)));
        tracing::info!(snapshot = %id, remote = name, manifest = %stored.id, shared, stored_bytes, "pulled a snapshot");
        Ok(result(&record))
    }

    /// Snapshot `id`'s manifest `want` (or any of its manifests) from remote `name`.
    fn fetch_manifest(
        &self,
        name: &str,
        id: SnapshotId,
        want: Option<ManifestId>,
    ) -> Result<(StoredManifest, Manifest)> {
        let (remote, handle) = self.remotes.get(name)?;
        let listed = handle
            .block_on(remote.manifests_of(&raw(id.0)))
            .map_err(|e| from_remote(name, e))?;
        let stored = match want {
            Some(m) => listed.into_iter().find(|s| s.id == m),
            None => listed.into_iter().next(),
        }
        .ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                match want {
                    Some(m) => format!("remote {name:?} has no manifest {m} of snapshot {id}"),
                    None => format!("remote {name:?} has no snapshot {id}"),
                },
            )
        })?;
        let manifest = handle
            .block_on(async {
                match &self.remotes.cache {
                    Some(cache) => {
                        remote
                            .get_manifest_cached(&stored.snapshot, &stored.id, cache)
                            .await
                    }
                    None => remote.get_manifest(&stored.snapshot, &stored.id).await,
                }
            })
            .map_err(|e| from_remote(name, e))?;
        Ok((stored, manifest))
    }

    /// Which of `manifest`'s layers are here already (a prefix of each chain with the same id,
    /// digest and parent: shared) and where the others go. A pull (`pull`) keeps the layers'
    /// ids where they are free here, so that later pulls share them; a restore gives them new
    /// ids, so that restores of one snapshot running together do not collide. Memory layers
    /// only for a pull.
    fn plan_layers(
        &self,
        manifest: &Manifest,
        pull: bool,
    ) -> Result<(Vec<PulledLayer>, Vec<Vec<PulledLayer>>)> {
        let memory = pull;
        let known: HashMap<LayerId, LayerRecord> = self
            .catalog
            .read(|tx| tx.layers())?
            .into_iter()
            .map(|l| (l.id, l))
            .collect();
        let fresh_id = |raw_id: [u8; 16]| {
            let want = LayerId(Id(raw_id));
            if !pull || known.contains_key(&want) {
                LayerId::random()
            } else {
                want
            }
        };
        let mut mem: Vec<PulledLayer> = Vec::new();
        let mut parent: Option<snap_core::ParentRef> = None;
        let mut sharing = true;
        for l in manifest.memory.iter().filter(|_| memory) {
            let here = known
                .get(&LayerId(Id(l.id)))
                .filter(|r| sharing && r.kind == LayerKind::Memory)
                .and_then(|r| {
                    let info = snap_mem::layer::Layer::open(self.store.path(&r.file)).ok()?;
                    let i = info.info();
                    (i.digest.0 == l.digest && i.parent == parent).then(|| (r.clone(), *i))
                });
            match here {
                Some((r, i)) => {
                    parent = Some(i.as_parent());
                    mem.push(PulledLayer {
                        id: r.id,
                        file: r.file,
                        own: Some(i.as_parent()),
                    });
                }
                None => {
                    sharing = false;
                    mem.push(PulledLayer {
                        id: fresh_id(l.id),
                        file: Store::merged_layer_file(),
                        own: None,
                    });
                }
            }
        }
        let mut disks: Vec<Vec<PulledLayer>> = Vec::new();
        for d in &manifest.disks {
            let mut chain = Vec::new();
            let mut parent: Option<snap_disk::ParentRef> = None;
            let mut sharing = true;
            for l in &d.layers {
                let here = known
                    .get(&LayerId(Id(l.id)))
                    .filter(|r| sharing && r.kind == LayerKind::Disk)
                    .and_then(|r| {
                        let i = snap_disk::layer_info(&self.store.path(&r.file)).ok()?;
                        (i.digest.map(|g| g.0) == Some(l.digest) && i.parent == parent)
                            .then(|| (r.clone(), i))
                    });
                match here {
                    Some((r, i)) => {
                        parent = i.as_parent();
                        chain.push(PulledLayer {
                            id: r.id,
                            file: r.file,
                            own: i.as_parent(),
                        });
                    }
                    None => {
                        sharing = false;
                        chain.push(PulledLayer {
                            id: fresh_id(l.id),
                            file: Store::disk_layer_file(),
                            own: None,
                        });
                    }
                }
            }
            disks.push(chain);
        }
        Ok((mem, disks))
    }

    /// Bytes of content the disk layers of `disks` not shared hold.
    fn disk_bytes(manifest: &Manifest, disks: &[Vec<PulledLayer>]) -> u64 {
        let mut total = 0;
        for (d, chain) in manifest.disks.iter().zip(disks) {
            let g = snap_disk::Geometry {
                disk_bytes: d.size_bytes,
                block_size: d.block_size,
            };
            for (l, p) in d.layers.iter().zip(chain) {
                if !p.shared() {
                    total += l.blocks.iter().map(|&b| g.block_len(b) as u64).sum::<u64>();
                }
            }
        }
        total
    }

    /// Makes each disk layer of `disks` not shared with `make` (given its disk, index in the
    /// chain, manifest entry, plan and parent), oldest first, chaining each to the one below.
    fn make_disk_layers(
        manifest: &Manifest,
        disks: &[Vec<PulledLayer>],
        mut make: impl FnMut(
            &snap_remote::manifest::DiskChain,
            usize,
            &snap_remote::manifest::DiskLayer,
            &PulledLayer,
            Option<snap_disk::ParentRef>,
        ) -> Result<Option<snap_disk::ParentRef>>,
    ) -> Result<()> {
        for (d, pulled) in manifest.disks.iter().zip(disks) {
            let mut parent = None;
            for (i, (l, p)) in d.layers.iter().zip(pulled).enumerate() {
                parent = match p.own {
                    Some(own) => Some(own),
                    None => make(d, i, l, p, parent)?,
                };
            }
        }
        Ok(())
    }

    /// Fetches the disk layers of `disks` not shared.
    fn fetch_disks(
        &self,
        t: &Transfer<'_>,
        manifest: &Manifest,
        disks: &[Vec<PulledLayer>],
        failed: &dyn Fn(TransferError) -> Error,
    ) -> Result<()> {
        Self::make_disk_layers(manifest, disks, |d, _, l, p, parent| {
            let path = self.store.path(&p.file);
            Ok(transfer::pull_disk_layer(t, d, l, p.id.0, parent, &path)
                .map_err(failed)?
                .as_parent())
        })
    }

    /// Builds the disk layers of `disks` not shared as sparse files whose blocks arrive from
    /// remote `remote` as they are read (see `crate::filling`); returns their `filling` rows.
    fn sparse_disks<'f>(
        &'f self,
        remote: &str,
        id: SnapshotId,
        manifest: &Manifest,
        disks: &[Vec<PulledLayer>],
        unpublished: &mut crate::filling::Unpublished<'f>,
    ) -> Result<Vec<crate::catalog::FillingRecord>> {
        let mut rows = Vec::new();
        Self::make_disk_layers(manifest, disks, |d, i, l, p, parent| {
            let layer = crate::filling::SparseLayer {
                id: p.id,
                file: p.file.clone(),
                parent,
                geometry: snap_disk::Geometry {
                    disk_bytes: d.size_bytes,
                    block_size: d.block_size,
                },
                layer: l,
                what: format!(
                    "snapshot {id} in remote {remote:?}, disk {:?}, layer {i}",
                    d.name
                ),
            };
            let (row, made) = self.build_sparse_layer(remote, &layer, unpublished)?;
            rows.push(row);
            Ok(made)
        })?;
        Ok(rows)
    }

    /// Fetches `manifest`'s state into `state_file` and its working set, if it has one, into
    /// `wset_file`.
    fn fetch_state(
        &self,
        t: &Transfer<'_>,
        manifest: &Manifest,
        state_file: &str,
        wset_file: &str,
        failed: &dyn Fn(TransferError) -> Error,
    ) -> Result<()> {
        transfer::pull_blob(t, &manifest.state, &self.store.path(state_file)).map_err(failed)?;
        if let Some(w) = &manifest.working_set {
            transfer::pull_blob(t, w, &self.store.path(wset_file)).map_err(failed)?;
        }
        Ok(())
    }

    /// Inside the transaction that publishes what a pull or restore fetched: checks that every
    /// shared layer is still what it was, and records the fetched ones.
    fn record_layers(
        &self,
        tx: &crate::catalog::Tx<'_>,
        layers: &[(&PulledLayer, LayerKind)],
        id: SnapshotId,
    ) -> std::result::Result<(), crate::catalog::CatalogError> {
        for (l, kind) in layers {
            if l.shared() {
                if tx.layer(l.id)?.is_none_or(|now| now.file != l.file) {
                    return Err(crate::catalog::CatalogError::Changed(format!(
                        "layer {} changed while snapshot {id} was fetched (a delete merged or freed it): try again",
                        l.id
                    )));
                }
            } else if tx.layer(l.id)?.is_some() {
                return Err(crate::catalog::CatalogError::Changed(format!(
                    "layer {} was recorded here by another operation while snapshot {id} was fetched: try again (it is then shared)",
                    l.id
                )));
            } else {
                tx.insert_layer(&LayerRecord {
                    id: l.id,
                    kind: *kind,
                    file: l.file.clone(),
                    bytes: self.store.file_len(&l.file),
                })?;
            }
        }
        Ok(())
    }

    /// Starts a restore (or clone) of remote `remote`'s snapshot `snapshot` into new VMs
    /// `names`, without pulling it (see `RestoreSnapshotRequest.remote`).
    ///
    /// # Errors
    /// INVALID_ARGUMENT for an unknown remote, ALREADY_EXISTS for a taken name.
    pub fn restore_from_remote(
        self: &Arc<Self>,
        spec: RemoteRestore,
        ctx: &RequestCtx,
    ) -> Result<pb::Operation> {
        self.remotes.get(&spec.remote)?;
        self.check_new_names(&spec.names)?;
        let op = OpSpec {
            kind: spec.kind,
            vm: None,
            snapshot: Some(spec.snapshot),
            wait: spec.wait,
            frees_space: false,
        };
        let plan = |_: &Daemon| Ok((Footprint::default(), ()));
        self.launch(op, ctx, plan, move |d, op, ()| {
            d.restore_from_remote_work(op, &spec)
        })
    }

    fn restore_from_remote_work(
        &self,
        op: &Progress<'_>,
        spec: &RemoteRestore,
    ) -> Result<pb::OperationResult> {
        let name = spec.remote.as_str();
        let id = spec.snapshot;
        op.memory_mode(spec.mode);
        let (remote, handle) = self.remotes.get(name)?;
        let cache = self
            .remotes
            .cache
            .clone()
            .ok_or_else(|| Error::internal("the remotes have no chunk cache"))?;
        op.phase("reading the manifest", 0, 0);
        let (stored, manifest) = self.fetch_manifest(name, id, None)?;
        let (_, disks) = self.plan_layers(&manifest, false)?;
        // The state and working set are only read here: temporary files, removed at the end.
        let scratch = SnapshotId::random();
        let (state_file, wset_file) =
            (Store::state_file(scratch), Store::working_set_file(scratch));
        let scratch_claim = self
            .store
            .claim(vec![state_file.clone(), wset_file.clone()]);
        let layer_claim = self.store.claim(
            disks
                .iter()
                .flatten()
                .filter(|l| !l.shared())
                .map(|l| l.file.clone())
                .collect(),
        );
        // A lazy restore leaves the disks' blocks in the remote until they are read (see
        // `crate::filling`).
        let lazy_disks =
            spec.mode != snap_vmm::MemoryRestore::Eager && Self::disks_can_arrive_lazily(&manifest);
        let total = if lazy_disks {
            0
        } else {
            Self::disk_bytes(&manifest, &disks)
        } + manifest.state.len
            + manifest.working_set.as_ref().map_or(0, |b| b.len);
        op.phase("fetching disks and state", 0, total);
        let meter = Meter::new(op, self, "remote.pull-chunk", total);
        let progress = |n| meter.tick(n);
        let t = Transfer {
            handle,
            remote,
            progress: &progress,
            in_flight: IN_FLIGHT,
        };
        let failed = |e| {
            meter
                .error(name, e)
                .context(format!("restoring snapshot {id} from remote {name:?}"))
        };
        let mut unpublished = self.unpublished();
        let filling = if lazy_disks {
            self.sparse_disks(name, id, &manifest, &disks, &mut unpublished)?
        } else {
            self.fetch_disks(&t, &manifest, &disks, &failed)?;
            Vec::new()
        };
        self.fetch_state(&t, &manifest, &state_file, &wset_file, &failed)?;
        let state = snap_vmm::VmState::read_file(&self.store.path(&state_file))
            .map_err(|e| Error::precondition(format!("snapshot {id} in remote {name:?}: {e}")))?;
        let what = format!("snapshot {id} in remote {name:?}");
        let memory_error = |source: &RemoteMemory, e: String| {
            let kind = if source.store_unreachable() {
                ErrorKind::Unavailable
            } else {
                ErrorKind::FailedPrecondition
            };
            Error::new(kind, format!("restoring {what}: {e}"))
        };
        let g = manifest.snapshot.guest;
        let count = spec.names.len() as u64;
        let mut made = Vec::new();
        for (i, vm_name) in spec.names.iter().enumerate() {
            op.check_cancel()?;
            op.phase_as(
                "restoring",
                &format!("restoring {vm_name}"),
                i as u64,
                count,
            );
            let mut set = crate::disks::DiskSet::new(&self.store);
            for (d, chain) in manifest.disks.iter().zip(&disks) {
                let sealed = chain
                    .iter()
                    .map(|l| (self.store.path(&l.file), l.id))
                    .collect();
                set.add(&self.store, &d.name, d.size_bytes, sealed)?;
            }
            let mut prepared = self.pool.take(state.config)?;
            prepared.set_disks(set.backends(&self.metrics))?;
            let source = Arc::new(RemoteMemory::new(
                handle.clone(),
                remote.clone(),
                Arc::clone(&cache),
                &manifest,
                what.clone(),
            ));
            // The store must answer before anything is published: the first window with data
            // (it warms the cache for the guest too).
            {
                use snap_mem::lazy::WindowSource;
                if let Some(&first) = source.windows_with_data().unwrap_or_default().first() {
                    let mut buf = vec![0u8; source.window_pages() as usize * 4096];
                    source
                        .read_window(first, &mut buf)
                        .map_err(|e| memory_error(&source, e.to_string()))?;
                }
            }
            let prefetch = match spec.mode {
                snap_vmm::MemoryRestore::Prefetch if manifest.working_set.is_some() => {
                    let unit = prepared
                        .options()
                        .restore_unit_bytes
                        .map_or(source_window_pages(&manifest), |b| b / 4096);
                    let tag = manifest.memory.last().map_or([0; 32], |l| l.digest);
                    snap_vmm::snapshot::read_working_set(
                        &self.store.path(&wset_file),
                        unit,
                        manifest.snapshot.memory_bytes,
                        tag,
                    )
                }
                _ => None,
            };
            let vm = snap_vmm::Vm::restore_lazy_source(
                prepared,
                &state,
                Arc::clone(&source),
                None,
                prefetch,
                None,
            )?;
            if spec.mode == snap_vmm::MemoryRestore::Eager {
                vm.wait_memory_resident()
                    .map_err(|e| memory_error(&source, e.to_string()))?;
            }
            let rec = crate::catalog::VmRecord {
                id: VmId::random(),
                name: vm_name.clone(),
                memory_bytes: manifest.snapshot.memory_bytes,
                vcpus: manifest.snapshot.vcpus,
                guest: guest_spec(g),
                labels: spec.labels.clone(),
                state: if spec.leave_paused {
                    crate::catalog::VmStatus::Paused
                } else {
                    crate::catalog::VmStatus::Running
                },
                current_snapshot: None,
                mem_chain: Vec::new(),
                disks: set.records.clone(),
                created_ms: crate::now_ms(),
                failure: None,
            };
            made.push((rec, vm, set));
        }
        let kinds: Vec<(&PulledLayer, LayerKind)> = disks
            .iter()
            .flatten()
            .map(|l| (l, LayerKind::Disk))
            .collect();
        let extra = |tx: &crate::catalog::Tx<'_>| {
            self.record_layers(tx, &kinds, id)?;
            for f in &filling {
                tx.insert_filling(f)?;
            }
            Ok(())
        };
        let committed = || {
            layer_claim.publish();
            unpublished.published();
            drop(scratch_claim);
        };
        // What was fetched before the VMs run (the rest arrives as they touch it).
        let layers = disks.iter().flatten();
        let shared = layers.clone().filter(|l| l.shared()).count() as u64;
        let filling_bytes = layers
            .filter(|l| !l.shared())
            .map(|l| self.store.file_len(&l.file))
            .sum();
        let result = pb::OperationResult {
            remote: Some(pb::RemoteTransfer {
                remote: name.to_string(),
                manifest_id: stored.id.to_string(),
                chunks: manifest.chunks().len() as u64,
                content_bytes: meter.done.load(Ordering::Relaxed),
                stored_bytes: filling_bytes,
                layers_shared: shared,
                ..Default::default()
            }),
            ..Default::default()
        };
        self.publish_new_vms(op, made, spec.leave_paused, result, extra, committed)
    }

    /// Starts a delete of snapshot `snapshot`'s manifests from remote `remote`.
    ///
    /// # Errors
    /// INVALID_ARGUMENT for an unknown remote.
    pub fn delete_remote_snapshot(
        self: &Arc<Self>,
        snapshot: SnapshotId,
        remote: String,
        wait: bool,
        ctx: &RequestCtx,
    ) -> Result<pb::Operation> {
        self.remotes.get(&remote)?;
        let op = OpSpec {
            kind: pb::OperationKind::DeleteRemoteSnapshot,
            vm: None,
            snapshot: Some(snapshot),
            wait,
            frees_space: false,
        };
        let plan = |_: &Daemon| Ok((Footprint::default(), ()));
        self.launch(op, ctx, plan, move |d, op, ()| {
            let (r, handle) = d.remotes.get(&remote)?;
            op.no_return()?;
            op.phase("deleting", 0, 0);
            let n = handle
                .block_on(r.delete_manifests(&raw(snapshot.0)))
                .map_err(|e| from_remote(&remote, e))?;
            if n == 0 {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("remote {remote:?} has no snapshot {snapshot}"),
                ));
            }
            Ok(pb::OperationResult {
                remote: Some(pb::RemoteTransfer {
                    remote: remote.clone(),
                    manifests_deleted: n as u64,
                    ..Default::default()
                }),
                ..Default::default()
            })
        })
    }

    /// Starts a sweep of remote `remote`.
    ///
    /// # Errors
    /// INVALID_ARGUMENT for an unknown remote.
    pub fn sweep_remote(
        self: &Arc<Self>,
        remote: String,
        wait: bool,
        ctx: &RequestCtx,
    ) -> Result<pb::Operation> {
        self.remotes.get(&remote)?;
        let op = OpSpec {
            kind: pb::OperationKind::SweepRemote,
            vm: None,
            snapshot: None,
            wait,
            frees_space: false,
        };
        let plan = |_: &Daemon| Ok((Footprint::default(), ()));
        self.launch(op, ctx, plan, move |d, op, ()| {
            let (r, handle) = d.remotes.get(&remote)?;
            op.no_return()?;
            op.phase("sweeping", 0, 0);
            let swept = handle
                .block_on(r.sweep(d.remotes.grace_ms, transfer::now_ms()))
                .map_err(|e| from_remote(&remote, e))?;
            tracing::info!(remote = %remote, ?swept, "swept a remote");
            Ok(pb::OperationResult {
                remote: Some(pb::RemoteTransfer {
                    remote: remote.clone(),
                    chunks_listed: swept.chunks as u64,
                    chunks_swept: swept.removed as u64,
                    bytes_swept: swept.removed_bytes,
                    chunks_kept_young: swept.kept_young as u64,
                    ..Default::default()
                }),
                ..Default::default()
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_credentials_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("creds");
        std::fs::write(&path, "AWS_ACCESS_KEY_ID=k\nAWS_SECRET_ACCESS_KEY=s\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Remotes::credentials_file(&path).unwrap_err();
        assert!(e.contains("mode 644") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = Remotes::credentials_file(&path).unwrap();
        assert_eq!((c.access_key.as_str(), c.secret_key.as_str()), ("k", "s"));
        std::fs::write(&path, "AWS_ACCESS_KEY_ID=k\n").unwrap();
        let e = Remotes::credentials_file(&path).unwrap_err();
        assert!(e.contains("no AWS_SECRET_ACCESS_KEY"), "{e}");
    }
}
