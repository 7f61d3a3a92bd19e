//! The graph ops (activations, Mul, Affine, Concat, Pad) reproduce
//! PyTorch's float64 outputs and input gradients, kinks included
//! (tests/fixtures/ops, written by tools/make_op_fixtures.py), on the CPU
//! reference and on the emulated GPU; and a small graph of all of them,
//! built with the Builder, gives PyTorch's output and input gradient
//! through the graph runner on both backends.

mod common;

use std::path::PathBuf;

use classwise::backend::cpu::CpuBackend;
use classwise::backend::gpu::emu::EmuDriver;
use classwise::backend::gpu::GpuBackend;
use classwise::backend::{Activation, Backend, Pad2d};
use classwise::graph::{Builder, Graph};
use classwise::weights::{read_tensors, TensorFile};
use classwise::Tensor;
use common::assert_close_abs;

/// Elementwise results: a few f32 ulps of the largest reference value.
const OP_TOL: f32 = 1e-6;
/// The graph chains eight ops and sums three gradient paths.
const GRAPH_TOL: f32 = 1e-5;

fn path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/ops")
        .join(format!("{name}.safetensors"))
}

struct Fixture {
    file: TensorFile,
    path: PathBuf,
}

impl Fixture {
    fn load(name: &str) -> Fixture {
        let path = path(name);
        let file = read_tensors(&path).unwrap_or_else(|e| panic!("{e}"));
        Fixture { file, path }
    }

    fn t(&self, name: &str) -> Tensor {
        self.file.float(name, &self.path).unwrap().clone()
    }

    fn check(&self, what: &str, got: &Tensor, name: &str, tol: f32) {
        let want = self.t(name);
        assert_eq!(got.shape(), want.shape(), "{what}: shape");
        assert_close_abs(
            &format!("{} {what}", self.path.display()),
            got.data(),
            want.data(),
            tol,
        );
    }
}

/// Runs `f` on the CPU reference and on the emulated GPU.
fn on_both(f: impl Fn(&dyn Fn(&str) -> String, &dyn Runner)) {
    f(&|s| format!("cpu {s}"), &CpuBackend::REFERENCE);
    f(&|s| format!("emu {s}"), &GpuBackend::new(EmuDriver::new()));
}

/// The ops under test, with host tensors in and out, for either backend.
trait Runner {
    fn act(&self, x: &Tensor, a: Activation) -> Tensor;
    fn act_back(&self, dy: &Tensor, x: &Tensor, a: Activation) -> Tensor;
    fn mul(&self, a: &Tensor, b: &Tensor) -> Tensor;
    fn mul_back(&self, dy: &Tensor, a: &Tensor, b: &Tensor) -> (Tensor, Tensor);
    fn affine(&self, x: &Tensor, s: &[f32], b: &[f32]) -> Tensor;
    fn affine_back(&self, dy: &Tensor, s: &[f32]) -> Tensor;
    fn concat(&self, xs: &[&Tensor]) -> Tensor;
    fn concat_back(&self, dy: &Tensor, c: &[usize]) -> Vec<Tensor>;
    fn pad(&self, x: &Tensor, p: Pad2d) -> Tensor;
    fn pad_back(&self, dy: &Tensor, p: Pad2d) -> Tensor;
    fn graph(&self, g: &Graph, x: &Tensor, dy: &Tensor) -> (Tensor, Tensor);
}

impl<B: Backend> Runner for B {
    fn act(&self, x: &Tensor, a: Activation) -> Tensor {
        let y = self.activation(&self.upload(x).unwrap(), a).unwrap();
        self.download(&y).unwrap()
    }
    fn act_back(&self, dy: &Tensor, x: &Tensor, a: Activation) -> Tensor {
        let (dy, x) = (self.upload(dy).unwrap(), self.upload(x).unwrap());
        self.download(&self.activation_backward(&dy, &x, a).unwrap())
            .unwrap()
    }
    fn mul(&self, a: &Tensor, b: &Tensor) -> Tensor {
        let (a, b) = (self.upload(a).unwrap(), self.upload(b).unwrap());
        self.download(&Backend::mul(self, &a, &b).unwrap()).unwrap()
    }
    fn mul_back(&self, dy: &Tensor, a: &Tensor, b: &Tensor) -> (Tensor, Tensor) {
        let up = |t: &Tensor| self.upload(t).unwrap();
        let (da, db) = self.mul_backward(&up(dy), &up(a), &up(b)).unwrap();
        (self.download(&da).unwrap(), self.download(&db).unwrap())
    }
    fn affine(&self, x: &Tensor, s: &[f32], b: &[f32]) -> Tensor {
        let y = Backend::affine(self, &self.upload(x).unwrap(), s, b).unwrap();
        self.download(&y).unwrap()
    }
    fn affine_back(&self, dy: &Tensor, s: &[f32]) -> Tensor {
        let dx = self.affine_backward(&self.upload(dy).unwrap(), s).unwrap();
        self.download(&dx).unwrap()
    }
    fn concat(&self, xs: &[&Tensor]) -> Tensor {
        let bufs: Vec<_> = xs.iter().map(|x| self.upload(x).unwrap()).collect();
        let refs: Vec<_> = bufs.iter().collect();
        self.download(&Backend::concat(self, &refs).unwrap())
            .unwrap()
    }
    fn concat_back(&self, dy: &Tensor, c: &[usize]) -> Vec<Tensor> {
        let parts = self.concat_backward(&self.upload(dy).unwrap(), c).unwrap();
        parts.iter().map(|p| self.download(p).unwrap()).collect()
    }
    fn pad(&self, x: &Tensor, p: Pad2d) -> Tensor {
        let y = self.pad2d(&self.upload(x).unwrap(), p).unwrap();
        self.download(&y).unwrap()
    }
    fn pad_back(&self, dy: &Tensor, p: Pad2d) -> Tensor {
        let dx = self.pad2d_backward(&self.upload(dy).unwrap(), p).unwrap();
        self.download(&dx).unwrap()
    }
    fn graph(&self, g: &Graph, x: &Tensor, dy: &Tensor) -> (Tensor, Tensor) {
        let trace = g.forward_trace(self, &[], self.upload(x).unwrap()).unwrap();
        let y = self.download(trace.logits()).unwrap();
        let grads = g
            .backward(self, &[], &trace, self.upload(dy).unwrap(), false)
            .unwrap();
        (y, self.download(&grads.dx).unwrap())
    }
}

fn check_activation(name: &str, act: Activation) {
    let f = Fixture::load(&format!("act_{name}"));
    let (x, dy) = (f.t("x"), f.t("dy"));
    on_both(|tag, be| {
        f.check(&tag("y"), &be.act(&x, act), "y", OP_TOL);
        f.check(&tag("dx"), &be.act_back(&dy, &x, act), "dx", OP_TOL);
    });
}

#[test]
fn sigmoid_matches_pytorch() {
    check_activation("sigmoid", Activation::Sigmoid);
}

#[test]
fn silu_matches_pytorch() {
    check_activation("silu", Activation::Silu);
}

#[test]
fn hardsigmoid_with_onnx_defaults_matches_pytorch_at_its_kinks() {
    check_activation(
        "hardsigmoid_onnx",
        Activation::HardSigmoid {
            alpha: 0.2,
            beta: 0.5,
        },
    );
}

#[test]
fn hardsigmoid_with_pytorch_slope_matches_pytorch_hardsigmoid_at_its_kinks() {
    check_activation(
        "hardsigmoid_torch",
        Activation::HardSigmoid {
            alpha: 1.0 / 6.0,
            beta: 0.5,
        },
    );
}

#[test]
fn hardswish_matches_pytorch_at_its_kinks() {
    check_activation("hardswish", Activation::HardSwish);
}

#[test]
fn clip_0_6_matches_pytorch_relu6_at_its_kinks() {
    check_activation("relu6", Activation::Clip { min: 0.0, max: 6.0 });
}

#[test]
fn clip_matches_pytorch_clamp_at_its_bounds() {
    check_activation(
        "clip",
        Activation::Clip {
            min: -1.0,
            max: 2.5,
        },
    );
}

#[test]
fn leaky_relu_matches_pytorch_at_zero() {
    check_activation("leaky_relu", Activation::LeakyRelu { alpha: 0.1 });
}

#[test]
fn mul_of_equal_shapes_matches_pytorch() {
    let f = Fixture::load("mul_same");
    let (a, b, dy) = (f.t("a"), f.t("b"), f.t("dy"));
    on_both(|tag, be| {
        f.check(&tag("y"), &be.mul(&a, &b), "y", OP_TOL);
        let (da, db) = be.mul_back(&dy, &a, &b);
        f.check(&tag("da"), &da, "da", OP_TOL);
        f.check(&tag("db"), &db, "db", OP_TOL);
    });
}

#[test]
fn mul_by_a_channel_gate_matches_pytorch_broadcast_in_both_gate_shapes() {
    let f = Fixture::load("mul_gate");
    let (a, b, dy) = (f.t("a"), f.t("b"), f.t("dy"));
    let (n, c) = (b.shape()[0], b.shape()[1]);
    let flat = b.clone().reshape(&[n, c]).unwrap();
    on_both(|tag, be| {
        f.check(&tag("y"), &be.mul(&a, &b), "y", OP_TOL);
        f.check(&tag("y, [N, C] gate"), &be.mul(&a, &flat), "y", OP_TOL);
        let (da, db) = be.mul_back(&dy, &a, &b);
        f.check(&tag("da"), &da, "da", OP_TOL);
        f.check(&tag("db"), &db, "db", OP_TOL);
        let (da, db) = be.mul_back(&dy, &a, &flat);
        f.check(&tag("da, [N, C] gate"), &da, "da", OP_TOL);
        assert_eq!(db.shape(), [n, c], "the gate gradient has the gate's shape");
        let db = db.reshape(&[n, c, 1, 1]).unwrap();
        f.check(&tag("db, [N, C] gate"), &db, "db", OP_TOL);
    });
}

fn check_affine(name: &str) {
    let f = Fixture::load(name);
    let (x, dy) = (f.t("x"), f.t("dy"));
    let (s, b) = (f.t("scale"), f.t("shift"));
    on_both(|tag, be| {
        f.check(&tag("y"), &be.affine(&x, s.data(), b.data()), "y", OP_TOL);
        f.check(&tag("dx"), &be.affine_back(&dy, s.data()), "dx", OP_TOL);
    });
}

#[test]
fn affine_with_per_channel_constants_matches_pytorch() {
    check_affine("affine_chan");
}

#[test]
fn affine_with_one_scale_and_shift_broadcasts_like_pytorch() {
    check_affine("affine_one");
}

#[test]
fn concat_matches_pytorch_cat_and_splits_the_gradient() {
    let f = Fixture::load("concat");
    let xs = [f.t("x0"), f.t("x1"), f.t("x2")];
    let dy = f.t("dy");
    let channels: Vec<usize> = xs.iter().map(|x| x.shape()[1]).collect();
    on_both(|tag, be| {
        f.check(
            &tag("y"),
            &be.concat(&[&xs[0], &xs[1], &xs[2]]),
            "y",
            OP_TOL,
        );
        let parts = be.concat_back(&dy, &channels);
        assert_eq!(parts.len(), 3);
        for (i, p) in parts.iter().enumerate() {
            f.check(&tag(&format!("dx{i}")), p, &format!("dx{i}"), OP_TOL);
        }
    });
}

#[test]
fn pad_matches_pytorch_zero_padding_and_crops_the_gradient() {
    let f = Fixture::load("pad");
    let (x, dy) = (f.t("x"), f.t("dy"));
    let (_, v) = f.file.int("pad", &f.path).unwrap();
    let p = Pad2d {
        top: v[0] as usize,
        bottom: v[1] as usize,
        left: v[2] as usize,
        right: v[3] as usize,
    };
    on_both(|tag, be| {
        f.check(&tag("y"), &be.pad(&x, p), "y", OP_TOL);
        f.check(&tag("dx"), &be.pad_back(&dy, p), "dx", OP_TOL);
    });
}

/// tools/make_op_fixtures.py's `block`: pad, hard swish, a squeeze-and-
/// excitation gate (global pool, affine, sigmoid, mul), a clip concatenated
/// to it, leaky ReLU, an affine by one constant, SiLU, flatten.
fn block_graph(scale: &[f32], shift: &[f32]) -> Graph {
    let mut g = Builder::new("ops_block", [4, 5, 5], 288);
    let x = g.input();
    let pad = Pad2d {
        top: 1,
        bottom: 0,
        left: 0,
        right: 1,
    };
    let p = g.pad(x, pad).unwrap();
    let a = g.act(p, Activation::HardSwish).unwrap();
    let gap = g.global_avg_pool(p);
    let af = g.affine(gap, scale.to_vec(), shift.to_vec()).unwrap();
    let gate = g.act(af, Activation::Sigmoid).unwrap();
    // The gate first: the Builder puts it second.
    let m = g.mul(gate, a).unwrap();
    let clip = g
        .act(
            p,
            Activation::Clip {
                min: -0.5,
                max: 0.5,
            },
        )
        .unwrap();
    let c = g.concat(&[m, clip]).unwrap();
    let e = g.act(c, Activation::LeakyRelu { alpha: 0.1 }).unwrap();
    let e = g.affine(e, vec![2.0], vec![-0.25]).unwrap();
    let s = g.act(e, Activation::Silu).unwrap();
    g.flatten(s);
    g.finish()
}

#[test]
fn a_graph_of_all_the_ops_matches_pytorch_forward_and_input_gradient() {
    let f = Fixture::load("graph_block");
    let graph = block_graph(f.t("scale").data(), f.t("shift").data());
    assert_eq!(graph.nodes.last().unwrap().shape, [288]);
    let (x, dy) = (f.t("x"), f.t("dy"));
    on_both(|tag, be| {
        let (y, dx) = be.graph(&graph, &x, &dy);
        f.check(&tag("graph y"), &y, "y", GRAPH_TOL);
        f.check(&tag("graph dx"), &dx, "dx", GRAPH_TOL);
    });
    // The eval fusion pass leaves these ops as they are: the fused graph
    // that the search runs gives the same output.
    let gpu = GpuBackend::new(EmuDriver::new());
    let model = classwise::device_model::DeviceModel::upload(&gpu, &graph, &[]).unwrap();
    f.check("fused graph y", &model.logits(&x).unwrap(), "y", GRAPH_TOL);
}

#[test]
fn builder_refuses_mismatched_shapes_with_clear_errors() {
    let mut g = Builder::new("ops_bad", [4, 6, 6], 10);
    let x = g.input();
    let gap = g.global_avg_pool(x);
    let three = g.affine(gap, vec![1.0], vec![0.0]).unwrap();
    let p = g.pad(x, Pad2d::default()).unwrap();
    assert_eq!(g.shape(p), [4, 6, 6]);
    let wide = g
        .pad(
            x,
            Pad2d {
                top: 0,
                bottom: 0,
                left: 1,
                right: 0,
            },
        )
        .unwrap();
    assert_eq!(g.shape(wide), [4, 6, 7]);
    let flat = g.flatten(x);
    let err = |r: classwise::Result<usize>| r.expect_err("refused").to_string();
    let e = err(g.mul(x, wide));
    assert!(e.contains("ops_bad") && e.contains("[4, 6, 7]"), "{e}");
    assert!(g.mul(x, three).is_ok() && g.mul(three, x).is_ok());
    let e = err(g.concat(&[x, wide]));
    assert!(e.contains("concat"), "{e}");
    assert!(err(g.concat(&[x])).contains("two or more"));
    let e = err(g.affine(x, vec![1.0, 2.0], vec![0.0]));
    assert!(e.contains("scale") && e.contains("4 channels"), "{e}");
    assert!(err(g.affine(x, vec![1.0], vec![f32::NAN])).contains("shift"));
    assert!(err(g.pad(flat, Pad2d::default())).contains("[C, H, W]"));
    let e = err(g.act(x, Activation::Clip { min: 2.0, max: 1.0 }));
    assert!(e.contains("min is above max"), "{e}");
    let c = g.concat(&[x, p, x]).unwrap();
    assert_eq!(g.shape(c), [12, 6, 6]);
}
