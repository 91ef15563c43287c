//! Lazy restore on real KVM: a guest restored lazily (pages served through userfaultfd from the
//! layer chain while it runs) continues exactly as the uninterrupted run, also from a chain of
//! diff layers; three lazy clones of one snapshot run at once; a damaged frame reached during a
//! lazy restore stops the VM, naming the layer and the frame, and the guest does not continue.

mod common;

use common::*;
use snap_mem::layer::{Layer, PageEntry};
use snap_vmm::boot::PROGRAM_ADDR;
use snap_vmm::snapshot::{self, MEMORY_FILE};
use snap_vmm::{MemoryRestore, RunState, VmExit, VmOptions};

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
    let root = SnapDir::new();
    pause_after(&vm, 4);
    save_full(&vm, root.path());
    vm.resume().unwrap();
    let cut = pause_after(&vm, 9);
    let diff = root.sibling("diff");
    snapshot::save(&vm, &diff, Some(root.path()), &Default::default()).unwrap();
    run_to_end(&vm);

    let restored = snapshot::restore_with(&diff, &lazy()).unwrap();
    run_to_end(&restored);
    assert_eq!(restored.serial_output().text(), model[cut..]);
    restored.wait_memory_resident().unwrap();
    assert_same_memory(&restored.memory().to_vec(), &vm.memory().to_vec());
    let stats = restored.lazy_stats().unwrap();
    assert!(stats.faults > 0, "the guest never faulted: {stats:?}");

    // A lazily restored VM can be snapshotted again (after its memory is all in).
    let again = root.sibling("again");
    snapshot::save(&restored, &again, Some(&diff), &Default::default()).unwrap();
}

#[test]
fn three_lazy_clones_run_at_once() {
    if !kvm_available("three_lazy_clones_run_at_once") {
        return;
    }
    let (config, guest) = small(1);
    let model = guest.model(1).output;
    let vm = boot(config, &guest);
    let root = SnapDir::new();
    let cut = pause_after(&vm, 6);
    save_full(&vm, root.path());
    drop(vm);
    let clones: Vec<_> = (0..3)
        .map(|_| snapshot::restore_with(root.path(), &lazy()).unwrap())
        .collect();
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
    let root = SnapDir::new();
    pause_after(&vm, 5);
    save_full(&vm, root.path());
    drop(vm);
    // Damage the frame holding the guest's code: its first instruction after the restore needs it.
    let path = root.path().join(MEMORY_FILE);
    let layer = Layer::open(&path).unwrap();
    let Some(PageEntry::Data { frame, .. }) = layer.page(PROGRAM_ADDR / 4096) else {
        panic!("the code page is not stored");
    };
    let offset = layer.frame(frame).offset as usize;
    drop(layer);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[offset + 1] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();

    let restored = snapshot::restore_with(root.path(), &lazy()).unwrap();
    let _ = restored.resume();
    let e = restored.wait_memory_resident().unwrap_err().to_string();
    assert!(
        e.contains(MEMORY_FILE) && e.contains(&format!("frame {frame}")),
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
