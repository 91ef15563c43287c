//! The commands: each resolves its names, makes its call and prints the answer.

use std::time::Duration;

use snap_api::v1 as pb;
use snap_api::v1::snapd_client::SnapdClient;
use tonic::transport::Channel;

use crate::error::{CliError, operation_error};
use crate::{
    Cli, Command, Mode, OpCommand, RemoteCommand, SnapshotCommand, VmCommand, WaitArgs, bench,
    labels, resolve, show, wait,
};

type Client = SnapdClient<Channel>;

/// Runs the command line.
pub(crate) async fn run(cli: &Cli) -> Result<(), CliError> {
    if let Command::Bench(args) = &cli.command {
        return bench::run(cli, args).await;
    }
    let mut c = cli.connect().await?;
    match &cli.command {
        Command::Vm(cmd) => vm(cli, &mut c, cmd).await,
        Command::Snapshot(cmd) => snapshot(cli, &mut c, cmd).await,
        Command::Op(cmd) => op(cli, &mut c, cmd).await,
        Command::Remote(cmd) => remote(cli, &mut c, cmd).await,
        Command::Events { vm, after } => events(cli, &mut c, vm.as_deref(), *after).await,
        Command::Bench(_) => unreachable!("handled above"),
    }
}

fn print_vm(cli: &Cli, v: &pb::Vm) {
    if cli.json {
        show::json(v);
    } else {
        show::out(&show::vm(v));
    }
}

async fn vm(cli: &Cli, c: &mut Client, cmd: &VmCommand) -> Result<(), CliError> {
    let action = |vm_id: String| pb::VmActionRequest {
        request_id: cli.request_id(),
        wait: cli.wait_busy,
        vm_id,
    };
    match cmd {
        VmCommand::Create {
            name,
            memory_mib,
            vcpus,
            guest,
            labels: l,
            disks,
            start,
        } => {
            let v = c
                .create_vm(pb::CreateVmRequest {
                    request_id: cli.request_id(),
                    name: name.clone(),
                    memory_bytes: memory_mib << 20,
                    vcpus: *vcpus,
                    disks: disks.clone(),
                    guest: Some(pb::GuestProgram {
                        seed: guest.seed,
                        working_set_pages: guest.working_set_pages,
                        mutations_per_tick: guest.mutations_per_tick,
                        ticks: guest.ticks,
                        disk_sectors_per_tick: guest.disk_sectors_per_tick,
                    }),
                    labels: labels(l),
                    start: *start,
                })
                .await?
                .into_inner();
            print_vm(cli, &v);
        }
        VmCommand::Get { vm } => {
            let id = resolve::vm_id(c, vm).await?;
            let v = c.get_vm(pb::GetVmRequest { vm_id: id }).await?.into_inner();
            print_vm(cli, &v);
        }
        VmCommand::List { labels: l } => {
            let vms = resolve::all_vms(c, labels(l)).await?;
            if cli.json {
                show::json_list("vms", &vms);
            } else {
                show::out(&show::vm_table(&vms));
            }
        }
        VmCommand::Start { vm } => {
            let id = resolve::vm_id(c, vm).await?;
            let v = c.start_vm(action(id)).await?.into_inner();
            print_vm(cli, &v);
        }
        VmCommand::Pause { vm } => {
            let id = resolve::vm_id(c, vm).await?;
            let v = c.pause_vm(action(id)).await?.into_inner();
            print_vm(cli, &v);
        }
        VmCommand::Resume { vm } => {
            let id = resolve::vm_id(c, vm).await?;
            let v = c.resume_vm(action(id)).await?.into_inner();
            print_vm(cli, &v);
        }
        VmCommand::Stop { vm } => {
            let id = resolve::vm_id(c, vm).await?;
            let v = c.stop_vm(action(id)).await?.into_inner();
            print_vm(cli, &v);
        }
        VmCommand::Delete {
            vm,
            with_snapshots,
            wait,
        } => {
            let id = resolve::vm_id(c, vm).await?;
            let op = c
                .delete_vm(pb::DeleteVmRequest {
                    request_id: cli.request_id(),
                    wait: cli.wait_busy,
                    vm_id: id,
                    with_snapshots: *with_snapshots,
                })
                .await?
                .into_inner();
            long(cli, c, op, *wait).await?;
        }
        VmCommand::Console { vm, follow } => {
            let id = resolve::vm_id(c, vm).await?;
            console(cli, c, &id, *follow).await?;
        }
    }
    Ok(())
}

/// Prints the whole console as it is now (the daemon answers a window at a time).
async fn console_once(cli: &Cli, c: &mut Client, vm_id: &str) -> Result<(), CliError> {
    let mut data = Vec::new();
    loop {
        let r = c
            .get_vm_console(pb::GetVmConsoleRequest {
                vm_id: vm_id.to_string(),
                offset: data.len() as u64,
            })
            .await?
            .into_inner();
        if r.data.is_empty() {
            break;
        }
        data.extend_from_slice(&r.data);
    }
    if cli.json {
        show::json(&ConsoleChunk {
            vm_id,
            data: &String::from_utf8_lossy(&data),
            next_offset: data.len() as u64,
        });
    } else {
        show::out_bytes(&data);
    }
    Ok(())
}

/// A piece of console output as JSON (the bytes as text, invalid UTF-8 replaced).
#[derive(serde::Serialize)]
struct ConsoleChunk<'a> {
    vm_id: &'a str,
    data: &'a str,
    next_offset: u64,
}

/// Prints the console from the start; with `follow`, keeps printing until the VM stops
/// running.
async fn console(cli: &Cli, c: &mut Client, vm_id: &str, follow: bool) -> Result<(), CliError> {
    if !follow {
        return console_once(cli, c, vm_id).await;
    }
    let mut offset = 0;
    loop {
        let r = c
            .get_vm_console(pb::GetVmConsoleRequest {
                vm_id: vm_id.to_string(),
                offset,
            })
            .await?
            .into_inner();
        if r.next_offset < offset {
            // The console restarted (the VM was restored): read it again from its start.
            offset = 0;
            continue;
        }
        offset = r.next_offset;
        if cli.json {
            if !r.data.is_empty() {
                show::json_line(&ConsoleChunk {
                    vm_id,
                    data: &String::from_utf8_lossy(&r.data),
                    next_offset: r.next_offset,
                });
            }
        } else {
            show::out_bytes(&r.data);
        }
        if r.data.is_empty() {
            let state = c
                .get_vm(pb::GetVmRequest {
                    vm_id: vm_id.to_string(),
                })
                .await?
                .into_inner()
                .state();
            if !matches!(
                state,
                pb::VmState::Running | pb::VmState::Paused | pb::VmState::Created
            ) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A long command's operation: waited for (with a progress bar) unless `--no-wait`, then
/// printed. A failed operation is an error after it is printed (JSON) or its error alone.
async fn long(
    cli: &Cli,
    c: &mut Client,
    op: pb::Operation,
    w: WaitArgs,
) -> Result<pb::Operation, CliError> {
    let op = if w.no_wait {
        op
    } else {
        wait::until_ended(c, op, !cli.json).await?
    };
    if cli.json {
        show::json(&op);
    } else if w.no_wait {
        show::out(&show::operation(&op));
    } else {
        show::out(&show::ended(&op));
    }
    match operation_error(&op) {
        Some(e) => Err(e),
        None => Ok(op),
    }
}

async fn remote(cli: &Cli, c: &mut Client, cmd: &RemoteCommand) -> Result<(), CliError> {
    match cmd {
        RemoteCommand::Push {
            snapshot,
            remote,
            wait,
        } => {
            let snapshot_id = resolve::snapshot_id(c, snapshot).await?;
            let op = c
                .push_snapshot(pb::PushSnapshotRequest {
                    request_id: cli.request_id(),
                    wait: cli.wait_busy,
                    snapshot_id,
                    remote: remote.clone(),
                })
                .await?
                .into_inner();
            long(cli, c, op, *wait).await?;
        }
        RemoteCommand::List { remote, snapshot } => {
            let mut all = Vec::new();
            let mut page_token = String::new();
            loop {
                let r = c
                    .list_remote_snapshots(pb::ListRemoteSnapshotsRequest {
                        remote: remote.clone(),
                        snapshot_id: snapshot.clone().unwrap_or_default(),
                        page_size: 1000,
                        page_token,
                    })
                    .await?
                    .into_inner();
                all.extend(r.snapshots);
                if r.next_page_token.is_empty() {
                    break;
                }
                page_token = r.next_page_token;
            }
            if cli.json {
                for s in &all {
                    show::json(s);
                }
            } else {
                show::out(&show::remote_table(&all));
            }
        }
        RemoteCommand::Pull {
            snapshot,
            remote,
            manifest,
            wait,
        } => {
            let op = c
                .pull_snapshot(pb::PullSnapshotRequest {
                    request_id: cli.request_id(),
                    wait: cli.wait_busy,
                    snapshot_id: snapshot.clone(),
                    remote: remote.clone(),
                    manifest_id: manifest.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            long(cli, c, op, *wait).await?;
        }
        RemoteCommand::Delete {
            snapshot,
            remote,
            wait,
        } => {
            let op = c
                .delete_remote_snapshot(pb::DeleteRemoteSnapshotRequest {
                    request_id: cli.request_id(),
                    wait: cli.wait_busy,
                    snapshot_id: snapshot.clone(),
                    remote: remote.clone(),
                })
                .await?
                .into_inner();
            long(cli, c, op, *wait).await?;
        }
        RemoteCommand::Sweep { remote, wait } => {
            let op = c
                .sweep_remote(pb::SweepRemoteRequest {
                    request_id: cli.request_id(),
                    wait: cli.wait_busy,
                    remote: remote.clone(),
                })
                .await?
                .into_inner();
            long(cli, c, op, *wait).await?;
        }
    }
    Ok(())
}

async fn snapshot(cli: &Cli, c: &mut Client, cmd: &SnapshotCommand) -> Result<(), CliError> {
    match cmd {
        SnapshotCommand::Create {
            vm,
            name,
            labels: l,
            leave_paused,
            wait,
        } => {
            let vm_id = resolve::vm_id(c, vm).await?;
            let op = c
                .create_snapshot(pb::CreateSnapshotRequest {
                    request_id: cli.request_id(),
                    wait: cli.wait_busy,
                    vm_id,
                    name: name.clone(),
                    labels: labels(l),
                    leave_paused: *leave_paused,
                })
                .await?
                .into_inner();
            long(cli, c, op, *wait).await?;
        }
        SnapshotCommand::Get { snapshot } => {
            let id = resolve::snapshot_id(c, snapshot).await?;
            let s = c
                .get_snapshot(pb::GetSnapshotRequest { snapshot_id: id })
                .await?
                .into_inner();
            if cli.json {
                show::json(&s);
            } else {
                show::out(&show::snapshot(&s));
            }
        }
        SnapshotCommand::List {
            vm,
            parent,
            roots,
            labels: l,
        } => {
            let vm_id = match vm {
                Some(v) => resolve::vm_id(c, v).await?,
                None => String::new(),
            };
            let parent_id = match parent {
                Some(p) => resolve::snapshot_id(c, p).await?,
                None => String::new(),
            };
            let snaps = resolve::all_snapshots(
                c,
                pb::ListSnapshotsRequest {
                    vm_id,
                    parent_id,
                    roots_only: *roots,
                    labels: labels(l),
                    ..Default::default()
                },
            )
            .await?;
            if cli.json {
                show::json_list("snapshots", &snaps);
            } else {
                show::out(&show::snapshot_table(&snaps));
            }
        }
        SnapshotCommand::Tree { vm } => {
            let vm_id = resolve::vm_id(c, vm).await?;
            let t = c
                .get_snapshot_tree(pb::GetSnapshotTreeRequest { vm_id })
                .await?
                .into_inner();
            if cli.json {
                show::json(&t);
            } else {
                show::out(&show::tree(&t));
            }
        }
        SnapshotCommand::Restore {
            snapshot,
            into,
            new,
            labels: l,
            mode,
            leave_paused,
            remote,
            wait,
        } => {
            let snapshot_id = match remote {
                Some(_) => snapshot.clone(),
                None => resolve::snapshot_id(c, snapshot).await?,
            };
            let target = match (into, new) {
                (Some(vm), _) => {
                    pb::restore_snapshot_request::Target::VmId(resolve::vm_id(c, vm).await?)
                }
                (None, Some(name)) => pb::restore_snapshot_request::Target::NewVm(pb::NewVm {
                    name: name.clone(),
                    labels: labels(l),
                }),
                (None, None) => unreachable!("clap requires --into or --new"),
            };
            let op = c
                .restore_snapshot(pb::RestoreSnapshotRequest {
                    request_id: cli.request_id(),
                    wait: cli.wait_busy,
                    snapshot_id,
                    target: Some(target),
                    memory_mode: Mode::to_pb(*mode) as i32,
                    leave_paused: *leave_paused,
                    remote: remote.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            long(cli, c, op, *wait).await?;
        }
        SnapshotCommand::Clone {
            snapshot,
            count,
            prefix,
            mode,
            labels: l,
            leave_paused,
            remote,
            wait,
        } => {
            let snapshot_id = match remote {
                Some(_) => snapshot.clone(),
                None => resolve::snapshot_id(c, snapshot).await?,
            };
            let op = c
                .clone_snapshot(pb::CloneSnapshotRequest {
                    request_id: cli.request_id(),
                    wait: cli.wait_busy,
                    snapshot_id,
                    count: *count,
                    name_prefix: prefix.clone(),
                    memory_mode: Mode::to_pb(*mode) as i32,
                    leave_paused: *leave_paused,
                    labels: labels(l),
                    remote: remote.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            long(cli, c, op, *wait).await?;
        }
        SnapshotCommand::Delete {
            snapshot,
            with_descendants,
            wait,
        } => {
            let snapshot_id = resolve::snapshot_id(c, snapshot).await?;
            let op = c
                .delete_snapshot(pb::DeleteSnapshotRequest {
                    request_id: cli.request_id(),
                    wait: cli.wait_busy,
                    snapshot_id,
                    with_descendants: *with_descendants,
                })
                .await?
                .into_inner();
            long(cli, c, op, *wait).await?;
        }
        SnapshotCommand::Label {
            snapshot,
            set,
            remove,
        } => {
            let snapshot_id = resolve::snapshot_id(c, snapshot).await?;
            let s = c
                .update_snapshot_labels(pb::UpdateSnapshotLabelsRequest {
                    request_id: cli.request_id(),
                    snapshot_id,
                    set: labels(set),
                    remove: remove.clone(),
                })
                .await?
                .into_inner();
            if cli.json {
                show::json(&s);
            } else {
                show::out(&show::snapshot(&s));
            }
        }
    }
    Ok(())
}

async fn op(cli: &Cli, c: &mut Client, cmd: &OpCommand) -> Result<(), CliError> {
    let print = |op: &pb::Operation| {
        if cli.json {
            show::json(op);
        } else {
            show::out(&show::operation(op));
        }
    };
    match cmd {
        OpCommand::Get { id } => {
            let op = c
                .get_operation(pb::GetOperationRequest {
                    operation_id: id.clone(),
                })
                .await?
                .into_inner();
            print(&op);
        }
        OpCommand::Wait { id } => {
            let op = c
                .get_operation(pb::GetOperationRequest {
                    operation_id: id.clone(),
                })
                .await?
                .into_inner();
            let op = wait::until_ended(c, op, !cli.json).await?;
            print(&op);
            if let Some(e) = operation_error(&op) {
                return Err(e);
            }
        }
        OpCommand::Cancel { id } => {
            let op = c
                .cancel_operation(pb::CancelOperationRequest {
                    operation_id: id.clone(),
                })
                .await?
                .into_inner();
            print(&op);
        }
        OpCommand::List { vm, active } => {
            let vm_id = match vm {
                Some(v) => resolve::vm_id(c, v).await?,
                None => String::new(),
            };
            let ops = resolve::all_operations(
                c,
                pb::ListOperationsRequest {
                    vm_id,
                    active_only: *active,
                    ..Default::default()
                },
            )
            .await?;
            if cli.json {
                show::json_list("operations", &ops);
            } else {
                show::out(&show::operation_table(&ops));
            }
        }
    }
    Ok(())
}

/// Streams events until the daemon ends the stream or the user interrupts.
async fn events(cli: &Cli, c: &mut Client, vm: Option<&str>, after: u64) -> Result<(), CliError> {
    let vm_id = match vm {
        Some(v) => resolve::vm_id(c, v).await?,
        None => String::new(),
    };
    let mut stream = c
        .watch_events(pb::WatchEventsRequest {
            vm_id,
            after_sequence: after,
        })
        .await?
        .into_inner();
    while let Some(e) = stream.message().await? {
        if cli.json {
            show::json_line(&e);
        } else {
            show::out(&format!("{}\n", show::event(&e)));
        }
    }
    Ok(())
}
