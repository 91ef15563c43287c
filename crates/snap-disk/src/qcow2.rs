//! Export of a disk as a qcow2 (version 3) image, written here from the published format:
//! header, L1 and L2 tables, refcount table and blocks, data clusters; no backing file, no
//! compression. All qcow2 integers are big endian.
//!
//! Layout: cluster 0 the header, then the L1 table, the refcount table, the refcount blocks and
//! the L2 tables, then the data clusters. Metadata is sized for every cluster a layer holds;
//! clusters that read as zero are left unallocated (they read as zero in a version 3 image
//! without a backing file).

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::Path;

use snap_core::AtomicFile;

use crate::disk::Disk;
use crate::error::DiskError;
use crate::image::is_zero;

const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// Entries of one L2 table (8-byte entries).
const L2_ENTRIES: u64 = CLUSTER / 8;
/// Clusters one refcount block covers (16-bit refcounts).
const REFCOUNTS_PER_BLOCK: u64 = CLUSTER / 2;
/// Bytes of the version 3 header.
const HEADER_LENGTH: u32 = 104;
/// Set in an L1 or L2 entry whose cluster has refcount 1.
const COPIED: u64 = 1 << 63;

struct Layout {
    l1_entries: u64,
    l1_at: u64,
    refcount_table_at: u64,
    refcount_table_clusters: u64,
    refcount_blocks_at: u64,
    refcount_blocks: u64,
    l2_at: u64,
    /// First data cluster.
    data_at: u64,
}

fn layout(disk_bytes: u64, l2_tables: u64, data_clusters: u64) -> Layout {
    let l1_entries = disk_bytes.div_ceil(CLUSTER * L2_ENTRIES);
    let l1_clusters = (l1_entries * 8).div_ceil(CLUSTER).max(1);
    let mut refcount_blocks = 1;
    let mut refcount_table_clusters = 1;
    loop {
        let total =
            1 + l1_clusters + refcount_table_clusters + refcount_blocks + l2_tables + data_clusters;
        let blocks = total.div_ceil(REFCOUNTS_PER_BLOCK);
        let table = (blocks * 8).div_ceil(CLUSTER);
        if blocks == refcount_blocks && table == refcount_table_clusters {
            break;
        }
        refcount_blocks = blocks.max(refcount_blocks);
        refcount_table_clusters = table.max(refcount_table_clusters);
    }
    let l1_at = 1;
    let refcount_table_at = l1_at + l1_clusters;
    let refcount_blocks_at = refcount_table_at + refcount_table_clusters;
    let l2_at = refcount_blocks_at + refcount_blocks;
    Layout {
        l1_entries,
        l1_at,
        refcount_table_at,
        refcount_table_clusters,
        refcount_blocks_at,
        refcount_blocks,
        l2_at,
        data_at: l2_at + l2_tables,
    }
}

impl Disk {
    /// Writes what the disk reads as a qcow2 version 3 image at `out` (64 KiB clusters, no
    /// backing file), atomically. `qemu-img check` finds it clean and `qemu-img compare` finds it
    /// identical to [`Disk::export_raw`]'s image.
    ///
    /// # Errors
    /// The I/O error naming the file, or a read error of the chain.
    pub fn export_qcow2(&self, out: &Path) -> Result<(), DiskError> {
        let size = self.size();
        let bs = u64::from(self.block_size());
        // Clusters any layer holds data for.
        let candidates: BTreeSet<u64> = self.with_chain(|chain| {
            chain
                .allocated_blocks()
                .into_iter()
                .flat_map(|b| {
                    let start = b * bs;
                    let end = (start + bs).min(size);
                    start / CLUSTER..end.div_ceil(CLUSTER)
                })
                .collect()
        });
        let l2_tables: BTreeSet<u64> = candidates.iter().map(|c| c / L2_ENTRIES).collect();
        let l2_slot = |table: u64| l2_tables.range(..table).count() as u64;
        let lay = layout(size, l2_tables.len() as u64, candidates.len() as u64);

        let tmp = AtomicFile::create(out).map_err(|e| DiskError::Io {
            path: out.to_path_buf(),
            op: e.op,
            error: e.source,
        })?;
        let file = tmp.file();
        let write = |bytes: &[u8], at: u64| {
            file.write_all_at(bytes, at)
                .map_err(DiskError::io(out, "write qcow2 image"))
        };

        // Data clusters, and the L2 tables pointing at them.
        let mut l2 = vec![0u8; (l2_tables.len() as u64 * CLUSTER) as usize];
        let mut next = lay.data_at;
        let mut buf = vec![0u8; CLUSTER as usize];
        for &cluster in &candidates {
            let start = cluster * CLUSTER;
            let data = &mut buf[..(size - start).min(CLUSTER) as usize];
            self.read_at(start, data)?;
            if is_zero(data) {
                continue;
            }
            write(data, next * CLUSTER)?;
            let at =
                (l2_slot(cluster / L2_ENTRIES) * L2_ENTRIES + cluster % L2_ENTRIES) as usize * 8;
            l2[at..at + 8].copy_from_slice(&((next * CLUSTER) | COPIED).to_be_bytes());
            next += 1;
        }
        let clusters = next;
        write(&l2, lay.l2_at * CLUSTER)?;

        let mut l1 = vec![0u8; (lay.l1_entries * 8) as usize];
        for (i, table) in l2_tables.iter().enumerate() {
            let entry = ((lay.l2_at + i as u64) * CLUSTER) | COPIED;
            l1[*table as usize * 8..*table as usize * 8 + 8].copy_from_slice(&entry.to_be_bytes());
        }
        write(&l1, lay.l1_at * CLUSTER)?;

        let mut table = vec![0u8; (lay.refcount_table_clusters * CLUSTER) as usize];
        for i in 0..lay.refcount_blocks {
            let at = (i * 8) as usize;
            table[at..at + 8]
                .copy_from_slice(&((lay.refcount_blocks_at + i) * CLUSTER).to_be_bytes());
        }
        write(&table, lay.refcount_table_at * CLUSTER)?;
        let mut refcounts = vec![0u8; (lay.refcount_blocks * CLUSTER) as usize];
        for c in 0..clusters {
            refcounts[c as usize * 2..c as usize * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
        }
        write(&refcounts, lay.refcount_blocks_at * CLUSTER)?;

        let mut h = vec![0u8; CLUSTER as usize];
        let mut put = |at: usize, bytes: &[u8]| h[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, b"QFI\xfb");
        put(4, &3u32.to_be_bytes());
        put(20, &CLUSTER_BITS.to_be_bytes());
        put(24, &size.to_be_bytes());
        put(36, &(lay.l1_entries as u32).to_be_bytes());
        put(40, &(lay.l1_at * CLUSTER).to_be_bytes());
        put(48, &(lay.refcount_table_at * CLUSTER).to_be_bytes());
        put(56, &(lay.refcount_table_clusters as u32).to_be_bytes());
        put(96, &4u32.to_be_bytes()); // refcount_order: 16-bit refcounts
        put(100, &HEADER_LENGTH.to_be_bytes());
        write(&h, 0)?;
        file.set_len(clusters * CLUSTER)
            .map_err(DiskError::io(out, "size qcow2 image"))?;
        tmp.commit().map_err(|e| DiskError::Io {
            path: out.to_path_buf(),
            op: e.op,
            error: e.source,
        })
    }
}
