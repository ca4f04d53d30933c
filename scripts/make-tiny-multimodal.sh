#!/usr/bin/env bash
# Regenerate the tiny random-weight multimodal fixtures used by the Rust (candle) tests:
#
#   tests/fixtures/tiny-medgemma/        Gemma3ForConditionalGeneration (google/medgemma-4b-it's
#                                        architecture), random weights, Hub tensor names, reference.json
#   tests/fixtures/tiny-medsiglip/       SiglipModel (google/medsiglip-448's architecture), same
#   tests/fixtures/image-preprocessing.json
#                                        HF image-processor / pydicom reference values for the real
#                                        images in shared/fixtures/images (read-only input)
#   tests/fixtures/tensor-manifest.json  tensor names and shapes of both safetensors files
#
# The fixtures are committed; CI does NOT run this (the Rust tests only read the files).
#
# Needs: python3 (3.10-3.12; tested with 3.11) with the venv module, network access to PyPI only
# (no model hub, no download.pytorch.org), ~7 GB of disk for the venv: torch's PyPI wheel for
# linux x86_64 is the CUDA build and pulls ~3 GB of nvidia-* wheels, which are installed but never
# used (everything runs on CPU). PyPI has no CPU-only torch wheel for x86_64 linux, and torch's
# CUDA wheel refuses to import without the nvidia-* libraries, so they are installed.
#
# Time: first run ~3 min to build the venv (download + install) plus ~1 min to generate, on 2
# cores; later runs reuse the venv (~1 min). Everything runs on one CPU thread.
#
# Deterministic: fixed seeds, one thread, pinned versions -> running it twice gives byte-identical
# files. `--check` regenerates into a temp folder and compares with tests/fixtures (exit 1 on diff).
#
# Env: CHARTLINE_REF_VENV      venv location (default /tmp/chartline-ref-venv)
#      CHARTLINE_FIXTURE_IMAGES images folder (default <repo>/../shared/fixtures/images)
#      PYTHON                   interpreter used to create the venv (default python3)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
VENV="${CHARTLINE_REF_VENV:-/tmp/chartline-ref-venv}"
PYTHON="${PYTHON:-python3}"
IMAGES="${CHARTLINE_FIXTURE_IMAGES:-$REPO_ROOT/../shared/fixtures/images}"

CHECK=0
if [[ "${1:-}" == "--check" ]]; then CHECK=1; fi

# ------------------------------------------------------------------ pins ----
# Direct requirements. transformers 4.57.x is the last 4.x line: it saves Gemma 3 multimodal
# checkpoints with the legacy Hub key names (language_model.model.*, vision_tower.*, ...).
REQUIREMENTS=(
  "torch==2.8.0"
  "transformers==4.57.6"
  "tokenizers==0.22.1"
  "safetensors==0.6.2"
  "numpy==2.2.6"
  "pillow==11.3.0"
  "pydicom==3.0.1"
  "pylibjpeg==2.1.0"
  "pylibjpeg-openjpeg==2.5.0"
  "huggingface-hub==0.35.3"
)
# Transitive pure-Python dependencies, pinned too (torch==2.8.0 pins its nvidia-* and triton).
CONSTRAINTS=(
  "filelock==4.3.1"
  "fsspec==2026.9.0"
  "hf-xet==1.8.0"
  "Jinja2==3.1.6"
  "MarkupSafe==3.0.4"
  "mpmath==1.3.0"
  "networkx==3.6.1"
  "packaging==26.4"
  "PyYAML==6.0.4"
  "regex==2026.11.19"
  "requests==2.34.2"
  "certifi==2026.10.19.post1"
  "charset-normalizer==3.5.3"
  "idna==3.20"
  "urllib3==2.8.0"
  "sympy==1.14.0"
  "tqdm==4.70.1"
  "typing_extensions==4.16.0"
)

# ------------------------------------------------------------------ venv ----
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "creating venv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
CONSTRAINTS_FILE="$(mktemp)"
trap 'rm -f "$CONSTRAINTS_FILE"' EXIT
printf '%s\n' "${CONSTRAINTS[@]}" >"$CONSTRAINTS_FILE"
echo "installing pinned packages into $VENV (no-op when already there)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
  -c "$CONSTRAINTS_FILE" "${REQUIREMENTS[@]}"

export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONHASHSEED=0

if [[ "$CHECK" == 1 ]]; then
  OUT="$(mktemp -d)"
  "$VENV/bin/python" "$SCRIPT_DIR/make_tiny_multimodal.py" --images "$IMAGES" --out "$OUT"
  status=0
  for f in tiny-medgemma tiny-medsiglip image-preprocessing.json tensor-manifest.json; do
    if ! diff -r -q "$OUT/$f" "$REPO_ROOT/tests/fixtures/$f"; then status=1; fi
  done
  rm -rf "$OUT"
  if [[ "$status" == 0 ]]; then echo "fixtures are byte-identical to a fresh build"; fi
  exit "$status"
fi

"$VENV/bin/python" "$SCRIPT_DIR/make_tiny_multimodal.py" --images "$IMAGES" \
  --out "$REPO_ROOT/tests/fixtures"
du -sh "$REPO_ROOT/tests/fixtures"/*
