//! Helpers shared by the KVM tests.
#![allow(dead_code, unused_imports)]

use snap_vmm::Vm;

pub use snap_testkit::vmm::*;
pub use snap_testkit::{TIMEOUT, kvm_available};

/// A snapshot directory path inside a temporary directory that lives as long as this value.
pub struct SnapDir {
    _root: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl SnapDir {
    /// A fresh, not yet existing snapshot directory.
    pub fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("snapshot");
        Self { _root: root, path }
    }

    /// The snapshot directory.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Another snapshot directory beside this one.
    pub fn sibling(&self, name: &str) -> std::path::PathBuf {
        self.path.with_file_name(name)
    }
}

/// Takes a full snapshot of a paused VM into `dir`.
pub fn save_full(vm: &Vm, dir: &std::path::Path) {
    snap_vmm::snapshot::save(vm, dir, None, &Default::default()).unwrap();
}
