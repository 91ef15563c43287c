//! Operations racing each other: a conflict is refused with ABORTED (or waited for), never a
//! snapshot lost or a VM left broken.

use snap_api::v1 as pb;

use super::common::*;

/// Two snapshots of one VM at once: one runs, the other is ABORTED at once. Snapshots of
/// different VMs in parallel all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_snapshots() {
    if !kvm_available("concurrent_snapshots") {
        return;
    }
    // The publish step sleeps, so the first snapshot surely holds its VM when the second comes.
    let (_daemon, mut c) = start("snapshot.before-publish=sleep:300").await;
    // Long-running guests, so that every snapshot below lands mid-run.
    let long = pb::GuestProgram {
        ticks: 2000,
        ..guest()
    };
    let one = create_vm_running(&mut c, "one", true, long).await;
    let two = create_vm_running(&mut c, "two", true, long).await;
    let three = create_vm_running(&mut c, "three", true, long).await;

    let (mut c1, mut c2) = (c.clone(), c.clone());
    let (r1, r2) = tokio::join!(
        start_snapshot(&mut c1, &one.id, "first"),
        start_snapshot(&mut c2, &one.id, "second"),
    );
    let (ok, err) = match (r1, r2) {
        (Ok(op), Err(e)) | (Err(e), Ok(op)) => (op, e),
        other => panic!("expected one snapshot to start and one ABORTED, got {other:?}"),
    };
    assert_eq!(err.code(), Code::Aborted, "{err}");
    assert!(
        err.message().contains("in use by operation") && err.message().contains("CreateSnapshot"),
        "{err}"
    );
    succeeded(&mut c, ok).await;

    let mut clients = [c.clone(), c.clone(), c.clone()];
    let [a, b, d] = &mut clients;
    let (r1, r2, r3) = tokio::join!(
        start_snapshot(a, &one.id, "p1"),
        start_snapshot(b, &two.id, "p2"),
        start_snapshot(d, &three.id, "p3"),
    );
    for op in [r1, r2, r3] {
        succeeded(&mut c, op.expect("snapshots of different VMs all start")).await;
    }
    assert_eq!(snapshot_count(&mut c).await, 4);

    // These snapshots let their VMs run on before writing their layers (the pages were copied
    // out while paused): a restore still continues exactly from the pause, wherever it was
    // (mid-line, possibly). Six lines of each continuation are checked against the model.
    let expected = model(&long);
    let snaps = c
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    for s in snaps.iter().filter(|s| s.name.starts_with('p')) {
        assert!(s.pause_us > 0);
        let r = restore_new(
            &mut c,
            &s.id,
            &format!("from-{}", s.name),
            pb::MemoryRestoreMode::Eager,
        )
        .await;
        wait_lines(&mut c, &r.id, 6).await;
        let out = console(&mut c, &r.id).await;
        assert!(
            expected.contains(&out),
            "{}: the restore diverged: {out}",
            s.name
        );
        stop(&mut c, &r.id).await;
    }
}

/// A delete that would merge a layer that a running snapshot builds on is refused (ABORTED,
/// naming the snapshot's operation) or, asked to wait, runs after it and merges nothing the new
/// snapshot needs; a snapshot that would build on layers a running merge rewrites is refused the
/// same way. Every snapshot, and the VM started again from its last one, continue exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merging_delete_and_a_snapshot_never_run_together() {
    if !kvm_available("a_merging_delete_and_a_snapshot_never_run_together") {
        return;
    }
    let expected = model(&long_guest());
    let (_daemon, mut c) =
        start("snapshot.write-memory=sleep:1000,delete.before-commit=sleep:1000").await;
    let m = create_vm_running(&mut c, "m", true, long_guest()).await;
    wait_lines(&mut c, &m.id, 3).await;
    let s1 = take_snapshot(&mut c, &m.id, "s1").await;
    let s2 = take_snapshot(&mut c, &m.id, "s2").await;

    // s3 is being written (a diff over s2's layer) while s1's delete would merge s1 into s2.
    let s3_op = start_snapshot(&mut c, &m.id, "s3").await.unwrap();
    let e = start_delete(&mut c, &s1.id, false).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e}");
    assert!(e.message().contains(&s3_op.id), "names the snapshot: {e}");
    let queued = start_delete(&mut c, &s1.id, true).await.unwrap();
    assert_eq!(queued.state(), pb::OperationState::Pending, "{queued:?}");
    let s3 = succeeded(&mut c, s3_op).await.snapshot.unwrap();
    let deleted = succeeded(&mut c, queued).await;
    assert_eq!(deleted.deleted_snapshot_ids, vec![s1.id.clone()]);

    // The other way round: s2's delete merges s2 into s3 (the VM runs on s3) and holds both
    // layers; a snapshot of the VM meanwhile is refused, naming the delete.
    let merge = start_delete(&mut c, &s2.id, false).await.unwrap();
    let e = start_snapshot(&mut c, &m.id, "s4").await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e}");
    assert!(e.message().contains(&merge.id), "names the delete: {e}");
    succeeded(&mut c, merge).await;
    let s4 = take_snapshot(&mut c, &m.id, "s4").await;
    assert_eq!(s4.parent_id, s3.id);

    for s in [&s3, &s4] {
        let r = restore_new(
            &mut c,
            &s.id,
            &format!("from-{}", s.name),
            pb::MemoryRestoreMode::Eager,
        )
        .await;
        continues_exactly(&mut c, &r.id, &expected, 6).await;
    }
    // The VM itself, stopped and started again from its last snapshot.
    stop(&mut c, &m.id).await;
    start_vm(&mut c, &m.id).await;
    continues_exactly(&mut c, &m.id, &expected, 6).await;
}

/// A revert racing a delete of its target, ten times: one of them runs, the other loses the race
/// with ABORTED or NOT_FOUND; a revert that lost leaves the VM running as before, and the VM's
/// next snapshot restores exactly either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revert_racing_a_delete_of_its_target() {
    if !kvm_available("a_revert_racing_a_delete_of_its_target") {
        return;
    }
    let expected = model(&long_guest());
    let (daemon, mut c) = start("delete.before-commit=sleep:100").await;
    let v = create_vm_running(&mut c, "v", true, long_guest()).await;
    wait_lines(&mut c, &v.id, 2).await;
    let (mut reverted, mut refused) = (0, 0);
    for i in 0..10 {
        let t = take_snapshot(&mut c, &v.id, &format!("t{i}")).await;
        let (mut c1, mut c2) = (c.clone(), c.clone());
        let (revert, delete) = tokio::join!(
            async {
                let started = c1
                    .restore_snapshot(pb::RestoreSnapshotRequest {
                        request_id: rid("revert"),
                        snapshot_id: t.id.clone(),
                        target: Some(pb::restore_snapshot_request::Target::VmId(v.id.clone())),
                        ..Default::default()
                    })
                    .await
                    .map(tonic::Response::into_inner);
                outcome(&mut c1, started).await
            },
            async {
                let started = start_delete(&mut c2, &t.id, false).await;
                outcome(&mut c2, started).await
            },
        );
        match &revert {
            Ok(_) => reverted += 1,
            Err(e) => {
                assert_lost_race(e, "the revert");
                refused += 1;
            }
        }
        if let Err(e) = &delete {
            assert_lost_race(e, "the delete");
        }
        // Running as before (never left paused), and its next snapshot restores exactly.
        let state = get_vm(&mut c, &v.id).await.state();
        assert_eq!(
            state,
            pb::VmState::Running,
            "try {i}: {revert:?} {delete:?}"
        );
        let u = take_snapshot(&mut c, &v.id, &format!("u{i}")).await;
        let r = restore_new(
            &mut c,
            &u.id,
            &format!("from-u{i}"),
            pb::MemoryRestoreMode::Lazy,
        )
        .await;
        continues_exactly(&mut c, &r.id, &expected, 4).await;
    }
    println!("reverts that ran: {reverted}, refused: {refused}");
    daemon.assert_files_match_catalog("after the races");
}

/// Restores and clones racing deletes of their snapshot lose with ABORTED or NOT_FOUND, never an
/// error blaming damage; what they made runs exactly, and no file is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_and_clones_racing_deletes() {
    if !kvm_available("restores_and_clones_racing_deletes") {
        return;
    }
    let expected = model(&long_guest());
    let (daemon, mut c) = start("").await;
    let v = create_vm_running(&mut c, "v", true, long_guest()).await;
    wait_lines(&mut c, &v.id, 2).await;
    for i in 0..6 {
        let t = take_snapshot(&mut c, &v.id, &format!("t{i}")).await;
        let (mut c1, mut c2, mut c3) = (c.clone(), c.clone(), c.clone());
        let (restored, cloned, deleted) = tokio::join!(
            async {
                let s = start_restore_new(
                    &mut c1,
                    &t.id,
                    &format!("r{i}"),
                    pb::MemoryRestoreMode::Eager,
                )
                .await;
                outcome(&mut c1, s).await
            },
            async {
                let s = start_clone(&mut c2, &t.id, &format!("c{i}"), 2).await;
                outcome(&mut c2, s).await
            },
            async {
                let s = start_delete(&mut c3, &t.id, false).await;
                outcome(&mut c3, s).await
            },
        );
        for (what, r) in [
            ("restore", &restored),
            ("clone", &cloned),
            ("delete", &deleted),
        ] {
            if let Err(e) = r {
                assert_lost_race(e, what);
            }
        }
        for vm in restored
            .iter()
            .chain(cloned.iter())
            .flat_map(|r| r.vms.clone())
        {
            continues_exactly(&mut c, &vm.id, &expected, 3).await;
        }
    }
    daemon.assert_files_match_catalog("after the races");
}
