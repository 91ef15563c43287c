//! Merging a layer into its child (what deleting a snapshot needs), and re-pointing a layer
//! at a merged parent.

use std::io::{self, Read, Seek, SeekFrom};
use std::num::NonZeroUsize;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::atomic::TempFile;
use super::error::LayerError;
use super::format::{FRAMES_OFFSET, INDEX_FORMAT, Superblock, join_link, split_link};
use super::mask::PageMask;
use super::meta::{LayerInfo, LayerOptions, NewLayer, PAGE, ParentRef};
use super::reader::{FrameScratch, Layer, read_index_payload};
use super::writer::{Compress, FrameOut, finish_frame, write_frames};

/// One region of the merged layer (in the child's frame size) and the frames it draws on.
struct MergePlan {
    region: u64,
    child: Option<usize>,
    /// Frames of the merged-away layer overlapping the region.
    parent: Vec<usize>,
}

struct MergeWorker {
    compress: Compress,
    scratch: FrameScratch,
    /// The region's pages, uncompacted (page `i` at `i * PAGE`).
    region: Vec<u8>,
    /// The last parent frame decompressed (a parent frame larger than the child's spans
    /// several consecutive plans).
    cached: Option<(usize, Vec<u8>)>,
}

/// Writes `out`: `layer` merged into its child `child`, so that every read through the chain
/// `..., P, out` equals the read through `..., P, layer, child`, where `P` is `layer`'s parent.
///
/// The merged layer keeps `child`'s id, frame size and zstd level, and names `layer`'s parent;
/// without a parent, zero entries are dropped (absent reads as zero). Where a region takes
/// data only from one input with the same frame size, its compressed frame is copied as it is
/// (its CRC checked); otherwise the region is decompressed and compressed again. `out` may be
/// `child`'s own path: the file is replaced atomically. `child`'s children must then be
/// re-pointed at the result with [`relink_parent`] (their own digests do not change).
///
/// # Errors
/// [`LayerError::WrongParent`] if `child` does not name `layer`, [`LayerError::SizeMismatch`],
/// a [`LayerError::Frame`] for damaged input, or the write errors of
/// [`write_layer`](super::write_layer).
pub fn merge_into_child(
    layer: &Layer,
    child: &Layer,
    out: &Path,
    threads: Option<NonZeroUsize>,
) -> Result<LayerInfo, LayerError> {
    let (li, ci) = (layer.info(), child.info());
    if ci.parent != Some(li.as_parent()) {
        return Err(LayerError::WrongParent {
            path: child.path().to_path_buf(),
            expected: Some(li.as_parent()),
            found: ci.parent,
        });
    }
    if ci.memory_bytes != li.memory_bytes {
        return Err(LayerError::SizeMismatch {
            path: child.path().to_path_buf(),
            expected: li.memory_bytes,
            found: ci.memory_bytes,
        });
    }
    let new = NewLayer {
        id: ci.id,
        parent: li.parent,
        memory_bytes: ci.memory_bytes,
    };
    let options = LayerOptions {
        frame_size: ci.frame_size,
        zstd_level: ci.zstd_level,
        threads,
    };
    let (lt, ct) = (layer.table(), child.table());
    let (lppf, cppf) = (lt.pages_per_frame as u64, ct.pages_per_frame as u64);

    // Plans in region order: every child region, and every region a parent frame overlaps.
    let mut plans: Vec<MergePlan> = Vec::new();
    let mut c = 0;
    let mut add = |region: u64, child: Option<usize>, parent: Option<usize>| {
        if plans.last().is_none_or(|p| p.region != region) {
            plans.push(MergePlan {
                region,
                child: None,
                parent: Vec::new(),
            });
        }
        if let Some(p) = plans.last_mut() {
            p.child = p.child.or(child);
            p.parent.extend(parent);
        }
    };
    for lf in 0..lt.len() {
        let first = lt.regions[lf] * lppf;
        for region in first / cppf..(first + lppf).div_ceil(cppf) {
            if project(layer, lf, region, cppf).0.is_empty() {
                continue;
            }
            while c < ct.len() && ct.regions[c] < region {
                add(ct.regions[c], Some(c), None);
                c += 1;
            }
            let here = (c < ct.len() && ct.regions[c] == region).then_some(c);
            add(region, here, Some(lf));
        }
    }
    while c < ct.len() {
        add(ct.regions[c], Some(c), None);
        c += 1;
    }

    let has_parent = new.parent.is_some();
    let path = out;
    write_frames(
        out,
        &new,
        &options,
        &plans,
        |p| {
            p.parent.len() * lppf.min(cppf) as usize
                + usize::from(p.child.is_some()) * cppf as usize
        },
        || MergeWorker {
            compress: Compress::new(options.zstd_level),
            scratch: FrameScratch::default(),
            region: vec![0u8; options.frame_size as usize],
            cached: None,
        },
        |w, plan| merge_region(layer, child, plan, has_parent, w, path),
    )
}

/// The merged-away layer's frame `lf`, moved into child region `region`'s page coordinates.
fn project(layer: &Layer, lf: usize, region: u64, cppf: u64) -> (PageMask, PageMask, usize) {
    let t = layer.table();
    let f = t.get(lf);
    let first = f.region * t.pages_per_frame as u64;
    let start = region * cppf;
    let len = cppf as usize;
    if first >= start {
        // The frame starts inside the region (it may still reach past it).
        let inside = PageMask::first(len);
        let up = (first - start) as usize;
        (
            f.present.shifted_up(up).and(&inside),
            f.data.shifted_up(up).and(&inside),
            0,
        )
    } else {
        let down = (start - first) as usize;
        // Data slots below the region come first in the frame.
        let skipped = f.data.rank(down);
        (f.present.slice(down, len), f.data.slice(down, len), skipped)
    }
}

fn merge_region(
    layer: &Layer,
    child: &Layer,
    plan: &MergePlan,
    has_parent: bool,
    w: &mut MergeWorker,
    path: &Path,
) -> Result<Option<FrameOut>, LayerError> {
    let cppf = child.table().pages_per_frame as u64;
    let cf = plan.child.map(|c| child.table().get(c));
    let (c_present, c_data) =
        cf.map_or((PageMask::EMPTY, PageMask::EMPTY), |f| (f.present, f.data));
    let mut present = c_present;
    let mut data = c_data;
    let mut from_parent = Vec::with_capacity(plan.parent.len());
    for &lf in &plan.parent {
        let (p_present, p_data, skipped) = project(layer, lf, plan.region, cppf);
        let won = p_present.minus(&present);
        present = present.or(&won);
        let take = p_data.and(&won);
        data = data.or(&take);
        from_parent.push((lf, p_data, take, skipped));
    }
    if !has_parent {
        present = data;
    }
    if present.is_empty() {
        return Ok(None);
    }
    // Copy a frame as it is when all the data comes from it unchanged.
    let same_size = layer.table().pages_per_frame as u64 == cppf;
    let verbatim = match (plan.child, from_parent.as_slice()) {
        (Some(c), _) if data == c_data => Some((child, c)),
        (_, [(lf, p_data, take, _)]) if same_size && data == *take && take == p_data => {
            Some((layer, *lf))
        }
        _ => None,
    };
    if let Some((source, frame)) = verbatim {
        let bytes = if data.is_empty() {
            Vec::new()
        } else {
            source.load_compressed(frame, &mut w.scratch)?.to_vec()
        };
        return Ok(Some(FrameOut {
            region: plan.region,
            present,
            data,
            crc: snap_core::crc32c(&bytes),
            bytes,
        }));
    }
    // Gather the data pages uncompacted, then pack them in page order.
    if let Some(c) = plan.child.filter(|_| !c_data.is_empty()) {
        let bytes = child.load_frame(c, &mut w.scratch)?;
        for (slot, i) in c_data.iter().enumerate() {
            w.region[i * PAGE..(i + 1) * PAGE]
                .copy_from_slice(&bytes[slot * PAGE..(slot + 1) * PAGE]);
        }
    }
    for (lf, p_data, take, skipped) in from_parent {
        if take.is_empty() {
            continue;
        }
        if w.cached.as_ref().is_none_or(|(f, _)| *f != lf) {
            let bytes = layer.load_frame(lf, &mut w.scratch)?.to_vec();
            w.cached = Some((lf, bytes));
        }
        let Some((_, bytes)) = &w.cached else {
            continue;
        };
        for i in take.iter() {
            let slot = skipped + p_data.rank(i);
            w.region[i * PAGE..(i + 1) * PAGE]
                .copy_from_slice(&bytes[slot * PAGE..(slot + 1) * PAGE]);
        }
    }
    for (slot, i) in data.iter().enumerate() {
        if slot != i {
            w.region.copy_within(i * PAGE..(i + 1) * PAGE, slot * PAGE);
        }
    }
    let stored = data.count() * PAGE;
    finish_frame(
        path,
        &mut w.compress,
        plan.region,
        present,
        data,
        &w.region[..stored],
    )
}

/// Re-points the layer at `path` at `parent` (after its parent was merged into a new file),
/// and returns its new summary. The layer's own digest does not change (the digest leaves out
/// the parent link), so its children stay valid.
///
/// Crash safe by whole-file replacement: the frames are copied unchanged to a temporary file
/// at the same offsets (with copy_file_range, a reflink where the filesystem has them), a new
/// index with the new link and the old content bytes and a new superblock are written after
/// them, then fsync, rename over `path`, fsync of the directory. A crash leaves the old file or
/// the new one, never a mix; the old file is untouched until the rename.
///
/// # Errors
/// The errors of [`Layer::open`], and [`LayerError::Io`] for the copy.
pub fn relink_parent(path: &Path, parent: Option<ParentRef>) -> Result<LayerInfo, LayerError> {
    let layer = Layer::open(path)?;
    if layer.parent() == parent {
        return Ok(*layer.info());
    }
    let io = |op, error| LayerError::Io {
        path: path.to_path_buf(),
        op,
        error,
    };
    let file = layer.file();
    // Re-read the index to keep its content bytes exactly (and with them the digest).
    let (sb, payload) = read_index_payload(path, file)?;
    let content = split_link(path, &payload)?;
    let new_payload = join_link(parent, content);
    let new_index = INDEX_FORMAT.encode(&new_payload);

    let tmp = TempFile::create(path)?;
    let copy = || -> io::Result<u64> {
        let mut src = file;
        let mut dst = tmp.file();
        src.seek(SeekFrom::Start(FRAMES_OFFSET))?;
        dst.seek(SeekFrom::Start(FRAMES_OFFSET))?;
        io::copy(&mut src.take(sb.frames_len), &mut dst)
    };
    let copied = copy().map_err(|e| io("copy frames", e))?;
    if copied != sb.frames_len {
        return Err(io(
            "copy frames",
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "layer file shrank while copying",
            ),
        ));
    }
    let new_sb = Superblock {
        frames_len: sb.frames_len,
        index_offset: sb.index_offset,
        index_len: new_index.len() as u64,
        file_len: sb.index_offset + new_index.len() as u64,
    };
    tmp.file()
        .write_all_at(&new_index, sb.index_offset)
        .map_err(|e| io("write index", e))?;
    tmp.file()
        .write_all_at(&new_sb.encode(), 0)
        .map_err(|e| io("write superblock", e))?;
    tmp.commit()?;
    tracing::debug!(path = %path.display(), ?parent, "re-pointed memory layer at a new parent");
    Ok(*Layer::open(path)?.info())
}
