//! The GPU backend: host side of the CUDA path, generic over a driver.
