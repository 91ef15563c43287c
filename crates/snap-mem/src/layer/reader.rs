//! Reading a layer file: open checks the header, superblock and index; frames are checked
//! (CRC, then decompressed length) each time they are read.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::error::{FrameProblem, LayerError};
use super::format::{HEAD_LEN, INDEX_FORMAT, Index, Superblock};
use super::meta::{FrameInfo, LayerInfo, PAGE, PageEntry, ParentRef};
use super::pipeline::ordered_map;
use super::table::FrameTable;

/// Reads and checks the superblock of `file`, then reads its index section (whose length the
/// superblock check capped) and checks the section's snap-core header and checksum; returns the
/// index payload, whose content is not checked yet.
pub(crate) fn read_index_payload(
    path: &Path,
    file: &File,
) -> Result<(Superblock, Vec<u8>), LayerError> {
    let io = |op, error| LayerError::Io {
        path: path.to_path_buf(),
        op,
        error,
    };
    let file_len = file.metadata().map_err(|e| io("stat", e))?.len();
    let mut head = vec![0u8; HEAD_LEN.min(file_len as usize)];
    file.read_exact_at(&mut head, 0)
        .map_err(|e| io("read superblock", e))?;
    let sb = Superblock::decode(path, &head, file_len)?;
    let mut index_bytes = vec![0u8; sb.index_len as usize];
    file.read_exact_at(&mut index_bytes, sb.index_offset)
        .map_err(|e| io("read index", e))?;
    let payload = INDEX_FORMAT
        .decode(&index_bytes)
        .map_err(|error| LayerError::Format {
            path: path.to_path_buf(),
            error,
        })?
        .payload
        .to_vec();
    Ok((sb, payload))
}

/// Buffers and a zstd context for reading frames, reused across frames by one thread.
#[derive(Default)]
pub(crate) struct FrameScratch {
    compressed: Vec<u8>,
    data: Vec<u8>,
    ctx: Option<zstd::bulk::Decompressor<'static>>,
}

/// An open memory layer file: its summary and frame table in memory, frames read on demand.
pub struct Layer {
    path: PathBuf,
    file: File,
    info: LayerInfo,
    table: FrameTable,
}

impl std::fmt::Debug for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The frame table can be large; the summary says what matters.
        f.debug_struct("Layer")
            .field("path", &self.path)
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Layer {
    /// Opens the layer at `path`, checking the header, the superblock (against the file's
    /// length), the index checksum and the frame table. Frame data is not read.
    ///
    /// Every size read from the file is capped before anything is allocated for it.
    ///
    /// # Errors
    /// [`LayerError::Io`], [`LayerError::Format`] (header or index failed a format check) or
    /// [`LayerError::Corrupt`] (the superblock or frame table is inconsistent).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LayerError> {
        let path = path.as_ref();
        let io = |op, error| LayerError::Io {
            path: path.to_path_buf(),
            op,
            error,
        };
        let file = File::open(path).map_err(|e| io("open", e))?;
        let (sb, payload) = read_index_payload(path, &file)?;
        let (index, digest) = Index::decode(path, &payload, sb.frames_len)?;
        let info = index.info(digest, sb.file_len);
        Ok(Self {
            path: path.to_path_buf(),
            file,
            info,
            table: index.table,
        })
    }

    /// The file this layer was opened from.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The layer's summary.
    #[must_use]
    pub fn info(&self) -> &LayerInfo {
        &self.info
    }

    /// The layer this one applies on top of.
    #[must_use]
    pub fn parent(&self) -> Option<ParentRef> {
        self.info.parent
    }

    pub(crate) fn table(&self) -> &FrameTable {
        &self.table
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// What the layer holds for `page`: `None` if absent (or outside memory).
    #[must_use]
    pub fn page(&self, page: u64) -> Option<PageEntry> {
        let ppf = self.table.pages_per_frame as u64;
        let frame = self.table.find(page / ppf)?;
        let f = self.table.get(frame);
        let i = (page % ppf) as usize;
        if !f.present.contains(i) {
            return None;
        }
        Some(if f.data.contains(i) {
            PageEntry::Data {
                frame,
                slot: f.data.rank(i),
            }
        } else {
            PageEntry::Zero
        })
    }

    /// Copies this layer's content of `page` into `buf` and returns `true`, or returns `false`
    /// (leaving `buf` alone) if the layer does not hold the page. Decompresses the page's frame.
    ///
    /// # Errors
    /// [`LayerError::PageOutOfRange`], or a [`LayerError::Frame`] naming the damaged frame.
    pub fn read_page(&self, page: u64, buf: &mut [u8; PAGE]) -> Result<bool, LayerError> {
        if page >= self.info.memory_pages() {
            return Err(LayerError::PageOutOfRange {
                path: self.path.clone(),
                page,
                pages: self.info.memory_pages(),
            });
        }
        match self.page(page) {
            None => Ok(false),
            Some(PageEntry::Zero) => {
                buf.fill(0);
                Ok(true)
            }
            Some(PageEntry::Data { frame, slot }) => {
                let mut scratch = FrameScratch::default();
                let data = self.load_frame(frame, &mut scratch)?;
                buf.copy_from_slice(&data[slot * PAGE..(slot + 1) * PAGE]);
                Ok(true)
            }
        }
    }

    /// Entries in the frame table.
    #[must_use]
    pub fn frame_count(&self) -> usize {
        self.table.len()
    }

    /// Frame `frame` as the index describes it.
    ///
    /// # Panics
    /// If `frame >= frame_count()`.
    #[must_use]
    pub fn frame(&self, frame: usize) -> FrameInfo {
        let f = self.table.get(frame);
        FrameInfo {
            pages: self.frame_pages(frame),
            present_pages: f.present.count(),
            stored_pages: f.data.count(),
            offset: f.offset,
            compressed_len: f.len,
            crc: f.crc,
        }
    }

    fn frame_pages(&self, frame: usize) -> Range<u64> {
        let r = self.table.pages_of(frame);
        r.start..r.end.min(self.info.memory_pages())
    }

    /// The decompressed data pages of frame `frame`, in page order. The compressed bytes'
    /// CRC is checked before they are decompressed, and the decompressed length after.
    ///
    /// # Errors
    /// [`LayerError::Frame`] naming the file, the frame and its pages.
    ///
    /// # Panics
    /// If `frame >= frame_count()`.
    pub fn read_frame(&self, frame: usize) -> Result<Vec<u8>, LayerError> {
        let mut scratch = FrameScratch::default();
        self.load_frame(frame, &mut scratch)?;
        Ok(scratch.data)
    }

    /// As [`read_frame`](Self::read_frame), with the frame's compressed bytes as stored (one
    /// zstd frame; empty when the frame stores no data), both checked.
    ///
    /// # Errors
    /// As [`read_frame`](Self::read_frame).
    ///
    /// # Panics
    /// If `frame >= frame_count()`.
    pub fn read_frame_with_compressed(
        &self,
        frame: usize,
    ) -> Result<(Vec<u8>, Vec<u8>), LayerError> {
        let mut scratch = FrameScratch::default();
        self.load_frame(frame, &mut scratch)?;
        Ok((scratch.data, scratch.compressed))
    }

    /// Reads every frame: CRC, decompression and length. Uses every core.
    ///
    /// # Errors
    /// The first damaged frame, as [`LayerError::Frame`].
    pub fn verify(&self) -> Result<(), LayerError> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        ordered_map(
            self.frame_count(),
            threads,
            usize::MAX,
            FrameScratch::default,
            |scratch, f| self.load_frame(f, scratch).map(|_| ()),
            |_, ()| Ok(()),
        )
    }

    /// Every page the layer holds, in increasing order, with its entry.
    pub fn pages(&self) -> impl Iterator<Item = (u64, PageEntry)> + '_ {
        (0..self.frame_count()).flat_map(move |frame| {
            let f = self.table.get(frame);
            let base = self.table.pages_of(frame).start;
            let mut slot = 0;
            f.present.iter().map(move |i| {
                let entry = if f.data.contains(i) {
                    slot += 1;
                    PageEntry::Data {
                        frame,
                        slot: slot - 1,
                    }
                } else {
                    PageEntry::Zero
                };
                (base + i as u64, entry)
            })
        })
    }

    fn frame_error(&self, frame: usize, problem: FrameProblem) -> LayerError {
        LayerError::Frame {
            path: self.path.clone(),
            frame,
            pages: self.frame_pages(frame),
            problem,
        }
    }

    /// Reads frame `frame`'s compressed bytes into `scratch` and checks their CRC.
    pub(crate) fn load_compressed<'s>(
        &self,
        frame: usize,
        scratch: &'s mut FrameScratch,
    ) -> Result<&'s [u8], LayerError> {
        let f = self.table.get(frame);
        // The length was capped when the index was checked.
        scratch.compressed.resize(f.len as usize, 0);
        self.file
            .read_exact_at(&mut scratch.compressed, f.offset)
            .map_err(|e| self.frame_error(frame, FrameProblem::Read(e)))?;
        let found = snap_core::crc32c(&scratch.compressed);
        if found != f.crc {
            return Err(self.frame_error(
                frame,
                FrameProblem::Checksum {
                    expected: f.crc,
                    found,
                },
            ));
        }
        Ok(&scratch.compressed)
    }

    /// Reads, checks and decompresses frame `frame` into `scratch`; returns its data pages.
    pub(crate) fn load_frame<'s>(
        &self,
        frame: usize,
        scratch: &'s mut FrameScratch,
    ) -> Result<&'s [u8], LayerError> {
        let expected = self.table.get(frame).data.count() * PAGE;
        self.load_compressed(frame, scratch)?;
        scratch.data.clear();
        if expected == 0 {
            return Ok(&scratch.data);
        }
        scratch.data.reserve(expected);
        let ctx = match &mut scratch.ctx {
            Some(c) => c,
            empty => empty.insert(
                zstd::bulk::Decompressor::new()
                    .map_err(|e| self.frame_error(frame, FrameProblem::Decompress(e)))?,
            ),
        };
        let found = ctx
            .decompress_to_buffer(&scratch.compressed, &mut scratch.data)
            .map_err(|e| self.frame_error(frame, FrameProblem::Decompress(e)))?;
        if found != expected {
            return Err(self.frame_error(frame, FrameProblem::Length { expected, found }));
        }
        Ok(&scratch.data)
    }
}
