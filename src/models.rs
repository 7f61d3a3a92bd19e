//! The default models shipped inside the binary: SmallCNN on Fashion-MNIST
//! in the paper's three settings, trained by `cwp train` with the commands
//! in README.md (each file's metadata records its own command). Embedded so
//! `cwp demo` and the tests work from any directory.

use std::path::Path;

use crate::error::Result;
use crate::weights::{LoadOptions, Model};

/// One shipped model.
#[derive(Clone, Copy, Debug)]
pub struct Shipped {
    /// Short name, also the demo's sub-folder: `natural`, `backdoored`, `adversarial`.
    pub slug: &'static str,
    /// Human title for reports.
    pub title: &'static str,
    /// The file under `models/` it was built from.
    pub file: &'static str,
    /// The safetensors bytes.
    pub bytes: &'static [u8],
}

/// Naturally trained SmallCNN (Fashion-MNIST).
pub const NATURAL: Shipped = Shipped {
    slug: "natural",
    title: "natural",
    file: "models/smallcnn_fmnist_natural.safetensors",
    bytes: include_bytes!("../models/smallcnn_fmnist_natural.safetensors"),
};

/// BadNets-backdoored SmallCNN: a white 3x3 patch at the bottom right
/// (1 pixel from the border) sends any image to class 0 (T-shirt/top).
pub const BACKDOORED: Shipped = Shipped {
    slug: "backdoored",
    title: "backdoored (BadNets, target 0)",
    file: "models/smallcnn_fmnist_badnets.safetensors",
    bytes: include_bytes!("../models/smallcnn_fmnist_badnets.safetensors"),
};

/// Adversarially trained SmallCNN (FGSM with random start, epsilon 0.1).
pub const ADVERSARIAL: Shipped = Shipped {
    slug: "adversarial",
    title: "adversarially trained (eps 0.1)",
    file: "models/smallcnn_fmnist_adversarial.safetensors",
    bytes: include_bytes!("../models/smallcnn_fmnist_adversarial.safetensors"),
};

/// The three, in the paper's order.
pub const ALL: [Shipped; 3] = [NATURAL, BACKDOORED, ADVERSARIAL];

impl Shipped {
    /// Parses the embedded weights.
    pub fn load(&self) -> Result<Model> {
        Model::from_bytes(self.bytes, Path::new(self.file), &LoadOptions::default())
    }

    /// A stable identity of the weights (for resumable runs).
    pub fn id(&self) -> String {
        crate::io::sha256_hex(&[self.bytes])
    }
}
