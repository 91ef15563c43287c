//! Block backends: where a virtio-blk device keeps its bytes.
//!
//! A [`BlockBackend`] is a flat array of 512-byte sectors. The device calls it synchronously on
//! the vCPU thread that notified the queue, so when a VM is paused no request is in flight and a
//! snapshot sees exactly the bytes the guest was told are written. [`RawFile`] keeps them in a
//! plain file; snap-disk's delta layers implement the same trait.

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
    /// The I/O error; the guest sees VIRTIO_BLK_S_IOERR.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Writes `buf` at `offset`.
    ///
    /// # Errors
    /// The I/O error; the guest sees VIRTIO_BLK_S_IOERR.
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;

    /// Makes every completed write durable.
    ///
    /// # Errors
    /// The I/O error.
    fn flush(&self) -> io::Result<()>;
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
}
