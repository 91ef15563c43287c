//! Dirty-page tracking on real KVM, with both KVM backends: a harvest holds exactly the pages the
//! test guest wrote (as its host-side model says), plus the pages the VMM wrote, plus nothing
//! but the guest's stack and page-table pages; a harvest that is not committed is never lost.

mod common;

use common::*;
use snap_vmm::boot::{PD_ADDR, PML4_ADDR, PROGRAM_ADDR, STACK_SIZE, STACKS_ADDR};
use snap_vmm::guest::{STATUS_BASE, WORKING_SET_BASE};
use snap_vmm::{DirtyTracking, PageBitmap, TestGuest, Vm, VmConfig, VmOptions};

const PAGE: u64 = 4096;

fn backends() -> [(&'static str, DirtyTracking); 2] {
    [
        ("bitmap", DirtyTracking::Bitmap),
        ("ring", DirtyTracking::Ring { entries: 4096 }),
    ]
}

fn create(config: VmConfig, guest: &TestGuest, dirty: DirtyTracking) -> Vm {
    let options = VmOptions {
        dirty_tracking: dirty,
        ..VmOptions::default()
    };
    Vm::create_with(config, &guest.boot_image(&config).unwrap(), &options).unwrap()
}

/// Pages of the working set the model says a full run writes.
fn model_pages(guest: &TestGuest, vcpus: u32) -> Vec<u64> {
    let ws = guest.model(vcpus).working_set;
    ws.chunks(PAGE as usize)
        .enumerate()
        .filter(|(_, p)| p.iter().any(|&b| b != 0))
        .map(|(i, _)| WORKING_SET_BASE / PAGE + i as u64)
        .collect()
}

/// Pages of the status area a full run writes: the done-tick table and the hash log.
fn status_pages(guest: &TestGuest, vcpus: u32) -> Vec<u64> {
    let log_bytes = guest.ticks * u64::from(vcpus) * 8;
    let first = STATUS_BASE / PAGE;
    (first..=first + 1 + (log_bytes - 1) / PAGE).collect()
}

/// Checks a harvest of a full run: exact on the working set and the status area; anything else
/// must be a stack or page-table page.
fn assert_exact(h: &PageBitmap, guest: &TestGuest, vcpus: u32, what: &str) {
    let ws_end = WORKING_SET_BASE / PAGE + guest.working_set_pages;
    let ws: Vec<u64> = h
        .iter()
        .filter(|&p| p >= WORKING_SET_BASE / PAGE && p < ws_end)
        .collect();
    assert_eq!(
        ws,
        model_pages(guest, vcpus),
        "{what}: working-set pages differ from the model"
    );
    let status_end = WORKING_SET_BASE / PAGE;
    let status: Vec<u64> = h
        .iter()
        .filter(|&p| p >= STATUS_BASE / PAGE && p < status_end)
        .collect();
    assert_eq!(status, status_pages(guest, vcpus), "{what}: status pages");
    let stacks = STACKS_ADDR / PAGE..(STACKS_ADDR + u64::from(vcpus) * STACK_SIZE) / PAGE;
    let tables = PML4_ADDR / PAGE..PD_ADDR / PAGE + 1;
    for p in h.iter().filter(|&p| p < STATUS_BASE / PAGE || p >= ws_end) {
        assert!(
            stacks.contains(&p) || tables.contains(&p),
            "{what}: page {p:#x} dirtied but neither working set, status, stack nor page table"
        );
    }
}

#[test]
fn harvest_holds_exactly_what_the_guest_and_the_vmm_wrote() {
    if !kvm_available("harvest_holds_exactly_what_the_guest_and_the_vmm_wrote") {
        return;
    }
    for (name, dirty) in backends() {
        for vcpus in [1, 2] {
            let (config, guest) = small(vcpus);
            let vm = create(config, &guest, dirty);
            assert!(vm.dirty_log_name().is_some());
            // Before the first instruction: the loader's writes (VMM side) are there.
            let boot = vm.harvest_dirty().unwrap();
            assert!(
                boot.contains(PROGRAM_ADDR / PAGE) && boot.contains(PML4_ADDR / PAGE),
                "{name}"
            );
            vm.commit_dirty();

            run_to_end(&vm);
            // A VMM write while the guest is stopped is part of the next harvest.
            let vmm_page = (WORKING_SET_BASE / PAGE) + guest.working_set_pages + 7;
            vm.memory().write(vmm_page * PAGE + 100, b"vmm").unwrap();
            let h = vm.harvest_dirty().unwrap();
            assert!(h.contains(vmm_page), "{name}: VMM write missing");
            let mut without_vmm = PageBitmap::new(h.pages());
            h.iter()
                .filter(|&p| p != vmm_page)
                .for_each(|p| without_vmm.set(p));
            assert_exact(
                &without_vmm,
                &guest,
                vcpus,
                &format!("{name}, {vcpus} vCPUs"),
            );
            vm.commit_dirty();
            assert!(
                vm.harvest_dirty().unwrap().is_empty(),
                "{name}: nothing new after a commit"
            );
        }
    }
}

#[test]
fn an_uncommitted_harvest_is_returned_again() {
    if !kvm_available("an_uncommitted_harvest_is_returned_again") {
        return;
    }
    for (name, dirty) in backends() {
        let (config, guest) = small(2);
        let vm = create(config, &guest, dirty);
        vm.harvest_dirty().unwrap();
        vm.commit_dirty();
        vm.resume().unwrap();
        pause_after(&vm, 10);
        // A snapshot whose layer write fails does not commit: its pages must come back.
        let failed = vm.harvest_dirty().unwrap();
        assert!(!failed.is_empty());
        run_to_end(&vm);
        let next = vm.harvest_dirty().unwrap();
        for p in failed.iter() {
            assert!(
                next.contains(p),
                "{name}: page {p:#x} of the failed snapshot was lost"
            );
        }
        assert_exact(&next, &guest, 2, name);
    }
}

#[test]
fn a_small_dirty_ring_fills_and_loses_nothing() {
    if !kvm_available("a_small_dirty_ring_fills_and_loses_nothing") {
        return;
    }
    let config = VmConfig {
        memory_bytes: 32 << 20,
        vcpus: 2,
    };
    let guest = TestGuest {
        seed: 99,
        working_set_pages: 4096,
        mutations_per_tick: 64,
        ticks: 40,
        ..TestGuest::default()
    };
    let vm = create(config, &guest, DirtyTracking::Ring { entries: 1024 });
    vm.harvest_dirty().unwrap();
    vm.commit_dirty();
    run_to_end(&vm);
    assert!(
        vm.dirty_ring_full_exits().unwrap() > 0,
        "the ring never filled: the test proves nothing"
    );
    assert_exact(&vm.harvest_dirty().unwrap(), &guest, 2, "ring of 1024");
}

/// A guest that writes one page thousands of times in a row (the disk guest zeroes its queue
/// area byte by byte) can overflow a small dirty ring on a host whose KVM emulates guest writes
/// and logs an entry per write; KVM then counts entries it never published, and the vCPU would
/// take ring-full exits forever. The VM must then stop with an error that says so, never hang;
/// where the ring does not overflow, the guest finishes exactly as its model says.
#[test]
fn an_overflowing_dirty_ring_stops_the_vm_instead_of_hanging() {
    if !kvm_available("an_overflowing_dirty_ring_stops_the_vm_instead_of_hanging") {
        return;
    }
    let (config, guest) = small(1);
    let guest = TestGuest {
        disk_blocks_per_tick: 4,
        disk_sectors: 512,
        ..guest
    };
    let tmp = tempfile::tempdir().unwrap();
    let disk: std::sync::Arc<dyn snap_vmm::BlockBackend> =
        std::sync::Arc::new(snap_vmm::RawFile::create(&tmp.path().join("disk"), 1 << 20).unwrap());
    let options = VmOptions {
        disks: vec![disk],
        dirty_tracking: DirtyTracking::Ring { entries: 1024 },
        ..VmOptions::default()
    };
    let vm = guest.create_vm(config, &options).unwrap();
    vm.resume().unwrap();
    match vm
        .wait_for_exit(TIMEOUT)
        .expect("the VM neither finished nor stopped")
    {
        snap_vmm::VmExit::Finished(0) => {
            assert_eq!(vm.serial_output().text(), guest.model(1).output);
        }
        snap_vmm::VmExit::Fault { message, .. } => {
            assert!(
                message.contains("dirty ring of 1024 entries overflowed"),
                "{message}"
            );
            println!("ring overflowed on this host: {message}");
        }
        other => panic!("unexpected exit {other:?}"),
    }
}
