//! DeleteSnapshot and DeleteVm: carry out a [`DeletePlan`] made when the delete was admitted.
//!
//! 1. One catalog transaction deletes the rows, moves children to their nearest surviving
//!    ancestor and VMs' current snapshot likewise, and drops the layer rows nothing names.
//! 2. The files of those layers, and the deleted snapshots' state files, go.
//! 3. Each planned merge writes the merged layer to a new (claimed) file, and one transaction
//!    points the child's row at it and drops the parent from every chain; the old files go
//!    after. A crash anywhere leaves the catalog before or after each transaction, and the files
//!    it does not name are removed at the next start.
//!
//! On a full filesystem the space reserve is given back first, so that a delete can always be
//! recorded and free space.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use snap_api::v1 as pb;
use snap_mem::layer::Layer;

use crate::catalog::{LayerKind, LayerRecord, VmStatus};
use crate::daemon::Daemon;
use crate::delete_plan::{DeletePlan, Merge, only_leaf_child, plan_delete, survivor};
use crate::error::{Error, Result};
use crate::ids::{LayerId, SnapshotId, VmId};
use crate::ops::requests::RequestCtx;
use crate::ops::scheduler::delete_footprint;
use crate::ops::{OpSpec, Progress};
use crate::store::Store;

impl Daemon {
    /// Starts the deletion of a snapshot (and its descendants if asked).
    ///
    /// # Errors
    /// NOT_FOUND, ABORTED.
    pub fn delete_snapshot(
        self: &Arc<Self>,
        id: SnapshotId,
        with_descendants: bool,
        wait: bool,
        ctx: &RequestCtx,
    ) -> Result<pb::Operation> {
        let snapshot_vm = self.snapshot_record(id)?.vm_id;
        let op = OpSpec {
            kind: pb::OperationKind::DeleteSnapshot,
            vm: Some(snapshot_vm),
            snapshot: Some(id),
            wait,
            frees_space: true,
        };
        let plan = move |d: &Daemon| {
            d.snapshot_record(id)?;
            let plan = d.plan_delete(&[id], with_descendants, &[])?;
            Ok((footprint(&plan), plan))
        };
        self.launch(op, ctx, plan, Daemon::carry_out)
    }

    /// Starts the deletion of a VM that is not running (and of its snapshots if asked).
    ///
    /// # Errors
    /// NOT_FOUND, ABORTED, FAILED_PRECONDITION for a running VM.
    pub fn delete_vm(
        self: &Arc<Self>,
        id: VmId,
        with_snapshots: bool,
        wait: bool,
        ctx: &RequestCtx,
    ) -> Result<pb::Operation> {
        let op = OpSpec {
            kind: pb::OperationKind::DeleteVm,
            vm: Some(id),
            snapshot: None,
            wait,
            frees_space: true,
        };
        let plan = move |d: &Daemon| {
            d.vm_record(id)?;
            if d.vms.get(id)?.status().0 == VmStatus::Running {
                return Err(Error::precondition(format!(
                    "VM {id} is running: stop it first"
                )));
            }
            let mine: Vec<SnapshotId> = if with_snapshots {
                d.snapshots()?
                    .into_iter()
                    .filter(|s| s.vm_id == id)
                    .map(|s| s.id)
                    .collect()
            } else {
                Vec::new()
            };
            let plan = d.plan_delete(&mine, false, &[id])?;
            Ok((footprint(&plan), plan))
        };
        self.launch(op, ctx, plan, Daemon::carry_out)
    }

    /// The plan of deleting snapshots `roots` (and descendants) and VMs `vms`, from the catalog
    /// as it is now.
    fn plan_delete(
        &self,
        roots: &[SnapshotId],
        with_descendants: bool,
        vms: &[VmId],
    ) -> Result<DeletePlan> {
        let (snapshots, all_vms, layers) = self
            .catalog
            .read(|tx| Ok((tx.snapshots()?, tx.vms()?, tx.layers()?)))?;
        let memory: BTreeSet<LayerId> = layers
            .iter()
            .filter(|l| l.kind == LayerKind::Memory)
            .map(|l| l.id)
            .collect();
        Ok(plan_delete(
            &snapshots,
            &all_vms,
            &memory,
            roots,
            with_descendants,
            vms,
        ))
    }

    /// Carries out `plan` (past its point of no return at once); answers with the snapshots
    /// deleted and the bytes freed on disk.
    fn carry_out(&self, op: &Progress<'_>, plan: DeletePlan) -> Result<pb::OperationResult> {
        op.no_return()?;
        op.phase("deleting", 0, 0);
        self.failpoints.pass("delete.before-commit")?;
        let (deleted, freed_layers) = self.with_reserve(|| {
            self.catalog.write(|tx| {
                let all = tx.snapshots()?;
                let doomed: BTreeSet<SnapshotId> = all
                    .iter()
                    .filter(|s| plan.snapshots.contains(&s.id))
                    .map(|s| s.id)
                    .collect();
                for (child, parent) in crate::delete_plan::reparented(&all, &doomed) {
                    if let Some(mut s) = tx.snapshot(child)? {
                        s.parent_id = parent;
                        tx.update_snapshot(&s)?;
                    }
                }
                let parent_of: HashMap<SnapshotId, Option<SnapshotId>> =
                    all.iter().map(|s| (s.id, s.parent_id)).collect();
                for mut vm in tx.vms()? {
                    if plan.vms.contains(&vm.id) {
                        tx.delete_vm(vm.id)?;
                    } else if vm.current_snapshot.is_some_and(|c| doomed.contains(&c)) {
                        vm.current_snapshot = survivor(&parent_of, &doomed, vm.current_snapshot);
                        tx.update_vm(&vm)?;
                    }
                }
                for id in &doomed {
                    tx.delete_snapshot(*id)?;
                }
                // The delete is done once this commits (merges only free more space).
                op.succeeded_in(
                    tx,
                    &pb::OperationResult {
                        deleted_snapshot_ids: doomed.iter().map(ToString::to_string).collect(),
                        ..Default::default()
                    },
                )?;
                Ok((doomed, tx.collect()?))
            })
        })?;
        let mut freed = 0;
        for l in &freed_layers {
            freed += self.store.remove(&l.file);
        }
        for id in &deleted {
            // The state file first: a prefetch restore still recording the working set removes
            // it once it finds the state file gone (see `snapshot::WorkingSetFile`).
            freed += self.store.remove(&Store::state_file(*id));
            freed += self.store.remove(&Store::working_set_file(*id));
            self.events
                .emit(pb::event::Kind::SnapshotDeleted(id.to_string()));
        }
        // The VMs' instances go once their rows are gone (a failed delete leaves them as they were).
        for vm in &plan.vms {
            self.vms.remove(*vm);
            self.events.emit(pb::event::Kind::Vm(pb::Vm {
                id: vm.to_string(),
                state: pb::VmState::Unspecified as i32,
                ..Default::default()
            }));
        }
        for (i, m) in plan.merges.iter().enumerate() {
            op.phase("merging layers", i as u64, plan.merges.len() as u64);
            match self.merge(*m) {
                Ok(bytes) => freed += bytes,
                // The delete is done; an unmerged layer only keeps some space.
                Err(e) => {
                    tracing::warn!(layer = %m.layer, into = %m.into, error = %e, "a merge after a delete failed; the layers stay as they are")
                }
            }
        }
        self.sweep();
        Ok(pb::OperationResult {
            deleted_snapshot_ids: deleted.iter().map(ToString::to_string).collect(),
            freed_bytes: freed,
            ..Default::default()
        })
    }

    /// Merges memory layer `m.layer` into its only child `m.into` (if that still holds); returns
    /// the bytes freed.
    fn merge(&self, m: Merge) -> Result<u64> {
        let (layer, child) = self
            .catalog
            .read(|tx| Ok((tx.layer(m.layer)?, tx.layer(m.into)?)))?;
        let (Some(layer), Some(child)) = (layer, child) else {
            return Ok(0);
        };
        let out_file = Store::merged_layer_file();
        let claim = self.store.claim(vec![out_file.clone()]);
        let open = |l: &LayerRecord| {
            Layer::open(self.store.path(&l.file)).map_err(|e| Error::io("merging layers", &e))
        };
        snap_mem::layer::merge_into_child(
            &open(&layer)?,
            &open(&child)?,
            &self.store.path(&out_file),
            None,
        )
        .map_err(|e| Error::io("merging layers", &e))?;
        let bytes = self.store.file_len(&out_file);
        let committed = self.catalog.write(|tx| {
            let (snapshots, vms) = (tx.snapshots()?, tx.vms()?);
            let chains: Vec<Vec<LayerId>> = snapshots
                .iter()
                .map(|s| s.mem_chain.clone())
                .chain(vms.iter().map(|v| v.mem_chain.clone()))
                .collect();
            if only_leaf_child(&chains, m.layer) != Some(m.into) {
                return Ok(None);
            }
            for mut s in snapshots {
                if s.mem_chain.contains(&m.layer) {
                    s.mem_chain.retain(|l| *l != m.layer);
                    tx.update_snapshot(&s)?;
                }
            }
            for mut vm in vms {
                if vm.mem_chain.contains(&m.layer) {
                    vm.mem_chain.retain(|l| *l != m.layer);
                    tx.update_vm(&vm)?;
                }
            }
            tx.set_layer_file(m.into, &out_file, bytes)?;
            Ok(Some(tx.collect()?))
        })?;
        let Some(unused) = committed else {
            // The tree is no longer what the plan saw: no merge (the claim removes the file).
            return Ok(0);
        };
        claim.publish();
        let released = self.store.remove(&child.file)
            + unused
                .iter()
                .map(|l| self.store.remove(&l.file))
                .sum::<u64>();
        Ok(released.saturating_sub(bytes))
    }
}

fn footprint(plan: &DeletePlan) -> crate::ops::scheduler::Footprint {
    delete_footprint(
        plan.vms.iter().copied(),
        plan.snapshots.iter().copied(),
        plan.layers(),
    )
}
