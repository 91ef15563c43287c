//! Files and small filesystems for tests.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs of a given size mounted on a temporary directory, unmounted when dropped (also on a
/// panic). Tests run as root here; elsewhere mounting fails and the test skips.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `bytes`.
    ///
    /// # Errors
    /// What `mount` said.
    pub fn mount(bytes: u64) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self { dir })
    }

    /// Mounts a tmpfs of `bytes` for `test`, or prints `SKIP <test>: <reason>` and returns
    /// None (a failure instead where `SNAP_REQUIRE_KVM=1`: the machines that run the KVM tests
    /// run these too).
    pub fn for_test(test: &str, bytes: u64) -> Option<Self> {
        match Self::mount(bytes) {
            Ok(fs) => Some(fs),
            Err(e) => {
                assert!(!crate::kvm_required(), "{test}: cannot mount a tmpfs: {e}");
                crate::skip(test, &format!("cannot mount a tmpfs: {e}"));
                None
            }
        }
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Bytes free on it.
    pub fn free(&self) -> u64 {
        free_bytes(self.path())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut c = Command::new("umount");
            if lazy {
                c.arg("-l");
            }
            c.arg(self.dir.path()).status().is_ok_and(|s| s.success())
        };
        // Something may still hold a file open after a panic: detach it then.
        if !umount(false) && !umount(true) {
            eprintln!("cannot unmount the tmpfs at {}", self.dir.path().display());
        }
    }
}

/// Bytes free on the filesystem holding `path`.
///
/// # Panics
/// If statvfs fails.
pub fn free_bytes(path: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("a path without NUL");
    let mut s = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `s` points to writable memory of the right size,
    // which statvfs fills when it returns 0.
    let rc = unsafe { libc::statvfs(c.as_ptr(), s.as_mut_ptr()) };
    assert_eq!(rc, 0, "statvfs {}", path.display());
    // SAFETY: statvfs returned 0, so it initialized `s`.
    let s = unsafe { s.assume_init() };
    s.f_bavail * s.f_frsize
}

/// A file that takes the space of a filesystem, so that writes beside it fail with ENOSPC;
/// it gives space back as asked, and all of it when dropped.
pub struct Filler {
    path: PathBuf,
}

impl Filler {
    /// Fills the filesystem holding `dir` to the last byte, then gives `leave` bytes back.
    ///
    /// # Panics
    /// On an I/O error other than the filesystem filling up, or if the filler is smaller than
    /// `leave`.
    pub fn fill(dir: &Path, leave: u64) -> Self {
        use std::io::Write;
        let path = dir.join(format!("filler-{}", snap_core::Id::random()));
        let mut f = std::fs::File::create(&path).expect("creating the filler");
        let chunk = vec![0x5a_u8; 64 << 10];
        let mut len = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => len += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", dir.display()),
            }
        }
        assert!(len >= leave, "the filler holds only {len} bytes");
        f.set_len(len - leave).expect("giving space back");
        f.sync_all().expect("syncing the filler");
        Self { path }
    }

    /// The filler's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Gives `bytes` more back.
    ///
    /// # Panics
    /// If the file cannot be shortened.
    pub fn give_back(&self, bytes: u64) {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .expect("opening the filler");
        let len = f.metadata().expect("the filler's size").len();
        f.set_len(len.saturating_sub(bytes))
            .expect("shortening the filler");
    }

    /// Gives all of its space back.
    pub fn remove(self) {}
}

impl Drop for Filler {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The names of the files in `dir`, sorted (none if it does not exist).
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Bytes of the files in `dir`.
pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.metadata().map_or(0, |m| m.len()))
                .sum()
        })
        .unwrap_or(0)
}

/// Flips the bits of the byte at `offset` (from the end if negative) of the file at `path`.
///
/// # Panics
/// If the file cannot be read or written.
pub fn flip_byte(path: &Path, offset: i64) {
    let mut bytes = std::fs::read(path).expect("reading the file to damage");
    let at = if offset < 0 {
        bytes.len() - offset.unsigned_abs() as usize
    } else {
        offset as usize
    };
    bytes[at] ^= 0xff;
    std::fs::write(path, bytes).expect("writing the damaged file");
}
