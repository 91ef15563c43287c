//! The gRPC service: checks each request, answers retries of a request id from the catalog,
//! runs the work on blocking threads, and maps results to the API.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use snap_api::v1 as pb;
use snap_api::v1::snapd_server::Snapd;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};

use crate::catalog::GuestSpec;
use crate::daemon::{CloneSpec, Daemon, NewDisk, NewVmSpec, RequestCtx};
use crate::error::{ApiError, ApiResult};
use crate::names::{check_id, check_labels, check_name, check_request_id};

/// Default and largest page of a list.
const PAGE_DEFAULT: usize = 100;
const PAGE_MAX: usize = 1000;
/// Default and longest wait of WaitOperation.
const WAIT_DEFAULT: Duration = Duration::from_secs(60);
const WAIT_MAX_MS: u64 = 600_000;
/// Most VMs one clone makes.
const CLONE_MAX: u32 = 64;

/// The service over a [`Daemon`].
pub struct Service {
    daemon: Arc<Daemon>,
    /// One lock per request id being answered, so that concurrent retries run once.
    in_flight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Service {
    /// A service answering for `daemon`.
    pub fn new(daemon: Arc<Daemon>) -> Self {
        Self {
            daemon,
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    fn check_up(&self) -> ApiResult<()> {
        if self.daemon.stopping() {
            return Err(ApiError::new(
                Code::Unavailable,
                "snapd is shutting down: retry against the restarted daemon",
            ));
        }
        Ok(())
    }

    /// Runs `work` once per request id: a retry gets the stored answer (for an operation, its
    /// state now), a concurrent retry waits for the first.
    async fn once<R, F>(
        &self,
        method: &'static str,
        request_id: &str,
        request: &impl prost::Message,
        work: F,
    ) -> Result<Response<R>, Status>
    where
        R: prost::Message + Default + 'static,
        F: FnOnce(Arc<Daemon>, RequestCtx) -> ApiResult<R> + Send + 'static,
        R: Send,
    {
        self.check_up()?;
        check_request_id(request_id)?;
        let ctx = RequestCtx {
            request_id: request_id.to_string(),
            method,
            fingerprint: request.encode_to_vec(),
        };
        let gate = {
            let mut m = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(m.entry(request_id.to_string()).or_default())
        };
        let _held = gate.lock().await;
        let daemon = Arc::clone(&self.daemon);
        let result: ApiResult<R> = tokio::task::spawn_blocking(move || {
            if let Some(stored) = daemon.answered(&ctx)? {
                let r = R::decode(stored.as_slice())
                    .map_err(|e| ApiError::internal(format!("stored answer: {e}")))?;
                return Ok(r);
            }
            let r = work(Arc::clone(&daemon), ctx.clone())?;
            daemon.remember(&ctx, &r)?;
            Ok(r)
        })
        .await
        .map_err(|e| Status::internal(format!("worker: {e}")))?;
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(request_id);
        result.map(Response::new).map_err(Status::from)
    }

    /// Runs a read on a blocking thread.
    async fn read<R: Send + 'static>(
        &self,
        work: impl FnOnce(Arc<Daemon>) -> ApiResult<R> + Send + 'static,
    ) -> Result<Response<R>, Status> {
        let daemon = Arc::clone(&self.daemon);
        tokio::task::spawn_blocking(move || work(daemon))
            .await
            .map_err(|e| Status::internal(format!("worker: {e}")))?
            .map(Response::new)
            .map_err(Status::from)
    }
}

/// Clears the request id of a request so that its encoding identifies the request itself.
macro_rules! fingerprint {
    ($r:expr) => {{
        let mut r = $r.clone();
        r.request_id.clear();
        r
    }};
}

/// One page of `items` from `token` (an offset), and the next token.
fn page<T>(items: Vec<T>, size: u32, token: &str) -> ApiResult<(Vec<T>, String)> {
    let size = match size as usize {
        0 => PAGE_DEFAULT,
        n => n.min(PAGE_MAX),
    };
    let start: usize = if token.is_empty() {
        0
    } else {
        token
            .parse()
            .map_err(|_| ApiError::invalid("page_token", "not a token this daemon gave out"))?
    };
    let end = (start + size).min(items.len());
    let next = if end < items.len() {
        end.to_string()
    } else {
        String::new()
    };
    Ok((
        items
            .into_iter()
            .skip(start)
            .take(end.saturating_sub(start))
            .collect(),
        next,
    ))
}

fn has_labels(have: &HashMap<String, String>, want: &HashMap<String, String>) -> bool {
    want.iter().all(|(k, v)| have.get(k) == Some(v))
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

#[tonic::async_trait]
impl Snapd for Service {
    async fn create_vm(
        &self,
        request: Request<pb::CreateVmRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        let r = request.into_inner();
        check_name("name", &r.name)?;
        let labels = check_labels("labels", &r.labels)?;
        if r.memory_bytes == 0 {
            return Err(ApiError::invalid(
                "memory_bytes",
                "must be set (at least 4 MiB, a multiple of 4096)",
            )
            .into());
        }
        if r.vcpus == 0 {
            return Err(ApiError::invalid("vcpus", "must be 1 to 32").into());
        }
        if r.disks.len() > snap_vmm::virtio::MAX_DISKS {
            return Err(ApiError::invalid(
                "disks",
                format!(
                    "{} disks, at most {}",
                    r.disks.len(),
                    snap_vmm::virtio::MAX_DISKS
                ),
            )
            .into());
        }
        let mut disks = Vec::new();
        for (i, d) in r.disks.iter().enumerate() {
            check_name(&format!("disks[{i}].name"), &d.name)?;
            if r.disks[..i].iter().any(|o| o.name == d.name) {
                return Err(ApiError::invalid(
                    &format!("disks[{i}].name"),
                    format!("two disks are named {:?}", d.name),
                )
                .into());
            }
            let image = (!d.image_path.is_empty()).then(|| std::path::PathBuf::from(&d.image_path));
            if image.is_none() {
                if d.size_bytes == 0 || d.size_bytes % 512 != 0 {
                    return Err(ApiError::invalid(
                        &format!("disks[{i}].size_bytes"),
                        "must be a non-zero multiple of 512 (or give image_path)",
                    )
                    .into());
                }
                if d.size_bytes > snap_disk::MAX_DISK_BYTES {
                    return Err(ApiError::invalid(
                        &format!("disks[{i}].size_bytes"),
                        format!("at most {} bytes", snap_disk::MAX_DISK_BYTES),
                    )
                    .into());
                }
            }
            if let Some(p) = &image {
                if !p.is_absolute() {
                    return Err(ApiError::invalid(
                        &format!("disks[{i}].image_path"),
                        "must be an absolute path on the daemon's host",
                    )
                    .into());
                }
            }
            disks.push(NewDisk {
                name: d.name.clone(),
                size_bytes: d.size_bytes,
                image,
            });
        }
        let g = r.guest.unwrap_or_default();
        let spec = NewVmSpec {
            name: r.name.clone(),
            memory_bytes: r.memory_bytes,
            vcpus: r.vcpus,
            guest: GuestSpec {
                seed: g.seed,
                working_set_pages: g.working_set_pages,
                mutations_per_tick: g.mutations_per_tick,
                ticks: g.ticks,
                disk_sectors_per_tick: g.disk_sectors_per_tick,
            },
            labels,
            start: r.start,
            disks,
        };
        let fp = fingerprint!(r);
        self.once("CreateVm", &r.request_id, &fp, move |d, ctx| {
            d.create_vm(spec, &ctx)
        })
        .await
    }

    async fn get_vm(&self, request: Request<pb::GetVmRequest>) -> Result<Response<pb::Vm>, Status> {
        let id = request.into_inner().vm_id;
        check_id("vm_id", &id)?;
        self.read(move |d| d.get_vm(&id)).await
    }

    async fn list_vms(
        &self,
        request: Request<pb::ListVmsRequest>,
    ) -> Result<Response<pb::ListVmsResponse>, Status> {
        let r = request.into_inner();
        self.read(move |d| {
            let vms: Vec<pb::Vm> = d
                .list_vms()?
                .into_iter()
                .filter(|v| has_labels(&v.labels, &r.labels))
                .collect();
            let (vms, next_page_token) = page(vms, r.page_size, &r.page_token)?;
            Ok(pb::ListVmsResponse {
                vms,
                next_page_token,
            })
        })
        .await
    }

    async fn start_vm(
        &self,
        request: Request<pb::VmActionRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        self.vm_action("StartVm", request, Daemon::start_vm).await
    }

    async fn pause_vm(
        &self,
        request: Request<pb::VmActionRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        self.vm_action("PauseVm", request, Daemon::pause_vm).await
    }

    async fn resume_vm(
        &self,
        request: Request<pb::VmActionRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        self.vm_action("ResumeVm", request, Daemon::resume_vm).await
    }

    async fn stop_vm(
        &self,
        request: Request<pb::VmActionRequest>,
    ) -> Result<Response<pb::Vm>, Status> {
        self.vm_action("StopVm", request, Daemon::stop_vm).await
    }

    async fn delete_vm(
        &self,
        request: Request<pb::DeleteVmRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let r = request.into_inner();
        check_id("vm_id", &r.vm_id)?;
        let fp = fingerprint!(r);
        self.once("DeleteVm", &r.request_id, &fp, move |d, ctx| {
            d.delete_vm(&r.vm_id, r.with_snapshots, &ctx)
        })
        .await
        .map(|op| self.fresh(op))
    }

    async fn get_vm_console(
        &self,
        request: Request<pb::GetVmConsoleRequest>,
    ) -> Result<Response<pb::GetVmConsoleResponse>, Status> {
        let r = request.into_inner();
        check_id("vm_id", &r.vm_id)?;
        self.read(move |d| {
            let (data, next_offset) = d.console(&r.vm_id, r.offset)?;
            Ok(pb::GetVmConsoleResponse { data, next_offset })
        })
        .await
    }

    async fn create_snapshot(
        &self,
        request: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let r = request.into_inner();
        check_id("vm_id", &r.vm_id)?;
        check_name("name", &r.name)?;
        let labels = check_labels("labels", &r.labels)?;
        let fp = fingerprint!(r);
        self.once("CreateSnapshot", &r.request_id, &fp, move |d, ctx| {
            d.create_snapshot(&r.vm_id, r.name, labels, r.leave_paused, &ctx)
        })
        .await
        .map(|op| self.fresh(op))
    }

    async fn get_snapshot(
        &self,
        request: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        let id = request.into_inner().snapshot_id;
        check_id("snapshot_id", &id)?;
        self.read(move |d| d.get_snapshot(&id)).await
    }

    async fn list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let r = request.into_inner();
        if !r.vm_id.is_empty() {
            check_id("vm_id", &r.vm_id)?;
        }
        if !r.parent_id.is_empty() {
            check_id("parent_id", &r.parent_id)?;
            if r.roots_only {
                return Err(
                    ApiError::invalid("roots_only", "cannot be combined with parent_id").into(),
                );
            }
        }
        self.read(move |d| {
            let all: Vec<pb::Snapshot> = d
                .snapshots()?
                .iter()
                .map(Daemon::to_pb_snapshot)
                .filter(|s| r.vm_id.is_empty() || s.vm_id == r.vm_id)
                .filter(|s| r.parent_id.is_empty() || s.parent_id == r.parent_id)
                .filter(|s| !r.roots_only || s.parent_id.is_empty())
                .filter(|s| has_labels(&s.labels, &r.labels))
                .collect();
            let (snapshots, next_page_token) = page(all, r.page_size, &r.page_token)?;
            Ok(pb::ListSnapshotsResponse {
                snapshots,
                next_page_token,
            })
        })
        .await
    }

    async fn get_snapshot_tree(
        &self,
        request: Request<pb::GetSnapshotTreeRequest>,
    ) -> Result<Response<pb::SnapshotTree>, Status> {
        let vm_id = request.into_inner().vm_id;
        check_id("vm_id", &vm_id)?;
        self.read(move |d| {
            let vm = d.get_vm(&vm_id)?;
            let mine: Vec<pb::Snapshot> = d
                .snapshots()?
                .iter()
                .filter(|s| s.vm_id == vm_id)
                .map(Daemon::to_pb_snapshot)
                .collect();
            let ids: std::collections::HashSet<&str> = mine.iter().map(|s| s.id.as_str()).collect();
            let root_ids = mine
                .iter()
                .filter(|s| !ids.contains(s.parent_id.as_str()))
                .map(|s| s.id.clone())
                .collect();
            let nodes = mine
                .iter()
                .map(|s| pb::SnapshotNode {
                    snapshot: Some(s.clone()),
                    child_ids: mine
                        .iter()
                        .filter(|c| c.parent_id == s.id)
                        .map(|c| c.id.clone())
                        .collect(),
                })
                .collect();
            Ok(pb::SnapshotTree {
                vm_id,
                root_ids,
                nodes,
                current_snapshot_id: vm.current_snapshot_id,
            })
        })
        .await
    }

    async fn restore_snapshot(
        &self,
        request: Request<pb::RestoreSnapshotRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let r = request.into_inner();
        check_id("snapshot_id", &r.snapshot_id)?;
        let mode = r.memory_mode();
        let (target, new_vm) = match &r.target {
            Some(pb::restore_snapshot_request::Target::VmId(id)) => {
                check_id("vm_id", id)?;
                (Some(id.clone()), None)
            }
            Some(pb::restore_snapshot_request::Target::NewVm(n)) => {
                check_name("new_vm.name", &n.name)?;
                let labels = check_labels("new_vm.labels", &n.labels)?;
                (None, Some((n.name.clone(), labels)))
            }
            None => {
                return Err(ApiError::invalid(
                    "target",
                    "set vm_id (revert that VM) or new_vm (restore into a new VM)",
                )
                .into());
            }
        };
        let fp = fingerprint!(r);
        self.once("RestoreSnapshot", &r.request_id, &fp, move |d, ctx| {
            d.restore_snapshot(
                &r.snapshot_id,
                target.as_deref(),
                new_vm,
                mode,
                r.leave_paused,
                &ctx,
            )
        })
        .await
        .map(|op| self.fresh(op))
    }

    async fn clone_snapshot(
        &self,
        request: Request<pb::CloneSnapshotRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let r = request.into_inner();
        check_id("snapshot_id", &r.snapshot_id)?;
        if r.count == 0 || r.count > CLONE_MAX {
            return Err(ApiError::invalid("count", format!("must be 1 to {CLONE_MAX}")).into());
        }
        check_name("name_prefix", &r.name_prefix)?;
        check_name("name_prefix", &format!("{}-{}", r.name_prefix, r.count - 1))?;
        let labels = check_labels("labels", &r.labels)?;
        let mode = r.memory_mode();
        let fp = fingerprint!(r);
        self.once("CloneSnapshot", &r.request_id, &fp, move |d, ctx| {
            let spec = CloneSpec {
                count: r.count,
                prefix: r.name_prefix,
                labels,
                mode,
                leave_paused: r.leave_paused,
            };
            d.clone_snapshot(&r.snapshot_id, spec, &ctx)
        })
        .await
        .map(|op| self.fresh(op))
    }

    async fn delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let r = request.into_inner();
        check_id("snapshot_id", &r.snapshot_id)?;
        let fp = fingerprint!(r);
        self.once("DeleteSnapshot", &r.request_id, &fp, move |d, ctx| {
            d.delete_snapshot(&r.snapshot_id, r.with_descendants, &ctx)
        })
        .await
        .map(|op| self.fresh(op))
    }

    async fn update_snapshot_labels(
        &self,
        request: Request<pb::UpdateSnapshotLabelsRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        let r = request.into_inner();
        check_id("snapshot_id", &r.snapshot_id)?;
        let set = check_labels("set", &r.set)?;
        for k in &r.remove {
            check_name("remove", k)?;
        }
        let fp = fingerprint!(r);
        self.once("UpdateSnapshotLabels", &r.request_id, &fp, move |d, _| {
            d.update_labels(&r.snapshot_id, set, &r.remove)
        })
        .await
    }

    async fn get_operation(
        &self,
        request: Request<pb::GetOperationRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let id = request.into_inner().operation_id;
        check_id("operation_id", &id)?;
        Ok(Response::new(self.daemon.operation(&id)?))
    }

    async fn list_operations(
        &self,
        request: Request<pb::ListOperationsRequest>,
    ) -> Result<Response<pb::ListOperationsResponse>, Status> {
        let r = request.into_inner();
        let ops: Vec<pb::Operation> = self
            .daemon
            .operations()
            .into_iter()
            .filter(|o| r.vm_id.is_empty() || o.vm_id == r.vm_id)
            .filter(|o| !r.active_only || o.ended_unix_ms == 0)
            .collect();
        let (operations, next_page_token) = page(ops, r.page_size, &r.page_token)?;
        Ok(Response::new(pb::ListOperationsResponse {
            operations,
            next_page_token,
        }))
    }

    async fn wait_operation(
        &self,
        request: Request<pb::WaitOperationRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let r = request.into_inner();
        check_id("operation_id", &r.operation_id)?;
        if r.timeout_ms > WAIT_MAX_MS {
            return Err(ApiError::invalid("timeout_ms", format!("at most {WAIT_MAX_MS}")).into());
        }
        let timeout = if r.timeout_ms == 0 {
            WAIT_DEFAULT
        } else {
            Duration::from_millis(r.timeout_ms)
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let (mut rx, _) = self.daemon.subscribe(0);
        loop {
            let op = self.daemon.operation(&r.operation_id)?;
            if op.ended_unix_ms != 0 {
                return Ok(Response::new(op));
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Err(_) => return Ok(Response::new(self.daemon.operation(&r.operation_id)?)),
                Ok(Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
                Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => {
                    return Err(ApiError::new(Code::Unavailable, "snapd is shutting down").into());
                }
            }
        }
    }

    async fn cancel_operation(
        &self,
        request: Request<pb::CancelOperationRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let id = request.into_inner().operation_id;
        check_id("operation_id", &id)?;
        Ok(Response::new(self.daemon.cancel(&id)?))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let r = request.into_inner();
        if !r.vm_id.is_empty() {
            check_id("vm_id", &r.vm_id)?;
        }
        let (mut rx, old) = self.daemon.subscribe(r.after_sequence);
        let (tx, out) = tokio::sync::mpsc::channel(256);
        let vm_id = r.vm_id;
        let about = move |e: &pb::Event| -> bool {
            if vm_id.is_empty() {
                return true;
            }
            match &e.kind {
                Some(pb::event::Kind::Vm(v)) => v.id == vm_id,
                Some(pb::event::Kind::SnapshotCreated(s)) => s.vm_id == vm_id,
                Some(pb::event::Kind::Operation(o)) => o.vm_id == vm_id,
                Some(pb::event::Kind::SnapshotDeleted(_)) | None => true,
            }
        };
        tokio::spawn(async move {
            let mut last = 0;
            for e in old {
                last = e.sequence;
                if about(&e) && tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
            loop {
                match rx.recv().await {
                    Ok(e) if e.sequence > last => {
                        if about(&e) && tx.send(Ok(e)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let status = Status::new(
                            Code::ResourceExhausted,
                            format!(
                                "the watcher fell {n} events behind: watch again from the last sequence seen"
                            ),
                        );
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }
}

impl Service {
    /// Start, pause, resume or stop: `action` on the VM the request names, once per request id.
    async fn vm_action(
        &self,
        method: &'static str,
        request: Request<pb::VmActionRequest>,
        action: fn(&Daemon, &str) -> ApiResult<pb::Vm>,
    ) -> Result<Response<pb::Vm>, Status> {
        let r = request.into_inner();
        check_id("vm_id", &r.vm_id)?;
        let fp = fingerprint!(r);
        self.once(method, &r.request_id, &fp, move |d, _| action(&d, &r.vm_id))
            .await
    }

    /// An operation answered from the request store, as it is now.
    fn fresh(&self, op: Response<pb::Operation>) -> Response<pb::Operation> {
        let op = op.into_inner();
        Response::new(self.daemon.operation(&op.id).unwrap_or(op))
    }
}
