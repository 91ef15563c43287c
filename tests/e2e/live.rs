//! Live snapshots through the daemon: the VM pauses only to capture and protect, runs on while
//! its layer is written under write-protect, and every snapshot restores exactly; a failure, a
//! cancel or a kill during the copy leaves nothing half made and a VM that never noticed.

use snap_api::v1 as pb;

use super::common::*;

/// A guest that writes hard into a large working set, long enough to snapshot while it runs.
fn busy() -> pb::GuestProgram {
    pb::GuestProgram {
        working_set_pages: 2048,
        mutations_per_tick: 400,
        ticks: 120,
        ..guest()
    }
}

/// Takes a snapshot of running VM `vm` and returns its ended operation.
async fn live_snapshot(c: &mut Client, vm: &str, name: &str) -> pb::Operation {
    let op = start_snapshot(c, vm, name).await.unwrap();
    let op = wait_op(c, op).await;
    assert_eq!(op.state(), pb::OperationState::Succeeded, "{op:?}");
    op
}

/// The output of a VM restored from `snapshot` in `mode`, run to its end: a suffix of the
/// model's, since the VM continues from the pause.
async fn restored_output(c: &mut Client, snapshot: &str, mode: pb::MemoryRestoreMode) -> String {
    let vm = restore_new(c, snapshot, &format!("r-{}", rid("r")), mode).await;
    finish(c, &vm.id).await
}

fn assert_continues(model: &str, out: &str, what: &str) {
    assert!(!out.is_empty(), "{what}: printed nothing");
    assert!(
        model.ends_with(out),
        "{what}: the restored VM's output is not the model's continuation:\n{out}"
    );
}

/// Snapshots of a VM that writes hard, taken while it runs (a full one, then diffs), are
/// write-protected, pause it briefly, and restore exactly in every memory mode; the VM itself
/// runs on to exactly the model's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_snapshots_restore_exactly_in_every_mode() {
    if !kvm_available("live_snapshots_restore_exactly_in_every_mode") {
        return;
    }
    let model = model(&busy());
    let (_daemon, mut c) = start("").await;
    let vm = create_vm_running(&mut c, "busy", true, busy()).await;
    let mut snaps = Vec::new();
    for (k, lines) in [3, 8, 13].into_iter().enumerate() {
        wait_lines(&mut c, &vm.id, lines).await;
        let op = live_snapshot(&mut c, &vm.id, &format!("s{k}")).await;
        let copy = op.snapshot_copy.clone().unwrap();
        assert_eq!(copy.method, "write-protect", "{op:?}");
        if k == 0 {
            assert!(copy.pages_protected_ahead > 0, "{copy:?}");
        }
        let progress = op.progress.clone().unwrap();
        assert_eq!(progress.bytes_done, progress.bytes_total, "{progress:?}");
        snaps.push(op.result.unwrap().snapshot.unwrap());
    }
    assert_eq!(finish(&mut c, &vm.id).await, model, "the VM never noticed");
    for s in &snaps {
        for mode in [
            pb::MemoryRestoreMode::Eager,
            pb::MemoryRestoreMode::Lazy,
            pb::MemoryRestoreMode::Prefetch,
        ] {
            let out = restored_output(&mut c, &s.id, mode).await;
            assert_continues(&model, &out, &format!("{} {mode:?}", s.name));
        }
    }
}

/// With the writer slowed down, the guest writes most protected pages first: the fault path
/// keeps them (the operation counts them and the time the guest waited), and the snapshot still
/// holds the pause's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_written_during_the_copy_are_kept_from_the_pause() {
    if !kvm_available("pages_written_during_the_copy_are_kept_from_the_pause") {
        return;
    }
    let model = model(&busy());
    let (_daemon, mut c) = start("snapshot.copy-memory=sleep:20").await;
    let vm = create_vm_running(&mut c, "busy", true, busy()).await;
    wait_lines(&mut c, &vm.id, 3).await;
    let op = live_snapshot(&mut c, &vm.id, "slow").await;
    let copy = op.snapshot_copy.clone().unwrap();
    assert!(copy.pages_saved_ahead > 0, "{copy:?}");
    assert!(copy.fault_hold_us > 0, "{copy:?}");
    let snap = op.result.unwrap().snapshot.unwrap();
    let out = restored_output(&mut c, &snap.id, pb::MemoryRestoreMode::Lazy).await;
    assert_continues(&model, &out, "slow copy");
    assert_eq!(finish(&mut c, &vm.id).await, model);
}

/// A write failure and a cancel during the copy: the operation fails (CANCELLED for the
/// cancel), nothing is listed, no file is left, the VM runs on to exactly the model's output,
/// and the next snapshot restores exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_or_cancelled_copy_leaves_nothing() {
    if !kvm_available("a_failed_or_cancelled_copy_leaves_nothing") {
        return;
    }
    let model = model(&busy());
    let (mut daemon, mut c) = start("snapshot.copy-memory=fail:1").await;
    let vm = create_vm_running(&mut c, "busy", true, busy()).await;
    wait_lines(&mut c, &vm.id, 3).await;
    let op = start_snapshot(&mut c, &vm.id, "broken").await.unwrap();
    let op = wait_op(&mut c, op).await;
    assert_eq!(op.state(), pb::OperationState::Failed, "{op:?}");
    assert!(
        op.error
            .as_ref()
            .unwrap()
            .message
            .contains("snapshot.copy-memory"),
        "{op:?}"
    );
    assert_eq!(snapshot_count(&mut c).await, 0);
    daemon.assert_files_match_catalog("after a failed copy");
    assert_eq!(finish(&mut c, &vm.id).await, model, "the VM never noticed");

    // A cancel, on a daemon whose copies are slow.
    daemon.stop();
    daemon.start("snapshot.copy-memory=sleep:50");
    let mut c = daemon.client().await;
    let vm = create_vm_running(&mut c, "busy2", true, busy()).await;
    wait_lines(&mut c, &vm.id, 3).await;
    let op = start_snapshot(&mut c, &vm.id, "cancelled").await.unwrap();
    wait_phase(&mut c, &op, |p| p == "writing memory").await;
    c.cancel_operation(pb::CancelOperationRequest {
        operation_id: op.id.clone(),
    })
    .await
    .unwrap();
    let ended = wait_op(&mut c, op).await;
    assert_eq!(ended.state(), pb::OperationState::Cancelled, "{ended:?}");
    assert_eq!(snapshot_count(&mut c).await, 0);
    daemon.assert_files_match_catalog("after a cancelled copy");
    let op = live_snapshot(&mut c, &vm.id, "after").await;
    let snap = op.result.unwrap().snapshot.unwrap();
    let out = restored_output(&mut c, &snap.id, pb::MemoryRestoreMode::Eager).await;
    assert_continues(&model, &out, "the snapshot after the cancel");
    assert_eq!(finish(&mut c, &vm.id).await, model, "the VM never noticed");
}

/// A daemon killed with SIGKILL in the middle of a copy comes back with no half snapshot and
/// no file of one; the VM is stopped, as after any restart, and starts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_the_copy_leaves_nothing_half_made() {
    if !kvm_available("a_kill_during_the_copy_leaves_nothing_half_made") {
        return;
    }
    let model = model(&busy());
    let (mut daemon, mut c) = start("snapshot.copy-memory=sleep:200").await;
    let vm = create_vm_running(&mut c, "busy", true, busy()).await;
    wait_lines(&mut c, &vm.id, 3).await;
    let op = start_snapshot(&mut c, &vm.id, "killed").await.unwrap();
    wait_phase(&mut c, &op, |p| p == "writing memory").await;
    daemon.kill9();
    let mut c = respawn(&mut daemon, "").await;
    assert_eq!(snapshot_count(&mut c).await, 0);
    daemon.assert_files_match_catalog("after a kill during the copy");
    let ended = wait_op(&mut c, op).await;
    assert_eq!(ended.state(), pb::OperationState::Failed, "{ended:?}");
    assert_eq!(get_vm(&mut c, &vm.id).await.state(), pb::VmState::Stopped);
    start_vm(&mut c, &vm.id).await;
    assert_eq!(finish(&mut c, &vm.id).await, model);
}

/// `--snapshot-copy copy` takes the copy path, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_copy_path_can_be_forced() {
    if !kvm_available("the_copy_path_can_be_forced") {
        return;
    }
    let model = model(&busy());
    let (_daemon, mut c) = start_with("", &["--snapshot-copy", "copy"]).await;
    let vm = create_vm_running(&mut c, "busy", true, busy()).await;
    wait_lines(&mut c, &vm.id, 3).await;
    let op = live_snapshot(&mut c, &vm.id, "copied").await;
    assert_eq!(op.snapshot_copy.as_ref().unwrap().method, "copy");
    let snap = op.result.unwrap().snapshot.unwrap();
    let out = restored_output(&mut c, &snap.id, pb::MemoryRestoreMode::Lazy).await;
    assert_continues(&model, &out, "copy path");
}
