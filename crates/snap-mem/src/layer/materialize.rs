//! Restoring a whole chain into memory: each page's winning layer is decided once, each
//! needed frame is read and decompressed once, on every core.

use std::ops::Range;

use super::chain::LayerChain;
use super::error::LayerError;
use super::mask::PageMask;
use super::meta::PAGE;
use super::page_io::PageSink;
use super::pipeline::ordered_map;
use super::reader::FrameScratch;

/// Pages a restoring thread takes at a time (whole windows of this many pages or more).
const BATCH_PAGES: u64 = 1024;

/// What the target memory holds before a restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restore {
    /// Memory that is all zero (new): pages that are zero in the result are not touched, so
    /// they stay unallocated.
    Fresh,
    /// Memory that holds other data: pages that are zero in the result are zeroed
    /// ([`PageSink::zero_pages`]), data pages are overwritten.
    Used,
}

/// What a restore did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreStats {
    /// Pages written with data.
    pub pages_written: u64,
    /// Pages zeroed (only for [`Restore::Used`]).
    pub pages_zeroed: u64,
    /// Frames read and decompressed.
    pub frames_read: u64,
}

impl RestoreStats {
    fn add(&mut self, o: RestoreStats) {
        self.pages_written += o.pages_written;
        self.pages_zeroed += o.pages_zeroed;
        self.frames_read += o.frames_read;
    }
}

impl LayerChain {
    /// Writes the chain's memory image into `sink` (for example a
    /// [`GuestMemory`](crate::GuestMemory) of the chain's size).
    ///
    /// Memory is taken in windows of the largest frame size in the chain (every frame lies in
    /// one window); within a window each page is decided by the newest layer holding it, and
    /// only frames that win at least one data page are read. Windows are spread over every core.
    ///
    /// # Errors
    /// [`LayerError::MemorySize`] if the target is another size, a [`LayerError::Frame`]
    /// naming a damaged frame, or [`LayerError::Sink`] if the target refuses a write.
    pub fn materialize_into<S: PageSink + ?Sized>(
        &self,
        sink: &S,
        target: Restore,
    ) -> Result<RestoreStats, LayerError> {
        let pages = self.memory_bytes() / PAGE as u64;
        if sink.page_count() != pages {
            return Err(LayerError::MemorySize {
                path: self.newest().path().to_path_buf(),
                what: "target memory",
                layer_bytes: self.memory_bytes(),
                other_bytes: sink.page_count() * PAGE as u64,
            });
        }
        let wp = self
            .layers()
            .iter()
            .map(|l| l.table().pages_per_frame as u64)
            .max()
            .unwrap_or(1);
        // Windows that any layer has a frame in.
        let mut windows: Vec<u64> = self
            .layers()
            .iter()
            .flat_map(|l| {
                let ppf = l.table().pages_per_frame as u64;
                l.table().regions.iter().map(move |r| r * ppf / wp)
            })
            .collect();
        windows.sort_unstable();
        windows.dedup();

        let mut stats = RestoreStats::default();
        if target == Restore::Used {
            // Pages outside every window are absent everywhere: zero them in long runs.
            let mut from = 0;
            for &w in windows.iter().chain(std::iter::once(&pages.div_ceil(wp))) {
                if w * wp > from {
                    zero(sink, from..(w * wp).min(pages), &mut stats)?;
                }
                from = (w + 1) * wp;
            }
        }

        let per_item = (BATCH_PAGES / wp).max(1) as usize;
        let items: Vec<&[u64]> = windows.chunks(per_item).collect();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        ordered_map(
            items.len(),
            threads,
            usize::MAX,
            FrameScratch::default,
            |scratch, i| {
                let mut s = RestoreStats::default();
                for &w in items[i] {
                    self.restore_window(sink, target, w, wp, pages, scratch, &mut s)?;
                }
                Ok(s)
            },
            |_, s| {
                stats.add(s);
                Ok(())
            },
        )?;
        tracing::debug!(
            layers = self.layers().len(),
            pages_written = stats.pages_written,
            pages_zeroed = stats.pages_zeroed,
            frames_read = stats.frames_read,
            "restored memory layer chain"
        );
        Ok(stats)
    }

    /// Pages per window: the largest frame size of the chain, in pages. Every frame of every
    /// layer lies inside one window, so a window is the natural unit of a lazy restore.
    #[must_use]
    pub fn window_pages(&self) -> u64 {
        self.layers()
            .iter()
            .map(|l| l.table().pages_per_frame as u64)
            .max()
            .unwrap_or(1)
    }

    /// Reads window `window` (pages `window * window_pages()` on, clipped to memory) into `buf`
    /// (`window_pages() * 4096` bytes), as the chain says it is: zero where no layer has data.
    /// Returns whether any page holds data. Each needed frame is read once.
    ///
    /// # Errors
    /// A [`LayerError::Frame`] naming a damaged frame.
    pub fn read_window(
        &self,
        window: u64,
        buf: &mut [u8],
        scratch: &mut WindowScratch,
    ) -> Result<bool, LayerError> {
        let wp = self.window_pages();
        let pages = self.memory_bytes() / PAGE as u64;
        assert_eq!(buf.len() as u64, wp * PAGE as u64, "window buffer size");
        buf.fill(0);
        let sink = BufferSink {
            first_page: window * wp,
            buf: std::sync::Mutex::new(buf),
        };
        let mut stats = RestoreStats::default();
        self.restore_window(
            &sink,
            Restore::Fresh,
            window,
            wp,
            pages,
            &mut scratch.0,
            &mut stats,
        )?;
        Ok(stats.pages_written > 0)
    }

    #[allow(clippy::too_many_arguments)]
    fn restore_window<S: PageSink + ?Sized>(
        &self,
        sink: &S,
        target: Restore,
        w: u64,
        wp: u64,
        pages: u64,
        scratch: &mut FrameScratch,
        stats: &mut RestoreStats,
    ) -> Result<(), LayerError> {
        let first_page = w * wp;
        let mut claimed = PageMask::EMPTY;
        let mut written = PageMask::EMPTY;
        for layer in self.layers().iter().rev() {
            let table = layer.table();
            let ppf = table.pages_per_frame as u64;
            let first_region = first_page / ppf;
            let end_region = (first_page + wp) / ppf;
            let mut frame = table.first_from(first_region);
            while frame < table.len() && table.regions[frame] < end_region {
                let f = table.get(frame);
                let off = ((f.region - first_region) * ppf) as usize;
                let won = f.present.shifted_up(off).minus(&claimed);
                claimed = claimed.or(&won);
                let data = f.data.shifted_up(off);
                let take = data.and(&won);
                if !take.is_empty() {
                    let bytes = layer.load_frame(frame, scratch)?;
                    stats.frames_read += 1;
                    for run in take.runs() {
                        let slot = data.rank(run.start);
                        let src = &bytes[slot * PAGE..(slot + run.len()) * PAGE];
                        let at = first_page + run.start as u64;
                        sink.write_pages(at, src)
                            .map_err(|error| LayerError::Sink {
                                pages: at..at + run.len() as u64,
                                error,
                            })?;
                    }
                    stats.pages_written += take.count() as u64;
                    written = written.or(&take);
                }
                frame += 1;
            }
        }
        if target == Restore::Used {
            let in_memory = PageMask::first(wp.min(pages - first_page) as usize);
            for run in in_memory.minus(&written).runs() {
                let at = first_page + run.start as u64;
                zero(sink, at..at + run.len() as u64, stats)?;
            }
        }
        Ok(())
    }
}

/// Reusable buffers for [`LayerChain::read_window`], one per reading thread.
#[derive(Default)]
pub struct WindowScratch(FrameScratch);

/// A window buffer as a restore target.
struct BufferSink<'b> {
    first_page: u64,
    buf: std::sync::Mutex<&'b mut [u8]>,
}

impl PageSink for BufferSink<'_> {
    fn page_count(&self) -> u64 {
        u64::MAX
    }

    fn write_pages(&self, first_page: u64, data: &[u8]) -> std::io::Result<()> {
        let mut buf = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        let at = ((first_page - self.first_page) as usize) * PAGE;
        buf[at..at + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn zero_pages(&self, _first_page: u64, _count: u64) -> std::io::Result<()> {
        Ok(())
    }
}

fn zero<S: PageSink + ?Sized>(
    sink: &S,
    pages: Range<u64>,
    stats: &mut RestoreStats,
) -> Result<(), LayerError> {
    sink.zero_pages(pages.start, pages.end - pages.start)
        .map_err(|error| LayerError::Sink {
            pages: pages.clone(),
            error,
        })?;
    stats.pages_zeroed += pages.end - pages.start;
    Ok(())
}
