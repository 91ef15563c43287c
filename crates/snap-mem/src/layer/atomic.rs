//! Whole-file replacement that a crash cannot tear: temp file in the same directory, fsync,
//! rename over the destination, fsync of the directory.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::error::LayerError;

/// A file being written in place of `dest`; removed on drop unless committed.
pub(crate) struct TempFile {
    dest: PathBuf,
    tmp: PathBuf,
    file: File,
    committed: bool,
}

impl TempFile {
    /// Creates a fresh temporary file beside `dest`.
    pub fn create(dest: &Path) -> Result<Self, LayerError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let io = |op, error| LayerError::Io {
            path: dest.to_path_buf(),
            op,
            error,
        };
        let name = dest.file_name().ok_or_else(|| {
            io(
                "create",
                io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"),
            )
        })?;
        loop {
            let mut tmp_name = OsString::from(".");
            tmp_name.push(name);
            tmp_name.push(format!(
                ".{}.{}.tmp",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            let tmp = dest.with_file_name(tmp_name);
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp)
            {
                Ok(file) => {
                    return Ok(Self {
                        dest: dest.to_path_buf(),
                        tmp,
                        file,
                        committed: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io("create temporary file", e)),
            }
        }
    }

    /// The open temporary file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Flushes the file, renames it over the destination and makes the rename durable.
    pub fn commit(mut self) -> Result<(), LayerError> {
        let io = |op, error| LayerError::Io {
            path: self.dest.clone(),
            op,
            error,
        };
        self.file.sync_all().map_err(|e| io("fsync", e))?;
        fs::rename(&self.tmp, &self.dest).map_err(|e| io("rename temporary file", e))?;
        self.committed = true;
        let dir = match self.dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("fsync directory", e))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: the error that got us here is the one worth reporting.
            let _ = fs::remove_file(&self.tmp);
        }
    }
}
