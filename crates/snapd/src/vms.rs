//! The VM table: for each VM the catalog knows, its running instance if it has one (the KVM VM
//! and the disks its devices use) and the state last reported to watchers. Who may change an
//! entry is decided by the scheduler (an operation that writes the VM), not here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use snap_disk::Disk;
use snap_vmm::{RunState, Vm, VmExit};

use snap_mem::lazy::LazyStats;

use crate::catalog::VmStatus;
use crate::error::{Error, Result};
use crate::ids::VmId;
use crate::metrics::Metrics;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A VM's running instance: the KVM VM and its disks (the objects its devices use).
#[derive(Clone)]
pub struct Instance {
    /// The VM.
    pub vm: Arc<Vm>,
    /// Its disks, in device order.
    pub disks: Vec<Arc<Disk>>,
    /// What its lazy restore did, told to the metrics (if it came from one).
    tally: Option<Arc<LazyTally>>,
}

impl Instance {
    /// The instance of `vm` on `disks`; a lazily restored VM's faults count in `metrics`.
    pub fn new(vm: Arc<Vm>, disks: Vec<Arc<Disk>>, metrics: &Arc<Metrics>) -> Self {
        let tally = vm.lazy_stats().map(|_| {
            Arc::new(LazyTally {
                vm: Arc::clone(&vm),
                metrics: Arc::clone(metrics),
                told: Mutex::new(LazyStats::default()),
            })
        });
        Self { vm, disks, tally }
    }

    /// Tells the metrics what its lazy restore did since they were last told.
    pub fn tell_metrics(&self) {
        if let Some(t) = &self.tally {
            t.tell();
        }
    }
}

/// The counters of a lazy restore told to the metrics so far; the rest is told when the last
/// copy of the instance goes.
struct LazyTally {
    vm: Arc<Vm>,
    metrics: Arc<Metrics>,
    told: Mutex<LazyStats>,
}

impl LazyTally {
    fn tell(&self) {
        let Some(now) = self.vm.lazy_stats() else {
            return;
        };
        let mut told = lock(&self.told);
        self.metrics.lazy_restore_done(&LazyStats {
            faults: now.faults.saturating_sub(told.faults),
            filled: now.filled.saturating_sub(told.filled),
            zero_units: now.zero_units.saturating_sub(told.zero_units),
            prefetched: now.prefetched.saturating_sub(told.prefetched),
        });
        *told = now;
    }
}

impl Drop for LazyTally {
    fn drop(&mut self) {
        self.tell();
    }
}

/// One VM's entry.
pub struct VmEntry {
    instance: Mutex<Option<Instance>>,
    /// Whether the instance's guest has been let run (a created VM is paused but not "paused").
    started: AtomicBool,
    /// The state last reported to the catalog and watchers.
    reported: Mutex<(VmStatus, Option<String>)>,
}

impl VmEntry {
    fn new() -> Self {
        Self {
            instance: Mutex::new(None),
            started: AtomicBool::new(false),
            reported: Mutex::new((VmStatus::Stopped, None)),
        }
    }

    /// The running instance, if any.
    pub fn instance(&self) -> Option<Instance> {
        lock(&self.instance).clone()
    }

    /// The running VM, if any.
    pub fn vm(&self) -> Option<Arc<Vm>> {
        lock(&self.instance).as_ref().map(|i| Arc::clone(&i.vm))
    }

    /// Replaces the instance (`None`: the VM is stopped and its instance torn down once the last
    /// user lets go of it).
    pub fn set(&self, instance: Option<Instance>, started: bool) {
        *lock(&self.instance) = instance;
        self.started.store(started, Ordering::Relaxed);
    }

    /// Marks the guest as let run (after a resume of a created VM).
    pub fn mark_started(&self) {
        self.started.store(true, Ordering::Relaxed);
    }

    /// The state now and, when the VM failed or paused on its own, why.
    pub fn status(&self) -> (VmStatus, Option<String>) {
        let Some(vm) = self.vm() else {
            return (VmStatus::Stopped, None);
        };
        match vm.run_state() {
            RunState::Running => (VmStatus::Running, None),
            RunState::Paused => match vm.io_stop() {
                Some(stop) => (VmStatus::Paused, Some(io_stop_reason(&stop))),
                None if self.started.load(Ordering::Relaxed) => (VmStatus::Paused, None),
                None => (VmStatus::Created, None),
            },
            RunState::Stopped(VmExit::Finished(0)) => (VmStatus::Finished, None),
            RunState::Stopped(exit) => (
                VmStatus::Failed,
                Some(format!("the guest stopped: {exit:?}")),
            ),
            RunState::Failed(why) => (VmStatus::Failed, Some(why)),
        }
    }

    /// The state now, if it changed since it was last reported (and records it as reported).
    pub fn changed(&self) -> Option<(VmStatus, Option<String>)> {
        let now = self.status();
        let mut reported = lock(&self.reported);
        (*reported != now).then(|| {
            reported.clone_from(&now);
            now
        })
    }
}

/// Why a disk paused a VM, and what happens next.
fn io_stop_reason(stop: &snap_vmm::IoStop) -> String {
    match stop.kind {
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => format!(
            "paused: {stop}: the VM runs on by itself once space is freed on the data directory's \
             filesystem (delete snapshots or VMs)"
        ),
        std::io::ErrorKind::InvalidData => format!(
            "paused: {stop}: the disk's data is damaged; revert the VM to a snapshot, or stop it"
        ),
        _ => format!("paused: {stop}"),
    }
}

/// Every VM's entry.
#[derive(Default)]
pub struct VmTable {
    entries: Mutex<HashMap<VmId, Arc<VmEntry>>>,
}

impl VmTable {
    /// The entry of VM `id`.
    ///
    /// # Errors
    /// NOT_FOUND.
    pub fn get(&self, id: VmId) -> Result<Arc<VmEntry>> {
        lock(&self.entries)
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::not_found("VM", id))
    }

    /// The entry of VM `id`, if there is one.
    pub fn find(&self, id: VmId) -> Option<Arc<VmEntry>> {
        lock(&self.entries).get(&id).cloned()
    }

    /// Adds VM `id` (stopped), or returns its entry.
    pub fn add(&self, id: VmId) -> Arc<VmEntry> {
        Arc::clone(
            lock(&self.entries)
                .entry(id)
                .or_insert_with(|| Arc::new(VmEntry::new())),
        )
    }

    /// Adds VM `id` with a running instance.
    pub fn add_running(&self, id: VmId, instance: Instance, started: bool) -> Arc<VmEntry> {
        let entry = self.add(id);
        entry.set(Some(instance), started);
        entry
    }

    /// Removes VM `id` (its instance goes with the last user).
    pub fn remove(&self, id: VmId) {
        if let Some(e) = lock(&self.entries).remove(&id) {
            e.set(None, false);
        }
    }

    /// Every entry.
    pub fn all(&self) -> Vec<(VmId, Arc<VmEntry>)> {
        lock(&self.entries)
            .iter()
            .map(|(id, e)| (*id, Arc::clone(e)))
            .collect()
    }
}
