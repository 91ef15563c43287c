//! The frame table: one entry per region that holds pages of the layer, stored by column.

use std::ops::Range;

use super::mask::PageMask;
use super::meta::PAGE;

/// One entry of the frame table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FrameRecord {
    /// Region number: the frame covers pages `region * pages_per_frame ..`.
    pub region: u64,
    /// Pages of the region the layer holds.
    pub present: PageMask,
    /// Pages stored with data (a subset of `present`), in page order in the frame.
    pub data: PageMask,
    /// File offset of the compressed bytes.
    pub offset: u64,
    /// Length of the compressed bytes (0 when `data` is empty).
    pub len: u32,
    /// CRC-32C of the compressed bytes.
    pub crc: u32,
}

/// The frame table, by column (compact in memory and in the index).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct FrameTable {
    /// Pages per region.
    pub pages_per_frame: usize,
    /// Bitmap words per entry.
    pub words: usize,
    pub regions: Vec<u64>,
    pub offsets: Vec<u64>,
    pub lens: Vec<u32>,
    pub crcs: Vec<u32>,
    /// `words` words per entry.
    pub present: Vec<u64>,
    /// `words` words per entry.
    pub data: Vec<u64>,
}

impl FrameTable {
    /// An empty table for frames of `frame_size` bytes.
    pub fn new(frame_size: u32) -> Self {
        let pages_per_frame = frame_size as usize / PAGE;
        Self {
            pages_per_frame,
            words: pages_per_frame.div_ceil(64),
            ..Self::default()
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Appends an entry (regions must be pushed in increasing order).
    pub fn push(&mut self, r: &FrameRecord) {
        debug_assert!(self.regions.last().is_none_or(|&last| last < r.region));
        self.regions.push(r.region);
        self.offsets.push(r.offset);
        self.lens.push(r.len);
        self.crcs.push(r.crc);
        self.present.extend_from_slice(r.present.words(self.words));
        self.data.extend_from_slice(r.data.words(self.words));
    }

    /// Entry `i`.
    pub fn get(&self, i: usize) -> FrameRecord {
        let w = i * self.words..(i + 1) * self.words;
        FrameRecord {
            region: self.regions[i],
            present: PageMask::from_words(&self.present[w.clone()]).unwrap_or_default(),
            data: PageMask::from_words(&self.data[w]).unwrap_or_default(),
            offset: self.offsets[i],
            len: self.lens[i],
            crc: self.crcs[i],
        }
    }

    /// The entry for `region`, if the layer holds pages there.
    pub fn find(&self, region: u64) -> Option<usize> {
        self.regions.binary_search(&region).ok()
    }

    /// Index of the first entry whose region is `region` or later.
    pub fn first_from(&self, region: u64) -> usize {
        self.regions.partition_point(|&r| r < region)
    }

    /// The pages of memory that entry `i`'s region covers.
    pub fn pages_of(&self, i: usize) -> Range<u64> {
        let first = self.regions[i] * self.pages_per_frame as u64;
        first..first + self.pages_per_frame as u64
    }

    /// Pages held (zero entries included) and pages stored with data.
    pub fn counts(&self) -> (u64, u64) {
        let ones = |v: &[u64]| v.iter().map(|w| u64::from(w.count_ones())).sum();
        (ones(&self.present), ones(&self.data))
    }
}
