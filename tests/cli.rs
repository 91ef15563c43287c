//! Tests of snapctl: the real snapctl binary against the real daemon on a temporary socket,
//! with `--json` output parsed and checked.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use snap_testkit::kvm_available;
use snap_testkit::snapd::Snapd;

/// The daemon, and snapctl run against it.
struct Daemon(Snapd);

impl Daemon {
    fn start() -> Self {
        let mut d = Snapd::new(env!("CARGO_BIN_EXE_snapd"), &[]);
        d.start("");
        Self(d)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = snapctl(&self.0.socket(), args);
        assert!(
            out.status.success(),
            "snapctl {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs `snapctl --json <args>` and parses its one JSON document.
    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let text = self.ok(&all);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("snapctl {args:?}: {e}: {text}"))
    }

    /// Runs snapctl expecting it to fail; returns its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = snapctl(&self.0.socket(), args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "snapctl {args:?} should fail with status 1: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }
}

fn snapctl(socket: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_snapctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running snapctl")
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect()
}

/// Without a daemon: usage errors exit 2, an unreachable daemon is UNAVAILABLE with status 1.
#[test]
fn snapctl_without_a_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("none.sock");
    let out = snapctl(&socket, &["vm", "list"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.starts_with("snapctl: UNAVAILABLE: "), "{err}");
    assert!(err.contains("none.sock"), "{err}");

    let out = snapctl(&socket, &["snapshot", "restore", "x"]);
    assert_eq!(out.status.code(), Some(2), "no --into or --new");
    let out = snapctl(&socket, &["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for command in ["vm", "snapshot", "op", "events", "bench"] {
        assert!(help.contains(command), "{help}");
    }
}

/// VMs and snapshots through snapctl: create, list, get by name, retry by request id,
/// snapshot, list, tree, restore into a new VM, delete, wait for an operation started with
/// --no-wait, and errors for names that do not exist.
#[test]
fn vms_and_snapshots_through_snapctl() {
    if !kvm_available("vms_and_snapshots_through_snapctl") {
        return;
    }
    let d = Daemon::start();
    // A guest that runs for the whole test.
    let vm = d.json(&[
        "vm",
        "create",
        "demo",
        "--memory-mib",
        "32",
        "--ticks",
        "200000",
        "--start",
        "--label",
        "team=a",
        "--disk",
        "root=1",
        "--disk-sectors-per-tick",
        "2",
    ]);
    assert_eq!(vm["name"], "demo");
    assert_eq!(vm["disks"][0]["name"], "root");
    assert_eq!(vm["disks"][0]["size_bytes"], 1 << 20);
    assert_eq!(vm["state"], "VM_STATE_RUNNING");
    assert_eq!(vm["memory_bytes"], 32 << 20);
    assert_eq!(vm["labels"]["team"], "a");
    let vm_id = vm["id"].as_str().unwrap().to_string();
    assert_eq!(d.json(&["vm", "get", "demo"])["id"], vm_id.as_str());
    assert_eq!(d.json(&["vm", "get", &vm_id])["name"], "demo");

    // The same request id twice: one VM.
    let first = d.json(&[
        "vm",
        "create",
        "other",
        "--memory-mib",
        "32",
        "--request-id",
        "cli-test-other",
    ]);
    let again = d.json(&[
        "vm",
        "create",
        "other",
        "--memory-mib",
        "32",
        "--request-id",
        "cli-test-other",
    ]);
    assert_eq!(first["id"], again["id"]);
    assert_eq!(first["state"], "VM_STATE_CREATED");
    let all = d.json(&["vm", "list"]);
    assert_eq!(names(&all["vms"]), ["demo", "other"]);
    let team = d.json(&["vm", "list", "--label", "team=a"]);
    assert_eq!(names(&team["vms"]), ["demo"]);

    // Two snapshots: s2's parent is s1.
    let op = d.json(&["snapshot", "create", "demo", "s1", "--label", "k=v"]);
    assert_eq!(op["kind"], "OPERATION_KIND_CREATE_SNAPSHOT");
    assert_eq!(op["state"], "OPERATION_STATE_SUCCEEDED");
    let s1 = op["result"]["snapshot"].clone();
    assert_eq!(s1["name"], "s1");
    assert_eq!(s1["vm_id"], vm_id.as_str());
    assert_eq!(s1["parent_id"], "");
    assert_eq!(s1["labels"]["k"], "v");
    assert!(s1["pause_us"].as_u64().unwrap() > 0, "{s1}");
    assert_eq!(op["pause_us"], s1["pause_us"]);
    let s1_id = s1["id"].as_str().unwrap().to_string();
    let s2 = d.json(&["snapshot", "create", &vm_id, "s2"])["result"]["snapshot"].clone();
    assert_eq!(s2["parent_id"], s1_id.as_str());
    let s2_id = s2["id"].as_str().unwrap().to_string();

    let listed = d.json(&["snapshot", "list", "--vm", "demo"]);
    assert_eq!(names(&listed["snapshots"]), ["s1", "s2"]);
    let roots = d.json(&["snapshot", "list", "--roots"]);
    assert_eq!(names(&roots["snapshots"]), ["s1"]);
    let children = d.json(&["snapshot", "list", "--parent", "demo/s1"]);
    assert_eq!(names(&children["snapshots"]), ["s2"]);
    assert_eq!(
        d.json(&["snapshot", "get", "demo/s2"])["id"],
        s2_id.as_str()
    );

    let tree = d.json(&["snapshot", "tree", "demo"]);
    assert_eq!(tree["current_snapshot_id"], s2_id.as_str());
    assert_eq!(tree["root_ids"], serde_json::json!([s1_id]));
    assert_eq!(tree["nodes"][0]["child_ids"], serde_json::json!([s2_id]));
    let text = d.ok(&["snapshot", "tree", "demo"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with("s1  "), "{text}");
    assert!(
        lines[1].starts_with("└── s2  ") && lines[1].ends_with("◀ current"),
        "s2 is current, under s1: {text}"
    );

    // s1 into a new VM, lazily.
    let op = d.json(&[
        "snapshot", "restore", "demo/s1", "--new", "copy", "--mode", "lazy",
    ]);
    assert_eq!(op["kind"], "OPERATION_KIND_RESTORE_SNAPSHOT");
    assert_eq!(op["state"], "OPERATION_STATE_SUCCEEDED");
    let copy = &op["result"]["vms"][0];
    assert_eq!(copy["name"], "copy");
    assert_eq!(copy["current_snapshot_id"], s1_id.as_str());
    assert_eq!(d.json(&["vm", "get", "copy"])["state"], "VM_STATE_RUNNING");

    // Delete s1: s2 becomes a root, s1 is gone.
    let op = d.json(&["snapshot", "delete", &s1_id]);
    assert_eq!(op["state"], "OPERATION_STATE_SUCCEEDED");
    assert_eq!(
        op["result"]["deleted_snapshot_ids"],
        serde_json::json!([s1_id])
    );
    let err = d.fails(&["snapshot", "get", &s1_id]);
    assert!(err.starts_with("snapctl: NOT_FOUND: "), "{err}");
    assert_eq!(d.json(&["snapshot", "get", &s2_id])["parent_id"], "");

    // An operation started without waiting, then waited for.
    let op = d.json(&["snapshot", "create", "demo", "s3", "--no-wait"]);
    let op_id = op["id"].as_str().unwrap().to_string();
    let ended = d.json(&["op", "wait", &op_id]);
    assert_eq!(ended["state"], "OPERATION_STATE_SUCCEEDED", "{ended}");
    assert_eq!(ended["result"]["snapshot"]["name"], "s3");
    let ops = d.json(&["op", "list", "--vm", "demo"]);
    let snapshots_taken = ops["operations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["kind"] == "OPERATION_KIND_CREATE_SNAPSHOT")
        .count();
    assert_eq!(snapshots_taken, 3, "{ops}");

    // Names that do not exist.
    let err = d.fails(&["vm", "get", "no-such-vm"]);
    assert!(
        err.starts_with("snapctl: NOT_FOUND: ") && err.contains("no-such-vm"),
        "{err}"
    );
    let err = d.fails(&["snapshot", "create", "no-such-vm", "x"]);
    assert!(err.contains("NOT_FOUND"), "{err}");
    let err = d.fails(&["vm", "get", "0123456789abcdef0123456789abcdef"]);
    assert!(
        err.starts_with("snapctl: NOT_FOUND: "),
        "the daemon's answer: {err}"
    );
    // A running VM cannot be deleted: the daemon's code and message come through.
    let err = d.fails(&["vm", "delete", "copy"]);
    assert!(err.starts_with("snapctl: FAILED_PRECONDITION: "), "{err}");

    // Stop and delete the copy.
    assert_eq!(d.json(&["vm", "stop", "copy"])["state"], "VM_STATE_STOPPED");
    let op = d.json(&["vm", "delete", "copy"]);
    assert_eq!(op["kind"], "OPERATION_KIND_DELETE_VM");
    assert_eq!(op["state"], "OPERATION_STATE_SUCCEEDED");
    assert_eq!(names(&d.json(&["vm", "list"])["vms"]), ["demo", "other"]);
}

/// A short load bench with two clients prints a line per kind of call and draws its plot, and
/// the idle-VM memory measurement finds the daemon through the socket.
#[test]
fn bench_through_snapctl() {
    if !kvm_available("bench_through_snapctl") {
        return;
    }
    let d = Daemon::start();
    let plot = tempfile::tempdir().unwrap();
    let svg = plot.path().join("bench.svg");
    let out = d.ok(&[
        "bench",
        "--clients",
        "2",
        "--duration-secs",
        "2",
        "--memory-mib",
        "32",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    let drawn = std::fs::read_to_string(&svg).unwrap();
    assert!(drawn.starts_with("<svg") && drawn.contains("VM pause per snapshot"));
    assert!(
        drawn.contains("create_snapshot ("),
        "a curve per kind of call"
    );
    for call in [
        "create_vm",
        "create_snapshot",
        "restore_snapshot",
        "delete_snapshot",
        "stop_vm",
        "delete_vm",
    ] {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("{call} ")))
            .unwrap_or_else(|| panic!("no line for {call}: {out}"));
        let calls: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(calls > 0, "{line}");
    }
    assert!(out.contains("snapshot pause (Snapshot.pause_us)"), "{out}");
    assert!(
        out.contains("cleanup: everything the clients made was deleted"),
        "{out}"
    );
    assert_eq!(d.json(&["vm", "list"])["vms"], serde_json::json!([]));
    assert_eq!(
        d.json(&["snapshot", "list"])["snapshots"],
        serde_json::json!([])
    );

    let mem = d.json(&["bench", "--idle-vms", "2", "--memory-mib", "32"]);
    assert_eq!(mem["idle_vms"], 2);
    assert!(
        mem["before"]["status"]["VmRSS"].as_u64().unwrap() > 0,
        "{mem}"
    );
    assert!(mem["beyond_guest_kib_per_vm"].is_number(), "{mem}");
    assert_eq!(mem["cleanup_failures"], serde_json::json!([]));
    assert_eq!(d.json(&["vm", "list"])["vms"], serde_json::json!([]));
}
