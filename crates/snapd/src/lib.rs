//! snapd: the daemon that takes, restores, clones and deletes snapshots of KVM VMs, over gRPC
//! (`proto/snapd/v1/snapd.proto`), and its CLI, `snapctl`.
//!
//! It composes snap-vmm (VMs and their state), snap-mem (memory layers, lazy restore) and
//! snap-disk (disk layers) into operations that happen completely or not at all, with the
//! [`catalog`] as the record of what exists.

pub mod catalog;
pub mod client;
pub mod daemon;
pub mod disks;
pub mod error;
pub mod failpoints;
pub mod names;
pub mod pool;
pub mod service;
