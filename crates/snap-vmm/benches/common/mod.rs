//! Helpers shared by the snap-vmm bench binaries.
#![allow(dead_code)]

use std::time::Duration;

/// Whether /dev/kvm can be used; prints `SKIP <bench>: ...` when not.
pub fn kvm_available(bench: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        println!("SKIP {bench}: /dev/kvm cannot be opened");
    }
    ok
}

/// An environment variable parsed as a number, or `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A comma-separated list of numbers from an environment variable, or `default`.
pub fn env_list(name: &str, default: &str) -> Vec<u64> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// The median of `v` (sorts it).
pub fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}
