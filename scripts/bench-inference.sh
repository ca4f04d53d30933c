#!/usr/bin/env bash
# Inference benchmark (issue: inference): Chartline's Gemma 3 and llama.cpp on the same
# GGUF, same prompt shape, 2 threads, in one run; then the memory-bandwidth ceiling.
# Needs llama-cpp-python (built from PyPI, 15-20 minutes once; kept out of CI) in a venv:
#   python3 -m venv /tmp/llamacpp-venv && /tmp/llamacpp-venv/bin/pip install llama-cpp-python==0.3.36
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${LLAMACPP_VENV:-/tmp/llamacpp-venv}"
model="${CHARTLINE_MODELS_DIR:-models}/gemma3-270m/gemma-3-270m-q4_k_m.gguf"
bash scripts/install-models.sh >/dev/null
cargo build --locked --release -q -p chartline-inference --example bench_gguf
echo "== Chartline (own Gemma 3 on candle, own Q8_0/Q5_0/Q4_K kernels) =="
CANDLE_NUM_THREADS="${BENCH_THREADS:-2}" "${CARGO_TARGET_DIR:-target}/release/examples/bench_gguf"
echo "== Chartline with candle's kernels for every matrix (for comparison) =="
CANDLE_NUM_THREADS="${BENCH_THREADS:-2}" "${CARGO_TARGET_DIR:-target}/release/examples/bench_gguf" --candle-kernels | grep -E "^gemma"
echo "== llama.cpp (llama-cpp-python) and the bandwidth ceiling =="
BENCH_THREADS="${BENCH_THREADS:-2}" "$venv/bin/python" scripts/bench_llamacpp.py "$model"
