//! virtio-blk on real KVM: the test guest writes and reads its disk every tick through its
//! virtio-mmio driver. A full run matches the host-side model (output and disk contents), and a
//! VM restored or reverted from a snapshot, handed the disk as it was at the snapshot, continues
//! exactly: same output, same final disk, same memory. A snapshot of a VM on a layered disk seals the disk
//! as one transaction with the snapshot: undone when the snapshot is dropped, kept once the VM
//! wrote into the fresh top.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use snap_vmm::error::ConfigError;
use snap_vmm::guest::{DISK_AREA_PAGES, WORKING_SET_BASE};
use snap_vmm::state::StateError;
use snap_vmm::{
    BlockBackend, DirtyTracking, MemoryRestore, RawFile, TestGuest, Vm, VmConfig, VmError,
    VmOptions,
};

const PAGE: u64 = 4096;

/// A small guest that writes 4 sectors per tick into the first 256 KiB of a 1 MiB disk.
fn disk_guest(vcpus: u32) -> (VmConfig, TestGuest) {
    let (config, guest) = small(vcpus);
    let guest = TestGuest {
        disk_blocks_per_tick: 4,
        disk_sectors: 512,
        ..guest
    };
    (config, guest)
}

/// A zeroed disk image of `bytes` in `dir`.
fn new_disk(dir: &Path, name: &str, bytes: u64) -> (PathBuf, Arc<dyn BlockBackend>) {
    let path = dir.join(name);
    let disk = RawFile::create(&path, bytes).unwrap();
    (path, Arc::new(disk))
}

fn open_disk(path: &Path) -> Arc<dyn BlockBackend> {
    Arc::new(RawFile::open(path).unwrap())
}

fn with_disk(disk: &Arc<dyn BlockBackend>) -> VmOptions {
    VmOptions {
        disks: vec![Arc::clone(disk)],
        ..VmOptions::default()
    }
}

fn boot_with_disk(config: VmConfig, guest: &TestGuest, disk: &Arc<dyn BlockBackend>) -> Vm {
    let vm = guest.create_vm(config, &with_disk(disk)).unwrap();
    vm.resume().unwrap();
    vm
}

/// Asserts a disk image holds the model's span and zeros after it.
fn assert_disk_is_model(image: &[u8], model: &[u8], what: &str) {
    assert!(
        image.len() >= model.len(),
        "{what}: disk smaller than the model"
    );
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

#[test]
fn guest_with_disk_matches_its_model() {
    if !kvm_available("guest_with_disk_matches_its_model") {
        return;
    }
    for vcpus in [1, 2] {
        let (config, guest) = disk_guest(vcpus);
        let tmp = tempfile::tempdir().unwrap();
        let (path, disk) = new_disk(tmp.path(), "disk.img", 1 << 20);
        let vm = boot_with_disk(config, &guest, &disk);
        run_to_end(&vm);
        let model = guest.model(vcpus);
        assert_eq!(vm.serial_output().text(), model.output, "{vcpus} vCPUs");
        assert!(model.output.lines().all(|l| l.contains(" disk ")));
        assert_disk_is_model(&std::fs::read(&path).unwrap(), &model.disk, "full run");
        let mut ws = vec![0u8; model.working_set.len()];
        vm.memory().read(WORKING_SET_BASE, &mut ws).unwrap();
        assert!(ws == model.working_set, "{vcpus} vCPUs: working set");
    }
    // The disk part depends on the seed like the rest.
    let (_, guest) = disk_guest(1);
    let other = TestGuest {
        seed: guest.seed + 1,
        ..guest
    };
    assert_ne!(other.model(1).disk, guest.model(1).disk);
}

/// Snapshot (disk image copied while paused), original runs to the end, restore into a new VM
/// with the copy: identical output after the snapshot, identical final disk and memory.
fn continuation_with_disk(vcpus: u32, test: &str) {
    if !kvm_available(test) {
        return;
    }
    let (config, guest) = disk_guest(vcpus);
    let tmp = tempfile::tempdir().unwrap();
    let (path, disk) = new_disk(tmp.path(), "disk.img", 1 << 20);
    let vm = boot_with_disk(config, &guest, &disk);
    let cut = pause_after(&vm, 8);
    let snaps = Snapshots::new();
    let saved = snaps.full(&vm);
    let at_snapshot = tmp.path().join("at-snapshot.img");
    std::fs::copy(&path, &at_snapshot).unwrap();
    run_to_end(&vm);
    let original = vm.serial_output().bytes();
    let original_memory = vm.memory().to_vec();
    let original_disk = std::fs::read(&path).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&original),
        guest.model(vcpus).output
    );

    let restored = saved.restore(&with_disk(&open_disk(&at_snapshot))).unwrap();
    run_to_end(&restored);
    assert_eq!(
        String::from_utf8_lossy(&restored.serial_output().bytes()),
        String::from_utf8_lossy(&original[cut..]),
        "restored VM's output diverged"
    );
    assert!(
        std::fs::read(&at_snapshot).unwrap() == original_disk,
        "disks differ"
    );
    assert_same_memory(&restored.memory().to_vec(), &original_memory);
}

#[test]
fn continuation_with_disk_one_vcpu() {
    continuation_with_disk(1, "continuation_with_disk_one_vcpu");
}

#[test]
fn continuation_with_disk_two_vcpus() {
    continuation_with_disk(2, "continuation_with_disk_two_vcpus");
}

/// Snapshot, run to the end, revert in place onto a copy of the disk as of the snapshot, run
/// again (twice): the lines after the snapshot repeat and the disk ends identical.
#[test]
fn revert_with_disk() {
    if !kvm_available("revert_with_disk") {
        return;
    }
    let (config, guest) = disk_guest(2);
    let tmp = tempfile::tempdir().unwrap();
    let (path, disk) = new_disk(tmp.path(), "disk.img", 1 << 20);
    let vm = boot_with_disk(config, &guest, &disk);
    let cut = pause_after(&vm, 5);
    let snaps = Snapshots::new();
    let saved = snaps.full(&vm);
    let at_snapshot = tmp.path().join("at-snapshot.img");
    std::fs::copy(&path, &at_snapshot).unwrap();
    run_to_end(&vm);
    let first = vm.serial_output().bytes();
    let first_memory = vm.memory().to_vec();
    let first_disk = std::fs::read(&path).unwrap();

    for round in 0..2 {
        let work = tmp.path().join(format!("revert-{round}.img"));
        std::fs::copy(&at_snapshot, &work).unwrap();
        saved.revert_with_disks(&vm, &[open_disk(&work)]).unwrap();
        let mark = vm.serial_output().len();
        run_to_end(&vm);
        assert_eq!(
            String::from_utf8_lossy(&vm.serial_output().bytes()[mark..]),
            String::from_utf8_lossy(&first[cut..]),
            "round {round}: reverted VM's output diverged"
        );
        assert!(
            std::fs::read(&work).unwrap() == first_disk,
            "round {round}: disks differ"
        );
        assert_same_memory(&vm.memory().to_vec(), &first_memory);
    }
}

/// Disks that do not fit are refused with an error naming the problem, before anything runs.
#[test]
fn disks_that_do_not_fit_are_refused() {
    if !kvm_available("disks_that_do_not_fit_are_refused") {
        return;
    }
    let (config, guest) = disk_guest(1);
    let tmp = tempfile::tempdir().unwrap();
    // Too small for the guest's span (512 sectors).
    let (_, small_disk) = new_disk(tmp.path(), "small.img", 256 * 512);
    let e = guest
        .create_vm(config, &with_disk(&small_disk))
        .err()
        .unwrap();
    assert!(
        matches!(e, VmError::Config(ConfigError::GuestParams(_))),
        "{e}"
    );
    assert!(e.to_string().contains("holds only 131072 bytes"), "{e}");
    // No disk at all.
    let e = guest
        .create_vm(config, &VmOptions::default())
        .err()
        .unwrap();
    assert!(e.to_string().contains("has no disk"), "{e}");
    // Too many disks.
    let (_, disk) = new_disk(tmp.path(), "disk.img", 1 << 20);
    let many = VmOptions {
        disks: vec![Arc::clone(&disk); 9],
        ..VmOptions::default()
    };
    let e = guest.create_vm(config, &many).err().unwrap();
    assert!(matches!(e, VmError::Config(ConfigError::Disks(_))), "{e}");

    // A snapshot with a disk restores only with a disk of the same size.
    let vm = boot_with_disk(config, &guest, &disk);
    pause_after(&vm, 3);
    let snaps = Snapshots::new();
    let saved = snaps.full(&vm);
    let e = saved.restore(&VmOptions::default()).err().unwrap();
    assert!(
        matches!(e, VmError::State(StateError::Disks(_))),
        "no disk given: {e}"
    );
    let (_, bigger) = new_disk(tmp.path(), "bigger.img", 2 << 20);
    let e = saved.restore(&with_disk(&bigger)).err().unwrap();
    assert!(e.to_string().contains("2097152 bytes"), "{e}");
    // A revert without the disks is refused and leaves the VM as it was.
    let before = vm.serial_output().len();
    let e = saved.revert(&vm).err().unwrap();
    assert!(matches!(e, VmError::State(StateError::Disks(_))), "{e}");
    run_to_end(&vm);
    assert_eq!(
        vm.serial_output().text(),
        guest.model(1).output,
        "a refused revert changed the run (output was {before} bytes)"
    );
}

/// The device's writes into guest memory (used ring, read data) are in the dirty harvest: the
/// driver's read buffers sit in a page only the device writes after boot.
#[test]
fn device_writes_are_harvested_as_dirty() {
    if !kvm_available("device_writes_are_harvested_as_dirty") {
        return;
    }
    let (config, guest) = disk_guest(1);
    let tmp = tempfile::tempdir().unwrap();
    let (_, disk) = new_disk(tmp.path(), "disk.img", 1 << 20);
    let vm = boot_with_disk(config, &guest, &disk);
    pause_after(&vm, 3);
    vm.harvest_dirty().unwrap();
    vm.commit_dirty();
    vm.resume().unwrap();
    pause_after(&vm, 6);
    let h = vm.harvest_dirty().unwrap();
    let area = guest.disk_area() / PAGE;
    // Page 4 of the area holds the two read buffers (main.c: data[18], data[19]).
    assert!(
        h.contains(area + 4),
        "the device's read data page is missing"
    );
    assert!(h.contains(area), "the used ring page is missing");
    assert!(
        h.iter().all(|p| p < area + DISK_AREA_PAGES),
        "pages beyond the driver's area were dirtied"
    );
}

/// A chain of a full and a diff snapshot of a guest using its disk, restored eagerly and lazily:
/// the diff holds what the device wrote into memory, so the restored guest continues exactly, on
/// disk too. (KVM dirty bitmap only: with the dirty ring, a guest doing MMIO here fills its ring
/// to the hard limit and then takes ring-full exits that collect nothing, see the branch notes.)
#[test]
fn diff_and_lazy_restores_with_disk_continue_exactly() {
    if !kvm_available("diff_and_lazy_restores_with_disk_continue_exactly") {
        return;
    }
    let dirty = DirtyTracking::Bitmap;
    let (config, guest) = disk_guest(2);
    let model = guest.model(2);
    let tmp = tempfile::tempdir().unwrap();
    let (path, disk) = new_disk(tmp.path(), "disk.img", 1 << 20);
    let options = VmOptions {
        dirty_tracking: dirty,
        ..with_disk(&disk)
    };
    let vm = guest.create_vm(config, &options).unwrap();
    vm.resume().unwrap();
    let snaps = Snapshots::new();
    pause_after(&vm, 4);
    let root = snaps.full(&vm);
    vm.resume().unwrap();
    let cut = pause_after(&vm, 11);
    let diff = snaps.diff(&vm, &root);
    let at_diff = tmp.path().join("at-diff.img");
    std::fs::copy(&path, &at_diff).unwrap();
    run_to_end(&vm);
    assert_eq!(vm.serial_output().text(), model.output);

    for mode in [MemoryRestore::Eager, MemoryRestore::Lazy] {
        let what = format!("{dirty:?}, {mode:?}");
        let work = tmp.path().join(format!("{mode:?}.img"));
        std::fs::copy(&at_diff, &work).unwrap();
        let options = VmOptions {
            dirty_tracking: dirty,
            memory_restore: mode,
            ..with_disk(&open_disk(&work))
        };
        let restored = diff.restore(&options).unwrap();
        run_to_end(&restored);
        assert_eq!(
            restored.serial_output().text(),
            model.output[cut..],
            "{what}"
        );
        assert_disk_is_model(&std::fs::read(&work).unwrap(), &model.disk, &what);
        assert_same_memory(&restored.memory().to_vec(), &vm.memory().to_vec());
    }
}

/// The same continuation and revert with a layered snap-disk disk instead of copied images: at
/// the snapshot the disk's top layer is sealed (the VM goes on writing into a fresh top), and each
/// restore or revert gets its own empty top over the sealed layer. The sealed layer never
/// changes; every run ends with the model's output and disk.
#[test]
fn layered_disk_continuation_and_revert() {
    use snap_disk::{Disk, Geometry, NewLayer, create_layer};
    if !kvm_available("layered_disk_continuation_and_revert") {
        return;
    }
    let (config, guest) = disk_guest(1);
    let model = guest.model(1);
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.dlayer");
    let geometry = Geometry {
        disk_bytes: 1 << 20,
        block_size: 64 << 10,
    };
    let disk = Arc::new(Disk::create(&base, geometry).unwrap());
    let backend: Arc<dyn BlockBackend> = disk.clone();
    let vm = boot_with_disk(config, &guest, &backend);
    let cut = pause_after(&vm, 6);
    let snaps = Snapshots::new();
    let saved = snaps.full(&vm);
    let sealed = disk.seal(&tmp.path().join("top-0.dlayer")).unwrap();
    run_to_end(&vm);
    assert_eq!(vm.serial_output().text(), model.output);

    let read_all = |d: &Disk| {
        let mut image = vec![0u8; 1 << 20];
        d.read_at(0, &mut image).unwrap();
        image
    };
    assert_disk_is_model(&read_all(&disk), &model.disk, "original");
    let fresh_top = |name: &str| {
        let top = tmp.path().join(name);
        create_layer(
            &top,
            &NewLayer {
                id: snap_core::Id::random(),
                parent: sealed.as_parent(),
                geometry,
            },
        )
        .unwrap();
        Arc::new(Disk::open(&[base.clone(), top]).unwrap())
    };

    let restored_disk = fresh_top("restored.dlayer");
    let restored = saved
        .restore(&with_disk(
            &(restored_disk.clone() as Arc<dyn BlockBackend>),
        ))
        .unwrap();
    run_to_end(&restored);
    assert_eq!(restored.serial_output().text(), model.output[cut..]);
    assert_disk_is_model(&read_all(&restored_disk), &model.disk, "restored");

    let reverted_disk = fresh_top("reverted.dlayer");
    saved
        .revert_with_disks(&vm, &[reverted_disk.clone() as Arc<dyn BlockBackend>])
        .unwrap();
    let mark = vm.serial_output().len();
    run_to_end(&vm);
    assert_eq!(
        String::from_utf8_lossy(&vm.serial_output().bytes()[mark..]),
        model.output[cut..]
    );
    assert_disk_is_model(&read_all(&reverted_disk), &model.disk, "reverted");
    assert_same_memory(&vm.memory().to_vec(), &restored.memory().to_vec());
}

/// A snapshot of a VM on a layered snap-disk disk is one transaction with the disk's seal:
/// begin_snapshot seals the disk under a fresh top; dropped before its commit, the snapshot
/// undoes the seal (the old top takes writes again, the memory base does not move); committed,
/// the seal stands; abandoned once the resumed VM wrote into the fresh top, the seal is kept
/// (`Unsealed::Kept`) with that top. The guest, which ran across all of them, ends with the
/// model's output and disk.
#[test]
fn a_pending_snapshot_seals_the_disk_until_it_is_abandoned() {
    use snap_disk::{Disk, Geometry};
    use snap_vmm::VmExit;
    use snap_vmm::snapshot::Unsealed;
    if !kvm_available("a_pending_snapshot_seals_the_disk_until_it_is_abandoned") {
        return;
    }
    let (config, guest) = disk_guest(1);
    // Long enough that the guest is still running when the last snapshot is abandoned.
    let guest = TestGuest {
        ticks: 200,
        ..guest
    };
    let model = guest.model(1);
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.dlayer");
    let geometry = Geometry {
        disk_bytes: 1 << 20,
        block_size: 64 << 10,
    };
    let disk = Arc::new(Disk::create(&base, geometry).unwrap());
    let backend: Arc<dyn BlockBackend> = disk.clone();
    let vm = boot_with_disk(config, &guest, &backend);
    pause_after(&vm, 3);
    let top = |n: u32| tmp.path().join(format!("top-{n}.dlayer"));

    // Begun: the disk is sealed under a fresh top. Dropped: the seal is undone.
    let base_id = disk.layers()[0].id;
    let pending = vm.begin_snapshot(None, &[top(1)]).unwrap();
    let sealed = pending.sealed().to_vec();
    assert_eq!(sealed.len(), 1);
    assert_eq!(
        (sealed[0].index, sealed[0].sealed, &sealed[0].top_path),
        (0, base_id, &top(1))
    );
    assert_eq!(disk.paths(), [base.clone(), top(1)]);
    assert!(disk.layers()[0].sealed());
    assert_eq!(disk.layers()[1].id, sealed[0].top);
    drop(pending);
    assert_eq!(disk.paths(), std::slice::from_ref(&base));
    assert!(!disk.layers()[0].sealed() && disk.is_writable());
    assert_eq!(vm.memory_base(), None, "a dropped snapshot moved the base");

    // Committed: the seal stands.
    let pending = vm.begin_snapshot(None, &[top(2)]).unwrap();
    let layer = pending
        .write_memory(&tmp.path().join("memory.mlayer"), &Default::default())
        .unwrap();
    pending.commit(&layer);
    assert_eq!(disk.paths(), [base.clone(), top(2)]);
    assert_eq!(vm.memory_base(), Some(layer.id));

    // Abandoned after the VM wrote into the fresh top: the seal is kept, with that top.
    let mut pending = vm.begin_snapshot(Some(&layer), &[top(3)]).unwrap();
    pending.copy_pages().unwrap();
    vm.resume().unwrap();
    let lines = vm.serial_output().lines();
    assert!(vm.serial_output().wait_for_lines(lines + 2, TIMEOUT));
    match pending.abort().as_slice() {
        [Unsealed::Kept(s)] => assert_eq!((s.index, &s.top_path), (0, &top(3))),
        other => panic!("the seal of a top the VM wrote into was not kept: {other:?}"),
    }
    assert_eq!(disk.paths(), [base.clone(), top(2), top(3)]);
    let layers = disk.layers();
    assert!(layers[1].sealed() && layers[2].blocks > 0 && disk.is_writable());
    assert_eq!(vm.memory_base(), Some(layer.id));

    assert_eq!(vm.wait_for_exit(TIMEOUT).unwrap(), VmExit::Finished(0));
    assert_eq!(vm.serial_output().text(), model.output);
    let mut image = vec![0u8; 1 << 20];
    disk.read_at(0, &mut image).unwrap();
    assert_disk_is_model(&image, &model.disk, "across the seals");
}
