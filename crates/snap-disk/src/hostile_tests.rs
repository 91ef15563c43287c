//! Files whose checksums are right but whose metadata lies: opening must refuse them with an
//! error naming the problem, without panicking or allocating what the file claims.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use snap_core::{HEADER_LEN, Id};

use crate::disk::Disk;
use crate::error::DiskError;
use crate::format::{DATA_OFFSET, MapEntry, SB_LEN, SB_OFFSETS, Superblock, encode_chunk};
use crate::layer::LayerFile;
use crate::meta::{Digest, Geometry};

const BLOCK: u32 = 4096;

/// A sealed layer of 64 blocks written over several commits (a map chain of several chunks).
fn layer(dir: &Path) -> PathBuf {
    let path = dir.join("l");
    let disk = Disk::create(
        &path,
        Geometry {
            disk_bytes: 64 * u64::from(BLOCK),
            block_size: BLOCK,
        },
    )
    .unwrap();
    for round in 0..4u8 {
        for block in (0..64).filter(|b| b % 4 == u64::from(round)) {
            disk.write_at(block * u64::from(BLOCK), &[round + 1; BLOCK as usize])
                .unwrap();
        }
        disk.flush().unwrap();
    }
    disk.seal(&dir.join("top")).unwrap();
    path
}

fn newest(path: &Path) -> Superblock {
    let f = std::fs::File::open(path).unwrap();
    let mut best: Option<Superblock> = None;
    for at in SB_OFFSETS {
        let mut b = [0u8; SB_LEN];
        f.read_exact_at(&mut b, at).unwrap();
        if let Ok(sb) = Superblock::decode(&b) {
            if best.is_none_or(|x| sb.generation > x.generation) {
                best = Some(sb);
            }
        }
    }
    best.unwrap()
}

/// Writes `sb` (checksummed) into both superblock areas, so no older state is left to fall
/// back on.
fn put(path: &Path, sb: Superblock) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    for ahead in [1, 2] {
        let sb = Superblock {
            generation: sb.generation + ahead,
            ..sb
        };
        f.write_all_at(&sb.encode(), SB_OFFSETS[(sb.generation % 2) as usize])
            .unwrap();
    }
}

fn refused(edit: impl FnOnce(&Path, Superblock) -> Superblock, expect: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = layer(dir.path());
    let sb = edit(&path, newest(&path));
    put(&path, sb);
    let err = LayerFile::open(&path, false).map(|_| ()).expect_err(expect);
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains(expect), "{text} (wanted {expect:?})");
}

#[test]
fn superblock_lies_are_refused() {
    refused(
        |_, sb| Superblock {
            slots: 1 << 40,
            ..sb
        },
        "more than the",
    );
    refused(
        |_, sb| Superblock {
            map_head: Some(sb.slots),
            ..sb
        },
        "does not fit",
    );
    refused(
        |_, sb| Superblock {
            map_entries: 1 << 30,
            ..sb
        },
        "map entries for a disk",
    );
    refused(
        |_, sb| Superblock {
            map_entries: sb.map_entries - 1,
            ..sb
        },
        "the superblock records",
    );
    refused(
        |_, sb| Superblock {
            map_chunks: sb.map_chunks + 1,
            ..sb
        },
        "the superblock records",
    );
    refused(
        |_, sb| Superblock {
            map_chunks: 1,
            ..sb
        },
        "longer than",
    );
    refused(
        |_, sb| Superblock {
            geometry: Geometry {
                disk_bytes: 1 << 60,
                ..sb.geometry
            },
            ..sb
        },
        "disk size",
    );
    refused(
        |_, sb| Superblock {
            geometry: Geometry {
                block_size: 8192,
                ..sb.geometry
            },
            ..sb
        },
        "map entries for a disk of 32 blocks",
    );
    refused(
        |_, sb| Superblock {
            digest: Some(Digest([7; 32])),
            ..sb
        },
        "does not match the digest",
    );
    refused(
        |_, sb| Superblock {
            id: Id([1; 16]),
            ..sb
        },
        "does not match the digest",
    );
    refused(
        |_, sb| Superblock {
            slots: sb.slots + 1000,
            ..sb
        },
        "truncated",
    );
}

/// Puts a chunk holding `entries` (at generation `generation`) in a fresh slot past the end and
/// makes it the head of the chain.
fn lying_chunk(entries: Vec<(u64, MapEntry)>, generation_ahead: u64, expect: &str) {
    refused(
        |path, sb| {
            let slot = sb.slots;
            let bytes = encode_chunk(
                BLOCK,
                sb.generation + generation_ahead,
                sb.map_head,
                &entries,
            );
            let f = OpenOptions::new().write(true).open(path).unwrap();
            f.write_all_at(&bytes, DATA_OFFSET + slot * u64::from(BLOCK))
                .unwrap();
            f.set_len(DATA_OFFSET + (slot + 1) * u64::from(BLOCK))
                .unwrap();
            Superblock {
                slots: slot + 1,
                map_head: Some(slot),
                map_chunks: sb.map_chunks + 1,
                digest: None,
                ..sb
            }
        },
        expect,
    );
}

#[test]
fn map_chunk_lies_are_refused() {
    lying_chunk(
        vec![(64, MapEntry { slot: 0, crc: 0 })],
        0,
        "lies outside the disk",
    );
    lying_chunk(
        vec![(3, MapEntry { slot: 999, crc: 0 })],
        0,
        "lies outside the disk",
    );
    // Block 0 moved onto the slot block 1 uses (same entries count: 0 is already mapped).
    lying_chunk(
        vec![
            (0, MapEntry { slot: 1, crc: 0 }),
            (1, MapEntry { slot: 1, crc: 0 }),
        ],
        0,
        "used twice",
    );
    lying_chunk(vec![], 5, "newer than");
}

#[test]
fn damaged_chunk_headers_are_refused_without_allocating_their_claims() {
    let dir = tempfile::tempdir().unwrap();
    let path = layer(dir.path());
    let sb = newest(&path);
    let head = sb.map_head.unwrap();
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    // The claimed payload length: u64::MAX.
    f.write_all_at(
        &u64::MAX.to_le_bytes(),
        DATA_OFFSET + head * u64::from(BLOCK) + 16,
    )
    .unwrap();
    let err = LayerFile::open(&path, false).unwrap_err();
    assert!(matches!(err, DiskError::Format { .. }), "{err}");
    assert!(err.to_string().contains("map chunk in slot"), "{err}");
    // A chunk whose bytes are damaged past its header.
    let path = layer(dir.path());
    let head = newest(&path).map_head.unwrap();
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(
        &[0xee; 4],
        DATA_OFFSET + head * u64::from(BLOCK) + HEADER_LEN as u64 + 30,
    )
    .unwrap();
    let err = LayerFile::open(&path, false).unwrap_err();
    assert!(
        err.to_string().contains("payload checksum mismatch"),
        "{err}"
    );
}
