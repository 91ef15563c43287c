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
    /// Words each vCPU writes per tick.
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

    /// The line the guest prints after tick `t` (for checking output shape in tests).
    pub fn is_tick_line(line: &str) -> bool {
        line.starts_with("tick ") && line.contains(" hash ")
    }
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
