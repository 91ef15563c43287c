//! What a delete does, decided before it starts, as a pure function of the catalog's rows: which
//! snapshots and VMs go, which layers nothing names afterwards (freed), and which memory layers
//! are merged into their only child so that the pages the child overrides are freed too.
//!
//! The plan is also the delete's footprint (see [`crate::ops::scheduler`]): it writes every
//! snapshot and VM it deletes and every layer it frees or merges, so nothing that reads those
//! runs beside it, and nothing can start building on a layer the delete is about to rewrite.
//!
//! A memory layer L of a deleted snapshot is merged into C when, once the deleted rows are gone,
//! every chain that names L continues with the same layer C (nothing is based on L itself), and C
//! ends every chain that names it (C is a leaf: its snapshot's, and those of VMs running from it
//! that have not snapshotted since). The merged file replaces C's (same layer id), L leaves every
//! chain, and both files' space comes back. Merges are planned in order, so deleting a run of
//! snapshots A <- B <- C (keeping C) merges B into C, then A into the result.

use std::collections::{BTreeSet, HashMap};

use crate::catalog::{SnapshotRecord, VmRecord};
use crate::ids::{LayerId, SnapshotId, VmId};

/// One merge: `layer` into its only child `into`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Merge {
    /// The layer that goes (a deleted snapshot's own memory layer).
    pub layer: LayerId,
    /// Its only child, which takes its pages.
    pub into: LayerId,
}

/// What a delete will do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeletePlan {
    /// Snapshots deleted.
    pub snapshots: BTreeSet<SnapshotId>,
    /// VMs deleted.
    pub vms: BTreeSet<VmId>,
    /// Layers nothing names once the plan is carried out (merged layers included).
    pub freed: BTreeSet<LayerId>,
    /// Merges, in the order they are made.
    pub merges: Vec<Merge>,
}

impl DeletePlan {
    /// Every layer the plan frees or rewrites.
    pub fn layers(&self) -> impl Iterator<Item = LayerId> + '_ {
        self.freed
            .iter()
            .copied()
            .chain(self.merges.iter().flat_map(|m| [m.layer, m.into]))
    }
}

/// Plans deleting snapshots `roots` (and their descendants, with `with_descendants`) and VMs
/// `vms`, given every snapshot and VM row and which layers hold memory.
pub fn plan_delete(
    snapshots: &[SnapshotRecord],
    all_vms: &[VmRecord],
    memory_layers: &BTreeSet<LayerId>,
    roots: &[SnapshotId],
    with_descendants: bool,
    vms: &[VmId],
) -> DeletePlan {
    let mut doomed: BTreeSet<SnapshotId> = roots.iter().copied().collect();
    if with_descendants {
        loop {
            let before = doomed.len();
            for s in snapshots {
                if s.parent_id.is_some_and(|p| doomed.contains(&p)) {
                    doomed.insert(s.id);
                }
            }
            if doomed.len() == before {
                break;
            }
        }
    }
    let gone_vms: BTreeSet<VmId> = vms.iter().copied().collect();
    let kept_snapshots = snapshots.iter().filter(|s| !doomed.contains(&s.id));
    let kept_vms = all_vms.iter().filter(|v| !gone_vms.contains(&v.id));
    // The memory chains that remain, which merges edit as they are planned.
    let mut chains: Vec<Vec<LayerId>> = kept_snapshots
        .clone()
        .map(|s| s.mem_chain.clone())
        .chain(kept_vms.clone().map(|v| v.mem_chain.clone()))
        .collect();
    let mut candidates: Vec<LayerId> = snapshots
        .iter()
        .filter(|s| doomed.contains(&s.id))
        .filter_map(SnapshotRecord::own_layer)
        .filter(|l| memory_layers.contains(l))
        .collect();
    let mut merges = Vec::new();
    loop {
        let found = candidates.iter().enumerate().find_map(|(i, &l)| {
            only_leaf_child(&chains, l)
                .filter(|c| memory_layers.contains(c))
                .map(|c| (i, l, c))
        });
        let Some((i, layer, into)) = found else { break };
        candidates.swap_remove(i);
        for chain in &mut chains {
            chain.retain(|l| *l != layer);
        }
        merges.push(Merge { layer, into });
    }
    let named: BTreeSet<LayerId> = chains
        .iter()
        .flatten()
        .copied()
        .chain(kept_snapshots.flat_map(|s| s.disks.iter().flat_map(|d| d.chain.clone())))
        .chain(kept_vms.flat_map(|v| v.disks.iter().flat_map(|d| d.chain.clone())))
        .collect();
    let freed = snapshots
        .iter()
        .filter(|s| doomed.contains(&s.id))
        .flat_map(|s| s.layers().collect::<Vec<_>>())
        .chain(
            all_vms
                .iter()
                .filter(|v| gone_vms.contains(&v.id))
                .flat_map(|v| v.layers().collect::<Vec<_>>()),
        )
        .filter(|l| !named.contains(l))
        .collect();
    DeletePlan {
        snapshots: doomed,
        vms: gone_vms,
        freed,
        merges,
    }
}

/// The layer `layer` can be merged into: the one layer that follows it in every chain naming it,
/// if that layer ends every chain naming it. None if some chain ends at `layer`, chains go on
/// differently, or nothing names it.
pub fn only_leaf_child(chains: &[Vec<LayerId>], layer: LayerId) -> Option<LayerId> {
    let mut child = None;
    for chain in chains {
        if let Some(pos) = chain.iter().position(|l| *l == layer) {
            let next = *chain.get(pos + 1)?;
            if child.is_some_and(|c| c != next) {
                return None;
            }
            child = Some(next);
        }
    }
    let child = child?;
    let leaf = chains.iter().all(|chain| {
        chain
            .iter()
            .position(|l| *l == child)
            .is_none_or(|p| p + 1 == chain.len())
    });
    leaf.then_some(child)
}

/// For each surviving snapshot whose parent is deleted: its nearest surviving ancestor.
pub fn reparented(
    snapshots: &[SnapshotRecord],
    doomed: &BTreeSet<SnapshotId>,
) -> Vec<(SnapshotId, Option<SnapshotId>)> {
    let parent_of: HashMap<SnapshotId, Option<SnapshotId>> =
        snapshots.iter().map(|s| (s.id, s.parent_id)).collect();
    snapshots
        .iter()
        .filter(|s| !doomed.contains(&s.id) && s.parent_id.is_some_and(|p| doomed.contains(&p)))
        .map(|s| (s.id, survivor(&parent_of, doomed, s.parent_id)))
        .collect()
}

/// The nearest of `start` and its ancestors that is not deleted.
pub fn survivor(
    parent_of: &HashMap<SnapshotId, Option<SnapshotId>>,
    doomed: &BTreeSet<SnapshotId>,
    start: Option<SnapshotId>,
) -> Option<SnapshotId> {
    let mut at = start;
    // Bounded by the number of snapshots: a loop of parent links (damage) ends here.
    for _ in 0..=parent_of.len() {
        let id = at?;
        if !doomed.contains(&id) {
            return Some(id);
        }
        at = parent_of.get(&id).copied().flatten();
    }
    None
}

#[cfg(test)]
mod tests;
