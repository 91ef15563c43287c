//! The API's forms of the daemon's records.

use snap_api::v1 as pb;
use snap_vmm::MemoryRestore;

use crate::catalog::{GuestSpec, SnapshotRecord, VmRecord, VmStatus};

/// A VM's record with its state now.
pub fn vm(rec: &VmRecord, state: VmStatus, failure: Option<String>) -> pb::Vm {
    pb::Vm {
        id: rec.id.to_string(),
        name: rec.name.clone(),
        state: vm_state(state) as i32,
        memory_bytes: rec.memory_bytes,
        vcpus: rec.vcpus,
        disks: rec
            .disks
            .iter()
            .map(|d| pb::Disk {
                name: d.name.clone(),
                size_bytes: d.size_bytes,
                layer_ids: d.chain.iter().map(ToString::to_string).collect(),
            })
            .collect(),
        guest: Some(guest(&rec.guest)),
        labels: rec.labels.clone().into_iter().collect(),
        current_snapshot_id: rec
            .current_snapshot
            .map(|s| s.to_string())
            .unwrap_or_default(),
        failure: failure.unwrap_or_default(),
        created_unix_ms: rec.created_ms,
    }
}

/// The API's VM state.
pub fn vm_state(s: VmStatus) -> pb::VmState {
    match s {
        VmStatus::Created => pb::VmState::Created,
        VmStatus::Running => pb::VmState::Running,
        VmStatus::Paused => pb::VmState::Paused,
        VmStatus::Finished => pb::VmState::Finished,
        VmStatus::Stopped => pb::VmState::Stopped,
        VmStatus::Failed => pb::VmState::Failed,
    }
}

/// The API's form of a guest program.
pub fn guest(g: &GuestSpec) -> pb::GuestProgram {
    pb::GuestProgram {
        seed: g.seed,
        working_set_pages: g.working_set_pages,
        mutations_per_tick: g.mutations_per_tick,
        ticks: g.ticks,
        disk_sectors_per_tick: g.disk_sectors_per_tick,
    }
}

/// A guest program from the API.
pub fn guest_spec(g: &pb::GuestProgram) -> GuestSpec {
    GuestSpec {
        seed: g.seed,
        working_set_pages: g.working_set_pages,
        mutations_per_tick: g.mutations_per_tick,
        ticks: g.ticks,
        disk_sectors_per_tick: g.disk_sectors_per_tick,
    }
}

/// A snapshot's record.
pub fn snapshot(s: &SnapshotRecord) -> pb::Snapshot {
    pb::Snapshot {
        id: s.id.to_string(),
        name: s.name.clone(),
        vm_id: s.vm_id.to_string(),
        parent_id: s.parent_id.map(|p| p.to_string()).unwrap_or_default(),
        labels: s.labels.clone().into_iter().collect(),
        created_unix_ms: s.created_ms,
        memory_bytes: s.memory_bytes,
        vcpus: s.vcpus,
        stored_bytes: s.stored_bytes,
        pause_us: s.pause_us,
    }
}

/// How memory is installed, from the API (unspecified: eager).
pub fn memory_mode(m: pb::MemoryRestoreMode) -> MemoryRestore {
    match m {
        pb::MemoryRestoreMode::Lazy => MemoryRestore::Lazy,
        pb::MemoryRestoreMode::Prefetch => MemoryRestore::Prefetch,
        pb::MemoryRestoreMode::Unspecified | pb::MemoryRestoreMode::Eager => MemoryRestore::Eager,
    }
}
