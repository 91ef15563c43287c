//! Remote store calls: push, list, pull, delete, sweep.

use snap_api::v1 as pb;

use super::validate::{check_name, parse_id};
use super::{Answer, Service, fingerprint, page};
use crate::error::Error;
use crate::ids::SnapshotId;

pub(super) async fn push(s: &Service, r: pb::PushSnapshotRequest) -> Answer<pb::Operation> {
    let id: SnapshotId = parse_id("snapshot_id", &r.snapshot_id)?;
    check_name("remote", &r.remote)?;
    let fp = fingerprint!(r);
    s.once("PushSnapshot", &r.request_id, &fp, move |d, ctx| {
        d.push_snapshot(id, r.remote, r.wait, &ctx)
    })
    .await
    .map(|op| s.fresh(op))
}

pub(super) async fn list(
    s: &Service,
    r: pb::ListRemoteSnapshotsRequest,
) -> Answer<pb::ListRemoteSnapshotsResponse> {
    check_name("remote", &r.remote)?;
    let only: Option<SnapshotId> = if r.snapshot_id.is_empty() {
        None
    } else {
        Some(parse_id("snapshot_id", &r.snapshot_id)?)
    };
    s.read(move |d| {
        let filters = format!("{}|{}", r.remote, r.snapshot_id);
        d.list_remote_snapshots(&r.remote, only, |all| {
            page(
                all,
                r.page_size,
                &r.page_token,
                "ListRemoteSnapshots",
                &filters,
            )
        })
    })
    .await
}

pub(super) async fn pull(s: &Service, r: pb::PullSnapshotRequest) -> Answer<pb::Operation> {
    let id: SnapshotId = parse_id("snapshot_id", &r.snapshot_id)?;
    check_name("remote", &r.remote)?;
    let manifest = if r.manifest_id.is_empty() {
        None
    } else {
        Some(
            r.manifest_id
                .parse()
                .map_err(|e| Error::invalid("manifest_id", e))?,
        )
    };
    let fp = fingerprint!(r);
    s.once("PullSnapshot", &r.request_id, &fp, move |d, ctx| {
        d.pull_snapshot(id, manifest, r.remote, r.wait, &ctx)
    })
    .await
    .map(|op| s.fresh(op))
}

pub(super) async fn delete(
    s: &Service,
    r: pb::DeleteRemoteSnapshotRequest,
) -> Answer<pb::Operation> {
    let id: SnapshotId = parse_id("snapshot_id", &r.snapshot_id)?;
    check_name("remote", &r.remote)?;
    let fp = fingerprint!(r);
    s.once("DeleteRemoteSnapshot", &r.request_id, &fp, move |d, ctx| {
        d.delete_remote_snapshot(id, r.remote, r.wait, &ctx)
    })
    .await
    .map(|op| s.fresh(op))
}

pub(super) async fn sweep(s: &Service, r: pb::SweepRemoteRequest) -> Answer<pb::Operation> {
    check_name("remote", &r.remote)?;
    let fp = fingerprint!(r);
    s.once("SweepRemote", &r.request_id, &fp, move |d, ctx| {
        d.sweep_remote(r.remote, r.wait, &ctx)
    })
    .await
    .map(|op| s.fresh(op))
}
