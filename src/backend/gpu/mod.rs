//! The GPU backend: host side of the CUDA path, generic over a driver.

pub mod driver;
pub mod emu;
pub mod kernels;
pub mod nvrtc;
