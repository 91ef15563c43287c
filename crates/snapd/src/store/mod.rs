//! The data directory: every path in it is made here, and so is every decision to delete a
//! file.
//!
//! ```text
//! catalog.db, catalog.db-wal  the catalog (crate::catalog)
//! catalog.gen                 the generation of the catalog's last committed write
//! snapd.lock                  held by the one daemon using the directory
//! snapd.sock                  its Unix socket (unless --socket says otherwise)
//! reserve                     space kept back so that deletes work on a full filesystem
//! layers/<snapshot>.mlayer    a snapshot's memory layer; layers/<id>.mlayer a merged one
//! layers/<id>.dlayer          disk layers: bases, sealed deltas, VMs' writable tops
//! states/<snapshot>.state     a snapshot's vCPU and device state
//! states/<snapshot>.wset      its recorded working set
//! lost+found/                 files the catalog does not name, kept (only with --keep-unknown-files)
//! ```
//!
//! The catalog is the truth about which files matter. Files it does not name are deleted only
//! when the catalog is known to be whole: it exists, and its generation is the one the data
//! directory last recorded ([`Store::open`]). A missing, emptied or rolled-back catalog is
//! damage: the daemon refuses to start on it rather than read it as "nothing exists".
//!
//! While the daemon runs, files an operation is making are *claimed* ([`FileClaim`]) until its
//! catalog transaction names them (or the operation fails, and the claim removes them): the
//! sweep of unnamed files ([`Store::sweep`]) never touches a claimed file.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::catalog::{Catalog, CommitMark};
use crate::ids::{LayerId, SnapshotId};

/// How the data directory is opened.
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// Bytes of space kept back in `reserve` (0: none).
    pub reserve_bytes: u64,
    /// Start even if the catalog does not match the directory; files it does not name are
    /// moved to `lost+found/` instead of being deleted.
    pub keep_unknown_files: bool,
}

/// The data directory.
pub struct Store {
    root: PathBuf,
    options: StoreOptions,
    /// Files being made by running operations (relative names), with a count per file.
    claims: Mutex<HashMap<String, usize>>,
    /// Serializes sweeps with claim releases (see [`Store::sweep`]).
    sweeping: Mutex<()>,
}

/// What a sweep found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    /// Files removed.
    pub removed: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Files moved to `lost+found/`.
    pub kept: usize,
}

const SUBDIRS: [&str; 2] = ["layers", "states"];

impl Store {
    /// Opens the data directory at `root` (creating it if needed) and its catalog, checking
    /// that the catalog is the directory's own and whole.
    ///
    /// # Errors
    /// A message that says what is wrong and what to do: a catalog that is missing or empty
    /// while layer or state files exist, a catalog that has lost committed transactions, a
    /// file that is not a catalog, or an I/O error naming the path.
    pub fn open(root: &Path, options: StoreOptions) -> Result<(Arc<Self>, Catalog), String> {
        for sub in SUBDIRS {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        make_private(root)?;
        let store = Arc::new(Self {
            root: root.to_path_buf(),
            options,
            claims: Mutex::new(HashMap::new()),
            sweeping: Mutex::new(()),
        });
        store.reserve_check_at_open();
        let catalog_path = store.catalog_path();
        let fresh = std::fs::metadata(&catalog_path).map_or(true, |m| m.len() == 0);
        let recorded = store.recorded_generation();
        let files = store.data_files();
        let keep = store.options.keep_unknown_files;
        if fresh && (!files.is_empty() || recorded.is_some_and(|g| g > 0)) {
            let problem = format!(
                "{} is missing or empty, but the data directory holds {} layer and state files{}: \
                 the catalog is the record of what they are",
                catalog_path.display(),
                files.len(),
                recorded.map_or(String::new(), |g| format!(
                    " and recorded catalog generation {g}"
                )),
            );
            if !keep {
                return Err(format!(
                    "{problem}. snapd will not start on it (it would read every snapshot as never \
                     having existed). Put catalog.db (and catalog.db-wal) back from a backup; or, to \
                     start with an empty catalog and keep the files in {}, start once with \
                     --keep-unknown-files",
                    store.root.join("lost+found").display()
                ));
            }
            tracing::error!("{problem}; starting anyway (--keep-unknown-files)");
        }
        // The check reads the catalog without writing: one found wanting stays as it is (its
        // WAL is neither checkpointed nor removed), for the operator to repair.
        let found = if fresh {
            Some(0)
        } else {
            Catalog::peek_generation(&catalog_path)
                .map_err(|e| format!("{}: {e}: restore it from a backup", catalog_path.display()))?
        };
        if let (Some(generation), Some(recorded)) = (found, recorded) {
            if recorded > generation {
                let problem = format!(
                    "{} is at generation {generation}, but the data directory recorded generation \
                     {recorded} ({}): the catalog has lost {} committed transactions (was \
                     catalog.db-wal removed or damaged?)",
                    catalog_path.display(),
                    store.generation_path().display(),
                    recorded - generation
                );
                if !keep {
                    return Err(format!(
                        "{problem}. snapd will not start on it: the lost transactions may name \
                         snapshots whose files are here. Put catalog.db-wal back if you have it; or \
                         start once with --keep-unknown-files to go on with the catalog as it is, \
                         keeping the files it does not name in {}",
                        store.root.join("lost+found").display()
                    ));
                }
                tracing::error!("{problem}; starting anyway (--keep-unknown-files)");
            }
        }
        let mark = GenerationFile::open(&store.generation_path())?;
        let catalog = Catalog::open(&catalog_path, Some(Box::new(mark)))
            .map_err(|e| format!("{}: {e}: restore it from a backup", catalog_path.display()))?;
        let generation = catalog
            .generation()
            .map_err(|e| format!("{}: {e}", catalog_path.display()))?;
        GenerationFile::open(&store.generation_path())?.committed(generation);
        Ok((store, catalog))
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The catalog database.
    pub fn catalog_path(&self) -> PathBuf {
        self.root.join("catalog.db")
    }

    /// The file recording the catalog's last committed generation.
    pub fn generation_path(&self) -> PathBuf {
        self.root.join("catalog.gen")
    }

    /// The lock file the one daemon using the data directory at `root` holds (taken before the
    /// directory is opened).
    pub fn lock_path(root: &Path) -> PathBuf {
        root.join("snapd.lock")
    }

    /// The daemon's Unix socket in the data directory at `root`, unless told otherwise.
    pub fn socket_path(root: &Path) -> PathBuf {
        root.join("snapd.sock")
    }

    /// The space reserve.
    pub fn reserve_path(&self) -> PathBuf {
        self.root.join("reserve")
    }

    /// Where files the catalog does not name are kept with `--keep-unknown-files`.
    pub fn lost_found_path(&self) -> PathBuf {
        self.root.join("lost+found")
    }

    /// The absolute path of `file` (a name relative to the directory, as the catalog keeps).
    pub fn path(&self, file: &str) -> PathBuf {
        self.root.join(file)
    }

    /// The file of snapshot `s`'s own memory layer.
    pub fn memory_layer_file(s: SnapshotId) -> String {
        format!("layers/{s}.mlayer")
    }

    /// A new file for a memory layer made by a merge.
    pub fn merged_layer_file() -> String {
        format!("layers/{}.mlayer", LayerId::random())
    }

    /// A new file for a disk layer.
    pub fn disk_layer_file() -> String {
        format!("layers/{}.dlayer", LayerId::random())
    }

    /// The state file of snapshot `s`.
    pub fn state_file(s: SnapshotId) -> String {
        format!("states/{s}.state")
    }

    /// The recorded working set of snapshot `s`.
    pub fn working_set_file(s: SnapshotId) -> String {
        format!("states/{s}.wset")
    }

    /// Bytes of the file `file` (0 if it is missing).
    pub fn file_len(&self, file: &str) -> u64 {
        std::fs::metadata(self.path(file)).map_or(0, |m| m.len())
    }

    /// Removes `file`; returns the bytes it held (0 if it was already gone).
    pub fn remove(&self, file: &str) -> u64 {
        remove_path(&self.path(file))
    }

    /// Claims `files` (relative names) for an operation that is about to make them: until the
    /// claim is published, a sweep leaves them alone, and dropping the claim removes them.
    pub fn claim(self: &Arc<Self>, files: Vec<String>) -> FileClaim {
        let mut claims = lock(&self.claims);
        for f in &files {
            *claims.entry(f.clone()).or_default() += 1;
        }
        FileClaim {
            store: Arc::clone(self),
            files,
        }
    }

    fn unclaim(&self, files: &[String], remove: bool) {
        let _sweep = lock(&self.sweeping);
        let mut claims = lock(&self.claims);
        for f in files {
            if let Some(n) = claims.get_mut(f) {
                *n -= 1;
                if *n == 0 {
                    claims.remove(f);
                }
            }
            if remove {
                self.remove(f);
            }
        }
    }

    /// Every file under `layers/` and `states/`, as relative names.
    fn data_files(&self) -> Vec<String> {
        let mut out = Vec::new();
        for sub in SUBDIRS {
            if let Ok(entries) = std::fs::read_dir(self.root.join(sub)) {
                for e in entries.flatten() {
                    out.push(format!("{sub}/{}", e.file_name().to_string_lossy()));
                }
            }
        }
        out
    }

    /// Removes the files under `layers/` and `states/` that the catalog does not name and no
    /// running operation has claimed: layer files without a layer row, state files of
    /// snapshots that do not exist, and working sets of snapshots that do not exist. With
    /// `--keep-unknown-files` they are moved to `lost+found/` instead.
    ///
    /// Safe while operations run: it holds the claim lock from before it reads the catalog until
    /// it has decided, and an operation releases its claim only after its catalog transaction
    /// has committed, so a file is either named in what the sweep read or still claimed.
    ///
    /// # Errors
    /// The catalog's error (nothing is removed then).
    pub fn sweep(&self, catalog: &Catalog) -> Result<Swept, crate::catalog::CatalogError> {
        let _sweep = lock(&self.sweeping);
        let (layers, snapshots) = catalog.read(|tx| {
            let layers: BTreeSet<String> = tx.layers()?.into_iter().map(|l| l.file).collect();
            let snapshots: BTreeSet<String> = tx
                .snapshots()?
                .into_iter()
                .map(|s| s.id.to_string())
                .collect();
            Ok((layers, snapshots))
        })?;
        let claims = lock(&self.claims);
        let mut swept = Swept::default();
        for file in self.data_files() {
            // A file being written atomically is judged by the file it will become; one left by
            // a process that is gone is never finished.
            let target = match temporary_of(&file) {
                Some((_, pid)) if pid != std::process::id() => None,
                Some((dest, _)) => Some(dest),
                None => Some(file.clone()),
            };
            let keep = target.as_ref().is_some_and(|t| {
                let named = match t.strip_prefix("states/") {
                    Some(name) => name.split_once('.').is_some_and(|(stem, ext)| {
                        snapshots.contains(stem) && matches!(ext, "state" | "wset")
                    }),
                    None => layers.contains(t),
                };
                named || claims.contains_key(t)
            });
            if keep {
                continue;
            }
            if self.options.keep_unknown_files && target.is_some() {
                let dir = self.lost_found_path();
                let to = dir.join(file.replace('/', "_"));
                match std::fs::create_dir_all(&dir)
                    .and_then(|()| std::fs::rename(self.path(&file), &to))
                {
                    Ok(()) => {
                        tracing::warn!(file, to = %to.display(), "kept a file the catalog does not name");
                        swept.kept += 1;
                    }
                    Err(e) => tracing::error!(file, error = %e, "cannot move a file to lost+found"),
                }
                continue;
            }
            swept.bytes += self.remove(&file);
            swept.removed += 1;
            tracing::info!(file, "removed a file the catalog does not name");
        }
        Ok(swept)
    }

    /// Bytes of every file under `layers/` and `states/`.
    pub fn stored_bytes(&self) -> u64 {
        self.data_files().iter().map(|f| self.file_len(f)).sum()
    }

    /// Bytes free for the daemon on the data directory's filesystem.
    pub fn free_bytes(&self) -> Option<u64> {
        free_bytes(&self.root)
    }

    // -----------------------------------------------------------------------------------------
    // The space reserve: a file of `reserve_bytes` that is given back when the filesystem is full,
    // so that the catalog can still be written and snapshots deleted to free space.

    fn reserve_check_at_open(&self) {
        // A full filesystem at start: give the reserve back before the catalog is opened, so
        // that the daemon starts and deletes can run.
        if self
            .free_bytes()
            .is_some_and(|f| f < self.options.reserve_bytes.max(1 << 20))
            && self.release_reserve()
        {
            tracing::warn!("the data directory's filesystem is full: released the space reserve");
        }
    }

    /// Gives the space reserve back to the filesystem; returns whether there was one.
    pub fn release_reserve(&self) -> bool {
        let path = self.reserve_path();
        let had = path.exists();
        if had {
            remove_path(&path);
        }
        had
    }

    /// Grows the space reserve back towards its size: space that comes back (deletes) refills
    /// it first, so that the next time the filesystem fills up, deletes still work. With less
    /// room than the reserve and 1 MiB, it takes half of what is free (at least 256 KiB).
    pub fn refill_reserve(&self) {
        let want = self.options.reserve_bytes;
        if want == 0 {
            return;
        }
        let path = self.reserve_path();
        let have = std::fs::metadata(&path).map_or(0, |m| m.len());
        let Some(free) = self.free_bytes() else {
            return;
        };
        let room = free + have;
        let target = if room >= want + (1 << 20) {
            want
        } else {
            (room / 2) & !0xffff
        };
        if target <= have || target < 256 << 10 {
            return;
        }
        let made = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .and_then(|f| {
                allocate(&f, target)?;
                f.sync_all()
            });
        if let Err(e) = made {
            tracing::warn!(error = %e, path = %path.display(), "cannot grow the space reserve");
        }
    }

    /// The generation the directory recorded last (None if it never recorded one, or the file is
    /// unreadable: then the check is skipped, with a warning).
    fn recorded_generation(&self) -> Option<u64> {
        let path = self.generation_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the recorded catalog generation");
                return None;
            }
        };
        match text.trim().parse() {
            Ok(g) => Some(g),
            Err(_) => {
                tracing::warn!(path = %path.display(), "the recorded catalog generation does not parse; not checked");
                None
            }
        }
    }
}

/// For a temporary file of an atomic write (`<dir>/.<name>.<pid>.<n>.tmp`, see
/// [`snap_core::AtomicFile`]): the file it becomes and the writer's process id.
fn temporary_of(file: &str) -> Option<(String, u32)> {
    let (dir, name) = file.split_once('/')?;
    let rest = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (rest, _counter) = rest.rsplit_once('.')?;
    let (dest, pid) = rest.rsplit_once('.')?;
    Some((format!("{dir}/{dest}"), pid.parse().ok()?))
}

/// Files an operation is making, kept from the sweep until published; removed on drop otherwise.
pub struct FileClaim {
    store: Arc<Store>,
    files: Vec<String>,
}

impl FileClaim {
    /// Claims one more file (before it is made).
    pub fn add(&mut self, file: String) {
        *lock(&self.store.claims).entry(file.clone()).or_default() += 1;
        self.files.push(file);
    }

    /// The files are named by the catalog now (call after the commit): they stay.
    pub fn publish(mut self) {
        let files = std::mem::take(&mut self.files);
        self.store.unclaim(&files, false);
    }

    /// Keeps file `file` out of what the claim removes on drop (it was handed to the catalog
    /// by another path, e.g. a disk top kept under a VM after a failed snapshot).
    pub fn keep(&mut self, file: &str) {
        if let Some(i) = self.files.iter().position(|f| f == file) {
            let f = self.files.swap_remove(i);
            self.store.unclaim(&[f], false);
        }
    }
}

impl Drop for FileClaim {
    fn drop(&mut self) {
        let files = std::mem::take(&mut self.files);
        self.store.unclaim(&files, true);
    }
}

/// Writes the catalog's generation to `catalog.gen` after each committed write (no fsync: after a
/// crash the file is never ahead of the catalog, which is all the check needs).
struct GenerationFile {
    file: File,
}

impl GenerationFile {
    fn open(path: &Path) -> Result<Self, String> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
        Ok(Self { file })
    }
}

impl CommitMark for GenerationFile {
    fn committed(&self, generation: u64) {
        // Fixed width, so that a shorter number never leaves digits of a longer one behind.
        let text = format!("{generation:020}\n");
        if let Err(e) = self.file.write_all_at(text.as_bytes(), 0) {
            tracing::warn!(error = %e, "cannot record the catalog generation");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn remove_path(path: &Path) -> u64 {
    let len = std::fs::metadata(path).map_or(0, |m| m.len());
    match std::fs::remove_file(path) {
        Ok(()) => len,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove");
            0
        }
    }
}

/// Makes the data directory the daemon's alone: it and its directories must be owned by the
/// daemon's user, and are made mode 0700, every file in them 0600 (modes are only ever
/// narrowed). Guest memory and disks are in these files.
fn make_private(root: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let mut dirs = vec![root.to_path_buf()];
    dirs.extend(SUBDIRS.iter().map(|s| root.join(s)));
    for dir in &dirs {
        let m = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if !m.is_dir() || m.uid() != me {
            return Err(format!(
                "{} is not a directory owned by uid {me} (the daemon's user): others could change \
                 what snapd stores there; give a --data-dir of its own",
                dir.display()
            ));
        }
        narrow(dir, m.mode(), 0o700)?;
        let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for e in entries.flatten() {
            if let Ok(m) = e.metadata() {
                if !m.is_dir() {
                    narrow(&e.path(), m.mode(), 0o600)?;
                }
            }
        }
    }
    Ok(())
}

/// Takes from `path`'s mode every permission beyond `allowed`.
fn narrow(path: &Path, mode: u32, allowed: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let now = mode & 0o7777;
    if now & !allowed != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(now & allowed))
            .map_err(|e| format!("making {} private: {e}", path.display()))?;
    }
    Ok(())
}

/// Bytes available to unprivileged writers on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut s = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `s` points to writable memory of the right size,
    // which statvfs fills when it returns 0.
    let rc = unsafe { libc::statvfs(c.as_ptr(), s.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it initialized `s`.
    let s = unsafe { s.assume_init() };
    Some(s.f_bavail * s.f_frsize)
}

/// Allocates `len` bytes of real space for `file` (not a sparse hole).
fn allocate(file: &File, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on a file descriptor `file` owns for the duration of the call.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(e);
    }
    // No fallocate on this filesystem: write the bytes.
    let chunk = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(chunk.len() as u64) as usize;
        file.write_all_at(&chunk[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
