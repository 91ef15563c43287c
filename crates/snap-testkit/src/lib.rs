//! What the workspace's tests share (a dev-dependency only):
//!
//! - [`kvm_available`] and [`skip`]: tests that need /dev/kvm (or a mount) print
//!   `SKIP <test>: <reason>` and return where it is missing, unless `SNAP_REQUIRE_KVM=1`;
//! - [`fs`]: small filesystems made for a test (a size-limited tmpfs), fillers, file listings;
//! - [`snapd`]: the real snapd binary on a data directory of its own, started, killed with
//!   SIGKILL, restarted, and its data directory inspected;
//! - [`vmm`]: VMs running the test guest, and snapshots written to plain files;
//! - [`garage`]: a real Garage server (S3-compatible object store) for the remote-store tests.

pub mod fs;
pub mod garage;
pub mod snapd;
pub mod vmm;

use std::time::Duration;

/// A free TCP port on loopback (bound, read, released).
///
/// # Panics
/// If no port can be bound.
#[must_use]
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// How long a test waits for a guest or the daemon before failing.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// Whether `SNAP_REQUIRE_KVM=1` asks for the KVM tests to run (CI sets it where /dev/kvm is).
pub fn kvm_required() -> bool {
    std::env::var("SNAP_REQUIRE_KVM").as_deref() == Ok("1")
}

/// Whether /dev/kvm can be used. Prints `SKIP <test>: <reason>` when not, or panics when
/// `SNAP_REQUIRE_KVM=1` demands it.
pub fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            assert!(
                !kvm_required(),
                "{test}: SNAP_REQUIRE_KVM=1 but /dev/kvm cannot be opened: {e}"
            );
            skip(test, &format!("/dev/kvm cannot be opened: {e}"));
            false
        }
    }
}

/// Prints that `test` is skipped and why.
pub fn skip(test: &str, reason: &str) {
    println!("SKIP {test}: {reason}");
}

/// A fresh request id tagged `tag`.
pub fn request_id(tag: &str) -> String {
    format!("{tag}-{}", snap_core::Id::random())
}
