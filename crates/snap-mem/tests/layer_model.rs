//! Memory layers against an in-memory model: random writes, snapshots (full, then diff layers
//! of exactly the pages written since) and merges (snapshot deletes), checking every page of
//! every remaining snapshot after every step.

use std::collections::BTreeSet;
use std::num::NonZeroUsize;
use std::path::PathBuf;

use proptest::prelude::*;
use snap_core::Id;
use snap_mem::GuestMemory;
use snap_mem::layer::{
    Layer, LayerChain, LayerInfo, LayerOptions, NewLayer, PAGE, Restore, merge_into_child,
    relink_parent, write_layer,
};

#[derive(Clone, Debug)]
enum Op {
    /// Write random bytes (from a seed) to a page.
    Write { page: usize, seed: u64 },
    /// Write zeros to a page (often one holding data: a page made zero again).
    Zero { page: usize },
    /// Take a snapshot, writing its layer with this frame size and thread count.
    Snapshot { frame_kib: u32, threads: usize },
    /// Delete the snapshot whose layer is at this position (mod the chain length - 1) by
    /// merging its layer into the child.
    Merge { at: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (any::<usize>(), any::<u64>()).prop_map(|(page, seed)| Op::Write { page, seed }),
        2 => any::<usize>().prop_map(|page| Op::Zero { page }),
        2 => (prop_oneof![Just(64u32), Just(128)], 1usize..=3)
            .prop_map(|(frame_kib, threads)| Op::Snapshot { frame_kib, threads }),
        1 => any::<usize>().prop_map(|at| Op::Merge { at }),
    ]
}

fn fill(seed: u64, page: &mut [u8]) {
    let mut x = seed | 1;
    for b in page.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
}

/// One snapshot: its layer file and the memory image it must restore to.
struct Snap {
    path: PathBuf,
    info: LayerInfo,
    image: Vec<u8>,
}

struct World {
    dir: tempfile::TempDir,
    pages: usize,
    memory: GuestMemory,
    model: Vec<u8>,
    dirty: BTreeSet<u64>,
    /// The chain, oldest first; snapshot `k` restores through `snaps[..=k]`.
    snaps: Vec<Snap>,
    next_file: usize,
}

impl World {
    fn new(pages: usize) -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            pages,
            memory: GuestMemory::new((pages * PAGE) as u64).unwrap(),
            model: vec![0; pages * PAGE],
            dirty: BTreeSet::new(),
            snaps: Vec::new(),
            next_file: 0,
        }
    }

    fn write(&mut self, page: usize, bytes: &[u8]) {
        self.memory
            .write_at_offset((page * PAGE) as u64, bytes)
            .unwrap();
        self.model[page * PAGE..(page + 1) * PAGE].copy_from_slice(bytes);
        self.dirty.insert(page as u64);
    }

    fn nonzero(&self, page: u64) -> bool {
        let p = page as usize * PAGE;
        self.model[p..p + PAGE].iter().any(|&b| b != 0)
    }

    fn snapshot(&mut self, frame_kib: u32, threads: usize) {
        let options = LayerOptions {
            frame_size: frame_kib << 10,
            threads: NonZeroUsize::new(threads),
            ..LayerOptions::default()
        };
        let path = self.dir.path().join(format!("{}.mlayer", self.next_file));
        self.next_file += 1;
        let parent = self.snaps.last().map(|s| s.info.as_parent());
        let layer = NewLayer {
            id: Id::random(),
            parent,
            memory_bytes: self.memory.size(),
        };
        let pages: Vec<u64> = if parent.is_none() {
            (0..self.pages as u64)
                .filter(|&p| self.nonzero(p))
                .collect()
        } else {
            self.dirty.iter().copied().collect()
        };
        let info =
            write_layer(&path, &layer, pages.iter().copied(), &self.memory, &options).unwrap();
        // The layer holds exactly the pages it was given; zero pages are never stored.
        let nonzero = pages.iter().filter(|&&p| self.nonzero(p)).count() as u64;
        assert_eq!(info.pages_present, pages.len() as u64);
        assert_eq!(info.pages_stored, nonzero);
        let opened = Layer::open(&path).unwrap();
        assert_eq!(opened.info(), &info);
        let held: Vec<u64> = opened.pages().map(|(p, _)| p).collect();
        assert_eq!(held, pages);
        self.dirty.clear();
        self.snaps.push(Snap {
            path,
            info,
            image: self.model.clone(),
        });
    }

    fn merge(&mut self, at: usize) {
        if self.snaps.len() < 2 {
            return;
        }
        let j = at % (self.snaps.len() - 1);
        let layer = Layer::open(&self.snaps[j].path).unwrap();
        let child = Layer::open(&self.snaps[j + 1].path).unwrap();
        let merged = merge_into_child(&layer, &child, &self.snaps[j + 1].path, None).unwrap();
        assert_eq!(merged.id, child.info().id);
        assert_eq!(merged.parent, layer.parent());
        if merged.parent.is_none() {
            // Without a parent, zero entries are dropped: absent reads as zero.
            assert_eq!(merged.pages_present, merged.pages_stored);
        }
        std::fs::remove_file(&self.snaps[j].path).unwrap();
        self.snaps[j + 1].info = merged;
        if let Some(grandchild) = self.snaps.get_mut(j + 2) {
            let before = grandchild.info;
            let relinked = relink_parent(&grandchild.path, Some(merged.as_parent())).unwrap();
            assert_eq!(relinked.digest, before.digest, "relinking keeps the digest");
            assert_eq!(relinked.parent, Some(merged.as_parent()));
            grandchild.info = relinked;
        }
        self.snaps.remove(j);
    }

    fn check(&self) {
        let other = GuestMemory::new(self.memory.size()).unwrap();
        let mut page = [0u8; PAGE];
        for k in 0..self.snaps.len() {
            let paths: Vec<_> = self.snaps[..=k].iter().map(|s| &s.path).collect();
            let chain = LayerChain::open(&paths).unwrap();
            let image = &self.snaps[k].image;
            for p in 0..self.pages {
                chain.read_page(p as u64, &mut page).unwrap();
                assert!(
                    page[..] == image[p * PAGE..(p + 1) * PAGE],
                    "snapshot {k} page {p} differs"
                );
            }
            let fresh = GuestMemory::new(self.memory.size()).unwrap();
            chain.materialize_into(&fresh, Restore::Fresh).unwrap();
            assert!(fresh.to_vec() == *image, "fresh restore of snapshot {k}");
            // A used target: the live memory's content plus some junk everywhere else.
            other.write_at_offset(0, &self.model).unwrap();
            for p in (0..self.pages).step_by(3) {
                other
                    .write_at_offset((p * PAGE) as u64, &[0xa5; 64])
                    .unwrap();
            }
            chain.materialize_into(&other, Restore::Used).unwrap();
            assert!(other.to_vec() == *image, "used restore of snapshot {k}");
            chain.newest().verify().unwrap();
        }
        // No temporary files are left behind.
        for e in std::fs::read_dir(self.dir.path()).unwrap() {
            let name = e.unwrap().file_name();
            assert!(
                !name.to_string_lossy().ends_with(".tmp"),
                "{name:?} left over"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn reads_through_every_chain_match_the_model(
        pages in 64usize..=512,
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        let mut w = World::new(pages);
        let mut buf = vec![0u8; PAGE];
        for op in ops {
            match op {
                Op::Write { page, seed } => {
                    fill(seed, &mut buf);
                    w.write(page % pages, &buf.clone());
                }
                Op::Zero { page } => {
                    // Prefer a page that holds data, so it becomes zero again.
                    let holding: Vec<usize> =
                        (0..pages).filter(|&p| w.nonzero(p as u64)).collect();
                    let p = if holding.is_empty() { page % pages } else { holding[page % holding.len()] };
                    w.write(p, &[0u8; PAGE]);
                }
                Op::Snapshot { frame_kib, threads } => w.snapshot(frame_kib, threads),
                Op::Merge { at } => w.merge(at),
            }
            w.check();
        }
        w.snapshot(64, 2);
        w.check();
    }
}
