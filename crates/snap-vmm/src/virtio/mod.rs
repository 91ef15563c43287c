//! virtio devices over the virtio-mmio transport: today one kind, virtio-blk.
//!
//! Each disk is a virtio-mmio (version 2) device with a fixed register window in the hole below
//! 4 GiB that holds no RAM, and its own interrupt line. Queues are handled with the virtio-queue
//! crate over a vm-memory view of the guest's memfd mapping whose writes are recorded as VMM
//! writes (see [`guest_view`]), so dirty tracking sees what the device writes.

pub mod blk;
mod guest_view;
#[cfg(test)]
mod hostile_tests;
mod request;

pub use blk::{VirtioBlk, VirtioBlkState};

/// Guest physical address of the first virtio-mmio window (inside the MMIO gap: 3.25 GiB).
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Size of one device's register window; disk `i` is at `MMIO_BASE + i * MMIO_STRIDE`.
pub const MMIO_STRIDE: u64 = 0x1000;
/// Most disks a VM may have.
pub const MAX_DISKS: usize = 8;
/// Interrupt line (IOAPIC pin) of disk 0; disk `i` uses `FIRST_GSI + i`.
pub const FIRST_GSI: u32 = 5;

/// The disk whose register window holds `gpa`, and the offset inside it.
pub fn window_of(gpa: u64, disks: usize) -> Option<(usize, u64)> {
    let rel = gpa.checked_sub(MMIO_BASE)?;
    let index = (rel / MMIO_STRIDE) as usize;
    (index < disks).then_some((index, rel % MMIO_STRIDE))
}
