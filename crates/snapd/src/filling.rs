//! Disk layers restored lazily from a remote: their blocks arrive as the guest reads them, and
//! a background filler brings the rest (see `snap_disk::fill`).
//!
//! A lazy restore straight from a remote (`RestoreSnapshotRequest.remote`, memory mode lazy or
//! prefetch) builds each disk layer it does not hold from the manifest's block map alone (a
//! sparse file with the layer's map and digest, no data) and attaches a source to it that
//! fetches a block's chunk through the host's chunk cache the first time the block is read. The
//! transaction that publishes the VMs also records a `filling` row per such layer (its remote
//! and its blocks' chunks). One thread per daemon then fills those layers, one at a time, in
//! block order: once a layer's file holds every block and is synced, its row goes and its
//! source is detached; from then on it is a layer like any other.
//!
//! Every reader of the file (the VM's disk, a later snapshot's restore, a push) fetches what it
//! needs while the source is attached; a merge into such a layer is refused until it is whole
//! (a delete then leaves the layers unmerged). After a restart the rows say which layers still
//! fill: their sources are attached again before anything reads them, and the filler goes on.
//! A layer whose remote is no longer configured gets a source that fails each missing block
//! with a message naming that remote. A layer deleted while it fills loses its row in the
//! delete's transaction; the filler then detaches its source.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use snap_disk::fill::{self, BlockSource};
use snap_remote::Manifest;
use snap_remote::source::RemoteBlocks;

use crate::catalog::FillingRecord;
use crate::daemon::Daemon;
use crate::error::{Error, Result, disk_error};
use crate::ids::LayerId;

/// How often the filler looks for work it was not woken for (and retries failed fills).
const RETRY: Duration = Duration::from_secs(5);

/// The layers whose sources are attached, and the filler's wake-up call.
#[derive(Default)]
pub struct Filling {
    attached: Mutex<HashMap<LayerId, Attached>>,
    wake: Condvar,
}

impl std::fmt::Debug for Filling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filling")
            .field("attached", &self.lock().len())
            .finish()
    }
}

struct Attached {
    path: PathBuf,
    /// Recorded in the catalog (a restore attaches before its transaction).
    published: bool,
}

impl Filling {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<LayerId, Attached>> {
        self.attached.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A source for a layer whose remote this daemon is not configured with.
struct Unconfigured(String);

impl BlockSource for Unconfigured {
    fn fetch(&self, _block: u64, _buf: &mut [u8]) -> std::result::Result<(), String> {
        Err(self.0.clone())
    }
}

/// Sources a restore attached to the layers it built, detached if it fails before its
/// transaction recorded them.
pub(crate) struct Unpublished<'a> {
    filling: &'a Filling,
    layers: Vec<LayerId>,
}

impl Unpublished<'_> {
    /// The layers' rows are committed: the filler may take them.
    pub fn published(mut self) {
        let mut a = self.filling.lock();
        for id in self.layers.drain(..) {
            if let Some(at) = a.get_mut(&id) {
                at.published = true;
            }
        }
        drop(a);
        self.filling.wake.notify_all();
    }
}

impl Drop for Unpublished<'_> {
    fn drop(&mut self) {
        let mut a = self.filling.lock();
        for id in &self.layers {
            if let Some(at) = a.remove(id) {
                fill::detach(&at.path);
            }
        }
    }
}

/// One disk layer a lazy restore builds: where, under which id and parent, from which of the
/// manifest's layers.
pub(crate) struct SparseLayer<'m> {
    pub id: LayerId,
    pub file: String,
    pub parent: Option<snap_disk::ParentRef>,
    pub geometry: snap_disk::Geometry,
    pub layer: &'m snap_remote::manifest::DiskLayer,
    pub what: String,
}

impl Daemon {
    /// Builds `layer` as a sparse file and attaches its remote source; returns its row (for the
    /// publishing transaction) and its reference as a parent.
    pub(crate) fn build_sparse_layer<'f>(
        &'f self,
        remote: &str,
        layer: &SparseLayer<'_>,
        unpublished: &mut Unpublished<'f>,
    ) -> Result<(FillingRecord, Option<snap_disk::ParentRef>)> {
        let entries = layer.layer.entries().ok_or_else(|| {
            Error::internal(format!("{}: the manifest has no block CRCs", layer.what))
        })?;
        let path = self.store.path(&layer.file);
        let made = fill::build_sparse_layer(
            &path,
            &snap_disk::NewLayer {
                id: layer.id.0,
                parent: layer.parent,
                geometry: layer.geometry,
            },
            &entries,
        )
        .map_err(|e| disk_error(&layer.what, &e))?;
        let record = FillingRecord {
            layer: layer.id,
            remote: remote.to_string(),
            what: layer.what.clone(),
            blocks: layer.layer.blocks.clone(),
            chunks: layer.layer.chunks.clone(),
        };
        self.attach_source(&record, path, false)?;
        unpublished.layers.push(layer.id);
        Ok((record, made.as_parent()))
    }

    /// Attaches the source of `f`'s layer at `path` (a source that fails naming the remote if
    /// it is not configured here).
    fn attach_source(&self, f: &FillingRecord, path: PathBuf, published: bool) -> Result<()> {
        let source: Arc<dyn BlockSource> = match self.remotes.store(&f.remote) {
            Some((remote, handle, cache)) => Arc::new(RemoteBlocks::new(
                handle,
                remote,
                cache,
                f.blocks.clone(),
                f.chunks.clone(),
                f.what.clone(),
            )),
            None => Arc::new(Unconfigured(format!(
                "{}: its blocks come from remote {:?}, which this daemon is not configured with (--remote)",
                f.what, f.remote
            ))),
        };
        fill::attach(&path, source).map_err(|e| disk_error(&f.what, &e))?;
        self.filling
            .lock()
            .insert(f.layer, Attached { path, published });
        Ok(())
    }

    /// A guard for the sources a restore attaches.
    pub(crate) fn unpublished(&self) -> Unpublished<'_> {
        Unpublished {
            filling: &self.filling,
            layers: Vec::new(),
        }
    }

    /// At start: attaches the sources of the layers still filling, before anything reads them.
    pub(crate) fn resume_filling(&self) -> Result<()> {
        let (rows, layers) = self.catalog.read(|tx| Ok((tx.filling()?, tx.layers()?)))?;
        let files: HashMap<LayerId, String> = layers.into_iter().map(|l| (l.id, l.file)).collect();
        for f in rows {
            let Some(file) = files.get(&f.layer) else {
                continue;
            };
            if let Err(e) = self.attach_source(&f, self.store.path(file), true) {
                tracing::warn!(layer = %f.layer, error = %e, "cannot attach the source of a disk layer still filling");
            }
        }
        Ok(())
    }

    /// Starts the thread that fills layers in the background (it ends with the daemon).
    pub(crate) fn start_filler(self: &Arc<Self>) {
        let weak: Weak<Self> = Arc::downgrade(self);
        let filling = Arc::clone(&self.filling);
        let spawned = std::thread::Builder::new()
            .name("disk-filler".into())
            .spawn(move || {
                loop {
                    {
                        let Some(d) = weak.upgrade() else { return };
                        if d.stopping() {
                            return;
                        }
                        d.fill_round();
                    }
                    let a = filling.lock();
                    drop(
                        filling
                            .wake
                            .wait_timeout(a, RETRY)
                            .unwrap_or_else(|e| e.into_inner()),
                    );
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the disk filler; layers fill as they are read");
        }
    }

    /// Fills every published layer still filling, one after another; detaches the sources of
    /// layers that are gone.
    fn fill_round(&self) {
        let rows = match self.catalog.read(|tx| tx.filling()) {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the layers still filling");
                return;
            }
        };
        {
            let mut a = self.filling.lock();
            a.retain(|id, at| {
                let keep = !at.published || rows.iter().any(|r| r.layer == *id);
                if !keep {
                    fill::detach(&at.path);
                }
                keep
            });
        }
        for row in rows {
            let path = match self.filling.lock().get(&row.layer) {
                Some(at) if at.published => at.path.clone(),
                _ => continue,
            };
            if self.stopping() {
                return;
            }
            if let Err(e) = self.failpoints.pass("filling.layer") {
                tracing::debug!(layer = %row.layer, error = %e, "not filled this round");
                continue;
            }
            let done = match fill::complete(&path, &|_| !self.stopping()) {
                Ok(done) => done,
                Err(e) => {
                    tracing::warn!(layer = %row.layer, what = %row.what, error = %e, "filling a disk layer from its remote failed; it is tried again");
                    continue;
                }
            };
            match self.catalog.write(|tx| tx.delete_filling(row.layer)) {
                Ok(()) => {
                    self.filling.lock().remove(&row.layer);
                    fill::detach(&path);
                    tracing::info!(layer = %row.layer, what = %row.what, blocks = done.blocks, fetched = done.fetched, "a disk layer restored from a remote holds every block now");
                }
                Err(e) => {
                    tracing::warn!(layer = %row.layer, error = %e, "cannot record a filled disk layer; it is tried again");
                }
            }
        }
    }

    /// Whether a lazy restore of `manifest` can leave its disk blocks in the remote: every
    /// layer records its blocks' CRCs (a version 1 manifest does not).
    pub(crate) fn disks_can_arrive_lazily(manifest: &Manifest) -> bool {
        manifest
            .disks
            .iter()
            .flat_map(|d| &d.layers)
            .all(|l| l.entries().is_some())
    }
}
