//! Guest memory as vm-memory sees it, for virtio-queue: a view of snap-mem's memfd mapping in
//! which every write the device makes is marked as a VMM write.
//!
//! The view does not own the mapping (it is built over the existing one with a raw pointer) and
//! borrows the [`GuestMemory`] it marks writes in, so it cannot outlive it. Its bitmap forwards
//! each write to [`GuestMemory::mark_written`]: the next dirty harvest holds the used-ring and
//! read-data pages the device wrote, exactly as it holds the guest's own writes.

use std::fmt;

use vm_memory::bitmap::{Bitmap, BitmapSlice, WithBitmapSlice};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::memory::GuestMemory;

/// Forwards vm-memory's dirty marks to snap-mem's record of VMM writes. `offset` is the memfd
/// offset of the byte this (slice of the) bitmap starts at.
#[derive(Clone, Copy)]
pub(crate) struct VmmWrites<'m> {
    memory: &'m GuestMemory,
    offset: u64,
}

impl fmt::Debug for VmmWrites<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VmmWrites")
            .field("offset", &self.offset)
            .finish()
    }
}

impl<'a> WithBitmapSlice<'a> for VmmWrites<'_> {
    type S = Self;
}

impl BitmapSlice for VmmWrites<'_> {}

impl Bitmap for VmmWrites<'_> {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if len > 0 {
            self.memory
                .mark_written(self.offset + offset as u64, len as u64);
        }
    }

    fn dirty_at(&self, _offset: usize) -> bool {
        // Write-only: the dirty state lives in `GuestMemory` and is read by the harvest.
        false
    }

    fn slice_at(&self, offset: usize) -> Self {
        Self {
            memory: self.memory,
            offset: self.offset + offset as u64,
        }
    }
}

/// Guest memory for virtio-queue.
pub(crate) type GuestView<'m> = GuestMemoryMmap<VmmWrites<'m>>;

/// A vm-memory view of `memory`'s regions (same guest addresses, same host mapping).
pub(crate) fn guest_view(memory: &GuestMemory) -> GuestView<'_> {
    let regions = memory
        .regions()
        .iter()
        .map(|r| {
            let bitmap = VmmWrites {
                memory,
                offset: r.offset,
            };
            let builder = MmapRegionBuilder::new_with_bitmap(r.len as usize, bitmap)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_SHARED);
            // SAFETY: `host_address(r.offset)` and `r.len` describe a part of `memory`'s own
            // mapping, which stays mapped while `memory` lives; the view borrows `memory`, so it
            // cannot outlive the mapping, and a raw-pointer region is never unmapped by vm-memory.
            let builder =
                unsafe { builder.with_raw_mmap_pointer(memory.host_address(r.offset) as *mut u8) };
            let mapping = builder
                .build()
                .expect("a region of an existing mapping is a valid raw mapping");
            GuestRegionMmap::new(mapping, GuestAddress(r.gpa))
                .expect("guest regions end below 2^64")
        })
        .collect();
    GuestMemoryMmap::from_regions(regions).expect("guest regions are sorted and disjoint")
}

#[cfg(test)]
mod tests {
    use super::*;
    use snap_mem::dirty::PageBitmap;
    use vm_memory::Bytes;

    #[test]
    fn writes_through_the_view_are_vmm_writes() {
        let mem = GuestMemory::new(3 * (1 << 30) + (2 << 20)).unwrap();
        let view = guest_view(&mem);
        view.write_slice(b"abc", GuestAddress(0x5000 - 1)).unwrap();
        view.write_obj(7u64, GuestAddress((4 << 30) + 0x2000))
            .unwrap();
        let mut buf = [0u8; 3];
        mem.read(0x4fff, &mut buf).unwrap();
        assert_eq!(&buf, b"abc");
        let mut marked = PageBitmap::for_memory(mem.size());
        mem.take_vmm_writes(&mut marked);
        let high = ((3 << 30) + 0x2000) / 4096;
        assert_eq!(marked.iter().collect::<Vec<_>>(), vec![4, 5, high]);
        // Reads mark nothing; the gap is not memory.
        let _: u64 = view.read_obj(GuestAddress(0x5000)).unwrap();
        assert!(view.read_obj::<u8>(GuestAddress(3 << 30)).is_err());
        let mut again = PageBitmap::for_memory(mem.size());
        mem.take_vmm_writes(&mut again);
        assert!(again.is_empty());
    }
}
