//! Remote stores end to end: two daemons (two hosts, each its own data directory) share one
//! real Garage bucket. Host A pushes a VM's snapshots; host B, which never saw them, pulls,
//! restores and clones them, and every guest continues exactly as the uninterrupted run did;
//! deletes and the sweep leave exactly what the remaining manifests name. And the failures:
//! a push killed midway leaves no manifest and its retry sends only what is missing, a chunk
//! overwritten in the bucket stops a pull naming it and changes nothing here, wrong credentials
//! are told as such.

use std::collections::BTreeSet;
use std::time::Duration;

use object_store::ObjectStoreExt;
use snap_api::v1 as pb;
use snap_remote::{Credentials, Remote};
use snap_testkit::garage::{Garage, GarageCluster, garage_available};

use crate::common::*;

/// The sweep's grace period in these tests: short, so that a test can wait it out (a push
/// here takes well under half of it).
const GRACE_SECS: u64 = 6;

/// A daemon configured with remote `fleet` on `garage` (credentials from a file).
async fn host(garage: &Garage, dir: &std::path::Path, tag: &str, secret: &str) -> (Snapd, Client) {
    host_at(&garage.url("fleet"), &garage.access_key, dir, tag, secret).await
}

/// A daemon configured with remote `fleet` at `url`.
async fn host_at(
    url: &str,
    access_key: &str,
    dir: &std::path::Path,
    tag: &str,
    secret: &str,
) -> (Snapd, Client) {
    host_with(url, access_key, dir, tag, secret, "", &[]).await
}

/// A daemon configured with remote `fleet` at `url`, with `SNAPD_FAILPOINTS=failpoints` and
/// the arguments `extra`.
async fn host_with(
    url: &str,
    access_key: &str,
    dir: &std::path::Path,
    tag: &str,
    secret: &str,
    failpoints: &str,
    extra: &[&str],
) -> (Snapd, Client) {
    let creds = dir.join(format!("{tag}.creds"));
    write_private(
        &creds,
        &format!(
            "# the remote's key\nAWS_ACCESS_KEY_ID={access_key}\nAWS_SECRET_ACCESS_KEY={secret}\n"
        ),
    );
    let remote = format!("fleet={url}");
    let grace = GRACE_SECS.to_string();
    let mut args = vec![
        "--remote",
        &remote,
        "--remote-credentials",
        creds.to_str().unwrap(),
        "--remote-grace-secs",
        &grace,
    ];
    args.extend_from_slice(extra);
    start_with(failpoints, &args).await
}

fn bucket(garage: &Garage) -> Remote {
    bucket_at(garage, "fleet")
}

fn bucket_at(garage: &Garage, prefix: &str) -> Remote {
    Remote::new(
        &garage.url(prefix),
        &Credentials {
            access_key: garage.access_key.clone(),
            secret_key: garage.secret_key.clone(),
        },
    )
    .unwrap()
}

/// What the bucket holds under `prefix`: chunk ids, the chunks its manifests name, and the
/// snapshots with a manifest.
pub async fn bucket_contents(
    garage: &Garage,
    prefix: &str,
) -> (
    BTreeSet<snap_remote::ChunkId>,
    BTreeSet<snap_remote::ChunkId>,
    BTreeSet<String>,
) {
    let r = bucket_at(garage, prefix);
    let chunks = r
        .list_chunks()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    let mut named = BTreeSet::new();
    let mut snapshots = BTreeSet::new();
    for m in r.list_manifests().await.unwrap() {
        named.extend(r.get_manifest(&m.snapshot, &m.id).await.unwrap().chunks());
        snapshots.insert(snap_core::Id(m.snapshot).to_string());
    }
    (chunks, named, snapshots)
}

pub async fn push(c: &mut Client, snapshot: &str) -> pb::RemoteTransfer {
    let op = c
        .push_snapshot(pb::PushSnapshotRequest {
            request_id: rid("push"),
            snapshot_id: snapshot.into(),
            remote: "fleet".into(),
            wait: false,
        })
        .await
        .unwrap()
        .into_inner();
    succeeded(c, op).await.remote.unwrap()
}

pub async fn start_pull(c: &mut Client, snapshot: &str) -> pb::Operation {
    c.pull_snapshot(pb::PullSnapshotRequest {
        request_id: rid("pull"),
        snapshot_id: snapshot.into(),
        remote: "fleet".into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

/// Pulls `snapshot` and waits for the operation to end.
async fn pull(c: &mut Client, snapshot: &str) -> pb::Operation {
    let op = start_pull(c, snapshot).await;
    wait_op(c, op).await
}

/// Pulls `snapshot`, which must succeed.
async fn pulled(c: &mut Client, snapshot: &str) -> pb::OperationResult {
    let op = start_pull(c, snapshot).await;
    succeeded(c, op).await
}

async fn remote_op(c: &mut Client, delete: Option<&str>) -> pb::RemoteTransfer {
    let op = match delete {
        Some(s) => c
            .delete_remote_snapshot(pb::DeleteRemoteSnapshotRequest {
                request_id: rid("rdel"),
                snapshot_id: s.into(),
                remote: "fleet".into(),
                wait: false,
            })
            .await
            .unwrap()
            .into_inner(),
        None => c
            .sweep_remote(pb::SweepRemoteRequest {
                request_id: rid("sweep"),
                remote: "fleet".into(),
                wait: false,
            })
            .await
            .unwrap()
            .into_inner(),
    };
    succeeded(c, op).await.remote.unwrap()
}

/// On host `a`: VM `origin` (with a disk) runs 20 lines, is snapshotted as `name` and stopped;
/// the snapshot, and the output the uninterrupted run prints.
async fn stopped_origin(a: &mut Client, name: &str) -> (pb::Snapshot, String) {
    let program = long_guest();
    let model = model(&program);
    let vm = create_vm_running(a, "origin", true, program).await.id;
    wait_lines(a, &vm, 20).await;
    let (snap, _) = snapshot_at(a, &vm, name, &rid("snap")).await;
    stop(a, &vm).await;
    (snap, model)
}

fn lazy() -> pb::MemoryRestoreMode {
    pb::MemoryRestoreMode::Lazy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_chain_pushed_by_one_host_runs_on_another() {
    let test = "a_snapshot_chain_pushed_by_one_host_runs_on_another";
    if !kvm_available(test) || !garage_available(test) {
        return;
    }
    let garage = Garage::single_node();
    let dir = tempfile::tempdir().unwrap();
    let (_a, mut a) = host(&garage, dir.path(), "a", &garage.secret_key).await;
    let (b_daemon, mut b) = host(&garage, dir.path(), "b", &garage.secret_key).await;
    let program = long_guest();
    let model = model(&program);

    // Host A: a VM with a disk, a full snapshot and two diffs, each pushed.
    let vm = create_vm_running(&mut a, "origin", true, program).await.id;
    let mut snaps = Vec::new();
    for (i, lines) in [15, 30, 45].into_iter().enumerate() {
        wait_lines(&mut a, &vm, lines).await;
        let (s, _) = snapshot_at(&mut a, &vm, &format!("s{i}"), &rid("snap")).await;
        snaps.push(s);
    }
    stop(&mut a, &vm).await;
    let first = push(&mut a, &snaps[0].id).await;
    assert!(
        first.chunks_uploaded > 0 && first.content_bytes > 0,
        "{first:?}"
    );
    for s in &snaps[1..] {
        let t = push(&mut a, &s.id).await;
        assert!(
            t.chunks_deduplicated > 0,
            "a child's push reuses its parents' chunks: {t:?}"
        );
    }
    let again = push(&mut a, &snaps[2].id).await;
    assert_eq!(
        (again.chunks_uploaded, again.chunks_deduplicated),
        (0, again.chunks),
        "a second push of the same snapshot sends nothing"
    );

    // Both hosts list the three snapshots.
    let listed = b
        .list_remote_snapshots(pb::ListRemoteSnapshotsRequest {
            remote: "fleet".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    let mut ids: Vec<&str> = listed.iter().map(|s| s.snapshot_id.as_str()).collect();
    ids.sort_unstable();
    let mut want: Vec<&str> = snaps.iter().map(|s| s.id.as_str()).collect();
    want.sort_unstable();
    assert_eq!(ids, want);
    assert!(listed.iter().all(|s| s.vm_name == "origin" && s.chunks > 0));

    // Host B pulls the newest, restores it lazily and clones it five times: every guest
    // continues exactly.
    let newest = pulled(&mut b, &snaps[2].id).await;
    let s2 = newest.snapshot.unwrap();
    assert_eq!(
        (s2.id.as_str(), s2.name.as_str()),
        (snaps[2].id.as_str(), "s2")
    );
    assert_eq!(s2.vm_id, vm, "the snapshot keeps its VM's id");
    assert!(newest.remote.unwrap().stored_bytes > 0);
    let restored = restore_new(&mut b, &s2.id, "restored", lazy()).await;
    let op = b
        .clone_snapshot(pb::CloneSnapshotRequest {
            request_id: rid("clone"),
            snapshot_id: s2.id.clone(),
            count: 5,
            name_prefix: "clone".into(),
            memory_mode: lazy() as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let clones = succeeded(&mut b, op).await.vms;
    assert_eq!(clones.len(), 5);
    // A pull again is answered with the snapshot already here.
    let again = pulled(&mut b, &snaps[2].id).await;
    assert_eq!(again.snapshot.unwrap().id, s2.id);

    // A deletes its local snapshots and the remote copy of the oldest, then sweeps once the
    // grace period has passed: B's VMs run on, and the bucket holds exactly what the remaining
    // manifests name.
    crate::common::delete_vm(&mut a, &vm, true).await;
    assert_eq!(
        remote_op(&mut a, Some(&snaps[0].id))
            .await
            .manifests_deleted,
        1
    );
    tokio::time::sleep(Duration::from_secs(GRACE_SECS + 1)).await;
    let swept = remote_op(&mut a, None).await;
    let (chunks, named, _) = bucket_contents(&garage, "fleet").await;
    assert_eq!(
        chunks, named,
        "after the sweep: exactly the named chunks ({swept:?})"
    );

    continues_exactly(&mut b, &restored.id, &model, 80).await;
    for v in &clones {
        continues_exactly(&mut b, &v.id, &model, 80).await;
    }

    // The middle snapshot, still in the remote, pulls and restores on B after the sweep; it
    // shares the layers B already holds.
    let mid = pulled(&mut b, &snaps[1].id).await;
    let t = mid.remote.unwrap();
    assert!(t.layers_shared > 0, "layers B holds are shared: {t:?}");
    let v = restore_new(&mut b, &snaps[1].id, "middle", lazy()).await;
    continues_exactly(&mut b, &v.id, &model, 60).await;
    b_daemon.assert_files_match_catalog("after pulls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_failures_change_nothing_and_say_what_failed() {
    let test = "remote_failures_change_nothing_and_say_what_failed";
    if !kvm_available(test) || !garage_available(test) {
        return;
    }
    let garage = Garage::single_node();
    let dir = tempfile::tempdir().unwrap();
    let (mut a_daemon, mut a) = host(&garage, dir.path(), "a", &garage.secret_key).await;
    let vm = create_vm(&mut a, "origin", true).await.id;
    wait_lines(&mut a, &vm, 20).await;
    let (snap, _) = snapshot_at(&mut a, &vm, "s", &rid("snap")).await;
    stop(&mut a, &vm).await;

    // kill -9 in the middle of a push: no manifest; the retry sends only what is missing.
    a_daemon.restart("remote.push-chunk=sleep:150");
    let mut a = a_daemon.client().await;
    let op = a
        .push_snapshot(pb::PushSnapshotRequest {
            request_id: rid("push"),
            snapshot_id: snap.id.clone(),
            remote: "fleet".into(),
            wait: false,
        })
        .await
        .unwrap()
        .into_inner();
    wait_phase(&mut a, &op, |p| p == "pushing").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    a_daemon.kill9();
    // (An upload the server had whole when the daemon died may still land.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = bucket(&garage);
    assert!(r.list_manifests().await.unwrap().is_empty(), "no manifest");
    let stored_before = r.list_chunks().await.unwrap().len() as u64;
    assert!(stored_before > 0, "some chunks were stored before the kill");
    let mut a = respawn(&mut a_daemon, "").await;
    let t = push(&mut a, &snap.id).await;
    assert_eq!(
        t.chunks_deduplicated, stored_before,
        "the retry reuses every chunk stored before the kill: {t:?}"
    );
    assert_eq!(t.chunks_uploaded, t.chunks - stored_before);

    // A chunk overwritten in the bucket with other bytes: the pull fails naming the chunk and
    // the snapshot, and host B's catalog and files are unchanged.
    let (b_daemon, mut b) = host(&garage, dir.path(), "b", &garage.secret_key).await;
    let manifest = r
        .get_manifest(
            &r.list_manifests().await.unwrap()[0].snapshot,
            &t.manifest_id.parse().unwrap(),
        )
        .await
        .unwrap();
    let frames: Vec<_> = manifest.memory[0]
        .frames
        .iter()
        .filter_map(|f| f.chunk)
        .collect();
    let (victim, other) = (frames[0], frames[1]);
    let raw = garage.raw_store();
    let key = |c: snap_remote::ChunkId| object_store::path::Path::from(c.key("fleet").as_str());
    let bytes = raw.get(&key(other)).await.unwrap().bytes().await.unwrap();
    raw.put(&key(victim), bytes.into()).await.unwrap();
    let ended = pull(&mut b, &snap.id).await;
    assert_eq!(ended.state(), pb::OperationState::Failed);
    let e = ended.error.unwrap();
    assert_eq!(e.code, Code::FailedPrecondition as i32, "{}", e.message);
    assert!(
        e.message.contains(&victim.to_string()) && e.message.contains(&snap.id),
        "names the chunk and the snapshot: {}",
        e.message
    );
    assert_eq!(snapshot_count(&mut b).await, 0, "nothing was recorded");
    b_daemon.assert_files_match_catalog("after a failed pull");
    assert!(b_daemon.layer_files().is_empty(), "no file is left");

    // Unknown snapshots and remotes, and wrong credentials, are told as such.
    let e = pull(&mut b, &"0".repeat(32)).await.error.unwrap();
    assert_eq!(e.code, Code::NotFound as i32, "{}", e.message);
    let e = b
        .pull_snapshot(pb::PullSnapshotRequest {
            request_id: rid("pull"),
            snapshot_id: snap.id.clone(),
            remote: "elsewhere".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("fleet"), "lists the remotes: {e}");
    let (_c_daemon, mut c) = host(&garage, dir.path(), "c", &"0".repeat(64)).await;
    let e = c
        .list_remote_snapshots(pb::ListRemoteSnapshotsRequest {
            remote: "fleet".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(
        e.message().contains("credentials were refused") && e.message().contains(&garage.endpoint),
        "{e}"
    );
}

/// Restores a remote snapshot lazily into a new VM left paused, without pulling it.
async fn restore_remote_paused(c: &mut Client, snapshot: &str, name: &str) -> pb::Operation {
    let op = c
        .restore_snapshot(pb::RestoreSnapshotRequest {
            request_id: rid("rrestore"),
            snapshot_id: snapshot.into(),
            target: Some(pb::restore_snapshot_request::Target::NewVm(pb::NewVm {
                name: name.into(),
                ..Default::default()
            })),
            memory_mode: lazy() as i32,
            leave_paused: true,
            remote: "fleet".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    wait_op(c, op).await
}

/// Restores a remote snapshot into a new VM without pulling it.
async fn restore_remote(
    c: &mut Client,
    snapshot: &str,
    name: &str,
    mode: pb::MemoryRestoreMode,
) -> pb::Operation {
    let op = c
        .restore_snapshot(pb::RestoreSnapshotRequest {
            request_id: rid("rrestore"),
            snapshot_id: snapshot.into(),
            target: Some(pb::restore_snapshot_request::Target::NewVm(pb::NewVm {
                name: name.into(),
                ..Default::default()
            })),
            memory_mode: mode as i32,
            remote: "fleet".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    wait_op(c, op).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_restores_and_clones_straight_from_the_remote() {
    let test = "a_host_restores_and_clones_straight_from_the_remote";
    if !kvm_available(test) || !garage_available(test) {
        return;
    }
    let mut garage = Garage::single_node();
    let dir = tempfile::tempdir().unwrap();
    let (a_daemon, mut a) = host(&garage, dir.path(), "a", &garage.secret_key).await;
    let (b_daemon, mut b) = host(&garage, dir.path(), "b", &garage.secret_key).await;
    let (snap, model) = stopped_origin(&mut a, "warm").await;
    // A prefetch restore on A records the snapshot's working set, which the push carries.
    let warm = restore_new(&mut a, &snap.id, "warm-a", pb::MemoryRestoreMode::Prefetch).await;
    let wset = a_daemon.data().join(format!("states/{}.wset", snap.id));
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !wset.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no working set was recorded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop(&mut a, &warm.id).await;
    push(&mut a, &snap.id).await;

    // B restores it in each mode and clones it, never pulling it: every guest is exact.
    let mut made = Vec::new();
    for (name, mode) in [
        ("lazy", pb::MemoryRestoreMode::Lazy),
        ("prefetch", pb::MemoryRestoreMode::Prefetch),
        ("eager", pb::MemoryRestoreMode::Eager),
    ] {
        let op = restore_remote(&mut b, &snap.id, name, mode).await;
        assert_eq!(
            op.state(),
            pb::OperationState::Succeeded,
            "{name}: {:?}",
            op.error
        );
        made.push(op.result.unwrap().vms.remove(0));
    }
    let op = b
        .clone_snapshot(pb::CloneSnapshotRequest {
            request_id: rid("rclone"),
            snapshot_id: snap.id.clone(),
            count: 3,
            name_prefix: "rclone".into(),
            memory_mode: lazy() as i32,
            remote: "fleet".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    made.extend(succeeded(&mut b, op).await.vms);
    assert_eq!(snapshot_count(&mut b).await, 0, "nothing was pulled");
    let restored = made[0].id.clone();
    for v in &made[1..] {
        continues_exactly(&mut b, &v.id, &model, 60).await;
    }
    // The lazily restored VM snapshots (a full snapshot: no local layer is its base) and that
    // snapshot restores exactly.
    wait_lines(&mut b, &restored, 30).await;
    let (local, _) = snapshot_at(&mut b, &restored, "local", &rid("snap")).await;
    let again = restore_new(&mut b, &local.id, "again", lazy()).await;
    continues_exactly(&mut b, &again.id, &model, 40).await;
    continues_exactly(&mut b, &restored, &model, 60).await;
    b_daemon.assert_files_match_catalog("after restores from the remote");

    // The store gone: an eager restore fails UNAVAILABLE naming it; nothing is made here.
    let vms_before = list_vms(&mut b).await.len();
    let files_before = b_daemon.layer_files();
    let endpoint = garage.endpoint.clone();
    garage.kill();
    let op = restore_remote(
        &mut b,
        &snap.id,
        "unreachable",
        pb::MemoryRestoreMode::Eager,
    )
    .await;
    assert_eq!(op.state(), pb::OperationState::Failed);
    let e = op.error.unwrap();
    assert_eq!(e.code, Code::Unavailable as i32, "{}", e.message);
    assert!(
        e.message.contains(&endpoint),
        "names the store: {}",
        e.message
    );
    assert_eq!(list_vms(&mut b).await.len(), vms_before, "no VM was made");
    assert_eq!(b_daemon.layer_files(), files_before, "no file was left");
}

/// The disks of a lazy restore straight from the remote are read lazily too: the restore
/// publishes its VM with disk layers that hold no block yet (their files fail a check), the
/// guest runs exactly on blocks fetched as it reads them, a snapshot of it builds on those
/// layers, and across a kill -9 the layers still filling are taken up again: the snapshot
/// restores exactly, and the filler then brings every block into the files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_blocks_arrive_as_the_guest_reads_them_and_across_kill_9() {
    let test = "disk_blocks_arrive_as_the_guest_reads_them_and_across_kill_9";
    if !kvm_available(test) || !garage_available(test) {
        return;
    }
    let garage = Garage::single_node();
    let dir = tempfile::tempdir().unwrap();
    let url = garage.url("fleet");
    // Both hosts serve metrics: what the push and the restore did shows there.
    let (a_metrics, b_metrics) = (
        format!("127.0.0.1:{}", snap_testkit::free_port()),
        format!("127.0.0.1:{}", snap_testkit::free_port()),
    );
    let (_a_daemon, mut a) = host_with(
        &url,
        &garage.access_key,
        dir.path(),
        "a",
        &garage.secret_key,
        "",
        &["--metrics", &a_metrics],
    )
    .await;
    // B's background filler is held back, so the layers stay as the restore made them.
    let (mut b_daemon, mut b) = host_with(
        &url,
        &garage.access_key,
        dir.path(),
        "b",
        &garage.secret_key,
        "filling.layer=fail:1000000",
        &["--metrics", &b_metrics],
    )
    .await;
    let (snap, model) = stopped_origin(&mut a, "warm").await;
    let pushed = push(&mut a, &snap.id).await;
    let metrics = super::metrics::python_parser(test);
    if metrics {
        use super::metrics::{parse, scrape, value};
        let s = parse(&scrape(&a_metrics).await.1);
        let chunks = |result| {
            value(
                &s,
                "snapd_remote_chunks_total",
                &[("remote", "fleet"), ("result", result)],
            )
        };
        assert_eq!(chunks("uploaded"), pushed.chunks_uploaded as f64);
        assert_eq!(chunks("deduplicated"), pushed.chunks_deduplicated as f64);
        assert!(pushed.chunks_uploaded > 0);
    }

    // Restored paused, so that the guest reads nothing before the layer is looked at.
    let op = restore_remote_paused(&mut b, &snap.id, "lazy").await;
    assert_eq!(op.state(), pb::OperationState::Succeeded, "{:?}", op.error);
    let mut result = op.result.unwrap();
    let t = result.remote.unwrap();
    assert_eq!(
        (t.remote.as_str(), &t.manifest_id),
        ("fleet", &pushed.manifest_id)
    );
    assert!(t.content_bytes > 0 && t.stored_bytes > 0, "{t:?}");
    let restored = result.vms.remove(0).id;
    let filling = b_daemon.filling_layers();
    assert_eq!(filling.len(), 1, "the disk's one layer fills: {filling:?}");
    let sparse = b_daemon.layer_path(&filling[0]);
    let report = snap_disk::check_layer(&sparse).unwrap();
    assert!(
        report.problems.len() as u64 == report.blocks_checked
            && report.problems.iter().all(|p| p.contains("checksum")),
        "the file holds no block yet: {report}"
    );
    resume(&mut b, &restored).await;
    if metrics {
        use super::metrics::{parse, scrape, value};
        let s = parse(&scrape(&b_metrics).await.1);
        let restores = "snapd_restore_duration_seconds_count";
        assert_eq!(value(&s, restores, &[("mode", "lazy")]), 1.0);
        // A host that never saw the snapshot finds nothing in its cache at first.
        assert!(value(&s, "snapd_remote_cache_reads_total", &[("result", "miss")]) > 0.0);
    }
    // The guest reads its disk (each line hashes a sector read back): its blocks arrive.
    wait_lines(&mut b, &restored, 30).await;
    let (local, _) = snapshot_at(&mut b, &restored, "local", &rid("snap")).await;
    continues_exactly(&mut b, &restored, &model, 60).await;
    assert_eq!(b_daemon.filling_layers(), filling, "still filling");

    b_daemon.kill9();
    let mut b = respawn(&mut b_daemon, "").await;
    let again = restore_new(&mut b, &local.id, "again", lazy()).await;
    continues_exactly(&mut b, &again.id, &model, 40).await;
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !b_daemon.filling_layers().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the layers never filled: {:?}",
            b_daemon.filling_layers()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for f in b_daemon.layer_files() {
        if f.ends_with(".dlayer") && !f.starts_with('.') {
            let path = b_daemon.data().join("layers").join(&f);
            let sealed = snap_disk::layer_info(&path).unwrap().digest.is_some();
            if sealed {
                let report = snap_disk::check_layer(&path).unwrap();
                assert!(report.is_clean(), "{report}");
            }
        }
    }
    b_daemon.assert_files_match_catalog("after the layers filled");
}

/// Against a three-node Garage cluster (replication factor 3): with one node killed during a
/// lazy restore straight from the remote, the restore completes and the guest is exact; with two
/// killed, a restore fails UNAVAILABLE naming the store, no VM runs, and nothing changes here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_survive_one_of_three_nodes_and_fail_cleanly_without_two() {
    let test = "restores_survive_one_of_three_nodes_and_fail_cleanly_without_two";
    if !kvm_available(test) || !garage_available(test) {
        return;
    }
    let mut cluster = GarageCluster::three_nodes();
    let dir = tempfile::tempdir().unwrap();
    let (url, key, secret) = (
        cluster.url("fleet"),
        cluster.nodes[0].access_key.clone(),
        cluster.nodes[0].secret_key.clone(),
    );
    let (_a_daemon, mut a) = host_at(&url, &key, dir.path(), "a", &secret).await;
    let (b_daemon, mut b) = host_at(&url, &key, dir.path(), "b", &secret).await;
    let (snap, model) = stopped_origin(&mut a, "s").await;
    push(&mut a, &snap.id).await;

    // One node down right as the lazy restore starts: the guest's memory still arrives whole.
    let op = b
        .restore_snapshot(pb::RestoreSnapshotRequest {
            request_id: rid("rrestore"),
            snapshot_id: snap.id.clone(),
            target: Some(pb::restore_snapshot_request::Target::NewVm(pb::NewVm {
                name: "survivor".into(),
                ..Default::default()
            })),
            memory_mode: lazy() as i32,
            remote: "fleet".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    cluster.nodes[2].kill();
    let made = succeeded(&mut b, op).await.vms.remove(0);
    continues_exactly(&mut b, &made.id, &model, 60).await;
    // A pull with one node down works too.
    let pulled = pulled(&mut b, &snap.id).await;
    assert!(pulled.snapshot.is_some());

    // Two nodes down: no quorum. The restore fails UNAVAILABLE naming the store; no VM runs on
    // partial memory and the catalog is as it was.
    cluster.nodes[1].kill();
    let vms_before = list_vms(&mut b).await.len();
    let snaps_before = snapshot_count(&mut b).await;
    let files_before = b_daemon.layer_files();
    let started = std::time::Instant::now();
    let op = restore_remote(&mut b, &snap.id, "partial", pb::MemoryRestoreMode::Lazy).await;
    assert_eq!(op.state(), pb::OperationState::Failed, "{op:?}");
    let e = op.error.unwrap();
    assert_eq!(e.code, Code::Unavailable as i32, "{}", e.message);
    assert!(
        e.message.contains(&cluster.nodes[0].endpoint),
        "names the store: {}",
        e.message
    );
    println!(
        "two of three nodes down: failed in {:?}: {}",
        started.elapsed(),
        e.message
    );
    assert_eq!(list_vms(&mut b).await.len(), vms_before, "no VM was made");
    assert_eq!(snapshot_count(&mut b).await, snaps_before);
    assert_eq!(b_daemon.layer_files(), files_before, "no file was left");
    b_daemon.assert_files_match_catalog("after the failed restore");
}

/// Ten VMs created from one disk image, each snapshotted and pushed: the image's bytes are
/// stored in the bucket once (each later VM adds about what is its own: the memory its guest
/// wrote, its disk writes), measured as bytes in the bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_vms_from_one_image_store_the_image_once() {
    let test = "ten_vms_from_one_image_store_the_image_once";
    if !kvm_available(test) || !garage_available(test) {
        return;
    }
    let garage = Garage::single_node();
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    // 8 MiB that do not compress: the image dominates what a VM pushes.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let image: Vec<u8> = (0..8 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(images.join("base.img"), &image).unwrap();
    let creds = dir.path().join("creds");
    write_private(
        &creds,
        &format!(
            "AWS_ACCESS_KEY_ID={}\nAWS_SECRET_ACCESS_KEY={}\n",
            garage.access_key, garage.secret_key
        ),
    );
    let remote = format!("fleet={}", garage.url("fleet"));
    let (_d, mut c) = start_with(
        "",
        &[
            "--image-dir",
            images.to_str().unwrap(),
            "--remote",
            &remote,
            "--remote-credentials",
            creds.to_str().unwrap(),
        ],
    )
    .await;
    let bucket_bytes = || async {
        bucket(&garage)
            .list_chunks()
            .await
            .unwrap()
            .iter()
            .map(|c| c.size)
            .sum::<u64>()
    };
    let mut after = Vec::new();
    let mut content = 0;
    for i in 0..10 {
        let mut request = vm_request(&format!("vm{i}"), true, long_guest());
        request.disks[0].size_bytes = 0;
        request.disks[0].image_path = images.join("base.img").display().to_string();
        let vm = c.create_vm(request).await.unwrap().into_inner().id;
        wait_lines(&mut c, &vm, 10).await;
        let s = take_snapshot(&mut c, &vm, "s").await;
        stop(&mut c, &vm).await;
        content += push(&mut c, &s.id).await.content_bytes;
        after.push(bucket_bytes().await);
    }
    let (first, all) = (after[0], after[9]);
    let own = first.saturating_sub(image.len() as u64);
    println!(
        "10 VMs from one {} MiB image: {content} bytes of content pushed; the bucket holds {first} bytes after the first, {all} after all ten ({:.2}x one VM, {:.1}% of the content)",
        image.len() >> 20,
        all as f64 / first as f64,
        100.0 * all as f64 / content as f64
    );
    assert!(first >= image.len() as u64, "the image is in the bucket");
    assert!(
        all - first <= 9 * own + first / 10,
        "each later VM adds only its own bytes: {after:?}"
    );
    assert!(all < 2 * first, "the image is stored once: {after:?}");
}
