//! Reserving file space before writing into it, so a full filesystem (or an exceeded quota)
//! fails the write that needs the space, not a later `fdatasync`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// What [`allocate`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Allocated {
    /// The range has file space (the file grew to cover it if it was shorter).
    Yes,
    /// The filesystem cannot reserve space ahead (`EOPNOTSUPP`); writes allocate as they go.
    Unsupported,
}

/// Reserves file space for `len` bytes at `offset` (`fallocate` mode 0: blocks are allocated
/// and the file size grows to `offset + len` if it was smaller; data already there is kept).
///
/// # Errors
/// The OS error: `ENOSPC` (kind [`io::ErrorKind::StorageFull`]) or `EDQUOT`
/// ([`io::ErrorKind::QuotaExceeded`]) when the space is not there.
pub(crate) fn allocate(file: &File, offset: u64, len: u64) -> io::Result<Allocated> {
    let too_big = || io::Error::from(io::ErrorKind::FileTooLarge);
    let offset = libc::off_t::try_from(offset).map_err(|_| too_big())?;
    let len = libc::off_t::try_from(len).map_err(|_| too_big())?;
    loop {
        // SAFETY: fallocate takes no pointers, only integers; the descriptor belongs to `file`,
        // which the borrow keeps open for the duration of the call.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, offset, len) };
        if rc == 0 {
            return Ok(Allocated::Yes);
        }
        let error = io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::EOPNOTSUPP) => return Ok(Allocated::Unsupported),
            _ => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocating_grows_the_file_and_keeps_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"hello").unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        match allocate(&file, 0, 1 << 20).unwrap() {
            Allocated::Yes => {
                assert_eq!(file.metadata().unwrap().len(), 1 << 20);
                assert_eq!(&std::fs::read(&path).unwrap()[..5], b"hello");
            }
            Allocated::Unsupported => println!(
                "SKIP allocating_grows_the_file_and_keeps_its_data: the filesystem has no fallocate"
            ),
        }
    }
}
