//! Write-protected guest memory for live snapshots (userfaultfd write-protect on the memfd).
//!
//! A live snapshot keeps the guest running while its memory layer is written. The pages the
//! layer holds are write-protected at the snapshot's pause; then:
//!
//! - the layer writer reads each page (a protected page still holds the bytes of the pause),
//!   takes the copy kept for it if the guest wrote it meanwhile, and lifts its protection;
//! - a write to a protected page (by a vCPU, through KVM, or by the VMM itself through the
//!   mapping, e.g. a virtio-blk read landing in guest memory) stops the writing thread in the
//!   kernel and reaches [`WriteProtect`]'s fault thread, which copies the page as it is (the
//!   pause's bytes) before lifting the protection: the writer waits for one page.
//!
//! Protecting costs time in proportion to the pages protected (about 19 ms per GiB populated on
//! the development host), so the pause must not protect everything: [`WriteProtect::protect`]
//! protects the likely pages while the guest still runs (a write to one then only lifts its
//! protection and records it), and [`WriteProtect::freeze`], called in the pause, protects only
//! what is missing: the pages of the layer that were written since, or were not protected.
//! The pause so costs in proportion to what the guest wrote in that short window, not to its
//! memory.
//!
//! Dropping a [`WriteProtect`] (or [`WriteProtect::finish`]) closes the userfaultfd, which lifts
//! every protection left and lets any blocked writer go on: a failed or cancelled snapshot
//! leaves the guest as it was.
//!
//! Needs Linux 5.19 or later (`UFFD_FEATURE_WP_HUGETLBFS_SHMEM`, write-protect on shared
//! memory); [`WriteProtect::start`] fails with [`ProtectError::Unsupported`] where it is missing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use userfaultfd::{Event, FaultKind, FeatureFlags, RegisterMode, Uffd, UffdBuilder};

use crate::dirty::PageBitmap;
use crate::memory::GuestMemory;

const PAGE: usize = 4096;
/// UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_HUGETLBFS_SHMEM (linux/userfaultfd.h).
const WP_FEATURES: u64 = (1 << 0) | (1 << 12);

/// Why write-protection cannot be used or failed.
#[derive(Debug, thiserror::Error)]
pub enum ProtectError {
    /// This kernel lacks write-protect on shared memory (Linux 5.19 or later is needed).
    #[error("write-protect of guest memory is not available here: {0}")]
    Unsupported(String),
    /// An ioctl failed.
    #[error("write-protect: {op}: {error}")]
    Os {
        /// What was being done.
        op: &'static str,
        /// The error.
        error: String,
    },
}

/// What the fault thread does with a write to a protected page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before the pause: lift the protection and record the page as written.
    Tracking,
    /// After the pause: keep the page's bytes first if the layer holds it.
    Saving,
}

/// Counters of a live copy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProtectStats {
    /// Write faults on protected pages before the pause (only lifted and recorded).
    pub tracking_faults: u64,
    /// Pages the fault thread kept for the layer ahead of the writer (the guest wrote them
    /// before the writer got there).
    pub saved_ahead: u64,
    /// Write faults after the pause on pages the layer had already taken, or does not hold.
    pub lifted_faults: u64,
    /// Total time writers were held in faults after the pause (from the fault's arrival at the
    /// fault thread to the lift).
    pub held: Duration,
    /// Pages [`WriteProtect::freeze`] protected in the pause.
    pub protected_in_pause: u64,
}

struct State {
    phase: Phase,
    /// Pages protected and not lifted since (as far as this side knows).
    protected: PageBitmap,
    /// Pages lifted by faults in the tracking phase.
    written: PageBitmap,
    /// The pages the layer holds (set at the pause).
    keep: PageBitmap,
    /// Pages of `keep` the layer has taken (read by the writer, or kept here).
    taken: PageBitmap,
    /// The pause's bytes of pages written before the writer read them.
    saved: HashMap<u64, Box<[u8]>>,
    stats: ProtectStats,
    failure: Option<String>,
}

struct Shared {
    uffd: Uffd,
    base: usize,
    pages: u64,
    state: Mutex<State>,
    stop: AtomicBool,
    /// Written to wake the fault thread when it is to stop.
    wake: vmm_sys_util::eventfd::EventFd,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn addr(&self, page: u64) -> *mut libc::c_void {
        (self.base + page as usize * PAGE) as *mut libc::c_void
    }

    fn set_protection(&self, first: u64, n: u64, on: bool) -> Result<(), ProtectError> {
        let (start, len) = (self.addr(first), n as usize * PAGE);
        let r = if on {
            self.uffd.write_protect(start, len)
        } else {
            self.uffd.remove_write_protection(start, len, true)
        };
        r.map_err(|e| ProtectError::Os {
            op: if on { "protect" } else { "lift" },
            error: e.to_string(),
        })
    }

    /// Applies `on` to every run of pages set in `pages`.
    fn set_runs(&self, pages: &PageBitmap, on: bool) -> Result<u64, ProtectError> {
        let mut count = 0;
        let mut run: Option<(u64, u64)> = None;
        for p in pages.iter() {
            run = match run {
                Some((first, n)) if first + n == p => Some((first, n + 1)),
                Some((first, n)) => {
                    self.set_protection(first, n, on)?;
                    count += n;
                    Some((p, 1))
                }
                None => Some((p, 1)),
            };
        }
        if let Some((first, n)) = run {
            self.set_protection(first, n, on)?;
            count += n;
        }
        Ok(count)
    }
}

/// Write-protection of one guest memory, with its fault thread (see the module docs).
pub struct WriteProtect {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl WriteProtect {
    /// Registers `memory` for write-protect faults and starts the fault thread; nothing is
    /// protected yet. The memory must outlive this (the caller drops this first).
    ///
    /// # Errors
    /// [`ProtectError::Unsupported`] where the kernel lacks write-protect on shared memory, or
    /// the range is registered by another userfaultfd already (a lazy restore still running).
    pub fn start(memory: &GuestMemory) -> Result<Self, ProtectError> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(FeatureFlags::from_bits_retain(WP_FEATURES))
            .create()
            .map_err(|e| ProtectError::Unsupported(format!("userfaultfd: {e}")))?;
        let base = memory.host_address(0);
        uffd.register_with_mode(
            base as *mut libc::c_void,
            memory.size() as usize,
            RegisterMode::WRITE_PROTECT,
        )
        .map_err(|e| ProtectError::Unsupported(format!("register: {e}")))?;
        let pages = memory.size() / PAGE as u64;
        let shared = Arc::new(Shared {
            uffd,
            base: base as usize,
            pages,
            state: Mutex::new(State {
                phase: Phase::Tracking,
                protected: PageBitmap::new(pages),
                written: PageBitmap::new(pages),
                keep: PageBitmap::new(pages),
                taken: PageBitmap::new(pages),
                saved: HashMap::new(),
                stats: ProtectStats::default(),
                failure: None,
            }),
            stop: AtomicBool::new(false),
            wake: vmm_sys_util::eventfd::EventFd::new(libc::EFD_CLOEXEC).map_err(|e| {
                ProtectError::Os {
                    op: "eventfd",
                    error: e.to_string(),
                }
            })?,
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("write-protect".into())
            .spawn(move || serve(&s))
            .map_err(|e| ProtectError::Os {
                op: "fault thread",
                error: e.to_string(),
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Protects `pages` (while the guest runs: a write to one only lifts it and records it).
    ///
    /// # Errors
    /// The ioctl's error.
    pub fn protect(&self, pages: &PageBitmap) -> Result<(), ProtectError> {
        // Recorded first: a fault can arrive as soon as a page is protected.
        self.shared.lock().protected.union_with(pages);
        self.shared.set_runs(pages, true).map(|_| ())
    }

    /// In the pause (no vCPU runs, no device writes): `keep` is what the layer holds. Protects
    /// the pages of `keep` not protected now (written since [`WriteProtect::protect`], or never
    /// protected), and from now on keeps a written page's bytes before lifting it. Returns the
    /// number of pages protected here.
    ///
    /// # Errors
    /// The ioctl's error.
    pub fn freeze(&self, keep: &PageBitmap) -> Result<u64, ProtectError> {
        let mut st = self.shared.lock();
        // Missing: kept pages not protected now (never protected, or lifted by a write since).
        // Word by word: the pause must not cost a step per page of memory.
        let mut still = st.protected.clone();
        still.remove_all(&st.written);
        st.written.clear();
        let mut missing = keep.clone();
        missing.remove_all(&still);
        // No fault can come while the guest is paused, so the state is settled under the lock.
        let n = self.shared.set_runs(&missing, true)?;
        st.protected.union_with(keep);
        st.keep = keep.clone();
        st.phase = Phase::Saving;
        st.stats.protected_in_pause = n;
        Ok(n)
    }

    /// After [`WriteProtect::freeze`]: fills `buf` with pages `first_page..` as they were at the
    /// pause (`buf` was read from memory before this call; pages the guest wrote since are
    /// replaced by the bytes kept for them), marks them taken and lifts their protection.
    ///
    /// # Errors
    /// The ioctl's error, or the fault thread's failure.
    pub fn take(&self, first_page: u64, buf: &mut [u8]) -> Result<(), ProtectError> {
        let n = (buf.len() / PAGE) as u64;
        {
            let mut st = self.shared.lock();
            if let Some(f) = &st.failure {
                return Err(ProtectError::Os {
                    op: "fault thread",
                    error: f.clone(),
                });
            }
            for k in 0..n {
                let page = first_page + k;
                if let Some(kept) = st.saved.remove(&page) {
                    buf[k as usize * PAGE..(k as usize + 1) * PAGE].copy_from_slice(&kept);
                }
                st.taken.set(page);
            }
        }
        self.shared.set_protection(first_page, n, false)
    }

    /// Counters so far.
    pub fn stats(&self) -> ProtectStats {
        self.shared.lock().stats
    }

    /// Lifts every protection left and stops the fault thread; returns the counters.
    pub fn finish(mut self) -> ProtectStats {
        self.stop();
        self.stats()
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = self.shared.wake.write(1);
        // Unregistering lifts every protection and wakes every thread blocked on one.
        let _ = self
            .shared
            .uffd
            .unregister(self.shared.addr(0), self.shared.pages as usize * PAGE);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for WriteProtect {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The fault thread: answers write faults on protected pages until stopped.
fn serve(s: &Shared) {
    let mut page_buf = vec![0u8; PAGE];
    while !s.stop.load(Ordering::Relaxed) {
        let fd = |f: &dyn std::os::fd::AsRawFd| libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let mut fds = [fd(&s.uffd), fd(&s.wake)];
        // SAFETY: two valid pollfds for the duration of the call.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) } <= 0 || fds[0].revents == 0 {
            continue;
        }
        loop {
            let event = match s.uffd.read_event() {
                Ok(Some(e)) => e,
                Ok(None) => break,
                Err(e) => {
                    s.lock().failure = Some(format!("reading a fault: {e}"));
                    return;
                }
            };
            let Event::Pagefault {
                kind: FaultKind::WriteProtected,
                addr,
                ..
            } = event
            else {
                continue;
            };
            let arrived = Instant::now();
            let page = ((addr as usize - s.base) / PAGE) as u64;
            let mut st = s.lock();
            match st.phase {
                Phase::Tracking => {
                    st.written.set(page);
                    st.stats.tracking_faults += 1;
                }
                Phase::Saving => {
                    if st.keep.contains(page) && !st.taken.contains(page) {
                        // Still protected: memory holds the pause's bytes.
                        // SAFETY: the page lies inside the registered mapping, which outlives
                        // this thread; nothing writes it while it is protected.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                s.addr(page).cast::<u8>(),
                                page_buf.as_mut_ptr(),
                                PAGE,
                            );
                        }
                        st.saved.insert(page, page_buf.clone().into_boxed_slice());
                        st.taken.set(page);
                        st.stats.saved_ahead += 1;
                    } else {
                        st.stats.lifted_faults += 1;
                    }
                }
            }
            drop(st);
            let lifted = s.set_protection(page, 1, false);
            let mut st = s.lock();
            if st.phase == Phase::Saving {
                st.stats.held += arrived.elapsed();
            }
            if let Err(e) = lifted {
                st.failure = Some(e.to_string());
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::PageSource;

    fn page_of(mem: &GuestMemory, page: u64) -> Vec<u8> {
        let mut v = vec![0u8; PAGE];
        mem.read_pages(page, &mut v).unwrap();
        v
    }

    #[test]
    fn writes_after_the_freeze_keep_the_pause_bytes_for_the_layer() {
        let mem = Arc::new(GuestMemory::new(64 << 20).unwrap());
        for p in 0..64u64 {
            mem.write_at_offset(p * PAGE as u64, &vec![p as u8 + 1; PAGE])
                .unwrap();
        }
        let wp = match WriteProtect::start(&mem) {
            Ok(wp) => wp,
            Err(ProtectError::Unsupported(why)) => {
                println!("SKIP writes_after_the_freeze_keep_the_pause_bytes_for_the_layer: {why}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let mut all = PageBitmap::for_memory(mem.size());
        all.set_range(0, 64);
        wp.protect(&all).unwrap();
        // Written before the pause: lifted and recorded, not kept.
        let m = Arc::clone(&mem);
        std::thread::spawn(move || m.write_at_offset(5 * PAGE as u64, &[0xee; 8]).unwrap())
            .join()
            .unwrap();
        let mut keep = PageBitmap::for_memory(mem.size());
        keep.set_range(0, 32);
        keep.set(100); // never populated: protected as an empty page
        assert_eq!(wp.freeze(&keep).unwrap(), 2, "page 5 again, and page 100");
        let pause: Vec<Vec<u8>> = (0..32).map(|p| page_of(&mem, p)).collect();
        // The guest writes half the kept pages, and pages the layer does not hold.
        let m = Arc::clone(&mem);
        std::thread::spawn(move || {
            for p in (0..64u64).step_by(2) {
                m.write_at_offset(p * PAGE as u64, &[0x55; 16]).unwrap();
            }
        })
        .join()
        .unwrap();
        for p in 0..32u64 {
            let mut buf = page_of(&mem, p);
            wp.take(p, &mut buf).unwrap();
            assert_eq!(buf, pause[p as usize], "page {p} as at the pause");
        }
        let stats = wp.finish();
        assert_eq!(stats.saved_ahead, 16);
        assert_eq!(stats.lifted_faults, 16, "pages 32..64 are not in the layer");
        assert_eq!(stats.tracking_faults, 1);
        // Every protection is gone: the guest writes freely.
        mem.write_at_offset(7 * PAGE as u64, &[1; 4]).unwrap();
    }
}
