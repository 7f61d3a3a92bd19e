use classwise::backend::cpu::CpuBackend;
use classwise::backend::gpu::emu::EmuDriver;
use classwise::backend::gpu::fused::FusedModel;
use classwise::backend::gpu::selftest::*;
use classwise::backend::gpu::GpuBackend;
use classwise::zoo::{build, ModelSpec};
fn main() {
    let arch = std::env::args().nth(1).unwrap_or("resnet18".into());
    let hw: usize = std::env::args().nth(2).map(|s| s.parse().unwrap()).unwrap_or(32);
    let n: usize = std::env::args().nth(3).map(|s| s.parse().unwrap()).unwrap_or(2);
    let classes = if hw == 224 { 1000 } else { 10 };
    let gpu = GpuBackend::new(EmuDriver::new());
    let graph = build(&ModelSpec::new(&arch, [3, hw, hw], classes)).unwrap();
    let params = formula_params(&graph);
    let x = formula_input(&graph.input_shape(n));
    let t = std::time::Instant::now();
    let _ = logits_and_input_grad(&CpuBackend, &graph, &params, &x).unwrap();
    println!("cpu {:.2}s", t.elapsed().as_secs_f64());
    let t = std::time::Instant::now();
    let _ = logits_and_input_grad(&gpu, &graph, &params, &x).unwrap();
    println!("emu graph runner {:.2}s", t.elapsed().as_secs_f64());
    let f = FusedModel::new(&gpu, &graph, &params).unwrap();
    let t = std::time::Instant::now();
    let labels: Vec<usize> = (0..n).map(|i| (3 * i + 1) % classes).collect();
    let _ = f.logits_and_input_grad(&x, &labels, &vec![1.0 / n as f32; n]).unwrap();
    println!("emu fused {:.2}s  ({:.2} GFLOP fwd)", t.elapsed().as_secs_f64(), graph.flops_per_image() as f64 * n as f64 / 1e9);
}
