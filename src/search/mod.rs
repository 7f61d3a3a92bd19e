//! Class-wise pattern search: canvas, mask optimisation, top-k pattern, predictive power.
