//! Recorded working sets: the restore units a guest faulted on during the first lazy restore of
//! a snapshot, in fault order, stored with their bytes so that later restores read them
//! sequentially and install them in few large copies, without decompressing layer frames.
//!
//! # File layout
//!
//! ```text
//! snap-core header (format "working set") + index payload
//! zero padding to the next 4 KiB boundary
//! data: the bytes of every non-zero unit of the index, in index order, back to back
//! ```
//!
//! The index payload (all integers little endian):
//!
//! ```text
//! u64 unit_pages          pages per restore unit the set was recorded with
//! u64 memory_bytes        size of the memory it belongs to
//! [u8; 32] tag            what the memory is (the snapshot's newest layer digest)
//! u64 count               entries that follow
//! count x { u64 unit | ZERO_BIT, u32 crc32c of the unit's bytes (0 for zero units) }
//! ```
//!
//! A working set is a hint: a file for another unit, memory or tag is refused by
//! [`WorkingSet::open`], and a unit whose bytes fail their checksum is served from the layer
//! chain instead (the page server checks every unit before installing it).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use snap_core::{AtomicFile, FileError, FileErrorKind, FileOp, FormatSpec, HEADER_LEN};

use crate::lazy::WindowSource;
use crate::memory::PAGE_SIZE;

/// The format of a working-set file's header and index.
pub const WORKING_SET_FORMAT: FormatSpec = FormatSpec {
    name: "working set",
    magic: *b"SNAPWSET",
    version: 2,
    min_version: 2,
    max_payload: 64 << 20,
};

/// Set in an entry's unit number when the unit is all zero (no bytes stored).
const ZERO_BIT: u64 = 1 << 63;
/// Fixed part of the index payload.
const INDEX_FIXED: usize = 8 + 8 + 32 + 8;
/// Bytes per index entry.
const ENTRY_LEN: usize = 12;
/// Alignment of the data section.
const DATA_ALIGN: u64 = 4096;
/// Bytes [`WorkingSet::check`] reads at a time.
const CHECK_READ_BYTES: usize = 4 << 20;

/// Errors reading or writing a working set.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkingSetError {
    /// The file could not be read, or its header or index is damaged.
    #[error(transparent)]
    File(#[from] FileError),
    /// I/O on the file failed.
    #[error("working set {path}: {op}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file describes other memory, another restore unit, or is inconsistent.
    #[error("working set {path}: {what}")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// What does not match.
        what: String,
    },
    /// The memory the set was recorded from could not be read.
    #[error("working set {path}: reading unit {unit} from the snapshot: {source}")]
    Source {
        /// The file being written.
        path: PathBuf,
        /// The unit.
        unit: u64,
        /// What the source reported.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// One unit of a working set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The restore unit (index in units of `unit_pages` pages).
    pub unit: u64,
    /// All zero: no bytes stored.
    pub zero: bool,
    /// crc32c of the unit's bytes.
    pub crc: u32,
    /// Offset of the unit's bytes in the data section (for zero units: where the next one goes).
    pub offset: u64,
}

/// A working set: restore units in the order a guest first touched them, with or without their
/// bytes.
#[derive(Debug)]
pub struct WorkingSet {
    unit_pages: u64,
    entries: Vec<Entry>,
    /// The file holding the units' bytes and where its data section starts.
    data: Option<(File, u64, PathBuf)>,
}

impl WorkingSet {
    /// A working set of `units` without their bytes: the page server reads them from its source.
    #[must_use]
    pub fn from_units(unit_pages: u64, units: &[u64]) -> Self {
        let entries = units
            .iter()
            .map(|&unit| Entry {
                unit,
                zero: false,
                crc: 0,
                offset: 0,
            })
            .collect();
        Self {
            unit_pages,
            entries,
            data: None,
        }
    }

    /// Pages per restore unit.
    #[must_use]
    pub fn unit_pages(&self) -> u64 {
        self.unit_pages
    }

    /// The units, in the order the guest touched them.
    pub fn units(&self) -> impl Iterator<Item = u64> + '_ {
        self.entries.iter().map(|e| e.unit)
    }

    /// Number of units.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the set is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether the units' bytes come with the set (read from its file) rather than from the
    /// page server's source.
    #[must_use]
    pub fn has_data(&self) -> bool {
        self.data.is_some()
    }

    pub(crate) fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Writes the working set `units` (in fault order, as a [`crate::lazy::CompleteHook`] gets
    /// them) to `path` atomically, with each unit's bytes read from `source`. `tag` names the
    /// memory (a later [`WorkingSet::open`] must give the same tag).
    ///
    /// # Errors
    /// [`WorkingSetError::Source`] if a unit cannot be read; [`WorkingSetError::Io`] if the file
    /// cannot be written.
    pub fn record(
        path: &Path,
        unit_pages: u64,
        units: &[u64],
        source: &dyn WindowSource,
        tag: [u8; 32],
    ) -> Result<(), WorkingSetError> {
        let io_err = |op: &'static str| {
            let path = path.to_path_buf();
            move |source: io::Error| WorkingSetError::Io { path, op, source }
        };
        let window_pages = source.window_pages();
        if unit_pages == 0 || window_pages % unit_pages != 0 {
            return Err(WorkingSetError::Mismatch {
                path: path.into(),
                what: format!(
                    "unit of {unit_pages} pages does not divide the source's window of {window_pages} pages"
                ),
            });
        }
        let unit_bytes = (unit_pages * PAGE_SIZE) as usize;
        let memory_units = (source.memory_bytes() / PAGE_SIZE).div_ceil(unit_pages);
        let payload_len = INDEX_FIXED + units.len() * ENTRY_LEN;
        let data_start = (HEADER_LEN + payload_len) as u64;
        let data_start = data_start.div_ceil(DATA_ALIGN) * DATA_ALIGN;

        let out = AtomicFile::create(path).map_err(|e| WorkingSetError::Io {
            path: path.into(),
            op: e.op,
            source: e.source,
        })?;
        let mut payload = Vec::with_capacity(payload_len);
        payload.extend_from_slice(&unit_pages.to_le_bytes());
        payload.extend_from_slice(&source.memory_bytes().to_le_bytes());
        payload.extend_from_slice(&tag);
        payload.extend_from_slice(&(units.len() as u64).to_le_bytes());

        let mut window = vec![0u8; (window_pages * PAGE_SIZE) as usize];
        let mut loaded: Option<(u64, bool)> = None;
        let mut pending = Vec::with_capacity(1 << 20);
        let mut written = data_start;
        for &unit in units {
            if unit >= memory_units {
                return Err(WorkingSetError::Mismatch {
                    path: path.into(),
                    what: format!("unit {unit} lies beyond memory of {memory_units} units"),
                });
            }
            let w = unit * unit_pages / window_pages;
            let has_data = match loaded {
                Some((lw, has)) if lw == w => has,
                _ => {
                    let has = source.read_window(w, &mut window).map_err(|source| {
                        WorkingSetError::Source {
                            path: path.into(),
                            unit,
                            source,
                        }
                    })?;
                    loaded = Some((w, has));
                    has
                }
            };
            let off = ((unit * unit_pages - w * window_pages) * PAGE_SIZE) as usize;
            let bytes = &window[off..off + unit_bytes];
            let zero = !has_data || crate::layer::is_zero(bytes);
            let crc = if zero { 0 } else { snap_core::crc32c(bytes) };
            payload.extend_from_slice(&(unit | if zero { ZERO_BIT } else { 0 }).to_le_bytes());
            payload.extend_from_slice(&crc.to_le_bytes());
            if !zero {
                pending.extend_from_slice(bytes);
                if pending.len() >= 1 << 20 {
                    out.file()
                        .write_all_at(&pending, written)
                        .map_err(io_err("write"))?;
                    written += pending.len() as u64;
                    pending.clear();
                }
            }
        }
        out.file()
            .write_all_at(&pending, written)
            .map_err(io_err("write"))?;
        let mut head = WORKING_SET_FORMAT.encode(&payload);
        head.resize(data_start as usize, 0);
        out.file().write_all_at(&head, 0).map_err(io_err("write"))?;
        out.commit().map_err(|e| WorkingSetError::Io {
            path: path.into(),
            op: e.op,
            source: e.source,
        })
    }

    /// Opens the working set at `path`, checking that it was recorded with `unit_pages` for
    /// memory of `memory_bytes` tagged `tag`. The units' bytes are read later, as the page
    /// server installs them, and checked then.
    ///
    /// # Errors
    /// [`WorkingSetError::File`] if the header or index is damaged (or the file missing),
    /// [`WorkingSetError::Mismatch`] if it belongs to other memory or another unit.
    pub fn open(
        path: &Path,
        unit_pages: u64,
        memory_bytes: u64,
        tag: [u8; 32],
    ) -> Result<Self, WorkingSetError> {
        let mismatch = |what: String| WorkingSetError::Mismatch {
            path: path.into(),
            what,
        };
        let file = File::open(path).map_err(|source| WorkingSetError::Io {
            path: path.into(),
            op: "open",
            source,
        })?;
        let file_len = file
            .metadata()
            .map_err(|source| WorkingSetError::Io {
                path: path.into(),
                op: "stat",
                source,
            })?
            .len();
        let mut header = [0u8; HEADER_LEN];
        file.read_exact_at(&mut header, 0)
            .map_err(|source| WorkingSetError::Io {
                path: path.into(),
                op: "read header",
                source,
            })?;
        let format_err = |e| FileError {
            op: FileOp::Read,
            path: path.into(),
            source: FileErrorKind::Format(e),
        };
        let info = WORKING_SET_FORMAT
            .decode_header_prefix(&header, file_len)
            .map_err(format_err)?;
        let mut head = vec![0u8; HEADER_LEN + info.payload_len as usize];
        file.read_exact_at(&mut head, 0)
            .map_err(|source| WorkingSetError::Io {
                path: path.into(),
                op: "read index",
                source,
            })?;
        // Decoding the prefix checks the payload checksum; the data section follows it.
        let payload = WORKING_SET_FORMAT
            .decode_prefix(&head)
            .map_err(format_err)?
            .0
            .payload;
        if payload.len() < INDEX_FIXED || (payload.len() - INDEX_FIXED) % ENTRY_LEN != 0 {
            return Err(mismatch(format!(
                "index of {} bytes is not a whole number of entries",
                payload.len()
            )));
        }
        let word = |at: usize| u64::from_le_bytes(payload[at..at + 8].try_into().expect("8"));
        if word(0) != unit_pages {
            return Err(mismatch(format!(
                "recorded with units of {} pages, restoring with {unit_pages}",
                word(0)
            )));
        }
        if word(8) != memory_bytes {
            return Err(mismatch(format!(
                "recorded for {} bytes of memory, restoring {memory_bytes}",
                word(8)
            )));
        }
        if payload[16..48] != tag {
            return Err(mismatch(
                "recorded for other memory contents (tag differs)".into(),
            ));
        }
        let count = word(48);
        if count != ((payload.len() - INDEX_FIXED) / ENTRY_LEN) as u64 {
            return Err(mismatch(format!(
                "index says {count} entries but holds {}",
                (payload.len() - INDEX_FIXED) / ENTRY_LEN
            )));
        }
        let memory_units = (memory_bytes / PAGE_SIZE).div_ceil(unit_pages);
        let unit_bytes = unit_pages * PAGE_SIZE;
        let mut entries = Vec::with_capacity(count as usize);
        let mut offset = 0;
        for raw in payload[INDEX_FIXED..].chunks_exact(ENTRY_LEN) {
            let tagged = u64::from_le_bytes(raw[..8].try_into().expect("8"));
            let crc = u32::from_le_bytes(raw[8..].try_into().expect("4"));
            let (unit, zero) = (tagged & !ZERO_BIT, tagged & ZERO_BIT != 0);
            if unit >= memory_units {
                return Err(mismatch(format!(
                    "unit {unit} lies beyond memory of {memory_units} units"
                )));
            }
            entries.push(Entry {
                unit,
                zero,
                crc,
                offset,
            });
            if !zero {
                offset += unit_bytes;
            }
        }
        let data_start = ((HEADER_LEN as u64 + info.payload_len).div_ceil(DATA_ALIGN)) * DATA_ALIGN;
        if data_start + offset != file_len {
            return Err(mismatch(format!(
                "file is {file_len} bytes, its index needs {}",
                data_start + offset
            )));
        }
        Ok(Self {
            unit_pages,
            entries,
            data: Some((file, data_start, path.into())),
        })
    }

    /// Reads the stored bytes of every unit as a prefetching restore does (a few MiB at a time)
    /// and checks each against its checksum. Returns the units whose bytes fail, in file order
    /// (a restore serves those from the snapshot instead); a set without bytes has none.
    ///
    /// # Errors
    /// [`WorkingSetError::Io`] if the file cannot be read.
    pub fn check(&self) -> Result<Vec<u64>, WorkingSetError> {
        if self.data.is_none() {
            return Ok(Vec::new());
        }
        let unit_bytes = (self.unit_pages * PAGE_SIZE) as usize;
        let per_read = (CHECK_READ_BYTES / unit_bytes).max(1);
        let (mut buf, mut bad) = (Vec::new(), Vec::new());
        let mut start = 0;
        while start < self.entries.len() {
            let range = start..(start + per_read).min(self.entries.len());
            let read_at = self.read_data(range.clone(), &mut buf)?;
            for e in self.entries[range.clone()].iter().filter(|e| !e.zero) {
                let off = (e.offset - read_at) as usize;
                if snap_core::crc32c(&buf[off..off + unit_bytes]) != e.crc {
                    bad.push(e.unit);
                }
            }
            start = range.end;
        }
        Ok(bad)
    }

    /// Reads the stored bytes of entries `range` into `buf` (resized) with one read; returns
    /// where entry `range.start`'s bytes begin in the data section.
    pub(crate) fn read_data(
        &self,
        range: std::ops::Range<usize>,
        buf: &mut Vec<u8>,
    ) -> Result<u64, WorkingSetError> {
        let (file, data_start, path) = self.data.as_ref().expect("a set with data");
        let unit_bytes = self.unit_pages * PAGE_SIZE;
        let entries = &self.entries[range];
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            buf.clear();
            return Ok(0);
        };
        let end = last.offset + if last.zero { 0 } else { unit_bytes };
        buf.resize((end - first.offset) as usize, 0);
        file.read_exact_at(buf, data_start + first.offset)
            .map_err(|source| WorkingSetError::Io {
                path: path.clone(),
                op: "read units",
                source,
            })?;
        Ok(first.offset)
    }
}
