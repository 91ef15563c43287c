//! The gRPC service: thin handlers that check each request ([`validate`]), answer retries of a
//! request id from the catalog, run the daemon's work on blocking threads, and convert results
//! ([`convert`]) and errors ([`status`], the only place that names gRPC codes).

pub mod convert;
mod operations;
mod remote;
mod snapshots;
pub mod status;
pub mod validate;
mod vms;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use snap_api::v1 as pb;
use snap_api::v1::snapd_server::Snapd;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::daemon::Daemon;
use crate::error::{Error, ErrorKind, Result};
use crate::ops::requests::{CallerWaits, RequestCtx};
use validate::check_request_id;

/// Calls that change something, and reads, run on blocking threads at most this many at a time
/// each (more wait their turn without a thread), so that a flood of calls cannot grow threads
/// or memory without bound, and reads cannot starve changes or the other way round.
const MAX_CHANGING_CALLS: usize = 64;
const MAX_READING_CALLS: usize = 32;

/// Default and largest page of a list.
const PAGE_DEFAULT: usize = 100;
const PAGE_MAX: usize = 1000;

/// A lock per request id being answered.
type InFlight = Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>;

/// The service over a [`Daemon`].
pub struct Service {
    daemon: Arc<Daemon>,
    /// One lock per request id being answered, so that concurrent retries run once.
    in_flight: Arc<InFlight>,
    changing: Arc<tokio::sync::Semaphore>,
    reading: Arc<tokio::sync::Semaphore>,
}

impl Service {
    /// A service answering for `daemon`.
    pub fn new(daemon: Arc<Daemon>) -> Self {
        Self {
            daemon,
            in_flight: Arc::default(),
            changing: Arc::new(tokio::sync::Semaphore::new(MAX_CHANGING_CALLS)),
            reading: Arc::new(tokio::sync::Semaphore::new(MAX_READING_CALLS)),
        }
    }

    /// Runs `work` once per request id: a retry gets the stored answer, a concurrent retry waits
    /// for the first. `work` stores its answer itself, in the transaction of what it changed.
    async fn once<R, F>(
        &self,
        method: &'static str,
        request_id: &str,
        request: &impl prost::Message,
        work: F,
    ) -> std::result::Result<Response<R>, Status>
    where
        R: prost::Message + Default + Send + 'static,
        F: FnOnce(Arc<Daemon>, RequestCtx) -> Result<R> + Send + 'static,
    {
        if self.daemon.stopping() {
            return Err(Error::new(
                ErrorKind::Unavailable,
                "snapd is shutting down: retry against the restarted daemon",
            )
            .into());
        }
        check_request_id(request_id)?;
        let ctx = RequestCtx {
            request_id: request_id.to_string(),
            method,
            fingerprint: request.encode_to_vec(),
            caller: crate::auth::calling()
                .map(|c| c.identity)
                .unwrap_or_default(),
            abandoned: Default::default(),
        };
        let waits = CallerWaits::new(&ctx);
        let gate = {
            let mut m = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(m.entry(request_id.to_string()).or_default())
        };
        let held = gate.lock_owned().await;
        let turn = Arc::clone(&self.changing)
            .acquire_owned()
            .await
            .map_err(|_| Error::internal("the call limit was closed"))?;
        let daemon = Arc::clone(&self.daemon);
        let in_flight = Arc::clone(&self.in_flight);
        let result = tokio::task::spawn_blocking(move || {
            // The request id stays locked until the work is done, even if the caller went away
            // meanwhile: a retry then gets the stored answer instead of doing it again.
            let id = ctx.request_id.clone();
            let abandoned = Arc::clone(&ctx.abandoned);
            let result = match ctx.answered(daemon.catalog()) {
                Ok(Some(stored)) => {
                    daemon.metrics().request_id_hits.inc();
                    R::decode(stored.as_slice())
                        .map_err(|e| Error::internal(format!("stored answer: {e}")))
                }
                Ok(None) => {
                    let caller = ctx.caller.clone();
                    crate::auth::acting_as(&caller, || work(daemon, ctx))
                }
                Err(e) => Err(e),
            };
            let mut m = in_flight.lock().unwrap_or_else(|e| e.into_inner());
            // Forget the lock unless a retry waits on it (the map and `held` are the only
            // holders then; a new caller cannot take it while the map is locked).
            if m.get(&id).is_some_and(|g| Arc::strong_count(g) <= 2) {
                m.remove(&id);
            }
            drop(m);
            drop(held);
            drop(turn);
            if abandoned.load(std::sync::atomic::Ordering::Relaxed) {
                let outcome = match &result {
                    Ok(_) => "done".to_string(),
                    Err(e) => e.to_string(),
                };
                tracing::warn!(method, request_id = %id, %outcome, "the caller gave up before the answer");
            }
            result
        })
        .await
        .map_err(|e| status::worker_failed(&e))?;
        waits.answered();
        result.map(Response::new).map_err(Status::from)
    }

    /// Runs a read on a blocking thread.
    async fn read<R: Send + 'static>(
        &self,
        work: impl FnOnce(Arc<Daemon>) -> Result<R> + Send + 'static,
    ) -> std::result::Result<Response<R>, Status> {
        let daemon = Arc::clone(&self.daemon);
        let turn = Arc::clone(&self.reading)
            .acquire_owned()
            .await
            .map_err(|_| Error::internal("the call limit was closed"))?;
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            work(daemon)
        })
        .await
        .map_err(|e| status::worker_failed(&e))?
        .map(Response::new)
        .map_err(Status::from)
    }

    /// An operation answered from the request store, as it is now.
    fn fresh(&self, op: Response<pb::Operation>) -> Response<pb::Operation> {
        let op = op.into_inner();
        let now = op
            .id
            .parse()
            .ok()
            .and_then(|id| self.daemon.operations().get(id).ok());
        Response::new(now.unwrap_or(op))
    }
}

/// A request with its request id cleared: its encoding identifies the request itself.
macro_rules! fingerprint {
    ($r:expr) => {{
        let mut r = $r.clone();
        r.request_id.clear();
        r
    }};
}
pub(crate) use fingerprint;

/// What a page token is bound to: the list call and its filters, hashed.
fn token_binding(list: &str, filters: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    list.hash(&mut h);
    filters.hash(&mut h);
    h.finish()
}

/// Label filters in one canonical form (sorted), for [`page`].
fn canonical_labels(labels: &HashMap<String, String>) -> String {
    format!(
        "{:?}",
        labels.iter().collect::<std::collections::BTreeMap<_, _>>()
    )
}

/// One page of `items` (the result of list call `list` with `filters`, every filter of the
/// request in a canonical form) from `token`, and the next token. A token is the offset and the
/// binding of the call that made it (`<offset>-<16 hex digits>`), so that a token of another
/// list, or of the same list with other filters, is refused instead of paging the wrong list.
fn page<T>(
    items: Vec<T>,
    size: u32,
    token: &str,
    list: &str,
    filters: &str,
) -> Result<(Vec<T>, String)> {
    let size = match size as usize {
        0 => PAGE_DEFAULT,
        n => n.min(PAGE_MAX),
    };
    let binding = token_binding(list, filters);
    let start: usize = if token.is_empty() {
        0
    } else {
        let parsed = token.split_once('-').and_then(|(offset, bound)| {
            Some((
                offset.parse::<usize>().ok()?,
                u64::from_str_radix(bound, 16).ok()?,
            ))
        });
        match parsed {
            Some((offset, bound)) if bound == binding => offset,
            _ => {
                return Err(Error::invalid(
                    "page_token",
                    format!(
                        "not a token this daemon gave out for {list} with these filters (a page \
                         token goes with the request that returned it; start again without one)"
                    ),
                ));
            }
        }
    };
    let end = start.saturating_add(size).min(items.len());
    let next = if end < items.len() {
        format!("{end}-{binding:016x}")
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

type EventStream = Pin<Box<dyn Stream<Item = std::result::Result<pb::Event, Status>> + Send>>;
type Answer<T> = std::result::Result<Response<T>, Status>;

#[tonic::async_trait]
impl Snapd for Service {
    async fn create_vm(&self, r: Request<pb::CreateVmRequest>) -> Answer<pb::Vm> {
        vms::create(self, r.into_inner()).await
    }

    async fn get_vm(&self, r: Request<pb::GetVmRequest>) -> Answer<pb::Vm> {
        vms::get(self, r.into_inner()).await
    }

    async fn list_vms(&self, r: Request<pb::ListVmsRequest>) -> Answer<pb::ListVmsResponse> {
        vms::list(self, r.into_inner()).await
    }

    async fn start_vm(&self, r: Request<pb::VmActionRequest>) -> Answer<pb::Vm> {
        vms::action(self, "StartVm", r.into_inner()).await
    }

    async fn pause_vm(&self, r: Request<pb::VmActionRequest>) -> Answer<pb::Vm> {
        vms::action(self, "PauseVm", r.into_inner()).await
    }

    async fn resume_vm(&self, r: Request<pb::VmActionRequest>) -> Answer<pb::Vm> {
        vms::action(self, "ResumeVm", r.into_inner()).await
    }

    async fn stop_vm(&self, r: Request<pb::VmActionRequest>) -> Answer<pb::Vm> {
        vms::action(self, "StopVm", r.into_inner()).await
    }

    async fn delete_vm(&self, r: Request<pb::DeleteVmRequest>) -> Answer<pb::Operation> {
        vms::delete(self, r.into_inner()).await
    }

    async fn get_vm_console(
        &self,
        r: Request<pb::GetVmConsoleRequest>,
    ) -> Answer<pb::GetVmConsoleResponse> {
        vms::console(self, r.into_inner()).await
    }

    async fn create_snapshot(
        &self,
        r: Request<pb::CreateSnapshotRequest>,
    ) -> Answer<pb::Operation> {
        snapshots::create(self, r.into_inner()).await
    }

    async fn get_snapshot(&self, r: Request<pb::GetSnapshotRequest>) -> Answer<pb::Snapshot> {
        snapshots::get(self, r.into_inner()).await
    }

    async fn list_snapshots(
        &self,
        r: Request<pb::ListSnapshotsRequest>,
    ) -> Answer<pb::ListSnapshotsResponse> {
        snapshots::list(self, r.into_inner()).await
    }

    async fn get_snapshot_tree(
        &self,
        r: Request<pb::GetSnapshotTreeRequest>,
    ) -> Answer<pb::SnapshotTree> {
        snapshots::tree(self, r.into_inner()).await
    }

    async fn restore_snapshot(
        &self,
        r: Request<pb::RestoreSnapshotRequest>,
    ) -> Answer<pb::Operation> {
        snapshots::restore(self, r.into_inner()).await
    }

    async fn push_snapshot(&self, r: Request<pb::PushSnapshotRequest>) -> Answer<pb::Operation> {
        remote::push(self, r.into_inner()).await
    }

    async fn list_remote_snapshots(
        &self,
        r: Request<pb::ListRemoteSnapshotsRequest>,
    ) -> Answer<pb::ListRemoteSnapshotsResponse> {
        remote::list(self, r.into_inner()).await
    }

    async fn pull_snapshot(&self, r: Request<pb::PullSnapshotRequest>) -> Answer<pb::Operation> {
        remote::pull(self, r.into_inner()).await
    }

    async fn delete_remote_snapshot(
        &self,
        r: Request<pb::DeleteRemoteSnapshotRequest>,
    ) -> Answer<pb::Operation> {
        remote::delete(self, r.into_inner()).await
    }

    async fn sweep_remote(&self, r: Request<pb::SweepRemoteRequest>) -> Answer<pb::Operation> {
        remote::sweep(self, r.into_inner()).await
    }

    async fn clone_snapshot(&self, r: Request<pb::CloneSnapshotRequest>) -> Answer<pb::Operation> {
        snapshots::clone(self, r.into_inner()).await
    }

    async fn delete_snapshot(
        &self,
        r: Request<pb::DeleteSnapshotRequest>,
    ) -> Answer<pb::Operation> {
        snapshots::delete(self, r.into_inner()).await
    }

    async fn update_snapshot_labels(
        &self,
        r: Request<pb::UpdateSnapshotLabelsRequest>,
    ) -> Answer<pb::Snapshot> {
        snapshots::labels(self, r.into_inner()).await
    }

    async fn get_operation(&self, r: Request<pb::GetOperationRequest>) -> Answer<pb::Operation> {
        operations::get(self, r.into_inner())
    }

    async fn list_operations(
        &self,
        r: Request<pb::ListOperationsRequest>,
    ) -> Answer<pb::ListOperationsResponse> {
        operations::list(self, r.into_inner())
    }

    async fn wait_operation(&self, r: Request<pb::WaitOperationRequest>) -> Answer<pb::Operation> {
        operations::wait(self, r.into_inner()).await
    }

    async fn cancel_operation(
        &self,
        r: Request<pb::CancelOperationRequest>,
    ) -> Answer<pb::Operation> {
        operations::cancel(self, r.into_inner())
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(&self, r: Request<pb::WatchEventsRequest>) -> Answer<EventStream> {
        operations::watch(self, r.into_inner())
    }
}
