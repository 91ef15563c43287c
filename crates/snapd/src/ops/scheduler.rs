//! Which operations may run together.
//!
//! Every mutating operation declares, before it starts, what it reads and what it writes: the
//! VM it changes, the snapshots it reads or deletes, and the layers it reads, rewrites (a merge)
//! or frees. Two operations conflict when one writes something the other reads or writes; reads
//! never conflict with reads. An operation is admitted only if it conflicts with none running;
//! otherwise it fails ABORTED at once, naming what holds it, or waits if the client asked to.
//!
//! | operation                      | VM       | snapshots             | layers                               |
//! |--------------------------------|----------|-----------------------|--------------------------------------|
//! | CreateSnapshot of VM v         | write v  |                       | read v's memory chain and sealed disk layers |
//! | Restore (revert) v to s        | write v  | read s                | read s's chains                      |
//! | Restore s into a new VM, Clone |          | read s                | read s's chains                      |
//! | StartVm v (from snapshot s)    | write v  | read s                | read s's chains                      |
//! | Pause, Resume, Stop v          | write v  |                       |                                      |
//! | DeleteSnapshot (plan p)        |          | write each deleted    | write each freed or merged layer     |
//! | DeleteVm v (plan p)            | write v  | write each deleted    | write each freed or merged layer     |
//! | CreateVm, labels               | (nothing that exists yet; the catalog's unique names decide) |
//!
//! So a delete whose plan merges layer L into its only child C conflicts with every snapshot,
//! restore, clone, revert or start whose chain includes L or C, and with nothing else; operations
//! on unrelated VMs and snapshots run in parallel. Footprints are computed under the scheduler's
//! lock from one read of the catalog, and an operation publishes its catalog changes before it
//! releases its footprint, so what an admitted operation read stays true until it ends.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use crate::catalog::{SnapshotRecord, VmRecord};
use crate::error::{Error, Result};
use crate::ids::{LayerId, OpId, SnapshotId, VmId};

/// Something an operation reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    /// A VM: its instance and its catalog row.
    Vm(VmId),
    /// A snapshot's catalog row and files.
    Snapshot(SnapshotId),
    /// A layer file.
    Layer(LayerId),
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vm(id) => write!(f, "VM {id}"),
            Self::Snapshot(id) => write!(f, "snapshot {id}"),
            Self::Layer(id) => write!(f, "layer {id}"),
        }
    }
}

/// How an operation uses a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Access {
    /// Reads it; it must not change meanwhile.
    Read,
    /// Changes, rewrites or frees it.
    Write,
}

/// Whether two uses of one resource conflict: only two reads do not.
pub fn conflicts(a: Access, b: Access) -> bool {
    a == Access::Write || b == Access::Write
}

/// What an operation reads and writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Footprint(BTreeMap<Resource, Access>);

impl Footprint {
    /// Adds a read of `r` (a write of it stays a write).
    pub fn read(&mut self, r: Resource) -> &mut Self {
        self.0.entry(r).or_insert(Access::Read);
        self
    }

    /// Adds a write of `r`.
    pub fn write(&mut self, r: Resource) -> &mut Self {
        self.0.insert(r, Access::Write);
        self
    }

    /// How the footprint uses `r`, if at all.
    pub fn access(&self, r: Resource) -> Option<Access> {
        self.0.get(&r).copied()
    }

    /// The first resource both footprints use in conflicting ways.
    pub fn conflict(&self, other: &Self) -> Option<Resource> {
        self.0
            .iter()
            .find(|(r, a)| other.access(**r).is_some_and(|b| conflicts(**a, b)))
            .map(|(r, _)| *r)
    }

    fn read_layers(&mut self, layers: impl IntoIterator<Item = LayerId>) -> &mut Self {
        for l in layers {
            self.read(Resource::Layer(l));
        }
        self
    }
}

/// A snapshot of VM `vm`: the VM, and the layers its next layers build on.
pub fn snapshot_footprint(vm: &VmRecord) -> Footprint {
    let mut f = Footprint::default();
    f.write(Resource::Vm(vm.id)).read_layers(vm.base_layers());
    f
}

/// Something that reads snapshot `s` whole (restore, clone, the source of a revert or start).
pub fn restore_footprint(s: &SnapshotRecord) -> Footprint {
    let mut f = Footprint::default();
    f.read(Resource::Snapshot(s.id)).read_layers(s.layers());
    f
}

/// A change of VM `vm` alone (pause, resume, stop), or with `from`, a revert or start from a
/// snapshot.
pub fn vm_footprint(vm: VmId, from: Option<&SnapshotRecord>) -> Footprint {
    let mut f = from.map(restore_footprint).unwrap_or_default();
    f.write(Resource::Vm(vm));
    f
}

/// A delete: the VMs and snapshots it deletes and the layers it frees or merges.
pub fn delete_footprint(
    vms: impl IntoIterator<Item = VmId>,
    snapshots: impl IntoIterator<Item = SnapshotId>,
    layers: impl IntoIterator<Item = LayerId>,
) -> Footprint {
    let mut f = Footprint::default();
    for v in vms {
        f.write(Resource::Vm(v));
    }
    for s in snapshots {
        f.write(Resource::Snapshot(s));
    }
    for l in layers {
        f.write(Resource::Layer(l));
    }
    f
}

/// Who holds a footprint, for the message of the operation that conflicts with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The operation, if it is a long one.
    pub op: Option<OpId>,
    /// What it is doing ("CreateSnapshot of VM ...").
    pub what: String,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.op {
            Some(op) => write!(f, "operation {op} ({})", self.what),
            None => f.write_str(&self.what),
        }
    }
}

struct Admitted {
    ticket: u64,
    holder: Holder,
    footprint: Footprint,
}

/// The operations running now and what they hold.
#[derive(Default)]
pub struct Scheduler {
    running: Mutex<(u64, Vec<Admitted>)>,
    released: Condvar,
}

/// An admitted operation's hold on its footprint; released on drop.
pub struct Admission {
    scheduler: Arc<Scheduler>,
    ticket: u64,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut running = self.scheduler.lock();
        running.1.retain(|a| a.ticket != self.ticket);
        drop(running);
        self.scheduler.released.notify_all();
    }
}

/// How long an admission may wait for conflicting operations to end.
#[derive(Clone, Copy)]
pub enum Patience<'a> {
    /// Not at all: ABORTED at once.
    None,
    /// Until the deadline, or until `cancelled` says so.
    Until(Instant, &'a dyn Fn() -> bool),
}

impl Scheduler {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, Vec<Admitted>)> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits `holder` with the footprint `plan` computes (from the catalog, under the
    /// scheduler's lock, so that no admitted operation changes what it read meanwhile), along
    /// with whatever else `plan` found. On a conflict it fails ABORTED naming the holder, or,
    /// with patience, waits for it to end and plans again.
    ///
    /// # Errors
    /// `plan`'s error; ABORTED on a conflict (or when the wait ends unadmitted); CANCELLED if
    /// `cancelled` said so while waiting.
    pub fn admit<T>(
        self: &Arc<Self>,
        holder: Holder,
        patience: Patience<'_>,
        mut plan: impl FnMut() -> Result<(Footprint, T)>,
    ) -> Result<(Admission, T)> {
        let mut running = self.lock();
        loop {
            let (footprint, found) = plan()?;
            let clash = running
                .1
                .iter()
                .find_map(|a| footprint.conflict(&a.footprint).map(|r| (r, &a.holder)));
            let Some((resource, other)) = clash else {
                running.0 += 1;
                let ticket = running.0;
                running.1.push(Admitted {
                    ticket,
                    holder,
                    footprint,
                });
                return Ok((
                    Admission {
                        scheduler: Arc::clone(self),
                        ticket,
                    },
                    found,
                ));
            };
            let busy = || {
                Error::conflict(format!(
                    "{resource} is in use by {other}: retry when it has ended (or ask to wait)"
                ))
            };
            let Patience::Until(deadline, cancelled) = patience else {
                return Err(busy());
            };
            if cancelled() {
                return Err(Error::cancelled());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(busy());
            }
            // Wake at least every 100 ms to look at `cancelled`.
            let nap = (deadline - now).min(std::time::Duration::from_millis(100));
            running = self
                .released
                .wait_timeout(running, nap)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// What is running now (for tests and diagnostics).
    pub fn holders(&self) -> Vec<Holder> {
        self.lock().1.iter().map(|a| a.holder.clone()).collect()
    }
}

#[cfg(test)]
mod tests;
