//! Which images a search optimises on, chooses by and reports on: `cwp`'s
//! own protocol, or the authors' code exactly (`--protocol authors`).
//!
//! | | `cwp` (default) | `authors-cifar` | `authors-imagenet` |
//! |---|---|---|---|
//! | search set | seeded 20% of each class, target left out | the same | every test image, target included |
//! | epochs | 5 (1 at 224×224) | 5 | 1 |
//! | canvas choice | on the selection images | the same | the same |
//! | power reported on | other-class images disjoint from the selection images | every image of each other class | every image, target class included |
//! | folder images | shorter side to the model's size, centre crop | the same | shorter side to size·256/224, centre crop (Resize(256), CenterCrop(224)) |
//!
//! `authors` resolves to `authors-imagenet` at 224×224 and larger, to
//! `authors-cifar` below; both explicit forms run at any size.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The search protocol (`--protocol`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// `cwp`: the authors' CIFAR search set and optimisation, with canvas
    /// choice and reported power on disjoint images.
    #[default]
    Cwp,
    /// The authors' CIFAR-10 code: 20% of each class's test images without
    /// the target class, 5 epochs, power on every image of each other class.
    AuthorsCifar,
    /// The authors' ImageNet code: one epoch over every test image, target
    /// class included; power on every image; Resize(256) + CenterCrop(224).
    AuthorsImagenet,
}

impl Protocol {
    /// Parses `--protocol` for a model input `[C, H, W]`: `authors` picks
    /// the authors' protocol of the input's size.
    pub fn parse_for(s: &str, input: [usize; 3]) -> Result<Protocol> {
        match s.trim() {
            "authors" if input[1] * input[2] >= 224 * 224 => Ok(Protocol::AuthorsImagenet),
            "authors" => Ok(Protocol::AuthorsCifar),
            other => other.parse(),
        }
    }

    /// Whether this is one of the authors' protocols.
    pub fn is_authors(self) -> bool {
        self != Protocol::Cwp
    }

    /// Whether the search set holds every test image, the target class's
    /// included (else a seeded share of each other class).
    pub fn searches_all_images(self) -> bool {
        self == Protocol::AuthorsImagenet
    }

    /// Whether the power counts the target class's own images too.
    pub fn power_includes_target(self) -> bool {
        self == Protocol::AuthorsImagenet
    }

    /// Whether the reported power uses images disjoint from those the best
    /// canvas was chosen on.
    pub fn reports_on_held_out_images(self) -> bool {
        self == Protocol::Cwp
    }

    /// The folder-image resize: the shorter side goes to `size * ratio`
    /// before the centre crop (1 for `cwp`, 256/224 as torchvision's
    /// Resize(256) + CenterCrop(224) for the ImageNet protocol).
    pub fn resize_ratio(self) -> f64 {
        match self {
            Protocol::AuthorsImagenet => 256.0 / 224.0,
            _ => 1.0,
        }
    }

    /// Default passes over the search set for an input of `h × w`.
    pub fn default_epochs(self, h: usize, w: usize) -> usize {
        match self {
            Protocol::AuthorsImagenet => 1,
            Protocol::AuthorsCifar => 5,
            Protocol::Cwp if h * w >= 224 * 224 => 1,
            Protocol::Cwp => 5,
        }
    }

    /// Default canvases: the authors pick a test image by hand (index 0 by
    /// default); `cwp` takes the surest test image and a white one.
    pub fn default_canvas(self) -> &'static str {
        if self.is_authors() {
            "test:0"
        } else {
            "auto:1+solid:1"
        }
    }
}

impl FromStr for Protocol {
    type Err = Error;

    fn from_str(s: &str) -> Result<Protocol> {
        match s.trim() {
            "cwp" => Ok(Protocol::Cwp),
            "authors-cifar" => Ok(Protocol::AuthorsCifar),
            "authors-imagenet" => Ok(Protocol::AuthorsImagenet),
            other => Err(Error::arg(
                "--protocol",
                format!("unknown protocol `{other}` (expected cwp, authors, authors-cifar or authors-imagenet)"),
            )),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Cwp => "cwp",
            Protocol::AuthorsCifar => "authors-cifar",
            Protocol::AuthorsImagenet => "authors-imagenet",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authors_means_the_protocol_of_the_input_size() {
        assert_eq!(
            Protocol::parse_for("authors", [3, 224, 224]).unwrap(),
            Protocol::AuthorsImagenet
        );
        assert_eq!(
            Protocol::parse_for("authors", [3, 32, 32]).unwrap(),
            Protocol::AuthorsCifar
        );
        assert_eq!(
            Protocol::parse_for("authors-imagenet", [1, 28, 28]).unwrap(),
            Protocol::AuthorsImagenet
        );
    }

    #[test]
    fn names_round_trip_and_unknown_ones_name_the_option() {
        for p in [
            Protocol::Cwp,
            Protocol::AuthorsCifar,
            Protocol::AuthorsImagenet,
        ] {
            assert_eq!(p.to_string().parse::<Protocol>().unwrap(), p);
        }
        let e = "paper".parse::<Protocol>().unwrap_err().to_string();
        assert!(e.contains("--protocol") && e.contains("paper"), "{e}");
    }

    #[test]
    fn the_imagenet_protocol_resizes_as_resize_256_then_crop_224() {
        assert_eq!(
            (224.0 * Protocol::AuthorsImagenet.resize_ratio()).round(),
            256.0
        );
        assert_eq!(Protocol::Cwp.resize_ratio(), 1.0);
    }
}
