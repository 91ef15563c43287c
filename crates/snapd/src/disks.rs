//! VM disks as snap-disk chains: a base (empty, or a raw image imported as a sealed layer) and
//! delta layers. A VM writes into its own top layer; a snapshot seals the top while the VM is
//! paused and gives the VM a fresh one; a restore or clone opens a fresh top over the
//! snapshot's sealed chain, so the snapshot's layers never change and clones share them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use snap_core::Id;
use snap_disk::{DEFAULT_BLOCK_SIZE, Disk, DiskError, Geometry, NewLayer, create_layer};

use crate::catalog::{DiskRecord, LayerRecord};
use crate::error::{ApiError, ApiResult};

/// File (relative to the data directory) of disk layer `id`.
pub fn layer_file(id: &Id) -> String {
    format!("layers/{id}.dlayer")
}

/// Disks opened for one VM instance, with the layers made for them (not in the catalog yet).
#[derive(Default)]
pub struct Opened {
    /// The disks, in the VM's order.
    pub disks: Vec<Arc<Disk>>,
    /// Their chains as the catalog records them.
    pub records: Vec<DiskRecord>,
    /// Layers created for them, to insert in the catalog.
    pub new_layers: Vec<LayerRecord>,
}

impl Opened {
    /// Removes the layer files this created (after a failure, before anything names them).
    pub fn discard(self, data: &Path) {
        drop(self.disks);
        for l in self.new_layers {
            let _ = std::fs::remove_file(data.join(l.file));
        }
    }

    /// The disks as block backends for a VM.
    pub fn backends(&self) -> Vec<Arc<dyn snap_vmm::BlockBackend>> {
        backends(&self.disks)
    }
}

/// `disks` as block backends for a VM.
pub fn backends(disks: &[Arc<Disk>]) -> Vec<Arc<dyn snap_vmm::BlockBackend>> {
    disks
        .iter()
        .map(|d| Arc::clone(d) as Arc<dyn snap_vmm::BlockBackend>)
        .collect()
}

/// Maps a snap-disk error to the API.
pub fn disk_error(what: &str, e: &DiskError) -> ApiError {
    match e {
        DiskError::Io { .. } => ApiError::internal(format!("{what}: {e}")),
        _ => ApiError::precondition(format!("{what}: {e}")),
    }
}

/// Creates an empty top layer over the sealed layer at `parent` (or a base), returns its row.
pub fn new_top(data: &Path, parent: Option<&Path>, geometry: Geometry) -> ApiResult<LayerRecord> {
    let parent = match parent {
        None => None,
        Some(p) => {
            let info = snap_disk::layer_info(p).map_err(|e| disk_error("the disk's layer", &e))?;
            Some(
                info.as_parent()
                    .ok_or_else(|| ApiError::internal(format!("{} is not sealed", p.display())))?,
            )
        }
    };
    let id = Id::random();
    let file = layer_file(&id);
    create_layer(
        &data.join(&file),
        &NewLayer {
            id,
            parent,
            geometry,
        },
    )
    .map_err(|e| disk_error("creating a disk layer", &e))?;
    Ok(LayerRecord {
        id: id.to_string(),
        kind: "disk".into(),
        bytes: std::fs::metadata(data.join(&file)).map_or(0, |m| m.len()),
        file,
    })
}

/// Geometry of a disk of `size` bytes with the default block size.
pub fn geometry(size: u64) -> Geometry {
    Geometry {
        disk_bytes: size,
        block_size: DEFAULT_BLOCK_SIZE,
    }
}

/// Opens `paths` (oldest first) as one disk.
pub fn open(paths: &[PathBuf]) -> ApiResult<Arc<Disk>> {
    Disk::open(paths)
        .map(Arc::new)
        .map_err(|e| disk_error("opening a disk", &e))
}
