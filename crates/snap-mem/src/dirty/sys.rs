//! The KVM ioctls for dirty tracking that kvm-ioctls does not wrap yet.

use std::os::fd::AsRawFd;

use kvm_bindings::{kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1};
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_iowr_nr};

const KVMIO: u32 = 0xAE;

// From include/uapi/linux/kvm.h.
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

// The structures the kernel reads must have the kernel's layout.
const _: () = assert!(std::mem::size_of::<kvm_clear_dirty_log>() == 24);
const _: () = assert!(std::mem::size_of::<kvm_bindings::kvm_dirty_gfn>() == 16);

/// KVM_CLEAR_DIRTY_LOG: re-arms dirty tracking (write-protects again) for the pages whose bits are
/// set in `bitmap`, starting at page `first_page` of memory slot `slot`.
///
/// `first_page` must be a multiple of 64 and `bitmap` must hold at least `num_pages` bits.
pub(crate) fn clear_dirty_log(
    vm: &impl AsRawFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &[u64],
) -> Result<(), errno::Error> {
    assert!(bitmap.len() as u64 * 64 >= u64::from(num_pages));
    let arg = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_ptr().cast_mut().cast(),
        },
    };
    // SAFETY: `vm` is a KVM VM fd; the kernel only reads `arg` and `num_pages` bits of the bitmap,
    // which `bitmap` holds (asserted above) and which outlives the call.
    let r = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
    if r < 0 {
        return Err(errno::Error::last());
    }
    Ok(())
}

/// KVM_RESET_DIRTY_RINGS: re-arms tracking for every dirty-ring entry marked collected, in the
/// rings of all vCPUs. Returns how many entries were reset.
pub(crate) fn reset_dirty_rings(vm: &impl AsRawFd) -> Result<u32, errno::Error> {
    // SAFETY: `vm` is a KVM VM fd; the ioctl takes no argument.
    let r = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    if r < 0 {
        return Err(errno::Error::last());
    }
    Ok(r as u32)
}
