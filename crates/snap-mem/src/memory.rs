//! Guest memory: one memfd, mapped shared into the VMM and into the guest's physical address space.
//!
//! Guest physical memory below [`MMIO_GAP_START`] maps file offsets one to one; whatever does not fit
//! below the gap continues at [`MMIO_GAP_END`] (4 GiB), so the in-kernel LAPIC and IOAPIC windows and the
//! TSS page never overlap RAM. The memfd is the single backing store, so memory can later be shared,
//! mapped privately or registered with userfaultfd by offset.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;

use crate::dirty::bitmap::{AtomicPageBitmap, PageBitmap};

/// Size of a guest page.
pub const PAGE_SIZE: u64 = 4096;
/// Start of the hole below 4 GiB left for device windows (LAPIC, IOAPIC, TSS).
pub const MMIO_GAP_START: u64 = 3 << 30;
/// End of the hole below 4 GiB: memory continues here.
pub const MMIO_GAP_END: u64 = 4 << 30;

/// Errors from creating or accessing guest memory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemoryError {
    /// The requested size is zero.
    #[error("guest memory size must not be zero")]
    ZeroSize,
    /// The requested size is not a multiple of the page size.
    #[error("guest memory size {0} bytes is not a multiple of the 4096-byte page size")]
    NotPageAligned(u64),
    /// The requested size exceeds what this host can back.
    #[error(
        "guest memory size {requested} bytes exceeds what this host can give ({available} bytes of RAM)"
    )]
    TooLarge {
        /// Requested size in bytes.
        requested: u64,
        /// Physical memory of the host in bytes.
        available: u64,
    },
    /// An access fell outside guest memory or across the MMIO gap.
    #[error("guest physical range {gpa:#x}+{len:#x} is not inside guest memory")]
    OutOfRange {
        /// Guest physical address of the access.
        gpa: u64,
        /// Length of the access.
        len: u64,
    },
    /// A system call failed.
    #[error("{op}: {source}")]
    Os {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// One contiguous range of guest physical memory and where it lives in the backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRegion {
    /// Guest physical address of the first byte.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset of the first byte in the memfd (and in the VMM mapping).
    pub offset: u64,
}

/// Guest memory: owns the memfd and its shared mapping, released on drop.
///
/// Every write the VMM makes through this type is marked in a page bitmap, so that dirty-page
/// tracking sees the VMM's writes as well as the guest's.
pub struct GuestMemory {
    file: File,
    base: NonNull<u8>,
    size: u64,
    regions: Vec<MemoryRegion>,
    vmm_writes: AtomicPageBitmap,
}

// SAFETY: the mapping is plain shared memory owned by this value for its whole life; every access
// goes through bounds-checked copies, so moving or sharing the owner between threads is sound.
unsafe impl Send for GuestMemory {}
// SAFETY: as above; concurrent guest writes can only make a copy observe a mix of old and new bytes.
unsafe impl Sync for GuestMemory {}

/// Physical memory of this host in bytes.
pub fn host_memory_bytes() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (pages.max(0) as u64).saturating_mul(page.max(0) as u64)
}

/// The guest physical regions for `size` bytes of memory.
pub fn layout_regions(size: u64) -> Vec<MemoryRegion> {
    let low = size.min(MMIO_GAP_START);
    let mut regions = vec![MemoryRegion {
        gpa: 0,
        len: low,
        offset: 0,
    }];
    if size > low {
        regions.push(MemoryRegion {
            gpa: MMIO_GAP_END,
            len: size - low,
            offset: low,
        });
    }
    regions
}

fn os_err(op: &'static str) -> MemoryError {
    MemoryError::Os {
        op,
        source: std::io::Error::last_os_error(),
    }
}

/// The runs of data and holes of `file` in `[start, end)`, in order: `(offset, len, is_data)`
/// (lseek SEEK_DATA / SEEK_HOLE).
///
/// # Errors
/// The lseek error.
pub fn data_extents(file: &File, start: u64, end: u64) -> std::io::Result<Vec<(u64, u64, bool)>> {
    let seek = |off: u64, whence| {
        // SAFETY: lseek on a descriptor we own; SEEK_DATA / SEEK_HOLE only move the file offset.
        let r = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data at or after `off`.
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(end)
            } else {
                Err(e)
            };
        }
        Ok((r as u64).min(end))
    };
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        let data = seek(pos, libc::SEEK_DATA)?;
        if data > pos {
            out.push((pos, data - pos, false));
        }
        if data >= end {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE)?;
        out.push((data, hole - data, true));
        pos = hole;
    }
    Ok(out)
}

impl GuestMemory {
    /// Checks that `size` is a size this host can give a guest.
    ///
    /// # Errors
    /// [`MemoryError::ZeroSize`], [`MemoryError::NotPageAligned`] or [`MemoryError::TooLarge`].
    pub fn validate_size(size: u64) -> Result<(), MemoryError> {
        if size == 0 {
            return Err(MemoryError::ZeroSize);
        }
        if size % PAGE_SIZE != 0 {
            return Err(MemoryError::NotPageAligned(size));
        }
        let available = host_memory_bytes();
        if size > available {
            return Err(MemoryError::TooLarge {
                requested: size,
                available,
            });
        }
        Ok(())
    }

    /// Creates `size` bytes of zeroed guest memory backed by a new memfd.
    ///
    /// Pages are allocated only when first touched, so a large guest costs nothing up front.
    ///
    /// # Errors
    /// The size checks of [`GuestMemory::validate_size`], or the OS error of memfd_create, ftruncate or mmap.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        Self::validate_size(size)?;
        // SAFETY: the name is a valid NUL-terminated string; the flags are valid for memfd_create.
        let fd = unsafe { libc::memfd_create(c"snap-guest-memory".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(os_err("memfd_create"));
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(|source| MemoryError::Os {
            op: "ftruncate guest memory",
            source,
        })?;
        // SAFETY: mapping a valid fd of at least `size` bytes at an address the kernel picks; the
        // result is checked for MAP_FAILED before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(os_err("mmap guest memory"));
        }
        let base = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| os_err("mmap guest memory"))?;
        Ok(Self {
            file,
            base,
            size,
            regions: layout_regions(size),
            vmm_writes: AtomicPageBitmap::new(size / PAGE_SIZE),
        })
    }

    /// Size of guest memory in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The guest physical regions, in address order.
    pub fn regions(&self) -> &[MemoryRegion] {
        &self.regions
    }

    /// The backing memfd.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Host address of the byte at `offset` in the backing file (for KVM memory slots).
    pub fn host_address(&self, offset: u64) -> u64 {
        debug_assert!(offset <= self.size);
        self.base.as_ptr() as u64 + offset
    }

    /// Highest guest physical address plus one.
    pub fn end_gpa(&self) -> u64 {
        self.regions.last().map_or(0, |r| r.gpa + r.len)
    }

    fn offset_of(&self, gpa: u64, len: u64) -> Result<u64, MemoryError> {
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa.checked_add(len).is_some_and(|e| e <= r.gpa + r.len))
            .map(|r| r.offset + (gpa - r.gpa))
            .ok_or(MemoryError::OutOfRange { gpa, len })
    }

    /// Copies `buf.len()` bytes of guest memory at `gpa` into `buf`.
    ///
    /// # Errors
    /// [`MemoryError::OutOfRange`] if the range is not inside one region.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let off = self.offset_of(gpa, buf.len() as u64)?;
        // SAFETY: off..off+len lies inside the mapping (checked by offset_of) and `buf` is a
        // distinct host buffer; a concurrent guest write can only change which bytes are read.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.base.as_ptr().add(off as usize),
                buf.as_mut_ptr(),
                buf.len(),
            );
        }
        Ok(())
    }

    /// Copies `data` into guest memory at `gpa`.
    ///
    /// # Errors
    /// [`MemoryError::OutOfRange`] if the range is not inside one region.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        let off = self.offset_of(gpa, data.len() as u64)?;
        self.vmm_writes.mark_bytes(off, data.len() as u64);
        // SAFETY: off..off+len lies inside the mapping (checked by offset_of) and `data` is a
        // distinct host buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.base.as_ptr().add(off as usize),
                data.len(),
            );
        }
        Ok(())
    }

    /// Copies `data` into memory at file offset `offset` through the mapping (no system call;
    /// pages not yet present are faulted in).
    ///
    /// # Errors
    /// [`MemoryError::OutOfRange`] if the range is outside memory.
    pub fn write_at_offset(&self, offset: u64, data: &[u8]) -> Result<(), MemoryError> {
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > self.size)
        {
            return Err(MemoryError::OutOfRange {
                gpa: offset,
                len: data.len() as u64,
            });
        }
        self.vmm_writes.mark_bytes(offset, data.len() as u64);
        // SAFETY: offset..offset+len lies inside the mapping (checked above) and `data` is a
        // distinct host buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.base.as_ptr().add(offset as usize),
                data.len(),
            );
        }
        Ok(())
    }

    /// Frees `len` bytes of memory at file offset `offset`: they read as zero again and stop
    /// using host memory (fallocate PUNCH_HOLE on the memfd).
    ///
    /// # Errors
    /// [`MemoryError::OutOfRange`] or the OS error.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), MemoryError> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(MemoryError::OutOfRange { gpa: offset, len });
        }
        // SAFETY: fallocate on our own memfd with valid mode flags; the range was checked. The
        // mapping stays valid: punched pages read back as zero.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r != 0 {
            return Err(os_err("fallocate(PUNCH_HOLE) guest memory"));
        }
        self.vmm_writes.mark_bytes(offset, len);
        Ok(())
    }

    /// Marks `len` bytes at file offset `offset` as written by the VMM, for writes that bypass
    /// this type (pwrite on [`GuestMemory::file`]).
    pub fn mark_written(&self, offset: u64, len: u64) {
        self.vmm_writes.mark_bytes(offset, len);
    }

    /// Moves the pages the VMM wrote since the last call into `into`.
    pub fn take_vmm_writes(&self, into: &mut PageBitmap) {
        self.vmm_writes.take_into(into);
    }

    /// Forgets the VMM's writes so far (after a restore made memory equal to a snapshot).
    pub fn clear_vmm_writes(&self) {
        self.vmm_writes.clear();
    }

    /// The pages that hold data: everything but the holes of the memfd (pages never touched, or
    /// discarded). A full snapshot needs only these.
    ///
    /// # Errors
    /// The lseek error.
    pub fn resident_pages(&self) -> Result<PageBitmap, MemoryError> {
        let mut pages = PageBitmap::for_memory(self.size);
        let extents = data_extents(&self.file, 0, self.size).map_err(|source| MemoryError::Os {
            op: "lseek(SEEK_DATA) guest memory",
            source,
        })?;
        for (off, len, is_data) in extents {
            if is_data {
                pages.set_range(off / PAGE_SIZE, len.div_ceil(PAGE_SIZE));
            }
        }
        Ok(pages)
    }

    /// A copy of the whole memory image in file-offset order (for tests and comparisons of small
    /// guests). Pages never touched read as zero without being allocated.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.size as usize];
        self.file
            .read_exact_at(&mut v, 0)
            .expect("reading our own memfd within its size");
        v
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: base/size describe the mapping created in `new`, unmapped exactly once here.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.size as usize);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_skip_the_mmio_gap() {
        assert_eq!(layout_regions(1 << 30).len(), 1);
        let r = layout_regions(16 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].gpa, MMIO_GAP_END);
        assert_eq!(r[1].offset, MMIO_GAP_START);
        assert_eq!(r[0].len + r[1].len, 16 << 30);
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(matches!(GuestMemory::new(0), Err(MemoryError::ZeroSize)));
        assert!(matches!(
            GuestMemory::new(4097),
            Err(MemoryError::NotPageAligned(4097))
        ));
        let huge = host_memory_bytes() + (1 << 30);
        assert!(matches!(
            GuestMemory::new(huge),
            Err(MemoryError::TooLarge { .. })
        ));
    }

    #[test]
    fn resident_pages_are_the_written_ones() {
        let m = GuestMemory::new(8 << 20).unwrap();
        m.write_at_offset(3 * 4096 + 5, &[1]).unwrap();
        m.write_at_offset(1000 * 4096, &[1; 8192]).unwrap();
        let r = m.resident_pages().unwrap();
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![3, 1000, 1001]);
    }

    #[test]
    fn vmm_writes_are_marked() {
        let m = GuestMemory::new(8 << 20).unwrap();
        m.write(0x5000, &[1; 10]).unwrap();
        m.write_at_offset(0x10_0ff0, &[1; 32]).unwrap();
        m.discard(0x20_0000, 8192).unwrap();
        let mut b = PageBitmap::for_memory(m.size());
        m.take_vmm_writes(&mut b);
        assert_eq!(
            b.iter().collect::<Vec<_>>(),
            vec![5, 0x100, 0x101, 0x200, 0x201]
        );
        let mut again = PageBitmap::for_memory(m.size());
        m.take_vmm_writes(&mut again);
        assert!(again.is_empty());
    }

    #[test]
    fn discard_zeroes_memory() {
        let m = GuestMemory::new(8 << 20).unwrap();
        m.write(0x10_0000, &[7u8; 8192]).unwrap();
        m.discard(0x10_0000, 4096).unwrap();
        let v = m.to_vec();
        assert!(v[0x10_0000..0x10_1000].iter().all(|&b| b == 0));
        assert!(v[0x10_1000..0x10_2000].iter().all(|&b| b == 7));
        assert!(m.discard(8 << 20, 4096).is_err());
    }

    #[test]
    fn reads_and_writes_are_bounds_checked_and_cross_the_gap() {
        let m = GuestMemory::new(3 * (1 << 30) + (2 << 20)).unwrap();
        m.write(MMIO_GAP_END + 4096, b"high").unwrap();
        let mut b = [0u8; 4];
        m.read(MMIO_GAP_END + 4096, &mut b).unwrap();
        assert_eq!(&b, b"high");
        assert!(matches!(
            m.write(MMIO_GAP_START, b"x"),
            Err(MemoryError::OutOfRange { .. })
        ));
        assert!(matches!(
            m.read(m.end_gpa() - 2, &mut b),
            Err(MemoryError::OutOfRange { .. })
        ));
    }
}
