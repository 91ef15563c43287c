//! End-to-end tests of snapd: the real daemon binary on a temporary socket, driven through the
//! generated client, running real KVM VMs. Every guest runs the test program, whose output the
//! host-side model predicts exactly, so "continues exactly" is checked byte for byte.

mod common;
mod concurrency;
mod crash;
mod damage;
mod disk_full;
mod failures;
mod files;
mod live;
mod metrics;
mod races;
mod remote;
mod scenario;
mod service;
mod tls;
