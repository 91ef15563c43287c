//! What the end-to-end tests share: the daemon, the guest every VM runs and its model, and
//! calls that wait for what they started.

use std::time::{Duration, Instant};

use snap_api::v1 as pb;
pub use snap_testkit::fs::files_in;
pub use snap_testkit::snapd::Snapd;
pub use snap_testkit::{TIMEOUT, kvm_available};
pub use tonic::Code;

/// A client of the daemon.
pub type Client = snap_api::v1::snapd_client::SnapdClient<tonic::transport::Channel>;

/// The snapd binary of this build.
pub const SNAPD: &str = env!("CARGO_BIN_EXE_snapd");

/// A daemon on a fresh data directory with `SNAPD_FAILPOINTS=failpoints`, and a client.
pub async fn start(failpoints: &str) -> (Snapd, Client) {
    start_with(failpoints, &[]).await
}

/// As [`start`], with more daemon arguments.
pub async fn start_with(failpoints: &str, args: &[&str]) -> (Snapd, Client) {
    let mut d = Snapd::new(SNAPD, args);
    d.start(failpoints);
    let c = d.client().await;
    (d, c)
}

/// Restarts the daemon (SIGTERM, then start) and connects again.
pub async fn restart(d: &mut Snapd, failpoints: &str) -> Client {
    d.restart(failpoints);
    d.client().await
}

/// Starts the daemon again after it was killed, and connects.
pub async fn respawn(d: &mut Snapd, failpoints: &str) -> Client {
    d.start(failpoints);
    d.client().await
}

/// The guest every test VM runs: 120 ticks, about a second of guest time here (long enough that
/// snapshots land mid-run), writing 4 sectors of its 1 MiB disk per tick and reading two back:
/// each output line carries a hash of what it wrote and read, so equal output means equal
/// disks too.
pub fn guest() -> pb::GuestProgram {
    pb::GuestProgram {
        seed: 0x5eed,
        working_set_pages: 512,
        mutations_per_tick: 24,
        ticks: 120,
        disk_sectors_per_tick: 4,
    }
}

pub fn model(g: &pb::GuestProgram) -> String {
    snapd::create_vm::test_guest(&snapd::api::convert::guest_spec(g))
        .model(1)
        .output
}

/// Writes a file only its owner may read (a remote's credentials), as snapd requires.
pub fn write_private(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

pub fn rid(tag: &str) -> String {
    snap_testkit::request_id(tag)
}

pub async fn create_vm(c: &mut Client, name: &str, start: bool) -> pb::Vm {
    create_vm_running(c, name, start, guest()).await
}

pub async fn create_vm_running(
    c: &mut Client,
    name: &str,
    start: bool,
    program: pb::GuestProgram,
) -> pb::Vm {
    c.create_vm(vm_request(name, start, program))
        .await
        .unwrap()
        .into_inner()
}

/// A new VM of 32 MiB with a 1 MiB disk running `program`.
pub fn vm_request(name: &str, start: bool, program: pb::GuestProgram) -> pb::CreateVmRequest {
    pb::CreateVmRequest {
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
    }
}

pub async fn console(c: &mut Client, vm: &str) -> String {
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

pub async fn wait_lines(c: &mut Client, vm: &str, lines: usize) {
    let deadline = Instant::now() + TIMEOUT;
    while console(c, vm).await.lines().count() < lines {
        assert!(
            Instant::now() < deadline,
            "VM {vm} never printed {lines} lines"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

pub async fn wait_op(c: &mut Client, op: pb::Operation) -> pb::Operation {
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

pub async fn succeeded(c: &mut Client, op: pb::Operation) -> pb::OperationResult {
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
pub async fn snapshot_at(
    c: &mut Client,
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
    if get_vm(c, vm).await.state() == pb::VmState::Paused {
        resume(c, vm).await;
    }
    (snap, cut)
}

pub async fn restore_new(
    c: &mut Client,
    snapshot: &str,
    name: &str,
    mode: pb::MemoryRestoreMode,
) -> pb::Vm {
    let op = start_restore_new(c, snapshot, name, mode).await.unwrap();
    succeeded(c, op).await.vms.remove(0)
}

/// Starts a revert of VM `vm` to snapshot `snapshot`.
pub async fn start_revert(
    c: &mut Client,
    snapshot: &str,
    vm: &str,
    leave_paused: bool,
) -> pb::Operation {
    c.restore_snapshot(revert_request(snapshot, vm, leave_paused))
        .await
        .unwrap()
        .into_inner()
}

/// A revert of VM `vm` to snapshot `snapshot`.
pub fn revert_request(snapshot: &str, vm: &str, leave_paused: bool) -> pb::RestoreSnapshotRequest {
    pb::RestoreSnapshotRequest {
        request_id: rid("revert"),
        snapshot_id: snapshot.into(),
        target: Some(pb::restore_snapshot_request::Target::VmId(vm.into())),
        leave_paused,
        ..Default::default()
    }
}

/// Runs a VM to the end and returns its console.
pub async fn finish(c: &mut Client, vm: &str) -> String {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let v = get_vm(c, vm).await;
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

pub async fn start_snapshot(
    c: &mut Client,
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

pub async fn snapshot_count(c: &mut Client) -> usize {
    c.list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .snapshots
        .len()
}

/// Starts a delete of snapshot `id` (with `wait`: queued behind conflicting operations).
pub async fn start_delete(
    c: &mut Client,
    id: &str,
    wait: bool,
) -> Result<pb::Operation, tonic::Status> {
    c.delete_snapshot(pb::DeleteSnapshotRequest {
        request_id: rid("delete"),
        snapshot_id: id.into(),
        wait,
        ..Default::default()
    })
    .await
    .map(tonic::Response::into_inner)
}

/// Starts a restore of `snapshot` into a new VM `name`.
pub async fn start_restore_new(
    c: &mut Client,
    snapshot: &str,
    name: &str,
    mode: pb::MemoryRestoreMode,
) -> Result<pb::Operation, tonic::Status> {
    c.restore_snapshot(pb::RestoreSnapshotRequest {
        request_id: rid("restore"),
        snapshot_id: snapshot.into(),
        target: Some(pb::restore_snapshot_request::Target::NewVm(pb::NewVm {
            name: name.into(),
            ..Default::default()
        })),
        memory_mode: mode as i32,
        ..Default::default()
    })
    .await
    .map(tonic::Response::into_inner)
}

/// Starts a clone of `snapshot` into `count` VMs named `<prefix>-<i>`.
pub async fn start_clone(
    c: &mut Client,
    snapshot: &str,
    prefix: &str,
    count: u32,
) -> Result<pb::Operation, tonic::Status> {
    c.clone_snapshot(pb::CloneSnapshotRequest {
        request_id: rid("clone"),
        snapshot_id: snapshot.into(),
        count,
        name_prefix: prefix.into(),
        memory_mode: pb::MemoryRestoreMode::Lazy as i32,
        ..Default::default()
    })
    .await
    .map(tonic::Response::into_inner)
}

/// How a call that starts an operation ended: its result, or the code and message it failed
/// with (at once, or when the operation ended).
pub async fn outcome(
    c: &mut Client,
    started: Result<pb::Operation, tonic::Status>,
) -> Result<pb::OperationResult, (Code, String)> {
    let op = started.map_err(|s| (s.code(), s.message().to_string()))?;
    let op = wait_op(c, op).await;
    match (op.result, op.error) {
        (Some(r), None) => Ok(r),
        (_, Some(e)) => Err((Code::from_i32(e.code), e.message)),
        (None, None) => panic!("an ended operation without result or error: {}", op.id),
    }
}

/// Asserts that a call that lost a race lost it as a race: ABORTED (something else held what it
/// needed) or NOT_FOUND (it was deleted first), never an error that blames damage.
pub fn assert_lost_race(e: &(Code, String), what: &str) {
    assert!(
        matches!(e.0, Code::Aborted | Code::NotFound),
        "{what}: a race answered {:?}: {}",
        e.0,
        e.1
    );
}

/// Waits for `lines` lines of VM `vm` and asserts they continue the model exactly (somewhere:
/// a restored VM continues from its snapshot), then stops the VM. A guest that finishes first
/// (restored near its end) has printed the model's last lines.
pub async fn continues_exactly(c: &mut Client, vm: &str, model: &str, lines: usize) {
    // `lines` lines, or fewer if the guest finishes first (a snapshot near its end).
    let deadline = Instant::now() + TIMEOUT;
    while console(c, vm).await.lines().count() < lines
        && get_vm(c, vm).await.state() != pb::VmState::Finished
    {
        assert!(
            Instant::now() < deadline,
            "VM {vm} never printed {lines} lines"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let out = console(c, vm).await;
    assert!(
        model.contains(&out),
        "VM {vm} diverged from its model: {out}"
    );
    stop(c, vm).await;
}

/// Stops VM `vm`.
pub async fn stop(c: &mut Client, vm: &str) {
    vm_action(c, vm, "stop").await;
}

/// The VM as the daemon shows it.
pub async fn get_vm(c: &mut Client, vm: &str) -> pb::Vm {
    c.get_vm(pb::GetVmRequest { vm_id: vm.into() })
        .await
        .unwrap()
        .into_inner()
}

/// A guest that runs for the whole of a test (its snapshots land mid-run).
pub fn long_guest() -> pb::GuestProgram {
    pb::GuestProgram {
        ticks: 4000,
        ..guest()
    }
}

/// Takes a snapshot of VM `vm` (which runs on) and waits for it.
pub async fn take_snapshot(c: &mut Client, vm: &str, name: &str) -> pb::Snapshot {
    let op = start_snapshot(c, vm, name).await.unwrap();
    let ended = wait_op(c, op).await;
    assert_eq!(
        ended.state(),
        pb::OperationState::Succeeded,
        "operation failed: {:?}",
        ended.error
    );
    let s = ended.result.unwrap().snapshot.unwrap();
    assert_eq!(ended.snapshot_id, s.id, "the operation names its snapshot");
    s
}

/// Deletes snapshot `id` and waits for it.
pub async fn delete_snapshot(c: &mut Client, id: &str) -> pb::OperationResult {
    let op = start_delete(c, id, false).await.unwrap();
    succeeded(c, op).await
}

/// Starts a revert of VM `vm` to snapshot `snapshot`, returning the call's error if it fails.
pub async fn try_revert(
    c: &mut Client,
    snapshot: &str,
    vm: &str,
) -> Result<pb::Operation, tonic::Status> {
    c.restore_snapshot(revert_request(snapshot, vm, false))
        .await
        .map(tonic::Response::into_inner)
}

/// Nanoseconds of the clock (a seed).
pub fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Lets VM `vm`'s guest run (start a created or stopped VM).
pub async fn start_vm(c: &mut Client, vm: &str) -> pb::Vm {
    vm_action(c, vm, "start").await
}

/// Resumes VM `vm`.
pub async fn resume(c: &mut Client, vm: &str) -> pb::Vm {
    vm_action(c, vm, "resume").await
}

/// Pauses VM `vm`.
pub async fn pause(c: &mut Client, vm: &str) -> pb::Vm {
    vm_action(c, vm, "pause").await
}

async fn vm_action(c: &mut Client, vm: &str, action: &str) -> pb::Vm {
    let r = pb::VmActionRequest {
        request_id: rid(action),
        vm_id: vm.into(),
        wait: true,
    };
    match action {
        "start" => c.start_vm(r).await,
        "resume" => c.resume_vm(r).await,
        "pause" => c.pause_vm(r).await,
        _ => c.stop_vm(r).await,
    }
    .unwrap()
    .into_inner()
}

/// Every VM.
pub async fn list_vms(c: &mut Client) -> Vec<pb::Vm> {
    c.list_vms(pb::ListVmsRequest {
        page_size: 1000,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .vms
}

/// Starts the deletion of VM `vm` (with its snapshots if asked).
pub async fn start_delete_vm(
    c: &mut Client,
    vm: &str,
    with_snapshots: bool,
) -> Result<pb::Operation, tonic::Status> {
    c.delete_vm(pb::DeleteVmRequest {
        request_id: rid("delete-vm"),
        vm_id: vm.into(),
        with_snapshots,
        ..Default::default()
    })
    .await
    .map(tonic::Response::into_inner)
}

/// Deletes VM `vm` (with its snapshots if asked) and waits for it.
pub async fn delete_vm(c: &mut Client, vm: &str, with_snapshots: bool) -> pb::OperationResult {
    let op = start_delete_vm(c, vm, with_snapshots).await.unwrap();
    succeeded(c, op).await
}

/// Waits until operation `op` reports a phase `phase` accepts.
pub async fn wait_phase(c: &mut Client, op: &pb::Operation, phase: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let o = c
            .get_operation(pb::GetOperationRequest {
                operation_id: op.id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if o.progress.as_ref().is_some_and(|p| phase(&p.phase)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "operation {} never reached the phase: {:?}",
            op.id,
            o.state()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Every snapshot.
pub async fn list_snapshots(c: &mut Client) -> Vec<pb::Snapshot> {
    c.list_snapshots(pb::ListSnapshotsRequest {
        page_size: 1000,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .snapshots
}
