//! Architectures as graphs, with PyTorch parameter names.
