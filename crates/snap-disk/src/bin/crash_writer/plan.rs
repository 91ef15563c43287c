//! What the crash writer writes and where, shared with the crash test that checks it (the
//! test includes this file), so both compute the same bytes and the same chain.

use std::path::{Path, PathBuf};

/// The bytes of write `k` of a run with `seed`.
pub fn data(seed: u64, k: u64, len: usize) -> Vec<u8> {
    let mut x = seed ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The layer files of the chain in `dir`, oldest first (named 0, 1, 2, ...).
pub fn chain(dir: &Path) -> Vec<PathBuf> {
    (0..)
        .map(|i| dir.join(i.to_string()))
        .take_while(|p| p.exists())
        .collect()
}
