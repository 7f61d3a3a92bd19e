//! Canvases: the real images of the target class whose pixels the pattern
//! is made of. Chosen by index in the test or training set, automatically
//! (the test images the model is most confident on, never from the search
//! set), or a uniform grey level.

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::data::Dataset;
use crate::device_model::DeviceModel;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Most canvases `auto:N` chooses per class: each is a whole search, so a
/// larger N is almost surely a slip (auto:5000 would mean hours per class).
pub const AUTO_MAX: usize = 64;

/// How canvases are chosen (`--canvas`).
#[derive(Clone, Debug, PartialEq)]
pub enum CanvasSpec {
    /// `test:I[,J..]`: the I-th test image of the class (by its order in the class).
    Test(Vec<usize>),
    /// `auto:N`: the N test images of the class the model is most confident
    /// on, outside the search set.
    Auto(usize),
    /// `train:I[,J..]`: the I-th training image of the class.
    Train(Vec<usize>),
    /// `solid:V`: a uniform image of value V in [0, 1].
    Solid(Vec<f32>),
    /// `learn:V`: a canvas that starts uniform at V and whose pixels are
    /// optimised with the mask, so a trigger of values no image holds (a
    /// random-colour patch) can still be drawn.
    Learn(Vec<f32>),
}

impl std::str::FromStr for CanvasSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<CanvasSpec> {
        let bad = |msg: String| Error::arg("--canvas", format!("`{s}`: {msg}"));
        let (kind, rest) = s.split_once(':').ok_or_else(|| {
            bad("expected test:I[,J..], auto:N, train:I[,J..], solid:V or learn:V".into())
        })?;
        let list = |what: &str| -> Result<Vec<usize>> {
            let v = rest
                .split(',')
                .map(|p| p.trim().parse::<usize>())
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|_| bad(format!("{what} needs whole numbers")))?;
            if v.is_empty() {
                return Err(bad(format!("{what} needs at least one index")));
            }
            Ok(v)
        };
        match kind {
            "test" => Ok(CanvasSpec::Test(list("test")?)),
            "train" => Ok(CanvasSpec::Train(list("train")?)),
            "auto" => match rest.trim().parse::<usize>() {
                Ok(n) if n > AUTO_MAX => Err(bad(format!(
                    "auto:N takes at most {AUTO_MAX} canvases per class (each is a whole search); \
                     name test images with test:I,J.. for more"
                ))),
                Ok(n) if n > 0 => Ok(CanvasSpec::Auto(n)),
                _ => Err(bad("auto:N needs N >= 1".into())),
            },
            "solid" | "learn" => {
                let v = rest
                    .split(',')
                    .map(|p| p.trim().parse::<f32>())
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|_| bad(format!("{kind}:V needs numbers")))?;
                if v.is_empty() || v.iter().any(|x| !(0.0..=1.0).contains(x)) {
                    return Err(bad(format!("{kind} values must lie in [0, 1]")));
                }
                Ok(if kind == "solid" {
                    CanvasSpec::Solid(v)
                } else {
                    CanvasSpec::Learn(v)
                })
            }
            other => Err(bad(format!("unknown canvas kind `{other}`"))),
        }
    }
}

impl std::fmt::Display for CanvasSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let join = |v: &[usize]| {
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        match self {
            CanvasSpec::Test(v) => write!(f, "test:{}", join(v)),
            CanvasSpec::Train(v) => write!(f, "train:{}", join(v)),
            CanvasSpec::Auto(n) => write!(f, "auto:{n}"),
            CanvasSpec::Solid(v) | CanvasSpec::Learn(v) => write!(
                f,
                "{}:{}",
                if matches!(self, CanvasSpec::Solid(_)) {
                    "solid"
                } else {
                    "learn"
                },
                v.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }
}

/// Several canvas choices joined by `+` (e.g. `auto:1+solid:1`): every
/// class is searched from each of them and keeps its best.
#[derive(Clone, Debug, PartialEq)]
pub struct Canvases(pub Vec<CanvasSpec>);

impl std::str::FromStr for Canvases {
    type Err = Error;

    fn from_str(s: &str) -> Result<Canvases> {
        let specs = s
            .split('+')
            .map(|p| p.trim().parse::<CanvasSpec>())
            .collect::<Result<Vec<_>>>()?;
        Ok(Canvases(specs))
    }
}

impl std::fmt::Display for Canvases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|c| c.to_string()).collect();
        f.write_str(&parts.join("+"))
    }
}

/// One chosen canvas.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Canvas {
    /// Short identifier, unique within a class (`test3`, `auto0`, `train12`, `solid0.5`).
    pub id: String,
    /// Where it came from: `test`, `train`, `solid` or `learn` (then
    /// `pixels` are the learned ones once the search has run; the
    /// confidence is the starting image's).
    pub source: String,
    /// Index in its dataset split (None for solid canvases).
    pub dataset_index: Option<usize>,
    /// The model's softmax probability of the target class on it.
    pub confidence: Option<f32>,
    /// The target logit minus the largest other logit (what `auto:N` ranks
    /// by: unlike the f32 softmax it does not saturate at 1).
    #[serde(default)]
    pub margin: Option<f64>,
    /// Pixels `[C, H, W]` in [0, 1].
    pub pixels: Vec<f32>,
}

/// How sure the model is of `target` on one image: its softmax probability
/// (for the report) and the logit margin (for ranking).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Confidence {
    prob: f32,
    margin: f64,
}

/// [`Confidence`] of class `target` for each row of logits. The margin is
/// taken in f64 so that two confident images (both with probability 1.0 in
/// f32) still rank by how far the target leads.
fn target_confidence(logits: &Tensor, target: usize) -> Vec<Confidence> {
    let k = logits.shape()[1];
    logits
        .data()
        .chunks(k)
        .map(|row| {
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let z: f32 = row.iter().map(|v| (v - m).exp()).sum();
            let other = row
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != target)
                .fold(f64::NEG_INFINITY, |a, (_, &b)| a.max(b as f64));
            Confidence {
                prob: (row[target] - m).exp() / z,
                margin: row[target] as f64 - other,
            }
        })
        .collect()
}

/// The `auto:N` order: the largest logit margin first; equal margins by
/// dataset index, so the choice is stable.
fn rank_order(a: (usize, &Confidence), b: (usize, &Confidence)) -> std::cmp::Ordering {
    b.1.margin.total_cmp(&a.1.margin).then(a.0.cmp(&b.0))
}

/// Chooses the canvases of class `target` for every spec of `specs`
/// (a canvas chosen twice is kept once).
pub fn choose_all<B: Backend>(
    specs: &Canvases,
    target: usize,
    model: &DeviceModel<'_, B>,
    test: &Dataset,
    train: Option<&Dataset>,
    search_set: &[usize],
) -> Result<Vec<Canvas>> {
    let mut out: Vec<Canvas> = Vec::new();
    for spec in &specs.0 {
        for c in choose(spec, target, model, test, train, search_set)? {
            if !out.iter().any(|o| o.id == c.id) {
                out.push(c);
            }
        }
    }
    Ok(out)
}

/// Chooses the canvases of class `target`. `search_set` holds the test
/// indices used for the search (excluded from `auto`).
pub fn choose<B: Backend>(
    spec: &CanvasSpec,
    target: usize,
    model: &DeviceModel<'_, B>,
    test: &Dataset,
    train: Option<&Dataset>,
    search_set: &[usize],
) -> Result<Vec<Canvas>> {
    let of_class =
        |d: &Dataset| -> Vec<usize> { (0..d.len()).filter(|&i| d.label(i) == target).collect() };
    let by_index = |d: &Dataset, which: &[usize], source: &str| -> Result<Vec<Canvas>> {
        let idx = of_class(d);
        let mut out = Vec::new();
        for &i in which {
            let &di = idx.get(i).ok_or_else(|| {
                Error::arg(
                    "--canvas",
                    format!(
                        "{source}:{i} is out of range: class {target} has {} {source} images",
                        idx.len()
                    ),
                )
            })?;
            let img = d.image(di);
            let conf = target_confidence(
                &model.logits(&img.clone().reshape(&[
                    1,
                    img.shape()[0],
                    img.shape()[1],
                    img.shape()[2],
                ])?)?,
                target,
            )[0];
            out.push(Canvas {
                id: format!("{source}{i}"),
                source: source.to_string(),
                dataset_index: Some(di),
                confidence: Some(conf.prob),
                margin: Some(conf.margin),
                pixels: img.into_data(),
            });
        }
        Ok(out)
    };
    match spec {
        CanvasSpec::Test(v) => by_index(test, v, "test"),
        CanvasSpec::Train(v) => {
            let train = train.ok_or_else(|| {
                Error::arg(
                    "--canvas",
                    "train: canvases need the training split of the data",
                )
            })?;
            by_index(train, v, "train")
        }
        CanvasSpec::Solid(values) | CanvasSpec::Learn(values) => {
            let [c, h, w] = test.shape();
            let source = if matches!(spec, CanvasSpec::Solid(_)) {
                "solid"
            } else {
                "learn"
            };
            values
                .iter()
                .map(|&v| {
                    let img = Tensor::full(&[1, c, h, w], v);
                    let conf = target_confidence(&model.logits(&img)?, target)[0];
                    Ok(Canvas {
                        id: format!("{source}{v}"),
                        source: source.into(),
                        dataset_index: None,
                        confidence: Some(conf.prob),
                        margin: Some(conf.margin),
                        pixels: img.into_data(),
                    })
                })
                .collect()
        }
        CanvasSpec::Auto(n) => {
            let excluded: std::collections::HashSet<usize> = search_set.iter().copied().collect();
            let candidates: Vec<usize> = of_class(test)
                .into_iter()
                .filter(|i| !excluded.contains(i))
                .collect();
            if candidates.is_empty() {
                return Err(Error::arg(
                    "--canvas",
                    format!("class {target} has no test images outside the search set to choose a canvas from"),
                ));
            }
            if *n > candidates.len() {
                return Err(Error::arg(
                    "--canvas",
                    format!(
                        "auto:{n} asks for {n} canvases, but class {target} has only {} test images \
                         outside the search set",
                        candidates.len()
                    ),
                ));
            }
            let mut scored = Vec::with_capacity(candidates.len());
            for chunk in candidates.chunks(256) {
                let p = target_confidence(&model.logits(&test.batch(chunk))?, target);
                scored.extend(chunk.iter().copied().zip(p));
            }
            scored.sort_by(|a, b| rank_order((a.0, &a.1), (b.0, &b.1)));
            Ok(scored
                .into_iter()
                .take(*n)
                .enumerate()
                .map(|(rank, (di, conf))| Canvas {
                    id: format!("auto{rank}"),
                    source: "test".into(),
                    dataset_index: Some(di),
                    confidence: Some(conf.prob),
                    margin: Some(conf.margin),
                    pixels: test.image(di).into_data(),
                })
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_ranks_by_logit_margin_where_the_f32_softmax_saturates() {
        // Both rows give the target probability 1.0 in f32; the second leads
        // by far more, so it must rank first although its index is larger.
        let logits = Tensor::new(&[2, 3], vec![120.0, 0.0, 1.0, 300.0, 0.0, 1.0]).unwrap();
        let c = target_confidence(&logits, 0);
        assert_eq!(c[0].prob, 1.0);
        assert_eq!(c[1].prob, 1.0);
        assert_eq!(c[0].margin, 119.0);
        assert_eq!(c[1].margin, 299.0);
        let mut scored: Vec<(usize, Confidence)> = vec![(3, c[0]), (7, c[1])];
        scored.sort_by(|a, b| rank_order((a.0, &a.1), (b.0, &b.1)));
        assert_eq!(scored[0].0, 7);
    }

    #[test]
    fn a_negative_margin_means_another_class_leads() {
        let logits = Tensor::new(&[1, 3], vec![1.0, 4.0, 2.0]).unwrap();
        assert_eq!(target_confidence(&logits, 0)[0].margin, -3.0);
    }

    #[test]
    fn equal_margins_rank_by_dataset_index() {
        let c = Confidence {
            prob: 0.9,
            margin: 2.0,
        };
        let mut scored = [(9, c), (2, c)];
        scored.sort_by(|a, b| rank_order((a.0, &a.1), (b.0, &b.1)));
        assert_eq!(scored[0].0, 2);
    }
}
