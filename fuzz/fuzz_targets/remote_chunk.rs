//! snap-remote's chunk objects, as read back from a bucket anyone may have written: `chunk::open`
//! under the object's own name (its content's digest, when the content decodes) and under
//! another. Each input runs as it is and again with its snap-core checksums made right, so the
//! codec and the size bound are reached.

#![no_main]

use libfuzzer_sys::fuzz_target;
use snap_fuzz::fix_blobs;
use snap_remote::chunk::{self, CHUNK, ChunkError, ChunkId, MAX_CHUNK};

fn check(object: &[u8]) {
    let stranger = ChunkId([0x5a; 32]);
    match chunk::open(&stranger, object) {
        Ok(_) => panic!("content under a name it does not hash to was accepted"),
        Err(ChunkError::WrongContent { found, .. }) => {
            // It decoded: under its true name it opens, and seals back to the same name.
            let content = chunk::open(&found, object).expect("opens under its own name");
            assert!(content.len() <= MAX_CHUNK);
            assert_eq!(ChunkId::of(&content), found);
            assert_eq!(chunk::seal(&content, 1).expect("seals").0, found);
        }
        Err(_) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut fixed = data.to_vec();
    if fix_blobs(&mut fixed, &[CHUNK.magic]) {
        check(&fixed);
    }
});
