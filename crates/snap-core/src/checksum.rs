//! Checksums used by the file format.

/// Computes the CRC-32C (Castagnoli) checksum of `bytes`.
///
/// This is the checksum stored in every file header, both for the header
/// itself and for the payload. It uses hardware acceleration when available.
///
/// ```
/// // Standard CRC-32C check value.
/// assert_eq!(snap_core::crc32c(b"123456789"), 0xE306_9283);
/// ```
#[must_use]
pub fn crc32c(bytes: &[u8]) -> u32 {
    ::crc32c::crc32c(bytes)
}

/// Extends a CRC-32C computed over earlier bytes with `bytes`, so a checksum
/// can be computed over data that arrives in pieces. Start from `0`.
///
/// ```
/// use snap_core::{crc32c, crc32c_append};
/// assert_eq!(crc32c_append(crc32c(b"1234"), b"56789"), crc32c(b"123456789"));
/// ```
#[must_use]
pub fn crc32c_append(crc: u32, bytes: &[u8]) -> u32 {
    ::crc32c::crc32c_append(crc, bytes)
}

/// Extends a CRC-32C with `len` zero bytes without reading them: the CRC of a
/// run of zeros is built by doubling, so this costs O(log len), not O(len).
/// Used for the holes of sparse files.
///
/// ```
/// use snap_core::checksum::{crc32c_append, crc32c_append_zeros};
/// let crc = crc32c_append(0, b"head");
/// assert_eq!(crc32c_append_zeros(crc, 5000), crc32c_append(crc, &[0u8; 5000]));
/// ```
#[must_use]
pub fn crc32c_append_zeros(crc: u32, len: u64) -> u32 {
    let mut result = crc;
    // Zero runs of length 2^k, appended from the highest set bit down so the
    // order of bytes is kept (all runs are zero, so any order gives the same
    // bytes; combining just needs each piece's own length).
    let mut run_crc = ::crc32c::crc32c(&[0u8]);
    let mut run_len: u64 = 1;
    let mut pieces = Vec::new();
    let mut rest = len;
    while rest != 0 {
        if rest & 1 == 1 {
            pieces.push((run_crc, run_len));
        }
        rest >>= 1;
        if rest != 0 {
            run_crc = ::crc32c::crc32c_combine(run_crc, run_crc, run_len as usize);
            run_len <<= 1;
        }
    }
    for (piece_crc, piece_len) in pieces {
        result = ::crc32c::crc32c_combine(result, piece_crc, piece_len as usize);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_runs_match_the_bytes() {
        for len in [
            0u64,
            1,
            2,
            3,
            7,
            4096,
            4097,
            65_535,
            1 << 20,
            (1 << 20) + 12_345,
        ] {
            let zeros = vec![0u8; len as usize];
            for start in [0u32, 0xdead_beef] {
                assert_eq!(
                    crc32c_append_zeros(start, len),
                    crc32c_append(start, &zeros),
                    "len {len}"
                );
            }
        }
    }
}
