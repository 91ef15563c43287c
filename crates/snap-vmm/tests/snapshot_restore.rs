//! Continuation and revert on real KVM: a VM restored from a snapshot continues exactly as the
//! original did, in serial output and in every byte of guest memory.

mod common;

use common::*;
use snap_vmm::guest::WORKING_SET_BASE;
use snap_vmm::{LayerOptions, RunState, TestGuest, Vm, VmError, VmExit, VmOptions};

/// Runs to a snapshot point, saves, lets the original finish, restores into a new VM and runs it
/// to the end: output after the snapshot and final memory must be identical.
fn continuation(vcpus: u32, test: &str) {
    if !kvm_available(test) {
        return;
    }
    let (config, guest) = small(vcpus);
    let vm = boot(config, &guest);
    let cut = pause_after(&vm, 8);
    let snaps = Snapshots::new();
    let saved = snaps.full(&vm);
    run_to_end(&vm);
    let original = vm.serial_output().bytes();
    assert_complete_output(&String::from_utf8_lossy(&original), &guest);
    let original_memory = vm.memory().to_vec();

    let restored = saved.restore(&VmOptions::default()).unwrap();
    assert_eq!(restored.config(), config);
    run_to_end(&restored);
    let after = restored.serial_output().bytes();
    assert!(
        after.len() > 20,
        "restored guest printed too little: {after:?}"
    );
    assert_eq!(
        String::from_utf8_lossy(&after),
        String::from_utf8_lossy(&original[cut..]),
        "restored VM's output diverged"
    );
    assert_same_memory(&restored.memory().to_vec(), &original_memory);
}

#[test]
fn continuation_one_vcpu() {
    continuation(1, "continuation_one_vcpu");
}

#[test]
fn continuation_two_vcpus() {
    continuation(2, "continuation_two_vcpus");
}

/// Saves, runs on to the end, reverts the same VM and runs again: the lines after the snapshot
/// repeat exactly and memory ends identical.
fn revert(vcpus: u32, test: &str) {
    if !kvm_available(test) {
        return;
    }
    let (config, guest) = small(vcpus);
    let vm = boot(config, &guest);
    let cut = pause_after(&vm, 5);
    let snaps = Snapshots::new();
    let saved = snaps.full(&vm);
    run_to_end(&vm);
    let first = vm.serial_output().bytes();
    let first_memory = vm.memory().to_vec();

    saved.revert(&vm).unwrap();
    let mark = vm.serial_output().len();
    run_to_end(&vm);
    let all = vm.serial_output().bytes();
    assert_eq!(
        String::from_utf8_lossy(&all[mark..]),
        String::from_utf8_lossy(&first[cut..]),
        "reverted VM's output diverged"
    );
    assert_same_memory(&vm.memory().to_vec(), &first_memory);

    // And a second revert of the same snapshot repeats once more.
    saved.revert(&vm).unwrap();
    let mark = vm.serial_output().len();
    run_to_end(&vm);
    assert_eq!(vm.serial_output().bytes()[mark..], first[cut..]);
}

#[test]
fn revert_one_vcpu() {
    revert(1, "revert_one_vcpu");
}

#[test]
fn revert_two_vcpus() {
    revert(2, "revert_two_vcpus");
}

/// The guest's output is a pure function of its parameters: a real run on KVM prints exactly
/// what the host-side model computes and leaves exactly the model's working set in memory, for
/// 1, 2 and 4 vCPUs; a different seed gives different hashes.
#[test]
fn guest_matches_its_model() {
    if !kvm_available("guest_matches_its_model") {
        return;
    }
    for vcpus in [1, 2, 4] {
        let (config, guest) = small(vcpus);
        let vm = boot(config, &guest);
        run_to_end(&vm);
        let model = guest.model(vcpus);
        assert_eq!(vm.serial_output().text(), model.output, "{vcpus} vCPUs");
        let mut ws = vec![0u8; model.working_set.len()];
        vm.memory().read(WORKING_SET_BASE, &mut ws).unwrap();
        assert!(
            ws == model.working_set,
            "{vcpus} vCPUs: working set differs from the model"
        );
    }
    let (_, guest) = small(1);
    let other = TestGuest {
        seed: guest.seed + 1,
        ..guest
    };
    assert_ne!(other.model(1).output, guest.model(1).output);
}

/// Snapshots taken at many points of one run (early, mid-tick, after other vCPUs finished and
/// halted) each continue exactly as the model says.
#[test]
fn continuation_from_many_points() {
    if !kvm_available("continuation_from_many_points") {
        return;
    }
    for vcpus in [2, 4] {
        let (config, guest) = small(vcpus);
        let model = guest.model(vcpus);
        for lines in [1, 7, 15, 22, 25] {
            let vm = boot(config, &guest);
            let cut = pause_after(&vm, lines);
            let snaps = Snapshots::new();
            let saved = snaps.full(&vm);
            drop(vm);
            let restored = saved.restore(&VmOptions::default()).unwrap();
            run_to_end(&restored);
            assert_eq!(
                restored.serial_output().text(),
                model.output[cut..],
                "{vcpus} vCPUs, snapshot after {lines} lines"
            );
        }
    }
}

/// Pause parks every vCPU; save while running is refused; resume continues the same run.
#[test]
fn pause_and_resume_keep_the_run_intact() {
    if !kvm_available("pause_and_resume_keep_the_run_intact") {
        return;
    }
    let (config, guest) = small(2);
    let vm = boot(config, &guest);
    assert!(matches!(vm.save(), Err(snap_vmm::VmError::NotPaused)));
    for lines in [3, 6, 9] {
        pause_after(&vm, lines);
        assert_eq!(vm.run_state(), snap_vmm::RunState::Paused);
        let len = vm.serial_output().len();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(vm.serial_output().len(), len, "a paused VM printed");
        vm.resume().unwrap();
    }
    run_to_end(&vm);
    let reference = boot(config, &guest);
    run_to_end(&reference);
    assert_eq!(vm.serial_output().text(), reference.serial_output().text());
}

/// A restore into a new VM while the original keeps running: two VMs from one snapshot.
#[test]
fn restore_twice_from_one_snapshot() {
    if !kvm_available("restore_twice_from_one_snapshot") {
        return;
    }
    let (config, guest) = small(1);
    let vm = boot(config, &guest);
    let cut = pause_after(&vm, 4);
    let snaps = Snapshots::new();
    let (state, image) = snaps.full(&vm).open().unwrap();
    let a = Vm::restore(&state, &image).unwrap();
    let b = Vm::restore(&state, &image).unwrap();
    a.resume().unwrap();
    b.resume().unwrap();
    run_to_end(&vm);
    // a and b already run: wait for them without resuming again.
    for clone in [&a, &b] {
        assert_eq!(clone.wait_for_exit(TIMEOUT).unwrap(), VmExit::Finished(0));
    }
    // A finished guest is not resumed by mistake.
    assert!(matches!(
        a.resume(),
        Err(VmError::Stopped(VmExit::Finished(0)))
    ));
    let tail = &vm.serial_output().bytes()[cut..];
    assert_eq!(a.serial_output().bytes(), tail);
    assert_eq!(b.serial_output().bytes(), tail);
}

/// A snapshot of a guest that has finished restores as a finished VM, and a revert to it leaves
/// the VM finished: neither runs on past the guest's own end.
#[test]
fn a_finished_guest_restores_finished() {
    if !kvm_available("a_finished_guest_restores_finished") {
        return;
    }
    let (config, guest) = small(1);
    let vm = boot(config, &guest);
    run_to_end(&vm);
    let snaps = Snapshots::new();
    let done = snaps.full(&vm);
    let restored = done.restore(&VmOptions::default()).unwrap();
    assert_eq!(restored.run_state(), RunState::Stopped(VmExit::Finished(0)));
    assert!(matches!(
        restored.resume(),
        Err(VmError::Stopped(VmExit::Finished(0)))
    ));
    assert_eq!(restored.serial_output().text(), "");

    // A VM reverted to a mid-run snapshot runs again; reverted to the finished one, it stops.
    let (config2, guest2) = small(1);
    let other = boot(config2, &guest2);
    let cut = pause_after(&other, 3);
    let mid = snaps.full(&other);
    run_to_end(&other);
    mid.revert(&other).unwrap();
    assert_eq!(other.run_state(), RunState::Paused);
    let mark = other.serial_output().len();
    run_to_end(&other);
    assert_eq!(
        other.serial_output().text()[mark..],
        guest2.model(1).output[cut..]
    );
    done.revert(&other).unwrap();
    assert_eq!(other.run_state(), RunState::Stopped(VmExit::Finished(0)));
}

/// A snapshot whose pages are copied out while the VM is paused, and written after it resumed
/// (so the VM is paused only for the copy), holds memory exactly as of the pause: restores from
/// a full and a diff layer written that way continue as the model says, although the guest
/// changed those pages before the layers were written.
///
/// The guest runs for many more ticks than the test needs, and the full layer is written while
/// the VM is paused for the diff: a pause then always lands well before the guest's end, however
/// long the writes take or the test thread waits for a core.
#[test]
fn layers_written_after_resuming_hold_the_pause_point() {
    if !kvm_available("layers_written_after_resuming_hold_the_pause_point") {
        return;
    }
    let (config, guest) = small(1);
    let guest = TestGuest {
        ticks: 300,
        ..guest
    };
    let model = guest.model(1).output;
    let vm = boot(config, &guest);
    let snaps = Snapshots::new();
    let file = |name: &str| snaps.dir().join(name);
    let options = LayerOptions::default();

    let cut1 = pause_after(&vm, 4);
    let mut full = vm.begin_snapshot(None, &[]).unwrap();
    let copied = full.copy_pages().unwrap();
    assert_eq!(copied as u64, full.pages() * 4096);
    vm.resume().unwrap();
    // The guest changes the copied pages for four ticks; the full layer is written after that.
    let cut2 = pause_after(&vm, 8);
    let full_info = full.write_memory(&file("full.mlayer"), &options).unwrap();
    full.write_state(&file("full.state")).unwrap();
    full.commit(&full_info);

    let mut diff = vm.begin_snapshot(Some(&full_info), &[]).unwrap();
    diff.copy_pages().unwrap();
    vm.resume().unwrap();
    assert!(vm.serial_output().wait_for_lines(12, TIMEOUT));
    let diff_info = diff.write_memory(&file("diff.mlayer"), &options).unwrap();
    diff.write_state(&file("diff.state")).unwrap();
    diff.commit(&diff_info);
    // The VM runs on: it may even have finished while the diff was written.
    assert_eq!(vm.wait_for_exit(TIMEOUT).unwrap(), VmExit::Finished(0));
    assert_eq!(vm.serial_output().text(), model);

    let full = Saved {
        state: file("full.state"),
        layers: vec![file("full.mlayer")],
        layer: full_info,
        working_set: file("full.working-set"),
    };
    let diff = Saved {
        state: file("diff.state"),
        layers: vec![file("full.mlayer"), file("diff.mlayer")],
        layer: diff_info,
        working_set: file("diff.working-set"),
    };
    for (saved, cut) in [(&full, cut1), (&diff, cut2)] {
        let restored = saved.restore(&VmOptions::default()).unwrap();
        run_to_end(&restored);
        assert_eq!(
            restored.serial_output().text(),
            model[cut..],
            "{:?}",
            saved.layers
        );
    }
}
