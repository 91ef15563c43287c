//! Layer files on disk: zero pages, determinism, and refusal of damaged or wrong input.

use std::num::NonZeroUsize;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use snap_core::Id;
use snap_mem::GuestMemory;
use snap_mem::layer::{
    FrameProblem, Layer, LayerChain, LayerError, LayerInfo, LayerOptions, NewLayer, PAGE,
    PageEntry, PageSource, ParentRef, Restore, merge_into_child, write_layer,
};

const PAGES: u64 = 1024;

fn random_page(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..PAGE / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

fn memory_with(pages: &[u64]) -> GuestMemory {
    let m = GuestMemory::new(PAGES * PAGE as u64).unwrap();
    for &p in pages {
        m.write_at_offset(p * PAGE as u64, &random_page(p)).unwrap();
    }
    m
}

fn full(dir: &Path, name: &str, memory: &GuestMemory) -> (PathBuf, LayerInfo) {
    let path = dir.join(name);
    let layer = NewLayer {
        id: Id::random(),
        parent: None,
        memory_bytes: memory.size(),
    };
    let info = write_layer(&path, &layer, 0..PAGES, memory, &LayerOptions::default()).unwrap();
    (path, info)
}

fn diff(dir: &Path, name: &str, parent: ParentRef, pages: &[u64], m: &GuestMemory) -> PathBuf {
    let path = dir.join(name);
    let layer = NewLayer {
        id: Id::random(),
        parent: Some(parent),
        memory_bytes: m.size(),
    };
    write_layer(
        &path,
        &layer,
        pages.iter().copied(),
        m,
        &LayerOptions::default(),
    )
    .unwrap();
    path
}

fn flip(path: &Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn zero_pages_are_never_stored() {
    let dir = tempfile::tempdir().unwrap();
    let memory = memory_with(&[3, 100, 101]);
    // Pages written with zeros are allocated but zero; the rest were never touched.
    for p in 200..210 {
        memory
            .write_at_offset(p * PAGE as u64, &[0u8; PAGE])
            .unwrap();
    }
    let (path, info) = full(dir.path(), "full", &memory);
    assert_eq!(
        (info.pages_present, info.pages_stored, info.frames),
        (3, 3, 2)
    );
    // Three random (incompressible) pages, the index and the 4 KiB head: nothing else.
    assert!(info.stored_bytes < 4096 + 3 * 4096 + 512, "{info:?}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), info.stored_bytes);

    // All zero: no frames at all.
    let (_, empty) = full(
        dir.path(),
        "zero",
        &GuestMemory::new(PAGES * PAGE as u64).unwrap(),
    );
    assert_eq!((empty.pages_present, empty.frames), (0, 0));
    assert!(empty.stored_bytes < 4096 + 256, "{empty:?}");

    // A diff layer holds exactly the pages it is given; the zero ones as zero entries.
    memory
        .write_at_offset(3 * PAGE as u64, &[0u8; PAGE])
        .unwrap();
    memory
        .write_at_offset(7 * PAGE as u64, &random_page(77))
        .unwrap();
    let given = [3, 7, 50, 100, 205];
    let d = diff(dir.path(), "diff", info.as_parent(), &given, &memory);
    let layer = Layer::open(&d).unwrap();
    assert_eq!(
        (layer.info().pages_present, layer.info().pages_stored),
        (5, 2)
    );
    assert_eq!(layer.page(3), Some(PageEntry::Zero));
    assert_eq!(layer.page(50), Some(PageEntry::Zero));
    assert_eq!(layer.page(4), None);
    assert!(matches!(
        layer.page(100),
        Some(PageEntry::Data { frame: 1, slot: 0 })
    ));
    let held: Vec<u64> = layer.pages().map(|(p, _)| p).collect();
    assert_eq!(held, given);
    // The frame of region 3 (pages 192..256) holds only a zero entry: no bytes.
    let zero_only = layer.frame(2);
    assert_eq!(zero_only.pages, 192..256);
    assert_eq!(
        (
            zero_only.present_pages,
            zero_only.stored_pages,
            zero_only.compressed_len
        ),
        (1, 0, 0)
    );

    // Through the chain, the zero entry overrides the parent's data.
    let chain = LayerChain::open(&[&path, &d]).unwrap();
    let mut page = [1u8; PAGE];
    chain.read_page(3, &mut page).unwrap();
    assert!(page.iter().all(|&b| b == 0));
    for target in [Restore::Fresh, Restore::Used] {
        let out = memory_with(&[3, 4, 900]);
        if target == Restore::Fresh {
            out.discard(0, out.size()).unwrap();
        }
        chain.materialize_into(&out, target).unwrap();
        assert!(out.to_vec() == memory.to_vec(), "{target:?}");
    }
}

#[test]
fn output_is_the_same_bytes_whatever_the_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let memory = memory_with(&(0..PAGES).filter(|p| p % 3 != 0).collect::<Vec<_>>());
    let layer = NewLayer {
        id: Id::random(),
        parent: None,
        memory_bytes: memory.size(),
    };
    let mut files = Vec::new();
    for threads in [1, 2, 7] {
        let path = dir.path().join(format!("{threads}"));
        let options = LayerOptions {
            frame_size: 64 << 10,
            threads: NonZeroUsize::new(threads),
            ..LayerOptions::default()
        };
        write_layer(&path, &layer, 0..PAGES, &memory, &options).unwrap();
        files.push(std::fs::read(&path).unwrap());
    }
    assert!(files.windows(2).all(|w| w[0] == w[1]));
}

#[test]
fn a_damaged_frame_is_named_and_the_others_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let pages: Vec<u64> = (0..256).collect();
    let (path, _) = full(dir.path(), "3.mlayer", &memory_with(&pages));
    let layer = Layer::open(&path).unwrap();
    assert_eq!(layer.frame_count(), 4);
    let f1 = layer.frame(1);
    flip(&path, f1.offset + u64::from(f1.compressed_len) / 2);

    let err = layer.read_frame(1).unwrap_err();
    let LayerError::Frame {
        frame: 1,
        pages,
        problem: FrameProblem::Checksum { expected, .. },
        ..
    } = &err
    else {
        panic!("{err}");
    };
    assert_eq!((pages.clone(), *expected), (64..128, f1.crc));
    let text = err.to_string();
    let want = format!(
        "memory layer {}: frame 1 (pages 64..128): checksum mismatch (index {:#010x}, data 0x",
        path.display(),
        f1.crc
    );
    assert!(text.starts_with(&want), "{text}");

    assert_eq!(layer.verify().unwrap_err().to_string(), text);
    assert_eq!(layer.read_frame(0).unwrap().len(), 64 * PAGE);
    assert_eq!(layer.read_frame(2).unwrap().len(), 64 * PAGE);
    let mut page = [0u8; PAGE];
    assert!(layer.read_page(5, &mut page).unwrap());
    assert_eq!(page[..], random_page(5)[..]);
    assert!(matches!(
        layer.read_page(70, &mut page),
        Err(LayerError::Frame { frame: 1, .. })
    ));

    // Opening does not read frames; restoring does, and names the frame.
    let chain = LayerChain::open(&[&path]).unwrap();
    let target = GuestMemory::new(PAGES * PAGE as u64).unwrap();
    let err = chain.materialize_into(&target, Restore::Fresh).unwrap_err();
    assert!(matches!(err, LayerError::Frame { frame: 1, .. }), "{err}");
}

#[test]
fn truncated_or_extended_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (path, info) = full(dir.path(), "t.mlayer", &memory_with(&[1, 2, 300]));
    for len in [
        info.stored_bytes - 1,
        5000,
        4096,
        100,
        95,
        31,
        0,
        info.stored_bytes + 1,
    ] {
        let copy = dir.path().join(format!("cut{len}"));
        std::fs::copy(&path, &copy).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&copy)
            .unwrap()
            .set_len(len)
            .unwrap();
        let err = Layer::open(&copy).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("memory layer {}: ", copy.display())),
            "{text}"
        );
        match err {
            LayerError::Corrupt { problem, .. } => {
                assert!(problem.contains("truncated or extended"), "{problem}")
            }
            LayerError::Format { error, .. } => assert!(len < 96, "{len}: {error}"),
            other => panic!("{len}: {other}"),
        }
    }
}

#[test]
fn damaged_index_or_header_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (path, info) = full(dir.path(), "i.mlayer", &memory_with(&[1, 2, 300]));
    // The index's last byte, a header byte, a superblock byte.
    for (at, what) in [
        (
            info.stored_bytes - 1,
            "memory layer index: payload checksum mismatch",
        ),
        (9, "memory layer header: header checksum mismatch"),
        (40, "memory layer header: payload checksum mismatch"),
        (0, "memory layer header: bad magic"),
    ] {
        let copy = dir.path().join(format!("flip{at}"));
        std::fs::copy(&path, &copy).unwrap();
        flip(&copy, at);
        let err = Layer::open(&copy).unwrap_err();
        assert!(matches!(err, LayerError::Format { .. }), "{err}");
        let want = format!("memory layer {}: {what}", copy.display());
        assert!(err.to_string().starts_with(&want), "{err}");
    }
}

#[test]
fn chains_refuse_a_wrong_parent_or_size() {
    let dir = tempfile::tempdir().unwrap();
    let memory = memory_with(&[1, 2]);
    let (base, info) = full(dir.path(), "0", &memory);
    let good = diff(dir.path(), "1", info.as_parent(), &[1], &memory);
    LayerChain::open(&[&base, &good]).unwrap();

    let mut wrong = info.as_parent();
    wrong.digest.0[0] ^= 1;
    let bad = diff(dir.path(), "2", wrong, &[1], &memory);
    let err = LayerChain::open(&[&base, &bad]).unwrap_err();
    let LayerError::WrongParent {
        path,
        expected,
        found,
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(
        (path, *expected, *found),
        (&bad, Some(info.as_parent()), Some(wrong))
    );
    let text = err.to_string();
    assert!(text.contains(&bad.display().to_string()), "{text}");
    assert!(
        text.contains(&info.digest.to_string()) && text.contains(&wrong.digest.to_string()),
        "{text}"
    );

    // A diff layer cannot start a chain; layers cannot be skipped or reordered.
    let err = LayerChain::open(&[&good]).unwrap_err();
    assert!(
        err.to_string().contains("the chain needs no parent"),
        "{err}"
    );
    assert!(matches!(
        LayerChain::open(&[&good, &base]),
        Err(LayerError::WrongParent { .. })
    ));
    assert!(matches!(
        LayerChain::open::<PathBuf>(&[]),
        Err(LayerError::EmptyChain)
    ));

    // A child of another size.
    let bigger = GuestMemory::new(2 * PAGES * PAGE as u64).unwrap();
    let odd = diff(dir.path(), "3", info.as_parent(), &[1], &bigger);
    assert!(matches!(
        LayerChain::open(&[&base, &odd]),
        Err(LayerError::SizeMismatch { .. })
    ));

    // The target memory must be the chain's size.
    let chain = LayerChain::open(&[&base, &good]).unwrap();
    let err = chain.materialize_into(&bigger, Restore::Fresh).unwrap_err();
    assert!(matches!(err, LayerError::MemorySize { .. }), "{err}");

    // Merging needs the real child.
    let (a, b) = (Layer::open(&base).unwrap(), Layer::open(&bad).unwrap());
    let err = merge_into_child(&a, &b, &dir.path().join("m"), None).unwrap_err();
    assert!(matches!(err, LayerError::WrongParent { .. }), "{err}");
    assert!(!dir.path().join("m").exists());
}

struct FailingSource;

impl PageSource for FailingSource {
    fn page_count(&self) -> u64 {
        PAGES
    }

    fn read_pages(&self, first_page: u64, _buf: &mut [u8]) -> std::io::Result<()> {
        if first_page >= 500 {
            return Err(std::io::Error::other("disk on fire"));
        }
        Ok(())
    }
}

#[test]
fn bad_options_pages_and_sources_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let memory = memory_with(&[1]);
    let path = dir.path().join("x");
    let layer = NewLayer {
        id: Id::random(),
        parent: None,
        memory_bytes: memory.size(),
    };
    for (frame_size, zstd_level) in [
        (100_000, 1),
        (32 << 10, 1),
        (4 << 20, 1),
        (0, 1),
        (256 << 10, 1000),
    ] {
        let options = LayerOptions {
            frame_size,
            zstd_level,
            threads: None,
        };
        let err = write_layer(&path, &layer, 0..PAGES, &memory, &options).unwrap_err();
        assert!(matches!(err, LayerError::Options { .. }), "{err}");
    }
    let odd_size = NewLayer {
        memory_bytes: 4097,
        ..layer
    };
    let err = write_layer(&path, &odd_size, 0..1, &memory, &LayerOptions::default()).unwrap_err();
    assert!(matches!(err, LayerError::Options { .. }), "{err}");

    for pages in [vec![1, 1], vec![5, 3], vec![PAGES]] {
        let err = write_layer(&path, &layer, pages, &memory, &LayerOptions::default()).unwrap_err();
        assert!(matches!(err, LayerError::PageList { .. }), "{err}");
    }

    let err = write_layer(
        &path,
        &layer,
        0..PAGES,
        &FailingSource,
        &LayerOptions::default(),
    )
    .unwrap_err();
    let LayerError::Source { pages, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(pages.start, 512, "{err}");
    assert!(err.to_string().contains("disk on fire"));

    let err = write_layer(
        &dir.path().join("no/such/dir"),
        &layer,
        0..1,
        &memory,
        &LayerOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, LayerError::Io { .. }), "{err}");
    assert_eq!(files_in(dir.path()), Vec::<String>::new());
}

#[test]
fn relinking_keeps_the_frames_and_the_digest() {
    let dir = tempfile::tempdir().unwrap();
    let memory = memory_with(&[1, 2, 70, 300]);
    let (base, info) = full(dir.path(), "0", &memory);
    memory.write_at_offset(0, &random_page(9)).unwrap();
    let child = diff(dir.path(), "1", info.as_parent(), &[0, 1, 300], &memory);
    let before = Layer::open(&child).unwrap();
    let frames: Vec<Vec<u8>> = (0..before.frame_count())
        .map(|f| before.read_frame(f).unwrap())
        .collect();

    let other = ParentRef {
        id: Id::random(),
        digest: info.digest,
    };
    let relinked = snap_mem::layer::relink_parent(&child, Some(other)).unwrap();
    assert_eq!(relinked.parent, Some(other));
    assert_eq!(
        (relinked.id, relinked.digest),
        (before.info().id, before.info().digest)
    );
    let after = Layer::open(&child).unwrap();
    after.verify().unwrap();
    for (f, data) in frames.iter().enumerate() {
        assert_eq!(&after.read_frame(f).unwrap(), data);
        assert_eq!(after.frame(f), before.frame(f));
    }
    // The old handle still reads the old file; the chain now refuses the old parent.
    assert_eq!(before.read_frame(0).unwrap(), frames[0]);
    assert!(matches!(
        LayerChain::open(&[&base, &child]),
        Err(LayerError::WrongParent { .. })
    ));
    snap_mem::layer::relink_parent(&child, Some(info.as_parent())).unwrap();
    LayerChain::open(&[&base, &child]).unwrap();
    assert_eq!(files_in(dir.path()), vec!["0", "1"]);
}
