//! Disk images named by path in CreateVm. The daemon runs as root and the path comes from a
//! client, so an image is read only when it is:
//!
//! - under a directory the operator allowed (`snapd --image-dir DIR`, repeatable; none by
//!   default, so a daemon started without one imports no image at all);
//! - reached from that directory without leaving it: the path is opened with `openat2` and
//!   `RESOLVE_BENEATH` relative to the directory, so a symlink (or `..`) out of it is refused,
//!   while a symlink that stays inside is followed;
//! - a regular file (never a FIFO, socket, device or directory: the file is opened `O_PATH`
//!   first, which has no side effect on any of them, and only a regular file is reopened for
//!   reading) on a real filesystem (not procfs, sysfs and their kind), of at most the size limit
//!   (`--max-image-gib`).
//!
//! A path outside the allowed directories gets the same answer whether it exists or not: the
//! error says nothing about what is there.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// Largest image imported unless the operator says otherwise (`--max-image-gib`).
pub const DEFAULT_MAX_IMAGE_BYTES: u64 = 64 << 30;

/// Filesystems whose files are not disk images, whatever their type says.
const PSEUDO_FILESYSTEMS: &[(i64, &str)] = &[
    (0x9fa0, "procfs"),
    (0x6265_6572, "sysfs"),
    (0x6462_6720, "debugfs"),
    (0x7472_6163, "tracefs"),
    (0x7363_6673, "securityfs"),
    (0x6367_7270, "cgroup2"),
    (0x0027_e0eb, "cgroup"),
    (0x6265_6570, "configfs"),
    (0xde5e_81e4, "efivarfs"),
    (0x6e73_6673, "nsfs"),
];

/// One allowed directory.
#[derive(Debug)]
struct ImageDir {
    /// As the operator gave it (made absolute and clean).
    given: PathBuf,
    /// With every symlink resolved.
    real: PathBuf,
    /// Held open: every image is opened relative to it.
    fd: OwnedFd,
}

/// Where images may come from, and how large they may be.
#[derive(Debug)]
pub struct ImagePolicy {
    dirs: Vec<ImageDir>,
    max_bytes: u64,
}

impl Default for ImagePolicy {
    /// No image directory: every image path is refused.
    fn default() -> Self {
        Self {
            dirs: Vec::new(),
            max_bytes: DEFAULT_MAX_IMAGE_BYTES,
        }
    }
}

/// `path` without `.` and `..`, or None if it is not absolute or has a `..`.
fn clean_absolute(path: &Path) -> Option<PathBuf> {
    if !path.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(p) => out.push(p),
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

fn errno_text(e: i32) -> String {
    std::io::Error::from_raw_os_error(e).to_string()
}

/// The pseudo filesystem `fd` is on, if it is one.
fn pseudo_filesystem(fd: &impl AsRawFd) -> Option<&'static str> {
    // SAFETY: statfs is plain integers; all zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes one statfs into the struct we own.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) } != 0 {
        return None;
    }
    #[allow(clippy::unnecessary_cast)]
    let magic = st.f_type as i64;
    PSEUDO_FILESYSTEMS
        .iter()
        .find(|(m, _)| *m == magic)
        .map(|(_, name)| *name)
}

/// What kind of non-regular file mode `mode` is.
fn kind_of(mode: libc::mode_t) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => "a directory",
        libc::S_IFIFO => "a FIFO",
        libc::S_IFSOCK => "a socket",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        libc::S_IFLNK => "a symlink",
        _ => "not a regular file",
    }
}

fn fstat(fd: &impl AsRawFd) -> std::io::Result<libc::stat> {
    // SAFETY: stat is plain integers; all zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one stat into the struct we own.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

impl ImagePolicy {
    /// Images may come from `dirs` (each must be an existing directory on a real filesystem),
    /// up to `max_bytes` each.
    ///
    /// # Errors
    /// A message naming the directory that cannot be used and why.
    pub fn new(dirs: &[PathBuf], max_bytes: u64) -> std::result::Result<Self, String> {
        let mut out = Vec::new();
        for dir in dirs {
            let shown = dir.display();
            let absolute =
                std::path::absolute(dir).map_err(|e| format!("--image-dir {shown}: {e}"))?;
            let given = clean_absolute(&absolute)
                .ok_or_else(|| format!("--image-dir {shown}: must not contain .."))?;
            let real =
                std::fs::canonicalize(&given).map_err(|e| format!("--image-dir {shown}: {e}"))?;
            let c = CString::new(real.as_os_str().as_bytes())
                .map_err(|_| format!("--image-dir {shown}: has a NUL byte"))?;
            // SAFETY: open of a NUL-terminated path; the fd is owned below.
            let raw = unsafe {
                libc::open(
                    c.as_ptr(),
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                )
            };
            if raw < 0 {
                return Err(format!(
                    "--image-dir {shown}: {}",
                    std::io::Error::last_os_error()
                ));
            }
            // SAFETY: `raw` is a new descriptor nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            if let Some(fs) = pseudo_filesystem(&fd) {
                return Err(format!(
                    "--image-dir {shown}: is on {fs}, whose files are not disk images"
                ));
            }
            out.push(ImageDir { given, real, fd });
        }
        Ok(Self {
            dirs: out,
            max_bytes,
        })
    }

    /// The allowed directories, for messages.
    fn dir_list(&self) -> String {
        let dirs: Vec<String> = self
            .dirs
            .iter()
            .map(|d| d.given.display().to_string())
            .collect();
        dirs.join(", ")
    }

    /// Opens the image the client named `requested` (in request field `field`) for reading,
    /// after every check in the module docs; returns it with its size.
    ///
    /// # Errors
    /// INVALID_ARGUMENT naming `field` and saying which rule the path broke.
    pub fn open(&self, field: &str, requested: &Path) -> Result<(File, u64)> {
        let refuse = |why: String| Error::invalid(field, why);
        if self.dirs.is_empty() {
            return Err(refuse(
                "this daemon imports no disk images: its operator allowed no image directory \
                 (snapd --image-dir DIR)"
                    .into(),
            ));
        }
        let Some(path) = clean_absolute(requested) else {
            return Err(refuse(
                "must be an absolute path without .. components".into(),
            ));
        };
        let found = self.dirs.iter().find_map(|d| {
            [&d.given, &d.real]
                .into_iter()
                .find_map(|base| path.strip_prefix(base).ok())
                .filter(|rest| !rest.as_os_str().is_empty())
                .map(|rest| (d, rest.to_path_buf()))
        });
        let Some((dir, rest)) = found else {
            // Nothing about the path itself: not whether it exists, nor what it is.
            return Err(refuse(format!(
                "not under a directory this daemon imports images from ({})",
                self.dir_list()
            )));
        };
        let shown = path.display();
        let c = CString::new(rest.as_os_str().as_bytes())
            .map_err(|_| refuse("has a NUL byte".into()))?;
        // SAFETY: open_how is plain integers; all zero is its empty value.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
        how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
        // SAFETY: openat2 with a directory fd we hold, a NUL-terminated path and an open_how of
        // the size passed; the returned fd is owned below.
        let raw = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.fd.as_raw_fd(),
                c.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if raw < 0 {
            let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            let why = match errno {
                libc::EXDEV => format!(
                    "{shown}: leads out of the image directory {} (a symlink out of it is not \
                     followed)",
                    dir.given.display()
                ),
                libc::ENOENT => format!("{shown}: no such file"),
                libc::ELOOP => format!("{shown}: too many symlinks"),
                libc::ENOSYS => {
                    return Err(Error::internal(
                        "this kernel lacks openat2 (Linux 5.6 or later is needed to import images)",
                    ));
                }
                e => format!("{shown}: {}", errno_text(e)),
            };
            return Err(refuse(why));
        }
        // SAFETY: `raw` is a new descriptor nothing else owns.
        let path_fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let st = fstat(&path_fd).map_err(|e| refuse(format!("{shown}: {e}")))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(refuse(format!(
                "{shown}: is {}, not a regular file",
                kind_of(st.st_mode)
            )));
        }
        if let Some(fs) = pseudo_filesystem(&path_fd) {
            return Err(refuse(format!(
                "{shown}: is on {fs}, whose files are not disk images"
            )));
        }
        let len = st.st_size as u64;
        if len > self.max_bytes {
            return Err(refuse(format!(
                "{shown}: {len} bytes, more than the {} this daemon imports (snapd \
                 --max-image-gib)",
                self.max_bytes
            )));
        }
        // Reopen that very inode for reading (it is a regular file: opening it has no effect).
        let file = File::open(format!("/proc/self/fd/{}", path_fd.as_raw_fd()))
            .map_err(|e| refuse(format!("{shown}: {e}")))?;
        Ok((file, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_cleaned_and_dotdot_refused() {
        assert_eq!(
            clean_absolute(Path::new("/a/./b//c")),
            Some(PathBuf::from("/a/b/c"))
        );
        assert_eq!(clean_absolute(Path::new("/a/../b")), None);
        assert_eq!(clean_absolute(Path::new("a/b")), None);
    }

    #[test]
    fn images_are_opened_only_beneath_the_allowed_directories() {
        let root = tempfile::tempdir().unwrap();
        let images = root.path().join("images");
        std::fs::create_dir(&images).unwrap();
        std::fs::write(images.join("ok.raw"), vec![1u8; 4096]).unwrap();
        std::fs::write(images.join("big.raw"), vec![1u8; 8192]).unwrap();
        std::fs::write(root.path().join("secret"), vec![2u8; 4096]).unwrap();
        std::os::unix::fs::symlink(root.path().join("secret"), images.join("out")).unwrap();
        std::os::unix::fs::symlink("ok.raw", images.join("in")).unwrap();
        std::fs::create_dir(images.join("sub")).unwrap();
        let fifo = CString::new(images.join("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo of a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let policy = ImagePolicy::new(std::slice::from_ref(&images), 4096).unwrap();

        let (_, len) = policy.open("f", &images.join("ok.raw")).unwrap();
        assert_eq!(len, 4096);
        let (_, len) = policy.open("f", &images.join("in")).unwrap();
        assert_eq!(len, 4096, "a symlink inside the directory is followed");

        let err = |p: &Path| policy.open("f", p).unwrap_err().to_string();
        let outside = err(&root.path().join("secret"));
        assert!(outside.contains("not under a directory"), "{outside}");
        assert_eq!(
            outside,
            err(&root.path().join("missing")),
            "an outside path gets the same answer whether it exists or not"
        );
        assert!(err(&images.join("out")).contains("leads out of"));
        assert!(err(&images.join("fifo")).contains("a FIFO"));
        assert!(err(&images.join("sub")).contains("a directory"));
        assert!(err(&images.join("big.raw")).contains("8192 bytes, more than the 4096"));
        assert!(err(&images.join("nothing")).contains("no such file"));
        assert!(err(&images.join("../secret")).contains(".."));
        assert!(err(Path::new("/dev/null")).contains("not under a directory"));

        let none = ImagePolicy::default();
        assert!(
            none.open("f", &images.join("ok.raw"))
                .unwrap_err()
                .to_string()
                .contains("--image-dir")
        );
        assert!(
            ImagePolicy::new(&[PathBuf::from("/proc")], 1)
                .unwrap_err()
                .contains("procfs")
        );
    }
}
