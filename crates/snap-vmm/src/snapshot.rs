//! Snapshots on disk: a directory per snapshot holding the VM state, the snapshot's memory layer
//! (full, or a diff over its parent's layer) and the path of its parent snapshot.
//!
//! A snapshot directory appears complete or not at all: everything is written into a temporary
//! directory beside it, synced, and renamed into place. The dirty pages a diff layer holds stay
//! pending in the VM until then, so a failed save loses none of them.
//!
//! Disks are not stored in the snapshot directory: [`save`] flushes every disk while the VM is
//! paused (requests run synchronously at the guest's notify, so none is in flight), which makes
//! the disks hold exactly the snapshot's contents at that instant. Keeping that point in time is
//! the disk backend's business: with delta layers, this is where the writable top layer is
//! sealed and a fresh one opened; with a raw file the caller copies it before resuming. A
//! restore is handed the disks as of the snapshot ([`VmOptions::disks`], [`revert_with_disks`]).

use std::fs::File;
use std::path::{Path, PathBuf};

use snap_core::{FileError, FormatSpec, Id};
use snap_mem::layer::{Layer, LayerChain, LayerInfo, LayerOptions, NewLayer, write_layer};
use snap_mem::lazy::CompleteHook;

use crate::error::VmError;
use crate::state::VmState;
use crate::vm::{MemoryRestore, Vm, VmOptions};

/// Name of the state file inside a snapshot directory.
pub const STATE_FILE: &str = "vm.state";
/// Name of the memory layer inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory.mlayer";
/// Name of the file naming the parent snapshot directory (absent for a full snapshot).
pub const PARENT_FILE: &str = "parent";
/// Longest chain of snapshots followed when opening one (a loop of parent links is refused).
pub const MAX_CHAIN: usize = 4096;

/// What [`save`] wrote.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// The memory layer it holds.
    pub layer: LayerInfo,
    /// Pages the layer was asked to hold (dirty pages for a diff, resident pages for a full one).
    pub pages: u64,
}

fn snapshot_err(dir: &Path, problem: impl Into<String>) -> VmError {
    VmError::Snapshot {
        dir: dir.to_path_buf(),
        problem: problem.into(),
    }
}

fn io_err(dir: &Path, what: &str, e: &std::io::Error) -> VmError {
    snapshot_err(dir, format!("{what}: {e}"))
}

/// Saves a paused VM as a new snapshot in `dir`, which must not exist yet.
///
/// With `parent: None` the memory layer is full (every page that holds data). With a parent
/// snapshot directory it is a diff layer over the parent's layer holding the pages dirtied since
/// the VM's memory last equalled the parent (the VM's [`Vm::memory_base`] must be the parent's
/// layer: the last snapshot taken of it or restored into it).
///
/// # Errors
/// [`VmError::NotPaused`]; [`VmError::Snapshot`] if `dir` exists or the parent is not the VM's
/// base; [`VmError::DirtyTrackingOff`] for a diff of a VM without tracking; the layer, state or
/// I/O error. On error nothing is left behind and the dirty pages stay pending.
pub fn save(
    vm: &Vm,
    dir: &Path,
    parent: Option<&Path>,
    options: &LayerOptions,
) -> Result<SnapshotInfo, VmError> {
    if dir.exists() {
        return Err(snapshot_err(dir, "already exists"));
    }
    // Pages a lazy restore has not installed yet read as zero through the memfd.
    vm.wait_memory_resident()?;
    let state = vm.save()?;
    // The disk half of the snapshot: everything the guest was told is written is on the disks.
    // (A layered disk backend seals its top layer here.)
    vm.flush_disks()?;
    let dirty = match vm.harvest_dirty() {
        Ok(d) => Some(d),
        Err(VmError::DirtyTrackingOff) => None,
        Err(e) => return Err(e),
    };
    let (pages, parent_ref, parent_dir) = match parent {
        None => (vm.memory().resident_pages()?, None, None),
        Some(pdir) => {
            let dirty = dirty.ok_or(VmError::DirtyTrackingOff)?;
            let parent_layer = Layer::open(pdir.join(MEMORY_FILE))?;
            let pid = parent_layer.info().id;
            if vm.memory_base() != Some(pid) {
                return Err(snapshot_err(
                    dir,
                    format!(
                        "the VM's memory is not based on parent {} (layer {pid}) but on {}: take a \
                         full snapshot, or restore the parent first",
                        pdir.display(),
                        vm.memory_base()
                            .map_or("no snapshot".into(), |b| format!("layer {b}"))
                    ),
                ));
            }
            let pdir = pdir
                .canonicalize()
                .map_err(|e| io_err(pdir, "resolving the parent", &e))?;
            (dirty, Some(parent_layer.info().as_parent()), Some(pdir))
        }
    };

    let tmp = temp_dir_for(dir)?;
    let written = (|| {
        let layer = NewLayer {
            id: Id::random(),
            parent: parent_ref,
            memory_bytes: vm.memory().size(),
        };
        let info = write_layer(
            &tmp.join(MEMORY_FILE),
            &layer,
            pages.iter(),
            vm.memory(),
            options,
        )?;
        state.write_file(&tmp.join(STATE_FILE))?;
        if let Some(pdir) = &parent_dir {
            let text = pdir
                .to_str()
                .ok_or_else(|| snapshot_err(dir, "the parent's path is not UTF-8"))?;
            std::fs::write(tmp.join(PARENT_FILE), format!("{text}\n"))
                .and_then(|()| File::open(tmp.join(PARENT_FILE))?.sync_all())
                .map_err(|e| io_err(dir, "writing the parent link", &e))?;
        }
        sync_dir(&tmp).map_err(|e| io_err(dir, "syncing", &e))?;
        std::fs::rename(&tmp, dir).map_err(|e| io_err(dir, "publishing", &e))?;
        if let Some(up) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(up).map_err(|e| io_err(dir, "syncing its directory", &e))?;
        }
        Ok(info)
    })();
    match written {
        Ok(layer) => {
            vm.commit_dirty();
            vm.set_memory_base(Some(layer.id));
            Ok(SnapshotInfo {
                dir: dir.to_path_buf(),
                layer,
                pages: pages.count(),
            })
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

fn temp_dir_for(dir: &Path) -> Result<PathBuf, VmError> {
    let name = dir
        .file_name()
        .ok_or_else(|| snapshot_err(dir, "has no directory name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", Id::random()));
    let tmp = dir.with_file_name(tmp_name);
    std::fs::create_dir(&tmp).map_err(|e| io_err(dir, "creating the snapshot directory", &e))?;
    Ok(tmp)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The snapshot directories of the chain ending at `dir`, oldest (the full snapshot) first.
///
/// # Errors
/// [`VmError::Snapshot`] for an unreadable parent link or a chain longer than [`MAX_CHAIN`].
pub fn chain_dirs(dir: &Path) -> Result<Vec<PathBuf>, VmError> {
    let mut dirs = vec![dir.to_path_buf()];
    loop {
        let last = dirs.last().expect("never empty").clone();
        let link = last.join(PARENT_FILE);
        let text = match std::fs::read_to_string(&link) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
            Err(e) => return Err(io_err(&last, "reading the parent link", &e)),
        };
        if dirs.len() >= MAX_CHAIN {
            return Err(snapshot_err(
                dir,
                format!("chain longer than {MAX_CHAIN} snapshots (a loop?)"),
            ));
        }
        dirs.push(PathBuf::from(text.trim_end_matches('\n')));
    }
    dirs.reverse();
    Ok(dirs)
}

/// Opens a snapshot: reads and checks its state, and opens its chain of memory layers, checking
/// each layer's header and index and that each names its parent by id and digest.
///
/// # Errors
/// The [`VmError::State`] or [`VmError::Layer`] naming the file and what is wrong.
pub fn open(dir: &Path) -> Result<(VmState, LayerChain), VmError> {
    let state = VmState::read_file(&dir.join(STATE_FILE))?;
    let layers: Vec<PathBuf> = chain_dirs(dir)?
        .iter()
        .map(|d| d.join(MEMORY_FILE))
        .collect();
    let chain = LayerChain::open(&layers)?;
    Ok((state, chain))
}

/// Builds a new, paused VM from the snapshot in `dir`.
///
/// # Errors
/// As [`open`] and [`Vm::restore`].
pub fn restore(dir: &Path) -> Result<Vm, VmError> {
    restore_with(dir, &VmOptions::default())
}

/// As [`restore`], with `options`.
///
/// # Errors
/// As [`open`] and [`Vm::restore_with`].
pub fn restore_with(dir: &Path, options: &VmOptions) -> Result<Vm, VmError> {
    let (state, chain) = open(dir)?;
    match options.memory_restore {
        MemoryRestore::Eager => Vm::restore_with(&state, &chain, options),
        MemoryRestore::Lazy => Vm::restore_lazy(&state, chain, options),
        MemoryRestore::Prefetch => {
            let path = dir.join(WORKING_SET_FILE);
            let unit_pages = options
                .restore_unit_bytes
                .map_or(chain.window_pages(), |b| b / 4096);
            match read_working_set(&path, unit_pages) {
                Some(units) => Vm::restore_lazy_with(&state, chain, options, units, None),
                None => {
                    let record: CompleteHook = Box::new(move |units: &[u64]| {
                        if let Err(e) = write_working_set(&path, unit_pages, units) {
                            tracing::warn!(error = %e, "cannot store the recorded working set");
                        }
                    });
                    Vm::restore_lazy_with(&state, chain, options, Vec::new(), Some(record))
                }
            }
        }
    }
}

/// Name of the file holding a snapshot's recorded working set (written by the first
/// [`MemoryRestore::Prefetch`] restore of it).
pub const WORKING_SET_FILE: &str = "working-set";

/// File format of a recorded working set: the restore unit in pages, then the units the guest
/// faulted on, in order (all u64, little endian).
pub const WORKING_SET_FORMAT: FormatSpec = FormatSpec {
    name: "working set",
    magic: *b"SNAPWSET",
    version: 1,
    min_version: 1,
    max_payload: 64 << 20,
};

fn write_working_set(path: &Path, unit_pages: u64, units: &[u64]) -> Result<(), FileError> {
    let payload: Vec<u8> = std::iter::once(unit_pages)
        .chain(units.iter().copied())
        .flat_map(u64::to_le_bytes)
        .collect();
    WORKING_SET_FORMAT.write_file(path, &payload)
}

/// The recorded working set of a snapshot (restore units, in fault order), if there is a usable
/// one: a missing file, a damaged one or one recorded with another unit is ignored (it is only a
/// hint).
pub fn read_working_set(path: &Path, unit_pages: u64) -> Option<Vec<u64>> {
    let payload = match WORKING_SET_FORMAT.read_file(path) {
        Ok(p) => p,
        Err(e) => {
            if e.io_error()
                .is_none_or(|io| io.kind() != std::io::ErrorKind::NotFound)
            {
                tracing::warn!(error = %e, "ignoring the recorded working set");
            }
            return None;
        }
    };
    let mut words = payload
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")));
    if payload.len() % 8 != 0 || words.next() != Some(unit_pages) {
        tracing::warn!(path = %path.display(), "ignoring a working set recorded for another layout");
        return None;
    }
    Some(words.collect())
}

/// Reverts `vm` (paused) to the snapshot in `dir`; it stays paused.
///
/// # Errors
/// As [`open`] and [`Vm::restore_in_place`].
pub fn revert(vm: &Vm, dir: &Path) -> Result<(), VmError> {
    let (state, chain) = open(dir)?;
    vm.restore_in_place(&state, &chain)
}

/// As [`revert`], for a snapshot of a VM with disks: `disks` are the disks as of the snapshot,
/// and the VM's devices serve them from then on.
///
/// # Errors
/// As [`open`] and [`Vm::restore_in_place_with_disks`].
pub fn revert_with_disks(
    vm: &Vm,
    dir: &Path,
    disks: &[std::sync::Arc<dyn crate::block::BlockBackend>],
) -> Result<(), VmError> {
    let (state, chain) = open(dir)?;
    vm.restore_in_place_with_disks(&state, &chain, disks)
}
