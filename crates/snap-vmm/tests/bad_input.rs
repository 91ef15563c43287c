//! Bad input gets a typed error naming the problem, never a panic, and never a VM running on
//! half-loaded state: a failed revert leaves the VM exactly as it was.

mod common;

use std::path::Path;

use common::*;
use snap_core::FormatErrorKind;
use snap_mem::layer::LayerError;
use snap_testkit::fs::files_in;
use snap_vmm::error::ConfigError;
use snap_vmm::memory::{MemoryError, host_memory_bytes};
use snap_vmm::state::StateError;
use snap_vmm::{RunState, TestGuest, Vm, VmConfig, VmError, VmOptions};

fn create(memory_bytes: u64, vcpus: u32) -> Result<Vm, VmError> {
    let config = VmConfig {
        memory_bytes,
        vcpus,
    };
    let image = TestGuest {
        working_set_pages: 1,
        ..Default::default()
    }
    .boot_image(&VmConfig {
        memory_bytes: 32 << 20,
        vcpus: 1,
    })
    .unwrap();
    Vm::create(config, &image)
}

#[test]
fn bad_configurations_are_refused_before_anything_is_created() {
    // Config checks come before /dev/kvm is opened, so these run everywhere.
    assert!(matches!(
        create(32 << 20, 0),
        Err(VmError::Config(ConfigError::ZeroVcpus))
    ));
    assert!(matches!(
        create(32 << 20, 1000),
        Err(VmError::Config(ConfigError::TooManyVcpus {
            requested: 1000,
            ..
        }))
    ));
    let e = create((32 << 20) + 100, 1).err().unwrap();
    assert!(
        matches!(
            e,
            VmError::Config(ConfigError::Memory(MemoryError::NotPageAligned(_)))
        ),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("not a multiple of the 4096-byte page size"),
        "{e}"
    );
    let too_big = (host_memory_bytes() + (1 << 30)) & !4095;
    let e = create(too_big, 1).err().unwrap();
    assert!(
        matches!(
            e,
            VmError::Config(ConfigError::Memory(MemoryError::TooLarge { .. }))
        ),
        "{e}"
    );
    assert!(matches!(
        create(1 << 20, 1),
        Err(VmError::Config(ConfigError::MemoryTooSmall { .. }))
    ));
    let config = VmConfig {
        memory_bytes: 8 << 20,
        vcpus: 1,
    };
    let huge_ws = TestGuest {
        working_set_pages: 1 << 20,
        ..Default::default()
    };
    assert!(matches!(
        huge_ws.boot_image(&config),
        Err(ConfigError::GuestParams(_))
    ));
}

#[test]
fn sixteen_gib_of_guest_memory_runs() {
    if !kvm_available("sixteen_gib_of_guest_memory_runs") {
        return;
    }
    let (_, guest) = small(1);
    let config = VmConfig {
        memory_bytes: 16 << 30,
        vcpus: 1,
    };
    let vm = boot(config, &guest);
    run_to_end(&vm);
    assert_complete_output(&vm.serial_output().text(), &guest);
    assert_eq!(
        vm.memory().regions().len(),
        2,
        "memory continues above the 4 GiB gap"
    );
}

/// A VM paused mid-run, its guest, and a full snapshot of it taken into `snaps`.
fn snapshotted(snaps: &Snapshots) -> (Vm, TestGuest, Saved) {
    let (config, guest) = small(1);
    let vm = boot(config, &guest);
    pause_after(&vm, 5);
    let saved = snaps.full(&vm);
    (vm, guest, saved)
}

/// A restore into a new VM (default options).
fn restore(saved: &Saved) -> Result<Vm, VmError> {
    saved.restore(&VmOptions::default())
}

/// Whether an error's text names the file at `path`.
fn names(e: &VmError, path: &Path) -> bool {
    e.to_string().contains(&path.display().to_string())
}

fn rewrite(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(path).unwrap();
    f(&mut bytes);
    std::fs::write(path, bytes).unwrap();
}

fn format_kind(e: &VmError) -> FormatErrorKind {
    match e {
        VmError::State(StateError::File(f)) => *f.format_error().expect("a format error").kind(),
        other => panic!("expected a state file format error, got {other:?}"),
    }
}

/// Reverting to a broken snapshot fails, and the VM then continues exactly as if nothing had
/// been tried: its output and memory match an untouched run.
fn assert_revert_refused_and_vm_intact(vm: &Vm, guest: &TestGuest, saved: &Saved) -> VmError {
    let memory_before = vm.memory().to_vec();
    let err = saved.revert(vm).unwrap_err();
    assert_eq!(vm.run_state(), RunState::Paused);
    assert_same_memory(&vm.memory().to_vec(), &memory_before);
    run_to_end(vm);
    assert_eq!(
        vm.serial_output().text(),
        guest.model(vm.config().vcpus).output
    );
    err
}

#[test]
fn truncated_state_file_is_refused() {
    if !kvm_available("truncated_state_file_is_refused") {
        return;
    }
    let snaps = Snapshots::new();
    let (vm, guest, saved) = snapshotted(&snaps);
    rewrite(&saved.state, |b| b.truncate(b.len() / 2));
    let e = restore(&saved).err().unwrap();
    assert!(
        matches!(
            format_kind(&e),
            FormatErrorKind::Truncated {
                what: "payload",
                ..
            }
        ),
        "{e}"
    );
    assert!(names(&e, &saved.state), "error names the file: {e}");
    let e = assert_revert_refused_and_vm_intact(&vm, &guest, &saved);
    assert!(matches!(format_kind(&e), FormatErrorKind::Truncated { .. }));
}

#[test]
fn corrupted_state_file_is_refused() {
    if !kvm_available("corrupted_state_file_is_refused") {
        return;
    }
    let snaps = Snapshots::new();
    let (vm, guest, saved) = snapshotted(&snaps);
    rewrite(&saved.state, |b| {
        let i = b.len() - 100;
        b[i] ^= 0x40;
    });
    let e = restore(&saved).err().unwrap();
    assert!(
        matches!(format_kind(&e), FormatErrorKind::PayloadChecksum { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("checksum"), "{e}");
    let e = assert_revert_refused_and_vm_intact(&vm, &guest, &saved);
    assert!(matches!(
        format_kind(&e),
        FormatErrorKind::PayloadChecksum { .. }
    ));
}

#[test]
fn wrong_version_state_file_is_refused() {
    if !kvm_available("wrong_version_state_file_is_refused") {
        return;
    }
    let snaps = Snapshots::new();
    let (vm, guest, saved) = snapshotted(&snaps);
    rewrite(&saved.state, |b| {
        b[8..12].copy_from_slice(&99u32.to_le_bytes());
        let crc = snap_core::crc32c(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
    });
    let e = restore(&saved).err().unwrap();
    assert!(
        matches!(
            format_kind(&e),
            FormatErrorKind::UnsupportedVersion { found: 99, .. }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("version 99"), "{e}");
    assert_revert_refused_and_vm_intact(&vm, &guest, &saved);
}

#[test]
fn corrupted_or_truncated_memory_layer_is_refused() {
    if !kvm_available("corrupted_or_truncated_memory_layer_is_refused") {
        return;
    }
    let snaps = Snapshots::new();
    let (vm, guest, saved) = snapshotted(&snaps);
    let path = saved.memory();
    let original = std::fs::read(path).unwrap();
    // A flipped bit inside the first frame's compressed bytes (frames start at 4096).
    rewrite(path, |b| b[4096 + 10] ^= 1);
    let e = restore(&saved).err().unwrap();
    assert!(
        matches!(&e, VmError::Layer(l) if matches!(**l, LayerError::Frame { frame: 0, .. })),
        "{e}"
    );
    assert!(names(&e, path) && e.to_string().contains("frame 0"), "{e}");
    let e = assert_revert_refused_and_vm_intact(&vm, &guest, &saved);
    assert!(
        matches!(&e, VmError::Layer(l) if matches!(**l, LayerError::Frame { frame: 0, .. })),
        "{e}"
    );

    std::fs::write(path, &original[..original.len() - 100]).unwrap();
    let e = restore(&saved).err().unwrap();
    assert!(matches!(&e, VmError::Layer(_)), "{e}");
    assert!(names(&e, path), "{e}");
}

/// A diff snapshot whose chain puts it over a layer it was not written over is refused, naming
/// the layer, the parent it expects and the one it found.
#[test]
fn diff_over_the_wrong_parent_is_refused() {
    if !kvm_available("diff_over_the_wrong_parent_is_refused") {
        return;
    }
    let snaps = Snapshots::new();
    let (config, guest) = small(1);
    let vm = boot(config, &guest);
    pause_after(&vm, 3);
    let root = snaps.full(&vm);
    vm.resume().unwrap();
    pause_after(&vm, 6);
    let diff = snaps.diff(&vm, &root);
    // Another full snapshot, then a chain that puts the diff over it.
    let other = snaps.full(&vm);
    let wrong = Saved {
        layers: vec![other.memory().to_path_buf(), diff.memory().to_path_buf()],
        ..diff.clone()
    };
    let e = restore(&wrong).err().unwrap();
    assert!(
        matches!(&e, VmError::Layer(l) if matches!(**l, LayerError::WrongParent { .. })),
        "{e}"
    );
    assert!(names(&e, diff.memory()), "{e}");
    // And a diff against a snapshot the VM's memory is not based on is refused when it begins,
    // leaving no file behind.
    vm.resume().unwrap();
    pause_after(&vm, 8);
    let files = files_in(snaps.dir());
    let e = snaps
        .take(&vm, Some(&root), &Default::default())
        .unwrap_err();
    assert!(matches!(&e, VmError::NotBasedOn { .. }), "{e}");
    assert_eq!(
        files_in(snaps.dir()),
        files,
        "a refused snapshot left a file"
    );
}

#[test]
fn state_for_another_vm_shape_is_refused() {
    if !kvm_available("state_for_another_vm_shape_is_refused") {
        return;
    }
    let snaps = Snapshots::new();
    let (_vm, _, saved) = snapshotted(&snaps);
    let (config, guest) = small(2);
    let other = boot(config, &guest);
    other.pause();
    let e = saved.revert(&other).unwrap_err();
    assert!(
        matches!(e, VmError::State(StateError::ConfigMismatch { .. })),
        "{e}"
    );
    run_to_end(&other);
    assert_complete_output(&other.serial_output().text(), &guest);
}

/// A state that passes every file check but that KVM refuses part-way (vCPU 1's control registers
/// are impossible, after vCPU 0 was already loaded): a new-VM restore fails with the ioctl named,
/// and a revert puts the VM's previous state back, so it continues as if nothing had happened.
#[test]
fn state_that_kvm_refuses_part_way_is_rolled_back() {
    if !kvm_available("state_that_kvm_refuses_part_way_is_rolled_back") {
        return;
    }
    let (config, guest) = small(2);
    let vm = boot(config, &guest);
    pause_after(&vm, 5);
    let snaps = Snapshots::new();
    let saved = snaps.full(&vm);
    let mut state = snap_vmm::VmState::read_file(&saved.state).unwrap();
    // Paging without protected mode: KVM_SET_SREGS refuses it.
    state.vcpus[1].sregs.cr0 = 1 << 31;
    state.write_file(&saved.state).unwrap();

    let e = restore(&saved).err().unwrap();
    assert!(e.to_string().contains("vCPU 1: KVM_SET_SREGS"), "{e}");

    // Let the VM move on a little, so that the snapshot and the current state differ.
    vm.resume().unwrap();
    pause_after(&vm, 12);
    let e = assert_revert_refused_and_vm_intact(&vm, &guest, &saved);
    assert!(e.to_string().contains("vCPU 1: KVM_SET_SREGS"), "{e}");
}
