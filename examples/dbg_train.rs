use classwise::backend::cpu::CpuBackend;
use classwise::backend::gpu::emu::EmuDriver;
use classwise::backend::gpu::selftest::*;
use classwise::backend::gpu::GpuBackend;
use classwise::backend::Backend;
use classwise::tensor::rel_l2;
use classwise::zoo::{build, ModelSpec};
use classwise::Tensor;
fn grads<B: Backend>(be: &B, graph: &classwise::graph::Graph, params: &[Tensor], x: &Tensor, labels: &[usize]) -> Vec<Option<Tensor>> {
    let mut p: Vec<_> = params.iter().map(|t| be.upload(t).unwrap()).collect();
    let n = labels.len();
    let trace = graph.forward_train(be, &mut p, be.upload(x).unwrap(), 0.1).unwrap();
    let (_, dl) = be.softmax_cross_entropy(trace.logits(), labels, &vec![1.0 / n as f32; n]).unwrap();
    let g = graph.backward(be, &p, &trace, dl, true).unwrap();
    g.params.iter().map(|g| g.as_ref().map(|g| be.download(g).unwrap())).collect()
}
fn main() {
    let gpu = GpuBackend::new(EmuDriver::new());
    let graph = build(&ModelSpec::new("smallcnn", [1, 28, 28], 10)).unwrap();
    let params = formula_params(&graph);
    let x = formula_input(&graph.input_shape(2));
    let labels = vec![1, 4];
    let c = grads(&CpuBackend, &graph, &params, &x, &labels);
    let g = grads(&gpu, &graph, &params, &x, &labels);
    for i in 0..params.len() {
        if let (Some(a), Some(b)) = (&g[i], &c[i]) {
            println!("{:40} {:?} {:.3e} gpu {:?} cpu {:?}", graph.params[i].name, a.shape(), rel_l2(a.data(), b.data()), &a.data()[..2], &b.data()[..2]);
        }
    }
    for n in &graph.nodes { println!("{:?} {:?}", n.op, n.shape); }
}
#[allow(dead_code)]
fn unused() {}
