"""vLLM's GPU budget against published start-up logs.

Each case in tests/data/public_vllm_logs.yaml quotes the log lines of one GPU of a vLLM instance
and cites where they were published. The planner builds the same budget vLLM's worker does:
requested memory (total x gpu_memory_utilization) - weights - the profile run's peak activation -
non-torch memory = the KV cache, cut into blocks of 16 tokens.

Tolerances: the KV cache within 10% of the logged figure (or of the figure the log's own
subtraction gives, where the published excerpt ends before it), the KV tokens within 10% where
the log shows them for the same rank, the weights within 2%, and the start/refuse verdict exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from clusterctl.models.meta import ModelMeta
from clusterctl.planner.engines import (
    GIB,
    VllmEstimate,
    estimate_vllm,
    vllm_max_num_batched_tokens,
    vllm_max_num_seqs,
)

CASES: list[dict[str, Any]] = yaml.safe_load(
    (Path(__file__).resolve().parents[1] / "data" / "public_vllm_logs.yaml").read_text())


def meta_of(case: dict[str, Any]) -> ModelMeta:
    m, s = case["model"], case["settings"]
    if m["params"]:
        weights = int(m["params"] * m["dtype_bytes"])
    else:  # a quantised checkpoint the log does not name: its weights as loaded
        weights = int(case["measured"]["weights_gib"] * GIB) * s["tp"] * s["pp"]
    return ModelMeta(
        format="safetensors", architecture=m["arch"], n_layer=m["n_layer"], n_embd=m["n_embd"],
        n_head=m["n_head"], n_head_kv=m["n_head_kv"], head_dim_k=m["head_dim"], head_dim_v=m["head_dim"],
        n_vocab=m["n_vocab"], n_ctx_train=m["n_ctx_train"], n_ff=m["n_ff"], file_bytes=weights,
    )


def plan(case: dict[str, Any]) -> VllmEstimate:
    s, gpu = case["settings"], case["gpu"]
    return estimate_vllm(
        meta_of(case), gpu_memory=int(gpu["total_gib"] * GIB), utilization=s["gpu_memory_utilization"],
        tp=s["tp"], pp=s["pp"], max_model_len=s["max_model_len"], vllm_version=case["vllm_version"].split()[0],
        gpu_name=gpu["name"], api_server=s["api_server"], enforce_eager=s["enforce_eager"])


def ids() -> list[str]:
    return [c["id"] for c in CASES]


def test_the_data_file_has_enough_cases_and_refusals() -> None:
    assert len(CASES) >= 6
    assert sum(not c["measured"]["started"] for c in CASES) >= 2
    for c in CASES:
        assert c["source"].startswith("https://") and c["quote"].strip()


@pytest.mark.parametrize("case", CASES, ids=ids())
def test_start_or_refuse_verdict_is_vllms(case: dict[str, Any]) -> None:
    assert plan(case).fits is case["measured"]["started"]


@pytest.mark.parametrize("case", CASES, ids=ids())
def test_kv_cache_memory_within_10_percent(case: dict[str, Any]) -> None:
    est = plan(case)
    kv = case["measured"].get("kv_gib")
    if kv is None:
        kv = case["derived"]["kv_gib"]
    if kv <= 0:  # vLLM had nothing left for the KV cache: so must the plan
        assert est.kv_budget <= 0 and est.num_gpu_blocks == 0
        return
    assert est.kv_budget / GIB == pytest.approx(kv, rel=0.10)


@pytest.mark.parametrize("case", [c for c in CASES if c["measured"].get("kv_tokens")],
                         ids=[c["id"] for c in CASES if c["measured"].get("kv_tokens")])
def test_kv_tokens_and_concurrency_within_10_percent(case: dict[str, Any]) -> None:
    est, measured = plan(case), case["measured"]
    assert est.max_tokens == pytest.approx(measured["kv_tokens"], rel=0.10)
    assert est.max_tokens % 16 == 0
    assert est.max_concurrency == pytest.approx(measured["max_concurrency"], rel=0.10)


@pytest.mark.parametrize("case", CASES, ids=ids())
def test_weights_per_gpu_within_2_percent(case: dict[str, Any]) -> None:
    assert plan(case).weights / GIB == pytest.approx(case["measured"]["weights_gib"], rel=0.02)


def test_refused_start_names_fewer_tokens_than_max_model_len() -> None:
    case = next(c for c in CASES if c["id"] == "rtx3090-llama31-8b-29k-refused")
    est = plan(case)
    assert est.max_tokens < 29000 <= est.max_model_len
    assert est.max_concurrency < 1


# ---------------------------------------------------------------------------------------------
# vLLM's defaults for the profile run and the parts of the budget, from its source


def test_profile_run_size_follows_vllms_defaults() -> None:
    h100, a100, l4 = 79 * GIB, 79 * GIB, 22 * GIB
    recent = (0, 11)
    assert vllm_max_num_batched_tokens(version=recent, gpu_memory=h100, gpu_name="NVIDIA H100 80GB HBM3",
                                       max_model_len=131072) == 8192
    assert vllm_max_num_batched_tokens(version=recent, gpu_memory=h100, gpu_name="H100", max_model_len=4096,
                                       api_server=False) == 16384
    assert vllm_max_num_batched_tokens(version=recent, gpu_memory=a100, gpu_name="NVIDIA A100-SXM4-80GB",
                                       max_model_len=4096) == 2048
    assert vllm_max_num_batched_tokens(version=recent, gpu_memory=l4, gpu_name="NVIDIA L4",
                                       max_model_len=4096, api_server=False) == 8192
    assert vllm_max_num_batched_tokens(version=(0, 8), gpu_memory=h100, gpu_name="H100",
                                       max_model_len=4096) == 2048  # before the big-GPU defaults
    assert vllm_max_num_batched_tokens(version=(0, 6), gpu_memory=l4, gpu_name=None, max_model_len=20000) == 20000
    assert vllm_max_num_batched_tokens(version=(0, 6), gpu_memory=l4, gpu_name=None, max_model_len=1024) == 2048
    assert vllm_max_num_batched_tokens(version=(0, 6), gpu_memory=l4, gpu_name=None, max_model_len=40000) == 512
    assert vllm_max_num_batched_tokens(version=(0, 7), gpu_memory=l4, gpu_name=None, max_model_len=40000) == 2048
    assert vllm_max_num_seqs(version=recent, gpu_memory=h100, gpu_name="H100") == 1024
    assert vllm_max_num_seqs(version=recent, gpu_memory=a100, gpu_name="A100") == 256


def llama8b() -> ModelMeta:
    return meta_of(next(c for c in CASES if c["id"] == "rtx3090-llama31-8b-20k"))


def test_cuda_graphs_are_outside_the_kv_budget_until_vllm_budgets_them() -> None:
    common: dict[str, Any] = {"gpu_memory": 80 * GIB, "utilization": 0.9, "tp": 1, "pp": 1, "max_model_len": 8192}
    graphs = estimate_vllm(llama8b(), vllm_version="0.11.0", **common)
    eager = estimate_vllm(llama8b(), vllm_version="0.11.0", enforce_eager=True, **common)
    budgeted = estimate_vllm(llama8b(), vllm_version="0.21.0", **common)
    assert graphs.cuda_graph > 0 and eager.cuda_graph == 0
    assert graphs.kv_budget == eager.kv_budget  # captured after the KV cache is sized
    assert graphs.activation == eager.activation + graphs.cuda_graph
    assert budgeted.kv_budget == graphs.kv_budget - graphs.cuda_graph


def test_fits_needs_the_blocks_of_one_whole_sequence() -> None:
    est = estimate_vllm(llama8b(), gpu_memory=24 * GIB, utilization=0.9, tp=1, pp=1, max_model_len=4096,
                        vllm_version="0.11.0")
    exact = estimate_vllm(llama8b(), gpu_memory=24 * GIB, utilization=0.9, tp=1, pp=1,
                          max_model_len=est.max_tokens, vllm_version="0.11.0")
    over = estimate_vllm(llama8b(), gpu_memory=24 * GIB, utilization=0.9, tp=1, pp=1,
                         max_model_len=est.max_tokens + 1, vllm_version="0.11.0")
    assert exact.fits and not over.fits
    assert est.num_gpu_blocks * est.block_size * est.kv_bytes_per_token <= est.kv_budget


def test_measured_weights_and_kv_dtype_can_be_given() -> None:
    est = estimate_vllm(llama8b(), gpu_memory=24 * GIB, utilization=0.9, tp=1, pp=1, max_model_len=4096,
                        weights=10 * GIB, kv_dtype_bytes=1)
    assert est.weights == 10 * GIB
    assert est.kv_bytes_per_token == 32 * 8 * 256
