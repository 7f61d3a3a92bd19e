//! classwise: class-wise pattern search (Zhao et al., "What Do Deep Nets
//! Learn? Class-wise Patterns Revealed in the Input Space") on a Rust engine
//! with a CPU reference backend and hand-written CUDA kernels.
//!
//! Data flows one way: [`data`] -> [`graph`] (built by [`zoo`], filled by
//! [`weights`]) -> [`backend`]; [`train`], [`search`] and [`report`] sit on top.

pub mod attack;
pub mod backend;
pub mod bench;
pub mod cleanse;
pub mod data;
pub mod demo;
pub mod device_model;
pub mod error;
pub mod eval;
pub mod forward;
pub mod graph;
pub mod io;
pub mod models;
pub mod onnx;
pub mod progress;
pub mod report;
pub mod scan;
pub mod search;
pub mod selftest;
pub mod tensor;
pub mod train;
pub mod units;
pub mod weights;
pub mod zoo;

pub use error::{Error, Result};
pub use tensor::Tensor;
