//! snap-vmm's saved VM state file: snap-core header, postcard payload (vCPUs, clock, interrupt
//! controllers, UART, virtio-blk devices). Decodes it with `VmState::from_bytes`, checks that
//! what decodes encodes back the same, then restores the devices a restore builds without KVM
//! (the UART and each virtio-blk device, over a zero disk of the saved size), reads their
//! registers as a guest would and runs the restored queues over a small zeroed memory.
//!
//! Each input is the file as it is, then (if that changes anything) with both checksums right.

#![no_main]

use std::io;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use snap_fuzz::fix_blobs;
use snap_vmm::serial::{COM1_BASE, COM1_PORTS, SerialDevice};
use snap_vmm::virtio::VirtioBlk;
use snap_vmm::{BlockBackend, GuestMemory, SerialOutput, VmState};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const MAGIC: [u8; 8] = *b"SNAPVMST";
/// Guest memory the restored queues run over.
const MEMORY_BYTES: u64 = 1 << 20;

/// A disk of zeros that takes writes and forgets them.
struct ZeroDisk(u64);

impl BlockBackend for ZeroDisk {
    fn size(&self) -> u64 {
        self.0
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        assert!(inside(offset, buf.len(), self.0), "read past the disk");
        buf.fill(0);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        assert!(inside(offset, buf.len(), self.0), "write past the disk");
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

fn inside(offset: u64, len: usize, size: u64) -> bool {
    offset
        .checked_add(len as u64)
        .is_some_and(|end| end <= size)
}

thread_local! {
    static MEMORY: GuestMemory = GuestMemory::new(MEMORY_BYTES).expect("a small guest memory");
}

fn irq() -> EventFd {
    EventFd::new(EFD_NONBLOCK).expect("eventfd")
}

fn exercise(bytes: &[u8]) {
    let Ok(state) = VmState::from_bytes(bytes) else {
        return;
    };
    let again = state.to_bytes();
    let decoded = VmState::from_bytes(&again).expect("an encoded state decodes");
    assert_eq!(
        decoded.to_bytes(),
        again,
        "decode and encode are not inverse"
    );
    assert_eq!(state.vcpus.len(), state.config.vcpus as usize);

    if let Ok(mut serial) = SerialDevice::from_state(&state.serial, irq(), SerialOutput::default())
    {
        for port in COM1_BASE..COM1_BASE + COM1_PORTS {
            serial.read(port);
        }
    }

    MEMORY.with(|memory| {
        memory.discard(0, MEMORY_BYTES).expect("zero the memory");
        for (i, saved) in state.disks.iter().enumerate() {
            // A restore is handed real disks, whose sizes are whole sectors.
            if !saved.disk_bytes.is_multiple_of(512) {
                continue;
            }
            let disk = Arc::new(ZeroDisk(saved.disk_bytes));
            let Ok(mut dev) = VirtioBlk::from_state(i, saved, disk, irq()) else {
                continue;
            };
            let mut reg = [0u8; 4];
            for offset in (0..0x100).step_by(4) {
                dev.read(offset, &mut reg);
            }
            let _ = dev.run_available(memory);
        }
    });
}

fuzz_target!(|data: &[u8]| {
    snap_fuzz::run(data, |data| {
        exercise(data);
        let mut fixed = data.to_vec();
        if fix_blobs(&mut fixed, &[MAGIC]) {
            exercise(&fixed);
        }
    });
});
