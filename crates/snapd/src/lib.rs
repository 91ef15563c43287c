//! snapd: the daemon that takes, restores, clones and deletes snapshots of KVM VMs, over gRPC
//! (`proto/snapd/v1/snapd.proto`), and its CLI, `snapctl`.
//!
//! Where things are:
//! - [`api`]: the gRPC handlers, request checks, conversions, and error codes;
//! - [`ops`]: which operations may run together ([`ops::scheduler`]), the runner of long
//!   operations, events, request ids;
//! - one module per operation: [`create_vm`], [`snapshot`], [`restore`], [`clone`], [`delete`]
//!   (with [`delete_plan`]), [`lifecycle`] (start, pause, resume, stop), [`remote`] (push, pull,
//!   delete and sweep of remote stores, restores straight from them), [`filling`] (disk
//!   layers restored lazily from a remote);
//! - [`daemon`] (start, recovery, housekeeping), [`vms`] (the running instances),
//!   [`store`] (the data directory), [`catalog`] (what exists), [`disks`], [`pool`].

pub mod api;
pub mod auth;
pub mod catalog;
pub mod clone;
pub mod create_vm;
pub mod daemon;
pub mod delete;
pub mod delete_plan;
pub mod disks;
pub mod error;
pub mod failpoints;
pub mod filling;
pub mod ids;
pub mod images;
pub mod lifecycle;
pub mod metrics;
pub mod ops;
pub mod pool;
pub mod remote;
pub mod restore;
pub mod snapshot;
pub mod socket_h2;
pub mod store;
pub mod vms;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
