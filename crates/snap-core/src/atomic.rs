//! Whole-file replacement that a crash cannot tear: a temporary file in the same directory,
//! fsync, rename over the destination, fsync of the directory.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A failed step of an atomic write: which step, and the OS error.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {source}")]
pub struct AtomicFileError {
    /// The step that failed ("create temporary file", "fsync", "rename temporary file", ...).
    pub op: &'static str,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

fn step(op: &'static str) -> impl FnOnce(io::Error) -> AtomicFileError {
    move |source| AtomicFileError { op, source }
}

/// A file being written in place of `dest`: the destination shows the old file or the complete
/// new one, never a mix. The temporary file is removed on drop unless committed.
///
/// ```
/// use std::io::Write;
/// use snap_core::AtomicFile;
/// let dir = tempfile::tempdir()?;
/// let dest = dir.path().join("f");
/// let tmp = AtomicFile::create(&dest)?;
/// tmp.file().write_all(b"all or nothing")?;
/// tmp.commit()?;
/// assert_eq!(std::fs::read(&dest)?, b"all or nothing");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct AtomicFile {
    dest: PathBuf,
    tmp: PathBuf,
    file: File,
    committed: bool,
}

impl AtomicFile {
    /// Creates a fresh temporary file (`.<name>.<pid>.<n>.tmp`) beside `dest`; it never clobbers
    /// an existing file.
    ///
    /// # Errors
    /// The step and OS error; a `dest` without a file name is `InvalidInput`.
    pub fn create(dest: &Path) -> Result<Self, AtomicFileError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = dest.file_name().ok_or_else(|| AtomicFileError {
            op: "create temporary file",
            source: io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"),
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
                Err(e) => return Err(step("create temporary file")(e)),
            }
        }
    }

    /// The open temporary file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Flushes the file, renames it over the destination and makes the rename durable.
    ///
    /// # Errors
    /// The step and OS error; before the rename the temporary file is removed.
    pub fn commit(mut self) -> Result<(), AtomicFileError> {
        self.file.sync_all().map_err(step("fsync"))?;
        fs::rename(&self.tmp, &self.dest).map_err(step("rename temporary file"))?;
        self.committed = true;
        let dir = match self.dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(step("fsync directory"))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: the error that got us here is the one worth reporting.
            let _ = fs::remove_file(&self.tmp);
        }
    }
}
