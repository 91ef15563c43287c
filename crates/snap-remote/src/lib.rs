//! Snapshots that outlive their host: a remote store of snapshots in S3-compatible object
//! storage, deduplicated by content.
//!
//! # Layout (version 1)
//!
//! Everything lives under one prefix of one bucket (`<prefix>/`), shared by every host that
//! pushes to it:
//!
//! - `<prefix>/v1/chunks/<aa>/<digest>`: a **chunk**, named by the BLAKE3 digest of its content
//!   (64 hex digits; `<aa>` is the first two, so listings can be split). Memory frames, disk
//!   blocks and state blobs are all chunks: the same bytes are stored once however many
//!   snapshots, VMs and hosts push them. A chunk object is a snap-core file ([`chunk::CHUNK`]:
//!   magic `SNAPCHNK`, version, CRC-32C of the header and payload) whose payload is a codec byte
//!   (0: stored as is, 1: zstd) and the encoded content. Every read checks the CRC, decodes with
//!   a bound on the size, and compares the content's digest with the name: a chunk damaged or
//!   overwritten with other bytes is refused, naming it ([`chunk::open`]).
//!
//! - `<prefix>/v1/snapshots/<snapshot id>/<manifest digest>`: a **manifest**, one per pushed
//!   snapshot ([`manifest`]): the snapshot's shape, guest and labels, its memory chain's frame
//!   tables and its disks' block maps as lists of chunks, and its state and working set. Written
//!   only after every chunk it names is stored; its digest is the snapshot's remote identity.
//!
//! Chunks no manifest names are removed by [`Remote::sweep`], which is safe while other hosts
//! push without conditional writes (a grace period; the protocol is in its docs).
//!
//! # Modules
//!
//! - [`chunk`], [`manifest`]: the formats, checked on every read (no I/O; fuzzed);
//! - [`store`]: the S3 client (`object_store`): chunks, manifests, the sweep;
//! - [`transfer`]: push a snapshot's layer files, pull them back layer by layer;
//! - [`source`]: guest memory and disk blocks straight from a manifest, for the lazy restore;
//! - [`cache`]: the host's bounded on-disk chunk cache.
#![forbid(unsafe_code)]

#[cfg(feature = "store")]
pub mod cache;
pub mod chunk;
pub mod manifest;
#[cfg(feature = "store")]
pub mod source;
#[cfg(feature = "store")]
pub mod store;
#[cfg(feature = "store")]
pub mod transfer;

pub use chunk::{ChunkError, ChunkId};
pub use manifest::{Manifest, ManifestError, ManifestId};
#[cfg(feature = "store")]
pub use store::{Credentials, Remote, RemoteError};
