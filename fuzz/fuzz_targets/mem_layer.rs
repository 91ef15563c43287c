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
use std::io;
use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use snap_fuzz::{MemFile, fix_blobs};
use snap_mem::layer::{Layer, LayerChain, PAGE, PageSink, Restore, WindowScratch};
use snap_mem::lazy::WindowSource;

const LAYER_MAGIC: [u8; 8] = *b"SNAPMLAY";
const INDEX_MAGIC: [u8; 8] = *b"SNAPMIDX";
/// Header (32 bytes) and superblock (64 bytes).
const HEAD_LEN: usize = 96;
const FRAMES_OFFSET: usize = 4096;
/// Pages read one at a time (each read decompresses its frame).
const PAGE_READS: usize = 48;
/// Windows read as a lazy restore reads them.
const WINDOW_READS: usize = 8;

thread_local! {
    static FILE: MemFile = MemFile::new(c"mem_layer");
}

/// The file with the superblock describing where the (last) index section is, and every
/// checksum right.
fn fixed(file: &[u8]) -> Vec<u8> {
    let mut b = file.to_vec();
    if b.len() >= HEAD_LEN {
        let len = b.len() as u64;
        let mut put = |field: usize, v: u64| {
            b[32 + field * 8..40 + field * 8].copy_from_slice(&v.to_le_bytes());
        };
        put(0, FRAMES_OFFSET as u64);
        put(4, len);
        if let Some(at) = file
            .get(FRAMES_OFFSET..)
            .and_then(|rest| rest.windows(8).rposition(|w| w == INDEX_MAGIC))
        {
            let index = (FRAMES_OFFSET + at) as u64;
            put(1, index - FRAMES_OFFSET as u64);
            put(2, index);
            put(3, len - index);
        }
        b[72..76].copy_from_slice(&(PAGE as u32).to_le_bytes());
    }
    fix_blobs(&mut b, &[LAYER_MAGIC, INDEX_MAGIC]);
    b
}

/// A restore target that checks every write lies inside memory and keeps a checksum per page.
struct Sink {
    pages: u64,
    written: Mutex<HashMap<u64, u32>>,
}

impl PageSink for Sink {
    fn page_count(&self) -> u64 {
        self.pages
    }

    fn write_pages(&self, first_page: u64, data: &[u8]) -> io::Result<()> {
        assert!(data.len().is_multiple_of(PAGE), "a write of part of a page");
        let n = (data.len() / PAGE) as u64;
        assert!(
            first_page
                .checked_add(n)
                .is_some_and(|end| end <= self.pages),
            "write of pages {first_page}+{n} outside memory of {} pages",
            self.pages
        );
        let mut w = self.written.lock().unwrap();
        for (i, page) in data.chunks_exact(PAGE).enumerate() {
            let old = w.insert(first_page + i as u64, snap_core::crc32c(page));
            assert!(
                old.is_none(),
                "page {} written twice",
                first_page + i as u64
            );
        }
        Ok(())
    }

    fn zero_pages(&self, first_page: u64, count: u64) -> io::Result<()> {
        assert!(
            first_page
                .checked_add(count)
                .is_some_and(|end| end <= self.pages),
            "zeroing pages {first_page}+{count} outside memory of {} pages",
            self.pages
        );
        Ok(())
    }
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

    let zero = snap_core::crc32c(&[0u8; PAGE]);
    for target in [Restore::Fresh, Restore::Used] {
        let sink = Sink {
            pages: info.memory_pages(),
            written: Mutex::new(HashMap::new()),
        };
        if chain.materialize_into(&sink, target).is_err() {
            continue;
        }
        let written = sink.written.into_inner().unwrap();
        for &(p, crc) in &sampled {
            assert_eq!(written.get(&p).copied().unwrap_or(zero), crc, "page {p}");
        }
        for (p, crc) in &window_pages {
            if *p < info.memory_pages() {
                assert_eq!(written.get(p).copied().unwrap_or(zero), *crc, "page {p}");
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
