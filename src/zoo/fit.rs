//! Which zoo architectures a checkpoint's tensors fit. A checkpoint loaded
//! with the wrong `--arch` fails on a tensor name or shape that says little
//! about the cause; naming the architectures that do fit tells the user what
//! to pass instead.

use super::{build, ModelSpec, ARCHS};
use crate::graph::ParamKind;

/// What a checkpoint's tensors tell about a zoo architecture's spec: the
/// input (channels from the first conv; smallcnn's side from `fc1`, whose
/// width depends on it; the architecture's usual size otherwise) and the
/// class count (rows of the last linear layer, `None` without one).
/// `shape_of` looks a state_dict entry up by its PyTorch name.
pub fn spec_from_tensors<'a>(
    arch: &str,
    shape_of: impl Fn(&str) -> Option<&'a [usize]>,
) -> Option<([usize; 3], Option<usize>)> {
    let probe = build(&ModelSpec::new(arch, ModelSpec::default_input(arch), 10)).ok()?;
    let mut input = ModelSpec::default_input(arch);
    if let Some(&c) = probe
        .params
        .iter()
        .find(|p| p.kind == ParamKind::ConvWeight)
        .and_then(|p| shape_of(&p.name))
        .and_then(|s| s.get(1))
    {
        input[0] = c;
    }
    if arch == "smallcnn" {
        if let Some(&[_, k]) = shape_of("fc1.weight") {
            let side = ((k / 64) as f64).sqrt().round() as usize * 4;
            if side > 0 {
                input[1] = side;
                input[2] = side;
            }
        }
    }
    let classes = probe
        .params
        .iter()
        .rev()
        .find(|p| p.kind == ParamKind::LinearWeight)
        .and_then(|p| shape_of(&p.name))
        .and_then(|s| s.first().copied());
    Some((input, classes))
}

/// The zoo models whose parameters are exactly the given float tensors
/// (PyTorch names without a `module.` prefix, `num_batches_tracked`
/// left out): every name present with the same shape, nothing left over.
/// The spec's input size is only meaningful for smallcnn (see
/// [`spec_from_tensors`]); the other architectures pool globally.
pub fn fitting_specs(tensors: &[(&str, &[usize])]) -> Vec<ModelSpec> {
    let shape_of = |name: &str| tensors.iter().find(|(n, _)| *n == name).map(|(_, s)| *s);
    let mut fits = Vec::new();
    for arch in ARCHS {
        let Some((input, Some(classes))) = spec_from_tensors(arch, shape_of) else {
            continue;
        };
        let spec = ModelSpec::new(arch, input, classes);
        let Ok(graph) = build(&spec) else {
            continue;
        };
        let same = graph.params.len() == tensors.len()
            && graph
                .params
                .iter()
                .all(|p| shape_of(&p.name) == Some(p.shape.as_slice()));
        if same {
            fits.push(spec);
        }
    }
    fits
}

/// A fitting spec in words: `` `smallcnn` (10 classes, input 1x28x28) ``.
pub fn describe_fit(spec: &ModelSpec) -> String {
    let [c, h, w] = spec.input;
    let input = if spec.arch == "smallcnn" {
        format!("input {c}x{h}x{w}")
    } else {
        format!("{c} input channel{}", if c == 1 { "" } else { "s" })
    };
    format!("`{}` ({} classes, {input})", spec.arch, spec.num_classes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors_of(spec: &ModelSpec) -> Vec<(String, Vec<usize>)> {
        build(spec)
            .unwrap()
            .params
            .iter()
            .map(|p| (p.name.clone(), p.shape.clone()))
            .collect()
    }

    fn fits(t: &[(String, Vec<usize>)]) -> Vec<ModelSpec> {
        let view: Vec<(&str, &[usize])> =
            t.iter().map(|(n, s)| (n.as_str(), s.as_slice())).collect();
        fitting_specs(&view)
    }

    #[test]
    fn each_zoo_model_fits_its_own_architecture_only() {
        for (arch, input, classes) in [
            ("smallcnn", [1, 28, 28], 10),
            ("smallcnn", [3, 32, 32], 7),
            ("resnet18", [3, 32, 32], 10),
            ("preact_resnet18", [1, 32, 32], 100),
            ("vgg16", [3, 32, 32], 10),
            ("resnet50_imagenet", [3, 224, 224], 1000),
        ] {
            let spec = ModelSpec::new(arch, input, classes);
            let got = fits(&tensors_of(&spec));
            assert_eq!(got.len(), 1, "{arch}: {got:?}");
            assert_eq!(got[0].arch, arch);
            assert_eq!(got[0].num_classes, classes);
            assert_eq!(got[0].input[0], input[0]);
            if arch == "smallcnn" {
                assert_eq!(got[0].input, input);
            }
        }
    }

    #[test]
    fn a_missing_an_extra_or_a_reshaped_tensor_fits_nothing() {
        let full = tensors_of(&ModelSpec::new("resnet18", [3, 32, 32], 10));
        let mut missing = full.clone();
        missing.retain(|(n, _)| n != "layer2.0.bn1.running_var");
        assert!(fits(&missing).is_empty());
        let mut extra = full.clone();
        extra.push(("head.weight".into(), vec![10, 512]));
        assert!(fits(&extra).is_empty());
        let mut reshaped = full;
        reshaped
            .iter_mut()
            .find(|(n, _)| n == "layer3.1.conv1.weight")
            .unwrap()
            .1 = vec![256, 256, 1, 1];
        assert!(fits(&reshaped).is_empty());
    }
}
