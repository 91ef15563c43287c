//! Many clients at once, for a bounded time, over a few VMs, with a random mix of snapshot,
//! restore, revert, clone, delete (merging and not), VM delete, and push to, pull from,
//! restore from, delete from and sweep a remote store (a real Garage, when one is installed,
//! with a grace period of seconds so that sweeps remove chunks while pushes run); then every
//! listed snapshot is restored and its guest checked against the model, and every remote
//! snapshot whose push was acknowledged (and whose remote delete was not asked) is listed in the
//! bucket with every chunk its manifest names. Errors must be races lost (ABORTED,
//! NOT_FOUND) or preconditions the request had (a stopped or running VM), never INTERNAL or a
//! damaged file; no file is left that the catalog does not name. The same with kill -9 at random
//! moments and a restart: every acknowledged snapshot is there and restores exactly, and no
//! operation is half done.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use snap_api::v1 as pb;

use super::common::*;
use crate::common;

/// The guest of every VM here: long enough that most snapshots land mid-run.
fn mix_guest() -> pb::GuestProgram {
    pb::GuestProgram {
        ticks: 600,
        ..guest()
    }
}

/// What the clients know exists, and what they were told.
#[derive(Default)]
struct World {
    /// VMs whose creation (or restore, or clone) was acknowledged and not deleted since.
    vms: Vec<String>,
    /// Snapshots whose creation was acknowledged.
    snapshots: Vec<String>,
    /// The VM of each acknowledged snapshot.
    snapshot_vm: std::collections::HashMap<String, String>,
    /// Snapshots whose deletion was acknowledged.
    deleted: BTreeSet<String>,
    /// Snapshots a delete was started for (they may be gone after a kill).
    deleting: BTreeSet<String>,
    /// The daemon was killed: what fails now says nothing.
    killed: bool,
    /// Snapshots whose push to the remote was acknowledged.
    pushed: Vec<String>,
    /// Pulls acknowledged.
    pulls: usize,
    /// Snapshots a remote delete was started for (they may be gone from the remote).
    remote_deleting: BTreeSet<String>,
    /// Remote deletes and sweeps acknowledged.
    remote_deletes: usize,
    sweeps: usize,
    /// Clones started but not seen to end: name prefix, count, and the operation once known.
    clones: Vec<(String, u32, Option<String>)>,
    /// Calls made, by outcome.
    ok: usize,
    lost: usize,
    /// Errors no race or request explains.
    bad: Vec<String>,
}

/// A small pseudo-random source (xorshift), seeded per client so a run can be repeated.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn pick(rng: &mut Rng, items: &[String]) -> Option<String> {
    (!items.is_empty()).then(|| items[rng.below(items.len())].clone())
}

/// Judges an error: a race lost or a precondition of the request is fine, anything else is not.
fn judge(world: &Mutex<World>, what: &str, code: Code, message: &str) {
    let explained = match code {
        Code::Aborted | Code::NotFound => true,
        Code::FailedPrecondition => ["is stopped", "is running", "has stopped"]
            .iter()
            .any(|m| message.contains(m)),
        // A push slower than half the mix's short grace period is told to push again.
        Code::Unavailable => message.contains("over half the remote's grace period"),
        _ => false,
    };
    let mut w = world.lock().unwrap();
    if w.killed {
        return;
    }
    if explained {
        w.lost += 1;
    } else {
        w.bad.push(format!("{what}: {code:?}: {message}"));
    }
}

/// One client: random calls until `until` (or until the daemon is gone).
async fn client(
    mut c: Client,
    world: Arc<Mutex<World>>,
    id: usize,
    seed: u64,
    until: Instant,
    remote: bool,
) {
    let mut rng = Rng(seed ^ (id as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut n = 0;
    while Instant::now() < until {
        n += 1;
        // Unique across runs on one daemon: the seed differs per run.
        let name = format!("c{id}-{}-{n}", seed % 1000);
        let (vms, snaps, pushed) = {
            let w = world.lock().unwrap();
            (w.vms.clone(), w.snapshots.clone(), w.pushed.clone())
        };
        let roll = rng.below(100);
        let started: Result<pb::Operation, tonic::Status>;
        let what: &str;
        match roll {
            _ if vms.len() < 3 => {
                what = "create";
                match c.create_vm(vm_request(&name, true, mix_guest())).await {
                    Ok(vm) => {
                        let mut w = world.lock().unwrap();
                        w.vms.push(vm.into_inner().id);
                        w.ok += 1;
                    }
                    Err(s) if is_gone(&s) => return,
                    Err(s) => judge(&world, what, s.code(), s.message()),
                }
                continue;
            }
            0..=34 => {
                what = "snapshot";
                let Some(vm) = pick(&mut rng, &vms) else {
                    continue;
                };
                started = start_snapshot(&mut c, &vm, &name).await;
            }
            35..=49 if vms.len() < 8 => {
                what = "restore";
                let Some(s) = pick(&mut rng, &snaps) else {
                    continue;
                };
                let mode = [
                    pb::MemoryRestoreMode::Eager,
                    pb::MemoryRestoreMode::Lazy,
                    pb::MemoryRestoreMode::Prefetch,
                ][rng.below(3)];
                started = start_restore_new(&mut c, &s, &name, mode).await;
            }
            50..=59 => {
                what = "revert";
                let (Some(s), Some(vm)) = (pick(&mut rng, &snaps), pick(&mut rng, &vms)) else {
                    continue;
                };
                started = try_revert(&mut c, &s, &vm).await;
            }
            60..=66 if vms.len() < 8 => {
                what = "clone";
                let Some(s) = pick(&mut rng, &snaps) else {
                    continue;
                };
                world.lock().unwrap().clones.push((name.clone(), 2, None));
                started = start_clone(&mut c, &s, &name, 2).await;
                if let Ok(op) = &started {
                    let mut w = world.lock().unwrap();
                    if let Some(clone) = w.clones.iter_mut().find(|c| c.0 == name) {
                        clone.2 = Some(op.id.clone());
                    }
                }
            }
            80..=84 if remote => {
                what = "push";
                let Some(s) = pick(&mut rng, &snaps) else {
                    continue;
                };
                started = c
                    .push_snapshot(pb::PushSnapshotRequest {
                        request_id: rid("push"),
                        snapshot_id: s,
                        remote: "fleet".into(),
                        wait: false,
                    })
                    .await
                    .map(tonic::Response::into_inner);
            }
            85..=86 if remote && vms.len() < 8 => {
                what = "restore from the remote";
                let Some(s) = pick(&mut rng, &pushed) else {
                    continue;
                };
                let mode = [
                    pb::MemoryRestoreMode::Eager,
                    pb::MemoryRestoreMode::Lazy,
                    pb::MemoryRestoreMode::Prefetch,
                ][rng.below(3)];
                started = c
                    .restore_snapshot(pb::RestoreSnapshotRequest {
                        request_id: rid("rrestore"),
                        snapshot_id: s,
                        target: Some(pb::restore_snapshot_request::Target::NewVm(pb::NewVm {
                            name: name.clone(),
                            ..Default::default()
                        })),
                        memory_mode: mode as i32,
                        remote: "fleet".into(),
                        ..Default::default()
                    })
                    .await
                    .map(tonic::Response::into_inner);
            }
            85..=89 if remote => {
                what = "pull";
                // Often a snapshot deleted here since: the pull brings it back.
                let Some(s) = pick(&mut rng, &pushed) else {
                    continue;
                };
                started = c
                    .pull_snapshot(pb::PullSnapshotRequest {
                        request_id: rid("pull"),
                        snapshot_id: s,
                        remote: "fleet".into(),
                        ..Default::default()
                    })
                    .await
                    .map(tonic::Response::into_inner);
            }
            77 if remote => {
                what = "delete from the remote";
                let Some(s) = pick(&mut rng, &pushed) else {
                    continue;
                };
                world.lock().unwrap().remote_deleting.insert(s.clone());
                started = c
                    .delete_remote_snapshot(pb::DeleteRemoteSnapshotRequest {
                        request_id: rid("rdelete"),
                        snapshot_id: s,
                        remote: "fleet".into(),
                        wait: false,
                    })
                    .await
                    .map(tonic::Response::into_inner);
            }
            78..=79 if remote => {
                what = "sweep";
                started = c
                    .sweep_remote(pb::SweepRemoteRequest {
                        request_id: rid("sweep"),
                        remote: "fleet".into(),
                        wait: false,
                    })
                    .await
                    .map(tonic::Response::into_inner);
            }
            60..=89 => {
                what = "delete snapshot";
                let Some(s) = pick(&mut rng, &snaps) else {
                    continue;
                };
                world.lock().unwrap().deleting.insert(s.clone());
                started = start_delete(&mut c, &s, false).await;
            }
            _ => {
                what = "delete VM";
                let Some(vm) = pick(&mut rng, &vms) else {
                    continue;
                };
                if let Err(s) = c
                    .stop_vm(pb::VmActionRequest {
                        request_id: rid("stop"),
                        vm_id: vm.clone(),
                        wait: false,
                    })
                    .await
                {
                    if is_gone(&s) {
                        return;
                    }
                    judge(&world, "stop VM", s.code(), s.message());
                    continue;
                }
                let with_snapshots = rng.below(2) == 0;
                if with_snapshots {
                    let mut w = world.lock().unwrap();
                    let mine: Vec<String> = w
                        .snapshot_vm
                        .iter()
                        .filter(|(_, v)| **v == vm)
                        .map(|(s, _)| s.clone())
                        .collect();
                    w.deleting.extend(mine);
                }
                started = c
                    .delete_vm(pb::DeleteVmRequest {
                        request_id: rid("delete-vm"),
                        vm_id: vm,
                        with_snapshots,
                        ..Default::default()
                    })
                    .await
                    .map(tonic::Response::into_inner);
            }
        }
        let op = match started {
            Ok(op) => op,
            Err(s) if is_gone(&s) => return,
            Err(s) => {
                judge(&world, what, s.code(), s.message());
                continue;
            }
        };
        let ended = match c
            .wait_operation(pb::WaitOperationRequest {
                operation_id: op.id.clone(),
                timeout_ms: 120_000,
            })
            .await
        {
            Ok(op) => op.into_inner(),
            Err(_) => return,
        };
        if ended.ended_unix_ms == 0 {
            return;
        }
        record(&world, what, &op, &ended);
    }
}

/// Whether a call failed because the daemon went away (killed).
fn is_gone(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    ) || s.message().contains("transport")
}

/// Records what an ended operation acknowledged.
fn record(world: &Mutex<World>, what: &str, op: &pb::Operation, ended: &pb::Operation) {
    if let Some(e) = &ended.error {
        judge(world, what, Code::from_i32(e.code), &e.message);
        return;
    }
    if world.lock().unwrap().killed {
        return;
    }
    let Some(r) = &ended.result else {
        world.lock().unwrap().bad.push(format!(
            "{what}: operation {} ended without a result",
            op.id
        ));
        return;
    };
    let mut w = world.lock().unwrap();
    if w.killed {
        return;
    }
    w.ok += 1;
    if let Some(s) = &r.snapshot {
        w.snapshots.push(s.id.clone());
        w.snapshot_vm.insert(s.id.clone(), s.vm_id.clone());
    }
    for vm in &r.vms {
        if !w.vms.contains(&vm.id) {
            w.vms.push(vm.id.clone());
        }
    }
    for id in &r.deleted_snapshot_ids {
        w.snapshots.retain(|s| s != id);
        w.deleted.insert(id.clone());
    }
    if op.kind() == pb::OperationKind::DeleteVm {
        w.vms.retain(|v| *v != op.vm_id);
    }
    if op.kind() == pb::OperationKind::PushSnapshot {
        w.pushed.push(op.snapshot_id.clone());
    }
    if op.kind() == pb::OperationKind::PullSnapshot {
        w.pulls += 1;
    }
    if op.kind() == pb::OperationKind::DeleteRemoteSnapshot {
        w.pushed.retain(|s| *s != op.snapshot_id);
        w.remote_deletes += 1;
    }
    if op.kind() == pb::OperationKind::SweepRemote {
        w.sweeps += 1;
    }
    if op.kind() == pb::OperationKind::CloneSnapshot {
        let prefix = r
            .vms
            .first()
            .map(|v| v.name.rsplit_once('-').map_or("", |p| p.0).to_string());
        w.clones.retain(|(p, _, _)| Some(p) != prefix.as_ref());
    }
}

/// Starts `clients` clients running until `duration` has passed (pushing and pulling if the
/// daemon has remote `fleet`).
async fn spawn_mix(
    daemon: &Snapd,
    world: &Arc<Mutex<World>>,
    clients: usize,
    seed: u64,
    duration: Duration,
    remote: bool,
) -> Vec<tokio::task::JoinHandle<()>> {
    let until = Instant::now() + duration;
    let mut tasks = Vec::new();
    for i in 0..clients {
        let c = daemon.client().await;
        tasks.push(tokio::spawn(client(
            c,
            Arc::clone(world),
            i,
            seed,
            until,
            remote,
        )));
    }
    tasks
}

/// The grace period of the mix's remote: short, so that sweeps remove chunks during the mix.
const MIX_GRACE_SECS: u64 = 8;

/// A Garage for the mix's remote, if Garage is installed (required where
/// `SNAP_REQUIRE_GARAGE=1`), and the daemon arguments that name it as remote `fleet`.
fn mix_remote(
    test: &str,
    dir: &std::path::Path,
) -> (Option<snap_testkit::garage::Garage>, Vec<String>) {
    if !snap_testkit::garage::garage_available(test) {
        return (None, Vec::new());
    }
    let garage = snap_testkit::garage::Garage::single_node();
    let creds = dir.join("remote.creds");
    write_private(
        &creds,
        &format!(
            "AWS_ACCESS_KEY_ID={}\nAWS_SECRET_ACCESS_KEY={}\n",
            garage.access_key, garage.secret_key
        ),
    );
    let args = vec![
        "--remote".to_string(),
        format!("fleet={}", garage.url("mix")),
        "--remote-credentials".to_string(),
        creds.display().to_string(),
        "--remote-grace-secs".to_string(),
        MIX_GRACE_SECS.to_string(),
    ];
    (Some(garage), args)
}

/// Checks the bucket: every snapshot whose push was acknowledged, unless a remote delete was
/// asked for it, has a manifest, and every chunk a manifest names is there (a sweep running
/// beside pushes removed none of them).
async fn check_bucket(garage: &snap_testkit::garage::Garage, world: &Mutex<World>, what: &str) {
    let (chunks, named, listed) = super::remote::bucket_contents(garage, "mix").await;
    let missing: Vec<_> = named.difference(&chunks).collect();
    assert!(
        missing.is_empty(),
        "{what}: chunks named by manifests are gone from the bucket: {missing:?}"
    );
    let w = world.lock().unwrap();
    for s in &w.pushed {
        assert!(
            w.remote_deleting.contains(s) || listed.contains(s),
            "{what}: snapshot {s} was pushed and is not in the bucket"
        );
    }
    println!(
        "{what}: the bucket holds {} manifests naming {} chunks, {} chunks in all",
        listed.len(),
        named.len(),
        chunks.len()
    );
}

/// Waits until no operation runs.
async fn quiet(c: &mut Client) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let active = c
            .list_operations(pb::ListOperationsRequest {
                active_only: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .operations;
        if active.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "operations never ended: {active:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Restores every listed snapshot (a few at a time) and checks its guest against the model: it
/// continues exactly, or (a snapshot of a guest that had finished) it is finished.
async fn verify_snapshots(c: &mut Client, tag: &str) -> usize {
    let expected = model(&mix_guest());
    let listed = list_snapshots(c).await;
    for chunk in listed.chunks(4) {
        let mut checks = Vec::new();
        for s in chunk {
            let mut c = c.clone();
            let (id, name) = (s.id.clone(), format!("verify-{tag}-{}", s.id));
            let expected = expected.clone();
            checks.push(tokio::spawn(async move {
                let vm = restore_new(&mut c, &id, &name, pb::MemoryRestoreMode::Eager).await;
                if vm.state() == pb::VmState::Finished {
                    return;
                }
                continues_exactly(&mut c, &vm.id, &expected, 2).await;
            }));
        }
        for check in checks {
            check.await.unwrap();
        }
    }
    listed.len()
}

fn report(world: &Mutex<World>, what: &str) {
    let w = world.lock().unwrap();
    println!(
        "{what}: {} calls succeeded ({} pushes kept, {} pulls, {} remote deletes, {} sweeps), {} lost a race or a precondition; {} snapshots listed",
        w.ok,
        w.pushed.len(),
        w.pulls,
        w.remote_deletes,
        w.sweeps,
        w.lost,
        w.snapshots.len()
    );
    assert!(
        w.bad.is_empty(),
        "{what}: unexplained errors:\n{}",
        w.bad.join("\n")
    );
    assert!(w.ok > 0, "{what}: nothing succeeded");
}

fn seed() -> u64 {
    let s = std::env::var("SNAP_MIX_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| u64::from(std::process::id()) ^ common::now_nanos());
    println!("SNAP_MIX_SEED={s}");
    s
}

async fn mix(test: &str, clients: usize) {
    if !kvm_available(test) {
        return;
    }
    let seed = seed();
    let dir = tempfile::tempdir().unwrap();
    let (garage, args) = mix_remote(test, dir.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (daemon, mut c) = start_with("", &args).await;
    let world = Arc::new(Mutex::new(World::default()));
    let remote = garage.is_some();
    for t in spawn_mix(
        &daemon,
        &world,
        clients,
        seed,
        Duration::from_secs(12),
        remote,
    )
    .await
    {
        t.await.unwrap();
    }
    quiet(&mut c).await;
    report(&world, test);
    daemon.assert_files_match_catalog(test);
    if let Some(g) = &garage {
        check_bucket(g, &world, test).await;
    }
    let checked = verify_snapshots(&mut c, "end").await;
    println!("{test}: {checked} snapshots restored and checked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_clients_mixed() {
    mix("eight_clients_mixed", 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_clients_mixed() {
    mix("thirty_two_clients_mixed", 32).await;
}

/// The mix with the daemon killed (SIGKILL) at random moments and restarted: every snapshot whose
/// creation was acknowledged (and whose deletion was not) is listed and restores exactly; a clone
/// the clients did not see end made all its VMs or none; no file is left that the catalog does
/// not name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments() {
    let test = "kill_9_at_random_moments";
    if !kvm_available(test) {
        return;
    }
    let seed = seed();
    let mut rng = Rng(seed | 1);
    let dir = tempfile::tempdir().unwrap();
    let (garage, args) = mix_remote(test, dir.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (mut daemon, _) = start_with("", &args).await;
    let world = Arc::new(Mutex::new(World::default()));
    let remote = garage.is_some();
    for round in 0..5 {
        let run = Duration::from_millis(800 + rng.below(2500) as u64);
        let tasks = spawn_mix(
            &daemon,
            &world,
            6,
            seed + round,
            Duration::from_secs(60),
            remote,
        )
        .await;
        tokio::time::sleep(run).await;
        world.lock().unwrap().killed = true;
        daemon.kill9();
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        let mut c = respawn(&mut daemon, "").await;
        quiet(&mut c).await;
        daemon.assert_files_match_catalog(&format!("round {round}, after the restart"));
        if let Some(g) = &garage {
            check_bucket(g, &world, &format!("round {round}, after the restart")).await;
        }
        let listed: BTreeSet<String> = list_snapshots(&mut c)
            .await
            .into_iter()
            .map(|s| s.id)
            .collect();
        let vms = list_vms(&mut c).await;
        let states: std::collections::HashMap<String, pb::OperationState> = c
            .list_operations(pb::ListOperationsRequest {
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .operations
            .into_iter()
            .map(|o| (o.id.clone(), o.state()))
            .collect();
        {
            let mut w = world.lock().unwrap();
            for s in &w.snapshots {
                assert!(
                    listed.contains(s) || w.deleted.contains(s) || w.deleting.contains(s),
                    "round {round}: acknowledged snapshot {s} is gone"
                );
            }
            w.deleting.clear();
            w.killed = false;
            for (prefix, count, op) in &w.clones {
                let made = vms
                    .iter()
                    .filter(|v| v.name.starts_with(&format!("{prefix}-")))
                    .count();
                assert!(
                    made == 0 || made == *count as usize,
                    "round {round}: clone {prefix} left {made} of {count} VMs"
                );
                // Its operation says what happened: SUCCEEDED with all its VMs, or not.
                if let Some(state) = op.as_ref().and_then(|id| states.get(id)) {
                    assert_eq!(
                        *state == pb::OperationState::Succeeded,
                        made == *count as usize,
                        "round {round}: clone {prefix} is {state:?} with {made} of {count} VMs"
                    );
                }
            }
            w.clones.clear();
            // What is listed now is what the next round works with; VMs come back stopped.
            w.snapshots = listed.iter().cloned().collect();
            w.vms.clear();
        }
        for v in &vms {
            if v.name.starts_with("verify-") {
                continue;
            }
            // A VM without a snapshot would start from the beginning on its disks as they are:
            // a reboot, which the guest's model does not describe. It goes.
            if v.current_snapshot_id.is_empty() {
                delete_vm(&mut c, &v.id, false).await;
                continue;
            }
            start_vm(&mut c, &v.id).await;
            world.lock().unwrap().vms.push(v.id.clone());
        }
        let checked = verify_snapshots(&mut c, &format!("round{round}")).await;
        println!("round {round}: killed after {run:?}; {checked} snapshots restored and checked");
    }
    report(&world, test);
}
