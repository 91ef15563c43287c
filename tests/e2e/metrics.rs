//! The metrics listener (`snapd --metrics ADDR`): off by default, bound where told, and after a
//! scripted story every counter and histogram it exports moved by exactly what the story did.
//! Each scrape is parsed by the Prometheus project's own OpenMetrics parser (Python's
//! `prometheus_client`), which checks the format strictly.

use std::collections::BTreeMap;
use std::process::Command;

use snap_api::v1 as pb;

use super::common::*;

/// One sample of a scrape: metric name (as exposed: `_total`, `_count`, `_bucket` included),
/// labels, value.
type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

/// Whether Python's `prometheus_client` is installed; `.ci/run` installs it with grpcio and sets
/// SNAP_REQUIRE_GRPCIO=1, so there its absence fails the test.
pub(crate) fn python_parser(test: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import prometheus_client.openmetrics.parser"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("SNAP_REQUIRE_GRPCIO").as_deref() != Ok("1"),
            "{test}: Python prometheus_client is missing (pip install prometheus_client)"
        );
        println!("SKIP {test}: Python prometheus_client is not installed");
    }
    ok
}

/// GET `/metrics` from `addr`: the content type and the body.
pub(crate) async fn scrape(addr: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    (content_type, body.to_string())
}

/// The samples of `text`, parsed strictly as OpenMetrics (a parse error fails the test).
pub(crate) fn parse(text: &str) -> Samples {
    const PY: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    let mut child = Command::new("python3")
        .args(["-c", PY])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the scrape does not parse as OpenMetrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<(String, BTreeMap<String, String>, f64)> =
        serde_json::from_slice(&out.stdout).unwrap();
    rows.into_iter().map(|(n, l, v)| ((n, l), v)).collect()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

/// The value of `name{pairs}` in `s` (0 if absent).
pub(crate) fn value(s: &Samples, name: &str, pairs: &[(&str, &str)]) -> f64 {
    s.get(&(name.to_string(), labels(pairs)))
        .copied()
        .unwrap_or(0.0)
}

/// How much every sample of `after` moved since `before`, those that moved only.
fn moved(before: &Samples, after: &Samples) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for ((name, l), v) in after {
        let was = before
            .get(&(name.clone(), l.clone()))
            .copied()
            .unwrap_or(0.0);
        if (v - was).abs() > f64::EPSILON {
            let key = if l.is_empty() {
                name.clone()
            } else {
                let l: Vec<String> = l.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("{name}{{{}}}", l.join(","))
            };
            out.insert(key, v - was);
        }
    }
    out
}

/// The TCP ports process `pid` listens on, from /proc.
fn tcp_listeners(pid: u32) -> Vec<String> {
    let mut inodes = std::collections::BTreeSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let t = target.to_string_lossy().to_string();
            if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                inodes.insert(inode.to_string());
            }
        }
    }
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local address, state (0A: LISTEN), inode.
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                out.push(f[1].to_string());
            }
        }
    }
    out
}

/// The metrics listener is off unless asked for, and binds where told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_listener_is_off_by_default_and_binds_where_told() {
    let test = "the_metrics_listener_is_off_by_default_and_binds_where_told";
    if !kvm_available(test) || !python_parser(test) {
        return;
    }
    let (plain, _c) = start("").await;
    assert_eq!(
        tcp_listeners(plain.pid().unwrap()),
        Vec::<String>::new(),
        "no TCP listener without --metrics"
    );
    let port = snap_testkit::free_port();
    let addr = format!("127.0.0.1:{port}");
    let (daemon, _c) = start_with("", &["--metrics", &addr]).await;
    // /proc shows the address as hex: 0100007F is 127.0.0.1.
    assert_eq!(
        tcp_listeners(daemon.pid().unwrap()),
        vec![format!("0100007F:{port:04X}")]
    );
    let (content_type, body) = scrape(&addr).await;
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let s = parse(&body);
    assert_eq!(value(&s, "snapd_operations_open", &[]), 0.0);
    // A port taken is a clear error at start.
    let mut other = snap_testkit::snapd::Snapd::new(SNAPD, &["--metrics", &addr]);
    let e = other.try_start("", &[]).unwrap_err();
    assert!(e.contains("--metrics") && e.contains(&addr), "{e}");
}

/// A scripted story (a VM created, a snapshot that fails, one that succeeds and is asked for
/// again with the same request id, a diff, a lazy restore, a clone of two, a delete) moves each
/// counter and histogram by exactly what it did, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_counter_moves_by_what_the_story_did() {
    let test = "every_counter_moves_by_what_the_story_did";
    if !kvm_available(test) || !python_parser(test) {
        return;
    }
    let addr = format!("127.0.0.1:{}", snap_testkit::free_port());
    // The first snapshot fails after writing its files, before it is published.
    let (daemon, mut c) = start_with("snapshot.write-state=fail:1", &["--metrics", &addr]).await;
    let vm = create_vm_running(&mut c, "v", true, long_guest()).await.id;
    wait_lines(&mut c, &vm, 2).await;
    let before = parse(&scrape(&addr).await.1);

    let op = start_snapshot(&mut c, &vm, "fails").await.unwrap();
    assert_eq!(
        wait_op(&mut c, op).await.state(),
        pb::OperationState::Failed
    );
    let request_id = rid("snap");
    let (snap, _) = snapshot_at(&mut c, &vm, "a", &request_id).await;
    // The same request again: answered from the catalog, no second snapshot.
    let again = c
        .create_snapshot(pb::CreateSnapshotRequest {
            request_id: request_id.clone(),
            vm_id: vm.clone(),
            name: "a".into(),
            leave_paused: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let done = wait_op(&mut c, again).await;
    assert_eq!(done.snapshot_id, snap.id);
    let phases: Vec<&str> = done.phases.iter().map(|p| p.name.as_str()).collect();
    assert!(
        phases.contains(&"pausing") && phases.last() == Some(&"publishing"),
        "the operation lists its phases: {phases:?}"
    );
    // A diff on top of it.
    wait_lines(&mut c, &vm, 4).await;
    take_snapshot(&mut c, &vm, "b").await;
    let memory_files: Vec<String> = daemon
        .catalog_layer_files()
        .into_iter()
        .filter(|f| f.ends_with(".mlayer"))
        .collect();
    assert_eq!(memory_files.len(), 2, "{memory_files:?}");
    let memory_stored: u64 = memory_files
        .iter()
        .map(|f| {
            std::fs::metadata(daemon.data().join("layers").join(f))
                .unwrap()
                .len()
        })
        .sum();
    let restored = restore_new(&mut c, &snap.id, "r", pb::MemoryRestoreMode::Lazy).await;
    let op = start_clone(&mut c, &snap.id, "k", 2).await.unwrap();
    let clones = succeeded(&mut c, op).await.vms;
    wait_lines(&mut c, &restored.id, 2).await;
    for v in &clones {
        wait_lines(&mut c, &v.id, 2).await;
    }
    delete_snapshot(&mut c, &snap.id).await;
    let after = parse(&scrape(&addr).await.1);

    let d = moved(&before, &after);
    let want = |name: &str, pairs: &[(&str, &str)]| {
        value(&after, name, pairs) - value(&before, name, pairs)
    };
    let ops = "snapd_operations_total";
    assert_eq!(
        want(
            ops,
            &[("kind", "create_snapshot"), ("outcome", "succeeded")]
        ),
        2.0,
        "{d:#?}"
    );
    assert_eq!(
        want(ops, &[("kind", "create_snapshot"), ("outcome", "failed")]),
        1.0
    );
    assert_eq!(
        want(
            ops,
            &[("kind", "restore_snapshot"), ("outcome", "succeeded")]
        ),
        1.0
    );
    assert_eq!(
        want(ops, &[("kind", "clone_snapshot"), ("outcome", "succeeded")]),
        1.0
    );
    assert_eq!(
        want(
            ops,
            &[("kind", "delete_snapshot"), ("outcome", "succeeded")]
        ),
        1.0
    );
    let ended: f64 = d
        .iter()
        .filter(|(k, _)| k.starts_with("snapd_operations_total"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(ended, 6.0, "no other operation ended: {d:#?}");
    let took = "snapd_operation_duration_seconds_count";
    assert_eq!(want(took, &[("kind", "create_snapshot")]), 3.0);
    assert_eq!(want(took, &[("kind", "restore_snapshot")]), 1.0);
    assert_eq!(want(took, &[("kind", "clone_snapshot")]), 1.0);
    assert_eq!(want(took, &[("kind", "delete_snapshot")]), 1.0);
    // All three snapshots went through writing memory; the two published paused the VM for the
    // pause histogram.
    let phase = "snapd_operation_phase_duration_seconds_count";
    assert_eq!(
        want(
            phase,
            &[("kind", "create_snapshot"), ("phase", "writing memory")]
        ),
        3.0
    );
    assert_eq!(
        want(phase, &[("kind", "clone_snapshot"), ("phase", "restoring")]),
        2.0,
        "one phase per clone"
    );
    assert_eq!(want("snapd_snapshot_pause_seconds_count", &[]), 2.0);
    assert!(want("snapd_snapshot_pause_seconds_sum", &[]) > 0.0);
    // The restore and the clone both restored lazily.
    let restore = "snapd_restore_duration_seconds_count";
    assert_eq!(want(restore, &[("mode", "lazy")]), 2.0);
    assert_eq!(want(restore, &[("mode", "eager")]), 0.0);
    assert_eq!(want("snapd_request_id_hits_total", &[]), 1.0);
    // A full snapshot and a diff: two memory layers (the failed one's was removed).
    assert_eq!(
        want("snapd_layer_stored_bytes_total", &[("kind", "memory")]),
        memory_stored as f64
    );
    assert!(want("snapd_layer_content_bytes_total", &[("kind", "memory")]) > 0.0);
    assert!(want("snapd_layer_stored_bytes_total", &[("kind", "disk")]) > 0.0);
    assert_eq!(want("snapd_diff_dirty_pages_count", &[]), 1.0);
    assert!(want("snapd_diff_dirty_pages_sum", &[]) > 0.0);
    // Three lazily restored VMs installed their memory by faults, the filler or ahead.
    let installed = want("snapd_lazy_faults_total", &[])
        + want("snapd_lazy_filled_total", &[])
        + want("snapd_lazy_prefetched_total", &[]);
    assert!(installed > 0.0, "{d:#?}");
    assert!(
        want(
            "snapd_catalog_transaction_seconds_count",
            &[("access", "write")]
        ) >= 5.0
    );
    // The guests wrote their disks (sectors, each request counted) and flushed them.
    for op in ["read", "write"] {
        let bytes = want("snapd_disk_io_bytes_total", &[("op", op)]);
        assert!(bytes > 0.0 && bytes % 512.0 == 0.0, "{op}: {bytes}");
        assert!(want("snapd_disk_io_requests_total", &[("op", op)]) > 0.0);
    }
    assert!(want("snapd_disk_io_requests_total", &[("op", "flush")]) > 0.0);
    // Gauges: four VMs running, nothing open, space used and free.
    let running = list_vms(&mut c)
        .await
        .iter()
        .filter(|v| v.state() == pb::VmState::Running)
        .count();
    assert_eq!(
        value(&after, "snapd_vms", &[("state", "running")]),
        running as f64
    );
    assert_eq!(value(&after, "snapd_operations_open", &[]), 0.0);
    assert!(value(&after, "snapd_data_dir_bytes", &[("use", "used")]) > 0.0);
    assert!(value(&after, "snapd_data_dir_bytes", &[("use", "free")]) > 0.0);
    // No sample carries an id.
    for (name, l) in after.keys() {
        for v in l.values() {
            assert!(
                !(v.len() == 32 && v.chars().all(|c| c.is_ascii_hexdigit())),
                "{name} has an id as a label value: {l:?}"
            );
        }
    }
}

/// The Grafana dashboard in `deploy/grafana/snapd.json` is well formed as far as the Grafana
/// schema fields it uses go (panels on the 24-column grid without overlap, unique ids, a
/// Prometheus query per target), and every query names metrics, labels and label values the
/// daemon exports (a daemon with a remote configured, after one snapshot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_queries_only_what_the_daemon_exports() {
    let test = "the_dashboard_queries_only_what_the_daemon_exports";
    if !kvm_available(test) || !python_parser(test) {
        return;
    }
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/grafana/snapd.json"
    );
    let dash: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap())
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    let exprs = check_dashboard(&dash);
    assert!(exprs.len() >= 20, "{} queries", exprs.len());

    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("creds");
    write_private(&creds, "AWS_ACCESS_KEY_ID=k\nAWS_SECRET_ACCESS_KEY=s\n");
    let addr = format!("127.0.0.1:{}", snap_testkit::free_port());
    let (_daemon, mut c) = start_with(
        "",
        &[
            "--metrics",
            &addr,
            "--remote",
            "fleet=http://127.0.0.1:9/bucket",
            "--remote-credentials",
            creds.to_str().unwrap(),
        ],
    )
    .await;
    let vm = create_vm_running(&mut c, "v", true, long_guest()).await.id;
    wait_lines(&mut c, &vm, 2).await;
    take_snapshot(&mut c, &vm, "s").await;
    let samples = parse(&scrape(&addr).await.1);

    for expr in &exprs {
        for (name, matchers) in metrics_in(expr) {
            let of_name: Vec<&BTreeMap<String, String>> = samples
                .keys()
                .filter(|(n, _)| *n == name)
                .map(|(_, l)| l)
                .collect();
            assert!(
                !of_name.is_empty(),
                "the dashboard queries {name}, which the daemon does not export ({expr})"
            );
            for (key, value) in matchers {
                if key == "instance" {
                    continue;
                }
                assert!(
                    of_name.iter().any(|l| l.contains_key(&key)),
                    "{name} has no label {key:?} ({expr})"
                );
                if let Some(v) = value {
                    assert!(
                        of_name.iter().any(|l| l.get(&key) == Some(&v)),
                        "{name} has no series with {key}={v:?} ({expr})"
                    );
                }
            }
        }
    }
}

/// Checks the Grafana fields the dashboard uses; returns every target's query.
fn check_dashboard(d: &serde_json::Value) -> Vec<String> {
    let s = |v: &serde_json::Value, k: &str| -> String {
        v[k].as_str()
            .unwrap_or_else(|| panic!("{k} must be a string in {v}"))
            .to_string()
    };
    let n = |v: &serde_json::Value, k: &str| -> i64 {
        v[k].as_i64()
            .unwrap_or_else(|| panic!("{k} must be an integer in {v}"))
    };
    assert!(!s(d, "title").is_empty());
    let uid = s(d, "uid");
    assert!(
        !uid.is_empty()
            && uid.len() <= 40
            && uid
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "uid {uid:?}"
    );
    assert!(n(d, "schemaVersion") >= 30);
    assert!(d["time"]["from"].is_string() && d["time"]["to"].is_string());
    let vars: Vec<String> = d["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .map(|v| {
            assert!(v["type"].is_string(), "a variable has a type: {v}");
            s(v, "name")
        })
        .collect();
    assert!(vars.contains(&"datasource".to_string()) && vars.contains(&"instance".to_string()));
    let panels = d["panels"].as_array().expect("panels");
    let mut ids = std::collections::BTreeSet::new();
    let mut cells = std::collections::BTreeSet::new();
    let mut exprs = Vec::new();
    for p in panels {
        assert!(ids.insert(n(p, "id")), "panel ids are unique: {p}");
        let kind = s(p, "type");
        assert!(
            ["row", "timeseries", "stat"].contains(&kind.as_str()),
            "panel type {kind}"
        );
        assert!(!s(p, "title").is_empty());
        let g = &p["gridPos"];
        let (x, y, w, h) = (n(g, "x"), n(g, "y"), n(g, "w"), n(g, "h"));
        assert!(x >= 0 && y >= 0 && w > 0 && h > 0 && x + w <= 24, "{g}");
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(cells.insert((cx, cy)), "panels overlap at {cx},{cy}: {p}");
            }
        }
        if kind == "row" {
            continue;
        }
        assert_eq!(s(&p["datasource"], "type"), "prometheus");
        assert!(p["fieldConfig"]["defaults"]["unit"].is_string());
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "a panel has a query: {p}");
        let mut refs = std::collections::BTreeSet::new();
        for t in targets {
            assert!(refs.insert(s(t, "refId")), "refIds are unique: {p}");
            let expr = s(t, "expr");
            assert!(!expr.is_empty());
            exprs.push(expr);
        }
    }
    exprs
}

/// A label matcher: the key, and the value for an `=` matcher.
type Matcher = (String, Option<String>);

/// The metrics a PromQL query names (`snapd_...`), each with its label matchers.
fn metrics_in(expr: &str) -> Vec<(String, Vec<Matcher>)> {
    {
        let b = expr.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while let Some(at) = expr[i..].find("snapd_") {
            let start = i + at;
            let mut end = start;
            while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
                end += 1;
            }
            let name = expr[start..end].to_string();
            let mut matchers = Vec::new();
            if b.get(end) == Some(&b'{') {
                let close = end + expr[end..].find('}').expect("a closed selector");
                for m in expr[end + 1..close].split(',').filter(|m| !m.is_empty()) {
                    let key_end = m.find(|c: char| "=!~".contains(c)).expect("a matcher");
                    let key = m[..key_end].trim().to_string();
                    let op = &m[key_end..];
                    let value = op
                        .strip_prefix('=')
                        .filter(|v| !v.starts_with('~'))
                        .map(|v| v.trim_matches('"').to_string());
                    matchers.push((key, value));
                }
                end = close;
            }
            out.push((name, matchers));
            i = end;
        }
        out
    }
}
