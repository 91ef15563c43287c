//! snap-vmm: a KVM microVM whose complete state (memory, every vCPU, every device) can be saved
//! and loaded so that the loaded VM continues exactly as the original would have.
//!
//! A [`Vm`] owns guest memory (a memfd), one thread per vCPU started directly in 64-bit long mode,
//! the in-kernel interrupt controllers, a 16550 UART and its disks ([`virtio`]-blk devices over
//! virtio-mmio, each serving a [`BlockBackend`]). [`Vm::pause`] parks every vCPU;
//! [`Vm::save`] returns a plain [`VmState`]; [`Vm::restore`] builds a new VM from a state and a
//! memory layer chain, and [`Vm::restore_in_place`] reverts an existing one. A snapshot
//! ([`snapshot`], [`Vm::begin_snapshot`]) is a state file and a memory layer, full or a diff over
//! its parent's, written wherever the caller keeps them.
//!
//! ```no_run
//! use std::path::Path;
//! use std::time::Duration;
//! use snap_vmm::{LayerChain, TestGuest, Vm, VmConfig, VmExit, VmState};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = VmConfig { memory_bytes: 64 << 20, vcpus: 2 };
//! let guest = TestGuest::default();
//! let vm = Vm::create(config, &guest.boot_image(&config)?)?;
//! vm.resume()?;
//! vm.serial_output().wait_for_lines(10, Duration::from_secs(60));
//! vm.pause();
//! let (layer, state) = (Path::new("/tmp/snap-a.mlayer"), Path::new("/tmp/snap-a.state"));
//! let pending = vm.begin_snapshot(None, &[])?; // a full memory layer; disks left alone
//! let info = pending.write_memory(layer, &Default::default())?;
//! pending.write_state(state)?;
//! pending.commit(&info); // the snapshot is taken: its pages are no longer pending
//! vm.resume()?;
//! assert_eq!(vm.wait_for_exit(Duration::from_secs(60))?, VmExit::Finished(0));
//!
//! // A new VM that continues from the snapshot exactly as the original did.
//! let clone = Vm::restore(&VmState::read_file(state)?, &LayerChain::open(&[layer])?)?;
//! clone.resume()?;
//! clone.wait_for_exit(Duration::from_secs(60))?;
//! # Ok(())
//! # }
//! ```

pub mod block;
pub mod boot;
pub mod error;
pub mod guest;
pub use snap_mem::memory;
mod run;
pub mod serial;
pub mod snapshot;
pub mod state;
pub mod vcpu;
pub mod virtio;
pub mod vm;

pub use block::{BlockBackend, IoStop, RawFile};
pub use boot::BootImage;
pub use error::{ConfigError, VmError};
pub use guest::TestGuest;
pub use serial::SerialOutput;
pub use snap_mem::GuestMemory;
pub use snap_mem::dirty::{DirtyTracking, PageBitmap};
pub use snap_mem::layer::{LayerChain, LayerOptions};
pub use state::{VmConfig, VmState};
pub use vcpu::VcpuState;
pub use vm::{MemoryRestore, PreparedVm, RunState, Vm, VmExit, VmOptions};
