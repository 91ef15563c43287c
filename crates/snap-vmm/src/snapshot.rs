//! Snapshots: one protocol, [`Vm::begin_snapshot`].
//!
//! A snapshot of a VM is made of two files: a **state file** (the vCPU and device state,
//! [`VmState`] in snap-core's checksummed format) and a **memory layer** (snap-mem's format):
//! full, holding every page with data, or a diff over the layer of the snapshot before it (its
//! parent) holding the pages dirtied since. Memory is restored from the **chain** of layers, the
//! full one first, each naming its parent by id and digest. Where the files live, what they are
//! called and how a chain is recorded are the caller's business (snapd keeps them in its store
//! and its catalog); this module only takes snapshots and restores them.
//!
//! Taking one is a transaction, a [`PendingSnapshot`]: [`Vm::begin_snapshot`] captures the
//! paused VM's state and the pages of its next layer (they stay pending in the VM) and seals its
//! disks; [`PendingSnapshot::copy_pages`] optionally copies the pages out so that the VM can
//! resume before anything is written; [`PendingSnapshot::write_memory`] and
//! [`PendingSnapshot::write_state`] write the files (each atomically); the caller publishes
//! them; [`PendingSnapshot::commit`] then marks the pages taken and bases the VM's memory on the
//! new layer. Abandoned instead ([`PendingSnapshot::abort`], or dropped), it undoes the seals and
//! leaves the pages pending, so the next snapshot holds them: a failed snapshot loses nothing.
//!
//! Disks are not stored in a snapshot: [`Vm::begin_snapshot`] flushes every disk while the VM is
//! paused (requests run synchronously at the guest's notify, so none is in flight), which makes
//! the disks hold exactly the snapshot's contents at that instant. Keeping that point in time is
//! the disk backend's business: with delta layers, begin_snapshot seals each disk's writable top
//! layer and opens a fresh one; with a raw file the caller copies it before resuming. A restore
//! is handed the disks as of the snapshot ([`VmOptions::disks`],
//! [`Vm::restore_in_place_with_disks`]).
//!
//! A restore reads the state file ([`VmState::read_file`]) and opens the chain
//! ([`LayerChain::open`]), then builds a new VM ([`Vm::restore`], or [`restore_from`] into a VM
//! prepared ahead, installing memory eagerly, lazily or prefetched) or reverts a paused one
//! ([`Vm::restore_in_place`]).

use std::path::{Path, PathBuf};

use snap_core::Id;
use snap_mem::dirty::PageBitmap;
use snap_mem::layer::{
    LayerChain, LayerInfo, LayerOptions, NewLayer, PageSource, ParentRef, write_layer,
};
use snap_mem::lazy::{CompleteHook, WindowSource};
use snap_mem::memory::GuestMemory;
use snap_mem::protect::{ProtectStats, WriteProtect};
use snap_mem::working_set::{WorkingSet, WorkingSetError};

use crate::error::VmError;
use crate::state::VmState;
#[cfg(doc)]
use crate::vm::VmOptions;
use crate::vm::{MemoryRestore, PreparedVm, RunState, Vm};

const PAGE_BYTES: usize = 4096;

/// Guest pages copied out of a paused VM: the source of a layer written after it resumed.
/// Pages outside the copy read as zero (the layer writer only stores the captured ones).
#[derive(Debug)]
struct CopiedPages {
    page_count: u64,
    /// Sorted page numbers.
    pages: Vec<u64>,
    /// Their bytes, in the same order.
    data: Vec<u8>,
}

impl CopiedPages {
    /// Bytes held.
    fn bytes(&self) -> usize {
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

/// Guest memory under write-protect, as of a live snapshot's pause: each page is read from
/// memory, replaced by the bytes kept for it if the guest wrote it since, and released.
struct LiveSource<'a> {
    memory: &'a GuestMemory,
    protect: &'a WriteProtect,
    done: std::sync::atomic::AtomicU64,
    progress: &'a (dyn Fn(u64) -> bool + Sync),
}

impl PageSource for LiveSource<'_> {
    fn page_count(&self) -> u64 {
        self.memory.page_count()
    }

    fn read_pages(&self, first_page: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.memory.read_pages(first_page, buf)?;
        self.protect
            .take(first_page, buf)
            .map_err(std::io::Error::other)?;
        let done = self
            .done
            .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed)
            + buf.len() as u64;
        if !(self.progress)(done) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "the snapshot was stopped",
            ));
        }
        Ok(())
    }
}

/// A live snapshot prepared while its VM runs ([`Vm::prepare_live_snapshot`]): the VM's memory
/// is registered for write-protect faults and the pages the snapshot will likely hold are
/// protected already, so that the pause ([`Vm::begin_snapshot_live`]) protects only what was
/// written since.
pub struct LiveSnapshot {
    protect: WriteProtect,
    /// For a full layer: the pages with data while the VM ran.
    resident: Option<PageBitmap>,
    /// Pages protected while the VM ran.
    pub protected_ahead: u64,
}

/// What a snapshot of a paused VM holds before anything is written: the VM's state and the
/// pages its memory layer must hold. The pages stay pending in the VM until
/// [`Captured::commit`]: dropping a capture (because writing it failed) loses nothing, and the
/// next snapshot holds them again.
#[derive(Debug)]
struct Captured {
    /// The vCPU and device state.
    state: VmState,
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
fn capture(
    vm: &Vm,
    parent: Option<&LayerInfo>,
    resident_before: Option<&PageBitmap>,
) -> Result<Captured, VmError> {
    // Pages a lazy restore has not installed yet read as zero through the memfd.
    vm.wait_memory_resident()?;
    let state = vm.save()?;
    // The disk half of the snapshot: everything the guest was told is written is on the disks
    // (and Vm::begin_snapshot then seals the layered ones).
    vm.flush_disks()?;
    let dirty = match vm.harvest_dirty() {
        Ok(d) => Some(d),
        Err(VmError::DirtyTrackingOff) => None,
        Err(e) => return Err(e),
    };
    let (pages, parent) = match parent {
        // Pages with data now: those that had data before the pause (a live snapshot found them
        // while the VM ran) and every page written since, which the dirty log holds. Scanning
        // memory for them instead would cost the pause time in proportion to memory.
        None => match (resident_before, &dirty) {
            (Some(before), Some(dirty)) => {
                let mut pages = before.clone();
                pages.union_with(dirty);
                (pages, None)
            }
            _ => (vm.memory().resident_pages()?, None),
        },
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
    fn pages(&self) -> u64 {
        self.pages.count()
    }

    /// Writes the memory layer (a new id) to `path` atomically, from the VM's memory.
    ///
    /// # Errors
    /// The layer writer's error; nothing is left at `path`.
    fn write_memory(
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
    fn copy_pages(&self, vm: &Vm) -> Result<CopiedPages, VmError> {
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
                    path: PathBuf::new(),
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
    fn write_memory_from(
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

    /// Writes the memory layer from the VM's memory under write-protect (see [`LiveSource`]),
    /// while the VM runs; `progress` is told the bytes taken so far.
    fn write_memory_live(
        &self,
        vm: &Vm,
        protect: &WriteProtect,
        path: &Path,
        options: &LayerOptions,
        progress: &(dyn Fn(u64) -> bool + Sync),
    ) -> Result<LayerInfo, VmError> {
        let layer = NewLayer {
            id: Id::random(),
            parent: self.parent,
            memory_bytes: vm.memory().size(),
        };
        let source = LiveSource {
            memory: vm.memory(),
            protect,
            done: std::sync::atomic::AtomicU64::new(0),
            progress,
        };
        Ok(write_layer(
            path,
            &layer,
            self.pages.iter(),
            &source,
            options,
        )?)
    }

    /// Marks the snapshot taken: the captured pages stop being pending and the VM's memory is
    /// now based on `layer`. Call once the snapshot is durable and published.
    fn commit(self, vm: &Vm, layer: &LayerInfo) {
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
    live: Option<WriteProtect>,
}

impl Vm {
    /// Begins a snapshot of this paused VM: captures its vCPU and device state and the pages of
    /// its next memory layer (a diff over `parent`, the layer the VM's memory is based on, or a
    /// full layer with `None`), and seals each disk with its fresh top at `disk_tops[i]` (one
    /// path per disk; none to leave the disks alone, e.g. raw files the caller copies).
    ///
    /// Waits first for a lazy restore to finish installing memory.
    ///
    /// # Errors
    /// [`VmError::NotPaused`]; [`VmError::DirtyTrackingOff`] for a diff of a VM without tracking;
    /// [`VmError::NotBasedOn`] if the VM's memory is not based on `parent`; the KVM error or a
    /// disk's flush error; [`VmError::Snapshot`] if `disk_tops` does not have one path per disk;
    /// [`VmError::Disk`] naming the disk that could not be sealed (the disks sealed before it are
    /// unsealed again, and the pages stay pending).
    pub fn begin_snapshot(
        &self,
        parent: Option<&LayerInfo>,
        disk_tops: &[PathBuf],
    ) -> Result<PendingSnapshot<'_>, VmError> {
        self.begin_snapshot_with(parent, disk_tops, None)
    }

    fn begin_snapshot_with(
        &self,
        parent: Option<&LayerInfo>,
        disk_tops: &[PathBuf],
        resident_before: Option<&PageBitmap>,
    ) -> Result<PendingSnapshot<'_>, VmError> {
        let disks = self.disks();
        if !disk_tops.is_empty() && disk_tops.len() != disks.len() {
            return Err(VmError::Snapshot {
                path: PathBuf::new(),
                problem: format!(
                    "{} new disk tops for {} disks: give one per disk, or none",
                    disk_tops.len(),
                    disks.len()
                ),
            });
        }
        let captured = capture(self, parent, resident_before)?;
        let mut pending = PendingSnapshot {
            vm: self,
            captured: Some(captured),
            sealed: Vec::new(),
            copy: None,
            live: None,
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

    /// Prepares a live snapshot of this running VM (its memory layer full with `full`, else a
    /// diff): registers its memory for write-protect faults and protects the pages the layer
    /// will likely hold (every page with data for a full layer, the pages dirtied so far for a
    /// diff), while the guest runs. Then pause the VM and call [`Vm::begin_snapshot_live`].
    /// Waits first for a lazy restore to finish installing memory.
    ///
    /// # Errors
    /// [`VmError::WriteProtect`] where write-protect is not available (the caller takes the
    /// copy path instead), or the KVM and lseek errors.
    pub fn prepare_live_snapshot(&self, full: bool) -> Result<LiveSnapshot, VmError> {
        self.wait_memory_resident()?;
        let protect = WriteProtect::start(self.memory())?;
        let likely = if full {
            self.memory().resident_pages()?
        } else {
            self.harvest_dirty_running()?
        };
        protect.protect(&likely)?;
        Ok(LiveSnapshot {
            protect,
            protected_ahead: likely.count(),
            resident: full.then_some(likely),
        })
    }

    /// As [`Vm::begin_snapshot`], for a live snapshot prepared with
    /// [`Vm::prepare_live_snapshot`]: also protects the layer's pages that are not protected
    /// yet. The VM may resume as soon as this returns; the layer is then written from memory
    /// under write-protect ([`PendingSnapshot::write_memory`]).
    ///
    /// # Errors
    /// As [`Vm::begin_snapshot`], or [`VmError::WriteProtect`].
    pub fn begin_snapshot_live(
        &self,
        live: LiveSnapshot,
        parent: Option<&LayerInfo>,
        disk_tops: &[PathBuf],
    ) -> Result<PendingSnapshot<'_>, VmError> {
        if live.resident.is_some() != parent.is_none() {
            return Err(VmError::Snapshot {
                path: PathBuf::new(),
                problem: "a live snapshot prepared for a full layer is begun as a diff, or the \
                          other way round"
                    .into(),
            });
        }
        let mut pending = self.begin_snapshot_with(parent, disk_tops, live.resident.as_ref())?;
        live.protect.freeze(&pending.captured().pages)?;
        pending.live = Some(live.protect);
        self.live_copy
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(pending)
    }
}

impl PendingSnapshot<'_> {
    /// Lifts every protection of a live snapshot (stopping its fault thread).
    fn end_live(&mut self) {
        if self.live.take().is_some() {
            self.vm
                .live_copy
                .store(false, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Whether the layer is written from memory under write-protect (the VM may run).
    #[must_use]
    pub fn is_live(&self) -> bool {
        self.live.is_some()
    }

    /// The write-protect counters of a live snapshot.
    #[must_use]
    pub fn live_stats(&self) -> Option<ProtectStats> {
        self.live.as_ref().map(WriteProtect::stats)
    }

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
        self.write_memory_with(path, options, &|_| true)
    }

    /// As [`PendingSnapshot::write_memory`], telling `progress` the bytes of pages taken so far
    /// (only for a live snapshot, whose copy runs beside the guest); once it answers false, the
    /// write stops and fails (nothing is left at `path`).
    ///
    /// # Errors
    /// As [`PendingSnapshot::write_memory`].
    pub fn write_memory_with(
        &self,
        path: &Path,
        options: &LayerOptions,
        progress: &(dyn Fn(u64) -> bool + Sync),
    ) -> Result<LayerInfo, VmError> {
        let captured = self.captured();
        match (&self.copy, &self.live) {
            (Some(copy), _) => captured.write_memory_from(copy, path, options),
            (None, Some(live)) => {
                captured.write_memory_live(self.vm, live, path, options, progress)
            }
            (None, None) if self.vm.run_state() == RunState::Running => Err(VmError::NotPaused),
            (None, None) => captured.write_memory(self.vm, path, options),
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
        self.end_live();
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
        // Every protection goes first: the guest must never wait on an abandoned snapshot.
        self.end_live();
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

/// Where a snapshot's recorded working set lives (see [`snap_mem::working_set`] and
/// [`restore_from`]).
#[derive(Debug, Clone, Copy)]
pub struct WorkingSetFile<'a> {
    /// The working set file.
    pub path: &'a Path,
    /// A file that exists exactly as long as the snapshot does (its state file). A recording
    /// ends long after the restore returns (once memory is complete), maybe after the snapshot
    /// was deleted: it then finds `owner` gone and removes what it wrote. So a delete that
    /// removes `owner` before `path` never leaves a working set behind, whenever the recording
    /// ends.
    pub owner: &'a Path,
}

/// Restores `state` and the memory of `chain` into `prepared`, installing memory as `mode` says.
/// `working_set` is where the caller keeps the snapshot's recorded working set: a prefetch
/// restore uses the one recorded there if it is usable (see [`read_working_set`]), and records
/// one there otherwise; other modes ignore it.
///
/// # Errors
/// As [`Vm::restore_prepared`] and [`Vm::restore_lazy_prepared`].
pub fn restore_from(
    state: &VmState,
    chain: LayerChain,
    working_set: WorkingSetFile<'_>,
    prepared: PreparedVm,
    mode: MemoryRestore,
) -> Result<Vm, VmError> {
    match mode {
        MemoryRestore::Eager => Vm::restore_prepared(prepared, state, &chain),
        MemoryRestore::Lazy => Vm::restore_lazy_prepared(prepared, state, chain, None, None),
        MemoryRestore::Prefetch => {
            let path = working_set.path.to_path_buf();
            let owner = working_set.owner.to_path_buf();
            let unit_pages = prepared
                .options()
                .restore_unit_bytes
                .map_or(chain.window_pages(), |b| b / 4096);
            let tag = chain.newest().info().digest.0;
            match read_working_set(&path, unit_pages, chain.memory_bytes(), tag) {
                Some(set) => Vm::restore_lazy_prepared(prepared, state, chain, Some(set), None),
                None => {
                    let deleted = move || {
                        std::fs::symlink_metadata(&owner)
                            .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
                    };
                    let record: CompleteHook = Box::new(
                        move |units: &[u64], source: &dyn WindowSource| {
                            if deleted() {
                                return;
                            }
                            if let Err(e) =
                                WorkingSet::record(&path, unit_pages, units, source, tag)
                            {
                                tracing::warn!(error = %e, "cannot store the recorded working set");
                            } else if deleted() {
                                // The snapshot was deleted while this was written: its delete
                                // may have looked for this file before it existed.
                                if let Err(e) = std::fs::remove_file(&path) {
                                    tracing::warn!(error = %e, path = %path.display(), "cannot remove the working set of a deleted snapshot");
                                }
                            }
                        },
                    );
                    Vm::restore_lazy_prepared(prepared, state, chain, None, Some(record))
                }
            }
        }
    }
}

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
