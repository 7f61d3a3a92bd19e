//! The search step as a run makes it: a window of steps that stays on the
//! device. Its batches are gathered there by row index, its losses, masks
//! and finiteness counts wait there, and the host reads them once, when the
//! window ends. It must give the bits of the plain one-step function, on
//! the CPU and on the GPU backend (emulated), and copy nothing between host
//! and device while it steps.

mod common;

use classwise::backend::cpu::CpuBackend;
use classwise::backend::gpu::emu::EmuDriver;
use classwise::backend::gpu::GpuBackend;
use classwise::backend::Backend;
use classwise::device_model::DeviceModel;
use classwise::search::window::Window;
use classwise::selftest::formula_params;
use classwise::Tensor;
use common::window::*;

#[test]
fn a_window_gives_the_bits_of_one_step_at_a_time_on_the_cpu() {
    window_equals_step_by_step(&CpuBackend::REFERENCE);
}

#[test]
fn a_window_gives_the_bits_of_one_step_at_a_time_on_the_gpu_backend() {
    window_equals_step_by_step(&GpuBackend::new(EmuDriver::new()));
}

#[test]
fn a_window_copies_nothing_between_host_and_device_until_it_ends() {
    let gpu = GpuBackend::new(EmuDriver::new());
    let g = graph();
    let model = DeviceModel::upload(&gpu, &g, &formula_params(&g)).unwrap();
    let cfg = cfg();
    let canvas = Tensor::full(&[S, 1, 28, 28], 0.25);
    let mask = Tensor::full(&[S, 28, 28], 0.5);
    let images = gpu.upload(&image_set()).unwrap();
    let mut reads = Vec::new();
    for steps in [2, 5] {
        let table = table(steps);
        let mut win = Window::new(
            &model,
            &cfg,
            &images,
            &table,
            &[1, 2],
            &[false, true],
            &canvas,
            &mask,
            0,
        )
        .unwrap();
        let before = gpu.driver().host_traffic();
        while !win.is_full() {
            win.step().unwrap();
        }
        let during = gpu.driver().host_traffic();
        assert_eq!(
            (during.uploads, during.downloads, during.syncs),
            (before.uploads, before.downloads, before.syncs),
            "{steps} steps copied or waited"
        );
        let launched = gpu.driver().host_traffic().graph_launches - before.graph_launches;
        assert_eq!(
            launched,
            steps - 1,
            "every step after the first is one recorded submission"
        );
        win.finish().unwrap();
        let after = gpu.driver().host_traffic();
        assert_eq!(after.uploads, before.uploads, "finishing uploads nothing");
        reads.push(after.downloads - before.downloads);
    }
    assert_eq!(
        reads[0], reads[1],
        "a window's read-back does not grow with its steps"
    );
    assert!(reads[0] <= 5, "{} reads at the end of a window", reads[0]);
}

#[test]
fn a_window_refuses_shapes_that_do_not_make_whole_steps() {
    let cpu = CpuBackend::REFERENCE;
    let g = graph();
    let model = DeviceModel::upload(&cpu, &g, &formula_params(&g)).unwrap();
    let cfg = cfg();
    let images = image_set();
    let canvas = Tensor::full(&[S, 1, 28, 28], 0.25);
    let mask = Tensor::full(&[S, 28, 28], 0.5);
    let open = |rows: &[u32]| {
        Window::new(
            &model,
            &cfg,
            &images,
            rows,
            &[1, 2],
            &[false; 2],
            &canvas,
            &mask,
            0,
        )
    };
    let whole = table(1);
    let e = open(&whole[..whole.len() - 1])
        .err()
        .expect("a partial step is refused")
        .to_string();
    assert!(e.contains("3 rows"), "{e}");
    let mut win = open(&whole).unwrap();
    win.step().unwrap();
    assert!(win.step().is_err(), "a step past the window's end");
}

/// What a CUDA graph cannot hold, the emulator refuses to record: host
/// copies and waits, memory allocated in the recording that outlives it,
/// and freeing memory from before it (every replay would free it again).
#[test]
fn the_emulator_refuses_a_recording_a_cuda_graph_could_not_replay() {
    use classwise::backend::gpu::Driver;
    let drv = EmuDriver::new();
    let older = drv.alloc(64).unwrap();

    drv.begin_capture().unwrap();
    assert!(
        drv.htod(older, &[0u8; 4]).is_err(),
        "an upload while recording"
    );
    let mut back = [0u8; 4];
    assert!(
        drv.dtoh(older, &mut back).is_err(),
        "a download while recording"
    );
    assert!(drv.synchronize().is_err(), "a wait while recording");
    let scratch = drv.alloc(32).unwrap();
    drv.memset_zero(scratch, 32).unwrap();
    drv.dtod(older, scratch, 32).unwrap();
    drv.free(scratch);
    let g = drv
        .end_capture()
        .expect("copies on the device and freed scratch are fine");
    drv.htod(older, &[7u8; 64]).unwrap();
    drv.launch_graph(g).unwrap();
    let mut now = [1u8; 64];
    drv.dtoh(older, &mut now).unwrap();
    assert_eq!(&now[..32], &[0u8; 32], "the replay zeroed and copied");
    assert_eq!(&now[32..], &[7u8; 32]);
    drv.destroy_graph(g);

    drv.begin_capture().unwrap();
    let _kept = drv.alloc(32).unwrap();
    let e = drv.end_capture().unwrap_err().to_string();
    assert!(e.contains("outlive"), "{e}");

    drv.begin_capture().unwrap();
    drv.free(older);
    let e = drv.end_capture().unwrap_err().to_string();
    assert!(e.contains("before the recording"), "{e}");
}
