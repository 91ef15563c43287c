//! Writing layer files: frames compressed on every core, written in region order, then the
//! index and, last, the superblock; the whole file replaces its path atomically.

use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::atomic::TempFile;
use super::error::LayerError;
use super::format::{FRAMES_OFFSET, INDEX_FORMAT, Index, Superblock};
use super::mask::PageMask;
use super::meta::{LayerInfo, LayerOptions, MAX_MEMORY_BYTES, NewLayer, PAGE};
use super::page_io::{PageSource, is_zero};
use super::pipeline::ordered_map;
use super::table::{FrameRecord, FrameTable};

/// Pages a worker takes at a time (a batch of regions holding about this many pages).
const BATCH_PAGES: usize = 1024;
/// Unwanted pages read along with wanted ones rather than splitting a read (see [`coalesce`]).
const READ_GAP_PAGES: usize = 8;
/// Frame bytes gathered before one write to the file.
const WRITE_BUFFER: usize = 4 << 20;

/// One frame as a worker produced it.
pub(crate) struct FrameOut {
    pub region: u64,
    pub present: PageMask,
    pub data: PageMask,
    /// Compressed data pages (empty when `data` is empty).
    pub bytes: Vec<u8>,
    /// CRC-32C of `bytes`.
    pub crc: u32,
}

/// A worker's compression context and buffers, reused across regions.
pub(crate) struct Compress {
    level: i32,
    ctx: Option<zstd::bulk::Compressor<'static>>,
}

impl Compress {
    pub fn new(level: i32) -> Self {
        Self { level, ctx: None }
    }

    /// Compresses `data` into a new buffer.
    pub fn compress(&mut self, data: &[u8], path: &Path) -> Result<Vec<u8>, LayerError> {
        let io = |error| LayerError::Io {
            path: path.to_path_buf(),
            op: "zstd compression",
            error,
        };
        let ctx = match &mut self.ctx {
            Some(c) => c,
            empty => empty.insert(zstd::bulk::Compressor::new(self.level).map_err(io)?),
        };
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
        ctx.compress_to_buffer(data, &mut out).map_err(io)?;
        Ok(out)
    }
}

/// Checks what every written layer needs: valid options and a sane memory size.
pub(crate) fn check_new(layer: &NewLayer, options: &LayerOptions) -> Result<(), LayerError> {
    options.validate()?;
    let m = layer.memory_bytes;
    if m == 0 || m % PAGE as u64 != 0 || m > MAX_MEMORY_BYTES {
        return Err(LayerError::Options {
            problem: format!(
                "memory size {m} bytes is not a positive multiple of {PAGE} up to {MAX_MEMORY_BYTES}"
            ),
        });
    }
    Ok(())
}

/// Writes a layer whose frames come from `make`, called on worker threads for each plan (plans
/// in region order); `weight` says how many pages a plan touches, to size the batches.
pub(crate) fn write_frames<P: Sync, S>(
    path: &Path,
    layer: &NewLayer,
    options: &LayerOptions,
    plans: &[P],
    weight: impl Fn(&P) -> usize,
    init: impl Fn() -> S + Sync,
    make: impl Fn(&mut S, &P) -> Result<Option<FrameOut>, LayerError> + Sync,
) -> Result<LayerInfo, LayerError> {
    check_new(layer, options)?;
    let mut batches = vec![0];
    let mut pages = 0;
    for (i, p) in plans.iter().enumerate() {
        pages += weight(p);
        if pages >= BATCH_PAGES {
            batches.push(i + 1);
            pages = 0;
        }
    }
    if batches.last() != Some(&plans.len()) {
        batches.push(plans.len());
    }

    let tmp = TempFile::create(path)?;
    let io = |op, error| LayerError::Io {
        path: path.to_path_buf(),
        op,
        error,
    };
    let mut table = FrameTable::new(options.frame_size);
    let mut cursor = FRAMES_OFFSET;
    let mut pending: Vec<u8> = Vec::with_capacity(WRITE_BUFFER);
    let mut pending_at = cursor;
    let threads = options.thread_count();
    ordered_map(
        batches.len() - 1,
        threads,
        threads * 4,
        &init,
        |state, b| {
            plans[batches[b]..batches[b + 1]]
                .iter()
                .filter_map(|p| make(state, p).transpose())
                .collect::<Result<Vec<_>, _>>()
        },
        |_, frames| {
            for f in frames {
                table.push(&FrameRecord {
                    region: f.region,
                    present: f.present,
                    data: f.data,
                    offset: cursor,
                    len: f.bytes.len() as u32,
                    crc: f.crc,
                });
                cursor += f.bytes.len() as u64;
                pending.extend_from_slice(&f.bytes);
            }
            if pending.len() >= WRITE_BUFFER {
                tmp.file()
                    .write_all_at(&pending, pending_at)
                    .map_err(|e| io("write frames", e))?;
                pending_at = cursor;
                pending.clear();
            }
            Ok(())
        },
    )?;
    tmp.file()
        .write_all_at(&pending, pending_at)
        .map_err(|e| io("write frames", e))?;

    let index = Index {
        parent: layer.parent,
        id: layer.id,
        memory_bytes: layer.memory_bytes,
        frame_size: options.frame_size,
        zstd_level: options.zstd_level,
        table,
    };
    let (payload, digest) = index.encode();
    if payload.len() as u64 > INDEX_FORMAT.max_payload {
        return Err(LayerError::Options {
            problem: format!(
                "the index would be {} bytes, over the {} a reader accepts: use larger frames",
                payload.len(),
                INDEX_FORMAT.max_payload
            ),
        });
    }
    let index_bytes = INDEX_FORMAT.encode(&payload);
    tmp.file()
        .write_all_at(&index_bytes, cursor)
        .map_err(|e| io("write index", e))?;
    let sb = Superblock {
        frames_len: cursor - FRAMES_OFFSET,
        index_offset: cursor,
        index_len: index_bytes.len() as u64,
        file_len: cursor + index_bytes.len() as u64,
    };
    tmp.file()
        .write_all_at(&sb.encode(), 0)
        .map_err(|e| io("write superblock", e))?;
    tmp.commit()?;

    let info = index.info(digest, sb.file_len);
    tracing::debug!(
        path = %path.display(), id = %info.id, frames = info.frames,
        pages_present = info.pages_present, pages_stored = info.pages_stored,
        bytes = info.stored_bytes, "wrote memory layer"
    );
    Ok(info)
}

/// Writes the layer file `path` holding `pages` (strictly increasing page numbers) of memory
/// read from `source`.
///
/// Zero pages are never stored: in a layer with a parent they become zero entries (they
/// override the parent); in a layer without one they are left out. The file appears at `path`
/// complete or not at all (temp file, fsync, rename, fsync of the directory). The output is the
/// same bytes for the same input and options, whatever the thread count.
///
/// ```
/// use snap_core::Id;
/// use snap_mem::layer::{Layer, LayerOptions, NewLayer, write_layer};
///
/// let dir = tempfile::tempdir()?;
/// let mut memory = vec![0u8; 64 * 4096];
/// memory[5 * 4096] = 7;
/// let path = dir.path().join("full.mlayer");
/// let layer = NewLayer { id: Id::random(), parent: None, memory_bytes: memory.len() as u64 };
/// let info = write_layer(&path, &layer, 0..64, &memory, &LayerOptions::default())?;
/// assert_eq!((info.pages_present, info.pages_stored), (1, 1));
/// let mut page = [0u8; 4096];
/// assert!(Layer::open(&path)?.read_page(5, &mut page)?);
/// assert_eq!(page[0], 7);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`LayerError::Options`] for bad options or memory size, [`LayerError::MemorySize`] if the
/// source is another size, [`LayerError::PageList`] for pages out of order or outside memory, [`LayerError::Source`] if the source fails, and
/// [`LayerError::Io`] for file errors (the temporary file is then removed).
pub fn write_layer<S: PageSource + ?Sized>(
    path: &Path,
    layer: &NewLayer,
    pages: impl IntoIterator<Item = u64>,
    source: &S,
    options: &LayerOptions,
) -> Result<LayerInfo, LayerError> {
    check_new(layer, options)?;
    let ppf = (options.frame_size as usize / PAGE) as u64;
    let memory_pages = layer.memory_bytes / PAGE as u64;
    if source.page_count() != memory_pages {
        return Err(LayerError::MemorySize {
            path: path.to_path_buf(),
            what: "page source",
            layer_bytes: layer.memory_bytes,
            other_bytes: source.page_count() * PAGE as u64,
        });
    }
    let mut plans: Vec<(u64, PageMask)> = Vec::new();
    let mut prev: Option<u64> = None;
    for page in pages {
        let problem = if page >= memory_pages {
            Some(format!(
                "page {page} is outside memory ({memory_pages} pages)"
            ))
        } else {
            prev.filter(|&p| page <= p)
                .map(|p| format!("page {page} follows page {p} (pages must increase)"))
        };
        if let Some(problem) = problem {
            return Err(LayerError::PageList {
                path: path.to_path_buf(),
                problem,
            });
        }
        prev = Some(page);
        let region = page / ppf;
        if plans.last().is_none_or(|(r, _)| *r != region) {
            plans.push((region, PageMask::EMPTY));
        }
        if let Some((_, mask)) = plans.last_mut() {
            mask.insert((page % ppf) as usize);
        }
    }
    let has_parent = layer.parent.is_some();
    write_frames(
        path,
        layer,
        options,
        &plans,
        |(_, wanted)| wanted.count(),
        || {
            (
                vec![0u8; options.frame_size as usize],
                Compress::new(options.zstd_level),
            )
        },
        |(buf, compress), &(region, wanted)| {
            let base = region * ppf;
            for run in coalesce(wanted.runs()) {
                source
                    .read_pages(
                        base + run.start as u64,
                        &mut buf[run.start * PAGE..run.end * PAGE],
                    )
                    .map_err(|error| LayerError::Source {
                        path: path.to_path_buf(),
                        pages: base + run.start as u64..base + run.end as u64,
                        error,
                    })?;
            }
            // Move the non-zero pages together, in page order.
            let mut data = PageMask::EMPTY;
            let mut stored = 0;
            for i in wanted.iter() {
                if is_zero(&buf[i * PAGE..(i + 1) * PAGE]) {
                    continue;
                }
                data.insert(i);
                if stored != i {
                    buf.copy_within(i * PAGE..(i + 1) * PAGE, stored * PAGE);
                }
                stored += 1;
            }
            let present = if has_parent { wanted } else { data };
            finish_frame(path, compress, region, present, data, &buf[..stored * PAGE])
        },
    )
}

/// Runs of wanted pages, joined across gaps of up to [`READ_GAP_PAGES`]: reading a few
/// unwanted pages costs less than another system call.
fn coalesce(runs: impl Iterator<Item = Range<usize>>) -> impl Iterator<Item = Range<usize>> {
    let mut runs = runs.peekable();
    std::iter::from_fn(move || {
        let mut run = runs.next()?;
        while let Some(next) = runs.next_if(|n| n.start - run.end <= READ_GAP_PAGES) {
            run.end = next.end;
        }
        Some(run)
    })
}

/// Compresses a region's data pages into a [`FrameOut`] (`None` if the region holds nothing).
pub(crate) fn finish_frame(
    path: &Path,
    compress: &mut Compress,
    region: u64,
    present: PageMask,
    data: PageMask,
    pages: &[u8],
) -> Result<Option<FrameOut>, LayerError> {
    if present.is_empty() {
        return Ok(None);
    }
    let bytes = if data.is_empty() {
        Vec::new()
    } else {
        compress.compress(pages, path)?
    };
    Ok(Some(FrameOut {
        region,
        present,
        data,
        crc: snap_core::crc32c(&bytes),
        bytes,
    }))
}
