//! Reads check the blocks of layers the disk does not write into against their CRC-32C: a
//! damaged block fails every read that touches it (whole or in part) with an error naming the
//! layer file and the block, every other block reads as written, and a write that replaces the
//! block in the top makes it readable again.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use snap_disk::{Disk, DiskError, Geometry, check_layer};

const B: u64 = 65536;
const BLOCKS: u64 = 8;
/// Where in its block the damage goes.
const DAMAGE_AT: u64 = 30000;

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The slot of the layer file at `path` whose data starts with `data` (found by scanning).
fn find_slot(path: &Path, data: &[u8]) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    (0..)
        .map(|s| 8192 + s * B)
        .take_while(|&off| off + 64 <= bytes.len() as u64)
        .find(|&off| bytes[off as usize..off as usize + 64] == data[..64])
        .map(|off| (off - 8192) / B)
        .expect("the block is in the file")
}

/// Flips bytes inside the block of `path` that holds `data`.
fn damage(path: &Path, data: &[u8]) {
    let slot = find_slot(path, data);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let at = 8192 + slot * B + DAMAGE_AT;
    let flipped: Vec<u8> = data[DAMAGE_AT as usize..DAMAGE_AT as usize + 16]
        .iter()
        .map(|b| !b)
        .collect();
    f.write_all_at(&flipped, at).unwrap();
}

/// A sealed base `0` holding blocks 0..BLOCKS (block `b` is `pattern(b)`), under a top `1`
/// that holds block 2 (`pattern(100)`), with block 5 of the base damaged.
fn damaged_chain(dir: &Path) -> Vec<PathBuf> {
    let paths = vec![dir.join("0"), dir.join("1")];
    let disk = Disk::create(&paths[0], Geometry::new(BLOCKS * B)).unwrap();
    for b in 0..BLOCKS {
        disk.write_at(b * B, &pattern(b, B as usize)).unwrap();
    }
    disk.seal(&paths[1]).unwrap();
    disk.write_at(2 * B, &pattern(100, B as usize)).unwrap();
    drop(disk);
    damage(&paths[0], &pattern(5, B as usize));
    paths
}

fn expected(block: u64) -> Vec<u8> {
    pattern(if block == 2 { 100 } else { block }, B as usize)
}

fn assert_names_block_5(e: &DiskError, base: &Path) {
    match e {
        DiskError::BlockChecksum { path, block, .. } => {
            assert_eq!((path.as_path(), *block), (base, 5), "{e}");
        }
        other => panic!("expected a checksum error for block 5, got {other}"),
    }
    let message = e.to_string();
    assert!(
        message.contains(&base.display().to_string()) && message.contains("block 5"),
        "{message}"
    );
    assert_eq!(e.io_kind(), std::io::ErrorKind::InvalidData);
}

#[test]
fn a_damaged_block_of_a_sealed_layer_fails_every_read_of_it_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let paths = damaged_chain(dir.path());
    let disk = Disk::open(&paths).unwrap();
    // The first read of it is partial, far from the damage: the whole block is checked.
    for (offset, len) in [
        (5 * B, 512),
        (5 * B + 4096, 4096),
        (5 * B, B),
        (4 * B + 512, 2 * B),
        (0, BLOCKS * B),
    ] {
        let e = disk
            .read_at(offset, &mut vec![0u8; len as usize])
            .unwrap_err();
        assert_names_block_5(&e, &paths[0]);
    }
    // Every other block reads as written, whole and in pieces (checked the first time).
    for block in (0..BLOCKS).filter(|&b| b != 5) {
        let want = expected(block);
        let mut got = vec![0u8; B as usize];
        if block % 2 == 0 {
            disk.read_at(block * B, &mut got).unwrap();
        } else {
            for (i, piece) in got.chunks_mut(4096).enumerate().rev() {
                disk.read_at(block * B + i as u64 * 4096, piece).unwrap();
            }
        }
        assert!(got == want, "block {block}");
    }
    let mut run = vec![0u8; 3 * B as usize];
    disk.read_at(B + 1024, &mut run[..3 * B as usize - 2048])
        .unwrap();
    assert!(run[..B as usize - 1024] == expected(1)[1024..]);
    // Still damaged on the next read, and a write that needs the rest of the block fails
    // without breaking the disk.
    assert_names_block_5(
        &disk.read_at(5 * B, &mut [0u8; 512]).unwrap_err(),
        &paths[0],
    );
    assert_names_block_5(&disk.write_at(5 * B, &[1u8; 512]).unwrap_err(), &paths[0]);
    assert!(disk.is_writable());
    // A write of the whole block replaces it: the damaged data is no longer what the disk
    // shows.
    let new = pattern(200, B as usize);
    disk.write_at(5 * B, &new).unwrap();
    disk.write_at(5 * B + 512, &[7u8; 512]).unwrap();
    let mut got = vec![0u8; B as usize];
    disk.read_at(5 * B, &mut got).unwrap();
    assert!(got[..512] == new[..512] && got[512..1024] == [7u8; 512] && got[1024..] == new[1024..]);
    disk.flush().unwrap();
    drop(disk);
    let disk = Disk::open(&paths).unwrap();
    let mut all = vec![0u8; (BLOCKS * B) as usize];
    disk.read_at(0, &mut all).unwrap();
    assert!(all[5 * B as usize..6 * B as usize] == got);
    // The damage is still in the base, where check_layer names it.
    let report = check_layer(&paths[0]).unwrap();
    assert_eq!(report.problems.len(), 1, "{report}");
    assert!(report.problems[0].contains("block 5"), "{report}");
}

#[test]
fn a_chain_whose_top_is_sealed_or_read_only_checks_its_top_too() {
    let dir = tempfile::tempdir().unwrap();
    let paths = damaged_chain(dir.path());
    let base = Disk::open(&paths[..1]).unwrap();
    assert!(!base.is_writable());
    assert_names_block_5(
        &base.read_at(5 * B + 512, &mut [0u8; 1024]).unwrap_err(),
        &paths[0],
    );
    drop(base);
    // The top of a chain opened read-only does not change while open: it is checked too.
    let top_data = pattern(100, B as usize);
    damage(&paths[1], &top_data);
    let ro = Disk::open_read_only(&paths).unwrap();
    match ro.read_at(2 * B, &mut [0u8; 512]).unwrap_err() {
        DiskError::BlockChecksum { path, block, .. } => {
            assert_eq!((path, block), (paths[1].clone(), 2))
        }
        other => panic!("{other}"),
    }
    drop(ro);
    // The writable top is not checked on read (it is being written): the damaged bytes show.
    let disk = Disk::open(&paths).unwrap();
    let mut got = vec![0u8; B as usize];
    disk.read_at(2 * B, &mut got).unwrap();
    assert!(got != top_data);
    assert!(got[..DAMAGE_AT as usize] == top_data[..DAMAGE_AT as usize]);
}

#[test]
fn threads_reading_a_sealed_chain_share_its_checks() {
    let dir = tempfile::tempdir().unwrap();
    let paths = damaged_chain(dir.path());
    let disk = Arc::new(Disk::open(&paths).unwrap());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let disk = Arc::clone(&disk);
            let base = paths[0].clone();
            std::thread::spawn(move || {
                for round in 0..3u64 {
                    for i in 0..BLOCKS * 16 {
                        // Each thread walks the 4 KiB pieces in its own order.
                        let piece = (i * (2 * t + 1) + round * 7) % (BLOCKS * 16);
                        let (block, at) = (piece / 16, (piece % 16) * 4096);
                        let mut got = vec![0u8; 4096];
                        match disk.read_at(block * B + at, &mut got) {
                            Ok(()) => {
                                assert_ne!(block, 5);
                                let want = expected(block);
                                assert!(got[..] == want[at as usize..at as usize + 4096]);
                            }
                            Err(e) => assert_names_block_5(&e, &base),
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn pieces_of_blocks_read_through_a_changing_chain_are_their_own() {
    // Blocks of different sealed layers sit in the same slot numbers; each piece read must
    // come from its own block, also after a merge rewrote a sealed layer's slots.
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let disk = Disk::create(&p("0"), Geometry::new(4 * B)).unwrap();
    disk.write_at(0, &pattern(10, B as usize)).unwrap();
    disk.seal(&p("1")).unwrap();
    disk.write_at(B, &pattern(11, B as usize)).unwrap();
    disk.seal(&p("2")).unwrap();
    disk.write_at(2 * B, &pattern(12, B as usize)).unwrap();
    disk.seal(&p("3")).unwrap();
    let mut model = vec![0u8; 4 * B as usize];
    for (b, seed) in [(0usize, 10), (1, 11), (2, 12)] {
        model[b * B as usize..(b + 1) * B as usize].copy_from_slice(&pattern(seed, B as usize));
    }
    let read_in_pieces = |disk: &Disk, model: &[u8]| {
        // Alternate between blocks, a piece of each at a time.
        for piece in 0..16u64 {
            for block in 0..4u64 {
                let at = block * B + piece * 4096;
                let mut got = [0u8; 4096];
                disk.read_at(at, &mut got).unwrap();
                assert!(
                    got[..] == model[at as usize..at as usize + 4096],
                    "block {block} piece {piece}"
                );
            }
        }
    };
    read_in_pieces(&disk, &model);
    // Fold layer 1 into layer 0's file: layer 0's slots now hold other blocks.
    let out = disk.merge(0, snap_disk::MergeInto::Parent).unwrap();
    std::fs::remove_file(out.unused).unwrap();
    read_in_pieces(&disk, &model);
    disk.write_at(B, &pattern(13, B as usize)).unwrap();
    model[B as usize..2 * B as usize].copy_from_slice(&pattern(13, B as usize));
    read_in_pieces(&disk, &model);
}
