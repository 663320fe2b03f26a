#!/usr/bin/env bash
# light (llama-server) on bestbox: written by clusterctl, do not edit.
set -euo pipefail
/usr/bin/docker rm --force clusterctl-light >/dev/null 2>&1 || true
exec /usr/bin/docker \
    run \
    --rm \
    --name clusterctl-light \
    --network host \
    --device /dev/kfd \
    --device /dev/dri \
    --volume /opt/models:/opt/models:ro \
    --entrypoint llama-server \
    llama-strix:latest \
    --model /opt/models/qwen2.5-7b/Qwen2.5-7B-Instruct-Q5_K_M.gguf \
    --alias light \
    --host 127.0.0.1 \
    --port 8081 \
    --ctx-size 4096 \
    --parallel 2 \
    --n-gpu-layers 999 \
    --batch-size 2048 \
    --ubatch-size 512 \
    --cache-type-k f16 \
    --cache-type-v f16 \
    --flash-attn on \
    --fit off \
    --metrics \
    --no-direct-io \
    --mmap
