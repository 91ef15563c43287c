//! Checking one layer file: its structure (superblocks, map chain) and every block's checksum.

use std::fmt;
use std::path::Path;

use crate::error::DiskError;
use crate::layer::{LayerFile, superblock_areas};
use crate::meta::LayerInfo;

/// What [`check_layer`] found in a layer whose structure is readable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckReport {
    /// The layer's summary.
    pub info: LayerInfo,
    /// Each superblock area (A, B): its generation, or why it is unusable.
    pub superblocks: [Result<u64, String>; 2],
    /// Chunks in the map chain.
    pub map_chunks: u64,
    /// Blocks whose data was read and checked.
    pub blocks_checked: u64,
    /// Slots not used by the map or its chain (reused by later writes).
    pub free_slots: u64,
    /// Damage: each block whose data does not match its checksum or cannot be read.
    pub problems: Vec<String>,
    /// Conditions a crash leaves and the next commit repairs (a damaged older superblock).
    pub warnings: Vec<String>,
}

impl CheckReport {
    /// Whether no damage was found.
    #[must_use]
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.info;
        writeln!(
            f,
            "disk layer {}: id {}, {}, generation {}, {} blocks checked, {} map chunks, {} of {} slots free",
            i.path.display(),
            i.id,
            if i.sealed() { "sealed" } else { "writable" },
            i.generation,
            self.blocks_checked,
            self.map_chunks,
            self.free_slots,
            i.slots
        )?;
        for w in &self.warnings {
            writeln!(f, "  warning: {w}")?;
        }
        for p in &self.problems {
            writeln!(f, "  damaged: {p}")?;
        }
        if self.is_clean() {
            writeln!(f, "  clean")?;
        }
        Ok(())
    }
}

/// Checks the layer at `path`: both superblocks, the map chain (checksums, generations, every
/// entry inside the disk and the file, no slot used twice, the digest of a sealed layer), then
/// reads every block and checks its CRC. Damaged blocks are listed in the report, not returned
/// as errors, so one pass names them all.
///
/// # Errors
/// The error that makes the layer unreadable as a whole: no valid superblock, a damaged map
/// chunk, a truncated file, I/O.
pub fn check_layer(path: &Path) -> Result<CheckReport, DiskError> {
    let layer = LayerFile::open(path, false)?;
    let superblocks = superblock_areas(path, layer.file())?;
    let info = layer.info();
    let mut warnings = Vec::new();
    for (name, area) in ["A", "B"].iter().zip(&superblocks) {
        if let Err(problem) = area {
            warnings.push(format!(
                "superblock {name} is unusable ({problem}); an interrupted commit leaves this and the next commit rewrites it"
            ));
        }
    }
    let geometry = info.geometry;
    let mut blocks: Vec<u64> = layer.map().keys().copied().collect();
    blocks.sort_unstable();
    let mut buf = vec![0u8; geometry.block_size as usize];
    let mut problems = Vec::new();
    for &block in &blocks {
        if let Err(e) = layer.read_block_checked(block, &mut buf[..geometry.block_len(block)]) {
            problems.push(e.to_string());
        }
    }
    let used = blocks.len() as u64 + layer.chain_slots().len() as u64;
    Ok(CheckReport {
        map_chunks: layer.chain_slots().len() as u64,
        blocks_checked: blocks.len() as u64,
        free_slots: info.slots.saturating_sub(used),
        info,
        superblocks,
        problems,
        warnings,
    })
}
