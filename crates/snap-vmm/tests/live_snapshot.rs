//! Live snapshots on real KVM: the layer is written under write-protect while the guest keeps
//! writing its working set, and a VM restored from it continues exactly from the pause, in
//! every restore mode, for full and diff layers, 1 and 2 vCPUs, and a chain of live diffs.

mod common;

use std::time::Duration;

use common::*;
use snap_vmm::{LayerOptions, MemoryRestore, TestGuest, Vm, VmConfig, VmError, VmOptions};

/// A guest that writes hard: many mutations per tick over a large working set.
fn busy(vcpus: u32) -> (VmConfig, TestGuest) {
    let (config, guest) = small(vcpus);
    (
        config,
        TestGuest {
            working_set_pages: 2048,
            mutations_per_tick: 400,
            ticks: 40,
            ..guest
        },
    )
}

/// Whether write-protect works here; prints SKIP where it does not (unless KVM is required,
/// since every kernel with the features this machine has supports it).
fn live_available(vm: &Vm, test: &str) -> bool {
    match vm.prepare_live_snapshot(true) {
        Ok(_) => true,
        Err(VmError::WriteProtect(e)) => {
            assert!(
                std::env::var("SNAP_REQUIRE_KVM").as_deref() != Ok("1"),
                "{test}: {e}"
            );
            println!("SKIP {test}: {e}");
            false
        }
        Err(e) => panic!("{test}: {e}"),
    }
}

/// Runs `guest` on `vcpus`, takes `diffs` live diffs after a live full snapshot (waiting a few
/// lines between them, `pace` between runs of pages written), lets the original finish, then
/// restores every snapshot in every mode and checks its continuation byte for byte.
fn live_chain(vcpus: u32, diffs: usize, pace: Duration, test: &str) -> u64 {
    if !kvm_available(test) {
        return 0;
    }
    let (config, guest) = busy(vcpus);
    let vm = boot(config, &guest);
    if !live_available(&vm, test) {
        return 0;
    }
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
    if !kvm_available(test) {
        return;
    }
    let (config, guest) = small(1);
    let vm = boot(config, &guest);
    if !live_available(&vm, test) {
        return;
    }
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
