//! `snapctl bench --idle-vms N`: the daemon's memory per idle VM beyond guest memory.
//!
//! What is counted: the daemon process's resident memory from /proc/<pid>/status (VmRSS and its
//! anonymous, file and shmem parts) before and after creating N idle VMs, minus the guest
//! memory among it: the resident pages of the daemon's mappings of guest memory (the memfds
//! named `snap-guest-memory`, summed from /proc/<pid>/smaps). Beside it: the guest memory the
//! memfds hold (their allocated blocks, which may exceed what is mapped), Pss from smaps_rollup,
//! threads, and kernel memory from /proc/meminfo, which is system-wide (any other process moves
//! it too). Kernel memory KVM allocates for a VM (vCPU structures, memslot metadata, shadow
//! page tables) is not in any process's RSS; only the meminfo lines hint at it.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use snap_api::v1 as pb;
use tonic::Code;

use crate::bench::BenchArgs;
use crate::error::CliError;
use crate::{Cli, show};

/// The memfd name of guest memory (snap-mem's GuestMemory).
const GUEST_MEMFD: &str = "/memfd:snap-guest-memory";

/// What state the idle VMs are left in.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IdleState {
    /// Created, never started (vCPUs built, guest program loaded).
    Created,
    /// Started, then paused at once.
    Paused,
}

/// Memory figures of the daemon (and of the system) at one moment, in KiB.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Sample {
    /// VmRSS, RssAnon, RssFile, RssShmem and Threads from /proc/<pid>/status.
    status: BTreeMap<String, u64>,
    /// Rss, Pss, Anonymous, ... from /proc/<pid>/smaps_rollup.
    rollup: BTreeMap<String, u64>,
    /// Resident KiB of the daemon's guest memory mappings.
    guest_mapped_kib: u64,
    /// Allocated KiB of the guest memory memfds the daemon holds open.
    guest_allocated_kib: u64,
    /// Open guest memory memfds.
    guest_memfds: u64,
    /// Kernel memory, system-wide, from /proc/meminfo.
    meminfo: BTreeMap<String, u64>,
}

const STATUS_KEYS: [&str; 5] = ["VmRSS", "RssAnon", "RssFile", "RssShmem", "Threads"];
const MEMINFO_KEYS: [&str; 7] = [
    "MemAvailable",
    "Slab",
    "SUnreclaim",
    "VmallocUsed",
    "PageTables",
    "SecPageTables",
    "KernelStack",
];

/// `Key:   123 kB` lines whose key is in `keys` (all keys if empty).
fn parse_kv(text: &str, keys: &[&str]) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            if !keys.is_empty() && !keys.contains(&k) {
                return None;
            }
            let n = v.split_whitespace().next()?.parse().ok()?;
            Some((k.to_string(), n))
        })
        .collect()
}

/// Resident KiB of the mappings in `smaps` whose path starts with `prefix`.
fn mapped_kib(smaps: &str, prefix: &str) -> u64 {
    let mut inside = false;
    let mut total = 0;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if first.contains('-') && first.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
            // A mapping header: address perms offset dev inode [path].
            let path = line.split_whitespace().nth(5).unwrap_or("");
            inside = path.starts_with(prefix);
        } else if inside && first == "Rss:" {
            total += fields
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

fn read(path: &str) -> Result<String, CliError> {
    std::fs::read_to_string(path)
        .map_err(|e| CliError::new(Code::FailedPrecondition, format!("reading {path}: {e}")))
}

impl Sample {
    fn take(pid: u32) -> Result<Self, CliError> {
        let mut s = Sample {
            status: parse_kv(&read(&format!("/proc/{pid}/status"))?, &STATUS_KEYS),
            rollup: parse_kv(&read(&format!("/proc/{pid}/smaps_rollup"))?, &[]),
            guest_mapped_kib: mapped_kib(&read(&format!("/proc/{pid}/smaps"))?, GUEST_MEMFD),
            meminfo: parse_kv(&read("/proc/meminfo")?, &MEMINFO_KEYS),
            ..Default::default()
        };
        let fd_dir = format!("/proc/{pid}/fd");
        let entries = std::fs::read_dir(&fd_dir)
            .map_err(|e| CliError::new(Code::FailedPrecondition, format!("{fd_dir}: {e}")))?;
        for entry in entries.flatten() {
            let is_guest = std::fs::read_link(entry.path())
                .is_ok_and(|t| t.to_string_lossy().starts_with(GUEST_MEMFD));
            if is_guest {
                if let Ok(m) = std::fs::metadata(entry.path()) {
                    s.guest_allocated_kib += m.blocks() * 512 / 1024;
                    s.guest_memfds += 1;
                }
            }
        }
        Ok(s)
    }

    fn status(&self, k: &str) -> u64 {
        self.status.get(k).copied().unwrap_or(0)
    }
}

/// The daemon's pid: `--pid`, or the peer of the Unix socket.
async fn daemon_pid(cli: &Cli, args: &BenchArgs) -> Result<u32, CliError> {
    if let Some(pid) = args.pid {
        return Ok(pid);
    }
    if cli.addr.is_some() {
        return Err(CliError::new(
            Code::InvalidArgument,
            "over --addr the daemon's pid cannot be read from the socket: give --pid",
        ));
    }
    let stream = tokio::net::UnixStream::connect(&cli.socket)
        .await
        .map_err(|e| {
            CliError::new(
                Code::Unavailable,
                format!("connecting to {}: {e}", cli.socket.display()),
            )
        })?;
    let cred = stream
        .peer_cred()
        .map_err(|e| CliError::new(Code::Internal, format!("SO_PEERCRED: {e}")))?;
    cred.pid()
        .and_then(|p| u32::try_from(p).ok())
        .ok_or_else(|| CliError::new(Code::Internal, "SO_PEERCRED gave no pid: give --pid"))
}

/// Creates `n` idle VMs, samples the daemon's memory before and after, reports, deletes them.
pub(crate) async fn run(cli: &Cli, args: &BenchArgs, n: usize) -> Result<(), CliError> {
    if n == 0 {
        return Err(CliError::new(
            Code::InvalidArgument,
            "--idle-vms must be at least 1",
        ));
    }
    let pid = daemon_pid(cli, args).await?;
    let mut c = cli.connect().await?;
    // VMs the daemon already holds (or held) leave freed heap behind that new VMs reuse: the
    // figure is cleanest on a fresh daemon.
    let existing = crate::resolve::all_vms(&mut c, Default::default())
        .await?
        .len();
    let run = snap_core::Id::random().to_string();
    let run = &run[..8];
    let state = args.idle_state;
    let mut made = Vec::new();
    let result = async {
        // One VM first, so that what the daemon sets up once (for its first VM) is not counted.
        made.push(idle_vm(&mut c, args, &format!("idle-{run}-warmup"), state).await?);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = Sample::take(pid)?;
        for i in 0..n {
            made.push(idle_vm(&mut c, args, &format!("idle-{run}-{i}"), state).await?);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = Sample::take(pid)?;
        Ok::<_, CliError>((before, after))
    }
    .await;
    let mut cleanup = Vec::new();
    for id in &made {
        if let Err(e) = crate::bench::remove(&mut c, id).await {
            cleanup.push(format!("VM {id}: {e}"));
        }
    }
    let (before, after) = result?;
    let context = Context { n, pid, existing };
    report(cli, args, &context, &before, &after, &cleanup);
    Ok(())
}

async fn idle_vm(
    c: &mut snap_api::v1::snapd_client::SnapdClient<tonic::transport::Channel>,
    args: &BenchArgs,
    name: &str,
    state: IdleState,
) -> Result<String, CliError> {
    let vm = c
        .create_vm(pb::CreateVmRequest {
            request_id: crate::fresh_request_id(),
            name: name.to_string(),
            memory_bytes: args.memory_bytes(),
            vcpus: 1,
            disks: Vec::new(),
            guest: Some(args.guest()),
            labels: Default::default(),
            start: state == IdleState::Paused,
        })
        .await?
        .into_inner();
    if state == IdleState::Paused {
        c.pause_vm(pb::VmActionRequest {
            wait: false,
            request_id: crate::fresh_request_id(),
            vm_id: vm.id.clone(),
        })
        .await?;
    }
    Ok(vm.id)
}

fn delta(before: u64, after: u64) -> i64 {
    after as i64 - before as i64
}

/// What a measurement ran against.
struct Context {
    /// Idle VMs created between the samples.
    n: usize,
    /// The daemon's pid.
    pid: u32,
    /// VMs the daemon held before the measurement.
    existing: usize,
}

fn report(
    cli: &Cli,
    args: &BenchArgs,
    &Context { n, pid, existing }: &Context,
    before: &Sample,
    after: &Sample,
    cleanup: &[String],
) {
    let nn = n as f64;
    let d = |k: &str| delta(before.status(k), after.status(k));
    let guest_mapped = delta(before.guest_mapped_kib, after.guest_mapped_kib);
    let guest_allocated = delta(before.guest_allocated_kib, after.guest_allocated_kib);
    let beyond = d("VmRSS") - guest_mapped;
    let per_vm = beyond as f64 / nn;
    let state = match args.idle_state {
        IdleState::Created => "created, never started",
        IdleState::Paused => "started, then paused",
    };
    if cli.json {
        show::json(&serde_json::json!({
            "idle_vms": n,
            "idle_state": state,
            "memory_mib": args.memory_mib,
            "pid": pid,
            "vms_before": existing,
            "before": before,
            "after": after,
            "rss_delta_kib": d("VmRSS"),
            "guest_mapped_delta_kib": guest_mapped,
            "guest_allocated_delta_kib": guest_allocated,
            "beyond_guest_kib_per_vm": per_vm,
            "cleanup_failures": cleanup,
        }));
        return;
    }
    println!(
        "idle VMs: {n} ({state}), {} MiB guest memory and 1 vCPU each, test guest of {} working-set pages; snapd pid {pid}",
        args.memory_mib, args.working_set_pages
    );
    println!(
        "one warm-up VM was created before the first sample; the daemon held {existing} VM(s) before that{}; figures in KiB",
        if existing > 0 {
            " (heap they freed or left may be reused: a fresh daemon gives the cleanest figure)"
        } else {
            ""
        }
    );
    println!(
        "{:<58} {:>10} {:>10} {:>10} {:>10}",
        "", "before", "after", "delta", "per VM"
    );
    let row = |label: &str, b: u64, a: u64| {
        let dd = delta(b, a);
        println!(
            "{label:<58} {b:>10} {a:>10} {dd:>10} {:>10.1}",
            dd as f64 / nn
        );
    };
    for k in ["VmRSS", "RssAnon", "RssFile", "RssShmem"] {
        let label = if k == "VmRSS" {
            "VmRSS (/proc/pid/status)".to_string()
        } else {
            format!("  {k}")
        };
        row(&label, before.status(k), after.status(k));
    }
    row(
        "guest memory resident in the daemon (smaps, memfd maps)",
        before.guest_mapped_kib,
        after.guest_mapped_kib,
    );
    row(
        "guest memory allocated (memfd blocks)",
        before.guest_allocated_kib,
        after.guest_allocated_kib,
    );
    let roll = |k: &str, s: &Sample| s.rollup.get(k).copied().unwrap_or(0);
    for k in ["Pss", "Anonymous"] {
        row(
            &format!("{k} (smaps_rollup)"),
            roll(k, before),
            roll(k, after),
        );
    }
    row(
        "threads (count, not KiB)",
        before.status("Threads"),
        after.status("Threads"),
    );
    println!("kernel memory, system-wide (/proc/meminfo; other processes move it too):");
    for k in MEMINFO_KEYS.iter().skip(1) {
        let get = |s: &Sample| s.meminfo.get(*k).copied().unwrap_or(0);
        row(&format!("  {k}"), get(before), get(after));
    }
    let avail = |s: &Sample| s.meminfo.get("MemAvailable").copied().unwrap_or(0);
    row(
        "  MemAvailable (drop = delta below 0)",
        avail(before),
        avail(after),
    );
    println!(
        "per idle VM beyond guest memory: (delta VmRSS {} - delta guest memory resident {guest_mapped}) / {n} = {per_vm:.1} KiB",
        d("VmRSS")
    );
    println!(
        "  of which anonymous {:.1} KiB, file-backed {:.1} KiB, shared memory other than guest memory {:.1} KiB",
        d("RssAnon") as f64 / nn,
        d("RssFile") as f64 / nn,
        (d("RssShmem") - guest_mapped) as f64 / nn
    );
    println!(
        "not counted above: kernel memory KVM keeps per VM (only the system-wide meminfo lines hint at it)"
    );
    if !cleanup.is_empty() {
        println!("cleanup: {} deletion(s) failed:", cleanup.len());
        for f in cleanup {
            println!("  {f}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        let status = "Name:\tsnapd\nVmRSS:\t   20480 kB\nRssAnon:\t    8192 kB\nThreads:\t7\n";
        let m = parse_kv(status, &STATUS_KEYS);
        assert_eq!(m.get("VmRSS"), Some(&20480));
        assert_eq!(m.get("RssAnon"), Some(&8192));
        assert_eq!(m.get("Threads"), Some(&7));
        assert_eq!(m.get("Name"), None);

        let smaps = "\
7f0000000000-7f0002000000 rw-s 00000000 00:01 1234                       /memfd:snap-guest-memory (deleted)
Size:              32768 kB
Rss:                 120 kB
Pss:                 120 kB
7f0002000000-7f0002100000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                  64 kB
7f0003000000-7f0005000000 rw-s 00000000 00:01 1235                       /memfd:snap-guest-memory (deleted)
Rss:                  16 kB
";
        assert_eq!(mapped_kib(smaps, GUEST_MEMFD), 136);
    }
}
