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
    Some(u64::from_le_bytes(
        buf.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
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

/// A directory of this process's own for files parsers write (on tmpfs where there is one, so
/// their syncs cost nothing), removed when the process exits normally.
///
/// # Panics
/// If the directory cannot be made.
pub fn scratch_dir() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    extern "C" fn remove() {
        if let Some(dir) = DIR.get() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    DIR.get_or_init(|| {
        let shm = std::path::Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("snap-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("make the scratch directory");
        // SAFETY: registers a plain function without arguments to run at exit.
        unsafe { libc::atexit(remove) };
        dir
    })
}

/// Memory layer files: the fix-up and a checking restore target, shared by the memory layer
/// targets.
pub mod mem {
    use std::collections::HashMap;
    use std::io;
    use std::sync::Mutex;

    use snap_mem::layer::{LayerChain, PAGE, PageSink, Restore};

    use super::{fix_blobs, u64_at};

    /// Magic of the layer header (its payload is the superblock).
    pub const LAYER_MAGIC: [u8; 8] = *b"SNAPMLAY";
    /// Magic of the index section.
    pub const INDEX_MAGIC: [u8; 8] = *b"SNAPMIDX";
    /// Header (32 bytes) and superblock (64 bytes).
    pub const HEAD_LEN: usize = 96;
    /// Where the frames start.
    pub const FRAMES_OFFSET: usize = 4096;

    /// The file with the superblock describing where its (last) index section is, and every
    /// snap-core checksum right.
    #[must_use]
    pub fn fixed(file: &[u8]) -> Vec<u8> {
        let mut b = file.to_vec();
        if b.len() >= HEAD_LEN {
            let len = b.len() as u64;
            let mut put = |field: usize, v: u64| {
                b[32 + field * 8..40 + field * 8].copy_from_slice(&v.to_le_bytes());
            };
            put(0, FRAMES_OFFSET as u64);
            put(4, len);
            if let Some(at) = file
                .get(FRAMES_OFFSET..)
                .and_then(|rest| rest.windows(8).rposition(|w| w == INDEX_MAGIC))
            {
                let index = (FRAMES_OFFSET + at) as u64;
                put(1, index - FRAMES_OFFSET as u64);
                put(2, index);
                put(3, len - index);
            }
            b[72..76].copy_from_slice(&(PAGE as u32).to_le_bytes());
        }
        fix_blobs(&mut b, &[LAYER_MAGIC, INDEX_MAGIC]);
        b
    }

    /// The index payload of a file whose superblock `fixed` set, if it lies inside the file.
    #[must_use]
    pub fn index_payload(file: &mut [u8]) -> Option<&mut [u8]> {
        let at = usize::try_from(u64_at(file, 48)?).ok()?;
        let len = usize::try_from(u64_at(file, at.checked_add(16)?)?).ok()?;
        let start = at.checked_add(32)?;
        file.get_mut(start..start.checked_add(len)?)
    }

    /// A restore target that checks every write lies inside memory and is not written twice,
    /// and keeps a checksum of each page written.
    pub struct Sink {
        pages: u64,
        written: Mutex<HashMap<u64, u32>>,
    }

    impl Sink {
        /// A target of `pages` pages.
        #[must_use]
        pub fn new(pages: u64) -> Self {
            Self {
                pages,
                written: Mutex::new(HashMap::new()),
            }
        }

        /// The checksum of each page written.
        #[must_use]
        pub fn into_pages(self) -> HashMap<u64, u32> {
            self.written.into_inner().unwrap()
        }
    }

    impl PageSink for Sink {
        fn page_count(&self) -> u64 {
            self.pages
        }

        fn write_pages(&self, first_page: u64, data: &[u8]) -> io::Result<()> {
            assert!(data.len().is_multiple_of(PAGE), "a write of part of a page");
            let n = (data.len() / PAGE) as u64;
            assert!(
                first_page
                    .checked_add(n)
                    .is_some_and(|end| end <= self.pages),
                "write of pages {first_page}+{n} outside memory of {} pages",
                self.pages
            );
            let mut w = self.written.lock().unwrap();
            for (i, page) in data.chunks_exact(PAGE).enumerate() {
                let old = w.insert(first_page + i as u64, snap_core::crc32c(page));
                assert!(
                    old.is_none(),
                    "page {} written twice",
                    first_page + i as u64
                );
            }
            Ok(())
        }

        fn zero_pages(&self, first_page: u64, count: u64) -> io::Result<()> {
            assert!(
                first_page
                    .checked_add(count)
                    .is_some_and(|end| end <= self.pages),
                "zeroing pages {first_page}+{count} outside memory of {} pages",
                self.pages
            );
            Ok(())
        }
    }

    /// The checksum of a zero page.
    #[must_use]
    pub fn zero_page_crc() -> u32 {
        snap_core::crc32c(&[0u8; PAGE])
    }

    /// Restores `chain` the eager way into a checking target; the checksum of each page that
    /// is not zero, or `None` if a frame is damaged.
    #[must_use]
    pub fn restore(chain: &LayerChain, target: Restore) -> Option<HashMap<u64, u32>> {
        let sink = Sink::new(chain.memory_bytes() / PAGE as u64);
        chain.materialize_into(&sink, target).ok()?;
        let zero = zero_page_crc();
        let mut pages = sink.into_pages();
        pages.retain(|_, crc| *crc != zero);
        Some(pages)
    }
}
