//! A full filesystem under the data directory (a small tmpfs made for each test): calls that need
//! space fail RESOURCE_EXHAUSTED and leave nothing behind, a guest whose disk cannot be written
//! pauses instead of failing and runs on once space is freed, deletes always work, and the daemon
//! starts on a full filesystem.

use snap_api::v1 as pb;
use snap_testkit::fs::{Filler, Tmpfs};

use super::common::*;

/// Size of each test's filesystem.
const FS_BYTES: u64 = 64 << 20;

/// A daemon whose data directory is on a fresh tmpfs, keeping an 8 MiB space reserve.
async fn on_small_fs(test: &str) -> Option<(Tmpfs, Snapd, Client)> {
    let fs = Tmpfs::for_test(test, FS_BYTES)?;
    let mut d = Snapd::at(SNAPD, &fs.path().join("data"), &["--reserve-mib", "8"]);
    d.start("");
    let c = d.client().await;
    Some((fs, d, c))
}

/// On a full filesystem a snapshot and a new VM fail RESOURCE_EXHAUSTED with nothing listed and
/// no file left; a guest writing its disk pauses (its state says why) instead of failing; once
/// snapshots and a VM are deleted, the guest runs on by itself and ends exactly as its model
/// says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_pauses_the_guest_and_fails_calls_cleanly() {
    let test = "a_full_disk_pauses_the_guest_and_fails_calls_cleanly";
    if !kvm_available(test) {
        return;
    }
    let Some((fs, daemon, mut c)) = on_small_fs(test).await else {
        return;
    };
    let expected = model(&guest());
    // v is made now and started once the disk is full; w runs and is snapshotted.
    let v = create_vm(&mut c, "v", false).await;
    let w = create_vm_running(&mut c, "w", true, long_guest()).await;
    wait_lines(&mut c, &w.id, 2).await;
    let s1 = take_snapshot(&mut c, &w.id, "s1").await;
    let filler = Filler::fill(fs.path(), 0);

    // Refused when the operation cannot even be recorded, or failed when its layer cannot be
    // written: RESOURCE_EXHAUSTED either way.
    let started = start_snapshot(&mut c, &w.id, "s2").await;
    let (code, message) = outcome(&mut c, started)
        .await
        .expect_err("no room for a snapshot");
    assert_eq!(code, Code::ResourceExhausted, "{message}");
    assert!(message.contains("full"), "{message}");
    assert_eq!(
        snapshot_count(&mut c).await,
        1,
        "a failed snapshot is listed"
    );
    assert_eq!(get_vm(&mut c, &w.id).await.state(), pb::VmState::Running);
    daemon.assert_files_match_catalog("after the failed snapshot");

    let e = c
        .create_vm(vm_request("x", false, guest()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert_eq!(list_vms(&mut c).await.len(), 2);
    daemon.assert_files_match_catalog("after the failed create");

    // v's guest writes its disk: it pauses, and says why.
    start_vm(&mut c, &v.id).await;
    let deadline = std::time::Instant::now() + TIMEOUT;
    let paused = loop {
        let now = get_vm(&mut c, &v.id).await;
        if now.state() == pb::VmState::Paused {
            break now;
        }
        assert!(
            now.state() == pb::VmState::Running && std::time::Instant::now() < deadline,
            "the guest should pause on the full disk: {now:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert!(
        paused.failure.contains("full") && paused.failure.contains("runs on by itself"),
        "{}",
        paused.failure
    );
    assert!(expected.starts_with(&console(&mut c, &v.id).await));

    // Free space the way an operator would: delete w with its snapshots.
    stop(&mut c, &w.id).await;
    let r = delete_vm(&mut c, &w.id, true).await;
    assert_eq!(r.deleted_snapshot_ids, vec![s1.id]);
    assert!(r.freed_bytes > 0);
    // v runs on by itself and ends exactly as its model says.
    assert_eq!(finish(&mut c, &v.id).await, expected);
    daemon.assert_files_match_catalog("at the end");
    drop(filler);
}

/// A daemon stopped (and one killed) while its filesystem is full starts again, and a delete
/// then frees space.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_starts_on_a_full_disk_and_deletes_free_space() {
    let test = "the_daemon_starts_on_a_full_disk_and_deletes_free_space";
    if !kvm_available(test) {
        return;
    }
    let Some((fs, mut daemon, mut c)) = on_small_fs(test).await else {
        return;
    };
    let v = create_vm_running(&mut c, "v", true, long_guest()).await;
    wait_lines(&mut c, &v.id, 2).await;
    let a = take_snapshot(&mut c, &v.id, "a").await;
    wait_lines(&mut c, &v.id, 4).await;
    let b = take_snapshot(&mut c, &v.id, "b").await;
    let _filler = Filler::fill(fs.path(), 0);
    assert!(fs.free() < 64 << 10);

    daemon.stop();
    let mut c = respawn(&mut daemon, "").await;
    assert_eq!(snapshot_count(&mut c).await, 2);
    let freed = delete_snapshot(&mut c, &b.id).await.freed_bytes;
    assert!(freed > 0);

    // Full again, and killed this time.
    let _more = Filler::fill(fs.path(), 0);
    daemon.kill9();
    let mut c = respawn(&mut daemon, "").await;
    assert_eq!(snapshot_count(&mut c).await, 1);
    let r = delete_snapshot(&mut c, &a.id).await;
    assert_eq!(r.deleted_snapshot_ids, vec![a.id]);
    daemon.assert_files_match_catalog("after the deletes");
}
