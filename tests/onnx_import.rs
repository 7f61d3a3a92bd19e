//! ONNX import: models exported by PyTorch (tests/fixtures/onnx, made by
//! tools/make_onnx_fixtures.py) load from `--weights FILE.onnx` without
//! `--arch`, and give PyTorch's float64 logits and input gradient on the
//! CPU and on the emulated GPU; what the importer cannot map is refused
//! before anything runs, with an error naming the node (or the file).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use classwise::backend::cpu::CpuBackend;
use classwise::backend::gpu::emu::EmuDriver;
use classwise::backend::gpu::GpuBackend;
use classwise::backend::Backend;
use classwise::graph::Op;
use classwise::weights::{read_tensors, LoadOptions, Model, TensorFile};
use classwise::Tensor;

const LOGITS_TOL: f64 = 1e-4;
const DX_TOL: f64 = 1e-3;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx")
}

fn onnx(name: &str) -> PathBuf {
    dir().join(format!("{name}.onnx"))
}

fn load(name: &str) -> Model {
    Model::load(&onnx(name), &LoadOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn expected(name: &str) -> TensorFile {
    read_tensors(&dir().join(format!("{name}.safetensors"))).unwrap()
}

fn check_on<B: Backend>(be: &B, name: &str, model: &Model) {
    let f = expected(name);
    let out = common::check_forward(be, model, &f, name, LOGITS_TOL, DX_TOL);
    let want_loss = f.float("loss", Path::new(name)).unwrap().data()[0];
    assert!(
        (out.loss - want_loss).abs() <= 1e-4 * want_loss.abs().max(1.0),
        "{name} on {}: loss {} vs {want_loss}",
        be.name(),
        out.loss
    );
}

/// Logits and dx against PyTorch on the CPU and on the emulated GPU.
fn matches_pytorch(name: &str) -> Model {
    let model = load(name);
    check_on(&CpuBackend::REFERENCE, name, &model);
    check_on(&GpuBackend::new(EmuDriver::new()), name, &model);
    model
}

fn ops(m: &Model) -> Vec<&Op> {
    m.graph.nodes.iter().map(|n| &n.op).collect()
}

#[test]
fn conv_bn_pools_and_gemm_match_pytorch_at_opset_11_and_17() {
    for name in ["convnet_op11", "convnet_op17"] {
        let m = matches_pytorch(name);
        assert_eq!(m.graph.arch, format!("onnx:{name}"));
        assert_eq!(m.graph.input, [3, 8, 8]);
        assert_eq!(m.graph.num_classes, 5);
    }
}

#[test]
fn a_sub_div_front_becomes_the_graphs_normalize_so_patterns_stay_in_pixels() {
    let m = load("convnet_op17");
    let (mean, std) = m.graph.normalization().expect("a Normalize node");
    let want_mean = [0.49f32, 0.48, 0.45];
    let want_std = [0.25f32, 0.24, 0.26];
    for c in 0..3 {
        assert!((mean[c] - want_mean[c]).abs() < 1e-6, "mean {mean:?}");
        assert!((std[c] - want_std[c]).abs() < 1e-6, "std {std:?}");
    }
    assert!(matches!(m.graph.nodes[1].op, Op::Normalize { .. }));
    assert_eq!(m.meta.normalization.as_ref().map(|n| n.0.len()), Some(3));
}

#[test]
fn a_scalar_mul_add_front_residual_add_and_reshape_chain_match_pytorch() {
    for name in ["resnet_op11", "resnet_op17"] {
        let m = matches_pytorch(name);
        assert!(
            ops(&m).iter().any(|o| matches!(o, Op::Add)),
            "{name}: no residual Add"
        );
        assert!(
            matches!(m.graph.nodes[1].op, Op::Normalize { .. }),
            "{name}: x*2-1 not a Normalize"
        );
    }
}

#[test]
fn gemm_with_trans_b_0_alpha_and_beta_matches_pytorch() {
    matches_pytorch("gemm_transb0_op13");
}

#[test]
fn matmul_then_add_becomes_one_linear_with_bias() {
    let m = matches_pytorch("matmul_add_op17");
    let last = &m.graph.nodes.last().unwrap().op;
    assert!(matches!(last, Op::Linear { b: Some(_), .. }), "{last:?}");
}

#[test]
fn the_keras_channels_last_flatten_is_folded_into_the_linear_weight() {
    for name in ["keras_transpose_op11", "keras_transpose_op17"] {
        matches_pytorch(name);
    }
}

#[test]
fn models_from_torchs_default_dynamo_exporter_at_opset_18_match_pytorch() {
    for name in [
        "dynamo_convnet_op18",
        "dynamo_resnet_op18",
        "dynamo_keras_op18",
    ] {
        matches_pytorch(name);
    }
}

#[test]
fn dropout_identity_and_a_trailing_softmax_are_removed() {
    let m = matches_pytorch("softmax_dropout_op17");
    let relus = ops(&m).iter().filter(|o| matches!(o, Op::Relu)).count();
    assert_eq!(relus, 2);
}

#[test]
fn f16_and_bf16_initializers_behind_casts_match_pytorch() {
    matches_pytorch("f16_op17");
    matches_pytorch("bf16_op17");
}

#[test]
fn initializers_in_an_external_data_file_load() {
    matches_pytorch("external_op17");
}

#[test]
fn an_external_data_file_that_is_missing_is_refused_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("external_op17.onnx");
    std::fs::copy(onnx("external_op17"), &copy).unwrap();
    let e = Model::load(&copy, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("external_op17.onnx.data"), "{e}");
}

#[test]
fn a_symbolic_spatial_axis_needs_input_shape() {
    let e = Model::load(&onnx("spatial_op17"), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("--input-shape") && e.contains("height"), "{e}");
    let opts = LoadOptions {
        input: Some([3, 8, 8]),
        ..Default::default()
    };
    let m = Model::load(&onnx("spatial_op17"), &opts).unwrap();
    check_on(&CpuBackend::REFERENCE, "spatial_op17", &m);
    check_on(&GpuBackend::new(EmuDriver::new()), "spatial_op17", &m);
}

#[test]
fn input_shape_that_contradicts_a_fixed_axis_is_refused() {
    let opts = LoadOptions {
        input: Some([3, 16, 16]),
        ..Default::default()
    };
    let e = Model::load(&onnx("convnet_op17"), &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--input-shape") && e.contains("16"), "{e}");
}

#[test]
fn an_unsupported_op_is_refused_naming_node_op_and_opset() {
    let e = Model::load(&onnx("unsupported_einsum"), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    for want in [
        "mix_einsum",
        "Einsum",
        "opset 13",
        "supported ops",
        "Conv",
        "Gemm",
    ] {
        assert!(e.contains(want), "`{want}` missing from: {e}");
    }
}

#[test]
fn a_truncated_onnx_file_is_refused_naming_it() {
    let e = Model::load(&onnx("truncated"), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("truncated.onnx") && e.contains("ONNX"), "{e}");
}

#[test]
fn arch_is_refused_for_an_onnx_model_whatever_its_extension() {
    let tmp = tempfile::tempdir().unwrap();
    let renamed = tmp.path().join("model.safetensors");
    std::fs::copy(onnx("convnet_op17"), &renamed).unwrap();
    // Told by content: the .safetensors name does not matter.
    let m = Model::load(&renamed, &LoadOptions::default()).unwrap();
    assert_eq!(m.graph.num_classes, 5);
    let opts = LoadOptions {
        arch: Some("resnet18".into()),
        ..Default::default()
    };
    let e = Model::load(&renamed, &opts).unwrap_err().to_string();
    assert!(e.contains("--arch") && e.contains("ONNX"), "{e}");
}

fn cwp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cwp"))
        .args(args)
        .output()
        .expect("cwp runs")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn cli_forward_takes_an_onnx_file_without_arch() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let input = dir().join("keras_transpose_op17.safetensors");
    let o = cwp(&[
        "forward",
        "--weights",
        s(&onnx("keras_transpose_op17")),
        "--input",
        s(&input),
        "--out",
        s(&out),
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = read_tensors(&out).unwrap();
    let want = expected("keras_transpose_op17");
    let p = Path::new("out");
    common::assert_tensor_rel(
        "cli logits",
        got.float("logits", p).unwrap(),
        want.float("logits", p).unwrap(),
        LOGITS_TOL,
    );
    common::assert_tensor_rel(
        "cli dx",
        got.float("dx", p).unwrap(),
        want.float("dx", p).unwrap(),
        DX_TOL,
    );
}

#[test]
fn cli_forward_refuses_an_unsupported_op_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let o = cwp(&[
        "forward",
        "--weights",
        s(&onnx("unsupported_einsum")),
        "--input",
        s(&dir().join("convnet_op17.safetensors")),
        "--out",
        s(&out),
        "--device",
        "cpu",
    ]);
    let msg = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        msg.contains("mix_einsum") && msg.contains("Einsum"),
        "{msg}"
    );
    assert!(!msg.contains("panicked"), "{msg}");
    assert!(!out.exists());
}

#[test]
fn cli_input_shape_in_c_h_w_form_fills_symbolic_axes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let args = |shape: Option<&'static str>| {
        let mut a = vec![
            "forward".to_string(),
            "--weights".into(),
            s(&onnx("spatial_op17")).into(),
            "--input".into(),
            s(&dir().join("spatial_op17.safetensors")).into(),
            "--out".into(),
            s(&out).into(),
            "--device".into(),
            "cpu".into(),
        ];
        if let Some(shape) = shape {
            a.extend(["--input-shape".into(), shape.into()]);
        }
        a
    };
    let run = |a: Vec<String>| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        cwp(&a)
    };
    let o = run(args(None));
    let msg = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && msg.contains("--input-shape"),
        "{msg}"
    );
    assert!(!out.exists());
    let o = run(args(Some("3,8,8")));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = read_tensors(&out).unwrap();
    let want = expected("spatial_op17");
    let p = Path::new("out");
    common::assert_tensor_rel(
        "cli logits",
        got.float("logits", p).unwrap(),
        want.float("logits", p).unwrap(),
        LOGITS_TOL,
    );
}

/// Five classes of 8x8 RGB images, a few each, in a `folder:` layout.
fn tiny_rgb_data(dir: &Path) -> String {
    let root = dir.join("tiny");
    for c in 0..5u8 {
        let class = root.join(format!("class{c}"));
        std::fs::create_dir_all(&class).unwrap();
        for k in 0..8u8 {
            let img = image::RgbImage::from_fn(8, 8, |x, y| {
                let v = |s: u32| ((s * 37 + 11 * c as u32 + 5 * k as u32) % 256) as u8;
                image::Rgb([v(x + 8 * y), v(2 * x + y + 1), v(x * y + 3)])
            });
            img.save(class.join(format!("{k}.png"))).unwrap();
        }
    }
    format!("folder:{}", root.display())
}

#[test]
fn cli_eval_and_a_short_search_run_on_an_onnx_model() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tiny_rgb_data(tmp.path());
    let weights = onnx("softmax_dropout_op17");
    let o = cwp(&[
        "eval",
        "--weights",
        s(&weights),
        "--data",
        &data,
        "--device",
        "cpu",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("Softmax"),
        "the removal of the Softmax is not noted: {stderr}"
    );
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["arch"], "onnx:softmax_dropout_op17");
    assert_eq!(report["accuracy"]["images"].as_u64(), Some(40));

    let out = tmp.path().join("search");
    let o = cwp(&[
        "search",
        "--weights",
        s(&weights),
        "--data",
        &data,
        "--out",
        s(&out),
        "--classes",
        "0,3",
        "--epochs",
        "1",
        "--top-k",
        "4",
        "--k-sweep",
        "none",
        "--quiet",
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report = std::fs::read_to_string(out.join("report.json")).unwrap();
    assert!(
        report.contains("onnx:softmax_dropout_op17"),
        "arch not recorded"
    );
    let r: serde_json::Value = serde_json::from_str(&report).unwrap();
    let mut classes: Vec<u64> = r["searches"]
        .as_array()
        .expect("a list of searches")
        .iter()
        .filter_map(|s| s["class"].as_u64())
        .collect();
    classes.dedup();
    assert_eq!(classes, [0, 3], "every asked class searched, none else");
}

#[test]
fn the_mobilenet_efficientnet_densenet_op_set_matches_pytorch_at_opsets_11_17_and_18() {
    for name in [
        "mobilenet_ops_op11",
        "mobilenet_ops_op17",
        "mobilenet_ops_op18",
    ] {
        let m = matches_pytorch(name);
        let ops = ops(&m);
        let has = |f: &dyn Fn(&Op) -> bool| ops.iter().any(|o| f(o));
        use classwise::backend::Activation as A;
        assert!(
            has(&|o| matches!(o, Op::Conv { p, .. } if p.groups == 8)),
            "{name}: depthwise"
        );
        assert!(
            has(&|o| matches!(o, Op::Conv { p, .. } if p.groups == 2 && p.dilation == 2)),
            "{name}: dilated grouped"
        );
        assert!(
            has(&|o| matches!(o, Op::Act(A::Clip { min, max }) if *min == 0.0 && *max == 6.0)),
            "{name}: ReLU6"
        );
        assert!(
            has(&|o| matches!(o, Op::Act(A::HardSigmoid { .. }))),
            "{name}: hardsigmoid"
        );
        assert!(
            has(&|o| matches!(o, Op::Act(A::LeakyRelu { .. }))),
            "{name}: leaky relu"
        );
        assert!(has(&|o| matches!(o, Op::Mul)), "{name}: SE gate");
        assert!(has(&|o| matches!(o, Op::Concat)), "{name}: concat");
        assert!(has(&|o| matches!(o, Op::Pad { .. })), "{name}: pad");
        assert!(has(&|o| matches!(o, Op::Affine { .. })), "{name}: affine");
        assert!(
            has(&|o| matches!(o, Op::MaxPool(p) if p.ceil_mode)),
            "{name}: ceil-mode max pool"
        );
        assert!(
            has(&|o| matches!(o, Op::AvgPool(p) if !p.count_include_pad)),
            "{name}: avg pool without padding"
        );
    }
}

/// An ONNX model built in place: `Relu(x [N, 2, 3, 3]) + c`, a global
/// pool and a flatten, with `c` of the given shape holding 0, 0.5, 1, ...
fn relu_add_model(c_shape: &[i64]) -> Vec<u8> {
    use classwise::onnx::proto::tensor_shape_proto::{dimension, Dimension};
    use classwise::onnx::proto::*;
    use prost::Message;
    let n = c_shape.iter().product::<i64>() as usize;
    let c = TensorProto {
        name: Some("c".into()),
        dims: c_shape.to_vec(),
        data_type: Some(1),
        float_data: (0..n).map(|i| i as f32 * 0.5).collect(),
        ..Default::default()
    };
    let node = |op: &str, ins: &[&str], out: &str| NodeProto {
        op_type: Some(op.into()),
        name: Some(out.into()),
        input: ins.iter().map(|s| s.to_string()).collect(),
        output: vec![out.into()],
        ..Default::default()
    };
    let dim = |v: Option<i64>| Dimension {
        value: Some(match v {
            Some(d) => dimension::Value::DimValue(d),
            None => dimension::Value::DimParam("N".into()),
        }),
        ..Default::default()
    };
    let info = |name: &str, dims: Vec<Option<i64>>| ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(1),
                shape: Some(TensorShapeProto {
                    dim: dims.into_iter().map(dim).collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    let graph = GraphProto {
        name: Some("relu_add".into()),
        node: vec![
            node("Relu", &["x"], "r"),
            node("Add", &["r", "c"], "a"),
            node("GlobalAveragePool", &["a"], "p"),
            node("Flatten", &["p"], "logits"),
        ],
        initializer: vec![c],
        input: vec![info("x", vec![None, Some(2), Some(3), Some(3)])],
        output: vec![info("logits", vec![None, Some(2)])],
        ..Default::default()
    };
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(13),
        }],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

#[test]
fn a_constant_is_per_channel_only_where_onnx_broadcasting_makes_it_so() {
    let dir = tempfile::tempdir().unwrap();
    // [2, 1, 1] lines up with the channels (ONNX broadcasts from the right).
    let ok = dir.path().join("per_channel.onnx");
    std::fs::write(&ok, relu_add_model(&[2, 1, 1])).unwrap();
    let m = Model::load(&ok, &LoadOptions::default()).unwrap();
    assert!(ops(&m).iter().any(|o| matches!(o, Op::Affine { .. })));
    let x = Tensor::new(&[1, 2, 3, 3], vec![1.0; 18]).unwrap();
    let out = classwise::forward::forward(&CpuBackend::REFERENCE, &m, &x, &[0]).unwrap();
    assert_eq!(out.logits.data(), &[1.0, 1.5]);
    // [3] lines up with W, not with the 2 channels: refused, not computed
    // as a per-channel shift.
    let bad = dir.path().join("along_w.onnx");
    std::fs::write(&bad, relu_add_model(&[3])).unwrap();
    let Err(err) = Model::load(&bad, &LoadOptions::default()) else {
        panic!("a [3] constant was taken as per-channel");
    };
    let err = err.to_string();
    assert!(err.contains("constant `c`") && err.contains("[3]"), "{err}");
    // [2] would be per-channel by count alone, yet it too runs along W.
    std::fs::write(&bad, relu_add_model(&[2])).unwrap();
    assert!(Model::load(&bad, &LoadOptions::default()).is_err());
}
