//! Page bitmaps: one bit per 4 KiB page of guest memory, indexed by memory offset / 4096.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::memory::PAGE_SIZE;

/// A set of pages of guest memory, by page number (memory offset / 4096).
#[derive(Clone, PartialEq, Eq)]
pub struct PageBitmap {
    words: Vec<u64>,
    pages: u64,
}

impl std::fmt::Debug for PageBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PageBitmap({} of {} pages)", self.count(), self.pages)
    }
}

impl PageBitmap {
    /// An empty set over `pages` pages.
    pub fn new(pages: u64) -> Self {
        Self {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    /// An empty set over guest memory of `bytes` bytes.
    pub fn for_memory(bytes: u64) -> Self {
        Self::new(bytes.div_ceil(PAGE_SIZE))
    }

    /// Number of pages the set ranges over.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Adds page `page`.
    ///
    /// # Panics
    /// If `page` is outside the bitmap.
    pub fn set(&mut self, page: u64) {
        assert!(
            page < self.pages,
            "page {page} outside a bitmap of {} pages",
            self.pages
        );
        self.words[(page / 64) as usize] |= 1 << (page % 64);
    }

    /// Adds `n` pages starting at `first`.
    ///
    /// # Panics
    /// If the range reaches outside the bitmap.
    pub fn set_range(&mut self, first: u64, n: u64) {
        let end = first + n;
        assert!(
            end <= self.pages,
            "pages {first}..{end} outside a bitmap of {} pages",
            self.pages
        );
        let mut p = first;
        while p < end {
            let bit = p % 64;
            let take = (64 - bit).min(end - p);
            let mask = if take == 64 {
                u64::MAX
            } else {
                ((1u64 << take) - 1) << bit
            };
            self.words[(p / 64) as usize] |= mask;
            p += take;
        }
    }

    /// Whether page `page` is in the set.
    pub fn contains(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Number of pages in the set.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Adds every page of `other` (which must range over the same pages).
    ///
    /// # Panics
    /// If the bitmaps range over different numbers of pages.
    pub fn union_with(&mut self, other: &PageBitmap) {
        assert_eq!(self.pages, other.pages, "bitmaps of different sizes");
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// Removes every page of `other` (which must range over the same pages).
    ///
    /// # Panics
    /// If the bitmaps range over different numbers of pages.
    pub fn remove_all(&mut self, other: &PageBitmap) {
        assert_eq!(self.pages, other.pages, "bitmaps of different sizes");
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !b;
        }
    }

    /// ORs `bits` (one bit per page, LSB first, as KVM_GET_DIRTY_LOG returns them) into the set
    /// starting at page `first`.
    pub fn or_bits(&mut self, first: u64, bits: &[u64]) {
        if first % 64 == 0 {
            let base = (first / 64) as usize;
            for (i, &w) in bits.iter().enumerate() {
                if w != 0 {
                    self.words[base + i] |= w;
                }
            }
            return;
        }
        for (i, &w) in bits.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let b = u64::from(w.trailing_zeros());
                self.set(first + i as u64 * 64 + b);
                w &= w - 1;
            }
        }
    }

    /// Removes every page.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// The pages in the set, in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = u64::from(w.trailing_zeros());
                w &= w - 1;
                Some(i as u64 * 64 + b)
            })
        })
    }
}

/// Pages the VMM itself wrote into guest memory (loaders, devices): set lock-free from any thread,
/// taken as a whole at harvest time. A summary level (one bit per word) keeps taking cheap when
/// few pages were written, however large memory is.
pub struct AtomicPageBitmap {
    words: Vec<AtomicU64>,
    summary: Vec<AtomicU64>,
    pages: u64,
}

impl AtomicPageBitmap {
    /// An empty set over `pages` pages.
    pub fn new(pages: u64) -> Self {
        let words = pages.div_ceil(64);
        Self {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            summary: (0..words.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    /// Marks every page that `[offset, offset + len)` (bytes of memory) touches.
    pub fn mark_bytes(&self, offset: u64, len: u64) {
        if len == 0 || self.pages == 0 {
            return;
        }
        let first = offset / PAGE_SIZE;
        let last = ((offset + len - 1) / PAGE_SIZE).min(self.pages - 1);
        for p in first..=last {
            let w = p / 64;
            self.words[w as usize].fetch_or(1 << (p % 64), Ordering::Relaxed);
            self.summary[(w / 64) as usize].fetch_or(1 << (w % 64), Ordering::Release);
        }
    }

    /// Moves every marked page into `into` and clears the marks.
    pub fn take_into(&self, into: &mut PageBitmap) {
        for (s, sw) in self.summary.iter().enumerate() {
            // A mark sets its word before its summary bit, so a word whose summary bit was seen
            // holds its marks; one marked after the swap below keeps its summary bit for later.
            let mut words = sw.swap(0, Ordering::Acquire);
            while words != 0 {
                let w = s * 64 + words.trailing_zeros() as usize;
                words &= words - 1;
                into.words[w] |= self.words[w].swap(0, Ordering::Relaxed);
            }
        }
    }

    /// Clears every mark.
    pub fn clear(&self) {
        let mut scratch = PageBitmap::new(self.pages);
        self.take_into(&mut scratch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_iter_union_and_bits() {
        let mut a = PageBitmap::new(200);
        a.set(0);
        a.set(63);
        a.set(64);
        a.set(199);
        assert_eq!(a.iter().collect::<Vec<_>>(), vec![0, 63, 64, 199]);
        let mut b = PageBitmap::new(200);
        b.or_bits(65, &[0b101]);
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![65, 67]);
        b.or_bits(128, &[1 << 5]);
        let mut r = PageBitmap::new(200);
        r.set_range(60, 70);
        assert_eq!(r.iter().collect::<Vec<_>>(), (60..130).collect::<Vec<_>>());
        r.set_range(199, 1);
        assert_eq!(r.count(), 71);
        a.union_with(&b);
        assert_eq!(a.count(), 7);
        assert!(a.contains(133) && !a.contains(134) && !a.contains(1000));
    }

    #[test]
    fn atomic_marks_cover_touched_pages() {
        let m = AtomicPageBitmap::new(10);
        m.mark_bytes(4095, 2);
        m.mark_bytes(9 * 4096, 4096);
        let mut into = PageBitmap::new(10);
        m.take_into(&mut into);
        assert_eq!(into.iter().collect::<Vec<_>>(), vec![0, 1, 9]);
        let mut again = PageBitmap::new(10);
        m.take_into(&mut again);
        assert!(again.is_empty());
    }
}
