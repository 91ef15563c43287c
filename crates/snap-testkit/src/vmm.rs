//! VMs running the test guest, for the VMM's tests.

use snap_vmm::{TestGuest, Vm, VmConfig, VmExit};

use crate::TIMEOUT;

/// A small VM shape and guest that runs in well under a second here.
pub fn small(vcpus: u32) -> (VmConfig, TestGuest) {
    (
        VmConfig {
            memory_bytes: 32 << 20,
            vcpus,
        },
        TestGuest {
            seed: 0x5eed + u64::from(vcpus),
            working_set_pages: 512,
            mutations_per_tick: 24,
            ticks: 30,
            ..TestGuest::default()
        },
    )
}

/// Creates and starts a VM running the test guest.
pub fn boot(config: VmConfig, guest: &TestGuest) -> Vm {
    let vm = Vm::create(config, &guest.boot_image(&config).unwrap()).unwrap();
    vm.resume().unwrap();
    vm
}

/// Runs a VM until the guest finishes, asserting a clean exit.
pub fn run_to_end(vm: &Vm) {
    vm.resume().unwrap();
    assert_eq!(vm.wait_for_exit(TIMEOUT).unwrap(), VmExit::Finished(0));
}

/// Waits for `lines` lines of output and pauses; returns the output length at the pause.
pub fn pause_after(vm: &Vm, lines: usize) -> usize {
    assert!(
        vm.serial_output().wait_for_lines(lines, TIMEOUT),
        "guest did not print {lines} lines"
    );
    vm.pause();
    vm.serial_output().len()
}

/// Asserts two memory images are identical, naming the first differing page.
pub fn assert_same_memory(a: &[u8], b: &[u8]) {
    assert_eq!(a.len(), b.len(), "memory sizes differ");
    if let Some(page) = a.chunks(4096).zip(b.chunks(4096)).position(|(x, y)| x != y) {
        panic!(
            "guest memory differs, first at page {page} (gpa {:#x})",
            page * 4096
        );
    }
}

/// Asserts the output of a full run of `guest`: one tick line per tick, then the done line.
pub fn assert_complete_output(out: &str, guest: &TestGuest) {
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len() as u64, guest.ticks + 1, "output:\n{out}");
    for (i, l) in lines[..lines.len() - 1].iter().enumerate() {
        assert!(
            l.starts_with(&format!("tick {} hash ", i + 1)),
            "line {i}: {l}"
        );
    }
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with(&format!("done {} hash ", guest.ticks))
    );
}
