//! Helpers shared by the KVM tests.
#![allow(dead_code, unused_imports)]

pub use snap_testkit::vmm::*;
pub use snap_testkit::{TIMEOUT, kvm_available};
