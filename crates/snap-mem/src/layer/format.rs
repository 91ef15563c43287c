//! On-disk encoding: the file header with its superblock, and the index section.

use std::path::Path;

use serde::{Deserialize, Serialize};
use snap_core::{FormatSpec, HEADER_LEN, Id};

use super::error::LayerError;
use super::mask::PageMask;
use super::meta::{Digest, LayerInfo, MAX_MEMORY_BYTES, PAGE, ParentRef, check_frame_size};
use super::table::FrameTable;

/// Bytes of the superblock (the payload of the file header).
const SUPERBLOCK_LEN: usize = 64;
/// Bytes at the start of the file: header and superblock.
pub(crate) const HEAD_LEN: usize = HEADER_LEN + SUPERBLOCK_LEN;
/// File offset of the first frame.
pub(crate) const FRAMES_OFFSET: u64 = 4096;

/// The header at the start of a layer file; its payload is the superblock.
pub(crate) const LAYER_FORMAT: FormatSpec = FormatSpec {
    name: "memory layer header",
    magic: *b"SNAPMLAY",
    version: 1,
    min_version: 1,
    max_payload: SUPERBLOCK_LEN as u64,
};

/// The index section: layer metadata and the frame table.
pub(crate) const INDEX_FORMAT: FormatSpec = FormatSpec {
    name: "memory layer index",
    magic: *b"SNAPMIDX",
    version: 1,
    min_version: 1,
    max_payload: 1 << 30,
};

/// Largest compressed frame a reader accepts: zstd's bound for a 2 MiB input.
pub(crate) fn max_compressed_len(frame_size: u32) -> u64 {
    zstd::zstd_safe::compress_bound(frame_size as usize) as u64
}

/// Where the sections of a layer file are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Superblock {
    pub frames_len: u64,
    pub index_offset: u64,
    pub index_len: u64,
    pub file_len: u64,
}

impl Superblock {
    /// Header and superblock, as they start the file.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = [0u8; SUPERBLOCK_LEN];
        let fields = [
            FRAMES_OFFSET,
            self.frames_len,
            self.index_offset,
            self.index_len,
            self.file_len,
        ];
        for (i, v) in fields.iter().enumerate() {
            p[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        p[40..44].copy_from_slice(&(PAGE as u32).to_le_bytes());
        LAYER_FORMAT.encode(&p)
    }

    /// Checks the first [`HEAD_LEN`] bytes of a file of `actual_len` bytes.
    pub fn decode(path: &Path, head: &[u8], actual_len: u64) -> Result<Self, LayerError> {
        let d = LAYER_FORMAT
            .decode(head)
            .map_err(|error| LayerError::Format {
                path: path.to_path_buf(),
                error,
            })?;
        let corrupt = |problem: String| LayerError::Corrupt {
            path: path.to_path_buf(),
            problem,
        };
        // The header caps the payload, but a shorter one passes its checks too.
        if d.payload.len() != SUPERBLOCK_LEN {
            return Err(corrupt(format!(
                "superblock of {} bytes (this build reads {SUPERBLOCK_LEN})",
                d.payload.len()
            )));
        }
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&d.payload[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        let frames_offset = u64_at(0);
        let sb = Self {
            frames_len: u64_at(1),
            index_offset: u64_at(2),
            index_len: u64_at(3),
            file_len: u64_at(4),
        };
        let page_size =
            u32::from_le_bytes([d.payload[40], d.payload[41], d.payload[42], d.payload[43]]);
        if frames_offset != FRAMES_OFFSET || page_size as usize != PAGE {
            return Err(corrupt(format!(
                "superblock: frames at {frames_offset}, page size {page_size} (this build writes {FRAMES_OFFSET} and {PAGE})"
            )));
        }
        if actual_len != sb.file_len {
            return Err(corrupt(format!(
                "file is {actual_len} bytes, the superblock records {} (truncated or extended)",
                sb.file_len
            )));
        }
        let laid_out = FRAMES_OFFSET.checked_add(sb.frames_len) == Some(sb.index_offset)
            && sb.index_offset.checked_add(sb.index_len) == Some(sb.file_len);
        if !laid_out || sb.index_len > HEADER_LEN as u64 + INDEX_FORMAT.max_payload {
            return Err(corrupt(format!(
                "superblock: frames {FRAMES_OFFSET}+{}, index {}+{}, file {} do not fit together",
                sb.frames_len, sb.index_offset, sb.index_len, sb.file_len
            )));
        }
        Ok(sb)
    }
}

#[derive(Serialize, Deserialize)]
struct WireParent {
    id: [u8; 16],
    digest: [u8; 32],
}

/// The part of the index the digest covers. Serialized from borrowed columns, deserialized into
/// owned ones (the same postcard encoding).
#[derive(Serialize)]
struct WireContentRef<'a> {
    id: [u8; 16],
    memory_bytes: u64,
    frame_size: u32,
    zstd_level: i32,
    regions: &'a [u64],
    offsets: &'a [u64],
    lens: &'a [u32],
    crcs: &'a [u32],
    present: &'a [u64],
    data: &'a [u64],
}

#[derive(Deserialize)]
struct WireContent {
    id: [u8; 16],
    memory_bytes: u64,
    frame_size: u32,
    zstd_level: i32,
    regions: Vec<u64>,
    offsets: Vec<u64>,
    lens: Vec<u32>,
    crcs: Vec<u32>,
    present: Vec<u64>,
    data: Vec<u64>,
}

/// Everything the index records.
#[derive(Clone, Debug)]
pub(crate) struct Index {
    pub parent: Option<ParentRef>,
    pub id: Id,
    pub memory_bytes: u64,
    pub frame_size: u32,
    pub zstd_level: i32,
    pub table: FrameTable,
}

impl Index {
    /// The summary of the layer this index describes, whose digest and file size are given.
    pub(crate) fn info(&self, digest: Digest, stored_bytes: u64) -> LayerInfo {
        let (pages_present, pages_stored) = self.table.counts();
        LayerInfo {
            id: self.id,
            digest,
            parent: self.parent,
            memory_bytes: self.memory_bytes,
            frame_size: self.frame_size,
            zstd_level: self.zstd_level,
            frames: self.table.len(),
            pages_present,
            pages_stored,
            stored_bytes,
        }
    }
}

/// An index payload: the parent link, then `content`.
pub(crate) fn join_link(parent: Option<ParentRef>, content: &[u8]) -> Vec<u8> {
    let link = parent.map(|p| WireParent {
        id: p.id.0,
        digest: p.digest.0,
    });
    let mut payload = postcard::to_allocvec(&link).unwrap_or_else(|e| postcard_bug(e));
    payload.extend_from_slice(content);
    payload
}

/// The content part of an index payload (what follows the parent link).
pub(crate) fn split_link<'a>(path: &Path, payload: &'a [u8]) -> Result<&'a [u8], LayerError> {
    let (_, content): (Option<WireParent>, &[u8]) =
        postcard::take_from_bytes(payload).map_err(|e| LayerError::Corrupt {
            path: path.to_path_buf(),
            problem: format!("index does not parse: {e}"),
        })?;
    Ok(content)
}

fn postcard_bug(e: postcard::Error) -> ! {
    // Serializing plain integers and slices into a Vec cannot fail.
    unreachable!("postcard serialization into a Vec failed: {e}")
}

impl Index {
    /// The encoded content part (what the digest covers).
    fn content_bytes(&self) -> Vec<u8> {
        let t = &self.table;
        postcard::to_allocvec(&WireContentRef {
            id: self.id.0,
            memory_bytes: self.memory_bytes,
            frame_size: self.frame_size,
            zstd_level: self.zstd_level,
            regions: &t.regions,
            offsets: &t.offsets,
            lens: &t.lens,
            crcs: &t.crcs,
            present: &t.present,
            data: &t.data,
        })
        .unwrap_or_else(|e| postcard_bug(e))
    }

    /// The index payload (parent link, then content) and the digest.
    pub fn encode(&self) -> (Vec<u8>, Digest) {
        let content = self.content_bytes();
        let digest = Digest(*blake3::hash(&content).as_bytes());
        (join_link(self.parent, &content), digest)
    }

    /// Parses and checks an index payload of a file whose frames occupy `frames_len` bytes
    /// from [`FRAMES_OFFSET`].
    pub fn decode(
        path: &Path,
        payload: &[u8],
        frames_len: u64,
    ) -> Result<(Self, Digest), LayerError> {
        let corrupt = |problem: String| LayerError::Corrupt {
            path: path.to_path_buf(),
            problem,
        };
        let bad = |e: postcard::Error| corrupt(format!("index does not parse: {e}"));
        let (link, content): (Option<WireParent>, &[u8]) =
            postcard::take_from_bytes(payload).map_err(bad)?;
        let (w, rest): (WireContent, &[u8]) = postcard::take_from_bytes(content).map_err(bad)?;
        if !rest.is_empty() {
            return Err(corrupt(format!("index has {} trailing bytes", rest.len())));
        }
        let digest = Digest(*blake3::hash(content).as_bytes());
        check_frame_size(w.frame_size).map_err(|p| corrupt(format!("index: {p}")))?;
        if w.memory_bytes == 0
            || w.memory_bytes % PAGE as u64 != 0
            || w.memory_bytes > MAX_MEMORY_BYTES
        {
            return Err(corrupt(format!(
                "index: memory size {} bytes is not a positive multiple of {PAGE} up to {MAX_MEMORY_BYTES}",
                w.memory_bytes
            )));
        }
        let mut table = FrameTable::new(w.frame_size);
        let n = w.regions.len();
        if w.offsets.len() != n
            || w.lens.len() != n
            || w.crcs.len() != n
            || w.present.len() != n * table.words
            || w.data.len() != n * table.words
        {
            return Err(corrupt(format!(
                "index: frame table columns disagree on {n} entries"
            )));
        }
        table.regions = w.regions;
        table.offsets = w.offsets;
        table.lens = w.lens;
        table.crcs = w.crcs;
        table.present = w.present;
        table.data = w.data;
        let index = Index {
            parent: link.map(|p| ParentRef {
                id: Id(p.id),
                digest: Digest(p.digest),
            }),
            id: Id(w.id),
            memory_bytes: w.memory_bytes,
            frame_size: w.frame_size,
            zstd_level: w.zstd_level,
            table,
        };
        index.check_table(frames_len).map_err(corrupt)?;
        Ok((index, digest))
    }

    /// Frame-table sanity: regions strictly increasing and inside memory, bitmaps consistent,
    /// frames packed in order inside the frames section with capped lengths.
    fn check_table(&self, frames_len: u64) -> Result<(), String> {
        let t = &self.table;
        let ppf = t.pages_per_frame as u64;
        let pages = self.memory_bytes / PAGE as u64;
        let max_len = max_compressed_len(self.frame_size);
        let mut cursor = FRAMES_OFFSET;
        let mut prev: Option<u64> = None;
        for i in 0..t.len() {
            let f = t.get(i);
            let fail =
                |what: String| format!("frame table entry {i} (region {}): {what}", f.region);
            if prev.is_some_and(|p| f.region <= p) {
                return Err(fail("regions are not strictly increasing".into()));
            }
            prev = Some(f.region);
            let first = f.region.checked_mul(ppf).filter(|&p| p < pages);
            let Some(first) = first else {
                return Err(fail(format!("region is outside memory ({pages} pages)")));
            };
            let in_memory = PageMask::first((pages - first).min(ppf) as usize);
            if f.present.is_empty() || !f.present.is_subset(&in_memory) {
                return Err(fail(
                    "present bitmap is empty or reaches past the region or memory".into(),
                ));
            }
            if !f.data.is_subset(&f.present) {
                return Err(fail(
                    "data bitmap holds pages the present bitmap lacks".into(),
                ));
            }
            let len = u64::from(f.len);
            if f.data.is_empty() != (len == 0) || len > max_len {
                return Err(fail(format!(
                    "{} data pages but {len} compressed bytes (at most {max_len})",
                    f.data.count()
                )));
            }
            if f.offset != cursor {
                return Err(fail(format!(
                    "frame at offset {}, expected {cursor}",
                    f.offset
                )));
            }
            cursor += len;
        }
        if cursor != FRAMES_OFFSET + frames_len {
            return Err(format!(
                "frames end at {cursor}, but the frames section ends at {}",
                FRAMES_OFFSET + frames_len
            ));
        }
        Ok(())
    }
}
