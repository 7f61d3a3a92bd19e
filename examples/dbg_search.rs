use classwise::backend::cpu::CpuBackend;
use classwise::backend::gpu::emu::EmuDriver;
use classwise::backend::gpu::fused::FusedModel;
use classwise::backend::gpu::selftest::*;
use classwise::backend::gpu::GpuBackend;
use classwise::backend::Backend;
use classwise::tensor::rel_l2;
use classwise::weights::read_tensors;
use classwise::zoo::{build, ModelSpec};
fn main() {
    let name = "/work/shared/fixtures/search_step_smallcnn_1x28.safetensors";
    let f = read_tensors(std::path::Path::new(name)).unwrap();
    let get = |k: &str| f.float(k, name.as_ref()).unwrap().clone();
    let gpu = GpuBackend::new(EmuDriver::new());
    let graph = build(&ModelSpec::new("smallcnn", [1, 28, 28], 10)).unwrap();
    let params = formula_params(&graph);
    let canvas = get("canvas").reshape(&[1, 1, 28, 28]).unwrap();
    let mask0 = get("mask0").reshape(&[1, 28, 28]).unwrap();
    let others = get("others");
    let h = (0.2, 0.8, 0.02);
    let cp: Vec<_> = params.iter().map(|t| CpuBackend.upload(t).unwrap()).collect();
    let c = search_step(&CpuBackend, &graph, &cp, &canvas, &mask0, &others, 3, h).unwrap();
    let gp: Vec<_> = params.iter().map(|t| gpu.upload(t).unwrap()).collect();
    let g = search_step(&gpu, &graph, &gp, &canvas, &mask0, &others, 3, h).unwrap();
    let fm = FusedModel::new(&gpu, &graph, &params).unwrap();
    let fz = search_step_fused(&fm, &gpu, &canvas, &mask0, &others, 3, h).unwrap();
    let want = get("dmask");
    let m1 = get("mask1").reshape(&[1,28,28]).unwrap();
    for (t, s) in [("cpu", &c), ("gpu", &g), ("fused", &fz)] {
        println!("{t}: dmask rel {:.3e} mismatches {} logits diff {:.3e}", rel_l2(s.dmask.data(), want.data()), mask_step_mismatches(&s.mask1, &m1, &want), classwise::tensor::max_abs_diff(s.logits.data(), get("logits").data()));
    }
    for i in 0..784 { if fz.mask1.data()[i] != m1.data()[i] { println!("{i} want dmask {:e} cpu {:e} fused {:e} gpu {:e} | m1 {} fused {}", want.data()[i], c.dmask.data()[i], fz.dmask.data()[i], g.dmask.data()[i], m1.data()[i], fz.mask1.data()[i]); break; } }
    println!("meta {:?}", f.metadata);
}
