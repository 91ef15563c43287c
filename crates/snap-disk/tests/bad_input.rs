//! Bad input gives a clear error that names the file and the problem, never a panic: a corrupt
//! header, a wrong or changed parent, a truncated layer, damaged data, writes to a sealed layer,
//! misaligned and out-of-range I/O.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use snap_disk::{
    Disk, DiskError, Geometry, MergeInto, check_layer, import_raw, layer_info, merge_into_child,
};

const SIZE: u64 = 1 << 20;

/// A two-layer chain with data in both; returns the directory and the two paths.
fn two_layers() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let disk = Disk::create(&a, Geometry::new(SIZE)).unwrap();
    disk.write_at(0, &[1; 65536 * 3]).unwrap();
    disk.seal(&b).unwrap();
    disk.write_at(65536, &[2; 4096]).unwrap();
    disk.flush().unwrap();
    (dir, a, b)
}

fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

fn expect(err: DiskError, path: &Path, words: &str) {
    let text = err.to_string();
    assert!(
        text.contains(&path.display().to_string()),
        "{text:?} does not name {}",
        path.display()
    );
    assert!(text.contains(words), "{text:?} does not say {words:?}");
}

#[test]
fn corrupt_superblocks_are_refused() {
    let (_dir, a, _b) = two_layers();
    // One damaged superblock area: the other (older) one is used, so the layer is no longer the
    // sealed parent its child names; the chain is refused rather than read wrong.
    poke(&a, 40, b"garbage");
    poke(&a, 4096 + 40, b"garbage");
    let err = layer_info(&a).unwrap_err();
    assert!(matches!(err, DiskError::Format { .. }), "{err}");
    expect(
        err,
        &a,
        "superblock A: disk layer superblock: payload checksum mismatch",
    );
    poke(&a, 0, b"NOTALAYR");
    expect(layer_info(&a).unwrap_err(), &a, "bad magic");
}

#[test]
fn a_damaged_newest_superblock_falls_back_and_the_chain_notices() {
    let (_dir, a, b) = two_layers();
    let info = layer_info(&a).unwrap();
    let newest = if info.generation % 2 == 0 { 0 } else { 4096 };
    poke(&a, newest + 100, &[0xff; 8]);
    let older = layer_info(&a).unwrap();
    assert_eq!(older.generation, info.generation - 1);
    // The older state is the layer before its seal: the chain over it is refused.
    let err = Disk::open(&[&a, &b]).unwrap_err();
    expect(err, &a, "not sealed");
    let report = check_layer(&a).unwrap();
    assert!(!report.warnings.is_empty(), "{report}");
}

#[test]
fn wrong_or_changed_parents_are_refused() {
    let (dir, a, b) = two_layers();
    // Order reversed.
    let err = Disk::open(&[&b, &a]).unwrap_err();
    assert!(matches!(err, DiskError::WrongParent { .. }), "{err}");
    expect(err, &b, "wrong parent");
    // Another base in place of the parent.
    let other = dir.path().join("other");
    drop(Disk::create(&other, Geometry::new(SIZE)).unwrap());
    let other_top = dir.path().join("other-top");
    Disk::open(&[&other]).unwrap().seal(&other_top).unwrap();
    expect(Disk::open(&[&other, &b]).unwrap_err(), &b, "wrong parent");
    // The parent changed after the child was written: a merge gave it new content.
    let c = dir.path().join("c");
    {
        let disk = Disk::open(&[&a, &b]).unwrap();
        disk.seal(&c).unwrap();
    }
    merge_into_child(&a, &b).unwrap();
    // `b` now names no parent; `c` names the old `b` digest, which changed.
    let err = Disk::open(&[&b, &c]).unwrap_err();
    expect(err, &c, "wrong parent");
    // A different geometry.
    let small = dir.path().join("small");
    Disk::create(&small, Geometry::new(SIZE / 2))
        .unwrap()
        .seal(&dir.path().join("small-top"))
        .unwrap();
    let err = Disk::open(&[&small, &c]).unwrap_err();
    assert!(matches!(err, DiskError::Geometry { .. }), "{err}");
    expect(err, &c, "but the chain has");
}

#[test]
fn truncated_layers_are_refused() {
    let (_dir, a, _b) = two_layers();
    let len = std::fs::metadata(&a).unwrap().len();
    let f = OpenOptions::new().write(true).open(&a).unwrap();
    f.set_len(len - 4096).unwrap();
    let err = layer_info(&a).unwrap_err();
    assert!(matches!(err, DiskError::Truncated { .. }), "{err}");
    expect(err, &a, "truncated");
    f.set_len(5000).unwrap();
    expect(layer_info(&a).unwrap_err(), &a, "truncated");
    f.set_len(0).unwrap();
    expect(layer_info(&a).unwrap_err(), &a, "truncated");
}

#[test]
fn garbage_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk");
    let junk: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, junk).unwrap();
    expect(layer_info(&path).unwrap_err(), &path, "bad magic");
    expect(Disk::open(&[&path]).unwrap_err(), &path, "bad magic");
    let missing = dir.path().join("missing");
    expect(layer_info(&missing).unwrap_err(), &missing, "open");
}

#[test]
fn damaged_data_is_named_by_check_export_and_merge() {
    let (dir, a, b) = two_layers();
    // Block 1 of `a` sits in some slot; damage every slot's first bytes past the superblocks.
    let info = layer_info(&a).unwrap();
    let block_size = u64::from(info.geometry.block_size);
    let report = check_layer(&a).unwrap();
    assert!(report.is_clean(), "{report}");
    for slot in 0..info.slots {
        let mut byte = [0u8; 1];
        let f = OpenOptions::new().read(true).write(true).open(&a).unwrap();
        let at = 8192 + slot * block_size + 100;
        f.read_exact_at(&mut byte, at).unwrap();
        if byte[0] == 1 {
            f.write_all_at(&[0x55], at).unwrap();
        }
    }
    let report = check_layer(&a).unwrap();
    assert_eq!(report.problems.len(), 3, "{report}");
    assert!(report.problems[0].contains("checksum mismatch"), "{report}");
    let disk = Disk::open_read_only(&[&a, &b]).unwrap();
    let err = disk.export_raw(&dir.path().join("out.raw")).unwrap_err();
    assert!(matches!(err, DiskError::BlockChecksum { .. }), "{err}");
    expect(err, &a, "block 0");
    assert!(!dir.path().join("out.raw").exists());
    drop(disk);
    let disk = Disk::open(&[&a, &b]).unwrap();
    let err = disk.merge(0, MergeInto::Child).unwrap_err();
    expect(err, &a, "checksum mismatch");
    // The failed merge left the chain as it was.
    assert_eq!(disk.layers().len(), 2);
    let mut buf = vec![0u8; 4096];
    disk.read_at(65536, &mut buf).unwrap();
    assert_eq!(buf, vec![2; 4096]);
}

#[test]
fn sealed_and_read_only_layers_refuse_writes() {
    let (dir, a, b) = two_layers();
    let sealed_only = Disk::open(&[&a]).unwrap();
    let err = sealed_only.write_at(0, &[0; 512]).unwrap_err();
    assert!(matches!(err, DiskError::ReadOnly { .. }), "{err}");
    expect(err, &a, "sealed");
    assert!(!sealed_only.is_writable());
    let ro = Disk::open_read_only(&[&a, &b]).unwrap();
    expect(ro.write_at(0, &[0; 512]).unwrap_err(), &b, "read-only");
    let seal_again = ro.seal(&dir.path().join("x")).unwrap_err();
    assert!(matches!(seal_again, DiskError::ReadOnly { .. }));
}

#[test]
fn misaligned_and_out_of_range_io_is_refused() {
    let (_dir, a, b) = two_layers();
    let disk = Disk::open(&[&a, &b]).unwrap();
    let mut buf = vec![0u8; 1024];
    for (offset, len) in [(1, 512), (512, 100), (511, 1024)] {
        let err = disk.read_at(offset, &mut buf[..len]).unwrap_err();
        assert!(matches!(err, DiskError::Unaligned { .. }), "{err}");
        assert!(err.to_string().contains("multiples of 512"), "{err}");
        assert!(matches!(
            disk.write_at(offset, &buf[..len]).unwrap_err(),
            DiskError::Unaligned { .. }
        ));
    }
    for offset in [SIZE - 512, SIZE, u64::MAX - 511] {
        let err = disk.read_at(offset, &mut buf).unwrap_err();
        assert!(matches!(err, DiskError::OutOfRange { .. }), "{err}");
        assert!(matches!(
            disk.write_at(offset, &buf).unwrap_err(),
            DiskError::OutOfRange { .. }
        ));
    }
    assert!(matches!(
        disk.merge(1, MergeInto::Child).unwrap_err(),
        DiskError::BadIndex { .. }
    ));
}

#[test]
fn bad_geometry_and_raw_images_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x");
    for geometry in [
        Geometry {
            disk_bytes: 1000,
            block_size: 65536,
        },
        Geometry {
            disk_bytes: 0,
            block_size: 65536,
        },
        Geometry {
            disk_bytes: 1 << 20,
            block_size: 1000,
        },
        Geometry {
            disk_bytes: 1 << 50,
            block_size: 65536,
        },
    ] {
        let err = Disk::create(&path, geometry).unwrap_err();
        assert!(matches!(err, DiskError::Options { .. }), "{err}");
        assert!(!path.exists());
    }
    let raw = dir.path().join("odd.raw");
    std::fs::write(&raw, vec![1u8; 1000]).unwrap();
    let err = import_raw(&raw, &path, 65536).unwrap_err();
    expect(err, &raw, "multiple of 512");
}
