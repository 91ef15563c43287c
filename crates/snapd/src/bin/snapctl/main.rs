//! snapctl: the command line of snapd. Every command is one or a few calls of the snapd v1 API
//! (`proto/snapd/v1/snapd.proto`) through the generated client; `snapctl bench` drives the
//! daemon with concurrent clients and measures it.

mod bench;
mod bench_report;
mod commands;
mod error;
mod idle;
mod plot;
mod resolve;
mod show;
mod wait;

use std::collections::HashMap;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use snap_api::v1 as pb;
use snap_api::v1::snapd_client::SnapdClient;
use tonic::transport::Channel;

use crate::error::CliError;

#[derive(Parser, Debug)]
#[command(
    name = "snapctl",
    version,
    about = "Drive snapd: VMs, their snapshots, long operations, events, and a load bench",
    long_about = "Drive snapd: VMs, their snapshots, long operations, events, and a load bench.\n\n\
        Where a VM is expected, its id or its name will do; where a snapshot is expected, its id \
        or <vm>/<snapshot name>. Long commands (snapshot create/restore/clone/delete, vm delete) \
        wait for their operation and show its progress; --no-wait prints the operation at once. \
        Errors go to stderr as `snapctl: <gRPC code>: <message>` with exit status 1 (2 for a \
        command line that does not parse)."
)]
pub(crate) struct Cli {
    /// snapd's Unix socket.
    #[arg(long, global = true, default_value = snap_api::client::DEFAULT_SOCKET, conflicts_with = "addr")]
    socket: PathBuf,
    /// snapd over TCP instead of the socket, e.g. https://snapd.example:7325 (with --tls-ca,
    /// --tls-cert, --tls-key), or http://127.0.0.1:7325 for a daemon in plain text.
    #[arg(long, global = true)]
    addr: Option<String>,
    /// The CA that signed snapd's certificate (PEM), for an https:// --addr.
    #[arg(long, global = true, requires = "addr")]
    tls_ca: Option<PathBuf>,
    /// This client's certificate (PEM), signed by the CA snapd trusts; its subject's O names
    /// the role (snapd:admin or snapd:read-only).
    #[arg(long, global = true, requires_all = ["addr", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, global = true, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Machine-readable output: one JSON document on stdout (`events` and `vm console --follow`:
    /// one JSON object per line). Enum values are their proto names, fields their proto names.
    #[arg(long, global = true)]
    json: bool,
    /// Request id of a mutating command (default: a fresh one per command). Running the command
    /// again with the same id is a safe retry: the daemon answers it with the first call's result.
    #[arg(long, global = true)]
    request_id: Option<String>,
    /// If another operation holds what a command needs (its VM, or a snapshot or layer it reads
    /// or changes), wait for it to end instead of failing with ABORTED.
    #[arg(long, global = true)]
    wait_busy: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// VMs: create, inspect, start, pause, resume, stop, delete, read the console.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Snapshots: take, inspect, list, show a VM's tree, restore, clone, delete, label.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Remote stores (snapd's --remote NAME=URL): push, list, pull, delete, sweep.
    #[command(subcommand)]
    Remote(RemoteCommand),
    /// Long operations: inspect, wait for, cancel, list.
    #[command(subcommand)]
    Op(OpCommand),
    /// Stream VM, snapshot and operation events until interrupted.
    Events {
        /// Only events about this VM (id or name): its state, snapshots and operations.
        #[arg(long)]
        vm: Option<String>,
        /// Replay the events the daemon still holds after this sequence number first.
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// Load bench: concurrent clients running a mix of calls, or the memory of idle VMs.
    Bench(bench::BenchArgs),
}

/// The guest program of a new VM (the project's test guest; see the README).
#[derive(Args, Debug, Clone)]
pub(crate) struct GuestArgs {
    /// Ticks before the guest finishes (each prints a line).
    #[arg(long, default_value_t = 100)]
    ticks: u64,
    /// Seed of the guest's pseudo-random writes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Pages of memory the guest writes into.
    #[arg(long, default_value_t = 256)]
    working_set_pages: u64,
    /// Words written per tick.
    #[arg(long, default_value_t = 32)]
    mutations_per_tick: u64,
    /// Sectors of its first disk the guest writes per tick (0: it does not use its disk).
    #[arg(long, default_value_t = 0)]
    disk_sectors_per_tick: u64,
}

#[derive(Subcommand, Debug)]
enum VmCommand {
    /// Create a VM running the test guest (left CREATED unless --start).
    Create {
        /// Its name: 1 to 63 of [A-Za-z0-9._-], unique among VMs.
        name: String,
        /// Guest memory in MiB.
        #[arg(long)]
        memory_mib: u64,
        /// vCPUs (1 to 32).
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        #[command(flatten)]
        guest: GuestArgs,
        /// A label k=v (repeatable).
        #[arg(long = "label", value_name = "K=V", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// A disk: NAME=SIZE_MIB for an empty one, or NAME=/abs/path/to/raw.img to import a raw
        /// image on the daemon's host as its base, from a directory snapd allows (its
        /// --image-dir) (repeatable; the first is the guest's disk 0).
        #[arg(long = "disk", value_name = "NAME=SIZE_MIB|NAME=IMAGE", value_parser = parse_disk)]
        disks: Vec<pb::DiskSpec>,
        /// Start the guest at once.
        #[arg(long)]
        start: bool,
    },
    /// Show a VM.
    Get {
        /// The VM: its id or its name.
        vm: String,
    },
    /// List VMs (every page).
    List {
        /// Only VMs carrying this label (repeatable: all must match).
        #[arg(long = "label", value_name = "K=V", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Start a created or stopped VM (a stopped VM starts from its current snapshot).
    Start {
        /// The VM: its id or its name.
        vm: String,
    },
    /// Pause a running VM.
    Pause {
        /// The VM: its id or its name.
        vm: String,
    },
    /// Resume a paused VM.
    Resume {
        /// The VM: its id or its name.
        vm: String,
    },
    /// Stop a VM's guest (its record and snapshots stay).
    Stop {
        /// The VM: its id or its name.
        vm: String,
    },
    /// Delete a VM that is not running (stop it first).
    Delete {
        /// The VM: its id or its name.
        vm: String,
        /// Also delete every snapshot taken of it.
        #[arg(long)]
        with_snapshots: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Print the guest's serial console output.
    Console {
        /// The VM: its id or its name.
        vm: String,
        /// Keep printing new output until the VM stops running (or Ctrl-C).
        #[arg(long)]
        follow: bool,
    },
}

#[derive(Args, Debug, Clone, Copy)]
pub(crate) struct WaitArgs {
    /// Print the operation and return instead of waiting for it to end.
    #[arg(long)]
    no_wait: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
pub(crate) enum Mode {
    /// Install all memory before the guest runs.
    Eager,
    /// Run at once; memory arrives as it is touched (userfaultfd).
    Lazy,
    /// Lazy, with the snapshot's recorded working set installed first.
    Prefetch,
}

impl Mode {
    fn to_pb(mode: Option<Mode>) -> pb::MemoryRestoreMode {
        match mode {
            None => pb::MemoryRestoreMode::Unspecified,
            Some(Mode::Eager) => pb::MemoryRestoreMode::Eager,
            Some(Mode::Lazy) => pb::MemoryRestoreMode::Lazy,
            Some(Mode::Prefetch) => pb::MemoryRestoreMode::Prefetch,
        }
    }
}

#[derive(Subcommand, Debug)]
enum SnapshotCommand {
    /// Take a snapshot of a VM (it keeps running unless --leave-paused).
    Create {
        /// The VM: its id or its name.
        vm: String,
        /// Its name, unique among the VM's snapshots.
        name: String,
        /// A label k=v (repeatable).
        #[arg(long = "label", value_name = "K=V", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Leave the VM paused afterwards.
        #[arg(long)]
        leave_paused: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Show a snapshot.
    Get {
        /// The snapshot: its id, or <vm>/<snapshot name>.
        snapshot: String,
    },
    /// List snapshots (every page).
    List {
        /// Only snapshots of this VM.
        #[arg(long)]
        vm: Option<String>,
        /// Only children of this snapshot.
        #[arg(long, conflicts_with = "roots")]
        parent: Option<String>,
        /// Only roots (snapshots without a parent).
        #[arg(long)]
        roots: bool,
        /// Only snapshots carrying this label (repeatable: all must match).
        #[arg(long = "label", value_name = "K=V", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Draw a VM's snapshots as a tree (sizes, pauses; `◀ current` marks the one the VM runs from).
    Tree {
        /// The VM: its id or its name.
        vm: String,
    },
    /// Revert a VM to a snapshot (--into) or restore it into a new VM (--new).
    #[command(group(clap::ArgGroup::new("target").required(true).args(["into", "new"])))]
    Restore {
        /// The snapshot: its id, or <vm>/<snapshot name>.
        snapshot: String,
        /// Revert this VM (the snapshot's own VM).
        #[arg(long, value_name = "VM")]
        into: Option<String>,
        /// Restore into a new VM of this name.
        #[arg(long, value_name = "NAME")]
        new: Option<String>,
        /// Labels of the new VM (repeatable; with --new).
        #[arg(long = "label", value_name = "K=V", value_parser = parse_label, requires = "new")]
        labels: Vec<(String, String)>,
        /// How memory is restored (default: the daemon's, eager).
        #[arg(long, value_enum)]
        mode: Option<Mode>,
        /// Leave the restored VM paused.
        #[arg(long)]
        leave_paused: bool,
        /// Restore straight from this remote's snapshot (give its id), without pulling it; only
        /// with --new.
        #[arg(long, requires = "new")]
        remote: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Restore a snapshot into COUNT new VMs named <prefix>-<i> that share its layers.
    Clone {
        /// The snapshot: its id, or <vm>/<snapshot name>.
        snapshot: String,
        /// How many VMs (1 to 64).
        #[arg(long)]
        count: u32,
        /// Name prefix of the new VMs.
        #[arg(long)]
        prefix: String,
        /// How memory is restored (default: the daemon's, eager).
        #[arg(long, value_enum)]
        mode: Option<Mode>,
        /// Labels of every new VM (repeatable).
        #[arg(long = "label", value_name = "K=V", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Leave the new VMs paused.
        #[arg(long)]
        leave_paused: bool,
        /// Clone straight from this remote's snapshot (give its id), without pulling it.
        #[arg(long)]
        remote: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Delete a snapshot; its children keep working unless deleted too.
    Delete {
        /// The snapshot: its id, or <vm>/<snapshot name>.
        snapshot: String,
        /// Also delete every descendant.
        #[arg(long)]
        with_descendants: bool,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Set and remove labels of a snapshot.
    Label {
        /// The snapshot: its id, or <vm>/<snapshot name>.
        snapshot: String,
        /// Set label k=v (repeatable).
        #[arg(long = "set", value_name = "K=V", value_parser = parse_label)]
        set: Vec<(String, String)>,
        /// Then remove label k (repeatable).
        #[arg(long = "remove", value_name = "K")]
        remove: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum RemoteCommand {
    /// Push a snapshot (its whole chain) to a remote; chunks already there are not sent.
    Push {
        /// The snapshot: its id, or <vm>/<snapshot name>.
        snapshot: String,
        /// The remote's name.
        #[arg(long)]
        remote: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// List a remote's snapshots.
    List {
        /// The remote's name.
        #[arg(long)]
        remote: String,
        /// Only this snapshot's manifests (its id).
        #[arg(long)]
        snapshot: Option<String>,
    },
    /// Pull a remote snapshot into this host's catalog (then restore or clone it).
    Pull {
        /// The snapshot's id.
        snapshot: String,
        /// The remote's name.
        #[arg(long)]
        remote: String,
        /// Which of its manifests (default: any).
        #[arg(long)]
        manifest: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Delete a snapshot's manifests from a remote (its chunks go at the next sweep).
    Delete {
        /// The snapshot's id.
        snapshot: String,
        /// The remote's name.
        #[arg(long)]
        remote: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Remove the chunks of a remote no manifest names, once older than the grace period.
    Sweep {
        /// The remote's name.
        #[arg(long)]
        remote: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

#[derive(Subcommand, Debug)]
enum OpCommand {
    /// Show an operation.
    Get {
        /// The operation id.
        id: String,
    },
    /// Wait until an operation has ended (exit status 1 if it failed).
    Wait {
        /// The operation id.
        id: String,
    },
    /// Cancel an operation that has not reached its point of no return.
    Cancel {
        /// The operation id.
        id: String,
    },
    /// List operations (every page), oldest first.
    List {
        /// Only operations on this VM.
        #[arg(long)]
        vm: Option<String>,
        /// Only operations that have not ended.
        #[arg(long)]
        active: bool,
    },
}

fn parse_disk(s: &str) -> Result<pb::DiskSpec, String> {
    let (name, what) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=SIZE_MIB or NAME=/path/to/image"))?;
    if what.starts_with('/') {
        return Ok(pb::DiskSpec {
            name: name.into(),
            size_bytes: 0,
            image_path: what.into(),
        });
    }
    let mib: u64 = what
        .parse()
        .map_err(|_| format!("{s:?}: {what:?} is neither a size in MiB nor an absolute path"))?;
    Ok(pb::DiskSpec {
        name: name.into(),
        size_bytes: mib << 20,
        image_path: String::new(),
    })
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not k=v")),
    }
}

pub(crate) fn labels(pairs: &[(String, String)]) -> HashMap<String, String> {
    pairs.iter().cloned().collect()
}

impl Cli {
    /// Where snapd is: the --addr, else the socket path.
    pub(crate) fn target(&self) -> String {
        self.addr
            .clone()
            .unwrap_or_else(|| self.socket.display().to_string())
    }

    /// A client of snapd.
    pub(crate) async fn connect(&self) -> Result<SnapdClient<Channel>, CliError> {
        let tls = snap_api::client::Tls {
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
        };
        snap_api::client::connect_with(&self.target(), &tls)
            .await
            .map_err(|e| CliError::new(tonic::Code::Unavailable, e))
    }

    /// The request id of this command's mutating call.
    pub(crate) fn request_id(&self) -> String {
        self.request_id.clone().unwrap_or_else(fresh_request_id)
    }
}

/// A new request id.
pub(crate) fn fresh_request_id() -> String {
    format!("snapctl-{}", snap_core::Id::random())
}

fn main() {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("snapctl: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(commands::run(&cli)) {
        eprintln!("snapctl: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn labels_parse() {
        assert_eq!(parse_label("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_label("a="), Ok(("a".into(), String::new())));
        assert!(parse_label("=b").is_err());
        assert!(parse_label("ab").is_err());
    }

    #[test]
    fn restore_needs_one_target() {
        let parse = |args: &[&str]| Cli::try_parse_from(args.iter().copied());
        assert!(parse(&["snapctl", "snapshot", "restore", "s"]).is_err());
        assert!(
            parse(&[
                "snapctl", "snapshot", "restore", "s", "--into", "a", "--new", "b"
            ])
            .is_err()
        );
        assert!(
            parse(&[
                "snapctl", "snapshot", "restore", "s", "--new", "b", "--mode", "lazy"
            ])
            .is_ok()
        );
        assert!(
            parse(&[
                "snapctl",
                "--socket",
                "/s",
                "--addr",
                "http://h:1",
                "vm",
                "list"
            ])
            .is_err()
        );
    }
}
