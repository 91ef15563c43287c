//! Block backends: where a virtio-blk device keeps its bytes.
//!
//! A [`BlockBackend`] is a flat array of 512-byte sectors. The device calls it synchronously on
//! the vCPU thread that notified the queue, so when a VM is paused no request is in flight and a
//! snapshot sees exactly the bytes the guest was told are written. [`RawFile`] keeps them in a
//! plain file; snap-disk's delta layers implement the same trait.
//!
//! Most backend errors reach the guest as VIRTIO_BLK_S_IOERR. Two classes do not (as QEMU's
//! `werror=stop` / `rerror=stop`): a full host filesystem or quota ([`io::ErrorKind::StorageFull`],
//! [`io::ErrorKind::QuotaExceeded`]) and damaged disk data ([`io::ErrorKind::InvalidData`]). Those
//! pause the VM with the request still pending and the reason in an [`IoStop`]; a resume runs the
//! request again (see [`stops_vm`]).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Size of a sector: offsets and lengths handed to a backend are multiples of it.
pub const SECTOR_SIZE: u64 = 512;

/// Storage behind a virtio-blk device.
///
/// Offsets and buffer lengths are multiples of [`SECTOR_SIZE`] and lie inside `size()`: the device
/// checks every request before it reaches the backend. Calls may come from any vCPU thread.
pub trait BlockBackend: Send + Sync {
    /// Size of the disk in bytes (a multiple of [`SECTOR_SIZE`]).
    fn size(&self) -> u64;

    /// Reads `buf.len()` bytes at `offset`.
    ///
    /// # Errors
    /// The I/O error: one of the kinds [`stops_vm`] names pauses the VM, any other the guest
    /// sees as VIRTIO_BLK_S_IOERR.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Writes `buf` at `offset`.
    ///
    /// # Errors
    /// As [`BlockBackend::read_at`].
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;

    /// Makes every completed write durable.
    ///
    /// # Errors
    /// As [`BlockBackend::read_at`] when the guest asked for the flush; a flush the VMM makes
    /// for a snapshot fails that snapshot.
    fn flush(&self) -> io::Result<()>;

    /// Freezes the disk's contents as they are now for a snapshot: the writable top becomes
    /// read-only and a fresh, empty top at `new_top` takes the writes from here on. Backends
    /// without layers do not support it.
    ///
    /// # Errors
    /// [`io::ErrorKind::Unsupported`] by default; the backend's error otherwise (the disk is then
    /// as it was).
    fn seal(&self, new_top: &Path) -> io::Result<Sealed> {
        let _ = new_top;
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this disk has no layers to seal",
        ))
    }

    /// Undoes the last [`seal`](BlockBackend::seal) while nothing was written since: the old top
    /// takes writes again. Returns the dropped top's file for the caller to delete.
    ///
    /// # Errors
    /// [`io::ErrorKind::Unsupported`] by default; the backend's error, e.g. when the new top
    /// already holds writes (then the seal stands: both layers hold data).
    fn undo_seal(&self) -> io::Result<std::path::PathBuf> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this disk has no layers to unseal",
        ))
    }
}

/// What a [`BlockBackend::seal`] did: the layer it froze and the one that takes writes now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed {
    /// The frozen layer (the snapshot's).
    pub sealed: snap_core::Id,
    /// The fresh top.
    pub top: snap_core::Id,
}

/// Whether a backend error pauses the VM instead of reaching the guest: the host filesystem or
/// quota is full (the operator can free space and resume), or the disk's data is damaged (the
/// operator can repair or replace it). A request that fails so stays pending and runs again when
/// the VM resumes.
#[must_use]
pub fn stops_vm(kind: io::ErrorKind) -> bool {
    matches!(
        kind,
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::InvalidData
    )
}

/// Why a disk paused the VM: its backend failed a request with an error of a kind
/// [`stops_vm`] names. The request was not answered and runs again at the next resume.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct IoStop {
    /// The disk, index `i` of the VM's disks.
    pub disk: usize,
    /// The error's kind.
    pub kind: io::ErrorKind,
    /// The backend's message (for damaged data it names the file and the block).
    pub message: String,
}

impl IoStop {
    /// The stop of disk `disk` for backend error `error`.
    #[must_use]
    pub fn new(disk: usize, error: &io::Error) -> Self {
        Self {
            disk,
            kind: error.kind(),
            message: error.to_string(),
        }
    }

    /// What the error means for the operator, in a few words.
    #[must_use]
    pub fn cause(&self) -> &'static str {
        match self.kind {
            io::ErrorKind::StorageFull => "the host filesystem is full",
            io::ErrorKind::QuotaExceeded => "the disk quota on the host is exceeded",
            io::ErrorKind::InvalidData => "the disk's data is damaged",
            _ => "the disk failed",
        }
    }
}

impl std::fmt::Display for IoStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "disk {}: {}: {}", self.disk, self.cause(), self.message)
    }
}

/// A disk kept in a plain file or block device, one to one (pread, pwrite, fdatasync).
#[derive(Debug)]
pub struct RawFile {
    file: File,
    size: u64,
}

impl RawFile {
    /// Opens `path` for reading and writing; the disk is as large as the file.
    ///
    /// # Errors
    /// The open error, or [`io::ErrorKind::InvalidInput`] if the size is not a non-zero multiple
    /// of [`SECTOR_SIZE`].
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::options().read(true).write(true).open(path)?;
        Self::from_file(file)
    }

    /// Creates (or truncates) `path` as a zero-filled disk of `size` bytes.
    ///
    /// # Errors
    /// The I/O error, or [`io::ErrorKind::InvalidInput`] for a size that is not a non-zero
    /// multiple of [`SECTOR_SIZE`].
    pub fn create(path: &Path, size: u64) -> io::Result<Self> {
        check_size(size)?;
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(size)?;
        Self::from_file(file)
    }

    /// Uses an open file (read-write) as a disk.
    ///
    /// # Errors
    /// As [`RawFile::open`].
    pub fn from_file(file: File) -> io::Result<Self> {
        let size = file.metadata()?.len();
        check_size(size)?;
        Ok(Self { file, size })
    }
}

fn check_size(size: u64) -> io::Result<()> {
    if size == 0 || size % SECTOR_SIZE != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("disk size {size} bytes is not a non-zero multiple of {SECTOR_SIZE}"),
        ));
    }
    Ok(())
}

fn check_range(size: u64, offset: u64, len: usize) -> io::Result<()> {
    let len = len as u64;
    if offset % SECTOR_SIZE != 0
        || len % SECTOR_SIZE != 0
        || offset.checked_add(len).is_none_or(|end| end > size)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("disk access {offset:#x}+{len:#x} is unaligned or beyond {size:#x} bytes"),
        ));
    }
    Ok(())
}

impl BlockBackend for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(self.size, offset, buf.len())?;
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        check_range(self.size, offset, buf.len())?;
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// A layered copy-on-write disk (snap-disk) under a VM: reads through its chain, writes into its
/// top layer, `flush` commits the top (every flushed write survives a crash, none is torn).
impl BlockBackend for snap_disk::Disk {
    fn size(&self) -> u64 {
        snap_disk::Disk::size(self)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        snap_disk::Disk::read_at(self, offset, buf).map_err(io::Error::from)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        snap_disk::Disk::write_at(self, offset, buf).map_err(io::Error::from)
    }

    fn flush(&self) -> io::Result<()> {
        snap_disk::Disk::flush(self).map_err(io::Error::from)
    }

    fn seal(&self, new_top: &Path) -> io::Result<Sealed> {
        let sealed = snap_disk::Disk::seal(self, new_top).map_err(io::Error::from)?;
        let top = self
            .layers()
            .last()
            .map(|l| l.id)
            .ok_or_else(|| io::Error::other("a sealed chain has a top"))?;
        Ok(Sealed {
            sealed: sealed.id,
            top,
        })
    }

    fn undo_seal(&self) -> io::Result<std::path::PathBuf> {
        snap_disk::Disk::undo_seal(self).map_err(io::Error::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_file_reads_what_it_wrote_and_refuses_bad_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let disk = RawFile::create(&dir.path().join("d.img"), 8 * SECTOR_SIZE).unwrap();
        assert_eq!(disk.size(), 4096);
        disk.write_at(512, &[7u8; 1024]).unwrap();
        disk.flush().unwrap();
        let mut b = [0u8; 2048];
        disk.read_at(0, &mut b).unwrap();
        assert!(b[..512].iter().all(|&x| x == 0));
        assert!(b[512..1536].iter().all(|&x| x == 7));
        assert!(disk.read_at(4096, &mut [0u8; 512]).is_err());
        assert!(disk.read_at(3584, &mut [0u8; 1024]).is_err());
        assert!(disk.write_at(1, &[0u8; 512]).is_err());
        assert!(disk.write_at(0, &[0u8; 100]).is_err());
        assert!(RawFile::create(&dir.path().join("e.img"), 1000).is_err());
        let reopened = RawFile::open(&dir.path().join("d.img")).unwrap();
        reopened.read_at(512, &mut b[..512]).unwrap();
        assert!(b[..512].iter().all(|&x| x == 7));
    }

    #[test]
    fn full_and_damaged_stop_the_vm_other_errors_do_not() {
        use io::ErrorKind::*;
        for kind in [StorageFull, QuotaExceeded, InvalidData] {
            assert!(stops_vm(kind), "{kind:?}");
        }
        for kind in [
            Other,
            InvalidInput,
            UnexpectedEof,
            PermissionDenied,
            NotFound,
        ] {
            assert!(!stops_vm(kind), "{kind:?}");
        }
        let full = IoStop::new(1, &io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(full.kind, StorageFull);
        let text = full.to_string();
        assert!(
            text.starts_with("disk 1: the host filesystem is full: "),
            "{text}"
        );
        let quota = IoStop::new(0, &io::Error::from_raw_os_error(libc::EDQUOT));
        assert_eq!(quota.kind, QuotaExceeded);
    }
}
