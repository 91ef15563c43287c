//! snap-mem: guest memory and what changed in it.
//!
//! [`GuestMemory`] is the memfd-backed memory of a VM. Dirty-page tracking (KVM's dirty bitmap or
//! dirty ring, plus the VMM's own writes) says which pages changed since the last snapshot, and
//! memory layers store full and diff snapshots of memory as chains of compressed, checked files.

pub mod dirty;
pub mod layer;
pub mod lazy;
pub mod memory;
pub mod protect;
pub mod working_set;

pub use memory::GuestMemory;
