//! Lazy memory restore: guest memory is registered with userfaultfd and filled from a memory
//! layer chain as it is touched, while a background filler installs the windows not touched yet
//! that hold data. Windows no layer holds are left alone: once every window with data is in, the
//! range is unregistered and they read as zero from the fresh memory, never allocated.
//!
//! One server thread owns the userfaultfd. It serves faults first (each fault installs the whole
//! window around it: the chain's largest frame size, read and decompressed once) and, whenever no
//! fault waits, installs the next window nobody asked for, so the server can finish. A window
//! whose content is all zero is installed with UFFDIO_ZEROPAGE. A window that cannot be read (a
//! damaged frame, a missing file) stops the server with an error naming the layer and the frame,
//! after the owner's failure hook has stopped the guest (see [`FailureHook`]); the guest never
//! runs on wrong memory.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use userfaultfd::{Event, Uffd, UffdBuilder};

use crate::layer::{LayerChain, LayerError, WindowScratch};
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::working_set::WorkingSet;

/// Errors of a lazy restore.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LazyError {
    /// userfaultfd could not be set up.
    #[error("userfaultfd: {0}")]
    Setup(String),
    /// A window of memory could not be read from the page source.
    #[error("lazy restore cannot serve pages {first}..{end}: {source}")]
    Source {
        /// First page of the window.
        first: u64,
        /// End of the window.
        end: u64,
        /// What the source reported (for a layer chain: the layer file and the frame).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Installing pages failed.
    #[error("lazy restore cannot install pages {first}..{end}: {message}")]
    Install {
        /// First page of the window.
        first: u64,
        /// End of the window.
        end: u64,
        /// The ioctl error.
        message: String,
    },
    /// The chain is not the size of the memory.
    #[error("layer chain of {chain} bytes restored into memory of {memory} bytes")]
    SizeMismatch {
        /// Bytes the chain describes.
        chain: u64,
        /// Bytes of memory.
        memory: u64,
    },
}

/// Units of the first prefetch chunk (each next chunk is twice as large, up to
/// [`PREFETCH_CHUNK_MAX_BYTES`]); the fault queue is drained between two chunks.
const PREFETCH_BATCH: usize = 8;
/// Largest prefetch chunk: one read of the working-set file, a few large copies.
const PREFETCH_CHUNK_MAX_BYTES: usize = 4 << 20;

/// Where a lazy restore reads memory from, one window at a time: a layer chain here, a remote
/// store later. The page server does not care where the bytes come from.
pub trait WindowSource: Send + Sync {
    /// Bytes of memory the source describes.
    fn memory_bytes(&self) -> u64;

    /// Pages per window: the unit in which faults are served.
    fn window_pages(&self) -> u64;

    /// Fills `buf` (`window_pages() * 4096` bytes) with window `window`; returns whether any
    /// page of it holds data (all zero otherwise).
    ///
    /// # Errors
    /// Whatever keeps the source from giving the window's exact bytes.
    fn read_window(
        &self,
        window: u64,
        buf: &mut [u8],
    ) -> Result<bool, Box<dyn std::error::Error + Send + Sync>>;

    /// The windows that may hold data, in increasing order (`None`, the default: any may). The
    /// page server installs only these in the background: the others read as zero from the
    /// fresh memory once it has finished (it serves them with zero pages if touched before).
    fn windows_with_data(&self) -> Option<Vec<u64>> {
        None
    }
}

/// A shared source (its owner keeps a handle to read its counters).
impl<T: WindowSource + ?Sized> WindowSource for std::sync::Arc<T> {
    fn memory_bytes(&self) -> u64 {
        (**self).memory_bytes()
    }

    fn window_pages(&self) -> u64 {
        (**self).window_pages()
    }

    fn read_window(
        &self,
        window: u64,
        buf: &mut [u8],
    ) -> Result<bool, Box<dyn std::error::Error + Send + Sync>> {
        (**self).read_window(window, buf)
    }

    fn windows_with_data(&self) -> Option<Vec<u64>> {
        (**self).windows_with_data()
    }
}

impl WindowSource for LayerChain {
    fn memory_bytes(&self) -> u64 {
        LayerChain::memory_bytes(self)
    }

    fn window_pages(&self) -> u64 {
        LayerChain::window_pages(self)
    }

    fn read_window(
        &self,
        window: u64,
        buf: &mut [u8],
    ) -> Result<bool, Box<dyn std::error::Error + Send + Sync>> {
        thread_local! {
            static SCRATCH: std::cell::RefCell<WindowScratch> = std::cell::RefCell::default();
        }
        SCRATCH.with(|scratch| {
            LayerChain::read_window(self, window, buf, &mut scratch.borrow_mut())
                .map_err(|e: LayerError| e.into())
        })
    }

    /// Windows where some layer has a frame (a region holding at least one page, data or zero
    /// entry): a window no layer covers reads as zero.
    fn windows_with_data(&self) -> Option<Vec<u64>> {
        let window_pages = LayerChain::window_pages(self);
        let mut windows: Vec<u64> = self
            .layers()
            .iter()
            .flat_map(|l| (0..l.frame_count()).map(move |f| l.frame(f).pages.start / window_pages))
            .collect();
        windows.sort_unstable();
        windows.dedup();
        Some(windows)
    }
}

/// How long a recording restore waits for the guest's first fault before it fills anyway.
const FIRST_FAULT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Counters of a lazy restore, in restore units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LazyStats {
    /// Faults served (units installed because something touched them).
    pub faults: u64,
    /// Units installed by the background filler.
    pub filled: u64,
    /// Units installed as zero pages.
    pub zero_units: u64,
    /// Units installed from the prefetch list before anyone touched them.
    pub prefetched: u64,
}

/// Called when every unit is installed, with the units the guest faulted on, in order (its
/// working set, to prefetch on the next restore of the same snapshot: see
/// [`WorkingSet::record`]), and the source they came from.
pub type CompleteHook = Box<dyn Fn(&[u64], &dyn WindowSource) + Send + Sync>;

/// What a lazy restore does besides serving faults.
#[derive(Default)]
pub struct LazyOptions {
    /// Stops the guest when a page cannot be served (see [`FailureHook`]).
    pub on_failure: Option<FailureHook>,
    /// Receives the recorded working set when the restore completes.
    pub on_complete: Option<CompleteHook>,
    /// Units to install first, in this order, while the guest already runs (a working set
    /// recorded by an earlier restore with the same unit). Its bytes come from its file when it
    /// has them (each unit checked against its checksum), from the source otherwise.
    pub prefetch: Option<WorkingSet>,
    /// Bytes installed per fault: a power of two from 4 KiB up to the source's window (the
    /// default). A window is read and decompressed once and kept while its units go in.
    pub unit_bytes: Option<u64>,
    /// Hold the background filler back until the guest has faulted and then not faulted for this
    /// long (or 10 s passed without any fault): while recording a working set, the filler would
    /// otherwise install windows before the guest asks for them.
    pub fill_after_quiet: Option<std::time::Duration>,
}

struct Shared {
    uffd: Uffd,
    base: usize,
    memory_bytes: u64,
    window_pages: u64,
    windows: u64,
    /// Pages per restore unit (divides `window_pages`).
    unit_pages: u64,
    units: u64,
    source: Box<dyn WindowSource>,
    /// Per unit: installed yet?
    installed: Vec<AtomicBool>,
    /// Per window: may it hold data (must the server install it before it finishes)?
    needed: Vec<bool>,
    /// Units of needed windows not installed yet: the server finishes at zero.
    needed_left: AtomicU64,
    stop: AtomicBool,
    faults: AtomicU64,
    filled: AtomicU64,
    zero_units: AtomicU64,
    /// `None` while running; then the outcome.
    outcome: Mutex<Option<Result<(), String>>>,
    done: Condvar,
    options: LazyOptions,
    prefetched: AtomicU64,
    /// Units installed because of a fault, in order.
    fault_log: Mutex<Vec<u64>>,
}

/// Called on the server thread when the restore fails, before anything else happens: the owner
/// stops the guest there (the faulting vCPUs stay blocked until it does).
pub type FailureHook = Box<dyn Fn(&str) + Send + Sync>;

// SAFETY: `base` is the address of the guest memory mapping, only used to compute ioctl ranges;
// the mapping outlives the server (the owner keeps the GuestMemory alive until `finish`/drop).
unsafe impl Send for Shared {}
// SAFETY: as above; every other field is Sync.
unsafe impl Sync for Shared {}

/// A running lazy restore of one guest memory from one page source.
pub struct PageServer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl PageServer {
    /// Registers `memory` (all zero, never touched) with userfaultfd and starts serving it from
    /// `chain`. The guest may run as soon as this returns.
    ///
    /// # Errors
    /// [`LazyError::SizeMismatch`], or [`LazyError::Setup`] if userfaultfd is unavailable.
    pub fn start(
        memory: &GuestMemory,
        source: impl WindowSource + 'static,
    ) -> Result<Self, LazyError> {
        Self::start_with(memory, source, LazyOptions::default())
    }

    /// As [`PageServer::start`], with hooks and a prefetch list.
    ///
    /// # Errors
    /// As [`PageServer::start`].
    pub fn start_with(
        memory: &GuestMemory,
        source: impl WindowSource + 'static,
        options: LazyOptions,
    ) -> Result<Self, LazyError> {
        if source.memory_bytes() != memory.size() {
            return Err(LazyError::SizeMismatch {
                chain: source.memory_bytes(),
                memory: memory.size(),
            });
        }
        // Faults taken inside the kernel (KVM reading guest memory) must reach us too.
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(|e| LazyError::Setup(format!("create: {e}")))?;
        let base = memory.host_address(0);
        uffd.register(base as *mut libc::c_void, memory.size() as usize)
            .map_err(|e| LazyError::Setup(format!("register: {e}")))?;
        let window_pages = source.window_pages();
        let windows = (memory.size() / PAGE_SIZE).div_ceil(window_pages);
        let unit_pages = match options.unit_bytes {
            None => window_pages,
            Some(b) if b.is_power_of_two() && b >= PAGE_SIZE && b / PAGE_SIZE <= window_pages => {
                b / PAGE_SIZE
            }
            Some(b) => {
                return Err(LazyError::Setup(format!(
                    "restore unit of {b} bytes: must be a power of two from 4096 to the window of {} bytes",
                    window_pages * PAGE_SIZE
                )));
            }
        };
        let units = (memory.size() / PAGE_SIZE).div_ceil(unit_pages);
        let needed = match source.windows_with_data() {
            None => vec![true; windows as usize],
            Some(list) => {
                let mut v = vec![false; windows as usize];
                for w in list.into_iter().filter(|&w| w < windows) {
                    v[w as usize] = true;
                }
                v
            }
        };
        let upw = window_pages / unit_pages;
        let needed_left = needed
            .iter()
            .enumerate()
            .filter(|&(_, &n)| n)
            .map(|(w, _)| upw.min(units - w as u64 * upw))
            .sum();
        let shared = Arc::new(Shared {
            uffd,
            base: base as usize,
            memory_bytes: memory.size(),
            window_pages,
            windows,
            unit_pages,
            units,
            source: Box::new(source),
            installed: (0..units).map(|_| AtomicBool::new(false)).collect(),
            needed,
            needed_left: AtomicU64::new(needed_left),
            stop: AtomicBool::new(false),
            faults: AtomicU64::new(0),
            filled: AtomicU64::new(0),
            zero_units: AtomicU64::new(0),
            outcome: Mutex::new(None),
            done: Condvar::new(),
            options,
            prefetched: AtomicU64::new(0),
            fault_log: Mutex::new(Vec::new()),
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("page-server".into())
            .spawn(move || serve(&s))
            .map_err(|e| LazyError::Setup(format!("server thread: {e}")))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Counters so far.
    pub fn stats(&self) -> LazyStats {
        LazyStats {
            faults: self.shared.faults.load(Ordering::Relaxed),
            filled: self.shared.filled.load(Ordering::Relaxed),
            zero_units: self.shared.zero_units.load(Ordering::Relaxed),
            prefetched: self.shared.prefetched.load(Ordering::Relaxed),
        }
    }

    /// Waits until every window is installed (or the server failed).
    ///
    /// # Errors
    /// The error that stopped the server, naming the layer and frame.
    pub fn wait(&self) -> Result<LazyStats, String> {
        let mut outcome = self
            .shared
            .outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        while outcome.is_none() {
            outcome = self
                .shared
                .done
                .wait(outcome)
                .unwrap_or_else(|e| e.into_inner());
        }
        outcome.clone().expect("set above").map(|()| self.stats())
    }

    /// Whether every window is installed.
    pub fn is_complete(&self) -> bool {
        matches!(
            &*self
                .shared
                .outcome
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
            Some(Ok(()))
        )
    }

    /// The error that stopped the server, if it failed.
    pub fn failure(&self) -> Option<String> {
        match &*self
            .shared
            .outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
        {
            Some(Err(e)) => Some(e.clone()),
            _ => None,
        }
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn finish(s: &Shared, outcome: Result<(), String>) {
    if let Err(e) = &outcome {
        tracing::error!(error = %e, "lazy restore failed");
        // First the owner stops the guest (its vCPUs get a signal pending), then the range is
        // unregistered, which wakes every thread blocked on a fault: their faults are retried
        // without us (fresh zero pages) and KVM, seeing the signal, returns to userspace before
        // the guest executes anything on them.
        if let Some(hook) = &s.options.on_failure {
            hook(e);
        }
        let _ = s
            .uffd
            .unregister(s.base as *mut libc::c_void, s.memory_bytes as usize);
    }
    *s.outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
    s.done.notify_all();
}

/// The server thread: faults first, the filler when idle, until every window is installed.
fn serve(s: &Shared) {
    let mut cache = WindowCache::default();
    let mut next_fill = 0;
    let mut next_prefetch = 0;
    let mut prefetch_chunks = 0;
    let mut scratch = PrefetchScratch::default();
    let started = std::time::Instant::now();
    let mut last_fault: Option<std::time::Instant> = None;
    let left = || s.needed_left.load(Ordering::Relaxed);
    while left() > 0 && !s.stop.load(Ordering::Relaxed) {
        // Drain the faults that are waiting.
        loop {
            match s.uffd.read_event() {
                Ok(Some(Event::Pagefault { addr, .. })) => {
                    last_fault = Some(std::time::Instant::now());
                    let page = (addr as usize - s.base) as u64 / PAGE_SIZE;
                    let unit = page / s.unit_pages;
                    match install(s, unit, 1, &mut cache) {
                        Ok(0) => wake(s, unit),
                        Ok(n) => {
                            s.faults.fetch_add(n, Ordering::Relaxed);
                            s.fault_log
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(unit);
                        }
                        Err(e) => return finish(s, Err(e.to_string())),
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => return finish(s, Err(format!("reading userfaultfd events: {e}"))),
            }
        }
        // The recorded working set first, in chunks that start small and grow, so that the first
        // units go in at once and the rest in few large copies, while the guest (which faults on
        // the same units in the same order) runs; then everything else.
        if let Some(set) = &s.options.prefetch
            && next_prefetch < set.len()
        {
            let unit_bytes = (s.unit_pages * PAGE_SIZE) as usize;
            let max_chunk = (PREFETCH_CHUNK_MAX_BYTES / unit_bytes).max(PREFETCH_BATCH);
            let len = (PREFETCH_BATCH << prefetch_chunks.min(16)).min(max_chunk);
            let chunk = next_prefetch..(next_prefetch + len).min(set.len());
            next_prefetch = chunk.end;
            prefetch_chunks += 1;
            match prefetch(s, set, chunk, &mut cache, &mut scratch) {
                Ok(n) => {
                    s.prefetched.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => return finish(s, Err(e.to_string())),
            }
            continue;
        }
        if let Some(quiet) = s.options.fill_after_quiet {
            // Before the first fault the guest has not started: wait for it (bounded, so that
            // memory completes even if it never runs), then for a quiet spell after its faults.
            let (since, quiet) = match last_fault {
                Some(t) => (t.elapsed(), quiet),
                None => (started.elapsed(), FIRST_FAULT_WAIT),
            };
            if since < quiet {
                let wait = (quiet - since).as_millis().clamp(1, 100) as i32;
                poll_readable(s, wait);
                continue;
            }
        }
        // The not yet installed units of one window nobody asked for (that may hold data), then
        // faults again.
        while next_fill < s.windows && !s.needed[next_fill as usize] {
            next_fill += 1;
        }
        if next_fill < s.windows {
            let upw = s.window_pages / s.unit_pages;
            let first = next_fill * upw;
            let count = upw.min(s.units - first);
            next_fill += 1;
            match install(s, first, count, &mut cache) {
                Ok(n) => {
                    s.filled.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => return finish(s, Err(e.to_string())),
            }
        } else {
            wait_readable(s);
        }
    }
    let _ = s
        .uffd
        .unregister(s.base as *mut libc::c_void, s.memory_bytes as usize);
    // Units of windows without data that nobody touched stay holes of the fresh memory: zero.
    if left() > 0 {
        return finish(
            s,
            Err("the page server was stopped before memory was complete".into()),
        );
    }
    if let Some(hook) = &s.options.on_complete {
        hook(
            &s.fault_log.lock().unwrap_or_else(|e| e.into_inner()),
            s.source.as_ref(),
        );
    }
    finish(s, Ok(()));
}

/// The last few windows read, so that the units of a window are served from one read.
#[derive(Default)]
struct WindowCache {
    /// (window, bytes, whether any page holds data), most recently used last.
    entries: Vec<(u64, Vec<u8>, bool)>,
}

/// Windows kept decompressed.
const CACHED_WINDOWS: usize = 4;

impl WindowCache {
    fn get(&mut self, s: &Shared, window: u64) -> Result<&(u64, Vec<u8>, bool), LazyError> {
        if let Some(i) = self.entries.iter().position(|e| e.0 == window) {
            let e = self.entries.remove(i);
            self.entries.push(e);
        } else {
            let mut buf = if self.entries.len() >= CACHED_WINDOWS {
                self.entries.remove(0).1
            } else {
                vec![0u8; (s.window_pages * PAGE_SIZE) as usize]
            };
            let first = window * s.window_pages;
            let end = (first + s.window_pages).min(s.memory_bytes / PAGE_SIZE);
            let has_data = s
                .source
                .read_window(window, &mut buf)
                .map_err(|source| LazyError::Source { first, end, source })?;
            self.entries.push((window, buf, has_data));
        }
        Ok(self.entries.last().expect("just pushed"))
    }
}

fn wait_readable(s: &Shared) {
    poll_readable(s, 100);
}

/// Waits up to `ms` milliseconds for a fault event; returns whether one is waiting.
fn poll_readable(s: &Shared, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: s.uffd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

/// Records unit `unit` as installed (once).
fn mark_installed(s: &Shared, unit: u64) {
    if !s.installed[unit as usize].swap(true, Ordering::Relaxed) {
        let window = unit * s.unit_pages / s.window_pages;
        if s.needed[window as usize] {
            s.needed_left.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Wakes threads waiting on a unit another path already installed.
fn wake(s: &Shared, unit: u64) {
    let (start, len) = range(s, unit, 1);
    let _ = s.uffd.wake(start as *mut libc::c_void, len);
}

/// Host address and length of `count` units from `unit` (clipped to memory).
fn range(s: &Shared, unit: u64, count: u64) -> (usize, usize) {
    let first = unit * s.unit_pages * PAGE_SIZE;
    let end = ((unit + count) * s.unit_pages * PAGE_SIZE).min(s.memory_bytes);
    (s.base + first as usize, (end - first) as usize)
}

/// Installs the units of `unit..unit + count` (all in one window) that are not installed yet,
/// one ioctl per run of them; returns how many this call installed.
fn install(s: &Shared, unit: u64, count: u64, cache: &mut WindowCache) -> Result<u64, LazyError> {
    let pending = |u: u64| !s.installed[u as usize].load(Ordering::Relaxed);
    if !(unit..unit + count).any(pending) {
        return Ok(0);
    }
    let upw = s.window_pages / s.unit_pages;
    let window = unit / upw;
    let (_, data, has_data) = cache.get(s, window)?;
    let has_data = *has_data;
    let window_start = window * s.window_pages * PAGE_SIZE;
    let mut installed = 0;
    let mut u = unit;
    while u < unit + count {
        if !pending(u) {
            u += 1;
            continue;
        }
        let run_start = u;
        while u < unit + count && pending(u) {
            u += 1;
        }
        let (start, len) = range(s, run_start, u - run_start);
        let off = (run_start * s.unit_pages * PAGE_SIZE - window_start) as usize;
        let bytes = &data[off..off + len];
        let zero = !has_data || crate::layer::is_zero(bytes);
        install_bytes(s, start, len, (!zero).then_some(bytes), run_start)?;
        for v in run_start..u {
            mark_installed(s, v);
        }
        if zero {
            s.zero_units.fetch_add(u - run_start, Ordering::Relaxed);
        }
        installed += u - run_start;
    }
    Ok(installed)
}

/// One UFFDIO_COPY of `bytes` (or, for `None`, one UFFDIO_ZEROPAGE) of `len` bytes at host
/// address `start`, retried after a partial copy, page by page around pages that are present
/// already.
fn install_bytes(
    s: &Shared,
    start: usize,
    len: usize,
    bytes: Option<&[u8]>,
    unit: u64,
) -> Result<(), LazyError> {
    let mut done = 0;
    while done < len {
        let dst = (start + done) as *mut libc::c_void;
        let result = match bytes {
            // SAFETY: dst..dst+len lies in the registered guest memory mapping, which is alive
            // while the server runs.
            None => unsafe { s.uffd.zeropage(dst, len - done, true) },
            // SAFETY: `bytes` holds `len` valid bytes and dst..dst+len lies in the registered
            // guest memory mapping, which is alive while the server runs.
            Some(bytes) => unsafe {
                s.uffd
                    .copy(bytes[done..len].as_ptr().cast(), dst, len - done, true)
            },
        };
        match result {
            Ok(n) => done += n,
            // Interrupted part-way (the address space changed): retry the rest.
            Err(userfaultfd::Error::PartiallyCopied(n)) => done += n,
            Err(e) if is_eexist(&e) => {
                // Some page is present already (written through the memfd): go page by page.
                install_pages(s, start + done, len - done, bytes.map(|b| &b[done..len]))?;
                done = len;
            }
            Err(e) => {
                let first = unit * s.unit_pages;
                return Err(LazyError::Install {
                    first,
                    end: first + (len as u64).div_ceil(PAGE_SIZE),
                    message: e.to_string(),
                });
            }
        }
    }
    Ok(())
}

fn install_pages(
    s: &Shared,
    start: usize,
    len: usize,
    bytes: Option<&[u8]>,
) -> Result<(), LazyError> {
    let page_len = PAGE_SIZE as usize;
    for i in 0..len.div_ceil(page_len) {
        let dst = (start + i * page_len) as *mut libc::c_void;
        let n = page_len.min(len - i * page_len);
        let result = match bytes {
            // SAFETY: one page of `bytes` into one page of the registered mapping.
            Some(b) => unsafe { s.uffd.copy(b[i * page_len..].as_ptr().cast(), dst, n, true) },
            // SAFETY: one page of the registered mapping.
            None => unsafe { s.uffd.zeropage(dst, n, true) },
        };
        match result {
            Ok(_) => {}
            Err(e) if is_eexist(&e) => {}
            Err(e) => {
                let page = (start - s.base) as u64 / PAGE_SIZE + i as u64;
                return Err(LazyError::Install {
                    first: page,
                    end: page + 1,
                    message: e.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// Buffers of the prefetcher, kept between chunks.
#[derive(Default)]
struct PrefetchScratch {
    /// One chunk of the working-set file, as read.
    read: Vec<u8>,
    /// A run of units gathered from `read` in address order.
    run: Vec<u8>,
    /// (unit, offset of its bytes in `read`, or `None` for a zero unit), sorted by unit.
    todo: Vec<(u64, Option<usize>)>,
}

/// Installs the units of `chunk` (entries of `set`) that are not installed yet; returns how many.
///
/// With the set's bytes: one read of the chunk, each unit checked against its checksum (a unit
/// that fails is served from the source), then the units in address order, one ioctl per run
/// of consecutive units. Without: unit by unit from the source, in fault order.
fn prefetch(
    s: &Shared,
    set: &WorkingSet,
    chunk: std::ops::Range<usize>,
    cache: &mut WindowCache,
    scratch: &mut PrefetchScratch,
) -> Result<u64, LazyError> {
    let pending = |u: u64| u < s.units && !s.installed[u as usize].load(Ordering::Relaxed);
    let entries = &set.entries()[chunk.clone()];
    let mut installed = 0;
    let read_at = if set.has_data() {
        match set.read_data(chunk, &mut scratch.read) {
            Ok(at) => Some(at),
            Err(e) => {
                tracing::warn!(error = %e, "working set unreadable: prefetching from the snapshot");
                None
            }
        }
    } else {
        None
    };
    let Some(read_at) = read_at else {
        for e in entries.iter().filter(|e| pending(e.unit)) {
            installed += install(s, e.unit, 1, cache)?;
        }
        return Ok(installed);
    };
    let unit_bytes = (s.unit_pages * PAGE_SIZE) as usize;
    scratch.todo.clear();
    for e in entries.iter().filter(|e| pending(e.unit)) {
        if e.zero {
            scratch.todo.push((e.unit, None));
            continue;
        }
        let off = (e.offset - read_at) as usize;
        if snap_core::crc32c(&scratch.read[off..off + unit_bytes]) == e.crc {
            scratch.todo.push((e.unit, Some(off)));
        } else {
            tracing::warn!(
                unit = e.unit,
                "working set unit fails its checksum: served from the snapshot"
            );
            installed += install(s, e.unit, 1, cache)?;
        }
    }
    scratch.todo.sort_unstable_by_key(|t| t.0);
    scratch.todo.dedup_by_key(|t| t.0);
    let todo = &scratch.todo;
    let mut i = 0;
    while i < todo.len() {
        let zero = todo[i].1.is_none();
        let mut j = i + 1;
        while j < todo.len() && todo[j].0 == todo[j - 1].0 + 1 && todo[j].1.is_none() == zero {
            j += 1;
        }
        let (start, len) = range(s, todo[i].0, (j - i) as u64);
        let bytes = if zero {
            None
        } else {
            let first = todo[i].1.expect("data unit");
            // Units that follow each other in memory usually follow each other in the file too.
            if todo[i..j]
                .iter()
                .enumerate()
                .all(|(k, t)| t.1 == Some(first + k * unit_bytes))
            {
                Some(&scratch.read[first..first + len])
            } else {
                scratch.run.clear();
                for t in &todo[i..j] {
                    let off = t.1.expect("data unit");
                    scratch
                        .run
                        .extend_from_slice(&scratch.read[off..off + unit_bytes]);
                }
                Some(&scratch.run[..len])
            }
        };
        install_bytes(s, start, len, bytes, todo[i].0)?;
        for t in &todo[i..j] {
            mark_installed(s, t.0);
        }
        if zero {
            s.zero_units.fetch_add((j - i) as u64, Ordering::Relaxed);
        }
        installed += (j - i) as u64;
        i = j;
    }
    Ok(installed)
}

/// Whether an install failed only because the pages are present already.
fn is_eexist(e: &userfaultfd::Error) -> bool {
    matches!(e, userfaultfd::Error::CopyFailed(errno) | userfaultfd::Error::ZeropageFailed(errno)
        if *errno as i32 == libc::EEXIST)
}
