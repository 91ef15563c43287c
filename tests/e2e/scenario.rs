//! The life of snapshots through the API: snapshot, revert, restore, clone, delete, restart;
//! the tree, listing, labels, cancel and events; merges on delete; disks from images.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use snap_api::v1 as pb;

use super::common::*;

/// Snapshot A, run, snapshot B, revert to A, restore B into a new VM, clone A three times,
/// delete A (B and the clones still restore exactly, A's state is freed), restart the daemon
/// (the tree is intact, the finished VM still finished), and a retried request id creates one
/// snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_revert_restore_clone_delete_restart() {
    if !kvm_available("snapshot_revert_restore_clone_delete_restart") {
        return;
    }
    let expected = model(&guest());
    let (mut daemon, mut c) = start("").await;
    let vm = create_vm(&mut c, "origin", true).await;
    assert_eq!(vm.state(), pb::VmState::Running);

    wait_lines(&mut c, &vm.id, 5).await;
    let (a, cut_a) = snapshot_at(&mut c, &vm.id, "a", "snap-a").await;
    assert!(a.parent_id.is_empty(), "A is a root");
    assert!(a.pause_us > 0 && a.stored_bytes > 0, "{a:?}");
    wait_lines(&mut c, &vm.id, 15).await;
    let (b, cut_b) = snapshot_at(&mut c, &vm.id, "b", "snap-b").await;
    assert_eq!(b.parent_id, a.id, "B's parent is A");
    let layer = |s: &pb::Snapshot| {
        *snap_mem::layer::Layer::open(daemon.data().join(format!("layers/{}.mlayer", s.id)))
            .unwrap()
            .info()
    };
    let (la, lb) = (layer(&a), layer(&b));
    assert_eq!(
        lb.parent.map(|p| p.id),
        Some(la.id),
        "B's memory layer is a diff over A's"
    );

    assert_eq!(finish(&mut c, &vm.id).await, expected);
    assert!(
        cut_a < cut_b && cut_b < expected.len(),
        "snapshots mid-run: {cut_a} {cut_b}"
    );

    // The same request id again: the first answer, no second snapshot.
    let again = c
        .create_snapshot(pb::CreateSnapshotRequest {
            request_id: "snap-b".into(),
            vm_id: vm.id.clone(),
            name: "b".into(),
            leave_paused: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.result.unwrap().snapshot.unwrap().id, b.id);
    let listed = c
        .list_snapshots(pb::ListSnapshotsRequest {
            vm_id: vm.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    assert_eq!(listed.len(), 2, "{listed:?}");
    // The same request id for a different request is refused.
    let e = c
        .create_snapshot(pb::CreateSnapshotRequest {
            request_id: "snap-b".into(),
            vm_id: vm.id.clone(),
            name: "other".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e}");

    // Revert the finished VM to A: the lines after A repeat, on a console that starts afresh.
    let op = start_revert(&mut c, &a.id, &vm.id, true).await;
    succeeded(&mut c, op).await;
    let mark = console(&mut c, &vm.id).await.len();
    assert_eq!(mark, 0, "a revert starts the console afresh");
    resume(&mut c, &vm.id).await;
    let out = finish(&mut c, &vm.id).await;
    assert_eq!(out[mark..], expected[cut_a..], "revert to A");
    let tree = c
        .get_snapshot_tree(pb::GetSnapshotTreeRequest {
            vm_id: vm.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tree.current_snapshot_id, a.id);
    assert_eq!(tree.root_ids, vec![a.id.clone()]);

    // B into a new VM, lazily.
    let vb = restore_new(&mut c, &b.id, "from-b", pb::MemoryRestoreMode::Lazy).await;
    assert_eq!(finish(&mut c, &vb.id).await, expected[cut_b..], "restore B");

    // Three clones of A, at once.
    let op = c
        .clone_snapshot(pb::CloneSnapshotRequest {
            request_id: rid("clone"),
            snapshot_id: a.id.clone(),
            count: 3,
            name_prefix: "clone".into(),
            memory_mode: pb::MemoryRestoreMode::Prefetch as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let clones = succeeded(&mut c, op).await.vms;
    assert_eq!(clones.len(), 3);
    for v in &clones {
        assert_eq!(
            finish(&mut c, &v.id).await,
            expected[cut_a..],
            "clone {}",
            v.name
        );
    }

    // Delete A: B and A's clones still restore exactly; A's own files go.
    let before = daemon.stored_bytes();
    let op = c
        .delete_snapshot(pb::DeleteSnapshotRequest {
            wait: false,
            request_id: rid("delete"),
            snapshot_id: a.id.clone(),
            with_descendants: false,
        })
        .await
        .unwrap()
        .into_inner();
    let r = succeeded(&mut c, op).await;
    assert_eq!(r.deleted_snapshot_ids, vec![a.id.clone()]);
    let after = daemon.stored_bytes();
    assert!(r.freed_bytes > 0, "{r:?}");
    assert_eq!(
        before - after,
        r.freed_bytes,
        "freed bytes are what left the disk"
    );
    let e = c
        .get_snapshot(pb::GetSnapshotRequest {
            snapshot_id: a.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let b_now = c
        .get_snapshot(pb::GetSnapshotRequest {
            snapshot_id: b.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(b_now.parent_id.is_empty(), "B became a root: {b_now:?}");
    let vb2 = restore_new(&mut c, &b.id, "from-b-again", pb::MemoryRestoreMode::Eager).await;
    assert_eq!(
        finish(&mut c, &vb2.id).await,
        expected[cut_b..],
        "B after deleting A"
    );
    // A clone (based on A's layers) snapshots and restores exactly too.
    let clone = &clones[0];
    let op = start_revert(&mut c, &b.id, &clone.id, false).await;
    succeeded(&mut c, op).await;

    // Restart: the tree is intact.
    let snaps_before = c
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    let mut c = restart(&mut daemon, "").await;
    let snaps_after = c
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    assert_eq!(snaps_before, snaps_after);
    // The VM had finished (after its revert to A): it still has.
    let v = get_vm(&mut c, &vm.id).await;
    assert_eq!(v.state(), pb::VmState::Finished);
    let vb3 = restore_new(&mut c, &b.id, "after-restart", pb::MemoryRestoreMode::Lazy).await;
    assert_eq!(
        finish(&mut c, &vb3.id).await,
        expected[cut_b..],
        "B after restart"
    );
}

/// The tree, listing with filters and pages, labels, a delete with descendants, a cancelled
/// snapshot (nothing published, the VM runs on), and the event stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tree_listing_labels_cancel_and_events() {
    if !kvm_available("tree_listing_labels_cancel_and_events") {
        return;
    }
    use tokio_stream::StreamExt;
    // Writing memory waits a moment, so that a cancel can land before the point of no return.
    let (_daemon, mut c) = start("snapshot.write-memory=sleep:300").await;
    let mut events = c
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let vm = create_vm(&mut c, "tree", true).await;
    let first = events.next().await.unwrap().unwrap();
    assert!(
        matches!(&first.kind, Some(pb::event::Kind::Vm(v)) if v.id == vm.id),
        "{first:?}"
    );

    // root -> mid -> leaf, and root -> side (after a revert to root).
    let (root, _) = snapshot_at(&mut c, &vm.id, "root", "root").await;
    let (mid, _) = snapshot_at(&mut c, &vm.id, "mid", "mid").await;
    let (leaf, _) = snapshot_at(&mut c, &vm.id, "leaf", "leaf").await;
    let op = start_revert(&mut c, &root.id, &vm.id, false).await;
    succeeded(&mut c, op).await;
    let (side, _) = snapshot_at(&mut c, &vm.id, "side", "side").await;
    assert_eq!(side.parent_id, root.id, "a branch after the revert");
    let tree = c
        .get_snapshot_tree(pb::GetSnapshotTreeRequest {
            vm_id: vm.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tree.root_ids, vec![root.id.clone()]);
    assert_eq!(tree.current_snapshot_id, side.id);
    let children = |id: &str| -> Vec<String> {
        let mut v = tree
            .nodes
            .iter()
            .find(|n| n.snapshot.as_ref().unwrap().id == id)
            .unwrap()
            .child_ids
            .clone();
        v.sort();
        v
    };
    let mut want = vec![mid.id.clone(), side.id.clone()];
    want.sort();
    assert_eq!(children(&root.id), want);
    assert_eq!(children(&mid.id), vec![leaf.id.clone()]);

    // Labels, filters, pages.
    let s = c
        .update_snapshot_labels(pb::UpdateSnapshotLabelsRequest {
            request_id: rid("label"),
            snapshot_id: mid.id.clone(),
            set: [("keep".to_string(), "yes".to_string())].into(),
            remove: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.labels.get("keep").map(String::as_str), Some("yes"));
    let labelled = c
        .list_snapshots(pb::ListSnapshotsRequest {
            labels: [("keep".to_string(), "yes".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    assert_eq!(
        labelled.iter().map(|s| &s.id).collect::<Vec<_>>(),
        vec![&mid.id]
    );
    let kids = c
        .list_snapshots(pb::ListSnapshotsRequest {
            parent_id: root.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    assert_eq!(kids.len(), 2);
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_snapshots(pb::ListSnapshotsRequest {
                page_size: 3,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.snapshots.len() <= 3);
        seen.extend(page.snapshots.into_iter().map(|s| s.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 4, "pages cover every snapshot once: {seen:?}");

    // Delete mid with its descendants: leaf goes too; root and side stay.
    let op = c
        .delete_snapshot(pb::DeleteSnapshotRequest {
            wait: false,
            request_id: rid("del"),
            snapshot_id: mid.id.clone(),
            with_descendants: true,
        })
        .await
        .unwrap()
        .into_inner();
    let r = succeeded(&mut c, op).await;
    let mut deleted = r.deleted_snapshot_ids.clone();
    deleted.sort();
    let mut want = vec![mid.id.clone(), leaf.id.clone()];
    want.sort();
    assert_eq!(deleted, want);
    assert_eq!(snapshot_count(&mut c).await, 2);

    // A cancelled snapshot publishes nothing and the VM runs on.
    let op = start_snapshot(&mut c, &vm.id, "cancelled").await.unwrap();
    let cancelled = c
        .cancel_operation(pb::CancelOperationRequest {
            operation_id: op.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(cancelled.cancellable);
    let op = wait_op(&mut c, op).await;
    assert_eq!(op.state(), pb::OperationState::Cancelled, "{op:?}");
    assert_eq!(snapshot_count(&mut c).await, 2);
    let v = get_vm(&mut c, &vm.id).await;
    assert!(
        matches!(v.state(), pb::VmState::Running | pb::VmState::Finished),
        "{v:?}"
    );
    // An ended operation cannot be cancelled.
    let e = c
        .cancel_operation(pb::CancelOperationRequest {
            operation_id: op.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");

    // The stream saw the snapshots and operations go by.
    let mut created = 0;
    while let Ok(Some(Ok(e))) =
        tokio::time::timeout(Duration::from_millis(200), events.next()).await
    {
        if matches!(e.kind, Some(pb::event::Kind::SnapshotCreated(_))) {
            created += 1;
        }
    }
    assert_eq!(created, 4, "snapshot events");
}

/// Deleting a snapshot whose memory layer only its child builds on merges the layer into the
/// child's: the pages the child overrides are freed, and the child, and the running VM based on
/// it, restore and snapshot exactly afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_parent_merges_it_into_its_only_child() {
    if !kvm_available("deleting_a_parent_merges_it_into_its_only_child") {
        return;
    }
    let expected = model(&guest());
    let (daemon, mut c) = start("").await;
    let vm = create_vm(&mut c, "merge", true).await;
    wait_lines(&mut c, &vm.id, 4).await;
    let (a, _) = snapshot_at(&mut c, &vm.id, "a", "a").await;
    wait_lines(&mut c, &vm.id, 15).await;
    // B, and the VM stays paused (based on B) while A goes.
    let op = c
        .create_snapshot(pb::CreateSnapshotRequest {
            request_id: "b".into(),
            vm_id: vm.id.clone(),
            name: "b".into(),
            leave_paused: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let b = succeeded(&mut c, op).await.snapshot.unwrap();
    let cut_b = console(&mut c, &vm.id).await.len();
    let mlayers = || -> Vec<String> {
        files_in(&daemon.data().join("layers"))
            .into_iter()
            .filter(|f| f.ends_with(".mlayer"))
            .collect()
    };
    assert_eq!(mlayers().len(), 2);
    let state_a = std::fs::metadata(daemon.data().join(format!("states/{}.state", a.id)))
        .unwrap()
        .len();
    let op = c
        .delete_snapshot(pb::DeleteSnapshotRequest {
            wait: false,
            request_id: rid("del-a"),
            snapshot_id: a.id.clone(),
            with_descendants: false,
        })
        .await
        .unwrap()
        .into_inner();
    let r = succeeded(&mut c, op).await;
    assert_eq!(mlayers().len(), 1, "A's layer was merged into B's");
    assert!(r.freed_bytes > state_a, "the merge freed pages too: {r:?}");
    let merged =
        snap_mem::layer::Layer::open(daemon.data().join("layers").join(&mlayers()[0])).unwrap();
    assert!(merged.info().parent.is_none(), "B's layer is now a root");

    // The VM runs on from B and takes a diff over the merged layer.
    resume(&mut c, &vm.id).await;
    wait_lines(&mut c, &vm.id, 30).await;
    let (d, cut_d) = snapshot_at(&mut c, &vm.id, "d", "d").await;
    assert_eq!(d.parent_id, b.id);
    assert!(cut_d < expected.len(), "D is mid-run");
    assert_eq!(finish(&mut c, &vm.id).await, expected);
    let rb = restore_new(&mut c, &b.id, "from-b", pb::MemoryRestoreMode::Lazy).await;
    assert_eq!(finish(&mut c, &rb.id).await, expected[cut_b..]);
    let rd = restore_new(&mut c, &d.id, "from-d", pb::MemoryRestoreMode::Eager).await;
    assert_eq!(finish(&mut c, &rd.id).await, expected[cut_d..]);

    // A snapshot of the finished guest restores as finished: it does not run past its end.
    let (done, _) = snapshot_at(&mut c, &vm.id, "done", "done").await;
    let rf = restore_new(&mut c, &done.id, "from-done", pb::MemoryRestoreMode::Eager).await;
    assert_eq!(rf.state(), pb::VmState::Finished, "{rf:?}");
    assert_eq!(console(&mut c, &rf.id).await, "");
}

/// A disk can start from a raw image on the daemon's host (imported as the disk's sealed base),
/// from the directories the operator allowed only: a path outside them, a symlink out of them,
/// a FIFO, a device, a directory and an image over the size limit are each refused with a
/// message naming the field that says nothing about paths outside, and nothing is left behind;
/// a size that disagrees with the image is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disks_from_raw_images() {
    if !kvm_available("disks_from_raw_images") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let images = root.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let image = images.join("base.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    // Outside: a root-only file, and a symlink to it from inside.
    let secret = root.path().join("secret");
    std::fs::write(&secret, vec![7u8; 4096]).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink(&secret, images.join("escape.img")).unwrap();
    let special = |name: &str, mode: libc::mode_t, dev: libc::dev_t| {
        let c = std::ffi::CString::new(images.join(name).to_str().unwrap()).unwrap();
        // SAFETY: mknod of a NUL-terminated path (the test runs as root for KVM).
        assert_eq!(unsafe { libc::mknod(c.as_ptr(), mode | 0o600, dev) }, 0);
    };
    special("fifo.img", libc::S_IFIFO, 0);
    special("null.img", libc::S_IFCHR, libc::makedev(1, 3));
    std::fs::create_dir(images.join("dir.img")).unwrap();
    // Sparse, over the 1 GiB limit: refused without a byte read.
    std::fs::File::create(images.join("huge.img"))
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    let (daemon, mut c) = start_with(
        "",
        &[
            "--image-dir",
            images.to_str().unwrap(),
            "--max-image-gib",
            "1",
        ],
    )
    .await;
    let request = |name: &str, disk: pb::DiskSpec| pb::CreateVmRequest {
        request_id: rid("img"),
        name: name.into(),
        memory_bytes: 32 << 20,
        vcpus: 1,
        guest: Some(guest()),
        start: true,
        disks: vec![disk],
        ..Default::default()
    };
    let from = |path: &std::path::Path| pb::DiskSpec {
        name: "root".into(),
        size_bytes: 0,
        image_path: path.to_str().unwrap().into(),
    };
    let vm = c
        .create_vm(request("imaged", from(&image)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vm.disks[0].size_bytes, 1 << 20);
    assert_eq!(
        vm.disks[0].layer_ids.len(),
        2,
        "the imported base and the VM's top"
    );
    assert_eq!(finish(&mut c, &vm.id).await, model(&guest()));

    let outside = "not under a directory this daemon imports images from";
    let cases = [
        (from(std::path::Path::new("relative.img")), "absolute"),
        (from(&secret), outside),
        (from(std::path::Path::new("/etc/shadow")), outside),
        (from(std::path::Path::new("/nonexistent/base.img")), outside),
        (from(std::path::Path::new("/proc/self/environ")), outside),
        (from(&images.join("../secret")), ".."),
        (
            from(&images.join("escape.img")),
            "leads out of the image directory",
        ),
        (
            from(&images.join("fifo.img")),
            "is a FIFO, not a regular file",
        ),
        (from(&images.join("null.img")), "is a character device"),
        (from(&images.join("dir.img")), "is a directory"),
        (from(&images.join("missing.img")), "no such file"),
        (
            from(&images.join("huge.img")),
            "2147483648 bytes, more than the 1073741824",
        ),
        (
            pb::DiskSpec {
                size_bytes: 2 << 20,
                ..from(&image)
            },
            "the image holds",
        ),
        (
            pb::DiskSpec {
                name: "root".into(),
                size_bytes: 1000,
                image_path: String::new(),
            },
            "multiple of 512",
        ),
    ];
    for (disk, what) in cases {
        let e = c.create_vm(request("refused", disk)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        assert!(e.message().starts_with("disks"), "names the field: {e}");
        assert!(e.message().contains(what), "{what}: {e}");
        if what == outside {
            // Nothing about the file: not its size, kind or existence.
            assert!(
                !e.message().contains("bytes") && !e.message().contains("no such"),
                "{e}"
            );
        }
    }
    // A FIFO no one writes to never wedges the daemon: many at once are all refused at once.
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let mut c = c.clone();
        let r = request("fifo", from(&images.join("fifo.img")));
        calls.spawn(async move { c.create_vm(r).await.unwrap_err().code() });
    }
    while let Some(code) = calls.join_next().await {
        assert_eq!(code.unwrap(), Code::InvalidArgument);
    }
    assert_eq!(list_vms(&mut c).await.len(), 1);
    assert_eq!(
        files_in(&daemon.data().join("layers")),
        daemon.catalog_layer_files(),
        "no file left"
    );
}

/// An image import stops when its caller gives up (here its deadline passes): no VM is made
/// and no file is left; a retry with more time makes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_import_ends_with_its_callers_deadline() {
    if !kvm_available("an_image_import_ends_with_its_callers_deadline") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    // 2 GiB of data (not a hole: a hole reads fast).
    let image = root.path().join("big.img");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&image).unwrap());
        let block = vec![1u8; 1 << 20];
        for _ in 0..(2 << 10) {
            f.write_all(&block).unwrap();
        }
    }
    let (daemon, mut c) = start_with("", &["--image-dir", root.path().to_str().unwrap()]).await;
    let mut r = tonic::Request::new(pb::CreateVmRequest {
        request_id: rid("big"),
        name: "big".into(),
        memory_bytes: 32 << 20,
        vcpus: 1,
        guest: Some(guest()),
        disks: vec![pb::DiskSpec {
            name: "root".into(),
            size_bytes: 0,
            image_path: image.to_str().unwrap().into(),
        }],
        ..Default::default()
    });
    r.set_timeout(std::time::Duration::from_millis(200));
    let e = c.create_vm(r).await.unwrap_err();
    // Whichever side noticed first: the client's own timer, or the daemon's.
    assert!(
        matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{e}"
    );
    // The import stops within a few of its checks (the daemon says so), and its file goes.
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !daemon
        .log()
        .contains("the caller gave up before the answer")
    {
        assert!(std::time::Instant::now() < deadline, "{}", daemon.log());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        daemon.log().contains("stopped, the caller gave up"),
        "{}",
        daemon.log()
    );
    assert_eq!(
        files_in(&daemon.data().join("layers")),
        daemon.catalog_layer_files(),
        "no file left"
    );
    assert!(list_vms(&mut c).await.is_empty(), "no VM was made");
}

/// A stopped VM whose current snapshot was deleted starts from the nearest surviving ancestor
/// (or from the beginning if none is left), and its next snapshot builds on what it runs from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_whose_snapshot_was_deleted_starts_and_snapshots_again() {
    if !kvm_available("a_vm_whose_snapshot_was_deleted_starts_and_snapshots_again") {
        return;
    }
    let expected = model(&long_guest());
    let (_daemon, mut c) = start("").await;
    let v = create_vm_running(&mut c, "v", true, long_guest()).await;
    wait_lines(&mut c, &v.id, 2).await;
    let a = take_snapshot(&mut c, &v.id, "a").await;
    wait_lines(&mut c, &v.id, 4).await;
    let b = take_snapshot(&mut c, &v.id, "b").await;

    // b goes: the VM is based on a now, and starts from it.
    delete_snapshot(&mut c, &b.id).await;
    stop(&mut c, &v.id).await;
    let started = start_vm(&mut c, &v.id).await;
    assert_eq!(started.current_snapshot_id, a.id);
    let c1 = take_snapshot(&mut c, &v.id, "c1").await;
    assert_eq!(c1.parent_id, a.id);
    let r = restore_new(&mut c, &c1.id, "from-c1", pb::MemoryRestoreMode::Eager).await;
    continues_exactly(&mut c, &r.id, &expected, 3).await;

    // Every snapshot goes: the VM starts from the beginning, and its next snapshot is a root.
    for s in [&a, &c1] {
        delete_snapshot(&mut c, &s.id).await;
    }
    stop(&mut c, &v.id).await;
    let started = start_vm(&mut c, &v.id).await;
    assert!(started.current_snapshot_id.is_empty(), "{started:?}");
    wait_lines(&mut c, &v.id, 2).await;
    let d = take_snapshot(&mut c, &v.id, "d").await;
    assert!(d.parent_id.is_empty(), "{d:?}");
    let r = restore_new(&mut c, &d.id, "from-d", pb::MemoryRestoreMode::Lazy).await;
    continues_exactly(&mut c, &r.id, &expected, 3).await;
}

/// Across a restart a VM keeps CREATED, FINISHED or FAILED, and a running or paused one is
/// STOPPED; StartVm runs a created one from the beginning, exactly as a first start would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_states_across_a_restart() {
    if !kvm_available("vm_states_across_a_restart") {
        return;
    }
    let (mut daemon, mut c) = start("").await;
    let created = create_vm(&mut c, "created", false).await;
    let short = pb::GuestProgram {
        ticks: 5,
        ..guest()
    };
    let finished = create_vm_running(&mut c, "finished", true, short).await;
    assert_eq!(finish(&mut c, &finished.id).await, model(&short));
    let running = create_vm_running(&mut c, "running", true, long_guest()).await;
    let paused = create_vm_running(&mut c, "paused", true, long_guest()).await;
    pause(&mut c, &paused.id).await;

    let mut c = restart(&mut daemon, "").await;
    for (vm, state) in [
        (&created, pb::VmState::Created),
        (&finished, pb::VmState::Finished),
        (&running, pb::VmState::Stopped),
        (&paused, pb::VmState::Stopped),
    ] {
        assert_eq!(get_vm(&mut c, &vm.id).await.state(), state, "{}", vm.name);
    }
    start_vm(&mut c, &created.id).await;
    assert_eq!(finish(&mut c, &created.id).await, model(&guest()));
}
