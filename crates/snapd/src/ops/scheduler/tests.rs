use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::catalog::{DiskRecord, GuestSpec, VmStatus};
use crate::error::ErrorKind;

fn ids<const N: usize>() -> [LayerId; N] {
    std::array::from_fn(|_| LayerId::random())
}

fn vm(mem: &[LayerId], disk: &[LayerId]) -> VmRecord {
    VmRecord {
        id: VmId::random(),
        name: "v".into(),
        memory_bytes: 1 << 25,
        vcpus: 1,
        guest: GuestSpec::default(),
        labels: BTreeMap::new(),
        state: VmStatus::Running,
        current_snapshot: None,
        mem_chain: mem.to_vec(),
        disks: vec![DiskRecord {
            name: "root".into(),
            size_bytes: 1 << 20,
            chain: disk.to_vec(),
        }],
        created_ms: 0,
        failure: None,
    }
}

fn snapshot(of: &VmRecord, mem: &[LayerId], disk: &[LayerId]) -> SnapshotRecord {
    SnapshotRecord {
        id: SnapshotId::random(),
        name: "s".into(),
        vm_id: of.id,
        parent_id: None,
        labels: BTreeMap::new(),
        created_ms: 0,
        memory_bytes: of.memory_bytes,
        vcpus: 1,
        guest: GuestSpec::default(),
        stored_bytes: 0,
        pause_us: 0,
        mem_chain: mem.to_vec(),
        disks: vec![DiskRecord {
            name: "root".into(),
            size_bytes: 1 << 20,
            chain: disk.to_vec(),
        }],
    }
}

#[test]
fn only_two_reads_go_together() {
    assert!(!conflicts(Access::Read, Access::Read));
    assert!(conflicts(Access::Read, Access::Write));
    assert!(conflicts(Access::Write, Access::Read));
    assert!(conflicts(Access::Write, Access::Write));
}

/// The table in the module documentation, case by case.
#[test]
fn the_conflict_table() {
    // VM v runs on snapshot s1 (memory [m1], disk [d1 sealed, d2 its top]); s1's child s2
    // is [m1, m2] over disk [d1, d3].
    let [m1, m2, m3, d1, d2, d3, d4] = ids::<7>();
    let v = vm(&[m1], &[d1, d2]);
    let s1 = snapshot(&v, &[m1], &[d1]);
    let s2 = snapshot(&v, &[m1, m2], &[d1, d3]);
    let other = vm(&[m3], &[d4]);

    let snap_v = snapshot_footprint(&v);
    assert_eq!(snap_v.access(Resource::Vm(v.id)), Some(Access::Write));
    assert_eq!(snap_v.access(Resource::Layer(d1)), Some(Access::Read));
    assert_eq!(snap_v.access(Resource::Layer(d2)), None, "the VM's own top");

    // Two snapshots of one VM conflict; of two VMs sharing layers, they do not.
    assert_eq!(
        snap_v.conflict(&snapshot_footprint(&v)),
        Some(Resource::Vm(v.id))
    );
    let sibling = vm(&[m1], &[d1, LayerId::random()]);
    assert_eq!(snap_v.conflict(&snapshot_footprint(&sibling)), None);
    assert_eq!(snap_v.conflict(&snapshot_footprint(&other)), None);

    // Restores and clones of one snapshot run together, and beside snapshots of VMs on it.
    let restore_s2 = restore_footprint(&s2);
    assert_eq!(restore_s2.conflict(&restore_footprint(&s2)), None);
    assert_eq!(restore_s2.conflict(&snap_v), None);

    // A revert of v conflicts with a snapshot of v, not with a restore of its target.
    let revert = vm_footprint(v.id, Some(&s2));
    assert_eq!(revert.conflict(&snap_v), Some(Resource::Vm(v.id)));
    assert_eq!(revert.conflict(&restore_s2), None);
    assert_eq!(
        vm_footprint(v.id, None).conflict(&snap_v),
        Some(Resource::Vm(v.id))
    );

    // Deleting s2 (its layer m2 freed) conflicts with restores of s2 only.
    let delete_s2 = delete_footprint([], [s2.id], [m2]);
    assert_eq!(
        delete_s2.conflict(&restore_s2),
        Some(Resource::Snapshot(s2.id))
    );
    assert_eq!(delete_s2.conflict(&restore_footprint(&s1)), None);
    assert_eq!(delete_s2.conflict(&snap_v), None);
    // Deleting s1 by merging m1 into m2 conflicts with everything that reads m1 or m2: the
    // snapshot of v (a diff over m1), restores of s1's descendants, a revert to them.
    let delete_merge = delete_footprint([], [s1.id], [m1, m2]);
    assert_eq!(delete_merge.conflict(&snap_v), Some(Resource::Layer(m1)));
    assert!(delete_merge.conflict(&restore_s2).is_some());
    assert!(delete_merge.conflict(&revert).is_some());
    assert_eq!(delete_merge.conflict(&snapshot_footprint(&other)), None);
    // Deleting VM v conflicts with any change of v.
    let delete_v = delete_footprint([v.id], [], [d2]);
    assert_eq!(delete_v.conflict(&snap_v), Some(Resource::Vm(v.id)));
    assert_eq!(delete_v.conflict(&restore_s2), None);
}

fn holder(what: &str) -> Holder {
    Holder {
        op: Some(OpId::random()),
        what: what.into(),
    }
}

#[test]
fn a_conflict_is_aborted_naming_the_holder_and_released_on_drop() {
    let s = Arc::new(Scheduler::default());
    let v = VmId::random();
    let fp = || Ok((vm_footprint(v, None), ()));
    let (first, ()) = s
        .admit(holder("CreateSnapshot"), Patience::None, fp)
        .unwrap();
    let e = s
        .admit(holder("PauseVm"), Patience::None, fp)
        .err()
        .expect("a conflict");
    assert_eq!(e.kind, ErrorKind::Conflict);
    assert!(e.message.contains(&format!("VM {v}")), "{e}");
    assert!(e.message.contains("CreateSnapshot"), "{e}");
    // Unrelated work is admitted meanwhile.
    let other = VmId::random();
    s.admit(holder("x"), Patience::None, || {
        Ok((vm_footprint(other, None), ()))
    })
    .unwrap();
    drop(first);
    assert!(s.holders().is_empty());
    s.admit(holder("PauseVm"), Patience::None, fp).unwrap();
}

#[test]
fn a_patient_admission_waits_for_the_holder_and_can_be_cancelled() {
    let s = Arc::new(Scheduler::default());
    let v = VmId::random();
    let fp = move || Ok((vm_footprint(v, None), ()));
    let (held, ()) = s.admit(holder("first"), Patience::None, fp).unwrap();
    let waiter = {
        let s = Arc::clone(&s);
        std::thread::spawn(move || {
            let never = || false;
            let deadline = Instant::now() + Duration::from_secs(30);
            s.admit(holder("second"), Patience::Until(deadline, &never), fp)
                .map(|_| ())
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    drop(held);
    waiter.join().unwrap().unwrap();

    let (_held, ()) = s.admit(holder("first"), Patience::None, fp).unwrap();
    let yes = || true;
    let e = s
        .admit(
            holder("third"),
            Patience::Until(Instant::now() + Duration::from_secs(30), &yes),
            fp,
        )
        .err()
        .unwrap();
    assert_eq!(e.kind, ErrorKind::Cancelled);
    let never = || false;
    let e = s
        .admit(
            holder("fourth"),
            Patience::Until(Instant::now() + Duration::from_millis(20), &never),
            fp,
        )
        .err()
        .unwrap();
    assert_eq!(e.kind, ErrorKind::Conflict);
}
