//! Full memory images: a snap-core header, then every byte of guest memory in file-offset order.
//!
//! The payload starts with [`IMAGE_PAD`] zero bytes so that guest pages sit on 4 KiB boundaries of
//! the file: pages the guest never touched are holes in the memfd and stay holes in the image
//! (found with SEEK_DATA / SEEK_HOLE), so they cost neither disk space nor copying, and their
//! share of the CRC-32C is computed without reading them. Data moves with pread / pwrite on the
//! memfd, so saving never allocates guest memory and loading never takes a page fault per page.
//! (Memory layers with dirty-page diffs replace this format later.)

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use snap_core::checksum::{crc32c_append, crc32c_append_zeros};
use snap_core::{FormatError, FormatSpec, HEADER_LEN, HeaderInfo};

use crate::memory::{GuestMemory, data_extents as extents};

/// File format of a full memory image.
pub const MEMORY_IMAGE_FORMAT: FormatSpec = FormatSpec {
    name: "memory image",
    magic: *b"SNAPMEMI",
    version: 1,
    min_version: 1,
    max_payload: 1 << 40,
};

/// Zero bytes at the start of the payload, so memory starts at file offset 4096.
pub const IMAGE_PAD: u64 = 4096 - HEADER_LEN as u64;
/// File offset of the first byte of guest memory.
const DATA_OFFSET: u64 = 4096;
/// Bytes moved per pread / pwrite.
const CHUNK: usize = 1 << 20;
/// Holes shorter than this between two data runs are read as data: a system call costs more
/// than reading a few zero pages from the page cache (here, tens of microseconds each).
const MERGE_GAP: u64 = 256 << 10;
/// Runs of data at least this long go into fresh memory with one pwrite (no page fault per
/// page); shorter runs are copied through the mapping (no system call).
const WRITE_SYSCALL_MIN: usize = 64 << 10;
/// Page size used to skip zero pages when loading.
const PAGE: usize = 4096;

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
    /// The header's payload length is not the pad plus whole pages.
    #[error("{path}: payload of {payload_len} bytes is not a padded whole number of pages")]
    Layout {
        /// The image file.
        path: PathBuf,
        /// Payload length in the header.
        payload_len: u64,
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

/// Merges data runs separated by holes shorter than [`MERGE_GAP`].
fn coalesce(extents: Vec<(u64, u64, bool)>) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::with_capacity(extents.len());
    for e in extents {
        match out.last_mut() {
            // A short hole after data becomes part of that data run.
            Some(last) if last.2 && !e.2 && e.1 < MERGE_GAP => last.1 += e.1,
            // Data right after data (possibly after a merged hole): extend.
            Some(last) if last.2 && e.2 => last.1 += e.1,
            _ => out.push(e),
        }
    }
    // A short hole merged at the very end just reads as zeros: still correct.
    out
}

/// Calls `f(offset, bytes)` for each chunk of data in `file` at `[offset, offset + len)`.
fn for_each_chunk(
    file: &File,
    offset: u64,
    len: u64,
    buf: &mut [u8],
    mut f: impl FnMut(u64, &[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], offset + done)?;
        f(offset + done, &buf[..n])?;
        done += n as u64;
    }
    Ok(())
}

/// Writes all of `mem` to `path` as a memory image, atomically: a temporary file is written, synced
/// and renamed, so `path` holds either the old file or the complete new one. Call it while no vCPU
/// runs.
///
/// # Errors
/// [`ImageError::Io`] naming the file; the temporary file is removed.
pub fn write_memory_image(mem: &GuestMemory, path: &Path) -> Result<(), ImageError> {
    let tmp = path.with_extension("tmp");
    let result = (|| {
        let out = File::create(&tmp)?;
        let size = mem.size();
        out.set_len(DATA_OFFSET + size)?;
        let mut crc = crc32c_append_zeros(0, IMAGE_PAD);
        let mut buf = vec![0u8; CHUNK];
        for (off, len, is_data) in coalesce(extents(mem.file(), 0, size)?) {
            if !is_data {
                crc = crc32c_append_zeros(crc, len);
                continue;
            }
            for_each_chunk(mem.file(), off, len, &mut buf, |at, bytes| {
                crc = crc32c_append(crc, bytes);
                out.write_all_at(bytes, DATA_OFFSET + at)
            })?;
        }
        out.write_all_at(&MEMORY_IMAGE_FORMAT.header_for(IMAGE_PAD + size, crc), 0)?;
        out.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    })
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
        let header_err = |source| ImageError::Header {
            path: path.to_path_buf(),
            source,
        };
        let header = MEMORY_IMAGE_FORMAT
            .decode_header(&head[..got], len)
            .map_err(header_err)?;
        if header.payload_len < IMAGE_PAD || (header.payload_len - IMAGE_PAD) % 4096 != 0 {
            return Err(ImageError::Layout {
                path: path.to_path_buf(),
                payload_len: header.payload_len,
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            header,
        })
    }

    /// Bytes of guest memory the image holds.
    pub fn memory_bytes(&self) -> u64 {
        self.header.payload_len - IMAGE_PAD
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
        if self.memory_bytes() != size {
            return Err(ImageError::SizeMismatch {
                path: self.path.clone(),
                expected: size,
                found: self.memory_bytes(),
            });
        }
        Ok(())
    }

    fn io(&self, source: std::io::Error) -> ImageError {
        if source.kind() == std::io::ErrorKind::UnexpectedEof {
            let found = self
                .file
                .metadata()
                .map_or(0, |m| m.len().saturating_sub(DATA_OFFSET));
            return ImageError::Truncated {
                path: self.path.clone(),
                expected: self.memory_bytes(),
                found,
            };
        }
        ImageError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Streams the image: `on_hole(offset, len)` for holes, `on_data(offset, bytes)` for data,
    /// offsets in guest memory; then checks the checksum of everything streamed.
    fn stream(
        &self,
        mut on_hole: impl FnMut(u64, u64) -> Result<(), ImageError>,
        mut on_data: impl FnMut(u64, &[u8]) -> Result<(), ImageError>,
    ) -> Result<(), ImageError> {
        let size = self.memory_bytes();
        let mut crc = 0;
        let mut buf = vec![0u8; CHUNK];
        // The pad is read, not assumed: a corrupted pad must fail the checksum too.
        for_each_chunk(
            &self.file,
            HEADER_LEN as u64,
            IMAGE_PAD,
            &mut buf,
            |_, b| {
                crc = crc32c_append(crc, b);
                Ok(())
            },
        )
        .map_err(|e| self.io(e))?;
        let extents =
            coalesce(extents(&self.file, DATA_OFFSET, DATA_OFFSET + size).map_err(|e| self.io(e))?);
        for (off, len, is_data) in extents {
            let at = off - DATA_OFFSET;
            if !is_data {
                crc = crc32c_append_zeros(crc, len);
                on_hole(at, len)?;
                continue;
            }
            let mut failure = None;
            for_each_chunk(&self.file, off, len, &mut buf, |file_off, bytes| {
                crc = crc32c_append(crc, bytes);
                on_data(file_off - DATA_OFFSET, bytes).map_err(|e| {
                    failure = Some(e);
                    std::io::Error::other("load failed")
                })
            })
            .map_err(|e| failure.take().unwrap_or_else(|| self.io(e)))?;
        }
        if crc != self.header.payload_crc {
            return Err(ImageError::Checksum {
                path: self.path.clone(),
                expected: self.header.payload_crc,
                found: crc,
            });
        }
        Ok(())
    }

    /// Reads the whole image once and checks its checksum, without loading it anywhere.
    ///
    /// # Errors
    /// [`ImageError::Checksum`], or the I/O error naming the file.
    pub fn verify(&self) -> Result<(), ImageError> {
        self.stream(|_, _| Ok(()), |_, _| Ok(()))
    }

    /// Loads the image into `mem` (which must be its size): data is written, holes are discarded
    /// from `mem` (so they read as zero), and the checksum of what was loaded is checked. On error
    /// the memory holds a partial image and must not run.
    ///
    /// # Errors
    /// [`ImageError::SizeMismatch`], [`ImageError::Checksum`], or the I/O error naming the file.
    pub fn load_into(&self, mem: &GuestMemory) -> Result<(), ImageError> {
        self.load(mem, false)
    }

    /// As [`MemoryImage::load_into`] for memory that is still all zero (a new VM): holes need
    /// no work at all.
    ///
    /// # Errors
    /// As [`MemoryImage::load_into`].
    pub fn load_into_fresh(&self, mem: &GuestMemory) -> Result<(), ImageError> {
        self.load(mem, true)
    }

    fn load(&self, mem: &GuestMemory, fresh: bool) -> Result<(), ImageError> {
        self.expect_size(mem.size())?;
        let mem_err = |source: crate::memory::MemoryError| ImageError::Io {
            path: self.path.clone(),
            source: std::io::Error::other(source.to_string()),
        };
        self.stream(
            |at, len| {
                if fresh {
                    return Ok(());
                }
                mem.discard(at, len).map_err(mem_err)
            },
            |at, bytes| {
                if !fresh {
                    return mem.write_at_offset(at, bytes).map_err(mem_err);
                }
                // Fresh memory is zero already: copy only the runs of non-zero pages, so
                // untouched pages stay unallocated.
                let pages: Vec<&[u8]> = bytes.chunks(PAGE).collect();
                let mut i = 0;
                while i < pages.len() {
                    if is_zero(pages[i]) {
                        i += 1;
                        continue;
                    }
                    let start = i;
                    while i < pages.len() && !is_zero(pages[i]) {
                        i += 1;
                    }
                    let from = start * PAGE;
                    let to = (i * PAGE).min(bytes.len());
                    let (run, run_at) = (&bytes[from..to], at + from as u64);
                    if run.len() >= WRITE_SYSCALL_MIN {
                        mem.mark_written(run_at, run.len() as u64);
                        mem.file()
                            .write_all_at(run, run_at)
                            .map_err(|source| ImageError::Io {
                                path: self.path.clone(),
                                source,
                            })?;
                    } else {
                        mem.write_at_offset(run_at, run).map_err(mem_err)?;
                    }
                }
                Ok(())
            },
        )
    }
}

fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the aligned middle.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scattered(mem: &GuestMemory, seed: u64, pages: &[u64]) {
        for &p in pages {
            let fill = (seed as u8).wrapping_add(p as u8) | 1;
            mem.write_at_offset(p * 4096, &[fill; 4096]).unwrap();
        }
    }

    #[test]
    fn coalesce_merges_only_short_holes() {
        let e = vec![
            (0, 4096, true),
            (4096, 8192, false),
            (12288, 4096, true),
            (16384, 1 << 20, false),
            ((1 << 20) + 16384, 4096, true),
        ];
        assert_eq!(
            coalesce(e),
            vec![
                (0, 16384, true),
                (16384, 1 << 20, false),
                ((1 << 20) + 16384, 4096, true)
            ]
        );
    }

    #[test]
    fn sparse_image_round_trips_into_fresh_and_used_memory() {
        let size = 64 << 20;
        let pages = [0, 1, 2, 77, 300, 301, 5000, 16383];
        let src = GuestMemory::new(size).unwrap();
        scattered(&src, 1, &pages);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.img");
        write_memory_image(&src, &path).unwrap();
        let on_disk = std::fs::metadata(&path).unwrap();
        assert!(
            std::os::unix::fs::MetadataExt::blocks(&on_disk) * 512 < 8 << 20,
            "untouched pages are holes in the image"
        );
        let image = MemoryImage::open(&path).unwrap();
        assert_eq!(image.memory_bytes(), size);
        image.verify().unwrap();

        let fresh = GuestMemory::new(size).unwrap();
        image.load_into_fresh(&fresh).unwrap();
        assert!(fresh.to_vec() == src.to_vec());

        // Memory with other contents everywhere: holes of the image must come back as zero.
        let used = GuestMemory::new(size).unwrap();
        scattered(&used, 9, &[3, 4, 77, 1000, 9000, 16000]);
        image.load_into(&used).unwrap();
        assert!(used.to_vec() == src.to_vec());
    }

    #[test]
    fn flipped_bit_in_a_hole_or_in_data_fails_the_checksum() {
        let src = GuestMemory::new(8 << 20).unwrap();
        scattered(&src, 3, &[10, 11, 1500]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.img");
        write_memory_image(&src, &path).unwrap();
        let clean = std::fs::read(&path).unwrap();
        for at in [
            HEADER_LEN + 5,
            DATA_OFFSET as usize + 10 * 4096 + 1,
            DATA_OFFSET as usize + 700 * 4096,
        ] {
            let mut bad = clean.clone();
            bad[at] ^= 0x10;
            std::fs::write(&path, &bad).unwrap();
            let image = MemoryImage::open(&path).unwrap();
            let e = image.verify().unwrap_err();
            assert!(matches!(e, ImageError::Checksum { .. }), "byte {at}: {e}");
            let fresh = GuestMemory::new(8 << 20).unwrap();
            assert!(matches!(
                image.load_into_fresh(&fresh),
                Err(ImageError::Checksum { .. })
            ));
        }
    }
}
