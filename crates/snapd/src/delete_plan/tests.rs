use std::collections::BTreeMap;

use super::*;
use crate::catalog::{DiskRecord, GuestSpec, VmStatus};

/// A small world of snapshots and VMs, each memory layer named after its snapshot and each
/// sealed disk layer `d<name>`.
#[derive(Default)]
struct World {
    snapshots: Vec<SnapshotRecord>,
    vms: Vec<VmRecord>,
    mem: BTreeSet<LayerId>,
    names: BTreeMap<String, LayerId>,
}

impl World {
    fn layer(&mut self, name: &str, memory: bool) -> LayerId {
        let id = *self
            .names
            .entry(name.into())
            .or_insert_with(LayerId::random);
        if memory {
            self.mem.insert(id);
        }
        id
    }

    fn named(&self, names: &[&str]) -> BTreeSet<LayerId> {
        names.iter().map(|n| self.names[*n]).collect()
    }

    /// Snapshot `name` over `parent` (its chains extend the parent's).
    fn snap(&mut self, name: &str, parent: Option<SnapshotId>) -> SnapshotId {
        let (mut mem, mut disk) = parent
            .map(|p| {
                let s = self.snapshots.iter().find(|s| s.id == p).unwrap();
                (s.mem_chain.clone(), s.disks[0].chain.clone())
            })
            .unwrap_or_default();
        mem.push(self.layer(name, true));
        disk.push(self.layer(&format!("d{name}"), false));
        let id = SnapshotId::random();
        self.snapshots.push(SnapshotRecord {
            id,
            name: name.into(),
            vm_id: VmId::random(),
            parent_id: parent,
            labels: BTreeMap::new(),
            created_ms: 0,
            memory_bytes: 1 << 25,
            vcpus: 1,
            guest: GuestSpec::default(),
            stored_bytes: 0,
            pause_us: 0,
            mem_chain: mem,
            disks: vec![DiskRecord {
                name: "root".into(),
                size_bytes: 1 << 20,
                chain: disk,
            }],
        });
        id
    }

    /// A VM running from snapshot `from` (or from nothing), with a disk top of its own.
    fn vm(&mut self, name: &str, from: Option<SnapshotId>) -> VmId {
        let (mem, mut disk) = from
            .map(|p| {
                let s = self.snapshots.iter().find(|s| s.id == p).unwrap();
                (s.mem_chain.clone(), s.disks[0].chain.clone())
            })
            .unwrap_or_default();
        disk.push(self.layer(&format!("top-{name}"), false));
        let id = VmId::random();
        self.vms.push(VmRecord {
            id,
            name: name.into(),
            memory_bytes: 1 << 25,
            vcpus: 1,
            guest: GuestSpec::default(),
            labels: BTreeMap::new(),
            state: VmStatus::Running,
            current_snapshot: from,
            mem_chain: mem,
            disks: vec![DiskRecord {
                name: "root".into(),
                size_bytes: 1 << 20,
                chain: disk,
            }],
            created_ms: 0,
            failure: None,
        });
        id
    }

    fn plan(&self, roots: &[SnapshotId], descendants: bool, vms: &[VmId]) -> DeletePlan {
        plan_delete(
            &self.snapshots,
            &self.vms,
            &self.mem,
            roots,
            descendants,
            vms,
        )
    }

    fn merge(&self, layer: &str, into: &str) -> Merge {
        Merge {
            layer: self.names[layer],
            into: self.names[into],
        }
    }
}

#[test]
fn a_parent_merges_into_its_only_leaf_child_and_the_vm_running_from_it() {
    let mut w = World::default();
    let a = w.snap("a", None);
    let b = w.snap("b", Some(a));
    w.vm("v", Some(b));
    let p = w.plan(&[a], false, &[]);
    assert_eq!(p.snapshots, BTreeSet::from([a]));
    assert_eq!(p.merges, vec![w.merge("a", "b")]);
    // a's memory layer goes by the merge; its sealed disk layer stays under b's.
    assert_eq!(p.freed, w.named(&["a"]));
    let written: BTreeSet<LayerId> = p.layers().collect();
    assert_eq!(written, w.named(&["a", "b"]));
}

#[test]
fn branches_and_vms_based_on_a_layer_keep_it_whole() {
    let mut w = World::default();
    let a = w.snap("a", None);
    w.snap("b", Some(a));
    w.snap("c", Some(a));
    let p = w.plan(&[a], false, &[]);
    assert!(p.merges.is_empty(), "two children: {p:?}");
    assert!(p.freed.is_empty());

    // A VM running from a itself (a clone, say) also keeps it whole.
    let mut w = World::default();
    let a = w.snap("a", None);
    w.snap("b", Some(a));
    w.vm("clone", Some(a));
    let p = w.plan(&[a], false, &[]);
    assert!(p.merges.is_empty() && p.freed.is_empty(), "{p:?}");

    // A child that is not a leaf (a VM snapshotted on after it) is not merged into.
    let mut w = World::default();
    let a = w.snap("a", None);
    let b = w.snap("b", Some(a));
    w.snap("c", Some(b));
    let p = w.plan(&[a], false, &[]);
    assert!(p.merges.is_empty(), "{p:?}");
}

#[test]
fn a_run_of_deleted_snapshots_merges_in_order() {
    let mut w = World::default();
    let a = w.snap("a", None);
    let b = w.snap("b", Some(a));
    w.snap("c", Some(b));
    let p = w.plan(&[a, b], false, &[]);
    assert_eq!(p.merges, vec![w.merge("b", "c"), w.merge("a", "c")]);
    assert_eq!(p.freed, w.named(&["a", "b"]));
}

#[test]
fn descendants_go_too_but_what_a_vm_runs_on_is_merged_not_freed() {
    let mut w = World::default();
    let a = w.snap("a", None);
    let b = w.snap("b", Some(a));
    let c = w.snap("c", Some(b));
    let other = w.snap("other", None);
    w.vm("v", Some(c));
    let p = w.plan(&[a], true, &[]);
    assert_eq!(p.snapshots, BTreeSet::from([a, b, c]));
    assert!(!p.snapshots.contains(&other));
    // The VM runs from c: a and b merge into c (the VM's chain becomes c alone), and every
    // disk layer stays under the VM's top.
    assert_eq!(p.merges, vec![w.merge("b", "c"), w.merge("a", "c")]);
    assert_eq!(p.freed, w.named(&["a", "b"]));
    // Without the VM, everything of theirs is freed.
    let mut w2 = World::default();
    let a = w2.snap("a", None);
    let b = w2.snap("b", Some(a));
    let p = w2.plan(&[a], true, &[]);
    assert_eq!(p.snapshots, BTreeSet::from([a, b]));
    assert_eq!(p.freed, w2.named(&["a", "b", "da", "db"]));
}

#[test]
fn a_vm_deleted_with_its_snapshots_frees_everything_only_they_name() {
    let mut w = World::default();
    let a = w.snap("a", None);
    let b = w.snap("b", Some(a));
    let v = w.vm("v", Some(b));
    // A clone of a (another VM) keeps a's layers.
    w.vm("clone", Some(a));
    let p = w.plan(&[a, b], false, &[v]);
    assert_eq!(p.vms, BTreeSet::from([v]));
    assert_eq!(p.freed, w.named(&["b", "db", "top-v"]));
    assert!(p.merges.is_empty(), "{p:?}");
}

#[test]
fn only_leaf_child_reads_chains() {
    let [a, b, c] = std::array::from_fn(|_| LayerId::random());
    assert_eq!(only_leaf_child(&[vec![a, b], vec![a, b]], a), Some(b));
    assert_eq!(only_leaf_child(&[vec![a, b], vec![a, c]], a), None);
    assert_eq!(only_leaf_child(&[vec![a, b], vec![a]], a), None);
    assert_eq!(only_leaf_child(&[vec![a, b, c]], a), None);
    assert_eq!(only_leaf_child(&[vec![b]], a), None);
}

#[test]
fn children_of_deleted_snapshots_move_to_the_nearest_survivor() {
    let mut w = World::default();
    let a = w.snap("a", None);
    let b = w.snap("b", Some(a));
    let c = w.snap("c", Some(b));
    let d = w.snap("d", Some(c));
    let doomed = BTreeSet::from([b, c]);
    assert_eq!(reparented(&w.snapshots, &doomed), vec![(d, Some(a))]);
    let doomed = BTreeSet::from([a, b]);
    assert_eq!(reparented(&w.snapshots, &doomed), vec![(c, None)]);
}
