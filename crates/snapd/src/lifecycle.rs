//! StartVm, PauseVm, ResumeVm, StopVm: short calls that change one VM, each admitted with that
//! VM written (and, for a start from a snapshot, the snapshot read), answered once.
//!
//! A VM whose disk could not be written because the filesystem is full pauses (the request stays
//! pending; see snap-vmm's `Vm::io_stop`) and is resumed by the daemon once space is back, or by
//! a client's ResumeVm.

use std::sync::Arc;

use snap_api::v1 as pb;
use snap_vmm::{MemoryRestore, RunState, VmConfig};

use crate::catalog::SnapshotRecord;
use crate::create_vm::boot;
use crate::daemon::Daemon;
use crate::disks::DiskSet;
use crate::error::{Error, Result};
use crate::ids::VmId;
use crate::ops::requests::RequestCtx;
use crate::ops::scheduler::vm_footprint;
use crate::restore::run_on;
use crate::vms::Instance;

/// Free bytes the data directory needs before a VM paused on a full disk is resumed.
const RESUME_FREE_BYTES: u64 = 1 << 20;

/// A short VM call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmAction {
    /// Let the guest run: start a created VM, resume a paused one, restart a stopped one from
    /// its current snapshot (or from the beginning if it has none).
    Start,
    /// Pause a running VM.
    Pause,
    /// Resume a paused VM.
    Resume,
    /// Stop the guest; the VM's record and snapshots stay.
    Stop,
}

impl Daemon {
    /// Runs `action` on VM `id` and stores the answer for the request.
    ///
    /// # Errors
    /// NOT_FOUND, ABORTED while another operation holds the VM, FAILED_PRECONDITION for a VM in
    /// the wrong state.
    pub fn vm_action(
        &self,
        action: VmAction,
        id: VmId,
        wait: bool,
        ctx: &RequestCtx,
    ) -> Result<pb::Vm> {
        let what = format!("{action:?}Vm of VM {id}");
        let (_admission, from) = self.admit_now(what, wait, |d| {
            let rec = d.vm_record(id)?;
            let stopped = d.vms.get(id)?.instance().is_none_or(|i| {
                matches!(i.vm.run_state(), RunState::Stopped(_) | RunState::Failed(_))
            });
            let from = match rec.current_snapshot {
                Some(s) if action == VmAction::Start && stopped => Some(d.snapshot_record(s)?),
                _ => None,
            };
            Ok((vm_footprint(id, from.as_ref()), from))
        })?;
        let entry = self.vms.get(id)?;
        match action {
            VmAction::Start => self.start(id, from.as_ref())?,
            VmAction::Pause => {
                let vm = entry
                    .vm()
                    .ok_or_else(|| Error::precondition(format!("VM {id} is stopped")))?;
                vm.pause();
            }
            VmAction::Resume => {
                let vm = entry.vm().ok_or_else(|| {
                    Error::precondition(format!("VM {id} is stopped: StartVm starts it again"))
                })?;
                vm.resume()?;
                entry.mark_started();
            }
            VmAction::Stop => entry.set(None, false),
        }
        self.watch_states();
        let answer = self.get_vm(id)?;
        // The action is done: an answer that cannot be stored (a full disk) is not a failure of
        // it, and a retry of these calls repeats nothing harmful.
        if let Err(e) = self.catalog.write(|tx| ctx.answer(tx, &answer)) {
            tracing::warn!(vm = %id, error = %e, "cannot store the answer to a request id");
        }
        Ok(answer)
    }

    /// Lets VM `id`'s guest run; a stopped VM restarts from `from`, its current snapshot (or from
    /// the beginning on its disks as they are).
    fn start(&self, id: VmId, from: Option<&SnapshotRecord>) -> Result<()> {
        let entry = self.vms.get(id)?;
        if let Some(inst) = entry.instance() {
            if !matches!(
                inst.vm.run_state(),
                RunState::Stopped(_) | RunState::Failed(_)
            ) {
                inst.vm.resume()?;
                entry.mark_started();
                return Ok(());
            }
        }
        let rec = self.vm_record(id)?;
        let (vm, disks) = match from {
            Some(snap) => self.instance_from(snap, MemoryRestore::Eager)?,
            None => {
                let mut disks = DiskSet::new(&self.store);
                for d in &rec.disks {
                    let paths = self.layer_paths(&d.chain)?;
                    disks.add_as_recorded(
                        &self.store,
                        &d.name,
                        d.size_bytes,
                        paths,
                        d.chain.clone(),
                    )?;
                }
                let config = VmConfig {
                    memory_bytes: rec.memory_bytes,
                    vcpus: rec.vcpus,
                };
                (
                    boot(config, &rec.guest, &disks.disks, &self.metrics)?,
                    disks,
                )
            }
        };
        // The VM's memory is now its snapshot's (or new): its next snapshot builds on that.
        let mem_chain = from.map(|s| s.mem_chain.clone()).unwrap_or_default();
        let freed = self.catalog.write(|tx| {
            disks.insert_layers(tx)?;
            if let Some(mut rec) = tx.vm(id)? {
                rec.disks.clone_from(&disks.records);
                rec.mem_chain.clone_from(&mem_chain);
                tx.update_vm(&rec)?;
            }
            tx.collect()
        })?;
        for l in freed {
            self.store.remove(&l.file);
        }
        let vm = Arc::new(vm);
        entry.set(
            Some(Instance::new(
                Arc::clone(&vm),
                disks.publish(),
                &self.metrics,
            )),
            true,
        );
        run_on(&vm)
    }

    /// Resumes VMs that a full disk paused, once the data directory has space again (a VM an
    /// operation holds is tried again later).
    pub fn resume_after_disk_full(&self) {
        let full = |e: &snap_vmm::block::IoStop| {
            matches!(
                e.kind,
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            )
        };
        let waiting: Vec<VmId> = self
            .vms
            .all()
            .into_iter()
            .filter(|(_, e)| e.vm().and_then(|vm| vm.io_stop()).is_some_and(|s| full(&s)))
            .map(|(id, _)| id)
            .collect();
        if waiting.is_empty()
            || self
                .store
                .free_bytes()
                .is_none_or(|f| f < RESUME_FREE_BYTES)
        {
            return;
        }
        for id in waiting {
            let admitted = self.admit_now(
                format!("resume of VM {id} after a full disk"),
                false,
                |_| Ok((vm_footprint(id, None), ())),
            );
            let Ok((_admission, ())) = admitted else {
                continue;
            };
            let Some(vm) = self.vms.find(id).and_then(|e| e.vm()) else {
                continue;
            };
            match vm.resume() {
                Ok(()) => tracing::info!(vm = %id, "space is back: the VM runs on"),
                Err(e) => tracing::debug!(vm = %id, error = %e, "the VM's disk is still full"),
            }
        }
        self.watch_states();
    }
}
