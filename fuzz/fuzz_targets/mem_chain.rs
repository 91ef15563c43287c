//! A chain of two snap-mem memory layers, a parent and a child naming it: `LayerChain::open`
//! (the links checked), the eager restore and the windows of a lazy restore, which must agree
//! page for page, then `merge_into_child` (what deleting the parent's snapshot does), whose
//! result must restore to the same memory.
//!
//! Input: the parent's length (u32, little endian, taken modulo what follows), the parent file,
//! the child file. Each input runs as it is, then (if that changes anything) with both files
//! fixed up as in `mem_layer` and the child's parent link set to the parent's id and digest.

#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use snap_fuzz::mem::{INDEX_MAGIC, fixed, index_payload, restore};
use snap_fuzz::{MemFile, fix_blobs, scratch_dir};
use snap_mem::layer::{Layer, LayerChain, PAGE, Restore, WindowScratch, merge_into_child};
use snap_mem::lazy::WindowSource;

/// Windows read as a lazy restore reads them.
const WINDOW_READS: usize = 8;

thread_local! {
    static FILES: [MemFile; 2] = [MemFile::new(c"mem_chain_parent"), MemFile::new(c"mem_chain_child")];
}

fn split(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = data.split_first_chunk::<4>()?;
    let len = u32::from_le_bytes(*len) as usize % (rest.len() + 1);
    Some(rest.split_at(len))
}

/// Points the child's parent link at the parent: its id and the BLAKE3 digest of its index
/// content (the index payload after the link).
fn link(parent: &mut [u8], child: &mut [u8]) {
    let Some(p) = index_payload(parent) else {
        return;
    };
    // A parent without a parent of its own: link byte 0, then the content, which starts with
    // the id.
    if p.len() < 17 || p[0] != 0 {
        return;
    }
    let content = &p[1..];
    let id: [u8; 16] = content[..16].try_into().unwrap();
    let digest = *blake3::hash(content).as_bytes();
    let Some(c) = index_payload(child) else {
        return;
    };
    if c.len() < 49 || c[0] != 1 {
        return;
    }
    c[1..17].copy_from_slice(&id);
    c[17..49].copy_from_slice(&digest);
    fix_blobs(child, &[INDEX_MAGIC]);
}

fn exercise(parent: &[u8], child: &[u8]) {
    let Some(chain) = FILES.with(|[p, c]| {
        p.set(parent);
        c.set(child);
        LayerChain::open(&[p.path(), c.path()]).ok()
    }) else {
        return;
    };
    let pages = chain.memory_bytes() / PAGE as u64;
    let Some(image) = restore(&chain, Restore::Fresh) else {
        return;
    };
    assert!(image.keys().all(|&p| p < pages));
    assert_eq!(restore(&chain, Restore::Used).as_ref(), Some(&image));

    let wp = chain.window_pages();
    let windows = WindowSource::windows_with_data(&chain).expect("a chain lists its windows");
    let mut buf = vec![0u8; wp as usize * PAGE];
    let mut scratch = WindowScratch::default();
    for &w in windows.iter().take(WINDOW_READS) {
        chain
            .read_window(w, &mut buf, &mut scratch)
            .expect("a window of a chain that restored reads");
        let zero = snap_fuzz::mem::zero_page_crc();
        for (i, p) in buf.chunks_exact(PAGE).enumerate() {
            let page = w * wp + i as u64;
            if page < pages {
                let crc = snap_core::crc32c(p);
                assert_eq!(
                    image.get(&page).copied().unwrap_or(zero),
                    crc,
                    "page {page}"
                );
            }
        }
    }

    let [parent, child] = <[Layer; 2]>::try_from(chain.into_layers()).unwrap();
    let out = scratch_dir().join("merged");
    let merged = merge_into_child(&parent, &child, &out, std::num::NonZeroUsize::new(1));
    if let Ok(info) = merged {
        assert_eq!(info.id, child.info().id);
        assert_eq!(info.parent, None);
        let merged = LayerChain::open(&[&out]).expect("a merged layer opens");
        let again: HashMap<u64, u32> =
            restore(&merged, Restore::Fresh).expect("a merged layer restores");
        assert_eq!(again, image, "the merged layer restores to other memory");
    }
}

fuzz_target!(|data: &[u8]| {
    snap_fuzz::run(data, |data| {
        let Some((parent, child)) = split(data) else {
            return;
        };
        exercise(parent, child);
        let mut p = fixed(parent);
        let mut c = fixed(child);
        link(&mut p, &mut c);
        if p != parent || c != child {
            exercise(&p, &c);
        }
    });
});
