//! The tensor-core and async-copy instructions of `kernels/mma.cuh` under
//! the emulated driver (`kernels/mma_check.cu`): every fragment element is
//! distinct, so a wrong lane -> element mapping changes the result, and the
//! result is held against a plain matrix product computed here. The values
//! are small integers, exact in tf32 and bf16 and in every partial sum, so
//! these checks are exact.

use std::ffi::c_void;

use classwise::backend::gpu::driver::{DevPtr, Driver};
use classwise::backend::gpu::emu::EmuDriver;

#[repr(C)]
#[derive(Clone, Copy)]
struct MmaCheckArgs {
    n: i32,
    pad_: i32,
}

fn upload<T: bytemuck::Pod>(d: &EmuDriver, v: &[T]) -> DevPtr {
    let bytes: &[u8] = bytemuck::cast_slice(v);
    let p = d.alloc(bytes.len()).expect("alloc");
    d.htod(p, bytes).expect("htod");
    p
}

fn download<T: bytemuck::Pod + Default + Clone>(d: &EmuDriver, p: DevPtr, n: usize) -> Vec<T> {
    let mut v = vec![T::default(); n];
    d.dtoh(p, bytemuck::cast_slice_mut(&mut v)).expect("dtoh");
    v
}

fn arg<T>(v: &T) -> *mut c_void {
    v as *const T as *mut c_void
}

fn launch(d: &EmuDriver, k: &str, block: u32, args: &mut [*mut c_void]) {
    // SAFETY: each test passes the argument list its kernel declares.
    unsafe { d.launch(k, [1, 1, 1], [block, 1, 1], 0, args) }.expect("launch");
}

/// `rows x cols` distinct integers in [-128, 128] (53 is a unit mod 257).
fn distinct(rows: usize, cols: usize, salt: i32) -> Vec<f32> {
    assert!(rows * cols <= 257);
    (0..rows * cols)
        .map(|i| ((i as i32 * 53 + salt) % 257 - 128) as f32)
        .collect()
}

fn matmul_add(a: &[f32], b: &[f32], c: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = c.to_vec();
    for i in 0..m {
        for j in 0..n {
            let mut s = c[i * n + j] as f64;
            for kk in 0..k {
                s += a[i * k + kk] as f64 * b[kk * n + j] as f64;
            }
            out[i * n + j] = s as f32;
        }
    }
    out
}

fn run_mma(kernel: &str, k: usize) -> (Vec<f32>, Vec<f32>) {
    let d = EmuDriver::new();
    let a = distinct(16, k, 5);
    let b = distinct(k, 8, 11);
    let c = distinct(16, 8, 23);
    let (ap, bp, cp) = (upload(&d, &a), upload(&d, &b), upload(&d, &c));
    let dp = d.alloc(16 * 8 * 4).expect("alloc");
    let args = MmaCheckArgs { n: 0, pad_: 0 };
    launch(
        &d,
        kernel,
        32,
        &mut [arg(&args), arg(&ap), arg(&bp), arg(&cp), arg(&dp)],
    );
    (download(&d, dp, 128), matmul_add(&a, &b, &c, 16, k, 8))
}

#[test]
fn mma_tf32_m16n8k8_equals_the_matrix_product() {
    let (got, want) = run_mma("mc_mma_tf32", 8);
    assert_eq!(got, want);
}

#[test]
fn mma_bf16_m16n8k16_equals_the_matrix_product() {
    let (got, want) = run_mma("mc_mma_bf16", 16);
    assert_eq!(got, want);
}

/// tf32 by cvt.rna: round to nearest on the top 19 bits, ties away from
/// zero; bf16 by cvt.rn: nearest, ties to even. Checked on exact ties,
/// values just off a tie, negatives, and Inf/NaN.
#[test]
fn operand_conversions_round_as_the_ptx_isa_says() {
    let d = EmuDriver::new();
    let one = 1.0f32.to_bits();
    let xs: Vec<f32> = vec![
        f32::from_bits(one | 0x1000),   // tf32 tie: away -> up
        f32::from_bits(one | 0x3000),   // tf32 tie above an odd value: up
        f32::from_bits(one | 0x0fff),   // just below the tie: down
        -f32::from_bits(one | 0x1000),  // negative tie: away from zero
        f32::from_bits(one | 0x8000),   // bf16 tie on an even value: stays
        f32::from_bits(one | 0x1_8000), // bf16 tie on an odd value: up
        f32::from_bits(one | 0x8001),   // just above the bf16 tie: up
        f32::INFINITY,
        f32::NAN,
        3.0,
    ];
    let xp = upload(&d, &xs);
    let out = d.alloc(xs.len() * 8).expect("alloc");
    let a = MmaCheckArgs {
        n: xs.len() as i32,
        pad_: 0,
    };
    // SAFETY: mc_convert takes (args, const float*, unsigned*).
    unsafe {
        d.launch(
            "mc_convert",
            [1, 1, 1],
            [64, 1, 1],
            0,
            &mut [arg(&a), arg(&xp), arg(&out)],
        )
    }
    .expect("launch");
    let got: Vec<u32> = download(&d, out, xs.len() * 2);
    let tf32 = |u: u32| -> u32 {
        // nearest, ties away: compare the dropped 13 bits with half an ulp
        let (keep, drop) = (u & !0x1fff, u & 0x1fff);
        if drop >= 0x1000 {
            keep + 0x2000
        } else {
            keep
        }
    };
    let bf16 = |u: u32| -> u32 {
        let (hi, lo) = (u >> 16, u & 0xffff);
        if lo > 0x8000 || (lo == 0x8000 && hi & 1 == 1) {
            hi + 1
        } else {
            hi
        }
    };
    for (i, x) in xs.iter().enumerate() {
        let (t, b) = (got[2 * i], got[2 * i + 1]);
        if x.is_nan() {
            assert!(f32::from_bits(t).is_nan(), "tf32(NaN) = {t:#x}");
            assert!(
                f32::from_bits((b & 0xffff) << 16).is_nan(),
                "bf16(NaN) = {b:#x}"
            );
            continue;
        }
        assert_eq!(t, tf32(x.to_bits()), "tf32 of {:#x}", x.to_bits());
        assert_eq!(b & 0xffff, bf16(x.to_bits()), "bf16 of {:#x}", x.to_bits());
        assert_eq!(
            b >> 16,
            bf16((-x).to_bits()),
            "bf16 of {:#x}",
            (-x).to_bits()
        );
    }
}

#[test]
fn ldmatrix_x1_x2_x4_give_each_lane_its_row_words() {
    let d = EmuDriver::new();
    let src: Vec<u32> = (0..128u32).map(|i| 0x1000_0000 + i * 0x0001_0003).collect();
    let sp = upload(&d, &src);
    let out = d.alloc(4 * 128 * 4).expect("alloc");
    let a = MmaCheckArgs { n: 0, pad_: 0 };
    launch(&d, "mc_ldmatrix", 32, &mut [arg(&a), arg(&sp), arg(&out)]);
    let got: Vec<u32> = download(&d, out, 512);
    for n in [1usize, 2, 4] {
        for lane in 0..32 {
            for i in 0..4 {
                // matrix i, row lane / 4, 32-bit word lane % 4
                let want = if i < n {
                    src[(8 * i + lane / 4) * 4 + lane % 4]
                } else {
                    0
                };
                assert_eq!(
                    got[(n - 1) * 128 + lane * 4 + i],
                    want,
                    "x{n} lane {lane} register {i}"
                );
            }
        }
    }
}

#[test]
fn cp_async_groups_complete_in_order_and_zero_fill() {
    let d = EmuDriver::new();
    let src: Vec<f32> = (0..160).map(|i| i as f32 + 0.5).collect();
    let sp = upload(&d, &src);
    let out = d.alloc(320 * 4).expect("alloc");
    let a = MmaCheckArgs { n: 1, pad_: 0 };
    launch(&d, "mc_cp_async", 32, &mut [arg(&a), arg(&sp), arg(&out)]);
    let got: Vec<f32> = download(&d, out, 320);
    for t in 0..32 {
        let u = (t + 1) % 32; // each thread reads its neighbour's copy
        for i in 0..4 {
            assert_eq!(got[4 * t + i], src[4 * u + i], "16-byte copy, thread {t}");
            let read = (u % 5) * 4 / 4;
            let want = if i < read { src[4 * u + i] } else { 0.0 };
            assert_eq!(got[160 + 4 * t + i], want, "zero-filled copy, thread {t}");
        }
        let want = if u % 2 == 1 { src[128 + u] } else { 0.0 };
        assert_eq!(got[128 + t], want, "4-byte copy, thread {t}");
        // The emulator performs a copy only when a wait says it must be
        // done, so a kernel that reads too early sees the old contents.
        assert_eq!(got[288 + t], -7.0, "read before the wait, thread {t}");
    }
}
