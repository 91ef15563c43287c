//! End-to-end tests of snapd: the real daemon binary on a temporary socket, driven through the
//! generated client, running real KVM VMs. Every guest runs the test program, whose output the
//! host-side model predicts exactly, so "continues exactly" is checked byte for byte.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use snap_api::v1 as pb;
use snap_api::v1::snapd_client::SnapdClient;
use snap_vmm::TestGuest;
use tonic::Code;
use tonic::transport::Channel;

const TIMEOUT: Duration = Duration::from_secs(120);

fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("SNAP_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("{test}: SNAP_REQUIRE_KVM=1 but /dev/kvm cannot be opened: {e}");
            }
            println!("SKIP {test}: /dev/kvm cannot be opened: {e}");
            false
        }
    }
}

/// A snapd process on a data directory of its own.
struct Snapd {
    child: Option<Child>,
    data: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Snapd {
    async fn start(failpoints: &str) -> (Self, SnapdClient<Channel>) {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let mut d = Self {
            child: None,
            data,
            _dir: Some(dir),
        };
        let client = d.spawn(failpoints).await;
        (d, client)
    }

    fn socket(&self) -> PathBuf {
        self.data.join("snapd.sock")
    }

    async fn spawn(&mut self, failpoints: &str) -> SnapdClient<Channel> {
        let child = Command::new(env!("CARGO_BIN_EXE_snapd"))
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--frame-kib")
            .arg("64")
            .env("SNAPD_FAILPOINTS", failpoints)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("starting snapd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut c) = snapd::client::connect(self.socket().to_str().unwrap()).await {
                if c.list_vms(pb::ListVmsRequest::default()).await.is_ok() {
                    return c;
                }
            }
            assert!(Instant::now() < deadline, "snapd did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the daemon with SIGKILL (no cleanup of any kind).
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Stops the daemon with SIGTERM and waits for it.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: sending a signal to our own child process.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while c.try_wait().unwrap().is_none() {
                assert!(Instant::now() < deadline, "snapd did not stop on SIGTERM");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    async fn restart(&mut self, failpoints: &str) -> SnapdClient<Channel> {
        self.stop();
        self.spawn(failpoints).await
    }

    /// Bytes of every file under the data directory's layers and states.
    fn stored_bytes(&self) -> u64 {
        dir_bytes(&self.data.join("layers")) + dir_bytes(&self.data.join("states"))
    }
}

impl Drop for Snapd {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.metadata().map_or(0, |m| m.len()))
                .sum()
        })
        .unwrap_or(0)
}

/// The layer files the daemon's catalog names (read while it runs: WAL allows readers).
fn catalog_files(daemon: &Snapd) -> Vec<String> {
    let catalog = snapd::catalog::Catalog::open(&daemon.data.join("catalog.db")).unwrap();
    let mut named: Vec<String> = catalog
        .layers()
        .unwrap()
        .into_iter()
        .map(|l| l.file.trim_start_matches("layers/").to_string())
        .collect();
    named.sort();
    named
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The guest every test VM runs: 120 ticks, about a second of guest time here (long enough that
/// snapshots land mid-run), writing 4 sectors of its 1 MiB disk per tick and reading two back:
/// each output line carries a hash of what it wrote and read, so equal output means equal
/// disks too.
fn guest() -> pb::GuestProgram {
    pb::GuestProgram {
        seed: 0x5eed,
        working_set_pages: 512,
        mutations_per_tick: 24,
        ticks: 120,
        disk_sectors_per_tick: 4,
    }
}

fn model(g: &pb::GuestProgram) -> String {
    TestGuest {
        seed: g.seed,
        working_set_pages: g.working_set_pages,
        mutations_per_tick: g.mutations_per_tick,
        ticks: g.ticks,
        disk_blocks_per_tick: g.disk_sectors_per_tick,
        ..TestGuest::default()
    }
    .model(1)
    .output
}

fn rid(tag: &str) -> String {
    format!("{tag}-{}", snap_core::Id::random())
}

async fn create_vm(c: &mut SnapdClient<Channel>, name: &str, start: bool) -> pb::Vm {
    create_vm_running(c, name, start, guest()).await
}

async fn create_vm_running(
    c: &mut SnapdClient<Channel>,
    name: &str,
    start: bool,
    program: pb::GuestProgram,
) -> pb::Vm {
    c.create_vm(pb::CreateVmRequest {
        request_id: rid("create"),
        name: name.into(),
        memory_bytes: 32 << 20,
        vcpus: 1,
        guest: Some(program),
        start,
        disks: vec![pb::DiskSpec {
            name: "root".into(),
            size_bytes: 1 << 20,
            image_path: String::new(),
        }],
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

async fn console(c: &mut SnapdClient<Channel>, vm: &str) -> String {
    let r = c
        .get_vm_console(pb::GetVmConsoleRequest {
            vm_id: vm.into(),
            offset: 0,
        })
        .await
        .unwrap()
        .into_inner();
    String::from_utf8(r.data).unwrap()
}

async fn wait_lines(c: &mut SnapdClient<Channel>, vm: &str, lines: usize) {
    let deadline = Instant::now() + TIMEOUT;
    while console(c, vm).await.lines().count() < lines {
        assert!(
            Instant::now() < deadline,
            "VM {vm} never printed {lines} lines"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn wait_op(c: &mut SnapdClient<Channel>, op: pb::Operation) -> pb::Operation {
    let op = c
        .wait_operation(pb::WaitOperationRequest {
            operation_id: op.id,
            timeout_ms: 120_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(op.ended_unix_ms, 0, "operation did not end: {op:?}");
    op
}

async fn succeeded(c: &mut SnapdClient<Channel>, op: pb::Operation) -> pb::OperationResult {
    let op = wait_op(c, op).await;
    assert_eq!(
        op.state(),
        pb::OperationState::Succeeded,
        "operation failed: {:?}",
        op.error
    );
    op.result.unwrap()
}

/// Takes a snapshot of a running VM leaving it paused; returns the snapshot and the console
/// length at the snapshot (where a restore of it continues from), then resumes the VM.
async fn snapshot_at(
    c: &mut SnapdClient<Channel>,
    vm: &str,
    name: &str,
    request_id: &str,
) -> (pb::Snapshot, usize) {
    let op = c
        .create_snapshot(pb::CreateSnapshotRequest {
            request_id: request_id.into(),
            vm_id: vm.into(),
            name: name.into(),
            leave_paused: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let snap = succeeded(c, op).await.snapshot.unwrap();
    let cut = console(c, vm).await.len();
    // (A guest that finished before the snapshot stays finished: its continuation is empty.)
    let state = c
        .get_vm(pb::GetVmRequest { vm_id: vm.into() })
        .await
        .unwrap()
        .into_inner()
        .state();
    if state == pb::VmState::Paused {
        c.resume_vm(pb::VmActionRequest {
            request_id: rid("resume"),
            vm_id: vm.into(),
        })
        .await
        .unwrap();
    }
    (snap, cut)
}

async fn restore_new(
    c: &mut SnapdClient<Channel>,
    snapshot: &str,
    name: &str,
    mode: pb::MemoryRestoreMode,
) -> pb::Vm {
    let op = c
        .restore_snapshot(pb::RestoreSnapshotRequest {
            request_id: rid("restore"),
            snapshot_id: snapshot.into(),
            target: Some(pb::restore_snapshot_request::Target::NewVm(pb::NewVm {
                name: name.into(),
                ..Default::default()
            })),
            memory_mode: mode as i32,
            leave_paused: false,
        })
        .await
        .unwrap()
        .into_inner();
    succeeded(c, op).await.vms.remove(0)
}

/// Starts a revert of VM `vm` to snapshot `snapshot`.
async fn start_revert(
    c: &mut SnapdClient<Channel>,
    snapshot: &str,
    vm: &str,
    leave_paused: bool,
) -> pb::Operation {
    c.restore_snapshot(pb::RestoreSnapshotRequest {
        request_id: rid("revert"),
        snapshot_id: snapshot.into(),
        target: Some(pb::restore_snapshot_request::Target::VmId(vm.into())),
        leave_paused,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

/// Runs a VM to the end and returns its console.
async fn finish(c: &mut SnapdClient<Channel>, vm: &str) -> String {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let v = c
            .get_vm(pb::GetVmRequest { vm_id: vm.into() })
            .await
            .unwrap()
            .into_inner();
        if v.state() == pb::VmState::Finished {
            return console(c, vm).await;
        }
        if Instant::now() > deadline || v.state() == pb::VmState::Failed {
            let out = console(c, vm).await;
            let tail: Vec<&str> = out.lines().rev().take(3).collect();
            panic!(
                "VM {vm} did not finish ({:?}: {}); its last lines: {tail:?}",
                v.state(),
                v.failure
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Snapshot A, run, snapshot B, revert to A, restore B into a new VM, clone A three times,
/// delete A (B and the clones still restore exactly, A's state is freed), restart the daemon
/// (the tree is intact), and a retried request id creates one snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_revert_restore_clone_delete_restart() {
    if !kvm_available("snapshot_revert_restore_clone_delete_restart") {
        return;
    }
    let expected = model(&guest());
    let (mut daemon, mut c) = Snapd::start("").await;
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
        *snap_mem::layer::Layer::open(daemon.data.join(format!("layers/{}.mlayer", s.id)))
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

    // Revert the finished VM to A: the lines after A repeat.
    let op = start_revert(&mut c, &a.id, &vm.id, true).await;
    succeeded(&mut c, op).await;
    let mark = console(&mut c, &vm.id).await.len();
    c.resume_vm(pb::VmActionRequest {
        request_id: rid("resume"),
        vm_id: vm.id.clone(),
    })
    .await
    .unwrap();
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

    // Restart: the tree is intact and the VMs are reported stopped.
    let snaps_before = c
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    let mut c = daemon.restart("").await;
    let snaps_after = c
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    assert_eq!(snaps_before, snaps_after);
    let v = c
        .get_vm(pb::GetVmRequest {
            vm_id: vm.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.state(), pb::VmState::Stopped);
    let vb3 = restore_new(&mut c, &b.id, "after-restart", pb::MemoryRestoreMode::Lazy).await;
    assert_eq!(
        finish(&mut c, &vb3.id).await,
        expected[cut_b..],
        "B after restart"
    );
}

async fn start_snapshot(
    c: &mut SnapdClient<Channel>,
    vm: &str,
    name: &str,
) -> Result<pb::Operation, tonic::Status> {
    c.create_snapshot(pb::CreateSnapshotRequest {
        request_id: rid("snap"),
        vm_id: vm.into(),
        name: name.into(),
        ..Default::default()
    })
    .await
    .map(tonic::Response::into_inner)
}

async fn snapshot_count(c: &mut SnapdClient<Channel>) -> usize {
    c.list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .snapshots
        .len()
}

/// Two snapshots of one VM at once: one runs, the other is ABORTED at once. Snapshots of
/// different VMs in parallel all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_snapshots() {
    if !kvm_available("concurrent_snapshots") {
        return;
    }
    // The publish step sleeps, so the first snapshot surely holds its VM when the second comes.
    let (_daemon, mut c) = Snapd::start("snapshot.before-publish=sleep:300").await;
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
    assert!(err.message().contains("busy"), "{err}");
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
            request_id: rid("stop"),
            vm_id: r.id.clone(),
        })
        .await
        .unwrap();
    }
}

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
    let (mut daemon, mut c) =
        Snapd::start("snapshot.write-memory=fail:1,snapshot.publish=fail:1").await;
    let vm = create_vm(&mut c, "victim", true).await;
    wait_lines(&mut c, &vm.id, 3).await;

    let layers_before = files_in(&daemon.data.join("layers"));
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
            mlayers(files_in(&daemon.data.join("layers"))),
            mlayers(layers_before.clone()),
            "{what}: a memory layer is left"
        );
        assert_eq!(
            files_in(&daemon.data.join("layers")),
            catalog_files(&daemon),
            "{what}: files the catalog does not name"
        );
        assert!(
            files_in(&daemon.data.join("states")).is_empty(),
            "{what}: files left"
        );
        let v = c
            .get_vm(pb::GetVmRequest {
                vm_id: vm.id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
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
    let mut c = daemon.restart("snapshot.before-publish=sleep:5000").await;
    let vm2 = create_vm(&mut c, "killed", true).await;
    wait_lines(&mut c, &vm2.id, 3).await;
    let before = snapshot_count(&mut c).await;
    let layers_before = files_in(&daemon.data.join("layers"));
    let op = start_snapshot(&mut c, &vm2.id, "never").await.unwrap();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let o = c
            .get_operation(pb::GetOperationRequest {
                operation_id: op.id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if o.progress.as_ref().is_some_and(|p| p.phase == "publishing") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the snapshot never reached publishing"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        files_in(&daemon.data.join("layers")).len() > layers_before.len(),
        "the killed snapshot had written its layer"
    );
    daemon.kill9();
    let mut c = daemon.spawn("").await;
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
    let layers_after = files_in(&daemon.data.join("layers"));
    assert_eq!(
        mlayers(&layers_after),
        mlayers(&layers_before),
        "the half snapshot's layer is left"
    );
    assert_eq!(
        layers_after,
        catalog_files(&daemon),
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
    let v = c
        .get_vm(pb::GetVmRequest {
            vm_id: vm2.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.state(), pb::VmState::Stopped);
    // It starts again (from the beginning: it has no snapshot) and snapshots correctly.
    c.start_vm(pb::VmActionRequest {
        request_id: rid("start"),
        vm_id: vm2.id.clone(),
    })
    .await
    .unwrap();
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
    let (daemon, mut c) = Snapd::start("").await;
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
    }
    assert!(
        c.list_vms(pb::ListVmsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .vms
            .is_empty()
    );

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
    let state = daemon.data.join(format!("states/{}.state", s.id));
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
    let vms = c
        .list_vms(pb::ListVmsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .vms;
    assert_eq!(vms.len(), 1, "a VM was created from a corrupt snapshot");

    // A damaged memory layer: the revert is refused and the VM runs on as before.
    std::fs::write(&state, {
        bytes[n / 2] ^= 0xff;
        &bytes
    })
    .unwrap();
    let layer = daemon.data.join(format!("layers/{}.mlayer", s.id));
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
    let vms = c
        .list_vms(pb::ListVmsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .vms;
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

/// Stock gRPC clients find their way: the health service says SERVING and reflection lists the
/// snapd service (what grpcurl asks for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let (daemon, _) = Snapd::start("").await;
    let channel = snapd::client::channel(daemon.socket().to_str().unwrap())
        .await
        .unwrap();
    let health = HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "snapd.v1.Snapd".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"snapd.v1.Snapd".to_string()), "{names:?}");
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    // The socket is the owner's alone.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(daemon.socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
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
    let (_daemon, mut c) = Snapd::start("snapshot.write-memory=sleep:300").await;
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
    let v = c
        .get_vm(pb::GetVmRequest {
            vm_id: vm.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
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
    let (daemon, mut c) = Snapd::start("").await;
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
        files_in(&daemon.data.join("layers"))
            .into_iter()
            .filter(|f| f.ends_with(".mlayer"))
            .collect()
    };
    assert_eq!(mlayers().len(), 2);
    let state_a = std::fs::metadata(daemon.data.join(format!("states/{}.state", a.id)))
        .unwrap()
        .len();
    let op = c
        .delete_snapshot(pb::DeleteSnapshotRequest {
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
        snap_mem::layer::Layer::open(daemon.data.join("layers").join(&mlayers()[0])).unwrap();
    assert!(merged.info().parent.is_none(), "B's layer is now a root");

    // The VM runs on from B and takes a diff over the merged layer.
    c.resume_vm(pb::VmActionRequest {
        request_id: rid("resume"),
        vm_id: vm.id.clone(),
    })
    .await
    .unwrap();
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

/// On request the daemon listens on TCP too, serving the same API; a second daemon on the same
/// data directory is refused with a message naming the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listener_and_one_daemon_per_directory() {
    let (daemon, _) = Snapd::start("").await;
    // A free port: bind, read it, release it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tcp_dir = tempfile::tempdir().unwrap();
    let mut tcp = Command::new(env!("CARGO_BIN_EXE_snapd"))
        .arg("--data-dir")
        .arg(tcp_dir.path())
        .arg("--tcp")
        .arg(format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let addr = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let vms = loop {
        if let Ok(mut c) = snapd::client::connect(&addr).await {
            if let Ok(r) = c.list_vms(pb::ListVmsRequest::default()).await {
                break r.into_inner().vms;
            }
        }
        assert!(Instant::now() < deadline, "snapd never answered on {addr}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(vms.is_empty());
    tcp.kill().unwrap();
    tcp.wait().unwrap();

    let second = Command::new(env!("CARGO_BIN_EXE_snapd"))
        .arg("--data-dir")
        .arg(&daemon.data)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("another snapd is using"), "{err}");
}

/// A disk can start from a raw image on the daemon's host (imported as the disk's sealed base);
/// a bad image path or a size that disagrees with the image is refused, naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disks_from_raw_images() {
    if !kvm_available("disks_from_raw_images") {
        return;
    }
    let (daemon, mut c) = Snapd::start("").await;
    let image = daemon.data.parent().unwrap().join("base.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
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
    let from_image = pb::DiskSpec {
        name: "root".into(),
        size_bytes: 0,
        image_path: image.to_str().unwrap().into(),
    };
    let vm = c
        .create_vm(request("imaged", from_image.clone()))
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

    for (disk, what) in [
        (
            pb::DiskSpec {
                image_path: "relative.img".into(),
                ..from_image.clone()
            },
            "absolute",
        ),
        (
            pb::DiskSpec {
                image_path: "/nonexistent/base.img".into(),
                ..from_image.clone()
            },
            "/nonexistent/base.img",
        ),
        (
            pb::DiskSpec {
                size_bytes: 2 << 20,
                ..from_image.clone()
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
    ] {
        let e = c.create_vm(request("refused", disk)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        assert!(e.message().contains(what), "{what}: {e}");
    }
    assert_eq!(
        c.list_vms(pb::ListVmsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .vms
            .len(),
        1
    );
    assert_eq!(
        files_in(&daemon.data.join("layers")),
        catalog_files(&daemon),
        "no file left"
    );
}
