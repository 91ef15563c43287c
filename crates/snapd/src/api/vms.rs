//! VM calls.

use super::validate::{check_labels, check_name, parse_id};
use super::{Answer, Service, canonical_labels, convert, fingerprint, has_labels, page};
use crate::create_vm::{NewDisk, NewVmSpec};
use crate::error::{Error, Result};
use crate::ids::VmId;
use crate::lifecycle::VmAction;
use snap_api::v1 as pb;

/// Most bytes of console one call returns (ask again from `next_offset` for more).
const CONSOLE_MAX: usize = 1 << 20;

fn check_disks(disks: &[pb::DiskSpec]) -> Result<Vec<NewDisk>> {
    if disks.len() > snap_vmm::virtio::MAX_DISKS {
        return Err(Error::invalid(
            "disks",
            format!(
                "{} disks, at most {}",
                disks.len(),
                snap_vmm::virtio::MAX_DISKS
            ),
        ));
    }
    let mut out = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        check_name(&format!("disks[{i}].name"), &d.name)?;
        if disks[..i].iter().any(|o| o.name == d.name) {
            return Err(Error::invalid(
                &format!("disks[{i}].name"),
                format!("two disks are named {:?}", d.name),
            ));
        }
        let image = (!d.image_path.is_empty()).then(|| std::path::PathBuf::from(&d.image_path));
        match &image {
            None if d.size_bytes == 0 || d.size_bytes % 512 != 0 => {
                return Err(Error::invalid(
                    &format!("disks[{i}].size_bytes"),
                    "must be a non-zero multiple of 512 (or give image_path)",
                ));
            }
            None if d.size_bytes > snap_disk::MAX_DISK_BYTES => {
                return Err(Error::invalid(
                    &format!("disks[{i}].size_bytes"),
                    format!("at most {} bytes", snap_disk::MAX_DISK_BYTES),
                ));
            }
            Some(p) if !p.is_absolute() => {
                return Err(Error::invalid(
                    &format!("disks[{i}].image_path"),
                    "must be an absolute path on the daemon's host",
                ));
            }
            _ => {}
        }
        out.push(NewDisk {
            name: d.name.clone(),
            size_bytes: d.size_bytes,
            image,
        });
    }
    Ok(out)
}

pub(super) async fn create(s: &Service, r: pb::CreateVmRequest) -> Answer<pb::Vm> {
    check_name("name", &r.name)?;
    let labels = check_labels("labels", &r.labels)?;
    if r.memory_bytes == 0 {
        return Err(Error::invalid(
            "memory_bytes",
            "must be set (at least 4 MiB, a multiple of 4096)",
        )
        .into());
    }
    if r.vcpus == 0 {
        return Err(Error::invalid("vcpus", "must be 1 to 32").into());
    }
    let spec = NewVmSpec {
        name: r.name.clone(),
        memory_bytes: r.memory_bytes,
        vcpus: r.vcpus,
        guest: convert::guest_spec(&r.guest.unwrap_or_default()),
        labels,
        start: r.start,
        disks: check_disks(&r.disks)?,
    };
    let fp = fingerprint!(r);
    s.once("CreateVm", &r.request_id, &fp, move |d, ctx| {
        d.create_vm(spec, &ctx)
    })
    .await
}

pub(super) async fn get(s: &Service, r: pb::GetVmRequest) -> Answer<pb::Vm> {
    let id: VmId = parse_id("vm_id", &r.vm_id)?;
    s.read(move |d| d.get_vm(id)).await
}

pub(super) async fn list(s: &Service, r: pb::ListVmsRequest) -> Answer<pb::ListVmsResponse> {
    s.read(move |d| {
        let vms: Vec<pb::Vm> = d
            .list_vms()?
            .into_iter()
            .filter(|v| has_labels(&v.labels, &r.labels))
            .collect();
        let filters = canonical_labels(&r.labels);
        let (vms, next_page_token) = page(vms, r.page_size, &r.page_token, "ListVms", &filters)?;
        Ok(pb::ListVmsResponse {
            vms,
            next_page_token,
        })
    })
    .await
}

/// Start, pause, resume or stop.
pub(super) async fn action(
    s: &Service,
    method: &'static str,
    r: pb::VmActionRequest,
) -> Answer<pb::Vm> {
    let id: VmId = parse_id("vm_id", &r.vm_id)?;
    let action = match method {
        "StartVm" => VmAction::Start,
        "PauseVm" => VmAction::Pause,
        "ResumeVm" => VmAction::Resume,
        _ => VmAction::Stop,
    };
    let fp = fingerprint!(r);
    s.once(method, &r.request_id, &fp, move |d, ctx| {
        d.vm_action(action, id, r.wait, &ctx)
    })
    .await
}

pub(super) async fn delete(s: &Service, r: pb::DeleteVmRequest) -> Answer<pb::Operation> {
    let id: VmId = parse_id("vm_id", &r.vm_id)?;
    let fp = fingerprint!(r);
    s.once("DeleteVm", &r.request_id, &fp, move |d, ctx| {
        d.delete_vm(id, r.with_snapshots, r.wait, &ctx)
    })
    .await
    .map(|op| s.fresh(op))
}

pub(super) async fn console(
    s: &Service,
    r: pb::GetVmConsoleRequest,
) -> Answer<pb::GetVmConsoleResponse> {
    let id: VmId = parse_id("vm_id", &r.vm_id)?;
    s.read(move |d| {
        let (data, next_offset) = d.console(id, r.offset, CONSOLE_MAX)?;
        Ok(pb::GetVmConsoleResponse { data, next_offset })
    })
    .await
}
