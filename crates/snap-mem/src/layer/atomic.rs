//! Whole-file replacement that a crash cannot tear ([`snap_core::AtomicFile`]), with errors that
//! name the layer file.

use std::fs::File;
use std::path::{Path, PathBuf};

use snap_core::{AtomicFile, AtomicFileError};

use super::error::LayerError;

/// A layer file being written in place of `dest`; removed on drop unless committed.
pub(crate) struct TempFile {
    dest: PathBuf,
    inner: AtomicFile,
}

impl TempFile {
    fn error(dest: &Path, e: AtomicFileError) -> LayerError {
        LayerError::Io {
            path: dest.to_path_buf(),
            op: e.op,
            error: e.source,
        }
    }

    /// Creates a fresh temporary file beside `dest`.
    pub fn create(dest: &Path) -> Result<Self, LayerError> {
        let inner = AtomicFile::create(dest).map_err(|e| Self::error(dest, e))?;
        Ok(Self {
            dest: dest.to_path_buf(),
            inner,
        })
    }

    /// The open temporary file.
    pub fn file(&self) -> &File {
        self.inner.file()
    }

    /// Flushes the file, renames it over the destination and makes the rename durable.
    pub fn commit(self) -> Result<(), LayerError> {
        let dest = self.dest;
        self.inner.commit().map_err(|e| Self::error(&dest, e))
    }
}
