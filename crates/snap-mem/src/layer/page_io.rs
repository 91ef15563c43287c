//! Where the writer reads pages from and where a restore puts them.

use std::io;
use std::os::unix::fs::FileExt;

use super::meta::PAGE;
use crate::memory::GuestMemory;

/// Runs of data at least this long go into [`GuestMemory`] with one pwrite (no page fault per
/// page); shorter runs are copied through the mapping (no system call).
const WRITE_SYSCALL_MIN: usize = 64 << 10;

/// Pages of memory to write into a layer. Shared by the writer's threads.
pub trait PageSource: Sync {
    /// Pages of memory the source holds (the layer's memory size must match).
    fn page_count(&self) -> u64;

    /// Fills `buf` (a whole number of pages) with memory from page `first_page` on.
    ///
    /// # Errors
    /// Whatever the source hits; the writer reports it with the file and the pages.
    fn read_pages(&self, first_page: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// Reads with pread on the memfd, not through the mapping, so pages the guest never touched
/// read as zero without being allocated.
impl PageSource for GuestMemory {
    fn page_count(&self) -> u64 {
        self.size() / PAGE as u64
    }

    fn read_pages(&self, first_page: u64, buf: &mut [u8]) -> io::Result<()> {
        let offset = first_page
            .checked_mul(PAGE as u64)
            .filter(|o| {
                o.checked_add(buf.len() as u64)
                    .is_some_and(|e| e <= self.size())
            })
            .ok_or_else(|| out_of_range(first_page, buf.len()))?;
        self.file().read_exact_at(buf, offset)
    }
}

/// A plain memory image (tests, tools).
impl PageSource for [u8] {
    fn page_count(&self) -> u64 {
        (self.len() / PAGE) as u64
    }

    fn read_pages(&self, first_page: u64, buf: &mut [u8]) -> io::Result<()> {
        let src = usize::try_from(first_page)
            .ok()
            .and_then(|p| p.checked_mul(PAGE))
            .and_then(|start| self.get(start..start.checked_add(buf.len())?))
            .ok_or_else(|| out_of_range(first_page, buf.len()))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl PageSource for Vec<u8> {
    fn page_count(&self) -> u64 {
        self.as_slice().page_count()
    }

    fn read_pages(&self, first_page: u64, buf: &mut [u8]) -> io::Result<()> {
        self.as_slice().read_pages(first_page, buf)
    }
}

fn out_of_range(first_page: u64, len: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!(
            "pages {first_page}+{} reach past the end of memory",
            len / PAGE
        ),
    )
}

/// Memory a layer chain is restored into. Shared by the restoring threads, which touch
/// disjoint pages.
pub trait PageSink: Sync {
    /// Pages of memory the target holds (the chain's memory size must match).
    fn page_count(&self) -> u64;

    /// Stores `data` (a whole number of pages) from page `first_page` on.
    ///
    /// # Errors
    /// Whatever the target hits.
    fn write_pages(&self, first_page: u64, data: &[u8]) -> io::Result<()>;

    /// Makes `count` pages from `first_page` on read as zero.
    ///
    /// # Errors
    /// Whatever the target hits.
    fn zero_pages(&self, first_page: u64, count: u64) -> io::Result<()>;
}

/// Long runs with pwrite on the memfd, short ones through the mapping; zero pages are punched
/// out of the memfd (they read as zero and stop using host memory).
impl PageSink for GuestMemory {
    fn page_count(&self) -> u64 {
        self.size() / PAGE as u64
    }

    fn write_pages(&self, first_page: u64, data: &[u8]) -> io::Result<()> {
        let offset = first_page.saturating_mul(PAGE as u64);
        if data.len() >= WRITE_SYSCALL_MIN {
            if offset.saturating_add(data.len() as u64) > self.size() {
                return Err(out_of_range(first_page, data.len()));
            }
            self.mark_written(offset, data.len() as u64);
            return self.file().write_all_at(data, offset);
        }
        self.write_at_offset(offset, data).map_err(io::Error::other)
    }

    fn zero_pages(&self, first_page: u64, count: u64) -> io::Result<()> {
        self.discard(
            first_page.saturating_mul(PAGE as u64),
            count.saturating_mul(PAGE as u64),
        )
        .map_err(io::Error::other)
    }
}

/// Whether a page (or any buffer) is all zero.
pub(crate) fn is_zero(bytes: &[u8]) -> bool {
    // OR-folding a fixed-size chunk vectorizes; stopping at the first non-zero chunk keeps data
    // pages cheap.
    bytes
        .chunks(256)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}
