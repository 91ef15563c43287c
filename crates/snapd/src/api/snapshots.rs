//! Snapshot calls.

use snap_api::v1 as pb;

use super::validate::{check_labels, check_name, parse_id};
use super::{Answer, Service, canonical_labels, convert, fingerprint, has_labels, page};
use crate::clone::CloneSpec;
use crate::error::Error;
use crate::ids::{SnapshotId, VmId};
use crate::remote::RemoteRestore;
use crate::restore::{RestoreSpec, RestoreTarget};
use crate::snapshot::SnapshotSpec;

/// Most VMs one clone makes.
const CLONE_MAX: u32 = 64;

pub(super) async fn create(s: &Service, r: pb::CreateSnapshotRequest) -> Answer<pb::Operation> {
    let vm: VmId = parse_id("vm_id", &r.vm_id)?;
    check_name("name", &r.name)?;
    let spec = SnapshotSpec {
        vm,
        name: r.name.clone(),
        labels: check_labels("labels", &r.labels)?,
        leave_paused: r.leave_paused,
        wait: r.wait,
    };
    let fp = fingerprint!(r);
    s.once("CreateSnapshot", &r.request_id, &fp, move |d, ctx| {
        d.create_snapshot(spec, &ctx)
    })
    .await
    .map(|op| s.fresh(op))
}

pub(super) async fn get(s: &Service, r: pb::GetSnapshotRequest) -> Answer<pb::Snapshot> {
    let id: SnapshotId = parse_id("snapshot_id", &r.snapshot_id)?;
    s.read(move |d| d.get_snapshot(id)).await
}

pub(super) async fn list(
    s: &Service,
    r: pb::ListSnapshotsRequest,
) -> Answer<pb::ListSnapshotsResponse> {
    if !r.vm_id.is_empty() {
        parse_id::<VmId>("vm_id", &r.vm_id)?;
    }
    if !r.parent_id.is_empty() {
        parse_id::<SnapshotId>("parent_id", &r.parent_id)?;
        if r.roots_only {
            return Err(Error::invalid("roots_only", "cannot be combined with parent_id").into());
        }
    }
    s.read(move |d| {
        let all: Vec<pb::Snapshot> = d
            .snapshots()?
            .iter()
            .map(convert::snapshot)
            .filter(|s| r.vm_id.is_empty() || s.vm_id == r.vm_id)
            .filter(|s| r.parent_id.is_empty() || s.parent_id == r.parent_id)
            .filter(|s| !r.roots_only || s.parent_id.is_empty())
            .filter(|s| has_labels(&s.labels, &r.labels))
            .collect();
        let filters = format!(
            "{}|{}|{}|{}",
            r.vm_id,
            r.parent_id,
            r.roots_only,
            canonical_labels(&r.labels)
        );
        let (snapshots, next_page_token) =
            page(all, r.page_size, &r.page_token, "ListSnapshots", &filters)?;
        Ok(pb::ListSnapshotsResponse {
            snapshots,
            next_page_token,
        })
    })
    .await
}

pub(super) async fn tree(s: &Service, r: pb::GetSnapshotTreeRequest) -> Answer<pb::SnapshotTree> {
    let vm_id: VmId = parse_id("vm_id", &r.vm_id)?;
    s.read(move |d| {
        let vm = d.get_vm(vm_id)?;
        let mine: Vec<pb::Snapshot> = d
            .snapshots()?
            .iter()
            .filter(|s| s.vm_id == vm_id)
            .map(convert::snapshot)
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
            vm_id: vm_id.to_string(),
            root_ids,
            nodes,
            current_snapshot_id: vm.current_snapshot_id,
        })
    })
    .await
}

pub(super) async fn restore(s: &Service, r: pb::RestoreSnapshotRequest) -> Answer<pb::Operation> {
    let snapshot: SnapshotId = parse_id("snapshot_id", &r.snapshot_id)?;
    let target = match &r.target {
        Some(pb::restore_snapshot_request::Target::VmId(id)) => {
            RestoreTarget::Revert(parse_id("vm_id", id)?)
        }
        Some(pb::restore_snapshot_request::Target::NewVm(n)) => {
            check_name("new_vm.name", &n.name)?;
            RestoreTarget::NewVm(n.name.clone(), check_labels("new_vm.labels", &n.labels)?)
        }
        None => {
            return Err(Error::invalid(
                "target",
                "set vm_id (revert that VM) or new_vm (restore into a new VM)",
            )
            .into());
        }
    };
    if !r.remote.is_empty() {
        check_name("remote", &r.remote)?;
        let RestoreTarget::NewVm(name, labels) = target else {
            return Err(Error::invalid(
                "remote",
                "a restore from a remote goes into a new VM: set new_vm, not vm_id",
            )
            .into());
        };
        let spec = RemoteRestore {
            remote: r.remote.clone(),
            snapshot,
            kind: pb::OperationKind::RestoreSnapshot,
            names: vec![name],
            labels,
            mode: convert::memory_mode(r.memory_mode()),
            leave_paused: r.leave_paused,
            wait: r.wait,
        };
        let fp = fingerprint!(r);
        return s
            .once("RestoreSnapshot", &r.request_id, &fp, move |d, ctx| {
                d.restore_from_remote(spec, &ctx)
            })
            .await
            .map(|op| s.fresh(op));
    }
    let spec = RestoreSpec {
        snapshot,
        target,
        mode: convert::memory_mode(r.memory_mode()),
        leave_paused: r.leave_paused,
        wait: r.wait,
    };
    let fp = fingerprint!(r);
    s.once("RestoreSnapshot", &r.request_id, &fp, move |d, ctx| {
        d.restore_snapshot(spec, &ctx)
    })
    .await
    .map(|op| s.fresh(op))
}

pub(super) async fn clone(s: &Service, r: pb::CloneSnapshotRequest) -> Answer<pb::Operation> {
    let snapshot: SnapshotId = parse_id("snapshot_id", &r.snapshot_id)?;
    if r.count == 0 || r.count > CLONE_MAX {
        return Err(Error::invalid("count", format!("must be 1 to {CLONE_MAX}")).into());
    }
    check_name("name_prefix", &r.name_prefix)?;
    check_name("name_prefix", &format!("{}-{}", r.name_prefix, r.count - 1))?;
    if !r.remote.is_empty() {
        check_name("remote", &r.remote)?;
        let spec = RemoteRestore {
            remote: r.remote.clone(),
            snapshot,
            kind: pb::OperationKind::CloneSnapshot,
            names: (0..r.count)
                .map(|i| format!("{}-{i}", r.name_prefix))
                .collect(),
            labels: check_labels("labels", &r.labels)?,
            mode: convert::memory_mode(r.memory_mode()),
            leave_paused: r.leave_paused,
            wait: r.wait,
        };
        let fp = fingerprint!(r);
        return s
            .once("CloneSnapshot", &r.request_id, &fp, move |d, ctx| {
                d.restore_from_remote(spec, &ctx)
            })
            .await
            .map(|op| s.fresh(op));
    }
    let spec = CloneSpec {
        snapshot,
        count: r.count,
        prefix: r.name_prefix.clone(),
        labels: check_labels("labels", &r.labels)?,
        mode: convert::memory_mode(r.memory_mode()),
        leave_paused: r.leave_paused,
        wait: r.wait,
    };
    let fp = fingerprint!(r);
    s.once("CloneSnapshot", &r.request_id, &fp, move |d, ctx| {
        d.clone_snapshot(spec, &ctx)
    })
    .await
    .map(|op| s.fresh(op))
}

pub(super) async fn delete(s: &Service, r: pb::DeleteSnapshotRequest) -> Answer<pb::Operation> {
    let id: SnapshotId = parse_id("snapshot_id", &r.snapshot_id)?;
    let fp = fingerprint!(r);
    s.once("DeleteSnapshot", &r.request_id, &fp, move |d, ctx| {
        d.delete_snapshot(id, r.with_descendants, r.wait, &ctx)
    })
    .await
    .map(|op| s.fresh(op))
}

pub(super) async fn labels(
    s: &Service,
    r: pb::UpdateSnapshotLabelsRequest,
) -> Answer<pb::Snapshot> {
    let id: SnapshotId = parse_id("snapshot_id", &r.snapshot_id)?;
    let set = check_labels("set", &r.set)?;
    for k in &r.remove {
        check_name("remove", k)?;
    }
    let fp = fingerprint!(r);
    s.once("UpdateSnapshotLabels", &r.request_id, &fp, move |d, ctx| {
        d.update_labels(id, set, &r.remove, &ctx)
    })
    .await
}
