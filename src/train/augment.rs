//! Training-time augmentation: random crop with zero padding and horizontal
//! flip, the standard CIFAR recipe.

use rand::{Rng, RngExt};

use crate::error::{Error, Result};

/// Which augmentations to apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Augment {
    /// Zero padding of the random crop (0: no crop).
    pub crop_pad: usize,
    /// Flip left-right with probability 1/2.
    pub flip: bool,
}

impl Augment {
    /// No augmentation.
    pub const NONE: Augment = Augment {
        crop_pad: 0,
        flip: false,
    };

    /// The default for an input shape: crop 4 + flip for 32×32 RGB, none otherwise.
    pub fn default_for(shape: [usize; 3]) -> Augment {
        if shape == [3, 32, 32] {
            Augment {
                crop_pad: 4,
                flip: true,
            }
        } else {
            Augment::NONE
        }
    }

    /// Parses the `--augment` option for inputs of `shape`: `default` (see
    /// [`Augment::default_for`]), `none`, or a comma list of `crop:PAD` and
    /// `flip`.
    pub fn parse(s: &str, shape: [usize; 3]) -> Result<Augment> {
        if s == "default" {
            return Ok(Augment::default_for(shape));
        }
        let mut aug = Augment::NONE;
        if s == "none" {
            return Ok(aug);
        }
        for part in s.split(',') {
            match part.split_once(':') {
                Some(("crop", pad)) => {
                    aug.crop_pad = pad.parse().map_err(|e| {
                        Error::arg("--augment", format!("crop:PAD needs a whole number: {e}"))
                    })?
                }
                None if part == "flip" => aug.flip = true,
                _ => {
                    return Err(Error::arg(
                        "--augment",
                        format!("`{part}` is not default, none, crop:PAD or flip"),
                    ))
                }
            }
        }
        Ok(aug)
    }

    /// Augments one `[C, H, W]` image in place.
    pub fn apply<R: Rng>(&self, img: &mut [f32], shape: [usize; 3], rng: &mut R) {
        let [c, h, w] = shape;
        if self.crop_pad > 0 {
            let p = self.crop_pad as i64;
            let dy = rng.random_range(-p..=p);
            let dx = rng.random_range(-p..=p);
            if dy != 0 || dx != 0 {
                let src = img.to_vec();
                for ch in 0..c {
                    for y in 0..h {
                        for x in 0..w {
                            let (sy, sx) = (y as i64 + dy, x as i64 + dx);
                            let inside = sy >= 0 && sy < h as i64 && sx >= 0 && sx < w as i64;
                            img[(ch * h + y) * w + x] = if inside {
                                src[(ch * h + sy as usize) * w + sx as usize]
                            } else {
                                0.0
                            };
                        }
                    }
                }
            }
        }
        if self.flip && rng.random::<bool>() {
            for row in img.chunks_mut(w) {
                row.reverse();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn augment_option_reads_default_none_and_lists() {
        let rgb = [3, 32, 32];
        assert_eq!(
            Augment::parse("default", rgb).unwrap(),
            Augment::default_for(rgb)
        );
        assert_eq!(
            Augment::parse("default", [1, 28, 28]).unwrap(),
            Augment::NONE
        );
        assert_eq!(Augment::parse("none", rgb).unwrap(), Augment::NONE);
        let a = Augment::parse("crop:2,flip", [1, 28, 28]).unwrap();
        assert_eq!((a.crop_pad, a.flip), (2, true));
        for bad in ["crop:x", "mirror", "crop"] {
            let e = Augment::parse(bad, rgb).unwrap_err().to_string();
            assert!(e.starts_with("option --augment:"), "{e}");
        }
    }
}
