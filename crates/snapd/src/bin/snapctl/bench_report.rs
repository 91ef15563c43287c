//! What `snapctl bench` measured, per kind of call, and how it is printed.

use std::collections::BTreeMap;
use std::time::Duration;

use tonic::Code;

use crate::bench::BenchArgs;
use crate::error::code_name;
use crate::{Cli, show};

/// The kinds of call the clients make, in report order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Call {
    CreateVm,
    CreateSnapshot,
    RestoreSnapshot,
    DeleteSnapshot,
    StopVm,
    DeleteVm,
}

impl Call {
    pub(crate) const ALL: [Call; 6] = [
        Call::CreateVm,
        Call::CreateSnapshot,
        Call::RestoreSnapshot,
        Call::DeleteSnapshot,
        Call::StopVm,
        Call::DeleteVm,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Call::CreateVm => "create_vm",
            Call::CreateSnapshot => "create_snapshot",
            Call::RestoreSnapshot => "restore_snapshot",
            Call::DeleteSnapshot => "delete_snapshot",
            Call::StopVm => "stop_vm",
            Call::DeleteVm => "delete_vm",
        }
    }

    /// Whether the call returns an operation (its latency runs until the operation ended).
    pub(crate) fn long(self) -> bool {
        !matches!(self, Call::CreateVm | Call::StopVm)
    }
}

/// What one kind of call did.
#[derive(Debug, Default, Clone)]
struct CallStats {
    /// Latency of each successful call, in microseconds.
    ok_us: Vec<u64>,
    errors: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Default)]
pub(crate) struct Stats {
    calls: BTreeMap<Call, CallStats>,
    /// Snapshot.pause_us of each snapshot taken.
    pub(crate) pause_us: Vec<u64>,
}

impl Stats {
    pub(crate) fn ok(&mut self, call: Call, took: Duration) {
        self.calls
            .entry(call)
            .or_default()
            .ok_us
            .push(took.as_micros() as u64);
    }

    pub(crate) fn err(&mut self, call: Call, code: Code) {
        *self
            .calls
            .entry(call)
            .or_default()
            .errors
            .entry(code_name(code))
            .or_default() += 1;
    }

    /// Each kind of call's latencies of successful calls (microseconds), in report order.
    pub(crate) fn latencies(&self) -> Vec<(&'static str, Vec<u64>)> {
        Call::ALL
            .iter()
            .map(|c| {
                let ok = self
                    .calls
                    .get(c)
                    .map(|s| s.ok_us.clone())
                    .unwrap_or_default();
                (c.name(), ok)
            })
            .collect()
    }

    pub(crate) fn merge(&mut self, other: Stats) {
        for (call, s) in other.calls {
            let mine = self.calls.entry(call).or_default();
            mine.ok_us.extend(s.ok_us);
            for (code, n) in s.errors {
                *mine.errors.entry(code).or_default() += n;
            }
        }
        self.pause_us.extend(other.pause_us);
    }
}

/// The `p`-th percentile (0 < p <= 100) of `sorted`, by nearest rank.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Prints what the clients did: per call, and the pauses.
pub(crate) fn report(
    cli: &Cli,
    args: &BenchArgs,
    stats: &Stats,
    ran: Duration,
    failures: &[String],
) {
    let secs = ran.as_secs_f64().max(1e-9);
    let mut pause = stats.pause_us.clone();
    pause.sort_unstable();
    if cli.json {
        let mut calls = serde_json::Map::new();
        for call in Call::ALL {
            let s = stats.calls.get(&call).cloned().unwrap_or_default();
            let mut ok = s.ok_us.clone();
            ok.sort_unstable();
            let errors: u64 = s.errors.values().sum();
            calls.insert(
                call.name().into(),
                serde_json::json!({
                    "calls": ok.len() as u64 + errors,
                    "ok": ok.len(),
                    "ok_per_sec": ok.len() as f64 / secs,
                    "p50_us": percentile(&ok, 50.0),
                    "p99_us": percentile(&ok, 99.0),
                    "long": call.long(),
                    "errors": s.errors,
                }),
            );
        }
        show::json(&serde_json::json!({
            "clients": args.clients,
            "duration_secs": secs,
            "vms_per_client": args.vms_per_client,
            "memory_mib": args.memory_mib,
            "calls": calls,
            "snapshot_pause_us": {
                "count": pause.len(),
                "p50": percentile(&pause, 50.0),
                "p99": percentile(&pause, 99.0),
                "max": pause.last().copied().unwrap_or(0),
            },
            "cleanup_failures": failures,
        }));
        return;
    }
    println!(
        "bench: {} client(s) for {secs:.1} s, {} VM(s) per client, {} MiB guests (test guest: {} ticks, {} working-set pages)",
        args.clients,
        args.vms_per_client,
        args.memory_mib,
        args.guest_ticks,
        args.working_set_pages
    );
    println!(
        "{:<17} {:>7} {:>9} {:>10} {:>10}  errors",
        "call", "calls", "ok/s", "p50", "p99"
    );
    for call in Call::ALL {
        let s = stats.calls.get(&call).cloned().unwrap_or_default();
        let mut ok = s.ok_us.clone();
        ok.sort_unstable();
        let errors: u64 = s.errors.values().sum();
        let codes = if s.errors.is_empty() {
            "-".to_string()
        } else {
            s.errors
                .iter()
                .map(|(c, n)| format!("{c} x{n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "{:<17} {:>7} {:>9.2} {:>10} {:>10}  {codes}",
            call.name(),
            ok.len() as u64 + errors,
            ok.len() as f64 / secs,
            show::micros(percentile(&ok, 50.0)),
            show::micros(percentile(&ok, 99.0)),
        );
    }
    println!(
        "snapshot pause (Snapshot.pause_us) over {} snapshots: p50 {}, p99 {}, max {}",
        pause.len(),
        show::micros(percentile(&pause, 50.0)),
        show::micros(percentile(&pause, 99.0)),
        show::micros(pause.last().copied().unwrap_or(0)),
    );
    println!(
        "latency: successful calls only, from sending the call until it returned; for \
         create_snapshot, restore_snapshot (into a new VM, lazy), delete_snapshot and delete_vm \
         until WaitOperation returned the ended operation"
    );
    if failures.is_empty() {
        println!("cleanup: everything the clients made was deleted");
    } else {
        println!("cleanup: {} deletion(s) failed:", failures.len());
        for f in failures {
            println!("  {f}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
        assert_eq!(percentile(&[1, 2], 50.0), 1);
    }
}
