//! The integrators' API: changed ranges between layers, undoing a seal, threads sharing a disk,
//! layers created for a revert, errors as `std::io` kinds.

use std::io::ErrorKind;
use std::sync::Arc;

use snap_core::Id;
use snap_disk::{Disk, DiskError, Geometry, NewLayer, create_layer, layer_info};

const B: u64 = 65536;

#[test]
fn changed_ranges_name_the_blocks_written_between_two_layers() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let disk = Disk::create(&p("0"), Geometry::new(16 * B + 1024)).unwrap();
    disk.write_at(0, &[1; 512]).unwrap();
    disk.write_at(5 * B, &[1; 512]).unwrap();
    let l0 = disk.seal(&p("1")).unwrap();
    disk.write_at(B + 512, &[2; 2048]).unwrap();
    disk.write_at(2 * B, &[2; 65536]).unwrap();
    let l1 = disk.seal(&p("2")).unwrap();
    disk.write_at(16 * B, &[3; 1024]).unwrap(); // the partial last block
    disk.write_at(9 * B, &[3; 512]).unwrap();
    let top = disk.layers().last().unwrap().id;
    assert_eq!(
        disk.changed_ranges(Some(l0.id), l1.id).unwrap(),
        vec![B..3 * B]
    );
    assert_eq!(
        disk.changed_ranges(Some(l1.id), top).unwrap(),
        vec![9 * B..10 * B, 16 * B..16 * B + 1024]
    );
    assert_eq!(
        disk.changed_ranges(None, l1.id).unwrap(),
        vec![0..3 * B, 5 * B..6 * B]
    );
    assert!(disk.changed_ranges(Some(l1.id), l0.id).is_err());
    assert!(disk.changed_ranges(None, Id::random()).is_err());
}

#[test]
fn undo_seal_gives_the_writes_back_to_the_old_top() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let disk = Disk::create(&p("0"), Geometry::new(4 * B)).unwrap();
    disk.write_at(0, &[1; 4096]).unwrap();
    disk.seal(&p("1")).unwrap();
    let dropped = disk.undo_seal().unwrap();
    assert_eq!(dropped, p("1"));
    std::fs::remove_file(&dropped).unwrap();
    assert!(disk.is_writable());
    disk.write_at(512, &[2; 512]).unwrap();
    drop(disk);
    let disk = Disk::open(&[p("0")]).unwrap();
    assert!(!layer_info(&p("0")).unwrap().sealed());
    let mut buf = [0u8; 1536];
    disk.read_at(0, &mut buf).unwrap();
    assert_eq!((buf[0], buf[512], buf[1024]), (1, 2, 1));
    // Nothing to undo once the new top holds data.
    disk.seal(&p("1")).unwrap();
    disk.write_at(0, &[3; 512]).unwrap();
    assert!(disk.undo_seal().is_err());
}

#[test]
fn threads_share_a_disk() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(Disk::create(&dir.path().join("0"), Geometry::new(64 * B)).unwrap());
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let disk = Arc::clone(&disk);
            std::thread::spawn(move || {
                // Each thread owns 16 blocks and writes 4 KiB pieces into them, reading back.
                for i in 0..200u64 {
                    let offset = u64::from(t) * 16 * B + (i * 7 % 256) * 4096;
                    let data = vec![t.wrapping_mul(50).wrapping_add(i as u8); 4096];
                    disk.write_at(offset, &data).unwrap();
                    let mut back = vec![0u8; 4096];
                    disk.read_at(offset, &mut back).unwrap();
                    assert_eq!(back, data);
                    if i % 50 == 0 {
                        disk.flush().unwrap();
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
fn a_revert_puts_a_fresh_top_on_sealed_layers() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let disk = Disk::create(&p("0"), Geometry::new(4 * B)).unwrap();
    disk.write_at(0, &[1; 512]).unwrap();
    let snap = disk.seal(&p("1")).unwrap();
    disk.write_at(0, &[2; 512]).unwrap();
    drop(disk);
    // Revert: a new empty top over the snapshot's layer; the old top is left alone.
    create_layer(
        &p("revert"),
        &NewLayer {
            id: Id::random(),
            parent: snap.as_parent(),
            geometry: snap.geometry,
        },
    )
    .unwrap();
    let reverted = Disk::open(&[p("0"), p("revert")]).unwrap();
    let mut buf = [0u8; 512];
    reverted.read_at(0, &mut buf).unwrap();
    assert_eq!(buf[0], 1);
    let old = Disk::open(&[p("0"), p("1")]).unwrap();
    old.read_at(0, &mut buf).unwrap();
    assert_eq!(buf[0], 2);
}

#[test]
fn disk_errors_map_to_io_error_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Disk::create(&dir.path().join("0"), Geometry::new(4 * B)).unwrap();
    let e = disk.read_at(1, &mut [0u8; 512]).unwrap_err();
    assert_eq!(e.io_kind(), ErrorKind::InvalidInput);
    let e = disk.write_at(4 * B, &[0u8; 512]).unwrap_err();
    let message = e.to_string();
    let io = std::io::Error::from(e);
    assert_eq!(io.kind(), ErrorKind::InvalidInput);
    assert_eq!(io.to_string(), message);
    assert!(io.get_ref().is_some_and(|inner| inner.is::<DiskError>()));
    disk.seal(&dir.path().join("1")).unwrap();
    let ro = Disk::open_read_only(&disk.paths()).unwrap();
    let e = ro.write_at(0, &[0u8; 512]).unwrap_err();
    assert_eq!(e.io_kind(), ErrorKind::ReadOnlyFilesystem);
    drop(ro);
    drop(disk);
    std::fs::write(dir.path().join("junk"), vec![0u8; 16384]).unwrap();
    let e = Disk::open(&[dir.path().join("junk")]).unwrap_err();
    assert_eq!(e.io_kind(), ErrorKind::InvalidData, "{e}");
    let e = Disk::open(&[dir.path().join("missing")]).unwrap_err();
    assert_eq!(e.io_kind(), ErrorKind::NotFound, "{e}");
}
