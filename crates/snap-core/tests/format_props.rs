//! Property tests for the file format: exact round trips, and every single-bit
//! flip or truncation of an encoded file is rejected (never accepted, never a
//! panic).

use proptest::prelude::*;
use snap_core::{FormatErrorKind, FormatSpec, HEADER_LEN};

const SPEC: FormatSpec = FormatSpec {
    name: "prop",
    magic: *b"SNAPPROP",
    version: 4,
    min_version: 2,
    max_payload: 4096,
};

proptest! {
    #[test]
    fn round_trip_is_exact(payload in proptest::collection::vec(any::<u8>(), 0..=4096)) {
        let bytes = SPEC.encode(&payload);
        prop_assert_eq!(bytes.len(), HEADER_LEN + payload.len());
        prop_assert_eq!(&bytes[..HEADER_LEN], &SPEC.header(&payload)[..]);
        let decoded = SPEC.decode(&bytes).unwrap();
        prop_assert_eq!(decoded.version, 4);
        prop_assert_eq!(decoded.payload, &payload[..]);
    }

    #[test]
    fn any_single_bit_flip_is_rejected(
        payload in proptest::collection::vec(any::<u8>(), 0..512),
        bit in any::<prop::sample::Index>(),
    ) {
        let mut bytes = SPEC.encode(&payload);
        let bit = bit.index(bytes.len() * 8);
        bytes[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(SPEC.decode(&bytes).is_err(), "bit {} flip accepted", bit);
    }

    #[test]
    fn any_truncation_is_rejected(
        payload in proptest::collection::vec(any::<u8>(), 0..512),
        cut in any::<prop::sample::Index>(),
    ) {
        let bytes = SPEC.encode(&payload);
        let len = cut.index(bytes.len()); // strictly shorter
        let err = SPEC.decode(&bytes[..len]).unwrap_err();
        let is_truncated = matches!(err.kind(), FormatErrorKind::Truncated { .. });
        prop_assert!(is_truncated, "{}", err);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
        let _ = SPEC.decode(&bytes);
    }

    #[test]
    fn arbitrary_payload_after_valid_magic_never_panics(
        rest in proptest::collection::vec(any::<u8>(), 0..128),
    ) {
        let mut bytes = SPEC.magic.to_vec();
        bytes.extend_from_slice(&rest);
        let _ = SPEC.decode(&bytes);
    }
}

/// Exhaustive version of the property tests for a few fixed payloads: every
/// bit of every byte, and every shorter length.
#[test]
fn exhaustive_flips_and_truncations() {
    for payload in [&b""[..], b"a", b"hello, world", &[0xFF; 100]] {
        let bytes = SPEC.encode(payload);
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(SPEC.decode(&flipped).is_err(), "bit {bit} flip accepted");
        }
        for len in 0..bytes.len() {
            assert!(
                SPEC.decode(&bytes[..len]).is_err(),
                "truncation to {len} accepted"
            );
        }
    }
}

/// Files round-trip through the filesystem too.
#[test]
fn file_round_trip_random_payloads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prop.bin");
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(32));
    runner
        .run(
            &proptest::collection::vec(any::<u8>(), 0..=4096),
            |payload| {
                SPEC.write_file(&path, &payload).unwrap();
                prop_assert_eq!(SPEC.read_file(&path).unwrap(), payload);
                Ok(())
            },
        )
        .unwrap();
}

proptest! {
    /// A blob at the start of a longer file decodes the same with anything after it, and a
    /// truncated one is still refused.
    #[test]
    fn prefix_decoding_ignores_what_follows(
        payload in proptest::collection::vec(any::<u8>(), 0..512),
        tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut bytes = SPEC.encode(&payload);
        let len = bytes.len();
        bytes.extend_from_slice(&tail);
        let (decoded, end) = SPEC.decode_prefix(&bytes).unwrap();
        prop_assert_eq!(decoded.payload, &payload[..]);
        prop_assert_eq!(end, len);
        let info = SPEC.decode_header_prefix(&bytes[..HEADER_LEN], bytes.len() as u64).unwrap();
        prop_assert_eq!(info.payload_len, payload.len() as u64);
        if !payload.is_empty() {
            let err = SPEC.decode_prefix(&bytes[..len - 1]).unwrap_err();
            let truncated = matches!(err.kind(), FormatErrorKind::Truncated { .. });
            prop_assert!(truncated, "{err}");
        }
    }
}
