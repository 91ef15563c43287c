//! Copy-on-write block delta layers for VM disks.
//!
//! A disk is a chain of layer files, oldest first: a base (empty, or a raw image imported with
//! [`import_raw`]) and delta layers. Writes go to the top layer; a read takes each block from
//! the newest layer that holds it (zeros where none does). [`Disk`] is an open chain; it keeps
//! one merged index (block -> layer and slot), so a read through sixteen layers costs what a
//! read through one does. [`Disk::seal`] makes the top read-only and puts a new empty top on it
//! (one commit and one small file, no data copied). [`Disk::merge`], [`merge_into_child`] and
//! [`merge_into_parent`] fold a layer into its neighbour (snapshot delete), [`Disk::flatten`]
//! writes a chain as one base layer, [`Disk::export_raw`] and [`Disk::export_qcow2`] write
//! images, [`check_layer`] checks a file and [`Disk::changed_ranges`] lists what changed between
//! two layers (for backups).
//!
//! # Blocks and slots
//!
//! The disk is cut into blocks of the block size `B` (a power of two, 4 KiB to 2 MiB, default
//! 64 KiB; the last block may be partial). A layer file stores whole blocks in *slots* of `B`
//! bytes: slot `s` is at file offset `8192 + s * B`. Which slot holds which block is the layer's
//! *map*, kept in map chunks, which live in slots too. Reads and writes take any offset and
//! length that are multiples of 512.
//!
//! # File layout
//!
//! All integers little endian.
//!
//! | offset          | size | what                                                              |
//! |----------------:|-----:|-------------------------------------------------------------------|
//! | 0               | 224  | superblock A (even generations), zero-padded to 4096             |
//! | 4096            | 224  | superblock B (odd generations), zero-padded to 4096              |
//! | 8192 + s * B    | B    | slot `s`: a block's data, a map chunk, or free                     |
//!
//! A superblock is a snap-core header (magic `SNAPDLAY`, version 1, CRC-32C of header and
//! payload) and a 192-byte payload: generation `u64`; id `[u8; 16]`; disk bytes `u64`; block
//! size `u32`; flags `u32` (1 sealed, 2 has parent); parent id `[u8; 16]`; parent digest
//! `[u8; 32]`; digest `[u8; 32]` (sealed layers); slots `u64` (the file is at least
//! `8192 + slots * B` bytes); map head slot `u64` (`u64::MAX`: no map); map chunks `u64`; map
//! entries `u64`; 40 reserved zero bytes.
//!
//! A map chunk is a snap-core header (magic `SNAPDMAP`, payload at most `B - 32` bytes) and a
//! payload: generation `u64`; previous chunk's slot `u64` (`u64::MAX`: the chain ends);
//! entry count `u32`; reserved `u32`; then per entry block `u64`, slot `u64`, CRC-32C of the
//! block's data `u32`. The map is the union of the chain from the head, newest first: the first
//! entry met for a block wins. A commit adds one delta chunk (or more, for many blocks); when
//! the chain grows past 16 chunks more than twice a full copy of the map would take, the commit
//! writes a full copy (a checkpoint) that ends the chain instead, so opening costs O(map).
//!
//! # Commits and crash safety
//!
//! The superblock of the highest valid generation is the layer's state; everything it reaches
//! (its map chain and the slots the map names) is never written while it is the newest
//! committed state. A write to the top layer:
//!
//! - of a block the top holds from an earlier commit, or does not hold: writes the whole block
//!   (the rest copied from the layer below) into a *fresh* slot (free, or past the end). The
//!   old slot is not reused before the commit that drops it is durable.
//! - of a block written since the last commit: writes in place. No committed map names that
//!   slot, so a torn in-place write can never be seen.
//!
//! [`Disk::flush`] commits: (1) the new map entries go into fresh chunk slots; (2) `fdatasync`
//! (data and chunks); (3) the superblock of the next generation goes into the other area;
//! (4) `fdatasync`. Only then are superseded slots freed. A crash before (4) completes leaves
//! the previous superblock as the newest valid one (a torn superblock fails its CRC and the other
//! area wins), which names only data written and synced before it; a crash after leaves the new
//! one, whose data and map were synced in (2). A write holds the disk's lock for all its blocks
//! and a commit takes the same lock, so a commit holds all of a write or none of it: every write
//! completed before a flush returned survives, and no write ever appears torn (a write that
//! failed for lack of room may be committed in part, block by block: see below). Slots written
//! but never committed are garbage that opening the layer finds free (the free list is rebuilt
//! from the map, never stored).
//!
//! Creating a layer (a new top, [`import_raw`], [`Disk::flatten`]) writes a temporary file,
//! syncs it, renames it over the destination and syncs the directory. [`Disk::seal`] is one
//! commit that sets the sealed flag and the digest, then creates the new top.
//!
//! # A full filesystem
//!
//! A slot past the ones in use (for data or a map chunk) gets its file space from `fallocate`
//! before anything is written into it, reserved ahead in one extent (an eighth of the file, 2
//! to 32 MiB, just the one slot when the filesystem cannot give more), so a full filesystem or
//! an exceeded quota fails the write that needs the space, not a later `fdatasync` (after which
//! the kernel may have dropped the written pages). A sealing commit gives the space reserved
//! past its last slot back. Where the filesystem has no `fallocate`, writes allocate as they
//! go. The reserved space is named by no superblock, so the order above and what a crash
//! leaves do not change.
//!
//! A failure for lack of room ([`DiskError::io_kind`] says
//! [`StorageFull`](std::io::ErrorKind::StorageFull) or
//! [`QuotaExceeded`](std::io::ErrorKind::QuotaExceeded)) leaves the disk usable:
//!
//! - [`Disk::write_at`]: the block whose fresh slot got no space keeps its old data, and so do
//!   the blocks after it; the blocks before it hold the new data. Each block of the range reads
//!   all old or all new, never anything else, the in-memory map names exactly what the slots
//!   hold, a later flush commits what reads show, and the same write succeeds once there is
//!   room.
//! - [`Disk::flush`] (and the commit of [`Disk::seal`]): no room for the new map chunks means
//!   no superblock was written; the last commit stays the durable state, and the same flush
//!   succeeds once there is room.
//!
//! Any other failure of a write or a flush (an I/O error, a failed `fdatasync`, whose pages
//! the kernel may have dropped) breaks the disk: it refuses writes and flushes with
//! [`DiskError::Broken`] until it is reopened, which shows the last commit.
//!
//! # Digest and parents
//!
//! A layer's [`Digest`], set at seal, is BLAKE3 of its id, geometry and sorted map of
//! `(block, CRC-32C)`: it changes with the content, not with the slots the data sits in, and
//! it leaves out the parent link. A child names its parent by [`ParentRef`] (id and digest);
//! opening a chain checks each pair and recomputes each sealed layer's digest from its map, so
//! a chain whose parent changed is refused. Re-pointing a layer at a merged parent
//! ([`relink_parent`]) does not change its own digest, so a merge never cascades down a chain.
//!
//! # Merges, and the order a caller follows
//!
//! A merge copies blocks into fresh slots of the target file and commits once: the target then
//! holds the merged layer (the child's id, the parent's parent, a new digest) or, after a
//! crash, its old self; the copied slots of an interrupted merge are garbage. No data already
//! in the target is copied. A caller deleting a snapshot stays crash-safe in this order:
//! (1) merge; (2) re-point the children of the merged layer at it ([`relink_parent`], or done
//! by [`Disk::merge`]); (3) record the new chain in the catalog; (4) delete the file the merge
//! made unused. After a crash between (1) and (3), the parent links tell which step was reached.
//!
//! # Checks
//!
//! Readers cap every size before using it: superblock fields are range-checked (geometry, slots
//! at most three per block plus 4096, map head inside the file), the file must be as long as its
//! slots, a chunk's length is capped by its slot before it is read, generations must not rise
//! along the chain, every entry must lie inside the disk and the file and no slot may be used
//! twice. Block data is checked against its CRC by merges, exports, flatten and [`check_layer`],
//! and by reads:
//!
//! - A block of a layer the disk does not write into (every layer below the top, and the top
//!   when it is sealed or the chain was opened read-only) is checked the first time a read
//!   through the open [`Disk`] touches it: the whole block, even when the read wants a part.
//!   A mismatch fails the read with [`DiskError::BlockChecksum`] naming the layer file and the
//!   block, every time, until a write replaces the block (a partial write, which needs the rest
//!   of the block, fails the same way without breaking the disk).
//! - Those layers do not change while open, so a block that passed is not checked again: one
//!   bit per slot, shared by concurrent readers. The last block a thread checked for a partial
//!   read is kept, so reads of the rest of it are served from memory.
//! - Blocks of the writable top are not checked on read: they are being written (their CRC is
//!   computed at commit); [`check_layer`] checks them.
//!
//! # Example
//!
//! ```
//! use snap_disk::{Disk, Geometry, MergeInto};
//! let dir = tempfile::tempdir()?;
//! let path = |n: &str| dir.path().join(n);
//! let disk = Disk::create(&path("0"), Geometry::new(4 << 20))?;
//! disk.write_at(0, &[1u8; 4096])?;
//! let first = disk.seal(&path("1"))?;
//! disk.write_at(512, &[2u8; 512])?;
//! let second = disk.seal(&path("2"))?;
//! assert_eq!(disk.changed_ranges(Some(first.id), second.id)?, vec![0..65536]);
//! // Delete the first snapshot: fold its layer into the second.
//! let outcome = disk.merge(0, MergeInto::Child)?;
//! std::fs::remove_file(&outcome.unused)?;
//! let mut buf = [0u8; 1024];
//! disk.read_at(0, &mut buf)?;
//! assert_eq!((buf[0], buf[512]), (1, 2));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(unsafe_code)]

mod build;
mod check;
mod copy;
mod disk;
mod error;
pub mod fill;
mod format;
#[cfg(test)]
mod hostile_tests;
mod image;
mod layer;
mod merge;
mod meta;
mod qcow2;
// One system call (`fallocate`) that std does not wrap.
#[allow(unsafe_code)]
mod space;

pub use check::{CheckReport, check_layer};
pub use copy::{LayerBlocks, build_sealed_layer};
pub use disk::{Disk, MergeOutcome};
pub use error::DiskError;
pub use image::{create_layer, import_raw, import_raw_file, layer_info};
pub use merge::{MergeInto, merge_into_child, merge_into_parent, relink_parent};
pub use meta::{
    DEFAULT_BLOCK_SIZE, Digest, Geometry, LayerInfo, MAX_BLOCK_SIZE, MAX_DISK_BYTES,
    MIN_BLOCK_SIZE, NewLayer, ParentRef, SECTOR,
};
