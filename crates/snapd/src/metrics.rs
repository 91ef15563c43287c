//! The daemon's metrics, in the Prometheus text format (OpenMetrics flavour) on an opt-in HTTP
//! listener (`snapd --metrics 127.0.0.1:PORT`, path `/metrics`).
//!
//! Built on `prometheus-client`, the Prometheus project's own Rust client: typed metrics in a
//! registry the daemon owns (no global state, so tests can run daemons side by side), label
//! sets as Rust types (so a label can only take the values its type allows), and an encoder of
//! the OpenMetrics text that Prometheus, Grafana Agent and VictoriaMetrics scrape.
//!
//! Labels are bounded: operation kinds, outcomes, phases, memory modes, layer kinds, VM states
//! and the names of configured remotes. No id is ever a label value.
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `snapd_operations_total` | counter | kind, outcome | long operations ended |
//! | `snapd_operation_duration_seconds` | histogram | kind | from start to end |
//! | `snapd_operation_phase_duration_seconds` | histogram | kind, phase | each phase of an operation |
//! | `snapd_snapshot_pause_seconds` | histogram | | how long a snapshot paused its VM |
//! | `snapd_restore_duration_seconds` | histogram | mode | restores and clones into new VMs, call to running |
//! | `snapd_diff_dirty_pages` | histogram | | pages a diff snapshot wrote |
//! | `snapd_layer_content_bytes_total` | counter | kind | bytes of content snapshots put into new layers |
//! | `snapd_layer_stored_bytes_total` | counter | kind | bytes of the new layer files |
//! | `snapd_lazy_faults_total` | counter | | guest page faults served by lazy restores |
//! | `snapd_lazy_prefetched_total` | counter | | restore units installed ahead from working sets |
//! | `snapd_lazy_filled_total` | counter | | restore units installed by the background filler |
//! | `snapd_disk_io_bytes_total` | counter | op | bytes guests read and wrote through their disks' layers |
//! | `snapd_disk_io_requests_total` | counter | op | guest disk requests (read, write, flush) |
//! | `snapd_catalog_transaction_seconds` | histogram | access | catalog transactions (read, write) |
//! | `snapd_request_id_hits_total` | counter | | calls answered from the catalog (retries) |
//! | `snapd_vms` | gauge | state | VMs by state |
//! | `snapd_operations_open` | gauge | | operations pending or running |
//! | `snapd_data_dir_bytes` | gauge | use | the data directory's filesystem: used by snapd's files, free |
//! | `snapd_remote_chunks_total` | counter | remote, result | chunks a push uploaded or found there |
//! | `snapd_remote_cache_reads_total` | counter | result | reads of the host's chunk cache (restores from remotes): hit or miss |

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use snap_api::v1 as pb;

/// Labels of an operation kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// The operation's kind, snake case (`create_snapshot`).
    pub kind: &'static str,
}

/// Labels of an ended operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// The operation's kind.
    pub kind: &'static str,
    /// `succeeded`, `failed` or `cancelled`.
    pub outcome: &'static str,
}

/// Labels of an operation's phase.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// The operation's kind.
    pub kind: &'static str,
    /// The phase (a fixed name, as the operation reports it without the VM's name).
    pub phase: &'static str,
}

/// A memory restore mode.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabel {
    /// `eager`, `lazy` or `prefetch`.
    pub mode: &'static str,
}

/// What a layer holds.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum LayerKind {
    /// Guest memory.
    Memory,
    /// A disk.
    Disk,
}

/// Labels of a layer kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LayerLabel {
    /// `memory` or `disk`.
    pub kind: &'static str,
}

/// Labels of disk I/O.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    /// `read`, `write` or `flush`.
    pub op: &'static str,
}

/// Labels of catalog access.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AccessLabel {
    /// `read` or `write`.
    pub access: &'static str,
}

/// Labels of a VM state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// The state, lower case.
    pub state: &'static str,
}

/// Labels of data directory space.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UseLabel {
    /// `used` (by snapd's files) or `free` (on the filesystem, for snapd).
    pub r#use: &'static str,
}

/// Labels of a remote's chunks.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RemoteChunkLabels {
    /// The remote's configured name.
    pub remote: String,
    /// `uploaded` or `deduplicated`.
    pub result: &'static str,
}

/// Labels of cache reads.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `hit` or `miss`.
    pub result: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn seconds() -> Histogram {
    // 100 us to about 210 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 22))
}

fn pages() -> Histogram {
    // 1 page to about 16 M pages (64 GiB).
    Histogram::new(exponential_buckets(1.0, 4.0, 13))
}

/// Every metric the daemon exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Long operations ended.
    pub operations: Family<OutcomeLabels, Counter>,
    /// Operation durations.
    pub operation_seconds: Histograms<KindLabel>,
    /// Phase durations.
    pub phase_seconds: Histograms<PhaseLabels>,
    /// Snapshot pauses.
    pub pause_seconds: Histogram,
    /// Restores into new VMs, by memory mode.
    pub restore_seconds: Histograms<ModeLabel>,
    /// Pages per diff snapshot.
    pub diff_dirty_pages: Histogram,
    /// Content bytes put into new layers.
    pub layer_content_bytes: Family<LayerLabel, Counter>,
    /// Bytes of new layer files.
    pub layer_stored_bytes: Family<LayerLabel, Counter>,
    /// Faults served by lazy restores.
    pub lazy_faults: Counter,
    /// Units installed ahead from working sets.
    pub lazy_prefetched: Counter,
    /// Units installed by the background filler.
    pub lazy_filled: Counter,
    /// Catalog transactions.
    pub catalog_seconds: Histograms<AccessLabel>,
    /// Guest disk bytes.
    pub disk_io_bytes: Family<OpLabel, Counter>,
    /// Guest disk requests.
    pub disk_io_requests: Family<OpLabel, Counter>,
    /// Calls answered from the catalog.
    pub request_id_hits: Counter,
    /// VMs by state (set at each scrape).
    pub vms: Family<StateLabel, Gauge>,
    /// Operations pending or running (set at each scrape).
    pub operations_open: Gauge,
    /// Data directory space (set at each scrape).
    pub data_dir_bytes: Family<UseLabel, Gauge>,
    /// Chunks pushes uploaded or found in a remote.
    pub remote_chunks: Family<RemoteChunkLabels, Counter>,
    /// Reads of the host's chunk cache.
    pub cache_reads: Family<ResultLabel, Counter>,
    /// The cache's hits and misses told so far.
    cache_told: std::sync::Mutex<(u64, u64)>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric at zero, registered.
    #[must_use]
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("snapd");
        let m = Self {
            operations: Family::default(),
            operation_seconds: Family::new_with_constructor(seconds),
            phase_seconds: Family::new_with_constructor(seconds),
            pause_seconds: seconds(),
            restore_seconds: Family::new_with_constructor(seconds),
            diff_dirty_pages: pages(),
            layer_content_bytes: Family::default(),
            layer_stored_bytes: Family::default(),
            lazy_faults: Counter::default(),
            lazy_prefetched: Counter::default(),
            lazy_filled: Counter::default(),
            catalog_seconds: Family::new_with_constructor(seconds),
            disk_io_bytes: Family::default(),
            disk_io_requests: Family::default(),
            request_id_hits: Counter::default(),
            vms: Family::default(),
            operations_open: Gauge::default(),
            data_dir_bytes: Family::default(),
            remote_chunks: Family::default(),
            cache_reads: Family::default(),
            cache_told: std::sync::Mutex::new((0, 0)),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "operations",
            "Long operations ended, by kind and outcome",
            m.operations.clone(),
        );
        r.register(
            "operation_duration_seconds",
            "Long operations from start to end, by kind",
            m.operation_seconds.clone(),
        );
        r.register(
            "operation_phase_duration_seconds",
            "Phases of long operations, by kind and phase",
            m.phase_seconds.clone(),
        );
        r.register(
            "snapshot_pause_seconds",
            "How long each snapshot paused its VM",
            m.pause_seconds.clone(),
        );
        r.register(
            "restore_duration_seconds",
            "Restores and clones into new VMs, from start until the VMs run, by memory mode",
            m.restore_seconds.clone(),
        );
        r.register(
            "diff_dirty_pages",
            "Pages each diff snapshot wrote",
            m.diff_dirty_pages.clone(),
        );
        r.register(
            "layer_content_bytes",
            "Bytes of content snapshots put into new layers, by layer kind",
            m.layer_content_bytes.clone(),
        );
        r.register(
            "layer_stored_bytes",
            "Bytes of the layer files snapshots wrote, by layer kind",
            m.layer_stored_bytes.clone(),
        );
        r.register(
            "lazy_faults",
            "Guest page faults served by lazy restores",
            m.lazy_faults.clone(),
        );
        r.register(
            "lazy_prefetched",
            "Restore units installed ahead from recorded working sets",
            m.lazy_prefetched.clone(),
        );
        r.register(
            "lazy_filled",
            "Restore units installed by the background filler of lazy restores",
            m.lazy_filled.clone(),
        );
        r.register(
            "disk_io_bytes",
            "Bytes guests read and wrote through their disks' layers, by operation",
            m.disk_io_bytes.clone(),
        );
        r.register(
            "disk_io_requests",
            "Guest disk requests (read, write, flush) served by their disks' layers",
            m.disk_io_requests.clone(),
        );
        r.register(
            "catalog_transaction_seconds",
            "Catalog transactions, by access",
            m.catalog_seconds.clone(),
        );
        r.register(
            "request_id_hits",
            "Calls answered from the catalog: retries of a request id already answered",
            m.request_id_hits.clone(),
        );
        r.register("vms", "VMs by state", m.vms.clone());
        r.register(
            "operations_open",
            "Long operations pending or running",
            m.operations_open.clone(),
        );
        r.register(
            "data_dir_bytes",
            "The data directory: bytes used by snapd's files, and free on its filesystem",
            m.data_dir_bytes.clone(),
        );
        r.register(
            "remote_chunks",
            "Chunks pushes uploaded to a remote or found there already, by remote",
            m.remote_chunks.clone(),
        );
        r.register(
            "remote_cache_reads",
            "Reads of the host's chunk cache by restores from remotes, by result",
            m.cache_reads.clone(),
        );
        m.touch();
        Self { registry, ..m }
    }

    /// Creates every series whose labels are known ahead, at zero, so that a scrape lists them
    /// (and dashboards show zero rather than no data) before anything happened.
    fn touch(&self) {
        use pb::OperationKind as K;
        for kind in [
            K::CreateSnapshot,
            K::RestoreSnapshot,
            K::CloneSnapshot,
            K::DeleteSnapshot,
            K::DeleteVm,
            K::PushSnapshot,
            K::PullSnapshot,
            K::DeleteRemoteSnapshot,
            K::SweepRemote,
        ] {
            let kind = kind_label(kind);
            for outcome in ["succeeded", "failed", "cancelled"] {
                let _ = self
                    .operations
                    .get_or_create(&OutcomeLabels { kind, outcome });
            }
            let _ = self.operation_seconds.get_or_create(&KindLabel { kind });
        }
        for mode in ["eager", "lazy", "prefetch"] {
            let _ = self.restore_seconds.get_or_create(&ModeLabel { mode });
        }
        for kind in ["memory", "disk"] {
            let _ = self.layer_content_bytes.get_or_create(&LayerLabel { kind });
            let _ = self.layer_stored_bytes.get_or_create(&LayerLabel { kind });
        }
        for access in ["read", "write"] {
            let _ = self.catalog_seconds.get_or_create(&AccessLabel { access });
        }
        let _ = self.disk_io_counters();
        self.cache_counters(0, 0);
    }

    /// Creates the series of remote `name` at zero.
    pub fn touch_remote(&self, name: &str) {
        self.pushed(name, 0, 0);
    }

    /// The metrics in the OpenMetrics text format.
    #[must_use]
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        out
    }

    /// Records an ended operation of `kind` that ran `took` with `outcome`.
    pub fn operation_ended(&self, kind: pb::OperationKind, outcome: &'static str, took: Duration) {
        let kind = kind_label(kind);
        self.operations
            .get_or_create(&OutcomeLabels { kind, outcome })
            .inc();
        self.operation_seconds
            .get_or_create(&KindLabel { kind })
            .observe(took.as_secs_f64());
    }

    /// Records a phase of an operation of `kind`.
    pub fn phase_ended(&self, kind: pb::OperationKind, phase: &'static str, took: Duration) {
        self.phase_seconds
            .get_or_create(&PhaseLabels {
                kind: kind_label(kind),
                phase,
            })
            .observe(took.as_secs_f64());
    }

    /// Records a catalog transaction.
    pub fn catalog_transaction(&self, write: bool, took: Duration) {
        let access = if write { "write" } else { "read" };
        self.catalog_seconds
            .get_or_create(&AccessLabel { access })
            .observe(took.as_secs_f64());
    }

    /// The counters of guest disk I/O (kept by each disk, so a request costs no lookup).
    pub fn disk_io_counters(&self) -> DiskIo {
        let op = |op| OpLabel { op };
        DiskIo {
            reads: self.disk_io_requests.get_or_create_owned(&op("read")),
            writes: self.disk_io_requests.get_or_create_owned(&op("write")),
            flushes: self.disk_io_requests.get_or_create_owned(&op("flush")),
            read_bytes: self.disk_io_bytes.get_or_create_owned(&op("read")),
            written_bytes: self.disk_io_bytes.get_or_create_owned(&op("write")),
        }
    }

    /// Records a new layer of `kind` holding `content` bytes in a file of `stored` bytes.
    pub fn layer_written(&self, kind: LayerKind, content: u64, stored: u64) {
        let kind = match kind {
            LayerKind::Memory => "memory",
            LayerKind::Disk => "disk",
        };
        let l = LayerLabel { kind };
        self.layer_content_bytes.get_or_create(&l).inc_by(content);
        self.layer_stored_bytes.get_or_create(&l).inc_by(stored);
    }

    /// Records a lazy restore whose memory is complete.
    pub fn lazy_restore_done(&self, stats: &snap_mem::lazy::LazyStats) {
        self.lazy_faults.inc_by(stats.faults);
        self.lazy_prefetched.inc_by(stats.prefetched);
        self.lazy_filled.inc_by(stats.filled);
    }

    /// Records a push to `remote`.
    pub fn pushed(&self, remote: &str, uploaded: u64, deduplicated: u64) {
        for (result, n) in [("uploaded", uploaded), ("deduplicated", deduplicated)] {
            self.remote_chunks
                .get_or_create(&RemoteChunkLabels {
                    remote: remote.to_string(),
                    result,
                })
                .inc_by(n);
        }
    }

    /// Tells the cache's counters (hits and misses since it opened).
    pub fn cache_counters(&self, hits: u64, misses: u64) {
        let mut told = self
            .cache_told
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (result, now, before) in [("hit", hits, told.0), ("miss", misses, told.1)] {
            self.cache_reads
                .get_or_create(&ResultLabel { result })
                .inc_by(now.saturating_sub(before));
        }
        *told = (hits.max(told.0), misses.max(told.1));
    }
}

/// The counters of guest disk I/O.
#[derive(Clone, Debug)]
pub struct DiskIo {
    /// Read requests.
    pub reads: Counter,
    /// Write requests.
    pub writes: Counter,
    /// Flush requests.
    pub flushes: Counter,
    /// Bytes read.
    pub read_bytes: Counter,
    /// Bytes written.
    pub written_bytes: Counter,
}

/// An operation kind as a label value.
#[must_use]
pub fn kind_label(kind: pb::OperationKind) -> &'static str {
    match kind {
        pb::OperationKind::CreateSnapshot => "create_snapshot",
        pb::OperationKind::RestoreSnapshot => "restore_snapshot",
        pb::OperationKind::CloneSnapshot => "clone_snapshot",
        pb::OperationKind::DeleteSnapshot => "delete_snapshot",
        pb::OperationKind::DeleteVm => "delete_vm",
        pb::OperationKind::PushSnapshot => "push_snapshot",
        pb::OperationKind::PullSnapshot => "pull_snapshot",
        pb::OperationKind::DeleteRemoteSnapshot => "delete_remote_snapshot",
        pb::OperationKind::SweepRemote => "sweep_remote",
        pb::OperationKind::Unspecified => "unspecified",
    }
}

/// A memory restore mode as a label value.
#[must_use]
pub fn mode_label(mode: snap_vmm::MemoryRestore) -> &'static str {
    match mode {
        snap_vmm::MemoryRestore::Eager => "eager",
        snap_vmm::MemoryRestore::Lazy => "lazy",
        snap_vmm::MemoryRestore::Prefetch => "prefetch",
    }
}

/// Serves `/metrics` on `listener` until the daemon stops: each scrape first refreshes the
/// gauges from the daemon's state.
pub async fn serve(daemon: Arc<crate::daemon::Daemon>, listener: tokio::net::TcpListener) {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let daemon = Arc::clone(&daemon);
            async move {
                let body = tokio::task::spawn_blocking(move || {
                    daemon.refresh_gauges();
                    daemon.metrics().encode()
                })
                .await
                .unwrap_or_default();
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    body,
                )
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!(error = %e, "the metrics listener stopped");
    }
}
