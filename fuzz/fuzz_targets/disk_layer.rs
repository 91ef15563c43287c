//! snap-disk's layer file: the two superblocks, the map chunk chain, the block slots. Checks the
//! file with `check_layer`, opens it read-only and reads every block its map holds (whole and in
//! part), then opens it writable and, if it takes writes, writes, commits and reads back.
//!
//! Each input is the file as it is, then (if that changes anything) with the checksums of both
//! superblocks and of every map chunk made right, so the superblock fields and the map chain
//! are parsed when mutated too.

#![no_main]

use libfuzzer_sys::fuzz_target;
use snap_disk::{Disk, DiskError, check_layer};
use snap_fuzz::{MemFile, fix_blobs};

const MAGICS: [[u8; 8]; 2] = [*b"SNAPDLAY", *b"SNAPDMAP"];
/// Bytes read by one call (a range of mapped blocks is read in pieces this large).
const READ_PIECE: u64 = 1 << 20;
/// Bytes the reads of one input cover at most.
const READ_TOTAL: u64 = 16 << 20;

thread_local! {
    static FILE: MemFile = MemFile::new(c"disk_layer");
}

fn read_only(bytes: &[u8]) {
    let path = FILE.with(|f| f.set(bytes).to_path_buf());
    let report = check_layer(&path);
    let Ok(disk) = Disk::open_read_only(&[&path]) else {
        return;
    };
    let report = report.expect("a layer that opens passes check_layer's structure checks");
    let info = disk.layers().remove(0);
    assert_eq!(info.id, report.info.id);
    assert_eq!(info.blocks, report.blocks_checked);
    let size = disk.size();
    let bs = u64::from(disk.block_size());
    let ranges = disk
        .changed_ranges(None, info.id)
        .expect("the layer is in its own chain");
    let mut failed = 0;
    let mut left = READ_TOTAL;
    let mut buf = Vec::new();
    for r in &ranges {
        assert!(r.start < r.end && r.end <= size && r.start.is_multiple_of(bs));
        let mut at = r.start;
        while at < r.end && left > 0 {
            let n = (r.end - at).min(READ_PIECE).min(left);
            buf.resize(n as usize, 0);
            match disk.read_at(at, &mut buf) {
                Ok(()) => {}
                Err(DiskError::BlockChecksum { .. }) => failed += 1,
                Err(e) => panic!("reading mapped blocks {at}+{n} of a layer that opened: {e}"),
            }
            at += n;
            left -= n;
        }
        // A part of a block, which reads the whole block to check it.
        let mut part = [0u8; 512];
        if let Err(e) = disk.read_at(r.start + (bs / 2).min(r.end - r.start - 512), &mut part) {
            assert!(matches!(e, DiskError::BlockChecksum { .. }), "{e}");
        }
    }
    if report.is_clean() {
        assert_eq!(failed, 0, "reads fail where check_layer found no damage");
    }
    // Past the end, and the last sector.
    let mut sector = [0u8; 512];
    assert!(disk.read_at(size, &mut sector).is_err());
    let _ = disk.read_at(size - 512, &mut sector);
}

fn writable(bytes: &[u8]) {
    let path = FILE.with(|f| f.set(bytes).to_path_buf());
    let Ok(disk) = Disk::open(&[&path]) else {
        return;
    };
    if !disk.is_writable() {
        return;
    }
    let data = [0xa5u8; 512];
    let at = disk.size() / 2 / 512 * 512;
    if disk.write_at(at, &data).is_err() || disk.flush().is_err() {
        return;
    }
    drop(disk);
    let disk = Disk::open_read_only(&[&path]).expect("a committed layer opens");
    let mut back = [0u8; 512];
    disk.read_at(at, &mut back)
        .expect("the written block reads back");
    assert_eq!(back, data);
}

fn exercise(bytes: &[u8]) {
    read_only(bytes);
    writable(bytes);
}

fuzz_target!(|data: &[u8]| {
    snap_fuzz::run(data, |data| {
        exercise(data);
        let mut fixed = data.to_vec();
        if fix_blobs(&mut fixed, &MAGICS) {
            exercise(&fixed);
        }
    });
});
