//! Crashes and damaged catalogs: a daemon killed with SIGKILL comes back with every acknowledged
//! snapshot and nothing half done; a catalog that is missing, emptied or rolled back is refused
//! instead of being read as "nothing exists", and no file is deleted on such a guess.

use std::time::{Duration, Instant};

use snap_api::v1 as pb;

use super::common::*;

/// A clone of three VMs killed before its one catalog transaction leaves no clone after the
/// restart (and no file of one); one that ended leaves all three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_is_all_or_none_across_kill_9() {
    if !kvm_available("a_clone_is_all_or_none_across_kill_9") {
        return;
    }
    let expected = model(&long_guest());
    let (mut daemon, mut c) = start("restore.before-publish=sleep:3000").await;
    let v = create_vm_running(&mut c, "v", true, long_guest()).await;
    wait_lines(&mut c, &v.id, 2).await;
    let s = take_snapshot(&mut c, &v.id, "s").await;
    let files_before = daemon.layer_files();
    let op = start_clone(&mut c, &s.id, "clone", 3).await.unwrap();
    // Killed while the three VMs are built, before they are recorded.
    wait_phase(&mut c, &op, |p| p.starts_with("restoring clone-2")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        daemon.layer_files().len() > files_before.len(),
        "the clones' disk tops were made"
    );
    daemon.kill9();
    let mut c = respawn(&mut daemon, "").await;
    let vms = list_vms(&mut c).await;
    assert_eq!(
        vms.len(),
        1,
        "no clone survives a kill before its commit: {vms:?}"
    );
    let o = wait_op(&mut c, op).await;
    assert_eq!(o.state(), pb::OperationState::Failed, "{o:?}");
    assert_eq!(
        daemon.layer_files(),
        files_before,
        "the clones' files are gone"
    );
    daemon.assert_files_match_catalog("after the restart");

    // The same clone to its end: all three, each exact.
    let op = start_clone(&mut c, &s.id, "clone", 3).await.unwrap();
    let made = succeeded(&mut c, op).await.vms;
    assert_eq!(made.len(), 3);
    daemon.kill9();
    let mut c = respawn(&mut daemon, "").await;
    let vms = list_vms(&mut c).await;
    assert_eq!(vms.len(), 4, "{vms:?}");
    for vm in &made {
        start_vm(&mut c, &vm.id).await;
        continues_exactly(&mut c, &vm.id, &expected, 3).await;
    }
}

/// A data directory whose catalog is missing or emptied while its layer and state files are
/// there: the daemon refuses to start, says what to do, and deletes nothing; with
/// --keep-unknown-files it starts on an empty catalog and keeps the files in lost+found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_catalog_is_damage_not_emptiness() {
    if !kvm_available("a_missing_catalog_is_damage_not_emptiness") {
        return;
    }
    let (mut daemon, mut c) = start("").await;
    let v = create_vm(&mut c, "v", true).await;
    wait_lines(&mut c, &v.id, 2).await;
    take_snapshot(&mut c, &v.id, "s").await;
    daemon.stop();
    let layers = daemon.layer_files();
    let states = daemon.state_files();
    assert!(!layers.is_empty() && !states.is_empty());
    let catalog = daemon.data().join("catalog.db");
    let saved = std::fs::read(&catalog).unwrap();

    for (what, damage) in [("missing", None), ("emptied", Some(Vec::new()))] {
        match &damage {
            None => std::fs::remove_file(&catalog).unwrap(),
            Some(bytes) => std::fs::write(&catalog, bytes).unwrap(),
        }
        let err = daemon.try_start("", &[]).expect_err(what);
        assert!(
            err.contains("catalog.db is missing or empty"),
            "{what}: {err}"
        );
        assert!(
            err.contains("--keep-unknown-files"),
            "{what}: says what to do: {err}"
        );
        assert_eq!(daemon.layer_files(), layers, "{what}: a layer file went");
        assert_eq!(daemon.state_files(), states, "{what}: a state file went");
    }
    // Put back, it starts, and the snapshot is there.
    std::fs::write(&catalog, &saved).unwrap();
    let mut c = respawn(&mut daemon, "").await;
    assert_eq!(snapshot_count(&mut c).await, 1);
    daemon.stop();

    // The operator's way on without the catalog: nothing deleted, all kept aside.
    std::fs::remove_file(&catalog).unwrap();
    daemon
        .try_start("", &["--keep-unknown-files"])
        .expect("--keep-unknown-files starts");
    let mut c = daemon.client().await;
    assert_eq!(snapshot_count(&mut c).await, 0);
    let kept = files_in(&daemon.data().join("lost+found"));
    assert_eq!(kept.len(), layers.len() + states.len(), "{kept:?}");
    assert!(daemon.layer_files().is_empty() && daemon.state_files().is_empty());
}

/// A daemon killed with SIGKILL keeps its last transactions in catalog.db-wal. Without that file
/// (or with it damaged) the catalog has lost committed snapshots: the daemon refuses to start,
/// keeping their files; with the WAL back, every snapshot is there and restores exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_wal_is_detected_and_nothing_is_deleted() {
    if !kvm_available("a_lost_wal_is_detected_and_nothing_is_deleted") {
        return;
    }
    let expected = model(&long_guest());
    let (mut daemon, mut c) = start("").await;
    let v = create_vm_running(&mut c, "v", true, long_guest()).await;
    wait_lines(&mut c, &v.id, 2).await;
    let s = take_snapshot(&mut c, &v.id, "s").await;
    daemon.kill9();
    let wal = daemon.data().join("catalog.db-wal");
    let saved = std::fs::read(&wal).expect("the WAL holds the last transactions");
    let layers = daemon.layer_files();
    std::fs::remove_file(&wal).unwrap();
    let err = daemon
        .try_start("", &[])
        .expect_err("refused without the WAL");
    assert!(
        err.contains("lost") && err.contains("committed transactions"),
        "{err}"
    );
    assert_eq!(daemon.layer_files(), layers, "a file was deleted");

    // A WAL damaged in its first frame (past the 32-byte header and the frame's 24-byte
    // header): SQLite drops that frame and every one after it.
    let mut damaged = saved.clone();
    damaged[32 + 24 + 100] ^= 0xff;
    std::fs::write(&wal, &damaged).unwrap();
    let err = daemon
        .try_start("", &[])
        .expect_err("refused with a damaged WAL");
    assert!(err.contains("committed transactions"), "{err}");
    assert_eq!(daemon.layer_files(), layers, "a file was deleted");

    std::fs::write(&wal, &saved).unwrap();
    let mut c = respawn(&mut daemon, "").await;
    assert_eq!(snapshot_count(&mut c).await, 1);
    let r = restore_new(&mut c, &s.id, "r", pb::MemoryRestoreMode::Eager).await;
    continues_exactly(&mut c, &r.id, &expected, 4).await;
}

/// A daemon killed just after a snapshot's catalog transaction committed, before the operation
/// returned: after the restart the snapshot is there, restores exactly, and its operation says
/// SUCCEEDED with it (the transaction that published it recorded that too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_killed_after_its_commit_is_succeeded() {
    if !kvm_available("an_operation_killed_after_its_commit_is_succeeded") {
        return;
    }
    let expected = model(&long_guest());
    let (mut daemon, mut c) = start("snapshot.after-publish=sleep:5000").await;
    let v = create_vm_running(&mut c, "v", true, long_guest()).await;
    wait_lines(&mut c, &v.id, 2).await;
    let op = start_snapshot(&mut c, &v.id, "s").await.unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while snapshot_count(&mut c).await == 0 {
        assert!(
            Instant::now() < deadline,
            "the snapshot was never published"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    daemon.kill9();
    let mut c = respawn(&mut daemon, "").await;
    let o = wait_op(&mut c, op).await;
    assert_eq!(o.state(), pb::OperationState::Succeeded, "{o:?}");
    let s = o.result.unwrap().snapshot.unwrap();
    assert_eq!(s.name, "s");
    let r = restore_new(&mut c, &s.id, "r", pb::MemoryRestoreMode::Eager).await;
    continues_exactly(&mut c, &r.id, &expected, 3).await;
    daemon.assert_files_match_catalog("after the restart");
}
