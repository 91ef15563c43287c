//! Output for people (tables, trees, sizes) and for programs (JSON).

use std::collections::HashMap;
use std::fmt::Write as _;

use snap_api::v1 as pb;

/// Writes `text` to stdout and flushes it. A reader that went away (`snapctl events | head`)
/// ends the command quietly.
pub(crate) fn out(text: &str) {
    out_bytes(text.as_bytes());
}

/// Writes `bytes` to stdout, as [`out`].
pub(crate) fn out_bytes(bytes: &[u8]) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("snapctl: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// Prints one JSON document.
pub(crate) fn json<T: serde::Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => out(&format!("{s}\n")),
        Err(e) => eprintln!("snapctl: INTERNAL: writing JSON: {e}"),
    }
}

/// Prints `{"<key>": [items]}` as one JSON document (items keep their field order).
pub(crate) fn json_list<T: serde::Serialize>(key: &str, items: &[T]) {
    json(&std::collections::BTreeMap::from([(key, items)]));
}

/// Prints one JSON object on one line (for streams).
pub(crate) fn json_line<T: serde::Serialize>(value: &T) {
    match serde_json::to_string(value) {
        Ok(s) => out(&format!("{s}\n")),
        Err(e) => eprintln!("snapctl: INTERNAL: writing JSON: {e}"),
    }
}

/// `1536` -> `1.5 KiB`.
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Microseconds for people: `850 us`, `1.23 ms`, `2.50 s`.
pub(crate) fn micros(us: u64) -> String {
    match us {
        0..1_000 => format!("{us} us"),
        1_000..1_000_000 => format!("{:.2} ms", us as f64 / 1e3),
        _ => format!("{:.2} s", us as f64 / 1e6),
    }
}

/// Milliseconds since the epoch as UTC `YYYY-MM-DD hh:mm:ss`.
pub(crate) fn time(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return "-".into();
    }
    let secs = unix_ms.div_euclid(1000);
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

pub(crate) fn labels(l: &HashMap<String, String>) -> String {
    if l.is_empty() {
        return "-".into();
    }
    let mut pairs: Vec<String> = l.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    pairs.join(",")
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

pub(crate) fn vm_state_word(s: pb::VmState) -> &'static str {
    match s {
        pb::VmState::Unspecified => "unknown",
        pb::VmState::Created => "created",
        pb::VmState::Running => "running",
        pb::VmState::Paused => "paused",
        pb::VmState::Finished => "finished",
        pb::VmState::Stopped => "stopped",
        pb::VmState::Failed => "failed",
    }
}

pub(crate) fn kind_word(k: pb::OperationKind) -> String {
    match k {
        pb::OperationKind::Unspecified => "operation",
        pb::OperationKind::CreateSnapshot => "create-snapshot",
        pb::OperationKind::RestoreSnapshot => "restore-snapshot",
        pb::OperationKind::CloneSnapshot => "clone-snapshot",
        pb::OperationKind::DeleteSnapshot => "delete-snapshot",
        pb::OperationKind::DeleteVm => "delete-vm",
        pb::OperationKind::PushSnapshot => "push-snapshot",
        pb::OperationKind::PullSnapshot => "pull-snapshot",
        pb::OperationKind::DeleteRemoteSnapshot => "delete-remote-snapshot",
        pb::OperationKind::SweepRemote => "sweep-remote",
    }
    .into()
}

pub(crate) fn op_state_word(s: pb::OperationState) -> &'static str {
    match s {
        pb::OperationState::Unspecified => "unknown",
        pb::OperationState::Pending => "pending",
        pb::OperationState::Running => "running",
        pb::OperationState::Succeeded => "succeeded",
        pb::OperationState::Failed => "failed",
        pb::OperationState::Cancelled => "cancelled",
    }
}

pub(crate) fn vm(v: &pb::Vm) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "id:                {}", v.id);
    let _ = writeln!(s, "name:              {}", v.name);
    let _ = writeln!(s, "state:             {}", vm_state_word(v.state()));
    if !v.failure.is_empty() {
        let _ = writeln!(s, "failure:           {}", v.failure);
    }
    let _ = writeln!(s, "memory:            {}", bytes(v.memory_bytes));
    let _ = writeln!(s, "vcpus:             {}", v.vcpus);
    if let Some(g) = &v.guest {
        let _ = writeln!(
            s,
            "guest:             seed {} working set {} pages, {} writes/tick, {} ticks",
            g.seed, g.working_set_pages, g.mutations_per_tick, g.ticks
        );
    }
    for d in &v.disks {
        let _ = writeln!(
            s,
            "disk:              {} {} ({} layers)",
            d.name,
            bytes(d.size_bytes),
            d.layer_ids.len()
        );
    }
    let _ = writeln!(s, "labels:            {}", labels(&v.labels));
    let _ = writeln!(s, "current snapshot:  {}", or_dash(&v.current_snapshot_id));
    let _ = writeln!(s, "created:           {}", time(v.created_unix_ms));
    s
}

pub(crate) fn vm_table(vms: &[pb::Vm]) -> String {
    let mut s = format!(
        "{:<32}  {:<20}  {:<8}  {:>10}  {:>5}  {:<32}  LABELS\n",
        "ID", "NAME", "STATE", "MEMORY", "VCPUS", "CURRENT SNAPSHOT"
    );
    for v in vms {
        let _ = writeln!(
            s,
            "{:<32}  {:<20}  {:<8}  {:>10}  {:>5}  {:<32}  {}",
            v.id,
            v.name,
            vm_state_word(v.state()),
            bytes(v.memory_bytes),
            v.vcpus,
            or_dash(&v.current_snapshot_id),
            labels(&v.labels)
        );
    }
    s
}

pub(crate) fn snapshot(x: &pb::Snapshot) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "id:        {}", x.id);
    let _ = writeln!(s, "name:      {}", x.name);
    let _ = writeln!(s, "vm:        {}", x.vm_id);
    let _ = writeln!(s, "parent:    {}", or_dash(&x.parent_id));
    let _ = writeln!(s, "memory:    {}, {} vCPUs", bytes(x.memory_bytes), x.vcpus);
    let _ = writeln!(s, "stored:    {}", bytes(x.stored_bytes));
    let _ = writeln!(s, "pause:     {}", micros(x.pause_us));
    let _ = writeln!(s, "labels:    {}", labels(&x.labels));
    let _ = writeln!(s, "created:   {}", time(x.created_unix_ms));
    s
}

pub(crate) fn snapshot_table(snaps: &[pb::Snapshot]) -> String {
    let mut s = format!(
        "{:<32}  {:<16}  {:<32}  {:<32}  {:>10}  {:>9}  {:<19}  LABELS\n",
        "ID", "NAME", "VM", "PARENT", "STORED", "PAUSE", "CREATED (UTC)"
    );
    for x in snaps {
        let _ = writeln!(
            s,
            "{:<32}  {:<16}  {:<32}  {:<32}  {:>10}  {:>9}  {:<19}  {}",
            x.id,
            x.name,
            x.vm_id,
            or_dash(&x.parent_id),
            bytes(x.stored_bytes),
            micros(x.pause_us),
            time(x.created_unix_ms),
            labels(&x.labels)
        );
    }
    s
}

/// A VM's snapshots as a tree drawn with box-drawing characters, children under their parent in
/// the daemon's order, each with its size and pause; `◀ current` marks the snapshot the VM runs
/// from (its next snapshot's parent).
pub(crate) fn tree(t: &pb::SnapshotTree) -> String {
    let nodes: HashMap<&str, &pb::SnapshotNode> = t
        .nodes
        .iter()
        .filter_map(|n| n.snapshot.as_ref().map(|s| (s.id.as_str(), n)))
        .collect();
    let mut out = String::new();
    if t.nodes.is_empty() {
        out.push_str("(no snapshots)\n");
        return out;
    }
    // Depth-first, iteratively: each entry is a snapshot, the branch drawn before its name and
    // the lines drawn before its children's branches. A child named twice is drawn once.
    let mut seen = std::collections::HashSet::new();
    let mut stack: Vec<(&str, String, String)> = t
        .root_ids
        .iter()
        .rev()
        .map(|r| (r.as_str(), String::new(), String::new()))
        .collect();
    while let Some((id, branch, below)) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        let Some(node) = nodes.get(id) else { continue };
        let Some(s) = &node.snapshot else { continue };
        let _ = writeln!(
            out,
            "{branch}{}  {}  {} stored, paused {}{}{}",
            s.name,
            s.id,
            bytes(s.stored_bytes),
            micros(s.pause_us),
            if s.labels.is_empty() {
                String::new()
            } else {
                format!("  [{}]", labels(&s.labels))
            },
            if s.id == t.current_snapshot_id {
                "  ◀ current"
            } else {
                ""
            }
        );
        let children: Vec<&str> = node
            .child_ids
            .iter()
            .map(String::as_str)
            .filter(|c| nodes.contains_key(c) && !seen.contains(c))
            .collect();
        for (i, c) in children.iter().enumerate().rev() {
            let last = i + 1 == children.len();
            let (fork, line) = if last {
                ("└── ", "    ")
            } else {
                ("├── ", "│   ")
            };
            stack.push((c, format!("{below}{fork}"), format!("{below}{line}")));
        }
    }
    out
}

pub(crate) fn operation(op: &pb::Operation) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "id:          {}", op.id);
    let _ = writeln!(s, "kind:        {}", kind_word(op.kind()));
    let _ = writeln!(s, "state:       {}", op_state_word(op.state()));
    let _ = writeln!(s, "vm:          {}", or_dash(&op.vm_id));
    let _ = writeln!(s, "snapshot:    {}", or_dash(&op.snapshot_id));
    if let Some(p) = &op.progress {
        let _ = writeln!(
            s,
            "progress:    {} {}/{}",
            p.phase,
            bytes(p.bytes_done),
            bytes(p.bytes_total)
        );
    }
    if !op.phases.is_empty() {
        let phases: Vec<String> = op
            .phases
            .iter()
            .map(|p| format!("{} {}", p.name, micros(p.duration_us)))
            .collect();
        let _ = writeln!(s, "phases:      {}", phases.join(", "));
    }
    if op.pause_us > 0 {
        let _ = writeln!(s, "vm paused:   {}", micros(op.pause_us));
    }
    if let Some(e) = &op.error {
        let _ = writeln!(
            s,
            "error:       {}: {}",
            crate::error::code_name(tonic::Code::from_i32(e.code)),
            e.message
        );
    }
    if let Some(r) = &op.result {
        s.push_str(&result(r));
    }
    if let Some(c) = &op.snapshot_copy {
        let _ = write!(s, "memory copy: {}", c.method);
        if c.method == "write-protect" {
            let _ = write!(
                s,
                " ({} pages protected ahead, {} in the pause, {} kept on guest writes, guest held {})",
                c.pages_protected_ahead,
                c.pages_protected_in_pause,
                c.pages_saved_ahead,
                micros(c.fault_hold_us)
            );
        }
        s.push('\n');
    }
    if !op.caller.is_empty() {
        let _ = writeln!(s, "caller:      {}", op.caller);
    }
    let _ = writeln!(s, "created:     {}", time(op.created_unix_ms));
    let _ = writeln!(s, "ended:       {}", time(op.ended_unix_ms));
    let _ = writeln!(s, "cancellable: {}", op.cancellable);
    s
}

/// What an operation that ended did, for people.
pub(crate) fn ended(op: &pb::Operation) -> String {
    let mut s = match (op.kind(), op.state()) {
        (pb::OperationKind::DeleteVm, pb::OperationState::Succeeded) => {
            format!("deleted VM {}\n", op.vm_id)
        }
        (pb::OperationKind::DeleteSnapshot, pb::OperationState::Succeeded) => {
            format!("deleted snapshot {}\n", op.snapshot_id)
        }
        _ => String::new(),
    };
    if let Some(r) = &op.result {
        s.push_str(&result(r));
    }
    s
}

/// What an operation made or removed.
pub(crate) fn result(r: &pb::OperationResult) -> String {
    let mut s = String::new();
    if let Some(x) = &r.snapshot {
        let _ = writeln!(
            s,
            "snapshot {} {} of VM {}: {} stored, VM paused {}",
            x.name,
            x.id,
            x.vm_id,
            bytes(x.stored_bytes),
            micros(x.pause_us)
        );
    }
    for v in &r.vms {
        let _ = writeln!(s, "VM {} {} {}", v.name, v.id, vm_state_word(v.state()));
    }
    if let Some(t) = &r.remote {
        let _ = write!(s, "{}", remote_transfer(t));
    }
    if !r.deleted_snapshot_ids.is_empty() || r.freed_bytes > 0 {
        let _ = writeln!(
            s,
            "{} snapshot(s) deleted{}, {} freed",
            r.deleted_snapshot_ids.len(),
            if r.deleted_snapshot_ids.is_empty() {
                String::new()
            } else {
                format!(" ({})", r.deleted_snapshot_ids.join(", "))
            },
            bytes(r.freed_bytes)
        );
    }
    s
}

/// What a remote operation moved.
pub(crate) fn remote_transfer(t: &pb::RemoteTransfer) -> String {
    let mut s = String::new();
    if !t.manifest_id.is_empty() {
        let _ = writeln!(
            s,
            "remote {}: manifest {}, {} chunks",
            t.remote, t.manifest_id, t.chunks
        );
    }
    if t.chunks_uploaded + t.chunks_deduplicated > 0 {
        let _ = writeln!(
            s,
            "pushed {} of content: {} chunks sent ({}), {} already there",
            bytes(t.content_bytes),
            t.chunks_uploaded,
            bytes(t.sent_bytes),
            t.chunks_deduplicated
        );
    }
    if t.stored_bytes > 0 || t.layers_shared > 0 {
        let _ = writeln!(
            s,
            "pulled {} of content: {} stored here, {} layer(s) shared with ones already here",
            bytes(t.content_bytes),
            bytes(t.stored_bytes),
            t.layers_shared
        );
    }
    if t.manifests_deleted > 0 {
        let _ = writeln!(
            s,
            "remote {}: {} manifest(s) deleted",
            t.remote, t.manifests_deleted
        );
    }
    if t.chunks_listed > 0 {
        let _ = writeln!(
            s,
            "remote {}: {} chunks, {} swept ({}), {} unnamed kept as younger than the grace period",
            t.remote,
            t.chunks_listed,
            t.chunks_swept,
            bytes(t.bytes_swept),
            t.chunks_kept_young
        );
    }
    s
}

pub(crate) fn remote_table(snaps: &[pb::RemoteSnapshot]) -> String {
    let mut s = format!(
        "{:<32}  {:<16}  {:<16}  {:>10}  {:>7}  {:<19}  MANIFEST\n",
        "SNAPSHOT", "NAME", "VM", "CONTENT", "CHUNKS", "PUSHED (UTC)"
    );
    for x in snaps {
        let _ = writeln!(
            s,
            "{:<32}  {:<16}  {:<16}  {:>10}  {:>7}  {:<19}  {}",
            x.snapshot_id,
            x.name,
            x.vm_name,
            bytes(x.content_bytes),
            x.chunks,
            time(x.pushed_unix_ms),
            &x.manifest_id[..16.min(x.manifest_id.len())]
        );
    }
    s
}

pub(crate) fn operation_table(ops: &[pb::Operation]) -> String {
    let mut s = format!(
        "{:<32}  {:<16}  {:<9}  {:<32}  {:<32}  {:<19}  PHASE\n",
        "ID", "KIND", "STATE", "VM", "SNAPSHOT", "CREATED (UTC)"
    );
    for op in ops {
        let _ = writeln!(
            s,
            "{:<32}  {:<16}  {:<9}  {:<32}  {:<32}  {:<19}  {}",
            op.id,
            kind_word(op.kind()),
            op_state_word(op.state()),
            or_dash(&op.vm_id),
            or_dash(&op.snapshot_id),
            time(op.created_unix_ms),
            op.progress.as_ref().map_or("-", |p| or_dash(&p.phase))
        );
    }
    s
}

/// One line per event.
pub(crate) fn event(e: &pb::Event) -> String {
    let what = match &e.kind {
        Some(pb::event::Kind::Vm(v)) if v.state() == pb::VmState::Unspecified => {
            format!("vm {} deleted", v.id)
        }
        Some(pb::event::Kind::Vm(v)) => {
            format!("vm {} {} {}", v.name, v.id, vm_state_word(v.state()))
        }
        Some(pb::event::Kind::SnapshotCreated(s)) => {
            format!("snapshot {} {} created of VM {}", s.name, s.id, s.vm_id)
        }
        Some(pb::event::Kind::SnapshotDeleted(id)) => format!("snapshot {id} deleted"),
        Some(pb::event::Kind::Operation(op)) => {
            let p = op.progress.clone().unwrap_or_default();
            let mut line = format!(
                "operation {} {} {}",
                op.id,
                kind_word(op.kind()),
                op_state_word(op.state())
            );
            if !p.phase.is_empty() {
                let _ = write!(line, " {}", p.phase);
            }
            if p.bytes_total > 0 {
                let _ = write!(line, " {}/{}", bytes(p.bytes_done), bytes(p.bytes_total));
            }
            if let Some(err) = &op.error {
                let _ = write!(
                    line,
                    " {}: {}",
                    crate::error::code_name(tonic::Code::from_i32(err.code)),
                    err.message
                );
            }
            line
        }
        None => "(unknown event)".into(),
    };
    format!("{} {:>6} {what}", time(e.unix_ms), e.sequence)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_times_read_well() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(32 << 20), "32.0 MiB");
        assert_eq!(micros(850), "850 us");
        assert_eq!(micros(1_234), "1.23 ms");
        assert_eq!(micros(2_500_000), "2.50 s");
        assert_eq!(time(0), "-");
        assert_eq!(time(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(time(1_700_000_000_123), "2023-11-14 22:13:20");
    }

    fn snap(id: &str, name: &str, parent: &str) -> pb::Snapshot {
        pb::Snapshot {
            id: id.into(),
            name: name.into(),
            parent_id: parent.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_tree_is_indented_and_marks_the_current_snapshot() {
        let node = |s: pb::Snapshot, children: &[&str]| pb::SnapshotNode {
            snapshot: Some(s),
            child_ids: children.iter().map(|c| c.to_string()).collect(),
        };
        let t = pb::SnapshotTree {
            vm_id: "v".into(),
            root_ids: vec!["a".into()],
            nodes: vec![
                node(snap("a", "base", ""), &["b", "c"]),
                node(snap("b", "left", "a"), &["d"]),
                node(snap("c", "right", "a"), &[]),
                node(snap("d", "leaf", "b"), &[]),
            ],
            current_snapshot_id: "c".into(),
        };
        let text = tree(&t);
        let want = [
            "base  a  ",
            "├── left  b  ",
            "│   └── leaf  d  ",
            "└── right  c  ",
        ];
        assert_eq!(text.lines().count(), want.len(), "{text}");
        for (line, start) in text.lines().zip(want) {
            assert!(
                line.starts_with(start),
                "{line:?} should start {start:?}:\n{text}"
            );
        }
        let right = text.lines().find(|l| l.contains("right")).unwrap();
        assert!(right.ends_with("◀ current"), "{right:?}");
        assert_eq!(text.matches("current").count(), 1, "{text}");
        assert!(right.contains("stored, paused"), "{right:?}");
    }
}
