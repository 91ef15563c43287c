//! The plain saved state of a whole VM and its file format.

use std::path::Path;

use kvm_bindings::{kvm_clock_data, kvm_irqchip};
use serde::{Deserialize, Serialize};
use snap_core::{FileError, FormatError, FormatSpec};

use crate::serial::SerialDeviceState;
use crate::vcpu::VcpuState;
use crate::virtio::{MAX_DISKS, VirtioBlkState};

/// File format of a saved VM state: snap-core header, then the state encoded with postcard.
///
/// Version 2 added the virtio-blk devices (`VmState::disks`). Version 1 states are refused
/// ("unsupported format version 1"): they were taken before disks existed and are not kept.
pub const VM_STATE_FORMAT: FormatSpec = FormatSpec {
    name: "vm state",
    magic: *b"SNAPVMST",
    version: 3,
    min_version: 3,
    max_payload: 64 << 20,
};

/// The shape of a VM: what must match for a state to load into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Guest memory in bytes (a multiple of 4 KiB).
    pub memory_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
}

/// The in-kernel interrupt controllers.
#[derive(Debug, Serialize, Deserialize)]
pub struct IrqchipState {
    /// Master 8259 PIC.
    pub pic_master: kvm_irqchip,
    /// Slave 8259 PIC.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
}

/// Complete saved state of a VM except its memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// Shape of the VM.
    pub config: VmConfig,
    /// Every vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// The KVM clock (KVM_GET_CLOCK).
    pub clock: kvm_clock_data,
    /// The in-kernel PIC and IOAPIC (KVM_GET_IRQCHIP).
    pub irqchip: IrqchipState,
    /// The COM1 UART.
    pub serial: SerialDeviceState,
    /// The virtio-blk devices, disk `i` at index `i` (their disks' contents are not part of the
    /// state: a restore is handed the disks as of the snapshot).
    pub disks: Vec<VirtioBlkState>,
    /// Set when the guest had stopped on its own when the state was saved: a VM restored from
    /// it is stopped the same way (it does not run on past its own end).
    pub stopped: Option<crate::VmExit>,
}

/// Errors reading or checking a saved state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The bytes are not a valid state file.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The state file could not be read or written.
    #[error(transparent)]
    File(#[from] FileError),
    /// The payload passed its checksum but does not decode.
    #[error("vm state: payload does not decode: {0}")]
    Decode(String),
    /// The state is internally inconsistent.
    #[error("vm state is inconsistent: {0}")]
    Inconsistent(String),
    /// The disks handed to a restore do not fit the saved devices.
    #[error("disks: {0}")]
    Disks(String),
    /// The state was saved from a VM of another shape.
    #[error("vm state is for {saved:?}, this VM is {this:?}")]
    ConfigMismatch {
        /// Shape recorded in the state.
        saved: VmConfig,
        /// Shape of the VM it was to load into.
        this: VmConfig,
    },
}

impl VmState {
    /// Encodes the state in [`VM_STATE_FORMAT`].
    pub fn to_bytes(&self) -> Vec<u8> {
        let payload =
            postcard::to_allocvec(self).expect("encoding plain data into a Vec cannot fail");
        VM_STATE_FORMAT.encode(&payload)
    }

    /// Decodes and checks a state in [`VM_STATE_FORMAT`].
    ///
    /// # Errors
    /// A [`StateError`] naming what is wrong: header, checksum, version, decoding or consistency.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        let decoded = VM_STATE_FORMAT.decode(bytes)?;
        Self::from_payload(decoded.payload)
    }

    fn from_payload(payload: &[u8]) -> Result<Self, StateError> {
        let state: Self =
            postcard::from_bytes(payload).map_err(|e| StateError::Decode(e.to_string()))?;
        state.check()?;
        Ok(state)
    }

    /// Writes the state to `path` atomically (temporary file, fsync, rename).
    ///
    /// # Errors
    /// The I/O error, naming the path.
    pub fn write_file(&self, path: &Path) -> Result<(), StateError> {
        let payload =
            postcard::to_allocvec(self).expect("encoding plain data into a Vec cannot fail");
        Ok(VM_STATE_FORMAT.write_file(path, &payload)?)
    }

    /// Reads and checks a state file.
    ///
    /// # Errors
    /// A [`StateError`] naming the file and what is wrong with it.
    pub fn read_file(path: &Path) -> Result<Self, StateError> {
        let payload = VM_STATE_FORMAT.read_file(path)?;
        Self::from_payload(&payload)
    }

    /// Checks that the state is consistent with its own configuration.
    ///
    /// # Errors
    /// [`StateError::Inconsistent`] saying what does not match.
    pub fn check(&self) -> Result<(), StateError> {
        let n = self.config.vcpus as usize;
        if n == 0 || self.vcpus.len() != n {
            return Err(StateError::Inconsistent(format!(
                "config says {} vCPUs, state holds {}",
                self.config.vcpus,
                self.vcpus.len()
            )));
        }
        if let Some((i, v)) = self
            .vcpus
            .iter()
            .enumerate()
            .find(|(i, v)| v.index as usize != *i)
        {
            return Err(StateError::Inconsistent(format!(
                "vCPU state {i} carries index {}",
                v.index
            )));
        }
        if self.disks.len() > MAX_DISKS {
            return Err(StateError::Inconsistent(format!(
                "{} disks, at most {MAX_DISKS} are supported",
                self.disks.len()
            )));
        }
        crate::vm::validate_config(&self.config)
            .map_err(|e| StateError::Inconsistent(format!("recorded configuration: {e}")))
    }
}
