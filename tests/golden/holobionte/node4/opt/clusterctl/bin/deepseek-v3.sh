#!/usr/bin/env bash
# deepseek-v3 (vllm) on node4: written by clusterctl, do not edit.
set -euo pipefail
export CUDA_VISIBLE_DEVICES=0
export HF_HUB_OFFLINE=1
VLLM_API_KEY="$(< /etc/clusterctl/secrets/deepseek-v3.key)"
export VLLM_API_KEY
exec /opt/clusterctl/engines/vllm/bin/vllm \
    serve \
    /opt/models/deepseek-v3-awq \
    --served-model-name deepseek-v3 \
    --host 192.168.1.104 \
    --port 8000 \
    --tensor-parallel-size 1 \
    --pipeline-parallel-size 1 \
    --gpu-memory-utilization 0.95 \
    --max-model-len 16384 \
    --quantization awq
