"""The MLX planner against mlx-lm itself: the tiny Llama (float32) loaded by mlx-lm's own
`load`, its prompt cache filled to a context, and MLX's own counters read (tests/mlx_measure.py).
The weights and the KV cache are exact; the peak stays inside the planned total (weights + KV +
the planner's runtime allowance). Figures: docs/accuracy.md."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from clusterctl.models.hf_config import read_local_hf_dir
from clusterctl.planner.engines import mlx_kv_bytes, split_mlx
from tests import assets

pytestmark = pytest.mark.real


@pytest.mark.parametrize(("prompt", "generated"), [(256, 0), (1000, 100), (2000, 47)])
def test_weights_and_kv_are_what_mlx_allocates_and_the_peak_fits_the_plan(prompt: int, generated: int) -> None:
    folder = assets.tiny_model_dir()
    meta = read_local_hf_dir(folder, format="mlx")
    script = Path(__file__).resolve().parents[1] / "mlx_measure.py"
    proc = subprocess.run([str(assets.mlx_python()), str(script), str(folder), str(prompt), str(generated)],
                          capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    context = prompt + generated
    share = split_mlx(meta, context, [8 << 30])[0]
    print(f"\ncontext {context}: weights planner {share.weights} / mlx {got['weights']}; KV planner {share.kv} / "
          f"mlx {got['kv']}; peak {got['peak']} <= planned {share.total}")
    assert got["tokens"] == context and got["kv_dtype"] == "mlx.core.float32"
    assert 0 <= got["weights"] - meta.weights_bytes <= 64  # the safetensors tensors, plus MLX's few scalars
    assert got["kv"] == mlx_kv_bytes(meta, context) == share.kv  # whole blocks of 256 tokens, float32
    assert got["peak"] <= share.total
