#!/usr/bin/env bash
# The whole Rust test suite with every CUDA path on the CPU emulator: builds
# the fake libcuda.so (emu/libcuda/, into target/emu/libcuda/) and runs
# `cargo test --release` against it with MOEREC_REQUIRE_GPU=1, so each test
# that runs on "CUDA device 0" runs the real kernels (kernels/*.cu, compiled
# with g++) through the real Rust launchers and cudarc. No GPU needed; the
# kernels still need nvcc at build time (build.rs embeds their PTX, which the
# fake driver checks its modules against). Extra arguments go to cargo test.
#
# MALLOC_PERTURB_ makes a launch that pushes fewer arguments than its kernel
# takes read malloc's fill pattern, which the fake driver reports.
# EMU_SCHEDULE=reverse|random:SEED changes the order threads run between
# barriers (emu/README.md).
#
# It tests the kernel crate (the workspace's root package): the models crate
# (models/) runs on candle's CPU device and has no CUDA path to emulate.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
lib=$(bash emu/libcuda/build.sh)
export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MOEREC_REQUIRE_GPU=1 MALLOC_PERTURB_=165
cargo test --release "$@"
