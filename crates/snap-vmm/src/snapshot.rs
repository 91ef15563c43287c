//! A snapshot on disk: a directory holding the VM state file and the full memory image.

use std::path::Path;

use crate::error::VmError;
use crate::image::{MemoryImage, write_memory_image};
use crate::state::VmState;
use crate::vm::Vm;

/// Name of the state file inside a snapshot directory.
pub const STATE_FILE: &str = "vm.state";
/// Name of the memory image inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory.img";

/// Saves a paused VM into `dir` (created if missing): state and memory, each written atomically.
///
/// # Errors
/// [`VmError::NotPaused`] if the VM runs; the I/O or KVM error otherwise.
pub fn save(vm: &Vm, dir: &Path) -> Result<VmState, VmError> {
    let state = vm.save()?;
    std::fs::create_dir_all(dir).map_err(|source| crate::image::ImageError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    write_memory_image(vm.memory(), &dir.join(MEMORY_FILE))?;
    state.write_file(&dir.join(STATE_FILE))?;
    Ok(state)
}

/// Opens a snapshot directory: reads and checks the state, opens and checks the image header.
///
/// # Errors
/// The [`VmError::State`] or [`VmError::Image`] naming the file and what is wrong.
pub fn open(dir: &Path) -> Result<(VmState, MemoryImage), VmError> {
    let state = VmState::read_file(&dir.join(STATE_FILE))?;
    let image = MemoryImage::open(&dir.join(MEMORY_FILE))?;
    image.expect_size(state.config.memory_bytes)?;
    Ok((state, image))
}

/// Builds a new, paused VM from the snapshot in `dir`.
///
/// # Errors
/// As [`open`] and [`Vm::restore`].
pub fn restore(dir: &Path) -> Result<Vm, VmError> {
    let (state, image) = open(dir)?;
    Vm::restore(&state, &image)
}

/// Reverts `vm` (paused) to the snapshot in `dir`; it stays paused.
///
/// # Errors
/// As [`open`] and [`Vm::restore_in_place`].
pub fn revert(vm: &Vm, dir: &Path) -> Result<(), VmError> {
    let (state, image) = open(dir)?;
    vm.restore_in_place(&state, &image)
}
