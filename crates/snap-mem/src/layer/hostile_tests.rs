//! Files whose checksums are right but whose index lies: readers must refuse them (or the
//! frame they lie about) without panicking or allocating what the file claims.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use snap_core::{HEADER_LEN, Id};

use super::error::{FrameProblem, LayerError};
use super::format::{HEAD_LEN, INDEX_FORMAT, Index, LAYER_FORMAT, Superblock};
use super::meta::{LayerOptions, NewLayer, PAGE};
use super::reader::Layer;
use super::writer::write_layer;

const PAGES: u64 = 256;

fn layer_file(dir: &Path) -> PathBuf {
    let mut memory = vec![0u8; PAGES as usize * PAGE];
    for (i, b) in memory.iter_mut().enumerate() {
        if (i / PAGE) % 5 != 0 {
            *b = (i * 7 / 3) as u8;
        }
    }
    let path = dir.join("l");
    let layer = NewLayer {
        id: Id::random(),
        parent: None,
        memory_bytes: memory.len() as u64,
    };
    let options = LayerOptions {
        frame_size: 64 << 10,
        ..LayerOptions::default()
    };
    write_layer(&path, &layer, 0..PAGES, &memory, &options).unwrap();
    path
}

/// Rewrites the index of `path` after `edit`, with every checksum and the superblock right.
fn rewrite(path: &Path, edit: impl FnOnce(&mut Index)) {
    let bytes = std::fs::read(path).unwrap();
    let sb = Superblock::decode(path, &bytes[..HEAD_LEN], bytes.len() as u64).unwrap();
    let payload = INDEX_FORMAT
        .decode(&bytes[sb.index_offset as usize..])
        .unwrap()
        .payload;
    let (mut index, _) = Index::decode(path, payload, sb.frames_len).unwrap();
    edit(&mut index);
    let new_index = INDEX_FORMAT.encode(&index.encode().0);
    let mut out = bytes[..sb.index_offset as usize].to_vec();
    out.extend_from_slice(&new_index);
    let sb = Superblock {
        index_len: new_index.len() as u64,
        file_len: out.len() as u64,
        ..sb
    };
    out[..HEAD_LEN].copy_from_slice(&sb.encode());
    std::fs::write(path, out).unwrap();
}

fn refused(edit: impl FnOnce(&mut Index), expect: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = layer_file(dir.path());
    rewrite(&path, edit);
    let err = Layer::open(&path).unwrap_err();
    assert!(matches!(err, LayerError::Corrupt { .. }), "{err}");
    assert!(
        err.to_string().contains(expect),
        "{err} (wanted {expect:?})"
    );
}

#[test]
fn frame_table_lies_are_refused_at_open() {
    refused(|i| i.table.regions.swap(0, 1), "not strictly increasing");
    refused(|i| i.table.regions[3] = 1 << 40, "outside memory");
    refused(
        |i| i.memory_bytes = 8 * PAGE as u64,
        "reaches past the region or memory",
    );
    refused(|i| i.memory_bytes = 4095, "multiple of 4096");
    refused(|i| i.memory_bytes = 1 << 50, "multiple of 4096");
    refused(|i| i.frame_size = 96 << 10, "power of two");
    refused(|i| i.table.present[2] = 0, "present bitmap is empty");
    refused(|i| i.table.present[2] |= 1 << 40, "reaches past the region");
    refused(|i| i.table.data[2] |= 1 << 3, "data bitmap holds pages");
    refused(|i| i.table.lens[1] = u32::MAX, "compressed bytes");
    refused(|i| i.table.offsets[2] += 1, "expected");
    refused(
        |i| {
            i.table.lens.pop();
        },
        "columns disagree",
    );
}

#[test]
fn a_frame_that_decompresses_short_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = layer_file(dir.path());
    // Page 0 is zero, so not in the layer; claim it is there with data.
    rewrite(&path, |i| {
        i.table.present[0] |= 1;
        i.table.data[0] |= 1;
    });
    let layer = Layer::open(&path).unwrap();
    let err = layer.read_frame(0).unwrap_err();
    let LayerError::Frame {
        frame: 0,
        problem: FrameProblem::Length { expected, found },
        ..
    } = &err
    else {
        panic!("{err}");
    };
    assert_eq!(*expected, found + PAGE, "{err}");
    assert!(layer.verify().is_err());
    layer.read_frame(1).unwrap();
}

#[test]
fn garbage_frames_with_a_matching_crc_fail_decompression() {
    let dir = tempfile::tempdir().unwrap();
    let path = layer_file(dir.path());
    let layer = Layer::open(&path).unwrap();
    let f = layer.frame(2);
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let garbage = vec![0x5a; f.compressed_len as usize];
    file.write_all_at(&garbage, f.offset).unwrap();
    rewrite(&path, |i| i.table.crcs[2] = snap_core::crc32c(&garbage));
    let err = Layer::open(&path).unwrap().read_frame(2).unwrap_err();
    assert!(
        matches!(
            err,
            LayerError::Frame {
                frame: 2,
                problem: FrameProblem::Decompress(_),
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn superblock_sizes_are_checked_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let path = layer_file(dir.path());
    let bytes = std::fs::read(&path).unwrap();
    let sb = Superblock::decode(&path, &bytes[..HEAD_LEN], bytes.len() as u64).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    for lie in [
        Superblock {
            index_len: 1 << 40,
            ..sb
        },
        Superblock {
            index_offset: 0,
            frames_len: 0,
            ..sb
        },
        Superblock {
            frames_len: u64::MAX,
            ..sb
        },
    ] {
        file.write_all_at(&lie.encode(), 0).unwrap();
        let err = Layer::open(&path).unwrap_err();
        assert!(err.to_string().contains("do not fit together"), "{err}");
    }
}

#[test]
fn a_header_with_a_short_superblock_is_refused() {
    // Found by fuzzing (fuzz target mem_layer): a whole file of one header whose checksums are
    // right and whose payload, the superblock, is empty.
    let bytes: [u8; 32] = [
        0x53, 0x4e, 0x41, 0x50, 0x4d, 0x4c, 0x41, 0x59, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x57, 0x33,
        0xb7, 0xe6,
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l");
    std::fs::write(&path, bytes).unwrap();
    let err = Layer::open(&path).unwrap_err();
    assert!(matches!(err, LayerError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("superblock of 0 bytes"), "{err}");

    // A file cut inside the superblock, its header rewritten to match.
    let path = layer_file(dir.path());
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, LAYER_FORMAT.encode(&bytes[HEADER_LEN..HEAD_LEN - 8])).unwrap();
    let err = Layer::open(&path).unwrap_err();
    assert!(matches!(err, LayerError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("superblock of 56 bytes"), "{err}");
}
