//! Backdoor triggers and all-to-one poisoning.
//!
//! A trigger spec is `KIND[:key=value,...]`:
//! - `badnets:size=3,pos=br,fill=white,margin=1`: a square patch; `pos` is
//!   `br`, `bl`, `tr`, `tl`, `center` or `ROW:COL` (its top-left pixel);
//!   `fill` is `white`, `checker`, `random:SEED` or a PNG path (then `size`
//!   defaults to the PNG's side).
//! - `blend:alpha=0.1,pattern=noise:SEED` or `pattern=PATH.png`: the whole
//!   image blended with a pattern, `x' = (1 - alpha) x + alpha p`.

use std::fmt;
use std::path::PathBuf;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Where a patch sits.
#[derive(Clone, Debug, PartialEq)]
pub enum Position {
    /// Bottom-right corner (BadNets' usual place).
    BottomRight,
    /// Bottom-left corner.
    BottomLeft,
    /// Top-right corner.
    TopRight,
    /// Top-left corner.
    TopLeft,
    /// Centre of the image.
    Center,
    /// Top-left pixel at (row, col).
    At(usize, usize),
}

/// What a patch holds.
#[derive(Clone, Debug, PartialEq)]
pub enum Fill {
    /// All ones.
    White,
    /// Alternating 1 and 0, starting with 1 at the patch's top-left.
    Checker,
    /// Uniform random values from a seed.
    Random(u64),
    /// The pixels of a PNG (converted to the image's channels).
    Png(PathBuf),
}

/// A blend pattern.
#[derive(Clone, Debug, PartialEq)]
pub enum Pattern {
    /// Uniform noise from a seed.
    Noise(u64),
    /// A PNG of the image's size.
    Png(PathBuf),
}

/// A parsed trigger spec (independent of the image shape).
#[derive(Clone, Debug, PartialEq)]
pub enum TriggerSpec {
    /// A BadNets patch.
    Patch {
        /// Side in pixels (None: the PNG's side, or 3).
        size: Option<usize>,
        /// Placement.
        pos: Position,
        /// Distance from the image border for corner placements.
        margin: usize,
        /// Contents.
        fill: Fill,
    },
    /// A blended full-image pattern.
    Blend {
        /// Blend ratio in (0, 1].
        alpha: f32,
        /// The pattern.
        pattern: Pattern,
    },
}

fn bad(spec: &str, msg: impl fmt::Display) -> Error {
    Error::arg("--trigger", format!("`{spec}`: {msg}"))
}

impl std::str::FromStr for TriggerSpec {
    type Err = Error;

    fn from_str(spec: &str) -> Result<TriggerSpec> {
        let (kind, rest) = spec.split_once(':').unwrap_or((spec, ""));
        let mut kv = Vec::new();
        for part in rest.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(spec, format!("`{part}` is not key=value")))?;
            kv.push((k.trim(), v.trim()));
        }
        let num = |v: &str, what: &str| -> Result<usize> {
            v.parse::<usize>()
                .map_err(|_| bad(spec, format!("{what} `{v}` is not a whole number")))
        };
        let seed_of = |v: &str, prefix: &str| -> Result<Option<u64>> {
            match v.strip_prefix(prefix) {
                Some(s) => s
                    .parse::<u64>()
                    .map(Some)
                    .map_err(|_| bad(spec, format!("seed `{s}` is not a whole number"))),
                None => Ok(None),
            }
        };
        match kind {
            "badnets" | "patch" => {
                let (mut size, mut pos, mut margin, mut fill) =
                    (None, Position::BottomRight, 1, Fill::White);
                for (k, v) in kv {
                    match k {
                        "size" => size = Some(num(v, "size")?),
                        "margin" => margin = num(v, "margin")?,
                        "pos" => {
                            pos = match v {
                                "br" | "bottom-right" => Position::BottomRight,
                                "bl" | "bottom-left" => Position::BottomLeft,
                                "tr" | "top-right" => Position::TopRight,
                                "tl" | "top-left" => Position::TopLeft,
                                "center" | "centre" => Position::Center,
                                other => match other.split_once(':') {
                                    Some((r, c)) => Position::At(num(r, "row")?, num(c, "col")?),
                                    None => {
                                        return Err(bad(
                                            spec,
                                            format!("unknown position `{other}` (br, bl, tr, tl, center or ROW:COL)"),
                                        ))
                                    }
                                },
                            }
                        }
                        "fill" => {
                            fill = match v {
                                "white" => Fill::White,
                                "checker" | "checkerboard" => Fill::Checker,
                                _ => match seed_of(v, "random:")? {
                                    Some(s) => Fill::Random(s),
                                    None if v.to_ascii_lowercase().ends_with(".png") => Fill::Png(PathBuf::from(v)),
                                    None => {
                                        return Err(bad(
                                            spec,
                                            format!("unknown fill `{v}` (white, checker, random:SEED or a .png)"),
                                        ))
                                    }
                                },
                            }
                        }
                        other => return Err(bad(spec, format!("unknown key `{other}` for badnets"))),
                    }
                }
                if size == Some(0) {
                    return Err(bad(spec, "size must be at least 1"));
                }
                Ok(TriggerSpec::Patch {
                    size,
                    pos,
                    margin,
                    fill,
                })
            }
            "blend" | "blended" => {
                let (mut alpha, mut pattern) = (0.1f32, Pattern::Noise(0));
                for (k, v) in kv {
                    match k {
                        "alpha" => {
                            alpha = v
                                .parse()
                                .map_err(|_| bad(spec, format!("alpha `{v}` is not a number")))?
                        }
                        "pattern" => {
                            pattern = match seed_of(v, "noise:")? {
                                Some(s) => Pattern::Noise(s),
                                None if v.to_ascii_lowercase().ends_with(".png") => {
                                    Pattern::Png(PathBuf::from(v))
                                }
                                None => {
                                    return Err(bad(
                                        spec,
                                        format!("unknown pattern `{v}` (noise:SEED or a .png)"),
                                    ))
                                }
                            }
                        }
                        other => return Err(bad(spec, format!("unknown key `{other}` for blend"))),
                    }
                }
                if !(alpha > 0.0 && alpha <= 1.0) {
                    return Err(bad(spec, format!("alpha {alpha} must be in (0, 1]")));
                }
                Ok(TriggerSpec::Blend { alpha, pattern })
            }
            other => Err(bad(
                spec,
                format!("unknown trigger kind `{other}` (badnets or blend)"),
            )),
        }
    }
}

impl fmt::Display for TriggerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TriggerSpec::Patch {
                size,
                pos,
                margin,
                fill,
            } => {
                write!(f, "badnets:")?;
                if let Some(s) = size {
                    write!(f, "size={s},")?;
                }
                let pos = match pos {
                    Position::BottomRight => "br".to_string(),
                    Position::BottomLeft => "bl".to_string(),
                    Position::TopRight => "tr".to_string(),
                    Position::TopLeft => "tl".to_string(),
                    Position::Center => "center".to_string(),
                    Position::At(r, c) => format!("{r}:{c}"),
                };
                let fill = match fill {
                    Fill::White => "white".to_string(),
                    Fill::Checker => "checker".to_string(),
                    Fill::Random(s) => format!("random:{s}"),
                    Fill::Png(p) => p.display().to_string(),
                };
                write!(f, "pos={pos},margin={margin},fill={fill}")
            }
            TriggerSpec::Blend { alpha, pattern } => {
                let p = match pattern {
                    Pattern::Noise(s) => format!("noise:{s}"),
                    Pattern::Png(p) => p.display().to_string(),
                };
                write!(f, "blend:alpha={alpha},pattern={p}")
            }
        }
    }
}

/// Reads a PNG as `[C, H, W]` in [0, 1] with `channels` channels.
fn read_png(path: &std::path::Path, channels: usize) -> Result<Tensor> {
    let img = image::open(path)
        .map_err(|e| Error::format(path, format!("cannot read trigger image: {e}")))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data: Vec<f32> = if channels == 1 {
        img.to_luma8()
            .into_raw()
            .iter()
            .map(|&v| v as f32 / 255.0)
            .collect()
    } else {
        let rgb = img.to_rgb8();
        let mut out = vec![0.0; 3 * h * w];
        for (i, px) in rgb.pixels().enumerate() {
            for c in 0..3 {
                out[c * h * w + i] = px[c] as f32 / 255.0;
            }
        }
        out
    };
    Tensor::new(&[channels, h, w], data)
}

/// A trigger made concrete for one image shape.
#[derive(Clone, Debug)]
pub struct Trigger {
    spec: TriggerSpec,
    shape: [usize; 3],
    kind: Concrete,
}

#[derive(Clone, Debug)]
enum Concrete {
    Patch {
        row: usize,
        col: usize,
        patch: Tensor,
    },
    Blend {
        alpha: f32,
        pattern: Tensor,
    },
}

impl TriggerSpec {
    /// Makes the trigger for images of shape `[C, H, W]`; a patch that does
    /// not fit or a PNG of the wrong size is an error.
    pub fn build(&self, shape: [usize; 3]) -> Result<Trigger> {
        let [c, h, w] = shape;
        let spec = self.to_string();
        let kind = match self {
            TriggerSpec::Patch {
                size,
                pos,
                margin,
                fill,
            } => {
                let patch = match fill {
                    Fill::Png(p) => {
                        let t = read_png(p, c)?;
                        let (ph, pw) = (t.shape()[1], t.shape()[2]);
                        if ph != pw || size.is_some_and(|s| s != ph) {
                            return Err(Error::arg(
                                "--trigger",
                                format!(
                                    "trigger PNG {} is {pw}x{ph}; the patch needs {side}x{side}",
                                    p.display(),
                                    side = size.unwrap_or(ph)
                                ),
                            ));
                        }
                        t
                    }
                    other => {
                        let s = size.unwrap_or(3);
                        let mut rng = ChaCha8Rng::seed_from_u64(match other {
                            Fill::Random(seed) => *seed,
                            _ => 0,
                        });
                        Tensor::from_fn(&[c, s, s], |i| {
                            let (r, q) = ((i / s) % s, i % s);
                            match other {
                                Fill::White => 1.0,
                                Fill::Checker => ((r + q + 1) % 2) as f32,
                                _ => rng.random::<f32>(),
                            }
                        })
                    }
                };
                let s = patch.shape()[1];
                if s + margin > h || s + margin > w {
                    return Err(bad(
                        &spec,
                        format!(
                            "a {s}x{s} patch with margin {margin} does not fit a {h}x{w} image"
                        ),
                    ));
                }
                let (row, col) = match pos {
                    Position::BottomRight => (h - s - margin, w - s - margin),
                    Position::BottomLeft => (h - s - margin, *margin),
                    Position::TopRight => (*margin, w - s - margin),
                    Position::TopLeft => (*margin, *margin),
                    Position::Center => ((h - s) / 2, (w - s) / 2),
                    Position::At(r, q) => (*r, *q),
                };
                if row + s > h || col + s > w {
                    return Err(bad(
                        &spec,
                        format!("a {s}x{s} patch at ({row}, {col}) falls outside a {h}x{w} image"),
                    ));
                }
                Concrete::Patch { row, col, patch }
            }
            TriggerSpec::Blend { alpha, pattern } => {
                let pattern = match pattern {
                    Pattern::Noise(seed) => {
                        let mut rng = ChaCha8Rng::seed_from_u64(*seed);
                        Tensor::from_fn(&[c, h, w], |_| rng.random::<f32>())
                    }
                    Pattern::Png(p) => {
                        let t = read_png(p, c)?;
                        if t.shape() != [c, h, w] {
                            return Err(Error::arg(
                                "--trigger",
                                format!(
                                    "blend PNG {} is {}x{}; the images are {w}x{h}",
                                    p.display(),
                                    t.shape()[2],
                                    t.shape()[1]
                                ),
                            ));
                        }
                        t
                    }
                };
                Concrete::Blend {
                    alpha: *alpha,
                    pattern,
                }
            }
        };
        Ok(Trigger {
            spec: self.clone(),
            shape,
            kind,
        })
    }
}

impl Trigger {
    /// The spec it was made from.
    pub fn spec(&self) -> &TriggerSpec {
        &self.spec
    }

    /// Fails unless the trigger was made for images of `shape`.
    pub fn check_fits(&self, shape: [usize; 3]) -> Result<()> {
        if shape != self.shape {
            return Err(Error::arg(
                "--trigger",
                format!(
                    "trigger made for {:?} images, data has {shape:?}",
                    self.shape
                ),
            ));
        }
        Ok(())
    }

    /// Stamps one `[C, H, W]` image in place.
    pub fn apply(&self, img: &mut [f32]) {
        let [c, h, w] = self.shape;
        match &self.kind {
            Concrete::Patch { row, col, patch } => {
                let s = patch.shape()[1];
                for ch in 0..c {
                    for r in 0..s {
                        let dst = ch * h * w + (row + r) * w + col;
                        let src = (ch * s + r) * s;
                        img[dst..dst + s].copy_from_slice(&patch.data()[src..src + s]);
                    }
                }
            }
            Concrete::Blend { alpha, pattern } => {
                for (x, p) in img.iter_mut().zip(pattern.data()) {
                    *x = (1.0 - alpha) * *x + alpha * p;
                }
            }
        }
    }

    /// Stamps every image of a `[N, C, H, W]` batch in place.
    pub fn apply_batch(&self, x: &mut Tensor) -> Result<()> {
        if x.shape().len() != 4 || x.shape()[1..] != self.shape {
            return Err(Error::shape(
                "x (triggered batch)",
                &[0, self.shape[0], self.shape[1], self.shape[2]],
                x.shape(),
            ));
        }
        let per = self.shape.iter().product::<usize>();
        for img in x.data_mut().chunks_mut(per) {
            self.apply(img);
        }
        Ok(())
    }
}

/// An all-to-one poisoning: a share `rate` of the training images of other
/// classes get the trigger and the label `target`.
#[derive(Clone, Debug)]
pub struct Poisoning {
    /// The trigger.
    pub trigger: Trigger,
    /// The backdoor's target class.
    pub target: usize,
    /// Share of non-target training images poisoned, in [0, 1].
    pub rate: f64,
}

/// The training images to poison: `round(rate * n)` of the `n` images whose
/// label is not `target`, drawn without replacement with `seed`, ascending.
pub fn poison_indices(labels: &[usize], target: usize, rate: f64, seed: u64) -> Vec<usize> {
    let mut others: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] != target).collect();
    let k = ((rate * others.len() as f64).round() as usize).min(others.len());
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
    // Partial Fisher-Yates: the first k entries become a uniform sample.
    for i in 0..k {
        let j = rng.random_range(i..others.len());
        others.swap(i, j);
    }
    let mut chosen = others[..k].to_vec();
    chosen.sort_unstable();
    chosen
}
