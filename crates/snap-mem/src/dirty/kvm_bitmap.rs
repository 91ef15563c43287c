//! Dirty tracking through KVM's dirty bitmap with manual protection
//! (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): KVM_GET_DIRTY_LOG reads the bitmap without touching the
//! pages, and KVM_CLEAR_DIRTY_LOG re-arms exactly the pages that were harvested.

use std::sync::Arc;

use kvm_bindings::{
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, kvm_enable_cap,
};
use kvm_ioctls::VmFd;

use super::{DirtyError, DirtyLog, PageBitmap, sys};
use crate::memory::{MemoryRegion, PAGE_SIZE};

/// The KVM dirty bitmap, read per memory slot (slot `i` is region `i` of guest memory).
pub struct KvmDirtyBitmap {
    vm: Arc<VmFd>,
    regions: Vec<MemoryRegion>,
}

impl KvmDirtyBitmap {
    /// Turns on manual dirty-log protection on `vm`. Call before the memory slots are created
    /// (with `KVM_MEM_LOG_DIRTY_PAGES`).
    ///
    /// # Errors
    /// [`DirtyError::Unsupported`] if KVM lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.
    pub fn enable(vm: Arc<VmFd>, regions: &[MemoryRegion]) -> Result<Self, DirtyError> {
        let cap = kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            args: [u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE), 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&cap).map_err(|e| {
            DirtyError::Unsupported(format!("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: {e}"))
        })?;
        Ok(Self {
            vm,
            regions: regions.to_vec(),
        })
    }
}

impl DirtyLog for KvmDirtyBitmap {
    fn name(&self) -> &'static str {
        "kvm-bitmap"
    }

    fn collect(&self, into: &mut PageBitmap) -> Result<(), DirtyError> {
        for (slot, r) in self.regions.iter().enumerate() {
            let bits = self
                .vm
                .get_dirty_log(slot as u32, r.len as usize)
                .map_err(|e| DirtyError::Kvm("KVM_GET_DIRTY_LOG", e))?;
            if bits.iter().all(|&w| w == 0) {
                continue;
            }
            let pages = r.len / PAGE_SIZE;
            sys::clear_dirty_log(&*self.vm, slot as u32, 0, pages as u32, &bits)
                .map_err(|e| DirtyError::Kvm("KVM_CLEAR_DIRTY_LOG", e))?;
            into.or_bits(r.offset / PAGE_SIZE, &bits);
        }
        Ok(())
    }
}
