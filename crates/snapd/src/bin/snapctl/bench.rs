//! `snapctl bench`: concurrent clients driving a running snapd with a mix of calls, and what
//! each kind of call costs; or (`--idle-vms`) the daemon's memory per idle VM.

use std::sync::Arc;
use std::time::{Duration, Instant};

use snap_api::v1 as pb;
use snap_api::v1::snapd_client::SnapdClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::bench_report::{Call, Stats, report};
use crate::error::CliError;
use crate::{Cli, wait};

#[derive(clap::Args, Debug, Clone)]
#[command(long_about = "Load bench against a running snapd.\n\n\
    With --clients: each client, on its own connection, keeps --vms-per-client running VMs of \
    its own and loops until --duration-secs are up, picking at random: take a snapshot of one \
    of its VMs, restore one of its snapshots into a new VM (lazily), delete one of its \
    snapshots, or stop and delete one of its VMs (and creating VMs to refill). It then prints, \
    per kind of call, how many were made, successful calls per second, p50 and p99 latency of \
    the successful ones (from sending the call until it returned, and for long calls until \
    WaitOperation saw the operation end), errors by gRPC code, and the VM pause of each \
    snapshot. What the clients made is deleted afterwards (not timed).\n\n\
    With --idle-vms N: creates N VMs and leaves them idle, and reports the daemon's resident \
    memory per VM beyond guest memory, from /proc/<pid>/status, smaps, smaps_rollup and fd.")]
pub(crate) struct BenchArgs {
    /// Concurrent clients, each on its own connection.
    #[arg(long, default_value_t = 1)]
    pub(crate) clients: usize,
    /// How long the clients run.
    #[arg(long, default_value_t = 10)]
    pub(crate) duration_secs: u64,
    /// Running VMs each client keeps.
    #[arg(long, default_value_t = 1)]
    pub(crate) vms_per_client: usize,
    /// Most snapshots a client keeps before it deletes rather than takes one.
    #[arg(long, default_value_t = 4)]
    pub(crate) snapshots_per_client: usize,
    /// Guest memory of each VM, in MiB.
    #[arg(long, default_value_t = 32)]
    pub(crate) memory_mib: u64,
    /// Ticks of each VM's guest before it finishes (with 256 working-set pages the test guest
    /// runs several hundred ticks a second on the nested-KVM development host; a finished guest
    /// is still snapshotted and restored).
    #[arg(long, default_value_t = 1000)]
    pub(crate) guest_ticks: u64,
    /// Pages each guest writes into.
    #[arg(long, default_value_t = 256)]
    pub(crate) working_set_pages: u64,
    /// Seed of the clients' choices.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Also draw the latency distributions and the pause histogram into this SVG file.
    #[arg(long, value_name = "FILE", conflicts_with = "idle_vms")]
    pub(crate) plot: Option<std::path::PathBuf>,
    /// Measure memory instead: create this many idle VMs.
    #[arg(long, value_name = "N", conflicts_with_all = ["clients", "duration_secs", "vms_per_client"])]
    pub(crate) idle_vms: Option<usize>,
    /// The daemon's pid for --idle-vms (default: the peer of the Unix socket, SO_PEERCRED).
    #[arg(long, requires = "idle_vms")]
    pub(crate) pid: Option<u32>,
    /// Leave the idle VMs created (never started) or paused (started, then paused).
    #[arg(long, value_enum, default_value = "created", requires = "idle_vms")]
    pub(crate) idle_state: crate::idle::IdleState,
}

impl BenchArgs {
    pub(crate) fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }

    pub(crate) fn guest(&self) -> pb::GuestProgram {
        pb::GuestProgram {
            seed: self.seed,
            working_set_pages: self.working_set_pages,
            mutations_per_tick: 32,
            ticks: self.guest_ticks,
            disk_sectors_per_tick: 0,
        }
    }
}

/// A small deterministic generator for the clients' choices (xorshift64*).
struct Choices(u64);

impl Choices {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n.max(1)
    }
}

/// One client: its connection, and the VMs and snapshots it made.
struct Client {
    c: SnapdClient<Channel>,
    args: Arc<BenchArgs>,
    prefix: String,
    names: u64,
    vms: Vec<String>,
    snapshots: Vec<String>,
    choices: Choices,
    stats: Stats,
}

impl Client {
    fn name(&mut self, what: &str) -> String {
        self.names += 1;
        format!("{}-{what}{}", self.prefix, self.names)
    }

    async fn step(&mut self) {
        let k = self.args.vms_per_client.max(1);
        if self.vms.len() < k {
            return self.create_vm().await;
        }
        if self.vms.len() > k {
            return self.remove_vm(0).await;
        }
        let roll = self.choices.below(100);
        let full = self.snapshots.len() >= self.args.snapshots_per_client.max(1);
        match roll {
            0..45 if !full => self.snapshot().await,
            0..45 => self.delete_snapshot().await,
            45..70 if !self.snapshots.is_empty() => self.restore().await,
            70..85 if !self.snapshots.is_empty() => self.delete_snapshot().await,
            45..85 => self.snapshot().await,
            _ => {
                let i = self.choices.below(self.vms.len());
                self.remove_vm(i).await;
            }
        }
    }

    async fn create_vm(&mut self) {
        let name = self.name("vm");
        let started = Instant::now();
        let r = self
            .c
            .create_vm(pb::CreateVmRequest {
                request_id: crate::fresh_request_id(),
                name,
                memory_bytes: self.args.memory_bytes(),
                vcpus: 1,
                disks: Vec::new(),
                guest: Some(self.args.guest()),
                labels: Default::default(),
                start: true,
            })
            .await;
        match r {
            Ok(v) => {
                self.stats.ok(Call::CreateVm, started.elapsed());
                self.vms.push(v.into_inner().id);
            }
            Err(e) => self.stats.err(Call::CreateVm, e.code()),
        }
    }

    /// Makes a long call and waits for its operation; records it and returns the ended
    /// operation if it succeeded.
    async fn long_call(
        &mut self,
        call: Call,
        started: Instant,
        r: Result<tonic::Response<pb::Operation>, tonic::Status>,
    ) -> Option<pb::Operation> {
        debug_assert!(call.long());
        let op = match r {
            Ok(op) => op.into_inner(),
            Err(e) => {
                self.stats.err(call, e.code());
                return None;
            }
        };
        let op = match wait::quietly(&mut self.c, op).await {
            Ok(op) => op,
            Err(e) => {
                self.stats.err(call, e.code());
                return None;
            }
        };
        let took = started.elapsed();
        match &op.error {
            Some(e) if op.state() != pb::OperationState::Succeeded => {
                self.stats.err(call, Code::from_i32(e.code));
                None
            }
            _ => {
                self.stats.ok(call, took);
                Some(op)
            }
        }
    }

    async fn snapshot(&mut self) {
        let vm_id = self.vms[self.choices.below(self.vms.len())].clone();
        let name = self.name("s");
        let started = Instant::now();
        let r = self
            .c
            .create_snapshot(pb::CreateSnapshotRequest {
                wait: false,
                request_id: crate::fresh_request_id(),
                vm_id,
                name,
                labels: Default::default(),
                leave_paused: false,
            })
            .await;
        if let Some(op) = self.long_call(Call::CreateSnapshot, started, r).await {
            if let Some(s) = op.result.and_then(|r| r.snapshot) {
                self.stats.pause_us.push(s.pause_us);
                self.snapshots.push(s.id);
            }
        }
    }

    async fn restore(&mut self) {
        let snapshot_id = self.snapshots[self.choices.below(self.snapshots.len())].clone();
        let name = self.name("vm");
        let started = Instant::now();
        let r = self
            .c
            .restore_snapshot(pb::RestoreSnapshotRequest {
                remote: String::new(),
                wait: false,
                request_id: crate::fresh_request_id(),
                snapshot_id,
                target: Some(pb::restore_snapshot_request::Target::NewVm(pb::NewVm {
                    name,
                    labels: Default::default(),
                })),
                memory_mode: pb::MemoryRestoreMode::Lazy as i32,
                leave_paused: false,
            })
            .await;
        if let Some(op) = self.long_call(Call::RestoreSnapshot, started, r).await {
            if let Some(vm) = op.result.and_then(|mut r| r.vms.pop()) {
                self.vms.push(vm.id);
            }
        }
    }

    async fn delete_snapshot(&mut self) {
        let i = self.choices.below(self.snapshots.len());
        let snapshot_id = self.snapshots.remove(i);
        let started = Instant::now();
        let r = self
            .c
            .delete_snapshot(pb::DeleteSnapshotRequest {
                wait: false,
                request_id: crate::fresh_request_id(),
                snapshot_id,
                with_descendants: false,
            })
            .await;
        self.long_call(Call::DeleteSnapshot, started, r).await;
    }

    /// Stops VM `i` and deletes it (a running VM cannot be deleted); its snapshots stay.
    async fn remove_vm(&mut self, i: usize) {
        let vm_id = self.vms.remove(i);
        let started = Instant::now();
        let r = self
            .c
            .stop_vm(pb::VmActionRequest {
                wait: false,
                request_id: crate::fresh_request_id(),
                vm_id: vm_id.clone(),
            })
            .await;
        match r {
            Ok(_) => self.stats.ok(Call::StopVm, started.elapsed()),
            Err(e) => {
                self.stats.err(Call::StopVm, e.code());
                return;
            }
        }
        let started = Instant::now();
        let r = self
            .c
            .delete_vm(pb::DeleteVmRequest {
                wait: false,
                request_id: crate::fresh_request_id(),
                vm_id,
                with_snapshots: false,
            })
            .await;
        self.long_call(Call::DeleteVm, started, r).await;
    }

    /// Deletes what the client made (not counted). Returns the calls that failed.
    async fn clean_up(&mut self) -> Vec<String> {
        let mut failures = Vec::new();
        for vm_id in std::mem::take(&mut self.vms) {
            if let Err(e) = remove(&mut self.c, &vm_id).await {
                failures.push(format!("VM {vm_id}: {e}"));
            }
        }
        for snapshot_id in std::mem::take(&mut self.snapshots) {
            let r = self
                .c
                .delete_snapshot(pb::DeleteSnapshotRequest {
                    wait: false,
                    request_id: crate::fresh_request_id(),
                    snapshot_id: snapshot_id.clone(),
                    with_descendants: false,
                })
                .await;
            let r = match r {
                Ok(op) => wait::quietly(&mut self.c, op.into_inner())
                    .await
                    .map_err(CliError::from)
                    .and_then(|op| match crate::error::operation_error(&op) {
                        Some(e) => Err(e),
                        None => Ok(()),
                    }),
                Err(e) => Err(e.into()),
            };
            if let Err(e) = r {
                failures.push(format!("snapshot {snapshot_id}: {e}"));
            }
        }
        failures
    }
}

/// Stops and deletes a VM, waiting for the deletion.
pub(crate) async fn remove(c: &mut SnapdClient<Channel>, vm_id: &str) -> Result<(), CliError> {
    c.stop_vm(pb::VmActionRequest {
        wait: false,
        request_id: crate::fresh_request_id(),
        vm_id: vm_id.to_string(),
    })
    .await?;
    let op = c
        .delete_vm(pb::DeleteVmRequest {
            wait: false,
            request_id: crate::fresh_request_id(),
            vm_id: vm_id.to_string(),
            with_snapshots: false,
        })
        .await?
        .into_inner();
    let op = wait::quietly(c, op).await?;
    match crate::error::operation_error(&op) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Runs the bench.
pub(crate) async fn run(cli: &Cli, args: &BenchArgs) -> Result<(), CliError> {
    if cli.request_id.is_some() {
        return Err(CliError::new(
            Code::InvalidArgument,
            "--request-id names one call; bench makes many, each with a fresh id",
        ));
    }
    if let Some(n) = args.idle_vms {
        return crate::idle::run(cli, args, n).await;
    }
    if args.clients == 0 || args.duration_secs == 0 {
        return Err(CliError::new(
            Code::InvalidArgument,
            "--clients and --duration-secs must be at least 1",
        ));
    }
    // A run tag keeps this run's names apart from anything else on the daemon.
    let run = snap_core::Id::random().to_string();
    let run = &run[..8];
    let args = Arc::new(args.clone());
    let mut clients = Vec::new();
    for i in 0..args.clients {
        clients.push(Client {
            c: cli.connect().await?,
            args: Arc::clone(&args),
            prefix: format!("bench-{run}-c{i}"),
            names: 0,
            vms: Vec::new(),
            snapshots: Vec::new(),
            choices: Choices::new(args.seed ^ (i as u64 + 1)),
            stats: Stats::default(),
        });
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration_secs);
    let mut tasks = tokio::task::JoinSet::new();
    for mut client in clients {
        tasks.spawn(async move {
            while Instant::now() < deadline {
                client.step().await;
            }
            // The last call may end after the deadline: throughput is over the time it took.
            let ran = started.elapsed();
            let failures = client.clean_up().await;
            (client.stats, failures, ran)
        });
    }
    let mut stats = Stats::default();
    let mut failures = Vec::new();
    let mut ran = Duration::ZERO;
    while let Some(r) = tasks.join_next().await {
        let (s, f, r) =
            r.map_err(|e| CliError::new(Code::Internal, format!("a bench client failed: {e}")))?;
        stats.merge(s);
        failures.extend(f);
        ran = ran.max(r);
    }
    report(cli, &args, &stats, ran, &failures);
    if let Some(path) = &args.plot {
        let title = format!(
            "snapctl bench: {} client(s) for {:.0} s, {} MiB guests",
            args.clients,
            ran.as_secs_f64(),
            args.memory_mib
        );
        crate::plot::write(path, &title, &stats.latencies(), &stats.pause_us)
            .map_err(|e| CliError::new(Code::InvalidArgument, e))?;
        eprintln!("plot: {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_spread() {
        let mut c = Choices::new(1);
        let mut seen = [0u32; 4];
        for _ in 0..4000 {
            seen[c.below(4)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    }
}
