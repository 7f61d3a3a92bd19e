//! The emulated execution model itself (`kernels/emu/`): barriers, static and
//! dynamic shared memory, 2-D blocks, warp shuffles, early exit and deadlock
//! detection, each against a plain computation on the host. These checks are
//! exact: every kernel here moves values without arithmetic, or sums small
//! integers that are exact in f32.

use std::ffi::c_void;

use classwise::backend::gpu::driver::{DevPtr, Driver};
use classwise::backend::gpu::emu::EmuDriver;

#[repr(C)]
#[derive(Clone, Copy)]
struct RtArgs {
    n: i32,
    pad_: i32,
}

fn upload(d: &EmuDriver, v: &[f32]) -> DevPtr {
    let p = d.alloc(v.len() * 4).expect("alloc");
    d.htod(p, bytemuck::cast_slice(v)).expect("htod");
    p
}

fn download(d: &EmuDriver, p: DevPtr, n: usize) -> Vec<f32> {
    let mut v = vec![0f32; n];
    d.dtoh(p, bytemuck::cast_slice_mut(&mut v)).expect("dtoh");
    v
}

fn arg<T>(v: &T) -> *mut c_void {
    v as *const T as *mut c_void
}

fn launch(
    d: &EmuDriver,
    k: &str,
    grid: [u32; 3],
    block: [u32; 3],
    smem: u32,
    args: &mut [*mut c_void],
) {
    // SAFETY: each test passes the argument list its kernel declares.
    unsafe { d.launch(k, grid, block, smem, args) }.expect("launch");
}

#[test]
fn emu_runtime_block_sum() {
    let d = EmuDriver::new();
    let (blocks, n) = (5usize, 1000usize);
    let x: Vec<f32> = (0..blocks * n).map(|i| (i % 7) as f32).collect();
    let xp = upload(&d, &x);
    let out = d.alloc(blocks * 4).expect("alloc");
    let a = RtArgs {
        n: n as i32,
        pad_: 0,
    };
    launch(
        &d,
        "rt_block_sum",
        [blocks as u32, 1, 1],
        [256, 1, 1],
        0,
        &mut [arg(&a), arg(&xp), arg(&out)],
    );
    let got = download(&d, out, blocks);
    for (b, g) in got.iter().enumerate() {
        let want: f32 = x[b * n..(b + 1) * n].iter().sum();
        assert_eq!(*g, want, "block {b}");
    }
}

#[test]
fn emu_runtime_shuffles() {
    let d = EmuDriver::new();
    let threads = 128usize;
    let x: Vec<f32> = (0..threads).map(|i| i as f32).collect();
    let xp = upload(&d, &x);
    let out = d.alloc(threads * 16).expect("alloc");
    let a = RtArgs { n: 0, pad_: 0 };
    launch(
        &d,
        "rt_shuffles",
        [2, 1, 1],
        [64, 1, 1],
        0,
        &mut [arg(&a), arg(&xp), arg(&out)],
    );
    let got = download(&d, out, threads * 4);
    for t in 0..threads {
        let lane = t % 32;
        let warp = t - lane;
        let down = if lane + 1 < 32 { t + 1 } else { t };
        let up = if lane >= 3 { t - 3 } else { t };
        assert_eq!(got[4 * t], down as f32, "shfl_down at {t}");
        assert_eq!(
            got[4 * t + 1],
            (warp + (lane ^ 5)) as f32,
            "shfl_xor at {t}"
        );
        assert_eq!(got[4 * t + 2], (warp + 7) as f32, "shfl at {t}");
        assert_eq!(got[4 * t + 3], up as f32, "shfl_up at {t}");
    }
}

#[test]
fn emu_runtime_dynamic_shared_and_2d_blocks() {
    let d = EmuDriver::new();
    let x: Vec<f32> = (0..3 * 96).map(|i| i as f32).collect();
    let xp = upload(&d, &x);
    let out = d.alloc(x.len() * 4).expect("alloc");
    let a = RtArgs { n: 0, pad_: 0 };
    launch(
        &d,
        "rt_reverse_dynamic",
        [3, 1, 1],
        [96, 1, 1],
        96 * 4,
        &mut [arg(&a), arg(&xp), arg(&out)],
    );
    let got = download(&d, out, x.len());
    for b in 0..3 {
        for t in 0..96 {
            assert_eq!(got[b * 96 + t], x[b * 96 + 95 - t]);
        }
    }

    let tiles = 6usize;
    let x: Vec<f32> = (0..tiles * 256).map(|i| i as f32).collect();
    let xp = upload(&d, &x);
    let out = d.alloc(x.len() * 4).expect("alloc");
    launch(
        &d,
        "rt_transpose16",
        [3, 2, 1],
        [16, 16, 1],
        0,
        &mut [arg(&a), arg(&xp), arg(&out)],
    );
    let got = download(&d, out, x.len());
    for t in 0..tiles {
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(got[t * 256 + i * 16 + j], x[t * 256 + j * 16 + i]);
            }
        }
    }
}

#[test]
fn emu_runtime_early_exit_does_not_block_barrier() {
    let d = EmuDriver::new();
    let x: Vec<f32> = (0..256).map(|i| i as f32).collect();
    let xp = upload(&d, &x);
    let out = d.alloc(256 * 4).expect("alloc");
    d.memset_zero(out, 256 * 4).expect("memset");
    let a = RtArgs { n: 100, pad_: 0 };
    launch(
        &d,
        "rt_early_exit",
        [1, 1, 1],
        [256, 1, 1],
        0,
        &mut [arg(&a), arg(&xp), arg(&out)],
    );
    let got = download(&d, out, 256);
    for (t, g) in got.iter().take(100).enumerate() {
        assert_eq!(*g, (99 - t) as f32);
    }
    assert!(got[100..].iter().all(|v| *v == 0.0));
}

#[test]
fn emu_runtime_deadlock_is_an_error_not_a_hang() {
    let d = EmuDriver::new();
    let out = d.alloc(32 * 4).expect("alloc");
    let a = RtArgs { n: 0, pad_: 0 };
    // SAFETY: the argument list matches rt_deadlock.
    let err = unsafe {
        d.launch(
            "rt_deadlock",
            [2, 1, 1],
            [32, 1, 1],
            0,
            &mut [arg(&a), arg(&out)],
        )
    }
    .expect_err("a deadlock must fail the launch");
    assert!(err.to_string().contains("deadlock"), "{err}");
}

#[test]
fn emu_runtime_bad_launches_are_errors() {
    let d = EmuDriver::new();
    let out = d.alloc(64).expect("alloc");
    let a = RtArgs { n: 0, pad_: 0 };
    for (grid, block) in [
        ([1, 1, 1], [2048, 1, 1]),
        ([0, 1, 1], [32, 1, 1]),
        ([1, 1, 1], [0, 1, 1]),
    ] {
        // SAFETY: the launch is refused before any thread runs.
        let r = unsafe { d.launch("rt_deadlock", grid, block, 0, &mut [arg(&a), arg(&out)]) };
        assert!(r.is_err(), "grid {grid:?} block {block:?} must be refused");
    }
    // SAFETY: unknown kernels are refused before anything runs.
    let r = unsafe { d.launch("no_such_kernel", [1, 1, 1], [1, 1, 1], 0, &mut []) };
    assert!(r.unwrap_err().to_string().contains("no_such_kernel"));
}

#[test]
fn emu_runtime_memory_limit_and_range_checks() {
    let d = EmuDriver::with_memory_limit(1 << 20);
    let p = d.alloc(1 << 19).expect("half the limit fits");
    assert!(d.alloc(1 << 20).is_err(), "over the limit must fail");
    let mut host = vec![0u8; 16];
    assert!(
        d.dtoh(p + (1 << 19) - 8, &mut host).is_err(),
        "copy past the end must fail"
    );
    d.free(p);
    assert!(d.alloc(1 << 20).is_ok(), "freed memory is available again");
}

/// A `CWP_NVRTC_LIB` that names no library is a clear error naming the
/// variable, not a panic (cudarc itself panics on a missing library).
#[test]
fn emu_missing_nvrtc_is_a_clear_error() {
    // This test binary never loads NVRTC otherwise, so the variable is read here first.
    std::env::set_var("CWP_NVRTC_LIB", "/nonexistent/libnvrtc.so.13");
    let err = classwise::backend::gpu::nvrtc::ensure_nvrtc().expect_err("no NVRTC at that path");
    let msg = err.to_string();
    assert!(
        msg.contains("CWP_NVRTC_LIB") && msg.contains("/nonexistent"),
        "{msg}"
    );
    assert!(classwise::backend::gpu::nvrtc::version().is_err());
}
