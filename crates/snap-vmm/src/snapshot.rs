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

use snap_core::Id;
use snap_mem::dirty::PageBitmap;
use snap_mem::layer::{
    Layer, LayerChain, LayerInfo, LayerOptions, NewLayer, PageSource, ParentRef, write_layer,
};
use snap_mem::lazy::{CompleteHook, WindowSource};
use snap_mem::working_set::{WorkingSet, WorkingSetError};

use crate::error::VmError;
use crate::state::VmState;
use crate::vm::{MemoryRestore, PreparedVm, RunState, Vm, VmOptions};

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
    let (parent_info, parent_dir) = match parent {
        None => (None, None),
        Some(pdir) => {
            let layer = Layer::open(pdir.join(MEMORY_FILE))?;
            let pdir = pdir
                .canonicalize()
                .map_err(|e| io_err(pdir, "resolving the parent", &e))?;
            (Some(*layer.info()), Some(pdir))
        }
    };
    let captured = capture(vm, parent_info.as_ref()).map_err(|e| match e {
        e @ VmError::NotBasedOn { .. } => snapshot_err(dir, e.to_string()),
        e => e,
    })?;

    let tmp = temp_dir_for(dir)?;
    let written = (|| {
        let info = captured.write_memory(vm, &tmp.join(MEMORY_FILE), options)?;
        captured.state.write_file(&tmp.join(STATE_FILE))?;
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
            let pages = captured.pages();
            captured.commit(vm, &layer);
            Ok(SnapshotInfo {
                dir: dir.to_path_buf(),
                layer,
                pages,
            })
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

const PAGE_BYTES: usize = 4096;

/// Guest pages copied out of a paused VM: the source of a layer written after it resumed.
/// Pages outside the copy read as zero (the layer writer only stores the captured ones).
#[derive(Debug)]
pub struct CopiedPages {
    page_count: u64,
    /// Sorted page numbers.
    pages: Vec<u64>,
    /// Their bytes, in the same order.
    data: Vec<u8>,
}

impl CopiedPages {
    /// Bytes held.
    #[must_use]
    pub fn bytes(&self) -> usize {
        self.data.len()
    }
}

impl PageSource for CopiedPages {
    fn page_count(&self) -> u64 {
        self.page_count
    }

    fn read_pages(&self, first_page: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let n = (buf.len() / PAGE_BYTES) as u64;
        if first_page
            .checked_add(n)
            .is_none_or(|end| end > self.page_count)
        {
            return Err(std::io::Error::other(format!(
                "pages {first_page}+{n} beyond {} pages",
                self.page_count
            )));
        }
        let mut at = self.pages.partition_point(|&p| p < first_page);
        for (k, out) in buf.chunks_mut(PAGE_BYTES).enumerate() {
            let page = first_page + k as u64;
            if self.pages.get(at) == Some(&page) {
                out.copy_from_slice(&self.data[at * PAGE_BYTES..(at + 1) * PAGE_BYTES]);
                at += 1;
            } else {
                out.fill(0);
            }
        }
        Ok(())
    }
}

/// What a snapshot of a paused VM holds before anything is written: the VM's state and the
/// pages its memory layer must hold. The pages stay pending in the VM until
/// [`Captured::commit`]: dropping a capture (because writing it failed) loses nothing, and the
/// next snapshot holds them again.
#[derive(Debug)]
pub struct Captured {
    /// The vCPU and device state.
    pub state: VmState,
    pages: PageBitmap,
    parent: Option<ParentRef>,
}

/// Captures a paused VM for a snapshot whose memory layer goes over `parent` (a diff of the
/// pages dirtied since the VM's memory last equalled that layer), or is full (`None`: every page
/// that holds data). Waits first for a lazy restore to finish installing memory.
///
/// # Errors
/// [`VmError::NotPaused`]; [`VmError::DirtyTrackingOff`] for a diff of a VM without tracking;
/// [`VmError::NotBasedOn`] if the VM's memory is not based on `parent`; the KVM error.
pub fn capture(vm: &Vm, parent: Option<&LayerInfo>) -> Result<Captured, VmError> {
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
    let (pages, parent) = match parent {
        None => (vm.memory().resident_pages()?, None),
        Some(p) => {
            let dirty = dirty.ok_or(VmError::DirtyTrackingOff)?;
            if vm.memory_base() != Some(p.id) {
                return Err(VmError::NotBasedOn {
                    parent: p.id,
                    base: vm.memory_base(),
                });
            }
            (dirty, Some(p.as_parent()))
        }
    };
    Ok(Captured {
        state,
        pages,
        parent,
    })
}

impl Captured {
    /// Pages the memory layer holds (dirty pages for a diff, resident pages for a full one).
    #[must_use]
    pub fn pages(&self) -> u64 {
        self.pages.count()
    }

    /// Writes the memory layer (a new id) to `path` atomically, from the VM's memory.
    ///
    /// # Errors
    /// The layer writer's error; nothing is left at `path`.
    pub fn write_memory(
        &self,
        vm: &Vm,
        path: &Path,
        options: &LayerOptions,
    ) -> Result<LayerInfo, VmError> {
        let layer = NewLayer {
            id: Id::random(),
            parent: self.parent,
            memory_bytes: vm.memory().size(),
        };
        Ok(write_layer(
            path,
            &layer,
            self.pages.iter(),
            vm.memory(),
            options,
        )?)
    }

    /// Copies the captured pages out of the VM's memory (call it while the VM is still paused),
    /// so that the VM can resume before the layer is written: the layer is then written from the
    /// copy with [`Captured::write_memory_from`]. Costs a memory copy of the pages.
    ///
    /// # Errors
    /// The read error.
    pub fn copy_pages(&self, vm: &Vm) -> Result<CopiedPages, VmError> {
        let pages: Vec<u64> = self.pages.iter().collect();
        let mut data = vec![0u8; pages.len() * PAGE_BYTES];
        let mut i = 0;
        while i < pages.len() {
            let mut j = i + 1;
            while j < pages.len() && pages[j] == pages[j - 1] + 1 {
                j += 1;
            }
            vm.memory()
                .read_pages(pages[i], &mut data[i * PAGE_BYTES..j * PAGE_BYTES])
                .map_err(|e| VmError::Snapshot {
                    dir: PathBuf::new(),
                    problem: format!(
                        "copying guest pages {}..{}: {e}",
                        pages[i],
                        pages[j - 1] + 1
                    ),
                })?;
            i = j;
        }
        Ok(CopiedPages {
            page_count: vm.memory().size() / PAGE_BYTES as u64,
            pages,
            data,
        })
    }

    /// As [`Captured::write_memory`], from `source` (a [`CopiedPages`] taken while the VM was
    /// paused) instead of the VM's memory.
    ///
    /// # Errors
    /// The layer writer's error; nothing is left at `path`.
    pub fn write_memory_from(
        &self,
        source: &CopiedPages,
        path: &Path,
        options: &LayerOptions,
    ) -> Result<LayerInfo, VmError> {
        let layer = NewLayer {
            id: Id::random(),
            parent: self.parent,
            memory_bytes: source.page_count * PAGE_BYTES as u64,
        };
        Ok(write_layer(
            path,
            &layer,
            self.pages.iter(),
            source,
            options,
        )?)
    }

    /// Marks the snapshot taken: the captured pages stop being pending and the VM's memory is
    /// now based on `layer`. Call once the snapshot is durable and published.
    pub fn commit(self, vm: &Vm, layer: &LayerInfo) {
        vm.commit_dirty();
        vm.set_memory_base(Some(layer.id));
    }
}

/// A disk that a [`PendingSnapshot`] sealed: the layer holding the disk as of the snapshot, and
/// the fresh top the VM writes into since.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedDisk {
    /// The disk's index in the VM.
    pub index: usize,
    /// The frozen layer (the snapshot's).
    pub sealed: Id,
    /// The fresh top.
    pub top: Id,
    /// The fresh top's file.
    pub top_path: PathBuf,
}

/// What became of a sealed disk when its snapshot was abandoned.
#[derive(Debug)]
pub enum Unsealed {
    /// The seal is undone: the old top takes writes again; `dropped` (the fresh top's file) is no
    /// longer used and can be deleted.
    Undone {
        /// The disk.
        index: usize,
        /// The file of the top that was dropped.
        dropped: PathBuf,
    },
    /// The VM already wrote into the fresh top (it had resumed), so the seal stands: the sealed
    /// layer stays in the disk's chain under the fresh top, which must be kept.
    Kept(SealedDisk),
}

/// A snapshot of a paused VM being taken, as one transaction: it holds the VM's state, the pages
/// its memory layer will hold (they stay pending in the VM), and the disks it sealed. Write it
/// ([`PendingSnapshot::write_memory`], [`PendingSnapshot::write_state`]), publish what was
/// written wherever the caller keeps snapshots, then [`PendingSnapshot::commit`]. Dropped or
/// [aborted](PendingSnapshot::abort) instead, it undoes the seals (where the VM has not written
/// into the fresh tops yet) and leaves the pages pending, so the next snapshot holds them again:
/// nothing of the VM is lost.
pub struct PendingSnapshot<'vm> {
    vm: &'vm Vm,
    captured: Option<Captured>,
    sealed: Vec<SealedDisk>,
    copy: Option<CopiedPages>,
}

impl Vm {
    /// Begins a snapshot of this paused VM: captures its vCPU and device state and the pages of
    /// its next memory layer (a diff over `parent`, the layer the VM's memory is based on, or a
    /// full layer with `None`), and seals each disk with its fresh top at `disk_tops[i]` (one
    /// path per disk; none to leave the disks alone, e.g. raw files the caller copies).
    ///
    /// # Errors
    /// As [`capture`]; [`VmError::Snapshot`] if `disk_tops` does not have one path per disk;
    /// [`VmError::Disk`] naming the disk that could not be sealed (the disks sealed before it are
    /// unsealed again, and the pages stay pending).
    pub fn begin_snapshot(
        &self,
        parent: Option<&LayerInfo>,
        disk_tops: &[PathBuf],
    ) -> Result<PendingSnapshot<'_>, VmError> {
        let disks = self.disks();
        if !disk_tops.is_empty() && disk_tops.len() != disks.len() {
            return Err(VmError::Snapshot {
                dir: PathBuf::new(),
                problem: format!(
                    "{} new disk tops for {} disks: give one per disk, or none",
                    disk_tops.len(),
                    disks.len()
                ),
            });
        }
        let captured = capture(self, parent)?;
        let mut pending = PendingSnapshot {
            vm: self,
            captured: Some(captured),
            sealed: Vec::new(),
            copy: None,
        };
        for (index, (disk, top_path)) in disks.iter().zip(disk_tops).enumerate() {
            let s = disk
                .seal(top_path)
                .map_err(|source| VmError::Disk { index, source })?;
            pending.sealed.push(SealedDisk {
                index,
                sealed: s.sealed,
                top: s.top,
                top_path: top_path.clone(),
            });
        }
        Ok(pending)
    }
}

impl PendingSnapshot<'_> {
    /// The captured vCPU and device state.
    #[must_use]
    pub fn state(&self) -> &VmState {
        &self.captured().state
    }

    /// Pages the memory layer holds (dirty pages for a diff, resident pages for a full one).
    #[must_use]
    pub fn pages(&self) -> u64 {
        self.captured().pages()
    }

    /// The disks sealed, in disk order.
    #[must_use]
    pub fn sealed(&self) -> &[SealedDisk] {
        &self.sealed
    }

    fn captured(&self) -> &Captured {
        self.captured
            .as_ref()
            .expect("present until commit or abort consume the snapshot")
    }

    /// Copies the layer's pages out of guest memory (the VM must still be paused), so that the
    /// VM can resume before the layer is written; returns the bytes copied.
    ///
    /// # Errors
    /// The read error.
    pub fn copy_pages(&mut self) -> Result<usize, VmError> {
        let copy = self.captured().copy_pages(self.vm)?;
        let bytes = copy.bytes();
        self.copy = Some(copy);
        Ok(bytes)
    }

    /// Writes the memory layer (a new layer id) to `path` atomically: from the copy if
    /// [`copy_pages`](PendingSnapshot::copy_pages) made one, else from guest memory, which then
    /// must not have changed since the snapshot began (the VM still paused).
    ///
    /// # Errors
    /// [`VmError::NotPaused`] without a copy of a VM that runs again; the layer writer's error
    /// (nothing is left at `path`).
    pub fn write_memory(&self, path: &Path, options: &LayerOptions) -> Result<LayerInfo, VmError> {
        let captured = self.captured();
        match &self.copy {
            Some(copy) => captured.write_memory_from(copy, path, options),
            None if self.vm.run_state() == RunState::Running => Err(VmError::NotPaused),
            None => captured.write_memory(self.vm, path, options),
        }
    }

    /// Writes the captured state to `path` atomically (snap-core's format, checksummed).
    ///
    /// # Errors
    /// The I/O error naming the file.
    pub fn write_state(&self, path: &Path) -> Result<(), VmError> {
        Ok(self.captured().state.write_file(path)?)
    }

    /// Marks the snapshot taken, once what was written is durable and published: its pages stop
    /// being pending, the VM's memory is based on `layer` from now on, and the seals stand.
    pub fn commit(mut self, layer: &LayerInfo) {
        if let Some(c) = self.captured.take() {
            c.commit(self.vm, layer);
        }
        self.sealed.clear();
    }

    /// Abandons the snapshot: each sealed disk is unsealed where the VM has not written into its
    /// fresh top yet, or keeps the seal (its fresh top must be kept then); the pages stay
    /// pending. Says what became of each disk.
    pub fn abort(mut self) -> Vec<Unsealed> {
        self.undo()
    }

    fn undo(&mut self) -> Vec<Unsealed> {
        self.captured = None;
        let disks = self.vm.disks();
        std::mem::take(&mut self.sealed)
            .into_iter()
            .rev()
            .map(|s| match disks[s.index].undo_seal() {
                Ok(dropped) => Unsealed::Undone {
                    index: s.index,
                    dropped,
                },
                Err(e) => {
                    tracing::info!(disk = s.index, reason = %e, "the seal of an abandoned snapshot stands");
                    Unsealed::Kept(s)
                }
            })
            .collect()
    }
}

impl Drop for PendingSnapshot<'_> {
    fn drop(&mut self) {
        if self.captured.is_some() {
            for u in self.undo() {
                if let Unsealed::Kept(s) = u {
                    tracing::warn!(
                        disk = s.index,
                        top = %s.top_path.display(),
                        "an abandoned snapshot left a disk sealed under its fresh top"
                    );
                }
            }
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
    state.check()?;
    let prepared = Vm::prepare(state.config, options)?;
    let working_set = dir.join(WORKING_SET_FILE);
    restore_from(
        &state,
        chain,
        &working_set,
        prepared,
        options.memory_restore,
    )
}

/// As [`restore_with`], into a VM prepared ahead ([`Vm::prepare`], with the snapshot's shape):
/// the restore then only loads state, and its cost does not grow with memory size. `mode` says
/// how memory is installed; the restore unit is the prepared VM's.
///
/// # Errors
/// As [`restore_with`]; [`VmError::State`] if `prepared` has another shape than the snapshot.
pub fn restore_into(dir: &Path, prepared: PreparedVm, mode: MemoryRestore) -> Result<Vm, VmError> {
    let (state, chain) = open(dir)?;
    restore_from(&state, chain, &dir.join(WORKING_SET_FILE), prepared, mode)
}

/// Restores `state` and the memory of `chain` into `prepared`, installing memory as `mode` says.
/// A prefetch restore uses the working set recorded at `working_set` if there is a usable one,
/// and records one there otherwise (see [`read_working_set`]).
///
/// # Errors
/// As [`Vm::restore_prepared`] and [`Vm::restore_lazy_prepared`].
pub fn restore_from(
    state: &VmState,
    chain: LayerChain,
    working_set: &Path,
    prepared: PreparedVm,
    mode: MemoryRestore,
) -> Result<Vm, VmError> {
    match mode {
        MemoryRestore::Eager => Vm::restore_prepared(prepared, state, &chain),
        MemoryRestore::Lazy => Vm::restore_lazy_prepared(prepared, state, chain, None, None),
        MemoryRestore::Prefetch => {
            let path = working_set.to_path_buf();
            let unit_pages = prepared
                .options()
                .restore_unit_bytes
                .map_or(chain.window_pages(), |b| b / 4096);
            let tag = chain.newest().info().digest.0;
            match read_working_set(&path, unit_pages, chain.memory_bytes(), tag) {
                Some(set) => Vm::restore_lazy_prepared(prepared, state, chain, Some(set), None),
                None => {
                    let record: CompleteHook =
                        Box::new(move |units: &[u64], source: &dyn WindowSource| {
                            if let Err(e) =
                                WorkingSet::record(&path, unit_pages, units, source, tag)
                            {
                                tracing::warn!(error = %e, "cannot store the recorded working set");
                            }
                        });
                    Vm::restore_lazy_prepared(prepared, state, chain, None, Some(record))
                }
            }
        }
    }
}

/// Name of the file holding a snapshot's recorded working set (written by the first
/// [`MemoryRestore::Prefetch`] restore of it; see [`snap_mem::working_set`]).
pub const WORKING_SET_FILE: &str = "working-set";

/// The recorded working set of a snapshot whose newest layer has digest `tag`, if there is a
/// usable one: a missing file, a damaged one, or one recorded with another unit or for other
/// memory is ignored (it is only a hint, and the next prefetch restore records it again).
pub fn read_working_set(
    path: &Path,
    unit_pages: u64,
    memory_bytes: u64,
    tag: [u8; 32],
) -> Option<WorkingSet> {
    match WorkingSet::open(path, unit_pages, memory_bytes, tag) {
        Ok(set) => Some(set),
        Err(WorkingSetError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "ignoring the recorded working set");
            None
        }
    }
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
