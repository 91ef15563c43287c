//! Failures and bad input: nothing half done is ever visible, and the next snapshot is right.

use snap_api::v1 as pb;

use super::common::*;

/// A failed memory write and a failed catalog commit leave no snapshot listed, no file behind
/// and the VM running; the next snapshot restores exactly. A daemon killed with SIGKILL in the
/// middle of a snapshot comes back with no half snapshot and no orphan file, the VM reported
/// stopped, and the next snapshot correct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_leave_no_half_snapshot() {
    if !kvm_available("failures_leave_no_half_snapshot") {
        return;
    }
    let expected = model(&guest());
    let (mut daemon, mut c) = start("snapshot.write-memory=fail:1,snapshot.publish=fail:1").await;
    let vm = create_vm(&mut c, "victim", true).await;
    wait_lines(&mut c, &vm.id, 3).await;

    let layers_before = files_in(&daemon.data().join("layers"));
    for (i, what) in ["snapshot.write-memory", "snapshot.publish"]
        .iter()
        .enumerate()
    {
        let op = start_snapshot(&mut c, &vm.id, &format!("try-{i}"))
            .await
            .unwrap();
        let op = wait_op(&mut c, op).await;
        assert_eq!(op.state(), pb::OperationState::Failed, "{what}: {op:?}");
        let e = op.error.unwrap();
        assert!(e.message.contains(what), "{what}: {e:?}");
        assert_eq!(
            snapshot_count(&mut c).await,
            0,
            "{what}: a failed snapshot is listed"
        );
        // No memory layer is left; the disk keeps every write (the VM resumed before the layer
        // was written and wrote into its new top, which then stays in its chain), and every
        // layer file is one the catalog names.
        let mlayers = |v: Vec<String>| -> Vec<String> {
            v.into_iter().filter(|f| f.ends_with(".mlayer")).collect()
        };
        assert_eq!(
            mlayers(files_in(&daemon.data().join("layers"))),
            mlayers(layers_before.clone()),
            "{what}: a memory layer is left"
        );
        assert_eq!(
            files_in(&daemon.data().join("layers")),
            daemon.catalog_layer_files(),
            "{what}: files the catalog does not name"
        );
        assert!(
            files_in(&daemon.data().join("states")).is_empty(),
            "{what}: files left"
        );
        let v = get_vm(&mut c, &vm.id).await;
        assert!(
            matches!(v.state(), pb::VmState::Running | pb::VmState::Finished),
            "{what}: the VM does not run on: {v:?}"
        );
    }
    // The failed attempts lost no dirty page: this snapshot, a full one, restores exactly; a
    // diff on top of it restores exactly too.
    let (full, cut) = snapshot_at(&mut c, &vm.id, "good", "good").await;
    wait_lines(&mut c, &vm.id, 12).await;
    let (diff, cut2) = snapshot_at(&mut c, &vm.id, "good-diff", "good-diff").await;
    assert_eq!(diff.parent_id, full.id);
    let r = restore_new(&mut c, &full.id, "r1", pb::MemoryRestoreMode::Eager).await;
    assert_eq!(finish(&mut c, &r.id).await, expected[cut..]);
    let r = restore_new(&mut c, &diff.id, "r2", pb::MemoryRestoreMode::Eager).await;
    assert_eq!(finish(&mut c, &r.id).await, expected[cut2..]);

    // kill -9 in the middle of a snapshot (while it sleeps just before publishing).
    let mut c = restart(&mut daemon, "snapshot.before-publish=sleep:5000").await;
    let vm2 = create_vm(&mut c, "killed", true).await;
    wait_lines(&mut c, &vm2.id, 3).await;
    let before = snapshot_count(&mut c).await;
    let layers_before = files_in(&daemon.data().join("layers"));
    let op = start_snapshot(&mut c, &vm2.id, "never").await.unwrap();
    wait_phase(&mut c, &op, |p| p == "publishing").await;
    assert!(
        files_in(&daemon.data().join("layers")).len() > layers_before.len(),
        "the killed snapshot had written its layer"
    );
    daemon.kill9();
    let mut c = respawn(&mut daemon, "").await;
    assert_eq!(
        snapshot_count(&mut c).await,
        before,
        "a half snapshot is listed"
    );
    // The half snapshot's memory layer and the disk top its seal made are gone; every file
    // left is one the catalog names (recovery put a fresh top over the disk layer the dead
    // snapshot had sealed).
    let mlayers = |v: &[String]| -> Vec<String> {
        v.iter()
            .filter(|f| f.ends_with(".mlayer"))
            .cloned()
            .collect()
    };
    let layers_after = files_in(&daemon.data().join("layers"));
    assert_eq!(
        mlayers(&layers_after),
        mlayers(&layers_before),
        "the half snapshot's layer is left"
    );
    assert_eq!(
        layers_after,
        daemon.catalog_layer_files(),
        "files the catalog does not name"
    );
    let o = c
        .get_operation(pb::GetOperationRequest {
            operation_id: op.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(o.state(), pb::OperationState::Failed, "{o:?}");
    let v = get_vm(&mut c, &vm2.id).await;
    assert_eq!(v.state(), pb::VmState::Stopped);
    // It starts again (from the beginning: it has no snapshot) and snapshots correctly.
    start_vm(&mut c, &vm2.id).await;
    wait_lines(&mut c, &vm2.id, 4).await;
    let (s, cut) = snapshot_at(&mut c, &vm2.id, "after-kill", "after-kill").await;
    let r = restore_new(&mut c, &s.id, "r3", pb::MemoryRestoreMode::Lazy).await;
    assert_eq!(finish(&mut c, &r.id).await, expected[cut..]);
}

/// Unknown ids, bad names, impossible sizes and corrupt snapshot files get the right code and a
/// message that says what to fix, and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_clearly() {
    if !kvm_available("bad_input_is_refused_clearly") {
        return;
    }
    let (daemon, mut c) = start("").await;
    let unknown = "0123456789abcdef0123456789abcdef".to_string();
    let e = c
        .get_vm(pb::GetVmRequest {
            vm_id: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains(&unknown), "{e}");
    let e = c
        .get_vm(pb::GetVmRequest {
            vm_id: "../etc".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("vm_id"), "{e}");
    let e = start_snapshot(&mut c, &unknown, "s").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    let base = pb::CreateVmRequest {
        request_id: rid("bad"),
        name: "ok".into(),
        memory_bytes: 32 << 20,
        vcpus: 1,
        guest: Some(guest()),
        disks: vec![pb::DiskSpec {
            name: "root".into(),
            size_bytes: 1 << 20,
            image_path: String::new(),
        }],
        ..Default::default()
    };
    let cases: Vec<(pb::CreateVmRequest, Code, &str)> = vec![
        (
            pb::CreateVmRequest {
                name: "a/b".into(),
                ..base.clone()
            },
            Code::InvalidArgument,
            "name",
        ),
        (
            pb::CreateVmRequest {
                name: "x".repeat(64),
                ..base.clone()
            },
            Code::InvalidArgument,
            "at most 63",
        ),
        (
            pb::CreateVmRequest {
                name: String::new(),
                ..base.clone()
            },
            Code::InvalidArgument,
            "name",
        ),
        (
            pb::CreateVmRequest {
                memory_bytes: 0,
                ..base.clone()
            },
            Code::InvalidArgument,
            "memory_bytes",
        ),
        (
            pb::CreateVmRequest {
                memory_bytes: (32 << 20) + 1,
                ..base.clone()
            },
            Code::InvalidArgument,
            "multiple",
        ),
        (
            pb::CreateVmRequest {
                memory_bytes: 1 << 50,
                ..base.clone()
            },
            Code::ResourceExhausted,
            "RAM",
        ),
        (
            pb::CreateVmRequest {
                vcpus: 0,
                ..base.clone()
            },
            Code::InvalidArgument,
            "vcpus",
        ),
        (
            pb::CreateVmRequest {
                vcpus: 1000,
                ..base.clone()
            },
            Code::InvalidArgument,
            "vCPU",
        ),
        (
            pb::CreateVmRequest {
                request_id: String::new(),
                ..base.clone()
            },
            Code::InvalidArgument,
            "request_id",
        ),
    ];
    for (req, code, what) in cases {
        let e = c.create_vm(req.clone()).await.unwrap_err();
        assert_eq!(e.code(), code, "{req:?}: {e}");
        assert!(e.message().contains(what), "{req:?}: {e}");
        // Every message about a field starts with its name.
        let field = ["name", "memory_bytes", "vcpus", "request_id"]
            .into_iter()
            .find(|f| e.message().starts_with(&format!("{f}: ")));
        assert!(field.is_some(), "the message names no field first: {e}");
    }
    assert!(list_vms(&mut c).await.is_empty());

    // A name in use.
    let vm = create_vm(&mut c, "taken", true).await;
    let e = c
        .create_vm(pb::CreateVmRequest {
            request_id: rid("dup"),
            name: "taken".into(),
            ..base.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e}");

    // A snapshot whose state file is damaged cannot be restored, and nothing is created.
    wait_lines(&mut c, &vm.id, 3).await;
    let (s, _) = snapshot_at(&mut c, &vm.id, "s", "s").await;
    let state = daemon.data().join(format!("states/{}.state", s.id));
    let mut bytes = std::fs::read(&state).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(&state, &bytes).unwrap();
    let op = c
        .restore_snapshot(pb::RestoreSnapshotRequest {
            request_id: rid("restore-corrupt"),
            snapshot_id: s.id.clone(),
            target: Some(pb::restore_snapshot_request::Target::NewVm(pb::NewVm {
                name: "never".into(),
                ..Default::default()
            })),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let op = wait_op(&mut c, op).await;
    assert_eq!(op.state(), pb::OperationState::Failed);
    let err = op.error.unwrap();
    assert_eq!(err.code, Code::FailedPrecondition as i32, "{err:?}");
    assert!(
        err.message.contains("cannot be restored") && err.message.contains("checksum"),
        "{err:?}"
    );
    let vms = list_vms(&mut c).await;
    assert_eq!(vms.len(), 1, "a VM was created from a corrupt snapshot");

    // A damaged memory layer: the revert is refused and the VM runs on as before.
    std::fs::write(&state, {
        bytes[n / 2] ^= 0xff;
        &bytes
    })
    .unwrap();
    let layer = daemon.data().join(format!("layers/{}.mlayer", s.id));
    let mut lbytes = std::fs::read(&layer).unwrap();
    let at = lbytes.len() / 2;
    lbytes[at] ^= 0xff;
    std::fs::write(&layer, &lbytes).unwrap();
    let op = start_revert(&mut c, &s.id, &vm.id, false).await;
    let op = wait_op(&mut c, op).await;
    assert_eq!(op.state(), pb::OperationState::Failed, "{op:?}");
    // An eager restore of it into a new VM meets the damaged frame and creates nothing.
    let op = c
        .restore_snapshot(pb::RestoreSnapshotRequest {
            request_id: rid("restore-damaged-layer"),
            snapshot_id: s.id.clone(),
            target: Some(pb::restore_snapshot_request::Target::NewVm(pb::NewVm {
                name: "never-either".into(),
                ..Default::default()
            })),
            memory_mode: pb::MemoryRestoreMode::Eager as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let op = wait_op(&mut c, op).await;
    assert_eq!(op.state(), pb::OperationState::Failed, "{op:?}");
    let err = op.error.unwrap();
    assert_eq!(err.code, Code::FailedPrecondition as i32, "{err:?}");
    assert!(err.message.contains("cannot be restored"), "{err:?}");
    let vms = list_vms(&mut c).await;
    assert_eq!(vms.len(), 1, "a VM was created from a damaged layer");
    let expected = model(&guest());
    assert_eq!(
        finish(&mut c, &vm.id).await,
        expected,
        "the VM did not run on as before"
    );

    // Clone counts, restore targets.
    let e = c
        .clone_snapshot(pb::CloneSnapshotRequest {
            request_id: rid("clone"),
            snapshot_id: s.id.clone(),
            count: 0,
            name_prefix: "c".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let e = c
        .restore_snapshot(pb::RestoreSnapshotRequest {
            request_id: rid("no-target"),
            snapshot_id: s.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("target"), "{e}");
}
