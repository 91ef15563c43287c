//! Lazy restore through userfaultfd: memory touched in random order by several threads while
//! the background filler runs ends up exactly the chain's image; a damaged frame stops the server
//! with an error naming the layer and the frame.

use snap_core::Id;
use snap_mem::GuestMemory;
use snap_mem::layer::{LayerChain, LayerOptions, NewLayer, write_layer};
use snap_mem::lazy::{LazyOptions, PageServer};
use snap_mem::working_set::{WorkingSet, WorkingSetError};

const SIZE: u64 = 32 << 20;
const PAGES: u64 = SIZE / 4096;

fn uffd_available(test: &str) -> bool {
    // SAFETY: the userfaultfd syscall with valid flags; the returned fd is closed at once.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
    if fd >= 0 {
        // SAFETY: closing the fd just opened.
        unsafe { libc::close(fd as i32) };
        return true;
    }
    let e = std::io::Error::last_os_error();
    if std::env::var("SNAP_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("{test}: SNAP_REQUIRE_KVM=1 but userfaultfd is unavailable: {e}");
    }
    println!("SKIP {test}: userfaultfd unavailable: {e}");
    false
}

/// A two-layer chain over scattered data (and long zero stretches), and the image it encodes.
fn chain(dir: &std::path::Path) -> (Vec<std::path::PathBuf>, Vec<u8>) {
    let mem = GuestMemory::new(SIZE).unwrap();
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut pages: Vec<u64> = (0..3000).map(|_| next() % (PAGES / 2)).collect();
    pages.sort_unstable();
    pages.dedup();
    for &p in &pages {
        mem.write_at_offset(p * 4096 + (next() % 4000), &next().to_le_bytes())
            .unwrap();
    }
    let options = LayerOptions {
        frame_size: 64 << 10,
        ..LayerOptions::default()
    };
    let full = dir.join("full");
    let base = write_layer(
        &full,
        &NewLayer {
            id: Id::random(),
            parent: None,
            memory_bytes: SIZE,
        },
        pages.iter().copied(),
        &mem,
        &options,
    )
    .unwrap();
    let mut dirty: Vec<u64> = (0..500).map(|_| next() % PAGES).collect();
    dirty.sort_unstable();
    dirty.dedup();
    for &p in &dirty {
        mem.write_at_offset(p * 4096, &next().to_le_bytes())
            .unwrap();
    }
    let diff = dir.join("diff");
    write_layer(
        &diff,
        &NewLayer {
            id: Id::random(),
            parent: Some(base.as_parent()),
            memory_bytes: SIZE,
        },
        dirty.iter().copied(),
        &mem,
        &options,
    )
    .unwrap();
    (vec![full, diff], mem.to_vec())
}

#[test]
fn lazily_restored_memory_equals_the_chain() {
    if !uffd_available("lazily_restored_memory_equals_the_chain") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (paths, image) = chain(dir.path());
    let target = GuestMemory::new(SIZE).unwrap();
    let server = PageServer::start(&target, LayerChain::open(&paths).unwrap()).unwrap();
    // Two threads read pages in scattered order through the mapping (faults), while the
    // filler installs the rest.
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let (target, image) = (&target, &image);
            s.spawn(move || {
                let mut page = [0u8; 4096];
                for i in 0..400u64 {
                    let p = (i * 7919 + t * 104_729) % PAGES;
                    target.read(p * 4096, &mut page).unwrap();
                    let at = (p * 4096) as usize;
                    assert_eq!(&page[..], &image[at..at + 4096], "page {p}");
                }
            });
        }
    });
    let stats = server.wait().unwrap();
    assert!(stats.faults > 0, "no fault was served: {stats:?}");
    assert!(stats.filled > 0 && stats.zero_units > 0, "{stats:?}");
    // Every 64 KiB window that holds data went in once, by a fault or the filler; windows
    // without data went in only if touched.
    let with_data = windows_with_data(&paths);
    assert!(
        (with_data..=PAGES / 16).contains(&(stats.faults + stats.filled)),
        "{stats:?}, {with_data} windows with data"
    );
    assert!(
        target.to_vec() == image,
        "restored memory differs from the chain's image"
    );
}

#[test]
fn small_units_serve_single_pages_from_one_window_read() {
    if !uffd_available("small_units_serve_single_pages_from_one_window_read") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (paths, image) = chain(dir.path());
    for unit in [4096u64, 16384] {
        let target = GuestMemory::new(SIZE).unwrap();
        let options = snap_mem::lazy::LazyOptions {
            unit_bytes: Some(unit),
            ..Default::default()
        };
        let server =
            PageServer::start_with(&target, LayerChain::open(&paths).unwrap(), options).unwrap();
        let mut page = [0u8; 4096];
        for i in 0..300u64 {
            let p = (i * 7919) % PAGES;
            target.read(p * 4096, &mut page).unwrap();
            let at = (p * 4096) as usize;
            assert_eq!(&page[..], &image[at..at + 4096], "unit {unit}, page {p}");
        }
        let stats = server.wait().unwrap();
        let per_window = (64 << 10) / unit;
        assert!(
            (windows_with_data(&paths) * per_window..=SIZE / unit)
                .contains(&(stats.faults + stats.filled)),
            "unit {unit}: {stats:?}"
        );
        assert!(
            target.to_vec() == image,
            "unit {unit}: restored memory differs"
        );
    }
    let bad = snap_mem::lazy::LazyOptions {
        unit_bytes: Some(3000),
        ..Default::default()
    };
    let target = GuestMemory::new(SIZE).unwrap();
    assert!(PageServer::start_with(&target, LayerChain::open(&paths).unwrap(), bad).is_err());
}

#[test]
fn a_damaged_frame_stops_the_server_naming_layer_and_frame() {
    if !uffd_available("a_damaged_frame_stops_the_server_naming_layer_and_frame") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (paths, _) = chain(dir.path());
    let mut bytes = std::fs::read(&paths[0]).unwrap();
    bytes[4096 + 3] ^= 0x20;
    std::fs::write(&paths[0], bytes).unwrap();
    let target = GuestMemory::new(SIZE).unwrap();
    let server = PageServer::start(&target, LayerChain::open(&paths).unwrap()).unwrap();
    let e = server.wait().unwrap_err();
    assert!(e.contains("full") && e.contains("frame 0"), "{e}");
    assert_eq!(server.failure().as_deref(), Some(e.as_str()));
}

/// Windows of the chain at `paths` that some layer covers (the rest are never stored).
fn windows_with_data(paths: &[std::path::PathBuf]) -> u64 {
    use snap_mem::lazy::WindowSource;
    LayerChain::open(paths)
        .unwrap()
        .windows_with_data()
        .unwrap()
        .len() as u64
}

/// A big memory whose snapshot holds a few pages: the lazy restore installs only the windows
/// that hold data, and the rest of memory stays unallocated (reading as zero) once it finishes.
#[test]
fn windows_without_data_are_left_to_read_as_zero() {
    if !uffd_available("windows_without_data_are_left_to_read_as_zero") {
        return;
    }
    const BIG: u64 = 256 << 20;
    let dir = tempfile::tempdir().unwrap();
    let mem = GuestMemory::new(BIG).unwrap();
    let pages = [3u64, 4, 5000, 60_000];
    for &p in &pages {
        mem.write_at_offset(p * 4096 + 8, &p.to_le_bytes()).unwrap();
    }
    let path = dir.path().join("sparse");
    write_layer(
        &path,
        &NewLayer {
            id: Id::random(),
            parent: None,
            memory_bytes: BIG,
        },
        pages.iter().copied(),
        &mem,
        &LayerOptions {
            frame_size: 64 << 10,
            ..LayerOptions::default()
        },
    )
    .unwrap();
    let target = GuestMemory::new(BIG).unwrap();
    let server = PageServer::start(&target, LayerChain::open(&[&path]).unwrap()).unwrap();
    // Touch one page far from any data: served as zero.
    let mut page = [0xffu8; 4096];
    target.read(50_000 * 4096, &mut page).unwrap();
    assert!(page.iter().all(|&b| b == 0));
    let stats = server.wait().unwrap();
    assert_eq!(
        stats.faults + stats.filled,
        4,
        "3 windows with data and the touched one: {stats:?}"
    );
    assert!(
        target.resident_pages().unwrap().count() <= 4 * 16,
        "memory without data was allocated"
    );
    assert!(target.to_vec() == mem.to_vec(), "restored memory differs");
}

/// Units of a working set in a plausible fault order: runs of neighbours, jumps back and forth,
/// units with data from both layers and all-zero units.
fn fault_order() -> Vec<u64> {
    let mut units: Vec<u64> = (40..56).collect();
    units.extend([7, 3, 300, 299, 301, 0, 511]);
    units.extend((120..140).rev());
    units.extend((200..260).step_by(3));
    units.extend(400..430);
    units
}

#[test]
fn a_recorded_working_set_is_installed_from_its_file_in_bulk() {
    if !uffd_available("a_recorded_working_set_is_installed_from_its_file_in_bulk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (paths, image) = chain(dir.path());
    let source = LayerChain::open(&paths).unwrap();
    let tag = source.newest().info().digest.0;
    let ws = dir.path().join("ws");
    let units = fault_order();
    WorkingSet::record(&ws, 16, &units, &source, tag).unwrap();
    let set = WorkingSet::open(&ws, 16, SIZE, tag).unwrap();
    assert!(set.has_data());
    assert_eq!(set.units().collect::<Vec<_>>(), units);
    // Only non-zero units are stored.
    let stored = units
        .iter()
        .filter(|&&u| {
            let at = (u * 65536) as usize;
            image[at..at + 65536].iter().any(|&b| b != 0)
        })
        .count() as u64;
    assert!(
        stored > 0 && stored < units.len() as u64,
        "{stored} of {}",
        units.len()
    );
    assert_eq!(
        std::fs::metadata(&ws).unwrap().len(),
        4096 + stored * 65536,
        "header and index in the first 4 KiB, then the stored units"
    );

    let target = GuestMemory::new(SIZE).unwrap();
    let options = LazyOptions {
        prefetch: Some(set),
        ..Default::default()
    };
    let server = PageServer::start_with(&target, source, options).unwrap();
    let stats = server.wait().unwrap();
    assert_eq!(stats.prefetched, units.len() as u64, "{stats:?}");
    assert_eq!(stats.faults, 0, "{stats:?}");
    assert!(stats.prefetched + stats.filled <= PAGES / 16, "{stats:?}");
    assert!(target.to_vec() == image, "restored memory differs");
}

#[test]
fn a_damaged_working_set_unit_is_served_from_the_chain() {
    if !uffd_available("a_damaged_working_set_unit_is_served_from_the_chain") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (paths, image) = chain(dir.path());
    let source = LayerChain::open(&paths).unwrap();
    let tag = source.newest().info().digest.0;
    let ws = dir.path().join("ws");
    WorkingSet::record(&ws, 16, &fault_order(), &source, tag).unwrap();
    // Flip a byte in the first stored unit's bytes: the index still checks out.
    let mut bytes = std::fs::read(&ws).unwrap();
    bytes[4096 + 100] ^= 0x5a;
    std::fs::write(&ws, &bytes).unwrap();
    let set = WorkingSet::open(&ws, 16, SIZE, tag).unwrap();
    let target = GuestMemory::new(SIZE).unwrap();
    let options = LazyOptions {
        prefetch: Some(set),
        ..Default::default()
    };
    let server = PageServer::start_with(&target, source, options).unwrap();
    server.wait().unwrap();
    assert!(target.to_vec() == image, "a damaged unit reached memory");
}

#[test]
fn a_working_set_for_other_memory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, _) = chain(dir.path());
    let source = LayerChain::open(&paths).unwrap();
    let tag = source.newest().info().digest.0;
    let ws = dir.path().join("ws");
    WorkingSet::record(&ws, 16, &fault_order(), &source, tag).unwrap();
    let mismatch = |r: Result<WorkingSet, WorkingSetError>, what: &str| match r {
        Err(e @ WorkingSetError::Mismatch { .. }) => {
            assert!(e.to_string().contains(what), "{e}");
        }
        other => panic!("expected a mismatch about {what}, got {other:?}"),
    };
    mismatch(WorkingSet::open(&ws, 4, SIZE, tag), "units of 16 pages");
    mismatch(WorkingSet::open(&ws, 16, SIZE * 2, tag), "bytes of memory");
    mismatch(WorkingSet::open(&ws, 16, SIZE, [7; 32]), "tag differs");
    // A truncated data section, and a damaged index.
    let bytes = std::fs::read(&ws).unwrap();
    std::fs::write(&ws, &bytes[..bytes.len() - 1]).unwrap();
    mismatch(WorkingSet::open(&ws, 16, SIZE, tag), "its index needs");
    let mut damaged = bytes.clone();
    damaged[40] ^= 1;
    std::fs::write(&ws, &damaged).unwrap();
    let e = WorkingSet::open(&ws, 16, SIZE, tag).unwrap_err();
    assert!(matches!(e, WorkingSetError::File(_)), "{e:?}");
    assert!(e.to_string().contains("checksum"), "{e}");
    // A unit beyond memory cannot be recorded.
    let e = WorkingSet::record(&ws, 16, &[PAGES], &source, tag).unwrap_err();
    assert!(e.to_string().contains("beyond memory"), "{e}");
}

#[test]
fn checking_a_working_set_names_the_units_whose_bytes_are_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, image) = chain(dir.path());
    let source = LayerChain::open(&paths).unwrap();
    let tag = source.newest().info().digest.0;
    let ws = dir.path().join("ws");
    let units = fault_order();
    WorkingSet::record(&ws, 16, &units, &source, tag).unwrap();
    let set = WorkingSet::open(&ws, 16, SIZE, tag).unwrap();
    assert_eq!(set.check().unwrap(), Vec::<u64>::new());
    // Damage the second stored unit: the check names it, and only it.
    let stored: Vec<u64> = units
        .iter()
        .copied()
        .filter(|&u| {
            let at = (u * 65536) as usize;
            image[at..at + 65536].iter().any(|&b| b != 0)
        })
        .collect();
    let mut bytes = std::fs::read(&ws).unwrap();
    bytes[4096 + 65536 + 7] ^= 0x5a;
    std::fs::write(&ws, &bytes).unwrap();
    let set = WorkingSet::open(&ws, 16, SIZE, tag).unwrap();
    assert_eq!(set.check().unwrap(), vec![stored[1]]);
    // A set without bytes has nothing to check.
    assert!(
        WorkingSet::from_units(16, &units)
            .check()
            .unwrap()
            .is_empty()
    );
}
