//! Names to ids, and lists followed across every page.

use std::collections::HashMap;

use snap_api::v1 as pb;
use snap_api::v1::snapd_client::SnapdClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::error::CliError;

type Client = SnapdClient<Channel>;

/// Whether `s` has the shape of a daemon-assigned id (32 lowercase hex digits).
pub(crate) fn looks_like_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Every VM carrying `labels`.
pub(crate) async fn all_vms(
    c: &mut Client,
    labels: HashMap<String, String>,
) -> Result<Vec<pb::Vm>, CliError> {
    let mut vms = Vec::new();
    let mut page_token = String::new();
    loop {
        let r = c
            .list_vms(pb::ListVmsRequest {
                page_size: 1000,
                page_token,
                labels: labels.clone(),
            })
            .await?
            .into_inner();
        vms.extend(r.vms);
        if r.next_page_token.is_empty() {
            return Ok(vms);
        }
        page_token = r.next_page_token;
    }
}

/// The id of the VM `vm` names: an id of a VM, else the name of one. An unknown string of id
/// shape is passed on as it is, so that the daemon's answer says what is wrong.
pub(crate) async fn vm_id(c: &mut Client, vm: &str) -> Result<String, CliError> {
    let vms = all_vms(c, HashMap::new()).await?;
    if let Some(v) = vms.iter().find(|v| v.id == vm) {
        return Ok(v.id.clone());
    }
    if let Some(v) = vms.iter().find(|v| v.name == vm) {
        return Ok(v.id.clone());
    }
    if looks_like_id(vm) {
        return Ok(vm.to_string());
    }
    Err(CliError::new(
        Code::NotFound,
        format!("no VM with id or name {vm:?}"),
    ))
}

/// Every snapshot that matches `filter` (its page fields are ignored).
pub(crate) async fn all_snapshots(
    c: &mut Client,
    filter: pb::ListSnapshotsRequest,
) -> Result<Vec<pb::Snapshot>, CliError> {
    let mut snapshots = Vec::new();
    let mut page_token = String::new();
    loop {
        let r = c
            .list_snapshots(pb::ListSnapshotsRequest {
                page_size: 1000,
                page_token,
                ..filter.clone()
            })
            .await?
            .into_inner();
        snapshots.extend(r.snapshots);
        if r.next_page_token.is_empty() {
            return Ok(snapshots);
        }
        page_token = r.next_page_token;
    }
}

/// The id of the snapshot `snapshot` names: an id, or `<vm>/<snapshot name>` (names cannot hold
/// '/').
pub(crate) async fn snapshot_id(c: &mut Client, snapshot: &str) -> Result<String, CliError> {
    let Some((vm, name)) = snapshot.split_once('/') else {
        return Ok(snapshot.to_string());
    };
    let vm_id = vm_id(c, vm).await?;
    let found = all_snapshots(
        c,
        pb::ListSnapshotsRequest {
            vm_id: vm_id.clone(),
            ..Default::default()
        },
    )
    .await?;
    found
        .into_iter()
        .find(|s| s.name == name)
        .map(|s| s.id)
        .ok_or_else(|| {
            CliError::new(
                Code::NotFound,
                format!("VM {vm} ({vm_id}) has no snapshot named {name:?}"),
            )
        })
}

/// Every operation that matches `filter`, oldest first.
pub(crate) async fn all_operations(
    c: &mut Client,
    filter: pb::ListOperationsRequest,
) -> Result<Vec<pb::Operation>, CliError> {
    let mut ops = Vec::new();
    let mut page_token = String::new();
    loop {
        let r = c
            .list_operations(pb::ListOperationsRequest {
                page_size: 1000,
                page_token,
                ..filter.clone()
            })
            .await?
            .into_inner();
        ops.extend(r.operations);
        if r.next_page_token.is_empty() {
            return Ok(ops);
        }
        page_token = r.next_page_token;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_told_from_names() {
        assert!(looks_like_id("0123456789abcdef0123456789abcdef"));
        assert!(!looks_like_id("0123456789ABCDEF0123456789abcdef"));
        assert!(!looks_like_id("web-1"));
    }
}
