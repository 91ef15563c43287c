//! Stop on I/O error on real KVM with real files: the test guest writes a sparse disk image on a
//! small tmpfs made for the test, almost filled by another file. When a write hits ENOSPC the VM
//! pauses with the request pending instead of failing it; a resume while the filesystem is still
//! full fails and leaves the VM paused; once space is freed a resume runs the pending request and
//! the guest finishes exactly as its model says. A snapshot taken while the VM is paused on the
//! full disk restores, over a copy of the disk with room to grow, into a VM that runs the pending
//! request first and finishes exactly the same way.

mod common;

use std::io;
use std::path::Path;
use std::sync::Arc;

use common::*;
use snap_testkit::fs::{Filler, Tmpfs};
use snap_vmm::guest::WORKING_SET_BASE;
use snap_vmm::{
    BlockBackend, IoStop, RawFile, RunState, TestGuest, Vm, VmConfig, VmError, VmExit, VmOptions,
};

/// Size of the tmpfs the disk lives on.
const TMPFS_BYTES: u64 = 1 << 20;
/// Pages left free beside the filler: the guest's writes (4 KiB pages of a sparse file) use them
/// up within a few ticks.
const FREE_PAGES: u64 = 16;
/// Size of the disk image (sparse: it takes pages only where the guest writes).
const DISK_BYTES: u64 = 1 << 20;

/// Mounts the test's tmpfs, or prints `SKIP <test>: <reason>` and returns None.
fn small_tmpfs(test: &str) -> Option<Tmpfs> {
    Tmpfs::for_test(test, TMPFS_BYTES)
}

/// A guest with two vCPUs that writes 4 sectors per tick into the first 256 KiB of its disk:
/// 30 ticks touch far more than `FREE_PAGES` pages.
fn disk_guest() -> (VmConfig, TestGuest) {
    let (config, guest) = small(2);
    let guest = TestGuest {
        disk_blocks_per_tick: 4,
        disk_sectors: 512,
        ..guest
    };
    (config, guest)
}

fn with_disk(disk: Arc<dyn BlockBackend>) -> VmOptions {
    VmOptions {
        disks: vec![disk],
        ..VmOptions::default()
    }
}

/// Asserts a disk image holds the model's span and zeros after it.
fn assert_disk_is_model(image: &[u8], model: &[u8], what: &str) {
    assert_eq!(image.len() as u64, DISK_BYTES, "{what}: disk size");
    if let Some(s) = image[..model.len()]
        .chunks(512)
        .zip(model.chunks(512))
        .position(|(a, b)| a != b)
    {
        panic!("{what}: disk differs from the model, first at sector {s}");
    }
    assert!(
        image[model.len()..].iter().all(|&b| b == 0),
        "{what}: the guest wrote beyond its span"
    );
}

/// Asserts a stop says the filesystem of disk 0 is full.
fn assert_full(stop: &IoStop) {
    assert_eq!(
        (stop.disk, stop.kind),
        (0, io::ErrorKind::StorageFull),
        "{stop}"
    );
    let text = stop.to_string();
    assert!(
        text.contains("filesystem is full") && text.contains("No space left on device"),
        "{text}"
    );
}

/// A VM running the disk guest on `disk` until a write finds the filesystem full: returns the
/// VM, paused on that, and the stop. The output so far is a strict prefix of the model's.
fn run_until_full(config: VmConfig, guest: &TestGuest, disk: &Path) -> (Vm, IoStop) {
    let backend: Arc<dyn BlockBackend> = Arc::new(RawFile::create(disk, DISK_BYTES).unwrap());
    let vm = guest.create_vm(config, &with_disk(backend)).unwrap();
    vm.resume().unwrap();
    let stop = match vm.wait_for_exit(TIMEOUT) {
        Err(VmError::IoStopped(stop)) => stop,
        other => panic!(
            "the guest was to pause on a full disk, got {other:?}; output:\n{}",
            vm.serial_output().text()
        ),
    };
    assert_full(&stop);
    assert_eq!(vm.run_state(), RunState::Paused);
    assert_eq!(vm.io_stop().as_ref(), Some(&stop));
    let model = guest.model(config.vcpus);
    let out = vm.serial_output().text();
    assert!(
        model.output.starts_with(&out) && out.len() < model.output.len(),
        "output at the stop is not a strict prefix of the model's:\n{out}"
    );
    assert!(
        out.starts_with("tick 1 "),
        "the disk was to fill after a few ticks"
    );
    (vm, stop)
}

/// The disk fills up: the VM pauses with a reason; resuming while still full fails and changes
/// nothing; after the filler is deleted the resume runs the pending request and the guest ends
/// with exactly the model's output (every line, disk hashes included), disk and working set.
#[test]
fn a_full_disk_pauses_the_vm_until_space_is_freed() {
    let test = "a_full_disk_pauses_the_vm_until_space_is_freed";
    if !kvm_available(test) {
        return;
    }
    let Some(fs) = small_tmpfs(test) else {
        return;
    };
    let filler = Filler::fill(fs.path(), FREE_PAGES * 4096);
    let (config, guest) = disk_guest();
    let model = guest.model(config.vcpus);
    let disk = fs.path().join("disk.img");
    let (vm, stop) = run_until_full(config, &guest, &disk);
    let at_stop = vm.serial_output().len();

    // Still full: the retry fails, the VM stays paused with the reason, no vCPU ran.
    match vm.resume() {
        Err(VmError::IoStopped(again)) => assert_full(&again),
        other => panic!("a resume on a full disk: {other:?}"),
    }
    assert_eq!(vm.run_state(), RunState::Paused);
    assert!(vm.io_stop().is_some());
    assert_eq!(vm.serial_output().len(), at_stop);
    // A paused VM can be paused again and saved.
    vm.pause();
    vm.save().unwrap();
    assert_eq!(vm.io_stop(), Some(stop));

    filler.remove();
    vm.resume().unwrap();
    assert_eq!(vm.io_stop(), None);
    assert_eq!(vm.wait_for_exit(TIMEOUT).unwrap(), VmExit::Finished(0));
    assert_eq!(vm.serial_output().text(), model.output);
    assert_disk_is_model(
        &std::fs::read(&disk).unwrap(),
        &model.disk,
        "after the stop",
    );
    let mut ws = vec![0u8; model.working_set.len()];
    vm.memory().read(WORKING_SET_BASE, &mut ws).unwrap();
    assert!(
        ws == model.working_set,
        "working set differs from the model"
    );
}

/// A snapshot of the VM paused on the full disk, restored into a new VM over a copy of the disk
/// (made at the snapshot) on a filesystem with room: the restored VM runs the pending request at
/// its first resume and finishes exactly as the model says, with the same memory as the original
/// finishing after space is freed.
#[test]
fn a_snapshot_of_a_vm_paused_on_a_full_disk_runs_the_pending_request() {
    let test = "a_snapshot_of_a_vm_paused_on_a_full_disk_runs_the_pending_request";
    if !kvm_available(test) {
        return;
    }
    let Some(fs) = small_tmpfs(test) else {
        return;
    };
    let filler = Filler::fill(fs.path(), FREE_PAGES * 4096);
    let (config, guest) = disk_guest();
    let model = guest.model(config.vcpus);
    let disk = fs.path().join("disk.img");
    let (vm, _) = run_until_full(config, &guest, &disk);
    let cut = vm.serial_output().len();
    let snaps = Snapshots::new();
    let saved = snaps.full(&vm);
    let roomy = tempfile::tempdir().unwrap();
    let copy = roomy.path().join("at-snapshot.img");
    std::fs::copy(&disk, &copy).unwrap();
    // The snapshot did not clear the stop.
    assert!(vm.io_stop().is_some());

    let restored = saved
        .restore(&with_disk(Arc::new(RawFile::open(&copy).unwrap())))
        .unwrap();
    assert_eq!(restored.io_stop(), None);
    run_to_end(&restored);
    assert_eq!(restored.serial_output().text(), model.output[cut..]);
    assert_disk_is_model(&std::fs::read(&copy).unwrap(), &model.disk, "restored");

    // The original, once space is freed, ends in the same place.
    filler.remove();
    run_to_end(&vm);
    assert_eq!(vm.serial_output().text(), model.output);
    assert_same_memory(&restored.memory().to_vec(), &vm.memory().to_vec());
}
