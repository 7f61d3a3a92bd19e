//! Safetensors weights in and out.
