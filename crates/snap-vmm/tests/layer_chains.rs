//! Continuation and revert from memory layer chains of depth 1, 2 and 5 (a full layer, then diff
//! layers of the pages dirtied in between), with both KVM dirty-tracking backends, and a branch
//! taken after a revert.

mod common;

use std::path::PathBuf;

use common::*;
use snap_vmm::{DirtyTracking, LayerOptions, Vm, VmOptions, snapshot};

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
    let root = SnapDir::new();
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut cuts = Vec::new();
    // Small frames, so that diffs hold partial regions over full ones.
    let layer_options = LayerOptions {
        frame_size: 64 << 10,
        ..LayerOptions::default()
    };
    for (i, lines) in [2, 5, 8, 11, 14].into_iter().enumerate() {
        cuts.push(pause_after(&vm, lines));
        let dir = root.sibling(&format!("s{i}"));
        let info =
            snapshot::save(&vm, &dir, dirs.last().map(PathBuf::as_path), &layer_options).unwrap();
        assert_eq!(info.layer.parent.is_some(), i > 0);
        dirs.push(dir);
        vm.resume().unwrap();
    }
    run_to_end(&vm);
    assert_eq!(vm.serial_output().text(), model);
    let final_memory = vm.memory().to_vec();

    for depth in [1, 2, 5] {
        let what = format!("{dirty:?}, {vcpus} vCPUs, chain of {depth}");
        let restored = snapshot::restore_with(&dirs[depth - 1], &options).unwrap();
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
        snapshot::revert(&vm, &dirs[depth - 1]).unwrap();
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
    snapshot::revert(&vm, &dirs[1]).unwrap();
    let mark = vm.serial_output().len();
    vm.resume().unwrap();
    let cut = pause_after(&vm, vm.serial_output().lines() + 4) - mark + cuts[1];
    let branch = root.sibling("branch");
    snapshot::save(&vm, &branch, Some(&dirs[1]), &layer_options).unwrap();
    assert_eq!(snapshot::chain_dirs(&branch).unwrap().len(), 3);
    let restored = snapshot::restore_with(&branch, &options).unwrap();
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

/// A diff snapshot that fails after its pages were harvested loses none of them: the next diff
/// over the same parent still holds them, and restores exactly.
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
        let root = SnapDir::new();
        pause_after(&vm, 4);
        save_full(&vm, root.path());
        vm.resume().unwrap();
        pause_after(&vm, 10);
        // Two saves that fail after the harvest: the target's parent directory does not exist,
        // and the layer writer refuses its options once the temporary directory exists.
        let impossible = root.sibling("missing").join("diff");
        let e = snapshot::save(
            &vm,
            &impossible,
            Some(root.path()),
            &LayerOptions::default(),
        );
        assert!(e.is_err());
        let bad = LayerOptions {
            frame_size: 12345,
            ..LayerOptions::default()
        };
        let failed = root.sibling("failed");
        assert!(snapshot::save(&vm, &failed, Some(root.path()), &bad).is_err());
        assert!(!failed.exists(), "a failed snapshot left its directory");
        let leftovers: Vec<_> = std::fs::read_dir(root.path().parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(
            leftovers.is_empty(),
            "temporary files left behind: {leftovers:?}"
        );
        vm.resume().unwrap();
        let cut = pause_after(&vm, 16);
        let diff = root.sibling("diff");
        snapshot::save(&vm, &diff, Some(root.path()), &LayerOptions::default()).unwrap();
        run_to_end(&vm);
        let restored = snapshot::restore_with(&diff, &options).unwrap();
        run_to_end(&restored);
        assert_eq!(restored.serial_output().text(), model[cut..], "{dirty:?}");
        assert_same_memory(&restored.memory().to_vec(), &vm.memory().to_vec());
    }
}
