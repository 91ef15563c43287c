//! Copying a layer elsewhere frame by frame (to a remote store and back): a frame's layout (its
//! region and page bitmaps) and its decompressed data pages are all a copy needs, and a layer
//! is rebuilt from them without a memory to read.

use std::path::Path;

use super::error::LayerError;
use super::mask::PageMask;
use super::meta::{LayerInfo, LayerOptions, NewLayer, PAGE};
use super::reader::Layer;
use super::writer::{Compress, FrameOut, check_new, finish_frame, write_frames};

/// Where one frame of a layer sits and which of its region's pages it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameLayout {
    /// Region number: the frame covers pages `region * F / 4096 ..`.
    pub region: u64,
    /// Pages of the region the layer holds (zero entries included): bit `i % 64` of word
    /// `i / 64` is page `i` of the region; `max(1, F / 4096 / 64)` words.
    pub present: Vec<u64>,
    /// Pages stored with data (a subset of `present`), same shape.
    pub data: Vec<u64>,
}

impl FrameLayout {
    /// Pages stored with data: the frame's data is this many pages long.
    #[must_use]
    pub fn data_pages(&self) -> usize {
        self.data.iter().map(|w| w.count_ones() as usize).sum()
    }
}

/// A frame's data as a copy gives it to [`write_layer_frames`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameData {
    /// The data pages, in page order: the writer compresses them.
    Pages(Vec<u8>),
    /// One zstd frame holding the data pages, as a layer stores it (see
    /// [`Layer::read_frame_with_compressed`]), written as it is. The caller vouches that it
    /// decompresses to `pages_len` bytes (it has checked that, e.g. by the content's digest);
    /// the writer checks the length against the frame's bitmap.
    Compressed {
        /// The zstd frame.
        bytes: Vec<u8>,
        /// The length of the data pages it holds.
        pages_len: usize,
    },
}

impl Layer {
    /// The layout of frame `frame` (see [`FrameLayout`]); its data is
    /// [`read_frame`](Self::read_frame).
    ///
    /// # Panics
    /// If `frame >= frame_count()`.
    #[must_use]
    pub fn frame_layout(&self, frame: usize) -> FrameLayout {
        let table = self.table();
        let f = table.get(frame);
        FrameLayout {
            region: f.region,
            present: f.present.words(table.words).to_vec(),
            data: f.data.words(table.words).to_vec(),
        }
    }
}

/// Writes the layer file `path` holding `frames` (regions strictly increasing), each one's
/// data pages (`data_pages() * 4096` bytes, in page order, or already compressed: see
/// [`FrameData`]) from `fetch`, called on the writer's threads. Written with the same id, parent, options and frames as a layer they were read
/// from, the file has that layer's digest (zstd gives the same bytes for the same input and
/// level), so copies of a chain link like the original.
///
/// # Errors
/// [`LayerError::Options`] for bad options or memory size, [`LayerError::PageList`] for frames
/// out of order, outside memory, with malformed bitmaps (data outside present; in a layer
/// without a parent, a page present without data), or data of the wrong length,
/// [`LayerError::Source`] for `fetch`'s error, and [`LayerError::Io`] for file errors (nothing is
/// left at `path`).
pub fn write_layer_frames(
    path: &Path,
    layer: &NewLayer,
    options: &LayerOptions,
    frames: &[FrameLayout],
    fetch: impl Fn(usize, &FrameLayout) -> std::io::Result<FrameData> + Sync,
) -> Result<LayerInfo, LayerError> {
    check_new(layer, options)?;
    let ppf = options.frame_size as usize / PAGE;
    let words = ppf.div_ceil(64);
    let memory_pages = layer.memory_bytes / PAGE as u64;
    let bad = |problem: String| LayerError::PageList {
        path: path.to_path_buf(),
        problem,
    };
    let mut plans = Vec::with_capacity(frames.len());
    for (i, f) in frames.iter().enumerate() {
        let problem = |what: &str| bad(format!("frame {i} (region {}): {what}", f.region));
        if i > 0 && frames[i - 1].region >= f.region {
            return Err(problem("regions must increase"));
        }
        let (Some(present), Some(data)) = (
            PageMask::from_words(&f.present).filter(|_| f.present.len() == words),
            PageMask::from_words(&f.data).filter(|_| f.data.len() == words),
        ) else {
            return Err(problem(&format!("bitmaps must have {words} words")));
        };
        let in_region = PageMask::first(ppf);
        let first = f.region.saturating_mul(ppf as u64);
        let in_memory =
            PageMask::first(memory_pages.saturating_sub(first).min(ppf as u64) as usize);
        if present.is_empty() || !present.is_subset(&in_region) || !present.is_subset(&in_memory) {
            return Err(problem("no pages, or pages outside its region or memory"));
        }
        if !data.is_subset(&present) {
            return Err(problem("pages with data that are not present"));
        }
        if layer.parent.is_none() && data != present {
            return Err(problem(
                "zero entries in a layer without a parent (absent means zero there)",
            ));
        }
        plans.push((i, present, data));
    }
    write_frames(
        path,
        layer,
        options,
        &plans,
        |(_, present, _)| present.count(),
        || Compress::new(options.zstd_level),
        |compress, &(i, present, data)| {
            let f = &frames[i];
            let pages = (f.region * ppf as u64)..((f.region + 1) * ppf as u64);
            let got = fetch(i, f).map_err(|error| LayerError::Source {
                path: path.to_path_buf(),
                pages: pages.clone(),
                error,
            })?;
            let len = match &got {
                FrameData::Pages(p) => p.len(),
                FrameData::Compressed { pages_len, .. } => *pages_len,
            };
            if len != data.count() * PAGE {
                return Err(bad(format!(
                    "frame {i} (region {}): {len} bytes of data for {} pages",
                    f.region,
                    data.count()
                )));
            }
            match got {
                FrameData::Pages(p) => finish_frame(path, compress, f.region, present, data, &p),
                FrameData::Compressed { bytes, .. } => Ok(Some(FrameOut {
                    region: f.region,
                    present,
                    data,
                    crc: snap_core::crc32c(&bytes),
                    bytes: if data.is_empty() { Vec::new() } else { bytes },
                })),
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GuestMemory;
    use crate::layer::{LayerChain, Restore, write_layer};
    use snap_core::Id;

    #[test]
    fn a_chain_copied_frame_by_frame_has_the_same_digests_and_memory() {
        let dir = tempfile::tempdir().unwrap();
        let size = 4u64 << 20;
        let memory = GuestMemory::new(size).unwrap();
        for p in [0u64, 1, 70, 500, 1023] {
            memory
                .write_at_offset(p * 4096 + 8, &p.to_le_bytes())
                .unwrap();
        }
        let options = LayerOptions::default();
        let full = NewLayer {
            id: Id::random(),
            parent: None,
            memory_bytes: size,
        };
        let base = write_layer(
            &dir.path().join("0"),
            &full,
            0..size / 4096,
            &memory,
            &options,
        )
        .unwrap();
        memory.write_at_offset(70 * 4096, &[0u8; 4096]).unwrap();
        memory.write_at_offset(600 * 4096, b"new").unwrap();
        let diff = NewLayer {
            id: Id::random(),
            parent: Some(base.as_parent()),
            memory_bytes: size,
        };
        let top = write_layer(
            &dir.path().join("1"),
            &diff,
            [70, 600, 601],
            &memory,
            &options,
        )
        .unwrap();

        let mut parent = None;
        let mut copies = Vec::new();
        for (i, info) in [base, top].iter().enumerate() {
            let src = Layer::open(dir.path().join(i.to_string())).unwrap();
            let frames: Vec<FrameLayout> = (0..src.frame_count())
                .map(|f| src.frame_layout(f))
                .collect();
            let new = NewLayer {
                id: info.id,
                parent,
                memory_bytes: size,
            };
            let out = dir.path().join(format!("copy{i}"));
            // Frames given as pages (recompressed) and as the layer's own compressed bytes make
            // the same layer.
            let made = write_layer_frames(&out, &new, &options, &frames, |f, layout| {
                let data = src.read_frame(f).unwrap();
                assert_eq!(data.len(), layout.data_pages() * PAGE);
                Ok(FrameData::Pages(data))
            })
            .unwrap();
            let as_stored = dir.path().join(format!("stored{i}"));
            let same = write_layer_frames(&as_stored, &new, &options, &frames, |f, _| {
                let (data, bytes) = src.read_frame_with_compressed(f).unwrap();
                Ok(FrameData::Compressed {
                    bytes,
                    pages_len: data.len(),
                })
            })
            .unwrap();
            assert_eq!(same.digest, made.digest);
            assert_eq!(made.digest, info.digest);
            assert_eq!(
                (made.pages_present, made.pages_stored),
                (info.pages_present, info.pages_stored)
            );
            parent = Some(made.as_parent());
            copies.push(out);
        }
        let restored = GuestMemory::new(size).unwrap();
        LayerChain::open(&copies)
            .unwrap()
            .materialize_into(&restored, Restore::Fresh)
            .unwrap();
        assert!(restored.to_vec() == memory.to_vec());
    }

    #[test]
    fn malformed_frames_are_refused_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("x");
        let options = LayerOptions::default();
        let new = NewLayer {
            id: Id::random(),
            parent: None,
            memory_bytes: 1 << 20,
        };
        let frame = |region, present: u64, data: u64| FrameLayout {
            region,
            present: vec![present],
            data: vec![data],
        };
        let page =
            |_: usize, f: &FrameLayout| Ok(FrameData::Pages(vec![1u8; f.data_pages() * PAGE]));
        let cases = [
            (vec![frame(1, 1, 1), frame(0, 1, 1)], "must increase"),
            (vec![frame(4, 1, 1)], "outside"),
            (vec![frame(0, 0, 0)], "no pages"),
            (vec![frame(0, 1, 3)], "not present"),
            (vec![frame(0, 3, 1)], "zero entries"),
            (
                vec![FrameLayout {
                    region: 0,
                    present: vec![1, 0],
                    data: vec![1, 0],
                }],
                "words",
            ),
        ];
        for (frames, want) in cases {
            let e = write_layer_frames(&out, &new, &options, &frames, page).unwrap_err();
            assert!(e.to_string().contains(want), "{want}: {e}");
        }
        let e = write_layer_frames(&out, &new, &options, &[frame(0, 1, 1)], |_, _| {
            Ok(FrameData::Pages(vec![1; 10]))
        })
        .unwrap_err();
        assert!(e.to_string().contains("10 bytes"), "{e}");
        let e = write_layer_frames(&out, &new, &options, &[frame(0, 1, 1)], |_, _| {
            Err(std::io::Error::other("the store is down"))
        })
        .unwrap_err();
        assert!(e.to_string().contains("the store is down"), "{e}");
        assert!(!out.exists());
    }
}
