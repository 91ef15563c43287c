//! snap-mem's memory layer file: header and superblock, index section (postcard frame table),
//! frames. Opens the file with `Layer::open`, then reads it every way a restore does: each
//! frame, single pages, the windows of a lazy restore and a whole eager restore, and checks that
//! they agree.
//!
//! Each input is the file as it is, then (if that changes anything) with the superblock's
//! layout fields and both snap-core checksums made right, so the index parser runs on mutated
//! indexes too.

#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use snap_fuzz::MemFile;
use snap_fuzz::mem::{fixed, restore, zero_page_crc};
use snap_mem::layer::{Layer, LayerChain, PAGE, Restore, WindowScratch};
use snap_mem::lazy::WindowSource;

/// Pages read one at a time (each read decompresses its frame).
const PAGE_READS: usize = 48;
/// Windows read as a lazy restore reads them.
const WINDOW_READS: usize = 8;

thread_local! {
    static FILE: MemFile = MemFile::new(c"mem_layer");
}

fn exercise(bytes: &[u8]) {
    let Some(layer) = FILE.with(|f| Layer::open(f.set(bytes)).ok()) else {
        return;
    };
    let info = *layer.info();
    assert!(info.memory_bytes > 0 && info.memory_bytes.is_multiple_of(PAGE as u64));
    assert_eq!(info.frames, layer.frame_count());
    assert_eq!(info.stored_bytes, bytes.len() as u64);

    for f in 0..layer.frame_count() {
        let frame = layer.frame(f);
        assert!(frame.pages.start < frame.pages.end && frame.pages.end <= info.memory_pages());
        assert!(frame.stored_pages <= frame.present_pages);
        if let Ok(data) = layer.read_frame(f) {
            assert_eq!(data.len(), frame.stored_pages * PAGE);
        }
    }

    let mut page = Box::new([0u8; PAGE]);
    let mut sampled = Vec::new();
    for (p, entry) in layer.pages().take(PAGE_READS) {
        assert!(p < info.memory_pages());
        assert_eq!(layer.page(p), Some(entry));
        if let Ok(held) = layer.read_page(p, &mut page) {
            assert!(held, "page {p} is listed but not held");
            sampled.push((p, snap_core::crc32c(&page[..])));
        }
    }
    assert!(layer.read_page(info.memory_pages(), &mut page).is_err());

    // A chain starts with a layer without a parent.
    let Ok(chain) = LayerChain::from_layers(vec![layer]) else {
        assert!(info.parent.is_some());
        return;
    };
    let wp = chain.window_pages();
    let windows = WindowSource::windows_with_data(&chain).expect("a chain lists its windows");
    let mut buf = vec![0u8; wp as usize * PAGE];
    let mut scratch = WindowScratch::default();
    let mut window_pages = HashMap::new();
    for &w in windows.iter().take(WINDOW_READS) {
        assert!(w * wp < info.memory_pages());
        if chain.read_window(w, &mut buf, &mut scratch).is_ok() {
            for (i, p) in buf.chunks_exact(PAGE).enumerate() {
                window_pages.insert(w * wp + i as u64, snap_core::crc32c(p));
            }
        }
    }

    // The eager restore, into fresh and into used memory, agrees with both.
    let zero = zero_page_crc();
    for target in [Restore::Fresh, Restore::Used] {
        let Some(restored) = restore(&chain, target) else {
            continue;
        };
        for &(p, crc) in &sampled {
            assert_eq!(restored.get(&p).copied().unwrap_or(zero), crc, "page {p}");
        }
        for (p, crc) in &window_pages {
            if *p < info.memory_pages() {
                assert_eq!(restored.get(p).copied().unwrap_or(zero), *crc, "page {p}");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    snap_fuzz::run(data, |data| {
        exercise(data);
        let fixed = fixed(data);
        if fixed != data {
            exercise(&fixed);
        }
    });
});
