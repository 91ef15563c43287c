//! Lazy restore on real KVM: a guest restored lazily (pages served through userfaultfd from the
//! layer chain while it runs) continues exactly as the uninterrupted run, also from a chain of
//! diff layers; three lazy clones of one snapshot run at once; a damaged frame reached during a
//! lazy restore stops the VM, naming the layer and the frame, and the guest does not continue.

mod common;

use common::*;
use snap_mem::layer::{Layer, PageEntry};
use snap_vmm::boot::PROGRAM_ADDR;
use snap_vmm::{MemoryRestore, RunState, Vm, VmConfig, VmExit, VmOptions};

fn lazy() -> VmOptions {
    VmOptions {
        memory_restore: MemoryRestore::Lazy,
        ..VmOptions::default()
    }
}

#[test]
fn lazy_restore_continues_exactly_from_a_chain() {
    if !kvm_available("lazy_restore_continues_exactly_from_a_chain") {
        return;
    }
    let (config, guest) = small(2);
    let model = guest.model(2).output;
    let vm = boot(config, &guest);
    let snaps = Snapshots::new();
    pause_after(&vm, 4);
    let root = snaps.full(&vm);
    vm.resume().unwrap();
    let cut = pause_after(&vm, 9);
    let diff = snaps.diff(&vm, &root);
    run_to_end(&vm);

    let restored = diff.restore(&lazy()).unwrap();
    run_to_end(&restored);
    assert_eq!(restored.serial_output().text(), model[cut..]);
    restored.wait_memory_resident().unwrap();
    assert_same_memory(&restored.memory().to_vec(), &vm.memory().to_vec());
    // Every window with data went in once, by a fault or by the filler (which of the two is a
    // race between the guest and the filler; the prefetch test below shows faults). Windows no
    // layer holds stay unallocated unless touched: most of this guest's memory.
    let stats = restored.lazy_stats().unwrap();
    let windows = config.memory_bytes / (256 << 10);
    let (_, chain) = diff.open().unwrap();
    let with_data = snap_mem::lazy::WindowSource::windows_with_data(&chain)
        .unwrap()
        .len() as u64;
    let installed = stats.faults + stats.filled + stats.prefetched;
    assert!(
        (with_data..windows).contains(&installed),
        "{stats:?}: {with_data} of {windows} windows hold data"
    );

    // A lazily restored VM can be snapshotted again (after its memory is all in).
    snaps.diff(&restored, &diff);
}

#[test]
fn three_lazy_clones_run_at_once() {
    if !kvm_available("three_lazy_clones_run_at_once") {
        return;
    }
    let (config, guest) = small(1);
    let model = guest.model(1).output;
    let vm = boot(config, &guest);
    let snaps = Snapshots::new();
    let cut = pause_after(&vm, 6);
    let saved = snaps.full(&vm);
    drop(vm);
    let clones: Vec<_> = (0..3).map(|_| saved.restore(&lazy()).unwrap()).collect();
    for c in &clones {
        c.resume().unwrap();
    }
    for c in &clones {
        assert_eq!(c.wait_for_exit(TIMEOUT).unwrap(), VmExit::Finished(0));
        assert_eq!(c.serial_output().text(), model[cut..]);
    }
}

#[test]
fn a_damaged_frame_stops_a_lazily_restored_vm() {
    if !kvm_available("a_damaged_frame_stops_a_lazily_restored_vm") {
        return;
    }
    let (config, guest) = small(1);
    let vm = boot(config, &guest);
    let snaps = Snapshots::new();
    pause_after(&vm, 5);
    let saved = snaps.full(&vm);
    drop(vm);
    // Damage the frame holding the guest's code: its first instruction after the restore needs it.
    let path = saved.memory();
    let layer = Layer::open(path).unwrap();
    let Some(PageEntry::Data { frame, .. }) = layer.page(PROGRAM_ADDR / 4096) else {
        panic!("the code page is not stored");
    };
    let offset = layer.frame(frame).offset as usize;
    drop(layer);
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset + 1] ^= 0x40;
    std::fs::write(path, bytes).unwrap();

    let restored = saved.restore(&lazy()).unwrap();
    let _ = restored.resume();
    let e = restored.wait_memory_resident().unwrap_err().to_string();
    assert!(
        e.contains(&path.display().to_string()) && e.contains(&format!("frame {frame}")),
        "{e}"
    );
    // The VM is stopped for good, and the guest printed nothing after the snapshot point.
    restored.pause();
    assert!(
        matches!(restored.run_state(), RunState::Failed(ref why) if why.contains(&format!("frame {frame}")))
    );
    assert!(restored.resume().is_err());
    assert_eq!(restored.serial_output().text(), "");
}

/// A one-vCPU guest's full snapshot after its fourth line (the snapshots' directory, the
/// snapshot, and what the uninterrupted run printed after it).
fn snapshot_after_four_lines() -> (Snapshots, Saved, String) {
    let (config, guest) = small(1);
    let model = guest.model(1).output;
    let vm = boot(config, &guest);
    let snaps = Snapshots::new();
    let cut = pause_after(&vm, 4);
    let saved = snaps.full(&vm);
    (snaps, saved, model[cut..].to_string())
}

#[test]
fn prefetch_records_the_working_set_then_installs_it_first() {
    if !kvm_available("prefetch_records_the_working_set_then_installs_it_first") {
        return;
    }
    let (_snaps, saved, rest) = snapshot_after_four_lines();
    let prefetch = VmOptions {
        memory_restore: MemoryRestore::Prefetch,
        ..VmOptions::default()
    };

    // First restore: lazy, recording.
    let first = saved.restore(&prefetch).unwrap();
    run_to_end(&first);
    assert_eq!(first.serial_output().text(), rest);
    first.wait_memory_resident().unwrap();
    let recorded = first.lazy_stats().unwrap();
    assert!(
        recorded.faults > 0 && recorded.prefetched == 0,
        "{recorded:?}"
    );
    let (_, chain) = saved.open().unwrap();
    let set = snap_vmm::snapshot::read_working_set(
        &saved.working_set,
        chain.window_pages(),
        chain.memory_bytes(),
        chain.newest().info().digest.0,
    )
    .expect("recorded");
    assert!(set.has_data(), "the set is stored with its bytes");
    assert_eq!(
        set.len() as u64,
        recorded.faults,
        "one entry per fault, in order"
    );

    // Second restore: the recorded set goes in first. (The test lets the prefetch finish before
    // resuming, so that what it checks does not depend on a race with the guest.)
    let second = saved.restore(&prefetch).unwrap();
    let deadline = std::time::Instant::now() + TIMEOUT;
    while second.lazy_stats().unwrap().prefetched < set.len() as u64 {
        assert!(
            std::time::Instant::now() < deadline,
            "prefetch never finished"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    run_to_end(&second);
    assert_eq!(second.serial_output().text(), rest);
    second.wait_memory_resident().unwrap();
    let stats = second.lazy_stats().unwrap();
    assert!(stats.prefetched > 0, "{stats:?}");
    assert!(
        stats.faults < recorded.faults,
        "prefetch saved no faults: {stats:?} vs {recorded:?}"
    );
    assert_same_memory(&second.memory().to_vec(), &first.memory().to_vec());
}

/// A recording that ends after its snapshot was deleted (its state file gone) removes what it
/// wrote: the delete looked for the working set before it existed.
#[test]
fn a_working_set_recorded_after_its_snapshot_was_deleted_is_removed() {
    if !kvm_available("a_working_set_recorded_after_its_snapshot_was_deleted_is_removed") {
        return;
    }
    let (_snaps, saved, rest) = snapshot_after_four_lines();
    let prefetch = VmOptions {
        memory_restore: MemoryRestore::Prefetch,
        ..VmOptions::default()
    };
    let restored = saved.restore(&prefetch).unwrap();
    // The snapshot is deleted while the restored guest runs and records.
    std::fs::remove_file(&saved.state).unwrap();
    assert!(!saved.working_set.exists());
    run_to_end(&restored);
    assert_eq!(restored.serial_output().text(), rest);
    // The recording ends before memory counts as complete.
    restored.wait_memory_resident().unwrap();
    assert!(restored.lazy_stats().unwrap().faults > 0);
    assert!(
        !saved.working_set.exists(),
        "a working set was left for a deleted snapshot"
    );
}

/// The restore unit is configurable down to one page: a lazy restore with 4 KiB units (pages
/// served one at a time out of a frame read once) continues exactly too; a unit that is not a
/// power of two is refused.
#[test]
fn lazy_restore_with_page_sized_units() {
    if !kvm_available("lazy_restore_with_page_sized_units") {
        return;
    }
    let (config, guest) = small(2);
    let model = guest.model(2).output;
    let vm = boot(config, &guest);
    let snaps = Snapshots::new();
    let cut = pause_after(&vm, 6);
    let saved = snaps.full(&vm);
    run_to_end(&vm);
    let options = VmOptions {
        memory_restore: MemoryRestore::Lazy,
        restore_unit_bytes: Some(4096),
        ..VmOptions::default()
    };
    let restored = saved.restore(&options).unwrap();
    run_to_end(&restored);
    assert_eq!(restored.serial_output().text(), model[cut..]);
    restored.wait_memory_resident().unwrap();
    assert_same_memory(&restored.memory().to_vec(), &vm.memory().to_vec());
    let stats = restored.lazy_stats().unwrap();
    assert!(
        stats.faults + stats.filled <= config.memory_bytes / 4096 && stats.faults > 0,
        "{stats:?}"
    );

    let bad = VmOptions {
        restore_unit_bytes: Some(12288),
        ..options
    };
    assert!(saved.restore(&bad).is_err());
}

/// A VM prepared ahead (the KVM VM, its memory slots and vCPUs built before the snapshot is
/// known) takes a restore in every mode and continues exactly; one prepared for another shape
/// is refused, saying what differs.
#[test]
fn restore_into_a_prepared_vm() {
    if !kvm_available("restore_into_a_prepared_vm") {
        return;
    }
    let (config, guest) = small(1);
    let model = guest.model(1).output;
    let vm = boot(config, &guest);
    let snaps = Snapshots::new();
    let cut = pause_after(&vm, 3);
    let saved = snaps.full(&vm);
    run_to_end(&vm);
    for mode in [
        MemoryRestore::Eager,
        MemoryRestore::Lazy,
        MemoryRestore::Prefetch,
    ] {
        let prepared = Vm::prepare(config, &VmOptions::default()).unwrap();
        let restored = saved.restore_into(prepared, mode).unwrap();
        run_to_end(&restored);
        assert_eq!(restored.serial_output().text(), model[cut..], "{mode:?}");
        restored.wait_memory_resident().unwrap();
        assert_same_memory(&restored.memory().to_vec(), &vm.memory().to_vec());
    }
    let other = VmConfig { vcpus: 2, ..config };
    let prepared = Vm::prepare(other, &VmOptions::default()).unwrap();
    let Err(err) = saved.restore_into(prepared, MemoryRestore::Lazy) else {
        panic!("a VM prepared with 2 vCPUs took a 1-vCPU snapshot");
    };
    assert!(err.to_string().contains("prepared VM has"), "{err}");
}
