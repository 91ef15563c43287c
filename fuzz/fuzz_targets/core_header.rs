//! snap-core's file header: `FormatSpec::decode`, `decode_prefix`, `decode_header`,
//! `decode_header_prefix` and `read_file_versioned`, checked against each other.
//!
//! Input: one byte choosing the spec's payload cap, then the file. Each file is decoded as it is
//! and again with the spec's magic and both checksums made right, so the checks behind the
//! checksums (version, flags, lengths) run on mutated headers too.

#![no_main]

use libfuzzer_sys::fuzz_target;
use snap_core::{FileErrorKind, FormatSpec, HEADER_LEN};
use snap_fuzz::{MemFile, fix_blobs};

const CAPS: [u64; 6] = [0, 1, 64, 4096, 1 << 20, u64::MAX];

fn spec(selector: u8) -> FormatSpec {
    FormatSpec {
        name: "fuzzed",
        magic: *b"SNAPFUZZ",
        version: 3,
        min_version: 2,
        max_payload: CAPS[usize::from(selector) % CAPS.len()],
    }
}

thread_local! {
    static FILE: MemFile = MemFile::new(c"core_header");
}

fn check(spec: &FormatSpec, bytes: &[u8]) {
    let whole = spec.decode(bytes);
    let prefix = spec.decode_prefix(bytes);
    let head = &bytes[..bytes.len().min(HEADER_LEN)];
    let header = spec.decode_header(head, bytes.len() as u64);
    let header_prefix = spec.decode_header_prefix(head, bytes.len() as u64);

    // The streaming checks agree with the whole-buffer ones.
    match &whole {
        Ok(d) => {
            assert!(d.version >= spec.min_version && d.version <= spec.version);
            assert_eq!(d.payload.len(), bytes.len() - HEADER_LEN);
            assert!(d.payload.len() as u64 <= spec.max_payload);
            let (p, end) = prefix.as_ref().expect("a whole file is also a prefix");
            assert_eq!((p, *end), (d, bytes.len()));
            let h = header
                .as_ref()
                .expect("the header of a valid file is valid");
            assert_eq!(h.payload_len, d.payload.len() as u64);
            assert_eq!(header_prefix.as_ref().ok(), Some(h));
            // What decodes at the current version encodes back to itself.
            if d.version == spec.version {
                assert_eq!(spec.encode(d.payload), bytes);
            }
        }
        Err(e) => {
            if let Err(he) = &header {
                assert_eq!(he, e, "the header check fails first");
            }
        }
    }
    if let Ok((p, end)) = &prefix {
        assert!(*end <= bytes.len());
        assert_eq!(spec.decode(&bytes[..*end]).as_ref(), Ok(p));
        assert!(header_prefix.is_ok());
    }
    if header_prefix.is_err() {
        assert!(prefix.is_err());
    }

    // Reading the file checks the same things in the same order.
    let read = FILE.with(|f| spec.read_file_versioned(f.set(bytes)));
    match (&whole, read) {
        (Ok(d), Ok((version, payload))) => {
            assert_eq!((d.version, d.payload), (version, &payload[..]))
        }
        (Err(e), Err(fe)) => match fe.source {
            FileErrorKind::Format(fe) => assert_eq!(&fe, e),
            other => panic!("reading a memfd failed: {other}"),
        },
        (whole, read) => panic!("decode says {whole:?}, read_file says {read:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    snap_fuzz::run(data, |data| {
        let Some((&selector, file)) = data.split_first() else {
            return;
        };
        let spec = spec(selector);
        check(&spec, file);
        let mut fixed = file.to_vec();
        if fixed.len() >= 8 {
            fixed[..8].copy_from_slice(&spec.magic);
        }
        fix_blobs(&mut fixed, &[spec.magic]);
        if fixed != file {
            check(&spec, &fixed);
        }
    });
});
