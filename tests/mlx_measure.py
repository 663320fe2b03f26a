"""Run with mlx-lm's own Python: load a model, fill its prompt cache to N tokens (a prompt of
N_PROMPT tokens, then N_GEN greedy steps) and print what MLX itself reports: the bytes of the
loaded weights (active memory after load), of the KV cache's arrays, and the peak memory.

    python mlx_measure.py MODEL_DIR N_PROMPT N_GEN
"""

from __future__ import annotations

import json
import sys

import mlx.core as mx
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache


def main() -> None:
    model_dir, n_prompt, n_gen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    model, _ = load(model_dir)
    mx.eval(model.parameters())
    weights = mx.get_active_memory()
    mx.reset_peak_memory()
    cache = make_prompt_cache(model)
    ids = mx.array([[5 + (i % 300) for i in range(n_prompt)]])
    logits = model(ids, cache=cache)
    mx.eval(logits)
    y = mx.argmax(logits[:, -1, :], axis=-1)
    for _ in range(n_gen):
        logits = model(y[:, None], cache=cache)
        y = mx.argmax(logits[:, -1, :], axis=-1)
        mx.eval(y)
    kv = sum(c.keys.nbytes + c.values.nbytes for c in cache)
    print(json.dumps({"weights": weights, "kv": kv, "peak": mx.get_peak_memory(), "tokens": cache[0].offset,
                      "kv_dtype": str(cache[0].keys.dtype)}))


if __name__ == "__main__":
    main()
