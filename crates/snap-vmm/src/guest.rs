//! The deterministic test guest (built from `guest/` by the build script) and its parameters.
//!
//! Each tick every vCPU writes pseudo-random words into its own slice of the working set; vCPU 0
//! prints `tick <n> hash <h>` where `h` folds in everything every vCPU has written so far. The output
//! is a pure function of the parameters, so two runs compare line by line.
//!
//! With `disk_blocks_per_tick > 0` vCPU 0 also drives disk 0 (a polled virtio-blk driver): each
//! tick it writes that many sectors of pseudo-random content at pseudo-random positions in the
//! first `disk_sectors` sectors, flushes, reads back the last sector written (checking it) and
//! one pseudo-random sector, and appends ` disk <h>` to its line, `h` hashing everything written
//! and read so far. The model computes that too, and the disk contents at the end.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::block::{BlockBackend, SECTOR_SIZE};
use crate::boot::BootImage;
use crate::error::{ConfigError, VmError};
use crate::memory::{MMIO_GAP_START, PAGE_SIZE};
use crate::state::VmConfig;
use crate::virtio::{self, MMIO_BASE};
use crate::vm::{Vm, VmOptions};

/// The test guest as a flat binary.
pub const TEST_GUEST_PROGRAM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/test_guest.bin"));

/// Magic the guest checks in its boot parameters ("SNAGEST1").
const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"SNAGEST1");
/// Where the guest keeps its per-vCPU progress and hash log.
pub const STATUS_BASE: u64 = 2 << 20;
/// Size of the status area.
pub const STATUS_SIZE: u64 = 2 << 20;
/// Offset of the hash log inside the status area.
const HASH_LOG_OFFSET: u64 = 4096;
/// First page of the working set.
pub const WORKING_SET_BASE: u64 = STATUS_BASE + STATUS_SIZE;
/// Pages the disk driver keeps its queue and buffers in, right after the working set.
pub const DISK_AREA_PAGES: u64 = 8;
/// Most sectors the guest writes to its disk per tick.
pub const MAX_DISK_BLOCKS_PER_TICK: u64 = 16;

/// Parameters of the test guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestGuest {
    /// Seed of the pseudo-random writes.
    pub seed: u64,
    /// Pages in the working set, split evenly between vCPUs.
    pub working_set_pages: u64,
    /// Pages each vCPU mutates per tick: each mutation writes one pseudo-random word into one
    /// pseudo-randomly chosen page of its slice (a page may be chosen twice).
    pub mutations_per_tick: u64,
    /// Ticks to run before finishing.
    pub ticks: u64,
    /// Sectors vCPU 0 writes to disk 0 per tick (0: the guest does not touch a disk, and its
    /// output has no ` disk <h>` part).
    pub disk_blocks_per_tick: u64,
    /// Sectors at the start of disk 0 the guest writes and reads (the disk must hold them).
    pub disk_sectors: u64,
}

impl Default for TestGuest {
    fn default() -> Self {
        Self {
            seed: 1,
            working_set_pages: 256,
            mutations_per_tick: 32,
            ticks: 100,
            disk_blocks_per_tick: 0,
            disk_sectors: 2048,
        }
    }
}

impl TestGuest {
    /// Checks the parameters against the VM they are to run in.
    ///
    /// # Errors
    /// [`ConfigError::GuestParams`] saying what does not fit.
    pub fn validate(&self, vm: &VmConfig) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::GuestParams(m));
        let vcpus = u64::from(vm.vcpus.max(1));
        if self.working_set_pages < vcpus {
            return bad(format!(
                "working set of {} pages is smaller than one page per vCPU ({vcpus})",
                self.working_set_pages
            ));
        }
        let room = vm
            .memory_bytes
            .min(MMIO_GAP_START)
            .saturating_sub(WORKING_SET_BASE)
            / PAGE_SIZE;
        if self.working_set_pages > room {
            return bad(format!(
                "working set of {} pages does not fit: {} MiB of memory leaves room for {room}",
                self.working_set_pages,
                vm.memory_bytes >> 20
            ));
        }
        if self.disk_blocks_per_tick > 0 {
            if self.disk_blocks_per_tick > MAX_DISK_BLOCKS_PER_TICK {
                return bad(format!(
                    "{} disk blocks per tick, at most {MAX_DISK_BLOCKS_PER_TICK}",
                    self.disk_blocks_per_tick
                ));
            }
            if self.disk_sectors == 0 {
                return bad("disk use with a disk span of 0 sectors".into());
            }
            if self.working_set_pages + DISK_AREA_PAGES > room {
                return bad(format!(
                    "working set of {} pages and {DISK_AREA_PAGES} pages of disk queue do not \
                     fit: {} MiB of memory leaves room for {room}",
                    self.working_set_pages,
                    vm.memory_bytes >> 20
                ));
            }
        }
        let log_entries = (STATUS_SIZE - HASH_LOG_OFFSET) / 8;
        if self.ticks.saturating_mul(vcpus) > log_entries {
            return bad(format!(
                "{} ticks x {vcpus} vCPUs exceeds the hash log of {log_entries} entries",
                self.ticks
            ));
        }
        Ok(())
    }

    /// The boot image for a VM of shape `vm`.
    ///
    /// # Errors
    /// As [`TestGuest::validate`].
    pub fn boot_image(&self, vm: &VmConfig) -> Result<BootImage, ConfigError> {
        self.validate(vm)?;
        let fields = [
            BOOT_MAGIC,
            self.seed,
            WORKING_SET_BASE,
            self.working_set_pages,
            self.mutations_per_tick,
            self.ticks,
            u64::from(vm.vcpus),
            STATUS_BASE,
            self.disk_blocks_per_tick,
            self.disk_sectors,
            self.disk_area(),
            MMIO_BASE,
        ];
        Ok(BootImage {
            program: TEST_GUEST_PROGRAM.to_vec(),
            params: fields.iter().flat_map(|f| f.to_le_bytes()).collect(),
        })
    }

    /// Guest physical address of the disk driver's queue and buffers.
    pub fn disk_area(&self) -> u64 {
        WORKING_SET_BASE + self.working_set_pages * PAGE_SIZE
    }

    /// Checks that `disks` give the guest what it needs: with disk use, a disk 0 that holds
    /// `disk_sectors` sectors.
    ///
    /// # Errors
    /// [`ConfigError::GuestParams`] saying what is missing.
    pub fn check_disks(&self, disks: &[Arc<dyn BlockBackend>]) -> Result<(), ConfigError> {
        if self.disk_blocks_per_tick == 0 {
            return Ok(());
        }
        let need = self.disk_sectors.saturating_mul(SECTOR_SIZE);
        match disks.first() {
            None => Err(ConfigError::GuestParams(format!(
                "the guest writes {} blocks per tick but the VM has no disk",
                self.disk_blocks_per_tick
            ))),
            Some(d) if d.size() < need => Err(ConfigError::GuestParams(format!(
                "the guest uses {} sectors ({need} bytes) of disk 0, which holds only {} bytes",
                self.disk_sectors,
                d.size()
            ))),
            Some(_) => Ok(()),
        }
    }

    /// Creates a paused VM of shape `config` running this guest, with `options` (and its disks),
    /// after checking the parameters against both.
    ///
    /// # Errors
    /// [`VmError::Config`] for parameters that do not fit; otherwise as [`Vm::create_with`].
    pub fn create_vm(&self, config: VmConfig, options: &VmOptions) -> Result<Vm, VmError> {
        self.check_disks(&options.disks)?;
        Vm::create_with(config, &self.boot_image(&config)?, options)
    }

    /// What the guest computes, computed on the host: its whole serial output, the final
    /// contents of its working set and of the disk span it uses (from a zeroed disk), for a VM
    /// with `vcpus` vCPUs. Tests compare a real run with it.
    pub fn model(&self, vcpus: u32) -> GuestModel {
        let ncpu = u64::from(vcpus.max(1));
        let pages = self.working_set_pages / ncpu;
        let mut working_set = vec![0u8; (self.working_set_pages * PAGE_SIZE) as usize];
        let mut rng: Vec<u64> = (0..ncpu)
            .map(
                |c| match self.seed ^ 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(c + 1) {
                    0 => 1,
                    r => r,
                },
            )
            .collect();
        let mut hash: Vec<u64> = (0..ncpu).map(|c| mix(FNV_OFFSET, c)).collect();
        let mut output = String::new();
        let mut combined = FNV_OFFSET;
        let mut disk = (self.disk_blocks_per_tick > 0).then(|| DiskModel::new(self));
        for t in 1..=self.ticks {
            for c in 0..ncpu as usize {
                for _ in 0..self.mutations_per_tick {
                    let r = next_random(&mut rng[c]);
                    let page = r % pages;
                    let word = (r >> 40) % (PAGE_SIZE / 8);
                    let value = next_random(&mut rng[c]);
                    let at = ((c as u64 * pages + page) * PAGE_SIZE + word * 8) as usize;
                    working_set[at..at + 8].copy_from_slice(&value.to_le_bytes());
                    hash[c] = mix(mix(mix(hash[c], page), word), value);
                }
            }
            let disk_part = match &mut disk {
                Some(d) => {
                    d.tick(self);
                    format!(" disk {:016x}", d.hash)
                }
                None => String::new(),
            };
            combined = hash.iter().fold(FNV_OFFSET, |h, &v| mix(h, v));
            output.push_str(&format!("tick {t} hash {combined:016x}{disk_part}\n"));
        }
        let disk_part = disk
            .as_ref()
            .map_or(String::new(), |d| format!(" disk {:016x}", d.hash));
        output.push_str(&format!(
            "done {} hash {combined:016x}{disk_part}\n",
            self.ticks
        ));
        GuestModel {
            output,
            working_set,
            disk: disk.map_or(Vec::new(), |d| d.contents),
        }
    }
}

/// The test guest's behaviour computed on the host (see [`TestGuest::model`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestModel {
    /// Everything the guest prints in a full run.
    pub output: String,
    /// The working set at the end of the run, starting at [`WORKING_SET_BASE`].
    pub working_set: Vec<u8>,
    /// The first `disk_sectors` sectors of disk 0 at the end of the run (empty without disk use).
    pub disk: Vec<u8>,
}

/// What the guest's disk driver does, on the host (as `disk_init` / `disk_tick` in main.c).
struct DiskModel {
    rng: u64,
    hash: u64,
    contents: Vec<u8>,
}

impl DiskModel {
    fn new(guest: &TestGuest) -> Self {
        let rng = match guest.seed ^ 0xd1b5_4a32_d192_ed03 {
            0 => 1,
            r => r,
        };
        let hash = virtio::blk::disk_id(0)
            .iter()
            .fold(mix(FNV_OFFSET, 0xd15c), |h, &b| mix(h, u64::from(b)));
        Self {
            rng,
            hash,
            contents: vec![0u8; (guest.disk_sectors * SECTOR_SIZE) as usize],
        }
    }

    fn tick(&mut self, guest: &TestGuest) {
        let words = (SECTOR_SIZE / 8) as usize;
        for _ in 0..guest.disk_blocks_per_tick {
            let sector = next_random(&mut self.rng) % guest.disk_sectors;
            self.hash = mix(self.hash, sector);
            let at = (sector * SECTOR_SIZE) as usize;
            for w in 0..words {
                let v = next_random(&mut self.rng);
                self.hash = mix(self.hash, v);
                self.contents[at + w * 8..at + w * 8 + 8].copy_from_slice(&v.to_le_bytes());
            }
        }
        let other = next_random(&mut self.rng) % guest.disk_sectors;
        self.hash = mix(self.hash, other);
        let at = (other * SECTOR_SIZE) as usize;
        for w in 0..words {
            let b = &self.contents[at + w * 8..at + w * 8 + 8];
            self.hash = mix(
                self.hash,
                u64::from_le_bytes(b.try_into().expect("8 bytes")),
            );
        }
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

fn mix(h: u64, v: u64) -> u64 {
    (h ^ v).wrapping_mul(FNV_PRIME)
}

/// xorshift64*, as in guest/main.c.
fn next_random(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_that_do_not_fit_are_refused() {
        let vm = VmConfig {
            memory_bytes: 8 << 20,
            vcpus: 2,
        };
        let ok = TestGuest {
            working_set_pages: 1024,
            ..Default::default()
        };
        assert!(ok.validate(&vm).is_ok());
        let too_big = TestGuest {
            working_set_pages: 1025,
            ..ok
        };
        assert!(too_big.validate(&vm).is_err());
        let too_small = TestGuest {
            working_set_pages: 1,
            ..ok
        };
        assert!(too_small.validate(&vm).is_err());
        let too_long = TestGuest {
            ticks: 1 << 20,
            ..ok
        };
        assert!(too_long.validate(&vm).is_err());
    }

    #[test]
    fn the_program_was_built() {
        // The entry is `out %al, $0xf5`.
        assert_eq!(&TEST_GUEST_PROGRAM[..2], &[0xe6, 0xf5]);
    }
}
