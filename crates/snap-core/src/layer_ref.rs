//! How layer files (memory layers, disk layers) name each other: a child layer names its parent
//! by id and digest, so that a chain whose parent changed is refused.

use std::fmt;

use crate::Id;

/// A layer's digest: BLAKE3 of the content its format defines (for memory layers the index
/// content, for disk layers the block map), never of its parent link, so re-pointing a child
/// after a merge does not change the child's own digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Digest(pub [u8; 32]);

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

/// How a layer names the layer it applies on top of.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ParentRef {
    /// The parent layer's id.
    pub id: Id,
    /// The parent layer's digest.
    pub digest: Digest,
}

impl fmt::Display for ParentRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "layer {} (digest {})", self.id, self.digest)
    }
}
