//! snap-mem's recorded working-set file: header, index of units, data section. Opens it with
//! `WorkingSet::open` (with the unit, memory size and tag a restore would pass: the file's own,
//! when they are values a restore can pass) and reads every stored unit with
//! `WorkingSet::check`.
//!
//! Each input is the file as it is, then (if that changes anything) with the parameters made
//! ones a restore passes, the entry count matching the index and both checksums right.

#![no_main]

use libfuzzer_sys::fuzz_target;
use snap_fuzz::{MemFile, fix_blobs};
use snap_mem::layer::MAX_MEMORY_BYTES;
use snap_mem::working_set::WorkingSet;

const MAGIC: [u8; 8] = *b"SNAPWSET";
/// Header, then the index's fixed part: unit pages, memory bytes, tag, entry count.
const FIXED_END: usize = 32 + 8 + 8 + 32 + 8;
const ENTRY_LEN: u64 = 12;
/// Restore units are a power of two from one page up to the largest frame (2 MiB).
const MAX_UNIT_PAGES: u64 = 512;

thread_local! {
    static FILE: MemFile = MemFile::new(c"mem_working_set");
}

fn word(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn valid_unit(u: u64) -> bool {
    u.is_power_of_two() && u <= MAX_UNIT_PAGES
}

fn valid_memory(m: u64) -> bool {
    m > 0 && m.is_multiple_of(4096) && m <= MAX_MEMORY_BYTES
}

/// What a restore would pass for this file: its own values where a restore can pass them.
fn params(b: &[u8]) -> (u64, u64, [u8; 32]) {
    if b.len() < FIXED_END {
        return (16, 1 << 20, [0; 32]);
    }
    let unit = Some(word(b, 32)).filter(|&u| valid_unit(u)).unwrap_or(16);
    let memory = Some(word(b, 40))
        .filter(|&m| valid_memory(m))
        .unwrap_or(1 << 20);
    (unit, memory, b[48..80].try_into().unwrap())
}

fn fixed(file: &[u8]) -> Vec<u8> {
    let mut b = file.to_vec();
    if b.len() >= FIXED_END {
        let (unit, memory, _) = params(&b);
        b[32..40].copy_from_slice(&unit.to_le_bytes());
        b[40..48].copy_from_slice(&memory.to_le_bytes());
        let payload = word(&b, 16);
        if payload >= (FIXED_END - 32) as u64 {
            let count = (payload - (FIXED_END - 32) as u64) / ENTRY_LEN;
            b[80..88].copy_from_slice(&count.to_le_bytes());
        }
    }
    fix_blobs(&mut b, &[MAGIC]);
    b
}

fn exercise(bytes: &[u8]) {
    let (unit, memory, tag) = params(bytes);
    let Some(set) = FILE.with(|f| WorkingSet::open(f.set(bytes), unit, memory, tag).ok()) else {
        return;
    };
    assert_eq!(set.unit_pages(), unit);
    assert!(set.has_data());
    let units = memory.div_ceil(4096).div_ceil(unit);
    assert!(set.units().all(|u| u < units));
    let bad = set.check().expect("an opened set's data is in its file");
    assert!(bad.len() <= set.len());
}

fuzz_target!(|data: &[u8]| {
    snap_fuzz::run(data, |data| {
        exercise(data);
        let fixed = fixed(data);
        if fixed != data {
            exercise(&fixed);
        }
    });
});
