//! Continuation and revert from memory layer chains of depth 1, 2 and 5 (a full layer, then diff
//! layers of the pages dirtied in between), with both KVM dirty-tracking backends, and a branch
//! taken after a revert.

mod common;

use common::*;
use snap_testkit::fs::files_in;
use snap_vmm::{DirtyTracking, LayerChain, LayerOptions, Vm, VmOptions};

fn chains(dirty: DirtyTracking, vcpus: u32, test: &str) {
    if !kvm_available(test) {
        return;
    }
    let options = VmOptions {
        dirty_tracking: dirty,
        ..VmOptions::default()
    };
    let (config, guest) = small(vcpus);
    let model = guest.model(vcpus).output;
    let vm = Vm::create_with(config, &guest.boot_image(&config).unwrap(), &options).unwrap();
    vm.resume().unwrap();
    let snaps = Snapshots::new();
    let mut saved: Vec<Saved> = Vec::new();
    let mut cuts = Vec::new();
    // Small frames, so that diffs hold partial regions over full ones.
    let layer_options = LayerOptions {
        frame_size: 64 << 10,
        ..LayerOptions::default()
    };
    for (i, lines) in [2, 5, 8, 11, 14].into_iter().enumerate() {
        cuts.push(pause_after(&vm, lines));
        let s = snaps.take(&vm, saved.last(), &layer_options).unwrap();
        assert_eq!(s.layer.parent.is_some(), i > 0);
        saved.push(s);
        vm.resume().unwrap();
    }
    run_to_end(&vm);
    assert_eq!(vm.serial_output().text(), model);
    let final_memory = vm.memory().to_vec();

    for depth in [1, 2, 5] {
        let what = format!("{dirty:?}, {vcpus} vCPUs, chain of {depth}");
        let restored = saved[depth - 1].restore(&options).unwrap();
        run_to_end(&restored);
        assert_eq!(
            restored.serial_output().text(),
            model[cuts[depth - 1]..],
            "{what}"
        );
        assert_same_memory(&restored.memory().to_vec(), &final_memory);
    }
    for depth in [5, 1, 2] {
        let what = format!("{dirty:?}, {vcpus} vCPUs, revert to chain of {depth}");
        saved[depth - 1].revert(&vm).unwrap();
        let mark = vm.serial_output().len();
        run_to_end(&vm);
        assert_eq!(
            vm.serial_output().text()[mark..],
            model[cuts[depth - 1]..],
            "{what}"
        );
        assert_same_memory(&vm.memory().to_vec(), &final_memory);
    }

    // A branch: revert to s1, run a little, take a diff over s1, and restore that branch.
    saved[1].revert(&vm).unwrap();
    let mark = vm.serial_output().len();
    vm.resume().unwrap();
    let cut = pause_after(&vm, vm.serial_output().lines() + 4) - mark + cuts[1];
    let branch = snaps.take(&vm, Some(&saved[1]), &layer_options).unwrap();
    let chain = LayerChain::open(&branch.layers).unwrap();
    assert_eq!(chain.layers().len(), 3);
    assert_eq!(branch.layer.parent, Some(saved[1].layer.as_parent()));
    let restored = branch.restore(&options).unwrap();
    run_to_end(&restored);
    assert_eq!(restored.serial_output().text(), model[cut..], "branch");
    assert_same_memory(&restored.memory().to_vec(), &final_memory);
}

#[test]
fn chains_with_the_dirty_bitmap() {
    chains(DirtyTracking::Bitmap, 1, "chains_with_the_dirty_bitmap");
}

#[test]
fn chains_with_the_dirty_ring() {
    chains(
        DirtyTracking::Ring { entries: 4096 },
        1,
        "chains_with_the_dirty_ring",
    );
}

#[test]
fn chains_with_two_vcpus_both_backends() {
    chains(
        DirtyTracking::Bitmap,
        2,
        "chains_with_two_vcpus_both_backends",
    );
    chains(
        DirtyTracking::Ring { entries: 1024 },
        2,
        "chains_with_two_vcpus_both_backends",
    );
}

/// A diff snapshot that fails after its pages were harvested loses none of them and leaves no
/// file behind: the next diff over the same parent still holds them, and restores exactly.
#[test]
fn a_failed_diff_snapshot_loses_no_pages() {
    if !kvm_available("a_failed_diff_snapshot_loses_no_pages") {
        return;
    }
    for dirty in [DirtyTracking::Bitmap, DirtyTracking::Ring { entries: 4096 }] {
        let options = VmOptions {
            dirty_tracking: dirty,
            ..VmOptions::default()
        };
        let (config, guest) = small(2);
        let model = guest.model(2).output;
        let vm = Vm::create_with(config, &guest.boot_image(&config).unwrap(), &options).unwrap();
        vm.resume().unwrap();
        let snaps = Snapshots::new();
        pause_after(&vm, 4);
        let root = snaps.full(&vm);
        let files = files_in(snaps.dir());
        vm.resume().unwrap();
        pause_after(&vm, 10);
        // Three snapshots that fail after the harvest: the layer's directory does not exist; the
        // layer writer refuses its options; everything is written but the snapshot is dropped
        // before its commit (as when publishing it fails).
        let pending = vm.begin_snapshot(Some(&root.layer), &[]).unwrap();
        let missing = snaps.dir().join("missing").join("diff.mlayer");
        assert!(
            pending
                .write_memory(&missing, &LayerOptions::default())
                .is_err()
        );
        drop(pending);
        let bad = LayerOptions {
            frame_size: 12345,
            ..LayerOptions::default()
        };
        assert!(snaps.take(&vm, Some(&root), &bad).is_err());
        assert_eq!(
            files_in(snaps.dir()),
            files,
            "a failed snapshot left files behind"
        );
        let pending = vm.begin_snapshot(Some(&root.layer), &[]).unwrap();
        let written = snaps.dir().join("uncommitted.mlayer");
        pending
            .write_memory(&written, &LayerOptions::default())
            .unwrap();
        drop(pending);
        std::fs::remove_file(&written).unwrap();
        assert_eq!(vm.memory_base(), Some(root.layer.id));
        vm.resume().unwrap();
        let cut = pause_after(&vm, 16);
        let diff = snaps.diff(&vm, &root);
        run_to_end(&vm);
        let restored = diff.restore(&options).unwrap();
        run_to_end(&restored);
        assert_eq!(restored.serial_output().text(), model[cut..], "{dirty:?}");
        assert_same_memory(&restored.memory().to_vec(), &vm.memory().to_vec());
    }
}
