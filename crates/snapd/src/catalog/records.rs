//! The rows of the catalog as plain data: VMs, snapshots, layers, request answers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{LayerId, SnapshotId, VmId};

/// The test guest program a VM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct GuestSpec {
    /// Seed of the program's pseudo-random writes.
    pub seed: u64,
    /// Pages of its working set.
    pub working_set_pages: u64,
    /// Words written per tick.
    pub mutations_per_tick: u64,
    /// Ticks before it finishes.
    pub ticks: u64,
    /// Disk sectors written per tick.
    pub disk_sectors_per_tick: u64,
}

/// A VM's state as last recorded (the live state comes from its instance while it has one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmStatus {
    /// Built, guest not started.
    Created,
    /// The guest runs.
    Running,
    /// Paused by a client, by a snapshot left paused, or by a disk that could not be written.
    Paused,
    /// The guest finished its program.
    Finished,
    /// No instance: stopped by a client, or found running when the daemon restarted.
    Stopped,
    /// The guest or the VMM failed.
    Failed,
}

impl VmStatus {
    /// The catalog's text for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Finished => "finished",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
        }
    }

    /// Every state.
    pub const ALL: [Self; 6] = [
        Self::Created,
        Self::Running,
        Self::Paused,
        Self::Finished,
        Self::Stopped,
        Self::Failed,
    ];

    /// From the catalog's text.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// A disk of a VM or snapshot: its name, size and chain of layers (oldest first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// Name within the VM.
    pub name: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Layer ids, oldest first. A VM's last one is its writable top; a snapshot's are sealed.
    pub chain: Vec<LayerId>,
}

/// A VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRecord {
    /// Id.
    pub id: VmId,
    /// Unique name.
    pub name: String,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Its program.
    pub guest: GuestSpec,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Last recorded state.
    pub state: VmStatus,
    /// The snapshot its memory and disks are based on.
    pub current_snapshot: Option<SnapshotId>,
    /// The memory layers its memory is based on (the current snapshot's chain).
    pub mem_chain: Vec<LayerId>,
    /// Its disks.
    pub disks: Vec<DiskRecord>,
    /// Creation time.
    pub created_ms: i64,
    /// Why it failed or paused on its own.
    pub failure: Option<String>,
}

/// A snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// Id.
    pub id: SnapshotId,
    /// Name, unique among the VM's snapshots.
    pub name: String,
    /// The VM it was taken of.
    pub vm_id: VmId,
    /// Its parent snapshot.
    pub parent_id: Option<SnapshotId>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time.
    pub created_ms: i64,
    /// Guest memory in bytes.
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Its program (so that a restore knows what runs).
    pub guest: GuestSpec,
    /// Bytes of the files this snapshot added.
    pub stored_bytes: u64,
    /// How long the VM was paused.
    pub pause_us: u64,
    /// Memory layers, oldest first (the last one is this snapshot's).
    pub mem_chain: Vec<LayerId>,
    /// Disks as of the snapshot (sealed chains).
    pub disks: Vec<DiskRecord>,
}

/// Every layer a memory chain and disk chains name.
fn chain_layers<'a>(mem: &'a [LayerId], disks: &'a [DiskRecord]) -> impl Iterator<Item = LayerId> {
    mem.iter()
        .chain(disks.iter().flat_map(|d| &d.chain))
        .copied()
}

impl VmRecord {
    /// Every layer the VM's memory and disks are made of.
    pub fn layers(&self) -> impl Iterator<Item = LayerId> + '_ {
        chain_layers(&self.mem_chain, &self.disks)
    }

    /// The layers the VM builds on but does not own: its memory chain and its disks' sealed
    /// layers (all but each disk's writable top).
    pub fn base_layers(&self) -> impl Iterator<Item = LayerId> + '_ {
        self.mem_chain.iter().copied().chain(
            self.disks
                .iter()
                .flat_map(|d| &d.chain[..d.chain.len().saturating_sub(1)])
                .copied(),
        )
    }
}

impl SnapshotRecord {
    /// Every layer a restore of the snapshot reads.
    pub fn layers(&self) -> impl Iterator<Item = LayerId> + '_ {
        chain_layers(&self.mem_chain, &self.disks)
    }

    /// The snapshot's own memory layer (the last of its chain).
    pub fn own_layer(&self) -> Option<LayerId> {
        self.mem_chain.last().copied()
    }
}

/// What a layer file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerKind {
    /// Guest memory (snap-mem format).
    Memory,
    /// A disk's blocks (snap-disk format).
    Disk,
}

impl LayerKind {
    /// The catalog's text for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Memory => "mem",
            Self::Disk => "disk",
        }
    }

    /// From the catalog's text.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "mem" => Some(Self::Memory),
            "disk" => Some(Self::Disk),
            _ => None,
        }
    }
}

/// A layer file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRecord {
    /// Id (the id in the layer's header).
    pub id: LayerId,
    /// Memory or disk.
    pub kind: LayerKind,
    /// File name relative to the data directory (made by [`crate::store`]).
    pub file: String,
    /// Bytes on disk.
    pub bytes: u64,
}

/// A stored answer to a client request id.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    /// The RPC.
    pub method: String,
    /// The request without its request id, encoded.
    pub fingerprint: Vec<u8>,
    /// The encoded response.
    pub response: Vec<u8>,
}

/// A disk layer restored from a remote whose blocks are still arriving (see `snap_disk::fill`):
/// where they come from. The row goes once the layer file holds every block (synced), or with
/// the layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FillingRecord {
    /// The layer.
    pub layer: LayerId,
    /// The remote its blocks come from.
    pub remote: String,
    /// What it is, for messages (the snapshot in the remote, the disk and layer).
    pub what: String,
    /// The blocks it holds, increasing.
    pub blocks: Vec<u64>,
    /// The chunk holding each block's data, in the same order.
    pub chunks: Vec<snap_remote::ChunkId>,
}

impl FillingRecord {
    /// The blocks and chunks as stored: per block, its number (u64, little endian) and its
    /// chunk's 32 bytes.
    pub fn encode_blocks(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.blocks.len() * 40);
        for (b, c) in self.blocks.iter().zip(&self.chunks) {
            out.extend_from_slice(&b.to_le_bytes());
            out.extend_from_slice(&c.0);
        }
        out
    }

    /// The blocks and chunks from their stored form, if it is well formed.
    pub fn decode_blocks(bytes: &[u8]) -> Option<(Vec<u64>, Vec<snap_remote::ChunkId>)> {
        if bytes.len() % 40 != 0 {
            return None;
        }
        let mut blocks = Vec::with_capacity(bytes.len() / 40);
        let mut chunks = Vec::with_capacity(bytes.len() / 40);
        for e in bytes.chunks_exact(40) {
            blocks.push(u64::from_le_bytes(e[..8].try_into().ok()?));
            chunks.push(snap_remote::ChunkId(e[8..].try_into().ok()?));
        }
        Some((blocks, chunks))
    }
}
