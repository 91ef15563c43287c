//! Live snapshots on real KVM: the layer is written under write-protect while the guest keeps
//! writing its working set, and a VM restored from it continues exactly from the pause, in
//! every restore mode, for full and diff layers, 1 and 2 vCPUs, and a chain of live diffs.

mod common;

use std::time::Duration;

use common::*;
use snap_vmm::{LayerOptions, MemoryRestore, TestGuest, Vm, VmConfig, VmError, VmOptions};

/// A guest that writes hard: many mutations per tick over a large working set.
fn busy(vcpus: u32, ticks: u64) -> (VmConfig, TestGuest) {
    let (config, guest) = small(vcpus);
    (
        config,
        TestGuest {
            working_set_pages: 2048,
            mutations_per_tick: 400,
            ticks,
            ..guest
        },
    )
}

/// A VM running `guest`, booted if KVM and write-protect work here; prints SKIP where they do
/// not (a missing write-protect fails instead when KVM is required, since every kernel with the
/// features this machine has supports it).
fn live_vm(test: &str, config: VmConfig, guest: &TestGuest) -> Option<Vm> {
    if !kvm_available(test) {
        return None;
    }
    let vm = boot(config, guest);
    match vm.prepare_live_snapshot(true) {
        Ok(_) => Some(vm),
        Err(VmError::WriteProtect(e)) => {
            assert!(
                std::env::var("SNAP_REQUIRE_KVM").as_deref() != Ok("1"),
                "{test}: {e}"
            );
            println!("SKIP {test}: {e}");
            None
        }
        Err(e) => panic!("{test}: {e}"),
    }
}

/// Runs `guest` on `vcpus`, takes `diffs` live diffs after a live full snapshot (waiting a few
/// lines between them, `pace` between runs of pages written), lets the original finish, then
/// restores every snapshot in every mode and checks its continuation byte for byte.
fn live_chain(vcpus: u32, diffs: usize, pace: Duration, test: &str) -> u64 {
    // A slow writer needs a guest that outlasts its copies.
    let ticks = if pace.is_zero() { 40 } else { 200 };
    let (config, guest) = busy(vcpus, ticks);
    let Some(vm) = live_vm(test, config, &guest) else {
        return 0;
    };
    let snaps = Snapshots::new();
    let options = LayerOptions::default();
    let mut taken = Vec::new();
    let mut saved_ahead = 0;
    let mut lines = 3;
    for k in 0..=diffs {
        assert!(vm.serial_output().wait_for_lines(lines, TIMEOUT));
        let parent = taken.last().map(|(s, _)| s);
        let (saved, cut, stats) = snaps.take_live(&vm, parent, &options, pace).unwrap();
        saved_ahead += stats.saved_ahead;
        println!("{test}: snapshot {k}: {stats:?}");
        taken.push((saved, cut));
        lines += 4;
    }
    run_to_end(&vm);
    let original = vm.serial_output().bytes();
    assert_complete_output(&String::from_utf8_lossy(&original), &guest);
    let original_memory = vm.memory().to_vec();

    for (k, (saved, cut)) in taken.iter().enumerate() {
        for mode in [
            MemoryRestore::Eager,
            MemoryRestore::Lazy,
            MemoryRestore::Prefetch,
        ] {
            let restored = saved
                .restore(&VmOptions {
                    memory_restore: mode,
                    ..VmOptions::default()
                })
                .unwrap();
            run_to_end(&restored);
            assert_eq!(
                String::from_utf8_lossy(&restored.serial_output().bytes()),
                String::from_utf8_lossy(&original[*cut..]),
                "snapshot {k} restored {mode:?}: output diverged from the pause"
            );
            assert_same_memory(&restored.memory().to_vec(), &original_memory);
        }
    }
    saved_ahead
}

#[test]
fn a_live_full_snapshot_continues_exactly_one_vcpu() {
    live_chain(
        1,
        0,
        Duration::ZERO,
        "a_live_full_snapshot_continues_exactly_one_vcpu",
    );
}

#[test]
fn a_live_full_snapshot_continues_exactly_two_vcpus() {
    live_chain(
        2,
        0,
        Duration::ZERO,
        "a_live_full_snapshot_continues_exactly_two_vcpus",
    );
}

#[test]
fn a_chain_of_five_live_diffs_continues_exactly() {
    live_chain(
        2,
        5,
        Duration::ZERO,
        "a_chain_of_five_live_diffs_continues_exactly",
    );
}

/// A slow writer: the guest writes most protected pages before the writer reads them, so the
/// fault path keeps them; the snapshot must still hold the pause's bytes.
#[test]
fn pages_the_guest_writes_first_are_kept_from_the_pause() {
    let saved = live_chain(
        1,
        1,
        Duration::from_millis(20),
        "pages_the_guest_writes_first_are_kept_from_the_pause",
    );
    if kvm_available("pages_the_guest_writes_first_are_kept_from_the_pause") {
        assert!(
            saved > 0,
            "the fault path kept no page: the test proves nothing"
        );
    }
}

/// While a live snapshot's layer is being written, a revert of the VM (which writes memory
/// around the mapping, where write-protect cannot see it) is refused; once the snapshot is
/// abandoned, the revert works and the VM continues exactly.
#[test]
fn no_revert_while_a_live_copy_runs() {
    let test = "no_revert_while_a_live_copy_runs";
    let (config, guest) = small(1);
    let Some(vm) = live_vm(test, config, &guest) else {
        return;
    };
    let cut = pause_after(&vm, 3);
    let snaps = Snapshots::new();
    let saved = snaps.full(&vm);
    vm.resume().unwrap();
    let live = vm.prepare_live_snapshot(false).unwrap();
    vm.pause();
    let pending = vm
        .begin_snapshot_live(live, Some(&saved.layer), &[])
        .unwrap();
    let e = saved.revert(&vm).unwrap_err();
    assert!(e.to_string().contains("live snapshot"), "{e}");
    drop(pending);
    saved.revert(&vm).unwrap();
    let mark = vm.serial_output().len();
    run_to_end(&vm);
    let out = vm.serial_output().bytes();
    let model = guest.model(1).output;
    assert_eq!(
        String::from_utf8_lossy(&out[mark..]),
        model[cut..],
        "the reverted VM continues exactly"
    );
}

/// Writes the VMM itself makes into guest memory during the copy (as a virtio-blk read would)
/// are caught like the guest's: a page that held data at the pause keeps its pause bytes in the
/// snapshot, and a page that was a hole at the pause stays zero in it, however they were
/// written after; both are in the next diff.
#[test]
fn vmm_writes_during_the_copy_do_not_reach_the_snapshot() {
    let test = "vmm_writes_during_the_copy_do_not_reach_the_snapshot";
    let (config, guest) = small(1);
    let Some(vm) = live_vm(test, config, &guest) else {
        return;
    };
    assert!(vm.serial_output().wait_for_lines(2, TIMEOUT));
    let (held, hole) = (24u64 << 20, 28u64 << 20);
    vm.memory().write_at_offset(held, &[0x11; 4096]).unwrap();
    let live = vm.prepare_live_snapshot(true).unwrap();
    vm.pause();
    let pending = vm.begin_snapshot_live(live, None, &[]).unwrap();
    vm.resume().unwrap();
    vm.memory().write_at_offset(held, &[0x22; 4096]).unwrap();
    vm.memory().write_at_offset(hole, &[0x33; 4096]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let layer = pending
        .write_memory(&dir.path().join("l"), &LayerOptions::default())
        .unwrap();
    pending.write_state(&dir.path().join("s")).unwrap();
    assert!(
        pending.live_stats().unwrap().saved_ahead >= 1,
        "the held page at least"
    );
    pending.commit(&layer);
    let chain = snap_vmm::LayerChain::open(&[dir.path().join("l")]).unwrap();
    let page = |offset: u64| {
        let mut buf = [0u8; 4096];
        chain.read_page(offset / 4096, &mut buf).unwrap();
        buf
    };
    assert_eq!(page(held), [0x11; 4096], "the pause's bytes");
    assert_eq!(page(hole), [0; 4096], "a hole at the pause");
    vm.pause();
    let next = vm.harvest_dirty().unwrap();
    assert!(next.contains(held / 4096) && next.contains(hole / 4096));
    vm.resume().unwrap();
    run_to_end(&vm);
}
