//! Grouped, depthwise and dilated convolutions and ceil-mode / exclude-pad
//! pooling match PyTorch's float64 results (tests/fixtures/conv, written by
//! tools/make_conv_fixtures.py): forward outputs and the gradients with
//! respect to the input, filter and bias, on the CPU reference and on the
//! GPU kernels run through the emulated driver.

use std::path::{Path, PathBuf};

use classwise::backend::cpu::CpuBackend;
use classwise::backend::gpu::emu::EmuDriver;
use classwise::backend::gpu::GpuBackend;
use classwise::backend::{Backend, ConvParams, PoolParams};
use classwise::weights::{read_tensors, TensorFile};
use classwise::Tensor;

/// Largest |got - want| allowed, relative to `max(1, max |want|)`: the
/// fixtures' sums have at most a few hundred f32 terms of magnitude <= 1,
/// whose rounding stays below 1e-5 of the largest value.
const TOL: f32 = 1e-5;

fn path_of(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/conv")
        .join(format!("{name}.safetensors"))
}

struct Fixture {
    file: TensorFile,
    path: PathBuf,
}

impl Fixture {
    fn open(name: &str) -> Fixture {
        let path = path_of(name);
        let file = read_tensors(&path).unwrap_or_else(|e| panic!("{e}"));
        Fixture { file, path }
    }

    fn t(&self, name: &str) -> &Tensor {
        self.file
            .float(name, &self.path)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn meta(&self, key: &str) -> usize {
        let v = self
            .file
            .metadata
            .get(key)
            .unwrap_or_else(|| panic!("{}: no metadata `{key}`", self.path.display()));
        v.parse()
            .unwrap_or_else(|_| panic!("{}: metadata `{key}` = {v:?}", self.path.display()))
    }

    fn conv_params(&self) -> ConvParams {
        ConvParams::new(self.meta("stride"), self.meta("pad"))
            .with_groups(self.meta("groups"))
            .with_dilation(self.meta("dilation"))
    }

    fn pool_params(&self) -> PoolParams {
        PoolParams::new(self.meta("kernel"), self.meta("stride"), self.meta("pad"))
            .with_ceil_mode(self.meta("ceil_mode") == 1)
            .with_count_include_pad(self.meta("count_include_pad") == 1)
    }

    fn is_max_pool(&self) -> bool {
        match self.file.metadata.get("op").map(String::as_str) {
            Some("max") => true,
            Some("avg") => false,
            other => panic!("{}: pool op {other:?}", self.path.display()),
        }
    }
}

fn assert_matches(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let scale = want.data().iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let diff = got
        .data()
        .iter()
        .zip(want.data())
        .map(|(g, w)| (g - w).abs())
        .fold(0.0f32, f32::max);
    assert!(
        diff <= TOL * scale,
        "{what}: max |diff| {diff:e} > {TOL:e} * {scale}"
    );
}

/// Forward, input, filter and bias gradients of one convolution fixture on
/// backend `be`.
fn check_conv<B: Backend>(be: &B, label: &str, name: &str) {
    let f = Fixture::open(name);
    let p = f.conv_params();
    let up = |t: &Tensor| be.upload(t).unwrap();
    let down = |b: &B::Buf| be.download(b).unwrap();
    let (x, w, b, dy) = (up(f.t("x")), up(f.t("w")), up(f.t("b")), up(f.t("dy")));
    let what = |t: &str| format!("{label} {name} {t}");
    let y = be.conv2d(&x, &w, Some(&b), p).unwrap();
    assert_matches(&what("y"), &down(&y), f.t("y"));
    let dx = be
        .conv2d_backward_data(&dy, &w, f.t("x").shape(), p)
        .unwrap();
    assert_matches(&what("dx"), &down(&dx), f.t("dx"));
    let (dw, db) = be
        .conv2d_backward_filter(&x, &dy, f.t("w").shape(), p, true)
        .unwrap();
    assert_matches(&what("dw"), &down(&dw), f.t("dw"));
    assert_matches(&what("db"), &down(&db.expect("bias gradient")), f.t("db"));
}

/// Forward and input gradient of one pooling fixture on backend `be`.
fn check_pool<B: Backend>(be: &B, label: &str, name: &str) {
    let f = Fixture::open(name);
    let p = f.pool_params();
    let x_shape = f.t("x").shape().to_vec();
    let (x, dy) = (be.upload(f.t("x")).unwrap(), be.upload(f.t("dy")).unwrap());
    let (y, dx) = if f.is_max_pool() {
        (
            be.max_pool2d(&x, p).unwrap(),
            be.max_pool2d_backward(&x, &dy, p).unwrap(),
        )
    } else {
        (
            be.avg_pool2d(&x, p).unwrap(),
            be.avg_pool2d_backward(&dy, &x_shape, p).unwrap(),
        )
    };
    let what = |t: &str| format!("{label} {name} {t}");
    assert_matches(&what("y"), &be.download(&y).unwrap(), f.t("y"));
    assert_matches(&what("dx"), &be.download(&dx).unwrap(), f.t("dx"));
}

/// One convolution fixture on the CPU reference and the emulated GPU.
fn conv(name: &str) {
    check_conv(&CpuBackend::REFERENCE, "cpu", name);
    check_conv(&GpuBackend::new(EmuDriver::new()), "emu", name);
}

/// One pooling fixture on the CPU reference and the emulated GPU.
fn pool(name: &str) {
    check_pool(&CpuBackend::REFERENCE, "cpu", name);
    check_pool(&GpuBackend::new(EmuDriver::new()), "emu", name);
}

#[test]
fn depthwise_3x3_stride_1_matches_pytorch() {
    conv("conv_depthwise_3x3_s1");
}

#[test]
fn depthwise_3x3_stride_2_matches_pytorch() {
    conv("conv_depthwise_3x3_s2");
}

#[test]
fn depthwise_5x5_stride_2_with_a_channel_multiplier_matches_pytorch() {
    conv("conv_depthwise_mult2_5x5_s2");
}

#[test]
fn two_groups_match_pytorch() {
    conv("conv_groups2_3x3");
}

#[test]
fn four_groups_stride_2_match_pytorch() {
    conv("conv_groups4_3x3_s2");
}

#[test]
fn dilation_2_matches_pytorch() {
    conv("conv_dilation2_3x3");
}

#[test]
fn dilated_depthwise_stride_2_matches_pytorch() {
    conv("conv_dilation2_depthwise_s2");
}

#[test]
fn ceil_mode_max_pool_3x3_stride_2_matches_pytorch() {
    pool("pool_max_ceil_3x3_s2");
}

#[test]
fn ceil_mode_max_pool_with_padding_matches_pytorch() {
    pool("pool_max_ceil_3x3_s2_p1");
}

#[test]
fn ceil_mode_max_pool_2x2_on_odd_sizes_matches_pytorch() {
    pool("pool_max_ceil_2x2_s2");
}

#[test]
fn avg_pool_counting_padding_matches_pytorch() {
    pool("pool_avg_count_pad");
}

#[test]
fn avg_pool_excluding_padding_matches_pytorch() {
    pool("pool_avg_exclude_pad");
}

#[test]
fn ceil_mode_avg_pool_counting_padding_matches_pytorch() {
    pool("pool_avg_ceil_count_pad");
}

#[test]
fn ceil_mode_avg_pool_excluding_padding_matches_pytorch() {
    pool("pool_avg_ceil_exclude_pad");
}

#[test]
fn ceil_mode_avg_pool_without_padding_divides_by_the_clipped_window() {
    pool("pool_avg_ceil_2x2");
}

/// Every file in the folder is checked by one of the tests above, so a
/// fixture added to the script cannot go unchecked.
#[test]
fn every_fixture_file_has_a_test() {
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/", file!())).unwrap();
    let dir = path_of("x").parent().unwrap().to_path_buf();
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().and_then(|s| s.to_str()) != Some("safetensors") {
            continue;
        }
        let stem = p.file_stem().unwrap().to_str().unwrap().to_string();
        assert!(
            src.contains(&format!("(\"{stem}\")")),
            "{}: no test reads it",
            p.display()
        );
        n += 1;
    }
    assert!(n >= 15, "{}: only {n} fixtures", Path::new(&dir).display());
}
