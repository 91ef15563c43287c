//! RestoreSnapshot: a revert of a VM to one of its snapshots, or a restore into new VMs (shared
//! with [`crate::clone`]); and the instance a stopped VM starts from.
//!
//! Admitted with the snapshot and its layers read (and, for a revert, the VM written): no delete
//! of the snapshot or rewrite of its layers runs meanwhile. Everything that can be checked is
//! checked before anything changes; new disk tops are claimed files until the catalog names
//! them; the catalog is written before the VM is touched, so a failure to record the change
//! (a full disk, say) leaves the VM as it was.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use snap_api::v1 as pb;
use snap_mem::layer::LayerChain;
use snap_vmm::{MemoryRestore, RunState, Vm, VmState, snapshot};

use crate::api::convert;
use crate::catalog::{CatalogError, SnapshotRecord, Tx, VmRecord, VmStatus};
use crate::daemon::Daemon;
use crate::disks::DiskSet;
use crate::error::{Error, Result};
use crate::ids::{SnapshotId, VmId};
use crate::now_ms;
use crate::ops::requests::RequestCtx;
use crate::ops::scheduler::{Footprint, restore_footprint, vm_footprint};
use crate::ops::{OpSpec, Progress};
use crate::store::Store;
use crate::vms::Instance;

/// Where a restore goes.
#[derive(Debug, Clone)]
pub enum RestoreTarget {
    /// Revert this VM to the snapshot.
    Revert(VmId),
    /// A new VM with this name and labels.
    NewVm(String, BTreeMap<String, String>),
}

/// A restore to make.
#[derive(Debug, Clone)]
pub struct RestoreSpec {
    /// The snapshot.
    pub snapshot: SnapshotId,
    /// Where it goes.
    pub target: RestoreTarget,
    /// How a new VM's memory is installed (a revert is always eager).
    pub mode: MemoryRestore,
    /// Leave the VM paused.
    pub leave_paused: bool,
    /// Wait for conflicting operations instead of failing ABORTED.
    pub wait: bool,
}

/// A snapshot whose files cannot be used: FAILED_PRECONDITION saying which and why.
fn unusable(s: &SnapshotRecord, e: &dyn std::fmt::Display) -> Error {
    Error::precondition(format!("snapshot {} cannot be restored: {e}", s.id))
}

/// The plan of an operation that reads snapshot `s` whole (a restore or clone): its footprint,
/// and its record.
pub(crate) fn reads_snapshot(
    s: SnapshotId,
) -> impl FnMut(&Daemon) -> Result<(Footprint, SnapshotRecord)> + Send + 'static {
    move |d: &Daemon| {
        let snap = d.snapshot_record(s)?;
        Ok((restore_footprint(&snap), snap))
    }
}

/// Lets a restored VM's guest run, unless it had stopped on its own when the snapshot was taken
/// (a restore of it is stopped the same way).
pub(crate) fn run_on(vm: &Vm) -> Result<()> {
    if vm.run_state() == RunState::Paused {
        vm.resume()?;
    }
    Ok(())
}

impl Daemon {
    /// Starts a restore: a revert of a VM, or a restore into a new VM.
    ///
    /// # Errors
    /// NOT_FOUND, ABORTED, ALREADY_EXISTS for a taken name, FAILED_PRECONDITION for a VM of
    /// another shape.
    pub fn restore_snapshot(
        self: &Arc<Self>,
        spec: RestoreSpec,
        ctx: &RequestCtx,
    ) -> Result<pb::Operation> {
        let s = spec.snapshot;
        match spec.target {
            RestoreTarget::Revert(vm) => {
                let op = OpSpec {
                    kind: pb::OperationKind::RestoreSnapshot,
                    vm: Some(vm),
                    snapshot: Some(s),
                    wait: spec.wait,
                    frees_space: false,
                };
                let plan = move |d: &Daemon| {
                    let snap = d.snapshot_record(s)?;
                    let rec = d.vm_record(vm)?;
                    if (rec.memory_bytes, rec.vcpus) != (snap.memory_bytes, snap.vcpus) {
                        return Err(Error::precondition(format!(
                            "snapshot {s} is of a VM with {} bytes and {} vCPUs; VM {vm} has {} bytes and {} vCPUs: restore it into a new VM instead",
                            snap.memory_bytes, snap.vcpus, rec.memory_bytes, rec.vcpus
                        )));
                    }
                    Ok((vm_footprint(vm, Some(&snap)), snap))
                };
                let leave_paused = spec.leave_paused;
                self.launch(op, ctx, plan, move |d, op, snap| {
                    d.revert(op, vm, &snap, leave_paused)
                })
            }
            RestoreTarget::NewVm(name, labels) => {
                self.check_new_names(std::slice::from_ref(&name))?;
                let op = OpSpec {
                    kind: pb::OperationKind::RestoreSnapshot,
                    vm: None,
                    snapshot: Some(s),
                    wait: spec.wait,
                    frees_space: false,
                };
                let (mode, leave_paused) = (spec.mode, spec.leave_paused);
                self.launch(op, ctx, reads_snapshot(s), move |d, op, snap| {
                    let vms =
                        d.restore_into_new_vms(op, &snap, vec![name], &labels, mode, leave_paused)?;
                    Ok(pb::OperationResult {
                        vms,
                        ..Default::default()
                    })
                })
            }
        }
    }

    /// ALREADY_EXISTS if a VM has one of `names`.
    pub(crate) fn check_new_names(&self, names: &[String]) -> Result<()> {
        for n in names {
            if self.catalog.read(|tx| tx.vm_named(n))?.is_some() {
                return Err(Error::exists(format!("a VM named {n:?} exists")));
            }
        }
        Ok(())
    }

    /// Opens a snapshot's state and memory chain, checking both (and, with `every_frame`, every
    /// frame of every layer: what a revert needs before it touches the VM).
    pub(crate) fn open_snapshot(
        &self,
        s: &SnapshotRecord,
        every_frame: bool,
    ) -> Result<(VmState, LayerChain)> {
        let state = VmState::read_file(&self.store.path(&Store::state_file(s.id)))
            .map_err(|e| unusable(s, &e))?;
        let chain =
            LayerChain::open(&self.layer_paths(&s.mem_chain)?).map_err(|e| unusable(s, &e))?;
        if every_frame {
            for layer in chain.layers() {
                layer.verify().map_err(|e| unusable(s, &e))?;
            }
        }
        Ok((state, chain))
    }

    /// Fresh disk tops over each of `s`'s sealed disk chains (claimed files).
    pub(crate) fn disks_over(&self, s: &SnapshotRecord) -> Result<DiskSet> {
        let mut set = DiskSet::new(&self.store);
        for r in &s.disks {
            let paths = self.layer_paths(&r.chain)?;
            let sealed = paths.into_iter().zip(r.chain.iter().copied()).collect();
            set.add(&self.store, &r.name, r.size_bytes, sealed)?;
        }
        Ok(set)
    }

    /// A new, paused VM instance restored from `s` with memory installed as `mode`, on fresh
    /// disk tops (not in the catalog yet: dropping the set removes them).
    pub(crate) fn instance_from(
        &self,
        s: &SnapshotRecord,
        mode: MemoryRestore,
    ) -> Result<(Vm, DiskSet)> {
        // Frames are checked as they are read: an eager restore that meets a damaged one fails
        // before the new VM exists, a lazy one stops the VM.
        let (state, chain) = self.open_snapshot(s, false)?;
        let disks = self.disks_over(s)?;
        let mut prepared = self.pool.take(state.config)?;
        prepared.set_disks(disks.backends(&self.metrics))?;
        let (wset, owner) = (
            self.store.path(&Store::working_set_file(s.id)),
            self.store.path(&Store::state_file(s.id)),
        );
        let working_set = snapshot::WorkingSetFile {
            path: &wset,
            owner: &owner,
        };
        let vm = snapshot::restore_from(&state, chain, working_set, prepared, mode).map_err(
            |e| match e {
                snap_vmm::VmError::Layer(e) => unusable(s, &e),
                e => e.into(),
            },
        )?;
        Ok((vm, disks))
    }

    /// Restores `s` into one new VM per name, all or none: every instance is built first, then
    /// one catalog transaction records them all, then they run.
    pub(crate) fn restore_into_new_vms(
        &self,
        op: &Progress<'_>,
        s: &SnapshotRecord,
        names: Vec<String>,
        labels: &BTreeMap<String, String>,
        mode: MemoryRestore,
        leave_paused: bool,
    ) -> Result<Vec<pb::Vm>> {
        let count = names.len() as u64;
        op.memory_mode(mode);
        let mut made = Vec::new();
        for (i, name) in names.into_iter().enumerate() {
            op.check_cancel()?;
            op.phase_as("restoring", &format!("restoring {name}"), i as u64, count);
            let (vm, disks) = self.instance_from(s, mode)?;
            let rec = VmRecord {
                id: VmId::random(),
                name,
                memory_bytes: s.memory_bytes,
                vcpus: s.vcpus,
                guest: s.guest,
                labels: labels.clone(),
                state: if leave_paused {
                    VmStatus::Paused
                } else {
                    VmStatus::Running
                },
                current_snapshot: Some(s.id),
                mem_chain: s.mem_chain.clone(),
                disks: disks.records.clone(),
                created_ms: now_ms(),
                failure: None,
            };
            made.push((rec, vm, disks));
        }
        let result = pb::OperationResult::default();
        Ok(self
            .publish_new_vms(op, made, leave_paused, result, |_| Ok(()), || {})?
            .vms)
    }

    /// Publishes the new VMs `made` (built, not recorded yet), all or none: one catalog
    /// transaction records them, with what `extra` writes in it, and the operation's success
    /// (`result` with the VMs); `committed` runs once it has committed; then the VMs run (unless
    /// `leave_paused`). Returns `result` with the VMs as they are then.
    pub(crate) fn publish_new_vms(
        &self,
        op: &Progress<'_>,
        made: Vec<(VmRecord, Vm, DiskSet)>,
        leave_paused: bool,
        mut result: pb::OperationResult,
        extra: impl Fn(&Tx<'_>) -> std::result::Result<(), CatalogError>,
        committed: impl FnOnce(),
    ) -> Result<pb::OperationResult> {
        let count = made.len() as u64;
        op.no_return()?;
        self.failpoints.pass("restore.before-publish")?;
        let answer = pb::OperationResult {
            vms: made
                .iter()
                .map(|(rec, _, _)| convert::vm(rec, rec.state, None))
                .collect(),
            ..result.clone()
        };
        self.catalog.write(|tx| {
            extra(tx)?;
            for (rec, _, disks) in &made {
                disks.insert_layers(tx)?;
                tx.insert_vm(rec)?;
            }
            op.succeeded_in(tx, &answer)
        })?;
        committed();
        for (rec, vm, disks) in made {
            self.add_instance(rec.id, vm, disks, !leave_paused, false);
            result.vms.push(self.vm_to_pb(&rec));
        }
        op.phase("done", count, count);
        Ok(result)
    }

    /// Reverts VM `vm_id` to `snap`: checks every frame first, records the VM's new chains, then
    /// loads the snapshot into the VM (in place, or into a new instance if it has none).
    fn revert(
        &self,
        op: &Progress<'_>,
        vm_id: VmId,
        snap: &SnapshotRecord,
        leave_paused: bool,
    ) -> Result<pb::OperationResult> {
        let entry = self.vms.get(vm_id)?;
        op.phase("checking the snapshot", 0, 0);
        let running = entry
            .instance()
            .filter(|i| !matches!(i.vm.run_state(), RunState::Failed(_)));
        let (loaded, disks) = match &running {
            Some(_) => {
                let (state, chain) = self.open_snapshot(snap, true)?;
                (
                    Loaded::InPlace(Box::new((state, chain))),
                    self.disks_over(snap)?,
                )
            }
            None => {
                let (vm, disks) = self.instance_from(snap, MemoryRestore::Eager)?;
                (Loaded::New(vm), disks)
            }
        };
        op.no_return()?;
        // Record first: a VM reverted whose catalog still names the old chains could not
        // snapshot again; a catalog that names the new ones restarts the VM from them.
        let freed = self.catalog.write(|tx| {
            disks.insert_layers(tx)?;
            let Some(mut rec) = tx.vm(vm_id)? else {
                return Err(crate::catalog::CatalogError::Damaged(format!(
                    "VM {vm_id} is gone"
                )));
            };
            rec.current_snapshot = Some(snap.id);
            rec.mem_chain.clone_from(&snap.mem_chain);
            rec.disks.clone_from(&disks.records);
            rec.guest = snap.guest;
            tx.update_vm(&rec)?;
            let state = if leave_paused {
                VmStatus::Paused
            } else {
                VmStatus::Running
            };
            op.succeeded_in(
                tx,
                &pb::OperationResult {
                    vms: vec![convert::vm(&rec, state, None)],
                    ..Default::default()
                },
            )?;
            tx.collect()
        })?;
        op.phase("reverting", 0, snap.memory_bytes);
        let backends = disks.backends(&self.metrics);
        let disks = disks.publish();
        let vm = match (loaded, running) {
            (Loaded::InPlace(loaded), Some(inst)) => {
                let (state, chain) = *loaded;
                let vm = inst.vm;
                let was_running = vm.run_state() == RunState::Running;
                let paused_at = Instant::now();
                vm.pause();
                if let Err(e) = vm.restore_in_place_with_disks(&state, &chain, &backends) {
                    // The catalog names the snapshot: stopped, the VM starts from it again.
                    entry.set(None, false);
                    if was_running {
                        tracing::warn!(vm = %vm_id, error = %e, "a revert failed while loading; the VM is stopped");
                    }
                    return Err(Error::from(e).context(format!(
                        "VM {vm_id} could not load snapshot {} and is stopped (StartVm starts it from the snapshot)",
                        snap.id
                    )));
                }
                op.set_pause(paused_at.elapsed());
                // The console is the output of the run since the VM was last started, restored
                // or reverted.
                vm.serial_output().clear();
                vm
            }
            (Loaded::New(vm), _) => Arc::new(vm),
            (Loaded::InPlace(..), None) => unreachable!("an in-place revert has a running VM"),
        };
        entry.set(
            Some(Instance::new(Arc::clone(&vm), disks, &self.metrics)),
            true,
        );
        if !leave_paused {
            run_on(&vm)?;
        }
        for l in freed {
            self.store.remove(&l.file);
        }
        op.phase("done", snap.memory_bytes, snap.memory_bytes);
        let rec = self.vm_record(vm_id)?;
        Ok(pb::OperationResult {
            vms: vec![convert::vm(&rec, entry.status().0, entry.status().1)],
            ..Default::default()
        })
    }
}

/// What a revert loads: the snapshot into the running VM, or a new instance.
enum Loaded {
    InPlace(Box<(VmState, LayerChain)>),
    New(Vm),
}
