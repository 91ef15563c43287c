//! The virtio-blk device behind a virtio-mmio (version 2) register window.
//!
//! One request queue. The driver's QUEUE_NOTIFY write is handled on the vCPU thread that made
//! it: every available request is executed on the backend and put in the used ring before the
//! write returns to the guest. A paused VM therefore never has a request in flight, and the
//! saved [`VirtioBlkState`] (transport registers plus the queue's addresses and ring indices) is
//! all a restored device needs to continue where the guest left it.
//!
//! A backend error of a kind [`stops_vm`] names stops the device instead of failing the request:
//! the request is not put in the used ring, the queue's next available index goes back to it
//! (so it and every later request stay available), and the device remembers the [`IoStop`] and
//! takes no further requests. The VM pauses; [`VirtioBlk::run_available`], called by every
//! resume before a vCPU runs, runs the available requests again. A saved state of a stopped
//! device holds the requests as available, so a device restored from it runs them too.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::guest_view::guest_view;
use super::request::{self, Outcome};
use crate::block::{BlockBackend, IoStop, SECTOR_SIZE, stops_vm};
use crate::memory::GuestMemory;

/// "virt" in little endian: the first register of every virtio-mmio device.
const MMIO_MAGIC: u32 = 0x7472_6976;
/// virtio-mmio version 2: the modern (virtio 1.x) register layout.
const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the guest ("SNAP").
const VENDOR_ID: u32 = u32::from_le_bytes(*b"SNAP");
/// Largest queue the device offers.
pub const QUEUE_MAX_SIZE: u16 = 256;
/// Segments per request the device advertises (VIRTIO_BLK_F_SEG_MAX): all but header and status.
const SEG_MAX: u32 = QUEUE_MAX_SIZE as u32 - 2;
/// Size of the device configuration space the device defines (capacity .. blk_size).
const CONFIG_LEN: usize = 24;

/// Features the device offers.
pub const DEVICE_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1
    | 1 << VIRTIO_BLK_F_SEG_MAX
    | 1 << VIRTIO_BLK_F_BLK_SIZE
    | 1 << VIRTIO_BLK_F_FLUSH;

/// Saved state of a virtio-blk queue (the plain fields of virtio-queue's `QueueState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSavedState {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Guest physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest physical address of the available ring.
    pub avail_ring: u64,
    /// Guest physical address of the used ring.
    pub used_ring: u64,
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill (the used index it published last).
    pub next_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX negotiated (never, today).
    pub event_idx: bool,
}

/// Saved state of one virtio-blk device: transport registers and its queue. The backend is not
/// part of it: a restore is handed the disk as of the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioBlkState {
    /// Disk size in bytes the guest was shown; the disk given at restore must have it.
    pub disk_bytes: u64,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// Device status.
    pub status: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// The request queue.
    pub queue: QueueSavedState,
}

/// A virtio-blk device: its registers, its queue, its disk and its interrupt line.
pub struct VirtioBlk {
    backend: Arc<dyn BlockBackend>,
    irq: EventFd,
    index: usize,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    queue: Queue,
    /// Set when a backend error stopped the device: requests stay available until
    /// [`VirtioBlk::run_available`].
    stop: Option<IoStop>,
}

/// The answer to GET_ID for disk `index`: "snap-disk-<index>", zero padded.
pub fn disk_id(index: usize) -> [u8; VIRTIO_BLK_ID_BYTES as usize] {
    let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
    let text = format!("snap-disk-{index}");
    let n = text.len().min(id.len());
    id[..n].copy_from_slice(&text.as_bytes()[..n]);
    id
}

impl VirtioBlk {
    /// A device in its reset state serving `backend` as disk `index`, signalling `irq`.
    pub fn new(index: usize, backend: Arc<dyn BlockBackend>, irq: EventFd) -> Self {
        Self {
            backend,
            irq,
            index,
            id: disk_id(index),
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            queue: Queue::new(QUEUE_MAX_SIZE).expect("the maximum queue size is a power of two"),
            stop: None,
        }
    }

    /// A device with saved state, serving `backend` (the disk as of that state).
    ///
    /// # Errors
    /// What does not fit: a disk of another size, or queue values virtio-queue refuses.
    pub fn from_state(
        index: usize,
        state: &VirtioBlkState,
        backend: Arc<dyn BlockBackend>,
        irq: EventFd,
    ) -> Result<Self, String> {
        if backend.size() != state.disk_bytes {
            return Err(format!(
                "disk {index} is {} bytes, the saved device had a disk of {} bytes",
                backend.size(),
                state.disk_bytes
            ));
        }
        let q = &state.queue;
        if q.max_size != QUEUE_MAX_SIZE {
            return Err(format!(
                "disk {index}: saved queue offers {} entries, this device {QUEUE_MAX_SIZE}",
                q.max_size
            ));
        }
        let queue = Queue::try_from(QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        })
        .map_err(|e| format!("disk {index}: saved queue: {e}"))?;
        Ok(Self {
            device_features_sel: state.device_features_sel,
            driver_features_sel: state.driver_features_sel,
            driver_features: state.driver_features,
            status: state.status,
            queue_sel: state.queue_sel,
            interrupt_status: state.interrupt_status,
            config_generation: state.config_generation,
            queue,
            ..Self::new(index, backend, irq)
        })
    }

    /// The device's saved state.
    pub fn state(&self) -> VirtioBlkState {
        let q = &self.queue;
        VirtioBlkState {
            disk_bytes: self.backend.size(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            status: self.status,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queue: QueueSavedState {
                max_size: q.max_size(),
                size: q.size(),
                ready: q.ready(),
                desc_table: q.desc_table(),
                avail_ring: q.avail_ring(),
                used_ring: q.used_ring(),
                next_avail: q.next_avail(),
                next_used: q.next_used(),
                event_idx: q.event_idx_enabled(),
            },
        }
    }

    /// The disk this device serves.
    pub fn backend(&self) -> &Arc<dyn BlockBackend> {
        &self.backend
    }

    /// Why the device stopped taking requests, if a backend error stopped it.
    pub fn io_stop(&self) -> Option<&IoStop> {
        self.stop.as_ref()
    }

    /// Runs every request the driver has made available, also after a stop: the request that
    /// stopped the device runs again, then the ones after it. Call it with no vCPU running.
    ///
    /// # Errors
    /// The [`IoStop`] if a request failed again with an error that stops the VM; the device
    /// stays stopped with that request pending.
    pub fn run_available(&mut self, memory: &GuestMemory) -> Result<(), IoStop> {
        if self.stop.take().is_some() {
            tracing::info!(
                disk = self.index,
                "virtio-blk: retrying the stopped requests"
            );
        }
        match self.process_queue(memory) {
            Some(stop) => Err(stop),
            None => Ok(()),
        }
    }

    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[..8].copy_from_slice(&(self.backend.size() / SECTOR_SIZE).to_le_bytes());
        // size_max (8..12) is not offered; seg_max at 12; geometry (16..20) is not offered.
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c
    }

    /// Handles a guest read of `data.len()` bytes at `offset` in the register window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            let config = self.config_space();
            let start = (offset - u64::from(VIRTIO_MMIO_CONFIG)) as usize;
            if let Some(src) = config.get(start..start.saturating_add(data.len())) {
                data.copy_from_slice(src);
            }
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            return;
        }
        let q = &self.queue;
        let value = match offset as u32 {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => VIRTIO_ID_BLOCK,
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => DEVICE_FEATURES as u32,
                1 => (DEVICE_FEATURES >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX if self.queue_sel == 0 => u32::from(q.max_size()),
            VIRTIO_MMIO_QUEUE_READY if self.queue_sel == 0 => u32::from(q.ready()),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// Handles a guest write of `data` at `offset` in the register window. A QUEUE_NOTIFY runs
    /// every available request before it returns; `memory` is guest memory.
    ///
    /// Returns the [`IoStop`] when this write stopped the device: a request failed with an
    /// error that must pause the VM (see the module documentation).
    pub fn write(&mut self, offset: u64, data: &[u8], memory: &GuestMemory) -> Option<IoStop> {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            // The configuration space is read-only (no writable fields are offered).
            return None;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return None;
        };
        if offset % 4 != 0 {
            return None;
        }
        let v = u32::from_le_bytes(bytes);
        let configuring = self.queue_sel == 0 && !self.queue.ready();
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES if self.features_writable() => {
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM if configuring => {
                self.queue.set_size(u16::try_from(v).unwrap_or(0));
            }
            VIRTIO_MMIO_QUEUE_READY if self.queue_sel == 0 => self.queue.set_ready(v == 1),
            VIRTIO_MMIO_QUEUE_DESC_LOW if configuring => {
                self.queue.set_desc_table_address(Some(v), None)
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH if configuring => {
                self.queue.set_desc_table_address(None, Some(v))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW if configuring => {
                self.queue.set_avail_ring_address(Some(v), None)
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH if configuring => {
                self.queue.set_avail_ring_address(None, Some(v))
            }
            VIRTIO_MMIO_QUEUE_USED_LOW if configuring => {
                self.queue.set_used_ring_address(Some(v), None)
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH if configuring => {
                self.queue.set_used_ring_address(None, Some(v))
            }
            VIRTIO_MMIO_QUEUE_NOTIFY if v == 0 => return self.process_queue(memory),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !v,
            VIRTIO_MMIO_STATUS => self.set_status(v),
            _ => {}
        }
        None
    }

    fn features_writable(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER != 0 && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        let newly = v & !self.status;
        if newly & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let acceptable = self.driver_features & !DEVICE_FEATURES == 0
                && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if !acceptable {
                // The driver reads the status back and sees the features refused.
                v &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if newly & VIRTIO_CONFIG_S_DRIVER_OK != 0 && v & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            v |= VIRTIO_CONFIG_S_FAILED;
        }
        // The driver cannot clear bits other than by a reset; NEEDS_RESET is the device's.
        self.status |= v & !VIRTIO_CONFIG_S_NEEDS_RESET;
    }

    fn reset(&mut self) {
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.queue.reset();
        // The requests a stop left pending went with the queue.
        self.stop = None;
    }

    /// Runs the requests available now. Returns the [`IoStop`] if one of them stopped the
    /// device; a stopped device runs nothing (its requests wait for
    /// [`VirtioBlk::run_available`]).
    fn process_queue(&mut self, memory: &GuestMemory) -> Option<IoStop> {
        let running = VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FEATURES_OK;
        if self.stop.is_some()
            || self.status & running != running
            || self.status & (VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FAILED) != 0
        {
            return None;
        }
        let view = guest_view(memory);
        if !self.queue.is_valid(&view) {
            self.needs_reset("queue addresses are not valid guest memory");
            return None;
        }
        // The requests available at the notify, and no more: a guest that keeps adding requests
        // from another vCPU cannot hold this vCPU (and a pause) here. Later requests come with
        // their own notify.
        let first = self.queue.next_avail();
        let chains: Vec<_> = match self.queue.iter(&view) {
            Ok(it) => it.collect(),
            Err(e) => {
                self.needs_reset(&format!("available ring: {e}"));
                return None;
            }
        };
        let mut completed = 0u32;
        let mut stopped = None;
        // The iterator took the chains from consecutive available entries starting at `first`.
        for (position, chain) in (0u16..).zip(chains) {
            let head = chain.head_index();
            let done = match request::execute(chain, &view, self.backend.as_ref(), &self.id) {
                Outcome::Done(done) => done,
                Outcome::Stopped(error) => {
                    debug_assert!(stops_vm(error.kind()));
                    // This request and every later one stay available, unanswered.
                    self.queue.set_next_avail(first.wrapping_add(position));
                    let stop = IoStop::new(self.index, &error);
                    tracing::warn!(
                        disk = self.index,
                        reason = %stop,
                        "virtio-blk: backend error; requests stay pending and the VM pauses"
                    );
                    self.stop = Some(stop.clone());
                    stopped = Some(stop);
                    break;
                }
            };
            if let Err(e) = self.queue.add_used(&view, head, done.used_len) {
                self.needs_reset(&format!("used ring: {e}"));
                break;
            }
            completed += 1;
        }
        if completed > 0 {
            self.interrupt(VIRTIO_MMIO_INT_VRING);
        }
        stopped
    }

    fn needs_reset(&mut self, why: &str) {
        tracing::warn!(
            reason = why,
            "virtio-blk: the driver broke the queue; device needs reset"
        );
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.interrupt(VIRTIO_MMIO_INT_CONFIG);
    }

    fn interrupt(&mut self, cause: u32) {
        self.interrupt_status |= cause;
        if let Err(e) = self.irq.write(1) {
            tracing::warn!(error = %e, "virtio-blk: cannot signal the interrupt");
        }
    }
}
