//! Full memory images: a snap-core header, then every byte of guest memory in file-offset order.
//!
//! The image is written and read in one streaming pass with a running CRC32C, so a 16 GiB guest never
//! needs a 16 GiB buffer. (Memory layers with dirty-page diffs replace this format later.)

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use snap_core::{FormatError, FormatSpec, HEADER_LEN, HeaderInfo};

use crate::memory::GuestMemory;

/// File format of a full memory image.
pub const MEMORY_IMAGE_FORMAT: FormatSpec = FormatSpec {
    name: "memory image",
    magic: *b"SNAPMEMI",
    version: 1,
    min_version: 1,
    max_payload: 1 << 40,
};

/// Errors reading or writing a memory image; each names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// An I/O error.
    #[error("{path}: {source}")]
    Io {
        /// The image file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The header is not a valid memory image header.
    #[error("{path}: {source}")]
    Header {
        /// The image file.
        path: PathBuf,
        /// What is wrong with the header.
        #[source]
        source: FormatError,
    },
    /// The image is not the size of the memory it is for.
    #[error("{path}: image holds {found} bytes of memory, the VM has {expected}")]
    SizeMismatch {
        /// The image file.
        path: PathBuf,
        /// Memory size of the VM.
        expected: u64,
        /// Size recorded in the image.
        found: u64,
    },
    /// The file became shorter than its header says while it was being read.
    #[error(
        "{path}: truncated: header promises {expected} bytes of memory, the file holds {found}"
    )]
    Truncated {
        /// The image file.
        path: PathBuf,
        /// Bytes promised.
        expected: u64,
        /// Bytes present.
        found: u64,
    },
    /// The memory bytes do not match their checksum.
    #[error("{path}: memory checksum mismatch (header {expected:#010x}, data {found:#010x})")]
    Checksum {
        /// The image file.
        path: PathBuf,
        /// Checksum in the header.
        expected: u32,
        /// Checksum of the bytes read.
        found: u32,
    },
}

struct CrcWriter<W> {
    inner: W,
    crc: u32,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc = snap_core::crc32c_append(self.crc, &buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

struct CrcReader<R> {
    inner: R,
    crc: u32,
}

impl<R: Read> Read for CrcReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc = snap_core::crc32c_append(self.crc, &buf[..n]);
        Ok(n)
    }
}

/// Writes all of `mem` to `path` as a memory image, atomically: a temporary file is written, synced
/// and renamed, so `path` holds either the old file or the complete new one. Call it while no vCPU runs.
///
/// # Errors
/// [`ImageError::Io`] naming the file; the temporary file is removed.
pub fn write_memory_image(mem: &GuestMemory, path: &Path) -> Result<(), ImageError> {
    let tmp = path.with_extension("tmp");
    let io = |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    };
    let result = (|| {
        let file = File::create(&tmp)?;
        let mut w = CrcWriter {
            inner: BufWriter::with_capacity(1 << 20, file),
            crc: 0,
        };
        w.inner.write_all(&[0u8; HEADER_LEN])?;
        mem.write_image(&mut w)?;
        let crc = w.crc;
        let mut file = w.inner.into_inner().map_err(|e| e.into_error())?;
        file.seek(SeekFrom::Start(0))?;
        file.write_all(&MEMORY_IMAGE_FORMAT.header_for(mem.size(), crc))?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// An opened memory image whose header has been checked.
pub struct MemoryImage {
    path: PathBuf,
    file: File,
    header: HeaderInfo,
}

impl MemoryImage {
    /// Opens `path` and checks its header and that the file length matches it.
    ///
    /// # Errors
    /// [`ImageError::Io`] or [`ImageError::Header`] (bad magic, version, checksum, or a file
    /// shorter or longer than its header says), naming the file.
    pub fn open(path: &Path) -> Result<Self, ImageError> {
        let io = |source| ImageError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new().read(true).open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut head = [0u8; HEADER_LEN];
        let got = read_up_to(&mut file, &mut head).map_err(io)?;
        let header = MEMORY_IMAGE_FORMAT
            .decode_header(&head[..got], len)
            .map_err(|source| ImageError::Header {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            header,
        })
    }

    /// Bytes of guest memory the image holds.
    pub fn memory_bytes(&self) -> u64 {
        self.header.payload_len
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks that the image is for a guest of `size` bytes.
    ///
    /// # Errors
    /// [`ImageError::SizeMismatch`].
    pub fn expect_size(&self, size: u64) -> Result<(), ImageError> {
        if self.header.payload_len != size {
            return Err(ImageError::SizeMismatch {
                path: self.path.clone(),
                expected: size,
                found: self.header.payload_len,
            });
        }
        Ok(())
    }

    fn payload_reader(&self) -> Result<CrcReader<std::io::Take<&File>>, ImageError> {
        let mut f = &self.file;
        f.seek(SeekFrom::Start(HEADER_LEN as u64))
            .map_err(|source| self.io(source))?;
        Ok(CrcReader {
            inner: f.take(self.header.payload_len),
            crc: 0,
        })
    }

    fn io(&self, source: std::io::Error) -> ImageError {
        if source.kind() == std::io::ErrorKind::UnexpectedEof {
            let found = self
                .file
                .metadata()
                .map_or(0, |m| m.len().saturating_sub(HEADER_LEN as u64));
            return ImageError::Truncated {
                path: self.path.clone(),
                expected: self.header.payload_len,
                found,
            };
        }
        ImageError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn check_crc(&self, found: u32) -> Result<(), ImageError> {
        if found != self.header.payload_crc {
            return Err(ImageError::Checksum {
                path: self.path.clone(),
                expected: self.header.payload_crc,
                found,
            });
        }
        Ok(())
    }

    /// Reads the whole image once and checks its checksum, without loading it anywhere.
    ///
    /// # Errors
    /// [`ImageError::Checksum`], or the I/O error naming the file.
    pub fn verify(&self) -> Result<(), ImageError> {
        let mut r = self.payload_reader()?;
        let copied = std::io::copy(&mut r, &mut std::io::sink()).map_err(|e| self.io(e))?;
        if copied != self.header.payload_len {
            return Err(self.io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        self.check_crc(r.crc)
    }

    /// Loads the image into `mem` (which must be its size) and checks the checksum of what was
    /// loaded. On error the memory holds a partial image and must not run.
    ///
    /// # Errors
    /// [`ImageError::SizeMismatch`], [`ImageError::Checksum`], or the I/O error naming the file.
    pub fn load_into(&self, mem: &GuestMemory) -> Result<(), ImageError> {
        self.expect_size(mem.size())?;
        let mut r = self.payload_reader()?;
        mem.read_image(&mut r).map_err(|e| self.io(e))?;
        self.check_crc(r.crc)
    }
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}
