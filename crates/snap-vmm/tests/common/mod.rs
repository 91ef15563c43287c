//! Helpers shared by the KVM tests.
#![allow(dead_code)]

use std::time::Duration;

use snap_vmm::{TestGuest, Vm, VmConfig, VmExit};

/// How long a test waits for the guest before failing.
pub const TIMEOUT: Duration = Duration::from_secs(120);

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
            if std::env::var("SNAP_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("{test}: SNAP_REQUIRE_KVM=1 but /dev/kvm cannot be opened: {e}");
            }
            println!("SKIP {test}: /dev/kvm cannot be opened: {e}");
            false
        }
    }
}

/// A small VM shape and guest that runs in well under a second here.
pub fn small(vcpus: u32) -> (VmConfig, TestGuest) {
    (
        VmConfig {
            memory_bytes: 32 << 20,
            vcpus,
        },
        TestGuest {
            seed: 0x5eed + u64::from(vcpus),
            working_set_pages: 512,
            mutations_per_tick: 24,
            ticks: 30,
            ..TestGuest::default()
        },
    )
}

/// Creates and starts a VM running the test guest.
pub fn boot(config: VmConfig, guest: &TestGuest) -> Vm {
    let vm = Vm::create(config, &guest.boot_image(&config).unwrap()).unwrap();
    vm.resume().unwrap();
    vm
}

/// Runs a VM until the guest finishes, asserting a clean exit.
pub fn run_to_end(vm: &Vm) {
    vm.resume().unwrap();
    assert_eq!(vm.wait_for_exit(TIMEOUT).unwrap(), VmExit::Finished(0));
}

/// Waits for `lines` lines of output and pauses; returns the output length at the pause.
pub fn pause_after(vm: &Vm, lines: usize) -> usize {
    assert!(
        vm.serial_output().wait_for_lines(lines, TIMEOUT),
        "guest did not print {lines} lines"
    );
    vm.pause();
    vm.serial_output().len()
}

/// Asserts two memory images are identical, naming the first differing page.
pub fn assert_same_memory(a: &[u8], b: &[u8]) {
    assert_eq!(a.len(), b.len(), "memory sizes differ");
    if let Some(page) = a.chunks(4096).zip(b.chunks(4096)).position(|(x, y)| x != y) {
        panic!(
            "guest memory differs, first at page {page} (gpa {:#x})",
            page * 4096
        );
    }
}

/// Asserts the output of a full run of `guest`: one tick line per tick, then the done line.
pub fn assert_complete_output(out: &str, guest: &TestGuest) {
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len() as u64, guest.ticks + 1, "output:\n{out}");
    for (i, l) in lines[..lines.len() - 1].iter().enumerate() {
        assert!(
            l.starts_with(&format!("tick {} hash ", i + 1)),
            "line {i}: {l}"
        );
    }
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with(&format!("done {} hash ", guest.ticks))
    );
}

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
