//! Bad input gets a typed error naming the problem, never a panic, and never a VM running on
//! half-loaded state: a failed revert leaves the VM exactly as it was.

mod common;

use std::path::Path;

use common::*;
use snap_core::FormatErrorKind;
use snap_mem::layer::LayerError;
use snap_vmm::error::ConfigError;
use snap_vmm::memory::{MemoryError, host_memory_bytes};
use snap_vmm::snapshot::{self, MEMORY_FILE, PARENT_FILE, STATE_FILE};
use snap_vmm::state::StateError;
use snap_vmm::{RunState, TestGuest, Vm, VmConfig, VmError};

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

/// A VM paused mid-run with a snapshot of it in `dir`, plus the output length at the snapshot.
fn snapshotted(dir: &Path) -> (Vm, TestGuest) {
    let (config, guest) = small(1);
    let vm = boot(config, &guest);
    pause_after(&vm, 5);
    save_full(&vm, dir);
    (vm, guest)
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
fn assert_revert_refused_and_vm_intact(vm: &Vm, guest: &TestGuest, dir: &Path) -> VmError {
    let memory_before = vm.memory().to_vec();
    let err = snapshot::revert(vm, dir).unwrap_err();
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
    let dir = SnapDir::new();
    let (vm, guest) = snapshotted(dir.path());
    let path = dir.path().join(STATE_FILE);
    rewrite(&path, |b| b.truncate(b.len() / 2));
    let e = snapshot::restore(dir.path()).err().unwrap();
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
    assert!(
        e.to_string().contains(STATE_FILE),
        "error names the file: {e}"
    );
    let e = assert_revert_refused_and_vm_intact(&vm, &guest, dir.path());
    assert!(matches!(format_kind(&e), FormatErrorKind::Truncated { .. }));
}

#[test]
fn corrupted_state_file_is_refused() {
    if !kvm_available("corrupted_state_file_is_refused") {
        return;
    }
    let dir = SnapDir::new();
    let (vm, guest) = snapshotted(dir.path());
    let path = dir.path().join(STATE_FILE);
    rewrite(&path, |b| {
        let i = b.len() - 100;
        b[i] ^= 0x40;
    });
    let e = snapshot::restore(dir.path()).err().unwrap();
    assert!(
        matches!(format_kind(&e), FormatErrorKind::PayloadChecksum { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("checksum"), "{e}");
    let e = assert_revert_refused_and_vm_intact(&vm, &guest, dir.path());
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
    let dir = SnapDir::new();
    let (vm, guest) = snapshotted(dir.path());
    let path = dir.path().join(STATE_FILE);
    rewrite(&path, |b| {
        b[8..12].copy_from_slice(&99u32.to_le_bytes());
        let crc = snap_core::crc32c(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
    });
    let e = snapshot::restore(dir.path()).err().unwrap();
    assert!(
        matches!(
            format_kind(&e),
            FormatErrorKind::UnsupportedVersion { found: 99, .. }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("version 99"), "{e}");
    assert_revert_refused_and_vm_intact(&vm, &guest, dir.path());
}

#[test]
fn corrupted_or_truncated_memory_layer_is_refused() {
    if !kvm_available("corrupted_or_truncated_memory_layer_is_refused") {
        return;
    }
    let dir = SnapDir::new();
    let (vm, guest) = snapshotted(dir.path());
    let path = dir.path().join(MEMORY_FILE);
    let original = std::fs::read(&path).unwrap();
    // A flipped bit inside the first frame's compressed bytes (frames start at 4096).
    rewrite(&path, |b| b[4096 + 10] ^= 1);
    let e = snapshot::restore(dir.path()).err().unwrap();
    assert!(
        matches!(&e, VmError::Layer(l) if matches!(**l, LayerError::Frame { frame: 0, .. })),
        "{e}"
    );
    let text = e.to_string();
    assert!(
        text.contains(MEMORY_FILE) && text.contains("frame 0"),
        "{e}"
    );
    let e = assert_revert_refused_and_vm_intact(&vm, &guest, dir.path());
    assert!(
        matches!(&e, VmError::Layer(l) if matches!(**l, LayerError::Frame { frame: 0, .. })),
        "{e}"
    );

    std::fs::write(&path, &original[..original.len() - 100]).unwrap();
    let e = snapshot::restore(dir.path()).err().unwrap();
    assert!(matches!(&e, VmError::Layer(_)), "{e}");
    assert!(e.to_string().contains(MEMORY_FILE), "{e}");
}

/// A diff snapshot whose parent link points at a snapshot its layer was not written over is
/// refused, naming the layer, the parent it expects and the one it found.
#[test]
fn diff_over_the_wrong_parent_is_refused() {
    if !kvm_available("diff_over_the_wrong_parent_is_refused") {
        return;
    }
    let dir = SnapDir::new();
    let (config, guest) = small(1);
    let vm = boot(config, &guest);
    pause_after(&vm, 3);
    save_full(&vm, dir.path());
    vm.resume().unwrap();
    pause_after(&vm, 6);
    let diff = dir.sibling("diff");
    snapshot::save(&vm, &diff, Some(dir.path()), &Default::default()).unwrap();
    // Another full snapshot, then point the diff at it.
    let other = dir.sibling("other");
    save_full(&vm, &other);
    std::fs::write(diff.join(PARENT_FILE), format!("{}\n", other.display())).unwrap();
    let e = snapshot::restore(&diff).err().unwrap();
    assert!(
        matches!(&e, VmError::Layer(l) if matches!(**l, LayerError::WrongParent { .. })),
        "{e}"
    );
    assert!(e.to_string().contains("diff"), "{e}");
    // And a diff against a snapshot the VM's memory is not based on is refused at save time.
    vm.resume().unwrap();
    pause_after(&vm, 8);
    let e = snapshot::save(
        &vm,
        &dir.sibling("bad"),
        Some(dir.path()),
        &Default::default(),
    )
    .unwrap_err();
    assert!(matches!(&e, VmError::Snapshot { .. }), "{e}");
    assert!(
        !dir.sibling("bad").exists(),
        "a refused snapshot left a directory"
    );
}

#[test]
fn state_for_another_vm_shape_is_refused() {
    if !kvm_available("state_for_another_vm_shape_is_refused") {
        return;
    }
    let dir = SnapDir::new();
    let (_vm, _) = snapshotted(dir.path());
    let (config, guest) = small(2);
    let other = boot(config, &guest);
    other.pause();
    let e = snapshot::revert(&other, dir.path()).unwrap_err();
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
    let dir = SnapDir::new();
    save_full(&vm, dir.path());
    let state_path = dir.path().join(STATE_FILE);
    let mut state = snap_vmm::VmState::read_file(&state_path).unwrap();
    // Paging without protected mode: KVM_SET_SREGS refuses it.
    state.vcpus[1].sregs.cr0 = 1 << 31;
    state.write_file(&state_path).unwrap();

    let e = snapshot::restore(dir.path()).err().unwrap();
    assert!(e.to_string().contains("vCPU 1: KVM_SET_SREGS"), "{e}");

    // Let the VM move on a little, so that the snapshot and the current state differ.
    vm.resume().unwrap();
    pause_after(&vm, 12);
    let e = assert_revert_refused_and_vm_intact(&vm, &guest, dir.path());
    assert!(e.to_string().contains("vCPU 1: KVM_SET_SREGS"), "{e}");
}
