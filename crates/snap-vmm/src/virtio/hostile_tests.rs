//! The virtio-blk device against a driver that gets things wrong on purpose: descriptor chains
//! crafted in guest memory (out-of-bounds addresses, loops, chains without status, data on the
//! wrong side, sectors beyond the disk, broken rings). Every case must end in an error status,
//! an unanswered chain or a device that needs a reset, never in a host panic or a write outside
//! the request. And a backend that fails: errors that stop the VM leave requests pending.

use std::io;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::blk::{DEVICE_FEATURES, VirtioBlk};
use crate::block::BlockBackend;
use crate::memory::GuestMemory;
use snap_mem::dirty::PageBitmap;

const QSIZE: u16 = 16;
const DESC: u64 = 0x10000;
const AVAIL: u64 = 0x11000;
const USED: u64 = 0x12000;
const HEADER: u64 = 0x20000;
const STATUS: u64 = 0x21000;
const DATA: u64 = 0x30000;
const MEMORY: u64 = 16 << 20;
const DISK_SECTORS: u64 = 128;
const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

/// A disk in host memory, whose reads or writes (and flushes) can be made to fail.
struct MemDisk {
    data: Mutex<Vec<u8>>,
    fail_reads: Mutex<Option<(io::ErrorKind, &'static str)>>,
    fail_writes: Mutex<Option<(io::ErrorKind, &'static str)>>,
}

impl MemDisk {
    fn new(bytes: usize) -> Self {
        Self {
            data: Mutex::new(vec![0u8; bytes]),
            fail_reads: Mutex::new(None),
            fail_writes: Mutex::new(None),
        }
    }
}

fn injected(fail: &Mutex<Option<(io::ErrorKind, &'static str)>>) -> io::Result<()> {
    match *fail.lock().unwrap() {
        Some((kind, message)) => Err(io::Error::new(kind, message)),
        None => Ok(()),
    }
}

impl BlockBackend for MemDisk {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        injected(&self.fail_reads)?;
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        injected(&self.fail_writes)?;
        let mut d = self.data.lock().unwrap();
        d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        injected(&self.fail_writes)
    }
}

/// A device with a driver that did the handshake and set up one queue of [`QSIZE`].
struct Rig {
    mem: GuestMemory,
    disk: Arc<MemDisk>,
    dev: VirtioBlk,
    avail_idx: u16,
}

impl Rig {
    fn new() -> Self {
        let disk = Arc::new(MemDisk::new((DISK_SECTORS * 512) as usize));
        let backend: Arc<dyn BlockBackend> = disk.clone();
        let dev = VirtioBlk::new(0, backend, EventFd::new(EFD_NONBLOCK).unwrap());
        let mut rig = Self {
            mem: GuestMemory::new(MEMORY).unwrap(),
            disk,
            dev,
            avail_idx: 0,
        };
        rig.handshake(DEVICE_FEATURES);
        assert_ne!(rig.reg(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        rig.set(VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(rig.reg(VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
        rig.set(VIRTIO_MMIO_QUEUE_NUM, u32::from(QSIZE));
        for (reg, addr) in [
            (VIRTIO_MMIO_QUEUE_DESC_LOW, DESC),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL),
            (VIRTIO_MMIO_QUEUE_USED_LOW, USED),
        ] {
            rig.set(reg, addr as u32);
            rig.set(reg + 4, 0);
        }
        rig.set(VIRTIO_MMIO_QUEUE_READY, 1);
        rig.set(
            VIRTIO_MMIO_STATUS,
            rig.reg(VIRTIO_MMIO_STATUS) | VIRTIO_CONFIG_S_DRIVER_OK,
        );
        rig
    }

    fn handshake(&mut self, features: u64) {
        self.set(VIRTIO_MMIO_STATUS, 0);
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        self.set(VIRTIO_MMIO_STATUS, s);
        self.set(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.set(VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        self.set(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.set(VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        self.set(VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_FEATURES_OK);
    }

    fn set(&mut self, reg: u32, v: u32) {
        self.dev.write(u64::from(reg), &v.to_le_bytes(), &self.mem);
    }

    fn reg(&self, reg: u32) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read(u64::from(reg), &mut b);
        u32::from_le_bytes(b)
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.mem.write(DESC + u64::from(i) * 16, &d).unwrap();
    }

    fn header(&self, slot: u64, kind: u32, sector: u64) -> u64 {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        let at = HEADER + slot * 16;
        self.mem.write(at, &h).unwrap();
        self.mem.write(STATUS + slot, &[0xee]).unwrap();
        at
    }

    /// Puts `head` in the available ring, notifies, and returns the used entry it produced.
    fn submit(&mut self, head: u16) -> (u32, u32) {
        self.publish(&[head]);
        self.set(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(
            self.used_idx(),
            self.avail_idx,
            "the request was not completed"
        );
        self.used_entry(self.avail_idx - 1)
    }

    fn publish(&mut self, heads: &[u16]) {
        for &h in heads {
            let slot = AVAIL + 4 + u64::from(self.avail_idx % QSIZE) * 2;
            self.mem.write(slot, &h.to_le_bytes()).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        self.mem
            .write(AVAIL + 2, &self.avail_idx.to_le_bytes())
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        let mut b = [0u8; 2];
        self.mem.read(USED + 2, &mut b).unwrap();
        u16::from_le_bytes(b)
    }

    fn used_entry(&self, n: u16) -> (u32, u32) {
        let mut b = [0u8; 8];
        self.mem
            .read(USED + 4 + u64::from(n % QSIZE) * 8, &mut b)
            .unwrap();
        (
            u32::from_le_bytes(b[..4].try_into().unwrap()),
            u32::from_le_bytes(b[4..].try_into().unwrap()),
        )
    }

    fn status(&self, slot: u64) -> u8 {
        let mut b = [0u8; 1];
        self.mem.read(STATUS + slot, &mut b).unwrap();
        b[0]
    }

    /// A well-formed request: header, optional data (`data_flags` WRITE for IN), status.
    fn request(&mut self, kind: u32, sector: u64, data: Option<(u64, u32, u16)>) -> (u8, u32) {
        let h = self.header(0, kind, sector);
        self.desc(0, h, 16, NEXT, 1);
        let status_desc = match data {
            Some((addr, len, flags)) => {
                self.desc(1, addr, len, flags | NEXT, 2);
                2
            }
            None => 1,
        };
        self.desc(status_desc, STATUS, 1, WRITE, 0);
        let (id, len) = self.submit(0);
        assert_eq!(id, 0);
        (self.status(0), len)
    }

    fn disk(&self) -> Vec<u8> {
        self.disk.data.lock().unwrap().clone()
    }
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

#[test]
fn well_formed_requests_work() {
    let mut r = Rig::new();
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
    r.mem.write(DATA, &pattern).unwrap();
    assert_eq!(r.request(T_OUT, 5, Some((DATA, 1024, 0))), (OK, 1));
    assert_eq!(&r.disk()[5 * 512..7 * 512], &pattern[..]);
    let back = DATA + 0x1000;
    assert_eq!(r.request(T_IN, 5, Some((back, 1024, WRITE))), (OK, 1025));
    let mut got = vec![0u8; 1024];
    r.mem.read(back, &mut got).unwrap();
    assert_eq!(got, pattern);
    assert_eq!(r.request(T_FLUSH, 0, None), (OK, 1));
    let mut id = [0u8; 20];
    assert_eq!(r.request(T_GET_ID, 0, Some((DATA, 20, WRITE))), (OK, 21));
    r.mem.read(DATA, &mut id).unwrap();
    assert_eq!(&id[..11], b"snap-disk-0");
    assert_eq!(
        r.request(99, 0, None),
        (VIRTIO_BLK_S_UNSUPP as u8, 1),
        "unknown request type"
    );
    // The data may be split over several descriptors of any size.
    r.mem.write(DATA, &pattern).unwrap();
    let h = r.header(0, T_OUT, 9);
    r.desc(0, h, 16, NEXT, 3);
    r.desc(3, DATA, 100, NEXT, 7);
    r.desc(7, DATA + 100, 412, NEXT, 1);
    r.desc(1, STATUS, 1, WRITE, 0);
    r.submit(0);
    assert_eq!(r.status(0), OK);
    assert_eq!(&r.disk()[9 * 512..10 * 512], &pattern[..512]);
    // Config space: capacity in sectors, 8 bytes wide or as two halves.
    let mut cap = [0u8; 8];
    r.dev.read(u64::from(VIRTIO_MMIO_CONFIG), &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
    assert_eq!(r.reg(VIRTIO_MMIO_CONFIG), DISK_SECTORS as u32);
    assert_eq!(r.reg(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(r.reg(VIRTIO_MMIO_DEVICE_ID), 2);
    assert_eq!(r.reg(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
    r.set(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(r.reg(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
}

#[test]
fn sectors_and_lengths_outside_the_disk_are_io_errors() {
    let mut r = Rig::new();
    r.mem.write(DATA, &[0xab; 4096]).unwrap();
    let cases = [
        (T_OUT, DISK_SECTORS, 512, 0, "first sector past the end"),
        (T_OUT, DISK_SECTORS - 1, 1024, 0, "crosses the end"),
        (T_OUT, u64::MAX, 512, 0, "sector * 512 overflows"),
        (T_OUT, u64::MAX / 512, 512, 0, "offset + length overflows"),
        (T_OUT, 0, 100, 0, "not whole sectors"),
        (T_IN, 0, 513, WRITE, "not whole sectors"),
        (T_OUT, 0, 1 << 30, 0, "longer than the disk and than memory"),
    ];
    for (kind, sector, len, flags, what) in cases {
        let (status, _) = r.request(kind, sector, Some((DATA, len, flags)));
        assert_eq!(status, IOERR, "{what}");
    }
    // Header and status only: an IN or OUT without data.
    assert_eq!(r.request(T_IN, 0, None), (IOERR, 1));
    assert_eq!(r.request(T_OUT, 0, None), (IOERR, 1));
    // A chain of more than 4 GiB ends where its length overflows: here before the status.
    let h = r.header(0, T_OUT, 0);
    r.desc(0, h, 16, NEXT, 1);
    r.desc(1, DATA, u32::MAX, NEXT, 2);
    r.desc(2, STATUS, 1, WRITE, 0);
    assert_eq!(r.submit(0), (0, 0));
    assert!(r.disk().iter().all(|&b| b == 0), "a refused request wrote");
}

#[test]
fn addresses_outside_guest_memory_are_io_errors() {
    let mut r = Rig::new();
    for (addr, what) in [
        (MEMORY, "just past the end of memory"),
        (MEMORY - 256, "crosses the end of memory"),
        (3 << 30, "in the MMIO gap"),
        (u64::MAX - 100, "wraps around"),
    ] {
        let (status, len) = r.request(T_IN, 0, Some((addr, 512, WRITE)));
        assert_eq!((status, len), (IOERR, 1), "IN data {what}");
        let (status, _) = r.request(T_OUT, 0, Some((addr, 512, 0)));
        assert_eq!(status, IOERR, "OUT data {what}");
    }
    // A header outside memory: the status is still answered.
    r.desc(0, MEMORY + 4096, 16, NEXT, 1);
    r.desc(1, STATUS, 1, WRITE, 0);
    r.mem.write(STATUS, &[0xee]).unwrap();
    r.submit(0);
    assert_eq!(r.status(0), IOERR);
    // A status byte outside memory cannot be answered: used length 0, nothing written.
    let h = r.header(0, T_FLUSH, 0);
    r.desc(0, h, 16, NEXT, 1);
    r.desc(1, MEMORY + 4096, 1, WRITE, 0);
    assert_eq!(r.submit(0), (0, 0));
    assert!(r.disk().iter().all(|&b| b == 0));
}

#[test]
fn data_on_the_wrong_side_is_refused() {
    let mut r = Rig::new();
    r.mem.write(DATA, &[0x5a; 512]).unwrap();
    // OUT whose data the device would have to write.
    assert_eq!(r.request(T_OUT, 0, Some((DATA, 512, WRITE))).0, IOERR);
    assert!(r.disk().iter().all(|&b| b == 0));
    // IN whose data buffer is read-only for the device.
    r.disk.data.lock().unwrap()[..512].fill(0x11);
    assert_eq!(r.request(T_IN, 0, Some((DATA, 512, 0))).0, IOERR);
    let mut b = [0u8; 512];
    r.mem.read(DATA, &mut b).unwrap();
    assert!(
        b.iter().all(|&x| x == 0x5a),
        "a refused IN wrote guest memory"
    );
    // A chain with no device-writable byte at all cannot be answered.
    let h = r.header(0, T_FLUSH, 0);
    r.desc(0, h, 16, 0, 0);
    assert_eq!(r.submit(0), (0, 0));
    // A short header.
    let h = r.header(0, T_FLUSH, 0);
    r.desc(0, h, 8, NEXT, 1);
    r.desc(1, STATUS, 1, WRITE, 0);
    r.submit(0);
    assert_eq!(r.status(0), IOERR);
}

#[test]
fn loops_long_chains_and_bad_links_end() {
    let mut r = Rig::new();
    // A descriptor that links to itself, readable: no status to write.
    let h = r.header(0, T_OUT, 0);
    r.desc(0, h, 16, NEXT, 0);
    assert_eq!(r.submit(0), (0, 0));
    // A loop of two writable descriptors: ends after the queue size; the data is refused.
    let h = r.header(0, T_IN, 0);
    r.desc(0, h, 16, NEXT, 1);
    r.desc(1, DATA, 512, WRITE | NEXT, 2);
    r.desc(2, STATUS, 1, WRITE | NEXT, 1);
    r.submit(0);
    // A link beyond the table ends the chain there: header only, no status.
    r.desc(0, h, 16, NEXT, QSIZE + 3);
    assert_eq!(r.submit(0), (0, 0));
    // A head index beyond the table: the used ring cannot take it, the device needs a reset.
    r.publish(&[QSIZE + 1]);
    r.set(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_ne!(r.reg(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);

    // A chain through every descriptor of the queue is fine.
    let mut r = Rig::new();
    let h = r.header(0, T_OUT, 2);
    r.desc(0, h, 16, NEXT, 1);
    for i in 1..QSIZE - 1 {
        r.desc(i, DATA + u64::from(i - 1) * 512, 512, NEXT, i + 1);
    }
    r.desc(QSIZE - 1, STATUS, 1, WRITE, 0);
    r.submit(0);
    assert_eq!(r.status(0), OK);
    // An indirect table (never offered) pointing at garbage: no panic, no status.
    r.desc(0, MEMORY - 16, 64, INDIRECT, 0);
    let before = r.disk();
    r.submit(0);
    assert_eq!(r.disk(), before);
}

#[test]
fn broken_rings_make_the_device_need_a_reset() {
    let mut r = Rig::new();
    // The available index runs more than a queue ahead.
    r.mem.write(AVAIL + 2, &100u16.to_le_bytes()).unwrap();
    r.set(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    let status = r.reg(VIRTIO_MMIO_STATUS);
    assert_ne!(status & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert_eq!(r.used_idx(), 0);
    assert_ne!(
        r.reg(VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG,
        0
    );
    // Further notifies do nothing until the driver resets.
    r.set(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(r.used_idx(), 0);
    // A reset and a fresh setup work again.
    r.mem.write(AVAIL + 2, &0u16.to_le_bytes()).unwrap();
    let mut r2 = Rig::new();
    assert_eq!(r2.request(T_FLUSH, 0, None), (OK, 1));

    // Queue rings outside guest memory.
    let mut r = Rig::new();
    r.set(VIRTIO_MMIO_QUEUE_READY, 0);
    r.set(VIRTIO_MMIO_QUEUE_USED_LOW, (MEMORY - 8) as u32);
    r.set(VIRTIO_MMIO_QUEUE_READY, 1);
    r.publish(&[0]);
    r.set(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_ne!(r.reg(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    // Notifies of queues that do not exist are ignored.
    r.set(VIRTIO_MMIO_QUEUE_NOTIFY, 5);
}

#[test]
fn features_the_device_does_not_offer_are_refused() {
    let mut r = Rig::new();
    // Without VERSION_1 (a legacy driver) the device refuses FEATURES_OK.
    r.handshake(DEVICE_FEATURES & 0xffff_ffff);
    assert_eq!(r.reg(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    // A feature it never offered.
    r.handshake(DEVICE_FEATURES | 1 << 28);
    assert_eq!(r.reg(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    // Requests before DRIVER_OK are not processed.
    r.handshake(DEVICE_FEATURES);
    r.publish(&[0]);
    r.set(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(r.used_idx(), 0);
    // Odd access widths read as zero and write nothing.
    let mut b = [0xffu8; 2];
    r.dev.read(u64::from(VIRTIO_MMIO_MAGIC_VALUE), &mut b);
    assert_eq!(b, [0, 0]);
    r.dev.write(u64::from(VIRTIO_MMIO_STATUS), &[0], &r.mem);
    assert_ne!(r.reg(VIRTIO_MMIO_STATUS), 0);
    let mut far = [0xffu8; 4];
    r.dev.read(0xffc, &mut far);
    assert_eq!(far, [0; 4]);
}

#[test]
fn saved_state_continues_the_queue() {
    let mut r = Rig::new();
    r.mem.write(DATA, &[3u8; 512]).unwrap();
    for s in 0..5 {
        assert_eq!(r.request(T_OUT, s, Some((DATA, 512, 0))).0, OK);
    }
    let state = r.dev.state();
    assert_eq!(state.queue.next_avail, 5);
    assert_eq!(state.queue.next_used, 5);
    assert_eq!(state.queue.size, QSIZE);
    let backend: Arc<dyn BlockBackend> = r.disk.clone();
    let irq = || EventFd::new(EFD_NONBLOCK).unwrap();
    r.dev = VirtioBlk::from_state(0, &state, Arc::clone(&backend), irq()).unwrap();
    assert_eq!(r.dev.state(), state);
    assert_eq!(
        r.request(T_IN, 4, Some((DATA + 4096, 512, WRITE))),
        (OK, 513)
    );
    assert_eq!(r.used_idx(), 6);
    // A disk of another size, or a queue virtio-queue refuses, is not loaded.
    let small: Arc<dyn BlockBackend> = Arc::new(MemDisk::new(512));
    assert!(VirtioBlk::from_state(0, &state, small, irq()).is_err());
    let mut bad = state.clone();
    bad.queue.size = 3;
    assert!(VirtioBlk::from_state(0, &bad, Arc::clone(&backend), irq()).is_err());
    let mut bad = state;
    bad.queue.desc_table = DESC + 1;
    assert!(VirtioBlk::from_state(0, &bad, backend, irq()).is_err());
}

#[test]
fn device_writes_are_marked_as_vmm_writes() {
    let mut r = Rig::new();
    let mut sink = PageBitmap::for_memory(MEMORY);
    r.mem.take_vmm_writes(&mut sink);
    let h = r.header(0, T_IN, 0);
    let mut fresh = PageBitmap::for_memory(MEMORY);
    r.mem.take_vmm_writes(&mut fresh);
    r.desc(0, h, 16, NEXT, 1);
    r.desc(1, DATA + 0x5000, 1024, WRITE | NEXT, 2);
    r.desc(2, STATUS, 1, WRITE, 0);
    r.publish(&[0]);
    let mut before = PageBitmap::for_memory(MEMORY);
    r.mem.take_vmm_writes(&mut before);
    r.set(VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    let mut marked = PageBitmap::for_memory(MEMORY);
    r.mem.take_vmm_writes(&mut marked);
    let pages: Vec<u64> = marked.iter().collect();
    assert_eq!(
        pages,
        vec![USED / 4096, STATUS / 4096, (DATA + 0x5000) / 4096],
        "used ring, status and read data"
    );
}

/// Queues three requests in one notify: OUT of `DATA` to sector 3 (slot 0), IN of sector 3 into
/// `DATA + 0x1000` (slot 1), FLUSH (slot 2).
fn out_in_flush(r: &mut Rig) {
    r.mem.write(DATA, &[0x42; 512]).unwrap();
    let h = r.header(0, T_OUT, 3);
    r.desc(0, h, 16, NEXT, 1);
    r.desc(1, DATA, 512, NEXT, 2);
    r.desc(2, STATUS, 1, WRITE, 0);
    let h = r.header(1, T_IN, 3);
    r.desc(3, h, 16, NEXT, 4);
    r.desc(4, DATA + 0x1000, 512, WRITE | NEXT, 5);
    r.desc(5, STATUS + 1, 1, WRITE, 0);
    let h = r.header(2, T_FLUSH, 0);
    r.desc(6, h, 16, NEXT, 7);
    r.desc(7, STATUS + 2, 1, WRITE, 0);
    r.publish(&[0, 3, 6]);
}

fn notify(r: &mut Rig) -> Option<crate::block::IoStop> {
    r.dev.write(
        u64::from(VIRTIO_MMIO_QUEUE_NOTIFY),
        &0u32.to_le_bytes(),
        &r.mem,
    )
}

#[test]
fn a_full_disk_leaves_every_request_pending_until_retried() {
    let mut r = Rig::new();
    *r.disk.fail_writes.lock().unwrap() = Some((io::ErrorKind::StorageFull, "no space left"));
    out_in_flush(&mut r);
    let stop = notify(&mut r).expect("the write stops the device");
    assert_eq!((stop.disk, stop.kind), (0, io::ErrorKind::StorageFull));
    assert!(
        stop.to_string().contains("the host filesystem is full"),
        "{stop}"
    );
    assert_eq!(r.dev.io_stop(), Some(&stop));
    // Nothing answered: no used entry, no status byte, no interrupt; all three stay available.
    assert_eq!(r.used_idx(), 0);
    assert_eq!([r.status(0), r.status(1), r.status(2)], [0xee; 3]);
    assert_eq!(r.reg(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    assert_eq!(r.dev.state().queue.next_avail, 0);
    // A stopped device takes no notify; a retry while still full stops it again.
    assert_eq!(notify(&mut r), None);
    assert_eq!(r.dev.run_available(&r.mem), Err(stop.clone()));
    assert_eq!(r.used_idx(), 0);
    assert_eq!(r.dev.state().queue.next_avail, 0);

    // Space freed: a device restored from the stopped one's state runs them, as does the
    // stopped device itself; their writes into guest memory are VMM writes.
    *r.disk.fail_writes.lock().unwrap() = None;
    let state = r.dev.state();
    let backend: Arc<dyn BlockBackend> = r.disk.clone();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut restored = VirtioBlk::from_state(0, &state, backend, irq).unwrap();
    assert_eq!(restored.io_stop(), None);
    let mut sink = PageBitmap::for_memory(MEMORY);
    r.mem.take_vmm_writes(&mut sink);
    assert_eq!(restored.run_available(&r.mem), Ok(()));
    let mut marked = PageBitmap::for_memory(MEMORY);
    r.mem.take_vmm_writes(&mut marked);
    assert_eq!(
        marked.iter().collect::<Vec<_>>(),
        vec![USED / 4096, STATUS / 4096, (DATA + 0x1000) / 4096]
    );
    assert_eq!(r.used_idx(), 3);
    assert_eq!([r.status(0), r.status(1), r.status(2)], [OK; 3]);
    assert!(r.disk()[3 * 512..4 * 512].iter().all(|&b| b == 0x42));
    let mut back = [0u8; 512];
    r.mem.read(DATA + 0x1000, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0x42));

    let mut r = Rig::new();
    *r.disk.fail_writes.lock().unwrap() = Some((io::ErrorKind::QuotaExceeded, "quota"));
    out_in_flush(&mut r);
    assert_eq!(notify(&mut r).unwrap().kind, io::ErrorKind::QuotaExceeded);
    *r.disk.fail_writes.lock().unwrap() = None;
    assert_eq!(r.dev.run_available(&r.mem), Ok(()));
    assert_eq!(r.dev.io_stop(), None);
    assert_eq!(r.used_idx(), 3);
    assert_eq!([r.status(0), r.status(1), r.status(2)], [OK; 3]);
}

#[test]
fn damaged_data_stops_at_the_request_that_read_it() {
    let mut r = Rig::new();
    let damage = "layer /d/top.dlayer: block 0: checksum mismatch";
    *r.disk.fail_reads.lock().unwrap() = Some((io::ErrorKind::InvalidData, damage));
    out_in_flush(&mut r);
    let stop = notify(&mut r).expect("the read stops the device");
    assert_eq!(stop.kind, io::ErrorKind::InvalidData);
    assert_eq!(stop.message, damage);
    // The OUT before it completed; the IN and the FLUSH after it wait.
    assert_eq!(r.used_idx(), 1);
    assert_eq!(r.used_entry(0), (0, 1));
    assert_eq!([r.status(0), r.status(1), r.status(2)], [OK, 0xee, 0xee]);
    assert_eq!(r.dev.state().queue.next_avail, 1);
    assert_eq!(r.reg(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
    *r.disk.fail_reads.lock().unwrap() = None;
    assert_eq!(r.dev.run_available(&r.mem), Ok(()));
    assert_eq!(r.used_idx(), 3);
    assert_eq!(r.used_entry(1), (3, 513));
    assert_eq!([r.status(0), r.status(1), r.status(2)], [OK; 3]);
    // A reset drops the pending requests and the stop with them.
    out_in_flush(&mut r);
    *r.disk.fail_reads.lock().unwrap() = Some((io::ErrorKind::InvalidData, damage));
    assert!(notify(&mut r).is_some());
    r.set(VIRTIO_MMIO_STATUS, 0);
    assert_eq!(r.dev.io_stop(), None);
}

#[test]
fn other_backend_errors_reach_the_guest() {
    for kind in [
        io::ErrorKind::Other,
        io::ErrorKind::PermissionDenied,
        io::ErrorKind::UnexpectedEof,
    ] {
        let mut r = Rig::new();
        *r.disk.fail_writes.lock().unwrap() = Some((kind, "failed"));
        *r.disk.fail_reads.lock().unwrap() = Some((kind, "failed"));
        out_in_flush(&mut r);
        assert_eq!(notify(&mut r), None, "{kind:?}");
        assert_eq!(r.used_idx(), 3);
        assert_eq!(
            [r.status(0), r.status(1), r.status(2)],
            [IOERR; 3],
            "{kind:?}"
        );
        assert_eq!(r.dev.io_stop(), None);
    }
}
