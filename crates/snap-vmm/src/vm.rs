//! A running KVM microVM: memory, vCPU threads, the UART, and pause / resume / save / restore.

use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES,
    kvm_irqchip, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::block::{BlockBackend, IoStop, SECTOR_SIZE};
use crate::boot::{self, BootImage, MAX_IDENTITY_GIB, MAX_VCPUS, MIN_MEMORY};
use crate::error::{ConfigError, VmError};
use crate::memory::{GuestMemory, MMIO_GAP_END, MMIO_GAP_START, layout_regions};
use crate::run::{Gate, Shared, vcpu_thread};
pub use crate::run::{PORT_BOOT_MARK, PORT_EXIT, RunState, VmExit};
use crate::serial::{COM1_GSI, SerialDevice, SerialOutput};
use crate::state::{IrqchipState, StateError, VmConfig, VmState};
use crate::vcpu::{self, VcpuCaps};
use crate::virtio::{FIRST_GSI, MAX_DISKS, VirtioBlk, VirtioBlkState};
use snap_core::Id;
use snap_mem::dirty::{
    DirtyLog, DirtyTracker, DirtyTracking, KvmDirtyBitmap, KvmDirtyRing, PageBitmap,
};
use snap_mem::layer::{LayerChain, Restore};
use snap_mem::lazy::{CompleteHook, FailureHook, LazyOptions, LazyStats, PageServer, WindowSource};
use snap_mem::working_set::WorkingSet;

/// How long a recording lazy restore waits without faults before it fills the rest of memory.
const RECORDING_QUIET: Duration = Duration::from_millis(200);

/// Where KVM puts the TSS pages it needs (inside the MMIO gap, never RAM).
const TSS_ADDR: usize = 0xfffb_d000;

/// A KVM virtual machine with its vCPU threads.
pub struct Vm {
    kvm: Kvm,
    vm_fd: Arc<VmFd>,
    config: VmConfig,
    shared: Arc<Shared>,
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    threads: Vec<JoinHandle<()>>,
    serial_irq: EventFd,
    /// Interrupt lines of the disks, disk `i` on GSI `FIRST_GSI + i`.
    disk_irqs: Vec<EventFd>,
    output: SerialOutput,
    /// Serialises control operations (pause, resume, save, restore) on this VM.
    control: Mutex<()>,
    /// The memory layer this VM's memory equals plus its dirty pages: the last snapshot taken
    /// or restored. A diff snapshot is only correct against this layer.
    memory_base: Mutex<Option<Id>>,
    /// The lazy restore serving this VM's memory, while it runs or after it finished.
    page_server: Mutex<Option<PageServer>>,
    /// A live snapshot's layer is being written from memory under write-protect: nothing may
    /// write memory around the mapping (a revert's pwrite and hole punching) until it ends.
    pub(crate) live_copy: std::sync::atomic::AtomicBool,
}

/// Checks that a VM of this shape can be created on this host.
///
/// # Errors
/// The [`ConfigError`] saying what is wrong.
pub fn validate_config(config: &VmConfig) -> Result<(), ConfigError> {
    if config.vcpus == 0 {
        return Err(ConfigError::ZeroVcpus);
    }
    if config.vcpus > MAX_VCPUS {
        return Err(ConfigError::TooManyVcpus {
            requested: config.vcpus,
            max: MAX_VCPUS,
        });
    }
    GuestMemory::validate_size(config.memory_bytes)?;
    if config.memory_bytes < MIN_MEMORY {
        return Err(ConfigError::MemoryTooSmall {
            requested: config.memory_bytes,
            min: MIN_MEMORY,
        });
    }
    let max = (MAX_IDENTITY_GIB << 30) - (MMIO_GAP_END - MMIO_GAP_START);
    if config.memory_bytes > max {
        return Err(ConfigError::MemoryAboveIdentityMap {
            requested: config.memory_bytes,
            max,
        });
    }
    Ok(())
}

/// Checks the disks a VM is to be created with: at most [`MAX_DISKS`], each a non-zero whole
/// number of sectors.
///
/// # Errors
/// [`ConfigError::Disks`] saying which disk is wrong.
pub fn validate_disks(disks: &[Arc<dyn BlockBackend>]) -> Result<(), ConfigError> {
    if disks.len() > MAX_DISKS {
        return Err(ConfigError::Disks(format!(
            "{} disks requested, at most {MAX_DISKS} are supported",
            disks.len()
        )));
    }
    for (i, d) in disks.iter().enumerate() {
        if d.size() == 0 || d.size() % SECTOR_SIZE != 0 {
            return Err(ConfigError::Disks(format!(
                "disk {i} is {} bytes, not a non-zero multiple of {SECTOR_SIZE}",
                d.size()
            )));
        }
    }
    Ok(())
}

fn kvm_op<T>(op: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VmError> {
    r.map_err(|source| VmError::Kvm { op, source })
}

fn vcpu_caps(kvm: &Kvm, vcpu: &VcpuFd) -> Result<&'static VcpuCaps, VmError> {
    static CAPS: OnceLock<VcpuCaps> = OnceLock::new();
    if let Some(c) = CAPS.get() {
        return Ok(c);
    }
    let caps = kvm_op("probing MSRs", VcpuCaps::probe(kvm, vcpu))?;
    Ok(CAPS.get_or_init(|| caps))
}

/// What a VM is made of before its vCPU threads start.
struct Machine {
    kvm: Kvm,
    vm_fd: Arc<VmFd>,
    memory: GuestMemory,
    tracker: Option<Arc<DirtyTracker>>,
}

impl Machine {
    fn new(config: &VmConfig, options: &VmOptions) -> Result<Self, VmError> {
        validate_config(config)?;
        vcpu::install_kick_handler().map_err(|e| VmError::Thread(e.into()))?;
        let kvm = Kvm::new().map_err(VmError::KvmUnavailable)?;
        let vm_fd = Arc::new(kvm_op("KVM_CREATE_VM", kvm.create_vm())?);
        let regions = layout_regions(config.memory_bytes);
        // Dirty tracking is switched on before memory slots (manual protection) and vCPUs (rings)
        // exist, as KVM requires.
        let log: Option<Box<dyn DirtyLog>> = match options.dirty_tracking {
            DirtyTracking::Off => None,
            DirtyTracking::Bitmap => Some(Box::new(KvmDirtyBitmap::enable(
                Arc::clone(&vm_fd),
                &regions,
            )?)),
            DirtyTracking::Ring { entries } => Some(Box::new(KvmDirtyRing::enable(
                Arc::clone(&vm_fd),
                &regions,
                entries,
            )?)),
        };
        let tracker = log.map(|l| Arc::new(DirtyTracker::new(l, config.memory_bytes)));
        let memory = GuestMemory::new(config.memory_bytes)?;
        let flags = if tracker.is_some() {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        for (slot, r) in memory.regions().iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags,
                guest_phys_addr: r.gpa,
                memory_size: r.len,
                userspace_addr: memory.host_address(r.offset),
            };
            // SAFETY: the region lies inside `memory`'s mapping, which lives in `Shared` for as
            // long as the VM fd (the VM is torn down, threads joined, before memory is unmapped).
            kvm_op("KVM_SET_USER_MEMORY_REGION", unsafe {
                vm_fd.set_user_memory_region(region)
            })?;
        }
        // Memory slots go in before the in-kernel irqchip exists: once it does, every slot
        // change waits for an expedited SRCU grace period (measured here: 7 ms instead of 0.1 ms).
        kvm_op("KVM_SET_TSS_ADDR", vm_fd.set_tss_address(TSS_ADDR))?;
        kvm_op("KVM_CREATE_IRQCHIP", vm_fd.create_irq_chip())?;
        Ok(Self {
            kvm,
            vm_fd,
            memory,
            tracker,
        })
    }

    fn create_vcpu(&self, index: u32) -> Result<VcpuFd, VmError> {
        let fd = kvm_op("KVM_CREATE_VCPU", self.vm_fd.create_vcpu(u64::from(index)))?;
        if let Some(ring) = self.tracker.as_ref().and_then(|t| t.log().as_ring()) {
            ring.attach_vcpu(&fd)?;
        }
        Ok(fd)
    }
}

/// A VM built ahead of a restore by [`Vm::prepare`]: KVM VM, memory slots over fresh memory,
/// interrupt controllers and vCPUs, nothing running.
pub struct PreparedVm {
    machine: Machine,
    vcpus: Vec<VcpuFd>,
    config: VmConfig,
    options: VmOptions,
}

impl std::fmt::Debug for PreparedVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedVm")
            .field("config", &self.config)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl PreparedVm {
    /// The shape it was prepared for.
    #[must_use]
    pub fn config(&self) -> VmConfig {
        self.config
    }

    /// The options it was prepared with.
    #[must_use]
    pub fn options(&self) -> &VmOptions {
        &self.options
    }

    /// Gives the VM its disks (known only when the snapshot to restore is): a VM can be prepared
    /// before anyone knows which disks it will get.
    ///
    /// # Errors
    /// [`ConfigError::Disks`] for more disks than a VM takes.
    pub fn set_disks(&mut self, disks: Vec<Arc<dyn BlockBackend>>) -> Result<(), ConfigError> {
        validate_disks(&disks)?;
        self.options.disks = disks;
        Ok(())
    }

    fn check(&self, state: &VmState) -> Result<(), VmError> {
        state.check()?;
        if state.config != self.config {
            return Err(StateError::Inconsistent(format!(
                "the state is of a VM with {} bytes of memory and {} vCPUs, the prepared VM has {} bytes and {} vCPUs",
                state.config.memory_bytes, state.config.vcpus, self.config.memory_bytes, self.config.vcpus
            ))
            .into());
        }
        Ok(())
    }
}

/// How a restored VM gets its memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MemoryRestore {
    /// Everything is installed before the first guest instruction.
    #[default]
    Eager,
    /// The guest runs at once; pages arrive through userfaultfd when touched, and a background
    /// filler installs the rest.
    Lazy,
    /// Lazy, and the snapshot's working set goes first: the first such restore of a snapshot
    /// records the windows the guest faulted on, in order, and stores them with the snapshot;
    /// later ones install that set in bulk while the guest already runs.
    Prefetch,
}

/// How a VM runs, beyond its shape: not part of its saved state.
#[derive(Clone, Default)]
pub struct VmOptions {
    /// How the guest's dirty pages are tracked (default: the KVM dirty bitmap).
    pub dirty_tracking: DirtyTracking,
    /// How a restore installs memory (default: eagerly).
    pub memory_restore: MemoryRestore,
    /// Bytes a lazy or prefetch restore installs per fault: a power of two from 4 KiB up to the
    /// snapshot's frame size (the default: the frame is the unit).
    pub restore_unit_bytes: Option<u64>,
    /// The VM's disks, each a virtio-blk device (disk `i` at [`crate::virtio::MMIO_BASE`] +
    /// `i` * [`crate::virtio::MMIO_STRIDE`]). A restore takes the disks as of the snapshot:
    /// as many as the snapshot had, of the same sizes.
    pub disks: Vec<Arc<dyn BlockBackend>>,
}

impl std::fmt::Debug for VmOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let disk_bytes: Vec<u64> = self.disks.iter().map(|d| d.size()).collect();
        f.debug_struct("VmOptions")
            .field("dirty_tracking", &self.dirty_tracking)
            .field("memory_restore", &self.memory_restore)
            .field("restore_unit_bytes", &self.restore_unit_bytes)
            .field("disk_bytes", &disk_bytes)
            .finish()
    }
}

impl Vm {
    /// Creates a VM with default [`VmOptions`], loads `image` and sets every vCPU at the program
    /// entry in long mode. The VM starts paused: call [`Vm::resume`] to run it.
    ///
    /// # Errors
    /// [`VmError::Config`] for a configuration this host cannot run (nothing is created), or the
    /// KVM / memory error that stopped creation.
    pub fn create(config: VmConfig, image: &BootImage) -> Result<Self, VmError> {
        Self::create_with(config, image, &VmOptions::default())
    }

    /// As [`Vm::create`], with `options`.
    ///
    /// # Errors
    /// As [`Vm::create`]; [`VmError::Dirty`] if the host cannot track dirty pages as asked.
    pub fn create_with(
        config: VmConfig,
        image: &BootImage,
        options: &VmOptions,
    ) -> Result<Self, VmError> {
        validate_disks(&options.disks)?;
        let machine = Machine::new(&config, options)?;
        boot::load(&machine.memory, image)?;
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Serial(e.to_string()))?;
        let output = SerialOutput::default();
        let serial = SerialDevice::new(clone_fd(&serial_irq)?, output.clone());
        let vcpus = (0..config.vcpus)
            .map(|i| {
                let fd = machine.create_vcpu(i)?;
                vcpu::setup_boot(&machine.kvm, &fd, i)?;
                Ok(fd)
            })
            .collect::<Result<Vec<_>, VmError>>()?;
        let disk_irqs = new_irqs(options.disks.len())?;
        let disks = disk_devices(&options.disks, None, &disk_irqs)?;
        let devices = Devices {
            serial,
            serial_irq,
            output,
            disks,
            disk_irqs,
        };
        Self::start_threads(machine, config, devices, vcpus)
    }

    /// Builds a new VM (default [`VmOptions`]) from a saved state and the layer chain of its
    /// memory. The VM starts paused.
    ///
    /// Nothing runs until everything is loaded and checked: on any error the half-built VM is
    /// dropped and the error says what was wrong.
    ///
    /// # Errors
    /// [`VmError::State`] / [`VmError::Layer`] for bad input, or the KVM error.
    pub fn restore(state: &VmState, memory: &LayerChain) -> Result<Self, VmError> {
        Self::restore_with(state, memory, &VmOptions::default())
    }

    /// As [`Vm::restore`], with `options`.
    ///
    /// # Errors
    /// As [`Vm::restore`].
    pub fn restore_with(
        state: &VmState,
        memory: &LayerChain,
        options: &VmOptions,
    ) -> Result<Self, VmError> {
        if options.memory_restore != MemoryRestore::Eager {
            return Err(VmError::Snapshot {
                path: memory.newest().path().to_path_buf(),
                problem: "a lazy restore takes the chain by value: use Vm::restore_lazy".into(),
            });
        }
        state.check()?;
        check_chain_size(memory, &state.config)?;
        Self::restore_prepared(Self::prepare(state.config, options)?, state, memory)
    }

    /// Builds everything of a VM that does not depend on a snapshot's contents ahead of a
    /// restore: the KVM VM, its memory slots over fresh memory, the interrupt controllers and the
    /// vCPUs. A restore into it ([`Vm::restore_prepared`], [`Vm::restore_lazy_prepared`]) then
    /// only loads state: a pool of prepared VMs takes KVM's per-slot setup, which grows with
    /// memory size, off the restore path.
    ///
    /// # Errors
    /// As [`Vm::create`].
    pub fn prepare(config: VmConfig, options: &VmOptions) -> Result<PreparedVm, VmError> {
        let machine = Machine::new(&config, options)?;
        let vcpus = (0..config.vcpus)
            .map(|i| machine.create_vcpu(i))
            .collect::<Result<Vec<_>, VmError>>()?;
        Ok(PreparedVm {
            machine,
            vcpus,
            config,
            options: options.clone(),
        })
    }

    /// As [`Vm::restore_with`], into a VM prepared by [`Vm::prepare`] for the same shape.
    ///
    /// # Errors
    /// As [`Vm::restore`]; [`VmError::State`] if `prepared` has another shape than the state.
    pub fn restore_prepared(
        prepared: PreparedVm,
        state: &VmState,
        memory: &LayerChain,
    ) -> Result<Self, VmError> {
        prepared.check(state)?;
        check_chain_size(memory, &state.config)?;
        memory.materialize_into(&prepared.machine.memory, Restore::Fresh)?;
        let vm = Self::start_restored(prepared, state)?;
        vm.set_memory_base(Some(memory.newest().info().id));
        Ok(vm)
    }

    /// Builds a new, paused VM whose memory is restored lazily from `memory`: nothing is copied
    /// before the guest may run. If a page cannot be served (a damaged frame, a missing file) the
    /// VM stops in [`RunState::Failed`] with the error naming the layer and the frame; it never
    /// runs on wrong memory.
    ///
    /// # Errors
    /// As [`Vm::restore`], and [`VmError::Lazy`] if userfaultfd cannot be set up.
    pub fn restore_lazy(
        state: &VmState,
        memory: LayerChain,
        options: &VmOptions,
    ) -> Result<Self, VmError> {
        Self::restore_lazy_with(state, memory, options, None, None)
    }

    /// As [`Vm::restore_lazy`], installing the units of `prefetch` first (while the guest
    /// already runs) and handing the units the guest faulted on to `on_complete` when memory
    /// is complete. With `on_complete` the background filler waits until the guest has not
    /// faulted for 200 ms, so that the recording holds the guest's working set.
    ///
    /// # Errors
    /// As [`Vm::restore_lazy`].
    pub fn restore_lazy_with(
        state: &VmState,
        memory: LayerChain,
        options: &VmOptions,
        prefetch: Option<WorkingSet>,
        on_complete: Option<CompleteHook>,
    ) -> Result<Self, VmError> {
        state.check()?;
        check_chain_size(&memory, &state.config)?;
        let prepared = Self::prepare(state.config, options)?;
        Self::restore_lazy_prepared(prepared, state, memory, prefetch, on_complete)
    }

    /// As [`Vm::restore_lazy_with`], into a VM prepared by [`Vm::prepare`] for the same shape
    /// (its options give the restore unit).
    ///
    /// # Errors
    /// As [`Vm::restore_lazy`]; [`VmError::State`] if `prepared` has another shape than the
    /// state.
    pub fn restore_lazy_prepared(
        prepared: PreparedVm,
        state: &VmState,
        memory: LayerChain,
        prefetch: Option<WorkingSet>,
        on_complete: Option<CompleteHook>,
    ) -> Result<Self, VmError> {
        check_chain_size(&memory, &state.config)?;
        let base = memory.newest().info().id;
        Self::restore_lazy_source(prepared, state, memory, Some(base), prefetch, on_complete)
    }

    /// As [`Vm::restore_lazy_prepared`], with memory from any [`WindowSource`] (a remote store,
    /// say). `base` is the layer the restored memory is (the parent of the VM's next diff
    /// snapshot); `None` when no local layer is (the next snapshot is then a full one).
    ///
    /// # Errors
    /// As [`Vm::restore_lazy_prepared`].
    pub fn restore_lazy_source(
        prepared: PreparedVm,
        state: &VmState,
        memory: impl WindowSource + 'static,
        base: Option<Id>,
        prefetch: Option<WorkingSet>,
        on_complete: Option<CompleteHook>,
    ) -> Result<Self, VmError> {
        prepared.check(state)?;
        if memory.memory_bytes() != state.config.memory_bytes {
            return Err(StateError::Inconsistent(format!(
                "the memory source describes {} bytes of memory, the VM has {}",
                memory.memory_bytes(),
                state.config.memory_bytes
            ))
            .into());
        }
        let unit_bytes = prepared.options.restore_unit_bytes;
        let vm = Self::start_restored(prepared, state)?;
        let shared = Arc::downgrade(&vm.shared);
        let hook: FailureHook = Box::new(move |error: &str| {
            if let Some(s) = shared.upgrade() {
                s.fail(format!("lazy memory restore failed: {error}"));
            }
        });
        // While recording a working set, the filler waits until the guest stops faulting.
        let fill_after_quiet = on_complete.as_ref().map(|_| RECORDING_QUIET);
        let lazy = LazyOptions {
            on_failure: Some(hook),
            on_complete,
            prefetch,
            fill_after_quiet,
            unit_bytes,
        };
        let server = PageServer::start_with(&vm.shared.memory, memory, lazy)?;
        *vm.page_server.lock().unwrap_or_else(|e| e.into_inner()) = Some(server);
        vm.set_memory_base(base);
        Ok(vm)
    }

    /// Waits until a lazy restore has installed all of memory (at once for other VMs). Reading
    /// memory through the memfd (as snapshots do) needs this.
    ///
    /// # Errors
    /// [`VmError::Failed`] if the lazy restore failed.
    pub fn wait_memory_resident(&self) -> Result<(), VmError> {
        let server = self.page_server.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = &*server {
            s.wait().map_err(VmError::Failed)?;
        }
        Ok(())
    }

    /// Counters of the lazy restore this VM came from, if it came from one.
    pub fn lazy_stats(&self) -> Option<LazyStats> {
        let server = self.page_server.lock().unwrap_or_else(|e| e.into_inner());
        server.as_ref().map(PageServer::stats)
    }

    /// Loads every vCPU and device of `state` into a prepared machine, with the prepared
    /// options' disks behind its virtio-blk devices, resets dirty tracking (memory now is, or
    /// will be, the snapshot's) and starts the vCPU threads, paused.
    fn start_restored(prepared: PreparedVm, state: &VmState) -> Result<Self, VmError> {
        let PreparedVm {
            machine,
            mut vcpus,
            options,
            ..
        } = prepared;
        let disk_irqs = new_irqs(options.disks.len())?;
        let disks = disk_devices(&options.disks, Some(&state.disks), &disk_irqs)?;
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Serial(e.to_string()))?;
        let output = SerialOutput::default();
        let serial =
            SerialDevice::from_state(&state.serial, clone_fd(&serial_irq)?, output.clone())
                .map_err(VmError::Serial)?;
        // `check` made sure there is one vCPU per state, and `VmState::check` that the states
        // are in index order.
        for (fd, s) in vcpus.iter_mut().zip(&state.vcpus) {
            vcpu::restore(fd, s, true)?;
        }
        restore_vm_devices(&machine.vm_fd, state)?;
        if let Some(t) = &machine.tracker {
            t.reset(&machine.memory)?;
        }
        let devices = Devices {
            serial,
            serial_irq,
            output,
            disks,
            disk_irqs,
        };
        let vm = Self::start_threads(machine, state.config, devices, vcpus)?;
        if let Some(exit) = &state.stopped {
            vm.shared.gate().state = RunState::Stopped(exit.clone());
        }
        Ok(vm)
    }

    fn start_threads(
        machine: Machine,
        config: VmConfig,
        devices: Devices,
        vcpus: Vec<VcpuFd>,
    ) -> Result<Self, VmError> {
        let Machine {
            kvm,
            vm_fd,
            memory,
            tracker,
        } = machine;
        let Devices {
            serial,
            serial_irq,
            output,
            disks,
            disk_irqs,
        } = devices;
        kvm_op("KVM_IRQFD", vm_fd.register_irqfd(&serial_irq, COM1_GSI))?;
        for (i, irq) in disk_irqs.iter().enumerate() {
            kvm_op("KVM_IRQFD", vm_fd.register_irqfd(irq, FIRST_GSI + i as u32))?;
        }
        let n = vcpus.len();
        let shared = Arc::new(Shared {
            gate: Mutex::new(Gate {
                state: RunState::Paused,
                io_stop: None,
                parked: vec![false; n],
                exited: vec![true; n],
                threads: Vec::with_capacity(n),
                quit: false,
            }),
            cond: Condvar::new(),
            memory,
            serial: Mutex::new(serial),
            disks: disks.into_iter().map(Mutex::new).collect(),
            first_instruction: OnceLock::new(),
            tracker,
        });
        let vcpus: Vec<_> = vcpus.into_iter().map(|v| Arc::new(Mutex::new(v))).collect();
        let mut vm = Self {
            kvm,
            vm_fd,
            config,
            shared,
            vcpus,
            threads: Vec::with_capacity(n),
            serial_irq,
            disk_irqs,
            output,
            control: Mutex::new(()),
            memory_base: Mutex::new(None),
            page_server: Mutex::new(None),
            live_copy: std::sync::atomic::AtomicBool::new(false),
        };
        for i in 0..n {
            let shared = Arc::clone(&vm.shared);
            let fd = Arc::clone(&vm.vcpus[i]);
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || vcpu_thread(i, &shared, &fd))
                .map_err(VmError::Thread)?;
            let mut g = vm.shared.gate();
            g.threads.push(handle.as_pthread_t());
            g.exited[i] = false;
            drop(g);
            vm.threads.push(handle);
        }
        let g = vm.shared.wait_parked(vm.shared.gate());
        drop(g);
        Ok(vm)
    }

    /// The pages dirtied (by the guest or the VMM) since the last [`Vm::commit_dirty`] or restore.
    /// The VM must be paused. The pages stay pending: if the layer holding them cannot be
    /// written, the next harvest returns them again.
    ///
    /// # Errors
    /// [`VmError::NotPaused`], [`VmError::DirtyTrackingOff`], or the KVM error.
    pub fn harvest_dirty(&self) -> Result<PageBitmap, VmError> {
        let _c = self.control();
        self.require_parked()?;
        let t = self
            .shared
            .tracker
            .as_ref()
            .ok_or(VmError::DirtyTrackingOff)?;
        Ok(t.harvest(&self.shared.memory)?)
    }

    /// The pages dirtied so far, harvested while the VM runs (a hint for what a diff snapshot
    /// will hold; they stay pending like any harvest). Only with [`DirtyTracking::Bitmap`], whose
    /// log can be collected under a running guest (a page written meanwhile is collected next
    /// time); empty otherwise.
    ///
    /// # Errors
    /// The KVM error; nothing harvested so far is lost.
    pub fn harvest_dirty_running(&self) -> Result<PageBitmap, VmError> {
        let _c = self.control();
        match &self.shared.tracker {
            Some(t) if t.log().as_ring().is_none() => Ok(t.harvest(&self.shared.memory)?),
            _ => Ok(PageBitmap::for_memory(self.shared.memory.size())),
        }
    }

    /// The pages of the last harvest are in a durable snapshot: stop returning them.
    pub fn commit_dirty(&self) {
        if let Some(t) = &self.shared.tracker {
            t.commit();
        }
    }

    /// How many times a vCPU's dirty ring filled up (only with [`DirtyTracking::Ring`]).
    pub fn dirty_ring_full_exits(&self) -> Option<u64> {
        let t = self.shared.tracker.as_ref()?;
        t.log().as_ring().map(|r| r.full_exits())
    }

    /// The memory layer this VM's memory is based on: the newest layer of the last snapshot
    /// taken or restored (none for a VM that booted and was never snapshotted). Diff snapshots
    /// are taken against it.
    pub fn memory_base(&self) -> Option<Id> {
        *self.memory_base.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_memory_base(&self, id: Option<Id>) {
        *self.memory_base.lock().unwrap_or_else(|e| e.into_inner()) = id;
    }

    /// The name of the dirty-page log in use, if tracking is on.
    pub fn dirty_log_name(&self) -> Option<&'static str> {
        self.shared.tracker.as_ref().map(|t| t.log().name())
    }

    /// The VM's shape.
    pub fn config(&self) -> VmConfig {
        self.config
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.shared.memory
    }

    /// Everything the guest wrote to its serial port.
    pub fn serial_output(&self) -> &SerialOutput {
        &self.output
    }

    /// When a vCPU first executed the guest program's first instruction, if one has.
    pub fn first_instruction_at(&self) -> Option<Instant> {
        self.shared.first_instruction.get().copied()
    }

    /// Waits until guest code has started running (see [`Vm::first_instruction_at`]).
    ///
    /// # Errors
    /// [`VmError::Timeout`] if it did not within `timeout`.
    pub fn wait_first_instruction(&self, timeout: Duration) -> Result<Instant, VmError> {
        self.shared
            .wait_until(timeout, |_| self.first_instruction_at())
            .ok_or(VmError::Timeout)
    }

    /// The current run state.
    pub fn run_state(&self) -> RunState {
        self.shared.gate().state.clone()
    }

    fn control(&self) -> MutexGuard<'_, ()> {
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why a disk paused the VM, if one did: its backend failed a request with an error the
    /// guest must not see (the host filesystem or quota is full, or the disk's data is damaged;
    /// see [`crate::block::stops_vm`]). The VM is [`RunState::Paused`] with the request pending;
    /// [`Vm::resume`] runs it again and clears this once it succeeds. The VM can be saved and
    /// snapshotted meanwhile: a VM restored from such a snapshot runs the request at its first
    /// resume.
    pub fn io_stop(&self) -> Option<IoStop> {
        self.shared.gate().io_stop.clone()
    }

    /// Lets the vCPUs run guest code. A no-op on a running VM.
    ///
    /// Before any vCPU runs, every disk runs the requests its driver has made available and
    /// the device has not taken yet: those a backend error left pending ([`Vm::io_stop`]),
    /// also in a VM restored from a snapshot taken in that state.
    ///
    /// # Errors
    /// [`VmError::Stopped`] if the guest has stopped on its own (restore a snapshot into the VM
    /// to run it again), [`VmError::Failed`] if an earlier restore left the VM unusable,
    /// [`VmError::IoStopped`] if a pending request failed again with an error the guest must not
    /// see: the VM stays paused (free space or repair the disk, then resume again).
    pub fn resume(&self) -> Result<(), VmError> {
        let _c = self.control();
        let g = self.shared.gate();
        match &g.state {
            RunState::Failed(why) => return Err(VmError::Failed(why.clone())),
            RunState::Stopped(exit) => return Err(VmError::Stopped(exit.clone())),
            RunState::Running => return Ok(()),
            RunState::Paused => {}
        }
        // A disk pauses the VM on its own: its vCPUs may still be on their way to park.
        drop(self.shared.wait_parked(g));
        let retried = self.run_available_requests();
        let mut g = self.shared.gate();
        // A lazy restore can fail meanwhile.
        if let RunState::Failed(why) = &g.state {
            return Err(VmError::Failed(why.clone()));
        }
        if let Err(stop) = retried {
            g.io_stop = Some(stop.clone());
            return Err(VmError::IoStopped(stop));
        }
        if let Some(stop) = g.io_stop.take() {
            tracing::info!(reason = %stop, "the disk's pending requests completed; resuming");
        }
        g.state = RunState::Running;
        self.shared.cond.notify_all();
        Ok(())
    }

    /// Runs the available requests of every disk (every vCPU parked); the first stop if any
    /// disk stopped again.
    fn run_available_requests(&self) -> Result<(), IoStop> {
        let mut first = None;
        for i in 0..self.shared.disks.len() {
            if let Err(stop) = self.shared.disk(i).run_available(&self.shared.memory) {
                first.get_or_insert(stop);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Stops every vCPU and returns once all of them are out of KVM_RUN and parked.
    /// On a VM that is already paused or stopped it returns at once.
    pub fn pause(&self) {
        let _c = self.control();
        let mut g = self.shared.gate();
        if g.state == RunState::Running {
            g.state = RunState::Paused;
            Shared::kick(&g, None);
        }
        drop(self.shared.wait_parked(g));
    }

    /// Waits until the guest stops on its own and every vCPU is parked.
    ///
    /// # Errors
    /// [`VmError::IoStopped`] if a disk paused the VM instead (see [`Vm::io_stop`]; every vCPU
    /// is parked then too), [`VmError::Timeout`] if neither happened within `timeout`;
    /// [`VmError::NotPaused`] is never returned here.
    pub fn wait_for_exit(&self, timeout: Duration) -> Result<VmExit, VmError> {
        self.shared
            .wait_until(timeout, |g| {
                if !g.parked.iter().all(|&p| p) {
                    return None;
                }
                match (&g.state, &g.io_stop) {
                    (RunState::Stopped(exit), _) => Some(Ok(exit.clone())),
                    (RunState::Paused, Some(stop)) => Some(Err(VmError::IoStopped(stop.clone()))),
                    _ => None,
                }
            })
            .unwrap_or(Err(VmError::Timeout))
    }

    fn require_parked(&self) -> Result<(), VmError> {
        let g = self.shared.gate();
        if g.state == RunState::Running || !g.parked.iter().all(|&p| p) {
            return Err(VmError::NotPaused);
        }
        Ok(())
    }

    fn lock_vcpu(&self, i: usize) -> MutexGuard<'_, VcpuFd> {
        self.vcpus[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Saves the complete state of every vCPU and device (not memory). The VM must be paused.
    ///
    /// # Errors
    /// [`VmError::NotPaused`], or the KVM error naming the ioctl that failed.
    pub fn save(&self) -> Result<VmState, VmError> {
        let _c = self.control();
        self.save_locked()
    }

    fn save_locked(&self) -> Result<VmState, VmError> {
        self.require_parked()?;
        let caps = vcpu_caps(&self.kvm, &self.lock_vcpu(0))?;
        let vcpus = (0..self.vcpus.len())
            .map(|i| vcpu::save(i as u32, &self.lock_vcpu(i), caps))
            .collect::<Result<Vec<_>, _>>()?;
        let chip = |chip_id| {
            let mut c = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            kvm_op("KVM_GET_IRQCHIP", self.vm_fd.get_irqchip(&mut c)).map(|()| c)
        };
        Ok(VmState {
            config: self.config,
            vcpus,
            clock: kvm_op("KVM_GET_CLOCK", self.vm_fd.get_clock())?,
            irqchip: IrqchipState {
                pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
                pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
                ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            },
            serial: self.shared.serial().state(),
            disks: (0..self.shared.disks.len())
                .map(|i| self.shared.disk(i).state())
                .collect(),
            stopped: match &self.shared.gate().state {
                RunState::Stopped(exit) => Some(exit.clone()),
                _ => None,
            },
        })
    }

    /// The disks behind the VM's virtio-blk devices, disk `i` at index `i`.
    pub fn disks(&self) -> Vec<Arc<dyn BlockBackend>> {
        (0..self.shared.disks.len())
            .map(|i| Arc::clone(self.shared.disk(i).backend()))
            .collect()
    }

    /// Flushes every disk (the VM must be paused): with no request in flight, the disks then
    /// hold exactly what the guest was told is written.
    ///
    /// # Errors
    /// [`VmError::NotPaused`], or [`VmError::Disk`] naming the disk whose flush failed.
    pub fn flush_disks(&self) -> Result<(), VmError> {
        let _c = self.control();
        self.require_parked()?;
        for (index, disk) in self.disks().iter().enumerate() {
            disk.flush()
                .map_err(|source| VmError::Disk { index, source })?;
        }
        Ok(())
    }

    /// Reverts this VM to a saved state and the layer chain of its memory. The VM must be paused and stays paused.
    ///
    /// Everything is checked before anything changes: a state or memory chain that does not fit, or
    /// whose checksum fails, leaves the VM exactly as it was. If a KVM ioctl fails part-way, the
    /// VM's previous state is loaded back; only an I/O failure while copying memory leaves the VM
    /// [`RunState::Failed`], so it never runs on half-loaded memory.
    ///
    /// # Errors
    /// [`VmError::NotPaused`], [`VmError::State`], [`VmError::Layer`], or the KVM error; a state
    /// with disks is refused ([`StateError::Disks`]): use [`Vm::restore_in_place_with_disks`].
    pub fn restore_in_place(&self, state: &VmState, memory: &LayerChain) -> Result<(), VmError> {
        self.restore_in_place_with_disks(state, memory, &[])
    }

    /// As [`Vm::restore_in_place`], and the VM's virtio-blk devices serve `disks` from then on:
    /// the disks as of the snapshot, as many as it had and of the same sizes.
    ///
    /// # Errors
    /// As [`Vm::restore_in_place`]; [`StateError::Disks`] if `disks` do not fit the state.
    pub fn restore_in_place_with_disks(
        &self,
        state: &VmState,
        memory: &LayerChain,
        disks: &[Arc<dyn BlockBackend>],
    ) -> Result<(), VmError> {
        let _c = self.control();
        self.require_parked()?;
        if self.live_copy.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(VmError::Snapshot {
                path: std::path::PathBuf::new(),
                problem: "a live snapshot of this VM is still being written: revert it once that \
                          snapshot has been committed or abandoned"
                    .into(),
            });
        }
        state.check()?;
        if state.config != self.config {
            return Err(StateError::ConfigMismatch {
                saved: state.config,
                this: self.config,
            }
            .into());
        }
        check_chain_size(memory, &self.config)?;
        if state.disks.len() != self.disk_irqs.len() {
            return Err(StateError::Disks(format!(
                "the state has {} disks, this VM {}",
                state.disks.len(),
                self.disk_irqs.len()
            ))
            .into());
        }
        let irqs = self
            .disk_irqs
            .iter()
            .map(clone_fd)
            .collect::<Result<Vec<_>, _>>()?;
        let new_disks = disk_devices(disks, Some(&state.disks), &irqs)?;
        for layer in memory.layers() {
            layer.verify()?;
        }
        // A lazy restore still filling memory would install its pages over the revert.
        self.wait_memory_resident()?;
        self.page_server
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let previous = self.save_locked()?;
        if let Err(e) = self.load_devices(state) {
            if let Err(undo) = self.load_devices(&previous) {
                self.fail(format!(
                    "restore failed ({e}) and undoing it failed ({undo})"
                ));
            }
            return Err(e);
        }
        for (slot, device) in self.shared.disks.iter().zip(new_disks) {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = device;
        }
        // The devices that stopped are gone; the restored ones run what the state left
        // available at the next resume.
        self.shared.gate().io_stop = None;
        if let Err(e) = memory.materialize_into(&self.shared.memory, Restore::Used) {
            self.fail(format!("memory restore failed part-way: {e}"));
            return Err(e.into());
        }
        self.set_memory_base(Some(memory.newest().info().id));
        if let Some(t) = &self.shared.tracker {
            if let Err(e) = t.reset(&self.shared.memory) {
                self.fail(format!(
                    "dirty tracking could not be reset after the restore: {e}"
                ));
                return Err(e.into());
            }
        }
        let mut g = self.shared.gate();
        if !matches!(g.state, RunState::Failed(_)) {
            g.state = match &state.stopped {
                Some(exit) => RunState::Stopped(exit.clone()),
                None => RunState::Paused,
            };
        }
        Ok(())
    }

    fn load_devices(&self, state: &VmState) -> Result<(), VmError> {
        for (i, s) in state.vcpus.iter().enumerate() {
            vcpu::restore(&self.lock_vcpu(i), s, false)?;
        }
        restore_vm_devices(&self.vm_fd, state)?;
        let serial = SerialDevice::from_state(
            &state.serial,
            clone_fd(&self.serial_irq)?,
            self.output.clone(),
        )
        .map_err(VmError::Serial)?;
        *self.shared.serial() = serial;
        Ok(())
    }

    fn fail(&self, why: String) {
        self.shared.fail(why);
    }
}

fn check_chain_size(memory: &LayerChain, config: &VmConfig) -> Result<(), VmError> {
    if memory.memory_bytes() != config.memory_bytes {
        return Err(StateError::Inconsistent(format!(
            "memory layers {} describe {} bytes of memory, the VM has {}",
            memory.newest().path().display(),
            memory.memory_bytes(),
            config.memory_bytes
        ))
        .into());
    }
    Ok(())
}

fn clone_fd(fd: &EventFd) -> Result<EventFd, VmError> {
    fd.try_clone().map_err(|e| VmError::Serial(e.to_string()))
}

/// The devices of a VM beyond its vCPUs, before its threads start.
struct Devices {
    serial: SerialDevice,
    serial_irq: EventFd,
    output: SerialOutput,
    disks: Vec<VirtioBlk>,
    disk_irqs: Vec<EventFd>,
}

fn new_irqs(n: usize) -> Result<Vec<EventFd>, VmError> {
    (0..n)
        .map(|_| EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Serial(e.to_string())))
        .collect()
}

/// The virtio-blk devices serving `backends`: fresh, or loaded from `saved` (which must have one
/// device per backend, each of its backend's size).
fn disk_devices(
    backends: &[Arc<dyn BlockBackend>],
    saved: Option<&[VirtioBlkState]>,
    irqs: &[EventFd],
) -> Result<Vec<VirtioBlk>, VmError> {
    if let Some(saved) = saved {
        if saved.len() != backends.len() {
            return Err(StateError::Disks(format!(
                "the snapshot has {} disks, {} were given (a restore takes the disks as of the \
                 snapshot)",
                saved.len(),
                backends.len()
            ))
            .into());
        }
    }
    backends
        .iter()
        .zip(irqs)
        .enumerate()
        .map(|(i, (backend, irq))| {
            let irq = clone_fd(irq)?;
            match saved {
                None => Ok(VirtioBlk::new(i, Arc::clone(backend), irq)),
                Some(saved) => VirtioBlk::from_state(i, &saved[i], Arc::clone(backend), irq)
                    .map_err(|e| StateError::Disks(e).into()),
            }
        })
        .collect()
}

fn restore_vm_devices(vm_fd: &VmFd, state: &VmState) -> Result<(), VmError> {
    for chip in [
        &state.irqchip.pic_master,
        &state.irqchip.pic_slave,
        &state.irqchip.ioapic,
    ] {
        kvm_op("KVM_SET_IRQCHIP", vm_fd.set_irqchip(chip))?;
    }
    let mut clock = state.clock;
    // Only the clock value is restored; KVM refuses flags it reports but does not take.
    clock.flags = 0;
    kvm_op("KVM_SET_CLOCK", vm_fd.set_clock(&clock))
}

impl Drop for Vm {
    fn drop(&mut self) {
        {
            let mut g = self.shared.gate();
            g.quit = true;
            Shared::kick(&g, None);
            self.shared.cond.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = self.vm_fd.unregister_irqfd(&self.serial_irq, COM1_GSI);
        for (i, irq) in self.disk_irqs.iter().enumerate() {
            let _ = self.vm_fd.unregister_irqfd(irq, FIRST_GSI + i as u32);
        }
    }
}
