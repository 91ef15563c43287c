//! snap-vmm: a KVM microVM whose complete state (memory, every vCPU, every device) can be saved
//! and loaded so that the loaded VM continues exactly as the original would have.
//!
//! A [`Vm`] owns guest memory (a memfd), one thread per vCPU started directly in 64-bit long mode,
//! the in-kernel interrupt controllers and a 16550 UART. [`Vm::pause`] parks every vCPU;
//! [`Vm::save`] returns a plain [`VmState`]; [`Vm::restore`] builds a new VM from a state and a
//! memory image, and [`Vm::restore_in_place`] reverts an existing one.

pub mod boot;
pub mod error;
pub mod guest;
pub mod image;
pub mod memory;
pub mod serial;
pub mod snapshot;
pub mod state;
pub mod vcpu;
pub mod vm;

pub use boot::BootImage;
pub use error::{ConfigError, VmError};
pub use guest::TestGuest;
pub use image::{MemoryImage, write_memory_image};
pub use memory::GuestMemory;
pub use serial::SerialOutput;
pub use state::{VmConfig, VmState};
pub use vcpu::VcpuState;
pub use vm::{RunState, Vm, VmExit};
