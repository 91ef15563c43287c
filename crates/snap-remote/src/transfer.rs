//! Pushing a snapshot's files to a remote and pulling them back, layer by layer.
//!
//! The calls are blocking (a daemon runs them on an operation's thread) and drive the async
//! [`Remote`] through a tokio runtime [`Handle`]: a push reads and hashes each unit (a memory
//! frame's data pages, a disk block, a piece of a state blob) on the calling thread and keeps
//! up to [`Transfer::in_flight`] uploads running; a pull fetches chunks ahead of the layer
//! writer, in the order it consumes them, within the same bound.
//!
//! Progress is reported in bytes of content (what the units hold decompressed), and a
//! `progress` callback that returns `false` stops the transfer ([`TransferError::Cancelled`]).
//! A push writes its manifest last, only after every chunk it names was stored, so a push that
//! fails or is killed leaves no manifest; chunks it stored are reused by the next push (or
//! swept, see [`Remote::sweep`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use snap_core::Id;
use snap_disk::LayerBlocks;
use snap_mem::layer::{FrameData, FrameLayout, Layer, LayerOptions};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use crate::chunk::{ChunkId, MAX_CHUNK};
use crate::manifest::{
    Blob, DiskChain, DiskLayer, Manifest, ManifestId, MemoryFrame, MemoryLayer, SnapshotInfo,
};
use crate::store::{Remote, RemoteError};

/// How a transfer runs.
pub struct Transfer<'a> {
    /// The runtime the remote's calls run on.
    pub handle: &'a Handle,
    /// The remote.
    pub remote: &'a Remote,
    /// Called with the bytes of content each finished unit held (and with 0 before each upload
    /// starts); `false` stops the transfer.
    pub progress: &'a (dyn Fn(u64) -> bool + Sync),
    /// Chunk uploads or downloads running at once.
    pub in_flight: usize,
}

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The remote failed (unreachable, refused, a chunk or manifest that fails its checks).
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// A local file could not be read or written.
    #[error("{0}")]
    Local(String),
    /// The progress callback asked to stop.
    #[error("the transfer was cancelled")]
    Cancelled,
    /// A push ran longer than half the sweep's grace period: its chunks may have been swept,
    /// so it wrote no manifest.
    #[error(
        "the push took {elapsed_ms} ms, over half the remote's grace period ({limit_ms} ms): no manifest was written; push again (chunks already stored are reused)"
    )]
    Expired {
        /// How long it ran.
        elapsed_ms: i64,
        /// Half the grace period.
        limit_ms: i64,
    },
}

/// A disk of a snapshot to push: its name and sealed layer files, oldest first.
#[derive(Debug, Clone)]
pub struct DiskSource {
    /// Its name in the VM.
    pub name: String,
    /// Its layer files, oldest first.
    pub layers: Vec<PathBuf>,
}

/// The files of a snapshot to push.
#[derive(Debug, Clone)]
pub struct PushSource {
    /// What the manifest says about the snapshot.
    pub info: SnapshotInfo,
    /// Its memory layer files, oldest first.
    pub memory: Vec<PathBuf>,
    /// Its disks.
    pub disks: Vec<DiskSource>,
    /// Its state file.
    pub state: PathBuf,
    /// Its working-set file.
    pub working_set: Option<PathBuf>,
}

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushStats {
    /// The manifest written.
    pub manifest: ManifestId,
    /// Chunks the manifest names (each once).
    pub chunks: u64,
    /// Chunks uploaded (new, or renewed because they were old).
    pub uploaded: u64,
    /// Chunks already in the store, not sent.
    pub deduplicated: u64,
    /// Bytes of content pushed (decompressed).
    pub content_bytes: u64,
    /// Bytes of chunk objects sent (compressed).
    pub sent_bytes: u64,
    /// Bytes of the manifest object.
    pub manifest_bytes: u64,
}

fn local(what: impl std::fmt::Display) -> TransferError {
    TransferError::Local(what.to_string())
}

/// Milliseconds since the Unix epoch.
#[must_use]
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Bytes of content a push of `source` reads (for progress totals).
///
/// # Errors
/// A layer or file that cannot be opened.
pub fn push_bytes(source: &PushSource) -> Result<u64, TransferError> {
    let mut total = 0;
    for path in &source.memory {
        total += Layer::open(path).map_err(local)?.info().pages_stored * 4096;
    }
    for d in &source.disks {
        for path in &d.layers {
            let layer = LayerBlocks::open(path).map_err(local)?;
            let g = layer.info().geometry;
            total += layer
                .blocks()
                .iter()
                .map(|&b| g.block_len(b) as u64)
                .sum::<u64>();
        }
    }
    for path in std::iter::once(&source.state).chain(&source.working_set) {
        total += std::fs::metadata(path)
            .map_err(|e| local(format!("{}: {e}", path.display())))?
            .len();
    }
    Ok(total)
}

/// An upload: the chunk's id and the bytes sent.
type Upload = JoinHandle<Result<(ChunkId, u64), RemoteError>>;

/// Uploads running for a push, at most `in_flight` at once.
struct Uploads<'a> {
    t: &'a Transfer<'a>,
    fresh_after_ms: i64,
    /// Each upload with the bytes of content it carries.
    queue: VecDeque<(u64, Upload)>,
    seen: HashSet<ChunkId>,
    stats: PushStats,
}

impl Uploads<'_> {
    /// Queues `content` (unless this push already has it) and returns its id; `zstd` is its
    /// compressed form as a layer stores it, if there is one.
    fn put(&mut self, content: Vec<u8>, zstd: Option<Vec<u8>>) -> Result<ChunkId, TransferError> {
        let id = ChunkId::of(&content);
        let len = content.len() as u64;
        self.stats.content_bytes += len;
        if !self.seen.insert(id) {
            self.stats.deduplicated += 1;
            return self.advance(len).map(|()| id);
        }
        while self.queue.len() >= self.t.in_flight.max(1) {
            self.finish_one()?;
        }
        // A zero-byte report before each upload: the caller may stop the push here.
        self.advance(0)?;
        let remote = self.t.remote.clone();
        let fresh = self.fresh_after_ms;
        let task = self.t.handle.spawn(async move {
            remote
                .put_chunk_with(&content, zstd.as_deref(), fresh)
                .await
        });
        self.queue.push_back((len, task));
        Ok(id)
    }

    fn advance(&self, len: u64) -> Result<(), TransferError> {
        if (self.t.progress)(len) {
            Ok(())
        } else {
            Err(TransferError::Cancelled)
        }
    }

    fn finish_one(&mut self) -> Result<(), TransferError> {
        let Some((len, task)) = self.queue.pop_front() else {
            return Ok(());
        };
        let (_, sent) = self
            .t
            .handle
            .block_on(task)
            .map_err(|e| local(format!("an upload task failed: {e}")))??;
        if sent == 0 {
            self.stats.deduplicated += 1;
        } else {
            self.stats.uploaded += 1;
            self.stats.sent_bytes += sent;
        }
        self.advance(len)
    }

    fn finish_all(&mut self) -> Result<(), TransferError> {
        while !self.queue.is_empty() {
            self.finish_one()?;
        }
        Ok(())
    }

    fn blob(&mut self, path: &Path) -> Result<Blob, TransferError> {
        let bytes = std::fs::read(path).map_err(|e| local(format!("{}: {e}", path.display())))?;
        let mut chunks = Vec::new();
        for piece in bytes.chunks(MAX_CHUNK) {
            chunks.push(self.put(piece.to_vec(), None)?);
        }
        Ok(Blob {
            len: bytes.len() as u64,
            chunks,
        })
    }
}

impl Drop for Uploads<'_> {
    fn drop(&mut self) {
        for (_, task) in &self.queue {
            task.abort();
        }
    }
}

/// Pushes the snapshot `source`: every chunk its chain needs that the store lacks, then its
/// manifest. `grace_ms` is the remote's sweep grace period (see [`Remote::sweep`]): chunks older
/// than half of it are written again rather than reused, and a push that takes longer than half
/// of it writes no manifest.
///
/// # Errors
/// The remote's error, a local file that cannot be read (a damaged layer is named), the
/// cancellation, or [`TransferError::Expired`]. No manifest is written then.
pub fn push(
    t: &Transfer<'_>,
    source: &PushSource,
    grace_ms: i64,
) -> Result<PushStats, TransferError> {
    let started = now_ms();
    let mut up = Uploads {
        t,
        fresh_after_ms: started - grace_ms / 2,
        queue: VecDeque::new(),
        seen: HashSet::new(),
        stats: PushStats {
            manifest: ManifestId([0; 32]),
            chunks: 0,
            uploaded: 0,
            deduplicated: 0,
            content_bytes: 0,
            sent_bytes: 0,
            manifest_bytes: 0,
        },
    };
    let mut memory = Vec::new();
    for path in &source.memory {
        let layer = Layer::open(path).map_err(local)?;
        let mut frames = Vec::with_capacity(layer.frame_count());
        for f in 0..layer.frame_count() {
            let FrameLayout {
                region,
                present,
                data,
            } = layer.frame_layout(f);
            let chunk = if data.iter().any(|&w| w != 0) {
                // The frame's own zstd bytes become the chunk's: nothing is compressed again.
                let (pages, zstd) = layer.read_frame_with_compressed(f).map_err(local)?;
                Some(up.put(pages, Some(zstd))?)
            } else {
                None
            };
            frames.push(MemoryFrame {
                region,
                present,
                data,
                chunk,
            });
        }
        let info = layer.info();
        memory.push(MemoryLayer {
            id: info.id.0,
            digest: info.digest.0,
            frame_size: info.frame_size,
            zstd_level: info.zstd_level,
            frames,
        });
    }
    let mut disks = Vec::new();
    for d in &source.disks {
        let mut chain = DiskChain {
            name: d.name.clone(),
            size_bytes: 0,
            block_size: 0,
            layers: Vec::new(),
        };
        for path in &d.layers {
            let layer = LayerBlocks::open(path).map_err(local)?;
            let info = layer.info();
            (chain.size_bytes, chain.block_size) =
                (info.geometry.disk_bytes, info.geometry.block_size);
            let mut chunks = Vec::with_capacity(layer.blocks().len());
            let mut crcs = Vec::with_capacity(layer.blocks().len());
            for &b in layer.blocks() {
                let data = layer.read_block(b).map_err(local)?;
                crcs.push(snap_core::crc32c(&data));
                chunks.push(up.put(data, None)?);
            }
            chain.layers.push(DiskLayer {
                id: info.id.0,
                digest: info.digest.map(|d| d.0).unwrap_or_default(),
                blocks: layer.blocks().to_vec(),
                chunks,
                crcs,
            });
        }
        disks.push(chain);
    }
    let state = up.blob(&source.state)?;
    let working_set = match &source.working_set {
        Some(path) => Some(up.blob(path)?),
        None => None,
    };
    up.finish_all()?;
    let manifest = Manifest {
        snapshot: source.info.clone(),
        memory,
        disks,
        state,
        working_set,
    };
    let elapsed_ms = now_ms() - started;
    if elapsed_ms > grace_ms / 2 {
        return Err(TransferError::Expired {
            elapsed_ms,
            limit_ms: grace_ms / 2,
        });
    }
    let (id, bytes) = t.handle.block_on(t.remote.put_manifest(&manifest))?;
    let mut stats = up.stats.clone();
    stats.manifest = id;
    stats.manifest_bytes = bytes;
    stats.chunks = manifest.chunks().len() as u64;
    Ok(stats)
}

/// A chunk's content and the zstd frame it was stored as, if it was.
type Parts = (Vec<u8>, Option<Vec<u8>>);

/// Chunks fetched ahead of their consumer, in the order it will ask for them.
struct Prefetch<'a> {
    t: &'a Transfer<'a>,
    ids: Vec<ChunkId>,
    state: Mutex<PrefetchState>,
    /// The first remote error met (a consumer sees it through an I/O error).
    failure: Mutex<Option<RemoteError>>,
    cancelled: AtomicBool,
}

#[derive(Default)]
struct PrefetchState {
    next: usize,
    tasks: HashMap<usize, JoinHandle<Result<Parts, RemoteError>>>,
}

impl<'a> Prefetch<'a> {
    fn new(t: &'a Transfer<'a>, ids: Vec<ChunkId>) -> Self {
        Self {
            t,
            ids,
            state: Mutex::new(PrefetchState::default()),
            failure: Mutex::new(None),
            cancelled: AtomicBool::new(false),
        }
    }

    fn spawn(&self, i: usize) -> JoinHandle<Result<Parts, RemoteError>> {
        let remote = self.t.remote.clone();
        let id = self.ids[i];
        self.t
            .handle
            .spawn(async move { remote.get_chunk_parts(&id).await })
    }

    /// Chunk `i`'s content.
    fn get(&self, i: usize) -> std::io::Result<Vec<u8>> {
        self.get_parts(i).map(|(content, _)| content)
    }

    /// Chunk `i`'s content and the zstd frame it was stored as, if it was.
    fn get_parts(&self, i: usize) -> std::io::Result<Parts> {
        let task = {
            let mut st = self
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let window = self.t.in_flight.max(1);
            while st.next < self.ids.len() && st.next < i + window {
                let n = st.next;
                let task = self.spawn(n);
                st.tasks.insert(n, task);
                st.next += 1;
            }
            st.tasks.remove(&i)
        };
        let task = task.unwrap_or_else(|| self.spawn(i));
        let result = self
            .t
            .handle
            .block_on(task)
            .map_err(|e| std::io::Error::other(format!("a download task failed: {e}")))?;
        match result {
            Ok(parts) => {
                if !(self.t.progress)(parts.0.len() as u64) {
                    self.cancelled.store(true, Ordering::Relaxed);
                    return Err(std::io::Error::other("the transfer was cancelled"));
                }
                Ok(parts)
            }
            Err(e) => {
                let message = e.to_string();
                self.failure
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get_or_insert(e);
                Err(std::io::Error::other(message))
            }
        }
    }

    /// The error to report for a failure that came through the consumer.
    fn explain(&self, other: impl std::fmt::Display) -> TransferError {
        if self.cancelled.load(Ordering::Relaxed) {
            return TransferError::Cancelled;
        }
        match self
            .failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            Some(e) => TransferError::Remote(e),
            None => local(other),
        }
    }
}

impl Drop for Prefetch<'_> {
    fn drop(&mut self) {
        let st = self
            .state
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for task in st.tasks.values() {
            task.abort();
        }
    }
}

/// Writes memory layer `layer` of a manifest whose memory is `memory_bytes` at `out`, as the
/// layer `id` on top of `parent` (the layer pulled before it, `None` for the first), fetching
/// its frames' chunks.
///
/// # Errors
/// The remote's error (a chunk that fails its checks is named), the local file's, or the
/// cancellation. Nothing is left at `out` then.
pub fn pull_memory_layer(
    t: &Transfer<'_>,
    layer: &MemoryLayer,
    memory_bytes: u64,
    id: Id,
    parent: Option<snap_core::ParentRef>,
    out: &Path,
) -> Result<snap_mem::layer::LayerInfo, TransferError> {
    let mut slot = Vec::with_capacity(layer.frames.len());
    let mut ids = Vec::new();
    for f in &layer.frames {
        slot.push(f.chunk.map(|c| {
            ids.push(c);
            ids.len() - 1
        }));
    }
    let frames: Vec<FrameLayout> = layer
        .frames
        .iter()
        .map(|f| FrameLayout {
            region: f.region,
            present: f.present.clone(),
            data: f.data.clone(),
        })
        .collect();
    let fetch = Prefetch::new(t, ids);
    let options = LayerOptions {
        frame_size: layer.frame_size,
        zstd_level: layer.zstd_level,
        ..LayerOptions::default()
    };
    let new = snap_mem::layer::NewLayer {
        id,
        parent,
        memory_bytes,
    };
    // A chunk stored as a zstd frame (pushed from a layer's frame) is written back as the
    // frame, unchanged: nothing is compressed again, and the copy keeps the layer's digest.
    snap_mem::layer::write_layer_frames(out, &new, &options, &frames, |i, _| match slot[i] {
        Some(c) => fetch.get_parts(c).map(|(content, zstd)| match zstd {
            Some(bytes) => FrameData::Compressed {
                bytes,
                pages_len: content.len(),
            },
            None => FrameData::Pages(content),
        }),
        None => Ok(FrameData::Pages(Vec::new())),
    })
    .map_err(|e| fetch.explain(e))
}

/// Writes sealed layer `layer` of disk `disk` at `out`, as the layer `id` on top of `parent`,
/// fetching its blocks' chunks.
///
/// # Errors
/// As [`pull_memory_layer`].
pub fn pull_disk_layer(
    t: &Transfer<'_>,
    disk: &DiskChain,
    layer: &DiskLayer,
    id: Id,
    parent: Option<snap_core::ParentRef>,
    out: &Path,
) -> Result<snap_disk::LayerInfo, TransferError> {
    let fetch = Prefetch::new(t, layer.chunks.clone());
    let new = snap_disk::NewLayer {
        id,
        parent,
        geometry: snap_disk::Geometry {
            disk_bytes: disk.size_bytes,
            block_size: disk.block_size,
        },
    };
    let mut next = 0;
    snap_disk::build_sealed_layer(out, &new, &layer.blocks, |_| {
        next += 1;
        fetch.get(next - 1)
    })
    .map_err(|e| fetch.explain(e))
}

/// Writes `blob` at `out` (atomically: complete or not at all).
///
/// # Errors
/// As [`pull_memory_layer`].
pub fn pull_blob(t: &Transfer<'_>, blob: &Blob, out: &Path) -> Result<(), TransferError> {
    use std::io::Write;
    let fetch = Prefetch::new(t, blob.chunks.clone());
    let io = |e: &dyn std::fmt::Display| local(format!("{}: {e}", out.display()));
    let file = snap_core::AtomicFile::create(out).map_err(|e| io(&e))?;
    let mut written = 0u64;
    for i in 0..blob.chunks.len() {
        let piece = fetch.get(i).map_err(|e| fetch.explain(e))?;
        written += piece.len() as u64;
        let mut f = file.file();
        f.write_all(&piece).map_err(|e| io(&e))?;
    }
    if written != blob.len {
        return Err(io(&format!(
            "{written} bytes fetched, the manifest says {}",
            blob.len
        )));
    }
    file.commit().map_err(|e| io(&e))
}

/// Bytes of content a pull of `manifest` fetches (for progress totals).
#[must_use]
pub fn pull_bytes(manifest: &Manifest) -> u64 {
    let memory: u64 = manifest
        .memory
        .iter()
        .flat_map(|l| &l.frames)
        .map(|f| f.data_pages() * 4096)
        .sum();
    let disks: u64 = manifest
        .disks
        .iter()
        .map(|d| {
            let g = snap_disk::Geometry {
                disk_bytes: d.size_bytes,
                block_size: d.block_size,
            };
            d.layers
                .iter()
                .flat_map(|l| &l.blocks)
                .map(|&b| g.block_len(b) as u64)
                .sum::<u64>()
        })
        .sum();
    let blobs: u64 = std::iter::once(&manifest.state)
        .chain(&manifest.working_set)
        .map(|b| b.len)
        .sum();
    memory + disks + blobs
}
