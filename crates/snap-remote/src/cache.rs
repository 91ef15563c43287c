//! The host's chunk cache: chunks fetched from remotes, kept on local disk (decompressed) up to
//! a bound, shared by every VM the host restores from a remote, least recently used first out.
//!
//! A cached chunk is the file `<dir>/<aa>/<digest>` holding its content. Entries are written to
//! a temporary file and renamed into place; every read checks the content against its name (a
//! damaged or torn file is dropped and fetched again), so the cache needs no fsync and survives
//! anything. What is cached is found again at start (oldest first by modification time).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::chunk::ChunkId;

/// Counters of a cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Reads served from the cache.
    pub hits: u64,
    /// Reads that found nothing (the caller fetches).
    pub misses: u64,
    /// Chunks put.
    pub inserted: u64,
    /// Chunks evicted to stay under the bound.
    pub evicted: u64,
    /// Cached files found damaged (dropped).
    pub damaged: u64,
    /// Bytes held now.
    pub bytes: u64,
    /// Chunks held now.
    pub chunks: u64,
}

struct Index {
    /// Each chunk's size and its last use.
    entries: HashMap<ChunkId, (u64, u64)>,
    /// Last use -> chunk (the oldest first).
    by_use: BTreeMap<u64, ChunkId>,
    clock: u64,
    stats: CacheStats,
}

impl Index {
    fn touch(&mut self, id: ChunkId) {
        self.clock += 1;
        if let Some((_, used)) = self.entries.get_mut(&id) {
            self.by_use.remove(used);
            *used = self.clock;
            self.by_use.insert(self.clock, id);
        }
    }

    fn forget(&mut self, id: &ChunkId) -> Option<u64> {
        let (size, used) = self.entries.remove(id)?;
        self.by_use.remove(&used);
        self.stats.bytes -= size;
        self.stats.chunks -= 1;
        Some(size)
    }
}

/// A bounded on-disk chunk cache (see the module docs).
pub struct ChunkCache {
    dir: PathBuf,
    capacity: u64,
    index: Mutex<Index>,
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCache")
            .field("dir", &self.dir)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl ChunkCache {
    /// The cache in `dir` (created if needed), holding at most `capacity` bytes; what is there
    /// already is indexed (and trimmed to the bound).
    ///
    /// # Errors
    /// The I/O error of creating or reading the directory, naming it.
    pub fn open(dir: &Path, capacity: u64) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut found = Vec::new();
        let read = |d: &Path| std::fs::read_dir(d).map_err(|e| format!("{}: {e}", d.display()));
        for sub in read(dir)?.flatten() {
            if !sub.path().is_dir() {
                continue;
            }
            for f in read(&sub.path())?.flatten() {
                let name = f.file_name().to_string_lossy().to_string();
                let Ok(id) = name.parse::<ChunkId>() else {
                    // A temporary file a crash left.
                    let _ = std::fs::remove_file(f.path());
                    continue;
                };
                if let Ok(meta) = f.metadata() {
                    found.push((meta.modified().ok(), id, meta.len()));
                }
            }
        }
        found.sort();
        let cache = Self {
            dir: dir.to_path_buf(),
            capacity,
            index: Mutex::new(Index {
                entries: HashMap::new(),
                by_use: BTreeMap::new(),
                clock: 0,
                stats: CacheStats::default(),
            }),
        };
        {
            let mut ix = cache.lock();
            for (_, id, size) in found {
                ix.clock += 1;
                let tick = ix.clock;
                ix.entries.insert(id, (size, tick));
                ix.by_use.insert(tick, id);
                ix.stats.bytes += size;
                ix.stats.chunks += 1;
            }
        }
        cache.trim();
        Ok(cache)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_string();
        self.dir.join(&hex[..2]).join(hex)
    }

    /// Whether chunk `id` is cached (its file is not read).
    #[must_use]
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.lock().entries.contains_key(id)
    }

    /// The content of chunk `id` if it is cached (and intact).
    #[must_use]
    pub fn get(&self, id: &ChunkId) -> Option<Vec<u8>> {
        if !self.lock().entries.contains_key(id) {
            self.lock().stats.misses += 1;
            return None;
        }
        let content = std::fs::read(self.path(id)).ok();
        let mut ix = self.lock();
        match content {
            Some(c) if ChunkId::of(&c) == *id => {
                ix.touch(*id);
                ix.stats.hits += 1;
                Some(c)
            }
            other => {
                if other.is_some() {
                    ix.stats.damaged += 1;
                }
                ix.forget(id);
                ix.stats.misses += 1;
                drop(ix);
                let _ = std::fs::remove_file(self.path(id));
                None
            }
        }
    }

    /// Caches `content` as chunk `id` (its digest), evicting the least recently used chunks
    /// beyond the bound. A failure to write only means the chunk is not cached.
    pub fn put(&self, id: &ChunkId, content: &[u8]) {
        if content.len() as u64 > self.capacity || self.lock().entries.contains_key(id) {
            return;
        }
        let path = self.path(id);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&tmp, content))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
            return;
        }
        {
            let mut ix = self.lock();
            ix.clock += 1;
            let tick = ix.clock;
            if ix
                .entries
                .insert(*id, (content.len() as u64, tick))
                .is_none()
            {
                ix.by_use.insert(tick, *id);
                ix.stats.bytes += content.len() as u64;
                ix.stats.chunks += 1;
                ix.stats.inserted += 1;
            }
        }
        self.trim();
    }

    fn trim(&self) {
        loop {
            let victim = {
                let mut ix = self.lock();
                if ix.stats.bytes <= self.capacity {
                    return;
                }
                let Some((_, id)) = ix.by_use.iter().next().map(|(t, id)| (*t, *id)) else {
                    return;
                };
                ix.forget(&id);
                ix.stats.evicted += 1;
                id
            };
            let _ = std::fs::remove_file(self.path(&victim));
        }
    }

    /// The counters so far.
    #[must_use]
    pub fn stats(&self) -> CacheStats {
        self.lock().stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_is_bounded_checked_and_found_again() {
        let dir = tempfile::tempdir().unwrap();
        let chunk = |b: u8| vec![b; 1000];
        let cache = ChunkCache::open(dir.path(), 2500).unwrap();
        let ids: Vec<ChunkId> = (0..3).map(|b| ChunkId::of(&chunk(b))).collect();
        cache.put(&ids[0], &chunk(0));
        cache.put(&ids[1], &chunk(1));
        assert_eq!(cache.get(&ids[0]), Some(chunk(0)), "a hit");
        cache.put(&ids[2], &chunk(2));
        assert_eq!(cache.get(&ids[1]), None, "the least recently used went");
        assert_eq!(cache.get(&ids[0]), Some(chunk(0)));
        let s = cache.stats();
        assert_eq!((s.chunks, s.bytes, s.evicted, s.hits), (2, 2000, 1, 2));

        // A damaged file is dropped, not served.
        std::fs::write(cache.path(&ids[2]), b"other bytes").unwrap();
        assert_eq!(cache.get(&ids[2]), None);
        assert_eq!(cache.stats().damaged, 1);

        // Reopened: what is there is found again, within a smaller bound.
        drop(cache);
        let again = ChunkCache::open(dir.path(), 1500).unwrap();
        assert_eq!(again.stats().chunks, 1);
        assert_eq!(again.get(&ids[0]), Some(chunk(0)));
    }
}
