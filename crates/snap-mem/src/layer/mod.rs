//! Memory layers: full and diff snapshots of guest memory as chains of compressed, checked files.
//!
//! A snapshot's memory is a chain of layers: a full layer for the first snapshot, then diff
//! layers holding only the pages dirtied since the parent snapshot. Pages are numbered by
//! memory offset (`page = offset / 4096`), not by guest physical address.
//!
//! # Frames
//!
//! Guest memory is cut into aligned regions of the frame size `F` (a power of two, 64 KiB to
//! 2 MiB, default 256 KiB): region `r` covers pages `r*F/4096 .. (r+1)*F/4096`. A frame holds
//! the non-zero pages of one region that are in the layer, concatenated in page order and
//! compressed with zstd on their own. Zero pages are never stored: in a layer with a parent a
//! zero page is a *zero entry* (present, no data), which overrides the parent; in a layer
//! without a parent it is left out (absent means zero). A region whose present pages are all
//! zero entries has no frame bytes.
//!
//! # File layout
//!
//! All integers little endian.
//!
//! | offset         | size        | what                                                                  |
//! |---------------:|------------:|-----------------------------------------------------------------------|
//! | 0              | 32          | snap-core header, magic `SNAPMLAY`, payload = the superblock          |
//! | 32             | 8           | superblock: frames offset (4096)                                      |
//! | 40             | 8           | superblock: frames length                                             |
//! | 48             | 8           | superblock: index offset (= 4096 + frames length)                     |
//! | 56             | 8           | superblock: index length (header included)                           |
//! | 64             | 8           | superblock: file length (= index offset + index length)              |
//! | 72             | 4           | superblock: page size (4096)                                          |
//! | 76             | 20          | superblock: reserved, zero                                            |
//! | 96             | 4000        | zero (a hole)                                                         |
//! | 4096           | frames len  | frames, packed in region order                                        |
//! | index offset   | index len   | index section: snap-core blob, magic `SNAPMIDX`, capped at 1 GiB      |
//!
//! The index payload is postcard: first the *link* `Option<(parent id [u8; 16], parent digest
//! [u8; 32])>`, then the *content*: id `[u8; 16]`, memory bytes `u64`, frame size `u32`, zstd
//! level `i32`, and the frame table by column: regions `Vec<u64>` (strictly increasing), file
//! offsets `Vec<u64>`, compressed lengths `Vec<u32>`, CRC-32C of the compressed bytes
//! `Vec<u32>`, then the present bitmaps and the data bitmaps, `Vec<u64>` each with
//! `max(1, F/4096/64)` words per entry (bit `i % 64` of word `i / 64` is page `i` of the region;
//! data ⊆ present).
//!
//! The writer writes the frames, then the index, then the superblock (only then are the
//! offsets known), into a temporary file in the same directory; fsync, rename, fsync of the
//! directory, so a layer appears complete or not at all.
//!
//! # Digest and parents
//!
//! A layer's [`Digest`] is BLAKE3 of the index *content*, so it covers the id, the memory size
//! and every frame's CRC. A child names its parent by [`ParentRef`] (id and digest). The digest
//! deliberately leaves out the link: re-pointing a layer at a merged parent
//! ([`relink_parent`]) then does not change the layer's own digest, so its children stay valid
//! and a merge never cascades down a chain. Each link is still checked pair by pair, which
//! checks the whole chain.
//!
//! # Checks
//!
//! Readers cap every size they read before allocating (the superblock must match the file's
//! length, the index is capped, each frame's length is capped by zstd's bound for `F` bytes) and
//! check the header, the index checksum, the frame table (regions strictly increasing and inside
//! memory, bitmaps inside the region and memory, data ⊆ present, frames packed inside the
//! frames section), and each frame's CRC before decompressing it, and its decompressed length.
//!
//! # Example
//!
//! ```
//! use snap_core::Id;
//! use snap_mem::GuestMemory;
//! use snap_mem::layer::{LayerChain, LayerOptions, NewLayer, Restore, write_layer};
//!
//! let dir = tempfile::tempdir()?;
//! let memory = GuestMemory::new(1 << 20)?;
//! memory.write_at_offset(3 * 4096, b"first")?;
//! let options = LayerOptions::default();
//! let size = memory.size();
//! let full = NewLayer { id: Id::random(), parent: None, memory_bytes: size };
//! let base = write_layer(&dir.path().join("0"), &full, 0..size / 4096, &memory, &options)?;
//!
//! memory.write_at_offset(3 * 4096, b"again")?;
//! let diff = NewLayer { id: Id::random(), parent: Some(base.as_parent()), memory_bytes: size };
//! write_layer(&dir.path().join("1"), &diff, [3], &memory, &options)?;
//!
//! let chain = LayerChain::open(&[dir.path().join("0"), dir.path().join("1")])?;
//! let restored = GuestMemory::new(size)?;
//! chain.materialize_into(&restored, Restore::Fresh)?;
//! assert_eq!(restored.to_vec(), memory.to_vec());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

mod atomic;
mod chain;
mod copy;
mod error;
mod format;
#[cfg(test)]
mod hostile_tests;
mod mask;
mod materialize;
mod merge;
mod meta;
mod page_io;
mod pipeline;
mod reader;
mod table;
mod writer;

pub use chain::LayerChain;
pub use copy::{FrameData, FrameLayout, write_layer_frames};
pub use error::{FrameProblem, LayerError};
pub use materialize::{Restore, RestoreStats, WindowScratch};
pub use merge::{merge_into_child, relink_parent};
pub use meta::{
    DEFAULT_FRAME_SIZE, DEFAULT_ZSTD_LEVEL, Digest, FrameInfo, LayerInfo, LayerOptions,
    MAX_FRAME_SIZE, MAX_MEMORY_BYTES, MIN_FRAME_SIZE, NewLayer, PAGE, PageEntry, ParentRef,
};
pub(crate) use page_io::is_zero;
pub use page_io::{PageSink, PageSource};
pub use reader::Layer;
pub use writer::write_layer;
