//! CreateSnapshot: the atomic snapshot (the README's "atomic snapshot"), step by step.
//!
//! Admitted with the VM written and its base layers read (see [`crate::ops::scheduler`]): no
//! other operation changes the VM, and no delete rewrites the layers its new layers build on,
//! until it ends. Every file it makes is claimed until the catalog names it, and every step that
//! changes the VM is owned by a guard that undoes it: a failure at any point leaves no snapshot
//! listed, no file behind, the dirty pages pending for the next snapshot, the disks writing
//! where they wrote (or, if the VM already wrote into its fresh tops, the sealed layers kept
//! under them), and the VM running as before.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use snap_api::v1 as pb;
use snap_mem::layer::{Layer, LayerInfo};
use snap_vmm::snapshot::{PendingSnapshot, Unsealed};
use snap_vmm::{RunState, Vm};

use crate::api::convert;
use crate::catalog::{CatalogError, LayerKind, LayerRecord, SnapshotRecord, VmRecord};
use crate::daemon::Daemon;
use crate::error::{Error, Result};
use crate::ids::{LayerId, SnapshotId, VmId};
use crate::now_ms;
use crate::ops::requests::RequestCtx;
use crate::ops::scheduler::snapshot_footprint;
use crate::ops::{OpSpec, Progress};
use crate::store::{FileClaim, Store};
use crate::vms::Instance;

/// How a snapshot copies the VM's memory (`snapd --snapshot-copy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyMode {
    /// Write-protect where the kernel has it, else copy.
    #[default]
    Auto,
    /// Write-protect only (a snapshot fails where it is not available).
    WriteProtect,
    /// Copy the pages out during the pause (or write the layer paused, above
    /// `--copy-before-resume-mib`).
    Copy,
}

impl std::str::FromStr for CopyMode {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "write-protect" => Ok(Self::WriteProtect),
            "copy" => Ok(Self::Copy),
            _ => Err(format!("{s:?}: expected auto, write-protect or copy")),
        }
    }
}

/// A snapshot to take.
#[derive(Debug, Clone)]
pub struct SnapshotSpec {
    /// The VM.
    pub vm: VmId,
    /// Its name, unique among the VM's snapshots.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Leave the VM paused afterwards.
    pub leave_paused: bool,
    /// Wait for conflicting operations instead of failing ABORTED.
    pub wait: bool,
}

impl Daemon {
    /// Step 0 of a snapshot, as `--snapshot-copy` says: a live snapshot prepared while the VM
    /// runs, or none (the copy path).
    ///
    /// # Errors
    /// With `write-protect` forced, why it is not available; other errors of preparing it.
    fn prepare_live(
        &self,
        vm: &Vm,
        full: bool,
    ) -> Result<Option<snap_vmm::snapshot::LiveSnapshot>> {
        if self.copy_mode == CopyMode::Copy {
            return Ok(None);
        }
        match vm.prepare_live_snapshot(full) {
            Ok(live) => Ok(Some(live)),
            Err(snap_vmm::VmError::WriteProtect(e)) if self.copy_mode == CopyMode::Auto => {
                tracing::info!(reason = %e, "write-protect is not available: the snapshot copies");
                Ok(None)
            }
            Err(e) => Err(Error::from(e).context("preparing a write-protected snapshot")),
        }
    }

    /// Starts a snapshot of a VM.
    ///
    /// # Errors
    /// NOT_FOUND, ABORTED if another operation holds the VM or its layers, ALREADY_EXISTS for a
    /// taken name, FAILED_PRECONDITION for a stopped VM.
    pub fn create_snapshot(
        self: &Arc<Self>,
        spec: SnapshotSpec,
        ctx: &RequestCtx,
    ) -> Result<pb::Operation> {
        let op = OpSpec {
            kind: pb::OperationKind::CreateSnapshot,
            vm: Some(spec.vm),
            snapshot: None,
            wait: spec.wait,
            frees_space: false,
        };
        let (id, name) = (spec.vm, spec.name.clone());
        let plan = move |d: &Daemon| {
            let rec = d.vm_record(id)?;
            let instance = d.vms.get(id)?.instance().ok_or_else(|| {
                Error::precondition(format!(
                    "VM {id} is stopped: start it (or restore a snapshot into it) first"
                ))
            })?;
            if d.catalog.read(|tx| tx.snapshot_named(id, &name))?.is_some() {
                return Err(Error::exists(format!(
                    "VM {id} already has a snapshot named {name:?}"
                )));
            }
            Ok((snapshot_footprint(&rec), (rec, instance)))
        };
        self.launch(op, ctx, plan, move |d, op, (rec, instance)| {
            d.take_snapshot(op, &rec, &instance, spec)
        })
    }

    fn take_snapshot(
        &self,
        op: &Progress<'_>,
        rec: &VmRecord,
        instance: &Instance,
        spec: SnapshotSpec,
    ) -> Result<pb::OperationResult> {
        let vm = &instance.vm;
        let id = SnapshotId::random();
        let files = SnapshotFiles::claim(self, id, instance.disks.len());
        let parent = self.base_layer(rec)?;
        op.check_cancel()?;

        // 0. With write-protect, protect the pages the layer will likely hold while the VM runs.
        op.phase("protecting memory", 0, 0);
        let live = self.prepare_live(vm, parent.is_none())?;
        let protected_ahead = live.as_ref().map_or(0, |l| l.protected_ahead);
        // 1. Pause the vCPUs.
        op.phase("pausing", 0, 0);
        let paused = Paused::new(vm, !spec.leave_paused);
        // 2-3. Save the vCPU and device state, harvest the dirty pages, seal the disks (and with
        // write-protect, protect the layer's pages written since step 0).
        let tops: Vec<_> = files.tops.iter().map(|f| self.store.path(f)).collect();
        let pending = match live {
            Some(live) => vm.begin_snapshot_live(live, parent.as_ref(), &tops)?,
            None => vm.begin_snapshot(parent.as_ref(), &tops)?,
        };
        let mut copy = pb::SnapshotCopy {
            method: if pending.is_live() {
                "write-protect"
            } else {
                "copy"
            }
            .into(),
            pages_protected_ahead: protected_ahead,
            ..Default::default()
        };
        if let Some(s) = pending.live_stats() {
            copy.pages_protected_in_pause = s.protected_in_pause;
        }
        op.set_snapshot_copy(copy);
        let mut taking = Taking {
            op,
            rec,
            id,
            files,
            paused,
            pending,
        };
        match self.write_snapshot(&mut taking, spec) {
            Ok((snap, layer)) => {
                // The snapshot is published: its pages are clean, the seals stand.
                taking.files.claim.publish();
                // (Only sleeps, for tests of a crash here: the snapshot is published already.)
                let _ = self.failpoints.pass("snapshot.after-publish");
                taking.pending.commit(&layer);
                taking.paused.finish();
                self.events
                    .emit(pb::event::Kind::SnapshotCreated(convert::snapshot(&snap)));
                Ok(snapshot_result(&snap))
            }
            Err(e) => {
                // Undo the seals (or keep sealed layers the VM already wrote on top of), leave
                // the pages pending; the claim removes the files and `paused` resumes the VM.
                self.keep_sealed(rec.id, taking.pending.abort(), taking.files.claim);
                Err(e)
            }
        }
    }

    /// Steps 4 to 6: copy the pages out and resume, write and sync the layer and the state,
    /// publish. Returns the published snapshot and its memory layer.
    fn write_snapshot(
        &self,
        t: &mut Taking<'_, '_>,
        spec: SnapshotSpec,
    ) -> Result<(SnapshotRecord, LayerInfo)> {
        self.failpoints.pass("snapshot.seal-disk")?;
        let bytes = t.pending.pages() * 4096;
        if t.pending.is_live() {
            // 4. Write-protected: the VM runs on at once; a page it writes before the writer
            // takes it is kept as it was first.
            t.paused.resume()?;
        } else if t.paused.may_resume() && bytes <= self.copy_before_resume {
            // 4. With few enough pages, copy them out and let the VM run on while the layer is
            // written: the pause then costs a memory copy, not a write and an fsync.
            t.pending.copy_pages()?;
            t.paused.resume()?;
        } else if t.paused.may_resume() {
            t.op.snapshot_copy_method("paused");
        }
        t.op.set_pause(t.paused.pause());
        // 5. Write the memory layer (full, or the pages dirtied since the parent) and the state.
        t.op.phase("writing memory", 0, bytes);
        self.failpoints.pass("snapshot.write-memory")?;
        let op = t.op;
        let stopped = std::sync::Mutex::new(None);
        let progress = |done: u64| {
            op.advance(done.min(bytes), bytes);
            // A cancelled snapshot stops copying (the write fails and is undone).
            let why = if op.is_cancelled() {
                Err(Error::cancelled())
            } else {
                self.failpoints.pass("snapshot.copy-memory")
            };
            match why {
                Ok(()) => true,
                Err(e) => {
                    *stopped.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    false
                }
            }
        };
        let layer = t
            .pending
            .write_memory_with(
                &self.store.path(&t.files.memory),
                &self.layer_options,
                &progress,
            )
            .map_err(
                |e| match stopped.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    Some(why) => why,
                    None => Error::from(e).context("writing the memory layer"),
                },
            )?;
        if let Some(s) = t.pending.live_stats() {
            t.op.live_copy_done(s.saved_ahead, s.held);
        }
        t.pending
            .write_state(&self.store.path(&t.files.state))
            .map_err(|e| Error::from(e).context("writing the VM state"))?;
        t.paused.resume()?;
        t.op.set_pause(t.paused.pause());
        t.op.phase("publishing", bytes, bytes);
        self.failpoints.pass("snapshot.write-state")?;
        t.op.no_return()?;
        self.failpoints.pass("snapshot.before-publish")?;
        // 6. Publish: the snapshot, its layers and the VM's new chains, in one transaction.
        let tops: Vec<(usize, LayerId, LayerRecord)> = t
            .pending
            .sealed()
            .iter()
            .zip(&t.files.tops)
            .map(|(s, file)| {
                let top = LayerRecord {
                    id: LayerId(s.top),
                    kind: LayerKind::Disk,
                    file: file.clone(),
                    bytes: self.store.file_len(file),
                };
                (s.index, LayerId(s.sealed), top)
            })
            .collect();
        let mem = LayerRecord {
            id: LayerId(layer.id),
            kind: LayerKind::Memory,
            file: t.files.memory.clone(),
            bytes: self.store.file_len(&t.files.memory),
        };
        let state_bytes = self.store.file_len(&t.files.state);
        let pause_us = t.paused.pause().as_micros() as u64;
        let (vm_id, id) = (t.rec.id, t.id);
        let snap = self.catalog.write(|tx| {
            let mut vm = tx
                .vm(vm_id)?
                .ok_or_else(|| CatalogError::Damaged(format!("VM {vm_id} is gone")))?;
            // The disks as sealed: the VM's chains before the fresh tops go on.
            let disks = vm.disks.clone();
            let mut sealed_bytes = 0;
            for (index, sealed_id, top) in &tops {
                if let Some(l) = tx.layer(*sealed_id)? {
                    let bytes = self.store.file_len(&l.file);
                    tx.set_layer_bytes(l.id, bytes)?;
                    sealed_bytes += bytes;
                }
                tx.insert_layer(top)?;
                if let Some(d) = vm.disks.get_mut(*index) {
                    d.chain.push(top.id);
                }
            }
            tx.insert_layer(&mem)?;
            let mut mem_chain = vm.mem_chain.clone();
            mem_chain.push(mem.id);
            let snap = SnapshotRecord {
                id,
                name: spec.name,
                vm_id,
                parent_id: vm.current_snapshot,
                labels: spec.labels,
                created_ms: now_ms(),
                memory_bytes: vm.memory_bytes,
                vcpus: vm.vcpus,
                guest: vm.guest,
                stored_bytes: mem.bytes + state_bytes + sealed_bytes,
                pause_us,
                mem_chain: mem_chain.clone(),
                disks,
            };
            tx.insert_snapshot(&snap)?;
            vm.current_snapshot = Some(id);
            vm.mem_chain = mem_chain;
            tx.update_vm(&vm)?;
            t.op.succeeded_in(tx, &snapshot_result(&snap))?;
            if self.failpoints.pass("snapshot.publish").is_err() {
                return Err(CatalogError::Injected("snapshot.publish"));
            }
            Ok(snap)
        })?;
        self.snapshot_metrics(&layer, mem.bytes, tops.iter().map(|(_, id, _)| *id));
        Ok((snap, layer))
    }

    /// Tells the metrics what a snapshot wrote: its memory layer (`stored` bytes on disk) and
    /// the disk layers it sealed.
    fn snapshot_metrics(
        &self,
        memory: &LayerInfo,
        stored: u64,
        sealed: impl Iterator<Item = LayerId>,
    ) {
        use crate::metrics::LayerKind as K;
        let m = &self.metrics;
        m.layer_written(K::Memory, memory.pages_stored * 4096, stored);
        if memory.parent.is_some() {
            m.diff_dirty_pages.observe(memory.pages_present as f64);
        }
        for id in sealed {
            let Ok(Some(l)) = self.catalog.read(|tx| tx.layer(id)) else {
                continue;
            };
            if let Ok(info) = snap_disk::layer_info(&self.store.path(&l.file)) {
                let content = info.blocks * u64::from(info.geometry.block_size);
                m.layer_written(K::Disk, content, self.store.file_len(&l.file));
            }
        }
    }

    /// The layer the VM's memory is based on (the parent of its next layer), if any.
    fn base_layer(&self, rec: &VmRecord) -> Result<Option<LayerInfo>> {
        let Some(&base) = rec.mem_chain.last() else {
            return Ok(None);
        };
        let path = self.layer_paths(&[base])?.remove(0);
        let layer = Layer::open(&path).map_err(|e| {
            Error::precondition(format!("the VM's memory base layer cannot be read: {e}"))
        })?;
        Ok(Some(*layer.info()))
    }

    /// After a failed snapshot: the disks whose seal stood (the VM had written into their fresh
    /// tops) keep the fresh top in the VM's chain, recorded in the catalog; nothing written by
    /// the guest is lost. The claim removes every other file.
    fn keep_sealed(&self, vm: VmId, outcomes: Vec<Unsealed>, mut claim: FileClaim) {
        let kept: Vec<_> = outcomes
            .into_iter()
            .filter_map(|u| match u {
                Unsealed::Kept(s) => Some(s),
                Unsealed::Undone { .. } => None,
            })
            .collect();
        if kept.is_empty() {
            return;
        }
        let root = self.store.root();
        let tops: Vec<(usize, LayerRecord)> = kept
            .iter()
            .filter_map(|s| {
                let file = s.top_path.strip_prefix(root).ok()?.to_str()?.to_string();
                Some((
                    s.index,
                    LayerRecord {
                        id: LayerId(s.top),
                        kind: LayerKind::Disk,
                        bytes: self.store.file_len(&file),
                        file,
                    },
                ))
            })
            .collect();
        let recorded = self.catalog.write(|tx| {
            let Some(mut rec) = tx.vm(vm)? else {
                return Ok(());
            };
            for (index, top) in &tops {
                tx.insert_layer(top)?;
                if let Some(d) = rec.disks.get_mut(*index) {
                    d.chain.push(top.id);
                }
            }
            tx.update_vm(&rec)
        });
        match recorded {
            Ok(()) => {
                for (_, top) in &tops {
                    claim.keep(&top.file);
                }
            }
            Err(e) => {
                // The VM keeps writing into the tops; it cannot run past a restart without them
                // recorded, but its snapshots are untouched.
                tracing::error!(vm = %vm, error = %e, "cannot record the disks' fresh tops");
                for (_, top) in &tops {
                    claim.keep(&top.file);
                }
            }
        }
    }
}

/// What a snapshot operation answers.
fn snapshot_result(snap: &SnapshotRecord) -> pb::OperationResult {
    pb::OperationResult {
        snapshot: Some(convert::snapshot(snap)),
        ..Default::default()
    }
}

/// A snapshot being taken: what it holds until it is published or abandoned.
struct Taking<'a, 'vm> {
    op: &'a Progress<'a>,
    rec: &'a VmRecord,
    id: SnapshotId,
    files: SnapshotFiles,
    paused: Paused<'vm>,
    pending: PendingSnapshot<'vm>,
}

/// The files a snapshot makes, claimed until it is published.
struct SnapshotFiles {
    memory: String,
    state: String,
    tops: Vec<String>,
    claim: FileClaim,
}

impl SnapshotFiles {
    fn claim(d: &Daemon, id: SnapshotId, disks: usize) -> Self {
        let memory = Store::memory_layer_file(id);
        let state = Store::state_file(id);
        let tops: Vec<String> = (0..disks).map(|_| Store::disk_layer_file()).collect();
        let mut all = vec![memory.clone(), state.clone()];
        all.extend(tops.iter().cloned());
        Self {
            memory,
            state,
            tops,
            claim: d.store.claim(all),
        }
    }
}

/// A VM paused by a snapshot: resumed once its pages are safe (if it ran and is to run on),
/// and resumed on drop if the snapshot failed before that.
struct Paused<'a> {
    vm: &'a Vm,
    at: Instant,
    was_running: bool,
    run_on: bool,
    resumed: Option<Duration>,
}

impl<'a> Paused<'a> {
    fn new(vm: &'a Vm, run_on: bool) -> Self {
        let was_running = vm.run_state() == RunState::Running;
        let at = Instant::now();
        vm.pause();
        Self {
            vm,
            at,
            was_running,
            run_on,
            resumed: None,
        }
    }

    /// Whether the VM will run on after the snapshot.
    fn may_resume(&self) -> bool {
        self.was_running && self.run_on
    }

    /// Lets the VM run on now, if it is to (once).
    fn resume(&mut self) -> Result<()> {
        if self.may_resume() && self.resumed.is_none() {
            self.vm.resume()?;
            self.resumed = Some(self.at.elapsed());
        }
        Ok(())
    }

    /// How long the VM was (or has been so far) paused by the snapshot.
    fn pause(&self) -> Duration {
        self.resumed.unwrap_or_else(|| self.at.elapsed())
    }

    /// The snapshot is taken: a VM left paused stays paused.
    fn finish(mut self) {
        self.was_running = false;
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        // A failed snapshot leaves a VM that ran running, left paused or not.
        if self.was_running && self.resumed.is_none() && self.vm.run_state() == RunState::Paused {
            if let Err(e) = self.vm.resume() {
                tracing::error!(error = %e, "cannot resume the VM after a failed snapshot");
            }
        }
    }
}
