//! Building a whole layer file that appears complete or not at all: a temporary file beside the
//! destination is filled and committed, then renamed over it (with the directory synced).

use std::path::Path;

use snap_core::AtomicFile;

use crate::error::DiskError;
use crate::layer::{Identity, LayerFile};
use crate::meta::NewLayer;

fn atomic_error(path: &Path) -> impl Fn(snap_core::AtomicFileError) -> DiskError {
    move |e| DiskError::Io {
        path: path.to_path_buf(),
        op: e.op,
        error: e.source,
    }
}

/// Writes the layer `new` at `out`: `fill` puts its blocks, then it is committed (sealed if
/// `sealed`) and renamed into place. The returned layer is open (writable) at `out`.
pub(crate) fn build_layer(
    out: &Path,
    new: &NewLayer,
    sealed: bool,
    fill: impl FnOnce(&mut LayerFile) -> Result<(), DiskError>,
) -> Result<LayerFile, DiskError> {
    new.geometry.validate()?;
    let tmp = AtomicFile::create(out).map_err(atomic_error(out))?;
    let file = tmp
        .file()
        .try_clone()
        .map_err(DiskError::io(out, "duplicate file handle"))?;
    let mut layer = LayerFile::init(out, file, new)?;
    fill(&mut layer)?;
    layer.commit(Identity {
        id: new.id,
        parent: new.parent,
        sealed,
    })?;
    tmp.commit().map_err(atomic_error(out))?;
    Ok(layer)
}

/// Creates an empty, writable layer at `out`.
pub(crate) fn create_empty(out: &Path, new: &NewLayer) -> Result<LayerFile, DiskError> {
    build_layer(out, new, false, |_| Ok(()))
}
