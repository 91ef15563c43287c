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
