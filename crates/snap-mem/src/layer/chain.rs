//! A chain of layers, oldest first: each names the one before it as its parent.

use std::path::Path;

use super::error::LayerError;
use super::meta::{PAGE, PageEntry};
use super::reader::{FrameScratch, Layer};

/// A checked chain of layers, oldest (the full layer) first. Reading a page asks the newest
/// layer that holds it; a page no layer holds is zero.
#[derive(Debug)]
pub struct LayerChain {
    layers: Vec<Layer>,
}

impl LayerChain {
    /// Opens the layers at `paths` (oldest first) and checks that they form a chain.
    ///
    /// # Errors
    /// Any error of [`Layer::open`], or those of [`LayerChain::from_layers`].
    pub fn open<P: AsRef<Path>>(paths: &[P]) -> Result<Self, LayerError> {
        let layers = paths.iter().map(Layer::open).collect::<Result<_, _>>()?;
        Self::from_layers(layers)
    }

    /// Checks that `layers` (oldest first) form a chain: the first has no parent, each other
    /// names the previous layer's id and digest, and all describe the same memory size.
    ///
    /// # Errors
    /// [`LayerError::EmptyChain`], [`LayerError::WrongParent`] naming the file, the expected
    /// and the found parent, or [`LayerError::SizeMismatch`].
    pub fn from_layers(layers: Vec<Layer>) -> Result<Self, LayerError> {
        let first = layers.first().ok_or(LayerError::EmptyChain)?;
        let memory_bytes = first.info().memory_bytes;
        let mut expected = None;
        for layer in &layers {
            let info = layer.info();
            if info.parent != expected {
                return Err(LayerError::WrongParent {
                    path: layer.path().to_path_buf(),
                    expected,
                    found: info.parent,
                });
            }
            if info.memory_bytes != memory_bytes {
                return Err(LayerError::SizeMismatch {
                    path: layer.path().to_path_buf(),
                    expected: memory_bytes,
                    found: info.memory_bytes,
                });
            }
            expected = Some(info.as_parent());
        }
        Ok(Self { layers })
    }

    /// The layers, oldest first.
    #[must_use]
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Gives the layers back, oldest first.
    #[must_use]
    pub fn into_layers(self) -> Vec<Layer> {
        self.layers
    }

    /// The newest layer (the one the chain's snapshot wrote).
    #[must_use]
    pub fn newest(&self) -> &Layer {
        // `from_layers` refuses an empty chain.
        &self.layers[self.layers.len() - 1]
    }

    /// Size of guest memory in bytes.
    #[must_use]
    pub fn memory_bytes(&self) -> u64 {
        self.newest().info().memory_bytes
    }

    /// Which layer (index, oldest first) decides `page`, and its entry there; `None` if no
    /// layer holds it (the page is zero).
    #[must_use]
    pub fn page(&self, page: u64) -> Option<(usize, PageEntry)> {
        self.layers
            .iter()
            .enumerate()
            .rev()
            .find_map(|(i, l)| l.page(page).map(|e| (i, e)))
    }

    /// Copies the content of `page` as the chain's snapshot saw it into `buf`.
    ///
    /// # Errors
    /// [`LayerError::PageOutOfRange`], or a [`LayerError::Frame`] naming the damaged frame.
    pub fn read_page(&self, page: u64, buf: &mut [u8; PAGE]) -> Result<(), LayerError> {
        let pages = self.memory_bytes() / PAGE as u64;
        if page >= pages {
            return Err(LayerError::PageOutOfRange {
                path: self.newest().path().to_path_buf(),
                page,
                pages,
            });
        }
        match self.page(page) {
            None | Some((_, PageEntry::Zero)) => buf.fill(0),
            Some((layer, PageEntry::Data { frame, slot })) => {
                let mut scratch = FrameScratch::default();
                let data = self.layers[layer].load_frame(frame, &mut scratch)?;
                buf.copy_from_slice(&data[slot * PAGE..(slot + 1) * PAGE]);
            }
        }
        Ok(())
    }
}
