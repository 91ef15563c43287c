//! The deterministic test guest (built from `guest/` by the build script) and its parameters.
//!
//! Each tick every vCPU writes pseudo-random words into its own slice of the working set; vCPU 0
//! prints `tick <n> hash <h>` where `h` folds in everything every vCPU has written so far. The output
//! is a pure function of the parameters, so two runs compare line by line.

use serde::{Deserialize, Serialize};

use crate::boot::BootImage;
use crate::error::ConfigError;
use crate::memory::{MMIO_GAP_START, PAGE_SIZE};
use crate::state::VmConfig;

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
}

impl Default for TestGuest {
    fn default() -> Self {
        Self {
            seed: 1,
            working_set_pages: 256,
            mutations_per_tick: 32,
            ticks: 100,
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
        ];
        Ok(BootImage {
            program: TEST_GUEST_PROGRAM.to_vec(),
            params: fields.iter().flat_map(|f| f.to_le_bytes()).collect(),
        })
    }

    /// What the guest computes, computed on the host: its whole serial output and the final
    /// contents of its working set, for a VM with `vcpus` vCPUs. Tests compare a real run with it.
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
            combined = hash.iter().fold(FNV_OFFSET, |h, &v| mix(h, v));
            output.push_str(&format!("tick {t} hash {combined:016x}\n"));
        }
        output.push_str(&format!("done {} hash {combined:016x}\n", self.ticks));
        GuestModel {
            output,
            working_set,
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
