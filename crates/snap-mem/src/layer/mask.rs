//! Bitmaps of the pages of one region (a frame's worth of guest memory).

/// Largest number of pages in one region (2 MiB frames).
pub const MAX_REGION_PAGES: usize = 512;
const WORDS: usize = MAX_REGION_PAGES / 64;

/// A set of pages within one region, as a bitmap indexed by page number relative to the region.
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct PageMask([u64; WORDS]);

impl std::fmt::Debug for PageMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl PageMask {
    /// The empty set.
    pub const EMPTY: PageMask = PageMask([0; WORDS]);

    /// The set of the first `n` pages (`n <= 512`).
    #[must_use]
    pub fn first(n: usize) -> Self {
        debug_assert!(n <= MAX_REGION_PAGES);
        let mut m = Self::EMPTY;
        for (i, w) in m.0.iter_mut().enumerate() {
            let lo = i * 64;
            if n >= lo + 64 {
                *w = u64::MAX;
            } else if n > lo {
                *w = (1u64 << (n - lo)) - 1;
            }
        }
        m
    }

    /// Builds a mask from its first `words.len()` 64-bit words (page `i` is bit `i % 64` of word
    /// `i / 64`); returns `None` if there are more than 8 words.
    #[must_use]
    pub fn from_words(words: &[u64]) -> Option<Self> {
        let mut m = Self::EMPTY;
        m.0.get_mut(..words.len())?.copy_from_slice(words);
        Some(m)
    }

    /// The first `n` words of the bitmap.
    #[must_use]
    pub fn words(&self, n: usize) -> &[u64] {
        &self.0[..n]
    }

    /// Adds page `i`.
    pub fn insert(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }

    /// Whether page `i` is in the set.
    #[must_use]
    pub fn contains(&self, i: usize) -> bool {
        i < MAX_REGION_PAGES && self.0[i / 64] & (1 << (i % 64)) != 0
    }

    /// Number of pages in the set.
    #[must_use]
    pub fn count(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Number of pages in the set below page `i` (the slot of page `i` among the set's pages).
    #[must_use]
    pub fn rank(&self, i: usize) -> usize {
        let (word, bit) = (i / 64, i % 64);
        let below: usize = self.0[..word].iter().map(|w| w.count_ones() as usize).sum();
        below + (self.0[word] & ((1u64 << bit) - 1)).count_ones() as usize
    }

    /// Whether the set is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    /// Pages in both sets.
    #[must_use]
    pub fn and(&self, other: &Self) -> Self {
        Self(std::array::from_fn(|i| self.0[i] & other.0[i]))
    }

    /// Pages in either set.
    #[must_use]
    pub fn or(&self, other: &Self) -> Self {
        Self(std::array::from_fn(|i| self.0[i] | other.0[i]))
    }

    /// Pages in `self` but not in `other`.
    #[must_use]
    pub fn minus(&self, other: &Self) -> Self {
        Self(std::array::from_fn(|i| self.0[i] & !other.0[i]))
    }

    /// Whether every page of `self` is in `other`.
    #[must_use]
    pub fn is_subset(&self, other: &Self) -> bool {
        self.minus(other).is_empty()
    }

    /// The set moved up by `by` pages (pages pushed past 512 are dropped); places a small
    /// region's mask inside a larger window.
    #[must_use]
    pub fn shifted_up(&self, by: usize) -> Self {
        let (words, bits) = (by / 64, by % 64);
        Self(std::array::from_fn(|i| {
            let Some(src) = i.checked_sub(words) else {
                return 0;
            };
            let low = if bits == 0 || src == 0 {
                0
            } else {
                self.0[src - 1] >> (64 - bits)
            };
            (self.0[src] << bits) | low
        }))
    }

    /// The set moved down by `by` pages (pages below `by` are dropped).
    #[must_use]
    pub fn shifted_down(&self, by: usize) -> Self {
        let (words, bits) = (by / 64, by % 64);
        Self(std::array::from_fn(|i| {
            let src = i + words;
            if src >= WORDS {
                return 0;
            }
            let high = if bits == 0 || src + 1 >= WORDS {
                0
            } else {
                self.0[src + 1] << (64 - bits)
            };
            (self.0[src] >> bits) | high
        }))
    }

    /// The pages of `self` in `start..start + len`, moved down to start at 0.
    #[must_use]
    pub fn slice(&self, start: usize, len: usize) -> Self {
        self.shifted_down(start)
            .and(&Self::first(len.min(MAX_REGION_PAGES)))
    }

    /// The pages in increasing order.
    pub fn iter(self) -> impl Iterator<Item = usize> {
        self.0.into_iter().enumerate().flat_map(|(wi, w)| {
            let mut rest = w;
            std::iter::from_fn(move || {
                if rest == 0 {
                    return None;
                }
                let bit = rest.trailing_zeros() as usize;
                rest &= rest - 1;
                Some(wi * 64 + bit)
            })
        })
    }

    /// Maximal runs of consecutive pages, as `start..end`, in increasing order.
    pub fn runs(self) -> impl Iterator<Item = std::ops::Range<usize>> {
        let mut pages = self.iter().peekable();
        std::iter::from_fn(move || {
            let start = pages.next()?;
            let mut end = start + 1;
            while pages.next_if_eq(&end).is_some() {
                end += 1;
            }
            Some(start..end)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_operations_and_runs() {
        let mut m = PageMask::EMPTY;
        for i in [0, 1, 2, 63, 64, 65, 200, 511] {
            m.insert(i);
        }
        assert_eq!(m.count(), 8);
        assert_eq!(m.rank(64), 4);
        assert_eq!(m.rank(511), 7);
        let runs: Vec<_> = m.runs().collect();
        assert_eq!(runs, vec![0..3, 63..66, 200..201, 511..512]);
        assert_eq!(PageMask::first(65).count(), 65);
        assert!(PageMask::first(3).is_subset(&m));
        assert_eq!(m.slice(63, 3), PageMask::first(3));
        assert_eq!(
            PageMask::first(3).shifted_up(63),
            m.slice(63, 3).shifted_up(63)
        );
        assert_eq!(PageMask::from_words(m.words(2)).unwrap().count(), 6);
        assert!(PageMask::from_words(&[0; 9]).is_none());
        // Shifts agree with moving each page.
        for by in [0, 1, 16, 63, 64, 65, 128, 300, 511] {
            let up: Vec<_> = m.iter().map(|i| i + by).filter(|&i| i < 512).collect();
            assert_eq!(m.shifted_up(by).iter().collect::<Vec<_>>(), up, "up {by}");
            let down: Vec<_> = m.iter().filter(|&i| i >= by).map(|i| i - by).collect();
            assert_eq!(
                m.shifted_down(by).iter().collect::<Vec<_>>(),
                down,
                "down {by}"
            );
        }
    }
}
