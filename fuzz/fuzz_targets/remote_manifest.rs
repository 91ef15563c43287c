//! snap-remote's manifests, as read back from a bucket anyone may have written: `manifest::decode`
//! under the object's own digest (so the parser is reached) and under another name. A manifest
//! that decodes has passed every structural check: encoding it again must succeed and decode to
//! the same manifest, and walking it (its chunks, each frame's data pages) must not fail. Each
//! input runs as it is and again with its snap-core checksum made right.

#![no_main]

use libfuzzer_sys::fuzz_target;
use snap_fuzz::fix_blobs;
use snap_remote::manifest::{self, MANIFEST, ManifestError, ManifestId};

fn check(object: &[u8]) {
    let own = ManifestId(*blake3::hash(object).as_bytes());
    let stranger = ManifestId([0x5a; 32]);
    if own != stranger {
        assert!(matches!(
            manifest::decode(&stranger, object),
            Err(ManifestError::WrongContent { .. })
        ));
    }
    let Ok(m) = manifest::decode(&own, object) else {
        return;
    };
    let named = m.chunks().len();
    let frames: u64 = m
        .memory
        .iter()
        .flat_map(|l| &l.frames)
        .map(|f| f.data_pages())
        .sum();
    assert!(frames <= m.snapshot.memory_bytes / 4096 * m.memory.len() as u64);
    let (id, again) = manifest::encode(&m).expect("a manifest that decodes encodes");
    let back = manifest::decode(&id, &again).expect("and decodes again");
    assert_eq!(back, m);
    assert_eq!(back.chunks().len(), named);
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut fixed = data.to_vec();
    if fix_blobs(&mut fixed, &[MANIFEST.magic]) {
        check(&fixed);
    }
});
