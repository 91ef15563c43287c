//! Merging a layer with its child or its parent (what deleting a snapshot needs), and
//! re-pointing a layer at a merged parent.

use std::path::Path;

use crate::error::DiskError;
use crate::layer::{Identity, LayerFile};
use crate::meta::{LayerInfo, ParentRef};

/// Which file of a parent/child pair receives the merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeInto {
    /// The parent's blocks the child lacks are copied into the child's file.
    Child,
    /// The child's blocks are copied into the parent's file (cheaper when the child is small).
    Parent,
}

/// Checks that `child` names `parent` and that both have one geometry; returns the identity of
/// the merged layer: the child's id and sealed state, the parent's parent.
pub(crate) fn check_pair(parent: &LayerFile, child: &LayerFile) -> Result<Identity, DiskError> {
    let (p, c) = (parent.info(), child.info());
    let Some(parent_ref) = p.as_parent() else {
        return Err(DiskError::NotSealed {
            path: p.path,
            what: "only a sealed layer can be merged with its child",
        });
    };
    if c.parent != Some(parent_ref) {
        return Err(DiskError::WrongParent {
            path: c.path,
            expected: Some(parent_ref),
            found: c.parent,
        });
    }
    if c.geometry != p.geometry {
        return Err(DiskError::Geometry {
            path: c.path,
            expected_bytes: p.geometry.disk_bytes,
            expected_block: p.geometry.block_size,
            found_bytes: c.geometry.disk_bytes,
            found_block: c.geometry.block_size,
        });
    }
    Ok(Identity {
        id: c.id,
        parent: p.parent,
        sealed: c.sealed(),
    })
}

/// The blocks of `source` to copy into `target`, in order: into a child only those it lacks,
/// into a parent all of them.
pub(crate) fn blocks_to_copy(source: &LayerFile, target: &LayerFile, into: MergeInto) -> Vec<u64> {
    let mut blocks: Vec<u64> = source
        .map()
        .keys()
        .copied()
        .filter(|b| into == MergeInto::Parent || !target.map().contains_key(b))
        .collect();
    blocks.sort_unstable();
    blocks
}

/// Copies `blocks` of `source` into fresh slots of `target` (checking each block's CRC on the
/// way). Nothing is committed: a crash leaves `target` as it was.
pub(crate) fn copy_blocks(
    source: &LayerFile,
    target: &mut LayerFile,
    blocks: &[u64],
) -> Result<(), DiskError> {
    let geometry = source.geometry();
    let mut buf = vec![0u8; geometry.block_size as usize];
    for &block in blocks {
        let data = &mut buf[..geometry.block_len(block)];
        source.read_block_checked(block, data)?;
        target.put_block(block, data)?;
    }
    Ok(())
}

fn merge_files(parent: &Path, child: &Path, into: MergeInto) -> Result<LayerInfo, DiskError> {
    let writable = |p: &Path| LayerFile::open(p, true);
    let readable = |p: &Path| LayerFile::open(p, false);
    let (p, c) = match into {
        MergeInto::Child => (readable(parent)?, writable(child)?),
        MergeInto::Parent => (writable(parent)?, readable(child)?),
    };
    let identity = check_pair(&p, &c)?;
    let (source, mut target) = match into {
        MergeInto::Child => (p, c),
        MergeInto::Parent => (c, p),
    };
    let blocks = blocks_to_copy(&source, &target, into);
    copy_blocks(&source, &mut target, &blocks)?;
    target.commit(identity)?;
    let info = target.info();
    tracing::info!(merged = %info.id, file = %info.path.display(), blocks = blocks.len(), ?into, "disk layers merged");
    Ok(info)
}

/// Merges the sealed layer at `layer` into its child at `child`, in the child's file: the
/// layer's blocks the child lacks are copied in, and one commit makes the child name the layer's
/// parent, with a new digest (same id). Every read through `..., P, child'` then equals the read
/// through `..., P, layer, child`.
///
/// The commit is atomic (the file holds the old child or the merged one, never a mix). A caller
/// stays crash-safe in this order: merge; re-point the child's children at the merged layer
/// with [`relink_parent`]; record the new chain; delete `layer`'s file. After a crash before the
/// record, the chain is found by the parent links (the merged child names `layer`'s parent).
///
/// # Errors
/// [`DiskError::NotSealed`] if `layer` is not sealed, [`DiskError::WrongParent`] if `child` does
/// not name it, [`DiskError::Geometry`], a [`DiskError::BlockChecksum`] for damaged data, or the
/// errors of opening and writing either file.
pub fn merge_into_child(layer: &Path, child: &Path) -> Result<LayerInfo, DiskError> {
    merge_files(layer, child, MergeInto::Child)
}

/// Merges `child` into its sealed parent at `parent`, in the parent's file: the child's blocks
/// are copied in, and one commit gives the file the child's id and sealed state, the parent's
/// parent and a new digest. Cheaper than [`merge_into_child`] when the child is the smaller.
/// Only valid when nothing else reads through the parent (its old content is gone).
///
/// The same order keeps a caller crash-safe: merge; re-point the child's children at the
/// result with [`relink_parent`]; record the new chain; delete `child`'s file.
///
/// # Errors
/// As for [`merge_into_child`].
pub fn merge_into_parent(parent: &Path, child: &Path) -> Result<LayerInfo, DiskError> {
    merge_files(parent, child, MergeInto::Parent)
}

/// Re-points the layer at `path` at a new parent (a merged layer, or a flattened base with the
/// same content), by one atomic commit of its superblock. Its own digest does not change (the
/// digest leaves out the parent link), so its children stay valid.
///
/// # Errors
/// The errors of opening and committing the file.
pub fn relink_parent(path: &Path, parent: Option<ParentRef>) -> Result<LayerInfo, DiskError> {
    let mut layer = LayerFile::open(path, true)?;
    let identity = Identity {
        parent,
        ..layer.identity()
    };
    layer.commit(identity)?;
    Ok(layer.info())
}
