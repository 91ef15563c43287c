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
        c.stop_vm(pb::VmActionRequest {
            wait: false,
            request_id: rid("stop"),
            vm_id: r.id.clone(),
        })
        .await
        .unwrap();
    }
}
