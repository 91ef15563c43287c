//! What the end-to-end tests share: the daemon, the guest every VM runs and its model, and
//! calls that wait for what they started.

use std::time::{Duration, Instant};

use snap_api::v1 as pb;
pub use snap_testkit::fs::files_in;
pub use snap_testkit::snapd::Snapd;
pub use snap_testkit::{TIMEOUT, kvm_available};
use snap_vmm::TestGuest;
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
    let state = c
        .get_vm(pb::GetVmRequest { vm_id: vm.into() })
        .await
        .unwrap()
        .into_inner()
        .state();
    if state == pb::VmState::Paused {
        c.resume_vm(pb::VmActionRequest {
            wait: false,
            request_id: rid("resume"),
            vm_id: vm.into(),
        })
        .await
        .unwrap();
    }
    (snap, cut)
}

pub async fn restore_new(
    c: &mut Client,
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
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    succeeded(c, op).await.vms.remove(0)
}

/// Starts a revert of VM `vm` to snapshot `snapshot`.
pub async fn start_revert(
    c: &mut Client,
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
pub async fn finish(c: &mut Client, vm: &str) -> String {
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
/// a restored VM continues from its snapshot), then stops the VM.
pub async fn continues_exactly(c: &mut Client, vm: &str, model: &str, lines: usize) {
    wait_lines(c, vm, lines).await;
    let out = console(c, vm).await;
    assert!(
        model.contains(&out),
        "VM {vm} diverged from its model: {out}"
    );
    stop(c, vm).await;
}

/// Stops VM `vm`.
pub async fn stop(c: &mut Client, vm: &str) {
    c.stop_vm(pb::VmActionRequest {
        request_id: rid("stop"),
        vm_id: vm.into(),
        wait: true,
    })
    .await
    .unwrap();
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
    succeeded(c, op).await.snapshot.unwrap()
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
    c.restore_snapshot(pb::RestoreSnapshotRequest {
        request_id: rid("revert"),
        snapshot_id: snapshot.into(),
        target: Some(pb::restore_snapshot_request::Target::VmId(vm.into())),
        ..Default::default()
    })
    .await
    .map(tonic::Response::into_inner)
}

/// Nanoseconds of the clock (a seed).
pub fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
