//! Dirty tracking through KVM's per-vCPU dirty rings (KVM_CAP_DIRTY_LOG_RING_ACQ_REL, or
//! KVM_CAP_DIRTY_LOG_RING): KVM appends each dirtied page to the ring of the vCPU that wrote it;
//! the VMM collects entries (marking them reset) and KVM_RESET_DIRTY_RINGS re-arms them. A vCPU
//! whose ring is full exits with KVM_EXIT_DIRTY_RING_FULL and its thread collects the ring into
//! an overflow set before running on.

use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_DIRTY_LOG_PAGE_OFFSET,
    kvm_dirty_gfn, kvm_enable_cap,
};
use kvm_ioctls::{VcpuFd, VmFd};

use super::{DirtyError, DirtyLog, PageBitmap, sys};
use crate::memory::{MemoryRegion, PAGE_SIZE};

/// Entry flag: KVM has published this dirty page.
const GFN_DIRTY: u32 = 1;
/// Entry flag: the VMM has collected this entry; KVM_RESET_DIRTY_RINGS may recycle it.
const GFN_RESET: u32 = 2;

/// One vCPU's dirty ring, mapped from its fd; unmapped on drop.
struct RingMap {
    base: NonNull<kvm_dirty_gfn>,
    entries: u32,
    /// Index of the next entry to collect (free-running).
    fetch: u32,
}

// SAFETY: the mapping is owned by this value and only accessed through `&mut self` (under the
// tracker's mutex); KVM writes it concurrently only through the acquire/release protocol below.
unsafe impl Send for RingMap {}

impl RingMap {
    fn map(vcpu: &VcpuFd, entries: u32) -> Result<Self, DirtyError> {
        let len = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as libc::off_t;
        // SAFETY: maps `len` bytes of the vCPU fd's dirty-ring area, at the offset KVM documents,
        // at an address the kernel picks; the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                libc::off_t::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(DirtyError::Os(
                "mmap dirty ring",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Self {
            base: NonNull::new(p.cast()).expect("mmap does not return null on success"),
            entries,
            fetch: 0,
        })
    }

    /// Collects every published entry, calling `f(slot, offset)` for each, and marks them reset.
    fn drain(&mut self, mut f: impl FnMut(u32, u64)) -> u32 {
        let mut n = 0;
        loop {
            let i = (self.fetch % self.entries) as usize;
            // SAFETY: i < entries, so the entry lies inside the mapping.
            let entry = unsafe { self.base.as_ptr().add(i) };
            // SAFETY: `flags` is a naturally aligned u32 inside the mapping, shared with KVM,
            // which publishes an entry by storing DIRTY with release semantics.
            let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*entry).flags)) };
            if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                return n;
            }
            // SAFETY: the acquire load above orders these reads after KVM's writes of the entry.
            let (slot, offset) = unsafe { ((*entry).slot, (*entry).offset) };
            f(slot, offset);
            flags.store(GFN_RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
            n += 1;
        }
    }
}

impl Drop for RingMap {
    fn drop(&mut self) {
        let len = self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: unmaps exactly the mapping created in `map`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), len) };
    }
}

/// The dirty rings of all vCPUs of one VM.
pub struct KvmDirtyRing {
    vm: Arc<VmFd>,
    regions: Vec<MemoryRegion>,
    entries: u32,
    rings: Mutex<Vec<RingMap>>,
    /// Pages collected by vCPU threads on ring-full exits, not yet harvested.
    overflow: Mutex<PageBitmap>,
    full_exits: AtomicU64,
    /// Whether `overflow` may hold pages (set under the overflow lock).
    overflow_used: AtomicBool,
    /// A ring was found completely full: KVM may have written over entries nobody collected,
    /// so the next harvest reports every page.
    lost: AtomicBool,
    /// Ring-full exits in a row that found nothing to collect.
    empty_full_exits: AtomicU64,
}

/// Ring-full exits in a row with nothing to collect after which a ring counts as broken. One
/// such exit is normal (another vCPU's thread collected this vCPU's ring first); thousands mean
/// KVM counts entries it never published, which happens after it logged more entries than the
/// ring holds between two exits (seen on a nested host whose KVM emulates guest writes and logs
/// one entry per emulated write), and then the vCPU would take ring-full exits forever.
const STUCK_FULL_EXITS: u64 = 1000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl KvmDirtyRing {
    /// Enables dirty rings of `entries` entries (a power of two) per vCPU on `vm`. Call before any
    /// vCPU exists; memory slots need `KVM_MEM_LOG_DIRTY_PAGES`.
    ///
    /// # Errors
    /// [`DirtyError::Unsupported`] if KVM has no dirty ring or `entries` is out of its range.
    pub fn enable(
        vm: Arc<VmFd>,
        regions: &[MemoryRegion],
        entries: u32,
    ) -> Result<Self, DirtyError> {
        let bytes = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        let (cap, max) = [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING]
            .into_iter()
            .map(|c| (c, vm.check_extension_raw(libc::c_ulong::from(c))))
            .find(|&(_, max)| max > 0)
            .ok_or_else(|| DirtyError::Unsupported("KVM has no dirty ring".into()))?;
        if !entries.is_power_of_two() || bytes > max as usize {
            return Err(DirtyError::Unsupported(format!(
                "dirty ring of {entries} entries: must be a power of two of at most {} entries",
                max as usize / std::mem::size_of::<kvm_dirty_gfn>()
            )));
        }
        let enable = kvm_enable_cap {
            cap,
            args: [bytes as u64, 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&enable)
            .map_err(|e| DirtyError::Unsupported(format!("enabling the dirty ring: {e}")))?;
        let pages = regions.iter().map(|r| r.len).sum::<u64>() / PAGE_SIZE;
        Ok(Self {
            vm,
            regions: regions.to_vec(),
            entries,
            rings: Mutex::new(Vec::new()),
            overflow: Mutex::new(PageBitmap::new(pages)),
            full_exits: AtomicU64::new(0),
            overflow_used: AtomicBool::new(false),
            lost: AtomicBool::new(false),
            empty_full_exits: AtomicU64::new(0),
        })
    }

    /// Maps the ring of a newly created vCPU. Call once per vCPU, in index order.
    ///
    /// # Errors
    /// The mmap error.
    pub fn attach_vcpu(&self, vcpu: &VcpuFd) -> Result<(), DirtyError> {
        let ring = RingMap::map(vcpu, self.entries)?;
        lock(&self.rings).push(ring);
        Ok(())
    }

    /// Collects every ring into `into`; returns how many entries there were.
    fn drain_all(&self, into: &mut PageBitmap) -> Result<u32, DirtyError> {
        let mut rings = lock(&self.rings);
        let mut bad = None;
        let mut collected = 0;
        for ring in rings.iter_mut() {
            let n = ring.drain(
                |slot, offset| match self.regions.get((slot & 0xffff) as usize) {
                    Some(r) if offset < r.len / PAGE_SIZE => {
                        into.set(r.offset / PAGE_SIZE + offset)
                    }
                    _ => bad = Some((slot, offset)),
                },
            );
            if n >= self.entries {
                // KVM stops a vCPU well before its ring is full; a full one may have wrapped.
                self.lost.store(true, Ordering::Relaxed);
            }
            collected += n;
        }
        if collected > 0 {
            sys::reset_dirty_rings(&*self.vm)
                .map_err(|e| DirtyError::Kvm("KVM_RESET_DIRTY_RINGS", e))?;
        }
        if let Some((slot, offset)) = bad {
            return Err(DirtyError::Inconsistent(format!(
                "dirty ring entry for slot {slot} page {offset} outside guest memory"
            )));
        }
        Ok(collected)
    }

    /// Handles KVM_EXIT_DIRTY_RING_FULL on a vCPU thread: collects the rings into the overflow
    /// set so the vCPU can run on. Its pages are returned by the next harvest.
    ///
    /// # Errors
    /// The KVM error of resetting the rings.
    /// [`DirtyError::Inconsistent`] once the ring is broken (see [`STUCK_FULL_EXITS`]): the
    /// vCPU cannot run on, and the caller stops the VM rather than spin.
    pub fn on_ring_full(&self) -> Result<(), DirtyError> {
        self.full_exits.fetch_add(1, Ordering::Relaxed);
        let mut overflow = lock(&self.overflow);
        self.overflow_used.store(true, Ordering::Relaxed);
        if self.drain_all(&mut overflow)? > 0 {
            self.empty_full_exits.store(0, Ordering::Relaxed);
        } else if self.empty_full_exits.fetch_add(1, Ordering::Relaxed) + 1 >= STUCK_FULL_EXITS {
            return Err(DirtyError::Inconsistent(format!(
                "the dirty ring of {} entries overflowed: KVM logged more entries than it holds \
                 between two ring-full exits and now counts entries it never published, so the \
                 vCPU cannot run on (use the dirty bitmap on this host)",
                self.entries
            )));
        }
        Ok(())
    }
}

impl KvmDirtyRing {
    /// How many ring-full exits the vCPUs have taken so far.
    pub fn full_exits(&self) -> u64 {
        self.full_exits.load(Ordering::Relaxed)
    }
}

impl DirtyLog for KvmDirtyRing {
    fn name(&self) -> &'static str {
        "kvm-ring"
    }

    fn collect(&self, into: &mut PageBitmap) -> Result<(), DirtyError> {
        // Straight into `into`; the overflow set only holds pages of ring-full exits, and is
        // walked only if there were any (it spans all of memory).
        let mut overflow = lock(&self.overflow);
        self.drain_all(into)?;
        if self.overflow_used.swap(false, Ordering::Relaxed) {
            into.union_with(&overflow);
            overflow.clear();
        }
        if self.lost.swap(false, Ordering::Relaxed) {
            // Entries may have been written over: every page counts as dirty this once, so a
            // diff snapshot stays complete.
            tracing::warn!("a dirty ring was found full: reporting every page as dirty");
            into.set_range(0, into.pages());
        }
        Ok(())
    }

    fn as_ring(&self) -> Option<&KvmDirtyRing> {
        Some(self)
    }
}
