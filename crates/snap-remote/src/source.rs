//! Guest memory straight from a remote: a [`WindowSource`] over a manifest's memory chain, for
//! snap-mem's lazy restore. A window (the chain's largest frame) is composed as a layer chain
//! composes it: each page from the newest layer that holds it (its data, or zero for a zero
//! entry), zero where none does. The chunks it needs come from the host's [`ChunkCache`], else
//! from the remote. A read that follows the one before it in memory's order (the background
//! filler's walk) also starts fetching the chunks of the next windows with data, so the filler
//! finds them arriving; a fault elsewhere fetches only what it needs. A fetched chunk goes into
//! the cache off the reader's path. Every chunk is checked against its name
//! before a byte of it is installed: the guest never runs on memory the store changed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use snap_mem::lazy::WindowSource;
use tokio::runtime::Handle;

use crate::cache::ChunkCache;
use crate::chunk::ChunkId;
use crate::manifest::{Manifest, MemoryFrame};
use crate::store::Remote;

/// A fetch's outcome: the content, or the error's message and whether the store was
/// unreachable.
type Fetch = Shared<BoxFuture<'static, Result<Arc<Vec<u8>>, Arc<(String, bool)>>>>;

/// Windows whose chunks a fetch starts fetching ahead.
const READ_AHEAD: usize = 16;

/// Counters of a remote memory source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemoteMemoryStats {
    /// Windows read.
    pub windows: u64,
    /// Chunks fetched from the remote.
    pub fetched: u64,
    /// Their bytes (decompressed).
    pub fetched_bytes: u64,
    /// Chunks found in the host's cache.
    pub cache_hits: u64,
    /// Chunks a read found already on its way (fetched ahead, or by another reader).
    pub joined: u64,
}

struct LayerFrames {
    pages_per_frame: u64,
    regions: Vec<u64>,
    frames: Vec<MemoryFrame>,
}

/// A manifest's memory, fetched a window at a time (see the module docs).
pub struct RemoteMemory {
    handle: Handle,
    remote: Remote,
    cache: Arc<ChunkCache>,
    what: String,
    memory_bytes: u64,
    window_pages: u64,
    /// Newest first.
    layers: Vec<LayerFrames>,
    with_data: Vec<u64>,
    /// Fetches under way (each removes itself once its chunk is cached).
    inflight: Arc<Mutex<HashMap<ChunkId, Fetch>>>,
    windows: AtomicU64,
    fetched: Arc<AtomicU64>,
    fetched_bytes: Arc<AtomicU64>,
    cache_hits: AtomicU64,
    joined: AtomicU64,
    /// The last window read, to tell a walk through memory (read ahead) from faults (not).
    last_window: AtomicU64,
    /// Set when a fetch failed because the store could not be reached (not a bad chunk).
    unreachable: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for RemoteMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteMemory")
            .field("what", &self.what)
            .field("memory_bytes", &self.memory_bytes)
            .finish_non_exhaustive()
    }
}

impl RemoteMemory {
    /// The memory of `manifest` (checked by its decoder), fetched from `remote` through
    /// `cache`. `what` names the snapshot in errors.
    #[must_use]
    pub fn new(
        handle: Handle,
        remote: Remote,
        cache: Arc<ChunkCache>,
        manifest: &Manifest,
        what: String,
    ) -> Self {
        let window_pages = manifest
            .memory
            .iter()
            .map(|l| u64::from(l.frame_size / 4096))
            .max()
            .unwrap_or(64);
        let layers: Vec<LayerFrames> = manifest
            .memory
            .iter()
            .rev()
            .map(|l| LayerFrames {
                pages_per_frame: u64::from(l.frame_size / 4096),
                regions: l.frames.iter().map(|f| f.region).collect(),
                frames: l.frames.clone(),
            })
            .collect();
        let mut with_data: Vec<u64> = layers
            .iter()
            .flat_map(|l| {
                l.regions
                    .iter()
                    .map(move |r| r * l.pages_per_frame / window_pages)
            })
            .collect();
        with_data.sort_unstable();
        with_data.dedup();
        Self {
            handle,
            remote,
            cache,
            what,
            memory_bytes: manifest.snapshot.memory_bytes,
            window_pages,
            layers,
            with_data,
            inflight: Arc::default(),
            windows: AtomicU64::new(0),
            fetched: Arc::default(),
            fetched_bytes: Arc::default(),
            cache_hits: AtomicU64::new(0),
            joined: AtomicU64::new(0),
            unreachable: std::sync::atomic::AtomicBool::new(false),
            last_window: AtomicU64::new(u64::MAX),
        }
    }

    /// The counters so far.
    #[must_use]
    pub fn stats(&self) -> RemoteMemoryStats {
        RemoteMemoryStats {
            windows: self.windows.load(Ordering::Relaxed),
            fetched: self.fetched.load(Ordering::Relaxed),
            fetched_bytes: self.fetched_bytes.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            joined: self.joined.load(Ordering::Relaxed),
        }
    }

    /// Whether a fetch failed because the store could not be reached (rather than a chunk that
    /// failed its checks).
    #[must_use]
    pub fn store_unreachable(&self) -> bool {
        self.unreachable.load(Ordering::Relaxed)
    }

    /// The chunks window `window` needs.
    fn chunks_of(&self, window: u64) -> Vec<ChunkId> {
        let mut out = Vec::new();
        for l in &self.layers {
            let per = self.window_pages / l.pages_per_frame;
            let first = l.regions.partition_point(|&r| r < window * per);
            for f in &l.frames[first..] {
                if f.region >= (window + 1) * per {
                    break;
                }
                out.extend(f.chunk);
            }
        }
        out
    }

    /// The fetch of `id` under way, or a new one (spawned, so it runs whoever waits).
    fn fetch(&self, id: ChunkId) -> (Fetch, bool) {
        let mut inflight = self
            .inflight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(f) = inflight.get(&id) {
            return (f.clone(), true);
        }
        let (remote, cache) = (self.remote.clone(), Arc::clone(&self.cache));
        let (fetched, bytes) = (Arc::clone(&self.fetched), Arc::clone(&self.fetched_bytes));
        let registry = Arc::clone(&self.inflight);
        let fut: BoxFuture<'static, _> = async move {
            let forget = move || {
                registry
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&id);
            };
            match remote.get_chunk(&id).await {
                Ok(content) => {
                    fetched.fetch_add(1, Ordering::Relaxed);
                    bytes.fetch_add(content.len() as u64, Ordering::Relaxed);
                    let content = Arc::new(content);
                    // Into the cache off the reader's path; under way until it is there.
                    let keep = Arc::clone(&content);
                    tokio::task::spawn_blocking(move || {
                        cache.put(&id, &keep);
                        forget();
                    });
                    Ok(content)
                }
                Err(e) => {
                    // A later read tries again.
                    forget();
                    let unreachable = matches!(e, crate::store::RemoteError::Unavailable { .. });
                    Err(Arc::new((e.to_string(), unreachable)))
                }
            }
        }
        .boxed();
        let shared = fut.shared();
        inflight.insert(id, shared.clone());
        self.handle.spawn(shared.clone());
        (shared, false)
    }

    fn chunk(&self, id: ChunkId) -> Result<Arc<Vec<u8>>, String> {
        if let Some(c) = self.cache.get(&id) {
            self.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Arc::new(c));
        }
        let (fetch, joined) = self.fetch(id);
        if joined {
            self.joined.fetch_add(1, Ordering::Relaxed);
        }
        self.handle.block_on(fetch).map_err(|e| {
            if e.1 {
                self.unreachable.store(true, Ordering::Relaxed);
            }
            format!("{}: {}", self.what, e.0)
        })
    }

    /// Starts fetching the chunks of the windows with data after `window`.
    fn read_ahead(&self, window: u64) {
        let next = self.with_data.partition_point(|&w| w <= window);
        for &w in self.with_data[next..].iter().take(READ_AHEAD) {
            for id in self.chunks_of(w) {
                if !self.cache.contains(&id) {
                    let _started = self.fetch(id);
                }
            }
        }
    }
}

impl WindowSource for RemoteMemory {
    fn memory_bytes(&self) -> u64 {
        self.memory_bytes
    }

    fn window_pages(&self) -> u64 {
        self.window_pages
    }

    fn read_window(
        &self,
        window: u64,
        buf: &mut [u8],
    ) -> Result<bool, Box<dyn std::error::Error + Send + Sync>> {
        self.windows.fetch_add(1, Ordering::Relaxed);
        let first_page = window * self.window_pages;
        let pages = (self.memory_bytes / 4096)
            .saturating_sub(first_page)
            .min(self.window_pages) as usize;
        buf.fill(0);
        // Pages of the window a newer layer already decided.
        let mut decided = vec![false; pages];
        let mut any = false;
        // Read ahead only along a walk through memory (the background filler, which reads the
        // windows with data in order): a fault does not wait behind fetches it did not need.
        let last = self.last_window.swap(window, Ordering::Relaxed);
        let next = self.with_data.partition_point(|&w| w <= last);
        let starts = last == u64::MAX && self.with_data.first() == Some(&window);
        if starts || self.with_data.get(next) == Some(&window) {
            self.read_ahead(window);
        }
        for l in &self.layers {
            let per = self.window_pages / l.pages_per_frame;
            let start = l.regions.partition_point(|&r| r < window * per);
            for f in &l.frames[start..] {
                if f.region >= (window + 1) * per {
                    break;
                }
                let base = (f.region * l.pages_per_frame - first_page) as usize;
                let content = match f.chunk {
                    Some(id) => Some(self.chunk(id)?),
                    None => None,
                };
                let mut slot = 0;
                for i in 0..l.pages_per_frame as usize {
                    let (word, bit) = (i / 64, 1u64 << (i % 64));
                    let present = f.present.get(word).is_some_and(|w| w & bit != 0);
                    let data = f.data.get(word).is_some_and(|w| w & bit != 0);
                    let page = base + i;
                    if data {
                        slot += 1;
                    }
                    if !present || page >= pages || decided[page] {
                        continue;
                    }
                    decided[page] = true;
                    if data {
                        let c = content.as_ref().ok_or("a frame with data has no chunk")?;
                        let src = c.get((slot - 1) * 4096..slot * 4096).ok_or_else(|| {
                            format!("{}: a chunk shorter than its frame", self.what)
                        })?;
                        buf[page * 4096..(page + 1) * 4096].copy_from_slice(src);
                        any = true;
                    }
                }
            }
        }
        Ok(any)
    }

    fn windows_with_data(&self) -> Option<Vec<u64>> {
        Some(self.with_data.clone())
    }
}

/// Counters of a remote disk layer source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemoteBlocksStats {
    /// Blocks fetched from the remote.
    pub fetched: u64,
    /// Blocks found in the host's cache.
    pub cache_hits: u64,
}

/// The blocks of one disk layer of a manifest, fetched one chunk at a time through the host's
/// [`ChunkCache`]: the source of a layer restored from a remote whose blocks arrive on demand
/// (see `snap_disk::fill`). Each chunk is checked against its name when fetched, and the block
/// against the layer's CRC when it lands.
pub struct RemoteBlocks {
    handle: Handle,
    remote: Remote,
    cache: Arc<ChunkCache>,
    what: String,
    blocks: Vec<u64>,
    chunks: Vec<ChunkId>,
    fetched: AtomicU64,
    cache_hits: AtomicU64,
    unreachable: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for RemoteBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteBlocks")
            .field("what", &self.what)
            .field("blocks", &self.blocks.len())
            .finish_non_exhaustive()
    }
}

impl RemoteBlocks {
    /// The blocks `blocks` (increasing) whose data chunk `chunks` names (same order), fetched
    /// from `remote` through `cache`. `what` names the layer and snapshot in errors.
    #[must_use]
    pub fn new(
        handle: Handle,
        remote: Remote,
        cache: Arc<ChunkCache>,
        blocks: Vec<u64>,
        chunks: Vec<ChunkId>,
        what: String,
    ) -> Self {
        Self {
            handle,
            remote,
            cache,
            what,
            blocks,
            chunks,
            fetched: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            unreachable: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The counters so far.
    #[must_use]
    pub fn stats(&self) -> RemoteBlocksStats {
        RemoteBlocksStats {
            fetched: self.fetched.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
        }
    }

    /// Whether a fetch failed because the store could not be reached.
    #[must_use]
    pub fn store_unreachable(&self) -> bool {
        self.unreachable.load(Ordering::Relaxed)
    }
}

impl snap_disk::fill::BlockSource for RemoteBlocks {
    fn fetch(&self, block: u64, buf: &mut [u8]) -> Result<(), String> {
        let i = self
            .blocks
            .binary_search(&block)
            .map_err(|_| format!("{}: the manifest has no block {block}", self.what))?;
        let id = self.chunks[i];
        let content = match self.cache.get(&id) {
            Some(c) => {
                self.cache_hits.fetch_add(1, Ordering::Relaxed);
                c
            }
            None => {
                let c = self
                    .handle
                    .block_on(self.remote.get_chunk(&id))
                    .map_err(|e| {
                        if matches!(e, crate::store::RemoteError::Unavailable { .. }) {
                            self.unreachable.store(true, Ordering::Relaxed);
                        }
                        format!("{}: {e}", self.what)
                    })?;
                self.fetched.fetch_add(1, Ordering::Relaxed);
                self.cache.put(&id, &c);
                c
            }
        };
        if content.len() != buf.len() {
            return Err(format!(
                "{}: chunk {id} of block {block} holds {} bytes, the block {}",
                self.what,
                content.len(),
                buf.len()
            ));
        }
        buf.copy_from_slice(&content);
        Ok(())
    }
}
