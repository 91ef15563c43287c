//! The vCPU threads: the run gate that parks and releases them, and the loop that runs a vCPU and
//! handles its exits (UART, exit port, boot mark, disks, faults).

use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_EXIT_DIRTY_RING_FULL, kvm_run};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::block::IoStop;
use crate::memory::GuestMemory;
use crate::serial::{COM1_BASE, COM1_PORTS, SerialDevice};
use crate::vcpu;
use crate::virtio::{self, VirtioBlk};
use snap_mem::dirty::DirtyTracker;

/// I/O port the guest writes its exit status to (32-bit) when it has finished.
pub const PORT_EXIT: u16 = 0xf4;
/// I/O port the guest's first instruction writes to, marking that guest code runs.
pub const PORT_BOOT_MARK: u16 = 0xf5;

/// Why the guest stopped on its own.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VmExit {
    /// The guest wrote this status to [`PORT_EXIT`].
    Finished(u32),
    /// A vCPU executed HLT with no way to wake up.
    Halted {
        /// The vCPU.
        vcpu: u32,
    },
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    Shutdown {
        /// The vCPU.
        vcpu: u32,
    },
    /// KVM could not emulate an instruction (KVM_EXIT_INTERNAL_ERROR).
    InternalError {
        /// The vCPU.
        vcpu: u32,
        /// KVM's sub-error code.
        suberror: u32,
        /// Guest RIP at the exit.
        rip: u64,
    },
    /// VM entry failed (KVM_EXIT_FAIL_ENTRY).
    EntryFailed {
        /// The vCPU.
        vcpu: u32,
        /// Hardware failure reason.
        reason: u64,
    },
    /// KVM_RUN failed or returned an exit this VMM does not handle.
    Fault {
        /// The vCPU.
        vcpu: u32,
        /// What happened.
        message: String,
    },
}

/// Where the VM is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunState {
    /// vCPUs are parked (a new or restored VM starts here). A disk whose backend fails with an
    /// error the guest must not see pauses a running VM here too: `Vm::io_stop` says why.
    Paused,
    /// vCPUs run guest code.
    Running,
    /// The guest stopped on its own; vCPUs are parked.
    Stopped(VmExit),
    /// A restore failed part-way; the VM must not run again.
    Failed(String),
}

/// What the VM and its vCPU threads agree on, under one lock.
pub(crate) struct Gate {
    pub(crate) state: RunState,
    /// Why a disk paused the VM, until a resume runs its pending requests.
    pub(crate) io_stop: Option<IoStop>,
    pub(crate) parked: Vec<bool>,
    pub(crate) exited: Vec<bool>,
    pub(crate) threads: Vec<libc::pthread_t>,
    pub(crate) quit: bool,
}

/// State shared by a VM and its vCPU threads.
pub(crate) struct Shared {
    pub(crate) gate: Mutex<Gate>,
    pub(crate) cond: Condvar,
    pub(crate) memory: GuestMemory,
    pub(crate) serial: Mutex<SerialDevice>,
    /// The virtio-blk devices, disk `i` at register window `i`.
    pub(crate) disks: Vec<Mutex<VirtioBlk>>,
    pub(crate) first_instruction: OnceLock<Instant>,
    pub(crate) tracker: Option<Arc<DirtyTracker>>,
}

impl Shared {
    pub(crate) fn gate(&self) -> MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn serial(&self) -> MutexGuard<'_, SerialDevice> {
        self.serial.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn disk(&self, index: usize) -> MutexGuard<'_, VirtioBlk> {
        self.disks[index].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Kicks every live vCPU thread but `except` out of KVM_RUN. Called with the gate held, so no
    /// thread can exit (and be joined) meanwhile.
    pub(crate) fn kick(gate: &Gate, except: Option<usize>) {
        for (i, &t) in gate.threads.iter().enumerate() {
            if Some(i) != except && !gate.exited[i] {
                // SAFETY: `t` is the pthread of a vCPU thread that has not exited (checked under
                // the gate lock, which it takes before exiting), so the handle is valid.
                unsafe { libc::pthread_kill(t, vcpu::kick_signal()) };
            }
        }
    }

    /// Records that the guest stopped and parks the other vCPUs.
    pub(crate) fn stop(&self, index: usize, exit: VmExit) {
        let mut g = self.gate();
        if !matches!(g.state, RunState::Stopped(_) | RunState::Failed(_)) {
            tracing::debug!(vcpu = index, ?exit, "guest stopped");
            g.state = RunState::Stopped(exit);
        }
        Self::kick(&g, Some(index));
        self.cond.notify_all();
    }

    /// Pauses a running VM because a disk's backend failed with an error the guest must not see
    /// (the request stays pending), and kicks the other vCPUs. The vCPU `index` that made the
    /// request parks once it is back in its loop, after completing its MMIO access. The first
    /// reason is kept until a resume runs the pending requests.
    pub(crate) fn pause_for_io(&self, index: usize, stop: IoStop) {
        let mut g = self.gate();
        match g.state {
            RunState::Running => {
                tracing::warn!(vcpu = index, reason = %stop, "disk I/O error: pausing the VM");
                g.state = RunState::Paused;
                Self::kick(&g, Some(index));
            }
            RunState::Paused => {}
            // The guest stopped meanwhile: it does not run on without a restore anyway.
            RunState::Stopped(_) | RunState::Failed(_) => return,
        }
        if g.io_stop.is_none() {
            g.io_stop = Some(stop);
        }
        self.cond.notify_all();
    }

    /// Waits on the gate until `ready` returns a value, or `timeout` passes (None).
    pub(crate) fn wait_until<T>(
        &self,
        timeout: Duration,
        mut ready: impl FnMut(&Gate) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut g = self.gate();
        loop {
            if let Some(v) = ready(&g) {
                return Some(v);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            g = self
                .cond
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Stops the guest for good: the VM is [`RunState::Failed`] and every vCPU is kicked out of
    /// KVM_RUN (also out of a page fault it waits in).
    pub(crate) fn fail(&self, why: String) {
        let mut g = self.gate();
        if !matches!(g.state, RunState::Failed(_)) {
            tracing::error!(reason = %why, "VM can no longer run");
            g.state = RunState::Failed(why);
        }
        Self::kick(&g, None);
        self.cond.notify_all();
    }

    pub(crate) fn wait_parked<'a>(&'a self, mut g: MutexGuard<'a, Gate>) -> MutexGuard<'a, Gate> {
        while !g.parked.iter().all(|&p| p) {
            g = self.cond.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g
    }
}

/// Body of a vCPU thread: park while the VM is not running, otherwise run the vCPU and handle exits.
pub(crate) fn vcpu_thread(index: usize, shared: &Shared, fd: &Mutex<VcpuFd>) {
    let page: *mut kvm_run = fd.lock().unwrap_or_else(|e| e.into_inner()).get_kvm_run();
    vcpu::set_thread_run_page(page);
    // Whether the last exit was an I/O or MMIO access that KVM completes only on the next
    // KVM_RUN. Such a vCPU must not park as it is: its saved state would be mid-instruction.
    let mut pending_io = false;
    'outer: loop {
        // Cleared before the state check: a kick after the check leaves it set, so KVM_RUN
        // returns at once instead of entering the guest.
        vcpu::clear_immediate_exit();
        {
            let mut g = shared.gate();
            loop {
                if g.quit {
                    break 'outer;
                }
                if g.state == RunState::Running {
                    g.parked[index] = false;
                    break;
                }
                if pending_io {
                    drop(g);
                    pending_io = complete_pending_io(index, shared, fd);
                    g = shared.gate();
                    continue;
                }
                if !g.parked[index] {
                    g.parked[index] = true;
                    shared.cond.notify_all();
                }
                g = shared.cond.wait(g).unwrap_or_else(|e| e.into_inner());
            }
        }
        pending_io = step(index, shared, fd);
    }
    vcpu::set_thread_run_page(std::ptr::null_mut());
    let mut g = shared.gate();
    g.parked[index] = true;
    g.exited[index] = true;
    shared.cond.notify_all();
}

/// One KVM_RUN and its exit; returns whether the exit left an access for KVM to complete.
fn step(index: usize, shared: &Shared, fd: &Mutex<VcpuFd>) -> bool {
    let (exit, pending_io) = {
        let mut vcpu = fd.lock().unwrap_or_else(|e| e.into_inner());
        run_once(index as u32, &mut vcpu, shared)
    };
    if let Some(exit) = exit {
        shared.stop(index, exit);
    }
    pending_io
}

/// Lets KVM finish the access of the last exit without entering the guest: KVM_RUN with
/// `immediate_exit` set completes it and returns EINTR (KVM's documented way to make vCPU state
/// consistent before saving it). Returns whether yet another access is pending.
fn complete_pending_io(index: usize, shared: &Shared, fd: &Mutex<VcpuFd>) -> bool {
    vcpu::set_immediate_exit();
    let pending = step(index, shared, fd);
    vcpu::clear_immediate_exit();
    pending
}

/// Runs the vCPU until one exit and handles it. Returns the reason if the guest stopped, and
/// whether the exit was an I/O or MMIO access, which KVM completes only on the next KVM_RUN.
fn run_once(index: u32, vcpu: &mut VcpuFd, shared: &Shared) -> (Option<VmExit>, bool) {
    let fault = |message: String| {
        Some(VmExit::Fault {
            vcpu: index,
            message,
        })
    };
    match vcpu.run() {
        Ok(VcpuExit::IoOut(port, data)) => {
            let stop = match port {
                p if (COM1_BASE..COM1_BASE + COM1_PORTS).contains(&p) => {
                    shared.serial().write(p, data[0]);
                    None
                }
                PORT_EXIT => {
                    let mut v = [0u8; 4];
                    let n = data.len().min(4);
                    v[..n].copy_from_slice(&data[..n]);
                    Some(VmExit::Finished(u32::from_le_bytes(v)))
                }
                PORT_BOOT_MARK => {
                    if shared.first_instruction.set(Instant::now()).is_ok() {
                        let _g = shared.gate();
                        shared.cond.notify_all();
                    }
                    None
                }
                _ => None,
            };
            (stop, true)
        }
        Ok(VcpuExit::IoIn(port, data)) => {
            if (COM1_BASE..COM1_BASE + COM1_PORTS).contains(&port) {
                data[0] = shared.serial().read(port);
            } else {
                data.fill(0xff);
            }
            (None, true)
        }
        Ok(VcpuExit::MmioRead(addr, data)) => {
            match virtio::window_of(addr, shared.disks.len()) {
                Some((i, offset)) => shared.disk(i).read(offset, data),
                None => data.fill(0xff),
            }
            (None, true)
        }
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            // A queue notify runs the disk's requests here, on this vCPU, before the guest
            // goes on: a paused VM never has a request in flight. A request stopped by its
            // backend stays pending and pauses the VM; this vCPU completes the access and parks.
            if let Some((i, offset)) = virtio::window_of(addr, shared.disks.len()) {
                let stop = shared.disk(i).write(offset, data, &shared.memory);
                if let Some(stop) = stop {
                    shared.pause_for_io(index as usize, stop);
                }
            }
            (None, true)
        }
        Ok(VcpuExit::Intr | VcpuExit::IrqWindowOpen) => (None, false),
        Ok(VcpuExit::Hlt) => (Some(VmExit::Halted { vcpu: index }), false),
        Ok(VcpuExit::Shutdown) => (Some(VmExit::Shutdown { vcpu: index }), false),
        Ok(VcpuExit::InternalError) => {
            // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the kernel filled the
            // `internal` member of the union.
            let suberror = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
            let rip = vcpu.get_regs().map_or(0, |r| r.rip);
            let exit = VmExit::InternalError {
                vcpu: index,
                suberror,
                rip,
            };
            (Some(exit), false)
        }
        Ok(VcpuExit::FailEntry(reason, _)) => (
            Some(VmExit::EntryFailed {
                vcpu: index,
                reason,
            }),
            false,
        ),
        Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => {
            let ring = shared.tracker.as_ref().and_then(|t| t.log().as_ring());
            let stop = match ring.map(|r| r.on_ring_full()) {
                Some(Ok(())) => None,
                Some(Err(e)) => fault(format!("collecting a full dirty ring: {e}")),
                None => fault("dirty ring full without a dirty ring".into()),
            };
            (stop, false)
        }
        Ok(other) => (fault(format!("unhandled exit {other:?}")), false),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => (None, false),
        Err(e) => (fault(format!("KVM_RUN failed: {e}")), false),
    }
}
