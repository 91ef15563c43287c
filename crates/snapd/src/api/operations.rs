//! Operation calls and the event stream.

use std::time::Duration;

use snap_api::v1 as pb;
use tokio::sync::broadcast::error::RecvError;
use tonic::Response;

use super::validate::parse_id;
use super::{Answer, EventStream, Service, page, status};
use crate::error::{Error, ErrorKind};
use crate::ids::{OpId, VmId};

/// Default and longest wait of WaitOperation.
const WAIT_DEFAULT: Duration = Duration::from_secs(60);
const WAIT_MAX_MS: u64 = 600_000;

pub(super) fn get(s: &Service, r: pb::GetOperationRequest) -> Answer<pb::Operation> {
    let id: OpId = parse_id("operation_id", &r.operation_id)?;
    Ok(Response::new(s.daemon.operations().get(id)?))
}

pub(super) fn list(
    s: &Service,
    r: pb::ListOperationsRequest,
) -> Answer<pb::ListOperationsResponse> {
    if !r.vm_id.is_empty() {
        parse_id::<VmId>("vm_id", &r.vm_id)?;
    }
    let ops: Vec<pb::Operation> = s
        .daemon
        .operations()
        .list()
        .into_iter()
        .filter(|o| r.vm_id.is_empty() || o.vm_id == r.vm_id)
        .filter(|o| !r.active_only || o.ended_unix_ms == 0)
        .collect();
    let filters = format!("{}|{}", r.vm_id, r.active_only);
    let (operations, next_page_token) =
        page(ops, r.page_size, &r.page_token, "ListOperations", &filters)?;
    Ok(Response::new(pb::ListOperationsResponse {
        operations,
        next_page_token,
    }))
}

pub(super) async fn wait(s: &Service, r: pb::WaitOperationRequest) -> Answer<pb::Operation> {
    let id: OpId = parse_id("operation_id", &r.operation_id)?;
    if r.timeout_ms > WAIT_MAX_MS {
        return Err(Error::invalid("timeout_ms", format!("at most {WAIT_MAX_MS}")).into());
    }
    let timeout = if r.timeout_ms == 0 {
        WAIT_DEFAULT
    } else {
        Duration::from_millis(r.timeout_ms)
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let (mut rx, _) = s.daemon.events().subscribe(0);
    loop {
        let op = s.daemon.operations().get(id)?;
        if op.ended_unix_ms != 0 {
            return Ok(Response::new(op));
        }
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => return Ok(Response::new(s.daemon.operations().get(id)?)),
            Ok(Ok(_) | Err(RecvError::Lagged(_))) => {}
            Ok(Err(RecvError::Closed)) => {
                return Err(Error::new(ErrorKind::Unavailable, "snapd is shutting down").into());
            }
        }
    }
}

pub(super) fn cancel(s: &Service, r: pb::CancelOperationRequest) -> Answer<pb::Operation> {
    let id: OpId = parse_id("operation_id", &r.operation_id)?;
    Ok(Response::new(s.daemon.operations().cancel(id)?))
}

pub(super) fn watch(s: &Service, r: pb::WatchEventsRequest) -> Answer<EventStream> {
    if !r.vm_id.is_empty() {
        parse_id::<VmId>("vm_id", &r.vm_id)?;
    }
    let (mut rx, old) = s.daemon.events().subscribe(r.after_sequence);
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
                Err(RecvError::Lagged(n)) => {
                    let _ = tx.send(Err(status::watcher_lagged(n))).await;
                    return;
                }
                Err(RecvError::Closed) => return,
            }
        }
    });
    Ok(Response::new(Box::pin(
        tokio_stream::wrappers::ReceiverStream::new(out),
    )))
}
