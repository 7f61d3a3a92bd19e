//! The command line of the foundation: `cwp zoo`, `cwp forward` on a genuine
//! PyTorch checkpoint, `cwp eval` on Fashion-MNIST, and clear errors (naming
//! the culprit, non-zero exit) on broken inputs.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use classwise::train::init_params;
use classwise::weights::{read_tensors, write_tensors, Model, OutTensor};
use classwise::zoo::{build, ModelSpec};
use common::*;

fn cwp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cwp"))
        .args(args)
        .output()
        .expect("cwp runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn random_smallcnn(dir: &Path) -> PathBuf {
    let spec = ModelSpec::new("smallcnn", [1, 28, 28], 10);
    let graph = build(&spec).unwrap();
    let model = Model::new(&spec, init_params(&graph, 1)).unwrap();
    let path = dir.join("random.safetensors");
    model.save(&path).unwrap();
    path
}

#[test]
fn zoo_lists_every_architecture() {
    let o = cwp(&["zoo"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    for arch in classwise::zoo::ARCHS {
        assert!(out.contains(arch), "{arch} missing from:\n{out}");
    }
    assert!(
        out.contains("25557032"),
        "resnet50_imagenet parameter count:\n{out}"
    );
}

#[test]
fn forward_on_a_pytorch_f16_checkpoint_gives_pytorchs_logits_and_dx() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let fx = fixtures_dir();
    let weights = fx.join("weights_smallcnn_3x32_f16.safetensors");
    let input = fx.join("expect_smallcnn_3x32_f16.safetensors");
    let o = cwp(&[
        "forward",
        "--arch",
        "smallcnn",
        "--weights",
        weights.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let got = read_tensors(&out).unwrap();
    let want = read_tensors(&input).unwrap();
    let g = |f: &classwise::weights::TensorFile, k: &str| {
        f.float(k, k.as_ref()).unwrap().data().to_vec()
    };
    let (ltol, gtol) = classwise::selftest::model_tolerances(false);
    let ltol = ltol as f32;
    assert_close_abs("logits", &g(&got, "logits"), &g(&want, "logits"), ltol);
    assert_close_abs("loss", &g(&got, "loss"), &g(&want, "loss"), ltol);
    assert_close_rel("dx", &g(&got, "dx"), &g(&want, "dx"), gtol);
}

#[test]
fn eval_of_a_random_model_on_fashion_mnist_is_near_chance() {
    let dir = tempfile::tempdir().unwrap();
    let w = random_smallcnn(dir.path());
    let o = cwp(&[
        "eval",
        "--weights",
        w.to_str().unwrap(),
        "--data",
        "fashion-mnist",
        "--json",
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let acc = report["accuracy"]["accuracy"].as_f64().unwrap();
    // Untrained, the model sorts images by crude brightness/shape features
    // unrelated to the labels: far below a trained model's ~90%.
    assert!(acc < 0.25, "random weights gave accuracy {acc}");
    assert_eq!(report["accuracy"]["images"], 10000);
    let confusion = report["accuracy"]["confusion"].as_array().unwrap();
    assert_eq!(confusion.len(), 10);
}

#[test]
fn eval_names_a_truncated_idx_file() {
    let dir = tempfile::tempdir().unwrap();
    let w = random_smallcnn(dir.path());
    let data = dir.path().join("fm");
    std::fs::create_dir(&data).unwrap();
    let src = Path::new(classwise::data::DEFAULT_FASHION_MNIST_DIR);
    std::fs::copy(
        src.join("t10k-labels-idx1-ubyte.gz"),
        data.join("t10k-labels-idx1-ubyte.gz"),
    )
    .unwrap();
    let raw = classwise::data::idx::read_maybe_gz(&src.join("t10k-images-idx3-ubyte.gz")).unwrap();
    let truncated = data.join("t10k-images-idx3-ubyte");
    std::fs::write(&truncated, &raw[..raw.len() / 2]).unwrap();
    let spec = format!("fashion-mnist:{}", data.display());
    let o = cwp(&["eval", "--weights", w.to_str().unwrap(), "--data", &spec]);
    assert!(!o.status.success());
    let msg = text(&o);
    assert!(
        msg.contains(truncated.to_str().unwrap()),
        "message does not name the file:\n{msg}"
    );
}

#[test]
fn eval_names_a_truncated_weights_file() {
    let dir = tempfile::tempdir().unwrap();
    let w = random_smallcnn(dir.path());
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() - 1000]).unwrap();
    let o = cwp(&["eval", "--weights", w.to_str().unwrap()]);
    assert!(!o.status.success());
    let msg = text(&o);
    assert!(
        msg.contains(w.to_str().unwrap()) && msg.contains("truncated"),
        "{msg}"
    );
}

#[test]
fn eval_names_a_wrongly_shaped_tensor_and_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let w = random_smallcnn(dir.path());
    let file = read_tensors(&w).unwrap();
    let bad = classwise::Tensor::zeros(&[32, 1, 5, 5]);
    let mut entries: Vec<(String, OutTensor<'_>)> = Vec::new();
    for (name, t) in &file.tensors {
        match (name.as_str(), t) {
            ("conv1.weight", _) => entries.push((name.clone(), OutTensor::F32(&bad))),
            (_, classwise::weights::FileTensor::Float(t)) => {
                entries.push((name.clone(), OutTensor::F32(t)))
            }
            (_, classwise::weights::FileTensor::Int(s, v)) => {
                entries.push((name.clone(), OutTensor::I64(s.clone(), v)))
            }
        }
    }
    write_tensors(&w, &entries, &file.metadata).unwrap();
    let o = cwp(&["eval", "--weights", w.to_str().unwrap()]);
    assert!(!o.status.success());
    let msg = text(&o);
    assert!(
        msg.contains("conv1.weight")
            && msg.contains("[32, 1, 5, 5]")
            && msg.contains("[32, 1, 3, 3]"),
        "{msg}"
    );
}

/// The tensors of a random zoo model as a plain PyTorch export writes them:
/// state_dict names only, no metadata naming the architecture; `extra`
/// tensors are added.
fn plain_state_dict(dir: &Path, spec: &ModelSpec, extra: &[(&str, &[usize])]) -> PathBuf {
    let graph = build(spec).unwrap();
    let params = init_params(&graph, 3);
    let extra: Vec<(String, classwise::Tensor)> = extra
        .iter()
        .map(|(n, s)| (n.to_string(), classwise::Tensor::zeros(s)))
        .collect();
    let entries: Vec<(String, OutTensor<'_>)> = graph
        .params
        .iter()
        .zip(&params)
        .map(|(p, t)| (p.name.clone(), OutTensor::F32(t)))
        .chain(extra.iter().map(|(n, t)| (n.clone(), OutTensor::F32(t))))
        .collect();
    let path = dir.join(format!("{}.safetensors", spec.arch));
    write_tensors(&path, &entries, &Default::default()).unwrap();
    path
}

/// `cwp forward --arch A --weights W` where W holds another architecture's
/// tensors: the error names W, the zoo architecture the tensors fit (with
/// the class count and what the tensors tell of the input), and the --arch
/// to pass; nothing is written.
#[test]
fn forward_with_the_wrong_arch_names_the_zoo_architecture_the_tensors_fit() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let input = fixtures_dir().join("expect_smallcnn_3x32_f16.safetensors");
    let forward = |arch: &str, weights: &Path| {
        cwp(&[
            "forward",
            "--arch",
            arch,
            "--weights",
            weights.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
        ])
    };
    // A genuine PyTorch smallcnn checkpoint (no classifier named `linear`).
    let smallcnn = fixtures_dir().join("weights_smallcnn_3x32_f16.safetensors");
    // A preact_resnet18: resnet18's classifier, but no stem BN.
    let preact = plain_state_dict(
        dir.path(),
        &ModelSpec::new("preact_resnet18", [3, 32, 32], 100),
        &[],
    );
    for (weights, fit) in [
        (
            &smallcnn,
            "`smallcnn` (10 classes, input 3x32x32): pass --arch smallcnn",
        ),
        (
            &preact,
            "`preact_resnet18` (100 classes, 3 input channels): pass --arch preact_resnet18",
        ),
    ] {
        let o = forward("resnet18", weights);
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        let msg = text(&o);
        assert!(msg.contains(weights.to_str().unwrap()), "{msg}");
        assert!(msg.contains(&format!("its tensors fit {fit}")), "{msg}");
        assert!(!out.exists(), "output written on a failed load");
    }
    // The right arch loads (the hint is not the whole story of a failure).
    let o = forward("smallcnn", &smallcnn);
    assert!(o.status.success(), "{}", text(&o));
}

/// Tensors that no zoo architecture has exactly (here a smallcnn with an
/// extra head) are said to fit none of them, rather than a near miss.
#[test]
fn weights_that_fit_no_zoo_architecture_are_said_to() {
    let dir = tempfile::tempdir().unwrap();
    let w = plain_state_dict(
        dir.path(),
        &ModelSpec::new("smallcnn", [1, 28, 28], 10),
        &[("head.weight", &[10, 256])],
    );
    let o = cwp(&[
        "eval",
        "--arch",
        "resnet18",
        "--weights",
        w.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let msg = text(&o);
    assert!(
        msg.contains("its tensors fit none of the zoo's architectures"),
        "{msg}"
    );
}
