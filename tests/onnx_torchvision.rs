//! Whole torchvision CNNs exported to ONNX by PyTorch load through
//! `--weights FILE.onnx` and give PyTorch's float64 logits and input
//! gradient, on the CPU and on the emulated GPU, both through the plain
//! graph and through the fused eval graph that the search runs.
//!
//! The files (tests/fixtures/onnx/torchvision, made by
//! tools/make_torchvision_fixtures.py) keep only the graphs: every
//! initializer lives in an external data file whose values are the fixtures
//! README formula with hashed `u_i` ([`Formula::Hash`]) of the
//! initializer's name and shape. The test writes that file byte for byte
//! from the offsets the model gives, then loads the model through the real
//! loader, so about 50 MB of weights need not live in the repo.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use classwise::backend::cpu::CpuBackend;
use classwise::backend::gpu::emu::EmuDriver;
use classwise::backend::gpu::GpuBackend;
use classwise::backend::Backend;
use classwise::device_model::DeviceModel;
use classwise::graph::{fuse::fuse, Op, ParamKind};
use classwise::selftest::{formula_tensor_with, Formula};
use classwise::weights::{read_tensors, LoadOptions, Model, TensorFile};
use classwise::zoo::{build, ModelSpec};
use classwise::Tensor;

/// The targets for every torchvision CNN of the supported op set.
const LOGITS_TOL: f64 = 1e-4;
const DX_TOL: f64 = 1e-3;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx/torchvision")
}

/// The formula's role of an initializer, from the names alone: a tensor
/// whose prefix also has a `running_mean` belongs to a batch norm.
fn role(name: &str, names: &HashSet<String>) -> ParamKind {
    let (prefix, leaf) = name.rsplit_once('.').unwrap_or(("", name));
    if names.contains(&format!("{prefix}.running_mean")) {
        match leaf {
            "weight" => ParamKind::BnWeight,
            "bias" => ParamKind::BnBias,
            "running_mean" => ParamKind::BnMean,
            "running_var" => ParamKind::BnVar,
            other => panic!("{name}: unexpected BN tensor {other}"),
        }
    } else if leaf == "weight" {
        ParamKind::ConvWeight
    } else {
        ParamKind::Bias
    }
}

/// Copies `name.onnx` into a fresh folder and writes its external data file
/// from the formula; returns the folder (kept alive) and the model's path.
fn materialize(name: &str) -> (tempfile::TempDir, PathBuf) {
    let src = dir().join(format!("{name}.onnx"));
    let bytes = std::fs::read(&src).unwrap();
    let (model, _) = classwise::onnx::load::parse_model(&bytes, &src).unwrap();
    let graph = model.graph.as_ref().unwrap();
    let names: HashSet<String> = graph
        .initializer
        .iter()
        .map(|t| t.name().to_string())
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join(format!("{name}.onnx"));
    std::fs::write(&path, &bytes).unwrap();
    let mut files: HashMap<String, std::fs::File> = HashMap::new();
    let mut written = 0;
    for t in &graph.initializer {
        let ext: HashMap<&str, &str> = t
            .external_data
            .iter()
            .map(|e| (e.key(), e.value()))
            .collect();
        let Some(location) = ext.get("location") else {
            continue;
        };
        assert_eq!(
            t.data_type(),
            1,
            "{}: the fixtures hold f32 weights",
            t.name()
        );
        let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        let values = formula_tensor_with(Formula::Hash, t.name(), &shape, role(t.name(), &names));
        let raw: Vec<u8> = values.data().iter().flat_map(|v| v.to_le_bytes()).collect();
        let offset: u64 = ext.get("offset").map_or(0, |o| o.parse().unwrap());
        if let Some(len) = ext.get("length") {
            assert_eq!(
                len.parse::<usize>().unwrap(),
                raw.len(),
                "{}: length",
                t.name()
            );
        }
        let f = files
            .entry(location.to_string())
            .or_insert_with(|| std::fs::File::create(tmp.path().join(location)).unwrap());
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.write_all(&raw).unwrap();
        written += 1;
    }
    assert!(written > 10, "{name}: only {written} external initializers");
    (tmp, path)
}

fn expected(name: &str) -> TensorFile {
    read_tensors(&dir().join(format!("{name}_expect.safetensors"))).unwrap()
}

/// Logits and dx against PyTorch: the plain graph (`cwp forward`) and the
/// fused eval graph (the search's).
fn check_on<B: Backend>(be: &B, name: &str, model: &Model) {
    let f = expected(name);
    common::check_forward(be, model, &f, name, LOGITS_TOL, DX_TOL);

    let p = Path::new(name);
    let (x, y) = (f.float("x", p).unwrap(), common::labels(&f, "y"));
    let what = format!("{name} on {}, fused", be.name());
    let dm = DeviceModel::upload(be, &model.graph, &model.params).unwrap();
    assert!(dm.is_fused());
    let logits = dm.logits(x).unwrap();
    let (_, dx) = dm.loss_and_input_grad(x, &y).unwrap();
    let want = |k: &str| f.float(k, p).unwrap();
    common::assert_tensor_rel(
        &format!("{what}: logits"),
        &logits,
        want("logits"),
        LOGITS_TOL,
    );
    common::assert_tensor_rel(&format!("{what}: dx"), &dx, want("dx"), DX_TOL);
}

fn matches_pytorch(name: &str) -> Model {
    let (_tmp, path) = materialize(name);
    let model = Model::load(&path, &LoadOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(model.graph.input, [3, 32, 32]);
    assert_eq!(model.graph.num_classes, 10);
    check_on(&CpuBackend::REFERENCE, name, &model);
    check_on(&GpuBackend::new(EmuDriver::new()), name, &model);
    model
}

#[test]
fn torchvision_mobilenet_v3_small_matches_pytorch() {
    let m = matches_pytorch("mobilenet_v3_small");
    let depthwise = m
        .graph
        .nodes
        .iter()
        .any(|n| matches!(&n.op, Op::Conv { p, .. } if p.groups > 1));
    assert!(
        depthwise,
        "mobilenet_v3_small imported without a depthwise conv"
    );
}

#[test]
fn torchvision_efficientnet_b0_matches_pytorch() {
    matches_pytorch("efficientnet_b0");
}

#[test]
fn torchvision_densenet121_matches_pytorch() {
    let m = matches_pytorch("densenet121");
    assert!(m.graph.nodes.iter().any(|n| matches!(n.op, Op::Concat)));
}

/// The op sequence of a graph, without parameter ids (which differ in
/// order between an import and the zoo's registration).
fn op_kinds(ops: impl Iterator<Item = Op>) -> Vec<String> {
    ops.map(|op| {
        let s = format!("{op:?}");
        s.split(['{', '(']).next().unwrap().trim().to_string()
            + &match op {
                Op::Conv { p, .. } => format!(" {p:?}"),
                Op::FusedConv { p, relu, .. } => format!(" {p:?} relu={relu}"),
                _ => String::new(),
            }
    })
    .collect()
}

#[test]
fn the_zoo_resnet18_from_onnx_is_the_zoo_graph_after_fusion_and_gives_its_logits() {
    let name = "zoo_resnet18";
    let (_tmp, path) = materialize(name);
    let onnx = Model::load(&path, &LoadOptions::default()).unwrap();
    check_on(&CpuBackend::REFERENCE, name, &onnx);

    // Same fused graph as the zoo's resnet18: the search runs the same
    // kernels on the same shapes, so at the same speed.
    let zoo = build(&ModelSpec::new("resnet18", [3, 32, 32], 10)).unwrap();
    let fz = fuse(&zoo).unwrap().graph;
    let fo = fuse(&onnx.graph).unwrap().graph;
    assert_eq!(
        op_kinds(fo.nodes.iter().map(|n| n.op.clone())),
        op_kinds(fz.nodes.iter().map(|n| n.op.clone())),
        "the imported resnet18 fuses to another graph than the zoo's"
    );
    let shapes =
        |g: &classwise::graph::Graph| g.nodes.iter().map(|n| n.shape.clone()).collect::<Vec<_>>();
    assert_eq!(shapes(&fo), shapes(&fz));

    // And the same numbers, given the same weights by name.
    let names: HashSet<String> = zoo.params.iter().map(|p| p.name.clone()).collect();
    let zparams: Vec<Tensor> = zoo
        .params
        .iter()
        .map(|p| formula_tensor_with(Formula::Hash, &p.name, &p.shape, role(&p.name, &names)))
        .collect();
    let f = expected(name);
    let x = f.float("x", Path::new(name)).unwrap();
    let be = CpuBackend::REFERENCE;
    let a = DeviceModel::upload(&be, &zoo, &zparams)
        .unwrap()
        .logits(x)
        .unwrap();
    let b = DeviceModel::upload(&be, &onnx.graph, &onnx.params)
        .unwrap()
        .logits(x)
        .unwrap();
    common::assert_tensor_rel("zoo vs ONNX resnet18 logits", &b, &a, 1e-6);
}

#[test]
fn cwp_bench_times_an_onnx_file_beside_the_zoo_model_it_equals() {
    let (_tmp, path) = materialize("zoo_resnet18");
    let spec = format!("resnet18:1;{}:1", path.display());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cwp"))
        .args([
            "bench",
            "--device",
            "cpu",
            "--convs",
            "none",
            "--train",
            "none",
            "--seconds",
            "0.2",
        ])
        .args(["--models", &spec, "--search", &spec])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One model row and one search row each for the zoo model and the file.
    let file = path.display().to_string();
    assert!(text.matches(&file).count() >= 2, "{text}");
    assert!(text.matches("resnet18").count() >= 4, "{text}");
}
