"""PyTorch twins of the Rust seed models (models/ crate): same layers, same
parameter names and layouts (linear weights are [in, out]), same masking and
scoring, so one forward and backward from the same weights must agree."""
