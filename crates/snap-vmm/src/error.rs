//! The error type of VM operations.

use crate::memory::MemoryError;
use crate::state::StateError;
use crate::vcpu::VcpuError;

/// Why a VM configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// No vCPUs were asked for.
    #[error("a VM needs at least one vCPU, 0 requested")]
    ZeroVcpus,
    /// More vCPUs than the VMM supports.
    #[error("{requested} vCPUs requested, at most {max} are supported")]
    TooManyVcpus {
        /// Requested count.
        requested: u32,
        /// Supported maximum.
        max: u32,
    },
    /// The memory size cannot be given.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The memory size is below what the boot layout needs.
    #[error("guest memory size {requested} bytes is below the minimum of {min} bytes")]
    MemoryTooSmall {
        /// Requested size.
        requested: u64,
        /// Minimum size.
        min: u64,
    },
    /// The memory size is beyond the boot identity map.
    #[error("guest memory size {requested} bytes is above the supported maximum of {max} bytes")]
    MemoryAboveIdentityMap {
        /// Requested size.
        requested: u64,
        /// Supported maximum.
        max: u64,
    },
    /// The disks cannot be given to a VM.
    #[error("disks: {0}")]
    Disks(String),
    /// Test guest parameters that do not fit the VM.
    #[error("test guest parameters: {0}")]
    GuestParams(String),
}

/// Errors of VM operations. Messages chain into one readable line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmError {
    /// The configuration was refused before anything was created.
    #[error("invalid VM configuration: {0}")]
    Config(#[from] ConfigError),
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm (is KVM available and are you allowed to use it?): {0}")]
    KvmUnavailable(#[source] kvm_ioctls::Error),
    /// A VM-level KVM ioctl failed.
    #[error("{op}: {source}")]
    Kvm {
        /// The ioctl or step that failed.
        op: &'static str,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A vCPU ioctl failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Guest memory could not be created or written.
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    /// The operation needs the VM paused (or stopped) first.
    #[error("the VM is running: pause it first")]
    NotPaused,
    /// The guest stopped on its own; it runs again only after a restore.
    #[error("the guest has stopped ({0:?}): restore a snapshot to run it again")]
    Stopped(crate::vm::VmExit),
    /// A disk's backend failed a request with an error the guest must not see (see
    /// [`crate::block::stops_vm`]): the VM is paused with the request pending.
    #[error("the VM is paused on a disk error: {0}")]
    IoStopped(crate::block::IoStop),
    /// An earlier restore failed part-way, so the VM must not run again.
    #[error("the VM cannot run: {0}")]
    Failed(String),
    /// A saved state does not fit this VM or is inconsistent.
    #[error("saved state: {0}")]
    State(#[from] StateError),
    /// A memory layer could not be read or written (boxed: layer errors are large).
    #[error(transparent)]
    Layer(Box<snap_mem::layer::LayerError>),
    /// A snapshot cannot be taken or restored as asked.
    #[error("snapshot {path}: {problem}")]
    Snapshot {
        /// The file concerned (empty when the problem is not about one file).
        path: std::path::PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A diff snapshot was asked over a layer the VM's memory is not based on.
    #[error(
        "the VM's memory is not based on parent layer {parent} but on {}: take a full snapshot, or restore the parent first",
        base.map_or("no snapshot".into(), |b| format!("layer {b}"))
    )]
    NotBasedOn {
        /// The parent layer asked for.
        parent: snap_core::Id,
        /// The layer the VM's memory is based on, if any.
        base: Option<snap_core::Id>,
    },
    /// The serial device state could not be loaded.
    #[error("serial device state: {0}")]
    Serial(String),
    /// Dirty-page tracking failed or is not available as asked.
    #[error("dirty tracking: {0}")]
    Dirty(#[from] snap_mem::dirty::DirtyError),
    /// Dirty pages were asked for on a VM created without dirty tracking.
    #[error("this VM was created without dirty-page tracking")]
    DirtyTrackingOff,
    /// A lazy restore could not be started.
    #[error(transparent)]
    Lazy(#[from] snap_mem::lazy::LazyError),
    /// Write-protecting guest memory for a live snapshot failed or is not available.
    #[error("live snapshot: {0}")]
    WriteProtect(#[from] snap_mem::protect::ProtectError),
    /// A vCPU thread could not be started.
    #[error("cannot start vCPU thread: {0}")]
    Thread(#[source] std::io::Error),
    /// A disk failed an operation of the VMM's own (a flush for a snapshot).
    #[error("disk {index}: {source}")]
    Disk {
        /// The disk.
        index: usize,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Waiting for the guest took longer than allowed.
    #[error("timed out waiting for the guest")]
    Timeout,
}

impl From<snap_mem::layer::LayerError> for VmError {
    fn from(e: snap_mem::layer::LayerError) -> Self {
        Self::Layer(Box::new(e))
    }
}
