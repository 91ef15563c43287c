//! A full filesystem under a disk: writes and flushes that find no room fail with
//! `StorageFull`, leave the disk exactly as its reads say (each block of a failed write old or
//! new, never anything else), and succeed once space is freed; reopening shows the last commit.
//!
//! Each test mounts a small tmpfs of its own (the tests run as root); where mounting is not
//! allowed they print `SKIP <test>: <reason>` and pass.

use std::io::ErrorKind;

use snap_disk::{Disk, DiskError, Geometry};
use snap_testkit::fs::{Filler, Tmpfs};

const B: u64 = 65536;

/// A tmpfs of `bytes` for `test`, or None (the test is skipped).
fn small_fs(test: &str, bytes: u64) -> Option<Tmpfs> {
    Tmpfs::for_test(test, bytes)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    (0..len).map(|_| r.next() as u8).collect()
}

/// Every byte the disk reads equals `model`.
fn assert_reads(disk: &Disk, model: &[u8], what: &str) {
    let mut buf = vec![0u8; model.len()];
    disk.read_at(0, &mut buf).unwrap();
    for (block, (got, want)) in buf
        .chunks(B as usize)
        .zip(model.chunks(B as usize))
        .enumerate()
    {
        assert!(got == want, "{what}: block {block} differs from the model");
    }
}

fn assert_full(e: &DiskError) {
    assert_eq!(e.io_kind(), ErrorKind::StorageFull, "{e}");
}

/// A sealed base holding some blocks under a writable top, both on `fs`.
fn base_and_top(fs: &Tmpfs, disk_bytes: u64) -> (Disk, Vec<u8>) {
    let disk = Disk::create(&fs.path().join("0"), Geometry::new(disk_bytes)).unwrap();
    let mut model = vec![0u8; disk_bytes as usize];
    for block in (0..disk_bytes / B).step_by(5) {
        let data = pattern(block, B as usize);
        disk.write_at(block * B, &data).unwrap();
        model[(block * B) as usize..((block + 1) * B) as usize].copy_from_slice(&data);
    }
    disk.seal(&fs.path().join("1")).unwrap();
    (disk, model)
}

/// Checks that after a failed write of `data` at `offset` each block of its range reads as
/// its old data (in `model`) or its new data, and everything else as `model`; then makes
/// `model` what the disk reads.
fn accept_partial(disk: &Disk, model: &mut [u8], offset: u64, data: &[u8]) {
    let mut now = vec![0u8; model.len()];
    disk.read_at(0, &mut now).unwrap();
    let end = offset + data.len() as u64;
    let (mut old_blocks, mut new_blocks) = (0, 0);
    for block in 0..model.len() as u64 / B {
        let (lo, hi) = ((block * B).max(offset), ((block + 1) * B).min(end));
        let range = (block * B) as usize..((block + 1) * B) as usize;
        if lo >= hi {
            assert!(
                now[range.clone()] == model[range],
                "block {block} outside the write changed"
            );
            continue;
        }
        let part = lo as usize..hi as usize;
        let new = &data[(lo - offset) as usize..(hi - offset) as usize];
        // Outside the written part the block keeps its old bytes either way.
        let mut rest_now = now[range.clone()].to_vec();
        let mut rest_old = model[range.clone()].to_vec();
        rest_now[part.start - range.start..part.end - range.start].fill(0);
        rest_old[part.start - range.start..part.end - range.start].fill(0);
        assert!(
            rest_now == rest_old,
            "block {block}: bytes outside the write changed"
        );
        if now[part.clone()] == *new {
            new_blocks += 1;
        } else {
            assert!(
                now[part.clone()] == model[part.clone()],
                "block {block} of the failed write is neither its old nor its new data"
            );
            old_blocks += 1;
        }
    }
    println!("failed write: {new_blocks} block(s) written, {old_blocks} kept old");
    model.copy_from_slice(&now);
}

/// Writes random runs (whole and partial blocks, some spanning several) until one fails for
/// lack of room; returns the failed write, with `model` following every write that succeeded.
fn write_until_full(disk: &Disk, model: &mut [u8], rng: &mut Rng) -> (u64, Vec<u8>, DiskError) {
    let sectors = model.len() as u64 / 512;
    for i in 0.. {
        assert!(i < 10_000, "the filesystem never filled");
        let len = 512 * (1 + rng.below(3 * B / 512));
        let offset = 512 * rng.below(sectors - len / 512);
        let data = pattern(1000 + i, len as usize);
        match disk.write_at(offset, &data) {
            Ok(()) => model[offset as usize..(offset + len) as usize].copy_from_slice(&data),
            Err(e) => return (offset, data, e),
        }
    }
    unreachable!()
}

#[test]
fn writes_into_a_full_filesystem_fail_cleanly_and_succeed_once_space_is_freed() {
    let test = "writes_into_a_full_filesystem_fail_cleanly_and_succeed_once_space_is_freed";
    let Some(fs) = small_fs(test, 8 << 20) else {
        return;
    };
    let (disk, mut model) = base_and_top(&fs, 64 * B);
    let filler = Filler::fill(fs.path(), 20 * B + 4096);
    let mut rng = Rng(0x5eed);
    // Several rounds: each fills the filesystem, fails, and frees a little more space.
    let mut failures = 0;
    while failures < 3 {
        let (offset, data, e) = write_until_full(&disk, &mut model, &mut rng);
        assert_full(&e);
        // What a virtio-blk backend hands on: the kind and the message naming the top file.
        let io = std::io::Error::from(e);
        assert_eq!(io.kind(), ErrorKind::StorageFull);
        let top = fs.path().join("1").display().to_string();
        assert!(io.to_string().contains(&top), "{io}");
        failures += 1;
        accept_partial(&disk, &mut model, offset, &data);
        // The disk still takes writes into blocks it already holds since the last commit, and
        // reads everything as the model says.
        assert!(disk.is_writable());
        assert_reads(&disk, &model, "after a failed write");
        if failures < 3 {
            // A flush needs a fresh map chunk: it may fail for lack of room too, and then
            // changes nothing.
            match disk.flush() {
                Ok(()) => {}
                Err(e) => assert_full(&e),
            }
            assert_reads(&disk, &model, "after a flush on a full filesystem");
            filler.give_back(4 * B);
        } else {
            filler.give_back(u64::MAX);
            disk.write_at(offset, &data).unwrap();
            model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            disk.flush().unwrap();
        }
    }
    assert_reads(&disk, &model, "after the retried write and a flush");
    let paths = disk.paths();
    drop(disk);
    let disk = Disk::open(&paths).unwrap();
    assert_reads(&disk, &model, "reopened");
    for p in &paths {
        let report = snap_disk::check_layer(p).unwrap();
        assert!(report.is_clean(), "{report}");
    }
}

#[test]
fn a_flush_that_finds_no_room_for_its_map_changes_nothing_and_succeeds_later() {
    let test = "a_flush_that_finds_no_room_for_its_map_changes_nothing_and_succeeds_later";
    let Some(fs) = small_fs(test, 8 << 20) else {
        return;
    };
    let (disk, mut model) = base_and_top(&fs, 64 * B);
    let top = disk.paths().last().unwrap().clone();
    // Write fresh blocks until the space the top reserved ahead is used up, so the map chunk of
    // the next commit needs new space.
    let reserved = || (std::fs::metadata(&top).unwrap().len() - 8192) / B;
    let mut block = 1;
    while block == 1 || disk.layers().last().unwrap().slots < reserved() {
        let data = pattern(block, B as usize);
        disk.write_at(block * B, &data).unwrap();
        model[(block * B) as usize..((block + 1) * B) as usize].copy_from_slice(&data);
        block += 1;
    }
    assert!(block > 2, "the top reserves space ahead of its writes");
    let committed_before = disk.layers().last().unwrap().generation;
    let filler = Filler::fill(fs.path(), 0);
    let e = disk.flush().unwrap_err();
    assert_full(&e);
    assert!(e.to_string().contains(&top.display().to_string()), "{e}");
    assert_eq!(disk.layers().last().unwrap().generation, committed_before);
    assert_reads(&disk, &model, "after the failed flush");
    // Still writable: a block written since the last commit is rewritten in place.
    let data = pattern(7777, 4096);
    disk.write_at(B + 512, &data).unwrap();
    model[(B + 512) as usize..(B + 512) as usize + 4096].copy_from_slice(&data);
    // The file still holds the last commit.
    let reopened = Disk::open_read_only(&disk.paths()).unwrap();
    let mut committed = vec![0u8; model.len()];
    reopened.read_at(0, &mut committed).unwrap();
    drop(reopened);
    assert!(committed[B as usize..2 * B as usize] != model[B as usize..2 * B as usize]);

    filler.remove();
    disk.flush().unwrap();
    assert!(disk.layers().last().unwrap().generation > committed_before);
    let paths = disk.paths();
    drop(disk);
    let disk = Disk::open(&paths).unwrap();
    assert_reads(&disk, &model, "reopened after the flush succeeded");
}

#[test]
fn reopening_after_a_failed_write_shows_the_last_commit() {
    let test = "reopening_after_a_failed_write_shows_the_last_commit";
    let Some(fs) = small_fs(test, 8 << 20) else {
        return;
    };
    let (disk, mut model) = base_and_top(&fs, 64 * B);
    let filler = Filler::fill(fs.path(), 12 * B);
    // A commit holding some writes, then fresh blocks until the filesystem is full.
    for block in [1, 2, 3] {
        let data = pattern(block, 4096);
        disk.write_at(block * B + 8192, &data).unwrap();
        model[(block * B + 8192) as usize..(block * B + 8192 + 4096) as usize]
            .copy_from_slice(&data);
    }
    disk.flush().unwrap();
    let committed = model.clone();
    let mut rng = Rng(77);
    let (offset, data, e) = write_until_full(&disk, &mut model, &mut rng);
    assert_full(&e);
    accept_partial(&disk, &mut model, offset, &data);
    assert!(
        model != committed,
        "some writes landed before the filesystem filled"
    );
    // No room for the map: neither this flush nor the one on drop can commit.
    assert_full(&disk.flush().unwrap_err());
    let paths = disk.paths();
    drop(disk);
    filler.remove();
    let disk = Disk::open(&paths).unwrap();
    assert_reads(&disk, &committed, "reopened after a failed write");
    // The reopened disk writes and commits normally.
    disk.write_at(offset, &data).unwrap();
    disk.flush().unwrap();
    let mut expected = committed;
    expected[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
    assert_reads(&disk, &expected, "after writing again");
    drop(disk);
    for p in &paths {
        let report = snap_disk::check_layer(p).unwrap();
        assert!(report.is_clean(), "{report}");
    }
}
