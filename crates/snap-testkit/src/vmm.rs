//! VMs running the test guest, for the VMM's tests, and snapshots of them written to plain files
//! ([`Snapshots`], [`Saved`]) through the VMM's snapshot API alone.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use snap_mem::layer::LayerInfo;
use snap_vmm::{
    BlockBackend, LayerChain, LayerOptions, MemoryRestore, PreparedVm, RunState, TestGuest, Vm,
    VmConfig, VmError, VmExit, VmOptions, VmState, snapshot,
};

use crate::TIMEOUT;

/// A small VM shape and guest that runs in well under a second here.
pub fn small(vcpus: u32) -> (VmConfig, TestGuest) {
    (
        VmConfig {
            memory_bytes: 32 << 20,
            vcpus,
        },
        TestGuest {
            seed: 0x5eed + u64::from(vcpus),
            working_set_pages: 512,
            mutations_per_tick: 24,
            ticks: 30,
            ..TestGuest::default()
        },
    )
}

/// Creates and starts a VM running the test guest.
pub fn boot(config: VmConfig, guest: &TestGuest) -> Vm {
    let vm = Vm::create(config, &guest.boot_image(&config).unwrap()).unwrap();
    vm.resume().unwrap();
    vm
}

/// Runs a VM until the guest finishes, asserting a clean exit (a VM already running, or whose
/// guest has already finished, is only waited for).
pub fn run_to_end(vm: &Vm) {
    if vm.run_state() == RunState::Paused {
        vm.resume().unwrap();
    }
    assert_eq!(vm.wait_for_exit(TIMEOUT).unwrap(), VmExit::Finished(0));
}

/// Waits for `lines` lines of output and pauses; returns the output length at the pause.
pub fn pause_after(vm: &Vm, lines: usize) -> usize {
    assert!(
        vm.serial_output().wait_for_lines(lines, TIMEOUT),
        "guest did not print {lines} lines"
    );
    vm.pause();
    vm.serial_output().len()
}

/// Asserts two memory images are identical, naming the first differing page.
pub fn assert_same_memory(a: &[u8], b: &[u8]) {
    assert_eq!(a.len(), b.len(), "memory sizes differ");
    if let Some(page) = a.chunks(4096).zip(b.chunks(4096)).position(|(x, y)| x != y) {
        panic!(
            "guest memory differs, first at page {page} (gpa {:#x})",
            page * 4096
        );
    }
}

/// Asserts the output of a full run of `guest`: one tick line per tick, then the done line.
pub fn assert_complete_output(out: &str, guest: &TestGuest) {
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len() as u64, guest.ticks + 1, "output:\n{out}");
    for (i, l) in lines[..lines.len() - 1].iter().enumerate() {
        assert!(
            l.starts_with(&format!("tick {} hash ", i + 1)),
            "line {i}: {l}"
        );
    }
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with(&format!("done {} hash ", guest.ticks))
    );
}

/// Snapshots written into a temporary directory of their own, removed with this value. Each is a
/// memory layer (`<n>.mlayer`: full, or a diff over its parent's layer) and a state file
/// (`<n>.state`), taken with [`Vm::begin_snapshot`], [`PendingSnapshot::write_memory`],
/// [`PendingSnapshot::write_state`] and [`PendingSnapshot::commit`]; the returned [`Saved`]
/// records its chain of layers.
///
/// [`PendingSnapshot::write_memory`]: snapshot::PendingSnapshot::write_memory
/// [`PendingSnapshot::write_state`]: snapshot::PendingSnapshot::write_state
/// [`PendingSnapshot::commit`]: snapshot::PendingSnapshot::commit
#[derive(Debug)]
pub struct Snapshots {
    dir: tempfile::TempDir,
    taken: Cell<u32>,
}

impl Default for Snapshots {
    fn default() -> Self {
        Self::new()
    }
}

impl Snapshots {
    /// An empty temporary directory for snapshots.
    ///
    /// # Panics
    /// If the directory cannot be created.
    #[must_use]
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("a temporary directory for snapshots"),
            taken: Cell::new(0),
        }
    }

    /// The directory the snapshots are written into.
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Takes a snapshot of a paused VM: a full memory layer without `parent`, or a diff over
    /// `parent`'s layer (which must be the VM's memory base: the last snapshot taken of it or
    /// restored into it). The VM's disks are flushed, not sealed.
    ///
    /// # Errors
    /// As [`Vm::begin_snapshot`] and the writes. A snapshot that fails leaves no file behind and
    /// its pages pending in the VM.
    pub fn take(
        &self,
        vm: &Vm,
        parent: Option<&Saved>,
        options: &LayerOptions,
    ) -> Result<Saved, VmError> {
        let pending = vm.begin_snapshot(parent.map(|p| &p.layer), &[])?;
        Ok(self.write(pending, parent, options, &|_| true)?.0)
    }

    /// Takes a live snapshot of a running VM: prepares it while the guest runs
    /// ([`Vm::prepare_live_snapshot`]), pauses, begins it, resumes the guest at once and writes
    /// the layer beside it, waiting `pace` after each run of pages read (to let the guest write
    /// pages before the writer gets there). Returns the snapshot, the output length at its
    /// pause, and the write-protect counters.
    ///
    /// # Errors
    /// As [`Vm::prepare_live_snapshot`], [`Vm::begin_snapshot_live`] and the writes.
    pub fn take_live(
        &self,
        vm: &Vm,
        parent: Option<&Saved>,
        options: &LayerOptions,
        pace: std::time::Duration,
    ) -> Result<(Saved, usize, snap_mem::protect::ProtectStats), VmError> {
        let live = vm.prepare_live_snapshot(parent.is_none())?;
        vm.pause();
        let cut = vm.serial_output().len();
        let pending = vm.begin_snapshot_live(live, parent.map(|p| &p.layer), &[]);
        vm.resume()?;
        let pending = pending?;
        let progress = |_: u64| {
            std::thread::sleep(pace);
            true
        };
        let (saved, stats) = self.write(pending, parent, options, &progress)?;
        Ok((saved, cut, stats))
    }

    /// Writes a begun snapshot's layer and state as the next files here, then commits it;
    /// returns it with a live snapshot's write-protect counters. On a failure, removes what was
    /// written (dropping `pending` leaves the pages pending).
    fn write(
        &self,
        pending: snapshot::PendingSnapshot<'_>,
        parent: Option<&Saved>,
        options: &LayerOptions,
        progress: &(dyn Fn(u64) -> bool + Sync),
    ) -> Result<(Saved, snap_mem::protect::ProtectStats), VmError> {
        let n = self.taken.get();
        self.taken.set(n + 1);
        let memory = self.dir().join(format!("{n}.mlayer"));
        let state = self.dir().join(format!("{n}.state"));
        let written = pending
            .write_memory_with(&memory, options, progress)
            .and_then(|layer| {
                pending.write_state(&state)?;
                Ok(layer)
            });
        let layer = match written {
            Ok(layer) => layer,
            Err(e) => {
                let _ = std::fs::remove_file(&memory);
                let _ = std::fs::remove_file(&state);
                return Err(e);
            }
        };
        let stats = pending.live_stats().unwrap_or_default();
        pending.commit(&layer);
        let mut layers = parent.map_or_else(Vec::new, |p| p.layers.clone());
        layers.push(memory);
        let saved = Saved {
            state,
            layers,
            layer,
            working_set: self.dir().join(format!("{n}.working-set")),
        };
        Ok((saved, stats))
    }

    /// Takes a full snapshot of a paused VM (default layer options).
    ///
    /// # Panics
    /// If the snapshot fails.
    pub fn full(&self, vm: &Vm) -> Saved {
        self.take(vm, None, &LayerOptions::default())
            .expect("a full snapshot")
    }

    /// Takes a diff snapshot of a paused VM over `parent` (default layer options).
    ///
    /// # Panics
    /// If the snapshot fails.
    pub fn diff(&self, vm: &Vm, parent: &Saved) -> Saved {
        self.take(vm, Some(parent), &LayerOptions::default())
            .expect("a diff snapshot")
    }
}

/// A snapshot [`Snapshots::take`] wrote: its state file and its chain of memory layers.
#[derive(Debug, Clone)]
pub struct Saved {
    /// The state file.
    pub state: PathBuf,
    /// The memory layer files of its chain, oldest (the full layer) first: the last is its own.
    pub layers: Vec<PathBuf>,
    /// Its own memory layer, as written.
    pub layer: LayerInfo,
    /// Where a [`MemoryRestore::Prefetch`] restore records its working set, and later ones read it.
    pub working_set: PathBuf,
}

impl Saved {
    /// Its own memory layer file (the newest of its chain).
    #[must_use]
    pub fn memory(&self) -> &Path {
        self.layers.last().expect("a chain has a layer")
    }

    /// Reads and checks its state and opens its chain of layers (each layer's header, index and
    /// parent link checked).
    ///
    /// # Errors
    /// The [`VmError::State`] or [`VmError::Layer`] naming the file and what is wrong.
    pub fn open(&self) -> Result<(VmState, LayerChain), VmError> {
        let state = VmState::read_file(&self.state)?;
        let chain = LayerChain::open(&self.layers)?;
        Ok((state, chain))
    }

    /// Restores it into a new, paused VM built with `options` (memory installed as
    /// `options.memory_restore` says).
    ///
    /// # Errors
    /// As [`Saved::open`], [`Vm::prepare`] and [`snapshot::restore_from`].
    pub fn restore(&self, options: &VmOptions) -> Result<Vm, VmError> {
        let (state, chain) = self.open()?;
        state.check()?;
        let prepared = Vm::prepare(state.config, options)?;
        snapshot::restore_from(
            &state,
            chain,
            self.working_set_file(),
            prepared,
            options.memory_restore,
        )
    }

    /// Restores it into a VM prepared ahead ([`Vm::prepare`]), memory installed as `mode` says.
    ///
    /// # Errors
    /// As [`Saved::open`] and [`snapshot::restore_from`].
    pub fn restore_into(&self, prepared: PreparedVm, mode: MemoryRestore) -> Result<Vm, VmError> {
        let (state, chain) = self.open()?;
        snapshot::restore_from(&state, chain, self.working_set_file(), prepared, mode)
    }

    fn working_set_file(&self) -> snapshot::WorkingSetFile<'_> {
        snapshot::WorkingSetFile {
            path: &self.working_set,
            owner: &self.state,
        }
    }

    /// Reverts a paused VM to it; the VM stays paused.
    ///
    /// # Errors
    /// As [`Saved::open`] and [`Vm::restore_in_place`].
    pub fn revert(&self, vm: &Vm) -> Result<(), VmError> {
        let (state, chain) = self.open()?;
        vm.restore_in_place(&state, &chain)
    }

    /// As [`Saved::revert`], for a VM with disks: `disks` are the disks as of the snapshot, and
    /// the VM's devices serve them from then on.
    ///
    /// # Errors
    /// As [`Saved::open`] and [`Vm::restore_in_place_with_disks`].
    pub fn revert_with_disks(
        &self,
        vm: &Vm,
        disks: &[Arc<dyn BlockBackend>],
    ) -> Result<(), VmError> {
        let (state, chain) = self.open()?;
        vm.restore_in_place_with_disks(&state, &chain, disks)
    }
}
