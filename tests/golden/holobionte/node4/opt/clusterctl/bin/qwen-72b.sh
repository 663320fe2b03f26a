#!/usr/bin/env bash
# qwen-72b (vllm) on node4: written by clusterctl, do not edit.
set -euo pipefail
export CUDA_VISIBLE_DEVICES=1
export HF_HUB_OFFLINE=1
VLLM_API_KEY="$(< /etc/clusterctl/secrets/qwen-72b.key)"
export VLLM_API_KEY
exec /opt/clusterctl/engines/vllm/bin/vllm \
    serve \
    /opt/models/qwen2.5-72b-awq \
    --served-model-name qwen-72b \
    --host 192.168.1.104 \
    --port 8001 \
    --tensor-parallel-size 1 \
    --pipeline-parallel-size 1 \
    --gpu-memory-utilization 0.95 \
    --max-model-len 16384 \
    --quantization awq
