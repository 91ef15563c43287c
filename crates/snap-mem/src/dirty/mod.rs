//! Dirty-page tracking: which pages of guest memory changed since the last snapshot.
//!
//! A [`DirtyLog`] is one source of guest writes (the KVM dirty bitmap, [`KvmDirtyBitmap`], or the
//! KVM dirty ring, [`KvmDirtyRing`]); [`GuestMemory`] itself marks every write the VMM makes. A
//! [`DirtyTracker`] harvests the union of both. Harvested pages stay *pending* until the layer
//! holding them is durable ([`DirtyTracker::commit`]): if writing it fails, the next harvest
//! returns them again, so the next diff snapshot still holds them.

pub mod bitmap;
pub mod kvm_bitmap;
pub mod ring;
mod sys;

use std::sync::{Mutex, MutexGuard};

pub use bitmap::{AtomicPageBitmap, PageBitmap};
pub use kvm_bitmap::KvmDirtyBitmap;
pub use ring::KvmDirtyRing;

use crate::memory::GuestMemory;

/// Errors of dirty-page tracking.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DirtyError {
    /// The host's KVM cannot track dirty pages this way.
    #[error("dirty tracking unsupported: {0}")]
    Unsupported(String),
    /// A KVM ioctl failed.
    #[error("{0}: {1}")]
    Kvm(&'static str, #[source] vmm_sys_util::errno::Error),
    /// A system call failed.
    #[error("{0}: {1}")]
    Os(&'static str, #[source] std::io::Error),
    /// KVM reported something that cannot be.
    #[error("dirty tracking: {0}")]
    Inconsistent(String),
}

/// One source of the guest's writes to memory.
pub trait DirtyLog: Send + Sync {
    /// Short name for logs and benchmarks.
    fn name(&self) -> &'static str;

    /// Adds the pages dirtied since the last call to `into` and re-arms tracking for them.
    /// Call it while the vCPUs are paused, so that nothing is dirtied during the call.
    ///
    /// # Errors
    /// The KVM error; pages not yet collected stay in KVM's log.
    fn collect(&self, into: &mut PageBitmap) -> Result<(), DirtyError>;

    /// The dirty ring, if this log is one (vCPU threads handle its ring-full exits).
    fn as_ring(&self) -> Option<&KvmDirtyRing> {
        None
    }
}

/// How a VM tracks the pages its guest dirties.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirtyTracking {
    /// No tracking: every snapshot is a full one.
    Off,
    /// KVM's dirty bitmap with manual protection.
    #[default]
    Bitmap,
    /// KVM's per-vCPU dirty rings of this many entries each (a power of two).
    Ring {
        /// Entries per vCPU ring.
        entries: u32,
    },
}

/// Harvests the union of the guest's dirty pages and the VMM's writes, keeping what was
/// harvested pending until it is committed.
pub struct DirtyTracker {
    log: Box<dyn DirtyLog>,
    pending: Mutex<PageBitmap>,
}

impl DirtyTracker {
    /// A tracker over `log` for memory of `memory_bytes` bytes.
    pub fn new(log: Box<dyn DirtyLog>, memory_bytes: u64) -> Self {
        Self {
            log,
            pending: Mutex::new(PageBitmap::for_memory(memory_bytes)),
        }
    }

    /// The source of guest writes.
    pub fn log(&self) -> &dyn DirtyLog {
        &*self.log
    }

    fn pending(&self) -> MutexGuard<'_, PageBitmap> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every page dirtied since the last commit: by the guest (from the log) or by the VMM
    /// (marked in `mem`). Call it while the vCPUs are paused. The pages stay pending: harvesting
    /// again before [`DirtyTracker::commit`] returns them again (plus anything new).
    ///
    /// # Errors
    /// The KVM error; nothing harvested so far is lost.
    pub fn harvest(&self, mem: &GuestMemory) -> Result<PageBitmap, DirtyError> {
        let mut pending = self.pending();
        mem.take_vmm_writes(&mut pending);
        self.log.collect(&mut pending)?;
        Ok(pending.clone())
    }

    /// The pages of the last harvest are in a durable layer: stop returning them.
    pub fn commit(&self) {
        self.pending().clear();
    }

    /// Forgets every dirty page: memory now equals a snapshot (after a restore).
    ///
    /// # Errors
    /// The KVM error of draining the log.
    pub fn reset(&self, mem: &GuestMemory) -> Result<(), DirtyError> {
        let mut pending = self.pending();
        self.log.collect(&mut pending)?;
        mem.clear_vmm_writes();
        pending.clear();
        Ok(())
    }
}
