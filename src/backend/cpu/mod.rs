//! The CPU reference backend: plain NCHW `f32`, im2col + GEMM for
//! convolutions, rayon for threads. It is the oracle for the GPU path.

/// The CPU reference backend.
#[derive(Clone, Debug, Default)]
pub struct CpuBackend;
