//! What the fuzz targets share: a cap on single allocations, checksum fix-ups that let mutated
//! inputs reach the parsers behind the checksums, and in-memory files for parsers that take a
//! path.

use std::alloc::{GlobalAlloc, Layout, System};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use snap_core::{HEADER_LEN, crc32c};

/// Every single allocation larger than this, plus [`ALLOC_PER_INPUT_BYTE`] bytes per input byte,
/// is an unbounded allocation: the process reports it and aborts, which libFuzzer records as a
/// crash. (libFuzzer's own `-malloc_limit_mb` needs a sanitizer's malloc hooks; this works
/// without one.)
pub const ALLOC_BASE_LIMIT: usize = 32 << 20;
/// See [`ALLOC_BASE_LIMIT`].
pub const ALLOC_PER_INPUT_BYTE: usize = 32;

/// The current input's length plus one while a target runs, 0 otherwise (no limit).
static INPUT_LEN: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, refusing (by aborting) any single allocation beyond the limit.
pub struct CappedAlloc;

impl CappedAlloc {
    fn check(size: usize) {
        let running = INPUT_LEN.load(Ordering::Relaxed);
        if running == 0 {
            return;
        }
        let limit =
            ALLOC_BASE_LIMIT.saturating_add((running - 1).saturating_mul(ALLOC_PER_INPUT_BYTE));
        if size > limit {
            too_big(size, limit);
        }
    }
}

#[cold]
fn too_big(size: usize, limit: usize) -> ! {
    // No allocation here: format into a stack buffer and write(2) it.
    let mut msg = [0u8; 160];
    let mut at = 0;
    let mut put = |s: &[u8]| {
        let n = s.len().min(msg.len() - at);
        msg[at..at + n].copy_from_slice(&s[..n]);
        at += n;
    };
    put(b"==snap-fuzz== unbounded allocation: ");
    put(decimal(size as u64, &mut [0u8; 20]));
    put(b" bytes requested, the limit for this input is ");
    put(decimal(limit as u64, &mut [0u8; 20]));
    put(b" bytes\n");
    // SAFETY: writes `at` initialised bytes of `msg` to stderr.
    unsafe { libc::write(2, msg.as_ptr().cast(), at) };
    std::process::abort();
}

fn decimal(mut v: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            return &buf[i..];
        }
    }
}

// SAFETY: forwards to the system allocator with the same layouts; only adds a size check.
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::check(layout.size());
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::check(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::check(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

/// Runs one input through `f` with the allocation cap for an input of its length.
pub fn run(data: &[u8], f: impl FnOnce(&[u8])) {
    INPUT_LEN.store(data.len() + 1, Ordering::Relaxed);
    f(data);
    INPUT_LEN.store(0, Ordering::Relaxed);
}

fn u64_at(buf: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(buf.get(at..at + 8)?.try_into().ok()?))
}

/// Rewrites the checksums of every snap-core blob in `buf` whose magic is one of `magics`: the
/// header checksum always, the payload checksum when the payload the header claims lies inside
/// `buf`. Later blobs are fixed first, so a blob inside another's payload is fixed before the
/// outer checksum is computed. Returns whether anything changed.
pub fn fix_blobs(buf: &mut [u8], magics: &[[u8; 8]]) -> bool {
    let mut changed = false;
    let Some(last) = buf.len().checked_sub(HEADER_LEN) else {
        return false;
    };
    for at in (0..=last).rev() {
        if !magics.iter().any(|m| buf[at..at + 8] == m[..]) {
            continue;
        }
        let len = u64_at(buf, at + 16).expect("inside the header");
        let start = at + HEADER_LEN;
        if let Some(end) = usize::try_from(len)
            .ok()
            .and_then(|l| start.checked_add(l))
            .filter(|&e| e <= buf.len())
        {
            let crc = crc32c(&buf[start..end]).to_le_bytes();
            changed |= buf[at + 24..at + 28] != crc;
            buf[at + 24..at + 28].copy_from_slice(&crc);
        }
        let crc = crc32c(&buf[at..at + 28]).to_le_bytes();
        changed |= buf[at + 28..at + 32] != crc;
        buf[at + 28..at + 32].copy_from_slice(&crc);
    }
    changed
}

/// A file in memory (memfd) with a path the parsers can open: `/proc/self/fd/N`. Each target
/// keeps its files for the life of the process and rewrites them per input.
pub struct MemFile {
    file: std::fs::File,
    path: PathBuf,
}

impl MemFile {
    /// A new empty file; `name` shows in `/proc/self/fd`.
    ///
    /// # Panics
    /// If the kernel has no memfd.
    #[must_use]
    pub fn new(name: &std::ffi::CStr) -> Self {
        // SAFETY: `name` is a valid C string; the returned fd is checked and then owned.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        Self { file, path }
    }

    /// Replaces the file's contents with `bytes`; returns its path.
    ///
    /// # Panics
    /// If the memfd cannot be written.
    pub fn set(&self, bytes: &[u8]) -> &std::path::Path {
        self.file.set_len(0).expect("truncate memfd");
        self.file.write_all_at(bytes, 0).expect("write memfd");
        &self.path
    }

    /// The file's path.
    #[must_use]
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}
