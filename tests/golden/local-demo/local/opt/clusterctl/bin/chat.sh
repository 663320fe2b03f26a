#!/usr/bin/env bash
# chat (llama-server) on local: written by clusterctl, do not edit.
set -euo pipefail
exec /opt/clusterctl/engines/llama.cpp/bin/llama-server \
    --model /tmp/clusterctl-demo/models/gemma-270m/gemma-3-270m-it-Q4_K_M.gguf \
    --alias chat \
    --host 127.0.0.1 \
    --port 8080 \
    --ctx-size 8192 \
    --parallel 1 \
    --n-gpu-layers 999 \
    --batch-size 2048 \
    --ubatch-size 512 \
    --cache-type-k f16 \
    --cache-type-v f16 \
    --flash-attn auto \
    --fit off \
    --metrics \
    --no-jinja \
    --chat-template gemma
