//! A disk chain against an in-memory model: random writes of any 512-aligned size and offset,
//! flushes, seals, reopens, merges (live and on closed files, into child and parent) and
//! flattens. After every step every byte read equals the model, and every sealed layer, opened
//! as the top of its own chain, reads as the disk did when it was sealed.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use snap_disk::{
    Disk, Geometry, MergeInto, check_layer, merge_into_child, merge_into_parent, relink_parent,
};

#[derive(Clone, Debug)]
enum Op {
    Write { sector: u64, sectors: u64, seed: u8 },
    Flush,
    Seal,
    Reopen,
    Merge { pick: usize, into_parent: bool },
    MergeFiles { pick: usize, into_parent: bool },
    Flatten,
}

fn op(sectors: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (0..sectors, 1u64..400, any::<u8>()).prop_map(move |(sector, n, seed)| Op::Write {
            sector,
            sectors: n.min(sectors - sector),
            seed,
        }),
        2 => Just(Op::Flush),
        3 => Just(Op::Seal),
        1 => Just(Op::Reopen),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(pick, into_parent)| Op::Merge { pick, into_parent }),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(pick, into_parent)| Op::MergeFiles { pick, into_parent }),
        1 => Just(Op::Flatten),
    ]
}

fn fill(seed: u8, offset: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let x = (offset + i as u64).wrapping_mul(0x9e37_79b9) >> 7;
            (x as u8) ^ seed.wrapping_mul(31)
        })
        .collect()
}

struct World {
    dir: tempfile::TempDir,
    next_file: usize,
    disk: Option<Disk>,
    paths: Vec<PathBuf>,
    model: Vec<u8>,
    /// What each layer read as when sealed (`None` for the writable top).
    views: Vec<Option<Vec<u8>>>,
}

impl World {
    fn new(geometry: Geometry) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0");
        let disk = Disk::create(&path, geometry).unwrap();
        Self {
            dir,
            next_file: 1,
            disk: Some(disk),
            paths: vec![path],
            model: vec![0; geometry.disk_bytes as usize],
            views: vec![None],
        }
    }

    fn fresh(&mut self) -> PathBuf {
        self.next_file += 1;
        self.dir.path().join(self.next_file.to_string())
    }

    fn disk(&self) -> &Disk {
        self.disk.as_ref().unwrap()
    }

    fn reopen(&mut self) {
        self.disk = None;
        self.disk = Some(Disk::open(&self.paths).unwrap());
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Write {
                sector,
                sectors,
                seed,
            } => {
                let (offset, len) = (sector * 512, (sectors * 512) as usize);
                let data = fill(seed, offset, len);
                match self.disk().write_at(offset, &data) {
                    Ok(()) => {
                        self.model[offset as usize..offset as usize + len].copy_from_slice(&data);
                    }
                    Err(e) => panic!("write {offset}+{len}: {e}"),
                }
            }
            Op::Flush => self.disk().flush().unwrap(),
            Op::Seal => {
                let path = self.fresh();
                let sealed = self.disk().seal(&path).unwrap();
                assert!(sealed.sealed());
                *self.views.last_mut().unwrap() = Some(self.model.clone());
                self.views.push(None);
                self.paths.push(path);
            }
            Op::Reopen => self.reopen(),
            Op::Merge { pick, into_parent } => {
                if self.paths.len() < 2 {
                    return;
                }
                let i = pick % (self.paths.len() - 1);
                let into = if into_parent {
                    MergeInto::Parent
                } else {
                    MergeInto::Child
                };
                let out = self.disk().merge(i, into).unwrap();
                std::fs::remove_file(&out.unused).unwrap();
                self.paths = self.disk().paths();
                self.views.remove(i);
            }
            Op::MergeFiles { pick, into_parent } => {
                if self.paths.len() < 2 {
                    return;
                }
                self.disk().flush().unwrap();
                self.disk = None;
                let i = pick % (self.paths.len() - 1);
                let (parent, child) = (self.paths[i].clone(), self.paths[i + 1].clone());
                let (merged, unused) = if into_parent {
                    (merge_into_parent(&parent, &child).unwrap(), child)
                } else {
                    (merge_into_child(&parent, &child).unwrap(), parent)
                };
                if let Some(above) = self.paths.get(i + 2) {
                    relink_parent(above, merged.as_parent()).unwrap();
                }
                std::fs::remove_file(&unused).unwrap();
                self.paths[i] = merged.path;
                self.paths.remove(i + 1);
                self.views.remove(i);
                self.reopen();
            }
            Op::Flatten => {
                // Flatten everything below a fresh top into one base, as a cleanup would.
                let top = self.fresh();
                self.disk().seal(&top).unwrap();
                let below = self.paths.clone();
                let base = self.fresh();
                let flat = Disk::open_read_only(&below)
                    .unwrap()
                    .flatten(&base)
                    .unwrap();
                assert!(check_layer(&base).unwrap().is_clean());
                relink_parent(&top, flat.as_parent()).unwrap();
                self.disk = None;
                for p in &below {
                    std::fs::remove_file(p).unwrap();
                }
                self.paths = vec![base, top];
                self.views = vec![Some(self.model.clone()), None];
                self.reopen();
            }
        }
    }

    fn check_reads(&self, probe: (u64, u64)) {
        let disk = self.disk();
        let mut all = vec![0u8; self.model.len()];
        disk.read_at(0, &mut all).unwrap();
        assert!(all == self.model, "whole-disk read differs from the model");
        let sectors = self.model.len() as u64 / 512;
        let start = probe.0 % sectors;
        let n = 1 + probe.1 % (sectors - start);
        let mut part = vec![0u8; (n * 512) as usize];
        disk.read_at(start * 512, &mut part).unwrap();
        let at = (start * 512) as usize;
        assert!(
            part == self.model[at..at + part.len()],
            "read {start}+{n} sectors differs"
        );
    }

    fn check_views(&self) {
        for (k, view) in self.views.iter().enumerate() {
            let Some(view) = view else { continue };
            let prefix = Disk::open_read_only(&self.paths[..=k]).unwrap();
            let mut all = vec![0u8; view.len()];
            prefix.read_at(0, &mut all).unwrap();
            assert!(
                &all == view,
                "sealed layer {k} no longer reads as when it was sealed"
            );
        }
    }
}

fn run(geometry: Geometry, ops: &[(Op, (u64, u64))]) {
    let mut world = World::new(geometry);
    for (op, probe) in ops {
        world.apply(op);
        world.check_reads(*probe);
        if matches!(op, Op::Merge { .. } | Op::MergeFiles { .. } | Op::Flatten) {
            world.check_views();
        }
    }
    world.check_views();
    // Everything flushed survives a reopen; every layer checks clean.
    world.disk().flush().unwrap();
    world.reopen();
    world.check_reads((0, 0));
    for p in &world.paths {
        let report = check_layer(p).unwrap();
        assert!(report.is_clean(), "{report}");
    }
    assert!(
        world.paths.iter().all(|p| Path::new(p).exists()),
        "a chain file is missing"
    );
}

/// 8 blocks of 64 KiB and a partial last block of 1.5 KiB.
const SMALL: Geometry = Geometry {
    disk_bytes: 8 * 65536 + 3 * 512,
    block_size: 65536,
};

/// 4 KiB blocks: writes span many blocks.
const FINE: Geometry = Geometry {
    disk_bytes: 256 * 1024,
    block_size: 4096,
};

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn chain_matches_model_64k_blocks(ops in prop::collection::vec((op(SMALL.disk_bytes / 512), any::<(u64, u64)>()), 1..60)) {
        run(SMALL, &ops);
    }

    #[test]
    fn chain_matches_model_4k_blocks(ops in prop::collection::vec((op(FINE.disk_bytes / 512), any::<(u64, u64)>()), 1..60)) {
        run(FINE, &ops);
    }
}
