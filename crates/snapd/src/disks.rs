//! VM disks as snap-disk chains: a base (empty, or a raw image imported as a sealed layer) and
//! delta layers. A VM writes into its own top layer; a snapshot seals the top while the VM is
//! paused and gives the VM a fresh one; a restore or clone opens a fresh top over the
//! snapshot's sealed chain, so the snapshot's layers never change and clones share them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use snap_disk::{DEFAULT_BLOCK_SIZE, Disk, Geometry, NewLayer, create_layer};

use crate::catalog::{CatalogError, DiskRecord, LayerKind, LayerRecord, Tx};
use crate::error::{Error, Result, disk_error};
use crate::ids::LayerId;
use crate::metrics::Metrics;
use crate::store::{FileClaim, Store};

/// Disks opened for one VM instance, with the layers made for them: claimed files, not in the
/// catalog yet. Dropped before [`DiskSet::publish`], it closes the disks and removes the files.
pub struct DiskSet {
    /// The disks, in the VM's order (dropped before the claim removes their files).
    pub disks: Vec<Arc<Disk>>,
    /// Their chains as the catalog records them.
    pub records: Vec<DiskRecord>,
    /// Layers created for them, to insert in the catalog.
    pub new_layers: Vec<LayerRecord>,
    claim: FileClaim,
}

impl DiskSet {
    /// An empty set.
    pub fn new(store: &Arc<Store>) -> Self {
        Self {
            disks: Vec::new(),
            records: Vec::new(),
            new_layers: Vec::new(),
            claim: store.claim(Vec::new()),
        }
    }

    /// The disks as block backends for a VM.
    pub fn backends(&self, metrics: &Arc<Metrics>) -> Vec<Arc<dyn snap_vmm::BlockBackend>> {
        backends(&self.disks, metrics)
    }

    /// Inserts the new layers' rows (in the transaction that records the VM using them).
    ///
    /// # Errors
    /// The catalog's error.
    pub fn insert_layers(&self, tx: &Tx<'_>) -> std::result::Result<(), CatalogError> {
        for l in &self.new_layers {
            tx.insert_layer(l)?;
        }
        Ok(())
    }

    /// The catalog names the new layers now: keep their files; returns the disks.
    pub fn publish(self) -> Vec<Arc<Disk>> {
        self.claim.publish();
        self.disks
    }

    /// Imports the raw image open as `image` (named `name`) as a sealed base layer; returns its
    /// file and id and the disk size it gives. `keep_going` is asked as the import goes: once it
    /// says no, the import stops (CANCELLED).
    ///
    /// # Errors
    /// INVALID_ARGUMENT naming `disks.image_path` for an image that cannot be imported.
    pub fn import_image(
        &mut self,
        store: &Store,
        image: &std::fs::File,
        name: &Path,
        keep_going: &mut dyn FnMut() -> bool,
    ) -> Result<(PathBuf, LayerId, u64)> {
        let file = Store::disk_layer_file();
        self.claim.add(file.clone());
        let path = store.path(&file);
        let info = snap_disk::import_raw_file(image, name, &path, DEFAULT_BLOCK_SIZE, keep_going)
            .map_err(|e| {
            if crate::error::is_disk_full(&e) {
                Error::disk_full(format!("importing {}", name.display()))
            } else if !keep_going() {
                Error::new(
                    crate::error::ErrorKind::Cancelled,
                    format!(
                        "importing {}: stopped, the caller gave up (it cancelled, its \
                             deadline passed or it went away) or snapd is stopping",
                        name.display()
                    ),
                )
            } else {
                Error::invalid("disks.image_path", e)
            }
        })?;
        let id = LayerId(info.id);
        self.new_layers.push(LayerRecord {
            id,
            kind: LayerKind::Disk,
            bytes: store.file_len(&file),
            file,
        });
        Ok((path, id, info.geometry.disk_bytes))
    }

    /// Adds a disk named `name` of `size` bytes: the sealed layers `sealed` (oldest first; none
    /// for an empty disk) under a fresh, empty top.
    ///
    /// # Errors
    /// The error of creating the top or opening the chain.
    pub fn add(
        &mut self,
        store: &Store,
        name: &str,
        size: u64,
        sealed: Vec<(PathBuf, LayerId)>,
    ) -> Result<()> {
        let (mut paths, mut chain): (Vec<PathBuf>, Vec<LayerId>) = sealed.into_iter().unzip();
        let top = self.new_top(store, paths.last().map(PathBuf::as_path), size)?;
        paths.push(store.path(&top.file));
        chain.push(top.id);
        self.new_layers.push(top);
        self.disks.push(open(&paths)?);
        self.records.push(DiskRecord {
            name: name.to_string(),
            size_bytes: size,
            chain,
        });
        Ok(())
    }

    /// Adds a disk named `name` of `size` bytes as its chain `chain` (files `paths`) is: with a
    /// fresh top if its top is sealed (a snapshot sealed it and never published).
    ///
    /// # Errors
    /// The error of reading the top, creating a fresh one or opening the chain.
    pub fn add_as_recorded(
        &mut self,
        store: &Store,
        name: &str,
        size: u64,
        paths: Vec<PathBuf>,
        chain: Vec<LayerId>,
    ) -> Result<()> {
        let sealed_top = match paths.last() {
            Some(top) => snap_disk::layer_info(top)
                .map_err(|e| disk_error("the disk's top layer", &e))?
                .sealed(),
            None => true,
        };
        if sealed_top {
            return self.add(store, name, size, paths.into_iter().zip(chain).collect());
        }
        self.disks.push(open(&paths)?);
        self.records.push(DiskRecord {
            name: name.to_string(),
            size_bytes: size,
            chain,
        });
        Ok(())
    }

    /// Creates an empty top layer over the sealed layer at `parent` (or a base), claimed.
    ///
    /// # Errors
    /// The error of reading the parent or creating the file.
    pub fn new_top(
        &mut self,
        store: &Store,
        parent: Option<&Path>,
        size: u64,
    ) -> Result<LayerRecord> {
        let file = Store::disk_layer_file();
        self.claim.add(file.clone());
        new_top(store, &file, parent, size)
    }
}

/// Creates the empty top layer `file` (claimed by the caller) over the sealed layer at `parent`
/// (or a base) for a disk of `size` bytes.
///
/// # Errors
/// The error of reading the parent or creating the file.
pub fn new_top(store: &Store, file: &str, parent: Option<&Path>, size: u64) -> Result<LayerRecord> {
    let parent = match parent {
        None => None,
        Some(p) => {
            let info = snap_disk::layer_info(p).map_err(|e| disk_error("the disk's layer", &e))?;
            Some(
                info.as_parent()
                    .ok_or_else(|| Error::internal(format!("{} is not sealed", p.display())))?,
            )
        }
    };
    let id = LayerId::random();
    create_layer(
        &store.path(file),
        &NewLayer {
            id: id.0,
            parent,
            geometry: geometry(size),
        },
    )
    .map_err(|e| disk_error("creating a disk layer", &e))?;
    Ok(LayerRecord {
        id,
        kind: LayerKind::Disk,
        bytes: store.file_len(file),
        file: file.to_string(),
    })
}

/// `disks` as block backends for a VM.
pub fn backends(
    disks: &[Arc<Disk>],
    metrics: &Arc<Metrics>,
) -> Vec<Arc<dyn snap_vmm::BlockBackend>> {
    disks
        .iter()
        .map(|d| {
            Arc::new(Metered {
                disk: Arc::clone(d),
                io: metrics.disk_io_counters(),
            }) as Arc<dyn snap_vmm::BlockBackend>
        })
        .collect()
}

/// A disk under a VM whose guest I/O counts in the metrics.
struct Metered {
    disk: Arc<Disk>,
    io: crate::metrics::DiskIo,
}

impl snap_vmm::BlockBackend for Metered {
    fn size(&self) -> u64 {
        self.disk.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        snap_vmm::BlockBackend::read_at(&*self.disk, offset, buf)?;
        self.io.reads.inc();
        self.io.read_bytes.inc_by(buf.len() as u64);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        snap_vmm::BlockBackend::write_at(&*self.disk, offset, buf)?;
        self.io.writes.inc();
        self.io.written_bytes.inc_by(buf.len() as u64);
        Ok(())
    }

    fn flush(&self) -> std::io::Result<()> {
        snap_vmm::BlockBackend::flush(&*self.disk)?;
        self.io.flushes.inc();
        Ok(())
    }

    fn seal(&self, new_top: &Path) -> std::io::Result<snap_vmm::block::Sealed> {
        snap_vmm::BlockBackend::seal(&*self.disk, new_top)
    }

    fn undo_seal(&self) -> std::io::Result<PathBuf> {
        snap_vmm::BlockBackend::undo_seal(&*self.disk)
    }
}

/// Geometry of a disk of `size` bytes with the default block size.
pub fn geometry(size: u64) -> Geometry {
    Geometry {
        disk_bytes: size,
        block_size: DEFAULT_BLOCK_SIZE,
    }
}

/// Opens `paths` (oldest first) as one disk.
///
/// # Errors
/// The error naming the layer that cannot be opened.
pub fn open(paths: &[PathBuf]) -> Result<Arc<Disk>> {
    Disk::open(paths)
        .map(Arc::new)
        .map_err(|e| disk_error("opening a disk", &e))
}
