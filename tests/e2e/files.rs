//! Files do not pile up while the daemon runs: what an operation frees goes when it ends, and a
//! working set recorded by a restore of a snapshot deleted meanwhile goes as its recording ends;
//! never only at the next start.

use std::time::{Duration, Instant};

use snap_api::v1 as pb;

use super::common::*;

/// A mixed run of snapshots, lazy and prefetch restores, clones, reverts and deletes, then
/// everything deleted: no layer, state or working-set file is left, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_left_once_everything_is_deleted() {
    if !kvm_available("nothing_is_left_once_everything_is_deleted") {
        return;
    }
    let (daemon, mut c) = start("").await;
    let v = create_vm_running(&mut c, "v", true, long_guest()).await;
    wait_lines(&mut c, &v.id, 2).await;
    let mut vms = vec![v.id.clone()];
    for round in 0..3 {
        let a = take_snapshot(&mut c, &v.id, &format!("a{round}")).await;
        let b = take_snapshot(&mut c, &v.id, &format!("b{round}")).await;
        for (i, mode) in [pb::MemoryRestoreMode::Prefetch, pb::MemoryRestoreMode::Lazy]
            .into_iter()
            .enumerate()
        {
            let r = restore_new(&mut c, &b.id, &format!("r{round}-{i}"), mode).await;
            vms.push(r.id);
        }
        let op = start_clone(&mut c, &a.id, &format!("c{round}"), 2)
            .await
            .unwrap();
        vms.extend(succeeded(&mut c, op).await.vms.into_iter().map(|v| v.id));
        let op = start_revert(&mut c, &a.id, &v.id, false).await;
        succeeded(&mut c, op).await;
        // Deleting b while its prefetch restore may still record b's working set.
        delete_snapshot(&mut c, &b.id).await;
        daemon.assert_files_match_catalog(&format!("round {round}"));
    }
    for vm in &vms {
        stop(&mut c, vm).await;
        delete_vm(&mut c, vm, true).await;
    }
    assert_eq!(snapshot_count(&mut c).await, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(daemon.layer_files().is_empty() && daemon.state_files().is_empty()) {
        assert!(
            Instant::now() < deadline,
            "files left with nothing in the catalog: {:?} {:?}",
            daemon.layer_files(),
            daemon.state_files()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
